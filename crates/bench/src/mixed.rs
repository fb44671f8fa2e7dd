//! The mixed-load scenario (`cachectl-bench --mixed`): for a long while (10 minutes unless
//! asked otherwise) clients submit refreshes at a fixed rate of URLs a second, which the worker
//! purges on real Varnish nodes, while other clients query at a fixed rate of queries a second.
//! It reports errors (of submissions, of queries, failed items, warnings and errors in the
//! server's log; the goal is none), the server's resident memory every few seconds (the goal:
//! flat after a warm-up) and the depth of the queue (items not yet final) at the end. It is a
//! reliability run, not a speed measurement: no figure of it is judged against a speed target,
//! and it is never part of the full benchmark unless asked for.
//!
//! Both loads are open-loop: a submission or a query goes out at its scheduled moment whatever
//! the server does, so that a server falling behind builds a queue (seen in the latencies and in
//! the queue depth) instead of slowing the clients down.

use crate::fixtures::{Origin, Server, Varnish, WorkerSettings, account_name, token};
use crate::load::{Target, connect, exchange, paced_slot, percentile_ms};
use crate::queries::baishan_day;
use crate::scenarios::{now_ms, sqlite_reader};
use anyhow::{Context, ensure};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod report;
use report::rss_figures;
pub use report::{MixedFigures, QueryKind, RssFigures, Sample, table};

/// Sizes and rates of a mixed-load run.
#[derive(Debug, Clone, Serialize)]
pub struct MixedOptions {
    /// The executable that runs `serve --config FILE` (this binary).
    pub server_exe: PathBuf,
    /// Varnish nodes.
    pub nodes: usize,
    /// Accounts the submissions and queries rotate over.
    pub accounts: usize,
    /// Length of the load.
    pub seconds: u64,
    /// URLs submitted a second (in refreshes of `urls_per_submission`).
    pub submit_rate: f64,
    /// URLs per submission.
    pub urls_per_submission: usize,
    /// Queries offered a second.
    pub query_rate: f64,
    /// Connections of the query client.
    pub query_connections: usize,
    /// Seconds between two samples of RSS and queue depth.
    pub sample_seconds: u64,
    /// Seconds after the start from which RSS is expected to stay flat.
    pub warmup_seconds: u64,
    /// Longest wait, after the load, for the queue to drain.
    pub drain_seconds: u64,
    /// Worker settings of the server.
    pub worker: WorkerSettings,
}

impl MixedOptions {
    /// The full run: 10 minutes, 1,000 URLs a second, 5,000 queries a second, on `nodes` nodes.
    #[must_use]
    pub fn full(server_exe: PathBuf, nodes: usize, accounts: usize, worker: WorkerSettings) -> Self {
        Self {
            server_exe,
            nodes,
            accounts,
            seconds: 600,
            submit_rate: 1000.0,
            urls_per_submission: 100,
            query_rate: 5000.0,
            query_connections: 64,
            sample_seconds: 10,
            warmup_seconds: 60,
            drain_seconds: 120,
            worker,
        }
    }
}

/// A task submitted during the run, which the queries ask about.
#[derive(Debug, Clone)]
struct Recent {
    task_id: i64,
    account: usize,
    url: String,
}

/// Tasks of the last moments, newest last.
type Recents = Arc<Mutex<VecDeque<Recent>>>;
const RECENT: usize = 256;

/// Counters both loads update as they go, read by the sampler.
#[derive(Debug, Default)]
struct Live {
    submitted_urls: AtomicU64,
    queries: AtomicU64,
    errors: AtomicU64,
}

/// The query mix: (name, share in twentieths).
const MIX: [(&str, u32); 4] = [
    ("baishan: a recent task by id", 10),
    ("baishan: one recent URL, today", 4),
    ("baishan: today's window, page 1", 3),
    ("native: a recent task's items (limit 50)", 3),
];

/// Runs the mixed load and returns its figures.
///
/// Longer than the house limit on purpose: a linear script of steps that each use the previous
/// one's results, read top to bottom like the scenario's description in BENCHMARKS.md.
///
/// # Errors
/// A component does not start, the seed submissions are refused, or a load cannot run. Errors
/// during the load are counted, not returned.
pub async fn run(options: MixedOptions, progress: impl Fn(&str)) -> anyhow::Result<MixedFigures> {
    ensure!(options.submit_rate > 0.0 && options.query_rate > 0.0, "the rates must be above 0");
    ensure!(options.accounts > 0 && options.nodes > 0 && options.urls_per_submission > 0, "nothing to run on");
    let scratch = tempfile::tempdir()?;
    let origin = Origin::start().await?;
    progress(&format!("mixed load: starting {} Varnish nodes", options.nodes));
    let nodes: Vec<Varnish> =
        futures::future::try_join_all((0..options.nodes).map(|_| Varnish::start(origin.port))).await?;
    let edges: Vec<String> = nodes.iter().map(Varnish::address).collect();
    let store_url = format!("sqlite://{}", scratch.path().join("mixed.db").display());
    let server = Server::start(&options.server_exe, &store_url, options.accounts, &edges, options.worker).await?;

    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).build()?;
    let recents: Recents = Arc::default();
    let live = Arc::new(Live::default());
    // A few tasks before the clock starts, so that the first queries have something to ask about.
    for account in 0..options.accounts.min(4) {
        let urls = refresh_urls(account, account, options.urls_per_submission, "seed");
        let (task_id, count) =
            submit_to(&http, &server.url("/v2/cache/refresh"), account, &urls).await.context("a seed submission")?;
        live.submitted_urls.fetch_add(count, Ordering::Relaxed);
        recents.lock().expect("not poisoned").push_back(Recent { task_id, account, url: urls[0].clone() });
    }

    let duration = Duration::from_secs(options.seconds);
    progress(&format!(
        "mixed load: {:.0} URLs/s submitted ({} per refresh) and {:.0} queries/s for {} s on {} nodes",
        options.submit_rate, options.urls_per_submission, options.query_rate, options.seconds, options.nodes
    ));
    let load_before = load_average();
    let start = Instant::now();
    let submitter =
        tokio::spawn(submit_load(http.clone(), server.url(""), options.clone(), recents.clone(), live.clone()));
    let querier = {
        let (options, recents, live, port) = (options.clone(), recents.clone(), live.clone(), server.port);
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(query_load(port, &options, recents, live))
        })
    };
    let mut samples = Vec::new();
    let interval = Duration::from_secs(options.sample_seconds.max(1));
    let mut next = interval;
    let mut db = sqlite_reader(&store_url).await?;
    while next < duration {
        tokio::time::sleep_until((start + next).into()).await;
        let sample = sample(&http, &server, &mut db, &live, start).await?;
        progress(&format!(
            "  {:>5.0} s: RSS {:.1} MiB, queue {}, {} URLs submitted, {} completed, {} failed, {} queries, {} errors",
            sample.t_s,
            sample.rss_mib,
            sample.queue_depth,
            sample.submitted_urls,
            sample.completed_items,
            sample.failed_items,
            sample.queries,
            sample.errors
        ));
        samples.push(sample);
        next += interval;
    }
    // The end of the load: the last submission answered. A query client that fell behind still
    // sends what it owes; a sample is taken again when it is done.
    let submitted = submitter.await??;
    let last = sample(&http, &server, &mut db, &live, start).await?;
    let load_after = load_average();
    let queue_depth_at_end = last.queue_depth;
    progress(&format!(
        "mixed load ended after {:.0} s: RSS {:.1} MiB, queue depth {queue_depth_at_end}",
        last.t_s, last.rss_mib
    ));
    let ended = last.t_s;
    samples.push(last);
    let (queries, answered_in) = querier.await??;
    if start.elapsed().as_secs_f64() > ended + 1.0 {
        let caught_up = sample(&http, &server, &mut db, &live, start).await?;
        progress(&format!("queries caught up after {:.0} s: RSS {:.1} MiB", caught_up.t_s, caught_up.rss_mib));
        samples.push(caught_up);
    }

    let drain_start = Instant::now();
    let drained_after_s = loop {
        let depth = queue_depth(&mut db).await?;
        if depth == 0 {
            break Some(drain_start.elapsed().as_secs_f64());
        }
        if drain_start.elapsed() > Duration::from_secs(options.drain_seconds) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Then idle for one sample interval: what the server keeps once the load has gone.
    tokio::time::sleep(interval).await;
    let rss_idle_mib = rss_mib(server.pid());
    let (items_completed, items_failed, failure_reasons) = outcome(&mut db).await?;
    let metrics = metrics(&http, &server).await.unwrap_or_default();
    let node_retries = sum_metric(&metrics, "cachectl_node_requests_total", "outcome=\"retry\"");
    let log = server.log();
    let problems = log_problems(&log);
    let peak_mib = server.peak_rss_mib();
    drop(server);
    drop(nodes);

    let mut rss = rss_figures(&samples, options.warmup_seconds, peak_mib);
    rss.idle_after_drain_mib = rss_idle_mib;
    let query_errors: u64 = queries.iter().map(|q| q.errors).sum();
    let answered: u64 = queries.iter().map(|q| q.requests).sum();
    let errors = submitted.errors + query_errors + u64::try_from(items_failed)? + problems.len() as u64;
    #[allow(clippy::cast_precision_loss)]
    Ok(MixedFigures {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        submissions: submitted.submissions,
        submitted_urls: live.submitted_urls.load(Ordering::Relaxed),
        submit_errors: submitted.errors,
        submit_p50_ms: submitted.p50_ms,
        submit_p99_ms: submitted.p99_ms,
        submitted_urls_per_s: submitted.urls as f64 / submitted.seconds,
        queries,
        queries_per_s: answered as f64 / answered_in,
        query_errors,
        items_completed,
        items_failed,
        failure_reasons,
        node_retries,
        server_log_problems: problems.len() as u64,
        server_log_sample: problems.into_iter().take(5).collect(),
        errors,
        queue_depth_at_end,
        queue_depth_max: samples.iter().map(|s| s.queue_depth).max().unwrap_or(0),
        drained_after_s,
        rss,
        samples,
        load_average: (load_before, load_after),
        options,
    })
}

/// The URLs of submission `s`, on a host of `account`.
fn refresh_urls(account: usize, s: usize, per: usize, prefix: &str) -> Vec<String> {
    let name = account_name(account);
    (0..per).map(|i| format!("http://www.{name}.test/mixed/{prefix}/{s}/{i}.css")).collect()
}

/// One Baishan refresh of `urls` for `account` (`url`: the dialect's endpoint): (task id, URLs
/// accepted).
async fn submit_to(http: &reqwest::Client, url: &str, account: usize, urls: &[String]) -> anyhow::Result<(i64, u64)> {
    let response = http.post(url).header("token", token(account)).json(&json!({ "urls": urls })).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.is_success() && body["code"] == 0, "refresh refused ({status}): {body}");
    Ok((body["data"]["task_id"].as_i64().context("task_id")?, body["data"]["count"].as_u64().context("count")?))
}

/// What the submitting clients did.
#[derive(Debug)]
struct Submitted {
    submissions: u64,
    urls: u64,
    errors: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Submission `k` goes out at `k × urls_per_submission ÷ submit_rate` seconds, each on a task of
/// its own, whatever became of the ones before.
async fn submit_load(
    http: reqwest::Client,
    base: String,
    options: MixedOptions,
    recents: Recents,
    live: Arc<Live>,
) -> anyhow::Result<Submitted> {
    #[allow(clippy::cast_precision_loss)]
    let every = Duration::from_secs_f64(options.urls_per_submission as f64 / options.submit_rate);
    let duration = Duration::from_secs(options.seconds);
    let url = format!("{base}/v2/cache/refresh");
    let start = tokio::time::Instant::now();
    let mut running = Vec::new();
    for k in 0_u32.. {
        let at = every * k;
        if at >= duration {
            break;
        }
        tokio::time::sleep_until(start + at).await;
        let (http, url, recents, live) = (http.clone(), url.clone(), recents.clone(), live.clone());
        let account = usize::try_from(k)? % options.accounts;
        let urls = refresh_urls(account, usize::try_from(k)?, options.urls_per_submission, "load");
        let scheduled = start + at;
        running.push(tokio::spawn(async move {
            let result = submit_to(&http, &url, account, &urls).await;
            let latency = u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
            match result {
                Ok((task_id, count)) => {
                    live.submitted_urls.fetch_add(count, Ordering::Relaxed);
                    let mut recents = recents.lock().expect("not poisoned");
                    recents.push_back(Recent { task_id, account, url: urls[0].clone() });
                    if recents.len() > RECENT {
                        recents.pop_front();
                    }
                    (latency, count, false)
                }
                Err(e) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("submission {k} failed: {e:#}");
                    (latency, 0, true)
                }
            }
        }));
    }
    let mut samples = Vec::with_capacity(running.len());
    let (mut urls, mut errors) = (0, 0);
    for task in running {
        let (latency, count, failed) = task.await?;
        samples.push(latency);
        urls += count;
        errors += u64::from(failed);
    }
    let seconds = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    Ok(Submitted {
        submissions: samples.len() as u64,
        urls,
        errors,
        seconds,
        p50_ms: percentile_ms(&samples, 0.5),
        p99_ms: percentile_ms(&samples, 0.99),
    })
}

/// The `n`-th query of the mix, about one of the recent tasks: its kind and its request.
fn query(n: usize, recents: &Recents, port: u16) -> anyhow::Result<(usize, Target)> {
    let recent = {
        let recents = recents.lock().expect("not poisoned");
        // Newest first, walking back over the last tasks as clients polling them would.
        let back = (n / 20) % recents.len().max(1);
        recents.get(recents.len().saturating_sub(1 + back)).cloned().context("no task submitted yet")?
    };
    let slot = u32::try_from(n % 20)?;
    let mut edge = 0;
    let mut kind = 0;
    for (k, (_, share)) in MIX.iter().enumerate() {
        edge += share;
        if slot < edge {
            kind = k;
            break;
        }
    }
    let tok = token(recent.account);
    let day = baishan_day(now_ms());
    let path = match kind {
        0 => format!("/v2/cache/refresh?token={tok}&task_id={}", recent.task_id),
        1 => {
            let url: String = url::form_urlencoded::byte_serialize(recent.url.as_bytes()).collect();
            format!("/v2/cache/refresh?token={tok}&start_time={day}&end_time={day}&url={url}")
        }
        2 => format!("/v2/cache/refresh?token={tok}&start_time={day}&end_time={day}&page_number=1"),
        _ => format!("/api/v1/items?task_id={}&limit=50", recent.task_id),
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, http::HeaderValue::from_str(&format!("127.0.0.1:{port}"))?);
    if kind == 3 {
        headers.insert(http::header::AUTHORIZATION, http::HeaderValue::from_str(&format!("Bearer {tok}"))?);
    }
    Ok((kind, Target { path: path.parse()?, headers }))
}

/// The query client: `query_rate` queries a second over `query_connections` connections,
/// connection `c` sending its `i`-th query at `(c + i × connections) ÷ rate` seconds, each timed
/// from that moment (as `crate::load::paced_load` does). Runs on a thread of its own.
async fn query_load(
    port: u16,
    options: &MixedOptions,
    recents: Recents,
    live: Arc<Live>,
) -> anyhow::Result<(Vec<QueryKind>, f64)> {
    let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let (connections, rate) = (options.query_connections.max(1), options.query_rate);
    let duration = Duration::from_secs(options.seconds);
    let warm = (0..connections).map(|c| {
        let recents = recents.clone();
        async move {
            let mut sender = connect(address).await?;
            exchange(&mut sender, &query(c, &recents, port)?.1).await?;
            anyhow::Ok(sender)
        }
    });
    let senders = futures::future::try_join_all(warm).await?;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::new();
    for (c, mut sender) in senders.into_iter().enumerate() {
        let (recents, live) = (recents.clone(), live.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<Vec<u64>> = vec![Vec::new(); MIX.len()];
            let mut errors = vec![0_u64; MIX.len()];
            for i in 0.. {
                let index = c + i * connections;
                let Some(from) = paced_slot(start, index, rate, duration).await else { break };
                let Ok((kind, target)) = query(index, &recents, port) else { break };
                let ok = match exchange(&mut sender, &target).await {
                    Ok(ok) => ok,
                    Err(_) => {
                        if let Ok(fresh) = connect(address).await {
                            sender = fresh;
                        }
                        false
                    }
                };
                if !ok {
                    errors[kind] += 1;
                    live.errors.fetch_add(1, Ordering::Relaxed);
                }
                live.queries.fetch_add(1, Ordering::Relaxed);
                samples[kind].push(u64::try_from(from.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            (samples, errors)
        }));
    }
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); MIX.len()];
    let mut errors = vec![0_u64; MIX.len()];
    for task in tasks {
        let (s, e) = task.await?;
        for k in 0..MIX.len() {
            samples[k].extend(&s[k]);
            errors[k] += e[k];
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let kinds = MIX
        .iter()
        .zip(samples.iter_mut().zip(errors))
        .map(|((name, share), (samples, errors))| {
            samples.sort_unstable();
            QueryKind {
                name: (*name).to_owned(),
                share_pct: share * 5,
                requests: samples.len() as u64,
                errors,
                p50_ms: percentile_ms(samples, 0.5),
                p99_ms: percentile_ms(samples, 0.99),
            }
        })
        .collect();
    Ok((kinds, elapsed))
}

/// Items waiting or processing (the store's `items_runnable` index).
async fn queue_depth(db: &mut sqlx::SqliteConnection) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE status IN ('waiting', 'processing')")
        .fetch_one(&mut *db)
        .await?)
}

/// Completed and failed items, and the most frequent reasons of the failed ones.
async fn outcome(db: &mut sqlx::SqliteConnection) -> anyhow::Result<(i64, i64, Vec<(String, i64)>)> {
    let completed: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE status = 'completed'").fetch_one(&mut *db).await?;
    let failed: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE status = 'failed'").fetch_one(&mut *db).await?;
    let reasons: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE(reason, ''), COUNT(*) FROM items WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
    )
    .fetch_all(&mut *db)
    .await?;
    Ok((completed, failed, reasons))
}

async fn metrics(http: &reqwest::Client, server: &Server) -> anyhow::Result<String> {
    Ok(http.get(server.url("/metrics")).send().await?.text().await?)
}

/// The sum of the samples of `name` whose labels contain `label`.
fn sum_metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let v = v as u64;
            v
        })
        .sum()
}

/// The lines of the server's log at WARN or ERROR. The log is coloured (ANSI escapes around the
/// level), so the level is looked for as a word anywhere in the line.
fn log_problems(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).map(str::to_owned).collect()
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes).
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// `VmRSS` of a process in MiB (0 when unreadable).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn sample(
    http: &reqwest::Client,
    server: &Server,
    db: &mut sqlx::SqliteConnection,
    live: &Live,
    start: Instant,
) -> anyhow::Result<Sample> {
    let metrics = metrics(http, server).await.unwrap_or_default();
    Ok(Sample {
        t_s: start.elapsed().as_secs_f64(),
        rss_mib: rss_mib(server.pid()),
        queue_depth: queue_depth(db).await?,
        submitted_urls: live.submitted_urls.load(Ordering::Relaxed),
        completed_items: sum_metric(&metrics, "cachectl_items_finished_total", "status=\"completed\""),
        failed_items: sum_metric(&metrics, "cachectl_items_finished_total", "status=\"failed\""),
        queries: live.queries.load(Ordering::Relaxed),
        errors: live.errors.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests;
