//! Email templates: minijinja, three files per template in the templates directory:
//! `NAME.subject`, `NAME.txt` (plain text part) and `NAME.html` (HTML part, escaped).
//!
//! Invariant: templates are parsed when the config is loaded and rendered against a
//! sample deal by `dealsync check`; undefined variables are errors (strict mode), so
//! a typo is found before the first send, not at it.
//!
//! HTML escaping turns `& < > " '` into entities and leaves `/` alone (minijinja's
//! default also writes `/` as `&#x2f;`, which link checkers and some mail clients do
//! not decode in an `href`): that is enough for text and for quoted attributes, and
//! the URLs a template puts in `href` are checked to be http or https where they come
//! in (`connectors::ecommerce::web_url`) or built by dealsync.

use super::rules::{Rule, template_files};
use crate::domain::{Deal, LineItem, StepNumber};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("reading template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template {file}: {message}")]
    Syntax { file: String, message: String },
    #[error("rendering template {file}: {message}")]
    Render { file: String, message: String },
}

/// The loaded templates.
pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

/// One rendered email.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// What a template sees.
#[derive(Debug, Clone, Serialize)]
pub struct EmailContext {
    pub deal: DealView,
    pub contact: Person,
    pub owner: Person,
    pub line_items: Vec<ItemView>,
    pub recovery_url: Option<String>,
    pub discount_code: Option<String>,
    /// Set on marketing emails.
    pub unsubscribe_url: Option<String>,
    pub rule: String,
    /// Counted from 1.
    pub step: StepNumber,
    pub steps: usize,
    /// The display name of the sender.
    pub sender: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DealView {
    pub id: i64,
    pub title: String,
    pub external_id: String,
    pub connection: String,
    pub pipeline: Option<String>,
    /// The canonical stage's key (`lead_generation`).
    pub stage: String,
    /// The canonical stage's label (`Lead Generation`), for what people read.
    pub stage_label: String,
    /// The amount as a decimal string ("249.00"), or none.
    pub amount: Option<String>,
    pub currency: Option<String>,
    pub days_in_stage: i64,
    pub stage_entered_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Person {
    pub name: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemView {
    pub title: String,
    pub quantity: i64,
    pub unit_price: Option<String>,
    pub total: Option<String>,
}

fn decimal(minor: i64, deal: &Deal) -> String {
    match deal.currency {
        Some(currency) => crate::domain::Money::new(minor, currency).to_decimal_string(),
        None => format!("{}.{:02}", minor / 100, (minor % 100).abs()),
    }
}

impl EmailContext {
    /// Builds the context for one step of a rule.
    pub fn new(
        deal: &Deal,
        rule: &Rule,
        step: StepNumber,
        unsubscribe_url: Option<String>,
        sender: String,
        now: chrono::DateTime<chrono::Utc>,
    ) -> EmailContext {
        let item = |item: &LineItem| ItemView {
            title: item.title.clone(),
            quantity: item.quantity,
            unit_price: item.unit_price_minor.map(|p| decimal(p, deal)),
            total: item
                .unit_price_minor
                .map(|p| decimal(p.saturating_mul(item.quantity), deal)),
        };
        EmailContext {
            deal: DealView {
                id: deal.id,
                title: deal.title.clone(),
                external_id: deal.external_id.to_string(),
                connection: deal.connection.to_string(),
                pipeline: deal.pipeline.as_ref().map(|p| p.to_string()),
                stage: deal.stage.to_string(),
                stage_label: deal.stage.to_string(),
                amount: deal.amount().map(|m| m.to_decimal_string()),
                currency: deal.currency.map(|c| c.to_string()),
                days_in_stage: (now - deal.stage_entered_at).num_days(),
                stage_entered_at: deal
                    .stage_entered_at
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string(),
            },
            contact: Person {
                name: deal.contact_name.clone(),
                email: deal.contact_email.as_ref().map(|e| e.to_string()),
            },
            owner: Person {
                name: deal.owner.clone(),
                email: deal.owner_email.as_ref().map(|e| e.to_string()),
            },
            line_items: deal.line_items.iter().map(item).collect(),
            recovery_url: deal.recovery_url.clone(),
            discount_code: rule
                .steps
                .get(step.index())
                .and_then(|s| s.discount_code.clone()),
            unsubscribe_url,
            rule: rule.name.clone(),
            step,
            steps: rule.steps.len(),
            sender,
        }
    }

    /// Names the deal's stage by its label in the pipelines in force.
    pub fn with_stage_label(mut self, pipelines: &crate::pipeline::Pipelines) -> EmailContext {
        if let Some(pipeline) = self
            .deal
            .pipeline
            .as_deref()
            .and_then(|key| pipelines.get(key))
            && let Some(stage) = pipeline.stage(&self.deal.stage)
        {
            self.deal.stage_label = stage.label.clone();
        }
        self
    }

    /// A cart with every field set, for `dealsync check`.
    pub fn sample(rule: &Rule, step: StepNumber) -> EmailContext {
        let mut deal = crate::domain::Deal {
            id: 1,
            connection: "shop".into(),
            external_id: "sample-1".into(),
            title: "Cart of Ada Lovelace".into(),
            amount_minor: Some(30_700),
            currency: crate::domain::Currency::parse("EUR").ok(),
            pipeline: rule.trigger.pipeline.clone(),
            stage: rule.trigger.stage.clone(),
            status: crate::domain::DealStatus::Open,
            native_pipeline: "shop".into(),
            native_stage: "checkout".into(),
            contact_email: crate::domain::EmailAddress::parse("ada@example.com"),
            contact_name: Some("Ada Lovelace".into()),
            owner: Some("Alice Owner".into()),
            owner_email: crate::domain::EmailAddress::parse("alice@example.com"),
            marketing_consent: Some(true),
            created_at: None,
            updated_at: None,
            stage_entered_at: chrono::Utc::now(),
            last_activity_at: chrono::Utc::now(),
            expected_close: None,
            recovery_url: Some("https://shop.example.com/cart/1/recover".into()),
            line_items: vec![LineItem {
                title: "Espresso grinder".into(),
                quantity: 1,
                unit_price_minor: Some(24_900),
                sku: None,
            }],
            cart_keys: Vec::new(),
            deleted_at: None,
            first_seen_at: chrono::Utc::now(),
            raw: serde_json::Value::Null,
        };
        deal.line_items.push(LineItem {
            title: "Coffee beans 1kg".into(),
            quantity: 2,
            unit_price_minor: Some(2_900),
            sku: None,
        });
        let mut context = EmailContext::new(
            &deal,
            rule,
            step,
            Some("https://dealsync.example.com/unsubscribe/sample".into()),
            "Sample Shop".into(),
            chrono::Utc::now(),
        );
        if context.discount_code.is_none() {
            context.discount_code = Some("SAMPLE10".into());
        }
        context
    }
}

impl Templates {
    /// Reads and parses the templates the rules use.
    pub fn load<'a>(
        dir: &Path,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Templates, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.set_formatter(|out, state, value| match value.as_str() {
            Some(text) if state.auto_escape() == AutoEscape::Html && !value.is_safe() => {
                Ok(write_html_escaped(out, text)?)
            }
            _ => minijinja::escape_formatter(out, state, value),
        });
        let mut seen = std::collections::BTreeSet::new();
        for name in names {
            if !seen.insert(name.to_owned()) {
                continue;
            }
            for file in template_files(name) {
                let path = dir.join(&file);
                let source = std::fs::read_to_string(&path)
                    .map_err(|source| TemplateError::Read { path, source })?;
                env.add_template_owned(file.clone(), source)
                    .map_err(|error| TemplateError::Syntax {
                        file: file.clone(),
                        message: describe(&error),
                    })?;
            }
        }
        Ok(Templates { env })
    }

    /// Loads the templates of every rule.
    pub fn for_rules(dir: &Path, rules: &[Rule]) -> Result<Templates, TemplateError> {
        Templates::load(dir, rules.iter().flat_map(|rule| rule.templates()))
    }

    /// Loads the templates of every rule and digest of a config.
    pub fn for_config(config: &crate::config::Config) -> Result<Templates, TemplateError> {
        let rules = config.followups.iter().flat_map(|rule| rule.templates());
        let digests = config.digests.iter().map(|digest| digest.template.as_str());
        Templates::load(&config.email.templates, rules.chain(digests))
    }

    /// Renders one template.
    pub fn render<C: Serialize>(&self, name: &str, context: &C) -> Result<Rendered, TemplateError> {
        let [subject, text, html] = template_files(name);
        let render = |file: &str| {
            let template = self
                .env
                .get_template(file)
                .map_err(|error| TemplateError::Render {
                    file: file.to_owned(),
                    message: describe(&error),
                })?;
            template
                .render(context)
                .map_err(|error| TemplateError::Render {
                    file: file.to_owned(),
                    message: describe(&error),
                })
        };
        let subject = render(&subject)?;
        // A header is one line: newlines in a subject template are folded away.
        let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
        if subject.is_empty() {
            return Err(TemplateError::Render {
                file: format!("{name}.subject"),
                message: "renders to an empty subject".into(),
            });
        }
        Ok(Rendered {
            subject,
            text: render(&text)?,
            html: render(&html)?,
        })
    }

    /// Renders every step of every rule against a sample cart; returns the problems.
    pub fn check(&self, rules: &[Rule]) -> Vec<String> {
        let mut problems = Vec::new();
        for rule in rules {
            for (at, step) in rule.steps.iter().enumerate() {
                let number = StepNumber::from_index(at as i64);
                if let Err(error) = self.render(&step.template, &EmailContext::sample(rule, number))
                {
                    problems.push(format!("followups.{} step {number}: {error}", rule.name));
                }
            }
        }
        problems
    }
}

/// Writes `text` for HTML text or a quoted attribute: `& < > " '` as entities.
fn write_html_escaped(out: &mut impl std::fmt::Write, text: &str) -> std::fmt::Result {
    for c in text.chars() {
        match c {
            '&' => out.write_str("&amp;")?,
            '<' => out.write_str("&lt;")?,
            '>' => out.write_str("&gt;")?,
            '"' => out.write_str("&quot;")?,
            '\'' => out.write_str("&#x27;")?,
            other => out.write_char(other)?,
        }
    }
    Ok(())
}

fn describe(error: &minijinja::Error) -> String {
    let mut message = error.to_string();
    if let Some(line) = error.line() {
        message = format!("line {line}: {message}");
    }
    message
}
