//! The configuration file (CONTRACT §8): defaults, then the TOML file, then `CACHECTL_<SECTION>__<KEY>`
//! environment variables, validated into typed values at load time so that a bad configuration
//! fails at start with a message naming the key. Secrets never appear in `Debug` output.

use cachectl_core::Tier;
use cachectl_core::policy::DomainPattern;
use cachectl_core::service::{Account, Quotas};
use cachectl_edge::{Driver, Node};
use chrono::FixedOffset;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A string that must not be printed: a token or a secret key.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparison and signing only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP listener.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where tasks are stored.
    #[serde(default)]
    pub store: StoreConfig,
    /// How the worker drives the edge nodes.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// How long records are kept.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Settings of the Baishan v2 dialect.
    #[serde(default)]
    pub baishan: BaishanConfig,
    /// The customers.
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
    /// The cache servers.
    #[serde(default)]
    pub edges: Vec<EdgeConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on, such as `127.0.0.1:8080` (port 0 picks a free one).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// How long in-flight requests and node work may take to finish at shutdown.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// From the first byte of a request until its headers are complete (nginx's
    /// `client_header_timeout`); a client slower than that has its connection closed.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a connection may stay idle between two requests (nginx's `keepalive_timeout`).
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// From the first byte of a request until its body has arrived whole; a slower body is
    /// refused with the dialect's 400 (nginx's `client_body_timeout`, but for the whole body).
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one closes. Keep it
    /// below the process's open-file limit (`ulimit -n`), with room for the store and the edges.
    #[serde(default = "default_max_connections_http")]
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            shutdown_grace: default_grace(),
            header_timeout: default_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections_http(),
        }
    }
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(75)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections_http() -> usize {
    4096
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path/to/file.db` (the default, `sqlite://data/cachectl.db`) or
    /// `postgres://user:password@host:port/database`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// Apply migrations at start (default). With `false`, run `cachectl migrate` first.
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
    /// How long an operation waits for a database connection before it fails (and the API
    /// answers 503) while PostgreSQL is unreachable.
    #[serde(default = "default_acquire", with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// PostgreSQL: connections of each of this instance's two pools (default 8): one for the
    /// dialects' record queries, one for everything else; requests beyond wait their turn for
    /// one. Ignored by SQLite.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            migrate_on_start: true,
            acquire_timeout: default_acquire(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_max_connections() -> u32 {
    cachectl_store::DEFAULT_MAX_CONNECTIONS
}

fn default_acquire() -> Duration {
    cachectl_store::DEFAULT_ACQUIRE_TIMEOUT
}

fn default_true() -> bool {
    true
}

fn default_store_url() -> String {
    "sqlite://data/cachectl.db".to_owned()
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Whether this instance purges and prefetches at all. `false` makes an API-only instance:
    /// it accepts and answers, and instances sharing its PostgreSQL store do the work.
    #[serde(default = "d_enabled")]
    pub enabled: bool,
    /// How long an item may keep retrying, counted from when it is first sent.
    #[serde(default = "d_deadline", with = "humantime_serde")]
    pub item_deadline: Duration,
    /// Timeout of one request to a node, body included.
    #[serde(default = "d_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TCP connect timeout to a node.
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The first retry's backoff; it doubles each attempt, with jitter.
    #[serde(default = "d_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest backoff between two attempts.
    #[serde(default = "d_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Requests in flight to one node at most (also its kept-alive connections).
    #[serde(default = "d_per_node")]
    pub per_node_concurrency: usize,
    /// Purges and bans written on one connection to a node before the first is answered
    /// (HTTP/1.1 pipelining); 1 turns pipelining off. The node's requests in flight stay
    /// bounded by `per_node_concurrency`, over `ceil(per_node_concurrency / pipeline_depth)`
    /// connections.
    #[serde(default = "d_pipeline_depth")]
    pub pipeline_depth: usize,
    /// Items being executed at once, over all nodes.
    #[serde(default = "d_in_flight")]
    pub max_items_in_flight: usize,
    /// How long a claimed item stays leased to this instance without a renewal.
    #[serde(default = "d_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often the queue is polled when no submission woke the worker.
    #[serde(default = "d_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            enabled: d_enabled(),
            item_deadline: d_deadline(),
            request_timeout: d_request_timeout(),
            connect_timeout: d_connect_timeout(),
            retry_initial: d_retry_initial(),
            retry_max: d_retry_max(),
            per_node_concurrency: d_per_node(),
            pipeline_depth: d_pipeline_depth(),
            max_items_in_flight: d_in_flight(),
            lease: d_lease(),
            poll_interval: d_poll(),
        }
    }
}

fn d_enabled() -> bool {
    true
}
fn d_deadline() -> Duration {
    Duration::from_secs(300)
}
fn d_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn d_retry_initial() -> Duration {
    Duration::from_millis(200)
}
fn d_retry_max() -> Duration {
    Duration::from_secs(15)
}
fn d_per_node() -> usize {
    32
}
fn d_pipeline_depth() -> usize {
    8
}
fn d_in_flight() -> usize {
    4096
}
fn d_lease() -> Duration {
    Duration::from_secs(30)
}
fn d_poll() -> Duration {
    Duration::from_secs(1)
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Records older than this many days are deleted.
    #[serde(default = "d_days")]
    pub days: u32,
    /// How often the sweep runs.
    #[serde(default = "d_sweep", with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Items deleted per transaction, so that the sweep never holds the store for long.
    #[serde(default = "d_sweep_batch")]
    pub sweep_batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { days: d_days(), sweep_interval: d_sweep(), sweep_batch: d_sweep_batch() }
    }
}

fn d_days() -> u32 {
    31
}
fn d_sweep() -> Duration {
    Duration::from_secs(3600)
}
fn d_sweep_batch() -> u32 {
    2000
}

/// `[baishan]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaishanConfig {
    /// The dialect's time zone as an offset (`+08:00`): its times, its dates, and the midnight
    /// at which daily quotas reset.
    #[serde(default = "d_tz")]
    pub timezone: String,
    /// Default requests per minute per token per endpoint.
    #[serde(default = "d_rate")]
    pub rate_limit_per_minute: u32,
}

impl Default for BaishanConfig {
    fn default() -> Self {
        Self { timezone: d_tz(), rate_limit_per_minute: d_rate() }
    }
}

fn d_tz() -> String {
    "+08:00".to_owned()
}
fn d_rate() -> u32 {
    150
}

/// A Baishan token: a bare string, or `{ name = "...", token = "..." }` to give it an operator name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenConfig {
    /// Only the secret; the operator name is derived from a hash of it.
    Bare(Secret),
    /// A named token.
    Named {
        /// Operator name recorded on the tasks it submits.
        name: String,
        /// The secret.
        token: Secret,
    },
}

/// A BCE access key pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyConfig {
    /// Access key id (recorded as the operator).
    pub ak: String,
    /// Secret access key.
    pub sk: Secret,
}

/// `[accounts.quotas]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Refreshed URLs per day (default 10,000).
    pub refresh_urls: Option<u64>,
    /// Refreshed directories per day (default 100).
    pub refresh_dirs: Option<u64>,
    /// Prefetched URLs per day (default 10,000).
    pub prefetch_urls: Option<u64>,
}

/// `[[accounts]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Unique name.
    pub name: String,
    /// Domains it owns: `www.example.com` or `*.example.com`.
    pub domains: Vec<String>,
    /// Baishan tokens.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// BCE access keys (Baidu dialects).
    #[serde(default)]
    pub access_keys: Vec<AccessKeyConfig>,
    /// Requests per minute per token per endpoint (default: `baishan.rate_limit_per_minute`).
    pub rate_limit_per_minute: Option<u32>,
    /// Daily quotas.
    #[serde(default)]
    pub quotas: QuotaConfig,
    /// Receivers notified when a task of this account finishes.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
}

/// `[[accounts.webhooks]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http(s)://...` to POST the task summary to.
    pub url: String,
    /// The HMAC-SHA256 key of the `X-Cachectl-Signature` header.
    pub secret: Secret,
}

/// `[[edges]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Unique name, shown in results and failure reasons.
    pub name: String,
    /// `varnish` or `nginx`.
    pub driver: Driver,
    /// `host:port` of the cache's HTTP listener.
    pub address: String,
    /// `parent` or `edge` (default).
    #[serde(default)]
    pub tier: Tier,
    /// Domains it serves (default: all).
    #[serde(default)]
    pub domains: Vec<String>,
}

/// A configuration that failed to load or validate; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads `path` (if given) and the `CACHECTL_` environment over the defaults.
    ///
    /// # Errors
    /// The file is unreadable or a value has the wrong type; the message names the key.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError(format!("file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only CACHECTL_<SECTION>__<KEY> variables are configuration; others with the prefix
        // (CACHECTL_CONFIG, CACHECTL_LOG, a tool's own) are not keys.
        figment = figment.merge(Env::prefixed("CACHECTL_").filter(|k| k.as_str().contains("__")).split("__"));
        figment.extract().map_err(|e| ConfigError(e.to_string()))
    }

    /// Parses a configuration from TOML text alone (tests and examples).
    ///
    /// # Errors
    /// As `load`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Figment::new().merge(Toml::string(text)).extract().map_err(|e| ConfigError(e.to_string()))
    }

    /// Checks every value and builds the typed settings the service runs on.
    ///
    /// # Errors
    /// The first invalid value, named by its key.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let err = |key: String, msg: String| ConfigError(format!("{key}: {msg}"));
        let listen: SocketAddr = self.server.listen.parse().map_err(|e| {
            err("server.listen".into(), format!("{:?} is not an address:port ({e})", self.server.listen))
        })?;
        if !cachectl_store::supported(&self.store.url) {
            return Err(err("store.url".into(), "supported schemes are sqlite:// and postgres://".into()));
        }
        let http = crate::http::Limits {
            header_timeout: self.server.header_timeout,
            keepalive_timeout: self.server.keepalive_timeout,
            body_timeout: self.server.body_timeout,
            max_connections: self.server.max_connections,
        };
        for (key, value) in [
            ("header_timeout", http.header_timeout),
            ("keepalive_timeout", http.keepalive_timeout),
            ("body_timeout", http.body_timeout),
        ] {
            if value.is_zero() {
                return Err(err(format!("server.{key}"), "must be longer than 0".into()));
            }
        }
        if http.max_connections == 0 {
            return Err(err("server.max_connections".into(), "must be at least 1".into()));
        }
        let timezone = parse_offset(&self.baishan.timezone).ok_or_else(|| {
            err("baishan.timezone".into(), format!("{:?} is not an offset like +08:00", self.baishan.timezone))
        })?;
        let w = &self.worker;
        for (key, value) in [
            ("per_node_concurrency", w.per_node_concurrency),
            ("pipeline_depth", w.pipeline_depth),
            ("max_items_in_flight", w.max_items_in_flight),
        ] {
            if value == 0 {
                return Err(err(format!("worker.{key}"), "must be at least 1".into()));
            }
        }
        if w.retry_initial.is_zero() || w.retry_max < w.retry_initial {
            return Err(err(
                "worker.retry_max".into(),
                "must be at least worker.retry_initial, which must be > 0".into(),
            ));
        }
        if w.lease < Duration::from_secs(3) {
            return Err(err("worker.lease".into(), "must be at least 3s".into()));
        }
        if self.store.max_connections == 0 {
            return Err(err("store.max_connections".into(), "must be at least 1".into()));
        }
        if self.retention.days == 0 || self.retention.sweep_batch == 0 {
            return Err(err("retention".into(), "days and sweep_batch must be at least 1".into()));
        }

        let mut accounts = Vec::new();
        let mut tokens = HashMap::new();
        let mut access_keys = HashMap::new();
        let mut webhooks = HashMap::new();
        let mut names = HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let key = |field: &str| format!("accounts[{i}].{field}");
            if a.name.trim().is_empty() || !names.insert(a.name.clone()) {
                return Err(err(key("name"), format!("{:?} is empty or used twice", a.name)));
            }
            if a.domains.is_empty() {
                return Err(err(key("domains"), "an account needs at least one domain".into()));
            }
            let domains = a
                .domains
                .iter()
                .enumerate()
                .map(|(j, d)| DomainPattern::parse(d).map_err(|e| err(format!("accounts[{i}].domains[{j}]"), e)))
                .collect::<Result<Vec<_>, _>>()?;
            let defaults = Quotas::default();
            let account = Arc::new(Account {
                name: a.name.clone(),
                domains,
                quotas: Quotas {
                    refresh_urls: a.quotas.refresh_urls.unwrap_or(defaults.refresh_urls),
                    refresh_dirs: a.quotas.refresh_dirs.unwrap_or(defaults.refresh_dirs),
                    prefetch_urls: a.quotas.prefetch_urls.unwrap_or(defaults.prefetch_urls),
                },
                rate_limit_per_minute: a.rate_limit_per_minute.unwrap_or(self.baishan.rate_limit_per_minute),
            });
            if account.rate_limit_per_minute == 0 {
                return Err(err(key("rate_limit_per_minute"), "must be at least 1".into()));
            }
            for (j, t) in a.tokens.iter().enumerate() {
                let (secret, name) = match t {
                    TokenConfig::Bare(secret) => (secret, format!("token-{:08x}", fnv(secret.expose()))),
                    TokenConfig::Named { name, token } => (token, name.clone()),
                };
                if secret.expose().len() < 8 {
                    return Err(err(
                        format!("accounts[{i}].tokens[{j}]"),
                        "a token needs at least 8 characters".into(),
                    ));
                }
                if tokens
                    .insert(secret.expose().to_owned(), Credential { account: account.clone(), operator: name })
                    .is_some()
                {
                    return Err(err(format!("accounts[{i}].tokens[{j}]"), "the same token is configured twice".into()));
                }
            }
            for (j, k) in a.access_keys.iter().enumerate() {
                if k.ak.is_empty() || k.sk.expose().is_empty() {
                    return Err(err(format!("accounts[{i}].access_keys[{j}]"), "ak and sk must not be empty".into()));
                }
                let value = (Credential { account: account.clone(), operator: k.ak.clone() }, k.sk.clone());
                if access_keys.insert(k.ak.clone(), value).is_some() {
                    return Err(err(
                        format!("accounts[{i}].access_keys[{j}].ak"),
                        "the same access key is configured twice".into(),
                    ));
                }
            }
            let mut targets = Vec::new();
            for (j, w) in a.webhooks.iter().enumerate() {
                if !matches!(url::Url::parse(&w.url).map(|u| u.scheme().to_owned()).as_deref(), Ok("http" | "https")) {
                    return Err(err(
                        format!("accounts[{i}].webhooks[{j}].url"),
                        format!("{:?} is not an http(s) URL", w.url),
                    ));
                }
                if w.secret.expose().len() < 16 {
                    return Err(err(
                        format!("accounts[{i}].webhooks[{j}].secret"),
                        "needs at least 16 characters".into(),
                    ));
                }
                targets.push(crate::webhooks::Target { url: w.url.clone(), secret: w.secret.clone() });
            }
            if !targets.is_empty() {
                webhooks.insert(a.name.clone(), targets);
            }
            accounts.push(account);
        }

        let mut nodes = Vec::new();
        let mut node_names = HashSet::new();
        for (i, e) in self.edges.iter().enumerate() {
            let key = |field: &str| format!("edges[{i}].{field}");
            if e.name.trim().is_empty() || !node_names.insert(e.name.clone()) {
                return Err(err(key("name"), format!("{:?} is empty or used twice", e.name)));
            }
            let valid_address = e.address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !valid_address {
                return Err(err(key("address"), format!("{:?} is not host:port", e.address)));
            }
            let domains = e
                .domains
                .iter()
                .enumerate()
                .map(|(j, d)| DomainPattern::parse(d).map_err(|m| err(format!("edges[{i}].domains[{j}]"), m)))
                .collect::<Result<Vec<_>, _>>()?;
            nodes.push(Node {
                name: e.name.clone(),
                driver: e.driver,
                address: e.address.clone(),
                tier: e.tier,
                domains,
            });
        }

        Ok(Settings {
            listen,
            store_url: self.store.url.clone(),
            migrate_on_start: self.store.migrate_on_start,
            store_connections: cachectl_store::Connections {
                acquire_timeout: self.store.acquire_timeout,
                max_connections: self.store.max_connections,
            },
            shutdown_grace: self.server.shutdown_grace,
            http,
            worker: self.worker.clone(),
            retention: self.retention.clone(),
            timezone,
            accounts,
            tokens,
            access_keys,
            nodes,
            default_rate_limit: self.baishan.rate_limit_per_minute,
            webhooks,
        })
    }
}

/// Who a credential belongs to and what operator name it records.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The account.
    pub account: Arc<Account>,
    /// Operator name recorded on tasks.
    pub operator: String,
}

/// The validated configuration the service runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Store URL.
    pub store_url: String,
    /// Whether to migrate at start.
    pub migrate_on_start: bool,
    /// How the store holds its connections (`acquire_timeout`, `max_connections`).
    pub store_connections: cachectl_store::Connections,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// The listener's timeouts and connection cap.
    pub http: crate::http::Limits,
    /// Worker settings.
    pub worker: WorkerConfig,
    /// Retention settings.
    pub retention: RetentionConfig,
    /// The Baishan dialect's (and the quotas') time zone.
    pub timezone: FixedOffset,
    /// Every account.
    pub accounts: Vec<Arc<Account>>,
    /// Baishan token → credential.
    pub tokens: HashMap<String, Credential>,
    /// BCE access key → credential and secret key.
    pub access_keys: HashMap<String, (Credential, Secret)>,
    /// Every edge node.
    pub nodes: Vec<Node>,
    /// The Baishan rate limit reported to requests without a valid token.
    pub default_rate_limit: u32,
    /// Account name → webhook receivers.
    pub webhooks: HashMap<String, Vec<crate::webhooks::Target>>,
}

/// Parses `+08:00`, `-05:30`, `+0800` or `Z`/`UTC`.
#[must_use]
pub fn parse_offset(text: &str) -> Option<FixedOffset> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hours: i32 = digits[..2].parse().ok()?;
    let minutes: i32 = digits[2..].parse().ok()?;
    if hours > 14 || minutes > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60))
}

/// FNV-1a, to name a bare token without revealing it.
fn fnv(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:8080"
        [store]
        url = "sqlite://data/cachectl.db"
        [[accounts]]
        name = "acme"
        domains = ["example.com", "*.example.com"]
        tokens = ["acme-secret-token"]
        access_keys = [{ ak = "AK_ACME", sk = "SK_ACME" }]
        [[edges]]
        name = "varnish-1"
        driver = "varnish"
        address = "127.0.0.1:6081"
    "#;

    #[test]
    fn the_contract_example_loads() {
        let settings = Config::from_toml(MINIMAL).unwrap().validate().unwrap();
        assert_eq!(settings.accounts.len(), 1);
        assert_eq!(settings.nodes[0].tier, Tier::Edge);
        assert!(settings.tokens.contains_key("acme-secret-token"));
        assert_eq!(settings.timezone, FixedOffset::east_opt(8 * 3600).unwrap());
        assert_eq!(settings.store_connections, cachectl_store::Connections::default());
        assert_eq!(settings.store_connections.max_connections, 8);
    }

    #[test]
    fn the_postgres_pool_size_is_set_and_checked() {
        let sized = MINIMAL.replace("[store]", "[store]\nmax_connections = 4");
        let settings = Config::from_toml(&sized).unwrap().validate().unwrap();
        assert_eq!(settings.store_connections.max_connections, 4);
        let zero = MINIMAL.replace("[store]", "[store]\nmax_connections = 0");
        let e = Config::from_toml(&zero).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("store.max_connections") && e.contains("at least 1"), "{e}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = Config::from_toml(MINIMAL).unwrap();
        let printed = format!("{config:?} {:?}", config.validate().unwrap().access_keys);
        assert!(!printed.contains("acme-secret-token"), "{printed}");
        assert!(!printed.contains("SK_ACME"), "{printed}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = MINIMAL.replace("127.0.0.1:6081", "nowhere");
        let e = Config::from_toml(&bad).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("edges[0].address"), "{e}");
        let bad = MINIMAL.replace("driver = \"varnish\"", "driver = \"squidx\"");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("driver"), "{e}");
        let bad = MINIMAL.replace("[server]", "[server]\nlisten_typo = 1");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("listen_typo"), "{e}");
        let bad = MINIMAL.replace("\"*.example.com\"", "\"*.\"");
        let e = Config::from_toml(&bad).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("accounts[0].domains[1]"), "{e}");
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("+08:00"), FixedOffset::east_opt(28800));
        assert_eq!(parse_offset("-0530"), FixedOffset::east_opt(-19800));
        assert_eq!(parse_offset("UTC"), FixedOffset::east_opt(0));
        assert_eq!(parse_offset("8"), None);
    }
}
