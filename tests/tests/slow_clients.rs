//! Slow and idle clients (RELIABILITY.md scenario 7): thousands of silent or trickling
//! connections are closed at the idle timeout, and fresh connections meanwhile keep their
//! latency: p99 within 2x of an unloaded sluice measured in the same rounds.
//!
//! Two sluice processes run side by side with the same configuration; one carries the
//! slow clients. Fresh-connection latency is sampled in rounds that alternate between
//! them, so machine noise falls on both alike, once the loaded one holds every slow
//! session. The drivers take turns: two thousand connections opening in a test running
//! alongside would be noise of another kind.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, raise_fd_limit, set_timeouts, Backend, Config, Driver, Service, Sluice,
};

/// Silent connections.
const SILENT: usize = 1800;
/// Connections that send one byte, at staggered times, then nothing (a 1-byte-per-30 s
/// client, scaled to the idle timeout).
const TRICKLING: usize = 200;
/// The idle timeout of both services.
const IDLE: Duration = Duration::from_secs(6);
/// Sampling rounds per sluice, alternating.
const ROUNDS: usize = 16;
/// Fresh connections per round.
const PER_ROUND: usize = 150;
/// How much later than the idle timeout a session may close (timer rounding, log batch,
/// a busy machine).
const CLOSE_SLACK: Duration = Duration::from_millis(1500);
/// Longest wait for the loaded sluice to hold every slow session before sampling.
const SETTLE: Duration = Duration::from_secs(2);

/// One driver's test at a time.
static TURN: Mutex<()> = Mutex::new(());

fn config(driver: Driver, slow: SocketAddr, echo: SocketAddr) -> Config {
    let idle = format!("{}s", IDLE.as_secs());
    Config::new(driver)
        .workers(2)
        .service(Service::new("slow", &[slow]).idle_timeout(&idle))
        .service(Service::new("rr", &[echo]).idle_timeout(&idle))
}

/// One fresh connection: connect, one byte there and back, close; its latency.
fn fresh(addr: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut s = connect(addr);
    s.write_all(b"x").expect("write");
    let mut b = [0u8];
    s.read_exact(&mut b).expect("echo");
    t.elapsed()
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// Per-round p99 of fresh connections to each address, rounds alternating; the median of
/// the rounds' p99s for each.
fn interleaved_p99(a: SocketAddr, b: SocketAddr) -> (Duration, Duration) {
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        pa.push(p99((0..PER_ROUND).map(|_| fresh(a)).collect()));
        pb.push(p99((0..PER_ROUND).map(|_| fresh(b)).collect()));
    }
    pa.sort();
    pb.sort();
    (pa[ROUNDS / 2], pb[ROUNDS / 2])
}

/// Whether a client saw its session end (FIN or RST) within `timeout`.
fn sees_end(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).expect("set_read_timeout");
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
    }
}

fn slow_clients_are_closed_at_idle_timeout_and_fresh_ones_keep_their_latency(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    raise_fd_limit(20_000);
    let (holder, _held) = Backend::holds();
    let echo = Backend::echo();
    let Some(loaded) = Sluice::start(config(driver, holder.addr(), echo.addr())) else { return };
    let Some(quiet) = Sluice::start(config(driver, holder.addr(), echo.addr())) else { return };
    // Warm-up: fresh connections fill the drivers' bounded pools (spare pipes) as far as
    // sampling will, so that the baseline is what the process returns to.
    for _ in 0..PER_ROUND {
        fresh(loaded.addr("rr"));
    }
    let baseline = loaded.settled_fd_count();
    let slow_addr = loaded.addr("slow");
    let opened = Instant::now();
    let mut slow: Vec<TcpStream> = (0..SILENT + TRICKLING).map(|_| connect(slow_addr)).collect();
    for s in &slow {
        set_timeouts(s, Duration::from_secs(30));
    }
    // Each slow session holds two fds in the loaded sluice (client and backend) once it is
    // set up: sample from then on, with the slow clients there rather than arriving.
    let held = baseline + 2 * (SILENT + TRICKLING);
    while loaded.fd_count() < held && opened.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The trickling ones send their byte while latency is sampled.
    let trickle: Vec<TcpStream> =
        slow[SILENT..].iter().map(|s| s.try_clone().expect("clone")).collect();
    let trickler = std::thread::spawn(move || {
        for mut s in trickle {
            let _ = s.write_all(b"t");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let (p_loaded, p_quiet) = interleaved_p99(loaded.addr("rr"), quiet.addr("rr"));
    trickler.join().expect("trickler");
    let sampled = opened.elapsed();
    println!(
        "fresh-connection p99 (median of {ROUNDS} rounds): {p_loaded:?} with {} slow clients, {p_quiet:?} without; sampled for {sampled:?}",
        SILENT + TRICKLING
    );
    assert!(sampled < IDLE, "sampling outlasted the idle timeout; the load was not there");
    assert!(
        p_loaded <= p_quiet * 2,
        "slow clients raised fresh-connection p99 from {p_quiet:?} to {p_loaded:?}"
    );
    let deadline = opened + IDLE + Duration::from_secs(1) + CLOSE_SLACK;
    for (i, s) in slow.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(sees_end(s, left), "slow client {i} still open past the idle timeout");
    }
    let logged = Instant::now() + Duration::from_secs(5);
    let slow_records = loop {
        let records: Vec<_> =
            loaded.sessions().into_iter().filter(|r| r.service == "slow").collect();
        if records.len() >= SILENT + TRICKLING || Instant::now() >= logged {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(slow_records.len(), SILENT + TRICKLING, "every slow session is recorded");
    for r in &slow_records {
        assert_eq!(r.reason, "idle_timeout", "{r:?}");
        let d = Duration::from_millis(r.duration_ms);
        assert!(d >= IDLE, "closed before the idle timeout: {r:?}");
        assert!(d <= IDLE + Duration::from_secs(1) + CLOSE_SLACK, "closed late: {r:?}");
    }
    let fds = loaded.wait_for_fd_count(baseline, Duration::from_secs(5));
    assert!(fds <= baseline, "fds not back to baseline: {fds} > {baseline}");
}

sluice_tests::for_each_driver!(
    slow_clients_are_closed_at_idle_timeout_and_fresh_ones_keep_their_latency
);
