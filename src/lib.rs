//! dealsync: pulls deals from CRMs, receives e-commerce and CRM webhooks, maps every
//! source's native stages onto one canonical pipeline, records every stage change,
//! sends follow-ups and reports the funnel.
//!
//! The module map and the invariants are in `docs/ARCHITECTURE.md`.

pub mod app;
pub mod carts;
pub mod cli;
pub mod config;
pub mod connectors;
pub mod deliverability;
pub mod domain;
pub mod files;
pub mod followup;
/// Entry points of the fuzz targets and of the test replaying their corpus.
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod ingest;
pub mod lock;
pub mod output;
pub mod pipeline;
pub mod replica;
pub mod report;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod sync;
pub mod telemetry;
#[cfg(test)]
mod test_skip;
pub mod webhooks;
pub mod writeback;

/// The allocator for every binary built on this crate (the daemon, its benches and
/// tests): glibc's malloc spent about a fifth of the webhook intake's CPU time in
/// allocation and free across the runtime's threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
