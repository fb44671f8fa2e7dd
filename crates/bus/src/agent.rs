//! `cachectl agent`: runs on a cache host beside one Varnish or nginx, reads the fleet's command
//! messages from JetStream (a durable consumer named after the node, so that what was published
//! while it was away is delivered when it returns, in order), applies the commands of those that
//! name its node to the local cache (the others it acknowledges and skips), and sends one
//! result per command to the instance that published them, which acknowledges the command
//! message once it has them: delivery is at least once, and purges are idempotent.
//!
//! URL purges, bans, tag purges on Varnish and prefetches go through `cachectl-edge`, exactly as
//! the control plane's direct path sends them; what nginx's purge module cannot do (directory,
//! regex and tag purges) the agent does itself in the cache directory ([`crate::nginx_cache`]).

use crate::nginx_cache::{self, Matcher};
use crate::protocol::{self, Answer, Command, Heartbeat, Results, StreamSettings};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, AckKind};
use cachectl_core::policy::{DomainPattern, backoff};
use cachectl_core::{ItemType, Kind, Tier};
use cachectl_edge::{ClientSettings, Driver, EdgeClient, Node, NodeTransport, Outcome, TransportKind};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use futures::StreamExt;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// The agent's configuration file: one `[agent]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    agent: AgentConfig,
}

/// `[agent]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's name: the one in the control plane's `[[edges]]`, its subject and consumer
    /// name on the bus (1 to 64 of `A-Z a-z 0-9 _ -`).
    pub name: String,
    /// `varnish` or `nginx`.
    pub driver: Driver,
    /// `host:port` of the local cache's HTTP listener.
    pub address: String,
    /// `parent` or `edge` (default), reported in heartbeats.
    #[serde(default)]
    pub tier: Tier,
    /// The domains the cache serves (default: all), reported in heartbeats.
    #[serde(default)]
    pub domains: Vec<String>,
    /// The NATS server (`nats://host:port`; several separated by commas).
    #[serde(default = "default_nats")]
    pub nats_url: String,
    /// nginx: the `proxy_cache_path` directory, walked for directory, regex and tag purges.
    #[serde(default)]
    pub cache_path: Option<PathBuf>,
    /// Commands applied at once at most.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Purges and bans written on one connection to the local cache before the first is
    /// answered (HTTP/1.1 pipelining), over `ceil(concurrency / pipeline_depth)` connections;
    /// `1` turns pipelining off.
    #[serde(default = "default_pipeline_depth")]
    pub pipeline_depth: usize,
    /// Varnish: plain URL purges of one host sent in one request at most (the shipped VCL
    /// purges them in turn; varnishd's `max_restarts` must be at least this minus one); `1`
    /// sends one a request.
    #[serde(default = "default_purge_batch")]
    pub purge_batch: usize,
    /// How often the agent says it is alive.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Whole-request timeout to the local cache.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First retry delay after the local cache failed; doubles up to `retry_max`.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Keep this node's consumer state (what it was delivered and acknowledged) in NATS's memory
    /// rather than in a file per consumer: in a fleet of hundreds, the files are written for
    /// every command message. A NATS restart forgets such a consumer; the agent then makes it
    /// again from the last message it handled (at least once: that message comes again).
    #[serde(default = "default_true")]
    pub consumer_in_memory: bool,
    /// Replicas of the streams if the agent is the first to create them.
    #[serde(default = "default_replicas")]
    pub stream_replicas: usize,
    /// How long commands are kept if the agent is the first to create the streams.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub stream_max_age: Duration,
    /// The command streams' size at most in MiB, together, if the agent is the first to create them.
    #[serde(default = "default_max_mib")]
    pub stream_max_mib: u64,
}

fn default_nats() -> String {
    "nats://127.0.0.1:4222".to_owned()
}
fn default_concurrency() -> usize {
    64
}
fn default_pipeline_depth() -> usize {
    32
}
fn default_purge_batch() -> usize {
    8
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(10)
}
fn default_replicas() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_max_mib() -> u64 {
    1024
}
fn default_max_age() -> Duration {
    Duration::from_secs(3600)
}

impl AgentConfig {
    /// Loads `path` and the `CACHECTL_AGENT__<KEY>` environment, and checks every value.
    ///
    /// # Errors
    /// A missing file, a wrong type or an invalid value; the message names the key.
    pub fn load(path: &Path) -> Result<Self, String> {
        if !path.exists() {
            return Err(format!("agent configuration: file {} does not exist", path.display()));
        }
        let figment = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("CACHECTL_").filter(|k| k.as_str().starts_with("agent__")).split("__"));
        let file: AgentFile = figment.extract().map_err(|e| format!("agent configuration: {e}"))?;
        file.agent.validate()?;
        Ok(file.agent)
    }

    /// Parses TOML text alone and checks it (tests).
    ///
    /// # Errors
    /// As [`AgentConfig::load`].
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: AgentFile =
            Figment::new().merge(Toml::string(text)).extract().map_err(|e| format!("agent configuration: {e}"))?;
        file.agent.validate()?;
        Ok(file.agent)
    }

    fn validate(&self) -> Result<(), String> {
        let err = |key: &str, m: String| Err(format!("agent configuration: agent.{key}: {m}"));
        if !protocol::valid_name(&self.name) {
            return err("name", format!("{:?} must be 1 to 64 of A-Z a-z 0-9 _ -", self.name));
        }
        if self.address.parse::<std::net::SocketAddr>().is_err() && !self.address.contains(':') {
            return err("address", format!("{:?} is not host:port", self.address));
        }
        for (i, d) in self.domains.iter().enumerate() {
            if let Err(m) = DomainPattern::parse(d) {
                return err(&format!("domains[{i}]"), m);
            }
        }
        match (&self.cache_path, self.driver) {
            (Some(p), _) if !p.is_dir() => {
                return err("cache_path", format!("{} does not exist or is not a directory", p.display()));
            }
            (None, Driver::Nginx) => {
                return err(
                    "cache_path",
                    "is required with driver = \"nginx\" (the proxy_cache_path directory)".into(),
                );
            }
            _ => {}
        }
        if self.concurrency == 0 {
            return err("concurrency", "must be at least 1".into());
        }
        if !(1..=1024).contains(&self.pipeline_depth) {
            return err("pipeline_depth", "must be 1 to 1024".into());
        }
        if !(1..=cachectl_edge::MAX_PURGE_BATCH).contains(&self.purge_batch) {
            return err("purge_batch", format!("must be 1 to {}", cachectl_edge::MAX_PURGE_BATCH));
        }
        if self.stream_max_mib == 0 || self.stream_max_mib > 1 << 30 {
            return err("stream_max_mib", "must be 1 to 1073741824".into());
        }
        if self.heartbeat_interval.is_zero() {
            return err("heartbeat_interval", "must be more than 0".into());
        }
        Ok(())
    }

    fn node(&self) -> Node {
        Node {
            name: self.name.clone(),
            driver: self.driver,
            address: self.address.clone(),
            tier: self.tier,
            domains: Vec::new(),
        }
    }
}

/// What every command's execution shares.
struct Local {
    config: AgentConfig,
    node: Node,
    client: EdgeClient,
    transport: NodeTransport,
    permits: Semaphore,
    in_flight: AtomicU64,
    /// Command messages behind the last one delivered (JetStream says with each delivery).
    lag: AtomicU64,
}

/// Ensures the streams and returns this node's durable consumer of its commands, and whether it
/// was made now. A consumer made now starts at `from`: everything the stream holds for a node's
/// first start, the last message handled when NATS forgot the consumer.
async fn subscribe(
    js: &jetstream::Context,
    config: &AgentConfig,
    from: DeliverPolicy,
) -> anyhow::Result<(jetstream::consumer::PullConsumer, bool)> {
    let settings = StreamSettings {
        replicas: config.stream_replicas,
        max_age: config.stream_max_age,
        max_bytes: config.stream_max_mib << 20,
    };
    protocol::ensure_streams(js, settings).await?;
    let shard = protocol::command_shard(&config.name);
    let stream = js.get_stream(protocol::command_stream(shard)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Ok(consumer) = stream.get_consumer(&config.name).await {
        return Ok((consumer, false));
    }
    tracing::info!(consumer = %config.name, from = ?from, "Creating this node's command consumer.");
    stream
        .get_or_create_consumer(
            &config.name,
            jetstream::consumer::pull::Config {
                durable_name: Some(config.name.clone()),
                filter_subject: protocol::command_subject(shard),
                // A new node starts from what the stream still holds: commands published for it
                // before its agent first ran are among them (older ones are past their deadline
                // and skipped).
                deliver_policy: from,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                memory_storage: config.consumer_in_memory,
                ..Default::default()
            },
        )
        .await
        .map(|consumer| (consumer, true))
        .map_err(|e| anyhow::anyhow!("creating the consumer {}: {e}", config.name))
}

/// A connection to NATS for one agent, or for many hosted in one process (a benchmark), and
/// a count of its (re)connections.
#[derive(Clone)]
pub struct Connection {
    client: async_nats::Client,
    connected: watch::Receiver<u64>,
}

impl Connection {
    /// Connects to `url` as `name`; while NATS is away it keeps trying in the background.
    ///
    /// # Errors
    /// The URL is unusable.
    pub async fn open(url: &str, name: String) -> anyhow::Result<Self> {
        let (count, connected) = watch::channel(0u64);
        let count = Arc::new(count);
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .event_callback(move |event| {
                let count = count.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        count.send_modify(|n| *n += 1);
                    }
                }
            })
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
        Ok(Self { client, connected })
    }
}

/// Runs the agent until `shutdown`: the command in progress is finished and its results sent
/// first. While NATS cannot create the streams or the consumer, it retries (and says so in its
/// log).
///
/// # Errors
/// The NATS URL is unusable, or the HTTP client to the cache cannot be built.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let connection = Connection::open(&config.nats_url, format!("cachectl-agent {}", config.name)).await?;
    let client = connection.client.clone();
    let ran = run_on(connection, config, shutdown).await;
    let _ = client.flush().await;
    ran
}

/// Runs the agent of `config` on `connection`, which other agents may share (`config.nats_url`
/// is not used), until `shutdown`.
///
/// # Errors
/// The HTTP client to the cache cannot be built.
pub async fn run_on(connection: Connection, config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Each (re)connection is a moment to check that NATS still knows this node's consumer.
    let Connection { client, mut connected } = connection;
    connected.mark_changed();
    let js = jetstream::new(client.clone());
    let Some((consumer, _)) = consumer_until_ready(&js, &config, DeliverPolicy::All, &shutdown).await else {
        return Ok(());
    };
    let edge = EdgeClient::new(ClientSettings {
        request_timeout: config.request_timeout,
        connect_timeout: Duration::from_secs(2),
        per_node: config.concurrency,
        pipeline_depth: config.pipeline_depth,
        purge_batch: config.purge_batch,
        transport: TransportKind::Pipelined,
    })?;
    let node = config.node();
    let local = Arc::new(Local {
        transport: edge.transport(&node),
        client: edge,
        node,
        permits: Semaphore::new(config.concurrency),
        in_flight: AtomicU64::new(0),
        lag: AtomicU64::new(0),
        config,
    });
    tracing::info!(node = %local.config.name, driver = ?local.config.driver, cache = %local.config.address, "Agent started.");
    let beats = tokio::spawn(heartbeats(client.clone(), local.clone(), shutdown.clone()));
    let mut messages = read(&consumer).await.map_err(|e| anyhow::anyhow!("reading commands: {e}"))?;
    // Where a consumer made again starts: the stream time of the last message handled.
    let mut resume = DeliverPolicy::All;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            Ok(()) = connected.changed() => Reading::Connected,
            m = messages.next() => match m {
                Some(Ok(message)) => Reading::Message(Box::new(message)),
                Some(Err(e)) => Reading::Failed(e.to_string()),
                None => Reading::Ended,
            },
        };
        let message = match event {
            Reading::Message(message) => *message,
            other => {
                // The stream ended: open it again. A (re)connection or a reading error: NATS may
                // have forgotten the consumer (restarted with its state in memory, or an operator
                // deleted it); if it had to be made again (from the last message handled), read
                // the new one. A consumer that still exists keeps being read as it is: a second
                // reader would leave the first one's pull requests to receive messages nobody
                // reads until their acknowledgement times out.
                let ended = matches!(other, Reading::Ended);
                match other {
                    Reading::Failed(e) => tracing::warn!(error = %e, "Reading commands failed; checking the consumer."),
                    Reading::Ended => {
                        tracing::warn!("The command stream ended; reopening it.");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                    Reading::Connected | Reading::Message(_) => {
                        tracing::debug!("Connected to NATS; checking the consumer.");
                    }
                }
                let Some((consumer, created)) = consumer_until_ready(&js, &local.config, resume, &shutdown).await
                else {
                    break;
                };
                if created || ended {
                    match read(&consumer).await {
                        Ok(m) => messages = m,
                        Err(e) => tracing::warn!(error = %e, "Reopening the command consumer failed; retrying."),
                    }
                }
                continue;
            }
        };
        if let Ok(info) = message.info() {
            resume = DeliverPolicy::ByStartTime { start_time: info.published };
        }
        handle(&js, &local, message).await;
    }
    beats.abort();
    tracing::info!(node = %local.config.name, "Agent stopped.");
    Ok(())
}

/// Messages one pull request asks for. A delivered message's 30 s acknowledgement wait runs
/// while it waits in the agent's buffer behind the one being applied; the client's default
/// (200, asking for more at 100) let an agent that fell behind hold hundreds, which NATS
/// delivered again after 30 s while the first copies still waited: measured at 1,000 nodes,
/// a few agents answered 30 s late on every command from then on. With 8, the messages wait
/// in the stream until the agent asks for them.
const PULL_BATCH: usize = 8;

/// Reads `consumer`'s messages, [`PULL_BATCH`] a request, with the client's default idle
/// heartbeat (15 s).
async fn read(
    consumer: &jetstream::consumer::PullConsumer,
) -> Result<jetstream::consumer::pull::Stream, jetstream::consumer::StreamError> {
    consumer.stream().max_messages_per_batch(PULL_BATCH).heartbeat(Duration::from_secs(15)).messages().await
}

/// What reading the command consumer gave.
enum Reading {
    Message(Box<jetstream::Message>),
    Failed(String),
    /// The message stream ended.
    Ended,
    /// NATS (re)connected.
    Connected,
}

/// The streams and this node's consumer (`from` if it is made now). NATS may be slow or briefly
/// unable (a control plane creating the same streams at the same moment, a cluster electing a
/// leader, a restart): retries until it works, or `None` once the agent is stopped.
async fn consumer_until_ready(
    js: &jetstream::Context,
    config: &AgentConfig,
    from: DeliverPolicy,
    shutdown: &CancellationToken,
) -> Option<(jetstream::consumer::PullConsumer, bool)> {
    let mut attempt = 0u32;
    loop {
        match subscribe(js, config, from).await {
            Ok(ready) => return Some(ready),
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "Setting up the command stream failed; retrying.");
                let wait = Duration::from_millis(200 * u64::from(attempt.min(25)));
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Applies one command message and sends its results, with the message's acknowledgement
/// subject, to the instance that published it; that instance acknowledges the message once it
/// has them. A message for other nodes, or whose every deadline has passed, the agent
/// acknowledges itself; an unreadable one it dead-letters and terminates (never redelivered).
async fn handle(js: &jetstream::Context, local: &Arc<Local>, message: jetstream::Message) {
    if let Ok(info) = message.info() {
        local.lag.store(info.pending, Ordering::Relaxed);
    }
    let batch = match protocol::read_batch(&message.payload, &local.config.name) {
        Ok(None) => {
            // For other nodes.
            if let Err(e) = message.ack().await {
                tracing::debug!(error = %e, "Acknowledging another node's command message failed.");
            }
            return;
        }
        Ok(Some(batch)) if batch.commands.is_empty() => {
            return dead_letter(js, local, &message, "a batch without commands").await;
        }
        Ok(Some(batch)) => batch,
        Err(e) => return dead_letter(js, local, &message, &format!("unreadable command message: {e}")).await,
    };
    // Long commands (an nginx walk, retries until the deadline) keep the message ours.
    let progress = {
        let message = message.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let _ = message.ack_with(AckKind::Progress).await;
            }
        })
    };
    let answers = futures::future::join_all(batch.commands.iter().map(|c| execute(local, c))).await;
    progress.abort();
    // Past every deadline (the agent was away, or the message came again): the control plane
    // has failed these items and nobody waits for the message; the answers still go, for an
    // instance whose clock is behind.
    let expired = batch.commands.iter().all(|c| protocol::now_ms() >= c.deadline);
    let results = Results { node: local.config.name.clone(), answers };
    let sent = match (serde_json::to_vec(&results), message.reply.as_ref()) {
        (Ok(body), Some(ack)) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(protocol::ACK_HEADER, ack.as_str());
            js.client().publish_with_headers(batch.reply, headers, body.into()).await.map_err(|e| e.to_string())
        }
        (Err(e), _) => Err(e.to_string()),
        (_, None) => Err("the command message has no acknowledgement subject".to_owned()),
    };
    let ack = match sent {
        _ if expired => message.ack().await,
        Ok(()) => return,
        Err(e) => {
            // The message comes again (after a second) and its commands are applied again.
            tracing::warn!(error = %e, "Sending results failed; the commands will be applied again.");
            message.ack_with(AckKind::Nak(Some(RESULT_RETRY))).await
        }
    };
    if let Err(e) = ack {
        tracing::warn!(error = %e, "Acknowledging a command message failed; it will be delivered again.");
    }
}

/// How long a command message whose results could not be sent waits before it comes again.
const RESULT_RETRY: Duration = Duration::from_secs(1);

async fn dead_letter(js: &jetstream::Context, local: &Local, message: &jetstream::Message, why: &str) {
    tracing::warn!(node = %local.config.name, reason = why, "Dead-lettering a command message.");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Cachectl-Error", why.replace(['\r', '\n'], " ").as_str());
    let subject = protocol::dead_letter_subject(&local.config.name);
    match js.publish_with_headers(subject, headers, message.payload.clone()).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "Storing a dead letter failed.");
            }
        }
        Err(e) => tracing::warn!(error = %e, "Storing a dead letter failed."),
    }
    if let Err(e) = message.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "Terminating an unreadable command message failed.");
    }
}

/// Applies one command, retrying what may pass until its deadline.
async fn execute(local: &Local, command: &Command) -> Answer {
    let _permit = local.permits.acquire().await;
    local.in_flight.fetch_add(1, Ordering::Relaxed);
    let answer = attempt_until_deadline(local, command).await;
    local.in_flight.fetch_sub(1, Ordering::Relaxed);
    answer
}

async fn attempt_until_deadline(local: &Local, command: &Command) -> Answer {
    let mut answer = Answer { id: command.id.clone(), ok: false, code: None, error: None, evicted: None, attempts: 0 };
    if protocol::now_ms() >= command.deadline {
        answer.error = Some("the item's deadline passed before the agent received the command".to_owned());
        return answer;
    }
    if walks(local.config.driver, command) {
        answer.attempts = 1;
        let Some(root) = local.config.cache_path.clone() else {
            answer.error = Some("agent.cache_path is not set".to_owned());
            return answer;
        };
        let matcher = match Matcher::for_item(command.item_type, &command.target) {
            Ok(m) => m,
            Err(e) => {
                answer.error = Some(e);
                return answer;
            }
        };
        match tokio::task::spawn_blocking(move || nginx_cache::purge(&root, &matcher)).await {
            Ok(Ok(walk)) => {
                answer.ok = true;
                answer.evicted = Some(walk.removed);
            }
            Ok(Err(e)) => answer.error = Some(format!("walking the cache directory: {e}")),
            Err(e) => answer.error = Some(format!("the cache walk stopped: {e}")),
        }
        return answer;
    }
    loop {
        let outcome = local
            .client
            .execute_item(&local.node, &local.transport, command.kind, command.item_type, &command.target, command.soft)
            .await;
        answer.attempts += 1;
        match outcome {
            Outcome::Success { code } => {
                answer.ok = true;
                answer.code = Some(code);
                answer.error = None;
                return answer;
            }
            Outcome::Fail { code, error } => {
                answer.code = code;
                answer.error = Some(error);
                return answer;
            }
            Outcome::Retry { code, error } => {
                answer.code = code;
                let wait =
                    backoff(answer.attempts, local.config.retry_initial, local.config.retry_max, &mut rand::rng());
                let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                if protocol::now_ms().saturating_add(wait_ms) >= command.deadline {
                    answer.error = Some(format!(
                        "gave up after {} attempts before the item's deadline; last error: {error}",
                        answer.attempts
                    ));
                    return answer;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Whether the agent does `command` in the cache directory rather than through the cache:
/// nginx's purge module knows only exact keys.
fn walks(driver: Driver, command: &Command) -> bool {
    driver == Driver::Nginx
        && command.kind == Kind::Refresh
        && !command.soft
        && matches!(command.item_type, ItemType::Dir | ItemType::Regex | ItemType::Tag)
}

async fn heartbeats(client: async_nats::Client, local: Arc<Local>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(local.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let subject = protocol::heartbeat_subject(&local.config.name);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lag = local.lag.load(Ordering::Relaxed);
        let beat = Heartbeat {
            node: local.config.name.clone(),
            tier: local.config.tier,
            driver: local.config.driver,
            domains: local.config.domains.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            lag,
            in_flight: local.in_flight.load(Ordering::Relaxed),
            sent_at: protocol::now_ms(),
        };
        if let Ok(body) = serde_json::to_vec(&beat)
            && let Err(e) = client.publish(subject.clone(), body.into()).await
        {
            tracing::debug!(error = %e, "Sending a heartbeat failed.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_name_the_key() {
        let base = "[agent]\nname = \"edge-1\"\naddress = \"127.0.0.1:6081\"\n";
        assert!(AgentConfig::from_toml(&format!("{base}driver = \"varnish\"\n")).is_ok());
        let e = AgentConfig::from_toml(&format!("{base}driver = \"squid\"\n")).unwrap_err();
        assert!(e.contains("agent.driver") && e.contains("squid"), "{e}");
        let e = AgentConfig::from_toml(&format!("{base}driver = \"nginx\"\ncache_path = \"/nonexistent/x\"\n"))
            .unwrap_err();
        assert!(e.contains("agent.cache_path") && e.contains("/nonexistent/x"), "{e}");
        let e = AgentConfig::from_toml(&format!("{base}driver = \"nginx\"\n")).unwrap_err();
        assert!(e.contains("agent.cache_path"), "{e}");
        let e = AgentConfig::from_toml("[agent]\nname = \"a.b\"\ndriver = \"varnish\"\naddress = \"127.0.0.1:1\"\n")
            .unwrap_err();
        assert!(e.contains("agent.name"), "{e}");
        let e = AgentConfig::from_toml(&format!("{base}driver = \"varnish\"\npipeline_depth = 0\n")).unwrap_err();
        assert!(e.contains("agent.pipeline_depth"), "{e}");
        let e = AgentConfig::from_toml(&format!("{base}driver = \"varnish\"\nthreads = 3\n")).unwrap_err();
        assert!(e.contains("threads"), "{e}");
    }
}
