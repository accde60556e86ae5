//! Signals belong to the control thread: every worker thread blocks SIGHUP, SIGINT,
//! SIGTERM, SIGUSR1 and SIGUSR2, so handlers never run on (or interrupt) the data path;
//! and two stop signals, however close together, are two: the second cuts at once.

use std::time::Duration;

use std::io::Write;

use sluice_tests::{connect, read_exactly, Backend, Config, Driver, Service, Signal, Sluice};

/// The blocked-signal mask (`SigBlk`) of every thread whose name starts with `prefix`.
fn blocked_masks(pid: u32, prefix: &str) -> Vec<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("no /proc task list");
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("SigBlk:"))?;
            u64::from_str_radix(line.trim_start_matches("SigBlk:").trim(), 16).ok()
        })
        .collect()
}

/// The process's pending signals (`ShdPnd`), if it still runs.
fn shared_pending(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("ShdPnd:"))?;
    u64::from_str_radix(line.trim_start_matches("ShdPnd:").trim(), 16).ok()
}

fn bit(signal: u32) -> u64 {
    1 << (signal - 1)
}

/// Every worker thread blocks the control signals, and the process still obeys them.
fn workers_block_the_control_signals(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver).service(Service::new("sig", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    let wanted = bit(1) | bit(2) | bit(10) | bit(12) | bit(15);
    // A worker names itself, then blocks the signals, as it starts: that may follow the
    // readiness line, so look for a bounded while.
    let mut masks = Vec::new();
    for _ in 0..100 {
        masks = blocked_masks(sluice.pid(), "sluice-w");
        if masks.len() == 2 && masks.iter().all(|m| m & wanted == wanted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(masks.len(), 2, "expected two worker threads");
    for mask in masks {
        assert_eq!(
            mask & wanted,
            wanted,
            "worker mask {mask:#x} lacks SIGHUP/SIGINT/SIGUSR1/SIGUSR2/SIGTERM"
        );
    }
    let status = sluice.terminate(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM did not stop sluice cleanly: {status:?}");
}

/// Issue 26 item 12: two SIGTERMs sent back to back were merged into one (a flag per
/// signal), so sluice went on draining for its whole `shutdown_timeout` instead of cutting
/// at once as documented.
fn a_second_stop_signal_right_after_the_first_cuts_at_once(driver: Driver) {
    let echo = Backend::echo();
    let config =
        Config::new(driver).shutdown_timeout("30s").service(Service::new("sig", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    let mut client = connect(sluice.addr("sig"));
    client.write_all(b"open").unwrap();
    assert_eq!(read_exactly(&mut client, 4), b"open");
    // The second goes as soon as the kernel has delivered the first (the kernel itself
    // merges a signal into one still pending, which no process can tell apart), well
    // within the control thread's 50 ms turn.
    sluice.signal(Signal::SIGTERM);
    let delivered = (0..1000).any(|_| {
        let pending = shared_pending(sluice.pid());
        pending.is_some_and(|p| p & bit(15) == 0) || {
            std::thread::sleep(Duration::from_micros(200));
            false
        }
    });
    assert!(delivered, "the first SIGTERM was never delivered");
    sluice.signal(Signal::SIGTERM);
    let status = sluice.wait_exit(Duration::from_secs(3));
    assert!(
        status.is_some_and(|s| s.success()),
        "still draining 3 s after two SIGTERMs (shutdown_timeout 30s): {status:?}"
    );
    let logs = sluice.logs();
    assert!(logs.iter().any(|l| l.contains("second stop signal: cutting every session now")));
}

sluice_tests::for_each_driver!(
    workers_block_the_control_signals,
    a_second_stop_signal_right_after_the_first_cuts_at_once
);
