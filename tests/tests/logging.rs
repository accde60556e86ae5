//! Connection logging: records and sinks. A JSON file sink's close record carries exactly
//! what the client did, and the right reason for every close path; open and interim records
//! come when enabled; a text sink renders its template; syslog over UDP is RFC 5424 with the
//! JSON record as message; a rename plus SIGUSR1 loses no record; a blocked TCP syslog sink
//! slows no traffic and counts its drops; `sluice report` sums the records as the test does,
//! from the plain file and from a gzip'd copy.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sluice_tests::{
    abort, binary, connect, connect_from, drain, is_record_of, read_exactly, read_json_lines,
    records_of, refused_addr, rfc3339_ms, tagged_exchange, wait_for_close_record,
    wait_for_json_lines, Backend, Blackhole, Config, Driver, End, Payload, ScratchDir, Service,
    SessionKey, Signal, Sluice, Stop,
};
use socket2::{Domain, Socket, Type};

/// The client address of the tests that check it: distinct from the backends' 127.0.0.1.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// How long a record may take to reach a file (batches of at most 50 ms, flushes).
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);
/// Every field of a JSON record, in the order the README's "Fields:" paragraph gives them
/// (checked against it by `the_documented_fields_are_these`).
const FIELDS: [&str; 21] = [
    "kind",
    "start",
    "end",
    "duration_ms",
    "service",
    "listener",
    "client_addr",
    "client_port",
    "backend_addr",
    "backend_port",
    "bytes_up",
    "bytes_down",
    "verdict",
    "rule",
    "reason",
    "worker",
    "tables_version",
    "protocol",
    "packets_up",
    "packets_down",
    "instance",
];

/// The fields of a JSON record as the README lists them: the backquoted names of its
/// "Fields:" paragraph up to "in templates also", leaving out parenthesised remarks.
fn readme_fields() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).expect("read README.md");
    let start = readme.find("\nFields: ").expect("a \"Fields:\" paragraph in README.md");
    let text = &readme[start..];
    let text = &text[..text.find("; in templates also").expect("\"; in templates also\"")];
    let (mut plain, mut depth) = (String::new(), 0);
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    plain.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The field list the tests hold is the one the README documents, in its order.
#[test]
fn the_documented_fields_are_these() {
    assert_eq!(readme_fields(), FIELDS);
}

/// A `[[log]]` section: a JSON-lines file sink at `path`.
fn file_sink(path: &Path) -> String {
    format!(
        "[[log]]\nname = \"sessions\"\ntype = \"file\"\npath = {:?}\n",
        path.display().to_string()
    )
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

fn u64_of(record: &Value, field: &str) -> u64 {
    record[field].as_u64().unwrap_or_else(|| panic!("{field} is not a number: {record}"))
}

fn time_of(record: &Value, field: &str) -> u64 {
    let text = record[field].as_str().unwrap_or_else(|| panic!("{field} is not text: {record}"));
    rfc3339_ms(text).unwrap_or_else(|| panic!("{field} is not RFC 3339 UTC with ms: {text}"))
}

/// A backend that reads the client's stream to its end, answers `down` bytes, and closes.
fn answers_after_eof(down: u64) -> Backend {
    Backend::spawn(move |mut stream| {
        drain(&mut stream);
        if Payload::new(down, down).write_to(&mut stream, |_| {}).is_ok() {
            let _ = stream.shutdown(Shutdown::Write);
        }
    })
}

/// The client at 127.0.0.2 sends 54,321 bytes and half-closes; the backend answers 12,345
/// bytes and closes. The close record has exactly the documented fields, and each one
/// equals what the client did and saw: bytes each way, client address and port, backend,
/// listener, service, start <= end within the client's own clock readings, duration, verdict
/// allow, reason client_fin, worker, tables version 1, and the host name as the instance.
fn close_record_fields_match_what_the_client_did(driver: Driver) {
    const UP: u64 = 54_321;
    const DOWN: u64 = 12_345;
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    let backend = answers_after_eof(DOWN);
    let config = Config::new(driver)
        .service(Service::new("web", &[backend.addr()]))
        .section(&file_sink(&log));
    let Some(sluice) = Sluice::start(config) else { return };

    let before = now_ms();
    let opened = Instant::now();
    let mut client = connect_from(CLIENT_IP, sluice.addr("web"));
    let key = SessionKey::of(&client);
    Payload::new(1, UP).write_to(&mut client, |_| {}).expect("write");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let answer = drain(&mut client);
    drop(client);
    let client_ms = opened.elapsed().as_millis() as u64;
    assert_eq!((answer.bytes, answer.end), (DOWN, End::Eof));
    let r = wait_for_close_record(&log, key, RECORD_TIMEOUT);
    let after = now_ms();

    // serde_json's map sorts its keys: the order is checked on the line by control's tests.
    let mut fields: Vec<&str> =
        r.as_object().expect("a JSON object").keys().map(String::as_str).collect();
    fields.sort_unstable();
    let mut documented = FIELDS.to_vec();
    documented.sort_unstable();
    assert_eq!(fields, documented, "{r}");
    assert_eq!((r["kind"].as_str(), r["service"].as_str()), (Some("close"), Some("web")), "{r}");
    assert_eq!((r["protocol"].as_str(), r["packets_up"].is_null()), (Some("tcp"), true), "{r}");
    assert_eq!(r["listener"], sluice.addr("web").to_string(), "{r}");
    assert_eq!(
        (r["client_addr"].as_str(), u64_of(&r, "client_port")),
        (Some("127.0.0.2"), u64::from(key.client.port())),
        "{r}"
    );
    let b = backend.addr();
    assert_eq!(
        (r["backend_addr"].clone(), u64_of(&r, "backend_port")),
        (b.ip().to_string().into(), u64::from(b.port())),
        "{r}"
    );
    assert_eq!((u64_of(&r, "bytes_up"), u64_of(&r, "bytes_down")), (UP, DOWN), "{r}");
    assert_eq!(
        (r["verdict"].as_str(), r["reason"].as_str()),
        (Some("allow"), Some("client_fin")),
        "{r}"
    );
    assert_eq!(r["rule"], Value::Null, "{r}");
    assert!(u64_of(&r, "worker") < 2, "{r}");
    assert_eq!(u64_of(&r, "tables_version"), 1, "{r}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("the host name");
    assert_eq!(r["instance"].as_str(), Some(host.trim()), "{r}");
    let (start, end, duration) =
        (time_of(&r, "start"), time_of(&r, "end"), u64_of(&r, "duration_ms"));
    assert!(
        before <= start && start <= end && end <= after,
        "{before} <= {start} <= {end} <= {after}: {r}"
    );
    // Both instants are truncated to the millisecond.
    assert!(
        end - start == duration || end - start == duration + 1,
        "end - start = {} ms, duration {duration} ms",
        end - start
    );
    assert!(
        duration <= client_ms + 1,
        "duration {duration} ms; the client's session lasted {client_ms} ms"
    );
}

/// How each session of the close-path test behaves, by service name.
fn run_close_path(service: &str, addr: SocketAddr) -> SessionKey {
    let mut client = connect(addr);
    let key = SessionKey::of(&client);
    match service {
        // The client sends, half-closes and reads to the end: the echo answers and closes
        // after it (client_fin); the silent backend is cut at the FIN timeout.
        "client_fin" | "fin_timeout" => {
            client.write_all(&[7; 1000]).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            drain(&mut client);
        }
        // The client only reads until the end: the backend closes first (FIN or RST), or
        // sluice closes it (idle, blackholed or refused backend).
        "backend_fin" | "backend_rst" | "connect_timeout" | "connect_refused" | "idle_timeout" => {
            drain(&mut client);
        }
        "client_rst" => {
            client.write_all(&[7; 1000]).unwrap();
            assert_eq!(read_exactly(&mut client, 1000), vec![7; 1000]);
            abort(client);
        }
        other => unreachable!("no close path {other}"),
    }
    key
}

/// One session per close path, all at once on one sluice, each on its own service: the
/// close record of each names its path's reason (client_fin, backend_fin, client_rst,
/// backend_rst, idle_timeout, fin_timeout, connect_timeout, connect_refused) and the bytes
/// the client exchanged where the path fixes them.
fn every_close_path_is_logged_with_its_reason(driver: Driver) {
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    let echo = Backend::echo();
    let backend_first = Backend::spawn(|mut stream| {
        let _ = stream.write_all(&[9; 100]);
        let _ = stream.shutdown(Shutdown::Write);
        drain(&mut stream);
    });
    // Resets a moment after accepting: a reset that came before the client's connect call
    // returned would fail that call instead of ending the session.
    let resets = Backend::spawn(|mut stream| {
        let _ = stream.write_all(&[3; 1000]);
        std::thread::sleep(Duration::from_millis(100));
        abort(stream);
    });
    let silent = Backend::spawn(|mut stream| {
        drain(&mut stream);
        std::thread::sleep(Duration::from_secs(3));
    });
    let hole = Blackhole::new();
    let config = Config::new(driver)
        .service(Service::new("client_fin", &[echo.addr()]))
        .service(Service::new("backend_fin", &[backend_first.addr()]))
        .service(Service::new("client_rst", &[echo.addr()]))
        .service(Service::new("backend_rst", &[resets.addr()]))
        .service(Service::new("idle_timeout", &[echo.addr()]).idle_timeout("500ms"))
        .service(Service::new("fin_timeout", &[silent.addr()]).fin_timeout("500ms"))
        .service(Service::new("connect_timeout", &[hole.addr()]).connect_timeout("500ms"))
        .service(Service::new("connect_refused", &[refused_addr()]))
        .section(&file_sink(&log));
    let Some(sluice) = Sluice::start(config.clone()) else { return };

    let keys: Vec<(String, SessionKey)> = std::thread::scope(|scope| {
        let runs: Vec<_> = config
            .services
            .iter()
            .map(|s| {
                let (name, addr) = (s.name.clone(), sluice.addr(&s.name));
                scope.spawn(move || (name.clone(), run_close_path(&name, addr)))
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("close path client")).collect()
    });
    let records = wait_for_json_lines(std::slice::from_ref(&log), RECORD_TIMEOUT, |lines| {
        keys.iter().all(|(_, key)| !records_of(lines, "close", *key).is_empty())
    });
    // Bytes each path fixes: (up, down).
    let fixed: HashMap<&str, (u64, u64)> = [
        ("client_fin", (1000, 1000)),
        ("backend_fin", (0, 100)),
        ("client_rst", (1000, 1000)),
        ("idle_timeout", (0, 0)),
        ("fin_timeout", (1000, 0)),
        ("connect_timeout", (0, 0)),
        ("connect_refused", (0, 0)),
    ]
    .into();
    for (reason, key) in &keys {
        let found = records_of(&records, "close", *key);
        assert_eq!(found.len(), 1, "{reason}: close records {found:?}");
        let r = found[0];
        assert_eq!(
            (r["service"].as_str(), r["reason"].as_str()),
            (Some(reason.as_str()), Some(reason.as_str())),
            "{r}"
        );
        if let Some(&(up, down)) = fixed.get(reason.as_str()) {
            assert_eq!(
                (u64_of(r, "bytes_up"), u64_of(r, "bytes_down")),
                (up, down),
                "{reason}: {r}"
            );
        }
    }
}

/// With `[records] open = true`, a session gets one open record, before its close record,
/// naming its backend with no byte relayed yet.
fn open_records_are_logged_when_enabled(driver: Driver) {
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    let echo = Backend::tagged_echo(b'A');
    let config = Config::new(driver)
        .service(Service::new("web", &[echo.addr()]))
        .section("[records]\nopen = true\n")
        .section(&file_sink(&log));
    let Some(sluice) = Sluice::start(config) else { return };

    let client = connect_from(CLIENT_IP, sluice.addr("web"));
    let key = SessionKey::of(&client);
    assert_eq!(tagged_exchange(client, b"hello"), Ok(b'A'));
    wait_for_close_record(&log, key, RECORD_TIMEOUT);
    let records = read_json_lines(&log);
    let kinds: Vec<&str> = records
        .iter()
        .filter(|r| r["client_port"] == key.client.port())
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["open", "close"], "{records:#?}");
    let open = records_of(&records, "open", key)[0];
    assert_eq!(open["backend_port"], echo.addr().port(), "{open}");
    assert_eq!((u64_of(open, "bytes_up"), u64_of(open, "bytes_down")), (0, 0), "{open}");
    assert_eq!(open["reason"], Value::Null, "{open}");
}

/// With `[records] interim = "1s"`, a session that sends 1,000 bytes every 100 ms gets
/// interim records while it is open: at least two, about a second apart or more, with
/// growing byte counts that never exceed the final ones, then its close record.
fn interim_records_grow_while_a_session_is_held_open(driver: Driver) {
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    let echo = Backend::echo();
    let config = Config::new(driver)
        .service(Service::new("web", &[echo.addr()]))
        .section("[records]\ninterim = \"1s\"\n")
        .section(&file_sink(&log));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect(sluice.addr("web"));
    let key = SessionKey::of(&client);
    let paths = [log.clone()];
    let started = Instant::now();
    let mut sent = 0u64;
    while records_of(&read_json_lines(&log), "interim", key).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "fewer than two interim records in 6 s"
        );
        client.write_all(&[1; 1000]).unwrap();
        read_exactly(&mut client, 1000);
        sent += 1000;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("two interim records after {:?}", started.elapsed());
    client.shutdown(Shutdown::Write).unwrap();
    drain(&mut client);
    let records =
        wait_for_json_lines(&paths, RECORD_TIMEOUT, |l| !records_of(l, "close", key).is_empty());
    let close = records_of(&records, "close", key)[0];
    assert_eq!((u64_of(close, "bytes_up"), u64_of(close, "bytes_down")), (sent, sent), "{close}");
    let interim = records_of(&records, "interim", key);
    assert!(interim.len() >= 2, "{interim:?}");
    for pair in interim.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(
            u64_of(b, "bytes_up") > u64_of(a, "bytes_up"),
            "bytes_up did not grow: {a} then {b}"
        );
        assert!(
            u64_of(b, "bytes_down") > u64_of(a, "bytes_down"),
            "bytes_down did not grow: {a} then {b}"
        );
        assert!(
            u64_of(b, "duration_ms") >= u64_of(a, "duration_ms") + 900,
            "interim records closer than 1 s: {a} then {b}"
        );
    }
    for r in &interim {
        assert!(u64_of(r, "duration_ms") >= 900, "an interim record before 1 s: {r}");
        assert!(u64_of(r, "bytes_up") <= sent && u64_of(r, "bytes_down") <= sent, "{r}");
        assert_eq!(r["reason"], Value::Null, "{r}");
    }
}

/// A text sink with a template writes, for a session from 127.0.0.2, exactly the template
/// with each field rendered, the instance as `[records] instance` names it.
fn text_sink_renders_the_template_fields(driver: Driver) {
    let dir = ScratchDir::new();
    let log = dir.join("sessions.log");
    let backend = answers_after_eof(77);
    let template = concat!(
        "{kind} {client} -> {backend} {service} up={bytes_up} down={bytes_down} ",
        "{reason} {verdict} rule={rule} v={tables_version} at={instance}"
    );
    let sink = format!(
        "[[log]]\ntype = \"file\"\npath = {:?}\nformat = \"text\"\ntemplate = {template:?}\n",
        log.display().to_string()
    );
    let config = Config::new(driver)
        .service(Service::new("web", &[backend.addr()]))
        .section("[records]\ninstance = \"edge-7.fra\"\n")
        .section(&sink);
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect_from(CLIENT_IP, sluice.addr("web"));
    let key = SessionKey::of(&client);
    client.write_all(&[5; 33]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(drain(&mut client).bytes, 77);
    drop(client);
    let expected = format!(
        "close {} -> {} web up=33 down=77 client_fin allow rule=- v=1 at=edge-7.fra",
        key.client,
        backend.addr()
    );
    let deadline = Instant::now() + RECORD_TIMEOUT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.ends_with('\n') || Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(text, format!("{expected}\n"));
}

/// A syslog sink to a UDP socket the test binds: one datagram per session, each
/// `<PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG` with PRI = local3 (19) * 8 + 6, the
/// record's end as TIMESTAMP, app "sluice", sluice's pid, MSGID "close", and the JSON close
/// record of that session as MSG.
fn syslog_udp_datagrams_are_rfc5424_with_the_json_record(driver: Driver) {
    let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    receiver.set_read_timeout(Some(RECORD_TIMEOUT)).unwrap();
    let echo = Backend::tagged_echo(b'A');
    let sink = format!(
        "[[log]]\ntype = \"syslog\"\naddress = \"udp:{}\"\nfacility = \"local3\"\n",
        receiver.local_addr().unwrap()
    );
    let config = Config::new(driver).service(Service::new("web", &[echo.addr()])).section(&sink);
    let Some(sluice) = Sluice::start(config) else { return };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");

    let mut keys: Vec<SessionKey> = (0..3)
        .map(|i| {
            let client = connect(sluice.addr("web"));
            let key = SessionKey::of(&client);
            assert_eq!(tagged_exchange(client, &Payload::bytes(i, 10 * i as usize)), Ok(b'A'));
            key
        })
        .collect();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..3 {
        let n = receiver.recv(&mut buf).expect("a syslog datagram within 5 s");
        let datagram = std::str::from_utf8(&buf[..n]).expect("UTF-8 datagram");
        let parts: Vec<&str> = datagram.splitn(8, ' ').collect();
        assert_eq!(parts.len(), 8, "not RFC 5424: {datagram}");
        assert_eq!(parts[0], format!("<{}>1", 19 * 8 + 6), "PRI and version: {datagram}");
        assert!(rfc3339_ms(parts[1]).is_some(), "TIMESTAMP: {datagram}");
        assert_eq!(parts[2], hostname.trim(), "HOSTNAME: {datagram}");
        assert_eq!(
            (parts[3], parts[4], parts[5], parts[6]),
            ("sluice", sluice.pid().to_string().as_str(), "close", "-"),
            "{datagram}"
        );
        let record: Value = serde_json::from_str(parts[7])
            .unwrap_or_else(|e| panic!("MSG is not JSON ({e}): {datagram}"));
        assert_eq!(record["end"], parts[1], "TIMESTAMP is not the record's end: {datagram}");
        let position = keys.iter().position(|k| is_record_of(&record, "close", *k));
        let at = position
            .unwrap_or_else(|| panic!("a record of no session of the test (or twice): {record}"));
        keys.remove(at);
    }
}

/// Sessions, 2 ms apart, until `stop`, by client `thread` of two: each sends a payload size
/// no other session uses (1 + thread + 2n), and each completed size is pushed to `done`.
fn steady_traffic(addr: SocketAddr, thread: u64, stop: &Stop, done: &Mutex<Vec<u64>>) {
    let mut n = 0u64;
    while !stop.is_set() {
        let size = 1 + thread + 2 * n;
        let stream = connect(addr);
        let payload = Payload::bytes(size, size as usize);
        assert_eq!(tagged_exchange(stream, &payload), Ok(b'A'), "session of {size} bytes");
        done.lock().expect("lock").push(size);
        n += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// While two clients keep making sessions, the log file is renamed and SIGUSR1 sent: the
/// renamed file and the new one together hold exactly one close record per completed
/// session (told apart by unique byte counts), and both hold some.
fn renamed_log_and_sigusr1_lose_no_record(driver: Driver) {
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    let rotated = dir.join("sessions.jsonl.1");
    let echo = Backend::tagged_echo(b'A');
    let config =
        Config::new(driver).service(Service::new("web", &[echo.addr()])).section(&file_sink(&log));
    let Some(sluice) = Sluice::start(config) else { return };

    let (stop, done) = (Stop::after(Duration::from_secs(30)), Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        let _guard = stop.guard();
        let clients: Vec<_> = (0..2)
            .map(|t| {
                let (addr, stop, done) = (sluice.addr("web"), &stop, &done);
                scope.spawn(move || steady_traffic(addr, t, stop, done))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        std::fs::rename(&log, &rotated).expect("rename the log file");
        std::thread::sleep(Duration::from_millis(100));
        let mark = sluice.log_mark();
        sluice.signal(Signal::SIGUSR1);
        sluice
            .wait_for_log_after(mark, "reopening log files", RECORD_TIMEOUT)
            .expect("no reopen line");
        std::thread::sleep(Duration::from_millis(700));
        stop.set();
        clients.into_iter().for_each(|c| c.join().expect("client"));
    });
    let mut sizes = done.into_inner().expect("lock");
    sizes.sort_unstable();
    let paths = [rotated.clone(), log.clone()];
    let records = wait_for_json_lines(&paths, RECORD_TIMEOUT, |lines| lines.len() >= sizes.len());
    let mut logged: Vec<u64> =
        records.iter().filter(|r| r["kind"] == "close").map(|r| u64_of(r, "bytes_up")).collect();
    logged.sort_unstable();
    println!("{} sessions", sizes.len());
    assert_eq!(logged, sizes, "close records (by bytes_up) differ from the completed sessions");
    let old = read_json_lines(&rotated).len();
    let new = read_json_lines(&log).len();
    assert!(old > 0 && new > 0, "records before the rename: {old}, after the reopen: {new}");
}

/// Runs `n` short sessions through each of `a` and `b` from two threads, alternating
/// between them session by session so that both see the same machine load; the time spent
/// in the sessions of each, summed over the threads.
fn interleaved_sessions(a: SocketAddr, b: SocketAddr, n: usize) -> (Duration, Duration) {
    let session = |addr: SocketAddr, seed: u64| {
        let started = Instant::now();
        assert_eq!(tagged_exchange(connect(addr), &Payload::bytes(seed, 100)), Ok(b'A'));
        started.elapsed()
    };
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|t| {
                scope.spawn(move || {
                    let (mut on_a, mut on_b) = (Duration::ZERO, Duration::ZERO);
                    for i in 0..n / 2 {
                        let seed = (t * n + i) as u64;
                        if i % 2 == 0 {
                            on_a += session(a, seed);
                            on_b += session(b, seed);
                        } else {
                            on_b += session(b, seed);
                            on_a += session(a, seed);
                        }
                    }
                    (on_a, on_b)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("client"))
            .fold((Duration::ZERO, Duration::ZERO), |(x, y), (a, b)| (x + a, y + b))
    })
}

/// A listener that accepts connections and never reads from them, with a small receive
/// buffer and MSS so that the sender's side fills quickly. Holds them until dropped.
struct DeafPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeafPeer {
    fn new() -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        // A small MSS keeps the sender's send buffer small too (Linux sizes it from the
        // MSS), so that the sink's own pending buffer is what fills.
        socket.set_tcp_mss(536).expect("TCP_MAXSEG");
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("bind");
        socket.listen(8).expect("listen");
        let listener: TcpListener = socket.into();
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let held = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut streams: Vec<TcpStream> = Vec::new();
            while !held.load(Ordering::Relaxed) {
                if let Ok((s, _)) = listener.accept() {
                    streams.push(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { addr, stop, thread: Some(thread) }
    }
}

impl Drop for DeafPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// 2,000 short sessions through a sluice whose TCP syslog sink's peer accepts and never
/// reads (so the sink's 256 KiB pending buffer fills) take no longer than 2,000 sessions,
/// interleaved with them, through a sluice without that sink: at most 1.5 times the time,
/// plus 250 ms. All complete, and `/stats` accounts for every record of the sink as written
/// or dropped, with some dropped.
fn blocked_syslog_sink_slows_no_traffic_and_counts_drops(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    const SESSIONS: usize = 2000;
    let echo = Backend::tagged_echo(b'A');
    let plain = Config::new(driver)
        .service(Service::new("web", &[echo.addr()]))
        .section("[[log]]\ntype = \"stdout\"\n");
    let Some(plain) = Sluice::start(plain) else { return };
    let peer = DeafPeer::new();
    let blocked = Config::new(driver)
        .admin_tcp()
        .service(Service::new("web", &[echo.addr()]))
        .section(&format!(
            "[[log]]\nname = \"deaf\"\ntype = \"syslog\"\naddress = \"tcp:{}\"\n",
            peer.addr
        ));
    let sluice = Sluice::start(blocked).expect("the driver ran a moment ago");
    let (without, with) = interleaved_sessions(plain.addr("web"), sluice.addr("web"), SESSIONS);
    println!("{SESSIONS} sessions each: {without:?} without the sink, {with:?} with it blocked");
    assert!(
        with <= without.mul_f64(1.5) + Duration::from_millis(250),
        "{with:?} with the blocked sink, {without:?} without"
    );

    let deadline = Instant::now() + RECORD_TIMEOUT;
    let sink = loop {
        let stats = sluice.admin().stats();
        let sink =
            stats["log_sinks"].as_array().and_then(|s| s.first()).cloned().expect("a log sink");
        let seen = u64_of(&sink, "written") + u64_of(&sink, "dropped");
        if seen >= SESSIONS as u64 || Instant::now() >= deadline {
            break sink;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("sink after the run: {sink}");
    assert_eq!(sink["name"], "deaf", "{sink}");
    assert_eq!(u64_of(&sink, "written") + u64_of(&sink, "dropped"), SESSIONS as u64, "{sink}");
    assert!(u64_of(&sink, "dropped") > 0, "no record dropped: {sink}");
}

/// Sums of sessions and bytes, as the report prints them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    sessions: u64,
    bytes_up: u64,
    bytes_down: u64,
}

impl Tally {
    fn plus(&mut self, other: Tally) {
        self.sessions += other.sessions;
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
    }

    fn of(v: &Value) -> Tally {
        Tally {
            sessions: u64_of(v, "sessions"),
            bytes_up: u64_of(v, "bytes_up"),
            bytes_down: u64_of(v, "bytes_down"),
        }
    }
}

/// `sluice report --json FILE...`, parsed.
fn report(files: &[&Path]) -> Value {
    let output = Command::new(binary())
        .arg("report")
        .arg("--json")
        .args(files)
        .output()
        .expect("run sluice report");
    assert!(output.status.success(), "sluice report: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("report --json prints JSON")
}

/// Asserts that a report's totals, per-service and per-backend sums equal `expected`.
fn assert_report(
    report: &Value,
    total: Tally,
    services: &BTreeMap<String, Tally>,
    backends: &BTreeMap<String, Tally>,
) {
    assert_eq!(Tally::of(&report["total"]), total, "total: {report:#}");
    assert_eq!(report["skipped_lines"], 0, "{report:#}");
    let of_map = |v: &Value| -> BTreeMap<String, Tally> {
        v.as_object().expect("a map").iter().map(|(k, t)| (k.clone(), Tally::of(t))).collect()
    };
    assert_eq!(&of_map(&report["services"]), services, "services: {report:#}");
    assert_eq!(&of_map(&report["backends"]), backends, "backends: {report:#}");
}

/// A JSON log of sessions on two services and three backends (open records too), then
/// `sluice report --json` on it and on a gzip'd copy: total sessions and bytes, and the
/// sums per service and per backend, equal what the clients sent and received (each
/// backend's tag says which one served a session).
fn report_sums_equal_the_records(driver: Driver) {
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    let (a, b, c) =
        (Backend::tagged_echo(b'A'), Backend::tagged_echo(b'B'), Backend::tagged_echo(b'C'));
    let config = Config::new(driver)
        .service(Service::new("web", &[a.addr(), b.addr()]))
        .service(Service::new("db", &[c.addr()]))
        .section("[records]\nopen = true\n")
        .section(&file_sink(&log));
    let Some(sluice) = Sluice::start(config) else { return };
    let backend_of = |tag: u8| match tag {
        b'A' => a.addr().to_string(),
        b'B' => b.addr().to_string(),
        b'C' => c.addr().to_string(),
        _ => panic!("unknown tag {tag}"),
    };
    let sessions = 12usize;
    let (mut total, mut services, mut backends) =
        (Tally::default(), BTreeMap::new(), BTreeMap::new());
    for i in 0..sessions {
        let service = if i % 3 == 0 { "db" } else { "web" };
        let stream = connect_from(CLIENT_IP, sluice.addr(service));
        let sent = Payload::bytes(i as u64, 100 * i + 1);
        let tag = tagged_exchange(stream, &sent).expect("tagged exchange");
        // Up: what the client sent; down: its echo and the tag byte before it.
        let client =
            Tally { sessions: 1, bytes_up: sent.len() as u64, bytes_down: sent.len() as u64 + 1 };
        total.plus(client);
        services.entry(service.to_string()).or_insert_with(Tally::default).plus(client);
        backends.entry(backend_of(tag)).or_insert_with(Tally::default).plus(client);
    }
    // 12 sessions of 1, 101, ..., 1101 bytes up; each echoed with a tag byte.
    assert_eq!(total, Tally { sessions: 12, bytes_up: 6_612, bytes_down: 6_624 });
    assert_eq!(backends.len(), 3, "{backends:?}");
    let paths = [log.clone()];
    wait_for_json_lines(&paths, RECORD_TIMEOUT, |lines| {
        lines.iter().filter(|r| r["kind"] == "close").count() >= sessions
    });

    let plain = report(&[&log]);
    assert_eq!(plain["records"], sessions, "open records must not count: {plain:#}");
    assert_report(&plain, total, &services, &backends);
    let gz = dir.join("sessions.jsonl.1.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).expect("create .gz"),
        flate2::Compression::default(),
    );
    encoder.write_all(&std::fs::read(&log).expect("read log")).expect("gzip");
    encoder.finish().expect("finish gzip");
    assert_report(&report(&[&gz]), total, &services, &backends);
}

// What a driver records about its sessions: on every driver.
sluice_tests::for_each_driver!(
    close_record_fields_match_what_the_client_did,
    every_close_path_is_logged_with_its_reason,
    open_records_are_logged_when_enabled,
    interim_records_grow_while_a_session_is_held_open,
);

// Sinks and reports take the records from the log thread, whatever driver made them.
sluice_tests::driver_independent!(
    text_sink_renders_the_template_fields,
    syslog_udp_datagrams_are_rfc5424_with_the_json_record,
    renamed_log_and_sigusr1_lose_no_record,
    blocked_syslog_sink_slows_no_traffic_and_counts_drops,
    report_sums_equal_the_records
);
