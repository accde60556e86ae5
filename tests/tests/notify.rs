//! The service-manager protocol (sd_notify), heard on a notify socket the test binds itself,
//! with SO_PASSCRED so that each message's sender pid is known, as systemd knows it: READY=1
//! once the listeners accept, with MAINPID and a STATUS naming sessions and the tables
//! version; RELOADING=1 with a MONOTONIC_USEC inside the reload's window, then READY=1;
//! WATCHDOG=1 at half the WATCHDOG_USEC interval; across an upgrade, MAINPID= naming the new
//! process sent by the old one, then READY=1 from the new one, and no word from the old one
//! afterwards; STOPPING=1 at SIGTERM.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use sluice_tests::{
    connect, tagged_round_trip, Adopted, Backend, Config, Driver, Reload, Service, Signal, Sluice,
};

/// The watchdog interval the test asks for: pings every 100 ms.
const WATCHDOG_USEC: u64 = 200_000;

/// One notification: who sent it and its `KEY=value` lines.
#[derive(Debug, Clone)]
struct Note {
    pid: u32,
    text: String,
}

impl Note {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

struct Listener {
    socket: UnixDatagram,
}

impl Listener {
    fn bind(path: &std::path::Path) -> Listener {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        Listener { socket }
    }

    fn next(&self) -> Option<Note> {
        let mut buf = vec![0u8; 4096];
        let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .ok()?;
        let pid = msg.cmsgs().ok()?.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid() as u32),
            _ => None,
        })?;
        let n = msg.bytes;
        Some(Note { pid, text: String::from_utf8_lossy(&buf[..n]).into_owned() })
    }

    /// Notes until one satisfies `wanted` (returned with those before it), or `timeout`.
    fn until(
        &self,
        timeout: Duration,
        wanted: impl Fn(&Note) -> bool,
    ) -> (Option<Note>, Vec<Note>) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(note) = self.next() {
                if wanted(&note) {
                    return (Some(note), seen);
                }
                seen.push(note);
            }
        }
        (None, seen)
    }
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

#[test]
fn the_manager_hears_ready_reload_watchdog_upgrade_and_stop() {
    let backend = Backend::tagged_echo(b'A');
    let dir = sluice_tests::ScratchDir::new();
    let path = dir.join("notify.sock");
    let listener = Listener::bind(&path);
    let config = Config::new(Driver::Epoll)
        .service(Service::new("web", &[backend.addr()]))
        .env("NOTIFY_SOCKET", path.to_str().expect("utf-8"))
        .env("WATCHDOG_USEC", &WATCHDOG_USEC.to_string());
    let Some(sluice) = Sluice::start(config.clone()) else { return };
    let pid = sluice.pid();

    // READY=1 from the process itself, once it accepts.
    let (ready, _) = listener.until(Duration::from_secs(5), |n| n.has("READY=1"));
    let ready = ready.expect("READY=1 after start");
    assert_eq!(ready.pid, pid);
    assert_eq!(ready.value("MAINPID"), Some(pid.to_string().as_str()));
    let status = ready.value("STATUS").expect("a STATUS with READY");
    assert!(status.contains("0 sessions") && status.contains("tables version 1"), "{status}");
    tagged_round_trip(sluice.addr("web"), b"ready means accepting");

    // The watchdog: pings every 100 ms, from the process itself.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(650) {
        if let Some(n) = listener.next() {
            pings += usize::from(n.has("WATCHDOG=1") && n.pid == pid);
        }
    }
    assert!((4..=8).contains(&pings), "{pings} watchdog pings in 650 ms at 200 ms WATCHDOG_USEC");

    // A reload, with a session open: RELOADING=1 stamped inside the reload, then READY=1.
    let mut held = connect(sluice.addr("web"));
    let _ = sluice_tests::read_exactly(&mut held, 1);
    let before = monotonic_usec();
    assert_eq!(sluice.reload(Duration::from_secs(5)), Reload::Applied(2));
    let after = monotonic_usec();
    let (reloading, _) = listener.until(Duration::from_secs(2), |n| n.has("RELOADING=1"));
    let reloading = reloading.expect("RELOADING=1");
    let stamp: u64 =
        reloading.value("MONOTONIC_USEC").expect("MONOTONIC_USEC").parse().expect("µs");
    assert!((before..=after).contains(&stamp), "{stamp} outside {before}..={after}");
    let (ready, _) = listener.until(Duration::from_secs(2), |n| n.has("READY=1"));
    let status = ready.expect("READY=1 after the reload").value("STATUS").map(str::to_string);
    let status = status.expect("a STATUS");
    assert!(status.contains("1 sessions") && status.contains("tables version 2"), "{status}");
    drop(held);

    // An upgrade: the old process names the new main pid, then falls silent; the new one
    // says READY=1 and takes over the watchdog.
    let new_pid = sluice.upgrade().expect("upgrade");
    let successor = Adopted::new(new_pid);
    let (handed, _) = listener
        .until(Duration::from_secs(5), |n| n.value("MAINPID") == Some(&new_pid.to_string()));
    let handed = handed.expect("MAINPID= naming the new process");
    assert_eq!(handed.pid, pid, "the old (main) process names its successor");
    let (ready, _) =
        listener.until(Duration::from_secs(5), |n| n.has("READY=1") && n.pid == new_pid);
    assert!(ready.is_some(), "READY=1 from the new process");
    let (_, later) = listener.until(Duration::from_millis(500), |_| false);
    assert!(
        later.iter().all(|n| n.pid != pid),
        "the old process spoke after handing over: {later:?}"
    );
    assert!(later.iter().any(|n| n.has("WATCHDOG=1") && n.pid == new_pid), "{later:?}");

    // STOPPING=1 at SIGTERM.
    successor.signal(Signal::SIGTERM);
    let (stopping, _) =
        listener.until(Duration::from_secs(5), |n| n.has("STOPPING=1") && n.pid == new_pid);
    assert!(stopping.is_some(), "STOPPING=1 at SIGTERM");
    assert!(sluice_tests::wait_gone(new_pid, Duration::from_secs(10)));
}
