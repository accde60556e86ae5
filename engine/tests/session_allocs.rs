//! A session allocates nothing in the worker: accepting, deciding, picking a backend,
//! connecting, relaying and closing reuse what the worker already holds. Allocation churn per
//! connection is what slowly fragments a long-running worker's heap (the soak's RSS drift),
//! and it costs connections per second. Runs on every driver.
//!
//! Allocations are counted for the whole process while sessions run one after another. The
//! test's own client and backend allocate nothing per connection, so what is counted is the
//! engine's; even its record batches are reused (a received batch goes back to its worker),
//! so after warm-up the count is zero. A handful is allowed for one-time growth.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use sluice_engine::sys::alloc::{all_allocations, CountingAlloc};
use sluice_engine::worker::Relay;
use sluice_engine::DriverChoice;

mod common;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const WARM_UP: usize = 300;
const SESSIONS: usize = 3_000;
/// Allocations allowed over all the measured sessions: one-time growth only, none per session.
const ALLOWED: u64 = 10;

/// An echo backend serving one connection at a time on one thread (a thread per connection
/// would allocate).
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 256];
        for mut s in listener.incoming().flatten() {
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    addr
}

/// Retries what a signal interrupted: the engine's rings share this process, and their
/// teardown can interrupt a blocking call of another thread.
fn again<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn one_session(target: SocketAddr) {
    let mut s = again(|| TcpStream::connect(target)).expect("connect through the engine");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (ping, mut back) = ([7u8; 64], [0u8; 64]);
    s.write_all(&ping).unwrap();
    s.read_exact(&mut back).expect("echo through the engine");
    assert_eq!(back, ping);
    again(|| s.shutdown(Shutdown::Write)).unwrap();
    assert_eq!(again(|| s.read(&mut back)).unwrap(), 0, "the session closes after the backend");
}

/// The count is process-wide: the drivers' tests take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sessions_allocate_nothing(driver: DriverChoice, relay: Relay) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((engine, listen)) = common::one_service("allocs", echo_backend(), driver, relay)
    else {
        return;
    };
    for _ in 0..WARM_UP {
        one_session(listen);
    }
    let before = all_allocations();
    for _ in 0..SESSIONS {
        one_session(listen);
    }
    let made = all_allocations() - before;
    eprintln!("{driver:?}/{relay:?}: {made} allocations over {SESSIONS} sessions");
    assert!(made <= ALLOWED, "{driver:?}/{relay:?}: {made} allocations over {SESSIONS} sessions");
    engine.drain(Duration::from_secs(2));
    engine.join().unwrap();
}

common::every_driver!(sessions_allocate_nothing);
