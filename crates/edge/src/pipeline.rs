//! Pipelined HTTP/1.1 for the short requests of a refresh (PURGE, BAN), the default
//! [`Transport`] (`[worker] edge_transport = "pipelined"`): a few kept-alive connections per node,
//! each owned by one task that writes every queued request in one write and reads the answers in
//! order (RFC 9112 §9.3.2). Requests that come while answers are awaited wait for the next answer
//! read and leave together with it, not in a write each. hyper's client, which the other transport
//! ([`Plain`](crate::transport::Plain)) uses, sends one request per connection at a time; at tens
//! of thousands of purges a second its per-request dispatch, pool and timer cost more CPU than the
//! caches spend answering (BENCHMARKS.md). Answers are parsed by `httparse`, hyper's own parser.
//! Prefetches (GET, bodies of any size) stay on reqwest.
//!
//! A connection the node closes (keep-alive limit, idle timeout, restart) costs nothing: the
//! requests it had not answered are written again on a new connection, at most [`MAX_RESENDS`]
//! times each (purges and bans are idempotent); after that, and for every other failure, the
//! caller gets a transport error naming the node's address and retries the item with its
//! backoff. A kept-alive connection found closed while idle is replaced without counting; a new
//! connection closed before its first answer counts like any other close, so that a node that
//! closes every connection at once fails each request after three connections.

use bytes::{Buf, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::transport::{Request, Transport};

/// Times one request is written again after its connection closed before answering it.
pub const MAX_RESENDS: u8 = 2;
/// An answer (head and body) larger than this breaks the connection: a purge answer is a few
/// hundred bytes, so this only guards memory against a misbehaving node.
const MAX_ANSWER: usize = 1 << 20;
/// Header lines parsed in an answer at most.
const MAX_HEADERS: usize = 64;

/// How a lane connects and how much it pipelines.
#[derive(Debug, Clone, Copy)]
pub struct LaneSettings {
    /// Connections to the node.
    pub connections: usize,
    /// Requests written and not yet answered on one connection at most (1: no pipelining).
    pub depth: usize,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next answer while requests are outstanding.
    pub request_timeout: Duration,
}

pub use crate::transport::TransportError;

struct Job {
    request: Vec<u8>,
    reply: oneshot::Sender<Result<u16, TransportError>>,
    resends: u8,
}

struct Connection {
    jobs: mpsc::UnboundedSender<Job>,
    outstanding: Arc<AtomicUsize>,
}

/// The pipelined connections to one node. Cloning shares them; the connection tasks end when
/// the last clone is dropped and their outstanding requests are answered.
#[derive(Clone)]
pub struct Lane {
    address: Arc<str>,
    connections: Arc<[Connection]>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("connections", &self.connections.len()).finish()
    }
}

impl Lane {
    /// Starts the connection tasks to `address` (`host:port`). They connect on first use.
    /// Must be called within a Tokio runtime.
    #[must_use]
    pub fn spawn(address: &str, settings: LaneSettings) -> Self {
        let address: Arc<str> = Arc::from(address);
        let connections = (0..settings.connections.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let outstanding = Arc::new(AtomicUsize::new(0));
                tokio::spawn(run_connection(address.clone(), rx, outstanding.clone(), settings));
                Connection { jobs: tx, outstanding }
            })
            .collect();
        Self { address, connections }
    }

    /// Sends `request` (a complete HTTP/1.1 request without a body) on the least busy
    /// connection and waits for the answer's status code. [`Transport::send`] does the same
    /// with a checked [`Request`].
    ///
    /// # Errors
    /// The node could not be reached, closed the connection too often, timed out, or answered
    /// something that is not HTTP/1.x.
    pub async fn send_bytes(&self, request: Vec<u8>) -> Result<u16, TransportError> {
        let connection = self
            .connections
            .iter()
            .min_by_key(|c| c.outstanding.load(Ordering::Relaxed))
            .expect("a lane has at least one connection");
        let (reply, answer) = oneshot::channel();
        connection.outstanding.fetch_add(1, Ordering::Relaxed);
        let stopped = || format!("request error: {}: the connection task has stopped", self.address);
        if connection.jobs.send(Job { request, reply, resends: 0 }).is_err() {
            connection.outstanding.fetch_sub(1, Ordering::Relaxed);
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The pipelined implementation of the node transport.
impl Transport for Lane {
    async fn send(&self, request: Request) -> Result<u16, TransportError> {
        self.send_bytes(request.to_bytes()).await
    }
}

/// One connection's task: queue, write, read, answer, reconnect.
///
/// Longer than the house limit on purpose: one loop over one connection's state (queued and
/// in-flight requests, the stream, the buffers, the deadline, whether it may still be written),
/// whose steps read and change several of those together — a failed write keeps reading what
/// the node still answers, an idle close is only checked once a connection carried requests, a
/// timeout fails only what is in flight. Kept in one function so that those interactions read in
/// order; the answer parsing is `take_answers`, the failure paths `fail` and `requeue`.
async fn run_connection(
    address: Arc<str>,
    mut incoming: mpsc::UnboundedReceiver<Job>,
    outstanding: Arc<AtomicUsize>,
    settings: LaneSettings,
) {
    let depth = settings.depth.max(1);
    let answer = |job: Job, result: Result<u16, TransportError>| {
        outstanding.fetch_sub(1, Ordering::Relaxed);
        let _ = job.reply.send(result);
    };
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut in_flight: VecDeque<Job> = VecDeque::new();
    let mut stream: Option<TcpStream> = None;
    let mut read = BytesMut::with_capacity(16 * 1024);
    let mut write = Vec::with_capacity(16 * 1024);
    let mut open = true;
    // False once a write failed: the node may still have answered what it had read, so the
    // connection is read to its end before what it left unanswered is sent again.
    let mut writable = true;
    // True until the first write on a new connection. Only a connection that has carried
    // requests is checked for a close while idle (and replaced without counting it): a new one
    // the node closed is a refusal, counted against the requests written on it. Otherwise a node
    // that closes every connection at once, seen by a busy process only after the close, was
    // connected to again and again without end, and the request never answered.
    let mut fresh = false;
    // When the oldest unanswered request times out: set when the first goes out on an empty
    // connection, moved on only by a final answer (not by new requests, interim answers or bytes
    // trickling in). A lost connection leaves nothing in flight, so the next write sets it anew.
    let mut deadline: Option<Instant> = None;
    // True once a request arrived while answers were awaited: it is written with the next answer
    // read (or once nothing is in flight), together with those that come meanwhile, instead of in
    // a write of its own as it came — on loopback a write also pays the receiving side of TCP.
    let mut held = false;
    loop {
        if waiting.is_empty() && in_flight.is_empty() {
            if !open {
                return;
            }
            match incoming.recv().await {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        while open && waiting.len() + in_flight.len() < depth {
            match incoming.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if stream.is_none() {
            match connect(&address, settings.connect_timeout).await {
                Ok(s) => {
                    read.clear();
                    writable = true;
                    fresh = true;
                    stream = Some(s);
                }
                Err(error) => {
                    // Nothing is in flight without a connection: fail what waits and what is
                    // queued behind it (each would wait for its own connect timeout), keep the lane.
                    while let Ok(job) = incoming.try_recv() {
                        waiting.push_back(job);
                    }
                    fail(&mut waiting, &error, &answer);
                    continue;
                }
            }
        }
        if !writable && in_flight.is_empty() {
            stream = None;
            continue;
        }
        let Some(conn) = stream.as_mut() else { continue };
        if !fresh && in_flight.is_empty() && !waiting.is_empty() && idle_connection_closed(conn) {
            // The node closed it (or answered nothing asked, such as a 408) while it was idle:
            // a new connection, without counting it against the requests.
            stream = None;
            continue;
        }
        if writable && !waiting.is_empty() && in_flight.len() < depth && (!held || in_flight.is_empty()) {
            if in_flight.is_empty() {
                deadline = Some(Instant::now() + settings.request_timeout);
            }
            fresh = false;
            write.clear();
            while in_flight.len() < depth {
                let Some(job) = waiting.pop_front() else { break };
                write.extend_from_slice(&job.request);
                in_flight.push_back(job);
            }
            let written = tokio::time::timeout(settings.request_timeout, conn.write_all(&write)).await;
            if !matches!(written, Ok(Ok(()))) {
                writable = false;
            }
        }
        if in_flight.is_empty() {
            continue;
        }
        let until = *deadline.get_or_insert_with(|| Instant::now() + settings.request_timeout);
        let event = tokio::select! {
            r = conn.read_buf(&mut read) => Event::Read(r),
            job = incoming.recv(), if open && waiting.len() + in_flight.len() < depth => Event::Job(job),
            () = tokio::time::sleep_until(until) => Event::Timeout,
        };
        if !matches!(event, Event::Job(_)) {
            held = false;
        }
        match event {
            Event::Job(Some(job)) => {
                waiting.push_back(job);
                held = true;
            }
            Event::Job(None) => open = false,
            Event::Timeout => {
                stream = None;
                let error = format!("timeout: no answer from {address} within {:?}", settings.request_timeout);
                fail(&mut in_flight, &error, &answer);
            }
            Event::Read(Err(e)) => {
                stream = None;
                requeue(&mut in_flight, &mut waiting, &format!("request error: {address}: {e}"), &answer);
            }
            Event::Read(Ok(n)) => {
                let (answered, mut closing) = take_answers(&mut read, n == 0, &mut in_flight, &address, &answer);
                if answered {
                    deadline = None;
                }
                if in_flight.is_empty() && !read.is_empty() {
                    // Bytes beyond the last answer would be taken for the next request's answer.
                    closing = true;
                }
                if closing {
                    stream = None;
                    let error = format!("request error: {address} closed the connection before answering");
                    requeue(&mut in_flight, &mut waiting, &error, &answer);
                }
            }
        }
    }
}

/// Answers, in order, the requests in flight whose answers `read` holds (`eof`: the node closed
/// the connection after them). Returns whether a final answer was taken (the oldest request's
/// deadline then moves on) and whether the connection must be closed: the node asked for it,
/// answered something unparsable or too long, or answered more than was asked.
fn take_answers(
    read: &mut BytesMut,
    eof: bool,
    in_flight: &mut VecDeque<Job>,
    address: &str,
    answer: &impl Fn(Job, Result<u16, TransportError>),
) -> (bool, bool) {
    let mut answered = false;
    loop {
        match parse_answer(read, eof) {
            Ok(Some(parsed)) => {
                read.advance(parsed.length);
                if parsed.interim {
                    continue;
                }
                let Some(job) = in_flight.pop_front() else {
                    // An answer to nothing asked: the framing is lost.
                    return (answered, true);
                };
                answer(job, Ok(parsed.status));
                answered = true;
                if parsed.close {
                    return (answered, true);
                }
                if read.is_empty() {
                    return (answered, eof);
                }
            }
            Ok(None) if read.len() > MAX_ANSWER => {
                let error = format!("request error: an answer from {address} exceeds {MAX_ANSWER} bytes");
                fail(in_flight, &error, answer);
                return (answered, true);
            }
            Ok(None) => return (answered, eof),
            Err(e) => {
                fail(in_flight, &format!("request error: {address} answered {e}"), answer);
                return (answered, true);
            }
        }
    }
}

/// Whether an idle connection has been closed by the node or holds bytes nobody asked for.
fn idle_connection_closed(stream: &TcpStream) -> bool {
    let mut probe = [0_u8; 64];
    !matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

enum Event {
    Read(std::io::Result<usize>),
    Job(Option<Job>),
    Timeout,
}

/// Answers `error` to every request of `queue`.
fn fail(queue: &mut VecDeque<Job>, error: &str, answer: &impl Fn(Job, Result<u16, TransportError>)) {
    for job in queue.drain(..) {
        answer(job, Err(error.to_owned()));
    }
}

/// Puts the unanswered requests of a lost connection back in front of the queue, in order, or
/// answers `error` for those already written too often.
fn requeue(
    in_flight: &mut VecDeque<Job>,
    waiting: &mut VecDeque<Job>,
    error: &str,
    answer: &impl Fn(Job, Result<u16, TransportError>),
) {
    while let Some(mut job) = in_flight.pop_back() {
        if job.resends >= MAX_RESENDS {
            answer(job, Err(error.to_owned()));
        } else {
            job.resends += 1;
            waiting.push_front(job);
        }
    }
}

async fn connect(address: &str, timeout: Duration) -> Result<TcpStream, TransportError> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            stream.set_nodelay(true).map_err(|e| format!("connect error: {address}: {e}"))?;
            Ok(stream)
        }
        Ok(Err(e)) => Err(format!("connect error: {address}: {e}")),
        Err(_) => Err(format!("connect error: {address}: no connection within {timeout:?}")),
    }
}

/// One complete answer at the start of a buffer.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The status code.
    pub status: u16,
    /// Bytes of head and body.
    pub length: usize,
    /// The node closes the connection after it.
    pub close: bool,
    /// A 1xx answer, followed by the real one.
    pub interim: bool,
}

/// Parses the answer at the start of `buf`: `None` until it is complete. `eof`: the node closed
/// the connection, which ends a body without a length.
#[doc(hidden)]
pub fn parse_answer(buf: &[u8], eof: bool) -> Result<Option<Parsed>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("something that is not an HTTP/1.x answer ({e})")),
    };
    let status = response.code.unwrap_or(0);
    // HTTP/1.0 closes unless it says keep-alive; `close` anywhere wins.
    let mut keep_alive = response.version != Some(0);
    let mut close = false;
    let mut length: Option<usize> = None;
    // Transfer-Encoding: None without one; Some(true) when chunked comes last.
    let mut encoding: Option<bool> = None;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let value = value.trim();
            let n = value
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| value.parse::<usize>().ok())
                .flatten()
                .ok_or("an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Lengths".to_owned());
            }
            length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().map(str::trim).unwrap_or_default();
            encoding = Some(last.eq_ignore_ascii_case("chunked"));
        }
    }
    let mut close = close || !keep_alive;
    let interim = (100..200).contains(&status);
    let body = if interim || status == 204 || status == 304 {
        Some(0)
    } else if let Some(chunked) = encoding {
        // With a Content-Length too the message is suspect (RFC 9112 §6.3): used once, then closed.
        close |= length.is_some();
        if chunked {
            chunked_length(&buf[head..])?
        } else if eof {
            close = true;
            Some(buf.len() - head)
        } else {
            None
        }
    } else if let Some(n) = length {
        (buf.len() - head >= n).then_some(n)
    } else if eof {
        close = true;
        Some(buf.len() - head)
    } else {
        None
    };
    if body.is_none() && eof {
        // The node closed in the middle of the body: the status came, so the request was
        // handled; it is answered with that status instead of being sent again.
        return Ok(Some(Parsed { status, length: buf.len(), close: true, interim }));
    }
    Ok(body.map(|body| Parsed { status, length: head + body, close, interim }))
}

/// The length of a chunked body (chunks, last chunk, trailers) at the start of `buf`, or `None`
/// until all of it is there.
fn chunked_length(buf: &[u8]) -> Result<Option<usize>, String> {
    let invalid = || "an invalid chunked body".to_owned();
    let mut at = 0;
    loop {
        match buf.get(at) {
            None => return Ok(None),
            Some(b) if !b.is_ascii_hexdigit() => return Err(invalid()),
            Some(_) => {}
        }
        match httparse::parse_chunk_size(&buf[at..]) {
            Ok(httparse::Status::Complete((n, 0))) => {
                at += n;
                // Trailer lines up to an empty line.
                loop {
                    let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                    at += end + 2;
                    if end == 0 {
                        return Ok(Some(at));
                    }
                }
            }
            Ok(httparse::Status::Complete((n, size))) => {
                let size = usize::try_from(size).map_err(|_| invalid())?;
                let data_end = at.saturating_add(n).saturating_add(size);
                let next = data_end.saturating_add(2);
                if next > buf.len() {
                    return Ok(None);
                }
                if &buf[data_end..next] != b"\r\n" {
                    return Err(invalid());
                }
                at = next;
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(invalid()),
        }
    }
}

#[cfg(test)]
mod tests;
