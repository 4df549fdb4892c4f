//! [`RawRecord`]: a source record kept as the JSON text the source sent.
//!
//! A pull sync never needs the record as a tree: it reads a few fields by JSON pointer
//! and stores the rest verbatim. Keeping the text avoids building a `serde_json::Value`
//! per record (one allocation per key and string) and serializing it again for the
//! store, and what is stored is byte for byte what the vendor sent.
//!
//! Invariant: the text is one valid JSON value (checked when built).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

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
