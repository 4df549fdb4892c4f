//! The application: built once from a config, run until shutdown.
//!
//! `App::build` binds the listener and opens (migrates) the store, and checks every
//! connection's config; it starts no task. `App::run` starts the HTTP server and one
//! task per connection, handles reloads, and drains everything on shutdown within the
//! configured deadline. `main` and the tests share this one path.

use crate::config::{self, Config, ConfigError};
use crate::shutdown;
use crate::store::{Store, StoreError};
use crate::sync::{self, ConnectionRuntime, SyncDeps};
use crate::telemetry::{Metrics, RunLabels};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
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
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("HTTP server failed: {0}")]
    Server(std::io::Error),
}

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

    pub fn report(&self) -> ReadinessReport {
        let Ok(inner) = self.inner.lock() else {
            return ReadinessReport {
                ready: false,
                migrated: false,
                connections: BTreeMap::new(),
                attention: BTreeMap::new(),
            };
        };
        ReadinessReport {
            ready: inner.migrated && inner.connections.values().all(|started| *started),
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
        }
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

pub struct App {
    listener: TcpListener,
    state: Arc<AppState>,
    reload_tx: mpsc::Sender<()>,
    reload_rx: mpsc::Receiver<()>,
}

impl App {
    /// Binds the HTTP listener and migrates the store; starts no task yet.
    pub async fn build(config: Config) -> Result<App, StartupError> {
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
        let readiness = Arc::new(Readiness::default());
        readiness.set_migrated();
        readiness.expect(runtimes.iter().map(|r| r.name().to_owned()));
        let (reload_tx, reload_rx) = mpsc::channel(1);
        Ok(App {
            listener,
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
        info!(addr = %self.local_addr(), "listening");

        let server_shutdown = shutdown.clone();
        let router = crate::http::router(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(self.listener, router)
                .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
                .await
        });

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
            server.await
        })
        .await;
        match drained {
            Ok(Ok(Ok(()))) => info!("shutdown complete"),
            Ok(Ok(Err(error))) => return Err(RunError::Server(error)),
            Ok(Err(join_error)) => error!(error = %join_error, "HTTP server task failed"),
            Err(_) => warn!(
                remaining = tasks.len(),
                "shutdown deadline passed; abandoning the remaining tasks"
            ),
        }
        Ok(())
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
        tasks.spawn(tracing::Instrument::instrument(
            sync::run_connection(runtime, deps, token),
            span,
        ));
    }
    // The follow-up worker restarts with the connections, so a reload applies new rules.
    tasks.spawn(crate::followup::worker::run(
        state.store.clone(),
        state.config(),
        state.metrics.clone(),
        state.sync_deps().attention,
        token.child_token(),
    ));
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
    let loaded = tokio::task::spawn_blocking(move || {
        let config = config::load(&path)?;
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
