//! `sluice-bench`: load generator and peer comparison for the sluice TCP forwarder.
//!
//! Scenarios (`throughput`, `rr`, `connect`, `idle`) each start their own loopback backend
//! unless `--backend` names an external one, send load to `--target` (or straight to the
//! backend), and print a result table or JSON. `compare` runs them all against direct,
//! sluice, HAProxy and nginx. Every run is bounded in time and stops by itself; traffic
//! only ever goes to loopback addresses.

#![forbid(unsafe_code)]

mod backend;
mod capture;
mod cli;
mod compare;
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
        Command::Udp(args) => run_udp(&args),
        Command::Capture(args) => capture::run(&args),
        Command::Soak(args) => {
            let params = soak::SoakParams {
                sluice: args.sluice,
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
            if verdict.passed {
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

/// The `udp` subcommand: an echo backend, direct and through the forwarder, interleaved.
fn run_udp(args: &cli::UdpArgs) -> Result<()> {
    use scenario::udp::{self, Contender, UdpEcho, UdpParams, UdpSluice};
    let params = UdpParams {
        size: args.size,
        concurrency: args.concurrency,
        threads: args.threads,
        timing: args.timing.into(),
    };
    let listen = args.backend_listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("constant"));
    let echo = UdpEcho::start(listen)?;
    let direct = Contender { name: "direct".into(), target: Target::direct(echo.addr()) };
    let mut sluice = None;
    let forwarder = match args.target {
        Some(addr) => Contender { name: "proxy".into(), target: Target::proxy(addr) },
        None => {
            let bin = args.sluice_bin.clone().unwrap_or_else(compare::default_sluice_bin);
            let workers = args
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let s = UdpSluice::start(&bin, args.sluice_listen, echo.addr(), workers)?;
            let target = Target::proxy(s.listen);
            sluice = Some(s);
            Contender { name: "sluice".into(), target }
        }
    };
    let contenders = [direct, forwarder];
    let reports = udp::compare(&params, &contenders, args.rounds)?;
    drop(sluice);
    if args.output.json {
        for r in &reports {
            println!("{}", r.to_json_line()?);
        }
    } else {
        println!(
            "udp: size={} concurrency={} threads={} rounds={} (medians)",
            args.size, args.concurrency, args.threads, args.rounds
        );
        print!("{}", udp::summary(&reports, &contenders));
    }
    if let Some(path) = &args.output.out {
        append_json_lines(path, &reports)?;
    }
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
