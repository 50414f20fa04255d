//! The upstream's instructions: `Instructions::parse` on any update and
//! action headers, then `merge` and `check_size` on the result.
//!
//! Input: header values separated by 0xFF; a value starting with `!` is an
//! action, any other an update. The first byte sets `max_data_bytes`
//! (2..=4096, as small limits are where the edges are). The session data
//! merged into is a fixed object with nesting, arrays and nulls.
//!
//! Checked: nothing panics; more than one update or action is refused; an
//! accepted update is a JSON object no longer than the raw limit; merging
//! follows RFC 7396 (every key of the patch is deleted, replaced, or merged
//! into an object) and is idempotent; `apply` does the same to the data as
//! JSON text, and `check_size` agrees with the length of the compact JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use session_proxy::session::data::SessionData;
use session_proxy::session::patch::{apply, check_size, merge, Instructions, InvalidUpdate};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let max_data_bytes = 2 + usize::from(limit) * 16;
    let mut updates: Vec<&[u8]> = Vec::new();
    let mut actions: Vec<&[u8]> = Vec::new();
    for value in rest.split(|&b| b == 0xff) {
        match value.strip_prefix(b"!") {
            Some(action) => actions.push(action),
            None => updates.push(value),
        }
    }

    let parsed = Instructions::parse(&updates, &actions, max_data_bytes);
    let instructions = match parsed {
        Ok(instructions) => instructions,
        Err(InvalidUpdate::RepeatedUpdate(n)) => return assert!(n > 1 && n == updates.len()),
        Err(InvalidUpdate::RepeatedAction(n)) => return assert!(n > 1 && n == actions.len()),
        Err(InvalidUpdate::UnknownAction(shown)) => {
            return assert!(shown.chars().count() <= 32, "the log line is bounded")
        }
        Err(_) => return,
    };
    assert!(updates.len() <= 1 && actions.len() <= 1);
    let Some(patch) = instructions.patch else {
        assert!(updates.first().is_none_or(|u| u.trim_ascii().is_empty()));
        return;
    };
    let raw = updates[0].trim_ascii();
    assert!(raw.len() <= max_data_bytes * 2 + 1024, "over the raw limit");
    assert_eq!(
        serde_json::from_slice::<Value>(raw).ok(),
        Some(Value::Object(patch.clone()))
    );

    let mut target = session();
    merge(&mut target, &patch);
    check_rfc7396(&session(), &patch, &target);
    let mut twice = target.clone();
    merge(&mut twice, &patch);
    assert_eq!(twice, target, "merging twice changed the result");

    let compact = serde_json::to_vec(&target).unwrap().len();
    let merged = SessionData::from_map(&target);
    assert_eq!(merged.encoded_len(), compact);
    assert_eq!(
        check_size(&merged, max_data_bytes).is_ok(),
        compact <= max_data_bytes
    );
    match apply(&SessionData::from_map(&session()), &patch, max_data_bytes) {
        Ok(applied) => assert_eq!(applied, merged),
        Err(InvalidUpdate::DataTooLarge(size, limit)) => {
            assert_eq!((size, limit), (compact, max_data_bytes))
        }
        Err(other) => panic!("apply failed: {other}"),
    }
});

fn session() -> Map<String, Value> {
    json!({
        "count": 3,
        "user": {"name": "zoé", "roles": ["a", "b"], "prefs": {"lang": "fr"}},
        "cart": [1, {"x": null}],
        "flag": false,
        "empty": {}
    })
    .as_object()
    .cloned()
    .unwrap()
}

/// What RFC 7396 section 2 says `merge(before, patch)` is.
fn check_rfc7396(
    before: &Map<String, Value>,
    patch: &Map<String, Value>,
    after: &Map<String, Value>,
) {
    for (key, value) in before {
        if !patch.contains_key(key) {
            assert_eq!(after.get(key), Some(value), "untouched key {key:?} changed");
        }
    }
    for (key, value) in patch {
        match value {
            Value::Null => assert!(!after.contains_key(key), "{key:?} not deleted"),
            Value::Object(inner) => {
                let empty = Map::new();
                let old = match before.get(key) {
                    Some(Value::Object(old)) => old,
                    _ => &empty,
                };
                match after.get(key) {
                    Some(Value::Object(merged)) => check_rfc7396(old, inner, merged),
                    other => panic!("{key:?} is {other:?}, not a merged object"),
                }
            }
            value => assert_eq!(after.get(key), Some(value), "{key:?} not replaced"),
        }
    }
    for key in after.keys() {
        assert!(
            before.contains_key(key) || patch.contains_key(key),
            "{key:?} appeared"
        );
    }
}
