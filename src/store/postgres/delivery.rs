//! Delivery events on PostgreSQL: the same statements and contract as
//! `store::delivery`, which documents them.
//!
//! Invariant: each event is recorded under a transaction-level advisory lock on its
//! address, so transient bounces of one address recorded by two replicas at once are
//! counted one after the other and still reach the limit.

use super::Database;
use super::deals::pg_text;
use crate::domain::delivery::DeliveryClass;
use crate::store::delivery::{
    COMPLAINT_SKIP, COMPLAINTS_BY_RULE, COUNT_TRANSIENT, DeliveryEvent, DeliveryFigures,
    DeliveryOutcome, DeliveryPolicy, EVENT_FIGURES, INSERT, NewDeliveryEvent, OUTBOX_BY_ID,
    OUTBOX_BY_MESSAGE_ID, PAUSE, PAUSES, RESUME, RulePause, SENT_BY_RULE, SENT_FIGURES, WINDOWS,
    bracketed, complained_rule, effect, event_from, fold_figures, pause_reason, pg,
};
use crate::store::from_ms;
use crate::store::{Result, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

pub(super) async fn record_one(
    tx: &impl GenericClient,
    event: &NewDeliveryEvent,
    policy: &DeliveryPolicy,
    now: DateTime<Utc>,
) -> Result<DeliveryOutcome> {
    let email = event.email.trim().to_lowercase();
    // One address at a time across replicas (see the module's invariant).
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('delivery:' || $1, 0))",
        &[&email],
    )
    .await?;
    let mut row: Option<(i64, String)> = None;
    if let Some(id) = event.outbox_id {
        let statement = tx.prepare_cached(&pg(OUTBOX_BY_ID)).await?;
        if let Some(found) = tx.query_opt(&statement, &[&id, &email]).await? {
            row = Some((found.try_get(0)?, found.try_get(1)?));
        }
    }
    if row.is_none()
        && let Some(message_id) = &event.message_id
    {
        let statement = tx.prepare_cached(&pg(OUTBOX_BY_MESSAGE_ID)).await?;
        let bracketed = bracketed(message_id);
        if let Some(found) = tx
            .query_opt(&statement, &[&pg_text(&bracketed), &email])
            .await?
        {
            row = Some((found.try_get(0)?, found.try_get(1)?));
        }
    }
    let (outbox_id, rule) = row.unzip();
    let statement = tx.prepare_cached(&pg(INSERT)).await?;
    let inserted = tx
        .execute(
            &statement,
            &[
                &pg_text(&event.key),
                &pg_text(&event.source),
                &pg_text(&email),
                &event.class.as_str(),
                &event.status.as_deref().map(pg_text),
                &event.detail.as_deref().map(pg_text),
                &outbox_id,
                &rule,
                &to_ms(event.occurred_at),
                &to_ms(now),
            ],
        )
        .await?
        == 1;
    let mut outcome = DeliveryOutcome::tied(&email, event.class, inserted, outbox_id, rule.clone());
    if !inserted {
        return Ok(outcome);
    }
    let transient_count: i64 = if event.class == DeliveryClass::Transient {
        let statement = tx.prepare_cached(&pg(COUNT_TRANSIENT)).await?;
        tx.query_one(&statement, &[&email, &to_ms(policy.transient_since(now))])
            .await?
            .try_get(0)?
    } else {
        0
    };
    if let Some((reason, source)) = effect(event, policy, transient_count)
        && super::suppression::insert(tx, &email, reason, Some(&source), now).await?
    {
        outcome.suppressed = Some(reason.to_owned());
    }
    if event.class == DeliveryClass::Complaint && !policy.marketing_rules.is_empty() {
        outcome.stopped = tx
            .execute(
                "UPDATE outbox SET state = 'skipped', reason = $1, updated_at = $2
                 WHERE state = 'pending' AND lower(recipient) = $3 AND rule = ANY($4)",
                &[
                    &COMPLAINT_SKIP,
                    &to_ms(now),
                    &email,
                    &policy.marketing_rules,
                ],
            )
            .await?;
    }
    if let Some(rule) = complained_rule(event, &outcome, policy) {
        let since = to_ms(now - chrono::Duration::days(7));
        let mut counts = [0i64; 2];
        for (slot, sql) in counts.iter_mut().zip([COMPLAINTS_BY_RULE, SENT_BY_RULE]) {
            let statement = tx.prepare_cached(&pg(sql)).await?;
            *slot = tx
                .query_one(&statement, &[&rule, &since])
                .await?
                .try_get(0)?;
        }
        if let Some(reason) = pause_reason(policy, counts[0], counts[1]) {
            let statement = tx.prepare_cached(&pg(PAUSE)).await?;
            if tx
                .execute(&statement, &[&rule, &reason, &to_ms(now)])
                .await?
                == 1
            {
                outcome.paused = Some(rule.to_owned());
            }
        }
    }
    Ok(outcome)
}

impl Database {
    /// Records events and their effects in one transaction.
    pub async fn record_delivery_events(
        &self,
        events: &[NewDeliveryEvent],
        policy: &DeliveryPolicy,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryOutcome>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            outcomes.push(record_one(&tx, event, policy, now).await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Reputation figures per rule and overall, over each of `WINDOWS`.
    pub async fn delivery_figures(&self, now: DateTime<Utc>) -> Result<Vec<DeliveryFigures>> {
        let client = self.client().await?;
        let mut all = Vec::new();
        for (window, days) in WINDOWS {
            let since = to_ms(now - chrono::Duration::days(days));
            let sent = client
                .query(&pg(SENT_FIGURES), &[&since])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<std::result::Result<Vec<_>, tokio_postgres::Error>>()?;
            let events = client
                .query(&pg(EVENT_FIGURES), &[&since])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<std::result::Result<Vec<_>, tokio_postgres::Error>>()?;
            all.extend(fold_figures(window, sent, events));
        }
        Ok(all)
    }

    /// Every paused rule, or (with `resume`) the removal of one, returning it.
    pub async fn rule_pauses(&self, resume: Option<&str>) -> Result<Vec<RulePause>> {
        let client = self.client().await?;
        let rows = match resume {
            Some(rule) => client.query(&pg(RESUME), &[&rule]).await?,
            None => client.query(PAUSES, &[]).await?,
        };
        Ok(rows
            .iter()
            .map(|r| {
                Ok(RulePause {
                    rule: r.try_get(0)?,
                    reason: r.try_get(1)?,
                    paused_at: from_ms(r.try_get(2)?),
                })
            })
            .collect::<std::result::Result<Vec<_>, tokio_postgres::Error>>()?)
    }

    /// Runs one of `store::delivery`'s event queries (already in `$N` form or not).
    pub async fn delivery_events(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<DeliveryEvent>> {
        let rows = self.client().await?.query(&pg(sql), params).await?;
        Ok(rows
            .iter()
            .map(event_from)
            .collect::<std::result::Result<_, _>>()?)
    }
}
