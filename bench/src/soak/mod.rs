//! `soak`: a bounded run of mixed traffic through a sluice this command starts (RELIABILITY.md
//! scenario 18). Bulk, request/response, churn, half-closes and resets go through it
//! against an in-process echo backend while its configuration is reloaded (SIGHUP) every few
//! seconds; its RSS, fd count and live sessions are sampled to a CSV and drawn to an SVG.
//!
//! Pass criteria, judged after the warm-up ([`judge`], pure): RSS flat (drift under 1% per
//! 10 minutes), fds flat (with the load held until no session is open, the count after the
//! run is no higher than at the end of warm-up), no panic in sluice's log, failed-connection
//! rate under 1e-6. The sampled fd figure (the process's fds less two per live session) is
//! charted and reported, not judged: the load moves it by several fds either way.

mod load;
mod verdict;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::backend::{Backend, Behaviour};
use crate::error::{io_context, BenchError, Result};
use crate::procfs;
use crate::timeline::{self, RunControl};

pub use self::load::{Gate, Tally};
pub use self::verdict::{judge, Outcome, QuietFds, Sample, Verdict, DRIFT_LIMIT, FAILURE_LIMIT};

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct SoakParams {
    pub sluice: PathBuf,
    pub duration: Duration,
    pub warmup: Duration,
    pub sample_every: Duration,
    pub reload_every: Duration,
    /// Client threads per traffic kind.
    pub concurrency: usize,
    pub driver: String,
    pub relay: String,
    pub out_dir: PathBuf,
}

/// A running sluice, stopped (SIGTERM, then SIGKILL) on drop.
struct Proxy {
    child: Child,
    config: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_context("bind 127.0.0.1:0"))?;
    l.local_addr().map_err(io_context("local_addr"))
}

fn config_text(
    p: &SoakParams,
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    generation: u64,
) -> String {
    // Reloads alternate the idle timeout: a real table swap, no change to live traffic.
    let idle = if generation % 2 == 0 { "10m" } else { "11m" };
    format!(
        "[engine]\nworkers = 2\ndriver = {:?}\nrelay = {:?}\n\n[[service]]\nname = \"soak\"\nlisten = [\"{listen}\"]\nbackends = [\"{backend}\"]\nidle_timeout = {idle:?}\n\n[admin]\nlisten = \"{admin}\"\n",
        p.driver, p.relay
    )
}

fn start_proxy(p: &SoakParams, backend: SocketAddr) -> Result<Proxy> {
    if !p.sluice.is_file() {
        return Err(BenchError::Usage(format!(
            "sluice binary missing at {} (build it with `cargo build --release -p sluice`)",
            p.sluice.display()
        )));
    }
    let (listen, admin) = (free_addr()?, free_addr()?);
    let config = p.out_dir.join("soak.toml");
    let file_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::File { path, source }
    };
    fs::write(&config, config_text(p, listen, admin, backend, 0)).map_err(file_error(&config))?;
    let log_path = p.out_dir.join("sluice.log");
    let log = File::create(&log_path).map_err(file_error(&log_path))?;
    let child = Command::new(&p.sluice)
        .env("RUNTIME_DIRECTORY", &p.out_dir)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| BenchError::ProxyStart {
            contender: "sluice".into(),
            detail: e.to_string(),
        })?;
    let proxy = Proxy { child, config, listen, admin };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin).is_err() || TcpStream::connect(listen).is_err() {
        if Instant::now() >= deadline {
            let detail = format!(
                "not listening on {listen} and {admin} after 10 s; see {}",
                log_path.display()
            );
            return Err(BenchError::ProxyStart { contender: "sluice".into(), detail });
        }
        timeline::pause(Duration::from_millis(50))?;
    }
    Ok(proxy)
}

/// What the admin API's Prometheus text says: live sessions, reloads applied and spare
/// pipes (the splice relay's pool).
#[derive(Debug, Clone, Copy)]
struct AdminFigures {
    sessions: u64,
    reloads: u64,
    spare_pipes: u64,
}

fn admin_figures(admin: SocketAddr) -> Option<AdminFigures> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let sum = |prefix: &str| {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Some(AdminFigures {
        sessions: sum("sluice_worker_sessions_active{"),
        reloads: sum("sluice_reloads_total "),
        spare_pipes: sum("sluice_worker_spare_pipes{"),
    })
}

/// Runs the soak; returns the samples and the verdict, after writing soak.csv and soak.svg.
pub fn run(p: &SoakParams) -> Result<(Vec<Sample>, Verdict)> {
    fs::create_dir_all(&p.out_dir)
        .map_err(|source| BenchError::File { path: p.out_dir.clone(), source })?;
    let backend = Backend::start("127.0.0.1:0".parse().expect("constant"), Behaviour::Echo)?;
    let proxy = start_proxy(p, backend.addr())?;
    let pid = proxy.child.id();
    let control = RunControl::new();
    let tally = Arc::new(Tally::default());
    let gate = Arc::new(Gate::default());
    let threads = load::start(proxy.listen, p.concurrency, &control, &gate, &tally)?;
    let began = Instant::now();
    let mut quiet = QuietFds::default();
    let mut warmed = false;
    let mut samples = Vec::new();
    let (mut next_sample, mut next_reload, mut generation) = (began, began + p.reload_every, 0u64);
    let mut csv = verdict::CsvWriter::create(&p.out_dir.join("soak.csv"))?;
    while began.elapsed() < p.duration {
        let now = Instant::now();
        if now >= next_reload {
            generation += 1;
            let text = config_text(p, proxy.listen, proxy.admin, backend.addr(), generation);
            fs::write(&proxy.config, text)
                .map_err(|source| BenchError::File { path: proxy.config.clone(), source })?;
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
            next_reload += p.reload_every;
        }
        if !warmed && began.elapsed() >= p.warmup && began.elapsed() + QUIET_WAIT < p.duration {
            warmed = true;
            gate.hold();
            quiet.before = quiet_fds(pid, proxy.admin)?;
            gate.release();
            eprintln!("[soak] fds with no session open after warm-up: {:?}", quiet.before);
        }
        if now >= next_sample {
            let sample = take_sample(pid, proxy.admin, began, &tally)?;
            csv.write(&sample)?;
            eprintln!("[soak] {}", sample.line());
            samples.push(sample);
            next_sample += p.sample_every;
        }
        timeline::pause(Duration::from_millis(100))?;
    }
    control.stop();
    for t in threads {
        let _ = t.join();
    }
    if quiet.before.is_some() {
        quiet.after = quiet_fds(pid, proxy.admin)?;
        eprintln!("[soak] fds with no session open after the run: {:?}", quiet.after);
    }
    let log = fs::read_to_string(p.out_dir.join("sluice.log")).unwrap_or_default();
    let panics = log.lines().filter(|l| l.contains("panicked")).count() as u64;
    drop(proxy);
    let verdict = judge(&samples, p.warmup, quiet, panics);
    let applied = samples.last().map_or(0, |s| s.reloads);
    eprintln!("[soak] reloads sent {generation}, applied {applied} (at the last sample)");
    verdict::chart(&p.out_dir.join("soak.svg"), &samples, p.warmup)?;
    Ok((samples, verdict))
}

/// How long the load may take to drain before sluice's quiet fd count is taken.
const QUIET_WAIT: Duration = Duration::from_secs(15);
/// Readings of a quiet fd count, the least of which counts: a reload's brief file reads,
/// or a session whose last operation is still completing, would add one or two.
const QUIET_READINGS: usize = 5;

/// sluice's fd count once no session is open (the load must be held or stopped), less the
/// spare pipes its splice relay keeps (a bounded pool, not a leak): the least of a few
/// readings; `None` if sessions are still open after [`QUIET_WAIT`].
fn quiet_fds(pid: u32, admin: SocketAddr) -> Result<Option<u64>> {
    let deadline = Instant::now() + QUIET_WAIT;
    while admin_figures(admin).is_none_or(|f| f.sessions > 0) {
        if Instant::now() >= deadline {
            return Ok(None);
        }
        timeline::pause(Duration::from_millis(50))?;
    }
    let mut least = u64::MAX;
    for _ in 0..QUIET_READINGS {
        timeline::pause(Duration::from_millis(100))?;
        let fds = procfs::footprint(pid)?.fds;
        let Some(f) = admin_figures(admin) else { continue };
        least = least.min(fds.saturating_sub(2 * f.spare_pipes));
    }
    Ok((least != u64::MAX).then_some(least))
}

fn take_sample(pid: u32, admin: SocketAddr, began: Instant, tally: &Tally) -> Result<Sample> {
    let fp = procfs::footprint(pid)?;
    let (sessions, reloads) = admin_figures(admin).map_or((0, 0), |f| (f.sessions, f.reloads));
    Ok(Sample {
        seconds: began.elapsed().as_secs_f64(),
        rss_kib: fp.rss_kib,
        fds: fp.fds,
        sessions,
        connections: tally.ok.load(Ordering::Relaxed),
        failures: tally.failed.load(Ordering::Relaxed),
        reloads,
    })
}
