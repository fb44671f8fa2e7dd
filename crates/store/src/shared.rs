//! The store operations whose SQL is the same on SQLite and PostgreSQL, written once: a macro
//! expands them into inherent methods of each backend, which its `Store` impl forwards to.
//! Every statement goes through `QueryBuilder`, which writes each backend's own placeholders.
//! What differs between the backends (claims, window queries, plans) stays in their modules.

/// Writes the native lists' `domain` filter on `column`: the host is the domain or ends in
/// `.domain`. The same on both backends (domains are checked and written in lower case, like
/// hosts), and no `LIKE`, whose bound pattern SQLite prepares again on every execution (and
/// where `_` would be a wildcard). A host shorter than the suffix yields a shorter text.
pub(crate) fn push_host_filter<'a, DB: sqlx::Database>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    column: &str,
    domain: &'a str,
) where
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let suffix = format!(".{domain}");
    q.push(format_args!("({column} = "))
        .push_bind(domain)
        .push(format_args!(" OR substr({column}, length({column}) - length("))
        .push_bind(suffix.clone())
        .push(") + 1) = ")
        .push_bind(suffix)
        .push(")");
}

/// Expands the shared operations for a backend: `$store` the store type, `$db` the sqlx
/// database, `$read`/`$write` its read and write pools, `$rows` its row-mapper module.
macro_rules! shared_operations {
    ($store:ty, $db:ty, $read:ident, $write:ident, $rows:path) => {
        use $rows as row_mappers;

        impl $store {
            /// Stores a task (see `Store::create_task`): idempotency check, quota charges,
            /// coalescing with waiting items, refresh-then-prefetch links, counters.
            pub(crate) async fn shared_create_task(&self, task: &NewTask, charges: &[QuotaCharge]) -> StoreResult<i64> {
                let mut tx = self.$write.begin().await.map_err(unavailable)?;
                if let Some(idem) = &task.idempotency {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("SELECT id, request_hash FROM tasks WHERE account = ");
                    q.push_bind(&task.account).push(" AND idempotency_key = ").push_bind(&idem.key);
                    if let Some(row) = q.build().fetch_optional(&mut *tx).await.map_err(unavailable)? {
                        let hash: Option<String> = row.get("request_hash");
                        return if hash.as_deref() == Some(idem.request_hash.as_str()) {
                            Ok(row.get("id"))
                        } else {
                            Err(StoreError::IdempotencyConflict)
                        };
                    }
                }
                for charge in charges {
                    let amount = i64::try_from(charge.amount).unwrap_or(i64::MAX);
                    let limit = i64::try_from(charge.limit).unwrap_or(i64::MAX);
                    // A conditional upsert: the counter row's lock serializes concurrent
                    // submissions (several instances on PostgreSQL), which together can never
                    // spend more than the limit.
                    let charged: Option<i64> = if amount > limit {
                        None
                    } else {
                        let mut q: QueryBuilder<'_, $db> =
                            QueryBuilder::new("INSERT INTO quota_usage (account, bucket, day, used) VALUES (");
                        q.push_bind(&task.account)
                            .push(", ")
                            .push_bind(charge.bucket.as_str())
                            .push(", ")
                            .push_bind(&charge.day)
                            .push(", ")
                            .push_bind(amount)
                            .push(
                                ") ON CONFLICT (account, bucket, day) DO UPDATE SET used = quota_usage.used + excluded.used \
                                 WHERE quota_usage.used + excluded.used <= ",
                            )
                            .push_bind(limit)
                            .push(" RETURNING used");
                        q.build_query_scalar().fetch_optional(&mut *tx).await.map_err(unavailable)?
                    };
                    if charged.is_none() {
                        let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("SELECT used FROM quota_usage WHERE account = ");
                        q.push_bind(&task.account)
                            .push(" AND bucket = ")
                            .push_bind(charge.bucket.as_str())
                            .push(" AND day = ")
                            .push_bind(&charge.day);
                        let used: Option<i64> = q.build_query_scalar().fetch_optional(&mut *tx).await.map_err(unavailable)?;
                        let used = u64::try_from(used.unwrap_or(0)).unwrap_or(0);
                        return Err(StoreError::QuotaExceeded { bucket: charge.bucket, used, limit: charge.limit });
                    }
                }
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "INSERT INTO tasks (account, kind, operator, dialect, created_at, pending, notified, idempotency_key, request_hash) VALUES (",
                );
                q.push_bind(&task.account)
                    .push(", ")
                    .push_bind(task.kind.as_str())
                    .push(", ")
                    .push_bind(&task.operator)
                    .push(", ")
                    .push_bind(&task.dialect)
                    .push(", ")
                    .push_bind(task.created_at)
                    .push(", ")
                    .push_bind(i64::try_from(task.items.len()).unwrap_or(i64::MAX))
                    .push(", 0, ")
                    .push_bind(task.idempotency.as_ref().map(|i| i.key.clone()))
                    .push(", ")
                    .push_bind(task.idempotency.as_ref().map(|i| i.request_hash.clone()))
                    .push(") RETURNING id");
                let task_id: i64 = q.build_query_scalar().fetch_one(&mut *tx).await.map_err(unavailable)?;
                for kind in [Kind::Refresh, Kind::Prefetch] {
                    let n = task.items.iter().filter(|i| i.kind == kind).count();
                    if n == 0 {
                        continue;
                    }
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("INSERT INTO item_counts (account, kind, hour, n) VALUES (");
                    q.push_bind(&task.account)
                        .push(", ")
                        .push_bind(kind.as_str())
                        .push(", ")
                        .push_bind(task.created_at.div_euclid(crate::HOUR_MS))
                        .push(", ")
                        .push_bind(i64::try_from(n).unwrap_or(i64::MAX))
                        .push(") ON CONFLICT (account, kind, hour) DO UPDATE SET n = item_counts.n + excluded.n");
                    q.build().execute(&mut *tx).await.map_err(unavailable)?;
                }
                // Items without a dependency first; the ids of the refreshes that prefetches wait
                // for are read back by URL, then the dependent items go in.
                let (independent, dependent): (Vec<&NewItem>, Vec<&NewItem>) =
                    task.items.iter().partition(|i| i.depends_on.is_none());
                // Coalescing: an identical item of this account that is still waiting, unclaimed
                // and due no later than the new one is executed once for both. Looked up a few
                // hundred URLs per statement, through the (account, kind, url, created_at) index.
                let mut waiting: std::collections::HashMap<(Kind, ItemType, String), (i64, Millis)> =
                    std::collections::HashMap::new();
                for kind in [Kind::Refresh, Kind::Prefetch] {
                    for item_type in [ItemType::Url, ItemType::Dir] {
                        let urls: Vec<&str> = independent
                            .iter()
                            .filter(|i| i.kind == kind && i.item_type == item_type)
                            .map(|i| i.url.as_str())
                            .collect();
                        for chunk in urls.chunks(400) {
                            let mut q: QueryBuilder<'_, $db> =
                                QueryBuilder::new("SELECT id, url, not_before FROM items WHERE account = ");
                            q.push_bind(&task.account).push(" AND kind = ").push_bind(kind.as_str()).push(" AND url IN (");
                            let mut list = q.separated(", ");
                            for url in chunk {
                                list.push_bind(*url);
                            }
                            q.push(") AND created_at >= ")
                                .push_bind(task.created_at - COALESCE_WINDOW_MS)
                                .push(" AND item_type = ")
                                .push_bind(item_type.as_str())
                                .push(" AND status = 'waiting' AND lease_owner IS NULL AND follows IS NULL AND depends_on IS NULL");
                            for row in q.build().fetch_all(&mut *tx).await.map_err(unavailable)? {
                                let key = (kind, item_type, row.get::<String, _>("url"));
                                let found: (i64, Millis) = (row.get("id"), row.get("not_before"));
                                let entry = waiting.entry(key).or_insert(found);
                                if found.0 < entry.0 {
                                    *entry = found;
                                }
                            }
                        }
                    }
                }
                let leaders: Vec<Option<i64>> = independent
                    .iter()
                    .map(|item| {
                        waiting
                            .get(&(item.kind, item.item_type, item.url.clone()))
                            .filter(|(_, due)| *due <= item.not_before.unwrap_or(task.created_at))
                            .map(|(id, _)| *id)
                    })
                    .collect();
                insert_items(&mut tx, task, task_id, &independent, |i| leaders[i], |_| None).await?;
                if !dependent.is_empty() {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("SELECT id, url FROM items WHERE task_id = ");
                    q.push_bind(task_id).push(" AND depends_on IS NULL AND kind = 'refresh'");
                    let rows = q.build().fetch_all(&mut *tx).await.map_err(unavailable)?;
                    let ids: std::collections::HashMap<String, i64> =
                        rows.iter().map(|r| (r.get::<String, _>("url"), r.get::<i64, _>("id"))).collect();
                    let depends = |i: usize| {
                        dependent[i].depends_on.and_then(|d| task.items.get(d)).and_then(|r| ids.get(&r.url).copied())
                    };
                    insert_items(&mut tx, task, task_id, &dependent, |_| None, depends).await?;
                }
                tx.commit().await.map_err(unavailable)?;
                Ok(task_id)
            }

            /// Applies worker updates (see `Store::apply_updates`).
            pub(crate) async fn shared_apply_updates(&self, updates: &[ItemUpdate]) -> StoreResult<()> {
                // One row per item and one per (item, node): a batch often holds several reports
                // of the same item, and only its latest state needs writing.
                let updates = crate::shared::merge_updates(updates);
                let mut tx = self.$write.begin().await.map_err(unavailable)?;
                let nodes: Vec<(i64, &NodeResult)> =
                    updates.iter().flat_map(|u| u.nodes.iter().map(move |n| (u.item_id, n))).collect();
                for chunk in nodes.chunks(crate::shared::NODE_CHUNK) {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                        "INSERT INTO node_results (item_id, node, state, attempts, status_code, error, updated_at, instance) ",
                    );
                    q.push_values(chunk, |mut row, (item_id, node)| {
                        row.push_bind(*item_id)
                            .push_bind(&node.node)
                            .push_bind(node.state.as_str())
                            .push_bind(i64::from(node.attempts))
                            .push_bind(node.status_code.map(i64::from))
                            .push_bind(node.error.clone())
                            .push_bind(node.updated_at)
                            .push_bind(&node.instance);
                    });
                    q.push(
                        " ON CONFLICT (item_id, node) DO UPDATE SET state = excluded.state, attempts = excluded.attempts, \
                         status_code = excluded.status_code, error = excluded.error, updated_at = excluded.updated_at, \
                         instance = excluded.instance",
                    );
                    q.build().execute(&mut *tx).await.map_err(unavailable)?;
                }
                // The items, their coalesced followers and their dependent prefetches, each in
                // statements of up to ITEM_CHUNK rows. Within a batch every item appears once, and
                // followers and dependents are never claimed themselves, so no row is written twice.
                let by_id: std::collections::HashMap<i64, &ItemUpdate> = updates.iter().map(|u| (u.item_id, u)).collect();
                // The reports their items took, with each item's task.
                let mut moved: Vec<(&ItemUpdate, i64)> = Vec::new();
                for chunk in updates.chunks(crate::shared::ITEM_CHUNK) {
                    let rows: Vec<(i64, i64)> = Self::items_update("", chunk).build_query_as().fetch_all(&mut *tx).await.map_err(unavailable)?;
                    moved.extend(rows.into_iter().filter_map(|(id, task)| Some((*by_id.get(&id)?, task))));
                }
                // (task id, the report that made it final) of every item that became final.
                let mut finished: Vec<(i64, &ItemUpdate)> =
                    moved.iter().filter(|(u, _)| Self::is_transition(u)).map(|(u, task)| (*task, *u)).collect();
                // Items coalesced with a moved item mirror it: when it starts and when it ends.
                let mirrored: Vec<&ItemUpdate> =
                    moved.iter().map(|(u, _)| *u).filter(|u| Self::is_transition(u) || u.nodes.is_empty()).collect();
                for chunk in mirrored.chunks(crate::shared::ITEM_CHUNK) {
                    let followers: Vec<(i64, i64)> = Self::followers_update("", chunk).build_query_as().fetch_all(&mut *tx).await.map_err(unavailable)?;
                    finished.extend(followers.into_iter().filter_map(|(task, leader)| {
                        by_id.get(&leader).copied().filter(|u| Self::is_transition(u)).map(|u| (task, u))
                    }));
                }
                // A prefetch never runs after its refresh failed.
                let failed: Vec<&ItemUpdate> = moved
                    .iter()
                    .map(|(u, _)| *u)
                    .filter(|u| Self::is_transition(u) && u.status == ItemStatus::Failed)
                    .collect();
                for chunk in failed.chunks(crate::shared::ITEM_CHUNK) {
                    let dependents: Vec<(i64, i64)> = Self::dependents_update("", chunk).build_query_as().fetch_all(&mut *tx).await.map_err(unavailable)?;
                    finished.extend(dependents.into_iter().filter_map(|(task, refresh)| Some((task, *by_id.get(&refresh)?))));
                }
                // Task counters are settled last, one statement per task in id order: instances
                // sharing a database then lock task rows in the same order and cannot deadlock.
                let mut settle: std::collections::BTreeMap<i64, (i64, Millis)> = std::collections::BTreeMap::new();
                for (task, update) in finished {
                    let at = update.finished_at.unwrap_or_default();
                    let entry = settle.entry(task).or_insert((0, 0));
                    entry.0 += 1;
                    entry.1 = entry.1.max(at);
                }
                for (task, (n, at)) in settle {
                    settle_task(&mut tx, task, n, at).await?;
                }
                tx.commit().await.map_err(unavailable)?;
                Ok(())
            }

            /// Whether a report makes its item final now (rather than repeating a final state).
            fn is_transition(update: &ItemUpdate) -> bool {
                update.status.is_final() && update.finished_at.is_some()
            }

            /// Writes the reports' state into their items; returns `(id, task_id)` of each item
            /// that took it. A report that is not a transition to a final state never moves a
            /// final item (a late report) and sets no status on it; a transition releases the
            /// lease. `prefix` is `""` to run it or `EXPLAIN …` to check its plan.
            pub(crate) fn items_update<'a>(prefix: &str, chunk: &'a [ItemUpdate]) -> QueryBuilder<'a, $db> {
                let mut q: QueryBuilder<'a, $db> = QueryBuilder::new(format!(
                    "{prefix}UPDATE items SET progress = u.column2, \
                     status = CASE WHEN u.column3 THEN u.column4 ELSE items.status END, \
                     started_at = COALESCE(items.started_at, u.column5), \
                     finished_at = COALESCE(u.column6, items.finished_at), \
                     reason = COALESCE(u.column7, items.reason), \
                     lease_owner = CASE WHEN u.column8 THEN NULL ELSE items.lease_owner END, \
                     lease_until = CASE WHEN u.column8 THEN NULL ELSE items.lease_until END \
                     FROM ("
                ));
                q.push_values(chunk, |mut row, u| {
                    let transition = Self::is_transition(u);
                    let guarded = !u.status.is_final() || transition;
                    row.push_bind(u.item_id)
                        .push_bind(i64::from(u.progress))
                        .push_bind(guarded)
                        .push_bind(u.status.as_str())
                        .push_bind(u.started_at)
                        .push_bind(u.finished_at)
                        .push_bind(u.reason.as_deref())
                        .push_bind(transition);
                });
                q.push(
                    ") AS u \
                     WHERE items.id = u.column1 AND (NOT u.column3 OR items.status NOT IN ('completed', 'failed')) \
                     RETURNING items.id, items.task_id",
                );
                q
            }

            /// Mirrors each leader's report into the items coalesced with it; returns
            /// `(task_id, leader id)` of each follower that took it.
            pub(crate) fn followers_update<'a>(prefix: &str, chunk: &[&'a ItemUpdate]) -> QueryBuilder<'a, $db> {
                let mut q: QueryBuilder<'a, $db> = QueryBuilder::new(format!(
                    "{prefix}UPDATE items SET status = u.column2, progress = u.column3, \
                     started_at = COALESCE(items.started_at, u.column4), finished_at = u.column5, reason = u.column6 \
                     FROM ("
                ));
                q.push_values(chunk.iter().copied(), |mut row, u| {
                    row.push_bind(u.item_id)
                        .push_bind(u.status.as_str())
                        .push_bind(i64::from(u.progress))
                        .push_bind(u.started_at)
                        .push_bind(u.finished_at)
                        .push_bind(u.reason.as_deref());
                });
                q.push(") AS u WHERE items.follows IN (");
                let mut ids = q.separated(", ");
                for u in chunk {
                    ids.push_bind(u.item_id);
                }
                q.push(
                    ") AND items.follows = u.column1 AND items.status NOT IN ('completed', 'failed') \
                     RETURNING items.task_id, items.follows",
                );
                q
            }

            /// Fails the waiting prefetches that depended on each failed refresh; returns
            /// `(task_id, refresh id)` of each.
            pub(crate) fn dependents_update<'a>(prefix: &str, chunk: &[&'a ItemUpdate]) -> QueryBuilder<'a, $db> {
                let mut q: QueryBuilder<'a, $db> = QueryBuilder::new(format!(
                    "{prefix}UPDATE items SET status = 'failed', reason = 'its refresh failed', finished_at = u.column2 \
                     FROM ("
                ));
                q.push_values(chunk.iter().copied(), |mut row, u| {
                    row.push_bind(u.item_id).push_bind(u.finished_at);
                });
                q.push(") AS u WHERE items.depends_on IN (");
                let mut ids = q.separated(", ");
                for u in chunk {
                    ids.push_bind(u.item_id);
                }
                q.push(
                    ") AND items.depends_on = u.column1 AND items.status = 'waiting' \
                     RETURNING items.task_id, items.depends_on",
                );
                q
            }

            pub(crate) async fn shared_task(&self, account: &str, task_id: i64) -> StoreResult<Option<TaskSummary>> {
                let filter = TaskFilter::default();
                let mut tasks = self.tasks_where(account, &filter, Some(task_id), 1).await?;
                Ok(tasks.pop())
            }

            pub(crate) async fn shared_list_tasks(&self, account: &str, filter: &TaskFilter<'_>, limit: u32) -> StoreResult<Vec<TaskSummary>> {
                self.tasks_where(account, filter, None, limit).await
            }

            async fn tasks_where(&self, account: &str, filter: &TaskFilter<'_>, id: Option<i64>, limit: u32) -> StoreResult<Vec<TaskSummary>> {
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "SELECT id, account, kind, operator, dialect, created_at, finished_at, pending FROM tasks WHERE account = ",
                );
                q.push_bind(account);
                if let Some(id) = id {
                    q.push(" AND id = ").push_bind(id);
                }
                if let Some(kind) = filter.kind {
                    q.push(" AND kind = ").push_bind(kind.as_str());
                }
                if let Some(before) = filter.before_id {
                    q.push(" AND id < ").push_bind(before);
                }
                if let Some(since) = filter.since {
                    q.push(" AND created_at >= ").push_bind(since);
                }
                if let Some(until) = filter.until {
                    q.push(" AND created_at < ").push_bind(until);
                }
                match filter.state {
                    Some(TaskState::Running) => {
                        q.push(" AND pending > 0");
                    }
                    Some(TaskState::Completed) => {
                        q.push(" AND pending = 0 AND NOT EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND items.status = 'failed')");
                    }
                    Some(TaskState::Failed) => {
                        q.push(" AND pending = 0 AND EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND items.status = 'failed')");
                    }
                    None => {}
                }
                if let Some(url) = filter.url {
                    q.push(" AND EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND items.url = ").push_bind(url).push(")");
                }
                if let Some(domain) = filter.domain {
                    q.push(" AND EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id AND ");
                    $crate::shared::push_host_filter(&mut q, "items.host", domain);
                    q.push(")");
                }
                q.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(limit));
                let rows = q.build().fetch_all(&self.$read).await.map_err(unavailable)?;
                let mut tasks: Vec<TaskSummary> = rows
                    .iter()
                    .map(|r| TaskSummary {
                        id: r.get("id"),
                        account: r.get("account"),
                        kind: r.get::<String, _>("kind").parse().unwrap_or(TaskKind::Refresh),
                        operator: r.get("operator"),
                        dialect: r.get("dialect"),
                        created_at: r.get("created_at"),
                        finished_at: r.get("finished_at"),
                        counts: StatusCounts::default(),
                    })
                    .collect();
                if tasks.is_empty() {
                    return Ok(tasks);
                }
                let mut q: QueryBuilder<'_, $db> =
                    QueryBuilder::new("SELECT task_id, status, COUNT(*) AS n FROM items WHERE task_id IN (");
                let mut list = q.separated(", ");
                for t in &tasks {
                    list.push_bind(t.id);
                }
                q.push(") GROUP BY task_id, status");
                for row in q.build().fetch_all(&self.$read).await.map_err(unavailable)? {
                    let task_id: i64 = row.get("task_id");
                    let status: ItemStatus = row.get::<String, _>("status").parse().unwrap_or(ItemStatus::Processing);
                    let n: i64 = row.get("n");
                    if let Some(t) = tasks.iter_mut().find(|t| t.id == task_id) {
                        t.counts.add(status, u64::try_from(n).unwrap_or(0));
                    }
                }
                Ok(tasks)
            }

            pub(crate) async fn shared_list_items(&self, account: &str, filter: &ItemFilter<'_>, limit: u32) -> StoreResult<Vec<Item>> {
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(format!("SELECT {} FROM items WHERE account = ", crate::rows::ITEM_COLUMNS));
                q.push_bind(account);
                if let Some(task_id) = filter.task_id {
                    q.push(" AND task_id = ").push_bind(task_id);
                }
                if let Some(kind) = filter.kind {
                    q.push(" AND kind = ").push_bind(kind.as_str());
                }
                if let Some(status) = filter.status {
                    q.push(" AND status = ").push_bind(status.as_str());
                }
                if let Some(url) = filter.url {
                    q.push(" AND url = ").push_bind(url);
                }
                if let Some(domain) = filter.domain {
                    q.push(" AND ");
                    $crate::shared::push_host_filter(&mut q, "host", domain);
                }
                if let Some(since) = filter.since {
                    q.push(" AND created_at >= ").push_bind(since);
                }
                if let Some(until) = filter.until {
                    q.push(" AND created_at < ").push_bind(until);
                }
                if let Some(before) = filter.before_id {
                    q.push(" AND id < ").push_bind(before);
                }
                q.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(limit));
                let rows = q.build().fetch_all(&self.$read).await.map_err(unavailable)?;
                Ok(rows.iter().map(row_mappers::item_from_row).collect())
            }

            pub(crate) async fn shared_node_results(&self, account: &str, item_ids: &[i64]) -> StoreResult<Vec<(i64, NodeResult)>> {
                let mut out = Vec::new();
                for chunk in item_ids.chunks(500) {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                        "SELECT r.item_id, r.node, r.state, r.attempts, r.status_code, r.error, r.updated_at, r.instance \
                         FROM node_results r JOIN items i ON i.id = r.item_id WHERE i.account = ",
                    );
                    q.push_bind(account).push(" AND r.item_id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(") ORDER BY r.item_id, r.node");
                    for row in q.build().fetch_all(&self.$read).await.map_err(unavailable)? {
                        out.push((row.get("item_id"), row_mappers::node_from_row(&row)));
                    }
                }
                Ok(out)
            }

            pub(crate) async fn shared_cancel_waiting(&self, account: &str, task_id: i64, now: Millis) -> StoreResult<u64> {
                let mut tx = self.$write.begin().await.map_err(unavailable)?;
                let mut q: QueryBuilder<'_, $db> =
                    QueryBuilder::new("UPDATE items SET status = 'failed', reason = 'cancelled', finished_at = ");
                q.push_bind(now)
                    .push(" WHERE task_id = ")
                    .push_bind(task_id)
                    .push(" AND account = ")
                    .push_bind(account)
                    .push(" AND status = 'waiting' AND lease_owner IS NULL RETURNING id");
                let cancelled: Vec<i64> = q.build_query_scalar().fetch_all(&mut *tx).await.map_err(unavailable)?;
                for chunk in cancelled.chunks(500) {
                    // Items of other tasks that followed a cancelled one now run on their own;
                    // prefetches that waited for a cancelled refresh are cancelled with it.
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("UPDATE items SET follows = NULL WHERE follows IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    q.build().execute(&mut *tx).await.map_err(unavailable)?;
                }
                if !cancelled.is_empty() {
                    settle_task(&mut tx, task_id, i64::try_from(cancelled.len()).unwrap_or(0), now).await?;
                }
                tx.commit().await.map_err(unavailable)?;
                Ok(cancelled.len() as u64)
            }

            pub(crate) async fn shared_retry_failed(&self, account: &str, task_id: i64) -> StoreResult<u64> {
                let mut tx = self.$write.begin().await.map_err(unavailable)?;
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "UPDATE items SET status = 'waiting', progress = 0, started_at = NULL, finished_at = NULL, reason = NULL, \
                     lease_owner = NULL, lease_until = NULL, follows = NULL WHERE task_id = ",
                );
                q.push_bind(task_id).push(" AND account = ").push_bind(account).push(" AND status = 'failed' RETURNING id");
                let retried: Vec<i64> = q.build_query_scalar().fetch_all(&mut *tx).await.map_err(unavailable)?;
                for chunk in retried.chunks(500) {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("DELETE FROM node_results WHERE item_id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    q.build().execute(&mut *tx).await.map_err(unavailable)?;
                }
                if !retried.is_empty() {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("UPDATE tasks SET pending = pending + ");
                    q.push_bind(i64::try_from(retried.len()).unwrap_or(0))
                        .push(", finished_at = NULL, notified = 0 WHERE id = ")
                        .push_bind(task_id);
                    q.build().execute(&mut *tx).await.map_err(unavailable)?;
                }
                tx.commit().await.map_err(unavailable)?;
                Ok(retried.len() as u64)
            }

            pub(crate) async fn shared_dispatch_finished(
                &self,
                urls: &std::collections::HashMap<String, Vec<String>>,
                now: Millis,
                limit: u32,
            ) -> StoreResult<u64> {
                let mut tx = self.$write.begin().await.map_err(unavailable)?;
                let mut q: QueryBuilder<'_, $db> =
                    QueryBuilder::new("SELECT id, account FROM tasks WHERE finished_at IS NOT NULL AND notified = 0 ORDER BY id LIMIT ");
                q.push_bind(i64::from(limit));
                let rows = q.build().fetch_all(&mut *tx).await.map_err(unavailable)?;
                for row in &rows {
                    let task_id: i64 = row.get("id");
                    let account: String = row.get("account");
                    for url in urls.get(&account).into_iter().flatten() {
                        let mut q: QueryBuilder<'_, $db> =
                            QueryBuilder::new("INSERT INTO webhook_jobs (task_id, account, url, next_at) VALUES (");
                        q.push_bind(task_id)
                            .push(", ")
                            .push_bind(&account)
                            .push(", ")
                            .push_bind(url)
                            .push(", ")
                            .push_bind(now)
                            .push(") ON CONFLICT (task_id, url) DO UPDATE SET state = 'pending', attempts = 0, next_at = excluded.next_at");
                        q.build().execute(&mut *tx).await.map_err(unavailable)?;
                    }
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("UPDATE tasks SET notified = 1 WHERE id = ");
                    q.push_bind(task_id);
                    q.build().execute(&mut *tx).await.map_err(unavailable)?;
                }
                tx.commit().await.map_err(unavailable)?;
                Ok(rows.len() as u64)
            }

            pub(crate) async fn shared_claim_webhook_jobs(&self, now: Millis, lease_until: Millis, limit: u32, lock: &str) -> StoreResult<Vec<WebhookJob>> {
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("UPDATE webhook_jobs SET lease_until = ");
                q.push_bind(lease_until)
                    .push(" WHERE id IN (SELECT id FROM webhook_jobs WHERE state = 'pending' AND next_at <= ")
                    .push_bind(now)
                    .push(" AND (lease_until IS NULL OR lease_until < ")
                    .push_bind(now)
                    .push(") ORDER BY next_at LIMIT ")
                    .push_bind(i64::from(limit))
                    .push(lock)
                    .push(") RETURNING id, task_id, account, url, attempts");
                let rows = q.build().fetch_all(&self.$write).await.map_err(unavailable)?;
                Ok(rows
                    .iter()
                    .map(|r| WebhookJob {
                        id: r.get("id"),
                        task_id: r.get("task_id"),
                        account: r.get("account"),
                        url: r.get("url"),
                        attempts: u32::try_from(r.get::<i64, _>("attempts")).unwrap_or(0),
                    })
                    .collect())
            }

            pub(crate) async fn shared_record_delivery(&self, job: &WebhookJob, attempt: &Delivery, outcome: DeliveryOutcome) -> StoreResult<()> {
                let mut tx = self.$write.begin().await.map_err(unavailable)?;
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "INSERT INTO webhook_deliveries (job_id, task_id, account, url, attempt, status_code, error, at) VALUES (",
                );
                q.push_bind(job.id)
                    .push(", ")
                    .push_bind(job.task_id)
                    .push(", ")
                    .push_bind(&job.account)
                    .push(", ")
                    .push_bind(&job.url)
                    .push(", ")
                    .push_bind(i64::from(attempt.attempt))
                    .push(", ")
                    .push_bind(attempt.status_code.map(i64::from))
                    .push(", ")
                    .push_bind(attempt.error.clone())
                    .push(", ")
                    .push_bind(attempt.at)
                    .push(")");
                q.build().execute(&mut *tx).await.map_err(unavailable)?;
                let (state, next_at) = match outcome {
                    DeliveryOutcome::Delivered => ("delivered", attempt.at),
                    DeliveryOutcome::RetryAt(at) => ("pending", at),
                    DeliveryOutcome::GaveUp => ("failed", attempt.at),
                };
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("UPDATE webhook_jobs SET state = ");
                q.push_bind(state)
                    .push(", attempts = ")
                    .push_bind(i64::from(attempt.attempt))
                    .push(", next_at = ")
                    .push_bind(next_at)
                    .push(", lease_until = NULL WHERE id = ")
                    .push_bind(job.id);
                q.build().execute(&mut *tx).await.map_err(unavailable)?;
                tx.commit().await.map_err(unavailable)?;
                Ok(())
            }

            pub(crate) async fn shared_deliveries(&self, account: &str, task_id: i64) -> StoreResult<Vec<Delivery>> {
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "SELECT task_id, url, attempt, status_code, error, at FROM webhook_deliveries WHERE account = ",
                );
                q.push_bind(account).push(" AND task_id = ").push_bind(task_id).push(" ORDER BY id");
                let rows = q.build().fetch_all(&self.$read).await.map_err(unavailable)?;
                Ok(rows
                    .iter()
                    .map(|r| Delivery {
                        task_id: r.get("task_id"),
                        url: r.get("url"),
                        attempt: u32::try_from(r.get::<i64, _>("attempt")).unwrap_or(0),
                        status_code: r.get::<Option<i64>, _>("status_code").and_then(|c| u16::try_from(c).ok()),
                        error: r.get("error"),
                        at: r.get("at"),
                    })
                    .collect())
            }
        }

        /// Inserts items in chunks; `follows(i)` and `depends(i)` give the links of the `i`-th.
        async fn insert_items(
            tx: &mut sqlx::Transaction<'_, $db>,
            task: &NewTask,
            task_id: i64,
            items: &[&NewItem],
            follows: impl Fn(usize) -> Option<i64>,
            depends: impl Fn(usize) -> Option<i64>,
        ) -> StoreResult<()> {
            for (chunk_no, chunk) in items.chunks(INSERT_CHUNK).enumerate() {
                let mut insert: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "INSERT INTO items (task_id, account, kind, url, host, item_type, operator, created_at, not_before, follows, depends_on) ",
                );
                insert.push_values(chunk.iter().enumerate(), |mut row, (i, item)| {
                    let index = chunk_no * INSERT_CHUNK + i;
                    row.push_bind(task_id)
                        .push_bind(&task.account)
                        .push_bind(item.kind.as_str())
                        .push_bind(&item.url)
                        .push_bind(&item.host)
                        .push_bind(item.item_type.as_str())
                        .push_bind(&task.operator)
                        .push_bind(task.created_at)
                        .push_bind(item.not_before.unwrap_or(task.created_at))
                        .push_bind(follows(index))
                        .push_bind(depends(index));
                });
                insert.build().execute(&mut **tx).await.map_err(unavailable)?;
            }
            Ok(())
        }

        /// `n` more of the task's items became final: count them down, and record when the
        /// last one did.
        async fn settle_task(tx: &mut sqlx::Transaction<'_, $db>, task_id: i64, n: i64, now: Millis) -> StoreResult<()> {
            let mut q: QueryBuilder<'_, $db> = QueryBuilder::new("UPDATE tasks SET pending = pending - ");
            q.push_bind(n)
                .push(", finished_at = CASE WHEN pending - ")
                .push_bind(n)
                .push(" <= 0 THEN ")
                .push_bind(now)
                .push(" ELSE finished_at END WHERE id = ")
                .push_bind(task_id);
            q.build().execute(&mut **tx).await.map_err(unavailable)?;
            Ok(())
        }
    };
}

pub(crate) use shared_operations;

/// The `Store` impl of a backend: its own operations (`$own`), plus the shared ones forwarded to
/// the methods `shared_operations!` generated. `$lock` is what the backend appends to a
/// row-claiming subquery (`FOR UPDATE SKIP LOCKED` on PostgreSQL, nothing on SQLite, whose
/// single writer serializes claims anyway).
macro_rules! store_impl {
    ($store:ty, $lock:expr, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl Store for $store {
            $($own)*

            #[tracing::instrument(level = "debug", skip_all, fields(account = %task.account, items = task.items.len()))]
            async fn create_task(&self, task: &NewTask, charges: &[QuotaCharge]) -> StoreResult<i64> {
                self.shared_create_task(task, charges).await
            }

            #[tracing::instrument(level = "debug", skip_all, fields(updates = updates.len()))]
            async fn apply_updates(&self, updates: &[ItemUpdate]) -> StoreResult<()> {
                self.shared_apply_updates(updates).await
            }

            async fn task(&self, account: &str, task_id: i64) -> StoreResult<Option<TaskSummary>> {
                self.shared_task(account, task_id).await
            }

            async fn list_tasks(&self, account: &str, filter: &TaskFilter<'_>, limit: u32) -> StoreResult<Vec<TaskSummary>> {
                self.shared_list_tasks(account, filter, limit).await
            }

            async fn list_items(&self, account: &str, filter: &ItemFilter<'_>, limit: u32) -> StoreResult<Vec<Item>> {
                self.shared_list_items(account, filter, limit).await
            }

            async fn node_results(&self, account: &str, item_ids: &[i64]) -> StoreResult<Vec<(i64, NodeResult)>> {
                self.shared_node_results(account, item_ids).await
            }

            async fn cancel_waiting(&self, account: &str, task_id: i64, now: Millis) -> StoreResult<u64> {
                self.shared_cancel_waiting(account, task_id, now).await
            }

            async fn retry_failed(&self, account: &str, task_id: i64) -> StoreResult<u64> {
                self.shared_retry_failed(account, task_id).await
            }

            async fn dispatch_finished(
                &self,
                urls: &std::collections::HashMap<String, Vec<String>>,
                now: Millis,
                limit: u32,
            ) -> StoreResult<u64> {
                self.shared_dispatch_finished(urls, now, limit).await
            }

            async fn claim_webhook_jobs(&self, now: Millis, lease_until: Millis, limit: u32) -> StoreResult<Vec<WebhookJob>> {
                self.shared_claim_webhook_jobs(now, lease_until, limit, $lock).await
            }

            async fn record_delivery(&self, job: &WebhookJob, attempt: &Delivery, outcome: DeliveryOutcome) -> StoreResult<()> {
                self.shared_record_delivery(job, attempt, outcome).await
            }

            async fn deliveries(&self, account: &str, task_id: i64) -> StoreResult<Vec<Delivery>> {
                self.shared_deliveries(account, task_id).await
            }

        }
    };
}

pub(crate) use store_impl;

/// Node results upserted per statement (8 values each).
pub(crate) const NODE_CHUNK: usize = 500;

/// Items per batched `UPDATE … FROM (VALUES …)`: 8 bound values each.
pub(crate) const ITEM_CHUNK: usize = 500;

/// Folds a batch of worker reports into one per item, in first-seen order: the latest status
/// and progress, the first start and finish times, the latest reason, and the latest result per
/// node.
pub(crate) fn merge_updates(updates: &[cachectl_core::ItemUpdate]) -> Vec<cachectl_core::ItemUpdate> {
    let mut merged: Vec<cachectl_core::ItemUpdate> = Vec::with_capacity(updates.len());
    let mut index: std::collections::HashMap<i64, usize> = std::collections::HashMap::with_capacity(updates.len());
    for u in updates {
        match index.get(&u.item_id) {
            None => {
                index.insert(u.item_id, merged.len());
                merged.push(u.clone());
            }
            Some(&i) => {
                let m = &mut merged[i];
                m.status = u.status;
                m.progress = u.progress;
                m.started_at = m.started_at.or(u.started_at);
                m.finished_at = m.finished_at.or(u.finished_at);
                if u.reason.is_some() {
                    m.reason.clone_from(&u.reason);
                }
                for node in &u.nodes {
                    match m.nodes.iter_mut().find(|n| n.node == node.node) {
                        Some(existing) => *existing = node.clone(),
                        None => m.nodes.push(node.clone()),
                    }
                }
            }
        }
    }
    merged
}

/// How far back an identical waiting item is looked for when coalescing: a waiting item older
/// than this is stuck behind something (a down node, a schedule) and is not joined.
pub(crate) const COALESCE_WINDOW_MS: i64 = 10 * 60 * 1000;

#[cfg(test)]
mod tests {
    use super::*;
    use cachectl_core::{ItemStatus, ItemUpdate, NodeResult, NodeState};

    fn node(name: &str, state: NodeState) -> NodeResult {
        NodeResult {
            node: name.into(),
            state,
            attempts: 1,
            status_code: None,
            error: None,
            updated_at: 0,
            instance: String::new(),
        }
    }

    fn update(id: i64, status: ItemStatus, finished: Option<i64>, nodes: Vec<NodeResult>) -> ItemUpdate {
        ItemUpdate { item_id: id, status, progress: 0, started_at: Some(1), finished_at: finished, reason: None, nodes }
    }

    #[test]
    fn a_batch_folds_into_one_report_per_item() {
        let merged = merge_updates(&[
            update(1, ItemStatus::Processing, None, vec![]),
            update(2, ItemStatus::Processing, None, vec![node("a", NodeState::Pending)]),
            update(1, ItemStatus::Processing, None, vec![node("a", NodeState::Succeeded)]),
            update(1, ItemStatus::Failed, Some(9), vec![node("b", NodeState::Failed)]),
            update(1, ItemStatus::Failed, None, vec![node("a", NodeState::Succeeded)]),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].item_id, 1, "first-seen order");
        assert_eq!((merged[0].status, merged[0].finished_at), (ItemStatus::Failed, Some(9)), "the transition is kept");
        assert_eq!(merged[0].nodes.len(), 2, "one result per node");
        assert_eq!(merged[1].nodes, vec![node("a", NodeState::Pending)]);
    }
}
