//! The `kill -9` soak: the server is killed at random moments while tasks are submitted
//! continuously (Baishan, native with an `Idempotency-Key`, Baidu GEO, in turn) and purged on two
//! real Varnish nodes, then started again on the same store. At the end every promise of
//! `faults::check_promises` is checked: every acknowledged task is stored with all its items, every
//! item is completed (each node answered a purge of it by its `finished_at`), no item was executed
//! after it was final (no purge of its URL reached a node after its `finished_at`, seen by the
//! recording proxy in front of each node), no item is duplicated.
//!
//! Size: `CACHECTL_SOAK_KILLS` kills (5 by default, the size CI runs; the hardening issue's full
//! size is 20: `CACHECTL_SOAK_KILLS=20 cargo test -p cachectl --test e2e soak -- --nocapture`,
//! with plain `cargo test` since nextest's slow-timeout in `.config/nextest.toml` ends a test after
//! two minutes). `CACHECTL_FAULT_SEED` replays a run's random moments.

use crate::faults::*;
use crate::support::*;
use cachectl_testkit::PgCluster;
use std::time::{Duration, Instant};

fn kills() -> u64 {
    env_number("CACHECTL_SOAK_KILLS", 10)
}

#[tokio::test]
async fn kill_9_soak_on_sqlite() {
    let kills = kills();
    let mut rng = Rng::from_env();
    let nodes = Nodes::start(LATENCY).await;
    let mut server = Cachectl::start(&format!("{}{}{}", accounts(), worker(), nodes.edges())).await;
    nodes.watch(&[server.port]);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let load = Load::start(&[server.port], "soak-sqlite", SHAPE);
    let started = Instant::now();

    for kill in 1..=kills {
        let context = || tail(&server.log());
        load.wait_acked(1, Duration::from_secs(20), &context).await;
        tokio::time::sleep(rng.millis(200..2500)).await;
        fan_out_under_way(&http, server.port, &context).await;
        let (acked, sent) = (load.acked(), nodes.executions());
        server.kill9();
        println!("kill {kill}/{kills} at {:?}: {acked} tasks acknowledged, {sent} purges sent", started.elapsed());
        tokio::time::sleep(rng.millis(0..500)).await;
        server.restart().await;
    }
    load.wait_acked(1, Duration::from_secs(20), &|| tail(&server.log())).await;
    let report = load.stop().await;
    let context = || tail(&server.log());
    wait_all_final(&http, server.port, Duration::from_secs(60), &context).await;

    assert!(report.unexpected.is_empty(), "answers other than success or the dialect's 503: {:?}", report.unexpected);
    let figures = check_promises(server.port, &report, &nodes, &context).await;
    assert!(!server.log().contains("panicked"), "{}", server.log());
    println!(
        "{kills} kills in {:?}: {} requests ({} without an answer, {:?} 503s); {figures}",
        started.elapsed(),
        report.requests,
        report.no_answer,
        report.unavailable
    );
    assert!(figures.items_sent_again > 0, "some kill lost answers that had to be sent again: {figures:?}");
}

#[tokio::test]
async fn kill_9_soak_on_postgres_with_three_instances() {
    let kills = kills();
    let mut rng = Rng::from_env();
    let pg = PgCluster::start();
    let db = pg.database("soak").await;
    let nodes = Nodes::start(LATENCY).await;
    let config = format!("{}{}{}", accounts(), worker(), nodes.edges());
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Cachectl::start_on_store(Some(&db), &config).await);
    }
    let ports: Vec<u16> = instances.iter().map(|i| i.port).collect();
    nodes.watch(&ports);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let load = Load::start(&ports, "soak-pg", SHAPE);
    let started = Instant::now();
    let logs = |instances: &[Cachectl]| {
        instances.iter().enumerate().map(|(i, s)| format!("--- instance {i}:\n{}", tail(&s.log()))).collect::<String>()
    };

    for kill in 1..=kills {
        let victim = usize::try_from(rng.below(0..3)).unwrap();
        let witness = ports[(victim + 1) % 3];
        {
            let context = || logs(&instances);
            load.wait_acked(1, Duration::from_secs(20), &context).await;
            tokio::time::sleep(rng.millis(200..2500)).await;
            fan_out_under_way(&http, witness, &context).await;
        }
        let (acked, sent) = (load.acked(), nodes.executions());
        instances[victim].kill9();
        println!(
            "kill {kill}/{kills} of instance {victim} at {:?}: {acked} tasks acknowledged, {sent} purges sent",
            started.elapsed()
        );
        tokio::time::sleep(rng.millis(0..1000)).await;
        instances[victim].restart().await;
    }
    load.wait_acked(1, Duration::from_secs(20), &|| logs(&instances)).await;
    let report = load.stop().await;
    let context = || logs(&instances);
    // A killed instance's items wait for their lease (3 s) to be taken over.
    wait_all_final(&http, ports[0], Duration::from_secs(60), &context).await;

    assert!(report.unexpected.is_empty(), "answers other than success or the dialect's 503: {:?}", report.unexpected);
    let figures = check_promises(ports[0], &report, &nodes, &context).await;
    for (i, instance) in instances.iter().enumerate() {
        assert!(!instance.log().contains("panicked"), "instance {i}:\n{}", instance.log());
    }
    println!(
        "{kills} kills in {:?}: {} requests ({} without an answer, {:?} 503s); {figures}",
        started.elapsed(),
        report.requests,
        report.no_answer,
        report.unavailable
    );
    assert!(figures.items_sent_again > 0, "some kill lost answers that had to be sent again: {figures:?}");
}
