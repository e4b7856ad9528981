//! Integration tests of `ledgerlake-attribution`, one binary.

mod job;
mod retrieval;
mod spans;
