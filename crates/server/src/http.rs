//! The HTTP listener: accepts at most `max_connections` connections at once, serves each with
//! hyper's HTTP/1.1, and closes the ones a client leaves stalled — headers not complete within
//! `header_timeout`, idle between requests for `keepalive_timeout`, a body not received whole
//! within `body_timeout`. It knows nothing of the dialects; the router it is given does.
//!
//! Why not `axum::serve`: it has no timeouts and no connection cap, so a client that sends one
//! header line every few seconds, or keeps thousands of idle connections, holds them for as long
//! as it likes (docs/reliability.md). hyper's own header timer also runs while a connection is
//! idle, which would make the keep-alive timeout and the header timeout one setting; the
//! connection watch below keeps them apart, as nginx does.

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// How long connections and requests may take, and how many connections are served at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the first byte of a request until its headers are complete.
    pub header_timeout: Duration,
    /// How long a connection may stay idle between two requests.
    pub keepalive_timeout: Duration,
    /// From the first byte of a request until its body is received whole.
    pub body_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
}

/// The most bytes of an unread or refused request body read and thrown away before the answer
/// is sent, so that a client still sending gets the answer instead of a connection reset.
pub const DRAIN_BYTES: u64 = 256 * 1024 * 1024;

/// The error a request body yields when `body_timeout` has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received whole within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// Serves `app` on `listener` until `shutdown` fires, then lets every open connection finish its
/// request in flight and returns when all are closed.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let mut warned_full = false;
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        if slots.available_permits() == 0 && !warned_full {
            warned_full = true;
            tracing::warn!(
                max_connections = limits.max_connections,
                "Serving as many connections as [server] max_connections allows; new ones wait in the backlog."
            );
        } else if slots.available_permits() > limits.max_connections / 2 {
            warned_full = false;
        }
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: the connections in flight free descriptors as they close.
                    tracing::warn!(error = %e, "Accepting a connection failed; pausing for a second.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let app = app.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            serve_connection(stream, remote, app, limits, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// One connection: hyper's HTTP/1.1 state machine, raced against the connection's deadlines.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let watch = Arc::new(Watch::new());
    let io = TokioIo::new(Watched { inner: stream, watch: watch.clone() });
    let service_watch = watch.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = service_watch.begin();
        let (mut parts, incoming) = request.into_parts();
        parts.extensions.insert(ConnectInfo(remote));
        let body = Arc::new(Mutex::new(Timed::new(incoming, limits.body_timeout)));
        let request = hyper::Request::from_parts(parts, Body::new(Shared(body.clone())));
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap_or_else(|never: Infallible| match never {});
            drain(&body).await;
            Ok::<_, Infallible>(response.map(|inner| Body::new(Guarded { inner, _busy: busy })))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let deadline = watch.deadline(&limits);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, remote = %remote, "Connection ended with an error.");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + limits.keepalive_timeout)) => {
                if deadline.is_some_and(|d| d <= Instant::now()) && watch.deadline(&limits) == deadline {
                    tracing::debug!(remote = %remote, "Closing a connection that stalled (header or keep-alive timeout).");
                    return;
                }
            }
            () = watch.changed.notified() => {}
            () = stop.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Reads and throws away what is left of a request body that the handler did not read (it was
/// refused before, or was too large), up to `DRAIN_BYTES` and the body's own deadline, so that
/// the client has finished sending when the answer reaches it.
async fn drain(body: &Arc<Mutex<Timed>>) {
    if lock(body).is_end_stream() {
        return;
    }
    let mut rest = Shared(body.clone());
    let mut drained = 0u64;
    while drained <= DRAIN_BYTES {
        match std::future::poll_fn(|cx| Pin::new(&mut rest).poll_frame(cx)).await {
            Some(Ok(frame)) => drained += frame.data_ref().map_or(0, |d| d.len() as u64),
            Some(Err(_)) | None => return,
        }
    }
}

/// The process's soft limit on open files, from `/proc/self/limits` (`None` where unreadable or
/// unlimited).
#[must_use]
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a connection is doing, as far as its deadlines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight since this moment; nothing of the next one read yet.
    Idle(Instant),
    /// The first bytes of a request arrived at this moment; its headers are not complete.
    Head(Instant),
    /// This many requests are being answered (their response bodies not yet sent whole).
    Busy(u32),
}

/// A connection's phase, updated by its reads and by the requests it serves.
struct Watch {
    phase: Mutex<Phase>,
    /// Signalled when the last request in flight is answered, so that the idle deadline starts.
    changed: Notify,
}

impl Watch {
    fn new() -> Self {
        Self { phase: Mutex::new(Phase::Idle(Instant::now())), changed: Notify::new() }
    }

    fn read(&self) {
        let mut phase = lock(&self.phase);
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
        }
    }

    fn begin(self: &Arc<Self>) -> BusyGuard {
        let mut phase = lock(&self.phase);
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n.saturating_add(1)),
            _ => Phase::Busy(1),
        };
        BusyGuard(self.clone())
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match *lock(&self.phase) {
            Phase::Idle(since) => Some(since + limits.keepalive_timeout),
            Phase::Head(since) => Some(since + limits.header_timeout),
            Phase::Busy(_) => None,
        }
    }
}

/// Marks the end of a request's answer when dropped (its response body sent or abandoned).
struct BusyGuard(Arc<Watch>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut phase = lock(&self.0.phase);
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
        drop(phase);
        self.0.changed.notify_one();
    }
}

/// The connection's socket, telling the watch when bytes arrive.
struct Watched {
    inner: tokio::net::TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that fails with [`BodyTimeout`] once its deadline has passed.
struct Timed {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
}

impl Timed {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep(limit)), limit }
    }
}

impl HttpBody for Timed {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let limit = self.limit;
            return Poll::Ready(Some(Err(BodyTimeout(limit).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body as the handler sees it, while the connection keeps a handle to drain it.
struct Shared(Arc<Mutex<Timed>>);

impl HttpBody for Shared {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut body = lock(&self.0);
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.0).is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.0).size_hint()
    }
}

/// A response body that holds its request's [`BusyGuard`] until it is sent whole (a progress
/// stream stays busy for as long as it is open, so the keep-alive deadline never cuts it).
struct Guarded {
    inner: Body,
    _busy: BusyGuard,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
