//! The HTTP side: one axum router on the main listener (and `/metrics` on a second
//! one when `server.metrics_listen` is set), served by `server::serve`.
//!
//! Boundary: only this module knows axum and hyper. Handlers turn requests into domain
//! calls and results into responses; `error.rs` maps errors to statuses; `server.rs`
//! owns connections and their limits; [`with_layers`] is the stack every request
//! passes, the same in production and in tests.

mod api;
mod bounces;
pub mod error;
mod health;
mod pipeline_metrics;
pub mod server;
mod state;
mod status;
mod unsubscribe;
pub(crate) mod webhooks;

use crate::telemetry::{HttpLabels, Metrics};
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use server::Limits;
pub use state::HttpState;
use std::sync::Arc;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};
use tower_http::timeout::TimeoutLayer;

/// Builds the main listener's router: every route, and `/metrics` unless
/// `server.metrics_listen` gives it a listener of its own.
pub fn router(state: Arc<HttpState>) -> Router {
    let config = state.config();
    let mut routes = Router::new()
        .route("/", get(status::page))
        .route("/deals/{id}", get(status::deal_page))
        .merge(api::routes(state.clone()))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe::confirm).post(unsubscribe::one_click),
        )
        .route("/webhooks/{connection}", post(webhooks::receive))
        .route("/bounces", post(bounces::receive));
    if config.server.metrics_listen.is_none() {
        routes = routes.route("/metrics", get(health::metrics));
    }
    with_layers(
        routes.with_state(state.clone()),
        &Limits::of(&config.server),
        state.metrics.clone(),
    )
}

/// Builds the router of `server.metrics_listen`: `/metrics` alone.
pub fn metrics_router(state: Arc<HttpState>) -> Router {
    let config = state.config();
    with_layers(
        Router::new()
            .route("/metrics", get(health::metrics))
            .with_state(state.clone()),
        &Limits::of(&config.server),
        state.metrics.clone(),
    )
}

/// Wraps `routes` in the layers every request passes, outermost first: the request
/// counter (so that 408s and 500s are counted too), panic → 500 (logged and counted),
/// and the request deadline `body_read_timeout` → 408.
pub fn with_layers(routes: Router, limits: &Limits, metrics: Arc<Metrics>) -> Router {
    routes
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.body_read_timeout,
        ))
        .layer(CatchPanicLayer::custom(PanicAnswer {
            metrics: metrics.clone(),
        }))
        .layer(middleware::from_fn_with_state(metrics, count_requests))
}

/// The answer to a request whose handler panicked.
#[derive(Clone)]
struct PanicAnswer {
    metrics: Arc<Metrics>,
}

impl ResponseForPanic for PanicAnswer {
    type ResponseBody = axum::body::Body;

    fn response_for_panic(
        &mut self,
        payload: Box<dyn std::any::Any + Send + 'static>,
    ) -> http::Response<Self::ResponseBody> {
        let message = payload
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        // The message may quote request data: keep the log line short.
        let message: String = message.chars().take(300).collect();
        tracing::error!(panic = %message, "a request handler panicked; answered 500");
        self.metrics.http_handler_panics.inc();
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({ "error": "internal error" })),
        )
            .into_response()
    }
}

/// Counts every request by matched route (not raw path: low cardinality) and status.
async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
