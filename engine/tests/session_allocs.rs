//! A session allocates nothing in the worker: accepting, deciding, picking a backend,
//! connecting, relaying and closing reuse what the worker already holds. Allocation churn per
//! connection is what slowly fragments a long-running worker's heap (the soak's RSS drift),
//! and it costs connections per second. Runs on every driver, for plain sessions and for
//! sessions that send a PROXY header, are shaped and capped, are decided on their TLS
//! server name, and (measured, with its own bound) sessions that are captured.
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

use std::sync::Arc;

use sluice_engine::acl::{Action, NamePattern, Rule, RuleSet};
use sluice_engine::capture::{CapturePolicy, CaptureSpec, CaptureStats, Capturer};
use sluice_engine::proxy::Version;
use sluice_engine::shape::{Bandwidth, BandwidthSpec, Rate};
use sluice_engine::tables::{Rules, Service, Tables};
use sluice_engine::testing::{all_allocations, CountingAlloc};
use sluice_engine::DriverChoice;
use sluice_engine::Relay;

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

/// One session: the client sends `opening`, and reads it back from the echo backend after
/// `extra` bytes the proxy sent the backend first (a PROXY header).
fn one_session(target: SocketAddr, opening: &[u8], extra: usize) {
    let mut s = again(|| TcpStream::connect(target)).expect("connect through the engine");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut back = [0u8; 512];
    s.write_all(opening).unwrap();
    let want = opening.len() + extra;
    s.read_exact(&mut back[..want]).expect("echo through the engine");
    assert_eq!(&back[extra..want], opening);
    again(|| s.shutdown(Shutdown::Write)).unwrap();
    assert_eq!(again(|| s.read(&mut back)).unwrap(), 0, "the session closes after the backend");
}

/// What the sessions of a run are like.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    /// The pool sends a PROXY protocol v2 header.
    Proxy,
    /// Shaped (a per-connection and a per-client bandwidth far above what the test moves)
    /// and capped in bytes.
    Shaped,
    /// Decided by a rule on the TLS server name: the client opens with a ClientHello.
    Sni,
    /// Captured to pcapng files.
    Captured,
}

/// Bytes a v2 PROXY header between two IPv4 addresses takes.
const PROXY_V2_IPV4: usize = 28;

/// A TLS ClientHello for `name` (a minimal TLS 1.2 hello with one server name).
fn client_hello(name: &str) -> Vec<u8> {
    let mut ext = vec![0, 0];
    let list_len = (name.len() + 3) as u16;
    ext.extend_from_slice(&(list_len + 2).to_be_bytes());
    ext.extend_from_slice(&list_len.to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name.as_bytes());
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut message = vec![1, 0];
    message.extend_from_slice(&(body.len() as u16).to_be_bytes());
    message.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(message.len() as u16).to_be_bytes());
    record.extend_from_slice(&message);
    record
}

/// The tables for `kind` around `service`, and what its sessions open with and get back
/// first.
fn tables_for(
    kind: Kind,
    mut service: Service,
    capture_dir: &std::path::Path,
    capturer: &Mutex<Option<Capturer>>,
) -> Tables {
    match kind {
        Kind::Plain => Tables::new(1, vec![service]),
        Kind::Proxy => {
            service.pool.send_proxy = Some(Version::V2);
            Tables::new(1, vec![service])
        }
        Kind::Shaped => {
            let fast = Some(Rate::bandwidth(1 << 30));
            let spec = BandwidthSpec {
                per_connection: [fast, fast],
                per_client: [fast, fast],
                ..BandwidthSpec::default()
            };
            service.bandwidth = Some(Arc::new(Bandwidth::new(spec)));
            service.limits.max_bytes = Some(1 << 40);
            Tables::new(1, vec![service])
        }
        Kind::Sni => {
            let mut deny = Rule::new("no-evil", Action::Deny { reset: false });
            deny.sni = vec![NamePattern::parse("evil.example").unwrap()];
            service.rules = Rules::new(RuleSet::compile(vec![deny]));
            Tables::new(1, vec![service])
        }
        Kind::Captured => {
            let stats = Arc::new(CaptureStats::default());
            let started = Capturer::start(stats).unwrap();
            *capturer.lock().unwrap() = Some(started.clone());
            let spec = CaptureSpec::new(capture_dir.to_path_buf());
            let policy = Arc::new(CapturePolicy::new(spec, Arc::default(), started));
            service.capture = Some(0);
            Tables::new(1, vec![service]).with_captures(vec![policy])
        }
    }
}

/// The count is process-wide: the drivers' tests take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Allocations over [`SESSIONS`] sessions of `kind` after a warm-up.
fn allocations_of(kind: Kind, driver: DriverChoice, relay: Relay) -> u64 {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir()
        .join(format!("sluice-allocs-{}-{kind:?}-{driver:?}-{relay:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let capturer = Mutex::new(None);
    let make = |service| tables_for(kind, service, &dir, &capturer);
    let Some((engine, listen)) =
        common::one_service_with("allocs", echo_backend(), driver, relay, make)
    else {
        panic!("{driver:?} is not available on this kernel");
    };
    let (opening, extra) = match kind {
        Kind::Sni => (client_hello("good.example"), 0),
        Kind::Proxy => (vec![7u8; 64], PROXY_V2_IPV4),
        _ => (vec![7u8; 64], 0),
    };
    for _ in 0..WARM_UP {
        one_session(listen, &opening, extra);
    }
    let before = all_allocations();
    for _ in 0..SESSIONS {
        one_session(listen, &opening, extra);
    }
    engine.drain(Duration::from_secs(2));
    engine.join().unwrap();
    // The capture thread's work for these sessions counts; once it is stopped, it cannot
    // count against the next run.
    if let Some(capturer) = capturer.lock().unwrap().take() {
        capturer.stop(Duration::from_secs(10));
    }
    let made = all_allocations() - before;
    eprintln!("{kind:?} {driver:?}/{relay:?}: {made} allocations over {SESSIONS} sessions");
    let _ = std::fs::remove_dir_all(&dir);
    made
}

fn sessions_allocate_nothing(driver: DriverChoice, relay: Relay) {
    for kind in [Kind::Plain, Kind::Proxy, Kind::Shaped, Kind::Sni] {
        let made = allocations_of(kind, driver, relay);
        assert!(
            made <= ALLOWED,
            "{kind:?} {driver:?}/{relay:?}: {made} allocations over {SESSIONS} sessions"
        );
    }
}

/// A captured session allocates, and is bounded per session so that a change that makes
/// capture allocate per byte is caught. In its worker: the box of its tap, one copy per
/// relayed chunk handed to the capture thread (copy relays) or one shared capture pipe per
/// direction (splice relay), and the channel's blocks (one per 31 messages). In the capture
/// thread, which the count includes: the session's file (its path, handle and write buffer)
/// and the frames it writes. Measured: 72 to 78 per session on every driver.
fn captured_sessions_allocate_a_bounded_amount(driver: DriverChoice, relay: Relay) {
    let made = allocations_of(Kind::Captured, driver, relay);
    let per_session = made as f64 / SESSIONS as f64;
    assert!(
        per_session <= CAPTURE_ALLOWED,
        "{driver:?}/{relay:?}: {per_session:.1} allocations per captured session"
    );
}

/// Allocations allowed per captured session, worker and capture thread together.
const CAPTURE_ALLOWED: f64 = 100.0;

common::every_driver!(sessions_allocate_nothing, captured_sessions_allocate_a_bounded_amount);
