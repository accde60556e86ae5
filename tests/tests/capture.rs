//! Capture to pcapng: the sessions a service (or rule) captures are written as files that
//! the `pcap-file` crate and `tcpdump -r` both read, whose reassembled streams equal what
//! passed byte for byte, with the handshake, half-close (FIN) and reset (RST) of the
//! session; files are 0600, rotated at `max_file`, and `max_total` stops capture (with a
//! marker and a counter) without touching the session.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_tests::capture::{
    capture_files, read_pcapng, read_tcpdump, stream, try_read_pcapng, Segment, FIN, RST, SYN,
};
use sluice_tests::{
    abort, connect, drain, echo_round_trip, read_exactly, Backend, Config, Driver, End, Payload,
    Reports, ScratchDir, Service, SessionKey, Sluice,
};

/// Client to backend, then backend to client: several segments and relay buffers, not a
/// multiple of either.
const UP: u64 = 300_007;
const DOWN: u64 = 200_003;
const UP_SEED: u64 = 71;
const DOWN_SEED: u64 = 72;
/// How long a finished session's file may take to be complete on disk.
const WRITTEN: Duration = Duration::from_secs(10);

fn capture_line(dir: &Path, more: &str) -> String {
    format!("capture = {{ dir = {:?}{more} }}", dir.display().to_string())
}

fn captured(driver: Driver, backend: &Backend, dir: &Path, more: &str) -> Option<Sluice> {
    let service = Service::new("cap", &[backend.addr()]).key(&capture_line(dir, more));
    Sluice::start(Config::new(driver).workers(1).admin_tcp().service(service))
}

/// Waits until the session of `client` has its files with `last` flags on its final
/// segment (the session's close was written), and returns their segments in order.
fn wait_for_capture(
    dir: &Path,
    client: SocketAddr,
    done: impl Fn(&[Segment]) -> bool,
) -> Vec<PathBuf> {
    let deadline = Instant::now() + WRITTEN;
    loop {
        let files = capture_files(dir, client);
        let read: Result<Vec<Vec<Segment>>, String> =
            files.iter().map(|f| try_read_pcapng(f)).collect();
        if let (false, Ok(segs)) = (files.is_empty(), read) {
            if done(&segs.concat()) {
                return files;
            }
        }
        assert!(Instant::now() < deadline, "no complete capture of {client} in {}", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fins(segs: &[Segment]) -> usize {
    segs.iter().filter(|s| s.flags & FIN != 0).count()
}

/// Checks one session's segments from both readers: the handshake first, the streams equal
/// `up` and `down`.
fn assert_streams(
    segs: &[Segment],
    client: SocketAddr,
    backend: SocketAddr,
    up: &[u8],
    down: &[u8],
) {
    assert!(segs.len() >= 3, "only {} segments", segs.len());
    assert_eq!((segs[0].src, segs[0].dst, segs[0].flags), (client, backend, SYN));
    assert_eq!((segs[1].src, segs[1].flags & SYN), (backend, SYN));
    let got_up = stream(segs, client);
    let got_down = stream(segs, backend);
    assert_eq!(got_up.len(), up.len(), "client -> backend length");
    assert!(got_up == up, "client -> backend bytes differ");
    assert_eq!(got_down.len(), down.len(), "backend -> client length");
    assert!(got_down == down, "backend -> client bytes differ");
}

fn assert_private(files: &[PathBuf]) {
    for f in files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
    }
}

/// Both readers agree with the payloads; returns the pcap-file reader's segments.
fn read_both(files: &[PathBuf], check: impl Fn(&[Segment])) -> Vec<Segment> {
    let segs: Vec<Segment> = files.iter().flat_map(|f| read_pcapng(f)).collect();
    check(&segs);
    let dumped: Option<Vec<Segment>> =
        files.iter().map(|f| read_tcpdump(f)).collect::<Option<Vec<_>>>().map(|v| v.concat());
    if let Some(dumped) = dumped {
        assert_eq!(dumped.len(), segs.len(), "tcpdump read a different number of packets");
        check(&dumped);
    }
    segs
}

/// The client sends UP bytes and half-closes; the backend reads to EOF, answers DOWN bytes
/// and closes. The capture shows the handshake, both streams byte for byte, the client's
/// FIN before the backend's data ends, then the backend's FIN; counters say so.
fn half_closed_session_reads_back_byte_exact(driver: Driver) {
    let dir = ScratchDir::new();
    let reports = Reports::default();
    let tx = reports.clone();
    let backend = Backend::spawn(move |mut stream| {
        let got = drain(&mut stream);
        let sent = Payload::new(DOWN_SEED, DOWN).write_to(&mut stream, |_| {});
        tx.push((got, sent.is_ok()));
    });
    let Some(sluice) = captured(driver, &backend, dir.path(), "") else { return };
    let mut client = connect(sluice.addr("cap"));
    let key = SessionKey::of(&client);
    client.write_all(&Payload::bytes(UP_SEED, UP as usize)).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let reply = drain(&mut client);
    assert_eq!((reply.bytes, reply.end), (DOWN, End::Eof));
    let (got, sent) = reports.first(Duration::from_secs(10)).expect("backend report");
    assert!(sent && got.bytes == UP);

    let files = wait_for_capture(dir.path(), key.client, |s| fins(s) == 2);
    assert_eq!(files.len(), 1, "one file per session: {files:?}");
    assert_private(&files);
    let (up, down) =
        (Payload::bytes(UP_SEED, UP as usize), Payload::bytes(DOWN_SEED, DOWN as usize));
    let segs = read_both(&files, |segs| {
        assert_streams(segs, key.client, backend.addr(), &up, &down);
        let fin_at = |from| segs.iter().position(|s| s.src == from && s.flags & FIN != 0);
        let client_fin = fin_at(key.client).expect("the client's FIN");
        let backend_fin = fin_at(backend.addr()).expect("the backend's FIN");
        let last_down = segs.iter().rposition(|s| s.src == backend.addr() && !s.payload.is_empty());
        assert!(client_fin < backend_fin, "the client half-closed first");
        assert!(last_down.unwrap() < backend_fin, "no data after the backend's FIN");
        assert!(segs.iter().all(|s| s.flags & RST == 0), "a clean close has no RST");
    });
    assert!(segs.iter().all(|s| s.comment.is_none()), "no marker in a complete capture");

    let stats = sluice.admin().stats();
    let c = &stats["capture"];
    assert_eq!(c["sessions"], 1, "{c}");
    assert_eq!(c["payload_bytes"], UP + DOWN, "{c}");
    assert_eq!(c["files"], 1, "{c}");
    let name = files[0].file_name().unwrap().to_str().unwrap();
    assert!(name.contains("-cap-127.0.0.1_"), "named by time, service and client: {name}");
}

/// The backend sends bytes, waits until the client has them all and answered, then resets:
/// the capture holds both streams exactly and ends with the backend's RST.
fn reset_session_ends_with_the_backends_rst(driver: Driver) {
    const GREETING: u64 = 100_000;
    let dir = ScratchDir::new();
    let backend = Backend::spawn(move |mut stream| {
        if Payload::new(DOWN_SEED, GREETING).write_to(&mut stream, |_| {}).is_ok()
            && stream.read_exact(&mut [0; 3]).is_ok()
        {
            abort(stream);
        }
    });
    let Some(sluice) = captured(driver, &backend, dir.path(), "") else { return };
    let mut client = connect(sluice.addr("cap"));
    let key = SessionKey::of(&client);
    let got = read_exactly(&mut client, GREETING as usize);
    assert_eq!(got, Payload::bytes(DOWN_SEED, GREETING as usize));
    client.write_all(b"ack").unwrap();
    let end = drain(&mut client);
    assert_eq!((end.bytes, end.end), (0, End::Reset));

    let files = wait_for_capture(dir.path(), key.client, |s| s.iter().any(|s| s.flags & RST != 0));
    let down = Payload::bytes(DOWN_SEED, GREETING as usize);
    read_both(&files, |segs| {
        assert_streams(segs, key.client, backend.addr(), b"ack", &down);
        let last = segs.last().unwrap();
        assert_eq!((last.src, last.flags & RST), (backend.addr(), RST), "ends with the RST");
        assert_eq!(fins(segs), 0, "a reset session shows no FIN");
    });
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("session line");
    assert_eq!(record.reason, "backend_rst");
}

/// With `max_file = 64 KiB`, a 300 KB echo is split into several files, each within the
/// limit and starting with its own handshake, which together hold both streams. With
/// `max_total = 1 MiB`, a 2 MiB stream stops being captured once the files would pass it:
/// the session still relays every byte, the last file ends with a marker that says
/// `max_total`, the counter rises, and the directory stays within the limit.
fn rotation_and_max_total_are_honoured(driver: Driver) {
    const ECHO: u64 = 300_007;
    const BIG: u64 = 2 << 20;
    const MAX_FILE: u64 = 64 << 10;
    const MAX_TOTAL: u64 = 1 << 20;
    let dir = ScratchDir::new();
    let echo = Backend::echo();
    let (sink, sunk) = Backend::sink();
    let more = r#", max_file = "64 KiB", max_total = "1 MiB""#;
    let line = capture_line(dir.path(), more);
    let config = Config::new(driver)
        .workers(1)
        .admin_tcp()
        .service(Service::new("echo", &[echo.addr()]).key(&line))
        .service(Service::new("sink", &[sink.addr()]).key(&line));
    let Some(sluice) = Sluice::start(config) else { return };

    let key = echo_round_trip(sluice.addr("echo"), UP_SEED, ECHO);
    let files = wait_for_capture(dir.path(), key.client, |s| fins(s) == 2);
    assert!(files.len() >= 4, "{ECHO} bytes each way in 64 KiB files: {} files", files.len());
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= MAX_FILE, "{} holds {len} bytes", f.display());
        let segs = read_pcapng(f);
        assert_eq!(segs[0].flags, SYN, "{} starts with a handshake", f.display());
    }
    assert_private(&files);
    let payload = Payload::bytes(UP_SEED, ECHO as usize);
    read_both(&files, |segs| assert_streams(segs, key.client, echo.addr(), &payload, &payload));

    let mut client = connect(sluice.addr("sink"));
    let big = SessionKey::of(&client);
    Payload::new(DOWN_SEED, BIG).write_to(&mut client, |_| {}).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let report = sunk.first(Duration::from_secs(20)).expect("sink report");
    assert_eq!((report.bytes, report.sha256), (BIG, Payload::sha256(DOWN_SEED, BIG)));
    let files =
        wait_for_capture(dir.path(), big.client, |s| s.last().is_some_and(|s| s.comment.is_some()));
    let segs: Vec<Segment> = files.iter().flat_map(|f| read_pcapng(f)).collect();
    let marker = segs.last().unwrap().comment.clone().unwrap();
    assert!(marker.contains("max_total"), "marker: {marker}");
    let captured = stream(&segs, big.client);
    assert!(captured.len() < BIG as usize, "capture stopped before the end");
    assert_eq!(captured, Payload::bytes(DOWN_SEED, captured.len()), "a prefix of the stream");
    let total: u64 =
        std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
    assert!(total <= MAX_TOTAL, "the directory holds {total} bytes");
    let stats = sluice.admin().stats();
    assert_eq!(stats["capture"]["stopped"]["max_total"], 1, "{}", stats["capture"]);
    let m = sluice.admin().metrics();
    assert_eq!(m.get("sluice_capture_stopped_total", &[("reason", "max_total")]), 1.0);
}

/// A session no rule or service captures writes nothing, while a captured one does; a
/// firewall rule's capture applies to the sessions it allows.
fn only_matching_sessions_are_captured(driver: Driver) {
    let dir = ScratchDir::new();
    let echo = Backend::echo();
    let watched = Service::new("watched", &[echo.addr()]);
    let rule = format!(
        "[[firewall]]\nname = \"watch\"\naction = \"allow\"\nto = [\":{}\"]\n{}",
        watched.listen[0].port(),
        capture_line(dir.path(), "")
    );
    let config = Config::new(driver)
        .workers(1)
        .admin_tcp()
        .service(watched)
        .service(Service::new("plain", &[echo.addr()]))
        .section(&rule);
    let Some(sluice) = Sluice::start(config) else { return };
    let plain = echo_round_trip(sluice.addr("plain"), UP_SEED, 10_000);
    let seen = echo_round_trip(sluice.addr("watched"), UP_SEED, 10_000);
    let files = wait_for_capture(dir.path(), seen.client, |s| fins(s) == 2);
    let payload = Payload::bytes(UP_SEED, 10_000);
    read_both(&files, |segs| assert_streams(segs, seen.client, echo.addr(), &payload, &payload));
    sluice.wait_for_session(plain, Duration::from_secs(5)).expect("session line");
    assert!(capture_files(dir.path(), plain.client).is_empty(), "the plain session was captured");
    assert_eq!(sluice.admin().stats()["capture"]["sessions"], 1);
}

/// A session that began under a capture keeps being captured to its end after a reload
/// removes the capture; sessions that begin after the reload are not captured.
fn reload_keeps_running_captures_going(driver: Driver) {
    let dir = ScratchDir::new();
    let echo = Backend::echo();
    let Some(sluice) = captured(driver, &echo, dir.path(), "") else { return };
    let payload = Payload::bytes(UP_SEED, UP as usize);
    let mut client = connect(sluice.addr("cap"));
    let key = SessionKey::of(&client);
    let half = payload.len() / 2;
    client.write_all(&payload[..half]).unwrap();
    assert_eq!(read_exactly(&mut client, half), payload[..half]);

    let mut next = sluice.config().expect("config").clone();
    next.service_mut("cap").keys.clear();
    sluice.write_config(&next);
    sluice.reload(Duration::from_secs(5));
    let after = echo_round_trip(sluice.addr("cap"), UP_SEED, 10_000);

    client.write_all(&payload[half..]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let rest = drain(&mut client);
    assert_eq!((rest.bytes, rest.end), ((payload.len() - half) as u64, End::Eof));
    let files = wait_for_capture(dir.path(), key.client, |s| fins(s) == 2);
    read_both(&files, |segs| assert_streams(segs, key.client, echo.addr(), &payload, &payload));
    sluice.wait_for_session(after, Duration::from_secs(5)).expect("session line");
    assert!(capture_files(dir.path(), after.client).is_empty(), "captured after the reload");
}

/// 64 MiB each way at once through a captured session: whether the capture keeps up or
/// stops (then with a marker and a counter), the session relays every byte, and what was
/// captured is exactly the start of each stream.
fn a_bulk_capture_never_costs_the_session_a_byte(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    const BULK: u64 = 64 << 20;
    let dir = ScratchDir::new();
    let echo = Backend::echo();
    let Some(sluice) = captured(driver, &echo, dir.path(), "") else { return };
    let key = echo_round_trip(sluice.addr("cap"), DOWN_SEED, BULK);
    let files = wait_for_capture(dir.path(), key.client, |s| {
        fins(s) == 2 || s.last().is_some_and(|s| s.comment.is_some())
    });
    let segs: Vec<Segment> = files.iter().flat_map(|f| read_pcapng(f)).collect();
    for from in [key.client, echo.addr()] {
        let got = stream(&segs, from);
        assert!(got == Payload::bytes(DOWN_SEED, got.len()), "{from}: not a prefix");
    }
    let stats = sluice.admin().stats();
    let stopped: u64 = ["queue_full", "pipe_full", "max_total", "write_error", "too_many"]
        .iter()
        .map(|r| stats["capture"]["stopped"][r].as_u64().unwrap())
        .sum();
    let marker = segs.last().unwrap().comment.clone();
    let captured = [key.client, echo.addr()].map(|from| stream(&segs, from).len());
    println!(
        "capture: {} files, {captured:?} bytes up and down, stopped: {stopped}, marker: {marker:?}",
        files.len()
    );
    assert_eq!(stopped, u64::from(marker.is_some()), "a stop is counted and marked");
    // Even a capture that falls behind first fills what it is given (a 64 MiB copy budget,
    // or a pipe of at least 64 KiB on the splice relay): an empty one behind a marker
    // would be a capture that never started.
    assert!(captured.iter().sum::<usize>() >= 64 << 10, "captured only {captured:?} bytes");
    if marker.is_none() {
        assert_eq!(stream(&segs, key.client).len() as u64, BULK, "a complete capture");
    }
}

sluice_tests::for_each_driver!(
    reload_keeps_running_captures_going,
    a_bulk_capture_never_costs_the_session_a_byte,
    half_closed_session_reads_back_byte_exact,
    reset_session_ends_with_the_backends_rst,
    rotation_and_max_total_are_honoured,
    only_matching_sessions_are_captured
);
