//! Inbound webhooks once taken in: the inbox worker and the cart sweeper.
//!
//! The HTTP handler (`http::webhooks`) owns reading the request, checking it with the
//! connection's signature scheme (`connectors::signature`) and committing what passes to
//! the inbox; `worker` turns inbox rows into deals; `abandonment` moves idle carts along
//! the `ecommerce` pipeline.

pub mod abandonment;
pub mod worker;
