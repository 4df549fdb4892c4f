//! Sync bookkeeping: cursors, runs, quarantined records, discovered native pipelines,
//! and the records enrichments keep (`enrichment_cache`).

use super::deals::{Columns, DealUpsert, UpsertOutcome, upsert_all};
use super::{Result, Store, StoreError, from_ms, to_json, to_ms};
use crate::pipeline::NativePipeline;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;

/// A record that could not be read, kept with its error.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub external_id: Option<String>,
    pub error: String,
    /// The record as the source sent it, stored as this text.
    pub raw: crate::domain::RawRecord,
}

/// A stored quarantined record, for `dealsync quarantine`.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineEntry {
    pub id: i64,
    pub connection: String,
    /// `None` when the record had no readable id.
    pub external_id: Option<String>,
    /// Why it could not be read.
    pub error: String,
    pub at: DateTime<Utc>,
    /// The record as the source sent it.
    pub raw: String,
}

/// What re-reading a quarantined record found.
#[derive(Debug, Clone)]
pub enum Reread {
    /// The record reads now: store it.
    Stored(Box<DealUpsert>),
    /// The source says it no longer exists: mark a stored deal deleted.
    Deleted,
}

/// How long a record an enrichment read is kept at most: longer than any `cache` a
/// manifest may set (the manifest check refuses more). Older rows, no longer fresh for
/// any read and holding a contact's personal data, are deleted when a run of their
/// connection starts.
pub const ENRICHMENT_RETENTION: chrono::Duration = chrono::Duration::days(7);

/// A record an enrichment read, to keep for later reads (see `enrichment_cache`).
#[derive(Debug, Clone)]
pub struct CachedRecord {
    /// The enrichment's name in the manifest.
    pub step: String,
    pub id: String,
    pub record: crate::domain::RawRecord,
}

/// The last run of a connection, for status and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRunRecord {
    pub connection: String,
    pub full: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: String,
    pub summary: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// The columns [`quarantine_from`] reads, in its order.
pub(super) const QUARANTINE_COLUMNS: &str = "id, connection, external_id, error, at, raw";

/// Reads a quarantine row of either backend ([`QUARANTINE_COLUMNS`]).
pub(super) fn quarantine_from<R: Columns>(row: &R) -> Result<QuarantineEntry, R::Error> {
    Ok(QuarantineEntry {
        id: row.int(0)?,
        connection: row.text(1)?,
        external_id: row.opt_text(2)?,
        error: row.text(3)?,
        at: from_ms(row.int(4)?),
        raw: row.text(5)?,
    })
}

/// Stores `value` (JSON text) as the cursor of `stream` of `connection`, replacing the
/// one before, in the caller's transaction.
pub(super) fn save_cursor(
    tx: &Transaction<'_>,
    connection: &str,
    stream: &str,
    value: &str,
    at_ms: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO sync_cursors (connection, stream, value, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (connection, stream) DO UPDATE
           SET value = excluded.value, updated_at = excluded.updated_at",
        params![connection, stream, value, at_ms],
    )?;
    Ok(())
}

impl Store {
    /// Quarantined records, newest first (`connection` to list one connection's only).
    pub async fn quarantined(
        &self,
        connection: Option<String>,
        limit: u32,
    ) -> Result<Vec<QuarantineEntry>> {
        if let Some(database) = self.postgres() {
            return database
                .quarantined(connection, limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare(&format!(
                "SELECT {QUARANTINE_COLUMNS} FROM quarantine
                 WHERE ?1 IS NULL OR connection = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows =
                statement.query_map(params![connection, limit], |row| quarantine_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// One quarantined record.
    pub async fn quarantine_entry(&self, id: i64) -> Result<Option<QuarantineEntry>> {
        if let Some(database) = self.postgres() {
            return database
                .quarantine_entry(id)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            Ok(db
                .query_row(
                    &format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id = ?1"),
                    [id],
                    |row| quarantine_from(row),
                )
                .optional()?)
        })
        .await
    }

    /// Applies what re-reading a quarantined record found and, in the same transaction,
    /// takes every quarantine entry of that record (each sync that met it added one)
    /// out of quarantine. Returns the upsert's outcome and how many entries went.
    pub async fn resolve_quarantined(
        &self,
        connection: String,
        external_id: String,
        found: Reread,
        at: DateTime<Utc>,
    ) -> Result<(UpsertOutcome, u64)> {
        if let Some(database) = self.postgres() {
            let (outcome, removed) = database
                .resolve_quarantined(&connection, &external_id, found, at)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(outcome.stage_changes);
            return Ok((outcome, removed));
        }
        self.write(move |tx| {
            let outcome = match found {
                Reread::Stored(upsert) => upsert_all(tx, vec![*upsert])?,
                Reread::Deleted => {
                    super::deal_changes::mark_deleted(tx, &connection, &external_id, at)?;
                    UpsertOutcome::default()
                }
            };
            let removed = tx.execute(
                "DELETE FROM quarantine WHERE connection = ?1 AND external_id = ?2",
                params![connection, external_id],
            )?;
            Ok((outcome, removed as u64))
        })
        .await
    }

    /// Records that a connection exists (idempotent).
    pub async fn ensure_connection(&self, name: &str, connector: &str) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .ensure_connection(name, connector)
                .await
                .map_err(|error| database.named(error));
        }
        let (name, connector) = (name.to_owned(), connector.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO connections (name, connector, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET connector = excluded.connector",
                params![name, connector, to_ms(Utc::now())],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn cursor(
        &self,
        connection: &str,
        stream: &str,
    ) -> Result<Option<serde_json::Value>> {
        if let Some(database) = self.postgres() {
            return database
                .cursor(connection, stream)
                .await
                .map_err(|error| database.named(error));
        }
        let (connection, stream) = (connection.to_owned(), stream.to_owned());
        self.read(move |db| {
            let text: Option<String> = db
                .query_row(
                    "SELECT value FROM sync_cursors WHERE connection = ?1 AND stream = ?2",
                    params![connection, stream],
                    |row| row.get(0),
                )
                .optional()?;
            text.map(|text| {
                serde_json::from_str(&text).map_err(|error| {
                    StoreError::Corrupt(format!("cursor of {connection}: {error}"))
                })
            })
            .transpose()
        })
        .await
    }

    #[cfg(test)]
    /// Forgets a connection's cursor, so the next sync is a full one.
    pub async fn reset_cursor(&self, connection: &str, stream: &str) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .reset_cursor(connection, stream)
                .await
                .map_err(|error| database.named(error));
        }
        let (connection, stream) = (connection.to_owned(), stream.to_owned());
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM sync_cursors WHERE connection = ?1 AND stream = ?2",
                params![connection, stream],
            )?;
            Ok(())
        })
        .await
    }

    /// Commits one page: its deals, its quarantined records, the enrichment records it
    /// keeps (`enrichment_cache`) and the cursor after it.
    ///
    /// Invariant: all of it commits in this one transaction. A crash before the commit
    /// replays the page from the previous cursor, and the upsert makes the replay a no-op.
    pub async fn commit_page(
        &self,
        connection: &str,
        stream: &str,
        upserts: Vec<DealUpsert>,
        quarantined: Vec<Quarantined>,
        cache: Vec<CachedRecord>,
        cursor: Option<serde_json::Value>,
    ) -> Result<UpsertOutcome> {
        if let Some(database) = self.postgres() {
            // Fenced by the connection's poll lease when this process polls under one:
            // a replica that lost it commits nothing more.
            let target = super::postgres::sync::PageTarget {
                connection,
                stream,
                fence: self.fence(super::postgres::leases::poll_lease(connection)),
            };
            let outcome = database
                .commit_page(target, upserts, quarantined, cache, cursor)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(outcome.stage_changes);
            return Ok(outcome);
        }
        let (connection, stream) = (connection.to_owned(), stream.to_owned());
        self.write(move |tx| {
            let outcome = upsert_all(tx, upserts)?;
            let now = to_ms(Utc::now());
            if !cache.is_empty() {
                let mut statement = tx.prepare_cached(
                    "INSERT INTO enrichment_cache (connection, step, id, record, fetched_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (connection, step, id) DO UPDATE
                       SET record = excluded.record, fetched_at = excluded.fetched_at",
                )?;
                for entry in &cache {
                    statement.execute(params![
                        connection,
                        entry.step,
                        entry.id,
                        entry.record.as_str(),
                        now
                    ])?;
                }
            }
            for record in &quarantined {
                tx.execute(
                    "INSERT INTO quarantine (connection, external_id, error, raw, at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        connection,
                        record.external_id,
                        record.error,
                        record.raw.as_str(),
                        now
                    ],
                )?;
            }
            if let Some(cursor) = cursor {
                save_cursor(tx, &connection, &stream, &cursor.to_string(), now)?;
            }
            Ok(outcome)
        })
        .await
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
        if let Some(database) = self.postgres() {
            return database
                .cached_enrichments(connection, step, ids, fresh_since)
                .await;
        }
        let (connection, step) = (connection.to_owned(), step.to_owned());
        self.read(move |db| {
            let ids = to_json(&ids)?;
            // Walks the ids and looks each up on the primary key (`CROSS JOIN` keeps
            // that order).
            let mut statement = db.prepare_cached(
                "SELECT c.id, c.record FROM json_each(?3) AS j CROSS JOIN enrichment_cache AS c
                 WHERE c.connection = ?1 AND c.step = ?2 AND c.id = j.value
                   AND c.fetched_at >= ?4",
            )?;
            let rows = statement
                .query_map(params![connection, step, ids, to_ms(fresh_since)], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Starts a sync run; returns its id. Deletes the connection's enrichment records
    /// older than [`ENRICHMENT_RETENTION`] in the same transaction.
    pub async fn start_sync_run(&self, connection: &str, full: bool) -> Result<i64> {
        if let Some(database) = self.postgres() {
            return database
                .start_sync_run(connection, full)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        self.write(move |tx| {
            let now = to_ms(Utc::now());
            tx.execute(
                "INSERT INTO sync_runs (connection, full, started_at, status) VALUES (?1, ?2, ?3, 'running')",
                params![connection, full, now],
            )?;
            tx.execute(
                "UPDATE connections SET last_sync_started_at = ?2 WHERE name = ?1",
                params![connection, now],
            )?;
            let run_id = tx.last_insert_rowid();
            tx.execute(
                "DELETE FROM enrichment_cache WHERE connection = ?1 AND fetched_at < ?2",
                params![connection, now - ENRICHMENT_RETENTION.num_milliseconds()],
            )?;
            Ok(run_id)
        })
        .await
    }

    /// Finishes a sync run with its summary or its error.
    pub async fn finish_sync_run(
        &self,
        run_id: i64,
        summary: serde_json::Value,
        error: Option<String>,
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .finish_sync_run(run_id, summary, error)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let now = to_ms(Utc::now());
            let status = if error.is_some() { "failed" } else { "succeeded" };
            tx.execute(
                "UPDATE sync_runs SET finished_at = ?2, status = ?3, summary = ?4, error = ?5 WHERE id = ?1",
                params![run_id, now, status, summary.to_string(), error],
            )?;
            tx.execute(
                "UPDATE connections SET last_sync_finished_at = ?2,
                    last_success_at = CASE WHEN ?3 IS NULL THEN ?2 ELSE last_success_at END,
                    last_error = ?3
                 WHERE name = (SELECT connection FROM sync_runs WHERE id = ?1)",
                params![run_id, now, error],
            )?;
            Ok(())
        })
        .await
    }

    /// The most recent run of each connection.
    pub async fn last_sync_runs(&self) -> Result<Vec<SyncRunRecord>> {
        if let Some(database) = self.postgres() {
            return database
                .last_sync_runs()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT connection, full, started_at, finished_at, status, summary, error
                 FROM sync_runs WHERE id IN (SELECT max(id) FROM sync_runs GROUP BY connection)
                 ORDER BY connection",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(SyncRunRecord {
                    connection: row.get(0)?,
                    full: row.get(1)?,
                    started_at: from_ms(row.get(2)?),
                    finished_at: row.get::<_, Option<i64>>(3)?.map(from_ms),
                    status: row.get(4)?,
                    summary: row
                        .get::<_, Option<String>>(5)?
                        .and_then(|s| serde_json::from_str(&s).ok()),
                    error: row.get(6)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// When each connection last synced successfully.
    pub async fn last_successes(&self) -> Result<Vec<(String, Option<DateTime<Utc>>)>> {
        if let Some(database) = self.postgres() {
            return database
                .last_successes()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement =
                db.prepare("SELECT name, last_success_at FROM connections ORDER BY name")?;
            let rows = statement.query_map([], |row| {
                Ok((row.get(0)?, row.get::<_, Option<i64>>(1)?.map(from_ms)))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Stores what discovery found for a connection.
    pub async fn save_native_pipelines(
        &self,
        connection: &str,
        pipelines: &[NativePipeline],
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            return database
                .save_native_pipelines(connection, pipelines)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        let text = to_json(pipelines)?;
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO native_pipelines (connection, pipelines, discovered_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (connection) DO UPDATE
                   SET pipelines = excluded.pipelines, discovered_at = excluded.discovered_at",
                params![connection, text, to_ms(Utc::now())],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn native_pipelines(&self, connection: &str) -> Result<Vec<NativePipeline>> {
        if let Some(database) = self.postgres() {
            return database
                .native_pipelines(connection)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        self.read(move |db| {
            let text: Option<String> = db
                .query_row(
                    "SELECT pipelines FROM native_pipelines WHERE connection = ?1",
                    [&connection],
                    |row| row.get(0),
                )
                .optional()?;
            match text {
                Some(text) => serde_json::from_str(&text).map_err(|error| {
                    StoreError::Corrupt(format!("native pipelines of {connection}: {error}"))
                }),
                None => Ok(Vec::new()),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::tests::temp_store;
    use serde_json::json;

    mod bookkeeping {
        use super::super::{CachedRecord, Quarantined, Reread};
        use crate::domain::RawRecord;
        use crate::store::both_backends::on_both;
        use crate::store::deals::tests::{stored_deal, upsert};
        use crate::store::tests::temp_store;
        use chrono::Utc;

        fn bad(id: &str, error: &str) -> Quarantined {
            Quarantined {
                external_id: Some(id.into()),
                error: error.into(),
                raw: RawRecord::from_text(format!(r#"{{"id":"{id}"}}"#)).unwrap(),
            }
        }

        /// What a page set aside lists newest first, per connection, and reads back one by
        /// one with the source's text as it came.
        #[tokio::test]
        async fn quarantined_records_list_and_read_back_on_both_backends() {
            on_both(
                "quarantined_records_list_and_read_back_on_both_backends",
                async |store| {
                    for (connection, id) in [("crm", "1"), ("shop", "2"), ("crm", "3")] {
                        store
                            .commit_page(
                                connection,
                                "deals",
                                vec![],
                                vec![bad(id, "no stage")],
                                vec![],
                                None,
                            )
                            .await
                            .unwrap();
                    }
                    let ids = |entries: Vec<crate::store::QuarantineEntry>| -> Vec<Option<String>> {
                        entries.into_iter().map(|e| e.external_id).collect()
                    };
                    let all = store.quarantined(None, 10).await.unwrap();
                    let newest = all[0].id;
                    assert_eq!(
                        ids(all),
                        [Some("3".into()), Some("2".into()), Some("1".into())]
                    );
                    let crm = store.quarantined(Some("crm".into()), 1).await.unwrap();
                    assert_eq!(ids(crm), [Some("3".into())]);
                    let entry = store.quarantine_entry(newest).await.unwrap().unwrap();
                    assert_eq!(
                        (
                            entry.connection.as_str(),
                            entry.error.as_str(),
                            entry.raw.as_str()
                        ),
                        ("crm", "no stage", r#"{"id":"3"}"#)
                    );
                    assert!(
                        store
                            .quarantine_entry(newest + 100)
                            .await
                            .unwrap()
                            .is_none()
                    );
                },
            )
            .await;
        }

        #[tokio::test]
        async fn quarantined_records_list_newest_first_per_connection_and_resolve_together() {
            on_both(
                "quarantined_records_list_newest_first_per_connection_and_resolve_together",
                async |store| {
                    let page = |connection: &'static str, records: Vec<Quarantined>| {
                        let store = store.clone();
                        async move {
                            store
                                .commit_page(connection, "deals", vec![], records, vec![], None)
                                .await
                                .unwrap()
                        }
                    };
                    page("crm", vec![bad("1", "no stage")]).await;
                    page(
                        "crm",
                        vec![bad("2", "bad amount"), bad("1", "still no stage")],
                    )
                    .await;
                    page("shop", vec![bad("9", "too deep")]).await;

                    let all = store.quarantined(None, 10).await.unwrap();
                    let listed: Vec<_> = all
                        .iter()
                        .map(|e| {
                            (
                                e.connection.as_str(),
                                e.external_id.as_deref(),
                                e.error.as_str(),
                            )
                        })
                        .collect();
                    assert_eq!(
                        listed,
                        [
                            ("shop", Some("9"), "too deep"),
                            ("crm", Some("1"), "still no stage"),
                            ("crm", Some("2"), "bad amount"),
                            ("crm", Some("1"), "no stage"),
                        ]
                    );
                    assert_eq!(store.quarantined(None, 2).await.unwrap().len(), 2);
                    let crm = store.quarantined(Some("crm".into()), 10).await.unwrap();
                    assert_eq!(crm.len(), 3);
                    assert!(crm.iter().all(|e| e.connection == "crm"));

                    let entry = store.quarantine_entry(all[1].id).await.unwrap().unwrap();
                    assert_eq!(entry.external_id.as_deref(), Some("1"));
                    assert_eq!(entry.raw, r#"{"id":"1"}"#);
                    assert!(store.quarantine_entry(i64::MAX).await.unwrap().is_none());

                    // Re-reading deal 1 stores it and takes both of its entries out.
                    let (outcome, removed) = store
                        .resolve_quarantined(
                            "crm".into(),
                            "1".into(),
                            Reread::Stored(Box::new(upsert("1", "proposal", Utc::now()))),
                            Utc::now(),
                        )
                        .await
                        .unwrap();
                    assert_eq!((outcome.created, removed), (1, 2));
                    assert!(
                        store
                            .deal_by_external_id("crm", "1")
                            .await
                            .unwrap()
                            .is_some()
                    );
                    let left = store.quarantined(Some("crm".into()), 10).await.unwrap();
                    assert_eq!(left.len(), 1);
                    assert_eq!(left[0].external_id.as_deref(), Some("2"));

                    // A record the source no longer has marks the stored deal deleted.
                    let (outcome, removed) = store
                        .resolve_quarantined("crm".into(), "1".into(), Reread::Deleted, Utc::now())
                        .await
                        .unwrap();
                    assert_eq!((outcome, removed), (Default::default(), 0));
                    let deal = stored_deal(&store, "crm", "1").await;
                    assert!(deal.deleted_at.is_some());
                },
            )
            .await;
        }

        /// Two replicas resolving the same record at once: the deal is created once, and
        /// each of its entries is taken out by exactly one of them. PostgreSQL only: on
        /// SQLite one process is the only writer.
        #[tokio::test]
        async fn replicas_resolving_one_record_at_once_create_it_once_and_remove_each_entry_once() {
            let test =
                "replicas_resolving_one_record_at_once_create_it_once_and_remove_each_entry_once";
            let Some(database) = crate::store::postgres::test_database(test) else {
                return;
            };
            let url = crate::store::postgres::tests::url_of(&database);
            let (first, second) = (
                crate::store::Store::open_postgres(&url).await.unwrap(),
                crate::store::Store::open_postgres(&url).await.unwrap(),
            );
            let entries = (0..5).map(|n| bad("1", &format!("try {n}"))).collect();
            first
                .commit_page("crm", "deals", vec![], entries, vec![], None)
                .await
                .unwrap();
            let resolve = |store: crate::store::Store| async move {
                let found = Reread::Stored(Box::new(upsert("1", "proposal", Utc::now())));
                store
                    .resolve_quarantined("crm".into(), "1".into(), found, Utc::now())
                    .await
                    .unwrap()
            };
            let ((a, removed_a), (b, removed_b)) =
                tokio::join!(resolve(first.clone()), resolve(second));
            assert_eq!(a.created + b.created, 1);
            assert_eq!(removed_a + removed_b, 5);
            assert!(first.quarantined(None, 10).await.unwrap().is_empty());
            assert_eq!(
                first.stage_entries_after(0, 10).await.unwrap().len(),
                1,
                "one history row for the one deal created"
            );
        }

        /// A forgotten cursor reads as none; the other streams' stay.
        #[tokio::test]
        async fn a_reset_cursor_is_forgotten_and_the_other_streams_keep_theirs() {
            on_both(
                "a_reset_cursor_is_forgotten_and_the_other_streams_keep_theirs",
                async |store| {
                    for stream in ["deals", "orders"] {
                        store
                            .commit_page(
                                "crm",
                                stream,
                                vec![],
                                vec![],
                                vec![],
                                Some(serde_json::json!({ "after": stream })),
                            )
                            .await
                            .unwrap();
                    }
                    store.reset_cursor("crm", "deals").await.unwrap();
                    assert_eq!(store.cursor("crm", "deals").await.unwrap(), None);
                    assert_eq!(
                        store.cursor("crm", "orders").await.unwrap(),
                        Some(serde_json::json!({ "after": "orders" }))
                    );
                },
            )
            .await;
        }

        #[tokio::test]
        async fn sync_runs_record_their_outcome_and_the_last_success_survives_a_failure() {
            on_both(
                "sync_runs_record_their_outcome_and_the_last_success_survives_a_failure",
                async |store| {
                    for name in ["crm", "idle", "shop"] {
                        store.ensure_connection(name, "hubspot").await.unwrap();
                    }
                    let first = store.start_sync_run("crm", true).await.unwrap();
                    store
                        .finish_sync_run(first, serde_json::json!({"created": 3}), None)
                        .await
                        .unwrap();
                    let succeeded_at = store.last_successes().await.unwrap()[0].1.unwrap();
                    let second = store.start_sync_run("crm", false).await.unwrap();
                    store
                        .finish_sync_run(second, serde_json::json!({}), Some("HTTP 500".into()))
                        .await
                        .unwrap();
                    let shop = store.start_sync_run("shop", false).await.unwrap();

                    let runs = store.last_sync_runs().await.unwrap();
                    let seen: Vec<_> = runs
                        .iter()
                        .map(|r| {
                            (
                                r.connection.as_str(),
                                r.full,
                                r.status.as_str(),
                                r.finished_at.is_some(),
                                r.error.as_deref(),
                            )
                        })
                        .collect();
                    assert_eq!(
                        seen,
                        [
                            ("crm", false, "failed", true, Some("HTTP 500")),
                            ("shop", false, "running", false, None),
                        ]
                    );
                    assert_eq!(runs[0].summary, Some(serde_json::json!({})));
                    assert!(shop > second && second > first);

                    // The failed run keeps the time of the last success; a connection that never
                    // synced has none.
                    let successes = store.last_successes().await.unwrap();
                    assert_eq!(
                        successes,
                        [
                            ("crm".to_owned(), Some(succeeded_at)),
                            ("idle".to_owned(), None),
                            ("shop".to_owned(), None),
                        ]
                    );
                },
            )
            .await;
        }

        #[tokio::test]
        async fn discovered_pipelines_are_replaced_not_merged() {
            use crate::pipeline::{NativePipeline, NativeStage};
            on_both(
                "discovered_pipelines_are_replaced_not_merged",
                async |store| {
                    assert!(store.native_pipelines("crm").await.unwrap().is_empty());
                    let pipeline = |id: &str, stages: &[&str]| NativePipeline {
                        id: id.into(),
                        label: format!("Pipeline {id}"),
                        stages: stages
                            .iter()
                            .enumerate()
                            .map(|(order, stage)| NativeStage {
                                id: (*stage).into(),
                                label: stage.to_uppercase(),
                                order: order as i64,
                                probability: Some(10 * order as u8),
                                kind: None,
                                rot_after: Some(std::time::Duration::from_secs(3600)),
                            })
                            .collect(),
                    };
                    let first = vec![pipeline("a", &["new", "won"]), pipeline("b", &["x"])];
                    store.save_native_pipelines("crm", &first).await.unwrap();
                    assert_eq!(store.native_pipelines("crm").await.unwrap(), first);
                    let second = vec![pipeline("a", &["new", "demo", "won"])];
                    store.save_native_pipelines("crm", &second).await.unwrap();
                    assert_eq!(store.native_pipelines("crm").await.unwrap(), second);
                    assert!(store.native_pipelines("other").await.unwrap().is_empty());
                },
            )
            .await;
        }

        #[tokio::test]
        async fn a_connection_is_recorded_once_and_keeps_its_latest_connector() {
            let (_dir, store) = temp_store();
            store.ensure_connection("crm", "hubspot").await.unwrap();
            store.ensure_connection("crm", "pipedrive").await.unwrap();
            let rows: Vec<(String, String)> = store
                .read(|db| {
                    let mut statement = db.prepare("SELECT name, connector FROM connections")?;
                    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
                })
                .await
                .unwrap();
            assert_eq!(rows, [("crm".to_owned(), "pipedrive".to_owned())]);
        }

        #[tokio::test]
        async fn cached_enrichments_return_only_fresh_records_of_the_step_and_ids_asked() {
            on_both(
                "cached_enrichments_return_only_fresh_records_of_the_step_and_ids_asked",
                async |store| {
                    let cached = |step: &str, id: &str| CachedRecord {
                        step: step.into(),
                        id: id.into(),
                        record: RawRecord::from_text(format!(r#"{{"{step}":"{id}"}}"#)).unwrap(),
                    };
                    let before = Utc::now() - chrono::Duration::seconds(1);
                    store
                        .commit_page(
                            "crm",
                            "deals",
                            vec![],
                            vec![],
                            vec![
                                cached("contact", "a"),
                                cached("contact", "b"),
                                cached("company", "a"),
                            ],
                            None,
                        )
                        .await
                        .unwrap();
                    store
                        .commit_page(
                            "other",
                            "deals",
                            vec![],
                            vec![],
                            vec![cached("contact", "c")],
                            None,
                        )
                        .await
                        .unwrap();
                    let ids = vec!["a".to_owned(), "c".to_owned(), "zz".to_owned()];
                    let got = store
                        .cached_enrichments("crm", "contact", ids.clone(), before)
                        .await
                        .unwrap();
                    assert_eq!(got, [("a".to_owned(), r#"{"contact":"a"}"#.to_owned())]);
                    // Read before `fresh_since`: stale, not returned.
                    let later = Utc::now() + chrono::Duration::seconds(1);
                    let stale = store
                        .cached_enrichments("crm", "contact", ids, later)
                        .await
                        .unwrap();
                    assert!(stale.is_empty());
                },
            )
            .await;
        }
    }

    #[tokio::test]
    async fn enrichment_records_past_the_retention_are_deleted_when_a_run_starts() {
        use super::{CachedRecord, ENRICHMENT_RETENTION};
        use crate::domain::RawRecord;
        let (_dir, store) = temp_store();
        let kept = |id: &str| CachedRecord {
            step: "contact".into(),
            id: id.into(),
            record: RawRecord::from_text(format!(r#"{{"id":"{id}"}}"#)).unwrap(),
        };
        store
            .commit_page(
                "crm",
                "deals",
                vec![],
                vec![],
                vec![kept("old"), kept("new")],
                None,
            )
            .await
            .unwrap();
        store
            .commit_page("other", "deals", vec![], vec![], vec![kept("old")], None)
            .await
            .unwrap();
        let aged = chrono::Utc::now() - ENRICHMENT_RETENTION - chrono::Duration::hours(1);
        store
            .write(move |tx| {
                tx.execute(
                    "UPDATE enrichment_cache SET fetched_at = ?1 WHERE id = 'old'",
                    [aged.timestamp_millis()],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        store.start_sync_run("crm", false).await.unwrap();
        let left: Vec<(String, String)> = store
            .read(|db| {
                let mut statement =
                    db.prepare("SELECT connection, id FROM enrichment_cache ORDER BY 1, 2")?;
                let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
            .unwrap();
        // Only the starting connection's old record goes.
        assert_eq!(
            left,
            vec![
                ("crm".to_owned(), "new".to_owned()),
                ("other".to_owned(), "old".to_owned())
            ]
        );
    }

    fn upsert(id: &str) -> crate::store::DealUpsert {
        use crate::domain::{
            ChangeCause, ConnectionName, DealStatus, PipelineKey, SourceDeal, StageKey, StageRef,
        };
        let at = chrono::Utc::now();
        let mut source = SourceDeal::new(id, format!("Deal {id}"), "default", "proposal");
        source.updated_at = Some(at);
        crate::store::DealUpsert {
            connection: ConnectionName::new("crm"),
            source,
            target: StageRef {
                pipeline: Some(PipelineKey::new("sales")),
                stage: StageKey::new("proposal"),
            },
            status: DealStatus::Open,
            observed_at: at,
            cause: ChangeCause::Poll,
        }
    }

    async fn stored_ids(store: &crate::store::Store) -> Vec<String> {
        store
            .read(|db| {
                let mut statement = db.prepare("SELECT external_id FROM deals ORDER BY 1")?;
                let rows = statement.query_map([], |row| row.get(0))?;
                Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
            })
            .await
            .unwrap()
    }

    /// A page's records and the cursor after it commit together: both or neither.
    /// SQLite only: it makes the database refuse a record with a SQLite trigger and reads
    /// the rows through the SQLite reader. Forgetting a cursor runs on both backends in
    /// `a_reset_cursor_is_forgotten_and_the_other_streams_keep_theirs`.
    #[tokio::test]
    async fn the_cursor_commits_with_its_page() {
        let (_dir, store) = temp_store();
        assert_eq!(store.cursor("crm", "deals").await.unwrap(), None);
        let outcome = store
            .commit_page(
                "crm",
                "deals",
                vec![upsert("1"), upsert("2")],
                vec![],
                vec![],
                Some(json!({"after": "10"})),
            )
            .await
            .unwrap();
        assert_eq!(outcome.created, 2);
        assert_eq!(stored_ids(&store).await, ["1", "2"]);
        assert_eq!(
            store.cursor("crm", "deals").await.unwrap(),
            Some(json!({"after": "10"}))
        );

        // A page whose second record the database refuses: its first record is not
        // stored and the cursor stays before the page, so the page is read again.
        store
            .write(|tx| {
                tx.execute_batch(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON deals
                     WHEN NEW.external_id = 'poison'
                     BEGIN SELECT RAISE(ABORT, 'refused for the test'); END;",
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let failed = store
            .commit_page(
                "crm",
                "deals",
                vec![upsert("3"), upsert("poison")],
                vec![],
                vec![],
                Some(json!({"after": "20"})),
            )
            .await;
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(stored_ids(&store).await, ["1", "2"]);
        assert_eq!(
            store.cursor("crm", "deals").await.unwrap(),
            Some(json!({"after": "10"}))
        );

        store.reset_cursor("crm", "deals").await.unwrap();
        assert_eq!(store.cursor("crm", "deals").await.unwrap(), None);
    }
}
