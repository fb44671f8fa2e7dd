//! Parsed domain values: a time, a task id, an account's name, a quota day and an accepted URL.
//! Each is made once, where the value enters (a request, a row, the clock), and is then passed
//! around as itself instead of as the `i64` or `String` it is stored as.

use chrono::{FixedOffset, TimeZone};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A moment: milliseconds since the Unix epoch, UTC. Every time in the store and the domain is one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Self = Self(0);

    /// The moment `millis` milliseconds after the epoch (before it, if negative).
    #[must_use]
    pub const fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the epoch.
    #[must_use]
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// `d` later, saturating at the end of time.
    #[must_use]
    pub fn after(self, d: Duration) -> Self {
        Self(self.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }

    /// `d` earlier, saturating at the beginning of time.
    #[must_use]
    pub fn before(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }

    /// `millis` milliseconds later (earlier if negative), saturating.
    #[must_use]
    pub const fn plus_millis(self, millis: i64) -> Self {
        Self(self.0.saturating_add(millis))
    }

    /// Milliseconds from `earlier` to `self` (negative if `earlier` is later).
    #[must_use]
    pub const fn millis_since(self, earlier: Self) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The time from `earlier` to `self`; zero if `earlier` is later.
    #[must_use]
    pub fn since(self, earlier: Self) -> Duration {
        Duration::from_millis(u64::try_from(self.millis_since(earlier)).unwrap_or(0))
    }
}

/// A task's id, as the store numbered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(i64);

impl TaskId {
    /// The id the store gave a task.
    #[must_use]
    pub const fn new(id: i64) -> Self {
        Self(id)
    }

    /// The id as stored.
    #[must_use]
    pub const fn get(self) -> i64 {
        self.0
    }

    /// A task id as a client writes it: a positive decimal integer. `None` for anything else,
    /// which no task has.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        text.parse::<i64>().ok().filter(|id| *id > 0).map(Self)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An account's name: what owns tasks, quotas and records.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountName(String);

impl AccountName {
    /// The name as configured.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for AccountName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The day a quota charge counts against: `YYYY-MM-DD` in the quota time zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaDay(String);

impl QuotaDay {
    /// The day in `zone` containing `at`.
    #[must_use]
    pub fn of(at: Timestamp, zone: &FixedOffset) -> Self {
        let day = zone.timestamp_millis_opt(at.millis()).single().map(|t| t.format("%Y-%m-%d").to_string());
        // Out of chrono's range (about 262,000 years): no clock gives such a time.
        Self(day.unwrap_or_else(|| "0000-00-00".to_owned()))
    }

    /// `YYYY-MM-DD`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QuotaDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A URL accepted for an account: normalized (fragment removed, percent-encoded), with its host
/// lowercase and without port. Made only by `policy::parse_item`, or from a stored row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemUrl {
    url: String,
    host: String,
}

impl ItemUrl {
    /// A URL that was accepted before: `policy::parse_item` made it, and the store kept it.
    #[must_use]
    pub fn accepted(url: String, host: String) -> Self {
        Self { url, host }
    }

    /// The URL.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// Its host: what domains and edge nodes are matched against.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl fmt::Display for ItemUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_positive_decimal_numbers() {
        assert_eq!(TaskId::parse("42"), Some(TaskId::new(42)));
        assert_eq!(TaskId::parse("+7"), Some(TaskId::new(7)));
        for bad in ["", "0", "-1", "1e3", " 1", "99999999999999999999"] {
            assert_eq!(TaskId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quota_days_follow_the_zone() {
        let at = Timestamp::from_millis(1_700_000_000_000); // 2023-11-14T22:13:20Z
        let utc = FixedOffset::east_opt(0).unwrap();
        assert_eq!(QuotaDay::of(at, &utc).as_str(), "2023-11-14");
        let beijing = FixedOffset::east_opt(8 * 3600).unwrap();
        assert_eq!(QuotaDay::of(at, &beijing).as_str(), "2023-11-15");
        assert_eq!(QuotaDay::of(Timestamp::from_millis(i64::MAX), &utc).as_str(), "0000-00-00");
    }

    #[test]
    fn timestamps_saturate() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t.after(Duration::from_millis(500)).millis(), 1_500);
        assert_eq!(Timestamp::from_millis(i64::MAX).after(Duration::MAX).millis(), i64::MAX);
        assert_eq!(t.since(Timestamp::from_millis(400)), Duration::from_millis(600));
        assert_eq!(Timestamp::from_millis(400).since(t), Duration::ZERO);
    }
}
