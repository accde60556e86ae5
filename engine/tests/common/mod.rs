//! What the engine's in-process tests share: an engine on one worker serving one service.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;

use arc_swap::ArcSwap;
use sluice_engine::balance::{Backend, Pool};
use sluice_engine::events::EventSink;
use sluice_engine::tables::{Service, Tables, Timeouts};
use sluice_engine::worker::Relay;
use sluice_engine::{DriverChoice, Engine, EngineConfig, EngineError};

/// Starts one worker on `driver` and `relay` with a single service forwarding to `backend`;
/// returns the engine and the address the service listens on, or `None` (with a note) when
/// this kernel lacks the driver. Records are drained as they come, which allocates nothing.
pub fn one_service(
    name: &str,
    backend: SocketAddr,
    driver: DriverChoice,
    relay: Relay,
) -> Option<(Engine, SocketAddr)> {
    let listen = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pool = Pool::new(vec![Backend::new(backend)]);
    let service = Service::new(name, vec![listen], pool, Timeouts::default());
    let published = Arc::new(ArcSwap::from_pointee(Tables::new(1, vec![service])));
    let (sink, records) = EventSink::bounded(1 << 16);
    thread::spawn(move || while records.recv().is_ok() {});
    let config = EngineConfig { workers: 1, pin: false, driver, relay, ..EngineConfig::default() };
    match Engine::start(&config, published, sink) {
        Ok(engine) => Some((engine, listen)),
        Err(EngineError::DriverUnavailable { reason, .. }) => {
            eprintln!("skipped: {driver:?} unavailable: {reason}");
            None
        }
        Err(e) => panic!("engine did not start: {e}"),
    }
}
