//! Integration tests of ingest against real Delta tables in temp directories.

mod common;
mod exactly_once;
mod fuzz;
mod http_api;
mod validation;
