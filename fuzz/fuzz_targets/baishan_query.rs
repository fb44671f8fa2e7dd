//! The Baishan query string (`GET /v2/cache/refresh?...`): decoded into pairs, then the token,
//! the page parameters, the time window (in the dialect's zone) and the URL filter, each through
//! the function the handler calls.
#![no_main]

use cachectl_server::api::baishan::{normalize_url, param, parse_time, parse_u32, query_pairs};
use chrono::FixedOffset;
use libfuzzer_sys::fuzz_target;

/// The default zone (+08:00), UTC, and the extremes `baishan.timezone` accepts (±14:59).
const ZONES: [i32; 4] = [8 * 3600, 0, 14 * 3600 + 59 * 60, -(14 * 3600 + 59 * 60)];

fuzz_target!(|raw: &str| {
    let pairs = query_pairs(Some(raw));
    std::hint::black_box(param(&pairs, &["token"]));
    let _ = parse_u32(&pairs, "page_number", 1, 1..=u32::MAX);
    let _ = parse_u32(&pairs, "page_size", 50, 1..=500);
    std::hint::black_box(param(&pairs, &["task_id"]).map(|id| id.trim().parse::<i64>()));
    for name in ["start_time", "end_time"] {
        if let Some(text) = param(&pairs, &[name]) {
            for seconds in ZONES {
                let zone = FixedOffset::east_opt(seconds).unwrap();
                if let Ok((from, to)) = parse_time(text, zone, name) {
                    // Not `<`: a leap second (`23:59:60`) and the second after it are one instant.
                    assert!(from <= to, "{text:?} in {zone}: [{from:?}, {to:?}) ends before it starts");
                }
            }
        }
    }
    if let Some(url) = param(&pairs, &["url", "urls"]) {
        std::hint::black_box(normalize_url(url));
    }
});
