//! `sluice run`: the control thread. It starts the engine on the compiled tables, then owns
//! signals and the record channel: SIGHUP reloads the file (an invalid file leaves the
//! running tables in force), SIGTERM/SIGINT drain gracefully (a second one stops at once),
//! and every session record is logged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use sluice_engine::events::{Event, EventSink, DEFAULT_EVENT_QUEUE};
use sluice_engine::{Engine, EngineError};

use crate::config::{Config, Registry, EMBEDDED_NAME};
use crate::logger::rfc3339;

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
}

/// Starts the engine for `config` and runs the control loop until a graceful stop.
pub fn run(path: Option<PathBuf>, config: Config) -> Result<(), RunError> {
    let version = Arc::new(AtomicU64::new(1));
    let mut registry = Registry::default();
    let tables = Arc::new(ArcSwap::from_pointee(config.tables(1, &mut registry)));
    let (sink, records) = EventSink::bounded(DEFAULT_EVENT_QUEUE);
    let mut signals =
        Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1]).map_err(RunError::Signals)?;
    let engine = Engine::start(&config.engine, tables.clone(), sink.clone())?;
    announce(&config, &engine);
    let logger = std::thread::Builder::new()
        .name("sluice-log".into())
        .spawn(move || log_records(records))
        .map_err(RunError::Signals)?;
    let mut current = config;
    let mut draining = false;
    while !engine.is_stopped() {
        for signal in signals.pending() {
            match signal {
                SIGHUP => reload(path.as_ref(), &mut current, &engine, &version, &mut registry),
                SIGUSR1 => log::info!("SIGUSR1: no log files to reopen"),
                _ if draining => {
                    log::warn!("second stop signal: cutting every session now");
                    engine.drain(Duration::ZERO);
                }
                _ => {
                    log::info!(
                        "stop signal: draining sessions for up to {:?}",
                        current.shutdown_timeout
                    );
                    engine.drain(current.shutdown_timeout);
                    draining = true;
                }
            }
        }
        std::thread::sleep(TICK);
    }
    let dropped = sink.dropped();
    drop(sink);
    let result = engine.join();
    let _ = logger.join();
    if dropped > 0 {
        log::warn!("{dropped} session records were dropped because the log queue was full");
    }
    log::info!("stopped");
    Ok(result?)
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
        let backends: Vec<String> = s.backends.iter().map(|a| a.to_string()).collect();
        log::info!("service {} listen={}", s.name, listen.join(","));
        log::info!("service {} backends={}", s.name, backends.join(","));
    }
}

/// Re-reads the file and publishes its tables if it is valid; the old tables stay in
/// force otherwise. Listeners are diffed by the engine; engine settings (workers, driver,
/// pipe size) need a restart and are kept.
fn reload(
    path: Option<&PathBuf>,
    current: &mut Config,
    engine: &Engine,
    version: &AtomicU64,
    registry: &mut Registry,
) {
    let Some(path) = path else {
        log::info!("SIGHUP: running on the embedded default, nothing to reload");
        return;
    };
    let next = match Config::load(path) {
        Ok(next) => next,
        Err(errors) => {
            for e in &errors.0 {
                log::error!("reload rejected: {e}");
            }
            log::error!("reload rejected: the running configuration stays in force");
            return;
        }
    };
    let v = version.load(Ordering::Relaxed) + 1;
    match engine.publish(next.tables(v, registry)) {
        Ok(change) => {
            version.store(v, Ordering::Relaxed);
            registry.retain(&next);
            for addr in &change.added {
                log::info!("reload: listening on {addr}");
            }
            for addr in &change.removed {
                log::info!("reload: closed listener {addr}");
            }
            if engine_settings_differ(current, &next) {
                log::warn!("reload: [engine] settings changed; they take effect after a restart");
            }
            log::info!("reload: tables version {v} in force");
            let engine_settings = current.engine.clone();
            *current = next;
            current.engine = engine_settings;
        }
        Err(e) => {
            log::error!("reload rejected: {e}; the running configuration stays in force");
        }
    }
}

fn engine_settings_differ(a: &Config, b: &Config) -> bool {
    let (a, b) = (&a.engine, &b.engine);
    a.workers != b.workers || a.pin != b.pin || a.driver != b.driver || a.pipe_size != b.pipe_size
}

/// Logs one line per finished session until every worker has gone.
fn log_records(records: Receiver<Event>) {
    for event in records {
        match event {
            Event::Closed(r) => log::info!(
                "session service={} client={} listener={} backend={} start={} duration_ms={} bytes_up={} bytes_down={} reason={} worker={}",
                r.service,
                r.client,
                r.listener,
                r.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
                rfc3339(r.start),
                r.duration.as_millis(),
                r.bytes_up,
                r.bytes_down,
                r.reason,
                r.worker
            ),
        }
    }
}
