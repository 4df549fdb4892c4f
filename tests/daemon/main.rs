//! The daemon's integration tests: one test binary, so it links once.

mod emails;
mod followups;
mod foundation;
mod harness;
mod insight;
mod operators;
mod pull;
mod report;
mod smtp_harness;
mod webhooks;
