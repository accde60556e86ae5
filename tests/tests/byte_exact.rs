//! RELIABILITY 1, byte-exact relay: 1,000 concurrent connections with payloads from 0 B to
//! 64 MiB, half client -> backend (checked by SHA-256 at a sink), half both ways through an
//! echo backend (checked byte for byte at the client), with no failed connection; a 1 GiB
//! stream arrives byte-exact; an IPv6 listener relays the same way.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use sluice_tests::{
    connect, drain, echo_exchange, echo_round_trip, hex, raise_fd_limit, try_connect, Backend,
    Config, Digest, Driver, End, Payload, Service, SessionKey, Sluice,
};

const CONNECTIONS: usize = 1_000;
const MIB: u64 = 1 << 20;
/// Longest wait for the sink's reports once every client has finished.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Payload size of connection `i`: fixed edge cases first (empty, one byte, around the
/// relay buffer size, large), then sizes spread log-uniformly from 1 B to 1 MiB. About
/// 240 MiB in all.
fn size(i: usize) -> u64 {
    const EDGES: [u64; 16] = [
        0,
        0,
        1,
        1,
        65_535,
        65_536,
        65_537,
        131_072,
        64 * MIB,
        64 * MIB,
        16 * MIB,
        16 * MIB,
        4 * MIB,
        4 * MIB,
        MIB + 1,
        MIB - 1,
    ];
    if let Some(&edge) = EDGES.get(i) {
        return edge;
    }
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    let exponent = (h % 2_000) as f64 / 100.0; // 0.0 ..= 19.99
    2f64.powf(exponent) as u64
}

/// What one client did, for the failure report and the log cross-check.
struct Outcome {
    session: SessionKey,
    echo: bool,
    len: u64,
    seed: u64,
}

/// Client `i`: connect, wait for all others to be connected, then transfer. Even clients
/// stream to the sink and expect a clean close; odd ones run an echo exchange.
fn run_client(i: usize, addr: SocketAddr, all_connected: &Barrier) -> Result<Outcome, String> {
    let connected = try_connect(addr);
    all_connected.wait();
    let mut stream = connected.map_err(|e| format!("connect: {e}"))?;
    let session = SessionKey::try_of(&stream).map_err(|e| format!("session key: {e}"))?;
    let (seed, len, echo) = (i as u64 + 1, size(i), i % 2 == 1);
    if echo {
        echo_exchange(stream, seed, len)?;
    } else {
        Payload::new(seed, len).write_to(&mut stream, |_| {}).map_err(|e| format!("write: {e}"))?;
        stream.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
        let rest = drain(&mut stream);
        if (rest.bytes, rest.end) != (0, End::Eof) {
            return Err(format!("after sending, got {} bytes and {:?}", rest.bytes, rest.end));
        }
    }
    Ok(Outcome { session, echo, len, seed })
}

/// 1,000 connections open at once, 0 B to 64 MiB each: every one succeeds; the sink
/// receives exactly the multiset of (length, SHA-256) sent to it; every echo returns
/// exactly what was sent; every session is logged `client_fin` with exact byte counts.
fn thousand_concurrent_connections_relay_every_byte(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    raise_fd_limit(16_384);
    let (sink, received) = Backend::sink();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .service(Service::new("sink", &[sink.addr()]))
        .service(Service::new("echo", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };

    let all_connected = Arc::new(Barrier::new(CONNECTIONS));
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let addr = if i % 2 == 1 { sluice.addr("echo") } else { sluice.addr("sink") };
            let barrier = all_connected.clone();
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || run_client(i, addr, &barrier))
                .expect("spawn client thread")
        })
        .collect();
    let outcomes: Vec<Result<Outcome, String>> = clients
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("client panicked".into())))
        .collect();
    let failures: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().err().map(|e| format!("client {i} ({} B): {e}", size(i))))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(Result::unwrap).collect();

    let to_sink: Vec<&Outcome> = outcomes.iter().filter(|o| !o.echo).collect();
    let mut expected: Vec<(u64, Digest)> =
        to_sink.iter().map(|o| (o.len, Payload::sha256(o.seed, o.len))).collect();
    let got = received.wait_for(to_sink.len(), REPORT_TIMEOUT);
    assert!(
        got.iter().all(|d| d.end == End::Eof),
        "a sink connection did not end with a clean EOF"
    );
    let mut actual: Vec<(u64, Digest)> = got.iter().map(|d| (d.bytes, d.sha256)).collect();
    expected.sort_unstable();
    actual.sort_unstable();
    assert_eq!(
        actual.len(),
        expected.len(),
        "the sink saw {} connections, not {}",
        actual.len(),
        expected.len()
    );
    for (a, e) in actual.iter().zip(&expected) {
        assert!(
            a == e,
            "the sink received ({} B, {}) where ({} B, {}) was sent",
            a.0,
            hex(&a.1),
            e.0,
            hex(&e.1)
        );
    }

    let records = sluice.wait_for_sessions(CONNECTIONS, Duration::from_secs(20));
    let by_key: HashMap<SessionKey, _> = records.iter().map(|r| (r.key(), r)).collect();
    for o in &outcomes {
        let r =
            by_key.get(&o.session).unwrap_or_else(|| panic!("no session line for {:?}", o.session));
        let down = if o.echo { o.len } else { 0 };
        assert_eq!(
            (r.bytes_up, r.bytes_down, r.reason.as_str()),
            (o.len, down, "client_fin"),
            "session of {:?}",
            o.session
        );
    }
}

/// One connection streams 1 GiB to the sink: it receives exactly 1 GiB with the same
/// SHA-256, then a clean EOF.
fn one_gib_stream_arrives_byte_exact(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    const GIB: u64 = 1 << 30;
    let (sink, received) = Backend::sink();
    let config = Config::new(driver).service(Service::new("sink", &[sink.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect(sluice.addr("sink"));
    let key = SessionKey::of(&client);
    let sent = Payload::new(77, GIB).write_to(&mut client, |_| {}).expect("send 1 GiB");
    client.shutdown(Shutdown::Write).unwrap();
    let got = received.first(Duration::from_secs(60)).expect("the sink did not report");
    assert_eq!((got.bytes, got.end), (GIB, End::Eof));
    assert_eq!(hex(&got.sha256), hex(&sent), "the stream arrived altered");
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.bytes_up, GIB);
}

/// A service listening on 127.0.0.1 and [::1]: a 1 MiB echo round trip is exact through
/// each, and the IPv6 session is logged with its IPv6 client and listener.
fn ipv4_and_ipv6_listeners_relay_exactly(driver: Driver) {
    let echo = Backend::echo();
    let service = Service::new("dual", &[echo.addr()]).also_listen(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let Some(sluice) = Sluice::start(Config::new(driver).service(service)) else { return };

    for (i, &addr) in sluice.listen("dual").iter().enumerate() {
        let client = echo_round_trip(addr, 300 + i as u64, MIB);
        let record =
            sluice.wait_for_session(client, Duration::from_secs(5)).expect("no session line");
        assert_eq!(record.listener, addr);
        assert_eq!(record.client.is_ipv6(), addr.is_ipv6());
        assert_eq!((record.bytes_up, record.bytes_down), (MIB, MIB));
    }
}

sluice_tests::for_each_driver!(
    thousand_concurrent_connections_relay_every_byte,
    one_gib_stream_arrives_byte_exact,
    ipv4_and_ipv6_listeners_relay_exactly
);
