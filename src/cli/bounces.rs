//! `dealsync bounces ingest FILE…`: bounce emails from Maildir directories, mbox files
//! or single messages, recorded as `POST /bounces` records them
//! (`deliverability::ingest_report`). A file that cannot be read is named and the
//! others are still read (exit 1 at the end); a message that is no report is named and
//! skipped, never guessed at.

use super::args::{BouncesIngestArgs, DeliverabilityResumeArgs, DeliverabilityShowArgs};
use super::context::{CliError, ConfigSource, load, open_store};
use crate::deliverability::{self, IngestError};
use crate::output::{self, Rows, ViewFormat};
use chrono::Utc;
use serde_json::json;

/// `bounces ingest FILE…`.
pub async fn ingest(source: &ConfigSource, args: BouncesIngestArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let mut rows = Rows::new(vec!["message", "email", "class", "outcome"]);
    let mut results = Vec::new();
    let mut unreadable = Vec::new();
    for path in &args.files {
        let messages = match deliverability::read_mailbox(path) {
            Ok(messages) => messages,
            Err(error) => {
                rows.push(vec![
                    path.display().to_string(),
                    "-".into(),
                    "-".into(),
                    error.to_string(),
                ]);
                results.push(
                    json!({ "message": path.display().to_string(), "error": error.to_string() }),
                );
                unreadable.push(error.to_string());
                continue;
            }
        };
        for message in messages {
            match deliverability::ingest_report(&store, &config, &message.raw, Utc::now()).await {
                Ok(outcomes) if outcomes.is_empty() => {
                    rows.push(vec![
                        message.origin.clone(),
                        "-".into(),
                        "-".into(),
                        "no failed recipient: nothing recorded".into(),
                    ]);
                    results.push(json!({ "message": message.origin, "events": [] }));
                }
                Ok(outcomes) => {
                    for outcome in &outcomes {
                        rows.push(vec![
                            message.origin.clone(),
                            outcome.email.clone(),
                            outcome.class.as_str().to_owned(),
                            describe(outcome),
                        ]);
                    }
                    results.push(json!({ "message": message.origin, "events": outcomes }));
                }
                Err(IngestError::Report(error)) => {
                    rows.push(vec![
                        message.origin.clone(),
                        "-".into(),
                        "-".into(),
                        format!("skipped: {error}"),
                    ]);
                    results
                        .push(json!({ "message": message.origin, "skipped": error.to_string() }));
                }
                Err(IngestError::Store(error)) => return Err(CliError::Other(error.into())),
            }
        }
    }
    output::print(&match args.format {
        ViewFormat::Table => rows.render(output::Format::Table),
        ViewFormat::Json => output::to_json(&results),
    });
    if unreadable.is_empty() {
        Ok(())
    } else {
        Err(CliError::Other(anyhow::anyhow!(
            "{} of the files could not be read (the others were): {}",
            unreadable.len(),
            unreadable.join("; ")
        )))
    }
}

/// The figures as a table: one line per rule and window, the overall line last.
pub fn figures_table(figures: &[crate::store::DeliveryFigures]) -> String {
    let mut rows = Rows::new(deliverability::FIGURES_COLUMNS.to_vec());
    for line in figures {
        rows.push(deliverability::figures_row(line).to_vec());
    }
    rows.render(output::Format::Table)
}

/// `deliverability show`.
pub async fn show(source: &ConfigSource, args: DeliverabilityShowArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let figures = store.delivery_figures(Utc::now()).await?;
    let pauses = store.rule_pauses().await?;
    output::print(&match args.format {
        ViewFormat::Json => output::to_json(&json!({ "figures": figures, "paused": pauses })),
        ViewFormat::Table => {
            let mut text = figures_table(&figures);
            text.push_str("\nPaused rules\n");
            if pauses.is_empty() {
                text.push_str("none\n");
            }
            for pause in &pauses {
                text.push_str(&format!(
                    "{} since {}: {} (`dealsync deliverability resume {}`)\n",
                    pause.rule,
                    output::time(pause.paused_at),
                    pause.reason,
                    pause.rule
                ));
            }
            text
        }
    });
    Ok(())
}

/// `deliverability resume RULE`.
pub async fn resume(source: &ConfigSource, args: DeliverabilityResumeArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let Some(removed) = store.resume_rule(args.rule.clone()).await? else {
        return Err(CliError::Usage(format!(
            "rule {} is not paused (`dealsync deliverability show` lists the paused rules)",
            args.rule
        )));
    };
    let text = format!(
        "rule {} resumed (it was paused since {}: {}); its waiting steps are sent from the daemon's next pass, those later than the late grace are skipped",
        removed.rule,
        output::time(removed.paused_at),
        removed.reason
    );
    output::print(&match args.format {
        ViewFormat::Table => format!("{text}\n"),
        ViewFormat::Json => output::to_json(
            &json!({ "rule": removed.rule, "outcome": "resumed", "removed": removed, "message": text }),
        ),
    });
    Ok(())
}

/// What recording one event did, in words.
pub fn describe(outcome: &crate::store::DeliveryOutcome) -> String {
    if !outcome.recorded {
        return "already recorded: nothing changed".to_owned();
    }
    let mut text = match outcome.outbox_id {
        Some(id) => format!("recorded against outbox row {id}"),
        None => "recorded (no outbox row of ours matched)".to_owned(),
    };
    match &outcome.suppressed {
        Some(reason) => text.push_str(&format!("; address suppressed ({reason})")),
        None => text.push_str("; address not suppressed"),
    }
    if let Some(rule) = &outcome.paused {
        text.push_str(&format!("; rule {rule} paused for its complaint rate"));
    }
    if outcome.stopped > 0 {
        text.push_str(&format!(
            "; {} pending marketing emails stopped",
            outcome.stopped
        ));
    }
    text
}
