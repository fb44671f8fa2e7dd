//! The control plane's publisher against a real NATS JetStream server (started here on a free
//! port): while an agent that is up still has published commands to apply, the commands that
//! come meanwhile are held and leave together, as one message, as soon as it answers — not one
//! message per command. The agent is played by this test (a heartbeat, then answers), so that
//! when it answers is decided here.

use async_nats::jetstream;
use cachectl_bus::protocol::{self, Answer, Batch, Heartbeat, Results};
use cachectl_core::{ItemType, Kind, Tier, Timestamp};
use cachectl_server::bus::Bus;
use cachectl_server::config::BusSettings;
use cachectl_testkit::nats::Nats;
use futures::StreamExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn settings(url: String, batch: usize, hold: Duration) -> BusSettings {
    BusSettings {
        url,
        streams: protocol::StreamSettings { replicas: 1, max_age: Duration::from_secs(120), max_bytes: 64 << 20 },
        command_batch: batch,
        command_hold: hold,
        stale_after: Duration::from_secs(30),
        down_after: Duration::from_secs(60),
    }
}

fn far_deadline() -> Timestamp {
    Timestamp::from_millis(i64::MAX / 2)
}

/// Heartbeats as agent `node` every 200 ms until the returned token is cancelled.
fn heartbeat(client: async_nats::Client, node: &'static str) -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let beat = Heartbeat {
                node: node.to_owned(),
                tier: Tier::Edge,
                driver: cachectl_edge::Driver::Varnish,
                domains: Vec::new(),
                version: "test".into(),
                lag: 0,
                in_flight: 0,
                sent_at: 0,
            };
            let _ = client.publish(protocol::heartbeat_subject(node), serde_json::to_vec(&beat).unwrap().into()).await;
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
    stop
}

async fn wait_up(bus: &Bus, node: &str) {
    let start = std::time::Instant::now();
    while !bus.is_up(node) {
        assert!(start.elapsed() < Duration::from_secs(10), "the agent never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Command stream `shard`, once the control plane (in the background) created it.
async fn command_stream(js: &jetstream::Context, shard: usize) -> jetstream::stream::Stream {
    loop {
        if let Ok(s) = js.get_stream(protocol::command_stream(shard)).await {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every command message, of every shard.
type Messages = futures::stream::SelectAll<jetstream::consumer::pull::Stream>;

/// Reads every command message of every shard.
async fn command_messages(js: &jetstream::Context) -> Messages {
    let mut all = Vec::new();
    for shard in 0..protocol::COMMAND_SHARDS {
        let consumer = command_stream(js, shard)
            .await
            .create_consumer(jetstream::consumer::pull::Config::default())
            .await
            .unwrap();
        all.push(consumer.messages().await.unwrap());
    }
    futures::stream::select_all(all)
}

/// Where the answers of one command sent to one node arrive.
type Answers = tokio::sync::mpsc::UnboundedReceiver<(usize, Answer)>;

/// Asserts that the answer of each command (each sent to one node) comes, and says the command
/// was applied.
async fn assert_all_ok(sent: Vec<(String, Answers)>) {
    for (_, mut answers) in sent {
        let (index, answer) = tokio::time::timeout(Duration::from_secs(10), answers.recv()).await.unwrap().unwrap();
        assert!(index == 0 && answer.ok, "{answer:?}");
    }
}

/// The next command message, or `None` if none comes within `wait`.
async fn next_batch(messages: &mut Messages, wait: Duration) -> Option<Batch> {
    let message = tokio::time::timeout(wait, messages.next()).await.ok()?.unwrap().unwrap();
    message.ack().await.unwrap();
    Some(serde_json::from_slice(&message.payload).unwrap())
}

/// `node`'s results for every command of `batch` (each applied), as its agent sends them;
/// `ack` is the acknowledgement subject of the command message they answer, if any.
fn results(node: &str, batch: &Batch) -> Vec<u8> {
    let answers = batch
        .commands
        .iter()
        .map(|c| Answer { id: c.id.clone(), ok: true, code: Some(200), error: None, evicted: None, attempts: 1 })
        .collect();
    serde_json::to_vec(&Results { node: node.to_owned(), answers }).unwrap()
}

/// Sends `node`'s results for `batch` (whose message the test's consumer acknowledged itself).
async fn answer(js: &jetstream::Context, node: &str, batch: &Batch) {
    js.client().publish(batch.reply.clone(), results(node, batch).into()).await.unwrap();
}

#[tokio::test]
async fn commands_for_a_busy_agent_are_held_and_leave_together_once_it_answers() {
    let nats = Nats::start().await;
    let shutdown = CancellationToken::new();
    // A quarter of the batch of 8: an agent with 2 published commands unanswered is busy. The
    // hold is far longer than this test waits, so only the answer can release what is held.
    let bus =
        Bus::start(settings(nats.url(), 8, Duration::from_secs(60)), "flow-test", &["a".to_owned()], shutdown.clone())
            .await
            .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let beating = heartbeat(client.clone(), "a");
    wait_up(&bus, "a").await;
    let mut messages = command_messages(&js).await;

    let send = |i: usize| {
        bus.send(&["a"], Kind::Refresh, ItemType::Url, &format!("http://www.example.com/{i}"), false, far_deadline())
    };
    // Two commands to an idle agent leave at once.
    let first = vec![send(0), send(1)];
    let mut published = Vec::new();
    while published.iter().map(|b: &Batch| b.commands.len()).sum::<usize>() < 2 {
        published.push(next_batch(&mut messages, Duration::from_secs(10)).await.expect("the first commands were held"));
    }
    // Now the agent has 2 to apply: five more, sent one by one, are held.
    let mut later = Vec::new();
    for i in 2..7 {
        later.push(send(i));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(next_batch(&mut messages, Duration::from_secs(1)).await.is_none(), "sent while the agent was busy");
    assert_eq!(bus.in_flight("a"), 7);
    // The agent answers the first two: what was held goes out, as one message.
    for batch in &published {
        answer(&js, "a", batch).await;
    }
    assert_all_ok(first).await;
    let held = next_batch(&mut messages, Duration::from_secs(10)).await.expect("the held commands never left");
    let targets: Vec<&str> = held.commands.iter().map(|c| c.target.as_str()).collect();
    assert_eq!(
        targets,
        (2..7).map(|i| format!("http://www.example.com/{i}")).collect::<Vec<_>>(),
        "the held commands leave together, in order"
    );
    assert_eq!(held.nodes, vec!["a".to_owned()]);
    answer(&js, "a", &held).await;
    assert_all_ok(later).await;
    assert_eq!(bus.in_flight("a"), 0);
    beating.cancel();
    shutdown.cancel();
}

#[tokio::test]
async fn nothing_is_held_for_a_down_agent_and_a_stuck_one_holds_commands_only_for_command_hold() {
    let nats = Nats::start().await;
    let shutdown = CancellationToken::new();
    let nodes = ["up".to_owned(), "away".to_owned()];
    let bus = Bus::start(settings(nats.url(), 8, Duration::from_millis(1500)), "flow-test-2", &nodes, shutdown.clone())
        .await
        .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut messages = command_messages(&js).await;
    let send = |nodes: &[&str], i: usize| {
        bus.send(nodes, Kind::Refresh, ItemType::Url, &format!("http://www.example.com/{i}"), false, far_deadline())
    };
    // "away" never heartbeats: however many of its commands are unanswered, each leaves at once.
    let mut seen = 0;
    for i in 0..6 {
        let _pending = send(&["away"], i);
        let batch = next_batch(&mut messages, Duration::from_secs(10)).await.expect("held for a down agent");
        seen += batch.commands.len();
    }
    assert_eq!(seen, 6);
    assert_eq!(bus.in_flight("away"), 6);
    // "up" heartbeats but never answers: once it has 2 unanswered, the next are held for
    // command_hold (1.5 s), then leave together.
    let beating = heartbeat(client.clone(), "up");
    wait_up(&bus, "up").await;
    let _first = (send(&["up"], 10), send(&["up"], 11));
    let mut got = 0;
    while got < 2 {
        got += next_batch(&mut messages, Duration::from_secs(10)).await.expect("sent to an idle agent").commands.len();
    }
    let held_at = std::time::Instant::now();
    let _later = (send(&["up"], 12), send(&["up"], 13), send(&["up"], 14));
    let held = next_batch(&mut messages, Duration::from_secs(10)).await.expect("held past command_hold");
    assert!(held_at.elapsed() >= Duration::from_millis(1200), "left after {:?}", held_at.elapsed());
    assert_eq!(held.commands.len(), 3, "{held:?}");
    beating.cancel();
    shutdown.cancel();
}

/// Results acknowledge the command message they answer (the instance does it on the agent's
/// behalf, on the subject the agent names); unreadable ones bring the message back a second
/// later; an acknowledgement subject that is not JetStream's, or not the answering node's, is
/// never published to.
#[tokio::test]
async fn results_acknowledge_their_command_message_and_unreadable_ones_bring_it_back() {
    let nats = Nats::start().await;
    let shutdown = CancellationToken::new();
    let bus = Bus::start(settings(nats.url(), 8, Duration::ZERO), "receipts", &["a".to_owned()], shutdown.clone())
        .await
        .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = command_stream(&js, protocol::command_shard("a")).await;
    // As an agent's consumer, with an acknowledgement wait far longer than the test.
    let mut consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("a".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut next =
        async || tokio::time::timeout(Duration::from_secs(10), messages.next()).await.unwrap().unwrap().unwrap();
    let (_, mut answers) =
        bus.send(&["a"], Kind::Refresh, ItemType::Url, "http://www.example.com/r", false, far_deadline());
    let first = next().await;
    let batch: Batch = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(batch.reply, protocol::result_subject("receipts"));
    let ack_subject = first.reply.clone().unwrap().to_string();
    let with_ack = |subject: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(protocol::ACK_HEADER, subject);
        headers
    };

    // Unreadable results: nothing answered, and the message comes again about a second later.
    let sent_at = std::time::Instant::now();
    client.publish_with_headers(batch.reply.clone(), with_ack(&ack_subject), "not json".into()).await.unwrap();
    let again = next().await;
    assert!(sent_at.elapsed() >= Duration::from_millis(800), "back after {:?}", sent_at.elapsed());
    let (info, first_info) = (again.info().unwrap(), first.info().unwrap());
    assert_eq!((info.stream_sequence, info.delivered), (first_info.stream_sequence, 2));
    assert!(answers.try_recv().is_err());

    // Results naming a subject that is not an acknowledgement: answered, nothing published there.
    let mut elsewhere = client.subscribe("cachectl.elsewhere").await.unwrap();
    client.flush().await.unwrap();
    client
        .publish_with_headers(batch.reply.clone(), with_ack("cachectl.elsewhere"), results("a", &batch).into())
        .await
        .unwrap();
    let (index, got) = tokio::time::timeout(Duration::from_secs(10), answers.recv()).await.unwrap().unwrap();
    assert!(index == 0 && got.ok && got.code == Some(200), "{got:?}");
    assert_eq!(bus.in_flight("a"), 0);
    assert!(tokio::time::timeout(Duration::from_millis(300), elsewhere.next()).await.is_err());

    // The agent's results, naming the message's acknowledgement subject: the message is
    // acknowledged (the answer itself is dropped: nobody waits for it any more).
    let ack_again = again.reply.clone().unwrap().to_string();
    // Another node's results naming a's acknowledgement subject acknowledge nothing.
    client.publish_with_headers(batch.reply.clone(), with_ack(&ack_again), results("b", &batch).into()).await.unwrap();
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(consumer.info().await.unwrap().num_ack_pending, 1, "acknowledged by another node's results");
    client.publish_with_headers(batch.reply.clone(), with_ack(&ack_again), results("a", &batch).into()).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.ack_floor.stream_sequence == first_info.stream_sequence {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never acknowledged: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
}
