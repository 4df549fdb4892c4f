//! `GET /unsubscribe/{token}` shows a confirmation page; `POST /unsubscribe/{token}`
//! unsubscribes in one click (RFC 8058: mail clients POST
//! `List-Unsubscribe=One-Click` without showing the page).
//!
//! The token is the address signed with `email.unsubscribe_secret`; a forged or
//! mangled token gets 404 and changes nothing. A GET never unsubscribes, so link
//! scanners that follow URLs in mail do not unsubscribe anyone.

use super::HttpState;
use super::error::ApiError;
use crate::domain::EmailAddress;
use crate::followup::unsubscribe;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use std::sync::Arc;

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head>\
         <body style=\"font-family: sans-serif; max-width: 32rem; margin: 3rem auto\">\
         <h1>{title}</h1>{body}</body></html>\n"
    )
}

/// `a***@example.com`: enough for the reader to recognise their address.
fn masked(address: &EmailAddress) -> String {
    let (local, domain) = address
        .as_str()
        .rsplit_once('@')
        .expect("a parsed address has an @");
    let first: String = local.chars().take(1).collect();
    format!("{first}***@{domain}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn verify(state: &HttpState, token: &str) -> Option<EmailAddress> {
    let config = state.config();
    let secret = config.email.unsubscribe_secret.as_ref()?;
    unsubscribe::verify(secret.expose(), token)
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(page(
            "Link not valid",
            "<p>This unsubscribe link is not valid. Please use the link from the latest email.</p>",
        )),
    )
        .into_response()
}

/// The confirmation page with a one-button form.
pub async fn confirm(State(state): State<Arc<HttpState>>, Path(token): Path<String>) -> Response {
    let Some(address) = verify(&state, &token) else {
        return not_found();
    };
    let body = format!(
        "<p>Stop all follow-up emails to <strong>{}</strong>?</p>\
         <form method=\"post\" action=\"/unsubscribe/{}\">\
         <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\">Unsubscribe</button></form>",
        escape(&masked(&address)),
        escape(&token)
    );
    Html(page("Unsubscribe", &body)).into_response()
}

/// One-click unsubscribe: the address goes on the suppression list before the answer.
pub async fn one_click(
    State(state): State<Arc<HttpState>>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let Some(address) = verify(&state, &token) else {
        return Ok(not_found());
    };
    let added = state
        .store
        .suppress(
            address.to_string(),
            "unsubscribed".into(),
            Some("unsubscribe link".into()),
            chrono::Utc::now(),
        )
        .await?;
    tracing::info!(newly = added, "recipient unsubscribed");
    Ok(Html(page(
        "Unsubscribed",
        &format!(
            "<p><strong>{}</strong> will get no more follow-up emails.</p>",
            escape(&masked(&address))
        ),
    ))
    .into_response())
}
