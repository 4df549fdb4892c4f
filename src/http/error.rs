//! How errors become HTTP responses: 4xx bodies say what was wrong; 5xx bodies are
//! generic and the log line carries the cause.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A store read or write failed; the log line carries its cause.
    #[error("internal error: {0}")]
    Store(#[source] crate::store::StoreError),
    /// The webhook inbox failed to take a delivery (and a retry later cannot help).
    #[error("internal error: {0}")]
    Inbox(#[source] crate::store::EnqueueError),
    /// A page template failed to render.
    #[error("internal error: rendering the {page} page: {source}")]
    Render {
        page: &'static str,
        #[source]
        source: minijinja::Error,
    },
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        if error.is_disk_full() {
            ApiError::Unavailable("storage is full".into())
        } else {
            ApiError::Store(error)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, self.to_string()),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
            ApiError::Store(_) | ApiError::Inbox(_) | ApiError::Render { .. } => {
                let cause = crate::telemetry::error_chain(&self);
                tracing::error!(error = %cause, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
            ApiError::Unavailable(cause) => {
                tracing::error!(error = %cause, "request refused: service unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service unavailable".to_owned(),
                )
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}
