//! What happens between accept and the firewall's decision, when the session must first
//! read the client's opening bytes:
//!
//! - on a listener that accepts PROXY protocol, the header is peeked at until complete,
//!   then exactly its bytes are consumed and its source becomes the session's client (for
//!   the firewall, the balancer and the records); an untrusted source, a bad header, an
//!   early close or the PROXY timeout close the session as `proxy_error`;
//! - when the firewall matches on SNI, the client's TLS ClientHello is peeked at (MSG_PEEK:
//!   nothing is consumed, the backend later receives every byte);
//! - either way, while the bytes are incomplete the client's SO_RCVLOWAT is raised to the
//!   size announced so far, so the next readiness report means "enough is here" (no
//!   wake-up per segment, and no busy loop on level-triggered polls); it is set back to 1
//!   before the session is decided.

use std::time::Instant;

use super::{Action, IoError, Phase, Session};
use crate::counters::WorkerStats;
use crate::proxy::{self, Parsed};
use crate::record::CloseReason;
use crate::sni::{read_sni, Sni, MAX_CLIENT_HELLO};
use crate::tables::SniUnreadable;

/// Length of a TLS record header.
const RECORD_HEADER: usize = 5;

/// Where the peeking of a session stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Step {
    /// Nothing to ask for (an outcome is awaited, or the session is not peeking).
    #[default]
    Idle,
    /// Ask for the client's readiness.
    Await,
    /// Readiness asked for.
    Awaiting,
    /// The client has bytes: peek at them.
    Peek,
    /// Read off exactly this many bytes (a PROXY header).
    Consume(u32),
}

/// The peeking sub-state of a session.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Peek {
    step: Step,
    /// Bytes to peek at most (a ClientHello or PROXY header: a few KiB).
    max: u32,
    /// A SO_RCVLOWAT to hand out before anything else (0: none).
    lowat: u32,
    /// SO_RCVLOWAT is above 1: it must be set back before the session relays.
    raised: bool,
    /// The PROXY header being consumed, by length.
    consuming: u32,
}

impl Peek {
    /// Wait for the client's bytes, then peek at up to `max` of them.
    fn wait(&mut self, max: usize) {
        self.step = Step::Await;
        self.max = max as u32;
    }

    /// Wait until `bytes` are queued before peeking again.
    fn wait_for(&mut self, bytes: usize) {
        self.lowat = bytes.clamp(1, MAX_CLIENT_HELLO.max(proxy::MAX_HEADER)) as u32;
        self.raised = bytes > 1;
        self.step = Step::Await;
    }

    /// Sets SO_RCVLOWAT back to 1 if it was raised.
    pub(super) fn restore(&mut self) {
        if std::mem::take(&mut self.raised) {
            self.lowat = 1;
        }
    }

    /// The client is readable.
    pub(super) fn ready(&mut self) {
        if matches!(self.step, Step::Await | Step::Awaiting) {
            self.step = Step::Peek;
        }
    }

    /// A SO_RCVLOWAT to set now.
    pub(super) fn lowat(&mut self) -> Option<usize> {
        (self.lowat > 0).then(|| std::mem::take(&mut self.lowat) as usize)
    }

    pub(super) fn next(&mut self) -> Option<Action> {
        match self.step {
            Step::Idle | Step::Awaiting => None,
            Step::Await => {
                self.step = Step::Awaiting;
                Some(Action::AwaitReadable(crate::side::Side::Client))
            }
            Step::Peek => {
                self.step = Step::Idle;
                Some(Action::Peek { max: self.max as usize })
            }
            Step::Consume(n) => {
                self.step = Step::Idle;
                self.consuming = n;
                Some(Action::Consume(n as usize))
            }
        }
    }
}

impl Session {
    /// How a freshly admitted session begins: by peeking at a PROXY header or a
    /// ClientHello, or by being decided at once.
    pub(super) fn begin(&mut self, now: Instant) {
        if let Some(trusted) = &self.service().accept_proxy {
            let ip = self.client.ip();
            if !trusted.iter().any(|net| net.contains(&ip)) {
                return self.close(CloseReason::ProxyError);
            }
            self.phase = Phase::Peeking { since: now, proxy: true };
            return self.peek.wait(proxy::MAX_HEADER);
        }
        if self.admitted.tables.needs_sni(self.admitted.service) {
            self.phase = Phase::Peeking { since: now, proxy: false };
            return self.peek.wait(MAX_CLIENT_HELLO);
        }
        self.decide(None, now);
    }

    /// The outcome of [`Action::Peek`]: the bytes the client has sent so far.
    pub fn on_peeked(&mut self, outcome: Result<&[u8], IoError>, now: Instant) {
        let Phase::Peeking { proxy, .. } = self.phase else { return };
        match outcome {
            Err(IoError::WouldBlock) => self.peek.step = Step::Await,
            Err(_) => self.close(CloseReason::ClientRst),
            Ok(bytes) if proxy => self.read_proxy(bytes),
            Ok(bytes) => self.read_hello(bytes, now),
        }
    }

    /// The outcome of [`Action::Consume`]: how many bytes were read off.
    pub fn on_consumed(&mut self, outcome: Result<usize, IoError>, now: Instant) {
        let expected = std::mem::take(&mut self.peek.consuming) as usize;
        if outcome != Ok(expected) || expected == 0 {
            return self.close(CloseReason::ProxyError);
        }
        self.peek.restore();
        if self.admitted.tables.needs_sni(self.admitted.service) {
            self.phase = Phase::Peeking { since: now, proxy: false };
            self.peek.max = MAX_CLIENT_HELLO as u32;
            // The hello may be here already, right behind the header.
            self.peek.step = Step::Peek;
            return;
        }
        self.decide(None, now);
    }

    /// A PROXY header: wait for the rest, or take its addresses and read it off.
    fn read_proxy(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return self.close(CloseReason::ProxyError);
        }
        match proxy::parse(bytes) {
            Err(_) => self.close(CloseReason::ProxyError),
            Ok(Parsed::Incomplete { need }) => self.peek.wait_for(need),
            Ok(Parsed::Complete(header)) => {
                if let Some((source, destination)) = header.addresses {
                    self.client = source;
                    self.destination = destination;
                }
                // A header is at most proxy::MAX_HEADER bytes.
                self.peek.step = Step::Consume(header.len as u32);
            }
        }
    }

    /// A ClientHello: decide with its server name once it is whole.
    fn read_hello(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() {
            // The client ended its stream without a hello.
            return self.decide(None, now);
        }
        match read_sni(bytes) {
            Sni::Found(name) => self.decide(Some(name.as_str()), now),
            Sni::Absent | Sni::NotTls => self.decide(None, now),
            Sni::TooLarge | Sni::Invalid => self.hello_unreadable(now),
            Sni::Incomplete => self.peek.wait_for(wanted(bytes)),
        }
    }

    /// A ClientHello too large, too late or naming no host name: denied, or judged as one
    /// without a name, as the service says ([`crate::tables::Tables::sni_unreadable`]).
    pub(super) fn hello_unreadable(&mut self, now: Instant) {
        let tables = &self.admitted.tables;
        match tables.sni_unreadable(self.admitted.service) {
            SniUnreadable::WithoutName => self.decide(None, now),
            SniUnreadable::Deny => {
                self.peek.restore();
                self.decision = Some(tables.sni_unreadable_denial());
                WorkerStats::add(&self.service().counters.denied, 1);
                self.refuse(CloseReason::Denied);
            }
        }
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

    /// Only a wait for more than one byte raises SO_RCVLOWAT, and only a raised mark is set
    /// back to 1 before the session relays (a mark of 1 costs no second system call).
    #[test]
    fn only_a_raised_low_water_mark_is_set_back() {
        let mut one = Peek::default();
        one.wait_for(1);
        assert_eq!(one.lowat(), Some(1));
        one.restore();
        assert_eq!(one.lowat(), None);
        let mut more = Peek::default();
        more.wait_for(16);
        assert_eq!(more.lowat(), Some(16));
        assert_eq!(more.lowat(), None, "handed out once");
        more.restore();
        assert_eq!(more.lowat(), Some(1));
        more.restore();
        assert_eq!(more.lowat(), None, "set back once");
    }
}
