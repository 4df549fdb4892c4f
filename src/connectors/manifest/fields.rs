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
            Value::Array(items) => array_index(step).and_then(|at| items.get(at)),
            _ => None,
        })
}

/// A pointer step as an array index: as RFC 6901 says, decimal digits without a
/// leading zero (and no sign, which `usize::from_str` would take).
pub fn array_index(step: &str) -> Option<usize> {
    let digits = !step.is_empty() && step.bytes().all(|byte| byte.is_ascii_digit());
    if !digits || (step.len() > 1 && step.starts_with('0')) {
        return None;
    }
    step.parse().ok()
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
    fn a_signed_array_index_names_no_element() {
        // Found by `proptests::lookup_agrees_with_serde_json_on_every_pointer`:
        // `usize::from_str` takes a leading `+`, RFC 6901 does not.
        let record = json!({"list": [10, 20]});
        for pointer in ["/list/+0", "/list/+1", "/list/-1", "/list/ 1"] {
            assert_eq!(lookup(&record, pointer), None, "{pointer}");
            assert_eq!(record.pointer(pointer), None, "{pointer}");
        }
        assert_eq!(lookup(&record, "/list/1"), Some(&json!(20)));
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

#[cfg(test)]
pub(crate) mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Object keys that collide with pointer syntax (`~`, `/`, digits, `+`) now and then.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof!["[ab0-2+~/]{0,3}", ".{0,4}"]
    }

    /// Any JSON value a few levels deep; numbers are finite, as JSON's are.
    pub(crate) fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON numbers are finite", |n| n.is_finite())
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Every pointer that names a value inside `value`, the root (`""`) included.
    pub(crate) fn pointers(value: &Value) -> Vec<String> {
        fn walk(value: &Value, at: &str, out: &mut Vec<String>) {
            out.push(at.to_owned());
            match value {
                Value::Object(map) => {
                    for (key, child) in map {
                        let step = key.replace('~', "~0").replace('/', "~1");
                        walk(child, &format!("{at}/{step}"), out);
                    }
                }
                Value::Array(items) => {
                    for (index, child) in items.iter().enumerate() {
                        walk(child, &format!("{at}/{index}"), out);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(value, "", &mut out);
        out
    }

    /// A value and pointers into it: some that name a value, some one step beyond or
    /// beside one, some of any text.
    pub(crate) fn value_and_pointers() -> impl Strategy<Value = (Value, Vec<String>)> {
        json_value().prop_flat_map(|value| {
            let real = pointers(&value);
            let near = (prop::sample::select(real.clone()), key())
                .prop_map(|(pointer, step)| format!("{pointer}/{step}"));
            let any_text = prop_oneof!["(/[ab0-2+~/]{0,3}){0,4}", ".{0,10}"];
            let pointer = prop_oneof![prop::sample::select(real), near, any_text];
            (Just(value), prop::collection::vec(pointer, 0..12))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn no_text_panics_the_timestamp_date_or_boolean_parsers(text in any::<String>()) {
            let _ = parse_timestamp(&text);
            let _ = parse_date(&text);
            let _ = parse_bool(&text);
            let _ = crate::connectors::ecommerce::time(Some(&Value::String(text)));
        }

        #[test]
        fn no_timestamp_shaped_text_panics_the_parsers(
            text in "[0-9]{1,24}|[+-]?[0-9]{1,6}-[0-9]{1,3}-[0-9]{1,3}([T ][0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:?[0-9]{2})?)?",
            seconds in any::<i64>(),
        ) {
            let _ = parse_timestamp(&text);
            let _ = parse_date(&text);
            let _ = crate::connectors::ecommerce::time(Some(&Value::String(text)));
            let _ = crate::connectors::ecommerce::time(Some(&Value::from(seconds)));
        }

        #[test]
        fn every_instant_reads_back_from_each_shape_vendors_send(
            millis in 0i64..253_402_300_800_000,
        ) {
            let at = Utc.timestamp_millis_opt(millis).single().expect("in chrono's range");
            let rfc3339 = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            prop_assert_eq!(parse_timestamp(&rfc3339), Some(at));
            let offset = at
                .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap())
                .format("%Y-%m-%dT%H:%M:%S%.3f%z")
                .to_string();
            prop_assert_eq!(parse_timestamp(&offset), Some(at));
            let naive = at.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
            prop_assert_eq!(parse_timestamp(&naive), Some(at));
            prop_assert_eq!(parse_timestamp(&millis.to_string()), Some(at));
            prop_assert_eq!(parse_date(&rfc3339), Some(at.date_naive()));
        }

        #[test]
        fn lookup_agrees_with_serde_json_on_every_pointer(
            (value, pointers) in value_and_pointers(),
        ) {
            for pointer in &pointers {
                prop_assert_eq!(lookup(&value, pointer), value.pointer(pointer), "{:?}", pointer);
            }
        }

        #[test]
        fn no_path_panics_a_field_read(
            (value, pointers) in value_and_pointers(),
            enrichment in json_value(),
            path in any::<String>(),
        ) {
            let enriched = HashMap::from([("person".to_owned(), enrichment)]);
            let scope = Scope::new(&value, &enriched);
            for path in pointers.iter().chain([&path, &format!("@person{path}")]) {
                let _ = scope.get(path);
                let _ = check_path(path);
                let spec = FieldSpec::Path(path.clone());
                let _ = string(&spec, &scope);
                let _ = timestamp(&spec, &scope);
                let _ = date(&spec, &scope);
                let _ = boolean(&spec, &scope);
            }
        }
    }
}
