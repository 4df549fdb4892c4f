//! Dead letters: deliveries whose signature was valid but whose body could not be
//! parsed, kept for inspection (`dealsync inbox dead-letters`) and replay.
//!
//! Invariants:
//! - A dead letter is replayed into the inbox at most once, under its delivery id: a
//!   second replay, or a delivery already pending or processed, changes nothing; one the
//!   worker gave up on is queued again.
//! - A replay goes through the inbox's writer, so it is safe beside a running daemon.
//!
//! What a replay does is decided here ([`ReplayStart`], [`ReplayInto`]) for both
//! backends; `store::postgres::dead_letters` carries it out on PostgreSQL.

use super::intake::{self, NewWebhook};
use super::writer::Command;
use super::{Result, parse_headers};
use crate::store::deals::Columns;
use crate::store::{Store, from_ms, to_json, to_ms};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// A delivery whose signature was valid but whose body could not be parsed.
pub(in crate::store) struct DeadLetter {
    pub connection: String,
    pub delivery_id: String,
    pub topic: Option<String>,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub at: DateTime<Utc>,
}

/// Writes a dead letter, in the writer's transaction.
pub(super) fn keep(tx: &rusqlite::Transaction<'_>, letter: &DeadLetter) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO webhook_dead_letters
            (connection, received_at, reason, headers, body, delivery_id, topic)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        letter.connection,
        to_ms(letter.at),
        letter.reason,
        to_json(&letter.headers)?,
        &letter.body[..],
        letter.delivery_id,
        letter.topic,
    ])?;
    Ok(())
}

/// A kept dead letter, for `dealsync inbox dead-letters`.
#[derive(Debug, Clone, Serialize)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub connection: String,
    /// `None` for letters kept before dealsync stored it; a replay then uses
    /// `dead-letter:<id>`.
    pub delivery_id: Option<String>,
    pub topic: Option<String>,
    pub received_at: DateTime<Utc>,
    /// Why the connector could not parse it.
    pub reason: String,
    pub replayed_at: Option<DateTime<Utc>>,
    /// The inbox row the replay became.
    pub replayed_as: Option<i64>,
    /// That inbox row's state now (`pending`, `processed`, `failed`), while it is kept.
    pub replay_state: Option<String>,
    pub replay_error: Option<String>,
    /// Lower-case names and values, without signature or auth headers.
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl StoredDeadLetter {
    /// The delivery id a replay is stored (and deduplicated) under.
    pub fn replay_delivery_id(&self) -> String {
        self.delivery_id
            .clone()
            .unwrap_or_else(|| format!("dead-letter:{}", self.id))
    }
}

/// What replaying a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Queued as a new inbox row; the inbox worker applies it.
    Queued {
        inbox_id: i64,
    },
    /// The delivery was in the inbox already (a vendor retry, or another dead letter
    /// of it) and had failed: queued again.
    Requeued {
        inbox_id: i64,
    },
    /// The delivery is in the inbox already, pending or processed: nothing to do.
    AlreadyInInbox {
        inbox_id: i64,
        state: String,
    },
    /// This dead letter was replayed before: nothing to do.
    AlreadyReplayed {
        at: DateTime<Utc>,
        inbox_id: Option<i64>,
    },
    NotFound,
}

/// The first step of a replay, decided from the dead letter alone.
pub(in crate::store) enum ReplayStart {
    /// Nothing to write: the answer (not found, or replayed before).
    Answer(Replayed),
    /// Replayed before into a row the worker gave up on (it never applied): put that
    /// row back to pending and record the new replay time.
    RequeueAgain { inbox_id: i64 },
    /// Not replayed yet: look the delivery up in the inbox under this id.
    Lookup { delivery_id: String },
}

impl ReplayStart {
    pub(in crate::store) fn of(letter: Option<&StoredDeadLetter>) -> ReplayStart {
        let Some(letter) = letter else {
            return ReplayStart::Answer(Replayed::NotFound);
        };
        let Some(replayed_at) = letter.replayed_at else {
            return ReplayStart::Lookup {
                delivery_id: letter.replay_delivery_id(),
            };
        };
        match (letter.replayed_as, letter.replay_state.as_deref()) {
            (Some(inbox_id), Some("failed")) => ReplayStart::RequeueAgain { inbox_id },
            _ => ReplayStart::Answer(Replayed::AlreadyReplayed {
                at: replayed_at,
                inbox_id: letter.replayed_as,
            }),
        }
    }
}

/// What a replay not done before does, given the inbox row of its delivery id.
pub(in crate::store) enum ReplayInto {
    /// No such row: a new one.
    Queue,
    /// The row failed: back to pending, as new.
    Requeue { inbox_id: i64 },
    /// The row is pending or processed: left alone.
    Leave(Replayed),
}

impl ReplayInto {
    /// From the inbox row `(id, state)` of the delivery, if any.
    pub(in crate::store) fn of(existing: Option<(i64, String)>) -> ReplayInto {
        match existing {
            None => ReplayInto::Queue,
            Some((inbox_id, state)) if state == "failed" => ReplayInto::Requeue { inbox_id },
            Some((inbox_id, state)) => ReplayInto::Leave(Replayed::AlreadyInInbox {
                inbox_id,
                state: public_state(state),
            }),
        }
    }
}

/// An inbox row's state as told outside the store: a row a replica has claimed
/// (PostgreSQL) is still `pending`.
fn public_state(state: String) -> String {
    if state == "claimed" {
        "pending".to_owned()
    } else {
        state
    }
}

/// The delivery a replay of `letter` stores under `delivery_id`.
pub(in crate::store) fn replay_event(letter: &StoredDeadLetter, delivery_id: String) -> NewWebhook {
    NewWebhook {
        connection: letter.connection.clone(),
        delivery_id,
        topic: letter.topic.clone(),
        headers: letter.headers.clone(),
        body: Bytes::from(letter.body.clone()),
        received_at: letter.received_at,
        // A replay is the operator's: no body-replay window applies to it.
        body_sha256: None,
    }
}

/// The inbox row a replay is recorded as having become.
pub(in crate::store) fn replayed_as(replayed: &Replayed) -> Option<i64> {
    match replayed {
        Replayed::Queued { inbox_id }
        | Replayed::Requeued { inbox_id }
        | Replayed::AlreadyInInbox { inbox_id, .. } => Some(*inbox_id),
        _ => None,
    }
}

/// Puts dead letter `id` into the inbox under its delivery id, once: a second replay,
/// or a delivery already pending or processed, changes nothing; one that failed is
/// queued again.
pub(super) fn replay(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    at: DateTime<Utc>,
) -> Result<Replayed> {
    let letter = read_dead_letter(tx, id)?;
    let delivery_id = match ReplayStart::of(letter.as_ref()) {
        ReplayStart::Answer(replayed) => return Ok(replayed),
        ReplayStart::RequeueAgain { inbox_id } => {
            requeue(tx, inbox_id)?;
            tx.execute(
                "UPDATE webhook_dead_letters SET replayed_at = ?2 WHERE id = ?1",
                params![id, to_ms(at)],
            )?;
            return Ok(Replayed::Requeued { inbox_id });
        }
        ReplayStart::Lookup { delivery_id } => delivery_id,
    };
    let Some(letter) = letter else {
        return Ok(Replayed::NotFound);
    };
    let existing: Option<(i64, String)> = tx
        .query_row(
            "SELECT id, state FROM webhook_inbox WHERE connection = ?1 AND delivery_id = ?2",
            params![letter.connection, delivery_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let replayed = match ReplayInto::of(existing) {
        ReplayInto::Queue => {
            intake::insert(tx, &replay_event(&letter, delivery_id))?;
            Replayed::Queued {
                inbox_id: tx.last_insert_rowid(),
            }
        }
        ReplayInto::Requeue { inbox_id } => {
            requeue(tx, inbox_id)?;
            Replayed::Requeued { inbox_id }
        }
        ReplayInto::Leave(replayed) => replayed,
    };
    tx.execute(
        "UPDATE webhook_dead_letters SET replayed_at = ?2, replayed_as = ?3 WHERE id = ?1",
        params![id, to_ms(at), replayed_as(&replayed)],
    )?;
    Ok(replayed)
}

/// Puts a failed inbox row back to pending, as if it had just arrived.
fn requeue(tx: &rusqlite::Transaction<'_>, inbox_id: i64) -> Result<()> {
    tx.execute(
        "UPDATE webhook_inbox SET state = 'pending', attempts = 0, next_attempt_at = NULL,
            last_error = NULL, processed_at = NULL
         WHERE id = ?1 AND state = 'failed'",
        [inbox_id],
    )?;
    Ok(())
}

/// The columns [`dead_letter_from`] reads, in its order (`d` the dead letter, `i` the
/// inbox row its replay became, left-joined).
pub(in crate::store) const DEAD_LETTER_COLUMNS: &str = "d.id, d.connection, d.delivery_id,
    d.topic, d.received_at, d.reason, d.replayed_at, d.replayed_as, i.state, i.last_error,
    d.headers, d.body";

/// Reads a dead letter row of either backend ([`DEAD_LETTER_COLUMNS`]).
pub(in crate::store) fn dead_letter_from<R: Columns>(
    row: &R,
) -> std::result::Result<StoredDeadLetter, R::Error> {
    Ok(StoredDeadLetter {
        id: row.int(0)?,
        connection: row.text(1)?,
        delivery_id: row.opt_text(2)?,
        topic: row.opt_text(3)?,
        received_at: from_ms(row.int(4)?),
        reason: row.text(5)?,
        replayed_at: row.opt_int(6)?.map(from_ms),
        replayed_as: row.opt_int(7)?,
        replay_state: row.opt_text(8)?.map(public_state),
        replay_error: row.opt_text(9)?,
        headers: parse_headers(&row.text(10)?),
        body: row.bytes(11)?,
    })
}

fn read_dead_letter(db: &Connection, id: i64) -> Result<Option<StoredDeadLetter>> {
    Ok(db
        .query_row(
            &format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters AS d
                 LEFT JOIN webhook_inbox AS i ON i.id = d.replayed_as
                 WHERE d.id = ?1"
            ),
            [id],
            |row| dead_letter_from(row),
        )
        .optional()?)
}

impl Store {
    /// Keeps a delivery whose signature was valid but whose body could not be parsed,
    /// with the delivery id and topic a replay is stored under.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        connection: &str,
        delivery_id: &str,
        topic: Option<&str>,
        reason: &str,
        headers: Vec<(String, String)>,
        body: Bytes,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let letter = DeadLetter {
            connection: connection.to_owned(),
            delivery_id: delivery_id.to_owned(),
            topic: topic.map(str::to_owned),
            reason: reason.to_owned(),
            headers,
            body,
            at,
        };
        if let Some(database) = self.postgres() {
            return database
                .dead_letter(&letter)
                .await
                .map_err(|error| database.named(error));
        }
        self.inbox()?
            .ask(|reply| Command::DeadLetter(letter, reply))
            .await
    }

    /// Dead letters kept, newest first (`connection` to list one connection's only).
    pub async fn dead_letters(
        &self,
        connection: Option<String>,
        limit: u32,
    ) -> Result<Vec<StoredDeadLetter>> {
        if let Some(database) = self.postgres() {
            return database
                .dead_letters(connection.as_deref(), limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read_inbox(move |db| {
            let mut statement = db.prepare(&format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters AS d
                 LEFT JOIN webhook_inbox AS i ON i.id = d.replayed_as
                 WHERE ?1 IS NULL OR d.connection = ?1
                 ORDER BY d.id DESC LIMIT ?2"
            ))?;
            let rows =
                statement.query_map(params![connection, limit], |row| dead_letter_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// One dead letter, with its replay's inbox row state.
    pub async fn stored_dead_letter(&self, id: i64) -> Result<Option<StoredDeadLetter>> {
        if let Some(database) = self.postgres() {
            return database
                .stored_dead_letter(id)
                .await
                .map_err(|error| database.named(error));
        }
        self.read_inbox(move |db| read_dead_letter(db, id)).await
    }

    /// Replays a dead letter through the inbox (and so through the inbox worker, like
    /// any delivery), at most once: see [`Replayed`]. One transaction on the inbox's
    /// writer, so it is safe beside a running daemon, whose worker picks the row up.
    ///
    /// On PostgreSQL the dead letter's row is locked for the replay, so replays of it
    /// from several processes at once run one after the other.
    pub async fn replay_dead_letter(&self, id: i64, at: DateTime<Utc>) -> Result<Replayed> {
        if let Some(postgres) = self.postgres_engine() {
            let database = &postgres.database;
            let replayed = database
                .replay_dead_letter(id, at)
                .await
                .map_err(|error| database.named(error))?;
            if matches!(
                replayed,
                Replayed::Queued { .. } | Replayed::Requeued { .. }
            ) {
                postgres.intake.added(1);
            }
            return Ok(replayed);
        }
        self.inbox()?
            .ask(|reply| Command::Replay(id, at, reply))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, inbox_execute};
    use super::*;
    use crate::store::Engine;
    use crate::store::both_backends::on_both;

    async fn keep_letter(store: &Store, delivery_id: &str) -> i64 {
        store
            .dead_letter(
                "shop",
                delivery_id,
                Some("checkouts/create"),
                "not JSON",
                Vec::new(),
                Bytes::from_static(b"{"),
                Utc::now(),
            )
            .await
            .unwrap();
        store.dead_letters(None, 1).await.unwrap()[0].id
    }

    /// The inbox row of `delivery_id`: (id, state, attempts, last error).
    async fn inbox_row(store: &Store, delivery_id: &str) -> (i64, String, i64, Option<String>) {
        const SQL: &str = "SELECT id, state, attempts, last_error FROM webhook_inbox
                           WHERE delivery_id = ";
        match &store.engine {
            Engine::Sqlite(_) => {
                let delivery_id = delivery_id.to_owned();
                store
                    .read_inbox(move |db| {
                        Ok(db.query_row(&format!("{SQL}?1"), [delivery_id], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })?)
                    })
                    .await
                    .unwrap()
            }
            Engine::Postgres(postgres) => {
                let client = postgres.database.client().await.unwrap();
                let r = client
                    .query_one(&format!("{SQL}$1"), &[&delivery_id])
                    .await
                    .unwrap();
                (r.get(0), r.get(1), r.get(2), r.get(3))
            }
        }
    }

    #[tokio::test]
    async fn a_replay_queues_a_letter_once_and_requeues_only_a_delivery_that_failed() {
        on_both(
            "a_replay_queues_a_letter_once_and_requeues_only_a_delivery_that_failed",
            async |store| {
                let now = Utc::now();
                assert!(store.stored_dead_letter(1).await.unwrap().is_none());

                // Not in the inbox: queued once; its state is followed.
                let first = keep_letter(&store, "d-1").await;
                let Replayed::Queued { inbox_id } =
                    store.replay_dead_letter(first, now).await.unwrap()
                else {
                    panic!("not queued")
                };
                let letter = store.stored_dead_letter(first).await.unwrap().unwrap();
                assert_eq!(
                    (letter.replayed_as, letter.replay_state.as_deref()),
                    (Some(inbox_id), Some("pending"))
                );
                assert_eq!(letter.topic.as_deref(), Some("checkouts/create"));
                assert_eq!(letter.body, b"{");
                // The worker takes the row and gives up on it.
                let due = store.due_webhooks(now, 10).await.unwrap();
                assert_eq!(due[0].id, inbox_id);
                assert_eq!(due[0].body, b"{");
                // Taken by the worker, the row is still pending to the operator.
                let letter = store.stored_dead_letter(first).await.unwrap().unwrap();
                assert_eq!(letter.replay_state.as_deref(), Some("pending"));
                store
                    .webhook_failed(inbox_id, "still unusable", now)
                    .await
                    .unwrap();
                let letter = store.stored_dead_letter(first).await.unwrap().unwrap();
                assert_eq!(letter.replay_state.as_deref(), Some("failed"));
                assert_eq!(letter.replay_error.as_deref(), Some("still unusable"));
                // Its replay failed: replaying it again puts that row back, as new.
                assert_eq!(
                    store.replay_dead_letter(first, now).await.unwrap(),
                    Replayed::Requeued { inbox_id }
                );
                assert_eq!(
                    inbox_row(&store, "d-1").await,
                    (inbox_id, "pending".into(), 0, None)
                );
                // A replay that did not fail is not replayed again.
                assert!(matches!(
                    store.replay_dead_letter(first, now).await.unwrap(),
                    Replayed::AlreadyReplayed { inbox_id: Some(id), .. } if id == inbox_id
                ));

                // The delivery is in the inbox already: pending is left alone, failed
                // is requeued.
                store.enqueue_webhook(event("d-2")).await.unwrap();
                store.enqueue_webhook(event("d-3")).await.unwrap();
                let failed = inbox_row(&store, "d-3").await.0;
                store.due_webhooks(now, 10).await.unwrap();
                store
                    .webhook_failed(failed, "vendor said no", now)
                    .await
                    .unwrap();
                let live = keep_letter(&store, "d-2").await;
                assert_eq!(
                    store.replay_dead_letter(live, now).await.unwrap(),
                    Replayed::AlreadyInInbox {
                        inbox_id: inbox_row(&store, "d-2").await.0,
                        state: "pending".into(),
                    }
                );
                let dead = keep_letter(&store, "d-3").await;
                assert_eq!(
                    store.replay_dead_letter(dead, now).await.unwrap(),
                    Replayed::Requeued { inbox_id: failed }
                );
                assert_eq!(inbox_row(&store, "d-3").await.1, "pending");
                assert_eq!(
                    store.replay_dead_letter(9_999, now).await.unwrap(),
                    Replayed::NotFound
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_letter_kept_without_a_delivery_id_is_replayed_under_its_own_id() {
        on_both(
            "a_letter_kept_without_a_delivery_id_is_replayed_under_its_own_id",
            async |store| {
                let id = keep_letter(&store, "unused").await;
                // As kept before dealsync stored delivery ids.
                inbox_execute(
                    &store,
                    &format!("UPDATE webhook_dead_letters SET delivery_id = NULL WHERE id = {id}"),
                )
                .await;
                let letter = store.stored_dead_letter(id).await.unwrap().unwrap();
                assert_eq!(letter.replay_delivery_id(), format!("dead-letter:{id}"));
                assert!(matches!(
                    store.replay_dead_letter(id, Utc::now()).await.unwrap(),
                    Replayed::Queued { .. }
                ));
                assert_eq!(
                    inbox_row(&store, &format!("dead-letter:{id}")).await.1,
                    "pending"
                );
            },
        )
        .await;
    }

    /// Several processes replaying one dead letter at once (the CLI beside replicas):
    /// one queues it, the others find it replayed; one inbox row.
    #[tokio::test]
    async fn a_letter_replayed_by_several_processes_at_once_is_queued_once() {
        let name = "a_letter_replayed_by_several_processes_at_once_is_queued_once";
        // PostgreSQL only: on SQLite every replay goes through the inbox's one writer.
        let Some(test) = crate::store::postgres::test_database(name) else {
            return;
        };
        let url = crate::store::postgres::tests::url_of(&test);
        let mut stores = Vec::new();
        for _ in 0..4 {
            stores.push(Store::open_postgres(&url).await.unwrap());
        }
        let id = keep_letter(&stores[0], "d-1").await;
        let other = keep_letter(&stores[0], "d-1").await;
        let now = Utc::now();
        let mut replays = tokio::task::JoinSet::new();
        for (n, store) in stores.iter().enumerate() {
            let store = store.clone();
            // Two processes on each of two letters of the same delivery.
            let letter = if n % 2 == 0 { id } else { other };
            replays.spawn(async move { store.replay_dead_letter(letter, now).await.unwrap() });
        }
        let outcomes = replays.join_all().await;
        let queued = outcomes
            .iter()
            .filter(|o| matches!(o, Replayed::Queued { .. }))
            .count();
        assert_eq!(queued, 1, "{outcomes:?}");
        let rows = stores[0].inbox_counts().await.unwrap().pending;
        assert_eq!(rows, 1, "{outcomes:?}");
        for letter in [id, other] {
            let stored = stores[0].stored_dead_letter(letter).await.unwrap().unwrap();
            assert!(stored.replayed_as.is_some(), "{stored:?}");
        }
    }
}
