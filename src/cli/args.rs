//! The command line's clap types: every subcommand, its arguments and their parsers.
//!
//! Invariants:
//! - Types only, no IO: what a command does is in `cli` (and `cli::ops`), which
//!   take these as parsed.
//! - A value that can be wrong is refused here, by clap, with the accepted values
//!   (exit 2), never later in the command.

use crate::config;
use crate::domain::DealStatus;
use crate::output::Format;
use crate::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// The heading under which `--help` lists the flags every command takes.
const GLOBAL: &str = "Global options";

#[derive(Debug, Parser)]
#[command(
    name = "dealsync",
    version,
    about = "Deals from every CRM and shop, one pipeline, follow-ups that never spam"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH, help_heading = GLOBAL)]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "pretty", help_heading = GLOBAL)]
    pub log_format: LogFormat,
    /// Log level or filter: trace, debug, info, warn, error or off, or directives
    /// such as `info,dealsync=debug`.
    #[arg(long, global = true, default_value = "info", value_parser = crate::telemetry::parse_log_filter, help_heading = GLOBAL)]
    pub log_level: String,
    /// Read `${credential:NAME}` from the file NAME in DIR, as the service reads it from
    /// $CREDENTIALS_DIRECTORY; for commands that need a credential outside the service.
    #[arg(long, global = true, value_name = "DIR")]
    pub credentials_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run,
    /// Validate the config, connectors and stage mappings; exit 78 when invalid.
    Check(CheckArgs),
    /// Show the canonical pipelines and each connection's stage mapping.
    Stages,
    /// Sync now, once, with a progress bar on a terminal.
    Sync(SyncArgs),
    /// Authorize an OAuth connection in the browser and store its tokens.
    Auth(AuthArgs),
    /// Deals in the store.
    #[command(subcommand)]
    Deals(DealsCommand),
    /// People across connections: one person's deals, carts, emails and suppressions.
    #[command(subcommand)]
    People(PeopleCommand),
    /// The funnel: conversion, time in stage, bottlenecks, weighted forecast, cart recovery.
    Report(ReportArgs),
    /// Follow-up emails: due, sent, skipped; and the exact email a rule would send.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The webhook inbox: dead letters (authentic deliveries whose body could not be read).
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// Records a pull sync could not read: list them, show one, re-read one.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Addresses that get no email at all: list, add, remove.
    #[command(subcommand)]
    Suppressions(SuppressionsCommand),
    /// Bounces and complaints that arrived after the hand-off: feed bounce emails in.
    #[command(subcommand)]
    Bounces(BouncesCommand),
    /// Reputation figures per rule (sent, bounced, complained, complaint rate) and the
    /// marketing rules paused for their complaint rate; resume one.
    #[command(subcommand)]
    Deliverability(DeliverabilityCommand),
    /// Copy this install's SQLite store (the database at storage.path and the webhook
    /// inbox beside it) into an empty PostgreSQL database, verify every table's row
    /// count, and leave the SQLite files untouched. Stop the daemon first.
    MigrateStore(MigrateStoreArgs),
    /// Print a shell completion script, e.g. `dealsync completions bash >
    /// /usr/share/bash-completion/completions/dealsync`.
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. `dealsync man > /usr/share/man/man1/dealsync.1`.
    Man,
}

#[derive(Debug, Args)]
pub struct MigrateStoreArgs {
    /// The PostgreSQL database to copy into, written as storage.url is:
    /// `postgres://USER:${credential:NAME}@HOST:PORT/DB` (quote it for the shell); the
    /// password comes from the credential NAME (--credentials-dir or
    /// $CREDENTIALS_DIRECTORY) or ${VAR}, or is written in the URL percent-encoded.
    #[arg(long, value_name = "URL")]
    pub to: String,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also try the environment: log in to each CRM and read once, greet the SMTP
    /// server (no message is sent), check that the listen address is free. Exits 69
    /// when the config is valid but the environment is not.
    #[arg(long)]
    pub online: bool,
}

#[derive(Debug, Subcommand)]
pub enum InboxCommand {
    /// Deliveries answered 400 because their body could not be read: list, show, replay.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first, with whether each was replayed.
    List(RecoveryListArgs),
    /// One dead letter: why it was refused, its headers and body, its replay.
    Show(RecoveryIdArgs),
    /// Parse a dead letter again with the connection as configured now and, if it reads,
    /// queue it in the inbox so the daemon's inbox worker applies it (once).
    Replay(RecoveryIdArgs),
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List quarantined records, newest first.
    List(RecoveryListArgs),
    /// One quarantined record: why, and the record as the source sent it.
    Show(RecoveryIdArgs),
    /// Read the record again from its source; if it reads now, store it and take it
    /// out of quarantine.
    Retry(RecoveryIdArgs),
}

#[derive(Debug, Subcommand)]
pub enum SuppressionsCommand {
    /// List suppressed addresses, newest first.
    List(SuppressionsListArgs),
    /// Suppress an address: no follow-up or digest email goes to it.
    Add(SuppressionAddArgs),
    /// Take an address off the list; later follow-ups are sent to it again.
    Remove(SuppressionRemoveArgs),
    /// Show an address's suppression (reason, source) and its bounces and complaints.
    Show(SuppressionRemoveArgs),
}

#[derive(Debug, Subcommand)]
pub enum BouncesCommand {
    /// Read bounce emails (delivery status notifications, complaint reports) from
    /// Maildir directories, mbox files or single .eml files and record what they
    /// report: a permanent bounce or a complaint suppresses the address.
    Ingest(BouncesIngestArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeliverabilityCommand {
    /// Per rule and overall, over the last day and 7 days: sent, bounced, complained,
    /// the complaint rate; and the paused rules.
    Show(DeliverabilityShowArgs),
    /// Resume a marketing rule that paused itself for its complaint rate.
    Resume(DeliverabilityResumeArgs),
}

#[derive(Debug, Args)]
pub struct DeliverabilityShowArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct DeliverabilityResumeArgs {
    /// The rule's name, as `deliverability show` lists it.
    pub rule: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct BouncesIngestArgs {
    /// Maildir directories, mbox files or .eml files.
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct RecoveryListArgs {
    /// Only this connection.
    #[arg(long)]
    pub connection: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct RecoveryIdArgs {
    /// The id, as the matching `list` shows it.
    pub id: i64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct SuppressionsListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct SuppressionAddArgs {
    /// The email address.
    pub address: String,
    /// Why, kept as the suppression's source (default: "dealsync suppressions add").
    #[arg(long)]
    pub note: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct SuppressionRemoveArgs {
    /// The email address.
    pub address: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Start of the period: a date (`2026-01-01`, UTC midnight) or an RFC 3339 time.
    /// Default: 30 days before --until.
    #[arg(long, value_parser = crate::domain::parse_instant)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// End of the period (exclusive) and the "now" of open and stalled figures. Default: now.
    #[arg(long, value_parser = crate::domain::parse_instant)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only this canonical pipeline.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Only this connection.
    #[arg(long)]
    pub connection: Option<String>,
    /// Fewest deals in a stage's cohort for its conversion to name the bottleneck.
    #[arg(long, default_value_t = crate::report::DEFAULT_MIN_COHORT)]
    pub min_cohort: u64,
    /// Tables also show each connection's own figures (JSON always has them).
    #[arg(long)]
    pub by_connection: bool,
    /// The table CSV output carries.
    #[arg(long, value_enum, default_value = "stages")]
    pub section: crate::report::render::Section,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List outbox rows, latest due first.
    List(OutboxListArgs),
    /// Print the exact email (headers included) that RULE sends for DEAL.
    Preview(OutboxPreviewArgs),
    /// List daily digests (one row per rule, day and recipient), newest day first.
    Digests(OutboxDigestsArgs),
    /// Send a failed email again: back to pending, due now; the daemon sends it once.
    Retry(RecoveryIdArgs),
}

#[derive(Debug, Args)]
pub struct OutboxDigestsArgs {
    /// Only this digest rule.
    #[arg(long)]
    pub rule: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct OutboxListArgs {
    /// Only rows in this state: pending, sending, sent, failed, skipped, uncertain or done.
    #[arg(long, value_parser = parse_outbox_state)]
    pub state: Option<crate::store::OutboxState>,
    /// Only this follow-up rule (`NAME`, or `NAME@stage` for a multi-stage rule).
    #[arg(long)]
    pub rule: Option<String>,
    /// Only this deal's rows (its id, as `deals list` shows it).
    #[arg(long)]
    pub deal: Option<i64>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct OutboxPreviewArgs {
    /// The rule's name (as `outbox list` shows it).
    pub rule: String,
    /// The deal's id (as `deals list` shows it).
    pub deal: i64,
    /// Which step, 1-based (default: the deal's next pending step, else the first).
    #[arg(long)]
    pub step: Option<usize>,
}

fn parse_outbox_state(text: &str) -> Result<crate::store::OutboxState, String> {
    crate::store::OutboxState::parse(text)
        .ok_or_else(|| "expected pending, sending, sent, failed, skipped, uncertain or done".into())
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Ignore the cursor and read everything.
    #[arg(long)]
    pub full: bool,
    /// Only this connection (default: every enabled polling connection).
    pub connection: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuthArgs {
    /// The connection to authorize (it needs an `[connections.NAME.oauth]` table).
    pub connection: String,
    /// Loopback port for the redirect (register http://127.0.0.1:PORT/callback with
    /// the vendor); 0 picks a free one.
    #[arg(long, default_value_t = 8976)]
    pub port: u16,
    /// How long to wait for the browser to come back.
    #[arg(long, default_value = "5m", value_parser = config::duration::parse)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum DealsCommand {
    /// List deals, newest activity first.
    List(ListArgs),
    /// One deal: its source record, stage history, emails, and each follow-up rule's
    /// decision today with its reason.
    Show(ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum PeopleCommand {
    /// One person, in every connection: their deals, carts, emails and suppressions.
    Show(PersonShowArgs),
}

#[derive(Debug, Args)]
pub struct PersonShowArgs {
    /// Any of the person's addresses (case, surrounding spaces and, where the domain
    /// ignores it, a +tag do not matter).
    pub email: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The deal's id (as `deals list` shows it).
    pub id: i64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::output::ViewFormat,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this connection.
    #[arg(long)]
    pub connection: Option<String>,
    /// Only this canonical pipeline.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Only this canonical stage (its key, as `stages` shows it), or `unmapped`.
    #[arg(long)]
    pub stage: Option<String>,
    /// Only deals with this status: open, won, lost, unmapped or deleted.
    #[arg(long, value_parser = parse_status)]
    pub status: Option<DealStatus>,
    /// Only the deals of the person with this address, in any connection.
    #[arg(long, value_name = "EMAIL")]
    pub person: Option<String>,
    /// Only the deals of the company with this domain (e.g. acme.example).
    #[arg(long, value_name = "DOMAIN")]
    pub company: Option<String>,
    /// At most this many deals.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

fn parse_status(text: &str) -> Result<DealStatus, String> {
    DealStatus::parse(text).ok_or_else(|| "expected open, won, lost, unmapped or deleted".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every command, with the path of commands that leads to it.
    fn arguments(command: &clap::Command, path: &str, found: &mut Vec<(String, clap::Arg)>) {
        for arg in command.get_arguments() {
            found.push((path.to_owned(), arg.clone()));
        }
        for sub in command.get_subcommands() {
            arguments(sub, &format!("{path} {}", sub.get_name()), found);
        }
    }

    #[test]
    fn every_flag_and_argument_has_help_text_and_global_flags_have_their_own_heading() {
        let mut command = Cli::command();
        command.build();
        let mut found = Vec::new();
        arguments(&command, "dealsync", &mut found);
        let missing: Vec<String> = found
            .iter()
            .filter(|(_, arg)| arg.get_help().is_none() && arg.get_long_help().is_none())
            .map(|(path, arg)| format!("{path} {}", arg.get_id()))
            .collect();
        assert!(missing.is_empty(), "no help text: {missing:?}");
        for global in ["config", "log_format", "log_level"] {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == global)
                .expect("a global flag");
            assert_eq!(arg.get_help_heading(), Some(GLOBAL), "{global}");
        }
    }
}
