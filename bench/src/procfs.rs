//! Facts read from /proc and the process limits: a process tree's resident memory and
//! open descriptors, every process's CPU time, the machine's CPU counters, which TCP ports
//! are listening, and our own descriptor limit.
//!
//! A proxy's footprint is summed over the process and all its descendants, so a master
//! with workers (nginx) is measured the same way as a single process (HAProxy). CPU times
//! are in clock ticks, as the kernel writes them; [`ticks_per_second`] converts.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{sysconf, SysconfVar};

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
    stat_field(stat, 4)?.parse().ok()
}

/// Field `number` (counted from 1, as in proc(5)) of /proc/PID/stat, for fields after the
/// command name (3 and up).
fn stat_field(stat: &str, number: usize) -> Option<&str> {
    const FIRST_AFTER_NAME: usize = 3;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(number.checked_sub(FIRST_AFTER_NAME)?)
}

/// The command name of /proc/PID/stat (field 2, without its parentheses).
pub fn parse_comm(stat: &str) -> Option<&str> {
    Some(&stat[stat.find('(')? + 1..stat.rfind(')')?])
}

/// CPU time in clock ticks, split into user and system mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

impl CpuTicks {
    /// User plus system.
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    /// The sum of two readings.
    pub fn plus(self, other: CpuTicks) -> CpuTicks {
        CpuTicks { user: self.user + other.user, system: self.system + other.system }
    }

    /// Growth since `earlier`; a counter that went backwards (a reused pid) counts as 0.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// One process as /proc/PID/stat shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStat {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    /// utime and stime: every thread of the process, living or ended.
    pub own: CpuTicks,
    /// cutime and cstime: children it has waited for.
    pub reaped: CpuTicks,
}

/// Reads pid, parent, name and CPU times from the text of /proc/PID/stat.
pub fn parse_process_stat(pid: u32, stat: &str) -> Option<ProcessStat> {
    let field = |number| stat_field(stat, number)?.parse::<u64>().ok();
    Some(ProcessStat {
        pid,
        ppid: stat_field(stat, 4)?.parse().ok()?,
        name: parse_comm(stat)?.to_string(),
        own: CpuTicks { user: field(14)?, system: field(15)? },
        reaped: CpuTicks { user: field(16)?, system: field(17)? },
    })
}

/// Every process on the machine, read once each from /proc/PID/stat; a process that ends
/// while the table is read is left out.
pub fn process_table() -> Vec<ProcessStat> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_process_stat(pid, &stat)
        })
        .collect()
}

/// The machine's CPU counters from the first line of /proc/stat, in clock ticks summed over
/// all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq: time some core did work for this machine.
    pub busy: u64,
    /// irq + softirq (also inside `busy`).
    pub interrupts: u64,
    /// Time the hypervisor gave this machine's cores to someone else.
    pub steal: u64,
}

/// Reads the aggregate `cpu` line of /proc/stat.
pub fn parse_machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let values: Vec<u64> =
        line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = values[..] else {
        return None;
    };
    Some(MachineTicks {
        busy: user + nice + system + irq + softirq,
        interrupts: irq + softirq,
        steal,
    })
}

/// The machine's CPU counters now.
pub fn machine_ticks() -> Option<MachineTicks> {
    parse_machine_ticks(&fs::read_to_string("/proc/stat").ok()?)
}

/// Clock ticks per second of the CPU times in /proc (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    /// What Linux uses on every architecture, should sysconf not answer.
    const USUAL: u64 = 100;
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => USUAL,
    }
}

/// Addresses in LISTEN state in the network namespace of process `pid` (IPv4 and IPv6).
///
/// Linux lists listening sockets before all others in /proc/PID/net/tcp, so reading stops
/// at the first other state: with a hundred thousand TIME_WAIT sockets left by a connect
/// run the full table takes ~100 ms to produce, its listening prefix well under 1 ms.
pub fn listening_addresses(pid: u32) -> BTreeSet<SocketAddr> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| fs::File::open(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|file| parse_listening(BufReader::new(file).lines().map_while(io::Result::ok)))
        .collect()
}

/// True when `addr` is served by one of `listening`, itself or a wildcard on its port.
pub fn is_listening(listening: &BTreeSet<SocketAddr>, addr: SocketAddr) -> bool {
    let wildcard = match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())),
    };
    listening.contains(&addr) || listening.contains(&wildcard)
}

/// Local addresses of the leading LISTEN (state 0A) entries of a /proc/net/tcp table.
pub fn parse_listening(lines: impl Iterator<Item = String>) -> Vec<SocketAddr> {
    const LISTEN: &str = "0A";
    lines
        .skip(1)
        .map_while(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            parse_proc_address(fields.get(1)?)
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them:
/// each 32-bit word of the address in this machine's byte order.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<[u8; 4]> = (0..address.len() / 8)
        .map(|i| address.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()))
        .map(|word| word.map(u32::to_ne_bytes))
        .collect::<Option<_>>()?;
    match words.len() {
        1 => Some(SocketAddr::from((Ipv4Addr::from(words[0]), port))),
        4 => {
            let bytes: [u8; 16] = words.concat().try_into().ok()?;
            Some(SocketAddr::from((Ipv6Addr::from(bytes), port)))
        }
        _ => None,
    }
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
    fn process_stat_fields_by_number() {
        // Fields 14-17 are utime, stime, cutime, cstime (proc(5)); the name holds ") ".
        let stat = "4321 (web (x) y) S 1 4321 4321 0 -1 4194560 100 0 0 0 250 75 30 12 20 0 3 0";
        let process = parse_process_stat(4321, stat).unwrap();
        assert_eq!(process.ppid, 1);
        assert_eq!(process.name, "web (x) y");
        assert_eq!(process.own, CpuTicks { user: 250, system: 75 });
        assert_eq!(process.reaped, CpuTicks { user: 30, system: 12 });
        assert_eq!(process.own.total(), 325);
        assert!(parse_process_stat(1, "1 (init) S 0 1 1").is_none(), "truncated");
        assert!(parse_process_stat(1, "no parens").is_none());
    }

    #[test]
    fn cpu_ticks_grow_and_never_go_negative() {
        let early = CpuTicks { user: 10, system: 5 };
        let late = CpuTicks { user: 17, system: 9 };
        assert_eq!(late.since(early), CpuTicks { user: 7, system: 4 });
        assert_eq!(early.since(late), CpuTicks::default());
        assert_eq!(early.plus(late), CpuTicks { user: 27, system: 14 });
    }

    #[test]
    fn machine_counters_from_proc_stat() {
        let stat = "cpu  181430 422418 142887 313582 41485 7 27897 1350 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n";
        let machine = parse_machine_ticks(stat).unwrap();
        assert_eq!(machine.busy, 181_430 + 422_418 + 142_887 + 7 + 27_897);
        assert_eq!(machine.interrupts, 27_904);
        assert_eq!(machine.steal, 1350);
        assert!(parse_machine_ticks("cpu  1 2 3\n").is_none(), "too few fields");
        assert!(parse_machine_ticks("intr 1 2\n").is_none());
    }

    #[test]
    fn own_process_is_in_the_table_with_cpu_time() {
        let busy = std::time::Instant::now();
        while busy.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(busy.elapsed());
        }
        let me = std::process::id();
        let table = process_table();
        let own = table.iter().find(|p| p.pid == me).expect("own pid listed");
        assert!(own.own.total() > 0, "50 ms of spinning shows as ticks");
        assert!(table.len() > 1);
        assert!(ticks_per_second() >= 100);
        assert!(machine_ticks().unwrap().busy > 0);
    }

    #[test]
    fn tree_walks_all_generations_once() {
        let parents: HashMap<u32, u32> =
            [(10, 1), (11, 10), (12, 10), (13, 11), (20, 1), (14, 99)].into_iter().collect();
        assert_eq!(descendants(10, &parents), vec![10, 11, 12, 13]);
        assert_eq!(descendants(13, &parents), vec![13]);
    }

    #[test]
    fn listening_addresses_from_proc_table() {
        // 127.0.0.1:8080 and 10.250.1.2:80 as a little- or big-endian kernel prints them.
        let word = |ip: Ipv4Addr| format!("{:08X}", u32::from_ne_bytes(ip.octets()));
        let loopback = word(Ipv4Addr::LOCALHOST);
        let veth = word(Ipv4Addr::new(10, 250, 1, 2));
        let table = format!("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: {loopback}:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: {veth}:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   2: {loopback}:9C40 {loopback}:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   3: {loopback}:0051 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
");
        let found = parse_listening(table.lines().map(String::from));
        assert_eq!(
            found,
            ["127.0.0.1:8080".parse().unwrap(), "10.250.1.2:80".parse().unwrap()],
            "reading stops at the first non-listener"
        );
        let v6 = "header
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0 3
   1: 00000000000000000000000000000000:0051 00000000000000000000000000000000:0000 0A 0 0 0 0 0 3
";
        let found = parse_listening(v6.lines().map(String::from));
        if cfg!(target_endian = "little") {
            assert_eq!(found[0], "[::1]:80".parse().unwrap());
        }
        assert_eq!(found[1], "[::]:81".parse().unwrap());
        let set: BTreeSet<SocketAddr> = found.into_iter().collect();
        assert!(is_listening(&set, "[::1]:81".parse().unwrap()), "wildcard covers the port");
        assert!(!is_listening(&set, "[::1]:82".parse().unwrap()));
    }

    #[test]
    fn own_listener_is_seen_through_own_pid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(is_listening(&listening_addresses(std::process::id()), addr));
        drop(listener);
        assert!(!is_listening(&listening_addresses(std::process::id()), addr));
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
