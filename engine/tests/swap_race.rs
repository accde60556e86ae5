//! RELIABILITY 13, swap race: thousands of table publications per second during connection
//! churn. Every session must be decided wholly by one table version: the backend it reached
//! is the one that version names, and its record carries that version. Runs on every driver.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_engine::balance::{Backend, Pool};
use sluice_engine::events::EventSink;
use sluice_engine::tables::{Service, Tables, Timeouts};
use sluice_engine::Relay;
use sluice_engine::{DriverChoice, Engine, EngineConfig, EngineError};

mod common;

const CLIENTS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(3);

/// A backend that answers every connection with its tag byte, then closes.
fn tagged_backend(tag: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(&[tag]);
        }
    });
    addr
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn tables(version: u64, listen: SocketAddr, backend: SocketAddr) -> Tables {
    let service = Service::new(
        "race",
        vec![listen],
        Pool::new(vec![Backend::new(backend)]),
        Timeouts::default(),
    );
    Tables::new(version, vec![service])
}

fn swap_race(driver: DriverChoice, relay: Relay) {
    let backends = [tagged_backend(b'A'), tagged_backend(b'B')];
    let listen = free_port();
    // Odd versions route to A, even versions to B.
    let backend_for = move |v: u64| backends[(v % 2 == 0) as usize];
    let published = Arc::new(ArcSwap::from_pointee(tables(1, listen, backend_for(1))));
    let (sink, records) = EventSink::bounded(1 << 20);
    let config = EngineConfig { workers: 2, pin: false, driver, relay, ..EngineConfig::default() };
    let engine = match Engine::start(&config, published.clone(), sink) {
        Ok(e) => e,
        Err(EngineError::DriverUnavailable { reason, .. }) => {
            sluice_tests::uring_unavailable(&format!("{driver:?} unavailable: {reason}"));
            return;
        }
        Err(e) => panic!("engine did not start: {e}"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, published) = (stop.clone(), published.clone());
        thread::spawn(move || {
            let (mut version, mut retired) = (1, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                let next = Arc::new(tables(version, listen, backend_for(version)));
                if version % 64 == 0 {
                    retired.push(Arc::downgrade(&next));
                }
                published.store(next);
                thread::sleep(Duration::from_micros(200));
            }
            (version, retired)
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let outcome = TcpStream::connect(listen).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut tag = Vec::new();
                        s.read_to_end(&mut tag)?;
                        let _ = s.shutdown(Shutdown::Both);
                        Ok(tag)
                    });
                    match outcome {
                        Ok(tag) if tag.len() == 1 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    thread::sleep(RUN_FOR);
    stop.store(true, Ordering::Relaxed);
    let (swaps, retired) = swapper.join().unwrap();
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.join().unwrap();
        ok += o;
        failed += f;
    }
    engine.drain(Duration::from_secs(2));
    engine.join().unwrap();
    let (mut checked, mut versions) = (0, std::collections::BTreeSet::new());
    for r in records.try_iter().flat_map(|batch| batch.to_vec()) {
        versions.insert(r.tables_version);
        assert_eq!(
            r.backend,
            Some(backend_for(r.tables_version)),
            "session decided by version {} reached the wrong backend",
            r.tables_version
        );
        checked += 1;
    }
    eprintln!(
        "{driver:?}: {swaps} swaps, {ok} sessions ok, {failed} failed, {checked} records checked"
    );
    assert!(swaps > 3000, "only {swaps} swaps in {RUN_FOR:?}");
    // The race needs sessions decided by many versions, of both parities: a worker that kept
    // the tables it started with would decide them all by version 1.
    let odd = versions.iter().filter(|v| *v % 2 == 1).count();
    assert!(versions.len() >= 100, "{ok} sessions decided by {} versions", versions.len());
    assert!(odd > 0 && odd < versions.len(), "versions of one parity only: {versions:?}");
    assert_eq!(failed, 0);
    assert_eq!(checked as u64, ok);
    // Every version but the one in force was freed: no session or worker kept one alive.
    let current = published.load_full();
    let alive =
        retired.iter().filter_map(|w| w.upgrade()).filter(|t| !Arc::ptr_eq(t, &current)).count();
    assert_eq!(alive, 0, "{alive} retired table versions are still referenced");
}

common::every_driver!(swap_race);
