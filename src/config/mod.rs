//! The config: one TOML file, read in two steps.
//!
//! [`raw::RawConfig`] mirrors the file with unknown keys refused; [`Config`] is built
//! from it by validation and holds only parsed types. `${VAR}` and
//! `${credential:NAME}` are substituted over the parsed values first (see
//! [`interpolate`]). Every error names the file, the key, the line where it can be
//! found, and what was expected; substituted values are scrubbed from messages so a
//! secret cannot leak through an error.
//!
//! Invariant: a [`ConfigError::Invalid`] can only be built in this module, and every way
//! to build one (`parse`, [`ConfigError::at`], [`ConfigError::invalid`]) scrubs the
//! values substituted into the config it is about ([`Config::substituted`]), whatever
//! key they were written under and whoever wrote the message.

pub use crate::domain::duration;
pub mod followups;
pub mod interpolate;
pub mod raw;
pub mod secret;
pub mod storage;

pub use secret::{Secret, Secrets};
pub use storage::PostgresUrl;

use crate::domain::{ConnectionName, PipelineKey, StageKey};
use crate::pipeline::{
    self, MappingSource, Pipeline, Pipelines, Stage, StageMapEntry, default_pipelines,
};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default config path.
pub const DEFAULT_PATH: &str = "/etc/dealsync/dealsync.toml";

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub storage: StorageConfig,
    pub server: ServerConfig,
    pub connectors_dir: Option<PathBuf>,
    pub pipelines: Pipelines,
    pub connections: Vec<ConnectionConfig>,
    pub email: EmailConfig,
    /// Follow-up rules, validated against the pipelines and the templates directory.
    pub followups: Vec<followups::Rule>,
    /// Daily digest rules (`[followups.NAME]` with `digest = "HH:MM"`).
    pub digests: Vec<followups::DigestRule>,
    /// `[deliverability]`: the return path and what bounces and complaints do.
    pub deliverability: DeliverabilityConfig,
    /// What `${VAR}` and `${credential:NAME}` put into this config: scrubbed from every
    /// error built about it.
    pub substituted: interpolate::Substituted,
    /// Where `${credential:NAME}` files were read (`--credentials-dir`); `None`:
    /// `$CREDENTIALS_DIRECTORY`. A reload reads them from the same place.
    pub credentials_dir: Option<PathBuf>,
    /// Credentials that could not be read here, when loaded with
    /// [`CredentialMode::Deferred`]: their values are placeholders
    /// (`Secret::is_available` is false) and a command that needs one calls
    /// [`Config::require_credentials`] first.
    pub unavailable: Vec<interpolate::Unavailable>,
}

/// What loading does with a `${credential:NAME}` it cannot read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CredentialMode {
    /// A config error, like any value that cannot be substituted (the daemon).
    #[default]
    Required,
    /// Listed in `Config::unavailable`; an error only for a command that uses it.
    Deferred,
}

/// How a config file is loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--credentials-dir`: read `${credential:NAME}` here instead of
    /// `$CREDENTIALS_DIRECTORY`.
    pub credentials_dir: Option<PathBuf>,
    pub credentials: CredentialMode,
}

/// Whether a problem reported at `problem_key` concerns the value at `unavailable_key`
/// (the same key, an element of it, or a key inside it).
fn concerns(problem_key: &str, unavailable_key: &str) -> bool {
    let within = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    within(problem_key, unavailable_key) || within(unavailable_key, problem_key)
}

impl Config {
    /// Credentials not available here whose key satisfies `needed`.
    pub fn unavailable_where(
        &self,
        needed: impl Fn(&str) -> bool,
    ) -> impl Iterator<Item = &interpolate::Unavailable> {
        self.unavailable.iter().filter(move |u| needed(&u.key))
    }

    /// Errs, naming each key, credential and how to provide it, when a credential
    /// whose key satisfies `needed` could not be read here.
    pub fn require_credentials(&self, needed: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut problems: Vec<Problem> = self
            .unavailable_where(needed)
            .map(|u| Problem {
                file: display_name(&self.path),
                line: locate(&text, &u.key),
                key: u.key.clone(),
                message: format!(
                    "this command needs ${{credential:{}}}, which is not available here: {}",
                    u.credential, u.reason,
                ),
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        problems.push(Problem {
            file: display_name(&self.path),
            line: None,
            key: String::new(),
            message: interpolate::HOW_TO_PROVIDE.to_owned(),
        });
        Err(ConfigError::Invalid(Problems::scrubbed(
            problems,
            &self.substituted,
        )))
    }

    /// The secrets of connection `name` are all available here.
    pub fn require_connection_credentials(&self, name: &str) -> Result<(), ConfigError> {
        let prefix = format!("connections.{name}");
        self.require_credentials(|key| concerns(&prefix, key))
    }
}

/// Where the store lives. Debug prints the PostgreSQL password as `***`.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The SQLite file (`storage.path`, or the default when neither key is set).
    pub path: PathBuf,
    /// `storage.url`: a PostgreSQL database instead of `path`, which any number of
    /// daemons (replicas) share; docs/scale-out.md.
    pub url: Option<PostgresUrl>,
    /// `storage.failover_after` (with `url`): the lease time of a connection's polling
    /// and of a leader duty; a replica that stops renewing loses them after this long,
    /// and another takes them within a third of it more.
    pub failover_after: Duration,
}

/// `storage.failover_after` when not set: a dead replica's connections are polled again
/// within about 20 s (the issue's bound is 30 s).
pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_secs(15);
/// The range `storage.failover_after` accepts: renewals every third of it must fit
/// several round trips, and a longer one leaves connections unpolled for minutes.
const FAILOVER_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3)..=Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub public_url: Option<url::Url>,
    pub shutdown_timeout: Duration,
    /// The read API's bearer token; `None` turns the API off.
    pub api_token: Option<Secret>,
    /// Whether `/` serves the status page.
    pub status_page: bool,
    /// Which requests for the status page must present `api_token`.
    pub status_page_auth: StatusPageAuth,
    /// Whether `/metrics` asks for `api_token`.
    pub metrics_auth: MetricsAuth,
    /// A listener of its own for `/metrics`; `None` serves it on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Time for a new connection to deliver its first request header.
    pub header_read_timeout: Duration,
    /// Time from a request's header to its response; the body must arrive within it.
    pub body_read_timeout: Duration,
    /// Time a keep-alive connection may take to deliver its next request header.
    pub idle_timeout: Duration,
    /// Connections served at once (the listener and `metrics_listen` each).
    pub max_connections: usize,
}

/// Which requests for the status page must present `server.api_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPageAuth {
    /// Every request (the default). Without an `api_token` the page does not exist.
    Always,
    /// The operator declares that only this machine reaches the (loopback) listener:
    /// a request with no `Forwarded`, `X-Forwarded-For` or `X-Real-IP` header sees the
    /// page without a token; a forwarded one still needs it.
    Local,
}

/// Whether `/metrics` asks for `server.api_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAuth {
    /// `Authorization: Bearer <api_token>` (the default). Without an `api_token`
    /// `/metrics` does not exist.
    Token,
    /// Open to whoever reaches the listener that serves it.
    None,
}

/// One `[connections.NAME]`. Debug prints secrets, and the password of a URL with
/// user info, as `***`.
#[derive(Clone)]
pub struct ConnectionConfig {
    pub name: ConnectionName,
    pub connector: String,
    pub enabled: bool,
    pub base_url: Option<url::Url>,
    pub token: Option<Secret>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub oauth: Option<OAuthConfig>,
    pub webhook_secrets: Vec<Secret>,
    pub poll_interval: Option<Duration>,
    pub abandon_after: Duration,
    /// Carts left in an abandoned or follow-up stage this long are expired (default 30 days).
    pub expire_after: Duration,
    pub pipeline: Option<PipelineKey>,
    /// Mapping overrides from the config, as written; they win over the manifest's
    /// defaults. Targets are resolved once the connector (and so the connection's
    /// default pipeline) is known: see `ingest::ConnectionRuntime::build_all`.
    pub stage_map: Vec<MappingOverride>,
    pub rate_limit: RateLimitConfig,
    pub page_size: Option<u32>,
    pub lookback: Option<Duration>,
    /// The largest vendor answer read, in bytes; a larger one fails its request.
    pub max_response_bytes: u64,
    pub settings: toml::Table,
    /// CRM write-back of sent follow-ups; `None` when it is off (the default).
    pub writeback: Option<WritebackConfig>,
}

/// `[connections.NAME.writeback]` with `enabled = true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Attempts before a write-back is marked failed.
    pub max_attempts: u32,
    /// The wait before the first retry; each next one doubles, up to an hour.
    pub retry_delay: Duration,
}

impl WritebackConfig {
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
    pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(60);
    /// The longest wait between two attempts.
    pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
}

/// One `[connections.NAME.stage_map]` entry as written.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingOverride {
    pub native_pipeline: String,
    pub native_stage: String,
    /// `stage` (in the connection's pipeline) or `pipeline.stage`.
    pub target: String,
}

impl MappingOverride {
    /// The config key of this entry, for error messages.
    pub fn key(&self, connection: &str) -> String {
        format!(
            "connections.{connection}.stage_map.{}.{}",
            self.native_pipeline, self.native_stage
        )
    }

    /// Resolves the target against the pipelines in force.
    pub fn resolve(
        &self,
        default_pipeline: Option<&PipelineKey>,
        pipelines: &Pipelines,
    ) -> Result<StageMapEntry, String> {
        Ok(StageMapEntry {
            native_pipeline: self.native_pipeline.clone(),
            native_stage: self.native_stage.clone(),
            target: pipeline::parse_target(&self.target, default_pipeline, pipelines)?,
            source: MappingSource::Config,
        })
    }
}

/// Debug prints the secrets, and the password of a URL with user info, as `***`.
#[derive(Clone)]
pub struct OAuthConfig {
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub auth_url: Option<url::Url>,
    pub token_url: Option<url::Url>,
    pub scopes: Vec<String>,
    pub refresh_token: Option<Secret>,
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("name", &self.name)
            .field("connector", &self.connector)
            .field("enabled", &self.enabled)
            .field("base_url", &self.base_url.as_ref().map(redacted_url))
            .field("token", &self.token)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("oauth", &self.oauth)
            .field("webhook_secrets", &self.webhook_secrets)
            .field("poll_interval", &self.poll_interval)
            .field("abandon_after", &self.abandon_after)
            .field("expire_after", &self.expire_after)
            .field("pipeline", &self.pipeline)
            .field("stage_map", &self.stage_map)
            .field("rate_limit", &self.rate_limit)
            .field("page_size", &self.page_size)
            .field("lookback", &self.lookback)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("writeback", &self.writeback)
            .field("settings", &self.settings)
            .finish()
    }
}

impl fmt::Debug for OAuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("auth_url", &self.auth_url.as_ref().map(redacted_url))
            .field("token_url", &self.token_url.as_ref().map(redacted_url))
            .field("scopes", &self.scopes)
            .field("refresh_token", &self.refresh_token)
            .finish()
    }
}

/// A URL for Debug output, with the password of its user info as `***`.
fn redacted_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Cannot fail: the URL has a host, or it could not carry a password.
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

#[derive(Debug, Clone, Default)]
pub struct RateLimitConfig {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub budget_share: Option<f64>,
    pub max_concurrency: Option<u32>,
    /// (requests, rolling window): the vendor's burst policy, overriding the manifest's.
    pub window: Option<(u32, Duration)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EmailTransport {
    File { dir: PathBuf },
    Smtp { url: Secret },
}

#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub transport: EmailTransport,
    pub from: String,
    /// Where `NAME.subject`, `NAME.txt` and `NAME.html` live.
    pub templates: PathBuf,
    pub unsubscribe_secret: Option<Secret>,
    pub unsubscribe_mailto: Option<String>,
    pub dry_run: bool,
    pub max_per_second: Option<u32>,
    pub pool_size: u32,
    pub max_per_recipient_per_day: Option<u32>,
    pub quiet_hours: Option<followups::QuietHours>,
    pub time_zone: chrono_tz::Tz,
    /// JSON pointers into a deal's raw record naming the recipient's time zone.
    pub recipient_time_zone: Vec<String>,
    pub late_grace: Duration,
    pub enroll_interval: Duration,
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub timeout: Duration,
}

/// `[deliverability]`, validated.
#[derive(Debug, Clone)]
pub struct DeliverabilityConfig {
    /// The bounce address the per-message return path is built under (VERP).
    pub return_path: Option<crate::domain::EmailAddress>,
    pub transient_bounce_limit: u32,
    pub transient_bounce_window: Duration,
    /// The 7-day complaint rate (a share: 0.003 is 0.3 %) past which a marketing rule pauses.
    pub complaint_rate_pause: f64,
    pub complaint_pause_min_sent: u32,
    /// Bearer token of `POST /bounces`; unset, the endpoint is off.
    pub intake_token: Option<Secret>,
}

impl Default for DeliverabilityConfig {
    fn default() -> Self {
        DeliverabilityConfig {
            return_path: None,
            transient_bounce_limit: 3,
            transient_bounce_window: Duration::from_secs(7 * 24 * 3600),
            complaint_rate_pause: 0.003,
            complaint_pause_min_sent: 100,
            intake_token: None,
        }
    }
}

/// One thing wrong in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Problems),
}

/// The problems of an invalid config, scrubbed of the values substituted into it. Only
/// this module can build one, so no problem reaches a reader unscrubbed.
#[derive(Debug, Clone)]
pub struct Problems(Vec<Problem>);

impl Problems {
    fn scrubbed(problems: Vec<Problem>, substituted: &interpolate::Substituted) -> Self {
        Problems(
            problems
                .into_iter()
                .map(|problem| Problem {
                    file: substituted.scrub(&problem.file).into_owned(),
                    line: problem.line,
                    key: substituted.scrub(&problem.key).into_owned(),
                    message: substituted.scrub(&problem.message).into_owned(),
                })
                .collect(),
        )
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, problem) in self.0.iter().enumerate() {
            if at > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => &problems.0,
            ConfigError::Read { .. } => &[],
        }
    }

    /// One problem, for callers outside this module that check a part of the config.
    pub fn at(config: &Config, key: impl Into<String>, message: impl Into<String>) -> Self {
        let key = key.into();
        let text = std::fs::read_to_string(&config.path).unwrap_or_default();
        Self::invalid(
            config,
            vec![Problem {
                file: display_name(&config.path),
                line: locate(&text, &key),
                key,
                message: message.into(),
            }],
        )
    }

    /// Problems found in (or through) `config`, scrubbed of its substituted values.
    pub fn invalid(config: &Config, problems: Vec<Problem>) -> Self {
        ConfigError::Invalid(Problems::scrubbed(problems, &config.substituted))
    }
}

fn display_name(path: &Path) -> String {
    path.display().to_string()
}

/// Reads, interpolates and validates a config file; every credential must be readable.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &LoadOptions::default())
}

/// Reads, interpolates and validates a config file as `options` say.
pub fn load_with(path: &Path, options: &LoadOptions) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: display_name(path),
        source,
    })?;
    parse_reporting(
        path,
        &text,
        &interpolate::ProcessEnv,
        options,
        &mut |substituted| interpolate::remember_for_process(substituted),
    )
}

/// Parses config text; `path` names the file in errors.
pub fn parse(path: &Path, text: &str, env: &dyn interpolate::Env) -> Result<Config, ConfigError> {
    parse_with(path, text, env, &LoadOptions::default())
}

/// Parses config text as `options` say; `path` names the file in errors.
pub fn parse_with(
    path: &Path,
    text: &str,
    env: &dyn interpolate::Env,
    options: &LoadOptions,
) -> Result<Config, ConfigError> {
    parse_reporting(path, text, env, options, &mut |_| {})
}

/// [`parse_with`], handing what was substituted to `substituted_values` as soon as it
/// is known (before anything can fail on it).
fn parse_reporting(
    path: &Path,
    text: &str,
    env: &dyn interpolate::Env,
    options: &LoadOptions,
    substituted_values: &mut dyn FnMut(&interpolate::Substituted),
) -> Result<Config, ConfigError> {
    let file = display_name(path);
    let problem = |key: &str, message: String| Problem {
        file: file.clone(),
        line: locate(text, key),
        key: key.to_owned(),
        message,
    };

    // Nothing is substituted yet: the file's own text is no secret of ours.
    let nothing = interpolate::Substituted::default();
    let mut value: toml::Value = toml::from_str(text).map_err(|error| {
        let line = error.span().map(|span| {
            text.get(..span.start)
                .unwrap_or(text)
                .lines()
                .count()
                .max(1)
        });
        let invalid = Problem {
            file: file.clone(),
            line,
            key: String::new(),
            message: format!("invalid TOML: {}", error.message()),
        };
        ConfigError::Invalid(Problems::scrubbed(vec![invalid], &nothing))
    })?;

    // Failed substitutions say which variable or credential, never a value.
    let interpolation = interpolate::Options {
        credentials_dir: options.credentials_dir.clone(),
        defer_credentials: options.credentials == CredentialMode::Deferred,
    };
    let interpolate::Interpolated {
        substituted,
        unavailable,
    } = interpolate::interpolate_with(&mut value, env, &interpolation).map_err(|errors| {
        let problems = errors
            .into_iter()
            .map(|error| problem(&error.key, error.message))
            .collect();
        ConfigError::Invalid(Problems::scrubbed(problems, &nothing))
    })?;
    let substituted = interpolate::Substituted::new(&substituted);
    substituted_values(&substituted);
    // A value that is not available here cannot be checked here either: the problems
    // its placeholder causes are not reported (the daemon, which reads it, checks it).
    let unchecked = |key: &str| unavailable.iter().any(|u| concerns(key, &u.key));

    let raw: raw::RawConfig = serde_path_to_error::deserialize(value).map_err(|error| {
        let key = error.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let message = match unavailable.iter().find(|u| concerns(&key, &u.key)) {
            Some(u) => format!(
                "${{credential:{}}} is needed to read this key: {}",
                u.credential, u.reason
            ),
            None => error.into_inner().to_string(),
        };
        ConfigError::Invalid(Problems::scrubbed(
            vec![problem(&key, message)],
            &substituted,
        ))
    })?;

    let mut problems = Vec::new();
    let mut config = validate(path, raw, &mut |key: &str, message: String| {
        if !unchecked(key) {
            problems.push(problem(key, message))
        }
    });
    config.substituted = substituted;
    config.credentials_dir = options.credentials_dir.clone();
    config.unavailable = unavailable;
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::invalid(&config, problems))
    }
}

fn validate(path: &Path, raw: raw::RawConfig, report: &mut dyn FnMut(&str, String)) -> Config {
    let pipelines = validate_pipelines(&raw, report);

    let listen_text = raw.server.listen.as_deref().unwrap_or("127.0.0.1:8080");
    let listen = listen_text.parse().unwrap_or_else(|_| {
        report(
            "server.listen",
            format!("expected an address like \"127.0.0.1:8080\", got {listen_text:?}"),
        );
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let public_url = raw.server.public_url.as_deref().and_then(|text| {
        parse_url(text)
            .map_err(|message| report("server.public_url", message))
            .ok()
    });
    let server = ServerConfig {
        listen,
        max_body_bytes: raw.server.max_body_bytes.unwrap_or(1024 * 1024),
        public_url,
        shutdown_timeout: raw
            .server
            .shutdown_timeout
            .map_or(Duration::from_secs(20), |d| d.0),
        api_token: raw.server.api_token.clone(),
        status_page: raw.server.status_page.unwrap_or(true),
        status_page_auth: match raw.server.status_page_auth.as_deref() {
            None | Some("always") => StatusPageAuth::Always,
            Some("local") => StatusPageAuth::Local,
            // The old default opened the page to a reverse proxy on this machine that
            // adds no forwarding header (nginx's plain proxy_pass): refused, not mapped,
            // so an upgrade never keeps that exposure silently.
            Some("remote") => {
                report(
                    "server.status_page_auth",
                    "\"remote\" is no longer accepted: it showed the page without a token to any request on a loopback listener that carried no forwarding header, which a reverse proxy on this machine may not add; remove the key to require server.api_token (the default, \"always\"), or write \"local\" if nothing but this machine's users can reach server.listen".to_owned(),
                );
                StatusPageAuth::Always
            }
            Some(other) => {
                report(
                    "server.status_page_auth",
                    format!("expected \"always\" or \"local\", got {other:?}"),
                );
                StatusPageAuth::Always
            }
        },
        metrics_auth: match raw.server.metrics_auth.as_deref() {
            None | Some("token") => MetricsAuth::Token,
            Some("none") => MetricsAuth::None,
            Some(other) => {
                report(
                    "server.metrics_auth",
                    format!("expected \"token\" or \"none\", got {other:?}"),
                );
                MetricsAuth::Token
            }
        },
        metrics_listen: raw.server.metrics_listen.as_deref().and_then(|text| {
            text.parse()
                .map_err(|_| {
                    report(
                        "server.metrics_listen",
                        format!("expected an address like \"127.0.0.1:9464\", got {text:?}"),
                    )
                })
                .ok()
        }),
        header_read_timeout: positive(
            raw.server.header_read_timeout,
            Duration::from_secs(10),
            "server.header_read_timeout",
            report,
        ),
        body_read_timeout: positive(
            raw.server.body_read_timeout,
            Duration::from_secs(30),
            "server.body_read_timeout",
            report,
        ),
        idle_timeout: positive(
            raw.server.idle_timeout,
            Duration::from_secs(60),
            "server.idle_timeout",
            report,
        ),
        max_connections: match raw.server.max_connections {
            None => 1024,
            Some(count) if (1..=1_000_000).contains(&count) => count,
            Some(count) => {
                report(
                    "server.max_connections",
                    format!("expected a number from 1 to 1000000, got {count}"),
                );
                1024
            }
        },
    };
    if server.status_page
        && server.status_page_auth == StatusPageAuth::Always
        && raw.server.status_page_auth.is_some()
        && server.api_token.is_none()
    {
        report(
            "server.status_page_auth",
            "\"always\" needs server.api_token (or set status_page = false)".to_owned(),
        );
    }
    if server.status_page_auth == StatusPageAuth::Local && !server.listen.ip().is_loopback() {
        report(
            "server.status_page_auth",
            format!(
                "\"local\" declares that only this machine reaches the listener, but server.listen = \"{}\" is not a loopback address; listen on 127.0.0.1 or give the page a token (remove the key and set server.api_token)",
                server.listen
            ),
        );
    }
    if server.metrics_auth == MetricsAuth::Token
        && raw.server.metrics_auth.is_some()
        && server.api_token.is_none()
    {
        report(
            "server.metrics_auth",
            "\"token\" needs server.api_token (or metrics_auth = \"none\" on a listener only the scraper reaches)".to_owned(),
        );
    }
    if server.metrics_listen == Some(server.listen) {
        report(
            "server.metrics_listen",
            format!(
                "must differ from server.listen (\"{}\"); leave it out to serve /metrics there",
                server.listen
            ),
        );
    }
    if server.idle_timeout < server.header_read_timeout {
        report(
            "server.idle_timeout",
            format!(
                "must be at least server.header_read_timeout ({}): the wait for a keep-alive connection's next request includes reading its header",
                duration::format(server.header_read_timeout)
            ),
        );
    }
    if let Some(token) = &server.api_token
        && token.expose().len() < 16
    {
        report(
            "server.api_token",
            "must be at least 16 characters (use a random value, e.g. `openssl rand -hex 32`)"
                .to_owned(),
        );
    }

    let mut connections = Vec::new();
    for (name, connection) in raw.connections {
        connections.push(validate_connection(&name, connection, &pipelines, report));
    }

    let config_dir = path.parent().unwrap_or(Path::new("."));
    let email = validate_email(raw.email, config_dir, report);
    let digests = followups::validate_digests(&raw.followups, &pipelines, &email, report);
    let followups = followups::validate(raw.followups, &pipelines, &email.templates, report);
    check_followup_prerequisites(&followups, &email, server.public_url.as_ref(), report);
    let deliverability = validate_deliverability(raw.deliverability, report);

    Config {
        path: path.to_owned(),
        storage: validate_storage(raw.storage, report),
        server,
        connectors_dir: raw.connectors.dir,
        pipelines,
        connections,
        email,
        followups,
        digests,
        deliverability,
        substituted: interpolate::Substituted::default(),
        credentials_dir: None,
        unavailable: Vec::new(),
    }
}

/// `[storage]`: `path` (SQLite, the default) or `url` (PostgreSQL), not both.
fn validate_storage(raw: raw::RawStorage, report: &mut dyn FnMut(&str, String)) -> StorageConfig {
    if raw.path.is_some() && raw.url.is_some() {
        report(
            "storage.url",
            "storage.path (a SQLite file) and storage.url (a PostgreSQL database) are both set; keep the one the store lives in".to_owned(),
        );
    }
    let url = raw.url.as_ref().and_then(|text| {
        PostgresUrl::parse(text)
            .map_err(|message| report("storage.url", message))
            .ok()
    });
    let failover_after = match raw.failover_after {
        None => DEFAULT_FAILOVER_AFTER,
        Some(_) if raw.url.is_none() => {
            report(
                "storage.failover_after",
                "applies to replicas sharing a PostgreSQL database (storage.url); a SQLite store has one daemon, remove the key".to_owned(),
            );
            DEFAULT_FAILOVER_AFTER
        }
        Some(duration::ConfigDuration(value)) if FAILOVER_RANGE.contains(&value) => value,
        Some(_) => {
            report(
                "storage.failover_after",
                "must be between 3s and 300s (e.g. \"15s\")".to_owned(),
            );
            DEFAULT_FAILOVER_AFTER
        }
    };
    StorageConfig {
        path: raw
            .path
            .unwrap_or_else(|| PathBuf::from("/var/lib/dealsync/dealsync.db")),
        url,
        failover_after,
    }
}

/// A duration key that must be above zero, or its default when absent.
fn positive(
    value: Option<duration::ConfigDuration>,
    default: Duration,
    key: &str,
    report: &mut dyn FnMut(&str, String),
) -> Duration {
    match value {
        None => default,
        Some(duration::ConfigDuration(value)) if !value.is_zero() => value,
        Some(_) => {
            report(key, "must be longer than zero".to_owned());
            default
        }
    }
}

/// Marketing rules need an unsubscribe secret and a public URL for their links.
fn check_followup_prerequisites(
    rules: &[followups::Rule],
    email: &EmailConfig,
    public_url: Option<&url::Url>,
    report: &mut dyn FnMut(&str, String),
) {
    let Some(marketing) = rules
        .iter()
        .find(|rule| rule.kind == followups::RuleKind::Marketing)
    else {
        return;
    };
    if email.unsubscribe_secret.is_none() {
        report(
            "email.unsubscribe_secret",
            format!(
                "marketing rule {} needs a secret to sign unsubscribe links (e.g. \"${{DEALSYNC_UNSUBSCRIBE_SECRET}}\")",
                marketing.name
            ),
        );
    } else if email
        .unsubscribe_secret
        .as_ref()
        .is_some_and(|secret| secret.expose().len() < 16)
    {
        report(
            "email.unsubscribe_secret",
            "must be at least 16 characters".to_owned(),
        );
    }
    if public_url.is_none() {
        report(
            "server.public_url",
            format!(
                "marketing rule {} needs the public URL for its unsubscribe links",
                marketing.name
            ),
        );
    }
}

fn parse_url(text: &str) -> Result<url::Url, String> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
        Ok(url) => Err(format!(
            "expected an http or https URL, got scheme {:?}",
            url.scheme()
        )),
        Err(error) => Err(format!("expected a URL: {error}")),
    }
}

fn validate_pipelines(raw: &raw::RawConfig, report: &mut dyn FnMut(&str, String)) -> Pipelines {
    if raw.pipelines.is_empty() {
        return Pipelines::new(default_pipelines());
    }
    let mut pipelines = Vec::new();
    for (key, raw_pipeline) in &raw.pipelines {
        let base = format!("pipelines.{key}");
        let mut stages = Vec::new();
        for (at, raw_stage) in raw_pipeline.stages.iter().enumerate() {
            let probability = u8::try_from(raw_stage.probability)
                .ok()
                .filter(|p| *p <= 100)
                .unwrap_or_else(|| {
                    report(
                        &format!("{base}.stages[{at}].probability"),
                        format!(
                            "expected a percentage from 0 to 100, got {}",
                            raw_stage.probability
                        ),
                    );
                    0
                });
            stages.push(Stage {
                key: StageKey::new(raw_stage.key.clone()),
                label: raw_stage
                    .label
                    .clone()
                    .unwrap_or_else(|| raw_stage.key.clone()),
                description: raw_stage.description.clone(),
                probability,
                stall_after: raw_stage.stall_after.map(|d| d.0),
                kind: raw_stage.kind,
            });
        }
        let pipeline = Pipeline {
            key: PipelineKey::new(key.clone()),
            label: raw_pipeline.label.clone().unwrap_or_else(|| key.clone()),
            stages,
        };
        for message in pipeline.validate() {
            report(&base, message);
        }
        pipelines.push(pipeline);
    }
    Pipelines::new(pipelines)
}

/// Bounds of `connections.NAME.max_response_bytes`: below 1 KiB no vendor page fits;
/// above 1 GiB the cap would no longer protect the daemon's memory.
const MIN_RESPONSE_BYTES: u64 = 1024;
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024 * 1024;
/// The largest vendor answer read, unless the connection sets `max_response_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

fn validate_connection(
    name: &str,
    raw: raw::RawConnection,
    pipelines: &Pipelines,
    report: &mut dyn FnMut(&str, String),
) -> ConnectionConfig {
    let base = format!("connections.{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        report(
            &base,
            "connection names may hold only letters, digits, '-' and '_' (they appear in URLs)"
                .to_owned(),
        );
    }
    let pipeline = raw.pipeline.as_ref().map(|key| {
        if pipelines.get(key).is_none() {
            let known: Vec<_> = pipelines.iter().map(|p| p.key.as_str()).collect();
            report(
                &format!("{base}.pipeline"),
                format!("unknown pipeline {key:?} (known: {})", known.join(", ")),
            );
        }
        PipelineKey::new(key.clone())
    });
    let mut stage_map = Vec::new();
    for (native_pipeline, stages) in &raw.stage_map {
        for (native_stage, target) in stages {
            let entry = MappingOverride {
                native_pipeline: native_pipeline.clone(),
                native_stage: native_stage.clone(),
                target: target.clone(),
            };
            // With an explicit pipeline (or "pipeline.stage") the target is checked now;
            // otherwise once the connector's default pipeline is known.
            if (pipeline.is_some() || target.contains('.'))
                && let Err(message) = entry.resolve(pipeline.as_ref(), pipelines)
            {
                report(&entry.key(name), message);
            }
            stage_map.push(entry);
        }
    }
    let base_url = raw.base_url.as_deref().and_then(|text| {
        parse_url(text)
            .map_err(|message| report(&format!("{base}.base_url"), message))
            .ok()
    });
    let oauth = raw.oauth.map(|oauth| {
        let mut url_at = |key: &str, text: Option<String>| {
            text.and_then(|text| {
                parse_url(&text)
                    .map_err(|message| report(&format!("{base}.oauth.{key}"), message))
                    .ok()
            })
        };
        OAuthConfig {
            auth_url: url_at("auth_url", oauth.auth_url),
            token_url: url_at("token_url", oauth.token_url),
            client_id: oauth.client_id,
            client_secret: oauth.client_secret,
            scopes: oauth.scopes,
            refresh_token: oauth.refresh_token,
        }
    });
    let rate_limit = raw
        .rate_limit
        .map_or_else(RateLimitConfig::default, |limit| {
            if let Some(rps) = limit.requests_per_second
                && !(rps > 0.0 && rps.is_finite())
            {
                report(
                    &format!("{base}.rate_limit.requests_per_second"),
                    format!("expected a positive number, got {rps}"),
                );
            }
            if let Some(share) = limit.budget_share
                && !(share > 0.0 && share <= 1.0)
            {
                report(
                    &format!("{base}.rate_limit.budget_share"),
                    format!("expected a share above 0 and at most 1, got {share}"),
                );
            }
            let window = match (limit.window_requests, limit.window) {
                (None, None) => None,
                (Some(requests), Some(window)) if requests > 0 && !window.0.is_zero() => {
                    Some((requests, window.0))
                }
                _ => {
                    report(
                        &format!("{base}.rate_limit.window"),
                        "window_requests and window go together: a positive count and a duration like \"10s\"".to_owned(),
                    );
                    None
                }
            };
            RateLimitConfig {
                requests_per_second: limit.requests_per_second,
                burst: limit.burst,
                budget_share: limit.budget_share,
                max_concurrency: limit.max_concurrency,
                window,
            }
        });
    let max_response_bytes = raw.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if !(MIN_RESPONSE_BYTES..=MAX_RESPONSE_BYTES).contains(&max_response_bytes) {
        report(
            &format!("{base}.max_response_bytes"),
            format!(
                "expected a size in bytes from {MIN_RESPONSE_BYTES} (1 KiB) to {MAX_RESPONSE_BYTES} (1 GiB), got {max_response_bytes}"
            ),
        );
    }
    if let Some(interval) = raw.poll_interval
        && interval.0 < Duration::from_secs(1)
    {
        report(
            &format!("{base}.poll_interval"),
            "must be at least 1s".to_owned(),
        );
    }
    let writeback = raw.writeback.filter(|w| w.enabled).map(|w| {
        let max_attempts = w
            .max_attempts
            .unwrap_or(WritebackConfig::DEFAULT_MAX_ATTEMPTS);
        if !(1..=100).contains(&max_attempts) {
            report(
                &format!("{base}.writeback.max_attempts"),
                format!("expected 1 to 100 attempts, got {max_attempts}"),
            );
        }
        let retry_delay = w
            .retry_delay
            .map_or(WritebackConfig::DEFAULT_RETRY_DELAY, |d| d.0);
        if retry_delay.is_zero() || retry_delay > WritebackConfig::MAX_RETRY_DELAY {
            report(
                &format!("{base}.writeback.retry_delay"),
                "expected a duration above 0 and at most 1h, like \"1m\"".to_owned(),
            );
        }
        WritebackConfig {
            max_attempts,
            retry_delay,
        }
    });
    ConnectionConfig {
        name: ConnectionName::new(name),
        connector: raw.connector,
        enabled: raw.enabled,
        base_url,
        token: raw.token,
        username: raw.username,
        password: raw.password,
        oauth,
        webhook_secrets: raw.webhook_secret.map(|s| s.0).unwrap_or_default(),
        poll_interval: raw.poll_interval.map(|d| d.0),
        abandon_after: raw.abandon_after.map_or(Duration::from_secs(3600), |d| d.0),
        expire_after: raw
            .expire_after
            .map_or(Duration::from_secs(30 * 24 * 3600), |d| d.0),
        pipeline,
        stage_map,
        rate_limit,
        page_size: raw.page_size,
        lookback: raw.lookback.map(|d| d.0),
        max_response_bytes,
        settings: raw.settings,
        writeback,
    }
}

/// `[deliverability]`: the bounce address, the soft-bounce limit and window, the intake token.
fn validate_deliverability(
    raw: raw::RawDeliverability,
    report: &mut dyn FnMut(&str, String),
) -> DeliverabilityConfig {
    let defaults = DeliverabilityConfig::default();
    let return_path = raw.return_path.as_deref().and_then(|text| {
        let parsed = crate::domain::EmailAddress::parse(text).filter(|a| !a.as_str().contains('+'));
        if parsed.is_none() {
            report(
                "deliverability.return_path",
                format!("expected a plain address like \"bounces@shop.example\" (no `+`: dealsync adds the tag), got {text:?}"),
            );
        }
        parsed
    });
    let transient_bounce_limit = match raw.transient_bounce_limit {
        Some(0) => {
            report(
                "deliverability.transient_bounce_limit",
                "must be at least 1".to_owned(),
            );
            defaults.transient_bounce_limit
        }
        Some(limit) => limit,
        None => defaults.transient_bounce_limit,
    };
    let transient_bounce_window = raw
        .transient_bounce_window
        .map_or(defaults.transient_bounce_window, |d| d.0);
    if transient_bounce_window.is_zero() {
        report(
            "deliverability.transient_bounce_window",
            "must be longer than 0s".to_owned(),
        );
    }
    let complaint_rate_pause = match raw.complaint_rate_pause.as_deref() {
        None => defaults.complaint_rate_pause,
        Some(text) => {
            let share = text
                .trim()
                .strip_suffix('%')
                .and_then(|number| number.trim().parse::<f64>().ok())
                .filter(|percent| percent.is_finite() && *percent > 0.0 && *percent <= 100.0)
                .map(|percent| percent / 100.0);
            share.unwrap_or_else(|| {
                report(
                    "deliverability.complaint_rate_pause",
                    format!("expected a percentage like \"0.3%\" (more than 0, at most 100), got {text:?}"),
                );
                defaults.complaint_rate_pause
            })
        }
    };
    if let Some(token) = &raw.intake_token
        && token.expose().len() < 16
    {
        report(
            "deliverability.intake_token",
            "must be at least 16 characters (use a random value, e.g. `openssl rand -hex 32`)"
                .to_owned(),
        );
    }
    DeliverabilityConfig {
        return_path,
        transient_bounce_limit,
        transient_bounce_window,
        complaint_rate_pause,
        complaint_pause_min_sent: raw
            .complaint_pause_min_sent
            .unwrap_or(defaults.complaint_pause_min_sent),
        intake_token: raw.intake_token,
    }
}

fn validate_email(
    raw: raw::RawEmail,
    config_dir: &Path,
    report: &mut dyn FnMut(&str, String),
) -> EmailConfig {
    let transport = match raw.transport.as_deref().unwrap_or("file") {
        "file" => EmailTransport::File {
            dir: raw
                .dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("data/outbox")),
        },
        "smtp" => match raw.url.clone() {
            Some(url) => {
                let scheme_ok = url::Url::parse(url.expose())
                    .map(|u| matches!(u.scheme(), "smtp" | "smtps"))
                    .unwrap_or(false);
                if !scheme_ok {
                    report(
                        "email.url",
                        "expected a URL like \"smtp://127.0.0.1:2525\" or \"smtps://user:pass@host:465\""
                            .to_owned(),
                    );
                }
                EmailTransport::Smtp { url }
            }
            None => {
                report("email.url", "transport \"smtp\" needs a url".to_owned());
                EmailTransport::File {
                    dir: PathBuf::from("data/outbox"),
                }
            }
        },
        other => {
            report(
                "email.transport",
                format!("expected \"file\" or \"smtp\", got {other:?}"),
            );
            EmailTransport::File {
                dir: PathBuf::from("data/outbox"),
            }
        }
    };
    let from = raw
        .from
        .unwrap_or_else(|| "dealsync <dealsync@localhost>".to_owned());
    if from.parse::<lettre::message::Mailbox>().is_err() {
        report(
            "email.from",
            format!("expected \"Name <address>\" or an address, got {from:?}"),
        );
    }
    if let Some(mailto) = &raw.unsubscribe_mailto
        && crate::domain::EmailAddress::parse(mailto).is_none()
    {
        report(
            "email.unsubscribe_mailto",
            format!("expected an email address, got {mailto:?}"),
        );
    }
    let templates = raw
        .templates
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                config_dir.join(dir)
            }
        })
        .unwrap_or_else(|| config_dir.join("templates"));
    let quiet_hours = raw.quiet_hours.as_deref().and_then(|text| {
        followups::QuietHours::parse(text)
            .map_err(|message| report("email.quiet_hours", message))
            .ok()
    });
    let time_zone = match raw.time_zone.as_deref() {
        None => chrono_tz::UTC,
        Some(text) => text.parse().unwrap_or_else(|_| {
            report(
                "email.time_zone",
                format!("expected an IANA time zone like \"Europe/Berlin\", got {text:?}"),
            );
            chrono_tz::UTC
        }),
    };
    let recipient_time_zone = raw.recipient_time_zone.unwrap_or_default();
    for pointer in &recipient_time_zone {
        if !pointer.starts_with('/') {
            report(
                "email.recipient_time_zone",
                format!("expected JSON pointers like \"/customer/time_zone\", got {pointer:?}"),
            );
        }
    }
    let positive = |key: &str, value: Option<u32>, report: &mut dyn FnMut(&str, String)| {
        if value == Some(0) {
            report(key, "must be at least 1".to_owned());
        }
        value
    };
    let max_per_second = positive("email.max_per_second", raw.max_per_second, report);
    let pool_size = positive("email.pool_size", raw.pool_size, report).unwrap_or(4);
    let max_per_recipient_per_day = positive(
        "email.max_per_recipient_per_day",
        raw.max_per_recipient_per_day,
        report,
    );
    let max_attempts = positive("email.max_attempts", raw.max_attempts, report).unwrap_or(8);
    let retry_initial = raw.retry_initial.map_or(Duration::from_secs(30), |d| d.0);
    let retry_max = raw.retry_max.map_or(Duration::from_secs(3600), |d| d.0);
    if retry_max < retry_initial {
        report(
            "email.retry_max",
            "must not be shorter than email.retry_initial".to_owned(),
        );
    }
    let enroll_interval = raw.enroll_interval.map_or(Duration::from_secs(30), |d| d.0);
    if enroll_interval < Duration::from_millis(100) {
        report("email.enroll_interval", "must be at least 100ms".to_owned());
    }
    EmailConfig {
        transport,
        from,
        templates,
        unsubscribe_secret: raw.unsubscribe_secret,
        unsubscribe_mailto: raw.unsubscribe_mailto,
        dry_run: raw.dry_run.unwrap_or(false),
        max_per_second,
        pool_size,
        max_per_recipient_per_day,
        quiet_hours,
        time_zone,
        recipient_time_zone,
        late_grace: raw
            .late_grace
            .map_or(Duration::from_secs(6 * 3600), |d| d.0),
        enroll_interval,
        max_attempts,
        retry_initial,
        retry_max,
        timeout: raw.timeout.map_or(Duration::from_secs(30), |d| d.0),
    }
}

/// Finds the line that defines a dotted key path, for error messages.
///
/// It follows `[table]` headers and `key =` lines; good enough to point a user at the
/// right place, and `None` when unsure.
pub fn locate(text: &str, key_path: &str) -> Option<usize> {
    if key_path.is_empty() {
        return None;
    }
    let segments: Vec<String> = split_key_path(key_path);
    let mut table: Vec<String> = Vec::new();
    let mut best: Option<(usize, usize)> = None; // (matched segments, line)
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(header) = trimmed
            .strip_prefix("[[")
            .and_then(|rest| rest.split("]]").next())
            .or_else(|| {
                trimmed
                    .strip_prefix('[')
                    .and_then(|rest| rest.split(']').next())
            })
        {
            table = split_key_path(header);
            let matched = common_prefix(&table, &segments);
            if matched == table.len() && best.is_none_or(|(m, _)| matched > m) {
                best = Some((matched, index + 1));
            }
            continue;
        }
        if let Some((key, _)) = trimmed.split_once('=') {
            let mut full = table.clone();
            full.extend(split_key_path(key.trim()));
            let matched = common_prefix(&full, &segments);
            if matched == full.len() && best.is_none_or(|(m, _)| matched > m) {
                best = Some((matched, index + 1));
            }
        }
    }
    best.map(|(_, line)| line)
}

fn split_key_path(path: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in path.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => segments.push(std::mem::take(&mut current)),
            '[' if !quoted => segments.push(std::mem::take(&mut current)),
            ']' if !quoted => {}
            _ => current.push(c),
        }
    }
    segments.push(current);
    segments
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.parse::<usize>().is_err())
        .collect()
}

fn common_prefix(a: &[String], b: &[String]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Test support for modules whose tests start from a config text.
#[cfg(test)]
pub(crate) mod testing {
    use super::interpolate::tests::MapEnv;
    use super::{Config, ConfigError, parse};
    use std::path::Path;

    /// Parses `text` as `<dir>/dealsync.toml`, with no environment variables set.
    pub fn parse_in(dir: &Path, text: &str) -> Result<Config, ConfigError> {
        parse(
            &dir.join("dealsync.toml"),
            text,
            &MapEnv(Default::default()),
        )
    }

    /// The keys of the problems `error` reports, in its order.
    pub fn problem_keys(error: &ConfigError) -> Vec<&str> {
        error.problems().iter().map(|p| p.key.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::interpolate::tests::MapEnv;
    use super::testing::problem_keys;
    use super::*;
    use std::collections::HashMap;

    fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = MapEnv(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        );
        parse(Path::new("dealsync.toml"), text, &env)
    }

    fn only_problem(error: ConfigError) -> Problem {
        let problems = error.problems().to_vec();
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.into_iter().next().unwrap()
    }

    const MINIMAL: &str = r#"
[storage]
path = "data/dealsync.db"

[server]
listen = "127.0.0.1:8080"

[connections.hubspot-main]
connector = "hubspot"
base_url = "http://127.0.0.1:9000"
token = "${HUBSPOT_TOKEN}"
poll_interval = "5m"

[connections.shop]
connector = "shopify"
webhook_secret = "${SHOPIFY_WEBHOOK_SECRET}"

[email]
transport = "smtp"
url = "smtp://127.0.0.1:2525"
from = "Shop <shop@example.com>"
"#;

    #[test]
    fn the_contract_config_from_product_md_loads() {
        let config = parse_with(
            MINIMAL,
            &[
                ("HUBSPOT_TOKEN", "pat-1"),
                ("SHOPIFY_WEBHOOK_SECRET", "shh-2"),
            ],
        )
        .unwrap();
        assert_eq!(config.connections.len(), 2);
        let hubspot = &config.connections[0];
        assert_eq!(hubspot.token.as_ref().unwrap().expose(), "pat-1");
        assert_eq!(hubspot.poll_interval, Some(Duration::from_secs(300)));
        assert_eq!(config.connections[1].webhook_secrets.len(), 1);
        assert!(config.pipelines.get("sales").is_some());
        assert!(config.pipelines.get("ecommerce").is_some());
        assert!(!format!("{config:?}").contains("pat-1"));
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_key_and_line() {
        let text = "[connections.crm]\nconnector = \"hubspot\"\npol_interval = \"5m\"\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "connections.crm.pol_interval");
        assert!(
            problem.message.contains("unknown field `pol_interval`"),
            "{problem}"
        );
        assert_eq!(problem.line, Some(3), "{problem}");
    }

    #[test]
    fn a_bad_duration_names_its_key_line_and_the_expected_form() {
        let text = "[connections.crm]\nconnector = \"hubspot\"\npoll_interval = \"5\"\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "connections.crm.poll_interval");
        assert_eq!(problem.line, Some(3));
        assert!(problem.message.contains("like \"90s\""), "{problem}");
        assert_eq!(
            problem.to_string(),
            format!(
                "dealsync.toml:3: connections.crm.poll_interval: {}",
                problem.message
            )
        );
    }

    #[test]
    fn every_missing_env_var_is_reported_by_key() {
        let error = parse_with(MINIMAL, &[]).unwrap_err();
        let keys = problem_keys(&error);
        assert_eq!(
            keys,
            [
                "connections.hubspot-main.token",
                "connections.shop.webhook_secret"
            ]
        );
        assert_eq!(error.problems()[0].line, Some(11));
    }

    #[test]
    fn a_missing_credential_file_is_reported_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            "[connections.crm]\nconnector = \"hubspot\"\ntoken = \"${credential:crm_token}\"\n";
        let error = parse_with(
            text,
            &[("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap())],
        )
        .unwrap_err();
        let problem = only_problem(error);
        assert_eq!(problem.key, "connections.crm.token");
        assert!(problem.message.contains("crm_token"), "{problem}");
    }

    #[test]
    fn deferred_credentials_leave_their_keys_unchecked_and_listed() {
        let text = "[server]\napi_token = \"${credential:api}\"\n[email]\ntransport = \"smtp\"\nurl = \"${credential:smtp}\"\n[connections.shop]\nconnector = \"shopify\"\nwebhook_secret = [\"${credential:hook}\"]\n";
        let env = MapEnv(HashMap::new());
        let required = parse(Path::new("d.toml"), text, &env).unwrap_err();
        assert_eq!(required.problems().len(), 3, "{required}");
        let deferred = LoadOptions {
            credentials_dir: None,
            credentials: CredentialMode::Deferred,
        };
        let config = super::parse_with(Path::new("d.toml"), text, &env, &deferred).unwrap();
        let keys: Vec<_> = config.unavailable.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "connections.shop.webhook_secret[0]",
                "email.url",
                "server.api_token"
            ]
        );
        assert!(!config.server.api_token.as_ref().unwrap().is_available());
        config.require_connection_credentials("other").unwrap();
        let error = config.require_connection_credentials("shop").unwrap_err();
        assert_eq!(error.problems().len(), 2, "{error}");
        assert_eq!(
            error.problems()[0].key,
            "connections.shop.webhook_secret[0]"
        );
        assert!(error.to_string().contains("--credentials-dir DIR"));
        assert!(config.require_credentials(|_| true).is_err());
    }

    #[test]
    fn storage_url_selects_postgres_and_its_credential_shows_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg"), "s3cr3t-pg-Password\n").unwrap();
        let options = LoadOptions {
            credentials_dir: Some(dir.path().to_owned()),
            credentials: CredentialMode::Required,
        };
        let env = MapEnv(HashMap::new());
        let text =
            "[storage]\nurl = \"postgres://dealsync:${credential:pg}@db.internal:5433/deals\"\n";
        let config = super::parse_with(Path::new("d.toml"), text, &env, &options).unwrap();
        let url = config.storage.url.as_ref().unwrap();
        assert_eq!(url.to_string(), "db.internal:5433/deals");
        assert_eq!(
            url.password.as_ref().unwrap().expose(),
            "s3cr3t-pg-Password"
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert_eq!(config.storage.failover_after, super::DEFAULT_FAILOVER_AFTER);

        // A URL the store cannot use is refused without quoting it.
        let text = "[storage]\nurl = \"postgres://dealsync:${credential:pg}@db.internal/deals?sslmode=prefer\"\n";
        let error = super::parse_with(Path::new("d.toml"), text, &env, &options).unwrap_err();
        let shown = error.to_string();
        assert_eq!(error.problems()[0].key, "storage.url");
        assert!(
            shown.contains("sslmode=verify-full") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn storage_path_and_url_together_are_refused_naming_both_and_neither_keeps_the_default() {
        let text = "[storage]\npath = \"data/dealsync.db\"\nurl = \"postgres://dealsync:pw-1234@db/deals\"\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "storage.url");
        assert!(
            problem.message.contains("storage.path") && problem.message.contains("storage.url"),
            "{problem}"
        );
        assert!(!problem.message.contains("pw-1234"), "{problem}");
        let config = parse_with("", &[]).unwrap();
        assert_eq!(
            config.storage.path,
            Path::new("/var/lib/dealsync/dealsync.db")
        );
        assert!(config.storage.url.is_none());
    }

    #[test]
    fn failover_after_is_read_with_a_url_and_refused_out_of_range_or_without_one() {
        let url = "[storage]\nurl = \"postgres://dealsync@db/deals\"\n";
        let config = parse_with(&format!("{url}failover_after = \"7s\"\n"), &[]).unwrap();
        assert_eq!(config.storage.failover_after, Duration::from_secs(7));
        for (text, expected) in [
            (
                format!("{url}failover_after = \"1s\"\n"),
                "between 3s and 300s",
            ),
            (
                format!("{url}failover_after = \"10m\"\n"),
                "between 3s and 300s",
            ),
            (
                "[storage]\npath = \"d.db\"\nfailover_after = \"7s\"\n".to_owned(),
                "storage.url",
            ),
        ] {
            let problem = only_problem(parse_with(&text, &[]).unwrap_err());
            assert_eq!(problem.key, "storage.failover_after", "{text}");
            assert!(problem.message.contains(expected), "{text}: {problem}");
        }
    }

    #[test]
    fn a_problem_concerns_the_keys_inside_and_around_it_only() {
        assert!(concerns("email.url", "email.url"));
        assert!(concerns(
            "connections.a.webhook_secret",
            "connections.a.webhook_secret[0]"
        ));
        assert!(concerns("connections.a", "connections.a.token"));
        assert!(!concerns("connections.a", "connections.ab.token"));
        assert!(!concerns("email.url", "email.unsubscribe_secret"));
    }

    #[test]
    fn a_secret_in_the_wrong_place_is_scrubbed_from_the_error() {
        let text = "[server]\nmax_body_bytes = \"${SECRET}\"\n";
        let error = parse_with(text, &[("SECRET", "topsecretvalue")]).unwrap_err();
        let shown = error.to_string();
        assert!(!shown.contains("topsecretvalue"), "{shown}");
        assert!(shown.contains("server.max_body_bytes"), "{shown}");
    }

    #[test]
    fn a_secret_quoted_with_escapes_is_scrubbed_from_the_error() {
        // Found by `proptests::a_substituted_secret_never_shows_in_a_config_error`: the
        // message quotes the value with `{:?}`, which escapes some characters, so the
        // secret as written was not in it and stayed unscrubbed.
        for secret in ["00aA0aa\u{2ee5e}", "pass\"word-123", "line\nbreak-456"] {
            let text = "[server]\nlisten = \"${SECRET}\"\n";
            let shown = parse_with(text, &[("SECRET", secret)])
                .unwrap_err()
                .to_string();
            assert!(shown.contains("server.listen"), "{shown}");
            assert!(shown.contains("got \"***\""), "{shown}");
            let quoted = format!("{secret:?}");
            let escaped = quoted.trim_start_matches('"').trim_end_matches('"');
            assert!(!shown.contains(escaped), "{shown}");
        }
    }

    #[test]
    fn pipelines_are_validated() {
        let text = r#"
[pipelines.deals]
stages = [
  { key = "new", probability = 150, kind = "open" },
  { key = "new", probability = 10, kind = "open" },
  { key = "gone", probability = 0, kind = "lost" },
]
"#;
        let error = parse_with(text, &[]).unwrap_err();
        let shown = error.to_string();
        assert!(
            shown.contains("expected a percentage from 0 to 100, got 150"),
            "{shown}"
        );
        assert!(shown.contains("stage key \"new\" appears twice"), "{shown}");
        assert!(shown.contains("has no stage of kind \"won\""), "{shown}");
    }

    #[test]
    fn stage_map_targets_are_checked_against_the_pipelines() {
        let text = r#"
[connections.crm]
connector = "pipedrive"
pipeline = "sales"
[connections.crm.stage_map."Software Sales"]
"Product Demo" = "needs_assessment"
"Trial Use" = "trial"
"#;
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(
            problem.key,
            "connections.crm.stage_map.Software Sales.Trial Use"
        );
        assert!(problem.message.contains("has no stage \"trial\""));
    }

    #[test]
    fn an_error_built_outside_the_config_module_is_scrubbed_of_substituted_values() {
        // `connector = "${PD_TOKEN}"` parses; the registry then names the connector.
        let text = "[connections.crm]\nconnector = \"${PD_TOKEN}\"\n";
        let config = parse_with(text, &[("PD_TOKEN", "pd-secret-token\"x")]).unwrap();
        let error = ConfigError::at(
            &config,
            "connections.crm.connector",
            format!("unknown connector {:?}", config.connections[0].connector),
        );
        let shown = error.to_string();
        assert!(!shown.contains("pd-secret-token"), "{shown}");
        assert!(
            shown.contains("connections.crm.connector: unknown connector \"***\""),
            "{shown}"
        );
        let problems = vec![Problem {
            file: "pd-secret-token\"x/connectors.d".into(),
            line: None,
            key: "connectors.dir".into(),
            message: "cannot read".into(),
        }];
        let shown = ConfigError::invalid(&config, problems).to_string();
        assert_eq!(shown, "***/connectors.d: connectors.dir: cannot read");
    }

    #[test]
    fn debug_of_a_connection_prints_stars_for_its_secrets_and_url_password() {
        let text = r#"
[connections.crm]
connector = "hubspot"
base_url = "https://user:url-secret-1@api.example.com/"
token = "token-secret-2"
password = "password-secret-3"
webhook_secret = "hook-secret-4"
[connections.crm.oauth]
client_id = "client"
client_secret = "client-secret-5"
refresh_token = "refresh-secret-6"
token_url = "https://user:url-secret-7@auth.example.com/token"
[email]
transport = "smtp"
url = "smtps://user:smtp-secret-8@mail.example.com"
"#;
        let config = parse_with(text, &[]).unwrap();
        let shown = format!("{config:?}");
        for secret in 1..=8 {
            assert!(!shown.contains(&format!("secret-{secret}")), "{shown}");
        }
        assert!(
            shown.contains("https://user:***@api.example.com/"),
            "{shown}"
        );
    }

    #[test]
    fn max_response_bytes_defaults_to_64_mib_and_is_bounded() {
        let text = "[connections.crm]\nconnector = \"hubspot\"\n";
        let config = parse_with(text, &[]).unwrap();
        assert_eq!(config.connections[0].max_response_bytes, 64 * 1024 * 1024);
        let text = "[connections.crm]\nconnector = \"hubspot\"\nmax_response_bytes = 10\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "connections.crm.max_response_bytes");
        assert_eq!(problem.line, Some(3));
        assert!(problem.message.contains("from 1024"), "{problem}");
    }

    #[test]
    fn write_back_is_off_by_default_and_its_settings_are_bounded() {
        let text = "[connections.crm]\nconnector = \"hubspot\"\n";
        assert_eq!(
            parse_with(text, &[]).unwrap().connections[0].writeback,
            None
        );
        let text = "[connections.crm]\nconnector = \"hubspot\"\n[connections.crm.writeback]\nenabled = true\n";
        assert_eq!(
            parse_with(text, &[]).unwrap().connections[0].writeback,
            Some(WritebackConfig {
                max_attempts: 8,
                retry_delay: Duration::from_secs(60)
            })
        );
        let text = "[connections.crm]\nconnector = \"hubspot\"\n[connections.crm.writeback]\nenabled = true\nmax_attempts = 0\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "connections.crm.writeback.max_attempts");
        let text = "[connections.crm]\nconnector = \"hubspot\"\n[connections.crm.writeback]\nenable = true\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert!(problem.message.contains("unknown field"), "{problem}");
    }

    #[test]
    fn the_server_limits_and_access_default_to_safe_values() {
        let config = parse_with("[server]\nlisten = \"127.0.0.1:8080\"\n", &[]).unwrap();
        let server = &config.server;
        assert_eq!(server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(server.idle_timeout, Duration::from_secs(60));
        assert_eq!(server.max_connections, 1024);
        assert_eq!(server.status_page_auth, StatusPageAuth::Always);
        assert_eq!(server.metrics_auth, MetricsAuth::Token);
        assert_eq!(server.metrics_listen, None);
    }

    #[test]
    fn the_old_remote_status_page_auth_is_refused_naming_what_to_write_now() {
        let text = "[server]\napi_token = \"0123456789abcdef0\"\nstatus_page_auth = \"remote\"\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "server.status_page_auth");
        assert!(problem.message.contains("\"local\""), "{problem}");
        assert!(problem.message.contains("server.api_token"), "{problem}");
    }

    #[test]
    fn local_status_page_auth_needs_a_loopback_listener() {
        let text = "[server]\nlisten = \"0.0.0.0:8080\"\nstatus_page_auth = \"local\"\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "server.status_page_auth");
        assert!(problem.message.contains("0.0.0.0:8080"), "{problem}");
        let text = "[server]\nlisten = \"127.0.0.1:8080\"\nstatus_page_auth = \"local\"\n";
        let config = parse_with(text, &[]).unwrap();
        assert_eq!(config.server.status_page_auth, StatusPageAuth::Local);
    }

    #[test]
    fn server_limits_out_of_range_are_errors_naming_their_keys() {
        let text = "[server]\nheader_read_timeout = \"0s\"\nmax_connections = 0\n\
                    metrics_listen = \"nowhere\"\nmetrics_auth = \"token\"\n";
        let error = parse_with(text, &[]).unwrap_err();
        let keys = problem_keys(&error);
        assert_eq!(
            keys,
            [
                "server.metrics_listen",
                "server.header_read_timeout",
                "server.max_connections",
                "server.metrics_auth"
            ],
            "{error}"
        );
        let text = "[server]\nheader_read_timeout = \"20s\"\nidle_timeout = \"5s\"\n";
        let problem = only_problem(parse_with(text, &[]).unwrap_err());
        assert_eq!(problem.key, "server.idle_timeout");
        assert!(problem.message.contains("20s"), "{problem}");
    }
}

#[cfg(test)]
mod proptests {
    use super::interpolate::tests::MapEnv;
    use super::*;
    use proptest::prelude::*;

    /// Keys whose validation quotes the value it refused, each with the line it sits on.
    const KEYS: &[(&str, &str)] = &[
        ("[server]", "listen"),
        ("[server]", "max_body_bytes"),
        ("[server]", "public_url"),
        ("[server]", "status_page_auth"),
        (
            "[email]\ntransport = \"smtp\"\nurl = \"smtp://127.0.0.1:2525\"",
            "from",
        ),
        ("[email]\ntransport = \"file\"\ndir = \"/tmp\"", "time_zone"),
        (
            "[email]\ntransport = \"file\"\ndir = \"/tmp\"",
            "unsubscribe_mailto",
        ),
        ("[email]", "transport"),
        ("[connections.crm]\nconnector = \"demo\"", "poll_interval"),
    ];

    /// A token of 8 to 24 characters, quotes, backslashes and control characters
    /// (which an error message escapes) more often than chance would give them.
    fn secret() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof!["[a-zA-Z0-9_-]", "[\"\\\\\n\t'{}]", "."], 8..24)
            .prop_map(|chars| chars.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_substituted_secret_never_shows_in_a_config_error(
            secret in secret(),
            (table, key) in prop::sample::select(KEYS),
        ) {
            let text = format!("{table}\n{key} = \"${{SECRET}}\"\n");
            let env = MapEnv([("SECRET".to_owned(), secret.clone())].into());
            if let Err(error) = parse(Path::new("dealsync.toml"), &text, &env) {
                let shown = error.to_string();
                // As written, and as a quoted value shows it (`"` as `\"`, newline as `\n`).
                let quoted = format!("{secret:?}");
                let escaped = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"'));
                prop_assert!(!shown.contains(&secret), "{key}: {shown}");
                prop_assert!(!shown.contains(escaped.unwrap_or(&quoted)), "{key}: {shown}");
            }
        }
    }
}
