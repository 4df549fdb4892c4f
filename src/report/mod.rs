//! The funnel report: pure maths over the stage history, no IO.
//!
//! The store streams every deal once, in id order, with its stage history (oldest
//! first) and its sent follow-ups, into a [`ReportSink`]; [`Accumulator`] is the sink
//! that folds them into per-stage counters, and [`Accumulator::finish`] turns those into
//! a [`Report`]. The semantics of every figure are written down in `docs/report.md`;
//! the short version:
//!
//! - A deal's history is a list of *visits*: each history row starts a visit to its
//!   `to_stage`, which lasts until the next row (or until now for the last one).
//! - `entered` / `exited` count visits starting / ending in the period; re-entries count
//!   again. Time in stage is taken over completed visits that ended in the period.
//! - Conversion from an open stage S is cohort based: the cohort is the deals whose
//!   visit to S started in the period (a deal counts once); a deal *advanced* when any
//!   later visit reached, in the same pipeline, an open stage ordered after S or a
//!   stage of kind won. Skipped stages count as advancing; moving backwards does not.
//! - Won / lost: a deal counts once, with the outcome of its final run of closing
//!   visits, when that run started in the period. A deal that left a closing stage for
//!   an open one in the period counts as reopened.
//! - Money is never summed across currencies: every value is a list of per-currency
//!   totals in minor units.
//!
//! Invariant: the figures depend only on the history, the current deal rows, the
//! pipelines and the options, never on the order deals arrive in.

pub mod render;
#[cfg(test)]
mod tests;

use crate::domain::{Currency, DealStatus, Money, StepNumber};
use crate::pipeline::{Pipelines, StageKind};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// An interned (pipeline, stage) pair as it appears in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageId(u32);

/// An interned string (connection or follow-up rule name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameId(u32);

/// Small tables of the distinct strings met while scanning, so that millions of
/// history rows cost no allocation each. Cardinalities are small (stages, connections,
/// rules), so a linear search beats hashing.
#[derive(Debug, Default)]
pub struct Interner {
    stages: Vec<(Option<String>, String)>,
    names: Vec<String>,
}

impl Interner {
    /// Returns the id of a (pipeline, stage) pair, adding it when new.
    pub fn stage(&mut self, pipeline: Option<&str>, stage: &str) -> StageId {
        self.stage_bytes(pipeline.map(str::as_bytes), stage.as_bytes())
            .expect("a str is UTF-8")
    }

    /// Like [`Interner::stage`] on raw column bytes, so that a known pair costs no
    /// UTF-8 check; `None` when a new pair is not UTF-8.
    pub fn stage_bytes(&mut self, pipeline: Option<&[u8]>, stage: &[u8]) -> Option<StageId> {
        if let Some(at) = self
            .stages
            .iter()
            .position(|(p, s)| s.as_bytes() == stage && p.as_deref().map(str::as_bytes) == pipeline)
        {
            return Some(StageId(at as u32));
        }
        let pipeline = match pipeline {
            Some(bytes) => Some(std::str::from_utf8(bytes).ok()?.to_owned()),
            None => None,
        };
        self.stages
            .push((pipeline, std::str::from_utf8(stage).ok()?.to_owned()));
        Some(StageId((self.stages.len() - 1) as u32))
    }

    /// Returns the id of a name, adding it when new.
    pub fn name(&mut self, name: &str) -> NameId {
        self.name_bytes(name.as_bytes()).expect("a str is UTF-8")
    }

    /// Like [`Interner::name`] on raw column bytes; `None` when a new name is not UTF-8.
    pub fn name_bytes(&mut self, name: &[u8]) -> Option<NameId> {
        if let Some(at) = self.names.iter().position(|n| n.as_bytes() == name) {
            return Some(NameId(at as u32));
        }
        self.names.push(std::str::from_utf8(name).ok()?.to_owned());
        Some(NameId((self.names.len() - 1) as u32))
    }

    /// Every interned (pipeline, stage) pair, in id order: `StageId(0)` first.
    pub fn stages(&self) -> impl Iterator<Item = (Option<&str>, &str)> {
        self.stages.iter().map(|(p, s)| (p.as_deref(), s.as_str()))
    }

    fn stage_of(&self, id: StageId) -> (Option<&str>, &str) {
        let (pipeline, stage) = &self.stages[id.0 as usize];
        (pipeline.as_deref(), stage)
    }

    fn name_of(&self, id: NameId) -> &str {
        &self.names[id.0 as usize]
    }
}

impl StageId {
    /// The id's index in its [`Interner`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A deal as it stands now, as the report needs it.
#[derive(Debug, Clone)]
pub struct DealInput {
    pub id: i64,
    pub connection: NameId,
    pub stage: StageId,
    pub status: DealStatus,
    pub amount_minor: Option<i64>,
    pub currency: Option<Currency>,
    pub expected_close: Option<NaiveDate>,
    /// UTC milliseconds.
    pub stage_entered_at: i64,
}

/// One history row: at `at` (UTC ms) the deal entered `stage`.
#[derive(Debug, Clone, Copy)]
pub struct VisitInput {
    pub at: i64,
    pub stage: StageId,
}

/// A follow-up email that was sent for the deal.
#[derive(Debug, Clone, Copy)]
pub struct FollowupInput {
    pub rule: NameId,
    /// The step's 0-based index, as stored.
    pub step: i64,
    /// UTC milliseconds.
    pub sent_at: i64,
}

/// Where the store streams deals to; [`Accumulator`] is the implementation.
pub trait ReportSink: Send + 'static {
    fn interner(&mut self) -> &mut Interner;
    /// One deal, its history oldest first (ties in insertion order), its sent follow-ups.
    fn add_deal(&mut self, deal: &DealInput, visits: &[VisitInput], followups: &[FollowupInput]);
}

/// What to report on.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Start of the period, inclusive.
    pub since: DateTime<Utc>,
    /// End of the period, exclusive; also the "now" of snapshot figures (open, stalled).
    pub until: DateTime<Utc>,
    /// Only this canonical pipeline.
    pub pipeline: Option<String>,
    /// Only this connection (the store filters; recorded in the report).
    pub connection: Option<String>,
    /// Fewest deals in a stage's cohort for its conversion to name a bottleneck.
    pub min_cohort: u64,
    /// The stage key that marks an abandoned cart.
    pub abandoned_stage: String,
}

impl ReportOptions {
    /// The last `days` days up to `until`, every pipeline and connection.
    pub fn last_days(until: DateTime<Utc>, days: i64) -> Self {
        ReportOptions {
            since: until - chrono::Duration::days(days),
            until,
            pipeline: None,
            connection: None,
            min_cohort: DEFAULT_MIN_COHORT,
            abandoned_stage: DEFAULT_ABANDONED_STAGE.to_owned(),
        }
    }
}

/// A stage needs this many deals in its cohort before its conversion can name it the bottleneck.
pub const DEFAULT_MIN_COHORT: u64 = 5;
/// The `ecommerce` pipeline's abandoned-cart stage.
pub const DEFAULT_ABANDONED_STAGE: &str = "cart_abandoned";

/// A stage resolved against the pipelines in force.
#[derive(Debug, Clone, Copy)]
struct StageInfo {
    pipeline: usize,
    position: usize,
    kind: StageKind,
    probability: u8,
    stall_after_ms: Option<i64>,
    abandoned: bool,
}

#[derive(Debug, Default, Clone)]
struct StageAcc {
    open_deals: u64,
    open_without_amount: u64,
    open_value: BTreeMap<Currency, i64>,
    entered: u64,
    exited: u64,
    cohort: u64,
    advanced: u64,
    durations_ms: Vec<i64>,
    stalled: u64,
    stalled_value: BTreeMap<Currency, i64>,
}

#[derive(Debug, Default, Clone)]
struct PipelineAcc {
    stages: Vec<StageAcc>,
    won: u64,
    won_value: BTreeMap<Currency, i64>,
    lost: u64,
    reopened: u64,
}

#[derive(Debug, Default, Clone)]
struct ForecastAcc {
    deals: u64,
    amount: i128,
    /// Σ amount × probability, still in hundredths of a minor unit.
    weighted_x100: i128,
}

#[derive(Debug, Default, Clone)]
struct StepAcc {
    carts_sent: u64,
    recovered_after: u64,
}

#[derive(Debug, Default, Clone)]
struct CartAcc {
    abandoned: u64,
    abandoned_value: BTreeMap<Currency, i64>,
    recovered: u64,
    bought_without_follow_up: u64,
    recovered_revenue: BTreeMap<Currency, i64>,
    steps: BTreeMap<(NameId, i64), StepAcc>,
}

#[derive(Debug, Default, Clone)]
struct ScopeAcc {
    deals: u64,
    pipelines: Vec<PipelineAcc>,
    forecast: BTreeMap<(Currency, Option<(i32, u32)>), ForecastAcc>,
    /// Σ amount × probability of the deals open at the period's start, in the stage
    /// they were in then (at their current amounts), in hundredths of a minor unit.
    weighted_at_since_x100: BTreeMap<Currency, i128>,
    unmapped_open: u64,
    carts: CartAcc,
}

impl ScopeAcc {
    /// Counters of the same shape, all zero.
    fn empty_like(&self) -> ScopeAcc {
        ScopeAcc {
            pipelines: self
                .pipelines
                .iter()
                .map(|p| PipelineAcc {
                    stages: vec![StageAcc::default(); p.stages.len()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Adds another scope's counters (of a disjoint set of deals) to these.
    fn absorb(&mut self, other: &ScopeAcc) {
        self.deals += other.deals;
        self.unmapped_open += other.unmapped_open;
        for (pipeline, theirs) in self.pipelines.iter_mut().zip(&other.pipelines) {
            pipeline.won += theirs.won;
            add_all(&mut pipeline.won_value, &theirs.won_value);
            pipeline.lost += theirs.lost;
            pipeline.reopened += theirs.reopened;
            for (stage, theirs) in pipeline.stages.iter_mut().zip(&theirs.stages) {
                stage.open_deals += theirs.open_deals;
                stage.open_without_amount += theirs.open_without_amount;
                add_all(&mut stage.open_value, &theirs.open_value);
                stage.entered += theirs.entered;
                stage.exited += theirs.exited;
                stage.cohort += theirs.cohort;
                stage.advanced += theirs.advanced;
                stage.durations_ms.extend_from_slice(&theirs.durations_ms);
                stage.stalled += theirs.stalled;
                add_all(&mut stage.stalled_value, &theirs.stalled_value);
            }
        }
        for (key, theirs) in &other.forecast {
            let row = self.forecast.entry(*key).or_default();
            row.deals += theirs.deals;
            row.amount += theirs.amount;
            row.weighted_x100 += theirs.weighted_x100;
        }
        for (currency, weighted) in &other.weighted_at_since_x100 {
            *self.weighted_at_since_x100.entry(*currency).or_default() += weighted;
        }
        let (carts, theirs) = (&mut self.carts, &other.carts);
        carts.abandoned += theirs.abandoned;
        add_all(&mut carts.abandoned_value, &theirs.abandoned_value);
        carts.recovered += theirs.recovered;
        carts.bought_without_follow_up += theirs.bought_without_follow_up;
        add_all(&mut carts.recovered_revenue, &theirs.recovered_revenue);
        for (key, step) in &theirs.steps {
            let mine = carts.steps.entry(*key).or_default();
            mine.carts_sent += step.carts_sent;
            mine.recovered_after += step.recovered_after;
        }
    }
}

/// Folds deals into counters; see the module documentation for the semantics.
pub struct Accumulator {
    pipelines: Pipelines,
    options: ReportOptions,
    since_ms: i64,
    until_ms: i64,
    interner: Interner,
    /// Lazily resolved per [`StageId`]: `Some(None)` is a stage outside the report.
    resolved: Vec<Option<Option<StageInfo>>>,
    total: ScopeAcc,
    by_connection: BTreeMap<u32, ScopeAcc>,
    infos_buffer: Vec<Option<StageInfo>>,
}

impl Accumulator {
    pub fn new(pipelines: Pipelines, options: ReportOptions) -> Self {
        let empty = ScopeAcc {
            pipelines: pipelines
                .iter()
                .map(|p| PipelineAcc {
                    stages: vec![StageAcc::default(); p.stages.len()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        Accumulator {
            since_ms: options.since.timestamp_millis(),
            until_ms: options.until.timestamp_millis(),
            pipelines,
            options,
            interner: Interner::default(),
            resolved: Vec::new(),
            total: empty,
            by_connection: BTreeMap::new(),
            infos_buffer: Vec::new(),
        }
    }

    fn info(&mut self, id: StageId) -> Option<StageInfo> {
        let at = id.0 as usize;
        if self.resolved.len() <= at {
            self.resolved.resize(at + 1, None);
        }
        if let Some(known) = self.resolved[at] {
            return known;
        }
        let (pipeline_key, stage_key) = self.interner.stage_of(id);
        let info = pipeline_key.and_then(|pipeline_key| {
            if self
                .options
                .pipeline
                .as_deref()
                .is_some_and(|only| only != pipeline_key)
            {
                return None;
            }
            let (pipeline_index, pipeline) = self
                .pipelines
                .iter()
                .enumerate()
                .find(|(_, p)| p.key.as_str() == pipeline_key)?;
            let position = pipeline.position(stage_key)?;
            let stage = &pipeline.stages[position];
            Some(StageInfo {
                pipeline: pipeline_index,
                position,
                kind: stage.kind,
                probability: stage.probability,
                stall_after_ms: stage
                    .stall_after
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                abandoned: stage_key == self.options.abandoned_stage,
            })
        });
        self.resolved[at] = Some(info);
        info
    }

    /// Consumes the counters into the report; `as_of` is the options' `until`.
    pub fn finish(mut self) -> Report {
        for scope in self.by_connection.values() {
            self.total.absorb(scope);
        }
        let total = self.scope_report(None, &self.total);
        let by_connection = self
            .by_connection
            .iter()
            .map(|(id, scope)| {
                let name = self.interner.name_of(NameId(*id)).to_owned();
                self.scope_report(Some(name), scope)
            })
            .collect();
        Report {
            since: self.options.since,
            until: self.options.until,
            pipeline: self.options.pipeline.clone(),
            connection: self.options.connection.clone(),
            total,
            by_connection,
        }
    }

    fn scope_report(&self, connection: Option<String>, scope: &ScopeAcc) -> ScopeReport {
        let pipelines = self
            .pipelines
            .iter()
            .zip(&scope.pipelines)
            .filter(|(pipeline, _)| {
                self.options
                    .pipeline
                    .as_deref()
                    .is_none_or(|only| only == pipeline.key.as_str())
            })
            .map(|(pipeline, acc)| {
                let stages: Vec<StageReport> = pipeline
                    .stages
                    .iter()
                    .zip(&acc.stages)
                    .enumerate()
                    .map(|(position, (stage, s))| {
                        let mut durations = s.durations_ms.clone();
                        StageReport {
                            stage: stage.key.to_string(),
                            label: stage.label.clone(),
                            kind: stage.kind,
                            position: position + 1,
                            open_deals: s.open_deals,
                            open_without_amount: s.open_without_amount,
                            open_value: totals(&s.open_value),
                            entered: s.entered,
                            exited: s.exited,
                            cohort: s.cohort,
                            advanced: s.advanced,
                            conversion: (stage.kind == StageKind::Open)
                                .then(|| ratio(s.advanced, s.cohort))
                                .flatten(),
                            time_in_stage: TimeInStage {
                                samples: durations.len() as u64,
                                median_seconds: percentile(&mut durations, 50).map(ms_to_s),
                                p90_seconds: percentile(&mut durations, 90).map(ms_to_s),
                            },
                            stall_after_seconds: stage.stall_after.map(|d| d.as_secs()),
                            stalled: s.stalled,
                            stalled_value: totals(&s.stalled_value),
                        }
                    })
                    .collect();
                let closed = acc.won + acc.lost;
                PipelineReport {
                    pipeline: pipeline.key.to_string(),
                    label: pipeline.label.clone(),
                    bottleneck: bottleneck(&stages, self.options.min_cohort),
                    stages,
                    outcomes: Outcomes {
                        won: acc.won,
                        won_value: totals(&acc.won_value),
                        lost: acc.lost,
                        reopened: acc.reopened,
                        win_rate: ratio(acc.won, closed),
                        loss_rate: ratio(acc.lost, closed),
                    },
                }
            })
            .collect();
        let forecast = scope
            .forecast
            .iter()
            .map(|((currency, month), f)| ForecastRow {
                currency: *currency,
                month: month.map(|(y, m)| format!("{y:04}-{m:02}")),
                deals: f.deals,
                amount: money(*currency, clamp(f.amount)),
                weighted: money(*currency, clamp(div_round(f.weighted_x100, 100))),
            })
            .collect();
        let forecast_change = forecast_change(scope);
        let carts = &scope.carts;
        let cart_recovery = CartRecovery {
            abandoned: carts.abandoned,
            abandoned_value: totals(&carts.abandoned_value),
            recovered: carts.recovered,
            bought_without_follow_up: carts.bought_without_follow_up,
            recovery_rate: ratio(carts.recovered, carts.abandoned),
            recovered_revenue: totals(&carts.recovered_revenue),
            steps: carts
                .steps
                .iter()
                .map(|((rule, step), s)| StepReport {
                    rule: self.interner.name_of(*rule).to_owned(),
                    step: StepNumber::from_index(*step),
                    carts_sent: s.carts_sent,
                    recovered_after: s.recovered_after,
                    recovery_rate: ratio(s.recovered_after, s.carts_sent),
                })
                .collect(),
        };
        ScopeReport {
            connection,
            deals: scope.deals,
            unmapped_open_deals: scope.unmapped_open,
            pipelines,
            forecast,
            forecast_change,
            cart_recovery,
        }
    }
}

impl ReportSink for Accumulator {
    fn interner(&mut self) -> &mut Interner {
        &mut self.interner
    }

    fn add_deal(&mut self, deal: &DealInput, visits: &[VisitInput], followups: &[FollowupInput]) {
        // One buffer reused for every deal: no allocation per deal.
        let mut infos = std::mem::take(&mut self.infos_buffer);
        infos.clear();
        for visit in visits {
            infos.push(self.info(visit.stage));
        }
        let current = self.info(deal.stage);
        let (since, until) = (self.since_ms, self.until_ms);
        let in_period = |at: i64| at >= since && at < until;
        let facts = DealFacts {
            deal,
            visits,
            infos: &infos,
            current,
            followups,
            in_period: &in_period,
            since,
            now: until,
        };
        // Each deal is folded once, into its connection's counters; the total is their
        // sum, made in `finish` (every figure is additive over disjoint sets of deals).
        let by_connection = self
            .by_connection
            .entry(deal.connection.0)
            .or_insert_with(|| self.total.empty_like());
        facts.fold_into(by_connection);
        self.infos_buffer = infos;
    }
}

/// One deal's inputs, resolved, folded into one scope's counters.
struct DealFacts<'a> {
    deal: &'a DealInput,
    visits: &'a [VisitInput],
    infos: &'a [Option<StageInfo>],
    current: Option<StageInfo>,
    followups: &'a [FollowupInput],
    in_period: &'a dyn Fn(i64) -> bool,
    since: i64,
    now: i64,
}

impl DealFacts<'_> {
    fn fold_into(&self, scope: &mut ScopeAcc) {
        scope.deals += 1;
        self.flows(scope);
        self.outcomes(scope);
        self.snapshot(scope);
        self.forecast_at_since(scope);
        self.carts(scope);
    }

    /// Entered, exited, time in stage, conversion cohorts.
    fn flows(&self, scope: &mut ScopeAcc) {
        for (at, (visit, info)) in self.visits.iter().zip(self.infos).enumerate() {
            let Some(info) = info else { continue };
            let stage = &mut scope.pipelines[info.pipeline].stages[info.position];
            let started_in_period = (self.in_period)(visit.at);
            if started_in_period {
                stage.entered += 1;
            }
            if let Some(next) = self.visits.get(at + 1)
                && (self.in_period)(next.at)
            {
                stage.exited += 1;
                stage.durations_ms.push(next.at - visit.at);
            }
            if started_in_period
                && info.kind == StageKind::Open
                && !self.entered_earlier_in_period(at, *info)
            {
                stage.cohort += 1;
                let advanced = self.infos[at + 1..].iter().flatten().any(|later| {
                    later.pipeline == info.pipeline
                        && match later.kind {
                            StageKind::Won => true,
                            StageKind::Open => later.position > info.position,
                            StageKind::Lost => false,
                        }
                });
                if advanced {
                    stage.advanced += 1;
                }
            }
        }
    }

    /// Whether a visit before `at` to the same stage started in the period (histories
    /// are a handful of rows, so a scan beats allocating a set per deal).
    fn entered_earlier_in_period(&self, at: usize, info: StageInfo) -> bool {
        self.visits[..at]
            .iter()
            .zip(&self.infos[..at])
            .any(|(visit, earlier)| {
                earlier.is_some_and(|e| e.pipeline == info.pipeline && e.position == info.position)
                    && (self.in_period)(visit.at)
            })
    }

    /// Whether the move into visit `at` reopens a deal: closing stage → open stage, in the period.
    fn reopens(&self, at: usize) -> Option<usize> {
        let info = self.infos[at]?;
        let previous = self.infos[at.checked_sub(1)?]?;
        (info.kind == StageKind::Open
            && matches!(previous.kind, StageKind::Won | StageKind::Lost)
            && (self.in_period)(self.visits[at].at))
        .then_some(info.pipeline)
    }

    /// Won / lost by the final run of closing visits; reopened deals.
    fn outcomes(&self, scope: &mut ScopeAcc) {
        let closing = |info: &Option<StageInfo>| {
            info.is_some_and(|i| matches!(i.kind, StageKind::Won | StageKind::Lost))
        };
        if let Some(Some(last)) = self.infos.last().copied().filter(|l| closing(l)) {
            let run_start = self
                .infos
                .iter()
                .rposition(|info| !closing(info))
                .map_or(0, |at| at + 1);
            if (self.in_period)(self.visits[run_start].at) {
                let pipeline = &mut scope.pipelines[last.pipeline];
                match last.kind {
                    StageKind::Won => {
                        pipeline.won += 1;
                        if let (Some(amount), Some(currency)) =
                            (self.deal.amount_minor, self.deal.currency)
                        {
                            add(&mut pipeline.won_value, currency, amount);
                        }
                    }
                    _ => pipeline.lost += 1,
                }
            }
        }
        for at in 1..self.visits.len() {
            if let Some(pipeline) = self.reopens(at)
                && !(1..at).any(|earlier| self.reopens(earlier) == Some(pipeline))
            {
                scope.pipelines[pipeline].reopened += 1;
            }
        }
    }

    /// Open deals, their value, stalled deals, the forecast: the deal as it stands.
    fn snapshot(&self, scope: &mut ScopeAcc) {
        let deal = self.deal;
        if deal.status == DealStatus::Unmapped {
            scope.unmapped_open += 1;
            return;
        }
        if deal.status != DealStatus::Open {
            return;
        }
        let Some(info) = self.current.filter(|i| i.kind == StageKind::Open) else {
            return;
        };
        let stage = &mut scope.pipelines[info.pipeline].stages[info.position];
        stage.open_deals += 1;
        let stalled = info
            .stall_after_ms
            .is_some_and(|limit| self.now - deal.stage_entered_at > limit);
        if stalled {
            stage.stalled += 1;
        }
        let (Some(amount), Some(currency)) = (deal.amount_minor, deal.currency) else {
            stage.open_without_amount += 1;
            return;
        };
        add(&mut stage.open_value, currency, amount);
        if stalled {
            add(&mut stage.stalled_value, currency, amount);
        }
        let month = deal.expected_close.map(|d| (d.year(), d.month()));
        let row = scope.forecast.entry((currency, month)).or_default();
        row.deals += 1;
        row.amount += i128::from(amount);
        row.weighted_x100 += i128::from(amount) * i128::from(info.probability);
    }

    /// The deal's share of the forecast as it stood at the period's start: the stage of
    /// its last visit before then, if open, times its current amount.
    fn forecast_at_since(&self, scope: &mut ScopeAcc) {
        let (Some(amount), Some(currency)) = (self.deal.amount_minor, self.deal.currency) else {
            return;
        };
        let then = self
            .visits
            .iter()
            .zip(self.infos)
            .rfind(|(visit, _)| visit.at < self.since)
            .and_then(|(_, info)| *info);
        if let Some(info) = then.filter(|i| i.kind == StageKind::Open) {
            *scope.weighted_at_since_x100.entry(currency).or_default() +=
                i128::from(amount) * i128::from(info.probability);
        }
    }

    /// Abandoned carts and their recovery, attributed to the last follow-up before the purchase.
    fn carts(&self, scope: &mut ScopeAcc) {
        let Some(abandoned_at) = self
            .visits
            .iter()
            .zip(self.infos)
            .find(|(visit, info)| info.is_some_and(|i| i.abandoned) && (self.in_period)(visit.at))
            .map(|(visit, _)| visit.at)
        else {
            return;
        };
        let carts = &mut scope.carts;
        carts.abandoned += 1;
        let value = self.deal.amount_minor.zip(self.deal.currency);
        if let Some((amount, currency)) = value {
            add(&mut carts.abandoned_value, currency, amount);
        }
        let bought_at = self
            .visits
            .iter()
            .zip(self.infos)
            .find(|(visit, info)| {
                visit.at >= abandoned_at && info.is_some_and(|i| i.kind == StageKind::Won)
            })
            .map(|(visit, _)| visit.at);
        let mut sent: Vec<&FollowupInput> = self
            .followups
            .iter()
            .filter(|f| f.sent_at >= abandoned_at)
            .collect();
        sent.sort_by_key(|f| (f.sent_at, f.rule.0, f.step));
        let mut counted: Vec<(NameId, i64)> = Vec::new();
        for followup in &sent {
            if !counted.contains(&(followup.rule, followup.step)) {
                counted.push((followup.rule, followup.step));
                carts
                    .steps
                    .entry((followup.rule, followup.step))
                    .or_default()
                    .carts_sent += 1;
            }
        }
        let Some(bought_at) = bought_at else { return };
        match sent.iter().rev().find(|f| f.sent_at <= bought_at) {
            Some(last) => {
                carts.recovered += 1;
                carts
                    .steps
                    .entry((last.rule, last.step))
                    .or_default()
                    .recovered_after += 1;
                if let Some((amount, currency)) = value {
                    add(&mut carts.recovered_revenue, currency, amount);
                }
            }
            None => carts.bought_without_follow_up += 1,
        }
    }
}

fn add(totals: &mut BTreeMap<Currency, i64>, currency: Currency, amount: i64) {
    let slot = totals.entry(currency).or_insert(0);
    *slot = slot.saturating_add(amount);
}

fn add_all(totals: &mut BTreeMap<Currency, i64>, more: &BTreeMap<Currency, i64>) {
    for (currency, amount) in more {
        add(totals, *currency, *amount);
    }
}

fn totals(values: &BTreeMap<Currency, i64>) -> Vec<MoneyTotal> {
    values.iter().map(|(c, minor)| money(*c, *minor)).collect()
}

fn money(currency: Currency, minor: i64) -> MoneyTotal {
    MoneyTotal {
        currency,
        minor,
        amount: Money::new(minor, currency).to_decimal_string(),
    }
}

/// Per currency, the weighted forecast at the period's start and as it stands, each
/// rounded once.
fn forecast_change(scope: &ScopeAcc) -> Vec<ForecastChange> {
    let mut now: BTreeMap<Currency, i128> = BTreeMap::new();
    for ((currency, _), row) in &scope.forecast {
        *now.entry(*currency).or_default() += row.weighted_x100;
    }
    let currencies: std::collections::BTreeSet<Currency> = now
        .keys()
        .chain(scope.weighted_at_since_x100.keys())
        .copied()
        .collect();
    currencies
        .into_iter()
        .map(|currency| {
            let then = div_round(
                scope
                    .weighted_at_since_x100
                    .get(&currency)
                    .copied()
                    .unwrap_or(0),
                100,
            );
            let now = div_round(now.get(&currency).copied().unwrap_or(0), 100);
            ForecastChange {
                currency,
                at_since: money(currency, clamp(then)),
                now: money(currency, clamp(now)),
                change: money(currency, clamp(now - then)),
            }
        })
        .collect()
}

fn clamp(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

/// Integer division rounding half away from zero.
fn div_round(value: i128, divisor: i128) -> i128 {
    let quotient = value / divisor;
    let remainder = value % divisor;
    if remainder.abs() * 2 >= divisor {
        quotient + value.signum()
    } else {
        quotient
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn ms_to_s(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Nearest-rank percentile: the smallest value with at least `p`% of the values at or
/// below it (so the median of an even count is the lower middle). Reorders `values`
/// (a selection, O(n), rather than a full sort).
pub fn percentile(values: &mut [i64], p: u32) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let rank = (u64::from(p) * values.len() as u64).div_ceil(100).max(1);
    let (_, value, _) = values.select_nth_unstable((rank - 1) as usize);
    Some(*value)
}

/// The open stage with the lowest conversion among those whose cohort has at least
/// `min_cohort` deals (ties: the longer median time, then the earlier stage); when no
/// stage has such a cohort, the open stage with the longest median time in stage.
fn bottleneck(stages: &[StageReport], min_cohort: u64) -> Option<Bottleneck> {
    let open = || stages.iter().filter(|s| s.kind == StageKind::Open);
    let median = |s: &StageReport| s.time_in_stage.median_seconds.unwrap_or(0.0);
    let by_conversion = open()
        .filter(|s| s.cohort >= min_cohort.max(1))
        .filter_map(|s| s.conversion.map(|c| (s, c)))
        .min_by(|(a, ca), (b, cb)| {
            ca.total_cmp(cb)
                .then(median(b).total_cmp(&median(a)))
                .then(a.position.cmp(&b.position))
        });
    if let Some((stage, conversion)) = by_conversion {
        return Some(Bottleneck {
            stage: stage.stage.clone(),
            reason: BottleneckReason::LowestConversion,
            conversion: Some(conversion),
            median_seconds: stage.time_in_stage.median_seconds,
        });
    }
    open()
        .filter(|s| s.time_in_stage.samples > 0)
        .max_by(|a, b| {
            median(a)
                .total_cmp(&median(b))
                .then(b.position.cmp(&a.position))
        })
        .map(|stage| Bottleneck {
            stage: stage.stage.clone(),
            reason: BottleneckReason::LongestTimeInStage,
            conversion: stage.conversion,
            median_seconds: stage.time_in_stage.median_seconds,
        })
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub pipeline: Option<String>,
    pub connection: Option<String>,
    /// Every deal in the filter.
    pub total: ScopeReport,
    /// The same figures, per connection.
    pub by_connection: Vec<ScopeReport>,
}

/// Figures over one set of deals: all of them, or one connection's.
#[derive(Debug, Clone, Serialize)]
pub struct ScopeReport {
    /// `None` for the total.
    pub connection: Option<String>,
    /// Deals scanned.
    pub deals: u64,
    /// Deals whose native stage has no mapping; not in any funnel.
    pub unmapped_open_deals: u64,
    pub pipelines: Vec<PipelineReport>,
    /// Σ amount × probability of open deals by currency and expected close month.
    pub forecast: Vec<ForecastRow>,
    /// Per currency, how the weighted forecast moved over the period.
    pub forecast_change: Vec<ForecastChange>,
    pub cart_recovery: CartRecovery,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub pipeline: String,
    pub label: String,
    pub stages: Vec<StageReport>,
    pub outcomes: Outcomes,
    pub bottleneck: Option<Bottleneck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub label: String,
    pub kind: StageKind,
    /// 1-based order in the pipeline.
    pub position: usize,
    /// Live deals whose current stage this is (open stages only).
    pub open_deals: u64,
    pub open_without_amount: u64,
    pub open_value: Vec<MoneyTotal>,
    /// Visits that started in the period.
    pub entered: u64,
    /// Visits that ended in the period.
    pub exited: u64,
    /// Deals that entered this (open) stage in the period.
    pub cohort: u64,
    /// Of the cohort, those that later reached a later open stage or won.
    pub advanced: u64,
    /// advanced / cohort; `None` for closing stages or an empty cohort.
    pub conversion: Option<f64>,
    pub time_in_stage: TimeInStage,
    pub stall_after_seconds: Option<u64>,
    /// Open deals here longer than the stall threshold, now.
    pub stalled: u64,
    pub stalled_value: Vec<MoneyTotal>,
}

/// Over completed visits that ended in the period.
#[derive(Debug, Clone, Serialize)]
pub struct TimeInStage {
    pub samples: u64,
    pub median_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcomes {
    pub won: u64,
    /// Σ amount of the deals won in the period, per currency.
    pub won_value: Vec<MoneyTotal>,
    pub lost: u64,
    pub reopened: u64,
    /// won / (won + lost)
    pub win_rate: Option<f64>,
    /// lost / (won + lost)
    pub loss_rate: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BottleneckReason {
    LowestConversion,
    LongestTimeInStage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bottleneck {
    pub stage: String,
    pub reason: BottleneckReason,
    pub conversion: Option<f64>,
    pub median_seconds: Option<f64>,
}

/// An amount of one currency: exact minor units and the decimal text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoneyTotal {
    pub currency: Currency,
    pub minor: i64,
    pub amount: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForecastRow {
    pub currency: Currency,
    /// `YYYY-MM`, or `None` for deals with no expected close date.
    pub month: Option<String>,
    pub deals: u64,
    pub amount: MoneyTotal,
    /// Σ amount × stage probability, rounded half away from zero once, at the end.
    pub weighted: MoneyTotal,
}

/// The weighted forecast of one currency at the period's start and now.
#[derive(Debug, Clone, Serialize)]
pub struct ForecastChange {
    pub currency: Currency,
    /// The deals open at `since`, weighted by the stage they were in then, at their
    /// current amounts.
    pub at_since: MoneyTotal,
    /// The forecast as it stands (the sum of `forecast`'s weighted rows).
    pub now: MoneyTotal,
    /// `now - at_since`.
    pub change: MoneyTotal,
}

#[derive(Debug, Clone, Serialize)]
pub struct CartRecovery {
    /// Carts that entered the abandoned stage in the period.
    pub abandoned: u64,
    pub abandoned_value: Vec<MoneyTotal>,
    /// Of those, bought after at least one follow-up was sent.
    pub recovered: u64,
    /// Of those, bought with no follow-up sent before the purchase.
    pub bought_without_follow_up: u64,
    /// recovered / abandoned
    pub recovery_rate: Option<f64>,
    pub recovered_revenue: Vec<MoneyTotal>,
    pub steps: Vec<StepReport>,
}

/// One follow-up step: carts that got it, and recoveries it was the last email before.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub rule: String,
    /// The step, counted from 1 like everywhere else.
    pub step: StepNumber,
    pub carts_sent: u64,
    pub recovered_after: u64,
    pub recovery_rate: Option<f64>,
}
