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

/// One ledger table.
pub(super) struct Ledger {
    table: &'static str,
    /// The partial index on the table's `pending` rows, by `next_attempt_at`.
    pending_index: &'static str,
    /// The states a row may be settled `sent` from.
    sent_from: &'static str,
    /// What else a retry resets (the outbox's claim time, which the per-recipient cap
    /// counts).
    retry_resets: &'static str,
}

/// The follow-up outbox: one row per (deal, rule, step).
pub(super) const OUTBOX: Ledger = Ledger {
    table: "outbox",
    pending_index: "outbox_pending",
    sent_from: "'sending', 'uncertain'",
    retry_resets: ", claimed_at = NULL",
};

/// The daily digests: one row per (rule, local day, recipient).
pub(super) const DIGESTS: Ledger = Ledger {
    table: "digests",
    pending_index: "digests_pending",
    sent_from: "'sending'",
    retry_resets: "",
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

impl Ledger {
    /// `pending` rows due by `now`, earliest first: (id, rule).
    pub(super) fn due(
        &self,
        db: &rusqlite::Connection,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(i64, String)>> {
        let Ledger {
            table,
            pending_index,
            ..
        } = self;
        // INDEXED BY: without statistics the planner would pick the (state, …) index
        // and sort every pending row; the partial index is already in order.
        let mut statement = db.prepare_cached(&format!(
            "SELECT id, rule FROM {table} INDEXED BY {pending_index}
             WHERE state = 'pending' AND next_attempt_at <= ?1
             ORDER BY next_attempt_at LIMIT ?2"
        ))?;
        let rows =
            statement.query_map(params![to_ms(now), limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// When the next `pending` row comes due.
    pub(super) fn next_due(&self, db: &rusqlite::Connection) -> Result<Option<DateTime<Utc>>> {
        let Ledger {
            table,
            pending_index,
            ..
        } = self;
        let next: Option<i64> = db.query_row(
            &format!(
                "SELECT min(next_attempt_at) FROM {table} INDEXED BY {pending_index}
                 WHERE state = 'pending'"
            ),
            [],
            |r| r.get(0),
        )?;
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
        let table = self.table;
        let changed = tx.execute(
            &format!(
                "UPDATE {table} SET state = 'skipped', reason = ?2, updated_at = ?3
                 WHERE id = ?1 AND state = 'pending'"
            ),
            params![id, reason, at_ms],
        )?;
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
        let Ledger {
            table,
            sent_from,
            retry_resets,
            ..
        } = self;
        let at_ms = to_ms(at);
        let changed = match settlement {
            Settlement::Sent { message_id } => tx.execute(
                &format!(
                    "UPDATE {table} SET state = 'sent', message_id = ?2, sent_at = ?3,
                        updated_at = ?3, reason = NULL
                     WHERE id = ?1 AND state IN ({sent_from})"
                ),
                params![id, message_id, at_ms],
            )?,
            Settlement::DryRun { message_id } => tx.execute(
                &format!(
                    "UPDATE {table} SET state = 'skipped', message_id = ?2, updated_at = ?3,
                        reason = '{DRY_RUN}'
                     WHERE id = ?1 AND state = 'sending'"
                ),
                params![id, message_id, at_ms],
            )?,
            Settlement::Retry {
                next_attempt_at,
                reason,
            } => tx.execute(
                &format!(
                    "UPDATE {table} SET state = 'pending', next_attempt_at = ?2, reason = ?3,
                        updated_at = ?4{retry_resets}
                     WHERE id = ?1 AND state = 'sending'"
                ),
                params![id, to_ms(next_attempt_at), reason, at_ms],
            )?,
            Settlement::Uncertain { reason } => tx.execute(
                &format!(
                    "UPDATE {table} SET state = 'uncertain', reason = ?2, updated_at = ?3
                     WHERE id = ?1 AND state = 'sending'"
                ),
                params![id, reason, at_ms],
            )?,
            Settlement::Failed { reason } => tx.execute(
                &format!(
                    "UPDATE {table} SET state = 'failed', reason = ?2, updated_at = ?3
                     WHERE id = ?1 AND state = 'sending'"
                ),
                params![id, reason, at_ms],
            )?,
        };
        Ok(changed == 1)
    }

    /// At start-up: every row left in `sending` becomes `uncertain`. How many did.
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

#[cfg(test)]
mod tests {
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
