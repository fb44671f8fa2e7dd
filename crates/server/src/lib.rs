//! The cachectl service: configuration, the HTTP dialects, the worker that drives the edge
//! caches, the retention sweep, and start-up. `Application::build` wires them together;
//! `Application::run_until_stopped` runs them until the shutdown token fires.

pub mod api;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod config;
pub mod console;
pub mod directory;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod retention;
pub mod secrets;
pub mod streams;
pub mod webhooks;
pub mod wire;
pub mod worker;

use anyhow::Context;
use cachectl_core::service::Service;
use config::Settings;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A built, not yet running service: the listener is bound and the store is migrated.
pub struct Application {
    listener: TcpListener,
    store: Arc<dyn cachectl_core::Store>,
    state: api::AppState,
    worker: worker::Worker,
    settings: Arc<Settings>,
    /// Stops the bus's tasks once the worker has stopped.
    bus_shutdown: CancellationToken,
    /// The configuration file SIGHUP re-reads.
    config_path: Option<std::path::PathBuf>,
}

impl Application {
    /// Opens the store, binds the listener and prepares the worker.
    ///
    /// # Errors
    /// The store cannot be opened or migrated, or the address cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        tracing::info!(store = %redact_url(&settings.store_url), "Opening the store.");
        let store =
            cachectl_store::open_with(&settings.store_url, settings.migrate_on_start, settings.store_connections)
                .await
                .context("opening the store")?;
        let wake = Arc::new(Notify::new());
        let notify = wake.clone();
        let service = Service::new(store.clone(), settings.timezone, Arc::new(move || notify.notify_one()));
        let metrics = Arc::new(metrics::Metrics::default());
        let owner = format!("{}-{}", hostname(), std::process::id());
        let shutdown = CancellationToken::new();
        let directory = directory::DirectoryHandle::start(store.clone(), settings.clone())
            .await
            .context("reading the accounts and edges of the store")?;
        let bus = match &settings.bus {
            Some(bus) => {
                let names: Vec<String> = directory
                    .current()
                    .edges
                    .iter()
                    .filter(|e| e.node.via_bus)
                    .map(|e| e.node.node.name.clone())
                    .collect();
                tracing::info!(url = %bus.url, nodes = names.len(), "Connecting to the bus.");
                Some(bus::Bus::start(bus.clone(), &owner, &names, shutdown.clone()).await?)
            }
            None => None,
        };
        let worker = worker::Worker::new(
            store.clone(),
            directory.subscribe(),
            bus.clone(),
            settings.worker.clone(),
            owner,
            wake,
            metrics.clone(),
        )?;
        let admin_store: Arc<dyn cachectl_core::admin::DirectoryStore> = store.clone();
        let streams = streams::StreamSlots::new(settings.max_streams_per_account);
        let state =
            api::AppState { service, settings: settings.clone(), metrics, bus, directory, admin_store, streams };
        let listener =
            TcpListener::bind(settings.listen).await.with_context(|| format!("binding {}", settings.listen))?;
        let wanted = settings.http.max_connections as u64 + 256;
        if let Some(limit) = http::open_file_limit().filter(|limit| *limit < wanted) {
            tracing::warn!(
                open_file_limit = limit,
                max_connections = settings.http.max_connections,
                "The open-file limit is below [server] max_connections plus room for the store and the edges; \
                 raise it (ulimit -n, LimitNOFILE=) or lower max_connections."
            );
        }
        tracing::info!(
            address = %listener.local_addr()?,
            accounts = state.directory.current().accounts.len(),
            edges = state.directory.current().edges.len(),
            "Listening."
        );
        Ok(Self { listener, store, state, worker, settings, bus_shutdown: shutdown, config_path: None })
    }

    /// Re-reads `path` (with the environment's overrides) on SIGHUP while running.
    #[must_use]
    pub fn reload_on_sighup(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.config_path = path;
        self
    }

    /// The bound address (useful when the configuration asked for port 0).
    ///
    /// # Errors
    /// The socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves HTTP, runs the worker and the retention sweep until `shutdown` fires, then drains.
    ///
    /// # Errors
    /// The HTTP server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { listener, store, state, worker, settings, bus_shutdown, config_path } = self;
        let reloader = tokio::spawn(reload::on_sighup(state.directory.clone(), config_path, shutdown.clone()));
        let grace = settings.shutdown_grace;
        if !settings.worker.enabled {
            tracing::info!("The worker is disabled ([worker] enabled = false): this instance only takes requests.");
        }
        let worker_task = settings.worker.enabled.then(|| tokio::spawn(worker.run(shutdown.clone(), grace)));
        let r = &settings.retention;
        let sweeper =
            tokio::spawn(retention::run(store.clone(), r.days, r.sweep_batch, r.sweep_interval, shutdown.clone()));
        let notifier = tokio::spawn(webhooks::run(store.clone(), store, state.directory.subscribe(), shutdown.clone()));
        let poller = tokio::spawn(state.directory.clone().poll(settings.admin.poll_interval, shutdown.clone()));
        let app = api::router(state);
        let stop = shutdown.clone();
        http::serve(listener, app, settings.http, stop).await;
        tracing::info!("HTTP server drained.");
        if let Some(worker_task) = worker_task {
            let _ = worker_task.await;
        }
        bus_shutdown.cancel();
        let _ = sweeper.await;
        let _ = notifier.await;
        let _ = poller.await;
        let _ = reloader.await;
        Ok(())
    }
}

/// Applies the store's migrations and returns.
///
/// # Errors
/// The store cannot be reached or migrated, or its schema is newer than this binary.
pub async fn migrate(store_url: &str) -> anyhow::Result<()> {
    cachectl_store::open(store_url, true).await.context("migrating the store")?;
    Ok(())
}

/// A store URL without its password, for the log.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "cachectl".to_owned(), |h| h.trim().to_owned())
}
