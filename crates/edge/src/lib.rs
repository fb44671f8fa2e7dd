//! Edge cache drivers: for each kind of cache, the HTTP request that purges, bans or prefetches
//! a URL, and what the cache's answer means. Drivers only ever connect to a configured node's
//! address; the submitted URL gives the `Host` header and the path, never a destination.
//! Purges and bans are sent by a node's [`Transport`] (pipelined or plain, see [`transport`]),
//! prefetches by [`EdgeClient`]'s reqwest pool. Nothing here knows the store or a dialect.

use cachectl_core::policy::DomainPattern;
use cachectl_core::{ItemType, Kind, Tier};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub mod pipeline;
pub mod transport;
pub use pipeline::Lane;
pub use transport::{NodeTransport, Plain, Request, Transport, TransportError, TransportKind};

use transport::describe;

/// The most plain URL purges one request may carry ([`ClientSettings::purge_batch`]).
pub const MAX_PURGE_BATCH: usize = 64;

/// The kinds of cache cachectl drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// Varnish with `deploy/varnish/cachectl.vcl`: PURGE, BAN on a path prefix, GET.
    Varnish,
    /// nginx with Debian's cache-purge module and `deploy/nginx/cachectl.conf`: PURGE, GET.
    Nginx,
}

/// One configured cache server.
#[derive(Debug, Clone)]
pub struct Node {
    /// Unique name, used in results and reasons.
    pub name: String,
    /// What kind of cache it is.
    pub driver: Driver,
    /// `host:port` of its HTTP listener.
    pub address: String,
    /// Parent or edge.
    pub tier: Tier,
    /// The domains it serves; empty means all.
    pub domains: Vec<DomainPattern>,
}

impl Node {
    /// Whether this node caches URLs of `host`.
    #[must_use]
    pub fn serves(&self, host: &str) -> bool {
        self.domains.is_empty() || self.domains.iter().any(|d| d.matches(host))
    }
}

/// The HTTP request a driver sends to a node for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// PURGE, BAN or GET.
    pub method: Method,
    /// Path and query to request on the node.
    pub path_and_query: String,
    /// The `Host` header: the submitted URL's authority, as clients send it.
    pub host: String,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// Whether the body must be read to its end (prefetch).
    pub read_body: bool,
}

/// What a node's answer means for the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done on this node.
    Success {
        /// The HTTP status.
        code: u16,
    },
    /// A transient failure: try again after a backoff, until the deadline.
    Retry {
        /// The HTTP status, if the node answered.
        code: Option<u16>,
        /// What went wrong.
        error: String,
    },
    /// A definitive failure: trying again cannot help.
    Fail {
        /// The HTTP status, if the node answered.
        code: Option<u16>,
        /// What went wrong.
        error: String,
    },
}

/// The request for `kind`/`item_type` on `url` with `driver`.
///
/// # Errors
/// The driver cannot do this (a directory purge on nginx): a definitive failure's reason.
pub fn plan(driver: Driver, kind: Kind, item_type: ItemType, url: &str) -> Result<Plan, String> {
    plan_item(driver, kind, item_type, url, false)
}

/// The request for an item: `text` is its URL, or the `tag:<host>:<tag>` / `regex:<host>:<regex>`
/// of a tag or regex item (`cachectl_core::target`); `soft` asks for a soft purge (Varnish:
/// `purge.soft()` or xkey's `softpurge`, the objects kept stale for their grace).
///
/// # Errors
/// The driver cannot do this (a directory, tag, regex or soft purge on nginx, a soft ban on
/// Varnish): a definitive failure's reason.
pub fn plan_item(driver: Driver, kind: Kind, item_type: ItemType, text: &str, soft: bool) -> Result<Plan, String> {
    if matches!(item_type, ItemType::Tag | ItemType::Regex) {
        return plan_target(driver, item_type, text, soft);
    }
    let parsed = url::Url::parse(text).map_err(|e| format!("unparsable URL: {e}"))?;
    let host = match (parsed.host_str(), parsed.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => return Err("URL without a host".to_owned()),
    };
    let path_and_query = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let simple = |method: Method, read_body: bool| Plan {
        method,
        path_and_query: path_and_query.clone(),
        host: host.clone(),
        headers: Vec::new(),
        read_body,
    };
    match (driver, kind, item_type) {
        (_, Kind::Prefetch, _) => Ok(simple(Method::GET, true)),
        (Driver::Nginx, Kind::Refresh, _) if soft => Err(NGINX_SOFT.to_owned()),
        (_, Kind::Refresh, ItemType::Dir) if soft => Err(SOFT_BAN.to_owned()),
        (Driver::Varnish, Kind::Refresh, ItemType::Url) if soft => {
            Ok(Plan { headers: vec![soft_header()], ..simple(purge_method(), false) })
        }
        (_, Kind::Refresh, ItemType::Url) => Ok(simple(purge_method(), false)),
        (Driver::Varnish, Kind::Refresh, ItemType::Dir) => Ok(Plan {
            method: ban_method(),
            path_and_query: "/".to_owned(),
            host,
            headers: vec![("x-cachectl-ban", regex_escape(parsed.path()))],
            read_body: false,
        }),
        (Driver::Nginx, Kind::Refresh, ItemType::Dir) => {
            Err("nginx cannot purge a directory: the cache-purge module 2.3 ignores wildcard keys; \
             directory purges on nginx go through the cache-host agent (edge transport = \"nats\")"
                .to_owned())
        }
        (_, Kind::Refresh, ItemType::Tag | ItemType::Regex) => plan_target(driver, item_type, text, soft),
    }
}

/// The header that makes a Varnish PURGE soft.
fn soft_header() -> (&'static str, String) {
    ("x-cachectl-soft", "1".to_owned())
}

const NGINX_SOFT: &str = "nginx cannot soft-purge: the cache-purge module only deletes, and the cache-host agent does not rewrite nginx's cache files";

const SOFT_BAN: &str = "a directory or regex purge is a Varnish ban, which always removes: it cannot be soft";

/// A tag purge (Varnish: PURGE with `X-Cachectl-Tag`, answered through xkey) or a regex purge
/// (Varnish: BAN with `X-Cachectl-Regex`), scoped by the VCL to the item's host.
fn plan_target(driver: Driver, item_type: ItemType, text: &str, soft: bool) -> Result<Plan, String> {
    let (_, host, value) = cachectl_core::target::split(text)
        .filter(|(t, _, _)| *t == item_type)
        .ok_or_else(|| format!("unreadable {item_type} item {text:?}"))?;
    // An empty regex (accepted with confirm_all) matches as `^` does; a header cannot be empty.
    let value = if value.is_empty() { "^" } else { value };
    let target = |method: Method, header: &'static str| Plan {
        method,
        path_and_query: "/".to_owned(),
        host: host.to_owned(),
        headers: std::iter::once((header, value.to_owned())).chain(soft.then(soft_header)).collect(),
        read_body: false,
    };
    match (driver, item_type) {
        (Driver::Varnish, ItemType::Tag) => Ok(target(purge_method(), "x-cachectl-tag")),
        (Driver::Varnish, _) if soft => Err(SOFT_BAN.to_owned()),
        (Driver::Varnish, _) => Ok(target(ban_method(), "x-cachectl-regex")),
        (Driver::Nginx, _) => Err(format!(
            "nginx cannot purge by {}: the cache-purge module only knows exact keys; \
             {item_type} purges on nginx go through the cache-host agent (edge transport = \"nats\")",
            if item_type == ItemType::Tag { "cache tag" } else { "regex" },
        )),
    }
}

fn ban_method() -> Method {
    Method::from_bytes(b"BAN").unwrap_or(Method::DELETE)
}

fn purge_method() -> Method {
    Method::from_bytes(b"PURGE").unwrap_or(Method::DELETE)
}

/// Escapes every regex metacharacter of `text` with a backslash, so that a path prefix matches
/// literally in a Varnish ban (PCRE2). Varnish's `std.ban()` passes backslashes through as they are.
#[must_use]
pub fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '\\' | '.' | '^' | '$' | '|' | '?' | '*' | '+' | '(' | ')' | '[' | ']' | '{' | '}' | '#') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What an HTTP status from a node means.
///
/// Refresh: 2xx, 404 and 412 ("was not cached") succeed; other 4xx fail (the node refuses, which a
/// retry cannot change); 5xx are retried. Prefetch: 2xx succeeds once the body is read; 502, 503 and
/// 504 are the cache's own gateway errors and are retried; any other 4xx/5xx is the origin's answer
/// and fails definitively.
#[must_use]
pub fn classify(kind: Kind, code: u16) -> Outcome {
    let error = || format!("HTTP {code}");
    match (kind, code) {
        (_, 200..=299) => Outcome::Success { code },
        (Kind::Refresh, 404 | 412) => Outcome::Success { code },
        (Kind::Refresh, 500..=599) | (Kind::Prefetch, 502..=504) => Outcome::Retry { code: Some(code), error: error() },
        (Kind::Prefetch, 400..=599) => {
            Outcome::Fail { code: Some(code), error: format!("origin answered HTTP {code}") }
        }
        _ => Outcome::Fail { code: Some(code), error: error() },
    }
}

/// Settings of the HTTP client that talks to the nodes.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// Whole-request timeout, body included.
    pub request_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Requests in flight to one node at most: prefetches (and plain purges and bans) over
    /// reqwest's keep-alive pool, pipelined purges and bans over `ceil(per_node / pipeline_depth)`
    /// connections.
    pub per_node: usize,
    /// Purges and bans written on one pipelined connection before the first is answered (1: none).
    pub pipeline_depth: usize,
    /// What carries purges and bans: the pipelined lane or reqwest's pool.
    pub transport: TransportKind,
    /// Plain URL purges of one host sent to a Varnish node in one pipelined request at most
    /// (1: one a request; see [`pipeline`], batched purges). nginx nodes always get one a request.
    pub purge_batch: usize,
}

/// Sends driver requests to nodes over kept-alive connections.
#[derive(Debug, Clone)]
pub struct EdgeClient {
    http: reqwest::Client,
    settings: ClientSettings,
}

impl EdgeClient {
    /// A client with a keep-alive pool per node.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(settings: ClientSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_max_idle_per_host(settings.per_node)
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .build()?;
        Ok(Self { http, settings })
    }

    /// The transport of `node`'s purges and bans, as `settings.transport` says: the pipelined
    /// connections (see [`pipeline`]), whose tasks it starts (call it within a Tokio runtime,
    /// once per node), or this client's keep-alive pool.
    #[must_use]
    pub fn transport(&self, node: &Node) -> NodeTransport {
        match self.settings.transport {
            TransportKind::Pipelined => {
                let depth = self.settings.pipeline_depth.max(1);
                NodeTransport::Pipelined(Lane::spawn(
                    &node.address,
                    pipeline::LaneSettings {
                        connections: self.settings.per_node.max(1).div_ceil(depth),
                        depth,
                        connect_timeout: self.settings.connect_timeout,
                        request_timeout: self.settings.request_timeout,
                        batch: if node.driver == Driver::Varnish { self.settings.purge_batch.max(1) } else { 1 },
                    },
                ))
            }
            TransportKind::Plain => NodeTransport::Plain(Plain::new(self.http.clone(), &node.address)),
        }
    }

    /// Does `kind`/`item_type` of `url` on `node` once and says what came of it. Purges and
    /// bans go through `transport` (from [`EdgeClient::transport`] for this node, or any other
    /// [`Transport`] to it), prefetches through the keep-alive pool.
    pub async fn execute(
        &self,
        node: &Node,
        transport: &impl Transport,
        kind: Kind,
        item_type: ItemType,
        url: &str,
    ) -> Outcome {
        self.execute_item(node, transport, kind, item_type, url, false).await
    }

    /// [`EdgeClient::execute`] for any item: `text` is its URL or its tag or regex text, `soft`
    /// asks for a soft purge (see [`plan_item`]).
    pub async fn execute_item(
        &self,
        node: &Node,
        transport: &impl Transport,
        kind: Kind,
        item_type: ItemType,
        text: &str,
        soft: bool,
    ) -> Outcome {
        let plan = match plan_item(node.driver, kind, item_type, text, soft) {
            Ok(plan) => plan,
            Err(error) => return Outcome::Fail { code: None, error },
        };
        if plan.read_body {
            return self.prefetch(node, kind, plan).await;
        }
        let request = match Request::new(plan) {
            Ok(request) => request,
            Err(error) => return Outcome::Fail { code: None, error },
        };
        match transport.send(request).await {
            Ok(code) => classify(kind, code),
            Err(error) => Outcome::Retry { code: None, error },
        }
    }

    /// Sends a prefetch's GET and reads its body to the end.
    async fn prefetch(&self, node: &Node, kind: Kind, plan: Plan) -> Outcome {
        let target = format!("http://{}{}", node.address, plan.path_and_query);
        let mut request = self.http.request(plan.method, &target).header(reqwest::header::HOST, &plan.host);
        for (name, value) in &plan.headers {
            request = request.header(*name, value);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Retry { code: None, error: describe(&node.address, &e) },
        };
        let code = response.status().as_u16();
        let outcome = classify(kind, code);
        if !matches!(outcome, Outcome::Success { .. }) {
            // Reading (and discarding) the short answer keeps the connection reusable.
            let _ = response.bytes().await;
            return outcome;
        }
        loop {
            match response.chunk().await {
                Ok(Some(_)) => {}
                Ok(None) => return outcome,
                Err(e) => {
                    let error = format!("body cut short: {}", describe(&node.address, &e));
                    return Outcome::Retry { code: Some(code), error };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varnish_plans() {
        let p = plan(Driver::Varnish, Kind::Refresh, ItemType::Url, "http://www.example.com/a/b?c=1").unwrap();
        assert_eq!(p.method.as_str(), "PURGE");
        assert_eq!(p.path_and_query, "/a/b?c=1");
        assert_eq!(p.host, "www.example.com");
        let p = plan(Driver::Varnish, Kind::Refresh, ItemType::Dir, "http://x.example.com:8080/a.b/").unwrap();
        assert_eq!(p.method.as_str(), "BAN");
        assert_eq!(p.host, "x.example.com:8080");
        assert_eq!(p.headers, vec![("x-cachectl-ban", "/a\\.b/".to_owned())]);
        let p = plan(Driver::Varnish, Kind::Prefetch, ItemType::Url, "https://www.example.com/x").unwrap();
        assert_eq!((p.method, p.read_body), (Method::GET, true));
    }

    #[test]
    fn tag_regex_and_soft_plans() {
        let p = plan_item(Driver::Varnish, Kind::Refresh, ItemType::Tag, "tag:www.example.com:p-1", false).unwrap();
        assert_eq!((p.method.as_str(), p.path_and_query.as_str(), p.host.as_str()), ("PURGE", "/", "www.example.com"));
        assert_eq!(p.headers, vec![("x-cachectl-tag", "p-1".to_owned())]);
        let p = plan_item(Driver::Varnish, Kind::Refresh, ItemType::Tag, "tag:www.example.com:p:1", true).unwrap();
        assert_eq!(p.headers, vec![("x-cachectl-tag", "p:1".to_owned()), ("x-cachectl-soft", "1".to_owned())]);
        let p =
            plan_item(Driver::Varnish, Kind::Refresh, ItemType::Regex, "regex:a.example.com:^/x:y$", false).unwrap();
        assert_eq!((p.method.as_str(), p.host.as_str()), ("BAN", "a.example.com"));
        assert_eq!(p.headers, vec![("x-cachectl-regex", "^/x:y$".to_owned())]);
        let p = plan_item(Driver::Varnish, Kind::Refresh, ItemType::Url, "http://www.example.com/a", true).unwrap();
        assert_eq!((p.method.as_str(), p.headers[0].0), ("PURGE", "x-cachectl-soft"));
        for (t, text) in [(ItemType::Regex, "regex:a.example.com:^/"), (ItemType::Dir, "http://a.example.com/d/")] {
            let err = plan_item(Driver::Varnish, Kind::Refresh, t, text, true).unwrap_err();
            assert!(err.contains("cannot be soft"), "{err}");
        }
        for (t, text, soft, says) in [
            (ItemType::Tag, "tag:a.example.com:t", false, "cache tag"),
            (ItemType::Regex, "regex:a.example.com:^/", false, "regex"),
            (ItemType::Url, "http://a.example.com/x", true, "soft-purge"),
        ] {
            let err = plan_item(Driver::Nginx, Kind::Refresh, t, text, soft).unwrap_err();
            assert!(err.contains(says) && err.contains("agent"), "{err}");
        }
        assert!(plan_item(Driver::Varnish, Kind::Refresh, ItemType::Tag, "regex:a.example.com:x", false).is_err());
    }

    #[test]
    fn nginx_cannot_purge_directories() {
        let err = plan(Driver::Nginx, Kind::Refresh, ItemType::Dir, "http://www.example.com/d/").unwrap_err();
        assert!(err.contains("nginx cannot purge a directory"), "{err}");
        assert!(plan(Driver::Nginx, Kind::Refresh, ItemType::Url, "http://www.example.com/d").is_ok());
    }

    #[test]
    fn escapes_every_metacharacter() {
        assert_eq!(regex_escape("/a.b/(c)+[d]$^|?*{e}\\"), "/a\\.b/\\(c\\)\\+\\[d\\]\\$\\^\\|\\?\\*\\{e\\}\\\\");
    }

    #[test]
    fn classifies_answers() {
        assert_eq!(classify(Kind::Refresh, 200), Outcome::Success { code: 200 });
        assert_eq!(classify(Kind::Refresh, 404), Outcome::Success { code: 404 });
        assert_eq!(classify(Kind::Refresh, 412), Outcome::Success { code: 412 });
        assert!(matches!(classify(Kind::Refresh, 403), Outcome::Fail { .. }));
        assert!(matches!(classify(Kind::Refresh, 503), Outcome::Retry { .. }));
        assert!(matches!(classify(Kind::Prefetch, 404), Outcome::Fail { .. }));
        assert!(matches!(classify(Kind::Prefetch, 500), Outcome::Fail { .. }));
        assert!(matches!(classify(Kind::Prefetch, 503), Outcome::Retry { .. }));
    }

    #[test]
    fn nodes_serve_their_domains() {
        let mut node = Node {
            name: "n".into(),
            driver: Driver::Varnish,
            address: "127.0.0.1:1".into(),
            tier: Tier::Edge,
            domains: vec![],
        };
        assert!(node.serves("anything.com"));
        node.domains = vec![DomainPattern::parse("*.example.com").unwrap()];
        assert!(node.serves("a.example.com"));
        assert!(!node.serves("example.org"));
    }
}
