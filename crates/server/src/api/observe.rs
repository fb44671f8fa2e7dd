//! The layer around every route: a tracing span per request (method, route template, dialect,
//! a request number) and the `http_requests` counter by dialect and status, so that no dialect
//! can forget to count its requests.

use crate::metrics::Metrics;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Uri};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::Instrument as _;

/// Which API a request belongs to, as far as its path and headers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// BaishanCloud v2 (and any unknown path outside the others).
    Baishan,
    /// Baidu AI Cloud GEO and CDN (a BCE signature, or a path only they have).
    Bce,
    /// The native API under `/api/`.
    Native,
    /// The web console under `/console/`.
    Console,
    /// The admin API under `/admin/`.
    Admin,
    /// `/healthz`, `/readyz`, `/metrics`: not counted.
    Operations,
}

impl Dialect {
    /// The dialect of a request.
    #[must_use]
    pub fn of(uri: &Uri, headers: &HeaderMap) -> Self {
        let path = uri.path();
        if path.starts_with("/api/") {
            Self::Native
        } else if path.starts_with("/admin/") {
            Self::Admin
        } else if path == "/console" || path.starts_with("/console/") {
            Self::Console
        } else if matches!(path, "/healthz" | "/readyz" | "/metrics") {
            Self::Operations
        } else if path.starts_with("/v2/geo/")
            || matches!(path, "/v2/cache/purge" | "/v2/cache/quota" | "/v2/cache/records")
            || super::bce::is_bce(headers)
        {
            Self::Bce
        } else {
            Self::Baishan
        }
    }

    /// The label of the request counter.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Baishan => "baishan",
            Self::Bce => "bce",
            Self::Native => "native",
            Self::Console => "console",
            Self::Admin => "admin",
            Self::Operations => "operations",
        }
    }
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Runs `request` inside its span and counts its answer.
pub async fn observe(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let dialect = Dialect::of(request.uri(), request.headers());
    let route = request.extensions().get::<MatchedPath>().cloned();
    let span = tracing::info_span!(
        "request",
        id = REQUESTS.fetch_add(1, Ordering::Relaxed),
        method = %request.method(),
        route = route.as_ref().map_or("(no route)", MatchedPath::as_str),
        dialect = dialect.as_str(),
    );
    let response = next.run(request).instrument(span).await;
    if dialect != Dialect::Operations {
        metrics.request(dialect.as_str(), response.status().as_u16());
    }
    response
}
