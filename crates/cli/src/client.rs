//! The client commands of `cachectl` (`refresh`, `prefetch`, `status`, `tasks`, `watch`): they
//! speak the native API over HTTP, show live progress, and turn every failure into one clear
//! line and a documented exit code. They use no server code, only the wire format.

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit codes, as documented in docs/cli.md.
pub mod exit {
    /// Every item completed (or the command had nothing to wait for).
    pub const OK: u8 = 0;
    /// At least one item failed.
    pub const FAILED_ITEMS: u8 = 1;
    /// The request was invalid (bad flags, a URL refused, a quota exceeded).
    pub const INVALID: u8 = 2;
    /// The server could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The token was missing or refused.
    pub const UNAUTHORIZED: u8 = 4;
    /// No such task.
    pub const NOT_FOUND: u8 = 5;
    /// Any other server-side failure.
    pub const SERVER: u8 = 6;
}

/// A failure with its exit code and one line for the user.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code.
    pub code: u8,
    /// What to print after `error: `.
    pub message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Where the server is and how to authenticate: flags, then `CACHECTL_SERVER` /
/// `CACHECTL_TOKEN`, then the client configuration file.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Base URL, such as `http://127.0.0.1:8080`.
    pub server: String,
    /// A token of the account.
    pub token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    token: Option<String>,
}

/// The default client configuration file: `$XDG_CONFIG_HOME/cachectl/client.toml` or
/// `~/.config/cachectl/client.toml`.
#[must_use]
pub fn default_client_file() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("cachectl/client.toml"))
}

impl Connection {
    /// Resolves the connection from flags (already merged with the environment by clap) and
    /// the client file.
    ///
    /// # Errors
    /// The file is unreadable, or no token is known.
    pub fn resolve(server: Option<String>, token: Option<String>, file: Option<&Path>) -> Result<Self, Failure> {
        let file_path = file.map(Path::to_path_buf).or_else(default_client_file);
        let from_file: ClientFile = match &file_path {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Failure::new(exit::INVALID, format!("cannot read {}: {e}", path.display())))?;
                toml::from_str(&text).map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", path.display())))?
            }
            Some(path) if file.is_some() => {
                return Err(Failure::new(exit::INVALID, format!("{} does not exist", path.display())));
            }
            _ => ClientFile::default(),
        };
        let server = server.or(from_file.server).unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
        let token = token.or(from_file.token).ok_or_else(|| {
            Failure::new(
                exit::UNAUTHORIZED,
                "no token: pass --token, set CACHECTL_TOKEN, or put token = \"...\" in the client file",
            )
        })?;
        Ok(Self { server: server.trim_end_matches('/').to_owned(), token })
    }
}

/// A small client of the native API.
pub struct Client {
    conn: Connection,
    http: reqwest::Client,
}

impl Client {
    /// A client for `conn`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(conn: Connection) -> anyhow::Result<Self> {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).build().context("building the HTTP client")?;
        Ok(Self { conn, http })
    }

    /// Sends a request, waiting out `429`s as `Retry-After` says (and saying so), and maps
    /// failures to one line and an exit code.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.conn.server);
        for _ in 0..6 {
            let mut request = self.http.request(method.clone(), &url).bearer_auth(&self.conn.token);
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| {
                let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
                Failure::new(exit::UNREACHABLE, format!("cannot reach cachectl at {}: {reason}", self.conn.server))
            })?;
            let status = response.status().as_u16();
            let retry_after =
                response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            let value: Value = response.json().await.unwrap_or(Value::Null);
            let message = value["error"]["message"].as_str().unwrap_or("no details").to_owned();
            match status {
                200..=299 => return Ok(value),
                429 => {
                    let wait = retry_after.unwrap_or(5).clamp(1, 120);
                    eprintln!("rate limited by the server; retrying in {wait} s");
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                401 => return Err(Failure::new(exit::UNAUTHORIZED, format!("unauthorized: {message}"))),
                404 => return Err(Failure::new(exit::NOT_FOUND, format!("not found: {message}"))),
                400 | 409 | 422 => return Err(Failure::new(exit::INVALID, format!("refused: {message}"))),
                _ => return Err(Failure::new(exit::SERVER, format!("server error (HTTP {status}): {message}"))),
            }
        }
        Err(Failure::new(exit::SERVER, "still rate limited after several retries; giving up"))
    }

    /// Submits a task; returns the `Submitted` answer.
    ///
    /// # Errors
    /// See `Failure`.
    pub async fn submit(&self, body: &Value, idempotency_key: Option<&str>) -> Result<Value, Failure> {
        let headers: Vec<(&str, String)> =
            idempotency_key.map(|k| ("idempotency-key", k.to_owned())).into_iter().collect();
        self.call(reqwest::Method::POST, "/api/v1/tasks", Some(body), &headers).await
    }

    /// A task with its items and per-node results.
    ///
    /// # Errors
    /// See `Failure`.
    pub async fn task(&self, id: i64) -> Result<Value, Failure> {
        self.call(reqwest::Method::GET, &format!("/api/v1/tasks/{id}"), None, &[]).await
    }

    /// A page of tasks.
    ///
    /// # Errors
    /// See `Failure`.
    pub async fn tasks(&self, query: &[(&str, String)]) -> Result<Value, Failure> {
        let qs = url_query(query);
        self.call(reqwest::Method::GET, &format!("/api/v1/tasks{qs}"), None, &[]).await
    }

    /// A request of the admin API.
    ///
    /// # Errors
    /// See `Failure`.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        self.call(method, path, body, &[]).await
    }

    /// The node inventory.
    ///
    /// # Errors
    /// See `Failure`.
    pub async fn nodes(&self) -> Result<Value, Failure> {
        self.call(reqwest::Method::GET, "/api/v1/nodes", None, &[]).await
    }

    /// Follows a task until it is final, showing progress on stderr; returns the final detail.
    ///
    /// # Errors
    /// See `Failure`.
    pub async fn wait(&self, id: i64, quiet: bool) -> Result<Value, Failure> {
        let mut view = ProgressView::new(quiet);
        loop {
            let detail = self.task(id).await?;
            view.update(&detail);
            if detail["task"]["state"] != "running" {
                view.finish(&detail);
                return Ok(detail);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn url_query(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let mut s = reqwest::Url::parse("http://x/").expect("a valid URL");
    s.query_pairs_mut().extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
    format!("?{}", s.query().unwrap_or(""))
}

/// Live progress: bars on a terminal (the task, then one per node), plain lines otherwise.
struct ProgressView {
    bars: Option<(MultiProgress, ProgressBar, BTreeMap<String, ProgressBar>)>,
    last_line: String,
    quiet: bool,
}

impl ProgressView {
    fn new(quiet: bool) -> Self {
        let bars = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let task = multi.add(ProgressBar::new(0));
            task.set_style(bar_style("{prefix:>12} [{bar:30}] {pos}/{len} items {msg}"));
            (multi, task, BTreeMap::new())
        });
        Self { bars, last_line: String::new(), quiet }
    }

    fn update(&mut self, detail: &Value) {
        let counts = &detail["task"]["counts"];
        let total = counts["total"].as_u64().unwrap_or(0);
        let done = counts["completed"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0);
        let nodes: Vec<(String, u64)> = detail["nodes"]
            .as_array()
            .map(|n| {
                n.iter()
                    .map(|n| (n["node"].as_str().unwrap_or("?").to_owned(), n["done"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        // A node's bar counts the task's items done there; a node serving only some of the
        // task's hosts never fills its bar (the API does not say which items a node will get).
        let per_node_total = total;
        if let Some((multi, task, node_bars)) = &mut self.bars {
            task.set_prefix(format!("task {}", detail["task"]["id"]));
            task.set_length(total);
            task.set_position(done);
            task.set_message(format!("{} failed", counts["failed"]));
            for (node, node_done) in &nodes {
                let bar = node_bars.entry(node.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(per_node_total));
                    bar.set_style(bar_style("{prefix:>12} [{bar:30}] {pos}/{len}"));
                    bar.set_prefix(node.clone());
                    bar
                });
                bar.set_length(per_node_total);
                bar.set_position(*node_done);
            }
        } else if !self.quiet {
            let per_node: Vec<String> = nodes.iter().map(|(n, d)| format!("{n} {d}/{per_node_total}")).collect();
            let line = format!(
                "task {}: {done}/{total} items final ({} completed, {} failed){}{}",
                detail["task"]["id"],
                counts["completed"],
                counts["failed"],
                if per_node.is_empty() { "" } else { " | " },
                per_node.join(", ")
            );
            if line != self.last_line {
                eprintln!("{line}");
                self.last_line = line;
            }
        }
    }

    fn finish(&mut self, detail: &Value) {
        if let Some((_, task, node_bars)) = &self.bars {
            for bar in node_bars.values() {
                bar.finish();
            }
            task.finish_with_message(format!(
                "{} ({} failed)",
                detail["task"]["state"].as_str().unwrap_or(""),
                detail["task"]["counts"]["failed"]
            ));
        }
    }
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

/// The exit code a finished task earns.
#[must_use]
pub fn outcome(detail: &Value) -> u8 {
    if detail["task"]["counts"]["failed"].as_u64().unwrap_or(0) > 0 { exit::FAILED_ITEMS } else { exit::OK }
}

/// A human table of a task and its items.
#[must_use]
pub fn render_task(detail: &Value) -> String {
    let t = &detail["task"];
    let mut out = format!(
        "task {}  {}  {}  {} items: {} completed, {} failed, {} waiting, {} processing  created {}\n",
        t["id"],
        t["kind"].as_str().unwrap_or(""),
        t["state"].as_str().unwrap_or(""),
        t["counts"]["total"],
        t["counts"]["completed"],
        t["counts"]["failed"],
        t["counts"]["waiting"],
        t["counts"]["processing"],
        t["created_at"].as_str().unwrap_or("")
    );
    let mut rows =
        vec![["ITEM".to_owned(), "KIND".into(), "STATUS".into(), "URL".into(), "NODES".into(), "REASON".into()]];
    for item in detail["items"].as_array().into_iter().flatten() {
        let nodes: Vec<String> = item["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let code = n["status_code"].as_u64().map(|c| format!(" {c}")).unwrap_or_default();
                format!("{}:{}{code}", n["node"].as_str().unwrap_or("?"), n["state"].as_str().unwrap_or("?"))
            })
            .collect();
        rows.push([
            item["id"].to_string(),
            item["kind"].as_str().unwrap_or("").to_owned(),
            item["status"].as_str().unwrap_or("").to_owned(),
            item["url"].as_str().unwrap_or("").to_owned(),
            nodes.join(" "),
            item["reason"].as_str().unwrap_or("").to_owned(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// A human table of tasks.
#[must_use]
pub fn render_tasks(page: &Value) -> String {
    let mut rows =
        vec![["TASK".to_owned(), "KIND".into(), "STATE".into(), "ITEMS".into(), "FAILED".into(), "CREATED".into()]];
    for t in page["tasks"].as_array().into_iter().flatten() {
        rows.push([
            t["id"].to_string(),
            t["kind"].as_str().unwrap_or("").to_owned(),
            t["state"].as_str().unwrap_or("").to_owned(),
            t["counts"]["total"].to_string(),
            t["counts"]["failed"].to_string(),
            t["created_at"].as_str().unwrap_or("").to_owned(),
        ]);
    }
    let mut out = table(&rows);
    if let Some(cursor) = page["next_cursor"].as_str() {
        out.push_str(&format!("(more: --cursor {cursor})\n"));
    }
    out
}

/// The node inventory as a table.
pub fn render_nodes(list: &Value) -> String {
    let mut rows = vec![[
        "NODE".to_owned(),
        "TIER".into(),
        "DRIVER".into(),
        "TRANSPORT".into(),
        "CONFIGURED".into(),
        "STATE".into(),
        "LAST HEARTBEAT".into(),
        "LAG".into(),
        "IN FLIGHT".into(),
    ]];
    let text = |v: &Value| v.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    for n in list["nodes"].as_array().into_iter().flatten() {
        rows.push([
            text(&n["name"]),
            text(&n["tier"]),
            text(&n["driver"]),
            text(&n["transport"]),
            if n["configured"] == true { "yes" } else { "no (no traffic)" }.to_owned(),
            text(&n["state"]),
            text(&n["last_heartbeat"]),
            n["lag"].as_u64().map_or_else(|| "-".to_owned(), |l| l.to_string()),
            n["in_flight"].to_string(),
        ]);
    }
    table(&rows)
}

pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Reads URLs from a file: one per line, blank lines and `#` comments skipped.
///
/// # Errors
/// The file cannot be read.
pub fn read_url_file(path: &Path) -> Result<Vec<String>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(exit::INVALID, format!("cannot read {}: {e}", path.display())))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect())
}

/// `--since`: an RFC 3339 time, or a duration ago such as `2h` or `30m`.
///
/// # Errors
/// Neither form.
pub fn parse_since(text: &str) -> Result<String, Failure> {
    if chrono::DateTime::parse_from_rfc3339(text).is_ok() {
        return Ok(text.to_owned());
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        Failure::new(exit::INVALID, format!("--since {text:?}: use an RFC 3339 time or a duration such as 2h"))
    })?;
    let at = chrono::Utc::now() - chrono::Duration::from_std(ago).unwrap_or_default();
    Ok(at.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}
