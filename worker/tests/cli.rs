//! The `layerwright-worker` command line, run as a process: bad arguments are refused before
//! anything starts, and SIGTERM stops a worker that has no server to talk to.
//!
//! (Its work with a real BuildGrid is tested by the examples' remote execution tests, which
//! start this binary.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_layerwright-worker");

/// Runs the worker with `arguments` and checks its exit code and that stderr holds `expected`.
fn check(arguments: &[&str], code: i32, expected: &str) {
    let output = Command::new(WORKER).args(arguments).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{arguments:?}: {stderr}");
    assert!(stderr.contains(expected), "{arguments:?}: {stderr}");
}

#[test]
fn bad_arguments_are_refused_naming_what_is_wrong() {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path().to_str().unwrap();
    check(&[], 2, "--reapi <URL>");
    check(&["--reapi", "http://127.0.0.1:1"], 2, "--cache <DIR>");
    check(&["--reapi", "http://127.0.0.1:1", "--cache", cache, "--platform", "nonsense"], 2, "--platform nonsense:");
}

#[test]
fn sigterm_stops_a_worker_waiting_for_its_server() {
    let cache = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing answers, so the worker keeps trying to connect.
    let mut worker = Command::new(WORKER)
        .args(["--reapi", "http://127.0.0.1:1", "--cache"])
        .arg(cache.path())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = rustix::process::Pid::from_child(&worker);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            worker.kill().unwrap();
            worker.wait().unwrap();
            panic!("the worker did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
}
