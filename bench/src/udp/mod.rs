//! UDP comparison: direct, sluice (a connected socket a flow, and shared upstream sockets)
//! and nginx stream, over four scenarios, against the same in-process backends:
//! - `rr`: request/response round trips (DNS-like, 64-byte datagrams) from many clients,
//!   each its own socket and flow with one datagram in flight: rate and latency;
//! - `bulk`: one-way datagrams (1,200 bytes, syslog- or QUIC-like) blasted by a few
//!   senders, counted at a sink: delivered rate and loss;
//! - `churn`: 100,000 new sources, one request each (every request a new flow): new flows
//!   per second, first-round-trip latency, losses;
//! - `idle`: N flows opened and left idle: the forwarder's resident memory, descriptors and
//!   kernel socket memory per flow.
//!
//! LIFECYCLE: the echo and the sink start once and serve every contender. Per scenario and
//! round the contenders run in turn (A B C, A B C, ...) so drift of the machine hits them
//! alike; every measurement gets a freshly started forwarder on fresh ports (no flow,
//! session or memory carried over). `sluice-bench udp` runs this alone; `compare` runs it
//! after its TCP scenarios and adds its section to the report.

pub mod bulk;
pub mod proxy;
pub mod sources;

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::error::{file_context, Result};
use crate::procfs::{footprint, load_average};
use crate::report::Report;
use crate::scenario::udp::{UdpEcho, UdpParams};
use crate::scenario::{Target, TimingParams};
use crate::stats::{format_figure, format_ratio, median, ratio};
use crate::table::Table;
use crate::timeline;
use bulk::{BulkParams, Sink};
use proxy::{prepare, Prepared, UdpContender, UdpPrograms, UdpRoutes};
use sources::SourcesParams;

/// The UDP scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UdpScenario {
    Rr,
    Bulk,
    Churn,
    Idle,
}

impl UdpScenario {
    pub const ALL: [UdpScenario; 4] =
        [UdpScenario::Rr, UdpScenario::Bulk, UdpScenario::Churn, UdpScenario::Idle];

    /// Name in reports (`udp-rr`, ...).
    pub fn name(self) -> &'static str {
        match self {
            UdpScenario::Rr => "udp-rr",
            UdpScenario::Bulk => "udp-bulk",
            UdpScenario::Churn => "udp-churn",
            UdpScenario::Idle => "udp-idle",
        }
    }

    /// The figures its summary shows; the first is the headline.
    fn figures(self) -> &'static [&'static str] {
        match self {
            UdpScenario::Rr => &[
                "round_trips_per_s",
                "latency_us_p50",
                "latency_us_p99",
                "latency_us_p999",
                "lost",
            ],
            UdpScenario::Bulk => &["datagrams_per_s", "gbit_s", "sent_per_s", "loss_percent"],
            UdpScenario::Churn => &["new_flows_per_s", "latency_us_p50", "latency_us_p99", "lost"],
            UdpScenario::Idle => &[
                "total_kib_per_flow",
                "rss_kib_per_flow",
                "kernel_kib_per_flow",
                "fds_per_flow",
                "flows",
            ],
        }
    }
}

/// Everything a UDP comparison needs.
#[derive(Debug, Clone, Serialize)]
pub struct UdpPlan {
    pub rounds: u32,
    #[serde(flatten)]
    pub timing: TimingParams,
    pub scenarios: Vec<UdpScenario>,
    pub contenders: Vec<UdpContender>,
    /// rr: clients (sockets and flows), each with one datagram in flight.
    pub clients: usize,
    pub threads: usize,
    /// rr datagram size.
    pub size: usize,
    pub bulk_size: usize,
    pub senders: usize,
    /// churn: distinct new sources.
    pub sources: usize,
    /// churn and idle: requests in flight.
    pub in_flight: usize,
    pub idle_flows: usize,
    pub workers: usize,
    pub nofile: u64,
    #[serde(skip)]
    pub programs: UdpPrograms,
}

/// What a UDP comparison measured.
#[derive(Debug, Default, Serialize)]
pub struct UdpRun {
    pub load_average_start: Option<f64>,
    pub load_average_end: Option<f64>,
    pub skipped: Vec<(String, String)>,
    pub failures: Vec<String>,
    pub runs: Vec<Report>,
}

/// Pause after a forwarder is ready before the idle baseline is read.
const IDLE_BASELINE_SETTLE: Duration = Duration::from_millis(300);
/// Pause between "every idle flow answered" and the second reading.
const IDLE_SETTLE: Duration = Duration::from_millis(500);
/// First loopback port tried for the forwarders' UDP listeners.
const BASE_PORT: u16 = 24000;
/// Kernel slab caches that hold a UDP socket, its file, inode, dentry and epoll entry.
const SOCKET_CACHES: [&str; 6] =
    ["UDP", "UDPv6", "sock_inode_cache", "filp", "dentry", "eventpoll_epi"];

/// Runs every scenario of `plan`, contenders interleaved over rounds.
pub fn run(plan: &UdpPlan) -> Result<UdpRun> {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("constant address");
    let echo = UdpEcho::start(any)?;
    let sink = Sink::start(any)?;
    let mut out = UdpRun { load_average_start: load_average(), ..UdpRun::default() };
    let mut ready = Vec::new();
    for &kind in &plan.contenders {
        match prepare(kind, &plan.programs) {
            Ok(p) => ready.push(p),
            Err(reason) => {
                eprintln!("[udp] skipping {}: {reason}", kind.name());
                out.skipped.push((kind.name().into(), reason));
            }
        }
    }
    let run_dir = std::env::temp_dir().join(format!("sluice-bench-udp-{}", std::process::id()));
    let mut next_port = BASE_PORT;
    for &scenario in &plan.scenarios {
        for round in 1..=plan.rounds {
            for contender in &ready {
                if scenario == UdpScenario::Idle && contender.kind == UdpContender::Direct {
                    continue;
                }
                eprintln!(
                    "[udp] {} round {round}/{}: {}",
                    scenario.name(),
                    plan.rounds,
                    contender.name()
                );
                let routes = UdpRoutes {
                    rr: free_udp_port(&mut next_port),
                    bulk: free_udp_port(&mut next_port),
                    churn: free_udp_port(&mut next_port),
                    idle: free_udp_port(&mut next_port),
                    echo: echo.addr(),
                    sink: sink.addr(),
                };
                match measure(plan, contender, scenario, &routes, &sink, &run_dir) {
                    Ok(mut report) => {
                        report.contender = Some(contender.name().into());
                        report.round = Some(round);
                        out.runs.push(report);
                    }
                    Err(crate::error::BenchError::Interrupted) => {
                        return Err(crate::error::BenchError::Interrupted)
                    }
                    Err(e) => {
                        let line =
                            format!("{} {} round {round}: {e}", contender.name(), scenario.name());
                        eprintln!("[udp] failed: {line}");
                        out.failures.push(line);
                    }
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&run_dir);
    out.load_average_end = load_average();
    Ok(out)
}

/// The next loopback port at or after `next` that UDP can bind now.
fn free_udp_port(next: &mut u16) -> SocketAddr {
    loop {
        let addr = SocketAddr::from(([127, 0, 0, 1], *next));
        *next = if *next == u16::MAX { BASE_PORT } else { *next + 1 };
        if UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}

fn measure(
    plan: &UdpPlan,
    contender: &Prepared,
    scenario: UdpScenario,
    routes: &UdpRoutes,
    sink: &Sink,
    run_dir: &std::path::Path,
) -> Result<Report> {
    let (proxy, target) = match contender.kind {
        UdpContender::Direct => {
            let backend = if scenario == UdpScenario::Bulk { routes.sink } else { routes.echo };
            (None, Target::direct(backend))
        }
        _ => {
            let dir = run_dir.join(contender.name());
            let proxy = contender.start(routes, plan.workers, plan.nofile, &dir)?;
            let listen = match scenario {
                UdpScenario::Rr => routes.rr,
                UdpScenario::Bulk => routes.bulk,
                UdpScenario::Churn => routes.churn,
                UdpScenario::Idle => routes.idle,
            };
            let target = Target {
                addr: listen,
                label: format!("{} ({listen})", contender.name()),
                pid: Some(proxy.pid()),
            };
            (Some(proxy), target)
        }
    };
    match scenario {
        UdpScenario::Rr => {
            let params = UdpParams {
                size: plan.size,
                concurrency: plan.clients,
                threads: plan.threads,
                timing: plan.timing,
            };
            let mut report = crate::scenario::udp::run(&params, &target)?;
            report.scenario = scenario.name().into();
            Ok(report)
        }
        UdpScenario::Bulk => {
            let params =
                BulkParams { size: plan.bulk_size, senders: plan.senders, timing: plan.timing };
            bulk::run(&params, &target, sink)
        }
        UdpScenario::Churn => {
            let params = SourcesParams { sources: plan.sources, in_flight: plan.in_flight };
            sources::churn(&params, &target)
        }
        UdpScenario::Idle => {
            let pid = proxy.as_ref().map(|p| p.pid());
            idle(plan, &target, pid)
        }
    }
}

/// Idle flows: memory, descriptors and kernel socket memory of the forwarder, per flow.
fn idle(plan: &UdpPlan, target: &Target, pid: Option<u32>) -> Result<Report> {
    timeline::pause(IDLE_BASELINE_SETTLE)?;
    let before = pid.map(footprint).transpose()?;
    let slab_before = socket_slab_bytes();
    let params = SourcesParams { sources: plan.idle_flows, in_flight: plan.in_flight };
    let run = sources::run(&params, target.addr)?;
    timeline::pause(IDLE_SETTLE)?;
    let after = pid.map(footprint).transpose()?;
    let slab_after = socket_slab_bytes();
    let mut report = Report::new("udp-idle", target.label.clone(), &params)?;
    let flows = run.answered.max(1) as f64;
    report.figure("flows", run.answered as f64);
    report.figure("lost", run.lost as f64);
    if let (Some(b), Some(a)) = (before, after) {
        let rss = (a.rss_kib as f64 - b.rss_kib as f64) / flows;
        report.figure("rss_kib_per_flow", rss);
        report.figure("fds_per_flow", (a.fds as f64 - b.fds as f64) / flows);
        report.figure("rss_kib_before", b.rss_kib as f64);
        report.figure("rss_kib_after", a.rss_kib as f64);
        if let (Some(sb), Some(sa)) = (slab_before, slab_after) {
            let kernel = (sa as f64 - sb as f64) / 1024.0 / flows;
            report.figure("kernel_kib_per_flow", kernel);
            report.figure("total_kib_per_flow", rss + kernel);
        }
    }
    Ok(report)
}

/// Bytes held now by the slab caches of UDP sockets (machine-wide, from /proc/slabinfo;
/// `None` where it cannot be read, e.g. without root).
pub fn socket_slab_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/slabinfo").ok()?;
    Some(parse_slab_bytes(&text, &SOCKET_CACHES))
}

/// Sum of active objects x object size over the named caches of a /proc/slabinfo text.
pub fn parse_slab_bytes(text: &str, caches: &[&str]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !caches.contains(f.first()?) {
                return None;
            }
            Some(f.get(1)?.parse::<u64>().ok()? * f.get(3)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Median of `figure` over the rounds of `contender` in `scenario`.
fn median_of(run: &UdpRun, contender: &str, scenario: UdpScenario, figure: &str) -> Option<f64> {
    let values: Vec<f64> = run
        .runs
        .iter()
        .filter(|r| r.scenario == scenario.name() && r.contender.as_deref() == Some(contender))
        .filter_map(|r| r.figures.get(figure).copied())
        .collect();
    median(&values)
}

/// Markdown: per scenario the medians of every contender with their ratios to nginx and
/// to direct, then the targets of issue 25 with their verdicts.
pub fn summary(plan: &UdpPlan, run: &UdpRun) -> String {
    let names: Vec<&str> = plan.contenders.iter().map(|c| c.name()).collect();
    let mut text = String::new();
    for (name, reason) in &run.skipped {
        text += &format!("- **{name} skipped**: {reason}\n");
    }
    for &scenario in &plan.scenarios {
        text += &format!("\n### {} (median of {} rounds)\n\n", scenario.name(), plan.rounds);
        let figures = scenario.figures();
        let mut header: Vec<String> = vec!["contender".into()];
        header.extend(figures.iter().map(|f| f.to_string()));
        header.extend([format!("{} vs nginx", figures[0]), format!("{} vs direct", figures[0])]);
        let mut table = Table::new(header);
        for name in &names {
            let values: Vec<Option<f64>> =
                figures.iter().map(|f| median_of(run, name, scenario, f)).collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let mut row = vec![name.to_string()];
            row.extend(values.iter().map(|v| v.map_or("-".into(), format_figure)));
            for base in ["nginx", "direct"] {
                let r = values[0].zip(median_of(run, base, scenario, figures[0]));
                row.push(r.and_then(|(a, b)| ratio(a, b)).map_or("-".into(), format_ratio));
            }
            table.row(row);
        }
        text += &table.render();
    }
    text += "\n### Targets (issue 25)\n\n";
    let mut table = Table::new(["contender", "target", "measured", "verdict"]);
    for sluice in ["sluice", "sluice-shared"] {
        for t in targets(run, sluice) {
            table.row([sluice.to_string(), t.0, t.1, t.2]);
        }
    }
    text += &table.render();
    if !run.failures.is_empty() {
        text += "\n### Failed measurements\n\n";
        for f in &run.failures {
            text += &format!("- {f}\n");
        }
    }
    text
}

/// One target: its name, sluice's and the reference's medians, whether sluice's must be
/// at least (else at most) `bound` times the reference's, and the bound.
type Check<'a> = (&'a str, Option<f64>, Option<f64>, bool, f64);

/// (target, measured ratio, verdict) of one sluice contender.
fn targets(run: &UdpRun, sluice: &str) -> Vec<(String, String, String)> {
    use UdpScenario::*;
    let m = |c: &str, s, f| median_of(run, c, s, f);
    let checks: [Check<'_>; 5] = [
        (
            "rr round trips/s >= 1.5x nginx",
            m(sluice, Rr, "round_trips_per_s"),
            m("nginx", Rr, "round_trips_per_s"),
            true,
            1.5,
        ),
        (
            "rr p99 <= 0.7x nginx",
            m(sluice, Rr, "latency_us_p99"),
            m("nginx", Rr, "latency_us_p99"),
            false,
            0.7,
        ),
        (
            "rr round trips/s >= 0.7x direct",
            m(sluice, Rr, "round_trips_per_s"),
            m("direct", Rr, "round_trips_per_s"),
            true,
            0.7,
        ),
        (
            "bulk datagrams/s >= 1.5x nginx",
            m(sluice, Bulk, "datagrams_per_s"),
            m("nginx", Bulk, "datagrams_per_s"),
            true,
            1.5,
        ),
        (
            "memory per idle flow < nginx",
            m(sluice, Idle, "total_kib_per_flow"),
            m("nginx", Idle, "total_kib_per_flow"),
            false,
            1.0,
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(name, a, b, at_least, bound)| {
            let r = ratio(a?, b?)?;
            let met = if at_least { r >= bound } else { r <= bound && (bound < 1.0 || r < 1.0) };
            Some((
                name.to_string(),
                format_ratio(r),
                if met { "met" } else { "missed" }.to_string(),
            ))
        })
        .collect()
}

/// Writes `udp.md` and `udp.json` (every run) into `dir`; returns the markdown.
pub fn write(plan: &UdpPlan, run: &UdpRun, dir: &std::path::Path, heading: &str) -> Result<String> {
    fs::create_dir_all(dir).map_err(file_context(dir))?;
    let mut text = format!("{heading}\n\n");
    let load = |l: Option<f64>| l.map_or("unknown".into(), |l| format!("{l:.2}"));
    text += &format!(
        "{} round(s), contenders interleaved, a fresh forwarder per measurement; warm-up {:.2} s and window {:.2} s (rr, bulk); {} forwarder workers. rr: {} clients x {} B, one in flight each; bulk: {} senders x {} B; churn: {} new sources, {} in flight; idle: {} flows. One-minute load average {} at the start, {} at the end.\n",
        plan.rounds, plan.timing.warmup.as_secs_f64(), plan.timing.duration.as_secs_f64(), plan.workers,
        plan.clients, plan.size, plan.senders, plan.bulk_size, plan.sources, plan.in_flight, plan.idle_flows,
        load(run.load_average_start), load(run.load_average_end),
    );
    text += &summary(plan, run);
    let md = dir.join("udp.md");
    fs::write(&md, &text).map_err(file_context(&md))?;
    let medians: BTreeMap<String, BTreeMap<String, f64>> = plan
        .contenders
        .iter()
        .flat_map(|c| plan.scenarios.iter().map(move |s| (c, s)))
        .map(|(c, s)| {
            let figures = s
                .figures()
                .iter()
                .filter_map(|f| Some((f.to_string(), median_of(run, c.name(), *s, f)?)))
                .collect();
            (format!("{} {}", c.name(), s.name()), figures)
        })
        .collect();
    let json = serde_json::json!({ "parameters": plan, "medians": medians, "run": run });
    let path = dir.join("udp.json");
    fs::write(&path, serde_json::to_string_pretty(&json)?).map_err(file_context(&path))?;
    Ok(text)
}

/// `compare`'s UDP phase: the UDP contenders that match its `--contenders` (direct; both
/// sluice modes for any sluice kind; nginx), its timing and rounds; `udp.md` and
/// `udp.json` beside its report, and the section appended to `report.md`.
pub fn compare_phase(
    args: &crate::cli::CompareArgs,
    out_dir: &std::path::Path,
    sizing: crate::compare::contender::Sizing,
) -> Result<()> {
    use crate::compare::contender::ContenderKind;
    let mut contenders = Vec::new();
    for kind in &args.contenders {
        let udp: &[UdpContender] = match kind {
            ContenderKind::Direct => &[UdpContender::Direct],
            k if k.is_sluice() => &[UdpContender::Sluice, UdpContender::SluiceShared],
            ContenderKind::Nginx => &[UdpContender::Nginx],
            _ => &[],
        };
        for c in udp {
            if !contenders.contains(c) {
                contenders.push(*c);
            }
        }
    }
    let quick = args.quick;
    let plan = UdpPlan {
        rounds: if quick { 1 } else { args.rounds },
        timing: if quick {
            TimingParams {
                warmup: Duration::from_millis(150),
                duration: Duration::from_millis(500),
            }
        } else {
            args.timing.into()
        },
        scenarios: args.udp_scenarios.clone(),
        contenders,
        clients: args.udp.clients,
        threads: args.udp.threads,
        size: args.udp.size,
        bulk_size: args.udp.bulk_size,
        senders: args.udp.senders,
        sources: if quick { args.udp.sources.min(5000) } else { args.udp.sources },
        in_flight: args.udp.in_flight,
        idle_flows: if quick { args.udp.idle_flows.min(1000) } else { args.udp.idle_flows },
        workers: sizing.workers,
        nofile: sizing.nofile,
        programs: UdpPrograms { sluice: args.sluice_bin.clone(), nginx: args.nginx_bin.clone() },
    };
    let run = run(&plan)?;
    let text = write(&plan, &run, out_dir, "## UDP")?;
    let report = out_dir.join("report.md");
    let mut markdown = fs::read_to_string(&report).unwrap_or_default();
    markdown += &format!("\n{text}");
    fs::write(&report, markdown).map_err(file_context(&report))?;
    print!("\n{text}");
    Ok(())
}

/// Where results go when no directory is given.
pub fn default_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results").join("udp-latest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_bytes_sum_the_socket_caches_only() {
        let text = "slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> ...\nUDP 73 120 1344 12 4 : x\nfilp 1033 1113 192 21 1 : x\nTCP 10 10 2000 1 1 : x\n";
        assert_eq!(parse_slab_bytes(text, &SOCKET_CACHES), 73 * 1344 + 1033 * 192);
    }

    #[test]
    fn verdicts_compare_medians_with_the_issue_bounds() {
        let report = |contender: &str, scenario: UdpScenario, figure: &str, value: f64| {
            let mut r = Report::new(scenario.name(), String::new(), &()).unwrap();
            r.contender = Some(contender.into());
            r.figure(figure, value);
            r
        };
        let run = UdpRun {
            runs: vec![
                report("nginx", UdpScenario::Rr, "round_trips_per_s", 100.0),
                report("sluice", UdpScenario::Rr, "round_trips_per_s", 160.0),
                report("direct", UdpScenario::Rr, "round_trips_per_s", 250.0),
                report("nginx", UdpScenario::Idle, "total_kib_per_flow", 20.0),
                report("sluice", UdpScenario::Idle, "total_kib_per_flow", 3.0),
            ],
            ..UdpRun::default()
        };
        let verdicts = targets(&run, "sluice");
        let find = |name: &str| verdicts.iter().find(|v| v.0.starts_with(name)).cloned().unwrap();
        assert_eq!(find("rr round trips/s >= 1.5x nginx").2, "met");
        assert_eq!(find("rr round trips/s >= 0.7x direct").2, "missed", "0.64x direct");
        assert_eq!(find("memory").2, "met");
        assert!(verdicts.iter().all(|v| !v.0.contains("p99")), "no p99 measured, no verdict");
    }
}
