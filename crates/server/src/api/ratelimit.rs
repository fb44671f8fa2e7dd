//! Per-credential, per-endpoint request limits in fixed one-minute windows aligned to the wall
//! clock, as the Baishan headers describe them (`X-Ratelimit-Grad: minute`). Counted in the store
//! when it is shared by several instances (PostgreSQL), so that a limit holds across them;
//! in memory otherwise (SQLite serves one process).

use cachectl_core::{Millis, Store};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The limit per window.
    pub limit: u32,
    /// Requests left in the current window after this one.
    pub remaining: u32,
    /// Whole seconds until the current window resets (at least 1).
    pub reset_secs: u64,
}

const WINDOW_MS: Millis = 60_000;

/// Counts requests per key in the current minute.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<(String, u32), (Millis, u32)>>,
}

impl RateLimiter {
    /// Seconds until the window containing `now` ends.
    #[must_use]
    pub fn reset_secs(now: Millis) -> u64 {
        let left = WINDOW_MS - now.rem_euclid(WINDOW_MS);
        u64::try_from((left + 999) / 1000).unwrap_or(60).max(1)
    }

    /// Counts one request of `credential` on endpoint `api_id` against `limit` per minute, in
    /// the store if it counts requests, else in memory. A store that fails to count lets the
    /// request through on the local count: an outage must not turn into a wall of 429s.
    pub async fn check_shared(
        &self,
        store: &dyn Store,
        credential: &str,
        api_id: u32,
        limit: u32,
        now: Millis,
    ) -> Decision {
        let digest = hex::encode(Sha256::digest(credential.as_bytes()));
        match store.count_request(&digest, api_id, now.div_euclid(WINDOW_MS)).await {
            Ok(Some(count)) => {
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                Decision {
                    allowed: count <= limit,
                    limit,
                    remaining: limit.saturating_sub(count),
                    reset_secs: Self::reset_secs(now),
                }
            }
            Ok(None) => self.check(credential, api_id, limit, now),
            Err(e) => {
                tracing::warn!(error = %e, "Counting a request in the store failed; using the local count.");
                self.check(credential, api_id, limit, now)
            }
        }
    }

    /// Counts one request of `credential` on endpoint `api_id` against `limit` per minute, in memory.
    pub fn check(&self, credential: &str, api_id: u32, limit: u32, now: Millis) -> Decision {
        let window = now.div_euclid(WINDOW_MS);
        let reset_secs = Self::reset_secs(now);
        let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() > 100_000 {
            windows.retain(|_, (w, _)| *w == window);
        }
        let entry = windows.entry((credential.to_owned(), api_id)).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        if entry.1 >= limit {
            return Decision { allowed: false, limit, remaining: 0, reset_secs };
        }
        entry.1 += 1;
        Decision { allowed: true, limit, remaining: limit - entry.1, reset_secs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key_and_window() {
        let limiter = RateLimiter::default();
        let t0 = 1_700_000_020_000; // 40 s into a minute
        for i in 0..3 {
            let d = limiter.check("tok", 1, 3, t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, 2 - i);
            assert_eq!(d.reset_secs, 20);
        }
        assert!(!limiter.check("tok", 1, 3, t0).allowed);
        assert!(limiter.check("tok", 2, 3, t0).allowed, "another endpoint has its own budget");
        assert!(limiter.check("other", 1, 3, t0).allowed, "another token has its own budget");
        assert!(limiter.check("tok", 1, 3, t0 + 20_000).allowed, "a new minute starts afresh");
    }
}
