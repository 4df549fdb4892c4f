//! `POST /bounces`: a relay's pipe posts each bounce email it receives for the return
//! path (a delivery status notification or a complaint report, the raw message as the
//! body) and dealsync records what it reports (`deliverability::ingest_report`).
//!
//! Invariants:
//! - Off (404) unless `deliverability.intake_token` is set; the bearer token is
//!   compared in constant time before the body is read.
//! - The body is read under `server.max_body_bytes` (413 past it).
//! - 200 only after the events and their effects are committed; a store failure is a
//!   5xx, so the relay keeps the message and tries again, and a second delivery of the
//!   same report changes nothing.
//! - A message that is no report (an autoreply) is answered 200 with what was
//!   skipped and why, so a relay does not bounce it back; one that is not a message
//!   at all is 400, one that names no recipient 422.

use super::HttpState;
use super::api::{bearer, token_matches};
use super::error::ApiError;
use crate::deliverability::{self, IngestError, ReportError};
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;
use std::sync::Arc;
use tracing::{info, warn};

pub async fn receive(State(state): State<Arc<HttpState>>, request: Request) -> Response {
    let config = state.config();
    let Some(expected) = &config.deliverability.intake_token else {
        return ApiError::NotFound(
            "bounce intake is off: set deliverability.intake_token to turn it on".into(),
        )
        .into_response();
    };
    let authorized = bearer(request.headers())
        .is_some_and(|presented| token_matches(presented, expected.expose()));
    if !authorized {
        warn!("bounce intake: missing or wrong bearer token; answered 401");
        let mut response = ApiError::Unauthorized.into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let (parts, body) = request.into_parts();
    let limit = config.server.max_body_bytes;
    let body = match super::webhooks::read_capped(body, &parts.headers, limit).await {
        Ok(body) => body,
        Err(StatusCode::PAYLOAD_TOO_LARGE) => {
            return ApiError::PayloadTooLarge(format!("body is larger than {limit} bytes"))
                .into_response();
        }
        Err(_) => return ApiError::BadRequest("could not read the body".into()).into_response(),
    };
    match deliverability::ingest_report(&state.store, &config, &body, Utc::now()).await {
        Ok(outcomes) => {
            for outcome in &outcomes {
                info!(class = outcome.class.as_str(), outbox_id = ?outcome.outbox_id, recorded = outcome.recorded, suppressed = ?outcome.suppressed, stopped = outcome.stopped, "bounce report recorded");
            }
            (StatusCode::OK, Json(json!({ "events": outcomes }))).into_response()
        }
        Err(IngestError::Report(ReportError::NotAReport)) => {
            info!(
                "bounce intake: a message without a delivery or feedback report; nothing recorded"
            );
            let reason = ReportError::NotAReport.to_string();
            (
                StatusCode::OK,
                Json(json!({ "events": [], "skipped": reason })),
            )
                .into_response()
        }
        Err(IngestError::Report(error @ ReportError::NotAMessage)) => {
            warn!(%error, "bounce intake: answered 400");
            ApiError::BadRequest(error.to_string()).into_response()
        }
        Err(IngestError::Report(error)) => {
            warn!(%error, "bounce intake: answered 422");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({ "error": error.to_string() })),
            )
                .into_response()
        }
        Err(IngestError::Store(error)) => ApiError::from(error).into_response(),
    }
}
