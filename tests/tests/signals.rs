//! Signals belong to the control thread: every worker thread blocks SIGHUP, SIGINT,
//! SIGTERM and SIGUSR1, so handlers never run on (or interrupt) the data path.

use std::time::Duration;

use sluice_tests::{Backend, Config, Driver, Service, Sluice};

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

fn bit(signal: u32) -> u64 {
    1 << (signal - 1)
}

/// Every worker thread blocks the control signals, and the process still obeys them.
fn workers_block_the_control_signals(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver).service(Service::new("sig", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    let wanted = bit(1) | bit(2) | bit(10) | bit(15);
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
            "worker mask {mask:#x} lacks SIGHUP/SIGINT/SIGUSR1/SIGTERM"
        );
    }
    let status = sluice.terminate(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM did not stop sluice cleanly: {status:?}");
}

sluice_tests::for_each_driver!(workers_block_the_control_signals);
