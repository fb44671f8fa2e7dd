//! How the store writes and runs SQL, the same way for every statement: fixed statements are named
//! constants written as templates (`?1`, `?2` for the values, `{lock}` for the row lock of a
//! claim), and every statement is written through `SqlWriter`, which spells each backend's
//! placeholders (`$1` on PostgreSQL, `?` on SQLite). `Db` holds the few sqlx operations the
//! shared code runs, so that sqlx's bounds are stated once.

use cachectl_core::{AccountName, QuotaDay, StoreError, StoreResult, TaskId, Timestamp};
use sqlx::{Arguments as _, ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};
use std::future::Future;

/// A database error, as the store reports it.
pub(crate) fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::unavailable(e)
}

/// How a database spells what the statements shared by both backends need.
pub(crate) trait Dialect: Database {
    /// Placeholders are numbered (`$1`, `$2`: PostgreSQL), so that a value used twice is written
    /// by its number; otherwise they are positional (`?`: SQLite) and the value is bound again.
    const NUMBERED_PARAMS: bool;
    /// Ends a subquery that picks rows to claim, where several instances claim from one
    /// database (`FOR UPDATE SKIP LOCKED`: instances claiming at the same moment take disjoint
    /// rows instead of waiting on each other's locks); empty where one writer serializes claims.
    const LOCK: &'static str;
    /// Ends a query that locks the rows it reads until the transaction ends, waiting for other
    /// transactions' locks (`FOR UPDATE`: a row another transaction is changing is read as that
    /// transaction leaves it); empty where one writer serializes every change.
    const WAIT_LOCK: &'static str;
    /// Items per multi-row insert, and ids per `IN` list of the queue and the sweep: far below
    /// the database's limit on bound values.
    const INSERT_CHUNK: usize;
    /// The day (`YYYY-MM-DD`, UTC) two days before the time `?1` in milliseconds.
    const TWO_DAYS_BEFORE: &'static str;
    /// The function that gives the position (from 1, or 0 when absent) of its second argument in
    /// its first, comparing exactly (case-sensitive, no wildcards): `instr` on SQLite, `strpos` on
    /// PostgreSQL.
    const POSITION: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

impl Dialect for sqlx::Sqlite {
    const NUMBERED_PARAMS: bool = false;
    const LOCK: &'static str = "";
    const WAIT_LOCK: &'static str = "";
    const INSERT_CHUNK: usize = 500;
    const TWO_DAYS_BEFORE: &'static str = "date(?1 / 1000, 'unixepoch', '-2 days')";
    const POSITION: &'static str = "instr";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }
}

impl Dialect for sqlx::Postgres {
    const NUMBERED_PARAMS: bool = true;
    const LOCK: &'static str = "FOR UPDATE SKIP LOCKED";
    const WAIT_LOCK: &'static str = " FOR UPDATE";
    const INSERT_CHUNK: usize = 1000;
    const TWO_DAYS_BEFORE: &'static str = "to_char(to_timestamp(?1 / 1000.0) - interval '2 days', 'YYYY-MM-DD')";
    const POSITION: &'static str = "strpos";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }
}

/// A value bound to a statement: the types the store's columns hold.
#[derive(Debug, Clone)]
pub(crate) enum Arg<'a> {
    /// An integer (every number and time the store keeps).
    Int(i64),
    /// An integer or NULL.
    OptInt(Option<i64>),
    /// A text.
    Text(&'a str),
    /// A text or NULL.
    OptText(Option<&'a str>),
    /// A text made for the statement (a pattern, a suffix).
    Owned(String),
    /// A truth value.
    Flag(bool),
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(value: Option<i64>) -> Self {
        Self::OptInt(value)
    }
}

impl From<Timestamp> for Arg<'_> {
    fn from(value: Timestamp) -> Self {
        Self::Int(value.millis())
    }
}

impl From<Option<Timestamp>> for Arg<'_> {
    fn from(value: Option<Timestamp>) -> Self {
        Self::OptInt(value.map(Timestamp::millis))
    }
}

impl From<TaskId> for Arg<'_> {
    fn from(value: TaskId) -> Self {
        Self::Int(value.get())
    }
}

impl<'a> From<&'a AccountName> for Arg<'a> {
    fn from(value: &'a AccountName) -> Self {
        Self::Text(value.as_str())
    }
}

impl<'a> From<&'a QuotaDay> for Arg<'a> {
    fn from(value: &'a QuotaDay) -> Self {
        Self::Text(value.as_str())
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Self::Text(value)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(value: &'a String) -> Self {
        Self::Text(value)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Self::OptText(value)
    }
}

impl From<String> for Arg<'_> {
    fn from(value: String) -> Self {
        Self::Owned(value)
    }
}

impl From<bool> for Arg<'_> {
    fn from(value: bool) -> Self {
        Self::Flag(value)
    }
}

/// A statement being written with its bound values.
pub(crate) trait SqlWriter<'a> {
    /// Appends SQL text as it is.
    fn sql(&mut self, text: &str) -> &mut Self;
    /// Appends a placeholder bound to `value`.
    fn bind(&mut self, value: Arg<'a>) -> &mut Self;
    /// How many placeholders were bound so far.
    fn bound(&self) -> usize;
    /// Appends a placeholder for `value` again, which was bound as the statement's `number`-th.
    fn rebind(&mut self, number: usize, value: Arg<'a>) -> &mut Self;
    /// The lock clause of a claim (`Dialect::LOCK`).
    fn lock(&self) -> &'static str;

    /// Appends a placeholder bound to an integer.
    fn int(&mut self, value: i64) -> &mut Self {
        self.bind(Arg::Int(value))
    }

    /// Appends a placeholder bound to a text.
    fn text(&mut self, value: &'a str) -> &mut Self {
        self.bind(Arg::Text(value))
    }

    /// Appends placeholders bound to `values`, separated by commas.
    fn list(&mut self, values: impl IntoIterator<Item = Arg<'a>>) -> &mut Self {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql(", ");
            }
            self.bind(value);
        }
        self
    }

    /// Appends ` AND {condition}?` for each of `conditions` whose value is set.
    fn and<const N: usize>(&mut self, conditions: [(&str, Option<Arg<'a>>); N]) -> &mut Self {
        for (condition, value) in conditions {
            if let Some(value) = value {
                self.sql(" AND ").sql(condition).bind(value);
            }
        }
        self
    }

    /// Appends `VALUES (…), (…)`, a row of placeholders per element of `rows`.
    fn values<const N: usize>(&mut self, rows: impl IntoIterator<Item = [Arg<'a>; N]>) -> &mut Self {
        self.sql("VALUES ");
        for (i, row) in rows.into_iter().enumerate() {
            self.sql(if i > 0 { ", (" } else { "(" }).list(row).sql(")");
        }
        self
    }

    /// Appends `template` with `?N` written as a placeholder bound to the `N`-th of `args` (the
    /// first use of each in order: `?1` before `?2`), and `{lock}` as `lock()`; where there is no
    /// lock clause, the white space before `{lock}` goes too.
    fn template(&mut self, template: &str, args: &[Arg<'a>]) -> &mut Self {
        // The statement's number of each value once bound.
        let mut numbers = vec![0; args.len()];
        let mut rest = template;
        while let Some(at) = rest.find(['?', '{']) {
            let (text, tail) = rest.split_at(at);
            if let Some(after) = tail.strip_prefix("{lock}") {
                let lock = self.lock();
                self.sql(if lock.is_empty() { text.trim_end() } else { text }).sql(lock);
                rest = after;
                continue;
            }
            let digits = tail[1..].bytes().take_while(u8::is_ascii_digit).count();
            let Ok(n @ 1..) = tail[1..=digits].parse::<usize>() else {
                self.sql(&rest[..=at]);
                rest = &tail[1..];
                continue;
            };
            self.sql(text);
            let value = args[n - 1].clone();
            if numbers[n - 1] == 0 {
                debug_assert!(numbers[..n - 1].iter().all(|&b| b > 0), "{template}: ?{n} before a lower number");
                self.bind(value);
                numbers[n - 1] = self.bound();
            } else {
                self.rebind(numbers[n - 1], value);
            }
            rest = &tail[1 + digits..];
        }
        self.sql(rest)
    }
}

/// The sqlx operations the shared code runs on a database, as methods: a bound such as
/// `i64: Encode<'q, DB>` or `&mut DB::Connection: Executor` on a generic function would have to
/// be repeated on every function that calls it, while a method's bounds are checked here, once.
pub(crate) trait Db: Dialect {
    /// Runs `sql` with `args` bound to its placeholders, and returns its rows.
    fn rows<'e>(
        conn: &'e mut Self::Connection,
        sql: &'e str,
        args: &'e [Arg<'_>],
    ) -> impl Future<Output = sqlx::Result<Vec<Self::Row>>> + Send + 'e;

    /// Runs `sql` with `args` bound to its placeholders, and returns how many rows it changed.
    fn execute<'e>(
        conn: &'e mut Self::Connection,
        sql: &'e str,
        args: &'e [Arg<'_>],
    ) -> impl Future<Output = sqlx::Result<u64>> + Send + 'e;

    /// The position of the column `name`, if the row has one.
    fn position(row: &Self::Row, name: &str) -> Option<usize>;

    /// The integer at column `index`.
    fn int(row: &Self::Row, index: usize) -> i64;
    /// The integer or NULL at column `index`.
    fn opt_int(row: &Self::Row, index: usize) -> Option<i64>;
    /// The text at column `index`.
    fn text(row: &Self::Row, index: usize) -> String;
    /// The text or NULL at column `index`.
    fn opt_text(row: &Self::Row, index: usize) -> Option<String>;
    /// The text at column `index`, borrowed from the row (for a value that is only parsed).
    fn str(row: &Self::Row, index: usize) -> &str;
}

impl<DB> Db for DB
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'s> &'s str: ColumnIndex<DB::Row>,
{
    fn rows<'e>(
        conn: &'e mut Self::Connection,
        sql: &'e str,
        args: &'e [Arg<'_>],
    ) -> impl Future<Output = sqlx::Result<Vec<Self::Row>>> + Send + 'e {
        let arguments = arguments::<DB>(args);
        async move { sqlx::query_with(sql, arguments?).fetch_all(conn).await }
    }

    fn execute<'e>(
        conn: &'e mut Self::Connection,
        sql: &'e str,
        args: &'e [Arg<'_>],
    ) -> impl Future<Output = sqlx::Result<u64>> + Send + 'e {
        let arguments = arguments::<DB>(args);
        async move { Ok(DB::rows_affected(&sqlx::query_with(sql, arguments?).execute(conn).await?)) }
    }

    fn position(row: &Self::Row, name: &str) -> Option<usize> {
        row.try_column(name).ok().map(sqlx::Column::ordinal)
    }

    fn int(row: &Self::Row, index: usize) -> i64 {
        at(row, index)
    }

    fn opt_int(row: &Self::Row, index: usize) -> Option<i64> {
        at(row, index)
    }

    fn text(row: &Self::Row, index: usize) -> String {
        at(row, index)
    }

    fn opt_text(row: &Self::Row, index: usize) -> Option<String> {
        at(row, index)
    }

    fn str(row: &Self::Row, index: usize) -> &str {
        at(row, index)
    }
}

/// `args` as sqlx binds them, in order.
fn arguments<'e, DB>(args: &'e [Arg<'_>]) -> sqlx::Result<DB::Arguments<'e>>
where
    DB: Database,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
{
    let mut arguments = DB::Arguments::default();
    for arg in args {
        match arg {
            Arg::Int(v) => arguments.add(*v),
            Arg::OptInt(v) => arguments.add(*v),
            Arg::Text(v) => arguments.add(*v),
            Arg::OptText(v) => arguments.add(*v),
            Arg::Owned(v) => arguments.add(v.as_str()),
            Arg::Flag(v) => arguments.add(*v),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

/// The column at `index` decoded without sqlx's check that its database type suits `T` (a
/// comparison of type descriptions per value): the columns are those of the store's own schema.
/// A value that does not decode is read again through the checked `get`, which panics with
/// sqlx's message. See BENCHMARKS.md, "PostgreSQL row decoding".
fn at<'r, R: Row, T>(row: &'r R, index: usize) -> T
where
    T: Decode<'r, R::Database> + Type<R::Database>,
    usize: ColumnIndex<R>,
{
    row.try_get_unchecked(index).unwrap_or_else(|_| row.get(index))
}

/// Reading a row's columns by name.
pub(crate) trait Get {
    /// The integer in column `name`.
    fn int(&self, name: &str) -> i64;
    /// The integer or NULL in column `name`.
    fn opt_int(&self, name: &str) -> Option<i64>;
    /// The text in column `name`.
    fn text(&self, name: &str) -> String;
    /// The text or NULL in column `name`.
    fn opt_text(&self, name: &str) -> Option<String>;

    /// The time in column `name`.
    fn time(&self, name: &str) -> Timestamp {
        Timestamp::from_millis(self.int(name))
    }

    /// The time or NULL in column `name`.
    fn opt_time(&self, name: &str) -> Option<Timestamp> {
        self.opt_int(name).map(Timestamp::from_millis)
    }

    /// The task id in column `name`.
    fn task_id(&self, name: &str) -> TaskId {
        TaskId::new(self.int(name))
    }
}

impl<R: Row> Get for R
where
    R::Database: Db,
{
    fn int(&self, name: &str) -> i64 {
        <R::Database as Db>::int(self, column(self, name))
    }

    fn opt_int(&self, name: &str) -> Option<i64> {
        <R::Database as Db>::opt_int(self, column(self, name))
    }

    fn text(&self, name: &str) -> String {
        <R::Database as Db>::text(self, column(self, name))
    }

    fn opt_text(&self, name: &str) -> Option<String> {
        <R::Database as Db>::opt_text(self, column(self, name))
    }
}

/// The position of the column `name`; the statements are the store's own, so a missing column is
/// a bug.
fn column<R: Row>(row: &R, name: &str) -> usize
where
    R::Database: Db,
{
    <R::Database as Db>::position(row, name).unwrap_or_else(|| panic!("no column {name} in the result"))
}

/// A statement for a sqlx database, written through `SqlWriter`: its text, spelled for `DB`, and
/// the values of its placeholders, bound when it runs.
pub(crate) struct Sql<'a, DB: Db> {
    text: String,
    args: Vec<Arg<'a>>,
    db: std::marker::PhantomData<fn() -> DB>,
}

impl<'a, DB: Db> Sql<'a, DB> {
    /// An empty statement.
    pub(crate) fn new() -> Self {
        Self { text: String::new(), args: Vec::new(), db: std::marker::PhantomData }
    }

    /// The statement's text.
    #[cfg(any(test, feature = "plans"))]
    pub(crate) fn text_of(&self) -> &str {
        &self.text
    }

    /// Appends the placeholder of the statement's `number`-th value.
    fn placeholder(&mut self, number: usize) -> &mut Self {
        if DB::NUMBERED_PARAMS {
            use std::fmt::Write as _;
            let _ = write!(self.text, "${number}");
        } else {
            self.text.push('?');
        }
        self
    }

    /// Runs the statement on `conn`, and returns its rows.
    pub(crate) async fn rows(&self, conn: &mut DB::Connection) -> StoreResult<Vec<DB::Row>> {
        DB::rows(conn, &self.text, &self.args).await.map_err(unavailable)
    }

    /// Runs the statement on `conn`, and returns its first row, if any.
    pub(crate) async fn row(&self, conn: &mut DB::Connection) -> StoreResult<Option<DB::Row>> {
        Ok(self.rows(conn).await?.into_iter().next())
    }

    /// Runs the statement on `conn`, and returns how many rows it changed.
    pub(crate) async fn execute(&self, conn: &mut DB::Connection) -> StoreResult<u64> {
        DB::execute(conn, &self.text, &self.args).await.map_err(unavailable)
    }
}

impl<'a, DB: Db> SqlWriter<'a> for Sql<'a, DB> {
    fn sql(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    fn bind(&mut self, value: Arg<'a>) -> &mut Self {
        self.args.push(value);
        self.placeholder(self.args.len())
    }

    fn bound(&self) -> usize {
        self.args.len()
    }

    fn rebind(&mut self, number: usize, value: Arg<'a>) -> &mut Self {
        if DB::NUMBERED_PARAMS { self.placeholder(number) } else { self.bind(value) }
    }

    fn lock(&self) -> &'static str {
        DB::LOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written<DB: Db>(template: &str, args: &[Arg<'_>]) -> String {
        let mut sql = Sql::<DB>::new();
        sql.sql("SELECT ").int(7).sql(", ").template(template, args);
        sql.text_of().to_owned()
    }

    #[test]
    fn templates_are_spelled_per_backend() {
        let template = "x = ?1 AND y < ?2 AND z < ?1 LIMIT ?3\n    {lock})";
        let args = [Arg::Int(1), Arg::Text("a"), Arg::Int(3)];
        assert_eq!(written::<sqlx::Sqlite>(template, &args), "SELECT ?, x = ? AND y < ? AND z < ? LIMIT ?)");
        assert_eq!(
            written::<sqlx::Postgres>(template, &args),
            "SELECT $1, x = $2 AND y < $3 AND z < $2 LIMIT $4\n    FOR UPDATE SKIP LOCKED)"
        );
    }
}
