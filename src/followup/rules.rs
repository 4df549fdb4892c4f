//! Follow-up rules: parsed and checked from `[followups.NAME]` tables.
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

use crate::config::raw::{RawFollowup, RawStages};
use crate::domain::{EmailAddress, StageRef};
use crate::pipeline::{self, Pipelines, StageKind};
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
        if !raw_rule.enabled || raw_rule.digest.is_some() {
            // Digest rules are validated by `digest::validate`.
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::interpolate::tests::MapEnv;

    fn parse(dir: &Path, text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::parse(
            &dir.join("dealsync.toml"),
            text,
            &MapEnv(Default::default()),
        )
    }

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
        let keys: Vec<_> = error.problems().iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"followups.carts.kind"), "{error}");
        assert!(keys.contains(&"followups.carts.to"), "{error}");
        assert!(keys.contains(&"email.unsubscribe_secret"), "{error}");
        assert!(keys.contains(&"server.public_url"), "{error}");
    }
}
