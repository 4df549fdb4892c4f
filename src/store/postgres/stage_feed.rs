//! The stage-history change feed on PostgreSQL: the same contract as `store::stage_feed`
//! (reading after the last id seen, oldest first, misses no committed entry and yields
//! none twice), kept although several replicas write history at once.
//!
//! Why it needs more than `id > after` here: ids come from the identity sequence when
//! a row is inserted, not when its transaction commits. A replica can take id 7, a
//! second take id 8 and commit first; a reader seeing 8 and moving past it would never
//! hand out 7, which becomes visible later.
//!
//! What the feed does instead: it hands out only ids at or below a *settled* horizon,
//! an id at or below which no transaction can still commit a row:
//! 1. `h` = the identity sequence's high-water mark: every id handed out by the
//!    sequence so far is at most `h`, every later one above it.
//! 2. The transactions that hold `stage_history`'s `ROW EXCLUSIVE` lock are listed
//!    (`pg_locks`, by virtual transaction id). An `INSERT` takes that lock before it
//!    draws an id and keeps it until its transaction ends, so a transaction that drew
//!    an id up to `h` and has not ended yet is on the list.
//! 3. The feed waits (polling) until none of the listed transactions holds the lock
//!    any more, i.e. each has committed or rolled back. A lock is released after its
//!    transaction's commit is visible, so a read that starts after this sees every row
//!    at or below `h` that will ever exist.
//!
//! Invariant across replicas: every entry handed out has an id at or below a settled
//! horizon, read after it settled; so once the feed has handed out entries up to `h`,
//! no row at or below `h` can appear afterwards, whoever writes it. A wait longer than
//! [`SETTLE_WAIT`] (a writer holding a transaction open) hands out nothing new this
//! time, which the next read makes up for; the feed never skips.
//!
//! No writer changes and no schema change: the writers' ordinary locks are the
//! bookkeeping. The wait is only for writers already in flight when the read starts;
//! later writers draw ids above `h` and are not waited for.

use super::Database;
use crate::store::deals::Columns;
use crate::store::stage_feed::{STAGE_ENTRY_COLUMNS, StageEntry, stage_entry_from};
use crate::store::{Result, StoreError};
use std::time::Duration;

/// How long a feed read waits at most for the history writers in flight when it
/// started.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// The first and the longest pause between two looks at the writers in flight.
const FIRST_POLL: Duration = Duration::from_millis(2);
const LONGEST_POLL: Duration = Duration::from_millis(100);

impl Database {
    /// The newest settled stage-history id: where the enrollment change feed starts.
    /// Every row at or below it is committed (or never will be). Fails when writers in
    /// flight hold their transactions open past [`SETTLE_WAIT`].
    pub async fn last_history_id(&self) -> Result<i64> {
        self.settled_horizon(SETTLE_WAIT).await?.ok_or_else(|| {
            StoreError::Task(format!(
                "the stage history's writers kept their transactions open for more than {}s; \
                 the follow-up worker tries again on its next pass (look for long \
                 transactions on stage_history in pg_stat_activity if this repeats)",
                SETTLE_WAIT.as_secs()
            ))
        })
    }

    /// Stage entries recorded after `after_id`, oldest first, at most `limit`, none
    /// above the settled horizon; nothing new when the writers in flight are not done
    /// within [`SETTLE_WAIT`].
    pub async fn stage_entries_after(&self, after_id: i64, limit: u32) -> Result<Vec<StageEntry>> {
        self.stage_entries_within(after_id, limit, SETTLE_WAIT)
            .await
    }

    /// [`Database::stage_entries_after`], waiting for the writers in flight at most
    /// `wait`.
    async fn stage_entries_within(
        &self,
        after_id: i64,
        limit: u32,
        wait: Duration,
    ) -> Result<Vec<StageEntry>> {
        let Some(horizon) = self.settled_horizon(wait).await? else {
            return Ok(Vec::new());
        };
        if horizon <= after_id {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {STAGE_ENTRY_COLUMNS} FROM stage_history
                 WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
            ))
            .await?;
        let rows = client
            .query(&statement, &[&after_id, &horizon, &i64::from(limit)])
            .await?;
        Ok(rows
            .iter()
            .map(stage_entry_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// The sequence's high-water mark once every transaction that may hold an id at or
    /// below it has ended; `None` when they have not within `wait`.
    async fn settled_horizon(&self, wait: Duration) -> Result<Option<i64>> {
        let client = self.client().await?;
        // In this order: the writers listed second include every one that drew an id
        // up to the mark read first and has not ended.
        let horizon = high_water_mark(&client).await?;
        let in_flight = history_writers(&client).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = FIRST_POLL;
        let mut waiting = in_flight;
        while !waiting.is_empty() {
            if tokio::time::Instant::now() + pause > deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_POLL);
            let now = history_writers(&client).await?;
            waiting.retain(|writer| now.contains(writer));
        }
        Ok(Some(horizon))
    }
}

/// The largest id the history's identity sequence has handed out (0 before the first):
/// every id drawn later is larger. Sequences are not transactional, so this sees ids
/// drawn by transactions still in flight. The largest committed id counts too, in case
/// the sequence cannot be read (`pg_sequence_last_value` says NULL to a role without
/// privilege on it): the sequence hands out ids in order (cache 1, the identity's
/// default), so every id below a committed one was drawn before it.
async fn high_water_mark(client: &deadpool_postgres::Client) -> Result<i64> {
    let statement = client
        .prepare_cached(
            "SELECT greatest(
                 pg_sequence_last_value(pg_get_serial_sequence('stage_history', 'id')::regclass),
                 (SELECT max(id) FROM stage_history),
                 0)",
        )
        .await?;
    Ok(client.query_one(&statement, &[]).await?.try_get(0)?)
}

/// The virtual transaction ids of the other transactions that hold `stage_history`'s
/// `ROW EXCLUSIVE` lock in this database: those that have inserted (or may be about to
/// insert) history rows and have not ended.
async fn history_writers(client: &deadpool_postgres::Client) -> Result<Vec<String>> {
    let statement = client
        .prepare_cached(
            "SELECT DISTINCT virtualtransaction FROM pg_locks
             WHERE locktype = 'relation' AND granted
               AND mode = 'RowExclusiveLock'
               AND relation = 'stage_history'::regclass
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND pid IS DISTINCT FROM pg_backend_pid()",
        )
        .await?;
    let rows = client.query(&statement, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| row.text(0))
        .collect::<std::result::Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    //! The feed against concurrent writers on one database (raw connections standing
    //! for replicas: a transaction held open is what matters, not who holds it).
    use super::*;
    use crate::store::Store;
    use crate::store::postgres::test_cluster::TestDatabase;
    use crate::store::postgres::test_database;
    use crate::store::postgres::tests::url_of;
    use chrono::Utc;

    /// A transaction on its own connection that inserted one history row of `deal_id`
    /// and has not ended; returns its id.
    async fn open_insert(client: &mut tokio_postgres::Client, deal_id: i64) -> i64 {
        client.batch_execute("BEGIN").await.unwrap();
        client
            .query_one(
                "INSERT INTO stage_history (deal_id, at, to_pipeline, to_stage, native_to, cause)
                 VALUES ($1, 0, 'sales', 'won', 'won', 'poll') RETURNING id",
                &[&deal_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// A store on `database` holding one deal (its entry the feed's first); its id.
    async fn store_with_a_deal(database: &TestDatabase) -> (Store, i64) {
        let store = Store::open_postgres(&url_of(database)).await.unwrap();
        store
            .upsert_deals(vec![crate::store::tests::upsert(
                "1",
                "proposal",
                Utc::now(),
            )])
            .await
            .unwrap();
        let deal_id = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap()
            .id;
        (store, deal_id)
    }

    fn ids(entries: Vec<StageEntry>) -> Vec<i64> {
        entries.into_iter().map(|entry| entry.history_id).collect()
    }

    /// Two writers: the one holding the lower id commits last. The feed does not hand
    /// out the higher id alone (it would then move past the lower one for good): it
    /// waits for the lower one's transaction and hands out both, in id order; with a
    /// short wait it hands out nothing until then. A rolled-back id is passed over.
    #[tokio::test]
    async fn an_entry_whose_transaction_commits_after_a_higher_id_is_not_skipped() {
        let test = "an_entry_whose_transaction_commits_after_a_higher_id_is_not_skipped";
        let Some(database) = test_database(test) else {
            return;
        };
        let (store, deal_id) = store_with_a_deal(&database).await;
        let start = store.last_history_id().await.unwrap();
        let db = store.postgres().unwrap().clone();

        let (mut first, mut second) = (database.admin().await, database.admin().await);
        let lower = open_insert(&mut first, deal_id).await;
        let higher = open_insert(&mut second, deal_id).await;
        assert!(lower > start && higher > lower);
        second.batch_execute("COMMIT").await.unwrap();

        // The lower id's transaction is still open: nothing handed out past `start`.
        let short = Duration::from_millis(50);
        assert!(
            db.stage_entries_within(start, 10, short)
                .await
                .unwrap()
                .is_empty()
        );

        // A read waiting meanwhile gets both once the lower one commits.
        let reader = tokio::spawn({
            let db = db.clone();
            async move { db.stage_entries_after(start, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !reader.is_finished(),
            "the feed did not wait for the lower id"
        );
        first.batch_execute("COMMIT").await.unwrap();
        let entries = reader.await.unwrap().unwrap();
        assert_eq!(ids(entries), [lower, higher]);

        // A rolled-back row leaves a gap the feed passes over once it has ended.
        let mut third = database.admin().await;
        let rolled_back = open_insert(&mut third, deal_id).await;
        let mut fourth = database.admin().await;
        let kept = open_insert(&mut fourth, deal_id).await;
        fourth.batch_execute("COMMIT").await.unwrap();
        assert!(
            db.stage_entries_within(higher, 10, short)
                .await
                .unwrap()
                .is_empty(),
            "nothing past the open transaction's id"
        );
        third.batch_execute("ROLLBACK").await.unwrap();
        let entries = store.stage_entries_after(higher, 10).await.unwrap();
        assert!(rolled_back < kept);
        assert_eq!(ids(entries), [kept]);
        assert_eq!(store.last_history_id().await.unwrap(), kept);
    }

    /// The feed's start waits for the writers in flight too: an entry whose
    /// transaction was open when the worker read its start is handed out later.
    #[tokio::test]
    async fn the_feed_start_is_below_every_entry_still_in_flight() {
        let test = "the_feed_start_is_below_every_entry_still_in_flight";
        let Some(database) = test_database(test) else {
            return;
        };
        let (store, deal_id) = store_with_a_deal(&database).await;
        let mut writer = database.admin().await;
        let open = open_insert(&mut writer, deal_id).await;
        let start = tokio::spawn({
            let store = store.clone();
            async move { store.last_history_id().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !start.is_finished(),
            "the start did not wait for the writer"
        );
        writer.batch_execute("COMMIT").await.unwrap();
        assert_eq!(start.await.unwrap().unwrap(), open);
    }
}
