//! Traffic shaping and session limits, end to end on every driver: shaped streams move at
//! their configured rate (each direction on its own), sessions under a shared budget get
//! equal shares, limits per client address, per client network and per time refuse the
//! next session with reason `limit` (counted in /metrics), the byte cap and the maximum
//! duration cut sessions with their own reasons, and a reload changes limits for new
//! sessions while the counts of open ones carry over.
//!
//! Rates are measured by the client over a window that starts after a warm-up second, so
//! the bucket's initial burst is not counted; every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, drain, set_timeouts, Backend, Config, Driver, End, Reload, Service, SessionKey, Sluice,
};
use socket2::{Domain, Socket, Type};

const WARMUP: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(4);
const RECORD: Duration = Duration::from_secs(10);

/// A backend that writes zeros as fast as the session takes them, until the client goes.
fn firehose() -> Backend {
    Backend::spawn(|mut stream| {
        let chunk = vec![0u8; 64 * 1024];
        while stream.write_all(&chunk).is_ok() {}
    })
}

/// A firehose that starts once the client has sent a byte: a session cut within
/// milliseconds must not be cut before the client's connect() has returned (a reset that
/// arrives first turns the connect itself into ECONNRESET).
fn firehose_on_request() -> Backend {
    Backend::spawn(|mut stream| {
        let mut request = [0u8; 1];
        if stream.read_exact(&mut request).is_err() {
            return;
        }
        let chunk = vec![0u8; 64 * 1024];
        while stream.write_all(&chunk).is_ok() {}
    })
}

/// A backend that reads everything and adds, per read, the bytes that arrived inside the
/// measuring window of its connection (which opens `WARMUP` after the first byte).
fn measuring_sink(window_bytes: Arc<AtomicU64>) -> Backend {
    Backend::spawn(move |mut stream| {
        let mut buf = vec![0u8; 64 * 1024];
        let mut first: Option<Instant> = None;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                return;
            }
            let start = *first.get_or_insert_with(Instant::now);
            let age = start.elapsed();
            if age >= WARMUP && age < WARMUP + WINDOW {
                window_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    })
}

/// Reads `stream` for `WARMUP + WINDOW` and returns the rate seen in the window, in bytes
/// per second.
fn measure_download(mut stream: TcpStream) -> f64 {
    set_timeouts(&stream, Duration::from_secs(2));
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut in_window = 0u64;
    loop {
        let n = stream.read(&mut buf).expect("the shaped stream keeps coming");
        assert!(n > 0, "the shaped stream ended early");
        let age = start.elapsed();
        if age >= WARMUP + WINDOW {
            break;
        }
        if age >= WARMUP {
            in_window += n as u64;
        }
    }
    in_window as f64 / WINDOW.as_secs_f64()
}

fn assert_near(what: &str, measured: f64, expected: f64, tolerance: f64) {
    let error = (measured - expected).abs() / expected;
    assert!(
        error <= tolerance,
        "{what}: measured {measured:.0} B/s, configured {expected:.0} B/s ({:.1}% off, {:.0}% allowed)",
        error * 100.0,
        tolerance * 100.0
    );
}

/// Shaped streams keep to their rate within 5%, each direction on its own budget: a slow
/// download, a faster download, and an upload shaped while its download is not.
fn shaped_streams_move_at_their_configured_rate(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let source = firehose();
    let uploaded = Arc::new(AtomicU64::new(0));
    let sink = measuring_sink(uploaded.clone());
    let config = Config::new(driver)
        .service(
            Service::new("slow", &[source.addr()])
                .key(r#"bandwidth_down = { per_connection = "128 KB/s" }"#),
        )
        .service(
            Service::new("fast", &[source.addr()])
                .key(r#"bandwidth = { per_connection = "8 MB/s" }"#),
        )
        .service(
            Service::new("upload", &[sink.addr()])
                .key(r#"bandwidth_up = { per_connection = "2 MB/s" }"#),
        );
    let Some(sluice) = Sluice::start(config) else { return };
    let (slow, fast, up) = (sluice.addr("slow"), sluice.addr("fast"), sluice.addr("upload"));
    let slow = std::thread::spawn(move || measure_download(connect(slow)));
    let fast = std::thread::spawn(move || measure_download(connect(fast)));
    let mut upload = connect(up);
    let deadline = Instant::now() + WARMUP + WINDOW + Duration::from_millis(500);
    let chunk = vec![7u8; 64 * 1024];
    while Instant::now() < deadline {
        upload.write_all(&chunk).expect("the shaped upload keeps going");
    }
    assert_near("128 KB/s download", slow.join().unwrap(), 128_000.0, 0.05);
    assert_near("8 MB/s download", fast.join().unwrap(), 8_000_000.0, 0.05);
    let up_rate = uploaded.load(Ordering::Relaxed) as f64 / WINDOW.as_secs_f64();
    assert_near("2 MB/s upload", up_rate, 2_000_000.0, 0.05);
}

/// Four sessions under one service-wide budget, spread over two workers, each get a quarter
/// of it (within 10%), and together the budget (within 5%).
fn sessions_under_a_shared_budget_get_equal_shares(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let source = firehose();
    let config = Config::new(driver).service(
        Service::new("shared", &[source.addr()]).key(r#"bandwidth_down = { total = "4 MB/s" }"#),
    );
    let Some(sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("shared");
    let readers: Vec<_> =
        (0..4).map(|_| std::thread::spawn(move || measure_download(connect(addr)))).collect();
    let rates: Vec<f64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let total: f64 = rates.iter().sum();
    assert_near("shared total", total, 4_000_000.0, 0.05);
    for (i, &rate) in rates.iter().enumerate() {
        assert_near(&format!("session {i} of 4 ({rates:?})"), rate, 1_000_000.0, 0.10);
    }
}

/// Opens a session from `ip` and proves it reached the backend (a tagged backend's first
/// byte arrives); the stream stays open. The client sends nothing, so a refused session's
/// close is seen as the server meant it.
fn open_from(ip: [u8; 4], addr: SocketAddr) -> Result<TcpStream, (End, SessionKey)> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    let client = socket.local_addr().unwrap().as_socket().unwrap();
    let key = SessionKey { client, listener: addr };
    // A reset can beat the end of the handshake on loopback: the connect itself fails.
    if let Err(e) = socket.connect_timeout(&addr.into(), Duration::from_secs(5)) {
        return Err((End::of(&e), key));
    }
    let mut stream: TcpStream = socket.into();
    set_timeouts(&stream, Duration::from_secs(5));
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(1) => Ok(stream),
        Ok(_) => Err((End::Eof, key)),
        Err(e) => Err((End::of(&e), key)),
    }
}

fn refused_with_limit(sluice: &Sluice, outcome: Result<TcpStream, (End, SessionKey)>, end: End) {
    let (seen, key) = outcome.expect_err("the session should have been refused");
    assert_eq!(seen, end, "how a refused client sees the close");
    let record = sluice.wait_for_session(key, RECORD).expect("a record of the refusal");
    assert_eq!(record.reason, "limit");
    assert_eq!(record.backend, None);
}

/// With two sessions per client and three per /24, the third session of one address and the
/// fourth of the network are refused (closed, reason `limit`, counted per limit); other
/// networks are unaffected; a closed session frees its place.
fn sessions_per_client_and_per_network_are_capped(driver: Driver) {
    let echo = Backend::tagged_echo(1);
    let config = Config::new(driver).admin_tcp().service(
        Service::new("capped", &[echo.addr()])
            .key("limits = { per_client = 2, per_network = 3, network = 24 }"),
    );
    let Some(sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("capped");
    let a = open_from([127, 0, 0, 2], addr).expect("first session of 127.0.0.2");
    let _b = open_from([127, 0, 0, 2], addr).expect("second session of 127.0.0.2");
    refused_with_limit(&sluice, open_from([127, 0, 0, 2], addr), End::Eof);
    let _c = open_from([127, 0, 0, 3], addr).expect("first session of 127.0.0.3");
    refused_with_limit(&sluice, open_from([127, 0, 0, 4], addr), End::Eof);
    let _other_net = open_from([127, 0, 1, 4], addr).expect("another /24 has its own places");
    drop(a);
    let freed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        sluice.admin().stats()["services"][0]["active"].as_u64() == Some(3)
    });
    assert!(freed, "the closed session left");
    let _d = open_from([127, 0, 0, 2], addr).expect("a closed session frees its place");
    let m = sluice.admin().metrics();
    let limited =
        |limit| m.get("sluice_limited_sessions_total", &[("service", "capped"), ("limit", limit)]);
    assert_eq!((limited("per_client"), limited("per_network")), (1.0, 1.0));
}

/// New sessions from one address are throttled to `rate_per_client` after the burst, and
/// the throttled ones are reset (`refuse = "reset"`); the budget comes back with time.
fn new_sessions_per_client_are_throttled(driver: Driver) {
    let echo = Backend::tagged_echo(1);
    let config = Config::new(driver).service(
        Service::new("throttled", &[echo.addr()])
            .key(r#"limits = { rate_per_client = "5/s", rate_burst = 5, refuse = "reset" }"#),
    );
    let Some(sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("throttled");
    let mut refused = Vec::new();
    let attempt = |refused: &mut Vec<_>| match open_from([127, 0, 0, 5], addr) {
        Ok(_) => true,
        Err(outcome) => {
            refused.push(outcome);
            false
        }
    };
    let start = Instant::now();
    let admitted = (0..20).filter(|_| attempt(&mut refused)).count();
    let elapsed = start.elapsed().as_secs_f64();
    // The burst, plus what the rate earned while the attempts ran.
    let most = 5 + (elapsed * 5.0).ceil() as usize;
    assert!((5..=most).contains(&admitted), "{admitted} of 20 admitted in {elapsed:.2} s");
    for (end, key) in refused.drain(..) {
        refused_with_limit(&sluice, Err((end, key)), End::Reset);
    }
    // Another address has its own budget.
    assert!(open_from([127, 0, 0, 6], addr).is_ok());
    std::thread::sleep(Duration::from_millis(1100));
    let later = (0..5).filter(|_| attempt(&mut refused)).count();
    assert!(later >= 4, "{later} of 5 admitted after a second");
}

/// A session that reaches its byte cap is cut (reset) having relayed exactly the cap; one
/// that reaches its maximum duration is cut then, whatever its traffic.
fn byte_cap_and_maximum_duration_cut_sessions(driver: Driver) {
    let source = firehose_on_request();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .service(
            Service::new("capped", &[source.addr()]).key(r#"limits = { max_bytes = "100 KB" }"#),
        )
        .service(Service::new("brief", &[echo.addr()]).key(r#"limits = { max_duration = "1s" }"#));
    let Some(sluice) = Sluice::start(config) else { return };
    let mut stream = connect(sluice.addr("capped"));
    let key = SessionKey::of(&stream);
    stream.write_all(b"g").unwrap();
    let got = drain(&mut stream);
    // The cap counts both directions: the request byte up, then 99,999 bytes down.
    assert!(got.bytes <= 99_999, "the client got {} bytes past the cap", got.bytes);
    assert_eq!(got.end, End::Reset, "a cut session ends with a reset");
    let record = sluice.wait_for_session(key, RECORD).expect("a record of the capped session");
    let counted = (record.reason.as_str(), record.bytes_up, record.bytes_down);
    assert_eq!(counted, ("byte_cap", 1, 99_999));

    let start = Instant::now();
    let mut stream = connect(sluice.addr("brief"));
    let key = SessionKey::of(&stream);
    set_timeouts(&stream, Duration::from_secs(5));
    // Traffic does not extend it.
    for _ in 0..4 {
        stream.write_all(b"ping").unwrap();
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let end = drain(&mut stream);
    let lasted = start.elapsed();
    assert_eq!(end.end, End::Reset);
    assert!(
        lasted >= Duration::from_millis(950) && lasted < Duration::from_millis(2500),
        "cut after {lasted:?}"
    );
    let record = sluice.wait_for_session(key, RECORD).expect("a record of the brief session");
    assert_eq!(record.reason, "max_duration");
}

/// A reload that raises `per_client` admits new sessions at once; sessions opened before it
/// still hold their places. The new limit is a fleet-wide 6 split over `fleet_size = 2`
/// instances: this instance's share is 3.
fn a_reload_changes_limits_for_new_sessions(driver: Driver) {
    let echo = Backend::tagged_echo(1);
    let mut config = Config::new(driver)
        .service(Service::new("web", &[echo.addr()]).key("limits = { per_client = 1 }"));
    let Some(sluice) = Sluice::start(config.clone()) else { return };
    let addr = sluice.addr("web");
    let _a = open_from([127, 0, 0, 7], addr).expect("first session");
    refused_with_limit(&sluice, open_from([127, 0, 0, 7], addr), End::Eof);
    config.service_mut("web").keys = vec!["limits = { per_client = 6, fleet_size = 2 }".into()];
    config.services[0].listen = vec![addr];
    sluice.write_config(&config);
    assert!(matches!(sluice.reload(RECORD), Reload::Applied(_)));
    let _b = open_from([127, 0, 0, 7], addr).expect("admitted under the new limit");
    let _c = open_from([127, 0, 0, 7], addr).expect("admitted under the new limit");
    // The session from before the reload still counts: this is the fourth.
    refused_with_limit(&sluice, open_from([127, 0, 0, 7], addr), End::Eof);
}

sluice_tests::for_each_driver!(
    shaped_streams_move_at_their_configured_rate,
    sessions_under_a_shared_budget_get_equal_shares,
    sessions_per_client_and_per_network_are_capped,
    new_sessions_per_client_are_throttled,
    byte_cap_and_maximum_duration_cut_sessions,
    a_reload_changes_limits_for_new_sessions,
);
