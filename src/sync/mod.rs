//! Sync: the per-connection pull scheduler and one sync run.
//!
//! A run discovers native pipelines (to refresh the stage map), then reads pages from
//! the connector, has the connection's runtime (`ingest`) map each page's records to
//! deal upserts, and commits each page together with the cursor after it. A failing
//! connection only delays itself. What a record becomes is `ingest`'s; when pages are
//! read and how they commit is this module's.
//!
//! Invariant: the cursor advances only in the transaction that commits its page, so a
//! crash or a kill at any point replays at most one page, which the upsert absorbs.

use crate::connectors::ConnectorError;
use crate::ingest::{ConnectionRuntime, SyncDeps, SyncError, remap};
use crate::retry::{self, Backoff};
use crate::store::{CachedRecord, DealUpsert, Quarantined, UpsertOutcome};
use crate::telemetry::{Metrics, RecordLabels, RunLabels};
use chrono::Utc;
use rand::Rng;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// The stream name under which the deals cursor is stored.
pub const DEALS_STREAM: &str = "deals";

/// How often native pipelines are re-discovered during incremental runs.
const DISCOVERY_EVERY: Duration = Duration::from_secs(3600);

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
        let pulled = runtime.pulled(page.records);
        ReadPage {
            upserts: pulled.upserts,
            quarantined: pulled.quarantined,
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

    /// Absorbs the pages already read and waiting, while this batch is not the last
    /// page and holds fewer than [`MAX_BATCH_RECORDS`] records; never waits for a page.
    /// A read that failed ends the gathering and is returned: the pages before it
    /// commit first.
    fn gather(
        &mut self,
        queued: &mut tokio::sync::mpsc::Receiver<Result<ReadPage, ConnectorError>>,
    ) -> Option<ConnectorError> {
        while !self.done && self.records() < MAX_BATCH_RECORDS {
            match queued.try_recv() {
                Ok(Ok(page)) => self.absorb(page),
                Ok(Err(error)) => return Some(error),
                Err(_) => return None,
            }
        }
        None
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
    /// Whether the run changed what a user sees: such runs log at INFO, the others at
    /// DEBUG.
    fn changed(&self) -> bool {
        self.created + self.updated + self.stage_changes + self.unmapped + self.quarantined > 0
    }

    fn add(&mut self, outcome: UpsertOutcome) {
        self.created += outcome.created;
        self.updated += outcome.updated;
        self.unchanged += outcome.unchanged;
        self.stale += outcome.stale;
        self.stage_changes += outcome.stage_changes;
        self.unmapped += outcome.unmapped;
    }
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

/// Whether a run discovers the vendor's pipelines first: every full run, the first run
/// of a runtime (at start and after a reload), and an incremental run once the last
/// discovery is older than [`DISCOVERY_EVERY`].
fn discovery_due(full: bool, last: Option<Instant>, now: Instant) -> bool {
    full || last.is_none_or(|at| now.saturating_duration_since(at) > DISCOVERY_EVERY)
}

/// Whether a run whose discovery failed takes the stages stored by an earlier
/// discovery: only when some are stored and the runtime has none in force yet (after a
/// restart); stages discovered by this runtime are newer than the stored ones.
fn falls_back_on_stored<T>(stored: &[T], in_force: &[T]) -> bool {
    !stored.is_empty() && in_force.is_empty()
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

    if discovery_due(full, runtime.last_discovery(), Instant::now()) {
        match runtime.connector.discover_pipelines(&cx).await {
            Ok(native) => {
                deps.store
                    .save_native_pipelines(name, &native)
                    .await
                    .map_err(|e| fail(&summary, e.into()))?;
                runtime.discovered(native);
            }
            Err(error) => {
                // Reading deals can go on with the last known stages.
                warn!(connection = %name, %error, "pipeline discovery failed; using the last known stages");
                let known = deps.store.native_pipelines(name).await.unwrap_or_default();
                if falls_back_on_stored(&known, runtime.stage_map().native()) {
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
                let failed = batch.gather(&mut pages_rx);
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

/// A connection's failed runs in a row and how long to wait after each.
struct Failures {
    count: u32,
    backoff: Backoff,
}

impl Failures {
    /// Counts a failed run and returns the wait before the next: the backoff, or the
    /// vendor's `Retry-After` when it asks for longer (at most [`MAX_RETRY_AFTER`]).
    /// `None` for a run cancelled by a shutdown or reload: the loop ends, no failure.
    fn failed(&mut self, error: &SyncError) -> Option<Duration> {
        let hint = match error {
            SyncError::Connector(ConnectorError::Cancelled) => return None,
            SyncError::Connector(ConnectorError::Transient { retry_after, .. }) => *retry_after,
            _ => None,
        };
        self.count += 1;
        Some(
            self.backoff
                .delay_honouring(self.count, hint, MAX_RETRY_AFTER),
        )
    }
}

/// Runs a connection on its own schedule until `shutdown`. A run the store failed
/// marks the connection's scheduler degraded in `/readyz` (`health`) until a later run
/// gets past the store; every failure backs off and the schedule goes on.
pub async fn run_connection(
    runtime: Arc<ConnectionRuntime>,
    deps: SyncDeps,
    shutdown: CancellationToken,
    health: crate::health::WorkerHealth,
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
    let mut failures = Failures {
        count: 0,
        backoff: failure_backoff(interval),
    };
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
                failures.count = 0;
                // A run that changed nothing is logged at DEBUG; one INFO line now and
                // then says how many there were, so an idle connection does not fill
                // the log every poll and a live one still shows it is alive.
                let changed = summary.changed();
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
                let Some(wait) = failures.failed(&error) else {
                    break;
                };
                delay = wait;
                warn!(connection = %name, %error, failures = failures.count,
                    retry_in_s = delay.as_secs(), "sync run failed");
            }
        }
    }
    info!(connection = %name, "connection stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChangeCause, DealStatus, RawRecord, SourceDeal, StageRef};

    /// A mapped page as `ReadPage::new` makes one: `upserts` deals, `quarantined`
    /// records set aside, `cached` enrichment records, and the page's own counts.
    fn page(
        ids: std::ops::Range<u32>,
        quarantined: u32,
        cached: u32,
        next: u64,
        done: bool,
        (requests, rate_limited, unchanged): (u64, u64, u64),
    ) -> ReadPage {
        ReadPage {
            upserts: ids
                .map(|id| DealUpsert {
                    connection: "crm".into(),
                    source: SourceDeal::new(id.to_string(), "deal", "default", "open"),
                    target: StageRef::unmapped(),
                    status: DealStatus::Open,
                    observed_at: Utc::now(),
                    cause: ChangeCause::Poll,
                })
                .collect(),
            quarantined: (0..quarantined)
                .map(|n| Quarantined {
                    external_id: Some(format!("bad-{next}-{n}")),
                    error: "no stage".into(),
                    raw: RawRecord::null(),
                })
                .collect(),
            cache: (0..cached)
                .map(|n| CachedRecord {
                    step: "contacts".into(),
                    id: format!("{next}-{n}"),
                    record: RawRecord::null(),
                })
                .collect(),
            next: serde_json::json!({ "after": next }),
            done,
            pages: 1,
            requests,
            rate_limited,
            unchanged,
        }
    }

    /// Pages that queued up while the store was busy commit as one batch: every
    /// page's deals, quarantined and cached records, with the cursor and end mark of
    /// the last page, and the counts of all of them.
    #[test]
    fn a_gathered_batch_holds_every_pages_records_and_the_last_pages_cursor() {
        let mut batch = page(0..2, 1, 1, 100, false, (2, 1, 3));
        assert_eq!(batch.records(), 3, "2 deals and 1 quarantined record");
        batch.absorb(page(2..5, 2, 3, 200, false, (3, 2, 4)));
        batch.absorb(page(5..6, 0, 0, 300, true, (1, 0, 0)));

        let ids: Vec<&str> = batch
            .upserts
            .iter()
            .map(|u| u.source.external_id.as_str())
            .collect();
        assert_eq!(ids, ["0", "1", "2", "3", "4", "5"]);
        let bad: Vec<&str> = batch
            .quarantined
            .iter()
            .filter_map(|q| q.external_id.as_deref())
            .collect();
        assert_eq!(bad, ["bad-100-0", "bad-200-0", "bad-200-1"]);
        let cached: Vec<&str> = batch.cache.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(cached, ["100-0", "200-0", "200-1", "200-2"]);
        assert_eq!(batch.next, serde_json::json!({ "after": 300 }));
        assert!(batch.done, "the last page read says the run is caught up");
        assert_eq!(batch.records(), 9, "6 deals and 3 quarantined records");
        assert_eq!(batch.pages, 3);
        assert_eq!(batch.requests, 2 + 3 + 1);
        assert_eq!(batch.rate_limited, 1 + 2);
        assert_eq!(batch.unchanged, 3 + 4);

        // A batch that is not caught up keeps reading.
        let mut open = page(0..1, 0, 0, 1, true, (1, 0, 0));
        open.absorb(page(1..2, 0, 0, 2, false, (1, 0, 0)));
        assert!(!open.done);
    }

    /// A committed batch adds its pages, requests, 429 answers and records to the run
    /// summary that `dealsync sync` prints and the store keeps: every record read
    /// (stored, quarantined, or met again unchanged) counts as fetched.
    #[test]
    fn a_batch_adds_its_pages_requests_and_records_to_the_run_summary() {
        let mut summary = RunSummary {
            fetched: 10,
            unchanged: 4,
            quarantined: 1,
            pages: 3,
            requests: 5,
            rate_limited: 1,
            ..RunSummary::default()
        };
        let mut batch = page(0..3, 2, 0, 1, false, (3, 2, 4));
        batch.absorb(page(3..4, 0, 0, 2, true, (2, 1, 1)));
        batch.count(&mut summary);
        assert_eq!(summary.pages, 3 + 2);
        assert_eq!(summary.requests, 5 + 3 + 2);
        assert_eq!(summary.rate_limited, 1 + 2 + 1);
        // 4 deals, 2 quarantined, 5 met unchanged
        assert_eq!(summary.fetched, 10 + 4 + 2 + 5);
        assert_eq!(summary.unchanged, 4 + 5);
        assert_eq!(summary.quarantined, 1 + 2);
        assert_eq!(
            (summary.created, summary.updated, summary.stale),
            (0, 0, 0),
            "what the store made of the records is the commit's to count"
        );
    }

    /// Each commit's outcome adds to the run summary, field by field.
    #[test]
    fn store_outcomes_add_up_in_the_run_summary_field_by_field() {
        let mut summary = RunSummary {
            fetched: 40,
            created: 2,
            updated: 3,
            unchanged: 4,
            stale: 5,
            stage_changes: 6,
            unmapped: 7,
            ..RunSummary::default()
        };
        summary.add(UpsertOutcome {
            created: 3,
            updated: 4,
            unchanged: 5,
            stale: 6,
            stage_changes: 7,
            unmapped: 8,
        });
        assert_eq!(
            (
                summary.created,
                summary.updated,
                summary.unchanged,
                summary.stale,
                summary.stage_changes,
                summary.unmapped,
            ),
            (2 + 3, 3 + 4, 4 + 5, 5 + 6, 6 + 7, 7 + 8)
        );
        assert_eq!(summary.fetched, 40, "fetched is counted as pages are read");
    }

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

    /// Pages read while the store was busy join the batch until the last page, the
    /// batch limit, an empty queue or a failed read; a failed read comes back to be
    /// reported after the pages before it commit.
    #[tokio::test]
    async fn gathering_takes_the_queued_pages_up_to_the_last_page_or_the_limit() {
        let (tx, mut queued) = tokio::sync::mpsc::channel(READ_AHEAD);
        let mut batch = page(0..2, 0, 0, 1, false, (1, 0, 0));
        assert!(
            batch.gather(&mut queued).is_none(),
            "nothing queued: no wait"
        );
        assert_eq!(batch.records(), 2);

        for (from, next, done) in [(2, 2, false), (3, 3, true), (4, 4, false)] {
            tx.send(Ok(page(from..from + 1, 0, 0, next, done, (1, 0, 0))))
                .await
                .unwrap();
        }
        assert!(batch.gather(&mut queued).is_none());
        assert_eq!(
            (batch.records(), batch.pages),
            (4, 3),
            "up to the last page"
        );
        assert_eq!(batch.next, serde_json::json!({ "after": 3 }));
        assert!(batch.done);
        let left = queued.try_recv().unwrap().unwrap();
        assert_eq!(left.next, serde_json::json!({ "after": 4 }), "left queued");

        let mut batch = page(0..1, 0, 0, 1, false, (1, 0, 0));
        tx.send(Ok(page(1..2, 0, 0, 2, false, (1, 0, 0))))
            .await
            .unwrap();
        let refused = ConnectorError::Transient {
            vendor: "hubspot".into(),
            reason: "HTTP 500".into(),
            retry_after: None,
        };
        tx.send(Err(refused)).await.unwrap();
        tx.send(Ok(page(2..3, 0, 0, 3, false, (1, 0, 0))))
            .await
            .unwrap();
        let failed = batch.gather(&mut queued);
        assert!(
            matches!(failed, Some(ConnectorError::Transient { .. })),
            "{failed:?}"
        );
        assert_eq!(
            batch.records(),
            2,
            "the page before the failed read is kept"
        );
        assert_eq!(batch.next, serde_json::json!({ "after": 2 }));
        queued.try_recv().unwrap().unwrap();

        // A full batch takes nothing more; one record short of the limit takes a whole
        // page, even past the limit.
        let limit = MAX_BATCH_RECORDS as u32;
        let mut full = page(0..limit, 0, 0, 1, false, (1, 0, 0));
        tx.send(Ok(page(limit..limit + 2, 0, 0, 2, false, (1, 0, 0))))
            .await
            .unwrap();
        assert!(full.gather(&mut queued).is_none());
        assert_eq!(full.records(), MAX_BATCH_RECORDS);
        let mut short = page(1..limit, 0, 0, 1, false, (1, 0, 0));
        assert!(short.gather(&mut queued).is_none());
        assert_eq!(short.records(), MAX_BATCH_RECORDS + 1);
        assert_eq!(short.next, serde_json::json!({ "after": 2 }));
    }

    /// A run is logged at INFO when any count a user sees moved, each on its own.
    #[test]
    fn a_run_changed_something_when_any_visible_count_moved() {
        let quiet = RunSummary {
            fetched: 7,
            unchanged: 5,
            stale: 2,
            pages: 1,
            requests: 1,
            ..RunSummary::default()
        };
        assert!(!quiet.changed());
        let counts: [fn(&mut RunSummary) -> &mut u64; 5] = [
            |s| &mut s.created,
            |s| &mut s.updated,
            |s| &mut s.stage_changes,
            |s| &mut s.unmapped,
            |s| &mut s.quarantined,
        ];
        for (n, count) in counts.iter().enumerate() {
            let mut summary = quiet.clone();
            *count(&mut summary) = 1;
            assert!(summary.changed(), "count {n}");
        }
    }

    /// Pipelines are discovered on a full run, on a runtime's first run and once the
    /// last discovery is more than an hour old; not on every poll.
    #[test]
    fn pipelines_are_discovered_on_full_and_first_runs_and_hourly() {
        let at = Instant::now();
        let minute = Duration::from_secs(60);
        assert!(discovery_due(false, None, at), "a runtime's first run");
        assert!(discovery_due(true, Some(at), at + minute), "a full run");
        assert!(!discovery_due(false, Some(at), at + minute));
        assert!(!discovery_due(
            false,
            Some(at),
            at + DISCOVERY_EVERY - minute
        ));
        assert!(
            !discovery_due(false, Some(at), at + DISCOVERY_EVERY),
            "not older than an hour yet"
        );
        assert!(discovery_due(
            false,
            Some(at),
            at + DISCOVERY_EVERY + minute
        ));
    }

    /// With discovery failing, the stored stages are taken only by a runtime that has
    /// none in force; stages it discovered itself stay.
    #[test]
    fn a_failed_discovery_falls_back_on_stored_stages_only_without_stages_in_force() {
        assert!(falls_back_on_stored(&[1], &[]));
        assert!(!falls_back_on_stored(&[1], &[2]));
        assert!(!falls_back_on_stored::<u8>(&[], &[]));
        assert!(!falls_back_on_stored(&[], &[2]));
    }

    /// Failed runs in a row wait longer each time; a vendor's `Retry-After` is waited
    /// out when it asks for longer, up to an hour; a cancelled run is no failure and
    /// ends the connection's loop.
    #[test]
    fn failed_runs_back_off_further_honour_retry_after_and_cancelled_runs_stop() {
        let mut failures = Failures {
            count: 0,
            backoff: failure_backoff(Duration::from_secs(3600)),
        };
        let plain = SyncError::Connector(ConnectorError::Transient {
            vendor: "hubspot".into(),
            reason: "HTTP 500".into(),
            retry_after: None,
        });
        let secs = |n| Duration::from_secs(n);
        for (n, (floor, ceiling)) in [(5, 10), (10, 20), (20, 40)].into_iter().enumerate() {
            let wait = failures.failed(&plain).expect("a failure waits");
            assert!(
                (secs(floor)..=secs(ceiling)).contains(&wait),
                "failure {}: {wait:?}",
                n + 1
            );
        }
        assert_eq!(failures.count, 3);
        let asked = |after| {
            SyncError::Connector(ConnectorError::Transient {
                vendor: "hubspot".into(),
                reason: "HTTP 429".into(),
                retry_after: Some(after),
            })
        };
        assert_eq!(failures.failed(&asked(secs(120))), Some(secs(120)));
        assert_eq!(failures.failed(&asked(secs(36_000))), Some(MAX_RETRY_AFTER));
        let short = failures.failed(&asked(secs(1))).unwrap();
        assert!(
            short >= secs(160),
            "the backoff when it is longer: {short:?}"
        );
        assert_eq!(failures.count, 6);
        assert_eq!(
            failures.failed(&SyncError::Connector(ConnectorError::Cancelled)),
            None
        );
        assert_eq!(failures.count, 6, "a cancelled run is not a failure");
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
