//! The report as text tables and CSV rows (the CLI prints them through `output`).

use super::{MoneyTotal, PipelineReport, Report, ScopeReport};
use crate::output::{Format, Rows};

/// Which table CSV output carries (a CSV file holds one table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Stages,
    Forecast,
    Carts,
}

/// `3d 4h`, `22h`, `15m`, `40s`: the two largest units.
pub fn duration(seconds: f64) -> String {
    let total = seconds.round().max(0.0) as u64;
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = total;
    for (size, unit) in units {
        if rest >= size {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        parts.join(" ")
    }
}

/// `2500.00 EUR; 2000.00 USD`, or `-` when empty.
pub fn money(totals: &[MoneyTotal]) -> String {
    if totals.is_empty() {
        return "-".to_owned();
    }
    totals
        .iter()
        .map(|t| format!("{} {}", t.amount, t.currency))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `33.3%`, or `-`.
pub fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn scope_name(scope: &ScopeReport) -> String {
    scope.connection.clone().unwrap_or_else(|| "all".to_owned())
}

fn stage_rows(rows: &mut Rows, scope: &ScopeReport, pipeline: &PipelineReport, csv: bool) {
    for stage in &pipeline.stages {
        if csv {
            // Machine-friendly: plain numbers, seconds, ratios; empty when not applicable.
            let number = |value: Option<f64>| value.map(|v| format!("{v}")).unwrap_or_default();
            let amounts = |totals: &[MoneyTotal]| {
                if totals.is_empty() {
                    String::new()
                } else {
                    money(totals)
                }
            };
            rows.push(vec![
                scope_name(scope),
                pipeline.pipeline.clone(),
                stage.stage.clone(),
                format!("{:?}", stage.kind).to_lowercase(),
                stage.open_deals.to_string(),
                amounts(&stage.open_value),
                stage.entered.to_string(),
                stage.exited.to_string(),
                stage.cohort.to_string(),
                stage.advanced.to_string(),
                number(stage.conversion),
                number(stage.time_in_stage.median_seconds),
                number(stage.time_in_stage.p90_seconds),
                stage.stalled.to_string(),
                amounts(&stage.stalled_value),
            ]);
            continue;
        }
        let time = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), duration);
        rows.push(vec![
            stage.stage.clone(),
            format!("{:?}", stage.kind).to_lowercase(),
            stage.open_deals.to_string(),
            money(&stage.open_value),
            stage.entered.to_string(),
            stage.exited.to_string(),
            format!("{}/{}", stage.advanced, stage.cohort),
            percent(stage.conversion),
            time(stage.time_in_stage.median_seconds),
            time(stage.time_in_stage.p90_seconds),
            stage.stalled.to_string(),
            money(&stage.stalled_value),
        ]);
    }
}

const CSV_STAGE_HEADERS: [&str; 15] = [
    "scope",
    "pipeline",
    "stage",
    "kind",
    "open_deals",
    "open_value",
    "entered",
    "exited",
    "cohort",
    "advanced",
    "conversion",
    "median_seconds",
    "p90_seconds",
    "stalled",
    "stalled_value",
];

const STAGE_HEADERS: [&str; 12] = [
    "stage",
    "kind",
    "open",
    "open value",
    "entered",
    "exited",
    "advanced/cohort",
    "conversion",
    "median in stage",
    "p90 in stage",
    "stalled",
    "stalled value",
];

fn forecast_rows(rows: &mut Rows, scope: &ScopeReport, csv: bool) {
    for row in &scope.forecast {
        let mut cells = Vec::new();
        if csv {
            cells.push(scope_name(scope));
        }
        cells.extend([
            row.currency.to_string(),
            row.month
                .clone()
                .unwrap_or_else(|| "unscheduled".to_owned()),
            row.deals.to_string(),
            row.amount.amount.clone(),
            row.weighted.amount.clone(),
        ]);
        rows.push(cells);
    }
}

fn step_rows(rows: &mut Rows, scope: &ScopeReport, csv: bool) {
    for step in &scope.cart_recovery.steps {
        let mut cells = Vec::new();
        if csv {
            cells.push(scope_name(scope));
        }
        cells.extend([
            step.rule.clone(),
            step.step.to_string(),
            step.carts_sent.to_string(),
            step.recovered_after.to_string(),
            if csv {
                step.recovery_rate
                    .map(|r| format!("{r}"))
                    .unwrap_or_default()
            } else {
                percent(step.recovery_rate)
            },
        ]);
        rows.push(cells);
    }
}

fn with_scope(headers: &[&'static str]) -> Vec<&'static str> {
    let mut out = vec!["scope"];
    out.extend(headers);
    out
}

/// One CSV table over the total and every connection (column `scope`).
pub fn csv(report: &Report, section: Section) -> String {
    let scopes = std::iter::once(&report.total).chain(&report.by_connection);
    let mut rows;
    match section {
        Section::Stages => {
            rows = Rows::new(CSV_STAGE_HEADERS.to_vec());
            for scope in scopes {
                for pipeline in &scope.pipelines {
                    stage_rows(&mut rows, scope, pipeline, true);
                }
            }
        }
        Section::Forecast => {
            rows = Rows::new(with_scope(&[
                "currency", "month", "deals", "amount", "weighted",
            ]));
            for scope in scopes {
                forecast_rows(&mut rows, scope, true);
            }
        }
        Section::Carts => {
            rows = Rows::new(with_scope(&[
                "rule",
                "step",
                "carts_sent",
                "recovered_after",
                "recovery_rate",
            ]));
            for scope in scopes {
                step_rows(&mut rows, scope, true);
            }
        }
    }
    rows.render(Format::Csv)
}

/// The report as text tables; `by_connection` adds each connection's own figures.
pub fn table(report: &Report, by_connection: bool) -> String {
    let mut out = format!(
        "Report {} → {}{}{}\n",
        report.since.format("%Y-%m-%d %H:%M"),
        report.until.format("%Y-%m-%d %H:%M"),
        report
            .pipeline
            .as_ref()
            .map(|p| format!(", pipeline {p}"))
            .unwrap_or_default(),
        report
            .connection
            .as_ref()
            .map(|c| format!(", connection {c}"))
            .unwrap_or_default(),
    );
    scope_table(&mut out, &report.total);
    if by_connection {
        for scope in &report.by_connection {
            out.push_str(&format!(
                "\n======== connection {} ========\n",
                scope_name(scope)
            ));
            scope_table(&mut out, scope);
        }
    }
    out
}

fn scope_table(out: &mut String, scope: &ScopeReport) {
    for pipeline in &scope.pipelines {
        out.push_str(&format!(
            "\nPipeline {} ({})\n\n",
            pipeline.pipeline, pipeline.label
        ));
        let mut rows = Rows::new(STAGE_HEADERS.to_vec());
        stage_rows(&mut rows, scope, pipeline, false);
        out.push_str(&rows.render(Format::Table));
        let o = &pipeline.outcomes;
        out.push_str(&format!(
            "\nwon {} ({}), lost {} (win rate {}, loss rate {}), reopened {}\n",
            o.won,
            money(&o.won_value),
            o.lost,
            percent(o.win_rate),
            percent(o.loss_rate),
            o.reopened
        ));
        match &pipeline.bottleneck {
            Some(b) => out.push_str(&format!(
                "bottleneck: {} ({}; conversion {}, median in stage {})\n",
                b.stage,
                match b.reason {
                    super::BottleneckReason::LowestConversion => "lowest conversion",
                    super::BottleneckReason::LongestTimeInStage => "longest time in stage",
                },
                percent(b.conversion),
                b.median_seconds.map_or_else(|| "-".to_owned(), duration)
            )),
            None => out.push_str("bottleneck: not enough data in the period\n"),
        }
    }
    if scope.unmapped_open_deals > 0 {
        out.push_str(&format!(
            "\n{} deal(s) sit in unmapped native stages and are in no funnel (see `dealsync check`)\n",
            scope.unmapped_open_deals
        ));
    }
    out.push_str("\nWeighted forecast (open deals, Σ amount × stage probability)\n\n");
    if scope.forecast.is_empty() {
        out.push_str("no open deals with an amount\n");
    } else {
        let mut rows = Rows::new(vec!["currency", "month", "deals", "amount", "weighted"]);
        forecast_rows(&mut rows, scope, false);
        out.push_str(&rows.render(Format::Table));
    }
    for change in &scope.forecast_change {
        out.push_str(&format!(
            "forecast {}: {} at the period's start → {} now ({})\n",
            change.currency,
            change.at_since.amount,
            change.now.amount,
            signed(&change.change.amount),
        ));
    }
    let carts = &scope.cart_recovery;
    if carts.abandoned > 0 {
        out.push_str(&format!(
            "\nCart recovery: {} abandoned ({}), {} recovered after a follow-up ({}), {} bought without one; recovered revenue {}\n\n",
            carts.abandoned,
            money(&carts.abandoned_value),
            carts.recovered,
            percent(carts.recovery_rate),
            carts.bought_without_follow_up,
            money(&carts.recovered_revenue),
        ));
        let mut rows = Rows::new(vec![
            "rule",
            "step",
            "carts sent",
            "recovered after",
            "rate",
        ]);
        step_rows(&mut rows, scope, false);
        out.push_str(&rows.render(Format::Table));
    }
}

/// "+12.00" or "-12.00" (an amount with its sign always shown).
fn signed(amount: &str) -> String {
    if amount.starts_with('-') {
        amount.to_owned()
    } else {
        format!("+{amount}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_the_two_largest_units() {
        assert_eq!(duration(0.0), "0s");
        assert_eq!(duration(40.0), "40s");
        assert_eq!(duration(3.0 * 86_400.0), "3d");
        assert_eq!(duration(70.0 * 3_600.0), "2d 22h");
        assert_eq!(duration(3_725.0), "1h 2m");
    }
}
