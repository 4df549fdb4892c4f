//! Claims: replicas sharing the rows of a work table (the webhook inbox, the outbox,
//! the digests, the CRM write-backs) with `FOR UPDATE SKIP LOCKED`, so that each due row goes to one
//! replica and none waits for another. The inbox's `due_webhooks` claims through
//! [`INBOX`] (`postgres::inbox`, which serializes its claims to keep each connection's
//! order); the outbox and digests lock a due row through [`ClaimTable::lock_pending_sql`]
//! and move it to `sending` with [`ClaimTable::send_locked_sql`] in their claim's
//! transaction (`postgres::outbox`, `postgres::digests`).
//!
//! An inbox claim moves a due row to `claimed`, by `claimed_by` until `claimed_until`
//! (`clock_timestamp() + ttl`, the server's clock); its replica then works on it and
//! settles it. A ledger row (outbox, digest) goes from `pending` straight to `sending`,
//! claimed the same way, in the transaction that decided to send it, before its email
//! is handed to the SMTP server.
//!
//! The reclaim rule, when a claim expires (its replica died or stalled):
//! - an inbox row still `claimed` is due again, and the next claim hands it out;
//! - a ledger row in `sending` may have been sent: it becomes `uncertain` and is never
//!   handed out again (`expire_sending_sql`), as the single process does at start-up
//!   (`store::ledger`).
//!
//! Invariants:
//! - One statement claims a batch: the due rows are locked `FOR UPDATE SKIP LOCKED`
//!   in a materialized CTE and updated by id, so two replicas never get the same row
//!   and neither waits for the rows the other is claiming.
//! - A row's due time (`next_attempt_at`, epoch milliseconds as the rest of the
//!   schema) is compared with the caller's `now`, the clock that wrote it; a claim's
//!   expiry only ever with the server's clock.
//! - Only the holder of an unexpired claim settles an inbox row
//!   (`postgres::inbox`), so a replica whose claim expired and was handed to another
//!   cannot record a second outcome.
//! - The SQL of the four tables is one template, filled from [`ClaimTable`]. A
//!   write-back is claimed as the inbox is (`claimed`, handed out again once expired);
//!   `postgres::writeback` counts its attempt in the claim's transaction.

use super::super::Result;
use super::{Database, millis};
use crate::store::ledger::INTERRUPTED;
use crate::store::to_ms;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// What becomes of a row whose claim expired in `sending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// The table has no `sending` state (the inbox: applying a webhook twice is
    /// harmless, the upsert makes it a no-op).
    None,
    /// `sending` → `uncertain`, never handed out again (an email may have gone).
    BecomesUncertain,
}

/// A table whose rows replicas claim. Names and SQL fragments are constants, never
/// input.
#[derive(Debug)]
pub struct ClaimTable {
    table: &'static str,
    /// When a row is due, `$3` being the caller's now in epoch milliseconds.
    due: &'static str,
    /// The order due rows are claimed in.
    order: &'static str,
    sending: Sending,
    /// What `begin_send` sets besides the state (`$3`: now in epoch milliseconds).
    on_send: &'static str,
}

/// The webhook inbox: `pending` rows whose retry time has come, oldest first, of
/// connections that have no row waiting for its retry (their order is kept) and none
/// claimed by another replica (one replica at a time applies a connection's rows).
pub const INBOX: ClaimTable = ClaimTable {
    table: "webhook_inbox",
    due: "state = 'pending' AND coalesce(next_attempt_at, 0) <= $3
          AND connection NOT IN (
              SELECT connection FROM webhook_inbox
               WHERE state = 'pending' AND next_attempt_at IS NOT NULL
                 AND next_attempt_at > $3)
          AND connection NOT IN (
              SELECT connection FROM webhook_inbox
               WHERE state = 'claimed' AND claimed_by <> $1
                 AND claimed_until >= clock_timestamp())",
    order: "id",
    sending: Sending::None,
    on_send: "",
};

/// The follow-up outbox: `pending` rows due by now, earliest first.
pub const OUTBOX: ClaimTable = ClaimTable {
    table: "outbox",
    due: "state = 'pending' AND next_attempt_at <= $3",
    order: "next_attempt_at, id",
    sending: Sending::BecomesUncertain,
    // The claim time is what the per-recipient cap counts, as in `store::outbox`.
    on_send: ", attempts = attempts + 1, updated_at = $3, reason = NULL, claimed_at = $3",
};

/// The daily digests: `pending` rows due by now, earliest first.
pub const DIGESTS: ClaimTable = ClaimTable {
    table: "digests",
    due: "state = 'pending' AND next_attempt_at <= $3",
    order: "next_attempt_at, id",
    sending: Sending::BecomesUncertain,
    on_send: ", attempts = attempts + 1, updated_at = $3, reason = NULL",
};

/// The CRM write-backs (`store::writeback`): `pending` rows due by now, earliest
/// first. A claim that expired while `claimed` is handed out again: its next attempt
/// looks the note up before writing, so a second claim never writes a second note.
pub const WRITEBACKS: ClaimTable = ClaimTable {
    table: "writebacks",
    due: "state = 'pending' AND next_attempt_at <= $3",
    order: "next_attempt_at, id",
    sending: Sending::None,
    on_send: "",
};

/// What one claim returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The rows now claimed by the caller, in claim order.
    pub ids: Vec<i64>,
    /// Rows found in `sending` with an expired claim, made `uncertain` first.
    pub made_uncertain: Vec<i64>,
}

impl ClaimTable {
    /// The claim: `$1` claimer, `$2` ttl in ms, `$3` now in ms, `$4` how many.
    pub(super) fn claim_sql(&self) -> String {
        let ClaimTable {
            table, due, order, ..
        } = self;
        // MATERIALIZED: the locking subquery runs once, whatever plan the UPDATE gets.
        format!(
            "WITH due AS MATERIALIZED (
                 SELECT id FROM {table}
                  WHERE ({due}) OR (state = 'claimed' AND claimed_until < clock_timestamp())
                  ORDER BY {order}
                  LIMIT $4
                  FOR UPDATE SKIP LOCKED)
             UPDATE {table} AS t SET state = 'claimed', claimed_by = $1,
                 claimed_until = clock_timestamp() + $2::bigint * interval '1 millisecond'
               FROM due WHERE t.id = due.id
             RETURNING t.id"
        )
    }

    /// Expired `sending` rows → `uncertain`; `$1` now in ms. A `sending` row no claim
    /// holds (copied from a SQLite install, where it was left by a crash) counts as
    /// expired: every replica that sends holds a claim until it settles.
    pub(in crate::store) fn expire_sending_sql(&self) -> Option<String> {
        let table = self.table;
        match self.sending {
            Sending::None => None,
            // SKIP LOCKED: a row being settled by its (late) sender is left to it.
            Sending::BecomesUncertain => Some(format!(
                "WITH lost AS MATERIALIZED (
                     SELECT id FROM {table}
                      WHERE state = 'sending'
                        AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
                      FOR UPDATE SKIP LOCKED)
                 UPDATE {table} AS t SET state = 'uncertain', updated_at = $1,
                     reason = '{INTERRUPTED}', claimed_by = NULL, claimed_until = NULL
                   FROM lost WHERE t.id = lost.id
                 RETURNING t.id"
            )),
        }
    }

    /// What going to `sending` sets: the claim by `$2` for `$4` ms from the server's
    /// now, and the table's `on_send` (`$3`: now in ms).
    fn sending_set(&self) -> String {
        let on_send = self.on_send;
        format!(
            "state = 'sending', claimed_by = $2,
                 claimed_until = clock_timestamp() + $4::bigint * interval '1 millisecond'{on_send}"
        )
    }

    /// Locks `pending` row `$1` of a ledger table for the caller's transaction, reading
    /// `columns`; no row when it is not pending or another replica is claiming it
    /// (`SKIP LOCKED`: never waited for, never taken twice).
    pub(in crate::store) fn lock_pending_sql(&self, columns: &str) -> String {
        let table = self.table;
        format!(
            "SELECT {columns} FROM {table} WHERE id = $1 AND state = 'pending'
             FOR UPDATE SKIP LOCKED"
        )
    }

    /// The row locked by [`ClaimTable::lock_pending_sql`] → `sending`, claimed by `$2`
    /// (`$1` id, `$2` claimer, `$3` now in ms, `$4` how long the send may
    /// take in ms); `also` sets more columns, from `$5` on.
    pub(in crate::store) fn send_locked_sql(&self, also: &str) -> String {
        let (table, sending) = (self.table, self.sending_set());
        format!("UPDATE {table} SET {sending}{also} WHERE id = $1 AND state = 'pending'")
    }
}

/// The claim statement of [`Database::claim`] on `client` (a connection, or a
/// transaction the caller holds): the ids claimed, in claim order.
pub(super) async fn claim_ids(
    client: &impl tokio_postgres::GenericClient,
    table: &ClaimTable,
    claimer: &str,
    ttl: Duration,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<i64>> {
    let rows = client
        .query(
            &table.claim_sql(),
            &[&claimer, &millis(ttl), &to_ms(now), &i64::from(limit)],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

impl Database {
    /// Claims up to `limit` due rows of `table` for `claimer` for `ttl`: rows due by
    /// `now`, and rows whose claim expired while `claimed`. First makes the expired
    /// `sending` rows `uncertain` (ledger tables). Rows another replica is claiming at
    /// the same moment are skipped, not waited for.
    pub async fn claim(
        &self,
        table: &ClaimTable,
        claimer: &str,
        ttl: Duration,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Claimed> {
        let client = self.client().await?;
        let now_ms = to_ms(now);
        let mut claimed = Claimed::default();
        if let Some(sql) = table.expire_sending_sql() {
            let rows = client.query(&sql, &[&now_ms]).await?;
            claimed.made_uncertain = rows.iter().map(|row| row.get(0)).collect();
            if !claimed.made_uncertain.is_empty() {
                tracing::warn!(
                    table = table.table,
                    rows = claimed.made_uncertain.len(),
                    "claims expired while sending: rows made uncertain, not resent"
                );
            }
        }
        claimed.ids = claim_ids(&**client, table, claimer, ttl, now, limit).await?;
        Ok(claimed)
    }
}
