//! The retention sweep: items older than the retention go in batches, each its own short
//! transaction, with their node results, their hourly counts and the tasks left empty; the
//! webhook log, finished jobs, the audit log, old quota rows and rate counters go with them.

use crate::backend::{Backend, SqlStore};
use crate::sql::{Arg, Db, Get as _, Sql, SqlWriter as _, unavailable};
use cachectl_core::store::Retention;
use cachectl_core::{StoreResult, Timestamp};

/// Up to `?2` items created before `?1`, oldest first.
pub(crate) const SWEEP_SELECT: &str = "SELECT id FROM items WHERE created_at < ?1 ORDER BY created_at LIMIT ?2";

/// Up to `?2` tasks created before `?1` without items left.
const EMPTY_TASKS: &str = "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE created_at < ?1
               AND NOT EXISTS (SELECT 1 FROM items WHERE items.task_id = tasks.id) LIMIT ?2)";

const EMPTY_COUNTS: &str = "DELETE FROM item_counts WHERE n <= 0";

/// The webhook log and finished jobs go with the records they are about: before `?1`.
const OLD_DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE at < ?1";
const OLD_JOBS: &str = "DELETE FROM webhook_jobs WHERE state <> 'pending' AND next_at < ?1";

/// Quota rows of days before `Dialect::TWO_DAYS_BEFORE` the sweep's time.
const OLD_QUOTAS: &str = "DELETE FROM quota_usage WHERE day < ";

/// Rate counters of minutes more than ten minutes ago (PostgreSQL's spelling: only a database
/// shared by instances keeps them, see `Backend::SHARED_COUNTERS`).
const OLD_RATE_WINDOWS: &str = "DELETE FROM rate_windows WHERE minute < (extract(epoch FROM now()) / 60)::BIGINT - 10";

/// The hourly counts of the items in the list that follows (`created_at / HOUR_MS`).
const LISTED_COUNTS: &str =
    "SELECT account, kind, created_at / 3600000 AS hour, COUNT(*) AS n FROM items WHERE id IN (";

/// Takes `?1` items off the hourly counter of account `?2`, kind `?3` and hour `?4`.
const UNCOUNT: &str = "UPDATE item_counts SET n = n - ?1 WHERE account = ?2 AND kind = ?3 AND hour = ?4";

/// Takes the items of the array `$1` off their hourly counters (`created_at / HOUR_MS`).
const UNCOUNT_ARRAY: &str = "UPDATE item_counts c SET n = c.n - d.n
                 FROM (SELECT account, kind, created_at / 3600000 AS hour, COUNT(*) AS n
                       FROM items WHERE id = ANY($1) GROUP BY 1, 2, 3) d
                 WHERE c.account = d.account AND c.kind = d.kind AND c.hour = d.hour";

/// Deletes up to `batch` items created before `before`; returns how many.
#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> Retention for SqlStore<DB, B> {
    #[tracing::instrument(level = "debug", skip(self))]
    async fn sweep(&self, before: Timestamp, batch: u32) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let batch = i64::from(batch);
        let rows = Sql::<DB>::new().template(SWEEP_SELECT, &[before.into(), batch.into()]).rows(&mut tx).await?;
        let ids: Vec<i64> = rows.iter().map(|r| DB::int(r, 0)).collect();
        if !ids.is_empty() {
            B::delete_items(&mut tx, &ids).await?;
        }
        Sql::<DB>::new().template(EMPTY_TASKS, &[before.into(), batch.into()]).execute(&mut tx).await?;
        Sql::<DB>::new().sql(EMPTY_COUNTS).execute(&mut tx).await?;
        Sql::<DB>::new().template(OLD_DELIVERIES, &[before.into()]).execute(&mut tx).await?;
        Sql::<DB>::new().template(OLD_JOBS, &[before.into()]).execute(&mut tx).await?;
        Sql::<DB>::new().template(crate::admin::OLD_AUDIT, &[before.into(), batch.into()]).execute(&mut tx).await?;
        let mut quotas = Sql::<DB>::new();
        quotas.sql(OLD_QUOTAS).template(DB::TWO_DAYS_BEFORE, &[before.into()]).execute(&mut tx).await?;
        if B::SHARED_COUNTERS {
            Sql::<DB>::new().sql(OLD_RATE_WINDOWS).execute(&mut tx).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(ids.len() as u64)
    }
}

/// `Backend::delete_items` with `IN` lists of `Dialect::INSERT_CHUNK` ids (SQLite).
pub(crate) async fn delete_listed<DB: Db>(conn: &mut DB::Connection, ids: &[i64]) -> StoreResult<()> {
    for chunk in ids.chunks(DB::INSERT_CHUNK) {
        let list = || chunk.iter().map(|id| Arg::Int(*id));
        let counts =
            Sql::<DB>::new().sql(LISTED_COUNTS).list(list()).sql(") GROUP BY account, kind, hour").rows(conn).await?;
        for row in counts {
            let args =
                [row.int("n").into(), row.text("account").into(), row.text("kind").into(), row.int("hour").into()];
            Sql::<DB>::new().template(UNCOUNT, &args).execute(conn).await?;
        }
        for table_and_key in ["node_results WHERE item_id", "items WHERE id"] {
            let mut delete = Sql::<DB>::new();
            delete.sql("DELETE FROM ").sql(table_and_key).sql(" IN (").list(list()).sql(")").execute(conn).await?;
        }
    }
    Ok(())
}

/// `Backend::delete_items` with one array of ids per statement (PostgreSQL).
pub(crate) async fn delete_array(conn: &mut sqlx::PgConnection, ids: &[i64]) -> StoreResult<()> {
    for sql in
        [UNCOUNT_ARRAY, "DELETE FROM node_results WHERE item_id = ANY($1)", "DELETE FROM items WHERE id = ANY($1)"]
    {
        sqlx::query(sql).bind(ids).execute(&mut *conn).await.map_err(unavailable)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hourly_counts_use_the_counters_hour() {
        let hour = format!("created_at / {} AS hour", crate::counters::HOUR_MS);
        assert!(super::LISTED_COUNTS.contains(&hour) && super::UNCOUNT_ARRAY.contains(&hour));
    }
}
