//! The config file's serde shapes, mirrored one to one. Unknown keys are errors.
//! Validation into [`super::Config`] happens in `mod.rs`; defaults live there too.

use super::duration::ConfigDuration;
use super::secret::{Secret, Secrets};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub connectors: RawConnectors,
    /// Canonical pipelines; when none is given, `sales` and `ecommerce` apply.
    #[serde(default)]
    pub pipelines: BTreeMap<String, RawPipeline>,
    #[serde(default)]
    pub connections: BTreeMap<String, RawConnection>,
    #[serde(default)]
    pub email: RawEmail,
    /// Follow-up rules, one `[followups.NAME]` table each.
    #[serde(default)]
    pub followups: BTreeMap<String, RawFollowup>,
    /// Bounces and complaints: the return path, when repeated soft bounces suppress.
    #[serde(default)]
    pub deliverability: RawDeliverability,
}

/// `[deliverability]`: how bounces and complaints that arrive after the hand-off are
/// tied to the outbox and what they do.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDeliverability {
    /// The bounce address, e.g. "bounces@shop.example": each follow-up is sent with the
    /// envelope sender `bounces+<outbox id>-<local>=<domain>@shop.example` (VERP), so a
    /// delivery status notification names the email it answers. Unset: `email.from`.
    pub return_path: Option<String>,
    /// Transient bounces (a full mailbox, 4.x.x) of one address within
    /// `transient_bounce_window` that suppress it; default 3.
    pub transient_bounce_limit: Option<u32>,
    /// The window `transient_bounce_limit` counts in; default "7d".
    pub transient_bounce_window: Option<ConfigDuration>,
    /// A marketing rule whose complaints over the last 7 days pass this share of the
    /// emails it sent in them pauses itself until `dealsync deliverability resume RULE`;
    /// default "0.3%".
    pub complaint_rate_pause: Option<String>,
    /// The emails a rule must have sent in those 7 days before it can pause; default 100.
    pub complaint_pause_min_sent: Option<u32>,
    /// Bearer token of `POST /bounces` (a relay's pipe posts bounce emails there); at
    /// least 16 characters. Unset: the endpoint answers 404.
    pub intake_token: Option<Secret>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// SQLite database file; relative paths are relative to the working directory.
    pub path: Option<PathBuf>,
    /// A PostgreSQL database instead, `postgres://user:password@host:5432/database`
    /// (the password through `${credential:NAME}`); not together with `path`.
    pub url: Option<Secret>,
    /// With `url`: how long after a replica stops renewing its leases (it died, or lost
    /// the database) another replica takes its connections' polling and leader duties.
    pub failover_after: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address of the one HTTP listener, e.g. "127.0.0.1:8080".
    pub listen: Option<String>,
    /// Largest accepted webhook body.
    pub max_body_bytes: Option<usize>,
    /// The URL at which users reach this server (unsubscribe links).
    pub public_url: Option<String>,
    /// How long a graceful shutdown may take before tasks are aborted.
    pub shutdown_timeout: Option<ConfigDuration>,
    /// Bearer token of the read API under /api/v1; without one the API is off (404).
    pub api_token: Option<Secret>,
    /// Serve the status page at `/` (default true).
    pub status_page: Option<bool>,
    /// Who must present `api_token` to see the status page: "always" (default) or
    /// "local" (requests straight to a loopback listener need none).
    pub status_page_auth: Option<String>,
    /// Whether `/metrics` needs `api_token`: "token" (default) or "none".
    pub metrics_auth: Option<String>,
    /// A second listener for `/metrics` alone, e.g. "127.0.0.1:9464"; the main one then
    /// serves no `/metrics`.
    pub metrics_listen: Option<String>,
    /// How long a new connection may take to send its first request header.
    pub header_read_timeout: Option<ConfigDuration>,
    /// How long a request may take, from its header to the response: its body must
    /// arrive within it (408 otherwise).
    pub body_read_timeout: Option<ConfigDuration>,
    /// How long a keep-alive connection may wait for (and send) its next request header.
    pub idle_timeout: Option<ConfigDuration>,
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConnectors {
    /// A directory of `*.toml` connector manifests that add to or override the built-ins.
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub label: Option<String>,
    pub stages: Vec<RawStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    pub key: String,
    pub label: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Win probability in percent.
    pub probability: i64,
    pub stall_after: Option<ConfigDuration>,
    pub kind: crate::pipeline::StageKind,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnection {
    /// Which connector: hubspot, pipedrive, salesforce, shopify, woocommerce, stripe, webhook, demo, or a manifest's name.
    pub connector: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Overrides the vendor's API host (tests, proxies, sandboxes).
    pub base_url: Option<String>,
    /// Bearer token, private-app token or API token.
    pub token: Option<Secret>,
    /// Basic-auth user (WooCommerce consumer key, …).
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub oauth: Option<RawOAuth>,
    /// One webhook secret, or a list while rotating.
    pub webhook_secret: Option<Secrets>,
    pub poll_interval: Option<ConfigDuration>,
    /// Carts idle longer than this without an order become abandoned.
    pub abandon_after: Option<ConfigDuration>,
    /// Carts still abandoned or in follow-ups after this long are closed as expired
    /// (a safety net behind the follow-up rules).
    pub expire_after: Option<ConfigDuration>,
    /// The canonical pipeline this connection's deals go to.
    pub pipeline: Option<String>,
    /// native pipeline → native stage → canonical stage ("stage" or "pipeline.stage").
    #[serde(default)]
    pub stage_map: BTreeMap<String, BTreeMap<String, String>>,
    pub rate_limit: Option<RawRateLimit>,
    pub page_size: Option<u32>,
    /// How far each incremental read reaches back before the cursor.
    pub lookback: Option<ConfigDuration>,
    /// The largest vendor answer read, in bytes (default 64 MiB); a larger one fails
    /// its request.
    pub max_response_bytes: Option<u64>,
    /// Connector-specific settings, checked by the connector.
    #[serde(default)]
    pub settings: toml::Table,
    /// Recording sent follow-ups on the deal in its CRM (off unless `enabled = true`).
    pub writeback: Option<RawWriteback>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWriteback {
    /// Records each sent follow-up email (and owner alert) on the deal in its CRM, as the
    /// connector's manifest declares (`[writeback]`); default false.
    #[serde(default)]
    pub enabled: bool,
    /// Attempts before a write-back is marked failed (default 8).
    pub max_attempts: Option<u32>,
    /// The wait before the first retry, doubling up to 1h (default "1m").
    pub retry_delay: Option<ConfigDuration>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// A refresh token to start from, instead of running `dealsync auth`.
    pub refresh_token: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    /// Share of the vendor's remaining daily budget this connection may use, 0–1.
    pub budget_share: Option<f64>,
    pub max_concurrency: Option<u32>,
    /// At most `window_requests` requests in any rolling `window` (a vendor's burst
    /// policy, e.g. HubSpot's 190 per 10 s).
    pub window_requests: Option<u32>,
    pub window: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEmail {
    /// "file" (writes .eml files) or "smtp".
    pub transport: Option<String>,
    /// smtp://host:port (plain, local relays), smtp://host:port?tls=required (STARTTLS), smtps://host:port (implicit TLS); may hold credentials.
    pub url: Option<Secret>,
    /// Directory for the file transport.
    pub dir: Option<PathBuf>,
    /// "Name <address>".
    pub from: Option<String>,
    /// Directory of the email templates; relative paths are relative to the config file.
    pub templates: Option<PathBuf>,
    /// Signs unsubscribe links; required when a marketing rule exists.
    pub unsubscribe_secret: Option<Secret>,
    /// The mailto: address of `List-Unsubscribe`; default: the from address.
    pub unsubscribe_mailto: Option<String>,
    /// Render and record every email, send none.
    pub dry_run: Option<bool>,
    /// The SMTP provider's limit, in messages per second; none means unlimited.
    pub max_per_second: Option<u32>,
    /// How many SMTP connections the pool keeps (and how many sends run at once).
    pub pool_size: Option<u32>,
    /// Per-recipient cap across rules: at most this many emails in any 24 hours.
    pub max_per_recipient_per_day: Option<u32>,
    /// Hours when nothing is sent to contacts, e.g. "21:00-09:00"; due emails wait.
    pub quiet_hours: Option<String>,
    /// The shop's time zone for quiet hours, e.g. "Europe/Berlin"; default UTC.
    pub time_zone: Option<String>,
    /// JSON pointers into a deal's source record where a recipient's IANA time zone may
    /// be, tried in order, e.g. ["/customer/time_zone"]; quiet hours then use it.
    pub recipient_time_zone: Option<Vec<String>>,
    /// A step overdue by more than this (after downtime) is skipped, not sent late.
    pub late_grace: Option<ConfigDuration>,
    /// How often new stage entries are enrolled into rules.
    pub enroll_interval: Option<ConfigDuration>,
    /// Attempts for transient SMTP failures before a row is marked failed.
    pub max_attempts: Option<u32>,
    /// First retry delay after a transient failure; doubles up to `retry_max`.
    pub retry_initial: Option<ConfigDuration>,
    pub retry_max: Option<ConfigDuration>,
    /// SMTP command timeout.
    pub timeout: Option<ConfigDuration>,
}

/// One follow-up rule: when a deal sits in a stage, send an email or a sequence.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFollowup {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// "pipeline.stage", or a list of them; entering it starts the rule's clock. A
    /// weekly review (`review`) has none.
    #[serde(default)]
    pub stage: RawStages,
    /// "marketing" (consent and unsubscribe required) or "transactional".
    pub kind: String,
    /// "contact", "owner", or a fixed email address.
    #[serde(default = "contact")]
    pub to: String,
    /// One email: its template, sent `after` in the stage (default: the stage's stall_after).
    pub template: Option<String>,
    pub after: Option<ConfigDuration>,
    /// One email: the stage the deal moves to once it is sent ("pipeline.stage"), e.g.
    /// "sales.post_sale" for the post-sale email. A sequence sets `move_to` per step.
    pub move_to: Option<String>,
    /// A sequence instead of one email; each step's `after` counts from entering the stage.
    pub steps: Option<Vec<RawStep>>,
    /// After the last step, move the deal to `expire_to` if it is still waiting.
    pub expire_after: Option<ConfigDuration>,
    pub expire_to: Option<String>,
    /// A recipient who went through this rule is not enrolled again for this long.
    pub cooldown: Option<ConfigDuration>,
    /// Stop when an order from the same customer arrives (default: on for `ecommerce`).
    pub stop_on_purchase: Option<bool>,
    /// Skip a person who has an open deal in one of these stages ("pipeline.stage") in
    /// any connection, e.g. no cart email while they negotiate a deal.
    pub skip_if_open_in: Option<Vec<String>>,
    /// A step (or digest) overdue by more than this after downtime is skipped; default `email.late_grace`.
    pub late_grace: Option<ConfigDuration>,
    /// Makes the rule a digest: one email per recipient per day at this local time
    /// ("08:00"), or per week on that day ("monday 08:00").
    pub digest: Option<String>,
    /// Makes the rule a weekly pipeline review to the fixed address `to`, at this local
    /// day and time ("monday 08:00").
    pub review: Option<String>,
    /// The digest's time zone, e.g. "Europe/Berlin"; default `email.time_zone`.
    pub time_zone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub after: Option<ConfigDuration>,
    pub template: String,
    /// A discount code handed to the template as `discount_code`.
    pub discount_code: Option<String>,
    /// The stage the deal moves to once this step is sent ("pipeline.stage").
    pub move_to: Option<String>,
}

/// One stage or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawStages {
    One(String),
    Many(Vec<String>),
}

impl Default for RawStages {
    fn default() -> Self {
        RawStages::Many(Vec::new())
    }
}

fn contact() -> String {
    "contact".to_owned()
}
