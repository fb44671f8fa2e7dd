//! Per-credential, per-endpoint request limits in fixed one-minute windows aligned to the wall
//! clock, as the Baishan headers describe them (`X-Ratelimit-Grad: minute`). Counted in the store
//! when it is shared by several instances (PostgreSQL), so that a limit holds across them, in
//! reservations of up to 1 % of the limit so that a busy credential does not turn every request
//! into a write on one row; in memory otherwise (SQLite serves one process).

use crate::{Store, Timestamp};
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

const WINDOW_MS: i64 = 60_000;

/// Counts requests per key in the current minute.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<(String, u32), (i64, u32)>>,
    reserved: Mutex<HashMap<(String, u32), Reserved>>,
}

/// Requests of one key that this instance counted in the shared store ahead of time.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    /// The minute (epoch minutes) they belong to.
    window: i64,
    /// Reserved and not used yet.
    left: u64,
    /// The store's count after the latest reservation.
    counted: u64,
}

impl RateLimiter {
    /// Seconds until the window containing `now` ends.
    #[must_use]
    pub fn reset_secs(now: Timestamp) -> u64 {
        let left = WINDOW_MS - now.millis().rem_euclid(WINDOW_MS);
        u64::try_from((left + 999) / 1000).unwrap_or(60).max(1)
    }

    /// How many requests an instance counts in the shared store at once under `limit`: one
    /// (every request counted exactly) up to a limit of 199 per minute, then 1 % of the limit,
    /// at most 100. The limit still holds across instances; an instance may refuse a request
    /// while others hold unused reservations, at most 1 % of the limit each.
    #[must_use]
    pub fn reservation(limit: u32) -> u32 {
        (limit / 100).clamp(1, 100)
    }

    /// Counts one request of `credential` on endpoint `api_id` against `limit` per minute, in
    /// the store if it counts requests (by reservations of `reservation(limit)` requests), else
    /// in memory. A store that fails to count lets the request through on the local count: an
    /// outage must not turn into a wall of 429s.
    pub async fn check_shared(
        &self,
        store: &dyn Store,
        credential: &str,
        api_id: u32,
        limit: u32,
        now: Timestamp,
    ) -> Decision {
        let window = now.millis().div_euclid(WINDOW_MS);
        let reset_secs = Self::reset_secs(now);
        let decision = |allowed: bool, used: u64| Decision {
            allowed,
            limit,
            remaining: u32::try_from(u64::from(limit).saturating_sub(used)).unwrap_or(0),
            reset_secs,
        };
        {
            let mut reserved = self.reserved.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(r) = reserved.get_mut(&(credential.to_owned(), api_id))
                && r.window == window
                && r.left > 0
            {
                r.left -= 1;
                return decision(true, r.counted - r.left);
            }
        }
        let digest = hex::encode(Sha256::digest(credential.as_bytes()));
        let chunk = Self::reservation(limit);
        match store.count_requests(&digest, api_id, window, chunk).await {
            Ok(Some(count)) => {
                // This reservation holds the requests numbered (count - chunk, count]; those up
                // to the limit may proceed.
                let before = count.saturating_sub(u64::from(chunk));
                let granted = count.min(u64::from(limit)).saturating_sub(before);
                if granted == 0 {
                    return decision(false, u64::from(limit));
                }
                let mut reserved = self.reserved.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if reserved.len() > 100_000 {
                    reserved.retain(|_, r| r.window == window);
                }
                let r =
                    reserved.entry((credential.to_owned(), api_id)).or_insert(Reserved { window, left: 0, counted: 0 });
                if r.window != window {
                    *r = Reserved { window, left: 0, counted: 0 };
                }
                r.left += granted - 1;
                r.counted = r.counted.max(count);
                decision(true, r.counted - r.left)
            }
            Ok(None) => self.check(credential, api_id, limit, now),
            Err(e) => {
                tracing::warn!(error = %e, "Counting a request in the store failed; using the local count.");
                self.check(credential, api_id, limit, now)
            }
        }
    }

    /// Counts one request of `credential` on endpoint `api_id` against `limit` per minute, in memory.
    pub fn check(&self, credential: &str, api_id: u32, limit: u32, now: Timestamp) -> Decision {
        let window = now.millis().div_euclid(WINDOW_MS);
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
    fn reservations_are_one_request_up_to_small_limits_then_one_percent() {
        assert_eq!(RateLimiter::reservation(1), 1);
        assert_eq!(RateLimiter::reservation(199), 1);
        assert_eq!(RateLimiter::reservation(300), 3);
        assert_eq!(RateLimiter::reservation(1_000_000), 100);
    }

    #[test]
    fn limits_per_key_and_window() {
        let limiter = RateLimiter::default();
        let t0 = Timestamp::from_millis(1_700_000_020_000); // 40 s into a minute
        for i in 0..3 {
            let d = limiter.check("tok", 1, 3, t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, 2 - i);
            assert_eq!(d.reset_secs, 20);
        }
        assert!(!limiter.check("tok", 1, 3, t0).allowed);
        assert!(limiter.check("tok", 2, 3, t0).allowed, "another endpoint has its own budget");
        assert!(limiter.check("other", 1, 3, t0).allowed, "another token has its own budget");
        assert!(limiter.check("tok", 1, 3, t0.plus_millis(20_000)).allowed, "a new minute starts afresh");
    }
}
