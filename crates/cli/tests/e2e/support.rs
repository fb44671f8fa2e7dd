//! Test fixtures: an origin server, Varnish and nginx caches built from the project's shipped
//! edge configuration (from `cachectl_testkit::caches`, shared with the edge crate's tests), and
//! the `cachectl` binary itself — all on 127.0.0.1 with free ports, all stopped when dropped.

use axum::http::HeaderMap;
pub use cachectl_testkit::caches::{Nginx, Origin, Varnish, cache_status, repo_root};
use serde_json::Value;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for the component to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process in a process group of its own, the whole group stopped on drop.
pub struct Proc {
    pub child: cachectl_testkit::Group,
}

/// A running `cachectl serve`, with its configuration in a temporary directory.
pub struct Cachectl {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    config_path: PathBuf,
    proc: Option<Proc>,
}

/// The standard test account: `acme` owning `example.com` and `*.example.com`, token
/// `acme-secret-token`; a second account `other` owning `other.test`, token `other-secret-token`.
pub const ACCOUNTS: &str = r#"
[[accounts]]
name = "acme"
domains = ["example.com", "*.example.com"]
tokens = ["acme-secret-token"]
access_keys = [{ ak = "AK_ACME", sk = "SK_ACME" }]

[[accounts]]
name = "other"
domains = ["other.test"]
tokens = [{ name = "ops", token = "other-secret-token" }]
"#;

pub const TOKEN: &str = "acme-secret-token";

impl Cachectl {
    /// Starts cachectl with `extra` TOML (accounts, edges, worker settings) on a fresh SQLite file.
    pub async fn start(extra: &str) -> Self {
        Self::start_on_store(None, extra).await
    }

    /// Starts cachectl on `store_url` (a fresh SQLite file when `None`). The default rate limit is
    /// raised so that polling tests never meet it; tests of the limits set their own per account.
    pub async fn start_on_store(store_url: Option<&str>, extra: &str) -> Self {
        Self::start_full(store_url, "", extra).await
    }

    /// `start` with `server_keys` (TOML lines) added to the `[server]` table.
    pub async fn start_with_server(server_keys: &str, extra: &str) -> Self {
        Self::start_full(None, server_keys, extra).await
    }

    async fn start_full(store_url: Option<&str>, server_keys: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let store = store_url.map_or_else(|| format!("sqlite://{}/cachectl.db", dir.path().display()), str::to_owned);
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"2s\"\n{server_keys}\n\n[store]\nurl = \"{store}\"\nacquire_timeout = \"1s\"\n\n[baishan]\nrate_limit_per_minute = 100000\n\n{extra}\n"
        );
        let config_path = dir.path().join("cachectl.toml");
        std::fs::write(&config_path, config).unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut me = Self { port, dir, http, config_path, proc: None };
        me.restart().await;
        me
    }

    /// (Re)starts the process on the same configuration and database.
    pub async fn restart(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("cachectl.log")).unwrap();
        let child = cachectl_testkit::Group::spawn(
            Command::new(env!("CARGO_BIN_EXE_cachectl"))
                .arg("serve")
                .arg("--config")
                .arg(&self.config_path)
                .env("CACHECTL_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap()
        .crash_on_drop();
        self.proc = Some(Proc { child });
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(self.url("/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            if let Some(status) = self.proc.as_mut().unwrap().child.try_wait().unwrap() {
                panic!("cachectl exited with {status}:\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "cachectl did not start:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: no shutdown, no lease release, nothing flushed.
    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.child.kill9();
        }
    }

    /// SIGTERM, then waits for the process to exit by itself.
    pub async fn terminate(&mut self) {
        let mut proc = self.proc.take().expect("running");
        proc.child.signal(cachectl_testkit::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = proc.child.try_wait().unwrap() {
                assert!(status.success(), "cachectl exited with {status} on SIGTERM:\n{}", self.log());
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "cachectl did not stop on SIGTERM:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the configuration file (the process reads it again on SIGHUP or a restart).
    pub fn rewrite_config(&self, change: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(&self.config_path, change(text)).unwrap();
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: cachectl_testkit::Signal) {
        self.proc.as_ref().expect("running").child.signal(signal);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cachectl.log")).unwrap_or_default()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("cachectl.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// GET with the standard token in the query.
    pub async fn get(&self, path_and_query: &str) -> (u16, HeaderMap, Value) {
        let sep = if path_and_query.contains('?') { '&' } else { '?' };
        self.raw(reqwest::Method::GET, &format!("{path_and_query}{sep}token={TOKEN}"), None).await
    }

    /// POST a JSON body with the standard token in the `Token` header.
    pub async fn post(&self, path: &str, body: Value) -> (u16, HeaderMap, Value) {
        let response = self.http.post(self.url(path)).header("token", TOKEN).json(&body).send().await.unwrap();
        split(response).await
    }

    /// Any request; `body` is sent as it is.
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<(&str, &str)>,
    ) -> (u16, HeaderMap, Value) {
        let mut request = self.http.request(method, self.url(path_and_query));
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body.to_owned());
        }
        split(request.send().await.unwrap()).await
    }

    /// Submits a refresh (or prefetch) and returns the task id, asserting success.
    pub async fn submit(&self, path: &str, body: Value) -> i64 {
        let (status, _, json) = self.post(path, body).await;
        assert_eq!(status, 200, "{json}");
        json["data"]["task_id"].as_i64().unwrap()
    }

    /// Every item of a task (Baishan mode 1), following pages.
    pub async fn task_items(&self, path: &str, task_id: i64) -> Vec<Value> {
        let mut all = Vec::new();
        for page in 1.. {
            let (status, _, json) =
                self.get(&format!("{path}?task_id={task_id}&page_size=500&page_number={page}")).await;
            assert_eq!(status, 200, "{json}");
            let list = json["data"]["list"].as_array().unwrap().clone();
            if list.is_empty() {
                break;
            }
            all.extend(list);
        }
        all
    }

    /// Waits until every item of the task is completed or failed; returns them.
    pub async fn wait_final(&self, path: &str, task_id: i64, timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let items = self.task_items(path, task_id).await;
            if !items.is_empty() && items.iter().all(|i| matches!(i["status"].as_str(), Some("completed" | "failed"))) {
                return items;
            }
            assert!(start.elapsed() < timeout, "task {task_id} not final after {timeout:?}: {items:?}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a read-only SQL query against the service's database file.
    pub async fn db(&self) -> sqlx::SqlitePool {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(self.db_path()).read_only(true);
        sqlx::SqlitePool::connect_with(options).await.unwrap()
    }
}

async fn split(response: reqwest::Response) -> (u16, HeaderMap, Value) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, headers, json)
}

/// The TOML of one edge node.
pub fn edge(name: &str, driver: &str, address: &str, tier: &str) -> String {
    format!("[[edges]]\nname = \"{name}\"\ndriver = \"{driver}\"\naddress = \"{address}\"\ntier = \"{tier}\"\n\n")
}

/// The most common fixture: an origin, one Varnish node `v1` in front of it, and cachectl with
/// the standard accounts and a 10 s item deadline driving that node.
pub async fn one_varnish() -> (Origin, Varnish, Cachectl) {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}",
        fast_worker("10s"),
        edge("v1", "varnish", &varnish.address(), "edge")
    ))
    .await;
    (origin, varnish, server)
}

/// Worker settings that keep tests short.
pub fn fast_worker(deadline: &str) -> String {
    format!(
        "[worker]\nitem_deadline = \"{deadline}\"\nretry_initial = \"50ms\"\nretry_max = \"300ms\"\nrequest_timeout = \"3s\"\nconnect_timeout = \"500ms\"\npoll_interval = \"200ms\"\nlease = \"5s\"\n\n"
    )
}

/// Waits until the current minute has at least `secs` seconds left, so that a burst of requests
/// stays inside one rate-limit window.
pub async fn room_in_this_minute(secs: i64) {
    let into_minute = (crate::now_ms() / 1000) % 60;
    if 60 - into_minute < secs {
        tokio::time::sleep(Duration::from_secs(u64::try_from(60 - into_minute).unwrap() + 1)).await;
    }
}
