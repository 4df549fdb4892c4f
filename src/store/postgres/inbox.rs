//! The webhook inbox's worker side on PostgreSQL: handing due rows out to replicas
//! (claims through `claims::INBOX`), settling them, counts by state, pruning. The
//! contract is that of `store::inbox::processing`, which documents it; `intake` is the
//! webhook handler's side.
//!
//! Invariants across replicas:
//! - Due rows are claimed with `FOR UPDATE SKIP LOCKED`, so replicas share the work and
//!   no row is handed to two replicas (nor applied twice while a claim is in force).
//! - A connection's rows are applied by one replica at a time, in arrival order: the
//!   claim skips a connection another replica holds a row of, or that has a row waiting
//!   for its retry, and claims run one at a time (a transaction-level advisory lock
//!   around the one statement), so each claim sees the claims before it. A replica's
//!   claims are renewed at each of its passes and its unsettled rows handed to it
//!   again, as the single process reads its pending rows again.
//! - Only the replica that holds a row's claim settles it. A settlement from a
//!   replica whose claim expired and was handed to another (it stalled, or was cut off
//!   from the server) changes nothing: the holder's outcome stands. Applying a webhook
//!   twice is harmless (the deal upsert makes the second a no-op); recording two
//!   different outcomes for one row is what the fence prevents.
//! - A replica that dies leaves its claims to expire after `Options::work_claim_ttl` (renewed at each of its passes); its rows are
//!   then claimed again by the others.
//! - Pruning deletes a row and its body in one statement; replicas pruning at once
//!   delete each row once.

use super::claims::{self, INBOX};
use super::{Database, millis};
use crate::store::inbox::{INBOX_ROW_COLUMNS, PruneCutoffs, inbox_row_from};
use crate::store::{InboxCounts, InboxRow, Result, Settlement, to_ms};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// The plans a statement over the inbox's open rows may take, for the rest of its
/// transaction. The open rows change faster than autovacuum's statistics: planned from
/// statistics taken while the inbox was near empty, the claim read every open row
/// through a bitmap and sorted them (35–45 ms a pass with 90,000 rows waiting) where
/// the open rows' index, already in id order, gives the first few hundred; planned
/// from statistics taken during a burst, the pending count read the whole table in a
/// parallel scan (45 ms and 40 MB a count, with two more server processes, on a
/// 220,000-row inbox with a few rows open). Without bitmap, sequential or parallel
/// scans both read that index.
macro_rules! open_rows_plan {
    () => {
        "SET LOCAL enable_bitmapscan = off;
         SET LOCAL enable_seqscan = off;
         SET LOCAL max_parallel_workers_per_gather = 0"
    };
}
pub(super) const OPEN_ROWS_PLAN: &str = open_rows_plan!();

/// What an inbox claim's transaction starts with: the transaction-level advisory lock
/// inbox claims take (key 0x6473_696e_626f_7863, "dsinboxc"), then [`OPEN_ROWS_PLAN`].
pub(super) const INBOX_CLAIM_BEGIN: &str = concat!(
    "SELECT pg_advisory_xact_lock(7238244948933310563);",
    open_rows_plan!()
);

/// The rows `$1` holds, due at `$2` (none behind a row of its connection waiting for
/// its retry), oldest first, at most `$3`.
const HELD_ROWS: &str = "
    SELECT {columns} FROM webhook_inbox AS i JOIN webhook_bodies AS b ON b.id = i.id
     WHERE i.state = 'claimed' AND i.claimed_by = $1
       AND i.connection NOT IN (
           SELECT connection FROM webhook_inbox
            WHERE state = 'pending' AND next_attempt_at IS NOT NULL AND next_attempt_at > $2)
     ORDER BY i.id LIMIT $3";

/// Extends the claims `$1` holds by `$2` milliseconds from the server's now.
/// Rows are locked in id order, as [`HELD_FOR_UPDATE`] locks them, so a renewal and a
/// pass applying its rows never wait for each other in a cycle.
const RENEW: &str = "UPDATE webhook_inbox
    SET claimed_until = clock_timestamp() + $2::bigint * interval '1 millisecond'
  WHERE id IN (SELECT id FROM webhook_inbox
                WHERE state = 'claimed' AND claimed_by = $1 ORDER BY id FOR UPDATE)";

/// Of the rows `$1`, those `$2` still holds under an unexpired claim, locked until the
/// transaction ends (in id order): no other replica can take them meanwhile.
pub(super) const HELD_FOR_UPDATE: &str = "SELECT id FROM webhook_inbox
    WHERE id = ANY($1) AND state = 'claimed' AND claimed_by = $2
      AND claimed_until > clock_timestamp()
    ORDER BY id FOR UPDATE";

impl Database {
    /// Extends the claims `claimer` holds (a pass still working on them), so that no
    /// other replica takes them while it does.
    pub async fn renew_webhook_claims(&self, claimer: &str) -> Result<u64> {
        Ok(self
            .client()
            .await?
            .execute(RENEW, &[&claimer, &millis(self.work_claim_ttl)])
            .await?)
    }

    /// How often a pass renews its claims: a third of their time.
    pub fn webhook_claim_renewal(&self) -> Duration {
        self.work_claim_ttl / 3
    }

    /// Claims rows due at `now` for `claimer` and returns the rows it holds that are
    /// due, oldest first, at most `limit` (see the module's invariants).
    pub async fn due_webhooks(
        &self,
        claimer: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<InboxRow>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(INBOX_CLAIM_BEGIN).await?;
        tx.execute(RENEW, &[&claimer, &millis(self.work_claim_ttl)])
            .await?;
        claims::claim_ids(&*tx, &INBOX, claimer, self.work_claim_ttl, now, limit).await?;
        let held = tx
            .prepare_cached(&HELD_ROWS.replace("{columns}", INBOX_ROW_COLUMNS))
            .await?;
        let rows = tx
            .query(&held, &[&claimer, &to_ms(now), &i64::from(limit)])
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(inbox_row_from)
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Deletes settled rows (with their bodies) and dead letters past their retention;
    /// returns how many rows went.
    pub async fn prune_webhooks(&self, now: DateTime<Utc>) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let cutoffs = PruneCutoffs::at(now);
        let settled = tx
            .prepare_cached(
                "WITH gone AS (
                     DELETE FROM webhook_inbox WHERE state = $1 AND processed_at < $2
                     RETURNING id),
                 bodies AS (DELETE FROM webhook_bodies AS b USING gone WHERE b.id = gone.id)
                 SELECT count(*) FROM gone",
            )
            .await?;
        let mut pruned = 0;
        for (state, cutoff) in cutoffs.settled {
            pruned += tx
                .query_one(&settled, &[&state, &cutoff])
                .await?
                .get::<_, i64>(0);
        }
        pruned += tx
            .execute(
                "DELETE FROM webhook_dead_letters WHERE received_at < $1",
                &[&cutoffs.dead_letters],
            )
            .await? as i64;
        tx.commit().await?;
        Ok(pruned.max(0) as u64)
    }

    /// Inbox rows by state; a claimed row counts as pending.
    pub async fn inbox_counts(&self) -> Result<InboxCounts> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT state, count(*) FROM webhook_inbox GROUP BY state",
                &[],
            )
            .await?;
        let mut counts = InboxCounts::default();
        for row in rows {
            counts.add(&row.try_get::<_, String>(0)?, row.try_get(1)?);
        }
        Ok(counts)
    }

    /// Records how `claimer` is done with rows it claimed, in one transaction; returns
    /// the ids it settled (the rows it still held).
    pub async fn settle_claimed_webhooks(
        &self,
        claimer: &str,
        settlements: &[Settlement],
    ) -> Result<Vec<i64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut settled = Vec::with_capacity(settlements.len());
        for settlement in settlements {
            let (id, changed) = match settlement {
                Settlement::Processed { id, at } => (
                    *id,
                    tx.execute(
                        "UPDATE webhook_inbox SET state = 'processed', processed_at = $3,
                             next_attempt_at = NULL, claimed_by = NULL, claimed_until = NULL
                          WHERE id = $1 AND state = 'claimed' AND claimed_by = $2",
                        &[id, &claimer, &to_ms(*at)],
                    )
                    .await?,
                ),
                Settlement::Retry {
                    id,
                    error,
                    next_attempt_at,
                } => (
                    *id,
                    tx.execute(
                        "UPDATE webhook_inbox SET state = 'pending', attempts = attempts + 1,
                             last_error = $3, next_attempt_at = $4,
                             claimed_by = NULL, claimed_until = NULL
                          WHERE id = $1 AND state = 'claimed' AND claimed_by = $2",
                        &[id, &claimer, error, &to_ms(*next_attempt_at)],
                    )
                    .await?,
                ),
                Settlement::Failed { id, error, at } => (
                    *id,
                    tx.execute(
                        "UPDATE webhook_inbox SET state = 'failed', attempts = attempts + 1,
                             last_error = $3, processed_at = $4, next_attempt_at = NULL,
                             claimed_by = NULL, claimed_until = NULL
                          WHERE id = $1 AND state = 'claimed' AND claimed_by = $2",
                        &[id, &claimer, error, &to_ms(*at)],
                    )
                    .await?,
                ),
            };
            if changed == 1 {
                settled.push(id);
            }
        }
        tx.commit().await?;
        Ok(settled)
    }
}

#[cfg(test)]
mod tests {
    use super::super::claims::INBOX;
    use super::super::intake::Intake;
    use super::super::tests::url_of;
    use super::super::{Options, test_database};
    use super::*;
    use chrono::Utc;
    use std::time::Duration;

    /// Rows claimed by one replica are settled by it alone: another replica's
    /// settlement changes nothing, a retried row is due again at its time, and a
    /// replica whose claim expired and was handed on cannot overwrite the new holder's
    /// outcome.
    #[tokio::test]
    async fn only_the_claims_holder_settles_a_row() {
        let Some(test) = test_database("only_the_claims_holder_settles_a_row") else {
            return;
        };
        let database = Database::open(&url_of(&test), &Options::default())
            .await
            .unwrap();
        let intake = Intake::start(database.clone()).await.unwrap();
        for id in ["a", "b", "c", "d"] {
            let event = crate::store::tests::webhook("shop", id);
            intake.enqueue(event).await.unwrap();
        }
        let now = Utc::now();
        let minute = Duration::from_secs(60);
        let claimed = database.claim(&INBOX, "one", minute, now, 3).await.unwrap();
        let [a, b, c] = claimed.ids[..] else {
            panic!("{claimed:?}");
        };
        let later = now + chrono::Duration::minutes(5);
        let settle = |id| {
            [
                Settlement::Processed { id, at: now },
                Settlement::Retry {
                    id: b,
                    error: "vendor 500".into(),
                    next_attempt_at: later,
                },
                Settlement::Failed {
                    id: c,
                    error: "unusable".into(),
                    at: now,
                },
            ]
        };
        let by_other = database
            .settle_claimed_webhooks("two", &settle(a))
            .await
            .unwrap();
        assert!(by_other.is_empty(), "{by_other:?}");
        let by_holder = database
            .settle_claimed_webhooks("one", &settle(a))
            .await
            .unwrap();
        assert_eq!(by_holder, [a, b, c]);
        let states: Vec<(String, i64, Option<String>)> = test
            .admin()
            .await
            .query(
                "SELECT state, attempts, last_error FROM webhook_inbox
                  WHERE id = ANY($1) ORDER BY id",
                &[&vec![a, b, c]],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(
            states,
            [
                ("processed".into(), 0, None),
                ("pending".into(), 1, Some("vendor 500".into())),
                ("failed".into(), 1, Some("unusable".into())),
            ]
        );
        // Not due before its retry time, and d waits behind it (same connection);
        // both due at it, in order.
        let early = database
            .claim(&INBOX, "two", minute, now, 10)
            .await
            .unwrap();
        assert!(early.ids.is_empty(), "d waits for b: {early:?}");
        let due = database
            .claim(&INBOX, "two", minute, later, 10)
            .await
            .unwrap();
        let d = c + 1;
        assert_eq!(due.ids, [b, d]);

        // A claim that expired and was handed on: the first holder's word is void.
        let short = Duration::from_millis(1);
        let stalled = database
            .claim(&INBOX, "three", short, later, 10)
            .await
            .unwrap();
        assert!(
            stalled.ids.is_empty(),
            "b and d are held by two: {stalled:?}"
        );
        test.admin()
            .await
            .execute(
                "UPDATE webhook_inbox SET claimed_until = clock_timestamp() - interval '1 s'
                  WHERE id = $1",
                &[&b],
            )
            .await
            .unwrap();
        // b's claim expired: handed on, although two still holds d of its connection
        // (an expired claim goes to the next claimer whatever its connection).
        let handed_on = database
            .claim(&INBOX, "three", minute, later, 10)
            .await
            .unwrap();
        assert_eq!(handed_on.ids, [b]);
        let late = database
            .settle_claimed_webhooks("two", &[Settlement::Processed { id: b, at: later }])
            .await
            .unwrap();
        assert!(late.is_empty(), "the expired holder settled {late:?}");
        let current = database
            .settle_claimed_webhooks("three", &[Settlement::Processed { id: b, at: later }])
            .await
            .unwrap();
        assert_eq!(current, [b]);
    }

    /// Two replicas (two `Store`s on one database) taking due webhooks at once: each
    /// row is handed to one of them and settled once, and a connection's rows are
    /// handed out in arrival order across both.
    #[tokio::test]
    async fn two_replicas_take_due_webhooks_and_each_row_goes_to_one() {
        use crate::store::Store;
        use std::collections::{HashMap, HashSet};
        use std::sync::{Arc, Mutex};
        let Some(test) = test_database("two_replicas_take_due_webhooks_and_each_row_goes_to_one")
        else {
            return;
        };
        let url = url_of(&test);
        let one = Store::open_postgres(&url).await.unwrap();
        let two = Store::open_postgres(&url).await.unwrap();
        let mut all = HashSet::new();
        for n in 0..300 {
            let connection = format!("shop-{}", n % 12);
            let event = crate::store::tests::webhook(&connection, &format!("d{n}"));
            one.enqueue_webhook(event).await.unwrap();
        }
        for row in one.due_webhooks(Utc::now(), 0).await.unwrap() {
            all.insert(row.id);
        }
        assert!(all.is_empty(), "a limit of 0 hands nothing out");
        // The order rows were handed out in, across both replicas.
        let handed: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let take = |store: Store| {
            let handed = handed.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let rows = store.due_webhooks(Utc::now(), 7).await.unwrap();
                    if rows.is_empty() {
                        if store.inbox_counts().await.unwrap().pending == 0 {
                            return mine;
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    handed
                        .lock()
                        .unwrap()
                        .extend(rows.iter().map(|row| (row.connection.clone(), row.id)));
                    let settlements = rows
                        .iter()
                        .map(|row| Settlement::Processed {
                            id: row.id,
                            at: Utc::now(),
                        })
                        .collect();
                    store.settle_webhooks(settlements).await.unwrap();
                    mine.extend(rows.iter().map(|row| row.id));
                }
            })
        };
        let (a, b) = (take(one.clone()), take(two.clone()));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(
            !a.is_empty() && !b.is_empty(),
            "both replicas worked: {a:?} {b:?}"
        );
        let (a_set, b_set): (HashSet<i64>, HashSet<i64>) =
            (a.iter().copied().collect(), b.iter().copied().collect());
        assert_eq!(a_set.len(), a.len(), "no row twice to one replica");
        assert_eq!(b_set.len(), b.len(), "no row twice to one replica");
        assert!(a_set.is_disjoint(&b_set), "no row to both replicas");
        assert_eq!(a.len() + b.len(), 300);
        let mut last: HashMap<String, i64> = HashMap::new();
        for (connection, id) in handed.lock().unwrap().iter() {
            let before = last.insert(connection.clone(), *id).unwrap_or(0);
            assert!(before < *id, "{connection}: {id} handed out after {before}");
        }
        let counts = one.inbox_counts().await.unwrap();
        assert_eq!((counts.pending, counts.processed), (0, 300));
    }

    /// Shared buffers a statement's plan node touched, run with `EXPLAIN (ANALYZE,
    /// BUFFERS)`: the first node at or after the line holding `node` (its figures
    /// include its children's).
    async fn buffers(
        client: &tokio_postgres::Client,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        node: &str,
    ) -> u64 {
        let explain = format!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
        let lines: Vec<String> = client
            .query(&explain, params)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let figures = lines
            .iter()
            .skip_while(|line| !line.contains(node))
            .find_map(|line| line.trim().strip_prefix("Buffers: shared "))
            .unwrap_or_else(|| panic!("no buffers for {node} in {lines:#?}"));
        figures
            .split_whitespace()
            .filter_map(|figure| figure.split_once('='))
            .filter(|(kind, _)| matches!(*kind, "hit" | "read"))
            .map(|(_, blocks)| blocks.parse::<u64>().unwrap())
            .sum()
    }

    /// Planned from statistics taken while the inbox was empty (autovacuum lags a
    /// burst), a claim of 256 rows out of 20,000 waiting reads the first rows of the
    /// open rows' index, not all of them: before, it read every open row through a
    /// bitmap and sorted them, every pass.
    #[tokio::test]
    async fn a_claim_planned_from_stale_statistics_reads_only_the_rows_it_takes() {
        let name = "a_claim_planned_from_stale_statistics_reads_only_the_rows_it_takes";
        let Some(test) = test_database(name) else {
            return;
        };
        Database::open(&url_of(&test), &Options::default())
            .await
            .unwrap();
        let admin = test.admin().await;
        for statement in [
            "ALTER TABLE webhook_inbox SET (autovacuum_enabled = false)",
            "ANALYZE webhook_inbox",
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 SELECT 'shop', 'burst-' || n, n FROM generate_series(1, 20000) AS n",
            "BEGIN",
            INBOX_CLAIM_BEGIN,
        ] {
            admin.batch_execute(statement).await.unwrap();
        }
        let claim = INBOX.claim_sql();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&"one", &60_000i64, &to_ms(Utc::now()), &256i64];
        let claimed = buffers(&admin, &claim, &params, "CTE due").await;
        admin.batch_execute("COMMIT").await.unwrap();
        // A page visit per row it locks, and a few of the index.
        assert!(
            claimed < 256 + 50,
            "finding 256 due rows touched {claimed} pages"
        );
        let held: i64 = admin
            .query_one(
                "SELECT count(*) FROM webhook_inbox WHERE state = 'claimed' AND id <= 256",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(held, 256, "the oldest rows, in id order");
    }

    /// A worker's claim and the intake's pending count read the open rows, not every
    /// row the inbox keeps: with 20,000 processed rows kept (and statistics taken
    /// while they were pending, as autovacuum takes them under load), each touches a
    /// few pages. Before, the claim walked the primary key over the processed rows and
    /// the count scanned the table, growing with the retention, not the work.
    #[tokio::test]
    async fn a_claim_and_the_pending_count_read_only_the_open_rows() {
        let name = "a_claim_and_the_pending_count_read_only_the_open_rows";
        let Some(test) = test_database(name) else {
            return;
        };
        let database = Database::open(&url_of(&test), &Options::default())
            .await
            .unwrap();
        let admin = test.admin().await;
        for statement in [
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 SELECT 'shop', 'kept-' || n, n FROM generate_series(1, 20000) AS n",
            "ANALYZE webhook_inbox",
            "UPDATE webhook_inbox SET state = 'processed', processed_at = 1",
            "VACUUM webhook_inbox",
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 SELECT 'shop', 'new-' || n, n FROM generate_series(1, 3) AS n",
        ] {
            admin.batch_execute(statement).await.unwrap();
        }
        let claim = INBOX.claim_sql();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&"one", &60_000i64, &to_ms(Utc::now()), &256i64];
        // The rows due (the claim's locking query); the update of the rows found is
        // by id, planned by the table's size.
        let claimed = buffers(&admin, &claim, &params, "CTE due").await;
        let counted = buffers(&admin, super::super::intake::COUNT_PENDING, &[], "").await;
        assert!(claimed < 40, "finding the due rows touched {claimed} pages");
        assert!(counted < 40, "the count touched {counted} pages");
        // And the claim took the three new rows.
        let counts = database.inbox_counts().await.unwrap();
        assert_eq!((counts.pending, counts.processed), (3, 20_000));
        let held: i64 = admin
            .query_one(
                "SELECT count(*) FROM webhook_inbox WHERE state = 'claimed' AND claimed_by = 'one'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(held, 3);
    }
}
