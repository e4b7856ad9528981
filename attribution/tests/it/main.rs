//! Integration tests of `ledgerlake-attribution`, one binary.

mod spans;
