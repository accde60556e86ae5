//! The firewall, end to end: clients bound to 127.0.0.x are allowed, denied (closed without
//! a byte, or reset) and routed to pools by network, by source port and by the listener
//! they reached; time windows decide by the clock; SNI routes a real TLS handshake, passed
//! through untouched, to the backend chosen by name. A denied client never reaches a
//! backend, and every verdict is logged with its rule.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_tests::{drain, free_addr, free_port, tagged_exchange, Backend, Driver, End, Sluice};
use socket2::{Domain, Socket, Type};

const READY: Duration = Duration::from_secs(10);

/// Starts sluice on `body` (services, rules, pools) under `driver`; `None` when the driver
/// cannot run here.
fn start(driver: Driver, body: &str, services: usize) -> Option<(Sluice, PathBuf)> {
    let dir = std::env::temp_dir().join(format!(
        "sluice-fw-{}-{}",
        std::process::id(),
        free_port(loopback())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = format!("[engine]\nworkers = 2\ndriver = {:?}\n", driver.as_str());
    if let Some(relay) = driver.relay() {
        text += &format!("relay = {relay:?}\n");
    }
    text += body;
    let path = dir.join("firewall.toml");
    std::fs::write(&path, text).unwrap();
    let sluice = Sluice::spawn(&["run", "--config", path.to_str().unwrap()]);
    let ready = sluice.wait_for_log(" backends=", READY).is_some()
        && (0..READY.as_millis() / 20).any(|_| {
            let n = sluice.logs().iter().filter(|l| l.contains(" backends=")).count();
            n >= services || {
                std::thread::sleep(Duration::from_millis(20));
                false
            }
        });
    if !ready {
        let logs = sluice.logs().join("\n");
        if logs.contains("driver uring unavailable") {
            sluice_tests::uring_unavailable(&logs);
            return None;
        }
        panic!("sluice did not start:\n{logs}");
    }
    Some((sluice, dir))
}

fn loopback() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// Connects from `source` (a 127.0.0.x address, port 0 for any) to `to`.
fn connect_from(source: SocketAddr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

fn from(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::from((ip, 0))
}

/// The tag of the backend that answered, or how the connection ended without one.
fn exchange(stream: TcpStream) -> Result<u8, End> {
    let mut probe = stream.try_clone().unwrap();
    match tagged_exchange(stream, b"hello through the firewall") {
        Ok(tag) => Ok(tag),
        Err(_) => Err(drain(&mut probe).end),
    }
}

/// A denied client sees its connection end without a single byte: `end` says how. (The
/// client sends nothing first: closing a socket that holds unread bytes makes the kernel
/// reset it, whatever the rule says.)
fn assert_denied(mut stream: TcpStream, end: End) {
    let outcome = drain(&mut stream);
    assert_eq!((outcome.end, outcome.bytes), (end, 0), "a denied client must get no byte");
}

/// Source networks: allow to the default pool, route a network to a named pool, deny by
/// default (clean close), and a global rule that resets; denied clients never reach a
/// backend and each verdict is logged with its rule.
fn source_networks_allow_deny_and_route_to_pools(driver: Driver) {
    let (a, b) = (Backend::tagged_echo(b'A'), Backend::tagged_echo(b'B'));
    let listen = free_addr(loopback());
    let body = format!(
        "[[firewall]]\nname = \"blocked\"\naction = \"deny\"\nreset = true\nfrom = [\"127.0.0.5\"]\n\n\
         [[pool]]\nname = \"office\"\nbackends = [\"{b}\"]\n\n\
         [[service]]\nname = \"fw\"\nlisten = [\"{listen}\"]\nbackends = [\"{a}\"]\ndefault = \"deny\"\n\n\
         [[service.rule]]\nname = \"office-net\"\naction = \"allow\"\npool = \"office\"\nfrom = [\"127.0.0.2/31\"]\n\n\
         [[service.rule]]\nname = \"loopback\"\naction = \"allow\"\nfrom = [\"127.0.0.0/8\"]\nnot_from = [\"127.0.0.4\"]\n",
        a = a.addr(),
        b = b.addr()
    );
    let Some((sluice, _dir)) = start(driver, &body, 1) else { return };
    assert_eq!(exchange(connect_from(from([127, 0, 0, 1]), listen)), Ok(b'A'));
    assert_eq!(exchange(connect_from(from([127, 0, 0, 2]), listen)), Ok(b'B'));
    assert_eq!(exchange(connect_from(from([127, 0, 0, 3]), listen)), Ok(b'B'));
    assert_denied(connect_from(from([127, 0, 0, 4]), listen), End::Eof);
    assert_denied(connect_from(from([127, 0, 0, 5]), listen), End::Reset);
    assert_eq!((a.accepted(), b.accepted()), (1, 2), "a denied client reached a backend");
    let blocked = sluice.wait_for_log("client=127.0.0.5:", READY).expect("no record of 127.0.0.5");
    for field in ["kind=deny", "verdict=deny", "rule=blocked", "reason=denied", "backend=-"] {
        assert!(blocked.contains(field), "missing {field}: {blocked}");
    }
    let default = sluice.wait_for_log("client=127.0.0.4:", READY).expect("no record of 127.0.0.4");
    assert!(default.contains("rule=-") && default.contains("kind=deny"), "{default}");
    let routed = sluice.wait_for_log("client=127.0.0.2:", READY).expect("no record of 127.0.0.2");
    assert!(
        routed.contains("rule=office-net") && routed.contains(&format!("backend={}", b.addr())),
        "{routed}"
    );
}

/// Source ports and listeners: a rule on the client's port and a rule on the listener the
/// client reached deny only what they name.
fn source_ports_and_listeners_select_rules(driver: Driver) {
    let a = Backend::tagged_echo(b'A');
    let (first, second) = (free_addr(loopback()), free_addr(loopback()));
    let port = free_port(loopback());
    let body = format!(
        "[[service]]\nname = \"fw\"\nlisten = [\"{first}\", \"{second}\"]\nbackends = [\"{a}\"]\n\n\
         [[service.rule]]\nname = \"not-second\"\naction = \"deny\"\nto = [\":{p2}\"]\n\n\
         [[service.rule]]\nname = \"not-that-port\"\naction = \"deny\"\nfrom_port = [{port}]\n",
        a = a.addr(),
        p2 = second.port()
    );
    let Some((_sluice, _dir)) = start(driver, &body, 1) else { return };
    assert_eq!(exchange(connect_from(from([127, 0, 0, 1]), first)), Ok(b'A'));
    assert_denied(connect_from(from([127, 0, 0, 1]), second), End::Eof);
    assert_denied(connect_from(SocketAddr::from(([127, 0, 0, 1], port)), first), End::Eof);
    assert_eq!(a.accepted(), 1);
}

/// Time windows in UTC: a window around now matches, one that excludes now does not.
fn time_windows_decide_by_the_clock(driver: Driver) {
    let a = Backend::tagged_echo(b'A');
    let hour = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 3600 % 24;
    let later = format!("{:02}:00-{:02}:00", (hour + 2) % 24, (hour + 3) % 24);
    let (open, closed) = (free_addr(loopback()), free_addr(loopback()));
    let body = format!(
        "[[service]]\nname = \"open\"\nlisten = [\"{open}\"]\nbackends = [\"{a}\"]\n\n\
         [[service.rule]]\nname = \"later\"\naction = \"deny\"\ntime = [\"{later}\"]\ntimezone = \"UTC\"\n\n\
         [[service]]\nname = \"closed\"\nlisten = [\"{closed}\"]\nbackends = [\"{a}\"]\n\n\
         [[service.rule]]\nname = \"all-week\"\naction = \"deny\"\ntime = [\"Mon-Sun 00:00-24:00\"]\ntimezone = \"UTC\"\n",
        a = a.addr()
    );
    let Some((sluice, _dir)) = start(driver, &body, 2) else { return };
    assert_eq!(
        exchange(connect_from(from([127, 0, 0, 1]), open)),
        Ok(b'A'),
        "window {later} matched now"
    );
    assert_denied(connect_from(from([127, 0, 0, 1]), closed), End::Eof);
    assert!(sluice.wait_for_log("rule=all-week", READY).is_some());
}

/// A TLS server on loopback answering with its certificate's name.
struct TlsServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl() -> Option<PathBuf> {
    ["/usr/bin/openssl", "/usr/local/bin/openssl"].iter().map(PathBuf::from).find(|p| p.is_file())
}

fn tls_server(openssl: &Path, dir: &Path, name: &str) -> TlsServer {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let made = Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl could not make a certificate");
    let addr = free_addr(loopback());
    let child = Command::new(openssl)
        .args([
            "s_server",
            "-accept",
            &addr.to_string(),
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ])
        .args(["-www", "-quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Owned at once, so the process is reaped however this function ends.
    let server = TlsServer { child, addr };
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("openssl s_server did not listen on {addr}");
}

/// What a TLS client asking for `name` (or no name) got: the server certificate's subject
/// line and whether the HTTP answer came back through the tunnel.
fn tls_request(openssl: &Path, to: SocketAddr, name: Option<&str>) -> (Option<String>, bool) {
    let mut command = Command::new(openssl);
    command.args(["s_client", "-connect", &to.to_string(), "-ign_eof"]);
    match name {
        Some(n) => command.args(["-servername", n]),
        None => command.arg("-noservername"),
    };
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let _ = child.wait();
    let subject = out.lines().find(|l| l.starts_with("subject=")).map(str::to_string);
    (subject, out.contains("HTTP/1.0 200 ok"))
}

/// SNI: a real TLS handshake is routed by server name to the right backend and passed
/// through untouched (the client sees that backend's certificate and its HTTP answer);
/// unknown or missing names hit the default, which resets.
fn sni_routes_tls_by_name_untouched(driver: Driver) {
    let Some(openssl) = openssl() else {
        sluice_tests::skip("openssl (Debian package openssl) is missing");
        return;
    };
    let dir = std::env::temp_dir().join(format!(
        "sluice-sni-{}-{}",
        std::process::id(),
        free_port(loopback())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (alpha, beta) = (tls_server(&openssl, &dir, "alpha"), tls_server(&openssl, &dir, "beta"));
    let listen = free_addr(loopback());
    let body = format!(
        "[[pool]]\nname = \"alpha\"\nbackends = [\"{a}\"]\n\n[[pool]]\nname = \"beta\"\nbackends = [\"{b}\"]\n\n\
         [[service]]\nname = \"tls\"\nlisten = [\"{listen}\"]\nbackends = [\"{a}\"]\ndefault = \"reject\"\n\n\
         [[service.rule]]\nname = \"a\"\naction = \"allow\"\npool = \"alpha\"\nsni = [\"a.example.com\"]\n\n\
         [[service.rule]]\nname = \"b\"\naction = \"allow\"\npool = \"beta\"\nsni = [\"*.b.example.com\"]\n",
        a = alpha.addr,
        b = beta.addr
    );
    let Some((sluice, _dir)) = start(driver, &body, 1) else { return };
    let (subject, answered) = tls_request(&openssl, listen, Some("a.example.com"));
    assert!(
        subject.as_deref().is_some_and(|s| s.contains("alpha")) && answered,
        "a.example.com: {subject:?} {answered}"
    );
    let (subject, answered) = tls_request(&openssl, listen, Some("www.b.example.com"));
    assert!(
        subject.as_deref().is_some_and(|s| s.contains("beta")) && answered,
        "www.b.example.com: {subject:?} {answered}"
    );
    assert_eq!(tls_request(&openssl, listen, Some("c.example.com")), (None, false));
    assert_eq!(tls_request(&openssl, listen, None), (None, false));
    let denied = |s: &Sluice| s.logs().iter().filter(|l| l.contains("kind=deny")).count();
    for _ in 0..250 {
        if denied(&sluice) >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(denied(&sluice), 2, "two sessions should have been denied");
}

sluice_tests::for_each_driver!(
    source_networks_allow_deny_and_route_to_pools,
    source_ports_and_listeners_select_rules,
    time_windows_decide_by_the_clock,
    sni_routes_tls_by_name_untouched,
);
