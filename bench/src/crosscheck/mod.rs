//! `crosscheck`: the comparison again, measured with standard tools instead of
//! sluice-bench's own load: iperf3 (one stream, and four) and wrk (keep-alive, and
//! `Connection: close`) against an nginx HTTP server serving one small file, through each
//! proxy and direct, on loopback.
//!
//! LIFECYCLE: the contenders are prepared as in `compare` (skipped with the reason when
//! missing); the HTTP server starts once and serves every wrk run. Then, round by round,
//! every test runs through every contender in turn (interleaved, so drift of the machine
//! hits them alike): each run gets a freshly started proxy on new ports, and an iperf3 run a
//! one-off iperf3 server of its own. The proxy's CPU time (its process tree, from /proc) is
//! read around each tool run. Each tool's raw output is kept under `raw/`; at the end the
//! medians, ratios to HAProxy and what else ran go to summary.md and summary.json. Every
//! process started is stopped after its run and on any error or Ctrl-C.

pub mod tools;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cli::CrosscheckArgs;
use crate::compare::contender::{
    find_program, prepare, start_server, Contender, ContenderKind, PortPool, Programs, Route,
    RunningProxy, Sizing,
};
use crate::compare::summary::{machine_notes, machine_table, Headline, Summary};
use crate::compare::template::{render, Templates};
use crate::compare::{default_out_dir, skip_entry, utc_date, Failure, RunDir, Skipped};
use crate::cpu::{
    clock_ticks, CpuSample, CpuUse, BYTES_PER_GB, CONNECTIONS_PER_UNIT, REQUESTS_PER_UNIT,
};
use crate::crosscheck::tools::{
    iperf3_client, iperf3_server, parse_iperf3, parse_wrk, run_bounded, version, wrk, WrkLoad,
};
use crate::error::{file_context, BenchError, Result};
use crate::procfs::{cores, load_average, raise_fd_limit};
use crate::report::Report;
use crate::scenario::Scenario;
use crate::topology::Topology;

/// Streams of the multi-stream iperf3 test.
pub const MANY_STREAMS: usize = 4;
/// Rounds unless `--rounds` says otherwise.
pub const DEFAULT_ROUNDS: u32 = 3;
/// Length of each tool run unless `--duration` says otherwise (as `--duration` reads it).
pub const DEFAULT_DURATION: &str = "5s";
/// wrk threads unless `--wrk-threads` says otherwise.
pub const DEFAULT_WRK_THREADS: usize = 2;
/// wrk connections unless `--wrk-connections` says otherwise.
pub const DEFAULT_WRK_CONNECTIONS: usize = 64;
/// Size in bytes of the served file unless `--file-size` says otherwise.
pub const DEFAULT_FILE_SIZE: usize = 1024;
/// Connection limit of the proxies (as in `compare`).
const PROXY_MAXCONN: u64 = 7_500;
/// A tool run may take this much longer than asked before it is killed.
const TOOL_GRACE: Duration = Duration::from_secs(30);
/// Name of the file the HTTP server serves.
const FILE_NAME: &str = "small.bin";

/// One test of the cross-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Test {
    /// iperf3, one stream.
    #[value(name = "iperf3-1")]
    #[serde(rename = "iperf3-1")]
    IperfOne,
    /// iperf3, four streams.
    #[value(name = "iperf3-4")]
    #[serde(rename = "iperf3-4")]
    IperfMany,
    /// wrk over keep-alive connections.
    #[value(name = "wrk-keepalive")]
    #[serde(rename = "wrk-keepalive")]
    WrkKeepAlive,
    /// wrk sending `Connection: close`: a new connection per request.
    #[value(name = "wrk-close")]
    #[serde(rename = "wrk-close")]
    WrkClose,
}

impl Test {
    /// Every test, in the order a round runs them.
    pub const ALL: [Test; 4] =
        [Test::IperfOne, Test::IperfMany, Test::WrkKeepAlive, Test::WrkClose];

    /// Name in tables, files and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Test::IperfOne => "iperf3-1",
            Test::IperfMany => "iperf3-4",
            Test::WrkKeepAlive => "wrk-keepalive",
            Test::WrkClose => "wrk-close",
        }
    }

    fn is_iperf(self) -> bool {
        matches!(self, Test::IperfOne | Test::IperfMany)
    }

    /// The proxy route the test's clients use (see [`routes`]).
    fn scenario(self) -> Scenario {
        match self {
            Test::IperfOne | Test::IperfMany => Scenario::Throughput,
            Test::WrkKeepAlive => Scenario::Rr,
            Test::WrkClose => Scenario::Connect,
        }
    }
}

/// The columns of the summary tables.
pub const HEADLINES: [Headline; 10] = [
    Headline { scenario: Test::IperfOne.name(), figure: "gbit_s", label: "iperf3 1 stream Gbit/s" },
    Headline {
        scenario: Test::IperfMany.name(),
        figure: "gbit_s",
        label: "iperf3 4 streams Gbit/s",
    },
    Headline {
        scenario: Test::WrkKeepAlive.name(),
        figure: "requests_per_s",
        label: "keep-alive req/s",
    },
    Headline {
        scenario: Test::WrkKeepAlive.name(),
        figure: "latency_us_p99",
        label: "keep-alive p99 µs",
    },
    Headline { scenario: Test::WrkClose.name(), figure: "requests_per_s", label: "close conn/s" },
    Headline { scenario: Test::WrkClose.name(), figure: "latency_us_p99", label: "close p99 µs" },
    Headline {
        scenario: Test::IperfOne.name(),
        figure: "cpu_s_per_gb",
        label: "1 stream CPU s/GB",
    },
    Headline {
        scenario: Test::IperfMany.name(),
        figure: "cpu_s_per_gb",
        label: "4 streams CPU s/GB",
    },
    Headline {
        scenario: Test::WrkKeepAlive.name(),
        figure: "cpu_s_per_100k_requests",
        label: "keep-alive CPU s/100k req",
    },
    Headline {
        scenario: Test::WrkClose.name(),
        figure: "cpu_s_per_10k_connections",
        label: "close CPU s/10k conn",
    },
];

/// Everything a cross-check needs, resolved from the command line.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub rounds: u32,
    #[serde(serialize_with = "crate::scenario::as_seconds", rename = "duration_s")]
    pub duration: Duration,
    pub tests: Vec<Test>,
    pub contenders: Vec<ContenderKind>,
    pub wrk_threads: usize,
    pub wrk_connections: usize,
    pub file_size: usize,
    pub cores: usize,
    pub sizing: Sizing,
    pub base_port: u16,
    pub out_dir: PathBuf,
}

/// The programs a cross-check runs.
#[derive(Debug, Clone)]
struct Tools {
    iperf3: PathBuf,
    wrk: PathBuf,
    nginx: PathBuf,
}

/// State of one cross-check.
struct Crosscheck {
    began: Instant,
    load_at_start: Option<f64>,
    plan: Plan,
    tools: Tools,
    templates: Templates,
    ports: PortPool,
    run_dir: RunDir,
    http: Option<(RunningProxy, SocketAddr)>,
    ready: Vec<Contender>,
    skipped: Vec<Skipped>,
    reports: Vec<Report>,
    failures: Vec<Failure>,
    versions: Vec<(String, String)>,
}

/// Runs `crosscheck` from parsed arguments.
pub fn run(args: &CrosscheckArgs) -> Result<()> {
    let began = Instant::now();
    let fd_limit = raise_fd_limit()?;
    let cores = cores();
    let plan = Plan {
        rounds: args.rounds.max(1),
        duration: args.duration.max(Duration::from_secs(1)),
        tests: dedup(&args.tests),
        contenders: dedup(&args.contenders),
        wrk_threads: args.wrk_threads.max(1),
        wrk_connections: args.wrk_connections.max(1),
        file_size: args.file_size,
        cores,
        sizing: Sizing {
            workers: args.workers.unwrap_or(cores),
            maxconn: PROXY_MAXCONN,
            nofile: fd_limit,
        },
        base_port: args.base_port,
        out_dir: args.out_dir.clone().unwrap_or_else(|| default_out_dir().join("crosscheck")),
    };
    let tools = Tools {
        iperf3: require(&args.iperf3_bin, plan.tests.iter().any(|t| t.is_iperf()))?,
        wrk: require(&args.wrk_bin, plan.tests.iter().any(|t| !t.is_iperf()))?,
        nginx: require(&args.nginx_bin, plan.tests.iter().any(|t| !t.is_iperf()))?,
    };
    let programs = Programs {
        sluice: args.sluice_bin.clone(),
        baseline: None,
        haproxy: args.haproxy_bin.clone(),
        nginx: args.nginx_bin.clone(),
        pin: args.pin,
    };
    let templates = match &args.peers_dir {
        Some(dir) => Templates::load(dir)?,
        None => Templates::builtin(),
    };
    for dir in [plan.out_dir.join("raw"), plan.out_dir.join("configs")] {
        fs::create_dir_all(&dir).map_err(file_context(&dir))?;
    }
    let mut check = Crosscheck {
        began,
        load_at_start: load_average(),
        ports: PortPool::new([127, 0, 0, 1].into(), plan.base_port),
        versions: versions(&programs, &tools, &plan),
        plan,
        tools,
        templates,
        run_dir: RunDir::create()?,
        http: None,
        ready: Vec::new(),
        skipped: Vec::new(),
        reports: Vec::new(),
        failures: Vec::new(),
    };
    check.prepare_contenders(&programs);
    check.start_http()?;
    check.measure_all()?;
    check.write_results(began.elapsed())?;
    check.say(&format!("finished; wrote {}", check.plan.out_dir.display()));
    Ok(())
}

/// The program to run for a tool that is needed, or why it cannot be.
fn require(program: &Path, needed: bool) -> Result<PathBuf> {
    if !needed {
        return Ok(program.to_path_buf());
    }
    find_program(program).ok_or_else(|| {
        BenchError::Usage(format!(
            "{} not found (scripts/crosscheck installs iperf3, wrk and nginx with apt-get)",
            program.display()
        ))
    })
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

/// The version line of every program the run uses.
fn versions(programs: &Programs, tools: &Tools, plan: &Plan) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if plan.tests.iter().any(|t| t.is_iperf()) {
        out.push(("iperf3".into(), version(&tools.iperf3, "--version")));
    }
    if plan.tests.iter().any(|t| !t.is_iperf()) {
        out.push(("wrk".into(), version(&tools.wrk, "-v")));
    }
    for kind in &plan.contenders {
        let (name, program, flag) = match kind {
            k if k.is_sluice() => ("sluice", programs.sluice.clone(), "--version"),
            k if k.is_haproxy() => {
                ("haproxy", find_program(&programs.haproxy).unwrap_or_default(), "-v")
            }
            ContenderKind::Nginx => {
                ("nginx", find_program(&programs.nginx).unwrap_or_default(), "-v")
            }
            _ => continue,
        };
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.into(), version(&program, flag)));
        }
    }
    if plan.tests.iter().any(|t| !t.is_iperf()) && !out.iter().any(|(n, _)| n == "nginx") {
        out.push(("nginx".into(), version(&tools.nginx, "-v")));
    }
    out
}

impl Crosscheck {
    fn say(&self, line: &str) {
        eprintln!("[crosscheck +{:.1}s] {line}", self.began.elapsed().as_secs_f64());
    }

    fn prepare_contenders(&mut self, programs: &Programs) {
        for kind in self.plan.contenders.clone() {
            match prepare(kind, programs, &self.templates) {
                Ok(contender) => self.ready.push(contender),
                Err(reason) => {
                    self.say(&format!("skipping {}: {reason}", kind.name()));
                    self.skipped.push(Skipped { contender: kind.name(), reason });
                }
            }
        }
    }

    /// Writes the file and starts nginx serving it, if any wrk test is to run.
    fn start_http(&mut self) -> Result<()> {
        if self.plan.tests.iter().all(|t| t.is_iperf()) {
            return Ok(());
        }
        let dir = self.run_dir.for_contender("http");
        let root = dir.join("www");
        fs::create_dir_all(&root).map_err(file_context(&root))?;
        let file = root.join(FILE_NAME);
        fs::write(&file, small_file(self.plan.file_size)).map_err(file_context(&file))?;
        let listen = self.ports.take()?;
        let sizing = self.plan.sizing;
        let values = [
            ("WORKERS", sizing.workers.to_string()),
            ("NOFILE", sizing.nofile.to_string()),
            ("WORKER_CONNECTIONS", sizing.worker_connections().to_string()),
            ("RUN_DIR", dir.display().to_string()),
            ("LISTEN", listen.to_string()),
            ("ROOT", root.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let text = render("nginx-http", &self.templates.nginx_http, &values)?;
        let config = dir.join("nginx-http.conf");
        fs::write(&config, text).map_err(file_context(&config))?;
        let copy = self.plan.out_dir.join("configs").join("nginx-http.conf");
        fs::copy(&config, &copy).map_err(file_context(&copy))?;
        let mut command = std::process::Command::new(&self.tools.nginx);
        command
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("nginx-http-startup.log"))
            .arg("-c")
            .arg(&config);
        let server =
            start_server("nginx-http", command, &dir.join("nginx-http.log"), config, &[listen])?;
        self.say(&format!(
            "HTTP server (nginx) on {listen}, serving a {}-byte file",
            self.plan.file_size
        ));
        self.http = Some((server, listen));
        Ok(())
    }

    fn measure_all(&mut self) -> Result<()> {
        let plan = self.plan.clone();
        for round in 1..=plan.rounds {
            for &test in &plan.tests {
                for index in 0..self.ready.len() {
                    let contender = self.ready[index].clone();
                    self.say(&format!(
                        "round {round}/{}: {} {}",
                        plan.rounds,
                        test.name(),
                        contender.name()
                    ));
                    match self.measure(&contender, test, round) {
                        Ok(report) => self.reports.push(report),
                        Err(BenchError::Interrupted) => return Err(BenchError::Interrupted),
                        Err(e) => {
                            self.say(&format!(
                                "{} {} round {round} failed: {e}",
                                contender.name(),
                                test.name()
                            ));
                            self.failures.push(Failure {
                                contender: contender.name(),
                                scenario: test.name(),
                                round,
                                error: e.to_string(),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One tool run through one contender, with a fresh proxy (and iperf3 server).
    fn measure(&mut self, contender: &Contender, test: Test, round: u32) -> Result<Report> {
        let run_dir = self.run_dir.for_contender(contender.name());
        fs::create_dir_all(&run_dir).map_err(file_context(&run_dir))?;
        let (iperf_server, backend) = match test.is_iperf() {
            true => {
                let listen = self.ports.take()?;
                let command = iperf3_server(&self.tools.iperf3, listen);
                let log = run_dir.join("iperf3-server.log");
                let server = start_server("iperf3-server", command, &log, log.clone(), &[listen])?;
                (Some(server), listen)
            }
            false => {
                (None, self.http.as_ref().map(|(_, addr)| *addr).expect("HTTP server started"))
            }
        };
        let (proxy, target) = if contender.is_proxy() {
            let routes = self.routes(test, backend)?;
            let proxy =
                contender.start(&routes, self.plan.sizing, &run_dir, &Topology::Loopback)?;
            self.keep_config(&proxy)?;
            let listen =
                routes.iter().find(|r| r.scenario == test.scenario()).expect("routed").listen;
            (Some(proxy), listen)
        } else {
            (None, backend)
        };
        let raw = self.plan.out_dir.join("raw").join(format!(
            "r{round}-{}-{}.{}",
            test.name(),
            contender.name(),
            if test.is_iperf() { "json" } else { "txt" }
        ));
        let pid = proxy.as_ref().map(RunningProxy::pid);
        let start = CpuSample::take();
        let status =
            run_bounded(self.tool_command(test, target), &raw, self.plan.duration + TOOL_GRACE)?;
        let end = CpuSample::take();
        drop(proxy);
        drop(iperf_server);
        let output = fs::read_to_string(&raw).map_err(file_context(&raw))?;
        let raw_name = raw.file_name().map(|n| n.to_string_lossy().into_owned());
        let label = format!("{} ({target})", contender.name());
        let mut report = Report::new(test.name(), label, &serde_json::json!({ "raw": raw_name }))?;
        report.contender = Some(contender.name().into());
        report.round = Some(round);
        let cpu = CpuUse::between(&start, &end, pid, std::process::id(), clock_ticks());
        add_tool_figures(&mut report, test, &output).map_err(|detail| {
            BenchError::Usage(format!("{detail} ({status}; see {})", raw.display()))
        })?;
        cpu.add_to(&mut report);
        add_costs(&mut report, &cpu, test);
        Ok(report)
    }

    /// Routes of a proxy: the iperf3 route to `backend` in an iperf3 run, the HTTP routes to
    /// the HTTP server (the templates route four scenarios; the unused ones go along).
    fn routes(&mut self, test: Test, backend: SocketAddr) -> Result<Vec<Route>> {
        let http = self.http.as_ref().map(|(_, addr)| *addr).unwrap_or(backend);
        Scenario::ALL
            .iter()
            .map(|&scenario| {
                let to = if test.is_iperf() && scenario == Scenario::Throughput {
                    backend
                } else {
                    http
                };
                Ok(Route { scenario, listen: self.ports.take()?, backend: to })
            })
            .collect()
    }

    fn keep_config(&self, proxy: &RunningProxy) -> Result<()> {
        let copy =
            self.plan.out_dir.join("configs").join(proxy.config().file_name().unwrap_or_default());
        if !copy.exists() {
            fs::copy(proxy.config(), &copy).map_err(file_context(&copy))?;
        }
        Ok(())
    }

    fn tool_command(&self, test: Test, target: SocketAddr) -> std::process::Command {
        let seconds = self.plan.duration.as_secs().max(1);
        let url = format!("http://{target}/{FILE_NAME}");
        let load = WrkLoad {
            threads: self.plan.wrk_threads,
            connections: self.plan.wrk_connections,
            duration: self.plan.duration,
            close: test == Test::WrkClose,
        };
        match test {
            Test::IperfOne => iperf3_client(&self.tools.iperf3, target, seconds, 1),
            Test::IperfMany => iperf3_client(&self.tools.iperf3, target, seconds, MANY_STREAMS),
            Test::WrkKeepAlive | Test::WrkClose => wrk(&self.tools.wrk, &url, load),
        }
    }

    fn names(&self) -> Vec<String> {
        self.ready.iter().map(|c| c.name().to_string()).collect()
    }

    fn write_results(&self, elapsed: Duration) -> Result<()> {
        let summary = Summary::build(&self.names(), &self.reports, &HEADLINES);
        let tests: Vec<&str> = self.plan.tests.iter().map(|t| t.name()).collect();
        let notes = machine_notes(&self.reports, &tests);
        let haproxy = ContenderKind::Haproxy.name();
        let mut text = self.header(elapsed);
        for skip in &self.skipped {
            text += &skip_entry(skip);
        }
        text += "\n## Medians over rounds (min–max in parentheses)\n\n";
        text += &summary.absolute_table().render();
        text += "\n## Ratio to HAProxy\n\n";
        text += &summary.ratio_table(haproxy).render();
        text += "\n## What else ran during the runs\n\n";
        text += "CPU in cores, median over the runs of each test (all contenders, all rounds) and the highest. The load generator is this process's children: the tool and the servers behind the proxies (nginx, iperf3).\n\n";
        text += &machine_table(&notes).render();
        text += &self.errors_section();
        text += "\n## Raw output\n\n`raw/` holds every run's output as the tool printed it: `rROUND-TEST-CONTENDER.json` (iperf3 --json) and `.txt` (wrk), with standard error beside it in `.err`; `configs/` the proxy and HTTP server configs.\n";
        let path = self.plan.out_dir.join("summary.md");
        fs::write(&path, &text).map_err(file_context(&path))?;
        let document = serde_json::json!({
            "scenario": "crosscheck",
            "date": utc_date(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
            "parameters": self.plan,
            "versions": self.versions.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "contenders": self.names(),
            "load_average_start": self.load_at_start,
            "load_average_end": load_average(),
            "skipped": self.skipped,
            "failures": self.failures,
            "medians": summary.medians(),
            "ratios_to_haproxy": summary.ratios(haproxy),
            "machine_during_runs": notes,
            "runs": self.reports,
        });
        let path = self.plan.out_dir.join("summary.json");
        fs::write(&path, serde_json::to_string_pretty(&document)?).map_err(file_context(&path))?;
        print!("{text}");
        Ok(())
    }

    fn header(&self, elapsed: Duration) -> String {
        let plan = &self.plan;
        let show = |load: Option<f64>| load.map_or("unknown".into(), |l| format!("{l:.2}"));
        let mut text = String::from("# Cross-check with standard tools\n\n");
        text += &format!(
            "{} round(s); in each round every test runs through every contender in turn. iperf3: {} s per run, the client sends, one stream and {MANY_STREAMS} streams. wrk: {} s per run, {} threads, {} connections, keep-alive and `Connection: close` (a new connection per request), against nginx serving a {}-byte file on 127.0.0.1. Each run starts a fresh proxy; {} cores, {} proxy workers; {:.0} s in all.\n\n",
            plan.rounds,
            plan.duration.as_secs().max(1),
            plan.duration.as_secs_f64(),
            plan.wrk_threads,
            plan.wrk_connections,
            plan.file_size,
            plan.cores,
            plan.sizing.workers,
            elapsed.as_secs_f64(),
        );
        text += &format!(
            "One-minute load average {} at the start, {} at the end (other work on the machine makes figures noisy).\n\n",
            show(self.load_at_start),
            show(load_average())
        );
        text += "CPU columns: user + system CPU seconds of the proxy's processes during the tool's run, per GB received by iperf3 (10^9 bytes), per 100,000 requests and per 10,000 connections (`Connection: close`: one per request); direct has none.\n\n";
        text += "Programs:\n\n";
        for (name, line) in &self.versions {
            text += &format!("- {name}: {line}\n");
        }
        text + "\n"
    }

    fn errors_section(&self) -> String {
        let mut lines = Vec::new();
        for report in &self.reports {
            let errors = report.figures.get("socket_errors").copied().unwrap_or(0.0);
            let non_2xx = report.figures.get("non_2xx").copied().unwrap_or(0.0);
            if errors > 0.0 || non_2xx > 0.0 {
                lines.push(format!(
                    "- {} {} round {}: {errors} socket errors, {non_2xx} non-2xx responses",
                    report.contender.as_deref().unwrap_or("?"),
                    report.scenario,
                    report.round.unwrap_or(0)
                ));
            }
        }
        for f in &self.failures {
            lines.push(format!(
                "- {} {} round {} failed: {}",
                f.contender, f.scenario, f.round, f.error
            ));
        }
        if lines.is_empty() {
            return "\nNo run failed; wrk counted no socket error and no non-2xx response.\n"
                .into();
        }
        format!("\n## Errors\n\n{}\n", lines.join("\n"))
    }
}

/// The tool's own figures from its output.
fn add_tool_figures(
    report: &mut Report,
    test: Test,
    output: &str,
) -> std::result::Result<(), String> {
    if test.is_iperf() {
        let result = parse_iperf3(output)?;
        report.figure("gbit_s", result.gbit_s);
        report.figure("bytes", result.bytes);
        report.figure("seconds", result.seconds);
        report.figure("retransmits", result.retransmits);
        return Ok(());
    }
    let result = parse_wrk(output)?;
    report.figure("requests_per_s", result.requests_per_s);
    report.figure("requests", result.requests);
    report.figure("seconds", result.seconds);
    report.figure("socket_errors", result.socket_errors);
    report.figure("non_2xx", result.non_2xx);
    for (name, value) in result.latency_us {
        report.figure(name, value);
    }
    Ok(())
}

/// The proxy's CPU per unit of the test's work.
fn add_costs(report: &mut Report, cpu: &CpuUse, test: Test) {
    let figure = |name: &str| report.figures.get(name).copied().unwrap_or(0.0);
    match test {
        Test::IperfOne | Test::IperfMany => {
            let bytes = figure("bytes");
            cpu.add_cost(report, "cpu_s_per_gb", bytes, BYTES_PER_GB);
        }
        Test::WrkKeepAlive | Test::WrkClose => {
            let requests = figure("requests");
            cpu.add_cost(report, "cpu_s_per_100k_requests", requests, REQUESTS_PER_UNIT);
            if test == Test::WrkClose {
                cpu.add_cost(report, "cpu_s_per_10k_connections", requests, CONNECTIONS_PER_UNIT);
            }
        }
    }
}

/// `size` bytes of printable text, so a reader of a capture sees what was served.
fn small_file(size: usize) -> Vec<u8> {
    b"sluice crosscheck\n".iter().copied().cycle().take(size).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_match_the_command_line_and_headlines() {
        use clap::ValueEnum;
        for test in Test::ALL {
            let value = test.to_possible_value().unwrap();
            assert_eq!(value.get_name(), test.name());
            assert!(HEADLINES.iter().any(|h| h.scenario == test.name()), "{test:?} has a column");
        }
        assert_eq!(serde_json::to_value(Test::IperfMany).unwrap(), "iperf3-4");
    }

    #[test]
    fn each_test_uses_its_own_proxy_route() {
        assert_eq!(Test::IperfOne.scenario(), Scenario::Throughput);
        assert_eq!(Test::WrkKeepAlive.scenario(), Scenario::Rr);
        assert_eq!(Test::WrkClose.scenario(), Scenario::Connect);
    }

    #[test]
    fn costs_follow_the_test() {
        let cpu = CpuUse {
            seconds: 5.0,
            proxy: Some(crate::cpu::CpuSplit { user_s: 1.0, system_s: 1.0 }),
            ..CpuUse::default()
        };
        let mut iperf = Report::new("iperf3-1", "t".into(), &()).unwrap();
        iperf.figure("bytes", 8e9);
        add_costs(&mut iperf, &cpu, Test::IperfOne);
        assert_eq!(iperf.get("cpu_s_per_gb"), Some(0.25));
        let mut close = Report::new("wrk-close", "t".into(), &()).unwrap();
        close.figure("requests", 50_000.0);
        add_costs(&mut close, &cpu, Test::WrkClose);
        assert_eq!(close.get("cpu_s_per_10k_connections"), Some(0.4));
        assert_eq!(close.get("cpu_s_per_100k_requests"), Some(4.0));
        let mut keep = Report::new("wrk-keepalive", "t".into(), &()).unwrap();
        keep.figure("requests", 200_000.0);
        add_costs(&mut keep, &cpu, Test::WrkKeepAlive);
        assert_eq!(keep.get("cpu_s_per_100k_requests"), Some(1.0));
        assert!(keep.get("cpu_s_per_10k_connections").is_none(), "keep-alive reuses connections");
    }

    #[test]
    fn served_file_has_the_asked_size() {
        assert_eq!(small_file(1024).len(), 1024);
        assert_eq!(&small_file(6), b"sluice");
        assert!(small_file(0).is_empty());
    }
}
