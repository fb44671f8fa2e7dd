//! What the fault tests (`soak`, `diskfull`, `failover`) share: a recording proxy in front of each
//! Varnish node, a load of continuous submissions through three dialects, and the check of the
//! promises every one of those tests makes at its end.
//!
//! **How an execution is observed.** Each Varnish node is configured in cachectl by the address of
//! an [`ExecProxy`]: a TCP proxy in this test process that forwards every byte to the real varnishd
//! unchanged (cachectl's pipelined requests included) while framing the HTTP/1.1 messages of both
//! directions. For every request (every path of a batched purge, `X-Cachectl-Next`, as one of its
//! own) it records the method, `Host`, target and the wall-clock
//! millisecond at which the request was complete in the proxy, *before* forwarding its last bytes;
//! for every answer (matched to its request in order, as HTTP/1.1 requires) the status and the
//! millisecond at which it was complete, *before* forwarding it to cachectl (for a batch, the paths
//! its `X-Cachectl-Purged` count confirms; the others stay unanswered, as cachectl sends them
//! again). Varnish executes a
//! purge between those two instants. The proxy also holds each answer until its request is
//! `latency` old (a node a few milliseconds away, as real edges are), so that items stay in flight
//! long enough for a kill to land on them; Varnish on the loopback answers in microseconds.
//!
//! An item's `finished_at` (native API) is the wall-clock millisecond at which cachectl had read the
//! answer that made the item final (the worker stamps it after the answer, `worker::run_node`). On
//! one machine, one clock, therefore:
//! - every node's execution that made the item final was answered at or before `finished_at`;
//! - a purge of the item's URL that reached the proxy *after* `finished_at` came after the item had
//!   finished.
//!
//! The store may make an item final later than its `finished_at`: when it refuses writes for a
//! while, the worker keeps the result in memory and retries. So for every request for a URL the
//! node had received before, the proxy also asks the store, through the native API, whether the
//! item is final, *holding the request* meanwhile: if it is, forwarding the request executes an
//! item that was already final, whatever the clocks say. Every test asserts both: a worker whose
//! lease was taken over while it could not write drops its late result, so `finished_at` is the
//! answer of the execution that counted.

use crate::support::*;
use cachectl_server::api::bce::auth;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A small deterministic random generator (xorshift64*), seeded from `CACHECTL_FAULT_SEED` or the
/// clock; tests print the seed so that a run's kill moments can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Self {
        let seed = std::env::var("CACHECTL_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| u64::try_from(crate::now_ms()).unwrap() ^ u64::from(std::process::id()));
        println!("random seed {seed} (CACHECTL_FAULT_SEED={seed} replays it)");
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `range` (inclusive start, exclusive end).
    pub fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        range.start + self.next() % (range.end - range.start)
    }

    pub fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.below(range))
    }
}

/// A number from the environment variable `name`, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Worker settings of the fault tests: a small per-node concurrency (with the nodes' [`LATENCY`],
/// some 800 purges a second per node), so that items are in flight whenever a fault strikes; a
/// short lease (3 s), so that on PostgreSQL a dead instance's items are taken over within seconds;
/// an item deadline (300 s) no fault test comes near, so that every item is expected to complete.
pub fn worker() -> String {
    let worker = fast_worker("300s");
    assert!(worker.contains("lease = \"5s\""), "fast_worker's lease changed: {worker}");
    let worker = worker.replace("lease = \"5s\"", "lease = \"3s\"");
    format!("{worker}per_node_concurrency = 4\nmax_items_in_flight = 64\n\n")
}

/// The nodes' answers take 5 ms (see [`ExecProxy`]).
pub const LATENCY: Duration = Duration::from_millis(5);

/// The fault tests' load: two submitters, 1 to 20 URLs a task, 25 ms between tasks (some
/// 500 URLs a second in all, below what the nodes take, so that no backlog grows without end).
pub const SHAPE: LoadShape = LoadShape { submitters: 2, max_urls: 20, pause: Duration::from_millis(25) };

/// The last 4,000 bytes of a log.
pub fn tail(log: &str) -> String {
    let start = log.len().saturating_sub(4000);
    let start = (start..log.len()).find(|i| log.is_char_boundary(*i)).unwrap_or(log.len());
    log[start..].to_owned()
}

/// Waits, before a kill, until the instance at `port` has items waiting or processing: the kill
/// then lands while the fan-out is under way.
pub async fn fan_out_under_way(http: &reqwest::Client, port: u16, context: &dyn Fn() -> String) {
    let start = Instant::now();
    while unfinished_items(http, port).await != Some(true) {
        assert!(start.elapsed() < Duration::from_secs(20), "no item in flight to kill the server over\n{}", context());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The recording proxy
// ---------------------------------------------------------------------------------------------

/// One request that went through an [`ExecProxy`] to its node.
#[derive(Debug, Clone)]
pub struct Exec {
    pub method: String,
    pub host: String,
    pub target: String,
    /// When the whole request was in the proxy (ms since the epoch), before it went on.
    pub sent_ms: i64,
    /// The node's answer: when it was whole in the proxy, before it went on, and its status.
    pub answered: Option<(i64, u16)>,
    /// For a request for a URL this node had received before: whether the native API showed the
    /// item final while the request was held in the proxy, not yet forwarded (`None`: no instance
    /// answered within two seconds). `None` for a URL's first request.
    pub final_when_sent: Option<Option<bool>>,
}

impl Exec {
    pub fn url(&self) -> String {
        format!("http://{}{}", self.host, self.target)
    }
}

/// A recording TCP proxy in front of one node (see the module's comment).
pub struct ExecProxy {
    pub name: String,
    pub port: u16,
    log: Arc<Mutex<Vec<Exec>>>,
    /// Messages the proxy could not frame (it then forwards without recording): must stay empty.
    unframed: Arc<Mutex<Vec<String>>>,
    watch: Arc<Watch>,
    task: tokio::task::JoinHandle<()>,
}

/// What a proxy needs to check a repeated request against the store: the URLs it forwarded, and
/// the instances whose native API tells whether an item is final.
#[derive(Default)]
struct Watch {
    seen: Mutex<HashSet<String>>,
    api_ports: Mutex<Vec<u16>>,
    http: reqwest::Client,
}

impl Watch {
    /// Whether the item of `url` is final (completed or failed) in the store, through the native
    /// API of any of the instances; `None` if none answered within two seconds.
    async fn is_final(&self, url: &str) -> Option<bool> {
        let ports = self.api_ports.lock().unwrap().clone();
        let query: String = url::form_urlencoded::Serializer::new(String::new()).append_pair("url", url).finish();
        let start = Instant::now();
        for port in ports.iter().cycle() {
            if start.elapsed() > Duration::from_secs(2) {
                return None;
            }
            let request = self
                .http
                .get(format!("http://127.0.0.1:{port}/api/v1/items?{query}&limit=5"))
                .bearer_auth(TOKEN)
                .timeout(Duration::from_millis(500));
            if let Ok(response) = request.send().await
                && response.status() == 200
                && let Ok(page) = response.json::<Value>().await
            {
                let items = page["items"].as_array()?;
                return Some(
                    items
                        .iter()
                        .any(|i| i["url"] == url && matches!(i["status"].as_str(), Some("completed" | "failed"))),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for ExecProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ExecProxy {
    /// A proxy named `name` (the node's name in cachectl) in front of 127.0.0.1:`upstream`.
    pub async fn start(name: &str, upstream: u16, latency: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let log: Arc<Mutex<Vec<Exec>>> = Arc::default();
        let unframed: Arc<Mutex<Vec<String>>> = Arc::default();
        let watch =
            Arc::new(Watch { http: reqwest::Client::builder().no_proxy().build().unwrap(), ..Watch::default() });
        let (l, u, w) = (log.clone(), unframed.clone(), watch.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        connections.spawn(proxy_connection(client, upstream, latency, l.clone(), u.clone(), w.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self { name: name.to_owned(), port, log, unframed, watch, task }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every request recorded so far, in the order they were complete.
    pub fn log(&self) -> Vec<Exec> {
        self.log.lock().unwrap().clone()
    }

    /// How many requests were recorded so far.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The instances whose native API the proxy asks whether an item is final (see [`Exec`]).
    pub fn watch(&self, api_ports: &[u16]) {
        *self.watch.api_ports.lock().unwrap() = api_ports.to_vec();
    }

    pub fn unframed(&self) -> Vec<String> {
        self.unframed.lock().unwrap().clone()
    }
}

/// The head of an HTTP/1.1 message: first line, headers (names lower-cased), length in bytes.
type Head = (String, Vec<(String, String)>, usize);

/// The head of the HTTP/1.1 message at the start of `buf`, if it is all there.
fn head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((first, headers, end))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The length of a chunked body at the start of `buf`, if it is all there.
fn chunked_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let size_text = String::from_utf8_lossy(&buf[at..at + eol]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

/// The length of the whole message at the start of `buf` (head and body), if it is all there.
/// `body_allowed`: false for answers that never have a body (1xx, 204, 304).
fn message_len(
    headers: &[(String, String)],
    head_len: usize,
    buf: &[u8],
    body_allowed: bool,
) -> Result<Option<usize>, String> {
    if !body_allowed {
        return Ok(Some(head_len));
    }
    if header(headers, "transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        return Ok(chunked_len(&buf[head_len..])?.map(|n| head_len + n));
    }
    let length: usize = match header(headers, "content-length") {
        Some(text) => text.parse().map_err(|_| format!("bad content-length {text:?}"))?,
        None => 0,
    };
    Ok((buf.len() >= head_len + length).then_some(head_len + length))
}

async fn proxy_connection(
    client: TcpStream,
    upstream: u16,
    latency: Duration,
    log: Arc<Mutex<Vec<Exec>>>,
    unframed: Arc<Mutex<Vec<String>>>,
    watch: Arc<Watch>,
) {
    let _ = client.set_nodelay(true);
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Indexes into `log` of the requests on this connection still waiting for their answer: one
    // per path of each request, in order.
    let pending: Arc<Mutex<VecDeque<Vec<usize>>>> = Arc::default();
    let (requests_log, requests_pending, requests_unframed) = (log.clone(), pending.clone(), unframed.clone());
    let requests = async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut framing = true;
        loop {
            let n = match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if framing {
                buf.extend_from_slice(&chunk[..n]);
                while let Some((first, headers, head_len)) = head(&buf) {
                    let total = match message_len(&headers, head_len, &buf, true) {
                        Ok(Some(total)) => total,
                        Ok(None) => break,
                        Err(e) => {
                            requests_unframed.lock().unwrap().push(format!("request {first:?}: {e}"));
                            framing = false;
                            break;
                        }
                    };
                    let mut parts = first.split(' ');
                    let (method, target) =
                        (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
                    let host = header(&headers, "host").unwrap_or("").to_owned();
                    let sent_ms = crate::now_ms();
                    let targets: Vec<String> = std::iter::once(target)
                        .chain(
                            header(&headers, "x-cachectl-next")
                                .into_iter()
                                .flat_map(|n| n.split(' ').map(str::to_owned)),
                        )
                        .collect();
                    let mut indexes = Vec::new();
                    for target in targets {
                        let url = format!("http://{host}{target}");
                        let repeated = !watch.seen.lock().unwrap().insert(url.clone());
                        // A repeated request waits here, not yet forwarded, while the store is asked.
                        let final_when_sent = if repeated { Some(watch.is_final(&url).await) } else { None };
                        let mut log = requests_log.lock().unwrap();
                        let method = method.clone();
                        log.push(Exec { method, host: host.clone(), target, sent_ms, answered: None, final_when_sent });
                        indexes.push(log.len() - 1);
                    }
                    requests_pending.lock().unwrap().push_back(indexes);
                    buf.drain(..total);
                }
            }
            if server_write.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let answers = async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut framing = true;
        let mut answered: Vec<(usize, u16)> = Vec::new();
        // The last request index answered, for the latency hold.
        let mut last_sent: Option<usize> = None;
        loop {
            let n = match server_read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if framing {
                buf.extend_from_slice(&chunk[..n]);
                while let Some((first, headers, head_len)) = head(&buf) {
                    let status: u16 = first.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    let body_allowed = !(status < 200 || status == 204 || status == 304);
                    let total = match message_len(&headers, head_len, &buf, body_allowed) {
                        Ok(Some(total)) => total,
                        Ok(None) => break,
                        Err(e) => {
                            unframed.lock().unwrap().push(format!("answer {first:?}: {e}"));
                            framing = false;
                            break;
                        }
                    };
                    buf.drain(..total);
                    if status < 200 {
                        continue;
                    }
                    let Some(indexes) = pending.lock().unwrap().pop_front() else {
                        unframed.lock().unwrap().push(format!("answer {first:?} to no request"));
                        framing = false;
                        break;
                    };
                    // A batch: the paths the node says it purged, from the first; one path alone,
                    // or a batch without the count: the request's own path.
                    let purged = header(&headers, "x-cachectl-purged").and_then(|n| n.parse::<usize>().ok());
                    let done = if indexes.len() == 1 { 1 } else { purged.unwrap_or(1).min(indexes.len()) };
                    let whole = done == indexes.len();
                    for (i, index) in indexes.iter().take(done).enumerate() {
                        let ok = if whole || (200..300).contains(&status) || (i == 0 && purged.is_none()) {
                            status
                        } else {
                            200
                        };
                        answered.push((*index, ok));
                    }
                    last_sent = indexes.first().copied().or(last_sent);
                }
            }
            // The answers go on once their requests are `latency` old; they are stamped then.
            if let Some(last) = last_sent.take() {
                let sent = log.lock().unwrap()[last].sent_ms;
                let due = sent + i64::try_from(latency.as_millis()).unwrap();
                let wait = due - crate::now_ms();
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap())).await;
                }
                let now = crate::now_ms();
                let mut log = log.lock().unwrap();
                for (index, status) in answered.drain(..) {
                    log[index].answered = Some((now, status));
                }
            }
            if client_write.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    // Either side closing ends the connection, as it would without the proxy.
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}

/// The standard accounts, `acme`'s daily URL quota raised out of the way of a long load.
pub fn accounts() -> String {
    ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nquotas = { refresh_urls = 100000000 }")
}

/// Two Varnish nodes (`v1`, `v2`, both `edge`) in front of one origin, each behind an
/// [`ExecProxy`]; `edges()` is their cachectl configuration.
pub struct Nodes {
    pub proxies: Vec<ExecProxy>,
    _varnish: Vec<Varnish>,
    _origin: Origin,
}

impl Nodes {
    /// Nodes whose answers take at least `latency` (see [`ExecProxy`]).
    pub async fn start(latency: Duration) -> Self {
        let origin = Origin::start().await;
        let mut varnish = Vec::new();
        let mut proxies = Vec::new();
        for name in ["v1", "v2"] {
            let v = Varnish::start(origin.port).await;
            proxies.push(ExecProxy::start(name, v.port, latency).await);
            varnish.push(v);
        }
        Self { proxies, _varnish: varnish, _origin: origin }
    }

    /// The `[[edges]]` of cachectl's configuration: the nodes by their proxies' addresses.
    pub fn edges(&self) -> String {
        self.proxies.iter().map(|p| edge(&p.name, "varnish", &p.address(), "edge")).collect()
    }

    /// The instances whose native API the proxies ask about repeated requests.
    pub fn watch(&self, api_ports: &[u16]) {
        for proxy in &self.proxies {
            proxy.watch(api_ports);
        }
    }

    /// Requests the nodes received so far, over all nodes.
    pub fn executions(&self) -> usize {
        self.proxies.iter().map(ExecProxy::count).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------------------------

/// The dialects the load submits through, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `POST /v2/cache/refresh`, `token` header. Not idempotent: every attempt has new URLs.
    Baishan,
    /// `POST /api/v1/tasks` with an `Idempotency-Key`: a submission that got no answer or a 503 is
    /// sent again, same key, same body, at the dialect's next turn, until it is acknowledged.
    Native,
    /// `POST /v2/geo/cache/purge`, BCE-signed. Not idempotent: every attempt has new URLs.
    Geo,
}

/// A task the server acknowledged, with the URLs it was submitted with.
#[derive(Debug, Clone)]
pub struct Acked {
    pub task_id: i64,
    pub dialect: Dialect,
    pub urls: Vec<String>,
}

/// What the load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub acked: Vec<Acked>,
    /// Every URL ever sent in a submission (acknowledged or not).
    pub attempted: HashSet<String>,
    /// Error answers that were the dialect's 503 in its envelope, per dialect.
    pub unavailable: HashMap<Dialect, usize>,
    /// Any other error answer: (dialect, status, body). Must stay empty.
    pub unexpected: Vec<(Dialect, u16, String)>,
    /// Requests that got no HTTP answer (refused, cut, timed out).
    pub no_answer: usize,
    pub requests: usize,
}

/// Continuous submissions against a set of instances, round robin, as a load balancer would.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    unavailable: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl Drop for Load {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Shape of the load.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Concurrent submitters.
    pub submitters: usize,
    /// URLs per task: 1 up to this many, at random.
    pub max_urls: u64,
    /// Pause after each request (at least 50 ms after a failed one).
    pub pause: Duration,
}

impl Load {
    /// Starts submitting to the instances at `ports`; URLs are `http://www.example.com/<tag>/...`.
    pub fn start(ports: &[u16], tag: &str, shape: LoadShape) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let tasks = (0..shape.submitters)
            .map(|s| {
                let submitter = Submitter {
                    http: reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(15)).build().unwrap(),
                    ports: ports.to_vec(),
                    tag: format!("{tag}/s{s}"),
                    shape,
                    stop: stop.clone(),
                    acked: acked.clone(),
                    unavailable: unavailable.clone(),
                    rng: Rng(u64::try_from(crate::now_ms()).unwrap() ^ ((s as u64 + 1) * 0x9E37_79B9)),
                    report: LoadReport::default(),
                };
                tokio::spawn(submitter.run(s))
            })
            .collect();
        Self { stop, acked, unavailable, tasks }
    }

    /// Tasks acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Answers that were the dialect's 503, so far.
    pub fn unavailable(&self) -> usize {
        self.unavailable.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` more tasks were acknowledged (at most `timeout`).
    pub async fn wait_acked(&self, n: usize, timeout: Duration, context: &dyn Fn() -> String) {
        let target = self.acked() + n;
        let start = Instant::now();
        while self.acked() < target {
            assert!(start.elapsed() < timeout, "no task acknowledged within {timeout:?}\n{}", context());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops submitting (the requests under way are finished) and returns what was seen.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = LoadReport::default();
        for task in std::mem::take(&mut self.tasks) {
            let r = task.await.unwrap();
            total.acked.extend(r.acked);
            total.attempted.extend(r.attempted);
            for (d, n) in r.unavailable {
                *total.unavailable.entry(d).or_default() += n;
            }
            total.unexpected.extend(r.unexpected);
            total.no_answer += r.no_answer;
            total.requests += r.requests;
        }
        total
    }
}

struct Submitter {
    http: reqwest::Client,
    ports: Vec<u16>,
    tag: String,
    shape: LoadShape,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    unavailable: Arc<AtomicUsize>,
    rng: Rng,
    report: LoadReport,
}

/// How one attempt ended.
enum Answer {
    Acked(i64),
    /// The dialect's 503 in its envelope.
    Unavailable,
    /// No HTTP answer.
    Nothing,
    /// Any other answer (recorded in `LoadReport::unexpected`).
    Other,
}

impl Submitter {
    /// One request at a time, the dialects in turn. A Baishan or GEO submission that failed is not
    /// sent again (each attempt is a new task with new URLs); a native one is, with the same key
    /// and body, at the native dialect's next turn, until it is acknowledged.
    async fn run(mut self, index: usize) -> LoadReport {
        let dialects = [Dialect::Baishan, Dialect::Native, Dialect::Geo];
        let mut seq = 0u64;
        let mut native_again: Option<(String, Vec<String>)> = None;
        for turn in 0.. {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let dialect = dialects[turn % dialects.len()];
            let again = if dialect == Dialect::Native { native_again.take() } else { None };
            let (key, urls) = match again {
                Some(again) => again,
                None => {
                    let n = self.rng.below(1..self.shape.max_urls + 1);
                    let urls = self.urls(&mut seq, n);
                    (format!("{}/{seq}", self.tag), urls)
                }
            };
            // Round robin over the instances, as a load balancer would.
            let port = self.ports[(index + turn) % self.ports.len()];
            self.report.attempted.extend(urls.iter().cloned());
            self.report.requests += 1;
            let failed = match self.attempt(port, dialect, &urls, &key).await {
                Answer::Acked(task_id) => {
                    self.report.acked.push(Acked { task_id, dialect, urls });
                    self.acked.fetch_add(1, Ordering::SeqCst);
                    false
                }
                Answer::Unavailable => {
                    *self.report.unavailable.entry(dialect).or_default() += 1;
                    self.unavailable.fetch_add(1, Ordering::SeqCst);
                    if dialect == Dialect::Native {
                        native_again = Some((key, urls));
                    }
                    true
                }
                Answer::Nothing => {
                    self.report.no_answer += 1;
                    if dialect == Dialect::Native {
                        native_again = Some((key, urls));
                    }
                    true
                }
                Answer::Other => true,
            };
            // After a failure, a little longer: a client backing off.
            tokio::time::sleep(if failed { self.shape.pause.max(Duration::from_millis(50)) } else { self.shape.pause })
                .await;
        }
        self.report
    }

    fn urls(&self, seq: &mut u64, n: u64) -> Vec<String> {
        *seq += 1;
        (0..n).map(|i| format!("http://www.example.com/{}/{seq}/{i}", self.tag)).collect()
    }

    async fn attempt(&mut self, port: u16, dialect: Dialect, urls: &[String], key: &str) -> Answer {
        let base = format!("http://127.0.0.1:{port}");
        let sent = match dialect {
            Dialect::Baishan => {
                self.http
                    .post(format!("{base}/v2/cache/refresh"))
                    .header("token", TOKEN)
                    .json(&json!({ "urls": urls }))
                    .send()
                    .await
            }
            Dialect::Native => {
                self.http
                    .post(format!("{base}/api/v1/tasks"))
                    .bearer_auth(TOKEN)
                    .header("idempotency-key", key)
                    .json(&json!({ "urls": urls }))
                    .send()
                    .await
            }
            Dialect::Geo => {
                let tasks: Vec<Value> = urls.iter().map(|u| json!({ "url": u })).collect();
                let body = json!({"site": "example.com", "tasks": tasks}).to_string();
                signed(&self.http, port, "/v2/geo/cache/purge", body).send().await
            }
        };
        let Ok(response) = sent else { return Answer::Nothing };
        let status = response.status().as_u16();
        let Ok(text) = response.text().await else { return Answer::Nothing };
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let id = match (dialect, status) {
            (Dialect::Baishan, 200) => json["data"]["task_id"].as_i64(),
            (Dialect::Native, 201) => json["task"]["id"].as_i64(),
            (Dialect::Geo, 201) => json["id"].as_str().and_then(|s| s.parse().ok()),
            _ => None,
        };
        if let Some(id) = id {
            return Answer::Acked(id);
        }
        if is_unavailable(dialect, status, &json) {
            return Answer::Unavailable;
        }
        if self.report.unexpected.len() < 3 {
            eprintln!("unexpected answer to a {dialect:?} submission: {status} {text}");
        }
        self.report.unexpected.push((dialect, status, text));
        Answer::Other
    }
}

/// Whether an answer is the dialect's own 503: Baishan's envelope with `code` 503, the native
/// error body with code `unavailable`, Baidu's body with code `ServiceUnavailable` and a request id.
pub fn is_unavailable(dialect: Dialect, status: u16, json: &Value) -> bool {
    status == 503
        && match dialect {
            Dialect::Baishan => {
                json["code"] == 503
                    && json["message"].as_str().is_some_and(|m| m.contains("temporarily unavailable"))
                    && json["data"].is_object()
            }
            Dialect::Native => {
                json["error"]["code"] == "unavailable"
                    && json["error"]["message"].as_str().is_some_and(|m| m.contains("temporarily unavailable"))
            }
            Dialect::Geo => {
                json["code"] == "ServiceUnavailable"
                    && json["message"].as_str().is_some_and(|m| m.contains("temporarily unavailable"))
                    && json["requestId"].as_str().is_some_and(|id| id.len() == 36)
            }
        }
}

/// A request signed with BCE v1 as `AK_ACME` (the signature covers host, content length and type, date).
fn signed(http: &reqwest::Client, port: u16, path: &str, body: String) -> reqwest::RequestBuilder {
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let headers = vec![
        ("host".to_owned(), format!("127.0.0.1:{port}")),
        ("content-length".to_owned(), body.len().to_string()),
        ("content-type".to_owned(), "application/json".to_owned()),
        ("x-bce-date".to_owned(), now.clone()),
    ];
    let request = auth::SignedRequest { method: "POST", path, query: &[], headers: &headers };
    let names: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
    let key = auth::signing_key("SK_ACME", "AK_ACME", &now, 1800);
    let signature = auth::hmac_sha256_hex(key.as_bytes(), &auth::canonical_request(&request, &names));
    http.post(format!("http://127.0.0.1:{port}{path}"))
        .header("x-bce-date", &now)
        .header("content-type", "application/json")
        .header("authorization", format!("bce-auth-v1/AK_ACME/{now}/1800//{signature}"))
        .body(body)
}

// ---------------------------------------------------------------------------------------------
// Reading the store through the native API, and the promises
// ---------------------------------------------------------------------------------------------

/// An item as the native API lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: i64,
    pub task_id: i64,
    pub url: String,
    pub status: String,
    pub finished_ms: Option<i64>,
}

/// GET on the native API of the instance at `port`; `None` if there was no 200 answer.
pub async fn native_get(http: &reqwest::Client, port: u16, path_and_query: &str) -> Option<Value> {
    let response = http.get(format!("http://127.0.0.1:{port}{path_and_query}")).bearer_auth(TOKEN).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

/// Whether items are waiting or being processed (the fan-out is under way); `None` if the
/// instance did not answer.
pub async fn unfinished_items(http: &reqwest::Client, port: u16) -> Option<bool> {
    for status in ["waiting", "processing"] {
        let page = native_get(http, port, &format!("/api/v1/items?status={status}&limit=1")).await?;
        if !page["items"].as_array()?.is_empty() {
            return Some(true);
        }
    }
    Some(false)
}

fn millis_of(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}")).timestamp_millis()
}

/// Every item of the account, through `GET /api/v1/items`, following cursors.
pub async fn all_items(http: &reqwest::Client, port: u16) -> Vec<Listed> {
    let mut items = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = native_get(http, port, &format!("/api/v1/items?limit=500{cursor}"))
            .await
            .expect("the native API lists the items");
        for i in page["items"].as_array().unwrap() {
            items.push(Listed {
                id: i["id"].as_i64().unwrap(),
                task_id: i["task_id"].as_i64().unwrap(),
                url: i["url"].as_str().unwrap().to_owned(),
                status: i["status"].as_str().unwrap().to_owned(),
                finished_ms: i["finished_at"].as_str().map(millis_of),
            });
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return items,
        }
    }
}

/// Every task of the account through `GET /api/v1/tasks`: id → (state, total items).
pub async fn all_tasks(http: &reqwest::Client, port: u16) -> HashMap<i64, (String, u64)> {
    let mut tasks = HashMap::new();
    let mut cursor = String::new();
    loop {
        let page = native_get(http, port, &format!("/api/v1/tasks?limit=500{cursor}"))
            .await
            .expect("the native API lists the tasks");
        for t in page["tasks"].as_array().unwrap() {
            let state = t["state"].as_str().unwrap().to_owned();
            tasks.insert(t["id"].as_i64().unwrap(), (state, t["counts"]["total"].as_u64().unwrap()));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return tasks,
        }
    }
}

/// Waits until no item of the account is waiting or processing (at most `timeout`).
pub async fn wait_all_final(http: &reqwest::Client, port: u16, timeout: Duration, context: &dyn Fn() -> String) {
    let start = Instant::now();
    loop {
        if unfinished_items(http, port).await == Some(false) {
            return;
        }
        assert!(start.elapsed() < timeout, "items still unfinished after {timeout:?}\n{}", context());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the final check counted.
#[derive(Debug)]
pub struct Figures {
    pub acked_tasks: usize,
    pub acked_urls: usize,
    /// Items stored from submissions whose answer never reached the client.
    pub stored_unacked: usize,
    pub items: usize,
    /// Purges the nodes received (each path of a batched request counted).
    pub requests_to_nodes: usize,
    /// Items a node was sent more than once (after a kill, a takeover, a lost answer).
    pub items_sent_again: usize,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tasks acknowledged ({} URLs), {} items stored ({} of them from submissions whose answer was lost), \
             {} purges received by the nodes, {} items purged more than once on a node",
            self.acked_tasks,
            self.acked_urls,
            self.items,
            self.stored_unacked,
            self.requests_to_nodes,
            self.items_sent_again
        )
    }
}

/// The promises, checked on the instance at `port` once every item is final:
/// 1. every acknowledged task is stored, with exactly the URLs it was submitted with, its task
///    completed;
/// 2. no duplicate items: each submitted URL is at most one item in the whole store, and every
///    stored item comes from a submission the load sent;
/// 3. every item is completed, and on every node an execution of it was answered 200 at or before
///    its `finished_at`;
/// 4. no item was executed after it was final: no repeated request reached a node while the store
///    showed its item final, and no request reached a node after its item's `finished_at`;
///    every request a node received is for a stored item.
pub async fn check_promises(port: u16, report: &LoadReport, nodes: &Nodes, context: &dyn Fn() -> String) -> Figures {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let items = all_items(&http, port).await;
    let tasks = all_tasks(&http, port).await;

    // 2. No duplicates; nothing the load did not send.
    let mut stored: HashMap<&str, &Listed> = HashMap::new();
    for item in &items {
        assert!(report.attempted.contains(&item.url), "item {} ({}) was never submitted", item.id, item.url);
        if let Some(other) = stored.insert(&item.url, item) {
            panic!(
                "duplicate items for {}: {} (task {}) and {} (task {})",
                item.url, other.id, other.task_id, item.id, item.task_id
            );
        }
    }

    // 1. Every acknowledged task, with all its items.
    let mut by_task: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for item in &items {
        by_task.entry(item.task_id).or_default().push(&item.url);
    }
    let mut acked_ids = HashSet::new();
    let mut acked_urls = 0;
    for acked in &report.acked {
        assert!(acked_ids.insert(acked.task_id), "task {} acknowledged twice", acked.task_id);
        let mut stored: Vec<&str> = by_task.get(&acked.task_id).cloned().unwrap_or_default();
        stored.sort_unstable();
        let mut sent: Vec<&str> = acked.urls.iter().map(String::as_str).collect();
        sent.sort_unstable();
        assert_eq!(
            stored,
            sent,
            "acknowledged {:?} task {} is stored with exactly its URLs\n{}",
            acked.dialect,
            acked.task_id,
            context()
        );
        let task = tasks.get(&acked.task_id).unwrap_or_else(|| panic!("acknowledged task {} is listed", acked.task_id));
        assert_eq!(task, &("completed".to_owned(), sent.len() as u64), "task {}", acked.task_id);
        acked_urls += sent.len();
    }

    // 3 and 4, from what the nodes received.
    let mut requests_to_nodes = 0;
    let mut sent_again: HashSet<&str> = HashSet::new();
    for item in &items {
        assert_eq!(item.status, "completed", "item {} ({}) is completed\n{}", item.id, item.url, context());
        assert!(item.finished_ms.is_some(), "completed item {} has a finished_at", item.id);
    }
    for proxy in &nodes.proxies {
        assert_eq!(proxy.unframed(), Vec::<String>::new(), "the proxy of {} framed every message", proxy.name);
        let log = proxy.log();
        requests_to_nodes += log.len();
        let mut received: HashMap<String, Vec<&Exec>> = HashMap::new();
        for exec in &log {
            received.entry(exec.url()).or_default().push(exec);
        }
        for (url, execs) in &received {
            let item = stored.get(url.as_str()).unwrap_or_else(|| {
                panic!("{} received {} for {url}, which is no stored item", proxy.name, execs[0].method)
            });
            let finished = item.finished_ms.unwrap();
            for exec in execs {
                assert_eq!(exec.method, "PURGE", "{url}");
                assert_ne!(
                    exec.final_when_sent,
                    Some(Some(true)),
                    "{} received PURGE {url} while the store showed the item final; every request for it: {execs:?}\n{}",
                    proxy.name,
                    context()
                );
                assert!(
                    exec.sent_ms <= finished,
                    "{} received PURGE {url} at {} ms, {} ms after the item's finished_at ({finished}; the store \
                     showed it final then: {:?}); every request for it: {execs:?}\n{}",
                    proxy.name,
                    exec.sent_ms,
                    exec.sent_ms - finished,
                    exec.final_when_sent,
                    context()
                );
            }
            if execs.len() > 1 {
                sent_again.insert(item.url.as_str());
            }
        }
        for item in &items {
            let execs = received.get(&item.url).map(Vec::as_slice).unwrap_or_default();
            let finished = item.finished_ms.unwrap();
            assert!(
                execs.iter().any(|e| e.answered.is_some_and(|(at, status)| status == 200 && at <= finished)),
                "{} answered 200 to a PURGE of completed item {} ({}) by its finished_at {finished}: {execs:?}\n{}",
                proxy.name,
                item.id,
                item.url,
                context()
            );
        }
    }
    Figures {
        acked_tasks: report.acked.len(),
        acked_urls,
        stored_unacked: items.len() - acked_urls,
        items: items.len(),
        requests_to_nodes,
        items_sent_again: sent_again.len(),
    }
}
