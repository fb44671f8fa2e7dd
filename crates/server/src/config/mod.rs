//! The configuration file: defaults, then the TOML file, then `CACHECTL_<SECTION>__<KEY>`
//! environment variables (docs/configuration.md). This module holds the file's shape and its
//! loading; [`settings`] validates it into the typed values the service runs on, so that a bad
//! configuration fails at start with a message naming the key. Secrets never appear in `Debug`.

mod settings;

pub use crate::auth::{Credential, Secret};
pub use settings::{AdminSettings, BusSettings, EdgeNode, Settings, build_account, build_node, parse_offset};

use cachectl_core::Tier;
use cachectl_edge::{Driver, TransportKind};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

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
    /// The message bus to cache-host agents (edges with `transport = "nats"`).
    #[serde(default)]
    pub bus: BusConfig,
    /// The admin API and secrets at rest (docs/administration.md).
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[admin]`: who may use `/admin/v1`, the key that seals BCE secret keys, and how often an
/// instance looks for changes made through another instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A file holding 32 random bytes in base64 (`head -c32 /dev/urandom | base64`), the AES-256
    /// key that seals the BCE secret keys the admin API issues. Without it, access keys cannot be
    /// issued through the API.
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// How often each instance checks the store for changes (default 2 s).
    #[serde(default = "default_admin_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Admin tokens, by the SHA-256 of the token (`cachectl admin new-token` makes one).
    #[serde(default)]
    pub tokens: Vec<AdminTokenConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { key_file: None, poll_interval: default_admin_poll(), tokens: Vec::new() }
    }
}

fn default_admin_poll() -> Duration {
    Duration::from_secs(2)
}

/// `[[admin.tokens]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenConfig {
    /// Who holds it (recorded in the audit log).
    pub name: String,
    /// The token's SHA-256, 64 hex digits.
    pub sha256: String,
}

/// `[bus]`: NATS JetStream between the control plane and `cachectl agent` (docs/operations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// The NATS server(s), `nats://host:port` (several separated by commas). Required when an
    /// edge has `transport = "nats"`.
    #[serde(default)]
    pub url: String,
    /// Copies of each stream when cachectl creates them: 1 for one NATS server, 3 for a 3-node
    /// cluster.
    #[serde(default = "default_stream_replicas")]
    pub stream_replicas: usize,
    /// How long an unconsumed command or result is kept (default: `[worker] item_deadline`).
    #[serde(default, with = "humantime_serde")]
    pub stream_max_age: Option<Duration>,
    /// The four command streams' size at most, together, in MiB, when cachectl creates them
    /// (each a quarter, at least 1 MiB); past it the oldest commands are dropped.
    #[serde(default = "default_stream_max_mib")]
    pub stream_max_mib: u64,
    /// Commands carried by one message at most.
    #[serde(default = "default_command_batch")]
    pub command_batch: usize,
    /// The longest a command is held back, gathering others into its message, while an agent of
    /// its nodes still has a quarter of `command_batch` published commands to apply; `0s`
    /// publishes every command at once.
    #[serde(default = "default_command_hold", with = "humantime_serde")]
    pub command_hold: Duration,
    /// An agent not heard from for this long is `stale`; its items say they wait for it.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// An agent not heard from for this long is `down`.
    #[serde(default = "default_down_after", with = "humantime_serde")]
    pub down_after: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            stream_replicas: default_stream_replicas(),
            stream_max_age: None,
            stream_max_mib: default_stream_max_mib(),
            command_batch: default_command_batch(),
            command_hold: default_command_hold(),
            stale_after: default_stale_after(),
            down_after: default_down_after(),
        }
    }
}

fn default_stream_replicas() -> usize {
    1
}
fn default_stream_max_mib() -> u64 {
    1024
}
fn default_command_batch() -> usize {
    256
}
fn default_command_hold() -> Duration {
    Duration::from_secs(1)
}
fn default_stale_after() -> Duration {
    Duration::from_secs(6)
}
fn default_down_after() -> Duration {
    Duration::from_secs(30)
}

/// How the control plane reaches an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeTransport {
    /// HTTP straight to the cache's `address` (the default; no bus needed).
    #[default]
    Http,
    /// Commands through the bus to the node's `cachectl agent`.
    Nats,
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
    /// Progress streams (Server-Sent Events) one account may hold open at once; one more is
    /// refused with 429 until one of them ends.
    #[serde(default = "default_max_streams_per_account")]
    pub max_streams_per_account: usize,
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
            max_streams_per_account: default_max_streams_per_account(),
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
fn default_max_streams_per_account() -> usize {
    16
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
    /// Plain URL purges of one host that a Varnish node gets in one pipelined request at most
    /// (its VCL purges the paths in turn, a restart each: varnishd's `max_restarts` must be at
    /// least this minus one, or the node's connections learn its limit); 1 sends one a request.
    #[serde(default = "d_purge_batch")]
    pub purge_batch: usize,
    /// What carries purges and bans to the nodes: `pipelined` (default), the pipelined lane
    /// above, or `plain`, reqwest's keep-alive pool like prefetches (one request per connection
    /// at a time, up to `per_node_concurrency` connections; `pipeline_depth` is then unused).
    #[serde(default)]
    pub edge_transport: TransportKind,
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
            purge_batch: d_purge_batch(),
            edge_transport: TransportKind::default(),
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
    32
}
fn d_purge_batch() -> usize {
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
#[derive(Debug, Clone, Deserialize, serde::Serialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Refreshed URLs per day (default 10,000).
    pub refresh_urls: Option<u64>,
    /// Refreshed directories per day (default 100).
    pub refresh_dirs: Option<u64>,
    /// Prefetched URLs per day (default 10,000).
    pub prefetch_urls: Option<u64>,
    /// Purged cache tags per day (default 10,000; native API only).
    pub refresh_tags: Option<u64>,
    /// Regex purges per day (default 100, as directories: each is a ban; native API only).
    pub refresh_regexes: Option<u64>,
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

/// `[[edges]]`, and the body of the admin API's edge creation.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Unique name, shown in results and failure reasons.
    pub name: String,
    /// `varnish` or `nginx`.
    pub driver: Driver,
    /// `http` (default: the control plane sends to `address`) or `nats` (through the bus to the
    /// agent of this name).
    #[serde(default)]
    pub transport: EdgeTransport,
    /// `host:port` of the cache's HTTP listener (not used with `transport = "nats"`).
    #[serde(default)]
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
}
