//! What the engine's in-process tests share: the drivers they run on, and an engine on one
//! worker serving one service. Each test binary uses part of it.
#![allow(dead_code, unused_macros)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;

use arc_swap::ArcSwap;
use sluice_engine::balance::{Backend, Pool};
use sluice_engine::events::EventSink;
use sluice_engine::tables::{Service, Tables, Timeouts};
use sluice_engine::Relay;
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
    one_service_with(name, backend, driver, relay, |s| Tables::new(1, vec![s]))
}

/// [`one_service`] with the tables `make` builds around the service.
pub fn one_service_with(
    name: &str,
    backend: SocketAddr,
    driver: DriverChoice,
    relay: Relay,
    make: impl FnOnce(Service) -> Tables,
) -> Option<(Engine, SocketAddr)> {
    let config = EngineConfig { workers: 1, pin: false, driver, relay, ..EngineConfig::default() };
    one_service_on(name, backend, config, make)
}

/// [`one_service_with`] on an engine configured as `config` says.
pub fn one_service_on(
    name: &str,
    backend: SocketAddr,
    config: EngineConfig,
    make: impl FnOnce(Service) -> Tables,
) -> Option<(Engine, SocketAddr)> {
    let driver = config.driver;
    let listen = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pool = Pool::new(vec![Backend::new(backend)]);
    let service = Service::new(name, vec![listen], pool, Timeouts::default());
    let published = Arc::new(ArcSwap::from_pointee(make(service)));
    let (sink, records) = EventSink::bounded(1 << 16);
    thread::spawn(move || while records.recv().is_ok() {});
    match Engine::start(&config, published, sink) {
        Ok(engine) => Some((engine, listen)),
        Err(EngineError::DriverUnavailable { reason, .. }) => {
            sluice_tests::uring_unavailable(&format!("{driver:?} unavailable: {reason}"));
            None
        }
        Err(e) => panic!("engine did not start: {e}"),
    }
}

/// Every driver and relay the engine's tests run on.
pub const DRIVERS: [(DriverChoice, Relay); 3] = [
    (DriverChoice::Epoll, Relay::Copy),
    (DriverChoice::Uring, Relay::Copy),
    (DriverChoice::Uring, Relay::Splice),
];

/// One test per driver and relay for each function named (`fn name(DriverChoice, Relay)`),
/// in modules `epoll`, `uring` and `uring_splice`.
macro_rules! every_driver {
    ($($name:ident),+ $(,)?) => {
        mod epoll {
            $(#[test]
            fn $name() {
                super::$name(sluice_engine::DriverChoice::Epoll, sluice_engine::Relay::Copy)
            })+
        }

        mod uring {
            $(#[test]
            fn $name() {
                super::$name(sluice_engine::DriverChoice::Uring, sluice_engine::Relay::Copy)
            })+
        }

        mod uring_splice {
            $(#[test]
            fn $name() {
                super::$name(
                    sluice_engine::DriverChoice::Uring,
                    sluice_engine::Relay::Splice,
                )
            })+
        }
    };
}
#[allow(unused_imports)] // start_holds_fds runs its drivers in turn, without it.
pub(crate) use every_driver;
