//! The BCE `Authorization` header (`bce-auth-v1/{ak}/{timestamp}/{expiry}/{signedHeaders}/{sig}`):
//! parsed, then verified against a fixed request at the edges of its validity window and at the
//! extremes of the clock.
#![no_main]

use cachectl_server::api::bce::auth::{self, MAX_EXPIRY_SECS, SignedRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|header: &str| {
    let Ok(parsed) = auth::parse(header) else { return };
    assert!(!parsed.ak.is_empty());
    assert_eq!(parsed.signature.len(), 64);
    assert!((1..=MAX_EXPIRY_SECS).contains(&parsed.expiry));
    let headers = vec![
        ("Host".to_owned(), "cdn.baidubce.com".to_owned()),
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("x-bce-date".to_owned(), parsed.timestamp.clone()),
    ];
    let query = vec![("id".to_owned(), String::new())];
    let request = SignedRequest { method: "POST", path: "/v2/cache/purge", query: &query, headers: &headers };
    for now in [
        parsed.signed_at,
        parsed.signed_at.saturating_add(parsed.expiry),
        parsed.signed_at.saturating_sub(auth::MAX_FUTURE_SECS),
        0,
        i64::MIN,
        i64::MAX,
    ] {
        let _ = auth::verify(&parsed, "SK_TEST", &request, now);
    }
});
