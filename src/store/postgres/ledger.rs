//! The pending ledger (`store::ledger`) on PostgreSQL, once for both of its tables (the
//! outbox and the digests, table names from the ledger's constants): the due rows, the
//! next due time, a skip, a settlement and the recovery of interrupted sends. The
//! statements are the ledger's own, written with `$` placeholders.
//!
//! Invariants across replicas:
//! - A settlement changes only a row still `sending` (the outbox also takes an
//!   `uncertain` row as `sent`): a conditional UPDATE, so of two answers for one row
//!   the first wins and the second changes nothing, whichever replica gives it.
//! - A settled row keeps its `claimed_by` (who sent it); its claim no longer matters,
//!   as only `sending` rows are ever recovered.
//! - The recovery of interrupted sends takes only `sending` rows whose claim expired
//!   (`claimed_until` in the past, by the server's clock) or that no replica claims,
//!   with `SKIP LOCKED`: another live replica's send in flight is never made
//!   `uncertain` (`claims::ClaimTable::expire_sending_sql`). The due listing sweeps
//!   them too, so a replica that died mid-send has its rows settled by the others.

use super::Database;
use super::deals::pg_text;
use crate::store::ledger::{Ledger, Settlement, Value};
use crate::store::{Result, from_ms, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

/// A ledger statement's parameters as PostgreSQL takes them (text through `pg_text`).
pub(in crate::store) fn pg_values(values: Vec<Value<'_>>) -> Vec<Box<dyn ToSql + Sync + Send>> {
    values
        .into_iter()
        .map(|value| -> Box<dyn ToSql + Sync + Send> {
            match value {
                Value::Int(value) => Box::new(value),
                Value::Text(text) => Box::new(pg_text(text).into_owned()),
                Value::Owned(text) => Box::new(pg_text(&text).into_owned()),
            }
        })
        .collect()
}

/// The parameter list of `values` for a statement.
pub(in crate::store) fn params(
    values: &[Box<dyn ToSql + Sync + Send>],
) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| &**value as &(dyn ToSql + Sync))
        .collect()
}

/// Records how claimed row `id` ended, in the caller's transaction or on a connection;
/// whether the row changed.
pub(super) async fn settle_in(
    db: &impl GenericClient,
    ledger: &Ledger,
    id: i64,
    settlement: Settlement<'_>,
    at: DateTime<Utc>,
) -> Result<bool> {
    let (sql, values) = ledger.settle_statement(id, &settlement, at, '$');
    let values = pg_values(values);
    let statement = db.prepare_cached(&sql).await?;
    Ok(db.execute(&statement, &params(&values)).await? == 1)
}

/// Skips `pending` row `id` with the reason; whether it did.
pub(super) async fn skip_in(
    db: &impl GenericClient,
    ledger: &Ledger,
    id: i64,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<bool> {
    let statement = db.prepare_cached(&ledger.skip_sql('$')).await?;
    let changed = db
        .execute(&statement, &[&id, &pg_text(reason), &to_ms(at)])
        .await?;
    Ok(changed == 1)
}

/// The ledger's `sending` rows no live claim holds → `uncertain`, never resent; how
/// many.
async fn expire_lost_sends(
    db: &impl GenericClient,
    ledger: &Ledger,
    at: DateTime<Utc>,
) -> Result<u64> {
    let Some(sql) = ledger.claims.expire_sending_sql() else {
        return Ok(0);
    };
    let statement = db.prepare_cached(&sql).await?;
    let lost = db.query(&statement, &[&to_ms(at)]).await?.len();
    if lost > 0 {
        tracing::warn!(
            rows = lost,
            "sends interrupted (no live claim holds them): made uncertain, not resent"
        );
    }
    Ok(lost as u64)
}

impl Database {
    /// `pending` rows of the ledger due by `now`, earliest first: (id, rule). First,
    /// as every claim of `claims` does, the `sending` rows whose claim expired (their
    /// replica died mid-send) become `uncertain`, so a lost send is settled by the
    /// replicas still running, not only at the next start after the expiry.
    pub(in crate::store) async fn due(
        &self,
        ledger: &Ledger,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(i64, String)>> {
        let client = self.client().await?;
        expire_lost_sends(&client, ledger, now).await?;
        let statement = client.prepare_cached(&ledger.due_sql('$')).await?;
        let rows = client
            .query(&statement, &[&to_ms(now), &i64::from(limit)])
            .await?;
        Ok(rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// When the ledger's next `pending` row comes due.
    pub(in crate::store) async fn next_due(
        &self,
        ledger: &Ledger,
    ) -> Result<Option<DateTime<Utc>>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(&ledger.next_due_sql('$')).await?;
        let next: Option<i64> = client.query_one(&statement, &[]).await?.try_get(0)?;
        Ok(next.map(from_ms))
    }

    /// Skips a `pending` row with the reason; whether it did.
    pub(in crate::store) async fn skip(
        &self,
        ledger: &Ledger,
        id: i64,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        skip_in(&self.client().await?, ledger, id, reason, at).await
    }

    /// Records how a claimed row's send ended; whether the row changed.
    pub(in crate::store) async fn settle(
        &self,
        ledger: &Ledger,
        id: i64,
        settlement: Settlement<'_>,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        settle_in(&self.client().await?, ledger, id, settlement, at).await
    }

    /// Records how a claimed row's send ended and, when it changed and `suppress` names
    /// (address, bounce text), suppresses the address: one transaction. Whether the
    /// row changed.
    pub(in crate::store) async fn settle_and_suppress(
        &self,
        ledger: &Ledger,
        id: i64,
        settlement: Settlement<'_>,
        suppress: Option<(&str, &str)>,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = settle_in(&tx, ledger, id, settlement, at).await?;
        if let Some((email, bounce)) = suppress
            && changed
        {
            super::suppression::insert(&tx, email, "hard bounce", Some(bounce), at).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// At start-up: the `sending` rows of each ledger that no live claim holds become
    /// `uncertain`, in one transaction; how many did.
    pub(in crate::store) async fn recover_interrupted(
        &self,
        ledgers: &[&Ledger],
        at: DateTime<Utc>,
    ) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut recovered = 0;
        for ledger in ledgers {
            recovered += expire_lost_sends(&tx, ledger, at).await?;
        }
        tx.commit().await?;
        Ok(recovered)
    }
}

impl Database {
    /// `Options::send_claim_ttl` in milliseconds, as the claim statements take it.
    pub(super) fn send_claim_ms(&self) -> i64 {
        super::millis(self.send_claim_ttl)
    }
}
