//! The process as an operator sees it: the build's revision, and CPU, memory, fds, threads
//! and start time read from /proc (Linux), for the `process_*` metrics.
//!
//! Invariants: every read is of this process's own /proc files; a figure that cannot be
//! read (for instance while no fd is free to open /proc) is `None`, never a guess.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::resource::{getrlimit, Resource};
use nix::unistd::{sysconf, SysconfVar};

/// The source revision this binary was built from (`git rev-parse --short=12 HEAD` at
/// build time, `$SLUICE_REVISION` if set, `unknown` outside a git checkout).
pub const REVISION: &str = env!("SLUICE_REVISION");

/// One reading of the process's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Process {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub threads: Option<f64>,
}

impl Process {
    pub fn read() -> Process {
        let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().map(|t| t as f64);
        let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().map(|p| p as f64);
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let field =
            |i: usize| fields.as_ref().and_then(|f| f.get(i)).and_then(|v| v.parse::<f64>().ok());
        // Fields after the command name, numbered as in proc(5) minus 3: utime is field 14.
        let (utime, stime, threads, start, vsize, rss) =
            (field(11), field(12), field(17), field(19), field(20), field(21));
        let boot = boot_time();
        Process {
            cpu_seconds: utime.zip(stime).zip(ticks).map(|((u, s), t)| (u + s) / t),
            resident_bytes: rss.zip(page).map(|(r, p)| r * p),
            virtual_bytes: vsize,
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64),
            max_fds: getrlimit(Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft as f64),
            start_time_seconds: start.zip(ticks).zip(boot).map(|((s, t), b)| b + s / t),
            threads,
        }
    }
}

/// The fields of /proc/self/stat after `pid (comm)`: the command name may hold spaces
/// and parentheses, so the split starts after its last `)`.
fn stat_fields(stat: &str) -> Option<Vec<String>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When the system booted, in seconds since 1970 (`btime` of /proc/stat).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("btime "))?;
    line["btime ".len()..].trim().parse().ok()
}

/// Seconds since 1970 now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        let p = Process::read();
        assert!(p.cpu_seconds.is_some_and(|c| c >= 0.0));
        assert!(p.resident_bytes.is_some_and(|r| r > 1e5), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3.0) && p.max_fds.is_some_and(|n| n >= 3.0));
        assert!(p.threads.is_some_and(|n| n >= 1.0));
        let start = p.start_time_seconds.expect("start time");
        let now = unix_now() as f64;
        assert!(start <= now + 1.0 && start > now - 86_400.0 * 365.0, "start {start}, now {now}");
    }

    #[test]
    fn stat_fields_skip_a_command_name_with_spaces_and_parentheses() {
        let fields = stat_fields("42 (a b) c)) S 1 2 3").unwrap();
        assert_eq!(fields, ["S", "1", "2", "3"]);
    }
}
