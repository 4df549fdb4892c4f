//! `/healthz`, `/readyz` and `/metrics`.

use super::HttpState;
use super::api::token_matches;
use super::error::ApiError;
use crate::config::MetricsAuth;
use crate::telemetry::{Metrics, StageLabels};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;

/// Alive: the process answers. Says nothing about the connections.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready: migrations are done and every connection has started; the body names those
/// that have not and any that need attention (for example re-authorization).
pub async fn readyz(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::to_value(&report).unwrap_or_default();
    // Marketing rules paused for their complaint rate: an operator's to resume. They do
    // not make the daemon unready; a store that cannot say is named instead.
    if let serde_json::Value::Object(fields) = &mut body {
        let paused = match state.store.rule_pauses().await {
            Ok(pauses) => serde_json::to_value(pauses).unwrap_or_default(),
            Err(error) => serde_json::Value::String(format!("unknown: {error}")),
        };
        fields.insert("paused_rules".to_owned(), paused);
    }
    (status, Json(body))
}

/// Prometheus text format; deal gauges are refreshed from the store at scrape time.
///
/// The figures include revenue per stage, so by default (`server.metrics_auth =
/// "token"`) the scraper must present `server.api_token` (`Authorization: Bearer`, or
/// HTTP Basic with the token as password); without a configured token there are no
/// metrics (404). `metrics_auth = "none"` opens them to whoever reaches the listener.
pub async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let config = state.config();
    if config.server.metrics_auth == MetricsAuth::Token {
        let Some(expected) = &config.server.api_token else {
            return ApiError::NotFound(
                "/metrics needs server.api_token (or server.metrics_auth = \"none\" on a listener only the scraper reaches)".into(),
            )
            .into_response();
        };
        let presented = super::status::presented_token(&headers);
        if !presented.is_some_and(|token| token_matches(&token, expected.expose())) {
            let mut response = ApiError::Unauthorized.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    match render_metrics(&state).await {
        Ok(response) => response.into_response(),
        Err(error) => error.into_response(),
    }
}

async fn render_metrics(state: &HttpState) -> Result<impl IntoResponse + use<>, ApiError> {
    super::pipeline_metrics::refresh(state).await?;
    let counts = state.store.stage_counts().await?;
    state.metrics.deals.clear();
    state.metrics.unmapped_deals.clear();
    for count in counts {
        let deals = count.deals as i64;
        if count.stage == crate::domain::UNMAPPED {
            state
                .metrics
                .unmapped_deals
                .get_or_create(&Metrics::connection(&count.connection))
                .inc_by(deals);
        }
        state
            .metrics
            .deals
            .get_or_create(&StageLabels {
                connection: count.connection,
                pipeline: count.pipeline.unwrap_or_default(),
                stage: count.stage,
            })
            .set(deals);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    ))
}
