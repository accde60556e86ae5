//! Per-connection state machines shared by the in-process backends and the bulk client.
//!
//! Each `pump` moves as many bytes as it can without blocking and reports what the event
//! loop must do next: wait for readiness ([`Pump::Idle`]), come back at once because the
//! work budget ran out ([`Pump::Again`]), or drop the connection ([`Pump::Closed`]).
//! Invariant: `Idle` is only returned after a read or write hit "would block", so with
//! edge-triggered readiness no wake-up is ever lost; the budget keeps one busy connection
//! from starving the others on the same loop.

use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mio::net::TcpStream;

use crate::net::{read_some, write_some};

/// Size of the read and write buffers of bulk transfers.
pub const CHUNK: usize = 256 * 1024;
/// Reads or writes per direction per turn before yielding to other connections.
const BUDGET: usize = 16;
/// Buffer of an echo session; larger requests are echoed in pieces.
const ECHO_BUFFER: usize = 64 * 1024;

/// What the event loop does with a connection after pumping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Nothing more until the next readiness event.
    Idle,
    /// Budget used up with work left: pump again without waiting.
    Again,
    /// Finished or failed: drop it.
    Closed,
}

impl Pump {
    /// The more urgent of two outcomes: closing beats retrying beats waiting.
    pub fn and(self, other: Pump) -> Pump {
        match (self, other) {
            (Pump::Closed, _) | (_, Pump::Closed) => Pump::Closed,
            (Pump::Again, _) | (_, Pump::Again) => Pump::Again,
            _ => Pump::Idle,
        }
    }
}

/// Bytes moved by one bulk connection, read by the measuring thread.
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

/// Endless transfer: always drains what arrives, and optionally sends without pause.
pub struct BulkSession {
    stream: TcpStream,
    send: bool,
    counters: Arc<StreamCounters>,
}

impl BulkSession {
    pub fn new(stream: TcpStream, send: bool, counters: Arc<StreamCounters>) -> Self {
        Self { stream, send, counters }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Drains input, then (if sending) fills the socket from `payload`.
    pub fn pump(&mut self, scratch: &mut [u8], payload: &[u8]) -> Pump {
        let read = self.drain(scratch);
        if read == Pump::Closed || !self.send {
            return read;
        }
        read.and(self.fill(payload))
    }

    fn drain(&mut self, scratch: &mut [u8]) -> Pump {
        for _ in 0..BUDGET {
            match read_some(&mut self.stream, scratch) {
                Ok(Some(0)) | Err(_) => return Pump::Closed,
                Ok(Some(n)) => self.counters.received.fetch_add(n as u64, Ordering::Relaxed),
                Ok(None) => return Pump::Idle,
            };
        }
        Pump::Again
    }

    fn fill(&mut self, payload: &[u8]) -> Pump {
        for _ in 0..BUDGET {
            match write_some(&mut self.stream, payload) {
                Err(_) => return Pump::Closed,
                Ok(Some(n)) => self.counters.sent.fetch_add(n as u64, Ordering::Relaxed),
                Ok(None) => return Pump::Idle,
            };
        }
        Pump::Again
    }
}

/// Writes back every byte it reads, in order.
pub struct EchoSession {
    stream: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl EchoSession {
    pub fn new(stream: TcpStream) -> Self {
        Self { stream, buf: vec![0; ECHO_BUFFER].into_boxed_slice(), start: 0, end: 0 }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Flushes what is pending, then reads more; stops reading while output is blocked.
    pub fn pump(&mut self) -> Pump {
        for _ in 0..BUDGET {
            let step = if self.start < self.end { self.flush() } else { self.refill() };
            match step {
                Some(Pump::Idle) => return Pump::Idle,
                Some(Pump::Closed) => return Pump::Closed,
                _ => {}
            }
        }
        Pump::Again
    }

    fn flush(&mut self) -> Option<Pump> {
        match write_some(&mut self.stream, &self.buf[self.start..self.end]) {
            Err(_) => Some(Pump::Closed),
            Ok(None) => Some(Pump::Idle),
            Ok(Some(n)) => {
                self.start += n;
                None
            }
        }
    }

    fn refill(&mut self) -> Option<Pump> {
        match read_some(&mut self.stream, &mut self.buf) {
            Ok(Some(0)) | Err(_) => Some(Pump::Closed),
            Ok(None) => Some(Pump::Idle),
            Ok(Some(n)) => {
                (self.start, self.end) = (0, n);
                None
            }
        }
    }
}

/// Reads a fixed-size request, writes a fixed-size reply, then closes first.
///
/// Closing first puts TIME_WAIT on the server side, so a client that reads to end of
/// stream before closing accumulates none and never runs out of ephemeral ports.
pub struct ReplySession {
    stream: TcpStream,
    request: usize,
    reply: usize,
    received: usize,
    written: usize,
}

impl ReplySession {
    pub fn new(stream: TcpStream, request: usize, reply: usize) -> Self {
        Self { stream, request, reply, received: 0, written: 0 }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Advances request, then reply; `Closed` once the reply is out (or on error).
    pub fn pump(&mut self, scratch: &mut [u8], payload: &[u8]) -> Pump {
        while self.received < self.request {
            let want = (self.request - self.received).min(scratch.len());
            match read_some(&mut self.stream, &mut scratch[..want]) {
                Ok(Some(0)) | Err(_) => return Pump::Closed,
                Ok(None) => return Pump::Idle,
                Ok(Some(n)) => self.received += n,
            }
        }
        while self.written < self.reply {
            let want = (self.reply - self.written).min(payload.len());
            match write_some(&mut self.stream, &payload[..want]) {
                Err(_) => return Pump::Closed,
                Ok(None) => return Pump::Idle,
                Ok(Some(n)) => self.written += n,
            }
        }
        // Half-close explicitly so the FIN follows the reply even if close is delayed.
        let _ = self.stream.shutdown(Shutdown::Write);
        Pump::Closed
    }
}

/// Accepts and holds a connection, discarding input, until the peer closes it.
pub struct HoldSession {
    stream: TcpStream,
}

impl HoldSession {
    pub fn new(stream: TcpStream) -> Self {
        Self { stream }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Discards input; `Closed` at end of stream.
    pub fn pump(&mut self, scratch: &mut [u8]) -> Pump {
        for _ in 0..BUDGET {
            match read_some(&mut self.stream, scratch) {
                Ok(Some(0)) | Err(_) => return Pump::Closed,
                Ok(None) => return Pump::Idle,
                Ok(Some(_)) => {}
            }
        }
        Pump::Again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_dominates_then_again() {
        use Pump::*;
        assert_eq!(Idle.and(Idle), Idle);
        assert_eq!(Idle.and(Again), Again);
        assert_eq!(Again.and(Idle), Again);
        assert_eq!(Again.and(Closed), Closed);
        assert_eq!(Closed.and(Idle), Closed);
    }
}
