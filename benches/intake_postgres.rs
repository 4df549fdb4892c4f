//! Webhook intake on PostgreSQL, one and more replicas: events/s at saturation and
//! latency at a fixed rate, measured at the store's intake (`store::postgres::intake`,
//! what a replica's webhook handler awaits before its 2xx), without HTTP.
//!
//! Each replica is a process of its own (this binary again, with `--replica`), with its
//! own connection pool and writer, as `dealsync run` processes would be. Deliveries
//! are Shopify-sized (3 KB bodies), each with its own delivery id; a 2xx would mean
//! the delivery is committed with `synchronous_commit = on`.
//!
//! 1. Saturation: `SATURATION` deliveries split over the replicas, each replica with
//!    `PRODUCERS` concurrent senders back to back; reports stored deliveries/s.
//! 2. Fixed rate: `RATE` deliveries/s in all for `RATE_SECS`, open loop, latency
//!    measured from each delivery's scheduled time (no coordinated omission); reports
//!    p50, p99 and the maximum.
//!
//! Every stored delivery is checked to be in the inbox once; the bench exits non-zero
//! otherwise, or when any delivery failed.
//!
//! ```sh
//! cargo bench --bench intake_postgres -- --url postgres://USER:PASSWORD@127.0.0.1:PORT/DB [--replicas 2]
//! ```
//! The database must exist and may be empty (the schema is created); its inbox
//! tables are emptied before each phase.

// A bench reports on stdout.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use dealsync::config::{PostgresUrl, Secret};
use dealsync::store::NewWebhook;
use dealsync::store::postgres::intake::Intake;
use dealsync::store::postgres::{Database, Options};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SATURATION: u64 = 60_000;
const PRODUCERS: u64 = 256;
const RATE: u64 = 2_000;
const RATE_SECS: u64 = 10;
const BODY_BYTES: usize = 3_000;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn url() -> PostgresUrl {
    let text = arg("--url").expect("--url postgres://… is required (see the file's docs)");
    PostgresUrl::parse(&Secret::new(text)).expect("--url")
}

fn delivery(replica: u64, n: u64) -> NewWebhook {
    let mut body = format!(r#"{{"id":{n},"token":"bench-{replica}-{n}","pad":""#).into_bytes();
    body.resize(BODY_BYTES - 2, b'x');
    body.extend_from_slice(b"\"}");
    NewWebhook {
        connection: "shop".into(),
        delivery_id: format!("bench-{replica}-{n}"),
        topic: Some("checkouts/create".into()),
        headers: vec![
            ("x-shopify-topic".into(), "checkouts/create".into()),
            ("x-shopify-shop-domain".into(), "shop.example.com".into()),
        ],
        body_sha256: None,
        body: body.into(),
        received_at: chrono::Utc::now(),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What one replica reports: `elapsed_ms stored failed` then the latencies in µs.
fn replica(phase: &str, index: u64, replicas: u64, start_at: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let database = Database::connect(&url(), &Options::default())
            .await
            .unwrap();
        let intake = Intake::start(database).await.unwrap();
        let wait = start_at.saturating_sub(unix_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        if phase == "saturation" {
            let share = SATURATION / replicas;
            for producer in 0..PRODUCERS {
                let intake = intake.clone();
                tasks.spawn(async move {
                    let (mut stored, mut failed) = (0u64, 0u64);
                    let mut n = producer;
                    while n < share {
                        match intake.enqueue(delivery(index, n)).await {
                            Ok(_) => stored += 1,
                            Err(_) => failed += 1,
                        }
                        n += PRODUCERS;
                    }
                    (stored, failed, Vec::new())
                });
            }
        } else {
            let rate = RATE / replicas;
            let total = rate * RATE_SECS;
            let origin = tokio::time::Instant::now();
            for n in 0..total {
                let intake = intake.clone();
                let due = origin + Duration::from_micros(n * 1_000_000 / rate);
                tasks.spawn(async move {
                    tokio::time::sleep_until(due).await;
                    let result = intake.enqueue(delivery(index, n)).await;
                    let latency = due.elapsed().as_micros() as u64;
                    let ok = u64::from(result.is_ok());
                    (ok, 1 - ok, vec![latency])
                });
            }
        }
        let (mut stored, mut failed, mut latencies) = (0, 0, Vec::new());
        for (s, f, l) in tasks.join_all().await {
            stored += s;
            failed += f;
            latencies.extend(l);
        }
        let elapsed = started.elapsed().as_millis();
        println!("{elapsed} {stored} {failed}");
        println!(
            "{}",
            latencies
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
    });
}

struct Outcome {
    elapsed: Duration,
    stored: u64,
    failed: u64,
    latencies: Vec<u64>,
}

/// Runs `phase` on `replicas` processes started together; sums what they report.
fn run_phase(phase: &str, replicas: u64) -> Outcome {
    let start_at = unix_ms() + 1_500;
    let me = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..replicas)
        .map(|index| {
            Command::new(&me)
                .args(["--url", &arg("--url").unwrap(), "--replica"])
                .args([phase, &index.to_string(), &replicas.to_string()])
                .arg(start_at.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut outcome = Outcome {
        elapsed: Duration::ZERO,
        stored: 0,
        failed: 0,
        latencies: Vec::new(),
    };
    for child in children {
        let pid = child.id().to_string();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "replica {pid} failed");
        let text = String::from_utf8(output.stdout).unwrap();
        let mut lines = text.lines();
        let head: Vec<u64> = lines
            .next()
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        outcome.elapsed = outcome.elapsed.max(Duration::from_millis(head[0]));
        outcome.stored += head[1];
        outcome.failed += head[2];
        outcome.latencies.extend(
            lines
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap()),
        );
    }
    outcome
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--replica") {
        let value = |i: usize| args[at + i].clone();
        replica(
            &value(1),
            value(2).parse().unwrap(),
            value(3).parse().unwrap(),
            value(4).parse().unwrap(),
        );
        return;
    }
    if args.iter().any(|a| a == "--bench") && arg("--url").is_none() {
        eprintln!(
            "intake_postgres: needs --url postgres://… (see benches/intake_postgres.rs); skipped"
        );
        return;
    }
    let replicas: u64 = arg("--replicas").map_or(1, |r| r.parse().expect("--replicas"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (database, admin) = runtime.block_on(async {
        let database = Database::open(&url(), &Options::default()).await.unwrap();
        let (admin, connection) =
            tokio_postgres::connect(&arg("--url").unwrap(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        (database, admin)
    });
    let rows = |truncate: bool| -> i64 {
        runtime.block_on(async {
            if truncate {
                admin
                    .batch_execute("TRUNCATE webhook_inbox, webhook_bodies")
                    .await
                    .unwrap();
            }
            let row = admin
                .query_one("SELECT count(*) FROM webhook_inbox", &[])
                .await
                .unwrap();
            row.get(0)
        })
    };
    println!(
        "intake on PostgreSQL {}, {replicas} replica process(es), load average {}",
        database.target(),
        common::load_average()
    );
    for phase in ["saturation", "rate"] {
        rows(true);
        let outcome = run_phase(phase, replicas);
        let rows = rows(false);
        assert_eq!(outcome.failed, 0, "{phase}: deliveries failed");
        assert_eq!(
            rows as u64, outcome.stored,
            "{phase}: stored answers and inbox rows differ"
        );
        let mut sorted = outcome.latencies;
        sorted.sort_unstable();
        match phase {
            "saturation" => println!(
                "saturation: {} deliveries in {:.2} s = {:.0} stored/s ({} producers per replica)",
                outcome.stored,
                outcome.elapsed.as_secs_f64(),
                outcome.stored as f64 / outcome.elapsed.as_secs_f64(),
                PRODUCERS
            ),
            _ => println!(
                "fixed rate {RATE}/s for {RATE_SECS} s: {} stored; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                outcome.stored,
                percentile(&sorted, 0.50),
                percentile(&sorted, 0.99),
                percentile(&sorted, 1.0),
            ),
        }
    }
}
