//! The CRM write-back queue on PostgreSQL (`store::writeback` holds the contract and
//! the SQL both backends share). Replicas claim rows through
//! [`claims::WRITEBACKS`](super::claims::WRITEBACKS), `FOR UPDATE SKIP LOCKED`, for
//! `storage.failover_after`; only the claim's holder settles a row.

use super::Database;
use super::claims::{WRITEBACKS, claim_ids};
use crate::store::writeback::{
    Cells, JOB_COLUMNS, ROW_COLUMNS, WritebackCount, WritebackJob, WritebackRow,
    WritebackSettlement, enqueue_sql, job_from, key_of, row_from, settle_sql, settle_values,
};
use crate::store::{Result, to_ms};
use chrono::{DateTime, Utc};

impl Cells for tokio_postgres::Row {
    fn int(&self, at: usize) -> Result<i64> {
        Ok(self.try_get(at)?)
    }
    fn text(&self, at: usize) -> Result<String> {
        Ok(self.try_get(at)?)
    }
    fn maybe_int(&self, at: usize) -> Result<Option<i64>> {
        Ok(self.try_get(at)?)
    }
    fn maybe_text(&self, at: usize) -> Result<Option<String>> {
        Ok(self.try_get(at)?)
    }
}

/// Queues the write-back of outbox row `outbox_id` in the caller's transaction (the
/// one that marks the email sent).
pub(in crate::store) async fn enqueue_in(
    tx: &tokio_postgres::Transaction<'_>,
    outbox_id: i64,
    subject: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    tx.execute(
        &enqueue_sql('$'),
        &[&outbox_id, &key_of(outbox_id), &subject, &to_ms(at)],
    )
    .await?;
    Ok(())
}

impl Database {
    /// Claims up to `limit` due write-backs for `claimer` and counts an attempt for
    /// each, in one transaction.
    pub(in crate::store) async fn claim_writebacks(
        &self,
        claimer: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WritebackJob>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids = claim_ids(&*tx, &WRITEBACKS, claimer, self.work_claim_ttl, now, limit).await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let rows = tx
            .query(
                &format!(
                    "UPDATE writebacks SET attempts = attempts + 1, updated_at = $3
                     WHERE id = ANY($1) AND claimed_by = $2
                     RETURNING {JOB_COLUMNS}"
                ),
                &[&ids, &claimer, &to_ms(now)],
            )
            .await?;
        tx.commit().await?;
        let mut jobs = rows.iter().map(job_from).collect::<Result<Vec<_>>>()?;
        // In claim order, as SQLite hands them out.
        jobs.sort_by_key(|job| ids.iter().position(|id| *id == job.id));
        Ok(jobs)
    }

    /// Settles write-back `id` if `holder` still holds its claim.
    pub(in crate::store) async fn settle_writeback(
        &self,
        holder: &str,
        id: i64,
        settlement: &WritebackSettlement,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let client = self.client().await?;
        let (state, next, reason, remote_id) = settle_values(settlement);
        let changed = client
            .execute(
                &settle_sql('$', " AND claimed_by = $7"),
                &[
                    &id,
                    &state,
                    &to_ms(now),
                    &next,
                    &reason,
                    &remote_id,
                    &holder,
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    pub(in crate::store) async fn deal_writebacks(
        &self,
        deal_id: i64,
    ) -> Result<Vec<WritebackRow>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {ROW_COLUMNS} FROM writebacks WHERE deal_id = $1 ORDER BY id"),
                &[&deal_id],
            )
            .await?;
        rows.iter().map(row_from).collect()
    }

    pub(in crate::store) async fn writeback_counts(&self) -> Result<Vec<WritebackCount>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT connection, state, count(*) FROM writebacks
                 GROUP BY connection, state
                 ORDER BY connection COLLATE \"C\", state COLLATE \"C\"",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(WritebackCount {
                    connection: row.try_get(0)?,
                    state: row.try_get(1)?,
                    rows: row.try_get::<_, i64>(2)?.max(0) as u64,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::store::postgres::tests::url_of;
    use crate::store::postgres::{Options, test_database};
    use crate::store::writeback::tests::seed_sent_email;
    use crate::store::{Store, WritebackSettlement, from_ms};
    use std::time::{Duration, Instant};

    /// Two replicas on one database: a claimed write-back goes to one; the other gets
    /// it only once the claim expired (by the server's clock), with the earlier attempt
    /// counted, and then the first can no longer settle it.
    #[tokio::test]
    async fn a_write_back_is_claimed_by_one_replica_and_handed_on_only_when_its_claim_expires() {
        let Some(database) = test_database("writeback_claims") else {
            return;
        };
        let url = url_of(&database);
        let short = Options {
            work_claim_ttl: Duration::from_millis(300),
            ..Options::default()
        };
        let first = Store::open_postgres_with(&url, &short).await.unwrap();
        let second = Store::open_postgres_with(&url, &short).await.unwrap();
        let t0 = from_ms(1_767_225_600_000);
        seed_sent_email(&first, t0, Some("Hello")).await;

        let mine = first.claim_writebacks(t0, 10).await.unwrap();
        assert_eq!(mine.len(), 1);
        assert!(second.claim_writebacks(t0, 10).await.unwrap().is_empty());
        let done = WritebackSettlement::Done { remote_id: None };
        assert!(
            !second
                .settle_writeback(mine[0].id, done.clone(), t0)
                .await
                .unwrap(),
            "only the claim's holder settles"
        );

        let deadline = Instant::now() + Duration::from_secs(10);
        let handed = loop {
            let claimed = second.claim_writebacks(t0, 10).await.unwrap();
            if !claimed.is_empty() {
                break claimed;
            }
            assert!(Instant::now() < deadline, "the claim never expired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(handed[0].id, mine[0].id);
        assert_eq!(handed[0].attempts, 2);
        assert!(handed[0].may_exist());
        assert!(
            !first
                .settle_writeback(mine[0].id, done.clone(), t0)
                .await
                .unwrap(),
            "a replica whose claim expired changes nothing"
        );
        assert!(
            second
                .settle_writeback(handed[0].id, done, t0)
                .await
                .unwrap()
        );
    }
}
