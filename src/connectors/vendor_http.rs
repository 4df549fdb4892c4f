//! The one outbound HTTP client for vendor APIs: rate limit, bounded concurrency,
//! request timeouts, retries with exponential backoff and full jitter, `Retry-After`,
//! and awareness of the vendor's daily budget. Every other outbound client (the
//! Shopify backfill, OAuth token requests) is built by [`client_builder`] and reads
//! its answers through [`receive`], so the first two invariants hold for them too.
//!
//! Invariants:
//! - A connection's credentials go only to the origin (scheme, host, port) they were
//!   sent to: a redirect is followed only within that origin (at most
//!   [`MAX_REDIRECTS`] hops), and a redirect anywhere else is not followed but ends the
//!   request with [`ConnectorError::Redirected`], naming the `Location`. It is not retried.
//! - A vendor answer is read in chunks up to the connection's `max_response_bytes`
//!   ([`DEFAULT_MAX_RESPONSE_BYTES`]); a `Content-Length` above it is refused before
//!   reading, and a body that grows past it is dropped at the first chunk beyond it,
//!   with [`ConnectorError::ResponseTooLarge`]. It is not retried.
//! - Every request waits for the connection's limiter (the vendor's documented rate,
//!   or the connection's `rate_limit`), then for a turn in the same rate as every
//!   replica on the store counts it (`handles::SharedRate`: the vendor sees one client),
//!   and holds one of `max_concurrency` permits.
//! - Retries are bounded (`MAX_ATTEMPTS`) and only for what may pass on its own: 429,
//!   5xx, timeouts, connection errors. Every other answer goes back to the caller.
//! - A vendor's rolling-window policy (`window_requests` per `window`) is kept exactly:
//!   each request reserves the earliest send time at which no rolling window holds more
//!   than the allowed count (plus a small slack for network jitter), so a sync uses the
//!   whole window without drawing 429s.
//! - A connection never spends more than its `budget_share` of the daily budget the
//!   vendor reports. When less than a quarter of that share is left it slows down,
//!   spacing requests so the rest lasts until the budget resets ([`pace`]); once the
//!   remaining budget reaches the reserve it stops with
//!   [`ConnectorError::BudgetExhausted`] until the reset. Both say so in logs and metrics.

use crate::connectors::manifest::schema::{BudgetReset, ResponseMatch};
use crate::connectors::{ConnectorError, SyncContext};
use crate::domain::ConnectionName;
use crate::retry::Backoff;
use crate::telemetry::{ConnectionLabels, StatusLabels};
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Attempts per request, the first included.
pub const MAX_ATTEMPTS: u32 = 6;
pub use crate::config::DEFAULT_MAX_RESPONSE_BYTES;
/// Redirects followed within the request's origin before the answer counts as a loop.
pub const MAX_REDIRECTS: usize = 5;
/// The longest `Retry-After` waited for inside one call; longer ones end the call.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(120);
/// Retries of a request: full jitter below 500 ms doubling up to 30 s (`crate::retry`).
const BACKOFF: Backoff = Backoff::full(Duration::from_millis(500), Duration::from_secs(30));

/// What the client may do, from the manifest and the connection's overrides.
#[derive(Debug, Clone)]
pub struct Limits {
    pub requests_per_second: Option<f64>,
    pub burst: u32,
    /// At most this many requests in any rolling window of this length.
    pub window: Option<(u32, Duration)>,
    pub max_concurrency: usize,
    pub timeout: Duration,
    /// The largest answer read, in bytes (the connection's `max_response_bytes`).
    pub max_response_bytes: u64,
    pub budget: BudgetRules,
}

/// How to read the vendor's budget from its answers.
#[derive(Debug, Clone, Default)]
pub struct BudgetRules {
    pub share: f64,
    pub remaining_header: Option<String>,
    pub limit_header: Option<String>,
    pub usage_header: Option<String>,
    pub usage_key: Option<String>,
    pub reset: BudgetReset,
    pub reset_header: Option<String>,
    pub exhausted: Vec<ResponseMatch>,
    pub retry_after_ms_header: Option<String>,
    pub default_retry_after: Duration,
}

/// One request, fully built (URL, headers, body); the client only sends it.
/// Debug shows the URL without its query and header names without values: both may
/// carry the connection's credentials.
#[derive(Clone)]
pub struct VendorRequest {
    pub method: reqwest::Method,
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    pub json: Option<serde_json::Value>,
    /// An endpoint with its own rate (HubSpot search), keyed by name.
    pub endpoint_limit: Option<(String, f64)>,
}

impl std::fmt::Debug for VendorRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("VendorRequest")
            .field("method", &self.method)
            .field("url", &without_query(&self.url))
            .field("query", &self.url.query().map(|_| "***"))
            .field("headers", &header_names)
            .field("json", &self.json.as_ref().map(|_| "…"))
            .field("endpoint_limit", &self.endpoint_limit)
            .finish()
    }
}

/// A vendor's answer.
#[derive(Debug)]
pub struct VendorResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

/// Starts every outbound client: redirects are followed only within the origin of the
/// request (so headers carrying credentials never reach another host), and the answer
/// to a redirect elsewhere comes back to the caller unread, for [`receive`] to refuse.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(same_origin_redirects())
        // A followed redirect would otherwise carry the previous URL, query-string
        // credentials included, in `Referer`.
        .referer(false)
        .user_agent(concat!("dealsync/", env!("CARGO_PKG_VERSION")))
}

fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        // `previous` starts with the URL the request was sent to.
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if same_origin && attempt.previous().len() <= MAX_REDIRECTS {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Why an answer was not accepted by [`receive`].
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// A redirect that was not followed: to another origin, or one hop too many.
    #[error("redirected to {location}")]
    Redirected {
        status: u16,
        location: String,
        cross_origin: bool,
    },
    /// The body is larger than the cap; `declared` when `Content-Length` said so.
    #[error("the answer is larger than {limit} bytes")]
    TooLarge {
        status: u16,
        limit: u64,
        declared: Option<u64>,
    },
    /// No (complete) answer: connection, timeout or transfer errors. Held without its
    /// URL, which may carry a query-string credential.
    #[error(transparent)]
    Http(reqwest::Error),
}

impl From<reqwest::Error> for ReceiveError {
    fn from(error: reqwest::Error) -> Self {
        ReceiveError::Http(error.without_url())
    }
}

impl ReceiveError {
    /// The connector error for this failure of a request to `url` by `connection`.
    /// Transfer errors are transient; the others are not, as a retry would meet them again.
    pub fn into_connector_error(
        self,
        vendor: &str,
        connection: &ConnectionName,
        url: &url::Url,
    ) -> ConnectorError {
        let path = url.path().to_owned();
        match self {
            ReceiveError::Redirected {
                location,
                cross_origin,
                ..
            } => ConnectorError::Redirected {
                vendor: vendor.to_owned(),
                path,
                location,
                cross_origin,
            },
            ReceiveError::TooLarge {
                limit, declared, ..
            } => ConnectorError::ResponseTooLarge {
                connection: connection.clone(),
                vendor: vendor.to_owned(),
                path,
                limit,
                declared,
            },
            // The URL may carry a query-string credential: never show it.
            ReceiveError::Http(error) => ConnectorError::Transient {
                vendor: vendor.to_owned(),
                reason: if error.is_timeout() {
                    format!("{path} timed out")
                } else if error.is_connect() {
                    format!("connecting for {path} failed")
                } else {
                    format!("{path} failed: {}", error.without_url())
                },
                retry_after: None,
            },
        }
    }
}

/// Reads an answer of a client made by [`client_builder`]: refuses a redirect it did
/// not follow, then reads the body in chunks, at most `limit` bytes of it.
pub async fn receive(
    mut response: reqwest::Response,
    limit: u64,
) -> Result<VendorResponse, ReceiveError> {
    let status = response.status().as_u16();
    if let Some(target) = unfollowed_redirect(&response) {
        let (location, cross_origin) = match target {
            Ok(location) => (
                describe_location(&location),
                location.origin() != response.url().origin(),
            ),
            Err(unreadable) => (unreadable, true),
        };
        return Err(ReceiveError::Redirected {
            status,
            location,
            cross_origin,
        });
    }
    if let Some(declared) = response.content_length()
        && declared > limit
    {
        return Err(ReceiveError::TooLarge {
            status,
            limit,
            declared: Some(declared),
        });
    }
    let headers = response.headers().clone();
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut read: u64 = 0;
    while let Some(chunk) = response.chunk().await? {
        read += chunk.len() as u64;
        if read > limit {
            // Dropping the response closes the connection: the rest is never read.
            return Err(ReceiveError::TooLarge {
                status,
                limit,
                declared: None,
            });
        }
        chunks.push(chunk);
    }
    // One chunk (the usual small page) is the body as it is; several are joined once.
    let body = match chunks.len() {
        0 => bytes::Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => chunks.concat().into(),
    };
    Ok(VendorResponse {
        status,
        headers,
        body,
    })
}

/// The target of a 3xx answer with a `Location` (the redirect policy stopped there),
/// or, when it is no URL, its text up to any query, for the message.
fn unfollowed_redirect(response: &reqwest::Response) -> Option<Result<url::Url, String>> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response.headers().get(reqwest::header::LOCATION)?;
    let text = String::from_utf8_lossy(location.as_bytes());
    Some(response.url().join(text.trim()).map_err(|_| {
        let before_query: String = text
            .split('?')
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        format!("{before_query:?} (not a URL)")
    }))
}

/// A redirect target for messages: scheme, host, port and path. The query and any user
/// info are left out, as a vendor may echo credentials there.
fn describe_location(location: &url::Url) -> String {
    let mut shown = without_query(location);
    if location.query().is_some() {
        shown.push_str("?…");
    }
    shown
}

fn without_query(url: &url::Url) -> String {
    format!("{}{}", url.origin().ascii_serialization(), url.path())
}

#[derive(Debug, Default)]
struct Budget {
    remaining: Option<u64>,
    limit: Option<u64>,
    /// When the vendor said the budget resets (from `budget_reset_header`).
    reset_at: Option<Instant>,
    paused_until: Option<DateTime<Utc>>,
    /// When the numbers above stop being true (the reset after they were read): past
    /// it they are forgotten, and the next answer says what the new budget is.
    valid_until: Option<DateTime<Utc>>,
    /// The spacing in force while the budget runs low, and the next free slot.
    pacing: Option<Duration>,
    next_paced: Option<Instant>,
}

/// Share of the connection's budget share below which requests are paced.
pub const LOW_BUDGET: f64 = 0.25;

/// What the vendor's remaining budget allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Plenty left.
    Free,
    /// Running low: one request per this interval makes the rest last until the reset.
    Slow(Duration),
    /// At the reserve left for the customer's other integrations: wait for the reset.
    Pause,
}

/// How to spend a budget with `remaining` of `limit` requests left, of which this
/// connection may use `share`, when it resets in `until_reset`.
///
/// The reserve is `⌈limit × (1 − share)⌉`; what is above it is spendable. While the
/// spendable part is at least [`LOW_BUDGET`] of `limit × share` nothing is slowed down;
/// below that, requests are spaced `until_reset ÷ spendable` apart, so the spacing grows
/// smoothly as the budget drains; at the reserve the connection pauses.
pub fn pace(remaining: u64, limit: u64, share: f64, until_reset: Duration) -> Pace {
    let reserve = (limit as f64 * (1.0 - share)).ceil() as u64;
    let spendable = remaining.saturating_sub(reserve);
    if spendable == 0 {
        return Pace::Pause;
    }
    if spendable as f64 >= limit as f64 * share * LOW_BUDGET {
        return Pace::Free;
    }
    Pace::Slow(until_reset.div_f64(spendable as f64))
}

/// At most `max` requests in any rolling `per`, as vendors count them (a log of the
/// last `max` send times; HubSpot's `TEN_SECONDLY_ROLLING`).
struct WindowLimiter {
    max: usize,
    per: Duration,
    /// Added to `per`: the vendor counts arrivals, which trail sends by a varying delay.
    slack: Duration,
    // A std mutex: held only to reserve a slot, never across `.await`.
    slots: Mutex<VecDeque<Instant>>,
}

impl WindowLimiter {
    fn new(max: u32, per: Duration) -> Self {
        WindowLimiter {
            max: max.max(1) as usize,
            per,
            slack: (per / 50).min(Duration::from_millis(250)),
            slots: Mutex::new(VecDeque::new()),
        }
    }

    /// Reserves the earliest send time at or after `now` that keeps every rolling
    /// window within `max`.
    fn reserve(&self, now: Instant) -> Instant {
        let mut slots = self
            .slots
            .lock()
            .expect("window limiter lock is never poisoned");
        let mut at = now;
        if slots.len() >= self.max
            && let Some(oldest) = slots.front()
        {
            at = at.max(*oldest + self.per + self.slack);
        }
        if let Some(last) = slots.back() {
            at = at.max(*last);
        }
        slots.push_back(at);
        while slots.len() > self.max {
            slots.pop_front();
        }
        at
    }
}

/// The outbound client of one connection.
pub struct VendorClient {
    vendor: String,
    http: reqwest::Client,
    limiter: Option<DefaultDirectRateLimiter>,
    window: Option<WindowLimiter>,
    // A std mutex: held only to look up or insert a limiter, never across `.await`.
    endpoint_limiters: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
    permits: Semaphore,
    limits: Limits,
    // A std mutex: tiny critical sections, never held across `.await`.
    budget: Mutex<Budget>,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    /// After the shared rate could not be read: until when requests go under this
    /// process's limiter alone (one warning per pause, not one per request).
    shared_rate_off_until: Mutex<Option<Instant>>,
}

/// How long requests skip the shared rate after the store could not answer for it.
const SHARED_RATE_PAUSE: Duration = Duration::from_secs(10);

fn limiter(per_second: f64, burst: u32) -> Option<DefaultDirectRateLimiter> {
    if !(per_second.is_finite() && per_second > 0.0) {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)?
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("burst is at least 1"));
    Some(RateLimiter::direct(quota))
}

impl VendorClient {
    pub fn new(vendor: &str, limits: Limits) -> Result<Self, String> {
        let http = client_builder()
            .timeout(limits.timeout)
            .connect_timeout(limits.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|error| format!("building the HTTP client: {error}"))?;
        Ok(VendorClient {
            vendor: vendor.to_owned(),
            http,
            limiter: limits
                .requests_per_second
                .and_then(|rps| limiter(rps, limits.burst)),
            window: limits.window.map(|(max, per)| WindowLimiter::new(max, per)),
            endpoint_limiters: Mutex::new(HashMap::new()),
            permits: Semaphore::new(limits.max_concurrency.max(1)),
            limits,
            budget: Mutex::new(Budget::default()),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            shared_rate_off_until: Mutex::new(None),
        })
    }

    /// Requests sent and 429s received since the last call (for run summaries).
    pub fn take_counts(&self) -> (u64, u64) {
        (
            self.requests.swap(0, Ordering::Relaxed),
            self.rate_limited.swap(0, Ordering::Relaxed),
        )
    }

    fn transient(&self, reason: String, retry_after: Option<Duration>) -> ConnectorError {
        ConnectorError::Transient {
            vendor: self.vendor.clone(),
            reason,
            retry_after,
        }
    }

    async fn wait_turn(&self, cx: &SyncContext, request: &VendorRequest) {
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
            self.wait_shared_turn(cx).await;
        }
        if let Some(window) = &self.window {
            let at = window.reserve(Instant::now());
            tokio::time::sleep_until(at.into()).await;
        }
        if let Some((name, rps)) = &request.endpoint_limit {
            let endpoint = {
                let mut limiters = self
                    .endpoint_limiters
                    .lock()
                    .expect("endpoint limiter lock is never poisoned");
                match limiters.get(name) {
                    Some(found) => Some(found.clone()),
                    None => limiter(*rps, 1).map(|created| {
                        let created = Arc::new(created);
                        limiters.insert(name.clone(), created.clone());
                        created
                    }),
                }
            };
            if let Some(endpoint) = endpoint {
                endpoint.until_ready().await;
            }
        }
    }

    /// After this process's limiter: the connection's rate as every replica sharing
    /// the store counts it (`SharedRate`; granted at once on SQLite). When the store
    /// cannot answer, requests go on under this process's limiter alone for
    /// [`SHARED_RATE_PAUSE`], logged once: the store being out of reach must not stop
    /// the pulls that do not need it, nor make each request wait for it.
    async fn wait_shared_turn(&self, cx: &SyncContext) {
        let (Some(handles), Some(per_second)) = (&cx.handles, self.limits.requests_per_second)
        else {
            return;
        };
        let paused = |now: Instant| {
            self.shared_rate_off_until
                .lock()
                .map(|until| until.is_some_and(|until| now < until))
                .unwrap_or(false)
        };
        if paused(Instant::now()) {
            return;
        }
        loop {
            match handles
                .rate
                .take_turn(cx.connection.as_str(), per_second, self.limits.burst)
                .await
            {
                Ok(None) => return,
                Ok(Some(wait)) => tokio::time::sleep(wait).await,
                Err(error) => {
                    if let Ok(mut until) = self.shared_rate_off_until.lock() {
                        *until = Some(Instant::now() + SHARED_RATE_PAUSE);
                    }
                    warn!(connection = %cx.connection, error = %crate::telemetry::error_chain(&error), pause_s = SHARED_RATE_PAUSE.as_secs(), "the shared request rate could not be read; going on under this process's own limit for a while");
                    return;
                }
            }
        }
    }

    /// Sends a request, retrying what may pass on its own. Returns every answer that
    /// is not retried (2xx and 4xx alike); the caller decides what a status means.
    pub async fn send(
        &self,
        cx: &SyncContext,
        request: &VendorRequest,
    ) -> Result<VendorResponse, ConnectorError> {
        let connection = cx.connection.as_str();
        let labels = ConnectionLabels {
            connection: connection.to_owned(),
        };
        let vendor_metrics = &cx.metrics.vendor;
        let max_attempts = cx
            .max_attempts
            .unwrap_or(MAX_ATTEMPTS)
            .clamp(1, MAX_ATTEMPTS);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.budget_gate(cx).await?;
            // The permit first: a request waits for its turn only when it can go at
            // once, so its send time is the one its rolling window reserved.
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| ConnectorError::Cancelled)?;
            tokio::select! {
                _ = cx.shutdown.cancelled() => return Err(ConnectorError::Cancelled),
                _ = self.wait_turn(cx, request) => {}
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut builder = self
                .http
                .request(request.method.clone(), request.url.clone());
            for (name, value) in &request.headers {
                builder = builder.header(name, value);
            }
            if let Some(json) = &request.json {
                builder = builder.json(json);
            }
            let outcome = tokio::select! {
                _ = cx.shutdown.cancelled() => return Err(ConnectorError::Cancelled),
                outcome = async {
                    let response = builder.send().await?;
                    receive(response, self.limits.max_response_bytes).await
                } => outcome,
            };
            let retry_in = match outcome {
                Err(
                    refused @ (ReceiveError::Redirected { status, .. }
                    | ReceiveError::TooLarge { status, .. }),
                ) => {
                    vendor_metrics
                        .requests
                        .get_or_create(&StatusLabels {
                            connection: connection.to_owned(),
                            status: status.to_string(),
                        })
                        .inc();
                    // Not retried: the same request would meet the same answer.
                    return Err(refused.into_connector_error(
                        &self.vendor,
                        &cx.connection,
                        &request.url,
                    ));
                }
                Err(ReceiveError::Http(error)) => {
                    vendor_metrics
                        .requests
                        .get_or_create(&StatusLabels {
                            connection: connection.to_owned(),
                            status: "error".into(),
                        })
                        .inc();
                    // The URL may carry a query-string credential: never log it.
                    let reason = failure_reason(&request.url, error);
                    if attempt >= max_attempts {
                        return Err(self.transient(reason, None));
                    }
                    let delay = BACKOFF.delay(attempt);
                    warn!(connection, attempt, retry_in_ms = delay.as_millis() as u64, %reason, "vendor request failed, retrying");
                    delay
                }
                Ok(response) => {
                    vendor_metrics
                        .requests
                        .get_or_create(&StatusLabels {
                            connection: connection.to_owned(),
                            status: response.status.to_string(),
                        })
                        .inc();
                    self.observe_budget(cx, &response.headers);
                    if let Some(resume_after) = self.exhausted(&response) {
                        return Err(self.pause(cx, resume_after));
                    }
                    let status = response.status;
                    if status == 429 {
                        self.rate_limited.fetch_add(1, Ordering::Relaxed);
                        vendor_metrics.rate_limited.get_or_create(&labels).inc();
                        let wait = self.retry_after(&response.headers);
                        if attempt >= max_attempts || wait > MAX_INLINE_WAIT {
                            return Err(self.transient(
                                format!("{} answered 429 Too Many Requests", request.url.path()),
                                Some(wait),
                            ));
                        }
                        warn!(
                            connection,
                            attempt,
                            retry_in_ms = wait.as_millis() as u64,
                            "vendor rate limit hit (429), waiting"
                        );
                        wait
                    } else if status >= 500 {
                        let hinted = retry_after_header(&response.headers);
                        if attempt >= max_attempts {
                            return Err(self.transient(
                                format!("{} answered {status}", request.url.path()),
                                hinted,
                            ));
                        }
                        let delay = BACKOFF.delay_honouring(attempt, hinted, MAX_INLINE_WAIT);
                        warn!(
                            connection,
                            attempt,
                            status,
                            retry_in_ms = delay.as_millis() as u64,
                            "vendor server error, retrying"
                        );
                        delay
                    } else {
                        return Ok(response);
                    }
                }
            };
            vendor_metrics.retries.get_or_create(&labels).inc();
            tokio::select! {
                _ = cx.shutdown.cancelled() => return Err(ConnectorError::Cancelled),
                _ = tokio::time::sleep(retry_in) => {}
            }
        }
    }

    /// How long to wait after a 429: `Retry-After`, the vendor's own header, else the default.
    fn retry_after(&self, headers: &HeaderMap) -> Duration {
        if let Some(wait) = retry_after_header(headers) {
            return wait;
        }
        if let Some(name) = &self.limits.budget.retry_after_ms_header
            && let Some(ms) = header_u64(headers, name)
        {
            return Duration::from_millis(ms);
        }
        self.limits.budget.default_retry_after
    }

    /// Whether this answer says the daily budget is spent; then how long until it resets.
    fn exhausted(&self, response: &VendorResponse) -> Option<Duration> {
        let matched = self.limits.budget.exhausted.iter().any(|rule| {
            rule.status == response.status
                && rule.body_contains.as_deref().is_none_or(|needle| {
                    std::str::from_utf8(&response.body).is_ok_and(|body| body.contains(needle))
                })
        });
        matched.then(|| self.reset_delay())
    }

    fn reset_delay(&self) -> Duration {
        let header = self
            .budget
            .lock()
            .ok()
            .and_then(|budget| budget.reset_at)
            .map(|at| at.saturating_duration_since(Instant::now()));
        match self.limits.budget.reset {
            BudgetReset::Header => header.unwrap_or(Duration::from_secs(3600)),
            BudgetReset::Rolling => Duration::from_secs(3600),
            BudgetReset::Midnight => {
                let now = Utc::now();
                let midnight = (now.date_naive() + chrono::Days::new(1))
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight exists")
                    .and_utc();
                (midnight - now).to_std().unwrap_or(Duration::from_secs(60))
            }
        }
    }

    fn pause(&self, cx: &SyncContext, resume_after: Duration) -> ConnectorError {
        self.pause_for(
            cx,
            resume_after,
            "vendor API budget share used up; pausing this connection until the budget resets",
        )
    }

    fn pause_for(&self, cx: &SyncContext, resume_after: Duration, why: &str) -> ConnectorError {
        // Never less than a second: a reset that is due now is checked by a request.
        let resume_after = resume_after.max(Duration::from_secs(1));
        let until = Utc::now()
            + chrono::Duration::from_std(resume_after).unwrap_or(chrono::Duration::hours(1));
        if let Ok(mut budget) = self.budget.lock() {
            budget.paused_until = Some(until);
        }
        cx.metrics
            .vendor
            .budget_pauses
            .get_or_create(&ConnectionLabels {
                connection: cx.connection.to_string(),
            })
            .inc();
        warn!(connection = %cx.connection, resume_at = %until.to_rfc3339(), "{why}");
        ConnectorError::BudgetExhausted {
            vendor: self.vendor.clone(),
            resume_after,
        }
    }

    /// Waits for the budget: refuses while paused, pauses at the reserve, and spaces
    /// requests while the budget runs low. A wait longer than [`MAX_INLINE_WAIT`] ends
    /// the run with [`ConnectorError::BudgetExhausted`] instead of holding it open.
    async fn budget_gate(&self, cx: &SyncContext) -> Result<(), ConnectorError> {
        let until_reset = self.reset_delay();
        let labels = ConnectionLabels {
            connection: cx.connection.to_string(),
        };
        let (paused, pace_now, entered, wait) = {
            let Ok(mut budget) = self.budget.lock() else {
                return Ok(());
            };
            if budget.valid_until.is_some_and(|until| until <= Utc::now()) {
                budget.remaining = None;
                budget.limit = None;
                budget.valid_until = None;
            }
            let paused = budget.paused_until.filter(|until| *until > Utc::now());
            let pace_now = match (budget.remaining, budget.limit) {
                (Some(remaining), Some(limit)) => {
                    pace(remaining, limit, self.limits.budget.share, until_reset)
                }
                _ => Pace::Free,
            };
            let mut entered = false;
            let mut wait = Duration::ZERO;
            match pace_now {
                Pace::Slow(interval) if paused.is_none() => {
                    entered = budget.pacing.is_none();
                    budget.pacing = Some(interval);
                    let now = Instant::now();
                    let at = budget.next_paced.map_or(now, |next| next.max(now));
                    wait = at - now;
                    if wait <= MAX_INLINE_WAIT {
                        budget.next_paced = Some(at + interval);
                    }
                }
                Pace::Free => {
                    budget.pacing = None;
                    budget.next_paced = None;
                }
                _ => {}
            }
            (paused, pace_now, entered, wait)
        };
        if let Some(until) = paused {
            return Err(ConnectorError::BudgetExhausted {
                vendor: self.vendor.clone(),
                resume_after: (until - Utc::now()).to_std().unwrap_or_default(),
            });
        }
        let spacing = match pace_now {
            Pace::Slow(interval) => interval.as_secs_f64(),
            _ => 0.0,
        };
        cx.metrics
            .vendor
            .budget_pace
            .get_or_create(&labels)
            .set(spacing);
        match pace_now {
            Pace::Free => Ok(()),
            Pace::Pause => Err(self.pause(cx, until_reset)),
            Pace::Slow(interval) => {
                if entered {
                    let remaining = self.budget.lock().ok().and_then(|b| b.remaining);
                    warn!(connection = %cx.connection, remaining, interval_ms = interval.as_millis() as u64,
                        reset_in_s = until_reset.as_secs(),
                        "vendor API budget running low; slowing down so this connection's share lasts until the reset");
                }
                if wait > MAX_INLINE_WAIT {
                    return Err(self.pause_for(
                        cx,
                        wait,
                        "vendor API budget running low; pausing this connection until its next paced request",
                    ));
                }
                tokio::select! {
                    _ = cx.shutdown.cancelled() => Err(ConnectorError::Cancelled),
                    _ = tokio::time::sleep(wait) => Ok(()),
                }
            }
        }
    }

    fn observe_budget(&self, cx: &SyncContext, headers: &HeaderMap) {
        let rules = &self.limits.budget;
        let mut remaining = rules
            .remaining_header
            .as_deref()
            .and_then(|name| header_u64(headers, name));
        let mut limit = rules
            .limit_header
            .as_deref()
            .and_then(|name| header_u64(headers, name));
        if let (Some(name), Some(key)) = (&rules.usage_header, &rules.usage_key)
            && let Some((used, total)) = headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|text| parse_usage(text, key))
        {
            remaining = Some(total.saturating_sub(used));
            limit = Some(total);
        }
        let reset_in = rules
            .reset_header
            .as_deref()
            .and_then(|name| header_u64(headers, name))
            .map(Duration::from_secs);
        let observed_at = Instant::now();
        if remaining.is_none() && limit.is_none() && reset_in.is_none() {
            return;
        }
        if let Some(left) = remaining {
            cx.metrics
                .vendor
                .budget_remaining
                .get_or_create(&ConnectionLabels {
                    connection: cx.connection.to_string(),
                })
                .set(left.min(i64::MAX as u64) as i64);
        }
        if let Ok(mut budget) = self.budget.lock() {
            if remaining.is_some() {
                budget.remaining = remaining;
            }
            let limit_known = rules.limit_header.is_some() || rules.usage_header.is_some();
            budget.limit = estimated_limit(budget.limit, limit, remaining, limit_known);
            if let Some(reset_in) = reset_in {
                budget.reset_at = Some(observed_at + reset_in);
            }
        }
        // Outside the lock: `reset_delay` takes it.
        let valid_for = self.reset_delay();
        if let Ok(mut budget) = self.budget.lock() {
            budget.valid_until =
                Some(Utc::now() + chrono::Duration::from_std(valid_for).unwrap_or_default());
            debug!(connection = %cx.connection, remaining = ?budget.remaining, limit = ?budget.limit, "vendor budget");
        }
    }
}

/// What went wrong with a request that got no answer, for an operator: the host and
/// port it went to and the cause from deep in the error chain (`Connection refused
/// (os error 111)`, a DNS or TLS failure), never the URL's query, which may carry a
/// credential.
pub fn failure_reason(url: &reqwest::Url, error: reqwest::Error) -> String {
    let host = url.host_str().unwrap_or("?");
    let port = url
        .port_or_known_default()
        .map_or_else(String::new, |port| format!(":{port}"));
    let path = url.path();
    let what = if error.is_timeout() {
        format!("request to {host}{port} for {path} timed out")
    } else if error.is_connect() {
        format!("connecting to {host}{port} for {path} failed")
    } else {
        format!("request to {host}{port} for {path} failed")
    };
    // reqwest and hyper wrap the cause in generic layers ("error sending request",
    // "client error (Connect)"); what an operator can act on is underneath.
    let error = error.without_url();
    let mut causes: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&error);
    while let Some(cause) = source {
        let line = cause.to_string();
        let generic = line.starts_with("client error (") || line == "error sending request";
        if !generic && !line.is_empty() && !causes.iter().any(|seen| seen.contains(&line)) {
            causes.push(line);
        }
        source = cause.source();
    }
    if causes.is_empty() {
        causes.push(error.to_string());
    }
    format!("{what}: {}", causes.join(": "))
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as u64)
}

/// The budget's size after an answer: the vendor's own figure when it sends one; for a
/// vendor that reports only what is left (Pipedrive's `x-daily-requests-left`), the
/// most it was seen to have left since the last reset stands in for it, so the share
/// is kept of at least that. `limit_known`: the rules name a limit header, so an
/// answer without it (HubSpot's search) leaves the known limit as it is.
fn estimated_limit(
    known: Option<u64>,
    sent: Option<u64>,
    remaining: Option<u64>,
    limit_known: bool,
) -> Option<u64> {
    match (sent, remaining) {
        (Some(limit), _) => Some(limit),
        (None, Some(left)) if !limit_known => Some(known.map_or(left, |seen| seen.max(left))),
        _ => known,
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = DateTime::parse_from_rfc2822(text).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

/// Reads `key=used/limit` from a header like `api-usage=18/5000; api-bursts=1/750`.
pub fn parse_usage(text: &str, key: &str) -> Option<(u64, u64)> {
    text.split([';', ','])
        .filter_map(|part| part.trim().split_once('='))
        .find(|(name, _)| name.trim() == key)
        .and_then(|(_, value)| {
            let (used, limit) = value.trim().split_once('/')?;
            Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vendor_that_reports_only_what_is_left_is_held_to_a_share_of_the_most_seen() {
        // Pipedrive: only `x-daily-requests-left`. The first answer sets the estimate,
        // spending lowers `remaining` but not the estimate, a reset raises it.
        let first = estimated_limit(None, None, Some(5_000), false);
        assert_eq!(first, Some(5_000));
        let later = estimated_limit(first, None, Some(4_200), false);
        assert_eq!(later, Some(5_000));
        assert_eq!(
            pace(4_200, 5_000, 0.8, Duration::from_secs(3600)),
            Pace::Free
        );
        assert_eq!(
            pace(1_000, 5_000, 0.8, Duration::from_secs(3600)),
            Pace::Pause,
            "the reserve of a fifth of the most seen is kept for other integrations"
        );
        assert_eq!(
            estimated_limit(later, None, Some(9_999), false),
            Some(9_999)
        );
        // With a limit header, the vendor's figure wins, and an answer without it
        // keeps the last one.
        assert_eq!(
            estimated_limit(Some(1_000), Some(2_000), Some(10), true),
            Some(2_000)
        );
        assert_eq!(
            estimated_limit(Some(1_000), None, Some(10), true),
            Some(1_000)
        );
        assert_eq!(estimated_limit(None, None, None, false), None);
    }

    #[test]
    fn a_low_budget_is_paced_to_last_until_the_reset_and_pauses_at_the_reserve() {
        let hour = Duration::from_secs(3600);
        // 1,000 a day, share 0.8: a reserve of 200, 800 for this connection, paced
        // below 200 spendable.
        assert_eq!(pace(1000, 1000, 0.8, hour), Pace::Free);
        assert_eq!(pace(400, 1000, 0.8, hour), Pace::Free);
        assert_eq!(
            pace(300, 1000, 0.8, hour),
            Pace::Slow(Duration::from_secs(36)),
            "100 spendable over an hour: one request every 36 s"
        );
        let Pace::Slow(sooner) = pace(350, 1000, 0.8, hour) else {
            panic!("paced")
        };
        let Pace::Slow(later) = pace(250, 1000, 0.8, hour) else {
            panic!("paced")
        };
        assert!(sooner < later, "the spacing grows as the budget drains");
        assert_eq!(pace(200, 1000, 0.8, hour), Pace::Pause);
        assert_eq!(pace(0, 1000, 0.8, hour), Pace::Pause);
        assert_eq!(
            pace(2, 10, 1.0, hour),
            Pace::Slow(Duration::from_secs(1800))
        );
    }

    #[test]
    fn the_window_limiter_never_lets_more_than_its_count_into_any_rolling_window() {
        let window = WindowLimiter::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let slots: Vec<Instant> = (0..10).map(|_| window.reserve(start)).collect();
        // Three at once, then three more one window (plus slack) later, and so on.
        assert_eq!(&slots[..3], &[start, start, start]);
        let next = start + Duration::from_secs(10) + window.slack;
        assert_eq!(&slots[3..6], &[next, next, next]);
        for (i, at) in slots.iter().enumerate().skip(3) {
            assert!(
                *at - slots[i - 3] >= Duration::from_secs(10),
                "slot {i} shares a window with three others"
            );
        }
        // A request long after the last reservations goes at once.
        let later = start + Duration::from_secs(60);
        assert_eq!(window.reserve(later), later);
    }

    #[test]
    fn salesforce_usage_headers_and_retry_after_are_read() {
        assert_eq!(
            parse_usage("api-usage=18/5000; api-bursts=1/750", "api-usage"),
            Some((18, 5000))
        );
        assert_eq!(
            parse_usage("per-app-api-usage=17/250(appName=x)", "api-usage"),
            None
        );
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_header(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn debug_of_a_request_shows_no_header_value_and_no_query() {
        let request = VendorRequest {
            method: reqwest::Method::GET,
            url: url::Url::parse("https://api.example.com/v1/deals?api_token=query-secret-1")
                .unwrap(),
            headers: vec![("x-api-token".into(), "header-secret-2".into())],
            json: None,
            endpoint_limit: None,
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("https://api.example.com/v1/deals") && shown.contains("x-api-token"),
            "{shown}"
        );
    }

    #[test]
    fn a_redirect_target_is_named_without_its_query_or_user_info() {
        let location =
            url::Url::parse("http://user:pw-secret@127.0.0.1:9999/steal?token=t-secret").unwrap();
        assert_eq!(
            describe_location(&location),
            "http://127.0.0.1:9999/steal?…"
        );
    }
}
