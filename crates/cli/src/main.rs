//! The `cachectl` binary: `serve` runs the control plane, `agent` runs beside a cache; `refresh`,
//! `prefetch`, `status`, `tasks`, `watch` and `nodes` are clients of its native API. This file parses flags and dispatches;
//! the service lives in `cachectl-server`, the client in `client.rs`.

mod admin;
mod client;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use client::{Client, Connection, Failure, exit};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// cachectl: a control plane for CDN cache refresh and prefetch.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a client command reaches the server.
#[derive(Debug, Args)]
struct Remote {
    /// Base URL of the cachectl server.
    #[arg(long, env = "CACHECTL_SERVER", global = true)]
    server: Option<String>,
    /// A token of your account (Bearer).
    #[arg(long, env = "CACHECTL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Client configuration file with `server = "..."` and `token = "..."`
    /// (default: ~/.config/cachectl/client.toml).
    #[arg(long, env = "CACHECTL_CLIENT_CONFIG", global = true)]
    client_config: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// The refresh flags of tag, regex and soft purges.
#[derive(Debug, Args)]
struct Targets {
    /// Purge every object of --host that its origin tagged with this cache tag (repeatable).
    #[arg(long, requires = "host", conflicts_with_all = ["dir", "then_prefetch", "regex"])]
    tag: Vec<String>,
    /// Purge every object of --host whose path and query match this regex (repeatable).
    #[arg(long, requires = "host", conflicts_with_all = ["dir", "then_prefetch"])]
    regex: Vec<String>,
    /// The host of --tag or --regex (one of your domains).
    #[arg(long)]
    host: Option<String>,
    /// Confirm a --regex that matches every path of the host.
    #[arg(long, requires = "regex")]
    all: bool,
    /// Soft purge: mark the URLs or tagged objects stale (served stale while one request
    /// refetches them) instead of removing them.
    #[arg(long, conflicts_with_all = ["dir", "then_prefetch", "regex"])]
    soft: bool,
}

impl Targets {
    /// The native submission of a refresh of `kind` with these flags.
    fn body(&self, kind: &str, urls: &[String], dir: bool) -> serde_json::Value {
        use serde_json::json;
        let mut body = if !self.tag.is_empty() {
            json!({"kind": kind, "type": "tag", "host": self.host, "tags": self.tag})
        } else if !self.regex.is_empty() {
            json!({"kind": kind, "type": "regex", "host": self.host, "regexes": self.regex, "confirm_all": self.all})
        } else {
            json!({"kind": kind, "type": if dir { "dir" } else { "url" }, "urls": urls})
        };
        if !urls.is_empty() {
            // URLs beside --tag or --regex: the server says what is wrong.
            body["urls"] = json!(urls);
        }
        if self.soft {
            body["soft"] = json!(true);
        }
        body
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// The configuration file (TOML). Keys can be overridden by CACHECTL_<SECTION>__<KEY>.
        #[arg(long, short, env = "CACHECTL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply the store's migrations (SQLite or PostgreSQL) and exit.
    Migrate {
        /// The configuration file (TOML); only `[store]` is used.
        #[arg(long, short, env = "CACHECTL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// The configuration file (TOML).
        #[arg(long, short, env = "CACHECTL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Refresh (purge) URLs, directories with --dir, or a host's objects by cache tag (--tag) or
    /// regex (--regex); --soft marks URLs or tagged objects stale instead of removing them.
    #[command(alias = "purge")]
    Refresh {
        /// The URLs.
        #[arg(required_unless_present_any = ["tag", "regex"])]
        urls: Vec<String>,
        /// The URLs are directories (ending with /): evict everything under them.
        #[arg(long)]
        dir: bool,
        /// Prefetch each URL once its refresh completed on every node.
        #[arg(long, conflicts_with = "dir")]
        then_prefetch: bool,
        #[command(flatten)]
        targets: Targets,
        /// Wait until every item is final, showing progress.
        #[arg(long)]
        wait: bool,
        /// Idempotency-Key: resubmitting with the same key returns the same task.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Prefetch (warm) URLs.
    Prefetch {
        /// The URLs.
        urls: Vec<String>,
        /// Read URLs from a file, one per line.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Wait until every item is final, showing progress.
        #[arg(long)]
        wait: bool,
        /// Idempotency-Key: resubmitting with the same key returns the same task.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a task, its items and every node's result.
    Status {
        /// The task id.
        task: i64,
        /// Wait until every item is final, showing progress.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List your tasks, newest first.
    Tasks {
        /// Created since: an RFC 3339 time or a duration ago (2h, 30m).
        #[arg(long)]
        since: Option<String>,
        /// running, completed or failed.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1-500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The next page's cursor from a previous listing.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the cache nodes serving your domains, their transport and their agents' health,
    /// and the agents heartbeating without being configured.
    Nodes {
        #[command(flatten)]
        remote: Remote,
    },
    /// Manage accounts, their tokens and access keys, edges, and read the audit log, with an
    /// admin token (docs/administration.md).
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
        #[command(flatten)]
        remote: admin::AdminRemote,
    },
    /// Run the agent beside one cache: apply its node's commands from the bus.
    Agent {
        /// The agent's configuration file (TOML, one `[agent]` table). Keys can be overridden
        /// by CACHECTL_AGENT__<KEY>.
        #[arg(long, short, env = "CACHECTL_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Follow a task live until it is final.
    Watch {
        /// The task id.
        task: i64,
        #[command(flatten)]
        remote: Remote,
    },
}

fn init_telemetry() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHECTL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
}

/// mimalloc instead of glibc's malloc: a record page allocates and frees a few hundred small
/// strings; glibc spent a tenth of the page's server time on them (BENCHMARKS.md, "mimalloc").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn connect(remote: &Remote) -> Result<Client, Failure> {
    let conn = Connection::resolve(remote.server.clone(), remote.token.clone(), remote.client_config.as_deref())?;
    Client::new(conn).map_err(|e| Failure { code: exit::SERVER, message: format!("{e:#}") })
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Submits, optionally waits, prints, and returns the exit code.
async fn submit(remote: &Remote, body: serde_json::Value, wait: bool, key: Option<&str>) -> Result<u8, Failure> {
    let client = connect(remote)?;
    let submitted = client.submit(&body, key).await?;
    let id = submitted["task"]["id"].as_i64().unwrap_or_default();
    for r in submitted["rejected"].as_array().into_iter().flatten() {
        eprintln!("rejected {}: {}", r["url"].as_str().unwrap_or(""), r["reason"].as_str().unwrap_or(""));
    }
    if !wait {
        if remote.json {
            print_json(&submitted);
        } else {
            println!("task {id} submitted: {} items", submitted["task"]["counts"]["total"]);
        }
        return Ok(exit::OK);
    }
    let detail = client.wait(id, remote.json).await?;
    if remote.json {
        print_json(&detail);
    } else {
        print!("{}", client::render_task(&detail));
    }
    Ok(client::outcome(&detail))
}

/// Runs one subcommand. Longer than the house limit on purpose: one arm per subcommand, each a
/// call into `client` or `cachectl_server`, so that every command's entry is found in one place.
async fn run(command: Command) -> Result<u8, Failure> {
    let invalid = |e: anyhow::Error| Failure { code: exit::INVALID, message: format!("{e:#}") };
    match command {
        Command::CheckConfig { config } => {
            let settings = cachectl_server::config::Config::load(config.as_deref())
                .and_then(|c| c.validate())
                .map_err(|e| invalid(e.into()))?;
            println!("configuration ok: {} accounts, {} edge nodes", settings.accounts.len(), settings.nodes.len());
            Ok(exit::OK)
        }
        Command::Migrate { config } => {
            init_telemetry();
            let settings = cachectl_server::config::Config::load(config.as_deref())
                .and_then(|c| c.validate())
                .map_err(|e| invalid(e.into()))?;
            cachectl_server::migrate(&settings.store_url)
                .await
                .map_err(|e| Failure { code: exit::SERVER, message: format!("{e:#}") })?;
            println!("store migrated: {}", cachectl_server::redact_url(&settings.store_url));
            Ok(exit::OK)
        }
        Command::Serve { config } => {
            init_telemetry();
            let settings = cachectl_server::config::Config::load(config.as_deref())
                .and_then(|c| c.validate())
                .map_err(|e| invalid(e.into()))?;
            let app = cachectl_server::Application::build(settings)
                .await
                .context("starting cachectl")
                .map_err(|e| Failure { code: exit::SERVER, message: format!("{e:#}") })?
                .reload_on_sighup(config);
            app.run_until_stopped(shutdown_token())
                .await
                .map_err(|e| Failure { code: exit::SERVER, message: format!("{e:#}") })?;
            Ok(exit::OK)
        }
        Command::Refresh { urls, dir, then_prefetch, targets, wait, idempotency_key, remote } => {
            let kind = if then_prefetch { "refresh_then_prefetch" } else { "refresh" };
            submit(&remote, targets.body(kind, &urls, dir), wait, idempotency_key.as_deref()).await
        }
        Command::Prefetch { mut urls, file, wait, idempotency_key, remote } => {
            if let Some(file) = file {
                urls.extend(client::read_url_file(&file)?);
            }
            if urls.is_empty() {
                return Err(Failure { code: exit::INVALID, message: "no URL given: pass URLs or --file".into() });
            }
            let body = serde_json::json!({"kind": "prefetch", "type": "url", "urls": urls});
            submit(&remote, body, wait, idempotency_key.as_deref()).await
        }
        Command::Status { task, wait, remote } => {
            let client = connect(&remote)?;
            let detail = if wait { client.wait(task, remote.json).await? } else { client.task(task).await? };
            if remote.json {
                print_json(&detail);
            } else {
                print!("{}", client::render_task(&detail));
            }
            Ok(if detail["task"]["state"] == "running" { exit::OK } else { client::outcome(&detail) })
        }
        Command::Nodes { remote } => {
            let list = connect(&remote)?.nodes().await?;
            if remote.json {
                print_json(&list);
            } else {
                print!("{}", client::render_nodes(&list));
            }
            Ok(exit::OK)
        }
        Command::Admin { command, remote } => admin::run(command, &remote).await,
        Command::Agent { config } => {
            init_telemetry();
            let config = cachectl_bus::agent::AgentConfig::load(&config).map_err(|e| invalid(anyhow::anyhow!(e)))?;
            cachectl_bus::agent::run(config, shutdown_token())
                .await
                .map_err(|e| Failure { code: exit::SERVER, message: format!("{e:#}") })?;
            Ok(exit::OK)
        }
        Command::Watch { task, remote } => {
            let client = connect(&remote)?;
            let detail = client.wait(task, remote.json).await?;
            if remote.json {
                print_json(&detail);
            } else {
                print!("{}", client::render_task(&detail));
            }
            Ok(client::outcome(&detail))
        }
        Command::Tasks { since, status, limit, cursor, remote } => {
            let client = connect(&remote)?;
            let mut query = vec![("limit", limit.to_string())];
            if let Some(since) = since {
                query.push(("since", client::parse_since(&since)?));
            }
            if let Some(status) = status {
                query.push(("status", status));
            }
            if let Some(cursor) = cursor {
                query.push(("cursor", cursor));
            }
            let page = client.tasks(&query).await?;
            if remote.json {
                print_json(&page);
            } else {
                print!("{}", client::render_tasks(&page));
            }
            Ok(exit::OK)
        }
    }
}

/// SIGINT/SIGTERM to one cancellation token.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
        tracing::info!("Shutdown signal received; draining.");
        trigger.cancel();
    });
    token
}
