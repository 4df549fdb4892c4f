//! The command line: one function per subcommand, and `dispatch`, which picks it.
//!
//! Layout, each part below the ones that use it: `args` holds the clap types,
//! `context` what every command starts from (config source, loading, the store, the
//! connections, `CliError`), `ops` the operator commands (`deals show` and recovery),
//! `migrate_store` the copy of a SQLite install into PostgreSQL, `people` the person
//! view across connections.
//! This file holds `dispatch` and the other commands.

use crate::app::App;
use crate::config::{self, Config, ConfigError};
use crate::domain::UNMAPPED;
use crate::ingest::{ConnectionRuntime, SyncDeps};
use crate::output::{self, Format, Rows, print_list, time};
use crate::store::{DealFilter, Store};
use crate::sync::{self, RunSummary};
use crate::telemetry::Metrics;
use clap::CommandFactory;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

mod args;
mod bounces;
mod context;
mod migrate_store;
pub mod ops;
mod people;

pub use args::*;
pub use context::{CliError, ConfigSource, EXIT_ENVIRONMENT};
use context::{load, open_store, runtimes};

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let source = ConfigSource {
        path: cli.config,
        credentials_dir: cli.credentials_dir,
    };
    let source = &source;
    match cli.command {
        Command::Run => run(source).await,
        Command::Check(args) => check(source, args).await,
        Command::Stages => stages(source).await,
        Command::Sync(args) => sync_now(source, args).await,
        Command::Auth(args) => authorize(source, args).await,
        Command::Deals(DealsCommand::List(args)) => deals_list(source, args).await,
        Command::Deals(DealsCommand::Show(args)) => {
            ops::deals_show(source, args.id, args.format).await
        }
        Command::People(PeopleCommand::Show(args)) => {
            people::people_show(source, args.email, args.format).await
        }
        Command::Report(args) => report(source, args).await,
        Command::Outbox(OutboxCommand::List(args)) => outbox_list(source, args).await,
        Command::Outbox(OutboxCommand::Preview(args)) => outbox_preview(source, args).await,
        Command::Outbox(OutboxCommand::Digests(args)) => outbox_digests(source, args).await,
        Command::Outbox(OutboxCommand::Retry(args)) => {
            ops::outbox_retry(source, args.id, args.format).await
        }
        Command::Inbox(InboxCommand::DeadLetters(command)) => match command {
            DeadLettersCommand::List(args) => ops::dead_letters_list(source, args).await,
            DeadLettersCommand::Show(args) => {
                ops::dead_letter_show(source, args.id, args.format).await
            }
            DeadLettersCommand::Replay(args) => {
                ops::dead_letter_replay(source, args.id, args.format).await
            }
        },
        Command::Quarantine(command) => match command {
            QuarantineCommand::List(args) => ops::quarantine_list(source, args).await,
            QuarantineCommand::Show(args) => {
                ops::quarantine_show(source, args.id, args.format).await
            }
            QuarantineCommand::Retry(args) => {
                ops::quarantine_retry(source, args.id, args.format).await
            }
        },
        Command::Suppressions(command) => match command {
            SuppressionsCommand::List(args) => ops::suppressions_list(source, args).await,
            SuppressionsCommand::Add(args) => ops::suppressions_add(source, args).await,
            SuppressionsCommand::Remove(args) => ops::suppressions_remove(source, args).await,
            SuppressionsCommand::Show(args) => ops::suppressions_show(source, args).await,
        },
        Command::Bounces(BouncesCommand::Ingest(args)) => bounces::ingest(source, args).await,
        Command::Deliverability(DeliverabilityCommand::Show(args)) => {
            bounces::show(source, args).await
        }
        Command::Deliverability(DeliverabilityCommand::Resume(args)) => {
            bounces::resume(source, args).await
        }
        Command::MigrateStore(args) => migrate_store::migrate_store(source, args).await,
        Command::Completions(args) => {
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "dealsync", &mut script);
            output::print(&String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .map_err(anyhow::Error::from)?;
            output::print(&String::from_utf8_lossy(&page));
            Ok(())
        }
    }
}

async fn run(source: &ConfigSource) -> Result<(), CliError> {
    let config = load(source).await?;
    let app = App::build(config).await?;
    let shutdown = CancellationToken::new();
    crate::shutdown::spawn_signal_handlers(shutdown.clone(), app.reloader());
    app.run(shutdown).await.map_err(anyhow::Error::from)?;
    Ok(())
}

async fn check(source: &ConfigSource, args: CheckArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    // Problems of the environment: the config is valid, what it points at is not.
    let mut unavailable: Vec<String> = Vec::new();
    let mut storage_line = None;
    let store = if let Some(url) = &config.storage.url {
        // PostgreSQL: reached and read, nothing applied; no store query runs on it yet.
        config.require_credentials(|key| key == "storage.url")?;
        match check_postgres(url).await {
            Ok(line) => storage_line = Some(line),
            Err(problem) => unavailable.push(problem),
        }
        None
    } else {
        let storage = config.storage.path.clone();
        let writable = tokio::task::spawn_blocking(move || crate::store::check_writable(&storage))
            .await
            .map_err(anyhow::Error::from)?;
        match writable {
            Err(error) => {
                unavailable.push(error.to_string());
                None
            }
            Ok(()) => {
                storage_line = Some(format!(
                    "storage {}: writable\n",
                    config.storage.path.display()
                ));
                if config.storage.path.exists() {
                    Some(open_store(&config).await?)
                } else {
                    None
                }
            }
        }
    };
    let runtimes = runtimes(&config, store.as_ref()).await?;
    let mut out = format!("config {}: ok\n", config.path.display());
    for pipeline in config.pipelines.iter() {
        out.push_str(&format!(
            "pipeline {}: {} stages\n",
            pipeline.key,
            pipeline.stages.len()
        ));
    }
    for connection in &config.connections {
        let state = if connection.enabled {
            "enabled"
        } else {
            "disabled"
        };
        out.push_str(&format!(
            "connection {} ({}): {state}\n",
            connection.name, connection.connector
        ));
    }
    if let Some(line) = storage_line {
        out.push_str(&line);
    }
    let stored_unmapped = match &store {
        Some(store) => store.unmapped_stages(None).await?,
        None => Vec::new(),
    };
    let (warnings, undiscovered) = mapping_warnings(&config, &runtimes, &stored_unmapped);
    let problems = crate::followup::preflight(&config);
    if !problems.is_empty() {
        return Err(CliError::Config(ConfigError::at(
            &config,
            "followups",
            problems.join("\n  "),
        )));
    }
    for rule in &config.followups {
        out.push_str(&format!(
            "follow-up {}: {} step(s) after entering {}, {} email to {}; templates render\n",
            rule.name,
            rule.steps.len(),
            crate::followup::policy::describe(&rule.trigger),
            rule.kind.as_str(),
            rule.to
        ));
    }
    if let Some(store) = &store {
        for runtime in &runtimes {
            let groups = store.native_stage_groups(runtime.name()).await?;
            let applied = store.applied_stage_map(runtime.name()).await?;
            let plan = crate::ingest::plan_remap(runtime, &groups, applied.as_deref());
            if plan.moves.is_empty() {
                continue;
            }
            out.push_str(&format!(
                "stage mapping change: connection {} will move {} deals when the daemon next starts or reloads\n",
                runtime.name(),
                plan.deals()
            ));
            for change in &plan.moves {
                out.push_str(&format!(
                    "  {} deals in native stage \"{}\" / \"{}\": {} → {}\n",
                    change.deals,
                    change.native_pipeline,
                    change.native_stage,
                    crate::followup::policy::describe(&change.from),
                    crate::followup::policy::describe(&change.to)
                ));
            }
        }
    }
    for line in owner_email_warnings(&config, &runtimes) {
        out.push_str(&format!("  warning: {line}\n"));
    }
    if !config.unavailable.is_empty() {
        // Not a failure: the service reads them; this environment cannot.
        out.push_str(&format!(
            "credentials: {} not available here, so not checked (the service reads them from $CREDENTIALS_DIRECTORY; --credentials-dir DIR checks them here)\n",
            config.unavailable.len()
        ));
        for unavailable in &config.unavailable {
            out.push_str(&format!(
                "  note: {}: ${{credential:{}}}: {}\n",
                unavailable.key, unavailable.credential, unavailable.reason
            ));
        }
    }
    if !undiscovered.is_empty() {
        out.push_str(&format!(
            "stage mappings: no stages discovered yet for {} (nothing read so far: `dealsync sync` or the running daemon discovers them; this check then compares the mappings with them)\n",
            undiscovered.join(", ")
        ));
    }
    if warnings.is_empty() {
        let with_stages = runtimes
            .iter()
            .filter(|runtime| runtime.connector.carries_deals())
            .count();
        if undiscovered.len() < with_stages {
            out.push_str("stage mappings: every discovered native stage is mapped\n");
        }
    } else {
        out.push_str(&format!(
            "stage mappings: {} warning(s) (deals in an unmapped stage are kept as \"{UNMAPPED}\"; map them under [connections.NAME.stage_map])\n",
            warnings.len()
        ));
        for line in warnings {
            out.push_str(&format!("  warning: {line}\n"));
        }
    }
    if args.online {
        out.push_str("online checks:\n");
        for (ok, line) in check_online(&config, &runtimes, store.as_ref()).await {
            if ok {
                out.push_str(&format!("  {line}\n"));
            } else {
                out.push_str(&format!("  FAILED {line}\n"));
                unavailable.push(line);
            }
        }
    }
    // Paths and addresses come from the config, which may have put a secret in them.
    output::print(&config.substituted.scrub(&out));
    let unavailable = unavailable
        .iter()
        .map(|line| config.substituted.scrub(line).into_owned())
        .collect::<Vec<_>>();
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(CliError::Environment(unavailable))
    }
}

/// `check` of a PostgreSQL `storage.url`: connects (one connection), applies nothing,
/// and says what the database holds of dealsync's schema. `Err` is the problem that
/// makes the environment unusable: the server cannot be reached or refuses the user,
/// or the schema is newer than this binary's. Neither names the password.
async fn check_postgres(url: &config::PostgresUrl) -> Result<String, String> {
    use crate::store::postgres::{Database, Options, SchemaState};
    let options = Options {
        max_connections: 1,
        ..Options::default()
    };
    let database = Database::connect(url, &options)
        .await
        .map_err(|error| crate::telemetry::error_chain(&error))?;
    let state = database
        .schema_state()
        .await
        .map_err(|error| crate::telemetry::error_chain(&error))?;
    let line = format!("storage PostgreSQL {url}: reachable, {state}");
    match state {
        SchemaState::Newer { .. } => Err(format!(
            "{line}; point storage.url at another database or upgrade dealsync (nothing was changed)"
        )),
        SchemaState::Absent | SchemaState::Current(_) | SchemaState::Older { .. } => {
            Ok(format!("{line}\n"))
        }
    }
}

/// The stage-mapping warnings of `check`, each native stage named once, and the
/// connections for which nothing has been discovered yet.
fn mapping_warnings(
    config: &Config,
    runtimes: &[Arc<ConnectionRuntime>],
    stored_unmapped: &[crate::store::UnmappedStage],
) -> (Vec<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut undiscovered = Vec::new();
    for runtime in runtimes {
        let name = runtime.name();
        let map = runtime.stage_map();
        let stored: Vec<&crate::store::UnmappedStage> = stored_unmapped
            .iter()
            .filter(|stage| stage.connection == name)
            .collect();
        if map.native().is_empty() && stored.is_empty() && runtime.connector.carries_deals() {
            undiscovered.push(name.to_owned());
        }
        // Deals kept as unmapped, by the discovered stage they sit in (when known).
        let deals_in = |pipeline: &str, stage: &str| -> u64 {
            stored
                .iter()
                .filter(|kept| {
                    map.find_native(&kept.native_pipeline, &kept.native_stage)
                        .is_some_and(|(p, s)| p.id == pipeline && s.id == stage)
                })
                .map(|kept| kept.deals)
                .sum()
        };
        for (pipeline, stage) in map.unmapped_native() {
            let deals = deals_in(&pipeline.id, &stage.id);
            let kept = if deals > 0 {
                format!(" ({deals} deal(s) kept as unmapped)")
            } else {
                String::new()
            };
            warnings.push(format!(
                "{name}: native stage \"{}\" / \"{}\" has no mapping{kept}",
                pipeline.label, stage.label
            ));
        }
        for kept in stored {
            // Named above when discovery knows the stage.
            if map
                .find_native(&kept.native_pipeline, &kept.native_stage)
                .is_some()
            {
                continue;
            }
            if map
                .resolve(&kept.native_pipeline, &kept.native_stage)
                .is_unmapped()
            {
                warnings.push(format!(
                    "{name}: {} deal(s) in unmapped native stage \"{}\" / \"{}\"",
                    kept.deals, kept.native_pipeline, kept.native_stage
                ));
            }
        }
        let overrides = config
            .connections
            .iter()
            .find(|c| c.name.as_str() == name)
            .map(|c| c.stage_map.as_slice())
            .unwrap_or_default();
        for unmatched in map.unmatched_entries() {
            let entry = unmatched.entry;
            let message = if unmatched.pipeline_missing {
                format!(
                    "native pipeline {:?} is not one this connection has (discovered: {})",
                    entry.native_pipeline,
                    unmatched.known.join(", ")
                )
            } else {
                format!(
                    "native stage {:?} matches no stage of {:?} (discovered: {})",
                    entry.native_stage,
                    entry.native_pipeline,
                    unmatched.known.join(", ")
                )
            };
            let located = overrides
                .iter()
                .find(|o| {
                    o.native_pipeline == entry.native_pipeline
                        && o.native_stage == entry.native_stage
                })
                .map(|o| ConfigError::at(config, o.key(name), message.clone()));
            match located.as_ref().and_then(|error| error.problems().first()) {
                Some(problem) => warnings.push(problem.to_string()),
                None => warnings.push(format!("{name}: {message}")),
            }
        }
    }
    (warnings, undiscovered)
}

/// `check --online`: each line with whether it passed.
async fn check_online(
    config: &Config,
    runtimes: &[Arc<ConnectionRuntime>],
    store: Option<&Store>,
) -> Vec<(bool, String)> {
    const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
    let mut lines = Vec::new();
    let listen = config.server.listen;
    match std::net::TcpListener::bind(listen) {
        Ok(listener) => {
            drop(listener);
            lines.push((true, format!("listen {listen}: free")));
        }
        Err(error) => lines.push((
            false,
            format!(
                "listen {listen}: {error} (is dealsync already running? change server.listen otherwise)"
            ),
        )),
    }
    let metrics = Arc::new(Metrics::new());
    for runtime in runtimes {
        let what = format!(
            "connection {} ({})",
            runtime.name(),
            runtime.connector.kind()
        );
        if !runtime.connector.polls() {
            lines.push((
                true,
                format!("{what}: receives webhooks only; nothing to connect to"),
            ));
            continue;
        }
        let cx = crate::connectors::SyncContext {
            connection: runtime.config.name.clone(),
            shutdown: CancellationToken::new(),
            metrics: metrics.clone(),
            handles: store.map(crate::connectors::StoreHandles::of),
            attention: None,
            max_attempts: Some(1),
        };
        match tokio::time::timeout(PROBE_TIMEOUT, runtime.connector.probe(&cx)).await {
            Ok(Ok(seen)) => lines.push((true, format!("{what}: ok, {seen}"))),
            Ok(Err(error)) => lines.push((
                false,
                format!("{what}: {}", crate::telemetry::error_chain(&error)),
            )),
            Err(_) => lines.push((
                false,
                format!("{what}: no answer within {}s", PROBE_TIMEOUT.as_secs()),
            )),
        }
    }
    let email = &config.email;
    let target = match &email.transport {
        config::EmailTransport::File { dir } => {
            format!("email (file transport, {})", dir.display())
        }
        // The URL may carry credentials: only its scheme, host and port are shown.
        config::EmailTransport::Smtp { url } => match url::Url::parse(url.expose()) {
            Ok(parsed) => format!(
                "email {}://{}{}",
                parsed.scheme(),
                parsed.host_str().unwrap_or("?"),
                parsed
                    .port()
                    .map_or_else(String::new, |port| format!(":{port}"))
            ),
            Err(_) => "email (smtp)".to_owned(),
        },
    };
    match crate::followup::mailer::Mailer::new(email) {
        Err(error) => lines.push((false, format!("{target}: {error}"))),
        Ok(mailer) => match tokio::time::timeout(PROBE_TIMEOUT, mailer.test_connection()).await {
            Ok(Ok(seen)) => lines.push((true, format!("{target}: ok, {seen}"))),
            Ok(Err(error)) => lines.push((false, format!("{target}: {error}"))),
            Err(_) => lines.push((
                false,
                format!("{target}: no answer within {}s", PROBE_TIMEOUT.as_secs()),
            )),
        },
    }
    lines
}

/// A warning per (rule sending to the owner, connection feeding its pipeline whose
/// connector gives no owner email): every such deal would be declined with "the deal
/// has no owner email address".
fn owner_email_warnings(config: &Config, runtimes: &[Arc<ConnectionRuntime>]) -> Vec<String> {
    use crate::followup::digest::DigestRecipient;
    use crate::followup::rules::Recipient;
    let mut owner_rules: Vec<(String, Vec<Option<crate::domain::PipelineKey>>)> = config
        .followups
        .iter()
        .filter(|rule| rule.to == Recipient::Owner)
        .map(|rule| (rule.name.clone(), vec![rule.trigger.pipeline.clone()]))
        .collect();
    owner_rules.extend(
        config
            .digests
            .iter()
            .filter(|rule| rule.to == DigestRecipient::Owner)
            .map(|rule| {
                let pipelines = rule.stages.iter().map(|s| s.stage.pipeline.clone());
                (rule.name.clone(), pipelines.collect())
            }),
    );
    let mut warnings = Vec::new();
    for (rule, pipelines) in &owner_rules {
        for runtime in runtimes {
            let feeds = runtime
                .default_pipeline()
                .is_some_and(|pipeline| pipelines.contains(&Some(pipeline)));
            if feeds && !runtime.connector.gives_owner_email() {
                warnings.push(format!(
                    "follow-up {rule} sends to the owner, but connection {} ({}) gives no owner email: its deals will be skipped (\"the deal has no owner email address\"); send to a fixed address, or map `owner_email` in the connector's manifest",
                    runtime.name(),
                    runtime.connector.kind()
                ));
            }
        }
    }
    warnings
}

async fn stages(source: &ConfigSource) -> Result<(), CliError> {
    let config = load(source).await?;
    // A SQLite file not made yet has nothing to show; a PostgreSQL database is read.
    let store = if config.storage.url.is_some() || config.storage.path.exists() {
        Some(open_store(&config).await?)
    } else {
        None
    };
    let mut canonical = Rows::new(vec![
        "pipeline",
        "#",
        "stage",
        "label",
        "kind",
        "probability",
        "stall_after",
        "description",
    ]);
    for pipeline in config.pipelines.iter() {
        for (at, stage) in pipeline.stages.iter().enumerate() {
            canonical.push(vec![
                pipeline.key.to_string(),
                (at + 1).to_string(),
                stage.key.to_string(),
                stage.label.clone(),
                format!("{:?}", stage.kind).to_lowercase(),
                format!("{}%", stage.probability),
                stage
                    .stall_after
                    .map(config::duration::format)
                    .unwrap_or_else(|| "-".into()),
                stage.description.clone(),
            ]);
        }
    }
    let mut out = String::from("Canonical pipelines\n\n");
    out.push_str(&canonical.render(Format::Table));
    for runtime in runtimes(&config, store.as_ref()).await? {
        let map = runtime.stage_map();
        let mut rows = Rows::new(vec!["native pipeline", "native stage", "canonical", "from"]);
        let source =
            |entry: &crate::pipeline::StageMapEntry| format!("{:?}", entry.source).to_lowercase();
        // Each entry is listed once: beside the discovered stages it maps, else alone.
        let mut used = vec![false; map.entries().len()];
        let position = |entry: &crate::pipeline::StageMapEntry| {
            map.entries().iter().position(|e| std::ptr::eq(e, entry))
        };
        for pipeline in map.native() {
            for stage in &pipeline.stages {
                let entry = map.entry_for(&pipeline.id, &stage.id);
                if let Some(at) = entry.and_then(position) {
                    used[at] = true;
                }
                rows.push(vec![
                    pipeline.label.clone(),
                    stage.label.clone(),
                    entry.map_or_else(|| UNMAPPED.to_owned(), |e| describe(&e.target)),
                    entry.map_or_else(|| "-".to_owned(), source),
                ]);
            }
        }
        let discovered = !map.native().is_empty();
        for (at, entry) in map.entries().iter().enumerate() {
            if used[at] {
                continue;
            }
            let from = if discovered && entry.source == crate::pipeline::MappingSource::Config {
                format!("{} (matches no discovered stage)", source(entry))
            } else {
                source(entry)
            };
            rows.push(vec![
                entry.native_pipeline.clone(),
                entry.native_stage.clone(),
                describe(&entry.target),
                from,
            ]);
        }
        out.push_str(&format!(
            "\nConnection {} ({})\n\n",
            runtime.name(),
            runtime.connector.kind()
        ));
        if rows.rows.is_empty() {
            out.push_str("no mappings and no discovered stages yet (run `dealsync sync`)\n");
        } else {
            out.push_str(&rows.render(Format::Table));
        }
    }
    output::print(&out);
    Ok(())
}

fn describe(target: &crate::domain::StageRef) -> String {
    match &target.pipeline {
        Some(pipeline) => format!("{pipeline}.{}", target.stage),
        None => UNMAPPED.to_owned(),
    }
}

async fn sync_now(source: &ConfigSource, args: SyncArgs) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let config = load(source).await?;
    let store = open_store(&config).await?;
    let runtimes = runtimes(&config, Some(&store)).await?;
    let named: Vec<_> = runtimes
        .into_iter()
        .filter(|r| {
            args.connection
                .as_deref()
                .is_none_or(|name| r.name() == name)
        })
        .collect();
    if let Some(name) = &args.connection {
        let Some(runtime) = named.first() else {
            let enabled: Vec<String> = config
                .connections
                .iter()
                .filter(|c| c.enabled)
                .map(|c| c.name.to_string())
                .collect();
            return Err(CliError::Usage(format!(
                "no enabled connection named {name:?} in {} (enabled: {})",
                config.path.display(),
                enabled.join(", ")
            )));
        };
        // Nothing to read, so no run is recorded: the status page keeps showing the
        // connection as it was.
        if !runtime.connector.polls() {
            output::print(&format!(
                "connection {name} ({}) receives webhooks only: there is nothing to pull; deals arrive at POST /webhooks/{name}\n",
                runtime.connector.kind()
            ));
            return Ok(());
        }
    }
    let selected: Vec<_> = named.into_iter().filter(|r| r.connector.polls()).collect();
    for runtime in &selected {
        config.require_connection_credentials(runtime.name())?;
    }
    let deps = SyncDeps {
        store: store.clone(),
        metrics: Arc::new(Metrics::new()),
        attention: None,
    };
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shutdown.cancel();
            }
        });
    }
    let terminal = std::io::stderr().is_terminal();
    let mut failed = 0;
    let mut rows = Rows::new(vec![
        "connection",
        "fetched",
        "created",
        "updated",
        "stage changes",
        "unmapped",
        "quarantined",
        "requests",
        "429s",
        "elapsed",
    ]);
    for runtime in selected {
        let name = runtime.name().to_owned();
        for store_connection in [&runtime] {
            store
                .ensure_connection(store_connection.name(), store_connection.connector.kind())
                .await?;
        }
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                    .expect("static template is valid"),
            );
            bar.set_prefix(name.clone());
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        let progress = |summary: &RunSummary| {
            let message = format!(
                "{} fetched, {} created, {} updated, {} stage changes",
                summary.fetched, summary.created, summary.updated, summary.stage_changes
            );
            match &bar {
                Some(bar) => bar.set_message(message),
                None => tracing::info!(connection = %name, pages = summary.pages, "{message}"),
            }
        };
        let result = sync::run_once(&runtime, &deps, args.full, &shutdown, &progress).await;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        match result {
            Ok(s) => rows.push(vec![
                name.clone(),
                s.fetched.to_string(),
                s.created.to_string(),
                s.updated.to_string(),
                s.stage_changes.to_string(),
                s.unmapped.to_string(),
                s.quarantined.to_string(),
                s.requests.to_string(),
                s.rate_limited.to_string(),
                format!("{:.1}s", s.elapsed_ms as f64 / 1000.0),
            ]),
            Err(error) => {
                failed += 1;
                tracing::error!(connection = %name, %error, "sync failed");
                rows.push(vec![name.clone(), format!("failed: {error}")]);
            }
        }
    }
    output::print(&rows.render(Format::Table));
    if failed > 0 {
        return Err(CliError::Other(anyhow::anyhow!(
            "{failed} connection(s) failed to sync"
        )));
    }
    Ok(())
}

async fn authorize(source: &ConfigSource, args: AuthArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    let Some(connection) = config
        .connections
        .iter()
        .find(|c| c.name.as_str() == args.connection)
    else {
        return Err(CliError::Usage(format!(
            "no connection named {:?} in {}",
            args.connection,
            config.path.display()
        )));
    };
    config.require_connection_credentials(connection.name.as_str())?;
    let catalog = crate::connectors::Registry::catalog(&config)?;
    let Some(manifest) = catalog.get(&connection.connector) else {
        return Err(CliError::Usage(format!(
            "connector {:?} of connection {} has no OAuth2 flow",
            connection.connector, connection.name
        )));
    };
    let store = open_store(&config).await?;
    store
        .ensure_connection(connection.name.as_str(), &connection.connector)
        .await?;
    let announce = |text: &str| output::print(&format!("{text}\n"));
    crate::connectors::manifest::auth::authorize(
        &manifest,
        connection,
        &store,
        args.port,
        args.timeout,
        &announce,
    )
    .await
    .map_err(|error| CliError::Other(error.into()))?;
    output::print(&format!(
        "connection {}: authorized; tokens stored\n",
        connection.name
    ));
    Ok(())
}

/// Refuses a filter value that can match nothing, listing the values that can: a
/// typo would otherwise print an empty list and exit 0.
fn one_of(what: &str, value: Option<&str>, known: &[String]) -> Result<(), CliError> {
    match value {
        Some(value) if !known.iter().any(|k| k == value) => Err(CliError::Usage(format!(
            "no {what} {value:?} (known: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ))),
        _ => Ok(()),
    }
}

fn connection_names(config: &Config) -> Vec<String> {
    config
        .connections
        .iter()
        .map(|c| c.name.to_string())
        .collect()
}

async fn deals_list(source: &ConfigSource, args: ListArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    one_of(
        "connection",
        args.connection.as_deref(),
        &connection_names(&config),
    )?;
    let pipelines: Vec<String> = config.pipelines.iter().map(|p| p.key.to_string()).collect();
    one_of("pipeline", args.pipeline.as_deref(), &pipelines)?;
    let mut stages: Vec<String> = config
        .pipelines
        .iter()
        .filter(|p| {
            args.pipeline
                .as_deref()
                .is_none_or(|key| p.key.as_str() == key)
        })
        .flat_map(|p| p.stages.iter().map(|s| s.key.to_string()))
        .collect();
    stages.push(UNMAPPED.to_owned());
    stages.dedup();
    let scope = match &args.pipeline {
        Some(pipeline) => format!("stage in pipeline {pipeline}"),
        None => "stage".to_owned(),
    };
    one_of(&scope, args.stage.as_deref(), &stages)?;
    if let Some(person) = &args.person
        && crate::domain::people::person_key(person).is_none()
    {
        return Err(CliError::Usage(format!(
            "--person: expected an email address, got {person:?}"
        )));
    }
    if let Some(company) = &args.company
        && crate::domain::people::company_domain(company).is_none()
    {
        return Err(CliError::Usage(format!(
            "--company: expected a company's domain such as acme.example (free-mail domains \
             like gmail.com link no company), got {company:?}"
        )));
    }
    let store = open_store(&config).await?;
    let deals = store
        .deals(DealFilter {
            connection: args.connection,
            pipeline: args.pipeline,
            stage: args.stage,
            status: args.status,
            person: args.person,
            company: args.company,
            limit: Some(args.limit),
            offset: None,
        })
        .await?;
    print_list(
        args.format,
        &deals,
        |deals| output::to_json(&deals),
        vec![
            "id",
            "connection",
            "external_id",
            "title",
            "amount",
            "currency",
            "pipeline",
            "stage",
            "status",
            "native_stage",
            "contact",
            "in_stage_since",
        ],
        |deal| {
            vec![
                deal.id.to_string(),
                deal.connection.to_string(),
                deal.external_id.to_string(),
                deal.title.clone(),
                deal.amount()
                    .map(|m| m.to_decimal_string())
                    .unwrap_or_default(),
                deal.currency.map(|c| c.to_string()).unwrap_or_default(),
                deal.pipeline
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                deal.stage.to_string(),
                deal.status.to_string(),
                deal.native_stage.clone(),
                deal.contact_email
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                time(deal.stage_entered_at),
            ]
        },
    );
    Ok(())
}

async fn report(source: &ConfigSource, args: ReportArgs) -> Result<(), CliError> {
    use crate::report::{ReportOptions, render};
    let config = load(source).await?;
    let until = args.until.unwrap_or_else(chrono::Utc::now);
    let since = args
        .since
        .unwrap_or_else(|| until - chrono::Duration::days(30));
    if since >= until {
        return Err(CliError::Usage(format!(
            "--since ({since}) must be before --until ({until})"
        )));
    }
    if let Some(pipeline) = &args.pipeline
        && config.pipelines.get(pipeline).is_none()
    {
        let known: Vec<String> = config.pipelines.iter().map(|p| p.key.to_string()).collect();
        return Err(CliError::Usage(format!(
            "no pipeline {pipeline:?} (known: {})",
            known.join(", ")
        )));
    }
    if let Some(connection) = &args.connection
        && !config
            .connections
            .iter()
            .any(|c| c.name.as_str() == connection)
    {
        let known: Vec<String> = config
            .connections
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        return Err(CliError::Usage(format!(
            "no connection {connection:?} in {} (known: {})",
            config.path.display(),
            known.join(", ")
        )));
    }
    let store = open_store(&config).await?;
    let options = ReportOptions {
        since,
        until,
        pipeline: args.pipeline,
        connection: args.connection,
        min_cohort: args.min_cohort,
        ..ReportOptions::last_days(until, 30)
    };
    let report = store.report(config.pipelines.clone(), options).await?;
    let text = match args.format {
        Format::Json => {
            // The report's own fields, plus the follow-ups' reputation figures.
            let mut value = serde_json::to_value(&report).map_err(anyhow::Error::from)?;
            if let serde_json::Value::Object(fields) = &mut value {
                let figures = store.delivery_figures(chrono::Utc::now()).await?;
                fields.insert(
                    "deliverability".to_owned(),
                    serde_json::to_value(figures).map_err(anyhow::Error::from)?,
                );
            }
            output::to_json(&value)
        }
        Format::Csv => render::csv(&report, args.section),
        Format::Table => {
            // The reputation figures of the follow-ups, as `deliverability show` has them.
            let figures = store.delivery_figures(chrono::Utc::now()).await?;
            format!(
                "{}\nDeliverability (follow-up emails, last 1d and 7d)\n{}",
                render::table(&report, args.by_connection),
                bounces::figures_table(&figures)
            )
        }
    };
    output::print(&text);
    Ok(())
}

async fn outbox_list(source: &ConfigSource, args: OutboxListArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    let store = open_store(&config).await?;
    if args.rule.is_some() {
        // The rules in force, and those of rows kept from rules since removed.
        let mut rules: Vec<String> = config.followups.iter().map(|r| r.name.clone()).collect();
        for stored in store.outbox_rules().await? {
            if !rules.contains(&stored) {
                rules.push(stored);
            }
        }
        one_of("follow-up rule", args.rule.as_deref(), &rules)?;
    }
    let rows = store
        .outbox(crate::store::OutboxRowFilter {
            state: args.state,
            rule: args.rule,
            deal_id: args.deal,
            limit: Some(args.limit),
        })
        .await?;
    print_list(
        args.format,
        &rows,
        |rows| output::to_json(&rows),
        vec![
            "id",
            "deal",
            "rule",
            "step",
            "action",
            "recipient",
            "state",
            "due",
            "attempts",
            "sent",
            "reason",
        ],
        |row| {
            vec![
                row.id.to_string(),
                row.deal_id.to_string(),
                row.rule.clone(),
                row.step.to_string(),
                row.action.as_str().to_owned(),
                row.recipient.clone(),
                row.state.as_str().to_owned(),
                time(row.due_at),
                row.attempts.to_string(),
                row.sent_at.map(time).unwrap_or_default(),
                row.reason.clone().unwrap_or_default(),
            ]
        },
    );
    Ok(())
}

/// Prints today's digest for the owner of `deal_id` (or the rule's fixed address) as
/// it would be sent now; for a weekly review, the review of the week up to now.
async fn digest_preview(
    config: &Config,
    rule: &crate::followup::digest::DigestRule,
    deal_id: i64,
) -> Result<(), CliError> {
    use crate::followup::digest::{DigestContent, DigestContext, DigestRecipient, MAX_LISTED};
    let store = open_store(config).await?;
    let now = chrono::Utc::now();
    let day = now.with_timezone(&rule.zone).date_naive().to_string();
    let templates = crate::followup::templates::Templates::for_config(config).map_err(|error| {
        CliError::Config(ConfigError::at(
            config,
            "email.templates",
            error.to_string(),
        ))
    })?;
    let sender = crate::followup::worker::sender_name(config);
    if rule.content == DigestContent::Review {
        let DigestRecipient::Fixed(address) = &rule.to else {
            return Err(CliError::Usage(format!(
                "rule {} has no fixed address",
                rule.name
            )));
        };
        let recipient = address.as_str().to_lowercase();
        let context = crate::followup::review::gather(
            &store,
            &config.pipelines,
            rule,
            &recipient,
            now,
            sender,
        )
        .await?;
        let rendered = templates
            .render(&rule.template, &context)
            .map_err(anyhow::Error::from)?;
        return print_digest(config, rule, &recipient, None, &day, rendered);
    }
    let Some(deal) = store.deal(deal_id).await? else {
        return Err(CliError::Usage(format!("no deal with id {deal_id}")));
    };
    let (recipient, owner) = match &rule.to {
        DigestRecipient::Fixed(address) => (address.as_str().to_lowercase(), None),
        DigestRecipient::Owner => match &deal.owner_email {
            Some(email) => {
                let email = email.as_str().to_lowercase();
                (email.clone(), Some(email))
            }
            None => {
                return Err(CliError::Usage(format!(
                    "deal {deal_id} has no owner email, so it is in nobody's digest"
                )));
            }
        },
    };
    let watch = crate::followup::worker::digest_watch(rule, now);
    let (deals, total) = store.digest_deals(watch, owner, MAX_LISTED).await?;
    if total == 0 {
        output::print(&format!(
            "{recipient} has no deal in rule {}'s stages past its idle time: no digest would be sent\n",
            rule.name
        ));
        return Ok(());
    }
    let context = DigestContext::new(
        rule,
        &recipient,
        deals,
        total,
        &config.pipelines,
        &day,
        sender,
        now,
    );
    let rendered = templates
        .render(&rule.template, &context)
        .map_err(anyhow::Error::from)?;
    print_digest(config, rule, &recipient, context.owner.name, &day, rendered)
}

/// Prints a rendered digest as the message the mailer would send.
fn print_digest(
    config: &Config,
    rule: &crate::followup::digest::DigestRule,
    recipient: &str,
    to_name: Option<String>,
    day: &str,
    rendered: crate::followup::templates::Rendered,
) -> Result<(), CliError> {
    let mailer =
        crate::followup::mailer::Mailer::composer(&config.email).map_err(anyhow::Error::from)?;
    let to = crate::domain::EmailAddress::parse(recipient)
        .ok_or_else(|| CliError::Usage(format!("{recipient:?} is not an email address")))?;
    let outgoing = crate::followup::digest::outgoing(rule, to, to_name, day, rendered);
    let message = mailer.build(&outgoing).map_err(anyhow::Error::from)?;
    output::print(&String::from_utf8_lossy(&message.formatted()));
    Ok(())
}

async fn outbox_digests(source: &ConfigSource, args: OutboxDigestsArgs) -> Result<(), CliError> {
    let config = load(source).await?;
    let digests: Vec<String> = config.digests.iter().map(|r| r.name.clone()).collect();
    one_of("digest rule", args.rule.as_deref(), &digests)?;
    let store = open_store(&config).await?;
    let rows = store.digests(args.rule, args.limit).await?;
    print_list(
        args.format,
        &rows,
        |rows| output::to_json(&rows),
        vec![
            "id",
            "rule",
            "day",
            "recipient",
            "state",
            "deals",
            "attempts",
            "sent",
            "reason",
        ],
        |row| {
            vec![
                row.id.to_string(),
                row.rule.clone(),
                row.day.clone(),
                row.recipient.clone(),
                row.state.as_str().to_owned(),
                row.deals.len().to_string(),
                row.attempts.to_string(),
                row.sent_at.map(time).unwrap_or_default(),
                row.reason.clone().unwrap_or_default(),
            ]
        },
    );
    Ok(())
}

async fn outbox_preview(source: &ConfigSource, args: OutboxPreviewArgs) -> Result<(), CliError> {
    use crate::followup::{mailer::Mailer, rules::Recipient, templates::Templates};
    use crate::store::{OutboxAction, OutboxRow, OutboxRowFilter, OutboxState};
    let config = load(source).await?;
    if let Some(digest) = config.digests.iter().find(|r| r.name == args.rule) {
        return digest_preview(&config, digest, args.deal).await;
    }
    let Some(rule) = config.followups.iter().find(|r| r.name == args.rule) else {
        let known: Vec<_> = config
            .followups
            .iter()
            .map(|r| r.name.as_str())
            .chain(config.digests.iter().map(|r| r.name.as_str()))
            .collect();
        return Err(CliError::Usage(format!(
            "no follow-up rule named {:?} (known: {})",
            args.rule,
            known.join(", ")
        )));
    };
    if rule.kind == crate::followup::rules::RuleKind::Marketing {
        // The unsubscribe link in the email is signed with this secret.
        config.require_credentials(|key| key == "email.unsubscribe_secret")?;
    }
    let store = open_store(&config).await?;
    let Some(deal) = store.deal(args.deal).await? else {
        return Err(CliError::Usage(format!("no deal with id {}", args.deal)));
    };
    let rows = store
        .outbox(OutboxRowFilter {
            rule: Some(rule.name.clone()),
            deal_id: Some(deal.id),
            ..Default::default()
        })
        .await?;
    let step = match args.step {
        Some(step) if step > rule.steps.len() => {
            return Err(CliError::Usage(format!(
                "rule {} has {} step(s)",
                rule.name,
                rule.steps.len()
            )));
        }
        // Below the rule's step count, so it fits in a u32.
        Some(step) => crate::domain::StepNumber::from_number(step as u32)
            .ok_or_else(|| CliError::Usage("steps count from 1".into()))?,
        None => rows
            .iter()
            .filter(|r| r.state == OutboxState::Pending && r.action == OutboxAction::Email)
            .map(|r| r.step)
            .min()
            .unwrap_or_default(),
    };
    let row = match rows.iter().find(|r| r.step == step) {
        Some(row) => row.clone(),
        None => {
            // Not enrolled (yet): show what the rule would send now.
            let recipient = match &rule.to {
                Recipient::Contact => deal.contact_email.clone(),
                Recipient::Owner => deal.owner_email.clone(),
                Recipient::Fixed(address) => Some(address.clone()),
            };
            let now = chrono::Utc::now();
            OutboxRow {
                id: 0,
                deal_id: deal.id,
                rule: rule.name.clone(),
                step,
                action: OutboxAction::Email,
                recipient: recipient.map(|a| a.to_string()).unwrap_or_default(),
                state: OutboxState::Pending,
                anchor_at: deal.stage_entered_at,
                due_at: now,
                next_attempt_at: now,
                attempts: 0,
                reason: None,
                message_id: None,
                created_at: now,
                updated_at: now,
                sent_at: None,
            }
        }
    };
    let templates =
        Templates::for_rules(&config.email.templates, &config.followups).map_err(|error| {
            CliError::Config(ConfigError::at(
                &config,
                "email.templates",
                error.to_string(),
            ))
        })?;
    let mailer = Mailer::composer(&config.email).map_err(anyhow::Error::from)?;
    let outgoing =
        crate::followup::worker::compose(&config, &templates, &mailer, rule, &row, &deal)
            .map_err(anyhow::Error::from)?;
    let message = mailer.build(&outgoing).map_err(anyhow::Error::from)?;
    output::print(&String::from_utf8_lossy(&message.formatted()));
    Ok(())
}
