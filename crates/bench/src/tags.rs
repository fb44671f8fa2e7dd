//! The tag-purge scenario of issue #19 (`--tags`): Varnish nodes holding many objects tagged
//! by the origin's `Surrogate-Key`, tags purged through cachectl's native API, and as many
//! other tags purged by sending the same xkey `PURGE` straight to the nodes, in the same run.
//!
//! Shape: object `i` (0 ≤ i < `objects`) is `http://www.acct00.test/tagged/t<i mod tags>/<i>`,
//! tagged `t<i mod tags>` alone, so each tag covers `objects ÷ tags` objects on every node;
//! `untagged` more objects (`/plain/<i>`) carry no tag. Tags `t0`..`t<K-1>` are purged through
//! cachectl, `t<K>`..`t<2K-1>` directly; the remaining tags and the untagged objects must stay
//! cached. None of it asserts a speed.

use crate::fixtures::{Origin, Server, Varnish, WorkerSettings, token};
use crate::load::{Body, connect};
use crate::scenarios::{sqlite_reader, wait_final};
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The host every object of the scenario is cached under (owned by account 0).
const HOST: &str = "www.acct00.test";
/// Tags of one native submission at most (the API's limit).
const TAGS_PER_REQUEST: u64 = 256;

/// Sizes of a tag run.
#[derive(Debug, Clone, Serialize)]
pub struct TagOptions {
    /// The executable that runs `serve --config FILE` (this binary).
    pub server_exe: PathBuf,
    /// Varnish nodes.
    pub nodes: usize,
    /// Tagged objects cached on every node.
    pub objects: u64,
    /// Distinct tags; object `i` carries tag `i mod tags`.
    pub tags: u64,
    /// Tags purged through cachectl, and as many others purged directly (`2 × purged < tags`).
    pub purged: u64,
    /// Objects without a tag cached on every node (they must survive).
    pub untagged: u64,
    /// Connections per node that warm the caches.
    pub warm_connections: usize,
    /// Varnish's `-s` storage (a million objects need about a gigabyte a node).
    pub storage: String,
    /// Objects of each class checked with a GET on every node afterwards.
    pub sample: u64,
    /// Worker settings of the server (`per_node_concurrency` is also the direct client's
    /// connections per node).
    pub worker: WorkerSettings,
}

impl TagOptions {
    /// The full scenario: 1,000,000 objects in 1,000 tags of 1,000 objects, 4 nodes, 250 tags
    /// purged each way.
    #[must_use]
    pub fn full(server_exe: PathBuf, worker: WorkerSettings) -> Self {
        Self {
            server_exe,
            nodes: 4,
            objects: 1_000_000,
            tags: 1_000,
            purged: 250,
            untagged: 1_000,
            warm_connections: 8,
            storage: "malloc,3g".to_owned(),
            sample: 100,
            worker,
        }
    }
}

/// One way of purging `purged` tags on every node.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeSide {
    /// Tags purged.
    pub tags: u64,
    /// `PURGE` requests (tags × nodes).
    pub requests: u64,
    /// From the first tag task's `created_at` (cachectl) or the first request (direct) to the
    /// last tag purged on every node, ms.
    pub ms: f64,
    /// Tags purged on every node per second.
    pub tags_per_s: f64,
    /// Items failed (cachectl) or answers other than 200 (direct).
    pub failed: u64,
    /// Objects Varnish reported purged (`Purged <n>`, summed over nodes; direct only, cachectl
    /// does not keep the edge's count).
    pub reported_evicted: Option<u64>,
    /// `MAIN.n_object` before minus after, summed over nodes (`None` without varnishstat).
    pub objects_dropped: Option<u64>,
    /// Objects the purged tags cover on all nodes.
    pub expected_evicted: u64,
}

/// GETs after both purges: `(sampled, as expected)` per class, over every node.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Objects of tags purged through cachectl: expected MISS.
    pub cachectl_tags_missed: (u64, u64),
    /// Objects of tags purged directly: expected MISS.
    pub direct_tags_missed: (u64, u64),
    /// Objects of tags not purged: expected HIT.
    pub other_tags_hit: (u64, u64),
    /// Objects without a tag: expected HIT.
    pub untagged_hit: (u64, u64),
}

impl Verification {
    /// Every sampled object answered as expected.
    #[must_use]
    pub fn all_as_expected(&self) -> bool {
        [self.cachectl_tags_missed, self.direct_tags_missed, self.other_tags_hit, self.untagged_hit]
            .iter()
            .all(|(n, ok)| n == ok && *n > 0)
    }
}

/// What a tag run measured.
#[derive(Debug, Clone, Serialize)]
pub struct TagFigures {
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// What it ran with.
    pub options: TagOptions,
    /// Objects each tag covers on a node.
    pub objects_per_tag: u64,
    /// Seconds to cache every object on every node.
    pub warm_seconds: f64,
    /// GETs a second while warming (all nodes).
    pub warm_rate: f64,
    /// `MAIN.n_object` of each node after warming.
    pub cached_after_warm: Vec<Option<u64>>,
    /// Tags purged through cachectl's native API.
    pub cachectl: PurgeSide,
    /// The same xkey purges sent straight to the nodes by the harness's client.
    pub direct: PurgeSide,
    /// cachectl ÷ direct (tags per second).
    pub ratio: f64,
    /// The GETs afterwards.
    pub verification: Verification,
    /// The server's peak RSS, MiB.
    pub peak_rss_mib: f64,
}

fn tag(j: u64) -> String {
    format!("t{j}")
}

fn tagged_path(i: u64, tags: u64) -> String {
    format!("/tagged/t{}/{i}", i % tags)
}

/// Runs the scenario.
///
/// # Errors
/// A component does not start, warming or a purge fails, or the options are inconsistent.
pub async fn run(options: TagOptions, progress: impl Fn(&str)) -> anyhow::Result<TagFigures> {
    ensure!(options.tags > 0 && options.objects >= options.tags, "every tag needs an object: objects ≥ tags > 0");
    ensure!(options.purged > 0 && 2 * options.purged < options.tags, "0 < 2 × purged tags < tags");
    ensure!(options.untagged > 0 && options.sample > 0, "untagged objects and the sample must be above 0");
    let scratch = tempfile::tempdir()?;
    let origin = Origin::start().await?;
    progress(&format!("starting {} Varnish nodes ({})", options.nodes, options.storage));
    let nodes: Vec<Varnish> = futures::future::try_join_all(
        (0..options.nodes).map(|_| Varnish::start_with_storage(origin.port, &options.storage)),
    )
    .await?;
    let edges: Vec<String> = nodes.iter().map(Varnish::address).collect();
    let store_url = format!("sqlite://{}", scratch.path().join("tags.db").display());
    let server = Server::start(&options.server_exe, &store_url, 1, &edges, options.worker).await?;

    let total = options.objects + options.untagged;
    progress(&format!("warming {total} objects into each of {} nodes", options.nodes));
    let started = Instant::now();
    warm(&nodes, &options, &progress).await.context("warming the caches")?;
    let warm_seconds = started.elapsed().as_secs_f64();
    let cached_after_warm: Vec<Option<u64>> = nodes.iter().map(Varnish::objects).collect();
    #[allow(clippy::cast_precision_loss)]
    let warm_rate = (total * nodes.len() as u64) as f64 / warm_seconds;
    progress(&format!("  warmed in {warm_seconds:.1} s ({warm_rate:.0} GETs/s); n_object {cached_after_warm:?}"));

    let per_tag = options.objects / options.tags;
    let expected = |first: u64| -> u64 {
        (first..first + options.purged).map(|j| objects_of(j, &options)).sum::<u64>() * nodes.len() as u64
    };
    progress(&format!("purging {} tags through cachectl", options.purged));
    let before = total_objects(&nodes);
    let mut cachectl =
        through_cachectl(&server, &nodes, options.purged).await.context("tag purges through cachectl")?;
    cachectl.expected_evicted = expected(0);
    cachectl.objects_dropped = dropped(before, &nodes, cachectl.expected_evicted).await;
    progress(&format!("purging {} other tags directly", options.purged));
    let before = total_objects(&nodes);
    let mut direct = directly(&nodes, options.purged, options.worker.per_node_concurrency).await?;
    direct.expected_evicted = expected(options.purged);
    direct.objects_dropped = dropped(before, &nodes, direct.expected_evicted).await;
    progress("checking a sample of objects on every node");
    let verification = verify(&nodes, &options).await?;
    Ok(TagFigures {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        objects_per_tag: per_tag,
        warm_seconds,
        warm_rate,
        cached_after_warm,
        ratio: cachectl.tags_per_s / direct.tags_per_s,
        cachectl,
        direct,
        verification,
        peak_rss_mib: server.peak_rss_mib(),
        options,
    })
}

/// Objects carrying tag `j`.
fn objects_of(j: u64, options: &TagOptions) -> u64 {
    options.objects / options.tags + u64::from(j < options.objects % options.tags)
}

fn total_objects(nodes: &[Varnish]) -> Option<u64> {
    nodes.iter().map(Varnish::objects).sum()
}

/// Objects gone since `before`, read until `expected` are gone or for 20 seconds: Varnish
/// frees purged objects after the purge has answered (at a million objects a node,
/// `n_object` had not moved 500 ms after 250 purges of 1,000 objects).
async fn dropped(before: Option<u64>, nodes: &[Varnish], expected: u64) -> Option<u64> {
    let start = Instant::now();
    loop {
        let gone = before?.saturating_sub(total_objects(nodes)?);
        if gone >= expected || start.elapsed() > Duration::from_secs(20) {
            return Some(gone);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// GETs every object on every node, `warm_connections` connections per node, each a miss
/// that Varnish fetches from the origin and caches.
async fn warm(nodes: &[Varnish], options: &TagOptions, progress: &impl Fn(&str)) -> anyhow::Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for node in nodes {
        let next = Arc::new(AtomicU64::new(0));
        let address: std::net::SocketAddr = node.address().parse()?;
        for _ in 0..options.warm_connections {
            let (next, done) = (next.clone(), done.clone());
            let (objects, tags, total) = (options.objects, options.tags, options.objects + options.untagged);
            tasks.spawn(async move {
                let mut sender = connect(address).await?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let path = if i < objects { tagged_path(i, tags) } else { format!("/plain/{}", i - objects) };
                    let (status, _) = send(&mut sender, "GET", &path, None).await?;
                    ensure!(status == 200, "GET {path} on {address}: {status}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(15));
    ticker.tick().await;
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => return Ok(()),
                Some(result) => result??,
            },
            _ = ticker.tick() => progress(&format!("  {} GETs so far", done.load(Ordering::Relaxed))),
        }
    }
}

/// Sends one request for `HOST` (with `X-Cachectl-Tag: tag` when given) and reads the whole
/// answer: its status and reason phrase.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    method: &str,
    path: &str,
    tag: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    let mut builder = http::Request::builder().method(method).uri(path).header("host", HOST);
    if let Some(tag) = tag {
        builder = builder.header("x-cachectl-tag", tag);
    }
    let request = builder.body(Body::new())?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_default();
    response.into_body().collect().await?;
    Ok((status, reason))
}

/// Submits tags `t0`..`t<purged-1>` through the native API (256 a request), waits until every
/// tag item is final and times it from the first task's `created_at` to the last `finished_at`.
async fn through_cachectl(server: &Server, nodes: &[Varnish], purged: u64) -> anyhow::Result<PurgeSide> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut ids = Vec::new();
    for first in (0..purged).step_by(usize::try_from(TAGS_PER_REQUEST)?) {
        let tags: Vec<String> = (first..purged.min(first + TAGS_PER_REQUEST)).map(tag).collect();
        let response = http
            .post(server.url("/api/v1/tasks"))
            .bearer_auth(token(0))
            .json(&json!({ "type": "tag", "host": HOST, "tags": tags }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        ensure!(status.as_u16() == 201, "tag purge refused ({status}): {body}");
        ids.push(body["task"]["id"].as_i64().context("task id")?);
    }
    let list = ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let sql = format!("SELECT COUNT(*) FROM items WHERE task_id IN ({list}) AND status IN ('completed', 'failed')");
    wait_final(&server.store_url, &sql, i64::try_from(purged)?, Duration::from_secs(600)).await?;
    let mut conn = sqlite_reader(&server.store_url).await?;
    let (first, last, failed, kind): (i64, i64, i64, String) = sqlx::query_as(&format!(
        "SELECT (SELECT MIN(created_at) FROM tasks WHERE id IN ({list})), MAX(finished_at),
                SUM(status = 'failed'), MIN(item_type) FROM items WHERE task_id IN ({list})"
    ))
    .fetch_one(&mut conn)
    .await?;
    ensure!(kind == "tag", "the items are of type {kind}, not tag");
    #[allow(clippy::cast_precision_loss)]
    let ms = (last - first).max(1) as f64;
    #[allow(clippy::cast_precision_loss)]
    Ok(PurgeSide {
        tags: purged,
        requests: purged * nodes.len() as u64,
        ms,
        tags_per_s: purged as f64 / (ms / 1000.0),
        failed: u64::try_from(failed)?,
        reported_evicted: None,
        objects_dropped: None,
        expected_evicted: 0,
    })
}

/// Sends `PURGE /` with `X-Cachectl-Tag: t<j>` for `j` in `purged..2 × purged` to every node
/// at once, `per_node` connections a node, one request at a time on each (cachectl's own
/// request, as the VCL reads it).
async fn directly(nodes: &[Varnish], purged: u64, per_node: usize) -> anyhow::Result<PurgeSide> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut senders = Vec::new();
    for node in nodes {
        let address: std::net::SocketAddr = node.address().parse()?;
        for _ in 0..per_node {
            senders.push((address, connect(address).await?));
        }
    }
    let nexts: Vec<Arc<AtomicU64>> = nodes.iter().map(|_| Arc::new(AtomicU64::new(purged))).collect();
    let start = Instant::now();
    for (k, (address, mut sender)) in senders.into_iter().enumerate() {
        let next = nexts[k / per_node].clone();
        tasks.spawn(async move {
            let (mut failed, mut evicted) = (0_u64, 0_u64);
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= 2 * purged {
                    return Ok::<_, anyhow::Error>((failed, evicted));
                }
                let (status, reason) = send(&mut sender, "PURGE", "/", Some(&tag(j))).await?;
                match reason.strip_prefix("Purged ").and_then(|n| n.trim().parse::<u64>().ok()) {
                    Some(n) if status == 200 => evicted += n,
                    _ => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("direct tag PURGE t{j} on {address}: {status} {reason}");
                        }
                    }
                }
            }
        });
    }
    let (mut failed, mut evicted) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (f, e) = result??;
        (failed, evicted) = (failed + f, evicted + e);
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    #[allow(clippy::cast_precision_loss)]
    Ok(PurgeSide {
        tags: purged,
        requests: purged * nodes.len() as u64,
        ms,
        tags_per_s: purged as f64 / (ms / 1000.0),
        failed,
        reported_evicted: Some(evicted),
        objects_dropped: None,
        expected_evicted: 0,
    })
}

/// `X-Cache` of a GET of `path` on `node`.
async fn cache_status(client: &reqwest::Client, node: &Varnish, path: &str) -> anyhow::Result<String> {
    let response = client.get(format!("http://{}{path}", node.address())).header("host", HOST).send().await?;
    if !response.status().is_success() {
        bail!("GET {path} on {}: {}", node.address(), response.status());
    }
    let verdict = response.headers().get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    response.bytes().await?;
    Ok(verdict)
}

/// GETs `sample` objects of each class on every node and counts the expected verdicts.
async fn verify(nodes: &[Varnish], options: &TagOptions) -> anyhow::Result<Verification> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let (k, t) = (options.purged, options.tags);
    // The `s`-th sampled object among the tags `first..first + count`: its tag in turn, and
    // an object of that tag spread over the whole range.
    let pick = |first: u64, count: u64, s: u64| -> String {
        let j = first + s % count;
        let m = (s * 7_919) % objects_of(j, options);
        tagged_path(j + m * t, t)
    };
    let classes: [(Vec<String>, &str); 4] = [
        ((0..options.sample).map(|s| pick(0, k, s)).collect(), "MISS"),
        ((0..options.sample).map(|s| pick(k, k, s)).collect(), "MISS"),
        ((0..options.sample).map(|s| pick(2 * k, t - 2 * k, s)).collect(), "HIT"),
        ((0..options.sample).map(|s| format!("/plain/{}", (s * 7_919) % options.untagged)).collect(), "HIT"),
    ];
    let mut counts = [(0, 0); 4];
    for node in nodes {
        for (c, (paths, expected)) in classes.iter().enumerate() {
            for path in paths {
                let verdict = cache_status(&client, node, path).await?;
                counts[c].0 += 1;
                counts[c].1 += u64::from(verdict == *expected);
            }
        }
    }
    Ok(Verification {
        cachectl_tags_missed: counts[0],
        direct_tags_missed: counts[1],
        other_tags_hit: counts[2],
        untagged_hit: counts[3],
    })
}

/// The run's table.
#[must_use]
pub fn table(f: &TagFigures) -> String {
    let o = &f.options;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tag purges: {} nodes, {} tagged objects a node in {} tags ({} objects a tag), {} untagged",
        o.nodes, o.objects, o.tags, f.objects_per_tag, o.untagged
    );
    let _ = writeln!(
        out,
        "warming: {:.1} s, {:.0} GETs/s; n_object after: {:?}",
        f.warm_seconds, f.warm_rate, f.cached_after_warm
    );
    let _ = writeln!(
        out,
        "| | tags | PURGE requests | ms | tags/s | failed | evicted (reported / n_object drop / expected) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for (name, side) in [("cachectl (native API)", &f.cachectl), ("direct (harness client)", &f.direct)] {
        let show = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.0} | {:.1} | {} | {} / {} / {} |",
            side.tags,
            side.requests,
            side.ms,
            side.tags_per_s,
            side.failed,
            show(side.reported_evicted),
            show(side.objects_dropped),
            side.expected_evicted
        );
    }
    let met = if f.ratio >= 0.7 { "met" } else { "MISSED" };
    let _ = writeln!(out, "cachectl ÷ direct: {:.0}% (target ≥ 70%: {met})", f.ratio * 100.0);
    let v = &f.verification;
    let _ = writeln!(
        out,
        "sampled GETs as expected: cachectl tags MISS {}/{}, direct tags MISS {}/{}, other tags HIT {}/{}, untagged HIT {}/{}",
        v.cachectl_tags_missed.1,
        v.cachectl_tags_missed.0,
        v.direct_tags_missed.1,
        v.direct_tags_missed.0,
        v.other_tags_hit.1,
        v.other_tags_hit.0,
        v.untagged_hit.1,
        v.untagged_hit.0
    );
    let _ = writeln!(out, "server peak RSS: {:.0} MiB", f.peak_rss_mib);
    out
}
