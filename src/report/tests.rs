//! The report against a fixed history whose figures were worked out by hand
//! (docs/report.md, "Worked example"), through the real store scan.

use super::*;
use crate::pipeline::{Pipelines, default_pipelines};
use crate::store::{ReportScope, Store};
use chrono::TimeZone;

const FIXTURE: &str = include_str!("../../tests/fixtures/report_history.sql");
const DAY: f64 = 86_400.0;
const HOUR: f64 = 3_600.0;

fn january(pipeline: Option<&str>) -> ReportOptions {
    ReportOptions {
        since: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        until: Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap(),
        pipeline: pipeline.map(str::to_owned),
        connection: None,
        min_cohort: 2,
        abandoned_stage: DEFAULT_ABANDONED_STAGE.to_owned(),
    }
}

async fn fixture_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.db");
    let store = Store::open(&path).unwrap();
    store.execute_batch_for_test(FIXTURE).await.unwrap();
    (dir, store)
}

async fn report(options: ReportOptions, scope: ReportScope) -> Report {
    let (_dir, store) = fixture_store().await;
    scan(&store, options, scope).await
}

async fn scan(store: &Store, options: ReportOptions, scope: ReportScope) -> Report {
    let pipelines = Pipelines::new(default_pipelines());
    store
        .scan_report(scope, Accumulator::new(pipelines, options))
        .await
        .unwrap()
        .finish()
}

fn pipeline<'r>(scope: &'r ScopeReport, key: &str) -> &'r PipelineReport {
    scope
        .pipelines
        .iter()
        .find(|p| p.pipeline == key)
        .unwrap_or_else(|| panic!("no pipeline {key}"))
}

fn stage<'r>(pipeline: &'r PipelineReport, key: &str) -> &'r StageReport {
    pipeline
        .stages
        .iter()
        .find(|s| s.stage == key)
        .unwrap_or_else(|| panic!("no stage {key}"))
}

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn money_of(totals: &[MoneyTotal]) -> Vec<(String, i64)> {
    totals
        .iter()
        .map(|t| (t.currency.to_string(), t.minor))
        .collect()
}

fn close(actual: Option<f64>, expected: f64) {
    let actual = actual.expect("a value");
    assert!(
        (actual - expected).abs() < 1e-9,
        "expected {expected}, got {actual}"
    );
}

/// (entered, exited, cohort, advanced, samples, median, p90) of one stage.
type Flow = (u64, u64, u64, u64, u64, Option<f64>, Option<f64>);

fn flow(stage: &StageReport) -> Flow {
    (
        stage.entered,
        stage.exited,
        stage.cohort,
        stage.advanced,
        stage.time_in_stage.samples,
        stage.time_in_stage.median_seconds,
        stage.time_in_stage.p90_seconds,
    )
}

/// (rule, step as shown, carts sent, recovered after) of each follow-up step.
fn steps_of(carts: &CartRecovery) -> Vec<(&str, String, u64, u64)> {
    carts
        .steps
        .iter()
        .map(|s| {
            (
                s.rule.as_str(),
                s.step.to_string(),
                s.carts_sent,
                s.recovered_after,
            )
        })
        .collect()
}

/// Asserts the [`Flow`] of each named stage of `pipeline`.
fn assert_flows(pipeline: &PipelineReport, expected: &[(&str, Flow)]) {
    for (key, figures) in expected {
        assert_eq!(flow(stage(pipeline, key)), *figures, "stage {key}");
    }
}

#[tokio::test]
async fn sales_flows_count_skipped_stages_backward_moves_and_reopened_deals_as_worked_out_by_hand()
{
    let report = report(january(None), ReportScope::default()).await;
    let sales = pipeline(&report.total, "sales");
    let d = |days: f64| Some(days * DAY);
    assert_flows(
        sales,
        &[
            ("lead_generation", (6, 6, 6, 6, 6, d(3.0), d(4.0))),
            ("lead_qualification", (3, 2, 3, 1, 2, d(2.0), d(9.0))),
            // B entered needs assessment twice (the second time moving backwards): two
            // entries, one cohort deal.
            ("needs_assessment", (2, 1, 1, 1, 1, d(4.0), d(4.0))),
            // C's proposal visit started in December and ended in January: an exit and a
            // sample, no entry.
            ("proposal", (4, 3, 4, 1, 3, d(4.0), d(6.0))),
            ("negotiation", (2, 2, 2, 2, 2, d(3.0), d(12.0))),
            ("closing", (0, 0, 0, 0, 0, None, None)),
            ("lost", (3, 2, 0, 0, 2, d(2.0), d(5.0))),
        ],
    );
    assert_eq!(stage(sales, "won").entered, 2);
    assert_eq!(stage(sales, "won").conversion, None);

    close(stage(sales, "lead_generation").conversion, 1.0);
    close(stage(sales, "lead_qualification").conversion, 1.0 / 3.0);
    close(stage(sales, "proposal").conversion, 0.25);
    assert_eq!(stage(sales, "closing").conversion, None);

    let outcomes = &sales.outcomes;
    assert_eq!((outcomes.won, outcomes.lost, outcomes.reopened), (2, 1, 2));
    close(outcomes.win_rate, 2.0 / 3.0);
    close(outcomes.loss_rate, 1.0 / 3.0);

    let bottleneck = sales.bottleneck.as_ref().unwrap();
    assert_eq!(bottleneck.stage, "proposal");
    assert_eq!(bottleneck.reason, BottleneckReason::LowestConversion);
}

/// docs/report.md, "Worked example": the value won in the period and how the weighted
/// forecast moved, each per currency.
#[tokio::test]
async fn won_value_and_the_forecast_change_are_per_currency() {
    let report = report(january(None), ReportScope::default()).await;
    // A (10000.00 EUR) and C (8000.00 USD) won in January.
    assert_eq!(
        money_of(&pipeline(&report.total, "sales").outcomes.won_value),
        vec![("EUR".into(), 1_000_000), ("USD".into(), 800_000)]
    );
    // H and J (120.00 + 50.00 EUR) and I (80.00 USD) bought.
    assert_eq!(
        money_of(&pipeline(&report.total, "ecommerce").outcomes.won_value),
        vec![("EUR".into(), 17_000), ("USD".into(), 8_000)]
    );
    let change: Vec<(String, i64, i64, i64, String)> = report
        .total
        .forecast_change
        .iter()
        .map(|c| {
            (
                c.currency.to_string(),
                c.at_since.minor,
                c.now.minor,
                c.change.minor,
                c.change.amount.clone(),
            )
        })
        .collect();
    assert_eq!(
        change,
        vec![
            // No EUR deal was open before Jan 1 (F's first visit is at the period's
            // start); now 21202 + 350000 (the forecast rows above).
            ("EUR".into(), 0, 371_202, 371_202, "3712.02".into()),
            // C sat in proposal (60 %) on Jan 1: 800000 × 60 %; now D's 120000.
            ("USD".into(), 480_000, 120_000, -360_000, "-3600.00".into()),
        ]
    );
}

#[tokio::test]
async fn open_stalled_and_forecast_figures_keep_currencies_apart_and_round_once() {
    let report = report(january(None), ReportScope::default()).await;
    let sales = pipeline(&report.total, "sales");

    let proposal = stage(sales, "proposal");
    assert_eq!(proposal.open_deals, 2);
    assert_eq!(
        money_of(&proposal.open_value),
        vec![("EUR".into(), 250000), ("USD".into(), 200000)]
    );
    assert_eq!(proposal.stalled, 0);

    let assessment = stage(sales, "needs_assessment");
    assert_eq!((assessment.open_deals, assessment.stalled), (1, 1));
    assert_eq!(
        money_of(&assessment.stalled_value),
        vec![("EUR".into(), 500000)]
    );
    let qualification = stage(sales, "lead_qualification");
    assert_eq!((qualification.open_deals, qualification.stalled), (1, 1));
    assert_eq!(stage(sales, "won").open_deals, 0);

    let forecast: Vec<(Currency, Option<String>, u64, i64, i64)> = report
        .total
        .forecast
        .iter()
        .map(|r| {
            (
                r.currency,
                r.month.clone(),
                r.deals,
                r.amount.minor,
                r.weighted.minor,
            )
        })
        .collect();
    assert_eq!(
        forecast,
        vec![
            // F 100000 × 20 % + L 4005 × 30 % = 20000 + 1201.5 → 21202 (rounded once, at the end)
            (eur(), None, 2, 104005, 21202),
            // B 500000 × 40 % + M 250000 × 60 %
            (eur(), Some("2026-02".into()), 2, 750000, 350000),
            // D 200000 × 60 %
            (usd(), Some("2026-03".into()), 1, 200000, 120000),
        ]
    );
    assert_eq!(report.total.forecast[0].weighted.amount, "212.02");
    assert_eq!(report.total.unmapped_open_deals, 1);
    assert_eq!(report.total.deals, 13);
}

#[tokio::test]
async fn cart_recovery_credits_the_last_follow_up_before_the_purchase() {
    let report = report(january(None), ReportScope::default()).await;
    let shop = pipeline(&report.total, "ecommerce");
    let h = |hours: f64| Some(hours * HOUR);
    assert_flows(
        shop,
        &[
            ("checkout_started", (5, 4, 5, 4, 4, h(1.0), h(1.0))),
            ("cart_abandoned", (4, 4, 4, 4, 4, h(1.0), h(2.0))),
            ("follow_up_email", (3, 3, 3, 3, 3, h(24.0), h(24.0))),
            ("discount_offer", (2, 2, 2, 1, 2, h(22.0), h(70.0))),
        ],
    );
    assert_eq!(
        shop.bottleneck.as_ref().map(|b| b.stage.as_str()),
        Some("discount_offer")
    );
    assert_eq!((shop.outcomes.won, shop.outcomes.lost), (3, 1));
    assert_eq!(stage(shop, "checkout_started").stalled, 1);

    let carts = &report.total.cart_recovery;
    assert_eq!(carts.abandoned, 4);
    assert_eq!(
        money_of(&carts.abandoned_value),
        vec![("EUR".into(), 37000), ("USD".into(), 8000)]
    );
    assert_eq!((carts.recovered, carts.bought_without_follow_up), (2, 1));
    close(carts.recovery_rate, 0.5);
    assert_eq!(
        money_of(&carts.recovered_revenue),
        vec![("EUR".into(), 12000), ("USD".into(), 8000)]
    );
    // The fixture's rows hold what the worker writes, the steps' 0-based indexes; the
    // report shows them as every output does, counted from 1.
    let steps = steps_of(carts);
    // The failed third step and the skipped first step of cart J were never sent:
    // they count nowhere.
    assert_eq!(
        steps,
        vec![("cart", "1".into(), 3, 1), ("cart", "2".into(), 2, 1)]
    );
    assert_eq!(
        serde_json::to_value(&carts.steps[0]).unwrap()["step"],
        serde_json::json!(1)
    );
    close(carts.steps[0].recovery_rate, 1.0 / 3.0);
}

#[tokio::test]
async fn expiry_rows_in_the_outbox_count_neither_as_sent_follow_ups_nor_as_emails() {
    let (_dir, store) = fixture_store().await;
    // Cart K's expiry as the follow-up worker leaves it (`done`, with the time it was
    // carried out), and an expiry row for cart H marked `sent` before H's purchase:
    // neither sent an email, so neither may change what the emails are credited with.
    store
        .execute_batch_for_test(
            "INSERT INTO outbox (deal_id, rule, step, action, recipient, state, due_at,
                created_at, updated_at, sent_at, anchor_at, next_attempt_at) VALUES
             (11, 'cart', 3, 'expire', 'k@example.com', 'done',
              unixepoch('2026-01-24') * 1000, 0, 0, unixepoch('2026-01-24') * 1000, 0, 0),
             (8, 'cart', 3, 'expire', 'h@example.com', 'sent',
              unixepoch('2026-01-10 03:00') * 1000, 0, 0,
              unixepoch('2026-01-10 03:00') * 1000, 0, 0);",
        )
        .await
        .unwrap();
    let report = scan(&store, january(None), ReportScope::default()).await;

    let steps = steps_of(&report.total.cart_recovery);
    assert_eq!(
        steps,
        vec![("cart", "1".into(), 3, 1), ("cart", "2".into(), 2, 1)]
    );
    let counts: Vec<(String, String, u64)> = store
        .outbox_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.rule, c.state, c.emails))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("cart".into(), "failed".into(), 1),
            ("cart".into(), "sent".into(), 5),
            ("cart".into(), "skipped".into(), 1),
        ]
    );
}

#[tokio::test]
async fn figures_split_by_connection_and_the_connection_filter_agrees() {
    let report = report(january(None), ReportScope::default()).await;
    let names: Vec<_> = report
        .by_connection
        .iter()
        .map(|s| s.connection.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["crm-eu", "crm-us", "shop"]);
    let us = &report.by_connection[1];
    let sales = pipeline(us, "sales");
    assert_eq!(
        (
            stage(sales, "proposal").entered,
            stage(sales, "proposal").cohort
        ),
        (1, 1)
    );
    assert_eq!(stage(sales, "negotiation").advanced, 1);
    assert_eq!((sales.outcomes.won, sales.outcomes.reopened), (1, 1));
    assert_eq!(us.forecast.len(), 1);
    let eu = pipeline(&report.by_connection[0], "sales");
    assert_eq!(
        (eu.outcomes.won, eu.outcomes.lost, eu.outcomes.reopened),
        (1, 1, 1)
    );
    assert_eq!(stage(eu, "lead_generation").cohort, 5);

    let mut only_us = january(None);
    only_us.connection = Some("crm-us".into());
    let filtered = report_for(only_us).await;
    assert_eq!(filtered.total.deals, 2);
    assert_eq!(
        serde_json::to_value(&filtered.total.pipelines).unwrap(),
        serde_json::to_value(&us.pipelines).unwrap()
    );
}

async fn report_for(options: ReportOptions) -> Report {
    let scope = ReportScope {
        connection: options.connection.clone(),
    };
    report(options, scope).await
}

#[tokio::test]
async fn the_pipeline_filter_drops_other_pipelines_from_every_figure() {
    let report = report(january(Some("sales")), ReportScope::default()).await;
    assert_eq!(report.total.pipelines.len(), 1);
    assert_eq!(report.total.cart_recovery.abandoned, 0);
    let eur_unscheduled = &report.total.forecast[0];
    assert_eq!(
        (eur_unscheduled.deals, eur_unscheduled.weighted.minor),
        (1, 20000)
    );
}

#[test]
fn percentiles_use_the_nearest_rank() {
    assert_eq!(percentile(&mut [], 50), None);
    assert_eq!(percentile(&mut [7], 90), Some(7));
    assert_eq!(percentile(&mut [1, 2, 3, 4], 50), Some(2));
    assert_eq!(
        percentile(&mut [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90),
        Some(9)
    );
    assert_eq!(
        percentile(&mut [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 90),
        Some(10)
    );
}

fn stage_with(key: &str, position: usize, cohort: u64, advanced: u64, median: f64) -> StageReport {
    StageReport {
        stage: key.into(),
        label: key.into(),
        kind: StageKind::Open,
        position,
        open_deals: 0,
        open_without_amount: 0,
        open_value: vec![],
        entered: cohort,
        exited: 0,
        cohort,
        advanced,
        conversion: ratio(advanced, cohort),
        time_in_stage: TimeInStage {
            samples: u64::from(median > 0.0),
            median_seconds: (median > 0.0).then_some(median),
            p90_seconds: None,
        },
        stall_after_seconds: None,
        stalled: 0,
        stalled_value: vec![],
    }
}

#[test]
fn a_conversion_tie_goes_to_the_slower_stage_and_small_cohorts_fall_back_to_time() {
    let stages = vec![
        stage_with("a", 1, 3, 1, 10.0),
        stage_with("b", 2, 6, 2, 50.0),
        stage_with("c", 3, 1, 0, 5.0),
    ];
    let named = bottleneck(&stages, 2).unwrap();
    assert_eq!(
        (named.stage.as_str(), named.reason),
        ("b", BottleneckReason::LowestConversion)
    );
    let named = bottleneck(&stages, 10).unwrap();
    assert_eq!(
        (named.stage.as_str(), named.reason),
        ("b", BottleneckReason::LongestTimeInStage)
    );
    assert!(bottleneck(&[stage_with("x", 1, 0, 0, 0.0)], 1).is_none());
}

#[test]
fn weighted_sums_round_half_away_from_zero() {
    assert_eq!(div_round(150, 100), 2);
    assert_eq!(div_round(149, 100), 1);
    assert_eq!(div_round(-150, 100), -2);
    assert_eq!(div_round(-149, 100), -1);
}

/// A currency's sum beyond what 64 bits hold (absurd amounts, or a hostile source)
/// is reported at the nearest bound, with its sign: never wrapped to the other sign.
#[test]
fn sums_beyond_64_bits_saturate_with_their_sign() {
    let (min, max) = (i128::from(i64::MIN), i128::from(i64::MAX));
    assert_eq!(clamp(max + 1), i64::MAX);
    assert_eq!(clamp(min - 1), i64::MIN);
    assert_eq!(clamp(-42), -42);
    assert_eq!(clamp(max), i64::MAX);
    assert_eq!(clamp(min), i64::MIN);
}

/// `(id, connection, external id, amount in EUR cents, stage, status)` of a `sales` deal.
type SalesDeal<'a> = (i64, &'a str, &'a str, Option<i64>, &'a str, &'a str);

/// Adds `sales` deals to a fixture store as a sync would have stored them:
/// `(id, connection, external id, amount in EUR cents, stage, status)`, and their stage
/// entries, `(deal id, day, stage)`.
async fn add_deals(store: &Store, deals: &[SalesDeal<'_>], entries: &[(i64, &str, &str)]) {
    let deals: Vec<String> = deals
        .iter()
        .map(|(id, connection, external, amount, stage, status)| {
            let (amount, currency) =
                amount.map_or(("NULL".to_owned(), "NULL"), |a| (a.to_string(), "'EUR'"));
            format!(
                "({id}, '{connection}', '{external}', 'Deal {external}', {amount}, {currency}, \
                 'sales', '{stage}', '{status}', 'p', 'n', NULL, 0, 0, 0, 0, 0, '{{}}')"
            )
        })
        .collect();
    let entries: Vec<String> = entries
        .iter()
        .map(|(id, day, stage)| {
            format!("({id}, unixepoch('{day}') * 1000, 'sales', '{stage}', 'n', 'poll')")
        })
        .collect();
    store
        .execute_batch_for_test(&format!(
            "INSERT INTO deals (id, connection, external_id, title, amount_minor, currency,
                 pipeline, stage, status, native_pipeline, native_stage, expected_close,
                 stage_entered_at, last_activity_at, first_seen_at, synced_at, content_hash, raw)
             VALUES {};
             INSERT INTO stage_history (deal_id, at, to_pipeline, to_stage, native_to, cause)
             VALUES {};",
            deals.join(", "),
            entries.join(", ")
        ))
        .await
        .unwrap();
}

/// Every count is additive over disjoint deals: the total's is the sum of the
/// connections' (docs/report.md), for every pipeline and stage.
#[tokio::test]
async fn the_totals_counts_are_the_sums_of_the_connections_counts() {
    // Beside the hand-worked history, an open deal without an amount in each of two
    // connections, so that count is summed too.
    let (_dir, store) = fixture_store().await;
    add_deals(
        &store,
        &[
            (14, "crm-eu", "N", None, "proposal", "open"),
            (15, "crm-us", "O", None, "proposal", "open"),
        ],
        &[
            (14, "2026-01-15", "proposal"),
            (15, "2026-01-16", "proposal"),
        ],
    )
    .await;
    let report = scan(&store, january(None), ReportScope::default()).await;
    let sum = |f: &dyn Fn(&ScopeReport) -> u64| report.by_connection.iter().map(f).sum::<u64>();
    assert_eq!(report.total.deals, sum(&|s| s.deals));
    assert_eq!(
        report.total.unmapped_open_deals,
        sum(&|s| s.unmapped_open_deals)
    );
    let mut checked = 0;
    for total in &report.total.pipelines {
        let of = |s: &ScopeReport| {
            s.pipelines
                .iter()
                .find(|p| p.pipeline == total.pipeline)
                .cloned()
        };
        let outcomes = |f: &dyn Fn(&PipelineReport) -> u64| {
            report
                .by_connection
                .iter()
                .filter_map(of)
                .map(|p| f(&p))
                .sum::<u64>()
        };
        assert_eq!(total.outcomes.won, outcomes(&|p| p.outcomes.won));
        assert_eq!(total.outcomes.lost, outcomes(&|p| p.outcomes.lost));
        assert_eq!(total.outcomes.reopened, outcomes(&|p| p.outcomes.reopened));
        for expected in &total.stages {
            let counts = |s: &StageReport| {
                [
                    s.open_deals,
                    s.open_without_amount,
                    s.entered,
                    s.exited,
                    s.cohort,
                    s.advanced,
                    s.stalled,
                    s.time_in_stage.samples,
                ]
            };
            let mut summed = [0u64; 8];
            for scope in report.by_connection.iter().filter_map(of) {
                let counted = counts(stage(&scope, &expected.stage));
                for (into, value) in summed.iter_mut().zip(counted) {
                    *into += value;
                }
            }
            assert_eq!(
                counts(expected),
                summed,
                "{} {}",
                total.pipeline,
                expected.stage
            );
            checked += summed.iter().filter(|&&n| n > 0).count();
        }
    }
    assert!(checked > 10, "the fixture exercises the counts ({checked})");
    let proposal = report
        .total
        .pipelines
        .iter()
        .flat_map(|p| &p.stages)
        .find(|s| s.stage == "proposal")
        .unwrap();
    assert!(
        proposal.open_without_amount >= 2,
        "deals 14 and 15 are open without an amount: {}",
        proposal.open_without_amount
    );
}

#[test]
fn a_stage_pair_is_interned_once_and_the_same_stage_key_in_two_pipelines_twice() {
    let mut interner = Interner::default();
    let sales = interner.stage(Some("sales"), "won");
    let shop = interner.stage(Some("ecommerce"), "won");
    let unmapped = interner.stage(None, "won");
    assert_ne!(sales, shop);
    assert_ne!(sales, unmapped);
    assert_ne!(shop, unmapped);
    assert_eq!(interner.stage(Some("sales"), "won"), sales);
    assert_eq!(interner.stage_bytes(Some(b"ecommerce"), b"won"), Some(shop));
    assert_eq!(interner.stage_bytes(None, b"won"), Some(unmapped));
    assert_eq!(interner.stage_of(shop), (Some("ecommerce"), "won"));
    assert_eq!(interner.stages().count(), 3);
}

#[test]
fn the_last_days_end_at_until_and_start_that_many_days_before() {
    let until = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
    let options = ReportOptions::last_days(until, 30);
    assert_eq!(options.until, until);
    assert_eq!(
        options.since,
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    );
    assert_eq!((options.pipeline, options.connection), (None, None));
}

/// `--pipeline` keeps that pipeline alone; stages are numbered from 1 in their
/// pipeline's order, as `dealsync report` shows them.
#[tokio::test]
async fn one_pipeline_is_kept_when_asked_and_its_stages_are_numbered_from_one() {
    let all = report(january(None), ReportScope::default()).await;
    let keys: Vec<&str> = all
        .total
        .pipelines
        .iter()
        .map(|p| p.pipeline.as_str())
        .collect();
    assert!(
        keys.contains(&"sales") && keys.contains(&"ecommerce"),
        "{keys:?}"
    );
    let sales = report(january(Some("sales")), ReportScope::default()).await;
    let kept: Vec<&str> = sales
        .total
        .pipelines
        .iter()
        .map(|p| p.pipeline.as_str())
        .collect();
    assert_eq!(kept, ["sales"]);
    let defined = default_pipelines();
    let order: Vec<String> = defined
        .iter()
        .find(|p| p.key.as_str() == "sales")
        .expect("the default sales pipeline")
        .stages
        .iter()
        .map(|s| s.key.to_string())
        .collect();
    let shown: Vec<(usize, String)> = pipeline(&sales.total, "sales")
        .stages
        .iter()
        .map(|s| (s.position, s.stage.clone()))
        .collect();
    let expected: Vec<(usize, String)> = order
        .into_iter()
        .enumerate()
        .map(|(n, key)| (n + 1, key))
        .collect();
    assert_eq!(shown, expected);
}

/// The period is [since, until): a stage entered at `since` counts, one entered at
/// `until` belongs to the next period.
#[tokio::test]
async fn a_stage_entered_at_the_periods_start_counts_and_one_entered_at_its_end_does_not() {
    let before = report(january(Some("sales")), ReportScope::default()).await;
    let entered =
        |report: &Report| stage(pipeline(&report.total, "sales"), "lead_generation").entered;
    let (_dir, store) = fixture_store().await;
    add_deals(
        &store,
        &[
            (101, "crm-eu", "N1", Some(1), "lead_generation", "open"),
            (102, "crm-eu", "N2", Some(1), "lead_generation", "open"),
        ],
        &[
            (101, "2026-01-01", "lead_generation"),
            (102, "2026-02-01", "lead_generation"),
        ],
    )
    .await;
    let after = scan(&store, january(Some("sales")), ReportScope::default()).await;
    assert_eq!(entered(&after), entered(&before) + 1);
}

/// A deal that leaves a stage backwards and comes back has not advanced from it; a deal
/// that entered its pipeline before the period and is won within it counts as won.
#[tokio::test]
async fn coming_back_to_a_stage_is_no_advance_and_a_win_in_the_period_counts_whenever_the_deal_began()
 {
    let before = report(january(Some("sales")), ReportScope::default()).await;
    let (_dir, store) = fixture_store().await;
    add_deals(
        &store,
        &[
            (101, "crm-eu", "N1", Some(1), "proposal", "open"),
            (102, "crm-eu", "N2", Some(1), "won", "won"),
        ],
        &[
            (101, "2026-01-10", "proposal"),
            (101, "2026-01-12", "lead_generation"),
            (101, "2026-01-14", "proposal"),
            (102, "2025-12-20", "lead_generation"),
            (102, "2026-01-10", "won"),
        ],
    )
    .await;
    let after = scan(&store, january(Some("sales")), ReportScope::default()).await;
    let proposal = |report: &Report| {
        let s = stage(pipeline(&report.total, "sales"), "proposal");
        (s.cohort, s.advanced)
    };
    let (cohort, advanced) = proposal(&before);
    assert_eq!(proposal(&after), (cohort + 1, advanced));
    let won = |report: &Report| pipeline(&report.total, "sales").outcomes.won;
    assert_eq!(won(&after), won(&before) + 1);
}
