//! Pipeline metrics refreshed at scrape time: deal value by stage and currency,
//! stalled deals by stage, follow-up emails by rule and state, CRM write-backs by
//! connection and state, the reputation figures (sent, bounced, complained, complaint
//! rate per rule over 1d and 7d) and paused rules.
//!
//! Invariant: the gauges are cleared and rebuilt from the store on every scrape, so a
//! stage, currency or state that no longer has deals disappears instead of lingering.

use super::HttpState;
use super::status::stall_cutoffs;
use crate::store::StoreError;
use crate::telemetry::{
    ConnectionStateLabels, DeliverabilityLabels, EmailLabels, RateLabels, StageLabels, ValueLabels,
    rebuild_gauges,
};

/// Rebuilds the pipeline gauges from the store.
pub async fn refresh(state: &HttpState) -> Result<(), StoreError> {
    let metrics = &state.metrics;
    let values = state.store.stage_values().await?;
    let stalled = state
        .store
        .stalled_counts(stall_cutoffs(&state.config().pipelines, chrono::Utc::now()))
        .await?;
    let emails = state.store.outbox_counts().await?;
    let writebacks = state.store.writeback_counts().await?;
    let figures = state.store.delivery_figures(chrono::Utc::now()).await?;
    let pauses = state.store.rule_pauses().await?;

    rebuild_gauges(
        &metrics.deal_value,
        values
            .into_iter()
            .filter(|v| !v.currency.is_empty())
            .map(|value| {
                let labels = ValueLabels {
                    connection: value.connection,
                    pipeline: value.pipeline,
                    stage: value.stage,
                    currency: value.currency,
                };
                (labels, value.amount_minor)
            }),
    );
    rebuild_gauges(
        &metrics.stalled_deals,
        stalled.into_iter().map(|count| {
            let labels = StageLabels {
                connection: count.connection,
                pipeline: count.pipeline,
                stage: count.stage,
            };
            (labels, count.deals as i64)
        }),
    );
    rebuild_gauges(
        &metrics.outbox_emails,
        emails.into_iter().map(|count| {
            let labels = EmailLabels {
                rule: count.rule,
                state: count.state,
            };
            (labels, count.emails as i64)
        }),
    );
    rebuild_gauges(
        &metrics.writebacks,
        writebacks.into_iter().map(|count| {
            let labels = ConnectionStateLabels {
                connection: count.connection,
                state: count.state,
            };
            (labels, count.rows as i64)
        }),
    );
    let rule_of = |rule: &Option<String>| rule.clone().unwrap_or_else(|| "all".to_owned());
    rebuild_gauges(
        &metrics.deliverability_emails,
        figures.iter().flat_map(|line| {
            [
                ("sent", line.sent),
                ("delivered", line.delivered),
                ("bounced_permanent", line.bounced_permanent),
                ("bounced_transient", line.bounced_transient),
                ("blocked", line.blocked),
                ("complained", line.complained),
            ]
            .map(|(outcome, value)| {
                let labels = DeliverabilityLabels {
                    rule: rule_of(&line.rule),
                    window: line.window.to_owned(),
                    outcome: outcome.to_owned(),
                };
                (labels, value)
            })
        }),
    );
    metrics.complaint_rate.clear();
    for line in &figures {
        if let Some(rate) = line.complaint_rate {
            let labels = RateLabels {
                rule: rule_of(&line.rule),
                window: line.window.to_owned(),
            };
            metrics.complaint_rate.get_or_create(&labels).set(rate);
        }
    }
    rebuild_gauges(
        &metrics.rules_paused,
        pauses.into_iter().map(|pause| {
            let labels = EmailLabels {
                rule: pause.rule,
                state: "paused".to_owned(),
            };
            (labels, 1)
        }),
    );
    Ok(())
}
