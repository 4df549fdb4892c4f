//! Webhook intake on PostgreSQL: any replica stores a verified delivery durably before
//! its 2xx, with the same answers as the SQLite inbox (`Stored`, `Duplicate`, `Full`,
//! `Busy`, a store error) and the same group commit.
//!
//! Deliveries queue on bounded channels, one per writer task ([`WRITERS`] per process);
//! a writer takes what has queued (up to [`MAX_BATCH`]) and stores it with one
//! statement in one transaction (`unnest` of the batch's columns), committed with
//! `synchronous_commit = on` (the pool sets it on every connection, whatever the
//! server's default), and only then answers each delivery. While a batch commits the
//! next one gathers, so batches grow with the load and the commits per second stay
//! bounded by the server's WAL flushes. Two writers keep a batch executing on the
//! server while another commits or travels (with one, a core sat idle at saturation).
//! A delivery's writer is chosen by its connection and delivery id (its body's hash,
//! for body-only signers), so a redelivery meets its first copy in one writer's
//! order, as with a single writer.
//!
//! Invariants:
//! - A delivery is answered `Stored` or `Duplicate` only after the transaction that
//!   holds it (or found it) committed; a refusal wrote nothing.
//! - One delivery the database refuses (a NUL byte in its delivery id: PostgreSQL
//!   text cannot hold one) does not fail the others of its batch: a failed batch is
//!   stored again one delivery per transaction.
//! - `UNIQUE (connection, delivery_id)` decides duplicates across replicas: a replica
//!   that inserts a delivery another replica is committing waits for that commit and
//!   answers `Duplicate`. The body-hash window of body-only signers is checked
//!   against committed rows and the batch's earlier deliveries; two replicas storing
//!   the same body under two delivery ids at the same instant may both store it (the
//!   upsert of the deal it carries makes the second a no-op).
//! - A row and its headers and body are written in one statement.

use super::Database;
use super::inbox::OPEN_ROWS_PLAN;
use crate::store::inbox::{MAX_PENDING, QUEUE};
use crate::store::{EnqueueError, Enqueued, NewWebhook, Result, StoreError, to_json, to_ms};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::warn;

/// Most deliveries stored in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Writer tasks per process, each with its own batches and pooled connection.
const WRITERS: usize = 2;

/// How often the pending count is read again from the database (other replicas'
/// workers settle rows meanwhile).
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// The batch as one statement: the new rows, then their bodies, each delivery's
/// position (`ord`) returned when it was stored. A delivery whose body hash was seen
/// within its window (`since`) is left out, as is one whose delivery id is there.
const INSERT_BATCH: &str = "
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                         $6::bytea[], $7::bigint[], $8::text[], $9::bytea[])
        AS t(ord, connection, delivery_id, topic, received_at, body_sha256, since,
             headers, body)
), fresh AS (
    SELECT i.* FROM input i
    WHERE i.body_sha256 IS NULL OR NOT EXISTS (
        SELECT 1 FROM webhook_inbox w
        WHERE w.connection = i.connection AND w.body_sha256 = i.body_sha256
          AND w.received_at >= i.since)
), stored AS (
    INSERT INTO webhook_inbox (connection, delivery_id, topic, received_at, body_sha256)
    SELECT connection, delivery_id, topic, received_at, body_sha256 FROM fresh ORDER BY ord
    ON CONFLICT (connection, delivery_id) DO NOTHING
    RETURNING id, connection, delivery_id
), bodies AS (
    INSERT INTO webhook_bodies (id, headers, body)
    SELECT s.id, f.headers, f.body FROM stored s JOIN fresh f USING (connection, delivery_id)
)
SELECT f.ord FROM stored s JOIN fresh f USING (connection, delivery_id)";

type Reply = oneshot::Sender<Result<Enqueued>>;

/// State shared by the handles and the writer task.
struct Shared {
    /// Unprocessed rows in the database (`pending` or `claimed`), as last counted plus
    /// what this process stored since, less what it settled.
    pending: AtomicU64,
    /// Notified after every committed batch that stored a new delivery.
    committed: Notify,
    /// A recount is under way.
    recounting: AtomicBool,
    /// When the writer last started a recount.
    recounted: Mutex<Option<Instant>>,
    /// When the worker last had the count read again ([`Intake::recount_when_idle`]).
    idle_recounted: Mutex<Option<Instant>>,
}

/// A process's intake into the shared inbox; cheap to clone. The writer tasks end
/// when the last handle is dropped.
#[derive(Clone)]
pub struct Intake {
    queues: Arc<[mpsc::Sender<(NewWebhook, Reply)>]>,
    shared: Arc<Shared>,
}

impl Intake {
    /// Counts the pending rows and starts the writer tasks.
    pub async fn start(database: Database) -> Result<Intake> {
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(count_pending(&database).await?),
            committed: Notify::new(),
            recounting: AtomicBool::new(false),
            recounted: Mutex::new(Some(Instant::now())),
            idle_recounted: Mutex::new(None),
        });
        let queues = (0..WRITERS)
            .map(|_| {
                let (queue, requests) = mpsc::channel(QUEUE / WRITERS);
                tokio::spawn(run_writer(database.clone(), requests, shared.clone()));
                queue
            })
            .collect();
        Ok(Intake { queues, shared })
    }

    /// Stores a verified delivery (grouped with concurrent ones into one transaction)
    /// and returns once it is committed. Refuses it, writing nothing, when the inbox
    /// holds [`MAX_PENDING`] unprocessed rows or its writer has a [`WRITERS`]th of
    /// [`QUEUE`] deliveries waiting already.
    pub async fn enqueue(&self, event: NewWebhook) -> Result<Enqueued, EnqueueError> {
        let pending = self.pending();
        if pending >= MAX_PENDING {
            return Err(EnqueueError::Full { pending });
        }
        let (reply, answer) = oneshot::channel();
        self.queues[writer_of(&event)]
            .try_send((event, reply))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => EnqueueError::Busy,
                mpsc::error::TrySendError::Closed(_) => stopped().into(),
            })?;
        Ok(answer.await.map_err(|_| stopped())??)
    }

    /// Unprocessed rows, as last counted (no query).
    pub fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Notified after every committed batch that stored a new delivery.
    pub fn committed(&self) -> &Notify {
        &self.shared.committed
    }

    /// After this process put `rows` back into the inbox (a dead letter replayed).
    pub fn added(&self, rows: u64) {
        self.shared.pending.fetch_add(rows, Ordering::Relaxed);
    }

    /// After this process settled `rows` for good (processed or failed).
    pub fn settled(&self, rows: u64) {
        // Saturating: the count is advisory (backpressure), never below zero.
        let _ = self
            .shared
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pending| {
                Some(pending.saturating_sub(rows))
            });
    }

    /// Counts the unprocessed rows again (other replicas settle rows too): the writer
    /// does it as deliveries come, this is for a process that refuses them.
    pub async fn recount(&self, database: &Database) -> Result<u64> {
        self.shared.count(database).await
    }

    /// [`Intake::recount`] for a worker that found nothing due, at most once a second:
    /// with replicas a worker finds nothing due many times a second while another
    /// replica applies the rows.
    pub async fn recount_when_idle(&self, database: &Database) -> Result<u64> {
        if !once_a_second(&self.shared.idle_recounted, || true) {
            return Ok(self.pending());
        }
        self.recount(database).await
    }
}

/// The writer a delivery goes to: by what decides that it is a duplicate, so that two
/// copies of one delivery are stored by one writer, one after the other.
fn writer_of(event: &NewWebhook) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    event.connection.hash(&mut hasher);
    match &event.body_sha256 {
        Some((sha256, _)) => sha256.hash(&mut hasher),
        None => event.delivery_id.hash(&mut hasher),
    }
    (hasher.finish() % WRITERS as u64) as usize
}

fn stopped() -> StoreError {
    StoreError::Task("the webhook intake stopped".into())
}

/// The unprocessed rows: read from the open rows' index, whatever the inbox keeps
/// (run after [`OPEN_ROWS_PLAN`]).
pub(super) const COUNT_PENDING: &str =
    "SELECT count(*) FROM webhook_inbox WHERE state IN ('pending', 'claimed')";

async fn count_pending(database: &Database) -> Result<u64> {
    let mut client = database.client().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(OPEN_ROWS_PLAN).await?;
    let row = tx.query_one(COUNT_PENDING, &[]).await?;
    tx.commit().await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

async fn run_writer(
    database: Database,
    mut requests: mpsc::Receiver<(NewWebhook, Reply)>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (events, replies): (Vec<NewWebhook>, Vec<Reply>) = batch.drain(..).unzip();
        let answers = match store_batch(&database, &events).await {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            // A transaction the database refused as a whole: each delivery again on
            // its own, so one bad delivery fails alone. When the database is down,
            // each fails fast the same way.
            Err(error) if !error.is_transient() => {
                warn!(%error, deliveries = events.len(), "storing a webhook batch failed; storing its deliveries one by one");
                let mut answers = Vec::with_capacity(events.len());
                for event in &events {
                    answers.push(
                        store_batch(&database, std::slice::from_ref(event))
                            .await
                            .map(|mut one| one.remove(0)),
                    );
                }
                answers
            }
            Err(error) => {
                let shown = error.to_string();
                let mut answers = vec![Err(error)];
                answers.extend((1..events.len()).map(|_| Err(again(&shown))));
                answers
            }
        };
        let stored = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(Enqueued::Stored)))
            .count() as u64;
        shared.pending.fetch_add(stored, Ordering::Relaxed);
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that gave up (its client went away) needs no answer.
            let _ = reply.send(answer);
        }
        if stored > 0 {
            shared.committed.notify_waiters();
            // The other replicas' inbox workers may take them first.
            database.announce(super::notify::INBOX);
        }
        // The count beside the writer, never before an answer or the next batch: a
        // query in the writer's path held every delivery waiting meanwhile (the
        // fixed-rate p99 in BENCHMARKS.md).
        if shared.recount_due() {
            tokio::spawn(recount(database.clone(), shared.clone()));
        }
    }
}

impl Shared {
    /// Whether the writer is to count again now (a second since its last count, none
    /// under way); if so, the count is marked under way.
    fn recount_due(&self) -> bool {
        once_a_second(&self.recounted, || {
            !self.recounting.swap(true, Ordering::AcqRel)
        })
    }

    /// Sets the pending count from the database.
    async fn count(&self, database: &Database) -> Result<u64> {
        let pending = count_pending(database).await?;
        self.pending.store(pending, Ordering::Relaxed);
        Ok(pending)
    }
}

/// Whether a second has passed since `last` (or it is unset) and `also` holds (asked
/// only then); if so, `last` becomes now.
fn once_a_second(last: &Mutex<Option<Instant>>, also: impl FnOnce() -> bool) -> bool {
    let mut last = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if last.is_some_and(|at| at.elapsed() < RECOUNT_EVERY) || !also() {
        return false;
    }
    *last = Some(Instant::now());
    true
}

/// Sets the pending count from the database beside the writer; one at a time
/// (`Shared::recounting`).
async fn recount(database: Database, shared: Arc<Shared>) {
    let _ = shared.count(&database).await;
    shared.recounting.store(false, Ordering::Release);
}

/// The same failure for the other deliveries of a batch (the error itself is not
/// `Clone`): transient, so the sender hears 503 and retries.
fn again(shown: &str) -> StoreError {
    StoreError::Unavailable(shown.to_owned())
}

/// Stores `events` in one transaction; returns what became of each, in order.
async fn store_batch(database: &Database, events: &[NewWebhook]) -> Result<Vec<Enqueued>> {
    let mut answers = vec![Enqueued::Duplicate; events.len()];
    // Within the batch: a delivery id, or a body within its window, seen earlier in
    // the batch is a duplicate of it and is not sent.
    let mut ids = HashSet::new();
    let mut bodies = HashSet::new();
    let mut columns = Columns::default();
    for (ord, event) in events.iter().enumerate() {
        if !ids.insert((event.connection.as_str(), event.delivery_id.as_str())) {
            continue;
        }
        if let Some((sha256, _)) = &event.body_sha256
            && !bodies.insert((event.connection.as_str(), *sha256))
        {
            continue;
        }
        columns.push(ord, event)?;
    }
    if columns.ord.is_empty() {
        return Ok(answers);
    }
    let mut client = database.client().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            INSERT_BATCH,
            &[
                &columns.ord,
                &columns.connection,
                &columns.delivery_id,
                &columns.topic,
                &columns.received_at,
                &columns.body_sha256,
                &columns.since,
                &columns.headers,
                &columns.body,
            ],
        )
        .await?;
    tx.commit().await?;
    for row in rows {
        let ord: i64 = row.get(0);
        if let Some(answer) = usize::try_from(ord).ok().and_then(|i| answers.get_mut(i)) {
            *answer = Enqueued::Stored;
        }
    }
    Ok(answers)
}

/// The batch's columns, one array each, as `INSERT_BATCH` takes them.
#[derive(Default)]
struct Columns<'a> {
    ord: Vec<i64>,
    connection: Vec<&'a str>,
    delivery_id: Vec<&'a str>,
    topic: Vec<Option<&'a str>>,
    received_at: Vec<i64>,
    body_sha256: Vec<Option<&'a [u8]>>,
    since: Vec<Option<i64>>,
    headers: Vec<String>,
    body: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, ord: usize, event: &'a NewWebhook) -> Result<()> {
        self.ord.push(ord as i64);
        self.connection.push(&event.connection);
        self.delivery_id.push(&event.delivery_id);
        self.topic.push(event.topic.as_deref());
        self.received_at.push(to_ms(event.received_at));
        self.body_sha256
            .push(event.body_sha256.as_ref().map(|(sha256, _)| &sha256[..]));
        self.since
            .push(event.body_sha256.as_ref().map(|(_, window)| {
                chrono::Duration::from_std(*window)
                    .ok()
                    .and_then(|window| event.received_at.checked_sub_signed(window))
                    .map_or(i64::MIN, to_ms)
            }));
        self.headers.push(to_json(&event.headers)?);
        self.body.push(&event.body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::url_of;
    use super::super::{Options, test_cluster, test_database};
    use super::*;
    use crate::store::tests::webhook as delivery;
    use chrono::Utc;

    async fn intake(database: &test_cluster::TestDatabase) -> Intake {
        let database = Database::open(&url_of(database), &Options::default())
            .await
            .unwrap();
        Intake::start(database).await.unwrap()
    }

    /// `(delivery id, body)` of every stored row, in id order.
    async fn stored(database: &test_cluster::TestDatabase) -> Vec<(String, Vec<u8>)> {
        database
            .admin()
            .await
            .query(
                "SELECT w.delivery_id, b.body FROM webhook_inbox w
                 JOIN webhook_bodies b ON b.id = w.id ORDER BY w.id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    async fn answers(
        intake: &Intake,
        deliveries: Vec<NewWebhook>,
    ) -> Vec<Result<Enqueued, EnqueueError>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (n, event) in deliveries.into_iter().enumerate() {
            let intake = intake.clone();
            tasks.spawn(async move { (n, intake.enqueue(event).await) });
        }
        let mut answers: Vec<_> = tasks.join_all().await;
        answers.sort_by_key(|(n, _)| *n);
        answers.into_iter().map(|(_, answer)| answer).collect()
    }

    fn tally(answers: &[Result<Enqueued, EnqueueError>]) -> (usize, usize, usize) {
        let stored = answers
            .iter()
            .filter(|a| matches!(a, Ok(Enqueued::Stored)))
            .count();
        let duplicate = answers
            .iter()
            .filter(|a| matches!(a, Ok(Enqueued::Duplicate)))
            .count();
        (stored, duplicate, answers.len() - stored - duplicate)
    }

    /// Concurrent deliveries are committed in batches, each once with its body;
    /// a redelivery, in the same batch or a later one, is acknowledged as a duplicate.
    #[tokio::test]
    async fn concurrent_deliveries_are_stored_once_with_their_bodies() {
        let name = "concurrent_deliveries_are_stored_once_with_their_bodies";
        let Some(database) = test_database(name) else {
            return;
        };
        let intake = intake(&database).await;
        let first: Vec<_> = (0..300)
            .map(|n| delivery("shop", &format!("d{n}")))
            .chain((0..100).map(|n| delivery("shop", &format!("d{n}"))))
            .collect();
        let got = answers(&intake, first).await;
        assert_eq!(tally(&got), (300, 100, 0));
        let again = answers(&intake, vec![delivery("shop", "d7")]).await;
        assert!(matches!(again[0], Ok(Enqueued::Duplicate)));
        // Another connection's delivery of the same id is its own.
        let other = answers(&intake, vec![delivery("crm", "d7")]).await;
        assert!(matches!(other[0], Ok(Enqueued::Stored)));

        let rows = stored(&database).await;
        assert_eq!(rows.len(), 301);
        let mut ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
        for (id, body) in &rows {
            assert_eq!(body, format!(r#"{{"id":"{id}"}}"#).as_bytes());
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 300, "d7 twice: once per connection");
        assert_eq!(intake.pending(), 301);
    }

    /// Two replicas taking the same deliveries at once store each once: the other
    /// replica's answer is `Duplicate`, never a second row.
    #[tokio::test]
    async fn two_replicas_store_each_delivery_once() {
        let Some(database) = test_database("two_replicas_store_each_delivery_once") else {
            return;
        };
        let (one, two) = (intake(&database).await, intake(&database).await);
        let deliveries: Vec<_> = (0..500)
            .map(|n| delivery("shop", &format!("r{n}")))
            .collect();
        let (a, b) = tokio::join!(answers(&one, deliveries.clone()), answers(&two, deliveries));
        let (stored_a, duplicate_a, failed_a) = tally(&a);
        let (stored_b, duplicate_b, failed_b) = tally(&b);
        assert_eq!((failed_a, failed_b), (0, 0));
        assert_eq!(stored_a + stored_b, 500);
        assert_eq!(duplicate_a + duplicate_b, 500);
        for (n, (a, b)) in a.iter().zip(&b).enumerate() {
            let pair = (a.as_ref().ok().copied(), b.as_ref().ok().copied());
            assert!(
                pair == (Some(Enqueued::Stored), Some(Enqueued::Duplicate))
                    || pair == (Some(Enqueued::Duplicate), Some(Enqueued::Stored)),
                "r{n}: {pair:?}"
            );
        }
        assert_eq!(stored(&database).await.len(), 500);
    }

    /// A body-only signer's body seen again within its window is a duplicate under
    /// any delivery id, in the same batch or a later one; outside the window it is a
    /// new delivery.
    #[tokio::test]
    async fn a_body_seen_within_its_window_is_a_duplicate_under_any_delivery_id() {
        let name = "a_body_seen_within_its_window_is_a_duplicate_under_any_delivery_id";
        let Some(database) = test_database(name) else {
            return;
        };
        let intake = intake(&database).await;
        let hour = Duration::from_secs(3600);
        let signed = |id: &str, hash: u8, received: chrono::DateTime<Utc>| NewWebhook {
            body_sha256: Some(([hash; 32], hour)),
            received_at: received,
            ..delivery("pipedrive", id)
        };
        let now = Utc::now();
        let old = now - chrono::Duration::hours(2);
        assert!(matches!(
            answers(&intake, vec![signed("old", 1, old)]).await[0],
            Ok(Enqueued::Stored)
        ));
        let got = answers(
            &intake,
            vec![
                signed("a", 1, now),
                signed("b", 2, now),
                signed("c", 2, now),
            ],
        )
        .await;
        let got: Vec<_> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            got,
            [Enqueued::Stored, Enqueued::Stored, Enqueued::Duplicate],
            "the body of two hours ago is outside the window; c repeats b's body"
        );
        let later = answers(&intake, vec![signed("d", 1, now)]).await;
        assert!(matches!(later[0], Ok(Enqueued::Duplicate)));
        // "a" and "b" have different bodies, so two writers may commit them in
        // either order: which rows are kept is the contract, not their ids' order.
        let mut ids: Vec<String> = stored(&database).await.into_iter().map(|r| r.0).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b", "old"]);
    }

    /// Planned from statistics taken during a burst (every row open then), the
    /// pending count reads the open rows' index, not the table: before, it scanned the
    /// whole inbox for the few rows open (in parallel, with two more server processes,
    /// once the table was big enough: 45 ms and 40 MB a count at 220,000 rows).
    #[tokio::test]
    async fn the_pending_count_reads_the_open_rows_index_whatever_the_statistics_say() {
        let name = "the_pending_count_reads_the_open_rows_index_whatever_the_statistics_say";
        let Some(test) = test_database(name) else {
            return;
        };
        // One connection, so the count's statistics can be flushed from it below.
        let options = Options {
            max_connections: 1,
            ..Options::default()
        };
        let database = Database::open(&url_of(&test), &options).await.unwrap();
        let admin = test.admin().await;
        for statement in [
            "ALTER TABLE webhook_inbox SET (autovacuum_enabled = false)",
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 SELECT 'shop', 'burst-' || n, n FROM generate_series(1, 20000) AS n",
            "ANALYZE webhook_inbox",
            "UPDATE webhook_inbox SET state = 'processed', processed_at = 1",
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 SELECT 'shop', 'new-' || n, n FROM generate_series(1, 3) AS n",
        ] {
            admin.batch_execute(statement).await.unwrap();
        }
        let plan = |guarded: bool| {
            let admin = &admin;
            async move {
                admin.batch_execute("BEGIN").await.unwrap();
                if guarded {
                    admin.batch_execute(OPEN_ROWS_PLAN).await.unwrap();
                }
                let explain = format!("EXPLAIN {COUNT_PENDING}");
                let rows = admin.query(&explain, &[]).await.unwrap();
                admin.batch_execute("COMMIT").await.unwrap();
                rows.iter()
                    .map(|row| row.get::<_, String>(0))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        };
        let misled = plan(false).await;
        assert!(
            misled.contains("Seq Scan"),
            "the statistics should lead the planner to the table:\n{misled}"
        );
        let planned = plan(true).await;
        assert!(
            planned.contains("Index Only Scan using webhook_inbox_open")
                && !planned.contains("Seq Scan")
                && !planned.contains("Gather"),
            "{planned}"
        );
        // And the count itself took that plan: it scanned the open rows' index, which
        // nothing above scans (statistics reach other sessions once flushed).
        assert_eq!(count_pending(&database).await.unwrap(), 3);
        let counter = database.client().await.unwrap();
        counter
            .batch_execute("SELECT pg_stat_force_next_flush()")
            .await
            .unwrap();
        drop(counter);
        let mut index_scans = 0;
        for _ in 0..100 {
            index_scans = admin
                .query_one(
                    "SELECT idx_scan FROM pg_stat_user_indexes
                      WHERE indexrelname = 'webhook_inbox_open'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            if index_scans > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            index_scans, 1,
            "the count did not read the open rows' index"
        );
    }

    /// A body is compressed with lz4 where the server has it, never with pglz
    /// (which took a tenth of the server's CPU under load).
    #[tokio::test]
    async fn a_body_is_compressed_with_lz4_where_the_server_has_it() {
        let name = "a_body_is_compressed_with_lz4_where_the_server_has_it";
        let Some(database) = test_database(name) else {
            return;
        };
        let intake = intake(&database).await;
        let body = format!(r#"{{"note":"{}"}}"#, "checkout ".repeat(400));
        let event = NewWebhook {
            body: body.into_bytes().into(),
            ..delivery("shop", "a")
        };
        assert!(matches!(intake.enqueue(event).await, Ok(Enqueued::Stored)));
        let admin = database.admin().await;
        let has_lz4: bool = admin
            .query_one(
                "SELECT 'lz4' = ANY (enumvals) FROM pg_settings
                  WHERE name = 'default_toast_compression'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let compression: Option<String> = admin
            .query_one(
                "SELECT pg_column_compression(body) FROM webhook_bodies",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let expected = if has_lz4 { "lz4" } else { "pglz" };
        assert_eq!(compression.as_deref(), Some(expected));
    }

    /// A delivery PostgreSQL cannot hold (a NUL byte in its id) fails alone: the
    /// deliveries committed in its batch are stored and acknowledged.
    #[tokio::test]
    async fn a_delivery_the_database_refuses_fails_alone() {
        let Some(database) = test_database("a_delivery_the_database_refuses_fails_alone") else {
            return;
        };
        let intake = intake(&database).await;
        let mut deliveries: Vec<_> = (0..50)
            .map(|n| delivery("shop", &format!("ok{n}")))
            .collect();
        deliveries.insert(25, delivery("shop", "bad\0id"));
        let got = answers(&intake, deliveries).await;
        assert_eq!(tally(&got), (50, 0, 1));
        let refused = got[25].as_ref().unwrap_err();
        assert!(refused.retry_after().is_none(), "{refused}");
        assert_eq!(stored(&database).await.len(), 50);
    }

    /// While the server is out of reach a delivery is refused with a time to retry
    /// after (503 + `Retry-After` over HTTP) and nothing is acknowledged; once it is
    /// back, deliveries are stored again without a restart.
    #[tokio::test]
    async fn while_the_server_is_out_of_reach_deliveries_are_refused_for_a_retry() {
        let name = "while_the_server_is_out_of_reach_deliveries_are_refused_for_a_retry";
        let Some(database) = test_database(name) else {
            return;
        };
        let relay = test_cluster::Relay::start(database.port).await;
        let behind = test_cluster::TestDatabase {
            port: relay.port(),
            ..database.clone()
        };
        let intake = intake(&behind).await;
        assert!(matches!(
            intake.enqueue(delivery("shop", "before")).await,
            Ok(Enqueued::Stored)
        ));
        relay.cut().await;
        for id in ["during-1", "during-2"] {
            let refused = intake.enqueue(delivery("shop", id)).await.unwrap_err();
            assert_eq!(
                refused.retry_after(),
                Some(Duration::from_secs(5)),
                "{refused}"
            );
            let shown = refused.to_string();
            assert!(!shown.contains(test_cluster::PASSWORD), "{shown}");
        }
        relay.restore().await;
        assert!(matches!(
            intake.enqueue(delivery("shop", "after")).await,
            Ok(Enqueued::Stored)
        ));
        let ids: Vec<String> = stored(&database).await.into_iter().map(|r| r.0).collect();
        assert_eq!(ids, ["before", "after"]);
    }
}
