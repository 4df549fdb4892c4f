//! Enrollment: which deals enter which follow-up rule, as outbox rows with due times.
//!
//! Invariants:
//! - `plan_enrollment` is pure: it decides from the deal, the rule, the time and the
//!   recipient's earlier enrollments (read in the store's enrollment transaction), so
//!   `followup::explain` asks the same function and gets the same answer.
//! - Enrolling is idempotent: a deal that already has rows for a rule gets none again
//!   (`Store::enroll`), so reading an entry twice (the start-up index scan and the
//!   history feed overlap) changes nothing.
//! - A step already later than the late grace when enrolled is written `skipped`, never
//!   sent late; a deal all of whose steps are too late is declined with the reason.
//! - One sequence per contact and rule: a recipient mid-sequence (or within the
//!   cooldown) is declined; a newer deal supersedes an older one nothing was sent for.

use super::{FEED_PAGE, Worker};
use crate::config::EmailConfig;
use crate::domain::{Deal, StageRef, StepNumber};
use crate::followup::policy;
use crate::followup::rules::{Recipient, Rule};
use crate::store::{
    EarlierEnrollment, EnrollPlan, NewOutboxRow, OutboxAction, OutboxState, StoreError,
};
use crate::telemetry::FollowupLabels;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

impl Worker {
    /// Enrolls deals that entered a trigger stage recently enough that some step can
    /// still be sent; an index range per rule.
    pub(super) async fn enroll_from_index(&self) -> Result<(), StoreError> {
        let now = Utc::now();
        for rule in self.rules.values() {
            let reach = rule.horizon() + rule.late_grace.unwrap_or(self.config.email.late_grace);
            let since = now - chrono::Duration::from_std(reach).unwrap_or(chrono::Duration::MAX);
            let deals = self
                .store
                .unenrolled_in_stage(rule.trigger.clone(), since, rule.name.clone())
                .await?;
            for deal_id in deals {
                self.enroll(rule.clone(), deal_id).await?;
            }
        }
        Ok(())
    }

    /// Follows the stage history after `after`, moving it past each entry enrolled (so
    /// a pass that fails half-way goes on from there).
    pub(super) async fn enroll_from_feed(&self, after: &mut i64) -> Result<(), StoreError> {
        loop {
            let entries = self.store.stage_entries_after(*after, FEED_PAGE).await?;
            let last_page = (entries.len() as u32) < FEED_PAGE;
            let mut moved = Vec::new();
            for entry in entries {
                for rule in self.rules.values() {
                    if rule.trigger == entry.to {
                        self.enroll(rule.clone(), entry.deal_id).await?;
                    }
                }
                if self
                    .rules
                    .values()
                    .any(|rule| !rule.is_active_in(&entry.to))
                    && !moved.contains(&entry.deal_id)
                {
                    moved.push(entry.deal_id);
                }
                *after = entry.history_id;
            }
            let active = self
                .rules
                .values()
                .map(|rule| (rule.name.clone(), rule.active.clone()))
                .collect();
            for (rule, rows) in self
                .store
                .stop_left_rules(moved, active, Utc::now())
                .await?
            {
                info!(rule = %rule, rows, "follow-ups stopped: their deal left the rule's stages");
                self.metrics
                    .followups
                    .get_or_create(&FollowupLabels {
                        rule,
                        outcome: "skipped".to_owned(),
                    })
                    .inc_by(rows);
            }
            if last_page {
                return Ok(());
            }
        }
    }

    pub(super) async fn enroll(&self, rule: Arc<Rule>, deal_id: i64) -> Result<(), StoreError> {
        let now = Utc::now();
        let (grace, since) = enrollment_window(&rule, &self.config.email, now);
        let name = rule.name.clone();
        let outcome = self
            .store
            .enroll(deal_id, name.clone(), since, now, move |deal, earlier| {
                plan_enrollment(&rule, deal, now, grace, earlier)
            })
            .await?;
        if outcome.enrolled {
            debug!(rule = %name, deal_id, superseded = outcome.superseded, "deal enrolled");
        } else if outcome.declined {
            debug!(rule = %name, deal_id, "deal declined by the rule");
        }
        Ok(())
    }
}

/// The late grace of `rule`, and since when enrolling it looks at the recipient's
/// earlier enrollments (the cooldown, or the whole sequence plus its grace).
pub fn enrollment_window(
    rule: &Rule,
    email: &EmailConfig,
    now: DateTime<Utc>,
) -> (Duration, DateTime<Utc>) {
    let grace = rule.late_grace.unwrap_or(email.late_grace);
    let lookback = rule
        .cooldown
        .unwrap_or(Duration::ZERO)
        .max(rule.horizon() + grace);
    let since = now - chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
    (grace, since)
}

/// Why `deal` cannot enter `rule` now, if it cannot: it is not in the rule's trigger
/// stage, or it was deleted in its source.
pub fn enrollment_gate(rule: &Rule, deal: &Deal) -> Result<(), String> {
    let here = StageRef {
        pipeline: deal.pipeline.clone(),
        stage: deal.stage.clone(),
    };
    if deal.deleted_at.is_some() {
        return Err("the deal was deleted in its source".into());
    }
    if here != rule.trigger {
        return Err(format!(
            "not in a trigger stage: the rule starts when a deal enters {}, and this deal is in {}",
            policy::describe(&rule.trigger),
            policy::describe(&here)
        ));
    }
    Ok(())
}

/// Decides, inside the enrollment transaction, whether and how a deal enters a rule.
pub fn plan_enrollment(
    rule: &Rule,
    deal: &Deal,
    now: DateTime<Utc>,
    grace: Duration,
    earlier: &mut dyn FnMut(&str) -> Result<Vec<EarlierEnrollment>, StoreError>,
) -> EnrollPlan {
    if enrollment_gate(rule, deal).is_err() {
        return EnrollPlan::Nothing;
    }
    let anchor_at = deal.stage_entered_at;
    let address = match &rule.to {
        Recipient::Contact => deal.contact_email.clone(),
        Recipient::Owner => deal.owner_email.clone(),
        Recipient::Fixed(address) => Some(address.clone()),
    };
    let Some(address) = address else {
        let whose = if rule.to == Recipient::Owner {
            "owner"
        } else {
            "contact"
        };
        return EnrollPlan::Decline {
            recipient: String::new(),
            anchor_at,
            reason: format!("the deal has no {whose} email address"),
        };
    };
    let recipient = address.to_string();
    let mut supersede = Vec::new();
    if rule.to == Recipient::Contact {
        // One sequence per shopper: the newest deal wins while nothing was sent yet.
        let earlier = match earlier(&recipient) {
            Ok(earlier) => earlier,
            Err(error) => {
                warn!(rule = %rule.name, deal_id = deal.id, %error, "could not read earlier enrollments; will retry");
                return EnrollPlan::Nothing;
            }
        };
        for other in earlier {
            if other.started && other.pending {
                return EnrollPlan::Decline {
                    recipient,
                    anchor_at,
                    reason: format!(
                        "the recipient is already in this rule's sequence for deal {}",
                        other.deal_id
                    ),
                };
            }
            if other.started {
                if let Some(cooldown) = rule.cooldown
                    && other.created_at
                        > now - chrono::Duration::from_std(cooldown).unwrap_or_default()
                {
                    return EnrollPlan::Decline {
                        recipient,
                        anchor_at,
                        reason: format!(
                            "cooldown: the recipient went through this rule for deal {} within {}",
                            other.deal_id,
                            crate::config::duration::format(cooldown)
                        ),
                    };
                }
                continue;
            }
            if other.pending {
                if other.anchor_at <= anchor_at {
                    supersede.push(other.deal_id);
                } else {
                    return EnrollPlan::Decline {
                        recipient,
                        anchor_at,
                        reason: format!(
                            "a newer deal of the same recipient ({}) has this rule",
                            other.deal_id
                        ),
                    };
                }
            }
        }
    }
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let offset = |after: Duration| chrono::Duration::from_std(after).unwrap_or_default();
    let mut rows: Vec<NewOutboxRow> = rule
        .steps
        .iter()
        .enumerate()
        .map(|(at, step)| {
            let due_at = anchor_at + offset(step.after);
            let too_late = now - due_at > grace;
            NewOutboxRow {
                step: StepNumber::from_index(at as i64),
                action: OutboxAction::Email,
                due_at,
                state: if too_late {
                    OutboxState::Skipped
                } else {
                    OutboxState::Pending
                },
                reason: too_late.then(|| {
                    "already overdue by more than the late grace when enrolled: not sent late"
                        .to_owned()
                }),
            }
        })
        .collect();
    if rows.iter().all(|row| row.state == OutboxState::Skipped) {
        return EnrollPlan::Decline {
            recipient,
            anchor_at,
            reason: "entered the stage too long ago: every step is past the late grace".into(),
        };
    }
    if let (Some((after, _)), Some(last)) = (&rule.expire, rule.steps.last()) {
        rows.push(NewOutboxRow {
            step: StepNumber::from_index(rule.steps.len() as i64),
            action: OutboxAction::Expire,
            due_at: anchor_at + offset(last.after) + offset(*after),
            state: OutboxState::Pending,
            reason: None,
        });
    }
    EnrollPlan::Enroll {
        recipient,
        anchor_at,
        rows,
        supersede,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EmailAddress, PipelineKey, StageKey};
    use crate::followup::rules::{RuleKind, Step};
    use crate::store::EarlierEnrollment;
    use chrono::TimeZone;
    use std::cell::Cell;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    pub(super) fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap()
    }

    pub(super) fn stage(name: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("ecommerce")),
            stage: StageKey::new(name),
        }
    }

    pub(super) fn ago(hours: i64) -> DateTime<Utc> {
        now() - chrono::Duration::hours(hours)
    }

    /// A cart rule: steps at 1 h, 24 h and 72 h after entering `abandoned`.
    pub(super) fn rule() -> Rule {
        let step = |hours: u64, template: &str| Step {
            after: HOUR * hours as u32,
            template: template.into(),
            discount_code: None,
            move_to: None,
        };
        Rule {
            name: "cart".into(),
            trigger: stage("abandoned"),
            kind: RuleKind::Marketing,
            to: Recipient::Contact,
            steps: vec![step(1, "a"), step(24, "b"), step(72, "c")],
            expire: None,
            cooldown: None,
            late_grace: None,
            stop_on_purchase: true,
            active: vec![stage("abandoned")],
            skip_if_open_in: Vec::new(),
        }
    }

    pub(super) fn shopper(entered: DateTime<Utc>) -> Deal {
        Deal {
            contact_email: EmailAddress::parse("ann@shop.example"),
            ..Deal::example(stage("abandoned"), entered)
        }
    }

    pub(super) fn plan(rule: &Rule, deal: &Deal, earlier: Vec<EarlierEnrollment>) -> EnrollPlan {
        plan_enrollment(rule, deal, now(), 2 * HOUR, &mut |_| Ok(earlier.clone()))
    }

    pub(super) fn earlier(deal_id: i64, started: bool, pending: bool) -> EarlierEnrollment {
        EarlierEnrollment {
            deal_id,
            anchor_at: ago(48),
            created_at: ago(48),
            started,
            pending,
        }
    }

    pub(super) fn declined(plan: &EnrollPlan) -> &str {
        match plan {
            EnrollPlan::Decline { reason, .. } => reason,
            other => panic!("expected a decline, got {other:?}"),
        }
    }

    pub(super) fn enrolled(plan: EnrollPlan) -> (String, Vec<NewOutboxRow>, Vec<i64>) {
        match plan {
            EnrollPlan::Enroll {
                recipient,
                rows,
                supersede,
                ..
            } => (recipient, rows, supersede),
            other => panic!("expected an enrollment, got {other:?}"),
        }
    }

    /// A feed page that comes back full is not the last: the worker reads on in the
    /// same pass, so the entry after a page of exactly `FEED_PAGE` is not left for the
    /// next pass.
    #[tokio::test]
    async fn the_feed_is_followed_past_a_page_of_exactly_feed_page_entries() {
        let (dir, store) = crate::store::tests::temp_store();
        let at = Utc::now();
        let upserts = (0..=FEED_PAGE)
            .map(|n| crate::store::tests::upsert(&n.to_string(), "proposal", at))
            .collect();
        store
            .commit_page("crm", "deals", upserts, vec![], vec![], None)
            .await
            .unwrap();
        let entries = store.stage_entries_after(0, FEED_PAGE + 10).await.unwrap();
        assert_eq!(entries.len(), FEED_PAGE as usize + 1);
        let last = entries.last().unwrap().history_id;

        let text = format!(
            "[connections.crm]\nconnector = \"demo\"\n\
             [email]\ntransport = \"file\"\ndir = {:?}\n",
            dir.path().join("outbox")
        );
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            &text,
            &crate::config::interpolate::ProcessEnv,
        )
        .unwrap();
        let metrics = Arc::new(crate::telemetry::Metrics::new());
        let worker = super::Worker::new(store, Arc::new(config), metrics).unwrap();
        let mut after = 0;
        worker.enroll_from_feed(&mut after).await.unwrap();
        assert_eq!(after, last, "every entry is read in one pass");
    }

    #[test]
    pub(super) fn a_fresh_deal_gets_one_pending_row_per_step_counted_from_its_stage_entry() {
        let entered = ago(0);
        let (recipient, rows, supersede) = enrolled(plan(&rule(), &shopper(entered), vec![]));
        assert_eq!(recipient, "ann@shop.example");
        assert!(supersede.is_empty());
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.step.index(),
                    r.action,
                    r.due_at,
                    r.state,
                    r.reason.clone(),
                )
            })
            .collect();
        let pending = |index, hours| {
            (
                index,
                OutboxAction::Email,
                entered + chrono::Duration::hours(hours),
                OutboxState::Pending,
                None,
            )
        };
        assert_eq!(got, vec![pending(0, 1), pending(1, 24), pending(2, 72)]);
    }

    #[test]
    pub(super) fn a_step_later_than_the_grace_is_skipped_and_one_exactly_at_the_grace_is_not() {
        // Entered 4 h ago: step 0 (due 3 h ago) is 3 h late, past the 2 h grace.
        // Entered 3 h ago: step 0 is exactly 2 h late, and still sent.
        let (_, rows, _) = enrolled(plan(&rule(), &shopper(ago(4)), vec![]));
        assert_eq!(rows[0].state, OutboxState::Skipped);
        assert!(rows[0].reason.as_deref().unwrap().contains("late grace"));
        assert_eq!(rows[1].state, OutboxState::Pending);
        assert_eq!(rows[1].reason, None);

        let (_, rows, _) = enrolled(plan(&rule(), &shopper(ago(3)), vec![]));
        assert_eq!(rows[0].state, OutboxState::Pending);
    }

    #[test]
    pub(super) fn a_deal_whose_every_step_is_past_the_grace_is_declined() {
        // The last step is due 72 h after entry; 75 h ago puts it 3 h late.
        let late = plan(&rule(), &shopper(ago(75)), vec![]);
        assert!(declined(&late).contains("every step is past the late grace"));
        // 74 h ago: the last step is exactly 2 h late, so it still goes out.
        let (_, rows, _) = enrolled(plan(&rule(), &shopper(ago(74)), vec![]));
        let states: Vec<_> = rows.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [
                OutboxState::Skipped,
                OutboxState::Skipped,
                OutboxState::Pending
            ]
        );
    }

    #[test]
    pub(super) fn the_expiry_row_follows_the_last_step_with_the_next_index() {
        let rule = Rule {
            expire: Some((2 * DAY, stage("lost"))),
            ..rule()
        };
        let entered = ago(0);
        let (_, rows, _) = enrolled(plan(&rule, &shopper(entered), vec![]));
        let expiry = rows.last().unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(expiry.action, OutboxAction::Expire);
        assert_eq!(expiry.step.index(), 3);
        assert_eq!(expiry.due_at, entered + chrono::Duration::hours(72 + 48));
        assert_eq!(expiry.state, OutboxState::Pending);
    }

    #[test]
    pub(super) fn a_deleted_deal_or_one_outside_the_trigger_stage_is_not_planned() {
        let deleted = Deal {
            deleted_at: Some(ago(0)),
            ..shopper(ago(0))
        };
        assert_eq!(plan(&rule(), &deleted, vec![]), EnrollPlan::Nothing);
        assert!(
            enrollment_gate(&rule(), &deleted)
                .unwrap_err()
                .contains("deleted")
        );

        let elsewhere = Deal {
            stage: StageKey::new("recovered"),
            ..shopper(ago(0))
        };
        assert_eq!(plan(&rule(), &elsewhere, vec![]), EnrollPlan::Nothing);
        let why = enrollment_gate(&rule(), &elsewhere).unwrap_err();
        assert!(why.contains("ecommerce.abandoned") && why.contains("ecommerce.recovered"));
        assert_eq!(enrollment_gate(&rule(), &shopper(ago(0))), Ok(()));
    }

    #[test]
    pub(super) fn a_deal_without_the_address_is_declined_naming_whose_address() {
        let no_contact = Deal::example(stage("abandoned"), ago(0));
        let plan_contact = plan(&rule(), &no_contact, vec![]);
        assert_eq!(
            declined(&plan_contact),
            "the deal has no contact email address"
        );
        let owner_rule = Rule {
            to: Recipient::Owner,
            ..rule()
        };
        let plan_owner = plan(&owner_rule, &shopper(ago(0)), vec![]);
        assert_eq!(declined(&plan_owner), "the deal has no owner email address");
        match plan_owner {
            EnrollPlan::Decline { recipient, .. } => assert_eq!(recipient, ""),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    pub(super) fn only_contact_rules_look_at_earlier_enrollments() {
        let team = EmailAddress::parse("team@shop.example").unwrap();
        for to in [Recipient::Owner, Recipient::Fixed(team.clone())] {
            let rule = Rule { to, ..rule() };
            let deal = Deal {
                owner_email: EmailAddress::parse("owner@shop.example"),
                ..shopper(ago(0))
            };
            let asked = Cell::new(0);
            let plan = plan_enrollment(&rule, &deal, now(), 2 * HOUR, &mut |_| {
                asked.set(asked.get() + 1);
                Ok(vec![earlier(1, true, true)])
            });
            let (recipient, _, _) = enrolled(plan);
            assert_eq!(asked.get(), 0);
            let expected = match &rule.to {
                Recipient::Fixed(_) => "team@shop.example",
                _ => "owner@shop.example",
            };
            assert_eq!(recipient, expected);
        }
        let asked_for = std::cell::RefCell::new(String::new());
        enrolled(plan_enrollment(
            &rule(),
            &shopper(ago(0)),
            now(),
            2 * HOUR,
            &mut |recipient| {
                *asked_for.borrow_mut() = recipient.to_owned();
                Ok(vec![])
            },
        ));
        assert_eq!(*asked_for.borrow(), "ann@shop.example");
    }

    #[test]
    pub(super) fn a_recipient_mid_sequence_is_declined_and_a_finished_one_waits_out_the_cooldown() {
        let plan_mid = plan(&rule(), &shopper(ago(0)), vec![earlier(3, true, true)]);
        assert!(declined(&plan_mid).contains("already in this rule's sequence for deal 3"));

        // Finished 48 h ago; no cooldown: enrolled again.
        enrolled(plan(
            &rule(),
            &shopper(ago(0)),
            vec![earlier(3, true, false)],
        ));
        // A 3-day cooldown: still inside it.
        let cooling = Rule {
            cooldown: Some(3 * DAY),
            ..rule()
        };
        let plan_cool = plan(&cooling, &shopper(ago(0)), vec![earlier(3, true, false)]);
        assert!(declined(&plan_cool).contains("cooldown"));
        assert!(declined(&plan_cool).contains("deal 3 within 3d"));
        // A 2-day cooldown ends exactly now: enrolled.
        let ended = Rule {
            cooldown: Some(2 * DAY),
            ..rule()
        };
        enrolled(plan(
            &ended,
            &shopper(ago(0)),
            vec![earlier(3, true, false)],
        ));
    }

    #[test]
    pub(super) fn a_newer_deal_supersedes_an_unstarted_older_one_and_an_older_deal_yields() {
        // The earlier enrollment (anchored 48 h ago) has sent nothing: the new deal,
        // anchored now, takes over.
        let (_, _, supersede) = enrolled(plan(
            &rule(),
            &shopper(ago(0)),
            vec![earlier(3, false, true), earlier(4, false, false)],
        ));
        assert_eq!(supersede, vec![3]);
        // Same anchor: the newest decision still wins.
        let (_, _, supersede) = enrolled(plan(
            &rule(),
            &shopper(ago(48)),
            vec![earlier(3, false, true)],
        ));
        assert_eq!(supersede, vec![3]);
        // The deal being planned is the older one: it declines.
        let older = plan(&rule(), &shopper(ago(49)), vec![earlier(3, false, true)]);
        assert!(declined(&older).contains("a newer deal of the same recipient (3)"));
    }

    #[test]
    pub(super) fn an_unreadable_history_plans_nothing_so_a_later_pass_retries() {
        let plan = plan_enrollment(&rule(), &shopper(ago(0)), now(), 2 * HOUR, &mut |_| {
            Err(StoreError::Corrupt("bad row".into()))
        });
        assert_eq!(plan, EnrollPlan::Nothing);
    }

    #[test]
    pub(super) fn the_enrollment_window_looks_back_over_the_longer_of_cooldown_and_sequence() {
        let text = "[email]\ntransport = \"file\"\ndir = \"out\"\nfrom = \"shop@example.com\"\nlate_grace = \"2h\"\n";
        let email = crate::config::testing::parse_in(std::path::Path::new(""), text)
            .unwrap()
            .email;
        // Sequence 72 h + grace 2 h.
        let (grace, since) = enrollment_window(&rule(), &email, now());
        assert_eq!(grace, 2 * HOUR);
        assert_eq!(since, ago(74));
        let long = Rule {
            cooldown: Some(10 * DAY),
            late_grace: Some(HOUR),
            ..rule()
        };
        let (grace, since) = enrollment_window(&long, &email, now());
        assert_eq!(grace, HOUR);
        assert_eq!(since, ago(240));
    }
}
