//! The control plane's end of the bus: publishes commands in batches to JetStream, one message
//! for every node a batch is for (the agents pick the messages that name their node), hands
//! every agent's result to the execution waiting for it, and keeps the agents' heartbeats (the
//! node inventory). Messages and streams are `cachectl_bus::protocol`'s.
//!
//! Each instance receives its own results (`cachectl.res.<instance>`) and acknowledges each
//! agent's command message on the agent's behalf once it has handed the answers on; results
//! that never arrive (this instance cut from NATS for a moment) leave the message unacknowledged,
//! and JetStream delivers it to the agent again. A result for a command nobody waits for any
//! more (the item's lease moved to another instance, or its deadline passed) is dropped, and
//! acknowledged: the item's record is written only by its lease holder.

use crate::clock::now_ms;
use crate::config::BusSettings;
use async_nats::jetstream;
use cachectl_bus::protocol::{self, Answer, Batch, Command, Heartbeat, Results};
use cachectl_core::{ItemType, Kind, Timestamp};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// An agent's last heartbeat and when this instance received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// What the agent said.
    pub beat: Heartbeat,
    /// When it arrived here.
    pub received_at: Timestamp,
}

/// Whether an agent is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// A heartbeat within `stale_after`.
    Up,
    /// None within `stale_after`.
    Stale,
    /// None within `down_after`, or never.
    Down,
}

impl Health {
    /// `up`, `stale` or `down`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Stale => "stale",
            Self::Down => "down",
        }
    }
}

/// What the bus keeps per node: the commands whose answer has not come back, and its agent's
/// health.
struct Lane {
    in_flight: AtomicU64,
    health: watch::Sender<Health>,
}

/// A command and the nodes it is for, on its way to the publisher.
struct Outgoing {
    nodes: Arc<[String]>,
    command: Command,
}

/// Who waits for a command's answers: the nodes that have not answered (name → their index in
/// the command's node list) and where the answers go.
struct Waiting {
    nodes: HashMap<Box<str>, usize>,
    answers: mpsc::UnboundedSender<(usize, Answer)>,
}

/// Command id → who waits for its answers.
type Waiters = HashMap<String, Waiting>;

/// The bus as one instance sees it.
pub struct Bus {
    settings: BusSettings,
    reply: String,
    waiters: Mutex<Waiters>,
    /// Each bus node's lane; nodes added while running (admin API, SIGHUP) get theirs then.
    lanes: RwLock<HashMap<String, Arc<Lane>>>,
    seen: RwLock<HashMap<String, Seen>>,
    /// Counts the changes of any lane's health: an execution waiting for many nodes looks at
    /// their health again when it moves.
    changes: watch::Sender<u64>,
    /// The nodes whose health changed, with the count it took: an execution looks again at the
    /// nodes that changed only, not at all it waits for (1,000 executions waiting for 1,000
    /// nodes each would otherwise look at a million at every change while agents come and go).
    changed: Mutex<std::collections::VecDeque<(u64, Arc<str>)>>,
    next: AtomicU64,
    instance: String,
    publisher: mpsc::UnboundedSender<Outgoing>,
}

/// Heartbeats kept at most: agents nobody configured cannot grow the inventory without bound.
const MAX_AGENTS: usize = 100_000;
/// Health changes remembered for the executions waiting for them: an execution that missed
/// more looks at all its nodes again.
const CHANGES_KEPT: usize = 4_096;

impl Bus {
    /// Connects to NATS (in the background: a control plane starts even while NATS is away, and
    /// its bus items wait), creates the streams and this instance's result consumer, and starts
    /// one publisher per node in `nodes`.
    ///
    /// # Errors
    /// The NATS URL is unusable.
    pub async fn start(
        settings: BusSettings,
        owner: &str,
        nodes: &[String],
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let instance = protocol::bus_name(owner);
        let client = async_nats::ConnectOptions::new()
            .name(format!("cachectl {instance}"))
            .retry_on_initial_connect()
            .connect(settings.url.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("bus.url {}: {e}", settings.url))?;
        let js = jetstream::new(client.clone());
        let (publisher, outgoing) = mpsc::unbounded_channel();
        let bus = Arc::new(Self {
            reply: protocol::result_subject(&instance),
            settings,
            waiters: Mutex::new(HashMap::new()),
            lanes: RwLock::new(HashMap::new()),
            seen: RwLock::new(HashMap::new()),
            changes: watch::Sender::new(0),
            changed: Mutex::new(std::collections::VecDeque::new()),
            next: AtomicU64::new(0),
            instance,
            publisher,
        });
        tokio::spawn(publish_commands(bus.clone(), js.clone(), outgoing, shutdown.clone()));
        tokio::spawn(ensure_streams(bus.clone(), js.clone(), shutdown.clone()));
        tokio::spawn(receive_results(bus.clone(), client.clone(), shutdown.clone()));
        tokio::spawn(receive_heartbeats(bus.clone(), client, shutdown.clone()));
        tokio::spawn(watch_health(bus.clone(), shutdown));
        for node in nodes {
            bus.add_node(node);
        }
        Ok(bus)
    }

    /// Opens `node`'s lane, unless it has one.
    pub fn add_node(&self, node: &str) {
        let mut lanes = self.lanes.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        lanes.entry(node.to_owned()).or_insert_with(|| {
            Arc::new(Lane { in_flight: AtomicU64::new(0), health: watch::Sender::new(Health::Down) })
        });
    }

    fn lane(&self, node: &str) -> Option<Arc<Lane>> {
        self.lanes.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(node).cloned()
    }

    /// Publishes one command to the agents of `nodes`: the receiver gets each node's answer
    /// with the node's index in `nodes`, as it comes.
    pub fn send(
        &self,
        nodes: &[&str],
        kind: Kind,
        item_type: ItemType,
        target: &str,
        soft: bool,
        deadline: Timestamp,
    ) -> (String, mpsc::UnboundedReceiver<(usize, Answer)>) {
        let id = format!("{}.{}", self.instance, self.next.fetch_add(1, Ordering::Relaxed));
        let (answers, receiver) = mpsc::unbounded_channel();
        let waiting = nodes.iter().enumerate().map(|(i, node)| (Box::from(*node), i)).collect();
        self.lock_waiters().insert(id.clone(), Waiting { nodes: waiting, answers });
        for node in nodes {
            if let Some(lane) = self.lane(node) {
                lane.in_flight.fetch_add(1, Ordering::Relaxed);
            }
        }
        let command =
            Command { id: id.clone(), kind, item_type, target: target.to_owned(), soft, deadline: deadline.millis() };
        let nodes: Arc<[String]> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let _ = self.publisher.send(Outgoing { nodes, command });
        (id, receiver)
    }

    /// Stops waiting for `node`'s answer to command `id` (its deadline passed).
    pub fn forget(&self, node: &str, id: &str) {
        if take_waiter(&mut self.lock_waiters(), id, node).is_some() {
            self.done(node);
        }
    }

    fn done(&self, node: &str) {
        if let Some(lane) = self.lane(node) {
            let _ = lane.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// The last heartbeat of `node`'s agent.
    pub fn last_seen(&self, node: &str) -> Option<Seen> {
        self.seen.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(node).cloned()
    }

    /// How `node`'s agent is heard from now.
    pub fn health(&self, node: &str) -> Health {
        match self.last_seen(node) {
            Some(seen) => self.health_of(&seen, now_ms()),
            None => Health::Down,
        }
    }

    fn health_of(&self, seen: &Seen, now: Timestamp) -> Health {
        let age = now.since(seen.received_at);
        if age <= self.settings.stale_after {
            Health::Up
        } else if age <= self.settings.down_after {
            Health::Stale
        } else {
            Health::Down
        }
    }

    /// Whether bus node `node`'s agent is up (never for a name without a lane), as of the last
    /// health evaluation.
    pub fn is_up(&self, node: &str) -> bool {
        self.lane(node).is_some_and(|l| *l.health.borrow() == Health::Up)
    }

    /// Changes when the health of any bus node changes.
    pub fn health_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The nodes whose health changed after the change count `seen`, or `None` when the record
    /// no longer reaches back that far (then every node must be looked at).
    pub fn health_changed_since(&self, seen: u64) -> Option<Vec<Arc<str>>> {
        let changed = self.changed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = *self.changes.borrow();
        if seen >= current {
            return Some(Vec::new());
        }
        let oldest = changed.front().map(|(count, _)| *count)?;
        (oldest <= seen + 1)
            .then(|| changed.iter().filter(|(count, _)| *count > seen).map(|(_, node)| node.clone()).collect())
    }

    /// The indices, in command `id`'s node list, of its unanswered nodes whose health changed
    /// after the change count `seen`, or `None` when every node must be looked at again.
    pub fn changed_waiting(&self, id: &str, seen: u64) -> Option<Vec<usize>> {
        let names = self.health_changed_since(seen)?;
        if names.is_empty() {
            return Some(Vec::new());
        }
        let waiters = self.lock_waiters();
        let waiting = waiters.get(id).map(|w| &w.nodes);
        Some(names.iter().filter_map(|name| waiting?.get(&**name).copied()).collect())
    }

    /// Records that the health of `nodes` changed, then tells the waiting executions.
    fn note_health_changes(&self, nodes: Vec<Arc<str>>) {
        if nodes.is_empty() {
            return;
        }
        let mut changed = self.changed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = *self.changes.borrow() + 1;
        changed.extend(nodes.into_iter().map(|node| (count, node)));
        while changed.len() > CHANGES_KEPT {
            changed.pop_front();
        }
        // Under the lock: a reader that sees the new count finds its changes recorded.
        self.changes.send_replace(count);
    }

    /// Every agent heard from: its last heartbeat and health.
    pub fn agents(&self) -> Vec<(Seen, Health)> {
        let now = now_ms();
        let seen = self.seen.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<_> = seen.values().map(|s| (s.clone(), self.health_of(s, now))).collect();
        out.sort_by(|a, b| a.0.beat.node.cmp(&b.0.beat.node));
        out
    }

    /// Commands published to `node` whose answer has not come back.
    pub fn in_flight(&self, node: &str) -> u64 {
        self.lane(node).map_or(0, |l| l.in_flight.load(Ordering::Relaxed))
    }

    /// Whether an agent of `nodes` that is up still has `threshold` or more published commands
    /// unanswered (`held` of each node's in-flight commands are not published yet). A stale or
    /// down agent does not count: its commands wait in the stream for it.
    fn backlogged(&self, nodes: &[String], held: usize, threshold: u64) -> bool {
        let lanes = self.lanes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = held as u64;
        nodes.iter().any(|node| {
            lanes.get(node).is_some_and(|lane| {
                lane.in_flight.load(Ordering::Relaxed).saturating_sub(held) >= threshold
                    && *lane.health.borrow() == Health::Up
            })
        })
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn answer(&self, node: &str, answer: Answer) {
        let waiter = take_waiter(&mut self.lock_waiters(), &answer.id, node);
        if let Some((index, answers)) = waiter {
            self.done(node);
            let _ = answers.send((index, answer));
        }
    }
}

/// Removes who waits for `node`'s answer to command `id`: the node's index and where its answer
/// goes.
fn take_waiter(waiters: &mut Waiters, id: &str, node: &str) -> Option<(usize, mpsc::UnboundedSender<(usize, Answer)>)> {
    let waiting = waiters.get_mut(id)?;
    let index = waiting.nodes.remove(node)?;
    let answers =
        if waiting.nodes.is_empty() { waiters.remove(id).map(|w| w.answers)? } else { waiting.answers.clone() };
    Some((index, answers))
}

/// How often held commands are looked at again.
const RECHECK: Duration = Duration::from_millis(5);

/// Commands for one set of nodes, gathered while those nodes are busy.
struct Held {
    nodes: Arc<[String]>,
    commands: Vec<Command>,
    bytes: usize,
    since: tokio::time::Instant,
}

/// Publishes the commands as they come, with flow control per set of nodes (one item's tier:
/// the same set for every item of a large task). A set's commands go out at once while its
/// agents keep up; while one of its agents that is up still has a quarter of `command_batch`
/// published commands to apply, they are held and published together, as one message, once that
/// agent is below it, `command_batch` of them gathered, or the oldest waited `command_hold` (an
/// agent that is up but stuck holds its set's commands that long each time; its items wait for
/// it until their deadline anyway). Without it, a fleet kept busy got one message per claim of a
/// few items, and the agents spent their time on message overhead (BENCHMARKS.md, "Fleet through
/// the bus"). JetStream stores each message before the next. While NATS is away the commands wait here;
/// those whose deadline passed meanwhile are not sent (their items have failed).
async fn publish_commands(
    bus: Arc<Bus>,
    js: jetstream::Context,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shutdown: CancellationToken,
) {
    let batch = bus.settings.command_batch;
    let threshold = (batch as u64 / 4).max(1);
    let linger = bus.settings.command_hold;
    let mut queued = Vec::with_capacity(batch);
    let mut held: Vec<Held> = Vec::new();
    let mut open = true;
    while open || !held.is_empty() {
        tokio::select! {
            () = shutdown.cancelled() => return,
            n = rx.recv_many(&mut queued, batch), if open => open = n > 0,
            () = tokio::time::sleep(RECHECK), if !held.is_empty() => {}
        }
        for Outgoing { nodes, command } in queued.drain(..) {
            hold(&mut held, nodes, command);
        }
        let now = tokio::time::Instant::now();
        let mut i = 0;
        while i < held.len() {
            let set = &held[i];
            let wait = open
                && set.commands.len() < batch
                && set.bytes < MAX_COMMAND_BYTES
                && now.duration_since(set.since) < linger
                && bus.backlogged(&set.nodes, set.commands.len(), threshold);
            if wait {
                i += 1;
                continue;
            }
            let Held { nodes, commands, .. } = held.swap_remove(i);
            for (shard, message) in messages(&nodes, &bus.reply, commands, batch) {
                publish(&js, shard, message, &shutdown).await;
            }
        }
    }
}

/// Adds `command` to the commands held for `nodes`.
fn hold(held: &mut Vec<Held>, nodes: Arc<[String]>, command: Command) {
    let bytes = command_bytes(&command);
    match held.iter_mut().find(|h| Arc::ptr_eq(&h.nodes, &nodes) || *h.nodes == *nodes) {
        Some(set) => {
            set.commands.push(command);
            set.bytes += bytes;
        }
        None => held.push(Held { nodes, commands: vec![command], bytes, since: tokio::time::Instant::now() }),
    }
}

/// Bytes of commands one message carries at most (estimated): far below NATS's default 1 MiB
/// payload limit even with a full list of node names, so that no batch of long URLs is refused
/// (and retried until its deadline while every other command waits behind it).
const MAX_COMMAND_BYTES: usize = 256 * 1024;

/// What a command adds to a message, about: its target and the rest of its JSON.
fn command_bytes(command: &Command) -> usize {
    command.target.len() + command.id.len() + 128
}

/// The messages carrying `commands` to `nodes`, in order, each with its command shard: up to
/// `batch` commands and [`MAX_COMMAND_BYTES`] of them each, the nodes grouped by shard
/// ([`protocol::command_shard`]), and a shard's node set larger than a message holds split.
fn messages(nodes: &[String], reply: &str, commands: Vec<Command>, batch: usize) -> Vec<(usize, Batch)> {
    let mut parts: Vec<Vec<Command>> = Vec::new();
    let mut bytes = 0;
    for command in commands {
        let size = command_bytes(&command);
        match parts.last_mut() {
            Some(part) if part.len() < batch && bytes + size <= MAX_COMMAND_BYTES => {
                part.push(command);
                bytes += size;
            }
            _ => {
                parts.push(vec![command]);
                bytes = size;
            }
        }
    }
    let mut shards: Vec<Vec<String>> = vec![Vec::new(); protocol::COMMAND_SHARDS];
    for node in nodes {
        shards[protocol::command_shard(node)].push(node.clone());
    }
    let sets: Vec<(usize, &[String])> = shards
        .iter()
        .enumerate()
        .flat_map(|(shard, names)| names.chunks(protocol::MAX_NODES_PER_MESSAGE).map(move |chunk| (shard, chunk)))
        .collect();
    let mut out = Vec::with_capacity(parts.len() * sets.len());
    for commands in parts {
        let mut commands = Some(commands);
        for (i, (shard, chunk)) in sets.iter().enumerate() {
            let commands = if i + 1 == sets.len() { commands.take() } else { commands.clone() };
            let message =
                Batch { nodes: chunk.to_vec(), reply: reply.to_owned(), commands: commands.unwrap_or_default() };
            out.push((*shard, message));
        }
    }
    out
}

/// Publishes one message to command stream `shard` until JetStream stored it, its commands'
/// deadlines passed, or shutdown.
async fn publish(js: &jetstream::Context, shard: usize, mut message: Batch, shutdown: &CancellationToken) {
    let subject = protocol::command_subject(shard);
    let mut attempt = 0u32;
    loop {
        let now = now_ms().millis();
        message.commands.retain(|c| c.deadline > now);
        if message.commands.is_empty() || message.nodes.is_empty() {
            return;
        }
        let Ok(body) = serde_json::to_vec(&message) else { return };
        let stored = match js.publish(subject.clone(), body.into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let Err(e) = stored else { return };
        attempt += 1;
        tracing::warn!(nodes = message.nodes.len(), error = %e, attempt, "Publishing commands failed; retrying.");
        let wait = Duration::from_millis(100 * u64::from(attempt.min(20)));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Creates the streams when missing, retrying while NATS is away or JetStream cannot yet.
async fn ensure_streams(bus: Arc<Bus>, js: jetstream::Context, shutdown: CancellationToken) {
    let mut attempt = 0u32;
    while let Err(e) = protocol::ensure_streams(&js, bus.settings.streams).await {
        attempt += 1;
        tracing::warn!(error = %e, attempt, "Setting up the bus's streams failed; retrying.");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Subscribes to `subject`, retrying each second until it works, or `None` at shutdown.
async fn subscribe(
    client: &async_nats::Client,
    subject: String,
    shutdown: &CancellationToken,
) -> Option<async_nats::Subscriber> {
    loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => return Some(s),
            Err(e) => {
                tracing::warn!(error = %e, subject, "Subscribing failed; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Receives this instance's results until shutdown, and acknowledges each on the agent's behalf
/// (on the subject of its [`protocol::ACK_HEADER`], when that is the acknowledgement of a
/// command message delivered to the node that answers) once its answers are handed to the
/// executions waiting for them. An unreadable one is not acknowledged but sent back (a
/// negative acknowledgement with a second's delay): the agent applies the commands again, until
/// their deadline.
async fn receive_results(bus: Arc<Bus>, client: async_nats::Client, shutdown: CancellationToken) {
    let Some(mut subscriber) = subscribe(&client, bus.reply.clone(), &shutdown).await else { return };
    tracing::info!(subject = %bus.reply, "Bus ready.");
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => break,
            m = subscriber.next() => m,
        };
        let Some(message) = message else { break };
        let ack = message.headers.as_ref().and_then(|h| h.get(protocol::ACK_HEADER)).map(|v| v.as_str().to_owned());
        let acked = ack.as_deref().and_then(protocol::acknowledged_node);
        let (verdict, acknowledged) = match serde_json::from_slice::<Results>(&message.payload) {
            Ok(results) => {
                // Only the node's own command message: an agent cannot acknowledge another's.
                let own = acked == Some(results.node.as_str());
                for answer in results.answers {
                    bus.answer(&results.node, answer);
                }
                (bytes::Bytes::from_static(b"+ACK"), own)
            }
            Err(e) => {
                tracing::warn!(error = %e, "An unreadable result message; its commands will be applied again.");
                (bytes::Bytes::from_static(NAK_A_SECOND), acked.is_some())
            }
        };
        let acknowledged = ack.filter(|_| acknowledged);
        if let Some(ack) = acknowledged
            && let Err(e) = client.publish(ack, verdict).await
        {
            tracing::debug!(error = %e, "Acknowledging a command message failed.");
        }
    }
    let _ = subscriber.unsubscribe().await;
}

/// A negative acknowledgement: deliver the message again in a second.
const NAK_A_SECOND: &[u8] = br#"-NAK {"delay":1000000000}"#;

/// Re-evaluates every configured node's health four times a second; waiters see the changes.
async fn watch_health(bus: Arc<Bus>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let lanes: Vec<(String, Arc<Lane>)> = bus
            .lanes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect();
        let seen = bus.seen.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changed = Vec::new();
        for (node, lane) in &lanes {
            let health = seen.get(node).map_or(Health::Down, |s| bus.health_of(s, now));
            if lane.health.send_if_modified(|h| std::mem::replace(h, health) != health) {
                changed.push(Arc::from(node.as_str()));
            }
        }
        drop(seen);
        bus.note_health_changes(changed);
    }
}

async fn receive_heartbeats(bus: Arc<Bus>, client: async_nats::Client, shutdown: CancellationToken) {
    let Some(mut subscriber) = subscribe(&client, protocol::HEARTBEATS.to_owned(), &shutdown).await else { return };
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            m = subscriber.next() => m,
        };
        let Some(message) = message else { return };
        match serde_json::from_slice::<Heartbeat>(&message.payload) {
            Ok(beat) if protocol::valid_name(&beat.node) => {
                let seen = Seen { beat, received_at: now_ms() };
                let mut all = bus.seen.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if all.len() < MAX_AGENTS || all.contains_key(&seen.beat.node) {
                    all.insert(seen.beat.node.clone(), seen);
                }
            }
            Ok(_) => tracing::debug!("A heartbeat with an invalid node name; ignored."),
            Err(e) => tracing::debug!(error = %e, "An unreadable heartbeat; ignored."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(nodes: &Arc<[String]>, id: &str) -> Outgoing {
        let command = Command {
            id: id.to_owned(),
            kind: Kind::Refresh,
            item_type: ItemType::Url,
            target: format!("http://a.example.com/{id}"),
            soft: false,
            deadline: i64::MAX,
        };
        Outgoing { nodes: nodes.clone(), command }
    }

    fn names(range: std::ops::Range<usize>) -> Arc<[String]> {
        range.map(|i| format!("n{i}")).collect()
    }

    /// What the publisher's holding does with `queued`: the messages of each node set.
    fn held_messages(queued: Vec<Outgoing>) -> Vec<(usize, Batch)> {
        let mut held = Vec::new();
        for Outgoing { nodes, command } in queued {
            hold(&mut held, nodes, command);
        }
        held.into_iter().flat_map(|h| messages(&h.nodes, "r", h.commands, 256)).collect()
    }

    #[test]
    fn commands_for_the_same_nodes_share_a_message_per_shard_and_large_node_sets_are_split() {
        let all = names(0..6_000);
        let same_again = names(0..6_000);
        let one = names(7..8);
        let queued = vec![outgoing(&all, "1"), outgoing(&same_again, "2"), outgoing(&one, "3"), outgoing(&all, "4")];
        let out = held_messages(queued);
        // Every message names nodes of its own shard only, 1,000 at most.
        for (shard, batch) in &out {
            assert!(batch.nodes.len() <= protocol::MAX_NODES_PER_MESSAGE);
            assert!(batch.nodes.iter().all(|n| protocol::command_shard(n) == *shard));
        }
        // The 6,000 nodes' commands share messages, and every node is named once.
        let shared: Vec<&(usize, Batch)> = out.iter().filter(|(_, b)| b.commands.len() == 3).collect();
        assert!(shared.iter().all(|(_, b)| b.commands.iter().map(|c| c.id.as_str()).eq(["1", "2", "4"])));
        let mut named: Vec<&str> = shared.iter().flat_map(|(_, b)| b.nodes.iter().map(String::as_str)).collect();
        named.sort_unstable();
        let mut expected: Vec<String> = all.to_vec();
        expected.sort_unstable();
        assert_eq!(named, expected);
        // Each shard holds about a quarter of them: more than 1,000, so split in two.
        let per_shard: Vec<usize> =
            (0..protocol::COMMAND_SHARDS).map(|s| shared.iter().filter(|(shard, _)| *shard == s).count()).collect();
        assert_eq!(per_shard, vec![2; protocol::COMMAND_SHARDS]);
        let last = out.last().unwrap();
        assert_eq!((last.0, last.1.nodes.clone()), (protocol::command_shard("n7"), vec!["n7".to_owned()]));
        assert_eq!(out.len(), 2 * protocol::COMMAND_SHARDS + 1);
    }

    #[test]
    fn a_message_carries_command_batch_commands_at_most() {
        let all = names(0..3);
        let commands: Vec<Command> = (0..20).map(|i| outgoing(&all, &i.to_string()).command).collect();
        let mut sizes: Vec<usize> = messages(&all, "r", commands, 8).iter().map(|(_, b)| b.commands.len()).collect();
        sizes.sort_unstable();
        // 8, 8 and 4 commands, in one message for each shard the three nodes fall in.
        let n = all.iter().map(|n| protocol::command_shard(n)).collect::<std::collections::HashSet<_>>().len();
        assert_eq!(sizes, [vec![4; n], vec![8; 2 * n]].concat());
    }

    fn bus_with(nodes: &[&str]) -> Bus {
        let (publisher, _) = mpsc::unbounded_channel();
        let bus = Bus {
            settings: BusSettings {
                url: "nats://127.0.0.1:1".into(),
                streams: protocol::StreamSettings { replicas: 1, max_age: Duration::from_secs(60), max_bytes: 1 << 20 },
                command_batch: 256,
                command_hold: Duration::from_secs(1),
                stale_after: Duration::from_secs(10),
                down_after: Duration::from_secs(30),
            },
            reply: protocol::result_subject("i"),
            waiters: Mutex::new(HashMap::new()),
            lanes: RwLock::new(HashMap::new()),
            seen: RwLock::new(HashMap::new()),
            changes: watch::Sender::new(0),
            changed: Mutex::new(std::collections::VecDeque::new()),
            next: AtomicU64::new(0),
            instance: "i".into(),
            publisher,
        };
        for node in nodes {
            bus.add_node(node);
        }
        bus
    }

    #[test]
    fn a_waiting_execution_learns_which_nodes_changed_or_that_it_must_look_at_all() {
        let bus = bus_with(&["a", "b", "c"]);
        let names = |v: Option<Vec<Arc<str>>>| v.map(|v| v.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        assert_eq!(names(bus.health_changed_since(0)), Some(vec![]));
        bus.note_health_changes(vec![]);
        assert_eq!(*bus.changes.borrow(), 0, "no change, no count");
        bus.note_health_changes(vec![Arc::from("a"), Arc::from("b")]);
        bus.note_health_changes(vec![Arc::from("c")]);
        assert_eq!(*bus.changes.borrow(), 2);
        assert_eq!(names(bus.health_changed_since(0)), Some(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(names(bus.health_changed_since(1)), Some(vec!["c".into()]));
        assert_eq!(names(bus.health_changed_since(2)), Some(vec![]));
        // As many changes as are kept: all of them still reach back to count 2.
        for _ in 0..CHANGES_KEPT {
            bus.note_health_changes(vec![Arc::from("a")]);
        }
        assert_eq!(bus.health_changed_since(2).map(|v| v.len()), Some(CHANGES_KEPT));
        // One more: an execution that last looked at count 2 must look at all its nodes.
        bus.note_health_changes(vec![Arc::from("b")]);
        assert_eq!(bus.health_changed_since(2), None);
        assert_eq!(bus.health_changed_since(3).map(|v| v.len()), Some(CHANGES_KEPT));
        let last = *bus.changes.borrow();
        assert_eq!(names(bus.health_changed_since(last - 1)), Some(vec!["b".into()]));
    }

    #[test]
    fn a_set_is_backlogged_while_an_agent_that_is_up_has_published_commands_to_apply() {
        let bus = bus_with(&["a", "b"]);
        let set: Vec<String> = vec!["a".into(), "b".into()];
        let lane = bus.lane("b").unwrap();
        lane.in_flight.store(70, Ordering::Relaxed);
        // Down: its commands wait in the stream, nothing is held for it.
        assert!(!bus.backlogged(&set, 0, 64));
        lane.health.send_replace(Health::Up);
        assert!(bus.backlogged(&set, 0, 64));
        // 10 of its 70 are the ones being held: 60 published, below the threshold.
        assert!(!bus.backlogged(&set, 10, 64));
        lane.health.send_replace(Health::Stale);
        assert!(!bus.backlogged(&set, 0, 64));
        // A node without a lane (not a bus node) never holds anything.
        assert!(!bus.backlogged(&["c".to_owned()], 0, 0));
    }

    #[test]
    fn long_urls_are_spread_over_messages_that_nats_accepts() {
        let all = names(0..1_000);
        let queued = (0..256).map(|i| {
            let mut out = outgoing(&all, &i.to_string());
            out.command.target = format!("http://a.example.com/{}", "x".repeat(4_000));
            out
        });
        let out = messages(&all, "r", queued.map(|o| o.command).collect(), 256);
        assert!(out.len() > protocol::COMMAND_SHARDS, "{}", out.len());
        for shard in 0..protocol::COMMAND_SHARDS {
            let carried: usize = out.iter().filter(|(s, _)| *s == shard).map(|(_, b)| b.commands.len()).sum();
            assert_eq!(carried, 256, "shard {shard}");
        }
        for (_, batch) in &out {
            let bytes = serde_json::to_vec(batch).unwrap().len();
            assert!(bytes < 1024 * 1024 / 2, "{bytes}");
        }
    }
}
