//! The cachectl benchmark harness: starts an origin, Varnish nodes, (optionally) a private
//! PostgreSQL and cachectl itself as a separate process, runs the scenarios of BENCHMARKS.md,
//! and returns their figures with each target marked met or missed. It never changes the
//! service: it drives it through its HTTP API and reads its store.

pub mod fixtures;
pub mod fleet;
pub mod geo;
pub mod load;
pub mod loader;
pub mod mixed;
pub mod pgbench;
pub mod queries;
pub mod report;
pub mod scenarios;
pub mod tags;

use anyhow::Context;
use fixtures::{Origin, Server, Varnish, WorkerSettings};
use loader::Dataset;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Sizes and settings of a run (the defaults are the full benchmark of issue #6).
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// The executable that runs `serve --config FILE` (this binary).
    pub server_exe: PathBuf,
    /// Varnish nodes.
    pub nodes: usize,
    /// URLs in the fan-out task.
    pub fanout_urls: u64,
    /// Seconds of the direct PURGE baseline.
    pub direct_seconds: u64,
    /// Purges of the shell-loop baseline.
    pub shell_purges: u64,
    /// Single-URL tasks of the latency scenario.
    pub latency_tasks: usize,
    /// Milliseconds between two latency submissions.
    pub latency_interval_ms: u64,
    /// Items the bulk loader writes.
    pub load_items: u64,
    /// Accounts of the loaded history.
    pub accounts: usize,
    /// Days of the loaded history.
    pub days: u32,
    /// Concurrent query clients.
    pub query_connections: usize,
    /// Seconds per query under load (each query is loaded twice: saturated, then paced).
    pub query_seconds: u64,
    /// Queries a second the paced client offers each query (the rate of the p99 target).
    pub paced_rate: f64,
    /// Submissions of the ingestion scenario.
    pub ingest_submissions: usize,
    /// URLs per submission.
    pub ingest_urls: usize,
    /// Concurrent ingestion clients.
    pub ingest_clients: usize,
    /// Run scenario 3 on PostgreSQL too.
    pub postgres: bool,
    /// `shared_buffers` of the benchmark's PostgreSQL cluster.
    pub pg_shared_buffers: String,
    /// Use wrk for the direct baseline and the Baishan queries (else the built-in client).
    pub use_wrk: bool,
    /// Worker settings of the servers.
    pub worker: WorkerSettings,
}

impl Options {
    /// The full benchmark.
    #[must_use]
    pub fn full(server_exe: PathBuf) -> Self {
        Self {
            server_exe,
            nodes: 4,
            fanout_urls: 20_000,
            direct_seconds: 5,
            shell_purges: 4_000,
            latency_tasks: 1_000,
            latency_interval_ms: 10,
            load_items: 10_000_000,
            accounts: 100,
            days: 31,
            query_connections: 64,
            query_seconds: 10,
            paced_rate: 5_000.0,
            ingest_submissions: 300,
            ingest_urls: 1_000,
            ingest_clients: 16,
            postgres: true,
            pg_shared_buffers: "128MB".to_owned(),
            use_wrk: fixtures::have("wrk"),
            worker: WorkerSettings {
                per_node_concurrency: 32,
                pipeline_depth: 32,
                purge_batch: 8,
                max_items_in_flight: 4096,
                enabled: true,
                max_connections: cachectl_store::DEFAULT_MAX_CONNECTIONS,
            },
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// What it ran with.
    pub options: Options,
    /// Scenario 1.
    pub fanout: scenarios::FanoutFigures,
    /// Scenario 2.
    pub latency: scenarios::LatencyFigures,
    /// Scenario 4, on the server of scenarios 1 and 2, its worker purging what arrives.
    pub ingest: scenarios::IngestFigures,
    /// Scenario 4 on an API-only server (`[worker] enabled = false`, a fresh store): what the
    /// accepting path alone takes.
    pub ingest_api_only: scenarios::IngestFigures,
    /// Peak RSS of the server of scenarios 1, 2 and 4 (one process), MiB.
    pub live_server_peak_rss_mib: f64,
    /// Scenario 3 on SQLite.
    pub queries_sqlite: scenarios::QueryBackendFigures,
    /// Scenario 3 on PostgreSQL, when run.
    pub queries_postgres: Option<scenarios::QueryBackendFigures>,
    /// Every target, met or missed.
    pub targets: Vec<report::Target>,
}

/// Runs every scenario and returns the figures.
///
/// # Errors
/// A component does not start or a scenario fails (a missed target is not an error).
pub async fn run(options: Options, progress: impl Fn(&str)) -> anyhow::Result<Results> {
    let scratch = tempfile::tempdir()?;
    let origin = Origin::start().await?;
    progress(&format!("starting {} Varnish nodes", options.nodes));
    let nodes: Vec<Varnish> =
        futures::future::try_join_all((0..options.nodes).map(|_| Varnish::start(origin.port))).await?;
    let edges: Vec<String> = nodes.iter().map(Varnish::address).collect();

    let live_db = scratch.path().join("live.db");
    let live_url = format!("sqlite://{}", live_db.display());
    let server = Server::start(&options.server_exe, &live_url, 1, &edges, options.worker).await?;
    progress(&format!("scenario 1: fan-out of {} URLs on {} nodes", options.fanout_urls, options.nodes));
    let fanout = scenarios::fanout(&server, &nodes, &options, scratch.path()).await.context("scenario 1 (fan-out)")?;
    progress(&format!("scenario 2: {} single-URL tasks", options.latency_tasks));
    let latency =
        scenarios::latency(&server, options.latency_tasks, Duration::from_millis(options.latency_interval_ms))
            .await
            .context("scenario 2 (latency)")?;
    progress(&format!("scenario 4: {} submissions of {} URLs", options.ingest_submissions, options.ingest_urls));
    let ingest = scenarios::ingest(&server, options.ingest_submissions, options.ingest_urls, options.ingest_clients)
        .await
        .context("scenario 4 (ingestion)")?;
    let live_server_peak_rss_mib = server.peak_rss_mib();
    drop(server);
    progress("scenario 4 again, on an API-only server (worker disabled)");
    let api_only_url = format!("sqlite://{}", scratch.path().join("api-only.db").display());
    let api_only = Server::start(
        &options.server_exe,
        &api_only_url,
        1,
        &edges,
        WorkerSettings { enabled: false, ..options.worker },
    )
    .await?;
    let ingest_api_only =
        scenarios::ingest(&api_only, options.ingest_submissions, options.ingest_urls, options.ingest_clients)
            .await
            .context("scenario 4 (ingestion, API-only)")?;
    let live_server_peak_rss_mib = live_server_peak_rss_mib.max(api_only.peak_rss_mib());
    drop(api_only);

    let dataset = Dataset {
        items: options.load_items,
        accounts: options.accounts,
        days: options.days,
        end: scenarios::now_ms() - 60_000,
    };
    progress(&format!("scenario 3 (SQLite): loading {} items", options.load_items));
    let sqlite_url = format!("sqlite://{}", scratch.path().join("loaded.db").display());
    let load = loader::load_sqlite(&sqlite_url, &dataset).await.context("loading SQLite")?;
    let queries_sqlite = query_backend(&options, &sqlite_url, &edges, &dataset, load, None, &progress).await?;
    let queries_postgres = if options.postgres {
        progress(&format!("scenario 3 (PostgreSQL): loading {} items", options.load_items));
        // PostgreSQL's default shared_buffers (128MB) unless asked otherwise: 2GB measured no
        // clear difference at 3 M items (BENCHMARKS.md).
        let cluster = cachectl_testkit::PgCluster::start_with(&[("shared_buffers", &options.pg_shared_buffers)]);
        let pg_url = cluster.database("cachectl_bench").await;
        let load = loader::load_postgres(&pg_url, &dataset).await.context("loading PostgreSQL")?;
        let baseline =
            pgbench::Baseline { url: pg_url.clone(), log: cluster.log_file(), pgbench: cluster.tool("pgbench") };
        Some(query_backend(&options, &pg_url, &edges, &dataset, load, Some(&baseline), &progress).await?)
    } else {
        None
    };
    drop(nodes);
    let mut results = Results {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        options,
        fanout,
        latency,
        ingest,
        ingest_api_only,
        live_server_peak_rss_mib,
        queries_sqlite,
        queries_postgres,
        targets: Vec::new(),
    };
    results.targets = report::targets(&results);
    Ok(results)
}

async fn query_backend(
    options: &Options,
    store_url: &str,
    edges: &[String],
    dataset: &Dataset,
    load: loader::LoadFigures,
    baseline: Option<&pgbench::Baseline>,
    progress: &impl Fn(&str),
) -> anyhow::Result<scenarios::QueryBackendFigures> {
    progress(&format!("  loaded in {:.1} s; querying with {} clients", load.seconds, options.query_connections));
    let server = Server::start(&options.server_exe, store_url, options.accounts, edges, options.worker).await?;
    let queries = scenarios::queries(
        &server,
        dataset,
        options.query_connections,
        options.query_seconds,
        options.use_wrk,
        options.paced_rate,
        baseline,
    )
    .await
    .with_context(|| format!("scenario 3 on {}", load.backend))?;
    Ok(scenarios::QueryBackendFigures { load, queries, peak_rss_mib: server.peak_rss_mib() })
}

/// Runs the service in this process until SIGINT/SIGTERM: the hidden `serve` subcommand, so
/// that the harness measures a server process of its own without needing another binary.
///
/// # Errors
/// The configuration is invalid or the service fails.
pub async fn serve(config: &std::path::Path) -> anyhow::Result<()> {
    let settings = cachectl_server::config::Config::load(Some(config))?.validate()?;
    let app = cachectl_server::Application::build(settings).await?;
    let token = tokio_util::sync::CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
        trigger.cancel();
    });
    app.run_until_stopped(token).await
}
