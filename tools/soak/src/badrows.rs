//! The bad-row generator: seeded rows at and just past every limit a row can meet on its way
//! to the broker (the header frame against `frame_max`, the decoder's numbers and nesting, the
//! timestamp, AMQP short strings, the exchange name, the ordering key's 1024 bytes), plus empty
//! strings and unusual Unicode, each on an ordering key of its own (`bad-N-...`, so it holds
//! back nothing but itself), each with the outcome it must have: delivered byte for byte,
//! parked with a reason naming the field, or refused at INSERT. And the judge of what became
//! of each. Pure: no I/O.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::BasicProperties;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// Every bad row's ordering key starts with this (and its number): the consumer keeps the
/// whole message of such rows, the good-row checks leave them out.
pub const KEY_PREFIX: &str = "bad-";

/// The nesting serde_json reads (its recursion limit is 128: the 128th open bracket fails), as
/// found by `nesting_limit_is_where_serde_json_stops` below. The headers object itself counts.
pub const NESTING_OK: usize = 127;

/// The longest ordering key the table takes (`outbox_relay_<table>_ordering_key_length`).
pub const MAX_KEY_BYTES: usize = 1024;

/// AMQP short strings (message_id, type, routing key, header names, exchange) hold 255 bytes.
const SHORT: usize = 255;

/// What must become of a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Delivered, every property, header and payload byte as the row holds them.
    Delivered,
    /// Parked, its reason containing this text (the field or the limit).
    Parked(&'static str),
    /// The INSERT fails, the error naming this (the check constraint).
    Refused(&'static str),
}

/// One generated row, as inserted (the JSON columns as text, so values serde_json cannot
/// represent, such as `1e400`, reach the table).
#[derive(Debug, Clone)]
pub struct BadRow {
    pub case: &'static str,
    pub dedup_key: String,
    pub ordering_key: String,
    pub routing_key: String,
    pub event_type: String,
    /// `None`: the table's exchange.
    pub exchange: Option<String>,
    pub payload: String,
    pub headers: String,
    /// `now`, `infinity` or `-infinity`.
    pub created_at: &'static str,
    pub expect: Expect,
}

/// The cases, each as likely as the others (taken in seeded shuffled rounds).
pub const CASES: [&str; 24] = [
    "frame-under",
    "frame-over",
    "number-edges",
    "number-1.7e308",
    "number-f64-max",
    "number-over",
    "nesting-at-limit",
    "nesting-past-limit",
    "created-infinite",
    "dedup-key-255",
    "dedup-key-256",
    "event-type-255",
    "event-type-256",
    "routing-key-255",
    "routing-key-256",
    "header-name-255",
    "header-name-256",
    "exchange-invalid",
    "ordering-key-1024",
    "ordering-key-1025",
    "empty-strings",
    "unicode",
    "unicode-short-strings",
    "payload-1mb",
];

/// Text a relay or a broker might mangle: emoji with joiners and modifiers, right-to-left
/// scripts and overrides, combining marks (decomposed, never to be normalised), a BOM,
/// zero-width characters, noncharacters, the last code point, control characters (escaped in
/// JSON). No NUL: PostgreSQL's text cannot hold it.
pub const UNICODE: [&str; 12] = [
    "👩\u{200d}👩\u{200d}👧\u{200d}👦",
    "🏳\u{fe0f}\u{200d}🌈 👍🏽",
    "שלום עולם",
    "مرحبا بالعالم",
    "\u{202e}txt.exe\u{202c}",
    "e\u{0301} a\u{0308} Z\u{0351}\u{0346}\u{035b}",
    "क्षि \u{1100}\u{1161}\u{11a8}",
    "\u{feff}bom\u{200b}zwsp\u{2060}",
    "\u{fffe}\u{ffff}\u{10ffff}",
    "漢字かなカナ한국어",
    "ctl\u{1}\u{1f}\u{7f}tab\tnl\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{1f9d1}\u{1f3ff}\u{200d}\u{1f680}",
];

/// Makes the bad rows of a run.
pub struct Generator {
    rng: ChaCha8Rng,
    round: Vec<&'static str>,
    next: u64,
    /// The connection's negotiated `frame_max` (the relay's lapin negotiates the same).
    frame_max: usize,
    /// The `x-outbox-table` header the relay adds (the table as configured).
    table: String,
    empty_dedup_used: bool,
}

impl Generator {
    pub fn new(seed: u64, frame_max: usize, table: &str) -> Generator {
        Generator {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xbad0_0bad_0bad_0bad),
            round: Vec::new(),
            next: 0,
            frame_max,
            table: table.to_string(),
            empty_dedup_used: false,
        }
    }

    /// The next row of the seeded sequence.
    pub fn next_row(&mut self) -> BadRow {
        if self.round.is_empty() {
            self.round = CASES.to_vec();
            self.round.shuffle(&mut self.rng);
        }
        let case = self.round.pop().unwrap_or("unicode");
        self.make(case)
    }

    /// A row of `case` (the next number).
    pub fn make(&mut self, case: &'static str) -> BadRow {
        self.next += 1;
        let n = self.next;
        let id = format!("{KEY_PREFIX}{n}-{case}");
        let mut row = BadRow {
            case,
            dedup_key: id.clone(),
            ordering_key: id.clone(),
            routing_key: format!("soak.bad.{n}"),
            event_type: "SoakBadRow".into(),
            exchange: None,
            payload: json!({ "bad": n, "case": case }).to_string(),
            headers: json!({ "case": case }).to_string(),
            created_at: "now",
            expect: Expect::Delivered,
        };
        let rng = &mut self.rng;
        match case {
            "frame-under" | "frame-over" => {
                // The exact size of the content-header frame as the contract builds it,
                // `d` bytes under (0..=8) or over (1..=8) frame_max.
                let target = if case == "frame-under" {
                    self.frame_max - rng.random_range(0..=8usize)
                } else {
                    self.frame_max + rng.random_range(1..=8usize)
                };
                let empty = frame_size(&row, &self.table, "");
                let fill = target.saturating_sub(empty);
                row.headers = json!({ "blob": "x".repeat(fill) }).to_string();
                debug_assert_eq!(frame_size(&row, &self.table, &"x".repeat(fill)), target);
                if case == "frame-over" {
                    row.expect = Expect::Parked("frame_max");
                }
            }
            "number-edges" => {
                // Values whose jsonb rendering (1e308 as 309 digits, 5e-324 as 324 decimals)
                // serde_json reads back exactly.
                row.headers = json!({
                    "big": 1e308,
                    "neg_big": -1e308,
                    "min_subnormal": f64::from_bits(1),
                    "min_normal": f64::MIN_POSITIVE,
                    "i64_max": i64::MAX,
                    "i64_min": i64::MIN,
                    "tenth": 0.1,
                    "zero": 0,
                })
                .to_string();
            }
            // Finite 64-bit floats, so to be delivered as they are: jsonb renders them as 309
            // digits, which serde_json without its `float_roundtrip` feature reads one unit
            // off (1.7e308) or refuses as out of range (f64::MAX).
            "number-1.7e308" => row.headers = json!({ "amount": 1.7e308 }).to_string(),
            "number-f64-max" => row.headers = json!({ "amount": f64::MAX }).to_string(),
            "number-over" => {
                let value = ["1e400", "-1e400", "2e308", "1.8e308"][rng.random_range(0..4)];
                row.headers = format!("{{\"amount\": {value}}}");
                row.expect = Expect::Parked("headers cannot be read");
            }
            "nesting-at-limit" => row.headers = nested(NESTING_OK),
            "nesting-past-limit" => {
                let depth = if rng.random_bool(0.5) {
                    NESTING_OK + 1
                } else {
                    300
                };
                row.headers = nested(depth);
                row.expect = Expect::Parked("headers cannot be read");
            }
            "created-infinite" => {
                row.created_at = if rng.random_bool(0.5) {
                    "infinity"
                } else {
                    "-infinity"
                };
                row.expect = Expect::Parked("created_at");
            }
            "dedup-key-255" => row.dedup_key = pad(&id, SHORT, rng),
            "dedup-key-256" => {
                row.dedup_key = pad(&id, SHORT + 1, rng);
                row.expect = Expect::Parked("dedup_key");
            }
            "event-type-255" => row.event_type = pad("SoakBadRow", SHORT, rng),
            "event-type-256" => {
                row.event_type = pad("SoakBadRow", SHORT + 1, rng);
                row.expect = Expect::Parked("event_type");
            }
            "routing-key-255" => row.routing_key = pad(&row.routing_key, SHORT, rng),
            "routing-key-256" => {
                row.routing_key = pad(&row.routing_key, SHORT + 1, rng);
                row.expect = Expect::Parked("routing_key");
            }
            "header-name-255" | "header-name-256" => {
                let len = if case == "header-name-255" {
                    SHORT
                } else {
                    SHORT + 1
                };
                let mut headers = serde_json::Map::new();
                headers.insert(pad("h", len, rng), json!("long name"));
                row.headers = Value::Object(headers).to_string();
                if case == "header-name-256" {
                    row.expect = Expect::Parked("header name");
                }
            }
            "exchange-invalid" => {
                row.exchange = Some(match rng.random_range(0..3) {
                    0 => "soak events!".to_string(),
                    1 => "soak.évents".to_string(),
                    _ => "e".repeat(SHORT + 1),
                });
                row.expect = Expect::Parked("exchange name");
            }
            "ordering-key-1024" => row.ordering_key = pad(&id, MAX_KEY_BYTES, rng),
            "ordering-key-1025" => {
                row.ordering_key = pad(&id, MAX_KEY_BYTES + 1, rng);
                row.expect = Expect::Refused("ordering_key_length");
            }
            "empty-strings" => {
                // One row of the run may have the empty dedup_key (it is unique).
                if !self.empty_dedup_used {
                    self.empty_dedup_used = true;
                    row.dedup_key = String::new();
                }
                row.event_type = String::new();
                row.routing_key = String::new();
                row.headers = json!({ "": "", "empty": "" }).to_string();
                row.payload = json!("").to_string();
            }
            "unicode" => {
                let text = UNICODE.join(" | ");
                let mut headers = serde_json::Map::new();
                for (i, s) in UNICODE.iter().enumerate() {
                    headers.insert(format!("{i}-{}", s.replace('\n', " ")), json!(s));
                }
                headers.insert("all".into(), json!(text));
                headers.insert("nested".into(), json!({ "list": UNICODE, "🔑": "值" }));
                row.headers = Value::Object(headers).to_string();
                row.payload =
                    json!({ "bad": n, "text": text, "list": UNICODE, "עברית": "✓" }).to_string();
                row.ordering_key = format!("{id}-{}", UNICODE[rng.random_range(0..UNICODE.len())]);
            }
            "unicode-short-strings" => {
                let pick = |rng: &mut ChaCha8Rng| UNICODE[rng.random_range(0..UNICODE.len())];
                row.dedup_key = format!("{id}-{}", pick(rng));
                row.event_type = format!("Évènement-{}", pick(rng));
                row.routing_key = format!("soak.bad.{n}.{}", pick(rng).replace('.', "·"));
                row.ordering_key = pad(&format!("{id}-{}", pick(rng)), MAX_KEY_BYTES, rng);
            }
            "payload-1mb" => {
                let unit = UNICODE.join("");
                let mut big = String::with_capacity(1 << 20);
                while big.len() < 1 << 20 {
                    big.push_str(&unit);
                }
                row.payload = json!({ "bad": n, "big": big }).to_string();
            }
            _ => {}
        }
        row
    }
}

/// `prefix` then varied characters (1 to 4 bytes each, never cut), exactly `bytes` long.
pub fn pad(prefix: &str, bytes: usize, rng: &mut ChaCha8Rng) -> String {
    const FILL: [char; 8] = ['a', 'é', '€', '😀', 'z', 'ש', '字', '9'];
    let mut s = prefix.to_string();
    while s.len() < bytes {
        let c = FILL[rng.random_range(0..FILL.len())];
        if s.len() + c.len_utf8() <= bytes {
            s.push(c);
        } else {
            s.push('a');
        }
    }
    s.truncate(bytes);
    s
}

/// A headers object nested `depth` levels (the headers object itself counts).
pub fn nested(depth: usize) -> String {
    let mut s = String::new();
    for _ in 1..depth {
        s.push_str("{\"n\":");
    }
    s.push_str("{\"leaf\":1}");
    for _ in 1..depth {
        s.push('}');
    }
    s
}

/// The size of the content-header frame of `row`'s message, with its headers being
/// `{"blob": blob}`, as the relay's contract builds it (delivery mode, message_id, type,
/// content type, timestamp, the row's headers plus x-outbox-table, x-outbox-id and
/// x-ordering-key), encoded by the AMQP client's own encoder.
pub fn frame_size(row: &BadRow, table: &str, blob: &str) -> usize {
    // Frame type, channel, size, class, weight, body size, frame end.
    const OVERHEAD: usize = 1 + 2 + 4 + 2 + 2 + 8 + 1;
    let mut headers = FieldTable::default();
    headers.insert("blob".into(), AMQPValue::LongString(blob.into()));
    headers.insert("x-outbox-table".into(), AMQPValue::LongString(table.into()));
    headers.insert("x-outbox-id".into(), AMQPValue::LongLongInt(1));
    headers.insert(
        "x-ordering-key".into(),
        AMQPValue::LongString(row.ordering_key.as_str().into()),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(row.dedup_key.as_str().into())
        .with_type(row.event_type.as_str().into())
        .with_content_type("application/json".into())
        .with_timestamp(0)
        .with_headers(headers);
    let encoded = cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(&properties),
        Vec::new(),
    )
    .map(|v| v.len())
    .unwrap_or(usize::MAX / 2);
    encoded + OVERHEAD
}

/// A message of a bad row as the consumer received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub event_type: Option<String>,
    pub content_type: Option<String>,
    /// `x-ordering-key`.
    pub ordering_key: Option<String>,
    /// The headers as JSON, without the relay's own `x-outbox-*` and `x-ordering-key`.
    pub headers: Value,
    pub body: Vec<u8>,
}

/// AMQP field values back to JSON (the inverse of the contract's mapping); text that is not
/// UTF-8 becomes a marker that never equals a row's value.
pub fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Void => Value::Null,
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::Float(f) => json!(f64::from(*f)),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::LongString(s) => long_string(s),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::FieldArray(a) => array(a),
        AMQPValue::FieldTable(t) => table(t, false),
        other => Value::String(format!("<unexpected AMQP value {other:?}>")),
    }
}

fn long_string(s: &LongString) -> Value {
    match std::str::from_utf8(s.as_bytes()) {
        Ok(text) => Value::String(text.to_string()),
        Err(_) => Value::String(format!("<not UTF-8: {:?}>", s.as_bytes())),
    }
}

fn array(a: &FieldArray) -> Value {
    Value::Array(a.as_slice().iter().map(amqp_to_json).collect())
}

/// A field table as a JSON object; `user_only` leaves out the relay's own headers.
pub fn table(t: &FieldTable, user_only: bool) -> Value {
    let mut map = serde_json::Map::new();
    for (name, value) in t.inner() {
        let name = name.as_str();
        if user_only && (name.starts_with("x-outbox-") || name == "x-ordering-key") {
            continue;
        }
        map.insert(name.to_string(), amqp_to_json(value));
    }
    Value::Object(map)
}

/// What the table said about a bad row at the end, or when a TRUNCATE removed it.
#[derive(Debug, Clone)]
pub struct RowState {
    pub parked: bool,
    pub published: bool,
    pub reason: String,
    /// `payload::text`: the body the relay sends.
    pub payload: String,
    /// Removed by a TRUNCATE (this is its state then).
    pub truncated: bool,
}

/// What became of a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Expected delivered, and it was, byte for byte.
    Delivered,
    /// Expected parked, and it was, with the expected reason.
    Parked,
    /// Expected refused at INSERT, and it was.
    Refused,
    /// Removed by a TRUNCATE before it was delivered or parked: owed nothing.
    Truncated,
    /// The soak's INSERT failed for another reason (a fault): no row.
    NotInserted,
    // The failures:
    /// Delivered with a property, header or payload byte changed.
    Corrupted,
    /// Expected delivered, parked instead.
    ParkedNotDelivered,
    /// Expected parked, delivered instead.
    DeliveredNotParked,
    /// Parked without the expected reason.
    WrongReason,
    /// Neither delivered nor parked at the end.
    Stuck,
    /// Expected refused, inserted.
    NotRefused,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Parked => "parked",
            Outcome::Refused => "refused",
            Outcome::Truncated => "truncated",
            Outcome::NotInserted => "not_inserted",
            Outcome::Corrupted => "corrupted",
            Outcome::ParkedNotDelivered => "parked_not_delivered",
            Outcome::DeliveredNotParked => "delivered_not_parked",
            Outcome::WrongReason => "wrong_reason",
            Outcome::Stuck => "stuck",
            Outcome::NotRefused => "not_refused",
        }
    }

    pub fn is_failure(self) -> bool {
        self >= Outcome::Corrupted
    }
}

/// The outcome of `row`: `insert` is the INSERT's result (its id or its error), `state` the
/// row in the table (at the end, or when a TRUNCATE removed it; `None` when it is gone),
/// `received` every message of it the consumer got. The second value says why, for a failure.
pub fn judge(
    row: &BadRow,
    insert: &Result<i64, String>,
    state: Option<&RowState>,
    received: &[Received],
    default_exchange: &str,
) -> (Outcome, String) {
    let id = match insert {
        Err(error) => {
            return match row.expect {
                Expect::Refused(says) if error.contains(says) => (Outcome::Refused, String::new()),
                Expect::Refused(says) => (
                    Outcome::NotInserted,
                    format!("refused, but not by {says}: {error}"),
                ),
                _ => (Outcome::NotInserted, error.clone()),
            }
        }
        Ok(id) => *id,
    };
    let what = format!("id={id} case={} key={:?}", row.case, cut(&row.ordering_key));
    match row.expect {
        Expect::Refused(says) => (
            Outcome::NotRefused,
            format!("{what}: inserted, expected refused by {says}"),
        ),
        Expect::Parked(says) => {
            if !received.is_empty() {
                return (
                    Outcome::DeliveredNotParked,
                    format!("{what}: delivered, expected parked for {says}"),
                );
            }
            match state {
                Some(s) if s.parked && s.reason.contains(says) => (Outcome::Parked, String::new()),
                Some(s) if s.parked => (
                    Outcome::WrongReason,
                    format!("{what}: parked for {:?}, expected {says}", s.reason),
                ),
                Some(s) if s.truncated => (Outcome::Truncated, String::new()),
                Some(s) if s.published => (
                    Outcome::DeliveredNotParked,
                    format!("{what}: marked published, never received, expected parked"),
                ),
                _ => (
                    Outcome::Stuck,
                    format!("{what}: neither parked nor delivered at the end"),
                ),
            }
        }
        Expect::Delivered => {
            if !received.is_empty() {
                let payload = state.map(|s| s.payload.as_str());
                for r in received {
                    if let Some(problem) = differs(row, r, payload, default_exchange) {
                        return (Outcome::Corrupted, format!("{what}: {problem}"));
                    }
                }
                return (Outcome::Delivered, String::new());
            }
            match state {
                Some(s) if s.parked => (
                    Outcome::ParkedNotDelivered,
                    format!("{what}: parked for {:?}, expected delivered", s.reason),
                ),
                Some(s) if s.truncated && !s.published => (Outcome::Truncated, String::new()),
                Some(s) if s.published => (
                    Outcome::Stuck,
                    format!("{what}: marked published, never received"),
                ),
                _ => (Outcome::Stuck, format!("{what}: never delivered")),
            }
        }
    }
}

/// The first difference between the message and the row, if any. `payload` is the row's
/// `payload::text` as the table renders it (the body must be exactly that); the payload is
/// also compared as JSON with what was inserted.
fn differs(
    row: &BadRow,
    r: &Received,
    payload: Option<&str>,
    default_exchange: &str,
) -> Option<String> {
    let exchange = row.exchange.as_deref().unwrap_or(default_exchange);
    if r.exchange != exchange {
        return Some(format!("exchange {:?}, not {exchange:?}", r.exchange));
    }
    if r.routing_key != row.routing_key {
        return Some(format!(
            "routing key {:?}, not {:?}",
            cut(&r.routing_key),
            cut(&row.routing_key)
        ));
    }
    if r.message_id.as_deref() != Some(row.dedup_key.as_str()) {
        return Some(format!(
            "message_id {:?}, not {:?}",
            r.message_id.as_deref().map(cut),
            cut(&row.dedup_key)
        ));
    }
    if r.event_type.as_deref() != Some(row.event_type.as_str()) {
        return Some(format!(
            "type {:?}, not {:?}",
            r.event_type.as_deref().map(cut),
            cut(&row.event_type)
        ));
    }
    if r.content_type.as_deref() != Some("application/json") {
        return Some(format!("content type {:?}", r.content_type));
    }
    if r.ordering_key.as_deref() != Some(row.ordering_key.as_str()) {
        return Some("x-ordering-key differs from the row's key".into());
    }
    match serde_json::from_str::<Value>(&row.headers) {
        Ok(headers) if headers == r.headers => {}
        Ok(headers) => {
            return Some(format!(
                "headers differ: sent {}, received {}",
                cut(&headers.to_string()),
                cut(&r.headers.to_string())
            ))
        }
        Err(e) => return Some(format!("headers the soak cannot read were delivered: {e}")),
    }
    if let Some(payload) = payload {
        if r.body != payload.as_bytes() {
            return Some("body differs from the row's payload::text".into());
        }
    }
    match (
        serde_json::from_slice::<Value>(&r.body),
        serde_json::from_str::<Value>(&row.payload),
    ) {
        (Ok(got), Ok(sent)) if got == sent => None,
        (Ok(_), Ok(_)) => Some("payload differs from what was inserted".into()),
        (Err(e), _) | (_, Err(e)) => Some(format!("payload is not the inserted JSON: {e}")),
    }
}

/// The start of a long text, for messages.
fn cut(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_limit_is_where_serde_json_stops() {
        assert!(serde_json::from_str::<Value>(&nested(NESTING_OK)).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(NESTING_OK + 1)).is_err());
        assert!(serde_json::from_str::<Value>(&nested(300)).is_err());
    }

    #[test]
    fn every_case_keeps_its_limits_exactly() {
        let mut g = Generator::new(7, 131_072, "public.outbox");
        for _ in 0..3 {
            for case in CASES {
                let row = g.make(case);
                assert!(row.ordering_key.starts_with(KEY_PREFIX), "{case}");
                match case {
                    "dedup-key-255" => assert_eq!(row.dedup_key.len(), 255),
                    "dedup-key-256" => assert_eq!(row.dedup_key.len(), 256),
                    "event-type-255" => assert_eq!(row.event_type.len(), 255),
                    "event-type-256" => assert_eq!(row.event_type.len(), 256),
                    "routing-key-255" => assert_eq!(row.routing_key.len(), 255),
                    "routing-key-256" => assert_eq!(row.routing_key.len(), 256),
                    "ordering-key-1024" | "unicode-short-strings" => {
                        assert_eq!(row.ordering_key.len(), 1024)
                    }
                    "ordering-key-1025" => assert_eq!(row.ordering_key.len(), 1025),
                    "frame-under" | "frame-over" => {
                        let headers: Value = serde_json::from_str(&row.headers).unwrap();
                        let blob = headers["blob"].as_str().unwrap();
                        let size = frame_size(&row, "public.outbox", blob);
                        if case == "frame-under" {
                            assert!((131_064..=131_072).contains(&size), "{size}");
                        } else {
                            assert!((131_073..=131_080).contains(&size), "{size}");
                        }
                    }
                    _ => {}
                }
                if row.expect == Expect::Delivered {
                    // The soak compares what arrives with what serde_json reads of the row.
                    serde_json::from_str::<Value>(&row.headers).unwrap();
                    serde_json::from_str::<Value>(&row.payload).unwrap();
                }
            }
        }
    }

    #[test]
    fn the_same_seed_makes_the_same_rows() {
        let mut a = Generator::new(42, 131_072, "t");
        let mut b = Generator::new(42, 131_072, "t");
        for _ in 0..50 {
            let (x, y) = (a.next_row(), b.next_row());
            assert_eq!(
                (x.case, x.ordering_key, x.headers),
                (y.case, y.ordering_key, y.headers)
            );
        }
    }

    #[test]
    fn the_number_edges_survive_postgresql_rendering_and_serde_json() {
        // jsonb renders 1e308 as 309 digits and 5e-324 as 324 decimals; the relay reads them
        // with serde_json: these come back as the same f64.
        let big = format!("1{}", "0".repeat(308));
        let v: Value = serde_json::from_str(&big).unwrap();
        assert_eq!(v.as_f64(), Some(1e308));
        let tiny = format!("0.{}49406564584124654", "0".repeat(323));
        let v: Value = serde_json::from_str(&tiny).unwrap();
        assert_eq!(v.as_f64(), Some(f64::from_bits(1)));
    }

    #[test]
    fn amqp_values_come_back_as_the_json_they_were_made_from() {
        let mut t = FieldTable::default();
        t.insert("i".into(), AMQPValue::LongLongInt(-3));
        t.insert("f".into(), AMQPValue::Double(1.7e308));
        t.insert("s".into(), AMQPValue::LongString("é😀".into()));
        t.insert(
            "a".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Void, AMQPValue::Boolean(true)].into()),
        );
        t.insert("x-outbox-id".into(), AMQPValue::LongLongInt(9));
        assert_eq!(
            table(&t, true),
            json!({"i": -3, "f": 1.7e308, "s": "é😀", "a": [null, true]})
        );
    }

    fn row(expect: Expect) -> BadRow {
        let mut g = Generator::new(1, 131_072, "t");
        let mut r = g.make("unicode");
        r.expect = expect;
        r
    }

    fn received_of(r: &BadRow) -> Received {
        Received {
            exchange: "ex".into(),
            routing_key: r.routing_key.clone(),
            message_id: Some(r.dedup_key.clone()),
            event_type: Some(r.event_type.clone()),
            content_type: Some("application/json".into()),
            ordering_key: Some(r.ordering_key.clone()),
            headers: serde_json::from_str(&r.headers).unwrap(),
            body: r.payload.clone().into_bytes(),
        }
    }

    #[test]
    fn a_delivered_row_must_arrive_byte_for_byte() {
        let r = row(Expect::Delivered);
        let good = received_of(&r);
        assert_eq!(
            judge(&r, &Ok(1), None, std::slice::from_ref(&good), "ex").0,
            Outcome::Delivered
        );
        let mut changed = good.clone();
        // One combining mark normalised away, say.
        changed.ordering_key = Some(format!("{}\u{0301}", r.ordering_key));
        assert_eq!(
            judge(&r, &Ok(1), None, &[good, changed], "ex").0,
            Outcome::Corrupted
        );
    }

    #[test]
    fn a_row_expected_parked_must_park_with_its_reason_and_never_arrive() {
        let r = row(Expect::Parked("frame_max"));
        let parked = RowState {
            parked: true,
            published: false,
            reason: "unpublishable: ... frame_max is 131072".into(),
            payload: String::new(),
            truncated: false,
        };
        assert_eq!(
            judge(&r, &Ok(1), Some(&parked), &[], "ex").0,
            Outcome::Parked
        );
        let other = RowState {
            reason: "something else".into(),
            ..parked.clone()
        };
        assert_eq!(
            judge(&r, &Ok(1), Some(&other), &[], "ex").0,
            Outcome::WrongReason
        );
        let got = received_of(&r);
        assert_eq!(
            judge(&r, &Ok(1), Some(&parked), &[got], "ex").0,
            Outcome::DeliveredNotParked
        );
        let pending = RowState {
            parked: false,
            ..parked.clone()
        };
        assert_eq!(
            judge(&r, &Ok(1), Some(&pending), &[], "ex").0,
            Outcome::Stuck
        );
        let truncated = RowState {
            truncated: true,
            ..pending
        };
        assert_eq!(
            judge(&r, &Ok(1), Some(&truncated), &[], "ex").0,
            Outcome::Truncated
        );
    }

    #[test]
    fn a_row_expected_refused_must_fail_at_insert_naming_the_constraint() {
        let r = row(Expect::Refused("ordering_key_length"));
        let refused =
            Err("violates check constraint \"outbox_relay_outbox_ordering_key_length\"".into());
        assert_eq!(judge(&r, &refused, None, &[], "ex").0, Outcome::Refused);
        assert_eq!(judge(&r, &Ok(5), None, &[], "ex").0, Outcome::NotRefused);
        assert!(Outcome::NotRefused.is_failure() && !Outcome::Truncated.is_failure());
    }
}
