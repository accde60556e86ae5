//! `sluice run`: the control thread. It takes the instance lock of its configuration, raises
//! the fd limit, binds (or inherits) the listeners, drops privileges if asked, starts the
//! engine on the compiled tables, then owns the configuration, the signals and the record
//! channel:
//!
//! - SIGHUP or `POST /reload` re-reads the file; a valid file is published (listeners
//!   diffed by the engine), an invalid one is logged with file, line and key, counted, and
//!   the running tables stay in force;
//! - SIGUSR2 or `sluice upgrade` starts the binary installed at this one's path and hands
//!   it the listeners (see [`crate::upgrade`]); once it accepts, this process stops
//!   accepting and drains for `shutdown_timeout`; if it fails, nothing changes;
//! - SIGTERM/SIGINT drain gracefully for `shutdown_timeout`; a second one cuts at once,
//!   however soon it follows the first (stop signals are counted one by one, never merged);
//! - the service manager hears of each step (see [`crate::notify`]);
//! - every session record is logged by a log thread.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use sluice_engine::counters::WorkerStats;
use sluice_engine::events::{EventSink, DEFAULT_EVENT_QUEUE};
use sluice_engine::{Engine, EngineConfig, EngineError, Inherited, Relay};

use crate::admin::history::{Denials, Observed};
use crate::admin::{Admin, ControlRequest, ReloadError, MAX_CONNECTIONS_LIMIT};
use crate::config::{Config, Registry, EMBEDDED_NAME};
use crate::discovery::{self, Discovery};
use crate::dns::DEFAULT_DNS_DEADLINE;
use crate::health::Checker;
use crate::instance::{Instance, Paths, UPGRADE_REQUEST};
use crate::metrics::Shared;
use crate::notify::Notifier;
use crate::privileges::{self, RunAs};
use crate::records::{Template, PROCESS_LOG_TEMPLATE, PROCESS_LOG_UDP_TEMPLATE};
use crate::sinks::{self, Filter, Format, LogCommand, Sink, SinkSpec, Target};
use crate::upgrade::{self, Attempt, Handout, Handover, Outcome, Relaunch};
use sluice_engine::record::Protocol;

/// How often the control thread checks for signals and worker exits.
const TICK: Duration = Duration::from_millis(50);
/// How often the history of `/history` is sampled (only with an `[admin]` section).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Why `sluice run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Setup(String),
    /// A stop signal came before the engine started (during the start-up DNS lookups).
    #[error("stopped before the start was complete")]
    StoppedEarly,
}

/// An upgrade under way: the new process and who asked for it.
struct Upgrading {
    attempt: Attempt,
    requester: Option<UnixStream>,
}

/// The state the control thread owns.
struct Control {
    path: Option<PathBuf>,
    config: Config,
    registry: Registry,
    engine: Engine,
    shared: Arc<Shared>,
    log: crossbeam_channel::Sender<LogCommand>,
    discovery: Discovery,
    notifier: Notifier,
    instance: Instance,
    admin: Option<Admin>,
    relaunch: Relaunch,
    /// The user the process became at start, if it dropped root.
    dropped: Option<RunAs>,
    upgrading: Option<Upgrading>,
    /// The pid of the successor this process handed over to.
    successor: Option<u32>,
    draining: bool,
    /// When the history is sampled next.
    next_sample: Instant,
    stops: StopSignals,
}

/// SIGTERM and SIGINT, counted one by one: each delivery writes a byte into a socket pair
/// (from the handler, which only writes), and the control thread reads how many came. A
/// flag per signal, as `Signals::pending` keeps, merges two signals that arrive between two
/// looks, so the second would not cut at once.
struct StopSignals {
    read: UnixStream,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(SIGTERM, write.try_clone()?)?;
        signal_hook::low_level::pipe::register(SIGINT, write)?;
        Ok(StopSignals { read })
    }

    /// How many stop signals arrived since the last call.
    fn take(&mut self) -> usize {
        let mut count = 0;
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = self.read.read(&mut buf) {
            count += n;
        }
        count
    }
}

/// Starts the engine for `config` and runs the control loop until a graceful stop. With
/// `handover`, this process is the successor of a binary upgrade: it takes the
/// predecessor's listeners and instance, and reports its start (or failure) to it.
pub fn run(
    path: Option<PathBuf>,
    config: Config,
    mut handover: Option<Handover>,
) -> Result<(), RunError> {
    let result = start(path, config, handover.as_mut());
    match (result, &handover) {
        (Ok(control), _) => control.run(handover),
        (Err(RunError::StoppedEarly), None) => {
            log::info!("stop signal during the start-up DNS lookups: stopped");
            Ok(())
        }
        (Err(e), Some(h)) => {
            h.fail(&e.to_string());
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// Everything before the control loop: a failure here leaves a predecessor serving.
fn start(
    path: Option<PathBuf>,
    mut config: Config,
    mut handover: Option<&mut Handover>,
) -> Result<Started, RunError> {
    let relaunch = relaunch_of(&path, log::max_level());
    let (instance, mut inherited) = claim_instance(&path, &config, handover.as_deref_mut())?;
    let handover = handover.as_deref();
    let limit =
        privileges::raise_fd_limit(config.process.max_open_files).map_err(RunError::Setup)?;
    log::info!("fd limit {} (hard {})", limit.soft, limit.hard);
    if let Some(warning) = privileges::fd_budget_warning(&config, limit) {
        log::warn!("{warning}");
    }
    let signals = Signals::new([SIGHUP, SIGUSR1, SIGUSR2]).map_err(RunError::Signals)?;
    let mut stops = StopSignals::install().map_err(RunError::Signals)?;
    let mut discovery = Discovery::default();
    if !first_lookups(&mut discovery, &mut config, &mut stops) {
        return Err(RunError::StoppedEarly);
    }
    let mut registry = Registry::default();
    let tables = config.tables(1, &mut registry);
    if handover.is_some() {
        for (protocol, addr) in
            inherited.release_except(&tables.listeners(), &tables.udp_listeners())
        {
            log::warn!(
                "upgrade: not taking {} {addr} over: the new configuration does not listen \
                 there (the old process serves what waits on it, then closes it)",
                protocol.as_str()
            );
        }
    }
    let mut admin_listener = None;
    let dropped = match &config.process.run_as {
        Some(who) if !privileges::is_running_as(who) => {
            if inherited.is_empty() {
                let workers = config.engine.workers;
                inherited = Inherited::bind(&tables.listeners(), &tables.udp_listeners(), workers)?;
            }
            if let (Some(spec), None) = (&config.admin, handover) {
                admin_listener = Some(crate::admin::listen(spec).map_err(RunError::Setup)?);
            }
            instance.give_to(who);
            privileges::drop_to(who).map_err(RunError::Setup)?;
            log::info!("listeners bound; running as {who} from now on, with no capability");
            Some(who.clone())
        }
        Some(who) => {
            privileges::drop_to(who).map_err(RunError::Setup)?;
            Some(who.clone())
        }
        None => None,
    };
    let tables = Arc::new(ArcSwap::from_pointee(tables));
    let (sink, records) = EventSink::bounded(DEFAULT_EVENT_QUEUE);
    let log_sinks = open_sinks(&config).map_err(RunError::Setup)?;
    let sink_counters = log_sinks.iter().map(Sink::counters).collect();
    if handover.is_some() {
        log::info!("upgrade: {} inherited listening sockets", inherited.len());
    }
    let mut engine_config = config.engine.clone();
    settle_pipe_size(&mut engine_config);
    let engine = Engine::start_with(&engine_config, tables.clone(), sink.clone(), inherited)?;
    announce(&config, &engine);
    let denials = Arc::new(Denials::default());
    let shared = Arc::new(Shared {
        tables,
        workers: engine.stats().to_vec(),
        driver: engine.selection().kind.as_str(),
        driver_detail: engine.selection().detail.clone(),
        started: Instant::now(),
        reloads: Default::default(),
        reload_failures: Default::default(),
        events: sink.clone(),
        sinks: ArcSwap::from_pointee(sink_counters),
        max_flows: config.engine.max_flows,
        capture: registry.capture_stats(),
        admin_tokens: ArcSwap::from_pointee(
            config.admin.as_ref().map(|a| a.tokens.clone()).unwrap_or_default(),
        ),
        history: Default::default(),
        denials: denials.clone(),
        workers_running: true.into(),
        draining: false.into(),
    });
    let (requests_tx, requests) = crossbeam_channel::bounded(16);
    // A successor starts its admin API once the predecessor has released the address.
    let admin = match (&config.admin, &handover) {
        (Some(spec), None) => {
            let started = match admin_listener {
                Some(l) => Admin::start_on(spec, l, shared.clone(), requests_tx.clone()),
                None => Admin::start(spec, shared.clone(), requests_tx.clone()),
            };
            let admin =
                started.inspect_err(|_| engine.drain(Duration::ZERO)).map_err(RunError::Setup)?;
            log::info!("admin API on {}", crate::config::admin::describe(spec));
            Some(admin)
        }
        _ => None,
    };
    let (log, log_commands) = crossbeam_channel::unbounded();
    let logger = std::thread::Builder::new()
        .name("sluice-log".into())
        .spawn(move || sinks::run_log_thread(records, log_commands, log_sinks, &denials))
        .map_err(RunError::Signals)?;
    let checker = Checker::start(shared.tables.clone()).map_err(RunError::Signals)?;
    let notifier = Notifier::from_env();
    let control = Control {
        path,
        config,
        registry,
        engine,
        shared,
        log,
        discovery,
        notifier,
        instance,
        admin,
        relaunch,
        dropped,
        upgrading: None,
        successor: None,
        draining: false,
        next_sample: Instant::now() + SAMPLE_EVERY,
        stops,
    };
    Ok(Started { control, sink, signals, requests_tx, requests, logger, checker })
}

/// The start-up round of DNS lookups, so that discovered pools start with backends: it
/// runs on the lookup thread under its deadline while this thread waits, watching for stop
/// signals. Returns `false` when a stop signal came first.
fn first_lookups(discovery: &mut Discovery, config: &mut Config, stops: &mut StopSignals) -> bool {
    discovery.refresh(config, Instant::now());
    if !discovery.tick(config, Instant::now()) {
        return true;
    }
    log::info!("dns: looking up the discovered pools (at most {DEFAULT_DNS_DEADLINE:?})");
    loop {
        match discovery.answers().recv_timeout(TICK) {
            Ok(answers) => {
                discovery.finish(config, answers);
                return true;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if stops.take() > 0 => return false,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return true,
        }
    }
}

/// A started engine and what the control loop needs beside it.
struct Started {
    control: Control,
    sink: EventSink,
    signals: Signals,
    requests_tx: crossbeam_channel::Sender<ControlRequest>,
    requests: Receiver<ControlRequest>,
    logger: std::thread::JoinHandle<()>,
    checker: Checker,
}

impl Started {
    fn run(self, handover: Option<Handover>) -> Result<(), RunError> {
        let Started { mut control, sink, mut signals, requests_tx, requests, logger, checker } =
            self;
        if let Some(h) = handover {
            control.take_over(&h, &requests_tx);
        }
        control.notifier.ready(&control.status());
        control.serve(&mut signals, &requests);
        drop(requests_tx);
        drop(checker);
        if let Some(admin) = control.admin.take() {
            admin.stop();
        }
        let Control { engine, shared, log, registry, instance, .. } = control;
        drop(log);
        let dropped = sink.dropped();
        drop(sink);
        drop(shared);
        let result = engine.join();
        registry.stop_capture();
        let _ = logger.join();
        if dropped > 0 {
            log::warn!("{dropped} session records were dropped because the log queue was full");
        }
        drop(instance);
        log::info!("stopped");
        Ok(result?)
    }
}

/// The pid file and control socket: taken now, or handed over by a predecessor (with its
/// listening sockets).
fn claim_instance(
    path: &Option<PathBuf>,
    config: &Config,
    handover: Option<&mut Handover>,
) -> Result<(Instance, Inherited), RunError> {
    let Some(h) = handover else {
        let paths = Paths::for_config(path.as_deref(), config.process.pid_file.as_deref());
        let instance = Instance::acquire(paths, path.as_deref()).map_err(RunError::Setup)?;
        log::info!("pid file {}", instance.paths.pid_file.display());
        return Ok((instance, Inherited::default()));
    };
    let (Some(lock), Some(control)) = (h.lock.take(), h.control.take()) else {
        let message = "upgrade: the pid file and control socket were not handed over";
        return Err(RunError::Setup(message.into()));
    };
    let instance = Instance::inherit(h.paths.clone(), lock, control).map_err(RunError::Setup)?;
    Ok((instance, std::mem::take(&mut h.sockets)))
}

/// How to start this binary again: the path it was started from (read now, before a
/// package upgrade replaces the file) and the same `run` arguments.
fn relaunch_of(path: &Option<PathBuf>, level: log::LevelFilter) -> Relaunch {
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut args: Vec<std::ffi::OsString> = vec!["run".into()];
    if let Some(p) = path {
        let absolute = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        args.extend(["--config".into(), absolute.into_os_string()]);
    }
    args.extend(["--log-level".into(), level.as_str().to_ascii_lowercase().into()]);
    Relaunch { binary, args }
}

impl Control {
    /// The successor's last step: tells the predecessor it accepts, waits for it to stop,
    /// then writes its pid and starts the admin API on the released address.
    fn take_over(&mut self, h: &Handover, requests: &crossbeam_channel::Sender<ControlRequest>) {
        log::info!("upgrade: accepting on every listener; telling pid {}", h.predecessor);
        if let Err(e) = h.ready() {
            log::warn!("upgrade: {e}; serving regardless");
        }
        if let Err(e) = self.instance.claim() {
            log::warn!("upgrade: {e}");
        }
        if let Some(spec) = self.config.admin.clone() {
            match Admin::start(&spec, self.shared.clone(), requests.clone()) {
                Ok(admin) => {
                    log::info!("admin API on {}", crate::config::admin::describe(&spec));
                    self.admin = Some(admin);
                }
                Err(e) => log::error!("{e}; serving without the admin API"),
            }
        }
        log::info!("upgrade: took over from pid {}", h.predecessor);
    }

    /// One line for the service manager: sessions, flows, tables.
    fn status(&self) -> String {
        status_line(&self.engine, &self.shared, self.successor)
    }

    fn serve(&mut self, signals: &mut Signals, requests: &Receiver<ControlRequest>) {
        while !self.engine.is_stopped() {
            let answers = self.discovery.answers().clone();
            let outcomes = match &self.upgrading {
                Some(u) => u.attempt.outcome.clone(),
                None => crossbeam_channel::never(),
            };
            crossbeam_channel::select! {
                recv(requests) -> request => if let Ok(request) = request { self.answer(request) },
                recv(answers) -> found => if let Ok(found) = found { self.discovered(found) },
                recv(outcomes) -> outcome => if let Ok(outcome) = outcome { self.upgraded(outcome) },
                default(TICK) => {}
            }
            let now = Instant::now();
            self.discovery.tick(&self.config, now);
            self.shared.workers_running.store(self.engine.all_running(), Ordering::Relaxed);
            if !self.draining && self.config.admin.is_some() && now >= self.next_sample {
                self.next_sample = now + SAMPLE_EVERY;
                self.sample_history();
            }
            while let Some((request, stream)) = self.instance.next_request() {
                self.control_request(&request, stream);
            }
            let engine = &self.engine;
            let (shared, successor) = (&self.shared, self.successor);
            self.notifier.tick(now, || status_line(engine, shared, successor));
            for signal in signals.pending() {
                self.on_signal(signal);
            }
            for _ in 0..self.stops.take() {
                self.on_stop();
            }
        }
    }

    fn on_signal(&mut self, signal: i32) {
        match signal {
            SIGHUP => {
                let _ = self.reload();
            }
            SIGUSR1 => {
                log::info!("SIGUSR1: reopening log files");
                let _ = self.log.send(LogCommand::Reopen);
            }
            SIGUSR2 => {
                log::info!("SIGUSR2: upgrading to {}", self.relaunch.binary.display());
                self.begin_upgrade(None);
            }
            _ => {}
        }
    }

    /// A stop signal (SIGTERM or SIGINT): drain, or, if draining already, cut at once.
    fn on_stop(&mut self) {
        if self.draining {
            log::warn!("second stop signal: cutting every session now");
            self.engine.drain(Duration::ZERO);
            return;
        }
        let grace = self.config.shutdown_timeout;
        log::info!("stop signal: draining sessions for up to {grace:?}");
        if let Some(u) = self.upgrading.take() {
            log::warn!("upgrade: abandoned by the stop; stopping new process {}", u.attempt.pid);
            let pid = nix::unistd::Pid::from_raw(u.attempt.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            reply(u.requester, "failed: the running sluice is stopping");
        }
        self.notifier.stopping(&self.status());
        self.engine.drain(grace);
        self.shared.draining.store(true, Ordering::Relaxed);
        self.draining = true;
    }

    /// A request on the control socket.
    fn control_request(&mut self, request: &str, stream: UnixStream) {
        match request {
            UPGRADE_REQUEST => {
                log::info!("upgrade requested: starting {}", self.relaunch.binary.display());
                self.begin_upgrade(Some(stream));
            }
            other => reply(Some(stream), &format!("failed: unknown request {other:?}")),
        }
    }

    /// Starts the new binary and hands it the listeners, unless this process cannot.
    fn begin_upgrade(&mut self, requester: Option<UnixStream>) {
        let refusal = if let Some(pid) = self.successor {
            Some(format!("this process has already handed over to pid {pid}"))
        } else if let Some(u) = &self.upgrading {
            Some(format!("an upgrade is already under way (new process {})", u.attempt.pid))
        } else if self.draining {
            Some("this process is stopping".to_string())
        } else {
            None
        };
        if let Some(why) = refusal {
            log::warn!("upgrade refused: {why}");
            return reply(requester, &format!("failed: {why}"));
        }
        match self
            .handout()
            .and_then(|h| upgrade::begin(&self.relaunch, h, upgrade::DEFAULT_UPGRADE_TIMEOUT))
        {
            Ok(attempt) => {
                log::info!(
                    "upgrade: new process {} started; handing over the listeners",
                    attempt.pid
                );
                self.upgrading = Some(Upgrading { attempt, requester });
            }
            Err(e) => {
                log::error!("upgrade failed: {e}; this process goes on serving");
                reply(requester, &format!("failed: {e}"));
            }
        }
    }

    fn handout(&self) -> Result<Handout, String> {
        let sockets = self.engine.listening_sockets().map_err(|e| format!("listeners: {e}"))?;
        let (lock, control) =
            self.instance.handover_fds().ok_or("the instance was already handed over")?;
        let own =
            |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| e.to_string());
        Ok(Handout {
            sockets: sockets.into_iter().map(|(_, _, fd)| fd).collect(),
            paths: self.instance.paths.clone(),
            lock: own(lock.as_fd())?,
            control: own(control.as_fd())?,
        })
    }

    /// The end of an upgrade attempt.
    fn upgraded(&mut self, outcome: Outcome) {
        let Some(Upgrading { requester, .. }) = self.upgrading.take() else { return };
        match outcome {
            Outcome::Failed(reason) => {
                log::error!("upgrade failed: {reason}; this process goes on serving");
                reply(requester, &format!("failed: {reason}"));
            }
            Outcome::Ready(successor) => {
                let pid = successor.pid;
                let grace = self.config.shutdown_timeout;
                self.engine.stop_accepting();
                if let Some(admin) = self.admin.take() {
                    admin.stop();
                }
                self.notifier.hand_over(pid);
                if let Err(e) = successor.release() {
                    log::warn!("upgrade: cannot tell pid {pid} it is on its own: {e}");
                }
                self.instance.hand_over();
                self.successor = Some(pid);
                log::info!(
                    "upgrade: pid {pid} accepts on every listener; this process stopped \
                     accepting and drains its sessions for up to {grace:?}"
                );
                self.engine.drain(grace);
                self.shared.draining.store(true, Ordering::Relaxed);
                self.draining = true;
                reply(requester, &format!("ok: pid {} replaced by pid {pid}", std::process::id()));
            }
        }
    }
    fn answer(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Reload { reply } => {
                let _ = reply.send(self.reload());
            }
            ControlRequest::Sessions { limit, reply } => {
                let _ = reply.send(self.engine.sessions(limit));
            }
            ControlRequest::Kill { id, reply } => {
                let _ = reply.send(self.engine.kill(id));
            }
        }
    }

    /// Adds this second to the history: every service's cumulative counts, closed
    /// sessions' bytes read before the live sessions' running bytes (see `history`).
    fn sample_history(&mut self) {
        let tables = self.engine.tables();
        let mut observed: Vec<(Arc<str>, Observed)> = tables
            .services()
            .iter()
            .map(|s| {
                let c = &s.counters;
                let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                let counts = Observed {
                    active: get(&c.active),
                    sessions: get(&c.sessions),
                    up: get(&c.bytes_up),
                    down: get(&c.bytes_down),
                    denied: get(&c.denied),
                };
                (s.name.clone(), counts)
            })
            .collect();
        for live in self.engine.sessions(MAX_CONNECTIONS_LIMIT) {
            if let Some((_, o)) = observed.iter_mut().find(|(name, _)| *name == live.service) {
                o.up += live.bytes_up;
                o.down += live.bytes_down;
            }
        }
        self.shared.history.record(crate::process::unix_now(), &observed);
    }

    /// Applies a round of DNS answers; a changed set republishes the tables.
    fn discovered(&mut self, answers: Vec<discovery::Answer>) {
        if !self.discovery.finish(&mut self.config, answers) {
            return;
        }
        let version = self.engine.tables().version + 1;
        match self.engine.publish(self.config.tables(version, &mut self.registry)) {
            Ok(_) => {
                self.registry.retain(&self.config);
                log::info!("dns: tables version {version} in force");
            }
            Err(e) => log::error!("dns: cannot publish the discovered backends: {e}"),
        }
    }

    /// Re-reads the file and publishes its tables if it is valid; the old tables stay in
    /// force otherwise. Engine settings (workers, driver, pipe size) need a restart.
    fn reload(&mut self) -> Result<u64, ReloadError> {
        if let Some(pid) = self.successor {
            let message = format!("this process has handed over to pid {pid}: reload that one");
            log::warn!("reload ignored: {message}");
            return Err(message.into());
        }
        if let Some(u) = &self.upgrading {
            let message =
                format!("an upgrade is under way (new process {}); reload after it", u.attempt.pid);
            log::warn!("reload refused: {message}");
            return Err(message.into());
        }
        self.notifier.reloading();
        let result = self.try_reload();
        self.notifier.ready(&self.status());
        match &result {
            Ok(v) => {
                self.shared.reloads.fetch_add(1, Ordering::Relaxed);
                log::info!("reload: tables version {v} in force");
            }
            Err(ReloadError { message, .. }) => {
                self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                for line in message.lines() {
                    log::error!("reload rejected: {line}");
                }
                log::error!("reload rejected: the running configuration stays in force");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<u64, ReloadError> {
        let Some(path) = &self.path else {
            return Err(String::from(
                "running on the embedded default: there is no file to reload",
            )
            .into());
        };
        let mut next = Config::load(path)
            .map_err(|e| ReloadError { message: e.to_string(), errors: e.0.clone() })?;
        for warning in &next.warnings {
            log::warn!("reload: {warning}");
        }
        discovery::carry_over(&self.config, &mut next);
        let version = self.engine.tables().version + 1;
        let changed = next.logs != self.config.logs || next.instance != self.config.instance;
        let new_sinks = if changed { Some(open_sinks(&next)?) } else { None };
        let change =
            self.engine.publish(next.tables(version, &mut self.registry)).map_err(|e| {
                let hint = match &e {
                    EngineError::Bind { addr, .. } => {
                        privileges::bind_hint(*addr, self.dropped.as_ref())
                    }
                    _ => None,
                };
                ReloadError::from(match hint {
                    Some(hint) => format!("{e}: {hint}"),
                    None => e.to_string(),
                })
            })?;
        self.reload_tokens(&next);
        if let Some(new_sinks) = new_sinks {
            self.shared.sinks.store(Arc::new(new_sinks.iter().map(Sink::counters).collect()));
            let _ = self.log.send(LogCommand::Replace(new_sinks));
            log::info!("reload: log sinks replaced");
        }
        self.registry.retain(&next);
        for addr in &change.added {
            log::info!("reload: listening on {addr}");
        }
        for addr in &change.udp_added {
            log::info!("reload: listening on udp {addr}");
        }
        for addr in &change.udp_removed {
            log::info!("reload: closed udp listener {addr}");
        }
        for addr in &change.removed {
            log::info!("reload: closed listener {addr}");
        }
        log::info!(
            "reload: listening sockets dropped {} packets so far (silent drops, full queues)",
            self.engine.listener_drops()
        );
        if engine_settings_differ(&self.config, &next)
            || process_settings_differ(&self.config, &next)
        {
            log::warn!("reload: [engine] settings changed; they take effect after a restart");
        }
        let settings = |c: &Config| {
            c.admin
                .as_ref()
                .map(|a| (a.listen.clone(), a.token_file.clone(), a.socket_mode, a.limits))
        };
        if settings(&self.config) != settings(&next) {
            log::warn!(
                "reload: [admin] changed; it takes effect after a restart (tokens excepted)"
            );
        }
        let (engine, admin) = (self.config.engine.clone(), self.config.admin.clone());
        let process = self.config.process.clone();
        self.config = next;
        self.config.engine = engine;
        self.config.admin = admin;
        self.config.process = process;
        // Looked up again off this thread; the sets carried over stay until it answers.
        self.discovery.refresh(&self.config, Instant::now());
        Ok(version)
    }

    /// Puts the token file's tokens as read by this reload in force.
    fn reload_tokens(&self, next: &Config) {
        let (Some(running), Some(next)) = (&self.config.admin, &next.admin) else { return };
        if running.token_file == next.token_file && **self.shared.admin_tokens.load() != next.tokens
        {
            self.shared.admin_tokens.store(Arc::new(next.tokens.clone()));
            log::info!("reload: admin tokens replaced");
        }
    }
}

/// Where the kernel says how large an unprivileged process may make a pipe.
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// The splice relay's pipes get `engine.pipe_size` only if this process may set it: above
/// fs.pipe-max-size it takes CAP_SYS_RESOURCE, and without it the kernel would silently
/// keep its 64 KiB default. Probed once at start with one pipe: when the size is refused,
/// pipes take the largest size allowed instead, and one warning says the figure in force.
fn settle_pipe_size(engine: &mut EngineConfig) {
    if engine.relay == Relay::Copy {
        return;
    }
    let wanted = engine.pipe_size;
    let capacity = sluice_engine::engine::pipe_capacity;
    let Ok(got) = capacity(wanted) else { return };
    if got >= wanted {
        return;
    }
    let max = std::fs::read_to_string(PIPE_MAX_SIZE).ok().and_then(|t| t.trim().parse().ok());
    let in_force = match max {
        Some(max) if max < wanted => capacity(max).unwrap_or(got),
        _ => got,
    };
    let limit = max.map_or("unknown".to_string(), |m: usize| format!("{m} bytes"));
    log::warn!(
        "engine.pipe_size {wanted} bytes is more than this process may set (fs.pipe-max-size is {limit}, and raising a pipe above it takes CAP_SYS_RESOURCE): pipes are {in_force} bytes"
    );
    engine.pipe_size = in_force;
}

/// Sessions, UDP flows and the tables version, for `STATUS=`.
fn status_line(engine: &Engine, shared: &Shared, successor: Option<u32>) -> String {
    let flows: u64 = shared.workers.iter().map(|w| WorkerStats::get(&w.udp_flows_active)).sum();
    let mut line = format!(
        "{} sessions, {flows} udp flows, tables version {}",
        engine.cap().active(),
        engine.tables().version
    );
    if let Some(pid) = successor {
        line += &format!("; handed over to pid {pid}, draining");
    }
    line
}

/// Answers a `sluice upgrade` client (if any) with one line and closes the connection.
fn reply(requester: Option<UnixStream>, line: &str) {
    if let Some(mut stream) = requester {
        let _ = stream.write_all(format!("{line}\n").as_bytes());
    }
}

fn engine_settings_differ(a: &Config, b: &Config) -> bool {
    let (a, b) = (&a.engine, &b.engine);
    a.workers != b.workers
        || a.pin != b.pin
        || a.driver != b.driver
        || a.pipe_size != b.pipe_size
        || a.buffer_size != b.buffer_size
        || a.relay != b.relay
        || a.ring_buffers != b.ring_buffers
        || a.max_flows != b.max_flows
        || a.udp_max_datagram != b.udp_max_datagram
}

fn process_settings_differ(a: &Config, b: &Config) -> bool {
    a.process != b.process
}

fn announce(config: &Config, engine: &Engine) {
    let source = if config.source == EMBEDDED_NAME {
        format!("{EMBEDDED_NAME} (no --config given)")
    } else {
        config.source.clone()
    };
    log::info!("config {source}");
    log::info!("workers={} pin={}", engine.worker_count(), config.engine.pin);
    log::info!("{}", engine.selection());
    for s in &config.services {
        let listen: Vec<String> = s.listen.iter().map(|l| l.to_string()).collect();
        let protocol = match s.protocol {
            Protocol::Tcp => String::new(),
            Protocol::Udp => format!(" protocol=udp udp_idle_timeout={:?}", s.udp_idle_timeout),
        };
        log::info!("service {} listen={}{protocol}", s.name, listen.join(","));
        match s.pool.and_then(|i| config.pools.get(i)) {
            Some(p) => log::info!("service {} backends=pool:{}", s.name, p.name),
            None => log::info!("service {} backends={}", s.name, backend_list(&s.backends)),
        }
    }
    for p in &config.pools {
        let source = match &p.dns {
            Some(d) => format!("dns={}", d.query.name()),
            None => format!("backends={}", backend_list(&p.backends)),
        };
        log::info!("pool {} algorithm={} {source}", p.name, p.algorithm.as_str());
    }
    for c in &config.captures {
        log::info!(
            "capture dir={} max_file={} max_total={} snaplen={}",
            c.dir.display(),
            c.max_file,
            c.max_total,
            c.snaplen
        );
    }
}

fn backend_list(backends: &[crate::config::BackendSpec]) -> String {
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    addrs.join(",")
}

/// Opens the configured sinks, or the process log when none is configured.
pub fn open_sinks(config: &Config) -> Result<Vec<Sink>, String> {
    if config.logs.is_empty() {
        let udp = Template::parse(PROCESS_LOG_UDP_TEMPLATE).map_err(|e| e.to_string())?;
        let template =
            Template::parse(PROCESS_LOG_TEMPLATE).map_err(|e| e.to_string())?.with_udp(udp);
        let spec = SinkSpec {
            name: "process-log".into(),
            target: Target::ProcessLog,
            format: Format::Text(template),
            filter: Filter::default(),
        };
        return Ok(vec![Sink::open(spec, config.instance.clone())?]);
    }
    config.logs.iter().map(|spec| Sink::open(spec.clone(), config.instance.clone())).collect()
}
