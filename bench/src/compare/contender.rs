//! The contenders of a comparison, and the lifecycle of a proxy process.
//!
//! LIFECYCLE of a proxy: its config is rendered into a private run directory; it is
//! spawned in a process group of its own with output to a log file (in the proxy network
//! namespace through `ip netns exec` on the veth topology); it counts as ready once every
//! listen address shows LISTEN in /proc/PID/net/tcp, the table of its own namespace (if it
//! exits first, the error carries the tail of its log); after the measurement the whole group gets SIGTERM, then
//! SIGKILL after a grace period, and the leader is reaped. `Drop` performs the stop, so an
//! error or a panic leaves no process behind; nginx workers die with their group.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::compare::template::{render, Templates};
use crate::error::{file_context, io_context, BenchError, Result};
use crate::net;
use crate::procfs::{is_listening, listening_addresses};
use crate::scenario::Scenario;
use crate::timeline;
use crate::topology::{Side, Topology};

/// How long a proxy may take to listen on all its ports.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// Grace period between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Lowest port tried for proxy listeners; below the usual ephemeral range (32768+),
/// so client connections never take a port a proxy is about to bind.
pub const DEFAULT_BASE_PORT: u16 = 21000;
/// Where Debian and Fedora put nginx's dynamic stream module.
const NGINX_STREAM_MODULES: [&str; 2] = [
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/share/nginx/modules/ngx_stream_module.so",
];
/// Directories searched after PATH for proxy programs (root's sbin is often not on PATH).
const EXTRA_PROGRAM_DIRS: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// Who is being measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ContenderKind {
    /// No proxy: clients talk to the backend.
    Direct,
    /// sluice with its own defaults: no driver, relay or pin key in its config (`pin` only
    /// when `--pin` is given).
    Sluice,
    /// sluice with the io_uring driver and the copy relay.
    SluiceUring,
    /// sluice with the io_uring driver and copy relay, workers not pinned (`pin = false`).
    SluiceUringNopin,
    /// sluice with the io_uring driver and the splice relay.
    SluiceUringSplice,
    /// sluice with the epoll driver.
    SluiceEpoll,
    /// A baseline build of sluice (`--baseline-bin`), io_uring, copy relay: the same
    /// configuration as `sluice-uring`, to compare two builds in one run.
    BaseUring,
    /// The baseline build, io_uring, splice relay.
    BaseUringSplice,
    /// The baseline build, epoll.
    BaseEpoll,
    /// HAProxy in TCP mode with `option splice-auto` (splice when the kernel buffers
    /// suggest it pays).
    Haproxy,
    /// HAProxy in TCP mode with forced splice (`option splice-request` and
    /// `option splice-response`).
    HaproxySplice,
    /// nginx stream module.
    Nginx,
}

impl ContenderKind {
    /// Every contender, in the order a comparison interleaves them.
    pub const ALL: [ContenderKind; 8] = [
        ContenderKind::Direct,
        ContenderKind::SluiceUring,
        ContenderKind::SluiceUringNopin,
        ContenderKind::SluiceUringSplice,
        ContenderKind::SluiceEpoll,
        ContenderKind::Haproxy,
        ContenderKind::HaproxySplice,
        ContenderKind::Nginx,
    ];

    /// The contenders of `--quick`, when none are named: one of each kind of proxy, so the
    /// run stays within 20 s.
    pub const QUICK: [ContenderKind; 6] = [
        ContenderKind::Direct,
        ContenderKind::SluiceUring,
        ContenderKind::SluiceUringSplice,
        ContenderKind::SluiceEpoll,
        ContenderKind::Haproxy,
        ContenderKind::Nginx,
    ];

    /// Name in tables, files and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ContenderKind::Direct => "direct",
            ContenderKind::Sluice => "sluice",
            ContenderKind::SluiceUring => "sluice-uring",
            ContenderKind::SluiceUringNopin => "sluice-uring-nopin",
            ContenderKind::SluiceUringSplice => "sluice-uring-splice",
            ContenderKind::SluiceEpoll => "sluice-epoll",
            ContenderKind::BaseUring => "base-uring",
            ContenderKind::BaseUringSplice => "base-uring-splice",
            ContenderKind::BaseEpoll => "base-epoll",
            ContenderKind::Haproxy => "haproxy",
            ContenderKind::HaproxySplice => "haproxy-splice",
            ContenderKind::Nginx => "nginx",
        }
    }

    /// True for the sluice contenders of the build under test.
    pub fn is_sluice(self) -> bool {
        matches!(
            self,
            ContenderKind::Sluice
                | ContenderKind::SluiceUring
                | ContenderKind::SluiceUringNopin
                | ContenderKind::SluiceUringSplice
                | ContenderKind::SluiceEpoll
        )
    }

    /// True for the HAProxy contenders.
    pub fn is_haproxy(self) -> bool {
        matches!(self, ContenderKind::Haproxy | ContenderKind::HaproxySplice)
    }

    /// The `[engine]` keys of a sluice contender's config besides `workers`: driver and
    /// relay as the contender names them, and `pin` when told (`--pin`) or when the
    /// contender is the unpinned one. Empty for `sluice`, which keeps the binary's defaults.
    pub fn engine_keys(self, pin: Option<bool>) -> String {
        let (driver, relay) = match self {
            ContenderKind::SluiceEpoll | ContenderKind::BaseEpoll => (Some("epoll"), Some("copy")),
            ContenderKind::SluiceUringSplice | ContenderKind::BaseUringSplice => {
                (Some("uring"), Some("splice"))
            }
            ContenderKind::SluiceUring
            | ContenderKind::SluiceUringNopin
            | ContenderKind::BaseUring => (Some("uring"), Some("copy")),
            _ => (None, None),
        };
        let pin = match self {
            ContenderKind::SluiceUringNopin => Some(false),
            _ => pin,
        };
        let mut keys = Vec::new();
        if let Some(driver) = driver {
            keys.push(format!("driver = \"{driver}\""));
        }
        if let Some(relay) = relay {
            keys.push(format!("relay = \"{relay}\""));
        }
        if let Some(pin) = pin {
            keys.push(format!("pin = {pin}"));
        }
        keys.join("\n")
    }

    /// HAProxy's splice options for the HAProxy contenders.
    pub fn splice_options(self) -> &'static str {
        match self {
            ContenderKind::HaproxySplice => "option splice-request\n    option splice-response",
            _ => "option splice-auto",
        }
    }

    /// True for the contenders of the baseline build.
    pub fn is_baseline(self) -> bool {
        matches!(
            self,
            ContenderKind::BaseUring | ContenderKind::BaseUringSplice | ContenderKind::BaseEpoll
        )
    }

    /// The baseline contenders, in the order they join a comparison.
    pub const BASELINE: [ContenderKind; 3] =
        [ContenderKind::BaseUring, ContenderKind::BaseUringSplice, ContenderKind::BaseEpoll];
}

/// Where the proxy programs are, and options that apply to every sluice contender.
#[derive(Debug, Clone)]
pub struct Programs {
    pub sluice: PathBuf,
    /// A second sluice build to compare with (`--baseline-bin`).
    pub baseline: Option<PathBuf>,
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
    /// `[engine] pin` for the sluice contenders (`--pin`); `None` keeps sluice's default.
    pub pin: Option<bool>,
}

/// Sizing shared by every proxy so they are configured alike.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizing {
    /// Worker threads or processes: the core count unless told otherwise.
    pub workers: usize,
    /// Connection limit.
    pub maxconn: u64,
    /// Descriptor limit a proxy may ask for.
    pub nofile: u64,
}

impl Sizing {
    /// Sockets one worker may hold: both sides of every connection, in case a single
    /// worker accepts them all, within the descriptor limit.
    pub fn worker_connections(&self) -> u64 {
        const SPARE: u64 = 64;
        (2 * self.maxconn + SPARE).min(self.nofile.saturating_sub(SPARE))
    }
}

/// One forwarding rule: clients of `scenario` connect to `listen`, the proxy forwards to
/// `backend`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub scenario: Scenario,
    pub listen: SocketAddr,
    pub backend: SocketAddr,
}

/// A contender found usable: what to run and how to configure it.
#[derive(Debug, Clone)]
pub struct Contender {
    pub kind: ContenderKind,
    program: PathBuf,
    template: String,
    fixed: BTreeMap<String, String>,
}

/// Checks that `kind` can run here; `Err` holds the reason it is skipped.
pub fn prepare(
    kind: ContenderKind,
    programs: &Programs,
    templates: &Templates,
) -> std::result::Result<Contender, String> {
    let mut fixed = BTreeMap::new();
    let (program, template) = match kind {
        ContenderKind::Direct => (PathBuf::new(), String::new()),
        kind if kind.is_sluice() || kind.is_baseline() => {
            let program = match kind.is_baseline() {
                true => programs.baseline.clone().ok_or("no --baseline-bin given")?,
                false => programs.sluice.clone(),
            };
            if !program.is_file() {
                return Err(format!(
                    "sluice binary missing at {} (build it with `cargo build --release -p sluice`)",
                    program.display()
                ));
            }
            fixed.insert("ENGINE_KEYS".into(), kind.engine_keys(programs.pin));
            (program, templates.sluice.clone())
        }
        kind if kind.is_haproxy() => {
            let program = find_program(&programs.haproxy)
                .ok_or("haproxy not installed (scripts/compare installs it with apt-get)")?;
            fixed.insert("SPLICE_OPTIONS".into(), kind.splice_options().into());
            (program, templates.haproxy.clone())
        }
        ContenderKind::Nginx => {
            let program = find_program(&programs.nginx)
                .ok_or("nginx not installed (scripts/compare installs it with apt-get)")?;
            fixed.insert("NGINX_MODULES".into(), nginx_modules_line(&program)?);
            (program, templates.nginx.clone())
        }
        _ => return Err(format!("{} is not a proxy this bench can start", kind.name())),
    };
    Ok(Contender { kind, program, template, fixed })
}

impl Contender {
    /// Name in tables, files and JSON.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// False for "direct", which has no process.
    pub fn is_proxy(&self) -> bool {
        self.kind != ContenderKind::Direct
    }

    /// Renders the config into `run_dir`, starts the proxy (in the proxy namespace of
    /// `topology`) and waits until it listens.
    pub fn start(
        &self,
        routes: &[Route],
        sizing: Sizing,
        run_dir: &Path,
        topology: &Topology,
    ) -> Result<RunningProxy> {
        fs::create_dir_all(run_dir).map_err(file_context(run_dir))?;
        let config = self.write_config(routes, sizing, run_dir)?;
        let command = topology.command(Side::Proxy, self.command(&config, run_dir));
        let listens: Vec<SocketAddr> = routes.iter().map(|r| r.listen).collect();
        let log = run_dir.join(format!("{}.log", self.name()));
        start_server(self.name(), command, &log, config, &listens)
    }

    fn write_config(&self, routes: &[Route], sizing: Sizing, run_dir: &Path) -> Result<PathBuf> {
        let values = self.values(routes, sizing, run_dir);
        let text = render(self.name(), &self.template, &values)?;
        let extension = match self.kind {
            kind if kind.is_haproxy() => "cfg",
            ContenderKind::Nginx => "conf",
            _ => "toml",
        };
        let path = run_dir.join(format!("{}.{extension}", self.name()));
        fs::write(&path, text).map_err(file_context(&path))?;
        Ok(path)
    }

    /// Every placeholder value for this contender's template.
    pub fn values(
        &self,
        routes: &[Route],
        sizing: Sizing,
        run_dir: &Path,
    ) -> BTreeMap<String, String> {
        let mut values = self.fixed.clone();
        values.insert("WORKERS".into(), sizing.workers.to_string());
        values.insert("MAXCONN".into(), sizing.maxconn.to_string());
        values.insert("NOFILE".into(), sizing.nofile.to_string());
        values.insert("WORKER_CONNECTIONS".into(), sizing.worker_connections().to_string());
        values.insert("RUN_DIR".into(), run_dir.display().to_string());
        for route in routes {
            let prefix = route.scenario.placeholder();
            values.insert(format!("{prefix}_LISTEN"), route.listen.to_string());
            values.insert(format!("{prefix}_BACKEND"), route.backend.to_string());
        }
        values
    }

    fn command(&self, config: &Path, run_dir: &Path) -> Command {
        let mut command = Command::new(&self.program);
        match self.kind {
            kind if kind.is_haproxy() => command.arg("-db").arg("-f").arg(config),
            ContenderKind::Nginx => command
                .arg("-p")
                .arg(run_dir)
                .arg("-e")
                .arg(run_dir.join("nginx-startup.log"))
                .arg("-c")
                .arg(config),
            // No per-session log line, as the peers' configs log nothing either.
            // Its pid file and control socket go to the run dir, not /run/sluice.
            _ => command
                .env("RUNTIME_DIRECTORY", run_dir)
                .arg("run")
                .arg("--config")
                .arg(config)
                .arg("--log-level")
                .arg("warn"),
        };
        command
    }
}

/// Spawns `command` in a process group of its own, output to `log`, and waits until it
/// listens on every address of `listens`; `config` is the file it runs with. `name` names
/// it in errors.
pub fn start_server(
    name: &'static str,
    mut command: Command,
    log: &Path,
    config: PathBuf,
    listens: &[SocketAddr],
) -> Result<RunningProxy> {
    let output = File::create(log).map_err(file_context(log))?;
    let errors = output.try_clone().map_err(file_context(log))?;
    let program = command.get_program().to_string_lossy().into_owned();
    let child = command
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .process_group(0)
        .spawn()
        .map_err(|e| BenchError::ProxyStart {
            contender: name.into(),
            detail: format!("cannot run {program}: {e}"),
        })?;
    let mut server = RunningProxy { name, child, log: log.to_path_buf(), config, stopped: false };
    server.wait_ready(listens)?;
    Ok(server)
}

/// A started proxy (or server); dropping it stops its whole process group.
pub struct RunningProxy {
    name: &'static str,
    child: Child,
    log: PathBuf,
    config: PathBuf,
    stopped: bool,
}

impl RunningProxy {
    /// Pid of the process that was started (nginx's master).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The rendered configuration file it runs with.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Waits until every address listens in the proxy's own network namespace (read
    /// through /proc/PID/net, so it works inside a namespace too).
    fn wait_ready(&mut self, listens: &[SocketAddr]) -> Result<()> {
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_context("waiting for proxy"))? {
                self.stopped = true;
                return Err(self.error(format!("exited with {status}")));
            }
            let listening = listening_addresses(self.child.id());
            if listens.iter().all(|&addr| is_listening(&listening, addr)) {
                return Ok(());
            }
            if began.elapsed() > READY_LIMIT {
                return Err(
                    self.error(format!("not listening on {listens:?} after {READY_LIMIT:?}"))
                );
            }
            timeline::pause(Duration::from_millis(10))?;
        }
    }

    fn error(&self, what: String) -> BenchError {
        let tail = log_tail(&self.log, 12);
        BenchError::ProxyStart {
            contender: self.name.into(),
            detail: format!("{what}; last lines of {}:\n{tail}", self.log.display()),
        }
    }

    /// SIGTERM to the group, SIGKILL after the grace period, then reap.
    pub fn stop(&mut self) {
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
        // Kills whatever is left of the group: the leader if it ignored SIGTERM, and any
        // worker that outlived it.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends a probe through `addr` (an echo route) and expects it back.
pub fn check_forwarding(addr: SocketAddr) -> Result<()> {
    const PROBE: &[u8] = b"sluice-bench forwarding probe";
    let mut stream = net::connect(addr)?;
    let fail = |source| BenchError::Connect { addr, source };
    stream.set_read_timeout(Some(Duration::from_secs(3))).map_err(fail)?;
    stream.write_all(PROBE).map_err(fail)?;
    let mut echoed = vec![0; PROBE.len()];
    stream.read_exact(&mut echoed).map_err(fail)?;
    if echoed != PROBE {
        return Err(BenchError::ProxyStart {
            contender: addr.to_string(),
            detail: "probe came back altered".into(),
        });
    }
    Ok(())
}

/// Hands out free ports for proxy listeners on one address, never the same one twice in a
/// run. Call [`PortPool::take`] in the proxies' network namespace.
#[derive(Debug)]
pub struct PortPool {
    ip: IpAddr,
    next: u16,
}

impl PortPool {
    pub fn new(ip: IpAddr, base: u16) -> Self {
        Self { ip, next: base }
    }

    /// The next port that can be bound on the pool's address right now.
    pub fn take(&mut self) -> Result<SocketAddr> {
        while self.next < u16::MAX {
            let addr = SocketAddr::new(self.ip, self.next);
            self.next += 1;
            if TcpListener::bind(addr).is_ok() {
                return Ok(addr);
            }
        }
        Err(BenchError::Usage(format!("no free port left on {} above --base-port", self.ip)))
    }
}

/// How nginx was built with the stream module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamModule {
    Static,
    Dynamic,
    Missing,
}

/// Reads the stream module's presence from the output of `nginx -V`.
pub fn stream_module(configure_output: &str) -> StreamModule {
    let args: Vec<&str> = configure_output.split_whitespace().collect();
    if args.contains(&"--with-stream=dynamic") {
        return StreamModule::Dynamic;
    }
    if args.contains(&"--with-stream") {
        return StreamModule::Static;
    }
    StreamModule::Missing
}

pub(crate) fn nginx_modules_line(nginx: &Path) -> std::result::Result<String, String> {
    let output = Command::new(nginx)
        .arg("-V")
        .output()
        .map_err(|e| format!("cannot run {} -V: {e}", nginx.display()))?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    match stream_module(&text) {
        StreamModule::Static => Ok(String::new()),
        StreamModule::Missing => Err("nginx was built without the stream module".into()),
        StreamModule::Dynamic => NGINX_STREAM_MODULES
            .iter()
            .find(|p| Path::new(p).is_file())
            .map(|p| format!("load_module {p};"))
            .ok_or_else(|| {
                "nginx stream module not installed (Debian: libnginx-mod-stream)".into()
            }),
    }
}

/// Resolves a program name through PATH and the sbin directories; a path is taken as is.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_PROGRAM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<Route> {
        Scenario::ALL
            .iter()
            .enumerate()
            .map(|(i, &scenario)| Route {
                scenario,
                listen: SocketAddr::from(([127, 0, 0, 1], 30000 + i as u16)),
                backend: SocketAddr::from(([127, 0, 0, 1], 31000 + i as u16)),
            })
            .collect()
    }

    #[test]
    fn stream_module_kinds() {
        let debian = "nginx version: nginx/1.22.1\nconfigure arguments: --with-http_ssl_module --with-stream=dynamic --with-stream_ssl_module";
        assert_eq!(stream_module(debian), StreamModule::Dynamic);
        assert_eq!(
            stream_module("configure arguments: --with-stream --with-threads"),
            StreamModule::Static
        );
        assert_eq!(
            stream_module("configure arguments: --with-stream_ssl_module"),
            StreamModule::Missing
        );
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let mut pool = PortPool::new(IpAddr::from([127, 0, 0, 1]), DEFAULT_BASE_PORT);
        let a = pool.take().unwrap();
        let held = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], a.port() + 1))).ok();
        let b = pool.take().unwrap();
        assert!(b.port() > a.port());
        if held.is_some() {
            assert!(b.port() > a.port() + 1, "a bound port was handed out");
        }
        assert!(a.ip().is_loopback());
    }

    #[test]
    fn sluice_skips_with_a_reason_when_missing() {
        let programs = Programs {
            sluice: PathBuf::from("/nonexistent/sluice"),
            baseline: None,
            haproxy: PathBuf::from("haproxy"),
            nginx: PathBuf::from("nginx"),
            pin: None,
        };
        let reason =
            prepare(ContenderKind::SluiceUring, &programs, &Templates::builtin()).unwrap_err();
        assert!(reason.contains("/nonexistent/sluice"), "{reason}");
    }

    #[test]
    fn values_cover_every_route_and_driver() {
        let programs = Programs {
            sluice: std::env::current_exe().unwrap(),
            baseline: None,
            haproxy: PathBuf::from("haproxy"),
            nginx: PathBuf::from("nginx"),
            pin: None,
        };
        let contender =
            prepare(ContenderKind::SluiceEpoll, &programs, &Templates::builtin()).unwrap();
        let routes = routes();
        let sizing = Sizing { workers: 2, maxconn: 100, nofile: 1000 };
        let values = contender.values(&routes, sizing, Path::new("/tmp/run"));
        assert_eq!(values["ENGINE_KEYS"], "driver = \"epoll\"\nrelay = \"copy\"");
        assert_eq!(values["WORKER_CONNECTIONS"], "264");
        let tight = Sizing { workers: 2, maxconn: 7500, nofile: 10_000 };
        assert_eq!(tight.worker_connections(), 9_936, "capped by the descriptor limit");
        assert_eq!(values["IDLE_LISTEN"], "127.0.0.1:30003");
        assert_eq!(values["RR_BACKEND"], "127.0.0.1:31001");
        let text = render("sluice", &contender.template, &values).unwrap();
        assert!(text.contains("driver = \"epoll\""));
        assert!(text.contains("listen = [\"127.0.0.1:30000\"]"));
    }

    #[test]
    fn engine_keys_follow_the_contender_and_pin() {
        use ContenderKind::*;
        assert_eq!(Sluice.engine_keys(None), "", "the defaults are sluice's own");
        assert_eq!(Sluice.engine_keys(Some(false)), "pin = false");
        assert_eq!(SluiceUring.engine_keys(None), "driver = \"uring\"\nrelay = \"copy\"");
        assert_eq!(
            SluiceUringSplice.engine_keys(Some(true)),
            "driver = \"uring\"\nrelay = \"splice\"\npin = true"
        );
        assert_eq!(
            SluiceUringNopin.engine_keys(None),
            "driver = \"uring\"\nrelay = \"copy\"\npin = false"
        );
        assert_eq!(
            SluiceUringNopin.engine_keys(Some(true)),
            SluiceUringNopin.engine_keys(None),
            "the unpinned contender stays unpinned"
        );
        assert_eq!(BaseEpoll.engine_keys(Some(false)), SluiceEpoll.engine_keys(Some(false)));
    }

    #[test]
    fn haproxy_contenders_differ_only_in_splice() {
        let programs = Programs {
            sluice: PathBuf::from("sluice"),
            baseline: None,
            haproxy: std::env::current_exe().unwrap(),
            nginx: PathBuf::from("nginx"),
            pin: None,
        };
        let render_for = |kind| {
            let contender = prepare(kind, &programs, &Templates::builtin()).unwrap();
            let values = contender.values(
                &routes(),
                Sizing { workers: 2, maxconn: 100, nofile: 1000 },
                Path::new("/tmp/run"),
            );
            let text = render(contender.name(), &contender.template, &values).unwrap();
            text.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
        };
        let auto = render_for(ContenderKind::Haproxy);
        let forced = render_for(ContenderKind::HaproxySplice);
        assert!(auto.contains("    option splice-auto\n") && !auto.contains("splice-request"));
        assert!(forced.contains("    option splice-request\n    option splice-response\n"));
        assert!(!forced.contains("splice-auto"));
        let strip = |text: &str| {
            text.lines().filter(|l| !l.contains("option splice")).collect::<Vec<_>>().join("\n")
        };
        assert_eq!(strip(&auto), strip(&forced));
    }

    #[test]
    fn sluice_config_with_pin_false_parses_as_toml_lines() {
        let programs = Programs {
            sluice: std::env::current_exe().unwrap(),
            baseline: None,
            haproxy: PathBuf::from("haproxy"),
            nginx: PathBuf::from("nginx"),
            pin: Some(false),
        };
        let contender =
            prepare(ContenderKind::SluiceUring, &programs, &Templates::builtin()).unwrap();
        let values = contender.values(
            &routes(),
            Sizing { workers: 2, maxconn: 100, nofile: 1000 },
            Path::new("/tmp/run"),
        );
        let text = render("sluice", &contender.template, &values).unwrap();
        let engine: Vec<&str> =
            text.lines().skip_while(|l| *l != "[engine]").take_while(|l| !l.is_empty()).collect();
        assert_eq!(
            engine,
            ["[engine]", "workers = 2", "driver = \"uring\"", "relay = \"copy\"", "pin = false"]
        );
        let plain = prepare(
            ContenderKind::Sluice,
            &Programs { pin: None, ..programs },
            &Templates::builtin(),
        )
        .unwrap();
        let text = render(
            "sluice",
            &plain.template,
            &plain.values(
                &routes(),
                Sizing { workers: 2, maxconn: 100, nofile: 1000 },
                Path::new("/tmp/run"),
            ),
        )
        .unwrap();
        let engine: Vec<&str> =
            text.lines().skip_while(|l| *l != "[engine]").take_while(|l| !l.is_empty()).collect();
        assert_eq!(engine, ["[engine]", "workers = 2"], "{text}");
    }

    #[test]
    fn program_lookup_takes_paths_as_given() {
        assert!(find_program(Path::new("/nonexistent/haproxy")).is_none());
        assert_eq!(find_program(Path::new("/bin/sh")), Some(PathBuf::from("/bin/sh")));
        assert!(find_program(Path::new("sh")).is_some());
    }
}
