//! The daemon's integration tests: one test binary, so it links once.

mod harness;
mod smtp_harness;
