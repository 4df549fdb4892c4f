//! The pending ledger the outbox and the digests share: rows that come due at
//! `next_attempt_at`, are claimed before their email is handed over, and are settled
//! once the mailer answers. The two tables differ in what a row is about; how a row
//! moves is written once, here.
//!
//! A row's life ([`OutboxState`]): `pending` → `sending` (claimed) → `sent`, `failed`,
//! `uncertain` or `skipped` (a dry run), or back to `pending` with a later
//! `next_attempt_at` (a retry); a `pending` row may also be `skipped` with its reason.
//!
//! Invariants:
//! - `sending` commits before the message is handed over, and only a row still
//!   `sending` is settled: a row the start-up recovery made `uncertain` never becomes a
//!   retry or a failure (only the outbox takes an `uncertain` row as `sent`).
//! - A row found in `sending` at start-up was interrupted between hand-off and
//!   acknowledgement: it becomes `uncertain` and is never sent again.
//! - The due rows are read through the table's partial index on `pending` rows,
//!   earliest first, so the cost follows the due set, not the table.
//! - Table and index names come from the two constants below, never from input.

use super::postgres::claims::{self, ClaimTable};
use super::{Result, from_ms, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::{ToSql, Transaction, params};
use serde::Serialize;

/// Where a ledger row (an outbox row or a digest) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    Pending,
    Sending,
    Sent,
    Failed,
    Skipped,
    /// Interrupted between SMTP hand-off and acknowledgement; never resent.
    Uncertain,
    /// An expiry that was carried out.
    Done,
}

impl OutboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Sending => "sending",
            OutboxState::Sent => "sent",
            OutboxState::Failed => "failed",
            OutboxState::Skipped => "skipped",
            OutboxState::Uncertain => "uncertain",
            OutboxState::Done => "done",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => OutboxState::Pending,
            "sending" => OutboxState::Sending,
            "sent" => OutboxState::Sent,
            "failed" => OutboxState::Failed,
            "skipped" => OutboxState::Skipped,
            "uncertain" => OutboxState::Uncertain,
            "done" => OutboxState::Done,
            _ => return None,
        })
    }
}

/// One ledger table. Its SQL is written here once for both backends: a statement's
/// numbered placeholders start with the backend's sigil (`?1` in SQLite, `$1` in
/// PostgreSQL, as `DealFilter::query`), and `store::postgres::ledger` runs the same
/// statements on PostgreSQL.
pub(super) struct Ledger {
    table: &'static str,
    /// The partial index on the table's `pending` rows, by `next_attempt_at`.
    pending_index: &'static str,
    /// The states a row may be settled `sent` from.
    sent_from: &'static str,
    /// What else a retry resets (the outbox's claim time, which the per-recipient cap
    /// counts).
    retry_resets: &'static str,
    /// How replicas claim the table's rows on PostgreSQL.
    pub(super) claims: &'static ClaimTable,
}

/// The follow-up outbox: one row per (deal, rule, step).
pub(super) const OUTBOX: Ledger = Ledger {
    table: "outbox",
    pending_index: "outbox_pending",
    sent_from: "'sending', 'uncertain'",
    retry_resets: ", claimed_at = NULL",
    claims: &claims::OUTBOX,
};

/// The daily digests: one row per (rule, local day, recipient).
pub(super) const DIGESTS: Ledger = Ledger {
    table: "digests",
    pending_index: "digests_pending",
    sent_from: "'sending'",
    retry_resets: "",
    claims: &claims::DIGESTS,
};

/// How a claimed row's send ended.
pub(super) enum Settlement<'a> {
    Sent {
        message_id: &'a str,
    },
    /// Rendered and recorded, not sent: the row is `skipped` with the message id.
    DryRun {
        message_id: &'a str,
    },
    /// Back to `pending`, due again at `next_attempt_at`.
    Retry {
        next_attempt_at: DateTime<Utc>,
        reason: &'a str,
    },
    /// The server may have accepted it: never resent.
    Uncertain {
        reason: &'a str,
    },
    Failed {
        reason: &'a str,
    },
}

pub(super) const INTERRUPTED: &str =
    "interrupted between SMTP hand-off and acknowledgement; not resent";
const DRY_RUN: &str = "dry run: rendered and recorded, not sent";

/// A parameter of a ledger statement, for either backend.
#[derive(Debug, Clone)]
pub(super) enum Value<'a> {
    Int(i64),
    Text(&'a str),
    Owned(String),
}

impl ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Value::Int(value) => value.to_sql(),
            Value::Text(value) => value.to_sql(),
            Value::Owned(value) => value.to_sql(),
        }
    }
}

/// A statement and its parameters in placeholder order.
pub(super) type Statement<'a> = (String, Vec<Value<'a>>);

impl Ledger {
    /// The table as the due queries name it: SQLite is told to use the partial index
    /// (without statistics its planner would pick the (state, …) index and sort every
    /// pending row; the partial index is already in order); PostgreSQL has statistics
    /// and no such clause.
    fn pending_rows(&self, sigil: char) -> String {
        let Ledger {
            table,
            pending_index,
            ..
        } = self;
        if sigil == '?' {
            format!("{table} INDEXED BY {pending_index}")
        } else {
            (*table).to_owned()
        }
    }

    /// `pending` rows due by `{sigil}1` (ms), earliest first, at most `{sigil}2`:
    /// (id, rule).
    pub(super) fn due_sql(&self, sigil: char) -> String {
        let rows = self.pending_rows(sigil);
        format!(
            "SELECT id, rule FROM {rows}
             WHERE state = 'pending' AND next_attempt_at <= {sigil}1
             ORDER BY next_attempt_at LIMIT {sigil}2"
        )
    }

    /// The earliest `next_attempt_at` of a `pending` row.
    pub(super) fn next_due_sql(&self, sigil: char) -> String {
        let rows = self.pending_rows(sigil);
        format!("SELECT min(next_attempt_at) FROM {rows} WHERE state = 'pending'")
    }

    /// Skips `pending` row `{sigil}1` with reason `{sigil}2` at `{sigil}3` (ms).
    pub(super) fn skip_sql(&self, sigil: char) -> String {
        let table = self.table;
        format!(
            "UPDATE {table} SET state = 'skipped', reason = {sigil}2, updated_at = {sigil}3
             WHERE id = {sigil}1 AND state = 'pending'"
        )
    }

    /// Records how claimed row `id` ended; only a row still `sending` changes (and, for
    /// the outbox, an `uncertain` one that turns out sent).
    pub(super) fn settle_statement<'a>(
        &self,
        id: i64,
        settlement: &Settlement<'a>,
        at: DateTime<Utc>,
        sigil: char,
    ) -> Statement<'a> {
        let Ledger {
            table,
            sent_from,
            retry_resets,
            ..
        } = self;
        let p = sigil;
        let (id, at) = (Value::Int(id), Value::Int(to_ms(at)));
        match *settlement {
            Settlement::Sent { message_id } => (
                format!(
                    "UPDATE {table} SET state = 'sent', message_id = {p}2, sent_at = {p}3,
                        updated_at = {p}3, reason = NULL
                     WHERE id = {p}1 AND state IN ({sent_from})"
                ),
                vec![id, Value::Text(message_id), at],
            ),
            Settlement::DryRun { message_id } => (
                format!(
                    "UPDATE {table} SET state = 'skipped', message_id = {p}2, updated_at = {p}3,
                        reason = '{DRY_RUN}'
                     WHERE id = {p}1 AND state = 'sending'"
                ),
                vec![id, Value::Text(message_id), at],
            ),
            Settlement::Retry {
                next_attempt_at,
                reason,
            } => (
                format!(
                    "UPDATE {table} SET state = 'pending', next_attempt_at = {p}2, reason = {p}3,
                        updated_at = {p}4{retry_resets}
                     WHERE id = {p}1 AND state = 'sending'"
                ),
                vec![
                    id,
                    Value::Int(to_ms(next_attempt_at)),
                    Value::Text(reason),
                    at,
                ],
            ),
            Settlement::Uncertain { reason } => (
                format!(
                    "UPDATE {table} SET state = 'uncertain', reason = {p}2, updated_at = {p}3
                     WHERE id = {p}1 AND state = 'sending'"
                ),
                vec![id, Value::Text(reason), at],
            ),
            Settlement::Failed { reason } => (
                format!(
                    "UPDATE {table} SET state = 'failed', reason = {p}2, updated_at = {p}3
                     WHERE id = {p}1 AND state = 'sending'"
                ),
                vec![id, Value::Text(reason), at],
            ),
        }
    }

    /// `pending` rows due by `now`, earliest first: (id, rule).
    pub(super) fn due(
        &self,
        db: &rusqlite::Connection,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(i64, String)>> {
        let mut statement = db.prepare_cached(&self.due_sql('?'))?;
        let rows =
            statement.query_map(params![to_ms(now), limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// When the next `pending` row comes due.
    pub(super) fn next_due(&self, db: &rusqlite::Connection) -> Result<Option<DateTime<Utc>>> {
        let next: Option<i64> = db.query_row(&self.next_due_sql('?'), [], |r| r.get(0))?;
        Ok(next.map(from_ms))
    }

    /// `pending` → `sending`: counts the attempt and clears the last reason. `also`
    /// sets more of the row's columns, from parameters `?3` on (`?1` is the id, `?2`
    /// the time).
    pub(super) fn mark_sending(
        &self,
        tx: &Transaction<'_>,
        id: i64,
        at_ms: i64,
        also: &str,
        values: &[&dyn ToSql],
    ) -> Result<()> {
        let table = self.table;
        let mut parameters: Vec<&dyn ToSql> = vec![&id, &at_ms];
        parameters.extend_from_slice(values);
        tx.execute(
            &format!(
                "UPDATE {table} SET state = 'sending', attempts = attempts + 1, updated_at = ?2,
                    reason = NULL{also}
                 WHERE id = ?1"
            ),
            parameters.as_slice(),
        )?;
        Ok(())
    }

    /// Skips a `pending` row with the reason; whether it did.
    pub(super) fn skip(
        &self,
        tx: &Transaction<'_>,
        id: i64,
        reason: &str,
        at_ms: i64,
    ) -> Result<bool> {
        let changed = tx.execute(&self.skip_sql('?'), params![id, reason, at_ms])?;
        Ok(changed == 1)
    }

    /// Records how a claimed row's send ended; only a row still `sending` changes (and,
    /// for the outbox, an `uncertain` one that turns out sent). Whether the row changed.
    pub(super) fn settle(
        &self,
        tx: &Transaction<'_>,
        id: i64,
        settlement: Settlement<'_>,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        let (sql, values) = self.settle_statement(id, &settlement, at, '?');
        let changed = tx.execute(&sql, rusqlite::params_from_iter(values))?;
        Ok(changed == 1)
    }

    /// At start-up: every row left in `sending` becomes `uncertain`. How many did.
    /// (PostgreSQL, where other replicas may be sending, takes only the rows no live
    /// claim holds: `store::postgres::claims`.)
    pub(super) fn recover_interrupted(
        &self,
        tx: &Transaction<'_>,
        at: DateTime<Utc>,
    ) -> Result<u64> {
        let table = self.table;
        let changed = tx.execute(
            &format!(
                "UPDATE {table} SET state = 'uncertain', updated_at = ?1,
                    reason = '{INTERRUPTED}'
                 WHERE state = 'sending'"
            ),
            [to_ms(at)],
        )?;
        Ok(changed as u64)
    }
}

/// Fixtures for the tests of the ledger's users, on either backend.
#[cfg(test)]
pub(super) mod test_sql {
    use super::Value;
    use crate::store::Store;
    use crate::store::postgres::ledger::{params, pg_values};

    /// Runs `sql` (placeholders `?1`…, written `$1`… on PostgreSQL) with `values`.
    pub(in crate::store) async fn exec(store: &Store, sql: &str, values: Vec<Value<'static>>) {
        match store.postgres() {
            Some(database) => {
                let values = pg_values(values);
                let client = database.client().await.unwrap();
                client
                    .execute(&sql.replace('?', "$"), &params(&values))
                    .await
                    .unwrap();
            }
            None => {
                let sql = sql.to_owned();
                store
                    .write(move |tx| {
                        tx.execute(&sql, rusqlite::params_from_iter(values))?;
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! SQLite only: these drive the SQLite functions inside one write transaction. The
    //! statements are shared; on PostgreSQL they run through the `Store` methods whose
    //! tests run on both backends (`store::outbox`, `store::digests`).
    use super::*;
    use crate::store::tests::temp_store;
    use chrono::TimeZone;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, minute, 0).unwrap()
    }

    /// A digest row in `state`, due at `due`; its id.
    fn digest(tx: &Transaction<'_>, recipient: &str, state: &str, due: DateTime<Utc>) -> i64 {
        tx.execute(
            "INSERT INTO digests (rule, day, recipient, state, slot_at, next_attempt_at,
                 created_at, updated_at)
             VALUES ('daily', '2026-03-02', ?1, ?2, ?3, ?3, ?3, ?3)",
            params![recipient, state, to_ms(due)],
        )
        .unwrap();
        tx.last_insert_rowid()
    }

    fn state_of(tx: &Transaction<'_>, id: i64) -> String {
        tx.query_row("SELECT state FROM digests WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
    }

    #[test]
    fn every_state_is_written_as_its_name_and_read_back() {
        let all = [
            (OutboxState::Pending, "pending"),
            (OutboxState::Sending, "sending"),
            (OutboxState::Sent, "sent"),
            (OutboxState::Failed, "failed"),
            (OutboxState::Skipped, "skipped"),
            (OutboxState::Uncertain, "uncertain"),
            (OutboxState::Done, "done"),
        ];
        for (state, name) in all {
            assert_eq!(state.as_str(), name);
            assert_eq!(OutboxState::parse(name), Some(state), "{name}");
            assert_eq!(serde_json::to_value(state).unwrap(), name);
        }
        assert_eq!(OutboxState::parse("Sent"), None);
        assert_eq!(OutboxState::parse(""), None);
    }

    #[tokio::test]
    async fn the_next_due_time_is_the_earliest_pending_row_only() {
        let (_dir, store) = temp_store();
        let next = store
            .write(|tx| {
                assert_eq!(
                    DIGESTS.next_due(tx)?,
                    None,
                    "an empty ledger has nothing due"
                );
                digest(tx, "a@example.com", "sending", at(1));
                digest(tx, "b@example.com", "pending", at(30));
                digest(tx, "c@example.com", "pending", at(20));
                digest(tx, "d@example.com", "failed", at(5));
                DIGESTS.next_due(tx)
            })
            .await
            .unwrap();
        assert_eq!(next, Some(at(20)));
    }

    #[tokio::test]
    async fn only_a_pending_row_is_skipped_and_the_answer_says_whether_it_was() {
        let (_dir, store) = temp_store();
        store
            .write(|tx| {
                let pending = digest(tx, "a@example.com", "pending", at(1));
                let sending = digest(tx, "b@example.com", "sending", at(1));
                assert!(DIGESTS.skip(tx, pending, "no deals", to_ms(at(2)))?);
                assert_eq!(state_of(tx, pending), "skipped");
                assert!(!DIGESTS.skip(tx, sending, "no deals", to_ms(at(2)))?);
                assert_eq!(state_of(tx, sending), "sending");
                assert!(!DIGESTS.skip(tx, pending, "again", to_ms(at(3)))?);
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn only_a_row_still_sending_is_settled_and_the_answer_says_whether_it_was() {
        let (_dir, store) = temp_store();
        store
            .write(|tx| {
                let settlements = |n: usize| -> Settlement<'static> {
                    match n {
                        0 => Settlement::Sent {
                            message_id: "<m@x>",
                        },
                        1 => Settlement::DryRun {
                            message_id: "<m@x>",
                        },
                        2 => Settlement::Retry {
                            next_attempt_at: at(40),
                            reason: "busy",
                        },
                        3 => Settlement::Uncertain { reason: "reset" },
                        _ => Settlement::Failed { reason: "550" },
                    }
                };
                let expected = ["sent", "skipped", "pending", "uncertain", "failed"];
                for (n, want) in expected.iter().enumerate() {
                    let sending = digest(tx, &format!("s{n}@example.com"), "sending", at(1));
                    assert!(
                        DIGESTS.settle(tx, sending, settlements(n), at(2))?,
                        "{want}"
                    );
                    assert_eq!(state_of(tx, sending), *want);
                    // Settled once: the same answer again changes nothing.
                    assert!(
                        !DIGESTS.settle(tx, sending, settlements(n), at(3))?,
                        "{want}"
                    );
                    // A row the start-up recovery made uncertain is never settled as a
                    // digest (only the outbox takes an uncertain row as sent).
                    let uncertain = digest(tx, &format!("u{n}@example.com"), "uncertain", at(1));
                    assert!(!DIGESTS.settle(tx, uncertain, settlements(n), at(2))?);
                    assert_eq!(state_of(tx, uncertain), "uncertain");
                }
                Ok(())
            })
            .await
            .unwrap();
    }
}
