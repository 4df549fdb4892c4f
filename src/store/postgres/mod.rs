//! PostgreSQL, the store's second backend (`storage.url`), for several dealsync
//! processes sharing one database. What exists so far: the connection pool, the
//! schema (every table and index of the SQLite database and webhook inbox, see
//! `migrations/0001_initial.sql`) and its migrations, the schema check of
//! `dealsync check`, the copy of a SQLite install (`from_sqlite`, for `dealsync
//! migrate-store`), and the coordination replicas will use ([`leases`]: leases,
//! fencing, the lease keeper, leadership; [`claims`]: `FOR UPDATE SKIP LOCKED`
//! claims; `migrations/0002_replicas.sql`; [`rate`]: the request rate and daily
//! vendor budget replicas share, `migrations/0003_rate_limits.sql`), and every query
//! of the store: [`super::Store`] calls the method of the same name and contract here.
//! Across replicas: deal writes serialize per deal (advisory locks, `deals`); the
//! inbox, outbox and digests are claimed `FOR UPDATE SKIP LOCKED` under this process's
//! [`replica_id`] (`inbox`, `outbox`, `digests`, `ledger`); the stage-history feed hands
//! out only settled ids (`stage_feed`).
//!
//! Connections come from a `deadpool-postgres` pool over `tokio-postgres` (async, no
//! database needed to compile; the pool recycles connections and bounds how many a
//! process opens). Each connection has a connect timeout, TCP keepalives (a dead
//! server or a partition is noticed within about a minute instead of the kernel's two
//! hours), and a `statement_timeout`, so a stuck statement cannot hold a worker; a
//! new pooled connection also asks for early writeback of the pages it writes
//! ([`WRITEBACK_AFTER`]), and opening the store asks the same for every session of
//! the database, the server's vacuum workers included ([`DATABASE_WRITEBACK_AFTER`]),
//! so a checkpoint's flush does not stall the commits.
//!
//! Invariants:
//! - Migrations are embedded and applied in one transaction that first takes a
//!   transaction-level advisory lock: processes starting together migrate once, the
//!   others wait and then find the schema current.
//! - A database whose schema is newer than this binary's is refused and left
//!   untouched: the version is read under the lock, before anything is written, and
//!   the transaction is rolled back.
//! - Errors name the server as `host:port/database`, never the password.

mod carts;
pub mod claims;
mod copy_rows;
mod dead_letters;
mod deal_changes;
mod deals;
mod delivery;
mod digests;
pub mod from_sqlite;
mod inbox;
pub mod intake;
pub mod leases;
pub(in crate::store) mod ledger;
mod migrations;
pub mod notify;
mod outbox;
mod people;
pub mod rate;
mod report;
mod session_lock;
mod stage_feed;
mod status;
mod suppression;
pub(in crate::store) mod sync;
mod tls;
mod writeback;

pub use migrations::SCHEMA_VERSION;

use super::{DbError, Result, StoreError};
use crate::config::PostgresUrl;
use std::time::Duration;

/// A name for this process among the replicas sharing a database, unique across
/// hosts and restarts: `host-pid-random`. Leases and claims record it, so `/readyz` and
/// `pg_stat_activity` say which replica holds what.
pub fn replica_id() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

/// A duration as the milliseconds the statements turn into an interval
/// (`$n::bigint * interval '1 millisecond'`).
pub(super) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// No connection to the server could be made: names it and says what to do.
#[derive(Debug, thiserror::Error)]
#[error("connecting to PostgreSQL at {target}: {cause}; {hint}")]
pub struct ConnectError {
    /// `host:port/database`, never the password.
    pub target: String,
    /// The source and its causes in one line (the OS error last), so that the hint
    /// can follow them.
    pub cause: String,
    /// What to do about it.
    pub hint: String,
    #[source]
    pub source: DbError,
}

/// A statement the server could not complete because it went out of reach or refused
/// work: names it and says what to do.
#[derive(Debug, thiserror::Error)]
#[error(
    "PostgreSQL at {target} could not complete the work: {cause}; nothing of it was \
     committed, so it is done again on the next attempt; check that the server runs and \
     is reachable from this host"
)]
pub struct Unavailable {
    /// `host:port/database`, never the password.
    pub target: String,
    /// The source and its causes in one line.
    pub cause: String,
    #[source]
    pub source: DbError,
}

/// Run on each new pooled connection: the kernel is asked to write a session's data
/// pages out once it has written 256 kB (`backend_flush_after`), where the server's
/// administrator chose nothing for it (the setting's source is still `default`; a
/// value from the server's configuration, `ALTER ROLE` or `ALTER DATABASE` is kept; a
/// server without the setting is left alone). The default, 0, leaves the pages a
/// session evicts from the server's small shared buffers dirty in the page cache until
/// the next checkpoint's `fsync` writes them all at once, and that flush held every
/// commit back: webhook acknowledgements of 100–250 ms at 2,000/s (BENCHMARKS.md).
const WRITEBACK_AFTER: &str = "SELECT set_config('backend_flush_after', '256kB', false)
      FROM pg_settings WHERE name = 'backend_flush_after' AND source = 'default'";

/// Run at open, under the migration lock: the statement that asks for the same early
/// writeback in every session of the database (`ALTER DATABASE … SET`), the server's
/// autovacuum workers included, which no pool hook reaches. Vacuuming the inbox, the
/// bodies and the deals after a burst dirties 100–300 MB of pages in a few seconds;
/// left in the page cache, they were flushed by the next checkpoint's `fsync` with
/// the commits waiting behind it. No row (nothing to do) when the administrator chose
/// a value anywhere (the server's configuration, the role, the database: the source
/// of a pooled connection's value is then not `default`, nor `session`, which is
/// [`WRITEBACK_AFTER`]'s), when the database already carries one, or when dealsync's
/// role does not own the database (only its owner may set its defaults).
const DATABASE_WRITEBACK_AFTER: &str = "
    SELECT format('ALTER DATABASE %I SET backend_flush_after = %L', d.datname, '256kB')
      FROM pg_database AS d
     WHERE d.datname = current_database() AND pg_has_role(d.datdba, 'USAGE')
       AND EXISTS (SELECT 1 FROM pg_settings
                    WHERE name = 'backend_flush_after' AND source IN ('default', 'session'))
       AND NOT EXISTS (SELECT 1 FROM pg_db_role_setting AS s, unnest(s.setconfig) AS c
                        WHERE s.setdatabase = d.oid AND s.setrole = 0
                          AND c LIKE 'backend_flush_after=%')";

/// How the pool connects; [`Options::default`] is what the daemon uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections the pool keeps open at most.
    pub max_connections: usize,
    /// How long opening a connection (TCP, authentication) may take.
    pub connect_timeout: Duration,
    /// How long one statement may run before the server cancels it.
    pub statement_timeout: Duration,
    /// Idle time before the first TCP keepalive probe.
    pub keepalive_idle: Duration,
    /// How long a caller waits for a free connection when all are busy.
    pub wait_timeout: Duration,
    /// How long the rows of the work queues a replica claims stay its own without a new
    /// pass (`inbox`): past it, a replica that died or stalled loses them to the others.
    pub work_claim_ttl: Duration,
    /// How long a replica's claim on an email it is sending holds (`ledger`): beyond an
    /// SMTP exchange's timeouts. Past it, another replica makes the row `uncertain`
    /// (never resent); a late `sent` from its sender still counts for the outbox.
    pub send_claim_ttl: Duration,
    /// Listen for the other replicas' announcements (`notify`): one more connection,
    /// outside the pool. The daemon does; a CLI command does not.
    pub listen: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            keepalive_idle: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(30),
            work_claim_ttl: Duration::from_secs(60),
            send_claim_ttl: Duration::from_secs(600),
            listen: false,
        }
    }
}

/// What a database holds of dealsync's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// No `schema_version` table: nothing of dealsync's.
    Absent,
    /// The version this binary writes.
    Current(i64),
    /// An older version, which opening the store migrates.
    Older { found: i64, supported: i64 },
    /// A newer version, which this binary refuses.
    Newer { found: i64, supported: i64 },
}

impl std::fmt::Display for SchemaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaState::Absent => f.write_str("no dealsync schema yet"),
            SchemaState::Current(version) => write!(f, "schema version {version}, current"),
            SchemaState::Older { found, supported } => write!(
                f,
                "schema version {found}, older than this dealsync's {supported}"
            ),
            SchemaState::Newer { found, supported } => write!(
                f,
                "schema version {found}, newer than this dealsync understands ({supported}): upgrade dealsync"
            ),
        }
    }
}

/// A pool of connections to one PostgreSQL database; cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: deadpool_postgres::Pool,
    url: PostgresUrl,
    /// How the pool connects; the notification listener connects the same way.
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// This process's announcer (`notify`).
    announcements: tokio::sync::mpsc::Sender<&'static str>,
    /// `Options::work_claim_ttl` and `send_claim_ttl`.
    work_claim_ttl: Duration,
    send_claim_ttl: Duration,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.url.to_string())
            .finish()
    }
}

impl Database {
    /// Connects (one connection, so a wrong address or password fails here) and
    /// changes nothing in the database.
    pub async fn connect(url: &PostgresUrl, options: &Options) -> Result<Database> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&url.host)
            .port(url.port)
            .user(&url.user)
            .dbname(&url.database)
            .application_name("dealsync")
            .connect_timeout(options.connect_timeout)
            .keepalives(true)
            .keepalives_idle(options.keepalive_idle)
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            // Durable before acknowledged, whatever the server's default: a commit
            // returns once its WAL is flushed.
            .options(format!(
                "-c statement_timeout={} -c synchronous_commit=on",
                options.statement_timeout.as_millis()
            ));
        if let Some(password) = &url.password {
            config.password(password.expose());
        }
        let tls = tls::connector(url, &mut config)?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                // Checks only that the connection is not closed: a query per checkout
                // would double the round trips.
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(options.max_connections)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(WRITEBACK_AFTER)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)
                })
            }))
            .build()
            .map_err(|error| StoreError::Task(format!("building the connection pool: {error}")))?;
        let database = Database {
            announcements: notify::announcer(pool.clone()),
            pool,
            config,
            tls,
            url: url.clone(),
            work_claim_ttl: options.work_claim_ttl,
            send_claim_ttl: options.send_claim_ttl,
        };
        drop(database.client().await?);
        Ok(database)
    }

    /// Connects and migrates: the store's open. Refuses a newer schema, untouched.
    pub async fn open(url: &PostgresUrl, options: &Options) -> Result<Database> {
        let database = Database::connect(url, options).await?;
        database.migrate().await?;
        Ok(database)
    }

    /// `error` naming this server when it says the server is out of reach or refused
    /// the work (`StoreError::PostgresUnavailable`); any other error as it is.
    pub(crate) fn named(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::Database(source) if source.is_unavailable() => {
                StoreError::PostgresUnavailable(Box::new(Unavailable {
                    target: self.target(),
                    cause: one_line(&source),
                    source,
                }))
            }
            other => other,
        }
    }

    /// `host:port/database`.
    pub fn target(&self) -> String {
        self.url.to_string()
    }

    /// A connection from the pool. A failure to open one names the server and what to
    /// do about it.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|error| {
            if let deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) =
                error
            {
                // Connected, but every connection stayed busy: no connect problem.
                return StoreError::Database(error.into());
            }
            let error = DbError::from(error);
            StoreError::PostgresConnect(Box::new(ConnectError {
                target: self.target(),
                cause: one_line(&error),
                hint: connect_hint(&error, &self.url),
                source: error,
            }))
        })
    }

    /// What the database holds of dealsync's schema. Reads only.
    pub async fn schema_state(&self) -> Result<SchemaState> {
        let client = self.client().await?;
        let found = migrations::current_version(&**client).await?;
        Ok(migrations::state(found))
    }

    /// Applies the missing migrations in one transaction under the migration lock;
    /// returns the versions applied (none when the schema was current).
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        let mut client = self.client().await?;
        migrations::migrate(&mut client, &self.target()).await
    }
}

/// `error` and each of its causes not already in the text, joined by `: `.
fn one_line(error: &DbError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let line = cause.to_string();
        if !line.is_empty() && !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// What to do about a failure to connect, from what the server (or the OS) said.
fn connect_hint(error: &DbError, url: &PostgresUrl) -> String {
    use tokio_postgres::error::SqlState;
    let host_port = url.host_port();
    match error.sql_state() {
        Some(state)
            if *state == SqlState::INVALID_PASSWORD
                || *state == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            format!(
                "the server refused user {:?} or its password: check the user in storage.url and the credential that holds the password (or the server's pg_hba.conf)",
                url.user
            )
        }
        Some(state) if *state == SqlState::INVALID_CATALOG_NAME => format!(
            "there is no database {:?} on {host_port}: create it (createdb -O {} {}) or fix storage.url",
            url.database, url.user, url.database
        ),
        Some(state) if *state == SqlState::INSUFFICIENT_PRIVILEGE => format!(
            "user {:?} may not connect to database {:?}: GRANT CONNECT to it",
            url.user, url.database
        ),
        Some(state) if *state == SqlState::TOO_MANY_CONNECTIONS => {
            "the server has no connection slot free: raise its max_connections or run fewer dealsync processes".to_owned()
        }
        Some(state) if *state == SqlState::CANNOT_CONNECT_NOW => {
            "the server is starting up or shutting down: try again shortly".to_owned()
        }
        _ => format!(
            "check that PostgreSQL runs and accepts TCP connections on {host_port} (listen_addresses, pg_hba.conf, a firewall) and that storage.url names that host and port"
        ),
    }
}

/// Whether a PostgreSQL error is the server's or the connection's state rather than
/// the statement's: a connection lost, refused or timed out, the server shutting down
/// or starting, a serialization failure or deadlock, resources exhausted (connection
/// slots, disk, memory), a lock not available, a read-only server (a failover moved
/// the primary). Constraint violations and bad SQL are not.
pub(super) fn is_transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(state) => {
            let code = state.code();
            // Class 08: connection exception; class 53: insufficient resources
            // (53100 disk full, 53200 out of memory, 53300 too many connections).
            code.starts_with("08")
                || code.starts_with("53")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::READ_ONLY_SQL_TRANSACTION,
                ]
                .contains(state)
        }
        // No SQLSTATE: the client's side. An I/O error underneath (refused, reset,
        // timed out) is the connection's state; anything else (a value that does not
        // convert) is not.
        None => {
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                if cause.is::<std::io::Error>() {
                    return true;
                }
                source = cause.source();
            }
            false
        }
    }
}

#[cfg(test)]
pub(crate) mod test_cluster;

/// A fresh database in this test process's throwaway cluster, or `None` after
/// skipping `test` by the rule of `test_skip` when PostgreSQL is not installed.
#[cfg(test)]
pub(crate) fn test_database(test: &str) -> Option<test_cluster::TestDatabase> {
    match test_cluster::cluster() {
        Ok(cluster) => Some(cluster.create_database()),
        Err(reason) => {
            crate::test_skip::skip(test, &reason);
            None
        }
    }
}

#[cfg(test)]
mod replica_tests;
#[cfg(test)]
pub(in crate::store) mod tests;
