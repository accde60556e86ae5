//! The sluice process under test. [`Sluice::start`] writes a config file into a fresh temp
//! dir, runs `sluice run --config FILE`, collects stderr line by line on a reader thread,
//! and returns once every service has logged its `backends=` line (printed after the
//! listeners are bound). Dropping a [`Sluice`] kills the process and removes its dir.
//!
//! Session lines are parsed into [`SessionRecord`]s; /proc gives its fd count and RSS.
//! [`Sluice::write_config`] and [`Sluice::reload`] change the file and reload it; a config
//! with an `[admin]` section is ready once the admin API is up, and [`Sluice::admin`] talks
//! to it.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::admin::{Admin, AdminAddr};
use crate::client::echo_round_trip;
use crate::ports::{free_addr, free_udp_addr};
use crate::process::{fd_count, rss_kib};
use crate::Driver;

/// How long sluice may take to print its readiness lines.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts retried with fresh ports when sluice loses a port race.
const BIND_ATTEMPTS: usize = 5;
/// The config file's name in the process's temp dir.
const CONFIG_FILE: &str = "sluice.toml";
/// Sets a resource limit and execs a command (util-linux).
pub const PRLIMIT: &str = "/usr/bin/prlimit";
/// What sluice says when the configured driver cannot run on this machine.
const UNAVAILABLE: &str = "driver uring unavailable";
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

/// One `[[service]]`.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<SocketAddr>,
    /// A `[[pool]]` name to send sessions to instead of `backends`.
    pub pool: Option<String>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub fin_timeout: Option<String>,
    /// Raw `key = value` lines added to the service.
    pub keys: Vec<String>,
    /// `protocol = "udp"` when set.
    pub udp: bool,
    pub udp_idle_timeout: Option<String>,
    pub max_sessions: Option<u64>,
}

impl Service {
    /// A service listening on a free 127.0.0.1 port, forwarding to `backends`.
    pub fn new(name: &str, backends: &[SocketAddr]) -> Self {
        Self {
            name: name.to_string(),
            listen: vec![free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))],
            backends: backends.to_vec(),
            pool: None,
            connect_timeout: None,
            idle_timeout: None,
            fin_timeout: None,
            keys: Vec::new(),
            udp: false,
            udp_idle_timeout: None,
            max_sessions: None,
        }
    }

    /// A service that sends its sessions to the `[[pool]]` called `pool`.
    pub fn with_pool(name: &str, pool: &str) -> Self {
        Self { pool: Some(pool.to_string()), ..Self::new(name, &[]) }
    }

    /// A UDP service listening on a free 127.0.0.1 port, forwarding to `backends`.
    pub fn udp(name: &str, backends: &[SocketAddr]) -> Self {
        let listen = vec![free_udp_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        Self { listen, udp: true, ..Self::new(name, backends) }
    }

    pub fn udp_idle_timeout(mut self, d: &str) -> Self {
        self.udp_idle_timeout = Some(d.to_string());
        self
    }

    /// Caps the service's sessions at `n`.
    pub fn max_sessions(mut self, n: u64) -> Self {
        self.max_sessions = Some(n);
        self
    }

    /// Adds a raw `key = value` line to the service.
    pub fn key(mut self, line: &str) -> Self {
        self.keys.push(line.to_string());
        self
    }

    /// Also listens on a free port of `ip`.
    pub fn also_listen(mut self, ip: IpAddr) -> Self {
        self.listen.push(free_addr(ip));
        self
    }

    pub fn connect_timeout(mut self, d: &str) -> Self {
        self.connect_timeout = Some(d.to_string());
        self
    }

    pub fn idle_timeout(mut self, d: &str) -> Self {
        self.idle_timeout = Some(d.to_string());
        self
    }

    pub fn fin_timeout(mut self, d: &str) -> Self {
        self.fin_timeout = Some(d.to_string());
        self
    }

    fn repick_listen(&mut self) {
        let pick = if self.udp { free_udp_addr } else { free_addr };
        for addr in &mut self.listen {
            *addr = pick(addr.ip());
        }
    }
}

/// A sluice configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    pub driver: Driver,
    pub workers: usize,
    pub pin: bool,
    pub pipe_size: Option<String>,
    pub shutdown_timeout: Option<String>,
    /// `engine.max_sessions`.
    pub max_sessions: Option<u64>,
    /// RLIMIT_NOFILE (soft and hard) of the sluice process, set through `prlimit`.
    pub fd_limit: Option<u64>,
    pub services: Vec<Service>,
    /// The `[admin]` section's `listen`, if the config has one.
    pub admin: Option<AdminAddr>,
    /// Raw TOML appended after the services, each beginning with a table header
    /// (`[records]`, `[[log]]`, ...).
    pub sections: Vec<String>,
    /// Extra `key = value` lines of the `[engine]` section.
    pub engine_keys: Vec<String>,
}

impl Config {
    /// Two workers on `driver`, no services yet.
    pub fn new(driver: Driver) -> Self {
        Self {
            driver,
            workers: 2,
            pin: true,
            pipe_size: None,
            shutdown_timeout: None,
            max_sessions: None,
            fd_limit: None,
            services: Vec::new(),
            admin: None,
            sections: Vec::new(),
            engine_keys: Vec::new(),
        }
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// Adds `key = value` (TOML) to the `[engine]` section, e.g. `("max_flows", "64")`.
    pub fn engine_key(mut self, key: &str, value: &str) -> Self {
        self.engine_keys.push(format!("{key} = {value}"));
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Caps the sessions of the whole engine at `n`.
    pub fn max_sessions(mut self, n: u64) -> Self {
        self.max_sessions = Some(n);
        self
    }

    /// Runs sluice with RLIMIT_NOFILE lowered to `n` (through `prlimit`, util-linux).
    pub fn fd_limit(mut self, n: u64) -> Self {
        self.fd_limit = Some(n);
        self
    }

    pub fn shutdown_timeout(mut self, d: &str) -> Self {
        self.shutdown_timeout = Some(d.to_string());
        self
    }

    /// An `[admin]` section listening on a free 127.0.0.1 port.
    pub fn admin_tcp(mut self) -> Self {
        self.admin = Some(AdminAddr::Tcp(free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))));
        self
    }

    /// An `[admin]` section listening on the unix socket `path`.
    pub fn admin_unix(mut self, path: &Path) -> Self {
        self.admin = Some(AdminAddr::Unix(path.to_path_buf()));
        self
    }

    /// Appends raw TOML; it must begin with a table header such as `[records]` or
    /// `[[log]]`, so that it cannot land inside the last `[[service]]`.
    pub fn section(mut self, toml: &str) -> Self {
        assert!(toml.trim_start().starts_with('['), "a section begins with a header: {toml:?}");
        self.sections.push(toml.to_string());
        self
    }

    /// The service called `name`, to change it before a reload.
    pub fn service_mut(&mut self, name: &str) -> &mut Service {
        let found = self.services.iter_mut().find(|s| s.name == name);
        found.unwrap_or_else(|| panic!("no service {name:?}"))
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        let mut t = String::from("[engine]\n");
        t += &format!(
            "workers = {}\npin = {}\ndriver = {:?}\n",
            self.workers,
            self.pin,
            self.driver.as_str()
        );
        if let Some(relay) = self.driver.relay() {
            t += &format!("relay = {relay:?}\n");
        }
        if let Some(s) = &self.pipe_size {
            t += &format!("pipe_size = {s:?}\n");
        }
        if let Some(d) = &self.shutdown_timeout {
            t += &format!("shutdown_timeout = {d:?}\n");
        }
        for line in &self.engine_keys {
            t += line;
            t += "\n";
        }
        if let Some(n) = self.max_sessions {
            t += &format!("max_sessions = {n}\n");
        }
        for s in &self.services {
            t += &format!("\n[[service]]\nname = {:?}\n", s.name);
            t += &format!("listen = {}\n", toml_list(&s.listen));
            match &s.pool {
                Some(pool) => t += &format!("pool = {pool:?}\n"),
                None => t += &format!("backends = {}\n", toml_list(&s.backends)),
            }
            if s.udp {
                t += "protocol = \"udp\"\n";
            }
            for line in &s.keys {
                t += line;
                t += "\n";
            }
            for (key, value) in [
                ("connect_timeout", &s.connect_timeout),
                ("idle_timeout", &s.idle_timeout),
                ("fin_timeout", &s.fin_timeout),
                ("udp_idle_timeout", &s.udp_idle_timeout),
            ] {
                if let Some(v) = value {
                    t += &format!("{key} = {v:?}\n");
                }
            }
            if let Some(n) = s.max_sessions {
                t += &format!("max_sessions = {n}\n");
            }
        }
        if let Some(admin) = &self.admin {
            t += &format!("\n[admin]\nlisten = \"{admin}\"\n");
        }
        for section in &self.sections {
            t += "\n";
            t += section;
            if !section.ends_with('\n') {
                t += "\n";
            }
        }
        t
    }

    fn repick_ports(&mut self) {
        self.services.iter_mut().for_each(Service::repick_listen);
        if let Some(AdminAddr::Tcp(addr)) = &mut self.admin {
            *addr = free_addr(addr.ip());
        }
    }
}

fn toml_list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
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

/// The lines sluice wrote to stderr so far, shared with the reader thread.
#[derive(Debug, Default)]
struct LogBuffer {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// stderr reached its end: the process exited.
    closed: bool,
}

impl LogBuffer {
    fn push(&self, line: String) {
        self.state.lock().expect("log lock").lines.push(line);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().expect("log lock").closed = true;
        self.changed.notify_all();
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().expect("log lock").lines.clone()
    }

    /// Calls `check` on the lines each time they change until it returns `Some`, stderr
    /// closes, or `timeout` passes.
    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("log lock");
        loop {
            if let Some(found) = check(&state.lines) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.closed {
                return None;
            }
            state = self.changed.wait_timeout(state, left).expect("log lock").0;
        }
    }
}

/// What tells one session from another in the log: the client's address and the listener
/// it reached. (A client port alone is not enough: the kernel reuses a local port for
/// connections to different listeners.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub client: SocketAddr,
    pub listener: SocketAddr,
}

impl SessionKey {
    /// The key of the session a connected client stream belongs to. Take it right after
    /// connecting: once the connection is closed the peer address is gone.
    pub fn of(stream: &TcpStream) -> SessionKey {
        SessionKey::try_of(stream).unwrap_or_else(|e| panic!("no session key: {e}"))
    }

    pub fn try_of(stream: &TcpStream) -> std::io::Result<SessionKey> {
        Ok(SessionKey { client: stream.local_addr()?, listener: stream.peer_addr()? })
    }
}

/// One `session ...` log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub service: String,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    /// `None` for `backend=-`.
    pub backend: Option<SocketAddr>,
    pub start: String,
    pub duration_ms: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub reason: String,
    pub worker: usize,
}

impl SessionRecord {
    pub fn key(&self) -> SessionKey {
        SessionKey { client: self.client, listener: self.listener }
    }

    /// Parses a log line; `None` if it is not a session line.
    pub fn parse(line: &str) -> Option<SessionRecord> {
        let (_, rest) = line.split_once(" session ")?;
        let fields: HashMap<&str, &str> =
            rest.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
        let backend = match *fields.get("backend")? {
            "-" => None,
            b => Some(b.parse().ok()?),
        };
        Some(SessionRecord {
            service: fields.get("service")?.to_string(),
            client: fields.get("client")?.parse().ok()?,
            listener: fields.get("listener")?.parse().ok()?,
            backend,
            start: fields.get("start")?.to_string(),
            duration_ms: fields.get("duration_ms")?.parse().ok()?,
            bytes_up: fields.get("bytes_up")?.parse().ok()?,
            bytes_down: fields.get("bytes_down")?.parse().ok()?,
            reason: fields.get("reason")?.to_string(),
            worker: fields.get("worker")?.parse().ok()?,
        })
    }
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
    /// Starts sluice on `config`. Returns `None`, after printing `skipped: ...`, when the
    /// io_uring driver is unavailable on this machine; panics on any other failure.
    pub fn start(config: Config) -> Option<Sluice> {
        let driver = config.driver;
        match Sluice::try_start(config) {
            Ok(sluice) => Some(sluice),
            Err(StartError::DriverUnavailable(message)) if driver != Driver::Epoll => {
                println!("skipped: {message}");
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
        let dir = scratch_dir();
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, config.to_toml()).expect("write config");
        let args =
            ["run", "--config", path.to_str().expect("utf-8 temp path"), "--log-level", "info"];
        let limit = config.fd_limit.map(|n| format!("--nofile={n}:{n}"));
        let mut sluice = match &limit {
            Some(limit) => Sluice::spawn_with(dir, Some(&[PRLIMIT, limit, "--"]), &args),
            None => Sluice::spawn_in(dir, &args),
        };
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
        Sluice::spawn_with(dir, None, args)
    }

    /// Runs the binary with `args`, through `wrapper` (a program and its arguments that
    /// exec the binary, such as `prlimit ... --`) when given.
    fn spawn_with(dir: PathBuf, wrapper: Option<&[&str]>, args: &[&str]) -> Sluice {
        let binary = binary();
        let mut command = match wrapper {
            Some([program, rest @ ..]) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&binary);
                c
            }
            _ => Command::new(&binary),
        };
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
        self.log.state.lock().expect("log lock").lines.len()
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
    pub fn admin(&self) -> Admin {
        let config = self.config.as_ref().expect("started with a config");
        Admin::new(config.admin.clone().expect("the config has an [admin] section"))
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

    /// The fd count a scenario must return to, measured after one warm-up session (1 MiB
    /// each way) through `echo_service`, a service whose backend echoes. Drivers keep
    /// bounded pools (spare pipes on io_uring); the warm-up fills them as far as one session
    /// does, so that any later rise is a leak. Run with one worker so the warm-up and the
    /// scenario share a worker.
    pub fn fd_baseline(&self, echo_service: &str) -> usize {
        let client = echo_round_trip(self.addr(echo_service), 0xba5e, 1 << 20);
        let record = self.wait_for_session(client, Duration::from_secs(5));
        assert!(record.is_some(), "the warm-up session was never logged");
        self.settled_fd_count()
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
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
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

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if std::thread::panicking() {
            let lines = self.log.lines();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
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

/// A [`scratch_dir`] removed with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new() -> Self {
        Self { path: scratch_dir() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the dir.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A new, empty directory under the system temp dir, unique across threads and processes.
/// The caller removes it (a [`Sluice`] removes its own).
pub fn scratch_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "sluice-tests-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}
