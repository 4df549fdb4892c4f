//! Operator commands: `deals show` and the recovery commands (`inbox dead-letters`,
//! `quarantine`, `outbox retry`, `suppressions`). clap types live in `cli::args`; each
//! function here loads the config, opens the store, does one thing and prints it.
//!
//! Invariants:
//! - Every change goes through one store transaction, so a command run beside the
//!   daemon is safe; the daemon's workers pick the change up (inbox rows within a
//!   second, outbox rows at their next pass).
//! - An id that does not exist is a usage error (exit 2) naming the command that
//!   lists the valid ones; doing again what was done is a no-op that says so (exit 0).

use super::args::{
    RecoveryListArgs, SuppressionAddArgs, SuppressionRemoveArgs, SuppressionsListArgs,
};
use super::context::{CliError, ConfigSource, load, open_store, runtimes};
use crate::config::Config;
use crate::connectors::WebhookEvent;
use crate::domain::{ChangeCause, ConnectionName, EmailAddress};
use crate::followup::explain::{self, DealView};
use crate::ingest::{ConnectionRuntime, SyncDeps};
use crate::output::{self, Format, Rows, ViewFormat, print_list, time};
use crate::store::{Replayed, Reread, RetryOutcome, Store, StoredDeadLetter};
use chrono::Utc;
use serde_json::json;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub(super) fn or_dash(text: Option<String>) -> String {
    text.filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

/// Runs a `show` command: loads the config, opens the store, finds the record, and
/// prints its `json` form with `--format json`, else its `table` form.
pub(super) async fn show<T>(
    source: &ConfigSource,
    format: ViewFormat,
    find: impl AsyncFnOnce(&Arc<Config>, &Store) -> Result<T, CliError>,
    json: impl FnOnce(&T) -> String,
    table: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    let config = Arc::new(load(source).await?);
    let store = open_store(&config).await?;
    let record = find(&config, &store).await?;
    output::print(&match format {
        ViewFormat::Json => json(&record),
        ViewFormat::Table => table(&record),
    });
    Ok(())
}

/// The usage error of an id that names no record: says which command lists them.
fn no_such(what: &str, id: i64, listed_by: &str) -> CliError {
    CliError::Usage(format!("no {what} with id {id} (`{listed_by}` shows them)"))
}

/// The table form of one stored record, as a `show` command prints it: a title over a
/// table of facts, then sections, each a heading and its text.
pub(super) struct Shown(pub(super) String);

impl Shown {
    pub(super) fn new(title: String, facts: Vec<(&str, String)>) -> Shown {
        let mut table = Rows::new(vec!["field", "value"]);
        for (name, value) in facts {
            table.push(vec![name.to_owned(), value]);
        }
        Shown(format!("{title}\n\n{}", table.render(Format::Table)))
    }

    pub(super) fn section(mut self, heading: &str, text: &str) -> Shown {
        self.0.push_str(&format!("\n{heading}\n\n{text}"));
        self
    }

    /// A section holding what a source sent: pretty-printed when it is JSON, else as
    /// it came.
    fn sent(self, heading: &str, text: &str) -> Shown {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => self.section(heading, &output::to_json(&value)),
            Err(_) => self.section(heading, &format!("{text}\n")),
        }
    }
}

/// `deals show ID`: the deal, its source record, stage history, emails, and each
/// follow-up rule's decision about it today.
pub async fn deals_show(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    show(
        source,
        format,
        async |config, store| {
            explain::deal_view(store, config.clone(), id, Utc::now())
                .await?
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "no deal with id {id} (`dealsync deals list` shows the ids)"
                    ))
                })
        },
        output::to_json,
        render_deal,
    )
    .await
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
    let mut facts = vec![("title", deal.title.clone())];
    let mut fact = |name, value: String| facts.push((name, value));
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
    let title = format!("Deal {} (as of {} UTC)", deal.id, time(view.as_of));
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

    let emails = emails_table(&view.emails);

    let rules = if view.followups.is_empty() {
        "no follow-up rules configured\n".to_owned()
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
        rules.render(Format::Table)
    };

    let writebacks = if view.writebacks.is_empty() {
        "none\n".to_owned()
    } else {
        let mut writebacks = Rows::new(vec![
            "email", "rule", "step", "state", "attempts", "next", "done", "crm id", "reason",
        ]);
        for row in &view.writebacks {
            let waiting = row.state == "pending";
            writebacks.push(vec![
                row.outbox_id.to_string(),
                row.rule.clone(),
                row.step.to_string(),
                row.state.clone(),
                row.attempts.to_string(),
                if waiting {
                    time(row.next_attempt_at)
                } else {
                    "-".into()
                },
                row.done_at.map(time).unwrap_or_else(|| "-".into()),
                or_dash(row.remote_id.clone()),
                or_dash(row.reason.clone()),
            ]);
        }
        writebacks.render(Format::Table)
    };

    let suppression = match &view.contact_suppression {
        Some(s) => format!(
            "the contact's address is suppressed: {} since {} ({})",
            s.reason,
            time(s.created_at),
            or_dash(s.source.clone())
        ),
        None => "the contact's address is not suppressed".to_owned(),
    };
    let delivery = format!(
        "{suppression}\n{}",
        delivery_rows(&view.delivery_events).render(Format::Table)
    );
    Shown::new(title, facts)
        .section("Stage history", &history.render(Format::Table))
        .section("Emails", &emails)
        .section("CRM write-back", &writebacks)
        .section("Bounces and complaints", &delivery)
        .section("Follow-up rules", &rules)
        .section("Source record", &output::to_json(&view.source.record))
        .0
}

/// The table of outbox rows (emails and expiries) a `show` command prints, or "none".
pub(super) fn emails_table(rows: &[crate::store::OutboxRow]) -> String {
    if rows.is_empty() {
        return "none\n".to_owned();
    }
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
    for row in rows {
        emails.push(vec![
            row.id.to_string(),
            row.rule.clone(),
            row.step.to_string(),
            row.action.as_str().to_owned(),
            or_dash(Some(row.recipient.clone())),
            row.state.as_str().to_owned(),
            time(row.due_at),
            row.sent_at.map(time).unwrap_or_else(|| "-".into()),
            row.attempts.to_string(),
            or_dash(row.reason.clone()),
        ]);
    }
    emails.render(Format::Table)
}

/// Bounces and complaints as a table.
fn delivery_rows(events: &[crate::store::DeliveryEvent]) -> Rows {
    let mut rows = Rows::new(vec![
        "at", "email", "class", "status", "source", "outbox", "rule", "detail",
    ]);
    for event in events {
        rows.push(vec![
            time(event.occurred_at),
            event.email.clone(),
            event.class.clone(),
            or_dash(event.status.clone()),
            event.source.clone(),
            event
                .outbox_id
                .map_or_else(|| "-".to_owned(), |id| id.to_string()),
            or_dash(event.rule.clone()),
            or_dash(event.detail.clone()),
        ]);
    }
    rows
}

/// Prints the outcome of an action: one sentence, or the JSON object.
fn report(format: ViewFormat, text: String, json: serde_json::Value) {
    output::print(&match format {
        ViewFormat::Table => format!("{text}\n"),
        ViewFormat::Json => output::to_json(&json),
    });
}

/// Refuses a `--connection` that the config does not name, listing the ones it does.
fn known_connection(config: &Config, connection: Option<&str>) -> Result<(), CliError> {
    match connection {
        Some(name) if !config.connections.iter().any(|c| c.name.as_str() == name) => {
            let known: Vec<&str> = config.connections.iter().map(|c| c.name.as_str()).collect();
            Err(CliError::Usage(format!(
                "no connection {name:?} in {} (known: {})",
                config.path.display(),
                known.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

/// The connection `name` as configured now, with its discovered stages.
async fn runtime_of(
    config: &Config,
    store: &Store,
    name: &str,
    what: &str,
) -> Result<Arc<ConnectionRuntime>, CliError> {
    runtimes(config, Some(store))
        .await?
        .into_iter()
        .find(|runtime| runtime.name() == name)
        .ok_or_else(|| {
            CliError::Other(anyhow::anyhow!(
                "{what} belongs to connection {name:?}, which {} no longer configures",
                config.path.display()
            ))
        })
}

// ---- inbox dead-letters ------------------------------------------------------------

fn replay_state(letter: &StoredDeadLetter) -> String {
    match (letter.replayed_at, letter.replayed_as, &letter.replay_state) {
        (None, _, _) => "-".to_owned(),
        (Some(at), Some(row), Some(state)) => {
            format!("{} as inbox row {row} ({state})", time(at))
        }
        (Some(at), Some(row), None) => format!("{} as inbox row {row} (pruned)", time(at)),
        (Some(at), None, _) => time(at),
    }
}

fn dead_letter_json(letter: &StoredDeadLetter, with_body: bool) -> serde_json::Value {
    let mut value = serde_json::to_value(letter).unwrap_or_default();
    if with_body && let Some(object) = value.as_object_mut() {
        object.insert(
            "body".into(),
            String::from_utf8_lossy(&letter.body).into_owned().into(),
        );
    }
    value
}

/// `inbox dead-letters list`.
pub async fn dead_letters_list(
    source: &ConfigSource,
    args: RecoveryListArgs,
) -> Result<(), CliError> {
    let config = load(source).await?;
    known_connection(&config, args.connection.as_deref())?;
    let store = open_store(&config).await?;
    let letters = store.dead_letters(args.connection, args.limit).await?;
    print_list(
        args.format,
        &letters,
        |letters| {
            let values: Vec<_> = letters.iter().map(|l| dead_letter_json(l, false)).collect();
            output::to_json(&values)
        },
        vec![
            "id",
            "connection",
            "received",
            "topic",
            "delivery_id",
            "reason",
            "replayed",
        ],
        |letter| {
            vec![
                letter.id.to_string(),
                letter.connection.clone(),
                time(letter.received_at),
                or_dash(letter.topic.clone()),
                or_dash(letter.delivery_id.clone()),
                letter.reason.clone(),
                replay_state(letter),
            ]
        },
    );
    Ok(())
}

const DEAD_LETTERS_LIST: &str = "dealsync inbox dead-letters list";

async fn dead_letter(store: &Store, id: i64) -> Result<StoredDeadLetter, CliError> {
    let found = store.stored_dead_letter(id).await?;
    found.ok_or_else(|| no_such("dead letter", id, DEAD_LETTERS_LIST))
}

/// `inbox dead-letters show ID`.
pub async fn dead_letter_show(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    show(
        source,
        format,
        async |_, store| dead_letter(store, id).await,
        |letter| output::to_json(&dead_letter_json(letter, true)),
        |letter| {
            let facts = vec![
                ("connection", letter.connection.clone()),
                ("received", time(letter.received_at)),
                ("topic", or_dash(letter.topic.clone())),
                ("delivery id", or_dash(letter.delivery_id.clone())),
                ("refused because", letter.reason.clone()),
                ("replayed", replay_state(letter)),
                ("replay error", or_dash(letter.replay_error.clone())),
            ];
            let mut headers = Rows::new(vec!["name", "value"]);
            for (name, value) in &letter.headers {
                headers.push(vec![name.clone(), value.clone()]);
            }
            Shown::new(format!("Dead letter {id}"), facts)
                .section(
                    "Headers (signature and auth headers are never kept)",
                    &headers.render(Format::Table),
                )
                .sent("Body", &String::from_utf8_lossy(&letter.body))
                .0
        },
    )
    .await
}

/// `inbox dead-letters replay ID`: parses the letter again with the connection as
/// configured now and, if it reads, queues it in the inbox under its delivery id, so
/// the inbox worker applies it like any delivery, once.
pub async fn dead_letter_replay(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let letter = dead_letter(&store, id).await?;
    let pending_again = letter.replay_state.as_deref() == Some("failed");
    if letter.replayed_at.is_none() || pending_again {
        let runtime = runtime_of(
            &config,
            &store,
            &letter.connection,
            &format!("dead letter {id}"),
        )
        .await?;
        let event = WebhookEvent {
            connection: ConnectionName::new(letter.connection.clone()),
            delivery_id: letter.replay_delivery_id(),
            topic: letter.topic.clone(),
            headers: letter.headers.clone(),
            body: letter.body.clone(),
            received_at: letter.received_at,
        };
        if let Err(bad) = runtime.connector.parse_webhook(&event) {
            return Err(CliError::Other(anyhow::anyhow!(
                "dead letter {id} still does not read with connection {} as {} configures it: {}; \
                 fix the connection's settings (or its connector), reload the daemon, and replay again",
                letter.connection,
                config.path.display(),
                bad.reason
            )));
        }
    }
    let outcome = store.replay_dead_letter(id, Utc::now()).await?;
    let (name, inbox_id, text) = match outcome {
        Replayed::Queued { inbox_id } => (
            "queued",
            Some(inbox_id),
            format!(
                "dead letter {id}: queued as inbox row {inbox_id}; the daemon's inbox worker applies it within a second (reload the daemon first if you changed its config)"
            ),
        ),
        Replayed::Requeued { inbox_id } => (
            "requeued",
            Some(inbox_id),
            format!(
                "dead letter {id}: inbox row {inbox_id} had failed and is queued again; the daemon's inbox worker applies it within a second"
            ),
        ),
        Replayed::AlreadyInInbox { inbox_id, state } => (
            "already_in_inbox",
            Some(inbox_id),
            format!(
                "dead letter {id}: its delivery is already inbox row {inbox_id} ({state}), which a vendor retry stored; nothing to do"
            ),
        ),
        Replayed::AlreadyReplayed { at, inbox_id } => (
            "already_replayed",
            inbox_id,
            format!(
                "dead letter {id} was replayed at {}{}; nothing to do",
                time(at),
                inbox_id
                    .map(|row| format!(" as inbox row {row}"))
                    .unwrap_or_default()
            ),
        ),
        Replayed::NotFound => {
            return Err(no_such("dead letter", id, DEAD_LETTERS_LIST));
        }
    };
    report(
        format,
        text.clone(),
        json!({ "dead_letter": id, "outcome": name, "inbox_id": inbox_id, "message": text }),
    );
    Ok(())
}

// ---- quarantine ---------------------------------------------------------------------

/// `quarantine list`.
pub async fn quarantine_list(
    source: &ConfigSource,
    args: RecoveryListArgs,
) -> Result<(), CliError> {
    let config = load(source).await?;
    known_connection(&config, args.connection.as_deref())?;
    let store = open_store(&config).await?;
    let entries = store.quarantined(args.connection, args.limit).await?;
    print_list(
        args.format,
        &entries,
        |entries| output::to_json(&entries),
        vec!["id", "connection", "external_id", "at", "error"],
        |entry| {
            vec![
                entry.id.to_string(),
                entry.connection.clone(),
                or_dash(entry.external_id.clone()),
                time(entry.at),
                entry.error.clone(),
            ]
        },
    );
    Ok(())
}

async fn quarantine_entry(
    store: &Store,
    id: i64,
) -> Result<crate::store::QuarantineEntry, CliError> {
    let found = store.quarantine_entry(id).await?;
    found.ok_or_else(|| no_such("quarantined record", id, "dealsync quarantine list"))
}

/// `quarantine show ID`.
pub async fn quarantine_show(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    show(
        source,
        format,
        async |_, store| quarantine_entry(store, id).await,
        output::to_json,
        |entry| {
            let facts = vec![
                ("connection", entry.connection.clone()),
                ("external id", or_dash(entry.external_id.clone())),
                ("quarantined", time(entry.at)),
                ("error", entry.error.clone()),
            ];
            Shown::new(format!("Quarantined record {id}"), facts)
                .sent("Record as the source sent it", &entry.raw)
                .0
        },
    )
    .await
}

/// `quarantine retry ID`: reads the record again from its source (the connector's
/// single-record read, with the connection's credentials) and, if it reads now, stores
/// it and takes every quarantine entry of the record out, in one transaction.
pub async fn quarantine_retry(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let entry = quarantine_entry(&store, id).await?;
    let Some(external_id) = entry.external_id.clone() else {
        return Err(CliError::Other(anyhow::anyhow!(
            "quarantined record {id} has no id, so it cannot be read on its own; \
             `dealsync sync --full {}` reads every record of the connection again",
            entry.connection
        )));
    };
    config.require_connection_credentials(&entry.connection)?;
    let runtime = runtime_of(
        &config,
        &store,
        &entry.connection,
        &format!("quarantined record {id}"),
    )
    .await?;
    let deps = SyncDeps {
        store: store.clone(),
        metrics: Arc::new(crate::telemetry::Metrics::new()),
        attention: None,
    };
    let cx = runtime.context(&deps, &CancellationToken::new());
    let read = runtime
        .connector
        .fetch_one(&cx, &external_id)
        .await
        .map_err(|error| {
            CliError::Other(anyhow::anyhow!(
                "re-reading record {external_id} of connection {}: {error}; it stays quarantined \
                 (`dealsync sync --full {}` reads every record of the connection again)",
                entry.connection,
                entry.connection
            ))
        })?;
    let now = Utc::now();
    let (found, outcome_name) = match read {
        Some(deal) => {
            let upsert = runtime
                .upserts(vec![deal], ChangeCause::Poll)
                .pop()
                .expect("one record in, one upsert out");
            (Reread::Stored(Box::new(upsert)), "stored")
        }
        None => (Reread::Deleted, "deleted"),
    };
    let (outcome, removed) = store
        .resolve_quarantined(entry.connection.clone(), external_id.clone(), found, now)
        .await?;
    let deal = store
        .deal_by_external_id(&entry.connection, &external_id)
        .await?
        .map(|deal| deal.id);
    let text = match outcome_name {
        "stored" => format!(
            "record {external_id} of {} reads now: {} as deal {}; {removed} quarantine entr{} of it removed",
            entry.connection,
            if outcome.created > 0 {
                "created"
            } else if outcome.updated > 0 {
                "updated"
            } else {
                "already stored"
            },
            deal.map_or_else(|| "-".to_owned(), |id| id.to_string()),
            if removed == 1 { "y" } else { "ies" }
        ),
        _ => format!(
            "the source says record {external_id} of {} no longer exists{}; {removed} quarantine entr{} of it removed",
            entry.connection,
            deal.map(|id| format!(" (deal {id} is marked deleted)"))
                .unwrap_or_default(),
            if removed == 1 { "y" } else { "ies" }
        ),
    };
    report(
        format,
        text.clone(),
        json!({
            "quarantine_id": id,
            "outcome": outcome_name,
            "deal_id": deal,
            "removed_entries": removed,
            "message": text,
        }),
    );
    Ok(())
}

// ---- outbox retry ------------------------------------------------------------------

/// `outbox retry ID`: a failed email goes back to pending, due now; the daemon's
/// follow-up worker claims it (re-checking the deal, consent and suppression as for
/// any due email) and sends it once.
pub async fn outbox_retry(
    source: &ConfigSource,
    id: i64,
    format: ViewFormat,
) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let row = match store.retry_failed(id, Utc::now()).await? {
        RetryOutcome::Queued(row) => row,
        RetryOutcome::NotFound => {
            return Err(CliError::Usage(format!(
                "no outbox row with id {id} (`dealsync outbox list --state failed` shows the failed emails)"
            )));
        }
        RetryOutcome::NotFailed(row) => {
            let what = match (row.action, row.sent_at) {
                (crate::store::OutboxAction::Expire, _) => "an expiry, not an email".to_owned(),
                (_, Some(at)) => format!("{} (at {})", row.state.as_str(), time(at)),
                _ => row.state.as_str().to_owned(),
            };
            return Err(CliError::Usage(format!(
                "outbox row {id} is {what}: only a failed email is sent again"
            )));
        }
        RetryOutcome::Suppressed(row, reason) => {
            return Err(CliError::Other(anyhow::anyhow!(
                "outbox row {id}: {} is suppressed ({reason}), so a retry would be skipped; \
                 `dealsync suppressions remove {}` first if it should get email again",
                row.recipient,
                row.recipient
            )));
        }
    };
    let text = format!(
        "outbox row {id} (deal {}, rule {}, step {}) is pending again, due now; the daemon's follow-up worker sends it at its next pass (within email.enroll_interval, {})",
        row.deal_id,
        row.rule,
        row.step.number(),
        crate::config::duration::format(config.email.enroll_interval)
    );
    report(
        format,
        text.clone(),
        json!({ "outbox_id": id, "outcome": "queued", "row": row, "message": text }),
    );
    Ok(())
}

// ---- suppressions ------------------------------------------------------------------

/// `suppressions list`.
pub async fn suppressions_list(
    source: &ConfigSource,
    args: SuppressionsListArgs,
) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let suppressions = store.suppressions().await?;
    print_list(
        args.format,
        &suppressions,
        |suppressions| output::to_json(&suppressions),
        vec!["email", "reason", "source", "since"],
        |suppression| {
            vec![
                suppression.email.clone(),
                suppression.reason.clone(),
                or_dash(suppression.source.clone()),
                time(suppression.created_at),
            ]
        },
    );
    Ok(())
}

fn address(text: &str) -> Result<EmailAddress, CliError> {
    EmailAddress::parse(text)
        .ok_or_else(|| CliError::Usage(format!("{text:?} is not an email address")))
}

/// `suppressions show ADDRESS`: the suppression, if any, and every bounce and
/// complaint recorded for the address.
pub async fn suppressions_show(
    source: &ConfigSource,
    args: SuppressionRemoveArgs,
) -> Result<(), CliError> {
    let email = address(&args.address)?;
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let suppression = store.suppression(email.to_string()).await?;
    let events = store.delivery_events_for_email(email.to_string()).await?;
    let text = match &suppression {
        Some(s) => format!(
            "{} is suppressed: {} since {} ({})",
            s.email,
            s.reason,
            time(s.created_at),
            or_dash(s.source.clone())
        ),
        None => format!("{email} is not suppressed"),
    };
    report(
        args.format,
        format!(
            "{text}\n\nBounces and complaints\n{}",
            delivery_rows(&events).render(Format::Table)
        ),
        json!({ "email": email.to_string().to_lowercase(), "suppression": suppression, "delivery_events": events }),
    );
    Ok(())
}

/// `suppressions add ADDRESS`.
pub async fn suppressions_add(
    source: &ConfigSource,
    args: SuppressionAddArgs,
) -> Result<(), CliError> {
    let email = address(&args.address)?;
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let note = args
        .note
        .unwrap_or_else(|| "dealsync suppressions add".to_owned());
    let added = store
        .suppress(email.to_string(), "manual".into(), Some(note), Utc::now())
        .await?;
    let suppression = store.suppression(email.to_string()).await?;
    let text = match (&suppression, added) {
        (Some(s), true) => format!(
            "{} is suppressed: no follow-up or digest email goes to it",
            s.email
        ),
        (Some(s), false) => format!(
            "{} was already suppressed ({}, since {}); nothing changed",
            s.email,
            s.reason,
            time(s.created_at)
        ),
        (None, _) => format!("{email} is suppressed"),
    };
    report(
        args.format,
        text.clone(),
        json!({
            "email": email.to_string().to_lowercase(),
            "outcome": if added { "added" } else { "already_suppressed" },
            "suppression": suppression,
            "message": text,
        }),
    );
    Ok(())
}

/// `suppressions remove ADDRESS`.
pub async fn suppressions_remove(
    source: &ConfigSource,
    args: SuppressionRemoveArgs,
) -> Result<(), CliError> {
    let email = address(&args.address)?;
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let Some(removed) = store.unsuppress(email.to_string()).await? else {
        return Err(CliError::Usage(format!(
            "{email} is not suppressed (`dealsync suppressions list` shows the list)"
        )));
    };
    let text = format!(
        "{} is no longer suppressed (it was: {}, since {}); follow-ups from now on are sent to it, sequences already stopped stay stopped",
        removed.email,
        removed.reason,
        time(removed.created_at)
    );
    report(
        args.format,
        text.clone(),
        json!({ "email": removed.email, "outcome": "removed", "removed": removed, "message": text }),
    );
    Ok(())
}
