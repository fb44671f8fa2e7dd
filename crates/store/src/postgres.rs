//! The PostgreSQL backend, for several `cachectl serve` instances sharing one database: the work
//! queue is claimed with `FOR UPDATE SKIP LOCKED` under leases, quota charges are conditional
//! upserts, and the Baishan rate-limit counters live here so that limits hold across instances.

use crate::HOUR_MS;
use crate::rows::postgres::{item_columns_at, item_from_row, node_from_row};
use crate::rows::{RECORD_COLUMNS, record_at};
use crate::shared::{COALESCE_WINDOW_MS, shared_operations};
use cachectl_core::{
    ClaimedItem, Delivery, DeliveryOutcome, Item, ItemFilter, ItemRecord, ItemStatus, ItemType, ItemUpdate, Kind,
    Millis, NewItem, NewTask, NodeResult, Page, PageRequest, QuotaBucket, QuotaCharge, RecordQuery, StatusCounts,
    Store, StoreError, StoreResult, TaskFilter, TaskKind, TaskState, TaskSummary, WebhookJob, WindowQuery,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgPool, Postgres, QueryBuilder, Row};
use std::str::FromStr;
use std::time::Duration;

/// A pooled connection idle at least this long is pinged before use.
const PING_WHEN_IDLE: Duration = Duration::from_secs(1);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Items inserted per statement (9 values each; PostgreSQL allows 65,535 per statement).
const INSERT_CHUNK: usize = 1000;

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    /// Everything but the record queries: writes, the queue, the native API, migrations.
    pool: PgPool,
    /// The record queries of the dialects (`task_items`, `window_items`, `records`).
    reads: Reads,
}

/// The connections of the record queries, apart from sqlx's pool: sqlx returns every connection
/// to its pool in a task of its own that pings the database first (a Sync message and its
/// answer; no option turns it off), so that each query cost two round trips to its backend. Here
/// a connection goes back to the pool as it is, and is pinged only when it is taken after being
/// idle `PING_WHEN_IDLE` or more (a database restart may have cut it since). A query that failed
/// drops its connection; one cancelled midway leaves unread answers on it, which sqlx's
/// `PgConnection` reads off before its next statement. +11–27 % q/s for the Baishan queries on
/// PostgreSQL (BENCHMARKS.md round 8).
type Reads = deadpool::managed::Pool<ReadConnections>;

shared_operations!(PgStore, Postgres, pool, pool, crate::rows::postgres);

/// Opens and checks the connections of `Reads`.
#[derive(Debug)]
struct ReadConnections(PgConnectOptions);

impl deadpool::managed::Manager for ReadConnections {
    type Type = sqlx::postgres::PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        sqlx::postgres::PgConnection::connect_with(&self.0).await
    }

    async fn recycle(
        &self,
        conn: &mut Self::Type,
        metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Self::Error> {
        if metrics.last_used() >= PING_WHEN_IDLE {
            conn.ping().await?;
        }
        Ok(())
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A connection of `reads`.
async fn read_connection(reads: &Reads) -> StoreResult<deadpool::managed::Object<ReadConnections>> {
    reads.get().await.map_err(unavailable)
}

/// The outcome of a query on a connection of `Reads`: a connection whose query failed is closed
/// instead of going back to the pool.
fn read_outcome<T>(
    conn: deadpool::managed::Object<ReadConnections>,
    outcome: Result<T, sqlx::Error>,
) -> StoreResult<T> {
    outcome.map_err(|e| {
        drop(deadpool::managed::Object::take(conn));
        unavailable(e)
    })
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`). With `migrate`, applies the migrations
    /// first (under PostgreSQL's advisory lock, so instances starting together are safe).
    /// Refuses a schema newer than this binary knows either way.
    ///
    /// # Errors
    /// The database cannot be reached, or the schema is newer or cannot be migrated.
    pub async fn open(url: &str, migrate: bool, connections: crate::Connections) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(unavailable)?;
        let pool = PgPoolOptions::new()
            .max_connections(connections.max_connections.max(1))
            // sqlx pings a connection when it is returned (and drops it if that fails); pinging
            // again when it is taken is one more round trip per query, a sixth of the server's
            // time on a PostgreSQL page (BENCHMARKS.md round 5). Only a connection idle for a
            // while, which a database restart may have cut since, is pinged before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            // A request waits at most this long for a connection while the database is down,
            // then fails with 503 instead of hanging.
            .acquire_timeout(connections.acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        let reads = Reads::builder(ReadConnections(options))
            .max_size(connections.max_connections.max(1) as usize)
            .wait_timeout(Some(connections.acquire_timeout))
            .create_timeout(Some(connections.acquire_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            // The connection returned last is taken first: its backend process is the one most
            // likely still warm, and connections left idle are the ones pinged before use.
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .build()
            .map_err(unavailable)?;
        check_schema_version(&pool).await?;
        if migrate {
            MIGRATOR.run(&pool).await.map_err(|e| StoreError::Schema(e.to_string()))?;
        } else {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations").fetch_one(&pool).await.map_err(
                    |_| StoreError::Schema("the database has no cachectl schema; run `cachectl migrate`".into()),
                )?;
            let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
            if applied.unwrap_or(0) < known {
                return Err(StoreError::Schema(format!(
                    "the database schema is at version {}, this cachectl needs {known}; run `cachectl migrate`",
                    applied.unwrap_or(0)
                )));
            }
        }
        Ok(Self { pool, reads })
    }
}

impl PgStore {
    /// The query plans (`EXPLAIN`, with sequential scans disabled so that the planner shows
    /// whether an index can serve each statement at all) of every read path and queue
    /// statement, by name, for the test that forbids sequential scans of the items table.
    ///
    /// # Errors
    /// The store failing.
    pub async fn explain(&self, account: &str, (from, to): (Millis, Millis)) -> StoreResult<Vec<(String, String)>> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        sqlx::query("ANALYZE items").execute(&mut *conn).await.map_err(unavailable)?;
        sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.map_err(unavailable)?;
        let mut plans = Vec::new();
        let text = |rows: Vec<sqlx::postgres::PgRow>| {
            rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n")
        };
        let (a, k) = (account, "refresh");
        let explain = |sql: &str| format!("EXPLAIN {sql}");
        let rows = sqlx::query(&explain(&statements::task_query()))
            .bind(1_i64)
            .bind(a)
            .bind(k)
            .bind(50_i64)
            .bind(0_i64)
            .fetch_all(&mut *conn)
            .await;
        plans.push(("task id: count and page".to_owned(), text(rows.map_err(unavailable)?)));
        // A window with partial hours at both ends, so that the total uses every part.
        let (total_from, total_to) = (from + 60_000, to - 60_000);
        let page = PageRequest { number: 100, size: 50 };
        for url in [None, Some("http://x/")] {
            let what = if url.is_some() { "one URL" } else { "window" };
            let query = WindowQuery { account, kind: Kind::Refresh, from: total_from, to: total_to, url, page };
            let rows = window_query("EXPLAIN ", &query, 4950).build().fetch_all(&mut *conn).await;
            plans.push((format!("{what}: total and page"), text(rows.map_err(unavailable)?)));
            let rows = window_query("EXPLAIN ", &query, 0).build().fetch_all(&mut *conn).await;
            plans.push((format!("{what}: total and first page"), text(rows.map_err(unavailable)?)));
            if url.is_none()
                && let (Some(hours), _) = crate::split_window(query.from, query.to)
            {
                let rows = deep_window_query("EXPLAIN ", &query, hours, 4950).build().fetch_all(&mut *conn).await;
                plans.push((format!("{what}: deep page, hourly counters"), text(rows.map_err(unavailable)?)));
            }
        }
        let rows = sqlx::query(&explain(&statements::claim()))
            .bind("owner")
            .bind(1_i64)
            .bind(0_i64)
            .bind(100_i64)
            .fetch_all(&mut *conn)
            .await;
        plans.push(("queue: claim".to_owned(), text(rows.map_err(unavailable)?)));
        let rows = sqlx::query(&explain(statements::RENEW)).bind(1_i64).bind("owner").fetch_all(&mut *conn).await;
        plans.push(("queue: renew".to_owned(), text(rows.map_err(unavailable)?)));
        let rows = sqlx::query(&explain(statements::RELEASE)).bind("owner").fetch_all(&mut *conn).await;
        plans.push(("queue: release".to_owned(), text(rows.map_err(unavailable)?)));
        let rows =
            sqlx::query(&explain(statements::SWEEP_SELECT)).bind(from).bind(2000_i64).fetch_all(&mut *conn).await;
        plans.push(("retention sweep".to_owned(), text(rows.map_err(unavailable)?)));
        let update = crate::sample_update();
        let rows = Self::items_update("EXPLAIN ", std::slice::from_ref(&update)).build().fetch_all(&mut *conn).await;
        plans.push(("apply: items".to_owned(), text(rows.map_err(unavailable)?)));
        let rows = Self::followers_update("EXPLAIN ", &[&update]).build().fetch_all(&mut *conn).await;
        plans.push(("apply: followers".to_owned(), text(rows.map_err(unavailable)?)));
        let rows = Self::dependents_update("EXPLAIN ", &[&update]).build().fetch_all(&mut *conn).await;
        plans.push(("apply: dependents".to_owned(), text(rows.map_err(unavailable)?)));
        for (name, query) in crate::sample_record_queries(account, (from, to)) {
            let rows = records_query("EXPLAIN ", &query).build().fetch_all(&mut *conn).await;
            plans.push((name.to_owned(), text(rows.map_err(unavailable)?)));
        }
        sqlx::query("RESET enable_seqscan").execute(&mut *conn).await.map_err(unavailable)?;
        Ok(plans)
    }
}

async fn check_schema_version(pool: &PgPool) -> StoreResult<()> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    if exists.is_none() {
        return Ok(());
    }
    let newest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations").fetch_one(pool).await.map_err(unavailable)?;
    let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    match newest {
        Some(v) if v > known => Err(StoreError::Schema(format!(
            "the database has schema version {v}, newer than the {known} this cachectl knows; upgrade cachectl"
        ))),
        _ => Ok(()),
    }
}

fn push_ids(builder: &mut QueryBuilder<'_, Postgres>, ids: &[i64]) {
    let mut list = builder.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
}

/// The statements of every read path and of the queue, shared by the operations and by
/// `explain`, so that the plans checked are those of the statements that run.
mod statements {
    use crate::rows::{ITEM_COLUMNS, RECORD_COLUMNS};

    pub(super) const RENEW: &str =
        "UPDATE items SET lease_until = $1 WHERE lease_owner = $2 AND status IN ('waiting', 'processing')";
    pub(super) const RELEASE: &str = "UPDATE items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1";
    pub(super) const SWEEP_SELECT: &str = "SELECT id FROM items WHERE created_at < $1 ORDER BY created_at LIMIT $2";

    /// A task's count and one page of its items, in one round trip: one row per item, each
    /// with the count (one row with NULL item columns when the page is empty). ?1 the task id,
    /// ?2 the account, ?3 the kind, ?4 the limit, ?5 the offset.
    pub(super) fn task_query() -> String {
        format!(
            "SELECT c.total, p.* FROM
               (SELECT COUNT(*) AS total FROM items WHERE task_id = $1 AND account = $2 AND kind = $3) c
             LEFT JOIN LATERAL
               (SELECT {RECORD_COLUMNS} FROM items WHERE task_id = $1 AND account = $2 AND kind = $3
                ORDER BY created_at DESC, id DESC LIMIT $4 OFFSET $5) p ON true
             ORDER BY p.created_at DESC, p.id DESC"
        )
    }

    /// SKIP LOCKED: instances claiming at the same moment take disjoint items instead of waiting
    /// on each other's row locks.
    pub(super) fn claim() -> String {
        format!(
            "UPDATE items SET lease_owner = $1, lease_until = $2
             WHERE id IN (SELECT id FROM items
                          WHERE status IN ('waiting', 'processing') AND not_before <= $3
                            AND follows IS NULL
                            AND (depends_on IS NULL OR EXISTS (SELECT 1 FROM items d WHERE d.id = items.depends_on AND d.status = 'completed'))
                            AND (lease_until IS NULL OR lease_until < $3)
                          ORDER BY not_before, id LIMIT $4
                          FOR UPDATE SKIP LOCKED)
             RETURNING {ITEM_COLUMNS}, started_at"
        )
    }
}

/// A window's exact total and one page of its items, newest first, in one round trip: one row
/// per item, each with the total (one row with NULL item columns when the page is empty). With
/// an offset the page's ids are found on the index first, then only those rows are read: the
/// offset skips index entries, not table rows; without one the rows are read down the index.
/// Deep pages without a URL go through `deep_window_query` instead. `prefix` is `""` to run it
/// or `EXPLAIN ` to check its plan.
fn window_query<'a>(prefix: &str, query: &'a WindowQuery<'a>, offset: i64) -> QueryBuilder<'a, Postgres> {
    // Nothing to skip (a first page): the rows are read straight down the window's index,
    // without looking each page id up again.
    let skip_on_index = offset > 0;
    let mut q = window_total_query(&format!("{prefix}SELECT t.total, p.* FROM ("), query);
    q.push(" AS total) t LEFT JOIN LATERAL (SELECT ").push(RECORD_COLUMNS).push(if skip_on_index {
        " FROM items WHERE id IN (SELECT id FROM items WHERE account = "
    } else {
        " FROM items WHERE account = "
    });
    q.push_bind(query.account).push(" AND kind = ").push_bind(query.kind.as_str());
    if let Some(url) = query.url {
        q.push(" AND url = ").push_bind(url);
    }
    q.push(" AND created_at >= ")
        .push_bind(query.from)
        .push(" AND created_at < ")
        .push_bind(query.to)
        .push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(query.page.size));
    if skip_on_index {
        q.push(" OFFSET ").push_bind(offset).push(")");
    }
    q.push(") p ON true ORDER BY p.created_at DESC, p.id DESC");
    q
}

/// A deep window page (no URL, `offset` ≥ `crate::DEEP_PAGE`, whole hours `[first, end)` in the
/// window) in one statement, as `window_query` answers: the counters give the skip that
/// `crate::skip_hours` computes and the exact total that `window_total_query` adds up, and the
/// page then skips at most about an hour of index entries. `parts` are the top partial hour
/// and the whole hours, newest first, each with where it starts; the longest run of them whose
/// running count fits in the offset is skipped (counts never go negative, so the runs that fit
/// are a prefix): the page ends where the last of them starts (or at the window's end), after
/// skipping the rest of the offset. The total adds the bottom partial hour. Until round 7 this
/// was two round trips: the counters, then the page with its total counted again.
fn deep_window_query<'a>(
    prefix: &str,
    query: &'a WindowQuery<'a>,
    (first, end): (i64, i64),
    offset: i64,
) -> QueryBuilder<'a, Postgres> {
    let (account, kind) = (query.account, query.kind.as_str());
    let top_start = end * HOUR_MS;
    let mut q: QueryBuilder<'a, Postgres> = QueryBuilder::new(format!("{prefix}WITH parts AS (SELECT CAST("));
    q.push_bind(top_start).push(" AS BIGINT) AS start, COUNT(*) AS n FROM items WHERE account = ");
    q.push_bind(account).push(" AND kind = ").push_bind(kind);
    q.push(" AND created_at >= ").push_bind(top_start).push(" AND created_at < ").push_bind(query.to);
    q.push(" UNION ALL SELECT hour * ").push(HOUR_MS.to_string()).push(", n FROM item_counts WHERE account = ");
    q.push_bind(account).push(" AND kind = ").push_bind(kind);
    q.push(" AND hour >= ").push_bind(first).push(" AND hour < ").push_bind(end);
    q.push("), run AS (SELECT start, n, SUM(n) OVER (ORDER BY start DESC) AS skipped FROM parts)");
    q.push(", skip AS (SELECT COALESCE(MIN(start) FILTER (WHERE skipped <= ").push_bind(offset).push("), ");
    q.push_bind(query.to).push(") AS upper, CAST(").push_bind(offset);
    q.push(" - COALESCE(MAX(skipped) FILTER (WHERE skipped <= ").push_bind(offset).push("), 0) AS BIGINT) AS rest");
    q.push(", CAST(COALESCE(SUM(n), 0) + (SELECT COUNT(*) FROM items WHERE account = ");
    q.push_bind(account).push(" AND kind = ").push_bind(kind);
    q.push(" AND created_at >= ").push_bind(query.from).push(" AND created_at < ").push_bind(first * HOUR_MS);
    q.push(") AS BIGINT) AS total FROM run)");
    q.push(" SELECT s.total, p.* FROM skip s LEFT JOIN LATERAL (SELECT ").push(RECORD_COLUMNS);
    q.push(" FROM items WHERE id IN (SELECT id FROM items WHERE account = ").push_bind(account);
    q.push(" AND kind = ").push_bind(kind).push(" AND created_at >= ").push_bind(query.from);
    q.push(" AND created_at < s.upper ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.page.size));
    q.push(" OFFSET s.rest)) p ON true ORDER BY p.created_at DESC, p.id DESC");
    q
}

/// The rows of `task_query` or `window_query`: the total, and the page's items.
fn total_and_page(rows: &[sqlx::postgres::PgRow]) -> Page<ItemRecord> {
    let total: i64 = rows.first().map_or(0, |r| r.get("total"));
    let records = rows.first().map_or_else(Vec::new, |first| {
        let base = item_columns_at(first);
        rows.iter()
            .filter(|r| r.try_get::<Option<i64>, _>(base).ok().flatten().is_some())
            .map(|r| record_at(r, base))
            .collect()
    });
    Page { total: u64::try_from(total).unwrap_or(0), records }
}

/// The exact number of items in a window, in one statement: whole hours from the hourly
/// counters, the partial hours at the edges counted on the index (one URL: counted on
/// its index). `prefix` is `""` to run it or `EXPLAIN …` to check its plan.
fn window_total_query<'a>(prefix: &str, query: &'a WindowQuery<'a>) -> QueryBuilder<'a, Postgres> {
    let mut q: QueryBuilder<'a, Postgres> = QueryBuilder::new(format!("{prefix}SELECT CAST("));
    crate::write_window_total(&mut q, query);
    q.push(" AS BIGINT)");
    q
}

impl<'a> crate::SqlWriter<'a> for QueryBuilder<'a, Postgres> {
    fn sql(&mut self, text: &str) -> &mut Self {
        self.push(text)
    }
    fn int(&mut self, value: i64) -> &mut Self {
        self.push_bind(value)
    }
    fn text(&mut self, value: &'a str) -> &mut Self {
        self.push_bind(value)
    }
}

/// The Baidu dialects' record query, ascending by `(created_at, id)`; `prefix` is `""` to run
/// it, or `EXPLAIN ` to check its plan.
fn records_query<'a>(prefix: &str, query: &'a RecordQuery<'a>) -> QueryBuilder<'a, Postgres> {
    let mut select: QueryBuilder<'a, Postgres> =
        QueryBuilder::new(format!("{prefix}SELECT {RECORD_COLUMNS} FROM items WHERE account = "));
    select.push_bind(query.account).push(" AND kind = ").push_bind(query.kind.as_str());
    if let Some(task_id) = query.task_id {
        select.push(" AND task_id = ").push_bind(task_id);
    } else {
        select.push(" AND created_at >= ").push_bind(query.from).push(" AND created_at < ").push_bind(query.to);
    }
    if let Some(site) = query.site {
        // Sites are validated domain names: no LIKE wildcard can occur in them. The CASE hides
        // the filter's selectivity from the planner (it would estimate `host LIKE '%.site'` at
        // 0.5 % and then sort the whole window instead of walking it in index order until the
        // page is full); an account's items are mostly under the sites it asks about.
        select
            .push(" AND CASE WHEN host = ")
            .push_bind(site)
            .push(" THEN TRUE ELSE host LIKE ")
            .push_bind(format!("%.{site}"))
            .push(" END");
    }
    if let Some(url) = query.url {
        select.push(" AND url = ").push_bind(url);
    }
    if let Some(item_type) = query.item_type {
        select.push(" AND item_type = ").push_bind(item_type.as_str());
    }
    if let Some((created_at, id)) = query.after {
        select.push(" AND (created_at, id) > (").push_bind(created_at).push(", ").push_bind(id).push(")");
    }
    select.push(" ORDER BY created_at, id LIMIT ").push_bind(i64::from(query.limit));
    select
}

crate::shared::store_impl!(PgStore, " FOR UPDATE SKIP LOCKED", {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn quota_used(&self, account: &str, bucket: QuotaBucket, day: &str) -> StoreResult<u64> {
        let used: Option<i64> =
            sqlx::query_scalar("SELECT used FROM quota_usage WHERE account = $1 AND bucket = $2 AND day = $3")
                .bind(account)
                .bind(bucket.as_str())
                .bind(day)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(used.map_or(0, |u| u64::try_from(u).unwrap_or(0)))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn task_items(
        &self,
        account: &str,
        kind: Kind,
        task_id: i64,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>> {
        let mut conn = read_connection(&self.reads).await?;
        let outcome = sqlx::query(&statements::task_query())
            .bind(task_id)
            .bind(account)
            .bind(kind.as_str())
            .bind(i64::from(page.size))
            .bind(i64::try_from(page.offset()).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await;
        let rows = read_outcome(conn, outcome)?;
        Ok(total_and_page(&rows))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account))]
    async fn window_items(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        let offset = i64::try_from(query.page.offset()).unwrap_or(i64::MAX);
        let mut select = match crate::split_window(query.from, query.to) {
            (Some(hours), _) if query.url.is_none() && offset >= crate::DEEP_PAGE => {
                deep_window_query("", query, hours, offset)
            }
            _ => window_query("", query, offset),
        };
        let mut conn = read_connection(&self.reads).await?;
        let outcome = select.build().fetch_all(&mut *conn).await;
        let rows = read_outcome(conn, outcome)?;
        Ok(total_and_page(&rows))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account))]
    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        let mut select = records_query("", query);
        let mut conn = read_connection(&self.reads).await?;
        let outcome = select.build().fetch_all(&mut *conn).await;
        let rows = read_outcome(conn, outcome)?;
        let base = rows.first().map_or(0, item_columns_at);
        Ok(rows.iter().map(|r| record_at(r, base)).collect())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn claim_items(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedItem>> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let rows = sqlx::query(&statements::claim())
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut claimed: Vec<ClaimedItem> = rows
            .iter()
            .map(|row| ClaimedItem { item: item_from_row(row), started_at: row.get("started_at"), nodes: Vec::new() })
            .collect();
        let resumed: Vec<i64> = claimed.iter().filter(|c| c.started_at.is_some()).map(|c| c.item.id).collect();
        for chunk in resumed.chunks(INSERT_CHUNK) {
            let mut select: QueryBuilder<'_, Postgres> = QueryBuilder::new(
                "SELECT item_id, node, state, attempts, status_code, error, updated_at, instance FROM node_results \
                 WHERE item_id IN (",
            );
            push_ids(&mut select, chunk);
            select.push(")");
            for row in select.build().fetch_all(&mut *tx).await.map_err(unavailable)? {
                let item_id: i64 = row.get("item_id");
                if let Some(c) = claimed.iter_mut().find(|c| c.item.id == item_id) {
                    c.nodes.push(node_from_row(&row));
                }
            }
        }
        tx.commit().await.map_err(unavailable)?;
        claimed.sort_by_key(|c| c.item.id);
        Ok(claimed)
    }

    async fn renew_leases(&self, owner: &str, lease_until: Millis) -> StoreResult<u64> {
        let done = sqlx::query(statements::RENEW)
            .bind(lease_until)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn release_leases(&self, owner: &str) -> StoreResult<()> {
        sqlx::query(statements::RELEASE).bind(owner).execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn sweep(&self, before: Millis, batch: u32) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let ids: Vec<i64> = sqlx::query_scalar(statements::SWEEP_SELECT)
            .bind(before)
            .bind(i64::from(batch))
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        if !ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE item_counts c SET n = c.n - d.n
                 FROM (SELECT account, kind, created_at / {HOUR_MS} AS hour, COUNT(*) AS n
                       FROM items WHERE id = ANY($1) GROUP BY 1, 2, 3) d
                 WHERE c.account = d.account AND c.kind = d.kind AND c.hour = d.hour"
            ))
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            sqlx::query("DELETE FROM node_results WHERE item_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            sqlx::query("DELETE FROM items WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        sqlx::query(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE created_at < $1
               AND NOT EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id) LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM item_counts WHERE n <= 0").execute(&mut *tx).await.map_err(unavailable)?;
        // The webhook log and finished jobs go with the records they are about.
        sqlx::query("DELETE FROM webhook_deliveries WHERE at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM webhook_jobs WHERE state <> 'pending' AND next_at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "DELETE FROM quota_usage WHERE day < to_char(to_timestamp($1 / 1000.0) - interval '2 days', 'YYYY-MM-DD')",
        )
        .bind(before)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM rate_windows WHERE minute < (extract(epoch FROM now()) / 60)::BIGINT - 10")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(ids.len() as u64)
    }

    async fn count_requests(&self, credential: &str, api_id: u32, minute: i64, n: u32) -> StoreResult<Option<u64>> {
        let count: i64 = sqlx::query_scalar(
            "INSERT INTO rate_windows (credential, api_id, minute, count) VALUES ($1, $2, $3, $4)
             ON CONFLICT (credential, api_id, minute) DO UPDATE SET count = rate_windows.count + EXCLUDED.count
             RETURNING count",
        )
        .bind(credential)
        .bind(i64::from(api_id))
        .bind(minute)
        .bind(i64::from(n))
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(Some(u64::try_from(count).unwrap_or(0)))
    }
});
