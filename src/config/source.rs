//! The text of the config file, and how an error finds its place in it.
//!
//! serde reports a byte offset without the key; validation knows the key
//! without the offset. A second parse with `toml_edit`, which keeps spans,
//! maps one to the other. It is done only when there is an error to report.

use std::cell::OnceCell;
use std::fmt::Display;
use std::ops::Range;
use std::path::Path;

use toml_edit::{ImDocument, Item, TableLike, Value};

use super::ConfigError;

/// Keys whose values must never appear in a message.
const SECRET_KEYS: [&str; 2] = ["session.secret_keys", "session.secret_key"];

pub(super) struct Source<'a> {
    file: &'a Path,
    text: &'a str,
    spans: OnceCell<SpanMap>,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            text,
            spans: OnceCell::new(),
        }
    }

    pub fn file(&self) -> &Path {
        self.file
    }

    /// An error about `key` (a path such as `server.listen[1]`), placed at its
    /// value, or at its nearest enclosing table when the key is not written.
    pub fn error(&self, key: &str, problem: impl Display) -> ConfigError {
        self.error_near(key, key, problem)
    }

    /// An error about `key`, placed at another key `near` (for a key that is
    /// missing because of what another one says).
    pub fn error_near(&self, near: &str, key: &str, problem: impl Display) -> ConfigError {
        let offset = self.spans().offset_of(near);
        self.message(offset, Some(key), &problem.to_string())
    }

    /// An error that has no place in the file (it comes from the environment).
    pub fn error_outside(&self, key: &str, problem: impl Display) -> ConfigError {
        self.message(None, Some(key), &problem.to_string())
    }

    /// Turns a parse or type error from `toml` into one naming the key.
    pub fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let offset = error.span().map(|span| span.start);
        let entry = offset.and_then(|offset| self.spans().entry_at(offset));
        let problem = match entry {
            Some(entry) => describe(error.message(), entry),
            None if error.message().starts_with("number too large") => {
                "a number past TOML's integers (at most 9223372036854775807); use a smaller one"
                    .to_owned()
            }
            None => format!("{}; fix the TOML syntax", one_line(error.message())),
        };
        // A file that does not parse has no span map: the key is then read
        // off the line, so that "number too large" still names it.
        let written = match entry {
            Some(entry) => Some(entry.path.clone()),
            None => offset.and_then(|offset| key_on_line(self.text, offset)),
        };
        self.message(offset, written.as_deref(), &problem)
    }

    fn spans(&self) -> &SpanMap {
        self.spans.get_or_init(|| SpanMap::parse(self.text))
    }

    fn message(&self, offset: Option<usize>, key: Option<&str>, problem: &str) -> ConfigError {
        let mut message = self.file.display().to_string();
        if let Some(offset) = offset {
            let (line, column) = line_column(self.text, offset);
            message += &format!(":{line}:{column}");
        }
        if let Some(key) = key {
            message += &format!(": {key}");
        }
        message += &format!(": {problem}");
        ConfigError { message }
    }
}

/// `section.key` for a `key = value` line holding `offset`, the section
/// being the last `[header]` above it; `None` for any other line. Only
/// bare keys: a line this is asked about did not parse.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !bare(key) {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(|line| {
        let header = line.trim().strip_prefix('[')?.split(']').next()?.trim();
        Some(header.to_owned()).filter(|header| bare(header))
    });
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_owned(),
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Rewrites serde's wording ("invalid type: string \"x\", expected u64") as
/// ours ("expected a non-negative integer, found string \"x\"").
fn describe(message: &str, entry: &Entry) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let expected = rest.split_once(", ").map_or("", |(_, expected)| expected);
        let what = match (entry.path.contains(['.', '[']), entry.is_table) {
            (false, true) => "unknown section",
            (false, false) => "unknown top-level key (keys belong under a [section])",
            (true, _) => "unknown key",
        };
        return format!("{what}, {expected}; remove it or fix its spelling");
    }
    let mismatch = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "));
    match mismatch {
        Some((found, expected)) => {
            let found = if is_secret(&entry.path) {
                // serde would quote the value; a type name is enough.
                entry.type_name.to_owned()
            } else {
                match found {
                    "sequence" => "an array".to_owned(),
                    "map" => "a table".to_owned(),
                    found => found.to_owned(),
                }
            };
            format!("expected {}, found {found}", expected_in_toml(expected))
        }
        None if is_secret(&entry.path) => "invalid value (not shown: it is a secret)".to_owned(),
        None => one_line(message),
    }
}

fn expected_in_toml(expected: &str) -> &str {
    match expected {
        "u16" | "u32" | "u64" | "usize" => "a non-negative integer",
        "a sequence" => "an array",
        "a map" => "a table",
        expected if expected.starts_with("struct ") => "a table",
        expected => expected,
    }
}

fn is_secret(path: &str) -> bool {
    SECRET_KEYS
        .iter()
        .any(|secret| path == *secret || path.starts_with(&format!("{secret}[")))
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

/// Every key and array element of the file, with where it is written.
#[derive(Default)]
struct SpanMap {
    entries: Vec<Entry>,
}

struct Entry {
    /// `section.key`, with `[i]` for array elements.
    path: String,
    key: Option<Range<usize>>,
    value: Option<Range<usize>>,
    type_name: &'static str,
    is_table: bool,
}

impl SpanMap {
    /// Empty when the text does not parse: syntax errors carry their own offset.
    fn parse(text: &str) -> Self {
        let mut map = Self::default();
        if let Ok(document) = ImDocument::parse(text) {
            map.add_table(document.as_table(), "");
        }
        map
    }

    fn add_table(&mut self, table: &dyn TableLike, prefix: &str) {
        for (name, item) in table.iter() {
            let path = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}.{name}")
            };
            let key = table.key(name).and_then(|key| key.span());
            match item {
                Item::Value(value) => self.add_value(path, key, value),
                Item::Table(child) => {
                    self.push(&path, key, child.span(), "table");
                    self.add_table(child, &path);
                }
                Item::ArrayOfTables(tables) => {
                    self.push(&path, key, tables.span(), "array");
                    for (index, child) in tables.iter().enumerate() {
                        let element = format!("{path}[{index}]");
                        self.push(&element, None, child.span(), "table");
                        self.add_table(child, &element);
                    }
                }
                Item::None => {}
            }
        }
    }

    fn add_value(&mut self, path: String, key: Option<Range<usize>>, value: &Value) {
        self.push(&path, key, value.span(), value.type_name());
        match value {
            Value::Array(array) => {
                for (index, element) in array.iter().enumerate() {
                    self.add_value(format!("{path}[{index}]"), None, element);
                }
            }
            Value::InlineTable(table) => self.add_table(table, &path),
            _ => {}
        }
    }

    fn push(
        &mut self,
        path: &str,
        key: Option<Range<usize>>,
        value: Option<Range<usize>>,
        type_name: &str,
    ) {
        let (type_name, is_table) = match type_name {
            "string" => ("a string", false),
            "integer" => ("an integer", false),
            "float" => ("a float", false),
            "boolean" => ("a boolean", false),
            "datetime" => ("a datetime", false),
            "array" => ("an array", false),
            _ => ("a table", true),
        };
        self.entries.push(Entry {
            path: path.to_owned(),
            key,
            value,
            type_name,
            is_table,
        });
    }

    /// Where `path` is written, or else the nearest enclosing key that is.
    fn offset_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            let found = self.entries.iter().find(|entry| entry.path == path);
            if let Some(span) = found.and_then(|entry| entry.value.clone().or(entry.key.clone())) {
                return Some(span.start);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }

    /// The innermost key or element whose key or value covers `offset`.
    fn entry_at(&self, offset: usize) -> Option<&Entry> {
        let covers = |span: &Option<Range<usize>>| {
            span.as_ref()
                .filter(|span| span.contains(&offset) || span.start == offset)
                .map(|span| span.len())
        };
        self.entries
            .iter()
            .filter_map(|entry| {
                let width = [covers(&entry.key), covers(&entry.value)]
                    .into_iter()
                    .flatten()
                    .min()?;
                Some((width, entry))
            })
            .min_by_key(|(width, _)| *width)
            .map(|(_, entry)| entry)
    }
}
