//! `Engine::start` returns only once every loop of every worker holds the fds it runs on, so
//! running out of fds the moment the engine is up (a flood of connections under a low
//! RLIMIT_NOFILE) cannot stop a loop from coming up, and the engine still stops cleanly.
//! A worker's UDP loop once created its poller on its own thread after the TCP workers were
//! accepting; under exhaustion it died alone and the engine failed at stop with EMFILE.
//!
//! The test takes every fd away at once by lowering this process's soft RLIMIT_NOFILE to 0
//! (fds already open stay usable), so it is a binary of its own: no other test may run in
//! this process meanwhile. Then it floods the listener with connections made from sockets
//! it opened beforehand: every one completes in the backlog, and each accept fails for want
//! of an fd (counted as an accept backoff). Runs on every driver, one after the other.

use std::fs::File;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

mod common;

/// Connections in the flood: sockets opened before the fds run out, connected after.
const FLOOD: usize = 64;

/// Restores the soft RLIMIT_NOFILE when dropped, whatever the test's outcome.
struct NoFds {
    soft: u64,
    hard: u64,
}

impl NoFds {
    fn take() -> Self {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, 0, hard).expect("setrlimit to 0");
        Self { soft, hard }
    }
}

impl Drop for NoFds {
    fn drop(&mut self) {
        setrlimit(Resource::RLIMIT_NOFILE, self.soft, self.hard).expect("setrlimit back");
    }
}

/// A blocking connect that a signal interrupted goes on in the kernel: asking again says
/// whether it is done (EISCONN), still under way (EALREADY) or failed. Bounded: 200 tries.
fn connect_through_eintr(socket: &Socket, to: std::net::SocketAddr) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match socket.connect(&to.into()) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && tries < 200 => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EALREADY) && tries < 200 => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EISCONN) => return Ok(()),
            other => return other,
        }
        tries += 1;
    }
}

#[test]
fn an_engine_out_of_fds_from_its_first_moment_stops_cleanly() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    for (driver, relay) in common::DRIVERS {
        let addr = backend.local_addr().unwrap();
        let Some((engine, listen)) = common::one_service("held", addr, driver, relay) else {
            continue;
        };
        // Blocking connects bounded by SO_SNDTIMEO: poll(2), which a connect timeout would
        // use, refuses to run under a limit of 0 (EINVAL).
        let flood: Vec<Socket> = (0..FLOOD)
            .map(|_| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
                socket.set_write_timeout(Some(Duration::from_secs(2))).expect("SO_SNDTIMEO");
                socket
            })
            .collect();
        let no_fds = NoFds::take();
        let refused = File::open("/dev/null").map(drop);
        let error = refused.expect_err("no fd can be opened under a limit of 0");
        assert_eq!(error.raw_os_error(), Some(nix::libc::EMFILE), "{error}");
        for (i, socket) in flood.iter().enumerate() {
            let connected = connect_through_eintr(socket, listen);
            connected.unwrap_or_else(|e| panic!("{driver:?}/{relay:?}: connection {i}: {e}"));
        }
        // Every worker's accept fails for want of an fd, and the loops back off.
        let backoffs = || -> u64 {
            engine.stats().iter().map(|s| s.accept_backoffs.load(Ordering::Relaxed)).sum()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while backoffs() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = backoffs();
        engine.drain(Duration::ZERO);
        let stopped = engine.join();
        drop(no_fds);
        drop(flood);
        if let Err(e) = stopped {
            panic!("{driver:?}/{relay:?}: engine failed out of fds: {e}");
        }
        assert!(seen > 0, "{driver:?}/{relay:?}: the flood met no accept backoff");
    }
}
