//! What the scenarios run against, all on 127.0.0.1 with free ports and stopped when dropped:
//! an HTTP origin, Varnish nodes built from the shipped VCL, and cachectl as a child process
//! (this binary's hidden `serve` subcommand), whose peak RSS is read from /proc.

use anyhow::{Context, bail};
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for the component to take).
///
/// # Panics
/// No port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The repository's root, where `deploy/` lives.
#[must_use]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Waits until `port` accepts connections.
///
/// # Errors
/// Nothing listens after 20 seconds.
pub async fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not start listening on {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A child process killed on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An origin answering every GET with a small cacheable body (the purges never reach it; it is
/// there so that the shipped VCL has a backend). A path `/tagged/<tag>/...` is answered with
/// `Surrogate-Key: <tag>` (the tag scenario, `crate::tags`).
pub struct Origin {
    /// Its port.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Starts the origin on a free port.
    ///
    /// # Errors
    /// It cannot bind.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let app = axum::Router::new().fallback(|headers: HeaderMap, uri: Uri| async move {
            let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
            let tag = uri.path().strip_prefix("/tagged/").and_then(|rest| rest.split('/').next()).unwrap_or("");
            let body = format!("content of {host}{uri}\n");
            if tag.is_empty() {
                ([("cache-control", "public, max-age=3600")], body).into_response()
            } else {
                ([("cache-control", "public, max-age=3600"), ("surrogate-key", tag)], body).into_response()
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, task })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Varnish 7.1 node running `deploy/varnish/cachectl.vcl` with the origin as its backend.
pub struct Varnish {
    /// Its HTTP port.
    pub port: u16,
    varnishd: cachectl_testkit::Varnishd,
}

impl Varnish {
    /// Starts one node (about a second: the VCL is compiled to C), on a free port (up to three
    /// tries, `cachectl_testkit::Varnishd::start`).
    ///
    /// # Errors
    /// varnishd is missing or does not start (its log is in the error).
    pub async fn start(origin_port: u16) -> anyhow::Result<Self> {
        Self::start_with_storage(origin_port, "malloc,64m").await
    }

    /// [`Varnish::start`] with the storage `-s` argument `storage` (the tag scenario caches a
    /// million objects a node, which 64 MB cannot hold).
    ///
    /// # Errors
    /// varnishd is missing or does not start (its log is in the error).
    pub async fn start_with_storage(origin_port: u16, storage: &str) -> anyhow::Result<Self> {
        let vcl = std::fs::read_to_string(repo_root().join("deploy/varnish/cachectl.vcl"))?;
        let vcl = vcl.replace(".port = \"8080\";", &format!(".port = \"{origin_port}\";"));
        if !vcl.contains(&format!(".port = \"{origin_port}\";")) {
            bail!("the shipped VCL's backend port changed; update crates/bench/src/fixtures.rs");
        }
        // Restarts enough for batched purges of any `--purge-batch` (docs/edges.md).
        let args = ["-s", storage, "-p", "max_restarts=64"];
        let varnishd = cachectl_testkit::Varnishd::start(&vcl, &args).await.map_err(anyhow::Error::msg)?;
        Ok(Self { port: varnishd.port, varnishd })
    }

    /// `127.0.0.1:PORT`.
    #[must_use]
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `MAIN.n_object` (objects cached) as `varnishstat` reads it; `None` when it cannot.
    #[must_use]
    pub fn objects(&self) -> Option<u64> {
        let out = Command::new("varnishstat")
            .arg("-n")
            .arg(self.varnishd.workdir())
            .args(["-1", "-f", "MAIN.n_object"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find(|l| l.starts_with("MAIN.n_object")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }
}

/// The accounts of every benchmark server: `acctNN` owns `acctNN.test` and the names below it,
/// token `bench-token-NN`; `acct00` also has the access key `AK_BENCH` / `SK_BENCH`. Quotas and
/// rate limits are raised far beyond what a run spends.
#[must_use]
pub fn accounts_toml(accounts: usize) -> String {
    let mut toml = String::new();
    for a in 0..accounts {
        let name = account_name(a);
        let _ = write!(
            toml,
            "[[accounts]]\nname = \"{name}\"\ndomains = [\"{name}.test\", \"*.{name}.test\"]\ntokens = [\"{}\"]\n\
             rate_limit_per_minute = 100000000\n\
             quotas = {{ refresh_urls = 1000000000000, refresh_dirs = 1000000000, prefetch_urls = 1000000000000, refresh_tags = 1000000000 }}\n",
            token(a)
        );
        if a == 0 {
            toml.push_str("access_keys = [{ ak = \"AK_BENCH\", sk = \"SK_BENCH\" }]\n");
        }
        toml.push('\n');
    }
    toml
}

/// The name of account `a`.
#[must_use]
pub fn account_name(a: usize) -> String {
    format!("acct{a:02}")
}

/// The Baishan token of account `a`.
#[must_use]
pub fn token(a: usize) -> String {
    format!("bench-token-{a:02}")
}

/// The worker settings of a benchmark server, and the size of its PostgreSQL pool.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WorkerSettings {
    /// `[worker] per_node_concurrency`.
    pub per_node_concurrency: usize,
    /// `[worker] pipeline_depth`.
    pub pipeline_depth: usize,
    /// `[worker] purge_batch`.
    pub purge_batch: usize,
    /// `[worker] max_items_in_flight`.
    pub max_items_in_flight: usize,
    /// `[worker] enabled`: `false` for an API-only server.
    pub enabled: bool,
    /// `[store] max_connections` (PostgreSQL's pool).
    pub max_connections: u32,
}

/// A running cachectl (`cachectl-bench serve`), its configuration in a temporary directory.
pub struct Server {
    /// Its HTTP port.
    pub port: u16,
    /// Its store URL.
    pub store_url: String,
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `exe serve --config FILE` on `store_url` with the given edges and worker settings,
    /// and waits for `/healthz`.
    ///
    /// # Errors
    /// The process exits or does not answer within 60 seconds (a migrated 10-million-item file
    /// opens quickly; the wait is for slow disks).
    pub async fn start(
        exe: &Path,
        store_url: &str,
        accounts: usize,
        edges: &[String],
        worker: WorkerSettings,
    ) -> anyhow::Result<Self> {
        let mut toml = String::new();
        for (i, address) in edges.iter().enumerate() {
            let _ =
                write!(toml, "[[edges]]\nname = \"varnish-{i}\"\ndriver = \"varnish\"\naddress = \"{address}\"\n\n");
        }
        Self::start_toml(exe, store_url, accounts, &toml, worker).await
    }

    /// [`Server::start`] with the edges (and any other table, such as `[bus]`) given as TOML.
    ///
    /// # Errors
    /// As [`Server::start`].
    pub async fn start_toml(
        exe: &Path,
        store_url: &str,
        accounts: usize,
        edges: &str,
        worker: WorkerSettings,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let mut config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"2s\"\n\n[store]\nurl = \"{store_url}\"\nmax_connections = {}\n\n\
             [worker]\nenabled = {}\nper_node_concurrency = {}\npipeline_depth = {}\npurge_batch = {}\nmax_items_in_flight = {}\npoll_interval = \"50ms\"\n\
             item_deadline = \"60s\"\nrequest_timeout = \"5s\"\nretry_initial = \"50ms\"\nretry_max = \"1s\"\n\n\
             [retention]\ndays = 40\n\n[baishan]\nrate_limit_per_minute = 100000000\n\n",
            worker.max_connections,
            worker.enabled,
            worker.per_node_concurrency,
            worker.pipeline_depth,
            worker.purge_batch,
            worker.max_items_in_flight
        );
        config.push_str(&accounts_toml(accounts));
        config.push_str(edges);
        let config_path = dir.path().join("cachectl.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("cachectl.log"))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("CACHECTL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut server = Self { port, store_url: store_url.to_owned(), proc: Proc { child }, dir };
        let http = reqwest::Client::builder().no_proxy().build()?;
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(server.url("/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(server);
            }
            if let Some(status) = server.proc.child.try_wait()? {
                bail!("cachectl exited with {status}:\n{}", server.log());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("cachectl did not start:\n{}", server.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The server's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cachectl.log")).unwrap_or_default()
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Peak resident set size so far (`VmHWM`), in MiB.
    #[must_use]
    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.pid())
    }
}

/// `VmHWM` of a process in MiB (0 when unreadable).
#[must_use]
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Whether a program is on the PATH.
#[must_use]
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
