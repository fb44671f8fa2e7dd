//! PostgreSQL's record pages, on a pool of connections of their own (`Reads`): a page and its
//! total are one statement (one round trip).

use crate::counters::HOUR_MS;
use crate::rows::{RECORD_COLUMNS, item_columns_at, record_at};
use crate::sql::{Sql, SqlWriter, unavailable};
use cachectl_core::{AccountName, TaskId};
use cachectl_core::{ItemRecord, Kind, Page, PageRequest, RecordQuery, StoreResult, WindowQuery};
use deadpool::managed::{Metrics, Object, QueueMode, RecycleResult};
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{Connection as _, PgConnection, Postgres};
use std::time::Duration;

/// A pooled connection idle at least this long is pinged before use.
pub(crate) const PING_WHEN_IDLE: Duration = Duration::from_secs(1);

/// The connections of the record queries, apart from sqlx's pool: sqlx returns every connection
/// to its pool in a task of its own that pings the database first (a Sync message and its
/// answer; no option turns it off), so that each query cost two round trips to its backend. Here
/// a connection goes back to the pool as it is, and is pinged only when it is taken after being
/// idle `PING_WHEN_IDLE` or more (a database restart may have cut it since). A query that failed
/// drops its connection; one cancelled midway leaves unread answers on it, which sqlx's
/// `PgConnection` reads off before its next statement. See BENCHMARKS.md, "PostgreSQL record
/// pool".
pub(crate) type Reads = deadpool::managed::Pool<ReadConnections>;

/// Opens and checks the connections of `Reads`.
#[derive(Debug)]
pub(crate) struct ReadConnections(PgConnectOptions);

impl deadpool::managed::Manager for ReadConnections {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        PgConnection::connect_with(&self.0).await
    }

    async fn recycle(&self, conn: &mut Self::Type, metrics: &Metrics) -> RecycleResult<Self::Error> {
        if metrics.last_used() >= PING_WHEN_IDLE {
            conn.ping().await?;
        }
        Ok(())
    }
}

/// The record pool of the database `options`: `max_connections` connections, each operation
/// waiting at most `acquire_timeout` for one.
pub(crate) fn connect(options: PgConnectOptions, connections: crate::backend::Connections) -> StoreResult<Reads> {
    Reads::builder(ReadConnections(options))
        .max_size(connections.max_connections.max(1) as usize)
        .wait_timeout(Some(connections.acquire_timeout))
        .create_timeout(Some(connections.acquire_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        // The connection returned last is taken first: its backend process is the one most
        // likely still warm, and connections left idle are the ones pinged before use.
        .queue_mode(QueueMode::Lifo)
        .build()
        .map_err(unavailable)
}

/// Runs `q` on a connection of `reads`; a connection whose query failed is closed instead of
/// going back to the pool.
async fn run(reads: &Reads, q: &Sql<'_, Postgres>) -> StoreResult<Vec<PgRow>> {
    let mut conn = reads.get().await.map_err(unavailable)?;
    let outcome = q.rows(&mut conn).await;
    outcome.inspect_err(|_| drop(Object::take(conn)))
}

/// A task's count and one page of its items, in one round trip: one row per item, each with
/// the count (one row with NULL item columns when the page is empty). ?1 the task id, ?2 the
/// account, ?3 the kind, ?4 the limit, ?5 the offset.
fn task_page_sql() -> String {
    format!(
        "SELECT c.total, p.* FROM
               (SELECT COUNT(*) AS total FROM items WHERE task_id = ?1 AND account = ?2 AND kind = ?3) c
             LEFT JOIN LATERAL
               (SELECT {RECORD_COLUMNS} FROM items WHERE task_id = ?1 AND account = ?2 AND kind = ?3
                ORDER BY created_at DESC, id DESC LIMIT ?4 OFFSET ?5) p ON true
             ORDER BY p.created_at DESC, p.id DESC"
    )
}

/// `Backend::task_page`.
pub(crate) async fn task_page(
    reads: &Reads,
    account: &AccountName,
    kind: Kind,
    task_id: TaskId,
    page: PageRequest,
) -> StoreResult<Page<ItemRecord>> {
    let mut q = Sql::new();
    write_task_page(&mut q, account, kind, task_id, page);
    Ok(total_and_page(&run(reads, &q).await?))
}

/// Writes into `q` a page of a task's items with their count (`task_page_sql`).
pub(crate) fn write_task_page<'a>(
    q: &mut Sql<'a, Postgres>,
    account: &'a AccountName,
    kind: Kind,
    task_id: TaskId,
    page: PageRequest,
) {
    let offset = i64::try_from(page.offset()).unwrap_or(i64::MAX);
    let args = [task_id.into(), account.into(), kind.as_str().into(), i64::from(page.size).into(), offset.into()];
    q.template(&task_page_sql(), &args);
}

/// `Backend::window_page`: deep pages without a URL through `write_deep_window_page`.
pub(crate) async fn window_page(reads: &Reads, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
    let offset = i64::try_from(query.page.offset()).unwrap_or(i64::MAX);
    let mut q = Sql::new();
    match crate::counters::split_window(query.from.millis(), query.to.millis()) {
        (Some(hours), _) if query.url.is_none() && offset >= crate::counters::DEEP_PAGE => {
            write_deep_window_page(&mut q, query, hours, offset);
        }
        _ => write_window_page(&mut q, query, offset),
    }
    Ok(total_and_page(&run(reads, &q).await?))
}

/// `Backend::records`.
pub(crate) async fn records(reads: &Reads, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
    let mut q = Sql::new();
    let rows = run(reads, write_records(&mut q, query)).await?;
    let base = rows.first().map_or(0, item_columns_at::<Postgres>);
    Ok(rows.iter().map(|r| record_at::<Postgres>(r, base)).collect())
}

/// Writes into `q` a window's exact total and one page of its items, newest first, in one round
/// trip: one row per item, each with the total (one row with NULL item columns when the page is
/// empty). With an offset the page's ids are found on the index first, then only those rows are
/// read: the offset skips index entries, not table rows; without one (a first page) the rows are
/// read straight down the window's index, without looking each page id up again.
pub(crate) fn write_window_page<'a>(q: &mut Sql<'a, Postgres>, query: &'a WindowQuery<'a>, offset: i64) {
    let skip_on_index = offset > 0;
    q.sql("SELECT t.total, p.* FROM (SELECT CAST(");
    crate::counters::write_window_total(q, query);
    q.sql(" AS BIGINT) AS total) t LEFT JOIN LATERAL (SELECT ").sql(RECORD_COLUMNS).sql(if skip_on_index {
        " FROM items WHERE id IN (SELECT id FROM items WHERE account = "
    } else {
        " FROM items WHERE account = "
    });
    q.text(query.account.as_str()).sql(" AND kind = ").text(query.kind.as_str());
    if let Some(url) = query.url {
        q.sql(" AND url = ").text(url);
    }
    q.sql(" AND created_at >= ").bind(query.from.into()).sql(" AND created_at < ").bind(query.to.into());
    q.sql(" ORDER BY created_at DESC, id DESC LIMIT ").int(i64::from(query.page.size));
    if skip_on_index {
        q.sql(" OFFSET ").int(offset).sql(")");
    }
    q.sql(") p ON true ORDER BY p.created_at DESC, p.id DESC");
}

/// Writes into `q` a deep window page (no URL, `offset` ≥ `DEEP_PAGE`, whole hours `[first,
/// end)` in the window) in one statement, as `write_window_page` answers: the counters give the skip
/// that `counters::skip_hours` computes and the exact total that `write_window_total` adds up,
/// and the page then skips at most about an hour of index entries. `parts` are the top partial
/// hour and the whole hours, newest first, each with where it starts; the longest run of them
/// whose running count fits in the offset is skipped (counts never go negative, so the runs that
/// fit are a prefix): the page ends where the last of them starts (or at the window's end), after
/// skipping the rest of the offset. The total adds the bottom partial hour. See BENCHMARKS.md,
/// "PostgreSQL deep window page in one statement".
pub(crate) fn write_deep_window_page<'a>(
    q: &mut Sql<'a, Postgres>,
    query: &'a WindowQuery<'a>,
    (first, end): (i64, i64),
    offset: i64,
) {
    let (account, kind) = (query.account, query.kind.as_str());
    let top_start = end * HOUR_MS;
    q.sql("WITH parts AS (SELECT CAST(")
        .int(top_start)
        .sql(" AS BIGINT) AS start, COUNT(*) AS n FROM items WHERE account = ");
    q.text(account.as_str()).sql(" AND kind = ").text(kind);
    q.sql(" AND created_at >= ").int(top_start).sql(" AND created_at < ").bind(query.to.into());
    q.sql(" UNION ALL SELECT hour * ").sql(&HOUR_MS.to_string()).sql(", n FROM item_counts WHERE account = ");
    q.text(account.as_str()).sql(" AND kind = ").text(kind);
    q.sql(" AND hour >= ").int(first).sql(" AND hour < ").int(end);
    q.sql("), run AS (SELECT start, n, SUM(n) OVER (ORDER BY start DESC) AS skipped FROM parts)");
    q.sql(", skip AS (SELECT COALESCE(MIN(start) FILTER (WHERE skipped <= ").int(offset).sql("), ");
    q.bind(query.to.into()).sql(") AS upper, CAST(").int(offset);
    q.sql(" - COALESCE(MAX(skipped) FILTER (WHERE skipped <= ").int(offset).sql("), 0) AS BIGINT) AS rest");
    q.sql(", CAST(COALESCE(SUM(n), 0) + (SELECT COUNT(*) FROM items WHERE account = ");
    q.text(account.as_str()).sql(" AND kind = ").text(kind);
    q.sql(" AND created_at >= ").bind(query.from.into()).sql(" AND created_at < ").int(first * HOUR_MS);
    q.sql(") AS BIGINT) AS total FROM run)");
    q.sql(" SELECT s.total, p.* FROM skip s LEFT JOIN LATERAL (SELECT ").sql(RECORD_COLUMNS);
    q.sql(" FROM items WHERE id IN (SELECT id FROM items WHERE account = ").text(account.as_str());
    q.sql(" AND kind = ").text(kind).sql(" AND created_at >= ").bind(query.from.into());
    q.sql(" AND created_at < s.upper ORDER BY created_at DESC, id DESC LIMIT ").int(i64::from(query.page.size));
    q.sql(" OFFSET s.rest)) p ON true ORDER BY p.created_at DESC, p.id DESC");
}

/// The rows of `write_task_page`, `write_window_page` or `write_deep_window_page`: the total, and the page's items.
fn total_and_page(rows: &[PgRow]) -> Page<ItemRecord> {
    use sqlx::Row as _;
    let total: i64 = rows.first().map_or(0, |r| r.get("total"));
    let records = rows.first().map_or_else(Vec::new, |first| {
        let base = item_columns_at::<Postgres>(first);
        rows.iter()
            .filter(|r| r.try_get::<Option<i64>, _>(base).ok().flatten().is_some())
            .map(|r| record_at::<Postgres>(r, base))
            .collect()
    });
    Page { total: u64::try_from(total).unwrap_or(0), records }
}

/// Writes into `q` the Baidu dialects' record query, ascending by `(created_at, id)`.
pub(crate) fn write_records<'q, 'a>(
    q: &'q mut Sql<'a, Postgres>,
    query: &'a RecordQuery<'a>,
) -> &'q mut Sql<'a, Postgres> {
    q.sql("SELECT ").sql(RECORD_COLUMNS).sql(" FROM items WHERE account = ").text(query.account.as_str());
    q.sql(" AND kind = ").text(query.kind.as_str());
    if let Some(task_id) = query.task_id {
        q.sql(" AND task_id = ").bind(task_id.into());
    } else {
        q.sql(" AND created_at >= ").bind(query.from.into()).sql(" AND created_at < ").bind(query.to.into());
    }
    if let Some(site) = query.site {
        // Sites are validated domain names: no LIKE wildcard can occur in them. The CASE hides
        // the filter's selectivity from the planner, which would estimate `host LIKE '%.site'` at
        // 0.5 % and then sort the whole window instead of walking it in index order until the
        // page is full; an account's items are mostly under the sites it asks about (see
        // BENCHMARKS.md, "PostgreSQL GEO pages in index order").
        q.sql(" AND CASE WHEN host = ").text(site).sql(" THEN TRUE ELSE host LIKE ");
        q.bind(format!("%.{site}").into()).sql(" END");
    }
    if let Some(url) = query.url {
        q.sql(" AND url = ").text(url);
    }
    if let Some(item_type) = query.item_type {
        q.sql(" AND item_type = ").text(item_type.as_str());
    }
    if let Some((created_at, id)) = query.after {
        q.sql(" AND (created_at, id) > (").bind(created_at.into()).sql(", ").int(id).sql(")");
    }
    q.sql(" ORDER BY created_at, id LIMIT ").int(i64::from(query.limit))
}
