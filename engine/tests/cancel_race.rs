//! RELIABILITY 15, cancel race: thousands of sessions dropped while their accept, connect or
//! relay is in flight, then a shutdown that cuts whatever is left. The process's fd and pipe
//! counts must return to their baseline. Runs on every driver.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sluice_engine::balance::{Backend, Pool};
use sluice_engine::counters::WorkerStats;
use sluice_engine::events::EventSink;
use sluice_engine::tables::{Service, Tables, Timeouts};
use sluice_engine::Relay;
use sluice_engine::{DriverChoice, Engine, EngineConfig, EngineError};
use socket2::{Domain, Socket, Type};

mod common;

const ROUNDS: usize = 4000;

/// The fd counts are per process: the drivers' runs must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fds() -> (usize, usize) {
    let mut all = 0;
    let mut pipes = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        all += 1;
        if std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
        {
            pipes += 1;
        }
    }
    (all, pipes)
}

/// Writes forever to every connection until the peer goes away.
fn streamer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let chunk = [0x5au8; 16 * 1024];
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                while s.write_all(&chunk).is_ok() {}
            });
        }
    });
    addr
}

/// A listener whose accept queue is full, so further SYNs go unanswered: connects hang.
fn blackhole() -> (SocketAddr, Vec<TcpStream>, Socket) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let fillers = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    (addr, fillers, socket)
}

fn service(name: &str, listen: SocketAddr, backend: SocketAddr) -> Service {
    let timeouts = Timeouts { connect: Duration::from_millis(300), ..Timeouts::default() };
    Service::new(name, vec![listen], Pool::new(vec![Backend::new(backend)]), timeouts)
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn abort(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

fn active(engine: &Engine) -> u64 {
    engine.stats().iter().map(|s| WorkerStats::get(&s.active)).sum()
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    done()
}

fn cancel_race(driver: DriverChoice, relay: Relay) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let stream_backend = streamer();
    let (hole, _fillers, _hole_socket) = blackhole();
    let (stream_at, hole_at) = (free_port(), free_port());
    thread::sleep(Duration::from_millis(50));
    let baseline = fds();
    let tables = Tables::new(
        1,
        vec![service("stream", stream_at, stream_backend), service("hole", hole_at, hole)],
    );
    let (sink, _records) = EventSink::bounded(1 << 16);
    let config = EngineConfig { workers: 2, pin: false, driver, relay, ..EngineConfig::default() };
    let engine = match Engine::start(&config, Arc::new(ArcSwap::from_pointee(tables)), sink) {
        Ok(e) => e,
        Err(EngineError::DriverUnavailable { reason, .. }) => {
            sluice_tests::uring_unavailable(&format!("{driver:?} unavailable: {reason}"));
            return;
        }
        Err(e) => panic!("engine did not start: {e}"),
    };
    let clients: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                for i in (t..ROUNDS).step_by(4) {
                    match i % 4 {
                        // Gone before (or while) the accept completes.
                        0 => {
                            if let Ok(s) = TcpStream::connect(stream_at) {
                                abort(s);
                            }
                        }
                        // Reset while bytes flow client -> backend.
                        1 => {
                            if let Ok(mut s) = TcpStream::connect(stream_at) {
                                let _ = s.write_all(&[1u8; 64 * 1024]);
                                abort(s);
                            }
                        }
                        // Reset while bytes flow backend -> client.
                        2 => {
                            if let Ok(mut s) = TcpStream::connect(stream_at) {
                                let mut buf = [0u8; 4096];
                                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                                let _ = s.read(&mut buf);
                                abort(s);
                            }
                        }
                        // Gone while the backend connect hangs.
                        _ => {
                            if let Ok(s) = TcpStream::connect(hole_at) {
                                abort(s);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // Leave sessions in every state in flight, then cut them all with a shutdown.
    let held: Vec<TcpStream> = (0..200)
        .filter_map(|i| TcpStream::connect(if i % 2 == 0 { stream_at } else { hole_at }).ok())
        .collect();
    thread::sleep(Duration::from_millis(100));
    assert!(active(&engine) > 0, "no session in flight before the shutdown");
    engine.drain(Duration::ZERO);
    engine.join().unwrap();
    drop(held);
    let settled = wait_until(Duration::from_secs(10), || fds() == baseline);
    let now = fds();
    assert!(settled, "fds (all, pipes) {now:?} did not return to the baseline {baseline:?}");
}

common::every_driver!(cancel_race);
