//! Sync bookkeeping on PostgreSQL: connections, cursors, a page's commit, runs,
//! discovered native pipelines, the enrichment cache, stored tokens, what a changed
//! stage map does to stored deals, and resolving a quarantined record. The same contract as the SQLite methods of the same
//! names (`store::sync`, `store::tokens`, `store::deals::stage_map`), which document it.
//!
//! Invariants:
//! - A page's deals, quarantined records, kept enrichment records and the cursor after
//!   it commit in one transaction (`commit_page`).
//! - A rotated refresh token and its access token are written in one statement.
//! - Resolving a quarantined record writes its deal and takes its entries out in one
//!   transaction. Across replicas: the deal's write holds the deal's key lock (as every
//!   write of a deal does, `deal_changes::mark_deleted` under `deals::lock_deal_keys`), so two resolving the same record
//!   at once write it one after the other; each entry is deleted once, by one of them.
//! - A deal is marked deleted by one conditional `UPDATE` under that key lock: once,
//!   whoever else marks or writes it at the same time.

use super::Database;
use super::deal_changes::mark_deleted;
use super::deals::{move_stage, pg_text, upsert_all};
use crate::domain::{ChangeCause, PipelineKey, StageKey, StageRef};
use crate::pipeline::NativePipeline;
use crate::store::deals::{
    AppliedMapping, DealUpsert, NativeStageGroup, StageMove, UnmappedStage, UpsertOutcome,
};
use crate::store::sync::{CachedRecord, ENRICHMENT_RETENTION, Quarantined, Reread, SyncRunRecord};
use crate::store::tokens::StoredToken;
use crate::store::{Result, StoreError, from_ms, to_json, to_ms};
use chrono::{DateTime, Utc};
use std::borrow::Cow;
use std::collections::HashSet;

/// Stores `value` (JSON text) as the cursor of `stream` of `connection`.
async fn save_cursor(
    client: &deadpool_postgres::Transaction<'_>,
    connection: &str,
    stream: &str,
    value: &str,
    at_ms: i64,
) -> Result<()> {
    client
        .execute(
            "INSERT INTO sync_cursors (connection, stream, value, updated_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (connection, stream) DO UPDATE
               SET value = excluded.value, updated_at = excluded.updated_at",
            &[&connection, &stream, &pg_text(value), &at_ms],
        )
        .await?;
    Ok(())
}

/// Where a page goes: the connection's stream, and the lease (name, fencing token)
/// that must still be this process's for the page to commit.
pub(in crate::store) struct PageTarget<'a> {
    pub connection: &'a str,
    pub stream: &'a str,
    pub fence: Option<(String, i64)>,
}

impl Database {
    /// Applies what re-reading a quarantined record found and takes every quarantine
    /// entry of that record out, in one transaction (see `Store::resolve_quarantined`).
    pub async fn resolve_quarantined(
        &self,
        connection: &str,
        external_id: &str,
        found: Reread,
        at: DateTime<Utc>,
    ) -> Result<(UpsertOutcome, u64)> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let outcome = match found {
            Reread::Stored(upsert) => upsert_all(&tx, std::slice::from_ref(&*upsert)).await?,
            Reread::Deleted => {
                mark_deleted(&tx, connection, external_id, at).await?;
                UpsertOutcome::default()
            }
        };
        let removed = tx
            .execute(
                "DELETE FROM quarantine WHERE connection = $1 AND external_id = $2",
                &[&pg_text(connection), &pg_text(external_id)],
            )
            .await?;
        tx.commit().await?;
        Ok((outcome, removed))
    }

    /// Forgets a connection's cursor, so the next sync is a full one.
    #[cfg(test)]
    pub async fn reset_cursor(&self, connection: &str, stream: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "DELETE FROM sync_cursors WHERE connection = $1 AND stream = $2",
                &[&connection, &stream],
            )
            .await?;
        Ok(())
    }

    /// Records that a connection exists (idempotent).
    pub async fn ensure_connection(&self, name: &str, connector: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO connections (name, connector, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET connector = excluded.connector",
                &[&name, &connector, &to_ms(Utc::now())],
            )
            .await?;
        Ok(())
    }

    pub async fn cursor(
        &self,
        connection: &str,
        stream: &str,
    ) -> Result<Option<serde_json::Value>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT value FROM sync_cursors WHERE connection = $1 AND stream = $2",
                &[&connection, &stream],
            )
            .await?;
        row.map(|row| {
            let text: &str = row.try_get(0)?;
            serde_json::from_str(text)
                .map_err(|error| StoreError::Corrupt(format!("cursor of {connection}: {error}")))
        })
        .transpose()
    }

    /// Commits one page of `target` (see `Store::commit_page`): all of it in one
    /// transaction, which the target's fence, when it has one, guards.
    pub(in crate::store) async fn commit_page(
        &self,
        target: PageTarget<'_>,
        upserts: Vec<DealUpsert>,
        quarantined: Vec<Quarantined>,
        cache: Vec<CachedRecord>,
        cursor: Option<serde_json::Value>,
    ) -> Result<UpsertOutcome> {
        let PageTarget {
            connection,
            stream,
            fence,
        } = target;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some((lease, token)) = fence {
            super::leases::check_fence(&tx, &lease, token).await?;
        }
        let outcome = upsert_all(&tx, &upserts).await?;
        let now = to_ms(Utc::now());
        if !cache.is_empty() {
            let steps: Vec<Cow<'_, str>> = cache.iter().map(|e| pg_text(&e.step)).collect();
            let ids: Vec<Cow<'_, str>> = cache.iter().map(|e| pg_text(&e.id)).collect();
            let records: Vec<Cow<'_, str>> =
                cache.iter().map(|e| pg_text(e.record.as_str())).collect();
            // One row per (step, id): the last of a page's repeats wins, as on SQLite.
            tx.execute(
                "INSERT INTO enrichment_cache (connection, step, id, record, fetched_at)
                 SELECT DISTINCT ON (step, id) $1, step, id, record, $5
                 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY
                    AS c(step, id, record, ord)
                 ORDER BY step, id, ord DESC
                 ON CONFLICT (connection, step, id) DO UPDATE
                   SET record = excluded.record, fetched_at = excluded.fetched_at",
                &[&pg_text(connection), &steps, &ids, &records, &now],
            )
            .await?;
        }
        if !quarantined.is_empty() {
            let ids: Vec<Option<Cow<'_, str>>> = quarantined
                .iter()
                .map(|q| q.external_id.as_deref().map(pg_text))
                .collect();
            let errors: Vec<Cow<'_, str>> = quarantined.iter().map(|q| pg_text(&q.error)).collect();
            let raws: Vec<Cow<'_, str>> = quarantined
                .iter()
                .map(|q| pg_text(q.raw.as_str()))
                .collect();
            tx.execute(
                "INSERT INTO quarantine (connection, external_id, error, raw, at)
                 SELECT $1, external_id, error, raw, $5
                 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY
                    AS q(external_id, error, raw, ord)
                 ORDER BY ord",
                &[&pg_text(connection), &ids, &errors, &raws, &now],
            )
            .await?;
        }
        if let Some(cursor) = cursor {
            save_cursor(&tx, connection, stream, &cursor.to_string(), now).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// The records kept for an enrichment of a connection among `ids`, by id, that were
    /// read at or after `fresh_since`.
    pub async fn cached_enrichments(
        &self,
        connection: &str,
        step: &str,
        ids: Vec<String>,
        fresh_since: DateTime<Utc>,
    ) -> Result<Vec<(String, String)>> {
        let ids: Vec<Cow<'_, str>> = ids.iter().map(|id| pg_text(id)).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT c.id, c.record FROM enrichment_cache AS c
                 WHERE c.connection = $1 AND c.step = $2 AND c.id = ANY($3)
                   AND c.fetched_at >= $4",
                &[&connection, &step, &ids, &to_ms(fresh_since)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// Starts a sync run; returns its id (see `Store::start_sync_run`).
    pub async fn start_sync_run(&self, connection: &str, full: bool) -> Result<i64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = to_ms(Utc::now());
        let run_id: i64 = tx
            .query_one(
                "INSERT INTO sync_runs (connection, \"full\", started_at, status)
                 VALUES ($1, $2, $3, 'running') RETURNING id",
                &[&connection, &full, &now],
            )
            .await?
            .try_get(0)?;
        tx.execute(
            "UPDATE connections SET last_sync_started_at = $2 WHERE name = $1",
            &[&connection, &now],
        )
        .await?;
        tx.execute(
            "DELETE FROM enrichment_cache WHERE connection = $1 AND fetched_at < $2",
            &[
                &connection,
                &(now - ENRICHMENT_RETENTION.num_milliseconds()),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(run_id)
    }

    /// Finishes a sync run with its summary or its error.
    pub async fn finish_sync_run(
        &self,
        run_id: i64,
        summary: serde_json::Value,
        error: Option<String>,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = to_ms(Utc::now());
        let status = if error.is_some() {
            "failed"
        } else {
            "succeeded"
        };
        let error = error.as_deref().map(pg_text);
        tx.execute(
            "UPDATE sync_runs SET finished_at = $2, status = $3, summary = $4, error = $5
             WHERE id = $1",
            &[
                &run_id,
                &now,
                &status,
                &pg_text(&summary.to_string()),
                &error,
            ],
        )
        .await?;
        tx.execute(
            "UPDATE connections SET last_sync_finished_at = $2,
                last_success_at = CASE WHEN $3::text IS NULL THEN $2 ELSE last_success_at END,
                last_error = $3
             WHERE name = (SELECT connection FROM sync_runs WHERE id = $1)",
            &[&run_id, &now, &error],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The most recent run of each connection.
    pub async fn last_sync_runs(&self) -> Result<Vec<SyncRunRecord>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT DISTINCT ON (connection) connection, \"full\", started_at, finished_at,
                    status, summary, error
                 FROM sync_runs ORDER BY connection, id DESC",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                Ok(SyncRunRecord {
                    connection: row.try_get(0)?,
                    full: row.try_get(1)?,
                    started_at: from_ms(row.try_get(2)?),
                    finished_at: row.try_get::<_, Option<i64>>(3)?.map(from_ms),
                    status: row.try_get(4)?,
                    summary: row
                        .try_get::<_, Option<&str>>(5)?
                        .and_then(|s| serde_json::from_str(s).ok()),
                    error: row.try_get(6)?,
                })
            })
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// When each connection last synced successfully.
    pub async fn last_successes(&self) -> Result<Vec<(String, Option<DateTime<Utc>>)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, last_success_at FROM connections ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get(0)?,
                    row.try_get::<_, Option<i64>>(1)?.map(from_ms),
                ))
            })
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// Stores what discovery found for a connection.
    pub async fn save_native_pipelines(
        &self,
        connection: &str,
        pipelines: &[NativePipeline],
    ) -> Result<()> {
        let text = to_json(pipelines)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO native_pipelines (connection, pipelines, discovered_at)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (connection) DO UPDATE
                   SET pipelines = excluded.pipelines, discovered_at = excluded.discovered_at",
                &[&connection, &pg_text(&text), &to_ms(Utc::now())],
            )
            .await?;
        Ok(())
    }

    pub async fn native_pipelines(&self, connection: &str) -> Result<Vec<NativePipeline>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT pipelines FROM native_pipelines WHERE connection = $1",
                &[&connection],
            )
            .await?;
        match row {
            Some(row) => serde_json::from_str(row.try_get(0)?).map_err(|error| {
                StoreError::Corrupt(format!("native pipelines of {connection}: {error}"))
            }),
            None => Ok(Vec::new()),
        }
    }

    /// Of `candidates` (external id, fingerprint), those whose stored deal was written
    /// from a record with that fingerprint, is not deleted and has a contact email.
    pub async fn unchanged_records(
        &self,
        connection: &str,
        candidates: Vec<(String, i64)>,
    ) -> Result<HashSet<(String, i64)>> {
        let ids: Vec<Cow<'_, str>> = candidates.iter().map(|(id, _)| pg_text(id)).collect();
        let fingerprints: Vec<i64> = candidates.iter().map(|(_, f)| *f).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT d.external_id, d.fingerprint
                 FROM unnest($2::text[], $3::bigint[]) AS c(external_id, fingerprint)
                 JOIN deals AS d ON d.connection = $1 AND d.external_id = c.external_id
                 WHERE d.fingerprint = c.fingerprint
                   AND d.deleted_at IS NULL AND d.contact_email IS NOT NULL",
                &[&pg_text(connection), &ids, &fingerprints],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// The live deals of `connection` grouped by native stage and canonical stage.
    pub async fn native_stage_groups(&self, connection: &str) -> Result<Vec<NativeStageGroup>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT native_pipeline, native_stage, pipeline, stage, count(*) FROM deals
                 WHERE connection = $1 AND deleted_at IS NULL
                 GROUP BY native_pipeline, native_stage, pipeline, stage
                 ORDER BY native_pipeline, native_stage, pipeline, stage",
                &[&connection],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                Ok(NativeStageGroup {
                    native_pipeline: row.try_get(0)?,
                    native_stage: row.try_get(1)?,
                    stage: StageRef {
                        pipeline: row.try_get::<_, Option<String>>(2)?.map(PipelineKey::new),
                        stage: StageKey::new(row.try_get::<_, String>(3)?),
                    },
                    deals: row.try_get::<_, i64>(4)?.unsigned_abs(),
                })
            })
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// The native stages of deals kept as unmapped, with how many: of one connection,
    /// or of all with `None`.
    pub async fn unmapped_stages(&self, connection: Option<&str>) -> Result<Vec<UnmappedStage>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT connection, native_pipeline, native_stage, count(*) FROM deals
                 WHERE stage = 'unmapped' AND deleted_at IS NULL
                   AND ($1::text IS NULL OR connection = $1)
                 GROUP BY connection, native_pipeline, native_stage
                 ORDER BY connection, native_pipeline, native_stage",
                &[&connection],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                Ok(UnmappedStage {
                    connection: row.try_get(0)?,
                    native_pipeline: row.try_get(1)?,
                    native_stage: row.try_get(2)?,
                    deals: row.try_get::<_, i64>(3)?.unsigned_abs(),
                })
            })
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// Moves `connection`'s deals for each of `moves` and records `applied` (see
    /// `Store::remap_deals`). One transaction; how many moved per move.
    pub async fn remap_deals(
        &self,
        connection: &str,
        applied_stream: &str,
        moves: Vec<StageMove>,
        applied: Vec<AppliedMapping>,
    ) -> Result<Vec<u64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut counts = Vec::with_capacity(moves.len());
        for change in &moves {
            let rows = tx
                .query(
                    "SELECT id, stage_entered_at FROM deals
                     WHERE connection = $1 AND native_pipeline = $2 AND native_stage = $3
                       AND pipeline IS NOT DISTINCT FROM $4 AND stage = $5
                       AND deleted_at IS NULL
                     ORDER BY id FOR UPDATE",
                    &[
                        &connection,
                        &pg_text(&change.native_pipeline),
                        &pg_text(&change.native_stage),
                        &change.from.pipeline.as_ref().map(|p| p.as_str()),
                        &change.from.stage.as_str(),
                    ],
                )
                .await?;
            let mut moved = 0;
            for row in rows {
                let (id, entered_at): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                if move_stage(
                    &tx,
                    id,
                    &change.to,
                    change.status,
                    from_ms(entered_at),
                    ChangeCause::Mapping,
                )
                .await?
                {
                    moved += 1;
                }
            }
            counts.push(moved);
        }
        save_cursor(
            &tx,
            connection,
            applied_stream,
            &to_json(&applied)?,
            to_ms(Utc::now()),
        )
        .await?;
        tx.commit().await?;
        Ok(counts)
    }

    /// The tokens of `connection`, if any were stored.
    pub async fn oauth_token(&self, connection: &str) -> Result<Option<StoredToken>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT access_token, refresh_token, expires_at, extra, needs_reauth, updated_at
                 FROM oauth_tokens WHERE connection = $1",
                &[&connection],
            )
            .await?;
        row.map(|row| {
            Ok(StoredToken {
                access_token: row.try_get(0)?,
                refresh_token: row.try_get(1)?,
                expires_at: row.try_get::<_, Option<i64>>(2)?.map(from_ms),
                extra: serde_json::from_str(row.try_get(3)?).map_err(|error| {
                    StoreError::Corrupt(format!("token extras of {connection}: {error}"))
                })?,
                needs_reauth: row.try_get(4)?,
                updated_at: from_ms(row.try_get(5)?),
            })
        })
        .transpose()
    }

    /// Stores a token response (see `Store::save_oauth_token`): the extras are merged
    /// over the stored ones under the row's lock.
    pub async fn save_oauth_token(
        &self,
        connection: &str,
        access_token: &str,
        refresh_token: Option<&str>,
        expires_at: Option<DateTime<Utc>>,
        extra: serde_json::Value,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let stored = tx
            .query_opt(
                "SELECT extra FROM oauth_tokens WHERE connection = $1 FOR UPDATE",
                &[&connection],
            )
            .await?;
        let merged = crate::store::tokens::merged_extras(
            stored
                .as_ref()
                .map(|row| row.try_get::<_, &str>(0))
                .transpose()?,
            &extra,
        );
        tx.execute(
            "INSERT INTO oauth_tokens (connection, access_token, refresh_token, expires_at, extra,
                needs_reauth, updated_at)
             VALUES ($1, $2, $3, $4, $5, FALSE, $6)
             ON CONFLICT (connection) DO UPDATE SET
               access_token = excluded.access_token,
               refresh_token = coalesce(excluded.refresh_token, oauth_tokens.refresh_token),
               expires_at = excluded.expires_at,
               extra = excluded.extra,
               needs_reauth = FALSE,
               updated_at = excluded.updated_at",
            &[
                &connection,
                &access_token,
                &refresh_token,
                &expires_at.map(to_ms),
                &pg_text(&merged.to_string()),
                &to_ms(Utc::now()),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a connection as needing `dealsync auth` (its refresh token was revoked).
    pub async fn mark_needs_reauth(&self, connection: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO oauth_tokens (connection, needs_reauth, updated_at)
                 VALUES ($1, TRUE, $2)
                 ON CONFLICT (connection) DO UPDATE SET needs_reauth = TRUE,
                   access_token = NULL, updated_at = excluded.updated_at",
                &[&connection, &to_ms(Utc::now())],
            )
            .await?;
        Ok(())
    }
}
