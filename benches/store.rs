//! Store benchmark: 100,000 synthetic deals upserted in batches, then each moved to
//! another stage (one history row each), on a real SQLite file.
//!
//!     cargo bench --bench store
//!
//! Prints upserts per second for the inserts, the stage changes and the no-op
//! re-upserts. Target: ≥ 100,000 upserts/s on a 2-core machine.

#![allow(clippy::print_stdout)]

use chrono::{Duration, Utc};
use dealsync::domain::{
    ChangeCause, ConnectionName, Currency, DealStatus, EmailAddress, Money, PipelineKey,
    SourceDeal, StageKey, StageRef,
};
use dealsync::store::{DealUpsert, Store};
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
        Currency::parse("EUR").unwrap(),
    ));
    source.contact_email = EmailAddress::parse(&format!("buyer{n}@example.com"));
    source.updated_at = Some(at);
    source.raw = serde_json::json!({"id": n.to_string(), "properties": {"dealname": format!("Deal {n}"), "dealstage": stage, "amount": "123.45"}});
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

async fn pass(store: &Store, label: &str, stage: usize, at: chrono::DateTime<Utc>) -> f64 {
    let batches: Vec<Vec<DealUpsert>> = (0..DEALS)
        .step_by(BATCH)
        .map(|start| {
            (start..start + BATCH)
                .map(|n| upsert(n, n + stage, at))
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut stage_changes = 0;
    for (index, batch) in batches.into_iter().enumerate() {
        let start = index * BATCH;
        let outcome = store
            .commit_page(
                "bench",
                "deals",
                batch,
                vec![],
                Some(serde_json::json!({"after": start})),
            )
            .await
            .unwrap();
        stage_changes += outcome.stage_changes;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = DEALS as f64 / elapsed;
    println!(
        "{label:<28} {DEALS} upserts in {elapsed:.2} s = {rate:>9.0} upserts/s ({stage_changes} stage changes)"
    );
    rate
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("bench.db")).unwrap();
    let t0 = Utc::now() - Duration::hours(1);
    pass(&store, "insert (new deals)", 0, t0).await;
    pass(
        &store,
        "update with stage change",
        1,
        t0 + Duration::minutes(1),
    )
    .await;
    pass(&store, "re-upsert, unchanged", 1, t0 + Duration::minutes(1)).await;
}
