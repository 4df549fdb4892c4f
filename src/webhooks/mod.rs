//! Inbound webhooks once taken in: the inbox worker.
//!
//! The HTTP handler (`http::webhooks`) owns reading the request, checking it with the
//! connection's signature scheme (`connectors::signature`) and committing what passes to
//! the inbox; `worker` turns inbox rows into deals through their connection's runtime
//! (`ingest`). Idle carts are moved along by `carts`.

pub mod worker;
