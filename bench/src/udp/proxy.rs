//! The UDP contenders and the lifecycle of their processes.
//!
//! LIFECYCLE of a UDP proxy: its config is rendered from `bench/peers/*-udp.*.tmpl` into
//! a private run directory; it is spawned in a process group of its own with output to a
//! log file; it counts as ready once a probe datagram sent to its request/response
//! address comes back (if it exits first, the error carries the tail of its log); on drop
//! the whole group gets SIGTERM, then SIGKILL after a grace period, and the leader is
//! reaped, so an error or a panic leaves no process behind.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::compare::contender::{find_program, log_tail, nginx_modules_line};
use crate::compare::template::render;
use crate::error::{file_context, io_context, BenchError, Result};

/// Built-in UDP templates.
pub const NGINX_UDP: &str = include_str!("../../peers/nginx-udp.conf.tmpl");
pub const SLUICE_UDP: &str = include_str!("../../peers/sluice-udp.toml.tmpl");

/// How long a proxy may take to forward its first datagram.
const READY_LIMIT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Flows and sessions idle this long are closed (longer than any run).
pub const IDLE_TIMEOUT: &str = "300s";
/// `max_flows` of connected sluice: both workers' flows (one fd each) within 20,000 fds.
const CONNECTED_MAX_FLOWS: usize = 8192;
/// `max_flows` of shared sluice: a million flows a worker, no fd each.
const SHARED_MAX_FLOWS: usize = 1_048_576;
/// The source prefix of shared sluice (clients of the bench use 127.128.0.0/9).
pub const SHARED_SOURCES: &str = "127.64.0.0/10";

/// Who is measured in the UDP scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UdpContender {
    /// No forwarder: clients talk to the backend.
    Direct,
    /// sluice, a connected socket a flow (the default `udp_upstream`).
    Sluice,
    /// sluice, shared upstream sockets (`udp_upstream = "shared"`).
    SluiceShared,
    /// nginx stream, `listen ... udp reuseport`.
    Nginx,
}

impl UdpContender {
    pub const ALL: [UdpContender; 4] = [
        UdpContender::Direct,
        UdpContender::Sluice,
        UdpContender::SluiceShared,
        UdpContender::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UdpContender::Direct => "direct",
            UdpContender::Sluice => "sluice",
            UdpContender::SluiceShared => "sluice-shared",
            UdpContender::Nginx => "nginx",
        }
    }
}

/// Where the contenders' programs are.
#[derive(Debug, Clone)]
pub struct UdpPrograms {
    pub sluice: PathBuf,
    pub nginx: PathBuf,
}

/// The four UDP routes, as (placeholder prefix, listen, backend).
#[derive(Debug, Clone)]
pub struct UdpRoutes {
    pub rr: SocketAddr,
    pub bulk: SocketAddr,
    pub churn: SocketAddr,
    pub idle: SocketAddr,
    pub echo: SocketAddr,
    pub sink: SocketAddr,
}

/// A contender found usable: what to run and with which template.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub kind: UdpContender,
    program: PathBuf,
    fixed: BTreeMap<String, String>,
}

/// Checks that `kind` can run here; `Err` holds the reason it is skipped.
pub fn prepare(
    kind: UdpContender,
    programs: &UdpPrograms,
) -> std::result::Result<Prepared, String> {
    let mut fixed = BTreeMap::new();
    let program = match kind {
        UdpContender::Direct => PathBuf::new(),
        UdpContender::Sluice | UdpContender::SluiceShared => {
            if !programs.sluice.is_file() {
                return Err(format!("sluice binary missing at {}", programs.sluice.display()));
            }
            let (flows, upstream) = match kind {
                UdpContender::SluiceShared => (
                    SHARED_MAX_FLOWS,
                    format!("udp_upstream = \"shared\"\nudp_source = [\"{SHARED_SOURCES}\"]"),
                ),
                _ => (CONNECTED_MAX_FLOWS, String::new()),
            };
            fixed.insert("MAX_FLOWS".into(), flows.to_string());
            fixed.insert("UPSTREAM".into(), upstream);
            programs.sluice.clone()
        }
        UdpContender::Nginx => {
            let program = find_program(&programs.nginx)
                .ok_or("nginx not installed (scripts/compare installs it with apt-get)")?;
            fixed.insert("NGINX_MODULES".into(), nginx_modules_line(&program)?);
            program
        }
    };
    Ok(Prepared { kind, program, fixed })
}

impl Prepared {
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Renders the config into `run_dir`, starts the proxy and waits until it forwards.
    pub fn start(
        &self,
        routes: &UdpRoutes,
        workers: usize,
        nofile: u64,
        run_dir: &Path,
    ) -> Result<UdpProxy> {
        fs::create_dir_all(run_dir).map_err(file_context(run_dir))?;
        let mut values = self.fixed.clone();
        values.insert("WORKERS".into(), workers.to_string());
        values.insert("NOFILE".into(), nofile.min(19_000).to_string());
        values.insert("WORKER_CONNECTIONS".into(), "20000".into());
        values.insert("RUN_DIR".into(), run_dir.display().to_string());
        values.insert("PROXY_TIMEOUT".into(), IDLE_TIMEOUT.into());
        values.insert("IDLE_TIMEOUT".into(), IDLE_TIMEOUT.into());
        for (name, listen, backend) in [
            ("UDP_RR", routes.rr, routes.echo),
            ("UDP_BULK", routes.bulk, routes.sink),
            ("UDP_CHURN", routes.churn, routes.echo),
            ("UDP_IDLE", routes.idle, routes.echo),
        ] {
            values.insert(format!("{name}_LISTEN"), listen.to_string());
            values.insert(format!("{name}_BACKEND"), backend.to_string());
        }
        let (template, extension) = match self.kind {
            UdpContender::Nginx => (NGINX_UDP, "conf"),
            _ => (SLUICE_UDP, "toml"),
        };
        let text = render(self.name(), template, &values)?;
        let config = run_dir.join(format!("{}-udp.{extension}", self.name()));
        fs::write(&config, text).map_err(file_context(&config))?;
        let log = run_dir.join(format!("{}-udp.log", self.name()));
        let output = File::create(&log).map_err(file_context(&log))?;
        let errors = output.try_clone().map_err(file_context(&log))?;
        let mut command = Command::new(&self.program);
        match self.kind {
            UdpContender::Nginx => command
                .arg("-p")
                .arg(run_dir)
                .arg("-e")
                .arg(run_dir.join("nginx-startup.log"))
                .arg("-c")
                .arg(&config),
            _ => command
                .env("RUNTIME_DIRECTORY", run_dir)
                .args(["run", "--log-level", "warn", "--config"])
                .arg(&config),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .process_group(0)
            .spawn()
            .map_err(|e| BenchError::ProxyStart {
                contender: self.name().into(),
                detail: format!("cannot run {}: {e}", self.program.display()),
            })?;
        let mut proxy = UdpProxy { name: self.name(), child, log, stopped: false };
        proxy.wait_ready(routes.rr)?;
        Ok(proxy)
    }
}

/// A started UDP proxy; dropping it stops its whole process group.
pub struct UdpProxy {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl UdpProxy {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self, echo_route: SocketAddr) -> Result<()> {
        let probe = UdpSocket::bind("127.0.0.1:0").map_err(io_context("udp probe"))?;
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(io_context("udp probe"))?;
        let began = Instant::now();
        let mut buf = [0u8; 64];
        while began.elapsed() < READY_LIMIT {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.stopped = true;
                return Err(self.error(format!("exited with {status}")));
            }
            let _ = probe.send_to(b"sluice-bench udp probe", echo_route);
            if matches!(probe.recv_from(&mut buf), Ok((22, _))) {
                return Ok(());
            }
        }
        Err(self
            .error(format!("no datagram came back through {echo_route} within {READY_LIMIT:?}")))
    }

    fn error(&self, what: String) -> BenchError {
        BenchError::ProxyStart {
            contender: self.name.into(),
            detail: format!(
                "{what}; last lines of {}:\n{}",
                self.log.display(),
                log_tail(&self.log, 12)
            ),
        }
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let began = Instant::now();
        while began.elapsed() < STOP_GRACE {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
