//! The harness's smoke run: every scenario at tiny sizes (the mixed load in a test of its own), so
//! that CI builds and exercises the benchmark and it cannot rot. It asserts that each scenario
//! produced figures and that every query's `total` was exact — never a speed. It needs Varnish,
//! PostgreSQL, curl and xargs (as the e2e suite does, and pgbench, which comes with PostgreSQL),
//! not wrk: the built-in Rust client drives the direct baseline and the queries here.

use cachectl_bench::fixtures::WorkerSettings;
use cachectl_bench::mixed::MixedOptions;
use cachectl_bench::tags::TagOptions;
use cachectl_bench::{Options, run};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_produces_figures_at_tiny_sizes() {
    let options = Options {
        server_exe: PathBuf::from(env!("CARGO_BIN_EXE_cachectl-bench")),
        nodes: 2,
        fanout_urls: 200,
        direct_seconds: 1,
        shell_purges: 40,
        latency_tasks: 20,
        latency_interval_ms: 10,
        load_items: 5_000,
        accounts: 2,
        days: 31,
        query_connections: 4,
        query_seconds: 1,
        paced_rate: 100.0,
        ingest_submissions: 4,
        ingest_urls: 1_000,
        ingest_clients: 2,
        postgres: true,
        pg_shared_buffers: "128MB".into(),
        use_wrk: false,
        worker: WorkerSettings {
            per_node_concurrency: 8,
            pipeline_depth: 4,
            purge_batch: 8,
            max_items_in_flight: 256,
            enabled: true,
            max_connections: 4,
        },
    };
    let results = run(options, |step| eprintln!("==> {step}")).await.expect("the smoke run completes");
    eprintln!("{}", cachectl_bench::report::table(&results));

    let f = &results.fanout;
    assert_eq!(f.purges, 400);
    assert_eq!(f.failed, 0, "every fan-out item completed");
    assert!(f.cachectl_rate > 0.0 && f.direct.requests > 0 && f.shell_rate > 0.0, "{f:?}");
    assert_eq!(results.latency.tasks, 20);
    assert_eq!(results.latency.failed, 0);
    assert_eq!(results.ingest.accepted_urls, 4_000);
    assert_eq!(results.ingest_api_only.accepted_urls, 4_000, "the API-only server took every submission");
    assert!(results.live_server_peak_rss_mib > 0.0);
    let pg = results.queries_postgres.as_ref().expect("PostgreSQL was asked for");
    for backend in [&results.queries_sqlite, pg] {
        assert_eq!(backend.load.items, 5_000);
        assert_eq!(backend.queries.len(), 6, "healthz, four Baishan queries, GEO");
        for q in &backend.queries {
            assert!(q.load.requests > 0, "{} was exercised: {q:?}", q.name);
            assert_eq!(q.load.errors, 0, "{} answered 2xx: {q:?}", q.name);
            // The paced client offered 100 q/s for one second: every scheduled request went out.
            assert_eq!(q.paced.requests, 100, "{}: the paced load sent its schedule: {:?}", q.name, q.paced);
            assert_eq!(q.paced.errors, 0, "{} answered 2xx to the paced client: {:?}", q.name, q.paced);
            assert!(q.exact, "{}: total {} but the dataset holds {}", q.name, q.total, q.expected_total);
        }
        assert!(
            backend.queries[1..].iter().all(|q| q.total > 0),
            "every query finds loaded items: {:?}",
            backend.queries
        );
        assert!(backend.peak_rss_mib > 0.0);
    }
    // The PostgreSQL-alone baseline: every query's statements were captured from the cluster's
    // log and replayed by pgbench; none on SQLite.
    for q in &pg.queries[1..] {
        let alone = q.database_alone.as_ref().unwrap_or_else(|| panic!("{}: no PostgreSQL-alone figures", q.name));
        assert!(
            alone.script.contains("FROM items"),
            "{}: the captured statements read items: {}",
            q.name,
            alone.script
        );
        assert!(!alone.script.contains('$'), "{}: every parameter written in: {}", q.name, alone.script);
        assert!(!alone.script.contains("UPDATE"), "{}: no statement of the worker's: {}", q.name, alone.script);
        assert!(alone.load.requests > 0 && alone.load.rps > 0.0, "{}: pgbench ran: {alone:?}", q.name);
        assert!(alone.paced.requests > 0 && alone.paced.errors == 0, "{}: pgbench -R ran: {alone:?}", q.name);
        assert_eq!(alone.load.errors, 0, "{}: pgbench's transactions all succeeded", q.name);
    }
    assert!(results.queries_sqlite.queries.iter().all(|q| q.database_alone.is_none()));
    assert!(!results.targets.is_empty());
}

/// The mixed-load scenario (`--mixed`, a 10-minute reliability run when asked for) for four
/// seconds: it submits and queries on schedule, samples RSS and the queue, and accounts for
/// every URL it submitted. Asserts counts and errors, never a speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mixed_load_runs_at_tiny_sizes() {
    let worker = WorkerSettings {
        per_node_concurrency: 8,
        pipeline_depth: 4,
        purge_batch: 8,
        max_items_in_flight: 256,
        enabled: true,
        max_connections: 4,
    };
    let mut options = MixedOptions::full(PathBuf::from(env!("CARGO_BIN_EXE_cachectl-bench")), 1, 2, worker);
    options.seconds = 4;
    options.submit_rate = 200.0;
    options.query_rate = 100.0;
    options.query_connections = 4;
    options.sample_seconds = 1;
    options.warmup_seconds = 1;
    options.drain_seconds = 60;
    let f = cachectl_bench::mixed::run(options, |step| eprintln!("==> {step}")).await.expect("the mixed load runs");
    eprintln!("{}", cachectl_bench::mixed::table(&f));

    assert_eq!(f.submissions, 8, "two refreshes of 100 URLs a second for four seconds");
    assert_eq!(f.submit_errors, 0);
    assert_eq!(f.submitted_urls, 1_000, "the eight and one seed refresh per account, 100 URLs each");
    assert_eq!(f.queries.iter().map(|q| q.requests).sum::<u64>(), 400, "the query schedule was sent");
    assert!(f.queries.iter().all(|q| q.requests > 0 && q.errors == 0), "every kind asked, all 2xx: {:?}", f.queries);
    assert!(f.samples.len() >= 4 && f.samples.iter().all(|s| s.rss_mib > 0.0), "{:?}", f.samples);
    assert!(f.drained_after_s.is_some(), "the queue drained: {} left", f.queue_depth_at_end);
    assert_eq!((f.items_completed, f.items_failed), (1_000, 0), "{:?}", f.failure_reasons);
    assert_eq!(f.errors, 0, "{:?}", f.server_log_sample);
    assert!(f.rss.peak_mib > 0.0 && f.rss.idle_after_drain_mib > 0.0);
}

/// The tag-purge scenario (`--tags`, a million objects when asked for) at tiny sizes: 2,000
/// tagged objects in 20 tags on two nodes, 5 tags purged through cachectl and 5 directly. Asserts
/// that both ways purged every tag on every node, evicted exactly the objects of those tags and
/// nothing else, never a speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_purges_run_at_tiny_sizes() {
    let worker = WorkerSettings {
        per_node_concurrency: 8,
        pipeline_depth: 4,
        purge_batch: 8,
        max_items_in_flight: 256,
        enabled: true,
        max_connections: 4,
    };
    let mut options = TagOptions::full(PathBuf::from(env!("CARGO_BIN_EXE_cachectl-bench")), worker);
    options.nodes = 2;
    options.objects = 2_000;
    options.tags = 20;
    options.purged = 5;
    options.untagged = 50;
    options.warm_connections = 4;
    options.storage = "malloc,64m".into();
    options.sample = 20;
    let f = cachectl_bench::tags::run(options, |step| eprintln!("==> {step}")).await.expect("the tag scenario runs");
    eprintln!("{}", cachectl_bench::tags::table(&f));

    assert_eq!(f.objects_per_tag, 100);
    assert!(f.warm_rate > 0.0);
    assert!(f.cached_after_warm.iter().all(|n| n.is_none_or(|n| n >= 2_050)), "{:?}", f.cached_after_warm);
    for side in [&f.cachectl, &f.direct] {
        assert_eq!((side.tags, side.requests, side.failed), (5, 10, 0), "{side:?}");
        assert_eq!(side.expected_evicted, 1_000, "5 tags of 100 objects on 2 nodes");
        assert!(side.tags_per_s > 0.0, "{side:?}");
        if let Some(dropped) = side.objects_dropped {
            assert_eq!(dropped, 1_000, "exactly the tagged objects left the caches: {side:?}");
        }
    }
    assert_eq!(f.direct.reported_evicted, Some(1_000), "Varnish reported every object of the direct tags purged");
    assert!(f.ratio > 0.0);
    let v = &f.verification;
    assert!(v.all_as_expected(), "purged tags miss, the others and untagged objects hit: {v:?}");
    assert_eq!(v.cachectl_tags_missed.0, 40, "20 objects a class on 2 nodes");
}
