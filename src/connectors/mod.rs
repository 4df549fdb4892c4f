//! Connectors: the kinds of source, behind one trait, and the registry that builds a
//! connector for each configured connection.
//!
//! Boundary: a connector reads its source and returns records and a new cursor; `sync`
//! maps stages and commits each page with its cursor. A connector never holds the
//! `Store`: [`SyncContext::handles`] gives it narrow handles ([`handles`]), through which
//! it reads kept enrichment records and stored fingerprints and writes only its OAuth
//! tokens.

pub mod delivery;
pub mod demo;
pub mod ecommerce;
pub mod generic;
pub mod handles;
pub mod manifest;
pub mod shopify;
pub mod signature;
pub mod stripe;
pub mod vendor_http;
pub mod woocommerce;

use crate::config::{ConfigError, ConnectionConfig};
use crate::domain::{ConnectionName, SourceDeal};
use crate::pipeline::{NativePipeline, StageMapEntry};
use async_trait::async_trait;
pub use handles::StoreHandles;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a connector call failed with; the variant tells the caller what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// 429, 5xx, a timeout or a reset: retry later.
    #[error("{vendor} request failed: {reason}")]
    Transient {
        vendor: String,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The credentials were rejected and refreshing did not help: needs re-authorization.
    #[error("credentials for connection {connection} were rejected: {reason}")]
    Unauthorized {
        connection: ConnectionName,
        reason: String,
    },
    /// The vendor answered with something we cannot use (a malformed page).
    #[error("{vendor} sent an unusable response: {reason}")]
    BadResponse { vendor: String, reason: String },
    /// The daily or rolling budget is spent; resume after the given time.
    #[error("{vendor} API budget exhausted; resuming in {}s", .resume_after.as_secs())]
    BudgetExhausted {
        vendor: String,
        resume_after: Duration,
    },
    /// The vendor redirected to another origin (or kept redirecting within its own): the
    /// redirect was not followed, so the connection's credentials went nowhere else.
    /// Not retried; the connection's `base_url` (or the vendor's setup) needs fixing.
    #[error(
        "{vendor} redirected {path} to {location}: {}",
        if *.cross_origin {
            "another origin, where dealsync sends no credentials, so the redirect was not followed; \
             point the connection at the vendor's current address (base_url, or oauth.token_url \
             for token requests)"
        } else {
            "too many redirects within the same origin"
        }
    )]
    Redirected {
        vendor: String,
        path: String,
        /// Scheme, host, port and path of the `Location` (its query is left out).
        location: String,
        cross_origin: bool,
    },
    /// The vendor's answer is larger than the connection's `max_response_bytes`: reading
    /// stopped there. Not retried.
    #[error(
        "connection {connection}: the {vendor} answer to {path} is larger than max_response_bytes = {limit} bytes{}; \
         it was not read (raise max_response_bytes under [connections.{connection}] if such answers are expected)",
        .declared.map(|bytes| format!(" (Content-Length: {bytes})")).unwrap_or_default()
    )]
    ResponseTooLarge {
        connection: ConnectionName,
        vendor: String,
        path: String,
        limit: u64,
        declared: Option<u64>,
    },
    /// Shutdown was requested mid-call.
    #[error("cancelled by shutdown")]
    Cancelled,
    /// The connection lacks what this call needs (a token, a shop domain, the token
    /// store): a configuration or wiring fault, not retried.
    #[error("{what}")]
    NotConfigured { what: &'static str },
    /// A store read or write the connector depends on (its OAuth tokens) failed.
    #[error("{action}: {source}")]
    Store {
        action: &'static str,
        #[source]
        source: crate::store::StoreError,
    },
    /// The HTTP client could not be built (TLS roots, settings).
    #[error("building the {what} HTTP client: {source}")]
    HttpClient {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// A request URL could not be built from the connection's settings.
    #[error("building the {what} URL: {source}")]
    Url {
        what: &'static str,
        #[source]
        source: url::ParseError,
    },
    /// A lock shared by the connector's tasks was poisoned by a panic in another task.
    #[error("{what} lock poisoned")]
    Poisoned { what: &'static str },
}

/// Why a write-back did not go through; the variant says whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WritebackError {
    /// A timeout, 429, 5xx, a spent budget, credentials to refresh: try again later
    /// (`after`, when the vendor said how long to wait).
    #[error("{reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The vendor refused the request as written (a 4xx), or the manifest cannot build
    /// it: sending it again would change nothing.
    #[error("{reason}")]
    Refused { reason: String },
}

impl From<ConnectorError> for WritebackError {
    fn from(error: ConnectorError) -> Self {
        let reason = crate::telemetry::error_chain(&error);
        match error {
            ConnectorError::Transient { retry_after, .. } => WritebackError::Retry {
                reason,
                after: retry_after,
            },
            ConnectorError::BudgetExhausted { resume_after, .. } => WritebackError::Retry {
                reason,
                after: Some(resume_after),
            },
            ConnectorError::Unauthorized { .. }
            | ConnectorError::Cancelled
            | ConnectorError::Store { .. }
            | ConnectorError::Poisoned { .. } => WritebackError::Retry {
                reason,
                after: None,
            },
            ConnectorError::BadResponse { .. }
            | ConnectorError::Redirected { .. }
            | ConnectorError::ResponseTooLarge { .. }
            | ConnectorError::NotConfigured { .. }
            | ConnectorError::HttpClient { .. }
            | ConnectorError::Url { .. } => WritebackError::Refused { reason },
        }
    }
}

/// A record the connector could not turn into a deal; quarantined, the sync goes on.
#[derive(Debug, Clone)]
pub struct BadRecord {
    pub external_id: Option<String>,
    pub reason: String,
    /// The record as the source sent it.
    pub raw: crate::domain::RawRecord,
}

impl BadRecord {
    /// The same failure, about the record `raw`.
    pub fn with_raw(self, raw: crate::domain::RawRecord) -> Self {
        BadRecord { raw, ..self }
    }
}

/// One page of records and where to continue.
#[derive(Debug, Clone)]
pub struct Page {
    pub records: Vec<Result<SourceDeal, BadRecord>>,
    /// The cursor after this page; committed with the page's records.
    pub next: serde_json::Value,
    /// True when this run has caught up; the next run starts from `next`.
    pub done: bool,
    /// HTTP requests made for this page (for the run summary).
    pub requests: u64,
    /// Of those, answers of 429 Too Many Requests.
    pub rate_limited: u64,
    /// Records read that the store already holds as the vendor sent them again (a
    /// lookback overlap); not in `records`.
    pub unchanged: u64,
    /// Enrichment records to keep for later reads; committed with the page.
    pub cache: Vec<crate::store::CachedRecord>,
}

impl Page {
    /// A caught-up page with no records: what a webhook-only connector reads.
    pub fn empty() -> Self {
        Page {
            records: Vec::new(),
            next: serde_json::Value::Null,
            done: true,
            requests: 0,
            rate_limited: 0,
            unchanged: 0,
            cache: Vec::new(),
        }
    }
}

/// A verified webhook delivery as stored in the inbox; only `verify_webhook`-checked
/// deliveries become one (see `http::webhooks`).
#[derive(Debug, Clone)]
pub struct WebhookEvent {
    pub connection: ConnectionName,
    /// The source's delivery or event id: the dedupe key.
    pub delivery_id: String,
    pub topic: Option<String>,
    /// Lower-case header names; values of signature and auth headers are not kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received_at: chrono::DateTime<chrono::Utc>,
}

/// What a webhook asks dealsync to do.
#[derive(Debug, Clone)]
pub enum WebhookAction {
    /// The payload carries the whole record.
    Upsert(Box<SourceDeal>),
    /// The record was deleted or archived in the source.
    Delete { external_id: String },
    /// The payload carries only an id: fetch the record through the pull connector.
    Refetch { external_id: String },
    /// An email provider reports a bounce or a complaint (`connectors::delivery`).
    Delivery(Box<crate::store::NewDeliveryEvent>),
    /// The source asks to confirm a subscription (SNS): [`Connector::confirm_subscription`].
    ConfirmSubscription { url: String },
}

/// Reports (or clears, with `None`) what a connection needs from an operator, such
/// as re-authorization; the daemon shows it on `/readyz`.
pub type Attention = Arc<dyn Fn(&str, Option<String>) + Send + Sync>;

/// All a connector may touch during a sync.
#[derive(Clone)]
pub struct SyncContext {
    pub connection: ConnectionName,
    pub shutdown: CancellationToken,
    /// Where vendor request metrics go.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// What the connector may keep in or ask of the store (OAuth connections need the
    /// token store); `None` outside a store's reach (tests, a config check offline).
    pub handles: Option<StoreHandles>,
    pub attention: Option<Attention>,
    /// Caps the attempts per vendor request (`None`: the client's own bound);
    /// `dealsync check --online` tries once, so an unreachable host fails at once.
    pub max_attempts: Option<u32>,
}

impl SyncContext {
    /// A context with fresh metrics, no store handles and no attention callback.
    pub fn new(connection: ConnectionName, shutdown: CancellationToken) -> Self {
        SyncContext {
            connection,
            shutdown,
            metrics: Arc::new(crate::telemetry::Metrics::new()),
            handles: None,
            attention: None,
            max_attempts: None,
        }
    }
}

/// A kind of source, configured for one connection.
#[async_trait]
pub trait Connector: Send + Sync {
    /// The connector's name (`hubspot`, `demo`, …).
    fn kind(&self) -> &str;

    /// The canonical pipeline this source's deals go to unless the config says otherwise.
    fn default_pipeline(&self) -> Option<&str> {
        None
    }

    /// Default stage mappings for the vendor's stock pipelines.
    fn default_mappings(&self) -> Vec<StageMapEntry> {
        Vec::new()
    }

    /// Whether this connector reads by polling (otherwise it only receives webhooks).
    fn polls(&self) -> bool {
        true
    }

    /// Whether it carries deals, and so native stages to map; an email provider's
    /// bounce webhooks carry none.
    fn carries_deals(&self) -> bool {
        true
    }

    /// Whether its deals can carry the owner's email address, which `to = "owner"`
    /// follow-ups are sent to (`dealsync check` warns about a rule that needs it).
    fn gives_owner_email(&self) -> bool {
        false
    }

    /// Whether it can record a sent follow-up on the deal in its source
    /// ([`Connector::write_back`]; a manifest's `[writeback]`).
    fn writes_back(&self) -> bool {
        false
    }

    /// Records the sent follow-up `job` on its deal in the source (a note, an activity,
    /// a task), at most once however often it is called for the same job; the source's
    /// id of the record when it said one.
    async fn write_back(
        &self,
        _cx: &SyncContext,
        _job: &crate::store::WritebackJob,
    ) -> Result<Option<String>, WritebackError> {
        Err(WritebackError::Refused {
            reason: format!("connector {} cannot write back", self.kind()),
        })
    }

    /// Whether [`Connector::fetch_one`] can read a record on its own.
    fn reads_one(&self) -> bool {
        false
    }

    /// The native pipelines and stages of the source.
    async fn discover_pipelines(
        &self,
        _cx: &SyncContext,
    ) -> Result<Vec<NativePipeline>, ConnectorError> {
        Ok(Vec::new())
    }

    /// Checks with one cheap read that the source answers and takes the credentials
    /// (`dealsync check --online`); returns what it saw, for the operator. The default
    /// discovers the native pipelines.
    async fn probe(&self, cx: &SyncContext) -> Result<String, ConnectorError> {
        let pipelines = self.discover_pipelines(cx).await?;
        let stages: usize = pipelines.iter().map(|p| p.stages.len()).sum();
        Ok(format!(
            "{} native pipeline(s), {stages} stage(s)",
            pipelines.len()
        ))
    }

    /// Where a full read (`dealsync sync --full`) starts, given the cursor the last
    /// run stored; `None` reads from the very beginning. A source whose history is
    /// generated from a clock (the demo) keeps that clock, so a full read re-reads the
    /// same story instead of starting a new one.
    fn full_read_cursor(&self, _stored: Option<&serde_json::Value>) -> Option<serde_json::Value> {
        None
    }

    /// Returns one page after `cursor` (`None`: start a full read). The default, for
    /// a webhook-only connector (one whose [`Self::polls`] is false), reads nothing.
    async fn fetch_page(
        &self,
        _cx: &SyncContext,
        _cursor: Option<&serde_json::Value>,
    ) -> Result<Page, ConnectorError> {
        Ok(Page::empty())
    }

    /// How webhooks to this connection are signed; `None`: it takes no webhooks.
    fn webhook_scheme(&self) -> Option<crate::connectors::signature::Scheme> {
        None
    }

    /// The keys a delivery's signature is checked with, when the sender names them
    /// (SNS's signing certificate): fetched here, before the check, and only from an
    /// allowed host. `None`: the connection's configured secrets. An error is the
    /// reason the delivery is refused (401).
    async fn webhook_keys(&self, _body: &[u8]) -> Result<Option<Vec<Vec<u8>>>, String> {
        Ok(None)
    }

    /// Confirms a subscription the source asked for in a verified delivery (SNS's
    /// `SubscribeURL`).
    async fn confirm_subscription(
        &self,
        _cx: &SyncContext,
        url: &str,
    ) -> Result<(), ConnectorError> {
        Err(ConnectorError::BadResponse {
            vendor: self.kind().to_owned(),
            reason: format!("this connector confirms no subscriptions ({url})"),
        })
    }

    /// Turns a verified delivery into actions.
    fn parse_webhook(&self, _event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        Ok(Vec::new())
    }

    /// Fetches one record by id (for webhooks that carry only ids); `None`: the vendor
    /// says it does not exist (deleted). A connector without a single-record read
    /// answers an error, never `None`: "cannot look" must not read as "deleted".
    async fn fetch_one(
        &self,
        _cx: &SyncContext,
        external_id: &str,
    ) -> Result<Option<SourceDeal>, ConnectorError> {
        Err(ConnectorError::BadResponse {
            vendor: self.kind().to_owned(),
            reason: format!("this connector cannot read record {external_id} on its own"),
        })
    }
}

/// The known connectors, as an explicit list.
pub struct Registry;

/// The connectors this build knows: `demo` and the e-commerce connectors in Rust, the
/// others as built-in manifests (`connectors/*.toml`). A config's `[connectors] dir` may
/// add more.
pub const KNOWN: &[&str] = &[
    "demo",
    "hubspot",
    "pipedrive",
    "salesforce",
    "shopify",
    "woocommerce",
    "stripe",
    "webhook",
];

/// The connectors implemented in Rust (the rest come from manifests).
const RUST_CONNECTORS: &[&str] = &[
    "demo",
    "shopify",
    "woocommerce",
    "stripe",
    "webhook",
    "postmark",
    "mailgun",
    "sendgrid",
    "ses",
];

impl Registry {
    /// Loads the manifests in force for a config: built-ins, then `[connectors] dir`.
    pub fn catalog(config: &crate::config::Config) -> Result<manifest::Catalog, ConfigError> {
        manifest::Catalog::load(config.connectors_dir.as_deref())
            .map_err(|problems| ConfigError::invalid(config, problems))
    }

    /// Builds the connector for one connection, or explains what is wrong.
    pub fn build(
        connection: &ConnectionConfig,
        config: &crate::config::Config,
    ) -> Result<Arc<dyn Connector>, ConfigError> {
        let catalog = Self::catalog(config)?;
        Self::build_with(connection, config, &catalog)
    }

    /// Builds the connector for one connection from an already loaded catalog, and checks
    /// its webhook secrets' format against the connector's signing scheme.
    pub fn build_with(
        connection: &ConnectionConfig,
        config: &crate::config::Config,
        catalog: &manifest::Catalog,
    ) -> Result<Arc<dyn Connector>, ConfigError> {
        let connector = Self::build_connector(connection, config, catalog)?;
        if connection.writeback.is_some() && !connector.writes_back() {
            return Err(ConfigError::at(
                config,
                format!("connections.{}.writeback.enabled", connection.name),
                format!(
                    "connector {} cannot write back: its manifest has no [writeback] section (docs/connectors.md says how to declare one)",
                    connector.kind()
                ),
            ));
        }
        if let Some(scheme) = connector.webhook_scheme() {
            // A secret not available here (deferred credential) is checked where it is.
            for secret in connection
                .webhook_secrets
                .iter()
                .filter(|s| s.is_available())
            {
                if let Err(error) = crate::connectors::signature::validate_secret(
                    &scheme,
                    secret.expose().as_bytes(),
                ) {
                    return Err(ConfigError::at(
                        config,
                        format!("connections.{}.webhook_secret", connection.name),
                        error.to_string(),
                    ));
                }
            }
        }
        Ok(connector)
    }

    fn build_connector(
        connection: &ConnectionConfig,
        config: &crate::config::Config,
        catalog: &manifest::Catalog,
    ) -> Result<Arc<dyn Connector>, ConfigError> {
        let base = format!("connections.{}", connection.name);
        let settings_error = |(key, message): (String, String)| {
            ConfigError::at(config, format!("{base}.settings.{key}"), message)
        };
        match connection.connector.as_str() {
            "demo" => demo::DemoConnector::from_config(connection)
                .map(|c| Arc::new(c) as Arc<dyn Connector>)
                .map_err(settings_error),
            "shopify" => shopify::ShopifyConnector::from_config(connection)
                .map(|c| Arc::new(c) as Arc<dyn Connector>)
                .map_err(settings_error),
            "woocommerce" => woocommerce::WooCommerceConnector::from_config(connection)
                .map(|c| Arc::new(c) as Arc<dyn Connector>)
                .map_err(settings_error),
            "stripe" => stripe::StripeConnector::from_config(connection)
                .map(|c| Arc::new(c) as Arc<dyn Connector>)
                .map_err(settings_error),
            "webhook" => generic::GenericConnector::from_config(connection)
                .map(|c| Arc::new(c) as Arc<dyn Connector>)
                .map_err(settings_error),
            name => match (delivery::Provider::parse(name), catalog.get(name)) {
                (Some(provider), _) => {
                    delivery::DeliveryConnector::from_config(provider, connection)
                        .map(|c| Arc::new(c) as Arc<dyn Connector>)
                        .map_err(settings_error)
                }
                (None, Some(found)) => manifest::ManifestConnector::new(found, connection)
                    .map(|c| Arc::new(c) as Arc<dyn Connector>)
                    .map_err(|(key, message)| {
                        ConfigError::at(config, format!("{base}.{key}"), message)
                    }),
                (None, None) => {
                    let mut known: Vec<String> = RUST_CONNECTORS
                        .iter()
                        .map(|name| (*name).to_owned())
                        .collect();
                    known.extend(catalog.names());
                    Err(ConfigError::at(
                        config,
                        format!("{base}.connector"),
                        format!("unknown connector {name:?} (known: {})", known.join(", ")),
                    ))
                }
            },
        }
    }
}
