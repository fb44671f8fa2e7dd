//! SQLite's statements of the record pages, run by the reader threads of `sqlite_read` on their
//! `rusqlite` connections. SQLite reads a page straight down an index, whose offset entries cost
//! no table row: it looks a row up only when a column outside the index is read.

use crate::rows::RECORD_COLUMNS;
use crate::sql::{Arg, SqlWriter};
use cachectl_core::{RecordQuery, WindowQuery};
use rusqlite::types::Value;

/// A task's item count. `INDEXED BY`: a task has at most a thousand items while its account may
/// have millions, a difference SQLite's planner cannot always see from its statistics.
/// Parameters: ?1 the task id, ?2 the account, ?3 the kind; the account is checked once, on the
/// task.
pub(crate) const TASK_COUNT: &str = "SELECT COUNT(*) FROM items INDEXED BY items_task
         WHERE task_id = ?1 AND kind = ?3 AND EXISTS (SELECT 1 FROM tasks WHERE id = ?1 AND account = ?2)";

/// A deep window page's total and skip (`sqlite_read`): the hourly counters newest first, and
/// the count of each partial hour at the window's edges.
pub(crate) const WINDOW_HOURS: &str =
    "SELECT hour, n FROM item_counts WHERE account = ? AND kind = ? AND hour >= ? AND hour < ? ORDER BY hour DESC";
pub(crate) const WINDOW_EDGE_COUNT: &str =
    "SELECT COUNT(*) FROM items WHERE account = ? AND kind = ? AND created_at >= ? AND created_at < ?";

/// A page of a task's items: ?1 to ?3 as in `TASK_COUNT`, ?4 the limit, ?5 the offset. Read down
/// the index, as `window_page`.
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

/// A page of a window (of one URL with `url`), read down the index, which covers the filter and
/// the order: the skipped entries of an offset cost no table row (SQLite defers the row's lookup,
/// `DeferredSeek`, and counts the offset off before it; see BENCHMARKS.md, "SQLite pages read
/// straight down the index").
pub(crate) fn window_page(url: bool) -> String {
    format!(
        "SELECT {RECORD_COLUMNS} FROM items WHERE {} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        window_filter(url)
    )
}

/// A statement for rusqlite: SQL with positional `?` placeholders and their values, in order.
#[derive(Default)]
pub(crate) struct Statement {
    pub(crate) sql: String,
    pub(crate) args: Vec<Value>,
}

impl<'a> SqlWriter<'a> for Statement {
    fn sql(&mut self, text: &str) -> &mut Self {
        self.sql.push_str(text);
        self
    }

    fn bind(&mut self, value: Arg<'a>) -> &mut Self {
        self.sql.push('?');
        self.args.push(match value {
            Arg::Int(v) => v.into(),
            Arg::OptInt(v) => v.map_or(Value::Null, Value::from),
            Arg::Text(v) => v.to_owned().into(),
            Arg::OptText(v) => v.map_or(Value::Null, |v| v.to_owned().into()),
            Arg::Owned(v) => v.into(),
            Arg::Flag(v) => i64::from(v).into(),
        });
        self
    }

    fn bound(&self) -> usize {
        self.args.len()
    }

    fn rebind(&mut self, _number: usize, value: Arg<'a>) -> &mut Self {
        self.bind(value)
    }

    fn lock(&self) -> &'static str {
        ""
    }
}

/// The exact number of items in a window, in one statement (`counters::write_window_total`).
pub(crate) fn window_total(query: &WindowQuery<'_>) -> Statement {
    let mut statement = Statement::default();
    statement.sql("SELECT ");
    crate::counters::write_window_total(&mut statement, query);
    statement
}

/// The Baidu dialects' record query, ascending by `(created_at, id)`.
pub(crate) fn records_query(query: &RecordQuery<'_>) -> Statement {
    let mut q = Statement::default();
    let index = if query.task_id.is_some() { " INDEXED BY items_task" } else { "" };
    q.sql("SELECT ").sql(RECORD_COLUMNS).sql(" FROM items").sql(index);
    q.sql(" WHERE account = ").text(query.account.as_str()).sql(" AND kind = ").text(query.kind.as_str());
    if let Some(task_id) = query.task_id {
        q.sql(" AND task_id = ").bind(task_id.into());
    } else {
        // After a marker the index range starts at the marker, not at the window's start: SQLite
        // does not derive a range bound from the keyset condition below.
        let lower = query.after.map_or(query.from, |(created_at, _)| created_at.max(query.from));
        q.sql(" AND created_at >= ").bind(lower.into()).sql(" AND created_at < ").bind(query.to.into());
    }
    if let Some(site) = query.site {
        // The host is the site or ends in `.site`. Not `host LIKE ?`: SQLite prepares a statement
        // again on every new binding of a LIKE pattern (see BENCHMARKS.md, "SQLite GEO site
        // filter without LIKE"). Hosts and sites are stored and validated in lower case, so this
        // matches exactly what PostgreSQL's case-sensitive `LIKE '%.site'` matches.
        let suffix = format!(".{site}");
        q.sql(" AND (host = ").text(site);
        q.sql(" OR substr(host, -length(").bind(suffix.clone().into()).sql(")) = ").bind(suffix.into()).sql(")");
    }
    if let Some(url) = query.url {
        q.sql(" AND url = ").text(url);
    }
    if let Some(item_type) = query.item_type {
        q.sql(" AND item_type = ").text(item_type.as_str());
    }
    if let Some((created_at, id)) = query.after {
        q.sql(" AND (created_at > ").bind(created_at.into());
        q.sql(" OR (created_at = ").bind(created_at.into()).sql(" AND id > ").int(id).sql("))");
    }
    q.sql(" ORDER BY created_at, id LIMIT ").int(i64::from(query.limit));
    q
}
