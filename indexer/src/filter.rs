//! Per-item metadata and the filters searches and listings take.
//!
//! Metadata is a JSON object stored with the item (in the WAL record and the committed
//! items file), bounded by [`MAX_METADATA_BYTES`] so one item cannot bloat every load.
//!
//! A filter is a JSON object whose keys are all ANDed:
//!
//! * `{"color": "red"}` — exact match (string, number or boolean);
//! * `{"color": ["red", "blue"]}` — any of the listed values;
//! * `{"price": {"gte": 10, "lt": 50}}` — numeric range (`gt`, `gte`, `lt`, `lte`).
//!
//! The key `label` means the item's label (which is why metadata may not hold a `label`
//! key: one name, one meaning). Any other key is looked up in the metadata; an item without
//! the key never matches. Where the item's value is an array (tags), a condition matches
//! when any element does, as in Qdrant's payload filters.

use serde_json::{Map, Value};

use crate::ItemMeta;

/// An item's metadata: a JSON object.
pub type Metadata = Map<String, Value>;

/// Largest accepted metadata, as compact JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Largest accepted filter, as sent.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// Most keys one filter may test.
pub const MAX_FILTER_KEYS: usize = 64;
/// Most values one any-of list may hold.
pub const MAX_ANY_OF: usize = 1024;
/// The filter key that means the item's label rather than a metadata key.
pub const LABEL_KEY: &str = "label";

/// A filter or metadata that cannot be used; the message says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FilterError {
    pub message: String,
    /// Refused for its size alone (an HTTP server answers 413 rather than 400).
    pub too_large: bool,
}

impl FilterError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            too_large: false,
        }
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError::new(msg))
}

fn too_large<T>(msg: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError {
        message: msg.into(),
        too_large: true,
    })
}

/// Checks that `value` can be stored as an item's metadata: a JSON object of at most
/// [`MAX_METADATA_BYTES`] compact bytes, without the reserved key `label`.
pub fn validate_metadata(value: Value) -> Result<Metadata, FilterError> {
    let Value::Object(map) = value else {
        return err(format!(
            "metadata must be a JSON object like {{\"price\": 12.5}}, got {}",
            kind(&value)
        ));
    };
    if map.contains_key(LABEL_KEY) {
        return err(
            "metadata may not hold the key 'label': the item's label is its own field (send it as 'label')",
        );
    }
    let bytes = serde_json::to_vec(&map)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > MAX_METADATA_BYTES {
        return too_large(format!(
            "metadata is {bytes} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
        ));
    }
    Ok(map)
}

/// Parses metadata sent as text (a form field, a JSONL line).
pub fn parse_metadata(text: &str) -> Result<Metadata, FilterError> {
    if text.len() > MAX_METADATA_BYTES * 2 {
        return too_large(format!(
            "metadata is {} bytes; the limit is {MAX_METADATA_BYTES} (as compact JSON)",
            text.len()
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FilterError::new(format!("metadata is not valid JSON: {e}")))?;
    validate_metadata(value)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A scalar a condition compares with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Str(String),
    Num(f64),
    Bool(bool),
}

impl Scalar {
    fn from_json(key: &str, v: &Value) -> Result<Self, FilterError> {
        match v {
            Value::String(s) => Ok(Scalar::Str(s.clone())),
            Value::Bool(b) => Ok(Scalar::Bool(*b)),
            Value::Number(n) => n.as_f64().map(Scalar::Num).ok_or_else(|| {
                FilterError::new(format!("filter '{key}': the number {n} is out of range"))
            }),
            other => err(format!(
                "filter '{key}': values must be strings, numbers or booleans, got {}",
                kind(other)
            )),
        }
    }

    fn equals(&self, v: &Value) -> bool {
        match (self, v) {
            (Scalar::Str(a), Value::String(b)) => a == b,
            (Scalar::Num(a), Value::Number(b)) => b.as_f64() == Some(*a),
            (Scalar::Bool(a), Value::Bool(b)) => a == b,
            _ => false,
        }
    }
}

/// Bounds of a numeric range; `None` = open.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Range {
    pub(crate) gt: Option<f64>,
    pub(crate) gte: Option<f64>,
    pub(crate) lt: Option<f64>,
    pub(crate) lte: Option<f64>,
}

impl Range {
    fn parse(key: &str, m: &Map<String, Value>) -> Result<Self, FilterError> {
        if m.is_empty() {
            return err(format!(
                "filter '{key}': a range needs at least one of gt, gte, lt, lte"
            ));
        }
        let mut r = Range::default();
        for (op, v) in m {
            let Some(x) = v.as_f64() else {
                return err(format!(
                    "filter '{key}': '{op}' must be a number, got {}",
                    kind(v)
                ));
            };
            let slot = match op.as_str() {
                "gt" => &mut r.gt,
                "gte" => &mut r.gte,
                "lt" => &mut r.lt,
                "lte" => &mut r.lte,
                _ => {
                    return err(format!(
                        "filter '{key}': unknown range operator '{op}'; use gt, gte, lt, lte"
                    ))
                }
            };
            *slot = Some(x);
        }
        Ok(r)
    }

    fn contains(&self, v: &Value) -> bool {
        let Some(x) = v.as_f64() else { return false };
        self.gt.is_none_or(|b| x > b)
            && self.gte.is_none_or(|b| x >= b)
            && self.lt.is_none_or(|b| x < b)
            && self.lte.is_none_or(|b| x <= b)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Condition {
    AnyOf(Vec<Scalar>),
    Range(Range),
}

impl Condition {
    /// True when `v` (or, for an array, one of its elements) satisfies the condition.
    fn matches(&self, v: &Value) -> bool {
        if let Value::Array(elems) = v {
            return elems.iter().any(|e| self.matches_scalar(e));
        }
        self.matches_scalar(v)
    }

    fn matches_scalar(&self, v: &Value) -> bool {
        match self {
            Condition::AnyOf(options) => options.iter().any(|o| o.equals(v)),
            Condition::Range(r) => r.contains(v),
        }
    }
}

/// A parsed filter: every condition must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    conditions: Vec<(String, Condition)>,
}

impl Filter {
    /// Parses a filter sent as JSON text (see the module docs for the grammar).
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        if text.len() > MAX_FILTER_BYTES {
            return too_large(format!(
                "the filter is {} bytes; the limit is {MAX_FILTER_BYTES}",
                text.len()
            ));
        }
        let value: Value = serde_json::from_str(text).map_err(|e| {
            FilterError::new(format!(
                "the filter is not valid JSON ({e}); send an object like {{\"label\": \"shoe\"}}"
            ))
        })?;
        Self::from_json(&value)
    }

    /// Parses a filter already read as JSON.
    pub fn from_json(value: &Value) -> Result<Self, FilterError> {
        let Value::Object(map) = value else {
            return err(format!(
                "the filter must be a JSON object like {{\"label\": \"shoe\"}}, got {}",
                kind(value)
            ));
        };
        if map.len() > MAX_FILTER_KEYS {
            return err(format!(
                "the filter tests {} keys; the limit is {MAX_FILTER_KEYS}",
                map.len()
            ));
        }
        let conditions = map
            .iter()
            .map(|(key, v)| Ok((key.clone(), Self::condition(key, v)?)))
            .collect::<Result<_, FilterError>>()?;
        Ok(Self { conditions })
    }

    fn condition(key: &str, v: &Value) -> Result<Condition, FilterError> {
        match v {
            Value::Array(options) => {
                if options.is_empty() || options.len() > MAX_ANY_OF {
                    return err(format!(
                        "filter '{key}': a list of values must hold 1 to {MAX_ANY_OF} values, it holds {}",
                        options.len()
                    ));
                }
                let scalars = options
                    .iter()
                    .map(|o| Scalar::from_json(key, o))
                    .collect::<Result<_, _>>()?;
                Ok(Condition::AnyOf(scalars))
            }
            Value::Object(m) => Ok(Condition::Range(Range::parse(key, m)?)),
            other => Ok(Condition::AnyOf(vec![Scalar::from_json(key, other)?])),
        }
    }

    /// The conditions, for stores that translate a filter into their engine's own
    /// filtering ([`crate::remote`]).
    pub(crate) fn conditions(&self) -> &[(String, Condition)] {
        &self.conditions
    }

    /// Whether the filter tests nothing (every item matches).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Whether `label` and `metadata` satisfy every condition.
    pub fn matches_parts(&self, label: Option<&str>, metadata: Option<&Metadata>) -> bool {
        self.conditions.iter().all(|(key, cond)| {
            if key == LABEL_KEY {
                label.is_some_and(|l| cond.matches_scalar(&Value::String(l.to_string())))
            } else {
                metadata
                    .and_then(|m| m.get(key))
                    .is_some_and(|v| cond.matches(v))
            }
        })
    }

    /// Whether a (live) item satisfies every condition.
    pub fn matches(&self, item: &ItemMeta) -> bool {
        !item.deleted && self.matches_label_fast(item)
    }

    fn matches_label_fast(&self, item: &ItemMeta) -> bool {
        self.conditions.iter().all(|(key, cond)| {
            if key == LABEL_KEY {
                // Compared without building a JSON string per item: the hot case of a scan.
                item.label.as_deref().is_some_and(|l| match cond {
                    Condition::AnyOf(opts) => {
                        opts.iter().any(|o| matches!(o, Scalar::Str(s) if s == l))
                    }
                    Condition::Range(_) => false,
                })
            } else {
                item.metadata
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .is_some_and(|v| cond.matches(v))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(label: Option<&str>, meta: Value) -> ItemMeta {
        ItemMeta {
            id: 0,
            path: "p".into(),
            label: label.map(str::to_string),
            sha256: "s".into(),
            metadata: meta.as_object().cloned(),
            deleted: false,
        }
    }

    #[test]
    fn exact_any_of_and_ranges_are_anded() {
        let shoe = item(
            Some("shoe"),
            json!({"color": "red", "price": 20, "tags": ["a", "b"], "new": true}),
        );
        let f = |s: &str| Filter::parse(s).unwrap().matches(&shoe);
        assert!(f(r#"{"label":"shoe"}"#));
        assert!(!f(r#"{"label":"hat"}"#));
        assert!(f(r#"{"color":["blue","red"]}"#));
        assert!(!f(r#"{"color":["blue","green"]}"#));
        assert!(f(r#"{"price":{"gte":20,"lt":50}}"#));
        assert!(!f(r#"{"price":{"gt":20}}"#));
        assert!(f(r#"{"price":20.0}"#));
        assert!(f(r#"{"tags":"b"}"#), "array values match by any element");
        assert!(f(r#"{"new":true}"#));
        assert!(f(r#"{"label":"shoe","color":"red","price":{"lte":20}}"#));
        assert!(!f(r#"{"label":"shoe","color":"blue"}"#));
        assert!(!f(r#"{"missing":"x"}"#));
        assert!(f("{}"));
        let mut gone = shoe.clone();
        gone.deleted = true;
        assert!(!Filter::parse("{}").unwrap().matches(&gone));
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let msg = |s: &str| Filter::parse(s).unwrap_err().message;
        assert!(msg("{label:").contains("not valid JSON"));
        assert!(msg("[1]").contains("must be a JSON object"));
        assert!(msg(r#"{"price":{"gte":"ten"}}"#).contains("'gte' must be a number"));
        assert!(msg(r#"{"price":{"near":3}}"#).contains("unknown range operator"));
        assert!(msg(r#"{"price":{}}"#).contains("at least one"));
        assert!(msg(r#"{"c":[]}"#).contains("1 to"));
        assert!(msg(r#"{"c":[{"a":1}]}"#).contains("strings, numbers or booleans"));
        assert!(msg(r#"{"c":null}"#).contains("got null"));
        assert!(msg(&format!(r#"{{"c":"{}"}}"#, "x".repeat(MAX_FILTER_BYTES))).contains("limit"));
    }

    #[test]
    fn metadata_is_an_object_of_bounded_size_without_label() {
        assert!(parse_metadata(r#"{"price": 3}"#).is_ok());
        assert!(parse_metadata("[1,2]")
            .unwrap_err()
            .message
            .contains("JSON object"));
        assert!(parse_metadata("{")
            .unwrap_err()
            .message
            .contains("not valid JSON"));
        assert!(parse_metadata(r#"{"label":"x"}"#)
            .unwrap_err()
            .message
            .contains("'label'"));
        let big = format!(r#"{{"d":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES));
        assert!(parse_metadata(&big).unwrap_err().message.contains("limit"));
    }
}
