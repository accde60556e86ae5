//! Issue 26 item 6: a rule that denies a TLS server name could be walked around. A hello
//! larger than the 16 KiB sluice reads, a hello that pauses past `sni_timeout` midway, or a
//! name with trailing dots reached the backend carrying the denied name. Now names are
//! compared as TLS servers do (trailing dots dropped), and a hello that cannot be read is
//! denied where a rule denies by name (`sni_unreadable = "deny"`, the default there), or
//! judged without a name where the service says `sni_unreadable = "without_name"`.
//!
//! The hellos are built here, byte by byte, as a client's TLS library would send them.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use sluice_tests::{connect, drain, Backend, Config, Driver, Reports, Service, Sluice};

const RECORD: Duration = Duration::from_secs(10);
const SNI_TIMEOUT: Duration = Duration::from_secs(1);
/// The most handshake bytes one TLS record carries.
const MAX_RECORD: usize = 16 * 1024;

/// A TLS 1.2 ClientHello naming `name`, padded (extension 21) by `padding` bytes, cut into
/// handshake records of at most [`MAX_RECORD`] bytes.
fn client_hello(name: &str, padding: usize) -> Vec<u8> {
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut extensions = Vec::new();
    for (kind, data) in [(0u16, sni), (21, vec![0; padding])] {
        extensions.extend_from_slice(&kind.to_be_bytes());
        extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&data);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut records = Vec::new();
    for chunk in handshake.chunks(MAX_RECORD) {
        records.extend_from_slice(&[22, 3, 1]);
        records.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        records.extend_from_slice(chunk);
    }
    records
}

/// A service denying `evil.example` by name, with a recorder behind it.
fn service(name: &str, extra: &str) -> (Service, Backend, Reports<Vec<u8>>) {
    let (backend, received) = Backend::recorder();
    let rules = format!(
        "sni_timeout = \"{}ms\"\n{extra}[[service.rule]]\nname = \"no-evil\"\naction = \"deny\"\nsni = [\"evil.example\"]",
        SNI_TIMEOUT.as_millis()
    );
    (Service::new(name, &[backend.addr()]).key(&rules), backend, received)
}

/// Sends `parts` in turn, `pause` apart, ignoring a connection closed meanwhile; then ends
/// the stream and waits for the other end's.
fn send(target: SocketAddr, parts: &[&[u8]], pause: Duration) -> TcpStream {
    let mut stream = connect(target);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            thread::sleep(pause);
        }
        if stream.write_all(part).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = drain(&mut stream);
    stream
}

/// The rule named by the deny record of the session `stream` opened.
fn denied_by(sluice: &Sluice, stream: &TcpStream) -> String {
    let client = stream.local_addr().unwrap();
    let line = sluice
        .wait_for_log(&format!("client={client} "), RECORD)
        .unwrap_or_else(|| panic!("no record of {client}"));
    assert!(line.contains(" kind=deny") && line.contains(" verdict=deny"), "{line}");
    let rule = line.split_whitespace().find_map(|kv| kv.strip_prefix("rule="));
    rule.unwrap_or_else(|| panic!("no rule in {line}")).to_string()
}

fn unreadable_hellos_do_not_pass_a_rule_on_the_name(driver: Driver) {
    let (strict, strict_backend, strict_got) = service("strict", "");
    let (lenient, _lenient_backend, lenient_got) =
        service("lenient", "sni_unreadable = \"without_name\"\n");
    let config = Config::new(driver).service(strict).service(lenient);
    let Some(sluice) = Sluice::start(config) else { return };
    let (strict, lenient) = (sluice.addr("strict"), sluice.addr("lenient"));
    let evil = client_hello("evil.example", 0);
    let late: [&[u8]; 2] = [&evil[..20], &evil[20..]];
    let pause = SNI_TIMEOUT + Duration::from_millis(500);

    // Trailing dots: the name meets its rule.
    let s = send(strict, &[&client_hello("evil.example..", 0)], Duration::ZERO);
    assert_eq!(denied_by(&sluice, &s), "no-evil");
    // A hello past the bound, and one paused past sni_timeout, are denied as unreadable.
    let large = client_hello("evil.example", 20_000);
    assert!(large.len() > 16 * 1024);
    let s = send(strict, &[&large], Duration::ZERO);
    assert_eq!(denied_by(&sluice, &s), "sni_unreadable");
    let s = send(strict, &late, pause);
    assert_eq!(denied_by(&sluice, &s), "sni_unreadable");
    // A name that is no host name is too.
    let s = send(strict, &[&client_hello("evil.example;", 0)], Duration::ZERO);
    assert_eq!(denied_by(&sluice, &s), "sni_unreadable");
    // An allowed name passes, untouched.
    let good = client_hello("good.example", 0);
    send(strict, &[&good], Duration::ZERO);
    let received = strict_got.wait_for(1, RECORD);
    assert_eq!(received, vec![good], "the allowed hello reaches the backend as sent");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(strict_backend.accepted(), 1, "a denied hello reached the backend");

    // Where the service says so, a late hello is judged without a name: it passes.
    send(lenient, &late, pause);
    assert_eq!(lenient_got.wait_for(1, RECORD), vec![evil], "without_name lets it through");
}

sluice_tests::for_each_driver!(unreadable_hellos_do_not_pass_a_rule_on_the_name);
