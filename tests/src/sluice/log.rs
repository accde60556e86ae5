//! What sluice prints, as the test reads it: its log lines, collected on a reader thread
//! and waited on with a condition variable, and the session lines parsed into
//! [`SessionRecord`]s.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The lines sluice wrote to stderr so far, shared with the reader thread.
#[derive(Debug, Default)]
pub(super) struct LogBuffer {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// stderr reached its end: the process exited.
    closed: bool,
}

impl LogBuffer {
    pub(super) fn push(&self, line: String) {
        self.state.lock().expect("log lock").lines.push(line);
        self.changed.notify_all();
    }

    pub(super) fn close(&self) {
        self.state.lock().expect("log lock").closed = true;
        self.changed.notify_all();
    }

    /// Whether the process's stderr has closed.
    pub(super) fn is_closed(&self) -> bool {
        self.state.lock().expect("log lock").closed
    }

    /// How many lines have come so far.
    pub(super) fn count(&self) -> usize {
        self.state.lock().expect("log lock").lines.len()
    }

    pub(super) fn lines(&self) -> Vec<String> {
        self.state.lock().expect("log lock").lines.clone()
    }

    /// Calls `check` on the lines each time they change until it returns `Some`, stderr
    /// closes, or `timeout` passes.
    pub(super) fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("log lock");
        loop {
            if let Some(found) = check(&state.lines) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.closed {
                return None;
            }
            state = self.changed.wait_timeout(state, left).expect("log lock").0;
        }
    }
}

/// What tells one session from another in the log: the client's address and the listener
/// it reached. (A client port alone is not enough: the kernel reuses a local port for
/// connections to different listeners.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub client: SocketAddr,
    pub listener: SocketAddr,
}

impl SessionKey {
    /// The key of the session a connected client stream belongs to. Take it right after
    /// connecting: once the connection is closed the peer address is gone.
    pub fn of(stream: &TcpStream) -> SessionKey {
        SessionKey::try_of(stream).unwrap_or_else(|e| panic!("no session key: {e}"))
    }

    pub fn try_of(stream: &TcpStream) -> std::io::Result<SessionKey> {
        Ok(SessionKey { client: stream.local_addr()?, listener: stream.peer_addr()? })
    }
}

/// One `session ...` log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub service: String,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    /// `None` for `backend=-`.
    pub backend: Option<SocketAddr>,
    pub start: String,
    pub duration_ms: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub reason: String,
    pub worker: usize,
}

impl SessionRecord {
    pub fn key(&self) -> SessionKey {
        SessionKey { client: self.client, listener: self.listener }
    }

    /// Parses a log line; `None` if it is not a session line.
    pub fn parse(line: &str) -> Option<SessionRecord> {
        let (_, rest) = line.split_once(" session ")?;
        let fields: HashMap<&str, &str> =
            rest.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
        let backend = match *fields.get("backend")? {
            "-" => None,
            b => Some(b.parse().ok()?),
        };
        Some(SessionRecord {
            service: fields.get("service")?.to_string(),
            client: fields.get("client")?.parse().ok()?,
            listener: fields.get("listener")?.parse().ok()?,
            backend,
            start: fields.get("start")?.to_string(),
            duration_ms: fields.get("duration_ms")?.parse().ok()?,
            bytes_up: fields.get("bytes_up")?.parse().ok()?,
            bytes_down: fields.get("bytes_down")?.parse().ok()?,
            reason: fields.get("reason")?.to_string(),
            worker: fields.get("worker")?.parse().ok()?,
        })
    }
}
