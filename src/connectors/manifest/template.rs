//! Placeholders in manifest paths, query values and bodies: `{name}` is replaced by
//! the variable's text. In a JSON body, a string that is exactly one placeholder
//! takes the variable's JSON value (so `"{page_size}"` becomes a number and
//! `"{ids_objects}"` an array).

use serde_json::Value;
use std::collections::HashMap;

/// Variables for one request.
#[derive(Debug, Default, Clone)]
pub struct Vars(HashMap<&'static str, Value>);

/// Every placeholder a manifest may use.
pub const KNOWN: &[&str] = &[
    "page_size",
    "since",
    "since_s",
    "since_ms",
    "since_id",
    "id",
    "ids",
    "ids_json",
    "ids_objects",
    "optional",
];

impl Vars {
    pub fn set(&mut self, name: &'static str, value: Value) -> &mut Self {
        self.0.insert(name, value);
        self
    }

    /// Replaces every `{name}` in `text`; unknown names are left as they are (the
    /// manifest check refuses them before this runs).
    pub fn render(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some((before, after)) = rest.split_once('{') {
            out.push_str(before);
            match after.split_once('}') {
                Some((name, remainder)) => {
                    match self.0.get(name) {
                        Some(value) => out.push_str(&plain(value)),
                        None => {
                            out.push('{');
                            out.push_str(name);
                            out.push('}');
                        }
                    }
                    rest = remainder;
                }
                None => {
                    out.push('{');
                    out.push_str(after);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Renders a JSON body: whole-placeholder strings take the variable's value.
    pub fn render_json(&self, template: &Value) -> Value {
        match template {
            Value::String(text) => {
                if let Some(name) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}'))
                    && let Some(value) = self.0.get(name)
                {
                    return value.clone();
                }
                Value::String(self.render(text))
            }
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.render_json(v)).collect())
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.render_json(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The placeholders used in `text` that are not known.
pub fn unknown_placeholders(text: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = text;
    while let Some((_, after)) = rest.split_once('{') {
        let Some((name, remainder)) = after.split_once('}') else {
            break;
        };
        // SOQL and JSON text may hold braces of their own; only identifiers count.
        if !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !KNOWN.contains(&name)
        {
            unknown.push(name.to_owned());
        }
        rest = remainder;
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_render_as_text_and_whole_strings_as_values() {
        let mut vars = Vars::default();
        vars.set("page_size", json!(200))
            .set("since_ms", json!("1767225600000"))
            .set("ids_objects", json!([{"id": "1"}]));
        assert_eq!(
            vars.render("limit={page_size}&x={other}"),
            "limit=200&x={other}"
        );
        let body = json!({"limit": "{page_size}", "v": "{since_ms}", "inputs": "{ids_objects}"});
        assert_eq!(
            vars.render_json(&body),
            json!({"limit": 200, "v": "1767225600000", "inputs": [{"id": "1"}]})
        );
        assert_eq!(unknown_placeholders("a {since} {nope} {}"), vec!["nope"]);
        assert_eq!(
            vars.render("é{page_size}ü{é}€{"),
            "é200ü{é}€{",
            "multi-byte text around placeholders"
        );
        assert_eq!(unknown_placeholders("é{ü}{nope}€{"), vec!["nope"]);
    }
}
