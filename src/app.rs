//! The application: built once from a config, run until shutdown.
//!
//! `App::build` binds the listener and opens (migrates) the store, and checks every
//! connection's config; it starts no task. `App::run` starts the HTTP server and one
//! task per connection, handles reloads, and drains everything on shutdown within the
//! configured deadline. `main` and the tests share this one path.

use crate::config::{self, Config, ConfigError};
use crate::health::Readiness;
use crate::http::HttpState;
use crate::ingest::{ConnectionRuntime, Connections, Rereader, SyncDeps};
use crate::lock::{LockError, LockFile};
use crate::shutdown;
use crate::store::{Store, StoreError};
use crate::sync;
use crate::telemetry::{Metrics, RunLabels};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another daemon holds the database's lock file.
    #[error(
        "another dealsync daemon{} is running on database {db}: it holds the lock file {lock}; \
         stop it first, or give this daemon its own storage.path",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    AlreadyRunning {
        db: PathBuf,
        lock: PathBuf,
        holder: Option<u32>,
    },
    #[error("taking the daemon lock: {0}")]
    Lock(crate::lock::LockError),
}

/// What ends [`App::run`] with an error. Nothing does today: the server and the
/// workers log their failures and go on, and the run ends when shutdown is asked.
/// The type keeps `run`'s signature for a failure that may one day end it.
#[derive(Debug, thiserror::Error)]
pub enum RunError {}

/// What a connection's runtime needs from the daemon: the store, the metrics, and
/// where a connection reports what it needs from an operator (`/readyz`).
fn sync_deps(state: &HttpState) -> SyncDeps {
    let readiness = state.readiness.clone();
    SyncDeps {
        store: state.store.clone(),
        metrics: state.metrics.clone(),
        attention: Some(Arc::new(move |name: &str, what: Option<String>| {
            readiness.attention(name, what)
        })),
    }
}

/// The first step of the one preparation path of start and reload: everything a
/// config derives that needs no store. Builds every enabled connection's runtime
/// (connector and stage map) and preflights the follow-up rules; any problem refuses
/// the config, with every problem named. Reads the manifests: callers on the executor
/// run it on a blocking thread or before anything else is running.
fn prepare(config: &Config) -> Result<Vec<Arc<ConnectionRuntime>>, ConfigError> {
    let runtimes = ConnectionRuntime::build_all(config)?;
    let problems = crate::followup::preflight(config);
    if !problems.is_empty() {
        return Err(ConfigError::at(config, "followups", problems.join("; ")));
    }
    Ok(runtimes)
}

/// The second step, once the store is open: records each connection (and its
/// connector) in the store and gives its runtime the native stages discovery stored,
/// so a webhook-only connection maps them before its first discovery.
async fn register(store: &Store, runtimes: &[Arc<ConnectionRuntime>]) -> Result<(), StoreError> {
    for runtime in runtimes {
        store
            .ensure_connection(runtime.name(), runtime.connector.kind())
            .await?;
        let known = store.native_pipelines(runtime.name()).await?;
        if !known.is_empty() {
            runtime.set_native(known);
        }
    }
    Ok(())
}

pub struct App {
    /// `<database>.lock`, held for as long as the app lives: one daemon per SQLite
    /// database. None on PostgreSQL, which any number of replicas share.
    _lock: Option<LockFile>,
    listener: TcpListener,
    /// `server.metrics_listen`, when set: `/metrics` alone.
    metrics_listener: Option<TcpListener>,
    state: Arc<HttpState>,
    reload_tx: mpsc::Sender<()>,
    reload_rx: mpsc::Receiver<()>,
}

impl App {
    /// Takes the database's daemon lock, binds the HTTP listener and migrates the
    /// store; starts no task yet. Fails with [`StartupError::AlreadyRunning`] at once,
    /// before touching the store, when another daemon runs on the same database.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        // The daemon uses every secret: one that was deferred (not readable here) is an
        // error now, naming each.
        config.require_credentials(|_| true)?;
        // First of all: a second daemon on the same SQLite file must not even mark the
        // first one's sends in flight as interrupted (below). PostgreSQL replicas share
        // the database by design: leases and claims keep them apart.
        let lock = match &config.storage.url {
            None => Some(lock_database(&config.storage.path)?),
            Some(_) => None,
        };
        let runtimes = prepare(&config)?;
        let store = match &config.storage.url {
            Some(url) => Store::open_postgres_with(url, &replica_options(&config)).await?,
            None => {
                let path = config.storage.path.clone();
                tokio::task::spawn_blocking(move || Store::open(&path))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??
            }
        };
        register(&store, &runtimes).await?;
        // A row left in `sending` by the previous process may or may not have reached
        // the SMTP server: it is marked uncertain and never sent again (on PostgreSQL,
        // only rows whose replica's claim has expired).
        let interrupted = store.outbox_recover_interrupted(chrono::Utc::now()).await?;
        if interrupted > 0 {
            warn!(
                rows = interrupted,
                "follow-ups interrupted mid-send by the last stop are marked uncertain and will not be resent; see `dealsync outbox list --state uncertain`"
            );
        }
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let metrics_listener = match config.server.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Bind { addr, source })?,
            ),
            None => None,
        };
        let readiness = Arc::new(Readiness::default());
        readiness.set_migrated();
        if let Some(replica) = store.replica() {
            info!(%replica, "running as a replica on PostgreSQL {}", config.storage.url.as_ref().map(ToString::to_string).unwrap_or_default());
            readiness.set_replica(replica);
        }
        readiness.expect(runtimes.iter().map(|r| r.name().to_owned()));
        let (reload_tx, reload_rx) = mpsc::channel(1);
        Ok(App {
            _lock: lock,
            listener,
            metrics_listener,
            state: Arc::new(HttpState::new(
                store,
                Arc::new(Metrics::new()),
                readiness,
                config,
                Connections::new(runtimes),
            )),
            reload_tx,
            reload_rx,
        })
    }

    /// Returns the bound address; tests configure port 0 and read the real port here.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound address of `server.metrics_listen`, when set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|listener| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
        })
    }

    /// The state the HTTP handlers share; the workers get its parts.
    pub fn state(&self) -> Arc<HttpState> {
        self.state.clone()
    }

    /// A handle that asks the running app to reload its config file (what SIGHUP does).
    pub fn reloader(&self) -> mpsc::Sender<()> {
        self.reload_tx.clone()
    }

    /// Runs every task until `shutdown` is cancelled, then drains them.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), RunError> {
        let state = self.state.clone();
        let deadline = state.config().server.shutdown_timeout;
        let tasks = TaskTracker::new();
        info!(addr = %self.local_addr(), metrics_addr = ?self.metrics_addr(), "listening");
        warn_about_access(&state.config().server);

        let config = state.config();
        let limits = crate::http::server::Limits::of(&config.server);
        let metrics_router = self
            .metrics_listener
            .take()
            .map(|listener| (listener, crate::http::metrics_router(state.clone())));
        crate::http::server::check_open_file_limit(
            limits.max_connections * if metrics_router.is_some() { 2 } else { 1 },
        );
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(crate::http::server::serve(
            self.listener,
            crate::http::router(state.clone()),
            limits.clone(),
            state.metrics.clone(),
            "main",
            shutdown.clone(),
        ));
        if let Some((listener, router)) = metrics_router {
            servers.spawn(crate::http::server::serve(
                listener,
                router,
                limits,
                state.metrics.clone(),
                "metrics",
                shutdown.clone(),
            ));
        }

        let mut connection_token = shutdown.child_token();
        start_connections(&state, &tasks, &connection_token);
        // Webhook inbox processing and the cart sweeper live across reloads: they read
        // the connections in force at each step.
        tasks.spawn(crate::webhooks::worker::run(
            sync_deps(&state),
            state.connections.clone(),
            state.readiness.worker("webhooks"),
            shutdown.child_token(),
        ));
        // Write-backs live across reloads too: each attempt reads the connection in force.
        tasks.spawn(crate::writeback::run(
            sync_deps(&state),
            state.connections.clone(),
            state.readiness.worker(crate::writeback::NAME),
            shutdown.child_token(),
        ));
        let (store, connections, readiness) = (
            state.store.clone(),
            state.connections.clone(),
            state.readiness.clone(),
        );
        let (duties, sweeper_token) = (duties(&state), shutdown.child_token());
        tasks.spawn(async move {
            duties
                .run_while_held(
                    crate::replica::leader_lease(CART_SWEEPER),
                    CART_SWEEPER,
                    sweeper_token,
                    |lost| {
                        crate::carts::run(
                            store.clone(),
                            connections.clone(),
                            readiness.worker(CART_SWEEPER),
                            lost,
                        )
                    },
                )
                .await
        });
        shutdown::spawn_watchdog(shutdown.clone());
        let names: Vec<String> = state
            .connections
            .current()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        shutdown::notify_ready(&format!("running {} connections", names.len()));
        info!(connections = ?names, "dealsync is running");

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(()) = self.reload_rx.recv() => {
                    shutdown::notify(&[sd_notify::NotifyState::Reloading]);
                    if let Some(token) = reload(&state, &tasks, &connection_token, &shutdown).await {
                        connection_token = token;
                    }
                    shutdown::notify_ready("running");
                }
            }
        }

        shutdown::notify_stopping();
        info!(
            deadline_s = deadline.as_secs(),
            "shutting down: draining tasks"
        );
        tasks.close();
        let drained = tokio::time::timeout(deadline, async {
            tasks.wait().await;
            let mut failed = None;
            while let Some(ended) = servers.join_next().await {
                failed = failed.or(ended.err());
            }
            failed
        })
        .await;
        match drained {
            Ok(None) => info!("shutdown complete"),
            Ok(Some(join_error)) => error!(error = %join_error, "HTTP server task failed"),
            Err(_) => warn!(
                remaining = tasks.len(),
                "shutdown deadline passed; abandoning the remaining tasks"
            ),
        }
        Ok(())
    }
}

/// Says at startup what the access settings leave unreachable, so that a missing
/// token shows in the log and not only as a 404 to the scraper or the browser.
fn warn_about_access(server: &config::ServerConfig) {
    if server.api_token.is_some() {
        return;
    }
    if server.status_page && server.status_page_auth == config::StatusPageAuth::Always {
        warn!(
            "the status page answers 404 until server.api_token is set (or server.status_page_auth = \"local\" when only this machine reaches the listener)"
        );
    }
    if server.metrics_auth == config::MetricsAuth::Token {
        warn!(
            "/metrics answers 404 until server.api_token is set (or server.metrics_auth = \"none\" on a listener only the scraper reaches)"
        );
    }
}

/// How a replica on PostgreSQL holds its claims: the inbox rows it was handed go to
/// another replica `storage.failover_after` after it stopped renewing them (as its
/// leases do); an email it was sending becomes `uncertain` only once the longest SMTP
/// exchange (ten of `email.timeout`: connect, greeting, each command) is surely over.
fn replica_options(config: &Config) -> crate::store::postgres::Options {
    let failover = config.storage.failover_after;
    crate::store::postgres::Options {
        work_claim_ttl: failover,
        send_claim_ttl: (config.email.timeout * 10).max(failover),
        listen: true,
        ..crate::store::postgres::Options::default()
    }
}

/// Takes `<database>.lock` for this daemon.
fn lock_database(db: &std::path::Path) -> Result<LockFile, StartupError> {
    let path = crate::lock::daemon_lock_path(db);
    match LockFile::try_lock(&path) {
        Ok(lock) => Ok(lock),
        Err(LockError::Held { path, holder }) => Err(StartupError::AlreadyRunning {
            db: db.to_owned(),
            lock: path,
            holder,
        }),
        Err(other) => Err(StartupError::Lock(other)),
    }
}

/// The cart sweeper's name in `/readyz` and its leader lease.
const CART_SWEEPER: &str = "cart_sweeper";

/// Where the daemon's one-replica-at-a-time duties take their leases.
fn duties(state: &HttpState) -> crate::replica::Duties {
    crate::replica::Duties {
        store: state.store.clone(),
        readiness: state.readiness.clone(),
        metrics: state.metrics.clone(),
        ttl: state.config().storage.failover_after,
    }
}

/// Starts every connection's scheduler (on PostgreSQL, each while this replica holds
/// the connection's poll lease) and the follow-up worker.
fn start_connections(state: &Arc<HttpState>, tasks: &TaskTracker, token: &CancellationToken) {
    for runtime in state.connections.current().iter() {
        let (runtime, deps, token) = (runtime.clone(), sync_deps(state), token.child_token());
        state.readiness.started(runtime.name());
        let span = tracing::info_span!(
            "connection",
            connection = %runtime.name(),
            connector = %runtime.connector.kind()
        );
        let (duties, readiness) = (duties(state), state.readiness.clone());
        let lease = crate::replica::poll_lease(runtime.name());
        let worker = crate::health::connection_worker_name(runtime.name());
        tasks.spawn(tracing::Instrument::instrument(
            async move {
                duties
                    .run_while_held(lease, &worker, token, |lost| {
                        let health = readiness.connection_worker(runtime.name());
                        sync::run_connection(runtime.clone(), deps.clone(), lost, health)
                    })
                    .await
            },
            span,
        ));
    }
    // The follow-up worker restarts with the connections, so a reload applies new rules.
    let readiness = state.readiness.clone();
    let deps = crate::followup::worker::Deps {
        store: state.store.clone(),
        config: state.config(),
        metrics: state.metrics.clone(),
        source: Some(Arc::new(Rereader {
            connections: state.connections.clone(),
            deps: sync_deps(state),
        })),
        attention: Some(Arc::new(move |note| {
            readiness.attention(crate::health::EMAIL_ATTENTION, note)
        })),
        health: state.readiness.worker(crate::followup::worker::NAME),
        leading: duties(state).leadership(
            crate::followup::worker::NAME,
            tasks,
            token.child_token(),
        ),
    };
    tasks.spawn(crate::followup::worker::run(deps, token.child_token()));
}

/// Loads the config again; on success swaps it in and restarts the connections, on
/// failure logs why and keeps the running config. Returns the new connection token.
async fn reload(
    state: &Arc<HttpState>,
    tasks: &TaskTracker,
    token: &CancellationToken,
    shutdown: &CancellationToken,
) -> Option<CancellationToken> {
    let old = state.config();
    let outcome = |status: &str| {
        state
            .metrics
            .config_reloads
            .get_or_create(&RunLabels {
                connection: String::new(),
                status: status.into(),
            })
            .inc();
    };
    let path = old.path.clone();
    // Credentials come from where they came at start (`--credentials-dir` or
    // `$CREDENTIALS_DIRECTORY`), and must all be readable.
    let options = config::LoadOptions {
        credentials_dir: old.credentials_dir.clone(),
        credentials: config::CredentialMode::Required,
    };
    let loaded = tokio::task::spawn_blocking(move || {
        let config = config::load_with(&path, &options)?;
        let runtimes = prepare(&config)?;
        Ok::<_, ConfigError>((config, runtimes))
    })
    .await;
    let (new, runtimes) = match loaded {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            error!(error = %error, "config reload refused; the running config stays in force");
            outcome("refused");
            return None;
        }
        Err(error) => {
            error!(error = %error, "config reload failed");
            outcome("refused");
            return None;
        }
    };
    if new.server.listen != old.server.listen
        || new.storage.path != old.storage.path
        || new.storage.url != old.storage.url
    {
        warn!(
            "server.listen and storage.path or storage.url changes take effect only after a restart"
        );
    }
    let (was, now) = (&old.server, &new.server);
    if (
        was.metrics_listen,
        was.header_read_timeout,
        was.body_read_timeout,
        was.idle_timeout,
        was.max_connections,
    ) != (
        now.metrics_listen,
        now.header_read_timeout,
        now.body_read_timeout,
        now.idle_timeout,
        now.max_connections,
    ) {
        warn!(
            "server.metrics_listen and the connection limits (header_read_timeout, body_read_timeout, idle_timeout, max_connections) take effect only after a restart"
        );
    }
    if let Err(error) = register(&state.store, &runtimes).await {
        error!(%error, "config reload refused: could not record connections");
        outcome("refused");
        return None;
    }
    // Stop the old connection tasks at their next safe point, then start the new ones.
    token.cancel();
    let new_token = shutdown.child_token();
    state
        .readiness
        .expect(runtimes.iter().map(|r| r.name().to_owned()));
    state.connections.replace(runtimes);
    state.set_config(new);
    start_connections(state, tasks, &new_token);
    info!("config reloaded");
    outcome("applied");
    Some(new_token)
}
