//! `dealsync report` on the fixed history of tests/fixtures/report_history.sql, whose
//! figures are worked out by hand in docs/report.md.

use crate::harness::daemon::run_cli;
use serde_json::Value;

pub const FIXTURE: &str = include_str!("../fixtures/report_history.sql");

/// A config naming the fixture's connections, and a migrated store holding the fixture.
pub fn fixture_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let db = dir.join("report.db");
    drop(dealsync::store::Store::open(&db).expect("migrating the store"));
    rusqlite::Connection::open(&db)
        .expect("opening the store")
        .execute_batch(FIXTURE)
        .expect("loading the fixture");
    let config = dir.join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n{extra}\n[connections.crm-eu]\nconnector = \"demo\"\n\n[connections.crm-us]\nconnector = \"demo\"\n\n[connections.shop]\nconnector = \"demo\"\n",
            db.display()
        ),
    )
    .expect("writing the config");
    config
}

fn stage<'v>(report: &'v Value, pipeline: &str, stage: &str) -> &'v Value {
    report["total"]["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pipeline"] == pipeline)
        .unwrap()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap()
}

#[tokio::test]
async fn report_as_json_gives_the_hand_computed_figures_for_january() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            config.to_str().unwrap(),
            "report",
            "--since",
            "2026-01-01",
            "--until",
            "2026-02-01",
            "--min-cohort",
            "2",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("the output is JSON");

    let proposal = stage(&report, "sales", "proposal");
    assert_eq!(proposal["entered"], 4);
    assert_eq!(proposal["cohort"], 4);
    assert_eq!(proposal["advanced"], 1);
    assert_eq!(proposal["conversion"], 0.25);
    assert_eq!(proposal["time_in_stage"]["median_seconds"], 4.0 * 86_400.0);
    assert_eq!(proposal["time_in_stage"]["p90_seconds"], 6.0 * 86_400.0);
    assert_eq!(
        proposal["open_value"],
        serde_json::json!([
            {"currency": "EUR", "minor": 250000, "amount": "2500.00"},
            {"currency": "USD", "minor": 200000, "amount": "2000.00"}
        ])
    );
    assert_eq!(stage(&report, "sales", "needs_assessment")["stalled"], 1);

    let sales = &report["total"]["pipelines"][0];
    assert_eq!(sales["bottleneck"]["stage"], "proposal");
    assert_eq!(sales["bottleneck"]["reason"], "lowest_conversion");
    assert_eq!(sales["outcomes"]["won"], 2);
    assert_eq!(sales["outcomes"]["lost"], 1);
    assert_eq!(sales["outcomes"]["reopened"], 2);

    assert_eq!(
        report["total"]["forecast"][0],
        serde_json::json!({
            "currency": "EUR", "month": null, "deals": 2,
            "amount": {"currency": "EUR", "minor": 104005, "amount": "1040.05"},
            "weighted": {"currency": "EUR", "minor": 21202, "amount": "212.02"}
        })
    );
    let carts = &report["total"]["cart_recovery"];
    assert_eq!(carts["abandoned"], 4);
    assert_eq!(carts["recovered"], 2);
    assert_eq!(carts["recovery_rate"], 0.5);
    assert_eq!(report["by_connection"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn report_refuses_an_unknown_pipeline_or_connection_with_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let config = config.to_str().unwrap();
    let (code, _, stderr) =
        run_cli(&["--config", config, "report", "--pipeline", "nope"], &[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("known: sales, ecommerce"), "{stderr}");
    let (code, _, stderr) =
        run_cli(&["--config", config, "report", "--connection", "nope"], &[]).await;
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) =
        run_cli(&["--config", config, "report", "--since", "yesterday"], &[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("expected a date like 2026-01-31"),
        "{stderr}"
    );
}

/// The weighted forecast is Σ amount × probability / 100 over a group's open deals,
/// rounded half away from zero once, at the end (docs/report.md). Each deal below
/// weighs a fraction of a minor unit, so rounding per deal would give another total.
#[tokio::test]
async fn the_weighted_forecast_sums_exact_fractions_and_rounds_once() {
    use dealsync::domain::{
        ChangeCause, ConnectionName, Currency, DealStatus, Money, PipelineKey, SourceDeal,
        StageKey, StageRef,
    };
    use dealsync::store::{DealUpsert, Store};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("report.db");
    let store = Store::open(&db).expect("migrating the store");
    let entered = chrono::Utc::now() - chrono::Duration::hours(1);
    // (id, currency, amount in minor units, sales stage and its default probability)
    let deals = [
        // proposal, 60 %: 1001 × 0.60 = 600.6 each.
        ("e1", "EUR", 1001, "proposal"),
        ("e2", "EUR", 1001, "proposal"),
        ("e3", "EUR", 1001, "proposal"),
        // lead qualification, 20 %: 1003 × 0.20 = 200.6 each.
        ("u1", "USD", 1003, "lead_qualification"),
        ("u2", "USD", 1003, "lead_qualification"),
        // lead generation, 10 %: 1005 × 0.10 = 100.5 each, a half.
        ("g1", "GBP", 1005, "lead_generation"),
        ("g2", "GBP", 1005, "lead_generation"),
    ];
    let upserts = deals
        .iter()
        .map(|(id, currency, amount, stage)| {
            let mut source = SourceDeal::new(*id, format!("Deal {id}"), "default", *stage);
            source.amount = Some(Money::new(*amount, Currency::parse(currency).unwrap()));
            source.created_at = Some(entered);
            source.updated_at = Some(entered);
            source.stage_changed_at = Some(entered);
            DealUpsert {
                connection: ConnectionName::new("crm"),
                source,
                target: StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new(*stage),
                },
                status: DealStatus::Open,
                observed_at: entered,
                cause: ChangeCause::Poll,
            }
        })
        .collect();
    store.upsert_deals(upserts).await.unwrap();
    drop(store);
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n\n[connections.crm]\nconnector = \"demo\"\n",
            db.display()
        ),
    )
    .unwrap();

    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            config.to_str().unwrap(),
            "report",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("the output is JSON");
    let weighted = |currency: &str| -> (i64, i64) {
        let row = report["total"]["forecast"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["currency"] == currency)
            .unwrap_or_else(|| panic!("no {currency} forecast in {}", report["total"]));
        (
            row["deals"].as_i64().unwrap(),
            row["weighted"]["minor"].as_i64().unwrap(),
        )
    };
    // EUR: 3 × 600.6 = 1801.8 → 1802 (per deal: 3 × 601 = 1803).
    assert_eq!(weighted("EUR"), (3, 1802));
    // USD: 2 × 200.6 = 401.2 → 401 (per deal: 2 × 201 = 402).
    assert_eq!(weighted("USD"), (2, 401));
    // GBP: 2 × 100.5 = 201, exact (per deal: 2 × 101 = 202).
    assert_eq!(weighted("GBP"), (2, 201));
}
