//! Reading values out of source records: JSON pointers (optionally into an
//! enrichment, `@name/pointer`) and the typed conversions a manifest names.
//!
//! Pure functions, no IO. A value that is present but does not convert is an error
//! (the record is quarantined); a value that is absent is `None`.

use super::schema::{FieldSpec, FieldType};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;
use std::collections::HashMap;

/// A record and what the enrichments found for it.
pub struct Scope<'a> {
    pub record: &'a Value,
    pub enriched: &'a HashMap<String, Value>,
}

impl<'a> Scope<'a> {
    pub fn new(record: &'a Value, enriched: &'a HashMap<String, Value>) -> Self {
        Scope { record, enriched }
    }

    /// The value at `path`: a JSON pointer into the record, or `@name/pointer` into
    /// an enrichment. `null` and `""` count as absent.
    pub fn get(&self, path: &str) -> Option<&'a Value> {
        let value = if let Some(rest) = path.strip_prefix('@') {
            let (name, pointer) = rest.split_once('/').map_or((rest, ""), |(n, p)| (n, p));
            let base = self.enriched.get(name)?;
            if pointer.is_empty() {
                Some(base)
            } else {
                walk(base, pointer)
            }
        } else {
            lookup(self.record, path)
        }?;
        match value {
            Value::Null => None,
            Value::String(text) if text.is_empty() => None,
            other => Some(other),
        }
    }
}

/// [`Value::pointer`] without an allocation per step (field mapping runs it for every
/// field of every record); pointers with `~` escapes take the general path.
pub fn lookup<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    match pointer.strip_prefix('/') {
        _ if pointer.is_empty() => Some(value),
        Some(rest) => walk(value, rest),
        None => None,
    }
}

/// Follows `a/b/0` (a pointer without its leading `/`) from `value`.
fn walk<'a>(value: &'a Value, steps: &str) -> Option<&'a Value> {
    if steps.contains('~') {
        return value.pointer(&format!("/{steps}"));
    }
    steps
        .split('/')
        .try_fold(value, |target, step| match target {
            Value::Object(map) => map.get(step),
            Value::Array(items) => {
                // As RFC 6901: a decimal index without a leading zero.
                if step.is_empty() || (step.len() > 1 && step.starts_with('0')) {
                    return None;
                }
                step.parse::<usize>().ok().and_then(|at| items.get(at))
            }
            _ => None,
        })
}

/// The text of a scalar: strings as they are, numbers and booleans as JSON writes them.
pub fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// What a field spec resolved to, before its type conversion.
fn raw_text(spec: &FieldSpec, scope: &Scope) -> Result<Option<String>, String> {
    match spec {
        FieldSpec::Path(path) => scope
            .get(path)
            .map(|value| text_of(value).ok_or_else(|| format!("{path}: expected a scalar value")))
            .transpose(),
        FieldSpec::Full(table) => {
            if let Some(constant) = &table.value {
                return Ok(Some(constant.clone()));
            }
            let paths = table.path.iter().chain(table.paths.iter());
            if let Some(separator) = &table.join {
                let parts: Vec<String> = paths
                    .filter_map(|path| scope.get(path).and_then(text_of))
                    .filter(|text| !text.trim().is_empty())
                    .collect();
                return Ok((!parts.is_empty())
                    .then(|| parts.join(separator))
                    .or_else(|| table.default.clone()));
            }
            for path in paths {
                if let Some(value) = scope.get(path) {
                    return text_of(value)
                        .map(Some)
                        .ok_or_else(|| format!("{path}: expected a scalar value"));
                }
            }
            Ok(table.default.clone())
        }
    }
}

fn kind_of(spec: &FieldSpec) -> FieldType {
    match spec {
        FieldSpec::Path(_) => FieldType::String,
        FieldSpec::Full(table) => table.kind,
    }
}

fn describe(spec: &FieldSpec) -> String {
    match spec {
        FieldSpec::Path(path) => path.clone(),
        FieldSpec::Full(table) => table
            .path
            .clone()
            .or_else(|| table.paths.first().cloned())
            .unwrap_or_else(|| "value".to_owned()),
    }
}

/// A text field (type `string` or `enum`).
pub fn string(spec: &FieldSpec, scope: &Scope) -> Result<Option<String>, String> {
    let text = raw_text(spec, scope)?;
    match (kind_of(spec), spec) {
        (FieldType::Enum, FieldSpec::Full(table)) => match text {
            None => Ok(None),
            Some(text) => table
                .map
                .get(&text)
                .cloned()
                .map(Some)
                .ok_or_else(|| format!("{}: unexpected value {text:?}", describe(spec))),
        },
        _ => Ok(text),
    }
}

/// A timestamp field.
pub fn timestamp(spec: &FieldSpec, scope: &Scope) -> Result<Option<DateTime<Utc>>, String> {
    match raw_text(spec, scope)? {
        None => Ok(None),
        Some(text) => parse_timestamp(&text)
            .map(Some)
            .ok_or_else(|| format!("{}: not a timestamp: {text:?}", describe(spec))),
    }
}

/// A date field.
pub fn date(spec: &FieldSpec, scope: &Scope) -> Result<Option<NaiveDate>, String> {
    match raw_text(spec, scope)? {
        None => Ok(None),
        Some(text) => parse_date(&text)
            .map(Some)
            .ok_or_else(|| format!("{}: not a date: {text:?}", describe(spec))),
    }
}

/// Marketing consent: `Some(true)` or `Some(false)` when the source says so; `None`
/// (no consent) when it says nothing, or something the field does not name (an `enum`
/// value missing from the map, a text that is no boolean). Never an error: a consent
/// value the manifest does not know must not quarantine the deal, only withhold mail.
pub fn consent(spec: &FieldSpec, scope: &Scope) -> Option<bool> {
    let text = raw_text(spec, scope).ok()??;
    let text = match (kind_of(spec), spec) {
        (FieldType::Enum, FieldSpec::Full(table)) => table.map.get(&text)?.clone(),
        _ => text,
    };
    parse_bool(&text)
}

/// An integer amount in minor units, as a JSON number or numeric text (`12400`,
/// `"12400"`, `-50`); a fraction or anything else is `None`.
pub fn parse_minor_units(text: &str) -> Option<i64> {
    let text = text.trim();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A boolean field; absent is `None`.
pub fn boolean(spec: &FieldSpec, scope: &Scope) -> Result<Option<bool>, String> {
    match raw_text(spec, scope)? {
        None => Ok(None),
        Some(text) => parse_bool(&text)
            .map(Some)
            .ok_or_else(|| format!("{}: not a boolean: {text:?}", describe(spec))),
    }
}

/// Parses the timestamp shapes vendors send: RFC 3339 with any offset (`Z`, `+00:00`,
/// `+0000`), `YYYY-MM-DD HH:MM:SS` (UTC), a bare date (midnight UTC), and epoch
/// milliseconds as a number or numeric text.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let millis: i64 = text.parse().ok()?;
        return Utc.timestamp_millis_opt(millis).single();
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(at) = DateTime::parse_from_str(text, format) {
            return Some(at.with_timezone(&Utc));
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Some(at.and_utc());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|at| at.and_utc())
}

/// `YYYY-MM-DD`, or the UTC date of a timestamp.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .ok()
        .or_else(|| parse_timestamp(text).map(|at| at.date_naive()))
}

pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// Checks a manifest path: a JSON pointer (`""` or starting with `/`) or `@name/…`.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') {
        return Ok(());
    }
    if let Some(rest) = path.strip_prefix('@')
        && !rest.is_empty()
        && !rest.starts_with('/')
    {
        return Ok(());
    }
    Err(format!(
        "{path:?} is not a JSON pointer (\"/a/b\") or an enrichment path (\"@name/a\")"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::manifest::schema::FieldTable;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn table(path: &str, kind: FieldType) -> FieldSpec {
        FieldSpec::Full(FieldTable {
            path: Some(path.to_owned()),
            paths: Vec::new(),
            value: None,
            kind,
            default: None,
            map: BTreeMap::new(),
            join: None,
        })
    }

    #[test]
    fn timestamps_in_every_vendor_shape_parse_to_the_same_instant() {
        let expected = Utc.with_ymd_and_hms(2026, 1, 12, 10, 0, 0).unwrap();
        for text in [
            "2026-01-12T10:00:00Z",
            "2026-01-12T10:00:00.000Z",
            "2026-01-12T10:00:00.000+0000",
            "2026-01-12T11:00:00+01:00",
            "2026-01-12 10:00:00",
            "1768212000000",
        ] {
            assert_eq!(parse_timestamp(text), Some(expected), "{text}");
        }
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(
            parse_date("2026-03-31"),
            NaiveDate::from_ymd_opt(2026, 3, 31)
        );
    }

    #[test]
    fn enrichment_paths_read_from_the_named_enrichment_and_empty_counts_as_absent() {
        let record = json!({"id": 7, "name": "", "n": 4200.5});
        let mut enriched = HashMap::new();
        enriched.insert(
            "contact".to_owned(),
            json!({"properties": {"email": "a@b.example"}}),
        );
        let scope = Scope::new(&record, &enriched);
        assert_eq!(
            scope.get("@contact/properties/email"),
            Some(&json!("a@b.example"))
        );
        assert_eq!(scope.get("/name"), None);
        assert_eq!(
            string(&FieldSpec::Path("/id".into()), &scope).unwrap(),
            Some("7".into())
        );
        assert_eq!(
            string(&FieldSpec::Path("/n".into()), &scope).unwrap(),
            Some("4200.5".into())
        );
    }

    #[test]
    fn lookup_follows_pointers_like_serde_json_does() {
        let record = json!({"a": {"b": [10, {"c": "x"}], "d/e": 1, "": 2}, "n": null});
        for pointer in [
            "",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c",
            "/a/b/01",
            "/a/b/9",
            "/a/d~1e",
            "/a/",
            "/n",
            "/missing/x",
            "a",
        ] {
            assert_eq!(
                lookup(&record, pointer),
                record.pointer(pointer),
                "{pointer}"
            );
        }
    }

    #[test]
    fn a_present_value_that_does_not_convert_is_an_error_naming_the_path() {
        let record = json!({"t": "soon", "flag": "maybe", "s": "weird"});
        let enriched = HashMap::new();
        let scope = Scope::new(&record, &enriched);
        let error = timestamp(&table("/t", FieldType::Timestamp), &scope).unwrap_err();
        assert!(error.contains("/t"), "{error}");
        assert!(boolean(&table("/flag", FieldType::Bool), &scope).is_err());
        let mut spec = table("/s", FieldType::Enum);
        if let FieldSpec::Full(table) = &mut spec {
            table.map.insert("won".into(), "won".into());
        }
        assert!(string(&spec, &scope).is_err());
        assert_eq!(
            timestamp(&table("/missing", FieldType::Timestamp), &scope).unwrap(),
            None
        );
    }
}
