//! The BCE canonical request and signature check, from a request as the server receives it.
//!
//! Input: the `Authorization` value on the first line (empty: a fixed valid one), the request
//! line `METHOD target` on the second, then `name: value` header lines. The harness takes them
//! apart as hyper and the dialect do (a valid method, an `http::Uri`, the path and the query
//! pairs percent-decoded without `+` as a space, the headers hyper would accept) and hands them
//! to `auth::canonical_request` and `auth::verify`.
#![no_main]

use cachectl_server::api::bce::auth::{self, SignedRequest};
use libfuzzer_sys::fuzz_target;

const DEFAULT_AUTH: &str = "bce-auth-v1/AK_TEST/2024-01-02T03:04:05Z/1800/host;x-bce-date/\
                            dadafce4db8f637109a4a5b52699a35485929bb6d7916616a334e5d0d3c2da2e";

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

fuzz_target!(|input: &str| {
    let mut lines = input.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let authorization = match lines.next() {
        Some("") | None => DEFAULT_AUTH,
        Some(value) => value,
    };
    let Some((method, target)) = lines.next().and_then(|l| l.split_once(' ')) else { return };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value))
        else {
            continue;
        };
        if let Ok(value) = value.to_str() {
            headers.push((name.as_str().to_owned(), value.to_owned()));
        }
    }
    let query: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let path = decode(uri.path());
    let request = SignedRequest { method: method.as_str(), path: &path, query: &query, headers: &headers };

    let default_names: Vec<String> =
        ["host", "content-length", "content-type", "content-md5"].iter().map(|s| (*s).to_owned()).collect();
    let canonical = auth::canonical_request(&request, &default_names);
    // Everything but the separators is percent-encoded: no part can add a line or a byte
    // outside ASCII to what is signed.
    assert!(canonical.is_ascii(), "{canonical:?}");
    let first = canonical.split('\n').next().unwrap_or_default();
    assert_eq!(first, method.as_str().to_ascii_uppercase());

    if let Ok(parsed) = auth::parse(authorization) {
        let signed = auth::canonical_request(&request, &parsed.signed_headers);
        assert!(signed.is_ascii(), "{signed:?}");
        let _ = auth::verify(&parsed, "SK_TEST", &request, parsed.signed_at);
    }
});
