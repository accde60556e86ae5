//! Session caps (RELIABILITY.md scenario 9): with a cap of N, connection N+1 waits in the
//! kernel's backlog (it is neither served nor accepted and closed), the first N are
//! unaffected, and accepting resumes within 100 ms of a place freeing up. Both caps are
//! checked: a service's `max_sessions` and the engine-wide one, which two workers share.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sluice_tests::{abort, connect, Backend, Config, Driver, Metrics, Service, Sluice};

/// The cap under test.
const CAP: usize = 4;
/// Connections opened beyond the cap.
const WAITING: usize = 3;
/// How long a waiting connection must stay unanswered (and open) to count as waiting.
const WAIT_CHECK: Duration = Duration::from_millis(300);
/// Accepting must resume within this long of a place freeing up (median of the frees).
const RESUME_BOUND: Duration = Duration::from_millis(100);

/// Sends one byte and reads the echo.
fn round_trip(stream: &mut TcpStream, byte: u8) {
    stream.write_all(&[byte]).expect("write to a served session");
    let mut got = [0u8];
    stream.read_exact(&mut got).expect("echo from a served session");
    assert_eq!(got[0], byte);
}

/// Whether a connection with a byte sent is still waiting: no answer, and not closed.
fn is_waiting(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(WAIT_CHECK)).expect("set_read_timeout");
    let mut got = [0u8];
    match stream.read(&mut got) {
        Ok(0) => panic!("a waiting connection was closed (accept-and-close)"),
        Ok(_) => false,
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => true,
        Err(e) => panic!("a waiting connection failed: {e}"),
    }
}

/// Waits (bounded) for any of `waiting` to get its echo; returns its position.
fn first_served(waiting: &mut [TcpStream], timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    for s in waiting.iter() {
        s.set_nonblocking(true).expect("set_nonblocking");
    }
    let mut got = [0u8];
    while Instant::now() < deadline {
        for (i, s) in waiting.iter_mut().enumerate() {
            match s.read(&mut got) {
                Ok(1) => {
                    s.set_nonblocking(false).expect("set_nonblocking");
                    return Some(i);
                }
                Ok(_) => panic!("a waiting connection was closed"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("a waiting connection failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}

/// Sum of a per-worker metric.
fn per_worker(m: &Metrics, name: &str, workers: usize) -> f64 {
    (0..workers).map(|w| m.get(name, &[("worker", &w.to_string())])).sum()
}

/// Fills the cap through `addrs` (in turn), checks that the next connections wait, that
/// the first ones are unaffected, and that each freed place is taken within the bound.
fn fill_wait_and_resume(sluice: &Sluice, addrs: &[SocketAddr], active: impl Fn(&Metrics) -> f64) {
    let admin = sluice.admin();
    let mut served: Vec<TcpStream> = (0..CAP).map(|i| connect(addrs[i % addrs.len()])).collect();
    for (i, s) in served.iter_mut().enumerate() {
        round_trip(s, i as u8);
    }
    let mut waiting: Vec<TcpStream> =
        (0..WAITING).map(|i| connect(addrs[(CAP + i) % addrs.len()])).collect();
    for s in &mut waiting {
        s.write_all(b"w").expect("a waiting connection takes bytes into its buffer");
    }
    for s in &mut waiting {
        assert!(is_waiting(s), "connection beyond the cap of {CAP} was served");
    }
    let m = admin.metrics();
    assert_eq!(active(&m), CAP as f64, "sessions active at the cap");
    assert_eq!(per_worker(&m, "sluice_worker_sessions_active", 2), CAP as f64);
    assert!(per_worker(&m, "sluice_worker_accept_paused_full_total", 2) >= 1.0);
    for (i, s) in served.iter_mut().enumerate() {
        round_trip(s, 100 + i as u8);
    }
    let mut resumes = Vec::new();
    while !waiting.is_empty() {
        abort(served.remove(0));
        let freed = Instant::now();
        let i = first_served(&mut waiting, Duration::from_secs(5))
            .expect("a waiting connection was served after a place freed up");
        resumes.push(freed.elapsed());
        let mut s = waiting.remove(i);
        round_trip(&mut s, 7);
        served.push(s);
        for s in &mut waiting {
            assert!(is_waiting(s), "only one waiting connection is served per freed place");
        }
    }
    resumes.sort();
    let median = resumes[resumes.len() / 2];
    assert!(median <= RESUME_BOUND, "accepting resumed after {resumes:?} (median {median:?})");
    for s in served {
        abort(s);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while active(&admin.metrics()) > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(active(&admin.metrics()), 0.0, "every place is given back");
}

/// A service's `max_sessions`: connection N+1 waits, the first N are unaffected, accepting
/// resumes within 100 ms of a place freeing up.
fn service_cap_holds_the_next_connection_in_the_backlog(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let echo = Backend::echo();
    let service = Service::new("web", &[echo.addr()]).max_sessions(CAP as u64);
    let config = Config::new(driver).workers(2).admin_tcp().service(service);
    let Some(sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("web");
    fill_wait_and_resume(&sluice, &[addr], |m| {
        m.get("sluice_sessions_active", &[("service", "web")])
    });
}

/// `engine.max_sessions` counts the sessions of every service on every worker together.
fn engine_cap_is_shared_by_services_and_workers(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .workers(2)
        .max_sessions(CAP as u64)
        .admin_tcp()
        .service(Service::new("a", &[echo.addr()]))
        .service(Service::new("b", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let addrs = [sluice.addr("a"), sluice.addr("b")];
    fill_wait_and_resume(&sluice, &addrs, |m| {
        m.get("sluice_sessions_active", &[("service", "a")])
            + m.get("sluice_sessions_active", &[("service", "b")])
    });
}

sluice_tests::for_each_driver!(
    service_cap_holds_the_next_connection_in_the_backlog,
    engine_cap_is_shared_by_services_and_workers
);
