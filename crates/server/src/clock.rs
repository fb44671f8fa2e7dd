//! The wall clock, read in one place: every timestamp the service stores or sends is
//! milliseconds since the Unix epoch.

use cachectl_core::Timestamp;

/// Milliseconds since the epoch, now.
#[must_use]
pub fn now_ms() -> Timestamp {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp::from_millis(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}
