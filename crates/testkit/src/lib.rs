//! Test fixtures shared by the test suites and the benchmark harness: a private PostgreSQL
//! cluster (Debian's postgresql package, `initdb` into a temporary directory, listening on
//! 127.0.0.1 with a free port), varnishd processes, the caches of the shipped edge configuration
//! and their origin ([`caches`]), and [`Group`], a child process in a process group of its own
//! whose every member is stopped when dropped. Never a system service, never a fixed port.

pub mod caches;
pub mod nats;

pub use nix::sys::signal::Signal;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process started as the leader of a new process group, so that whatever it forks
/// (nginx's workers and cache manager, varnishd's cache process) is stopped with it: dropping it
/// sends SIGTERM to the whole group, waits up to five seconds for the leader, then sends SIGKILL
/// to what is left of the group. Killing only the leader left nginx's workers running for hours.
pub struct Group {
    child: Child,
    crash_on_drop: bool,
}

impl Group {
    /// Spawns `command` as the leader of a new process group.
    ///
    /// # Errors
    /// The program cannot be started.
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        Ok(Self { child: command.process_group(0).spawn()?, crash_on_drop: false })
    }

    /// Makes dropping it kill the group at once (SIGKILL) instead of asking it to stop first: for
    /// a process whose clean shutdown the test does not need and would only wait for.
    #[must_use]
    pub fn crash_on_drop(mut self) -> Self {
        self.crash_on_drop = true;
        self
    }

    /// The leader's process id (also the group's id).
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The leader's exit status, if it has exited.
    ///
    /// # Errors
    /// The status cannot be read.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends `signal` to every process of the group.
    pub fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Kills the whole group at once (SIGKILL, no clean-up: a crash) and reaps the leader.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Stops the group: SIGTERM, up to five seconds for the leader to exit, then SIGKILL to
    /// every member left.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(Signal::SIGTERM);
            let start = Instant::now();
            while self.child.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill9();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.crash_on_drop {
            self.kill9();
        } else {
            self.stop();
        }
    }
}

/// A free TCP port on 127.0.0.1.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Whether a process of process group `group` listens on TCP port `port`: the port's listening
/// socket is among the open files of one of the group's processes. A port found free by
/// [`free_port`] can be taken by another test's process before the one started binds it; the
/// started one then exits, but a connection to the port succeeds all the same — to the other
/// process (a NATS server greeting first, a Varnish CLI port). So readiness is "our process
/// listens", not "something answers".
#[must_use]
pub fn group_listens(group: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(processes) = std::fs::read_dir("/proc") else { return false };
    processes.filter_map(Result::ok).any(|process| {
        let dir = process.path();
        let in_group = std::fs::read_to_string(dir.join("stat")).ok().and_then(|stat| {
            // pid (comm) state ppid pgrp …: comm may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().nth(2)?.parse::<u32>().ok()
        }) == Some(group);
        in_group
            && std::fs::read_dir(dir.join("fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok).any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| {
                        let target = target.to_string_lossy();
                        target
                            .strip_prefix("socket:[")
                            .and_then(|t| t.strip_suffix(']'))
                            .and_then(|t| t.parse::<u64>().ok())
                            .is_some_and(|inode| inodes.contains(&inode))
                    })
                })
            })
    })
}

/// The inodes of the sockets listening on TCP `port` (IPv4 and IPv6), from `/proc/net`.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port);
            if let (true, true, Ok(inode)) = (listening, on_port, inode.parse::<u64>()) {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// Where Debian keeps PostgreSQL's server binaries (`initdb`, `pg_ctl`), newest version first.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL server binaries in /usr/lib/postgresql/*/bin (scripts/test.sh installs them)")
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (PostgreSQL refuses root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// A private PostgreSQL cluster.
pub struct PgCluster {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    settings: String,
    _dir: tempfile::TempDir,
}

impl PgCluster {
    /// Initializes and starts a cluster (about a second).
    ///
    /// # Panics
    /// PostgreSQL is not installed or does not start: the test cannot run.
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`PgCluster::start`], with server settings (`("shared_buffers", "2GB")`) added.
    ///
    /// # Panics
    /// PostgreSQL is not installed or does not start: the test cannot run.
    #[must_use]
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("the data directory");
        if running_as_root() {
            let status =
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().expect("chown");
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let out = pg_command(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb runs");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let settings = settings.iter().map(|(k, v)| format!(" -c {k}={v}")).collect();
        let cluster = Self { port, bin, data, settings, _dir: dir };
        cluster.pg_ctl_start();
        cluster
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200{}",
            self.port,
            self.data.display(),
            self.settings
        );
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.log_file())
            .args(["-w", "-t", "30", "start"])
            .output()
            .expect("pg_ctl runs");
        assert!(out.status.success(), "pg_ctl start failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the cluster (`-m fast`: open connections are cut, as in a real restart).
    ///
    /// # Panics
    /// `pg_ctl stop` fails.
    pub fn stop(&self) {
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .expect("pg_ctl runs");
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts a stopped cluster again on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// The cluster's server log (`pg_ctl -l`).
    #[must_use]
    pub fn log_file(&self) -> PathBuf {
        self.data.join("server.log")
    }

    /// One of the cluster's own PostgreSQL programs (`pgbench`, `psql`), from the same
    /// installation as its server.
    #[must_use]
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A fresh, empty database in this cluster; returns its URL.
    ///
    /// # Panics
    /// The database cannot be created.
    pub async fn database(&self, name: &str) -> String {
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let start = Instant::now();
        let pool = loop {
            match sqlx::PgPool::connect(&admin).await {
                Ok(pool) => break pool,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(20), "cannot connect to the test cluster: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&pool).await.expect("CREATE DATABASE");
        pool.close().await;
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ =
            pg_command(&self.bin, "pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]).output();
    }
}

/// A varnishd in the foreground on 127.0.0.1 (its own working directory, its log kept there),
/// killed when dropped.
pub struct Varnishd {
    /// Its HTTP port.
    pub port: u16,
    child: Group,
    dir: tempfile::TempDir,
}

impl Varnishd {
    /// Starts varnishd running `vcl` (its text) with the extra arguments `extra`, on a free port.
    /// A port found free can be taken by another process before varnishd binds it (varnishd
    /// then exits; [`group_listens`]): up to three tries, each on new ports.
    ///
    /// # Errors
    /// varnishd is missing, or did not listen in three tries (each try's log is in the error).
    pub async fn start(vcl: &str, extra: &[&str]) -> Result<Self, String> {
        let mut errors = Vec::new();
        for _ in 0..3 {
            match Self::start_on(free_port(), vcl, extra).await {
                Ok(varnishd) => return Ok(varnishd),
                Err(e) => errors.push(e),
            }
        }
        Err(format!("varnishd did not start: {}", errors.join("; ")))
    }

    /// Starts varnishd on `port`, one try (a node that comes back on its old address).
    ///
    /// # Errors
    /// varnishd is missing, exited, or did not listen within 30 seconds (its log is in the error).
    pub async fn start_on(port: u16, vcl: &str, extra: &[&str]) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let io = |e: std::io::Error| format!("preparing varnishd's directory: {e}");
        // varnishd drops root to its own users, which must be able to enter the directory.
        let dir = tempfile::tempdir().map_err(io)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        let vcl_path = dir.path().join("cachectl.vcl");
        std::fs::write(&vcl_path, vcl).map_err(io)?;
        std::fs::write(dir.path().join("secret"), "testkit-secret\n").map_err(io)?;
        let log = dir.path().join("varnishd.log");
        let child = Group::spawn(
            Command::new("varnishd")
                .args(["-F", "-a", &format!("127.0.0.1:{port}"), "-T", &format!("127.0.0.1:{}", free_port())])
                .arg("-S")
                .arg(dir.path().join("secret"))
                .arg("-f")
                .arg(&vcl_path)
                .arg("-n")
                .arg(dir.path().join("work"))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).map_err(io)?),
        )
        .map_err(|e| format!("varnishd must be installed (scripts/test.sh and scripts/bench.sh install it): {e}"))?;
        let mut varnishd = Self { port, child, dir };
        if let Err(e) = caches::try_listening(&mut varnishd.child, port, "varnishd", Duration::from_secs(30)).await {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}: {}", text.trim()));
        }
        Ok(varnishd)
    }

    /// Its working directory (`-n`), for `varnishstat -n` and `varnishadm -n`.
    #[must_use]
    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_ours_only_while_a_process_of_our_group_listens_on_it() {
        let group = u32::try_from(nix::unistd::getpgrp().as_raw()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(group_listens(group, port));
        // Another group (none has this id: process ids are below 2^22 on Linux) does not.
        assert!(!group_listens(u32::MAX, port));
        drop(listener);
        assert!(!group_listens(group, port));
        // A connected socket is not a listening one.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", other)).unwrap();
        drop(listener);
        assert!(!group_listens(group, other));
    }
}
