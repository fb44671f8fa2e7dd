//! The HTTP surface: one module per dialect, plus health and metrics. This module assembles the
//! router and holds what every handler shares; dialect rules live in the dialect modules.

pub mod baishan;
pub mod bce;
pub mod native;
pub mod ratelimit;

use crate::config::Settings;
use crate::metrics::Metrics;
use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use cachectl_core::Millis;
use cachectl_core::service::Service;
use std::sync::Arc;

/// The largest request body accepted (1,000 URLs of the longest accepted length fit).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The domain service.
    pub service: Service,
    /// The validated configuration.
    pub settings: Arc<Settings>,
    /// Request limits.
    pub limiter: Arc<ratelimit::RateLimiter>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v2/cache/refresh", any(baishan::refresh))
        .route("/v2/cache/prefetch", any(shared_prefetch))
        .route("/v2/cache/prefetchQuota", any(baishan::prefetch_quota))
        .route("/v2/cache/purge", any(bce::cdn::purge))
        .route("/v2/cache/quota", any(bce::cdn::quota))
        .route("/v2/cache/records", any(bce::cdn::records))
        .route("/v2/geo/cache/purge", any(bce::geo::purge))
        .route("/v2/geo/cache/prefetch", any(bce::geo::prefetch))
        .merge(native::routes())
        .fallback(not_found)
        .with_state(state)
}

/// `YYYY-MM-DD?HH:MM:SS` of `t` with `separator` between date and time, written digit by digit
/// (the dialects' record pages write two of these per record; `core::fmt` with padding cost
/// 6 % of a page query). `None` for a year outside 0–9999.
pub(crate) fn datetime_text(t: &(impl chrono::Datelike + chrono::Timelike), separator: u8) -> Option<[u8; 19]> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut out = *b"0000-00-00 00:00:00";
    out[10] = separator;
    for (at, width, value) in
        [(0, 4, year), (5, 2, t.month()), (8, 2, t.day()), (11, 2, t.hour()), (14, 2, t.minute()), (17, 2, t.second())]
    {
        let mut value = value;
        for digit in out[at..at + width].iter_mut().rev() {
            *digit = b'0' + u8::try_from(value % 10).unwrap_or(0);
            value /= 10;
        }
    }
    Some(out)
}

/// [`datetime_text`] of the instant `millis` in the zone `offset`, remembered per thread for the
/// last two seconds asked. The items of one task share their creation time and a page's finish
/// times cluster, so most records of a page ask for the two seconds the record before them asked
/// for (creation, then finish); the conversion from a timestamp to a calendar date was a tenth
/// of a Baishan task page's server time (BENCHMARKS.md round 6). `None` where `datetime_text`
/// has none.
pub(crate) fn instant_text(millis: Millis, offset: chrono::FixedOffset, separator: u8) -> Option<[u8; 19]> {
    use chrono::TimeZone as _;
    /// Second, zone offset, separator, text; the most recent first.
    type Remembered = [Option<(i64, i32, u8, [u8; 19])>; 2];
    thread_local! {
        static LAST: std::cell::Cell<Remembered> = const { std::cell::Cell::new([None, None]) };
    }
    let key = (millis.div_euclid(1000), offset.local_minus_utc(), separator);
    let mut last = LAST.get();
    for (i, entry) in last.iter().enumerate() {
        if let Some((s, z, sep, text)) = *entry
            && (s, z, sep) == key
        {
            if i > 0 {
                last.swap(0, i);
                LAST.set(last);
            }
            return Some(text);
        }
    }
    let text = offset.timestamp_opt(key.0, 0).single().and_then(|t| datetime_text(&t, separator))?;
    LAST.set([Some((key.0, key.1, key.2, text)), last[0]]);
    Some(text)
}

/// Writes `t` as [`datetime_text`] does, through the padded formatter for the years it cannot.
pub(crate) fn write_datetime(
    out: &mut impl std::fmt::Write,
    t: &(impl chrono::Datelike + chrono::Timelike),
    separator: u8,
) -> std::fmt::Result {
    if let Some(text) = datetime_text(t, separator) {
        return out.write_str(std::str::from_utf8(&text).unwrap_or_default());
    }
    write!(
        out,
        "{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        char::from(separator),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The largest buffer `json_response` keeps per thread between responses.
const KEPT_BUFFER: usize = 1 << 20;

thread_local! {
    /// `json_response`'s buffer, kept at the size of the largest response (up to `KEPT_BUFFER`).
    static JSON_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A JSON response, written into a per-thread buffer that keeps its size between responses and
/// then copied once into a body of exactly its length. axum's `Json` starts every body at 128
/// bytes and doubles it as a page of records is written (eight reallocations for a 25 KB GEO
/// page, each a large allocation that also makes glibc consolidate its small free chunks) and
/// checks capacity on every small write; those were about a tenth of a record page's server
/// time (BENCHMARKS.md round 6).
pub(crate) fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let written = JSON_BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        let written = serde_json::to_writer(&mut *buffer, body).map(|()| bytes::Bytes::copy_from_slice(buffer));
        if buffer.capacity() > KEPT_BUFFER {
            *buffer = Vec::new();
        }
        written
    });
    match written {
        Ok(bytes) => {
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
        }
        // Only a map with non-string keys or a failing `Serialize` impl gets here; none is ours.
        Err(e) => {
            tracing::error!(error = %e, "A response could not be written as JSON.");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Milliseconds since the epoch, now.
#[must_use]
pub fn now_ms() -> Millis {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Reads a request body up to `MAX_BODY_BYTES` (the listener bounds how long it may take).
///
/// # Errors
/// A sentence for the dialect's 400: too large, too slow, or cut short.
pub async fn read_body(body: Body) -> Result<bytes::Bytes, String> {
    axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(error) = cause {
            if error.is::<crate::http::BodyTimeout>() {
                return error.to_string();
            }
            if error.is::<http_body_util::LengthLimitError>() {
                return format!("the request body is larger than {} MiB", MAX_BODY_BYTES / 1024 / 1024);
            }
            cause = error.source();
        }
        format!("the request body was cut short ({e})")
    })
}

/// `/v2/cache/prefetch` belongs to two dialects: a BCE signature makes it the Baidu CDN one,
/// anything else the Baishan one.
async fn shared_prefetch(
    state: State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: RawQuery,
    body: Body,
) -> Response {
    if bce::is_bce(&headers) {
        bce::cdn::prefetch(state.0, method, uri, headers, body).await
    } else {
        baishan::prefetch(state, method, headers, query, body).await
    }
}

/// Unknown paths answer in the format of the dialect the request looks like.
async fn not_found(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    if uri.path().starts_with("/api/") {
        native::not_found().await
    } else if uri.path().starts_with("/v2/geo/") || bce::is_bce(&headers) {
        bce::not_found(&state)
    } else {
        baishan::not_found().await
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.service.store().ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "Readiness check failed.");
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, TimeZone, Timelike};

    #[test]
    fn datetime_text_matches_padded_formatting() {
        let utc = chrono::Utc;
        for ms in [0_i64, 1_704_067_199_999, 1_709_210_096_789, 4_102_444_800_000, 253_402_300_799_000] {
            let t = utc.timestamp_millis_opt(ms).unwrap();
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            assert_eq!(super::datetime_text(&t, b'T').unwrap(), expected.as_bytes(), "{ms}");
        }
        let early = utc.with_ymd_and_hms(7, 3, 4, 5, 6, 7).unwrap();
        assert_eq!(&super::datetime_text(&early, b' ').unwrap(), b"0007-03-04 05:06:07");
        let late = utc.timestamp_millis_opt(253_402_300_800_000).unwrap();
        assert_eq!(late.year(), 10_000);
        assert!(super::datetime_text(&late, b'T').is_none(), "five-digit years fall back to the formatter");
    }

    #[test]
    fn instant_text_is_datetime_text_of_the_instant_whatever_was_asked_before() {
        use chrono::TimeZone as _;
        let zones = [chrono::FixedOffset::east_opt(8 * 3600).unwrap(), chrono::FixedOffset::east_opt(0).unwrap()];
        // Neighbouring and equal seconds, negative instants, and zones and separators that
        // alternate between calls, so that a remembered text is never reused for another.
        for ms in
            [-1_001_i64, -1_000, -1, 0, 999, 1_000, 1_000, 1_764_470_000_123, 1_764_470_000_999, 1_764_470_001_000]
        {
            for zone in zones {
                for separator in [b' ', b'T'] {
                    let expected =
                        zone.timestamp_millis_opt(ms).single().and_then(|t| super::datetime_text(&t, separator));
                    assert_eq!(super::instant_text(ms, zone, separator), expected, "{ms} {zone} {separator}");
                    assert_eq!(super::instant_text(ms, zone, separator), expected, "{ms} again");
                }
            }
        }
        // Creation and finish times alternating, as a page asks for them.
        let (created, finished) = (1_764_470_000_123_i64, 1_764_470_003_456_i64);
        for _ in 0..3 {
            for ms in [created, finished, created + 500, finished + 1_000] {
                let expected = zones[0].timestamp_millis_opt(ms).single().and_then(|t| super::datetime_text(&t, b' '));
                assert_eq!(super::instant_text(ms, zones[0], b' '), expected, "{ms}");
            }
        }
        assert_eq!(super::instant_text(i64::MAX, zones[0], b' '), None);
    }
}
