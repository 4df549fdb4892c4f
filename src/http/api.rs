//! The read API under `/api/v1`: deals, one deal with its history and emails, one
//! person across connections, the funnel, the forecast, the outbox, the canonical
//! pipelines. JSON only, read-only.
//!
//! Invariants:
//! - Every route needs `Authorization: Bearer <server.api_token>`; the token is
//!   compared in constant time (over SHA-256 digests, so its length does not leak
//!   either). A missing or wrong token gets 401 with `WWW-Authenticate: Bearer`.
//! - Without a configured token the API does not exist: every route answers 404.
//! - Lists are paginated: `limit` (1–1000, default 100) and `offset`; the answer
//!   carries `next_offset` when more may follow.

use super::HttpState;
use super::error::ApiError;
use crate::domain::{DealStatus, people};
use crate::report::{Report, ReportOptions};
use crate::store::{DealFilter, OutboxFilter};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// The `/api/v1` routes, behind the token check.
pub fn routes(state: Arc<HttpState>) -> Router<Arc<HttpState>> {
    Router::new()
        .route("/api/v1/deals", get(deals))
        .route("/api/v1/deals/{id}", get(deal))
        .route("/api/v1/people/{email}", get(person))
        .route("/api/v1/funnel", get(funnel))
        .route("/api/v1/forecast", get(forecast))
        .route("/api/v1/outbox", get(outbox))
        .route("/api/v1/pipelines", get(pipelines))
        .route_layer(axum::middleware::from_fn_with_state(state, authenticate))
}

/// Whether `presented` equals `expected`, in time independent of where they differ.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    presented.ct_eq(&expected).into()
}

/// The bearer token in the request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn authenticate(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: Next,
) -> Response {
    let config = state.config();
    let Some(expected) = &config.server.api_token else {
        return ApiError::NotFound(
            "the read API is off: set server.api_token to turn it on".into(),
        )
        .into_response();
    };
    match bearer(request.headers()) {
        Some(presented) if token_matches(presented, expected.expose()) => next.run(request).await,
        _ => {
            let mut response = ApiError::Unauthorized.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(value)| value)
        .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
}

fn page(limit: Option<u32>, offset: Option<u32>) -> Result<(u32, u32), ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    Ok((limit, offset.unwrap_or(0)))
}

fn next_offset(returned: usize, limit: u32, offset: u32) -> Option<u32> {
    (returned as u32 == limit).then(|| offset + limit)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealsQuery {
    connection: Option<String>,
    pipeline: Option<String>,
    stage: Option<String>,
    status: Option<String>,
    /// An address: only that person's deals, in any connection.
    person: Option<String>,
    /// A domain: only that company's deals.
    company: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

/// `GET /api/v1/deals`: deals, newest activity first.
async fn deals(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<DealsQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let params = query(params)?;
    let (limit, offset) = page(params.limit, params.offset)?;
    let status = params
        .status
        .as_deref()
        .map(|text| {
            DealStatus::parse(text).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "status must be open, won, lost, unmapped or deleted, got {text:?}"
                ))
            })
        })
        .transpose()?;
    if let Some(person) = &params.person
        && people::person_key(person).is_none()
    {
        return Err(ApiError::BadRequest(format!(
            "person must be an email address, got {person:?}"
        )));
    }
    if let Some(company) = &params.company
        && people::company_domain(company).is_none()
    {
        return Err(ApiError::BadRequest(format!(
            "company must be a company's domain (not a free-mail one), got {company:?}"
        )));
    }
    let deals = state
        .store
        .deals(DealFilter {
            connection: params.connection,
            pipeline: params.pipeline,
            stage: params.stage,
            status,
            person: params.person,
            company: params.company,
            limit: Some(limit),
            offset: Some(offset),
        })
        .await?;
    Ok(Json(json!({
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset(deals.len(), limit, offset),
        "deals": deals,
    })))
}

/// `GET /api/v1/deals/{id}`: the deal, its source record, its stage history (oldest
/// first), its emails (outbox rows) and each follow-up rule's decision about it today
/// (`followup::explain`, the same answer as `dealsync deals show`).
async fn deal(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
) -> Result<Json<crate::followup::explain::DealView>, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("a deal id is a number, got {id:?}")))?;
    crate::followup::explain::deal_view(&state.store, state.config(), id, Utc::now())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no deal {id}")))
}

/// `GET /api/v1/people/{email}`: one person across every connection: their deals,
/// carts, emails (outbox rows) and suppressions (`Store::person`, what `dealsync
/// people show` prints).
async fn person(
    State(state): State<Arc<HttpState>>,
    Path(email): Path<String>,
) -> Result<Json<crate::store::Person>, ApiError> {
    state
        .store
        .person(&email)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::BadRequest(format!("expected an email address, got {email:?}")))
}

/// `GET /api/v1/pipelines`: the canonical pipelines in force, each stage with its
/// label, kind, probability, stall threshold and description (entry and exit criteria).
async fn pipelines(State(state): State<Arc<HttpState>>) -> Json<serde_json::Value> {
    Json(json!({ "pipelines": state.config().pipelines }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    /// A date (UTC midnight) or an RFC 3339 time; default 30 days before `until`.
    since: Option<String>,
    /// Default: now.
    until: Option<String>,
    pipeline: Option<String>,
    connection: Option<String>,
    min_cohort: Option<u64>,
}

async fn build_report(state: &HttpState, params: ReportQuery) -> Result<Report, ApiError> {
    let instant = |name: &str, text: Option<String>| -> Result<Option<DateTime<Utc>>, ApiError> {
        text.map(|text| {
            crate::domain::parse_instant(&text)
                .map_err(|message| ApiError::BadRequest(format!("{name}: {message}")))
        })
        .transpose()
    };
    let until = instant("until", params.until)?.unwrap_or_else(Utc::now);
    let since = instant("since", params.since)?.unwrap_or(until - chrono::Duration::days(30));
    if since >= until {
        return Err(ApiError::BadRequest("since must be before until".into()));
    }
    let config = state.config();
    if let Some(pipeline) = &params.pipeline
        && config.pipelines.get(pipeline).is_none()
    {
        return Err(ApiError::BadRequest(format!("no pipeline {pipeline:?}")));
    }
    let mut options = ReportOptions::last_days(until, 30);
    options.since = since;
    options.pipeline = params.pipeline;
    options.connection = params.connection;
    if let Some(min_cohort) = params.min_cohort {
        options.min_cohort = min_cohort;
    }
    Ok(state
        .store
        .report(config.pipelines.clone(), options)
        .await?)
}

/// `GET /api/v1/funnel`: the report's per-stage figures, in total and per connection.
async fn funnel(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let report = build_report(&state, query(params)?).await?;
    let scope = |s: &crate::report::ScopeReport| {
        json!({
            "connection": s.connection,
            "unmapped_open_deals": s.unmapped_open_deals,
            "pipelines": s.pipelines,
            "cart_recovery": s.cart_recovery,
        })
    };
    Ok(Json(json!({
        "since": report.since,
        "until": report.until,
        "pipeline": report.pipeline,
        "connection": report.connection,
        "total": scope(&report.total),
        "by_connection": report.by_connection.iter().map(scope).collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/forecast`: Σ amount × probability by currency and expected close month.
async fn forecast(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let report = build_report(&state, query(params)?).await?;
    Ok(Json(json!({
        "as_of": report.until,
        "pipeline": report.pipeline,
        "connection": report.connection,
        "total": report.total.forecast,
        "by_connection": report
            .by_connection
            .iter()
            .map(|s| json!({ "connection": s.connection, "forecast": s.forecast }))
            .collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxQuery {
    state: Option<String>,
    /// `email` or `expire`.
    action: Option<String>,
    rule: Option<String>,
    deal_id: Option<i64>,
    limit: Option<u32>,
    offset: Option<u32>,
}

/// `GET /api/v1/outbox`: outbox rows (follow-up emails and expiries), most recently
/// updated first, and the email counts by rule and state.
async fn outbox(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<OutboxQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let params = query(params)?;
    if let Some(action) = &params.action
        && !matches!(action.as_str(), "email" | "expire")
    {
        return Err(ApiError::BadRequest(format!(
            "action is email or expire, got {action:?}"
        )));
    }
    let (limit, offset) = page(params.limit, params.offset)?;
    let emails = state
        .store
        .outbox_entries(OutboxFilter {
            deal_id: params.deal_id,
            action: params.action,
            state: params.state,
            rule: params.rule,
            limit: Some(limit),
            offset: Some(offset),
        })
        .await?;
    let counts = state.store.outbox_counts().await?;
    Ok(Json(json!({
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset(emails.len(), limit, offset),
        "emails": emails,
        "counts": counts,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("s3cret-token-0123", "s3cret-token-0123"));
        assert!(!token_matches("s3cret-token-0124", "s3cret-token-0123"));
        assert!(!token_matches("", "s3cret-token-0123"));
        assert!(!token_matches(
            "s3cret-token-0123-and-more",
            "s3cret-token-0123"
        ));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
