//! `compare`: every scenario against direct, sluice (uring and epoll), HAProxy and nginx.
//!
//! LIFECYCLE: the topology is set up first (loopback, or the veth namespaces; see
//! [`crate::topology`]), and removed last. The four in-process backends (bulk, echo,
//! reply, hold) start once and are shared by all contenders. Each contender is checked (program present, starts, forwards a
//! probe) or skipped with the reason. Then, per scenario and round, the contenders run in
//! turn (A B C, A B C, ...) so slow drift of the machine hits them alike; every
//! measurement gets a freshly started proxy on new ports, so none inherits memory or
//! connections from the one before. At the end: medians, ratios, verdicts on the targets,
//! markdown, JSON and SVG charts. Every proxy is stopped after its measurement and on any
//! error or interruption. On the veth topology, backends start in the backend namespace,
//! proxies in the proxy namespace, and every client connection (probes included) is opened
//! from the client namespace.

pub mod chart;
pub mod contender;
pub mod goals;
pub mod summary;
pub mod template;

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::backend::{Backend, Behaviour};
use crate::cli::CompareArgs;
use crate::compare::contender::{
    check_forwarding, prepare, Contender, ContenderKind, PortPool, Programs, Route, Sizing,
};
use crate::compare::goals::{verdict_table, verdicts, Outcome, Verdict};
use crate::compare::summary::{machine_notes, machine_table, Summary, HEADLINES};
use crate::compare::template::Templates;
use crate::error::{file_context, BenchError, Result};
use crate::net;
use crate::procfs::{cores, load_average, raise_fd_limit};
use crate::report::{append_json_lines, Report};
use crate::scenario::connect::ConnectParams;
use crate::scenario::idle::{max_connections, IdleParams};
use crate::scenario::rr::RrParams;
use crate::scenario::throughput::{Direction, ThroughputParams};
use crate::scenario::{self, Scenario, Target, TimingParams};
use crate::stats::{cdf_points, latency_histogram};
use crate::timeline;
use crate::topology::{Side, Topology, TopologyInfo, TopologyKind};

/// Quick mode: one round of short windows, sized to finish within 20 s.
const QUICK_TIMING: TimingParams =
    TimingParams { warmup: Duration::from_millis(150), duration: Duration::from_millis(500) };
const QUICK_IDLE_CONNECTIONS: usize = 1000;
/// Pause after a proxy is ready before its idle baseline is read (workers finish starting).
const IDLE_BASELINE_SETTLE: Duration = Duration::from_millis(300);
const QUICK_IDLE_BASELINE_SETTLE: Duration = Duration::from_millis(100);
/// Pause between "all idle connections established" and the second reading.
const IDLE_SETTLE: Duration = Duration::from_millis(500);
const QUICK_IDLE_SETTLE: Duration = Duration::from_millis(200);
/// How the CPU columns are read.
const CPU_NOTE: &str = "CPU columns: user + system CPU seconds of the proxy's processes (sluice's and HAProxy's one process; nginx's master and workers) over each measured window, per GB moved (10^9 bytes), per 100,000 requests and per 10,000 connections (lower is better); direct has no proxy and so no figure. The idle scenario's `cpu_s` (in compare.json) covers opening and holding its connections.\n\n";
/// How the table of what else ran is read.
const MACHINE_NOTE: &str = "CPU in cores (CPU seconds per second of window), median over the windows of each scenario (all contenders, all rounds) and the highest. *Other processes* is the machine's busy time less the proxy's and the load generator's (sluice-bench: clients and in-process backends); kernel threads such as ksoftirqd count there. Load average: one-minute, lowest and highest at a window's start or end.\n\n";
/// Connection limit written into every proxy config. HAProxy asks for about 2.5
/// descriptors per connection (both sockets plus splice pipes), which must fit in 20000.
const PROXY_MAXCONN: u64 = 7_500;

/// Everything a comparison run needs, resolved from the command line.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub rounds: u32,
    #[serde(flatten)]
    pub timing: TimingParams,
    pub quick: bool,
    pub scenarios: Vec<Scenario>,
    pub contenders: Vec<ContenderKind>,
    pub streams: usize,
    pub direction: Direction,
    pub size: usize,
    pub rr_concurrency: usize,
    pub connect_concurrency: usize,
    pub threads: usize,
    pub idle_connections: usize,
    #[serde(serialize_with = "scenario::as_seconds")]
    pub idle_settle: Duration,
    #[serde(serialize_with = "scenario::as_seconds")]
    pub idle_baseline_settle: Duration,
    pub cores: usize,
    pub sizing: Sizing,
    pub base_port: u16,
    pub out_dir: PathBuf,
    pub topology: TopologyKind,
    pub veth_mtu: u32,
}

impl Plan {
    /// Resolves defaults and `--quick` against the command line.
    pub fn from_args(args: &CompareArgs, fd_limit: u64) -> Result<Plan> {
        let quick = args.quick;
        let timing = if quick { QUICK_TIMING } else { args.timing.into() };
        let wanted_idle = if quick {
            args.idle_connections.min(QUICK_IDLE_CONNECTIONS)
        } else {
            args.idle_connections
        };
        let idle_limit = max_connections(fd_limit, true).min(PROXY_MAXCONN) as usize;
        if wanted_idle > idle_limit {
            return Err(BenchError::Usage(format!(
                "--idle-connections {wanted_idle} exceeds what the descriptor limit allows ({idle_limit})"
            )));
        }
        let cores = cores();
        Ok(Plan {
            rounds: if quick { 1 } else { args.rounds.max(1) },
            timing,
            quick,
            scenarios: dedup(&args.scenarios),
            contenders: with_baseline(
                dedup(&default_contenders(&args.contenders, quick)),
                args.baseline_bin.is_some(),
            ),
            streams: args.streams,
            direction: args.direction,
            size: args.size,
            rr_concurrency: args.rr_concurrency,
            connect_concurrency: args.connect_concurrency,
            threads: args.threads,
            idle_connections: wanted_idle,
            idle_settle: if quick { QUICK_IDLE_SETTLE } else { IDLE_SETTLE },
            idle_baseline_settle: if quick {
                QUICK_IDLE_BASELINE_SETTLE
            } else {
                IDLE_BASELINE_SETTLE
            },
            cores,
            sizing: Sizing {
                workers: args.workers.unwrap_or(cores),
                maxconn: PROXY_MAXCONN,
                nofile: fd_limit,
            },
            base_port: args.base_port,
            topology: args.topology,
            veth_mtu: args.veth_mtu,
            out_dir: args.out_dir.clone().unwrap_or_else(default_out_dir),
        })
    }
}

/// A skipped contender as a list item; a log excerpt becomes an indented code block.
pub fn skip_entry(skip: &Skipped) -> String {
    let mut lines = skip.reason.lines();
    let mut entry =
        format!("- **{} skipped**: {}\n", skip.contender, lines.next().unwrap_or_default());
    let rest: Vec<&str> = lines.collect();
    if !rest.is_empty() {
        entry += "\n  ```text\n";
        for line in rest {
            entry += &format!("  {line}\n");
        }
        entry += "  ```\n\n";
    }
    entry
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Upload => "upload",
        Direction::Download => "download",
        Direction::Both => "both ways",
    }
}

/// Each contender of the build under test with its counterpart in the baseline build.
const BASELINE_PAIRS: [(ContenderKind, ContenderKind); 3] = [
    (ContenderKind::SluiceUring, ContenderKind::BaseUring),
    (ContenderKind::SluiceUringSplice, ContenderKind::BaseUringSplice),
    (ContenderKind::SluiceEpoll, ContenderKind::BaseEpoll),
];

/// The contenders with the baseline build's beside the sluice ones, when a baseline binary
/// is given and none of them was named.
fn with_baseline(mut contenders: Vec<ContenderKind>, baseline: bool) -> Vec<ContenderKind> {
    if !baseline || contenders.iter().any(|k| k.is_baseline()) {
        return contenders;
    }
    let at = contenders.iter().rposition(|k| k.is_sluice()).map_or(contenders.len(), |i| i + 1);
    contenders.splice(at..at, ContenderKind::BASELINE);
    contenders
}

fn scenario_names(scenarios: &[Scenario]) -> Vec<&'static str> {
    scenarios.iter().map(|s| s.name()).collect()
}

/// The contenders named, or the default list of the mode when none are.
fn default_contenders(named: &[ContenderKind], quick: bool) -> Vec<ContenderKind> {
    match (named.is_empty(), quick) {
        (false, _) => named.to_vec(),
        (true, true) => ContenderKind::QUICK.to_vec(),
        (true, false) => ContenderKind::ALL.to_vec(),
    }
}

fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(item) {
            out.push(*item);
        }
    }
    out
}

/// `bench/results/YYYY-MM-DD` of this workspace, by today's UTC date.
pub fn default_out_dir() -> PathBuf {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results").join(utc_date(seconds))
}

/// `YYYY-MM-DD` of a Unix time, in UTC (proleptic Gregorian calendar).
pub fn utc_date(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    // Days since 1970-01-01 to a civil date, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The shared in-process backends, one per scenario.
struct Backends {
    bulk: Backend,
    echo: Backend,
    reply: Backend,
    hold: Backend,
}

impl Backends {
    /// Starts the backends on `ip`, each on a free port.
    fn start(plan: &Plan, ip: IpAddr) -> Result<Backends> {
        let any = SocketAddr::new(ip, 0);
        let size = plan.size;
        Ok(Backends {
            bulk: Backend::start(any, plan.direction.backend())?,
            echo: Backend::start(any, Behaviour::Echo)?,
            reply: Backend::start(any, Behaviour::Reply { request: size, reply: size })?,
            hold: Backend::start(any, Behaviour::Hold)?,
        })
    }

    fn get(&self, scenario: Scenario) -> &Backend {
        match scenario {
            Scenario::Throughput => &self.bulk,
            Scenario::Rr => &self.echo,
            Scenario::Connect => &self.reply,
            Scenario::Idle => &self.hold,
        }
    }
}

/// A contender left out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub contender: &'static str,
    pub reason: String,
}

/// A measurement that failed; the others go on.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub contender: &'static str,
    pub scenario: &'static str,
    pub round: u32,
    pub error: String,
}

/// Private directory for proxy configs, pid files and logs; removed when dropped.
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn create() -> Result<RunDir> {
        let path = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
        fs::create_dir_all(&path).map_err(file_context(&path))?;
        Ok(RunDir(path))
    }

    pub fn for_contender(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// State of one comparison run.
struct Comparison {
    began: Instant,
    load_at_start: Option<f64>,
    plan: Plan,
    backends: Backends,
    ports: PortPool,
    run_dir: RunDir,
    ready: Vec<Contender>,
    skipped: Vec<Skipped>,
    reports: Vec<Report>,
    failures: Vec<Failure>,
    /// Addresses, MTU and offloads of the topology, for the report.
    topology_info: TopologyInfo,
    /// Last, so the namespaces go after every socket and proxy of the run.
    topology: Topology,
}

/// Runs `compare` from parsed arguments.
pub fn run(args: &CompareArgs) -> Result<()> {
    let began = Instant::now();
    let fd_limit = raise_fd_limit()?;
    let plan = Plan::from_args(args, fd_limit)?;
    let programs = Programs {
        sluice: args.sluice_bin.clone(),
        baseline: args.baseline_bin.clone(),
        haproxy: args.haproxy_bin.clone(),
        nginx: args.nginx_bin.clone(),
        pin: args.pin,
    };
    let templates = match &args.peers_dir {
        Some(dir) => Templates::load(dir)?,
        None => Templates::builtin(),
    };
    let topology = Topology::set_up(plan.topology, plan.veth_mtu)?;
    fs::create_dir_all(&plan.out_dir).map_err(file_context(&plan.out_dir))?;
    if plan.topology == TopologyKind::Veth {
        net::allow_veth_network();
        eprintln!(
            "[compare] veth topology: clients {}, proxies {}, backends {}, MTU {}",
            topology.address(Side::Client),
            topology.address(Side::Proxy),
            topology.address(Side::Backend),
            plan.veth_mtu
        );
    }
    let backend_ip = topology.address(Side::Backend);
    let mut comparison = Comparison {
        began,
        load_at_start: load_average(),
        backends: topology.run_in(Side::Backend, || Backends::start(&plan, backend_ip))?,
        ports: PortPool::new(topology.address(Side::Proxy), plan.base_port),
        run_dir: RunDir::create()?,
        plan,
        ready: Vec::new(),
        skipped: Vec::new(),
        reports: Vec::new(),
        failures: Vec::new(),
        topology_info: topology.describe(),
        topology,
    };
    comparison.prepare_contenders(&programs, &templates)?;
    comparison.measure_all(args.output.out.as_deref())?;
    let written = comparison.write_results(args.output.json, began.elapsed())?;
    if !args.no_udp && !args.udp_scenarios.is_empty() {
        comparison.say("UDP scenarios");
        crate::udp::compare_phase(args, &comparison.plan.out_dir, comparison.plan.sizing)?;
    }
    comparison.say(&format!("finished; wrote {}", written.display()));
    Ok(())
}

impl Comparison {
    /// Prints one line of progress, stamped with the time since the start.
    fn say(&self, line: &str) {
        eprintln!("[compare +{:.1}s] {line}", self.began.elapsed().as_secs_f64());
    }

    fn prepare_contenders(&mut self, programs: &Programs, templates: &Templates) -> Result<()> {
        for kind in self.plan.contenders.clone() {
            let outcome = match prepare(kind, programs, templates) {
                Ok(contender) => {
                    self.preflight(&contender).map(|()| contender).map_err(|e| e.to_string())
                }
                Err(reason) => Err(reason),
            };
            if timeline::interrupted() {
                return Err(BenchError::Interrupted);
            }
            match outcome {
                Ok(contender) => self.ready.push(contender),
                Err(reason) => {
                    self.say(&format!("skipping {}: {reason}", kind.name()));
                    self.skipped.push(Skipped { contender: kind.name(), reason });
                }
            }
        }
        Ok(())
    }

    /// Starts the proxy once, checks that it forwards, keeps a copy of its config.
    fn preflight(&mut self, contender: &Contender) -> Result<()> {
        if !contender.is_proxy() {
            return Ok(());
        }
        let routes = self.routes()?;
        let run_dir = self.run_dir.for_contender(contender.name());
        let proxy = contender.start(&routes, self.plan.sizing, &run_dir, &self.topology)?;
        let echo =
            routes.iter().find(|r| r.scenario == Scenario::Rr).expect("every scenario routed");
        self.topology.run_in(Side::Client, || check_forwarding(echo.listen))?;
        let configs = self.plan.out_dir.join("configs");
        fs::create_dir_all(&configs).map_err(file_context(&configs))?;
        let copy = configs.join(proxy.config().file_name().unwrap_or_default());
        fs::copy(proxy.config(), &copy).map_err(file_context(&copy))?;
        drop(proxy);
        self.say(&format!("{} ready: started, listening, forwarded a probe", contender.name()));
        Ok(())
    }

    /// A fresh listen address per scenario, free in the proxies' namespace.
    fn routes(&mut self) -> Result<Vec<Route>> {
        let ports = &mut self.ports;
        let listens: Vec<SocketAddr> = self
            .topology
            .run_in(Side::Proxy, || Scenario::ALL.iter().map(|_| ports.take()).collect())?;
        let backends = &self.backends;
        let routes = Scenario::ALL.iter().zip(listens).map(|(&scenario, listen)| Route {
            scenario,
            listen,
            backend: backends.get(scenario).addr(),
        });
        Ok(routes.collect())
    }

    fn measure_all(&mut self, json_lines: Option<&Path>) -> Result<()> {
        let plan = self.plan.clone();
        for &scenario in &plan.scenarios {
            for round in 1..=plan.rounds {
                for index in 0..self.ready.len() {
                    let contender = self.ready[index].clone();
                    if scenario == Scenario::Idle && !contender.is_proxy() {
                        continue;
                    }
                    self.measure_and_keep(&contender, scenario, round, json_lines)?;
                }
            }
        }
        Ok(())
    }

    fn measure_and_keep(
        &mut self,
        contender: &Contender,
        scenario: Scenario,
        round: u32,
        json_lines: Option<&Path>,
    ) -> Result<()> {
        self.say(&format!(
            "{} round {round}/{}: {}",
            scenario.name(),
            self.plan.rounds,
            contender.name()
        ));
        match self.measure(contender, scenario) {
            Ok(mut report) => {
                report.contender = Some(contender.name().into());
                report.round = Some(round);
                if let Some(path) = json_lines {
                    append_json_lines(path, std::slice::from_ref(&report))?;
                }
                self.reports.push(report);
                Ok(())
            }
            Err(BenchError::Interrupted) => Err(BenchError::Interrupted),
            Err(e) => {
                self.say(&format!(
                    "{} {} round {round} failed: {e}",
                    contender.name(),
                    scenario.name()
                ));
                let error = e.to_string();
                self.failures.push(Failure {
                    contender: contender.name(),
                    scenario: scenario.name(),
                    round,
                    error,
                });
                Ok(())
            }
        }
    }

    fn measure(&mut self, contender: &Contender, scenario: Scenario) -> Result<Report> {
        let backend_addr = self.backends.get(scenario).addr();
        if !contender.is_proxy() {
            let target = Target::direct(backend_addr);
            return self.topology.run_in(Side::Client, || self.run_scenario(scenario, &target));
        }
        let routes = self.routes()?;
        let listen =
            routes.iter().find(|r| r.scenario == scenario).expect("every scenario routed").listen;
        let proxy = contender.start(
            &routes,
            self.plan.sizing,
            &self.run_dir.for_contender(contender.name()),
            &self.topology,
        )?;
        let target = Target {
            addr: listen,
            label: format!("{} ({listen})", contender.name()),
            pid: Some(proxy.pid()),
        };
        let report = self.topology.run_in(Side::Client, || self.run_scenario(scenario, &target));
        drop(proxy);
        report
    }

    fn run_scenario(&self, scenario: Scenario, target: &Target) -> Result<Report> {
        let plan = &self.plan;
        let backend = self.backends.get(scenario);
        match scenario {
            Scenario::Throughput => {
                let params = ThroughputParams {
                    streams: plan.streams,
                    direction: plan.direction,
                    timing: plan.timing,
                };
                scenario::throughput::run(&params, target, Some(backend))
            }
            Scenario::Rr => {
                let params = RrParams {
                    size: plan.size,
                    concurrency: plan.rr_concurrency,
                    threads: plan.threads,
                    timing: plan.timing,
                };
                scenario::rr::run(&params, target)
            }
            Scenario::Connect => {
                let params = ConnectParams {
                    concurrency: plan.connect_concurrency,
                    size: plan.size,
                    threads: plan.threads,
                    timing: plan.timing,
                };
                scenario::connect::run(&params, target)
            }
            Scenario::Idle => {
                timeline::pause(plan.idle_baseline_settle)?;
                let params = IdleParams {
                    connections: plan.idle_connections,
                    settle: plan.idle_settle,
                    pid: target.pid,
                };
                scenario::idle::run(&params, target, Some(backend))
            }
        }
    }

    fn names(&self) -> Vec<String> {
        self.ready.iter().map(|c| c.name().to_string()).collect()
    }

    /// Sluice contenders asked for, whether they ran or were skipped.
    fn sluice_names(&self) -> Vec<String> {
        self.plan
            .contenders
            .iter()
            .filter(|k| k.is_sluice())
            .map(|k| k.name().to_string())
            .collect()
    }

    fn verdicts(&self, summary: &Summary) -> Vec<Verdict> {
        let mut verdicts = verdicts(summary, &self.sluice_names(), self.plan.streams);
        for verdict in &mut verdicts {
            if self.skipped.iter().any(|s| s.contender == verdict.contender) {
                verdict.outcome =
                    Outcome::NotMeasured { reason: "contender skipped, see above".into() };
            }
        }
        verdicts
    }

    fn write_results(&self, json_stdout: bool, elapsed: Duration) -> Result<PathBuf> {
        let out_dir = &self.plan.out_dir;
        let summary = Summary::build(&self.names(), &self.reports, &HEADLINES);
        let verdicts = self.verdicts(&summary);
        let charts = self.draw_charts(&summary)?;
        let markdown = self.markdown(&summary, &verdicts, &charts, elapsed);
        let report_path = out_dir.join("report.md");
        fs::write(&report_path, &markdown).map_err(file_context(&report_path))?;
        if !self.topology_info.raw.is_empty() {
            let path = out_dir.join("topology.txt");
            fs::write(&path, &self.topology_info.raw).map_err(file_context(&path))?;
        }
        let json = self.json(&summary, &verdicts)?;
        let json_path = out_dir.join("compare.json");
        fs::write(&json_path, &json).map_err(file_context(&json_path))?;
        if json_stdout {
            println!("{json}");
        } else {
            print!("{markdown}");
        }
        Ok(out_dir.clone())
    }

    fn json(&self, summary: &Summary, verdicts: &[Verdict]) -> Result<String> {
        let haproxy = ContenderKind::Haproxy.name();
        let document = serde_json::json!({
            "scenario": "compare",
            "date": utc_date(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
            "parameters": self.plan,
            "topology": self.topology_info,
            "contenders": self.names(),
            "load_average_start": self.load_at_start,
            "load_average_end": load_average(),
            "skipped": self.skipped,
            "failures": self.failures,
            "medians": summary.medians(),
            "ratios_to_direct": summary.ratios(ContenderKind::Direct.name()),
            "ratios_to_haproxy": summary.ratios(haproxy),
            "ratios_to_baseline": BASELINE_PAIRS
                .iter()
                .filter_map(|(this, base)| {
                    let pair = summary.ratios(base.name()).remove(this.name())?;
                    Some((format!("{} / {}", this.name(), base.name()), pair))
                })
                .collect::<std::collections::BTreeMap<_, _>>(),
            "targets": verdicts,
            "machine_during_windows": machine_notes(&self.reports, &scenario_names(&self.plan.scenarios)),
            "runs": self.reports,
        });
        Ok(serde_json::to_string_pretty(&document)?)
    }

    fn markdown(
        &self,
        summary: &Summary,
        verdicts: &[Verdict],
        charts: &[PathBuf],
        elapsed: Duration,
    ) -> String {
        let plan = &self.plan;
        let mut text = String::from("# sluice-bench compare\n\n");
        text += &format!(
            "{} round(s), contenders interleaved; warm-up {:.2} s and window {:.2} s per measurement; {} cores, {} proxy workers; {:.0} s in all{}.\n\n",
            plan.rounds,
            plan.timing.warmup.as_secs_f64(),
            plan.timing.duration.as_secs_f64(),
            plan.cores,
            plan.sizing.workers,
            elapsed.as_secs_f64(),
            if plan.quick { " (quick mode: figures are indicative only)" } else { "" },
        );
        text += &format!("{}\n\n", self.load_note());
        text += &format!(
            "Scenarios: throughput {} stream(s) {}; rr {} B x {} connections; connect {} B x {} in flight; idle {} connections. Backends run in-process on {}.\n\n",
            plan.streams, direction_name(plan.direction), plan.size, plan.rr_concurrency, plan.size, plan.connect_concurrency, plan.idle_connections, self.topology_info.backend_address,
        );
        text += &self.topology_info.markdown();
        text += CPU_NOTE;
        for skip in &self.skipped {
            text += &skip_entry(skip);
        }
        if !self.skipped.is_empty() {
            text += "\n";
        }
        text += "## Absolute figures (median over rounds; min–max in parentheses)\n\n";
        text += &summary.absolute_table().render();
        text += "\n## Ratio to direct\n\n";
        text += &summary.ratio_table(ContenderKind::Direct.name()).render();
        text += "\n## Ratio to HAProxy\n\n";
        text += &summary.ratio_table(ContenderKind::Haproxy.name()).render();
        if self.plan.contenders.iter().any(|k| k.is_baseline()) {
            text += "\n## This build against the baseline build (same driver and relay)\n\n";
            text +=
                &summary.pair_table(&BASELINE_PAIRS.map(|(a, b)| (a.name(), b.name()))).render();
        }
        text += "\n## What else ran during the measured windows\n\n";
        text += MACHINE_NOTE;
        text += &machine_table(&machine_notes(&self.reports, &scenario_names(&plan.scenarios)))
            .render();
        text += "\n## Targets (ratios of sluice to a peer, or bounds on sluice alone)\n\n";
        text += &verdict_table(verdicts, &self.sluice_names()).render();
        if !self.failures.is_empty() {
            text += "\n## Failed measurements\n\n";
            for f in &self.failures {
                text +=
                    &format!("- {} {} round {}: {}\n", f.contender, f.scenario, f.round, f.error);
            }
        }
        text += "\n## Charts\n\n";
        for chart in charts {
            let name =
                chart.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            text += &format!("- [{name}]({name})\n");
        }
        text
    }

    /// The machine's one-minute load at start and end: a busy machine makes figures noisy.
    fn load_note(&self) -> String {
        let show = |load: Option<f64>| load.map_or("unknown".into(), |l| format!("{l:.2}"));
        format!(
            "One-minute load average {} at the start, {} at the end (other work on the machine makes figures noisy).",
            show(self.load_at_start),
            show(load_average())
        )
    }

    fn draw_charts(&self, summary: &Summary) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        let bar_charts = [
            (Scenario::Throughput, "gbit_s_total", "throughput.svg", "Throughput", "Gbit/s"),
            (
                Scenario::Rr,
                "requests_per_s",
                "rr_requests.svg",
                "Request/response rate",
                "requests/s",
            ),
            (
                Scenario::Connect,
                "connections_per_s",
                "connect_rate.svg",
                "New connections",
                "connections/s",
            ),
            (
                Scenario::Idle,
                "kib_per_connection",
                "idle_memory.svg",
                "Idle memory per connection",
                "KiB",
            ),
        ];
        for (scenario, figure, file, title, unit) in bar_charts {
            let items: Vec<(String, f64)> = self
                .names()
                .into_iter()
                .filter_map(|name| {
                    Some((name.clone(), summary.median(&name, scenario.name(), figure)?))
                })
                .collect();
            if items.is_empty() {
                continue;
            }
            let path = self.plan.out_dir.join(file);
            chart::bars(&path, title, unit, &items)?;
            written.push(path);
        }
        for (scenario, file, title) in [
            (Scenario::Rr, "rr_latency_cdf.svg", "Request/response latency CDF"),
            (Scenario::Connect, "connect_latency_cdf.svg", "Connect latency CDF"),
        ] {
            let series = self.merged_cdfs(scenario);
            if series.is_empty() {
                continue;
            }
            let path = self.plan.out_dir.join(file);
            chart::cdf(&path, title, &series)?;
            written.push(path);
        }
        Ok(written)
    }

    /// CDF points per contender from its histograms merged over all rounds.
    fn merged_cdfs(&self, scenario: Scenario) -> Vec<(String, Vec<[f64; 2]>)> {
        let mut merged: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
        for report in self.reports.iter().filter(|r| r.scenario == scenario.name()) {
            let (Some(name), Some(histogram)) = (&report.contender, &report.histogram) else {
                continue;
            };
            let total = merged.entry(name.clone()).or_insert_with(latency_histogram);
            total.add(histogram).expect("histograms share bounds");
        }
        self.names()
            .into_iter()
            .filter_map(|name| {
                let points = cdf_points(merged.get(&name)?);
                (!points.is_empty()).then_some((name, points))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_of_known_instants() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28");
    }

    #[test]
    fn skip_reason_with_log_lines_stays_in_its_list_item() {
        let skip = Skipped {
            contender: "haproxy",
            reason: "exited; last lines:\n[ALERT] bad\n[ALERT] worse".into(),
        };
        let text = skip_entry(&skip);
        assert!(text.starts_with("- **haproxy skipped**: exited; last lines:\n"));
        assert!(text.contains("\n  [ALERT] bad\n  [ALERT] worse\n  ```\n"));
        let plain = skip_entry(&Skipped { contender: "nginx", reason: "not installed".into() });
        assert_eq!(plain, "- **nginx skipped**: not installed\n");
    }

    #[test]
    fn a_baseline_build_runs_right_after_the_build_under_test() {
        use ContenderKind::*;
        let all = with_baseline(ContenderKind::ALL.to_vec(), true);
        assert_eq!(
            all,
            [
                Direct,
                SluiceUring,
                SluiceUringNopin,
                SluiceUringSplice,
                SluiceEpoll,
                BaseUring,
                BaseUringSplice,
                BaseEpoll,
                Haproxy,
                HaproxySplice,
                Nginx
            ]
        );
        assert_eq!(with_baseline(vec![Haproxy], false), [Haproxy]);
        assert_eq!(with_baseline(vec![BaseEpoll, Haproxy], true), [BaseEpoll, Haproxy]);
    }

    #[test]
    fn quick_mode_measures_fewer_contenders_unless_named() {
        use ContenderKind::*;
        assert_eq!(default_contenders(&[], false), ContenderKind::ALL);
        assert_eq!(default_contenders(&[], true), ContenderKind::QUICK);
        assert!(ContenderKind::QUICK.iter().all(|k| ContenderKind::ALL.contains(k)));
        assert_eq!(default_contenders(&[HaproxySplice], true), [HaproxySplice]);
    }

    #[test]
    fn dedup_keeps_first_order() {
        assert_eq!(dedup(&[3, 1, 3, 2, 1]), vec![3, 1, 2]);
    }
}
