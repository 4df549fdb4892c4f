//! `/healthz`, `/readyz` and `/metrics`.

use super::error::ApiError;
use crate::app::AppState;
use crate::telemetry::{Metrics, StageLabels};
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;
use std::sync::Arc;

/// Alive: the process answers. Says nothing about the connections.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready: migrations are done and every connection has started; the body names those
/// that have not and any that need attention (for example re-authorization).
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

/// Prometheus text format; deal gauges are refreshed from the store at scrape time.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    super::pipeline_metrics::refresh(&state).await?;
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
