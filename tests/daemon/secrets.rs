//! A secret substituted into any config key never reaches what a person reads: the
//! real binary's `check` output and the log lines and final error of `run`, with the
//! secret put through every key of `config/dealsync.example.toml` (and of the keys it
//! leaves commented out) by `${VAR}` and by `${credential:NAME}`.

use crate::harness::daemon::binary;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Invalid for every key: a quote, a backslash (escaped by `{:?}` and JSON), a space
/// and a slash (a path under a directory that does not exist).
const SECRET: &str = "Tok\"en\\ s3cr3tZ4f9a/x";
/// What any rendering of the secret (raw, `{:?}`, JSON) still contains.
const CORE: &str = "s3cr3tZ4f9a";

/// Keys `dealsync.example.toml` leaves commented out (or does not show for every kind
/// of connection), merged into it so that every key of the config is tried.
const COMPLEMENT: &str = r#"
[server]
api_token = "0123456789abcdef0123456789abcdef"

[email]
unsubscribe_mailto = "unsubscribe@example.com"
dry_run = false
max_per_second = 10
pool_size = 4
recipient_time_zone = ["/customer/time_zone"]
late_grace = "6h"
enroll_interval = "30s"
max_attempts = 8
retry_initial = "30s"
retry_max = "1h"
timeout = "30s"

[followups.stalled_digest]
after = "3d"
late_grace = "2h"

[followups.cart_recovery]
stop_on_purchase = true
expire_to = "ecommerce.expired"
steps = [
  { template = "cart_reminder", after = "1h" },
  { template = "cart_reminder", after = "24h" },
  { template = "cart_discount", after = "72h", discount_code = "COMEBACK10", move_to = "ecommerce.discount_offer" },
]

[followups.post_sale]
to = "contact"
enabled = true

[connections.hubspot-eu]
enabled = true
base_url = "https://api.hubapi.com"
lookback = "5m"
page_size = 100
pipeline = "sales"
max_response_bytes = 67108864
rate_limit = { window_requests = 190, window = "10s", budget_share = 0.5, max_concurrency = 4 }
settings = { request_timeout = "30s", default_currency = "EUR", deletes_every = "1h" }

[connections.shop]
token = "shpat_example"
expire_after = "30d"
settings = { shop = "example", api_version = "2024-10" }

[connections.crm-oauth]
connector = "salesforce"
poll_interval = "5m"
oauth = { client_id = "client", client_secret = "client-secret-value", scopes = ["api"], auth_url = "https://login.example.com/authorize", token_url = "https://login.example.com/token", refresh_token = "refresh-value" }

[connections.woo]
connector = "woocommerce"
base_url = "https://shop.example.com"
username = "ck_user"
password = "cs_password"
webhook_secret = "woo-hook-secret"

[connections.pd]
connector = "pipedrive"
token = "pd-token"
rate_limit = { requests_per_second = 10.0, burst = 5 }
"#;

/// Custom canonical pipelines replace the defaults, so they get a document of their own.
const PIPELINES: &str = r#"
[pipelines.deals]
label = "Deals"
stages = [
  { key = "new", label = "New", description = "a prospect", probability = 10, stall_after = "7d", kind = "open" },
  { key = "won", label = "Won", probability = 100, kind = "won" },
  { key = "lost", label = "Lost", probability = 0, kind = "lost" },
]

[connections.crm]
connector = "pipedrive"
token = "pd-token"
pipeline = "deals"

[connections.crm.stage_map."Sales Pipeline"]
"Qualified" = "new"

[email]
transport = "file"
from = "Shop <shop@example.com>"

[followups.nudge]
kind = "transactional"
stage = "deals.new"
to = "owner"
template = "deal_stalled"
after = "3d"
"#;

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn display(path: &[Step]) -> String {
    let mut shown = String::new();
    for step in path {
        match step {
            Step::Key(key) => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(key);
            }
            Step::Index(at) => shown.push_str(&format!("[{at}]")),
        }
    }
    shown
}

/// Every leaf (string, number, boolean) of a document, by path.
fn leaves(value: &toml::Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match value {
        toml::Value::Table(table) => {
            for (key, item) in table {
                path.push(Step::Key(key.clone()));
                leaves(item, path, out);
                path.pop();
            }
        }
        toml::Value::Array(items) => {
            for (at, item) in items.iter().enumerate() {
                path.push(Step::Index(at));
                leaves(item, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn leaf_mut<'a>(value: &'a mut toml::Value, path: &[Step]) -> &'a mut toml::Value {
    path.iter().fold(value, |at, step| match step {
        Step::Key(key) => &mut at[key.as_str()],
        Step::Index(index) => &mut at[*index],
    })
}

/// Deep-merges `addition` into `base`; tables merge, anything else is replaced.
fn merge(base: &mut toml::Value, addition: toml::Value) {
    match (base, addition) {
        (toml::Value::Table(base), toml::Value::Table(addition)) => {
            for (key, value) in addition {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, addition) => *base = addition,
    }
}

/// TOML text of a document (the library's `toml` only parses): tables as `[headers]`,
/// values inline; strings in JSON's escapes, which TOML basic strings share.
fn to_toml(document: &toml::Value) -> String {
    fn key(name: &str) -> String {
        let bare = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if bare {
            name.to_owned()
        } else {
            serde_json::to_string(name).unwrap()
        }
    }
    fn inline(value: &toml::Value) -> String {
        match value {
            toml::Value::String(text) => serde_json::to_string(text).unwrap(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => format!("{number:?}"),
            toml::Value::Boolean(flag) => flag.to_string(),
            toml::Value::Datetime(at) => at.to_string(),
            toml::Value::Array(items) => format!(
                "[{}]",
                items.iter().map(inline).collect::<Vec<_>>().join(", ")
            ),
            toml::Value::Table(table) => format!(
                "{{ {} }}",
                table
                    .iter()
                    .map(|(k, v)| format!("{} = {}", key(k), inline(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    fn table(out: &mut String, path: &[String], items: &toml::Table) {
        if !path.is_empty() {
            let header: Vec<String> = path.iter().map(|p| key(p)).collect();
            out.push_str(&format!("\n[{}]\n", header.join(".")));
        }
        for (name, value) in items.iter().filter(|(_, v)| !v.is_table()) {
            out.push_str(&format!("{} = {}\n", key(name), inline(value)));
        }
        for (name, value) in items {
            if let toml::Value::Table(inner) = value {
                let mut deeper = path.to_vec();
                deeper.push(name.clone());
                table(out, &deeper, inner);
            }
        }
    }
    let mut out = String::new();
    table(
        &mut out,
        &[],
        document.as_table().expect("a document is a table"),
    );
    out
}

/// The two documents every key is tried in, with paths inside `dir` and the listener
/// on `port` (held by the test, so `run` stops at binding it).
fn documents(dir: &Path, port: u16) -> Vec<toml::Value> {
    let repo = env!("CARGO_MANIFEST_DIR");
    let example_text =
        std::fs::read_to_string(format!("{repo}/config/dealsync.example.toml")).unwrap();
    let mut example: toml::Value = toml::from_str(&example_text).unwrap();
    merge(&mut example, toml::from_str(COMPLEMENT).unwrap());
    let mut pipelines: toml::Value = toml::from_str(PIPELINES).unwrap();
    let local: toml::Value = toml::from_str(&format!(
        r#"
[storage]
path = "{dir}/dealsync.db"
[server]
listen = "127.0.0.1:{port}"
[connectors]
dir = "{dir}/connectors.d"
[email]
dir = "{dir}/outbox"
templates = "{repo}/config/templates"
"#,
        dir = dir.display()
    ))
    .unwrap();
    merge(&mut example, local.clone());
    merge(&mut pipelines, local);
    vec![example, pipelines]
}

struct Outcome {
    code: i32,
    output: String,
}

async fn dealsync(dir: &Path, command: &str, env: &[(&str, String)]) -> Outcome {
    let mut child = tokio::process::Command::new(binary());
    child
        .arg("--config")
        .arg(dir.join("dealsync.toml"))
        .arg("--log-level")
        .arg("debug")
        .arg(command)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        child.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.output())
        .await
        .unwrap_or_else(|_| panic!("dealsync {command} did not exit in {dir:?}"))
        .expect("running dealsync");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[tokio::test]
async fn a_secret_substituted_into_any_key_appears_in_no_output_of_check_or_run() {
    let root = tempfile::tempdir().unwrap();
    let credentials = root.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    for (name, value) in [
        ("smtp-url", "smtp://127.0.0.1:2525"),
        ("unsubscribe-secret", "0123456789abcdef-unsubscribe"),
        ("hubspot-eu-token", "pat-eu-1234"),
        ("shopify-webhook-secret", "shopify-webhook-secret-value"),
        ("leak", SECRET),
    ] {
        std::fs::write(credentials.join(name), format!("{value}\n")).unwrap();
    }
    let env: Arc<Vec<(&str, String)>> = Arc::new(vec![
        ("DEALSYNC_TEST_SECRET", SECRET.to_owned()),
        ("CREDENTIALS_DIRECTORY", credentials.display().to_string()),
    ]);
    // Held for the whole test: `run` of a valid config fails to bind it and exits.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();

    // Each document is valid as it stands, so whatever fails below fails on the secret.
    let mut cases = Vec::new();
    for number in 0..documents(root.path(), port).len() {
        let dir = root.path().join(format!("base-{number}"));
        std::fs::create_dir_all(dir.join("connectors.d")).unwrap();
        let document = &documents(&dir, port)[number];
        std::fs::write(dir.join("dealsync.toml"), to_toml(document)).unwrap();
        let checked = dealsync(&dir, "check", &env).await;
        assert_eq!(
            checked.code,
            0,
            "document {number} is valid without the secret:\n{}\n{}",
            checked.output,
            to_toml(document)
        );
        let mut paths = Vec::new();
        leaves(document, &mut Vec::new(), &mut paths);
        for path in paths {
            for reference in ["${DEALSYNC_TEST_SECRET}", "${credential:leak}"] {
                cases.push((number, path.clone(), reference.to_owned()));
            }
        }
    }
    // The secret inside a value, where it makes a path that cannot be created: the
    // errors of opening the store and reading the connectors directory quote the path.
    for (key, value) in [
        ("storage", "/dev/null/${DEALSYNC_TEST_SECRET}/dealsync.db"),
        ("connectors", "/dev/null/${credential:leak}"),
    ] {
        let field = if key == "storage" { "path" } else { "dir" };
        let path = vec![Step::Key(key.to_owned()), Step::Key(field.to_owned())];
        cases.push((0, path, value.to_owned()));
    }
    let keys: Vec<String> = cases.iter().map(|(_, path, _)| display(path)).collect();
    for expected in [
        "storage.path",
        "server.listen",
        "server.api_token",
        "connectors.dir",
        "email.url",
        "email.from",
        "email.templates",
        "connections.hubspot-eu.connector",
        "connections.hubspot-eu.base_url",
        "connections.hubspot-eu.poll_interval",
        "connections.hubspot-eu.token",
        "connections.hubspot-eu.stage_map.default.appointmentscheduled",
        "connections.hubspot-eu.rate_limit.window",
        "connections.hubspot-eu.settings.default_currency",
        "connections.crm-oauth.oauth.token_url",
        "connections.shop.webhook_secret[0]",
        "followups.stalled.stage[0]",
        "followups.cart_recovery.steps[2].move_to",
        "followups.stalled_digest.digest",
        "pipelines.deals.stages[0].kind",
    ] {
        assert!(
            keys.iter().any(|key| key == expected),
            "{expected} is tried"
        );
    }

    let limit = Arc::new(tokio::sync::Semaphore::new(4));
    let mut runs = tokio::task::JoinSet::new();
    for (index, (number, path, reference)) in cases.into_iter().enumerate() {
        let dir = root.path().join(format!("case-{index}"));
        std::fs::create_dir_all(dir.join("connectors.d")).unwrap();
        let mut document = documents(&dir, port).swap_remove(number);
        *leaf_mut(&mut document, &path) = toml::Value::String(reference.clone());
        std::fs::write(dir.join("dealsync.toml"), to_toml(&document)).unwrap();
        let (limit, env) = (limit.clone(), env.clone());
        runs.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            let checked = dealsync(&dir, "check", &env).await;
            let ran = dealsync(&dir, "run", &env).await;
            (display(&path), reference, checked, ran)
        });
    }
    let mut leaks = Vec::new();
    let mut refused = Vec::new();
    let mut connector_error = None;
    while let Some(finished) = runs.join_next().await {
        let (key, reference, checked, ran) = finished.unwrap();
        assert_ne!(
            ran.code, 0,
            "{key}: run of a config whose listener is taken"
        );
        for (command, outcome) in [("check", &checked), ("run", &ran)] {
            if outcome.output.contains(CORE) {
                leaks.push(format!(
                    "{key} = {reference} (dealsync {command}):\n{}",
                    outcome.output
                ));
            }
        }
        if checked.code != 0 || !ran.output.contains("binding 127.0.0.1") {
            refused.push(format!("{key} = {reference}"));
        }
        if key == "connections.hubspot-eu.connector" {
            connector_error = Some(checked.output);
        }
    }
    assert!(
        leaks.is_empty(),
        "the secret was printed:\n{}",
        leaks.join("\n\n")
    );
    // The secret did go through error paths, and they still say what is wrong.
    for failing in [
        "storage.path = /dev/null/${DEALSYNC_TEST_SECRET}/dealsync.db",
        "connectors.dir = /dev/null/${credential:leak}",
        "server.listen = ${DEALSYNC_TEST_SECRET}",
        "connectors.dir = ${credential:leak}",
        "email.from = ${DEALSYNC_TEST_SECRET}",
        "connections.hubspot-eu.connector = ${DEALSYNC_TEST_SECRET}",
        "connections.hubspot-eu.connector = ${credential:leak}",
        "connections.hubspot-eu.base_url = ${DEALSYNC_TEST_SECRET}",
        "connections.hubspot-eu.stage_map.default.appointmentscheduled = ${credential:leak}",
        "followups.stalled.stage[0] = ${DEALSYNC_TEST_SECRET}",
    ] {
        assert!(
            refused.iter().any(|case| case == failing),
            "{failing}: fails"
        );
    }
    let connector_error = connector_error.expect("the connector key was tried");
    assert!(
        connector_error.contains("connections.hubspot-eu.connector: unknown connector \"***\""),
        "{connector_error}"
    );
}
