//! Counters: the hourly item counters (`item_counts`), which make a window's total exact without
//! counting its rows and let a deep page skip whole hours; and the rate-limit counters
//! (`rate_windows`) of instances that share a database.

use crate::backend::{Backend, SqlStore};
use crate::sql::{Db, Sql, SqlWriter, unavailable};
use cachectl_core::AccountName;
use cachectl_core::store::Counters;
use cachectl_core::{Kind, StoreResult, WindowQuery};

/// The bucket of the `item_counts` table: one hour.
pub(crate) const HOUR_MS: i64 = 3_600_000;

/// A half-open range `[start, end)`.
pub(crate) type Span = (i64, i64);

/// Adds `?4` items of account `?1` and kind `?2` to hour `?3`.
const COUNT_ITEMS: &str = "INSERT INTO item_counts (account, kind, hour, n) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (account, kind, hour) DO UPDATE SET n = item_counts.n + excluded.n";

/// Adds `?4` requests to the count of credential `?1` on endpoint `?2` in minute `?3`, and
/// returns the count.
const COUNT_REQUESTS: &str = "INSERT INTO rate_windows (credential, api_id, minute, count) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (credential, api_id, minute) DO UPDATE SET count = rate_windows.count + EXCLUDED.count
             RETURNING count";

/// Counts `n` new items of `account` and `kind` created at `created_at`.
pub(crate) async fn count_items<DB: Db>(
    conn: &mut DB::Connection,
    account: &AccountName,
    kind: Kind,
    created_at: i64,
    n: i64,
) -> StoreResult<()> {
    let args = [account.into(), kind.as_str().into(), created_at.div_euclid(HOUR_MS).into(), n.into()];
    Sql::<DB>::new().template(COUNT_ITEMS, &args).execute(conn).await?;
    Ok(())
}

/// On a database that instances share, the count including these `n`.
#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> Counters for SqlStore<DB, B> {
    async fn count_requests(&self, credential: &str, api_id: u32, minute: i64, n: u32) -> StoreResult<Option<u64>> {
        if !B::SHARED_COUNTERS {
            return Ok(None);
        }
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        let args = [credential.into(), i64::from(api_id).into(), minute.into(), i64::from(n).into()];
        let row = Sql::<DB>::new().template(COUNT_REQUESTS, &args).row(&mut conn).await?;
        let count = row.map_or(0, |row| DB::int(&row, 0));
        Ok(Some(u64::try_from(count).unwrap_or(0)))
    }
}

/// From this offset on, a window page first skips whole hours by their counters
/// (`skip_hours`).
pub(crate) const DEEP_PAGE: i64 = 1_000;

/// Writes the exact number of items in a window as one SQL expression: whole hours from the
/// hourly counters, the partial hours at the edges counted on the index (one URL: counted on its
/// index).
pub(crate) fn write_window_total<'a, W: SqlWriter<'a>>(w: &mut W, query: &'a WindowQuery<'a>) {
    let count = |w: &mut W, from: i64, to: i64| {
        w.sql("(SELECT COUNT(*) FROM items WHERE account = ").text(query.account.as_str()).sql(" AND kind = ");
        w.text(query.kind.as_str());
        if let Some(url) = query.url {
            w.sql(" AND url = ").text(url);
        }
        w.sql(" AND created_at >= ").int(from).sql(" AND created_at < ").int(to).sql(")");
    };
    if query.url.is_some() {
        count(w, query.from.millis(), query.to.millis());
        return;
    }
    let (hours, edges) = split_window(query.from.millis(), query.to.millis());
    let mut parts = 0;
    if let Some((first, end)) = hours {
        w.sql("COALESCE((SELECT SUM(n) FROM item_counts WHERE account = ").text(query.account.as_str());
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
