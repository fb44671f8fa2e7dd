//! The admin API's rows (accounts, credentials, edges), the audit log, and the counter every
//! instance polls to learn that they changed. Each change is one transaction with its audit entry
//! and the counter's bump, so that an instance that sees the new counter reads the change too.

use crate::backend::{Backend, SqlStore};
use crate::sql::{Arg, Db, Get as _, Sql, SqlWriter as _, unavailable};
use cachectl_core::admin::{
    AccountRow, AuditEntry, AuditQuery, ChangeError, CredentialKind, CredentialRow, DirectoryChange, DirectoryRows,
    DirectoryStore, EdgeRow, EdgeState,
};
use cachectl_core::{StoreResult, TaskId, Timestamp};

const VERSION: &str = "SELECT version FROM directory_version WHERE id = 1";
const BUMP: &str = "UPDATE directory_version SET version = version + 1 WHERE id = 1";

const ACCOUNTS: &str = "SELECT name, spec, disabled, created_at, updated_at FROM accounts ORDER BY name";
const CREDENTIALS: &str = "SELECT id, kind, account, name, secret_hash, sealed_secret, created_at, expires_at \
     FROM credentials ORDER BY account, created_at, id";
const EDGES: &str = "SELECT name, spec, state, created_at, updated_at FROM edges ORDER BY name";

/// Creates account `?1`; a row without a spec (the state of a file account since removed from the
/// file) is taken over, an API account's row is a conflict (no row changed).
const CREATE_ACCOUNT: &str = "INSERT INTO accounts (name, spec, disabled, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
     disabled = excluded.disabled, created_at = excluded.created_at, updated_at = excluded.updated_at \
     WHERE accounts.spec IS NULL";
const PUT_ACCOUNT: &str = "INSERT INTO accounts (name, spec, disabled, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
     disabled = excluded.disabled, updated_at = excluded.updated_at";
const ISSUE: &str = "INSERT INTO credentials \
     (id, kind, account, name, secret_hash, sealed_secret, created_at, expires_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING";
/// Sets when credential `?2` of account `?3` stops working to `?1`, unless it stops earlier.
const EXPIRE: &str = "UPDATE credentials SET expires_at = \
     CASE WHEN expires_at IS NULL OR expires_at > ?1 THEN ?1 ELSE expires_at END \
     WHERE id = ?2 AND account = ?3";
/// Creates edge `?1`, taking over a row without a spec as `CREATE_ACCOUNT` does.
const CREATE_EDGE: &str = "INSERT INTO edges (name, spec, state, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
     state = excluded.state, created_at = excluded.created_at, updated_at = excluded.updated_at \
     WHERE edges.spec IS NULL";
const PUT_EDGE: &str = "INSERT INTO edges (name, spec, state, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
     state = excluded.state, updated_at = excluded.updated_at";
const REMOVE_EDGE: &str = "DELETE FROM edges WHERE name = ?1";

/// Fails account `?3`'s items that wait unleased, with reason `?1` at `?2`.
const CANCEL_QUEUED: &str = "UPDATE items SET status = 'failed', reason = ?1, finished_at = ?2 \
     WHERE account = ?3 AND status = 'waiting' AND lease_owner IS NULL RETURNING id, task_id";

const APPEND: &str = "INSERT INTO audit_log (at, actor, credential, address, action, target, detail) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const AUDIT_COLUMNS: &str = "SELECT id, at, actor, credential, address, action, target, detail FROM audit_log";

/// Appends `entry` on `conn` (a transaction, or not).
pub(crate) async fn append<DB: Db>(conn: &mut DB::Connection, entry: &AuditEntry) -> StoreResult<()> {
    let args = [
        entry.at.into(),
        (&entry.actor).into(),
        (&entry.credential).into(),
        (&entry.address).into(),
        (&entry.action).into(),
        (&entry.target).into(),
        (&entry.detail).into(),
    ];
    Sql::<DB>::new().template(APPEND, &args).execute(conn).await?;
    Ok(())
}

/// The audit entry of a stored task: who submitted what through which dialect, from where.
pub(crate) fn task_entry(task: &cachectl_core::NewTask, id: TaskId) -> AuditEntry {
    let refreshes = task.items.iter().filter(|i| i.kind == cachectl_core::Kind::Refresh).count();
    AuditEntry {
        id: 0,
        at: task.created_at,
        actor: task.account.as_str().to_owned(),
        credential: task.operator.clone(),
        address: task.address.clone(),
        action: "task.submit".to_owned(),
        target: id.get().to_string(),
        // Only names of the code's own (the kind and the dialect) and counts: nothing to escape.
        detail: format!(
            "{{\"dialect\":\"{}\",\"kind\":\"{}\",\"refresh_items\":{refreshes},\"prefetch_items\":{}}}",
            task.dialect,
            task.kind.as_str(),
            task.items.len() - refreshes
        ),
    }
}

fn flag(value: bool) -> Arg<'static> {
    Arg::Int(i64::from(value))
}

#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> DirectoryStore for SqlStore<DB, B> {
    async fn directory_version(&self) -> StoreResult<i64> {
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        let row = Sql::<DB>::new().sql(VERSION).row(&mut conn).await?;
        Ok(row.map_or(0, |row| DB::int(&row, 0)))
    }

    async fn directory(&self) -> StoreResult<DirectoryRows> {
        // One transaction, so that the counter and the rows are one moment's.
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let version = Sql::<DB>::new().sql(VERSION).row(&mut tx).await?.map_or(0, |row| DB::int(&row, 0));
        let accounts = Sql::<DB>::new()
            .sql(ACCOUNTS)
            .rows(&mut tx)
            .await?
            .iter()
            .map(|row| AccountRow {
                name: row.text("name"),
                spec: row.opt_text("spec"),
                disabled: row.int("disabled") != 0,
                created_at: row.time("created_at"),
                updated_at: row.time("updated_at"),
            })
            .collect();
        let credentials = Sql::<DB>::new()
            .sql(CREDENTIALS)
            .rows(&mut tx)
            .await?
            .iter()
            .filter_map(|row| {
                Some(CredentialRow {
                    id: row.text("id"),
                    kind: CredentialKind::parse(&row.text("kind"))?,
                    account: row.text("account"),
                    name: row.text("name"),
                    secret_hash: row.opt_text("secret_hash"),
                    sealed_secret: row.opt_text("sealed_secret"),
                    created_at: row.time("created_at"),
                    expires_at: row.opt_time("expires_at"),
                })
            })
            .collect();
        let edges = Sql::<DB>::new()
            .sql(EDGES)
            .rows(&mut tx)
            .await?
            .iter()
            .map(|row| EdgeRow {
                name: row.text("name"),
                spec: row.opt_text("spec"),
                state: EdgeState::parse(&row.text("state")).unwrap_or(EdgeState::Active),
                created_at: row.time("created_at"),
                updated_at: row.time("updated_at"),
            })
            .collect();
        tx.commit().await.map_err(unavailable)?;
        Ok(DirectoryRows { version, accounts, credentials, edges })
    }

    async fn change_directory(&self, change: &DirectoryChange, audit: &AuditEntry) -> Result<(), ChangeError> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let (changed, what) = match change {
            DirectoryChange::CreateAccount(a) | DirectoryChange::PutAccount(a) => {
                let sql =
                    if matches!(change, DirectoryChange::CreateAccount(_)) { CREATE_ACCOUNT } else { PUT_ACCOUNT };
                let args = [
                    (&a.name).into(),
                    a.spec.as_deref().into(),
                    flag(a.disabled),
                    a.created_at.into(),
                    a.updated_at.into(),
                ];
                (Sql::<DB>::new().template(sql, &args).execute(&mut tx).await?, format!("account {:?}", a.name))
            }
            DirectoryChange::IssueCredential(c) => {
                let args = [
                    (&c.id).into(),
                    c.kind.as_str().into(),
                    (&c.account).into(),
                    (&c.name).into(),
                    c.secret_hash.as_deref().into(),
                    c.sealed_secret.as_deref().into(),
                    c.created_at.into(),
                    c.expires_at.into(),
                ];
                (Sql::<DB>::new().template(ISSUE, &args).execute(&mut tx).await?, format!("credential {:?}", c.id))
            }
            DirectoryChange::ExpireCredential { id, account, at } => {
                let args = [(*at).into(), id.into(), account.into()];
                (Sql::<DB>::new().template(EXPIRE, &args).execute(&mut tx).await?, format!("credential {id:?}"))
            }
            DirectoryChange::CreateEdge(e) | DirectoryChange::PutEdge(e) => {
                let sql = if matches!(change, DirectoryChange::CreateEdge(_)) { CREATE_EDGE } else { PUT_EDGE };
                let args = [
                    (&e.name).into(),
                    e.spec.as_deref().into(),
                    e.state.as_str().into(),
                    e.created_at.into(),
                    e.updated_at.into(),
                ];
                (Sql::<DB>::new().template(sql, &args).execute(&mut tx).await?, format!("edge {:?}", e.name))
            }
            DirectoryChange::RemoveEdge(name) => (
                Sql::<DB>::new().template(REMOVE_EDGE, &[name.into()]).execute(&mut tx).await?,
                format!("edge {name:?}"),
            ),
        };
        if changed == 0 {
            // Dropping the transaction rolls it back.
            let creates = matches!(
                change,
                DirectoryChange::CreateAccount(_)
                    | DirectoryChange::IssueCredential(_)
                    | DirectoryChange::CreateEdge(_)
            );
            return Err(if creates { ChangeError::Conflict(what) } else { ChangeError::NotFound(what) });
        }
        append::<DB>(&mut tx, audit).await?;
        Sql::<DB>::new().sql(BUMP).execute(&mut tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn cancel_queued(&self, account: &str, reason: &str, now: Timestamp) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let rows = Sql::<DB>::new()
            .template(CANCEL_QUEUED, &[reason.into(), now.into(), account.into()])
            .rows(&mut tx)
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.int("id")).collect();
        let mut per_task: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
        for row in &rows {
            *per_task.entry(row.int("task_id")).or_default() += 1;
        }
        for chunk in ids.chunks(crate::tasks::ID_CHUNK) {
            let list = chunk.iter().map(|id| Arg::Int(*id));
            Sql::<DB>::new().sql(crate::tasks::UNFOLLOW).list(list).sql(")").execute(&mut tx).await?;
        }
        for (task, n) in per_task {
            crate::tasks::settle_task::<DB>(&mut tx, TaskId::new(task), n, now).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(ids.len() as u64)
    }

    async fn append_audit(&self, audit: &AuditEntry) -> StoreResult<()> {
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        append::<DB>(&mut conn, audit).await
    }

    async fn audit_log(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        let action = query.action.as_ref().map(|a| Arg::Owned(format!("{}%", a.replace(['%', '_'], ""))));
        let mut sql = Sql::<DB>::new();
        sql.sql(AUDIT_COLUMNS).sql(" WHERE 1 = 1").and([
            ("actor = ", query.actor.as_deref().map(Arg::Text)),
            ("action LIKE ", action),
            ("at >= ", query.from.map(|t| Arg::Int(t.millis()))),
            ("at < ", query.to.map(|t| Arg::Int(t.millis()))),
            ("id < ", query.before_id.map(Arg::Int)),
        ]);
        sql.sql(" ORDER BY id DESC LIMIT ").int(i64::from(query.limit.clamp(1, 1000)));
        let rows = sql.rows(&mut conn).await?;
        Ok(rows
            .iter()
            .map(|row| AuditEntry {
                id: row.int("id"),
                at: row.time("at"),
                actor: row.text("actor"),
                credential: row.text("credential"),
                address: row.text("address"),
                action: row.text("action"),
                target: row.text("target"),
                detail: row.text("detail"),
            })
            .collect())
    }
}

/// Deletes up to `?2` audit entries older than `?1` (the retention sweep).
pub(crate) const OLD_AUDIT: &str =
    "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < ?1 ORDER BY id LIMIT ?2)";
