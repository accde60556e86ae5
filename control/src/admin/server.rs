//! The admin server's transport: the listening socket, the accept loop and each
//! connection's limits, on a current-thread tokio runtime that lives on the admin thread
//! alone (no worker pool, no blocking pool: one thread whatever the load).
//!
//! Invariants:
//! - accepting never ends on an error: out of fds (EMFILE, ENFILE, ENOBUFS, ENOMEM) it
//!   pauses [`ACCEPT_BACKOFF_MIN`], doubling up to [`ACCEPT_BACKOFF_MAX`] while failures
//!   continue, and accepts again on the same socket; one warning per [`WARN_EVERY`];
//! - at most `max_connections` connections are open; a new connection beyond that closes
//!   the one that has waited longest without a request being answered (a half-sent
//!   request, an idle keep-alive, a client that does not read its answer), and is itself
//!   closed when every connection is answering;
//! - each connection is its own task: one that stalls (slow request, unread answers)
//!   holds no other; a head must arrive within `header_timeout`, and a write that makes
//!   no progress for `write_timeout` closes the connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, Notify};

use super::routes::State;
use super::{AdminAddr, Limits, MAX_HEAD};

/// First pause of accepting after it failed for want of fds or memory.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause while failures continue.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// At most one accept-failure warning this often.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The bound admin socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    /// Binds `addr`. A unix socket is bound under a temporary name, given `mode`, then
    /// renamed into place, so its path never exists with looser permissions; a stale
    /// socket file at the path is replaced.
    pub fn bind(addr: &AdminAddr, mode: u32) -> Result<Listener, String> {
        let fail = |e: io::Error| format!("admin API cannot listen on {addr}: {e}");
        match addr {
            AdminAddr::Tcp(a) => {
                let listener = std::net::TcpListener::bind(a).map_err(fail)?;
                listener.set_nonblocking(true).map_err(fail)?;
                Ok(Listener::Tcp(listener))
            }
            AdminAddr::Unix(path) => {
                let stale = std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                let mut temporary = path.clone().into_os_string();
                temporary.push(format!(".{}.tmp", std::process::id()));
                let temporary = std::path::PathBuf::from(temporary);
                let _ = std::fs::remove_file(&temporary);
                let listener = std::os::unix::net::UnixListener::bind(&temporary).map_err(fail)?;
                let placed = std::fs::set_permissions(&temporary, PermissionsExt::from_mode(mode))
                    .and_then(|()| {
                        if stale {
                            let _ = std::fs::remove_file(path);
                        }
                        std::fs::rename(&temporary, path)
                    });
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&temporary);
                    return Err(fail(e));
                }
                listener.set_nonblocking(true).map_err(fail)?;
                Ok(Listener::Unix(listener))
            }
        }
    }
}

/// The admin server made ready to serve: its runtime built and its socket watched. Made on
/// the starting thread, before sluice reports ready, so that the fds both need are taken
/// while fds are plentiful: a data path that runs out of fds right after start-up cannot
/// leave the admin API without a runtime (and its listener closed).
pub struct Server {
    runtime: tokio::runtime::Runtime,
    accepting: Accepting,
}

impl Server {
    pub fn new(listener: Listener, state: Arc<State>, limits: Limits) -> io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let accepting = {
            // Registering the socket needs the runtime's reactor.
            let _entered = runtime.enter();
            Accepting::new(listener, state, limits)?
        };
        Ok(Server { runtime, accepting })
    }

    /// The admin thread's body: serves until `stop` fires.
    pub fn run(self, stop: oneshot::Receiver<()>) {
        let Server { runtime, accepting } = self;
        runtime.block_on(async move {
            tokio::select! {
                () = accepting.run() => {}
                _ = stop => {}
            }
        });
        // Dropping the runtime cancels every connection task and closes its socket.
    }
}

enum Socket {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

struct Accepting {
    socket: Socket,
    state: Arc<State>,
    limits: Limits,
    table: Arc<Mutex<ConnTable>>,
}

impl Accepting {
    fn new(listener: Listener, state: Arc<State>, limits: Limits) -> io::Result<Self> {
        let socket = match listener {
            Listener::Tcp(l) => Socket::Tcp(tokio::net::TcpListener::from_std(l)?),
            Listener::Unix(l) => Socket::Unix(tokio::net::UnixListener::from_std(l)?),
        };
        let table = Arc::new(Mutex::new(ConnTable::default()));
        Ok(Self { socket, state, limits, table })
    }

    async fn run(self) {
        let mut backoff = Backoff::default();
        loop {
            let accepted = match &self.socket {
                Socket::Tcp(l) => l.accept().await.map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    self.admit(s)
                }),
                Socket::Unix(l) => l.accept().await.map(|(s, _)| self.admit(s)),
            };
            match accepted {
                Ok(()) => {
                    backoff.succeeded();
                    // Let the new connection read its request before the next accept: a
                    // client that sent a whole request is answering, not waiting, before
                    // a flood of newer connections can make it the oldest waiting one.
                    tokio::task::yield_now().await;
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    tokio::time::sleep(backoff.failed(&e, Instant::now())).await;
                }
                Err(e) => log::debug!("admin API: accept failed: {e}"),
            }
        }
    }

    /// Serves a new connection as its own task, making room under the cap first.
    fn admit<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some((id, evicted)) = self.table_lock().open(self.limits.max_connections) else {
            log::debug!("admin API: every connection is answering; closing a new one");
            return;
        };
        let (state, table, limits) = (self.state.clone(), self.table.clone(), self.limits);
        tokio::spawn(async move {
            serve_connection(stream, id, &evicted, state, &table, limits).await;
            lock(&table).close(id);
        });
    }

    fn table_lock(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        lock(&self.table)
    }
}

fn lock(table: &Mutex<ConnTable>) -> std::sync::MutexGuard<'_, ConnTable> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs hyper's HTTP/1.1 server on one connection until it ends, times out, or is
/// evicted to make room for a newer one.
async fn serve_connection<S>(
    stream: S,
    id: u64,
    evicted: &Notify,
    state: Arc<State>,
    table: &Arc<Mutex<ConnTable>>,
    limits: Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let marks = table.clone();
    let service = service_fn(move |request| {
        let (state, marks) = (state.clone(), marks.clone());
        async move {
            let answering = || lock(&marks).set_answering(id, true);
            let response = state.answer(request, answering).await;
            lock(&marks).set_answering(id, false);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                log::debug!("admin API: connection ended: {e}");
            }
        }
        () = evicted.notified() => log::debug!("admin API: closed an idle connection for a new one"),
    }
}

/// The open connections and what each is doing.
#[derive(Default)]
struct ConnTable {
    next: u64,
    open: HashMap<u64, Conn>,
}

struct Conn {
    /// Since when the connection has waited without a request being answered; `None`
    /// while one is (its body read, its answer being made).
    waiting_since: Option<Instant>,
    evict: Arc<Notify>,
}

impl ConnTable {
    /// Registers a new connection under the cap `max`, closing the connection that has
    /// waited longest when the table is full. `None` when every connection is answering.
    fn open(&mut self, max: usize) -> Option<(u64, Arc<Notify>)> {
        if self.open.len() >= max {
            let oldest = self
                .open
                .iter()
                .filter_map(|(id, c)| c.waiting_since.map(|since| (since, *id)))
                .min()?;
            if let Some(conn) = self.open.remove(&oldest.1) {
                conn.evict.notify_one();
            }
        }
        let id = self.next;
        self.next += 1;
        let evict = Arc::new(Notify::new());
        self.open.insert(id, Conn { waiting_since: Some(Instant::now()), evict: evict.clone() });
        Some((id, evict))
    }

    fn set_answering(&mut self, id: u64, answering: bool) {
        if let Some(c) = self.open.get_mut(&id) {
            c.waiting_since = if answering { None } else { Some(Instant::now()) };
        }
    }

    fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// The accept back-off: a pause that doubles while accepting keeps failing.
#[derive(Default)]
struct Backoff {
    pause: Option<Duration>,
    warned: Option<Instant>,
}

impl Backoff {
    fn failed(&mut self, e: &io::Error, now: Instant) -> Duration {
        let pause = self.pause.map_or(ACCEPT_BACKOFF_MIN, |p| (p * 2).min(ACCEPT_BACKOFF_MAX));
        self.pause = Some(pause);
        if self.warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            self.warned = Some(now);
            log::warn!(
                "admin API: accept paused for {pause:?}: {e} (it accepts again on the same \
                 socket once fds free up; further pauses for {WARN_EVERY:?} are not logged)"
            );
        }
        pause
    }

    fn succeeded(&mut self) {
        self.pause = None;
    }
}

/// Errors that mean the process is out of fds or memory.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// A stream whose writes fail with `TimedOut` once they have made no progress for the
/// write timeout: a client that stops reading its answers loses its connection instead
/// of holding it (and its buffered answers) forever.
struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, stalled: None }
    }

    /// Called when a write is pending: arms the deadline, or fails once it has passed.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stall(cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_closes_the_connection_that_waited_longest() {
        let mut table = ConnTable::default();
        let (first, first_evict) = table.open(2).unwrap();
        let (second, _) = table.open(2).unwrap();
        table.set_answering(second, true);
        let (third, _) = table.open(2).expect("the first one waits: it makes room");
        assert!(!table.open.contains_key(&first));
        assert!(table.open.contains_key(&second) && table.open.contains_key(&third));
        // The evicted task sees its notification even though it was not waiting yet.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), first_evict.notified()).await.unwrap()
        });
        table.set_answering(third, true);
        assert!(table.open(2).is_none(), "every connection answering: no room");
        table.close(second);
        assert!(table.open(2).is_some());
    }

    #[test]
    fn accept_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::default();
        let e = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let now = Instant::now();
        let pauses: Vec<_> = (0..5).map(|_| b.failed(&e, now).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 500, 500]);
        b.succeeded();
        assert_eq!(b.failed(&e, now), ACCEPT_BACKOFF_MIN);
        assert!(is_resource_exhaustion(&e));
        assert!(!is_resource_exhaustion(&io::Error::from(io::ErrorKind::ConnectionAborted)));
    }
}
