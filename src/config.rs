//! Typed settings loaded from one TOML file plus `OUTBOX_RELAY__SECTION__KEY` environment
//! overrides. Owns validation of everything a user can write; must not open connections.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod mapping;
pub use mapping::{
    ColumnMap, ColumnsSettings, DebeziumSettings, Layout, Part, PayloadType, RouteTo,
};
mod amqp_url;
mod layers;
mod message_format;
pub use message_format::MessageFormat;
mod postgres_url;
pub use layers::ENV_PREFIX;
use layers::{LayerError, Node, Override};

/// The sections of the config file.
const SECTIONS: [&str; 8] = [
    "postgres",
    "rabbitmq",
    "relay",
    "retry",
    "log",
    "health",
    "telemetry",
    "outbox",
];
pub use postgres_url::PgHost;

/// The most `[[outbox]]` tables one relay process serves.
pub const MAX_TABLES: usize = 1000;

/// Exit code for configuration errors (sysexits.h `EX_CONFIG`); the systemd unit does not restart on it.
pub const EX_CONFIG: i32 = 78;

/// Everything the relay reads from its config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub postgres: PostgresSettings,
    pub rabbitmq: RabbitSettings,
    #[serde(default)]
    pub relay: RelaySettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub health: HealthSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    pub outbox: Vec<OutboxSettings>,
}

/// The optional HTTP health endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// `host:port` to serve `/ready` and `/live` on; unset, no endpoint.
    pub listen: Option<std::net::SocketAddr>,
}

/// The relay's own spans, exported over OTLP (`crate::telemetry::otlp`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP collector's base URL (`http://host:4318`); the spans go to its
    /// `/v1/traces`. Unset, no spans are made or exported.
    pub otlp_endpoint: Option<String>,
    /// Where the spans are posted: `otlp_endpoint` with `/v1/traces`, unless the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (with
    /// `/v1/traces`) names another collector; resolved by [`Settings::load`]. `None`: export
    /// is off.
    #[serde(skip)]
    pub traces_url: Option<String>,
}

/// The standard OpenTelemetry variables that say where spans go, as read from the environment.
#[derive(Debug, Clone, Default)]
pub struct OtelEnv {
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full URL, used as it is.
    pub traces_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: a base URL, `/v1/traces` appended.
    pub endpoint: Option<String>,
    /// `OTEL_SDK_DISABLED=true`: no spans, whatever the config says.
    pub sdk_disabled: bool,
}

impl OtelEnv {
    /// The variables as the process has them (empty ones count as unset, as the spec says).
    pub fn from_process() -> OtelEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        OtelEnv {
            traces_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            sdk_disabled: var("OTEL_SDK_DISABLED")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
        }
    }
}

impl TelemetrySettings {
    /// Resolves [`TelemetrySettings::traces_url`]. Export is on only when `otlp_endpoint` is
    /// set (in the file or as `OUTBOX_RELAY__TELEMETRY__OTLP_ENDPOINT`): the `OTEL_` variables
    /// alone never turn it on (an environment set up for other programs does not make the relay
    /// export), but once it is on they say where to, as they override the file everywhere.
    /// Returns the problems of the variables, each naming its variable.
    pub fn resolve(&mut self, env: &OtelEnv) -> Vec<String> {
        self.traces_url = None;
        let Some(key) = &self.otlp_endpoint else {
            return Vec::new();
        };
        if env.sdk_disabled {
            return Vec::new();
        }
        let (name, url) = match (&env.traces_endpoint, &env.endpoint) {
            (Some(url), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.trim().to_owned()),
            (None, Some(base)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", traces_url_of(base.trim())),
            (None, None) => {
                // Its problems are the key's (`Settings::problems`).
                if otlp_endpoint_problem(key).is_none() {
                    self.traces_url = Some(traces_url_of(key.trim()));
                }
                return Vec::new();
            }
        };
        match otlp_endpoint_problem(&url) {
            Some(problem) => vec![format!("{name}: {problem}")],
            None => {
                self.traces_url = Some(url);
                Vec::new()
            }
        }
    }
}

/// The OTLP/HTTP traces URL of a base endpoint, as the OpenTelemetry spec builds it from
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: `v1/traces` appended to its path.
fn traces_url_of(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

/// Why `text` is not an OTLP/HTTP endpoint the relay can post to, if it is not: an `http://`
/// URL with a host, without user information, query or fragment. `https://` is refused: the
/// exporter's client has no TLS (export to a local collector or agent, which forwards).
pub fn otlp_endpoint_problem(text: &str) -> Option<String> {
    const EXPECTED: &str = "expected an http:// URL such as http://127.0.0.1:4318";
    let url = match url::Url::parse(text.trim()) {
        Ok(url) => url,
        Err(e) => return Some(format!("{EXPECTED}, got {text:?} ({e})")),
    };
    match url.scheme() {
        "http" => {}
        "https" => {
            return Some(format!(
                "{EXPECTED}, got {text:?}: the relay exports over plain HTTP only (no TLS); \
                 point it at a collector or agent on the same host or network"
            ))
        }
        other => return Some(format!("{EXPECTED}, got the scheme {other:?}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Some(format!("{EXPECTED}, got {text:?} (no host)"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some(format!(
            "{EXPECTED} without user or password (send credentials as headers in \
             OTEL_EXPORTER_OTLP_HEADERS)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some(format!(
            "{EXPECTED}, without query or fragment, got {text:?}"
        ));
    }
    None
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database`, or several hosts tried in order for the
    /// primary (`postgres://u@a:5432,b:5432/db`, `host=a,b port=5432 ...`); the password never
    /// appears in logs or errors. A `/ ? # @` in the user name or password must be
    /// percent-encoded. Query parameters are those the driver reads (sslmode, sslrootcert,
    /// sslcert, sslkey, application_name, options, ...; see `postgres_url`), each checked at
    /// load; any other is refused. Either this or `url_file`; after [`Settings::load`] it holds
    /// the file's URL.
    #[serde(default)]
    pub url: SecretUrl,
    /// A file that holds the URL (a systemd credential, say), read by [`Settings::load`]; a
    /// relative path is taken in `$CREDENTIALS_DIRECTORY`. See [`read_url_file`].
    pub url_file: Option<PathBuf>,
    /// Pool size for fetch, mark and status statements, shared by every table (the one
    /// coordination session for locks, LISTEN and the poll is extra).
    #[serde(default = "defaults::pg_max_connections")]
    pub max_connections: u32,
    #[serde(default = "defaults::connect_timeout", with = "layers::duration_text")]
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout` for the relay's sessions; the relay's own deadline is
    /// 2 s later, so a silent network is noticed too.
    #[serde(
        default = "defaults::statement_timeout",
        with = "layers::duration_text"
    )]
    pub statement_timeout: Duration,
}

impl PostgresSettings {
    /// The servers `url` names, in the order they are tried for the primary (one URL each).
    /// [`Settings::load`] has checked that this succeeds.
    pub fn hosts(&self) -> Result<Vec<PgHost>, String> {
        postgres_url::hosts(&self.url)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSettings {
    /// `amqp://user:password@host:port/vhost` (or `amqps://`), or a list of them, one per node
    /// of a cluster: the relay connects to the first that answers and moves to the next when
    /// its node goes away ([`NodeUrls`]). Passwords never appear in logs or errors; a
    /// `/ ? # @` in one must be percent-encoded. Query parameters are those the AMQP client
    /// reads (heartbeat, frame_max, channel_max, connection_timeout, auth_mechanism), checked
    /// at load; any other is refused (TLS settings go in `[rabbitmq.tls]`). Either this or
    /// `url_file`; after [`Settings::load`] it holds the file's URLs.
    #[serde(default)]
    pub url: NodeUrls,
    /// A file that holds the URL (or one URL per line), like `postgres.url_file`.
    pub url_file: Option<PathBuf>,
    /// Client-provided connection name, shown by `rabbitmqctl list_connections client_properties`.
    #[serde(default = "defaults::connection_name")]
    pub connection_name: String,
    #[serde(default = "defaults::connect_timeout", with = "layers::duration_text")]
    pub connect_timeout: Duration,
    /// How long a publish may wait for the broker's confirm before the connection is presumed dead.
    #[serde(default = "defaults::confirm_timeout", with = "layers::duration_text")]
    pub confirm_timeout: Duration,
    /// Messages larger than this are parked at once instead of being sent (RabbitMQ's
    /// `max_message_size`; the relay also learns a lower limit from the broker's refusal).
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// `[rabbitmq.tls]`: the CA, client certificate and server name of an `amqps://` connection.
    pub tls: Option<RabbitTlsSettings>,
}

/// `[rabbitmq.tls]`: how the relay checks the broker and proves itself to it. The files are
/// read and checked at load, and read again at every connect (renewed certificates are used
/// from the next reconnect on).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTlsSettings {
    /// PEM file of the CA certificates that sign the broker's certificate, trusted on top of the
    /// system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the relay's client certificate (and its chain), for brokers that require one.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (unencrypted); with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it is not the URL's host (a broker
    /// reached by IP address or through a tunnel).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// Rows fetched per statement.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// Safety-net poll when no notification arrives.
    #[serde(default = "defaults::poll_interval", with = "layers::duration_text")]
    pub poll_interval: Duration,
    /// Messages per table published but not yet marked (unconfirmed, or confirmed with the mark
    /// not written yet): the most a crash or a broken connection can send twice.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Rows the whole process holds in memory at most (fetched and not yet settled), shared
    /// fairly by its tables and channels.
    #[serde(default = "defaults::max_rows_in_memory")]
    pub max_rows_in_memory: usize,
    /// LISTEN for the insert trigger's NOTIFY; switch off for write-heavy databases.
    #[serde(default = "defaults::yes")]
    pub notify: bool,
    /// How long SIGTERM waits for in-flight confirms before exiting.
    #[serde(default = "defaults::shutdown_timeout", with = "layers::duration_text")]
    pub shutdown_timeout: Duration,
    /// Cap of the reconnect backoff after a broker or database outage.
    #[serde(
        default = "defaults::reconnect_max_delay",
        with = "layers::duration_text"
    )]
    pub reconnect_max_delay: Duration,
    /// How often a relay renews its partition leases (one statement per table).
    #[serde(default = "defaults::heartbeat", with = "layers::duration_text")]
    pub heartbeat: Duration,
    /// How long a relay's leases outlive its last heartbeat: a relay that stopped (paused, cut
    /// off) loses its partitions this long after it last renewed. Unset: three heartbeats plus
    /// [`RelaySettings::settle_margin`].
    #[serde(default, with = "layers::duration_text::option")]
    pub lease: Option<Duration>,
    /// Broker channels per table; partition p goes out on channel p % channels.
    #[serde(default = "defaults::channels")]
    pub channels: u32,
}

/// Retry policy, global with optional per-table overrides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(default = "defaults::initial_delay", with = "layers::duration_text")]
    pub initial_delay: Duration,
    #[serde(default = "defaults::max_delay", with = "layers::duration_text")]
    pub max_delay: Duration,
    #[serde(default = "defaults::multiplier")]
    pub multiplier: f64,
    /// Fraction of each delay that is randomised away (0 = none, 1 = full jitter).
    #[serde(default = "defaults::jitter")]
    pub jitter: f64,
    /// Failed publishes before a row is parked.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub on_exhausted: OnExhausted,
}

/// The same keys as [`RetrySettings`], each optional, for `[outbox.retry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    #[serde(default, with = "layers::duration_text::option")]
    pub initial_delay: Option<Duration>,
    #[serde(default, with = "layers::duration_text::option")]
    pub max_delay: Option<Duration>,
    pub multiplier: Option<f64>,
    pub jitter: Option<f64>,
    pub max_attempts: Option<u32>,
    pub on_exhausted: Option<OnExhausted>,
}

/// What a parked row means for the rows behind it on the same ordering key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Park the row and hold its key back until `retry` releases it (keeps order).
    #[default]
    HoldKey,
    /// Park the row and let later rows of its key go on.
    Skip,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `outbox_relay=debug`); `RUST_LOG` wins when set.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// `table` or `schema.table`, as PostgreSQL reads it: unquoted parts fold to lower case
    /// (`public.OutBox` is `public.outbox`), parts in double quotes keep their case
    /// (`'public."OutBox"'`). See [`TableName::parse`].
    pub table: TableName,
    /// Exchange for rows whose `exchange` column is null.
    pub exchange: String,
    /// Declare the table's exchange at connect (otherwise it must exist).
    pub declare_exchange: Option<ExchangeDeclaration>,
    #[serde(default)]
    pub retry: RetryOverride,
    /// What becomes of a row once the broker confirmed it.
    #[serde(default)]
    pub on_published: OnPublished,
    /// With `on_published = "mark"`: published rows older than this are deleted by the
    /// retention sweeper; unset, they are kept.
    #[serde(default, with = "layers::duration_text::option")]
    pub retention: Option<Duration>,
    /// `"relay"` (the relay's own columns, or those of `[outbox.columns]`) or `"debezium"`.
    #[serde(default)]
    pub layout: Layout,
    /// `[outbox.columns]`: the names of an adopted table's own columns.
    pub columns: Option<ColumnsSettings>,
    /// `[outbox.debezium]`: Debezium's options, with `layout = "debezium"`.
    pub debezium: Option<DebeziumSettings>,
    /// The resolved mapping of an adopted table (`None`: the relay's own columns); set by
    /// [`Settings::load`].
    #[serde(skip)]
    pub mapping: Option<std::sync::Arc<ColumnMap>>,
    /// How many partitions the table's ordering keys hash into (the unit of order, and what
    /// the relays share through leases). Fixed once the table's leases exist.
    #[serde(default = "defaults::partitions")]
    pub partitions: u32,
    /// `"outbox"` (the relay's own headers), `"cloudevents"` (and a CloudEvent in binary
    /// content mode) or `"cloudevents-structured"` (a JSON CloudEvent as the body).
    #[serde(default)]
    pub message_format: MessageFormat,
    /// The CloudEvents `source` (a URI-reference); unset, `/outbox-relay/<database>/<table>`.
    pub cloudevents_source: Option<String>,
    /// Row headers sent as CloudEvents extension attributes: `"header"` (the header's name is
    /// the attribute's) or `"header:attribute"`.
    #[serde(default)]
    pub cloudevents_extensions: Vec<String>,
}

/// The most partitions a table may have.
pub const MAX_PARTITIONS: u32 = 65_536;

/// The shortest `retention` accepted: the sweeper looks once a minute, so a shorter one would
/// not be kept anyway, and a typo ("7s" for "7d") would delete what an operator meant to keep.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);

/// What the relay does with a row the broker confirmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPublished {
    /// Set `published_at` and keep the row (history; see `retention`).
    #[default]
    Mark,
    /// Delete the row: the table holds unpublished rows only.
    Delete,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDeclaration {
    /// `direct`, `fanout`, `topic` or `headers`.
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    #[serde(default = "defaults::yes")]
    pub durable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

mod defaults {
    use std::time::Duration;
    pub fn yes() -> bool {
        true
    }
    pub fn pg_max_connections() -> u32 {
        4
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn statement_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connection_name() -> String {
        "outbox-relay".into()
    }
    pub fn confirm_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_message_bytes() -> usize {
        128 * 1024 * 1024
    }
    pub fn batch_size() -> u32 {
        1000
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_in_flight() -> usize {
        1000
    }
    pub fn max_rows_in_memory() -> usize {
        20_000
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn reconnect_max_delay() -> Duration {
        Duration::from_secs(30)
    }
    pub fn heartbeat() -> Duration {
        Duration::from_secs(2)
    }
    pub fn channels() -> u32 {
        1
    }
    pub fn partitions() -> u32 {
        256
    }
    pub fn initial_delay() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_delay() -> Duration {
        Duration::from_secs(300)
    }
    pub fn multiplier() -> f64 {
        2.0
    }
    pub fn jitter() -> f64 {
        0.2
    }
    pub fn max_attempts() -> u32 {
        10
    }
    pub fn log_level() -> String {
        "info".into()
    }
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: defaults::batch_size(),
            poll_interval: defaults::poll_interval(),
            max_in_flight: defaults::max_in_flight(),
            max_rows_in_memory: defaults::max_rows_in_memory(),
            notify: true,
            shutdown_timeout: defaults::shutdown_timeout(),
            reconnect_max_delay: defaults::reconnect_max_delay(),
            heartbeat: defaults::heartbeat(),
            lease: None,
            channels: defaults::channels(),
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            initial_delay: defaults::initial_delay(),
            max_delay: defaults::max_delay(),
            multiplier: defaults::multiplier(),
            jitter: defaults::jitter(),
            max_attempts: defaults::max_attempts(),
            on_exhausted: OnExhausted::default(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: defaults::log_level(),
        }
    }
}

impl RetrySettings {
    /// This policy with a table's overrides applied.
    pub fn with_override(&self, o: &RetryOverride) -> RetrySettings {
        RetrySettings {
            initial_delay: o.initial_delay.unwrap_or(self.initial_delay),
            max_delay: o.max_delay.unwrap_or(self.max_delay),
            multiplier: o.multiplier.unwrap_or(self.multiplier),
            jitter: o.jitter.unwrap_or(self.jitter),
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            on_exhausted: o.on_exhausted.unwrap_or(self.on_exhausted),
        }
    }

    fn problems(&self, key: &str, out: &mut Vec<String>) {
        if self.initial_delay.is_zero() {
            out.push(format!("{key}.initial_delay: must be more than 0"));
        }
        if self.max_delay < self.initial_delay {
            out.push(format!(
                "{key}.max_delay: must be at least initial_delay ({})",
                humantime::format_duration(self.initial_delay)
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier <= 100.0) {
            out.push(format!(
                "{key}.multiplier: expected 1.0 to 100.0, got {}",
                self.multiplier
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            out.push(format!(
                "{key}.jitter: expected 0.0 to 1.0, got {}",
                self.jitter
            ));
        }
        if self.max_attempts == 0 {
            out.push(format!("{key}.max_attempts: must be at least 1"));
        }
    }
}

/// A connection URL whose password is redacted wherever it is printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, for handing to a client library. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, whatever characters the password holds: the URL is
    /// parsed and printed from its parts with `***` for the password (and for a `password`
    /// parameter). A URL that cannot be parsed, or whose user information cannot be told from
    /// its host (a password with an unencoded `/`, `?`, `#` or `@` in it), is shown as its
    /// scheme and `<not shown: reason>` only: text is never masked by searching for an `@`.
    /// PostgreSQL's other forms (several hosts, key=value pairs) are printed from their parsed
    /// parts the same way ([`postgres_url::redacted`]).
    pub fn redacted(&self) -> String {
        let text = self.0.trim();
        let Some((scheme, rest)) = text.split_once("://") else {
            return postgres_url::redacted_key_values(text);
        };
        if !is_scheme(scheme) {
            return "<not shown: not a URL (no scheme:// at its start)>".into();
        }
        if let Some(reason) = unclear_userinfo(rest) {
            return format!("{scheme}://<not shown: {reason}>");
        }
        if matches!(scheme, "postgres" | "postgresql") {
            return postgres_url::redacted(self);
        }
        match url::Url::parse(text) {
            Ok(url) => without_password(&url).unwrap_or_else(|| {
                format!("{scheme}://<not shown: the password cannot be removed>")
            }),
            Err(e) => format!("{scheme}://<not shown: not a URL the client can read ({e})>"),
        }
    }

    /// The scheme written before `://`, whether or not the rest parses.
    fn scheme(&self) -> Option<String> {
        let (scheme, _) = self.0.trim().split_once("://")?;
        is_scheme(scheme).then(|| scheme.to_ascii_lowercase())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUrl)
    }
}

/// A URL scheme: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(text: &str) -> bool {
    text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Why the user information of a URL (`rest`, the text after `scheme://`) cannot be told from
/// the rest of it, if it cannot. A URL parser ends the authority at the first `/`, `?` or `#`,
/// so a password holding one of them unencoded spills into the host, the path or the query,
/// and an `@` (or a `#`) after that point is the sign. Such a URL is refused at load and never
/// printed: no parser can say which of its pieces are the password.
pub(crate) fn unclear_userinfo(rest: &str) -> Option<&'static str> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[end..].contains(['@', '#']) {
        return Some(
            "an '@' or '#' after the host: a user name or password that holds / ? # or @ must \
             have them percent-encoded (%2F %3F %23 %40), and so must an @ or # in the path or \
             a parameter",
        );
    }
    None
}

/// `url` printed from its parts with `***` for its password and for the value of a `password`
/// parameter; `None` when the password cannot be replaced (a URL without a host).
pub(crate) fn without_password(url: &url::Url) -> Option<String> {
    let mut url = url.clone();
    if url.password().is_some() {
        url.set_password(Some("***")).ok()?;
    }
    if url.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Some(url.to_string())
}

/// `rabbitmq.url`: the broker's URL, or the URLs of a cluster's nodes in the order the relay
/// tries them. Written as a string or an array of strings; a string may list several URLs
/// separated by commas (for `OUTBOX_RELAY__RABBITMQ__URL`), split only where the next URL's
/// `amqp://` or `amqps://` starts, so a comma in a password stays in it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NodeUrls(Vec<SecretUrl>);

impl NodeUrls {
    /// The URLs in `text`: one per line, or separated by commas where the next URL starts;
    /// blank lines and surrounding white space are ignored.
    pub fn parse(text: &str) -> NodeUrls {
        let mut urls = Vec::new();
        for line in text.lines() {
            let mut rest = line.trim();
            while !rest.is_empty() {
                let next = rest.match_indices(',').map(|(at, _)| at).find(|&at| {
                    let after = rest[at + 1..].trim_start();
                    after.starts_with("amqp://") || after.starts_with("amqps://")
                });
                let (url, tail) = match next {
                    Some(at) => (&rest[..at], &rest[at + 1..]),
                    None => (rest, ""),
                };
                if !url.trim().is_empty() {
                    urls.push(SecretUrl::new(url.trim()));
                }
                rest = tail.trim_start();
            }
        }
        NodeUrls(urls)
    }

    /// The nodes in the order the relay tries them (never empty after [`Settings::load`]).
    pub fn nodes(&self) -> &[SecretUrl] {
        &self.0
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every problem of the list, for the key `key` (`rabbitmq.url`, `rabbitmq.url_file`, ...):
    /// `expected` when a URL is not `amqp://` or `amqps://`, a mix of the two, a URL twice.
    fn problems(&self, key: &str, describe_got: &dyn Fn(&SecretUrl) -> String) -> Vec<String> {
        let mut out = Vec::new();
        let one = self.0.len() == 1;
        let name = |i: usize| {
            if one {
                key.to_owned()
            } else {
                format!("{key}[{i}]")
            }
        };
        for (i, url) in self.0.iter().enumerate() {
            if !matches!(url.scheme().as_deref(), Some("amqp" | "amqps")) {
                out.push(format!("{}: {}", name(i), describe_got(url)));
            } else {
                for problem in amqp_url::problems(url) {
                    out.push(format!("{}: {problem}", name(i)));
                }
            }
            if self.0[..i].contains(url) {
                out.push(format!("{}: {} is listed twice", name(i), url.redacted()));
            }
        }
        let schemes: HashSet<String> = self.0.iter().filter_map(SecretUrl::scheme).collect();
        if schemes.contains("amqp") && schemes.contains("amqps") {
            out.push(format!(
                "{key}: mixes amqp:// and amqps:// nodes ({self}); every node of a cluster is \
                 reached the same way"
            ));
        }
        out
    }
}

impl fmt::Debug for NodeUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

/// The redacted URLs, separated by ", ".
impl fmt::Display for NodeUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: Vec<String> = self.0.iter().map(SecretUrl::redacted).collect();
        f.write_str(&redacted.join(", "))
    }
}

impl<'de> Deserialize<'de> for NodeUrls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d)? {
            OneOrMany::One(text) => Ok(NodeUrls::parse(&text)),
            OneOrMany::Many(urls) => Ok(NodeUrls(
                urls.into_iter().map(|u| SecretUrl::new(u.trim())).collect(),
            )),
        }
    }
}

/// A validated `schema.table` name, each part the name PostgreSQL's catalog holds (what
/// `TG_TABLE_SCHEMA` and `TG_TABLE_NAME` say): an unquoted part is folded to lower case the way
/// PostgreSQL folds it, a part in double quotes is kept as written. Only ever reaches SQL
/// quoted, through [`TableName::quoted`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// PostgreSQL's longest identifier (NAMEDATALEN - 1); a longer one it would truncate.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// What a table name may be, for the error of one that is not.
const TABLE_NAME_RULE: &str = "a table name is `table` or `schema.table`; each part a plain \
     identifier (letters, digits and _, not starting with a digit), which PostgreSQL folds to \
     lower case, or a name in double quotes that keeps its case (`'public.\"OutBox\"'` in TOML, \
     \"\" for a quote in it, no '.', ' or \\); at most 63 bytes each";

impl TableName {
    /// Accepts `table` (schema `public`) or `schema.table`, each part written as PostgreSQL
    /// reads it in SQL: `OutBox` is the table `outbox`, `"OutBox"` the table `OutBox`. A part
    /// in quotes that would read the same without them (`"outbox"`) is refused, so that each
    /// table has one spelling in the config, `--table` and the relay's output.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts = split_name(s).map_err(|e| format!("{s:?}: {e}; {TABLE_NAME_RULE}"))?;
        let (schema, name) = match parts.as_slice() {
            [name] => ("public".to_owned(), name.clone()),
            [schema, name] => (schema.clone(), name.clone()),
            _ => {
                return Err(format!(
                    "{s:?} is not `table` or `schema.table` (has {} parts); {TABLE_NAME_RULE}",
                    parts.len()
                ))
            }
        };
        Ok(Self { schema, name })
    }

    /// The name as the config (and `--table`) spells it: each part bare when PostgreSQL reads it
    /// so unquoted, else in double quotes (`public.outbox`, `app."OutBox"`); [`TableName::parse`]
    /// reads it back to the same name. For messages that a user may copy into the config.
    pub fn written(&self) -> String {
        let part = |p: &str| match plain_part(p) {
            Ok(folded) if folded == p => p.to_owned(),
            _ => quote_ident(p),
        };
        format!("{}.{}", part(&self.schema), part(&self.name))
    }

    /// `"schema"."table"`, safe to paste into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// A relay-owned object name derived from the table (`outbox_relay_<table>_<suffix>`),
    /// within PostgreSQL's 63-byte identifier limit. The same table always gives the same
    /// name. A table name with characters other than letters, digits and _ (possible in
    /// quotes), or one too long, gives `outbox_relay_<hash of schema.table>_<suffix>`, so a
    /// derived name is always letters, digits and _ (it is also written as a string literal,
    /// the NOTIFY channel).
    pub fn derived(&self, suffix: &str) -> String {
        let full = format!("outbox_relay_{}_{}", self.name, suffix);
        let plain = self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if plain && full.len() <= MAX_IDENTIFIER_BYTES {
            return full;
        }
        let hash = self
            .to_string()
            .bytes()
            .fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
        format!("outbox_relay_{:016x}_{}", hash, suffix)
    }
}

/// The parts of a table name separated by `.`, each folded or unquoted (see
/// [`TableName::parse`]), or what is wrong with it.
fn split_name(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let part = if chars.peek() == Some(&'"') {
            chars.next();
            let mut text = String::new();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        text.push('"');
                    }
                    Some('"') => break,
                    Some(c) => text.push(c),
                    None => return Err("a double quote is not closed".into()),
                }
            }
            quoted_part(&text)?
        } else {
            let mut text = String::new();
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                text.push(c);
                chars.next();
            }
            plain_part(&text)?
        };
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => return Err(format!("{c:?} after a closing double quote (expected '.')")),
        }
    }
}

/// An unquoted part: a plain identifier, folded to lower case (ASCII only, as PostgreSQL does).
fn plain_part(text: &str) -> Result<String, String> {
    let valid_start = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let valid_rest = text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if text.is_empty() {
        return Err("a part is empty".into());
    }
    if !valid_start || !valid_rest {
        return Err(format!("{text:?} is not a plain identifier"));
    }
    if text.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!("{text:?} is longer than 63 bytes"));
    }
    Ok(text.to_ascii_lowercase())
}

/// The text inside double quotes, kept as written.
fn quoted_part(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("a quoted part is empty".into());
    }
    if text.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!("{text:?} is longer than 63 bytes"));
    }
    // '.' would make `schema.table` ambiguous (two tables, one lock key); ' and \ would reach
    // the string literals the relay writes names into (`'...'::regclass`).
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() || matches!(c, '.' | '\'' | '\\'))
    {
        return Err(format!("the quoted name {text:?} contains {c:?}"));
    }
    if plain_part(text).is_ok_and(|folded| folded == text) {
        return Err(format!(
            "\"{text}\" needs no quotes: write {text} (quotes are for a name with capitals or \
             other characters)"
        ));
    }
    Ok(text.to_owned())
}

/// `schema.table` as the catalog holds it, unquoted (`public.outbox`, `app.OutBox` for a
/// quoted name): what the order guard computes as `TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME`
/// for its per-key lock, which the relay's hold must take on the same text, and the table's
/// key in `outbox_relay.migrations`, the `x-outbox-table` header and the metrics.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl<'de> Deserialize<'de> for TableName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TableName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Double-quotes an identifier, doubling embedded quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// RabbitMQ's rule for exchange names: at most 255 bytes of letters, digits, `-`, `_`, `.`, `:`.
pub fn exchange_name_problem(name: &str) -> Option<String> {
    if name.len() > 255 {
        return Some(format!(
            "exchange name is {} bytes; at most 255",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Some(format!(
            "exchange name {name:?} contains {c:?}; allowed are letters, digits, - _ . :"
        ));
    }
    None
}

/// The variable in which systemd names the directory of a service's credentials
/// (`LoadCredential=`, `SetCredential=`); a relative `url_file` is taken in it.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// The most a `url_file` may hold: one URL, not a file named by mistake.
const MAX_URL_FILE_BYTES: u64 = 64 * 1024;

/// Reads the URL that `file` holds, for the key `key` (`postgres.url_file`, say).
///
/// A relative path is taken in `credentials`, the service's `$CREDENTIALS_DIRECTORY`; without
/// one it is an error (systemd sets the variable only for a service with credentials), so a
/// relative path never silently means the working directory. Trailing newlines (`\n`, `\r\n`)
/// are dropped. A missing, unreadable, empty or oversized file is an error that names the key
/// and the path, never what the file holds.
pub fn read_url_file(
    key: &str,
    file: &Path,
    credentials: Option<&Path>,
) -> Result<SecretUrl, String> {
    use std::io::Read;

    let path = match credentials {
        _ if file.is_absolute() => file.to_owned(),
        Some(dir) => dir.join(file),
        None => {
            return Err(format!(
                "{key}: \"{}\" is a relative path and ${CREDENTIALS_DIRECTORY} is not set \
                 (systemd sets it for a service with LoadCredential=); give an absolute path",
                file.display()
            ))
        }
    };
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_URL_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_URL_FILE_BYTES {
        return Err(format!(
            "{key}: {} is larger than {} KiB; expected one URL",
            path.display(),
            MAX_URL_FILE_BYTES / 1024
        ));
    }
    let url = text.trim_end_matches(['\n', '\r']);
    if url.is_empty() {
        return Err(format!(
            "{key}: {} is empty; expected one URL",
            path.display()
        ));
    }
    Ok(SecretUrl::new(url))
}

/// A configuration that could not be loaded: every problem found, those of the file (named
/// by their key) apart from those of the `OUTBOX_RELAY__...` variables (named by the variable
/// and the key it sets), so that neither is blamed on the other.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// The problems of the file, or of the config as a whole.
    pub problems: Vec<String>,
    /// The problems of values the environment set.
    pub environment: Vec<String>,
}

impl ConfigError {
    /// Problems of the file `file` (or of the config as a whole).
    pub fn in_file(file: &Path, problems: Vec<String>) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            problems,
            environment: Vec::new(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match (self.problems.is_empty(), self.environment.is_empty()) {
            (_, true) => write!(f, "invalid configuration in {file}:")?,
            (true, false) => write!(f, "invalid configuration in the environment:")?,
            (false, false) => write!(f, "invalid configuration in {file} and the environment:")?,
        }
        for problem in self.problems.iter().chain(&self.environment) {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl Settings {
    /// What a relay needs after its last publish to settle it: the confirm may take
    /// `rabbitmq.confirm_timeout`, the mark `postgres.statement_timeout`. Publishing stops
    /// this long before a lease could run out.
    pub fn settle_margin(&self) -> Duration {
        self.rabbitmq.confirm_timeout + self.postgres.statement_timeout
    }

    /// `relay.lease`, or its default: three heartbeats plus the settle margin.
    pub fn lease(&self) -> Duration {
        self.relay
            .lease
            .unwrap_or(self.relay.heartbeat * 3 + self.settle_margin())
    }

    /// Loads `path` and the `OUTBOX_RELAY__SECTION__KEY` environment, reads the `url_file`s
    /// (relative ones in `$CREDENTIALS_DIRECTORY`), then validates everything.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let credentials = std::env::var_os(CREDENTIALS_DIRECTORY)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from);
        let mut env = Vec::new();
        let mut not_unicode = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => env.push((name.to_owned(), value)),
                Err(_) => not_unicode.push(format!("{name}: the value is not UTF-8 text")),
            }
        }
        let loaded = Self::load_from(path, credentials.as_deref(), &env).and_then(|mut s| match s
            .telemetry
            .resolve(&OtelEnv::from_process())
        {
            problems if problems.is_empty() => Ok(s),
            problems => Err(ConfigError {
                file: path.to_owned(),
                problems: Vec::new(),
                environment: problems,
            }),
        });
        match (loaded, not_unicode.is_empty()) {
            (loaded, true) => loaded,
            (Ok(_), false) => Err(ConfigError {
                file: path.to_owned(),
                problems: Vec::new(),
                environment: not_unicode,
            }),
            (Err(mut e), false) => {
                e.environment.extend(not_unicode);
                Err(e)
            }
        }
    }

    /// [`Settings::load`] with the credentials directory and the environment's
    /// `OUTBOX_RELAY__...` variables given rather than read from the process.
    fn load_from(
        path: &Path,
        credentials: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Settings, ConfigError> {
        let mut error = ConfigError::in_file(path, Vec::new());
        if !path.is_file() {
            error
                .problems
                .push("file not found (set --config or OUTBOX_RELAY_CONFIG)".into());
            return Err(error);
        }
        let mut tree = match std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the file: {e}"))
            .and_then(|text| layers::parse_file(&text))
        {
            Ok(tree) => tree,
            Err(problem) => {
                error.problems.push(problem);
                return Err(error);
            }
        };
        let (overrides, env_problems) = layers::apply_env(&mut tree, env);
        error.environment = env_problems;
        let mut settings = match Settings::read(&tree) {
            Ok(settings) if error.environment.is_empty() => settings,
            Ok(_) => return Err(error),
            Err(problems) => {
                for problem in problems {
                    match problem.is_from_env() {
                        true => error.environment.push(problem.to_string()),
                        false => error.problems.push(problem.to_string()),
                    }
                }
                return Err(error);
            }
        };
        let mut problems = settings.read_url_files(credentials);
        problems.extend(settings.resolve_mappings());
        problems.extend(settings.problems());
        for problem in problems {
            match attribute(&problem, &overrides) {
                Some(named) => error.environment.push(named),
                None => error.problems.push(problem),
            }
        }
        if error.problems.is_empty() && error.environment.is_empty() {
            Ok(settings)
        } else {
            Err(error)
        }
    }

    /// The settings in `tree`, each section read on its own (and each `[[outbox]]` table), so
    /// that the first problem of each is reported, not only the first of the whole file.
    fn read(tree: &Node) -> Result<Settings, Vec<LayerError>> {
        use layers::Segment::{Index, Key};
        let mut problems = Vec::new();
        let required = |name: &'static str, problems: &mut Vec<LayerError>| {
            let node = tree.get(name);
            if node.is_none() {
                problems.push(LayerError::required_section(name));
            }
            node
        };
        fn section<T: serde::de::DeserializeOwned>(
            node: Option<&Node>,
            name: &str,
            problems: &mut Vec<LayerError>,
        ) -> Option<T> {
            node?
                .read(Key(name.into()))
                .map_err(|e| problems.extend(e))
                .ok()
        }
        let postgres = required("postgres", &mut problems);
        let postgres: Option<PostgresSettings> = section(postgres, "postgres", &mut problems);
        let rabbitmq = required("rabbitmq", &mut problems);
        let rabbitmq: Option<RabbitSettings> = section(rabbitmq, "rabbitmq", &mut problems);
        let relay = section(tree.get("relay"), "relay", &mut problems);
        let retry = section(tree.get("retry"), "retry", &mut problems);
        let log = section(tree.get("log"), "log", &mut problems);
        let health = section(tree.get("health"), "health", &mut problems);
        let telemetry = section(tree.get("telemetry"), "telemetry", &mut problems);
        let mut outbox = Vec::new();
        match required("outbox", &mut problems) {
            None => {}
            Some(node) if node.is_file_table() => problems.push(LayerError::problem(
                "outbox",
                "`[outbox]` is a table; write `[[outbox]]` (two brackets), one for each outbox \
                 table",
            )),
            Some(node) => match node.elements() {
                None => problems.push(LayerError::problem(
                    "outbox",
                    "expected the outbox tables: write `[[outbox]]` with table and exchange, one \
                     for each outbox table",
                )),
                Some(tables) => {
                    for (i, table) in tables.iter().enumerate() {
                        match table.read::<OutboxSettings>(Index(i)) {
                            Ok(table) => outbox.push(table),
                            Err(e) => {
                                problems.extend(e.into_iter().map(|e| e.at(Key("outbox".into()))))
                            }
                        }
                    }
                }
            },
        }
        for key in tree.keys() {
            if !SECTIONS.contains(&key) {
                problems.push(LayerError::unknown_key(key, &SECTIONS));
            }
        }
        match (postgres, rabbitmq) {
            (Some(postgres), Some(rabbitmq)) if problems.is_empty() => Ok(Settings {
                postgres,
                rabbitmq,
                relay: relay.unwrap_or_default(),
                retry: retry.unwrap_or_default(),
                log: log.unwrap_or_default(),
                health: health.unwrap_or_default(),
                telemetry: telemetry.unwrap_or_default(),
                outbox,
            }),
            _ => Err(problems),
        }
    }

    /// Resolves each table's column mapping into [`OutboxSettings::mapping`]; returns the
    /// problems of form (checks against the real table come later, from the store).
    fn resolve_mappings(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, table) in self.outbox.iter_mut().enumerate() {
            let key = format!("outbox[{i}]");
            table.mapping = match (table.layout, &table.columns, &table.debezium) {
                (Layout::Relay, None, None) => None,
                (Layout::Relay, Some(columns), None) => {
                    Some(columns.resolve(&format!("{key}.columns"), &mut out))
                }
                (Layout::Debezium, None, debezium) => Some(
                    debezium
                        .clone()
                        .unwrap_or_default()
                        .resolve(&format!("{key}.debezium"), &mut out),
                ),
                (Layout::Relay, None, Some(_)) => {
                    out.push(format!(
                        "{key}.debezium: needs layout = \"debezium\""
                    ));
                    None
                }
                (_, Some(_), _) => {
                    out.push(format!(
                        "{key}: [outbox.columns] and layout = \"debezium\" (or [outbox.debezium]) are both set; keep one"
                    ));
                    None
                }
            }
            .map(std::sync::Arc::new);
        }
        out
    }

    /// Reads each section's `url_file` into its `url`: a problem for each file that cannot be
    /// read, and for each section that sets both keys (then neither is read).
    fn read_url_files(&mut self, credentials: Option<&Path>) -> Vec<String> {
        let both = |section: &str| {
            format!(
                "{section}: url and url_file are both set (in the file or as \
                 OUTBOX_RELAY__{}__URL...); keep one",
                section.to_uppercase()
            )
        };
        let mut out = Vec::new();
        if let Some(file) = &self.postgres.url_file {
            if !self.postgres.url.is_empty() {
                out.push(both("postgres"));
            } else {
                match read_url_file("postgres.url_file", file, credentials) {
                    Ok(read) => self.postgres.url = read,
                    Err(problem) => out.push(problem),
                }
            }
        }
        if let Some(file) = &self.rabbitmq.url_file {
            if !self.rabbitmq.url.is_empty() {
                out.push(both("rabbitmq"));
            } else {
                // One URL per line: a cluster's nodes.
                match read_url_file("rabbitmq.url_file", file, credentials) {
                    Ok(read) => self.rabbitmq.url = NodeUrls::parse(read.expose()),
                    Err(problem) => out.push(problem),
                }
            }
        }
        out
    }

    /// Every semantic problem in the settings (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let postgres = &self.postgres;
        match (&postgres.url_file, postgres.url.is_empty()) {
            (None, true) => out
                .push("postgres.url: required (or postgres.url_file, a file that holds it)".into()),
            // The file could not be read: `load` has said why.
            (Some(_), true) => {}
            (file, false) => match postgres.hosts() {
                // The hosts share every parameter: the TLS files are checked once.
                Ok(hosts) => out.extend(crate::tls::postgres_url_problems(&hosts[0].url)),
                Err(problem) => out.push(match file {
                    None => format!("postgres.url: {problem}"),
                    Some(file) => format!("postgres.url_file: {problem} (in {})", file.display()),
                }),
            },
        }
        const AMQP_EXPECTED: &str = "amqp://user:password@host:port/vhost";
        let nodes = &self.rabbitmq.url;
        match &self.rabbitmq.url_file {
            None if nodes.is_empty() => out
                .push("rabbitmq.url: required (or rabbitmq.url_file, a file that holds it)".into()),
            Some(_) if nodes.is_empty() => {}
            None => out.extend(nodes.problems("rabbitmq.url", &|url| {
                format!("expected {AMQP_EXPECTED}, got {}", url.redacted())
            })),
            Some(file) => out.extend(nodes.problems("rabbitmq.url_file", &|url| {
                format!(
                    "expected {} to hold {AMQP_EXPECTED}, got {}",
                    file.display(),
                    url.redacted()
                )
            })),
        }
        if let Some(problem) = self
            .telemetry
            .otlp_endpoint
            .as_deref()
            .and_then(otlp_endpoint_problem)
        {
            out.push(format!("telemetry.otlp_endpoint: {problem}"));
        }
        if let Some(tls) = &self.rabbitmq.tls {
            if let Some(plain) = nodes
                .nodes()
                .iter()
                .find(|url| url.scheme().as_deref() == Some("amqp"))
            {
                out.push(format!(
                    "rabbitmq.tls: needs an amqps:// rabbitmq.url, got {}",
                    plain.redacted()
                ));
            }
            if let Err(problems) = crate::tls::BrokerTls::load(Some(tls)) {
                out.extend(problems);
            }
        }
        if self.postgres.max_connections < 1 {
            out.push("postgres.max_connections: must be at least 1".into());
        }
        if self.rabbitmq.max_message_bytes < 1024 {
            out.push("rabbitmq.max_message_bytes: must be at least 1024".into());
        }
        for (key, d) in [
            ("postgres.connect_timeout", self.postgres.connect_timeout),
            (
                "postgres.statement_timeout",
                self.postgres.statement_timeout,
            ),
            ("rabbitmq.connect_timeout", self.rabbitmq.connect_timeout),
            ("rabbitmq.confirm_timeout", self.rabbitmq.confirm_timeout),
            ("relay.poll_interval", self.relay.poll_interval),
            ("relay.reconnect_max_delay", self.relay.reconnect_max_delay),
            ("relay.heartbeat", self.relay.heartbeat),
        ] {
            if d.is_zero() {
                out.push(format!("{key}: must be more than 0"));
            }
        }
        if !(1..=10_000).contains(&self.relay.batch_size) {
            out.push(format!(
                "relay.batch_size: expected 1 to 10000, got {}",
                self.relay.batch_size
            ));
        }
        if !(1..=65_535).contains(&self.relay.max_in_flight) {
            out.push(format!(
                "relay.max_in_flight: expected 1 to 65535, got {}",
                self.relay.max_in_flight
            ));
        }
        if !(1..=10_000_000).contains(&self.relay.max_rows_in_memory) {
            out.push(format!(
                "relay.max_rows_in_memory: expected 1 to 10000000, got {}",
                self.relay.max_rows_in_memory
            ));
        }
        if !(1..=64).contains(&self.relay.channels) {
            out.push(format!(
                "relay.channels: expected 1 to 64, got {}",
                self.relay.channels
            ));
        }
        let margin = self.settle_margin();
        if self.lease() <= self.relay.heartbeat + margin {
            out.push(format!(
                "relay.lease: {} must be longer than relay.heartbeat ({}) plus \
                 rabbitmq.confirm_timeout and postgres.statement_timeout ({}): an owner that \
                 cannot renew must stop publishing and settle before its lease can expire",
                humantime::format_duration(self.lease()),
                humantime::format_duration(self.relay.heartbeat),
                humantime::format_duration(margin)
            ));
        }
        let channels = self.outbox.len() * self.relay.channels as usize;
        if channels > MAX_TABLES {
            out.push(format!(
                "relay.channels: {} tables x {} channels = {channels} channels; one relay process \
                 opens at most {MAX_TABLES} (RabbitMQ's default channel_max is 2047)",
                self.outbox.len(),
                self.relay.channels
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            out.push(format!(
                "log.level: {:?} is not a level or filter (e.g. \"info\", \"outbox_relay=debug\")",
                self.log.level
            ));
        }
        self.retry.problems("retry", &mut out);
        if self.outbox.is_empty() {
            out.push("outbox: at least one [[outbox]] table is required".into());
        }
        if self.outbox.len() > MAX_TABLES {
            out.push(format!(
                "outbox: {} tables; one relay process serves at most {MAX_TABLES} (two AMQP channels each on one connection, and RabbitMQ's default channel_max is 2047): split them over several relays",
                self.outbox.len()
            ));
        }
        let mut seen = HashSet::new();
        for (i, table) in self.outbox.iter().enumerate() {
            let key = format!("outbox[{i}]");
            if !seen.insert(&table.table) {
                out.push(format!(
                    "{key}.table: {} is configured twice",
                    table.table.written()
                ));
            }
            if let Some(p) = exchange_name_problem(&table.exchange) {
                out.push(format!("{key}.exchange: {p}"));
            }
            if table.declare_exchange.is_some() && table.exchange.is_empty() {
                out.push(format!(
                    "{key}.declare_exchange: the default exchange \"\" cannot be declared"
                ));
            }
            self.retry
                .with_override(&table.retry)
                .problems(&format!("{key}.retry"), &mut out);
            table.growth_problems(&key, &mut out);
            table.format_problems(&key, &mut out);
            if !(1..=MAX_PARTITIONS).contains(&table.partitions) {
                out.push(format!(
                    "{key}.partitions: expected 1 to {MAX_PARTITIONS}, got {}",
                    table.partitions
                ));
            }
        }
        out
    }
}

impl OutboxSettings {
    /// `on_published` and `retention` of table `key` (`outbox[i]`).
    fn growth_problems(&self, key: &str, out: &mut Vec<String>) {
        let Some(retention) = self.retention else {
            return;
        };
        if self.on_published == OnPublished::Delete {
            out.push(format!(
                "{key}.retention: {} has no published rows to keep (on_published = \"delete\" deletes each row once it is confirmed): remove retention, or use on_published = \"mark\"",
                self.table
            ));
        } else if retention < MIN_RETENTION {
            out.push(format!(
                "{key}.retention: expected at least {}, got {}",
                humantime::format_duration(MIN_RETENTION),
                humantime::format_duration(retention)
            ));
        }
    }
}

/// `problem` (a semantic problem, `key: what is wrong`) named by the variable that set its
/// key, when the environment set it: `OUTBOX_RELAY__RELAY__BATCH_SIZE (relay.batch_size):
/// expected 1 to 10000, got 0`.
fn attribute(problem: &str, overrides: &[Override]) -> Option<String> {
    let (key, rest) = problem.split_once(": ")?;
    // `rabbitmq.url[1]` is a part of `rabbitmq.url`.
    let base = key.split('[').next().unwrap_or(key);
    let var = &overrides.iter().find(|o| o.key == base)?.var;
    Some(format!("{var} ({key}): {rest}"))
}

/// Passwords a user may write without percent-encoding them, for the redaction tests of both
/// URLs.
#[cfg(test)]
pub(crate) mod hostile {
    /// `with_host`: a password that holds the URL's host name.
    pub(crate) const fn passwords(with_host: &'static str) -> [&'static str; 6] {
        [
            "p@ss/w:rd?#%",
            "@@@",
            with_host,
            "pä$$wörd✓",
            "a,b:c]d[e",
            "50/43?2#1",
        ]
    }

    /// `shown` (what the relay printed of `text`) holds neither `password` nor a recognisable
    /// piece of it.
    pub(crate) fn assert_hidden(password: &str, text: &str, shown: &str) {
        assert!(
            !shown.contains(password),
            "{text} shows its password: {shown}"
        );
        for piece in ["ss/w", "w:rd", "wörd", "43?2", "c]d"] {
            if password.contains(piece) {
                assert!(!shown.contains(piece), "{text} shows {piece:?}: {shown}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_otel_variables_say_where_spans_go_once_the_key_turns_export_on() {
        let telemetry = |key: Option<&str>| TelemetrySettings {
            otlp_endpoint: key.map(str::to_owned),
            traces_url: None,
        };
        let env = |traces: Option<&str>, base: Option<&str>| OtelEnv {
            traces_endpoint: traces.map(str::to_owned),
            endpoint: base.map(str::to_owned),
            sdk_disabled: false,
        };
        let resolved = |mut t: TelemetrySettings, e: OtelEnv| {
            let problems = t.resolve(&e);
            (t.traces_url, problems)
        };
        let key = Some("http://127.0.0.1:4318/");
        assert_eq!(
            resolved(telemetry(key), env(None, None)).0.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(
            resolved(telemetry(key), env(None, Some("http://c:4318")))
                .0
                .as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            resolved(
                telemetry(key),
                env(Some("http://t:4318/custom"), Some("http://c:4318"))
            )
            .0
            .as_deref(),
            Some("http://t:4318/custom")
        );
        // The variables alone do not turn export on; OTEL_SDK_DISABLED turns it off.
        assert_eq!(
            resolved(telemetry(None), env(Some("http://t:4318"), None)).0,
            None
        );
        let mut disabled = env(None, None);
        disabled.sdk_disabled = true;
        assert_eq!(resolved(telemetry(key), disabled).0, None);
        let (url, problems) = resolved(telemetry(key), env(None, Some("https://c:4318")));
        assert_eq!(url, None);
        assert!(
            problems[0].starts_with("OTEL_EXPORTER_OTLP_ENDPOINT: "),
            "{problems:?}"
        );
    }

    impl Settings {
        fn load_with_credentials(
            path: &Path,
            credentials: Option<&Path>,
        ) -> Result<Settings, ConfigError> {
            Settings::load_from(path, credentials, &[])
        }
    }

    #[test]
    fn table_names_that_try_sql_injection_are_refused() {
        assert!(TableName::parse("outbox; drop table users").is_err());
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("\"x\"").is_err());
        assert!(TableName::parse("1abc").is_err());
        let t = TableName::parse("app.events_outbox").unwrap();
        assert_eq!(t.quoted(), "\"app\".\"events_outbox\"");
        assert_eq!(
            TableName::parse("outbox").unwrap().to_string(),
            "public.outbox"
        );
    }

    #[test]
    fn derived_names_fit_in_sixty_three_bytes() {
        let t = TableName::parse(&"x".repeat(63)).unwrap();
        assert!(t.derived("pending").len() <= 63);
        assert_eq!(
            TableName::parse("outbox").unwrap().derived("due"),
            "outbox_relay_outbox_due"
        );
    }

    #[test]
    fn unquoted_table_names_fold_to_lower_case_as_postgresql_folds_them() {
        let t = TableName::parse("public.OutBox").unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "outbox"));
        assert_eq!(t, TableName::parse("outbox").unwrap());
        assert_eq!(t, TableName::parse("PUBLIC.OUTBOX").unwrap());
        assert_eq!(t.to_string(), "public.outbox");
        assert_eq!(t.quoted(), "\"public\".\"outbox\"");
        assert_eq!(t.derived("due"), "outbox_relay_outbox_due");
        // Only ASCII folds: PostgreSQL leaves other letters alone in UTF-8, and the relay
        // accepts only ASCII unquoted.
        assert!(TableName::parse("ünïcödé").is_err());
    }

    #[test]
    fn quoted_table_names_keep_their_case_and_their_doubled_quotes() {
        let t = TableName::parse("public.\"OutBox\"").unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "OutBox"));
        assert_eq!(t.to_string(), "public.OutBox");
        assert_eq!(t.quoted(), "\"public\".\"OutBox\"");
        assert_ne!(t, TableName::parse("public.OutBox").unwrap());
        assert_eq!(TableName::parse("\"OutBox\"").unwrap(), t);
        // The name such a table got before names were folded: derived objects stay the same.
        assert_eq!(t.derived("notify"), "outbox_relay_OutBox_notify");

        let t = TableName::parse("\"Sales Data\".\"order \"\"events\"\"\"").unwrap();
        assert_eq!(t.schema, "Sales Data");
        assert_eq!(t.name, "order \"events\"");
        assert_eq!(t.quoted(), "\"Sales Data\".\"order \"\"events\"\"\"");
        assert_eq!(TableName::parse(&t.quoted()).unwrap(), t);
        assert_eq!(t.written(), t.quoted());
        assert_eq!(TableName::parse(&t.written()).unwrap(), t);
        let mixed = TableName::parse("app.\"OutBox\"").unwrap();
        assert_eq!(mixed.written(), "app.\"OutBox\"");
        assert_eq!(
            TableName::parse("App.OutBox").unwrap().written(),
            "app.outbox"
        );
        // Characters beyond letters, digits and _ give a hashed derived name, the same every time.
        let derived = t.derived("notify");
        assert_eq!(derived, t.derived("notify"));
        assert!(derived.starts_with("outbox_relay_") && derived.ends_with("_notify"));
        assert!(derived
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_ne!(
            derived,
            TableName::parse("\"order events\"")
                .unwrap()
                .derived("notify")
        );
    }

    #[test]
    fn quoted_table_names_that_could_not_be_written_safely_are_refused() {
        for (name, problem) in [
            ("\"outbox\"", "needs no quotes"),
            ("public.\"events_1\"", "needs no quotes"),
            ("\"Out\"Box", "after a closing double quote"),
            ("\"OutBox", "not closed"),
            ("\"\"", "empty"),
            ("\"a.b\"", "contains '.'"),
            ("\"it's\"", "contains '\\''"),
            ("\"back\\slash\"", "contains '\\\\'"),
            ("\"new\nline\"", "contains '\\n'"),
            ("public.", "empty"),
            ("Out\"Box\"", "not a plain identifier"),
        ] {
            let e = TableName::parse(name).expect_err(name);
            assert!(e.contains(problem), "{name}: {problem:?} not in {e}");
            assert!(e.contains("identifier"), "{e}");
        }
        assert!(TableName::parse(&format!("\"{}\"", "X".repeat(64))).is_err());
        assert!(TableName::parse(&format!("\"{}\"", "X".repeat(63))).is_ok());
        assert!(TableName::parse(&"X".repeat(64)).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        let url = SecretUrl::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        assert!(!format!("{url:?} {url}").contains("hunter2"));
        assert!(url.redacted().contains("guest:***@"));
    }

    /// A directory of its own in the temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("outbox-relay-config-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }

        /// A config whose `[postgres]` and `[rabbitmq]` sections are `postgres` and `rabbitmq`.
        fn config(&self, postgres: &str, rabbitmq: &str) -> PathBuf {
            self.write(
                "outbox-relay.toml",
                &format!(
                    "[postgres]\n{postgres}\n[rabbitmq]\n{rabbitmq}\n\
                     [[outbox]]\ntable = \"outbox\"\nexchange = \"events\"\n"
                ),
            )
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const PG: &str = "postgres://relay:pg-s3cret@db.internal:5432/app";
    const AMQP: &str = "amqps://relay:mq-s3cret@mq.internal:5671/%2f";

    fn problems_of(config: &Path, credentials: Option<&Path>) -> String {
        let e = Settings::load_with_credentials(config, credentials)
            .expect_err("the config should be refused");
        let text = e.to_string();
        assert!(
            !text.contains("s3cret"),
            "a config error shows a secret:\n{text}"
        );
        text
    }

    #[test]
    fn url_files_are_read_into_the_urls_without_their_trailing_newline() {
        let dir = Scratch::new("url-file-absolute");
        let pg = dir.write("pg.url", &format!("{PG}\n"));
        let amqp = dir.write("amqp.url", &format!("{AMQP}\r\n"));
        let config = dir.config(
            &format!("url_file = {:?}", pg.display().to_string()),
            &format!("url_file = {:?}", amqp.display().to_string()),
        );
        let s = Settings::load_with_credentials(&config, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.postgres.url.expose(), PG);
        assert_eq!(s.rabbitmq.url.nodes(), [SecretUrl::new(AMQP)]);
        assert_eq!(s.postgres.url_file.as_deref(), Some(pg.as_path()));
        assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");
    }

    #[test]
    fn a_relative_url_file_is_taken_in_the_credentials_directory() {
        let dir = Scratch::new("url-file-credentials");
        let credentials = Scratch::new("url-file-credentials-dir");
        credentials.write("postgres.url", PG);
        let config = dir.config("url_file = \"postgres.url\"", &format!("url = {AMQP:?}"));
        let s = Settings::load_with_credentials(&config, Some(&credentials.0))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.postgres.url.expose(), PG);

        let text = problems_of(&config, None);
        assert!(text.contains("postgres.url_file"), "{text}");
        assert!(text.contains("CREDENTIALS_DIRECTORY"), "{text}");
    }

    #[test]
    fn a_missing_or_empty_url_file_is_a_config_error_naming_the_key_and_the_path() {
        let dir = Scratch::new("url-file-missing");
        let empty = dir.write("empty.url", "\n");
        let missing = dir.0.join("missing.url");
        let config = dir.config(
            &format!("url_file = {:?}", missing.display().to_string()),
            &format!("url_file = {:?}", empty.display().to_string()),
        );
        let text = problems_of(&config, None);
        for expected in [
            format!("postgres.url_file: cannot read {}", missing.display()),
            format!("rabbitmq.url_file: {} is empty", empty.display()),
        ] {
            assert!(text.contains(&expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn several_postgres_hosts_load_in_either_form_and_a_bad_list_is_named() {
        let dir = Scratch::new("pg-hosts");
        let amqp = format!("url = {AMQP:?}");
        for url in [
            "postgres://relay:pg-s3cret@a:5432,b:5433/app?target_session_attrs=read-write",
            "host=a,b port=5432,5433 user=relay password=pg-s3cret dbname=app",
        ] {
            let config = dir.config(&format!("url = {url:?}"), &amqp);
            let s = Settings::load_with_credentials(&config, None).unwrap();
            let hosts: Vec<String> = s
                .postgres
                .hosts()
                .unwrap()
                .into_iter()
                .map(|h| h.label)
                .collect();
            assert_eq!(hosts, ["a:5432", "b:5433"], "{url}");
            assert!(!s.postgres.url.redacted().contains("pg-s3cret"));
        }
        let config = dir.config(
            "url = \"postgres://relay:pg-s3cret@a:5432,b:oops/app\"",
            &amqp,
        );
        let text = problems_of(&config, None);
        assert!(
            text.contains("postgres.url: the port of b is not a port number"),
            "{text}"
        );
        assert!(!text.contains("pg-s3cret"), "{text}");
    }

    #[test]
    fn a_url_file_that_holds_no_url_of_its_kind_is_named_without_its_password() {
        let dir = Scratch::new("url-file-wrong");
        let credentials = Scratch::new("url-file-wrong-dir");
        credentials.write("postgres.url", AMQP);
        let config = dir.config("url_file = \"postgres.url\"", &format!("url = {AMQP:?}"));
        let text = problems_of(&config, Some(&credentials.0));
        assert!(
            text.contains("postgres.url_file: expected ") && text.contains("relay:***@"),
            "{text}"
        );
    }

    #[test]
    fn url_and_url_file_together_or_neither_are_config_errors() {
        let dir = Scratch::new("url-file-both");
        let pg = dir.write("pg.url", PG);
        let config = dir.config(
            &format!("url = {PG:?}\nurl_file = {:?}", pg.display().to_string()),
            "connection_name = \"x\"",
        );
        let text = problems_of(&config, None);
        assert!(
            text.contains("postgres: url and url_file are both set"),
            "{text}"
        );
        assert!(text.contains("rabbitmq.url: required"), "{text}");
    }

    #[test]
    fn rabbitmq_url_takes_one_url_a_list_or_a_comma_separated_string() {
        let dir = Scratch::new("nodes");
        let a = "amqp://relay:mq-s3cret@mq-a:5672/%2f";
        let b = "amqp://relay:pa,ss-s3cret@mq-b:5672/%2f";
        for (rabbitmq, expected) in [
            (format!("url = {a:?}"), vec![a]),
            (format!("url = [{a:?}, {b:?}]"), vec![a, b]),
            (format!("url = \"{a}, {b}\""), vec![a, b]),
        ] {
            let config = dir.config(&format!("url = {PG:?}"), &rabbitmq);
            let s = Settings::load_with_credentials(&config, None)
                .unwrap_or_else(|e| panic!("{rabbitmq}: {e}"));
            let got: Vec<&str> = s.rabbitmq.url.nodes().iter().map(|u| u.expose()).collect();
            assert_eq!(got, expected, "{rabbitmq}");
            let shown = format!("{} {:?}", s.rabbitmq.url, s);
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn a_rabbitmq_url_file_holds_one_node_per_line() {
        let dir = Scratch::new("nodes-file");
        let file = dir.write(
            "amqp.url",
            "amqp://relay:mq-s3cret@mq-a:5672/%2f\n\namqp://relay:mq-s3cret@mq-b:5672/%2f\r\n",
        );
        let config = dir.config(
            &format!("url = {PG:?}"),
            &format!("url_file = {:?}", file.display().to_string()),
        );
        let s = Settings::load_with_credentials(&config, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.rabbitmq.url.to_string(),
            "amqp://relay:***@mq-a:5672/%2f, amqp://relay:***@mq-b:5672/%2f"
        );
    }

    #[test]
    fn each_node_url_is_checked_and_named_by_its_index() {
        let dir = Scratch::new("nodes-wrong");
        let config = dir.config(
            &format!("url = {PG:?}"),
            "url = [\"amqp://relay:mq-s3cret@mq-a:5672/%2f\", \"http://relay:mq-s3cret@mq-b/\", \
             \"amqps://relay:mq-s3cret@mq-c:5671/%2f\", \"amqp://relay:mq-s3cret@mq-a:5672/%2f\"]",
        );
        let text = problems_of(&config, None);
        for expected in [
            "rabbitmq.url[1]: expected amqp://user:password@host:port/vhost, got http://relay:***@mq-b/",
            "rabbitmq.url[3]: amqp://relay:***@mq-a:5672/%2f is listed twice",
            "rabbitmq.url: mixes amqp:// and amqps:// nodes",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    const HOSTILE: [&str; 6] = hostile::passwords("x-mq.internal-y");

    #[test]
    fn no_amqp_password_is_shown_whatever_characters_it_holds() {
        for password in HOSTILE {
            for text in [
                format!("amqp://relay:{password}@mq.internal:5672/%2f"),
                format!("amqps://relay:{password}@mq.internal/%2f?heartbeat=abc"),
                format!("amqp://relay:{password}@mq.internal:notaport/%2f"),
                format!("amqp://relay:{password}"),
                format!("amqp://relay:{password}@"),
                format!("relay:{password}@mq.internal"),
                format!("http://relay:{password}@mq.internal/"),
            ] {
                let url = SecretUrl::new(&text);
                let problems = NodeUrls(vec![url.clone()]).problems("rabbitmq.url", &|u| {
                    format!("expected amqp://..., got {}", u.redacted())
                });
                hostile::assert_hidden(password, &text, &format!("{url} | {url:?} | {problems:?}"));
            }
        }
        // Parsed, then printed without the password: the host stays, even when the password
        // holds its name.
        let url = SecretUrl::new("amqp://relay:x-mq.internal-y@mq.internal:5672/%2f");
        assert_eq!(url.redacted(), "amqp://relay:***@mq.internal:5672/%2f");
        assert_eq!(
            SecretUrl::new("amqp://relay:p@ss/w@rd@mq/%2f").redacted(),
            "amqp://<not shown: an '@' or '#' after the host: a user name or password that holds / ? # or @ must have them percent-encoded (%2F %3F %23 %40), and so must an @ or # in the path or a parameter>"
        );
        assert_eq!(
            SecretUrl::new("amqp://relay:@@@@mq/%2f").redacted(),
            "amqp://relay:***@mq/%2f"
        );
    }

    #[test]
    fn amqp_parameters_are_those_the_client_reads_with_values_it_accepts() {
        let problems = |url: &str| amqp_url::problems(&SecretUrl::new(url)).join("\n");
        assert_eq!(
            problems("amqp://u:pw@mq/%2f?heartbeat=10&frame_max=131072&channel_max=64&connection_timeout=5000&auth_mechanism=PLAIN"),
            ""
        );
        for (url, expected) in [
            (
                "amqp://u:pw@mq/%2f?heartbeat=abc",
                "heartbeat=abc: expected a whole number",
            ),
            (
                "amqp://u:pw@mq/%2f?heartbeat=70000",
                "heartbeat=70000: expected",
            ),
            ("amqp://u:pw@mq/%2f?channel_max=-1", "channel_max=-1"),
            (
                "amqp://u:pw@mq/%2f?auth_mechanism=kerberos",
                "auth_mechanism=kerberos",
            ),
            (
                "amqp://u:pw@mq/%2f?cacertfile=/etc/ca.pem",
                "[rabbitmq.tls]",
            ),
            (
                "amqp://u:pw@mq/%2f?hearbeat=10",
                "unknown parameter \"hearbeat\"",
            ),
            (
                "amqp://u:pw@mq/%2f?heartbeat=10&heartbeat=20",
                "given twice",
            ),
            ("amqp://u:pw@[::1]:5672/%2f", "IPv6"),
            ("amqp://u:pw@mq:notaport/%2f", "invalid port number"),
            ("amqp://u:%FF@mq/%2f", "the password is not UTF-8"),
        ] {
            let got = problems(url);
            assert!(got.contains(expected), "{url}: {expected:?} not in {got:?}");
            assert!(!got.contains("pw"), "{got}");
        }
        // What the IPv6 problem says is what the client does.
        let uri: lapin::uri::AMQPUri = "amqp://u:pw@[::1]:5672/%2f".parse().unwrap();
        assert_eq!(uri.authority.host, "localhost");
        // And the client refuses what is refused here as a bad value.
        assert!("amqp://u:pw@mq/%2f?heartbeat=abc"
            .parse::<lapin::uri::AMQPUri>()
            .is_err());
    }

    #[test]
    fn a_toml_error_does_not_quote_the_line_that_holds_a_password() {
        let dir = Scratch::new("toml-quote");
        let config = dir.write(
            "outbox-relay.toml",
            "[postgres]\nurl = \"postgres://relay:pg-\"s3cret@db/app\"\n[rabbitmq]\n\
             url = \"amqp://relay:mq@mq/%2f\"\n[[outbox]]\ntable = \"outbox\"\nexchange = \"events\"\n",
        );
        let text = problems_of(&config, None);
        assert!(text.contains("TOML parse error at line 2"), "{text}");
    }

    #[test]
    fn retention_is_refused_beside_delete_mode_and_below_a_minute() {
        let mut table = OutboxSettings {
            table: TableName::parse("outbox").unwrap(),
            exchange: "events".into(),
            declare_exchange: None,
            retry: RetryOverride::default(),
            on_published: OnPublished::Mark,
            retention: Some(Duration::from_secs(7 * 86_400)),
            layout: Layout::Relay,
            columns: None,
            debezium: None,
            mapping: None,
            partitions: defaults::partitions(),
            message_format: MessageFormat::Outbox,
            cloudevents_source: None,
            cloudevents_extensions: Vec::new(),
        };
        let problems = |t: &OutboxSettings| {
            let mut out = Vec::new();
            t.growth_problems("outbox[0]", &mut out);
            out
        };
        assert!(problems(&table).is_empty());
        table.retention = Some(Duration::from_secs(59));
        assert!(problems(&table)[0].starts_with("outbox[0].retention: expected at least 1m"));
        table.on_published = OnPublished::Delete;
        assert!(problems(&table)[0].contains("public.outbox has no published rows to keep"));
        table.retention = None;
        assert!(problems(&table).is_empty());
    }

    #[test]
    fn exchange_names_follow_rabbitmq_rules() {
        assert!(exchange_name_problem("events.v1:orders-x_y").is_none());
        assert!(exchange_name_problem("").is_none());
        assert!(exchange_name_problem("bad name").is_some());
        assert!(exchange_name_problem(&"e".repeat(256)).is_some());
    }
}
