//! Follow-ups: rules, the due-time scheduler and outbox worker, templates, delivery.
//!
//! What it owns: deciding which deals enter which rule (enrollment), when each step
//! is due, whether it may still go out (re-checked at send time against the store),
//! rendering, and handing the message to SMTP or the file transport exactly once.
//! The outbox and suppression tables are its ledger; their SQL lives in `store`.
//!
//! Invariants:
//! - Every (deal, rule, step) is one outbox row; an email leaves at most once, even
//!   across a crash (see `store::outbox`).
//! - Just before a send, the deal is re-read: a cart that was bought (from any
//!   connection), a deal that moved on, an unsubscribed or bounced address, or a
//!   marketing email without recorded consent stops the sequence. Before a marketing
//!   email to a CRM contact the deal is first read again from its source
//!   ([`SourceReader`]), so consent withdrawn there since is seen.
//! - Template errors are config errors: found at load and by `dealsync check`.

pub mod digest;
pub mod explain;
pub mod mailer;
pub mod policy;
pub mod review;
pub mod rules;
pub mod templates;
pub mod unsubscribe;
pub mod worker;

use crate::config::Config;
use tokio_util::sync::CancellationToken;

/// Reads a deal again from its source and stores what it finds, just before a
/// marketing email to its contact: consent withdrawn in a CRM (a HubSpot contact
/// unsubscribing, a Pipedrive person's `marketing_status`) does not touch the deal
/// record, so only a fresh read sees it before the next step goes out.
#[async_trait::async_trait]
pub trait SourceReader: Send + Sync {
    /// `Ok(true)`: read and stored (or found deleted); `Ok(false)`: this deal's
    /// connection cannot read one record (a webhook-only shop, whose webhooks keep the
    /// deal current). `Err`: the source could not be read; the reason says why.
    async fn reread(
        &self,
        connection: &str,
        external_id: &str,
        shutdown: &CancellationToken,
    ) -> Result<bool, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum FollowupError {
    #[error(transparent)]
    Template(#[from] templates::TemplateError),
    #[error(transparent)]
    Mail(#[from] mailer::MailError),
    #[error("rule {rule} has no step {step}")]
    NoSuchStep {
        rule: String,
        step: crate::domain::StepNumber,
    },
    #[error("rule {rule}: the outbox row has no usable recipient address")]
    NoRecipient { rule: String },
    #[error("unsubscribe link: {0}")]
    Unsubscribe(String),
}

/// Loads the templates and renders each rule's steps against a sample cart, and
/// builds the transport: every problem `dealsync check` and start-up must report.
pub fn preflight(config: &Config) -> Vec<String> {
    if config.followups.is_empty() && config.digests.is_empty() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    match templates::Templates::for_config(config) {
        Ok(loaded) => {
            problems.extend(loaded.check(&config.followups));
            problems.extend(digest::check(&loaded, &config.digests, &config.pipelines));
        }
        Err(error) => problems.push(error.to_string()),
    }
    // An SMTP URL that is a credential not available here is checked where it is.
    let url_available = match &config.email.transport {
        crate::config::EmailTransport::Smtp { url } => url.is_available(),
        crate::config::EmailTransport::File { .. } => true,
    };
    if url_available && let Err(error) = mailer::Mailer::new(&config.email) {
        problems.push(error.to_string());
    }
    problems
}
