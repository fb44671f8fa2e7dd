//! A NATS server with JetStream (Debian's `nats-server` package) on 127.0.0.1 with a free port,
//! storing its streams in a temporary directory, stopped (with its process group) when dropped.

use crate::caches::wait_port;
use crate::{Group, free_port};
use std::process::{Command, Stdio};

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
        nats.start_again().await;
        nats
    }

    /// Starts the stopped server again on the same port and store (what JetStream stored on
    /// disk is there again).
    ///
    /// # Panics
    /// As [`Nats::start`].
    pub async fn start_again(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("nats.log")).unwrap();
        let group = Group::spawn(
            Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
                .arg(self.dir.path().join("store"))
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("nats-server must be installed (scripts/test.sh installs it)");
        self.group = Some(group);
        wait_port(self.port, "nats-server").await;
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
