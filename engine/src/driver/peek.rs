//! Waiting for the client's TLS ClientHello when the firewall matches on SNI: peek at what
//! the client sent (MSG_PEEK: nothing is consumed, the backend later receives every byte),
//! and if the hello is not complete, raise SO_RCVLOWAT to the size it announces so that the
//! next readiness report means "the whole hello is here" (no wake-up per segment, and no
//! busy loop on level-triggered polls).

use std::io;
use std::os::fd::RawFd;

use std::time::Instant;

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
