//! The embedded SQLite backend: one file, WAL mode, one writer connection (SQLite admits one
//! writer at a time; a single connection avoids busy errors inside the process) and a small pool
//! of readers. Commits are `synchronous = FULL`: an acknowledged task survives a power cut too.

use crate::HOUR_MS;
use crate::rows::sqlite::{item_from_row, node_from_row};
use crate::shared::{COALESCE_WINDOW_MS, shared_operations};
use crate::sqlite_read::Readers;
use cachectl_core::{
    ClaimedItem, Delivery, DeliveryOutcome, Item, ItemFilter, ItemRecord, ItemStatus, ItemType, ItemUpdate, Kind,
    Millis, NewItem, NewTask, NodeResult, Page, PageRequest, QuotaBucket, QuotaCharge, RecordQuery, StatusCounts,
    Store, StoreError, StoreResult, TaskFilter, TaskKind, TaskState, TaskSummary, WebhookJob, WindowQuery,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Items inserted per statement: 9 bound values each stays far below SQLite's variable limit.
const INSERT_CHUNK: usize = 500;

/// Read-only connections, in each of the two read pools.
const READERS: u32 = 4;

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// The record queries' read path (see `sqlite_read`).
    read: Readers,
}

shared_operations!(SqliteStore, Sqlite, reader, writer, crate::rows::sqlite);

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://path` or `sqlite::memory:`)
    /// and, with `migrate`, applies the migrations. Refuses a schema newer than this binary knows.
    ///
    /// # Errors
    /// The file cannot be opened or the migrations fail.
    pub async fn open(url: &str, migrate: bool) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let writer =
            SqlitePoolOptions::new().max_connections(1).connect_with(options.clone()).await.map_err(unavailable)?;
        check_schema_version(&writer).await?;
        if migrate {
            MIGRATOR.run(&writer).await.map_err(|e| StoreError::Schema(e.to_string()))?;
        }
        // One SQLite file serves one process: leases left by an earlier process (killed before it
        // could release them) are void, so its unfinished items resume at once.
        sqlx::query("UPDATE items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL")
            .execute(&writer)
            .await
            .map_err(unavailable)?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let read = Readers::open(options.get_filename(), in_memory, READERS)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options.read_only(true))
            .await
            .map_err(unavailable)?;
        Ok(Self { writer, reader, read })
    }
}

impl SqliteStore {
    /// The query plans (`EXPLAIN QUERY PLAN`) of every read path and queue statement, by name,
    /// for the test that forbids full scans of the items table.
    ///
    /// # Errors
    /// The store failing.
    pub async fn explain(&self, account: &str, window: (Millis, Millis)) -> StoreResult<Vec<(String, String)>> {
        // A window with partial hours at both ends, so that the total uses every part.
        let (from, to) = (window.0 + 60_000, window.1 - 60_000);
        let page = PageRequest { number: 100, size: 50 };
        let total = |url| {
            let query = WindowQuery { account, kind: Kind::Refresh, from, to, url, page };
            crate::sqlite_read::window_total(&query).sql
        };
        let mut statements: Vec<(String, String)> = vec![
            ("task id: count".into(), statements::TASK_COUNT.into()),
            ("task id: page".into(), statements::task_page()),
            ("window: total".into(), total(None)),
            ("window: page".into(), statements::window_page(false)),
            ("window: hourly counters of a deep page".into(), statements::WINDOW_HOURS.into()),
            ("window: edges of a deep page".into(), statements::WINDOW_EDGE_COUNT.into()),
            ("one URL: total".into(), total(Some("http://x/"))),
            ("one URL: page".into(), statements::window_page(true)),
            ("queue: claim".into(), statements::claim()),
            ("queue: renew".into(), statements::RENEW.into()),
            ("queue: release".into(), statements::RELEASE.into()),
            ("retention sweep".into(), statements::SWEEP_SELECT.into()),
        ];
        let update = crate::sample_update();
        let updates = std::slice::from_ref(&update);
        statements.extend([
            ("apply: items".into(), Self::items_update("", updates).sql().to_owned()),
            ("apply: followers".into(), Self::followers_update("", &[&update]).sql().to_owned()),
            ("apply: dependents".into(), Self::dependents_update("", &[&update]).sql().to_owned()),
        ]);
        for (name, query) in crate::sample_record_queries(account, window) {
            statements.push((name.into(), crate::sqlite_read::records_query(&query).0));
        }
        sqlx::query("ANALYZE").execute(&self.writer).await.map_err(unavailable)?;
        let mut plans = Vec::new();
        for (name, sql) in statements {
            let rows =
                sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}")).fetch_all(&self.writer).await.map_err(unavailable)?;
            let plan: Vec<String> = rows.iter().map(|r| r.get::<String, _>("detail")).collect();
            plans.push((name, plan.join("\n")));
        }
        Ok(plans)
    }
}

/// Refuses to run on a database migrated by a newer cachectl: its schema may mean something
/// this binary would corrupt.
async fn check_schema_version(pool: &SqlitePool) -> StoreResult<()> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'")
            .fetch_optional(pool)
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

/// The statements of every read path and of the queue, shared by the operations and by
/// `explain`, so that the plans checked are those of the statements that run.
pub(crate) mod statements {
    use crate::rows::{ITEM_COLUMNS, RECORD_COLUMNS};

    // INDEXED BY: a task has at most a thousand items while its account may have millions, a
    // difference SQLite's planner cannot always see from its statistics. Parameters: ?1 the task
    // id, ?2 the account, ?3 the kind; the account is checked once, on the task.
    pub(crate) const TASK_COUNT: &str = "SELECT COUNT(*) FROM items INDEXED BY items_task
         WHERE task_id = ?1 AND kind = ?3 AND EXISTS (SELECT 1 FROM tasks WHERE id = ?1 AND account = ?2)";
    /// A deep window page's total and skip (`sqlite_read::deep_page`): the hourly counters
    /// newest first, and the count of each partial hour at the window's edges.
    pub(crate) const WINDOW_HOURS: &str =
        "SELECT hour, n FROM item_counts WHERE account = ? AND kind = ? AND hour >= ? AND hour < ? ORDER BY hour DESC";
    pub(crate) const WINDOW_EDGE_COUNT: &str =
        "SELECT COUNT(*) FROM items WHERE account = ? AND kind = ? AND created_at >= ? AND created_at < ?";
    pub(super) const RENEW: &str =
        "UPDATE items SET lease_until = ? WHERE lease_owner = ? AND status IN ('waiting', 'processing')";
    pub(super) const RELEASE: &str = "UPDATE items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?";
    pub(super) const SWEEP_SELECT: &str = "SELECT id FROM items WHERE created_at < ? ORDER BY created_at LIMIT ?";

    /// ?1 to ?3 as in `TASK_COUNT`, ?4 the limit, ?5 the offset. Read down the index, as
    /// `window_page`.
    pub(crate) fn task_page() -> String {
        format!(
            "SELECT {RECORD_COLUMNS} FROM items INDEXED BY items_task
             WHERE task_id = ?1 AND kind = ?3 AND EXISTS (SELECT 1 FROM tasks WHERE id = ?1 AND account = ?2)
             ORDER BY created_at DESC, id DESC LIMIT ?4 OFFSET ?5"
        )
    }

    fn window_filter(url: bool) -> &'static str {
        if url {
            "account = ? AND kind = ? AND url = ? AND created_at >= ? AND created_at < ?"
        } else {
            "account = ? AND kind = ? AND created_at >= ? AND created_at < ?"
        }
    }

    /// Read down the index, which covers the filter and the order. The skipped entries of an
    /// offset cost no table row: SQLite defers the row's lookup until a column outside the
    /// index is read (`DeferredSeek`), and counts the offset off before that. Until round 7 the
    /// page's ids were first collected by a subquery and their rows then sorted again
    /// (BENCHMARKS.md).
    pub(crate) fn window_page(url: bool) -> String {
        format!(
            "SELECT {RECORD_COLUMNS} FROM items WHERE {} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            window_filter(url)
        )
    }

    pub(super) fn claim() -> String {
        format!(
            "UPDATE items SET lease_owner = ?, lease_until = ?
             WHERE id IN (SELECT id FROM items
                          WHERE status IN ('waiting', 'processing') AND not_before <= ?
                            AND follows IS NULL
                            AND (depends_on IS NULL OR EXISTS (SELECT 1 FROM items d WHERE d.id = items.depends_on AND d.status = 'completed'))
                            AND (lease_until IS NULL OR lease_until < ?)
                          ORDER BY not_before, id LIMIT ?)
             RETURNING {ITEM_COLUMNS}, started_at"
        )
    }
}

crate::shared::store_impl!(SqliteStore, "", {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await.map_err(unavailable)?;
        Ok(())
    }

    async fn quota_used(&self, account: &str, bucket: QuotaBucket, day: &str) -> StoreResult<u64> {
        let used: Option<i64> =
            sqlx::query_scalar("SELECT used FROM quota_usage WHERE account = ? AND bucket = ? AND day = ?")
                .bind(account)
                .bind(bucket.as_str())
                .bind(day)
                .fetch_optional(&self.reader)
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
        let offset = i64::try_from(page.offset()).unwrap_or(i64::MAX);
        let (total, records) = self.read.task_items(account, kind, task_id, i64::from(page.size), offset).await?;
        Ok(Page { total: u64::try_from(total).unwrap_or(0), records })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account))]
    async fn window_items(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        let (total, records) = self.read.window_items(query).await?;
        Ok(Page { total: u64::try_from(total).unwrap_or(0), records })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account))]
    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        self.read.records(query).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn claim_items(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedItem>> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let rows = sqlx::query(&statements::claim())
            .bind(owner)
            .bind(lease_until)
            .bind(now)
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
            let mut select: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                "SELECT item_id, node, state, attempts, status_code, error, updated_at, instance FROM node_results WHERE item_id IN (",
            );
            let mut ids = select.separated(", ");
            for id in chunk {
                ids.push_bind(*id);
            }
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
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn release_leases(&self, owner: &str) -> StoreResult<()> {
        sqlx::query(statements::RELEASE).bind(owner).execute(&self.writer).await.map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn sweep(&self, before: Millis, batch: u32) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let ids: Vec<i64> = sqlx::query_scalar(statements::SWEEP_SELECT)
            .bind(before)
            .bind(i64::from(batch))
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        for chunk in ids.chunks(INSERT_CHUNK) {
            let mut counts: QueryBuilder<'_, Sqlite> = QueryBuilder::new(format!(
                "SELECT account, kind, created_at / {HOUR_MS} AS hour, COUNT(*) AS n FROM items WHERE id IN ("
            ));
            let mut list = counts.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            counts.push(") GROUP BY account, kind, hour");
            for row in counts.build().fetch_all(&mut *tx).await.map_err(unavailable)? {
                sqlx::query("UPDATE item_counts SET n = n - ? WHERE account = ? AND kind = ? AND hour = ?")
                    .bind(row.get::<i64, _>("n"))
                    .bind(row.get::<String, _>("account"))
                    .bind(row.get::<String, _>("kind"))
                    .bind(row.get::<i64, _>("hour"))
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            for table_and_key in ["node_results WHERE item_id", "items WHERE id"] {
                let mut delete: QueryBuilder<'_, Sqlite> =
                    QueryBuilder::new(format!("DELETE FROM {table_and_key} IN ("));
                let mut list = delete.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                delete.push(")");
                delete.build().execute(&mut *tx).await.map_err(unavailable)?;
            }
        }
        sqlx::query(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE created_at < ?
               AND NOT EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id) LIMIT ?)",
        )
        .bind(before)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM item_counts WHERE n <= 0").execute(&mut *tx).await.map_err(unavailable)?;
        // The webhook log and finished jobs go with the records they are about.
        sqlx::query("DELETE FROM webhook_deliveries WHERE at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM webhook_jobs WHERE state <> 'pending' AND next_at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM quota_usage WHERE day < date(? / 1000, 'unixepoch', '-2 days')")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(ids.len() as u64)
    }
});
