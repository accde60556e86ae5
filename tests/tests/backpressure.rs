//! RELIABILITY 6, backpressure: while a client stops reading, a backend streaming 1 GiB is
//! held back by the proxy (its writes block) and the proxy's memory stays within a fixed
//! bound; once the client reads again, every byte arrives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, drain, hex, Backend, Config, Driver, End, Service, SessionKey, Sluice,
};

const GIB: u64 = 1 << 30;
const SEED: u64 = 66;
/// How long the client does not read.
const PAUSE: Duration = Duration::from_secs(3);
/// Most the proxy's RSS may grow over its baseline for this one connection.
const RSS_BOUND_KIB: u64 = 8 * 1024;
/// Most the backend may write during the second half of the pause (the writes must block).
const STALLED_BOUND: u64 = 1 << 20;

/// The client pauses 3 s before reading a 1 GiB stream: sluice's RSS grows less than
/// 8 MiB, the backend's progress stops, and then the client gets exactly 1 GiB with the
/// backend's SHA-256, followed by EOF; logged `bytes_down` = 1 GiB.
fn paused_reader_bounds_memory_then_gets_every_byte(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    let written = Arc::new(AtomicU64::new(0));
    let (backend, digests) = Backend::streams(SEED, GIB, written.clone());
    let config = Config::new(driver).workers(1).service(Service::new("stream", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let baseline = sluice.rss_kib();

    let mut client = connect(sluice.addr("stream"));
    let key = SessionKey::of(&client);
    let paused = Instant::now();
    let mut peak = baseline;
    let mut mid_pause = None;
    while paused.elapsed() < PAUSE {
        std::thread::sleep(Duration::from_millis(50));
        peak = peak.max(sluice.rss_kib());
        if mid_pause.is_none() && paused.elapsed() >= PAUSE / 2 {
            mid_pause = Some(written.load(Ordering::Relaxed));
        }
    }
    let at_mid = mid_pause.expect("sampled at mid-pause");
    let at_end = written.load(Ordering::Relaxed);
    println!(
        "rss baseline {baseline} KiB, peak {peak} KiB; backend wrote {at_mid} then {at_end} bytes"
    );
    assert!(
        peak - baseline < RSS_BOUND_KIB,
        "sluice's RSS grew by {} KiB while the client paused (bound {RSS_BOUND_KIB} KiB)",
        peak - baseline
    );
    assert!(at_end > 0, "the backend wrote nothing");
    assert!(
        at_end - at_mid < STALLED_BOUND,
        "the backend kept writing during the pause: {at_mid} -> {at_end} bytes"
    );

    let received = drain(&mut client);
    let sent = digests.first(Duration::from_secs(10)).expect("the backend did not finish");
    assert_eq!((received.bytes, received.end), (GIB, End::Eof));
    assert_eq!(hex(&received.sha256), hex(&sent), "the stream arrived altered");
    drop(client);
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!((record.bytes_down, record.reason.as_str()), (GIB, "backend_fin"));
}

sluice_tests::for_each_driver!(paused_reader_bounds_memory_then_gets_every_byte);
