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
//! Batched purges ([`LaneSettings::batch`], Varnish only): plain URL purges of one host that wait
//! together leave as one request, `PURGE <first path>` with the paths after it in
//! `X-Cachectl-Next` (blank-separated). The shipped VCL purges each in turn (a restart per path)
//! and says in `X-Cachectl-Purged` how many it purged, from the first. The paths it confirms are
//! answered 200; the others wait again and leave in later requests. A node that confirms fewer
//! (varnishd's `max_restarts` below the batch) is sent batches of that many from then on; one
//! that answers a batch without the header (a VCL without cachectl's `vcl_purge`: it purged the
//! first path, which is all an unaware cache does) is sent one path a request for
//! [`UNBATCHED_FOR`], then tried again.
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
/// Bytes of the paths in one batched request's `X-Cachectl-Next` at most (Varnish refuses a
/// header line over `http_req_hdr_len`, 8 KiB by default).
const MAX_NEXT: usize = 6 * 1024;
/// How long a connection whose node did not confirm a batch sends one path a request.
pub const UNBATCHED_FOR: Duration = Duration::from_secs(300);

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
    /// Plain URL purges of one host sent in one request at most (1: one a request). Only for a
    /// node whose VCL purges the paths of `X-Cachectl-Next` (module documentation).
    pub batch: usize,
}

pub use crate::transport::TransportError;

struct Job {
    request: Vec<u8>,
    reply: oneshot::Sender<Result<u16, TransportError>>,
    resends: u8,
    /// A plain URL purge (no header) that may share a request: the length of its path, which
    /// starts after `PURGE ` in `request`; its host follows the path and [`HOST_AFTER_TARGET`].
    target_len: Option<usize>,
    /// The purges written in this job's request after it (a batch), in order.
    more: Vec<Job>,
}

/// What separates a request's target from its host in [`crate::transport::Request::to_bytes`].
const HOST_AFTER_TARGET: &[u8] = b" HTTP/1.1\r\nhost: ";
/// What starts a plain purge's bytes.
const PURGE_PREFIX: &[u8] = b"PURGE ";

impl Job {
    /// The path of a plain purge.
    fn target(&self) -> &[u8] {
        let len = self.target_len.unwrap_or(0);
        &self.request[PURGE_PREFIX.len()..PURGE_PREFIX.len() + len]
    }

    /// The host of a plain purge.
    fn host(&self) -> &[u8] {
        let start = PURGE_PREFIX.len() + self.target_len.unwrap_or(0) + HOST_AFTER_TARGET.len();
        self.request.get(start..self.request.len().saturating_sub(4)).unwrap_or_default()
    }

    /// Requests carried, this one's and its batch's.
    fn count(&self) -> usize {
        1 + self.more.len()
    }

    /// This job and those of its batch, each alone again.
    fn split(mut self) -> impl Iterator<Item = Job> {
        let more = std::mem::take(&mut self.more);
        std::iter::once(self).chain(more)
    }
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
        self.queue(request, None).await
    }

    /// Queues `request`; `target_len`: it is a plain purge with a path of that length, which may
    /// share a request with others.
    async fn queue(&self, request: Vec<u8>, target_len: Option<usize>) -> Result<u16, TransportError> {
        let connection = self
            .connections
            .iter()
            .min_by_key(|c| c.outstanding.load(Ordering::Relaxed))
            .expect("a lane has at least one connection");
        let (reply, answer) = oneshot::channel();
        connection.outstanding.fetch_add(1, Ordering::Relaxed);
        let stopped = || format!("request error: {}: the connection task has stopped", self.address);
        if connection.jobs.send(Job { request, reply, resends: 0, target_len, more: Vec::new() }).is_err() {
            connection.outstanding.fetch_sub(1, Ordering::Relaxed);
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The pipelined implementation of the node transport.
impl Transport for Lane {
    async fn send(&self, request: Request) -> Result<u16, TransportError> {
        let target_len = request.plain_purge_target().map(str::len);
        self.queue(request.to_bytes(), target_len).await
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
    let mut batching = Batching { size: settings.batch.max(1), configured: settings.batch.max(1), retry_at: None };
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
        while open && waiting.len() + jobs(&in_flight) < depth * batching.size {
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
            batching.resume();
            while in_flight.len() < depth {
                let Some(mut job) = waiting.pop_front() else { break };
                if batching.size > 1 && job.target_len.is_some() {
                    gather(&mut job, &mut waiting, batching.size);
                }
                write_job(&mut write, &job);
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
            job = incoming.recv(), if open && waiting.len() + jobs(&in_flight) < depth * batching.size => Event::Job(job),
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
                let (answered, mut closing) = take_answers(
                    &mut read,
                    n == 0,
                    &mut in_flight,
                    Followed { waiting: &mut waiting, batching: &mut batching },
                    &address,
                    &answer,
                );
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

/// How many paths a connection puts in one purge request, as its node showed it can take.
struct Batching {
    /// Now.
    size: usize,
    /// As configured.
    configured: usize,
    /// When batches of `configured` are tried again after the node did not confirm one.
    retry_at: Option<Instant>,
}

impl Batching {
    /// Tries the configured size again once the node had [`UNBATCHED_FOR`] to change its VCL.
    fn resume(&mut self) {
        if self.retry_at.is_some_and(|at| Instant::now() >= at) {
            self.retry_at = None;
            self.size = self.configured;
        }
    }

    /// The node purged `confirmed` paths of a larger batch (its `max_restarts` + 1).
    fn confirmed(&mut self, confirmed: usize, address: &str) {
        if confirmed < self.size {
            tracing::warn!(
                node = %address,
                confirmed,
                batch = self.size,
                "The node purged only the first {confirmed} paths of a batched purge (varnishd's max_restarts \
                 is {}); the others are sent again, and batches are of {confirmed} paths from now on.",
                confirmed - 1
            );
            self.size = confirmed.max(1);
        }
    }

    /// The node answered a batch without saying how many paths it purged.
    fn refused(&mut self, address: &str) {
        if self.size > 1 {
            tracing::warn!(
                node = %address,
                "The node did not confirm a batched purge (its VCL lacks cachectl's vcl_purge): sending one \
                 path a request for {UNBATCHED_FOR:?}, then trying batches again."
            );
        }
        self.size = 1;
        self.retry_at = Some(Instant::now() + UNBATCHED_FOR);
    }
}

/// Where the paths of a batch its node did not purge go, and what the connection learns.
struct Followed<'a> {
    waiting: &'a mut VecDeque<Job>,
    batching: &'a mut Batching,
}

/// The requests (paths) that the jobs of `queue` carry.
fn jobs(queue: &VecDeque<Job>) -> usize {
    queue.iter().map(Job::count).sum()
}

/// Moves into `job`'s batch the plain purges of its host that wait right after it, up to `size`
/// paths and [`MAX_NEXT`] bytes of them after the first.
fn gather(job: &mut Job, waiting: &mut VecDeque<Job>, size: usize) {
    let mut next_bytes = 0;
    while job.count() < size {
        let Some(next) = waiting.front() else { break };
        let length = next.target().len() + 1;
        if next.target_len.is_none() || next.host() != job.host() || next_bytes + length > MAX_NEXT {
            break;
        }
        next_bytes += length;
        if let Some(next) = waiting.pop_front() {
            job.more.push(next);
        }
    }
}

/// Writes `job`'s request: its own bytes, or for a batch `PURGE <first path>` with the others
/// in `X-Cachectl-Next`.
fn write_job(write: &mut Vec<u8>, job: &Job) {
    if job.more.is_empty() {
        write.extend_from_slice(&job.request);
        return;
    }
    for part in [PURGE_PREFIX, job.target(), HOST_AFTER_TARGET, job.host(), b"\r\nx-cachectl-next: "] {
        write.extend_from_slice(part);
    }
    for (i, next) in job.more.iter().enumerate() {
        if i > 0 {
            write.push(b' ');
        }
        write.extend_from_slice(next.target());
    }
    write.extend_from_slice(b"\r\n\r\n");
}

/// Answers the requests of `job` with the node's answer `status`. A batch is answered as far as
/// the node confirmed it (`purged`): the status for a whole batch, 200 for the confirmed paths
/// of a part (the node's status is then its refusal of the rest); without a confirmation the
/// first path has the status, which is all an unaware cache answers for. The paths left wait
/// again, in front.
fn settle(
    job: Job,
    status: u16,
    purged: Option<usize>,
    followed: &mut Followed<'_>,
    address: &str,
    answer: &impl Fn(Job, Result<u16, TransportError>),
) {
    if job.more.is_empty() {
        answer(job, Ok(status));
        return;
    }
    let size = job.count();
    let confirmed = purged.unwrap_or(0).min(size);
    let mut all = job.split();
    if confirmed == size {
        all.for_each(|j| answer(j, Ok(status)));
        return;
    }
    if confirmed == 0 {
        if let Some(first) = all.next() {
            answer(first, Ok(status));
        }
        if (200..300).contains(&status) {
            followed.batching.refused(address);
        }
    } else {
        let ok = if (200..300).contains(&status) { status } else { 200 };
        all.by_ref().take(confirmed).for_each(|j| answer(j, Ok(ok)));
        followed.batching.confirmed(confirmed, address);
    }
    let left: Vec<Job> = all.collect();
    for j in left.into_iter().rev() {
        followed.waiting.push_front(j);
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
    mut followed: Followed<'_>,
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
                settle(job, parsed.status, parsed.purged, &mut followed, address, answer);
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
    for job in queue.drain(..).flat_map(Job::split) {
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
    while let Some(batch) = in_flight.pop_back() {
        let jobs: Vec<Job> = batch.split().collect();
        for mut job in jobs.into_iter().rev() {
            if job.resends >= MAX_RESENDS {
                answer(job, Err(error.to_owned()));
            } else {
                job.resends += 1;
                waiting.push_front(job);
            }
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
    /// `X-Cachectl-Purged`: how many paths of a batched purge the node purged.
    pub purged: Option<usize>,
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
    let mut purged = None;
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
        } else if header.name.eq_ignore_ascii_case("x-cachectl-purged") {
            purged = value.trim().parse::<usize>().ok();
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
        return Ok(Some(Parsed { status, length: buf.len(), close: true, interim, purged }));
    }
    Ok(body.map(|body| Parsed { status, length: head + body, close, interim, purged }))
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
