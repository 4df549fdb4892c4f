//! Delivery events: bounces and complaints that arrive after the hand-off (a relay's
//! delivery status notifications, an email provider's webhooks), and what they do to
//! the suppression list and the outbox. The SQL is written here once for both backends
//! (`?N` placeholders, `$N` on PostgreSQL through [`pg`]); `store::postgres::delivery`
//! runs it there.
//!
//! Invariants:
//! - An event is recorded once (`event_key` is unique); a redelivery changes nothing.
//! - An event is tied to an outbox row only when the row's recipient is the address the
//!   event names, whatever id or Message-ID it carries.
//! - The event and its effects commit in one transaction: a permanent bounce or a
//!   complaint suppresses the address (for every rule and connection: the suppression
//!   list is per address); a transient bounce suppresses it once the address has
//!   `transient_limit` of them within `transient_window`; a complaint also skips every
//!   pending email of a marketing rule to the address. Policy refusals (5.7.x) and
//!   undetermined bounces are recorded only.

use super::deals::Columns;
use super::{Result, Store, from_ms, to_ms};
use crate::domain::delivery::DeliveryClass;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use std::time::Duration;

/// A bounce or complaint as an intake path read it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeliveryEvent {
    /// Dedupes redeliveries of the same event.
    pub key: String,
    /// `dsn` or the receiving connection.
    pub source: String,
    pub email: String,
    pub class: DeliveryClass,
    /// The code it was classified by.
    pub status: Option<String>,
    pub detail: Option<String>,
    /// The outbox row the event names (a return path, a provider's metadata).
    pub outbox_id: Option<i64>,
    /// The Message-ID dealsync set on the email, as the event quotes it.
    pub message_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// What events do beyond being recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    pub transient_limit: u32,
    pub transient_window: Duration,
    /// The marketing rules, whose pending emails a complaint stops.
    pub marketing_rules: Vec<String>,
    /// A marketing rule whose complaints over the last 7 days exceed this share of its
    /// emails sent in them pauses itself (0.003 for 0.3 %)...
    pub pause_above: f64,
    /// ...once it has sent at least this many in them.
    pub pause_min_sent: u32,
}

impl DeliveryPolicy {
    /// Since when transient bounces count towards the limit, at `now`.
    pub(in crate::store) fn transient_since(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::from_std(self.transient_window).unwrap_or_default()
    }
}

/// What recording one event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryOutcome {
    pub email: String,
    pub class: DeliveryClass,
    /// False when the event was recorded before (a redelivery).
    pub recorded: bool,
    /// The outbox row it was tied to, and its rule.
    pub outbox_id: Option<i64>,
    pub rule: Option<String>,
    /// The suppression reason, when this event suppressed the address.
    pub suppressed: Option<String>,
    /// Pending marketing emails a complaint stopped.
    pub stopped: u64,
    /// The rule this complaint paused (its complaint rate passed the threshold).
    pub paused: Option<String>,
}

impl DeliveryOutcome {
    /// An event recorded (or found recorded before) and tied as given, before its
    /// effects.
    pub(in crate::store) fn tied(
        email: &str,
        class: DeliveryClass,
        recorded: bool,
        outbox_id: Option<i64>,
        rule: Option<String>,
    ) -> DeliveryOutcome {
        DeliveryOutcome {
            email: email.to_owned(),
            class,
            recorded,
            outbox_id,
            rule,
            suppressed: None,
            stopped: 0,
            paused: None,
        }
    }
}

/// A paused marketing rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RulePause {
    pub rule: String,
    pub reason: String,
    pub paused_at: DateTime<Utc>,
}

/// Reputation figures of one rule (`None`: every rule, and events tied to none) over
/// one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryFigures {
    pub rule: Option<String>,
    /// "1d" or "7d".
    pub window: &'static str,
    pub sent: i64,
    /// Reported delivered by a provider or a DSN (where known).
    pub delivered: i64,
    pub bounced_permanent: i64,
    pub bounced_transient: i64,
    /// Policy refusals (5.7.x) and undetermined bounces.
    pub blocked: i64,
    pub complained: i64,
    /// complained / sent, when anything was sent.
    pub complaint_rate: Option<f64>,
}

/// The windows figures are given for.
pub const WINDOWS: [(&str, i64); 2] = [("1d", 1), ("7d", 7)];

/// Folds (rule, sent) and (rule, class, count) rows of one window into figures per
/// rule, sorted by rule, then the overall line.
pub(super) fn fold_figures(
    window: &'static str,
    sent: Vec<(String, i64)>,
    events: Vec<(String, String, i64)>,
) -> Vec<DeliveryFigures> {
    let mut by_rule: std::collections::BTreeMap<String, DeliveryFigures> = Default::default();
    let empty = |rule: Option<String>| DeliveryFigures {
        rule,
        window,
        sent: 0,
        delivered: 0,
        bounced_permanent: 0,
        bounced_transient: 0,
        blocked: 0,
        complained: 0,
        complaint_rate: None,
    };
    let mut overall = empty(None);
    for (rule, count) in sent {
        overall.sent += count;
        by_rule
            .entry(rule.clone())
            .or_insert_with(|| empty(Some(rule)))
            .sent += count;
    }
    for (rule, class, count) in events {
        let add = |figures: &mut DeliveryFigures| match DeliveryClass::parse(&class) {
            Some(DeliveryClass::Permanent) => figures.bounced_permanent += count,
            Some(DeliveryClass::Transient) => figures.bounced_transient += count,
            Some(DeliveryClass::Complaint) => figures.complained += count,
            Some(DeliveryClass::Delivered) => figures.delivered += count,
            Some(DeliveryClass::Policy | DeliveryClass::Undetermined) | None => {
                figures.blocked += count
            }
        };
        add(&mut overall);
        if !rule.is_empty() {
            add(by_rule
                .entry(rule.clone())
                .or_insert_with(|| empty(Some(rule))));
        }
    }
    let mut all: Vec<DeliveryFigures> = by_rule.into_values().collect();
    all.push(overall);
    for figures in &mut all {
        figures.complaint_rate =
            (figures.sent > 0).then(|| figures.complained as f64 / figures.sent as f64);
    }
    all
}

/// Why a rule pauses, when `complaints` of `sent` pass the policy's threshold.
pub(super) fn pause_reason(policy: &DeliveryPolicy, complaints: i64, sent: i64) -> Option<String> {
    let over = sent > 0
        && sent >= i64::from(policy.pause_min_sent)
        && complaints as f64 / sent as f64 > policy.pause_above;
    over.then(|| {
        format!(
            "complaint rate {:.2} % over the last 7 days ({complaints} complaints, {sent} emails sent) passed {:.2} %",
            100.0 * complaints as f64 / sent as f64,
            100.0 * policy.pause_above
        )
    })
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryEvent {
    pub id: i64,
    pub source: String,
    pub email: String,
    pub class: String,
    pub status: Option<String>,
    pub detail: Option<String>,
    pub outbox_id: Option<i64>,
    pub rule: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

/// The columns [`event_from`] reads, in its order.
pub(super) const COLUMNS: &str =
    "id, source, email, class, status, detail, outbox_id, rule, occurred_at, recorded_at";

/// Reads an event row of either backend ([`COLUMNS`]).
pub(super) fn event_from<R: Columns>(row: &R) -> std::result::Result<DeliveryEvent, R::Error> {
    Ok(DeliveryEvent {
        id: row.int(0)?,
        source: row.text(1)?,
        email: row.text(2)?,
        class: row.text(3)?,
        status: row.opt_text(4)?,
        detail: row.opt_text(5)?,
        outbox_id: row.opt_int(6)?,
        rule: row.opt_text(7)?,
        occurred_at: from_ms(row.int(8)?),
        recorded_at: from_ms(row.int(9)?),
    })
}

/// The statement in PostgreSQL's placeholders.
pub(super) fn pg(sql: &str) -> String {
    sql.replace('?', "$")
}

pub(super) const OUTBOX_BY_ID: &str =
    "SELECT id, rule FROM outbox WHERE id = ?1 AND lower(recipient) = ?2";
pub(super) const OUTBOX_BY_MESSAGE_ID: &str = "SELECT id, rule FROM outbox WHERE message_id = ?1 AND lower(recipient) = ?2 ORDER BY id LIMIT 1";
pub(super) const INSERT: &str = "INSERT INTO delivery_events
    (event_key, source, email, class, status, detail, outbox_id, rule, occurred_at, recorded_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (event_key) DO NOTHING";
pub(super) const COUNT_TRANSIENT: &str = "SELECT count(*) FROM delivery_events
    WHERE email = ?1 AND class = 'transient' AND occurred_at >= ?2";
pub(super) const FOR_DEAL: &str = "SELECT {COLUMNS} FROM delivery_events
    WHERE outbox_id IN (SELECT id FROM outbox WHERE deal_id = ?1) OR email = ?2
    ORDER BY occurred_at, id";
pub(super) const SENT_BY_RULE: &str =
    "SELECT count(*) FROM outbox WHERE rule = ?1 AND state = 'sent' AND sent_at >= ?2";
pub(super) const COMPLAINTS_BY_RULE: &str = "SELECT count(*) FROM delivery_events
    WHERE rule = ?1 AND class = 'complaint' AND occurred_at >= ?2";
pub(super) const PAUSE: &str = "INSERT INTO rule_pauses (rule, reason, paused_at)
    VALUES (?1, ?2, ?3) ON CONFLICT (rule) DO NOTHING";
pub(super) const SENT_FIGURES: &str =
    "SELECT rule, count(*) FROM outbox WHERE state = 'sent' AND sent_at >= ?1 GROUP BY rule";
pub(super) const EVENT_FIGURES: &str = "SELECT coalesce(rule, ''), class, count(*)
    FROM delivery_events WHERE occurred_at >= ?1 GROUP BY coalesce(rule, ''), class";
pub(super) const PAUSES: &str = "SELECT rule, reason, paused_at FROM rule_pauses ORDER BY rule";
pub(super) const RESUME: &str =
    "DELETE FROM rule_pauses WHERE rule = ?1 RETURNING rule, reason, paused_at";
pub(super) const FOR_EMAIL: &str =
    "SELECT {COLUMNS} FROM delivery_events WHERE email = ?1 ORDER BY occurred_at, id";

/// A Message-ID as the outbox stores it: in angle brackets, trimmed.
pub(super) fn bracketed(message_id: &str) -> String {
    let bare = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    format!("<{bare}>")
}

/// What an event does once recorded: the suppression to add (reason, source) and
/// whether pending marketing is stopped. `transient_count` is the address's transient
/// bounces in the window, this one included.
pub(super) fn effect(
    event: &NewDeliveryEvent,
    policy: &DeliveryPolicy,
    transient_count: i64,
) -> Option<(&'static str, String)> {
    let what = match (&event.status, &event.detail) {
        (Some(status), Some(detail)) => format!("{status} {detail}"),
        (Some(status), None) => status.clone(),
        (None, Some(detail)) => detail.clone(),
        (None, None) => event.class.as_str().to_owned(),
    };
    let source = format!("{}: {what}", event.source);
    match event.class {
        DeliveryClass::Permanent => Some(("hard bounce", source)),
        DeliveryClass::Complaint => Some(("complaint", source)),
        DeliveryClass::Transient if transient_count >= i64::from(policy.transient_limit) => Some((
            "soft bounces",
            format!(
                "{transient_count} transient bounces within {}; last {source}",
                humantime::format_duration(policy.transient_window)
            ),
        )),
        DeliveryClass::Transient
        | DeliveryClass::Policy
        | DeliveryClass::Undetermined
        | DeliveryClass::Delivered => None,
    }
}

/// The marketing rule a newly recorded complaint counts against, if any.
pub(super) fn complained_rule<'a>(
    event: &NewDeliveryEvent,
    outcome: &DeliveryOutcome,
    policy: &'a DeliveryPolicy,
) -> Option<&'a str> {
    if event.class != DeliveryClass::Complaint || !outcome.recorded {
        return None;
    }
    let rule = outcome.rule.as_deref()?;
    policy
        .marketing_rules
        .iter()
        .find(|name| name.as_str() == rule)
        .map(String::as_str)
}

/// The skip reason of the pending marketing emails a complaint stops.
pub(super) const COMPLAINT_SKIP: &str = "the recipient complained (marked an email as spam)";

pub(super) fn record_one(
    tx: &Transaction<'_>,
    event: &NewDeliveryEvent,
    policy: &DeliveryPolicy,
    now: DateTime<Utc>,
) -> Result<DeliveryOutcome> {
    let email = event.email.trim().to_lowercase();
    let mut row: Option<(i64, String)> = None;
    if let Some(id) = event.outbox_id {
        row = tx
            .prepare_cached(OUTBOX_BY_ID)?
            .query_row(params![id, email], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
    }
    if row.is_none()
        && let Some(message_id) = &event.message_id
    {
        row = tx
            .prepare_cached(OUTBOX_BY_MESSAGE_ID)?
            .query_row(params![bracketed(message_id), email], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
    }
    let (outbox_id, rule) = row.unzip();
    let inserted = tx.prepare_cached(INSERT)?.execute(params![
        event.key,
        event.source,
        email,
        event.class.as_str(),
        event.status,
        event.detail,
        outbox_id,
        rule,
        to_ms(event.occurred_at),
        to_ms(now),
    ])? == 1;
    let mut outcome = DeliveryOutcome::tied(&email, event.class, inserted, outbox_id, rule.clone());
    if !inserted {
        return Ok(outcome);
    }
    let transient_count = if event.class == DeliveryClass::Transient {
        tx.prepare_cached(COUNT_TRANSIENT)?
            .query_row(params![email, to_ms(policy.transient_since(now))], |r| {
                r.get(0)
            })?
    } else {
        0
    };
    if let Some((reason, source)) = effect(event, policy, transient_count)
        && super::suppression::insert(tx, &email, reason, Some(&source), now)?
    {
        outcome.suppressed = Some(reason.to_owned());
    }
    if event.class == DeliveryClass::Complaint && !policy.marketing_rules.is_empty() {
        let rules = serde_json::to_string(&policy.marketing_rules)
            .map_err(|error| super::StoreError::Corrupt(error.to_string()))?;
        outcome.stopped = tx.execute(
            "UPDATE outbox SET state = 'skipped', reason = ?1, updated_at = ?2
             WHERE state = 'pending' AND lower(recipient) = ?3
               AND rule IN (SELECT value FROM json_each(?4))",
            params![COMPLAINT_SKIP, to_ms(now), email, rules],
        )? as u64;
    }
    if let Some(rule) = complained_rule(event, &outcome, policy) {
        let since = to_ms(now - chrono::Duration::days(7));
        let count = |sql: &str| -> Result<i64> {
            Ok(tx
                .prepare_cached(sql)?
                .query_row(params![rule, since], |r| r.get(0))?)
        };
        if let Some(reason) = pause_reason(policy, count(COMPLAINTS_BY_RULE)?, count(SENT_BY_RULE)?)
            && tx
                .prepare_cached(PAUSE)?
                .execute(params![rule, reason, to_ms(now)])?
                == 1
        {
            outcome.paused = Some(rule.to_owned());
        }
    }
    Ok(outcome)
}

impl Store {
    /// Records bounces and complaints and applies what they do, all in one
    /// transaction (see the module's invariants); one outcome per event, in order.
    pub async fn record_delivery_events(
        &self,
        events: Vec<NewDeliveryEvent>,
        policy: DeliveryPolicy,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryOutcome>> {
        if let Some(database) = self.postgres() {
            return database
                .record_delivery_events(&events, &policy, now)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            events
                .iter()
                .map(|event| record_one(tx, event, &policy, now))
                .collect()
        })
        .await
    }

    /// The delivery events of a deal's emails and of its contact's address, oldest first.
    pub async fn delivery_events_for_deal(
        &self,
        deal_id: i64,
        contact: Option<String>,
    ) -> Result<Vec<DeliveryEvent>> {
        let email = contact.unwrap_or_default().trim().to_lowercase();
        if let Some(database) = self.postgres() {
            return database
                .delivery_events(&FOR_DEAL.replace("{COLUMNS}", COLUMNS), &[&deal_id, &email])
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare_cached(&FOR_DEAL.replace("{COLUMNS}", COLUMNS))?;
            let rows = statement.query_map(params![deal_id, email], |row| event_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Reputation figures per rule and overall, over the last day and the last 7 days.
    pub async fn delivery_figures(&self, now: DateTime<Utc>) -> Result<Vec<DeliveryFigures>> {
        if let Some(database) = self.postgres() {
            return database
                .delivery_figures(now)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut all = Vec::new();
            for (window, days) in WINDOWS {
                let since = to_ms(now - chrono::Duration::days(days));
                let sent = db
                    .prepare_cached(SENT_FIGURES)?
                    .query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let events = db
                    .prepare_cached(EVENT_FIGURES)?
                    .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                all.extend(fold_figures(window, sent, events));
            }
            Ok(all)
        })
        .await
    }

    /// The paused marketing rules, by name.
    pub async fn rule_pauses(&self) -> Result<Vec<RulePause>> {
        if let Some(database) = self.postgres() {
            return database
                .rule_pauses(None)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let rows = db
                .prepare_cached(PAUSES)?
                .query_map([], |r| {
                    Ok(RulePause {
                        rule: r.get(0)?,
                        reason: r.get(1)?,
                        paused_at: from_ms(r.get(2)?),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Resumes a paused rule (an operator's command); what was removed, `None` when the
    /// rule was not paused.
    pub async fn resume_rule(&self, rule: String) -> Result<Option<RulePause>> {
        if let Some(database) = self.postgres() {
            return database
                .rule_pauses(Some(&rule))
                .await
                .map(|mut removed| removed.pop())
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            Ok(tx
                .prepare_cached(RESUME)?
                .query_row([rule], |r| {
                    Ok(RulePause {
                        rule: r.get(0)?,
                        reason: r.get(1)?,
                        paused_at: from_ms(r.get(2)?),
                    })
                })
                .optional()?)
        })
        .await
    }

    /// The delivery events of one address, oldest first.
    pub async fn delivery_events_for_email(&self, email: String) -> Result<Vec<DeliveryEvent>> {
        let email = email.trim().to_lowercase();
        if let Some(database) = self.postgres() {
            return database
                .delivery_events(&FOR_EMAIL.replace("{COLUMNS}", COLUMNS), &[&email])
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare_cached(&FOR_EMAIL.replace("{COLUMNS}", COLUMNS))?;
            let rows = statement.query_map(params![email], |row| event_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StepNumber;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::upsert;
    use crate::store::ledger::Value;
    use crate::store::ledger::test_sql::exec;
    use crate::store::{EnrollPlan, NewOutboxRow, OutboxAction, OutboxRowFilter, OutboxState};
    use chrono::TimeZone;

    fn at(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap() + chrono::Duration::minutes(minute)
    }

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            transient_limit: 2,
            transient_window: Duration::from_secs(24 * 3600),
            marketing_rules: vec!["carts".into()],
            pause_above: 0.3,
            pause_min_sent: 3,
        }
    }

    fn event(key: &str, email: &str, class: DeliveryClass, minute: i64) -> NewDeliveryEvent {
        NewDeliveryEvent {
            key: key.into(),
            source: "dsn".into(),
            email: email.into(),
            class,
            status: Some("5.1.1".into()),
            detail: None,
            outbox_id: None,
            message_id: None,
            occurred_at: at(minute),
        }
    }

    /// Stores a deal with `steps` pending emails of `rule` to `recipient`; the row ids.
    async fn emails(
        store: &Store,
        external_id: &str,
        rule: &str,
        recipient: &str,
        steps: usize,
    ) -> Vec<i64> {
        store
            .upsert_deals(vec![upsert(external_id, "lead", at(0))])
            .await
            .unwrap();
        let deal_id = store
            .deal_by_external_id("crm", external_id)
            .await
            .unwrap()
            .unwrap()
            .id;
        let rows = (0..steps)
            .map(|index| NewOutboxRow {
                step: StepNumber::from_index(index as i64),
                action: OutboxAction::Email,
                due_at: at(60 * index as i64),
                state: OutboxState::Pending,
                reason: None,
            })
            .collect();
        let recipient = recipient.to_owned();
        store
            .enroll(deal_id, rule.into(), at(-10_000), at(0), move |_, _| {
                EnrollPlan::Enroll {
                    recipient,
                    anchor_at: at(0),
                    rows,
                    supersede: Vec::new(),
                }
            })
            .await
            .unwrap();
        let filter = OutboxRowFilter {
            deal_id: Some(deal_id),
            ..OutboxRowFilter::default()
        };
        let mut ids: Vec<i64> = store
            .outbox(filter)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        ids
    }

    async fn state_of(store: &Store, id: i64) -> (String, Option<String>) {
        let rows = store.outbox(OutboxRowFilter::default()).await.unwrap();
        let row = rows.into_iter().find(|r| r.id == id).expect("the row");
        (row.state.as_str().to_owned(), row.reason)
    }

    #[tokio::test]
    async fn a_permanent_bounce_suppresses_once_and_is_tied_to_its_email_by_message_id() {
        on_both(
            "a_permanent_bounce_suppresses_once_and_is_tied_to_its_email_by_message_id",
            async |store| {
                let ids = emails(&store, "d1", "stalled", "Nobody@Example.com", 1).await;
                exec(
                    &store,
                    "UPDATE outbox SET state = 'sent', message_id = ?2 WHERE id = ?1",
                    vec![
                        Value::Int(ids[0]),
                        Value::Text("<d1-stalled-0.dealsync@shop.example>"),
                    ],
                )
                .await;
                let mut bounce = event("k1", "nobody@example.com", DeliveryClass::Permanent, 5);
                bounce.message_id = Some("d1-stalled-0.dealsync@shop.example".into());
                let outcomes = store
                    .record_delivery_events(vec![bounce.clone()], policy(), at(6))
                    .await
                    .unwrap();
                assert_eq!(outcomes[0].outbox_id, Some(ids[0]));
                assert_eq!(outcomes[0].suppressed.as_deref(), Some("hard bounce"));
                let suppression = store
                    .suppression("nobody@example.com".into())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(suppression.reason, "hard bounce");
                assert_eq!(suppression.source.as_deref(), Some("dsn: 5.1.1"));
                // A redelivery records nothing and does nothing.
                let again = store
                    .record_delivery_events(vec![bounce], policy(), at(7))
                    .await
                    .unwrap();
                assert!(!again[0].recorded);
                let events = store
                    .delivery_events_for_email("NOBODY@example.com".into())
                    .await
                    .unwrap();
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].rule.as_deref(), Some("stalled"));
                let deal = store
                    .delivery_events_for_deal(
                        store
                            .deal_by_external_id("crm", "d1")
                            .await
                            .unwrap()
                            .unwrap()
                            .id,
                        None,
                    )
                    .await
                    .unwrap();
                assert_eq!(deal.len(), 1);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_outbox_id_for_another_recipient_is_not_trusted() {
        on_both(
            "an_outbox_id_for_another_recipient_is_not_trusted",
            async |store| {
                let ids = emails(&store, "d1", "stalled", "ada@example.com", 1).await;
                let mut bounce = event("k1", "eve@example.com", DeliveryClass::Policy, 5);
                bounce.outbox_id = Some(ids[0]);
                let outcomes = store
                    .record_delivery_events(vec![bounce], policy(), at(6))
                    .await
                    .unwrap();
                assert_eq!(outcomes[0].outbox_id, None);
                assert!(outcomes[0].recorded);
                // A policy refusal suppresses nobody.
                assert_eq!(outcomes[0].suppressed, None);
                assert!(
                    store
                        .suppression("eve@example.com".into())
                        .await
                        .unwrap()
                        .is_none()
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn transient_bounces_suppress_only_at_the_limit_within_the_window() {
        on_both(
            "transient_bounces_suppress_only_at_the_limit_within_the_window",
            async |store| {
                let record = |key: &'static str, minute: i64| {
                    let store = &store;
                    async move {
                        store
                            .record_delivery_events(
                                vec![event(
                                    key,
                                    "full@example.com",
                                    DeliveryClass::Transient,
                                    minute,
                                )],
                                policy(),
                                at(minute),
                            )
                            .await
                            .unwrap()
                            .remove(0)
                    }
                };
                assert_eq!(record("t1", 0).await.suppressed, None);
                // A day and more later the first no longer counts.
                assert_eq!(record("t2", 25 * 60).await.suppressed, None);
                let third = record("t3", 26 * 60).await;
                assert_eq!(third.suppressed.as_deref(), Some("soft bounces"));
                let suppression = store
                    .suppression("full@example.com".into())
                    .await
                    .unwrap()
                    .unwrap();
                assert!(
                    suppression
                        .source
                        .as_deref()
                        .unwrap_or_default()
                        .starts_with("2 transient bounces within 1day"),
                    "{suppression:?}"
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_complaint_suppresses_and_stops_pending_marketing_to_that_person_only() {
        on_both(
            "a_complaint_suppresses_and_stops_pending_marketing_to_that_person_only",
            async |store| {
                let marketing = emails(&store, "d1", "carts", "jane@example.com", 2).await;
                let transactional = emails(&store, "d2", "stalled", "jane@example.com", 1).await;
                let someone_else = emails(&store, "d3", "carts", "bob@example.com", 1).await;
                let mut complaint = event("c1", "Jane@Example.com", DeliveryClass::Complaint, 5);
                complaint.status = None;
                complaint.detail = Some("abuse".into());
                let outcome = store
                    .record_delivery_events(vec![complaint], policy(), at(6))
                    .await
                    .unwrap()
                    .remove(0);
                assert_eq!(outcome.suppressed.as_deref(), Some("complaint"));
                assert_eq!(outcome.stopped, 2);
                for id in marketing {
                    assert_eq!(
                        state_of(&store, id).await,
                        ("skipped".into(), Some(COMPLAINT_SKIP.into()))
                    );
                }
                // Not marketing: left pending, and the suppression stops it at send time.
                assert_eq!(state_of(&store, transactional[0]).await.0, "pending");
                assert_eq!(state_of(&store, someone_else[0]).await.0, "pending");
            },
        )
        .await;
    }

    #[tokio::test]
    async fn complaints_past_the_threshold_pause_the_marketing_rule_until_it_is_resumed() {
        on_both(
            "complaints_past_the_threshold_pause_the_marketing_rule_until_it_is_resumed",
            async |store| {
                let mut sent = Vec::new();
                for (n, email) in ["a", "b", "c", "d"].iter().enumerate() {
                    let id = emails(
                        &store,
                        &format!("d{n}"),
                        "carts",
                        &format!("{email}@example.com"),
                        1,
                    )
                    .await[0];
                    exec(
                        &store,
                        "UPDATE outbox SET state = 'sent', sent_at = ?2 WHERE id = ?1",
                        vec![Value::Int(id), Value::Int(to_ms(at(1)))],
                    )
                    .await;
                    sent.push(id);
                }
                let complain = |key: &'static str, email: &'static str, id: i64| {
                    let mut complaint = event(key, email, DeliveryClass::Complaint, 5);
                    complaint.outbox_id = Some(id);
                    complaint
                };
                let first = store
                    .record_delivery_events(
                        vec![complain("c1", "a@example.com", sent[0])],
                        policy(),
                        at(6),
                    )
                    .await
                    .unwrap();
                // 1 of 4: 25 %, under the 30 % of the test policy.
                assert_eq!(first[0].paused, None);
                assert!(store.rule_pauses().await.unwrap().is_empty());
                let second = store
                    .record_delivery_events(
                        vec![complain("c2", "b@example.com", sent[1])],
                        policy(),
                        at(7),
                    )
                    .await
                    .unwrap();
                assert_eq!(second[0].paused.as_deref(), Some("carts"));
                let pauses = store.rule_pauses().await.unwrap();
                assert_eq!(pauses.len(), 1);
                assert!(
                    pauses[0].reason.starts_with("complaint rate 50.00 %"),
                    "{pauses:?}"
                );

                let mut delivered = event("dl1", "c@example.com", DeliveryClass::Delivered, 5);
                delivered.outbox_id = Some(sent[2]);
                let outcome = store
                    .record_delivery_events(vec![delivered], policy(), at(7))
                    .await
                    .unwrap();
                assert_eq!(
                    (outcome[0].suppressed.clone(), outcome[0].paused.clone()),
                    (None, None)
                );
                let figures = store.delivery_figures(at(8)).await.unwrap();
                let day = |rule: Option<&str>| {
                    figures
                        .iter()
                        .find(|f| f.window == "1d" && f.rule.as_deref() == rule)
                        .cloned()
                        .expect("the figures")
                };
                let carts = day(Some("carts"));
                assert_eq!(
                    (
                        carts.sent,
                        carts.delivered,
                        carts.complained,
                        carts.complaint_rate
                    ),
                    (4, 1, 2, Some(0.5))
                );
                assert_eq!(day(None).sent, 4);

                let resumed = store.resume_rule("carts".into()).await.unwrap();
                assert_eq!(resumed.map(|p| p.rule).as_deref(), Some("carts"));
                assert!(store.resume_rule("carts".into()).await.unwrap().is_none());
                assert!(store.rule_pauses().await.unwrap().is_empty());
            },
        )
        .await;
    }

    /// The inbox worker's path: a provider's event applied as a deal change records the
    /// event and its effects in the pass's transaction, on both backends.
    #[tokio::test]
    async fn a_delivery_applied_as_a_webhook_change_suppresses_in_the_same_pass() {
        on_both(
            "a_delivery_applied_as_a_webhook_change_suppresses_in_the_same_pass",
            async |store| {
                let change = crate::store::DealChange::Delivery {
                    event: Box::new(event(
                        "sendgrid:e1",
                        "gone@example.com",
                        DeliveryClass::Permanent,
                        1,
                    )),
                    policy: policy(),
                };
                store
                    .apply_deal_changes(vec![change], crate::store::CartRules::default(), at(2))
                    .await
                    .unwrap();
                let suppression = store.suppression("gone@example.com".into()).await.unwrap();
                assert_eq!(
                    suppression.map(|s| s.reason).as_deref(),
                    Some("hard bounce")
                );
                assert_eq!(
                    store
                        .delivery_events_for_email("gone@example.com".into())
                        .await
                        .unwrap()
                        .len(),
                    1
                );
            },
        )
        .await;
    }
}
