//! The manifest engine: [`ManifestConnector`], a [`Connector`] that interprets a
//! [`Manifest`]. This file holds the connector, its construction from a connection's
//! settings, and the [`Connector`] impl, which hands each read to the module that
//! holds it:
//! - [`cursor`]: the cursor, its phases (full, incremental, deletes) and a page read;
//! - [`paging`]: building and sending requests, records out of bodies, next pages;
//! - [`enrichment`]: further reads a page's records need, and their kept records;
//! - [`mapping`]: a record (and its enrichments) to a deal, fingerprints;
//! - [`discovery`]: native pipelines and stages;
//! - [`webhook`]: the signature scheme, webhook deliveries, reading one record;
//! - [`writeback`]: recording a sent follow-up on its deal (`[writeback]`).
//!
//! Invariants: the connector holds no state a restart would need (the cursor is
//! committed with each page); what it keeps in memory ([`Recent`], refused optional
//! texts) is only a saving of requests.

mod cursor;
mod discovery;
mod enrichment;
mod mapping;
mod paging;
mod webhook;
mod writeback;

use self::cursor::mapping_shape;
use self::enrichment::Recent;
use self::mapping::record_plan;
use self::paging::collect_bodies;
use crate::config::ConnectionConfig;
use crate::connectors::manifest::auth::Credentials;
use crate::connectors::manifest::records::Plan;
use crate::connectors::manifest::schema::Manifest;
use crate::connectors::vendor_http::{BudgetRules, Limits, VendorClient};
use crate::connectors::{
    BadRecord, Connector, ConnectorError, Page, SyncContext, WebhookAction, WebhookEvent,
};
use crate::domain::{Currency, PipelineKey, SourceDeal, StageKey, StageRef};
use crate::pipeline::{MappingSource, NativePipeline, StageMapEntry};
use async_trait::async_trait;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Default overlap of incremental reads.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(300);

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

    fn writes_back(&self) -> bool {
        self.declares_writeback()
    }

    async fn write_back(
        &self,
        cx: &SyncContext,
        job: &crate::store::WritebackJob,
    ) -> Result<Option<String>, crate::connectors::WritebackError> {
        self.write_back_job(cx, job).await
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
        self.discover(cx).await
    }

    async fn fetch_page(
        &self,
        cx: &SyncContext,
        cursor: Option<&Value>,
    ) -> Result<Page, ConnectorError> {
        self.read_page(cx, cursor).await
    }

    fn webhook_scheme(&self) -> Option<crate::connectors::signature::Scheme> {
        self.scheme()
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        self.webhook_actions(event)
    }

    async fn fetch_one(
        &self,
        cx: &SyncContext,
        external_id: &str,
    ) -> Result<Option<SourceDeal>, ConnectorError> {
        self.read_one(cx, external_id).await
    }
}
