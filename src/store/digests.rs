//! The digest ledger: one row per (rule, local day, recipient), and one `digest_runs`
//! row per (rule, day) that was assembled or found missed.
//!
//! Invariants:
//! - `UNIQUE (rule, day, recipient)` and the `digest_runs` key: a day's digests are
//!   assembled once, whatever restarts, reloads or a second worker do.
//! - A rule that watches no stage (a weekly review) has one row for its fixed address,
//!   sent whatever the deals; the others only for recipients with matching deals.
//! - Claiming (`pending` → `sending`) re-reads the deals and the suppression list and
//!   applies the decision in one write transaction; `sending` is committed before the
//!   message is handed over, and a row found in `sending` at start-up becomes
//!   `uncertain` (`Store::outbox_recover_interrupted`), never resent.

use super::deals::{Columns, DEAL_COLUMNS, deal_from_row};
use super::ledger::{DIGESTS, OutboxState, Settlement};
use super::{Result, Store, from_ms, to_ms};
use crate::domain::{Deal, StageRef};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::Duration;

/// Which deals a digest lists: those in `stage` that entered it before `entered_before`.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestWatch {
    pub stage: StageRef,
    pub entered_before: DateTime<Utc>,
}

/// One stored digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DigestRow {
    pub id: i64,
    pub rule: String,
    /// The local day, "YYYY-MM-DD".
    pub day: String,
    pub recipient: String,
    pub state: OutboxState,
    pub slot_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub attempts: i64,
    /// The deals the claimed digest listed.
    pub deals: Vec<i64>,
    pub reason: Option<String>,
    pub message_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// The columns [`digest_from`] reads, in its order.
pub(super) const ROW_COLUMNS: &str = "id, rule, day, recipient, state, slot_at, next_attempt_at,
    attempts, deals, reason, message_id, created_at, updated_at, sent_at";

/// Reads a digest row of either backend ([`ROW_COLUMNS`]).
pub(super) fn digest_from<R: Columns>(row: &R) -> Result<DigestRow, R::Error> {
    let state = row.text(4)?;
    let deals = row.text(8)?;
    Ok(DigestRow {
        id: row.int(0)?,
        rule: row.text(1)?,
        day: row.text(2)?,
        recipient: row.text(3)?,
        state: OutboxState::parse(&state).unwrap_or(OutboxState::Uncertain),
        slot_at: from_ms(row.int(5)?),
        next_attempt_at: from_ms(row.int(6)?),
        attempts: row.int(7)?,
        deals: serde_json::from_str(&deals).unwrap_or_default(),
        reason: row.opt_text(9)?,
        message_id: row.opt_text(10)?,
        created_at: from_ms(row.int(11)?),
        updated_at: from_ms(row.int(12)?),
        sent_at: row.opt_int(13)?.map(from_ms),
    })
}

fn row_from(row: &Row<'_>) -> rusqlite::Result<DigestRow> {
    digest_from(row)
}

/// Why a due digest is skipped before anything is read: it is later than `grace`
/// after its slot.
pub(super) fn too_late(row: &DigestRow, now: DateTime<Utc>, grace: Duration) -> Option<String> {
    let late = now - row.slot_at;
    if late > chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX) {
        return Some(format!(
            "{} after its {} slot, more than the late grace of {}: not sent late",
            crate::config::duration::format(late.to_std().unwrap_or_default()),
            row.day,
            crate::config::duration::format(grace)
        ));
    }
    None
}

/// Why a digest to a suppressed recipient is skipped.
pub(super) fn suppressed_reason(reason: &str) -> String {
    format!("recipient is suppressed ({reason})")
}

/// Why a digest whose deals all left is skipped.
pub(super) const NO_DEAL_LEFT: &str = "no matching deal left at send time";

/// The claim of a digest that goes out listing `deals` of `total`: the row as it is
/// once `sending`, and the listed ids as stored (JSON).
pub(super) fn send_claim(
    mut row: DigestRow,
    deals: Vec<Deal>,
    total: usize,
) -> (DigestClaim, String) {
    let ids: Vec<i64> = deals.iter().map(|d| d.id).collect();
    let ids_json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
    row.state = OutboxState::Sending;
    row.attempts += 1;
    row.deals = ids;
    let claim = DigestClaim::Send {
        row: Box::new(row),
        deals,
        total,
    };
    (claim, ids_json)
}

/// The settlement a digest's finish records.
pub(super) fn settlement_of(finish: &DigestFinish) -> Settlement<'_> {
    match finish {
        DigestFinish::Sent { message_id } => Settlement::Sent { message_id },
        DigestFinish::DryRun { message_id } => Settlement::DryRun { message_id },
        DigestFinish::Retry { at, reason } => Settlement::Retry {
            next_attempt_at: *at,
            reason,
        },
        DigestFinish::Uncertain { reason } => Settlement::Uncertain { reason },
        DigestFinish::Failed { reason, .. } => Settlement::Failed { reason },
    }
}

/// The bounce reason to suppress the recipient with, for a hard-bounced digest.
pub(super) fn bounce_of(finish: &DigestFinish) -> Option<&str> {
    match finish {
        DigestFinish::Failed {
            reason,
            suppress: true,
        } => Some(reason),
        _ => None,
    }
}

/// The deals of each watched stage (each list oldest entry first) merged: the `limit`
/// longest in their stage.
pub(super) fn longest_waiting(mut deals: Vec<Deal>, limit: usize) -> Vec<Deal> {
    deals.sort_by(|a, b| {
        a.stage_entered_at
            .cmp(&b.stage_entered_at)
            .then(a.id.cmp(&b.id))
    });
    deals.truncate(limit);
    deals
}

/// The (rule, day) a digest run assembles, at `slot_at`, assembled `now`.
pub(super) struct DigestRun<'a> {
    pub(super) rule: &'a str,
    pub(super) day: &'a str,
    pub(super) slot_at: DateTime<Utc>,
    pub(super) now: DateTime<Utc>,
}

/// What assembling a day did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssembleOutcome {
    /// The day was assembled (or recorded missed) before.
    AlreadyDone,
    /// One pending row per recipient with matching deals.
    Assembled { recipients: u64 },
    /// Recorded as missed: the slot is older than the late grace.
    Missed,
}

/// The result of claiming a digest row.
#[derive(Debug, Clone)]
pub enum DigestClaim {
    /// Not pending any more (another pass took it).
    Gone,
    /// Skipped, with the reason recorded.
    Skipped(String),
    /// Now `sending`: the row, the listed deals (oldest stage entry first, at most the
    /// limit) and how many deals match in all.
    Send {
        row: Box<DigestRow>,
        deals: Vec<Deal>,
        total: usize,
    },
}

/// What a digest claim checks and lists: the late grace, the watched stages, whether
/// the digest lists its recipient's deals only, and at most how many.
pub(super) struct DigestWanted<'a> {
    pub(super) grace: Duration,
    pub(super) watch: &'a [DigestWatch],
    pub(super) by_owner: bool,
    pub(super) limit: usize,
}

/// How a claimed digest ended.
#[derive(Debug, Clone)]
pub enum DigestFinish {
    Sent {
        message_id: String,
    },
    Retry {
        at: DateTime<Utc>,
        reason: String,
    },
    Failed {
        reason: String,
        suppress: bool,
    },
    DryRun {
        message_id: String,
    },
    /// The server may have accepted it: never resent.
    Uncertain {
        reason: String,
    },
}

/// The recipients with matching deals: lowercased owner addresses, or `fixed` when
/// any deal matches (always, for a rule that watches no stage: a weekly review).
fn recipients(
    tx: &Transaction<'_>,
    watch: &[DigestWatch],
    fixed: Option<&str>,
) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    if watch.is_empty() {
        // A weekly review watches no stage: its fixed address gets it whatever the deals.
        found.extend(fixed.map(str::to_owned));
        return Ok(found);
    }
    for watched in watch {
        let pipeline = watched.stage.pipeline.as_ref().map(|p| p.as_str());
        let stage = watched.stage.stage.as_str();
        let before = to_ms(watched.entered_before);
        match fixed {
            Some(address) => {
                let any = tx
                    .prepare_cached(
                        "SELECT 1 FROM deals WHERE pipeline = ?1 AND stage = ?2
                           AND stage_entered_at <= ?3 AND deleted_at IS NULL LIMIT 1",
                    )?
                    .exists(params![pipeline, stage, before])?;
                if any {
                    found.insert(address.to_owned());
                }
            }
            None => {
                let mut statement = tx.prepare_cached(
                    "SELECT DISTINCT lower(owner_email) FROM deals
                     WHERE pipeline = ?1 AND stage = ?2 AND stage_entered_at <= ?3
                       AND deleted_at IS NULL AND owner_email IS NOT NULL",
                )?;
                let rows = statement.query_map(params![pipeline, stage, before], |r| r.get(0))?;
                for row in rows {
                    found.insert(row?);
                }
            }
        }
    }
    Ok(found)
}

/// The matching deals of one recipient (all deals for a fixed address): the `limit`
/// longest in their stage, and the total count.
fn matching_deals(
    tx: &rusqlite::Connection,
    watch: &[DigestWatch],
    owner: Option<&str>,
    limit: usize,
) -> Result<(Vec<Deal>, usize)> {
    let mut deals = Vec::new();
    let mut total = 0usize;
    let owner_filter = if owner.is_some() {
        "AND owner_email IS NOT NULL AND lower(owner_email) = ?4"
    } else {
        "AND ?4 IS NULL"
    };
    for watched in watch {
        let pipeline = watched.stage.pipeline.as_ref().map(|p| p.as_str());
        let stage = watched.stage.stage.as_str();
        let before = to_ms(watched.entered_before);
        let count: i64 = tx
            .prepare_cached(&format!(
                "SELECT count(*) FROM deals WHERE pipeline = ?1 AND stage = ?2
                   AND stage_entered_at <= ?3 AND deleted_at IS NULL {owner_filter}"
            ))?
            .query_row(params![pipeline, stage, before, owner], |r| r.get(0))?;
        total += count as usize;
        let mut statement = tx.prepare_cached(&format!(
            "SELECT {DEAL_COLUMNS} FROM deals WHERE pipeline = ?1 AND stage = ?2
               AND stage_entered_at <= ?3 AND deleted_at IS NULL {owner_filter}
             ORDER BY stage_entered_at, id LIMIT ?5"
        ))?;
        let rows = statement.query_map(
            params![pipeline, stage, before, owner, limit as i64],
            deal_from_row,
        )?;
        for row in rows {
            deals.push(row?);
        }
    }
    Ok((longest_waiting(deals, limit), total))
}

impl Store {
    /// Assembles a rule's digests for one local day, once: one pending row per
    /// recipient with matching deals, due `now`. With `missed`, records the day as
    /// missed instead (the slot passed more than the late grace ago).
    #[allow(clippy::too_many_arguments)]
    pub async fn assemble_digests(
        &self,
        rule: String,
        day: String,
        slot_at: DateTime<Utc>,
        now: DateTime<Utc>,
        watch: Vec<DigestWatch>,
        fixed: Option<String>,
        missed: bool,
    ) -> Result<AssembleOutcome> {
        if let Some(database) = self.postgres() {
            let run = DigestRun {
                rule: &rule,
                day: &day,
                slot_at,
                now,
            };
            return database
                .assemble_digests(run, &watch, fixed.as_deref(), missed)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let done = tx
                .prepare_cached("SELECT 1 FROM digest_runs WHERE rule = ?1 AND day = ?2")?
                .exists(params![rule, day])?;
            if done {
                return Ok(AssembleOutcome::AlreadyDone);
            }
            let now_ms = to_ms(now);
            if missed {
                tx.execute(
                    "INSERT INTO digest_runs (rule, day, slot_at, assembled_at, recipients, outcome)
                     VALUES (?1, ?2, ?3, ?4, 0, 'missed')",
                    params![rule, day, to_ms(slot_at), now_ms],
                )?;
                return Ok(AssembleOutcome::Missed);
            }
            let found = recipients(tx, &watch, fixed.as_deref())?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO digests (rule, day, recipient, state, slot_at,
                        next_attempt_at, created_at, updated_at)
                     VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?5, ?5)",
                )?;
                for recipient in &found {
                    insert.execute(params![rule, day, recipient, to_ms(slot_at), now_ms])?;
                }
            }
            tx.execute(
                "INSERT INTO digest_runs (rule, day, slot_at, assembled_at, recipients, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'assembled')",
                params![rule, day, to_ms(slot_at), now_ms, found.len() as i64],
            )?;
            Ok(AssembleOutcome::Assembled {
                recipients: found.len() as u64,
            })
        })
        .await
    }

    /// Claims a due digest: skips it when it is later than `grace` after its slot,
    /// when the recipient is suppressed, or when no deal matches any more; otherwise
    /// marks it `sending` with the deals it will list.
    pub async fn claim_digest(
        &self,
        id: i64,
        now: DateTime<Utc>,
        grace: Duration,
        watch: Vec<DigestWatch>,
        by_owner: bool,
        limit: usize,
    ) -> Result<DigestClaim> {
        if let Some(database) = self.postgres() {
            let wanted = DigestWanted {
                grace,
                watch: &watch,
                by_owner,
                limit,
            };
            return database
                .claim_digest(id, now, wanted, self.replica().unwrap_or_default())
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let sql = format!("SELECT {ROW_COLUMNS} FROM digests WHERE id = ?1");
            let Some(row) = tx.query_row(&sql, [id], row_from).optional()? else {
                return Ok(DigestClaim::Gone);
            };
            if row.state != OutboxState::Pending {
                return Ok(DigestClaim::Gone);
            }
            let now_ms = to_ms(now);
            let skip = |reason: String| -> Result<DigestClaim> {
                DIGESTS.skip(tx, id, &reason, now_ms)?;
                Ok(DigestClaim::Skipped(reason))
            };
            if let Some(reason) = too_late(&row, now, grace) {
                return skip(reason);
            }
            if let Some(reason) = super::suppression::reason_of(tx, &row.recipient)? {
                return skip(suppressed_reason(&reason));
            }
            let owner = by_owner.then_some(row.recipient.as_str());
            let (deals, total) = matching_deals(tx, &watch, owner, limit)?;
            if total == 0 && !watch.is_empty() {
                return skip(NO_DEAL_LEFT.to_owned());
            }
            let (claim, ids_json) = send_claim(row, deals, total);
            DIGESTS.mark_sending(tx, id, now_ms, ", deals = ?3", &[&ids_json])?;
            Ok(claim)
        })
        .await
    }

    /// Records how a claimed digest ended; only a row still `sending` changes. A hard
    /// bounce suppresses the address in the same transaction.
    pub async fn finish_digest(
        &self,
        id: i64,
        finish: DigestFinish,
        at: DateTime<Utc>,
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .finish_digest(id, &finish, at)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let changed = DIGESTS.settle(tx, id, settlement_of(&finish), at)?;
            if let Some(reason) = bounce_of(&finish)
                && changed
            {
                let email: String =
                    tx.query_row("SELECT recipient FROM digests WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })?;
                super::suppression::insert(tx, &email, "hard bounce", Some(reason), at)?;
            }
            Ok(())
        })
        .await
    }

    /// Skips a pending digest with the reason (its rule is gone).
    pub async fn skip_digest(&self, id: i64, reason: String, at: DateTime<Utc>) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .skip(&DIGESTS, id, &reason, at)
                .await
                .map(drop)
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            DIGESTS.skip(tx, id, &reason, to_ms(at))?;
            Ok(())
        })
        .await
    }

    /// The deals a digest would list now for `owner` (all owners with `None`), and how
    /// many match in all; for `outbox preview`.
    pub async fn digest_deals(
        &self,
        watch: Vec<DigestWatch>,
        owner: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Deal>, usize)> {
        if let Some(database) = self.postgres() {
            return database
                .digest_deals(&watch, owner.as_deref(), limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| matching_deals(db, &watch, owner.as_deref(), limit))
            .await
    }

    /// Pending digests due by `now`, earliest first: (id, rule).
    pub async fn digests_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<(i64, String)>> {
        if let Some(database) = self.postgres() {
            return database
                .due(&DIGESTS, now, limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| DIGESTS.due(db, now, limit)).await
    }

    /// When the next pending digest comes due.
    pub async fn digest_next_due(&self) -> Result<Option<DateTime<Utc>>> {
        if let Some(database) = self.postgres() {
            return database
                .next_due(&DIGESTS)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| DIGESTS.next_due(db)).await
    }

    /// Digest rows, newest day first; optionally of one rule.
    pub async fn digests(&self, rule: Option<String>, limit: u32) -> Result<Vec<DigestRow>> {
        if let Some(database) = self.postgres() {
            return database
                .digests(rule.as_deref(), limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let sql = format!(
                "SELECT {ROW_COLUMNS} FROM digests WHERE ?1 IS NULL OR rule = ?1
                 ORDER BY day DESC, rule, recipient LIMIT ?2"
            );
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(params![rule, limit], row_from)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        ChangeCause, ConnectionName, DealStatus, EmailAddress, PipelineKey, SourceDeal, StageKey,
    };
    use crate::store::DealUpsert;
    use crate::store::both_backends::on_both;
    use crate::store::ledger::test_sql::exec;

    fn proposal() -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new("proposal"),
        }
    }

    async fn put(store: &Store, id: &str, owner: Option<&str>, entered: DateTime<Utc>) -> i64 {
        let mut source = SourceDeal::new(id, format!("Deal {id}"), "p", "s");
        source.owner_email = owner.and_then(EmailAddress::parse);
        source.stage_changed_at = Some(entered);
        source.updated_at = Some(entered);
        store
            .upsert_deals(vec![DealUpsert {
                connection: ConnectionName::new("crm"),
                source,
                target: proposal(),
                status: DealStatus::Open,
                observed_at: entered,
                cause: ChangeCause::Poll,
            }])
            .await
            .unwrap();
        store
            .deal_by_external_id("crm", id)
            .await
            .unwrap()
            .unwrap()
            .id
    }

    #[tokio::test]
    async fn a_day_is_assembled_once_per_owner_with_matching_deals_and_claimed_once() {
        on_both(
            "a_day_is_assembled_once_per_owner_with_matching_deals_and_claimed_once",
            async |store| {
                let now = Utc::now();
                let old = now - chrono::Duration::days(3);
                put(&store, "a1", Some("Alice@Example.com"), old).await;
                put(&store, "a2", Some("alice@example.com"), old).await;
                put(&store, "b1", Some("bob@example.com"), now).await; // not idle long enough
                put(&store, "n1", None, old).await; // no owner
                let watch = vec![DigestWatch {
                    stage: proposal(),
                    entered_before: now - chrono::Duration::days(1),
                }];
                let assemble = || {
                    store.assemble_digests(
                        "daily".into(),
                        "2026-11-27".into(),
                        now,
                        now,
                        watch.clone(),
                        None,
                        false,
                    )
                };
                assert_eq!(
                    assemble().await.unwrap(),
                    AssembleOutcome::Assembled { recipients: 1 }
                );
                assert_eq!(assemble().await.unwrap(), AssembleOutcome::AlreadyDone);
                let due = store.digests_due(now, 10).await.unwrap();
                assert_eq!(due.len(), 1);
                let claim = store
                    .claim_digest(
                        due[0].0,
                        now,
                        Duration::from_secs(60),
                        watch.clone(),
                        true,
                        50,
                    )
                    .await
                    .unwrap();
                let DigestClaim::Send { row, deals, total } = claim else {
                    panic!("expected a send, got {claim:?}");
                };
                assert_eq!(row.recipient, "alice@example.com");
                assert_eq!(total, 2);
                assert_eq!(deals.len(), 2);
                let again = store
                    .claim_digest(due[0].0, now, Duration::from_secs(60), watch, true, 50)
                    .await
                    .unwrap();
                assert!(matches!(again, DigestClaim::Gone));
                // A crash now leaves it `sending`: the next start marks it uncertain. On
                // PostgreSQL only once the crashed replica's claim expired: until then
                // another replica may be sending it, and no start takes it.
                if store.postgres().is_some() {
                    assert_eq!(store.outbox_recover_interrupted(now).await.unwrap(), 0);
                    let expire = "UPDATE digests SET claimed_until = now() - interval '1 second'";
                    exec(&store, expire, vec![]).await;
                }
                assert_eq!(store.outbox_recover_interrupted(now).await.unwrap(), 1);
                let rows = store.digests(None, 10).await.unwrap();
                assert_eq!(rows[0].state, OutboxState::Uncertain);
            },
        )
        .await;
    }

    /// A weekly review watches no stage: its fixed address gets one row per week even
    /// with no deal at all, and the claim sends it (the stalled digests skip a row with
    /// no deal left).
    #[tokio::test]
    async fn a_review_watching_no_stage_is_assembled_for_its_address_and_sent_without_deals() {
        on_both(
            "a_review_watching_no_stage_is_assembled_for_its_address_and_sent_without_deals",
            async |store| {
                let now = Utc::now();
                let assemble = || {
                    store.assemble_digests(
                        "weekly".into(),
                        "2026-11-30".into(),
                        now,
                        now,
                        Vec::new(),
                        Some("ops@example.com".into()),
                        false,
                    )
                };
                assert_eq!(
                    assemble().await.unwrap(),
                    AssembleOutcome::Assembled { recipients: 1 }
                );
                assert_eq!(assemble().await.unwrap(), AssembleOutcome::AlreadyDone);
                let due = store.digests_due(now, 10).await.unwrap();
                assert_eq!(due.len(), 1);
                let claim = store
                    .claim_digest(
                        due[0].0,
                        now,
                        Duration::from_secs(60),
                        Vec::new(),
                        false,
                        50,
                    )
                    .await
                    .unwrap();
                let DigestClaim::Send { row, deals, total } = claim else {
                    panic!("expected a send, got {claim:?}");
                };
                assert_eq!(
                    (row.recipient.as_str(), deals.len(), total),
                    ("ops@example.com", 0, 0)
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_digest_past_its_grace_or_with_no_deal_left_is_skipped_with_the_reason() {
        on_both("a_digest_past_its_grace_or_with_no_deal_left_is_skipped_with_the_reason", async |store| {
            let now = Utc::now();
            put(
                &store,
                "a1",
                Some("alice@example.com"),
                now - chrono::Duration::days(3),
            )
            .await;
            let watch = vec![DigestWatch {
                stage: proposal(),
                entered_before: now - chrono::Duration::days(1),
            }];
            let slot = now - chrono::Duration::hours(2);
            store
                .assemble_digests(
                    "daily".into(),
                    "d1".into(),
                    slot,
                    now,
                    watch.clone(),
                    None,
                    false,
                )
                .await
                .unwrap();
            let (id, _) = store.digests_due(now, 1).await.unwrap()[0].clone();
            let claim = store
                .claim_digest(id, now, Duration::from_secs(3600), watch, true, 50)
                .await
                .unwrap();
            let DigestClaim::Skipped(reason) = claim else {
                panic!("expected a skip, got {claim:?}");
            };
            assert!(reason.contains("not sent late"), "{reason}");

            let none_left = vec![DigestWatch {
                stage: proposal(),
                entered_before: now - chrono::Duration::days(10),
            }];
            store
                .assemble_digests(
                    "fixed".into(),
                    "d1".into(),
                    now,
                    now,
                    vec![DigestWatch {
                        stage: proposal(),
                        entered_before: now,
                    }],
                    Some("team@example.com".into()),
                    false,
                )
                .await
                .unwrap();
            let (id, _) = store.digests_due(now, 1).await.unwrap()[0].clone();
            let claim = store
                .claim_digest(id, now, Duration::from_secs(3600), none_left, false, 50)
                .await
                .unwrap();
            assert!(
                matches!(&claim, DigestClaim::Skipped(reason) if reason.contains("no matching deal")),
                "{claim:?}"
            );
            let missed = store
                .assemble_digests(
                    "daily".into(),
                    "d0".into(),
                    slot,
                    now,
                    Vec::new(),
                    None,
                    true,
                )
                .await
                .unwrap();
            assert_eq!(missed, AssembleOutcome::Missed);
        })
        .await;
    }
}
