//! `sluice-bench`: load generator and peer comparison for the sluice TCP forwarder.
//!
//! Scenarios (`throughput`, `rr`, `connect`, `idle`) each start their own loopback backend
//! unless `--backend` names an external one, send load to `--target` (or straight to the
//! backend), and print a result table or JSON. `compare` runs them all against direct,
//! sluice, HAProxy and nginx (on loopback, or across veth pairs between network namespaces
//! it creates); `crosscheck` measures the same proxies with iperf3 and wrk. Every run is
//! bounded in time and stops by itself; traffic never leaves the machine.

#![forbid(unsafe_code)]

mod backend;
mod capture;
mod cli;
mod compare;
mod cpu;
mod crosscheck;
mod error;
mod net;
mod procfs;
mod report;
mod scenario;
mod session;
mod slots;
mod soak;
mod stats;
mod table;
mod timeline;
mod topology;
mod udp;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use crate::backend::{Backend, Behaviour};
use crate::cli::{Cli, Command, Endpoints, Output};
use crate::error::{BenchError, Result};
use crate::report::{append_json_lines, Report};
use crate::scenario::connect::ConnectParams;
use crate::scenario::idle::{max_connections, IdleParams};
use crate::scenario::rr::RrParams;
use crate::scenario::throughput::ThroughputParams;
use crate::scenario::Target;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(BenchError::Interrupted) => {
            eprintln!("sluice-bench: interrupted; children stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    timeline::install_interrupt_handler()?;
    let fd_limit = procfs::raise_fd_limit()?;
    match command {
        Command::Throughput(args) => {
            let params = ThroughputParams {
                streams: args.streams,
                direction: args.direction,
                timing: args.timing.into(),
            };
            let (backend, target) = setup(&args.endpoints, params.direction.backend())?;
            let report = scenario::throughput::run(&params, &target, backend.as_ref())?;
            emit(&report, &args.output)
        }
        Command::Rr(args) => {
            let params = RrParams {
                size: args.size,
                concurrency: args.concurrency,
                threads: args.threads,
                timing: args.timing.into(),
            };
            let (_backend, target) = setup(&args.endpoints, Behaviour::Echo)?;
            emit(&scenario::rr::run(&params, &target)?, &args.output)
        }
        Command::Connect(args) => {
            let params = ConnectParams {
                concurrency: args.concurrency,
                size: args.size,
                threads: args.threads,
                timing: args.timing.into(),
            };
            let behaviour = Behaviour::Reply { request: args.size, reply: args.size };
            let (_backend, target) = setup(&args.endpoints, behaviour)?;
            emit(&scenario::connect::run(&params, &target)?, &args.output)
        }
        Command::Idle(args) => {
            let limit = max_connections(fd_limit, args.endpoints.backend.is_none());
            if args.connections as u64 > limit {
                return Err(BenchError::Usage(format!(
                    "--connections {} exceeds what the descriptor limit {fd_limit} allows ({limit})",
                    args.connections
                )));
            }
            if args.pid.is_none() {
                eprintln!("[idle] no --pid: only connection setup is measured");
            }
            let params =
                IdleParams { connections: args.connections, settle: args.settle, pid: args.pid };
            let (backend, target) = setup(&args.endpoints, Behaviour::Hold)?;
            emit(&scenario::idle::run(&params, &target, backend.as_ref())?, &args.output)
        }
        Command::Compare(args) => compare::run(&args),
        Command::Crosscheck(args) => crosscheck::run(&args),
        Command::Udp(args) => run_udp(&args),
        Command::Capture(args) => capture::run(&args),
        Command::Soak(args) => {
            let params = soak::SoakParams {
                sluice: args.sluice_bin,
                duration: args.duration,
                warmup: args.warmup,
                sample_every: args.sample,
                reload_every: args.reload_every,
                concurrency: args.concurrency,
                driver: args.driver,
                relay: args.relay,
                out_dir: args.out_dir,
            };
            let (samples, verdict) = soak::run(&params)?;
            println!("soak: {} samples over {:?}", samples.len(), params.duration);
            println!("{}", verdict.summary());
            let out = params.out_dir.display();
            println!("figures: {out}/soak.csv, chart: {out}/soak.svg");
            if verdict.outcome() != soak::Outcome::Fail {
                Ok(())
            } else {
                Err(BenchError::Usage(format!(
                    "soak failed its criteria (RSS drift under {}%/10min, no fd held beyond warm-up, 0 panics, failure rate under {:e})",
                    soak::DRIFT_LIMIT,
                    soak::FAILURE_LIMIT
                )))
            }
        }
    }
}

/// The `udp` subcommand: direct, sluice (connected and shared) and nginx over the UDP
/// scenarios, interleaved; results in `--out-dir` (udp.md, udp.json).
fn run_udp(args: &cli::UdpArgs) -> Result<()> {
    let plan = udp::UdpPlan {
        rounds: args.rounds,
        timing: args.timing.into(),
        scenarios: args.scenarios.clone(),
        contenders: args.contenders.clone(),
        clients: args.load.clients,
        threads: args.load.threads,
        size: args.load.size,
        bulk_size: args.load.bulk_size,
        senders: args.load.senders,
        sources: args.load.sources,
        in_flight: args.load.in_flight,
        idle_flows: args.load.idle_flows,
        workers: args.workers.unwrap_or_else(procfs::cores),
        nofile: procfs::raise_fd_limit()?,
        programs: udp::proxy::UdpPrograms {
            sluice: args.sluice_bin.clone(),
            nginx: args.nginx_bin.clone(),
        },
    };
    let run = udp::run(&plan)?;
    let dir = args.out_dir.clone().unwrap_or_else(udp::default_dir);
    let text = udp::write(&plan, &run, &dir, "# sluice-bench udp")?;
    if args.output.json {
        for r in &run.runs {
            println!("{}", r.to_json_line()?);
        }
    } else {
        print!("{text}");
    }
    if let Some(path) = &args.output.out {
        append_json_lines(path, &run.runs)?;
    }
    eprintln!("[udp] wrote {}", dir.display());
    Ok(())
}

/// Starts the in-process backend (unless external) and decides where clients connect.
fn setup(endpoints: &Endpoints, behaviour: Behaviour) -> Result<(Option<Backend>, Target)> {
    if let Some(external) = endpoints.backend {
        let target = endpoints.target.map_or_else(|| Target::direct(external), Target::proxy);
        return Ok((None, target));
    }
    if endpoints.target.is_some() && endpoints.backend_listen.is_none() {
        return Err(BenchError::Usage(
            "with --target, give --backend-listen ADDR (the address the proxy forwards to) or --backend ADDR".into(),
        ));
    }
    let listen: SocketAddr = endpoints
        .backend_listen
        .unwrap_or_else(|| "127.0.0.1:0".parse().expect("constant address"));
    let backend = Backend::start(listen, behaviour)?;
    let target = match endpoints.target {
        Some(addr) => {
            eprintln!("backend listening on {}; clients connect to {addr}", backend.addr());
            Target::proxy(addr)
        }
        None => Target::direct(backend.addr()),
    };
    Ok((Some(backend), target))
}

/// Prints the report as a table or JSON and appends it to `--out`.
fn emit(report: &Report, output: &Output) -> Result<()> {
    if output.json {
        println!("{}", report.to_json_line()?);
    } else {
        print!("{}", report.render_text());
    }
    if let Some(path) = &output.out {
        append_json_lines(path, std::slice::from_ref(report))?;
    }
    Ok(())
}
