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
//!   marketing email without recorded consent stops the sequence.
//! - Template errors are config errors: found at load and by `dealsync check`.

pub mod digest;
pub mod explain;
pub mod mailer;
pub mod policy;
pub mod rules;
pub mod templates;
pub mod unsubscribe;
pub mod worker;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum FollowupError {
    #[error(transparent)]
    Template(#[from] templates::TemplateError),
    #[error(transparent)]
    Mail(#[from] mailer::MailError),
    #[error("rule {rule} has no step {step}")]
    NoSuchStep { rule: String, step: usize },
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
