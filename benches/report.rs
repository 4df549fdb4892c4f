//! Report benchmark: the full funnel report (every pipeline, per connection, forecast,
//! cart recovery) over 1,000,000 deals with 5,000,000 stage-history rows and 300,000
//! sent follow-ups, in a real SQLite file.
//!
//!     cargo bench --bench report                 # history appended in time order
//!     cargo bench --bench report -- --deal-order # history rows grouped per deal
//!     cargo bench --bench report -- --db PATH    # keep the generated file at PATH and
//!                                                # reuse it next time (delete it after)
//!     cargo bench --bench report -- --raw-bytes N # source record size per deal
//!                                                # (default 2,000, as a CRM deal's
//!                                                # JSON; 0 gives the narrow table)
//!     cargo bench --bench report -- --db PATH --deals N --history N --generate-only
//!                                                # only write a file of that size (an
//!                                                # install for `dealsync migrate-store`)
//!     cargo bench --bench report -- --url postgres://USER:PASSWORD@HOST:PORT/DB
//!                                                # then the same report on PostgreSQL:
//!                                                # the file is copied into the database
//!                                                # (as `migrate-store` does) when it is
//!                                                # empty, else the rows there are used
//!
//! Time order is what a running daemon produces (each stage change appended as it
//! happens, so one deal's rows are scattered over the table); grouped rows are the
//! friendly case. Target: the report in ≤ 2 s on a 2-core machine.

#![allow(clippy::print_stdout)]

use chrono::{TimeZone, Utc};
use dealsync::config::{PostgresUrl, Secret};
use dealsync::pipeline::{Pipelines, default_pipelines};
use dealsync::report::ReportOptions;
use dealsync::store::Store;
use dealsync::store::postgres::from_sqlite::copy_sqlite_install;
use dealsync::store::postgres::{Database, Options};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// The default size; `--deals` and `--history` change it.
const DEALS: i64 = 1_000_000;
const HISTORY_ROWS: i64 = 5_000_000;
const SALES: &[&str] = &[
    "lead_generation",
    "lead_qualification",
    "needs_assessment",
    "proposal",
    "negotiation",
    "closing",
];
const CONNECTIONS: &[&str] = &["hubspot-eu", "pipedrive-us", "salesforce", "shop"];
const HOUR_MS: i64 = 3_600_000;

/// One deal's generated history: (at, pipeline, stage) rows, and its current state.
struct Generated {
    rows: Vec<(i64, &'static str, &'static str)>,
    status: &'static str,
}

fn sales_history(rng: &mut SmallRng, start: i64, rows: usize) -> Generated {
    let mut out = Vec::with_capacity(rows);
    let mut at = start;
    let mut position = 0usize;
    for row in 0..rows {
        let stage = if row + 1 == rows && rng.random_bool(0.5) {
            if rng.random_bool(0.4) { "won" } else { "lost" }
        } else {
            SALES[position.min(SALES.len() - 1)]
        };
        out.push((at, "sales", stage));
        at += rng.random_range(1..240) * HOUR_MS;
        // Mostly forward, sometimes a skip, sometimes a step back.
        position = match rng.random_range(0..10) {
            0 => position.saturating_sub(1),
            1 => position + 2,
            _ => position + 1,
        };
    }
    let status = match out.last().map(|r| r.2) {
        Some("won") => "won",
        Some("lost") => "lost",
        _ => "open",
    };
    Generated { rows: out, status }
}

fn cart_history(rng: &mut SmallRng, start: i64, rows: usize) -> Generated {
    const CART: &[&str] = &[
        "checkout_started",
        "cart_abandoned",
        "follow_up_email",
        "discount_offer",
    ];
    let mut out = Vec::with_capacity(rows);
    let mut at = start;
    for row in 0..rows {
        let stage = if row + 1 == rows && row >= 2 {
            if rng.random_bool(0.4) {
                "purchase_completed"
            } else {
                "expired"
            }
        } else {
            CART[row.min(CART.len() - 1)]
        };
        out.push((at, "ecommerce", stage));
        at += rng.random_range(1..30) * HOUR_MS;
    }
    let status = match out.last().map(|r| r.2) {
        Some("purchase_completed") => "won",
        Some("expired") => "lost",
        _ => "open",
    };
    Generated { rows: out, status }
}

fn generate(
    path: &std::path::Path,
    deal_order: bool,
    raw_bytes: usize,
    (deals, history_rows): (i64, i64),
) -> anyhow::Result<()> {
    drop(Store::open(path)?);
    let mut db = rusqlite::Connection::open(path)?;
    db.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = WAL;")?;
    let mut rng = SmallRng::seed_from_u64(42);
    let year_start = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    let tx = db.transaction()?;
    let mut history: Vec<(i64, i64, &str, &str)> = Vec::with_capacity(history_rows as usize);
    {
        let mut deal = tx.prepare(
            "INSERT INTO deals (id, connection, external_id, title, amount_minor, currency,
                pipeline, stage, status, native_pipeline, native_stage, expected_close,
                stage_entered_at, last_activity_at, first_seen_at, synced_at, content_hash, raw)
             VALUES (?1, ?2, ?1, ?3, ?4, ?5, ?6, ?7, ?8, 'native', 'native', ?9, ?10, ?10, ?11, ?10, 0, ?12)",
        )?;
        // The source record as a connector stores it: a JSON object of about
        // `raw_bytes` (the report never reads it, but it widens every deals row).
        let filler = "x".repeat(raw_bytes.saturating_sub(20));
        let raw = if raw_bytes == 0 {
            "{}".to_owned()
        } else {
            serde_json::json!({ "properties": { "notes": filler } }).to_string()
        };
        let mut written = 0i64;
        for id in 1..=deals {
            // Five rows per deal on average (3..=7), exactly `history_rows` in total.
            let remaining_deals = deals - id + 1;
            let remaining_rows = history_rows - written;
            let rows = if remaining_deals == 1 {
                remaining_rows
            } else {
                rng.random_range(3..=7)
                    .min(remaining_rows - (remaining_deals - 1))
                    .max(1)
            } as usize;
            written += rows as i64;
            let connection = CONNECTIONS[(id % CONNECTIONS.len() as i64) as usize];
            let start = year_start + rng.random_range(0..300 * 24) * HOUR_MS;
            let generated = if connection == "shop" {
                cart_history(&mut rng, start, rows)
            } else {
                sales_history(&mut rng, start, rows)
            };
            let last = *generated.rows.last().expect("at least one row");
            let currency = ["EUR", "USD", "GBP"][rng.random_range(0..3)];
            let close = format!("2026-{:02}-15", rng.random_range(1..=12));
            deal.execute(rusqlite::params![
                id,
                connection,
                format!("Deal {id}"),
                rng.random_range(1_000..5_000_000i64),
                currency,
                last.1,
                last.2,
                generated.status,
                close,
                last.0,
                generated.rows[0].0,
                raw,
            ])?;
            for (at, pipeline, stage) in generated.rows {
                history.push((id, at, pipeline, stage));
            }
        }
    }
    if !deal_order {
        // The order a running daemon appends them in: by time.
        history.sort_by_key(|row| row.1);
    }
    {
        let mut row = tx.prepare(
            "INSERT INTO stage_history (deal_id, at, to_pipeline, to_stage, native_to, cause)
             VALUES (?1, ?2, ?3, ?4, 'native', 'poll')",
        )?;
        for (deal_id, at, pipeline, stage) in &history {
            row.execute(rusqlite::params![deal_id, at, pipeline, stage])?;
        }
        let mut outbox = tx.prepare(
            "INSERT OR IGNORE INTO outbox (deal_id, rule, step, recipient, state, anchor_at,
                due_at, next_attempt_at, created_at, updated_at, sent_at)
             VALUES (?1, 'cart', ?2, 'x@example.com', 'sent', ?3, ?3, ?3, ?3, ?3, ?3)",
        )?;
        let mut sent = 0;
        for (deal_id, at, _, stage) in &history {
            let step = match *stage {
                "follow_up_email" => 1,
                "discount_offer" => 2,
                _ => continue,
            };
            if sent < 300_000 {
                outbox.execute(rusqlite::params![deal_id, step, at])?;
                sent += 1;
            }
        }
    }
    tx.commit()?;
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")?;
    Ok(())
}

/// FNV-1a, 64 bits: a stable fingerprint of the report's JSON.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let deal_order = args.iter().any(|a| a == "--deal-order");
    let kept = args
        .iter()
        .position(|a| a == "--db")
        .and_then(|at| args.get(at + 1))
        .map(std::path::PathBuf::from);
    let raw_bytes = args
        .iter()
        .position(|a| a == "--raw-bytes")
        .and_then(|at| args.get(at + 1))
        .map(|n| n.parse::<usize>())
        .transpose()?
        .unwrap_or(2_000);
    let number = |flag: &str, default: i64| -> anyhow::Result<i64> {
        Ok(args
            .iter()
            .position(|a| a == flag)
            .and_then(|at| args.get(at + 1))
            .map(|n| n.parse::<i64>())
            .transpose()?
            .unwrap_or(default))
    };
    let (deals, history_rows) = (
        number("--deals", DEALS)?,
        number("--history", HISTORY_ROWS)?,
    );
    let dir = tempfile::tempdir()?;
    let path = kept.clone().unwrap_or_else(|| dir.path().join("report.db"));
    if path.exists() {
        println!("reusing {}", path.display());
    } else {
        let started = Instant::now();
        generate(&path, deal_order, raw_bytes, (deals, history_rows))?;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "generated {deals} deals ({raw_bytes}-byte records), {history_rows} history rows ({}) in {:.1}s, {} MB",
            if deal_order {
                "grouped per deal"
            } else {
                "in time order"
            },
            started.elapsed().as_secs_f64(),
            size / 1_000_000
        );
    }
    if args.iter().any(|a| a == "--generate-only") {
        return Ok(());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let store = Store::open(&path)?;
    time_reports(&runtime, &store, "SQLite", 2.0)?;
    if let Some(url) = args
        .iter()
        .position(|a| a == "--url")
        .and_then(|at| args.get(at + 1))
    {
        let text = url.clone();
        let url = PostgresUrl::parse(&Secret::new(text.clone())).map_err(anyhow::Error::msg)?;
        let database = runtime.block_on(Database::open(&url, &Options::default()))?;
        let stored: i64 = runtime.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&text, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let row = client.query_one("SELECT count(*) FROM deals", &[]).await?;
            anyhow::Ok(row.get(0))
        })?;
        if stored == 0 {
            let started = Instant::now();
            runtime.block_on(copy_sqlite_install(&path, &database, &mut |_, _| {}))?;
            println!(
                "copied into PostgreSQL in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        } else {
            println!("reusing the {stored} deals in the PostgreSQL database");
        }
        let store = runtime.block_on(Store::open_postgres(&url))?;
        time_reports(&runtime, &store, "PostgreSQL", 3.0)?;
    }
    Ok(())
}

/// Runs the full report four times on `store`: the first run's fingerprint and figures,
/// then the best and median of the three warm runs.
fn time_reports(
    runtime: &tokio::runtime::Runtime,
    store: &Store,
    backend: &str,
    target_seconds: f64,
) -> anyhow::Result<()> {
    let pipelines = Pipelines::new(default_pipelines());
    let until = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let mut timings = Vec::new();
    for run in 0..4 {
        let options = ReportOptions::last_days(until, 90);
        let started = Instant::now();
        let report = runtime.block_on(store.report(pipelines.clone(), options))?;
        let elapsed = started.elapsed().as_secs_f64();
        if run == 0 {
            // Every figure, total and per connection, in one number: equal fingerprints
            // mean identical reports across scan strategies.
            let json = serde_json::to_string(&report)?;
            println!(
                "{backend}: report fingerprint {:016x} ({} bytes of JSON)",
                fnv1a(json.as_bytes()),
                json.len()
            );
            let sales = &report.total.pipelines[0];
            println!(
                "{backend}: first run (cold cache) {elapsed:.2}s: {} deals, sales won {} lost {}, {} forecast rows, {} abandoned carts",
                report.total.deals,
                sales.outcomes.won,
                sales.outcomes.lost,
                report.total.forecast.len(),
                report.total.cart_recovery.abandoned
            );
        } else {
            timings.push(elapsed);
        }
    }
    timings.sort_by(f64::total_cmp);
    println!(
        "{backend}: full report: best {:.2}s, median {:.2}s over {} warm runs (target ≤ {target_seconds} s); load average {}",
        timings[0],
        timings[timings.len() / 2],
        timings.len(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    );
    Ok(())
}
