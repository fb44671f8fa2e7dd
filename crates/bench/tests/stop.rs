//! A harness run stopped by SIGTERM stops what it started: the processes it had spawned (Varnish
//! nodes, the cachectl server) are gone after it exits, not left running under init.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The processes whose parent is `parent`, from `/proc`.
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Some(pid) = entry.ok().and_then(|e| e.file_name().to_str()?.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`; the command name may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its entry is left for its new parent to collect.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next()) != Some("Z"))
}

/// Starts the harness with `args`, waits for a line of its progress containing `marker`, checks
/// that at least `expected` processes run under it, sends SIGTERM and checks that they are gone
/// after it exited, unsuccessfully and saying why.
fn stopped_by_sigterm(args: &[&str], marker: &str, expected: usize) {
    let out = tempfile::tempdir().expect("a temporary directory");
    let mut harness = Command::new(env!("CARGO_BIN_EXE_cachectl-bench"))
        .args(args)
        .arg("--out")
        .arg(out.path().join("results.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the harness starts");
    let mut stderr = BufReader::new(harness.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).expect("reading stderr") > 0, "the harness ended early: {seen}");
        seen.push_str(&line);
        if line.contains(marker) {
            break;
        }
    }
    let started = children(harness.id());
    assert!(started.len() >= expected, "{expected} processes run under the harness: {started:?}\n{seen}");

    let kill = Command::new("kill").args(["-TERM", &harness.id().to_string()]).status().expect("kill runs");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = harness.try_wait().expect("waiting for the harness") {
            break status;
        }
        assert!(Instant::now() < deadline, "the harness did not stop within 60 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    let left: Vec<u32> = started.into_iter().filter(|&pid| alive(pid)).collect();
    assert!(left.is_empty(), "processes the harness started are still running: {left:?}");
    assert!(!status.success(), "a stopped run is not a success: {status}");
    assert!(rest.contains("stopped by SIGTERM"), "the harness says why it stopped: {rest}");
}

#[test]
fn a_run_stopped_by_sigterm_stops_the_processes_it_started() {
    // Stopped while the latency scenario runs: the nodes and the server are up, and 2,000 tasks
    // one every 10 ms keep the run busy for 20 s. Two Varnish nodes and the server.
    stopped_by_sigterm(
        &[
            "--nodes",
            "2",
            "--fanout-urls",
            "200",
            "--direct-seconds",
            "1",
            "--shell-purges",
            "20",
            "--latency-tasks",
            "2000",
            "--no-postgres",
            "--no-wrk",
        ],
        "scenario 2",
        3,
    );
}

#[test]
fn a_mixed_load_stopped_by_sigterm_stops_the_processes_it_started() {
    // Stopped once its load runs (for a minute, unless stopped): one Varnish node and the server.
    let args = ["--mixed", "--nodes", "1", "--accounts", "2", "--mixed-seconds", "60", "--mixed-query-rate", "200"];
    stopped_by_sigterm(&args, "mixed load: 1000 URLs/s", 2);
}
