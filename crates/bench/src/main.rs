//! The `cachectl-bench` binary: parses flags, runs the harness, prints the table and writes the
//! JSON. The hidden `serve` subcommand is the server process the harness starts (itself).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// cachectl-bench: the benchmark scenarios of BENCHMARKS.md, on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run cachectl with a configuration file (what the harness starts; not for people).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Host the fleet scenario's agents and null cache (what `--fleet` starts; not for people).
    #[command(hide = true)]
    Agents {
        #[arg(long)]
        nats: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        per_connection: usize,
    },
}

#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)]
struct RunFlags {
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "bench-results/results.json")]
    out: PathBuf,
    /// Varnish nodes.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// URLs in the fan-out task.
    #[arg(long, default_value_t = 20_000)]
    fanout_urls: u64,
    /// Purges of the `xargs -P 32 curl` baseline.
    #[arg(long, default_value_t = 4_000)]
    shell_purges: u64,
    /// Seconds of the direct PURGE baseline.
    #[arg(long, default_value_t = 5)]
    direct_seconds: u64,
    /// Single-URL tasks of the latency scenario.
    #[arg(long, default_value_t = 1_000)]
    latency_tasks: usize,
    /// Items written by the bulk loader (scenario 3).
    #[arg(long, default_value_t = 10_000_000)]
    load_items: u64,
    /// Accounts of the loaded history.
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Concurrent query clients.
    #[arg(long, default_value_t = 64)]
    query_connections: usize,
    /// Seconds per query under load.
    #[arg(long, default_value_t = 10)]
    query_seconds: u64,
    /// Queries a second offered to each query by the paced client (the rate at which the p99
    /// target is judged).
    #[arg(long, default_value_t = 5_000.0)]
    paced_rate: f64,
    /// Submissions of 1,000 URLs in the ingestion scenario.
    #[arg(long, default_value_t = 300)]
    ingest_submissions: usize,
    /// Concurrent ingestion clients.
    #[arg(long, default_value_t = 16)]
    ingest_clients: usize,
    /// `[worker] per_node_concurrency` of the servers.
    #[arg(long, default_value_t = 32)]
    per_node_concurrency: usize,
    /// `[worker] pipeline_depth` of the servers (1: no pipelining).
    #[arg(long, default_value_t = 32)]
    pipeline_depth: usize,
    /// `[worker] purge_batch` of the servers (1: one purge a request).
    #[arg(long, default_value_t = 8)]
    purge_batch: usize,
    /// `[worker] max_items_in_flight` of the servers.
    #[arg(long, default_value_t = 4096)]
    max_items_in_flight: usize,
    /// `[store] max_connections` of the servers (PostgreSQL's pool).
    #[arg(long, default_value_t = cachectl_store::DEFAULT_MAX_CONNECTIONS)]
    store_max_connections: u32,
    /// Skip scenario 3 on PostgreSQL.
    #[arg(long)]
    no_postgres: bool,
    /// `shared_buffers` of the benchmark's PostgreSQL cluster.
    #[arg(long, default_value = "128MB")]
    pg_shared_buffers: String,
    /// Use the built-in load client even when wrk is installed.
    #[arg(long)]
    no_wrk: bool,
    /// Run only the mixed-load scenario (a reliability run, not part of the full benchmark):
    /// refreshes submitted and queries sent at fixed rates against real Varnish nodes, reporting
    /// errors, the server's RSS over time and the queue depth at the end. Its figures go to
    /// `mixed.json` beside `--out`. Uses `--nodes`, `--accounts`, `--query-connections` and the
    /// worker flags.
    #[arg(long)]
    mixed: bool,
    /// Seconds of the mixed load.
    #[arg(long, default_value_t = 600)]
    mixed_seconds: u64,
    /// URLs submitted a second in the mixed load (refreshes of 100 URLs).
    #[arg(long, default_value_t = 1_000.0)]
    mixed_submit_rate: f64,
    /// Queries offered a second in the mixed load.
    #[arg(long, default_value_t = 5_000.0)]
    mixed_query_rate: f64,
    /// Seconds between two samples of RSS and queue depth in the mixed load.
    #[arg(long, default_value_t = 10)]
    mixed_sample_seconds: u64,
    /// Seconds of the mixed load after which RSS is expected to stay flat.
    #[arg(long, default_value_t = 60)]
    mixed_warmup_seconds: u64,
    /// Run only the tag-purge scenario (issue #19): objects tagged by the origin's
    /// `Surrogate-Key` cached on every node, tags purged through cachectl's native API and as
    /// many other tags purged by the same xkey PURGE sent straight to the nodes. Its figures go
    /// to `tags.json` beside `--out`. Uses `--nodes` and the worker flags.
    #[arg(long)]
    tags: bool,
    /// Tagged objects cached on every node by `--tags`.
    #[arg(long, default_value_t = 1_000_000)]
    tag_objects: u64,
    /// Distinct tags (object i carries tag i mod this).
    #[arg(long, default_value_t = 1_000)]
    tag_count: u64,
    /// Tags purged through cachectl, and as many purged directly.
    #[arg(long, default_value_t = 250)]
    tag_purges: u64,
    /// Untagged objects cached on every node (they must stay cached).
    #[arg(long, default_value_t = 1_000)]
    tag_untagged: u64,
    /// Run only the fleet scenario (issue #18): 10, 100 and 1,000 nodes through NATS JetStream
    /// and agents in front of a null cache, then directly over HTTP. Figures go to `fleet.json`
    /// beside `--out`.
    #[arg(long)]
    fleet: bool,
    /// Node counts of `--fleet`, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10usize, 100, 1000])]
    fleet_sizes: Vec<usize>,
    /// Node-purges of each `--fleet` throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    fleet_node_purges: u64,
    /// `--fleet` without the direct HTTP rows.
    #[arg(long)]
    fleet_no_direct: bool,
    /// `[bus] command_batch` of `--fleet`.
    #[arg(long, default_value_t = 256)]
    fleet_batch: usize,
    /// `[bus] command_hold` of `--fleet`, in milliseconds (0: every command published at once).
    #[arg(long, default_value_t = 1_000)]
    fleet_hold_ms: u64,
    /// Agents of `--fleet` sharing one NATS connection (1: each its own, as on separate hosts).
    #[arg(long, default_value_t = 1)]
    fleet_agents_per_connection: usize,
    /// Varnish storage (`-s`) of the tag scenario's nodes.
    #[arg(long, default_value = "malloc,3g")]
    tag_storage: String,
}

/// mimalloc instead of glibc's malloc: a record page allocates and frees a few hundred small
/// strings; glibc spent a tenth of the page's server time on them (BENCHMARKS.md round 6).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Serve { config }) = cli.command {
        let filter = tracing_subscriber::EnvFilter::try_from_env("CACHECTL_LOG").unwrap_or_else(|_| "warn".into());
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
        return cachectl_bench::serve(&config).await;
    }
    if let Some(Command::Agents { nats, count, per_connection }) = cli.command {
        let filter = tracing_subscriber::EnvFilter::try_from_env("CACHECTL_LOG").unwrap_or_else(|_| "warn".into());
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
        return cachectl_bench::fleet::host_agents(nats, count, per_connection).await;
    }
    let f = cli.run;
    if f.mixed {
        return mixed(f).await;
    }
    if f.tags {
        return tags(f).await;
    }
    if f.fleet {
        return fleet(f).await;
    }
    // Checked before anything starts, not when the first paced load runs minutes later.
    anyhow::ensure!(
        f.paced_rate.is_finite() && f.paced_rate > 0.0,
        "--paced-rate must be a number of queries a second above 0, not {}",
        f.paced_rate
    );
    let mut options = cachectl_bench::Options::full(std::env::current_exe()?);
    options.nodes = f.nodes;
    options.fanout_urls = f.fanout_urls;
    options.shell_purges = f.shell_purges;
    options.direct_seconds = f.direct_seconds;
    options.latency_tasks = f.latency_tasks;
    options.load_items = f.load_items;
    options.accounts = f.accounts;
    options.query_connections = f.query_connections;
    options.query_seconds = f.query_seconds;
    options.paced_rate = f.paced_rate;
    options.ingest_submissions = f.ingest_submissions;
    options.ingest_clients = f.ingest_clients;
    options.worker.per_node_concurrency = f.per_node_concurrency;
    options.worker.max_items_in_flight = f.max_items_in_flight;
    options.worker.pipeline_depth = f.pipeline_depth;
    options.worker.purge_batch = f.purge_batch;
    options.worker.max_connections = f.store_max_connections;
    options.postgres = !f.no_postgres;
    options.pg_shared_buffers = f.pg_shared_buffers;
    options.use_wrk = options.use_wrk && !f.no_wrk;
    if !options.use_wrk {
        eprintln!("wrk is not used: the built-in Rust load client measures the direct baseline and the queries");
    }
    // A run stopped by SIGINT or SIGTERM drops what it started (Varnish nodes, servers, the
    // PostgreSQL cluster, their temporary directories) instead of leaving them running.
    let results = tokio::select! {
        results = cachectl_bench::run(options, |step| eprintln!("==> {step}")) => results?,
        signal = stop_signal() => {
            anyhow::bail!("stopped by {signal}; the Varnish nodes, servers and PostgreSQL cluster it started are stopped")
        }
    };
    print!("{}", cachectl_bench::report::table(&results));
    if let Some(dir) = f.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&f.out, serde_json::to_string_pretty(&results)?)?;
    eprintln!("figures written to {}", f.out.display());
    Ok(())
}

/// `--mixed`: the mixed-load scenario alone.
async fn mixed(f: RunFlags) -> anyhow::Result<()> {
    for (flag, rate) in [("--mixed-submit-rate", f.mixed_submit_rate), ("--mixed-query-rate", f.mixed_query_rate)] {
        anyhow::ensure!(rate.is_finite() && rate > 0.0, "{flag} must be a number a second above 0, not {rate}");
    }
    anyhow::ensure!(f.mixed_seconds > 0, "--mixed-seconds must be above 0");
    let worker = cachectl_bench::fixtures::WorkerSettings {
        per_node_concurrency: f.per_node_concurrency,
        pipeline_depth: f.pipeline_depth,
        purge_batch: f.purge_batch,
        max_items_in_flight: f.max_items_in_flight,
        enabled: true,
        max_connections: f.store_max_connections,
    };
    let mut options = cachectl_bench::mixed::MixedOptions::full(std::env::current_exe()?, f.nodes, f.accounts, worker);
    options.seconds = f.mixed_seconds;
    options.submit_rate = f.mixed_submit_rate;
    options.query_rate = f.mixed_query_rate;
    options.query_connections = f.query_connections;
    options.sample_seconds = f.mixed_sample_seconds;
    options.warmup_seconds = f.mixed_warmup_seconds;
    let figures = tokio::select! {
        figures = cachectl_bench::mixed::run(options, |step| eprintln!("==> {step}")) => figures?,
        signal = stop_signal() => {
            anyhow::bail!("stopped by {signal}; the Varnish nodes and the server it started are stopped")
        }
    };
    print!("{}", cachectl_bench::mixed::table(&figures));
    let out = f.out.with_file_name("mixed.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&figures)?)?;
    eprintln!("figures written to {}", out.display());
    Ok(())
}

/// `--tags`: the tag-purge scenario alone.
async fn tags(f: RunFlags) -> anyhow::Result<()> {
    let worker = cachectl_bench::fixtures::WorkerSettings {
        per_node_concurrency: f.per_node_concurrency,
        pipeline_depth: f.pipeline_depth,
        purge_batch: f.purge_batch,
        max_items_in_flight: f.max_items_in_flight,
        enabled: true,
        max_connections: f.store_max_connections,
    };
    let mut options = cachectl_bench::tags::TagOptions::full(std::env::current_exe()?, worker);
    options.nodes = f.nodes;
    options.objects = f.tag_objects;
    options.tags = f.tag_count;
    options.purged = f.tag_purges;
    options.untagged = f.tag_untagged;
    options.storage = f.tag_storage;
    let figures = tokio::select! {
        figures = cachectl_bench::tags::run(options, |step| eprintln!("==> {step}")) => figures?,
        signal = stop_signal() => {
            anyhow::bail!("stopped by {signal}; the Varnish nodes and the server it started are stopped")
        }
    };
    print!("{}", cachectl_bench::tags::table(&figures));
    let out = f.out.with_file_name("tags.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&figures)?)?;
    eprintln!("figures written to {}", out.display());
    Ok(())
}

async fn fleet(f: RunFlags) -> anyhow::Result<()> {
    let mut options = cachectl_bench::fleet::FleetOptions::full(std::env::current_exe()?);
    options.sizes = f.fleet_sizes;
    options.node_purges = f.fleet_node_purges;
    options.command_batch = f.fleet_batch;
    options.command_hold_ms = f.fleet_hold_ms;
    options.direct = !f.fleet_no_direct;
    options.agents_per_connection = f.fleet_agents_per_connection.max(1);
    let rows = tokio::select! {
        rows = cachectl_bench::fleet::run(&options, |step| eprintln!("==> {step}")) => rows?,
        signal = stop_signal() => anyhow::bail!("stopped by {signal}; what it started is stopped"),
    };
    print!("{}", cachectl_bench::fleet::table(&rows));
    let out = f.out.with_file_name("fleet.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("figures written to {}", out.display());
    Ok(())
}

/// The first SIGINT or SIGTERM, by name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut interrupt), Ok(mut terminate)) => tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        },
        // No handler could be installed: the signals keep their default action.
        _ => std::future::pending().await,
    }
}
