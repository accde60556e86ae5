//! The admin plane under abuse (RELIABILITY.md scenario 20) and the two ways the previous
//! admin server could be taken down (issue 26, items 1 and 2):
//!
//! - out of fds, the admin API neither panics nor goes away: it accepts again on the same
//!   socket once fds free up (26.1);
//! - idle connections to the admin port are capped and closed at the header timeout, with
//!   no thread and no fd beyond the cap (26.1);
//! - a client that pipelines requests and never reads the answers holds no other client
//!   up, and loses its connection at the write timeout (26.2);
//! - hundreds of half-sent, slow, oversized, unauthorized and unknown requests leave
//!   threads, memory and fds bounded, the data plane and the dashboard answering, and
//!   nothing changed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::{
    echo_round_trip, prerequisite, raise_fd_limit, tcp_connections_on, thread_count, try_connect,
    write_token_file, Backend, Config, Driver, ScratchDir, Service, Sluice, PRLIMIT, READ_TOKEN,
    WRITE_TOKEN,
};

/// How long an admin request under test may take before it counts as blocked.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// A request on a fresh connection, answered with 200 within [`ANSWER_WITHIN`].
fn answers(sluice: &Sluice, method: &str, path: &str, token: Option<&str>) -> Result<(), String> {
    let admin = match token {
        Some(t) => sluice.admin().with_token(t),
        None => sluice.admin(),
    };
    let started = Instant::now();
    match admin.try_request(method, path, b"", &[], ANSWER_WITHIN) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("{method} {path} answered {}: {}", r.status, r.text())),
        Err(e) => Err(format!("{method} {path} failed after {:?}: {e}", started.elapsed())),
    }
}

/// Admin connections sluice holds open now.
fn admin_connections(sluice: &Sluice) -> usize {
    tcp_connections_on(sluice.pid(), sluice.admin().tcp_addr().port())
}

/// Waits up to `timeout` for sluice to hold no admin connection; returns how many it holds.
fn wait_for_no_admin_connection(sluice: &Sluice, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = admin_connections(sluice);
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`answers`], retried on fresh connections: under a connection flood one attempt
/// may be the connection closed to make room; what counts is an answer within
/// [`ANSWER_WITHIN`], as a dashboard polling every second gets. Returns the attempts made.
fn answers_soon(
    sluice: &Sluice,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<usize, String> {
    let deadline = Instant::now() + ANSWER_WITHIN;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match answers(sluice, method, path, token) {
            Ok(()) => return Ok(attempts),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("{e} ({attempts} attempts)"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The names of the threads of `pid`, for messages.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

fn no_panic(sluice: &Sluice) {
    let panics: Vec<String> =
        sluice.logs().into_iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "sluice panicked: {panics:#?}");
}

/// Regression for issue 26.1: under RLIMIT_NOFILE=256 with every fd held by the data path,
/// admin requests find no fd to be accepted with; the admin API must not panic, and once
/// the fds are back it answers again on the same address within a second or two. (The
/// previous server's accept thread died on `Too many open files` and never came back.)
fn admin_listens_again_after_fd_exhaustion(driver: Driver) {
    if !prerequisite(Path::new(PRLIMIT).exists(), PRLIMIT) {
        return;
    }
    raise_fd_limit(20_000);
    let (holder, held) = Backend::holds();
    let config = Config::new(driver)
        .workers(2)
        .fd_limit(256)
        .shutdown_timeout("2s")
        .admin_tcp()
        .service(Service::new("held", &[holder.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    answers(&sluice, "GET", "/stats", None).expect("the admin API answers before");
    let addr = sluice.addr("held");
    let mut clients: Vec<TcpStream> = (0..1000).filter_map(|_| try_connect(addr).ok()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sluice.fd_count() + 4 < 256 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let open = sluice.fd_count();
    assert!(open + 4 >= 256, "sluice never ran out of fds: {open} of 256");
    // Admin requests while fds are short: with none free, and with one or two freed by a
    // closing session just before (so that an accept can succeed and what follows it find
    // no fd). None may crash anything.
    let admin = sluice.admin();
    let mut during = Vec::new();
    for round in 0..40 {
        if round % 2 == 1 {
            drop(clients.pop());
        }
        let answered = admin.try_request("GET", "/stats", b"", &[], Duration::from_millis(150));
        during.push(answered.is_ok());
    }
    let served = during.iter().filter(|&&ok| ok).count();
    println!(
        "{} clients connected; {served} of 40 admin requests answered while fds were short",
        clients.len()
    );
    assert!(sluice.wait_exit(Duration::ZERO).is_none(), "sluice exited");
    drop(clients);
    drop(holder);
    held.clear();
    let freed = Instant::now();
    let back = loop {
        if answers(&sluice, "GET", "/stats", None).is_ok() {
            break freed.elapsed();
        }
        assert!(freed.elapsed() < Duration::from_secs(10), "the admin API never answered again");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("the admin API answered again {back:?} after fds were freed");
    assert!(back < Duration::from_secs(5), "took {back:?} to answer again");
    no_panic(&sluice);
    assert!(sluice.terminate(Duration::from_secs(10)).success());
}

/// The two lowest fd numbers process `pid` has free.
fn free_fd_numbers(pid: u32) -> (usize, usize) {
    let used: std::collections::HashSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut free = (0..).filter(|n| !used.contains(n));
    (free.next().unwrap_or_default(), free.next().unwrap_or_default())
}

/// Sets the soft RLIMIT_NOFILE of process `pid` (util-linux `prlimit --pid`).
fn set_fd_limit(pid: u32, soft: usize, hard: u64) {
    let out = std::process::Command::new(PRLIMIT)
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:{hard}")])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
}

/// Regression for issue 26.1 (the panic): with exactly one fd free, an admin connection
/// can be accepted but nothing more can be opened: the previous server duplicated every
/// accepted socket and unwrapped the EMFILE of the dup in its accept thread (a panic), or
/// answered 500; with none free it closed its listener (connections refused). Now the
/// request is served with that one fd; with none, it waits in the listen queue and is
/// served as soon as the limit is back; nothing panics.
#[test]
fn an_accept_that_leaves_no_fd_to_spare_panics_nothing() {
    if !prerequisite(Path::new(PRLIMIT).exists(), PRLIMIT) {
        return;
    }
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .workers(1)
        .fd_limit(1024)
        .admin_tcp()
        .service(Service::new("web", &[echo.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    answers(&sluice, "GET", "/stats", None).expect("the admin API answers before");
    sluice.settled_fd_count();
    // RLIMIT_NOFILE bounds fd numbers: below the second free number only the first is free.
    let (first, second) = free_fd_numbers(sluice.pid());
    println!("free fd numbers: {first}, {second}");
    set_fd_limit(sluice.pid(), second, 1024);
    let one_free = answers(&sluice, "GET", "/stats", None);
    // None free: the request waits in the listen queue (the socket stays open) and is
    // served once the limit is back.
    set_fd_limit(sluice.pid(), first, 1024);
    let pid = sluice.pid();
    let restore = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        set_fd_limit(pid, 1024, 1024);
    });
    let started = Instant::now();
    let none_free = sluice.admin().try_request("GET", "/stats", b"", &[], Duration::from_secs(5));
    let waited = started.elapsed();
    restore.join().unwrap();
    println!(
        "one fd free: {one_free:?}; none free: status {:?} after {waited:?}",
        none_free.as_ref().map(|r| r.status)
    );
    let none_free = none_free.expect("a request made while no fd was free is served once one is");
    assert_eq!(none_free.status, 200);
    assert!(
        waited >= Duration::from_millis(500),
        "served after {waited:?}, before the limit was back?"
    );
    answers(&sluice, "GET", "/stats", None).expect("answers after");
    no_panic(&sluice);
    one_free.expect("one free fd is enough to serve an admin request");
    echo_round_trip(sluice.addr("web"), 1, 1000);
}

/// Regression for issue 26.1 (idle connections): 300 connections that send nothing cost
/// no thread and at most `max_connections` fds; `/healthz` still answers at once; every
/// one of them is closed by the header timeout. (The previous server spent one thread
/// and two fds on each, without limit, for as long as the client wished.)
#[test]
fn idle_admin_connections_are_capped_and_time_out() {
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .admin_tcp()
        .admin_key("max_connections = 16")
        .admin_key("header_timeout = \"1s\"")
        .service(Service::new("web", &[echo.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    let admin_addr = sluice.admin().tcp_addr();
    assert!(answers(&sluice, "GET", "/healthz", None).is_ok());
    let fds = sluice.settled_fd_count();
    let threads = thread_count(sluice.pid());
    let idle: Vec<TcpStream> = (0..300).filter_map(|_| try_connect(admin_addr).ok()).collect();
    assert_eq!(idle.len(), 300, "the kernel queues the connections");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(thread_count(sluice.pid()), threads, "idle connections cost threads");
    let held = sluice.fd_count();
    assert!(held <= fds + 16, "{held} fds with 300 idle admin connections (baseline {fds})");
    assert!(admin_connections(&sluice) <= 16, "more admin connections than the cap");
    let started = Instant::now();
    answers(&sluice, "GET", "/healthz", None).expect("a new client is served");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    echo_round_trip(sluice.addr("web"), 1, 1000);
    // Every idle connection is closed by sluice: at once (evicted) or at the timeout.
    std::thread::sleep(Duration::from_millis(2000));
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("an idle admin connection is still open after 2 s: {e}"),
        }
    }
    assert_eq!(wait_for_no_admin_connection(&sluice, Duration::from_secs(3)), 0);
    let after = sluice.wait_for_fd_count(fds, Duration::from_secs(3));
    assert!(after <= fds, "fds not given back: {after} (baseline {fds})");
    no_panic(&sluice);
}

/// Regression for issue 26.2: one client pipelines 3,000 `GET /stats` and never reads.
/// Meanwhile `/stats`, `/metrics` and `POST /reload` on other connections each answer
/// within 3 s, and the stuck connection is closed at the write timeout. (The previous server answered requests one at a time with
/// blocking writes: every other client waited for as long as the reader stalled.)
#[test]
fn a_client_that_never_reads_blocks_no_one() {
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .admin_tcp()
        .admin_key("write_timeout = \"2s\"")
        .service(Service::new("web", &[echo.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    let stuck = TcpStream::connect(sluice.admin().tcp_addr()).unwrap();
    stuck.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut writer = stuck.try_clone().unwrap();
    let pipelined = std::thread::spawn(move || {
        let request = b"GET /stats HTTP/1.1\r\nHost: sluice\r\n\r\n";
        (0..3000).take_while(|_| writer.write_all(request).is_ok()).count()
    });
    std::thread::sleep(Duration::from_millis(700));
    for (method, path) in
        [("GET", "/stats"), ("GET", "/metrics"), ("POST", "/reload"), ("GET", "/")]
    {
        answers(&sluice, method, path, None)
            .unwrap_or_else(|e| panic!("blocked by a stuck reader: {e}"));
    }
    let written = pipelined.join().unwrap();
    println!("the stuck client wrote {written} requests");
    let open = wait_for_no_admin_connection(&sluice, Duration::from_secs(6));
    assert_eq!(open, 0, "the stuck connection is still open after the write timeout");
    answers(&sluice, "GET", "/stats", None).expect("still answering");
    no_panic(&sluice);
    drop(stuck);
}

/// One kind of abuse, run on its own thread against the admin port.
fn abuse(
    addr: SocketAddr,
    kind: &'static str,
    n: usize,
) -> std::thread::JoinHandle<Vec<TcpStream>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for i in 0..n {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                continue;
            };
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let sent = match kind {
                "half-sent" => s.write_all(b"GET /stats HTTP/1.1\r\nHost: sluice\r\nX-Wait: "),
                "slow-body" => s.write_all(
                    b"POST /reload HTTP/1.1\r\nHost: sluice\r\nContent-Length: 1000\r\n\r\n0123",
                ),
                "huge-head" => {
                    let mut head = b"GET /stats HTTP/1.1\r\nHost: sluice\r\n".to_vec();
                    for h in 0..2000 {
                        head.extend_from_slice(
                            format!("X-Padding-{h}: {}\r\n", "p".repeat(40)).as_bytes(),
                        );
                    }
                    s.write_all(&head)
                }
                "huge-body" => s.write_all(
                    b"POST /reload HTTP/1.1\r\nHost: sluice\r\nContent-Length: 104857600\r\n\r\n",
                ),
                "wrong-token" => {
                    let token = if i % 2 == 0 { "not-the-token-at-all-000" } else { READ_TOKEN };
                    s.write_all(format!("POST /reload HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                }
                "kill-attempt" => s.write_all(b"DELETE /connections/1 HTTP/1.1\r\nHost: s\r\n\r\n"),
                _ => s.write_all(
                    format!("GET /no/such/route/{i} HTTP/1.1\r\nHost: s\r\n\r\n").as_bytes(),
                ),
            };
            if sent.is_ok() {
                kept.push(s);
            }
        }
        kept
    })
}

/// RELIABILITY.md scenario 20: 200 half-sent requests, 50 slow bodies, 50 oversized heads,
/// 50 oversized bodies, 100 writes with a wrong or read-only token, 50 kill attempts
/// without a token and 100 unknown routes, all at once against an admin API with tokens.
/// During it the data plane relays, the dashboard and `/stats` answer within 3 s; after
/// it sluice has no more threads than before, RSS within 16 MiB of before, every abusive
/// connection closed by the timeouts (the clients still hold theirs open), and nothing changed: the file on disk (rewritten to
/// route elsewhere) was not reloaded, the backend was not drained, no session was cut.
fn admin_plane_under_abuse(driver: Driver) {
    let dir = ScratchDir::new();
    let (a, b) = (Backend::tagged_echo(b'A'), Backend::tagged_echo(b'B'));
    let config = Config::new(driver)
        .admin_tcp()
        .admin_key(&write_token_file(dir.path()))
        .admin_key("max_connections = 32")
        .admin_key("header_timeout = \"1s\"")
        .admin_key("body_timeout = \"1s\"")
        .admin_key("write_timeout = \"1s\"")
        .service(Service::new("web", &[a.addr()]));
    let Some(sluice) = Sluice::start(config.clone()) else { return };
    let mut moved = config;
    moved.service_mut("web").backends = vec![b.addr()];
    sluice.write_config(&moved);
    let mut long_lived = TcpStream::connect(sluice.addr("web")).unwrap();
    long_lived.write_all(b"x").unwrap();
    let mut tag = [0u8; 2];
    long_lived.read_exact(&mut tag).unwrap();
    // The log thread and then the health checker start just after the admin API reports
    // ready: the count is taken once the last of them runs.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !thread_names(sluice.pid()).iter().any(|n| n == "sluice-health")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (threads, rss) = (thread_count(sluice.pid()), sluice.rss_kib());

    let addr = sluice.admin().tcp_addr();
    let kinds = [
        ("half-sent", 200),
        ("slow-body", 50),
        ("huge-head", 50),
        ("huge-body", 50),
        ("wrong-token", 100),
        ("kill-attempt", 50),
        ("unknown", 100),
    ];
    let attackers: Vec<_> = kinds.iter().map(|&(kind, n)| abuse(addr, kind, n)).collect();
    let until = Instant::now() + Duration::from_secs(2);
    let (mut probes, mut attempts) = (0, 0);
    while Instant::now() < until {
        let (tag, _) = sluice_tests::tagged_round_trip(sluice.addr("web"), b"probe");
        assert_eq!(tag, b'A', "the data plane keeps its routing");
        for path in ["/", "/stats"] {
            attempts += answers_soon(&sluice, "GET", path, Some(READ_TOKEN))
                .unwrap_or_else(|e| panic!("{path} during the abuse: {e}"));
        }
        probes += 1;
    }
    let held: Vec<TcpStream> = attackers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    println!(
        "{probes} rounds of probes answered during the abuse in {attempts} attempts; {} abusive \
         connections open",
        held.len()
    );
    let now = thread_count(sluice.pid());
    assert!(
        now <= threads,
        "threads grew under abuse: {threads} -> {now}: {:?}",
        thread_names(sluice.pid())
    );
    let grown = sluice.rss_kib().saturating_sub(rss);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB under abuse");
    // Every abusive connection is closed by the timeouts, without the clients' help.
    let open = wait_for_no_admin_connection(&sluice, Duration::from_secs(5));
    assert_eq!(open, 0, "abusive connections still open after the timeouts");
    drop(held);

    let stats = sluice.admin().with_token(READ_TOKEN).stats();
    assert_eq!((stats["tables_version"].clone(), stats["reloads"].clone()), (1.into(), 0.into()));
    assert_eq!(stats["reload_failures"], 0, "no unauthorized reload even reached the file");
    assert_eq!(stats["services"][0]["backends"][0]["state"], "enabled");
    long_lived.write_all(b"y").unwrap();
    let mut back = [0u8; 1];
    long_lived.read_exact(&mut back).expect("the long-lived session was not cut");
    assert_eq!(&back, b"y");
    // With the write token, the same reload goes through.
    answers(&sluice, "POST", "/reload", Some(WRITE_TOKEN)).expect("reload with the write token");
    assert_eq!(sluice_tests::tagged_round_trip(sluice.addr("web"), b"after").0, b'B');
    no_panic(&sluice);
}

sluice_tests::for_each_driver!(admin_listens_again_after_fd_exhaustion, admin_plane_under_abuse);
