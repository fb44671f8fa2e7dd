//! Edge nodes that misbehave, beside a real one: cachectl drives a real Varnish node and a fake
//! node serving the same domain. The fake node is a TCP server in the test process scripted per
//! request, for the faults a real cache cannot be made to produce on demand: a reset in the
//! middle of an answer, an answer later than the node timeout, 5xx before a 200, a close after
//! every request, a close of every connection at once. Every item ends completed, or failed with
//! a reason naming the fake node, and the Varnish node's result is the same as without it.
//! Results are read through the native API (`GET /api/v1/tasks/{id}`), purges (the pipelined
//! lane) and prefetches (reqwest) both, since they differ.

use crate::support::*;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const HOST: &str = "www.example.com";
const FAKE: &str = "flaky-1";
const REAL: &str = "varnish-1";
/// The node timeout of every server here: the fake node's slow answers come later.
const REQUEST_TIMEOUT_MS: u64 = 400;

/// A request as the fake node read it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// 1 for the first request of this path the node read, 2 for the second…
    nth_for_path: usize,
}

/// What the fake node does with one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// Answers `status` (with a short body) after `delay`, and keeps the connection.
    Answer { status: u16, delay: Duration },
    /// Answers 200 without `Connection: close`, then closes its side; it reads (and records) what
    /// else arrives on the connection and answers nothing more.
    AnswerThenClose,
    /// Writes the head of a 200 and part of its body, then resets the connection.
    ResetMidAnswer,
}

const OK: Reply = Reply::Answer { status: 200, delay: Duration::ZERO };

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A scripted HTTP/1.1 node on 127.0.0.1 with a free port, stopped (with every connection) when
/// dropped.
struct FakeNode {
    address: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    tasks: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    /// A node that reads requests and replies to each as `script` says.
    async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        Self::listen(Some(Arc::new(script))).await
    }

    /// A node that accepts every connection and closes it at once.
    async fn closing_at_once() -> Self {
        Self::listen(None).await
    }

    async fn listen(script: Option<Script>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        let tasks = tokio::spawn(async move {
            let mut running = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                if let Some(script) = &script {
                    running.spawn(serve(stream, script.clone(), s.clone()));
                }
                while running.try_join_next().is_some() {}
            }
        });
        Self { address, seen, connections, tasks }
    }

    /// Requests for `path` the node read.
    fn count(&self, path: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| s.path == path).count()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.tasks.abort();
    }
}

/// One connection: request heads one after another (purges and GETs carry no body), each
/// recorded, then replied to in order.
async fn serve(mut stream: TcpStream, script: Script, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut closed = false;
    loop {
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0_u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        buffer.drain(..end + 4);
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or("").to_owned(), words.next().unwrap_or("").to_owned());
        let request = {
            let mut seen = seen.lock().unwrap();
            let nth_for_path = seen.iter().filter(|s| s.path == path).count() + 1;
            let request = Seen { method, path, nth_for_path };
            seen.push(request.clone());
            request
        };
        if closed {
            continue;
        }
        match script(&request) {
            Reply::Answer { status, delay } => {
                tokio::time::sleep(delay).await;
                if stream.write_all(&answer(status)).await.is_err() {
                    return;
                }
            }
            Reply::AnswerThenClose => {
                let _ = stream.write_all(&answer(200)).await;
                let _ = stream.shutdown().await;
                closed = true;
            }
            Reply::ResetMidAnswer => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nthe first bytes").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = stream.set_zero_linger();
                return;
            }
        }
    }
}

fn answer(status: u16) -> Vec<u8> {
    let body = format!("fake node: {status}\n");
    format!("HTTP/1.1 {status} Whatever\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// An origin, a Varnish node and the fake node, both serving every domain, and cachectl driving
/// them with a 400 ms node timeout, short backoffs, and purges pipelined 4 deep.
struct Setup {
    _origin: Origin,
    varnish: Varnish,
    fake: FakeNode,
    server: Cachectl,
}

impl Setup {
    async fn start(fake: FakeNode, item_deadline: &str) -> Self {
        let origin = Origin::start().await;
        let varnish = Varnish::start(origin.port).await;
        let worker = format!(
            "[worker]\nitem_deadline = \"{item_deadline}\"\nrequest_timeout = \"{REQUEST_TIMEOUT_MS}ms\"\n\
             connect_timeout = \"500ms\"\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n\
             per_node_concurrency = 8\npipeline_depth = 4\npoll_interval = \"100ms\"\nlease = \"5s\"\n\n"
        );
        let edges = format!(
            "{}{}",
            edge(REAL, "varnish", &varnish.address(), "edge"),
            edge(FAKE, "varnish", &fake.address, "edge")
        );
        let server = Cachectl::start(&format!("{ACCOUNTS}{worker}{edges}")).await;
        Self { _origin: origin, varnish, fake, server }
    }

    /// Submits `kind` of `paths` on `HOST` through the native API and waits until the task is
    /// final; returns its items in the order of `paths`.
    async fn run(&self, kind: &str, paths: &[&str]) -> Vec<Value> {
        let urls: Vec<String> = paths.iter().map(|p| format!("http://{HOST}{p}")).collect();
        let id = self.server.native_submit(json!({ "kind": kind, "urls": urls })).await;
        let detail = self.server.native_wait(id).await;
        let items = detail["items"].as_array().unwrap_or_else(|| panic!("no items: {detail}"));
        urls.iter()
            .map(|url| items.iter().find(|i| i["url"] == *url).unwrap_or_else(|| panic!("{url} in {detail}")).clone())
            .collect()
    }

    /// Makes `path` a hit in the Varnish node.
    async fn cache(&self, path: &str) {
        cache_status(&self.varnish.address(), HOST, path).await;
        assert_eq!(cache_status(&self.varnish.address(), HOST, path).await, "HIT");
    }

    async fn verdict(&self, path: &str) -> String {
        cache_status(&self.varnish.address(), HOST, path).await
    }
}

/// The result of `node` on `item`.
fn node<'a>(item: &'a Value, node: &str) -> &'a Value {
    item["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|r| r["node"] == node))
        .unwrap_or_else(|| panic!("{node} in {item}"))
}

fn attempts(item: &Value, name: &str) -> usize {
    usize::try_from(node(item, name)["attempts"].as_u64().unwrap()).unwrap()
}

/// The Varnish node did its part at the first attempt, whatever the fake node did.
fn varnish_unaffected(item: &Value) {
    let real = node(item, REAL);
    assert_eq!(real["state"], "succeeded", "{item}");
    assert_eq!(real["attempts"], 1, "{item}");
    assert!(real["error"].is_null(), "{item}");
}

/// The item failed because of the fake node, and says so.
fn failed_naming_the_fake_node(item: &Value, what: &str) {
    assert_eq!(item["status"], "failed", "{item}");
    let reason = item["reason"].as_str().unwrap_or_else(|| panic!("a failed item has a reason: {item}"));
    assert!(reason.starts_with(&format!("node {FAKE}: ")), "the reason names the node: {reason}");
    assert!(reason.contains(what), "the reason says {what:?}: {reason}");
    let fake = node(item, FAKE);
    assert_eq!(fake["state"], "failed", "{item}");
    assert!(fake["error"].as_str().is_some_and(|e| e.contains(what)), "{item}");
}

fn completed(item: &Value) {
    assert_eq!(item["status"], "completed", "{item}");
    assert!(item["reason"].is_null(), "{item}");
    assert_eq!(node(item, FAKE)["state"], "succeeded", "{item}");
}

#[tokio::test]
async fn a_node_resetting_mid_answer_fails_naming_it_and_varnish_is_unaffected() {
    let fake = FakeNode::start(|seen| {
        if seen.path.starts_with("/reset-always/") || (seen.path.starts_with("/reset-once/") && seen.nth_for_path == 1)
        {
            Reply::ResetMidAnswer
        } else {
            OK
        }
    })
    .await;
    let s = Setup::start(fake, "2s").await;
    s.cache("/reset-once/a.css").await;
    s.cache("/reset-always/b.css").await;

    // Purges: the lane writes a reset request again on a new connection within the attempt.
    let once = &s.run("refresh", &["/reset-once/a.css"]).await[0];
    completed(once);
    assert_eq!(attempts(once, FAKE), 1, "resent by the lane, not retried by the worker: {once}");
    assert_eq!(s.fake.count("/reset-once/a.css"), 2);
    varnish_unaffected(once);
    let always = &s.run("refresh", &["/reset-always/b.css"]).await[0];
    failed_naming_the_fake_node(always, "reset");
    let tries = attempts(always, FAKE);
    assert!(tries >= 2, "retried until the deadline: {always}");
    assert_eq!(s.fake.count("/reset-always/b.css"), 3 * tries, "every attempt written three times, no more");
    varnish_unaffected(always);
    assert_eq!(s.verdict("/reset-once/a.css").await, "MISS");
    assert_eq!(s.verdict("/reset-always/b.css").await, "MISS");

    // Prefetches: nothing below the worker writes a GET again; its retry does.
    let once = &s.run("prefetch", &["/reset-once/p.js"]).await[0];
    completed(once);
    assert_eq!(attempts(once, FAKE), 2, "the cut body was retried once: {once}");
    assert_eq!(s.fake.count("/reset-once/p.js"), 2);
    varnish_unaffected(once);
    let always = &s.run("prefetch", &["/reset-always/q.js"]).await[0];
    failed_naming_the_fake_node(always, "body cut short");
    assert_eq!(s.fake.count("/reset-always/q.js"), attempts(always, FAKE));
    varnish_unaffected(always);
    assert_eq!(s.verdict("/reset-once/p.js").await, "HIT");
    assert_eq!(s.verdict("/reset-always/q.js").await, "HIT");
}

#[tokio::test]
async fn a_node_answering_after_the_timeout_fails_naming_it_and_varnish_is_unaffected() {
    let late = Duration::from_millis(3 * REQUEST_TIMEOUT_MS);
    let fake = FakeNode::start(move |seen| {
        if seen.path.starts_with("/late/") {
            Reply::Answer { status: 200, delay: late }
        } else if seen.path.starts_with("/slowish/") {
            Reply::Answer { status: 200, delay: Duration::from_millis(REQUEST_TIMEOUT_MS / 4) }
        } else {
            OK
        }
    })
    .await;
    let s = Setup::start(fake, "2s").await;
    s.cache("/late/a.css").await;

    for (kind, late, slowish) in
        [("refresh", "/late/a.css", "/slowish/b.css"), ("prefetch", "/late/p.js", "/slowish/q.js")]
    {
        let late = &s.run(kind, &[late]).await[0];
        failed_naming_the_fake_node(late, "timeout");
        assert!(attempts(late, FAKE) >= 2, "retried until the deadline: {late}");
        varnish_unaffected(late);
        let slowish = &s.run(kind, &[slowish]).await[0];
        completed(slowish);
        assert_eq!(attempts(slowish, FAKE), 1, "slow within the timeout is fine: {slowish}");
        varnish_unaffected(slowish);
    }
    assert_eq!(s.verdict("/late/a.css").await, "MISS", "purged on Varnish whatever the fake node did");
    assert_eq!(s.verdict("/late/p.js").await, "HIT", "prefetched on Varnish whatever the fake node did");
}

#[tokio::test]
async fn a_node_answering_5xx_then_200_completes_or_fails_as_the_kind_says() {
    // `/flap/`: 503 twice, then 200. `/err500-once/`: 500 once, then 200.
    let fake = FakeNode::start(|seen| {
        let status = if seen.path.starts_with("/flap/") && seen.nth_for_path <= 2 {
            503
        } else if seen.path.starts_with("/err500-once/") && seen.nth_for_path == 1 {
            500
        } else {
            200
        };
        Reply::Answer { status, delay: Duration::ZERO }
    })
    .await;
    let s = Setup::start(fake, "10s").await;

    let purges = s.run("refresh", &["/flap/a.css", "/err500-once/b.css"]).await;
    for (item, tries) in purges.iter().zip([3, 2]) {
        completed(item);
        let fake = node(item, FAKE);
        assert_eq!(fake["attempts"], tries, "a 5xx to a purge is retried: {item}");
        assert_eq!(fake["status_code"], 200, "{item}");
        assert!(fake["error"].is_null(), "the last answer clears the error: {item}");
        varnish_unaffected(item);
    }

    let prefetches = s.run("prefetch", &["/flap/p.js", "/err500-once/q.js"]).await;
    completed(&prefetches[0]);
    assert_eq!(attempts(&prefetches[0], FAKE), 3, "a 503 to a GET is the cache's own: retried");
    // A 500 to a GET is the origin's answer: final at once, never sent again.
    let origin_error = &prefetches[1];
    failed_naming_the_fake_node(origin_error, "origin answered HTTP 500");
    assert_eq!(attempts(origin_error, FAKE), 1, "{origin_error}");
    assert_eq!(node(origin_error, FAKE)["status_code"], 500);
    assert_eq!(s.fake.count("/err500-once/q.js"), 1);
    for item in &prefetches {
        varnish_unaffected(item);
    }
    assert_eq!(s.verdict("/err500-once/q.js").await, "HIT", "prefetched on Varnish all the same");
}

#[tokio::test]
async fn a_node_closing_after_every_request_completes_everything() {
    let fake = FakeNode::start(|_| Reply::AnswerThenClose).await;
    let s = Setup::start(fake, "20s").await;
    let purge_paths: Vec<String> = (0..40).map(|i| format!("/close/{i}.css")).collect();
    let purge_paths: Vec<&str> = purge_paths.iter().map(String::as_str).collect();

    let purges = s.run("refresh", &purge_paths).await;

    for (item, path) in purges.iter().zip(&purge_paths) {
        completed(item);
        varnish_unaffected(item);
        let written = s.fake.count(path);
        assert!(
            (1..=3 * attempts(item, FAKE)).contains(&written),
            "{path} written {written} times: at most three per attempt: {item}"
        );
    }
    let written: usize = purge_paths.iter().map(|p| s.fake.count(p)).sum();
    assert!(written > purge_paths.len(), "pipelined purges left unanswered were written again ({written})");
    assert!(s.fake.connections() >= purge_paths.len(), "one answer per connection");

    let prefetch_paths: Vec<String> = (0..10).map(|i| format!("/close/{i}.js")).collect();
    let prefetch_paths: Vec<&str> = prefetch_paths.iter().map(String::as_str).collect();
    for item in s.run("prefetch", &prefetch_paths).await {
        completed(&item);
        varnish_unaffected(&item);
    }
    let methods: Vec<String> = s.fake.seen.lock().unwrap().iter().map(|r| r.method.clone()).collect();
    assert!(methods.iter().all(|m| m == "PURGE" || m == "GET"), "{methods:?}");
}

#[tokio::test]
async fn a_node_closing_every_connection_at_once_fails_naming_it_and_varnish_is_unaffected() {
    let s = Setup::start(FakeNode::closing_at_once().await, "1s").await;
    s.cache("/gone/a.css").await;

    let purge = &s.run("refresh", &["/gone/a.css"]).await[0];
    failed_naming_the_fake_node(purge, &s.fake.address);
    assert_eq!(s.fake.connections(), 3 * attempts(purge, FAKE), "three connections per attempt, no more");
    varnish_unaffected(purge);
    assert_eq!(s.verdict("/gone/a.css").await, "MISS");

    let prefetch = &s.run("prefetch", &["/gone/p.js"]).await[0];
    failed_naming_the_fake_node(prefetch, "request error");
    varnish_unaffected(prefetch);
    assert_eq!(s.verdict("/gone/p.js").await, "HIT");
}
