//! SIGHUP: the configuration file is read again and its accounts, credentials, webhooks, edges
//! and admin tokens take effect at once (docs/administration.md, "Reloading the file"). What
//! only a restart changes (the listener, the store, the worker, the bus, the timeouts) is
//! named in the log when it differs; an invalid file is refused whole and the running
//! configuration stays.

use crate::config::{Config, Settings};
use crate::directory::DirectoryHandle;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Reloads `path` into `directory` on every SIGHUP until `shutdown`.
pub async fn on_sighup(directory: Arc<DirectoryHandle>, path: Option<PathBuf>, shutdown: CancellationToken) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP cannot be handled; the configuration is read at start only.");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        reload(&directory, path.as_deref()).await;
    }
}

/// Reads the file again and applies it; logs what it did.
pub async fn reload(directory: &DirectoryHandle, path: Option<&std::path::Path>) {
    let shown = path.map_or_else(|| "(no file: environment only)".to_owned(), |p| p.display().to_string());
    let settings = match Config::load(path).and_then(|c| c.validate()) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!(file = %shown, error = %e, "SIGHUP: the configuration is invalid; nothing changed.");
            return;
        }
    };
    let old = directory.file();
    for key in restart_only_changes(&old, &settings) {
        tracing::warn!(file = %shown, key, "SIGHUP: this setting changed but takes effect only at a restart.");
    }
    let (accounts, edges) = (settings.accounts.len(), settings.nodes.len());
    match directory.replace_file(Arc::new(settings)).await {
        Ok(()) => tracing::info!(file = %shown, accounts, edges, "SIGHUP: configuration reloaded."),
        Err(e) => {
            tracing::warn!(file = %shown, error = %e, "SIGHUP: reloaded, but the store could not be read; the poll retries.")
        }
    }
}

/// The sections and keys that differ between `old` and `new` and are read at start only.
#[must_use]
pub fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut keys = Vec::new();
    if old.listen != new.listen {
        keys.push("server.listen");
    }
    if old.store_url != new.store_url || old.store_connections != new.store_connections {
        keys.push("store");
    }
    if differs(&old.http, &new.http) || old.shutdown_grace != new.shutdown_grace {
        keys.push("server (timeouts, max_connections, shutdown_grace)");
    }
    if differs(&old.worker, &new.worker) {
        keys.push("worker");
    }
    if differs(&old.retention, &new.retention) {
        keys.push("retention");
    }
    if differs(&old.bus, &new.bus) {
        keys.push("bus");
    }
    if old.timezone != new.timezone {
        keys.push("baishan.timezone");
    }
    if old.admin.poll_interval != new.admin.poll_interval {
        keys.push("admin.poll_interval");
    }
    keys
}
