//! Tasks and their items: storing a task (idempotency, quota charges, coalescing with waiting
//! items, refresh-then-prefetch links, hourly counters), the native API's reads, cancelling and
//! retrying. The dialects' record pages are in `records`.

use crate::backend::{Backend, SqlStore};
use crate::rows::{ITEM_COLUMNS, item_from_row, node_from_row};
use crate::sql::{Arg, Db, Get as _, Sql, SqlWriter, unavailable};
use cachectl_core::store::TaskStore;
use cachectl_core::{AccountName, QuotaDay, TaskId};
use cachectl_core::{
    Delivery, Item, ItemFilter, ItemRecord, ItemStatus, ItemType, Kind, NewItem, NewTask, NodeResult, Page,
    PageRequest, QuotaBucket, QuotaCharge, RecordQuery, StatusCounts, StoreError, StoreResult, TaskFilter, TaskKind,
    TaskState, TaskSummary, Timestamp, WindowQuery,
};
use std::collections::HashMap;

/// How far back an identical waiting item is looked for when coalescing: a waiting item older
/// than this is stuck behind something (a down node, a schedule) and is not joined.
const COALESCE_WINDOW_MS: i64 = 10 * 60 * 1000;

/// URLs looked up per coalescing statement.
const COALESCE_CHUNK: usize = 400;

/// Ids per statement of the native API's reads, cancelling and retrying.
pub(crate) const ID_CHUNK: usize = 500;

/// The task of account `?1` with idempotency key `?2`.
const IDEMPOTENT: &str = "SELECT id, request_hash FROM tasks WHERE account = ?1 AND idempotency_key = ?2";

const INSERT_TASK: &str = "INSERT INTO tasks (account, kind, operator, dialect, created_at, pending, notified, \
     idempotency_key, request_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8) RETURNING id";

/// Followed by `VALUES`, one row per item.
const INSERT_ITEMS: &str = "INSERT INTO items (task_id, account, kind, url, host, item_type, operator, created_at, \
     not_before, follows, depends_on, soft) ";

/// Items of account `?1` and kind `?2` that a new item may join: the URL list, then
/// `COALESCE_TAIL` with the oldest creation time `?1` and the item type `?2`.
const COALESCE_HEAD: &str = "SELECT id, url, not_before FROM items WHERE account = ?1 AND kind = ?2 AND url IN (";
const COALESCE_TAIL: &str = ") AND created_at >= ?1 AND item_type = ?2 \
     AND status = 'waiting' AND lease_owner IS NULL AND follows IS NULL AND depends_on IS NULL AND soft = 0";

/// The refreshes of task `?1` that its prefetches may depend on.
const REFRESHES: &str = "SELECT id, url FROM items WHERE task_id = ?1 AND depends_on IS NULL AND kind = 'refresh'";

/// `?1` more items of task `?4` became final at `?3` (`?2` = `?1`): counts them down, and records
/// when the last one did.
const SETTLE: &str = "UPDATE tasks SET pending = pending - ?1, finished_at = CASE WHEN pending - ?2 <= 0 THEN ?3 \
     ELSE finished_at END WHERE id = ?4";

const TASKS: &str =
    "SELECT id, account, kind, operator, dialect, created_at, finished_at, pending FROM tasks WHERE account = ?1";
const TASK_FAILED: &str = "EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND items.status = 'failed')";
const TASK_COUNTS: &str = "SELECT task_id, status, COUNT(*) AS n FROM items WHERE task_id IN (";

const NODE_RESULTS: &str = "SELECT r.item_id, r.node, r.state, r.attempts, r.status_code, r.error, r.updated_at, \
     r.instance FROM node_results r JOIN items i ON i.id = r.item_id WHERE i.account = ?1 AND r.item_id IN (";

/// Fails the waiting, unclaimed items of task `?2` of account `?3` at `?1`.
const CANCEL: &str = "UPDATE items SET status = 'failed', reason = 'cancelled', finished_at = ?1 \
     WHERE task_id = ?2 AND account = ?3 AND status = 'waiting' AND lease_owner IS NULL RETURNING id";
pub(crate) const UNFOLLOW: &str = "UPDATE items SET follows = NULL WHERE follows IN (";

/// Puts the failed items of task `?1` of account `?2` back in the queue.
const RETRY: &str = "UPDATE items SET status = 'waiting', progress = 0, started_at = NULL, finished_at = NULL, \
     reason = NULL, lease_owner = NULL, lease_until = NULL, follows = NULL WHERE task_id = ?1 AND account = ?2 \
     AND status = 'failed' RETURNING id";
const CLEAR_NODES: &str = "DELETE FROM node_results WHERE item_id IN (";
/// `?1` items of task `?2` are pending again.
const REOPEN: &str = "UPDATE tasks SET pending = pending + ?1, finished_at = NULL, notified = 0 WHERE id = ?2";

/// Tasks, their items and the dialects' records.
#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> TaskStore for SqlStore<DB, B> {
    /// Idempotency check, quota charges, the task, its hourly counts and its items, in one
    /// transaction.
    #[tracing::instrument(level = "debug", skip_all, fields(account = %task.account, items = task.items.len()))]
    async fn create_task(&self, task: &NewTask, charges: &[QuotaCharge]) -> StoreResult<TaskId> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        if let Some(idem) = &task.idempotency {
            let args = [(&task.account).into(), (&idem.key).into()];
            if let Some(row) = Sql::<DB>::new().template(IDEMPOTENT, &args).row(&mut tx).await? {
                return if row.opt_text("request_hash").as_deref() == Some(idem.request_hash.as_str()) {
                    Ok(row.task_id("id"))
                } else {
                    Err(StoreError::IdempotencyConflict)
                };
            }
        }
        crate::quotas::charge::<DB>(&mut tx, &task.account, charges).await?;
        let args = [
            (&task.account).into(),
            task.kind.as_str().into(),
            (&task.operator).into(),
            (&task.dialect).into(),
            task.created_at.into(),
            i64::try_from(task.items.len()).unwrap_or(i64::MAX).into(),
            task.idempotency.as_ref().map(|i| i.key.as_str()).into(),
            task.idempotency.as_ref().map(|i| i.request_hash.as_str()).into(),
        ];
        let row = Sql::<DB>::new().template(INSERT_TASK, &args).row(&mut tx).await?;
        let task_id = TaskId::new(row.map_or(0, |row| DB::int(&row, 0)));
        for kind in [Kind::Refresh, Kind::Prefetch] {
            let n = task.items.iter().filter(|i| i.kind == kind).count();
            if n > 0 {
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                crate::counters::count_items::<DB>(&mut tx, &task.account, kind, task.created_at.millis(), n).await?;
            }
        }
        insert_task_items::<DB>(&mut tx, task, task_id).await?;
        crate::admin::append::<DB>(&mut tx, &crate::admin::task_entry(task, task_id)).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(task_id)
    }

    async fn quota_used(&self, account: &AccountName, bucket: QuotaBucket, day: &QuotaDay) -> StoreResult<u64> {
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        crate::quotas::used::<DB>(&mut conn, account, bucket, day).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn task_items(
        &self,
        account: &AccountName,
        kind: Kind,
        task_id: TaskId,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>> {
        self.backend.task_page(account, kind, task_id, page).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account.as_str()))]
    async fn window_items(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        self.backend.window_page(query).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account.as_str()))]
    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        self.backend.records(query).await
    }

    async fn task(&self, account: &AccountName, task_id: TaskId) -> StoreResult<Option<TaskSummary>> {
        let mut tasks = tasks_where(&self.reader, account, &TaskFilter::default(), Some(task_id), 1).await?;
        Ok(tasks.pop())
    }

    async fn list_tasks(
        &self,
        account: &AccountName,
        filter: &TaskFilter<'_>,
        limit: u32,
    ) -> StoreResult<Vec<TaskSummary>> {
        tasks_where(&self.reader, account, filter, None, limit).await
    }

    async fn list_items(&self, account: &AccountName, filter: &ItemFilter<'_>, limit: u32) -> StoreResult<Vec<Item>> {
        let mut q = Sql::<DB>::new();
        q.sql("SELECT ").sql(ITEM_COLUMNS).sql(" FROM items WHERE account = ").text(account.as_str());
        item_conditions(&mut q, filter);
        q.sql(" ORDER BY id DESC LIMIT ").int(i64::from(limit));
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        Ok(q.rows(&mut conn).await?.iter().map(item_from_row::<DB>).collect())
    }

    async fn count_items(&self, account: &AccountName, filter: &ItemFilter<'_>) -> StoreResult<u64> {
        let mut q = Sql::<DB>::new();
        q.sql("SELECT COUNT(*) FROM items WHERE account = ").text(account.as_str());
        item_conditions(&mut q, filter);
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        let n = q.row(&mut conn).await?.map_or(0, |row| DB::int(&row, 0));
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn node_results(&self, account: &AccountName, item_ids: &[i64]) -> StoreResult<Vec<(i64, NodeResult)>> {
        let mut out = Vec::new();
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        for chunk in item_ids.chunks(ID_CHUNK) {
            let mut q = Sql::<DB>::new();
            q.template(NODE_RESULTS, &[account.into()]).list(chunk.iter().map(|id| Arg::Int(*id)));
            for row in q.sql(") ORDER BY r.item_id, r.node").rows(&mut conn).await? {
                out.push((row.int("item_id"), node_from_row::<DB>(&row)));
            }
        }
        Ok(out)
    }

    /// Items of other tasks that followed a cancelled one now run on their own.
    async fn cancel_waiting(&self, account: &AccountName, task_id: TaskId, now: Timestamp) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let args = [now.into(), task_id.into(), account.into()];
        let rows = Sql::<DB>::new().template(CANCEL, &args).rows(&mut tx).await?;
        let cancelled: Vec<i64> = rows.iter().map(|r| DB::int(r, 0)).collect();
        for chunk in cancelled.chunks(ID_CHUNK) {
            Sql::<DB>::new().sql(UNFOLLOW).list(chunk.iter().map(|id| Arg::Int(*id))).sql(")").execute(&mut tx).await?;
        }
        if !cancelled.is_empty() {
            settle_task::<DB>(&mut tx, task_id, i64::try_from(cancelled.len()).unwrap_or(0), now).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(cancelled.len() as u64)
    }

    async fn retry_failed(&self, account: &AccountName, task_id: TaskId) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let rows = Sql::<DB>::new().template(RETRY, &[task_id.into(), account.into()]).rows(&mut tx).await?;
        let retried: Vec<i64> = rows.iter().map(|r| DB::int(r, 0)).collect();
        for chunk in retried.chunks(ID_CHUNK) {
            let mut q = Sql::<DB>::new();
            q.sql(CLEAR_NODES).list(chunk.iter().map(|id| Arg::Int(*id))).sql(")").execute(&mut tx).await?;
        }
        if !retried.is_empty() {
            let args = [i64::try_from(retried.len()).unwrap_or(0).into(), task_id.into()];
            Sql::<DB>::new().template(REOPEN, &args).execute(&mut tx).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(retried.len() as u64)
    }

    async fn deliveries(&self, account: &AccountName, task_id: TaskId) -> StoreResult<Vec<Delivery>> {
        crate::outbox::deliveries(&self.reader, account, task_id).await
    }
}

/// Inserts the task's items: those without a dependency first, each joining an identical
/// waiting item if there is one; then the prefetches, linked to the refreshes they wait for,
/// whose ids are read back by URL.
async fn insert_task_items<DB: Db>(conn: &mut DB::Connection, task: &NewTask, task_id: TaskId) -> StoreResult<()> {
    let (independent, dependent): (Vec<&NewItem>, Vec<&NewItem>) =
        task.items.iter().partition(|i| i.depends_on.is_none());
    let waiting = waiting_items::<DB>(conn, task, &independent).await?;
    let leaders: Vec<Option<i64>> = independent
        .iter()
        .map(|item| {
            // A soft purge is never merged with a hard one, either way round.
            (!item.soft).then_some(())?;
            waiting
                .get(&(item.kind, item.item_type, item.url.as_str().to_owned()))
                .filter(|(_, due)| *due <= item.not_before.unwrap_or(task.created_at))
                .map(|(id, _)| *id)
        })
        .collect();
    insert_items::<DB>(conn, task, task_id, &independent, |i| leaders[i], |_| None).await?;
    if dependent.is_empty() {
        return Ok(());
    }
    let rows = Sql::<DB>::new().template(REFRESHES, &[task_id.into()]).rows(conn).await?;
    let ids: HashMap<String, i64> = rows.iter().map(|r| (r.text("url"), r.int("id"))).collect();
    let depends = |i: usize| {
        dependent[i].depends_on.and_then(|d| task.items.get(d)).and_then(|r| ids.get(r.url.as_str()).copied())
    };
    insert_items::<DB>(conn, task, task_id, &dependent, |_| None, depends).await
}

/// Coalescing: an identical item of this account that is still waiting, unclaimed and due no
/// later than the new one is executed once for both. Looked up a few hundred URLs per statement,
/// through the (account, kind, url, created_at) index. Returns the oldest such item of each
/// (kind, type, URL), with when it is due.
async fn waiting_items<DB: Db>(
    conn: &mut DB::Connection,
    task: &NewTask,
    items: &[&NewItem],
) -> StoreResult<HashMap<(Kind, ItemType, String), (i64, Timestamp)>> {
    let mut waiting: HashMap<(Kind, ItemType, String), (i64, Timestamp)> = HashMap::new();
    for kind in [Kind::Refresh, Kind::Prefetch] {
        for item_type in [ItemType::Url, ItemType::Dir] {
            let urls: Vec<&str> =
                items.iter().filter(|i| i.kind == kind && i.item_type == item_type).map(|i| i.url.as_str()).collect();
            for chunk in urls.chunks(COALESCE_CHUNK) {
                let mut q = Sql::<DB>::new();
                q.template(COALESCE_HEAD, &[(&task.account).into(), kind.as_str().into()]);
                q.list(chunk.iter().map(|url| Arg::Text(url)));
                q.template(
                    COALESCE_TAIL,
                    &[task.created_at.plus_millis(-COALESCE_WINDOW_MS).into(), item_type.as_str().into()],
                );
                for row in q.rows(conn).await? {
                    let found: (i64, Timestamp) = (row.int("id"), row.time("not_before"));
                    let entry = waiting.entry((kind, item_type, row.text("url"))).or_insert(found);
                    if found.0 < entry.0 {
                        *entry = found;
                    }
                }
            }
        }
    }
    Ok(waiting)
}

/// Inserts items in chunks; `follows(i)` and `depends(i)` give the links of the `i`-th.
async fn insert_items<DB: Db>(
    conn: &mut DB::Connection,
    task: &NewTask,
    task_id: TaskId,
    items: &[&NewItem],
    follows: impl Fn(usize) -> Option<i64>,
    depends: impl Fn(usize) -> Option<i64>,
) -> StoreResult<()> {
    for (chunk_no, chunk) in items.chunks(DB::INSERT_CHUNK).enumerate() {
        let rows = chunk.iter().enumerate().map(|(i, item)| {
            let index = chunk_no * DB::INSERT_CHUNK + i;
            [
                task_id.into(),
                (&task.account).into(),
                item.kind.as_str().into(),
                item.url.as_str().into(),
                item.url.host().into(),
                item.item_type.as_str().into(),
                (&task.operator).into(),
                task.created_at.into(),
                item.not_before.unwrap_or(task.created_at).into(),
                follows(index).into(),
                depends(index).into(),
                i64::from(item.soft).into(),
            ]
        });
        Sql::<DB>::new().sql(INSERT_ITEMS).values(rows).execute(conn).await?;
    }
    Ok(())
}

/// `n` more of the task's items became final: count them down, and record when the last one did.
pub(crate) async fn settle_task<DB: Db>(
    conn: &mut DB::Connection,
    task_id: TaskId,
    n: i64,
    now: Timestamp,
) -> StoreResult<()> {
    Sql::<DB>::new().template(SETTLE, &[n.into(), n.into(), now.into(), task_id.into()]).execute(conn).await?;
    Ok(())
}

/// The account's tasks matching `filter` (and `id`), newest first, with their status counts.
async fn tasks_where<DB: Db>(
    pool: &sqlx::Pool<DB>,
    account: &AccountName,
    filter: &TaskFilter<'_>,
    id: Option<TaskId>,
    limit: u32,
) -> StoreResult<Vec<TaskSummary>> {
    let mut q = Sql::<DB>::new();
    q.template(TASKS, &[account.into()]);
    q.and([
        ("id = ", id.map(Arg::from)),
        ("kind = ", filter.kind.map(|kind| Arg::Text(kind.as_str()))),
        ("id < ", filter.before_id.map(Arg::Int)),
        ("created_at >= ", filter.since.map(Arg::from)),
        ("created_at < ", filter.until.map(Arg::from)),
    ]);
    match filter.state {
        Some(TaskState::Running) => q.sql(" AND pending > 0"),
        Some(TaskState::Completed) => q.sql(" AND pending = 0 AND NOT ").sql(TASK_FAILED),
        Some(TaskState::Failed) => q.sql(" AND pending = 0 AND ").sql(TASK_FAILED),
        None => &mut q,
    };
    if let Some(url) = filter.url {
        q.sql(" AND EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND items.url = ").text(url).sql(")");
    }
    if let Some(domain) = filter.domain {
        q.sql(" AND EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND ");
        host_filter(&mut q, "items.host", domain).sql(")");
    }
    q.sql(" ORDER BY id DESC LIMIT ").int(i64::from(limit));
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let mut tasks: Vec<TaskSummary> = q.rows(&mut conn).await?.iter().map(task_from_row::<DB>).collect();
    if tasks.is_empty() {
        return Ok(tasks);
    }
    let mut q = Sql::<DB>::new();
    q.sql(TASK_COUNTS).list(tasks.iter().map(|t| Arg::from(t.id))).sql(") GROUP BY task_id, status");
    for row in q.rows(&mut conn).await? {
        let task_id = row.task_id("task_id");
        let status: ItemStatus = row.text("status").parse().unwrap_or(ItemStatus::Processing);
        if let Some(t) = tasks.iter_mut().find(|t| t.id == task_id) {
            t.counts.add(status, u64::try_from(row.int("n")).unwrap_or(0));
        }
    }
    Ok(tasks)
}

/// A task from a row of `TASKS`, without its counts.
fn task_from_row<DB: Db>(row: &DB::Row) -> TaskSummary {
    TaskSummary {
        id: row.task_id("id"),
        account: row.text("account"),
        kind: row.text("kind").parse().unwrap_or(TaskKind::Refresh),
        operator: row.text("operator"),
        dialect: row.text("dialect"),
        created_at: row.time("created_at"),
        finished_at: row.opt_time("finished_at"),
        counts: StatusCounts::default(),
    }
}

/// Writes the native lists' `domain` filter on `column`: the host is the domain or ends in
/// `.domain`. The same on both backends (domains are checked and written in lower case, like
/// hosts), and no `LIKE`, whose bound pattern SQLite prepares again on every execution (and
/// where `_` would be a wildcard). A host shorter than the suffix yields a shorter text.
fn host_filter<'q, 'a, W: SqlWriter<'a>>(q: &'q mut W, column: &str, domain: &'a str) -> &'q mut W {
    let suffix = format!(".{domain}");
    q.sql("(").sql(column).sql(" = ").text(domain);
    q.sql(" OR substr(").sql(column).sql(", length(").sql(column).sql(") - length(").bind(suffix.clone().into());
    q.sql(") + 1) = ").bind(suffix.into()).sql(")")
}

/// Appends the conditions of the native item list's `filter` (after `WHERE account = …`), the
/// same for a page (`list_items`) and its total (`count_items`). The URL substring is matched
/// with the backend's exact `POSITION` function: no `LIKE`, whose `%` and `_` would be
/// wildcards and which SQLite compares without case.
fn item_conditions<'a, DB: Db>(q: &mut Sql<'a, DB>, filter: &ItemFilter<'a>) {
    q.and([
        ("task_id = ", filter.task_id.map(Arg::from)),
        ("kind = ", filter.kind.map(|kind| Arg::Text(kind.as_str()))),
        ("status = ", filter.status.map(|status| Arg::Text(status.as_str()))),
        ("url = ", filter.url.map(Arg::Text)),
    ]);
    if let Some(domain) = filter.domain {
        host_filter(q.sql(" AND "), "host", domain);
    }
    if let Some(text) = filter.url_contains.filter(|t| !t.is_empty()) {
        q.sql(" AND ").sql(DB::POSITION).sql("(url, ").text(text).sql(") > 0");
    }
    q.and([
        ("created_at >= ", filter.since.map(Arg::from)),
        ("created_at < ", filter.until.map(Arg::from)),
        ("id < ", filter.before_id.map(Arg::Int)),
    ]);
}
