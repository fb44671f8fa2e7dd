//! Console sessions: a random 256-bit id in an HttpOnly, SameSite=Strict cookie maps, in this
//! process's memory, to the signed-in credential and the session's CSRF token. Sessions end on
//! sign-out, after an idle period, or when the process stops; they are not shared between
//! instances (docs/console.md).

use crate::auth::Credential;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use rand::RngCore as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq as _;

/// The session cookie's name.
pub const COOKIE: &str = "cachectl_console";

/// How long a session lives without a request.
pub const IDLE: Duration = Duration::from_secs(30 * 60);

/// Sessions held at most (signed in or not); past it new ones are refused until some expire.
const MAX_SESSIONS: usize = 100_000;

/// One session: anonymous (only a CSRF token, for the sign-in form) or signed in.
#[derive(Clone)]
pub struct Session {
    /// The session id (the cookie's value).
    pub id: String,
    /// The signed-in caller; `None` before sign-in.
    pub credential: Option<Credential>,
    /// The SHA-256 of the token signed in with: every request checks that it still works
    /// (not revoked, expired, or its account disabled).
    token: Option<crate::secrets::TokenHash>,
    /// The token every form of this session carries in its `csrf` field.
    pub csrf: String,
    last_seen: Instant,
}

/// The sessions of this process.
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(IDLE)
    }
}

/// 256 random bits, in hex.
fn random_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    /// Sessions that expire after `idle` without a request.
    #[must_use]
    pub fn new(idle: Duration) -> Self {
        Self { map: Mutex::new(HashMap::new()), idle }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session (with a fresh id and CSRF token); `None` when the table is full.
    pub fn create(&self, credential: Option<(Credential, crate::secrets::TokenHash)>) -> Option<Session> {
        let (credential, token) = credential.map_or((None, None), |(c, t)| (Some(c), Some(t)));
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| now.duration_since(s.last_seen) < self.idle);
            if map.len() >= MAX_SESSIONS {
                return None;
            }
        }
        let session = Session { id: random_id(), credential, token, csrf: random_id(), last_seen: now };
        map.insert(session.id.clone(), session.clone());
        Some(session)
    }

    /// The live session of `id`, its idle clock restarted; an expired one is removed.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.lock();
        let session = map.get_mut(id)?;
        if now.duration_since(session.last_seen) >= self.idle {
            map.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Whether the session `id` is live (not ended, not expired), without restarting its idle
    /// clock: an open task page's stream asks this, and is no request of the person.
    pub fn is_live(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|s| s.last_seen.elapsed() < self.idle)
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// How many sessions are held (expired ones included until they are swept).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id a request's `Cookie` headers carry, if any.
#[must_use]
pub fn cookie_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
}

/// Whether the request reached the proxy in front of cachectl over TLS: cachectl itself serves
/// plain HTTP, so `X-Forwarded-Proto: https` is the only sign (docs/console.md).
#[must_use]
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}

/// The `Set-Cookie` value that gives the browser session `id`.
#[must_use]
pub fn set_cookie(id: &str, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict{secure}"))
        .unwrap_or_else(|_| HeaderValue::from_static("cachectl_console=; Path=/console; Max-Age=0"))
}

/// The `Set-Cookie` value that removes the session cookie.
#[must_use]
pub fn clear_cookie(secure: bool) -> HeaderValue {
    if secure {
        HeaderValue::from_static("cachectl_console=; Path=/console; HttpOnly; SameSite=Strict; Secure; Max-Age=0")
    } else {
        HeaderValue::from_static("cachectl_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
    }
}

/// Whether `given` is the session's CSRF token (compared in constant time).
#[must_use]
pub fn csrf_matches(session: &Session, given: &str) -> bool {
    !given.is_empty() && session.csrf.as_bytes().ct_eq(given.as_bytes()).into()
}

/// A request from a signed-in session; anything else is sent to the sign-in page.
#[derive(Clone)]
pub struct SignedIn {
    /// The session.
    pub session: Session,
    /// Its credential.
    pub credential: Credential,
}

impl FromRequestParts<crate::api::AppState> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &crate::api::AppState) -> Result<Self, Response> {
        let to_login = || {
            // The task page's script sees a fragment request redirected here and loads the page.
            Redirect::to("/console/login").into_response()
        };
        let sessions = parts.extensions.get::<Arc<Sessions>>().cloned().ok_or_else(to_login)?;
        let id = cookie_id(&parts.headers).ok_or_else(to_login)?;
        let session = sessions.get(&id).ok_or_else(to_login)?;
        let signed_in = session.credential.as_ref().zip(session.token.as_ref());
        let (credential, token) = signed_in.ok_or_else(to_login)?;
        // A token revoked or expired, or its account disabled, ends the session at its next
        // request; a changed account (domains, quotas) is seen at once.
        let directory = state.directory.current();
        let Some(entry) = directory.token_by_hash(token, crate::clock::now_ms()) else {
            sessions.remove(&session.id);
            return Err(to_login());
        };
        let credential = Credential { address: credential.address.clone(), ..entry.credential.clone() };
        Ok(Self { session, credential })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_256_random_bits_and_distinct() {
        let sessions = Sessions::default();
        let a = sessions.create(None).unwrap();
        let b = sessions.create(None).unwrap();
        assert_eq!(a.id.len(), 64);
        assert!(a.id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, b.csrf);
        assert_ne!(a.id, a.csrf);
    }

    #[test]
    fn an_idle_session_expires_and_a_removed_one_is_gone() {
        let sessions = Sessions::new(Duration::from_millis(50));
        let a = sessions.create(None).unwrap();
        assert!(sessions.get(&a.id).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(sessions.get(&a.id).is_none());
        let b = sessions.create(None).unwrap();
        sessions.remove(&b.id);
        assert!(sessions.get(&b.id).is_none());
        assert!(sessions.get("not-a-session").is_none());
    }

    #[test]
    fn cookie_flags_follow_the_forwarded_protocol() {
        let plain = set_cookie("abc", false);
        assert_eq!(plain, "cachectl_console=abc; Path=/console; HttpOnly; SameSite=Strict");
        let tls = set_cookie("abc", true);
        assert!(tls.to_str().unwrap().ends_with("; Secure"));
        let mut headers = HeaderMap::new();
        assert!(!over_tls(&headers));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("HTTPS"));
        assert!(over_tls(&headers));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        assert!(!over_tls(&headers));
        assert!(clear_cookie(true).to_str().unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_csrf_must_match_exactly() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; cachectl_console=xyz ; b=2"));
        assert_eq!(cookie_id(&headers).as_deref(), Some("xyz"));
        let sessions = Sessions::default();
        let s = sessions.create(None).unwrap();
        assert!(csrf_matches(&s, &s.csrf));
        assert!(!csrf_matches(&s, ""));
        assert!(!csrf_matches(&s, &s.csrf[1..]));
    }
}
