//! Integration tests of `ledgerlake-attribution`, one binary.

mod epochs;
mod job;
mod retrieval;
mod spans;
