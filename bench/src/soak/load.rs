//! The soak's clients: one loop per traffic kind and thread, each connection checked end to
//! end against the echo backend. A connection that does not do exactly what its kind
//! expects is a failure; a deliberate reset is not.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::SockRef;

use crate::error::{io_context, Result};
use crate::timeline::RunControl;

/// Every socket operation of the soak gives up after this long (a stall is a failure).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per bulk connection, moved in echo rounds of [`BULK_CHUNK`].
const BULK_BYTES: usize = 8 << 20;
const BULK_CHUNK: usize = 64 << 10;
/// Round trips per request/response connection.
const RR_ROUNDS: usize = 200;
/// Bytes sent before a half-close.
const HALF_CLOSE_BYTES: usize = 16 << 10;
/// Failures reported on stderr in full; later ones are only counted.
const REPORTED: u64 = 20;

/// Connections that did what they should, and those that did not.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// Holds the clients between connections, so that sluice can be seen with no session open.
#[derive(Debug, Default)]
pub struct Gate {
    held: AtomicBool,
}

impl Gate {
    /// Clients finish the connection they are on and start no other until released.
    pub fn hold(&self) {
        self.held.store(true, Ordering::Relaxed);
    }

    pub fn release(&self) {
        self.held.store(false, Ordering::Relaxed);
    }

    fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }
}

/// How often a held client looks at its gate.
const HELD_POLL: Duration = Duration::from_millis(10);

/// One connection of a traffic kind, given a scratch buffer.
type Kind = fn(SocketAddr, &mut [u8]) -> io::Result<()>;

/// The traffic kinds, each a function of one connection.
const KINDS: [(&str, Kind); 5] = [
    ("bulk", bulk),
    ("rr", request_response),
    ("churn", churn),
    ("half_close", half_close),
    ("reset", reset),
];

/// Starts `concurrency` threads per kind against `target`; they stop with `control` and
/// pause while `gate` is held.
pub fn start(
    target: SocketAddr,
    concurrency: usize,
    control: &Arc<RunControl>,
    gate: &Arc<Gate>,
    tally: &Arc<Tally>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (name, kind) in KINDS {
        for i in 0..concurrency.max(1) {
            let (control, gate, tally) = (control.clone(), gate.clone(), tally.clone());
            let thread = std::thread::Builder::new()
                .name(format!("soak-{name}-{i}"))
                .spawn(move || client_loop(name, kind, target, &control, &gate, &tally))
                .map_err(io_context("spawn soak client"))?;
            threads.push(thread);
        }
    }
    Ok(threads)
}

fn client_loop(
    name: &str,
    kind: Kind,
    target: SocketAddr,
    control: &RunControl,
    gate: &Gate,
    tally: &Tally,
) {
    let mut buf = vec![0u8; BULK_CHUNK];
    while !control.stopped() {
        if gate.held() {
            std::thread::sleep(HELD_POLL);
            continue;
        }
        match kind(target, &mut buf) {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let n = tally.failed.fetch_add(1, Ordering::Relaxed);
                if n < REPORTED {
                    eprintln!("[soak] {name} connection failed: {e}");
                }
            }
        }
    }
}

fn open(target: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `data` and checks that the same bytes come back.
fn echo(s: &mut TcpStream, data: &[u8], back: &mut [u8]) -> io::Result<()> {
    s.write_all(data)?;
    let back = &mut back[..data.len()];
    s.read_exact(back)?;
    if back != data {
        return Err(io::Error::other("echo returned different bytes"));
    }
    Ok(())
}

/// Reads to the end of the stream; the bytes read.
fn read_to_end(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut total = 0;
    loop {
        match s.read(buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Closes cleanly: half-close, then the echo backend's end of stream.
fn finish(mut s: TcpStream, buf: &mut [u8]) -> io::Result<()> {
    s.shutdown(Shutdown::Write)?;
    match read_to_end(&mut s, buf)? {
        0 => Ok(()),
        n => Err(io::Error::other(format!("{n} unexpected bytes before the end of stream"))),
    }
}

fn bulk(target: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut s = open(target)?;
    let chunk = pattern(BULK_CHUNK, 7);
    for _ in 0..BULK_BYTES / BULK_CHUNK {
        echo(&mut s, &chunk, buf)?;
    }
    finish(s, buf)
}

fn request_response(target: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut s = open(target)?;
    let request = pattern(64, 3);
    for _ in 0..RR_ROUNDS {
        echo(&mut s, &request, buf)?;
    }
    finish(s, buf)
}

fn churn(target: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut s = open(target)?;
    echo(&mut s, &pattern(32, 5), buf)?;
    finish(s, buf)
}

/// Sends, half-closes, and must get every byte back before the end of stream.
fn half_close(target: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut s = open(target)?;
    s.write_all(&pattern(HALF_CLOSE_BYTES, 9))?;
    s.shutdown(Shutdown::Write)?;
    match read_to_end(&mut s, buf)? {
        n if n == HALF_CLOSE_BYTES => Ok(()),
        n => Err(io::Error::other(format!(
            "{n} of {HALF_CLOSE_BYTES} bytes before the end of stream"
        ))),
    }
}

/// One round trip, then an abortive close (RST) from the client.
fn reset(target: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut s = open(target)?;
    echo(&mut s, &pattern(1024, 11), buf)?;
    SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    drop(s);
    Ok(())
}
