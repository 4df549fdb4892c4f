//! The daemon's integration tests: one test binary, so it links once.

mod bounces;
mod emails;
mod fault_suite;
mod followups;
mod foundation;
mod harness;
mod insight;
mod migrate_store;
mod operator_checks;
mod operators;
mod outbound;
mod people;
mod process;
mod pull;
mod replicas;
mod report;
mod review;
mod secrets;
mod server;
mod smtp_harness;
mod storage_postgres;
mod vendor_data;
mod webhooks;
mod writeback;
