//! `sluice run`: the control thread. It starts the engine on the compiled tables, then owns
//! the configuration, the signals and the record channel:
//!
//! - SIGHUP or `POST /reload` re-reads the file; a valid file is published (listeners
//!   diffed by the engine), an invalid one is logged with file, line and key, counted, and
//!   the running tables stay in force;
//! - SIGTERM/SIGINT drain gracefully for `shutdown_timeout`; a second one cuts at once;
//! - every session record is logged by a log thread.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use sluice_engine::events::{EventSink, DEFAULT_EVENT_QUEUE};
use sluice_engine::{Engine, EngineError};

use crate::admin::{Admin, ControlRequest};
use crate::config::{Config, Registry, EMBEDDED_NAME};
use crate::discovery::{self, Discovery};
use crate::health::Checker;
use crate::metrics::Shared;
use crate::records::{Template, PROCESS_LOG_TEMPLATE, PROCESS_LOG_UDP_TEMPLATE};
use crate::sinks::{self, Filter, Format, LogCommand, Sink, SinkSpec, Target};
use sluice_engine::tables::Protocol;

/// How often the control thread checks for signals and worker exits.
const TICK: Duration = Duration::from_millis(50);

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
}

/// Starts the engine for `config` and runs the control loop until a graceful stop.
pub fn run(path: Option<PathBuf>, mut config: Config) -> Result<(), RunError> {
    let mut discovery = Discovery::default();
    discovery.resolve_now(&mut config);
    let mut registry = Registry::default();
    let tables = Arc::new(ArcSwap::from_pointee(config.tables(1, &mut registry)));
    let (sink, records) = EventSink::bounded(DEFAULT_EVENT_QUEUE);
    let mut signals =
        Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1]).map_err(RunError::Signals)?;
    let log_sinks = open_sinks(&config).map_err(RunError::Setup)?;
    let sink_counters = log_sinks.iter().map(Sink::counters).collect();
    let engine = Engine::start(&config.engine, tables.clone(), sink.clone())?;
    announce(&config, &engine);
    let checker = Checker::start(tables.clone()).map_err(RunError::Signals)?;
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
    });
    let (requests_tx, requests) = crossbeam_channel::bounded(16);
    let admin = match &config.admin {
        Some(addr) => {
            let admin = Admin::start(addr, shared.clone(), requests_tx.clone());
            let admin =
                admin.inspect_err(|_| engine.drain(Duration::ZERO)).map_err(RunError::Setup)?;
            log::info!("admin API on {addr}");
            Some(admin)
        }
        None => None,
    };
    let (log, log_commands) = crossbeam_channel::unbounded();
    let logger = std::thread::Builder::new()
        .name("sluice-log".into())
        .spawn(move || sinks::run_log_thread(records, log_commands, log_sinks))
        .map_err(RunError::Signals)?;
    let mut control = Control { path, config, registry, engine, shared, log, discovery };
    control.serve(&mut signals, &requests);
    drop(requests_tx);
    drop(checker);
    if let Some(admin) = admin {
        admin.stop();
    }
    let Control { engine, shared, log, registry, .. } = control;
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
    log::info!("stopped");
    Ok(result?)
}

impl Control {
    fn serve(&mut self, signals: &mut Signals, requests: &Receiver<ControlRequest>) {
        let mut draining = false;
        while !self.engine.is_stopped() {
            let answers = self.discovery.answers().clone();
            crossbeam_channel::select! {
                recv(requests) -> request => if let Ok(request) = request { self.answer(request) },
                recv(answers) -> found => if let Ok(found) = found { self.discovered(found) },
                default(TICK) => {}
            }
            self.discovery.tick(&self.config, Instant::now());
            for signal in signals.pending() {
                match signal {
                    SIGHUP => {
                        let _ = self.reload();
                    }
                    SIGUSR1 => {
                        log::info!("SIGUSR1: reopening log files");
                        let _ = self.log.send(LogCommand::Reopen);
                    }
                    _ if draining => {
                        log::warn!("second stop signal: cutting every session now");
                        self.engine.drain(Duration::ZERO);
                    }
                    _ => {
                        let grace = self.config.shutdown_timeout;
                        log::info!("stop signal: draining sessions for up to {grace:?}");
                        self.engine.drain(grace);
                        draining = true;
                    }
                }
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
        }
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
    fn reload(&mut self) -> Result<u64, String> {
        let result = self.try_reload();
        match &result {
            Ok(v) => {
                self.shared.reloads.fetch_add(1, Ordering::Relaxed);
                log::info!("reload: tables version {v} in force");
            }
            Err(message) => {
                self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                for line in message.lines() {
                    log::error!("reload rejected: {line}");
                }
                log::error!("reload rejected: the running configuration stays in force");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<u64, String> {
        let Some(path) = &self.path else {
            return Err("running on the embedded default: there is no file to reload".into());
        };
        let mut next = Config::load(path).map_err(|e| e.to_string())?;
        discovery::carry_over(&self.config, &mut next);
        self.discovery.resolve_now(&mut next);
        let version = self.engine.tables().version + 1;
        let new_sinks = if next.logs != self.config.logs { Some(open_sinks(&next)?) } else { None };
        let change = self
            .engine
            .publish(next.tables(version, &mut self.registry))
            .map_err(|e| e.to_string())?;
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
        if engine_settings_differ(&self.config, &next) {
            log::warn!("reload: [engine] settings changed; they take effect after a restart");
        }
        if self.config.admin != next.admin {
            log::warn!("reload: [admin] changed; it takes effect after a restart");
        }
        let (engine, admin) = (self.config.engine.clone(), self.config.admin.clone());
        self.config = next;
        self.config.engine = engine;
        self.config.admin = admin;
        Ok(version)
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
        || a.max_flows != b.max_flows
        || a.udp_max_datagram != b.udp_max_datagram
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
        let listen: Vec<String> = s.listen.iter().map(|a| a.to_string()).collect();
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
        return Ok(vec![Sink::open(spec)?]);
    }
    config.logs.iter().cloned().map(Sink::open).collect()
}
