//! Storage backends behind `cachectl_core::Store`. The backend is chosen by the scheme of
//! `store.url`; each backend owns its SQL and its migrations, and knows nothing of dialects.

pub mod postgres;
mod rows;
mod shared;
pub mod sqlite;
mod sqlite_read;

use cachectl_core::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// The bucket of the `item_counts` table: one hour.
pub(crate) const HOUR_MS: i64 = 3_600_000;

/// A half-open range `[start, end)`.
pub(crate) type Span = (i64, i64);

/// Splits the window `[from, to)` into the whole hours it covers, `[first, end)` as hour numbers,
/// and the partial stretches at its edges (in milliseconds), which are counted row by row.
pub(crate) fn split_window(from: i64, to: i64) -> (Option<Span>, Vec<Span>) {
    let first = from.div_euclid(HOUR_MS) + i64::from(from.rem_euclid(HOUR_MS) != 0);
    let end = to.div_euclid(HOUR_MS);
    if first >= end {
        return (None, if from < to { vec![(from, to)] } else { Vec::new() });
    }
    let mut edges = Vec::new();
    if from < first * HOUR_MS {
        edges.push((from, first * HOUR_MS));
    }
    if end * HOUR_MS < to {
        edges.push((end * HOUR_MS, to));
    }
    (Some((first, end)), edges)
}

/// A statement being written with its bound values: sqlx's `QueryBuilder` on PostgreSQL, and
/// `sqlite_read::Statement` for SQLite's rusqlite read path, so that SQL both need is written once.
pub(crate) trait SqlWriter<'a> {
    /// Appends SQL text.
    fn sql(&mut self, text: &str) -> &mut Self;
    /// Appends a placeholder bound to an integer.
    fn int(&mut self, value: i64) -> &mut Self;
    /// Appends a placeholder bound to a text.
    fn text(&mut self, value: &'a str) -> &mut Self;
}

/// Writes the exact number of items in a window as one SQL expression: whole hours from the
/// hourly counters, the partial hours at the edges counted on the index (one URL: counted on its
/// index).
pub(crate) fn write_window_total<'a, W: SqlWriter<'a>>(w: &mut W, query: &'a cachectl_core::WindowQuery<'a>) {
    let count = |w: &mut W, from: i64, to: i64| {
        w.sql("(SELECT COUNT(*) FROM items WHERE account = ").text(query.account).sql(" AND kind = ");
        w.text(query.kind.as_str());
        if let Some(url) = query.url {
            w.sql(" AND url = ").text(url);
        }
        w.sql(" AND created_at >= ").int(from).sql(" AND created_at < ").int(to).sql(")");
    };
    if query.url.is_some() {
        count(w, query.from, query.to);
        return;
    }
    let (hours, edges) = split_window(query.from, query.to);
    let mut parts = 0;
    if let Some((first, end)) = hours {
        w.sql("COALESCE((SELECT SUM(n) FROM item_counts WHERE account = ").text(query.account);
        w.sql(" AND kind = ").text(query.kind.as_str());
        w.sql(" AND hour >= ").int(first).sql(" AND hour < ").int(end).sql("), 0)");
        parts += 1;
    }
    for (from, to) in edges {
        if parts > 0 {
            w.sql(" + ");
        }
        count(w, from, to);
        parts += 1;
    }
    if parts == 0 {
        w.sql("0");
    }
}

/// From this offset on, a window page first skips whole hours by their counters (`skip_hours`).
pub(crate) const DEEP_PAGE: i64 = 1_000;

/// Moves a deep window page's starting point down the window by whole hours: the items of the
/// partial hour at the top (`top`: its start and count) and of each whole hour (`hours`: hour
/// number and count, newest first) are skipped by their counts, the same counters that make a
/// window's total exact, while they fit in `offset`. Returns the new upper bound of the window
/// and what is left of the offset, so that the page query skips at most about an hour of index
/// entries instead of the whole offset. An hour without a counter holds no items.
pub(crate) fn skip_hours(
    to: i64,
    top: Option<(i64, i64)>,
    hours: impl IntoIterator<Item = (i64, i64)>,
    offset: i64,
) -> (i64, i64) {
    let (mut upper, mut rest) = (to, offset);
    if let Some((start, n)) = top {
        if n > rest {
            return (upper, rest);
        }
        rest -= n;
        upper = start;
    }
    for (hour, n) in hours {
        if n > rest {
            break;
        }
        rest -= n;
        upper = hour * HOUR_MS;
    }
    (upper, rest)
}

/// Opens the store named by `url`: `sqlite://path/to/file.db` (or `sqlite::memory:`), or
/// `postgres://user@host:port/db`. With `migrate`, brings the schema up to date first; either
/// way a schema newer than this binary is refused.
///
/// # Errors
/// An unsupported scheme, or the backend failing to open or migrate.
pub async fn open(url: &str, migrate: bool) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, migrate, Connections::default()).await
}

/// How long an operation waits for a database connection by default.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// PostgreSQL connections of one instance by default.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How the store holds its database connections (`[store]` of the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    /// How long an operation may wait for a connection (for PostgreSQL: while the database is
    /// down, operations fail after this instead of hanging).
    pub acquire_timeout: Duration,
    /// PostgreSQL: the size of each of the two pools (the dialects' record queries, and
    /// everything else; so at most twice this many connections); requests beyond a pool's size
    /// wait for a connection in turn. PostgreSQL runs a backend process per connection; more
    /// connections than the database's cores can run at once only make them take turns
    /// (BENCHMARKS.md round 7). SQLite ignores it (one writer connection, a fixed set of readers).
    pub max_connections: u32,
}

impl Default for Connections {
    fn default() -> Self {
        Self { acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT, max_connections: DEFAULT_MAX_CONNECTIONS }
    }
}

/// `open`, with the connections' settings.
///
/// # Errors
/// As `open`.
pub async fn open_with(url: &str, migrate: bool, connections: Connections) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url, migrate).await?));
    }
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        return Ok(Arc::new(PgStore::open(url, migrate, connections).await?));
    }
    Err(StoreError::Unavailable("store.url: unsupported scheme; use sqlite:// or postgres://".into()))
}

/// The record queries whose plans `explain` checks: every filter the Baidu dialects use.
pub(crate) fn sample_record_queries(
    account: &str,
    (from, to): (i64, i64),
) -> Vec<(&'static str, cachectl_core::RecordQuery<'_>)> {
    let base = cachectl_core::RecordQuery {
        account,
        kind: cachectl_core::Kind::Refresh,
        task_id: None,
        from,
        to,
        site: None,
        url: None,
        item_type: None,
        after: None,
        limit: 101,
    };
    vec![
        ("records: window and marker", cachectl_core::RecordQuery { after: Some((0, 0)), ..base.clone() }),
        ("records: site", cachectl_core::RecordQuery { site: Some("example.com"), ..base.clone() }),
        (
            "records: task id",
            cachectl_core::RecordQuery { task_id: Some(1), site: Some("example.com"), ..base.clone() },
        ),
        ("records: one URL", cachectl_core::RecordQuery { url: Some("http://x/"), after: Some((0, 0)), ..base }),
    ]
}

/// A worker report whose batched statements `explain` checks: a failed final transition, which
/// runs all three (the item, its followers, its dependents).
pub(crate) fn sample_update() -> cachectl_core::ItemUpdate {
    cachectl_core::ItemUpdate {
        item_id: 1,
        status: cachectl_core::ItemStatus::Failed,
        progress: 50,
        started_at: Some(1),
        finished_at: Some(2),
        reason: Some("node a: 500".into()),
        nodes: Vec::new(),
    }
}

/// Whether `url` names a backend this build supports.
#[must_use]
pub fn supported(url: &str) -> bool {
    ["sqlite:", "postgres:", "postgresql:"].iter().any(|scheme| url.starts_with(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_pages_skip_the_hours_that_fit_in_the_offset() {
        let h = HOUR_MS;
        // Top edge of 30 items from 10 h, then hours 9, 8, 7 with 100, 0 (no row), 50 items.
        let hours = [(9, 100), (7, 50)];
        assert_eq!(skip_hours(10 * h + 5, Some((10 * h, 30)), hours, 20), (10 * h + 5, 20), "inside the top edge");
        assert_eq!(skip_hours(10 * h + 5, Some((10 * h, 30)), hours, 1000), (7 * h, 820));
        assert_eq!(skip_hours(10 * h + 5, Some((10 * h, 30)), hours, 150), (9 * h, 20), "inside hour 7");
        assert_eq!(skip_hours(10 * h, None, hours, 100), (9 * h, 0));
    }

    #[test]
    fn windows_split_into_hours_and_edges() {
        let h = HOUR_MS;
        assert_eq!(split_window(0, 24 * h), (Some((0, 24)), vec![]));
        assert_eq!(split_window(10, 3 * h + 5), (Some((1, 3)), vec![(10, h), (3 * h, 3 * h + 5)]));
        assert_eq!(split_window(10, 20), (None, vec![(10, 20)]));
        assert_eq!(split_window(h - 1, h + 1), (None, vec![(h - 1, h + 1)]));
        assert_eq!(split_window(5, 5), (None, vec![]));
    }
}
