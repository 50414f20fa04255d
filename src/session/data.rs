//! The session data: a JSON object, kept as its compact JSON text.
//!
//! The data is read far more often than it changes: every session request
//! splices it into the token, every store writes it, and only a merge patch
//! needs it as a map. As text it is one shared allocation: a stored session
//! costs a few dozen bytes instead of a tree of maps and strings, a clone
//! is a reference count, and the token needs no serialization.
//!
//! In a record it is written verbatim, so the stored format is the one a
//! `serde_json::Map` gave (`"data":{"count":1}`). Reading accepts any JSON
//! object: compact text is kept as written, anything else (a record edited
//! by hand, pretty-printed) is encoded again. A merge patch rewrites the
//! top-level entries it names and copies the others as they are
//! (`patch::apply`).
//!
//! ```
//! use session_proxy::session::data::SessionData;
//! let data: SessionData = serde_json::from_str(r#"{ "count": 1 }"#).unwrap();
//! assert_eq!(data.as_str(), r#"{"count":1}"#);
//! assert_eq!(data.encoded_len(), 11);
//! assert_eq!(data.to_map().unwrap()["count"], 1);
//! ```

use std::sync::Arc;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A JSON object as compact text; `{}` by default.
#[derive(Clone)]
pub struct SessionData(Arc<RawValue>);

impl SessionData {
    /// The object `map`, encoded.
    pub fn from_map(map: &Map<String, Value>) -> SessionData {
        match serde_json::value::to_raw_value(map) {
            Ok(raw) => SessionData(Arc::from(raw)),
            // serde_json encodes a map of its own values into memory
            // without error: keys are strings, numbers are finite.
            Err(_) => unreachable!("a serde_json::Map always encodes"),
        }
    }

    /// `raw` as session data: compact JSON of an object, as serde_json's
    /// serializer writes a map (`patch::apply` merges into one).
    pub(crate) fn from_raw(raw: Box<RawValue>) -> SessionData {
        debug_assert!(raw.get().starts_with('{') && is_compact(raw.get()), "{raw}");
        SessionData(Arc::from(raw))
    }

    /// The object as a map, to change it. Fails only for an object nested
    /// deeper than serde_json reads (128 levels), which neither a patch
    /// nor a stored record can produce.
    pub fn to_map(&self) -> Result<Map<String, Value>, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// Bytes of the compact JSON: what `max_data_bytes` limits.
    pub fn encoded_len(&self) -> usize {
        self.as_str().len()
    }
}

impl Default for SessionData {
    fn default() -> SessionData {
        SessionData::from_map(&Map::new())
    }
}

impl PartialEq for SessionData {
    fn eq(&self, other: &SessionData) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SessionData {}

impl std::fmt::Debug for SessionData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Map<String, Value>> for SessionData {
    fn from(map: Map<String, Value>) -> SessionData {
        SessionData::from_map(&map)
    }
}

impl Serialize for SessionData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SessionData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SessionData, D::Error> {
        // The parser has checked the syntax; what is left is the kind of
        // value and the form of its text.
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        if !raw.get().starts_with('{') {
            return Err(D::Error::custom("the session data is not a JSON object"));
        }
        if is_compact(raw.get()) {
            return Ok(SessionData(Arc::from(raw)));
        }
        let map: Map<String, Value> = serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
        Ok(SessionData::from_map(&map))
    }
}

/// True when valid JSON `text` has no whitespace outside its strings.
fn is_compact(text: &str) -> bool {
    let mut strings = Strings::default();
    text.bytes()
        .all(|byte| !strings.outside(byte) || !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Follows valid JSON text byte by byte, to tell its strings' bytes from
/// the rest.
#[derive(Default)]
pub(super) struct Strings {
    in_string: bool,
    escaped: bool,
}

impl Strings {
    /// Whether `byte`, the text's next, lies outside every string (the
    /// quotes around one belong to it).
    pub(super) fn outside(&mut self, byte: u8) -> bool {
        if self.in_string {
            match byte {
                _ if self.escaped => self.escaped = false,
                b'\\' => self.escaped = true,
                b'"' => self.in_string = false,
                _ => {}
            }
            return false;
        }
        self.in_string = byte == b'"';
        !self.in_string
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn empty_data_is_an_empty_object() {
        assert_eq!(SessionData::default().as_str(), "{}");
        assert_eq!(SessionData::default().encoded_len(), 2);
    }

    #[test]
    fn a_map_is_kept_as_compact_json_and_read_back() {
        let original = map(json!({"b": [1, {"c": null}], "a": "x y\"z", "é": 1.5}));
        let data = SessionData::from_map(&original);
        assert_eq!(data.as_str(), serde_json::to_string(&original).unwrap());
        assert_eq!(data.to_map().unwrap(), original);
    }

    #[test]
    fn it_is_written_verbatim_inside_a_record() {
        #[derive(Serialize)]
        struct Outer<'a> {
            before: u8,
            data: &'a SessionData,
        }
        let data = SessionData::from_map(&map(json!({"count": 1, "last": "a b"})));
        let outer = Outer {
            before: 1,
            data: &data,
        };
        assert_eq!(
            serde_json::to_string(&outer).unwrap(),
            r#"{"before":1,"data":{"count":1,"last":"a b"}}"#
        );
    }

    #[test]
    fn compact_text_is_kept_and_other_text_is_encoded_again() {
        let compact: SessionData = serde_json::from_str(r#"{"a":"x y","b":{}}"#).unwrap();
        assert_eq!(compact.as_str(), r#"{"a":"x y","b":{}}"#);
        let spaced: SessionData =
            serde_json::from_str("{ \"a\" : \"x y\",\n  \"b\": {} }").unwrap();
        assert_eq!(spaced, compact);
        let escaped: SessionData = serde_json::from_str(r#"{"a":"q\" \\"}"#).unwrap();
        assert_eq!(escaped.as_str(), r#"{"a":"q\" \\"}"#);
    }

    #[test]
    fn anything_but_an_object_is_refused() {
        for text in ["[]", "1", "\"{}\"", "null", "{", r#"{"a":}"#] {
            assert!(
                serde_json::from_str::<SessionData>(text).is_err(),
                "{text} was accepted"
            );
        }
    }

    #[test]
    fn it_reads_from_a_json_value_too() {
        let data: SessionData = serde_json::from_value(json!({"a": [1, 2]})).unwrap();
        assert_eq!(data.as_str(), r#"{"a":[1,2]}"#);
    }
}
