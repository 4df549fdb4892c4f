//! The daemon's integration tests: one test binary, so it links once.

mod followups;
mod foundation;
mod harness;
mod insight;
mod pull;
mod report;
mod smtp_harness;
mod vendor_data;
mod webhooks;
