//! What every command starts from: where its config comes from, loading it, opening
//! the store, building the connections; and the error every command returns, whose
//! variant picks the exit code. Shared by the commands of `cli` and `cli::ops`.
//!
//! Invariants:
//! - The config is loaded with credentials deferred: a command resolves only the
//!   secrets it uses, and one that lacks one says which and how to provide it.
//! - The config and the store are read on tokio's blocking pool.
//! - Exit codes: 78 configuration, 69 environment, 2 usage, 75 another daemon runs on
//!   the same database, 1 anything else (`CliError::exit_code`).

use crate::config::{self, Config, ConfigError};
use crate::ingest::ConnectionRuntime;
use crate::store::Store;
use std::path::PathBuf;
use std::sync::Arc;

/// The exit code of `check` when the config is valid but the environment is not
/// (sysexits' EX_UNAVAILABLE): storage not writable, a CRM or the SMTP server not
/// reachable or refusing the credentials, the listen address taken.
pub const EXIT_ENVIRONMENT: i32 = 69;

/// A command's failure; the variant picks the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    /// `run` found another daemon on the same database.
    #[error("{0}")]
    AlreadyRunning(String),
    /// The config is valid; what it points at is not usable (one line per problem).
    #[error("the config is valid, but the environment is not:\n  {}", .0.join("\n  "))]
    Environment(Vec<String>),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// 78 (EX_CONFIG) for configuration errors, 69 when the config is valid and the
    /// environment is not, 2 for usage, 75 (EX_TEMPFAIL: try again once the other one
    /// stopped) when another daemon runs on the same database, 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => 78,
            CliError::Environment(_) => EXIT_ENVIRONMENT,
            CliError::Usage(_) => 2,
            CliError::AlreadyRunning(_) => 75,
            CliError::Other(_) => 1,
        }
    }
}

impl From<crate::app::StartupError> for CliError {
    fn from(error: crate::app::StartupError) -> Self {
        match error {
            crate::app::StartupError::Config(error) => CliError::Config(error),
            running @ crate::app::StartupError::AlreadyRunning { .. } => {
                CliError::AlreadyRunning(running.to_string())
            }
            other => CliError::Other(other.into()),
        }
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(error: crate::store::StoreError) -> Self {
        CliError::Other(error.into())
    }
}

/// Where a command's config comes from: the file, and where its credentials are read.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// `--credentials-dir`; `None`: `$CREDENTIALS_DIRECTORY`.
    pub credentials_dir: Option<PathBuf>,
}

/// Loads the config. A credential that cannot be read here (the service user outside
/// the service, an operator without `--credentials-dir`) is left unavailable rather
/// than failing: a command resolves only the secrets it uses, and one that needs an
/// unavailable secret says which and how to provide it (`Config::require_credentials`).
pub(crate) async fn load(source: &ConfigSource) -> Result<Config, CliError> {
    let path = source.path.clone();
    let options = config::LoadOptions {
        credentials_dir: source.credentials_dir.clone(),
        credentials: config::CredentialMode::Deferred,
    };
    Ok(
        tokio::task::spawn_blocking(move || config::load_with(&path, &options))
            .await
            .map_err(anyhow::Error::from)??,
    )
}

/// Opens the store `storage` names: the SQLite file, or, with `storage.url`, the
/// PostgreSQL database.
pub(crate) async fn open_store(config: &Config) -> Result<Store, CliError> {
    match &config.storage.url {
        Some(url) => Ok(Store::open_postgres(url).await?),
        None => {
            let path = config.storage.path.clone();
            Ok(tokio::task::spawn_blocking(move || Store::open(&path))
                .await
                .map_err(anyhow::Error::from)??)
        }
    }
}

/// Builds every connection with the stored discovery results applied.
pub(crate) async fn runtimes(
    config: &Config,
    store: Option<&Store>,
) -> Result<Vec<Arc<ConnectionRuntime>>, CliError> {
    let runtimes = ConnectionRuntime::build_all(config)?;
    if let Some(store) = store {
        for runtime in &runtimes {
            let known = store.native_pipelines(runtime.name()).await?;
            if !known.is_empty() {
                runtime.set_native(known);
            }
        }
    }
    Ok(runtimes)
}
