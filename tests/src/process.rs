//! What the kernel says about a process: its open fds and its resident memory, read from
//! /proc, and this test process's own fd limit.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Number of open fds of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries.count(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    }
}

/// Resident set size of process `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"))
}

/// CPU time process `pid` has used so far (user + system), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 1000 / CLOCK_TICKS)
}

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on every Linux port that
/// sluice runs on).
const CLOCK_TICKS: u64 = 100;

/// Raises this process's soft RLIMIT_NOFILE to `want` (capped at the hard limit) and returns
/// the soft limit now in force. Sluice, started afterwards, inherits it.
pub fn raise_fd_limit(want: u64) -> u64 {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    let target = want.min(hard);
    if soft >= target {
        return soft;
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).expect("setrlimit(RLIMIT_NOFILE)");
    target
}
