//! The wall clock, read in one place: every timestamp the service stores or sends is
//! milliseconds since the Unix epoch.

use cachectl_core::Millis;

/// Milliseconds since the epoch, now.
#[must_use]
pub fn now_ms() -> Millis {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
