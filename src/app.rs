//! The application: built once from a config, run until shutdown.
//!
//! `App::build` binds the listener and opens (migrates) the store, and checks every
//! connection's config; it starts no task. `App::run` starts the HTTP server and one
//! task per connection, handles reloads, and drains everything on shutdown within the
//! configured deadline. `main` and the tests share this one path.

use crate::config::{self, Config, ConfigError};
use crate::lock::{LockError, LockFile};
use crate::shutdown;
use crate::store::{Store, StoreError};
use crate::sync::{self, ConnectionRuntime, SyncDeps};
use crate::telemetry::{Metrics, RunLabels};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
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

/// The `/readyz` attention entry of email delivery; a name no connection can have
/// (connection names hold no spaces).
pub const EMAIL_ATTENTION: &str = "email delivery";

/// What `/readyz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub migrated: bool,
    /// connection → "starting" | "started"
    pub connections: BTreeMap<String, String>,
    /// connection (or `email delivery`) → what needs attention (it does not make the
    /// daemon unready).
    pub attention: BTreeMap<String, String>,
    /// worker → why it is degraded: its last pass failed and it is backing off before
    /// the next (`followups`, `webhooks`, `cart_sweeper`, `connection:NAME`). Makes the
    /// daemon unready until the worker's next pass works.
    pub degraded: BTreeMap<String, String>,
}

/// Readiness, shared by the tasks that make it true.
#[derive(Default)]
pub struct Readiness {
    // A std mutex: tiny critical sections, never held across `.await`.
    inner: Mutex<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    migrated: bool,
    connections: BTreeMap<String, bool>,
    attention: BTreeMap<String, String>,
    degraded: BTreeMap<String, String>,
}

impl Readiness {
    pub fn set_migrated(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.migrated = true;
        }
    }

    /// Resets the expected connections (at start and on reload).
    pub fn expect(&self, names: impl IntoIterator<Item = String>) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.connections = names.into_iter().map(|name| (name, false)).collect();
            let keep: Vec<String> = inner.connections.keys().cloned().collect();
            inner
                .attention
                .retain(|name, _| keep.contains(name) || name == EMAIL_ATTENTION);
            inner.degraded.retain(|worker, _| {
                worker
                    .strip_prefix(CONNECTION_WORKER)
                    .is_none_or(|name| keep.iter().any(|kept| kept == name))
            });
        }
    }

    pub fn started(&self, name: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.connections.insert(name.to_owned(), true);
        }
    }

    /// Marks (or clears, with `None`) something a connection needs from an operator.
    pub fn attention(&self, name: &str, what: Option<String>) {
        if let Ok(mut inner) = self.inner.lock() {
            match what {
                Some(what) => inner.attention.insert(name.to_owned(), what),
                None => inner.attention.remove(name),
            };
        }
    }

    /// Marks a worker as degraded with the reason, or (with `None`) as working again.
    pub fn degraded(&self, worker: &str, reason: Option<String>) {
        if let Ok(mut inner) = self.inner.lock() {
            match reason {
                Some(reason) => inner.degraded.insert(worker.to_owned(), reason),
                None => inner.degraded.remove(worker),
            };
        }
    }

    /// The health handle of the worker `name`.
    pub fn worker(self: &Arc<Self>, name: impl Into<String>) -> WorkerHealth {
        WorkerHealth {
            readiness: self.clone(),
            name: name.into(),
            failures: 0,
            backoff: crate::retry::STORE_ERRORS,
        }
    }

    /// The health handle of connection `name`'s scheduler.
    pub fn connection_worker(self: &Arc<Self>, name: &str) -> WorkerHealth {
        self.worker(format!("{CONNECTION_WORKER}{name}"))
    }

    pub fn report(&self) -> ReadinessReport {
        let Ok(inner) = self.inner.lock() else {
            return ReadinessReport {
                ready: false,
                migrated: false,
                connections: BTreeMap::new(),
                attention: BTreeMap::new(),
                degraded: BTreeMap::new(),
            };
        };
        ReadinessReport {
            ready: inner.migrated
                && inner.connections.values().all(|started| *started)
                && inner.degraded.is_empty(),
            migrated: inner.migrated,
            connections: inner
                .connections
                .iter()
                .map(|(name, started)| {
                    let state = if *started { "started" } else { "starting" };
                    (name.clone(), state.to_owned())
                })
                .collect(),
            attention: inner.attention.clone(),
            degraded: inner.degraded.clone(),
        }
    }
}

/// The prefix of a connection scheduler's name among the workers.
const CONNECTION_WORKER: &str = "connection:";

/// A long-running worker's standing in `/readyz`, and its backoff after failed passes.
///
/// A pass that fails (the store is busy, an I/O error, a full disk) marks the worker
/// degraded with the error, logs it, and returns how long to wait before the next pass
/// ([`crate::retry::STORE_ERRORS`]: growing with the failures in a row, capped). The
/// next pass that works clears the mark. Workers never end on such an error.
pub struct WorkerHealth {
    readiness: Arc<Readiness>,
    name: String,
    failures: u32,
    backoff: crate::retry::Backoff,
}

impl WorkerHealth {
    /// Records a failed pass; returns the pause before the next one.
    pub fn failed(&mut self, error: &dyn std::fmt::Display) -> std::time::Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.delay(self.failures);
        warn!(
            worker = %self.name,
            %error,
            failures = self.failures,
            retry_in_ms = delay.as_millis() as u64,
            "worker pass failed; backing off, then trying again"
        );
        self.degraded(format!(
            "{error} ({} failure(s) in a row; next try in {:.1} s)",
            self.failures,
            delay.as_secs_f64()
        ));
        delay
    }

    /// Records a pass that worked: clears the degraded mark.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(worker = %self.name, failures = self.failures, "worker recovered");
            self.failures = 0;
            self.recovered();
        }
    }

    /// Marks the worker degraded without counting a failure (a scheduler that keeps
    /// its own backoff).
    pub fn degraded(&self, reason: String) {
        self.readiness.degraded(&self.name, Some(reason));
    }

    /// Clears the degraded mark.
    pub fn recovered(&self) {
        self.readiness.degraded(&self.name, None);
    }
}

/// State shared by the HTTP handlers and the tasks.
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    config: RwLock<Arc<Config>>,
    connections: RwLock<Arc<Vec<Arc<ConnectionRuntime>>>>,
}

impl AppState {
    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .expect("config lock is never poisoned")
    }

    /// The runtimes of the enabled connections.
    pub fn connections(&self) -> Arc<Vec<Arc<ConnectionRuntime>>> {
        self.connections
            .read()
            .map(|c| c.clone())
            .expect("connections lock is never poisoned")
    }

    pub fn connection(&self, name: &str) -> Option<Arc<ConnectionRuntime>> {
        self.connections()
            .iter()
            .find(|c| c.name() == name)
            .cloned()
    }

    pub fn sync_deps(&self) -> SyncDeps {
        let readiness = self.readiness.clone();
        SyncDeps {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            attention: Some(Arc::new(move |name: &str, what: Option<String>| {
                readiness.attention(name, what)
            })),
        }
    }
}

/// The follow-up worker's reads of a deal at its source: through the connections in
/// force when the worker started (a reload restarts the worker with the new ones).
struct SourceRereads {
    connections: Arc<Vec<Arc<ConnectionRuntime>>>,
    deps: SyncDeps,
}

#[async_trait::async_trait]
impl crate::followup::SourceReader for SourceRereads {
    async fn reread(
        &self,
        connection: &str,
        external_id: &str,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        // A connection no longer configured has no source to ask: the stored deal stands.
        let Some(runtime) = self.connections.iter().find(|c| c.name() == connection) else {
            return Ok(false);
        };
        sync::reread(runtime, &self.deps, external_id, shutdown)
            .await
            .map_err(|error| error.to_string())
    }
}

impl crate::followup::worker::Health for WorkerHealth {
    fn succeeded(&mut self) {
        WorkerHealth::succeeded(self)
    }
    fn failed(&mut self, error: &dyn std::fmt::Display) -> std::time::Duration {
        WorkerHealth::failed(self, error)
    }
    fn degraded(&self, reason: String) {
        WorkerHealth::degraded(self, reason)
    }
    fn recovered(&self) {
        WorkerHealth::recovered(self)
    }
}

pub struct App {
    /// `<database>.lock`, held for as long as the app lives: one daemon per database.
    _lock: LockFile,
    listener: TcpListener,
    /// `server.metrics_listen`, when set: `/metrics` alone.
    metrics_listener: Option<TcpListener>,
    state: Arc<AppState>,
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
        // First of all: a second daemon must not even mark the first one's sends in
        // flight as interrupted (below).
        let lock = lock_database(&config.storage.path)?;
        let runtimes = ConnectionRuntime::build_all(&config)?;
        let path = config.storage.path.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        for runtime in &runtimes {
            store
                .ensure_connection(runtime.name(), runtime.connector.kind())
                .await?;
            let known = store.native_pipelines(runtime.name()).await?;
            if !known.is_empty() {
                runtime.set_native(known);
            }
        }
        let problems = crate::followup::preflight(&config);
        if !problems.is_empty() {
            return Err(ConfigError::at(&config, "followups", problems.join("; ")).into());
        }
        // A row left in `sending` by the previous process may or may not have reached
        // the SMTP server: it is marked uncertain and never sent again.
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
        readiness.expect(runtimes.iter().map(|r| r.name().to_owned()));
        let (reload_tx, reload_rx) = mpsc::channel(1);
        Ok(App {
            _lock: lock,
            listener,
            metrics_listener,
            state: Arc::new(AppState {
                store,
                metrics: Arc::new(Metrics::new()),
                readiness,
                config: RwLock::new(Arc::new(config)),
                connections: RwLock::new(Arc::new(runtimes)),
            }),
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

    pub fn state(&self) -> Arc<AppState> {
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
            state.clone(),
            shutdown.child_token(),
        ));
        tasks.spawn(crate::webhooks::abandonment::run(
            state.clone(),
            shutdown.child_token(),
        ));
        shutdown::spawn_watchdog(shutdown.clone());
        let names: Vec<String> = state
            .connections()
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

fn start_connections(state: &Arc<AppState>, tasks: &TaskTracker, token: &CancellationToken) {
    for runtime in state.connections().iter() {
        let (runtime, deps, token) = (runtime.clone(), state.sync_deps(), token.child_token());
        state.readiness.started(runtime.name());
        let span = tracing::info_span!(
            "connection",
            connection = %runtime.name(),
            connector = %runtime.connector.kind()
        );
        let health = state.readiness.connection_worker(runtime.name());
        tasks.spawn(tracing::Instrument::instrument(
            sync::run_connection(runtime, deps, token, health),
            span,
        ));
    }
    // The follow-up worker restarts with the connections, so a reload applies new rules.
    let readiness = state.readiness.clone();
    let deps = crate::followup::worker::Deps {
        store: state.store.clone(),
        config: state.config(),
        metrics: state.metrics.clone(),
        source: Some(Arc::new(SourceRereads {
            connections: state.connections(),
            deps: state.sync_deps(),
        })),
        attention: Some(Arc::new(move |note| {
            readiness.attention(EMAIL_ATTENTION, note)
        })),
        health: Box::new(state.readiness.worker(crate::followup::worker::NAME)),
    };
    tasks.spawn(crate::followup::worker::run(deps, token.child_token()));
}

/// Loads the config again; on success swaps it in and restarts the connections, on
/// failure logs why and keeps the running config. Returns the new connection token.
async fn reload(
    state: &Arc<AppState>,
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
        let runtimes = ConnectionRuntime::build_all(&config)?;
        let problems = crate::followup::preflight(&config);
        if !problems.is_empty() {
            return Err(ConfigError::at(&config, "followups", problems.join("; ")));
        }
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
    if new.server.listen != old.server.listen || new.storage.path != old.storage.path {
        warn!("server.listen and storage.path changes take effect only after a restart");
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
    for runtime in &runtimes {
        if let Err(error) = state
            .store
            .ensure_connection(runtime.name(), runtime.connector.kind())
            .await
        {
            error!(%error, "config reload refused: could not record connections");
            outcome("refused");
            return None;
        }
        if let Ok(known) = state.store.native_pipelines(runtime.name()).await
            && !known.is_empty()
        {
            runtime.set_native(known);
        }
    }
    // Stop the old connection tasks at their next safe point, then start the new ones.
    token.cancel();
    let new_token = shutdown.child_token();
    state
        .readiness
        .expect(runtimes.iter().map(|r| r.name().to_owned()));
    *state
        .connections
        .write()
        .expect("connections lock is never poisoned") = Arc::new(runtimes);
    *state.config.write().expect("config lock is never poisoned") = Arc::new(new);
    start_connections(state, tasks, &new_token);
    info!("config reloaded");
    outcome("applied");
    Some(new_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_degraded_worker_makes_readyz_unready_until_its_next_good_pass() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_migrated();
        readiness.expect(["crm".to_owned()]);
        readiness.started("crm");
        assert!(readiness.report().ready);

        let mut followups = readiness.worker("followups");
        let pause = followups.failed(&"database error: database is locked");
        assert!(pause <= crate::retry::STORE_ERRORS.max);
        let report = readiness.report();
        assert!(!report.ready);
        assert!(report.degraded["followups"].contains("database is locked"));

        // A scheduler marks itself; a reload that drops its connection drops the mark.
        readiness
            .connection_worker("crm")
            .degraded("sync run failed".into());
        readiness.connection_worker("crm").recovered();
        followups.succeeded();
        assert!(readiness.report().ready);
        readiness
            .connection_worker("crm")
            .degraded("sync run failed".into());
        readiness.expect(["other".to_owned()]);
        readiness.started("other");
        let report = readiness.report();
        assert!(report.ready, "{:?}", report.degraded);
    }
}
