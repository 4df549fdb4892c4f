//! Follow-up benchmarks.
//!
//!     cargo bench --bench followups
//!
//! 1. The due set: 1,000,000 deals in the store, 200,000 of them abandoned carts enrolled
//!    in a three-step rule (800,000 outbox rows), 100,000 of those with a step due now.
//!    Times the scheduler's queries: the due set (`Store::outbox_due`), the next due time,
//!    and the start-up enrollment scan of a trigger stage. Target: due set ≤ 1 s.
//! 2. Delivery: the follow-up worker, in process, sends 3,000 due emails to a local SMTP
//!    server (the tests' aiosmtpd sink) with a pool of `POOL` connections (32) and no rate limit.
//!    Target: ≥ 200 emails/s.
//! 3. The same server's ceiling: the same `Mailer` (lettre, pool of `POOL`) sends 3,000
//!    pre-built messages with no store, no rendering: what the SMTP side alone allows.
//!
//! `FOLLOWUPS_BENCH=delivery` runs parts 2 and 3 only; `EMAILS=N` changes their size.

#![allow(clippy::print_stdout)]

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{cpu_seconds, load_average};
use dealsync::domain::{
    ChangeCause, ConnectionName, Currency, DealStatus, EmailAddress, Money, PipelineKey,
    SourceDeal, StageKey, StageRef,
};
use dealsync::store::{
    DealUpsert, EnrollPlan, NewOutboxRow, OutboxAction, OutboxRowFilter, OutboxState, Store,
};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

const DEALS: usize = 1_000_000;
const CARTS: usize = 200_000;
/// SMTP connections in the pool: each one waits about 49 ms per email on this
/// loopback (the server's and the client's round trips), so the rate grows with it.
const POOL: u32 = 32;
const DUE: usize = 100_000;
const BATCH: usize = 5_000;
const EMAILS: usize = 3_000;

fn emails() -> usize {
    std::env::var("EMAILS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(EMAILS)
}

fn deal(n: usize, pipeline: &str, stage: &str, at: DateTime<Utc>) -> DealUpsert {
    let mut source = SourceDeal::new(format!("{n}"), format!("Deal {n}"), "default", stage);
    source.amount = Some(Money::new(
        (n as i64 % 5000) * 100,
        Currency::parse("EUR").unwrap(),
    ));
    source.contact_email = EmailAddress::parse(&format!("buyer{n}@example.com"));
    source.owner_email = EmailAddress::parse("owner@example.com");
    source.marketing_consent = Some(true);
    source.updated_at = Some(at);
    source.stage_changed_at = Some(at);
    DealUpsert {
        connection: ConnectionName::new("bench"),
        target: StageRef {
            pipeline: Some(PipelineKey::new(pipeline)),
            stage: StageKey::new(stage),
        },
        status: DealStatus::Open,
        source,
        observed_at: at,
        cause: ChangeCause::Poll,
    }
}

async fn due_set() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("bench.db")).unwrap();
    let now = Utc::now();
    let two_hours_ago = now - Duration::hours(2);
    let started = Instant::now();
    for start in (0..DEALS).step_by(BATCH) {
        let batch = (start..start + BATCH)
            .map(|n| {
                if n < DUE {
                    deal(n, "ecommerce", "cart_abandoned", two_hours_ago)
                } else if n < CARTS {
                    deal(n, "ecommerce", "cart_abandoned", now)
                } else {
                    let stages = ["lead_generation", "proposal", "negotiation", "closing"];
                    deal(
                        n,
                        "sales",
                        stages[n % stages.len()],
                        now - Duration::days(3),
                    )
                }
            })
            .collect();
        store.upsert_deals(batch).await.unwrap();
    }
    println!(
        "setup: {DEALS} deals stored in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let at = StageRef {
        pipeline: Some(PipelineKey::new("ecommerce")),
        stage: StageKey::new("cart_abandoned"),
    };
    let scan = Instant::now();
    let candidates = store
        .unenrolled_in_stage(at.clone(), now - Duration::days(4), "carts".into())
        .await
        .unwrap();
    let first_scan = scan.elapsed();
    assert_eq!(candidates.len(), CARTS);

    let enrolling = Instant::now();
    for deal_id in &candidates {
        store
            .enroll(*deal_id, "carts".into(), now, now, move |deal, _| {
                let anchor = deal.stage_entered_at;
                let row = |step: i64, hours: i64| NewOutboxRow {
                    step: dealsync::domain::StepNumber::from_index(step),
                    action: if step == 3 {
                        OutboxAction::Expire
                    } else {
                        OutboxAction::Email
                    },
                    due_at: anchor + Duration::hours(hours),
                    state: OutboxState::Pending,
                    reason: None,
                };
                EnrollPlan::Enroll {
                    recipient: deal.contact_email.as_ref().unwrap().to_string(),
                    anchor_at: anchor,
                    rows: vec![row(0, 1), row(1, 24), row(2, 72), row(3, 144)],
                    supersede: Vec::new(),
                }
            })
            .await
            .unwrap();
    }
    let enroll_rate = CARTS as f64 / enrolling.elapsed().as_secs_f64();

    let scan = Instant::now();
    let left = store
        .unenrolled_in_stage(at, now - Duration::days(4), "carts".into())
        .await
        .unwrap();
    let rescan = scan.elapsed();
    assert!(left.is_empty());

    let mut due_times = Vec::new();
    for _ in 0..5 {
        let query = Instant::now();
        let due = store.outbox_due(Utc::now(), DUE as u32 + 1).await.unwrap();
        due_times.push(query.elapsed().as_secs_f64());
        assert_eq!(due.len(), DUE);
    }
    due_times.sort_by(f64::total_cmp);
    let query = Instant::now();
    let next = store.outbox_next_due().await.unwrap();
    let next_due = query.elapsed();
    assert!(next.is_some());
    let query = Instant::now();
    let batch = store.outbox_due(Utc::now(), 256).await.unwrap();
    let one_batch = query.elapsed();
    assert_eq!(batch.len(), 256);

    println!("due set: {DEALS} deals, {CARTS} carts enrolled (4 rows each), {DUE} due");
    println!(
        "  find the whole due set ({DUE} rows): median {:.0} ms, worst {:.0} ms (target ≤ 1000 ms)",
        due_times[2] * 1000.0,
        due_times[4] * 1000.0
    );
    println!(
        "  one worker batch (256 due rows): {:.2} ms",
        one_batch.as_secs_f64() * 1000.0
    );
    println!("  next due time: {:.2} ms", next_due.as_secs_f64() * 1000.0);
    println!(
        "  start-up enrollment scan of a {CARTS}-deal stage: {:.0} ms before enrolling, {:.0} ms once all are enrolled",
        first_scan.as_secs_f64() * 1000.0,
        rescan.as_secs_f64() * 1000.0
    );
    println!("  enrollment: {enroll_rate:.0} deals/s (one transaction each)");
}

/// Starts the tests' SMTP sink on a free port; returns the child and the port.
fn smtp_sink(maildir: &std::path::Path) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let python =
        std::env::var("DEALSYNC_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let mut child = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/daemon/harness/smtp_sink.py"
        ))
        .args(["--port", &port.to_string(), "--maildir"])
        .arg(maildir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the SMTP sink (python3-aiosmtpd)");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("READY {port}"));
    (child, port)
}

async fn delivery() {
    let emails = emails();
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("mail");
    std::fs::create_dir(&maildir).unwrap();
    let (mut sink, port) = smtp_sink(&maildir);
    let text = format!(
        r#"
[storage]
path = "{db}"
[email]
transport = "smtp"
url = "smtp://127.0.0.1:{port}"
from = "Bench <bench@example.com>"
templates = "{templates}"
pool_size = {POOL}
enroll_interval = "1h"
[followups.alert]
kind = "transactional"
stage = "sales.proposal"
to = "team@example.com"
template = "deal_stalled"
after = "1s"
"#,
        db = dir.path().join("bench.db").display(),
        templates = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates"),
    );
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, text).unwrap();
    let config = Arc::new(dealsync::config::load(&path).unwrap());
    let store = Store::open(&config.storage.path).unwrap();
    let entered = Utc::now() - Duration::minutes(1);
    for start in (0..emails).step_by(1000) {
        let batch = (start..(start + 1000).min(emails))
            .map(|n| deal(n, "sales", "proposal", entered))
            .collect();
        store.upsert_deals(batch).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let sink_pid = sink.id().to_string();
    let (own_cpu, sink_cpu) = (cpu_seconds("self"), cpu_seconds(&sink_pid));
    let started = Instant::now();
    let deps = dealsync::followup::worker::Deps {
        store: store.clone(),
        config,
        metrics: Arc::new(dealsync::telemetry::Metrics::new()),
        source: None,
        attention: None,
        health: Arc::new(dealsync::health::Readiness::default())
            .worker(dealsync::followup::worker::NAME),
        leading: dealsync::replica::Leadership::always(),
    };
    let worker = tokio::spawn(dealsync::followup::worker::run(deps, shutdown.clone()));
    loop {
        let sent = store
            .outbox_counts()
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.state == "sent")
            .map(|c| c.emails)
            .sum::<u64>();
        if sent as usize >= emails {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 300,
            "delivery stalled at {sent}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    let own_cpu = cpu_seconds("self") - own_cpu;
    let sink_cpu = cpu_seconds(&sink_pid) - sink_cpu;
    shutdown.cancel();
    worker.await.unwrap();
    let rows = store
        .outbox(OutboxRowFilter {
            state: Some(OutboxState::Sent),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = rows.iter().filter_map(|r| r.sent_at).min().unwrap();
    let last = rows.iter().filter_map(|r| r.sent_at).max().unwrap();
    let received = received(&maildir);
    let _ = sink.kill();
    let _ = sink.wait();
    let sending = (last - first).num_milliseconds().max(1) as f64 / 1000.0;
    println!(
        "delivery: {emails} emails, SMTP pool of {POOL}, no rate limit (load average {})",
        load_average()
    );
    println!(
        "  first to last accepted: {:.0} emails/s (target ≥ 200)",
        (emails - 1) as f64 / sending
    );
    println!(
        "  worker start (enrollment included) to all sent: {:.0} emails/s",
        emails as f64 / total.as_secs_f64()
    );
    println!(
        "  CPU per email: dealsync {:.2} ms (bench polling included), SMTP server {:.2} ms",
        own_cpu * 1000.0 / emails as f64,
        sink_cpu * 1000.0 / emails as f64
    );
    assert_eq!(received, emails, "the server received each email once");
    assert_eq!(rows.len(), emails, "every row is sent, none twice");
}

/// The SMTP side alone: the daemon's `Mailer` sends pre-built messages, 8 at a time.
async fn sink_ceiling() {
    let emails = emails();
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("mail");
    std::fs::create_dir(&maildir).unwrap();
    let (mut sink, port) = smtp_sink(&maildir);
    let text = format!(
        "[email]\ntransport = \"smtp\"\nurl = \"smtp://127.0.0.1:{port}\"\nfrom = \"Bench <bench@example.com>\"\npool_size = {POOL}\n"
    );
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, text).unwrap();
    let config = dealsync::config::load(&path).unwrap();
    let mailer = Arc::new(dealsync::followup::mailer::Mailer::new(&config.email).unwrap());
    let messages: Vec<_> = (0..emails)
        .map(|n| {
            let outgoing = dealsync::followup::mailer::Outgoing {
                outbox_id: None,
                to: EmailAddress::parse("team@example.com").unwrap(),
                to_name: None,
                subject: format!("Deal rotting: Deal {n}"),
                text: "x".repeat(600),
                html: format!("<p>{}</p>", "x".repeat(900)),
                idempotency_key: format!("{n}-ceiling-0"),
                unsubscribe: None,
                reply_to: None,
            };
            (
                outgoing.idempotency_key.clone(),
                mailer.build(&outgoing).unwrap(),
            )
        })
        .collect();
    let sink_pid = sink.id().to_string();
    let (own_cpu, sink_cpu) = (cpu_seconds("self"), cpu_seconds(&sink_pid));
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(POOL as usize));
    let mut sends = tokio::task::JoinSet::new();
    for (key, message) in messages {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let mailer = mailer.clone();
        sends.spawn(async move {
            mailer.send(message, &key).await.unwrap();
            drop(permit);
        });
    }
    while let Some(result) = sends.join_next().await {
        result.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let own_cpu = cpu_seconds("self") - own_cpu;
    let sink_cpu = cpu_seconds(&sink_pid) - sink_cpu;
    let received = received(&maildir);
    let _ = sink.kill();
    let _ = sink.wait();
    println!(
        "SMTP side alone (no store, no rendering): {:.0} emails/s over {emails} (load average {})",
        emails as f64 / elapsed,
        load_average()
    );
    println!(
        "  CPU per email: sender {:.2} ms, SMTP server {:.2} ms",
        own_cpu * 1000.0 / emails as f64,
        sink_cpu * 1000.0 / emails as f64
    );
    assert_eq!(received, emails);
}

/// Messages the SMTP server wrote into `maildir` (one `.json` file each).
fn received(maildir: &std::path::Path) -> usize {
    std::fs::read_dir(maildir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".json")
        })
        .count()
}

#[tokio::main]
async fn main() {
    if std::env::var("FOLLOWUPS_BENCH").as_deref() != Ok("delivery") {
        due_set().await;
    }
    delivery().await;
    sink_ceiling().await;
}
