//! The HTTP side: one axum router on one listener.
//!
//! Boundary: only this module knows axum. Handlers turn requests into domain calls
//! and results into responses; `error.rs` maps errors to statuses.

mod api;
pub mod error;
mod health;
mod pipeline_metrics;
mod status;
mod unsubscribe;
mod webhooks;

use crate::app::AppState;
use crate::telemetry::HttpLabels;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use std::sync::Arc;

/// Builds the router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(status::page))
        .route("/deals/{id}", get(status::deal_page))
        .merge(api::routes(state.clone()))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe::confirm).post(unsubscribe::one_click),
        )
        .route("/webhooks/{connection}", post(webhooks::receive))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Counts every request by matched route (not raw path: low cardinality) and status.
async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
