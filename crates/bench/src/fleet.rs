//! The fleet scenario (issue #18): N nodes reached through NATS JetStream, each with its own
//! `cachectl agent` (all hosted as tasks in one helper process, `cachectl-bench agents`, each
//! with its own durable consumer, and its own NATS connection unless
//! `agents_per_connection` says how many share one) in front of a counting null cache (an
//! HTTP server in the same helper process that answers 200 to everything, the answers to
//! pipelined requests written together). For N = 10, 100 and
//! 1,000 it measures the time from submit to "completed on every node" of single-URL tasks, and
//! the node-purges per second of a large refresh; then the same N nodes reached directly over
//! HTTP (all at the null cache's address). CPU seconds of the control plane, NATS and the
//! agents' process are read from `/proc` around each throughput run.

use crate::fixtures::{Server, WorkerSettings, token};
use crate::load::percentile_ms;
use crate::scenarios::{http, sqlite_reader, wait_final};
use anyhow::{Context, bail, ensure};
use cachectl_testkit::nats::Nats;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sizes of the fleet scenario.
#[derive(Debug, Clone, Serialize)]
pub struct FleetOptions {
    /// This binary: `serve` and `agents`.
    pub exe: PathBuf,
    /// Node counts, one row each.
    pub sizes: Vec<usize>,
    /// Single-URL tasks per size.
    pub latency_tasks: usize,
    /// Node-purges of each throughput run (URLs = this ÷ nodes, at most `max_urls`).
    pub node_purges: u64,
    /// URLs of a throughput run at most.
    pub max_urls: u64,
    /// `[bus] command_batch`.
    pub command_batch: usize,
    /// `[bus] command_hold`, in milliseconds.
    pub command_hold_ms: u64,
    /// Also run the direct HTTP path on the same node counts.
    pub direct: bool,
    /// Agents sharing one NATS connection (1: each its own, as on separate hosts).
    pub agents_per_connection: usize,
}

impl FleetOptions {
    /// The full scenario.
    #[must_use]
    pub fn full(exe: PathBuf) -> Self {
        Self {
            exe,
            sizes: vec![10, 100, 1000],
            latency_tasks: 50,
            node_purges: 1_000_000,
            max_urls: 10_000,
            command_batch: 256,
            command_hold_ms: 1_000,
            direct: true,
            agents_per_connection: 1,
        }
    }
}

/// One row: a node count and a transport.
#[derive(Debug, Clone, Serialize)]
pub struct FleetRow {
    /// Nodes.
    pub nodes: usize,
    /// `nats` or `http`.
    pub transport: &'static str,
    /// Single-URL tasks measured.
    pub latency_tasks: usize,
    /// Median submit → completed on every node, ms (store timestamps).
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// URLs of the throughput run.
    pub urls: u64,
    /// URLs × nodes.
    pub node_purges: u64,
    /// First task created → last item finished, seconds.
    pub seconds: f64,
    /// Node-purges per second.
    pub per_s: f64,
    /// Items that failed (latency and throughput runs).
    pub failed: i64,
    /// CPU seconds of the control plane during the throughput run.
    pub cpu_control_plane: f64,
    /// CPU seconds of NATS.
    pub cpu_nats: f64,
    /// CPU seconds of the agents' process (agents and the null cache).
    pub cpu_agents: f64,
}

/// Runs the scenario.
///
/// # Errors
/// A component does not start, a submission is refused or a run does not finish.
pub async fn run(options: &FleetOptions, progress: impl Fn(&str)) -> anyhow::Result<Vec<FleetRow>> {
    let mut rows = Vec::new();
    for &nodes in &options.sizes {
        progress(&format!("{nodes} nodes through NATS"));
        let nats = Nats::start().await;
        let agents = Agents::start(&options.exe, &nats.url(), nodes, options.agents_per_connection)?;
        let edges = fleet_toml(nodes, "nats", &agents.null_cache, options, &nats.url());
        let store = tempfile::tempdir()?;
        let store_url = format!("sqlite://{}/fleet.db", store.path().display());
        let server = Server::start_toml(&options.exe, &store_url, 1, &edges, worker(nodes)).await?;
        wait_agents_up(&server, nodes).await?;
        let mut row = measure(&server, options, nodes, "nats", Some(&nats), agents.pid()).await?;
        row.transport = "nats";
        rows.push(row);
        drop(server);
        if options.direct {
            progress(&format!("{nodes} nodes over HTTP"));
            let edges = fleet_toml(nodes, "http", &agents.null_cache, options, &nats.url());
            let store_url = format!("sqlite://{}/direct.db", store.path().display());
            let server = Server::start_toml(&options.exe, &store_url, 1, &edges, worker(nodes)).await?;
            rows.push(measure(&server, options, nodes, "http", None, agents.pid()).await?);
        }
    }
    Ok(rows)
}

/// Worker settings: as many items in flight as keep about 256 k node commands outstanding.
fn worker(nodes: usize) -> WorkerSettings {
    WorkerSettings {
        per_node_concurrency: 8,
        pipeline_depth: 8,
        purge_batch: 8,
        max_items_in_flight: (262_144 / nodes.max(1)).clamp(64, 4096),
        enabled: true,
        max_connections: cachectl_store::DEFAULT_MAX_CONNECTIONS,
    }
}

fn fleet_toml(nodes: usize, transport: &str, null_cache: &str, options: &FleetOptions, nats: &str) -> String {
    let (batch, hold) = (options.command_batch, options.command_hold_ms);
    let mut toml = format!("[bus]\nurl = \"{nats}\"\ncommand_batch = {batch}\ncommand_hold = \"{hold}ms\"\n\n");
    for i in 0..nodes {
        let _ = write!(
            toml,
            "[[edges]]\nname = \"node-{i}\"\ndriver = \"varnish\"\ntransport = \"{transport}\"\naddress = \"{null_cache}\"\n\n"
        );
    }
    toml
}

async fn measure(
    server: &Server,
    options: &FleetOptions,
    nodes: usize,
    transport: &'static str,
    nats: Option<&Nats>,
    agents_pid: u32,
) -> anyhow::Result<FleetRow> {
    let client = http()?;
    let tag = format!("{transport}{nodes}");
    // Latency: single-URL tasks one after the other, each submitted once the one before is final
    // (the time of one purge across the fleet, not of a queue the machine cannot drain).
    let mut conn = sqlite_reader(&server.store_url).await?;
    let pids = [Some(server.pid()), nats.and_then(Nats::pid), Some(agents_pid)];
    let (latency_started, before) = (Instant::now(), pids.map(cpu_seconds));
    for k in 0..options.latency_tasks {
        let url = format!("http://www.acct00.test/lat/{tag}/{k}");
        submit(&client, server, std::slice::from_ref(&url)).await?;
        let sql = format!("SELECT COUNT(*) FROM items WHERE url = '{url}' AND status IN ('completed', 'failed')");
        wait_final(&server.store_url, &sql, 1, Duration::from_secs(120)).await?;
    }
    let filter = format!("url LIKE 'http://www.acct00.test/lat/{tag}/%'");
    let rows = sqlx::query(&format!("SELECT finished_at - created_at, status FROM items WHERE {filter}"))
        .fetch_all(&mut conn)
        .await?;
    let mut samples: Vec<u64> = rows.iter().map(|r| u64::try_from(r.get::<i64, _>(0)).unwrap_or(0) * 1000).collect();
    samples.sort_unstable();
    let mut failed = i64::try_from(rows.iter().filter(|r| r.get::<String, _>(1) == "failed").count())?;
    let (wall, after) = (latency_started.elapsed().as_secs_f64(), pids.map(cpu_seconds));
    eprintln!(
        "    {}; CPU during the latency tasks, % of one core: control plane {:.0}, NATS {:.0}, agents {:.0}",
        spread(&mut conn, &filter).await?,
        (after[0] - before[0]) / wall * 100.0,
        (after[1] - before[1]) / wall * 100.0,
        (after[2] - before[2]) / wall * 100.0,
    );

    // Throughput: URLs × nodes node-purges, submitted 1,000 URLs at a time.
    let urls = (options.node_purges / nodes as u64).clamp(1, options.max_urls);
    let before = pids.map(cpu_seconds);
    let all: Vec<String> = (0..urls).map(|i| format!("http://www.acct00.test/tp/{tag}/{i}")).collect();
    for chunk in all.chunks(1000) {
        submit(&client, server, chunk).await?;
    }
    let filter = format!("url LIKE 'http://www.acct00.test/tp/{tag}/%'");
    let sql = format!("SELECT COUNT(*) FROM items WHERE {filter} AND status IN ('completed', 'failed')");
    wait_final(&server.store_url, &sql, i64::try_from(urls)?, Duration::from_secs(900)).await?;
    let after = pids.map(cpu_seconds);
    let row = sqlx::query(&format!(
        "SELECT MAX(finished_at) - MIN(created_at), SUM(status = 'failed') FROM items WHERE {filter}"
    ))
    .fetch_one(&mut conn)
    .await?;
    let ms: i64 = row.get(0);
    failed += row.get::<i64, _>(1);
    let seconds = ms as f64 / 1000.0;
    let node_purges = urls * nodes as u64;
    let cpu = |i: usize| after[i] - before[i];
    Ok(FleetRow {
        nodes,
        transport,
        latency_tasks: samples.len(),
        p50_ms: percentile_ms(&samples, 0.5),
        p99_ms: percentile_ms(&samples, 0.99),
        urls,
        node_purges,
        seconds,
        per_s: node_purges as f64 / seconds.max(0.001),
        failed,
        cpu_control_plane: cpu(0),
        cpu_nats: cpu(1),
        cpu_agents: cpu(2),
    })
}

/// Where a single URL's time goes: after its submission, when the item started and when its
/// first, median and last node result was written (medians over the latency tasks, ms).
async fn spread(conn: &mut sqlx::SqliteConnection, filter: &str) -> anyhow::Result<String> {
    let rows = sqlx::query(&format!(
        "SELECT i.id, i.started_at - i.created_at, n.updated_at - i.created_at FROM items i \
         JOIN node_results n ON n.item_id = i.id WHERE i.{filter} ORDER BY i.id, 3"
    ))
    .fetch_all(conn)
    .await?;
    let mut items: Vec<(i64, Vec<i64>)> = Vec::new();
    let mut last_id = None;
    for r in &rows {
        let id: i64 = r.get(0);
        if last_id != Some(id) {
            items.push((r.get::<Option<i64>, _>(1).unwrap_or(0), Vec::new()));
            last_id = Some(id);
        }
        if let Some(item) = items.last_mut() {
            item.1.push(r.get(2));
        }
    }
    let median = |mut v: Vec<i64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let at = |f: f64| median(items.iter().map(|(_, n)| n[((n.len() - 1) as f64 * f) as usize]).collect());
    Ok(format!(
        "spread over {} tasks (medians, ms after submit): started {}, first node {}, 10 % {}, half {}, 90 % {}, last node {}",
        items.len(),
        median(items.iter().map(|i| i.0).collect()),
        at(0.0),
        at(0.1),
        at(0.5),
        at(0.9),
        at(1.0)
    ))
}

async fn submit(client: &reqwest::Client, server: &Server, urls: &[String]) -> anyhow::Result<i64> {
    let response =
        client.post(server.url("/api/v1/tasks")).bearer_auth(token(0)).json(&json!({ "urls": urls })).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.as_u16() == 201, "refresh refused ({status}): {body}");
    body["task"]["id"].as_i64().context("task id")
}

async fn wait_agents_up(server: &Server, nodes: usize) -> anyhow::Result<()> {
    let client = http()?;
    let start = Instant::now();
    loop {
        let list: Value = client.get(server.url("/api/v1/nodes")).bearer_auth(token(0)).send().await?.json().await?;
        let up = list["nodes"].as_array().map_or(0, |n| n.iter().filter(|n| n["state"] == "up").count());
        if up == nodes {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{up} of {nodes} agents up after two minutes:\n{}", server.log());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// utime + stime of a process, in seconds (0 when unknown).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The helper process hosting the agents and the null cache.
struct Agents {
    child: std::process::Child,
    null_cache: String,
}

impl Agents {
    fn start(exe: &PathBuf, nats: &str, count: usize, per_connection: usize) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .args(["agents", "--nats", nats, "--count", &count.to_string()])
            .args(["--per-connection", &per_connection.to_string()])
            .env("CACHECTL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("agents' stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let null_cache = line.trim().strip_prefix("null-cache ").context("the agents' first line")?.to_owned();
        Ok(Self { child, null_cache })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cachectl-bench agents`: a null cache on a free port (its address printed first), then
/// `count` agents named `node-0` … in front of it, `per_connection` of them on each NATS
/// connection, until SIGTERM or SIGINT.
///
/// # Errors
/// The null cache cannot listen, or the NATS URL is unusable.
pub async fn host_agents(nats: String, count: usize, per_connection: usize) -> anyhow::Result<()> {
    use cachectl_bus::agent::{self, Connection};
    use std::io::Write as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    // hyper's server writes each answer as it is ready, one write per pipelined request; the
    // null cache flushes the answers to the requests it read together (`pipeline_flush`), so
    // that its own CPU, which is not cachectl's, weighs less beside the agents in this process
    // (BENCHMARKS.md, "Fleet through the bus").
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of file descriptors, say: wait for some to close rather than spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                // As the shipped VCL answers a batched purge: how many paths it purged.
                let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                    let mut response = hyper::Response::new(axum::body::Body::empty());
                    if request.method().as_str() == "PURGE" {
                        let next = request.headers().get("x-cachectl-next").and_then(|v| v.to_str().ok());
                        let paths = 1 + next.map_or(0, |n| n.split(' ').count());
                        response.headers_mut().insert("x-cachectl-purged", hyper::header::HeaderValue::from(paths));
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .pipeline_flush(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    println!("null-cache {address}");
    std::io::stdout().flush()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut connection = None;
    for i in 0..count {
        if i % per_connection.max(1) == 0 {
            connection = Some(Connection::open(&nats, format!("cachectl-bench agents {i}")).await?);
        }
        let Some(connection) = connection.clone() else { continue };
        let text = format!(
            "[agent]\nname = \"node-{i}\"\ndriver = \"varnish\"\naddress = \"{address}\"\nnats_url = \"{nats}\"\nconcurrency = 16\n"
        );
        let config = agent::AgentConfig::from_toml(&text).map_err(|e| anyhow::anyhow!(e))?;
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = agent::run_on(connection, config, token).await {
                eprintln!("agent node-{i}: {e:#}");
            }
        });
    }
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    Ok(())
}

/// The table of BENCHMARKS.md.
#[must_use]
pub fn table(rows: &[FleetRow]) -> String {
    let mut out = String::from(
        "| nodes | path | 1 URL p50 | 1 URL p99 | URLs × nodes | node-purges/s | failed | CPU s: control plane / NATS / agents |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} ms | {:.0} ms | {} × {} | {:.0} | {} | {:.1} / {:.1} / {:.1} |",
            r.nodes,
            r.transport,
            r.p50_ms,
            r.p99_ms,
            r.urls,
            r.nodes,
            r.per_s,
            r.failed,
            r.cpu_control_plane,
            r.cpu_nats,
            r.cpu_agents
        );
    }
    out
}
