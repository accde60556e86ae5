//! The service manager's notification protocol (sd_notify), spoken without libsystemd: one
//! datagram per state change to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name starting with `@`). Without that variable every call does nothing.
//!
//! What sluice says and when: `READY=1` once every worker accepts; `RELOADING=1` with
//! `MONOTONIC_USEC=` when a reload begins and `READY=1` when it ends; `STOPPING=1` at a stop
//! signal; `STATUS=` with sessions and the tables version; `MAINPID=` naming the new process
//! after a binary upgrade; `WATCHDOG=1` every half `$WATCHDOG_USEC` when the manager asks for
//! a watchdog (and `$WATCHDOG_PID`, if set, is this process).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// The environment variable naming the manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog interval the manager expects, in microseconds, and the process it is for.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// How often `STATUS=` is refreshed while nothing else changes.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// A connection to the service manager, or nothing when there is none.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    next_ping: Option<Instant>,
    next_status: Instant,
    /// Set once a successor is the main process: nothing more is said.
    silent: bool,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`; an unusable socket is logged once and
    /// ignored (notification must never stop the service).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os(NOTIFY_SOCKET).and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            match open(&path) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("cannot use {NOTIFY_SOCKET}={path}: {e}");
                    None
                }
            }
        });
        let watchdog = watchdog_interval().filter(|_| target.is_some());
        Notifier {
            target,
            watchdog,
            next_ping: watchdog.map(|w| Instant::now() + w / 2),
            next_status: Instant::now() + STATUS_INTERVAL,
            silent: false,
        }
    }

    /// Whether a manager listens.
    pub fn is_active(&self) -> bool {
        self.target.is_some() && !self.silent
    }

    /// The watchdog interval the manager asked for.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `message` (lines of `KEY=value`).
    pub fn send(&self, message: &str) {
        if self.silent {
            return;
        }
        let Some((socket, addr)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            log::debug!("{NOTIFY_SOCKET}: cannot send {message:?}: {e}");
        }
    }

    /// `READY=1` with the process id and a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nMAINPID={}\nSTATUS={status}", std::process::id()));
    }

    /// `RELOADING=1` with the monotonic time the reload began.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// Hands the main-process role to `pid` (a binary upgrade); this process says nothing
    /// more afterwards.
    pub fn hand_over(&mut self, pid: u32) {
        self.send(&format!("MAINPID={pid}\nSTATUS=handed over to pid {pid}; draining"));
        self.silent = true;
    }

    /// Called on every control-loop turn: pings the watchdog and refreshes the status when
    /// due. The watchdog is fed by the control thread, so a control loop that stops turning
    /// (stuck in a reload, a deadlock) goes unfed and the manager restarts the service.
    pub fn tick(&mut self, now: Instant, status: impl FnOnce() -> String) {
        if !self.is_active() {
            return;
        }
        if let (Some(interval), Some(due)) = (self.watchdog, self.next_ping) {
            if now >= due {
                self.send("WATCHDOG=1");
                self.next_ping = Some(now + interval / 2);
            }
        }
        if now >= self.next_status {
            self.send(&format!("STATUS={}", status()));
            self.next_status = now + STATUS_INTERVAL;
        }
    }
}

fn open(path: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(path)?,
    };
    Ok((UnixDatagram::unbound()?, addr))
}

/// `$WATCHDOG_USEC`, when it is set, positive, and meant for this process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var(WATCHDOG_USEC).ok()?.parse().ok().filter(|&u| u > 0)?;
    if let Ok(pid) = std::env::var(WATCHDOG_PID) {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// CLOCK_MONOTONIC in microseconds, the clock the manager compares `MONOTONIC_USEC` with.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_usec_moves_forward_with_the_clock() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(5));
        let b = monotonic_usec();
        assert!(b >= a + 5_000, "{a} -> {b}");
    }
}
