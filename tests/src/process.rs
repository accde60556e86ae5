//! What the kernel says about a process: its open fds and its resident memory, read from
//! /proc, and this test process's own fd limit.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Number of open fds of process `pid`.
/// The fds of process `pid` that are not pipes, and its pipe fds (read and write ends).
pub fn fds_and_pipes(pid: u32) -> (usize, usize) {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let (mut other, mut pipes) = (0, 0);
    for entry in entries.flatten() {
        // An fd closed between the listing and the readlink counts as neither.
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.to_string_lossy().starts_with("pipe:") => pipes += 1,
            Ok(_) => other += 1,
            Err(_) => {}
        }
    }
    (other, pipes)
}

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

/// Number of threads of process `pid` (its /proc/PID/task entries).
pub fn thread_count(pid: u32) -> usize {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries.count(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    }
}

/// Connections (not listeners) that process `pid` holds open on local TCP port `port`:
/// its socket fds matched against /proc/PID/net/tcp and tcp6.
pub fn tcp_connections_on(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|link| {
                    let text = link.to_string_lossy().into_owned();
                    Some(text.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 0A is LISTEN.
            if local_port == Some(port) && *state != "0A" && inodes.contains(*inode) {
                count += 1;
            }
        }
    }
    count
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be reaped).
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|at| stat[at + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Waits up to `timeout` for process `pid` to end; whether it did.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while is_alive(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A line of /proc/PID/status, after its `key:`, trimmed ("Uid", "CapEff", ...).
pub fn status_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{key}:");
    status.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string())
}

/// The socket inodes process `pid` holds fds of, each with how many fds it holds.
pub fn socket_inodes(pid: u32) -> std::collections::HashMap<u64, usize> {
    let mut found = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return found };
    for entry in entries.filter_map(Result::ok) {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        let inode = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'));
        if let Some(inode) = inode.and_then(|i| i.parse().ok()) {
            *found.entry(inode).or_insert(0) += 1;
        }
    }
    found
}

/// The inodes of the sockets bound to local port `port` in `/proc/net/{tcp,tcp6}` (state
/// LISTEN) or `/proc/net/{udp,udp6}`: every listening socket on the port, whoever holds it.
pub fn bound_inodes(port: u16, udp: bool) -> Vec<u64> {
    let (files, state) = match udp {
        false => (["/proc/net/tcp", "/proc/net/tcp6"], Some("0A")),
        true => (["/proc/net/udp", "/proc/net/udp6"], None),
    };
    let mut inodes = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(local) = fields.get(1) else { continue };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            let listening = state.is_none_or(|s| fields.get(3) == Some(&s));
            if local_port == Some(port) && listening {
                if let Some(inode) = fields.get(9).and_then(|i| i.parse().ok()) {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes.sort_unstable();
    inodes
}

/// A process this test did not start as a child (a sluice started by another sluice, in a
/// binary upgrade): stopped with SIGTERM, then SIGKILL, when dropped, so that no test leaves
/// one running.
#[derive(Debug)]
pub struct Adopted {
    pub pid: u32,
}

impl Adopted {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }

    /// SIGTERM, then waits up to `timeout` for the process to end; whether it did.
    pub fn terminate(&self, timeout: Duration) -> bool {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        wait_gone(self.pid, timeout)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if is_alive(self.pid) {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if !is_alive(self.pid) {
            return;
        }
        if !self.terminate(Duration::from_secs(5)) {
            self.signal(nix::sys::signal::Signal::SIGKILL);
            wait_gone(self.pid, Duration::from_secs(5));
        }
    }
}
