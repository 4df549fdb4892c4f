//! The cursor of a manifest read and its phases.
//!
//! A sync is a sequence of phases, each a paged read: `full` (first run and
//! `--full`), then `incremental` runs sorted by modification time, and `deletes`
//! (archived or deleted records) when the manifest has them. The cursor says which
//! phase, which page, and the high-water mark (modification time, ids) seen so far;
//! [`ManifestConnector::read_page`] reads the next page of the phase and moves it on.
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
//! - A changed mapping (see [`mapping_shape`]) makes the next run a full read.

use super::ManifestConnector;
use super::enrichment::EnrichCache;
use super::mapping::ReadRecord;
use super::paging::{CallError, split_records};
use crate::connectors::manifest::fields::{self, Scope};
use crate::connectors::manifest::records::SplitPage;
use crate::connectors::manifest::schema::{Manifest, Request};
use crate::connectors::manifest::template::Vars;
use crate::connectors::{ConnectorError, Page, SyncContext};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use tracing::{debug, info, warn};

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
pub(super) fn mapping_shape(manifest: &Manifest) -> String {
    let text = format!("{:?}\n{:?}", manifest.deals.fields, manifest.deals.enrich);
    format!("{:016x}", crate::domain::hashing::fnv1a(text.as_bytes()))
}

impl ManifestConnector {
    /// [`Connector::fetch_page`](crate::connectors::Connector::fetch_page).
    pub(super) async fn read_page(
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
}
