//! Wire formatting shared by the dialects and the webhook sender: JSON bodies written through a
//! per-thread buffer, calendar times written digit by digit, and the native API's views of tasks,
//! items and node results ([`views`]). Nothing here knows a route, a credential or the store.

pub mod views;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cachectl_core::Timestamp;

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
/// time (BENCHMARKS.md, "Answers written into a per-thread buffer").
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
/// of a Baishan task page's server time (BENCHMARKS.md, "Record times formatted once per second"). `None` where `datetime_text`
/// has none.
pub(crate) fn instant_text(millis: Timestamp, offset: chrono::FixedOffset, separator: u8) -> Option<[u8; 19]> {
    use chrono::TimeZone as _;
    /// Second, zone offset, separator, text; the most recent first.
    type Remembered = [Option<(i64, i32, u8, [u8; 19])>; 2];
    thread_local! {
        static LAST: std::cell::Cell<Remembered> = const { std::cell::Cell::new([None, None]) };
    }
    let key = (millis.millis().div_euclid(1000), offset.local_minus_utc(), separator);
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

#[cfg(test)]
mod tests {
    use cachectl_core::Timestamp;
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
                    assert_eq!(
                        super::instant_text(Timestamp::from_millis(ms), zone, separator),
                        expected,
                        "{ms} {zone} {separator}"
                    );
                    assert_eq!(
                        super::instant_text(Timestamp::from_millis(ms), zone, separator),
                        expected,
                        "{ms} again"
                    );
                }
            }
        }
        // Creation and finish times alternating, as a page asks for them.
        let (created, finished) = (1_764_470_000_123_i64, 1_764_470_003_456_i64);
        for _ in 0..3 {
            for ms in [created, finished, created + 500, finished + 1_000] {
                let expected = zones[0].timestamp_millis_opt(ms).single().and_then(|t| super::datetime_text(&t, b' '));
                assert_eq!(super::instant_text(Timestamp::from_millis(ms), zones[0], b' '), expected, "{ms}");
            }
        }
        assert_eq!(super::instant_text(Timestamp::from_millis(i64::MAX), zones[0], b' '), None);
    }
}
