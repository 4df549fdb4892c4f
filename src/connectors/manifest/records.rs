//! Reading a page of records without building a tree of every record.
//!
//! A list page is split once: the body around the records (paging fields) is parsed
//! into a `Value`, and each record is kept as its own JSON text ([`RawRecord`]), the
//! bytes the vendor sent. The field mapping then parses each record again, keeping
//! only the values at the pointers the manifest reads ([`Plan`]); everything else is
//! skipped without allocating. The stored raw record is the vendor's text, unchanged.
//!
//! Invariants:
//! - A pointer of the plan resolves in the pruned record to the same value as in the
//!   full record; pointers outside the plan may not (skipped values read as absent).
//! - The records are exactly the elements of the array at the manifest's pointer, in
//!   order; a body that is not JSON is an error, never an empty page.

use super::fields::array_index;
use crate::domain::RawRecord;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use std::fmt;

/// The values a field mapping reads from a record: a tree of object keys (array
/// indexes as decimal keys) built from JSON pointers.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    root: Node,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Keep the whole value.
    Whole,
    /// Keep only these members (object keys, or array indexes as text).
    Some(Vec<(String, Node)>),
}

impl Plan {
    /// A plan keeping the values at `pointers` (RFC 6901; `""` keeps everything).
    /// Pointers that do not start with `/` (enrichment paths) are ignored.
    pub fn new<'a>(pointers: impl IntoIterator<Item = &'a str>) -> Plan {
        let mut root = Node::Some(Vec::new());
        for pointer in pointers {
            if pointer.is_empty() {
                root = Node::Whole;
            } else if let Some(rest) = pointer.strip_prefix('/') {
                let steps: Vec<String> = rest.split('/').map(unescape).collect();
                root.keep(&steps);
            }
        }
        Plan { root }
    }

    /// Parses one record, keeping only the plan's values. Objects keep the planned
    /// keys they have; arrays keep their elements up to the last planned index (the
    /// ones before it that are not planned read as `null`); a scalar where the plan
    /// expects members reads as `null`.
    pub fn prune(&self, text: &str) -> Result<Value, serde_json::Error> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let value = Prune(&self.root).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(value)
    }
}

impl Node {
    /// Keeps the value at `steps` below this node.
    fn keep(&mut self, steps: &[String]) {
        let Node::Some(children) = self else {
            // Kept whole already.
            return;
        };
        let Some((step, rest)) = steps.split_first() else {
            *self = Node::Whole;
            return;
        };
        match children.iter_mut().find(|(name, _)| name == step) {
            Some((_, child)) => child.keep(rest),
            None => {
                let mut child = Node::Some(Vec::new());
                child.keep(rest);
                children.push((step.clone(), child));
            }
        }
    }
}

/// A pointer step with its `~1` and `~0` escapes undone.
fn unescape(step: &str) -> String {
    step.replace("~1", "/").replace("~0", "~")
}

struct Prune<'p>(&'p Node);

impl<'de> DeserializeSeed<'de> for Prune<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.0 {
            Node::Whole => serde::Deserialize::deserialize(deserializer),
            Node::Some(children) => deserializer.deserialize_any(PruneVisitor(children)),
        }
    }
}

struct PruneVisitor<'p>(&'p [(String, Node)]);

/// Finds an object key among the planned ones without allocating it.
struct KeySeed<'p>(&'p [(String, Node)]);

impl<'de, 'p> DeserializeSeed<'de> for KeySeed<'p> {
    type Value = Option<&'p (String, Node)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'p> Visitor<'de> for KeySeed<'p> {
    type Value = Option<&'p (String, Node)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|(name, _)| name == key))
    }
}

impl<'de> Visitor<'de> for PruneVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = serde_json::Map::new();
        while let Some(planned) = map.next_key_seed(KeySeed(self.0))? {
            match planned {
                Some((name, node)) => {
                    let value = map.next_value_seed(Prune(node))?;
                    kept.insert(name.clone(), value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let planned = |index: usize| {
            self.0
                .iter()
                .find(|(name, _)| array_index(name) == Some(index))
                .map(|(_, node)| node)
        };
        let last = self
            .0
            .iter()
            .filter_map(|(name, _)| array_index(name))
            .max();
        let mut kept = Vec::new();
        let mut index = 0;
        loop {
            if last.is_some_and(|last| index <= last) {
                let element = match planned(index) {
                    Some(node) => seq.next_element_seed(Prune(node))?,
                    None => seq.next_element::<IgnoredAny>()?.map(|_| Value::Null),
                };
                match element {
                    Some(value) => kept.push(value),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(Value::Array(kept))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// Why a page's records could not be read.
#[derive(Debug)]
pub enum SplitError {
    /// The body is not JSON.
    Json(serde_json::Error),
    /// The value at the records pointer is neither an array nor absent.
    NotAnArray,
}

impl From<serde_json::Error> for SplitError {
    fn from(error: serde_json::Error) -> Self {
        SplitError::Json(error)
    }
}

/// A page body split into the part around the records and the records' text.
#[derive(Debug)]
pub struct SplitPage {
    /// The body with the records' array replaced by `null`.
    pub body: Value,
    pub records: Vec<RawRecord>,
}

/// Splits a page body at the records pointer. `""` means the body itself: an array
/// of records, one record (an object), or none (`null`).
pub fn split_page(body: &[u8], pointer: &str) -> Result<SplitPage, SplitError> {
    if pointer.is_empty() {
        let whole: Box<RawValue> = serde_json::from_slice(body)?;
        let text = whole.get().trim_start();
        let records = if text.starts_with('[') {
            serde_json::from_str::<Vec<Box<RawValue>>>(text)?
                .into_iter()
                .map(RawRecord::from_raw)
                .collect()
        } else if text.starts_with('{') {
            vec![RawRecord::from_raw(whole)]
        } else if text == "null" {
            Vec::new()
        } else {
            return Err(SplitError::NotAnArray);
        };
        return Ok(SplitPage {
            body: Value::Null,
            records,
        });
    }
    let steps: Vec<String> = pointer
        .strip_prefix('/')
        .unwrap_or(pointer)
        .split('/')
        .map(unescape)
        .collect();
    let mut found = Found::Missing;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let skeleton = Split {
        steps: &steps,
        found: &mut found,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    match found {
        Found::Missing => Ok(SplitPage {
            body: skeleton,
            records: Vec::new(),
        }),
        Found::Records(records) => Ok(SplitPage {
            body: skeleton,
            records: records.into_iter().map(RawRecord::from_raw).collect(),
        }),
        Found::NotAnArray => Err(SplitError::NotAnArray),
    }
}

enum Found {
    /// Nothing (or `null`) at the pointer.
    Missing,
    Records(Vec<Box<RawValue>>),
    NotAnArray,
}

/// Parses a body into a `Value`, except at the end of `steps`, whose array's elements
/// are kept as text in `found`.
struct Split<'s, 'f> {
    steps: &'s [String],
    found: &'f mut Found,
}

impl<'de> DeserializeSeed<'de> for Split<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Split<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Some((step, rest)) = self.steps.split_first() else {
            // The records pointer names an object: not a list of records.
            *self.found = Found::NotAnArray;
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Value::Null);
        };
        let mut kept = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if key == *step {
                map.next_value_seed(Split {
                    steps: rest,
                    found: &mut *self.found,
                })?
            } else {
                map.next_value::<Value>()?
            };
            kept.insert(key, value);
        }
        Ok(Value::Object(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let Some((step, rest)) = self.steps.split_first() else {
            let mut records = Vec::new();
            while let Some(record) = seq.next_element::<Box<RawValue>>()? {
                records.push(record);
            }
            *self.found = Found::Records(records);
            return Ok(Value::Null);
        };
        let wanted = array_index(step);
        let mut kept = Vec::new();
        let mut index = 0;
        loop {
            let element = if Some(index) == wanted {
                seq.next_element_seed(Split {
                    steps: rest,
                    found: &mut *self.found,
                })?
            } else {
                seq.next_element::<Value>()?
            };
            match element {
                Some(value) => kept.push(value),
                None => break,
            }
            index += 1;
        }
        Ok(Value::Array(kept))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        self.scalar(Value::Bool(value))
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        self.scalar(Value::from(value))
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        self.scalar(Value::from(value))
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        self.scalar(Value::from(value))
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        self.scalar(Value::String(value.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        // `null` at the pointer: no records.
        Ok(Value::Null)
    }
}

impl Split<'_, '_> {
    /// A scalar on the way: nothing is below it; one at the pointer is not a list.
    fn scalar<E>(self, value: Value) -> Result<Value, E> {
        if self.steps.is_empty() {
            *self.found = Found::NotAnArray;
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::manifest::fields::lookup;
    use serde_json::json;

    const PAGE: &str = r#"{"results":[
        {"id":"1","properties":{"dealname":"A \"quoted\" deal","amount":"10.50","x":{"deep":[1,2]}},
         "associations":{"contacts":{"results":[{"id":"901","type":"deal_to_contact"}]}},"archived":false},
        {"id":"2","properties":{"dealname":"B","amount":null},"archived":true},
        "not an object"
      ],
      "paging":{"next":{"after":"2","link":"https://x.example/next"}}}"#;

    #[test]
    fn a_page_splits_into_the_vendors_record_text_and_the_paging_body() {
        let page = split_page(PAGE.as_bytes(), "/results").unwrap();
        assert_eq!(page.records.len(), 3);
        let first = page.records[0].as_str();
        assert!(first.starts_with(r#"{"id":"1","properties":{"dealname":"A \"quoted\" deal""#));
        assert!(
            PAGE.contains(first),
            "the record's text is a slice of the page"
        );
        assert_eq!(
            page.records[1].as_str(),
            r#"{"id":"2","properties":{"dealname":"B","amount":null},"archived":true}"#
        );
        assert_eq!(page.records[2].as_str(), r#""not an object""#);
        assert_eq!(lookup(&page.body, "/paging/next/after"), Some(&json!("2")));
        assert_eq!(page.body["results"], Value::Null);
    }

    #[test]
    fn pages_without_records_and_pages_of_the_wrong_shape_are_told_apart() {
        for (body, pointer) in [
            (r#"{"paging":{}}"#, "/results"),
            (r#"{"results":null}"#, "/results"),
            (r#"{"data":{"items":null}}"#, "/data/items"),
            ("null", ""),
            ("[]", ""),
        ] {
            let page = split_page(body.as_bytes(), pointer).unwrap();
            assert!(page.records.is_empty(), "{body}");
        }
        let nested = split_page(
            br#"{"data":[{"items":[{"id":1},{"id":2}]}],"more":true}"#,
            "/data/0/items",
        )
        .unwrap();
        assert_eq!(nested.records.len(), 2);
        assert_eq!(nested.body["more"], json!(true));
        // A signed index names no element, as in `fields::lookup`.
        let page = br#"{"data":[[{"id":1}]]}"#;
        assert_eq!(split_page(page, "/data/0").unwrap().records.len(), 1);
        assert!(split_page(page, "/data/+0").unwrap().records.is_empty());
        let top = split_page(br#"[{"id":1}, {"id":2}]"#, "").unwrap();
        assert_eq!(top.records[1].as_str(), r#"{"id":2}"#);
        let one = split_page(br#"{"id":1}"#, "").unwrap();
        assert_eq!(one.records[0].as_str(), r#"{"id":1}"#);
        assert!(matches!(
            split_page(br#"{"results":{"id":1}}"#, "/results"),
            Err(SplitError::NotAnArray)
        ));
        assert!(matches!(
            split_page(br#"{"results":"x"}"#, "/results"),
            Err(SplitError::NotAnArray)
        ));
        assert!(matches!(
            split_page(br#"{"results":[{"id":1}"#, "/results"),
            Err(SplitError::Json(_))
        ));
        assert!(matches!(
            split_page(b"<html>", "/results"),
            Err(SplitError::Json(_))
        ));
    }

    #[test]
    fn a_pruned_record_answers_every_planned_pointer_like_the_full_record() {
        let record = json!({
            "id": 7,
            "properties": {"dealname": "A", "amount": "1.5", "n": null, "a/b": "slash", "t~": "tilde", "other": [1, 2]},
            "associations": {"contacts": {"results": [{"id": "901"}, {"id": "902"}]}},
            "list": [[0, 1], {"x": "y"}, 3],
            "scalar": "text",
            "archived": false
        });
        let pointers = [
            "/id",
            "/properties/dealname",
            "/properties/amount",
            "/properties/n",
            "/properties/missing",
            "/properties/a~1b",
            "/properties/t~0",
            "/associations/contacts/results/1/id",
            "/associations/contacts/results/5/id",
            "/list/1/x",
            "/list/0",
            "/list/01",
            "/scalar/x",
            "/archived",
            "@contact/properties/email",
        ];
        let plan = Plan::new(pointers);
        let text = serde_json::to_string(&record).unwrap();
        let pruned = plan.prune(&text).unwrap();
        for pointer in pointers.iter().filter(|p| p.starts_with('/')) {
            assert_eq!(
                lookup(&pruned, pointer),
                lookup(&record, pointer),
                "{pointer}"
            );
        }
        assert_eq!(
            lookup(&pruned, "/properties/other"),
            None,
            "unplanned values are skipped"
        );
        assert_eq!(Plan::new([""]).prune(&text).unwrap(), record);
        assert_eq!(
            Plan::new(["/id"]).prune(r#""a string""#).unwrap(),
            Value::Null
        );
        assert!(Plan::new(["/id"]).prune(r#"{"id": 1} x"#).is_err());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::connectors::manifest::fields::lookup;
    use crate::connectors::manifest::fields::proptests::{json_value, value_and_pointers};
    use proptest::prelude::*;
    use serde_json::json;

    /// A pointer step that names `key`: `~` and `/` escaped.
    fn escape(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn no_bytes_panic_the_page_splitter(
            body in prop::collection::vec(any::<u8>(), 0..256),
            pointer in prop_oneof!["(/[a-c0-2+~/]{0,3}){0,3}", ".{0,8}"],
        ) {
            let _ = split_page(&body, &pointer);
            if let Ok(text) = std::str::from_utf8(&body) {
                let _ = Plan::new([pointer.as_str()]).prune(text);
            }
        }

        #[test]
        fn no_json_page_panics_the_splitter((value, pointers) in value_and_pointers()) {
            let body = serde_json::to_vec(&value).unwrap();
            for pointer in &pointers {
                let _ = split_page(&body, pointer);
            }
        }

        #[test]
        fn each_split_record_is_the_text_of_its_record(
            records in prop::collection::vec(json_value(), 0..8),
            key in "[a-c~/]{1,4}",
            pretty in any::<bool>(),
        ) {
            let page = json!({"page": {key.clone(): records.clone(), "more": true}, "next": "n-2"});
            let body = if pretty {
                serde_json::to_vec_pretty(&page).unwrap()
            } else {
                serde_json::to_vec(&page).unwrap()
            };
            let split = split_page(&body, &format!("/page/{}", escape(&key))).unwrap();
            let texts: Vec<Value> = split
                .records
                .iter()
                .map(|record| serde_json::from_str(record.as_str()).expect("a record's text is JSON"))
                .collect();
            // Numbers compare as JSON reads them, so parse the page's own text once.
            let full: Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(&Value::Array(texts), &full["page"][&key]);
            prop_assert_eq!(&split.body["next"], &json!("n-2"));
            prop_assert_eq!(&split.body["page"]["more"], &json!(true));
            prop_assert_eq!(&split.body["page"][&key], &Value::Null);
        }

        #[test]
        fn a_pruned_record_answers_each_planned_pointer_like_the_full_record(
            (value, pointers) in value_and_pointers(),
        ) {
            let text = serde_json::to_string(&value).unwrap();
            let full: Value = serde_json::from_str(&text).unwrap();
            let plan = Plan::new(pointers.iter().map(String::as_str));
            let pruned = plan.prune(&text).unwrap();
            for pointer in pointers.iter().filter(|p| p.is_empty() || p.starts_with('/')) {
                prop_assert_eq!(lookup(&pruned, pointer), lookup(&full, pointer), "{:?}", pointer);
            }
        }
    }
}
