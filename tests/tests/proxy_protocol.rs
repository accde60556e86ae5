//! PROXY protocol, end to end: headers sluice sends to backends (v1 and v2, checked byte
//! for byte by a recording backend and understood by a real peer, HAProxy with
//! `accept-proxy`), and headers sluice accepts from a trusted load balancer (the declared
//! source becomes the client for the firewall, the backend and the log; bad, missing and
//! untrusted headers close the session and are counted).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, connect_from, drain, free_addr, Backend, Config, Driver, End, ScratchDir, Service,
    SessionKey, Sluice,
};

const WAIT: Duration = Duration::from_secs(10);
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn pool(name: &str, backend: SocketAddr, version: &str) -> String {
    format!("[[pool]]\nname = {name:?}\nbackends = [\"{backend}\"]\nsend_proxy = {version:?}\n")
}

/// Sends `bytes` (in two writes with a pause between them when `split` is given, so that
/// a header arrives in pieces), shuts down writing, and reads to the end (or to a reset:
/// a session closed before it read what the client sent ends with one).
fn exchange(stream: &mut TcpStream, bytes: &[u8], split: Option<usize>) -> Vec<u8> {
    let cut = split.unwrap_or(bytes.len());
    stream.write_all(&bytes[..cut]).expect("write");
    if cut < bytes.len() {
        std::thread::sleep(Duration::from_millis(100));
        stream.write_all(&bytes[cut..]).expect("write rest");
    }
    let _ = stream.shutdown(Shutdown::Write);
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return back,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return back,
            Err(e) => panic!("read after {} bytes: {e}", back.len()),
        }
    }
}

/// The v2 header for IPv4 addresses, written out by hand.
fn v2_tcp4(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else { panic!("IPv4 only") };
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

/// Each pool's backend gets its header, then exactly the client's bytes: v1 text and v2
/// binary, with the client's address and the listener it reached.
fn sends_v1_and_v2_headers_byte_for_byte(driver: Driver) {
    let (backend, received) = Backend::recorder();
    let config = Config::new(driver)
        .service(Service::with_pool("one", "one"))
        .service(Service::with_pool("two", "two"))
        .section(&pool("one", backend.addr(), "v1"))
        .section(&pool("two", backend.addr(), "v2"));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect(sluice.addr("one"));
    let (me, listener) = (client.local_addr().unwrap(), sluice.addr("one"));
    exchange(&mut client, b"hello", None);
    let mut expected =
        format!("PROXY TCP4 {} {} {} {}\r\n", me.ip(), listener.ip(), me.port(), listener.port())
            .into_bytes();
    expected.extend_from_slice(b"hello");
    assert_eq!(received.wait_for(1, WAIT)[0], expected);

    let mut client = connect(sluice.addr("two"));
    let me = client.local_addr().unwrap();
    exchange(&mut client, b"world", None);
    let mut expected = v2_tcp4(me, sluice.addr("two"));
    expected.extend_from_slice(b"world");
    assert_eq!(received.wait_for(2, WAIT)[1], expected);
}

/// A trusted balancer's header (v1, or v2 arriving in two pieces) is consumed: the backend
/// sees only what follows, announced with the declared addresses; the log names the
/// declared client; and the firewall judges the declared source.
fn accepts_v1_and_v2_from_trusted_sources(driver: Driver) {
    let (backend, received) = Backend::recorder();
    let service =
        Service::with_pool("edge", "out").key("accept_proxy = { from = [\"127.0.0.0/8\"] }");
    let config = Config::new(driver)
        .service(service)
        .section(&pool("out", backend.addr(), "v1"))
        .section("[[firewall]]\nname = \"block\"\naction = \"deny\"\nfrom = [\"192.0.2.66/32\"]\n");
    let Some(sluice) = Sluice::start(config) else { return };
    let listener = sluice.addr("edge");

    let mut client = connect(listener);
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.9 4321 443\r\n";
    let sent = [&header[..], b"hello"].concat();
    exchange(&mut client, &sent, None);
    assert_eq!(received.wait_for(1, WAIT)[0], sent, "the declared addresses go on to the backend");
    let declared = SessionKey { client: "192.0.2.7:4321".parse().unwrap(), listener };
    let record = sluice.wait_for_session(declared, WAIT).expect("a record for the declared client");
    assert_eq!((record.bytes_up, record.reason.as_str()), (5, "client_fin"));

    let (src, dst): (SocketAddr, SocketAddr) =
        ("[2001:db8::7]:4321".parse().unwrap(), "[2001:db8::9]:443".parse().unwrap());
    let mut v2 = V2_SIGNATURE.to_vec();
    v2.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
    for a in [src, dst] {
        let SocketAddr::V6(a) = a else { unreachable!() };
        v2.extend_from_slice(&a.ip().octets());
    }
    v2.extend_from_slice(&[0x10, 0xe1, 0x01, 0xbb]);
    let mut client = connect(listener);
    exchange(&mut client, &[&v2[..], b"world"].concat(), Some(10));
    let expected = b"PROXY TCP6 2001:db8::7 2001:db8::9 4321 443\r\nworld".to_vec();
    assert_eq!(received.wait_for(2, WAIT)[1], expected);

    let mut client = connect(listener);
    let back = exchange(&mut client, b"PROXY TCP4 192.0.2.66 198.51.100.9 1 443\r\nx", None);
    assert!(back.is_empty());
    let blocked = SessionKey { client: "192.0.2.66:1".parse().unwrap(), listener };
    let record = sluice.wait_for_session(blocked, WAIT).expect("a record for the blocked client");
    assert_eq!(record.reason, "denied", "the firewall judged the declared source");
    assert_eq!(received.wait_for(3, Duration::from_millis(300)).len(), 2);
}

/// A bad header, no header (closed at the 2 s PROXY timeout) and a header from an untrusted
/// source each close the session without a byte to the backend, logged `proxy_error` and
/// counted.
fn bad_missing_and_untrusted_headers_close_and_count(driver: Driver) {
    let (backend, _received) = Backend::recorder();
    let service = Service::new("edge", &[backend.addr()])
        .key("accept_proxy = { from = [\"127.0.0.1/32\"] }")
        .key("proxy_timeout = \"2s\"");
    let Some(sluice) = Sluice::start(Config::new(driver).admin_tcp().service(service)) else {
        return;
    };
    let listener = sluice.addr("edge");
    let reason = |key: SessionKey| sluice.wait_for_session(key, WAIT).expect("no record").reason;

    let mut bad = connect(listener);
    let key = SessionKey::of(&bad);
    assert!(exchange(&mut bad, b"GET / HTTP/1.0\r\n\r\n", None).is_empty());
    assert_eq!(reason(key), "proxy_error");

    let mut silent = connect(listener);
    let key = SessionKey::of(&silent);
    let start = Instant::now();
    let outcome = drain(&mut silent);
    let waited = outcome.at - start;
    assert_eq!((outcome.end, outcome.bytes), (End::Eof, 0));
    assert!(waited >= Duration::from_millis(1800) && waited < Duration::from_secs(6), "{waited:?}");
    assert_eq!(reason(key), "proxy_error");

    let mut untrusted = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), listener);
    let key = SessionKey::of(&untrusted);
    let start = Instant::now();
    assert!(exchange(&mut untrusted, b"PROXY TCP4 192.0.2.7 192.0.2.8 1 2\r\n", None).is_empty());
    assert!(start.elapsed() < Duration::from_millis(1500), "not closed at once");
    assert_eq!(reason(key), "proxy_error");

    let metrics = sluice.admin().metrics();
    assert_eq!(metrics.get("sluice_proxy_errors_total", &[("service", "edge")]), 3.0);
    assert_eq!(backend.accepted(), 0, "a backend was contacted");
}

/// HAProxy in front of nothing: a frontend with `accept-proxy` that answers each HTTP
/// request with the client address it was told.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _dir: ScratchDir,
}

impl Haproxy {
    const BINARY: &'static str = "/usr/sbin/haproxy";

    fn start() -> Option<Haproxy> {
        if !sluice_tests::prerequisite(Path::new(Self::BINARY).exists(), Self::BINARY) {
            return None;
        }
        let dir = ScratchDir::new();
        let addr = free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let config = format!(
            "global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\nfrontend fe\n    bind {addr} accept-proxy\n    http-request return status 200 content-type text/plain lf-string \"src=%[src] port=%[src_port]\"\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = Command::new(Self::BINARY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let haproxy = Haproxy { child, addr, _dir: dir };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(haproxy)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What HAProxy says the client was, for one HTTP request sent after `prefix`.
fn haproxy_sees(addr: SocketAddr, prefix: &[u8]) -> (String, SocketAddr) {
    let mut client = connect(addr);
    let me = client.local_addr().unwrap();
    let request = [prefix, b"GET / HTTP/1.0\r\nHost: test\r\n\r\n"].concat();
    let reply = String::from_utf8(exchange(&mut client, &request, None)).expect("utf-8 reply");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_string();
    (body, me)
}

/// A real peer understands both headers: HAProxy with `accept-proxy` reports the client's
/// own address, or, through a trusted balancer's header, the address it declared.
fn a_real_peer_sees_the_client_address(driver: Driver) {
    let Some(haproxy) = Haproxy::start() else { return };
    let config = Config::new(driver)
        .service(Service::with_pool("one", "one"))
        .service(Service::with_pool("two", "two"))
        .service(
            Service::with_pool("edge", "two").key("accept_proxy = { from = [\"127.0.0.0/8\"] }"),
        )
        .section(&pool("one", haproxy.addr, "v1"))
        .section(&pool("two", haproxy.addr, "v2"));
    let Some(sluice) = Sluice::start(config) else { return };
    for name in ["one", "two"] {
        let (seen, me) = haproxy_sees(sluice.addr(name), b"");
        assert_eq!(seen, format!("src={} port={}", me.ip(), me.port()), "send_proxy via {name}");
    }
    let (seen, _) =
        haproxy_sees(sluice.addr("edge"), b"PROXY TCP4 192.0.2.7 198.51.100.9 4321 80\r\n");
    assert_eq!(seen, "src=192.0.2.7 port=4321");
}

sluice_tests::for_each_driver!(
    sends_v1_and_v2_headers_byte_for_byte,
    accepts_v1_and_v2_from_trusted_sources,
    bad_missing_and_untrusted_headers_close_and_count,
    a_real_peer_sees_the_client_address,
);
