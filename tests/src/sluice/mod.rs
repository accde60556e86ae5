//! The sluice process under test. [`Sluice::start`] writes a config file into a fresh temp
//! dir, runs `sluice run --config FILE`, collects stderr line by line on a reader thread,
//! and returns once every service has logged its `backends=` line (printed after the
//! listeners are bound). Dropping a [`Sluice`] kills the process and removes its dir.
//!
//! Session lines are parsed into [`SessionRecord`]s; /proc gives its fd count and RSS.
//! [`Sluice::write_config`] and [`Sluice::reload`] change the file and reload it; a config
//! with an `[admin]` section is ready once the admin API is up, and [`Sluice::admin`] talks
//! to it.
//!
//! Rooms: this module (the process), `config` (what it runs with), `log` (what it prints),
//! `scratch` (temporary directories).

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::admin::{Admin, AdminAddr};
use crate::client::echo_round_trip;
use crate::process::{fd_count, fds_and_pipes, rss_kib};
use crate::Driver;

mod config;
mod log;
mod scratch;

pub use self::config::{Config, Service};
pub use self::log::{SessionKey, SessionRecord};
pub use self::scratch::{scratch_dir, ScratchDir};

use self::log::LogBuffer;

/// How long sluice may take to print its readiness lines.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts retried with fresh ports when sluice loses a port race.
const BIND_ATTEMPTS: usize = 5;
/// The config file's name in the process's temp dir.
const CONFIG_FILE: &str = "sluice.toml";
/// Sets a resource limit and execs a command (util-linux).
pub const PRLIMIT: &str = "/usr/bin/prlimit";
/// Network configuration (iproute2); `ip netns exec` runs a program in a namespace.
pub const IP: &str = "/usr/sbin/ip";
/// Runs a program with other privileges (util-linux).
pub const SETPRIV: &str = "/usr/bin/setpriv";
/// What sluice says when the configured driver cannot run on this machine.
const UNAVAILABLE: &str = "driver uring unavailable";
/// How long an exited sluice's stderr may take to close (its last lines to be read).
const STDERR_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Log lines printed when a test panics while sluice runs.
const LOG_TAIL: usize = 60;
/// What sluice logs once its admin API listens.
const ADMIN_READY: &str = "admin API on ";
/// What sluice logs when a reload is applied, before the version number.
const RELOAD_APPLIED: &str = "reload: tables version ";
/// What sluice logs before each error of a rejected reload.
const RELOAD_REJECTED: &str = "reload rejected: ";
/// The last line of a rejected reload.
const RELOAD_KEPT: &str = "reload rejected: the running configuration stays in force";

/// The `sluice` binary: `$SLUICE_BIN`, else `target/<profile>/sluice` next to the test's
/// own `target/<profile>/deps/` directory.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SLUICE_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "SLUICE_BIN={} is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| exe.parent().expect("test exe has a parent dir"));
    let path = profile.join("sluice");
    assert!(
        path.is_file(),
        "sluice binary not found at {}: run `cargo build --workspace --bins` first \
         (or set SLUICE_BIN)",
        path.display()
    );
    path
}

/// What became of a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The file was valid: these tables are in force.
    Applied(u64),
    /// The file was rejected: one `FILE:LINE:COL: key: message` line per error.
    Rejected(Vec<String>),
}

/// Why sluice did not come up.
#[derive(Debug)]
pub enum StartError {
    /// Sluice says this driver cannot run here (the message is its error line).
    DriverUnavailable(String),
    /// Sluice exited before it was ready.
    Exited { status: ExitStatus, logs: Vec<String> },
    /// Sluice was still not ready after the readiness timeout.
    NotReady { logs: Vec<String> },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::DriverUnavailable(m) => write!(f, "{m}"),
            StartError::Exited { status, logs } => {
                write!(f, "exited with {status}:\n{}", logs.join("\n"))
            }
            StartError::NotReady { logs } => {
                write!(f, "not ready after {READY_TIMEOUT:?}:\n{}", logs.join("\n"))
            }
        }
    }
}

/// How a process is started besides its arguments.
#[derive(Debug, Default)]
struct Launch {
    binary: Option<PathBuf>,
    env: Vec<(String, String)>,
}

/// A running `sluice run`; killed when dropped.
#[derive(Debug)]
pub struct Sluice {
    child: Child,
    pid: u32,
    dir: PathBuf,
    config: Option<Config>,
    log: Arc<LogBuffer>,
    reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Sluice {
    /// Starts sluice on `config`. Returns `None`, after recording the skip ([`crate::uring_unavailable`]), when
    /// the io_uring driver is unavailable on this machine; panics on any other failure.
    pub fn start(config: Config) -> Option<Sluice> {
        let driver = config.driver;
        match Sluice::try_start(config) {
            Ok(sluice) => Some(sluice),
            Err(StartError::DriverUnavailable(message)) if driver != Driver::Epoll => {
                crate::uring_unavailable(&message);
                None
            }
            Err(e) => panic!("sluice did not start: {e}"),
        }
    }

    /// Starts sluice on `config`, picking fresh listen ports if another process took one.
    pub fn try_start(mut config: Config) -> Result<Sluice, StartError> {
        for _ in 1..BIND_ATTEMPTS {
            match Sluice::launch(&config) {
                Err(StartError::Exited { logs, .. })
                    if logs.iter().any(|l| l.contains("cannot listen on")) =>
                {
                    config.repick_ports();
                }
                other => return other,
            }
        }
        Sluice::launch(&config)
    }

    fn launch(config: &Config) -> Result<Sluice, StartError> {
        Sluice::launch_in(scratch_dir(), config)
    }

    /// Starts sluice on `config` with its files in `dir` (a [`scratch_dir`], removed with
    /// the process), so that a test can place files there first.
    pub fn start_in(dir: PathBuf, config: Config) -> Option<Sluice> {
        match Sluice::launch_in(dir, &config) {
            Ok(sluice) => Some(sluice),
            Err(StartError::DriverUnavailable(message)) if config.driver != Driver::Epoll => {
                crate::uring_unavailable(&message);
                None
            }
            Err(e) => panic!("sluice did not start: {e}"),
        }
    }

    fn launch_in(dir: PathBuf, config: &Config) -> Result<Sluice, StartError> {
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, config.to_toml()).expect("write config");
        let args =
            ["run", "--config", path.to_str().expect("utf-8 temp path"), "--log-level", "info"];
        let limit =
            config.fd_limit.map(|n| format!("--nofile={}:{n}", config.fd_soft_limit.unwrap_or(n)));
        let drop_cap = [SETPRIV, "--inh-caps=-sys_resource", "--bounding-set=-sys_resource", "--"];
        let launch = Launch { binary: config.binary.clone(), env: config.env.clone() };
        let netns = config.netns.as_deref().map(|n| [IP, "netns", "exec", n]);
        let wrapper: Option<&[&str]> = match (&limit, &netns) {
            (_, Some(netns)) => Some(netns),
            (Some(limit), None) => Some(&[PRLIMIT, limit, "--"]),
            (None, None) if config.without_sys_resource => Some(&drop_cap),
            (None, None) => None,
        };
        let mut sluice = Sluice::spawn_with(dir, wrapper, &args, &launch);
        sluice.config = Some(config.clone());
        let services = config.services.len();
        let admin = config.admin.is_some();
        let ready = sluice.log.wait_until(READY_TIMEOUT, |lines| {
            let n = lines.iter().filter(|l| l.contains(" backends=")).count();
            let admin_up = !admin || lines.iter().any(|l| l.contains(ADMIN_READY));
            (n >= services && admin_up).then_some(())
        });
        if ready.is_some() {
            return Ok(sluice);
        }
        let logs = sluice.logs();
        let unavailable =
            logs.iter().find_map(|l| l.find(UNAVAILABLE).map(|at| l[at..].to_string()));
        if let Some(message) = unavailable {
            return Err(StartError::DriverUnavailable(message));
        }
        match sluice.wait_exit(Duration::from_secs(2)) {
            Some(status) => Err(StartError::Exited { status, logs: sluice.logs() }),
            None => Err(StartError::NotReady { logs }),
        }
    }

    /// Runs the binary with `args` (any subcommand) and collects its stderr; no readiness
    /// wait. For `sluice run` without a config file and similar.
    pub fn spawn(args: &[&str]) -> Sluice {
        Sluice::spawn_in(scratch_dir(), args)
    }

    fn spawn_in(dir: PathBuf, args: &[&str]) -> Sluice {
        Sluice::spawn_with(dir, None, args, &Launch::default())
    }

    /// Runs the binary with `args`, through `wrapper` (a program and its arguments that
    /// exec the binary, such as `prlimit ... --`) when given.
    fn spawn_with(
        dir: PathBuf,
        wrapper: Option<&[&str]>,
        args: &[&str],
        launch: &Launch,
    ) -> Sluice {
        let binary = launch.binary.clone().unwrap_or_else(binary);
        let mut command = match wrapper {
            Some([program, rest @ ..]) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&binary);
                c
            }
            _ => Command::new(&binary),
        };
        command.env("RUNTIME_DIRECTORY", &dir);
        for (key, value) in &launch.env {
            command.env(key, value);
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let log = Arc::new(LogBuffer::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let reader = {
            let log = log.clone();
            let echo = std::env::var_os("SLUICE_TEST_ECHO").is_some();
            std::thread::Builder::new()
                .name("sluice-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if echo {
                            eprintln!("[sluice] {line}");
                        }
                        log.push(line);
                    }
                    log.close();
                })
                .expect("spawn stderr reader")
        };
        let pid = child.id();
        Sluice { child, pid, dir, config: None, log, reader: Some(reader), status: None }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The configuration it runs (`None` for [`Sluice::spawn`]).
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// The first listen address of the service called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listen(name)[0]
    }

    /// Every listen address of the service called `name`.
    pub fn listen(&self, name: &str) -> &[SocketAddr] {
        let config = self.config.as_ref().expect("started with a config");
        let service = config.services.iter().find(|s| s.name == name);
        &service.unwrap_or_else(|| panic!("no service {name:?}")).listen
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The number of stderr lines so far: a mark for [`Sluice::wait_for_log_after`].
    pub fn log_mark(&self) -> usize {
        self.log.count()
    }

    /// The first line after line `mark` containing `needle`, waiting up to `timeout`.
    pub fn wait_for_log_after(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Option<String> {
        self.log.wait_until(timeout, |lines| {
            lines.get(mark..)?.iter().find(|l| l.contains(needle)).cloned()
        })
    }

    /// The process's temp dir (its `RUNTIME_DIRECTORY`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `sluice ARGS` (another command, such as `upgrade`) with this process's
    /// environment, and returns its output.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(binary());
        command.args(args).env("RUNTIME_DIRECTORY", &self.dir);
        if let Some(config) = &self.config {
            for (key, value) in &config.env {
                command.env(key, value);
            }
        }
        command.output().expect("run sluice")
    }

    /// `sluice upgrade --config FILE`: the new process's pid, or the error it printed.
    pub fn upgrade(&self) -> Result<u32, String> {
        let path = self.config_path();
        let out = self.command(&["upgrade", "--config", path.to_str().expect("utf-8 path")]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("{}{stderr}", out.status));
        }
        let pid = stdout.trim().rsplit(' ').next().and_then(|p| p.parse().ok());
        pid.ok_or_else(|| format!("no pid in {stdout:?}"))
    }

    /// The pid written in its pid file (the one `RUNTIME_DIRECTORY` names).
    pub fn pid_file_pid(&self) -> Option<u32> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        let pid_file = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "pid"))?;
        std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
    }

    /// The file sluice was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// Replaces the config file with `config` (sluice reads it at the next reload). The
    /// addresses [`Sluice::addr`] reports stay those of the config sluice started with.
    pub fn write_config(&self, config: &Config) {
        self.write_config_text(&config.to_toml());
    }

    /// Replaces the config file with `text`, valid or not.
    pub fn write_config_text(&self, text: &str) {
        let path = self.config_path();
        let next = self.dir.join("sluice.toml.next");
        std::fs::write(&next, text).expect("write config");
        // A rename, so that a reload never reads a half-written file.
        std::fs::rename(&next, &path).expect("replace config");
    }

    /// Sends SIGHUP and waits up to `timeout` for sluice to apply or reject the file.
    pub fn reload(&self, timeout: Duration) -> Reload {
        let mark = self.log_mark();
        self.signal(Signal::SIGHUP);
        self.wait_for_reload(mark, timeout)
    }

    /// Waits up to `timeout` for the outcome of a reload begun after log line `mark`;
    /// panics if none comes.
    pub fn wait_for_reload(&self, mark: usize, timeout: Duration) -> Reload {
        let outcome = self.log.wait_until(timeout, |lines| {
            let new = lines.get(mark..)?;
            for (i, line) in new.iter().enumerate() {
                if let Some(at) = line.find(RELOAD_APPLIED) {
                    let rest = &line[at + RELOAD_APPLIED.len()..];
                    let version = rest.split_whitespace().next()?.parse().ok()?;
                    return Some(Reload::Applied(version));
                }
                if line.contains(RELOAD_KEPT) {
                    let errors = new[..i]
                        .iter()
                        .filter_map(|l| l.find(RELOAD_REJECTED).map(|at| &l[at..]))
                        .map(|l| l[RELOAD_REJECTED.len()..].to_string())
                        .collect();
                    return Some(Reload::Rejected(errors));
                }
            }
            None
        });
        outcome.unwrap_or_else(|| panic!("no reload outcome logged within {timeout:?}"))
    }

    /// A client of the admin API; panics if the config has no `[admin]` section.
    /// A client of the admin API (through loopback when it listens on every address).
    pub fn admin(&self) -> Admin {
        let config = self.config.as_ref().expect("started with a config");
        let addr = match config.admin.clone().expect("the config has an [admin] section") {
            AdminAddr::Tcp(a) if a.ip().is_unspecified() => {
                AdminAddr::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port()))
            }
            other => other,
        };
        Admin::new(addr)
    }

    /// The first line containing `needle`, waiting up to `timeout` for it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.log.wait_until(timeout, |lines| lines.iter().find(|l| l.contains(needle)).cloned())
    }

    /// Every session record logged so far.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        self.logs().iter().filter_map(|l| SessionRecord::parse(l)).collect()
    }

    /// The record of the session `key`, waiting up to `timeout` for it.
    pub fn wait_for_session(&self, key: SessionKey, timeout: Duration) -> Option<SessionRecord> {
        self.log.wait_until(timeout, |lines| {
            lines.iter().filter_map(|l| SessionRecord::parse(l)).find(|r| r.key() == key)
        })
    }

    /// Waits until at least `n` session records exist or `timeout` passes; returns them all.
    pub fn wait_for_sessions(&self, n: usize, timeout: Duration) -> Vec<SessionRecord> {
        let _ = self.log.wait_until(timeout, |lines| {
            (lines.iter().filter(|l| l.contains(" session ")).count() >= n).then_some(())
        });
        self.sessions()
    }

    /// Open fds of the process now.
    pub fn fd_count(&self) -> usize {
        fd_count(self.pid)
    }

    /// The fd count once it has stopped changing (workers open their fds after the
    /// readiness lines): equal over three samples 50 ms apart, or the last sample after 2 s.
    pub fn settled_fd_count(&self) -> usize {
        let mut last = self.fd_count();
        let mut same = 0;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.fd_count();
            same = if now == last { same + 1 } else { 0 };
            last = now;
            if same >= 2 {
                break;
            }
        }
        last
    }

    /// The count of fds other than pipes that a scenario must return to (see
    /// [`Sluice::wait_for_session_fds`]), measured after one warm-up session (1 MiB each way)
    /// through `echo_service`, a service whose backend echoes, so that the workers' lazily
    /// made fds exist. Pipes are left out: a direction that splices (the splice relay, or
    /// `auto` once a direction carries a bulk stream, which depends on how the bytes
    /// arrive) takes one from its worker's pool and gives it back there, up to 64 spare a
    /// worker, so the pool's size after a session says nothing about a leak.
    pub fn fd_baseline(&self, echo_service: &str) -> usize {
        let client = echo_round_trip(self.addr(echo_service), 0xba5e, 1 << 20);
        let record = self.wait_for_session(client, Duration::from_secs(5));
        assert!(record.is_some(), "the warm-up session was never logged");
        self.settled_fd_count();
        fds_and_pipes(self.pid).0
    }

    /// Waits until the fds other than pipes are at most `limit` (from
    /// [`Sluice::fd_baseline`]); returns the last count seen. Asserts that the pipes are no
    /// more than the workers' pools may keep (64 spare pipes, 128 fds, a worker).
    pub fn wait_for_session_fds(&self, limit: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let (fds, pipes) = fds_and_pipes(self.pid);
            if fds <= limit || Instant::now() >= deadline {
                let workers = self.config.as_ref().map_or(1, |c| c.workers);
                assert!(pipes <= 128 * workers, "{pipes} pipe fds: more than the pools keep");
                return fds;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the fd count is at most `limit`; returns the last count seen.
    pub fn wait_for_fd_count(&self, limit: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.fd_count();
            if n <= limit || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident memory of the process now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.pid).expect("pid fits in pid_t");
        kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
    }

    /// Waits up to `timeout` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                self.join_reader();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit; panics if it does not come.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if self.status.is_none() {
            self.signal(Signal::SIGTERM);
        }
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "sluice did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.logs().join("\n")
            ),
        }
    }
}

impl Sluice {
    /// Joins the stderr reader once stderr has closed. A successor started by a binary
    /// upgrade writes to the same stderr and may outlive this process: then the reader is
    /// left to end with it.
    fn join_reader(&mut self) {
        let closed = self.log.wait_until(STDERR_CLOSE_WAIT, |_| None::<()>).is_none()
            && self.log.is_closed();
        if let Some(reader) = self.reader.take().filter(|_| closed) {
            let _ = reader.join();
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_reader();
        if std::thread::panicking() {
            let lines = self.log.lines();
            let from = lines.len().saturating_sub(LOG_TAIL);
            // Warnings and errors before the tail too: the tail of a loaded run is often
            // session records only.
            let earlier: Vec<&String> = lines[..from]
                .iter()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .take(LOG_TAIL)
                .collect();
            if !earlier.is_empty() {
                eprintln!(
                    "--- sluice warnings and errors before the tail (pid {}) ---\n{}",
                    self.pid,
                    earlier.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
                );
            }
            let tail = &lines[from..];
            eprintln!(
                "--- last {} sluice log lines (pid {}) ---\n{}",
                tail.len(),
                self.pid,
                tail.join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
