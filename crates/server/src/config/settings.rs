//! Validation of the configuration file into [`Settings`]: every value checked, every error
//! naming its key, accounts, credentials, webhooks and edges built into their typed forms.

use super::{Config, ConfigError, RetentionConfig, TokenConfig, WorkerConfig};
use crate::auth::{Credential, Secret};
use cachectl_core::AccountName;
use cachectl_core::policy::DomainPattern;
use cachectl_core::service::{Account, Quotas};
use cachectl_edge::{MAX_PURGE_BATCH, Node};
use chrono::FixedOffset;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

impl Config {
    /// Checks every value and builds the typed settings the service runs on.
    ///
    /// # Errors
    /// The first invalid value, named by its key.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let listen: SocketAddr = self.server.listen.parse().map_err(|e| {
            err("server.listen".into(), format!("{:?} is not an address:port ({e})", self.server.listen))
        })?;
        if !cachectl_store::supported(&self.store.url) {
            return Err(err("store.url".into(), "supported schemes are sqlite:// and postgres://".into()));
        }
        let http = self.http_limits()?;
        if self.server.max_streams_per_account == 0 {
            return Err(err("server.max_streams_per_account".into(), "must be at least 1".into()));
        }
        let timezone = parse_offset(&self.baishan.timezone).ok_or_else(|| {
            err("baishan.timezone".into(), format!("{:?} is not an offset like +08:00", self.baishan.timezone))
        })?;
        self.check_limits()?;
        let Credentials { accounts, tokens, access_keys, webhooks } = self.credentials()?;
        let nodes = self.nodes()?;
        let bus = self.bus_settings()?;
        let admin = self.admin_settings()?;
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
            max_streams_per_account: self.server.max_streams_per_account,
            worker: self.worker.clone(),
            retention: self.retention.clone(),
            timezone,
            accounts,
            tokens,
            access_keys,
            nodes,
            bus,
            default_rate_limit: self.baishan.rate_limit_per_minute,
            webhooks,
            admin,
        })
    }

    /// `[admin]`: its tokens' hashes and the sealing key.
    fn admin_settings(&self) -> Result<AdminSettings, ConfigError> {
        let a = &self.admin;
        let key = match &a.key_file {
            Some(path) => Some(
                crate::secrets::SealKey::from_file(path).map_err(|e| err("admin.key_file".into(), e.to_string()))?,
            ),
            None => None,
        };
        if a.poll_interval < Duration::from_millis(100) {
            return Err(err("admin.poll_interval".into(), "must be at least 100ms".into()));
        }
        let mut tokens = Vec::new();
        for (i, t) in a.tokens.iter().enumerate() {
            let hash = hex::decode(t.sha256.trim())
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| err(format!("admin.tokens[{i}].sha256"), "must be 64 hex digits (a SHA-256)".into()))?;
            if t.name.trim().is_empty() {
                return Err(err(format!("admin.tokens[{i}].name"), "must not be empty".into()));
            }
            tokens.push((t.name.clone(), hash));
        }
        Ok(AdminSettings { key, poll_interval: a.poll_interval, tokens })
    }

    /// `[server]`'s timeouts and connection cap.
    fn http_limits(&self) -> Result<crate::http::Limits, ConfigError> {
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
        Ok(http)
    }

    /// The worker's, the store's and the retention's numeric limits.
    fn check_limits(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        for (key, value) in [
            ("per_node_concurrency", w.per_node_concurrency),
            ("pipeline_depth", w.pipeline_depth),
            ("purge_batch", w.purge_batch),
            ("max_items_in_flight", w.max_items_in_flight),
        ] {
            if value == 0 {
                return Err(err(format!("worker.{key}"), "must be at least 1".into()));
            }
        }
        if w.purge_batch > MAX_PURGE_BATCH {
            return Err(err("worker.purge_batch".into(), format!("must be at most {MAX_PURGE_BATCH}")));
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
        Ok(())
    }

    /// Every account with its tokens, access keys and webhook receivers.
    fn credentials(&self) -> Result<Credentials, ConfigError> {
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
            let account = Arc::new(
                build_account(
                    &a.name,
                    &a.domains,
                    &a.quotas,
                    a.rate_limit_per_minute,
                    self.baishan.rate_limit_per_minute,
                )
                .map_err(|(field, m)| err(key(&field), m))?,
            );
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
                    .insert(
                        secret.expose().to_owned(),
                        Credential { account: account.clone(), operator: name, address: String::new() },
                    )
                    .is_some()
                {
                    return Err(err(format!("accounts[{i}].tokens[{j}]"), "the same token is configured twice".into()));
                }
            }
            for (j, k) in a.access_keys.iter().enumerate() {
                if k.ak.is_empty() || k.sk.expose().is_empty() {
                    return Err(err(format!("accounts[{i}].access_keys[{j}]"), "ak and sk must not be empty".into()));
                }
                let value = (
                    Credential { account: account.clone(), operator: k.ak.clone(), address: String::new() },
                    k.sk.clone(),
                );
                if access_keys.insert(k.ak.clone(), value).is_some() {
                    return Err(err(
                        format!("accounts[{i}].access_keys[{j}].ak"),
                        "the same access key is configured twice".into(),
                    ));
                }
            }
            let targets = webhook_targets(i, a)?;
            if !targets.is_empty() {
                webhooks.insert(a.name.clone(), targets);
            }
            accounts.push(account);
        }
        Ok(Credentials { accounts, tokens, access_keys, webhooks })
    }

    /// Every edge node.
    fn nodes(&self) -> Result<Vec<EdgeNode>, ConfigError> {
        let mut nodes = Vec::new();
        let mut node_names = HashSet::new();
        for (i, e) in self.edges.iter().enumerate() {
            let key = |field: &str| format!("edges[{i}].{field}");
            if e.name.trim().is_empty() || !node_names.insert(e.name.clone()) {
                return Err(err(key("name"), format!("{:?} is empty or used twice", e.name)));
            }
            nodes.push(build_node(e).map_err(|(field, m)| err(key(&field), m))?);
        }
        Ok(nodes)
    }

    /// `[bus]`, when an edge needs it.
    fn bus_settings(&self) -> Result<Option<BusSettings>, ConfigError> {
        let b = &self.bus;
        // An instance with `[bus] url` set connects even without a bus edge in the file: the admin
        // API may add one while it runs.
        if !self.edges.iter().any(|e| e.transport == super::EdgeTransport::Nats) && b.url.trim().is_empty() {
            return Ok(None);
        }
        if b.url.trim().is_empty() {
            return Err(err("bus.url".into(), "is required when an edge has transport = \"nats\"".into()));
        }
        if b.command_batch == 0 {
            return Err(err("bus.command_batch".into(), "must be at least 1".into()));
        }
        if b.command_hold >= self.worker.item_deadline {
            return Err(err("bus.command_hold".into(), "must be shorter than worker.item_deadline".into()));
        }
        if b.stream_replicas == 0 || b.stream_replicas > 5 {
            return Err(err("bus.stream_replicas".into(), "must be 1 to 5".into()));
        }
        if b.stream_max_mib == 0 || b.stream_max_mib > 1 << 30 {
            return Err(err("bus.stream_max_mib".into(), "must be 1 to 1073741824".into()));
        }
        if b.stale_after.is_zero() || b.down_after < b.stale_after {
            return Err(err(
                "bus.down_after".into(),
                "must be at least bus.stale_after, which must be more than 0".into(),
            ));
        }
        Ok(Some(BusSettings {
            url: b.url.clone(),
            streams: cachectl_bus::protocol::StreamSettings {
                replicas: b.stream_replicas,
                max_age: b.stream_max_age.unwrap_or(self.worker.item_deadline),
                max_bytes: b.stream_max_mib << 20,
            },
            command_batch: b.command_batch,
            command_hold: b.command_hold,
            stale_after: b.stale_after,
            down_after: b.down_after,
        }))
    }
}

/// An account from its settings; an error names the field (`domains[1]`) and what is wrong.
///
/// # Errors
/// A domain pattern is invalid, there is none, or the rate limit is 0.
pub fn build_account(
    name: &str,
    domains: &[String],
    quotas: &super::QuotaConfig,
    rate_limit_per_minute: Option<u32>,
    default_rate_limit: u32,
) -> Result<Account, (String, String)> {
    if domains.is_empty() {
        return Err(("domains".into(), "an account needs at least one domain".into()));
    }
    let domains = domains
        .iter()
        .enumerate()
        .map(|(j, d)| DomainPattern::parse(d).map_err(|e| (format!("domains[{j}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    let defaults = Quotas::default();
    let account = Account {
        name: AccountName::new(name.to_owned()),
        domains,
        quotas: Quotas {
            refresh_urls: quotas.refresh_urls.unwrap_or(defaults.refresh_urls),
            refresh_dirs: quotas.refresh_dirs.unwrap_or(defaults.refresh_dirs),
            prefetch_urls: quotas.prefetch_urls.unwrap_or(defaults.prefetch_urls),
            refresh_tags: quotas.refresh_tags.unwrap_or(defaults.refresh_tags),
            refresh_regexes: quotas.refresh_regexes.unwrap_or(defaults.refresh_regexes),
        },
        rate_limit_per_minute: rate_limit_per_minute.unwrap_or(default_rate_limit),
    };
    if account.rate_limit_per_minute == 0 {
        return Err(("rate_limit_per_minute".into(), "must be at least 1".into()));
    }
    Ok(account)
}

/// An edge node from its settings; an error names the field and what is wrong.
///
/// # Errors
/// The name, address or a domain pattern is invalid.
pub fn build_node(e: &super::EdgeConfig) -> Result<EdgeNode, (String, String)> {
    if e.name.trim().is_empty() || e.name.len() > 128 || e.name.chars().any(char::is_control) {
        return Err(("name".into(), format!("{:?}: a node needs a name of 1 to 128 printable characters", e.name)));
    }
    if e.transport == super::EdgeTransport::Nats && !cachectl_bus::protocol::valid_name(&e.name) {
        return Err((
            "name".into(),
            format!("{:?}: a node reached through the bus needs a name of 1 to 64 of A-Z a-z 0-9 _ -", e.name),
        ));
    }
    let valid_address = e.transport == super::EdgeTransport::Nats
        || e.address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    if !valid_address {
        return Err(("address".into(), format!("{:?} is not host:port", e.address)));
    }
    let domains = e
        .domains
        .iter()
        .enumerate()
        .map(|(j, d)| DomainPattern::parse(d).map_err(|m| (format!("domains[{j}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EdgeNode {
        node: Node { name: e.name.clone(), driver: e.driver, address: e.address.clone(), tier: e.tier, domains },
        via_bus: e.transport == super::EdgeTransport::Nats,
    })
}

/// What `credentials` builds from `[[accounts]]`.
struct Credentials {
    accounts: Vec<Arc<Account>>,
    tokens: HashMap<String, Credential>,
    access_keys: HashMap<String, (Credential, Secret)>,
    webhooks: HashMap<String, Vec<crate::webhooks::Target>>,
}

fn err(key: String, msg: String) -> ConfigError {
    ConfigError(format!("{key}: {msg}"))
}

/// The webhook receivers of account `i`.
fn webhook_targets(i: usize, a: &super::AccountConfig) -> Result<Vec<crate::webhooks::Target>, ConfigError> {
    let mut targets = Vec::new();
    for (j, w) in a.webhooks.iter().enumerate() {
        if !matches!(url::Url::parse(&w.url).map(|u| u.scheme().to_owned()).as_deref(), Ok("http" | "https")) {
            return Err(err(format!("accounts[{i}].webhooks[{j}].url"), format!("{:?} is not an http(s) URL", w.url)));
        }
        if w.secret.expose().len() < 16 {
            return Err(err(format!("accounts[{i}].webhooks[{j}].secret"), "needs at least 16 characters".into()));
        }
        targets.push(crate::webhooks::Target { url: w.url.clone(), secret: w.secret.clone() });
    }
    Ok(targets)
}

/// A configured edge and how it is reached.
#[derive(Debug, Clone)]
pub struct EdgeNode {
    /// The node.
    pub node: Node,
    /// Through the bus to its agent (`transport = "nats"`), else HTTP to its address.
    pub via_bus: bool,
}

/// The validated `[bus]`.
#[derive(Debug, Clone)]
pub struct BusSettings {
    /// The NATS server(s).
    pub url: String,
    /// How the streams are created.
    pub streams: cachectl_bus::protocol::StreamSettings,
    /// Commands per message at most.
    pub command_batch: usize,
    /// How long a command may be held while its nodes are busy (zero: never).
    pub command_hold: Duration,
    /// When an agent becomes stale.
    pub stale_after: Duration,
    /// When an agent is down.
    pub down_after: Duration,
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
    /// `[server] max_streams_per_account`.
    pub max_streams_per_account: usize,
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
    pub nodes: Vec<EdgeNode>,
    /// The bus, when at least one edge is reached through it.
    pub bus: Option<BusSettings>,
    /// The Baishan rate limit reported to requests without a valid token.
    pub default_rate_limit: u32,
    /// Account name → webhook receivers.
    pub webhooks: HashMap<String, Vec<crate::webhooks::Target>>,
    /// `[admin]`.
    pub admin: AdminSettings,
}

/// The validated `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The key sealing BCE secret keys, when `key_file` is set.
    pub key: Option<crate::secrets::SealKey>,
    /// How often the store is checked for changes.
    pub poll_interval: Duration,
    /// Admin token holders and their tokens' SHA-256.
    pub tokens: Vec<(String, crate::secrets::TokenHash)>,
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
    use cachectl_core::Tier;

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
        assert_eq!(settings.nodes[0].node.tier, Tier::Edge);
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
    fn the_bus_command_hold_defaults_to_a_second_and_stays_below_the_item_deadline() {
        let with_bus = format!("[bus]\nurl = \"nats://127.0.0.1:4222\"\n{MINIMAL}");
        let settings = Config::from_toml(&with_bus).unwrap().validate().unwrap();
        assert_eq!(settings.bus.unwrap().command_hold, Duration::from_secs(1));
        let off = with_bus.replace("[bus]", "[bus]\ncommand_hold = \"0s\"");
        let settings = Config::from_toml(&off).unwrap().validate().unwrap();
        assert_eq!(settings.bus.unwrap().command_hold, Duration::ZERO);
        let long = with_bus.replace("[bus]", "[bus]\ncommand_hold = \"10m\"");
        let e = Config::from_toml(&long).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("bus.command_hold") && e.contains("item_deadline"), "{e}");
    }

    #[test]
    fn the_edge_transport_is_pipelined_unless_set_to_plain() {
        use cachectl_edge::TransportKind;
        let settings = Config::from_toml(MINIMAL).unwrap().validate().unwrap();
        assert_eq!(settings.worker.edge_transport, TransportKind::Pipelined);
        let plain = format!("[worker]\nedge_transport = \"plain\"\n{MINIMAL}");
        let settings = Config::from_toml(&plain).unwrap().validate().unwrap();
        assert_eq!(settings.worker.edge_transport, TransportKind::Plain);
        let bad = format!("[worker]\nedge_transport = \"http2\"\n{MINIMAL}");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("edge_transport") && e.contains("pipelined") && e.contains("plain"), "{e}");
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
