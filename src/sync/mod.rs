//! Sync: the per-connection scheduler and one sync run.
//!
//! A run discovers native pipelines (to refresh the stage map), then reads pages from
//! the connector, maps each record's native stage to a canonical one, and commits each
//! page together with the cursor after it. A failing connection only delays itself.
//!
//! Invariant: the cursor advances only in the transaction that commits its page, so a
//! crash or a kill at any point replays at most one page, which the upsert absorbs.

use crate::config::{Config, ConfigError, ConnectionConfig};
use crate::connectors::{BadRecord, Connector, ConnectorError, Registry, SyncContext};
use crate::domain::{ChangeCause, DealStatus, SourceDeal, StageRef, check_depth};
use crate::pipeline::{Pipelines, StageMap};
use crate::retry::{self, Backoff};
use crate::store::{
    AppliedMapping, CachedRecord, DealUpsert, NativeStageGroup, Quarantined, StageMove, Store,
    StoreError, UpsertOutcome,
};
use crate::telemetry::{Metrics, RecordLabels, RunLabels};
use chrono::Utc;
use rand::Rng;
use serde::Serialize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// The stream name under which the deals cursor is stored.
pub const DEALS_STREAM: &str = "deals";

/// How often native pipelines are re-discovered during incremental runs.
const DISCOVERY_EVERY: Duration = Duration::from_secs(3600);

/// One configured connection with its connector and its current stage map.
pub struct ConnectionRuntime {
    pub config: ConnectionConfig,
    pub connector: Arc<dyn Connector>,
    pipelines: Pipelines,
    /// Swapped whole when discovery finds new native stages; readers clone the Arc.
    stage_map: RwLock<Arc<StageMap>>,
    last_discovery: Mutex<Option<Instant>>,
}

impl ConnectionRuntime {
    /// Builds the runtime of every enabled connection, or the first config problem.
    pub fn build_all(config: &Config) -> Result<Vec<Arc<ConnectionRuntime>>, ConfigError> {
        let mut runtimes = Vec::new();
        let mut problems = Vec::new();
        // Every manifest is checked, used or not: a broken user manifest is reported.
        let catalog = Registry::catalog(config)?;
        for connection in config.connections.iter().filter(|c| c.enabled) {
            let connector = match Registry::build_with(connection, config, &catalog) {
                Ok(connector) => connector,
                Err(error) => {
                    problems.extend(error.problems().iter().cloned());
                    continue;
                }
            };
            let runtime =
                ConnectionRuntime::new(connection.clone(), connector, config.pipelines.clone());
            let default_pipeline = runtime.default_pipeline();
            for entry in &connection.stage_map {
                if let Err(message) = entry.resolve(default_pipeline.as_ref(), &config.pipelines) {
                    let key = entry.key(connection.name.as_str());
                    problems.extend(
                        ConfigError::at(config, key, message)
                            .problems()
                            .iter()
                            .cloned(),
                    );
                }
            }
            runtime.set_native(Vec::new());
            runtimes.push(Arc::new(runtime));
        }
        if problems.is_empty() {
            Ok(runtimes)
        } else {
            Err(ConfigError::invalid(config, problems))
        }
    }

    pub fn new(
        config: ConnectionConfig,
        connector: Arc<dyn Connector>,
        pipelines: Pipelines,
    ) -> Self {
        let runtime = ConnectionRuntime {
            config,
            connector,
            pipelines,
            stage_map: RwLock::new(Arc::new(StageMap::default())),
            last_discovery: Mutex::new(None),
        };
        runtime.set_native(Vec::new());
        runtime
    }

    pub fn name(&self) -> &str {
        self.config.name.as_str()
    }

    /// The canonical pipeline of this connection: the config's, else the connector's.
    pub fn default_pipeline(&self) -> Option<crate::domain::PipelineKey> {
        self.config.pipeline.clone().or_else(|| {
            self.connector
                .default_pipeline()
                .filter(|key| self.pipelines.get(key).is_some())
                .map(crate::domain::PipelineKey::new)
        })
    }

    /// Rebuilds the stage map from manifest defaults, config overrides and discovery.
    pub fn set_native(&self, native: Vec<crate::pipeline::NativePipeline>) {
        let defaults = self
            .connector
            .default_mappings()
            .into_iter()
            // A default pointing at a pipeline the config replaced is dropped.
            .filter(|entry| self.pipelines.stage(&entry.target).is_some());
        let default_pipeline = self.default_pipeline();
        let overrides = self
            .config
            .stage_map
            .iter()
            // Unresolvable overrides were reported by `build_all`.
            .filter_map(|entry| {
                entry
                    .resolve(default_pipeline.as_ref(), &self.pipelines)
                    .ok()
            });
        let entries = defaults.chain(overrides);
        let map =
            StageMap::new(self.default_pipeline(), entries).with_native(native, &self.pipelines);
        if let Ok(mut slot) = self.stage_map.write() {
            *slot = Arc::new(map);
        }
    }

    pub fn stage_map(&self) -> Arc<StageMap> {
        self.stage_map
            .read()
            .map(|map| map.clone())
            .unwrap_or_default()
    }

    /// Maps a source record's native stage to a canonical stage and status.
    ///
    /// A source that says won or lost apart from its stages (Pipedrive's deal status)
    /// wins over an open stage: the deal goes to its pipeline's first won or lost stage.
    pub fn map(&self, source: &SourceDeal) -> (StageRef, DealStatus) {
        let target = self
            .stage_map()
            .resolve(&source.native_pipeline, &source.native_stage);
        let status = self.pipelines.status_of(&target);
        if let Some(said @ (DealStatus::Won | DealStatus::Lost)) = source.source_status
            && said != status
        {
            let kind = if said == DealStatus::Won {
                crate::pipeline::StageKind::Won
            } else {
                crate::pipeline::StageKind::Lost
            };
            let pipeline = target.pipeline.clone().or_else(|| self.default_pipeline());
            if let Some(stage) = pipeline
                .as_ref()
                .and_then(|key| self.pipelines.get(key.as_str()))
                .and_then(|found| found.first_of_kind(kind))
            {
                return (
                    StageRef {
                        pipeline,
                        stage: stage.key.clone(),
                    },
                    said,
                );
            }
        }
        (target, status)
    }

    /// Turns source records into upserts for the store.
    pub fn upserts(&self, records: Vec<SourceDeal>, cause: ChangeCause) -> Vec<DealUpsert> {
        let now = Utc::now();
        records
            .into_iter()
            .map(|source| {
                let (target, status) = self.map(&source);
                DealUpsert {
                    connection: self.config.name.clone(),
                    source,
                    target,
                    status,
                    observed_at: now,
                    cause,
                }
            })
            .collect()
    }

    /// What the connector may touch during a run or a webhook refetch.
    pub fn context(&self, deps: &SyncDeps, shutdown: &CancellationToken) -> SyncContext {
        SyncContext {
            connection: self.config.name.clone(),
            shutdown: shutdown.clone(),
            metrics: deps.metrics.clone(),
            handles: Some(crate::connectors::StoreHandles::of(&deps.store)),
            attention: deps.attention.clone(),
            max_attempts: None,
        }
    }
}

/// Reads one deal again from its source and stores it (a poll's upsert), or marks it
/// deleted when the source says it is gone. `Ok(false)`: the connector cannot read one
/// record (webhook-only sources).
pub async fn reread(
    runtime: &ConnectionRuntime,
    deps: &SyncDeps,
    external_id: &str,
    shutdown: &CancellationToken,
) -> Result<bool, SyncError> {
    if !runtime.connector.reads_one() {
        return Ok(false);
    }
    let cx = runtime.context(deps, shutdown);
    match runtime.connector.fetch_one(&cx, external_id).await? {
        Some(deal) => {
            let upserts = runtime.upserts(vec![deal], ChangeCause::Poll);
            deps.store
                .commit_page(
                    runtime.name(),
                    DEALS_STREAM,
                    upserts,
                    Vec::new(),
                    Vec::new(),
                    None,
                )
                .await?;
        }
        None => {
            deps.store
                .mark_deal_deleted(runtime.name(), external_id, Utc::now())
                .await?;
        }
    }
    Ok(true)
}

/// What a connection's stage map changes for its stored deals: the moves (deals of a
/// native stage sitting where the previous mapping put them, whose mapping now names
/// another stage) and the map to record as applied.
#[derive(Debug, Clone, Default)]
pub struct RemapPlan {
    pub moves: Vec<StageMove>,
    pub applied: Vec<AppliedMapping>,
}

impl RemapPlan {
    /// How many deals the moves take.
    pub fn deals(&self) -> u64 {
        self.moves.iter().map(|m| m.deals).sum()
    }
}

/// Plans the remap of a connection's stored deals: `groups` are its live deals by
/// native and canonical stage, `applied` the map recorded by the last remap (`None`
/// before the first: a deal then only moves out of `unmapped`, as nothing says where
/// an earlier mapping put the others). Pure.
pub fn plan_remap(
    runtime: &ConnectionRuntime,
    groups: &[NativeStageGroup],
    applied: Option<&[AppliedMapping]>,
) -> RemapPlan {
    use std::collections::BTreeMap;
    let previous: BTreeMap<(&str, &str), StageRef> = applied
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            (
                (entry.native_pipeline.as_str(), entry.native_stage.as_str()),
                StageRef {
                    pipeline: entry.pipeline.clone().map(crate::domain::PipelineKey::new),
                    stage: crate::domain::StageKey::new(entry.stage.clone()),
                },
            )
        })
        .collect();
    // Every native stage known: those holding deals, those discovery named, and those
    // the defaults and the config map by key, so a stage whose first deal arrives later
    // is in the record too.
    let map = runtime.stage_map();
    let mut natives: Vec<(String, String)> = groups
        .iter()
        .map(|g| (g.native_pipeline.clone(), g.native_stage.clone()))
        .collect();
    for pipeline in map.native() {
        natives.extend(
            pipeline
                .stages
                .iter()
                .map(|stage| (pipeline.id.clone(), stage.id.clone())),
        );
    }
    natives.extend(
        map.entries()
            .iter()
            .filter(|entry| entry.native_pipeline != "*")
            .map(|entry| (entry.native_pipeline.clone(), entry.native_stage.clone())),
    );
    natives.sort();
    natives.dedup();
    let mut plan = RemapPlan::default();
    for (native_pipeline, native_stage) in &natives {
        let native = SourceDeal::new("", "", native_pipeline, native_stage);
        let (target, status) = runtime.map(&native);
        let before = previous
            .get(&(native_pipeline.as_str(), native_stage.as_str()))
            .cloned()
            .unwrap_or_else(StageRef::unmapped);
        if !target.is_unmapped() {
            // Deals kept as unmapped are always the mapping's doing.
            for group in groups.iter().filter(|g| {
                &g.native_pipeline == native_pipeline
                    && &g.native_stage == native_stage
                    && g.stage != target
                    && (g.stage == before || g.stage.is_unmapped())
            }) {
                plan.moves.push(StageMove {
                    native_pipeline: native_pipeline.clone(),
                    native_stage: native_stage.clone(),
                    from: group.stage.clone(),
                    to: target.clone(),
                    status,
                    deals: group.deals,
                });
            }
        }
        // A mapping taken away moves nothing: its deals stay where it put them, and the
        // record says so, for when the stage is mapped again.
        let recorded = if target.is_unmapped() { before } else { target };
        plan.applied.push(AppliedMapping {
            native_pipeline: native_pipeline.clone(),
            native_stage: native_stage.clone(),
            pipeline: recorded.pipeline.as_ref().map(|p| p.as_str().to_owned()),
            stage: recorded.stage.as_str().to_owned(),
        });
    }
    plan
}

/// Applies the connection's stage map to its stored deals (see [`plan_remap`]): when
/// the map changed (a reload, a restart with another config, discovery naming a stage),
/// each deal of a remapped native stage that sits where the previous mapping put it
/// moves to the new stage, in one transaction with a `mapping` history row, without
/// reading it again; poll and webhook connections alike. A failure only leaves them
/// where they are until the next pass.
pub async fn remap(runtime: &ConnectionRuntime, deps: &SyncDeps) {
    let name = runtime.name();
    let read = async {
        let groups = deps.store.native_stage_groups(name).await?;
        let applied = deps.store.applied_stage_map(name).await?;
        Ok::<_, StoreError>((groups, applied))
    };
    let (groups, applied) = match read.await {
        Ok(found) => found,
        Err(error) => {
            warn!(connection = %name, %error, "reading the stored deals' stages failed; not remapping now");
            return;
        }
    };
    let plan = plan_remap(runtime, &groups, applied.as_deref());
    if plan.moves.is_empty() && applied.as_deref() == Some(plan.applied.as_slice()) {
        return;
    }
    let moves = plan.moves.clone();
    match deps.store.remap_deals(name, plan.moves, plan.applied).await {
        Ok(counts) => {
            for (change, moved) in moves.iter().zip(counts) {
                if moved > 0 {
                    info!(connection = %name, native_pipeline = %change.native_pipeline, native_stage = %change.native_stage,
                        from = %crate::followup::policy::describe(&change.from), stage = %crate::followup::policy::describe(&change.to), moved,
                        "deals moved to the stage their native stage now maps to");
                }
            }
        }
        Err(error) => {
            warn!(connection = %name, %error, "moving deals to their newly mapped stages failed");
        }
    }
}

/// Pages read ahead of the commit in progress.
const READ_AHEAD: usize = 8;
/// Records stored in one transaction at most when read pages queue up for the store.
const MAX_BATCH_RECORDS: usize = 1_000;

/// One page (or several consecutive ones) mapped and ready to commit.
struct ReadPage {
    upserts: Vec<DealUpsert>,
    quarantined: Vec<Quarantined>,
    /// Enrichment records to keep, committed with the deals.
    cache: Vec<CachedRecord>,
    /// The cursor after the last page in here.
    next: serde_json::Value,
    done: bool,
    pages: u64,
    requests: u64,
    rate_limited: u64,
    /// Records read again unchanged, not passed on (see `Page::unchanged`).
    unchanged: u64,
}

impl ReadPage {
    /// Maps a page's records to upserts and sets aside the ones that do not map.
    fn new(runtime: &ConnectionRuntime, page: crate::connectors::Page) -> Self {
        let mut records = Vec::with_capacity(page.records.len());
        let mut quarantined = Vec::new();
        for record in page.records {
            // A record nested too deep is refused here, whatever the connector, so it
            // is never stored where every later read would have to parse it.
            let record = record.and_then(|deal| match check_depth(deal.raw.as_str().as_bytes()) {
                Ok(()) => Ok(deal),
                Err(too_deep) => Err(BadRecord {
                    external_id: Some(deal.external_id.to_string()),
                    reason: too_deep.to_string(),
                    raw: deal.raw,
                }),
            });
            match record {
                Ok(deal) => records.push(deal),
                Err(bad) => {
                    warn!(connection = %runtime.name(), external_id = ?bad.external_id, reason = %bad.reason, "record quarantined");
                    quarantined.push(Quarantined {
                        external_id: bad.external_id,
                        error: bad.reason,
                        raw: bad.raw,
                    })
                }
            }
        }
        ReadPage {
            upserts: runtime.upserts(records, ChangeCause::Poll),
            quarantined,
            cache: page.cache,
            next: page.next,
            done: page.done,
            pages: 1,
            requests: page.requests,
            rate_limited: page.rate_limited,
            unchanged: page.unchanged,
        }
    }

    fn records(&self) -> usize {
        self.upserts.len() + self.quarantined.len()
    }

    /// Appends the page read after this one; its cursor becomes the batch's.
    fn absorb(&mut self, later: ReadPage) {
        self.upserts.extend(later.upserts);
        self.quarantined.extend(later.quarantined);
        self.cache.extend(later.cache);
        self.next = later.next;
        self.done = later.done;
        self.pages += later.pages;
        self.requests += later.requests;
        self.rate_limited += later.rate_limited;
        self.unchanged += later.unchanged;
    }

    fn count(&self, summary: &mut RunSummary) {
        summary.pages += self.pages;
        summary.requests += self.requests;
        summary.rate_limited += self.rate_limited;
        summary.fetched += self.records() as u64 + self.unchanged;
        summary.unchanged += self.unchanged;
        summary.quarantined += self.quarantined.len() as u64;
    }
}

/// What a sync run did, for logs, the CLI summary and the store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub fetched: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub stale: u64,
    pub stage_changes: u64,
    pub unmapped: u64,
    pub quarantined: u64,
    pub pages: u64,
    pub requests: u64,
    pub rate_limited: u64,
    pub elapsed_ms: u64,
}

impl RunSummary {
    fn add(&mut self, outcome: UpsertOutcome) {
        self.created += outcome.created;
        self.updated += outcome.updated;
        self.unchanged += outcome.unchanged;
        self.stale += outcome.stale;
        self.stage_changes += outcome.stage_changes;
        self.unmapped += outcome.unmapped;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything a sync needs besides the connection.
#[derive(Clone)]
pub struct SyncDeps {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Where a connection reports what it needs from an operator (`/readyz`).
    pub attention: Option<crate::connectors::Attention>,
}

/// Runs one sync of a connection: discovery, then pages until caught up.
pub async fn run_once(
    runtime: &ConnectionRuntime,
    deps: &SyncDeps,
    full: bool,
    shutdown: &CancellationToken,
    progress: &(dyn Fn(&RunSummary) + Send + Sync),
) -> Result<RunSummary, SyncError> {
    let started = Instant::now();
    let name = runtime.name().to_owned();
    let stored = deps.store.cursor(&name, DEALS_STREAM).await?;
    let cursor = if full {
        runtime.connector.full_read_cursor(stored.as_ref())
    } else {
        stored
    };
    // A run without a cursor reads everything: it is recorded as a full sync.
    let full = full || cursor.is_none();
    let run_id = deps.store.start_sync_run(&name, full).await?;
    let result = run_pages(runtime, deps, cursor, full, shutdown, progress, started)
        .instrument(info_span!("sync_run", connection = %name, run_id, full))
        .await;
    let (summary, error) = match &result {
        Ok(summary) => (summary.clone(), None),
        Err((summary, error)) => (summary.clone(), Some(error.to_string())),
    };
    let status = if error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    deps.metrics
        .sync_runs
        .get_or_create(&RunLabels {
            connection: name.clone(),
            status: status.into(),
        })
        .inc();
    if error.is_some() {
        deps.metrics
            .sync_errors
            .get_or_create(&Metrics::connection(&name))
            .inc();
    } else {
        deps.metrics
            .last_success
            .get_or_create(&Metrics::connection(&name))
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    }
    let summary_json = serde_json::to_value(&summary).unwrap_or_default();
    deps.store
        .finish_sync_run(run_id, summary_json, error)
        .await?;
    result.map_err(|(_, error)| error)
}

/// Reads from `cursor` (`None`: a full sync from the start) to the end.
async fn run_pages(
    runtime: &ConnectionRuntime,
    deps: &SyncDeps,
    cursor: Option<serde_json::Value>,
    full: bool,
    shutdown: &CancellationToken,
    progress: &(dyn Fn(&RunSummary) + Send + Sync),
    started: Instant,
) -> Result<RunSummary, (RunSummary, SyncError)> {
    let name = runtime.name();
    let cx = runtime.context(deps, shutdown);
    let mut summary = RunSummary::default();
    let fail = |summary: &RunSummary, error: SyncError| (summary.clone(), error);

    let due = runtime
        .last_discovery
        .lock()
        .map(|last| full || last.is_none_or(|at| at.elapsed() > DISCOVERY_EVERY))
        .unwrap_or(true);
    if due {
        match runtime.connector.discover_pipelines(&cx).await {
            Ok(native) => {
                deps.store
                    .save_native_pipelines(name, &native)
                    .await
                    .map_err(|e| fail(&summary, e.into()))?;
                runtime.set_native(native);
                if let Ok(mut last) = runtime.last_discovery.lock() {
                    *last = Some(Instant::now());
                }
            }
            Err(error) => {
                // Reading deals can go on with the last known stages.
                warn!(connection = %name, %error, "pipeline discovery failed; using the last known stages");
                let known = deps.store.native_pipelines(name).await.unwrap_or_default();
                if !known.is_empty() && runtime.stage_map().native().is_empty() {
                    runtime.set_native(known);
                }
            }
        }
    }

    remap(runtime, deps).await;

    // Pages are read ahead of the commits (at most READ_AHEAD waiting), and pages that
    // queued up while the store was busy are committed together with the cursor of the
    // last of them: the cursor still only advances in the transaction that stores every
    // page before it, in order. Nothing fetched is stored before its commit succeeds.
    let (pages_tx, mut pages_rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let cx = &cx;
    let reader = async move {
        let mut cursor = cursor;
        loop {
            if shutdown.is_cancelled() {
                info!(connection = %name, "sync stopped at a page boundary for shutdown");
                break;
            }
            let read = match runtime.connector.fetch_page(cx, cursor.as_ref()).await {
                Ok(page) => Ok(ReadPage::new(runtime, page)),
                Err(error) => Err(error),
            };
            let last = match &read {
                Ok(page) => {
                    cursor = Some(page.next.clone());
                    page.done
                }
                Err(_) => true,
            };
            if pages_tx.send(read).await.is_err() || last {
                break;
            }
        }
    };
    let committed = {
        let summary = &mut summary;
        let committer = async {
            while let Some(read) = pages_rx.recv().await {
                let mut batch = read?;
                let mut failed = None;
                while !batch.done && batch.records() < MAX_BATCH_RECORDS {
                    match pages_rx.try_recv() {
                        Ok(Ok(page)) => batch.absorb(page),
                        Ok(Err(error)) => {
                            failed = Some(error);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                batch.count(summary);
                let done = batch.done;
                // Records the connector met again unchanged count with the store's.
                let met_unchanged = batch.unchanged;
                let outcome = deps
                    .store
                    .commit_page(
                        name,
                        DEALS_STREAM,
                        batch.upserts,
                        batch.quarantined,
                        batch.cache,
                        Some(batch.next),
                    )
                    .await?;
                for (label, count) in [
                    ("created", outcome.created),
                    ("updated", outcome.updated),
                    ("unchanged", outcome.unchanged + met_unchanged),
                    ("stale", outcome.stale),
                ] {
                    if count > 0 {
                        deps.metrics
                            .records
                            .get_or_create(&RecordLabels {
                                connection: name.to_owned(),
                                outcome: label.into(),
                            })
                            .inc_by(count);
                    }
                }
                summary.add(outcome);
                summary.elapsed_ms = started.elapsed().as_millis() as u64;
                progress(summary);
                if let Some(error) = failed {
                    return Err(SyncError::from(error));
                }
                if done {
                    break;
                }
            }
            Ok::<(), SyncError>(())
        };
        // The committer decides; the reader is dropped (between or inside requests, with
        // nothing stored) when the committer stops early.
        tokio::pin!(reader);
        tokio::pin!(committer);
        let mut reading = true;
        loop {
            tokio::select! {
                result = &mut committer => break result,
                _ = &mut reader, if reading => reading = false,
            }
        }
    };
    if let Err(error) = committed {
        return Err((summary, error));
    }
    if summary.quarantined > 0 {
        deps.metrics
            .records
            .get_or_create(&RecordLabels {
                connection: name.to_owned(),
                outcome: "quarantined".into(),
            })
            .inc_by(summary.quarantined);
    }
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(summary)
}

/// How often a connection sums up its runs at INFO (runs that changed nothing are
/// logged at DEBUG only).
pub const QUIET_SUMMARY_EVERY: Duration = Duration::from_secs(15 * 60);

/// Counts a connection's runs, and those that changed nothing, between summaries.
#[derive(Debug)]
struct QuietRuns {
    since: Instant,
    runs: u64,
    quiet: u64,
}

impl QuietRuns {
    fn new(now: Instant) -> Self {
        QuietRuns {
            since: now,
            runs: 0,
            quiet: 0,
        }
    }

    /// Counts one run; returns (runs, quiet runs) when a summary is due, and starts
    /// counting again. Nothing is due when no run was quiet: each was logged at INFO.
    fn record(&mut self, changed: bool, now: Instant) -> Option<(u64, u64)> {
        self.runs += 1;
        if !changed {
            self.quiet += 1;
        }
        if now.duration_since(self.since) < QUIET_SUMMARY_EVERY {
            return None;
        }
        let due = (self.quiet > 0).then_some((self.runs, self.quiet));
        *self = QuietRuns::new(now);
        due
    }
}

/// The delay before the next run: the interval with ±10% jitter, so connections
/// configured alike do not all hit their vendors at once.
/// Backoff after failed runs: from 5–10 s, doubling, never longer than the poll
/// interval (at least 5 s); equal jitter, so a failing connection never retries at once.
pub fn failure_backoff(interval: Duration) -> Backoff {
    Backoff::equal(
        Duration::from_secs(10),
        interval.max(Duration::from_secs(5)),
    )
}

/// The longest `Retry-After` a failed run waits for; a longer hint is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Runs a connection on its own schedule until `shutdown`. A run the store failed
/// marks the connection's scheduler degraded in `/readyz` (`health`) until a later run
/// gets past the store; every failure backs off and the schedule goes on.
pub async fn run_connection(
    runtime: Arc<ConnectionRuntime>,
    deps: SyncDeps,
    shutdown: CancellationToken,
    health: crate::app::WorkerHealth,
) {
    let name = runtime.name().to_owned();
    // At start and after a reload (both start the connection here), a changed stage
    // map moves the stored deals, webhook-only connections' included.
    remap(&runtime, &deps).await;
    if !runtime.connector.polls() {
        return;
    }
    let Some(interval) = runtime
        .config
        .poll_interval
        .or(Some(Duration::from_secs(300)))
    else {
        return;
    };
    // A short random delay first, so a restart does not fire every connection at once.
    let mut delay = Duration::from_millis(rand::rng().random_range(0..500));
    let mut failures = 0u32;
    let mut quiet = QuietRuns::new(Instant::now());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        let outcome = run_once(&runtime, &deps, false, &shutdown, &|_| {}).await;
        // A task stopped by a reload leaves the mark to its successor (or to nobody,
        // when the connection is gone).
        if !shutdown.is_cancelled() {
            match &outcome {
                Err(SyncError::Store(error)) => {
                    health.degraded(format!("sync run failed: {error}"))
                }
                _ => health.recovered(),
            }
        }
        match outcome {
            Ok(summary) => {
                failures = 0;
                // A run that changed nothing is logged at DEBUG; one INFO line now and
                // then says how many there were, so an idle connection does not fill
                // the log every poll and a live one still shows it is alive.
                let changed = summary.created
                    + summary.updated
                    + summary.stage_changes
                    + summary.unmapped
                    + summary.quarantined
                    > 0;
                if changed {
                    info!(connection = %name, fetched = summary.fetched, created = summary.created,
                        updated = summary.updated, stage_changes = summary.stage_changes,
                        unmapped = summary.unmapped, quarantined = summary.quarantined,
                        elapsed_ms = summary.elapsed_ms, "sync run finished");
                } else {
                    debug!(connection = %name, fetched = summary.fetched,
                        elapsed_ms = summary.elapsed_ms, "sync run finished");
                }
                if let Some((runs, quiet_runs)) = quiet.record(changed, Instant::now()) {
                    info!(connection = %name, runs, quiet_runs,
                        minutes = QUIET_SUMMARY_EVERY.as_secs() / 60,
                        "sync runs since the last summary (quiet runs log at DEBUG)");
                }
                delay = retry::spread(interval, 0.1);
            }
            Err(SyncError::Connector(ConnectorError::BudgetExhausted { resume_after, .. })) => {
                // Not a failure: the connection keeps to its share of the vendor budget.
                delay = resume_after.max(Duration::from_secs(1));
                info!(connection = %name, resume_in_s = delay.as_secs(), "sync paused for the vendor API budget");
            }
            Err(error) => {
                failures += 1;
                delay = match &error {
                    SyncError::Connector(ConnectorError::Transient {
                        retry_after: Some(after),
                        ..
                    }) => failure_backoff(interval).delay_honouring(
                        failures,
                        Some(*after),
                        MAX_RETRY_AFTER,
                    ),
                    SyncError::Connector(ConnectorError::Cancelled) => break,
                    _ => failure_backoff(interval).delay(failures),
                };
                warn!(connection = %name, %error, failures, retry_in_s = delay.as_secs(), "sync run failed");
            }
        }
    }
    info!(connection = %name, "connection stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_runs_are_summed_up_once_per_period_and_only_when_there_were_any() {
        let start = Instant::now();
        let mut quiet = QuietRuns::new(start);
        for minute in 0..14 {
            assert_eq!(
                quiet.record(false, start + Duration::from_secs(minute * 60)),
                None
            );
        }
        assert_eq!(
            quiet.record(true, start + QUIET_SUMMARY_EVERY),
            Some((15, 14))
        );
        let later = start + QUIET_SUMMARY_EVERY;
        assert_eq!(quiet.record(true, later + Duration::from_secs(60)), None);
        assert_eq!(
            quiet.record(true, later + QUIET_SUMMARY_EVERY),
            None,
            "all runs were at INFO"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped_by_the_interval() {
        let interval = Duration::from_secs(60);
        for failures in 0..20 {
            let delay = failure_backoff(interval).delay(failures);
            assert!(delay <= interval, "{failures}: {delay:?}");
        }
        // The ceiling doubles from 10 s until the interval caps it; each delay drawn
        // lies in [ceiling/2, ceiling], so the n-th wait is never shorter than half the
        // (n-1)-th's ceiling, and sync runs are retried until the daemon stops.
        let backoff = failure_backoff(interval);
        let ceilings: Vec<u64> = (1..=6).map(|n| backoff.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [10, 20, 40, 60, 60, 60]);
        for failures in 1..=6 {
            let ceiling = backoff.ceiling(failures);
            for _ in 0..50 {
                let delay = backoff.delay(failures);
                assert!(
                    ceiling / 2 <= delay && delay <= ceiling,
                    "{failures}: {delay:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
        }
        assert!(backoff.may_retry(u32::MAX - 1));
        let first = failure_backoff(interval).delay(1);
        assert!((Duration::from_secs(5)..=Duration::from_secs(10)).contains(&first));
        assert_eq!(
            failure_backoff(Duration::from_secs(1)).ceiling(9),
            Duration::from_secs(5)
        );
    }
}
