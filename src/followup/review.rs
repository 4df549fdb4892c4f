//! The weekly pipeline review: a digest rule with `review = "monday 08:00"` emails its
//! fixed address, once a week, the week's funnel against the week before (entries,
//! conversion and median time per stage, won deals and value per currency), each
//! pipeline's bottleneck and whether it moved, the deals that stalled during the week,
//! how the weighted forecast moved, and cart recovery.
//!
//! Scheduling, the once-per-week ledger row, claiming and sending are the digests'
//! (`followup::digest`, `store::digests`); this file builds what the template sees.
//!
//! Invariants:
//! - Every figure of the two weeks is the report's (`Store::report`, what `dealsync
//!   report --since … --until …` prints) for the half-open periods
//!   `[slot − 7 days, slot)` and `[slot − 14 days, slot − 7 days)`: the review restates
//!   no figure of its own.
//! - A stalled deal is listed when its stage's stall threshold passed during the week
//!   and it still sits there, open, at the slot.

use super::digest::{DigestRule, MAX_LISTED};
use crate::domain::{Deal, DealStatus, StageRef};
use crate::pipeline::{Pipelines, StageKind};
use crate::report::{MoneyTotal, PipelineReport, Report, ReportOptions, StageReport};
use crate::store::{DealFilter, Store, StoreError};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

/// One stage's figures in the two weeks.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewStage {
    pub stage: String,
    pub label: String,
    /// Deals that entered the stage in the week / the week before.
    pub entered: u64,
    pub entered_before: u64,
    /// "+3", "-1", "0".
    pub entered_change: String,
    /// Conversion of the week's entries to a later stage, "40 %"; "-" without a cohort.
    pub conversion: String,
    pub conversion_before: String,
    /// Median days in the stage of visits that ended in the week, "2.5"; "-" without one.
    pub median_days: String,
    pub median_days_before: String,
    /// The chart: each week's entries as a share of the largest stage's, 0–100.
    pub bar: u32,
    pub bar_before: u32,
}

/// A pipeline's bottleneck as the report names it.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewBottleneck {
    pub stage: String,
    pub label: String,
    /// "lowest conversion" or "longest time in stage".
    pub reason: String,
}

/// One pipeline's review.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewPipeline {
    pub pipeline: String,
    pub label: String,
    pub stages: Vec<ReviewStage>,
    pub won: u64,
    pub won_before: u64,
    pub lost: u64,
    pub lost_before: u64,
    /// "12000.00 EUR" per currency.
    pub won_value: Vec<String>,
    pub won_value_before: Vec<String>,
    pub bottleneck: Option<ReviewBottleneck>,
    pub bottleneck_before: Option<ReviewBottleneck>,
    /// Whether this week's bottleneck is another stage than last week's (false when
    /// either week has none).
    pub bottleneck_moved: bool,
}

/// A deal that stalled during the week.
#[derive(Debug, Clone, Serialize)]
pub struct StalledDeal {
    pub id: i64,
    pub title: String,
    pub connection: String,
    pub stage_label: String,
    pub days_in_stage: i64,
    pub amount: Option<String>,
    pub currency: Option<String>,
    pub owner: Option<String>,
}

/// How the weighted forecast of one currency moved over the week.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewForecast {
    pub currency: String,
    pub at_start: String,
    pub now: String,
    /// "+1200.00" or "-300.00".
    pub change: String,
}

/// Cart recovery in the two weeks.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewCarts {
    pub abandoned: u64,
    pub abandoned_before: u64,
    pub recovered: u64,
    pub recovered_before: u64,
    pub recovery_rate: String,
    pub recovery_rate_before: String,
    pub recovered_revenue: Vec<String>,
    pub recovered_revenue_before: Vec<String>,
}

/// What a review template sees.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewContext {
    pub rule: String,
    pub recipient: String,
    /// The week: "2026-11-23" to "2026-11-30" (UTC dates of the period's ends; the
    /// period ends at the slot, exclusive).
    pub since: String,
    pub until: String,
    pub since_before: String,
    pub pipelines: Vec<ReviewPipeline>,
    /// The stalled deals listed (at most `MAX_LISTED`, longest in their stage first).
    pub stalled: Vec<StalledDeal>,
    pub stalled_count: usize,
    pub stalled_more: usize,
    pub forecast: Vec<ReviewForecast>,
    pub carts: ReviewCarts,
    pub sender: String,
}

/// The periods a review at `slot` covers: the week, and the week before.
pub fn periods(slot: DateTime<Utc>) -> [(DateTime<Utc>, DateTime<Utc>); 2] {
    let week = Duration::days(7);
    [(slot - week, slot), (slot - week - week, slot - week)]
}

/// Reads what a review at `slot` reports: the two weeks' reports and the stalled deals.
pub async fn gather(
    store: &Store,
    pipelines: &Pipelines,
    rule: &DigestRule,
    recipient: &str,
    slot: DateTime<Utc>,
    sender: String,
) -> Result<ReviewContext, StoreError> {
    let [(since, until), (before, _)] = periods(slot);
    let report = |since, until| {
        let options = ReportOptions {
            since,
            ..ReportOptions::last_days(until, 7)
        };
        store.report(pipelines.clone(), options)
    };
    let week = report(since, until).await?;
    let previous = report(before, since).await?;
    let stalled = stalled_in(store, pipelines, since, until).await?;
    Ok(ReviewContext::new(
        rule, recipient, &week, &previous, stalled, pipelines, sender,
    ))
}

/// Deals read per query while looking for the week's stalled ones, so a stage with many
/// open deals is never held in memory at once.
const STALLED_PAGE: u32 = 1_000;

/// The open deals whose stage's stall threshold passed within `[since, until)`, still
/// in that stage.
async fn stalled_in(
    store: &Store,
    pipelines: &Pipelines,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<Deal>, StoreError> {
    let mut found = Vec::new();
    for pipeline in pipelines.iter() {
        for stage in &pipeline.stages {
            let Some(stall) = stage
                .stall_after
                .filter(|_| stage.kind == StageKind::Open)
                .and_then(|d| Duration::from_std(d).ok())
            else {
                continue;
            };
            // Page through the stage's open deals: only the week's stalled ones are kept.
            for page in 0.. {
                let filter = DealFilter {
                    pipeline: Some(pipeline.key.to_string()),
                    stage: Some(stage.key.to_string()),
                    status: Some(DealStatus::Open),
                    limit: Some(STALLED_PAGE),
                    offset: Some(page * STALLED_PAGE),
                    ..DealFilter::default()
                };
                let deals = store.deals(filter).await?;
                let last = deals.len() < STALLED_PAGE as usize;
                found.extend(deals.into_iter().filter(|deal| {
                    let stalled_at = deal.stage_entered_at + stall;
                    stalled_at >= since && stalled_at < until
                }));
                if last {
                    break;
                }
            }
        }
    }
    Ok(found)
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{:.0} %", v * 100.0))
}

fn days(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s / 86_400.0))
}

fn signed(value: i64) -> String {
    if value > 0 {
        format!("+{value}")
    } else {
        value.to_string()
    }
}

fn money(totals: &[MoneyTotal]) -> Vec<String> {
    totals
        .iter()
        .map(|t| format!("{} {}", t.amount, t.currency))
        .collect()
}

fn bottleneck(pipeline: Option<&PipelineReport>) -> Option<ReviewBottleneck> {
    let pipeline = pipeline?;
    let found = pipeline.bottleneck.as_ref()?;
    let label = pipeline
        .stages
        .iter()
        .find(|s| s.stage == found.stage)
        .map_or_else(|| found.stage.clone(), |s| s.label.clone());
    Some(ReviewBottleneck {
        stage: found.stage.clone(),
        label,
        reason: match found.reason {
            crate::report::BottleneckReason::LowestConversion => "lowest conversion",
            crate::report::BottleneckReason::LongestTimeInStage => "longest time in stage",
        }
        .to_owned(),
    })
}

fn review_pipeline(week: &PipelineReport, previous: Option<&PipelineReport>) -> ReviewPipeline {
    let before = |stage: &StageReport| {
        previous.and_then(|p| p.stages.iter().find(|s| s.stage == stage.stage))
    };
    let widest = week
        .stages
        .iter()
        .flat_map(|s| [s.entered, before(s).map_or(0, |b| b.entered)])
        .max()
        .unwrap_or(0)
        .max(1);
    let bar = |entered: u64| u32::try_from(entered * 100 / widest).unwrap_or(100);
    let stages = week
        .stages
        .iter()
        .filter(|s| s.kind == StageKind::Open)
        .map(|s| {
            let b = before(s);
            let entered_before = b.map_or(0, |b| b.entered);
            let change = i64::try_from(s.entered).unwrap_or(i64::MAX)
                - i64::try_from(entered_before).unwrap_or(i64::MAX);
            ReviewStage {
                stage: s.stage.clone(),
                label: s.label.clone(),
                entered: s.entered,
                entered_before,
                entered_change: signed(change),
                conversion: percent(s.conversion),
                conversion_before: percent(b.and_then(|b| b.conversion)),
                median_days: days(s.time_in_stage.median_seconds),
                median_days_before: days(b.and_then(|b| b.time_in_stage.median_seconds)),
                bar: bar(s.entered),
                bar_before: bar(entered_before),
            }
        })
        .collect();
    let (this, last) = (bottleneck(Some(week)), bottleneck(previous));
    let bottleneck_moved = matches!((&this, &last), (Some(a), Some(b)) if a.stage != b.stage);
    ReviewPipeline {
        pipeline: week.pipeline.clone(),
        label: week.label.clone(),
        stages,
        won: week.outcomes.won,
        won_before: previous.map_or(0, |p| p.outcomes.won),
        lost: week.outcomes.lost,
        lost_before: previous.map_or(0, |p| p.outcomes.lost),
        won_value: money(&week.outcomes.won_value),
        won_value_before: previous.map_or_else(Vec::new, |p| money(&p.outcomes.won_value)),
        bottleneck: this,
        bottleneck_before: last,
        bottleneck_moved,
    }
}

impl ReviewContext {
    /// Builds the context from the two weeks' reports and the deals that stalled.
    pub fn new(
        rule: &DigestRule,
        recipient: &str,
        week: &Report,
        previous: &Report,
        mut stalled: Vec<Deal>,
        pipelines: &Pipelines,
        sender: String,
    ) -> ReviewContext {
        let pipelines_out = week
            .total
            .pipelines
            .iter()
            .map(|p| {
                let before = previous
                    .total
                    .pipelines
                    .iter()
                    .find(|b| b.pipeline == p.pipeline);
                review_pipeline(p, before)
            })
            .collect();
        stalled.sort_by(|a, b| {
            a.stage_entered_at
                .cmp(&b.stage_entered_at)
                .then(a.id.cmp(&b.id))
        });
        // A deal read on two pages (it moved while they were read) is listed once.
        stalled.dedup_by_key(|deal| deal.id);
        let stalled_count = stalled.len();
        stalled.truncate(MAX_LISTED);
        let listed = stalled
            .iter()
            .map(|deal| {
                let here = StageRef {
                    pipeline: deal.pipeline.clone(),
                    stage: deal.stage.clone(),
                };
                StalledDeal {
                    id: deal.id,
                    title: deal.title.clone(),
                    connection: deal.connection.to_string(),
                    stage_label: pipelines
                        .stage(&here)
                        .map_or_else(|| deal.stage.to_string(), |s| s.label.clone()),
                    days_in_stage: (week.until - deal.stage_entered_at).num_days(),
                    amount: deal.amount().map(|m| m.to_decimal_string()),
                    currency: deal.currency.map(|c| c.to_string()),
                    owner: deal.owner.clone(),
                }
            })
            .collect::<Vec<StalledDeal>>();
        let forecast = week
            .total
            .forecast_change
            .iter()
            .map(|f| ReviewForecast {
                currency: f.currency.to_string(),
                at_start: f.at_since.amount.clone(),
                now: f.now.amount.clone(),
                change: if f.change.minor > 0 {
                    format!("+{}", f.change.amount)
                } else {
                    f.change.amount.clone()
                },
            })
            .collect();
        let (carts, carts_before) = (&week.total.cart_recovery, &previous.total.cart_recovery);
        let date = |at: DateTime<Utc>| at.format("%Y-%m-%d").to_string();
        ReviewContext {
            rule: rule.name.clone(),
            recipient: recipient.to_owned(),
            since: date(week.since),
            until: date(week.until),
            since_before: date(previous.since),
            pipelines: pipelines_out,
            stalled_more: stalled_count - listed.len(),
            stalled: listed,
            stalled_count,
            forecast,
            carts: ReviewCarts {
                abandoned: carts.abandoned,
                abandoned_before: carts_before.abandoned,
                recovered: carts.recovered,
                recovered_before: carts_before.recovered,
                recovery_rate: percent(carts.recovery_rate),
                recovery_rate_before: percent(carts_before.recovery_rate),
                recovered_revenue: money(&carts.recovered_revenue),
                recovered_revenue_before: money(&carts_before.recovered_revenue),
            },
            sender,
        }
    }

    /// A review over an empty store, for `dealsync check`.
    pub fn sample(rule: &DigestRule, pipelines: &Pipelines) -> ReviewContext {
        let slot = Utc::now();
        let [(since, until), (before, _)] = periods(slot);
        let empty = |since, until| {
            let options = ReportOptions {
                since,
                ..ReportOptions::last_days(until, 7)
            };
            crate::report::Accumulator::new(pipelines.clone(), options).finish()
        };
        ReviewContext::new(
            rule,
            "sales-ops@example.com",
            &empty(since, until),
            &empty(before, since),
            Vec::new(),
            pipelines,
            "Sample Shop".into(),
        )
    }
}
