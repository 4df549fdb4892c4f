//! The backend-free half of the deal write path: what a batch of records does to the
//! stored deals, decided from their stored state alone ([`plan`]). Each backend reads
//! that state (the batch's [`Existing`] deals, and which of them a follow-up moved
//! last) and executes the plan's writes its own way, inside the caller's transaction:
//! `write` for SQLite, `postgres::deals` for PostgreSQL. So both backends take the same
//! decisions, by one piece of code.
//!
//! Invariants:
//! - One deal per (connection, external id). A record whose content hash
//!   (`domain::hashing::content_hash`) equals the stored one writes nothing; a record
//!   older than the stored one (`source_updated_at`) is counted stale and writes nothing.
//! - Every canonical stage change plans exactly one history entry, in record order.
//! - A record whose external id occurs earlier in the same batch is compared against
//!   what that earlier record wrote, not the batch's start.
//! - A cart keeps the stage dealsync or an order moved it to (`held_stage`), and a won
//!   deal a follow-up moved on stays there while its source still says won.

use super::{DealUpsert, UpsertOutcome};
use crate::domain::hashing::{self, DealText};
use crate::domain::{ChangeCause, DealStatus, PipelineKey, StageKey, StageRef};
use crate::store::{Result, StoreError, to_ms};
use std::collections::{HashMap, HashSet};

/// A stored deal's state, as a backend reads it before the batch.
#[derive(Debug, Clone)]
pub(in crate::store) struct Existing {
    pub id: i64,
    pub pipeline: Option<String>,
    pub stage: String,
    pub native_stage: String,
    pub contact_email: Option<String>,
    pub content_hash: i64,
    pub source_updated_at: Option<i64>,
    pub stage_entered_at: i64,
    pub status: String,
}

/// Which deal a write or history entry is about: one stored before the batch, or the
/// one the batch's write at that index inserts (its id is known once it is written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store) enum DealRef {
    Stored(i64),
    Inserted(usize),
}

/// One deal row to insert (`deal` is `None`) or update.
pub(in crate::store) struct Write<'a> {
    /// The record, `upserts[record]`: its connection, source and cause.
    pub record: usize,
    pub deal: Option<DealRef>,
    /// The stage the row is written with: the record's, or the one a hold keeps.
    pub target: StageRef,
    /// The status column: `deleted` for a deleted record.
    pub status: DealStatus,
    pub hash: i64,
    /// `stage_entered_at`, unchanged unless the stage changes.
    pub entered_at: i64,
    /// When the record was observed (`synced_at`, `first_seen_at`, `deleted_at`).
    pub observed: i64,
    pub stage_changed: bool,
    pub contact_changed: bool,
    pub text: DealText<'a>,
}

/// A stage-history row to append; its `to` side is `upserts[record]`'s target.
pub(in crate::store) struct HistoryEntry {
    pub record: usize,
    pub deal: DealRef,
    pub at: i64,
    pub from_pipeline: Option<String>,
    pub from_stage: Option<String>,
    pub native_from: Option<String>,
}

/// What a batch does: its writes in record order, then its history rows in record
/// order, and the counts.
pub(in crate::store) struct Plan<'a> {
    pub writes: Vec<Write<'a>>,
    pub history: Vec<HistoryEntry>,
    pub outcome: UpsertOutcome,
}

/// A deal's state while the batch is planned.
struct Current {
    deal: DealRef,
    pipeline: Option<String>,
    stage: String,
    native_stage: String,
    contact_email: Option<String>,
    content_hash: i64,
    source_updated_at: Option<i64>,
    stage_entered_at: i64,
    status: String,
    /// Whether the deal's last history row has cause `followup`.
    followup_moved: bool,
}

impl Current {
    fn stored(existing: Existing, followup_moved: &HashSet<i64>) -> Current {
        Current {
            deal: DealRef::Stored(existing.id),
            followup_moved: followup_moved.contains(&existing.id),
            pipeline: existing.pipeline,
            stage: existing.stage,
            native_stage: existing.native_stage,
            contact_email: existing.contact_email,
            content_hash: existing.content_hash,
            source_updated_at: existing.source_updated_at,
            stage_entered_at: existing.stage_entered_at,
            status: existing.status,
        }
    }

    fn stage(&self) -> StageRef {
        StageRef {
            pipeline: self.pipeline.clone().map(PipelineKey::new),
            stage: StageKey::new(self.stage.clone()),
        }
    }
}

/// The stored deals whose last history cause the plan may need (whether a follow-up
/// moved them): those a record of the batch, not a cart, says are won. A backend reads
/// their causes in one query before planning.
pub(in crate::store) fn followup_candidates(
    upserts: &[DealUpsert],
    stored: &[Option<Existing>],
) -> Vec<i64> {
    let mut ids: Vec<i64> = upserts
        .iter()
        .zip(stored)
        .filter_map(|(upsert, existing)| match existing {
            Some(existing)
                if upsert.source.cart_keys.is_empty()
                    && upsert.status == DealStatus::Won
                    && existing.status == DealStatus::Won.as_str() =>
            {
                Some(existing.id)
            }
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The batch's record positions grouped by connection, in order of first appearance:
/// backends look up stored deals one connection at a time.
pub(in crate::store) fn by_connection(upserts: &[DealUpsert]) -> Vec<(&str, Vec<usize>)> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (index, upsert) in upserts.iter().enumerate() {
        let connection = upsert.connection.as_str();
        match groups.iter_mut().find(|(name, _)| *name == connection) {
            Some((_, positions)) => positions.push(index),
            None => groups.push((connection, vec![index])),
        }
    }
    groups
}

/// Marks the records whose (connection, external id) occurs more than once in the
/// batch: sorted positions, equal neighbours.
fn repeated_keys(upserts: &[DealUpsert]) -> Vec<bool> {
    let key = |index: usize| {
        let upsert = &upserts[index];
        (
            upsert.connection.as_str(),
            upsert.source.external_id.as_str(),
        )
    };
    let mut order: Vec<usize> = (0..upserts.len()).collect();
    order.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
    let mut repeated = vec![false; upserts.len()];
    for pair in order.windows(2) {
        if key(pair[0]) == key(pair[1]) {
            repeated[pair[0]] = true;
            repeated[pair[1]] = true;
        }
    }
    repeated
}

/// The stage an existing cart keeps when an incoming record would move it: `Some` when
/// the record is a cart, says "open", and the stored cart is in a different stage that
/// dealsync or an order put it in. A late checkout update after the purchase, or a
/// repeated "pending" after the cart was abandoned, so changes the cart's fields only.
pub(crate) fn held_stage(
    existing_status: &str,
    existing: &StageRef,
    upsert: &DealUpsert,
) -> Option<(StageRef, DealStatus)> {
    if upsert.source.cart_keys.is_empty() || upsert.status != DealStatus::Open {
        return None;
    }
    let status = DealStatus::parse(existing_status)?;
    if !matches!(
        status,
        DealStatus::Open | DealStatus::Won | DealStatus::Lost
    ) {
        return None;
    }
    if existing == &upsert.target {
        return None;
    }
    Some((existing.clone(), status))
}

/// The stage and status a record is written with when its stored deal holds it: a
/// cart (`held_stage`), or a won deal a follow-up moved on (to post-sale) while its
/// source still says won.
fn hold(current: &Current, upsert: &DealUpsert) -> Option<(StageRef, DealStatus)> {
    if !upsert.source.cart_keys.is_empty() {
        return held_stage(&current.status, &current.stage(), upsert);
    }
    let followup_hold = upsert.status == DealStatus::Won
        && current.status == DealStatus::Won.as_str()
        && current.pipeline.as_deref() == upsert.target.pipeline.as_ref().map(|p| p.as_str())
        && current.stage != upsert.target.stage.as_str()
        && current.followup_moved;
    followup_hold.then(|| (current.stage(), upsert.status))
}

/// Plans the batch `upserts` against `stored` (aligned with `upserts`: each record's
/// deal as stored before the batch) and `followup_moved` (of
/// [`followup_candidates`], the deals whose last history row has cause `followup`).
pub(in crate::store) fn plan<'a>(
    upserts: &'a [DealUpsert],
    mut stored: Vec<Option<Existing>>,
    followup_moved: &HashSet<i64>,
) -> Result<Plan<'a>> {
    let mut outcome = UpsertOutcome::default();
    let mut writes = Vec::with_capacity(upserts.len());
    let mut history = Vec::with_capacity(upserts.len());
    let repeated = repeated_keys(upserts);
    // The state of each repeated key as the batch's earlier records left it.
    let mut batch_state: HashMap<(&str, &str), Option<Current>> = HashMap::new();
    for (index, upsert) in upserts.iter().enumerate() {
        let source = &upsert.source;
        let key = (upsert.connection.as_str(), source.external_id.as_str());
        let fresh;
        let current = if repeated[index] {
            batch_state
                .entry(key)
                .or_insert_with(|| {
                    stored[index]
                        .take()
                        .map(|e| Current::stored(e, followup_moved))
                })
                .as_ref()
        } else {
            fresh = stored[index]
                .take()
                .map(|e| Current::stored(e, followup_moved));
            fresh.as_ref()
        };
        let held = current.and_then(|current| hold(current, upsert));
        let (target, held_status) = held.unwrap_or_else(|| (upsert.target.clone(), upsert.status));
        let status = if source.deleted {
            DealStatus::Deleted
        } else {
            held_status
        };
        let text = DealText::of(source).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let hash = hashing::content_hash(source, &text, &target, held_status);
        if target.is_unmapped() {
            outcome.unmapped += 1;
        }
        let observed = to_ms(upsert.observed_at);
        let changed_at = source
            .stage_changed_at
            .map(to_ms)
            .or(source.updated_at.map(to_ms))
            .unwrap_or(observed);
        let after = |deal: DealRef, entered_at: i64, followup_moved: bool| Current {
            deal,
            pipeline: target.pipeline.as_ref().map(|p| p.as_str().to_owned()),
            stage: target.stage.as_str().to_owned(),
            native_stage: source.native_stage.clone(),
            contact_email: source.contact_email.as_ref().map(|e| e.as_str().to_owned()),
            content_hash: hash,
            source_updated_at: source.updated_at.map(to_ms),
            stage_entered_at: entered_at,
            status: status.as_str().to_owned(),
            followup_moved,
        };
        let written = match current {
            None => {
                let deal = DealRef::Inserted(writes.len());
                history.push(HistoryEntry {
                    record: index,
                    deal,
                    at: changed_at,
                    from_pipeline: None,
                    from_stage: None,
                    native_from: None,
                });
                outcome.created += 1;
                outcome.stage_changes += 1;
                let state = repeated[index].then(|| after(deal, changed_at, false));
                writes.push(Write {
                    record: index,
                    deal: None,
                    target,
                    status,
                    hash,
                    entered_at: changed_at,
                    observed,
                    stage_changed: true,
                    contact_changed: source.contact_email.is_some(),
                    text,
                });
                state
            }
            Some(current) if current.content_hash == hash => {
                outcome.unchanged += 1;
                None
            }
            Some(current)
                if matches!((current.source_updated_at, source.updated_at),
                    (Some(stored), Some(incoming)) if to_ms(incoming) < stored) =>
            {
                outcome.stale += 1;
                None
            }
            Some(current) => {
                let stage_changed = current.pipeline.as_deref()
                    != target.pipeline.as_ref().map(|p| p.as_str())
                    || current.stage != target.stage.as_str();
                let entered_at = if stage_changed {
                    // A stage change can't predate the previous entry.
                    changed_at.max(current.stage_entered_at)
                } else {
                    current.stage_entered_at
                };
                let contact_changed = current.contact_email.as_deref()
                    != source.contact_email.as_ref().map(|e| e.as_str());
                if stage_changed {
                    // A held record never changes stage, so `upserts[index]` is the
                    // record whose target this row moves to.
                    history.push(HistoryEntry {
                        record: index,
                        deal: current.deal,
                        at: entered_at,
                        from_pipeline: current.pipeline.clone(),
                        from_stage: Some(current.stage.clone()),
                        native_from: Some(current.native_stage.clone()),
                    });
                    outcome.stage_changes += 1;
                }
                outcome.updated += 1;
                let followup_moved = if stage_changed {
                    upsert.cause == ChangeCause::Followup
                } else {
                    current.followup_moved
                };
                let state =
                    repeated[index].then(|| after(current.deal, entered_at, followup_moved));
                writes.push(Write {
                    record: index,
                    deal: Some(current.deal),
                    target,
                    status,
                    hash,
                    entered_at,
                    observed,
                    stage_changed,
                    contact_changed,
                    text,
                });
                state
            }
        };
        if let Some(state) = written {
            batch_state.insert(key, Some(state));
        }
    }
    Ok(Plan {
        writes,
        history,
        outcome,
    })
}

impl Write<'_> {
    /// `last_activity_at`: the source's modification time, else when it was observed.
    pub fn last_activity_at(&self, upsert: &DealUpsert) -> i64 {
        upsert.source.updated_at.map_or(self.observed, to_ms)
    }
}
