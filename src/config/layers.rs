//! The config file and the `OUTBOX_RELAY__SECTION__KEY` environment layered into one tree
//! whose every value remembers who wrote it, and the serde `Deserializer` that reads the typed
//! settings out of it: strict about the file's TOML types (a string is not a number, `0` is not
//! a boolean, a duration is text), parsing the environment's text (every variable is text, so
//! `OUTBOX_RELAY__RELAY__NOTIFY=false` is a boolean), and naming in each error the key and,
//! when the environment wrote it, the variable. Owns how what a user wrote is read; what the
//! values mean is checked in `config.rs`. Never prints a value it was not asked about: an
//! unknown key is named without its value (it may be a misspelt password).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Unexpected, Visitor};

/// The prefix of the variables that override the file.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY__";

/// The sections whose keys the environment may set; the `[[outbox]]` tables are the file's.
const ENV_SECTIONS: [&str; 7] = [
    "postgres",
    "rabbitmq",
    "relay",
    "retry",
    "log",
    "health",
    "telemetry",
];

/// A value of the config, and the variable that wrote it (`None`: the file, or a section both
/// wrote keys in).
#[derive(Debug, Clone)]
pub struct Node {
    kind: Kind,
    var: Option<String>,
}

#[derive(Debug, Clone)]
enum Kind {
    Table(BTreeMap<String, Node>),
    Array(Vec<Node>),
    Text(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
}

impl Node {
    fn file(kind: Kind) -> Node {
        Node { kind, var: None }
    }

    /// The value at `key` of this table, if this is a table that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Table(entries) => entries.get(key),
            _ => None,
        }
    }

    /// The keys of this table (none for a value).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        let entries = match &self.kind {
            Kind::Table(entries) => Some(entries),
            _ => None,
        };
        entries
            .into_iter()
            .flat_map(|e| e.keys().map(String::as_str))
    }

    /// Whether the file wrote this as a table (`[outbox]`, where `[[outbox]]` was meant).
    pub fn is_file_table(&self) -> bool {
        matches!(self.kind, Kind::Table(_)) && self.var.is_none()
    }

    /// The elements of this array, if it is one.
    pub fn elements(&self) -> Option<&[Node]> {
        match &self.kind {
            Kind::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Reads `T` from this value, or finds every problem of it: serde stops at the first, so
    /// the value in error is taken out and the rest read again, until it reads or a required
    /// key is missing (one that was taken out is not reported again). Errors name `key` (the
    /// path to this value) in front.
    pub fn read<T: DeserializeOwned>(&self, key: Segment) -> Result<T, Vec<LayerError>> {
        let mut rest = self.clone();
        let mut taken: Vec<Vec<Segment>> = Vec::new();
        let mut problems = Vec::new();
        loop {
            let e = match T::deserialize(NodeDe(&rest)) {
                Ok(value) if problems.is_empty() => return Ok(value),
                Ok(_) => break,
                Err(e) => e,
            };
            let place = e.place();
            if matches!(e.what, What::Missing(_)) && taken.contains(&place) {
                break;
            }
            problems.push(e.at(key.clone()));
            if problems.len() >= 100 || place.is_empty() || !rest.remove(&place) {
                break;
            }
            taken.push(place);
        }
        Err(problems)
    }

    /// Takes out the value at `path`; whether there was one.
    fn remove(&mut self, path: &[Segment]) -> bool {
        match (path, &mut self.kind) {
            ([Segment::Key(k)], Kind::Table(entries)) => entries.remove(k).is_some(),
            ([Segment::Index(i)], Kind::Array(items)) if *i < items.len() => {
                items.remove(*i);
                true
            }
            ([Segment::Key(k), more @ ..], Kind::Table(entries)) => {
                entries.get_mut(k).is_some_and(|n| n.remove(more))
            }
            ([Segment::Index(i), more @ ..], Kind::Array(items)) => {
                items.get_mut(*i).is_some_and(|n| n.remove(more))
            }
            _ => false,
        }
    }
}

impl From<toml::Value> for Node {
    fn from(value: toml::Value) -> Node {
        Node::file(match value {
            toml::Value::String(s) => Kind::Text(s),
            toml::Value::Integer(i) => Kind::Integer(i),
            toml::Value::Float(f) => Kind::Float(f),
            toml::Value::Boolean(b) => Kind::Boolean(b),
            toml::Value::Datetime(d) => Kind::Datetime(d.to_string()),
            toml::Value::Array(items) => Kind::Array(items.into_iter().map(Node::from).collect()),
            toml::Value::Table(t) => {
                Kind::Table(t.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        })
    }
}

/// The file's text as a tree, or the TOML error with its line and column. The parser's own
/// message quotes the line it stopped at, which may hold a password (one with a `"` or `\` in
/// it ends the string early): only the position and the reason are kept.
pub fn parse_file(text: &str) -> Result<Node, String> {
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => Ok(toml::Value::Table(table).into()),
        Err(e) => {
            let at = match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!(" at line {line}, column {column}")
                }
                None => String::new(),
            };
            Err(format!("TOML parse error{at}: {}", e.message().trim_end()))
        }
    }
}

/// A key set by the environment: its place in the config and the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// `relay.batch_size`, as the errors about the key name it.
    pub key: String,
    pub var: String,
}

/// Lays the `OUTBOX_RELAY__...` variables of `vars` over `tree` (the file's): each sets one
/// key, `OUTBOX_RELAY__RELAY__BATCH_SIZE` the key `batch_size` of `[relay]`, its text replacing
/// what the file says. Returns the keys set, and the problem of each variable that names no
/// key the environment can set (neither is applied).
pub fn apply_env(tree: &mut Node, vars: &[(String, String)]) -> (Vec<Override>, Vec<String>) {
    let mut overrides = Vec::new();
    let mut problems = Vec::new();
    let mut vars: Vec<&(String, String)> = vars
        .iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    let sections = ENV_SECTIONS.map(|s| format!("[{s}]")).join(", ");
    for (name, value) in vars {
        let parts: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let problem = if parts.iter().any(String::is_empty) {
            Some(format!(
                "{name}: names no key; write {ENV_PREFIX}<SECTION>__<KEY> with double \
                 underscores between the parts and none at the end"
            ))
        } else if parts[0] == "outbox" {
            Some(format!(
                "{name}: the [[outbox]] tables are set in the config file only (one [[outbox]] \
                 per table); the environment sets keys of {sections}"
            ))
        } else if !ENV_SECTIONS.contains(&parts[0].as_str()) {
            Some(format!(
                "{name}: there is no section [{}]; the environment sets keys of {sections}",
                parts[0]
            ))
        } else if parts.len() == 1 {
            Some(format!(
                "{name}: names the section [{0}], not a key of it; write {ENV_PREFIX}{1}__<KEY>",
                parts[0],
                parts[0].to_ascii_uppercase()
            ))
        } else {
            set(tree, &parts, name, value).err()
        };
        match problem {
            Some(problem) => problems.push(problem),
            None => overrides.push(Override {
                key: parts.join("."),
                var: name.clone(),
            }),
        }
    }
    (overrides, problems)
}

/// Sets `parts` (a path) in `tree` to the text `value` written by `var`, creating the tables
/// on the way; a value on the way (`url` in `..._URL__X`) is a problem.
fn set(tree: &mut Node, parts: &[String], var: &str, value: &str) -> Result<(), String> {
    let mut node = tree;
    for (i, part) in parts.iter().enumerate() {
        let Kind::Table(entries) = &mut node.kind else {
            return Err(format!(
                "{var}: {} is a value, not a section with keys",
                parts[..i].join(".")
            ));
        };
        if i + 1 == parts.len() {
            entries.insert(
                part.clone(),
                Node {
                    kind: Kind::Text(value.to_owned()),
                    var: Some(var.to_owned()),
                },
            );
            return Ok(());
        }
        node = entries.entry(part.clone()).or_insert_with(|| Node {
            kind: Kind::Table(BTreeMap::new()),
            var: Some(var.to_owned()),
        });
    }
    Ok(())
}

/// One step of the path to a value: a key, or an index in an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// What was wrong with a value, at the place and from the writer [`LayerError`] names.
#[derive(Debug)]
enum What {
    Missing(&'static str),
    UnknownKey {
        key: String,
        expected: &'static [&'static str],
    },
    Expected {
        expected: String,
        found: String,
    },
    Message(String),
}

/// A value that cannot be read into the settings: where it is, who wrote it, what is wrong.
#[derive(Debug)]
pub struct LayerError {
    path: Vec<Segment>,
    var: Option<String>,
    what: What,
}

impl LayerError {
    fn new(what: What) -> LayerError {
        LayerError {
            path: Vec::new(),
            var: None,
            what,
        }
    }

    fn expected(expected: impl Into<String>, found: &Node) -> LayerError {
        LayerError::new(What::Expected {
            expected: expected.into(),
            found: found.describe(),
        })
    }

    /// A section of the file that is required and missing.
    pub fn required_section(name: &'static str) -> LayerError {
        LayerError::new(What::Missing(name))
    }

    /// A problem of the value at the top-level key `key`, written in the file.
    pub fn problem(key: &str, message: &str) -> LayerError {
        LayerError::new(What::Message(message.to_owned())).at(Segment::Key(key.to_owned()))
    }

    /// A key of the file's top level that is none of `expected`.
    pub fn unknown_key(key: &str, expected: &'static [&'static str]) -> LayerError {
        LayerError::new(What::UnknownKey {
            key: key.to_owned(),
            expected,
        })
    }

    /// This error, one step further down from `segment`.
    pub fn at(mut self, segment: Segment) -> LayerError {
        self.path.insert(0, segment);
        self
    }

    /// Names `node`'s variable as the writer, unless a value further down was named already.
    fn written_by(mut self, node: &Node) -> LayerError {
        if self.var.is_none() {
            self.var.clone_from(&node.var);
        }
        self
    }

    /// The path to the value in error, down to the key itself (of an unknown or missing one).
    fn place(&self) -> Vec<Segment> {
        let mut place = self.path.clone();
        match &self.what {
            What::Missing(key) => place.push(Segment::Key(key.to_string())),
            What::UnknownKey { key, .. } => place.push(Segment::Key(key.clone())),
            What::Expected { .. } | What::Message(_) => {}
        }
        place
    }

    /// Whether the environment wrote the value.
    pub fn is_from_env(&self) -> bool {
        self.var.is_some()
    }

    fn key(&self) -> String {
        let mut out = String::new();
        for segment in &self.path {
            match segment {
                Segment::Key(k) if out.is_empty() => out.push_str(k),
                Segment::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

impl fmt::Display for LayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.key();
        let (key, message) = match &self.what {
            What::Missing(field) if table.is_empty() => {
                (field.to_string(), "required section is missing".to_owned())
            }
            What::Missing(field) => (join(&table, field), "required".to_owned()),
            What::UnknownKey { key, expected } => {
                let names: Vec<&str> = self
                    .path
                    .iter()
                    .filter_map(|s| match s {
                        Segment::Key(k) => Some(k.as_str()),
                        Segment::Index(_) => None,
                    })
                    .collect();
                let section = match self.path.last() {
                    None => "the file's top level".to_owned(),
                    Some(Segment::Index(_)) => format!("[[{}]]", names.join(".")),
                    Some(Segment::Key(_)) => format!("[{}]", names.join(".")),
                };
                let hint = match closest(key, expected) {
                    Some(near) => format!("; did you mean {near}?"),
                    None => String::new(),
                };
                (
                    join(&table, key),
                    format!("unknown key{hint} ({section} has {})", expected.join(", ")),
                )
            }
            What::Expected { expected, found } => {
                (table, format!("expected {expected}, found {found}"))
            }
            What::Message(m) => (table, m.clone()),
        };
        match &self.var {
            Some(var) => write!(f, "{var} ({key}): {message}"),
            None => write!(f, "{key}: {message}"),
        }
    }
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_owned()
    } else {
        format!("{table}.{key}")
    }
}

/// The known key nearest to a misspelt one, when it is near (two edits at most).
fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

impl std::error::Error for LayerError {}

impl de::Error for LayerError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        LayerError::new(What::Message(msg.to_string()))
    }

    fn invalid_type(unexpected: Unexpected, expected: &dyn de::Expected) -> Self {
        LayerError::new(What::Expected {
            expected: expected.to_string(),
            found: describe(&unexpected),
        })
    }

    fn invalid_value(unexpected: Unexpected, expected: &dyn de::Expected) -> Self {
        Self::invalid_type(unexpected, expected)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        LayerError::new(What::Expected {
            expected: one_of(expected),
            found: format!("{variant:?}"),
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        LayerError::new(What::UnknownKey {
            key: field.to_owned(),
            expected,
        })
    }

    fn missing_field(field: &'static str) -> Self {
        LayerError::new(What::Missing(field))
    }
}

fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    match quoted.as_slice() {
        [one] => one.clone(),
        _ => format!("one of {}", quoted.join(", ")),
    }
}

fn describe(unexpected: &Unexpected) -> String {
    match unexpected {
        Unexpected::Bool(b) => format!("a boolean {b}"),
        Unexpected::Signed(i) => format!("an integer {i}"),
        Unexpected::Unsigned(u) => format!("an integer {u}"),
        Unexpected::Float(x) => format!("a float {x}"),
        Unexpected::Str(s) => format!("a string {s:?}"),
        Unexpected::Map => "a table".into(),
        Unexpected::Seq => "an array".into(),
        other => other.to_string(),
    }
}

impl Node {
    /// What this value is, for an error: its type and (a scalar's) value. The environment's
    /// values are all text, shown as the text.
    fn describe(&self) -> String {
        match (&self.kind, &self.var) {
            (Kind::Text(s), Some(_)) => format!("{s:?}"),
            (Kind::Text(s), None) => format!("a string {s:?}"),
            (Kind::Integer(i), _) => format!("an integer {i}"),
            (Kind::Float(x), _) => format!("a float {x}"),
            (Kind::Boolean(b), _) => format!("a boolean {b}"),
            (Kind::Datetime(d), _) => format!("a date-time {d}"),
            (Kind::Table(_), _) => "a table".into(),
            (Kind::Array(_), _) => "an array".into(),
        }
    }

    /// The whole number this value is: a TOML integer, or the environment's text of one.
    fn integer(&self) -> Result<i128, LayerError> {
        match (&self.kind, &self.var) {
            (Kind::Integer(i), _) => Ok(i128::from(*i)),
            (Kind::Text(s), Some(_)) => s
                .trim()
                .parse()
                .map_err(|_| LayerError::expected("an integer", self)),
            _ => Err(LayerError::expected("an integer", self)),
        }
    }
}

/// Reads a [`Node`]: the file's values as their TOML types only, the environment's text as the
/// type asked for.
struct NodeDe<'a>(&'a Node);

macro_rules! integer {
    ($($method:ident $visit:ident $t:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
            let node = self.0;
            let n = node.integer().map_err(|e| e.written_by(node))?;
            let value = <$t>::try_from(n).map_err(|_| {
                LayerError::new(What::Expected {
                    expected: format!("an integer from {} to {}", <$t>::MIN, <$t>::MAX),
                    found: n.to_string(),
                })
                .written_by(node)
            })?;
            visitor.$visit::<LayerError>(value).map_err(|e| e.written_by(node))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = LayerError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        let node = self.0;
        match &node.kind {
            Kind::Table(entries) => visitor.visit_map(TableAccess::new(entries)),
            Kind::Array(items) => visitor.visit_seq(ArrayAccess {
                items: items.iter().enumerate(),
            }),
            Kind::Text(s) => visitor.visit_str(s),
            Kind::Integer(i) => visitor.visit_i64(*i),
            Kind::Float(x) => visitor.visit_f64(*x),
            Kind::Boolean(b) => visitor.visit_bool(*b),
            Kind::Datetime(_) => Err(LayerError::expected(
                format!("{}", ExpectedOf(&visitor)),
                node,
            )),
        }
        .map_err(|e| e.written_by(node))
    }

    integer!(
        deserialize_i8 visit_i8 i8, deserialize_i16 visit_i16 i16,
        deserialize_i32 visit_i32 i32, deserialize_i64 visit_i64 i64,
        deserialize_u8 visit_u8 u8, deserialize_u16 visit_u16 u16,
        deserialize_u32 visit_u32 u32, deserialize_u64 visit_u64 u64
    );

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        let node = self.0;
        let value = match (&node.kind, &node.var) {
            (Kind::Boolean(b), _) => Ok(*b),
            (Kind::Text(s), Some(_)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(LayerError::expected("true or false", node)),
            },
            _ => Err(LayerError::expected("a boolean (true or false)", node)),
        };
        value
            .and_then(|b| visitor.visit_bool(b))
            .map_err(|e| e.written_by(node))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        let node = self.0;
        let value = match (&node.kind, &node.var) {
            (Kind::Float(x), _) => Ok(*x),
            (Kind::Integer(i), _) => Ok(*i as f64),
            (Kind::Text(s), Some(_)) => s
                .trim()
                .parse()
                .map_err(|_| LayerError::expected("a number", node)),
            _ => Err(LayerError::expected("a number", node)),
        };
        value
            .and_then(|x| visitor.visit_f64(x))
            .map_err(|e| e.written_by(node))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        // Text is text whoever wrote it; anything else goes to the visitor as what it is, so
        // the error says what the key expects (a duration, a socket address, ...).
        self.deserialize_any(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        let node = self.0;
        match &node.kind {
            Kind::Array(_) => self.deserialize_any(visitor),
            Kind::Text(_) if node.var.is_some() => Err(LayerError::new(What::Message(
                "a list cannot be set from the environment; write it in the config file".into(),
            ))
            .written_by(node)),
            _ => Err(LayerError::expected("an array", node).written_by(node)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, LayerError> {
        let node = self.0;
        match &node.kind {
            Kind::Table(_) => self.deserialize_any(visitor),
            _ => Err(LayerError::expected("a table of keys", node).written_by(node)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, LayerError> {
        let node = self.0;
        match &node.kind {
            Kind::Text(s) => visitor.visit_enum(s.clone().into_deserializer()),
            _ => Err(LayerError::expected(one_of(variants), node)),
        }
        .map_err(|e| e.written_by(node))
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct tuple tuple_struct identifier ignored_any
    }
}

/// What a visitor expects, as text.
struct ExpectedOf<'v, V>(&'v V);

impl<'de, V: Visitor<'de>> fmt::Display for ExpectedOf<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }
}

struct TableAccess<'a> {
    entries: std::collections::btree_map::Iter<'a, String, Node>,
    value: Option<(&'a String, &'a Node)>,
}

impl<'a> TableAccess<'a> {
    fn new(entries: &'a BTreeMap<String, Node>) -> Self {
        TableAccess {
            entries: entries.iter(),
            value: None,
        }
    }
}

impl<'de> de::MapAccess<'de> for TableAccess<'_> {
    type Error = LayerError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, LayerError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        // An unknown key is the error of whoever wrote it.
        seed.deserialize(key.as_str().into_deserializer())
            .map(Some)
            .map_err(|e: LayerError| e.written_by(value))
    }

    fn next_value_seed<S: de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, LayerError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value asked for before its key"))?;
        seed.deserialize(NodeDe(value))
            .map_err(|e| e.at(Segment::Key(key.clone())))
    }
}

struct ArrayAccess<'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
}

impl<'de> de::SeqAccess<'de> for ArrayAccess<'_> {
    type Error = LayerError;

    fn next_element_seed<S: de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, LayerError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, item)) => seed
                .deserialize(NodeDe(item))
                .map(Some)
                .map_err(|e| e.at(Segment::Index(i))),
        }
    }
}

/// `#[serde(with = "...")]` for a [`Duration`] written as text (`"250ms"`, `"30s"`, `"7d"`).
pub mod duration_text {
    use super::*;

    /// What a duration key expects, in its errors.
    const EXPECTED: &str = "a duration as text, like \"5s\", \"250ms\" or \"1h 30m\"";

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text.trim())
                .map_err(|e| E::custom(format!("expected {EXPECTED}, found {text:?} ({e})")))
        }
    }

    pub fn deserialize<'de, D: de::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationVisitor)
    }

    /// For an `Option<Duration>` (with `#[serde(default)]`).
    pub mod option {
        use super::*;

        struct OptionVisitor;

        impl<'de> Visitor<'de> for OptionVisitor {
            type Value = Option<Duration>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_str(DurationVisitor).map(Some)
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
        }

        pub fn deserialize<'de, D: de::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            d.deserialize_option(OptionVisitor)
        }
    }
}
