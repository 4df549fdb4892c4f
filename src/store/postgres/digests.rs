//! The digest ledger (`store::digests`, which documents the contract) on PostgreSQL:
//! a day's assembly, the claim of a due digest with the deals it lists, its finish,
//! and the listings.
//!
//! Invariants across replicas:
//! - A day's digests are assembled once: the assembly first inserts its `digest_runs`
//!   row (`ON CONFLICT DO NOTHING`); a second replica assembling the same (rule, day)
//!   waits on that key until the first commits, inserts nothing and answers
//!   `AlreadyDone`. The digests themselves are unique per (rule, day, recipient).
//! - A due digest is claimed by one replica: locked `FOR UPDATE SKIP LOCKED` while
//!   still `pending`, checked and moved to `sending` (claimed by this replica until
//!   `Options::send_claim_ttl`) in one transaction, committed before the hand-off.

use super::Database;
use super::deals::pg_text;
use super::ledger::{settle_in, skip_in};
use crate::domain::Deal;
use crate::store::deals::{DEAL_COLUMNS, deal_from};
use crate::store::digests::{
    AssembleOutcome, DigestClaim, DigestFinish, DigestRow, DigestRun, DigestWanted, DigestWatch,
    NO_DEAL_LEFT, ROW_COLUMNS, bounce_of, digest_from, longest_waiting, send_claim, settlement_of,
    suppressed_reason, too_late,
};
use crate::store::ledger::DIGESTS;
use crate::store::{Result, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use std::collections::BTreeSet;

/// A watched stage as statement parameters: pipeline, stage, entered before (ms).
fn watched(watch: &DigestWatch) -> (Option<String>, String, i64) {
    (
        watch
            .stage
            .pipeline
            .as_ref()
            .map(|p| pg_text(p.as_str()).into_owned()),
        pg_text(watch.stage.stage.as_str()).into_owned(),
        to_ms(watch.entered_before),
    )
}

/// The recipients with matching deals: lowercased owner addresses, or `fixed` when
/// any deal matches (always, for a rule that watches no stage: a weekly review).
async fn recipients(
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
    for watch in watch {
        let (pipeline, stage, before) = watched(watch);
        match fixed {
            Some(address) => {
                let any = tx
                    .prepare_cached(
                        "SELECT 1 FROM deals WHERE pipeline = $1 AND stage = $2
                           AND stage_entered_at <= $3 AND deleted_at IS NULL LIMIT 1",
                    )
                    .await?;
                if tx
                    .query_opt(&any, &[&pipeline, &stage, &before])
                    .await?
                    .is_some()
                {
                    found.insert(address.to_owned());
                }
            }
            None => {
                let owners = tx
                    .prepare_cached(
                        "SELECT DISTINCT lower(owner_email) FROM deals
                         WHERE pipeline = $1 AND stage = $2 AND stage_entered_at <= $3
                           AND deleted_at IS NULL AND owner_email IS NOT NULL",
                    )
                    .await?;
                for row in tx.query(&owners, &[&pipeline, &stage, &before]).await? {
                    found.insert(row.try_get(0)?);
                }
            }
        }
    }
    Ok(found)
}

/// The matching deals of one recipient (all deals with no owner given): the `limit`
/// longest in their stage, and the total count.
async fn matching_deals(
    db: &impl GenericClient,
    watch: &[DigestWatch],
    owner: Option<&str>,
    limit: usize,
) -> Result<(Vec<Deal>, usize)> {
    const MATCHING: &str = "FROM deals WHERE pipeline = $1 AND stage = $2
        AND stage_entered_at <= $3 AND deleted_at IS NULL
        AND ($4::text IS NULL OR (owner_email IS NOT NULL AND lower(owner_email) = $4))";
    let count = db
        .prepare_cached(&format!("SELECT count(*) {MATCHING}"))
        .await?;
    let list = db
        .prepare_cached(&format!(
            "SELECT {DEAL_COLUMNS} {MATCHING} ORDER BY stage_entered_at, id LIMIT $5"
        ))
        .await?;
    let owner = owner.map(pg_text);
    let limit_rows = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut deals = Vec::new();
    let mut total = 0usize;
    for watch in watch {
        let (pipeline, stage, before) = watched(watch);
        let counted: i64 = db
            .query_one(&count, &[&pipeline, &stage, &before, &owner])
            .await?
            .try_get(0)?;
        total += counted as usize;
        for row in db
            .query(&list, &[&pipeline, &stage, &before, &owner, &limit_rows])
            .await?
        {
            deals.push(deal_from(&row)?);
        }
    }
    Ok((longest_waiting(deals, limit), total))
}

/// The checks of a claimed digest, in the claim's transaction: the send (with the
/// listed ids as stored), or why it is skipped.
async fn check(
    tx: &Transaction<'_>,
    row: DigestRow,
    now: DateTime<Utc>,
    wanted: &DigestWanted<'_>,
) -> Result<std::result::Result<(DigestClaim, String), String>> {
    if let Some(reason) = too_late(&row, now, wanted.grace) {
        return Ok(Err(reason));
    }
    if let Some(reason) = super::suppression::reason_of(tx, &row.recipient).await? {
        return Ok(Err(suppressed_reason(&reason)));
    }
    let owner = wanted.by_owner.then_some(row.recipient.as_str());
    let (deals, total) = matching_deals(tx, wanted.watch, owner, wanted.limit).await?;
    if total == 0 && !wanted.watch.is_empty() {
        return Ok(Err(NO_DEAL_LEFT.to_owned()));
    }
    Ok(Ok(send_claim(row, deals, total)))
}

impl Database {
    /// Assembles a rule's digests for one local day, once (see `Store::assemble_digests`).
    pub(in crate::store) async fn assemble_digests(
        &self,
        run: DigestRun<'_>,
        watch: &[DigestWatch],
        fixed: Option<&str>,
        missed: bool,
    ) -> Result<AssembleOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (rule, day) = (pg_text(run.rule), pg_text(run.day));
        let (slot_at, now) = (to_ms(run.slot_at), to_ms(run.now));
        let outcome = if missed { "missed" } else { "assembled" };
        let claimed = tx
            .execute(
                "INSERT INTO digest_runs (rule, day, slot_at, assembled_at, recipients, outcome)
                 VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT DO NOTHING",
                &[&rule, &day, &slot_at, &now, &outcome],
            )
            .await?;
        if claimed == 0 {
            return Ok(AssembleOutcome::AlreadyDone);
        }
        if missed {
            tx.commit().await?;
            return Ok(AssembleOutcome::Missed);
        }
        let found = recipients(&tx, watch, fixed).await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO digests (rule, day, recipient, state, slot_at, next_attempt_at,
                    created_at, updated_at)
                 VALUES ($1, $2, $3, 'pending', $4, $5, $5, $5) ON CONFLICT DO NOTHING",
            )
            .await?;
        for recipient in &found {
            tx.execute(&insert, &[&rule, &day, &pg_text(recipient), &slot_at, &now])
                .await?;
        }
        tx.execute(
            "UPDATE digest_runs SET recipients = $3 WHERE rule = $1 AND day = $2",
            &[&rule, &day, &(found.len() as i64)],
        )
        .await?;
        tx.commit().await?;
        Ok(AssembleOutcome::Assembled {
            recipients: found.len() as u64,
        })
    }

    /// Claims due digest `id` for `replica` (see `Store::claim_digest`).
    pub(in crate::store) async fn claim_digest(
        &self,
        id: i64,
        now: DateTime<Utc>,
        wanted: DigestWanted<'_>,
        replica: &str,
    ) -> Result<DigestClaim> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let lock = tx
            .prepare_cached(&DIGESTS.claims.lock_pending_sql(ROW_COLUMNS))
            .await?;
        let Some(row) = tx.query_opt(&lock, &[&id]).await? else {
            return Ok(DigestClaim::Gone);
        };
        let claim = match check(&tx, digest_from(&row)?, now, &wanted).await? {
            Err(reason) => {
                skip_in(&tx, &DIGESTS, id, &reason, now).await?;
                DigestClaim::Skipped(reason)
            }
            Ok((claim, ids_json)) => {
                let send = tx
                    .prepare_cached(&DIGESTS.claims.send_locked_sql(", deals = $5"))
                    .await?;
                tx.execute(
                    &send,
                    &[&id, &replica, &to_ms(now), &self.send_claim_ms(), &ids_json],
                )
                .await?;
                claim
            }
        };
        tx.commit().await?;
        Ok(claim)
    }

    /// Records how a claimed digest ended (see `Store::finish_digest`).
    pub(in crate::store) async fn finish_digest(
        &self,
        id: i64,
        finish: &DigestFinish,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = settle_in(&tx, &DIGESTS, id, settlement_of(finish), at).await?;
        if let Some(bounce) = bounce_of(finish)
            && changed
        {
            let email: String = tx
                .query_one("SELECT recipient FROM digests WHERE id = $1", &[&id])
                .await?
                .try_get(0)?;
            super::suppression::insert(&tx, &email, "hard bounce", Some(bounce), at).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The deals a digest would list now for `owner` (all with `None`), and how many
    /// match in all.
    pub(in crate::store) async fn digest_deals(
        &self,
        watch: &[DigestWatch],
        owner: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Deal>, usize)> {
        matching_deals(&self.client().await?, watch, owner, limit).await
    }

    /// Digest rows, newest day first; optionally of one rule.
    pub(in crate::store) async fn digests(
        &self,
        rule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DigestRow>> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM digests WHERE $1::text IS NULL OR rule = $1
             ORDER BY day DESC, rule, recipient LIMIT $2"
        );
        let rows = self
            .client()
            .await?
            .query(&sql, &[&rule.map(pg_text), &i64::from(limit)])
            .await?;
        Ok(rows
            .iter()
            .map(digest_from)
            .collect::<std::result::Result<_, _>>()?)
    }
}
