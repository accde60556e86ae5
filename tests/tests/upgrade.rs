//! RELIABILITY 19, binary upgrade under load. While clients open hundreds of connections a
//! second and long streams run, `sluice upgrade` starts a new process that takes every
//! listening socket over: no connection fails, every stream is echoed byte-exact, the old
//! process exits once its sessions end, and every socket listening on the ports is then held
//! by the new process alone (a socket left behind would swallow connections). A new process
//! whose worker count differs still takes every socket. A new binary that fails (a bad
//! configuration, a binary that exits at once) changes nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_tests::{
    bound_inodes, connect, echo_until, read_exactly, socket_inodes, tagged_exchange,
    tagged_round_trip, try_connect, udp_client, udp_exchange, Adopted, Backend, Config, Driver,
    Payload, Service, Signal, Sluice, Stop, StreamTotals, UdpServer,
};

const TAG: u8 = b'A';
const WORKERS: usize = 2;
/// Load before and after the upgrade.
const LOAD_BEFORE: Duration = Duration::from_millis(1500);
const LOAD_AFTER: Duration = Duration::from_millis(1500);
/// The longest any helper thread of a test runs.
const THREAD_LIMIT: Duration = Duration::from_secs(60);
/// Threads opening short connections, and the pace of each.
const CLIENTS: usize = 2;
const CONNECT_EVERY: Duration = Duration::from_micros(2_500);
/// The rate the clients must reach in total.
const MIN_RATE: f64 = 300.0;
/// Long-lived streams, and what each writes per step.
const STREAMS: usize = 3;
const STREAM_CHUNK: usize = 16 * 1024;
const STREAM_STEP: Duration = Duration::from_millis(10);
/// How long the old process may take to exit once its last session ended.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections checked one by one after an upgrade, each with this much patience: a
/// socket no process accepts on would leave some hanging.
const PROBES: usize = 64;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the short-connection clients saw.
#[derive(Debug, Default)]
struct ShortResults {
    opened: AtomicU64,
    failures: Mutex<Vec<String>>,
}

fn short_client(addr: SocketAddr, id: usize, stop: &Stop, out: &ShortResults) {
    let payload = Payload::bytes(id as u64, 64);
    let started = Instant::now();
    let mut n: u32 = 0;
    while !stop.is_set() {
        let due = started + CONNECT_EVERY * n;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        n += 1;
        let result = try_connect(addr)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|s| tagged_exchange(s, &payload));
        out.opened.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            out.failures.lock().expect("lock").push(e);
        }
    }
}

/// Writes chunks every [`STREAM_STEP`] until `stop`, then SHUT_WR, while reading the echo
/// to its end; returns what was written and what came back (after the tag byte).
fn long_stream(addr: SocketAddr, seed: u64, stop: &Stop) -> (StreamTotals, StreamTotals) {
    let mut stream = connect(addr);
    assert_eq!(read_exactly(&mut stream, 1)[0], TAG);
    echo_until(stream, seed, STREAM_CHUNK, STREAM_STEP, stop)
}

/// Every socket bound to `port` is held by `pid` (by a worker, and once more for a later
/// upgrade); returns how many there are. Called once the old process has exited, so no
/// other process holds them.
fn held_by(pid: u32, port: u16, udp: bool) -> usize {
    let bound = bound_inodes(port, udp);
    let held = socket_inodes(pid);
    for inode in &bound {
        assert!(
            held.contains_key(inode),
            "socket {inode} on port {port} (udp: {udp}) is not held by pid {pid}: {held:?}"
        );
    }
    bound.len()
}

/// `PROBES` connections one after another, each answered within `PROBE_TIMEOUT`.
fn every_connection_is_served(addr: SocketAddr) {
    for i in 0..PROBES {
        let stream = try_connect(addr).unwrap_or_else(|e| panic!("probe {i}: connect: {e}"));
        sluice_tests::set_timeouts(&stream, PROBE_TIMEOUT);
        let tag = tagged_exchange(stream, b"probe").unwrap_or_else(|e| panic!("probe {i}: {e}"));
        assert_eq!(tag, TAG);
    }
}

fn config(driver: Driver, backend: SocketAddr, udp: SocketAddr) -> Config {
    Config::new(driver)
        .workers(WORKERS)
        .shutdown_timeout("30s")
        .service(Service::new("web", &[backend]))
        .service(Service::udp("dns", &[udp]))
        // Session records to stdout (discarded): stderr keeps the upgrade's lines.
        .section("[[log]]\ntype = \"stdout\"\n")
}

/// Under steady new connections and three long streams, `sluice upgrade`: no connection
/// fails, every stream is byte-exact, the old process exits 0, and every socket listening
/// on the TCP and UDP ports is held, once, by the new process, which serves both.
fn upgrade_under_load_loses_nothing(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    let backend = Backend::tagged_echo(TAG);
    let udp_backend = UdpServer::tagged_echo(b'U');
    let Some(mut old) = Sluice::start(config(driver, backend.addr(), udp_backend.addr())) else {
        return;
    };
    let (addr, udp_addr) = (old.addr("web"), old.addr("dns"));
    let before = (bound_inodes(addr.port(), false), bound_inodes(udp_addr.port(), true));
    assert_eq!(before.0.len(), WORKERS);
    let stop = Stop::after(THREAD_LIMIT);
    let short = ShortResults::default();
    let started = Instant::now();
    let (successor, streams) = std::thread::scope(|scope| {
        let _stop_on_exit = stop.guard();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                scope.spawn({
                    let (stop, short) = (&stop, &short);
                    move || short_client(addr, id, stop, short)
                })
            })
            .collect();
        let streams: Vec<_> = (0..STREAMS)
            .map(|i| {
                scope.spawn({
                    let stop = &stop;
                    move || long_stream(addr, 7000 + i as u64, stop)
                })
            })
            .collect();
        std::thread::sleep(LOAD_BEFORE);
        let upgraded = old.upgrade();
        let successor = upgraded.as_ref().ok().map(|&pid| Adopted::new(pid));
        std::thread::sleep(LOAD_AFTER);
        stop.set();
        for c in clients {
            c.join().expect("client");
        }
        let streams: Vec<_> = streams.into_iter().map(|s| s.join().expect("stream")).collect();
        (upgraded.map(|_| successor.expect("adopted")), streams)
    });
    let successor = successor.unwrap_or_else(|e| panic!("sluice upgrade failed: {e}"));
    let elapsed = started.elapsed().as_secs_f64();
    let failures = short.failures.lock().expect("lock");
    let opened = short.opened.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {opened} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(opened as f64 / elapsed >= MIN_RATE, "only {opened} connections in {elapsed:.1}s");
    for (i, (written, received)) in streams.iter().enumerate() {
        assert!(written.bytes > 0, "stream {i} wrote nothing");
        assert_eq!(written, received, "stream {i} was not echoed byte for byte");
    }
    let status = old.wait_exit(EXIT_TIMEOUT).expect("the old process exits once drained");
    assert!(status.success(), "old process: {status}");
    assert_ne!(successor.pid, old.pid());
    // The same sockets, now the new process's alone: none closed, none left behind.
    assert_eq!(bound_inodes(addr.port(), false), before.0, "the TCP sockets changed");
    assert_eq!(bound_inodes(udp_addr.port(), true), before.1, "the UDP sockets changed");
    assert_eq!(held_by(successor.pid, addr.port(), false), WORKERS);
    assert_eq!(held_by(successor.pid, udp_addr.port(), true), WORKERS);
    every_connection_is_served(addr);
    let client = udp_client(Ipv4Addr::LOCALHOST, Duration::from_secs(2));
    let reply =
        udp_exchange(&client, udp_addr, b"after").expect("a UDP reply from the new process");
    assert_eq!(&reply[1..], b"after");
    assert_eq!(old.pid_file_pid(), Some(successor.pid), "the pid file names the new process");
    assert!(successor.terminate(Duration::from_secs(10)), "the new process stops on SIGTERM");
}

/// An upgrade to a new process with fewer workers (2 -> 1), then more (1 -> 3): each takes
/// every socket, so after each the same sockets listen, all held by the new process, and
/// every connection is served.
fn worker_counts_may_change(driver: Driver) {
    let backend = Backend::tagged_echo(TAG);
    let udp_backend = UdpServer::tagged_echo(b'U');
    let mut config = config(driver, backend.addr(), udp_backend.addr());
    let Some(mut old) = Sluice::start(config.clone()) else { return };
    let addr = old.addr("web");
    let sockets = bound_inodes(addr.port(), false);
    let mut current: Option<Adopted> = None;
    for workers in [1, 3] {
        config.workers = workers;
        old.write_config(&config);
        let previous = current.as_ref().map_or(old.pid(), |a| a.pid);
        let pid = old.upgrade().unwrap_or_else(|e| panic!("upgrade to {workers} workers: {e}"));
        let next = Adopted::new(pid);
        assert!(
            sluice_tests::wait_gone(previous, EXIT_TIMEOUT),
            "pid {previous} did not exit after handing over"
        );
        let _ = old.wait_exit(Duration::ZERO);
        assert_eq!(bound_inodes(addr.port(), false), sockets, "{workers} workers: sockets changed");
        let held = socket_inodes(pid);
        assert!(sockets.iter().all(|i| held.contains_key(i)), "{workers} workers: {held:?}");
        every_connection_is_served(addr);
        current = Some(next);
    }
}

/// A configuration that does not load: `sluice upgrade` fails with its file:line error, and
/// the running process serves on, on the same sockets, with the same pid file and fds.
fn a_bad_configuration_changes_nothing(driver: Driver) {
    let backend = Backend::tagged_echo(TAG);
    let udp_backend = UdpServer::tagged_echo(b'U');
    let config = config(driver, backend.addr(), udp_backend.addr());
    let Some(old) = Sluice::start(config.clone()) else { return };
    let addr = old.addr("web");
    tagged_round_trip(addr, b"warm-up");
    let (sockets, fds) = (bound_inodes(addr.port(), false), old.settled_fd_count());
    old.write_config_text(&format!("{}\n[engine.bogus]\n", config.to_toml()));
    let error = old.upgrade().expect_err("an upgrade to a bad configuration fails");
    assert!(error.contains("sluice.toml:") && error.contains("bogus"), "{error}");
    assert!(
        old.wait_for_log("upgrade failed: ", Duration::from_secs(5)).is_some(),
        "the running process logs the failure"
    );
    assert_eq!(old.pid_file_pid(), Some(old.pid()));
    assert_eq!(bound_inodes(addr.port(), false), sockets);
    assert_eq!(old.settled_fd_count(), fds, "the attempt left no fd behind");
    every_connection_is_served(addr);
    // And the next, good attempt succeeds.
    old.write_config(&config);
    let pid = old.upgrade().expect("an upgrade with the configuration fixed");
    let _next = Adopted::new(pid);
}

/// The binary at the running one's path is replaced by a program that exits at once
/// (status 3): SIGUSR2 starts it, it fails, and the running process serves on unchanged.
fn a_binary_that_fails_changes_nothing(driver: Driver) {
    let backend = Backend::tagged_echo(TAG);
    let udp_backend = UdpServer::tagged_echo(b'U');
    let dir = sluice_tests::scratch_dir();
    let copy = dir.join("sluice-installed");
    std::fs::copy(sluice_tests::binary(), &copy).expect("copy the binary");
    let config = config(driver, backend.addr(), udp_backend.addr()).binary(&copy);
    let Some(old) = Sluice::start_in(dir, config) else { return };
    let addr = old.addr("web");
    let sockets = bound_inodes(addr.port(), false);
    // A package upgrade renames the new file over the old one: the same here.
    let next = old.dir().join("sluice-next");
    std::fs::write(&next, "#!/bin/sh\nexit 3\n").expect("write the failing binary");
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&next, &copy).expect("install the failing binary");
    let mark = old.log_mark();
    old.signal(Signal::SIGUSR2);
    let line = old
        .wait_for_log_after(mark, "upgrade failed: ", Duration::from_secs(10))
        .expect("the failure is logged");
    assert!(line.contains("exit status: 3"), "{line}");
    assert_eq!(old.pid_file_pid(), Some(old.pid()));
    assert_eq!(bound_inodes(addr.port(), false), sockets);
    every_connection_is_served(addr);
}

sluice_tests::for_each_driver!(
    upgrade_under_load_loses_nothing,
    worker_counts_may_change,
    a_bad_configuration_changes_nothing,
    a_binary_that_fails_changes_nothing,
);
