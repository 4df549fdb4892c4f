//! Daily digests: one email per recipient (each deal owner, or one fixed address) per
//! day, at a local time, listing the deals that sit in the rule's stages past their
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
//!   time and an empty one skips the row.
//! - After downtime only the latest slot is considered, and only within the rule's
//!   late grace; an older or later one is recorded as missed, never sent late.

use super::rules::{template_files, valid_name};
use super::templates::{Person, TemplateError, Templates};
use crate::config::EmailConfig;
use crate::config::raw::{RawFollowup, RawStages};
use crate::domain::{Deal, EmailAddress, Money, StageRef};
use crate::pipeline::{self, Pipelines};
use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How many deals a digest lists; the rest are counted as `more`.
pub const MAX_LISTED: usize = 50;

/// Who receives a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestRecipient {
    /// Each deal's owner gets a digest of their own deals.
    Owner,
    /// One address gets every matching deal.
    Fixed(EmailAddress),
}

/// A stage a digest watches, and how long a deal must sit in it to be listed.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestStage {
    pub stage: StageRef,
    pub idle: Duration,
}

/// A validated digest rule.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestRule {
    pub name: String,
    pub stages: Vec<DigestStage>,
    pub to: DigestRecipient,
    /// The local time of day the digest goes out.
    pub at: NaiveTime,
    pub zone: Tz,
    /// A digest not sent within this long after its slot is skipped.
    pub late_grace: Duration,
    pub template: String,
}

impl DigestRule {
    /// The UTC instant of the slot on a local day. A time skipped by a DST change
    /// moves an hour later; a repeated one takes its first occurrence.
    pub fn slot_on(&self, day: NaiveDate) -> DateTime<Utc> {
        let local = day.and_time(self.at);
        self.zone
            .from_local_datetime(&local)
            .earliest()
            .or_else(|| {
                self.zone
                    .from_local_datetime(&(local + chrono::Duration::hours(1)))
                    .earliest()
            })
            .map(|at| at.with_timezone(&Utc))
            // Not reachable with the IANA zones (gaps are at most an hour or two);
            // reading the local time as UTC keeps the schedule going regardless.
            .unwrap_or_else(|| Utc.from_utc_datetime(&local))
    }

    /// The latest slot at or before `now`, with its local day.
    pub fn latest_slot(&self, now: DateTime<Utc>) -> (NaiveDate, DateTime<Utc>) {
        let today = now.with_timezone(&self.zone).date_naive();
        let slot = self.slot_on(today);
        if slot <= now {
            return (today, slot);
        }
        let yesterday = today.checked_sub_days(Days::new(1)).unwrap_or(today);
        (yesterday, self.slot_on(yesterday))
    }

    /// The first slot after `now`.
    pub fn next_slot(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let today = now.with_timezone(&self.zone).date_naive();
        let slot = self.slot_on(today);
        if slot > now {
            return slot;
        }
        let tomorrow = today.checked_add_days(Days::new(1)).unwrap_or(today);
        self.slot_on(tomorrow)
    }

    /// For each watched stage: deals that entered it before this instant are listed.
    pub fn cutoffs(&self, now: DateTime<Utc>) -> Vec<(StageRef, DateTime<Utc>)> {
        self.stages
            .iter()
            .map(|watched| {
                let idle =
                    chrono::Duration::from_std(watched.idle).unwrap_or(chrono::Duration::MAX);
                (
                    watched.stage.clone(),
                    now.checked_sub_signed(idle)
                        .unwrap_or(DateTime::<Utc>::MIN_UTC),
                )
            })
            .collect()
    }

    /// The key that names one digest everywhere (header, file name, Message-ID).
    pub fn idempotency_key(&self, day: &str, recipient: &str) -> String {
        format!("digest-{}-{day}-{recipient}", self.name)
    }
}

fn parse_time(text: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(text.trim(), "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(text.trim(), "%H:%M:%S"))
        .map_err(|_| format!("expected a local time like \"08:00\", got {text:?}"))
}

/// Validates the digest rules among `[followups.*]` (those with `digest` set).
pub fn validate(
    raw: &BTreeMap<String, RawFollowup>,
    pipelines: &Pipelines,
    email: &EmailConfig,
    report: &mut dyn FnMut(&str, String),
) -> Vec<DigestRule> {
    let mut rules = Vec::new();
    for (name, raw_rule) in raw {
        let Some(at_text) = &raw_rule.digest else {
            continue;
        };
        if !raw_rule.enabled || !valid_name(name) {
            // `rules::validate` reports bad names.
            continue;
        }
        let base = format!("followups.{name}");
        let mut ok = true;
        let mut fail = |key: &str, message: String| {
            report(key, message);
            ok = false;
        };
        let at = parse_time(at_text).unwrap_or_else(|message| {
            fail(&format!("{base}.digest"), message);
            NaiveTime::MIN
        });
        if raw_rule.kind != "transactional" {
            fail(
                &format!("{base}.kind"),
                "a digest is an internal email: set kind = \"transactional\"".to_owned(),
            );
        }
        let to = match raw_rule.to.as_str() {
            "owner" => DigestRecipient::Owner,
            "contact" => {
                fail(
                    &format!("{base}.to"),
                    "a digest goes to \"owner\" or a fixed address, not to contacts".to_owned(),
                );
                DigestRecipient::Owner
            }
            other => match EmailAddress::parse(other) {
                Some(address) => DigestRecipient::Fixed(address),
                None => {
                    fail(
                        &format!("{base}.to"),
                        format!("expected \"owner\" or an email address, got {other:?}"),
                    );
                    DigestRecipient::Owner
                }
            },
        };
        let template = match (&raw_rule.template, &raw_rule.steps) {
            (Some(template), None) => template.clone(),
            _ => {
                fail(
                    &base,
                    "a digest needs one `template` and no `steps`".to_owned(),
                );
                String::new()
            }
        };
        if !template.is_empty() {
            if !valid_name(&template) {
                fail(
                    &format!("{base}.template"),
                    "template names may hold only letters, digits, '_' and '-'".to_owned(),
                );
            } else {
                let missing: Vec<String> = template_files(&template)
                    .into_iter()
                    .filter(|file| !email.templates.join(file).is_file())
                    .collect();
                if !missing.is_empty() {
                    fail(
                        &format!("{base}.template"),
                        format!(
                            "unknown template {template:?}: {} missing in {}",
                            missing.join(", "),
                            email.templates.display()
                        ),
                    );
                }
            }
        }
        for (key, set) in [
            ("expire_after", raw_rule.expire_after.is_some()),
            ("expire_to", raw_rule.expire_to.is_some()),
            ("cooldown", raw_rule.cooldown.is_some()),
            ("stop_on_purchase", raw_rule.stop_on_purchase.is_some()),
            ("move_to", raw_rule.move_to.is_some()),
        ] {
            if set {
                fail(
                    &format!("{base}.{key}"),
                    "is not used by digest rules".to_owned(),
                );
            }
        }
        let zone = match raw_rule.time_zone.as_deref() {
            None => email.time_zone,
            Some(text) => text.parse().unwrap_or_else(|_| {
                fail(
                    &format!("{base}.time_zone"),
                    format!("expected an IANA time zone like \"Europe/Berlin\", got {text:?}"),
                );
                email.time_zone
            }),
        };
        let texts = match &raw_rule.stage {
            RawStages::One(one) => vec![one.clone()],
            RawStages::Many(many) => many.clone(),
        };
        if texts.is_empty() {
            fail(&format!("{base}.stage"), "lists no stage".to_owned());
        }
        let mut stages = Vec::new();
        for text in texts {
            let stage = match pipeline::parse_target(&text, None, pipelines) {
                Ok(stage) if stage.pipeline.is_some() => stage,
                Ok(_) => {
                    fail(
                        &format!("{base}.stage"),
                        format!("expected \"pipeline.stage\", got {text:?}"),
                    );
                    continue;
                }
                Err(message) => {
                    fail(&format!("{base}.stage"), message);
                    continue;
                }
            };
            let stall_after = pipelines.stage(&stage).and_then(|s| s.stall_after);
            match raw_rule.after.map(|d| d.0).or(stall_after) {
                Some(idle) => stages.push(DigestStage { stage, idle }),
                None => fail(
                    &format!("{base}.after"),
                    format!("stage {text} has no stall_after, so the digest needs `after`"),
                ),
            }
        }
        if ok {
            rules.push(DigestRule {
                name: name.clone(),
                stages,
                to,
                at,
                zone,
                late_grace: raw_rule.late_grace.map_or(email.late_grace, |d| d.0),
                template,
            });
        }
    }
    rules
}

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

/// Renders every digest rule's template against a sample; returns the problems.
pub fn check(templates: &Templates, rules: &[DigestRule], pipelines: &Pipelines) -> Vec<String> {
    rules
        .iter()
        .filter_map(|rule| {
            templates
                .render(&rule.template, &DigestContext::sample(rule, pipelines))
                .err()
                .map(|error: TemplateError| format!("followups.{} (digest): {error}", rule.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::interpolate::tests::MapEnv;

    fn rule(at: &str, zone: &str) -> DigestRule {
        DigestRule {
            name: "daily".into(),
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
        crate::config::parse(
            &dir.join("dealsync.toml"),
            text,
            &MapEnv(Default::default()),
        )
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
        let keys: Vec<_> = error.problems().iter().map(|p| p.key.as_str()).collect();
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
