//! People benchmark: linking deals from four connections to people and companies, on
//! a real SQLite file.
//!
//!     cargo bench --bench people                          # 1,000,000 deals
//!     PEOPLE_BENCH_DEALS=20000 cargo bench --bench people  # a quick run
//!
//! 1. Upserts the deals (four connections: a CRM each for HubSpot, Pipedrive and
//!    Salesforce, and a shop; every person appears in two of them, under addresses
//!    that differ in case, surrounding spaces and a Gmail `+tag`; a third of the
//!    addresses at free-mail domains), timing the inserts and a stage-change pass:
//!    the upsert rate with linking (the store bench's target, ≥ 100,000/s, applies).
//! 2. Rewinds the file to the schema before the people migration (untimed), then times
//!    reopening it: the migration and its one-time backfill over every deal.
//! 3. Times `Store::person` lookups of random people.
//!
//! Then checks what was written: every deal with a contact has its person, each person
//! key has the deals of both its connections, and free-mail deals have no company.

#![allow(clippy::print_stdout)]

mod common;

use anyhow::{Context, ensure};
use chrono::{Duration, Utc};
use common::load_average;
use dealsync::domain::{
    ChangeCause, ConnectionName, Currency, DealStatus, EmailAddress, Money, PipelineKey,
    SourceDeal, StageKey, StageRef,
};
use dealsync::store::{DealUpsert, Store, UpsertOutcome};
use std::time::Instant;

const BATCH: usize = 1_000;
const CONNECTIONS: &[&str] = &["hubspot", "pipedrive", "salesforce", "shop"];
const STAGES: &[&str] = &["lead_qualification", "proposal", "negotiation", "closing"];

fn deals() -> usize {
    std::env::var("PEOPLE_BENCH_DEALS")
        .ok()
        .and_then(|text| text.replace('_', "").parse().ok())
        .unwrap_or(1_000_000)
}

/// Deal `n`: person `n / 2`, so each person has two deals, in two connections, under
/// two spellings of one address.
fn address(n: usize) -> String {
    let person = n / 2;
    let second = n % 2 == 1;
    match person % 3 {
        // Free mail: the second spelling has a tag Gmail ignores and another case.
        0 if second => format!("Buyer.{person}+shop@GMail.com"),
        0 => format!("buyer.{person}@gmail.com"),
        // A company's domain, shared by many people.
        _ if second => format!("  Buyer{person}@Company{}.Example ", person % 1000),
        _ => format!("buyer{person}@company{}.example", person % 1000),
    }
}

fn upsert(n: usize, stage: usize, at: chrono::DateTime<Utc>) -> DealUpsert {
    let stage = STAGES[stage % STAGES.len()];
    let connection = CONNECTIONS[(n / 2 + n % 2) % CONNECTIONS.len()];
    let mut source = SourceDeal::new(format!("{n}"), format!("Deal {n}"), "default", stage);
    source.amount = Some(Money::new(
        (n as i64 % 5000) * 100,
        Currency::parse("EUR").expect("EUR is a currency"),
    ));
    source.contact_email = EmailAddress::parse(&address(n));
    source.updated_at = Some(at);
    source.raw = dealsync::domain::RawRecord::from_value(
        &serde_json::json!({"id": n.to_string(), "properties": {"dealname": format!("Deal {n}"), "dealstage": stage}}),
    );
    DealUpsert {
        connection: ConnectionName::new(connection),
        target: StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new(stage),
        },
        status: DealStatus::Open,
        source,
        observed_at: at,
        cause: ChangeCause::Poll,
    }
}

async fn pass(
    store: &Store,
    total_deals: usize,
    label: &str,
    stage: usize,
    at: chrono::DateTime<Utc>,
) -> anyhow::Result<UpsertOutcome> {
    let batches: Vec<Vec<DealUpsert>> = (0..total_deals)
        .step_by(BATCH)
        .map(|start| {
            (start..(start + BATCH).min(total_deals))
                .map(|n| upsert(n, n + stage, at))
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut total = UpsertOutcome::default();
    for batch in batches {
        total.add(store.upsert_deals(batch).await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{label:<30} {total_deals} upserts in {elapsed:.2} s = {:>7.0} upserts/s \
         ({} created, {} updated, {} stage changes; load {})",
        total_deals as f64 / elapsed,
        total.created,
        total.updated,
        total.stage_changes,
        load_average()
    );
    Ok(total)
}

fn count(db: &rusqlite::Connection, sql: &str) -> anyhow::Result<i64> {
    db.query_row(sql, [], |row| row.get(0))
        .with_context(|| format!("counting: {sql}"))
}

/// Takes the file back to the schema before the people migration (SQLite version 2):
/// what an install upgrading to this release has.
fn rewind(path: &std::path::Path) -> anyhow::Result<()> {
    let db = rusqlite::Connection::open(path)?;
    db.execute_batch(
        "DROP TABLE writebacks;
         DROP INDEX deals_by_person;
         DROP INDEX deals_by_company;
         ALTER TABLE deals DROP COLUMN person_key;
         ALTER TABLE deals DROP COLUMN company_key;
         PRAGMA user_version = 3;",
    )
    .context("rewinding the schema")?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total_deals = deals();
    ensure!(
        total_deals >= 2 && total_deals % 2 == 0,
        "PEOPLE_BENCH_DEALS must be even"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.db");
    let store = Store::open(&path)?;
    let t0 = Utc::now() - Duration::hours(1);
    let inserted = pass(&store, total_deals, "insert, linked", 0, t0).await?;
    let moved = pass(
        &store,
        total_deals,
        "stage change, linked",
        1,
        t0 + Duration::minutes(1),
    )
    .await?;
    let expected = total_deals as u64;
    ensure!(inserted.created == expected, "insert pass: {inserted:?}");
    ensure!(moved.updated == expected, "stage-change pass: {moved:?}");
    drop(store);

    rewind(&path)?;
    let started = Instant::now();
    let store = Store::open(&path)?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{:<30} {total_deals} deals in {elapsed:.2} s = {:>7.0} deals/s (load {})",
        "backfill (migration)",
        total_deals as f64 / elapsed,
        load_average()
    );

    let lookups = 1_000.min(total_deals / 2);
    let mut times = Vec::with_capacity(lookups);
    for i in 0..lookups {
        let person = (i * 7919) % (total_deals / 2);
        let started = Instant::now();
        let found = store
            .person(&address(person * 2 + 1))
            .await?
            .context("a bench address is an address")?;
        times.push(started.elapsed());
        ensure!(
            found.deals.len() == 2,
            "person {person}: {} deals",
            found.deals.len()
        );
    }
    times.sort();
    println!(
        "{:<30} {lookups} lookups: median {:.2} ms, p99 {:.2} ms",
        "people show (Store::person)",
        times[lookups / 2].as_secs_f64() * 1000.0,
        times[lookups * 99 / 100].as_secs_f64() * 1000.0
    );
    drop(store);

    let db = rusqlite::Connection::open(&path)?;
    let all = total_deals as i64;
    ensure!(
        count(
            &db,
            "SELECT count(*) FROM deals WHERE person_key IS NOT NULL"
        )? == all
    );
    ensure!(
        count(&db, "SELECT count(DISTINCT person_key) FROM deals")? == all / 2,
        "one person per two deals"
    );
    ensure!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT person_key FROM deals GROUP BY person_key
             HAVING count(DISTINCT connection) != 2)"
        )? == 0,
        "a person whose two deals are not in two connections"
    );
    ensure!(
        count(
            &db,
            "SELECT count(*) FROM deals WHERE person_key LIKE '%@gmail.com' AND company_key IS NOT NULL"
        )? == 0,
        "a free-mail deal linked to a company"
    );
    println!(
        "checked: {total_deals} deals linked to {} people across {} connections",
        all / 2,
        CONNECTIONS.len()
    );
    Ok(())
}
