//! Operator commands: `deals show` and the recovery commands (`inbox dead-letters`,
//! `quarantine`, `outbox retry`, `suppressions`). clap types live in `cli`; each
//! function here loads the config, opens the store, does one thing and prints it.
//!
//! Invariants:
//! - Every change goes through one store transaction, so a command run beside the
//!   daemon is safe; the daemon's workers pick the change up (inbox rows within a
//!   second, outbox rows at their next pass).
//! - An id that does not exist is a usage error (exit 2) naming the command that
//!   lists the valid ones; doing again what was done is a no-op that says so (exit 0).

use crate::cli::{CliError, ConfigSource, load, open_store};
use crate::followup::explain::{self, DealView};
use crate::output::{self, Rows, ViewFormat};
use chrono::{DateTime, Utc};
use std::sync::Arc;

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn or_dash(text: Option<String>) -> String {
    text.filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

/// `deals show ID`: the deal, its source record, stage history, emails, and each
/// follow-up rule's decision about it today.
pub async fn deals_show(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    let config = Arc::new(load(source).await?);
    let store = open_store(&config).await?;
    let Some(view) = explain::deal_view(&store, config, id, Utc::now()).await? else {
        return Err(CliError::Usage(format!(
            "no deal with id {id} (`dealsync deals list` shows the ids)"
        )));
    };
    output::print(&match format {
        ViewFormat::Json => output::to_json(&view),
        ViewFormat::Table => render_deal(&view),
    });
    Ok(())
}

/// The table form of a deal view.
pub fn render_deal(view: &DealView) -> String {
    let deal = &view.deal;
    let stage = match &deal.pipeline {
        Some(pipeline) => format!("{pipeline}.{}", deal.stage),
        None => deal.stage.to_string(),
    };
    let contact = match (&deal.contact_name, &deal.contact_email) {
        (Some(name), Some(email)) => format!("{name} <{email}>"),
        (None, Some(email)) => email.to_string(),
        (Some(name), None) => format!("{name} (no email address)"),
        (None, None) => "-".to_owned(),
    };
    let consent = match deal.marketing_consent {
        Some(true) => "yes",
        Some(false) => "declined",
        None => "not recorded",
    };
    let owner = match (&deal.owner, &deal.owner_email) {
        (Some(name), Some(email)) => format!("{name} <{email}>"),
        (None, Some(email)) => email.to_string(),
        (Some(name), None) => format!("{name} (no email address)"),
        (None, None) => "-".to_owned(),
    };
    let mut facts = Rows::new(vec!["field", "value"]);
    let mut fact = |name: &str, value: String| facts.push(vec![name.to_owned(), value]);
    fact("title", deal.title.clone());
    fact(
        "source",
        format!(
            "{} (external id {}), native stage \"{}\" / \"{}\"",
            deal.connection, deal.external_id, deal.native_pipeline, deal.native_stage
        ),
    );
    fact(
        "stage",
        format!(
            "{stage} ({}) since {}",
            deal.status,
            time(deal.stage_entered_at)
        ),
    );
    fact(
        "amount",
        match (deal.amount(), deal.currency) {
            (Some(amount), Some(currency)) => {
                format!("{} {currency}", amount.to_decimal_string())
            }
            _ => "-".into(),
        },
    );
    fact(
        "contact",
        format!("{contact}; marketing consent: {consent}"),
    );
    fact("owner", owner);
    fact(
        "seen",
        format!(
            "first {}, last activity {}",
            time(deal.first_seen_at),
            time(deal.last_activity_at)
        ),
    );
    if let Some(at) = deal.deleted_at {
        fact("deleted", format!("in its source at {}", time(at)));
    }
    let mut out = format!("Deal {} (as of {} UTC)\n\n", deal.id, time(view.as_of));
    out.push_str(&facts.render(crate::output::Format::Table));

    out.push_str("\nStage history\n\n");
    let mut history = Rows::new(vec!["at", "from", "to", "native", "cause"]);
    for change in &view.history {
        let stage_of = |pipeline: &Option<crate::domain::PipelineKey>, stage: &str| match pipeline {
            Some(pipeline) => format!("{pipeline}.{stage}"),
            None => stage.to_owned(),
        };
        history.push(vec![
            time(change.at),
            change
                .from_stage
                .as_ref()
                .map(|s| stage_of(&change.from_pipeline, s.as_str()))
                .unwrap_or_else(|| "-".into()),
            stage_of(&change.to_pipeline, change.to_stage.as_str()),
            change.native_to.clone(),
            change.cause.as_str().to_owned(),
        ]);
    }
    out.push_str(&history.render(crate::output::Format::Table));

    out.push_str("\nEmails\n\n");
    if view.emails.is_empty() {
        out.push_str("none\n");
    } else {
        let mut emails = Rows::new(vec![
            "id",
            "rule",
            "step",
            "action",
            "recipient",
            "state",
            "due",
            "sent",
            "attempts",
            "reason",
        ]);
        for row in &view.emails {
            emails.push(vec![
                row.id.to_string(),
                row.rule.clone(),
                (row.step + 1).to_string(),
                row.action.as_str().to_owned(),
                or_dash(Some(row.recipient.clone())),
                row.state.as_str().to_owned(),
                time(row.due_at),
                row.sent_at.map(time).unwrap_or_else(|| "-".into()),
                row.attempts.to_string(),
                or_dash(row.reason.clone()),
            ]);
        }
        out.push_str(&emails.render(crate::output::Format::Table));
    }

    out.push_str("\nFollow-up rules\n\n");
    if view.followups.is_empty() {
        out.push_str("no follow-up rules configured\n");
    } else {
        let mut rules = Rows::new(vec!["rule", "kind", "decision", "when", "reason"]);
        for decision in &view.followups {
            rules.push(vec![
                decision.rule.clone(),
                decision.kind.to_owned(),
                decision.verdict.as_str().to_owned(),
                decision.next_at.map(time).unwrap_or_else(|| "-".into()),
                decision.reason.clone(),
            ]);
        }
        out.push_str(&rules.render(crate::output::Format::Table));
    }

    out.push_str("\nSource record\n\n");
    out.push_str(&output::to_json(&view.source.record));
    out
}
