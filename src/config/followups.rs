//! Follow-up and digest rules and quiet hours: parsed and checked from
//! `[followups.NAME]` tables and `email.quiet_hours`. They are configuration, so they
//! live here; `followup` (the scheduler and sender) uses them and re-exports them
//! where it always did (`followup::rules`, `followup::digest`, `followup::policy`).
//!
//! A rule says: when a deal enters a canonical stage (its *trigger*), send one email
//! or a sequence of steps, each `after` a delay counted from that entry; stop as soon
//! as the deal leaves the stages the rule itself moves it through, is won or lost, or
//! the recipient unsubscribes. A rule listing several stages compiles to one rule per
//! stage, named `NAME@stage`, so each (deal, rule, step) stays one outbox row.
//!
//! Invariants kept here, at config load: every stage exists, every template has its
//! three files, step delays are strictly increasing, and `move_to`/`expire_to` are
//! stages of the trigger's pipeline.

use super::EmailConfig;
use super::raw::{RawFollowup, RawStages};
use crate::domain::{EmailAddress, StageRef};
use crate::pipeline::{self, Pipelines, StageKind};
use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The default delays of a cart sequence: 1 h, 24 h and 72 h after abandonment.
pub const CART_DEFAULT_DELAYS: [Duration; 3] = [
    Duration::from_secs(3600),
    Duration::from_secs(24 * 3600),
    Duration::from_secs(72 * 3600),
];

/// Whether consent and unsubscribe rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// Needs the recipient's marketing consent; carries List-Unsubscribe.
    Marketing,
    /// Operational mail (owner alerts, order-related notes); still honours the suppression list.
    Transactional,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Marketing => "marketing",
            RuleKind::Transactional => "transactional",
        }
    }
}

/// Who receives a rule's emails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// The deal's contact (the shopper for a cart).
    Contact,
    /// The deal's owner: an internal alert.
    Owner,
    /// One fixed address, e.g. a team inbox.
    Fixed(EmailAddress),
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recipient::Contact => f.write_str("the contact"),
            Recipient::Owner => f.write_str("the owner"),
            Recipient::Fixed(address) => write!(f, "{address}"),
        }
    }
}

impl Recipient {
    /// Internal recipients (owner, fixed address) are exempt from the per-recipient
    /// cap and quiet hours, which protect customers.
    pub fn is_internal(&self) -> bool {
        !matches!(self, Recipient::Contact)
    }
}

/// One email of a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Counted from the deal's entry into the trigger stage.
    pub after: Duration,
    pub template: String,
    pub discount_code: Option<String>,
    /// Where the deal moves once this step is sent.
    pub move_to: Option<StageRef>,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The name stored in the outbox: `NAME`, or `NAME@stage` for multi-stage rules.
    pub name: String,
    pub trigger: StageRef,
    pub kind: RuleKind,
    pub to: Recipient,
    pub steps: Vec<Step>,
    /// After the last step: how long to wait, and where the deal goes then.
    pub expire: Option<(Duration, StageRef)>,
    pub cooldown: Option<Duration>,
    /// Overrides `email.late_grace` for this rule.
    pub late_grace: Option<Duration>,
    pub stop_on_purchase: bool,
    /// The stages in which the sequence continues: the trigger and every `move_to`.
    pub active: Vec<StageRef>,
    /// A person with an open deal in one of these stages, in any connection, gets no
    /// email of this rule (`skip_if_open_in`).
    pub skip_if_open_in: Vec<StageRef>,
}

impl Rule {
    /// Whether the deal's current stage keeps this rule going.
    pub fn is_active_in(&self, at: &StageRef) -> bool {
        self.active.iter().any(|stage| stage == at)
    }

    /// The longest delay of the rule, expiry included.
    pub fn horizon(&self) -> Duration {
        let last = self.steps.last().map_or(Duration::ZERO, |s| s.after);
        last + self.expire.as_ref().map_or(Duration::ZERO, |(d, _)| *d)
    }

    /// Every template the rule uses.
    pub fn templates(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.template.as_str())
    }
}

/// The files of one template, relative to the templates directory.
pub fn template_files(name: &str) -> [String; 3] {
    [
        format!("{name}.subject"),
        format!("{name}.txt"),
        format!("{name}.html"),
    ]
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Validates every rule; problems are reported by key, and the rules that parsed are returned.
pub fn validate(
    raw: BTreeMap<String, RawFollowup>,
    pipelines: &Pipelines,
    templates_dir: &Path,
    report: &mut dyn FnMut(&str, String),
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (name, raw_rule) in raw {
        let base = format!("followups.{name}");
        if !valid_name(&name) {
            report(
                &base,
                "rule names may hold only letters, digits, '_' and '-'".to_owned(),
            );
            continue;
        }
        if !raw_rule.enabled || raw_rule.digest.is_some() || raw_rule.review.is_some() {
            // Digest and review rules are validated by `validate_digests`.
            continue;
        }
        if raw_rule.time_zone.is_some() {
            report(
                &format!("{base}.time_zone"),
                "is used only by digest rules (`digest = \"08:00\"`); quiet hours use email.time_zone"
                    .to_owned(),
            );
            continue;
        }
        let stages = match &raw_rule.stage {
            RawStages::One(one) => vec![one.clone()],
            RawStages::Many(many) => many.clone(),
        };
        if stages.is_empty() {
            report(&format!("{base}.stage"), "lists no stage".to_owned());
            continue;
        }
        let several = stages.len() > 1;
        for text in stages {
            let trigger = match pipeline::parse_target(&text, None, pipelines) {
                Ok(trigger) if trigger.pipeline.is_some() => trigger,
                Ok(_) => {
                    report(
                        &format!("{base}.stage"),
                        format!("expected \"pipeline.stage\", got {text:?}"),
                    );
                    continue;
                }
                Err(message) => {
                    report(&format!("{base}.stage"), message);
                    continue;
                }
            };
            let rule_name = if several {
                format!("{name}@{}", trigger.stage)
            } else {
                name.clone()
            };
            if let Some(rule) = validate_one(
                &base,
                rule_name,
                trigger,
                &raw_rule,
                pipelines,
                templates_dir,
                report,
            ) {
                rules.push(rule);
            }
        }
    }
    rules
}

fn validate_one(
    base: &str,
    name: String,
    trigger: StageRef,
    raw: &RawFollowup,
    pipelines: &Pipelines,
    templates_dir: &Path,
    report: &mut dyn FnMut(&str, String),
) -> Option<Rule> {
    let mut ok = true;
    let pipeline_key = trigger
        .pipeline
        .clone()
        .expect("the trigger was checked to name a pipeline");
    let pipeline = pipelines
        .get(pipeline_key.as_str())
        .expect("parse_target checked the pipeline");
    let trigger_stage = pipelines
        .stage(&trigger)
        .expect("parse_target checked the stage");
    let is_cart_rule = pipeline_key.as_str() == "ecommerce";

    let kind = match raw.kind.as_str() {
        "marketing" => RuleKind::Marketing,
        "transactional" => RuleKind::Transactional,
        other => {
            report(
                &format!("{base}.kind"),
                format!("expected \"marketing\" or \"transactional\", got {other:?}"),
            );
            ok = false;
            RuleKind::Transactional
        }
    };
    let to = match raw.to.as_str() {
        "contact" => Recipient::Contact,
        "owner" => Recipient::Owner,
        other => match EmailAddress::parse(other) {
            Some(address) => Recipient::Fixed(address),
            None => {
                report(
                    &format!("{base}.to"),
                    format!("expected \"contact\", \"owner\" or an email address, got {other:?}"),
                );
                ok = false;
                Recipient::Contact
            }
        },
    };

    let stage_in_pipeline =
        |key: &str, text: &str, report: &mut dyn FnMut(&str, String)| match pipeline::parse_target(
            text,
            Some(&pipeline_key),
            pipelines,
        ) {
            Ok(target) if target.pipeline.as_ref() == Some(&pipeline_key) => Some(target),
            Ok(_) => {
                report(
                    key,
                    format!("{text:?} is not a stage of pipeline {pipeline_key}"),
                );
                None
            }
            Err(message) => {
                report(key, message);
                None
            }
        };

    let mut steps = Vec::new();
    match (&raw.template, &raw.steps) {
        (Some(_), Some(_)) => {
            report(
                base,
                "set either `template` (one email) or `steps` (a sequence), not both".to_owned(),
            );
            ok = false;
        }
        (None, None) => {
            report(
                base,
                "needs `template` (one email) or `steps` (a sequence)".to_owned(),
            );
            ok = false;
        }
        (Some(template), None) => {
            let after = raw.after.map(|d| d.0).or(trigger_stage.stall_after);
            let move_to = match &raw.move_to {
                Some(text) => match stage_in_pipeline(&format!("{base}.move_to"), text, report) {
                    Some(target) => Some(target),
                    None => {
                        ok = false;
                        None
                    }
                },
                None => None,
            };
            match after {
                Some(after) => steps.push(Step {
                    after,
                    template: template.clone(),
                    discount_code: None,
                    move_to,
                }),
                None => {
                    report(
                        &format!("{base}.after"),
                        format!(
                            "stage {} has no stall_after, so the rule needs `after`",
                            trigger.stage
                        ),
                    );
                    ok = false;
                }
            }
        }
        (None, Some(raw_steps)) => {
            if raw.move_to.is_some() {
                report(
                    &format!("{base}.move_to"),
                    "with `steps`, set `move_to` on the step that moves the deal".to_owned(),
                );
                ok = false;
            }
            if raw_steps.is_empty() {
                report(&format!("{base}.steps"), "is empty".to_owned());
                ok = false;
            }
            for (at, raw_step) in raw_steps.iter().enumerate() {
                let key = format!("{base}.steps[{at}]");
                let after = match raw_step.after.map(|d| d.0) {
                    Some(after) => after,
                    None if is_cart_rule && at < CART_DEFAULT_DELAYS.len() => {
                        CART_DEFAULT_DELAYS[at]
                    }
                    None => {
                        report(
                            &format!("{key}.after"),
                            "needs a delay like \"1h\" (counted from entering the stage)"
                                .to_owned(),
                        );
                        ok = false;
                        continue;
                    }
                };
                if let Some(previous) = steps.last().map(|s: &Step| s.after)
                    && after <= previous
                {
                    report(
                        &format!("{key}.after"),
                        format!(
                            "must be later than the previous step ({}), since every delay counts from entering the stage",
                            crate::config::duration::format(previous)
                        ),
                    );
                    ok = false;
                }
                let move_to = match &raw_step.move_to {
                    Some(text) => {
                        match stage_in_pipeline(&format!("{key}.move_to"), text, report) {
                            Some(target) => Some(target),
                            None => {
                                ok = false;
                                None
                            }
                        }
                    }
                    // In `ecommerce`, dealsync's own emails advance the cart.
                    None if is_cart_rule => {
                        let default = if raw_step.discount_code.is_some() {
                            "discount_offer"
                        } else {
                            "follow_up_email"
                        };
                        pipeline.stage(default).map(|_| StageRef {
                            pipeline: Some(pipeline_key.clone()),
                            stage: crate::domain::StageKey::new(default),
                        })
                    }
                    None => None,
                };
                if let Some(code) = &raw_step.discount_code
                    && code.trim().is_empty()
                {
                    report(
                        &format!("{key}.discount_code"),
                        "is empty; remove it or give the code".to_owned(),
                    );
                    ok = false;
                }
                steps.push(Step {
                    after,
                    template: raw_step.template.clone(),
                    discount_code: raw_step.discount_code.clone(),
                    move_to,
                });
            }
        }
    }

    for (at, step) in steps.iter().enumerate() {
        let key = if raw.steps.is_some() {
            format!("{base}.steps[{at}].template")
        } else {
            format!("{base}.template")
        };
        if !valid_name(&step.template) {
            report(
                &key,
                "template names may hold only letters, digits, '_' and '-'".to_owned(),
            );
            ok = false;
            continue;
        }
        let missing: Vec<String> = template_files(&step.template)
            .into_iter()
            .filter(|file| !templates_dir.join(file).is_file())
            .collect();
        if !missing.is_empty() {
            report(
                &key,
                format!(
                    "unknown template {:?}: {} missing in {}",
                    step.template,
                    missing.join(", "),
                    templates_dir.display()
                ),
            );
            ok = false;
        }
    }

    let moves_somewhere = steps.iter().any(|s| s.move_to.is_some());
    let expire_after = raw.expire_after.map(|d| d.0).or_else(|| {
        // Carts expire by default once the last step's stage has stalled.
        let last_stage = steps.last().and_then(|s| s.move_to.as_ref())?;
        pipelines.stage(last_stage)?.stall_after
    });
    let expire = match (expire_after, &raw.expire_to) {
        (Some(after), Some(text)) => {
            stage_in_pipeline(&format!("{base}.expire_to"), text, report).map(|to| (after, to))
        }
        (Some(after), None) if is_cart_rule || raw.expire_after.is_some() => {
            match pipeline.first_of_kind(StageKind::Lost) {
                Some(lost) if moves_somewhere || raw.expire_after.is_some() => Some((
                    after,
                    StageRef {
                        pipeline: Some(pipeline_key.clone()),
                        stage: lost.key.clone(),
                    },
                )),
                _ => None,
            }
        }
        (None, Some(_)) => {
            report(
                &format!("{base}.expire_to"),
                "needs `expire_after` (no default: the last step moves the deal nowhere)"
                    .to_owned(),
            );
            ok = false;
            None
        }
        _ => None,
    };

    let mut skip_if_open_in = Vec::new();
    for text in raw.skip_if_open_in.iter().flatten() {
        match pipeline::parse_target(text, None, pipelines) {
            Ok(stage) if stage.pipeline.is_some() => skip_if_open_in.push(stage),
            Ok(_) => {
                report(
                    &format!("{base}.skip_if_open_in"),
                    format!("expected \"pipeline.stage\", got {text:?}"),
                );
                ok = false;
            }
            Err(message) => {
                report(&format!("{base}.skip_if_open_in"), message);
                ok = false;
            }
        }
    }

    let mut active = vec![trigger.clone()];
    for step in &steps {
        if let Some(to) = &step.move_to
            && !active.contains(to)
        {
            active.push(to.clone());
        }
    }
    if !ok {
        return None;
    }
    Some(Rule {
        name,
        trigger,
        kind,
        to,
        steps,
        expire,
        cooldown: raw.cooldown.map(|d| d.0),
        late_grace: raw.late_grace.map(|d| d.0),
        stop_on_purchase: raw.stop_on_purchase.unwrap_or(is_cart_rule),
        active,
        skip_if_open_in,
    })
}

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

/// What a digest holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestContent {
    /// The deals sitting in the rule's stages past their idle time (`digest = …`).
    Stalled,
    /// The weekly pipeline review (`review = …`): the week's funnel against the week
    /// before, the bottleneck, the deals that stalled, the forecast, cart recovery.
    Review,
}

/// A validated digest rule.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestRule {
    pub name: String,
    pub content: DigestContent,
    /// The watched stages; none for a review.
    pub stages: Vec<DigestStage>,
    pub to: DigestRecipient,
    /// The local day of the week it goes out on; `None`: every day.
    pub weekday: Option<Weekday>,
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

    /// Days between two slots: 1, or 7 for a weekly rule.
    fn period_days(&self) -> u64 {
        if self.weekday.is_some() { 7 } else { 1 }
    }

    /// The latest local day on or before `day` the rule goes out on.
    fn slot_day_on_or_before(&self, day: NaiveDate) -> NaiveDate {
        let Some(weekday) = self.weekday else {
            return day;
        };
        let back = (7 + day.weekday().num_days_from_monday() - weekday.num_days_from_monday()) % 7;
        day.checked_sub_days(Days::new(u64::from(back)))
            .unwrap_or(day)
    }

    /// The latest slot at or before `now`, with its local day.
    pub fn latest_slot(&self, now: DateTime<Utc>) -> (NaiveDate, DateTime<Utc>) {
        let today = now.with_timezone(&self.zone).date_naive();
        let day = self.slot_day_on_or_before(today);
        let slot = self.slot_on(day);
        if slot <= now {
            return (day, slot);
        }
        let before = day
            .checked_sub_days(Days::new(self.period_days()))
            .unwrap_or(day);
        (before, self.slot_on(before))
    }

    /// The first slot after `now`.
    pub fn next_slot(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let (day, _) = self.latest_slot(now);
        let next = day
            .checked_add_days(Days::new(self.period_days()))
            .unwrap_or(day);
        self.slot_on(next)
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

/// Parses "08:00" (every day) or "monday 08:00" (that day each week; "mon" too).
pub(crate) fn parse_schedule(text: &str) -> Result<(Option<Weekday>, NaiveTime), String> {
    match text.trim().split_once(char::is_whitespace) {
        None => Ok((None, parse_time(text)?)),
        Some((day, time)) => {
            let weekday = day.parse::<Weekday>().map_err(|_| {
                format!("expected a day of the week like \"monday\" before the time, got {day:?}")
            })?;
            Ok((Some(weekday), parse_time(time)?))
        }
    }
}

pub(crate) fn parse_time(text: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(text.trim(), "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(text.trim(), "%H:%M:%S"))
        .map_err(|_| format!("expected a local time like \"08:00\", got {text:?}"))
}

/// Validates the digest rules among `[followups.*]` (those with `digest` set).
pub fn validate_digests(
    raw: &BTreeMap<String, RawFollowup>,
    pipelines: &Pipelines,
    email: &EmailConfig,
    report: &mut dyn FnMut(&str, String),
) -> Vec<DigestRule> {
    let mut rules = Vec::new();
    for (name, raw_rule) in raw {
        let (content, key, at_text) = match (&raw_rule.digest, &raw_rule.review) {
            (None, None) => continue,
            (Some(at), None) => (DigestContent::Stalled, "digest", at),
            (_, Some(at)) => (DigestContent::Review, "review", at),
        };
        if !raw_rule.enabled || !valid_name(name) {
            // `validate` reports bad names.
            continue;
        }
        let base = format!("followups.{name}");
        let mut ok = true;
        let mut fail = |key: &str, message: String| {
            report(key, message);
            ok = false;
        };
        if raw_rule.digest.is_some() && raw_rule.review.is_some() {
            fail(
                &base,
                "set `digest` (stalled deals) or `review` (the weekly pipeline review), not both"
                    .to_owned(),
            );
        }
        let (weekday, at) = match parse_schedule(at_text) {
            Ok((None, at)) if content == DigestContent::Review => {
                fail(
                    &format!("{base}.review"),
                    format!(
                        "a review is weekly: name the day, e.g. \"monday {}\"",
                        at.format("%H:%M")
                    ),
                );
                (None, at)
            }
            Ok(schedule) => schedule,
            Err(message) => {
                fail(&format!("{base}.{key}"), message);
                (None, NaiveTime::MIN)
            }
        };
        if raw_rule.kind != "transactional" {
            fail(
                &format!("{base}.kind"),
                "a digest is an internal email: set kind = \"transactional\"".to_owned(),
            );
        }
        if content == DigestContent::Review && EmailAddress::parse(&raw_rule.to).is_none() {
            fail(
                &format!("{base}.to"),
                format!(
                    "a weekly review goes to one fixed address (\"sales-ops@example.com\"), got {:?}",
                    raw_rule.to
                ),
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
            ("skip_if_open_in", raw_rule.skip_if_open_in.is_some()),
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
        match content {
            DigestContent::Stalled if texts.is_empty() => {
                fail(&format!("{base}.stage"), "lists no stage".to_owned());
            }
            DigestContent::Review if !texts.is_empty() || raw_rule.after.is_some() => {
                fail(
                    &format!("{base}.stage"),
                    "a weekly review covers every pipeline and stage: remove `stage` and `after`"
                        .to_owned(),
                );
            }
            _ => {}
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
                content,
                stages,
                to,
                weekday,
                at,
                zone,
                late_grace: raw_rule.late_grace.map_or(email.late_grace, |d| d.0),
                template,
            });
        }
    }
    rules
}

/// Hours in which nothing goes to contacts, e.g. 21:00–09:00; may wrap midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl QuietHours {
    /// Parses `"21:00-09:00"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("expected quiet hours like \"21:00-09:00\", got {text:?}");
        let (start, end) = text.split_once('-').ok_or_else(bad)?;
        let time = |part: &str| NaiveTime::parse_from_str(part.trim(), "%H:%M").map_err(|_| bad());
        let quiet = QuietHours {
            start: time(start)?,
            end: time(end)?,
        };
        if quiet.start == quiet.end {
            return Err(format!(
                "quiet hours {text:?} start and end at the same time"
            ));
        }
        Ok(quiet)
    }

    /// Returns when the quiet period around `at` ends, or `None` when `at` is outside it.
    pub fn ends_after(&self, at: DateTime<Utc>, zone: Tz) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&zone);
        let time = local.time();
        let date = local.date_naive();
        let end_date = if self.start < self.end {
            if time < self.start || time >= self.end {
                return None;
            }
            date
        } else if time >= self.start {
            date.succ_opt()?
        } else if time < self.end {
            date
        } else {
            return None;
        };
        let end = end_date.and_time(self.end);
        // In a DST gap the end does not exist locally: an hour later does.
        zone.from_local_datetime(&end)
            .earliest()
            .or_else(|| {
                zone.from_local_datetime(&(end + chrono::Duration::hours(1)))
                    .earliest()
            })
            .map(|end| end.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{parse_in as parse, problem_keys};

    fn templates(dir: &Path, names: &[&str]) {
        std::fs::create_dir_all(dir.join("templates")).unwrap();
        for name in names {
            for file in template_files(name) {
                std::fs::write(dir.join("templates").join(file), "x").unwrap();
            }
        }
    }

    #[test]
    fn a_cart_sequence_gets_the_default_delays_stage_moves_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        templates(dir.path(), &["remind", "discount"]);
        let config = parse(
            dir.path(),
            r#"
[server]
public_url = "https://shop.example.com"
[email]
unsubscribe_secret = "0123456789abcdef"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  { template = "remind" },
  { template = "remind" },
  { template = "discount", discount_code = "SAVE10" },
]
"#,
        )
        .unwrap();
        let rule = &config.followups[0];
        assert_eq!(
            rule.steps.iter().map(|s| s.after).collect::<Vec<_>>(),
            CART_DEFAULT_DELAYS
        );
        let moves: Vec<_> = rule
            .steps
            .iter()
            .map(|s| s.move_to.as_ref().unwrap().stage.to_string())
            .collect();
        assert_eq!(
            moves,
            ["follow_up_email", "follow_up_email", "discount_offer"]
        );
        let (after, to) = rule.expire.clone().unwrap();
        assert_eq!(to.stage.as_str(), "expired");
        // The default discount_offer stage stalls after 3 days.
        assert_eq!(after, Duration::from_secs(3 * 24 * 3600));
        assert!(rule.stop_on_purchase);
        assert_eq!(rule.active.len(), 3);
    }

    #[test]
    fn a_rule_on_several_stages_becomes_one_rule_per_stage_with_the_stall_threshold() {
        let dir = tempfile::tempdir().unwrap();
        templates(dir.path(), &["alert"]);
        let config = parse(
            dir.path(),
            r#"
[followups.stalled]
kind = "transactional"
stage = ["sales.proposal", "sales.negotiation"]
to = "owner"
template = "alert"
"#,
        )
        .unwrap();
        let names: Vec<_> = config.followups.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["stalled@proposal", "stalled@negotiation"]);
        assert_eq!(
            config.followups[0].steps[0].after,
            Duration::from_secs(14 * 24 * 3600)
        );
        assert_eq!(config.followups[0].to, Recipient::Owner);
        assert!(config.followups[0].expire.is_none());
    }

    #[test]
    fn marketing_rules_need_a_secret_and_a_public_url_and_bad_values_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        templates(dir.path(), &["remind"]);
        let error = parse(
            dir.path(),
            r#"
[followups.carts]
kind = "newsletter"
stage = "ecommerce.cart_abandoned"
to = "not an address"
template = "remind"

[followups.more]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "remind"
"#,
        )
        .unwrap_err();
        let keys = problem_keys(&error);
        assert!(keys.contains(&"followups.carts.kind"), "{error}");
        assert!(keys.contains(&"followups.carts.to"), "{error}");
        assert!(keys.contains(&"email.unsubscribe_secret"), "{error}");
        assert!(keys.contains(&"server.public_url"), "{error}");
    }

    #[test]
    fn a_weekly_review_goes_to_one_address_on_a_named_day_and_watches_no_stage() {
        let dir = tempfile::tempdir().unwrap();
        templates(dir.path(), &["review"]);
        let config = parse(
            dir.path(),
            r#"
[followups.weekly]
kind = "transactional"
to = "Sales-Ops@example.com"
template = "review"
review = "friday 16:30"
time_zone = "Europe/Berlin"
"#,
        )
        .unwrap();
        let rule = &config.digests[0];
        assert_eq!(rule.content, DigestContent::Review);
        assert_eq!(rule.weekday, Some(Weekday::Fri));
        assert_eq!(rule.at, NaiveTime::from_hms_opt(16, 30, 0).unwrap());
        assert!(rule.stages.is_empty());
        assert!(config.followups.is_empty(), "not a follow-up rule too");
        let error = parse(
            dir.path(),
            r#"
[followups.daily]
kind = "transactional"
to = "owner"
template = "review"
review = "16:30"
stage = "sales.proposal"

[followups.both]
kind = "transactional"
to = "ops@example.com"
template = "review"
review = "monday 08:00"
digest = "08:00"
"#,
        )
        .unwrap_err();
        let keys = problem_keys(&error);
        for key in [
            "followups.daily.review",
            "followups.daily.to",
            "followups.daily.stage",
            "followups.both",
        ] {
            assert!(keys.contains(&key), "{key}: {error}");
        }
    }
}
