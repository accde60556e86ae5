//! Issue 26 item 8: what a peer that stops reading costs sluice in memory, measured as the
//! process's RSS, against the bound the README documents for each relay.
//!
//! A backend streams as fast as it can to clients that never read (4 KiB receive buffers);
//! once the streams stall, each session's download lane holds what it read last and
//! could not write. The documented bounds, per stalled direction:
//! - epoll (copy relay): one buffer, at most `buffer_size` (set to 256 KiB here);
//! - io_uring copy: one provided buffer (16 or 256 KiB) out of the worker's rings, whose
//!   memory is counted once for the worker (`engine.ring_buffers`, 64 here: 1 MiB small and
//!   2 MiB large); once the rings are empty, one small pool buffer (64 KiB); a lane that
//!   carried a bulk stream (it filled a large ring buffer) reads inline into pool buffers as
//!   on epoll, so at most `buffer_size`: these downloads are bulk streams;
//! - io_uring splice: a pipe in the kernel (`pipe_size`), next to nothing in user space;
//! - io_uring auto (the `uring` variant): a lane that carried a bulk stream splices from
//!   then on, so these downloads hold a pipe each, as with splice; the rings' memory, which
//!   their first receives touched, is counted once.
//!
//! More stalled sessions than the rings have buffers, so the fallback is measured too.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::{Backend, Config, Driver, Service, Sluice};
use socket2::{Domain, Socket, Type};

const STALLED: usize = 150;
const KIB: u64 = 1024;
/// `buffer_size` of the copy relays here.
const BUFFER_SIZE: u64 = 256 * KIB;
/// What the uring copy relay's rings hold in all at `ring_buffers = 64`.
const RING_BYTES: u64 = 64 * 16 * KIB + 8 * 256 * KIB;
/// A session's own bookkeeping (its slot, session state, timers, the allocator's page for a
/// buffer's header), generously.
const PER_SESSION: u64 = 8 * KIB;

/// A backend that streams to every connection until it breaks, counting what it wrote.
fn firehose(written: Arc<AtomicU64>) -> Backend {
    Backend::spawn(move |mut stream| {
        let chunk = [0x5au8; 16 * 1024];
        while stream.write_all(&chunk).is_ok() {
            written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    })
}

/// A client that reads nothing, with a small receive buffer so that the stream stalls soon.
fn stalled_client(target: std::net::SocketAddr) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&target.into()).expect("connect through sluice");
    s
}

/// The RSS once the streams have stalled: the backend has written nothing more, and the
/// RSS has not grown, for a second (bounded wait).
fn settled_rss_kib(sluice: &Sluice, written: &AtomicU64) -> u64 {
    let until = Instant::now() + Duration::from_secs(60);
    let mut last = (sluice.rss_kib(), written.load(Ordering::Relaxed));
    let mut steady_since = Instant::now();
    while Instant::now() < until && steady_since.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
        let now = (sluice.rss_kib(), written.load(Ordering::Relaxed));
        if now.0 > last.0 || now.1 != last.1 {
            steady_since = Instant::now();
        }
        last = (last.0.max(now.0), now.1);
    }
    assert!(steady_since.elapsed() >= Duration::from_secs(1), "the streams never stalled");
    last.0
}

fn stalled_peers_hold_what_the_readme_says(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    let written = Arc::new(AtomicU64::new(0));
    let backend = firehose(written.clone());
    let config = Config::new(driver)
        .workers(1)
        .engine_key("buffer_size", &format!("\"{} KiB\"", BUFFER_SIZE / KIB))
        .engine_key("ring_buffers", "64")
        .service(Service::new("down", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let target = sluice.addr("down");
    // Warm up: the worker's pools and rings exist, the allocator has its arenas.
    drop((0..4).map(|_| stalled_client(target)).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(500));
    let before = settled_rss_kib(&sluice, &written) * KIB;
    let clients: Vec<Socket> = (0..STALLED).map(|_| stalled_client(target)).collect();
    let after = settled_rss_kib(&sluice, &written) * KIB;
    let grown = after.saturating_sub(before);
    let per_session = grown / STALLED as u64;
    let n = STALLED as u64;
    let bound = match driver {
        Driver::Epoll => n * (BUFFER_SIZE + PER_SESSION),
        Driver::Uring => RING_BYTES + n * PER_SESSION,
        Driver::UringSplice => n * PER_SESSION,
    };
    println!(
        "{driver:?}: {STALLED} stalled sessions grew RSS by {} KiB, {} KiB each (bound {} KiB each)",
        grown / KIB,
        per_session / KIB,
        bound / n / KIB
    );
    assert!(
        grown <= bound,
        "{driver:?}: {STALLED} stalled sessions hold {} KiB, more than the documented {} KiB",
        grown / KIB,
        bound / KIB
    );
    // And the streams did stall inside sluice: it holds bytes for most of them (the copy
    // relay), so the figure measured the case it names.
    if driver == Driver::Epoll {
        assert!(grown >= n * 16 * KIB, "{driver:?}: only {} KiB held; no stall?", grown / KIB);
    }
    drop(clients);
}

sluice_tests::for_each_driver!(stalled_peers_hold_what_the_readme_says);
