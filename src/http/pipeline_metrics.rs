//! Pipeline metrics refreshed at scrape time: deal value by stage and currency,
//! stalled deals by stage, follow-up emails by rule and state, CRM write-backs by
//! connection and state.
//!
//! Invariant: the gauges are cleared and rebuilt from the store on every scrape, so a
//! stage, currency or state that no longer has deals disappears instead of lingering.

use super::HttpState;
use super::status::stall_cutoffs;
use crate::store::StoreError;
use crate::telemetry::{
    ConnectionStateLabels, EmailLabels, StageLabels, ValueLabels, rebuild_gauges,
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
    Ok(())
}
