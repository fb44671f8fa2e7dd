//! BCE signature v1 verification (docs/baidu.md, "Authentication"), as Baidu documents it: the signing key from the
//! secret key and the auth-string prefix, the canonical request, HMAC-SHA256, constant-time
//! comparison, timestamp and expiry checks. Pure functions; the caller looks the key up.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// How far in the future a signature's timestamp may be (clock skew).
pub const MAX_FUTURE_SECS: i64 = 15 * 60;

/// The longest validity a signature may claim, in seconds (seven days, as long as any SDK signs
/// for). A larger expiry is refused as malformed, so that no arithmetic on it can overflow.
pub const MAX_EXPIRY_SECS: i64 = 7 * 86_400;

/// The parts of an `Authorization: bce-auth-v1/...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthString {
    /// Access key id.
    pub ak: String,
    /// `YYYY-MM-DDThh:mm:ssZ`, as signed.
    pub timestamp: String,
    /// The timestamp in seconds since the epoch.
    pub signed_at: i64,
    /// Validity in seconds from the timestamp.
    pub expiry: i64,
    /// The signed header names, lowercase; empty means the default set.
    pub signed_headers: Vec<String>,
    /// The hex signature.
    pub signature: String,
}

/// Why a request's signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header, or not a `bce-auth-v1` one.
    #[error("{0}")]
    Missing(String),
    /// The header does not parse.
    #[error("{0}")]
    Malformed(String),
    /// The signature is outside its validity window.
    #[error("{0}")]
    Expired(String),
    /// The signature does not match.
    #[error("the request signature does not match the one computed with the access key's secret")]
    Mismatch,
}

/// Parses `bce-auth-v1/{ak}/{timestamp}/{expiry}/{signedHeaders}/{signature}`.
///
/// # Errors
/// `Missing` if it is not a v1 auth string, `Malformed` if a part is wrong.
pub fn parse(header: &str) -> Result<AuthString, AuthError> {
    let parts: Vec<&str> = header.trim().split('/').collect();
    if parts.first() != Some(&"bce-auth-v1") {
        return Err(AuthError::Missing("the Authorization header is not a bce-auth-v1 authentication string".into()));
    }
    let [_, ak, timestamp, expiry, signed, signature] = parts.as_slice() else {
        return Err(AuthError::Malformed(
            "the Authorization header must be bce-auth-v1/{accessKeyId}/{timestamp}/{expiration}/{signedHeaders}/{signature}"
                .into(),
        ));
    };
    let signed_at = chrono::NaiveDateTime::parse_from_str(timestamp, "%Y-%m-%dT%H:%M:%SZ")
        .map_err(|_| {
            AuthError::Malformed(format!("the authentication timestamp {timestamp:?} is not YYYY-MM-DDThh:mm:ssZ"))
        })?
        .and_utc()
        .timestamp();
    let expiry: i64 = expiry.parse().ok().filter(|e| (1..=MAX_EXPIRY_SECS).contains(e)).ok_or_else(|| {
        AuthError::Malformed(format!(
            "the expiration {expiry:?} is not a number of seconds between 1 and {MAX_EXPIRY_SECS}"
        ))
    })?;
    if ak.is_empty() || signature.len() != 64 {
        return Err(AuthError::Malformed("the access key id is empty or the signature is not 64 hex digits".into()));
    }
    let signed_headers = signed.split(';').map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect();
    Ok(AuthString {
        ak: (*ak).to_owned(),
        timestamp: (*timestamp).to_owned(),
        signed_at,
        expiry,
        signed_headers,
        signature: signature.to_ascii_lowercase(),
    })
}

/// `hex(HMAC-SHA256(key, message))`, lowercase.
#[must_use]
pub fn hmac_sha256_hex(key: &[u8], message: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `hex(HMAC-SHA256(sk, "bce-auth-v1/{ak}/{timestamp}/{expiry}"))`.
#[must_use]
pub fn signing_key(sk: &str, ak: &str, timestamp: &str, expiry: i64) -> String {
    hmac_sha256_hex(sk.as_bytes(), &format!("bce-auth-v1/{ak}/{timestamp}/{expiry}"))
}

/// Percent-encodes every byte but `A-Za-z0-9-_.~`, uppercase hex; with `keep_slash`, `/` too.
#[must_use]
pub fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request as the verifier sees it: decoded path, decoded query pairs, headers.
#[derive(Debug, Clone)]
pub struct SignedRequest<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path, percent-decoded.
    pub path: &'a str,
    /// The query pairs, percent-decoded (`+` is not a space here).
    pub query: &'a [(String, String)],
    /// Header names (any case) and values.
    pub headers: &'a [(String, String)],
}

/// The headers signed when the auth string lists none.
const DEFAULT_SIGNED: [&str; 4] = ["host", "content-length", "content-type", "content-md5"];

/// The canonical request: `METHOD\nURI\nQUERY\nHEADERS`, with the headers named in `names`.
#[must_use]
pub fn canonical_request(request: &SignedRequest<'_>, names: &[String]) -> String {
    let uri = encode(request.path, true);
    let mut query: Vec<String> = request
        .query
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
        .map(|(k, v)| format!("{}={}", encode(k, false), encode(v, false)))
        .collect();
    query.sort();
    let mut headers: Vec<String> = request
        .headers
        .iter()
        .filter_map(|(name, value)| {
            let lower = name.to_ascii_lowercase();
            let value = value.trim();
            (names.contains(&lower) && !value.is_empty())
                .then(|| format!("{}:{}", encode(&lower, false), encode(value, false)))
        })
        .collect();
    headers.sort();
    format!("{}\n{uri}\n{}\n{}", request.method.to_ascii_uppercase(), query.join("&"), headers.join("\n"))
}

/// The header sets a client may have signed. With no list, Baidu's default set plus the
/// `x-bce-*` headers. With a list, the list as it is (most clients), or the list plus every
/// `x-bce-*` header present (docs/baidu.md's table of signed headers).
fn candidate_header_sets(auth: &AuthString, headers: &[(String, String)]) -> Vec<Vec<String>> {
    let bce: Vec<String> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .filter(|(n, v)| n.starts_with("x-bce-") && !v.trim().is_empty())
        .map(|(n, _)| n)
        .collect();
    if auth.signed_headers.is_empty() {
        let mut set: Vec<String> = DEFAULT_SIGNED.iter().map(|s| (*s).to_owned()).collect();
        set.extend(bce);
        return vec![set];
    }
    let listed = auth.signed_headers.clone();
    let mut extended = listed.clone();
    extended.extend(bce.into_iter().filter(|h| !listed.contains(h)));
    if extended.len() == listed.len() { vec![listed] } else { vec![listed, extended] }
}

/// Verifies `auth` against `request` with the secret key `sk` at time `now` (epoch seconds).
///
/// # Errors
/// `Expired` outside the validity window, `Mismatch` for a wrong signature.
pub fn verify(auth: &AuthString, sk: &str, request: &SignedRequest<'_>, now: i64) -> Result<(), AuthError> {
    if auth.signed_at > now.saturating_add(MAX_FUTURE_SECS) {
        return Err(AuthError::Expired(format!(
            "the authentication timestamp {} is more than 15 minutes in the future",
            auth.timestamp
        )));
    }
    if now > auth.signed_at.saturating_add(auth.expiry) {
        return Err(AuthError::Expired(format!(
            "the signature made at {} expired after {} seconds",
            auth.timestamp, auth.expiry
        )));
    }
    let key = signing_key(sk, &auth.ak, &auth.timestamp, auth.expiry);
    let mut matched = 0u8;
    for names in candidate_header_sets(auth, request.headers) {
        let expected = hmac_sha256_hex(key.as_bytes(), &canonical_request(request, &names));
        matched |= expected.as_bytes().ct_eq(auth.signature.as_bytes()).unwrap_u8();
    }
    if matched == 1 { Ok(()) } else { Err(AuthError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(sk: &str, auth_prefix: (&str, &str, i64), request: &SignedRequest<'_>, names: &[&str]) -> String {
        let (ak, ts, expiry) = auth_prefix;
        let key = signing_key(sk, ak, ts, expiry);
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        hmac_sha256_hex(key.as_bytes(), &canonical_request(request, &names))
    }

    #[test]
    fn contract_test_vector() {
        assert_eq!(
            signing_key("SK_TEST", "AK_TEST", "2024-01-02T03:04:05Z", 1800),
            "dadafce4db8f637109a4a5b52699a35485929bb6d7916616a334e5d0d3c2da2e"
        );
    }

    /// Baidu's documented example ("Generate Authentication String", the BOS UploadPart
    /// request): the expected signature was computed with `bce-python-sdk`'s own
    /// `bce_v1_signer.sign` on the documented request.
    #[test]
    fn baidu_documented_example() {
        let headers: Vec<(String, String)> = [
            ("Host", "bj.bcebos.com"),
            ("Content-Length", "8"),
            ("Content-MD5", "NFzcPqhviddjRNnSOGo4rw=="),
            ("Content-Type", "text/plain"),
            ("x-bce-date", "2015-04-27T08:23:49Z"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let query = vec![
            ("partNumber".to_owned(), "9".to_owned()),
            ("uploadId".to_owned(), "a44cc9bab11cbd156984767aad637851".to_owned()),
        ];
        let request =
            SignedRequest { method: "PUT", path: "/test/myfolder/readme.txt", query: &query, headers: &headers };
        let header = format!(
            "bce-auth-v1/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/2015-04-27T08:23:49Z/1800/content-length;content-md5;content-type;host;x-bce-date/{}",
            BAIDU_EXAMPLE_SIGNATURE
        );
        let auth = parse(&header).unwrap();
        assert_eq!(verify(&auth, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", &request, auth.signed_at + 60), Ok(()));
        assert_eq!(
            canonical_request(&request, &auth.signed_headers),
            "PUT\n/test/myfolder/readme.txt\npartNumber=9&uploadId=a44cc9bab11cbd156984767aad637851\n\
             content-length:8\ncontent-md5:NFzcPqhviddjRNnSOGo4rw%3D%3D\ncontent-type:text%2Fplain\n\
             host:bj.bcebos.com\nx-bce-date:2015-04-27T08%3A23%3A49Z"
        );
    }

    const BAIDU_EXAMPLE_SIGNATURE: &str = "1816c10fce34ba9c9825eddc05fd6058bf82e05fefeddee8da6f869486ea68c0";

    type Pairs = Vec<(String, String)>;

    fn request_parts() -> (Pairs, Pairs) {
        let headers = vec![
            ("host".to_owned(), "127.0.0.1:8080".to_owned()),
            ("content-length".to_owned(), "17".to_owned()),
            ("x-bce-date".to_owned(), "2024-01-02T03:04:05Z".to_owned()),
            ("x-bce-request-id".to_owned(), String::new()),
            ("accept".to_owned(), "*/*".to_owned()),
        ];
        let query = vec![("id".to_owned(), String::new()), ("site".to_owned(), "example.com".to_owned())];
        (headers, query)
    }

    #[test]
    fn python_sdk_variant_empty_signed_headers() {
        let (headers, query) = request_parts();
        let request = SignedRequest { method: "GET", path: "/v2/geo/cache/purge", query: &query, headers: &headers };
        let sig = sign("SK", ("AK", "2024-01-02T03:04:05Z", 1800), &request, &["host", "content-length", "x-bce-date"]);
        let auth = parse(&format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/1800//{sig}")).unwrap();
        let now = auth.signed_at + 10;
        assert_eq!(verify(&auth, "SK", &request, now), Ok(()));
        assert_eq!(verify(&auth, "WRONG", &request, now), Err(AuthError::Mismatch));
        let tampered = vec![("id".to_owned(), "7".to_owned()), ("site".to_owned(), "example.com".to_owned())];
        let request = SignedRequest { query: &tampered, ..request };
        assert_eq!(verify(&auth, "SK", &request, now), Err(AuthError::Mismatch));
    }

    #[test]
    fn listed_headers_without_x_bce_date() {
        let (headers, query) = request_parts();
        let request = SignedRequest { method: "POST", path: "/v2/cache/purge", query: &query, headers: &headers };
        let sig = sign("SK", ("AK", "2024-01-02T03:04:05Z", 1800), &request, &["host"]);
        let auth = parse(&format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/1800/host/{sig}")).unwrap();
        assert_eq!(verify(&auth, "SK", &request, auth.signed_at), Ok(()));
    }

    #[test]
    fn go_sdk_variant_sorted_list_with_x_bce_date() {
        let (headers, query) = request_parts();
        let request = SignedRequest { method: "POST", path: "/v2/cache/purge", query: &query, headers: &headers };
        let sig = sign("SK", ("AK", "2024-01-02T03:04:05Z", 1800), &request, &["host", "x-bce-date"]);
        let auth = parse(&format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/1800/host;x-bce-date/{sig}")).unwrap();
        assert_eq!(verify(&auth, "SK", &request, auth.signed_at), Ok(()));
    }

    #[test]
    fn time_window() {
        let (headers, query) = request_parts();
        let request = SignedRequest { method: "GET", path: "/", query: &query, headers: &headers };
        let sig = sign("SK", ("AK", "2024-01-02T03:04:05Z", 1800), &request, &["host", "content-length", "x-bce-date"]);
        let auth = parse(&format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/1800//{sig}")).unwrap();
        assert!(matches!(verify(&auth, "SK", &request, auth.signed_at + 1801), Err(AuthError::Expired(_))));
        assert!(matches!(verify(&auth, "SK", &request, auth.signed_at - 16 * 60), Err(AuthError::Expired(_))));
        assert_eq!(verify(&auth, "SK", &request, auth.signed_at - 14 * 60), Ok(()));
    }

    #[test]
    fn malformed_headers() {
        assert!(matches!(parse("Bearer x"), Err(AuthError::Missing(_))));
        assert!(matches!(parse("bce-auth-v1/AK/2024-01-02T03:04:05Z/1800"), Err(AuthError::Malformed(_))));
        assert!(matches!(
            parse(&format!("bce-auth-v1/AK/yesterday/1800//{}", "a".repeat(64))),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            parse(&format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/-5//{}", "a".repeat(64))),
            Err(AuthError::Malformed(_))
        ));
    }

    /// An expiry of i64::MAX once overflowed `signed_at + expiry` (a panic in debug builds); any
    /// expiry above the documented maximum is refused before any arithmetic is done with it.
    #[test]
    fn huge_expiry_is_refused_and_extreme_clocks_do_not_overflow() {
        let sig = "a".repeat(64);
        for expiry in ["9223372036854775807", "604801", "99999999999999999999999", "0"] {
            let header = format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/{expiry}//{sig}");
            assert!(matches!(parse(&header), Err(AuthError::Malformed(_))), "{expiry}");
        }
        let auth = parse(&format!("bce-auth-v1/AK/2024-01-02T03:04:05Z/{MAX_EXPIRY_SECS}//{sig}")).unwrap();
        let request = SignedRequest { method: "GET", path: "/", query: &[], headers: &[] };
        assert!(matches!(verify(&auth, "SK", &request, i64::MAX), Err(AuthError::Expired(_))));
        assert!(matches!(verify(&auth, "SK", &request, i64::MIN), Err(AuthError::Expired(_))));
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("a b/c~d*é", true), "a%20b/c~d%2A%C3%A9");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }
}
