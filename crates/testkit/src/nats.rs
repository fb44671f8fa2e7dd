//! A NATS server with JetStream (Debian's `nats-server` package) on 127.0.0.1 with a free port,
//! storing its streams in a temporary directory, stopped (with its process group) when dropped.

use crate::caches::try_listening;
use crate::{Group, free_port};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A running `nats-server -js`.
pub struct Nats {
    /// Its client port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    group: Option<Group>,
}

impl Nats {
    /// A fresh server with an empty store.
    ///
    /// # Panics
    /// nats-server is not installed or does not listen.
    pub async fn start() -> Self {
        let mut nats = Self { port: free_port(), dir: tempfile::tempdir().unwrap(), group: None };
        // A port found free can be taken before nats-server binds it: up to three ports.
        let mut errors = Vec::new();
        for _ in 0..3 {
            match nats.try_start().await {
                Ok(()) => return nats,
                Err(e) => errors.push(e),
            }
            nats.port = free_port();
        }
        panic!("nats-server did not start: {}", errors.join("; "));
    }

    /// Starts the stopped server again on the same port and store (what JetStream stored on
    /// disk is there again).
    ///
    /// # Panics
    /// As [`Nats::start`].
    pub async fn start_again(&mut self) {
        if let Err(e) = self.try_start().await {
            panic!("{e}");
        }
    }

    async fn try_start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("nats.log")).unwrap();
        let mut group = Group::spawn(
            Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
                .arg(self.dir.path().join("store"))
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("nats-server must be installed (scripts/test.sh installs it)");
        try_listening(&mut group, self.port, "nats-server", Duration::from_secs(20))
            .await
            .map_err(|e| format!("{e}; its log: {}", self.log()))?;
        self.group = Some(group);
        Ok(())
    }

    /// Stops the server (SIGTERM, as an operator's restart does).
    pub fn stop(&mut self) {
        if let Some(mut group) = self.group.take() {
            group.stop();
        }
    }

    /// The server's process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.group.as_ref().map(Group::id)
    }

    /// `nats://127.0.0.1:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
