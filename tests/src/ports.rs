//! Port allocation for sluice's listeners, safe across parallel test threads and several
//! test processes at once.
//!
//! Sluice binds its own listeners (with SO_REUSEPORT), so a test must hand it a port that is
//! free. Ports come from a range below the kernel's ephemeral range (so no outgoing
//! connection can hold one), walked by one atomic counter from an offset derived from the
//! process id (so concurrent test processes start far apart), and each candidate is checked
//! by binding it. [`crate::Sluice::start`] picks again if sluice still loses a race.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// First port handed out.
const FIRST: u32 = 20_000;
/// Number of ports in the range; the range ends below the default ephemeral range (32768).
const COUNT: u32 = 12_000;
/// Candidates tried before giving up.
const TRIES: u32 = 2_000;

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

fn next_candidate() -> u16 {
    let start = (std::process::id().wrapping_mul(2_654_435_761)) % COUNT;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (FIRST + n % COUNT) as u16
}

/// A port that is free on `ip` right now (nothing bound to it).
pub fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..TRIES {
        let port = next_candidate();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} in {FIRST}..{} after {TRIES} tries", FIRST + COUNT);
}

/// A free address on `ip` for a sluice listener.
pub fn free_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, free_port(ip))
}

/// A free address on `ip` for a sluice UDP listener (free for UDP and TCP alike).
pub fn free_udp_addr(ip: IpAddr) -> SocketAddr {
    for _ in 0..TRIES {
        let addr = free_addr(ip);
        if UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free UDP port on {ip}");
}

/// A loopback address where nothing listens: a connect to it is refused at once.
pub fn refused_addr() -> SocketAddr {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for _ in 0..TRIES {
        let addr = free_addr(ip);
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return addr,
            _ => continue,
        }
    }
    panic!("no loopback port refuses connections");
}
