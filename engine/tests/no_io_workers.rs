//! Nothing on a session's path leaves the worker's thread: the kernel completes every ring
//! operation the relay submits in line or from its own poll, and never hands one to an
//! io-wq worker thread (`iou-wrk-*`), which would cost a thread per blocked operation and
//! a cross-thread wake-up per completion. Operations the kernel always punts there (a ring
//! shutdown, a ring splice) must not be used. Runs on every driver.
//!
//! This binary holds this one test, which runs the drivers in turn, so no other rings
//! share the process while it looks.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use sluice_engine::{DriverChoice, Relay};

mod common;

const SESSIONS: usize = 200;

/// Threads of this process whose name says they are io_uring's io-wq workers.
fn io_workers() -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("iou-wrk"))
        .collect()
}

/// An echo backend that ends its side when the client ends its.
fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn sessions_run_on_the_worker_thread_alone(driver: DriverChoice, relay: Relay) {
    let Some((engine, listen)) = common::one_service("echo", echo(), driver, relay) else {
        return;
    };
    let payload = [9u8; 20_000];
    for _ in 0..SESSIONS {
        let mut s = TcpStream::connect(listen).expect("connect through the engine");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&payload).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("the echo and its end");
        assert_eq!(got.len(), payload.len());
    }
    let workers = io_workers();
    engine.drain(Duration::from_secs(2));
    engine.join().unwrap();
    assert!(workers.is_empty(), "{driver:?}/{relay:?}: io-wq threads appeared: {workers:?}");
}

#[test]
fn sessions_run_on_the_worker_thread_alone_on_every_driver() {
    for (driver, relay) in common::DRIVERS {
        sessions_run_on_the_worker_thread_alone(driver, relay);
    }
}
