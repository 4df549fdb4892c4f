//! Tracing setup and the Prometheus metrics.
//!
//! Metric names follow `dealsync_<noun>[_<unit>]_total` for counters; labels are low
//! cardinality (connection, pipeline, stage, route, status), never a deal id or an email.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The level names `--log-level` accepts, alone or after `target=`.
pub const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `--log-level` value: a level (`info`) or comma-separated directives
/// (`info,dealsync=debug`). A bare word that is no level is refused rather than read
/// as a target name, which would silently log everything from nowhere.
pub fn parse_log_filter(text: &str) -> Result<String, String> {
    let known = LOG_LEVELS.join(", ");
    for directive in text.split(',').map(str::trim) {
        if directive.is_empty() {
            return Err(format!("empty directive in {text:?}"));
        }
        let bare = !directive.contains(['=', '[', '{']);
        if bare && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unknown log level {directive:?} (levels: {known}; per target: dealsync=debug)"
            ));
        }
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|error| format!("{directive:?}: {error} (levels: {known})"))?;
    }
    Ok(text.to_owned())
}

/// Installs the global tracing subscriber; logs go to stderr, scrubbed of the values
/// substituted into the config (see [`ScrubbedStderr`]).
pub fn init_tracing(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(ScrubbedStderr);
    let _ = match format {
        LogFormat::Pretty => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_writer(JsonArrays)
            .try_init(),
    };
}

/// The log writer: stderr, with every value substituted into a loaded config replaced
/// by `***` ([`crate::config::interpolate::scrub_process_output`]), so no log line
/// quotes a secret, whichever code path wrote it.
pub struct ScrubbedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedLine;

    fn make_writer(&'a self) -> ScrubbedLine {
        ScrubbedLine
    }
}

/// One log event on its way to stderr.
pub struct ScrubbedLine;

impl std::io::Write for ScrubbedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer formats an event whole and hands it over in one call, so a
        // value is never split across two writes.
        let text = String::from_utf8_lossy(buf);
        let scrubbed = crate::config::interpolate::scrub_process_output(&text);
        std::io::stderr().lock().write_all(scrubbed.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Writes JSON log lines to stderr with list fields as JSON arrays.
///
/// tracing hands a formatter every field value as text (its `valuable` support,
/// which would keep the structure, is unstable), so `connections = ?names` arrives
/// as the string `["demo", "shop"]`. Each line is read back and a field whose text
/// is a JSON array becomes that array; the message and every other field stay as
/// they are. The formatter writes one event per writer, so a writer holds one line.
struct JsonArrays;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for JsonArrays {
    type Writer = JsonLine;

    fn make_writer(&'a self) -> JsonLine {
        JsonLine(Vec::new())
    }
}

struct JsonLine(Vec<u8>);

impl std::io::Write for JsonLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for JsonLine {
    fn drop(&mut self) {
        use std::io::Write;
        if !self.0.is_empty() {
            let line = json_arrays(&self.0);
            let text = String::from_utf8_lossy(&line);
            // Scrubbed like every other log line (see `ScrubbedStderr`).
            let scrubbed = crate::config::interpolate::scrub_process_output(&text);
            let _ = std::io::stderr().write_all(scrubbed.as_bytes());
        }
    }
}

/// Returns the log line with its array-valued text fields as arrays (see
/// `JsonArrays`); the fields keep their order and every other value its text.
fn json_arrays(line: &[u8]) -> Vec<u8> {
    use serde_json::value::RawValue;
    let Ok(Fields(fields)) = serde_json::from_slice::<Fields>(line) else {
        return line.to_vec();
    };
    let mut out = Vec::with_capacity(line.len() + 8);
    out.push(b'{');
    for (at, (key, raw)) in fields.iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            serde_json::to_string(key)
                .expect("a string serializes")
                .as_bytes(),
        );
        out.push(b':');
        let lifted = (!matches!(key.as_str(), "message" | "timestamp" | "level" | "target"))
            .then(|| serde_json::from_str::<String>(raw.get()).ok())
            .flatten()
            .filter(|text| text.starts_with('['))
            .and_then(|text| serde_json::from_str::<Box<RawValue>>(&text).ok())
            .filter(|array| array.get().starts_with('['));
        out.extend_from_slice(lifted.as_ref().unwrap_or(raw).get().as_bytes());
    }
    out.extend_from_slice(b"}\n");
    out
}

/// A JSON object's fields in the order written, each value as its JSON text.
struct Fields(Vec<(String, Box<serde_json::value::RawValue>)>);

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Fields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Returns an error and its causes as one line, `what failed: why: deeper cause`.
///
/// A cause whose text the line already holds is left out: many errors quote their
/// source in their own message (`binding 127.0.0.1:8080: Address already in use`)
/// and also return it from `source()`, which would otherwise print it twice.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
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

/// Labels of the per-status request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub connection: String,
    /// The HTTP status, or `error` for a request that got no answer.
    pub status: String,
}

/// Vendor-side metrics (kept by `vendor_http` and OAuth), registered on [`Metrics`].
#[derive(Default)]
pub struct VendorMetrics {
    pub requests: Family<StatusLabels, Counter>,
    pub retries: Family<ConnectionLabels, Counter>,
    pub rate_limited: Family<ConnectionLabels, Counter>,
    pub budget_remaining: Family<ConnectionLabels, Gauge>,
    pub budget_pauses: Family<ConnectionLabels, Counter>,
    pub budget_pace: Family<ConnectionLabels, Gauge<f64, AtomicU64>>,
    pub token_expiry: Family<ConnectionLabels, Gauge<f64, AtomicU64>>,
    pub needs_reauth: Family<ConnectionLabels, Gauge>,
}

impl VendorMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "vendor_requests",
            "Requests to vendor APIs by connection and HTTP status",
            self.requests.clone(),
        );
        registry.register(
            "vendor_retries",
            "Vendor requests retried after a 429, a 5xx, a timeout or a reset",
            self.retries.clone(),
        );
        registry.register(
            "vendor_rate_limited",
            "Vendor answers of 429 Too Many Requests",
            self.rate_limited.clone(),
        );
        registry.register(
            "vendor_budget_remaining",
            "Requests left in the vendor's daily budget, as its headers last said",
            self.budget_remaining.clone(),
        );
        registry.register(
            "vendor_budget_pauses",
            "Times a connection paused because its share of the vendor budget was spent",
            self.budget_pauses.clone(),
        );
        registry.register(
            "vendor_budget_pace_seconds",
            "Spacing between requests while the vendor budget runs low (0: not slowed down)",
            self.budget_pace.clone(),
        );
        registry.register(
            "oauth_token_expiry_timestamp_seconds",
            "Unix time at which the connection's OAuth access token expires",
            self.token_expiry.clone(),
        );
        registry.register(
            "oauth_needs_reauthorization",
            "1 when the connection's refresh token was revoked: run `dealsync auth`",
            self.needs_reauth.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub connection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub connection: String,
    pub pipeline: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub connection: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub connection: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// "main" (`server.listen`) or "metrics" (`server.metrics_listen`).
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ValueLabels {
    pub connection: String,
    pub pipeline: String,
    pub stage: String,
    pub currency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionStateLabels {
    pub connection: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EmailLabels {
    pub rule: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliverabilityLabels {
    /// A rule, or `all`.
    pub rule: String,
    /// `1d` or `7d`.
    pub window: String,
    /// sent, delivered, bounced_permanent, bounced_transient, blocked, complained
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLabels {
    pub rule: String,
    pub window: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FollowupLabels {
    pub rule: String,
    /// sent, retried, failed, skipped, deferred, expired, dry_run
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// `poll:CONNECTION` or `leader:DUTY`
    pub lease: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// inbox, outbox, digests
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// transient, permanent, unknown, other
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Clears `family` and sets one gauge per row, so a label set that has no row now
/// disappears instead of lingering with its last value.
pub fn rebuild_gauges<L>(family: &Family<L, Gauge>, rows: impl IntoIterator<Item = (L, i64)>)
where
    L: Clone + std::hash::Hash + Eq,
{
    family.clear();
    for (labels, value) in rows {
        family.get_or_create(&labels).set(value);
    }
}

/// Every metric dealsync exports.
pub struct Metrics {
    /// Registered families; encoding takes the lock only to render.
    registry: Mutex<Registry>,
    pub deals: Family<StageLabels, Gauge>,
    pub unmapped_deals: Family<ConnectionLabels, Gauge>,
    pub sync_runs: Family<RunLabels, Counter>,
    pub sync_errors: Family<ConnectionLabels, Counter>,
    pub records: Family<RecordLabels, Counter>,
    pub last_success: Family<ConnectionLabels, Gauge<f64, AtomicU64>>,
    pub http_requests: Family<HttpLabels, Counter>,
    /// Connections being served, per listener.
    pub http_connections: Family<ListenerLabels, Gauge>,
    /// Connections answered 503 (or closed) because `server.max_connections` were open.
    pub http_connections_refused: Family<ListenerLabels, Counter>,
    /// Failed `accept` calls (e.g. out of file descriptors), each followed by a back-off.
    pub http_accept_errors: Family<ListenerLabels, Counter>,
    /// Requests whose handler panicked (answered 500).
    pub http_handler_panics: Counter,
    pub config_reloads: Family<RunLabels, Counter>,
    /// Σ amount of live deals in minor units, per stage and currency (refreshed at scrape).
    pub deal_value: Family<ValueLabels, Gauge>,
    /// Open deals past their stage's stall threshold (refreshed at scrape).
    pub stalled_deals: Family<StageLabels, Gauge>,
    /// Outbox rows per follow-up rule and state (refreshed at scrape).
    pub outbox_emails: Family<EmailLabels, Gauge>,
    /// CRM write-backs per connection and state (refreshed at scrape).
    pub writebacks: Family<ConnectionStateLabels, Gauge>,
    /// Write-back attempts by connection and outcome (done, retried, failed).
    pub writeback_attempts: Family<RecordLabels, Counter>,
    /// Reputation figures (refreshed at scrape time): emails by rule, window and outcome,
    /// the complaint rate, and the marketing rules paused for it.
    pub deliverability_emails: Family<DeliverabilityLabels, Gauge>,
    pub complaint_rate: Family<RateLabels, Gauge<f64, AtomicU64>>,
    pub rules_paused: Family<EmailLabels, Gauge>,
    /// Vendor API requests, retries, 429s, budget and OAuth token state.
    pub vendor: VendorMetrics,
    /// Webhook deliveries by connection and outcome (accepted, duplicate, ignored,
    /// ping, unauthorized, too_large, malformed, failed).
    pub webhooks: Family<RecordLabels, Counter>,
    pub followups: Family<FollowupLabels, Counter>,
    /// Emails and digests the SMTP server (or the file transport) did not take, by kind.
    pub email_failures: Family<KindLabels, Counter>,
    /// Replicas on PostgreSQL: 1 while this replica holds the lease, else 0.
    pub leases_held: Family<LeaseLabels, Gauge>,
    /// Rows this process claimed from a work queue (on PostgreSQL each row is claimed
    /// by one replica; the sum over replicas is the work done).
    pub claims: Family<QueueLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts `rows` claimed from work queue `queue`.
    pub fn claimed(&self, queue: &str, rows: usize) {
        if rows > 0 {
            self.claims
                .get_or_create(&QueueLabels {
                    queue: queue.to_owned(),
                })
                .inc_by(rows as u64);
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dealsync");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("build_info", "dealsync build information", build);

        let metrics = Metrics {
            deals: Family::default(),
            unmapped_deals: Family::default(),
            sync_runs: Family::default(),
            sync_errors: Family::default(),
            records: Family::default(),
            last_success: Family::default(),
            http_requests: Family::default(),
            http_connections: Family::default(),
            http_connections_refused: Family::default(),
            http_accept_errors: Family::default(),
            http_handler_panics: Counter::default(),
            config_reloads: Family::default(),
            deal_value: Family::default(),
            stalled_deals: Family::default(),
            outbox_emails: Family::default(),
            writebacks: Family::default(),
            writeback_attempts: Family::default(),
            deliverability_emails: Family::default(),
            complaint_rate: Family::default(),
            rules_paused: Family::default(),
            vendor: VendorMetrics::default(),
            webhooks: Family::default(),
            followups: Family::default(),
            email_failures: Family::default(),
            leases_held: Family::default(),
            claims: Family::default(),
            registry: Mutex::new(Registry::default()),
        };
        registry.register(
            "deals",
            "Live deals by connection, canonical pipeline and stage",
            metrics.deals.clone(),
        );
        registry.register(
            "leases_held",
            "Leases this replica holds (poll:CONNECTION, leader:DUTY); PostgreSQL only",
            metrics.leases_held.clone(),
        );
        registry.register(
            "claims",
            "Rows this process claimed from each work queue (inbox, outbox, digests, writebacks)",
            metrics.claims.clone(),
        );
        registry.register(
            "unmapped_deals",
            "Deals whose native stage has no canonical mapping",
            metrics.unmapped_deals.clone(),
        );
        registry.register(
            "sync_runs",
            "Sync runs by connection and outcome",
            metrics.sync_runs.clone(),
        );
        registry.register(
            "sync_errors",
            "Failed sync runs by connection",
            metrics.sync_errors.clone(),
        );
        registry.register(
            "records",
            "Records read by sync, by outcome (created, updated, unchanged, stale, quarantined)",
            metrics.records.clone(),
        );
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of each connection's last successful sync",
            metrics.last_success.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            metrics.http_requests.clone(),
        );
        registry.register(
            "http_connections",
            "HTTP connections being served, by listener",
            metrics.http_connections.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections refused with 503 because server.max_connections were open, by listener",
            metrics.http_connections_refused.clone(),
        );
        registry.register(
            "http_accept_errors",
            "Failed accepts of HTTP connections (e.g. no file descriptor left), by listener",
            metrics.http_accept_errors.clone(),
        );
        registry.register(
            "http_handler_panics",
            "HTTP requests whose handler panicked; each was answered 500",
            metrics.http_handler_panics.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by outcome",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "deal_value_minor",
            "Summed amount of live deals in minor units of the currency, by connection, pipeline, stage and currency",
            metrics.deal_value.clone(),
        );
        registry.register(
            "stalled_deals",
            "Open deals that sat in their stage longer than its stall threshold",
            metrics.stalled_deals.clone(),
        );
        registry.register(
            "outbox_emails",
            "Follow-up emails in the outbox by rule and state",
            metrics.outbox_emails.clone(),
        );
        registry.register(
            "writebacks",
            "Sent follow-ups to record in their deal's CRM, by connection and state (pending, claimed, done, failed)",
            metrics.writebacks.clone(),
        );
        registry.register(
            "writeback_attempts",
            "Write-back attempts by connection and outcome (done, retried, failed)",
            metrics.writeback_attempts.clone(),
        );
        registry.register(
            "deliverability_emails",
            "Follow-up emails sent, bounced, blocked and complained about, by rule (or all) over the last 1d and 7d",
            metrics.deliverability_emails.clone(),
        );
        registry.register(
            "deliverability_complaint_rate",
            "Complaints per email sent, by rule (or all) over the last 1d and 7d",
            metrics.complaint_rate.clone(),
        );
        registry.register(
            "followup_rule_paused",
            "1 for each marketing rule paused for its complaint rate (state = paused)",
            metrics.rules_paused.clone(),
        );
        metrics.vendor.register(&mut registry);
        registry.register(
            "webhooks",
            "Webhook deliveries by connection and outcome",
            metrics.webhooks.clone(),
        );
        registry.register(
            "followups",
            "Follow-up outbox rows handled, by rule and outcome",
            metrics.followups.clone(),
        );
        registry.register(
            "email_delivery_failures",
            "Emails and digests not delivered, by kind: transient (4xx, no connection), permanent (5xx), unknown (connection lost after the hand-off), other",
            metrics.email_failures.clone(),
        );
        *metrics.registry.lock().expect("fresh mutex") = registry;
        metrics
    }

    /// Registers a metric owned by another module.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    /// Renders the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }

    pub fn connection(name: &str) -> ConnectionLabels {
        ConnectionLabels {
            connection: name.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_take_levels_and_directives_and_refuse_other_words() {
        for good in [
            "info",
            "DEBUG",
            "off",
            "info,dealsync=debug",
            "dealsync::sync=trace",
        ] {
            assert!(parse_log_filter(good).is_ok(), "{good}");
        }
        for bad in ["verbose", "info,loud", "dealsync=verbose", ""] {
            let error = parse_log_filter(bad).unwrap_err();
            assert!(!error.is_empty(), "{bad}");
        }
        assert!(
            parse_log_filter("verbose")
                .unwrap_err()
                .contains("trace, debug, info")
        );
    }

    #[test]
    fn list_fields_become_json_arrays_in_place_and_other_text_stays_text() {
        let line = br#"{"timestamp":"t","level":"INFO","message":"[\"not\", \"lifted\"]","connections":"[\"demo\", \"shop\"]","reason":"[x] broken","count":3,"target":"dealsync::app"}"#;
        let out = String::from_utf8(json_arrays(line)).unwrap();
        assert_eq!(
            out,
            "{\"timestamp\":\"t\",\"level\":\"INFO\",\"message\":\"[\\\"not\\\", \\\"lifted\\\"]\",\"connections\":[\"demo\", \"shop\"],\"reason\":\"[x] broken\",\"count\":3,\"target\":\"dealsync::app\"}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["connections"], serde_json::json!(["demo", "shop"]));
        assert_eq!(json_arrays(b"not json\n"), b"not json\n");
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("binding 127.0.0.1:80: {source}")]
        struct Bind {
            source: std::io::Error,
        }
        let error = Bind {
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use"),
        };
        assert_eq!(
            error_chain(&error),
            "binding 127.0.0.1:80: Address already in use"
        );
    }
}
