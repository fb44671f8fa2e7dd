//! PostgreSQL going away under load: two `cachectl serve` instances on one database, the
//! continuous submissions of `faults::Load` (Baishan, native, Baidu GEO) spread over both, two
//! Varnish nodes purging. The database is restarted three times at random moments (`pg_ctl stop
//! -m fast`, which cuts every connection, then start on the same data directory and port), or
//! stopped once for 60 seconds. Each test asserts:
//! - every submission is answered, either acknowledged or with the dialect's own 503 in its
//!   envelope, and no request goes unanswered (the instances never stop);
//! - after the database is back, both instances acknowledge submissions again by themselves and
//!   `/readyz` answers 200 (the 60 s stop also checks that it answered 503 meanwhile);
//! - the promises of `faults::check_promises`: every acknowledged task stored with all its items,
//!   every item completed on both nodes, none executed after it was final, none duplicated.

use crate::faults::*;
use crate::support::*;
use cachectl_testkit::PgCluster;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Fixture {
    // Dropped in this order: the instances before the nodes and the database.
    instances: Vec<Cachectl>,
    nodes: Nodes,
    pg: Arc<PgCluster>,
    http: reqwest::Client,
}

impl Fixture {
    async fn start(name: &str) -> Self {
        let worker = worker();
        let pg = PgCluster::start();
        let db = pg.database(name).await;
        let nodes = Nodes::start(LATENCY).await;
        let config = format!("{}{}{}", accounts(), worker, nodes.edges());
        let mut instances = Vec::new();
        for _ in 0..2 {
            instances.push(Cachectl::start_on_store(Some(&db), &config).await);
        }
        nodes.watch(&instances.iter().map(|i| i.port).collect::<Vec<_>>());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { instances, nodes, pg: Arc::new(pg), http }
    }

    fn ports(&self) -> Vec<u16> {
        self.instances.iter().map(|i| i.port).collect()
    }

    fn logs(&self) -> String {
        let mut text: String = self
            .instances
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- instance {i}:\n{}\n", tail(&s.log())))
            .collect();
        let pg_log = std::fs::read_to_string(self.pg.log_file()).unwrap_or_default();
        text.push_str(&format!("--- PostgreSQL:\n{}", tail(&pg_log)));
        text
    }

    /// Stops PostgreSQL (`-m fast`) off the runtime's thread, so that the load and the proxies
    /// keep running meanwhile.
    async fn stop_db(&self) {
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.stop()).await.unwrap();
    }

    async fn start_db(&self) {
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again()).await.unwrap();
    }

    async fn readyz(&self, port: u16) -> u16 {
        self.http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.unwrap().status().as_u16()
    }

    /// Both instances answer `/readyz` with 200 and the load has had `n` more tasks acknowledged.
    async fn recovered(&self, load: &Load, n: usize) -> Duration {
        let start = Instant::now();
        load.wait_acked(n, Duration::from_secs(30), &|| self.logs()).await;
        for port in self.ports() {
            while self.readyz(port).await != 200 {
                assert!(start.elapsed() < Duration::from_secs(30), "instance on {port} not ready\n{}", self.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        start.elapsed()
    }

    /// The end of every test: the load stops, every item becomes final, the promises hold.
    async fn finish(&self, load: Load) -> (LoadReport, Figures) {
        let report = load.stop().await;
        assert!(
            report.unexpected.is_empty(),
            "answers other than success or the dialect's 503: {:?}",
            report.unexpected
        );
        assert_eq!(report.no_answer, 0, "every request was answered: no instance stopped\n{}", self.logs());
        let port = self.instances[0].port;
        wait_all_final(&self.http, port, Duration::from_secs(90), &|| self.logs()).await;
        let figures = check_promises(port, &report, &self.nodes, &|| self.logs()).await;
        for (i, instance) in self.instances.iter().enumerate() {
            assert!(!instance.log().contains("panicked"), "instance {i}:\n{}", instance.log());
        }
        (report, figures)
    }
}

#[tokio::test]
async fn postgres_restarts_under_load_lose_nothing() {
    let mut rng = Rng::from_env();
    let f = Fixture::start("restarts").await;
    let load = Load::start(&f.ports(), "pg-restarts", SHAPE);
    let started = Instant::now();
    for restart in 1..=3 {
        load.wait_acked(20, Duration::from_secs(30), &|| f.logs()).await;
        tokio::time::sleep(rng.millis(0..1500)).await;
        fan_out_under_way(&f.http, f.instances[0].port, &|| f.logs()).await;
        f.stop_db().await;
        let down = Instant::now();
        tokio::time::sleep(rng.millis(0..2000)).await;
        f.start_db().await;
        let down_for = down.elapsed();
        let back = f.recovered(&load, 5).await;
        println!(
            "restart {restart} at {:?}: down for {down_for:?}, submissions acknowledged and /readyz 200 {back:?} after",
            started.elapsed()
        );
    }
    let (report, figures) = f.finish(load).await;
    println!(
        "3 restarts in {:?}: {} requests, {:?} answered 503; {figures}",
        started.elapsed(),
        report.requests,
        report.unavailable
    );
}

#[tokio::test]
async fn postgres_stopped_for_60_s_under_load_loses_nothing() {
    // The fault tests' 3 s lease runs out during the outage: the other instance takes over items
    // whose results the first one holds in memory, and those late results are dropped.
    let f = Fixture::start("stopped").await;
    let load = Load::start(&f.ports(), "pg-stopped", SHAPE);
    load.wait_acked(20, Duration::from_secs(30), &|| f.logs()).await;
    fan_out_under_way(&f.http, f.instances[0].port, &|| f.logs()).await;
    let sent_before = f.nodes.executions();

    f.stop_db().await;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Answers to what was committed before the stop have arrived by now.
    let (refused_early, acked_early) = (load.unavailable(), load.acked());
    let mut not_ready = Vec::new();
    for port in f.ports() {
        not_ready.push(f.readyz(port).await);
    }
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(down.elapsed())).await;
    let (acked_down, refused) = (load.acked() - acked_early, load.unavailable());
    f.start_db().await;
    let down_for = down.elapsed();
    let back = f.recovered(&load, 20).await;

    assert_eq!(not_ready, [503, 503], "/readyz answers 503 while the database is down");
    assert!(refused_early > 0, "submissions were refused with 503 within 5 s of the stop\n{}", f.logs());
    assert_eq!(acked_down, 0, "nothing was acknowledged from 5 s after the stop until the start");
    let (report, figures) = f.finish(load).await;
    println!(
        "down for {down_for:?} ({} purges sent before): {refused} submissions refused with 503 ({:?}), none \
         acknowledged; submissions acknowledged and /readyz 200 {back:?} after the start; {} requests in all; {figures}",
        sent_before, report.unavailable, report.requests
    );
}
