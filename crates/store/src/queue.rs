//! The work queue: items leased to workers (claim, renew, release), and the workers' reports
//! written back in batches (`apply_updates`).

use crate::backend::{Backend, SqlStore};
use crate::rows::{ITEM_COLUMNS, item_from_row, node_from_row};
use crate::sql::{Arg, Db, Get as _, Sql, SqlWriter, unavailable};
use cachectl_core::store::{Backlog, Queue};
use cachectl_core::{ClaimedItem, ItemStatus, ItemUpdate, NodeResult, StoreResult, TaskId, Timestamp};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Node results upserted per statement (8 values each).
const NODE_CHUNK: usize = 500;

/// Items per batched `UPDATE … FROM (VALUES …)`: 8 bound values each.
const ITEM_CHUNK: usize = 500;

/// Leases to owner `?1` until `?2` up to `?4` runnable items at `?3`, followed by the columns
/// returned. An item is runnable when it is waiting or processing, due, not coalesced with
/// another, its refresh (if any) completed, and its lease free or expired. (The text, line breaks
/// included, is the statement's; the `\` only keeps a line within the width.)
const CLAIM: &str = "UPDATE items SET lease_owner = ?1, lease_until = ?2
             WHERE id IN (SELECT id FROM items
                          WHERE status IN ('waiting', 'processing') AND not_before <= ?3
                            AND follows IS NULL
                            AND (depends_on IS NULL OR EXISTS (SELECT 1 FROM items d \
                              WHERE d.id = items.depends_on AND d.status = 'completed'))
                            AND (lease_until IS NULL OR lease_until < ?3)
                          ORDER BY not_before, id LIMIT ?4
                          {lock})
             RETURNING ";

/// The node results stored so far of the items in the list that follows.
const CLAIMED_NODES: &str = "SELECT item_id, node, state, attempts, status_code, error, updated_at, instance \
     FROM node_results WHERE item_id IN (";

/// Extends to `?1` every lease owner `?2` holds on an unfinished item.
pub(crate) const RENEW: &str =
    "UPDATE items SET lease_until = ?1 WHERE lease_owner = ?2 AND status IN ('waiting', 'processing')";

/// Gives up every lease owner `?1` holds.
pub(crate) const RELEASE: &str = "UPDATE items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?1";

/// Followed by the ids of a batch of reports: those of its items that owner `?1` still leases,
/// or that are final with no lease (the nodes of an item that failed on one node may still
/// report; such a report sets no status, see `items_update`), then `Dialect::WAIT_LOCK`: locked
/// until the reports are written, and a row that a claim (or this owner's lease renewal) is
/// changing at this moment is read once that commits. Skipping locked rows instead would count
/// the owner's own items as lost while it renews them. An item that another worker leases is not
/// among them: its reports count, and these would make it final while it is being executed.
const HELD: &str = "SELECT id FROM items WHERE (lease_owner = ?1 \
     OR (lease_owner IS NULL AND status IN ('completed', 'failed'))) AND id IN (";
const HELD_TAIL: &str = ") ORDER BY id";

/// Followed by `VALUES`, one row per node result.
const UPSERT_NODES: &str =
    "INSERT INTO node_results (item_id, node, state, attempts, status_code, error, updated_at, instance) ";
const UPSERT_NODES_TAIL: &str = " ON CONFLICT (item_id, node) DO UPDATE SET state = excluded.state, \
     attempts = excluded.attempts, status_code = excluded.status_code, error = excluded.error, \
     updated_at = excluded.updated_at, instance = excluded.instance";

/// `items_update`: the reports' columns are (id, progress, whether the status may be set,
/// status, started, finished, reason (an empty one clears it), whether the lease ends).
const UPDATE_ITEMS: &str = "UPDATE items SET progress = u.column2, \
     status = CASE WHEN u.column3 THEN u.column4 ELSE items.status END, \
     started_at = COALESCE(items.started_at, u.column5), \
     finished_at = COALESCE(u.column6, items.finished_at), \
     reason = NULLIF(COALESCE(u.column7, items.reason), ''), \
     lease_owner = CASE WHEN u.column8 THEN NULL ELSE items.lease_owner END, \
     lease_until = CASE WHEN u.column8 THEN NULL ELSE items.lease_until END \
     FROM (";
const UPDATE_ITEMS_TAIL: &str = ") AS u \
     WHERE items.id = u.column1 AND (NOT u.column3 OR items.status NOT IN ('completed', 'failed')) \
     RETURNING items.id, items.task_id";

/// `followers_update`: the leaders' columns are (id, status, progress, started, finished, reason).
const UPDATE_FOLLOWERS: &str = "UPDATE items SET status = u.column2, progress = u.column3, \
     started_at = COALESCE(items.started_at, u.column4), finished_at = u.column5, reason = NULLIF(u.column6, '') \
     FROM (";
const UPDATE_FOLLOWERS_TAIL: &str = ") AND items.follows = u.column1 AND items.status NOT IN ('completed', 'failed') \
     RETURNING items.task_id, items.follows";

/// `dependents_update`: the refreshes' columns are (id, finished).
const FAIL_DEPENDENTS: &str =
    "UPDATE items SET status = 'failed', reason = 'its refresh failed', finished_at = u.column2 FROM (";
const FAIL_DEPENDENTS_TAIL: &str = ") AND items.depends_on = u.column1 AND items.status = 'waiting' \
     RETURNING items.task_id, items.depends_on";

/// The work queue.
#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> Queue for SqlStore<DB, B> {
    /// The claimed items, by id, with the node results of those started before.
    #[tracing::instrument(level = "debug", skip(self))]
    async fn claim_items(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedItem>> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let rows = claim_statement(&mut Sql::<DB>::new(), owner, now, lease_until, limit).rows(&mut tx).await?;
        let mut claimed: Vec<ClaimedItem> = rows
            .iter()
            .map(|row| ClaimedItem {
                item: item_from_row::<DB>(row),
                started_at: row.opt_time("started_at"),
                nodes: Vec::new(),
            })
            .collect();
        let resumed: Vec<i64> = claimed.iter().filter(|c| c.started_at.is_some()).map(|c| c.item.id).collect();
        for chunk in resumed.chunks(DB::INSERT_CHUNK) {
            let mut q = Sql::<DB>::new();
            q.sql(CLAIMED_NODES).list(chunk.iter().map(|id| Arg::Int(*id))).sql(")");
            for row in q.rows(&mut tx).await? {
                let item_id = row.int("item_id");
                if let Some(c) = claimed.iter_mut().find(|c| c.item.id == item_id) {
                    c.nodes.push(node_from_row::<DB>(&row));
                }
            }
        }
        tx.commit().await.map_err(unavailable)?;
        claimed.sort_by_key(|c| c.item.id);
        Ok(claimed)
    }

    async fn renew_leases(&self, owner: &str, lease_until: Timestamp) -> StoreResult<u64> {
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        Sql::<DB>::new().template(RENEW, &[lease_until.into(), owner.into()]).execute(&mut conn).await
    }

    async fn release_leases(&self, owner: &str) -> StoreResult<()> {
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        Sql::<DB>::new().template(RELEASE, &[owner.into()]).execute(&mut conn).await?;
        Ok(())
    }

    /// One transaction for the batch. Reports on items whose lease `owner` lost (another worker
    /// claimed them after the lease ran out) are dropped: that worker's results count, and an
    /// item never becomes final while another worker may still be executing it. One row per item
    /// and one per (item, node): a batch often holds several reports of the same item, and only
    /// its latest state needs writing. The
    /// items, their coalesced followers and their dependent prefetches are written each in
    /// statements of up to `ITEM_CHUNK` rows. Within a batch every item appears once, and
    /// followers and dependents are never claimed themselves, so no row is written twice.
    #[tracing::instrument(level = "debug", skip_all, fields(updates = updates.len()))]
    async fn apply_updates(&self, owner: &str, updates: &[ItemUpdate]) -> StoreResult<u64> {
        let mut updates = merge_updates(updates);
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let mut held = HashSet::with_capacity(updates.len());
        for chunk in updates.chunks(DB::INSERT_CHUNK) {
            let mut q = Sql::<DB>::new();
            q.template(HELD, &[owner.into()])
                .list(chunk.iter().map(|u| Arg::Int(u.item_id)))
                .sql(HELD_TAIL)
                .sql(DB::WAIT_LOCK);
            held.extend(q.rows(&mut tx).await?.iter().map(|row| DB::int(row, 0)));
        }
        let lost = updates.len() - held.len();
        updates.retain(|u| held.contains(&u.item_id));
        let nodes: Vec<(i64, &NodeResult)> =
            updates.iter().flat_map(|u| u.nodes.iter().map(move |n| (u.item_id, n))).collect();
        for chunk in nodes.chunks(NODE_CHUNK) {
            let rows = chunk.iter().map(|(item_id, node)| {
                [
                    (*item_id).into(),
                    (&node.node).into(),
                    node.state.as_str().into(),
                    i64::from(node.attempts).into(),
                    node.status_code.map(i64::from).into(),
                    node.error.as_deref().into(),
                    node.updated_at.into(),
                    (&node.instance).into(),
                ]
            });
            Sql::<DB>::new().sql(UPSERT_NODES).values(rows).sql(UPSERT_NODES_TAIL).execute(&mut tx).await?;
        }
        let by_id: HashMap<i64, &ItemUpdate> = updates.iter().map(|u| (u.item_id, u)).collect();
        // The reports their items took, with each item's task.
        let mut moved: Vec<(&ItemUpdate, i64)> = Vec::new();
        for chunk in updates.chunks(ITEM_CHUNK) {
            let rows = items_update(&mut Sql::<DB>::new(), chunk).rows(&mut tx).await?;
            moved.extend(pairs::<DB>(&rows).filter_map(|(id, task)| Some((*by_id.get(&id)?, task))));
        }
        // (task id, the report that made it final) of every item that became final.
        let mut finished: Vec<(i64, &ItemUpdate)> =
            moved.iter().filter(|(u, _)| is_transition(u)).map(|(u, task)| (*task, *u)).collect();
        // Items coalesced with a moved item mirror it: when it starts and when it ends.
        let mirrored: Vec<&ItemUpdate> =
            moved.iter().map(|(u, _)| *u).filter(|u| is_transition(u) || u.nodes.is_empty()).collect();
        for chunk in mirrored.chunks(ITEM_CHUNK) {
            let rows = followers_update(&mut Sql::<DB>::new(), chunk).rows(&mut tx).await?;
            finished.extend(pairs::<DB>(&rows).filter_map(|(task, leader)| {
                by_id.get(&leader).copied().filter(|u| is_transition(u)).map(|u| (task, u))
            }));
        }
        // A prefetch never runs after its refresh failed.
        let failed: Vec<&ItemUpdate> =
            moved.iter().map(|(u, _)| *u).filter(|u| is_transition(u) && u.status == ItemStatus::Failed).collect();
        for chunk in failed.chunks(ITEM_CHUNK) {
            let rows = dependents_update(&mut Sql::<DB>::new(), chunk).rows(&mut tx).await?;
            finished.extend(pairs::<DB>(&rows).filter_map(|(task, refresh)| Some((task, *by_id.get(&refresh)?))));
        }
        // Task counters are settled last, one statement per task in id order: instances sharing a
        // database then lock task rows in the same order and cannot deadlock.
        let mut settle: BTreeMap<i64, (i64, Timestamp)> = BTreeMap::new();
        for (task, update) in finished {
            let entry = settle.entry(task).or_insert((0, Timestamp::EPOCH));
            entry.0 += 1;
            entry.1 = entry.1.max(update.finished_at.unwrap_or_default());
        }
        for (task, (n, at)) in settle {
            crate::tasks::settle_task::<DB>(&mut tx, TaskId::new(task), n, at).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(u64::try_from(lost).unwrap_or(u64::MAX))
    }

    /// One statement over the unfinished items (the `items_runnable` index), on the reader.
    async fn backlog(&self, now: Timestamp, half_deadline: Timestamp) -> StoreResult<Backlog> {
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        let row = Sql::<DB>::new().template(BACKLOG, &[now.into(), half_deadline.into()]).row(&mut conn).await?;
        let count = |i| row.as_ref().map_or(0, |r| u64::try_from(DB::int(r, i)).unwrap_or(0));
        Ok(Backlog {
            waiting: count(0),
            scheduled: count(1),
            processing: count(2),
            past_half_deadline: count(3),
            oldest_due: row.as_ref().and_then(|r| DB::opt_int(r, 4)).map(Timestamp::from_millis),
        })
    }
}

/// `Queue::backlog` at `?1`, with the half-deadline mark `?2`: waiting and due (and not under
/// a live lease), scheduled, processing (or claimed: the worker writes an item's first state
/// with its next, up to a second later), past half their deadline, and when the oldest due
/// unclaimed item became due.
const BACKLOG: &str = "SELECT \
     COUNT(CASE WHEN status = 'waiting' AND not_before <= ?1 AND (lease_until IS NULL OR lease_until < ?1) THEN 1 END), \
     COUNT(CASE WHEN status = 'waiting' AND not_before > ?1 THEN 1 END), \
     COUNT(CASE WHEN status = 'processing' OR lease_until >= ?1 THEN 1 END), \
     COUNT(CASE WHEN started_at IS NOT NULL AND started_at < ?2 THEN 1 END), \
     MIN(CASE WHEN status = 'waiting' AND not_before <= ?1 AND (lease_until IS NULL OR lease_until < ?1) \
     THEN not_before END) \
     FROM items WHERE status IN ('waiting', 'processing') AND follows IS NULL";

/// Writes `CLAIM` into `q`, returning the claimed items with when they started.
pub(crate) fn claim_statement<'q, 'a, W: SqlWriter<'a>>(
    q: &'q mut W,
    owner: &'a str,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
) -> &'q mut W {
    q.template(CLAIM, &[owner.into(), lease_until.into(), now.into(), i64::from(limit).into()]);
    q.sql(ITEM_COLUMNS).sql(", started_at")
}

/// The two integer columns of each row.
fn pairs<DB: Db>(rows: &[DB::Row]) -> impl Iterator<Item = (i64, i64)> + '_ {
    rows.iter().map(|r| (DB::int(r, 0), DB::int(r, 1)))
}

/// Whether a report makes its item final now (rather than repeating a final state).
fn is_transition(update: &ItemUpdate) -> bool {
    update.status.is_final() && update.finished_at.is_some()
}

/// Writes into `q` the statement that writes the reports' state into their items; it returns
/// `(id, task_id)` of each item that took it. A report that is not a transition to a final
/// state never moves a final item (a late report) and sets no status on it; a transition
/// releases the lease.
pub(crate) fn items_update<'q, 'a, W: SqlWriter<'a>>(q: &'q mut W, chunk: &'a [ItemUpdate]) -> &'q mut W {
    let rows = chunk.iter().map(|u| {
        let transition = is_transition(u);
        let guarded = !u.status.is_final() || transition;
        [
            u.item_id.into(),
            i64::from(u.progress).into(),
            guarded.into(),
            u.status.as_str().into(),
            u.started_at.into(),
            u.finished_at.into(),
            u.reason.as_deref().into(),
            transition.into(),
        ]
    });
    q.sql(UPDATE_ITEMS).values(rows).sql(UPDATE_ITEMS_TAIL)
}

/// Writes into `q` the statement that mirrors each leader's report into the items coalesced with
/// it; it returns `(task_id, leader id)` of each follower that took it.
pub(crate) fn followers_update<'q, 'a, W: SqlWriter<'a>>(q: &'q mut W, chunk: &[&'a ItemUpdate]) -> &'q mut W {
    let rows = chunk.iter().map(|u| {
        [
            u.item_id.into(),
            u.status.as_str().into(),
            i64::from(u.progress).into(),
            u.started_at.into(),
            u.finished_at.into(),
            u.reason.as_deref().into(),
        ]
    });
    q.sql(UPDATE_FOLLOWERS).values(rows).sql(") AS u WHERE items.follows IN (");
    q.list(chunk.iter().map(|u| Arg::Int(u.item_id))).sql(UPDATE_FOLLOWERS_TAIL)
}

/// Writes into `q` the statement that fails the waiting prefetches that depended on each failed
/// refresh; it returns `(task_id, refresh id)` of each.
pub(crate) fn dependents_update<'q, 'a, W: SqlWriter<'a>>(q: &'q mut W, chunk: &[&'a ItemUpdate]) -> &'q mut W {
    let rows = chunk.iter().map(|u| [u.item_id.into(), u.finished_at.into()]);
    q.sql(FAIL_DEPENDENTS).values(rows).sql(") AS u WHERE items.depends_on IN (");
    q.list(chunk.iter().map(|u| Arg::Int(u.item_id))).sql(FAIL_DEPENDENTS_TAIL)
}

/// Folds a batch of worker reports into one per item, in first-seen order: the latest status
/// and progress, the first start and finish times, the latest reason, and the latest result per
/// node.
fn merge_updates(updates: &[ItemUpdate]) -> Vec<ItemUpdate> {
    let mut merged: Vec<ItemUpdate> = Vec::with_capacity(updates.len());
    let mut index: HashMap<i64, usize> = HashMap::with_capacity(updates.len());
    for u in updates {
        let Some(&i) = index.get(&u.item_id) else {
            index.insert(u.item_id, merged.len());
            merged.push(u.clone());
            continue;
        };
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
    merged
}

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
            updated_at: Timestamp::EPOCH,
            instance: String::new(),
        }
    }

    fn update(id: i64, status: ItemStatus, finished: Option<i64>, nodes: Vec<NodeResult>) -> ItemUpdate {
        let finished_at = finished.map(Timestamp::from_millis);
        ItemUpdate {
            item_id: id,
            status,
            progress: 0,
            started_at: Some(Timestamp::EPOCH),
            finished_at,
            reason: None,
            nodes,
        }
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
        assert_eq!(
            (merged[0].status, merged[0].finished_at),
            (ItemStatus::Failed, Some(Timestamp::from_millis(9))),
            "the transition is kept"
        );
        assert_eq!(merged[0].nodes.len(), 2, "one result per node");
        assert_eq!(merged[1].nodes, vec![node("a", NodeState::Pending)]);
    }
}
