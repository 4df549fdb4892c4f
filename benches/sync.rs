//! Pull-connector benchmark: the real sync path (manifest engine, vendor client,
//! store) against an in-process HubSpot mock and a temporary SQLite file.
//!
//! `cargo bench --bench sync` runs three measurements:
//! 1. a full sync of `DEALS` (default 100,000) HubSpot-shaped deals with ~60
//!    properties, a contact association and one of 25 owners each (the owners list read
//!    once per sync for their emails), no rate limit: deals/s, CPU seconds, peak RSS
//!    (of the whole process, mock included);
//! 2. requests for three incremental cycles after `k`, `k` and `10 k` deals changed;
//! 3. a full sync of `LIMITED_DEALS` (default 20,000) against a mock enforcing
//!    HubSpot's burst limit (190 requests per rolling 10 s, 429 beyond): total time
//!    against the floor the limit sets, and the 429s received.
//!
//! `cargo bench --bench sync -- --url postgres://USER:PASSWORD@HOST:PORT/DB` (an empty
//! database) runs measurement 1 a second time with the store on that PostgreSQL
//! database, against the same mock, after the SQLite run: the two figures side by side.

#![allow(clippy::print_stdout)]

#[allow(dead_code)]
#[path = "../tests/daemon/harness/vendors/mod.rs"]
mod vendors;

mod common;

use common::{cpu_seconds, load_average, peak_rss_mib};
use dealsync::config::interpolate::ProcessEnv;
use dealsync::config::{PostgresUrl, Secret};
use dealsync::ingest::{ConnectionRuntime, SyncDeps};
use dealsync::store::Store;
use dealsync::sync;
use dealsync::telemetry::Metrics;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use vendors::hubspot::{Burst, ExtraProperties, HsDeal, HubSpot};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value after `name` on the command line.
fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

const STORED_SQL: &str = "SELECT (SELECT count(*) FROM deals), \
    (SELECT count(DISTINCT external_id) FROM deals), (SELECT count(*) FROM stage_history)";

/// (deals, distinct external ids, stage history rows) stored in the PostgreSQL database.
async fn stored_postgres(url: &str) -> (i64, i64, i64) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting to --url");
    tokio::spawn(connection);
    let row = client
        .query_one(STORED_SQL, &[])
        .await
        .expect("counting stored deals");
    (row.get(0), row.get(1), row.get(2))
}

/// (deals, distinct external ids, stage history rows) stored in the bench database.
fn stored(dir: &std::path::Path) -> (i64, i64, i64) {
    let db = rusqlite::Connection::open(dir.join("bench.db")).expect("bench db");
    db.query_row(STORED_SQL, [], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    })
    .expect("counting stored deals")
}

fn fill(hubspot: &HubSpot, deals: u64, base_ms: i64) {
    let extra = Arc::new(ExtraProperties::new(
        (0..52)
            .map(|i| {
                (
                    format!("custom_property_{i:02}"),
                    format!("value {i} of a typical deal property"),
                )
            })
            .collect(),
    ));
    for contact in 0..1000u64 {
        hubspot.put_contact(
            50_000 + contact,
            &format!("buyer{contact}@example.com"),
            "Ada",
            "Lovelace",
        );
    }
    // 25 owners (the fixture's two and 23 more), one per deal in turn: the owners list
    // (one page of 100) is read once per sync for their emails.
    let mut owners = vec!["6166860".to_owned(), "6166861".to_owned()];
    for n in 0..23 {
        let id = format!("71000{n:02}");
        hubspot.put_owner(&id, &format!("rep{n}@example.com"), "Rep", &n.to_string());
        owners.push(id);
    }
    let stages = [
        "appointmentscheduled",
        "qualifiedtobuy",
        "presentationscheduled",
        "decisionmakerboughtin",
        "contractsent",
        "closedwon",
        "closedlost",
    ];
    let mut all = hubspot.state.deals.lock().unwrap();
    for id in 1..=deals {
        let mut deal = HsDeal::new(
            id,
            &format!("Deal {id}"),
            stages[(id % 7) as usize],
            base_ms + id as i64 * 1000,
        );
        deal.contact = Some(50_000 + id % 1000);
        deal.owner = Some(owners[(id % owners.len() as u64) as usize].clone());
        deal.extra = extra.clone();
        all.insert(id, deal);
    }
}

async fn runtime_for(
    dir: &std::path::Path,
    url: &str,
    rate: &str,
) -> (Arc<ConnectionRuntime>, SyncDeps) {
    runtime_on(dir, url, rate, None).await
}

/// The connection and its dependencies, the store on `postgres` when given, else the
/// SQLite file in `dir`.
async fn runtime_on(
    dir: &std::path::Path,
    url: &str,
    rate: &str,
    postgres: Option<&str>,
) -> (Arc<ConnectionRuntime>, SyncDeps) {
    let path = dir.join("dealsync.toml");
    let text = format!(
        "[storage]\npath = \"{}/bench.db\"\n\n[connections.hs]\nconnector = \"hubspot\"\nbase_url = \"{url}\"\ntoken = \"pat-bench\"\n{rate}\n",
        dir.display()
    );
    std::fs::write(&path, &text).unwrap();
    let config = dealsync::config::parse(&path, &text, &ProcessEnv).expect("bench config");
    let runtimes = ConnectionRuntime::build_all(&config).expect("bench connection");
    let db = config.storage.path.clone();
    let store = match postgres {
        Some(url) => {
            let url = PostgresUrl::parse(&Secret::new(url.to_owned())).expect("--url");
            Store::open_postgres(&url).await.expect("opening --url")
        }
        None => tokio::task::spawn_blocking(move || Store::open(&db))
            .await
            .unwrap()
            .unwrap(),
    };
    store.ensure_connection("hs", "hubspot").await.unwrap();
    let deps = SyncDeps {
        store,
        metrics: Arc::new(Metrics::new()),
        attention: None,
    };
    (runtimes[0].clone(), deps)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let deals = env_number("DEALS", 100_000);
        let changed = env_number("CHANGED", 1_000);
        let limited_deals = env_number("LIMITED_DEALS", 20_000);
        let shutdown = CancellationToken::new();

        // 1. Full sync, no rate limit.
        let hubspot = HubSpot::start("pat-bench", None).await;
        let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
        fill(&hubspot, deals, base);
        let dir = tempfile::tempdir().unwrap();
        let (connection, deps) = runtime_for(
            dir.path(),
            &hubspot.url(),
            "rate_limit = { requests_per_second = 1000000.0, burst = 1000 }",
        )
        .await;
        let cpu = cpu_seconds("self");
        let started = Instant::now();
        let summary = sync::run_once(&connection, &deps, true, &shutdown, &|_| {}).await.expect("full sync");
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds("self") - cpu;
        println!(
            "full sync: {} deals in {elapsed:.2} s = {:.0} deals/s; {} requests; CPU {cpu:.2} s (sync and mock); peak RSS {:.1} MiB (process, mock included); load {}",
            summary.fetched,
            summary.fetched as f64 / elapsed,
            summary.requests,
            peak_rss_mib(),
            load_average()
        );
        assert_eq!(summary.fetched, deals);
        let (rows, distinct, history) = stored(dir.path());
        println!("  stored: {rows} deals, {distinct} distinct ids, {history} history rows");
        assert_eq!((rows, distinct, history), (deals as i64, deals as i64, deals as i64), "every deal once, one history row each");

        if let Some(url) = arg("--url") {
            let (connection, deps) = runtime_on(
                dir.path(),
                &hubspot.url(),
                "rate_limit = { requests_per_second = 1000000.0, burst = 1000 }",
                Some(&url),
            )
            .await;
            assert_eq!(stored_postgres(&url).await.0, 0, "--url must name an empty database");
            let cpu = cpu_seconds("self");
            let started = Instant::now();
            let summary = sync::run_once(&connection, &deps, true, &shutdown, &|_| {}).await.expect("full sync on PostgreSQL");
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds("self") - cpu;
            println!(
                "full sync on PostgreSQL: {} deals in {elapsed:.2} s = {:.0} deals/s; {} requests; CPU {cpu:.2} s of this process (sync and mock; the server's is apart); load {}",
                summary.fetched,
                summary.fetched as f64 / elapsed,
                summary.requests,
                load_average()
            );
            let (rows, distinct, history) = stored_postgres(&url).await;
            println!("  stored: {rows} deals, {distinct} distinct ids, {history} history rows");
            assert_eq!((rows, distinct, history), (deals as i64, deals as i64, deals as i64), "every deal once, one history row each");
        }

        let by_path = |hubspot: &HubSpot| {
            let faults = hubspot.faults();
            [
                ("list", "/crm/v3/objects/deals?"),
                ("search", "/crm/v3/objects/deals/search"),
                ("association", "/crm/v4/associations/deals/contacts/batch/read"),
                ("contact", "/crm/v3/objects/contacts/batch/read"),
                ("owners", "/crm/v3/owners"),
            ]
            .map(|(name, path)| (name, faults.count(path)))
        };
        let before = by_path(&hubspot);
        println!("  requests by kind: {before:?}");

        // 2. Incremental cycles, each after `k` other deals changed. The first follows
        // the full sync; each later one meets the changes of the ones before it (made
        // within the 5-minute lookback of their start) again, and asks nothing more
        // about those. The third has ten times the changes.
        let mut before = before;
        for (cycle, k) in [(1u64, changed), (2, changed), (3, changed * 10)] {
            // The changes of a cycle fall in the second before it, after the previous
            // cycle's read began (as changes between two reads do).
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = chrono::Utc::now().timestamp_millis();
            let step = (deals / k).max(1) as usize;
            for (n, id) in (cycle..=deals).step_by(step).take(k as usize).enumerate() {
                hubspot.update(id, |deal| {
                    deal.stage = "contractsent".into();
                    deal.modified_ms = now - 1000 + (n as u64 * 1000 / k) as i64;
                });
            }
            let summary = sync::run_once(&connection, &deps, false, &shutdown, &|_| {}).await.expect("incremental");
            let after = by_path(&hubspot);
            let kinds: Vec<(&str, usize)> = after
                .iter()
                .zip(&before)
                .map(|((name, total), (_, earlier))| (*name, total - earlier))
                .collect();
            println!(
                "incremental cycle {cycle}: k = {k} changed; {} read, {} of them met unchanged (nothing more asked); {} requests {kinds:?}; ⌈k / 200⌉ = {}, ⌈k / 1000⌉ = {}",
                summary.fetched,
                summary.unchanged,
                summary.requests,
                k.div_ceil(200),
                k.div_ceil(1000),
            );
            before = after;
        }
        drop(hubspot);

        // 3. Against HubSpot's burst limit.
        let limited = HubSpot::start("pat-bench", None).await;
        fill(&limited, limited_deals, base);
        *limited.state.burst.lock().unwrap() = Some(Burst {
            max: 190,
            window: Duration::from_secs(10),
            recent: Default::default(),
        });
        let dir = tempfile::tempdir().unwrap();
        let (connection, deps) = runtime_for(
            dir.path(),
            &limited.url(),
            "rate_limit = { window_requests = 190, window = \"10s\" }",
        )
        .await;
        let started = Instant::now();
        let summary = sync::run_once(&connection, &deps, true, &shutdown, &|_| {}).await.expect("rate-limited sync");
        let elapsed = started.elapsed().as_secs_f64();
        // The floor of the requests this sync made (a list page per 100 deals, plus a
        // contact batch read per 100 contacts not read before in this run), and the
        // issue's floor assuming one request per 200 deals.
        let floor = summary.requests as f64 / 19.0;
        let ideal = limited_deals as f64 / 200.0 / 19.0;
        println!(
            "rate-limited full sync: {} deals, {} requests in {elapsed:.1} s; floor of these requests at 190 per 10 s = {floor:.1} s ({:+.1}%); deals / 200 / 19 per s = {ideal:.1} s; 429s answered: {}; load {}",
            summary.fetched,
            summary.requests,
            (elapsed / floor - 1.0) * 100.0,
            limited.state.rate_limited.load(Ordering::SeqCst),
            load_average()
        );
        let (rows, distinct, _) = stored(dir.path());
        assert_eq!((rows, distinct), (limited_deals as i64, limited_deals as i64));
    });
}
