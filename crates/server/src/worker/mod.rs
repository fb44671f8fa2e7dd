//! The worker: claims runnable items from the store under a lease, executes each on every edge
//! node that serves its host (parents before edges), retries transient failures with backoff
//! until the item's deadline, and reports every change to a single writer that batches them into
//! store transactions. It never decides what a status means: `cachectl_core::policy` does.

use crate::bus::Bus;
use crate::config::{EdgeNode, WorkerConfig};
use crate::directory::Directory;
use crate::metrics::{FailureReason, Metrics};
use cachectl_core::admin::EdgeState;
use cachectl_core::policy::{StateCounts, backoff, derive, derive_counts};
use cachectl_core::store::Queue;
use cachectl_core::{ClaimedItem, ItemStatus, ItemUpdate, NodeResult, NodeState, Tier, Timestamp};
use cachectl_edge::{ClientSettings, EdgeClient, Node, NodeTransport, Outcome};
use prometheus_client::metrics::counter::Counter;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Updates handed to the writer in one store transaction at most.
const WRITE_BATCH: usize = 2048;
/// Items claimed per store round trip at most.
const CLAIM_BATCH: usize = 1024;

/// How the worker reaches a node.
enum Route {
    /// HTTP to the cache, through this transport.
    Direct(NodeTransport),
    /// Commands through the bus to the node's agent.
    Bus(Arc<Bus>),
}

/// A node with its own concurrency limit and request counters.
struct NodeSlot {
    node: Node,
    /// What it was built from, to keep the slot (its connections, its counters) while the
    /// directory changes around it.
    fingerprint: String,
    /// Takes no new command: an item not yet sent to it leaves it out; a command already sent
    /// (and its retries) finishes. Shared by every item holding the slot, so that a drain applies
    /// at once to items already running.
    draining: std::sync::atomic::AtomicBool,
    route: Route,
    permits: Semaphore,
    success: Counter,
    retry: Counter,
    fail: Counter,
}

impl NodeSlot {
    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What the writer is handed, in order.
enum Report {
    /// A change of an item.
    Update(ItemUpdate),
    /// The item's execution ended: once the reports before this one are written (or given up
    /// on), the item may be executed again if a claim hands it out.
    Done(i64),
}

/// Everything an item's execution needs, shared by all of them.
struct Shared {
    client: EdgeClient,
    /// The nodes as the directory last listed them; each item takes the list of its start.
    nodes: std::sync::RwLock<Arc<Vec<Arc<NodeSlot>>>>,
    /// Accounts disabled through the admin API: their items fail instead of running.
    disabled: std::sync::RwLock<HashSet<String>>,
    bus: Option<Arc<Bus>>,
    config: WorkerConfig,
    updates: mpsc::UnboundedSender<Report>,
    metrics: Arc<Metrics>,
    owner: String,
    /// Items executing here or whose reports are not written yet. A claim that hands one out
    /// again (its lease ran out while the store was unavailable) does not start it twice: its
    /// pending result would otherwise make it final while the second execution is on its way.
    busy: Mutex<HashSet<i64>>,
}

impl Shared {
    fn send(&self, update: ItemUpdate) {
        let _ = self.updates.send(Report::Update(update));
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reason an item of `account` must not run, if the account is disabled.
    fn disabled_account(&self, account: &str) -> Option<String> {
        let disabled = self.disabled.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        disabled.contains(account).then(|| format!("{}{account} disabled", cachectl_core::admin::CANCELLED_ACCOUNT))
    }

    fn nodes(&self) -> Arc<Vec<Arc<NodeSlot>>> {
        self.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Rebuilds the node list from `directory`, keeping the slots of unchanged nodes.
    fn refresh(&self, directory: &Directory) {
        let disabled = directory.accounts.iter().filter(|(_, a)| a.disabled).map(|(name, _)| name.clone()).collect();
        *self.disabled.write().unwrap_or_else(std::sync::PoisonError::into_inner) = disabled;
        let old = self.nodes();
        let mut slots = Vec::with_capacity(directory.edges.len());
        for entry in &directory.edges {
            let EdgeNode { node, via_bus } = &entry.node;
            let fingerprint = format!("{node:?} {via_bus}");
            let draining = entry.state == EdgeState::Draining;
            if let Some(kept) = old.iter().find(|s| s.fingerprint == fingerprint) {
                kept.draining.store(draining, std::sync::atomic::Ordering::Relaxed);
                slots.push(kept.clone());
                continue;
            }
            let route = match (&self.bus, via_bus) {
                (Some(bus), true) => {
                    bus.add_node(&node.name);
                    Route::Bus(bus.clone())
                }
                (None, true) => {
                    tracing::error!(node = %node.name, "This edge is reached through the bus, which is not configured; it gets no commands.");
                    continue;
                }
                (_, false) => Route::Direct(self.client.transport(node)),
            };
            slots.push(Arc::new(NodeSlot {
                success: self.metrics.node_counter(&node.name, "success"),
                retry: self.metrics.node_counter(&node.name, "retry"),
                fail: self.metrics.node_counter(&node.name, "fail"),
                // A bus node's commands wait in JetStream, not here: its agent bounds its own work.
                permits: Semaphore::new(if *via_bus {
                    Semaphore::MAX_PERMITS
                } else {
                    self.config.per_node_concurrency
                }),
                route,
                node: node.clone(),
                fingerprint,
                draining: std::sync::atomic::AtomicBool::new(draining),
            }));
        }
        *self.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(slots);
    }
}

/// The worker of one instance.
pub struct Worker {
    store: Arc<dyn Queue>,
    owner: String,
    wake: Arc<Notify>,
    shared: Arc<Shared>,
    updates: mpsc::UnboundedReceiver<Report>,
    directory: watch::Receiver<Arc<Directory>>,
}

impl Worker {
    /// A worker identified as `owner` in leases, woken by `wake` when work is submitted.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(
        store: Arc<dyn Queue>,
        directory: watch::Receiver<Arc<Directory>>,
        bus: Option<Arc<Bus>>,
        config: WorkerConfig,
        owner: String,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let client = EdgeClient::new(ClientSettings {
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            per_node: config.per_node_concurrency,
            pipeline_depth: config.pipeline_depth,
            purge_batch: config.purge_batch,
            transport: config.edge_transport,
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Self {
            store,
            owner: owner.clone(),
            wake,
            shared: Arc::new(Shared {
                client,
                nodes: std::sync::RwLock::new(Arc::new(Vec::new())),
                disabled: std::sync::RwLock::new(HashSet::new()),
                bus,
                config,
                updates: tx,
                metrics,
                owner,
                busy: Mutex::new(HashSet::new()),
            }),
            updates: rx,
            directory,
        };
        worker.shared.refresh(&worker.directory.borrow());
        Ok(worker)
    }

    /// Runs until `shutdown`; then stops claiming, gives in-flight items `grace` to finish,
    /// writes what it knows and releases its leases so that the items resume at once elsewhere.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let Self { store, owner, wake, shared, updates, mut directory } = self;
        let follower = {
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        changed = directory.changed() => if changed.is_err() { return },
                    }
                    let current = directory.borrow_and_update().clone();
                    shared.refresh(&current);
                    tracing::info!(nodes = shared.nodes().len(), "The edges changed; new items use the new list.");
                }
            })
        };
        let writer =
            tokio::spawn(write_updates(store.clone(), owner.clone(), updates, wake.clone(), Arc::downgrade(&shared)));
        let renewer = tokio::spawn(renew_leases(store.clone(), owner.clone(), shared.config.lease, shutdown.clone()));
        let capacity = Arc::new(Semaphore::new(shared.config.max_items_in_flight));
        let mut running = JoinSet::new();
        tracing::info!(owner = %owner, nodes = shared.nodes().len(), "Worker started.");
        while !shutdown.is_cancelled() {
            while running.try_join_next().is_some() {}
            shared.metrics.set_in_flight(running.len());
            let free = capacity.available_permits().min(CLAIM_BATCH);
            let mut claimed_full_batch = false;
            if free > 0 {
                let now = crate::api::now_ms();
                let lease_until = now.after(shared.config.lease);
                match store.claim_items(&owner, now, lease_until, u32::try_from(free).unwrap_or(u32::MAX)).await {
                    Ok(items) => {
                        claimed_full_batch = items.len() == free;
                        for claimed in items {
                            if !shared.busy().insert(claimed.item.id) {
                                continue;
                            }
                            let Ok(permit) = capacity.clone().try_acquire_owned() else {
                                shared.busy().remove(&claimed.item.id);
                                break;
                            };
                            let shared = shared.clone();
                            running.spawn(async move {
                                let id = claimed.item.id;
                                execute_item(&shared, claimed).await;
                                let _ = shared.updates.send(Report::Done(id));
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Claiming items failed; retrying after the poll interval.")
                    }
                }
            }
            if claimed_full_batch {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = wake.notified() => {}
                () = tokio::time::sleep(shared.config.poll_interval) => {}
                // Capacity came back after the worker was full.
                Ok(p) = capacity.acquire(), if free == 0 => drop(p),
            }
        }
        tracing::info!(in_flight = running.len(), "Worker stopping: no more claims.");
        if tokio::time::timeout(grace, async { while running.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(
                in_flight = running.len(),
                "Items still running at the end of the grace period; aborting them."
            );
            running.shutdown().await;
        }
        renewer.abort();
        follower.abort();
        drop(shared);
        let _ = writer.await;
        if let Err(e) = store.release_leases(&owner).await {
            tracing::warn!(error = %e, "Releasing leases failed; they expire by themselves.");
        }
        tracing::info!("Worker stopped.");
    }
}

/// Writes updates in batches, in order. A failing store is retried; after that the batch is
/// dropped: the items' leases lapse and another claim redoes them (purges are idempotent).
/// An item whose lease another worker took meanwhile keeps that worker's results, not these.
async fn write_updates(
    store: Arc<dyn Queue>,
    owner: String,
    mut reports: mpsc::UnboundedReceiver<Report>,
    wake: Arc<Notify>,
    // Weak: `Shared` holds the sending half, and the channel closes when the last execution
    // has ended and `run` dropped its own.
    shared: std::sync::Weak<Shared>,
) {
    let mut received = Vec::with_capacity(WRITE_BATCH);
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut done = Vec::new();
    let mut held = Held::new(HOLD_UNFINISHED);
    loop {
        // Closed once the channel is (no report comes in, and none will); a held report's
        // due time passing is not.
        let closed = match held.due() {
            Some(due) => {
                tokio::time::timeout_at(due, reports.recv_many(&mut received, WRITE_BATCH)).await.is_ok_and(|n| n == 0)
            }
            None => reports.recv_many(&mut received, WRITE_BATCH).await == 0,
        };
        for report in received.drain(..) {
            match report {
                Report::Update(update) => held.take(update, &mut batch),
                Report::Done(id) => {
                    held.release(id, &mut batch);
                    done.push(id);
                }
            }
        }
        held.release_due(closed, &mut batch);
        if batch.is_empty() && done.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        // A completed refresh may release the prefetch that waits for it: claim again at once.
        let completed = batch.iter().any(|u| u.status == ItemStatus::Completed && u.finished_at.is_some());
        let mut attempt = 0;
        while !batch.is_empty() {
            match store.apply_updates(&owner, &batch).await {
                Ok(0) => break,
                Ok(lost) => {
                    tracing::info!(items = lost, "Results dropped: another worker took these items' leases.");
                    break;
                }
                Err(e) => {
                    attempt += 1;
                    if attempt >= 20 {
                        tracing::error!(error = %e, updates = batch.len(), "Giving up on writing results; the items will be redone.");
                        break;
                    }
                    tracing::warn!(error = %e, attempt, "Writing results failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                }
            }
        }
        batch.clear();
        if let Some(shared) = shared.upgrade() {
            let mut busy = shared.busy();
            for id in done.drain(..) {
                busy.remove(&id);
            }
        }
        done.clear();
        if completed {
            wake.notify_one();
        }
        if closed {
            return;
        }
    }
}

/// How long the writer holds an item's reports of progress alone (its start, a node's success
/// while others are pending) before writing them. An item's later reports
/// replace them in the same row, and its final report takes them along at once: under load an
/// item was written two to three times (claimed, then its nodes answering a few hundred
/// milliseconds apart, in different transactions), now about once. A reader sees an unfinished
/// item's progress up to this late; a finished item is written as soon as it finishes.
const HOLD_UNFINISHED: Duration = Duration::from_millis(1000);

/// The reports the writer holds, by item, with when each item's are due.
struct Held {
    /// How long an item's first held report waits at most.
    hold: Duration,
    items: HashMap<i64, (tokio::time::Instant, Vec<ItemUpdate>)>,
    /// Items in the order they were first held (an item may have been taken out since).
    order: std::collections::VecDeque<(tokio::time::Instant, i64)>,
}

impl Held {
    fn new(hold: Duration) -> Self {
        Self { hold, items: HashMap::new(), order: std::collections::VecDeque::new() }
    }

    /// Holds `update` if it only tells of progress (the item's start, nodes that succeeded, no
    /// reason); otherwise — the item finished, a node failed an attempt, an agent is away —
    /// moves it, after what was held of its item, into `batch`: news that readers wait for is
    /// not held.
    fn take(&mut self, update: ItemUpdate, batch: &mut Vec<ItemUpdate>) {
        let progress_only = !update.status.is_final()
            && update.reason.is_none()
            && update.nodes.iter().all(|n| n.state == NodeState::Succeeded);
        if !progress_only {
            self.release(update.item_id, batch);
            batch.push(update);
            return;
        }
        let id = update.item_id;
        match self.items.get_mut(&id) {
            Some((_, updates)) => updates.push(update),
            None => {
                let due = tokio::time::Instant::now() + self.hold;
                self.items.insert(id, (due, vec![update]));
                self.order.push_back((due, id));
            }
        }
    }

    /// Moves what is held of item `id` into `batch`.
    fn release(&mut self, id: i64, batch: &mut Vec<ItemUpdate>) {
        if let Some((_, updates)) = self.items.remove(&id) {
            batch.extend(updates);
        }
    }

    /// Moves the reports that are due (all of them if `all`) into `batch`.
    fn release_due(&mut self, all: bool, batch: &mut Vec<ItemUpdate>) {
        let now = tokio::time::Instant::now();
        while let Some(due) = self.due() {
            if !all && due > now {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.release(id, batch);
            }
        }
    }

    /// When the oldest held reports are due (forgetting the items released before theirs were).
    fn due(&mut self) -> Option<tokio::time::Instant> {
        while let Some(&(due, id)) = self.order.front() {
            if self.items.get(&id).is_some_and(|(held_due, _)| *held_due == due) {
                return Some(due);
            }
            self.order.pop_front();
        }
        None
    }
}

async fn renew_leases(store: Arc<dyn Queue>, owner: String, lease: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = store.renew_leases(&owner, crate::api::now_ms().after(lease)).await {
            tracing::warn!(error = %e, "Renewing leases failed.");
        }
    }
}

/// The node states of one item while it runs, and what follows from them. Kept so that a node
/// result costs the same whatever the item's number of nodes (a fleet has a thousand).
struct Progress {
    item_id: i64,
    started_at: Option<Timestamp>,
    /// When the item was submitted, or became due if scheduled: its latency counts from here.
    submitted_at: Timestamp,
    tally: Mutex<Tally>,
}

struct Tally {
    states: HashMap<String, NodeState>,
    counts: StateCounts,
    /// The reason of the first node that failed.
    failure: Option<String>,
    /// Bus nodes whose agent is away, with their note.
    waiting: BTreeMap<String, String>,
    /// Whether the item's stored reason is a waiting note.
    noted: bool,
    /// The draining nodes that serve the item's host but were not sent it: the completed item's
    /// reason says so.
    skipped: Option<String>,
}

/// How a bus node's result starts while its agent is away.
const WAITING: &str = "waiting for agent ";

impl Progress {
    fn new(
        item_id: i64,
        submitted_at: Timestamp,
        started_at: Timestamp,
        initial: &[NodeResult],
        skipped: Option<String>,
    ) -> Self {
        let states: HashMap<String, NodeState> = initial.iter().map(|r| (r.node.clone(), r.state)).collect();
        let failure = initial
            .iter()
            .find(|r| r.state == NodeState::Failed)
            .map(|r| format!("node {}: {}", r.node, r.error.as_deref().unwrap_or("failed")));
        Self {
            item_id,
            started_at: Some(started_at),
            submitted_at,
            tally: Mutex::new(Tally {
                counts: StateCounts::of(&initial.iter().map(|r| r.state).collect::<Vec<_>>()),
                states,
                failure,
                waiting: BTreeMap::new(),
                noted: false,
                skipped,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a node failed.
    fn failed(&self) -> bool {
        self.lock().counts.failed > 0
    }

    /// Takes `node` out of the item: it was drained before the item was sent to it. The item's
    /// reason names it once the item completes; with no node left, the item fails saying so.
    fn skip(&self, shared: &Shared, node: &str, item: &cachectl_core::Item) {
        let mut tally = self.lock();
        let (before, _) = derive_counts(tally.counts, true);
        if let Some(old) = tally.states.remove(node) {
            tally.counts.remove(old);
        }
        tally.skipped = Some(match tally.skipped.take() {
            Some(note) => format!("{note}, {node}"),
            None => format!("not sent to draining node {node}"),
        });
        let left = tally.counts;
        let (status, progress) = if left.pending + left.succeeded + left.failed == 0 {
            (ItemStatus::Failed, 0)
        } else {
            derive_counts(left, true)
        };
        let finished_now = status.is_final() && !before.is_final();
        if finished_now {
            shared.metrics.item_finished(item.kind, status, crate::api::now_ms().since(self.submitted_at));
        }
        let reason = match status {
            ItemStatus::Failed if left.failed == 0 => Some(format!("every node serving {} was drained", item.host)),
            ItemStatus::Failed => tally.failure.clone(),
            ItemStatus::Completed => tally.skipped.clone(),
            _ => None,
        };
        drop(tally);
        shared.send(ItemUpdate {
            item_id: self.item_id,
            status,
            progress,
            started_at: self.started_at,
            finished_at: finished_now.then(crate::api::now_ms),
            reason,
            nodes: Vec::new(),
        });
    }

    /// Records `result` and sends the item's derived state to the writer.
    fn report(&self, shared: &Shared, result: NodeResult, kind: cachectl_core::Kind) {
        let mut tally = self.lock();
        let (before, _) = derive_counts(tally.counts, true);
        if let Some(state) = tally.states.get_mut(&result.node) {
            let old = std::mem::replace(state, result.state);
            tally.counts.change(old, result.state);
        }
        let (status, progress) = derive_counts(tally.counts, true);
        if result.state == NodeState::Failed && tally.failure.is_none() {
            tally.failure = Some(format!("node {}: {}", result.node, result.error.as_deref().unwrap_or("failed")));
        }
        // A bus node whose agent is away says so in the item's reason while the item waits; the
        // note is cleared (an empty reason) once no node waits any more.
        match result.error.as_deref() {
            Some(note) if result.state == NodeState::Pending && note.starts_with(WAITING) => {
                tally.waiting.insert(result.node.clone(), note.to_owned());
            }
            _ => {
                tally.waiting.remove(&result.node);
            }
        }
        let waiting = tally.waiting.values().next().cloned();
        let noted = std::mem::replace(&mut tally.noted, waiting.is_some());
        let finished_now = status.is_final() && !before.is_final();
        if finished_now {
            shared.metrics.item_finished(kind, status, result.updated_at.since(self.submitted_at));
        }
        let reason = match status {
            ItemStatus::Failed => tally.failure.clone(),
            _ if waiting.is_some() => waiting,
            ItemStatus::Completed if tally.skipped.is_some() => tally.skipped.clone(),
            _ if noted => Some(String::new()),
            _ => None,
        };
        drop(tally);
        shared.send(ItemUpdate {
            item_id: self.item_id,
            status,
            progress,
            started_at: self.started_at,
            finished_at: finished_now.then_some(result.updated_at),
            reason,
            nodes: vec![result],
        });
    }
}

/// Executes one item on all its nodes, parents first.
async fn execute_item(shared: &Shared, claimed: ClaimedItem) {
    let item = claimed.item;
    let now = crate::api::now_ms();
    let all = shared.nodes();
    // A draining node takes no new item; an item that already has a result on it finishes there.
    let started_on = |name: &str| claimed.nodes.iter().any(|r| r.node == name);
    let serving = || all.iter().map(AsRef::as_ref).filter(|slot: &&NodeSlot| slot.node.serves(&item.host));
    let nodes: Vec<&NodeSlot> = serving().filter(|slot| !slot.is_draining() || started_on(&slot.node.name)).collect();
    let drained: Vec<&str> = serving()
        .filter(|slot| slot.is_draining() && !started_on(&slot.node.name))
        .map(|slot| slot.node.name.as_str())
        .collect();
    let skipped = (!drained.is_empty()).then(|| format!("not sent to draining node {}", drained.join(", ")));
    if let Some(reason) = shared.disabled_account(&item.account) {
        shared.metrics.item_finished(item.kind, ItemStatus::Failed, now.since(item.not_before));
        shared.send(ItemUpdate {
            item_id: item.id,
            status: ItemStatus::Failed,
            progress: 0,
            started_at: Some(claimed.started_at.unwrap_or(now)),
            finished_at: Some(now),
            reason: Some(reason),
            nodes: Vec::new(),
        });
        return;
    }
    if nodes.is_empty() {
        shared.metrics.node_failed("", FailureReason::NoNode);
        shared.metrics.item_finished(item.kind, ItemStatus::Failed, now.since(item.not_before));
        shared.send(ItemUpdate {
            item_id: item.id,
            status: ItemStatus::Failed,
            progress: 0,
            started_at: Some(now),
            finished_at: Some(now),
            reason: Some(format!("no edge node serves {}", item.host)),
            nodes: Vec::new(),
        });
        return;
    }
    let started_at = claimed.started_at.unwrap_or(now);
    let deadline = started_at.after(shared.config.item_deadline);
    let mut earlier: HashMap<&str, &NodeResult> = claimed.nodes.iter().map(|r| (r.node.as_str(), r)).collect();
    let initial: Vec<NodeResult> = nodes
        .iter()
        .map(|slot| {
            earlier.remove(slot.node.name.as_str()).cloned().unwrap_or(NodeResult {
                node: slot.node.name.clone(),
                state: NodeState::Pending,
                attempts: 0,
                status_code: None,
                error: None,
                updated_at: now,
                instance: String::new(),
            })
        })
        .collect();
    let progress = Progress::new(item.id, item.not_before, started_at, &initial, skipped);
    if claimed.started_at.is_none() {
        let states: Vec<NodeState> = initial.iter().map(|r| r.state).collect();
        let (status, pct) = derive(&states, true);
        shared.send(ItemUpdate {
            item_id: item.id,
            status,
            progress: pct,
            started_at: Some(started_at),
            finished_at: None,
            reason: None,
            nodes: Vec::new(),
        });
    }
    for tier in [Tier::Parent, Tier::Edge] {
        let pending: Vec<(&NodeSlot, NodeResult)> = nodes
            .iter()
            .zip(&initial)
            .filter(|(slot, result)| slot.node.tier == tier && result.state == NodeState::Pending)
            .map(|(slot, result)| (*slot, result.clone()))
            .collect();
        let (via_bus, direct): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(slot, _)| matches!(slot.route, Route::Bus(_)));
        let direct = direct.into_iter().filter_map(|(slot, result)| match &slot.route {
            Route::Direct(transport) => Some(run_direct(shared, &progress, slot, transport, &item, result, deadline)),
            Route::Bus(_) => None,
        });
        // The bus nodes get one command for all of them; a draining one that was never sent
        // this item is left out.
        let mut to_bus = Vec::with_capacity(via_bus.len());
        for (slot, result) in via_bus {
            if result.attempts == 0 && slot.is_draining() {
                progress.skip(shared, &slot.node.name, &item);
            } else {
                to_bus.push((slot, result));
            }
        }
        let bus = to_bus.iter().find_map(|(slot, _)| match &slot.route {
            Route::Bus(bus) => Some(bus.clone()),
            Route::Direct(_) => None,
        });
        let via_bus = bus.as_ref().map(|bus| {
            let names: Vec<&str> = to_bus.iter().map(|(slot, _)| slot.node.name.as_str()).collect();
            let (id, answers) = bus.send(&names, item.kind, item.item_type, &item.url, item.soft, deadline);
            run_via_bus(shared, &progress, bus, &item, to_bus, deadline, Sent { id, answers })
        });
        futures::future::join(futures::future::join_all(direct), async {
            if let Some(run) = via_bus {
                run.await;
            }
        })
        .await;
        if progress.failed() {
            // An edge must not refill from a parent that still holds the old copy.
            break;
        }
    }
}

/// Sends the node's request over HTTP, again after a backoff while it fails transiently.
async fn run_direct(
    shared: &Shared,
    progress: &Progress,
    slot: &NodeSlot,
    transport: &NodeTransport,
    item: &cachectl_core::Item,
    mut result: NodeResult,
    deadline: Timestamp,
) {
    loop {
        let outcome = {
            let _permit = slot.permits.acquire().await;
            if result.attempts == 0 && slot.is_draining() {
                // Drained while this item waited for the node: never sent, so left out.
                progress.skip(shared, &slot.node.name, item);
                return;
            }
            shared.client.execute_item(&slot.node, transport, item.kind, item.item_type, &item.url, item.soft).await
        };
        result.attempts += 1;
        result.updated_at = crate::api::now_ms();
        result.instance.clone_from(&shared.owner);
        match outcome {
            Outcome::Success { code } => {
                slot.success.inc();
                result.state = NodeState::Succeeded;
                result.status_code = Some(code);
                result.error = None;
                progress.report(shared, result, item.kind);
                return;
            }
            Outcome::Fail { code, error } => {
                slot.fail.inc();
                let reason = if code.is_some() { FailureReason::Status } else { FailureReason::Unsupported };
                shared.metrics.node_failed(&slot.node.name, reason);
                result.state = NodeState::Failed;
                result.status_code = code;
                result.error = Some(error);
                progress.report(shared, result, item.kind);
                return;
            }
            Outcome::Retry { code, error } => {
                slot.retry.inc();
                let wait =
                    backoff(result.attempts, shared.config.retry_initial, shared.config.retry_max, &mut rand::rng());
                result.status_code = code;
                if result.updated_at.after(wait) >= deadline {
                    shared.metrics.node_failed(&slot.node.name, FailureReason::Deadline);
                    result.state = NodeState::Failed;
                    result.error = Some(format!(
                        "gave up after {} attempts before the item's deadline; last error: {error}",
                        result.attempts
                    ));
                    progress.report(shared, result, item.kind);
                    return;
                }
                result.error = Some(error);
                tracing::debug!(node = %slot.node.name, item = item.id, attempts = result.attempts, "Node attempt failed; retrying.");
                progress.report(shared, result.clone(), item.kind);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A command published to the agents of a tier's bus nodes, and where their answers arrive
/// (each with the node's index in the command's node list).
struct Sent {
    id: String,
    answers: tokio::sync::mpsc::UnboundedReceiver<(usize, cachectl_bus::protocol::Answer)>,
}

/// Waits for the answers of `nodes` (a tier's bus nodes) to the item's command, published once
/// for all of them, until the deadline; the agents retry transient failures of their caches
/// themselves. While a node's agent is not heard from, the node's result says so ("waiting for
/// agent …"), and so does the item's reason. One future, timer and channel for all the nodes,
/// not one per node: in a fleet of 1,000 an item's waits cost the control plane more than its
/// answers did.
async fn run_via_bus(
    shared: &Shared,
    progress: &Progress,
    bus: &Bus,
    item: &cachectl_core::Item,
    nodes: Vec<(&NodeSlot, NodeResult)>,
    deadline: Timestamp,
    sent: Sent,
) {
    let Sent { id, mut answers } = sent;
    let mut pending: Vec<Option<(&NodeSlot, NodeResult)>> = nodes.into_iter().map(Some).collect();
    let mut noted = vec![false; pending.len()];
    let mut left = pending.len();
    let mut health = bus.health_changes();
    let mut health_open = true;
    let mut look = true;
    // The health change count last looked at; `None` until the first look, at every node.
    let mut looked: Option<u64> = None;
    let expiry = tokio::time::sleep(deadline.since(crate::api::now_ms()));
    tokio::pin!(expiry);
    let last_seen = |name: &str| match bus.last_seen(name) {
        Some(seen) => format!("last seen {}", crate::wire::views::time(seen.received_at)),
        None => "never seen".to_owned(),
    };
    while left > 0 {
        if std::mem::take(&mut look) {
            let count = *health.borrow_and_update();
            // Only the unanswered nodes whose health changed since the last look, if known.
            let indices =
                looked.and_then(|seen| bus.changed_waiting(&id, seen)).unwrap_or_else(|| (0..pending.len()).collect());
            looked = Some(count);
            for index in indices {
                let Some(Some((slot, result))) = pending.get_mut(index) else { continue };
                let name = slot.node.name.as_str();
                let waiting = !bus.is_up(name);
                if waiting != noted[index] {
                    noted[index] = waiting;
                    result.updated_at = crate::api::now_ms();
                    result.error = waiting.then(|| format!("{WAITING}{name} ({})", last_seen(name)));
                    progress.report(shared, result.clone(), item.kind);
                }
            }
        }
        tokio::select! {
            // Answers first: one that came in with the deadline still counts.
            biased;
            answered = answers.recv() => {
                let Some((index, answer)) = answered else { return };
                let Some((slot, result)) = pending.get_mut(index).and_then(Option::take) else { continue };
                left -= 1;
                record_answer(shared, progress, item, slot, result, answer);
            }
            () = &mut expiry => {
                while let Ok((index, answer)) = answers.try_recv() {
                    if let Some((slot, result)) = pending.get_mut(index).and_then(Option::take) {
                        record_answer(shared, progress, item, slot, result, answer);
                    }
                }
                for (slot, mut result) in pending.iter_mut().filter_map(Option::take) {
                    let name = slot.node.name.as_str();
                    bus.forget(name, &id);
                    slot.fail.inc();
                    shared.metrics.node_failed(name, FailureReason::AgentSilent);
                    result.state = NodeState::Failed;
                    result.updated_at = crate::api::now_ms();
                    result.error =
                        Some(format!("agent {name} did not answer before the item's deadline ({})", last_seen(name)));
                    progress.report(shared, result, item.kind);
                }
                return;
            }
            changed = health.changed(), if health_open => {
                health_open = changed.is_ok();
                look = true;
            }
        }
    }
}

/// Records a node's answer to an item's command.
fn record_answer(
    shared: &Shared,
    progress: &Progress,
    item: &cachectl_core::Item,
    slot: &NodeSlot,
    mut result: NodeResult,
    answer: cachectl_bus::protocol::Answer,
) {
    let name = slot.node.name.as_str();
    result.attempts += answer.attempts.max(1);
    result.updated_at = crate::api::now_ms();
    result.instance.clone_from(&shared.owner);
    result.status_code = answer.code;
    if answer.ok {
        slot.success.inc();
        if let Some(evicted) = answer.evicted {
            tracing::debug!(node = name, item = item.id, evicted, "The agent removed cached objects.");
        }
        result.state = NodeState::Succeeded;
        result.error = None;
    } else {
        slot.fail.inc();
        shared.metrics.node_failed(name, FailureReason::Agent);
        result.state = NodeState::Failed;
        result.error = Some(answer.error.unwrap_or_else(|| "failed".to_owned()));
    }
    progress.report(shared, result, item.kind);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(item_id: i64, status: ItemStatus, nodes: &[(&str, NodeState)]) -> ItemUpdate {
        ItemUpdate {
            item_id,
            status,
            progress: 0,
            started_at: Some(Timestamp::EPOCH),
            finished_at: status.is_final().then_some(Timestamp::EPOCH),
            reason: None,
            nodes: nodes
                .iter()
                .map(|(node, state)| NodeResult {
                    node: (*node).to_owned(),
                    state: *state,
                    attempts: 1,
                    status_code: None,
                    error: None,
                    updated_at: Timestamp::EPOCH,
                    instance: String::new(),
                })
                .collect(),
        }
    }

    fn ids(batch: &[ItemUpdate]) -> Vec<(i64, ItemStatus, usize)> {
        batch.iter().map(|u| (u.item_id, u.status, u.nodes.len())).collect()
    }

    #[test]
    fn progress_is_held_until_the_item_finishes_and_then_written_before_its_end() {
        let mut held = Held::new(Duration::from_secs(60));
        let mut batch = Vec::new();
        held.take(update(1, ItemStatus::Processing, &[]), &mut batch);
        held.take(update(1, ItemStatus::Processing, &[("a", NodeState::Succeeded)]), &mut batch);
        held.take(update(2, ItemStatus::Processing, &[]), &mut batch);
        assert!(batch.is_empty(), "progress alone is held: {:?}", ids(&batch));
        held.take(update(1, ItemStatus::Completed, &[("b", NodeState::Succeeded)]), &mut batch);
        assert_eq!(
            ids(&batch),
            vec![(1, ItemStatus::Processing, 0), (1, ItemStatus::Processing, 1), (1, ItemStatus::Completed, 1)],
            "the final report takes its item's held reports along, in order, and no other item's"
        );
        batch.clear();
        held.release_due(false, &mut batch);
        assert!(batch.is_empty(), "item 2 is not due yet");
        held.release_due(true, &mut batch);
        assert_eq!(ids(&batch), vec![(2, ItemStatus::Processing, 0)], "everything goes at the end");
        assert_eq!(held.due(), None);
    }

    #[test]
    fn a_failed_attempt_or_a_reason_is_written_at_once() {
        let mut held = Held::new(Duration::from_secs(60));
        let mut batch = Vec::new();
        held.take(update(1, ItemStatus::Processing, &[]), &mut batch);
        held.take(update(1, ItemStatus::Processing, &[("a", NodeState::Pending)]), &mut batch);
        assert_eq!(ids(&batch), vec![(1, ItemStatus::Processing, 0), (1, ItemStatus::Processing, 1)]);
        batch.clear();
        let mut noted = update(2, ItemStatus::Processing, &[]);
        noted.reason = Some("waiting for agent a (never seen)".to_owned());
        held.take(noted, &mut batch);
        assert_eq!(ids(&batch), vec![(2, ItemStatus::Processing, 0)]);
        assert_eq!(held.due(), None, "nothing is left held");
    }

    #[tokio::test]
    async fn held_progress_is_written_once_due_and_an_ended_execution_releases_its_item() {
        let mut held = Held::new(Duration::from_millis(20));
        let mut batch = Vec::new();
        held.take(update(1, ItemStatus::Processing, &[]), &mut batch);
        held.take(update(2, ItemStatus::Processing, &[]), &mut batch);
        held.release(2, &mut batch);
        assert_eq!(ids(&batch), vec![(2, ItemStatus::Processing, 0)], "an ended execution releases its item");
        batch.clear();
        let due = held.due().expect("item 1 is held");
        tokio::time::sleep_until(due).await;
        held.release_due(false, &mut batch);
        assert_eq!(ids(&batch), vec![(1, ItemStatus::Processing, 0)]);
        assert_eq!(held.due(), None);
    }
}
