//! Issue 22 items 1 and 2, at the edge: in network namespaces the test makes (client,
//! sluice and backend, joined by veth pairs; the backend's route back to the client goes
//! through sluice's namespace, whose policy routing delivers those replies locally, as the
//! README documents), a pool with `source = "client"` connects to its backend from the
//! client's own address and port: the backend sees the client (getpeername), no PROXY
//! header, every byte echoed back exact. A listener bound to the client-side interface
//! serves the client and refuses the same port reached through the backend side; a UDP
//! listener bound to it answers the client and nothing sent through the backend side. And on
//! loopback, `source = "127.0.0.3"` makes backends see 127.0.0.3.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use sluice_tests::{connect, Config, Driver, Netns, Payload, Service, Sluice};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 22, 1, 2);
const SLUICE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 22, 1, 1);
const SLUICE_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 22, 2, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 22, 2, 2);
const PAYLOAD: usize = 3 << 20;

/// A backend that accepts one connection on `listener`, reports its peer address, and
/// echoes every byte until the end of stream.
fn echo_one(listener: TcpListener, peers: mpsc::Sender<SocketAddr>) {
    let (mut stream, peer) = listener.accept().expect("accept");
    let _ = peers.send(peer);
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Sends the payload on a new connection to `addr`, half-closes, and returns what came back
/// and the connection's local address.
fn round_trip(addr: SocketAddr, seed: u64) -> (Vec<u8>, SocketAddr) {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let local = stream.local_addr().unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = std::thread::spawn(move || {
        writer.write_all(&Payload::bytes(seed, PAYLOAD)).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut got).expect("read the echo");
    sent.join().unwrap();
    (got, local)
}

/// Client, sluice and backend namespaces; sluice's has the documented policy routing for
/// replies to foreign (client) addresses coming from the backend side.
fn topology() -> Netns {
    let mut ns = Netns::new();
    for short in ["c", "s", "b"] {
        ns.add(short);
    }
    ns.link("c", "10.22.1.2/24", "s", "10.22.1.1/24");
    ns.link("s", "10.22.2.1/24", "b", "10.22.2.2/24");
    ns.exec("c", &["ip", "route", "add", "default", "via", "10.22.1.1"]);
    // The backend's way back to the client is through sluice.
    ns.exec("b", &["ip", "route", "add", "default", "via", "10.22.2.1"]);
    // Sluice: what arrives from the backends for a foreign address is delivered locally,
    // to the transparent socket that owns it (README, Transparent proxying).
    ns.exec("s", &["ip", "rule", "add", "iif", "s-b", "lookup", "100"]);
    ns.exec("s", &["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]);
    for key in ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
        ns.exec("s", &["sysctl", "-qw", key]);
    }
    ns
}

fn the_backend_sees_the_clients_own_address_and_every_byte(driver: Driver) {
    if !Netns::available() {
        sluice_tests::skip("network namespaces need root and ip");
        return;
    }
    let ns = topology();
    let backend_addr = SocketAddr::from((BACKEND, 9000));
    let (peers, peer) = mpsc::channel();
    let listener = ns.run_in("b", move || TcpListener::bind(backend_addr).expect("bind backend"));
    let server = std::thread::spawn(move || echo_one(listener, peers));

    let listen = SocketAddr::from((SLUICE_CLIENT_SIDE, 8022));
    let on_client_side = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8023));
    let pool = format!(
        "[[pool]]\nname = \"kept\"\nbackends = [\"{backend_addr}\"]\nsource = \"client\"\n"
    );
    let mut service = Service::with_pool("edge", "kept");
    service.listen = vec![listen];
    let mut bound = Service::new("bound", &[backend_addr]).on_interface("s-c");
    bound.listen = vec![on_client_side];
    let config =
        Config::new(driver).in_netns(&ns.name("s")).service(service).service(bound).section(&pool);
    let Some(sluice) = Sluice::start(config) else { return };

    let expected = Payload::bytes(7, PAYLOAD);
    let (got, client) = ns.run_in("c", move || round_trip(listen, 7));
    assert_eq!(client.ip(), IpAddr::V4(CLIENT));
    let seen = peer.recv_timeout(Duration::from_secs(10)).expect("the backend got no connection");
    assert_eq!(seen, client, "the backend sees the client's own address and port");
    assert!(
        got.len() == expected.len() && got == expected,
        "the echo came back altered ({} bytes)",
        got.len()
    );
    server.join().unwrap();

    // The listener bound to the client-side interface: the client reaches it; the same
    // port reached from the backend side (another interface) is not listened on.
    let reached = ns.run_in("c", move || {
        TcpStream::connect_timeout(
            &SocketAddr::from((SLUICE_CLIENT_SIDE, 8023)),
            Duration::from_secs(5),
        )
        .map(drop)
        .map_err(|e| e.kind())
    });
    assert_eq!(reached, Ok(()), "the client side reaches the interface's listener");
    let refused = ns.run_in("b", move || {
        TcpStream::connect_timeout(
            &SocketAddr::from((SLUICE_BACKEND_SIDE, 8023)),
            Duration::from_secs(5),
        )
        .map(drop)
        .map_err(|e| e.kind())
    });
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "another interface is refused");
    drop(sluice);
}

/// `source = "127.0.0.3"`: backend connections leave from that local address.
fn a_local_source_address_is_what_the_backend_sees(driver: Driver) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let (peers, peer) = mpsc::channel();
    let server = std::thread::spawn(move || echo_one(listener, peers));
    let pool = format!(
        "[[pool]]\nname = \"from3\"\nbackends = [\"{backend_addr}\"]\nsource = \"127.0.0.3\"\n"
    );
    let config = Config::new(driver).service(Service::with_pool("local", "from3")).section(&pool);
    let Some(sluice) = Sluice::start(config) else { return };
    let mut client = connect(sluice.addr("local"));
    client.write_all(b"from three").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"from three");
    let seen = peer.recv_timeout(Duration::from_secs(10)).expect("no backend connection");
    assert_eq!(seen.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    server.join().unwrap();
}

/// A UDP listener on the wildcard address bound to the client-side interface: a datagram
/// from the client is forwarded and answered; the same port reached through the backend side
/// (another interface) gets nothing, and nothing reaches the backend from it. UDP runs on
/// the same loop whatever the TCP driver, so this runs once.
fn a_udp_listener_bound_to_an_interface_answers_only_there(driver: Driver) {
    if !Netns::available() {
        sluice_tests::skip("network namespaces need root and ip");
        return;
    }
    let ns = topology();
    let backend_addr = SocketAddr::from((BACKEND, 9001));
    let socket = ns.run_in("b", move || UdpSocket::bind(backend_addr).expect("bind backend"));
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Echoes every datagram until none comes for the timeout; returns what it echoed.
    let backend = std::thread::spawn(move || {
        let mut echoed = Vec::new();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            socket.send_to(&buf[..n], from).unwrap();
            echoed.push(buf[..n].to_vec());
        }
        echoed
    });
    let mut service = Service::udp("dgram", &[backend_addr]).on_interface("s-c");
    service.listen = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8024))];
    let config = Config::new(driver).in_netns(&ns.name("s")).service(service);
    let Some(sluice) = Sluice::start(config) else { return };

    let exchange = |short: &str, to: Ipv4Addr, payload: &'static [u8]| {
        ns.run_in(short, move || {
            let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let to = SocketAddr::from((to, 8024));
            sluice_tests::udp_exchange(&client, to, payload)
        })
    };
    assert_eq!(
        exchange("c", SLUICE_CLIENT_SIDE, b"through s-c").as_deref(),
        Some(&b"through s-c"[..]),
        "the client side is answered"
    );
    assert_eq!(exchange("b", SLUICE_BACKEND_SIDE, b"through s-b"), None, "another interface");
    drop(sluice);
    let echoed = backend.join().unwrap();
    assert_eq!(echoed, vec![b"through s-c".to_vec()], "only the client's datagram was forwarded");
}

sluice_tests::for_each_driver!(
    the_backend_sees_the_clients_own_address_and_every_byte,
    a_local_source_address_is_what_the_backend_sees
);
sluice_tests::driver_independent!(a_udp_listener_bound_to_an_interface_answers_only_there);
