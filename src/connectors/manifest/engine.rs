//! The manifest engine: a [`Connector`] that interprets a [`Manifest`].
//!
//! A sync is a sequence of phases, each a paged read: `full` (first run and
//! `--full`), then `incremental` runs sorted by modification time, and `deletes`
//! (archived or deleted records) when the manifest has them. The cursor says which
//! phase, which page, and the high-water mark (modification time, ids) seen so far.
//!
//! Invariants:
//! - The cursor returned with a page is only committed with that page's records, so
//!   the high-water mark never gets ahead of what is stored.
//! - The next incremental read starts at `min(high-water mark, run start) − lookback`:
//!   records with equal timestamps at a boundary, records changed while the run read,
//!   and records a search index had not caught up with are read again, never skipped.
//!   Re-reading is harmless: the store's upsert makes it a no-op.
//! - A query that may not page past `max_results` (HubSpot search: 10,000) restarts at
//!   the last modification time seen (`{since}` = high-water mark, `{since_id}` = last
//!   id there) before it reaches the cap; records at that instant already read are
//!   skipped by id.
//! - One record that does not map is quarantined; the page goes on.

use super::auth::{Authn, Credentials};
use super::fields::{self, Scope, lookup, text_of};
use super::records::{Plan, SplitError, SplitPage, split_page};
use super::schema::{
    Enrich, EventAction, FieldSpec, FieldType, Manifest, Method, PaginationKind, Request,
    SchemeName, StageFields,
};
use super::template::Vars;
use crate::config::ConnectionConfig;
use crate::connectors::{
    BadRecord, Connector, ConnectorError, Page, SyncContext, WebhookAction, WebhookEvent,
};
use crate::domain::{
    Currency, DealStatus, EmailAddress, Money, PipelineKey, RawRecord, SourceDeal, StageKey,
    StageRef,
};
use crate::pipeline::{MappingSource, NativePipeline, NativeStage, StageKind, StageMapEntry};
use crate::store::CachedRecord;
use crate::vendor_http::{BudgetRules, Limits, VendorClient, VendorRequest};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Default overlap of incremental reads.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(300);
/// Attempts at a page whose body is not JSON (a truncated transfer) before the run fails.
const PARSE_ATTEMPTS: u32 = 3;
/// Pages read for pipeline discovery at most.
const DISCOVERY_PAGES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Full,
    Incremental,
    Deletes,
    /// The last run finished; the next one starts an incremental read.
    Idle,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Full => "full",
            Phase::Incremental => "incremental",
            Phase::Deletes => "deletes",
            Phase::Idle => "idle",
        }
    }
}

/// Where an incremental read starts (inclusive).
///
/// A record modified at `t` is in the vendor's results by `t + lookback`: the
/// lookback covers the vendor's index lag. The previous read ran to the end, so it
/// returned every record modified up to its start less the lookback (its "horizon").
/// Records after the horizon may have been missed (not indexed yet, or changed while
/// it ran, in the watermark's own second too) and are read again: the read starts at
/// the watermark, or at the horizon when that is earlier. When the watermark's whole
/// second lies before the horizon, no record can still arrive with the watermark's
/// time, so the read starts a millisecond past it and the records there, all read,
/// are not asked for again.
///
/// Without the previous start (a cursor from an older version), the whole lookback
/// before the watermark is read again.
fn since(
    watermark: DateTime<Utc>,
    read_started: Option<DateTime<Utc>>,
    lookback: chrono::Duration,
) -> DateTime<Utc> {
    let Some(started) = read_started else {
        return watermark - lookback;
    };
    let horizon = started - lookback;
    if watermark + chrono::Duration::seconds(1) <= horizon {
        watermark + chrono::Duration::milliseconds(1)
    } else {
        watermark.min(horizon)
    }
}

/// The cursor, as committed with each page.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CursorState {
    v: u32,
    phase: Phase,
    /// Where the current query continues: null (first page), a cursor or URL, a number.
    #[serde(default)]
    page: Value,
    /// Lower bound of the current incremental query.
    #[serde(default)]
    since: Option<DateTime<Utc>>,
    #[serde(default)]
    since_id: String,
    /// Results consumed by the current query (for `max_results`).
    #[serde(default)]
    seen: u64,
    /// Highest modification time committed in this run, and the ids at it.
    #[serde(default)]
    hw: Option<DateTime<Utc>>,
    #[serde(default)]
    hw_ids: Vec<String>,
    /// Records at `since` already read before a re-window (skipped when seen again).
    #[serde(default)]
    skip_ids: Vec<String>,
    #[serde(default)]
    run_started: Option<DateTime<Utc>>,
    /// Where the next incremental read starts, before the lookback.
    #[serde(default)]
    watermark: Option<DateTime<Utc>>,
    /// When the last finished read (full or incremental) began: what the vendor had
    /// modified a lookback before then, it could already return.
    #[serde(default)]
    read_started: Option<DateTime<Utc>>,
    #[serde(default)]
    deletes_at: Option<DateTime<Utc>>,
    /// The manifest's field mapping and enrichments the reads were made with (see
    /// [`mapping_shape`]): when it changes, the next run reads everything again, so
    /// stored deals get the fields a new manifest adds (owner emails, consent).
    #[serde(default)]
    shape: Option<String>,
}

impl CursorState {
    fn start(phase: Phase, now: DateTime<Utc>) -> Self {
        CursorState {
            v: 1,
            phase,
            page: Value::Null,
            since: None,
            since_id: String::new(),
            seen: 0,
            hw: None,
            hw_ids: Vec::new(),
            skip_ids: Vec::new(),
            run_started: Some(now),
            watermark: None,
            read_started: None,
            deletes_at: None,
            shape: None,
        }
    }
}

/// A digest (FNV-1a, hex) of what a manifest maps a record to: its fields and its
/// enrichments. Stable across builds for the same manifest text.
fn mapping_shape(manifest: &Manifest) -> String {
    let text = format!("{:?}\n{:?}", manifest.deals.fields, manifest.deals.enrich);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A connector described by a manifest.
pub struct ManifestConnector {
    manifest: Arc<Manifest>,
    configured_base: Option<url::Url>,
    manifest_base: url::Url,
    credentials: Credentials,
    client: VendorClient,
    page_size: u32,
    lookback: Duration,
    default_currency: Currency,
    deletes_every: Option<Duration>,
    /// Request bodies converted from TOML once.
    bodies: HashMap<String, Value>,
    /// The connection sets its own request rate.
    own_rate: bool,
    /// The record values the field mapping reads; list pages parse only these.
    plan: Plan,
    /// Enrichment records requested lately (see [`Recent`]).
    recent: std::sync::Mutex<Recent>,
    /// The id paths of the enrichments that look ids up from the record alone, whose
    /// keys go into a record's fingerprint (see [`Self::fingerprint`]).
    record_keys: Vec<Vec<String>>,
    /// [`mapping_shape`] of the manifest.
    shape: String,
    /// Per `deals.optional` entry: the vendor refused it, so `{optional}` leaves it out.
    optional_refused: std::sync::Mutex<Vec<bool>>,
}

/// Enrichment records kept in memory, at most this many.
const RECENT_RECORDS: usize = 4_096;

/// The enrichment records this connector requested lately, by (enrichment, id), with
/// when: the pages the sync reads ahead of the store have not committed theirs yet, so
/// the store alone would miss them and the same record would be requested again by
/// each page read before that commit. The oldest go first past [`RECENT_RECORDS`];
/// a record missing here is only requested again.
#[derive(Default)]
struct Recent {
    records: HashMap<(String, String), (DateTime<Utc>, Value)>,
    order: std::collections::VecDeque<(String, String)>,
    /// The `list` enrichments read since the run began: read at most once per run.
    listed: HashSet<String>,
}

impl ManifestConnector {
    fn forget_recent(&self) {
        if let Ok(mut recent) = self.recent.lock() {
            *recent = Recent::default();
        }
    }

    /// Whether the `list` enrichment `name` is still to be read in this run; from now
    /// on it is not.
    fn start_listing(&self, name: &str) -> bool {
        self.recent
            .lock()
            .map(|mut recent| recent.listed.insert(name.to_owned()))
            .unwrap_or(true)
    }
}

impl Recent {
    fn get(&self, step: &str, id: &str, fresh_since: DateTime<Utc>) -> Option<&Value> {
        // The key is built to look up; a page has at most a few hundred ids.
        self.records
            .get(&(step.to_owned(), id.to_owned()))
            .filter(|(at, _)| *at >= fresh_since)
            .map(|(_, record)| record)
    }

    fn put(&mut self, step: &str, id: &str, at: DateTime<Utc>, record: Value) {
        let key = (step.to_owned(), id.to_owned());
        if self.records.insert(key.clone(), (at, record)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > RECENT_RECORDS {
            if let Some(oldest) = self.order.pop_front() {
                self.records.remove(&oldest);
            }
        }
    }
}

fn body_key(request: &Request) -> String {
    format!("{:?} {}", request.method, request.path)
}

fn collect_bodies(manifest: &Manifest) -> HashMap<String, Value> {
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

/// The JSON pointers into a record that mapping a page's records reads: every field,
/// the modification time, and the ids enrichments look up. Every field of [`Fields`]
/// is named (no `..`), so a new field cannot be left out of the plan.
///
/// [`Fields`]: super::schema::Fields
fn record_plan(manifest: &Manifest) -> Plan {
    let super::schema::Fields {
        external_id,
        title,
        amount,
        currency,
        native_pipeline,
        native_stage,
        contact_email,
        contact_name,
        owner,
        owner_email,
        created_at,
        updated_at,
        stage_changed_at,
        expected_close,
        deleted,
        status,
        marketing_consent,
    } = &manifest.deals.fields;
    let specs = [
        Some(external_id),
        Some(native_stage),
        Some(&manifest.deals.modified),
    ]
    .into_iter()
    .chain(
        [
            title,
            amount,
            currency,
            native_pipeline,
            contact_email,
            contact_name,
            owner,
            owner_email,
            created_at,
            updated_at,
            stage_changed_at,
            expected_close,
            deleted,
            status,
            marketing_consent,
        ]
        .into_iter()
        .map(Option::as_ref),
    )
    .flatten();
    let mut pointers: Vec<&str> = Vec::new();
    for spec in specs {
        match spec {
            FieldSpec::Path(path) => pointers.push(path),
            FieldSpec::Full(table) => {
                pointers.extend(table.path.as_deref());
                pointers.extend(table.paths.iter().map(String::as_str));
            }
        }
    }
    for step in &manifest.deals.enrich {
        pointers.extend(step.ids.iter().map(String::as_str));
    }
    // Enrichment paths (`@name/…`) are not in the record; `Plan` leaves them out.
    Plan::new(pointers)
}

fn setting_duration(
    connection: &ConnectionConfig,
    key: &str,
) -> Result<Option<Duration>, (String, String)> {
    match connection.settings.get(key) {
        None => Ok(None),
        Some(value) => {
            let text = value.as_str().ok_or_else(|| {
                (
                    format!("settings.{key}"),
                    "expected a duration like \"30s\"".to_owned(),
                )
            })?;
            crate::config::duration::parse(text)
                .map(Some)
                .map_err(|message| (format!("settings.{key}"), message))
        }
    }
}

impl ManifestConnector {
    /// Builds the connector of one connection; errors are (key under the connection, message).
    pub fn new(
        manifest: Arc<Manifest>,
        connection: &ConnectionConfig,
    ) -> Result<Self, (String, String)> {
        for key in connection.settings.keys() {
            if !matches!(
                key.as_str(),
                "request_timeout" | "default_currency" | "deletes_every"
            ) {
                return Err((
                    format!("settings.{key}"),
                    "unknown setting (known: request_timeout, default_currency, deletes_every)"
                        .to_owned(),
                ));
            }
        }
        let manifest_base = url::Url::parse(&manifest.base_url)
            .map_err(|e| ("connector".to_owned(), format!("manifest base_url: {e}")))?;
        let base_for_auth = connection
            .base_url
            .clone()
            .unwrap_or_else(|| manifest_base.clone());
        let credentials = Credentials::new(&manifest, connection, &base_for_auth)?;
        let timeout = setting_duration(connection, "request_timeout")?
            .or(manifest.timeout.map(|d| d.0))
            .unwrap_or(Duration::from_secs(30));
        let currency_text = connection
            .settings
            .get("default_currency")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .or_else(|| manifest.default_currency.clone())
            .unwrap_or_else(|| "USD".to_owned());
        let default_currency = Currency::parse(&currency_text)
            .map_err(|e| ("settings.default_currency".to_owned(), e.to_string()))?;
        let deletes_every = setting_duration(connection, "deletes_every")?.or_else(|| {
            manifest
                .deals
                .deletes
                .as_ref()
                .and_then(|d| d.every.map(|e| e.0))
        });
        let rate = &manifest.rate_limit;
        let overrides = &connection.rate_limit;
        // A connection that sets its own rate (per second or per window) replaces the
        // manifest's rates, per-endpoint ones included.
        let own_rate = overrides.requests_per_second.is_some() || overrides.window.is_some();
        let manifest_window = rate.window_requests.zip(rate.window.as_ref().map(|w| w.0));
        let limits = Limits {
            requests_per_second: if own_rate {
                overrides.requests_per_second
            } else {
                rate.requests_per_second
            },
            window: if own_rate {
                overrides.window
            } else {
                manifest_window
            },
            burst: overrides.burst.or(rate.burst).unwrap_or(1),
            max_concurrency: overrides
                .max_concurrency
                .or(rate.max_concurrency)
                .unwrap_or(4) as usize,
            timeout,
            max_response_bytes: connection.max_response_bytes,
            budget: BudgetRules {
                share: overrides.budget_share.or(rate.budget_share).unwrap_or(0.8),
                remaining_header: rate.budget_remaining_header.clone(),
                limit_header: rate.budget_limit_header.clone(),
                usage_header: rate.budget_usage_header.clone(),
                usage_key: rate.budget_usage_key.clone(),
                reset: rate.budget_reset,
                reset_header: rate.budget_reset_header.clone(),
                exhausted: rate.budget_exhausted.clone(),
                retry_after_ms_header: rate.retry_after_ms_header.clone(),
                default_retry_after: rate
                    .default_retry_after
                    .map_or(Duration::from_secs(10), |d| d.0),
            },
        };
        let client =
            VendorClient::new(&manifest.name, limits).map_err(|m| ("connector".to_owned(), m))?;
        let max_page = manifest.deals.max_page_size.unwrap_or(u32::MAX);
        let page_size = connection
            .page_size
            .or(manifest.deals.page_size)
            .unwrap_or(100)
            .clamp(1, max_page);
        let record_keys = manifest
            .deals
            .enrich
            .iter()
            .filter(|step| !step.ids.iter().any(|path| path.starts_with('@')))
            .map(|step| step.ids.clone())
            .collect();
        Ok(ManifestConnector {
            own_rate,
            record_keys,
            shape: mapping_shape(&manifest),
            optional_refused: std::sync::Mutex::new(vec![false; manifest.deals.optional.len()]),
            plan: record_plan(&manifest),
            recent: std::sync::Mutex::new(Recent::default()),
            bodies: collect_bodies(&manifest),
            lookback: connection
                .lookback
                .or(manifest.lookback.map(|d| d.0))
                .unwrap_or(DEFAULT_LOOKBACK),
            configured_base: connection.base_url.clone(),
            manifest_base,
            credentials,
            client,
            page_size,
            default_currency,
            deletes_every,
            manifest,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The record values the field mapping reads (what a list read keeps of a record).
    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    fn base(&self, authn: &Authn) -> Result<url::Url, ConnectorError> {
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

    fn page_size_of(&self, request: &Request) -> u32 {
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

    fn bad(&self, reason: String) -> ConnectorError {
        ConnectorError::BadResponse {
            vendor: self.manifest.name.clone(),
            reason,
        }
    }

    /// Sends one request (refreshing credentials once on a 401) and parses its JSON.
    async fn call(
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
    async fn call_with<T>(
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
            let mut refreshed = false;
            let response = loop {
                let authn = self.credentials.current(cx).await?;
                let built = self.build(request, page, vars, &authn)?;
                let response = self.client.send(cx, &built).await?;
                if response.status == 401 {
                    if refreshed {
                        return Err(CallError::Connector(ConnectorError::Unauthorized {
                            connection: cx.connection.clone(),
                            reason: "the vendor rejected a freshly refreshed token (401)".into(),
                        }));
                    }
                    // Static credentials fail here; OAuth refreshes once and retries.
                    self.credentials.rejected(cx, &authn).await?;
                    refreshed = true;
                    continue;
                }
                break response;
            };
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

    fn records<'a>(
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
    fn take_records(&self, body: Value, request: &Request) -> Result<Vec<Value>, ConnectorError> {
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

    /// Runs the enrichments for a page's records. With `cache` (a page read, whose
    /// page commits what goes in it), enrichments that keep their records take the
    /// fresh ones from the store instead of requesting them, and put what they
    /// request into `cache`.
    async fn enrich(
        &self,
        cx: &SyncContext,
        read: &str,
        records: &[&Value],
        mut cache: Option<EnrichCache<'_>>,
    ) -> Result<Vec<HashMap<String, Value>>, ConnectorError> {
        let mut per_record: Vec<HashMap<String, Value>> = vec![HashMap::new(); records.len()];
        for step in &self.manifest.deals.enrich {
            if !step.only.is_empty() && !step.only.iter().any(|only| only == read) {
                continue;
            }
            self.enrich_step(cx, step, records, &mut per_record, cache.as_mut())
                .await?;
        }
        Ok(per_record)
    }

    /// The records of `step` kept in the store for `ids` that are still fresh.
    async fn cached(
        &self,
        cx: &SyncContext,
        step: &Enrich,
        ids: &[String],
        fresh_since: DateTime<Utc>,
    ) -> HashMap<String, Value> {
        let Some(store) = &cx.store else {
            return HashMap::new();
        };
        let rows = match store
            .cached_enrichments(
                cx.connection.as_str(),
                &step.name,
                ids.to_vec(),
                fresh_since,
            )
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                // Only a cost: every id is requested from the vendor.
                warn!(connection = %cx.connection, enrichment = %step.name, %error, "reading kept enrichment records failed; requesting them all");
                return HashMap::new();
            }
        };
        rows.into_iter()
            .filter_map(|(id, text)| Some((id, serde_json::from_str(&text).ok()?)))
            .collect()
    }

    async fn enrich_step(
        &self,
        cx: &SyncContext,
        step: &Enrich,
        records: &[&Value],
        per_record: &mut [HashMap<String, Value>],
        mut cache: Option<&mut EnrichCache<'_>>,
    ) -> Result<(), ConnectorError> {
        let keys: Vec<Option<String>> = records
            .iter()
            .zip(per_record.iter())
            .map(|(record, enriched)| {
                let scope = Scope::new(record, enriched);
                step.ids
                    .iter()
                    .find_map(|path| scope.get(path).and_then(text_of))
            })
            .collect();
        let mut unique = Vec::new();
        let mut seen = HashSet::new();
        for key in keys.iter().flatten() {
            if seen.insert(key.as_str()) {
                unique.push(key.clone());
            }
        }
        let keep = step.cache.is_some() && cache.is_some();
        let mut found: HashMap<String, Value> = HashMap::new();
        // A `list` enrichment takes kept records in a single-record read too (a webhook's
        // refetch): reading the whole list for each one would cost far more.
        let run_started = cache.as_deref().map(|cache| cache.run_started);
        let lookup_kept = cache.is_some() || step.list;
        if let (Some(ttl), true) = (step.cache, lookup_kept) {
            // A full read takes only what this run read already, so it reads every
            // record once; other reads take what is younger than the manifest's `cache`.
            let fresh_since = match run_started.flatten() {
                Some(started) => started,
                None => Utc::now() - chrono::Duration::from_std(ttl.0).unwrap_or_default(),
            };
            // A std mutex: a short section without an await.
            if let Ok(recent) = self.recent.lock() {
                for id in &unique {
                    if let Some(record) = recent.get(&step.name, id, fresh_since) {
                        found.insert(id.clone(), record.clone());
                    }
                }
            }
            unique.retain(|id| !found.contains_key(id));
            if !unique.is_empty() {
                let stored = self.cached(cx, step, &unique, fresh_since).await;
                unique.retain(|id| !stored.contains_key(id));
                found.extend(stored);
            }
        }
        if step.list {
            if unique.is_empty() || !self.start_listing(&step.name) {
                // Everything was at hand, or the list was read in this run already: an
                // id it did not hold (a deactivated owner) is not asked for again.
                unique.clear();
            } else {
                let wanted: HashSet<&str> = unique.iter().map(String::as_str).collect();
                let now = Utc::now();
                let bodies = match self.read_pages(cx, &step.request).await {
                    Ok(bodies) => bodies,
                    // A token without the scope for this list (HubSpot's
                    // crm.objects.owners.read, Pipedrive's users:read) reads deals on
                    // without these fields rather than failing every run.
                    Err(CallError::Status(403, excerpt)) => {
                        warn!(connection = %cx.connection, enrichment = %step.name, path = %step.request.path, %excerpt,
                            "the vendor refused to list these records (403): the fields read from them stay empty; grant the token the scope to read them");
                        Vec::new()
                    }
                    Err(error) => {
                        return Err(error.into_connector(&self.manifest.name, &step.request.path));
                    }
                };
                for body in bodies {
                    for item in self.take_records(body, &step.request)? {
                        let Some(id) = lookup(&item, &step.id).and_then(text_of) else {
                            continue;
                        };
                        // Every listed record is kept, not only the ones this page
                        // needs: the next pages and runs find theirs without a request.
                        if keep && let Some(cache) = cache.as_deref_mut() {
                            cache.kept.push(CachedRecord {
                                step: step.name.clone(),
                                id: id.clone(),
                                record: RawRecord::from_value(&item),
                            });
                        }
                        if let Ok(mut recent) = self.recent.lock() {
                            recent.put(&step.name, &id, now, item.clone());
                        }
                        if wanted.contains(id.as_str()) {
                            found.insert(id, item);
                        }
                    }
                }
                unique.clear();
            }
        }
        for chunk in unique.chunks(step.batch.unwrap_or(100).max(1)) {
            let mut vars = Vars::default();
            vars.set("ids", json!(chunk.join(",")))
                .set("ids_json", json!(chunk))
                .set(
                    "ids_objects",
                    Value::Array(chunk.iter().map(|id| json!({ "id": id })).collect()),
                )
                .set("page_size", json!(chunk.len()));
            let (body, _) = self
                .call(cx, &step.request, &Value::Null, &vars)
                .await
                .map_err(|e| e.into_connector(&self.manifest.name, &step.request.path))?;
            for item in self.take_records(body, &step.request)? {
                if let Some(id) = lookup(&item, &step.id).and_then(text_of) {
                    if keep && let Some(cache) = cache.as_deref_mut() {
                        cache.kept.push(CachedRecord {
                            step: step.name.clone(),
                            id: id.clone(),
                            record: RawRecord::from_value(&item),
                        });
                        if let Ok(mut recent) = self.recent.lock() {
                            recent.put(&step.name, &id, Utc::now(), item.clone());
                        }
                    }
                    found.insert(id, item);
                }
            }
        }
        if step.active.is_some() {
            found.retain(|_, record| bool_at(record, &step.active) != Some(false));
        }
        for (slot, key) in per_record.iter_mut().zip(keys) {
            if let Some(value) = key.and_then(|key| found.get(&key)) {
                slot.insert(step.name.clone(), value.clone());
            }
        }
        Ok(())
    }

    /// Maps one source record to a deal, or explains why it cannot.
    pub fn to_deal(
        &self,
        record: &Value,
        enriched: &HashMap<String, Value>,
        force_deleted: bool,
    ) -> Result<SourceDeal, BadRecord> {
        let raw = || RawRecord::from_value(record);
        let mut deal = self
            .map_fields(record, enriched, force_deleted)
            .map_err(|bad| bad.with_raw(raw()))?;
        deal.raw = raw();
        Ok(deal)
    }

    /// The canonical fields of a record (`raw` left empty; the caller sets it, on a
    /// [`BadRecord`] too).
    pub(crate) fn map_fields(
        &self,
        record: &Value,
        enriched: &HashMap<String, Value>,
        force_deleted: bool,
    ) -> Result<SourceDeal, BadRecord> {
        let spec = &self.manifest.deals.fields;
        let scope = Scope::new(record, enriched);
        let external_id = fields::string(&spec.external_id, &scope).ok().flatten();
        let bad = |reason: String| BadRecord {
            external_id: external_id.clone(),
            reason,
            raw: RawRecord::null(),
        };
        if !record.is_object() {
            return Err(bad("the record is not a JSON object".into()));
        }
        let Some(id) = external_id.clone() else {
            return Err(bad("the record has no id".into()));
        };
        let text = |field: &Option<FieldSpec>| -> Result<Option<String>, BadRecord> {
            field
                .as_ref()
                .map(|f| fields::string(f, &scope))
                .transpose()
                .map(Option::flatten)
                .map_err(bad)
        };
        let time = |field: &Option<FieldSpec>| -> Result<Option<DateTime<Utc>>, BadRecord> {
            field
                .as_ref()
                .map(|f| fields::timestamp(f, &scope))
                .transpose()
                .map(Option::flatten)
                .map_err(bad)
        };
        let mut deal = SourceDeal::new(
            id,
            text(&spec.title)?.unwrap_or_default(),
            text(&spec.native_pipeline)?.unwrap_or_default(),
            fields::string(&spec.native_stage, &scope)
                .map_err(bad)?
                .unwrap_or_default(),
        );
        let currency = match text(&spec.currency)? {
            Some(code) => Currency::parse(&code).map_err(|e| bad(e.to_string()))?,
            None => self.default_currency,
        };
        if let Some(amount) = text(&spec.amount)? {
            let minor_units = matches!(
                &spec.amount,
                Some(FieldSpec::Full(table)) if table.kind == FieldType::MinorUnits
            );
            deal.amount = Some(if minor_units {
                fields::parse_minor_units(&amount)
                    .map(|minor| Money::new(minor, currency))
                    .ok_or_else(|| {
                        bad(format!(
                            "amount: {amount:?} is not a whole number of minor units"
                        ))
                    })?
            } else {
                Money::parse_decimal(&amount, currency).map_err(|e| bad(format!("amount: {e}")))?
            });
        }
        deal.contact_email = text(&spec.contact_email)?.and_then(|e| EmailAddress::parse(&e));
        deal.contact_name = text(&spec.contact_name)?;
        deal.owner = text(&spec.owner)?;
        deal.owner_email = text(&spec.owner_email)?.and_then(|e| EmailAddress::parse(&e));
        deal.created_at = time(&spec.created_at)?;
        deal.updated_at =
            time(&spec.updated_at)?.or(fields::timestamp(&self.manifest.deals.modified, &scope)
                .ok()
                .flatten());
        deal.stage_changed_at = time(&spec.stage_changed_at)?;
        deal.expected_close = spec
            .expected_close
            .as_ref()
            .map(|f| fields::date(f, &scope))
            .transpose()
            .map(Option::flatten)
            .map_err(bad)?;
        let deleted = spec
            .deleted
            .as_ref()
            .map(|f| fields::boolean(f, &scope))
            .transpose()
            .map(Option::flatten)
            .map_err(bad)?
            .unwrap_or(false);
        deal.source_status = text(&spec.status)?.and_then(|s| DealStatus::parse(&s));
        deal.marketing_consent = spec
            .marketing_consent
            .as_ref()
            .and_then(|f| fields::consent(f, &scope));
        deal.deleted = force_deleted || deleted || deal.source_status == Some(DealStatus::Deleted);
        Ok(deal)
    }

    /// A record read from a list page: `record` is its parse (pruned to the plan),
    /// `raw` its text as the vendor sent it. With `fingerprint`, maps it without
    /// enrichments first, for its fingerprint, and for the deal itself when it turns
    /// out to have none.
    fn read_record(
        &self,
        raw: RawRecord,
        record: Result<Value, serde_json::Error>,
        force_deleted: bool,
        fingerprint: bool,
    ) -> ReadRecord {
        let base = record
            .as_ref()
            .ok()
            .filter(|_| fingerprint)
            .map(|record| self.map_fields(record, &HashMap::new(), force_deleted));
        let fingerprint = match (&base, &record) {
            (Some(Ok(deal)), Ok(record)) => Some(self.fingerprint(deal, record)),
            _ => None,
        };
        ReadRecord {
            raw,
            record,
            base,
            fingerprint,
        }
    }

    /// The deal for a read record and its enrichments, or why there is none.
    fn finish_record(
        &self,
        read: ReadRecord,
        enriched: &HashMap<String, Value>,
        force_deleted: bool,
    ) -> Result<SourceDeal, BadRecord> {
        let ReadRecord {
            raw,
            record,
            base,
            fingerprint,
        } = read;
        let mapped = match (record, base) {
            (Err(error), _) => {
                return Err(BadRecord {
                    external_id: None,
                    reason: format!("the record cannot be read: {error}"),
                    raw,
                });
            }
            (Ok(_), Some(base)) if enriched.is_empty() => base,
            (Ok(record), _) => self.map_fields(&record, enriched, force_deleted),
        };
        match mapped {
            Ok(mut deal) => {
                deal.raw = raw;
                deal.fingerprint = fingerprint;
                Ok(deal)
            }
            Err(bad) => Err(bad.with_raw(raw)),
        }
    }

    /// The [`store::fingerprint`](crate::store::fingerprint) of a record: `deal` is
    /// its mapping without enrichments; the keys are the ids it gives the enrichments
    /// that look up ids from the record alone (one reached through another
    /// enrichment, like HubSpot's contact through the association read, depends on the
    /// vendor's state, which moves the record's modification time when it changes).
    fn fingerprint(&self, deal: &SourceDeal, record: &Value) -> i64 {
        let no_enrichment = HashMap::new();
        let scope = Scope::new(record, &no_enrichment);
        let keys: Vec<Option<String>> = self
            .record_keys
            .iter()
            .map(|paths| {
                paths
                    .iter()
                    .find_map(|path| scope.get(path).and_then(text_of))
            })
            .collect();
        let keys: Vec<Option<&str>> = keys.iter().map(Option::as_deref).collect();
        crate::store::fingerprint(deal, &keys)
    }

    /// Which of `reads` the store holds unchanged (see [`Store::unchanged_records`]),
    /// as (external id, fingerprint). A store that cannot answer costs only requests.
    ///
    /// [`Store::unchanged_records`]: crate::store::Store::unchanged_records
    async fn unchanged(&self, cx: &SyncContext, reads: &[ReadRecord]) -> HashSet<(String, i64)> {
        let Some(store) = &cx.store else {
            return HashSet::new();
        };
        let candidates: Vec<(String, i64)> = reads.iter().filter_map(ReadRecord::key).collect();
        if candidates.is_empty() {
            return HashSet::new();
        }
        match store
            .unchanged_records(cx.connection.as_str(), candidates)
            .await
        {
            Ok(unchanged) => unchanged,
            Err(error) => {
                warn!(connection = %cx.connection, %error, "reading stored fingerprints failed; reading every record in full");
                HashSet::new()
            }
        }
    }

    pub(crate) fn modified_of(
        &self,
        record: &Value,
        enriched: &HashMap<String, Value>,
    ) -> Option<DateTime<Utc>> {
        fields::timestamp(&self.manifest.deals.modified, &Scope::new(record, enriched))
            .ok()
            .flatten()
    }

    fn next_page(
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

    /// This read's start less the lookback: what the next read starts from at the
    /// latest.
    fn horizon(&self, state: &CursorState, now: DateTime<Utc>) -> DateTime<Utc> {
        state.run_started.unwrap_or(now)
            - chrono::Duration::from_std(self.lookback).unwrap_or_default()
    }

    fn vars_for(&self, state: &CursorState, page_size: u32) -> Vars {
        let mut vars = Vars::default();
        vars.set("page_size", json!(page_size));
        let since = state.since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        vars.set(
            "since",
            json!(since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        )
        .set(
            "since_s",
            json!(since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        )
        .set("since_ms", json!(since.timestamp_millis().to_string()))
        .set("since_id", json!(state.since_id));
        vars
    }

    fn request_for(&self, phase: Phase) -> &Request {
        match phase {
            Phase::Incremental => self
                .manifest
                .deals
                .incremental
                .as_ref()
                .unwrap_or(&self.manifest.deals.full),
            Phase::Deletes => self
                .manifest
                .deals
                .deletes
                .as_ref()
                .map_or(&self.manifest.deals.full, |d| &d.request),
            Phase::Full | Phase::Idle => &self.manifest.deals.full,
        }
    }

    /// Where the run goes after its current phase read its last page.
    fn finish_phase(&self, state: &mut CursorState, now: DateTime<Utc>) -> bool {
        let started = state.run_started.unwrap_or(now);
        match state.phase {
            Phase::Full | Phase::Incremental => {
                state.watermark = match (state.hw, state.phase) {
                    (Some(hw), _) => Some(hw.min(started)).max(
                        state
                            .watermark
                            .filter(|_| state.phase == Phase::Incremental),
                    ),
                    (None, Phase::Full) => Some(started),
                    (None, _) => state.watermark,
                };
                state.read_started = Some(started);
                let deletes_due = self.manifest.deals.deletes.is_some()
                    && state.deletes_at.is_none_or(|at| {
                        self.deletes_every.is_none_or(|every| {
                            now - at >= chrono::Duration::from_std(every).unwrap_or_default()
                        })
                    });
                if deletes_due {
                    state.phase = Phase::Deletes;
                    state.page = Value::Null;
                    false
                } else {
                    state.phase = Phase::Idle;
                    true
                }
            }
            Phase::Deletes => {
                state.deletes_at = Some(started);
                state.phase = Phase::Idle;
                true
            }
            Phase::Idle => true,
        }
    }

    fn parse_pipelines(&self, body_pages: &[Value]) -> Vec<NativePipeline> {
        let Some(spec) = &self.manifest.pipelines else {
            return Vec::new();
        };
        let mut pipelines = Vec::new();
        for body in body_pages {
            let Ok(records) = self.records(body, &spec.request) else {
                continue;
            };
            for record in records {
                let hidden = spec
                    .hidden
                    .as_deref()
                    .and_then(|p| lookup(record, p))
                    .and_then(|v| {
                        v.as_bool()
                            .or_else(|| text_of(v).and_then(|t| fields::parse_bool(&t)))
                    })
                    .unwrap_or(false);
                let (Some(id), Some(label)) = (
                    lookup(record, &spec.id).and_then(text_of),
                    lookup(record, &spec.label).and_then(text_of),
                ) else {
                    continue;
                };
                if hidden {
                    continue;
                }
                let mut stages = Vec::new();
                if let (Some(pointer), Some(fields)) = (&spec.stages, &spec.stage)
                    && let Some(Value::Array(items)) = lookup(record, pointer)
                {
                    stages.extend(items.iter().filter_map(|item| native_stage(item, fields)));
                }
                pipelines.push(NativePipeline { id, label, stages });
            }
        }
        pipelines
    }

    async fn read_all(
        &self,
        cx: &SyncContext,
        request: &Request,
    ) -> Result<Vec<Value>, ConnectorError> {
        self.read_pages(cx, request)
            .await
            .map_err(|e| e.into_connector(&self.manifest.name, &request.path))
    }

    /// Every page of `request` (at most [`DISCOVERY_PAGES`]), as parsed bodies.
    async fn read_pages(
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

fn bool_at(record: &Value, pointer: &Option<String>) -> Option<bool> {
    pointer
        .as_deref()
        .and_then(|p| lookup(record, p))
        .and_then(|v| {
            v.as_bool()
                .or_else(|| text_of(v).and_then(|t| fields::parse_bool(&t)))
        })
}

fn number_at(record: &Value, pointer: &Option<String>) -> Option<f64> {
    pointer
        .as_deref()
        .and_then(|p| lookup(record, p))
        .and_then(|v| v.as_f64().or_else(|| text_of(v)?.trim().parse().ok()))
}

fn native_stage(record: &Value, spec: &StageFields) -> Option<NativeStage> {
    if bool_at(record, &spec.hidden) == Some(true) || bool_at(record, &spec.active) == Some(false) {
        return None;
    }
    let id = lookup(record, &spec.id).and_then(text_of)?;
    let label = record
        .pointer(&spec.label)
        .and_then(text_of)
        .unwrap_or_else(|| id.clone());
    let probability = number_at(record, &spec.probability).map(|p| {
        (p * spec.probability_scale.unwrap_or(1.0))
            .round()
            .clamp(0.0, 100.0) as u8
    });
    let closed = bool_at(record, &spec.closed);
    let won = bool_at(record, &spec.won);
    let kind = match (closed, won) {
        (_, Some(true)) => Some(StageKind::Won),
        (Some(true), Some(false)) => Some(StageKind::Lost),
        (Some(true), None) => match probability {
            Some(100) => Some(StageKind::Won),
            Some(0) => Some(StageKind::Lost),
            _ => None,
        },
        (Some(false), _) => Some(StageKind::Open),
        (None, _) => None,
    };
    let rot_enabled = bool_at(record, &spec.rot_enabled).unwrap_or(true);
    let rot_after = number_at(record, &spec.rot_days)
        .filter(|days| rot_enabled && *days > 0.0)
        .map(|days| Duration::from_secs_f64(days * 86_400.0));
    Some(NativeStage {
        id,
        label,
        order: number_at(record, &spec.order).map_or(0, |o| o as i64),
        probability,
        kind,
        rot_after,
    })
}

/// A page body split at `pointer` (see [`split_page`]): `Err` for a body that is not
/// JSON (read again), `Ok(None)` when the value there is not a list of records.
fn split_records(body: &[u8], pointer: &str) -> Result<Option<SplitPage>, serde_json::Error> {
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

/// One record of a list page on its way to a deal.
struct ReadRecord {
    /// The record's text as the vendor sent it.
    raw: RawRecord,
    /// Its parse, pruned to the plan.
    record: Result<Value, serde_json::Error>,
    /// Its mapping without enrichments (`None` when it cannot be parsed).
    base: Option<Result<SourceDeal, BadRecord>>,
    fingerprint: Option<i64>,
}

impl ReadRecord {
    /// (external id, fingerprint), when the record maps without its enrichments.
    fn key(&self) -> Option<(String, i64)> {
        match (&self.base, self.fingerprint) {
            (Some(Ok(deal)), Some(fingerprint)) => {
                Some((deal.external_id.as_str().to_owned(), fingerprint))
            }
            _ => None,
        }
    }
}

/// How a page read uses the enrichments' kept records (`cache` in the manifest).
struct EnrichCache<'a> {
    /// A full read's start: it takes only records read since. `None`: take what is
    /// younger than the enrichment's `cache` duration.
    run_started: Option<DateTime<Utc>>,
    /// Records requested for this page, to keep; committed with the page.
    kept: &'a mut Vec<CachedRecord>,
}

/// A call's failure: an HTTP status the caller may interpret, or a connector error.
enum CallError {
    Status(u16, String),
    Connector(ConnectorError),
}

impl From<ConnectorError> for CallError {
    fn from(error: ConnectorError) -> Self {
        CallError::Connector(error)
    }
}

impl CallError {
    fn into_connector(self, vendor: &str, path: &str) -> ConnectorError {
        match self {
            CallError::Connector(error) => error,
            CallError::Status(status, excerpt) => ConnectorError::BadResponse {
                vendor: vendor.to_owned(),
                reason: format!("{path} answered {status}: {excerpt}"),
            },
        }
    }
}

#[async_trait]
impl Connector for ManifestConnector {
    fn kind(&self) -> &str {
        &self.manifest.name
    }

    fn default_pipeline(&self) -> Option<&str> {
        self.manifest.default_pipeline.as_deref()
    }

    fn gives_owner_email(&self) -> bool {
        self.manifest.deals.fields.owner_email.is_some()
    }

    fn reads_one(&self) -> bool {
        self.manifest.deals.one.is_some()
    }

    fn default_mappings(&self) -> Vec<StageMapEntry> {
        let mut entries = Vec::new();
        for (native_pipeline, stages) in &self.manifest.default_mappings {
            for (native_stage, target) in stages {
                let (pipeline, stage) = match target.split_once('.') {
                    Some((p, s)) => (Some(p.to_owned()), s),
                    None => (self.manifest.default_pipeline.clone(), target.as_str()),
                };
                entries.push(StageMapEntry {
                    native_pipeline: native_pipeline.clone(),
                    native_stage: native_stage.clone(),
                    target: StageRef {
                        pipeline: pipeline.map(PipelineKey::new),
                        stage: StageKey::new(stage),
                    },
                    source: MappingSource::Manifest,
                });
            }
        }
        entries
    }

    async fn probe(&self, cx: &SyncContext) -> Result<String, ConnectorError> {
        if self.manifest.pipelines.is_none() && self.manifest.stages.is_none() {
            // Nothing to discover: the first page of a full read is the cheap read.
            let page = self.fetch_page(cx, None).await?;
            return Ok(format!("read {} record(s)", page.records.len()));
        }
        let pipelines = self.discover_pipelines(cx).await?;
        let stages: usize = pipelines.iter().map(|p| p.stages.len()).sum();
        Ok(format!(
            "{} native pipeline(s), {stages} stage(s)",
            pipelines.len()
        ))
    }

    async fn discover_pipelines(
        &self,
        cx: &SyncContext,
    ) -> Result<Vec<NativePipeline>, ConnectorError> {
        let mut pipelines = match &self.manifest.pipelines {
            Some(spec) => {
                let bodies = self.read_all(cx, &spec.request).await?;
                self.parse_pipelines(&bodies)
            }
            None => Vec::new(),
        };
        if let Some(spec) = &self.manifest.stages {
            let bodies = self.read_all(cx, &spec.request).await?;
            for body in &bodies {
                for record in self.records(body, &spec.request)? {
                    let Some(stage) = native_stage(record, &spec.fields) else {
                        continue;
                    };
                    let (pipeline_id, pipeline_label) =
                        match (&spec.pipeline, &spec.single_pipeline) {
                            (Some(pointer), _) => match lookup(record, pointer).and_then(text_of) {
                                Some(id) => (id.clone(), id),
                                None => continue,
                            },
                            (None, Some([id, label])) => (id.clone(), label.clone()),
                            (None, None) => ("default".to_owned(), "Default".to_owned()),
                        };
                    match pipelines.iter_mut().find(|p| p.id == pipeline_id) {
                        Some(pipeline) => pipeline.stages.push(stage),
                        None if self.manifest.pipelines.is_none() => {
                            pipelines.push(NativePipeline {
                                id: pipeline_id,
                                label: pipeline_label,
                                stages: vec![stage],
                            })
                        }
                        // A stage of a pipeline that is deleted or hidden.
                        None => {}
                    }
                }
            }
        }
        for pipeline in &mut pipelines {
            pipeline
                .stages
                .sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.label.cmp(&b.label)));
        }
        Ok(pipelines)
    }

    async fn fetch_page(
        &self,
        cx: &SyncContext,
        cursor: Option<&Value>,
    ) -> Result<Page, ConnectorError> {
        let now = Utc::now();
        if cursor.is_none_or(|value| value.get("phase") == Some(&json!("idle"))) {
            // A run begins: what earlier runs requested is in the store by now, and
            // is taken from there by the same freshness rule.
            self.forget_recent();
        }
        let mut state = match cursor {
            None => CursorState::start(Phase::Full, now),
            Some(value) => match serde_json::from_value::<CursorState>(value.clone()) {
                Ok(state) => state,
                Err(error) => {
                    warn!(connection = %cx.connection, %error, "stored cursor is unreadable; starting a full read");
                    CursorState::start(Phase::Full, now)
                }
            },
        };
        if state.phase == Phase::Idle {
            let watermark = state.watermark;
            let read_started = state.read_started;
            let deletes_at = state.deletes_at;
            let same_mapping = state.shape.as_deref() == Some(self.shape.as_str());
            if !same_mapping && watermark.is_some() {
                info!(connection = %cx.connection, "the connector's manifest maps records differently since the last read (an upgrade or an edited manifest); reading every record again");
            }
            let phase =
                if self.manifest.deals.incremental.is_some() && watermark.is_some() && same_mapping
                {
                    Phase::Incremental
                } else {
                    Phase::Full
                };
            let shape = state.shape.take();
            state = CursorState::start(phase, now);
            state.shape = shape;
            state.watermark = watermark;
            state.read_started = read_started;
            state.deletes_at = deletes_at;
            if phase == Phase::Incremental {
                let lookback = chrono::Duration::from_std(self.lookback).unwrap_or_default();
                state.since = watermark.map(|w| since(w, read_started, lookback));
            }
            debug!(connection = %cx.connection, phase = phase.name(), since = ?state.since, "starting a read");
        }
        if state.phase == Phase::Full {
            state.shape = Some(self.shape.clone());
        }
        let request = self.request_for(state.phase).clone();
        let page_size = self.page_size_of(&request);
        // What the enrichments and the mapping need to know of the read, taken before a
        // finished phase moves the cursor on.
        let phase = state.phase;
        let run_started = state.run_started;
        // With `gather`, vendor pages are read until that many records are in hand, so a
        // batch enrichment that takes more ids than a page holds runs once for several
        // pages (HubSpot: one association read per five search pages). They commit
        // together, with the cursor after the last of them.
        let gather = request.gather.map_or(0, |records| records as usize);
        let mut skip: HashSet<String> = state.skip_ids.iter().cloned().collect();
        let mut since = state.since;
        let no_enrichment = HashMap::new();
        let force_deleted = phase == Phase::Deletes;
        // Only an incremental read meets records it stored before (its lookback
        // overlap), so only it maps them for a fingerprint first.
        let fingerprints = phase == Phase::Incremental;
        let mut reads: Vec<ReadRecord> = Vec::new();
        let mut unchanged = 0u64;
        let done = loop {
            let vars = self.vars_for(&state, page_size);
            // The records are split out of the body as the vendor's text; each is parsed
            // only as far as the mapping reads it (see `records`).
            let split = |bytes: &[u8]| split_records(bytes, &request.records);
            let answer = self
                .call_with(cx, &request, &state.page, &vars, split)
                .await;
            let (split, headers) = match answer {
                Ok(answer) => answer,
                // A continuation the vendor no longer honours (an expired query locator):
                // restart the query at the last modification time read.
                Err(CallError::Status(status, excerpt))
                    if (400..500).contains(&status)
                        && status != 429
                        && !state.page.is_null()
                        && state.phase == Phase::Incremental
                        && state.hw.is_some() =>
                {
                    warn!(connection = %cx.connection, status, %excerpt, "the vendor refused the next-page token; restarting the query at the last modification time read");
                    self.rewindow(&mut state);
                    break false;
                }
                Err(error) => return Err(error.into_connector(&self.manifest.name, &request.path)),
            };
            let Some(SplitPage {
                body,
                records: page_records,
            }) = split
            else {
                return Err(self.bad(format!(
                    "{}: {:?} is not an array of records",
                    request.path, request.records
                )));
            };
            let count = page_records.len();
            let mut page_reads = Vec::with_capacity(count);
            for raw in page_records {
                let record = self.plan.prune(raw.as_str());
                if let Ok(record) = &record {
                    // The cursor's fields come from the record itself (the manifest's
                    // check refuses an enrichment there), so the restart bookkeeping is
                    // done page by page, before the next page is asked for.
                    let scope = Scope::new(record, &no_enrichment);
                    let modified = self.modified_of(record, &no_enrichment);
                    let id = fields::string(&self.manifest.deals.fields.external_id, &scope)
                        .ok()
                        .flatten();
                    if let (Some(at), Some(id)) = (modified, id.as_deref())
                        && Some(at) == since
                        && skip.contains(id)
                    {
                        continue;
                    }
                    if phase != Phase::Deletes
                        && let Some(at) = modified
                    {
                        match state.hw {
                            Some(current) if at < current => {}
                            Some(current) if at == current => state.hw_ids.extend(id),
                            _ => {
                                state.hw = Some(at);
                                state.hw_ids = id.into_iter().collect();
                            }
                        }
                    }
                }
                page_reads.push(self.read_record(raw, record, force_deleted, fingerprints));
            }
            if fingerprints {
                // Records the store holds as the vendor sent them again need neither
                // their enrichments requested nor a write; they do not count toward
                // `gather` either.
                let same = self.unchanged(cx, &page_reads).await;
                if !same.is_empty() {
                    let before = page_reads.len();
                    page_reads.retain(|read| !read.key().is_some_and(|key| same.contains(&key)));
                    unchanged += (before - page_reads.len()) as u64;
                }
            }
            reads.append(&mut page_reads);
            state.seen += count as u64;
            let next = self.next_page(&request, &body, &headers, &state.page, count, page_size);
            match next {
                Some(next) if next != state.page => {
                    let capped = request
                        .max_results
                        .is_some_and(|max| state.seen + u64::from(page_size) > max);
                    if capped && state.phase == Phase::Incremental {
                        if state.hw.is_none()
                            || state.hw == state.since && !state.skip_ids.is_empty()
                        {
                            return Err(self.bad(format!(
                                "more than {} records share the modification time {:?}; the query cannot be paged",
                                request.max_results.unwrap_or_default(),
                                state.hw
                            )));
                        }
                        info!(connection = %cx.connection, seen = state.seen, "search result cap near; restarting the query at the last modification time read");
                        self.rewindow(&mut state);
                        break false;
                    }
                    if request.keyset
                        && state.phase == Phase::Incremental
                        && state.hw.is_some_and(|hw| {
                            Some(hw) > state.since && hw <= self.horizon(&state, now)
                        })
                    {
                        // The next page is a new query from the high-water mark, so a
                        // record modified meanwhile, which moves to the end of the
                        // order, shifts nothing. Only needed while the read is older
                        // than this read's horizon: a record the shift would skip past
                        // it is read again by the next read anyway (see `since`).
                        // Within one instant larger than a page (the high-water mark
                        // still at `since`) the continuation goes on.
                        self.rewindow(&mut state);
                        skip = state.skip_ids.iter().cloned().collect();
                        since = state.since;
                    } else {
                        state.page = next;
                    }
                    if reads.len() + page_size as usize > gather {
                        break false;
                    }
                }
                _ => break self.finish_phase(&mut state, now),
            }
        };
        let unreadable = Value::Null;
        let records: Vec<&Value> = reads
            .iter()
            .map(|read| read.record.as_ref().unwrap_or(&unreadable))
            .collect();
        let mut kept = Vec::new();
        let cache = EnrichCache {
            run_started: run_started.filter(|_| phase == Phase::Full),
            kept: &mut kept,
        };
        let enriched = self.enrich(cx, phase.name(), &records, Some(cache)).await?;
        drop(records);
        let out = reads
            .into_iter()
            .zip(&enriched)
            .map(|(read, extra)| self.finish_record(read, extra, force_deleted))
            .collect();
        let (requests, rate_limited) = self.client.take_counts();
        Ok(Page {
            records: out,
            next: serde_json::to_value(&state).expect("cursor serializes"),
            done,
            requests,
            rate_limited,
            unchanged,
            cache: kept,
        })
    }

    fn webhook_scheme(&self) -> Option<crate::webhooks::signature::Scheme> {
        use crate::webhooks::signature::Scheme;
        let tolerance = Duration::from_secs(300);
        Some(match self.manifest.webhooks.as_ref()?.scheme {
            SchemeName::HubSpotV3 => Scheme::HubSpotV3 { tolerance },
            SchemeName::HubSpotV1V2 => Scheme::HubSpotV1V2,
            SchemeName::PipedriveBasic => Scheme::PipedriveBasic,
            SchemeName::Shopify => Scheme::Shopify,
            SchemeName::WooCommerce => Scheme::WooCommerce,
            SchemeName::Stripe => Scheme::Stripe { tolerance },
            SchemeName::StandardWebhooks => Scheme::StandardWebhooks { tolerance },
            SchemeName::None => Scheme::None,
        })
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        let bad = |reason: String, raw: Value| BadRecord {
            external_id: None,
            reason,
            raw: RawRecord::from_value(&raw),
        };
        let Some(spec) = &self.manifest.webhooks else {
            return Ok(Vec::new());
        };
        let body: Value = serde_json::from_slice(&event.body).map_err(|e| {
            bad(
                format!("webhook body is not JSON: {e}"),
                Value::String(String::from_utf8_lossy(&event.body).into_owned()),
            )
        })?;
        let events: Vec<&Value> = match lookup(&body, &spec.events) {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(single @ Value::Object(_)) => vec![single],
            _ => return Err(bad("webhook body holds no events".into(), body.clone())),
        };
        let mut actions = Vec::new();
        let mut refetch_seen = HashSet::new();
        for item in events {
            let kind: Vec<String> = spec
                .kind
                .iter()
                .filter_map(|p| lookup(item, p).and_then(text_of))
                .collect();
            let kind = kind.join(".");
            let Some(action) = spec.actions.get(&kind) else {
                continue;
            };
            let id = lookup(item, &spec.id).and_then(text_of);
            match action {
                EventAction::Refetch => {
                    let id = id.ok_or_else(|| {
                        bad(
                            format!("{kind} event has no id at {}", spec.id),
                            item.clone(),
                        )
                    })?;
                    if refetch_seen.insert(id.clone()) {
                        actions.push(WebhookAction::Refetch { external_id: id });
                    }
                }
                EventAction::Delete => {
                    let id = id.ok_or_else(|| {
                        bad(
                            format!("{kind} event has no id at {}", spec.id),
                            item.clone(),
                        )
                    })?;
                    actions.push(WebhookAction::Delete { external_id: id });
                }
                EventAction::Upsert => {
                    let record = spec
                        .record
                        .as_deref()
                        .and_then(|p| lookup(item, p))
                        .filter(|v| v.is_object())
                        .ok_or_else(|| {
                            bad(format!("{kind} event carries no record"), item.clone())
                        })?;
                    let deal = self.to_deal(record, &HashMap::new(), false)?;
                    actions.push(WebhookAction::Upsert(Box::new(deal)));
                }
                EventAction::Ignore => {}
            }
        }
        Ok(actions)
    }

    async fn fetch_one(
        &self,
        cx: &SyncContext,
        external_id: &str,
    ) -> Result<Option<SourceDeal>, ConnectorError> {
        let Some(request) = &self.manifest.deals.one else {
            return Err(self.bad(format!(
                "no [deals.one] request to read record {external_id} on its own"
            )));
        };
        // The id goes into a path or a query (Salesforce: inside a SOQL literal): only
        // the characters vendors use in ids are let through.
        if external_id.is_empty()
            || !external_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.bad(format!(
                "{external_id:?} is not a record id this connector can look up"
            )));
        }
        let mut vars = Vars::default();
        vars.set("id", json!(external_id))
            .set("page_size", json!(1));
        // Read like a list page, so the stored text is the vendor's here too; a
        // single-record endpoint that wraps its record (Pipedrive's `{"data": {…}}`)
        // has the object itself at the pointer.
        let split = |bytes: &[u8]| -> Result<Option<Vec<RawRecord>>, serde_json::Error> {
            if let Some(page) = split_records(bytes, &request.records)? {
                return Ok(Some(page.records));
            }
            let body: Value = serde_json::from_slice(bytes)?;
            Ok(lookup(&body, &request.records)
                .filter(|record| record.is_object())
                .map(|record| vec![RawRecord::from_value(record)]))
        };
        let records = match self
            .call_with(cx, request, &Value::Null, &vars, split)
            .await
        {
            Ok((Some(records), _)) => records,
            Ok((None, _)) => {
                return Err(self.bad(format!(
                    "{}: {:?} is not a record or an array of records",
                    request.path, request.records
                )));
            }
            Err(CallError::Status(404, _)) => return Ok(None),
            Err(error) => return Err(error.into_connector(&self.manifest.name, &request.path)),
        };
        let Some(raw) = records.into_iter().next() else {
            return Ok(None);
        };
        let record = self
            .plan
            .prune(raw.as_str())
            .map_err(|error| self.bad(format!("record {external_id}: {error}")))?;
        // A record read on its own (a webhook's refetch) reads its enrichments fresh.
        let enriched = self.enrich(cx, "one", &[&record], None).await?;
        let read = self.read_record(raw, Ok(record), false, true);
        self.finish_record(read, &enriched[0], false)
            .map(Some)
            .map_err(|bad| self.bad(format!("record {}: {}", external_id, bad.reason)))
    }
}

impl ManifestConnector {
    /// Restarts the incremental query at the high-water mark, skipping ids read there.
    fn rewindow(&self, state: &mut CursorState) {
        state.since = state.hw;
        state.since_id = state
            .hw_ids
            .last()
            .filter(|id| {
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
            .cloned()
            .unwrap_or_default();
        state.skip_ids = state.hw_ids.clone();
        state.page = Value::Null;
        state.seen = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connector of a connection to `connector` with static credentials.
    fn connector(connector: &str, credentials: &str) -> ManifestConnector {
        let text = format!("[connections.c]\nconnector = \"{connector}\"\n{credentials}\n");
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            &text,
            &crate::config::interpolate::ProcessEnv,
        )
        .unwrap();
        let catalog = super::super::Catalog::load(None).unwrap();
        ManifestConnector::new(catalog.get(connector).unwrap(), &config.connections[0]).unwrap()
    }

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn every_built_in_manifest_maps_the_pruned_record_exactly_like_the_whole_record() {
        let salesforce = "[connections.c.oauth]\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_token = \"z\"";
        for (kind, credentials, pages) in [
            (
                "hubspot",
                "token = \"t\"",
                &[
                    "hubspot/deals-list-page.json",
                    "hubspot/deals-list-last-page.json",
                    "hubspot/deals-search-response.json",
                ][..],
            ),
            (
                "pipedrive",
                "token = \"t\"",
                &[
                    "pipedrive/deals-v2-page.json",
                    "pipedrive/deals-v2-last-page.json",
                ][..],
            ),
            (
                "salesforce",
                salesforce,
                &[
                    "salesforce/query-opportunities-page1.json",
                    "salesforce/query-opportunities-page2.json",
                ][..],
            ),
        ] {
            let connector = connector(kind, credentials);
            let records = &connector.manifest.deals.full.records;
            let mut mapped = 0;
            for page in pages {
                let split = split_page(&fixture(page), records).unwrap();
                assert!(!split.records.is_empty(), "{page}");
                let body: Value = serde_json::from_slice(&fixture(page)).unwrap();
                let whole = lookup(&body, records).and_then(Value::as_array).unwrap();
                assert_eq!(whole.len(), split.records.len(), "{page}");
                for (raw, whole) in split.records.iter().zip(whole) {
                    assert_eq!(&raw.to_value(), whole, "{page}: the raw text is the record");
                    let pruned = connector.plan.prune(raw.as_str()).unwrap();
                    // No enrichment: `@` fields read as absent on both sides alike.
                    let none = HashMap::new();
                    let from_pruned = connector.map_fields(&pruned, &none, false);
                    let from_whole = connector.map_fields(whole, &none, false);
                    match (from_pruned, from_whole) {
                        (Ok(a), Ok(b)) => {
                            assert_eq!(a, b, "{page}");
                            mapped += 1;
                        }
                        (Err(a), Err(b)) => assert_eq!(
                            (a.external_id, a.reason),
                            (b.external_id, b.reason),
                            "{page}"
                        ),
                        (a, b) => panic!("{page}: {a:?} against {b:?}"),
                    }
                    assert_eq!(
                        connector.modified_of(&pruned, &none),
                        connector.modified_of(whole, &none)
                    );
                    for step in &connector.manifest.deals.enrich {
                        for path in step.ids.iter().filter(|path| path.starts_with('/')) {
                            assert_eq!(lookup(&pruned, path), lookup(whole, path), "{page} {path}");
                        }
                    }
                }
            }
            assert!(mapped > 0, "{kind}: no record mapped");
        }
    }

    fn json_fixture(path: &str) -> Value {
        let mut value: Value = serde_json::from_slice(&fixture(path)).unwrap();
        if let Some(object) = value.as_object_mut() {
            object.retain(|key, _| !key.starts_with('_'));
        }
        value
    }

    #[test]
    fn the_built_in_manifests_read_consent_from_each_vendors_own_field() {
        let consent = |connector: &ManifestConnector, record: &Value, step: &str, extra: Value| {
            let enriched = HashMap::from([(step.to_owned(), extra)]);
            connector
                .map_fields(record, &enriched, false)
                .unwrap()
                .marketing_consent
        };
        // HubSpot: the contact's "Unsubscribed from all email", a string property.
        let hubspot = connector("hubspot", "token = \"t\"");
        let page: Value = serde_json::from_slice(&fixture("hubspot/deals-list-page.json")).unwrap();
        let deal = &page["results"][0];
        let mut contact = json_fixture("hubspot/contact-optout-properties.json");
        assert_eq!(
            consent(&hubspot, deal, "contact", contact.clone()),
            Some(false)
        );
        contact["properties"]["hs_email_optout"] = json!("false");
        assert_eq!(
            consent(&hubspot, deal, "contact", contact.clone()),
            Some(true)
        );
        contact["properties"]
            .as_object_mut()
            .unwrap()
            .remove("hs_email_optout");
        assert_eq!(consent(&hubspot, deal, "contact", contact), None);

        // Pipedrive: the person's marketing_status; only `subscribed` may be mailed.
        let pipedrive = connector("pipedrive", "token = \"t\"");
        let page: Value = serde_json::from_slice(&fixture("pipedrive/deals-v2-page.json")).unwrap();
        let deal = &page["data"][0];
        let persons = json_fixture("pipedrive/persons-v2-with-marketing-status.json");
        assert_eq!(persons["data"][0]["marketing_status"], "unsubscribed");
        assert_eq!(
            consent(&pipedrive, deal, "person", persons["data"][0].clone()),
            Some(false)
        );
        assert_eq!(
            consent(&pipedrive, deal, "person", persons["data"][1].clone()),
            Some(true)
        );
        let mut unknown = persons["data"][1].clone();
        unknown["marketing_status"] = json!("bounced");
        assert_eq!(consent(&pipedrive, deal, "person", unknown), None);

        // Salesforce: the primary contact role's Contact.HasOptedOutOfEmail.
        let salesforce = connector(
            "salesforce",
            "[connections.c.oauth]\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_token = \"z\"",
        );
        let page = json_fixture("salesforce/query-opportunity-contact-roles.json");
        let mut opportunity = page["records"][0].clone();
        assert_eq!(
            consent(&salesforce, &opportunity, "none", Value::Null),
            Some(true)
        );
        opportunity["OpportunityContactRoles"]["records"][0]["Contact"]["HasOptedOutOfEmail"] =
            json!(true);
        assert_eq!(
            consent(&salesforce, &opportunity, "none", Value::Null),
            Some(false)
        );
    }

    #[test]
    fn an_incremental_read_starts_past_what_the_previous_read_surely_returned() {
        let at = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let ms = chrono::Duration::milliseconds;
        let lookback = chrono::Duration::seconds(300);
        // A watermark long before the horizon: just past it.
        assert_eq!(since(at(0), Some(at(1_000)), lookback), at(0) + ms(1));
        // A watermark whose second reaches the horizon: the watermark itself, ties
        // included.
        assert_eq!(since(at(0), Some(at(300)), lookback), at(0));
        assert_eq!(since(at(0), Some(at(300) + ms(999)), lookback), at(0));
        assert_eq!(since(at(0), Some(at(301)), lookback), at(0) + ms(1));
        // A recent watermark: everything after the horizon again.
        assert_eq!(since(at(1_000), Some(at(1_010)), lookback), at(710));
        // A cursor without the previous start: the whole lookback before the watermark.
        assert_eq!(since(at(1_000), None, lookback), at(700));
    }

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
