//! Scenario 3 of BENCHMARKS.md: the history queries, each checked once for an exact total, then
//! loaded saturated and paced (and, on PostgreSQL, replayed against the database alone).

use crate::fixtures::{Server, token};
use crate::load::{LoadFigures, Prepared, paced_load, percentile_ms, rust_load, wrk};
use crate::loader::{Dataset, Timestamp};
use crate::scenarios::http;
use anyhow::{Context, ensure};
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One query of scenario 3 and what it measured.
#[derive(Debug, Clone, Serialize)]
pub struct QueryFigures {
    /// What it asks.
    pub name: String,
    /// The request (path and query; GEO requests are signed per request).
    pub request: String,
    /// The total (or, for GEO, records walked) the dataset says it must answer.
    pub expected_total: u64,
    /// What the server answered.
    pub total: u64,
    /// `total == expected_total`.
    pub exact: bool,
    /// Under load: `connections` clients, each sending its next request as soon as the last
    /// one is answered (the most the server answers; latency there is mostly queueing).
    pub load: LoadFigures,
    /// At a fixed offered rate (`Options::paced_rate`), over as many connections
    /// (`crate::load::paced_load`): the latency a client sees at that rate.
    pub paced: LoadFigures,
    /// rps ÷ the `/healthz` rps of the same server in the same run.
    pub ratio_healthz: f64,
    /// Median of sequential requests from one client before the load (service time without
    /// queueing), ms; for GEO, the median page of one walk.
    pub unloaded_p50_ms: f64,
    /// GEO only: pages in one walk, and the first and the last page's time, ms.
    pub walk: Option<(usize, f64, f64)>,
    /// PostgreSQL only: the database alone answering the statements of this query.
    pub database_alone: Option<DatabaseAlone>,
}

/// The statements the server ran for one query, replayed straight to PostgreSQL by pgbench
/// with the same number of clients (`crate::pgbench`).
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseAlone {
    /// The pgbench script: one run of it is one query answered.
    pub script: String,
    /// pgbench's figures, as fast as the database answers.
    pub load: LoadFigures,
    /// pgbench's figures throttled to the paced client's rate (`pgbench -R`: a Poisson
    /// schedule, each time from the transaction's scheduled start).
    pub paced: LoadFigures,
    /// The server's rate ÷ pgbench's.
    pub ratio: f64,
}

/// Captures the statements `request` makes the database run and replays them with pgbench
/// after the server's own load.
async fn database_alone<F, Fut>(
    baseline: Option<&crate::pgbench::Baseline>,
    request: F,
    connections: usize,
    seconds: u64,
    paced_rate: f64,
    server_rps: f64,
) -> anyhow::Result<Option<DatabaseAlone>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let Some(baseline) = baseline else { return Ok(None) };
    let script = baseline.capture(request).await?.context("the query ran no statement in the database")?;
    let (b, s) = (baseline.clone(), script.clone());
    let load = tokio::task::spawn_blocking(move || b.run(&s, connections, seconds, None)).await??;
    let (b, s) = (baseline.clone(), script.clone());
    let paced = tokio::task::spawn_blocking(move || b.run(&s, connections, seconds, Some(paced_rate))).await??;
    let ratio = server_rps / load.rps;
    Ok(Some(DatabaseAlone { script, load, paced, ratio }))
}

/// The median time of `n` sequential GETs of `url`, ms.
async fn unloaded(client: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let sent = Instant::now();
        let response = client.get(url).send().await?;
        ensure!(response.status().is_success(), "GET {url}: {}", response.status());
        let _ = response.bytes().await?;
        samples.push(u64::try_from(sent.elapsed().as_micros())?);
    }
    samples.sort_unstable();
    Ok(percentile_ms(&samples, 0.5))
}

/// Scenario 3 on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct QueryBackendFigures {
    /// The load.
    pub load: crate::loader::LoadFigures,
    /// The queries, `/healthz` first.
    pub queries: Vec<QueryFigures>,
    /// The server's peak RSS after the queries, MiB.
    pub peak_rss_mib: f64,
}

/// The Baishan day (`+08:00`) of `at`, and that day's midnight.
pub(crate) fn baishan_day(at: Timestamp) -> chrono::NaiveDate {
    let zone = chrono::FixedOffset::east_opt(8 * 3600).expect("a valid offset");
    chrono::DateTime::from_timestamp_millis(at).expect("a valid time").with_timezone(&zone).date_naive()
}

fn baishan_midnight(day: chrono::NaiveDate) -> Timestamp {
    day.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_millis() - 8 * 3_600_000
}

/// Scenario 3: the queries, each checked once for an exact total, then put under load.
///
/// Longer than the house limit on purpose: a linear script of steps that each use the previous
/// one's results, read top to bottom like the scenario's description in BENCHMARKS.md.
///
/// # Errors
/// A query fails.
pub async fn queries(
    server: &Server,
    dataset: &Dataset,
    connections: usize,
    seconds: u64,
    use_wrk: bool,
    paced_rate: f64,
    baseline: Option<&crate::pgbench::Baseline>,
) -> anyhow::Result<Vec<QueryFigures>> {
    let client = http()?;
    // A 7-day window ending two Baishan days before the last task: inside the data, whole days.
    let end_day = baishan_day(dataset.end) - chrono::Days::new(2);
    let start_day = end_day - chrono::Days::new(6);
    let (from, to) = (baishan_midnight(start_day), baishan_midnight(end_day + chrono::Days::new(1)));
    let task = dataset.task_of(0, from).context("a task of account 0 in the window")?;
    let url = dataset.url(u64::try_from(task.id - 1)?, 0);
    let tok = token(0);
    let window = format!("start_time={start_day}&end_time={end_day}");
    let encoded_url: String = url::form_urlencoded::byte_serialize(url.as_bytes()).collect();
    let cases: Vec<(&str, String, u64)> = vec![
        ("healthz", "/healthz".into(), 0),
        ("baishan: task id", format!("/v2/cache/refresh?token={tok}&task_id={}", task.id), task.size),
        (
            "baishan: 7-day window, page 1",
            format!("/v2/cache/refresh?token={tok}&{window}&page_number=1"),
            dataset.count_window(0, from, to),
        ),
        (
            "baishan: 7-day window, page 100",
            format!("/v2/cache/refresh?token={tok}&{window}&page_number=100"),
            dataset.count_window(0, from, to),
        ),
        (
            "baishan: one URL, 7-day window",
            format!("/v2/cache/refresh?token={tok}&{window}&url={encoded_url}"),
            dataset.count_url(0, &url, from, to),
        ),
    ];
    let mut out: Vec<QueryFigures> = Vec::new();
    for (name, request, expected) in cases {
        let total = if name == "healthz" {
            0
        } else {
            let body: Value = client.get(server.url(&request)).send().await?.json().await?;
            body["data"]["total"].as_u64().with_context(|| format!("{name}: no total in {body}"))?
        };
        let unloaded_p50_ms = unloaded(&client, &server.url(&request), 50).await?;
        let load = if use_wrk {
            let url = server.url(&request);
            tokio::task::spawn_blocking(move || wrk(&url, connections, 2, seconds, None)).await??
        } else {
            let target = server.url(&request);
            rust_load(connections, Duration::from_secs(seconds), Arc::new(move |c, _| c.get(&target))).await?
        };
        let paced = paced_load(
            connections,
            paced_rate,
            Duration::from_secs(seconds),
            Arc::new(vec![Prepared::get(server.url(&request))]),
        )
        .await?;
        let ratio = out.first().map_or(1.0, |h| load.rps / h.load.rps);
        let alone = if name == "healthz" {
            None
        } else {
            let (client, url) = (&client, server.url(&request));
            let url = url.as_str();
            let get = || async move {
                let response = client.get(url).send().await?;
                ensure!(response.status().is_success(), "GET {url}: {}", response.status());
                Ok(())
            };
            database_alone(baseline, get, connections, seconds, paced_rate, load.rps).await?
        };
        out.push(QueryFigures {
            name: name.into(),
            request,
            expected_total: expected,
            total,
            exact: total == expected,
            load,
            paced,
            ratio_healthz: ratio,
            unloaded_p50_ms,
            walk: None,
            database_alone: alone,
        });
    }
    // GEO: the same seven days of account 0 through every page (markers), signed requests.
    let expected = dataset.count_window(0, from, to);
    let geo = crate::geo::GeoWindow::new(server.port, from, to - 1000);
    let (walked, mut pages, markers) = geo.walk(&client).await?;
    let (first, last) = (percentile_ms(&pages[..1], 0.0), percentile_ms(&pages[pages.len() - 1..], 0.0));
    let page_count = pages.len();
    pages.sort_unstable();
    let load = if use_wrk {
        let script = tempfile::Builder::new().suffix(".lua").tempfile()?;
        std::fs::write(script.path(), geo.wrk_script(&markers))?;
        let url = server.url("/");
        tokio::task::spawn_blocking(move || wrk(&url, connections, 2, seconds, Some(script.path()))).await??
    } else {
        geo.load(connections, Duration::from_secs(seconds)).await?
    };
    let paced =
        paced_load(connections, paced_rate, Duration::from_secs(seconds), Arc::new(geo.prepared(&markers))).await?;
    let ratio = load.rps / out[0].load.rps;
    let middle = markers.get(markers.len() / 2).cloned().flatten();
    let (geo_ref, client_ref) = (&geo, &client);
    let page = || {
        let marker = middle.clone();
        async move { geo_ref.page(client_ref, marker.as_deref()).await.map(|_| ()) }
    };
    let alone = database_alone(baseline, page, connections, seconds, paced_rate, load.rps).await?;
    out.push(QueryFigures {
        name: "geo: 7-day window, every page by marker".into(),
        request: geo.describe(),
        expected_total: expected,
        total: walked,
        exact: walked == expected,
        load,
        paced,
        ratio_healthz: ratio,
        unloaded_p50_ms: percentile_ms(&pages, 0.5),
        walk: Some((page_count, first, last)),
        database_alone: alone,
    });
    Ok(out)
}
