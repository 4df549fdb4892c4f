//! Digests: one email per recipient (each deal owner, or one fixed address) per day
//! (or per week, `digest = "monday 08:00"`), at a local time, listing the deals that sit in the rule's stages past their
//! idle threshold — instead of one alert per stalled deal.
//!
//! A digest rule is a `[followups.NAME]` table with `digest = "08:00"`. Its schedule is
//! pure arithmetic here (`DigestRule::latest_slot`, `next_slot`); the ledger is the
//! `digests` table (`store::digests`).
//!
//! Invariants:
//! - At most one digest per (rule, recipient, local day): the row is unique, a day is
//!   assembled once (`digest_runs`), and a row found in `sending` after a crash becomes
//!   `uncertain` and is never resent, like an outbox row.
//! - Nothing is sent to a recipient with no matching deal: the list is re-read at send
//!   time and an empty one skips the row. A weekly review (`review = "monday 08:00"`,
//!   `followup::review`) watches no stage and goes to its fixed address regardless.
//! - After downtime only the latest slot is considered, and only within the rule's
//!   late grace; an older or later one is recorded as missed, never sent late.

use super::templates::{Person, TemplateError, Templates};
pub use crate::config::followups::{DigestContent, DigestRecipient, DigestRule, DigestStage};
use crate::domain::{Deal, EmailAddress, Money, StageRef};
use crate::pipeline::Pipelines;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// How many deals a digest lists; the rest are counted as `more`.
pub const MAX_LISTED: usize = 50;

/// One listed deal, as a digest template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DigestDeal {
    pub id: i64,
    pub title: String,
    pub connection: String,
    pub external_id: String,
    pub pipeline: Option<String>,
    pub stage: String,
    /// The stage's label from the config ("Proposal").
    pub stage_label: String,
    pub days_in_stage: i64,
    pub stage_entered_at: String,
    /// "12000.00", or none.
    pub amount: Option<String>,
    pub currency: Option<String>,
    /// A link to the deal when the source gives one (a cart's recovery URL).
    pub url: Option<String>,
    pub contact: Person,
}

/// What a digest template sees.
#[derive(Debug, Clone, Serialize)]
pub struct DigestContext {
    /// The recipient: the owner (name from their deals), or the fixed address.
    pub owner: Person,
    /// The listed deals, longest in their stage first (at most `MAX_LISTED`).
    pub deals: Vec<DigestDeal>,
    /// How many deals match in all.
    pub count: usize,
    /// How many matching deals are not listed.
    pub more: usize,
    /// Sums of the listed deals' amounts, one per currency ("24000.00 EUR").
    pub totals: Vec<String>,
    /// The local day of the digest, "2026-11-27".
    pub day: String,
    pub rule: String,
    pub sender: String,
}

impl DigestContext {
    /// Builds the context from the deals re-read at send time.
    #[allow(clippy::too_many_arguments)] // each is a distinct fact; a struct would only rename them
    pub fn new(
        rule: &DigestRule,
        recipient: &str,
        mut deals: Vec<Deal>,
        total: usize,
        pipelines: &Pipelines,
        day: &str,
        sender: String,
        now: DateTime<Utc>,
    ) -> DigestContext {
        deals.sort_by(|a, b| {
            a.stage_entered_at
                .cmp(&b.stage_entered_at)
                .then(b.amount_minor.cmp(&a.amount_minor))
                .then(a.id.cmp(&b.id))
        });
        deals.truncate(MAX_LISTED);
        let count = total.max(deals.len());
        let owner_name = match rule.to {
            DigestRecipient::Owner => deals.iter().find_map(|d| d.owner.clone()),
            DigestRecipient::Fixed(_) => None,
        };
        let mut totals: BTreeMap<String, Money> = BTreeMap::new();
        for deal in &deals {
            if let Some(money) = deal.amount() {
                let key = money.currency.to_string();
                let sum = totals.get(&key).map_or(money, |sum| {
                    Money::new(sum.minor.saturating_add(money.minor), money.currency)
                });
                totals.insert(key, sum);
            }
        }
        let listed = deals
            .iter()
            .map(|deal| {
                let here = StageRef {
                    pipeline: deal.pipeline.clone(),
                    stage: deal.stage.clone(),
                };
                DigestDeal {
                    id: deal.id,
                    title: deal.title.clone(),
                    connection: deal.connection.to_string(),
                    external_id: deal.external_id.to_string(),
                    pipeline: deal.pipeline.as_ref().map(|p| p.to_string()),
                    stage: deal.stage.to_string(),
                    stage_label: pipelines
                        .stage(&here)
                        .map_or_else(|| deal.stage.to_string(), |s| s.label.clone()),
                    days_in_stage: (now - deal.stage_entered_at).num_days(),
                    stage_entered_at: deal
                        .stage_entered_at
                        .format("%Y-%m-%d %H:%M UTC")
                        .to_string(),
                    amount: deal.amount().map(|m| m.to_decimal_string()),
                    currency: deal.currency.map(|c| c.to_string()),
                    url: deal.recovery_url.clone(),
                    contact: Person {
                        name: deal.contact_name.clone(),
                        email: deal.contact_email.as_ref().map(|e| e.to_string()),
                    },
                }
            })
            .collect();
        DigestContext {
            owner: Person {
                name: owner_name,
                email: Some(recipient.to_owned()),
            },
            count,
            more: count - deals.len(),
            deals: listed,
            totals: totals
                .values()
                .map(|m| format!("{} {}", m.to_decimal_string(), m.currency))
                .collect(),
            day: day.to_owned(),
            rule: rule.name.clone(),
            sender,
        }
    }

    /// Two sample deals, for `dealsync check`.
    pub fn sample(rule: &DigestRule, pipelines: &Pipelines) -> DigestContext {
        let now = Utc::now();
        let deal = |id: i64, days: i64, title: &str, amount: i64, url: Option<&str>| {
            let watched = rule.stages.first().map(|s| s.stage.clone());
            Deal {
                id,
                connection: "crm".into(),
                external_id: crate::domain::ExternalId::new(format!("sample-{id}")),
                title: title.to_owned(),
                amount_minor: Some(amount),
                currency: crate::domain::Currency::parse("EUR").ok(),
                pipeline: watched.as_ref().and_then(|s| s.pipeline.clone()),
                stage: watched.map_or_else(|| "proposal".into(), |s| s.stage),
                status: crate::domain::DealStatus::Open,
                native_pipeline: "default".into(),
                native_stage: "proposal".into(),
                contact_email: EmailAddress::parse("ada@example.com"),
                contact_name: Some("Ada Lovelace".into()),
                owner: Some("Alice Owner".into()),
                owner_email: EmailAddress::parse("alice@example.com"),
                marketing_consent: None,
                created_at: None,
                updated_at: None,
                stage_entered_at: now - chrono::Duration::days(days),
                last_activity_at: now - chrono::Duration::days(days),
                expected_close: None,
                recovery_url: url.map(str::to_owned),
                line_items: Vec::new(),
                cart_keys: Vec::new(),
                deleted_at: None,
                first_seen_at: now,
                raw: serde_json::Value::Null,
            }
        };
        let deals = vec![
            deal(1, 21, "Acme Corp: 40 seats", 1_200_000, None),
            deal(
                2,
                15,
                "Cart of Ada Lovelace",
                30_700,
                Some("https://shop.example.com/cart/2/recover"),
            ),
        ];
        let day = now.with_timezone(&rule.zone).date_naive().to_string();
        DigestContext::new(
            rule,
            "alice@example.com",
            deals,
            3,
            pipelines,
            &day,
            "Sample Shop".into(),
            now,
        )
    }
}

/// The message of a rendered digest (or review) to `to`, keyed by the rule, the slot's
/// day and the recipient: what the worker sends and `outbox preview` prints.
pub fn outgoing(
    rule: &DigestRule,
    to: EmailAddress,
    to_name: Option<String>,
    day: &str,
    rendered: super::templates::Rendered,
) -> super::mailer::Outgoing {
    let idempotency_key = rule.idempotency_key(day, &to.as_str().to_lowercase());
    super::mailer::Outgoing {
        to,
        to_name,
        subject: rendered.subject,
        text: rendered.text,
        html: rendered.html,
        idempotency_key,
        unsubscribe: None,
        reply_to: None,
        outbox_id: None,
    }
}

/// Renders every digest rule's template against a sample; returns the problems.
pub fn check(templates: &Templates, rules: &[DigestRule], pipelines: &Pipelines) -> Vec<String> {
    rules
        .iter()
        .filter_map(|rule| {
            let rendered = match rule.content {
                DigestContent::Stalled => {
                    templates.render(&rule.template, &DigestContext::sample(rule, pipelines))
                }
                DigestContent::Review => templates.render(
                    &rule.template,
                    &super::review::ReviewContext::sample(rule, pipelines),
                ),
            };
            rendered
                .err()
                .map(|error: TemplateError| format!("followups.{} (digest): {error}", rule.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::followups::{parse_time, template_files};
    use chrono::{NaiveDate, NaiveTime, TimeZone};
    use std::time::Duration;

    fn rule(at: &str, zone: &str) -> DigestRule {
        DigestRule {
            name: "daily".into(),
            content: crate::followup::digest::DigestContent::Stalled,
            weekday: None,
            stages: Vec::new(),
            to: DigestRecipient::Owner,
            at: parse_time(at).unwrap(),
            zone: zone.parse().unwrap(),
            late_grace: Duration::from_secs(3600),
            template: "owner_digest".into(),
        }
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    #[test]
    fn the_slot_is_the_local_time_in_the_rules_zone_today_or_yesterday() {
        let berlin = rule("08:00", "Europe/Berlin");
        // 08:00 Berlin in winter is 07:00 UTC.
        let (day, slot) = berlin.latest_slot(utc(2026, 1, 10, 7, 30));
        assert_eq!(day.to_string(), "2026-01-10");
        assert_eq!(slot, utc(2026, 1, 10, 7, 0));
        // Before 08:00 Berlin, the latest slot was yesterday's.
        let (day, slot) = berlin.latest_slot(utc(2026, 1, 10, 6, 59));
        assert_eq!(day.to_string(), "2026-01-09");
        assert_eq!(slot, utc(2026, 1, 9, 7, 0));
        assert_eq!(
            berlin.next_slot(utc(2026, 1, 10, 6, 59)),
            utc(2026, 1, 10, 7, 0)
        );
        assert_eq!(
            berlin.next_slot(utc(2026, 1, 10, 7, 0)),
            utc(2026, 1, 11, 7, 0)
        );
        // In summer Berlin is UTC+2.
        assert_eq!(
            berlin.next_slot(utc(2026, 7, 1, 0, 0)),
            utc(2026, 7, 1, 6, 0)
        );
    }

    #[test]
    fn a_weekly_slot_is_the_latest_of_its_weekday_and_the_next_comes_a_week_later() {
        use crate::config::followups::parse_schedule;
        let (weekday, at) = parse_schedule("monday 08:00").unwrap();
        let weekly = DigestRule {
            weekday,
            at,
            ..rule("08:00", "Europe/Berlin")
        };
        // 2026-12-02 is a Wednesday; Monday 08:00 Berlin is 07:00 UTC.
        let (day, slot) = weekly.latest_slot(utc(2026, 12, 2, 10, 0));
        assert_eq!(day.to_string(), "2026-11-30");
        assert_eq!(slot, utc(2026, 11, 30, 7, 0));
        assert_eq!(
            weekly.next_slot(utc(2026, 12, 2, 10, 0)),
            utc(2026, 12, 7, 7, 0)
        );
        // On the Monday before the time, the latest slot is the Monday before.
        let (day, _) = weekly.latest_slot(utc(2026, 11, 30, 6, 59));
        assert_eq!(day.to_string(), "2026-11-23");
        assert_eq!(
            weekly.next_slot(utc(2026, 11, 30, 6, 59)),
            utc(2026, 11, 30, 7, 0)
        );
        assert_eq!(
            weekly.next_slot(utc(2026, 11, 30, 7, 0)),
            utc(2026, 12, 7, 7, 0)
        );
        // "Mon" and a time with seconds; no day is every day; a bad day is named.
        assert_eq!(
            parse_schedule("Mon 08:00:30").unwrap(),
            (
                Some(chrono::Weekday::Mon),
                NaiveTime::from_hms_opt(8, 0, 30).unwrap()
            )
        );
        assert_eq!(parse_schedule(" 08:00 ").unwrap().0, None);
        let error = parse_schedule("someday 08:00").unwrap_err();
        assert!(error.contains("\"someday\""), "{error}");
    }

    #[test]
    fn a_slot_in_a_dst_gap_moves_an_hour_later_and_a_repeated_hour_counts_once() {
        // Berlin skips 02:00–03:00 on 2026-03-29 and repeats 02:00–03:00 on 2026-10-25.
        let gap = rule("02:30", "Europe/Berlin");
        let day = NaiveDate::from_ymd_opt(2026, 3, 29).unwrap();
        // 03:30 CEST = 01:30 UTC.
        assert_eq!(gap.slot_on(day), utc(2026, 3, 29, 1, 30));
        let day = NaiveDate::from_ymd_opt(2026, 10, 25).unwrap();
        // The first 02:30 is still CEST: 00:30 UTC.
        assert_eq!(gap.slot_on(day), utc(2026, 10, 25, 0, 30));
        assert_eq!(
            gap.next_slot(utc(2026, 10, 25, 0, 30)),
            utc(2026, 10, 26, 1, 30)
        );
    }

    #[test]
    fn cutoffs_list_each_stage_with_its_idle_threshold() {
        let mut daily = rule("08:00", "UTC");
        daily.stages = vec![DigestStage {
            stage: StageRef {
                pipeline: Some(crate::domain::PipelineKey::new("sales")),
                stage: crate::domain::StageKey::new("proposal"),
            },
            idle: Duration::from_secs(2 * 86_400),
        }];
        let cutoffs = daily.cutoffs(utc(2026, 1, 10, 8, 0));
        assert_eq!(cutoffs[0].1, utc(2026, 1, 8, 8, 0));
    }

    fn parse(
        dir: &std::path::Path,
        text: &str,
    ) -> Result<crate::config::Config, crate::config::ConfigError> {
        std::fs::create_dir_all(dir.join("templates")).unwrap();
        for file in template_files("owner_digest") {
            std::fs::write(dir.join("templates").join(file), "x").unwrap();
        }
        crate::config::testing::parse_in(dir, text)
    }

    #[test]
    fn a_digest_rule_watches_several_stages_with_their_stall_thresholds_in_its_own_zone() {
        let dir = tempfile::tempdir().unwrap();
        let config = parse(
            dir.path(),
            r#"
[email]
time_zone = "Europe/Berlin"
late_grace = "2h"
[followups.rotting]
kind = "transactional"
stage = ["sales.proposal", "sales.negotiation"]
to = "owner"
template = "owner_digest"
digest = "08:30"
time_zone = "America/New_York"
"#,
        )
        .unwrap();
        assert!(
            config.followups.is_empty(),
            "a digest is not a per-deal rule"
        );
        let digest = &config.digests[0];
        assert_eq!(digest.name, "rotting");
        assert_eq!(digest.stages.len(), 2);
        assert_eq!(digest.stages[0].idle, Duration::from_secs(14 * 86_400));
        assert_eq!(digest.zone, chrono_tz::America::New_York);
        assert_eq!(digest.at, NaiveTime::from_hms_opt(8, 30, 0).unwrap());
        assert_eq!(digest.late_grace, Duration::from_secs(7200));
        assert_eq!(digest.to, DigestRecipient::Owner);
    }

    #[test]
    fn a_digest_to_contacts_a_marketing_digest_and_sequence_keys_are_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let error = parse(
            dir.path(),
            r#"
[followups.rotting]
kind = "marketing"
stage = "sales.proposal"
to = "contact"
template = "owner_digest"
digest = "8 o'clock"
cooldown = "1d"
time_zone = "Mars/Olympus"
"#,
        )
        .unwrap_err();
        let keys = crate::config::testing::problem_keys(&error);
        for key in [
            "followups.rotting.kind",
            "followups.rotting.to",
            "followups.rotting.digest",
            "followups.rotting.cooldown",
            "followups.rotting.time_zone",
        ] {
            assert!(keys.contains(&key), "{key} not in {error}");
        }
    }
}
