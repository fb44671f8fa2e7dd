//! Both transports of purges and bans (`[worker] edge_transport`: the pipelined lane and the
//! plain reqwest pool) against real caches: Varnish 7.1 and nginx 1.22 with Debian's cache-purge
//! module, each running the project's shipped configuration (`deploy/`) in front of an origin,
//! started by `cachectl_testkit::caches` on 127.0.0.1 with free ports and stopped with the test.
//! Every test runs once per transport, as `pipelined::NAME` and `plain::NAME`, through
//! `EdgeClient::execute`, so that the driver's plan and `classify` are part of what is checked.

use cachectl_core::{ItemType, Kind, Tier};
use cachectl_edge::{ClientSettings, Driver, EdgeClient, Node, NodeTransport, Outcome, TransportKind};
use cachectl_testkit::caches::{Nginx, Origin, Varnish, cache_status};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

#[macro_use]
mod common;

on_both_transports!(
    a_varnish_purge_turns_a_hit_into_a_miss,
    a_varnish_ban_evicts_the_directory_and_nothing_else,
    an_nginx_purge_evicts_and_a_purge_of_an_uncached_url_succeeds,
    purges_survive_nginx_closing_its_connections,
    an_unreachable_node_is_retried_with_an_error_naming_its_address,
);

const HOST: &str = "www.example.com";
/// Requests in flight per node, as `[worker] per_node_concurrency`; pipelined 4 deep (2
/// connections) on the lane.
const PER_NODE: usize = 8;

/// A node of `driver` at `address` and the `kind` transport to it, as the worker builds them.
fn node(kind: TransportKind, driver: Driver, address: &str) -> (EdgeClient, Node, NodeTransport) {
    let client = EdgeClient::new(ClientSettings {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        per_node: PER_NODE,
        pipeline_depth: 4,
        transport: kind,
        purge_batch: 8,
    })
    .unwrap();
    let node = Node { name: "n1".into(), driver, address: address.into(), tier: Tier::Edge, domains: vec![] };
    let transport = client.transport(&node);
    (client, node, transport)
}

/// A refresh of `url` (`item_type`) on the node, once.
async fn refresh(edge: &(EdgeClient, Node, NodeTransport), item_type: ItemType, path: &str) -> Outcome {
    let (client, node, transport) = edge;
    client.execute(node, transport, Kind::Refresh, item_type, &format!("http://{HOST}{path}")).await
}

/// Asks the cache for `path` twice; the second answer must be a hit.
async fn cached(address: &str, host: &str, path: &str) {
    cache_status(address, host, path).await;
    assert_eq!(cache_status(address, host, path).await, "HIT", "{host}{path} is cached");
}

async fn a_varnish_purge_turns_a_hit_into_a_miss(kind: TransportKind) {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let edge = node(kind, Driver::Varnish, &varnish.address());
    for path in ["/a.css", "/b.css?v=1"] {
        cached(&varnish.address(), HOST, path).await;
    }

    assert_eq!(refresh(&edge, ItemType::Url, "/b.css?v=1").await, Outcome::Success { code: 200 });

    assert_eq!(cache_status(&varnish.address(), HOST, "/b.css?v=1").await, "MISS");
    assert_eq!(cache_status(&varnish.address(), HOST, "/a.css").await, "HIT", "only the named URL is evicted");
    assert_eq!(origin.count(HOST, "/b.css?v=1"), 2, "the GET after the purge went to the origin");
}

async fn a_varnish_ban_evicts_the_directory_and_nothing_else(kind: TransportKind) {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let edge = node(kind, Driver::Varnish, &varnish.address());
    let inside = [(HOST, "/static/a.js"), (HOST, "/static/deep/b.png?x=1")];
    let outside = [
        (HOST, "/staticfile"), // shares the prefix without the slash
        (HOST, "/other/static/a.js"),
        ("img.example.com", "/static/a.js"), // same path, another host on the same node
        (HOST, "/static.x/a"),               // '.' must not act as a regex wildcard
    ];
    for (host, path) in inside.iter().chain(&outside) {
        cached(&varnish.address(), host, path).await;
    }

    assert_eq!(refresh(&edge, ItemType::Dir, "/static/").await, Outcome::Success { code: 200 });

    // A request checks the ban list itself: the answer is a miss before the ban lurker ran.
    for (host, path) in inside {
        assert_eq!(cache_status(&varnish.address(), host, path).await, "MISS", "{host}{path}");
    }
    for (host, path) in outside {
        assert_eq!(cache_status(&varnish.address(), host, path).await, "HIT", "{host}{path}");
    }
}

async fn an_nginx_purge_evicts_and_a_purge_of_an_uncached_url_succeeds(kind: TransportKind) {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 1).await;
    let edge = node(kind, Driver::Nginx, &nginx.address(0));
    cached(&nginx.address(0), HOST, "/n.css?v=2").await;
    cached(&nginx.address(0), HOST, "/keep.css").await;

    assert_eq!(refresh(&edge, ItemType::Url, "/n.css?v=2").await, Outcome::Success { code: 200 });
    // The cache-purge module answers 404 for a URL it does not hold: nothing to evict, done.
    assert_eq!(refresh(&edge, ItemType::Url, "/never-cached").await, Outcome::Success { code: 404 });

    assert_eq!(cache_status(&nginx.address(0), HOST, "/n.css?v=2").await, "MISS");
    assert_eq!(cache_status(&nginx.address(0), HOST, "/keep.css").await, "HIT", "only the named URL is evicted");
    let purges: Vec<String> = nginx.access_log().into_iter().filter(|l| l.2 == "PURGE").map(|l| l.4).collect();
    assert_eq!(purges, ["/n.css?v=2", "/never-cached"], "each purge reached nginx once");
}

/// nginx closes a kept-alive connection after `keepalive_requests` (here 7) answers, announcing
/// it on the last. 100 purges, at most `PER_NODE` in flight (the worker's per-node semaphore):
/// every one succeeds at its first attempt. The plain transport writes each once; the lane writes
/// again what was pipelined behind a close, and a purge whose answer a reset lost may be done
/// twice (harmless, and rare).
async fn purges_survive_nginx_closing_its_connections(kind: TransportKind) {
    let origin = Origin::start().await;
    let nginx = Nginx::start_with(origin.port, &[cachectl_testkit::free_port()], "keepalive_requests 7;").await;
    let edge = Arc::new(node(kind, Driver::Nginx, &nginx.address(0)));
    cached(&nginx.address(0), HOST, "/p/0.css").await;
    let permits = Arc::new(Semaphore::new(PER_NODE));

    let purges = (0..100).map(|i| {
        let (edge, permits) = (edge.clone(), permits.clone());
        tokio::spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            refresh(&edge, ItemType::Url, &format!("/p/{i}.css")).await
        })
    });
    let outcomes: Vec<Outcome> = futures::future::join_all(purges).await.into_iter().map(Result::unwrap).collect();

    assert_eq!(outcomes[0], Outcome::Success { code: 200 }, "the cached one was purged");
    assert!(outcomes[1..].iter().all(|o| o == &Outcome::Success { code: 404 }), "{outcomes:?}");
    assert_eq!(cache_status(&nginx.address(0), HOST, "/p/0.css").await, "MISS");
    let purged: Vec<String> = nginx.access_log().into_iter().filter(|l| l.2 == "PURGE").map(|l| l.4).collect();
    let distinct: std::collections::HashSet<&String> = purged.iter().collect();
    assert_eq!(distinct.len(), 100, "every URL was purged");
    match kind {
        TransportKind::Plain => assert_eq!(purged.len(), 100, "the plain transport writes a purge once"),
        TransportKind::Pipelined => assert!(purged.len() <= 105, "{} purges for 100 URLs", purged.len()),
    }
}

/// A port nobody listens on, and a Varnish node stopped after it answered (the transport holds
/// a kept-alive connection to it): purges and bans are retried, the error naming the address.
async fn an_unreachable_node_is_retried_with_an_error_naming_its_address(kind: TransportKind) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let edge = node(kind, Driver::Varnish, &address);
    for (item_type, path) in [(ItemType::Url, "/a.css"), (ItemType::Dir, "/static/")] {
        match refresh(&edge, item_type, path).await {
            Outcome::Retry { code: None, error } => {
                assert!(error.starts_with("connect error:") && error.contains(&address), "{error}");
            }
            other => panic!("{item_type:?} {path}: {other:?}"),
        }
    }

    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let address = varnish.address();
    let edge = node(kind, Driver::Varnish, &address);
    assert_eq!(refresh(&edge, ItemType::Url, "/a.css").await, Outcome::Success { code: 200 });
    drop(varnish);
    match refresh(&edge, ItemType::Url, "/a.css").await {
        Outcome::Retry { code: None, error } => assert!(error.contains(&address), "{error}"),
        other => panic!("a purge on a stopped node: {other:?}"),
    }
}

/// Purges `paths` on `edge` all at once (pipelined: they wait together and leave in batches)
/// and returns their outcomes.
async fn purge_at_once(edge: &Arc<(EdgeClient, Node, NodeTransport)>, paths: &[String]) -> Vec<Outcome> {
    let sends: Vec<_> = paths
        .iter()
        .map(|path| {
            let (edge, path) = (edge.clone(), path.clone());
            tokio::spawn(async move { refresh(&edge, ItemType::Url, &path).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for send in sends {
        outcomes.push(send.await.unwrap());
    }
    outcomes
}

/// Caches `purged` and `kept` paths on `varnish`, purges `purged` at once through the lane, and
/// checks that exactly those were evicted; returns how many requests Varnish received for them.
async fn batched_purge_evicts_exactly(varnish: &Varnish, origin: &Origin, purged: usize) -> u64 {
    let address = varnish.address();
    let paths: Vec<String> = (0..purged).map(|i| format!("/batch/{i}.css?v=1")).collect();
    let kept = [(HOST, "/batch/kept.css"), ("img.example.com", "/batch/0.css?v=1")];
    for path in &paths {
        cached(&address, HOST, path).await;
    }
    for (host, path) in kept {
        cached(&address, host, path).await;
    }
    let edge = Arc::new(node(TransportKind::Pipelined, Driver::Varnish, &address));
    // A worker thread adds its counters to varnishstat's once its connection is idle.
    let settled = || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        varnish.counter("MAIN.client_req")
    };
    let before = settled().await;
    let outcomes = purge_at_once(&edge, &paths).await;
    let requests = settled().await - before;
    assert!(outcomes.iter().all(|o| *o == Outcome::Success { code: 200 }), "{outcomes:?}");
    for path in &paths {
        assert_eq!(cache_status(&address, HOST, path).await, "MISS", "{path} was purged");
        assert_eq!(origin.count(HOST, path), 2, "the GET after the purge of {path} went to the origin");
    }
    for (host, path) in kept {
        assert_eq!(cache_status(&address, host, path).await, "HIT", "{host}{path} stays");
    }
    requests
}

/// The shipped VCL purges every path of a batched request (`X-Cachectl-Next`), and only those:
/// 40 purges sent at once reach Varnish in far fewer requests.
#[tokio::test]
async fn batched_purges_evict_exactly_their_urls_on_varnish() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let requests = batched_purge_evicts_exactly(&varnish, &origin, 40).await;
    assert!(requests <= 20, "40 purges came in {requests} requests: batched");
}

/// varnishd with `max_restarts` below the batch stops a batch with a 503 that says how many
/// paths it purged; the lane sends the others again, in batches that fit.
#[tokio::test]
async fn a_varnish_allowing_fewer_restarts_than_the_batch_still_gets_every_purge() {
    let origin = Origin::start().await;
    let varnish = Varnish::start_custom(&Varnish::shipped_vcl(origin.port), &["max_restarts=2"]).await;
    let requests = batched_purge_evicts_exactly(&varnish, &origin, 30).await;
    assert!(requests < 30, "30 purges came in {requests} requests: batched by three at most");
}

/// A VCL without cachectl's `vcl_purge` purges a batched request's own path and ignores the
/// others: the lane sends those again one a request, and every purge is done.
#[tokio::test]
async fn a_varnish_without_the_batch_vcl_still_gets_every_purge() {
    let origin = Origin::start().await;
    let shipped = Varnish::shipped_vcl(origin.port);
    let start = shipped.find("sub vcl_purge {").expect("the shipped VCL has a vcl_purge");
    let end = start + shipped[start..].find("\n}\n").expect("its end") + 3;
    let without = format!("{}{}", &shipped[..start], &shipped[end..]);
    let varnish = Varnish::start_custom(&without, &[]).await;
    let requests = batched_purge_evicts_exactly(&varnish, &origin, 30).await;
    assert!(requests >= 30, "every path had a request of its own ({requests})");
}
