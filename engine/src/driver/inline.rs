//! The session core's I/O actions carried out at once, with non-blocking system calls on the
//! worker's thread: peek, read, write, splice, shutdown, probe. Both drivers execute them
//! the same way; they differ only in how they learn that a socket is ready.
//!
//! Invariants: EINTR is retried here and never reaches the core; a lane takes a buffer or a
//! pipe from the pools only when it reads, and a copy buffer goes back as soon as its bytes
//! are written; capture taps see exactly the bytes that move (after a send on the copy
//! relay; duplicated from the pipe with tee(2), right after a fill, on the splice relay).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use super::conn::{Carrier, Conn, Pools};
use crate::capture::Tap;
use crate::session::{ConnectError, IoError, Probed, Readout, Written};
use crate::side::Direction;
use crate::sys::{self, Then};
use crate::worker::Relay;

/// Errors that mean the process is out of fds or memory: back off instead of spinning.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// What a socket error means to the core.
fn io_error(e: &io::Error) -> IoError {
    match e.kind() {
        io::ErrorKind::WouldBlock => IoError::WouldBlock,
        _ if is_resource_exhaustion(e) => IoError::Local,
        _ => IoError::Reset,
    }
}

/// What the error that ended a connect attempt (its errno) means: the backend could not be
/// reached (try the next one), or the connection was made and then reset.
pub(crate) fn connect_error(errno: i32) -> ConnectError {
    match errno {
        libc::ECONNREFUSED
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EHOSTDOWN
        | libc::ENETDOWN
        | libc::EADDRNOTAVAIL => ConnectError::Refused,
        libc::ETIMEDOUT | libc::ECANCELED => ConnectError::TimedOut,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => ConnectError::NoSocket,
        _ => ConnectError::Reset,
    }
}

/// Calls `op` until it is not interrupted.
fn again<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Peeks at up to `scratch.len()` bytes the client has sent.
pub(crate) fn peek(client: BorrowedFd<'_>, scratch: &mut [u8]) -> Result<usize, IoError> {
    again(|| sys::recv_peek(client, scratch)).map_err(|e| io_error(&e))
}

/// Reads exactly `n` bytes off the client (they were just peeked at, so they are queued).
pub(crate) fn consume(
    client: BorrowedFd<'_>,
    scratch: &mut [u8],
    n: usize,
) -> Result<usize, IoError> {
    let n = n.min(scratch.len());
    again(|| sys::read(client, &mut scratch[..n])).map_err(|e| io_error(&e))
}

/// Sends a PROXY header on a fresh backend connection. A write cut short is continued; one
/// that would block fails rather than leave a truncated header.
pub(crate) fn send_preamble(backend: BorrowedFd<'_>, header: &[u8]) -> Result<(), IoError> {
    let mut sent = 0;
    while sent < header.len() {
        match again(|| sys::send(backend, &header[sent..], Then::Wait)) {
            Ok(0) => return Err(IoError::Reset),
            Ok(n) => sent += n,
            Err(e) => return Err(io_error(&e)),
        }
    }
    Ok(())
}

/// Reads what socket `src` holds into `buf`: `(bytes, reached the end of stream)`. With
/// `read_on`, a short read is followed by another until the socket would block or its end
/// is read, so that an end of stream right behind the bytes is known before they are sent
/// on (and its FIN can leave with them, see [`Then`]). A reset found that way loses the
/// bytes read before it, as a reset does anyway.
fn read_burst(src: BorrowedFd<'_>, buf: &mut [u8], read_on: bool) -> io::Result<(usize, bool)> {
    let mut got = 0;
    loop {
        match again(|| sys::read(src, &mut buf[got..])) {
            Ok(0) => return Ok((got, true)),
            Ok(n) => {
                got += n;
                if !read_on || got == buf.len() {
                    return Ok((got, false));
                }
            }
            Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok((got, false)),
            Err(e) => return Err(e),
        }
    }
}

/// Reads up to `max` bytes from the source of `dir` into its lane. `read_on`: a short read
/// is followed by more (see [`read_burst`]).
pub(crate) fn read<X>(
    conn: &mut Conn<X>,
    dir: Direction,
    max: usize,
    read_on: bool,
    pools: &mut Pools,
) -> Result<Readout, IoError> {
    match pools.relay {
        Relay::Copy => read_copy(conn, dir, max, read_on, pools),
        Relay::Splice => read_splice(conn, dir, max, read_on, pools),
        Relay::Auto if conn.lanes[dir as usize].spliced => {
            read_splice(conn, dir, max, read_on, pools)
        }
        Relay::Auto => {
            let read = read_copy(conn, dir, max, read_on, pools);
            let carrier = &mut conn.lanes[dir as usize];
            if carrier.buffer.is_bulk() {
                // A read filled a whole buffer: a bulk stream, spliced once these bytes
                // are written (the core reads again only when the lane holds nothing).
                carrier.spliced = true;
            }
            read
        }
    }
}

/// The sockets `dir` reads from and writes to, its carrier and the session's tap, borrowed
/// apart.
struct Parts<'a> {
    src: BorrowedFd<'a>,
    dst: BorrowedFd<'a>,
    carrier: &'a mut Carrier,
    tap: &'a mut Option<Box<Tap>>,
}

fn parts<X>(conn: &mut Conn<X>, dir: Direction) -> Option<Parts<'_>> {
    let backend = conn.backend.as_ref()?.as_fd();
    let client = conn.client.as_fd();
    let (src, dst) = match dir {
        Direction::Up => (client, backend),
        Direction::Down => (backend, client),
    };
    Some(Parts { src, dst, carrier: &mut conn.lanes[dir as usize], tap: &mut conn.tap })
}

fn read_copy<X>(
    conn: &mut Conn<X>,
    dir: Direction,
    max: usize,
    read_on: bool,
    pools: &mut Pools,
) -> Result<Readout, IoError> {
    let Parts { src, carrier, .. } = parts(conn, dir).ok_or(IoError::Reset)?;
    let space = carrier.buffer.space(&mut pools.buffers);
    let want = max.min(space.len());
    match read_burst(src, &mut space[..want], read_on) {
        Ok((0, _)) => {
            carrier.buffer.release(&mut pools.buffers);
            Ok(Readout { bytes: 0, eof: true, drained: false })
        }
        Ok((n, ended)) => {
            carrier.buffer.filled(n);
            Ok(Readout { bytes: n, eof: ended, drained: n < want && !ended })
        }
        Err(e) => {
            carrier.buffer.release(&mut pools.buffers);
            Err(io_error(&e))
        }
    }
}

/// Fills the lane's pipe (borrowed from the pool if it has none) from the source: as far as
/// `max` and the source allow, so that the send is one large write rather than several.
fn read_splice<X>(
    conn: &mut Conn<X>,
    dir: Direction,
    max: usize,
    read_on: bool,
    pools: &mut Pools,
) -> Result<Readout, IoError> {
    let Parts { src, carrier, tap, .. } = parts(conn, dir).ok_or(IoError::Reset)?;
    let pipe = match carrier.pipe.take() {
        Some(p) => p,
        None => pools.pipes.take().map_err(|_| IoError::Local)?,
    };
    let want = max.min(pools.pipes.size());
    let (mut got, mut eof, mut drained) = (0, false, false);
    let mut failure = None;
    while got < want {
        match again(|| sys::splice(src, pipe.write_end(), want - got, Then::Wait)) {
            Ok(0) => {
                eof = true;
                break;
            }
            // The source has ended: read on to its end of stream.
            Ok(n) if n < want - got && read_on => got += n,
            Ok(n) if n < want - got => {
                got += n;
                drained = true;
                break;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                drained = true;
                break;
            }
            Err(e) => {
                failure = Some(io_error(&e));
                break;
            }
        }
    }
    if let (Some(tap), true) = (tap.as_mut(), got > 0 && failure.is_none()) {
        // The pipe held nothing before this fill: tee copies exactly its bytes, before they
        // are spliced on.
        tap.teed(dir, &pipe, got);
    }
    carrier.pipe = Some(pipe);
    match failure {
        Some(error) => {
            carrier.release(got, pools);
            Err(error)
        }
        None => Ok(Readout { bytes: got, eof, drained }),
    }
}

/// Writes the `held` bytes the lane of `dir` holds to its destination, until they are all
/// written or the destination would block. `fin`: the destination is shut down next.
pub(crate) fn write<X>(
    conn: &mut Conn<X>,
    dir: Direction,
    held: usize,
    fin: bool,
    pools: &mut Pools,
) -> Result<Written, IoError> {
    let then = if fin { Then::Fin } else { Then::Wait };
    let Parts { dst, carrier, tap, .. } = parts(conn, dir).ok_or(IoError::Reset)?;
    let mut written = Written::default();
    let mut failure = None;
    while written.bytes < held {
        // A lane with a pipe splices (the splice relay, or `auto` once a lane is spliced);
        // one without sends from its buffer.
        let sent = match &carrier.pipe {
            Some(pipe) => again(|| sys::splice(pipe.read_end(), dst, held - written.bytes, then)),
            _ => {
                let pending = carrier.buffer.pending();
                match again(|| sys::send(dst, pending, then)) {
                    Ok(n) => {
                        if let Some(tap) = tap.as_mut() {
                            tap.copied(dir, &pending[..n]);
                        }
                        carrier.buffer.consume(n);
                        Ok(n)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match sent {
            Ok(0) => {
                failure = Some(IoError::Reset);
                break;
            }
            Ok(n) => written.bytes += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                written.blocked = true;
                break;
            }
            Err(e) => {
                failure = Some(io_error(&e));
                break;
            }
        }
    }
    if written.bytes == held && carrier.pipe.is_none() {
        // A copy buffer is held only while it has bytes in flight.
        carrier.buffer.release(&mut pools.buffers);
    }
    match failure {
        // What was written is reported; the error, which stays on the socket, comes with
        // the next write.
        Some(_) if written.bytes > 0 => Ok(written),
        Some(error) => Err(error),
        None => Ok(written),
    }
}

/// Shuts the destination of `dir` down for writing: its FIN follows every byte written.
pub(crate) fn shutdown<X>(conn: &mut Conn<X>, dir: Direction) -> Result<(), IoError> {
    let (_, dst) = conn.ends(dir).ok_or(IoError::Reset)?;
    sys::shutdown_write(dst).map_err(|e| io_error(&e))
}

/// Whether the source of `dir` has more bytes or has ended, taking none.
pub(crate) fn probe<X>(conn: &mut Conn<X>, dir: Direction) -> Result<Probed, IoError> {
    let (src, _) = conn.ends(dir).ok_or(IoError::Reset)?;
    match again(|| sys::recv_peek(src, &mut [0u8; 1])) {
        Ok(0) => Ok(Probed::Ended),
        Ok(_) => Ok(Probed::More),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Probed::Nothing),
        Err(e) => Err(io_error(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EINTR is retried where the call is made, on either driver: the session core never
    /// sees it, and no other error is retried.
    #[test]
    fn an_interrupted_call_is_made_again_and_nothing_else_is() {
        let mut calls = 0;
        let got = again(|| {
            calls += 1;
            if calls < 3 {
                Err(io::Error::from(io::ErrorKind::Interrupted))
            } else {
                Ok(5)
            }
        });
        assert_eq!((got.ok(), calls), (Some(5), 3));
        let mut calls = 0;
        let got: io::Result<()> = again(|| {
            calls += 1;
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        });
        assert_eq!((got.map_err(|e| e.kind()), calls), (Err(io::ErrorKind::WouldBlock), 1));
    }
}
