//! How purges and bans reach a node. A [`Transport`] sends one checked request without a body
//! ([`Request`]: method, path and query, `Host`, headers) to its node and waits for the status of
//! the answer. There are two, picked for every node by `[worker] edge_transport`
//! ([`TransportKind`]); [`NodeTransport`] is a node's:
//!
//! - [`Lane`] (`pipelined`, the default, `pipeline.rs`): a few kept-alive connections, up to
//!   `pipeline_depth` requests written on one before the first is answered. It more than doubled
//!   the fan-out rate (BENCHMARKS.md, "Pipelined purge lane").
//! - [`Plain`] (`plain`): reqwest's keep-alive pool, one request per connection at a time, as
//!   prefetches are sent; for a node behind something that mishandles pipelining, and as the
//!   plain reference the lane is tested against.
//!
//! Both mean the same by their answers: the status of the node's answer (one whose status line
//! arrived is an answer, even if its body was then cut short), or a transport error naming the
//! node's address, which the worker retries with backoff. Below that they differ: the lane writes
//! again, on a new connection, what a connection the node closed left unanswered (at most
//! [`MAX_RESENDS`](crate::pipeline::MAX_RESENDS) times); the plain transport writes a request
//! once (hyper's pool only sends again a request it never wrote), so such a close is an error.
//! A connection reset after an answer's head is a resend on the lane and the answer on `plain`.

use crate::Plan;
use crate::pipeline::Lane;
use reqwest::Method;
use serde::Deserialize;
use std::future::Future;
use std::sync::Arc;

/// A failed exchange: what went wrong, naming the node's address, in one line
/// (`connect error: 127.0.0.1:6081: Connection refused (os error 111)`, `timeout: …`).
pub type TransportError = String;

/// An answer's body read at most on the plain transport before its connection is given up
/// (as on the lane: a purge's answer is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

/// Which transport carries the purges and bans of a node (`[worker] edge_transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The pipelined lane ([`Lane`]).
    #[default]
    Pipelined,
    /// reqwest's keep-alive pool, one request per connection at a time ([`Plain`]).
    Plain,
}

/// A request without a body (PURGE, BAN) whose parts keep HTTP/1.1's framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: Method,
    target: String,
    host: String,
    headers: Vec<(&'static str, String)>,
}

impl Request {
    /// The request of `plan`.
    ///
    /// # Errors
    /// The plan is a prefetch (its body must be read), or a part would break the request's
    /// framing (whitespace or control characters where HTTP allows none, a framing header):
    /// the reason, a definitive failure.
    pub fn new(plan: Plan) -> Result<Self, String> {
        if plan.read_body {
            return Err(format!("{} {}: a prefetch is not sent by a transport", plan.method, plan.path_and_query));
        }
        check_request(plan.method.as_str(), &plan.path_and_query, &plan.host, &plan.headers)?;
        Ok(Self { method: plan.method, target: plan.path_and_query, host: plan.host, headers: plan.headers })
    }

    /// The path of a plain URL purge (PURGE without any header), which a node's VCL can purge
    /// together with others of its host (`pipeline`, batched purges).
    #[must_use]
    pub fn plain_purge_target(&self) -> Option<&str> {
        (self.method.as_str() == "PURGE" && self.headers.is_empty()).then_some(self.target.as_str())
    }

    /// The request's bytes on the wire, HTTP/1.1.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        write_request(self.method.as_str(), &self.target, &self.host, &self.headers)
    }
}

/// The bytes of an HTTP/1.1 request without a body.
///
/// # Errors
/// A part would break the request's framing (whitespace or control characters where HTTP
/// allows none): the reason.
pub fn request_bytes(method: &str, target: &str, host: &str, headers: &[(&str, String)]) -> Result<Vec<u8>, String> {
    check_request(method, target, host, headers)?;
    Ok(write_request(method, target, host, headers))
}

/// Whether the parts of a request without a body keep its framing: no whitespace or control
/// characters where HTTP allows none, no header that frames the message.
///
/// # Errors
/// The reason a part cannot be sent.
fn check_request(method: &str, target: &str, host: &str, headers: &[(&str, String)]) -> Result<(), String> {
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    let value = |s: &str| s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    if !token(method) || !token(target) || !token(host) {
        return Err(format!("cannot send {method} {target} to host {host}: invalid characters"));
    }
    for (name, v) in headers {
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        let framing = ["host", "content-length", "transfer-encoding", "connection"];
        if name.is_empty() || !name.bytes().all(tchar) || framing.iter().any(|f| name.eq_ignore_ascii_case(f)) {
            return Err(format!("cannot send header {name:?}: not a header a purge may carry"));
        }
        if !value(v) {
            return Err(format!("cannot send header {name}: invalid characters"));
        }
    }
    Ok(())
}

/// The bytes of a request whose parts [`check_request`] accepted.
fn write_request(method: &str, target: &str, host: &str, headers: &[(&str, String)]) -> Vec<u8> {
    let mut request = Vec::with_capacity(64 + target.len() + host.len());
    for part in [method, " ", target, " HTTP/1.1\r\nhost: ", host, "\r\n"] {
        request.extend_from_slice(part.as_bytes());
    }
    for (name, v) in headers {
        for part in [*name, ": ", v.as_str(), "\r\n"] {
            request.extend_from_slice(part.as_bytes());
        }
    }
    request.extend_from_slice(b"\r\n");
    request
}

/// Sends requests without a body to one node.
pub trait Transport {
    /// Sends `request` to the node and waits for the status of its answer.
    ///
    /// # Errors
    /// The node could not be reached, did not answer within the request timeout, closed the
    /// connection before answering, or answered something that is not HTTP/1.x: one line naming
    /// the node's address.
    fn send(&self, request: Request) -> impl Future<Output = Result<u16, TransportError>> + Send;
}

/// Requests over reqwest's keep-alive pool (hyper: one request per connection at a time; a new
/// connection when none is idle). The pool is the [`EdgeClient`](crate::EdgeClient)'s, shared
/// with the node's prefetches; the worker's per-node semaphore bounds its connections.
#[derive(Debug, Clone)]
pub struct Plain {
    http: reqwest::Client,
    address: Arc<str>,
}

impl Plain {
    /// Sends to `address` (`host:port`) through `http`.
    #[must_use]
    pub fn new(http: reqwest::Client, address: &str) -> Self {
        Self { http, address: Arc::from(address) }
    }
}

impl Transport for Plain {
    async fn send(&self, request: Request) -> Result<u16, TransportError> {
        let target = format!("http://{}{}", self.address, request.target);
        let mut builder = self.http.request(request.method, &target).header(reqwest::header::HOST, request.host);
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        let mut response = builder.send().await.map_err(|e| describe(&self.address, &e))?;
        let code = response.status().as_u16();
        // Reading the answer to its end keeps the connection reusable. A body cut short or too
        // long does not undo the status (the node handled the request); the connection is dropped.
        let mut read = 0;
        while let Ok(Some(chunk)) = response.chunk().await {
            read += chunk.len();
            if read > MAX_BODY {
                break;
            }
        }
        Ok(code)
    }
}

/// The transport of one node, as configured.
#[derive(Debug, Clone)]
pub enum NodeTransport {
    /// `edge_transport = "pipelined"`.
    Pipelined(Lane),
    /// `edge_transport = "plain"`.
    Plain(Plain),
}

impl Transport for NodeTransport {
    async fn send(&self, request: Request) -> Result<u16, TransportError> {
        match self {
            Self::Pipelined(lane) => lane.send(request).await,
            Self::Plain(plain) => plain.send(request).await,
        }
    }
}

/// A one-line description of a reqwest error with `address` and the root cause:
/// `connect error: 127.0.0.1:6081: Connection refused (os error 111)`.
pub(crate) fn describe(address: &str, error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect error"
    } else {
        "request error"
    };
    let mut root: &dyn std::error::Error = error;
    while let Some(next) = root.source() {
        root = next;
    }
    format!("{kind}: {address}: {root}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Driver, plan};
    use cachectl_core::{ItemType, Kind};

    #[test]
    fn requests_are_the_plans_of_purges_and_bans() {
        let purge = plan(Driver::Varnish, Kind::Refresh, ItemType::Url, "http://www.example.com/a?b=1").unwrap();
        assert_eq!(Request::new(purge).unwrap().to_bytes(), b"PURGE /a?b=1 HTTP/1.1\r\nhost: www.example.com\r\n\r\n");
        let ban = plan(Driver::Varnish, Kind::Refresh, ItemType::Dir, "http://www.example.com/a.b/").unwrap();
        assert_eq!(
            Request::new(ban).unwrap().to_bytes(),
            b"BAN / HTTP/1.1\r\nhost: www.example.com\r\nx-cachectl-ban: /a\\.b/\r\n\r\n"
        );
        let prefetch = plan(Driver::Nginx, Kind::Prefetch, ItemType::Url, "http://www.example.com/a").unwrap();
        assert!(Request::new(prefetch).unwrap_err().contains("prefetch"));
    }

    #[test]
    fn refuses_requests_that_break_framing() {
        let r = request_bytes("PURGE", "/a?b=1", "www.example.com", &[("x-cachectl-ban", "/a\\.b".into())]).unwrap();
        assert_eq!(r, b"PURGE /a?b=1 HTTP/1.1\r\nhost: www.example.com\r\nx-cachectl-ban: /a\\.b\r\n\r\n");
        assert!(request_bytes("PURGE", "/a b", "h", &[]).is_err());
        assert!(request_bytes("PURGE", "/a", "h\r\nx: y", &[]).is_err());
        assert!(request_bytes("PURGE", "/a", "h", &[("x", "a\r\nb".into())]).is_err());
        assert!(request_bytes("PURGE", "/a", "h", &[("x:y", "1".into())]).is_err());
        assert!(request_bytes("PURGE", "/a", "h", &[("Content-Length", "5".into())]).is_err());
    }

    #[test]
    fn requests_that_would_break_framing_are_refused() {
        let mut bad = plan(Driver::Varnish, Kind::Refresh, ItemType::Url, "http://www.example.com/a").unwrap();
        bad.host = "h\r\nx: y".into();
        assert!(Request::new(bad.clone()).unwrap_err().contains("invalid characters"));
        bad.host = "h".into();
        bad.headers = vec![("content-length", "5".into())];
        assert!(Request::new(bad).unwrap_err().contains("not a header a purge may carry"));
    }
}
