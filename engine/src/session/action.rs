//! The session core's vocabulary with its drivers: the [`Action`]s it asks for, and the
//! outcomes a driver reports back once it has carried one out. Plain data.
//!
//! Contract: a driver carries out every action it is given, in order, and reports each
//! outcome to the matching event method of [`Session`](super::Session) before it asks for
//! the next action of that session, unless the action says no outcome follows. An action
//! that waits (readiness, a connect, a ring operation) may report much later; meanwhile the
//! core never asks for a second operation of the same kind on the same lane.

use crate::record::CloseReason;
use crate::side::{Direction, Side};

/// What a driver must do next for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Report [`on_readable`](super::Session::on_readable) once `side` has bytes, its end of
    /// stream or an error (no outcome otherwise). A driver whose readiness is always
    /// reported (edge-triggered epoll) has nothing to do.
    AwaitReadable(Side),
    /// Report [`on_writable`](super::Session::on_writable) once `side` can take bytes.
    AwaitWritable(Side),
    /// Copy up to `max` bytes the client has sent, without consuming them (MSG_PEEK), and
    /// report them with [`on_peeked`](super::Session::on_peeked).
    Peek { max: usize },
    /// Report the client readable only once `bytes` are queued (SO_RCVLOWAT); no outcome.
    Lowat(usize),
    /// Read and drop exactly `bytes` from the client (a PROXY header just peeked); report
    /// [`on_consumed`](super::Session::on_consumed).
    Consume(usize),
    /// Open a socket (non-blocking, close-on-exec, TCP_NODELAY) and connect it to
    /// [`backend_addr`](super::Session::backend_addr); report
    /// [`on_connected`](super::Session::on_connected).
    Connect,
    /// Give up the connect in flight (the connect timeout passed). Its outcome still comes
    /// through [`on_connected`](super::Session::on_connected): an error, or a connection
    /// made just before the abort.
    AbortConnect,
    /// Send [`preamble`](super::Session::preamble) (a PROXY header) on the fresh backend
    /// connection; report [`on_preamble_sent`](super::Session::on_preamble_sent).
    SendPreamble,
    /// Read up to `max` bytes from the source of `dir` into its lane (a buffer or a pipe the
    /// driver holds). With `to_end`, a short read is followed by more until the source would
    /// block or ends (its end of stream is known to be near). Report
    /// [`on_read`](super::Session::on_read).
    Read { dir: Direction, max: usize, to_end: bool },
    /// Say whether the source of `dir` has more bytes or has ended, taking none (a byte cap
    /// is reached); report [`on_probed`](super::Session::on_probed).
    Probe(Direction),
    /// Write what the lane of `dir` holds to its destination; `fin`: the destination is shut
    /// down next (the last bytes may wait for the FIN, MSG_MORE). Report
    /// [`on_written`](super::Session::on_written).
    Write { dir: Direction, fin: bool },
    /// Shut the destination of `dir` down for writing (forward the end of stream); report
    /// [`on_shutdown`](super::Session::on_shutdown).
    Shutdown(Direction),
    /// The lane of `dir` is empty and waits: give its buffer or pipe back. No outcome.
    Release(Direction),
    /// The backend connection is made: start this session's capture
    /// ([`capture`](super::Session::capture) says under which policy). No outcome.
    CaptureOpen,
    /// The end of stream of `dir` was forwarded: tell the capture. No outcome.
    CaptureFin(Direction),
    /// Send the session's open record ([`record`](super::Session::record)). No outcome.
    EmitOpen,
    /// The session used its share of this turn: continue it on the next turn of the loop.
    Yield,
    /// The session is over (its accounting is done): send
    /// [`final_record`](super::Session::final_record), end its capture, and close both
    /// sockets, abortively (RST) when `abort`. The last action of a session.
    Close { reason: CloseReason, abort: bool },
}

/// Why an operation on a socket did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// Nothing could move now (EAGAIN).
    WouldBlock,
    /// The peer reset the connection, or the socket failed.
    Reset,
    /// A local resource ran out (fds for a pipe, memory).
    Local,
}

/// What a [`Action::Read`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readout {
    /// Bytes now held in the lane.
    pub bytes: usize,
    /// The source's end of stream was reached (after those bytes).
    pub eof: bool,
    /// The source held fewer bytes than there was room for: it is empty now, so the next
    /// read waits for readiness.
    pub drained: bool,
}

/// What a [`Action::Write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Bytes taken by the destination.
    pub bytes: usize,
    /// The destination would take no more now (the rest waits for it to be writable).
    pub blocked: bool,
}

/// What a [`Action::Probe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// The source has bytes beyond what the session may move.
    More,
    /// The source has ended its stream.
    Ended,
    /// Nothing yet: wait for readiness and probe again.
    Nothing,
}

/// Why a connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// Refused, unreachable, or no local address for it: try the next backend.
    Refused,
    /// The kernel gave up (ETIMEDOUT), or the attempt was aborted at the connect timeout.
    TimedOut,
    /// Connected, then reset before the outcome was handled: the backend reset the session.
    Reset,
    /// No socket could be made for the backend (out of fds or memory).
    NoSocket,
}
