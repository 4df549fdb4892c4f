//! Failover of a connection's polling between replicas: the time from the SIGKILL of
//! the replica holding a connection's poll lease to the first pull run another replica
//! starts for it (a `sync_runs` row), with the real binary on PostgreSQL.
//!
//! Two `dealsync run` replicas share the database, each with the `demo` connector
//! polling every second. Each round: find the lease holder through `/readyz`, SIGKILL
//! it, wait for the other replica's next run of the connection (read from the
//! database), then start the killed replica again so that the next round has two.
//!
//! ```sh
//! cargo bench --bench failover -- --url postgres://USER:PASSWORD@127.0.0.1:PORT/DB \
//!     [--rounds 5] [--failover-after 15]
//! ```
//! The database must exist; it may be empty (the replicas create the schema). Its
//! `sync_runs` and `leases` rows are what the bench reads.

// A bench reports on stdout.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

struct Replica {
    port: u16,
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on 127.0.0.1")
}

fn start(dir: &std::path::Path, url: &str, failover_after: u64) -> Replica {
    let port = free_port();
    let config = dir.join(format!("replica-{port}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[storage]
url = "{url}"
failover_after = "{failover_after}s"

[server]
listen = "127.0.0.1:{port}"
shutdown_timeout = "5s"

[email]
transport = "file"
dir = "{outbox}"

[connections.demo]
connector = "demo"
pipeline = "sales"
poll_interval = "1s"
settings = {{ seed = 42, pace = "2s", deals = 30, carts = 0 }}
"#,
            outbox = dir.join("outbox").display()
        ),
    )
    .expect("writing a replica's config");
    let child = Command::new(env!("CARGO_BIN_EXE_dealsync"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dealsync");
    Replica { port, child }
}

async fn readyz(http: &reqwest::Client, port: u16) -> Option<serde_json::Value> {
    let response = http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

async fn holds_poll_lease(http: &reqwest::Client, port: u16) -> bool {
    readyz(http, port)
        .await
        .is_some_and(|report| report["leases"].get("poll:demo").is_some())
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as i64)
        .unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let url = arg("--url").expect("--url postgres://… is required (see the file's docs)");
    let rounds: usize = arg("--rounds").map_or(5, |n| n.parse().expect("--rounds N"));
    let failover_after: u64 =
        arg("--failover-after").map_or(15, |s| s.parse().expect("--failover-after SECONDS"));
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connecting to --url");
    tokio::spawn(connection);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("an HTTP client");
    let mut replicas = vec![
        start(dir.path(), &url, failover_after),
        start(dir.path(), &url, failover_after),
    ];
    let mut figures = Vec::new();
    for round in 1..=rounds {
        let started = Instant::now();
        let holder = loop {
            let mut found = None;
            for (index, replica) in replicas.iter().enumerate() {
                if holds_poll_lease(&http, replica.port).await {
                    found = Some(index);
                    break;
                }
            }
            if found.is_some() {
                break found;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no replica holds poll:demo"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let holder = holder.expect("a holder");
        let survivor = 1 - holder;
        replicas[holder].child.kill().expect("SIGKILL");
        let killed_ms = epoch_ms();
        let killed = Instant::now();
        replicas[holder]
            .child
            .wait()
            .expect("reaping the killed replica");
        let first_run_ms = loop {
            let row = client
                .query_one(
                    "SELECT min(started_at) FROM sync_runs
                     WHERE connection = 'demo' AND started_at > $1",
                    &[&killed_ms],
                )
                .await
                .expect("reading sync_runs");
            if let Some(at) = row.get::<_, Option<i64>>(0) {
                break Some(at);
            }
            assert!(
                killed.elapsed() < Duration::from_secs(120),
                "no replica polled again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let observed = killed.elapsed();
        let to_first_run = Duration::from_millis(
            u64::try_from(first_run_ms.expect("a run") - killed_ms).unwrap_or_default(),
        );
        let survivor_holds = holds_poll_lease(&http, replicas[survivor].port).await;
        println!(
            "round {round}: SIGKILL → first poll by the other replica {:.2} s (observed after {:.2} s; survivor holds the lease: {survivor_holds})",
            to_first_run.as_secs_f64(),
            observed.as_secs_f64()
        );
        figures.push(to_first_run);
        replicas[holder] = start(dir.path(), &url, failover_after);
    }
    for replica in &mut replicas {
        let _ = replica.child.kill();
        let _ = replica.child.wait();
    }
    figures.sort();
    let median = figures[figures.len() / 2];
    let worst = figures[figures.len() - 1];
    println!(
        "failover_after = {failover_after} s, {rounds} rounds: median {:.2} s, worst {:.2} s (bound: failover_after + a third = {:.1} s); load {}",
        median.as_secs_f64(),
        worst.as_secs_f64(),
        failover_after as f64 * 4.0 / 3.0,
        common::load_average()
    );
}
