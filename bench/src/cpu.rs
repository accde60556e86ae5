//! CPU time over a measured window, as a figure: what the proxy's processes used (user +
//! system, summed over its process tree), what this process used (the load and the
//! in-process backends), what everything else on the machine used, and the load average at
//! both edges of the window.
//!
//! A [`CpuSample`] is one pass over /proc at a window edge; [`CpuUse::between`] turns two
//! samples into seconds, as pure arithmetic. The proxy tree is the root and its descendants
//! in either sample, so nginx workers forked after the first sample count from zero; the
//! times of children the tree has reaped (cutime, cstime) count too, so a worker that ends
//! inside the window is not lost. The load generator is this process and its other
//! descendants (a wrk or iperf3 it runs), counted the same way. "Other" is the machine's busy time (user, nice, system,
//! irq and softirq of /proc/stat) less the proxy's and ours, never below zero. With
//! tick-based accounting (the usual kernel build) interrupt work is charged to the task it
//! interrupted, so it is counted once, in that task; with IRQ time accounting it is charged
//! to no task and shows in "other". The busiest other processes are named (kernel threads
//! such as ksoftirqd included), so a figure's note can say what else ran.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use crate::procfs::{
    descendants, load_average, machine_ticks, process_table, ticks_per_second, CpuTicks,
    MachineTicks, ProcessStat,
};
use crate::report::Report;

/// Bytes in the GB of "CPU seconds per GB" (decimal, as Gbit/s).
pub const BYTES_PER_GB: f64 = 1e9;
/// Connections in the unit of "CPU seconds per 10,000 connections".
pub const CONNECTIONS_PER_UNIT: f64 = 10_000.0;
/// Requests in the unit of "CPU seconds per 100,000 requests".
pub const REQUESTS_PER_UNIT: f64 = 100_000.0;
/// How many of the busiest other processes a window names.
const BUSIEST_OTHERS: usize = 3;

/// /proc at one edge of a window.
#[derive(Debug, Clone)]
pub struct CpuSample {
    processes: Vec<ProcessStat>,
    machine: Option<MachineTicks>,
    load: Option<f64>,
    at: Instant,
}

impl CpuSample {
    /// Reads every process, the machine's counters and the load average now.
    pub fn take() -> CpuSample {
        CpuSample {
            processes: process_table(),
            machine: machine_ticks(),
            load: load_average(),
            at: Instant::now(),
        }
    }
}

/// User and system seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuSplit {
    pub user_s: f64,
    pub system_s: f64,
}

impl CpuSplit {
    fn of(ticks: CpuTicks, per_second: f64) -> CpuSplit {
        CpuSplit {
            user_s: ticks.user as f64 / per_second,
            system_s: ticks.system as f64 / per_second,
        }
    }

    /// User plus system seconds.
    pub fn total_s(self) -> f64 {
        self.user_s + self.system_s
    }
}

/// CPU seconds a named program used in a window (all its processes together).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OtherProcess {
    pub name: String,
    pub cpu_s: f64,
}

/// Who used the CPU between two samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuUse {
    /// Seconds between the samples.
    pub seconds: f64,
    /// The proxy tree's time, when a proxy was watched.
    pub proxy: Option<CpuSplit>,
    /// This process (the load and the in-process backends) with the tools and servers it
    /// started, the proxy excepted; including the children it reaped.
    pub bench: CpuSplit,
    /// Busy time of all cores together (user, nice, system, irq, softirq).
    pub machine_busy_s: Option<f64>,
    /// irq and softirq (part of the busy time).
    pub interrupts_s: Option<f64>,
    /// Time the hypervisor gave to someone else.
    pub steal_s: Option<f64>,
    /// One-minute load average at the first and at the second sample.
    pub load_start: Option<f64>,
    pub load_end: Option<f64>,
    /// The busiest processes other than the proxy and this one, busiest first.
    pub busiest_others: Vec<OtherProcess>,
}

impl CpuUse {
    /// What happened between `start` and `end`, with the proxy rooted at `proxy` and this
    /// process being `own`; `ticks_per_second` converts the kernel's clock ticks.
    pub fn between(
        start: &CpuSample,
        end: &CpuSample,
        proxy: Option<u32>,
        own: u32,
        ticks_per_second: u64,
    ) -> CpuUse {
        let per_second = ticks_per_second.max(1) as f64;
        let seconds = end.at.saturating_duration_since(start.at).as_secs_f64();
        let tree = proxy.map(|root| process_tree(root, start, end)).unwrap_or_default();
        let first = by_pid(&start.processes);
        let last = by_pid(&end.processes);
        let load = load_tree(own, start, end, &tree);
        let bench = tree_ticks(&load, &first, &last);
        let machine = start.machine.zip(end.machine);
        let machine_s = |field: fn(&MachineTicks) -> u64| {
            machine.map(|(a, b)| field(&b).saturating_sub(field(&a)) as f64 / per_second)
        };
        CpuUse {
            seconds,
            proxy: proxy.map(|_| CpuSplit::of(tree_ticks(&tree, &first, &last), per_second)),
            bench: CpuSplit::of(bench, per_second),
            machine_busy_s: machine_s(|m| m.busy),
            interrupts_s: machine_s(|m| m.interrupts),
            steal_s: machine_s(|m| m.steal),
            load_start: start.load,
            load_end: end.load,
            busiest_others: busiest_others(&first, &last, &tree, &load, per_second),
        }
    }

    /// The proxy's user + system seconds.
    pub fn proxy_s(&self) -> Option<f64> {
        self.proxy.map(CpuSplit::total_s)
    }

    /// Busy time of the machine that was neither the proxy's nor ours, never below zero.
    pub fn other_s(&self) -> Option<f64> {
        let busy = self.machine_busy_s?;
        Some((busy - self.proxy_s().unwrap_or(0.0) - self.bench.total_s()).max(0.0))
    }

    /// Writes the figures into `report`: `cpu_s`, `cpu_user_s`, `cpu_system_s`,
    /// `cpu_cores` for the proxy; `cpu_window_s`, `bench_cpu_s`, `machine_cpu_s`, `other_cpu_s`,
    /// `other_cores`, `interrupt_cpu_s`, `steal_cpu_s`, `load_average_start`,
    /// `load_average_end` for the machine; and the busiest other processes.
    pub fn add_to(&self, report: &mut Report) {
        if let Some(proxy) = self.proxy {
            report.figure("cpu_s", proxy.total_s());
            report.figure("cpu_user_s", proxy.user_s);
            report.figure("cpu_system_s", proxy.system_s);
            if self.seconds > 0.0 {
                report.figure("cpu_cores", proxy.total_s() / self.seconds);
            }
        }
        report.figure("cpu_window_s", self.seconds);
        report.figure("bench_cpu_s", self.bench.total_s());
        let optional = [
            ("machine_cpu_s", self.machine_busy_s),
            ("other_cpu_s", self.other_s()),
            ("interrupt_cpu_s", self.interrupts_s),
            ("steal_cpu_s", self.steal_s),
            ("load_average_start", self.load_start),
            ("load_average_end", self.load_end),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                report.figure(name, value);
            }
        }
        if let (Some(other), true) = (self.other_s(), self.seconds > 0.0) {
            report.figure("other_cores", other / self.seconds);
        }
        report.other_processes = self.busiest_others.clone();
    }

    /// The proxy's CPU seconds per `unit` of `work`, written as figure `name`.
    pub fn add_cost(&self, report: &mut Report, name: &str, work: f64, unit: f64) {
        if let Some(cost) = self.proxy_s().and_then(|cpu| per_unit(cpu, work, unit)) {
            report.figure(name, cost);
        }
    }
}

/// CPU seconds per `unit` of `work`: `cpu_s / (work / unit)`; `None` when no work was done.
pub fn per_unit(cpu_s: f64, work: f64, unit: f64) -> Option<f64> {
    if !(work > 0.0 && unit > 0.0 && cpu_s.is_finite()) {
        return None;
    }
    Some(cpu_s / (work / unit))
}

/// Clock ticks per second, read once.
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(ticks_per_second)
}

fn by_pid(processes: &[ProcessStat]) -> HashMap<u32, &ProcessStat> {
    processes.iter().map(|p| (p.pid, p)).collect()
}

/// This process and its descendants but the proxy's tree: the load generator with the
/// tools and servers it started.
fn load_tree(own: u32, start: &CpuSample, end: &CpuSample, proxy: &HashSet<u32>) -> HashSet<u32> {
    let mut load = process_tree(own, start, end);
    load.retain(|pid| !proxy.contains(pid));
    load
}

/// The root and its descendants in either sample.
fn process_tree(root: u32, start: &CpuSample, end: &CpuSample) -> HashSet<u32> {
    let mut tree = HashSet::new();
    for sample in [start, end] {
        let parents: HashMap<u32, u32> = sample.processes.iter().map(|p| (p.pid, p.ppid)).collect();
        tree.extend(descendants(root, &parents));
    }
    tree
}

/// Growth of own + reaped time summed over the tree; a member missing from a sample counts
/// as zero there (forked after the first, or ended and reaped before the second).
fn tree_ticks(
    tree: &HashSet<u32>,
    first: &HashMap<u32, &ProcessStat>,
    last: &HashMap<u32, &ProcessStat>,
) -> CpuTicks {
    let sum = |sample: &HashMap<u32, &ProcessStat>| {
        tree.iter()
            .filter_map(|pid| sample.get(pid))
            .fold(CpuTicks::default(), |total, p| total.plus(p.own).plus(p.reaped))
    };
    sum(last).since(sum(first))
}

/// Other processes' own time in the window, summed by name, busiest first.
fn busiest_others(
    first: &HashMap<u32, &ProcessStat>,
    last: &HashMap<u32, &ProcessStat>,
    tree: &HashSet<u32>,
    load: &HashSet<u32>,
    per_second: f64,
) -> Vec<OtherProcess> {
    let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
    for (pid, process) in last {
        if tree.contains(pid) || load.contains(pid) {
            continue;
        }
        let before = first.get(pid).map_or(CpuTicks::default(), |p| p.own);
        let used = process.own.since(before).total();
        if used > 0 {
            *by_name.entry(&process.name).or_default() += used;
        }
    }
    let mut busiest: Vec<(&str, u64)> = by_name.into_iter().collect();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    busiest
        .into_iter()
        .take(BUSIEST_OTHERS)
        .map(|(name, ticks)| OtherProcess {
            name: name.to_string(),
            cpu_s: ticks as f64 / per_second,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn process(
        pid: u32,
        ppid: u32,
        name: &str,
        own: (u64, u64),
        reaped: (u64, u64),
    ) -> ProcessStat {
        ProcessStat {
            pid,
            ppid,
            name: name.into(),
            own: CpuTicks { user: own.0, system: own.1 },
            reaped: CpuTicks { user: reaped.0, system: reaped.1 },
        }
    }

    fn sample(processes: Vec<ProcessStat>, busy: u64, load: f64, at: Instant) -> CpuSample {
        let machine = MachineTicks { busy, interrupts: busy / 10, steal: 2 };
        CpuSample { processes, machine: Some(machine), load: Some(load), at }
    }

    const BENCH: u32 = 50;
    const MASTER: u32 = 100;

    /// An nginx-like tree: master 100 with worker 101 at the start; during the window
    /// worker 101 ends and is reaped (its time moves into the master's cutime) and worker
    /// 102 is forked. Beside it this process (50), a compiler (300, 301) and an idle shell.
    fn window() -> (CpuSample, CpuSample) {
        let t0 = Instant::now();
        let start = sample(
            vec![
                process(1, 0, "init", (5, 5), (0, 0)),
                process(BENCH, 1, "sluice-bench", (100, 50), (0, 0)),
                process(MASTER, BENCH, "nginx", (10, 10), (0, 0)),
                process(101, MASTER, "nginx", (200, 300), (0, 0)),
                process(300, 1, "rustc", (1000, 0), (0, 0)),
                process(400, 1, "sh", (1, 1), (0, 0)),
            ],
            10_000,
            1.5,
            t0,
        );
        let end = sample(
            vec![
                process(1, 0, "init", (5, 5), (0, 0)),
                process(BENCH, 1, "sluice-bench", (180, 70), (0, 0)),
                process(MASTER, BENCH, "nginx", (11, 10), (250, 330)),
                process(102, MASTER, "nginx", (40, 60), (0, 0)),
                process(300, 1, "rustc", (1030, 0), (0, 0)),
                process(301, 1, "rustc", (20, 5), (0, 0)),
                process(400, 1, "sh", (1, 1), (0, 0)),
            ],
            10_500,
            2.5,
            t0 + Duration::from_secs(2),
        );
        (start, end)
    }

    #[test]
    fn proxy_time_covers_forked_and_reaped_workers() {
        let (start, end) = window();
        let used = CpuUse::between(&start, &end, Some(MASTER), BENCH, 100);
        // master +1 user; worker 101: 200/300 at start, reaped as 250/330 (+50/+30);
        // worker 102: forked, 40/60.
        let proxy = used.proxy.unwrap();
        assert!((proxy.user_s - (1 + 50 + 40) as f64 / 100.0).abs() < 1e-9, "{proxy:?}");
        assert!((proxy.system_s - (30 + 60) as f64 / 100.0).abs() < 1e-9, "{proxy:?}");
        assert_eq!(used.bench, CpuSplit { user_s: 0.8, system_s: 0.2 });
        assert_eq!(used.seconds, 2.0);
    }

    #[test]
    fn tools_this_process_started_count_as_load_not_as_other() {
        let (mut start, mut end) = window();
        // A client tool (pid 60) runs beside the proxy and is reaped before the second
        // sample: its time moves into this process's cutime.
        start.processes.push(process(60, BENCH, "wrk", (30, 10), (0, 0)));
        let bench = end.processes.iter_mut().find(|p| p.pid == BENCH).unwrap();
        bench.reaped = CpuTicks { user: 70, system: 20 };
        let used = CpuUse::between(&start, &end, Some(MASTER), BENCH, 100);
        assert_eq!(used.bench, CpuSplit { user_s: 120.0 / 100.0, system_s: 30.0 / 100.0 });
        assert!(used.busiest_others.iter().all(|o| o.name != "wrk"));
        assert!((used.proxy_s().unwrap() - 1.81).abs() < 1e-9, "the proxy is not load");
    }

    #[test]
    fn other_is_the_machine_less_proxy_and_bench() {
        let (start, end) = window();
        let used = CpuUse::between(&start, &end, Some(MASTER), BENCH, 100);
        assert_eq!(used.machine_busy_s, Some(5.0));
        assert_eq!(used.interrupts_s, Some(0.5));
        assert_eq!(used.steal_s, Some(0.0));
        let other = used.other_s().unwrap();
        assert!((other - (5.0 - 1.81 - 1.0)).abs() < 1e-9, "{other}");
        let without_proxy = CpuUse::between(&start, &end, None, BENCH, 100);
        assert!(without_proxy.proxy.is_none());
        // Unwatched, the nginx tree this process started counts as its load.
        assert!((without_proxy.bench.total_s() - 2.81).abs() < 1e-9);
        assert!((without_proxy.other_s().unwrap() - 2.19).abs() < 1e-9);
        let busy_proxy = CpuUse {
            machine_busy_s: Some(1.0),
            proxy: Some(CpuSplit { user_s: 2.0, system_s: 0.0 }),
            ..CpuUse::default()
        };
        assert_eq!(busy_proxy.other_s(), Some(0.0), "never below zero");
    }

    #[test]
    fn busiest_others_are_named_and_summed_by_program() {
        let (start, end) = window();
        let used = CpuUse::between(&start, &end, Some(MASTER), BENCH, 100);
        assert_eq!(
            used.busiest_others,
            vec![OtherProcess { name: "rustc".into(), cpu_s: 0.55 }],
            "rustc 300 (+30) and the new 301 (25); the idle shell and the proxy are left out"
        );
    }

    #[test]
    fn figures_land_in_the_report() {
        let (start, end) = window();
        let used = CpuUse::between(&start, &end, Some(MASTER), BENCH, 100);
        let mut report = Report::new("throughput", "t".into(), &()).unwrap();
        used.add_to(&mut report);
        used.add_cost(&mut report, "cpu_s_per_gb", 4e9, BYTES_PER_GB);
        let figure = |name: &str| report.get(name).unwrap_or_else(|| panic!("no {name}"));
        assert!((figure("cpu_s") - 1.81).abs() < 1e-9);
        assert!((figure("cpu_cores") - 0.905).abs() < 1e-9);
        assert!((figure("cpu_s_per_gb") - 1.81 / 4.0).abs() < 1e-9);
        assert_eq!(figure("load_average_start"), 1.5);
        assert_eq!(figure("load_average_end"), 2.5);
        assert!((figure("other_cores") - 2.19 / 2.0).abs() < 1e-9);
        assert_eq!(report.other_processes.len(), 1);
        let mut no_work = Report::new("rr", "t".into(), &()).unwrap();
        used.add_cost(&mut no_work, "cpu_s_per_100k_requests", 0.0, REQUESTS_PER_UNIT);
        assert!(no_work.get("cpu_s_per_100k_requests").is_none(), "no requests, no cost");
    }

    #[test]
    fn cost_per_unit_of_work() {
        assert_eq!(per_unit(2.0, 20_000.0, CONNECTIONS_PER_UNIT), Some(1.0));
        assert_eq!(per_unit(3.0, 150_000.0, REQUESTS_PER_UNIT), Some(2.0));
        assert_eq!(per_unit(0.5, 2e9, BYTES_PER_GB), Some(0.25));
        assert_eq!(per_unit(1.0, 0.0, BYTES_PER_GB), None);
        assert_eq!(per_unit(f64::NAN, 1.0, 1.0), None);
    }

    #[test]
    fn a_real_window_sees_this_process_work() {
        let me = std::process::id();
        let own_ticks = |sample: &CpuSample| {
            sample.processes.iter().find(|p| p.pid == me).map_or(0, |p| p.own.total())
        };
        let start = CpuSample::take();
        // Spin until the kernel has charged this process 50 ticks (the machine may be busy,
        // so wall time says little), within 20 s.
        let spin = Instant::now();
        let mut end = CpuSample::take();
        while own_ticks(&end) < own_ticks(&start) + 50 && spin.elapsed() < Duration::from_secs(20) {
            for _ in 0..100_000 {
                std::hint::black_box(spin.elapsed());
            }
            end = CpuSample::take();
        }
        let ticks = clock_ticks();
        let used = CpuUse::between(&start, &end, None, me, ticks);
        let charged = (own_ticks(&end) - own_ticks(&start)) as f64 / ticks as f64;
        assert!(charged >= 50.0 / ticks as f64, "never charged 50 ticks: {used:?}");
        assert!(used.bench.total_s() >= charged, "load covers this process: {used:?}");
        // The machine's counters (/proc/stat) sample each tick's owner while a process is
        // charged its measured run time, so the two differ by a few ticks at the window's
        // edges and by what a hypervisor stole: the machine must have seen at least most of
        // this process's work, never less than it ran minus that slack.
        let machine = used.machine_busy_s.unwrap() + used.steal_s.unwrap_or(0.0);
        let slack = 5.0 / ticks as f64;
        assert!(machine >= charged * 0.9 - slack, "{used:?}");
        assert!(used.seconds > 0.0);
    }
}
