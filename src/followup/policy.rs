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
}
