//! `POST /webhooks/{connection}`: webhook intake.
//!
//! Order of checks, each answered before the next is attempted:
//! 1. unknown connection, or one that takes no webhooks: 404;
//! 2. body over `server.max_body_bytes`: 413 (read with the cap, never buffered whole);
//! 3. the vendor's unsigned test ping ([`Scheme::is_ping`]): 200, nothing stored;
//! 4. signature, in constant time, against every configured secret, before anything of
//!    the body is parsed: missing, bad or stale gives 401 and nothing is written;
//! 5. a body whose JSON nests [`MAX_DEPTH`](crate::domain::MAX_DEPTH) levels deep or
//!    more (a byte scan, before any parse) gives 400 and is kept in the dead-letter
//!    table;
//! 6. the connector parses the body: a malformed one, or one its unsigned topic header
//!    ([`Scheme::topic`]) contradicts, gives 400 and is kept in the dead-letter table;
//! 7. the delivery is committed to the inbox (grouped with concurrent ones), then 200.
//!    A delivery id ([`Scheme::delivery_id`]) already in the inbox is acknowledged with
//!    200 and not stored again; so is, for schemes that sign only the body, a body
//!    identical to one the connection received within the scheme's replay window
//!    ([`Scheme::body_replay_window`]), whatever delivery id it comes with.
//!    A full inbox (or a full commit queue) answers 503 with `Retry-After` and stores
//!    nothing: the vendor retries, nothing acknowledged is lost.
//!
//! Every rejection logs the connection and the reason; secrets never reach a log line,
//! and signature and auth headers ([`signature::header::SECRET`]) are not stored.
//!
//! What differs between vendors (header names, delivery ids, pings, topics) is asked of
//! the connection's [`Scheme`]; this module names no vendor.

use super::HttpState;
use super::error::ApiError;
use crate::connectors::WebhookEvent;
use crate::connectors::signature::{self, Scheme, SignatureError};
use crate::domain::ConnectionName;
use crate::store::{EnqueueError, Enqueued, NewWebhook};
use crate::telemetry::RecordLabels;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{debug, error, warn};

/// The headers kept with a delivery: every visible-ASCII one but those that
/// authenticate it.
pub(crate) fn stored_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !signature::header::SECRET.contains(&name.as_str()))
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

fn reject(connection: &str, status: StatusCode, reason: &str) -> Response {
    warn!(
        connection,
        status = status.as_u16(),
        reason,
        "webhook rejected"
    );
    (status, Json(json!({ "error": reason }))).into_response()
}

fn accepted(status: &str) -> Response {
    (StatusCode::OK, Json(json!({ "status": status }))).into_response()
}

/// Counts a delivery of a configured connection by outcome.
fn count(state: &HttpState, connection: &str, outcome: &str) {
    state
        .metrics
        .webhooks
        .get_or_create(&RecordLabels {
            connection: connection.to_owned(),
            outcome: outcome.to_owned(),
        })
        .inc();
}

/// The URL the vendor signed (for schemes that sign it): `server.public_url` plus path
/// and query, or,
/// without a public URL, the Host header the request came with.
fn signed_uri(state: &HttpState, request_uri: &axum::http::Uri, headers: &HeaderMap) -> String {
    let path_and_query = request_uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    match &state.config().server.public_url {
        Some(public) => format!("{}{path_and_query}", public.as_str().trim_end_matches('/')),
        None => {
            let host = headers
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            format!("http://{host}{path_and_query}")
        }
    }
}

/// Receives one delivery for a connection.
pub async fn receive(
    State(state): State<Arc<HttpState>>,
    Path(connection): Path<String>,
    request: Request,
) -> Response {
    let Some(runtime) = state.connection(&connection) else {
        return reject(&connection, StatusCode::NOT_FOUND, "unknown connection");
    };
    let Some(scheme) = runtime.connector.webhook_scheme() else {
        return reject(
            &connection,
            StatusCode::NOT_FOUND,
            "this connection takes no webhooks",
        );
    };
    let (parts, body) = request.into_parts();
    let limit = state.config().server.max_body_bytes;
    let body = match read_capped(body, &parts.headers, limit).await {
        Ok(body) => body,
        Err(status) if status == StatusCode::PAYLOAD_TOO_LARGE => {
            count(&state, &connection, "too_large");
            return reject(
                &connection,
                status,
                &format!("body is larger than {limit} bytes"),
            );
        }
        Err(status) => return reject(&connection, status, "could not read the body"),
    };

    if scheme.is_ping(&parts.headers, &body) {
        debug!(connection, "webhook ping acknowledged");
        count(&state, &connection, "ping");
        return accepted("ping");
    }

    let secrets: Vec<&[u8]> = runtime
        .config
        .webhook_secrets
        .iter()
        .map(|secret| secret.expose().as_bytes())
        .collect();
    if secrets.is_empty() && scheme != Scheme::None {
        error!(
            connection,
            "webhook refused: the connection has no webhook_secret configured"
        );
        return reject(
            &connection,
            StatusCode::UNAUTHORIZED,
            "no webhook secret configured",
        );
    }
    // A sender that names its key (SNS's certificate): the connector fetches it from
    // an allowed host, and it replaces the configured secrets for the check.
    let fetched = match runtime.connector.webhook_keys(&body).await {
        Ok(fetched) => fetched,
        Err(reason) => {
            count(&state, &connection, "unauthorized");
            return reject(&connection, StatusCode::UNAUTHORIZED, &reason);
        }
    };
    let secrets: Vec<&[u8]> = match &fetched {
        Some(keys) => keys.iter().map(Vec::as_slice).collect(),
        None => secrets,
    };
    let uri = signed_uri(&state, &parts.uri, &parts.headers);
    let signed = signature::Request {
        method: parts.method.as_str(),
        uri: &uri,
        headers: &parts.headers,
        body: &body,
    };
    let verified = match signature::verify(&scheme, &secrets, &signed, SystemTime::now()) {
        Ok(verified) => verified,
        Err(error @ SignatureError::BadSecret { .. }) => {
            error!(connection, %error, "webhook refused: a configured secret is unusable");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": "internal error" })),
            )
                .into_response();
        }
        Err(error) => {
            count(&state, &connection, "unauthorized");
            return reject(&connection, StatusCode::UNAUTHORIZED, &error.to_string());
        }
    };

    // Past the inbox's limit nothing more is accepted; the vendor retries later.
    if let Err(full) = state.store.inbox_has_room() {
        count(&state, &connection, "refused");
        return refused(&connection, &full);
    }

    let headers = stored_headers(&parts.headers);
    let topic = scheme.topic(&parts.headers);
    let received_at = Utc::now();

    // Before anything parses it: JSON nested past the limit would be stored as a deal
    // that every later read fails on.
    let delivery_id = scheme.delivery_id(&verified, &body);
    if let Err(too_deep) = crate::domain::check_depth(&body) {
        count(&state, &connection, "malformed");
        let reason = too_deep.to_string();
        return dead_letter(
            &state,
            &connection,
            &delivery_id,
            topic.as_deref(),
            &reason,
            headers,
            body,
            received_at,
        )
        .await;
    }

    // The connector checks the body before the commit, so a malformed one is answered
    // 400 (and kept as a dead letter) rather than acknowledged; the worker parses it
    // again when it applies the row. `Bytes` is shared, so the inbox gets the body
    // without a copy.
    let event = WebhookEvent {
        connection: ConnectionName::new(connection.clone()),
        delivery_id,
        topic,
        headers,
        body: body.to_vec(),
        received_at,
    };
    match runtime.connector.parse_webhook(&event) {
        Err(bad) => {
            count(&state, &connection, "malformed");
            dead_letter(
                &state,
                &connection,
                &event.delivery_id,
                event.topic.as_deref(),
                &bad.reason,
                event.headers,
                body,
                received_at,
            )
            .await
        }
        Ok(actions) if actions.is_empty() => {
            debug!(connection, topic = ?event.topic, "webhook has nothing for dealsync; acknowledged");
            count(&state, &connection, "ignored");
            accepted("ignored")
        }
        Ok(_) => {
            let stored = state
                .store
                .enqueue_webhook(NewWebhook {
                    connection: connection.clone(),
                    delivery_id: event.delivery_id,
                    topic: event.topic,
                    headers: event.headers,
                    body_sha256: scheme
                        .body_replay_window()
                        .map(|window| (Sha256::digest(&body).into(), window)),
                    body,
                    received_at,
                })
                .await;
            match stored {
                Ok(Enqueued::Stored) => {
                    count(&state, &connection, "accepted");
                    accepted("accepted")
                }
                Ok(Enqueued::Duplicate) => {
                    count(&state, &connection, "duplicate");
                    debug!(connection, "duplicate webhook delivery acknowledged");
                    accepted("duplicate")
                }
                Err(error) => {
                    let (outcome, response) = not_stored(&connection, error);
                    count(&state, &connection, outcome);
                    response
                }
            }
        }
    }
}

/// Keeps an authentic delivery that cannot be taken in as a dead letter, then answers
/// 400 with the reason.
#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    state: &HttpState,
    connection: &str,
    delivery_id: &str,
    topic: Option<&str>,
    reason: &str,
    headers: Vec<(String, String)>,
    body: axum::body::Bytes,
    received_at: chrono::DateTime<Utc>,
) -> Response {
    if let Err(error) = state
        .store
        .dead_letter(
            connection,
            delivery_id,
            topic,
            reason,
            headers,
            body,
            received_at,
        )
        .await
    {
        return ApiError::from(error).into_response();
    }
    reject(
        connection,
        StatusCode::BAD_REQUEST,
        &format!("malformed payload: {reason}"),
    )
}

/// The answer to a delivery the inbox did not store, and the outcome it is counted
/// under: `refused` (503 with `Retry-After`) when a later retry can succeed (the inbox
/// full, the commit queue full, a full disk), `failed` (500) when no retry can help.
fn not_stored(connection: &str, error: EnqueueError) -> (&'static str, Response) {
    if error.retry_after().is_some() {
        return ("refused", refused(connection, &error));
    }
    let response = match error {
        EnqueueError::Store(error) => ApiError::from(error).into_response(),
        other => ApiError::Inbox(other).into_response(),
    };
    ("failed", response)
}

/// 503 with `Retry-After`: the delivery was not stored, and a later retry can succeed.
fn refused(connection: &str, error: &EnqueueError) -> Response {
    let retry_after = error
        .retry_after()
        .unwrap_or(std::time::Duration::from_secs(1));
    warn!(connection, %error, retry_after_s = retry_after.as_secs(), "webhook refused for now");
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": "the webhook inbox is full; retry later" })),
    )
        .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(retry_after.as_secs()),
    );
    response
}

/// Reads the body up to `limit` bytes: 413 past it (a declared length says so at once).
pub(super) async fn read_capped(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<axum::body::Bytes, StatusCode> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            let too_large = error.is::<http_body_util::LengthLimitError>();
            Err(if too_large {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn sqlite(code: std::ffi::c_int) -> EnqueueError {
        let error = rusqlite::Error::SqliteFailure(ffi::Error::new(code), None);
        EnqueueError::Store(error.into())
    }

    fn retry_after(response: &Response) -> Option<&str> {
        let value = response.headers().get(axum::http::header::RETRY_AFTER)?;
        value.to_str().ok()
    }

    /// A delivery the inbox could not store is never acknowledged: 503 with the wait
    /// a retry needs when one can help, 500 without `Retry-After` when none can.
    #[test]
    fn an_unstored_delivery_is_refused_for_a_retry_only_when_one_can_help() {
        for (error, wait) in [
            (EnqueueError::Busy, "1"),
            (EnqueueError::Full { pending: 10 }, "30"),
            (sqlite(ffi::SQLITE_FULL), "60"),
        ] {
            let shown = error.to_string();
            let (outcome, response) = not_stored("shop", error);
            assert_eq!(outcome, "refused", "{shown}");
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{shown}"
            );
            assert_eq!(retry_after(&response), Some(wait), "{shown}");
        }
        for code in [ffi::SQLITE_CORRUPT, ffi::SQLITE_READONLY] {
            let (outcome, response) = not_stored("shop", sqlite(code));
            assert_eq!(outcome, "failed", "{code}");
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(retry_after(&response), None);
        }
    }
}
