//! `sluice-bench capture`: what capture costs, measured. Two sluice processes in front of
//! one in-process bulk backend: "baseline" has no capture configured at all; the other has
//! an "uncaptured" service and a "captured" one (`capture = { ... }`). Throughput through
//! each is measured interleaved round by round, so machine drift cancels, and reported as
//! medians with ratios to the baseline, along with what capture wrote.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::backend::Backend;
use crate::cli::CaptureArgs;
use crate::error::{file_context, io_context, BenchError, Result};
use crate::scenario::throughput::{self, ThroughputParams};
use crate::scenario::Target;
use crate::stats::{median, ratio};
use crate::timeline;

/// Longest sluice may take to listen.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// Pause after a captured run, so the capture thread's backlog does not weigh on the next.
const SETTLE: Duration = Duration::from_secs(1);

/// The three measured routes, in the order of the first round.
const ROUTES: [&str; 3] = ["baseline", "uncaptured", "captured"];

/// A sluice process started for the run; stopped (SIGTERM, then reaped) on drop.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let began = Instant::now();
        while began.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_context("picking a free port"))?;
    l.local_addr().map_err(io_context("picking a free port"))
}

fn engine_section(args: &CaptureArgs) -> String {
    let mut t = format!("[engine]\nworkers = {}\ndriver = {:?}\n", args.workers, args.driver);
    if args.driver == "uring" {
        t += &format!("relay = {:?}\n", args.relay);
    }
    t
}

fn service(name: &str, listen: SocketAddr, backend: SocketAddr, extra: &str) -> String {
    format!(
        "\n[[service]]\nname = {name:?}\nlisten = [\"{listen}\"]\nbackends = [\"{backend}\"]\n{extra}"
    )
}

fn start_sluice(args: &CaptureArgs, dir: &Path, name: &str, config: &str) -> Result<Process> {
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, config).map_err(file_context(&path))?;
    let log = dir.join(format!("{name}.log"));
    let log_file = fs::File::create(&log).map_err(file_context(&log))?;
    let child = Command::new(&args.sluice_bin)
        .env("RUNTIME_DIRECTORY", dir)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .arg("--log-level")
        .arg("warn")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(io_context(format!("starting {}", args.sluice_bin.display())))?;
    Ok(Process { child })
}

fn wait_ready(addrs: &[SocketAddr]) -> Result<()> {
    let began = Instant::now();
    while !addrs.iter().all(|a| TcpStream::connect(a).is_ok()) {
        if began.elapsed() > READY_LIMIT {
            return Err(BenchError::ProxyStart {
                contender: "sluice".into(),
                detail: format!("not listening on {addrs:?} after {READY_LIMIT:?}"),
            });
        }
        timeline::pause(Duration::from_millis(20))?;
    }
    Ok(())
}

/// Bytes and files in the capture directory.
fn captured(dir: &Path) -> (u64, usize) {
    let Ok(entries) = fs::read_dir(dir) else { return (0, 0) };
    let sizes: Vec<u64> =
        entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).collect();
    (sizes.iter().sum(), sizes.len())
}

pub fn run(args: &CaptureArgs) -> Result<()> {
    let params = ThroughputParams {
        streams: args.streams,
        direction: args.direction,
        timing: args.timing.into(),
    };
    let run_dir = std::env::temp_dir().join(format!("sluice-bench-capture-{}", std::process::id()));
    let capture_dir = run_dir.join("pcap");
    fs::create_dir_all(&run_dir).map_err(file_context(&run_dir))?;
    let backend =
        Backend::start("127.0.0.1:0".parse().expect("address"), params.direction.backend())?;
    let [base, plain, taped] = [free_addr()?, free_addr()?, free_addr()?];
    let capture = format!(
        "capture = {{ dir = {:?}, max_total = {:?} }}\n",
        capture_dir.display().to_string(),
        args.max_total
    );
    let engine = engine_section(args);
    let baseline_config = engine.clone() + &service("baseline", base, backend.addr(), "");
    let captured_config = engine
        + &service("uncaptured", plain, backend.addr(), "")
        + &service("captured", taped, backend.addr(), &capture);
    let _baseline = start_sluice(args, &run_dir, "baseline", &baseline_config)?;
    let _capturing = start_sluice(args, &run_dir, "capturing", &captured_config)?;
    wait_ready(&[base, plain, taped])?;
    let targets = [base, plain, taped];
    let mut figures: [Vec<f64>; 3] = Default::default();
    for round in 0..args.rounds {
        for k in 0..ROUTES.len() {
            let i = (k + round) % ROUTES.len();
            let report = throughput::run(&params, &Target::proxy(targets[i]), Some(&backend))?;
            let gbit = report.figures.get("gbit_s_total").copied().unwrap_or(0.0);
            eprintln!("[capture] round {} {:<10} {gbit:.2} Gbit/s", round + 1, ROUTES[i]);
            figures[i].push(gbit);
            if ROUTES[i] == "captured" {
                timeline::pause(SETTLE)?;
            }
        }
    }
    drop(_capturing);
    let (bytes, files) = captured(&capture_dir);
    print_results(args, &figures, bytes, files);
    if !args.keep {
        let _ = fs::remove_dir_all(&run_dir);
    } else {
        println!("capture files kept in {}", capture_dir.display());
    }
    Ok(())
}

fn print_results(args: &CaptureArgs, figures: &[Vec<f64>; 3], bytes: u64, files: usize) {
    let medians: Vec<f64> = figures.iter().map(|f| median(f).unwrap_or(0.0)).collect();
    let relay = if args.driver == "uring" { args.relay.as_str() } else { "copy" };
    println!(
        "capture cost: driver={} relay={relay} streams={} direction={:?} rounds={} duration={:?}",
        args.driver, args.streams, args.direction, args.rounds, args.timing.duration
    );
    println!("{:<12} {:>14} {:>12}  rounds", "route", "median Gbit/s", "vs baseline");
    for (i, name) in ROUTES.iter().enumerate() {
        let r = ratio(medians[i], medians[0]).map_or("-".into(), |r| format!("{r:.3}x"));
        let each: Vec<String> = figures[i].iter().map(|g| format!("{g:.2}")).collect();
        println!("{name:<12} {:>14.2} {r:>12}  {}", medians[i], each.join(" "));
    }
    println!("capture wrote {bytes} bytes in {files} files (max_total {})", args.max_total);
    if args.json {
        let json = serde_json::json!({
            "scenario": "capture",
            "driver": args.driver,
            "relay": relay,
            "streams": args.streams,
            "median_gbit_s": { "baseline": medians[0], "uncaptured": medians[1], "captured": medians[2] },
            "rounds_gbit_s": { "baseline": figures[0], "uncaptured": figures[1], "captured": figures[2] },
            "capture_bytes": bytes,
            "capture_files": files,
        });
        println!("{json}");
    }
}
