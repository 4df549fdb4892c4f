//! The daemon's integration tests: one test binary, so it links once.

mod foundation;
mod harness;
mod smtp_harness;
