//! What happens between accept and connect, and right after connect:
//!
//! - on a listener that accepts PROXY protocol, the header is peeked at until complete,
//!   then exactly its bytes are consumed and its source becomes the session's client (for
//!   the firewall, the balancer and the records); an untrusted source, a bad header, an
//!   early close or the PROXY timeout close the session as `proxy_error`;
//! - when the firewall matches on SNI, the client's TLS ClientHello is peeked at (MSG_PEEK:
//!   nothing is consumed, the backend later receives every byte);
//! - either way, while the bytes are incomplete SO_RCVLOWAT is raised to the size announced
//!   so far, so the next readiness report means "enough is here" (no wake-up per segment,
//!   and no busy loop on level-triggered polls);
//! - after connect, a pool that sends PROXY protocol gets its header before any relayed
//!   byte (one send on a fresh socket, whose send buffer always has room for it).

use std::io;
use std::os::fd::RawFd;

use std::time::Instant;

use crate::proxy::{self, Parsed};
use crate::session::{CloseReason, Phase, Session};
use crate::sni::{read_sni, Sni, MAX_CLIENT_HELLO};
use crate::sys;
use crate::worker::Admission;

/// Length of a TLS record header.
const RECORD_HEADER: usize = 5;

/// What a peek found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peeked {
    /// Decide now, with this server name (or none: not TLS, no SNI, too large, or the
    /// client closed its side).
    Decide(Option<String>),
    /// Wait until this many bytes are queued (SO_RCVLOWAT is set to it).
    Wait,
    /// Nothing to read yet.
    NotReady,
    /// The client reset the connection.
    Reset,
    /// The PROXY header is bad or missing: close as `proxy_error`.
    Reject,
}

/// How an admitted session begins.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Decide it now.
    Decide,
    /// Wait for the client's first bytes (PROXY header or ClientHello), then [`peek_client`].
    Peek,
    /// A PROXY header is required and the source is not trusted: close as `proxy_error`.
    Reject,
}

/// Decides how a freshly admitted session begins, and enters its peeking phase if any.
pub(crate) fn start(admission: &Admission, session: &mut Session, now: Instant) -> Start {
    if let Some(trusted) = admission.accept_proxy() {
        let ip = admission.client.ip();
        if !trusted.iter().any(|net| net.contains(&ip)) {
            return Start::Reject;
        }
        session.await_proxy(now);
        return Start::Peek;
    }
    if admission.needs_sni() {
        session.peek(now);
        return Start::Peek;
    }
    Start::Decide
}

/// Peeks at the client's first bytes in the session's peeking phase: its PROXY header,
/// then (if the firewall needs it) its ClientHello.
pub(crate) fn peek_client(
    admission: &mut Admission,
    session: &mut Session,
    fd: RawFd,
    scratch: &mut [u8],
    now: Instant,
) -> Peeked {
    if let Phase::Peeking { proxy: true, .. } = session.phase {
        match read_proxy(admission, fd, scratch) {
            Peeked::Decide(_) if admission.needs_sni() => session.peek(now),
            other => return other,
        }
    }
    peek_sni(fd, scratch)
}

/// Reads the PROXY header: `Decide` once it is consumed (the client address replaced),
/// `Wait`/`NotReady` while incomplete, `Reject` when bad or cut short.
fn read_proxy(admission: &mut Admission, fd: RawFd, scratch: &mut [u8]) -> Peeked {
    let limit = scratch.len().min(proxy::MAX_HEADER);
    let n = match sys::recv_peek(fd, &mut scratch[..limit]) {
        Ok(0) => return Peeked::Reject,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Peeked::NotReady,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Peeked::NotReady,
        Err(_) => return Peeked::Reset,
    };
    let header = match proxy::parse(&scratch[..n]) {
        Err(_) => return Peeked::Reject,
        Ok(Parsed::Incomplete { need }) => {
            return match sys::set_rcvlowat(fd, need) {
                Ok(()) => Peeked::Wait,
                Err(_) => Peeked::Reject,
            }
        }
        Ok(Parsed::Complete(header)) => header,
    };
    // The header's bytes are queued (just peeked): this read takes exactly them.
    match sys::read(fd, &mut scratch[..header.len]) {
        Ok(read) if read == header.len => {}
        _ => return Peeked::Reject,
    }
    let _ = sys::set_rcvlowat(fd, 1);
    if let Some((source, destination)) = header.addresses {
        admission.client = source;
        admission.destination = destination;
    }
    Peeked::Decide(None)
}

/// Sends the pool's PROXY header (if it has one) on a freshly connected backend socket,
/// before any relayed byte. A write cut short (which a fresh socket's send buffer, at least
/// 4 KiB against a header of at most 107 bytes, never causes) is continued; one that would
/// block closes the session rather than send a truncated header.
pub(crate) fn send_proxy_header(admission: &Admission, fd: RawFd) -> Result<(), CloseReason> {
    let Some(header) = admission.proxy_header() else { return Ok(()) };
    let mut sent = 0;
    while sent < header.len() {
        match sys::send(fd, &header[sent..], sys::Then::Wait) {
            Ok(n) if n > 0 => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(CloseReason::LocalError),
            Ok(_) | Err(_) => return Err(CloseReason::BackendRst),
        }
    }
    Ok(())
}

/// A per-worker buffer for peeking.
pub(crate) fn scratch() -> Box<[u8]> {
    vec![0; MAX_CLIENT_HELLO].into_boxed_slice()
}

/// Peeks at the client's first bytes and decides whether the server name is known.
pub(crate) fn peek_sni(fd: RawFd, scratch: &mut [u8]) -> Peeked {
    let n = match sys::recv_peek(fd, scratch) {
        Ok(0) => return Peeked::Decide(None),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Peeked::NotReady,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Peeked::NotReady,
        Err(_) => return Peeked::Reset,
    };
    let seen = &scratch[..n];
    match read_sni(seen) {
        Sni::Found(name) => Peeked::Decide(Some(name)),
        Sni::Absent | Sni::NotTls | Sni::TooLarge => Peeked::Decide(None),
        Sni::Incomplete => match sys::set_rcvlowat(fd, wanted(seen)) {
            Ok(()) => Peeked::Wait,
            Err(_) => Peeked::Decide(None),
        },
    }
}

/// How many bytes to wait for: the end of the record the client has begun, or one more
/// record header when the hello spans records.
fn wanted(seen: &[u8]) -> usize {
    let announced = if seen.len() >= RECORD_HEADER {
        RECORD_HEADER + usize::from(u16::from_be_bytes([seen[3], seen[4]]))
    } else {
        RECORD_HEADER
    };
    let wanted = if announced > seen.len() { announced } else { seen.len() + RECORD_HEADER };
    wanted.min(MAX_CLIENT_HELLO)
}

/// Decides a session with the firewall, given the client's server name if one was peeked:
/// restores normal readiness reporting on the client after a peek, and starts an allowed
/// session's first connect attempt. `Err` names why the session is refused.
pub(crate) fn decide(
    admission: &mut Admission,
    session: &mut Session,
    client: RawFd,
    sni: Option<&str>,
    now: Instant,
) -> Result<(), CloseReason> {
    if let Phase::Peeking { .. } = session.phase {
        let _ = sys::set_rcvlowat(client, 1);
    }
    admission.judge(sni, now)?;
    session.decided(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_announced_record_then_for_the_next_header() {
        assert_eq!(wanted(&[22, 3]), RECORD_HEADER);
        assert_eq!(wanted(&[22, 3, 1, 0x02, 0x00]), 5 + 512);
        let mut whole = vec![22, 3, 1, 0, 4];
        whole.extend_from_slice(&[1, 0, 0, 9]);
        assert_eq!(wanted(&whole), whole.len() + RECORD_HEADER);
        assert_eq!(wanted(&[22, 3, 1, 0xff, 0xff]), MAX_CLIENT_HELLO);
    }
}
