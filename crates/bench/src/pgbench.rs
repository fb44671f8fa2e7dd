//! The PostgreSQL-alone baseline of scenario 3: the statements the server ran for one query,
//! replayed by `pgbench` with the same number of clients, straight to the database. It is to the
//! queries what the direct PURGE is to the fan-out: what the database itself answers on this
//! machine without cachectl, so that a PostgreSQL figure can be read as a share of that limit.
//!
//! The statements are captured, not rewritten by hand: for one request the harness turns on
//! `log_statement = 'all'` (with a prefix of its own), sends the request through the server,
//! turns it off again and reads the cluster log. Each `execute` entry and its `parameters`
//! detail become one statement of a pgbench script, the parameters written in as literals.
//! The server's worker polls the same database meanwhile; its statements (writes, `FOR
//! UPDATE`, leases) are left out. pgbench reads `:name` in a script as a variable even inside a
//! literal, so a parameter holding `:` followed by a letter or digit (a URL with a port) would
//! not replay; the benchmark's dataset has none.

use crate::load::{LoadFigures, percentile_ms};
use anyhow::{Context, bail, ensure};
use sqlx::Connection as _;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The log line prefix while capturing: entries of the capture start with it.
const PREFIX: &str = "cachectl-capture[";

/// A PostgreSQL cluster the server of scenario 3 uses, and how to reach it directly.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// The database URL (a superuser: `ALTER SYSTEM` is needed to capture).
    pub url: String,
    /// The cluster's server log.
    pub log: PathBuf,
    /// The cluster's `pgbench`.
    pub pgbench: PathBuf,
}

impl Baseline {
    /// The statements the database executes while `request` runs, as a pgbench script with the
    /// parameters written in; `None` if nothing was executed (a query answered without the
    /// database). Tried up to three times: a backend takes the new logging setting only once the
    /// reload signal reached it.
    ///
    /// # Errors
    /// The database or its log cannot be read, or `request` fails.
    pub async fn capture<F, Fut>(&self, request: F) -> anyhow::Result<Option<String>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let mut admin = sqlx::postgres::PgConnection::connect_with(&self.url.parse()?).await?;
        for _ in 0..3 {
            set_logging(&mut admin, true).await?;
            let start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            let outcome = request().await;
            set_logging(&mut admin, false).await?;
            outcome?;
            let statements = executed(&self.log_since(start)?)?;
            if !statements.is_empty() {
                return Ok(Some(script(&statements)));
            }
        }
        Ok(None)
    }

    /// What the cluster logged from byte `start` of its log on.
    fn log_since(&self, start: u64) -> anyhow::Result<String> {
        use std::io::{Read as _, Seek as _};
        let mut file = std::fs::File::open(&self.log).with_context(|| format!("opening {}", self.log.display()))?;
        file.seek(std::io::SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Runs `script` with pgbench: `clients` connections, prepared statements, `seconds` long,
    /// as fast as it answers or, with `rate`, throttled to that many a second. Every script run
    /// is one query answered, as one HTTP request is in the server's figures.
    ///
    /// # Errors
    /// pgbench fails or its output does not parse.
    pub fn run(&self, script: &str, clients: usize, seconds: u64, rate: Option<f64>) -> anyhow::Result<LoadFigures> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("query.sql");
        std::fs::write(&file, script)?;
        let url: url::Url = self.url.parse()?;
        let database = url.path().trim_start_matches('/');
        let mut command = Command::new(&self.pgbench);
        if let Some(rate) = rate {
            // Throttled: pgbench schedules the transactions (a Poisson process at `rate`) and
            // times each from its scheduled start, lag included.
            command.args(["-R", &format!("{rate}")]);
        }
        let output = command
            .args(["-h", url.host_str().unwrap_or("127.0.0.1"), "-p", &url.port().unwrap_or(5432).to_string()])
            .args(["-U", if url.username().is_empty() { "postgres" } else { url.username() }])
            .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", &clients.clamp(1, 2).to_string()])
            .args(["-T", &seconds.to_string(), "-l", "--log-prefix"])
            .arg(dir.path().join("txn"))
            .arg("-f")
            .arg(&file)
            .arg(database)
            .current_dir(dir.path())
            .output()
            .with_context(|| format!("running {}", self.pgbench.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "pgbench failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
        let tps = stdout
            .lines()
            .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
            .with_context(|| format!("no tps in pgbench's output: {stdout}"))?;
        let errors = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: ")?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let mut samples = Vec::new();
        for entry in std::fs::read_dir(dir.path())? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("txn")) {
                samples.extend(transaction_times(&std::fs::read_to_string(&path)?));
            }
        }
        ensure!(!samples.is_empty(), "pgbench logged no transaction: {stdout}");
        samples.sort_unstable();
        Ok(LoadFigures {
            client: "pgbench".into(),
            connections: clients,
            requests: samples.len() as u64,
            rps: tps,
            p50_ms: percentile_ms(&samples, 0.5),
            p99_ms: percentile_ms(&samples, 0.99),
            errors,
        })
    }
}

/// Turns statement logging with the capture prefix on or off, and waits for the reload to reach
/// the backends (they apply it before their next command).
async fn set_logging(admin: &mut sqlx::postgres::PgConnection, on: bool) -> anyhow::Result<()> {
    // One statement each: ALTER SYSTEM cannot run inside a transaction block.
    let statements = if on {
        [
            "ALTER SYSTEM SET log_statement = 'all'".to_owned(),
            format!("ALTER SYSTEM SET log_line_prefix = '{PREFIX}%p] '"),
        ]
    } else {
        ["ALTER SYSTEM RESET log_statement".to_owned(), "ALTER SYSTEM RESET log_line_prefix".to_owned()]
    };
    for sql in statements.iter().map(String::as_str).chain(["SELECT pg_reload_conf()"]) {
        sqlx::raw_sql(sql).execute(&mut *admin).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// The statements of the `execute` entries in a stretch of the server log written with the
/// capture prefix, in order, their parameters written in as literals. Entries of other kinds
/// (the capture's own simple statements, reload messages) and the worker's statements
/// (`is_query_statement`) are skipped.
///
/// # Errors
/// An `execute` entry whose parameters cannot be read.
pub fn executed(log: &str) -> anyhow::Result<Vec<String>> {
    // Entries: a line that starts with the capture prefix or with a date (the default prefix,
    // before and after the capture) starts one; other lines continue it.
    let mut entries: Vec<String> = Vec::new();
    for line in log.lines() {
        let starts = line.starts_with(PREFIX)
            || (line.len() > 5 && line.as_bytes()[..4].iter().all(u8::is_ascii_digit) && line.as_bytes()[4] == b'-');
        match entries.last_mut() {
            Some(entry) if !starts => {
                entry.push('\n');
                entry.push_str(line);
            }
            _ => entries.push(line.to_owned()),
        }
    }
    // (pid, statement) of the latest execute of each backend, waiting for its parameters.
    let mut pending: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for entry in &entries {
        let Some(rest) = entry.strip_prefix(PREFIX) else { continue };
        let Some((pid, body)) = rest.split_once("] ") else { continue };
        if let Some(statement) = body.strip_prefix("LOG:  execute ") {
            let Some((_, sql)) = statement.split_once(": ") else { continue };
            pending.insert(pid.to_owned(), out.len());
            out.push((sql.to_owned(), None));
        } else if let Some(parameters) = body.strip_prefix("DETAIL:  parameters: ")
            && let Some(i) = pending.remove(pid)
        {
            out[i].1 = Some(parameters.to_owned());
        }
    }
    out.into_iter()
        .filter(|(sql, _)| is_query_statement(sql))
        .map(|(sql, parameters)| match parameters {
            Some(p) => Ok(substitute(&sql, &parse_parameters(&p)?)),
            None => Ok(sql),
        })
        .collect()
}

/// `$1 = '1', $2 = 'it''s', $3 = NULL` as `[(1, "'1'"), (2, "'it''s'"), (3, "NULL")]`: each value
/// as the SQL literal the log shows.
///
/// # Errors
/// The text is not such a list.
pub fn parse_parameters(text: &str) -> anyhow::Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some(after) = rest.strip_prefix('$') else { bail!("no parameter at {rest:?}") };
        let (n, after) = after.split_once(" = ").with_context(|| format!("no value at {rest:?}"))?;
        let n: usize = n.parse().with_context(|| format!("parameter number {n:?}"))?;
        let value_len = if after.starts_with('\'') {
            // A quoted literal: up to the quote that is not doubled.
            let bytes = after.as_bytes();
            let mut i = 1;
            loop {
                match bytes.get(i) {
                    Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => break i + 1,
                    Some(_) => i += 1,
                    None => bail!("unterminated value of ${n}"),
                }
            }
        } else {
            after.find(", $").unwrap_or(after.len())
        };
        out.push((n, after[..value_len].to_owned()));
        rest = after[value_len..].trim_start_matches(", ");
    }
    Ok(out)
}

/// `sql` with each `$n` replaced by its literal, in one pass (a literal holding `$2` is not
/// rewritten again).
#[must_use]
pub fn substitute(sql: &str, parameters: &[(usize, String)]) -> String {
    let values: HashMap<usize, &str> = parameters.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>().ok().and_then(|n| values.get(&n)) {
            Some(value) => out.push_str(value),
            None => out.push_str(&rest[at..=at + digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Whether a captured statement is one a record query runs: a read of the store (a `SELECT`, or
/// a `WITH … SELECT` like a deep window page) that is not the worker's (its claims and lease
/// renewals, running on the same database while the capture is on, would otherwise be replayed
/// as if the query had made them).
fn is_query_statement(sql: &str) -> bool {
    let upper = sql.trim_start().to_ascii_uppercase();
    (upper.starts_with("SELECT") || upper.starts_with("WITH"))
        && !upper.contains("FOR UPDATE")
        && !upper.contains("LEASE_")
        && !upper.contains("UPDATE ")
        && !upper.contains("DELETE ")
        && !upper.contains("INSERT ")
}

/// A pgbench script running `statements` in order, as one transaction of the script.
fn script(statements: &[String]) -> String {
    statements.iter().map(|s| format!("{};\n", s.trim().trim_end_matches(';'))).collect()
}

/// The transaction times of a pgbench transaction log (`client transaction time_us script
/// epoch epoch_us …`), µs; failed transactions (no number) are left out.
fn transaction_times(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_read_as_their_literals() {
        let p = parse_parameters("$1 = '1', $2 = 'it''s, $3 = x', $3 = NULL, $10 = '50'").expect("parses");
        assert_eq!(p, vec![(1, "'1'".into()), (2, "'it''s, $3 = x'".into()), (3, "NULL".into()), (10, "'50'".into())]);
        assert!(parse_parameters("$1 = 'open").is_err());
        assert!(parse_parameters("1 = '1'").is_err());
    }

    #[test]
    fn substitution_puts_higher_numbers_first() {
        let p = vec![(1, "'a'".to_owned()), (10, "'j'".to_owned())];
        assert_eq!(substitute("x = $1 AND y = $10", &p), "x = 'a' AND y = 'j'");
        let p = vec![(1, "'costs $2'".to_owned()), (2, "'b'".to_owned())];
        assert_eq!(substitute("a = $1 AND b = $2 AND c = $3", &p), "a = 'costs $2' AND b = 'b' AND c = $3");
    }

    #[test]
    fn the_query_statements_are_read_from_the_log_with_their_parameters() {
        let log = "2026-11-23 18:00:00.000 UTC [7] LOG:  received SIGHUP, reloading configuration files\n\
                   cachectl-capture[9] LOG:  statement: SELECT pg_reload_conf()\n\
                   cachectl-capture[42] LOG:  execute sqlx_s_3: SELECT c.total, p.* FROM\n\
                   \x20              (SELECT COUNT(*) FROM items WHERE task_id = $1 AND account = $2) c\n\
                   cachectl-capture[42] DETAIL:  parameters: $1 = '1', $2 = 'acct00'\n\
                   cachectl-capture[43] LOG:  execute sqlx_s_9: UPDATE items SET lease_owner = $1 WHERE id IN (SELECT id FROM items FOR UPDATE SKIP LOCKED)\n\
                   cachectl-capture[43] DETAIL:  parameters: $1 = 'w'\n\
                   cachectl-capture[42] LOG:  execute sqlx_s_4: SELECT 1 FROM item_counts\n\
                   cachectl-capture[42] LOG:  execute sqlx_s_5: WITH parts AS (SELECT $1 AS n) SELECT n FROM parts\n\
                   cachectl-capture[42] DETAIL:  parameters: $1 = '7'\n\
                   cachectl-capture[43] LOG:  execute sqlx_s_6: WITH d AS (DELETE FROM items WHERE id = $1) SELECT 1\n\
                   cachectl-capture[43] DETAIL:  parameters: $1 = '9'\n\
                   2026-11-23 18:00:01.000 UTC [7] LOG:  parameter \"log_statement\" removed\n";
        let statements = executed(log).expect("parses");
        assert_eq!(
            statements,
            vec![
                "SELECT c.total, p.* FROM\n               (SELECT COUNT(*) FROM items WHERE task_id = '1' AND account = 'acct00') c"
                    .to_owned(),
                "SELECT 1 FROM item_counts".to_owned(),
                "WITH parts AS (SELECT '7' AS n) SELECT n FROM parts".to_owned(),
            ]
        );
        assert_eq!(script(&statements[1..2]), "SELECT 1 FROM item_counts;\n");
    }

    #[test]
    fn transaction_times_skip_failed_transactions() {
        assert_eq!(
            transaction_times("0 1 950 0 1700000000 1\n1 1 failed 0 1700000000 2\n3 7 1200 0 1 2\n"),
            vec![950, 1200]
        );
    }
}
