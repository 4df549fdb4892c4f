//! Pipeline metrics refreshed at scrape time: deal value by stage and currency,
//! stalled deals by stage, follow-up emails by rule and state.
//!
//! Invariant: the gauges are cleared and rebuilt from the store on every scrape, so a
//! stage, currency or state that no longer has deals disappears instead of lingering.

use super::HttpState;
use super::status::stall_cutoffs;
use crate::store::StoreError;
use crate::telemetry::{EmailLabels, StageLabels, ValueLabels};

/// Rebuilds the pipeline gauges from the store.
pub async fn refresh(state: &HttpState) -> Result<(), StoreError> {
    let metrics = &state.metrics;
    let values = state.store.stage_values().await?;
    let stalled = state
        .store
        .stalled_counts(stall_cutoffs(&state.config().pipelines, chrono::Utc::now()))
        .await?;
    let emails = state.store.outbox_counts().await?;

    metrics.deal_value.clear();
    for value in values.into_iter().filter(|v| !v.currency.is_empty()) {
        metrics
            .deal_value
            .get_or_create(&ValueLabels {
                connection: value.connection,
                pipeline: value.pipeline,
                stage: value.stage,
                currency: value.currency,
            })
            .set(value.amount_minor);
    }
    metrics.stalled_deals.clear();
    for count in stalled {
        metrics
            .stalled_deals
            .get_or_create(&StageLabels {
                connection: count.connection,
                pipeline: count.pipeline,
                stage: count.stage,
            })
            .set(count.deals as i64);
    }
    metrics.outbox_emails.clear();
    for count in emails {
        metrics
            .outbox_emails
            .get_or_create(&EmailLabels {
                rule: count.rule,
                state: count.state,
            })
            .set(count.emails as i64);
    }
    Ok(())
}
