//! Scenarios 1, 2 and 4 of BENCHMARKS.md (3 is in `crate::queries`). Each drives a running cachectl through its public HTTP
//! API (the fan-out task, which exceeds the dialect's 1,000-URL limit, is written into the store
//! directly) and reads the server's own timestamps back from the store. None asserts speed.

use crate::fixtures::{Server, Varnish, token};
use crate::load::{LoadFigures, MakeRequest, percentile_ms, rust_load, wrk};
use crate::loader::Timestamp;
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Connection, Row};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Now, in milliseconds since the epoch.
#[must_use]
pub fn now_ms() -> Timestamp {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

pub(crate) async fn sqlite_reader(store_url: &str) -> anyhow::Result<sqlx::SqliteConnection> {
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    let options = SqliteConnectOptions::from_str(store_url)?.busy_timeout(Duration::from_secs(10));
    Ok(sqlx::SqliteConnection::connect_with(&options).await?)
}

/// Waits until `done` (a `SELECT COUNT(*)` of final items) reaches `expected`.
pub(crate) async fn wait_final(store_url: &str, sql: &str, expected: i64, timeout: Duration) -> anyhow::Result<()> {
    let mut conn = sqlite_reader(store_url).await?;
    let start = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
        if done >= expected {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("only {done} of {expected} items final after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits one Baishan refresh for account 0 and returns (task id, accepted count).
async fn submit(client: &reqwest::Client, server: &Server, urls: &[String]) -> anyhow::Result<(i64, u64)> {
    let response = client
        .post(server.url("/v2/cache/refresh"))
        .header("token", token(0))
        .json(&json!({ "urls": urls }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.is_success() && body["code"] == 0, "refresh refused ({status}): {body}");
    Ok((body["data"]["task_id"].as_i64().context("task_id")?, body["data"]["count"].as_u64().context("count")?))
}

/// Scenario 1's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutFigures {
    /// URLs in the task.
    pub urls: u64,
    /// Varnish nodes.
    pub nodes: usize,
    /// Purges sent by cachectl (URLs × nodes).
    pub purges: u64,
    /// Items that failed (should be 0).
    pub failed: i64,
    /// Last item finished − task created, from the store, ms.
    pub cachectl_ms: i64,
    /// cachectl's purges per second.
    pub cachectl_rate: f64,
    /// How long the harness took to write the task's rows (from `created_at` until they were
    /// committed and cachectl could see them), ms: part of `cachectl_ms`, none of it cachectl's.
    pub insert_ms: i64,
    /// Purges per second from the moment the rows were committed to the last final item: the
    /// purging alone, as `wrk` is measured.
    pub purging_rate: f64,
    /// `purging_rate` ÷ `direct_pipelined`.
    pub ratio_purging_pipelined: Option<f64>,
    /// CPU seconds of the server from the task's insertion until its last item was final.
    pub cpu_cachectl_s: f64,
    /// CPU seconds of every Varnish child process (`cache-main`) meanwhile.
    pub cpu_varnish_s: f64,
    /// wrk (or the Rust client) sending PURGE straight to the nodes, one request at a time per
    /// connection, `per_node_concurrency` connections per node: the target's baseline.
    pub direct: LoadFigures,
    /// The pipelined baseline: the higher of `direct_pipelined_alike` and
    /// `direct_pipelined_reference`; `None` without wrk or with pipelining off.
    pub direct_pipelined: Option<LoadFigures>,
    /// wrk sending PURGE straight to the nodes pipelined as cachectl does (`pipeline_depth`
    /// deep on `ceil(per_node_concurrency / pipeline_depth)` connections per node).
    pub direct_pipelined_alike: Option<LoadFigures>,
    /// wrk pipelined in the reference shape, 4 connections per node 8 deep (the shape of the
    /// earlier default, 32 purges a node at depth 8), measured when cachectl's shape differs:
    /// a deeper pipeline on fewer connections must not lower the bar it is judged against.
    pub direct_pipelined_reference: Option<LoadFigures>,
    /// The same, each request also naming `purge_batch − 1` more paths in `X-Cachectl-Next`, as
    /// cachectl batches them (rates and counts in purges); `None` without wrk, pipelining or
    /// batching.
    pub direct_batched: Option<LoadFigures>,
    /// Purges the shell loop sent.
    pub shell_purges: u64,
    /// The shell loop's purges per second (`xargs -P 32 curl -X PURGE`).
    pub shell_rate: f64,
    /// cachectl ÷ direct.
    pub ratio_direct: f64,
    /// cachectl ÷ direct pipelined.
    pub ratio_direct_pipelined: Option<f64>,
    /// cachectl ÷ direct pipelined and batched.
    pub ratio_direct_batched: Option<f64>,
    /// cachectl ÷ shell loop.
    pub ratio_shell: f64,
}

/// The reference pipelined shape `wrk` is also measured in: connections per node, depth.
const REFERENCE_PIPELINE: (usize, usize) = (4, 8);

/// Scenario 1: one refresh task of `urls` URLs on every node.
///
/// # Errors
/// A component fails or the task does not finish within 10 minutes.
pub async fn fanout(
    server: &Server,
    nodes: &[Varnish],
    options: &crate::Options,
    scratch: &Path,
) -> anyhow::Result<FanoutFigures> {
    let urls = options.fanout_urls;
    let cpu = || (crate::fleet::cpu_seconds(Some(server.pid())), caches_cpu_seconds());
    let cpu_before = cpu();
    let created_at = now_ms();
    let task_id = insert_task(&server.store_url, urls, created_at).await?;
    let committed = now_ms();
    // The worker polls every 50 ms; a submission through the API wakes it at once, as every
    // real submission would.
    submit(&http()?, server, &["http://www.acct00.test/fanout-wake.css".to_owned()]).await?;
    let count = i64::try_from(urls)?;
    // The task's count of unfinished items, one row: counting the final items themselves every
    // 100 ms took this process a third of a core at 150,000 URLs, beside cachectl and Varnish.
    let sql = format!("SELECT {count} - pending FROM tasks WHERE id = {task_id}");
    wait_final(&server.store_url, &sql, count, Duration::from_secs(600)).await?;
    let cpu_after = cpu();
    let mut conn = sqlite_reader(&server.store_url).await?;
    let row = sqlx::query("SELECT MAX(finished_at), SUM(status = 'failed') FROM items WHERE task_id = ?")
        .bind(task_id)
        .fetch_one(&mut conn)
        .await?;
    let (last, failed): (i64, i64) = (row.get(0), row.get(1));
    let cachectl_ms = (last - created_at).max(1);
    let purges = urls * nodes.len() as u64;
    #[allow(clippy::cast_precision_loss)]
    let cachectl_rate = purges as f64 / (cachectl_ms as f64 / 1000.0);
    let insert_ms = committed - created_at;
    #[allow(clippy::cast_precision_loss)]
    let purging_rate = purges as f64 / ((last - committed).max(1) as f64 / 1000.0);

    let per_node = options.worker.per_node_concurrency;
    let direct = direct_purges(nodes, options.direct_seconds, per_node, 1, 1, options.use_wrk, scratch).await?;
    let depth = options.worker.pipeline_depth;
    let direct_pipelined_alike = if options.use_wrk && depth > 1 {
        Some(direct_purges(nodes, options.direct_seconds, per_node.div_ceil(depth), depth, 1, true, scratch).await?)
    } else {
        None
    };
    let (connections, reference_depth) = REFERENCE_PIPELINE;
    let direct_pipelined_reference =
        if options.use_wrk && depth > 1 && (per_node.div_ceil(depth), depth) != REFERENCE_PIPELINE {
            Some(direct_purges(nodes, options.direct_seconds, connections, reference_depth, 1, true, scratch).await?)
        } else {
            None
        };
    let direct_pipelined = [&direct_pipelined_alike, &direct_pipelined_reference]
        .into_iter()
        .flatten()
        .max_by(|a, b| a.rps.total_cmp(&b.rps))
        .cloned();
    let batch = options.worker.purge_batch;
    let direct_batched = if options.use_wrk && depth > 1 && batch > 1 {
        let connections = per_node.div_ceil(depth);
        Some(direct_purges(nodes, options.direct_seconds, connections, depth, batch, true, scratch).await?)
    } else {
        None
    };
    let (shell_purges, shell_rate) = shell_loop(nodes, options.shell_purges, scratch)?;
    Ok(FanoutFigures {
        cpu_cachectl_s: cpu_after.0 - cpu_before.0,
        cpu_varnish_s: cpu_after.1 - cpu_before.1,
        urls,
        nodes: nodes.len(),
        purges,
        failed,
        cachectl_ms,
        cachectl_rate,
        ratio_direct: cachectl_rate / direct.rps,
        ratio_direct_pipelined: direct_pipelined.as_ref().map(|d| cachectl_rate / d.rps),
        insert_ms,
        purging_rate,
        ratio_purging_pipelined: direct_pipelined.as_ref().map(|d| purging_rate / d.rps),
        direct_pipelined,
        direct_pipelined_alike,
        direct_pipelined_reference,
        ratio_direct_batched: direct_batched.as_ref().map(|d| cachectl_rate / d.rps),
        direct_batched,
        ratio_shell: cachectl_rate / shell_rate,
        direct,
        shell_purges,
        shell_rate,
    })
}

/// utime + stime of every `cache-main` process (Varnish's children), in seconds.
fn caches_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "cache-main"))
        .map(|pid| crate::fleet::cpu_seconds(Some(pid)))
        .sum()
}

/// Writes one refresh task of `urls` URLs of account 0 into the running server's SQLite store,
/// as `Store::create_task` would (task, items, hourly count, one transaction).
async fn insert_task(store_url: &str, urls: u64, created_at: Timestamp) -> anyhow::Result<i64> {
    let mut conn = sqlite_reader(store_url).await?;
    let mut tx = conn.begin().await?;
    let task_id: i64 = sqlx::query_scalar(
        "INSERT INTO tasks (account, kind, operator, dialect, created_at, pending, notified)
         VALUES ('acct00', 'refresh', 'bench', 'baishan', ?, ?, 0) RETURNING id",
    )
    .bind(created_at)
    .bind(i64::try_from(urls)?)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO item_counts (account, kind, hour, n) VALUES ('acct00', 'refresh', ?, ?)
         ON CONFLICT (account, kind, hour) DO UPDATE SET n = n + excluded.n",
    )
    .bind(created_at.div_euclid(3_600_000))
    .bind(i64::try_from(urls)?)
    .execute(&mut *tx)
    .await?;
    let ids: Vec<u64> = (0..urls).collect();
    for chunk in ids.chunks(500) {
        let mut insert: sqlx::QueryBuilder<'_, sqlx::Sqlite> = sqlx::QueryBuilder::new(
            "INSERT INTO items (task_id, account, kind, url, host, item_type, operator, created_at, not_before) ",
        );
        insert.push_values(chunk, |mut row, i| {
            row.push_bind(task_id)
                .push_bind("acct00")
                .push_bind("refresh")
                .push_bind(format!("http://www.acct00.test/fanout/{i}.css"))
                .push_bind("www.acct00.test")
                .push_bind("url")
                .push_bind("bench")
                .push_bind(created_at)
                .push_bind(created_at);
        });
        insert.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(task_id)
}

/// The physical limit: PURGE sent straight to every node at once, `per_node` connections each,
/// `depth` requests written at a time on each connection (wrk counts every answer), each request
/// naming `batch − 1` more paths in `X-Cachectl-Next` (the figures then count purges).
async fn direct_purges(
    nodes: &[Varnish],
    seconds: u64,
    per_node: usize,
    depth: usize,
    batch: usize,
    use_wrk: bool,
    scratch: &Path,
) -> anyhow::Result<LoadFigures> {
    if use_wrk {
        let script = scratch.join(format!("purge-{depth}-{batch}.lua"));
        // Each request's path, then the batch's others (none when batch is 1).
        std::fs::write(
            &script,
            format!(
                "local counter = 0\nrequest = function()\n  local batch = {{}}\n  for i = 1, {depth} do\n    \
                 local first = counter + 1\n    local more = {{}}\n    for j = 2, {batch} do\n      \
                 more[j - 1] = \"/direct/\" .. (counter + j) .. \".css\"\n    end\n    counter = counter + {batch}\n    \
                 local headers = {{ [\"Host\"] = \"www.acct00.test\" }}\n    \
                 if #more > 0 then headers[\"X-Cachectl-Next\"] = table.concat(more, \" \") end\n    \
                 batch[i] = wrk.format(\"PURGE\", \"/direct/\" .. first .. \".css\", headers)\n  end\n  \
                 return table.concat(batch)\nend\n"
            ),
        )?;
        let runs: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (url, script) = (format!("http://{}/", node.address()), script.clone());
                tokio::task::spawn_blocking(move || wrk(&url, per_node, 1, seconds, Some(&script)))
            })
            .collect();
        let mut all = Vec::new();
        for run in runs {
            all.push(run.await??);
        }
        // Per-node figures summed (rates) and worst-of (latencies).
        let mut sum = all[0].clone();
        for f in &all[1..] {
            sum.requests += f.requests;
            sum.rps += f.rps;
            sum.errors += f.errors;
            sum.p50_ms = sum.p50_ms.max(f.p50_ms);
            sum.p99_ms = sum.p99_ms.max(f.p99_ms);
        }
        sum.connections = per_node * nodes.len();
        #[allow(clippy::cast_precision_loss)]
        {
            sum.requests *= batch as u64;
            sum.rps *= batch as f64;
        }
        return Ok(sum);
    }
    let addresses: Arc<Vec<String>> = Arc::new(nodes.iter().map(Varnish::address).collect());
    let make: MakeRequest = Arc::new(move |client, n| {
        let address = &addresses[usize::try_from(n).unwrap_or(0) % addresses.len()];
        client
            .request(
                reqwest::Method::from_bytes(b"PURGE").expect("a method"),
                format!("http://{address}/direct/{n}.css"),
            )
            .header("host", "www.acct00.test")
    });
    rust_load(per_node * nodes.len(), Duration::from_secs(seconds), make).await
}

/// What an operator writes by hand: `xargs -P 32 curl -X PURGE`, over the nodes in turn.
fn shell_loop(nodes: &[Varnish], purges: u64, scratch: &Path) -> anyhow::Result<(u64, f64)> {
    let list = scratch.join("purge-urls.txt");
    let lines: Vec<String> = (0..purges)
        .map(|i| format!("http://{}/shell/{i}.css", nodes[usize::try_from(i).unwrap_or(0) % nodes.len()].address()))
        .collect();
    std::fs::write(&list, lines.join("\n") + "\n")?;
    let start = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xargs -P 32 -n 1 curl -s -o /dev/null -X PURGE -H 'Host: www.acct00.test' < '{}'",
            list.display()
        ))
        .status()
        .context("running the shell loop (xargs, curl)")?;
    ensure!(status.success(), "the shell loop failed: {status}");
    #[allow(clippy::cast_precision_loss)]
    Ok((purges, purges as f64 / start.elapsed().as_secs_f64()))
}

/// Scenario 2's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    /// Tasks submitted (one URL each).
    pub tasks: usize,
    /// Interval between two submissions, ms.
    pub interval_ms: u64,
    /// Items that failed.
    pub failed: i64,
    /// Median of finished_at − created_at, ms (timestamps have ms resolution).
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
}

/// Scenario 2: `tasks` single-URL refreshes, one every `interval`, submit → completed.
///
/// # Errors
/// A submission is refused or the tasks do not finish.
pub async fn latency(server: &Server, tasks: usize, interval: Duration) -> anyhow::Result<LatencyFigures> {
    let client = http()?;
    let start = Instant::now();
    let mut ids = Vec::with_capacity(tasks);
    for k in 0..tasks {
        let due = start + interval * u32::try_from(k)?;
        tokio::time::sleep_until(due.into()).await;
        ids.push(submit(&client, server, &[format!("http://www.acct00.test/latency/{k}.css")]).await?.0);
    }
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    let filter = format!("task_id BETWEEN {first} AND {last} AND url LIKE 'http://www.acct00.test/latency/%'");
    let sql = format!("SELECT COUNT(*) FROM items WHERE {filter} AND status IN ('completed', 'failed')");
    wait_final(&server.store_url, &sql, i64::try_from(tasks)?, Duration::from_secs(120)).await?;
    let mut conn = sqlite_reader(&server.store_url).await?;
    let rows = sqlx::query(&format!("SELECT finished_at - created_at, status FROM items WHERE {filter}"))
        .fetch_all(&mut conn)
        .await?;
    let mut samples: Vec<u64> = rows.iter().map(|r| u64::try_from(r.get::<i64, _>(0)).unwrap_or(0) * 1000).collect();
    let failed = rows.iter().filter(|r| r.get::<String, _>(1) == "failed").count();
    samples.sort_unstable();
    Ok(LatencyFigures {
        tasks,
        interval_ms: u64::try_from(interval.as_millis())?,
        failed: i64::try_from(failed)?,
        p50_ms: percentile_ms(&samples, 0.5),
        p99_ms: percentile_ms(&samples, 0.99),
        max_ms: percentile_ms(&samples, 1.0),
    })
}

/// Scenario 4's figures.
#[derive(Debug, Clone, Serialize)]
pub struct IngestFigures {
    /// Submissions posted.
    pub submissions: usize,
    /// URLs per submission.
    pub urls_per_submission: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// URLs acknowledged (and found in the store afterwards).
    pub accepted_urls: u64,
    /// Accepted URLs per second.
    pub urls_per_s: f64,
    /// Median submission latency, ms.
    pub p50_ms: f64,
    /// 99th percentile submission latency, ms.
    pub p99_ms: f64,
}

/// Scenario 4: `submissions` refreshes of `per` URLs from `clients` concurrent clients; every
/// acknowledged URL is then counted in the store.
///
/// # Errors
/// A submission is refused, or the store holds fewer items than acknowledged.
pub async fn ingest(server: &Server, submissions: usize, per: usize, clients: usize) -> anyhow::Result<IngestFigures> {
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..submissions)
            .map(|s| {
                let urls: Vec<String> =
                    (0..per).map(|i| format!("http://www.acct00.test/ingest/{s}/{i}.css")).collect();
                json!({ "urls": urls }).to_string()
            })
            .collect(),
    );
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(clients).build()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (client, next, bodies, url) =
            (client.clone(), next.clone(), bodies.clone(), server.url("/v2/cache/refresh"));
        workers.push(tokio::spawn(async move {
            let mut out: Vec<(i64, u64, u64)> = Vec::new();
            loop {
                let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(s) else { return Ok::<_, anyhow::Error>(out) };
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("token", token(0))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let json: Value = response.json().await?;
                ensure!(json["code"] == 0, "submission refused: {json}");
                out.push((
                    json["data"]["task_id"].as_i64().context("task_id")?,
                    json["data"]["count"].as_u64().context("count")?,
                    u64::try_from(sent.elapsed().as_micros())?,
                ));
            }
        }));
    }
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let accepted: u64 = results.iter().map(|r| r.1).sum();
    let mut conn = sqlite_reader(&server.store_url).await?;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE url LIKE 'http://www.acct00.test/ingest/%'")
        .fetch_one(&mut conn)
        .await?;
    ensure!(u64::try_from(stored)? == accepted, "{accepted} URLs acknowledged but {stored} in the store");
    let mut samples: Vec<u64> = results.iter().map(|r| r.2).collect();
    samples.sort_unstable();
    #[allow(clippy::cast_precision_loss)]
    Ok(IngestFigures {
        submissions,
        urls_per_submission: per,
        clients,
        accepted_urls: accepted,
        urls_per_s: accepted as f64 / elapsed,
        p50_ms: percentile_ms(&samples, 0.5),
        p99_ms: percentile_ms(&samples, 0.99),
    })
}

pub use crate::queries::{DatabaseAlone, QueryBackendFigures, QueryFigures, queries};
