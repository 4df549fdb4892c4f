//! Write-back templates: what a manifest's `[writeback]` requests render from, and how.
//!
//! Every text of a write-back request (path, query values, the strings of the body) is
//! a minijinja template over [`variables`] of one sent email; an unknown variable is an
//! error, never an empty string. In a body, a string that is exactly one `{{ … }}`
//! takes the expression's value with its JSON type (`"{{ deal_id | int }}"` is a
//! number); any other string renders as text. In a path each value is percent-encoded,
//! so an id cannot add a path segment.
//!
//! Invariant: [`check`] renders every template of a manifest against a sample email
//! when the manifest is loaded, so a template that would fail at send time fails
//! `dealsync check` instead, naming its key.

use crate::connectors::manifest::schema::{Writeback, WritebackRequest};
use crate::store::WritebackJob;
use chrono::{DateTime, SecondsFormat, Utc};
use minijinja::{Environment, UndefinedBehavior, Value};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::sync::OnceLock;

/// Characters left as they are in a path value: RFC 3986 unreserved.
const PATH_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// How far before the send a lookup reads notes from (`since`): a clock apart
/// between dealsync and the vendor still finds the note.
const LOOKUP_SLACK: chrono::Duration = chrono::Duration::minutes(5);

/// The variables every write-back template may use, with what they hold.
pub const VARIABLES: &[(&str, &str)] = &[
    (
        "key",
        "the idempotency key the record carries (dealsync_outbox_ID)",
    ),
    (
        "deal_id",
        "the deal's id in the CRM (text; `| int` for a number)",
    ),
    ("deal_title", "the deal's title"),
    ("connection", "the connection's name"),
    ("rule", "the follow-up rule"),
    ("step", "the rule's step, counted from 1"),
    ("recipient", "the address the email went to"),
    ("subject", "the email's subject"),
    (
        "sent_at",
        "when it was sent, RFC 3339 UTC with milliseconds",
    ),
    ("sent_at_ms", "when it was sent, epoch milliseconds"),
    ("sent_date", "the UTC date it was sent, YYYY-MM-DD"),
    ("sent_time", "when it was sent, YYYY-MM-DD HH:MM:SS UTC"),
    (
        "since",
        "five minutes before it was sent, RFC 3339 UTC (lookups)",
    ),
];

/// The template variables of `job`.
pub fn variables(job: &WritebackJob) -> Value {
    let at = job.sent_at;
    let since: DateTime<Utc> = at - LOOKUP_SLACK;
    minijinja::context! {
        key => job.key,
        deal_id => job.external_id,
        deal_title => job.deal_title,
        connection => job.connection,
        rule => job.rule,
        step => job.step.number(),
        recipient => job.recipient,
        subject => job.subject,
        sent_at => at.to_rfc3339_opts(SecondsFormat::Millis, true),
        sent_at_ms => at.timestamp_millis(),
        sent_date => at.format("%Y-%m-%d").to_string(),
        sent_time => at.format("%Y-%m-%d %H:%M:%S").to_string(),
        since => since.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

fn environment(path: bool) -> &'static Environment<'static> {
    static TEXT: OnceLock<Environment<'static>> = OnceLock::new();
    static PATH: OnceLock<Environment<'static>> = OnceLock::new();
    let build = move || {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        if path {
            env.set_formatter(|out, _state, value| {
                let text = value.to_string();
                out.write_str(&utf8_percent_encode(&text, PATH_VALUE).to_string())
                    .map_err(minijinja::Error::from)
            });
        }
        env
    };
    if path {
        PATH.get_or_init(build)
    } else {
        TEXT.get_or_init(build)
    }
}

fn render_with(env: &Environment<'_>, template: &str, vars: &Value) -> Result<String, String> {
    env.render_str(template, vars)
        .map_err(|error| error_text(&error))
}

fn error_text(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.to_string(),
    }
}

/// Renders a text (a query value) of a write-back request.
pub fn render_text(template: &str, vars: &Value) -> Result<String, String> {
    render_with(environment(false), template, vars)
}

/// Renders a path, percent-encoding each value put into it.
pub fn render_path(template: &str, vars: &Value) -> Result<String, String> {
    render_with(environment(true), template, vars)
}

/// The expression of a string that is exactly one `{{ … }}`.
fn whole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then_some(inner.trim())
}

/// Renders a JSON body: every string is a template (see the module's comment).
pub fn render_json(
    template: &serde_json::Value,
    vars: &Value,
) -> Result<serde_json::Value, String> {
    use serde_json::Value as Json;
    Ok(match template {
        Json::String(text) => match whole_expression(text) {
            Some(expression) => {
                let value = environment(false)
                    .compile_expression(expression)
                    .and_then(|compiled| compiled.eval(vars))
                    .map_err(|error| error_text(&error))?;
                if value.is_undefined() {
                    return Err(format!("{expression} is undefined"));
                }
                serde_json::to_value(&value).map_err(|error| error.to_string())?
            }
            None => Json::String(render_text(text, vars)?),
        },
        Json::Array(items) => Json::Array(
            items
                .iter()
                .map(|item| render_json(item, vars))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(key, value)| Ok((key.clone(), render_json(value, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// A body as JSON (TOML tables and arrays map one to one).
pub fn body_json(request: &WritebackRequest) -> Option<serde_json::Value> {
    request
        .body
        .as_ref()
        .map(|body| serde_json::to_value(body).unwrap_or(serde_json::Value::Null))
}

/// An email to render the templates of a manifest against when it is loaded.
fn sample() -> WritebackJob {
    WritebackJob {
        id: 1,
        outbox_id: 9001,
        deal_id: 1,
        connection: "crm".into(),
        key: crate::store::writeback_key(9001),
        external_id: "401".into(),
        deal_title: "ACME renewal".into(),
        rule: "stalled-14d".into(),
        step: crate::domain::StepNumber::from_index(0),
        recipient: "jane@example.com".into(),
        subject: "Checking in on your quote".into(),
        sent_at: DateTime::from_timestamp_millis(1_772_446_500_000).unwrap_or_default(),
        attempts: 1,
    }
}

/// Checks one request's templates; `key` names it (`writeback.create`).
fn check_request(key: &str, request: &WritebackRequest, report: &mut dyn FnMut(&str, String)) {
    let vars = variables(&sample());
    let known = || {
        VARIABLES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !request.path.starts_with('/') {
        report(
            &format!("{key}.path"),
            format!("{:?} must start with '/'", request.path),
        );
    }
    if let Err(message) = render_path(&request.path, &vars) {
        report(
            &format!("{key}.path"),
            format!("{message} (variables: {})", known()),
        );
    }
    for (name, value) in &request.query {
        if let Err(message) = render_text(value, &vars) {
            report(
                &format!("{key}.query.{name}"),
                format!("{message} (variables: {})", known()),
            );
        }
    }
    if let Some(body) = body_json(request)
        && let Err(message) = render_json(&body, &vars)
    {
        report(
            &format!("{key}.body"),
            format!("{message} (variables: {})", known()),
        );
    }
    for (name, pointer) in [
        ("records", &request.records),
        ("marker", &request.marker),
        ("id", &request.id),
    ] {
        if let Some(pointer) = pointer
            && let Err(message) = crate::connectors::manifest::fields::check_path(pointer)
        {
            report(&format!("{key}.{name}"), message);
        }
    }
}

/// Checks a manifest's `[writeback]`: its templates render, a lookup says where the
/// key is, and a create that is not idempotent has a lookup to run after an attempt
/// whose outcome is unknown.
pub fn check(writeback: &Writeback, report: &mut dyn FnMut(&str, String)) {
    check_request("writeback.create", &writeback.create, report);
    if writeback.create.records.is_some() || writeback.create.marker.is_some() {
        report(
            "writeback.create",
            "records and marker belong to [writeback.lookup]".into(),
        );
    }
    match &writeback.lookup {
        Some(lookup) => {
            check_request("writeback.lookup", lookup, report);
            for (name, value) in [
                ("records", &lookup.records),
                ("marker", &lookup.marker),
                ("id", &lookup.id),
            ] {
                if value.is_none() {
                    report(
                        &format!("writeback.lookup.{name}"),
                        format!("a lookup needs {name}: a JSON pointer (records: to the list; marker and id: inside each record)"),
                    );
                }
            }
            if lookup.idempotent {
                report(
                    "writeback.lookup.idempotent",
                    "only [writeback.create] may be declared idempotent".into(),
                );
            }
        }
        None if !writeback.create.idempotent => report(
            "writeback.lookup",
            "a create that is not idempotent needs a lookup: after an attempt whose outcome is unknown (a timeout), dealsync looks for the note carrying {{ key }} before writing again; or declare create.idempotent = true for the vendor's upsert".into(),
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_strings_render_as_text_and_whole_expressions_keep_their_type() {
        let vars = variables(&sample());
        let body = json!({
            "deal_id": "{{ deal_id | int }}",
            "ms": "{{ sent_at_ms }}",
            "text": "Step {{ step }} of {{ rule }}: {{ subject }} ref={{ key }}",
            "kept": 214,
            "list": [{"id": "{{ deal_id }}"}],
        });
        assert_eq!(
            render_json(&body, &vars).unwrap(),
            json!({
                "deal_id": 401,
                "ms": 1_772_446_500_000_i64,
                "text": "Step 1 of stalled-14d: Checking in on your quote ref=dealsync_outbox_9001",
                "kept": 214,
                "list": [{"id": "401"}],
            })
        );
        assert_eq!(
            render_text("{{ sent_time }}|{{ sent_date }}|{{ since }}", &vars).unwrap(),
            "2026-03-02 10:15:00|2026-03-02|2026-03-02T10:10:00Z"
        );
    }

    #[test]
    fn a_path_value_is_percent_encoded_and_an_unknown_variable_is_an_error() {
        let mut job = sample();
        job.external_id = "../x y".into();
        let vars = variables(&job);
        assert_eq!(
            render_path("/deals/{{ deal_id }}/notes", &vars).unwrap(),
            "/deals/..%2Fx%20y/notes"
        );
        let error = render_text("{{ dael_id }}", &vars).unwrap_err();
        assert!(error.contains("undefined"), "{error}");
        assert!(render_json(&json!({"a": "{{ nope }}"}), &vars).is_err());
    }
}
