//! Facts read from /proc and the process limits: a process tree's resident memory and
//! open descriptors, which TCP ports are listening, and our own descriptor limit.
//!
//! A proxy's footprint is summed over the process and all its descendants, so a master
//! with workers (nginx) is measured the same way as a single process (HAProxy).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::error::{BenchError, Result};

/// Memory and descriptors of a process tree at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Sum of VmRSS over the tree, KiB.
    pub rss_kib: u64,
    /// Sum of open descriptors over the tree.
    pub fds: u64,
    /// Number of processes in the tree.
    pub processes: usize,
}

/// Footprint of `root` and every descendant.
pub fn footprint(root: u32) -> Result<Footprint> {
    let mut total = Footprint { rss_kib: 0, fds: 0, processes: 0 };
    for pid in process_tree(root) {
        let process_error = |source| BenchError::Process { pid, source };
        let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(process_error)?;
        total.rss_kib += parse_vm_rss(&status).unwrap_or(0);
        total.fds += fs::read_dir(format!("/proc/{pid}/fd")).map_err(process_error)?.count() as u64;
        total.processes += 1;
    }
    Ok(total)
}

/// `root` followed by all its descendants, found through each process's parent id.
pub fn process_tree(root: u32) -> Vec<u32> {
    let parents = parent_map();
    descendants(root, &parents)
}

fn parent_map() -> HashMap<u32, u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return HashMap::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_ppid(&stat)?))
        })
        .collect()
}

/// `root` and its descendants given a child -> parent map; `root` comes first.
pub fn descendants(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        let mut children: Vec<u32> =
            parents.iter().filter(|&(_, &p)| p == parent).map(|(&c, _)| c).collect();
        children.sort_unstable();
        children.retain(|c| !tree.contains(c));
        tree.extend(children);
        next += 1;
    }
    tree
}

/// VmRSS in KiB from the text of /proc/PID/status.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Parent pid from the text of /proc/PID/stat; the command name may hold spaces and parens.
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Ports in LISTEN state on this host (IPv4 and IPv6).
///
/// Linux lists listening sockets before all others in /proc/net/tcp, so reading stops at
/// the first other state: with a hundred thousand TIME_WAIT sockets left by a connect run
/// the full table takes ~100 ms to produce, its listening prefix well under 1 ms.
pub fn listening_ports() -> BTreeSet<u16> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| fs::File::open(path).ok())
        .flat_map(|file| parse_listening(BufReader::new(file).lines().map_while(io::Result::ok)))
        .collect()
}

/// Local ports of the leading LISTEN (state 0A) entries of a /proc/net/tcp table.
pub fn parse_listening(lines: impl Iterator<Item = String>) -> Vec<u16> {
    const LISTEN: &str = "0A";
    lines
        .skip(1)
        .map_while(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let (_, port) = fields.get(1)?.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// Raises our soft descriptor limit to the hard one and returns the new soft limit.
pub fn raise_fd_limit() -> Result<u64> {
    let to_io =
        |e: nix::Error| BenchError::Process { pid: std::process::id(), source: io::Error::from(e) };
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(to_io)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(to_io)?;
    }
    Ok(hard)
}

/// One-minute load average of the machine, from /proc/loadavg.
pub fn load_average() -> Option<f64> {
    parse_load_average(&fs::read_to_string("/proc/loadavg").ok()?)
}

/// First field of /proc/loadavg.
pub fn parse_load_average(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Number of cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tnginx\nVmPeak:\t  9000 kB\nVmRSS:\t    4242 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(4242));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn ppid_survives_odd_command_names() {
        assert_eq!(parse_ppid("1234 (nginx) S 1000 1234 1234 0"), Some(1000));
        assert_eq!(parse_ppid("77 (a) b (c)) R 5 77 77 0"), Some(5));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn tree_walks_all_generations_once() {
        let parents: HashMap<u32, u32> =
            [(10, 1), (11, 10), (12, 10), (13, 11), (20, 1), (14, 99)].into_iter().collect();
        assert_eq!(descendants(10, &parents), vec![10, 11, 12, 13]);
        assert_eq!(descendants(13, &parents), vec![13]);
    }

    #[test]
    fn listening_ports_from_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
";
        let lines = table.lines().map(String::from);
        assert_eq!(parse_listening(lines), vec![8080], "reading stops at the first non-listener");
        let v6 = "header
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0 3
";
        assert_eq!(parse_listening(v6.lines().map(String::from)), vec![80]);
    }

    #[test]
    fn load_average_is_the_first_field() {
        assert_eq!(parse_load_average("3.04 1.91 0.93 2/345 6789\n"), Some(3.04));
        assert_eq!(parse_load_average(""), None);
    }

    #[test]
    fn own_footprint_is_visible() {
        let own = footprint(std::process::id()).unwrap();
        assert!(own.rss_kib > 0);
        assert!(own.fds >= 3);
        assert!(own.processes >= 1);
    }
}
