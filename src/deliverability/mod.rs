//! Deliverability: bounces and complaints that arrive after the hand-off, read from a
//! relay's bounce emails (`report`: delivery status notifications and complaint
//! feedback reports) and recorded through `Store::record_delivery_events`, which
//! applies what they do (suppression, stopping marketing) in the same transaction.
//!
//! Two ways in share [`ingest_report`]: `POST /bounces` (a relay pipes each bounce
//! email there, authenticated by `deliverability.intake_token`; answered only after the
//! commit) and `dealsync bounces ingest FILE…` (a Maildir, an mbox file or one message).

pub mod report;

use crate::config::Config;
use crate::store::{DeliveryOutcome, DeliveryPolicy, Store, StoreError};
use chrono::{DateTime, Utc};
use std::path::{Path, PathBuf};

pub use report::ReportError;

/// What events do, from the config: the soft-bounce limit and window, and the marketing
/// rules a complaint stops.
pub fn policy(config: &Config) -> DeliveryPolicy {
    policy_of(&config.deliverability, &config.followups)
}

/// [`policy`] from its parts.
pub fn policy_of(
    deliverability: &crate::config::DeliverabilityConfig,
    rules: &[crate::config::followups::Rule],
) -> DeliveryPolicy {
    let marketing_rules = rules
        .iter()
        .filter(|rule| rule.kind == crate::config::followups::RuleKind::Marketing)
        .map(|rule| rule.name.clone())
        .collect();
    DeliveryPolicy {
        transient_limit: deliverability.transient_bounce_limit,
        transient_window: deliverability.transient_bounce_window,
        marketing_rules,
        pause_above: deliverability.complaint_rate_pause,
        pause_min_sent: deliverability.complaint_pause_min_sent,
    }
}

/// The columns of [`figures_row`].
pub const FIGURES_COLUMNS: [&str; 9] = [
    "rule",
    "window",
    "sent",
    "delivered",
    "bounced permanent",
    "bounced transient",
    "blocked",
    "complained",
    "complaint rate",
];

/// One line of reputation figures as table cells (the CLI, the status page).
pub fn figures_row(line: &crate::store::DeliveryFigures) -> [String; 9] {
    [
        line.rule.clone().unwrap_or_else(|| "(all)".to_owned()),
        line.window.to_owned(),
        line.sent.to_string(),
        line.delivered.to_string(),
        line.bounced_permanent.to_string(),
        line.bounced_transient.to_string(),
        line.blocked.to_string(),
        line.complained.to_string(),
        line.complaint_rate
            .map_or_else(|| "-".to_owned(), |rate| format!("{:.2} %", 100.0 * rate)),
    ]
}

/// Why a bounce email was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The message is not a report dealsync reads; nothing was recorded.
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("recording the bounce: {0}")]
    Store(#[from] StoreError),
}

/// Reads one bounce email and records what it reports, from `source` (`dsn` or
/// the path it was read from); the outcome of each event.
pub async fn ingest_report(
    store: &Store,
    config: &Config,
    raw: &[u8],
    now: DateTime<Utc>,
) -> Result<Vec<DeliveryOutcome>, IngestError> {
    let bounce_address = config
        .deliverability
        .return_path
        .as_ref()
        .map(|address| address.as_str());
    let events = report::read(raw, bounce_address, "dsn", now)?;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    Ok(store
        .record_delivery_events(events, policy(config), now)
        .await?)
}

/// One message read from a mailbox file, with where it came from.
#[derive(Debug)]
pub struct MailboxMessage {
    /// `path` or `path#N` (the Nth message of an mbox).
    pub origin: String,
    pub raw: Vec<u8>,
}

/// Why a mailbox could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", .path.display())]
pub struct MailboxError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Reads the messages of `path`: a Maildir (a directory with `cur` and `new`), an mbox
/// file (starting with a `From ` line) or one message (an `.eml` file).
pub fn read_mailbox(path: &Path) -> Result<Vec<MailboxMessage>, MailboxError> {
    let fail = |source| MailboxError {
        path: path.to_owned(),
        source,
    };
    if path.is_dir() {
        let mut messages = Vec::new();
        for message in mail_parser::mailbox::maildir::MessageIterator::new(path).map_err(fail)? {
            let message = message.map_err(fail)?;
            messages.push(MailboxMessage {
                origin: message.path().display().to_string(),
                raw: message.unwrap_contents(),
            });
        }
        messages.sort_by(|a, b| a.origin.cmp(&b.origin));
        return Ok(messages);
    }
    let bytes = std::fs::read(path).map_err(fail)?;
    if !bytes.starts_with(b"From ") {
        return Ok(vec![MailboxMessage {
            origin: path.display().to_string(),
            raw: bytes,
        }]);
    }
    let mut messages = Vec::new();
    for (index, message) in
        mail_parser::mailbox::mbox::MessageIterator::new(std::io::Cursor::new(bytes)).enumerate()
    {
        let message = message.map_err(fail)?;
        messages.push(MailboxMessage {
            origin: format!("{}#{}", path.display(), index + 1),
            raw: message.unwrap_contents(),
        });
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{parse_in, problem_keys};
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn the_deliverability_keys_have_defaults_and_each_bad_value_is_named() {
        let config = parse_in(Path::new(""), "").unwrap();
        let defaults = &config.deliverability;
        assert_eq!(defaults.return_path, None);
        assert_eq!(defaults.transient_bounce_limit, 3);
        assert_eq!(
            defaults.transient_bounce_window,
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(defaults.complaint_rate_pause, 0.003);
        assert_eq!(defaults.complaint_pause_min_sent, 100);
        assert!(defaults.intake_token.is_none());

        let config = parse_in(
            Path::new(""),
            "[deliverability]\nreturn_path = \"Bounces@Shop.example\"\ncomplaint_rate_pause = \"1.5%\"\ntransient_bounce_window = \"2d\"\n",
        )
        .unwrap();
        let set = &config.deliverability;
        assert_eq!(
            set.return_path.as_ref().map(|a| a.as_str()),
            Some("Bounces@shop.example")
        );
        assert_eq!(set.complaint_rate_pause, 0.015);
        assert_eq!(set.transient_bounce_window, Duration::from_secs(2 * 86_400));

        let error = parse_in(
            Path::new(""),
            "[deliverability]\nreturn_path = \"bounces+x@shop.example\"\ntransient_bounce_limit = 0\ncomplaint_rate_pause = \"0.3\"\nintake_token = \"short\"\n",
        )
        .unwrap_err();
        assert_eq!(
            problem_keys(&error),
            [
                "deliverability.return_path",
                "deliverability.transient_bounce_limit",
                "deliverability.complaint_rate_pause",
                "deliverability.intake_token",
            ]
        );
        let error = parse_in(Path::new(""), "[deliverability]\nbounce_limit = 2\n").unwrap_err();
        assert!(error.to_string().contains("bounce_limit"), "{error}");
    }
}
