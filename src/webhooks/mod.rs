//! Inbound webhooks: what dealsync checks before it trusts a vendor's delivery.
//!
//! `signature` verifies authenticity with no IO; the HTTP handler owns reading the request
//! and storing what passes.

pub mod signature;
