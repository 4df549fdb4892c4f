//! Sending policy as pure functions: quiet hours, the send-time decision. No IO; the
//! worker feeds them facts read in the claim transaction.

use super::rules::{Recipient, Rule, RuleKind};
pub use crate::config::followups::QuietHours;
use crate::domain::{DealStatus, StageRef};
use crate::store::{ClaimDecision, ClaimFacts};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::time::Duration;

/// What the sender needs to decide about one row, besides the store's facts.
pub struct Policy<'a> {
    pub rule: &'a Rule,
    pub now: DateTime<Utc>,
    pub late_grace: Duration,
    pub cap: Option<u32>,
    /// Quiet hours and the shop's zone, the fallback for recipients without one.
    pub quiet: Option<(QuietHours, Tz)>,
    /// JSON pointers into the deal's source record that may name the recipient's zone.
    pub recipient_zone_fields: &'a [String],
}

/// The recipient's time zone from the deal's source record: the first pointer that
/// names a known IANA zone.
pub fn recipient_zone(raw: &serde_json::Value, pointers: &[String]) -> Option<Tz> {
    pointers
        .iter()
        .filter_map(|pointer| raw.pointer(pointer)?.as_str())
        .find_map(|name| name.trim().parse::<Tz>().ok())
}

/// The cap's window.
pub const CAP_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Policy<'_> {
    /// Decides, inside the claim transaction, what happens to a due row.
    pub fn decide(&self, facts: &ClaimFacts) -> ClaimDecision {
        let rule = self.rule;
        let row = &facts.row;
        let Some(deal) = &facts.deal else {
            return ClaimDecision::Stop("the deal no longer exists".into());
        };
        if deal.deleted_at.is_some() || deal.status == DealStatus::Deleted {
            return ClaimDecision::Stop("the deal was deleted in its source".into());
        }
        let here = StageRef {
            pipeline: deal.pipeline.clone(),
            stage: deal.stage.clone(),
        };
        if !rule.is_active_in(&here) {
            return ClaimDecision::Stop(format!(
                "the deal left the rule's stages (now in {})",
                describe(&here)
            ));
        }
        if let Some(order) = facts.order_since {
            return ClaimDecision::Stop(format!(
                "the customer placed an order since (deal {order})"
            ));
        }
        if row.action == crate::store::OutboxAction::Expire {
            return match &rule.expire {
                Some((_, to)) => ClaimDecision::Expire(to.clone()),
                None => ClaimDecision::Stop("the rule no longer expires deals".into()),
            };
        }
        // From here on, an email.
        let late = self.now - row.next_attempt_at;
        if late > chrono::Duration::from_std(self.late_grace).unwrap_or(chrono::Duration::MAX) {
            return ClaimDecision::Skip(format!(
                "overdue by {} (more than the late grace of {}): not sent late",
                crate::config::duration::format(late.to_std().unwrap_or_default()),
                crate::config::duration::format(self.late_grace)
            ));
        }
        if row.recipient.is_empty() {
            return ClaimDecision::Skip("no recipient address on the deal".into());
        }
        if let Some(reason) = &facts.suppressed {
            return ClaimDecision::Stop(format!("recipient is suppressed ({reason})"));
        }
        if let Some(open) = &facts.open_elsewhere {
            return ClaimDecision::Stop(format!(
                "the person has an open deal in {} (deal {} of connection {}): the rule skips them",
                describe(&open.at),
                open.deal_id,
                open.connection
            ));
        }
        if rule.kind == RuleKind::Marketing && rule.to == Recipient::Contact {
            // No record of consent is no consent: see the consent section of the docs.
            match deal.marketing_consent {
                Some(true) => {}
                Some(false) => {
                    return ClaimDecision::Stop(
                        "the contact declined marketing email in the source".into(),
                    );
                }
                None => {
                    return ClaimDecision::Stop(
                        "the source records no marketing consent for the contact".into(),
                    );
                }
            }
        }
        if !rule.to.is_internal() {
            if let Some((quiet, shop_zone)) = self.quiet
                && let zone =
                    recipient_zone(&deal.raw, self.recipient_zone_fields).unwrap_or(shop_zone)
                && let Some(end) = quiet.ends_after(self.now, zone)
            {
                return ClaimDecision::Defer {
                    until: end,
                    reason: "quiet hours".into(),
                };
            }
            if let Some(cap) = self.cap
                && facts.recent_to_recipient.0 >= cap
            {
                let window = chrono::Duration::from_std(CAP_WINDOW).expect("24h fits");
                let until = facts
                    .recent_to_recipient
                    .1
                    .map_or(self.now + window, |oldest| oldest + window);
                return ClaimDecision::Defer {
                    until: until.max(self.now + chrono::Duration::seconds(1)),
                    reason: format!("frequency cap: {cap} emails to this recipient in 24h"),
                };
            }
        }
        ClaimDecision::Send
    }
}

pub fn describe(at: &StageRef) -> String {
    match &at.pipeline {
        Some(pipeline) => format!("{pipeline}.{}", at.stage),
        None => at.stage.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn quiet_hours_wrap_midnight_and_end_in_the_shops_zone() {
        let quiet = QuietHours::parse("21:00-09:00").unwrap();
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 22:30 in Berlin (winter, UTC+1) is 21:30 UTC: quiet until 09:00 Berlin = 08:00 UTC.
        let at = Utc.with_ymd_and_hms(2026, 1, 10, 21, 30, 0).unwrap();
        assert_eq!(
            quiet.ends_after(at, berlin),
            Some(Utc.with_ymd_and_hms(2026, 1, 11, 8, 0, 0).unwrap())
        );
        // 07:00 Berlin is quiet until 09:00 the same day.
        let at = Utc.with_ymd_and_hms(2026, 1, 10, 6, 0, 0).unwrap();
        assert_eq!(
            quiet.ends_after(at, berlin),
            Some(Utc.with_ymd_and_hms(2026, 1, 10, 8, 0, 0).unwrap())
        );
        // 12:00 Berlin is not quiet.
        let at = Utc.with_ymd_and_hms(2026, 1, 10, 11, 0, 0).unwrap();
        assert_eq!(quiet.ends_after(at, berlin), None);
    }

    #[test]
    fn quiet_hours_within_one_day_and_bad_input() {
        let quiet = QuietHours::parse("12:00-13:30").unwrap();
        let at = Utc.with_ymd_and_hms(2026, 6, 1, 12, 10, 0).unwrap();
        assert_eq!(
            quiet.ends_after(at, chrono_tz::UTC),
            Some(Utc.with_ymd_and_hms(2026, 6, 1, 13, 30, 0).unwrap())
        );
        assert_eq!(
            quiet.ends_after(at + chrono::Duration::hours(2), chrono_tz::UTC),
            None
        );
        assert!(QuietHours::parse("9-17").is_err());
        assert!(QuietHours::parse("09:00-09:00").is_err());
    }

    #[test]
    fn the_recipients_zone_comes_from_the_first_pointer_naming_a_known_zone() {
        let raw = serde_json::json!({
            "customer": {"time_zone": "Mars/Olympus"},
            "properties": {"tz": "America/New_York"},
        });
        let pointers = [
            "/customer/time_zone".to_owned(),
            "/properties/tz".to_owned(),
        ];
        assert_eq!(
            recipient_zone(&raw, &pointers),
            Some(chrono_tz::America::New_York)
        );
        assert_eq!(recipient_zone(&raw, &pointers[..1]), None);
        assert_eq!(recipient_zone(&serde_json::Value::Null, &pointers), None);
        // 22:30 in Berlin is 16:30 in New York: quiet for the shop, not for her.
        let quiet = QuietHours::parse("21:00-09:00").unwrap();
        let at = Utc.with_ymd_and_hms(2026, 1, 10, 21, 30, 0).unwrap();
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        assert!(quiet.ends_after(at, berlin).is_some());
        assert!(quiet.ends_after(at, chrono_tz::America::New_York).is_none());
    }

    #[test]
    fn quiet_hours_include_their_start_and_end_at_their_end() {
        let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 6, 1, h, m, 0).unwrap();
        let next_day = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 6, 2, h, m, 0).unwrap();
        let utc = chrono_tz::UTC;
        let midday = QuietHours::parse("12:00-13:30").unwrap();
        assert_eq!(midday.ends_after(at(11, 59), utc), None);
        assert_eq!(midday.ends_after(at(12, 0), utc), Some(at(13, 30)));
        assert_eq!(midday.ends_after(at(13, 29), utc), Some(at(13, 30)));
        assert_eq!(midday.ends_after(at(13, 30), utc), None);
        let night = QuietHours::parse("21:00-09:00").unwrap();
        assert_eq!(night.ends_after(at(20, 59), utc), None);
        assert_eq!(night.ends_after(at(21, 0), utc), Some(next_day(9, 0)));
        assert_eq!(night.ends_after(at(8, 59), utc), Some(at(9, 0)));
        assert_eq!(night.ends_after(at(9, 0), utc), None);
    }

    #[test]
    fn quiet_hours_ending_in_a_dst_gap_end_an_hour_later() {
        // Berlin skips 02:00-03:00 on 29 March 2026: 02:30 does not exist that night,
        // and 03:30 CEST (01:30 UTC) is the end.
        let quiet = QuietHours::parse("21:00-02:30").unwrap();
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let at = Utc.with_ymd_and_hms(2026, 3, 28, 22, 0, 0).unwrap();
        assert_eq!(
            quiet.ends_after(at, berlin),
            Some(Utc.with_ymd_and_hms(2026, 3, 29, 1, 30, 0).unwrap())
        );
    }

    mod decide {
        //! The send-time decision over one due row, branch by branch.
        use super::*;
        use crate::domain::{Deal, EmailAddress, PipelineKey, StageKey, StepNumber};
        use crate::store::{OutboxAction, OutboxRow, OutboxState};

        /// Saturday 10 January 2026, 12:00 UTC (13:00 in Berlin).
        fn now() -> DateTime<Utc> {
            Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap()
        }

        fn stage(name: &str) -> StageRef {
            StageRef {
                pipeline: Some(PipelineKey::new("ecommerce")),
                stage: StageKey::new(name),
            }
        }

        /// A marketing email to the contact, active while the deal is in `abandoned`.
        fn rule() -> Rule {
            Rule {
                name: "cart".into(),
                trigger: stage("abandoned"),
                kind: RuleKind::Marketing,
                to: Recipient::Contact,
                steps: Vec::new(),
                expire: None,
                cooldown: None,
                late_grace: None,
                stop_on_purchase: true,
                active: vec![stage("abandoned")],
                skip_if_open_in: Vec::new(),
            }
        }

        /// A consenting contact's deal in `abandoned`, and its first email due now.
        fn facts() -> ClaimFacts {
            let deal = Deal {
                contact_email: EmailAddress::parse("ann@shop.example"),
                marketing_consent: Some(true),
                ..Deal::example(stage("abandoned"), now() - chrono::Duration::hours(2))
            };
            let row = OutboxRow {
                id: 1,
                deal_id: deal.id,
                rule: "cart".into(),
                step: StepNumber::from_index(0),
                action: OutboxAction::Email,
                recipient: "ann@shop.example".into(),
                state: OutboxState::Pending,
                anchor_at: deal.stage_entered_at,
                due_at: now(),
                next_attempt_at: now(),
                attempts: 0,
                reason: None,
                message_id: None,
                created_at: deal.stage_entered_at,
                updated_at: deal.stage_entered_at,
                sent_at: None,
            };
            ClaimFacts {
                row,
                deal: Some(deal),
                suppressed: None,
                order_since: None,
                recent_to_recipient: (0, None),
                open_elsewhere: None,
            }
        }

        fn policy(rule: &Rule) -> Policy<'_> {
            Policy {
                rule,
                now: now(),
                late_grace: Duration::from_secs(2 * 3600),
                cap: None,
                quiet: None,
                recipient_zone_fields: &[],
            }
        }

        fn with_deal(change: impl FnOnce(&mut Deal)) -> ClaimFacts {
            let mut facts = facts();
            change(facts.deal.as_mut().unwrap());
            facts
        }

        fn stopped(decision: ClaimDecision) -> String {
            match decision {
                ClaimDecision::Stop(reason) => reason,
                other => panic!("expected a stop, got {other:?}"),
            }
        }

        fn skipped(decision: ClaimDecision) -> String {
            match decision {
                ClaimDecision::Skip(reason) => reason,
                other => panic!("expected a skip, got {other:?}"),
            }
        }

        #[test]
        fn a_due_email_to_a_consenting_contact_in_the_rules_stage_is_sent() {
            let rule = rule();
            assert_eq!(policy(&rule).decide(&facts()), ClaimDecision::Send);
        }

        #[test]
        fn no_email_goes_to_a_deal_that_is_gone_or_deleted_in_its_source() {
            let rule = rule();
            let policy = policy(&rule);
            let mut gone = facts();
            gone.deal = None;
            assert_eq!(stopped(policy.decide(&gone)), "the deal no longer exists");
            // Marked deleted by either fact alone.
            let deleted_at = with_deal(|deal| deal.deleted_at = Some(now()));
            let deleted_status = with_deal(|deal| deal.status = DealStatus::Deleted);
            for facts in [deleted_at, deleted_status] {
                assert_eq!(
                    stopped(policy.decide(&facts)),
                    "the deal was deleted in its source"
                );
            }
        }

        #[test]
        fn a_deal_that_left_the_rules_stages_or_ordered_since_gets_no_more_email() {
            let rule = rule();
            let policy = policy(&rule);
            let moved = with_deal(|deal| deal.stage = StageKey::new("won"));
            assert_eq!(
                stopped(policy.decide(&moved)),
                "the deal left the rule's stages (now in ecommerce.won)"
            );
            let unmapped = with_deal(|deal| {
                deal.pipeline = None;
                deal.stage = StageKey::new("unmapped");
            });
            assert_eq!(
                stopped(policy.decide(&unmapped)),
                "the deal left the rule's stages (now in unmapped)"
            );
            let mut ordered = facts();
            ordered.order_since = Some(42);
            assert_eq!(
                stopped(policy.decide(&ordered)),
                "the customer placed an order since (deal 42)"
            );
        }

        #[test]
        fn a_person_with_an_open_deal_in_a_skip_stage_elsewhere_gets_no_email() {
            let rule = rule();
            let mut negotiating = facts();
            negotiating.open_elsewhere = Some(crate::store::OpenElsewhere {
                deal_id: 9,
                connection: "pipedrive".into(),
                at: StageRef {
                    pipeline: Some(crate::domain::PipelineKey::new("sales")),
                    stage: StageKey::new("negotiation"),
                },
            });
            assert_eq!(
                stopped(policy(&rule).decide(&negotiating)),
                "the person has an open deal in sales.negotiation (deal 9 of connection pipedrive): the rule skips them"
            );
            // An expiry still moves the cart: only emails are skipped.
            negotiating.row.action = OutboxAction::Expire;
            assert_eq!(
                stopped(policy(&rule).decide(&negotiating)),
                "the rule no longer expires deals"
            );
        }

        #[test]
        fn an_expiry_row_moves_the_deal_only_while_the_rule_still_expires() {
            let mut rule = rule();
            let mut expiry = facts();
            expiry.row.action = OutboxAction::Expire;
            assert_eq!(
                stopped(policy(&rule).decide(&expiry)),
                "the rule no longer expires deals"
            );
            rule.expire = Some((Duration::from_secs(3600), stage("lost")));
            assert_eq!(
                policy(&rule).decide(&expiry),
                ClaimDecision::Expire(stage("lost"))
            );
            // An email row of a rule that expires is still an email.
            assert_eq!(policy(&rule).decide(&facts()), ClaimDecision::Send);
        }

        #[test]
        fn an_email_is_sent_up_to_the_late_grace_and_skipped_after_it() {
            let rule = rule();
            let policy = policy(&rule);
            let due = |late: chrono::Duration| {
                let mut facts = facts();
                facts.row.next_attempt_at = now() - late;
                facts
            };
            assert_eq!(
                policy.decide(&due(chrono::Duration::hours(2))),
                ClaimDecision::Send,
                "exactly the grace late is still in time"
            );
            assert_eq!(
                policy.decide(&due(-chrono::Duration::hours(3))),
                ClaimDecision::Send,
                "a row looked at early is not late"
            );
            let reason = skipped(policy.decide(&due(
                chrono::Duration::hours(2) + chrono::Duration::seconds(1)
            )));
            assert!(
                reason.starts_with("overdue by ") && reason.contains("not sent late"),
                "{reason}"
            );
        }

        #[test]
        fn no_email_without_a_recipient_or_to_a_suppressed_one() {
            let rule = rule();
            let policy = policy(&rule);
            let mut nobody = facts();
            nobody.row.recipient.clear();
            assert_eq!(
                skipped(policy.decide(&nobody)),
                "no recipient address on the deal"
            );
            let mut suppressed = facts();
            suppressed.suppressed = Some("hard bounce".into());
            assert_eq!(
                stopped(policy.decide(&suppressed)),
                "recipient is suppressed (hard bounce)"
            );
        }

        #[test]
        fn marketing_email_to_a_contact_needs_recorded_consent_and_other_email_does_not() {
            let mut rule = rule();
            let declined = with_deal(|deal| deal.marketing_consent = Some(false));
            let unknown = with_deal(|deal| deal.marketing_consent = None);
            assert_eq!(
                stopped(policy(&rule).decide(&declined)),
                "the contact declined marketing email in the source"
            );
            assert_eq!(
                stopped(policy(&rule).decide(&unknown)),
                "the source records no marketing consent for the contact"
            );
            // A transactional note to the contact, and a marketing alert to the owner,
            // do not ask for the contact's consent.
            rule.kind = RuleKind::Transactional;
            assert_eq!(policy(&rule).decide(&declined), ClaimDecision::Send);
            rule.kind = RuleKind::Marketing;
            rule.to = Recipient::Owner;
            assert_eq!(policy(&rule).decide(&declined), ClaimDecision::Send);
        }

        #[test]
        fn quiet_hours_defer_email_to_the_contact_in_the_contacts_zone_but_not_to_the_owner() {
            let rule = rule();
            let berlin: Tz = "Europe/Berlin".parse().unwrap();
            // 12:00-14:00 in Berlin: now (13:00 there) is quiet, until 13:00 UTC.
            let quiet = QuietHours::parse("12:00-14:00").unwrap();
            let fields = ["/tz".to_owned()];
            let quiet_policy = |rule| Policy {
                quiet: Some((quiet, berlin)),
                recipient_zone_fields: &fields,
                ..policy(rule)
            };
            assert_eq!(
                quiet_policy(&rule).decide(&facts()),
                ClaimDecision::Defer {
                    until: Utc.with_ymd_and_hms(2026, 1, 10, 13, 0, 0).unwrap(),
                    reason: "quiet hours".into(),
                }
            );
            // 07:00 in New York: not quiet for her.
            let in_new_york = with_deal(|deal| {
                deal.raw = serde_json::json!({"tz": "America/New_York"});
            });
            assert_eq!(
                quiet_policy(&rule).decide(&in_new_york),
                ClaimDecision::Send
            );
            let to_owner = Rule {
                to: Recipient::Owner,
                ..rule.clone()
            };
            assert_eq!(
                quiet_policy(&to_owner).decide(&facts()),
                ClaimDecision::Send
            );
        }

        #[test]
        fn the_frequency_cap_defers_the_contacts_next_email_until_the_oldest_leaves_the_window() {
            let rule = rule();
            let capped = |rule| Policy {
                cap: Some(2),
                ..policy(rule)
            };
            let recent = |count: u32, oldest: Option<DateTime<Utc>>| {
                let mut facts = facts();
                facts.recent_to_recipient = (count, oldest);
                facts
            };
            let hours_ago = |hours: i64| Some(now() - chrono::Duration::hours(hours));
            assert_eq!(
                capped(&rule).decide(&recent(1, hours_ago(3))),
                ClaimDecision::Send,
                "below the cap"
            );
            let reason = "frequency cap: 2 emails to this recipient in 24h".to_owned();
            assert_eq!(
                capped(&rule).decide(&recent(2, hours_ago(3))),
                ClaimDecision::Defer {
                    until: now() + chrono::Duration::hours(21),
                    reason: reason.clone(),
                },
                "at the cap: until the oldest is 24 h old"
            );
            assert_eq!(
                capped(&rule).decide(&recent(3, None)),
                ClaimDecision::Defer {
                    until: now() + chrono::Duration::hours(24),
                    reason: reason.clone(),
                },
                "no time known: a whole window"
            );
            assert_eq!(
                capped(&rule).decide(&recent(2, hours_ago(30))),
                ClaimDecision::Defer {
                    until: now() + chrono::Duration::seconds(1),
                    reason,
                },
                "never in the past"
            );
            let to_owner = Rule {
                to: Recipient::Owner,
                ..rule.clone()
            };
            assert_eq!(
                capped(&to_owner).decide(&recent(2, hours_ago(3))),
                ClaimDecision::Send,
                "the cap protects contacts, not the owner"
            );
        }
    }
}
