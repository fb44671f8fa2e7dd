//! The SQLite store on a filesystem that fills up during submissions: a tmpfs of 16 MiB mounted
//! here (the test runs as root; it fails, saying so, where mounting is impossible). The load of
//! `faults::Load` submits continuously through the Baishan, native and Baidu GEO dialects while two
//! Varnish nodes purge; a file then takes all but 512 KiB of the free space, so that the
//! submissions themselves fill the rest, and stays for three seconds after the first 503; then it
//! is deleted and space returns. The test asserts:
//! - while the disk is full, every submission is answered, either acknowledged or with the
//!   dialect's own 503 in its envelope (each of the three dialects answered at least one 503), and
//!   no request goes unanswered (the process never stops);
//! - once space returns, submissions are acknowledged again without a restart;
//! - the promises of `faults::check_promises`: every acknowledged task stored with all its items,
//!   every item completed on both nodes, none executed after it was final, none duplicated.

use crate::faults::*;
use crate::support::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs of a given size mounted on a temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount(8) runs");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs of {size} (as root): mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(self.dir.path()).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file open: detach it now, it goes when released.
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

/// Fills the filesystem of `dir` with the file `path`, then gives `headroom` bytes back; returns
/// the file's size.
fn fill(path: &PathBuf, headroom: u64) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let size = written.saturating_sub(headroom);
    file.set_len(size).unwrap();
    size
}

#[tokio::test]
async fn sqlite_disk_full_during_submissions() {
    let disk = Tmpfs::mount("16m");
    let nodes = Nodes::start(LATENCY).await;
    let store = format!("sqlite://{}/cachectl.db", disk.path().display());
    let server = Cachectl::start_on_store(Some(&store), &format!("{}{}{}", accounts(), worker(), nodes.edges())).await;
    nodes.watch(&[server.port]);
    let context = || tail(&server.log());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let load = Load::start(&[server.port], "diskfull", SHAPE);
    load.wait_acked(20, Duration::from_secs(20), &context).await;

    // The disk fills: all but 512 KiB taken by a file, the rest by the submissions.
    let filler = disk.path().join("filler");
    let filled = fill(&filler, 512 * 1024);
    let start = Instant::now();
    while load.unavailable() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the disk filled ({filled} bytes of filler) but no submission was refused\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let full_after = start.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let readyz = http.get(server.url("/readyz")).send().await.unwrap().status().as_u16();

    // Space returns.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let (refused, acked) = (load.unavailable(), load.acked());
    load.wait_acked(10, Duration::from_secs(30), &context).await;
    let recovered_after = freed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;

    assert!(report.unexpected.is_empty(), "answers other than success or the dialect's 503: {:?}", report.unexpected);
    assert_eq!(report.no_answer, 0, "every request was answered: the process never stopped\n{}", context());
    for dialect in [Dialect::Baishan, Dialect::Native, Dialect::Geo] {
        assert!(
            report.unavailable.get(&dialect).is_some_and(|n| *n > 0),
            "{dialect:?} submissions met the full disk: {:?}",
            report.unavailable
        );
    }
    wait_all_final(&http, server.port, Duration::from_secs(90), &context).await;
    let figures = check_promises(server.port, &report, &nodes, &context).await;
    assert!(!server.log().contains("panicked"), "{}", server.log());
    println!(
        "disk full {full_after:?} after the filler ({filled} bytes); {refused} submissions refused with 503 \
         ({:?}, /readyz answered {readyz} while full) until space returned, {acked} acknowledged by then; \
         submissions acknowledged again {recovered_after:?} after; {} requests in all; {figures}",
        report.unavailable, report.requests
    );
}
