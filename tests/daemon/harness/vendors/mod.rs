//! Mock vendor APIs: small stateful axum servers on 127.0.0.1 that answer in the
//! shapes of the shared fixtures, with failure injection (status codes with headers,
//! slow answers, bodies that are not JSON, truncated bodies), queued one by one or on a
//! fixed schedule (every n-th request), and a log of what was asked.

pub mod hostile;
pub mod hubspot;
pub mod pipedrive;
pub mod salesforce;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fixture file's JSON.
pub fn fixture(path: &str) -> serde_json::Value {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// One injected failure, served instead of the real answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// A status with headers and a body.
    Status(u16, Vec<(&'static str, String)>, String),
    /// Wait this long before answering normally.
    Delay(Duration),
    /// Wait until the test opens the gate (`Semaphore::add_permits`), then answer
    /// normally: a response held for exactly as long as the test needs, on any machine.
    Gate(Arc<tokio::sync::Semaphore>),
    /// The request is served (the mock stores what it writes), then the answer is held
    /// this long: a client whose timeout is shorter sees a timeout after the vendor
    /// stored the record.
    Stall(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// The real answer cut to half its length, as a proxy that dropped the rest would
    /// pass it on (the `Content-Length` matches what is sent).
    Truncated,
}

/// Faults served on a fixed schedule, so a run fails the same way every time: on
/// paths starting with `prefix`, the n-th request (counting from 1) gets the fault of
/// the first `(every, fault)` whose `every` divides n, and passes when none does.
pub struct Schedule {
    prefix: String,
    rules: Vec<(u64, Fault)>,
    requests: u64,
}

/// Faults queued per path prefix, and every request seen.
#[derive(Default)]
pub struct Faults {
    queue: Mutex<VecDeque<(String, Fault)>>,
    /// (method, path and query) of every request, in order.
    pub seen: Mutex<Vec<String>>,
    /// A delay added to every answer on paths with this prefix.
    pub slow: Mutex<Option<(String, Duration)>>,
    schedule: Mutex<Option<Schedule>>,
    /// Every fault the schedule served, in order, as its `Debug` text.
    pub scheduled_served: Mutex<Vec<String>>,
}

impl Faults {
    /// Queues a fault for the next request whose path starts with `prefix`.
    pub fn push(&self, prefix: &str, fault: Fault) {
        self.queue
            .lock()
            .unwrap()
            .push_back((prefix.to_owned(), fault));
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests seen whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.seen()
            .iter()
            .filter(|line| {
                line.split_once(' ')
                    .is_some_and(|(_, p)| p.starts_with(prefix))
            })
            .count()
    }

    /// Serves faults on a fixed schedule from now on (see [`Schedule`]); queued faults
    /// still come first.
    pub fn every(&self, prefix: &str, rules: Vec<(u64, Fault)>) {
        *self.schedule.lock().unwrap() = Some(Schedule {
            prefix: prefix.to_owned(),
            rules,
            requests: 0,
        });
    }

    fn scheduled(&self, path: &str) -> Option<Fault> {
        let mut schedule = self.schedule.lock().unwrap();
        let schedule = schedule.as_mut().filter(|s| path.starts_with(&s.prefix))?;
        schedule.requests += 1;
        let n = schedule.requests;
        let (_, fault) = schedule.rules.iter().find(|(every, _)| n % every == 0)?;
        self.scheduled_served
            .lock()
            .unwrap()
            .push(format!("{fault:?}"));
        Some(fault.clone())
    }

    fn take(&self, path: &str) -> Option<Fault> {
        let mut queue = self.queue.lock().unwrap();
        let at = queue
            .iter()
            .position(|(prefix, _)| path.starts_with(prefix))?;
        queue.remove(at).map(|(_, fault)| fault)
    }
}

/// Middleware: logs the request, then serves a queued fault or passes it on.
pub async fn inject(State(faults): State<Arc<Faults>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    faults
        .seen
        .lock()
        .unwrap()
        .push(format!("{} {target}", request.method()));
    let slow = faults.slow.lock().unwrap().clone();
    if let Some((prefix, delay)) = slow
        && path.starts_with(&prefix)
    {
        tokio::time::sleep(delay).await;
    }
    let fault = faults.take(&path).or_else(|| faults.scheduled(&path));
    match fault {
        Some(Fault::Status(status, headers, body)) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_str(&value).unwrap());
            }
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            response
        }
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            next.run(request).await
        }
        Some(Fault::Gate(gate)) => {
            drop(gate.acquire().await.expect("the test never closes a gate"));
            next.run(request).await
        }
        Some(Fault::Stall(hold)) => {
            let response = next.run(request).await;
            tokio::time::sleep(hold).await;
            response
        }
        Some(Fault::Garbage) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from("{\"results\": [ {\"id\": \"trunc"))
            .unwrap(),
        Some(Fault::Truncated) => {
            let (mut parts, body) = next.run(request).await.into_parts();
            let whole = axum::body::to_bytes(body, usize::MAX)
                .await
                .expect("the mock's own answer is readable");
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(whole.slice(..whole.len() / 2)))
        }
        None => next.run(request).await,
    }
}

/// Serves `router` on a free 127.0.0.1 port until the returned handle is dropped.
pub async fn serve(router: axum::Router) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    MockServer { addr, task }
}

pub struct MockServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A shared fixture's JSON without its test metadata (keys starting with `_`).
pub fn wire_fixture(path: &str) -> serde_json::Value {
    let mut value = fixture(path);
    if let Some(object) = value.as_object_mut() {
        object.retain(|key, _| !key.starts_with('_'));
    }
    value
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

/// OAuth state shared by the mocks: the live access token, the refresh token, and
/// how refreshes go.
#[derive(Default)]
pub struct OAuthState {
    pub access: Mutex<String>,
    pub refresh: Mutex<String>,
    /// Refresh responses carry a new refresh token (rotation).
    pub rotate: bool,
    /// The refresh token was revoked: refreshes answer invalid_grant.
    pub revoked: std::sync::atomic::AtomicBool,
    /// Refreshes answered so far.
    pub refreshes: std::sync::atomic::AtomicU64,
    /// Each access token stops working after this many API requests (0: never).
    pub expire_after: std::sync::atomic::AtomicU64,
    pub used: std::sync::atomic::AtomicU64,
    /// The PKCE challenge of the authorization in progress (S256).
    pub challenge: Mutex<Option<String>>,
}

impl OAuthState {
    pub fn new(access: &str, refresh: &str, rotate: bool) -> Self {
        OAuthState {
            access: Mutex::new(access.to_owned()),
            refresh: Mutex::new(refresh.to_owned()),
            rotate,
            ..OAuthState::default()
        }
    }

    /// Whether a request's bearer token is the live one (and not used up).
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        use std::sync::atomic::Ordering;
        let live = self.access.lock().unwrap().clone();
        if bearer(headers).as_deref() != Some(live.as_str()) {
            return false;
        }
        let used = self.used.fetch_add(1, Ordering::SeqCst) + 1;
        let limit = self.expire_after.load(Ordering::SeqCst);
        if limit > 0 && used > limit {
            // The token expired: a new one is needed.
            *self.access.lock().unwrap() = format!("expired-{live}");
            return false;
        }
        true
    }

    /// Answers a `grant_type=authorization_code` form: the code must be `the-code` and
    /// the verifier must hash to the challenge of the authorize URL.
    pub fn code_response(&self, form: &std::collections::HashMap<String, String>) -> Response {
        use base64::Engine;
        use sha2::Digest;
        let verifier = form.get("code_verifier").cloned().unwrap_or_default();
        let hashed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        let expected = self.challenge.lock().unwrap().clone();
        if form.get("code").map(String::as_str) != Some("the-code")
            || expected.as_deref() != Some(hashed.as_str())
            || !form.contains_key("redirect_uri")
        {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "invalid_grant"})),
            )
                .into_response();
        }
        let access = "access-from-code".to_owned();
        *self.access.lock().unwrap() = access.clone();
        *self.refresh.lock().unwrap() = "refresh-from-code".into();
        axum::Json(serde_json::json!({"access_token": access, "refresh_token": "refresh-from-code", "token_type": "bearer", "expires_in": 1800})).into_response()
    }

    /// Answers a `grant_type=refresh_token` form; `extra` joins the JSON response.
    pub fn refresh_response(
        &self,
        form: &std::collections::HashMap<String, String>,
        extra: serde_json::Value,
    ) -> Response {
        use std::sync::atomic::Ordering;
        let current = self.refresh.lock().unwrap().clone();
        if self.revoked.load(Ordering::SeqCst)
            || form.get("grant_type").map(String::as_str) != Some("refresh_token")
            || form.get("refresh_token") != Some(&current)
        {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "invalid_grant", "error_description": "expired access/refresh token"})),
            )
                .into_response();
        }
        let n = self.refreshes.fetch_add(1, Ordering::SeqCst) + 1;
        let access = format!("access-{n}");
        *self.access.lock().unwrap() = access.clone();
        self.used.store(0, Ordering::SeqCst);
        let mut body =
            serde_json::json!({"access_token": access, "token_type": "bearer", "expires_in": 1800});
        if self.rotate {
            let rotated = format!("refresh-{n}");
            *self.refresh.lock().unwrap() = rotated.clone();
            body["refresh_token"] = serde_json::json!(rotated);
        }
        if let (Some(target), Some(source)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in source {
                target.insert(k.clone(), v.clone());
            }
        }
        axum::Json(body).into_response()
    }
}
