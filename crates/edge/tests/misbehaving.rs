//! Nodes that misbehave in ways a real cache cannot be made to on demand, driven through both
//! transports of purges and bans (the pipelined lane and the plain reqwest pool, [`Transport`])
//! and through `EdgeClient::execute` (prefetches over reqwest): a reset in the middle of an
//! answer, answers cut short or arriving in pieces, answers later than the timeout, a close after
//! every answer, a close at once. Every request ends, with the node's answer or an error naming
//! the node's address; a pipelined request is written at most three times (once and
//! [`MAX_RESENDS`] resends), a plain one once.
//!
//! Tests whose behaviour does not depend on the transport run on both, as
//! `pipelined::NAME` and `plain::NAME`, each asserting the one difference the transports are
//! meant to have (how often a request is written before it fails). The rest are about one
//! transport only and say so: the lane's pipelining (several requests written before the first
//! answer, what a close or reset does to those behind it) and its resends, and the plain
//! transport on a node closing after every answer.
//!
//! The fake node is a TCP server on 127.0.0.1:0 in the test's runtime (or its own thread),
//! scripted per request; it is stopped when the test ends.

use cachectl_core::{ItemType, Kind, Tier};
use cachectl_edge::pipeline::{LaneSettings, MAX_RESENDS};
use cachectl_edge::{
    ClientSettings, Driver, EdgeClient, Lane, Node, NodeTransport, Outcome, Request, Transport, TransportKind,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[macro_use]
mod common;

on_both_transports!(
    answers_arriving_in_pieces_are_put_together_in_order,
    a_head_cut_short_by_a_close_fails_naming_the_node,
    without_pipelining_a_node_closing_after_every_answer_answers_everything,
    an_answer_later_than_the_timeout_fails_and_is_never_taken_for_the_next_answer,
    prefetches_on_a_misbehaving_node_are_retried_or_failed_as_their_answer_says,
);

/// A request as the fake node read it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// 1 for the first request of this path the node read, 2 for the second…
    nth_for_path: usize,
}

/// What the fake node does with one request.
#[derive(Debug, Clone)]
enum Reply {
    /// Answers `status` (with a short body) after `delay`, and keeps the connection.
    Answer { status: u16, delay: Duration },
    /// Answers `status` with `Connection: close` when `announced`, else without a word, then
    /// closes its side (FIN); it reads and records what else arrives but answers nothing more.
    AnswerThenClose { status: u16, announced: bool },
    /// Writes the head of a 200 and part of its body, then resets the connection (RST).
    ResetMidAnswer,
    /// Writes part of an answer's head, then closes (FIN).
    HeadThenClose,
    /// Writes the answer in pieces of 1 to 7 bytes with a pause between them.
    Trickle { status: u16 },
}

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A scripted HTTP/1.1 node on 127.0.0.1 with a free port.
struct FakeNode {
    address: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// The accept loop and every connection task; dropping it stops them all.
    _tasks: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let script: Script = Arc::new(script);
        let (s, c) = (seen.clone(), connections.clone());
        let tasks = tokio::spawn(async move {
            let mut running = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                running.spawn(serve(stream, script.clone(), s.clone()));
                while running.try_join_next().is_some() {}
            }
        });
        Self { address, seen, connections, _tasks: tasks }
    }

    /// How many requests for `path` the node read.
    fn count(&self, path: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| s.path == path).count()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self._tasks.abort();
    }
}

/// One connection: reads request heads one after another (purges and GETs have no body),
/// records each, and replies as the script says, in order.
async fn serve(mut stream: TcpStream, script: Script, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut on_connection = 0;
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
        on_connection += 1;
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
                if stream.write_all(&answer(status, "")).await.is_err() {
                    return;
                }
            }
            Reply::AnswerThenClose { status, announced } => {
                let _ = stream.write_all(&answer(status, if announced { "connection: close\r\n" } else { "" })).await;
                let _ = stream.shutdown().await;
                closed = true;
            }
            Reply::ResetMidAnswer => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nthe first bytes").await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                stream.set_zero_linger().unwrap();
                return;
            }
            Reply::HeadThenClose => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-len").await;
                let _ = stream.shutdown().await;
                closed = true;
            }
            Reply::Trickle { status } => {
                let bytes = answer(status, "");
                for (i, piece) in bytes.chunks(1 + on_connection % 7).enumerate() {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    if i % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        }
    }
}

/// A complete answer with a body naming the status (none for a 204 or a 304, which have none).
fn answer(status: u16, extra_headers: &str) -> Vec<u8> {
    let body = if matches!(status, 204 | 304) { String::new() } else { format!("status {status}\n") };
    format!("HTTP/1.1 {status} Whatever\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}", body.len()).into_bytes()
}

fn settings(connections: usize, depth: usize, request_timeout: Duration) -> LaneSettings {
    LaneSettings { connections, depth, connect_timeout: Duration::from_secs(2), request_timeout, batch: 1 }
}

/// How often a transport writes a request whose connection is lost before it gives up: the lane
/// resends what a lost connection left unanswered, the plain transport never does.
fn writes_per_failed_request(kind: TransportKind) -> usize {
    match kind {
        TransportKind::Pipelined => 1 + usize::from(MAX_RESENDS),
        TransportKind::Plain => 1,
    }
}

fn flaky_node(address: &str) -> Node {
    Node { name: "flaky-1".into(), driver: Driver::Varnish, address: address.into(), tier: Tier::Edge, domains: vec![] }
}

fn client(kind: TransportKind, per_node: usize, depth: usize, request_timeout: Duration) -> EdgeClient {
    EdgeClient::new(ClientSettings {
        request_timeout,
        connect_timeout: Duration::from_secs(2),
        per_node,
        pipeline_depth: depth,
        transport: kind,
        purge_batch: 1,
    })
    .unwrap()
}

/// The `kind` transport to `address`, as the worker builds it: `per_node` requests in flight,
/// pipelined `depth` deep (over `ceil(per_node / depth)` connections) when pipelined.
fn transport(kind: TransportKind, address: &str, per_node: usize, depth: usize, timeout: Duration) -> NodeTransport {
    client(kind, per_node, depth, timeout).transport(&flaky_node(address))
}

fn purge(path: &str) -> Request {
    let url = format!("http://www.example.com{path}");
    Request::new(cachectl_edge::plan(Driver::Varnish, Kind::Refresh, ItemType::Url, &url).unwrap()).unwrap()
}

/// Sends every request at once (all queued before the lane's task looks at its queue) and
/// returns the answers in the order of `paths`, each within 20 s at most (a transport that never
/// answers fails the test instead of hanging it).
async fn send_all(transport: &impl Transport, paths: &[&str]) -> Vec<Result<u16, String>> {
    let sends = futures::future::join_all(paths.iter().map(|p| transport.send(purge(p))));
    tokio::time::timeout(Duration::from_secs(20), sends).await.expect("every request is answered or fails")
}

/// Lane only: the resends.
#[tokio::test]
async fn a_reset_in_the_middle_of_every_answer_is_resent_twice_then_fails_naming_the_node() {
    let node = FakeNode::start(|_| Reply::ResetMidAnswer).await;
    let lane = Lane::spawn(&node.address, settings(1, 4, Duration::from_secs(5)));

    let answers = send_all(&lane, &["/reset"]).await;

    let error = answers[0].as_ref().unwrap_err();
    assert!(error.contains(&node.address), "the error names the node: {error}");
    assert!(error.contains("reset"), "and says what happened: {error}");
    assert_eq!(node.count("/reset"), 1 + usize::from(MAX_RESENDS), "written once and resent twice");
    assert_eq!(node.connections(), 3, "each time on a new connection");
}

/// Lane only: the requests pipelined behind the reset one.
#[tokio::test]
async fn a_reset_in_the_middle_of_one_answer_is_resent_on_a_new_connection() {
    let node = FakeNode::start(|seen| {
        if seen.path == "/a" && seen.nth_for_path == 1 {
            Reply::ResetMidAnswer
        } else {
            Reply::Answer { status: 200, delay: Duration::ZERO }
        }
    })
    .await;
    let lane = Lane::spawn(&node.address, settings(1, 4, Duration::from_secs(5)));

    let answers = send_all(&lane, &["/a", "/b", "/c"]).await;

    // The reset took the three pipelined requests with it: /a was reset, /b and /c unanswered.
    assert_eq!(answers, vec![Ok(200), Ok(200), Ok(200)]);
    assert_eq!(node.count("/a"), 2, "the reset request was written again, once");
    assert_eq!((node.count("/b"), node.count("/c")), (1, 1), "the node had read neither before the reset");
    assert_eq!(node.connections(), 2);
}

/// Eight answers, each written a few bytes at a time, each request its own status: pipelined on
/// one connection, or plain on one connection each.
async fn answers_arriving_in_pieces_are_put_together_in_order(kind: TransportKind) {
    let statuses = [200_u16, 404, 412, 503, 200, 403, 204, 500];
    let node = FakeNode::start(move |seen| {
        let i: usize = seen.path.trim_start_matches("/piece/").parse().unwrap();
        Reply::Trickle { status: statuses[i] }
    })
    .await;
    let transport = transport(kind, &node.address, 8, 8, Duration::from_secs(5));
    let paths: Vec<String> = (0..statuses.len()).map(|i| format!("/piece/{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();

    let answers = send_all(&transport, &paths).await;

    let expected: Vec<Result<u16, String>> = statuses.iter().map(|s| Ok(*s)).collect();
    assert_eq!(answers, expected);
    match kind {
        TransportKind::Pipelined => assert_eq!(node.connections(), 1, "pieces are not a reason to reconnect"),
        TransportKind::Plain => assert!(node.connections() <= paths.len(), "one connection per request at most"),
    }
    assert!(paths.iter().all(|p| node.count(p) == 1), "nothing was sent twice");
}

/// The lane writes such a request three times, the plain transport once.
async fn a_head_cut_short_by_a_close_fails_naming_the_node(kind: TransportKind) {
    let node = FakeNode::start(|_| Reply::HeadThenClose).await;
    let transport = transport(kind, &node.address, 4, 4, Duration::from_secs(5));

    let answers = send_all(&transport, &["/cut"]).await;

    let error = answers[0].as_ref().unwrap_err();
    assert!(error.starts_with("request error:") && error.contains(&node.address), "{error}");
    assert_eq!(node.count("/cut"), writes_per_failed_request(kind));
}

/// Lane only: a node that answers one request per connection and closes: of four requests
/// pipelined on one connection, the first is answered on the first connection, the second
/// (resent once) on the second, the third (resent twice) on the third; the fourth has been
/// written three times and fails. Nothing is written more than three times.
async fn closing_after_every_answer(announced: bool) {
    let node = FakeNode::start(move |_| Reply::AnswerThenClose { status: 200, announced }).await;
    let lane = Lane::spawn(&node.address, settings(1, 4, Duration::from_secs(5)));

    let answers = send_all(&lane, &["/1", "/2", "/3", "/4"]).await;

    assert_eq!(answers[..3], [Ok(200), Ok(200), Ok(200)]);
    let error = answers[3].as_ref().unwrap_err();
    assert!(error.contains(&node.address) && error.contains("closed the connection before answering"), "{error}");
    let counts: Vec<usize> = ["/1", "/2", "/3", "/4"].iter().map(|p| node.count(p)).collect();
    assert_eq!(counts, [1, 2, 3, 3], "each written once more per connection it was left unanswered on");
    assert_eq!(node.connections(), 3);
    let seen = node.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| s.method == "PURGE"));
}

#[tokio::test]
async fn a_node_closing_after_every_answer_gets_each_request_at_most_three_times() {
    closing_after_every_answer(false).await;
}

#[tokio::test]
async fn a_node_closing_after_every_announced_answer_gets_each_request_at_most_three_times() {
    closing_after_every_answer(true).await;
}

/// Plain only: purges one after another to a node that answers one request per connection and
/// closes, announced or not. Announced, every purge is answered on a new connection; unannounced,
/// hyper may write the next on the connection the node has just closed, which fails with a
/// reason naming the node (the worker retries it). No purge is written twice.
#[tokio::test]
async fn plain_purges_on_a_node_closing_after_every_answer_are_answered_or_fail_naming_the_node() {
    let node =
        FakeNode::start(|seen| Reply::AnswerThenClose { status: 200, announced: seen.path.ends_with("/a") }).await;
    let transport = transport(TransportKind::Plain, &node.address, 4, 4, Duration::from_secs(2));
    let mut failed = 0;
    for i in 0..10 {
        let announced = i % 2 == 0;
        let path = format!("/close/{i}/{}", if announced { "a" } else { "b" });
        match send_all(&transport, &[&path]).await.remove(0) {
            Ok(200) => {}
            Err(error) if !announced => {
                assert!(error.starts_with("request error:") && error.contains(&node.address), "{error}");
                failed += 1;
            }
            other => panic!("{path}: {other:?}"),
        }
        assert!(node.count(&path) <= 1, "{path} was written once at most");
    }
    assert!(failed <= 5, "only purges after an unannounced close can fail");
    assert!(node.connections() >= 5, "a connection the node announced it closes is not used again");
}

/// Pipelined with a depth of 1, or plain: one request per connection at a time.
async fn without_pipelining_a_node_closing_after_every_answer_answers_everything(kind: TransportKind) {
    let node = FakeNode::start(|_| Reply::AnswerThenClose { status: 200, announced: true }).await;
    let transport = transport(kind, &node.address, 1, 1, Duration::from_secs(5));
    let paths: Vec<String> = (0..10).map(|i| format!("/one/{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();

    let answers = send_all(&transport, &paths).await;

    assert!(answers.iter().all(|a| a == &Ok(200)), "{answers:?}");
    assert!(paths.iter().all(|p| node.count(p) == 1), "one request per connection: nothing left to resend");
    assert_eq!(node.connections(), 10);
}

/// The first request is answered 503 after 600 ms, long past the 200 ms timeout; the next ones
/// at once with 200.
async fn an_answer_later_than_the_timeout_fails_and_is_never_taken_for_the_next_answer(kind: TransportKind) {
    let node = FakeNode::start(|seen| {
        if seen.path == "/slow" {
            Reply::Answer { status: 503, delay: Duration::from_millis(600) }
        } else {
            Reply::Answer { status: 200, delay: Duration::ZERO }
        }
    })
    .await;
    let transport = transport(kind, &node.address, 4, 4, Duration::from_millis(200));

    let answers = send_all(&transport, &["/slow"]).await;
    let error = answers[0].as_ref().unwrap_err();
    assert!(error.starts_with("timeout:") && error.contains(&node.address), "{error}");
    assert_eq!(node.count("/slow"), 1, "a timeout is not resent by the transport (the worker retries)");

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(send_all(&transport, &["/next"]).await, vec![Ok(200)], "not the late 503 meant for /slow");
    assert_eq!(node.connections(), 2, "the timed-out connection was not reused");
}

/// A node that accepts every connection and closes it at once, while the process that talks to
/// it is busy (here: a task that holds the runtime's only thread 5 ms at a time), so that the
/// close has always arrived by the time the transport looks at its new connection. Such a close
/// must count against the request like any other: the lane gives up after three connections, the
/// plain transport after one. The lane used to take the fresh connection for an idle one the
/// node had let go, and connect again without counting, for ever: the request never ended.
fn a_node_closing_every_connection_at_once_fails_the_request_even_when_slow_to_look(kind: TransportKind) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (count, stopped) = (accepted.clone(), stop.clone());
    // The node: its own thread, closing each connection as soon as it is accepted.
    let node = std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stopped.load(Ordering::SeqCst) {
                return;
            }
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = runtime.block_on(async {
        let busy = tokio::spawn(async {
            loop {
                std::thread::sleep(Duration::from_millis(5));
                tokio::task::yield_now().await;
            }
        });
        let transport = transport(kind, &address, 4, 4, Duration::from_secs(2));
        let answer = tokio::time::timeout(Duration::from_secs(20), transport.send(purge("/x"))).await;
        busy.abort();
        answer
    });
    drop(runtime);
    stop.store(true, Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(&address);
    node.join().unwrap();
    let error = answer
        .unwrap_or_else(|_| panic!("no answer after 20 s; {} connections accepted", accepted.load(Ordering::SeqCst)))
        .unwrap_err();
    let accepted = accepted.load(Ordering::SeqCst);
    assert_eq!(accepted, writes_per_failed_request(kind), "not {accepted} connections");
    assert!(error.contains(&address), "the error names the node: {error}");
}

#[test]
fn a_node_closing_every_connection_at_once_fails_the_request_even_when_the_lane_is_slow_to_look() {
    a_node_closing_every_connection_at_once_fails_the_request_even_when_slow_to_look(TransportKind::Pipelined);
}

#[test]
fn a_node_closing_every_connection_at_once_fails_a_plain_request_even_when_slow_to_look() {
    a_node_closing_every_connection_at_once_fails_the_request_even_when_slow_to_look(TransportKind::Plain);
}

/// Prefetches go over reqwest whatever the transport: nothing is resent below the worker, and a
/// GET's answer means something else (a 500 is the origin's, a body cut short is no prefetch).
/// Purges on the same node then go through the transport.
async fn prefetches_on_a_misbehaving_node_are_retried_or_failed_as_their_answer_says(kind: TransportKind) {
    let node = FakeNode::start(|seen| match seen.path.as_str() {
        "/reset" => Reply::ResetMidAnswer,
        "/slow" => Reply::Answer { status: 200, delay: Duration::from_millis(800) },
        "/flap" if seen.nth_for_path <= 2 => Reply::Answer { status: 503, delay: Duration::ZERO },
        "/origin-error" => Reply::Answer { status: 500, delay: Duration::ZERO },
        "/cut" => Reply::HeadThenClose,
        _ => Reply::Answer { status: 200, delay: Duration::ZERO },
    })
    .await;
    let edge = flaky_node(&node.address);
    let client = client(kind, 4, 4, Duration::from_millis(300));
    let transport = client.transport(&edge);
    let execute = |kind: Kind, path: &str| {
        let url = format!("http://www.example.com{path}");
        let (client, edge, transport) = (&client, &edge, &transport);
        async move { client.execute(edge, transport, kind, ItemType::Url, &url).await }
    };

    match execute(Kind::Prefetch, "/reset").await {
        Outcome::Retry { code: Some(200), error } => {
            assert!(error.starts_with("body cut short") && error.contains(&node.address), "{error}");
        }
        other => panic!("a body cut by a reset is retried: {other:?}"),
    }
    assert_eq!(node.count("/reset"), 1, "not resent below the worker");
    match execute(Kind::Prefetch, "/slow").await {
        Outcome::Retry { code: None, error } => assert!(error.starts_with("timeout"), "{error}"),
        other => panic!("an answer later than the timeout is retried: {other:?}"),
    }
    match execute(Kind::Prefetch, "/cut").await {
        Outcome::Retry { code: None, error } => assert!(error.starts_with("request error"), "{error}"),
        other => panic!("a head cut short is retried: {other:?}"),
    }
    assert!(matches!(execute(Kind::Prefetch, "/flap").await, Outcome::Retry { code: Some(503), .. }));
    assert!(matches!(execute(Kind::Prefetch, "/flap").await, Outcome::Retry { code: Some(503), .. }));
    assert_eq!(execute(Kind::Prefetch, "/flap").await, Outcome::Success { code: 200 }, "503, 503, then 200");
    assert_eq!(
        execute(Kind::Prefetch, "/origin-error").await,
        Outcome::Fail { code: Some(500), error: "origin answered HTTP 500".into() },
        "a 500 to a GET is the origin's: final"
    );

    // The same answers to purges, through the transport. A reset after the head of a 200: the
    // lane writes the purge again, three times in all, then gives up; the plain transport takes
    // the status it read for the answer.
    match (kind, execute(Kind::Refresh, "/reset").await) {
        (TransportKind::Pipelined, Outcome::Retry { code: None, error }) => {
            assert!(error.contains(&node.address), "{error}");
        }
        (TransportKind::Plain, Outcome::Success { code: 200 }) => {}
        (_, other) => panic!("{other:?}"),
    }
    assert_eq!(node.count("/reset"), 1 + writes_per_failed_request(kind), "the prefetch, then the purge's writes");
    assert!(
        matches!(execute(Kind::Refresh, "/origin-error").await, Outcome::Retry { code: Some(500), .. }),
        "a 500 to a purge is retried"
    );
}

/// Prefetches only (they never go through the transport): a node that answers every prefetch and
/// then closes. Announced (`Connection: close`), each prefetch is answered once and reqwest opens
/// a new connection for the next; unannounced, reqwest may write the next on the connection the
/// node has just closed, which fails with a reason (the worker retries it) and is never taken for
/// a success.
#[tokio::test]
async fn prefetches_on_a_node_closing_after_every_answer_succeed_or_are_retried() {
    let node =
        FakeNode::start(|seen| Reply::AnswerThenClose { status: 200, announced: seen.path.ends_with("/a") }).await;
    let edge = flaky_node(&node.address);
    let client = client(TransportKind::Pipelined, 4, 4, Duration::from_secs(2));
    let transport = client.transport(&edge);
    for i in 0..6 {
        let announced = i % 2 == 0;
        let path = format!("/close/{i}/{}", if announced { "a" } else { "b" });
        let url = format!("http://www.example.com{path}");
        match client.execute(&edge, &transport, Kind::Prefetch, ItemType::Url, &url).await {
            Outcome::Success { code: 200 } => {}
            Outcome::Retry { code: None, error } if !announced => {
                assert!(error.starts_with("request error"), "{error}")
            }
            other => panic!("{path}: {other:?}"),
        }
        if announced {
            assert_eq!(node.count(&path), 1, "{path} was sent once");
        }
    }
}
