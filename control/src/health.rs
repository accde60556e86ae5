//! Backend health: one thread that runs the active checks of every pool that has them and
//! logs every change of a backend's health, whatever its cause (active checks here,
//! passive ejection by the workers).
//!
//! Each turn it reads the tables in force (so reloads and DNS changes apply at once), runs
//! the checks that are due, at most [`MAX_PARALLEL_CHECKS`] at a time, each bounded by its
//! timeout, and moves a backend down after `fall` consecutive failed checks and up after
//! `rise` consecutive passed ones. State is kept per backend state (shared by every pool
//! that names the address), so it survives reloads exactly as the counters do.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sluice_engine::balance::{HealthCheck, Pool};
use sluice_engine::counters::BackendState;
use sluice_engine::tables::Tables;

use crate::clock;

/// How often the checker looks for due checks and changes of health.
pub const HEALTH_TICK: Duration = Duration::from_millis(100);
/// Most checks run at the same time.
pub const MAX_PARALLEL_CHECKS: usize = 64;

/// What the checker remembers of one backend.
#[derive(Debug)]
struct Tracked {
    state: Arc<BackendState>,
    label: String,
    next_check: Instant,
    passes: u32,
    failures: u32,
    /// Health as last logged.
    was_up: bool,
    was_ejected: bool,
}

/// The running checker; stops when dropped.
#[derive(Debug)]
pub struct Checker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checker {
    pub fn start(tables: Arc<ArcSwap<Tables>>) -> std::io::Result<Checker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-health".into())
            .spawn(move || run(&tables, &flag))?;
        Ok(Checker { stop, thread: Some(thread) })
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(tables: &ArcSwap<Tables>, stop: &AtomicBool) {
    let mut tracked: HashMap<usize, Tracked> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let current = tables.load_full();
        let pools = pools_of(&current);
        let due = collect(&mut tracked, &pools, now);
        let results = run_checks(due);
        for (key, passed) in results {
            if let (Some(t), Some(check)) = (tracked.get_mut(&key), health_of(&pools, key)) {
                record(t, check, passed);
            }
        }
        for t in tracked.values_mut() {
            log_change(t, Instant::now());
        }
        std::thread::sleep(HEALTH_TICK);
    }
}

/// Every pool in the tables with a label for logs: services' own and named pools.
fn pools_of(tables: &Tables) -> Vec<(String, &Pool)> {
    // Named pools first: a service that uses one shares its backend states, and its
    // backends are logged under the pool's name.
    let named = tables.pools.iter().map(|p| (format!("pool {}", p.name), &p.pool));
    let services = tables.services().iter().map(|s| (format!("service {}", s.name), &s.pool));
    named.chain(services).collect()
}

fn key_of(state: &Arc<BackendState>) -> usize {
    Arc::as_ptr(state) as usize
}

/// The checks of the pool a backend state belongs to.
fn health_of<'a>(pools: &'a [(String, &Pool)], key: usize) -> Option<&'a HealthCheck> {
    pools.iter().find_map(|(_, p)| {
        p.health.as_ref().filter(|_| p.backends().iter().any(|b| key_of(&b.state) == key))
    })
}

/// Tracks every backend in force (forgetting the others) and returns the checks due now.
fn collect(
    tracked: &mut HashMap<usize, Tracked>,
    pools: &[(String, &Pool)],
    now: Instant,
) -> Vec<(usize, SocketAddr, HealthCheck)> {
    let mut seen = Vec::new();
    let mut due = Vec::new();
    for (label, pool) in pools {
        for b in pool.backends() {
            let key = key_of(&b.state);
            seen.push(key);
            let t = tracked.entry(key).or_insert_with(|| Tracked {
                state: b.state.clone(),
                label: format!("backend {} of {label}", b.addr),
                next_check: now,
                passes: 0,
                failures: 0,
                was_up: b.state.healthy(),
                was_ejected: b.state.ejected(now),
            });
            let Some(check) = &pool.health else { continue };
            if t.next_check <= now && !due.iter().any(|(k, _, _)| *k == key) {
                t.next_check = clock::after(now, check.interval);
                due.push((key, b.addr, check.clone()));
            }
        }
    }
    tracked.retain(|key, _| seen.contains(key));
    due
}

/// Runs checks in parallel batches; each result is (backend key, passed).
fn run_checks(due: Vec<(usize, SocketAddr, HealthCheck)>) -> Vec<(usize, bool)> {
    let mut results = Vec::with_capacity(due.len());
    for batch in due.chunks(MAX_PARALLEL_CHECKS) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(key, addr, check)| (*key, scope.spawn(move || probe(*addr, check))))
                .collect();
            for (key, h) in handles {
                results.push((key, h.join().unwrap_or(false)));
            }
        });
    }
    results
}

/// One check: connect, then send and read until the expected bytes, all within the timeout.
pub fn probe(addr: SocketAddr, check: &HealthCheck) -> bool {
    let deadline = clock::after(Instant::now(), check.timeout);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, check.timeout) else { return false };
    if !check.send.is_empty() && stream.write_all(&check.send).is_err() {
        return false;
    }
    if check.expect.is_empty() {
        return true;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while seen.len() < 64 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(check.expect.len()).any(|w| w == check.expect.as_slice()) {
            return true;
        }
    }
    false
}

/// Counts a check's result and moves the backend up after `rise` passes, down after
/// `fall` failures in a row.
fn record(t: &mut Tracked, check: &HealthCheck, passed: bool) {
    if passed {
        t.passes += 1;
        t.failures = 0;
        if t.passes >= check.rise && !t.state.healthy() {
            t.state.set_healthy(true);
            // Its checks prove it reachable again: a passive ejection ends with them.
            t.state.end_ejection();
        }
    } else {
        t.failures += 1;
        t.passes = 0;
        if t.state.healthy() && t.failures >= check.fall {
            t.state.set_healthy(false);
        }
    }
}

/// Logs a change of health or of ejection once.
fn log_change(t: &mut Tracked, now: Instant) {
    let (up, ejected) = (t.state.healthy(), t.state.ejected(now));
    if up != t.was_up {
        if up {
            log::info!("health: {} is up (checks passed)", t.label);
        } else {
            log::warn!("health: {} is down (checks failed)", t.label);
        }
        t.was_up = up;
    }
    if ejected != t.was_ejected {
        if ejected {
            log::warn!("health: {} ejected after consecutive connect failures", t.label);
        } else {
            log::info!("health: {} back from ejection", t.label);
        }
        t.was_ejected = ejected;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked() -> Tracked {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Tracked {
            state: Arc::new(BackendState::new(addr)),
            label: "backend".into(),
            next_check: Instant::now(),
            passes: 0,
            failures: 0,
            was_up: true,
            was_ejected: false,
        }
    }

    #[test]
    fn a_backend_goes_down_after_fall_failures_and_up_after_rise_passes() {
        let check = HealthCheck { rise: 2, fall: 3, ..HealthCheck::default() };
        let mut t = tracked();
        for passed in [false, false, true, false, false] {
            record(&mut t, &check, passed);
            assert!(t.state.healthy(), "fewer than 3 failures in a row");
        }
        record(&mut t, &check, false);
        assert!(!t.state.healthy());
        record(&mut t, &check, true);
        assert!(!t.state.healthy(), "one pass is not enough");
        record(&mut t, &check, true);
        assert!(t.state.healthy());
    }

    /// Issue 26 item 3: an interval or timeout too long for the clock panicked the health
    /// thread (`overflow when adding duration to instant`), and checks stopped for good.
    #[test]
    fn intervals_and_timeouts_beyond_the_clock_do_not_panic() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"PONG").unwrap();
        });
        let check = HealthCheck {
            interval: Duration::MAX,
            timeout: Duration::MAX,
            expect: b"PONG".to_vec(),
            ..HealthCheck::default()
        };
        assert!(probe(addr, &check));
        server.join().unwrap();
        let state = Arc::new(BackendState::new(addr));
        let mut pool = Pool::with_algorithm(
            vec![sluice_engine::balance::Backend::with_state(addr, state)],
            sluice_engine::balance::Algorithm::RoundRobin,
        );
        pool.health = Some(check);
        let pools = vec![("pool p".to_string(), &pool)];
        let mut tracked = HashMap::new();
        let now = Instant::now();
        assert_eq!(collect(&mut tracked, &pools, now).len(), 1, "due at once");
        assert!(collect(&mut tracked, &pools, now + Duration::from_secs(86_400)).is_empty());
    }

    #[test]
    fn probes_check_connect_and_expected_bytes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for reply in [&b"+PONG\r\n"[..], b"-ERR\r\n"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 6];
                s.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"PING\r\n");
                s.write_all(reply).unwrap();
            }
        });
        let check = HealthCheck {
            send: b"PING\r\n".to_vec(),
            expect: b"PONG".to_vec(),
            timeout: Duration::from_secs(5),
            ..HealthCheck::default()
        };
        assert!(probe(addr, &check));
        assert!(!probe(addr, &check), "unexpected reply");
        server.join().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(!probe(closed, &HealthCheck::default()), "refused");
    }
}
