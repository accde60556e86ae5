//! RELIABILITY 11, reload under load, and the listener diff. SIGHUP every 200 ms for 10 s,
//! the file alternating between routing the service to backend A and to backend B, while
//! clients open more than 500 connections a second and a few long-lived streams run: no
//! connection fails, no stream loses a byte, and every connection opened after a reload is
//! in force (and before the next one begins) is served by that reload's backend. A reload
//! that adds and removes other listeners never touches an unchanged one: its open session
//! keeps relaying and it keeps accepting; the added listener serves, the removed one
//! refuses.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, echo_round_trip, echo_until, read_exactly, tagged_exchange, try_connect, Backend,
    Config, Driver, Payload, Reload, Service, Sluice, Stop, StreamTotals,
};

const A: u8 = b'A';
const B: u8 = b'B';
const RELOAD_EVERY: Duration = Duration::from_millis(200);
const LOAD_FOR: Duration = Duration::from_secs(10);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest any helper thread of a test runs.
const THREAD_LIMIT: Duration = Duration::from_secs(60);
/// Threads opening short connections, and the pace of each.
const CLIENTS: usize = 2;
const CONNECT_EVERY: Duration = Duration::from_micros(2_500);
/// The rate the clients must reach in total.
const MIN_RATE: f64 = 500.0;
/// Long-lived streams, and what each writes per step.
const STREAMS: usize = 3;
const STREAM_CHUNK: usize = 16 * 1024;
const STREAM_STEP: Duration = Duration::from_millis(10);
/// Payload of each short connection.
const SHORT_PAYLOAD: usize = 64;

/// The reloads as the clients see them: `changes` counts every start and end of a reload;
/// `serving` is the tag of the backend in force, `None` while a reload is under way.
#[derive(Debug, Clone, Copy)]
struct Phase {
    changes: u64,
    serving: Option<u8>,
}

/// The tag of the backend that tables version `v` route to: odd versions A, even B.
fn tag_of(version: u64) -> u8 {
    if version % 2 == 1 {
        A
    } else {
        B
    }
}

/// What the short-connection clients saw.
#[derive(Debug, Default)]
struct ShortResults {
    opened: AtomicU64,
    /// Connections decided wholly within one reload's tenure, so with a known backend.
    checked: AtomicU64,
    failures: Mutex<Vec<String>>,
    misrouted: Mutex<Vec<String>>,
}

/// Opens paced short connections until `stop`, checking each against the phase. A
/// connection is checked when the phase was stable as it was opened and unchanged when its
/// answer had come: sluice accepted it after logging that those tables were in force (the
/// tables are stored before that line) and before the next reload began, so the backend
/// of those tables must have served it. The others straddle a swap and may be served by
/// either backend, but must not fail.
fn short_client(sluice: &Sluice, id: usize, phase: &Mutex<Phase>, stop: &Stop, out: &ShortResults) {
    let payload = Payload::bytes(id as u64, SHORT_PAYLOAD);
    let started = Instant::now();
    let mut n: u32 = 0;
    while !stop.is_set() {
        let due = started + CONNECT_EVERY * n;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        n += 1;
        let before = *phase.lock().expect("phase lock");
        let result = try_connect(sluice.addr("web"))
            .map_err(|e| format!("connect: {e}"))
            .and_then(|s| tagged_exchange(s, &payload));
        let after = phase.lock().expect("phase lock").changes;
        out.opened.fetch_add(1, Ordering::Relaxed);
        let tag = match result {
            Ok(tag) => tag,
            Err(e) => {
                out.failures.lock().expect("lock").push(e);
                continue;
            }
        };
        let Some(expected) = before.serving.filter(|_| after == before.changes) else {
            continue;
        };
        out.checked.fetch_add(1, Ordering::Relaxed);
        if tag != expected {
            let message = format!(
                "served by {} while {} was in force (phase {})",
                tag as char, expected as char, before.changes
            );
            out.misrouted.lock().expect("lock").push(message);
        }
    }
}

/// Writes chunks every [`STREAM_STEP`] until `stop`, then SHUT_WR, while reading the echo
/// to its end; returns what was written and what came back (after the tag byte).
fn long_stream(addr: SocketAddr, seed: u64, stop: &Stop) -> (StreamTotals, StreamTotals) {
    let mut stream = connect(addr);
    let tag = read_exactly(&mut stream, 1)[0];
    assert!(tag == A || tag == B, "unknown tag {tag}");
    echo_until(stream, seed, STREAM_CHUNK, STREAM_STEP, stop)
}

/// Rewrites the file and reloads on a [`RELOAD_EVERY`] schedule until [`LOAD_FOR`] has
/// passed, alternating B and A; returns the number of reloads.
fn reload_loop(
    sluice: &Sluice,
    config: &Config,
    backends: [SocketAddr; 2],
    phase: &Mutex<Phase>,
) -> u64 {
    let started = Instant::now();
    let mut version: u64 = 1;
    while started.elapsed() < LOAD_FOR {
        let due = started + RELOAD_EVERY * version as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let next = version + 1;
        let mut text = config.clone();
        text.service_mut("web").backends = vec![backends[usize::from(tag_of(next) == B)]];
        {
            let mut p = phase.lock().expect("phase lock");
            p.changes += 1;
            p.serving = None;
        }
        sluice.write_config(&text);
        assert_eq!(sluice.reload(RELOAD_TIMEOUT), Reload::Applied(next), "reload {next}");
        let mut p = phase.lock().expect("phase lock");
        p.changes += 1;
        p.serving = Some(tag_of(next));
        version = next;
    }
    version - 1
}

/// Under SIGHUP every 200 ms for 10 s, alternating the service between backends A and B:
/// over 500 connections/s with none failed, every connection made within one reload's
/// tenure served by its backend, and each long-lived stream echoed byte-exact.
fn reload_under_load_loses_nothing_and_routes_by_the_tables_in_force(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    let (a, b) = (Backend::tagged_echo(A), Backend::tagged_echo(B));
    let config = Config::new(driver)
        .service(Service::new("web", &[a.addr()]))
        // Session records to stdout (discarded), so that stderr holds the reload lines.
        .section("[[log]]\ntype = \"stdout\"\n");
    let Some(sluice) = Sluice::start(config.clone()) else { return };
    let phase = Mutex::new(Phase { changes: 0, serving: Some(A) });
    let (stop_clients, stop_streams) = (Stop::after(THREAD_LIMIT), Stop::after(THREAD_LIMIT));
    let shorts = ShortResults::default();

    let started = Instant::now();
    let (reloads, streams) = std::thread::scope(|scope| {
        let _guards = (stop_clients.guard(), stop_streams.guard());
        let streams: Vec<_> = (0..STREAMS)
            .map(|i| {
                let (addr, stop) = (sluice.addr("web"), &stop_streams);
                scope.spawn(move || long_stream(addr, 1000 + i as u64, stop))
            })
            .collect();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (sluice, phase, stop, out) = (&sluice, &phase, &stop_clients, &shorts);
                scope.spawn(move || short_client(sluice, i, phase, stop, out))
            })
            .collect();
        let reloads = reload_loop(&sluice, &config, [a.addr(), b.addr()], &phase);
        stop_clients.set();
        clients.into_iter().for_each(|c| c.join().expect("client thread"));
        stop_streams.set();
        let streams: Vec<_> =
            streams.into_iter().map(|s| s.join().expect("stream thread")).collect();
        (reloads, streams)
    });
    let elapsed = started.elapsed();

    let opened = shorts.opened.load(Ordering::Relaxed);
    let checked = shorts.checked.load(Ordering::Relaxed);
    let rate = opened as f64 / elapsed.as_secs_f64();
    println!(
        "{reloads} reloads, {opened} connections ({rate:.0}/s), {checked} checked, in {elapsed:?}"
    );
    let failures = shorts.failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} of {opened} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let misrouted = shorts.misrouted.lock().expect("lock");
    assert!(
        misrouted.is_empty(),
        "{} of {checked} misrouted: {:?}",
        misrouted.len(),
        &misrouted[..misrouted.len().min(5)]
    );
    assert!(reloads >= 45, "only {reloads} reloads in {LOAD_FOR:?}");
    assert!(rate >= MIN_RATE, "{rate:.0} connections/s; expected at least {MIN_RATE}");
    assert!(checked * 2 >= opened, "only {checked} of {opened} connections fell within one tenure");
    for (i, (written, received)) in streams.iter().enumerate() {
        assert!(written.bytes >= 1 << 20, "stream {i} wrote only {} bytes", written.bytes);
        assert_eq!(received, written, "stream {i}: echo differs from what was written");
    }
    assert!(a.accepted() > 0 && b.accepted() > 0, "A got {}, B got {}", a.accepted(), b.accepted());
}

/// Whether a connect to `addr` is refused.
fn refused(addr: SocketAddr) -> bool {
    let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    matches!(attempt, Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// Sessions of an unchanged listener across reloads that add and remove other listeners:
/// its open session relays after each reload and probes to it never fail meanwhile; each
/// added listener serves; each removed one refuses new connections.
fn listener_diff_keeps_unchanged_opens_added_and_closes_removed(driver: Driver) {
    let echo = Backend::echo();
    let keep = Service::new("keep", &[echo.addr()]);
    let first =
        Config::new(driver).service(keep.clone()).service(Service::new("gone", &[echo.addr()]));
    let Some(sluice) = Sluice::start(first.clone()) else { return };
    let keep_addr = sluice.addr("keep");
    let gone_addr = sluice.addr("gone");
    let added = Service::new("added", &[echo.addr()]);
    let second = Config::new(driver).service(keep.clone()).service(added.clone());
    let later = Service::new("later", &[echo.addr()]);
    let third = Config::new(driver).service(keep).service(later.clone());

    let mut open = connect(keep_addr);
    open.write_all(b"before").unwrap();
    assert_eq!(read_exactly(&mut open, 6), b"before");
    let stop = Stop::after(THREAD_LIMIT);
    let probes = std::thread::scope(|scope| {
        let _guard = stop.guard();
        let prober = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.is_set() {
                echo_round_trip(keep_addr, n, 1000);
                n += 1;
            }
            n
        });
        for (version, config, added, removed) in [
            (2, &second, added.listen[0], gone_addr),
            (3, &third, later.listen[0], added.listen[0]),
        ] {
            sluice.write_config(config);
            assert_eq!(sluice.reload(RELOAD_TIMEOUT), Reload::Applied(version));
            let logs = sluice.logs();
            assert!(
                logs.iter().any(|l| l.ends_with(&format!("reload: listening on {added}"))),
                "no `listening on {added}`"
            );
            assert!(
                logs.iter().any(|l| l.ends_with(&format!("reload: closed listener {removed}"))),
                "no `closed listener {removed}`"
            );
            echo_round_trip(added, version, 10_000);
            assert!(
                refused(removed),
                "the removed listener {removed} still accepts after reload {version}"
            );
            let word = format!("after reload {version}");
            open.write_all(word.as_bytes()).unwrap();
            assert_eq!(read_exactly(&mut open, word.len()), word.as_bytes());
        }
        stop.set();
        prober.join().expect("the unchanged listener failed a probe during the reloads")
    });
    assert!(probes > 0, "no probe ran during the reloads");
}

sluice_tests::for_each_driver!(
    reload_under_load_loses_nothing_and_routes_by_the_tables_in_force,
    listener_diff_keeps_unchanged_opens_added_and_closes_removed
);
