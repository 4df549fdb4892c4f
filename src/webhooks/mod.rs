//! Inbound webhooks: what dealsync checks before it trusts a vendor's delivery.
//!
//! `signature` verifies authenticity with no IO; the HTTP handler (`http::webhooks`) owns
//! reading the request and committing what passes to the inbox; `worker` turns inbox rows
//! into deals through their connection's runtime (`ingest`).

pub mod signature;
pub mod worker;
