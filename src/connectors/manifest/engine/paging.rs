//! Requests and paging: building a vendor request from a manifest [`Request`],
//! sending it (credentials, one refresh on a 401, optional query texts the vendor
//! refuses), reading the records out of the body, and finding the next page.
//!
//! Invariants:
//! - A next-page URL is followed only on the API's own host: the credentials go with it.
//! - A body that is not JSON (a truncated transfer) is read again, at most
//!   [`PARSE_ATTEMPTS`] times; a paged read for discovery or a `list` enrichment
//!   stops after [`DISCOVERY_PAGES`] pages.
//! - An HTTP status the caller may interpret stays a [`CallError::Status`] until the
//!   caller turns it into a [`ConnectorError`].

use super::ManifestConnector;
use crate::connectors::manifest::auth::Authn;
use crate::connectors::manifest::fields::{self, lookup, text_of};
use crate::connectors::manifest::records::{SplitError, SplitPage, split_page};
use crate::connectors::manifest::schema::{Manifest, Method, PaginationKind, Request};
use crate::connectors::manifest::template::Vars;
use crate::connectors::vendor_http::VendorRequest;
use crate::connectors::{ConnectorError, SyncContext};
use serde_json::{Value, json};
use std::collections::HashMap;
use tracing::{info, warn};

/// Attempts at a page whose body is not JSON (a truncated transfer) before the run fails.
const PARSE_ATTEMPTS: u32 = 3;

/// Pages read for pipeline discovery at most.
const DISCOVERY_PAGES: usize = 100;

fn body_key(request: &Request) -> String {
    format!("{:?} {}", request.method, request.path)
}

pub(super) fn collect_bodies(manifest: &Manifest) -> HashMap<String, Value> {
    let mut requests: Vec<&Request> = vec![&manifest.deals.full];
    requests.extend(manifest.deals.incremental.iter());
    requests.extend(manifest.deals.deletes.iter().map(|d| &d.request));
    requests.extend(manifest.deals.one.iter());
    requests.extend(manifest.deals.enrich.iter().map(|e| &e.request));
    requests.extend(manifest.pipelines.iter().map(|p| &p.request));
    requests.extend(manifest.stages.iter().map(|s| &s.request));
    requests
        .into_iter()
        .filter_map(|r| {
            let body = r.body.as_ref()?;
            Some((
                body_key(r),
                serde_json::to_value(body).unwrap_or(Value::Null),
            ))
        })
        .collect()
}

/// A page body split at `pointer` (see [`split_page`]): `Err` for a body that is not
/// JSON (read again), `Ok(None)` when the value there is not a list of records.
pub(super) fn split_records(
    body: &[u8],
    pointer: &str,
) -> Result<Option<SplitPage>, serde_json::Error> {
    match split_page(body, pointer) {
        Ok(page) => Ok(Some(page)),
        Err(SplitError::Json(error)) => Err(error),
        Err(SplitError::NotAnArray) => Ok(None),
    }
}

/// The start of an error body, for messages and logs.
fn excerpt(body: &str) -> String {
    body.chars().take(300).collect()
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().trim_start_matches("rel=").trim_matches('"') == "next");
        is_next.then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

/// A call's failure: an HTTP status the caller may interpret, or a connector error.
pub(super) enum CallError {
    Status(u16, String),
    Connector(ConnectorError),
}

impl From<ConnectorError> for CallError {
    fn from(error: ConnectorError) -> Self {
        CallError::Connector(error)
    }
}

impl CallError {
    pub(super) fn into_connector(self, vendor: &str, path: &str) -> ConnectorError {
        match self {
            CallError::Connector(error) => error,
            CallError::Status(status, excerpt) => ConnectorError::BadResponse {
                vendor: vendor.to_owned(),
                reason: format!("{path} answered {status}: {excerpt}"),
            },
        }
    }
}

impl ManifestConnector {
    pub(super) fn base(&self, authn: &Authn) -> Result<url::Url, ConnectorError> {
        if let Some(base) = &self.configured_base {
            return Ok(base.clone());
        }
        if let Some(text) = &authn.base_url {
            return url::Url::parse(text).map_err(|e| ConnectorError::BadResponse {
                vendor: self.manifest.name.clone(),
                reason: format!("the token names an unusable base URL: {e}"),
            });
        }
        Ok(self.manifest_base.clone())
    }

    pub(super) fn page_size_of(&self, request: &Request) -> u32 {
        request
            .page_size
            .map_or(self.page_size, |p| p.min(self.page_size.max(p)))
    }

    /// What `{optional}` renders now: the optional texts the vendor has not refused.
    fn optional_text(&self) -> String {
        let refused = self
            .optional_refused
            .lock()
            .map(|refused| refused.clone())
            .unwrap_or_default();
        self.manifest
            .deals
            .optional
            .iter()
            .zip(refused.iter().chain(std::iter::repeat(&false)))
            .filter(|(_, refused)| !**refused)
            .map(|(optional, _)| optional.text.as_str())
            .collect()
    }

    /// Turns off the optional texts whose refusal `status` and `body` are; true when
    /// one was (the request is then sent again without it).
    fn refuse_optional(&self, cx: &SyncContext, status: u16, body: &str) -> bool {
        let Ok(mut refused) = self.optional_refused.lock() else {
            return false;
        };
        let mut any = false;
        for (at, optional) in self.manifest.deals.optional.iter().enumerate() {
            let matches = optional.refused.status == status
                && optional
                    .refused
                    .body_contains
                    .as_deref()
                    .is_some_and(|needle| body.contains(needle));
            if matches && refused.get(at) == Some(&false) {
                refused[at] = true;
                any = true;
                info!(connection = %cx.connection, text = %optional.text.trim(), without = optional.without.as_deref().unwrap_or(""),
                    "the vendor does not accept this optional query text for this account; reading without it");
            }
        }
        any
    }

    fn build(
        &self,
        request: &Request,
        page: &Value,
        vars: &Vars,
        authn: &Authn,
    ) -> Result<VendorRequest, ConnectorError> {
        let mut vars = vars.clone();
        vars.set("optional", json!(self.optional_text()));
        let vars = &vars;
        let base = self.base(authn)?;
        let pagination = &request.pagination;
        let follows_url = matches!(
            pagination.kind,
            PaginationKind::NextUrl | PaginationKind::LinkHeader
        ) && page.is_string();
        let mut url = if follows_url {
            let target = page.as_str().unwrap_or_default();
            let joined = base
                .join(target)
                .map_err(|e| self.bad(format!("next page URL {target:?}: {e}")))?;
            // A next-page URL is followed only on the API's own host: our credentials go with it.
            if joined.origin() != base.origin() {
                return Err(self.bad(format!(
                    "next page URL points to another host: {}",
                    joined.origin().ascii_serialization()
                )));
            }
            joined
        } else {
            let path = vars.render(&request.path);
            let mut text = base.as_str().trim_end_matches('/').to_owned();
            text.push_str(&path);
            url::Url::parse(&text).map_err(|e| self.bad(format!("request URL {path:?}: {e}")))?
        };
        {
            let mut pairs = url.query_pairs_mut();
            if !follows_url {
                for (key, value) in &request.query {
                    pairs.append_pair(key, &vars.render(value));
                }
                match pagination.kind {
                    PaginationKind::Cursor => {
                        if let (Some(param), Some(token)) = (&pagination.param, page.as_str()) {
                            pairs.append_pair(param, token);
                        }
                    }
                    PaginationKind::Offset => {
                        if let Some(param) = &pagination.param {
                            pairs.append_pair(param, &page.as_u64().unwrap_or(0).to_string());
                        }
                    }
                    PaginationKind::Page => {
                        if let Some(param) = &pagination.param {
                            let first = pagination.first_page.unwrap_or(1);
                            pairs.append_pair(param, &page.as_u64().unwrap_or(first).to_string());
                        }
                    }
                    _ => {}
                }
            }
            if let Some((name, value)) = &authn.query {
                pairs.append_pair(name, value);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let json = match (request.method, self.bodies.get(&body_key(request))) {
            (Method::Post, Some(template)) if !follows_url => {
                let mut body = vars.render_json(template);
                if let (Some(field), Some(token), Some(object)) =
                    (&pagination.body_field, page.as_str(), body.as_object_mut())
                {
                    object.insert(field.clone(), Value::String(token.to_owned()));
                }
                Some(body)
            }
            _ => None,
        };
        let mut headers = Vec::new();
        if let Some((name, value)) = &authn.header {
            headers.push((name.clone(), value.clone()));
        }
        headers.push(("accept".into(), "application/json".into()));
        Ok(VendorRequest {
            method: match (request.method, follows_url) {
                (Method::Post, false) => reqwest::Method::POST,
                _ => reqwest::Method::GET,
            },
            url,
            headers,
            json,
            // A connection's own rate replaces the manifest's, per-endpoint ones included.
            endpoint_limit: request
                .requests_per_second
                .filter(|_| !self.own_rate)
                .map(|rps| (request.path.clone(), rps)),
        })
    }

    pub(super) fn bad(&self, reason: String) -> ConnectorError {
        ConnectorError::BadResponse {
            vendor: self.manifest.name.clone(),
            reason,
        }
    }

    /// Sends the request `build` makes with the connection's current credentials; on a
    /// 401 refreshes them once (OAuth) and sends it again. Every other answer goes back
    /// to the caller.
    pub(super) async fn send_authenticated(
        &self,
        cx: &SyncContext,
        build: impl Fn(&Authn) -> Result<VendorRequest, ConnectorError>,
    ) -> Result<crate::connectors::vendor_http::VendorResponse, ConnectorError> {
        let mut refreshed = false;
        loop {
            let authn = self.credentials.current(cx).await?;
            let built = build(&authn)?;
            let response = self.client.send(cx, &built).await?;
            if response.status == 401 {
                if refreshed {
                    return Err(ConnectorError::Unauthorized {
                        connection: cx.connection.clone(),
                        reason: "the vendor rejected a freshly refreshed token (401)".into(),
                    });
                }
                // Static credentials fail here; OAuth refreshes once and retries.
                self.credentials.rejected(cx, &authn).await?;
                refreshed = true;
                continue;
            }
            return Ok(response);
        }
    }

    /// Sends one request (refreshing credentials once on a 401) and parses its JSON.
    pub(super) async fn call(
        &self,
        cx: &SyncContext,
        request: &Request,
        page: &Value,
        vars: &Vars,
    ) -> Result<(Value, reqwest::header::HeaderMap), CallError> {
        let parse = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes);
        self.call_with(cx, request, page, vars, parse).await
    }

    /// [`Self::call`] with the body read by `parse`; a body `parse` finds is not JSON
    /// (a truncated transfer) is read again, up to [`PARSE_ATTEMPTS`] times.
    pub(super) async fn call_with<T>(
        &self,
        cx: &SyncContext,
        request: &Request,
        page: &Value,
        vars: &Vars,
        parse: impl Fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<(T, reqwest::header::HeaderMap), CallError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let response = self
                .send_authenticated(cx, |authn| self.build(request, page, vars, authn))
                .await?;
            if !(200..300).contains(&response.status) {
                let body = String::from_utf8_lossy(&response.body).into_owned();
                if self.refuse_optional(cx, response.status, &body) {
                    attempt -= 1;
                    continue;
                }
                return Err(CallError::Status(response.status, excerpt(&body)));
            }
            match parse(&response.body) {
                Ok(body) => return Ok((body, response.headers)),
                Err(error) if attempt < PARSE_ATTEMPTS => {
                    warn!(connection = %cx.connection, path = %request.path, %error, attempt, "vendor sent a page that is not JSON; reading it again");
                }
                Err(error) => {
                    return Err(CallError::Connector(self.bad(format!(
                        "{} answered with a body that is not JSON ({error}), {PARSE_ATTEMPTS} times",
                        request.path
                    ))));
                }
            }
        }
    }

    pub(super) fn records<'a>(
        &self,
        body: &'a Value,
        request: &Request,
    ) -> Result<Vec<&'a Value>, ConnectorError> {
        match lookup(body, &request.records) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items.iter().collect()),
            Some(object @ Value::Object(_)) if request.records.is_empty() => Ok(vec![object]),
            Some(_) => Err(self.bad(format!(
                "{}: {:?} is not an array of records",
                request.path, request.records
            ))),
        }
    }

    /// The records of a body, moved out of it.
    pub(super) fn take_records(
        &self,
        body: Value,
        request: &Request,
    ) -> Result<Vec<Value>, ConnectorError> {
        let mut body = body;
        match body.pointer_mut(&request.records) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(std::mem::take(items)),
            Some(object @ Value::Object(_)) if request.records.is_empty() => {
                Ok(vec![object.take()])
            }
            Some(_) => Err(self.bad(format!(
                "{}: {:?} is not an array of records",
                request.path, request.records
            ))),
        }
    }

    pub(super) fn next_page(
        &self,
        request: &Request,
        body: &Value,
        headers: &reqwest::header::HeaderMap,
        page: &Value,
        count: usize,
        page_size: u32,
    ) -> Option<Value> {
        let p = &request.pagination;
        let pointer_text = |ptr: &Option<String>| {
            ptr.as_deref()
                .and_then(|ptr| lookup(body, ptr))
                .and_then(text_of)
                .filter(|t| !t.is_empty())
        };
        let has_more = p
            .has_more
            .as_deref()
            .and_then(|ptr| lookup(body, ptr))
            .and_then(|v| {
                v.as_bool()
                    .or_else(|| text_of(v).and_then(|t| fields::parse_bool(&t)))
            });
        match p.kind {
            PaginationKind::None => None,
            PaginationKind::Cursor | PaginationKind::NextUrl => {
                pointer_text(&p.next).map(Value::String)
            }
            PaginationKind::Offset => {
                let more = has_more.unwrap_or(count as u32 >= page_size && count > 0);
                if !more {
                    return None;
                }
                let next = p
                    .next_offset
                    .as_deref()
                    .and_then(|ptr| lookup(body, ptr))
                    .and_then(|v| v.as_u64().or_else(|| text_of(v)?.parse().ok()))
                    .unwrap_or(page.as_u64().unwrap_or(0) + count as u64);
                Some(json!(next))
            }
            PaginationKind::Page => {
                let more = has_more.unwrap_or(count as u32 >= page_size && count > 0);
                more.then(|| json!(page.as_u64().unwrap_or(p.first_page.unwrap_or(1)) + 1))
            }
            PaginationKind::LinkHeader => headers
                .get_all("link")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(next_link)
                .map(Value::String),
        }
    }

    pub(super) async fn read_all(
        &self,
        cx: &SyncContext,
        request: &Request,
    ) -> Result<Vec<Value>, ConnectorError> {
        self.read_pages(cx, request)
            .await
            .map_err(|e| e.into_connector(&self.manifest.name, &request.path))
    }

    /// Every page of `request` (at most [`DISCOVERY_PAGES`]), as parsed bodies.
    pub(super) async fn read_pages(
        &self,
        cx: &SyncContext,
        request: &Request,
    ) -> Result<Vec<Value>, CallError> {
        let mut page = Value::Null;
        let mut bodies = Vec::new();
        let page_size = self.page_size_of(request);
        for _ in 0..DISCOVERY_PAGES {
            let mut vars = Vars::default();
            vars.set("page_size", json!(page_size));
            let (body, headers) = self.call(cx, request, &page, &vars).await?;
            let count = self.records(&body, request)?.len();
            let next = self.next_page(request, &body, &headers, &page, count, page_size);
            bodies.push(body);
            match next {
                Some(next) if next != page => page = next,
                _ => break,
            }
        }
        Ok(bodies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_link_is_read_from_a_link_header() {
        let header = r#"<https://x.example/a?page_info=abc&limit=2>; rel="previous", <https://x.example/a?page_info=def&limit=2>; rel="next""#;
        assert_eq!(
            next_link(header).as_deref(),
            Some("https://x.example/a?page_info=def&limit=2")
        );
        assert_eq!(next_link(r#"<https://x.example/a>; rel="last""#), None);
    }
}
