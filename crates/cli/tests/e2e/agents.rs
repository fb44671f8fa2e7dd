//! The bus path: `cachectl agent` beside real Varnish and nginx caches, commands and results
//! through a real NATS JetStream server, all started here on free ports: nginx directory, regex
//! and tag purges done in the cache directory, Varnish through the bus beside a direct node,
//! an agent away and back, NATS restarted mid-run, an agent nobody configured, an unreadable
//! message dead-lettered, and the agent's configuration errors.

use crate::support::*;
use cachectl_testkit::nats::Nats;
use futures::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running `cachectl agent`.
struct Agent {
    dir: tempfile::TempDir,
    proc: Option<cachectl_testkit::Group>,
}

impl Agent {
    /// An agent named `name` for the cache at `address`, configured by `extra` TOML lines.
    async fn start(nats: &Nats, name: &str, driver: &str, address: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[agent]\nname = \"{name}\"\ndriver = \"{driver}\"\naddress = \"{address}\"\nnats_url = \"{}\"\n\
             heartbeat_interval = \"300ms\"\nretry_initial = \"50ms\"\nretry_max = \"300ms\"\n{extra}\n",
            nats.url()
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        let mut agent = Self { dir, proc: None };
        agent.restart();
        agent
    }

    fn restart(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        let child = cachectl_testkit::Group::spawn(
            Command::new(env!("CARGO_BIN_EXE_cachectl"))
                .args(["agent", "--config"])
                .arg(self.dir.path().join("agent.toml"))
                .env("CACHECTL_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap();
        self.proc = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

/// The TOML of a node reached through the bus.
fn bus_edge(name: &str, driver: &str, tier: &str) -> String {
    format!("[[edges]]\nname = \"{name}\"\ndriver = \"{driver}\"\ntransport = \"nats\"\ntier = \"{tier}\"\n\n")
}

fn bus(nats: &Nats) -> String {
    format!("[bus]\nurl = \"{}\"\nstale_after = \"1s\"\ndown_after = \"3s\"\n\n", nats.url())
}

/// Waits (5 s at most) until task `id`'s first item, still processing, says it waits for the
/// agent of `node`.
async fn wait_waiting_note(server: &Cachectl, id: i64, node: &str) {
    let start = Instant::now();
    let note = format!("waiting for agent {node} (last seen ");
    loop {
        let detail = task(server, id).await;
        let item = &detail["items"][0];
        if item["reason"].as_str().is_some_and(|r| r.starts_with(&note)) {
            assert_eq!(item["status"], "processing", "{detail}");
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no waiting reason: {detail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits a native task and waits until it is final.
async fn run_task(server: &Cachectl, body: Value, timeout: Duration) -> Value {
    let id = submit(server, body).await;
    wait_task(server, id, timeout).await
}

async fn submit(server: &Cachectl, body: Value) -> i64 {
    let response = server.http.post(server.url("/api/v1/tasks")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{answer}");
    answer["task"]["id"].as_i64().unwrap()
}

async fn task(server: &Cachectl, id: i64) -> Value {
    let response = server.http.get(server.url(&format!("/api/v1/tasks/{id}"))).bearer_auth(TOKEN).send().await.unwrap();
    response.json().await.unwrap()
}

async fn wait_task(server: &Cachectl, id: i64, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let detail = task(server, id).await;
        if detail["task"]["state"] != "running" {
            return detail;
        }
        assert!(start.elapsed() < timeout, "task {id} still running: {detail}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the control plane lists `node` with `state`.
async fn wait_node_state(server: &Cachectl, node: &str, state: &str) -> Value {
    let start = Instant::now();
    loop {
        let response = server.http.get(server.url("/api/v1/nodes")).bearer_auth(TOKEN).send().await.unwrap();
        let list: Value = response.json().await.unwrap();
        if let Some(n) = list["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node)
            && n["state"] == state
        {
            return n.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{node} never {state}: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test]
async fn nginx_directory_regex_and_tag_purges_through_the_agent() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 1).await;
    let nats = Nats::start().await;
    let _agent = Agent::start(
        &nats,
        "n1",
        "nginx",
        &nginx.address(0),
        &format!("cache_path = \"{}\"", nginx.cache_path(0).display()),
    )
    .await;
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{}{}{}", fast_worker("20s"), bus(&nats), bus_edge("n1", "nginx", "edge")))
            .await;
    let address = nginx.address(0);
    let gone_by_dir = [("www.example.com", "/d/a"), ("www.example.com", "/d/b/c?x=1")];
    let gone_by_regex = [("www.example.com", "/r/1.jpg")];
    let gone_by_tag = [("www.example.com", "/t/1?skey=p-1+all"), ("www.example.com", "/t/2?ctag=x,p-1")];
    let kept = [
        ("www.example.com", "/dx"),
        ("img.example.com", "/d/a"),
        ("img.example.com", "/r/1.jpg"),
        ("www.example.com", "/r/2.png"),
        ("www.example.com", "/t/3?skey=p-10"),
        ("other.test", "/t/1?skey=p-1"),
    ];
    let all: Vec<_> = gone_by_dir.iter().chain(&gone_by_regex).chain(&gone_by_tag).chain(&kept).collect();
    for (host, path) in &all {
        cache_status(&address, host, path).await;
        assert_eq!(cache_status(&address, host, path).await, "HIT", "{host}{path}");
    }
    let files = count_files(&nginx.cache_path(0));
    assert_eq!(files, all.len());

    for body in [
        json!({"type": "dir", "urls": ["http://www.example.com/d/"]}),
        json!({"type": "regex", "host": "www.example.com", "regexes": [r"\.jpg$"]}),
        json!({"type": "tag", "host": "www.example.com", "tags": ["p-1"]}),
    ] {
        let detail = run_task(&server, body, Duration::from_secs(20)).await;
        assert_eq!(detail["task"]["state"], "completed", "{detail}\n{}", server.log());
        let node = &detail["items"][0]["nodes"][0];
        assert_eq!((node["node"].as_str(), node["state"].as_str()), (Some("n1"), Some("succeeded")), "{detail}");
    }
    assert_eq!(count_files(&nginx.cache_path(0)), kept.len());
    for (host, path) in gone_by_dir.iter().chain(&gone_by_regex).chain(&gone_by_tag) {
        let before = origin.count(host, path);
        assert_eq!(cache_status(&address, host, path).await, "MISS", "{host}{path}");
        assert_eq!(origin.count(host, path), before + 1, "{host}{path} refetched once");
        assert_eq!(cache_status(&address, host, path).await, "HIT", "{host}{path} stored again");
    }
    for (host, path) in &kept {
        assert_eq!(cache_status(&address, host, path).await, "HIT", "{host}{path}");
    }
    // A URL purge through the agent is nginx's own PURGE; a soft purge is refused with the reason.
    let detail = run_task(&server, json!({"urls": ["http://www.example.com/dx"]}), Duration::from_secs(20)).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    assert_eq!(cache_status(&address, "www.example.com", "/dx").await, "MISS");
    let detail =
        run_task(&server, json!({"urls": ["http://www.example.com/r/2.png"], "soft": true}), Duration::from_secs(20))
            .await;
    assert_eq!(detail["items"][0]["status"], "failed", "{detail}");
    assert!(detail["items"][0]["reason"].as_str().unwrap().contains("cannot soft-purge"), "{detail}");
}

#[tokio::test]
async fn varnish_through_the_bus_beside_a_direct_node() {
    let origin = Origin::start().await;
    let (v1, v2) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let nats = Nats::start().await;
    let _agent = Agent::start(&nats, "v1", "varnish", &v1.address(), "").await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}{}",
        fast_worker("20s"),
        bus(&nats),
        bus_edge("v1", "varnish", "edge"),
        edge("v2", "varnish", &v2.address(), "edge")
    ))
    .await;
    let objects = [("www.example.com", "/u/1"), ("www.example.com", "/d/1"), ("www.example.com", "/d/2/x")];
    for cache in [&v1, &v2] {
        for (host, path) in objects {
            cache_status(&cache.address(), host, path).await;
        }
    }
    let url = run_task(&server, json!({"urls": ["http://www.example.com/u/1"]}), Duration::from_secs(20)).await;
    let dir =
        run_task(&server, json!({"type": "dir", "urls": ["http://www.example.com/d/"]}), Duration::from_secs(20)).await;
    for detail in [&url, &dir] {
        assert_eq!(detail["task"]["state"], "completed", "{detail}\n{}", server.log());
        let nodes: Vec<&str> =
            detail["items"][0]["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
        assert_eq!(nodes.len(), 2, "{detail}");
        assert!(nodes.contains(&"v1") && nodes.contains(&"v2"), "{detail}");
    }
    for cache in [&v1, &v2] {
        for (host, path) in objects {
            assert_eq!(cache_status(&cache.address(), host, path).await, "MISS", "{}{host}{path}", cache.address());
        }
    }
    // A prefetch through the agent fills v1's cache (and v2's directly).
    let detail =
        run_task(&server, json!({"kind": "prefetch", "urls": ["http://www.example.com/p/9"]}), Duration::from_secs(20))
            .await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    for cache in [&v1, &v2] {
        assert_eq!(cache_status(&cache.address(), "www.example.com", "/p/9").await, "HIT");
    }
}

#[tokio::test]
async fn an_agent_away_catches_up_and_one_away_past_the_deadline_fails_the_item() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let nats = Nats::start().await;
    let mut agent = Agent::start(&nats, "v1", "varnish", &varnish.address(), "").await;
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{}{}{}", fast_worker("8s"), bus(&nats), bus_edge("v1", "varnish", "edge")))
            .await;
    wait_node_state(&server, "v1", "up").await;

    // An agent that falls silent while an item waits for it: the item starts while the agent is
    // up, says whom it waits for once the agent is stale, and completes when it is back.
    cache_status(&varnish.address(), "www.example.com", "/quiet").await;
    agent.proc.as_ref().unwrap().signal(cachectl_testkit::Signal::SIGSTOP);
    let quiet = submit(&server, json!({"urls": ["http://www.example.com/quiet"]})).await;
    wait_waiting_note(&server, quiet, "v1").await;
    agent.proc.as_ref().unwrap().signal(cachectl_testkit::Signal::SIGCONT);
    let detail = wait_task(&server, quiet, Duration::from_secs(15)).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}\n{}", agent.log());
    assert!(detail["items"][0]["reason"].is_null(), "the waiting note is cleared: {detail}");
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/quiet").await, "MISS");

    agent.stop();
    wait_node_state(&server, "v1", "stale").await;

    let paths = ["/away/1", "/away/2", "/away/3"];
    for path in paths {
        cache_status(&varnish.address(), "www.example.com", path).await;
    }
    let ids: Vec<i64> = futures::future::join_all(
        paths.iter().map(|p| submit(&server, json!({"urls": [format!("http://www.example.com{p}")]}))),
    )
    .await;
    // While the agent is away, the item says whom it waits for.
    wait_waiting_note(&server, ids[0], "v1").await;
    agent.restart();
    for id in &ids {
        let detail = wait_task(&server, *id, Duration::from_secs(15)).await;
        assert_eq!(detail["task"]["state"], "completed", "{detail}\n{}", agent.log());
        assert!(detail["items"][0]["reason"].is_null(), "the waiting note is cleared: {detail}");
    }
    for path in paths {
        assert_eq!(cache_status(&varnish.address(), "www.example.com", path).await, "MISS", "{path}");
    }

    // Away past the item's deadline: the item fails naming the agent.
    agent.stop();
    let detail = run_task(&server, json!({"urls": ["http://www.example.com/late"]}), Duration::from_secs(20)).await;
    let item = &detail["items"][0];
    assert_eq!(item["status"], "failed", "{detail}");
    let reason = item["reason"].as_str().unwrap();
    assert!(reason.contains("agent v1 did not answer before the item's deadline (last seen "), "{reason}");
}

#[tokio::test]
async fn nats_restarted_mid_run_loses_nothing_acknowledged() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let mut nats = Nats::start().await;
    let agent = Agent::start(&nats, "v1", "varnish", &varnish.address(), "").await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}",
        fast_worker("40s"),
        bus(&nats),
        bus_edge("v1", "varnish", "edge")
    ))
    .await;
    let mut ids = Vec::new();
    for round in 0..30 {
        if round == 10 {
            nats.stop();
        }
        if round == 20 {
            nats.start_again().await;
        }
        let urls: Vec<String> = (0..5).map(|i| format!("http://www.example.com/nr/{round}/{i}")).collect();
        ids.push(submit(&server, json!({ "urls": urls })).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in ids {
        let detail = wait_task(&server, id, Duration::from_secs(40)).await;
        assert_eq!(detail["task"]["state"], "completed", "{detail}\n{}\n{}", server.log(), nats.log());
        assert_eq!(detail["task"]["counts"]["completed"], 5, "{detail}");
    }
    // The agent's consumer state was in NATS's memory (the default): the restart forgot it, and
    // the agent made it again from the last message it had handled (once at its start, once
    // after the restart).
    let log = agent.log();
    assert_eq!(log.matches("Creating this node's command consumer").count(), 2, "{log}");
    assert!(log.contains("ByStartTime"), "{log}");
}

#[tokio::test]
async fn an_unconfigured_agent_is_listed_and_gets_no_traffic() {
    let origin = Origin::start().await;
    let (v1, stray) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let nats = Nats::start().await;
    let _a1 = Agent::start(&nats, "v1", "varnish", &v1.address(), "").await;
    let _a2 = Agent::start(&nats, "stray", "varnish", &stray.address(), "").await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}",
        fast_worker("20s"),
        bus(&nats),
        bus_edge("v1", "varnish", "edge")
    ))
    .await;
    let listed = wait_node_state(&server, "stray", "up").await;
    assert_eq!(listed["configured"], false, "{listed}");
    let v1_listed = wait_node_state(&server, "v1", "up").await;
    assert_eq!((v1_listed["configured"].as_bool(), v1_listed["transport"].as_str()), (Some(true), Some("nats")));

    for cache in [&v1, &stray] {
        cache_status(&cache.address(), "www.example.com", "/s/1").await;
    }
    let detail = run_task(&server, json!({"urls": ["http://www.example.com/s/1"]}), Duration::from_secs(20)).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    assert_eq!(detail["items"][0]["nodes"].as_array().unwrap().len(), 1, "{detail}");
    assert_eq!(cache_status(&v1.address(), "www.example.com", "/s/1").await, "MISS");
    assert_eq!(cache_status(&stray.address(), "www.example.com", "/s/1").await, "HIT", "the stray agent got traffic");

    // `cachectl nodes` shows both.
    let out = Command::new(env!("CARGO_BIN_EXE_cachectl"))
        .args(["nodes", "--server", &server.url(""), "--token", TOKEN])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let stray_line = text.lines().find(|l| l.starts_with("stray")).unwrap_or_else(|| panic!("{text}"));
    assert!(stray_line.contains("no (no traffic)") && stray_line.contains("up"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("v1") && l.contains("nats") && l.contains("yes")), "{text}");
}

#[tokio::test]
async fn an_unreadable_command_is_dead_lettered_and_the_agent_goes_on() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let nats = Nats::start().await;
    let agent = Agent::start(&nats, "v1", "varnish", &varnish.address(), "").await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}",
        fast_worker("20s"),
        bus(&nats),
        bus_edge("v1", "varnish", "edge")
    ))
    .await;
    wait_node_state(&server, "v1", "up").await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut probe = client.subscribe("cachectl.res.probe").await.unwrap();
    client.flush().await.unwrap();
    let js = async_nats::jetstream::new(client);
    // v1's command subject: the messages below are for its shard.
    let subject = cachectl_bus::protocol::command_subject(cachectl_bus::protocol::command_shard("v1"));
    // A well-formed command for another node first: v1 must leave it alone (no result).
    let elsewhere = json!({"nodes": "n9", "reply": "cachectl.res.probe", "commands": [{"id": "p1",
        "kind": "refresh", "item_type": "url", "target": "http://www.example.com/after", "deadline": i64::MAX}]});
    js.publish(subject.clone(), elsewhere.to_string().into()).await.unwrap().await.unwrap();
    for garbage in [
        // Not v1's to judge: a message for another node with a field v1 does not know.
        &br#"{"nodes":"n9","reply":"cachectl.res.probe","commands":[],"later":1}"#[..],
        b"not json",
        br#"{"nodes":"v1","reply":"cachectl.res.probe","commands":[]}"#,
        br#"{"nodes":"v1","reply":"cachectl.res.probe","commands":[{"id":"x"}]}"#,
        br#"{"nodes":"v1","reply":"elsewhere","commands":[]}"#,
    ] {
        js.publish(subject.clone(), garbage.to_vec().into()).await.unwrap().await.unwrap();
    }
    let stream = js.get_stream("CACHECTL_DEAD").await.unwrap();
    let start = Instant::now();
    let mut dead = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(10), dead.next()).await;
        let message =
            message.unwrap_or_else(|_| panic!("dead letters: {reasons:?}\n{}", agent.log())).unwrap().unwrap();
        reasons.push(message.headers.as_ref().and_then(|h| h.get("Cachectl-Error")).unwrap().to_string());
        assert!(start.elapsed() < Duration::from_secs(15));
    }
    assert!(reasons[0].contains("unreadable command message: expected"), "{reasons:?}");
    assert!(reasons[1].contains("without commands"), "{reasons:?}");
    assert!(reasons[2].contains("missing field `kind`"), "{reasons:?}");
    assert!(reasons[3].contains("is not a results subject"), "{reasons:?}");
    // The agent reads in order: the other node's command came before the dead letters.
    let answered = tokio::time::timeout(Duration::from_millis(300), probe.next()).await;
    assert!(answered.is_err(), "v1 answered for n9: {answered:?}");
    cache_status(&varnish.address(), "www.example.com", "/after").await;
    let detail = run_task(&server, json!({"urls": ["http://www.example.com/after"]}), Duration::from_secs(20)).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
}

#[tokio::test]
async fn an_agent_with_a_bad_configuration_stops_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, key) in [
        ("name = \"n\"\ndriver = \"squid\"\naddress = \"127.0.0.1:1\"", "agent.driver"),
        (
            "name = \"n\"\ndriver = \"nginx\"\naddress = \"127.0.0.1:1\"\ncache_path = \"/nonexistent/cache\"",
            "agent.cache_path",
        ),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("[agent]\n{toml}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cachectl")).args(["agent", "--config"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(key), "{err}");
    }
}

/// A node whose agent is stopped for 30 s while tasks keep coming: when it returns it applies
/// every command that waited for it, each item's result on it is recorded once (one attempt),
/// and every task completes.
#[tokio::test]
async fn an_agent_stopped_for_30_s_during_a_run_applies_everything_once() {
    let origin = Origin::start().await;
    let (v1, v2) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let nats = Nats::start().await;
    let mut agent = Agent::start(&nats, "v1", "varnish", &v1.address(), "").await;
    let _other = Agent::start(&nats, "v2", "varnish", &v2.address(), "").await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}{}",
        fast_worker("90s"),
        bus(&nats),
        bus_edge("v1", "varnish", "edge"),
        bus_edge("v2", "varnish", "edge")
    ))
    .await;
    wait_node_state(&server, "v1", "up").await;
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut stopped = false;
    let mut restarted = false;
    for round in 0.. {
        let elapsed = start.elapsed();
        if elapsed > Duration::from_secs(40) {
            break;
        }
        if !stopped && elapsed > Duration::from_secs(5) {
            agent.stop();
            stopped = true;
        }
        if !restarted && elapsed > Duration::from_secs(35) {
            agent.restart();
            restarted = true;
        }
        let urls: Vec<String> = (0..3).map(|i| format!("http://www.example.com/stop/{round}/{i}")).collect();
        ids.push(submit(&server, json!({ "urls": urls })).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in ids {
        let detail = wait_task(&server, id, Duration::from_secs(60)).await;
        assert_eq!(detail["task"]["state"], "completed", "{detail}\n{}", agent.log());
        for item in detail["items"].as_array().unwrap() {
            let nodes = item["nodes"].as_array().unwrap();
            assert_eq!(nodes.len(), 2, "{item}");
            for node in nodes {
                assert_eq!((node["state"].as_str(), node["attempts"].as_u64()), (Some("succeeded"), Some(1)), "{item}");
            }
        }
    }
}

/// A parent reached through the bus still finishes before its edge (reached directly) is sent
/// anything: nginx logs the parent's PURGE, sent by the agent, before the edge's.
#[tokio::test]
async fn a_parent_through_the_bus_is_purged_before_a_direct_edge() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 2).await;
    let (parent, edge_port) = (nginx.ports[0], nginx.ports[1]);
    let nats = Nats::start().await;
    let _agent = Agent::start(
        &nats,
        "parent-1",
        "nginx",
        &nginx.address(0),
        &format!("cache_path = \"{}\"", nginx.cache_path(0).display()),
    )
    .await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}{}",
        fast_worker("20s"),
        bus(&nats),
        edge("edge-1", "nginx", &nginx.address(1), "edge"),
        bus_edge("parent-1", "nginx", "parent")
    ))
    .await;
    let urls: Vec<String> = (0..10).map(|i| format!("http://www.example.com/tier/{i}")).collect();
    let detail = run_task(&server, json!({ "urls": urls }), Duration::from_secs(20)).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    let log = nginx.access_log();
    for i in 0..10 {
        let uri = format!("/tier/{i}");
        let position = |port: u16| log.iter().position(|l| l.1 == port && l.2 == "PURGE" && l.4 == uri);
        let (p, e) = (position(parent).expect("parent purged"), position(edge_port).expect("edge purged"));
        assert!(p < e, "{uri}: parent purge logged at line {p}, edge purge at line {e}");
    }
}

#[tokio::test]
async fn an_agent_added_through_the_admin_api_takes_commands_at_once_and_drains() {
    let origin = Origin::start().await;
    let (v1, v2) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let nats = Nats::start().await;
    let _agent = Agent::start(&nats, "a1", "varnish", &v2.address(), "").await;
    let keys = tempfile::tempdir().unwrap();
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}{}",
        bus(&nats),
        crate::admin::admin_section(keys.path()),
        fast_worker("20s"),
        edge("v1", "varnish", &v1.address(), "edge")
    ))
    .await;
    let agent = wait_node_state(&server, "a1", "up").await;
    assert_eq!(agent["configured"], false, "heard from, but not trusted with traffic: {agent}");
    let post = reqwest::Method::POST;
    let (status, body) = crate::admin::admin(
        &server,
        post.clone(),
        "/admin/v1/edges",
        Some(json!({"name": "a1", "driver": "varnish", "transport": "nats"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["transport"], "nats");
    let nodes_of = |detail: &Value| -> Vec<(String, String)> {
        let mut nodes: Vec<(String, String)> = detail["items"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["node"].as_str().unwrap().to_owned(), n["state"].as_str().unwrap().to_owned()))
            .collect();
        nodes.sort();
        nodes
    };
    let body = json!({"kind": "refresh", "type": "url", "urls": ["http://www.example.com/live-agent"]});
    let detail = run_task(&server, body, Duration::from_secs(20)).await;
    assert_eq!(
        nodes_of(&detail),
        [("a1".to_owned(), "succeeded".to_owned()), ("v1".to_owned(), "succeeded".to_owned())],
        "the new bus edge took its command without a restart: {detail}"
    );
    let (status, _) = crate::admin::admin(&server, post, "/admin/v1/edges/a1/drain", None).await;
    assert_eq!(status, 200);
    let body = json!({"kind": "refresh", "type": "url", "urls": ["http://www.example.com/after-drain"]});
    let detail = run_task(&server, body, Duration::from_secs(20)).await;
    assert_eq!(
        nodes_of(&detail),
        [("v1".to_owned(), "succeeded".to_owned())],
        "a drained edge takes no new item: {detail}"
    );
}
