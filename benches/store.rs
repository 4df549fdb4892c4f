//! Store benchmark: 100,000 synthetic deals upserted in batches, then each moved to
//! another stage (one history row each), on a real SQLite file.
//!
//!     cargo bench --bench store
//!
//! Prints upserts per second for the inserts, the stage changes and the no-op
//! re-upserts, with the load average, then checks what was written: every deal once,
//! exactly one history row per stage change, nothing written by the no-op pass.
//! Target: ≥ 100,000 upserts/s on a 2-core machine, for the inserts and for the stage
//! changes. Inputs are built before each timed pass; the timed region is the
//! `Store::commit_page` calls only (deals, history rows and cursor per transaction).

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

const DEALS: usize = 100_000;
const BATCH: usize = 1_000;
const STAGES: &[&str] = &[
    "lead_generation",
    "lead_qualification",
    "needs_assessment",
    "proposal",
    "negotiation",
    "closing",
];

fn upsert(n: usize, stage: usize, at: chrono::DateTime<Utc>) -> DealUpsert {
    let stage = STAGES[stage % STAGES.len()];
    let mut source = SourceDeal::new(format!("{n}"), format!("Deal {n}"), "default", stage);
    source.amount = Some(Money::new(
        (n as i64 % 5000) * 100,
        Currency::parse("EUR").expect("EUR is a currency"),
    ));
    source.contact_email = EmailAddress::parse(&format!("buyer{n}@example.com"));
    source.updated_at = Some(at);
    source.raw = dealsync::domain::RawRecord::from_value(
        &serde_json::json!({"id": n.to_string(), "properties": {"dealname": format!("Deal {n}"), "dealstage": stage, "amount": "123.45"}}),
    );
    DealUpsert {
        connection: ConnectionName::new("bench"),
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
    label: &str,
    stage: usize,
    at: chrono::DateTime<Utc>,
) -> anyhow::Result<UpsertOutcome> {
    let batches: Vec<Vec<DealUpsert>> = (0..DEALS)
        .step_by(BATCH)
        .map(|start| {
            (start..start + BATCH)
                .map(|n| upsert(n, n + stage, at))
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut total = UpsertOutcome::default();
    for (index, batch) in batches.into_iter().enumerate() {
        let start = index * BATCH;
        let outcome = store
            .commit_page(
                "bench",
                "deals",
                batch,
                vec![],
                vec![],
                Some(serde_json::json!({"after": start})),
            )
            .await?;
        total.add(outcome);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = DEALS as f64 / elapsed;
    println!(
        "{label:<26} {DEALS} upserts in {elapsed:.2} s = {rate:>7.0} upserts/s \
         ({} created, {} updated, {} unchanged, {} stage changes; load {})",
        total.created,
        total.updated,
        total.unchanged,
        total.stage_changes,
        load_average()
    );
    Ok(total)
}

fn count(db: &rusqlite::Connection, sql: &str) -> anyhow::Result<i64> {
    db.query_row(sql, [], |row| row.get(0))
        .with_context(|| format!("counting: {sql}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.db");
    let store = Store::open(&path)?;
    let t0 = Utc::now() - Duration::hours(1);
    let t1 = t0 + Duration::minutes(1);
    let inserted = pass(&store, "insert (new deals)", 0, t0).await?;
    let moved = pass(&store, "update with stage change", 1, t1).await?;
    let repeated = pass(&store, "re-upsert, unchanged", 1, t1).await?;

    let deals = DEALS as u64;
    ensure!(
        (inserted.created, inserted.stage_changes) == (deals, deals),
        "insert pass: {inserted:?}"
    );
    ensure!(
        (moved.updated, moved.stage_changes) == (deals, deals),
        "stage-change pass: {moved:?}"
    );
    ensure!(
        repeated
            == UpsertOutcome {
                unchanged: deals,
                ..Default::default()
            },
        "no-op pass: {repeated:?}"
    );
    let db = rusqlite::Connection::open(&path)?;
    let expected = DEALS as i64;
    ensure!(count(&db, "SELECT count(*) FROM deals")? == expected);
    ensure!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT 1 FROM deals GROUP BY connection, external_id HAVING count(*) > 1)"
        )? == 0,
        "duplicate deals"
    );
    ensure!(count(&db, "SELECT count(*) FROM stage_history")? == 2 * expected);
    ensure!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT deal_id FROM stage_history GROUP BY deal_id
             HAVING count(*) != 2 OR count(from_stage) != 1)"
        )? == 0,
        "a deal without exactly one creation and one stage-change history row"
    );
    ensure!(
        count(
            &db,
            "SELECT count(*) FROM stage_history h JOIN deals d ON d.id = h.deal_id
             WHERE h.from_stage IS NOT NULL AND (h.to_stage != d.stage OR h.from_stage = h.to_stage)"
        )? == 0,
        "a history row that disagrees with its deal"
    );
    println!("checked: {DEALS} deals, each once, with exactly one history row per stage change");
    drop(store);
    Ok(())
}
