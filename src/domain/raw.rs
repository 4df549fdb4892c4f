//! [`RawRecord`]: a source record kept as the JSON text the source sent.
//!
//! A pull sync never needs the record as a tree: it reads a few fields by JSON pointer
//! and stores the rest verbatim. Keeping the text avoids building a `serde_json::Value`
//! per record (one allocation per key and string) and serializing it again for the
//! store, and what is stored is byte for byte what the vendor sent.
//!
//! Invariant: the text is one valid JSON value (checked when built).
//!
//! Depth: JSON nested [`MAX_DEPTH`] levels deep or more is refused at intake (a pulled
//! record is quarantined, a webhook body dead-lettered) by [`check_depth`], a scan of
//! the bytes that builds nothing, so the parse that reads a stored record back (whose
//! recursion limit is the same 128) never fails on what was stored.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// Nesting of arrays and objects at which JSON is refused: serde_json's recursion
/// limit, which parses a stored record back, accepts 127 levels and no more.
pub const MAX_DEPTH: usize = 128;

/// JSON nested [`MAX_DEPTH`] levels deep or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("JSON nested {MAX_DEPTH} or more levels deep (the limit is {MAX_DEPTH})")]
pub struct TooDeep;

/// Checks that the arrays and objects of `json` nest less than [`MAX_DEPTH`] levels deep,
/// counting brackets outside strings in one pass, without parsing (so it cannot itself
/// recurse or allocate). It does not check that `json` is valid JSON.
pub fn check_depth(json: &[u8]) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth >= MAX_DEPTH {
                    return Err(TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A source record as JSON text, verbatim; `null` when the source sent none.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawRecord(Box<RawValue>);

impl RawRecord {
    /// The JSON `null`: a record built by hand, with no source text.
    pub fn null() -> Self {
        RawRecord(RawValue::NULL.to_owned())
    }

    /// Takes JSON text as it is, after checking that it is one JSON value.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(RawRecord)
    }

    /// Wraps text a JSON parser already delimited (a record sliced out of a page).
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        RawRecord(raw)
    }

    /// Serializes a parsed record, for sources whose records arrive as trees
    /// (webhook payloads read field by field).
    pub fn from_value(value: &serde_json::Value) -> Self {
        // A `Value` always serializes: its map keys are strings.
        RawRecord(serde_json::value::to_raw_value(value).expect("a JSON value serializes"))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The record as a tree (tests and rare paths; the sync does not need it).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }
}

impl Default for RawRecord {
    fn default() -> Self {
        RawRecord::null()
    }
}

impl PartialEq for RawRecord {
    /// Equal text: two records that differ only in key order or spacing are different
    /// records, as the store sees them.
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for RawRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&serde_json::Value> for RawRecord {
    fn from(value: &serde_json::Value) -> Self {
        RawRecord::from_value(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_counted_outside_strings_and_matches_what_serde_json_reads_back() {
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        for levels in [0, 1, 2, 64, MAX_DEPTH - 1] {
            let text = nested(levels);
            assert_eq!(check_depth(text.as_bytes()), Ok(()), "{levels}");
            if levels > 0 {
                serde_json::from_str::<serde_json::Value>(&text).expect("readable back");
            }
        }
        for levels in [MAX_DEPTH, MAX_DEPTH + 1, 200_000] {
            let text = nested(levels);
            assert_eq!(check_depth(text.as_bytes()), Err(TooDeep), "{levels}");
        }
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH)).is_err());
        // Brackets inside strings, escaped quotes and backslashes do not count.
        let quoted = format!(r#"{{"a": "{}\"\\", "b": [1]}}"#, "[{".repeat(MAX_DEPTH));
        assert_eq!(check_depth(quoted.as_bytes()), Ok(()), "{quoted}");
        let objects = format!("{}1{}", r#"{"k":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert_eq!(check_depth(objects.as_bytes()), Err(TooDeep));
        // Siblings do not add up.
        let wide = format!("[{}]", vec![nested(MAX_DEPTH - 2); 1000].join(","));
        assert_eq!(check_depth(wide.as_bytes()), Ok(()));
    }

    #[test]
    fn text_is_kept_byte_for_byte_and_invalid_text_is_refused() {
        let text = r#"{ "id": "7",  "b": 1, "a": "é\u00e9" }"#;
        let raw = RawRecord::from_text(text.to_owned()).unwrap();
        assert_eq!(raw.as_str(), text);
        assert_eq!(raw.to_value()["a"], "éé");
        assert!(RawRecord::from_text("{\"id\": ".to_owned()).is_err());
        assert_eq!(RawRecord::null().as_str(), "null");
        assert_eq!(
            RawRecord::from_value(&serde_json::json!({"b": 1, "a": 2})).as_str(),
            r#"{"a":2,"b":1}"#
        );
    }
}
