//! What the upstream asks for in its response (SPEC \[4.5\]): a JSON merge
//! patch (RFC 7396) in the `update` header and an action in the `action`
//! header. Parsing is strict: anything ambiguous is an invalid update, and
//! an invalid update leaves the session unchanged.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::iter::Peekable;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::data::{SessionData, Strings};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Delete the record and clear the cookie.
    Kill,
    /// Move the session to a new id (after a login: session fixation).
    Regenerate,
}

/// Why an upstream's instructions were refused. The text goes to the log
/// (with the handle prefix), never to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUpdate {
    #[error("the update header appears {0} times")]
    RepeatedUpdate(usize),
    #[error("the action header appears {0} times")]
    RepeatedAction(usize),
    #[error("the update is {0} bytes, over the limit of {1}")]
    UpdateTooLong(usize, usize),
    #[error("the update is not JSON: {0}")]
    NotJson(String),
    #[error("the update is JSON but not an object")]
    NotAnObject,
    #[error(
        "the update has an integer of {0} digits, past 64 bits (-2^63 to 2^64 - 1), \
         which would be stored as an approximate float; send it as a string"
    )]
    IntegerPast64Bits(usize),
    #[error("unknown action {0:?} (expected \"kill\" or \"regenerate\")")]
    UnknownAction(String),
    #[error("the session data would be {0} bytes, over max_data_bytes = {1}")]
    DataTooLarge(usize, usize),
    #[error("the stored session data cannot be read back: {0}")]
    UnreadableData(String),
}

/// The upstream's instructions of one response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Instructions {
    pub patch: Option<Map<String, Value>>,
    pub action: Option<Action>,
}

impl Instructions {
    /// Reads every value of the update and the action headers. A blank
    /// update is no update; more than one of either header is refused.
    /// `max_data_bytes` bounds the raw update too (a patch that only
    /// deletes can be as long as the data it deletes, plus slack), so a
    /// hostile upstream cannot make the proxy parse megabytes.
    pub fn parse(
        updates: &[&[u8]],
        actions: &[&[u8]],
        max_data_bytes: usize,
    ) -> Result<Instructions, InvalidUpdate> {
        if updates.len() > 1 {
            return Err(InvalidUpdate::RepeatedUpdate(updates.len()));
        }
        if actions.len() > 1 {
            return Err(InvalidUpdate::RepeatedAction(actions.len()));
        }
        let patch = match updates.first() {
            Some(raw) => parse_patch(raw, max_data_bytes)?,
            None => None,
        };
        let action = actions.first().map(|raw| parse_action(raw)).transpose()?;
        Ok(Instructions { patch, action })
    }

    pub fn is_empty(&self) -> bool {
        self.patch.is_none() && self.action.is_none()
    }
}

fn parse_patch(
    raw: &[u8],
    max_data_bytes: usize,
) -> Result<Option<Map<String, Value>>, InvalidUpdate> {
    let raw = raw.trim_ascii();
    if raw.is_empty() {
        return Ok(None);
    }
    let limit = max_data_bytes.saturating_mul(2).saturating_add(1024);
    if raw.len() > limit {
        return Err(InvalidUpdate::UpdateTooLong(raw.len(), limit));
    }
    match serde_json::from_slice(raw) {
        // Only a float can be such an integer read: most updates hold
        // none, and skip the second look at their text.
        Ok(Value::Object(patch)) => match patch.values().any(holds_float) {
            true => match integer_past_64_bits(raw) {
                Some(digits) => Err(InvalidUpdate::IntegerPast64Bits(digits)),
                None => Ok(Some(patch)),
            },
            false => Ok(Some(patch)),
        },
        Ok(_) => Err(InvalidUpdate::NotAnObject),
        Err(e) => Err(InvalidUpdate::NotJson(e.to_string())),
    }
}

/// Whether `value` is or holds a number serde_json keeps as a float.
fn holds_float(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.is_f64(),
        Value::Array(items) => items.iter().any(holds_float),
        Value::Object(entries) => entries.values().any(holds_float),
        _ => false,
    }
}

/// The digits of the first integer in `json` (valid JSON text) past what
/// serde_json keeps exactly, below `i64::MIN` or above `u64::MAX`, if any.
/// serde_json reads such an integer as the nearest float: a Python app's
/// `2**64` or `uuid4().int` came back as `1.8446744073709552e+19`, another
/// number of another type. Its value is session data, kept out of the log.
fn integer_past_64_bits(json: &[u8]) -> Option<usize> {
    let mut strings = Strings::default();
    let mut at = 0;
    while let Some(&byte) = json.get(at) {
        at += 1;
        // Outside strings, only numbers have digits or `-`.
        if !strings.outside(byte) || !matches!(byte, b'-' | b'0'..=b'9') {
            continue;
        }
        let start = at - 1;
        let length = json[start..]
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(json.len() - start);
        let number = &json[start..start + length];
        at = start + length;
        let is_integer = !number.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
        let exact = std::str::from_utf8(number)
            .is_ok_and(|text| text.parse::<u64>().is_ok() || text.parse::<i64>().is_ok());
        if is_integer && !exact {
            return Some(number.iter().filter(|b| b.is_ascii_digit()).count());
        }
    }
    None
}

fn parse_action(raw: &[u8]) -> Result<Action, InvalidUpdate> {
    let raw = raw.trim_ascii();
    if raw.eq_ignore_ascii_case(b"kill") {
        Ok(Action::Kill)
    } else if raw.eq_ignore_ascii_case(b"regenerate") {
        Ok(Action::Regenerate)
    } else {
        // Bounded: the log line must not carry a whole hostile header.
        let shown: String = String::from_utf8_lossy(raw).chars().take(32).collect();
        Err(InvalidUpdate::UnknownAction(shown))
    }
}

/// Applies `patch` to `target` as RFC 7396 says: `null` deletes, objects
/// merge recursively, anything else replaces.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(slot) = slot {
                    merge(slot, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// `data` with `patch` merged in, if it stays within `max_data_bytes`.
///
/// Works on the stored text: its top-level entries stay text and are
/// copied as they are, in one pass over them and the patch's entries, both
/// in key order; only an entry the patch merges an object into is parsed.
/// The stored text is still scanned once (serde_json checks what it
/// splits), but no tree of it is built. The result is the compact JSON
/// that merging whole `serde_json::Map`s gives.
pub fn apply(
    data: &SessionData,
    patch: &Map<String, Value>,
    max_data_bytes: usize,
) -> Result<SessionData, InvalidUpdate> {
    let unreadable = |e: serde_json::Error| InvalidUpdate::UnreadableData(e.to_string());
    let mut stored = serde_json::from_str::<Entries<'_>>(data.as_str())
        .map_err(unreadable)?
        .in_key_order();
    let mut changes: Vec<(&str, &Value)> = patch.iter().map(|(k, v)| (k.as_str(), v)).collect();
    changes.sort_unstable_by_key(|&(key, _)| key);
    let mut changes = changes.into_iter().peekable();

    let mut merged = MergedObject::default();
    loop {
        let order = match (stored.peek(), changes.peek()) {
            (Some((kept, _)), Some((changed, _))) => kept.0.as_ref().cmp(changed),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => break,
        };
        match order {
            Ordering::Less => {
                if let Some((key, value)) = stored.next() {
                    merged.0.push((key.0, Entry::Stored(value)));
                }
            }
            Ordering::Greater => {
                if let Some((key, change)) = changes.next() {
                    merged.change(key, None, change).map_err(unreadable)?;
                }
            }
            Ordering::Equal => {
                if let (Some((_, value)), Some((key, change))) = (stored.next(), changes.next()) {
                    merged
                        .change(key, Some(value), change)
                        .map_err(unreadable)?;
                }
            }
        }
    }
    let merged = merged.encode().map_err(unreadable)?;
    check_size(&merged, max_data_bytes)?;
    Ok(merged)
}

/// A top-level key of the stored object: borrowed from its text unless
/// it has escapes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(transparent)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// The stored object's top-level entries as written, values left as text.
struct Entries<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'a> Entries<'a> {
    /// The entries by key, as `serde_json::Map` keeps them. Text the proxy
    /// wrote is in order already; a record edited by hand may not be, or
    /// may repeat a key, of which the last one counts.
    fn in_key_order(self) -> Peekable<std::vec::IntoIter<(Key<'a>, &'a RawValue)>> {
        let mut entries = self.0;
        if !entries.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            entries.reverse();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|later, earlier| later.0 == earlier.0);
        }
        entries.into_iter().peekable()
    }
}

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Entries<'de>, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// The merged object's entries, in key order.
#[derive(Default)]
struct MergedObject<'a>(Vec<(Cow<'a, str>, Entry<'a>)>);

/// A top-level value of the merged object.
enum Entry<'a> {
    /// Kept from the stored text as it was written.
    Stored(&'a RawValue),
    /// Set by the patch.
    Set(&'a Value),
    /// A stored object with an object of the patch merged into it.
    Merged(Map<String, Value>),
}

impl<'a> MergedObject<'a> {
    /// The entry `key` as the patch's `change` leaves it: deleted by
    /// `null`, an object merged into the stored one, anything else set.
    fn change(
        &mut self,
        key: &'a str,
        stored: Option<&RawValue>,
        change: &'a Value,
    ) -> serde_json::Result<()> {
        let entry = match change {
            Value::Null => return Ok(()),
            Value::Object(inner) => {
                let mut target = match stored {
                    Some(text) if text.get().starts_with('{') => serde_json::from_str(text.get())?,
                    _ => Map::new(),
                };
                merge(&mut target, inner);
                Entry::Merged(target)
            }
            other => Entry::Set(other),
        };
        self.0.push((Cow::Borrowed(key), entry));
        Ok(())
    }

    /// The compact JSON text, written by serde_json: stored entries go in
    /// verbatim and nothing is parsed again to check it.
    fn encode(&self) -> serde_json::Result<SessionData> {
        serde_json::value::to_raw_value(self).map(SessionData::from_raw)
    }
}

impl Serialize for MergedObject<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, entry)| (key, entry)))
    }
}

impl Serialize for Entry<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Entry::Stored(text) => text.serialize(serializer),
            Entry::Set(value) => value.serialize(serializer),
            Entry::Merged(map) => map.serialize(serializer),
        }
    }
}

/// The size of `data` as compact JSON, checked against `max_data_bytes`.
pub fn check_size(data: &SessionData, max_data_bytes: usize) -> Result<(), InvalidUpdate> {
    let size = data.encoded_len();
    if size > max_data_bytes {
        return Err(InvalidUpdate::DataTooLarge(size, max_data_bytes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    fn parse(updates: &[&str], actions: &[&str]) -> Result<Instructions, InvalidUpdate> {
        let updates: Vec<&[u8]> = updates.iter().map(|u| u.as_bytes()).collect();
        let actions: Vec<&[u8]> = actions.iter().map(|a| a.as_bytes()).collect();
        Instructions::parse(&updates, &actions, 4096)
    }

    #[test]
    fn rfc7396_examples_merge_as_the_rfc_says() {
        // RFC 7396, appendix A (the cases whose target and patch are objects).
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
            (
                json!({"a":"foo"}),
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"c"}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut target = object(target);
            merge(&mut target, &object(patch.clone()));
            assert_eq!(Value::Object(target), expected, "patch {patch}");
        }
    }

    #[test]
    fn an_update_and_an_action_are_read_together() {
        let parsed = parse(&[r#"{"user":"ann"}"#], &["regenerate"]).unwrap();
        assert_eq!(parsed.patch, Some(object(json!({"user": "ann"}))));
        assert_eq!(parsed.action, Some(Action::Regenerate));
        assert_eq!(parse(&[], &[" KILL "]).unwrap().action, Some(Action::Kill));
    }

    #[test]
    fn a_blank_update_is_no_update() {
        assert!(parse(&["  "], &[]).unwrap().is_empty());
    }

    #[test]
    fn an_update_that_is_not_a_json_object_is_refused() {
        for bad in ["[1]", "3", "\"x\"", "null", "{", "{\"a\":1}x", "\u{0}"] {
            assert!(parse(&[bad], &[]).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn repeated_headers_and_unknown_actions_are_refused() {
        assert_eq!(
            parse(&["{}", "{}"], &[]),
            Err(InvalidUpdate::RepeatedUpdate(2))
        );
        assert_eq!(
            parse(&[], &["kill", "kill"]),
            Err(InvalidUpdate::RepeatedAction(2))
        );
        assert!(matches!(
            parse(&[], &["destroy"]),
            Err(InvalidUpdate::UnknownAction(_))
        ));
    }

    #[test]
    fn an_overlong_update_is_refused_before_parsing() {
        let long = format!(r#"{{"a":"{}"}}"#, "x".repeat(10_000));
        assert!(matches!(
            parse(&[&long], &[]),
            Err(InvalidUpdate::UpdateTooLong(..))
        ));
    }

    #[test]
    fn an_integer_past_64_bits_is_refused_and_any_other_number_kept() {
        for past in [
            r#"{"n":18446744073709551616}"#,
            r#"{"n":-9223372036854775809}"#,
            r#"{"a":"1","b":[1,{"c":100000000000000000000000}]}"#,
        ] {
            assert!(
                matches!(
                    parse(&[past], &[]),
                    Err(InvalidUpdate::IntegerPast64Bits(_))
                ),
                "{past} was accepted"
            );
        }
        assert_eq!(
            parse(&[r#"{"n":-100000000000000000000}"#], &[]),
            Err(InvalidUpdate::IntegerPast64Bits(21))
        );
        for kept in [
            r#"{"n":18446744073709551615,"m":-9223372036854775808,"z":-0}"#,
            r#"{"f":1.8446744073709552e19,"g":123456789012345678901.5,"h":-1E+25}"#,
            r#"{"s":"18446744073709551616","t":"\"99999999999999999999999","u":"\\"}"#,
            r#"{"99999999999999999999999":1}"#,
        ] {
            let parsed = parse(&[kept], &[]);
            assert!(
                !matches!(parsed, Err(InvalidUpdate::IntegerPast64Bits(_))),
                "{kept}: {parsed:?}"
            );
        }
    }

    #[test]
    fn the_size_check_counts_compact_json() {
        let data = SessionData::from_map(&object(json!({"a": "bc"})));
        assert_eq!(data.encoded_len(), r#"{"a":"bc"}"#.len());
        assert!(check_size(&data, 10).is_ok());
        assert_eq!(
            check_size(&data, 9),
            Err(InvalidUpdate::DataTooLarge(10, 9))
        );
    }

    #[test]
    fn applying_to_the_stored_text_gives_what_merging_whole_maps_gives() {
        let stored = [
            r#"{}"#,
            r#"{"a":"b","b":{"c":[1,{"d":null}],"e":"f"},"z":1.5}"#,
            // keys with escapes, out of order, repeated (the last one counts)
            r#"{"z\u00e9":1,"a\"q":{"x":1},"m":"\u0041","m":2}"#,
            r#"{"cart":[{"n":2,"sku":"A1"}],"user":{"id":7,"roles":["admin"]},"é":"ü"}"#,
            r#"{"b":{"z":1,"a":2},"a":[{"y":1,"x":2}]}"#,
        ];
        let patches = [
            json!({}),
            json!({"a": null, "missing": null}),
            json!({"a": "c", "new": [1, 2], "z": {"y": null}}),
            json!({"b": {"c": null, "g": {"h": 1}}, "z": null}),
            json!({"a\"q": {"x": null, "y": "ü"}, "m": {"deep": {"er": true}}}),
            json!({"user": {"roles": null, "theme": "dark"}, "cart": null, "": 0}),
        ];
        for text in stored {
            let data: SessionData = serde_json::from_str(text).unwrap();
            for patch in &patches {
                let patch = object(patch.clone());
                let mut whole = data.to_map().unwrap();
                merge(&mut whole, &patch);
                let merged = apply(&data, &patch, 4096).unwrap();
                assert_eq!(merged.to_map().unwrap(), whole, "{text} + {patch:?}");
                // Text the proxy wrote (sorted keys) gives the same bytes;
                // a record edited by hand keeps its untouched entries as written.
                if data == SessionData::from_map(&data.to_map().unwrap()) {
                    assert_eq!(merged, SessionData::from_map(&whole), "{text} + {patch:?}");
                }
            }
        }
    }

    #[test]
    fn applying_a_patch_merges_and_checks_the_merged_size() {
        let data = SessionData::from_map(&object(json!({"a": 1, "b": {"c": 2}})));
        let patch = object(json!({"a": null, "b": {"d": "e"}}));
        let merged = apply(&data, &patch, 100).unwrap();
        assert_eq!(merged.as_str(), r#"{"b":{"c":2,"d":"e"}}"#);
        assert_eq!(
            apply(&data, &patch, 20),
            Err(InvalidUpdate::DataTooLarge(21, 20))
        );
    }
}
