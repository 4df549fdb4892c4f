//! Why a deal gets, got or will not get each follow-up rule's emails, asked today.
//!
//! The answer comes from the worker's own decisions, not a description of them:
//! `worker::enrollment_gate` and `worker::plan_enrollment` for a deal that has no rows
//! for a rule yet, and `policy::Policy::decide` (through `worker::send_policy` and
//! `worker::claim_query`) for its next step, fed by the same store queries as the
//! enrollment and claim transactions (`store::FollowupFacts`). Nothing is written.
//!
//! `deals show`, `GET /api/v1/deals/{id}` and the status page's deal view all read one
//! [`DealView`], built by [`deal_view`].

use super::digest::DigestRecipient;
use super::policy;
use super::rules::Rule;
use super::worker::{self, claim_query, enrollment_gate, enrollment_window, send_policy};
use crate::config::Config;
use crate::domain::{Deal, StageChange, StageRef};
use crate::store::{
    ClaimDecision, EnrollPlan, FollowupFacts, OutboxAction, OutboxRow, OutboxState, Store,
    StoreError,
};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// What a rule does with the deal, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The deal is not in the rule's trigger stage (or was deleted): the rule does not apply.
    NotTriggered,
    /// The rule does not take the deal: no recipient address, cooldown, the shopper is
    /// in the sequence for another deal, entered too long ago.
    Declined,
    /// A step will go out at `next_at` (enrolled, or enrolled at the worker's next pass).
    Scheduled,
    /// The next step is held back (quiet hours, the frequency cap) until `next_at`.
    Deferred,
    /// The next step will not be sent: suppressed, no consent, purchased since, an open
    /// deal of the person in a `skip_if_open_in` stage, left the rule's stages, no
    /// address, too late.
    Stopped,
    /// Every step is settled; `reason` says how.
    Finished,
    /// A digest rule lists the deal in its next digest, at `next_at`.
    Listed,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::NotTriggered => "not triggered",
            Verdict::Declined => "declined",
            Verdict::Scheduled => "scheduled",
            Verdict::Deferred => "deferred",
            Verdict::Stopped => "stopped",
            Verdict::Finished => "finished",
            Verdict::Listed => "listed",
        }
    }
}

/// One rule's decision about the deal, today.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleDecision {
    pub rule: String,
    /// `marketing`, `transactional` or `digest`.
    pub kind: &'static str,
    /// The stage(s) the rule starts in (or a digest watches), `pipeline.stage`.
    pub trigger: String,
    pub verdict: Verdict,
    /// Why, in a sentence an operator can act on.
    pub reason: String,
    /// The step concerned, 1-based, when one is.
    pub step: Option<i64>,
    /// When it happens (scheduled, deferred, listed).
    pub next_at: Option<DateTime<Utc>>,
    /// Whether the rule has outbox rows for the deal (false: decided from its plan).
    pub enrolled: bool,
}

/// The source record as the deal keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    pub connection: String,
    pub external_id: String,
    pub native_pipeline: String,
    pub native_stage: String,
    /// The record as the source last sent it.
    pub record: serde_json::Value,
}

/// A deal with everything that explains it.
#[derive(Debug, Clone, Serialize)]
pub struct DealView {
    pub as_of: DateTime<Utc>,
    pub deal: Deal,
    pub source: SourceView,
    /// Oldest first.
    pub history: Vec<StageChange>,
    /// Every outbox row of the deal (emails and expiries), by rule and step.
    pub emails: Vec<OutboxRow>,
    /// One entry per follow-up and digest rule, in config order.
    pub followups: Vec<RuleDecision>,
    /// The CRM write-backs of its sent emails, oldest first.
    pub writebacks: Vec<crate::store::WritebackRow>,
    /// Bounces and complaints about the deal's emails and its contact's address, oldest first.
    pub delivery_events: Vec<crate::store::DeliveryEvent>,
    /// The suppression of the contact's address, if any.
    pub contact_suppression: Option<crate::store::Suppression>,
}

/// Reads deal `id` and explains it at `now`; `None` when there is no such deal.
pub async fn deal_view(
    store: &Store,
    config: std::sync::Arc<Config>,
    id: i64,
    now: DateTime<Utc>,
) -> Result<Option<DealView>, StoreError> {
    let explained = store
        .with_followup_facts(id, move |deal, rows, facts| {
            let followups = explain(&config, deal, rows, facts, now)?;
            Ok((deal.clone(), rows.to_vec(), followups))
        })
        .await?;
    let Some((deal, emails, followups)) = explained else {
        return Ok(None);
    };
    let history = store.history(id).await?;
    let writebacks = store.deal_writebacks(id).await?;
    let contact = deal.contact_email.as_ref().map(|email| email.to_string());
    let delivery_events = store
        .delivery_events_for_deal(deal.id, contact.clone())
        .await?;
    let contact_suppression = match contact {
        Some(email) => store.suppression(email).await?,
        None => None,
    };
    Ok(Some(DealView {
        as_of: now,
        source: SourceView {
            connection: deal.connection.to_string(),
            external_id: deal.external_id.to_string(),
            native_pipeline: deal.native_pipeline.clone(),
            native_stage: deal.native_stage.clone(),
            record: deal.raw.clone(),
        },
        deal,
        history,
        emails,
        followups,
        writebacks,
        delivery_events,
        contact_suppression,
    }))
}

/// Every rule's decision about `deal` at `now`, given its outbox rows.
pub fn explain(
    config: &Config,
    deal: &Deal,
    rows: &[OutboxRow],
    facts: &FollowupFacts<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<RuleDecision>, StoreError> {
    let mut decisions = Vec::new();
    for rule in &config.followups {
        let own: Vec<&OutboxRow> = rows.iter().filter(|row| row.rule == rule.name).collect();
        decisions.push(if own.is_empty() {
            before_enrollment(config, rule, deal, facts, now)?
        } else {
            enrolled(config, rule, &own, facts, now)?
        });
    }
    for rule in &config.digests {
        decisions.push(digest(rule, deal, now));
    }
    Ok(decisions)
}

fn decision(rule: &Rule, verdict: Verdict, reason: String) -> RuleDecision {
    RuleDecision {
        rule: rule.name.clone(),
        kind: rule.kind.as_str(),
        trigger: policy::describe(&rule.trigger),
        verdict,
        reason,
        step: None,
        next_at: None,
        enrolled: false,
    }
}

/// A deal with no rows for `rule`: what enrolling it now would do, then what the
/// first step's send-time decision would be.
fn before_enrollment(
    config: &Config,
    rule: &Rule,
    deal: &Deal,
    facts: &FollowupFacts<'_>,
    now: DateTime<Utc>,
) -> Result<RuleDecision, StoreError> {
    if let Err(reason) = enrollment_gate(rule, deal) {
        return Ok(decision(rule, Verdict::NotTriggered, reason));
    }
    let (grace, since) = enrollment_window(rule, &config.email, now);
    let mut failed: Option<StoreError> = None;
    let plan = worker::plan_enrollment(rule, deal, now, grace, &mut |recipient| {
        facts
            .earlier_enrollments(&rule.name, recipient, since, deal.id)
            .inspect_err(|error| failed = Some(StoreError::Task(error.to_string())))
    });
    if let Some(error) = failed {
        return Err(error);
    }
    match plan {
        EnrollPlan::Nothing => Ok(decision(
            rule,
            Verdict::NotTriggered,
            "the rule does not take the deal now".into(),
        )),
        EnrollPlan::Decline { reason, .. } => Ok(decision(rule, Verdict::Declined, reason)),
        EnrollPlan::Enroll {
            recipient,
            anchor_at,
            rows,
            ..
        } => {
            let Some(first) = rows.iter().find(|row| row.state == OutboxState::Pending) else {
                return Ok(decision(
                    rule,
                    Verdict::Declined,
                    "every step is past the late grace".into(),
                ));
            };
            let row = OutboxRow {
                id: 0,
                deal_id: deal.id,
                rule: rule.name.clone(),
                step: first.step,
                action: first.action,
                recipient,
                state: OutboxState::Pending,
                anchor_at,
                due_at: first.due_at,
                next_attempt_at: first.due_at,
                attempts: 0,
                reason: None,
                message_id: None,
                created_at: now,
                updated_at: now,
                sent_at: None,
            };
            let mut decided = next_step(config, rule, row, facts, now)?;
            decided.reason = format!(
                "{} (not enrolled yet: the worker enrolls the deal at its next pass)",
                decided.reason
            );
            Ok(decided)
        }
    }
}

/// A deal with rows for `rule`: the next pending row's send-time decision, or how the
/// sequence ended.
fn enrolled(
    config: &Config,
    rule: &Rule,
    rows: &[&OutboxRow],
    facts: &FollowupFacts<'_>,
    now: DateTime<Utc>,
) -> Result<RuleDecision, StoreError> {
    let pending = |action: OutboxAction| {
        rows.iter()
            .filter(|row| row.state == OutboxState::Pending && row.action == action)
            .min_by_key(|row| (row.next_attempt_at, row.step))
    };
    let mut decided = match (pending(OutboxAction::Email), pending(OutboxAction::Expire)) {
        (Some(email), _) => next_step(config, rule, (**email).clone(), facts, now)?,
        // Every email is settled; what is left is the expiry after the last step.
        (None, Some(expiry)) => {
            let emails = settled(rule, rows);
            let expiry = next_step(config, rule, (**expiry).clone(), facts, now)?;
            RuleDecision {
                reason: format!("{}; then {}", emails.reason, expiry.reason),
                next_at: expiry.next_at,
                ..emails
            }
        }
        (None, None) => settled(rule, rows),
    };
    decided.enrolled = true;
    Ok(decided)
}

/// The send-time decision about `row`, as the worker will take it when the row comes
/// due (now, if it is due already).
fn next_step(
    config: &Config,
    rule: &Rule,
    row: OutboxRow,
    facts: &FollowupFacts<'_>,
    now: DateTime<Utc>,
) -> Result<RuleDecision, StoreError> {
    let at = row.next_attempt_at.max(now);
    let step = row.step.number();
    let total = rule.steps.len();
    let action = row.action;
    let claim = facts.claim_facts(row, &claim_query(rule, &config.email), now)?;
    let choice = send_policy(rule, &config.email, at).decide(&claim);
    let when = |at: DateTime<Utc>| {
        if at <= now {
            "now (the worker takes it at its next pass)".to_owned()
        } else {
            format!("at {}", at.format("%Y-%m-%d %H:%M:%S UTC"))
        }
    };
    let (verdict, reason, next_at) = match choice {
        ClaimDecision::Send => (
            Verdict::Scheduled,
            format!("enrolled: step {step} of {total} goes {}", when(at)),
            Some(at),
        ),
        ClaimDecision::Defer { until, reason } => (
            Verdict::Deferred,
            format!(
                "step {step} of {total} is held back ({reason}) until {}",
                when(until)
            ),
            Some(until),
        ),
        ClaimDecision::Skip(reason) => (
            Verdict::Stopped,
            format!("step {step} of {total} will be skipped: {reason}"),
            None,
        ),
        ClaimDecision::Stop(reason) if action == OutboxAction::Expire => (
            Verdict::Stopped,
            format!("the expiry after the last step will not happen: {reason}"),
            None,
        ),
        ClaimDecision::Stop(reason) => (
            Verdict::Stopped,
            format!("the sequence stops at step {step} of {total}: {reason}"),
            None,
        ),
        ClaimDecision::Expire(to) => (
            Verdict::Scheduled,
            format!(
                "the deal moves to {} {} unless it moves on first",
                policy::describe(&to),
                when(at)
            ),
            Some(at),
        ),
    };
    Ok(RuleDecision {
        step: (action == OutboxAction::Email).then_some(i64::from(step)),
        next_at,
        ..decision(rule, verdict, reason)
    })
}

/// A sequence with nothing pending: what became of its emails.
fn settled(rule: &Rule, rows: &[&OutboxRow]) -> RuleDecision {
    let emails: Vec<&&OutboxRow> = rows
        .iter()
        .filter(|row| row.action == OutboxAction::Email)
        .collect();
    let sent = emails
        .iter()
        .filter(|row| row.state == OutboxState::Sent)
        .count();
    let last_reason = emails
        .iter()
        .rev()
        .find_map(|row| row.reason.clone())
        .unwrap_or_default();
    let (verdict, reason) = if sent == 0 {
        (
            Verdict::Stopped,
            match emails.first() {
                Some(first) => format!(
                    "no email sent: step {} {}{}",
                    first.step.number(),
                    first.state.as_str(),
                    first
                        .reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                None => "no email step".to_owned(),
            },
        )
    } else {
        let mut text = format!("{sent} of {} email(s) sent", rule.steps.len());
        if sent < emails.len() && !last_reason.is_empty() {
            text.push_str(&format!("; the rest not: {last_reason}"));
        }
        (Verdict::Finished, text)
    };
    decision(rule, verdict, reason)
}

/// A digest rule: whether the deal is in the next digest. The conditions are those of
/// the digest query (`store::digests`): a watched stage, entered before the stage's
/// idle cut-off, not deleted, and for owner digests an owner address.
fn digest(rule: &super::digest::DigestRule, deal: &Deal, now: DateTime<Utc>) -> RuleDecision {
    let here = StageRef {
        pipeline: deal.pipeline.clone(),
        stage: deal.stage.clone(),
    };
    let watched: Vec<String> = rule
        .stages
        .iter()
        .map(|s| policy::describe(&s.stage))
        .collect();
    let base = RuleDecision {
        rule: rule.name.clone(),
        kind: "digest",
        trigger: watched.join(", "),
        verdict: Verdict::NotTriggered,
        reason: String::new(),
        step: None,
        next_at: None,
        enrolled: false,
    };
    let slot = rule.next_slot(now);
    let Some(stage) = rule.stages.iter().find(|s| s.stage == here) else {
        return RuleDecision {
            reason: format!(
                "not in a watched stage: the digest lists deals idle in {}, and this deal is in {}",
                watched.join(", "),
                policy::describe(&here)
            ),
            ..base
        };
    };
    if deal.deleted_at.is_some() {
        return RuleDecision {
            reason: "the deal was deleted in its source".into(),
            ..base
        };
    }
    if rule.to == DigestRecipient::Owner && deal.owner_email.is_none() {
        return RuleDecision {
            verdict: Verdict::Declined,
            reason: "the deal has no owner email address, so it is in nobody's digest".into(),
            ..base
        };
    }
    let idle = chrono::Duration::from_std(stage.idle).unwrap_or(chrono::Duration::MAX);
    let idle_from = deal
        .stage_entered_at
        .checked_add_signed(idle)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let listed_at = if idle_from <= slot {
        slot
    } else {
        rule.next_slot(idle_from)
    };
    RuleDecision {
        verdict: Verdict::Listed,
        reason: format!(
            "listed in the daily digest at {} (idle in {} since {})",
            listed_at.format("%Y-%m-%d %H:%M UTC"),
            policy::describe(&here),
            deal.stage_entered_at.format("%Y-%m-%d %H:%M UTC")
        ),
        next_at: Some(listed_at),
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::followup::digest::{DigestRule, DigestStage};
    use chrono::TimeZone;

    fn proposal() -> StageRef {
        StageRef {
            pipeline: Some(crate::domain::PipelineKey::new("sales")),
            stage: crate::domain::StageKey::new("proposal"),
        }
    }

    fn deal(stage: StageRef, entered: DateTime<Utc>, owner_email: Option<&str>) -> Deal {
        Deal {
            owner_email: owner_email.and_then(crate::domain::EmailAddress::parse),
            ..Deal::example(stage, entered)
        }
    }

    #[test]
    fn a_digest_lists_a_deal_from_the_first_slot_after_its_idle_time() {
        let rule = DigestRule {
            name: "daily".into(),
            content: crate::followup::digest::DigestContent::Stalled,
            weekday: None,
            stages: vec![DigestStage {
                stage: proposal(),
                idle: std::time::Duration::from_secs(3 * 24 * 3600),
            }],
            to: DigestRecipient::Owner,
            at: chrono::NaiveTime::from_hms_opt(8, 0, 0).unwrap(),
            zone: chrono_tz::UTC,
            late_grace: std::time::Duration::from_secs(3600),
            template: "owner_digest".into(),
        };
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
        // Idle since the 5th: in tomorrow's 08:00 digest.
        let idle = deal(
            proposal(),
            now - chrono::Duration::days(5),
            Some("o@x.example"),
        );
        let listed = digest(&rule, &idle, now);
        assert_eq!(listed.verdict, Verdict::Listed);
        assert_eq!(
            listed.next_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 11, 8, 0, 0).unwrap())
        );
        // Entered yesterday: idle for 3 days on the 12th at noon, so the 13th's digest.
        let fresh = deal(
            proposal(),
            now - chrono::Duration::days(1),
            Some("o@x.example"),
        );
        assert_eq!(
            digest(&rule, &fresh, now).next_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 13, 8, 0, 0).unwrap())
        );
        let ownerless = deal(proposal(), now - chrono::Duration::days(5), None);
        let declined = digest(&rule, &ownerless, now);
        assert_eq!(declined.verdict, Verdict::Declined);
        assert!(
            declined.reason.contains("no owner email"),
            "{}",
            declined.reason
        );
        let elsewhere = StageRef {
            pipeline: Some(crate::domain::PipelineKey::new("sales")),
            stage: crate::domain::StageKey::new("closing"),
        };
        let other = digest(&rule, &deal(elsewhere, now, Some("o@x.example")), now);
        assert_eq!(other.verdict, Verdict::NotTriggered);
        assert!(other.reason.contains("sales.proposal"), "{}", other.reason);
    }
}
