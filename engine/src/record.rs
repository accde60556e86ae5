//! What the engine reports of a session or flow: why it ended ([`CloseReason`]), its
//! connection-log [`Record`], and what the admin API shows of it while it runs
//! ([`LiveSession`]). Plain data: made by the session core and the UDP loop, carried to the
//! log thread by the workers' event sinks.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::side::Side;

/// The transport a service forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Connections, relayed byte for byte by the worker's driver.
    #[default]
    Tcp,
    /// Datagrams, relayed per flow (client address:port) by the worker's UDP loop.
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}
/// Why a session ended. The names are those of the connection log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions finished; the client closed first.
    ClientFin,
    /// Both directions finished; the backend closed first.
    BackendFin,
    ClientRst,
    BackendRst,
    IdleTimeout,
    /// After a half-close, the other direction stayed silent for the FIN timeout.
    FinTimeout,
    ConnectTimeout,
    ConnectRefused,
    NoBackend,
    /// The firewall refused the connection.
    Denied,
    Shutdown,
    /// A local resource ran out (fds, memory) while relaying.
    LocalError,
    /// A session limit (per client, per network, new-session rate) refused the session.
    Limit,
    /// The session moved as many bytes as its service allows and was cut.
    ByteCap,
    /// The session lasted as long as its service allows and was cut.
    MaxDuration,
    /// The PROXY protocol header was missing, malformed, late, or sent by an untrusted
    /// source.
    ProxyError,
    /// A UDP flow saw no datagram for its service's `udp_idle_timeout`.
    UdpIdleTimeout,
    /// A UDP flow was closed to make room in its worker's full flow table.
    Evicted,
    /// No socket for the backend could be created (the process is out of fds or memory):
    /// the client is closed gracefully, nothing was relayed.
    NoSocket,
    /// Cut through the admin API.
    AdminKill,
}

impl CloseReason {
    /// Every reason, for validating filters.
    pub const ALL: &[CloseReason] = &[
        CloseReason::ClientFin,
        CloseReason::BackendFin,
        CloseReason::ClientRst,
        CloseReason::BackendRst,
        CloseReason::IdleTimeout,
        CloseReason::FinTimeout,
        CloseReason::ConnectTimeout,
        CloseReason::ConnectRefused,
        CloseReason::NoBackend,
        CloseReason::Denied,
        CloseReason::Shutdown,
        CloseReason::LocalError,
        CloseReason::Limit,
        CloseReason::ByteCap,
        CloseReason::MaxDuration,
        CloseReason::ProxyError,
        CloseReason::UdpIdleTimeout,
        CloseReason::Evicted,
        CloseReason::NoSocket,
        CloseReason::AdminKill,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientFin => "client_fin",
            CloseReason::BackendFin => "backend_fin",
            CloseReason::ClientRst => "client_rst",
            CloseReason::BackendRst => "backend_rst",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::FinTimeout => "fin_timeout",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::ConnectRefused => "connect_refused",
            CloseReason::NoBackend => "no_backend",
            CloseReason::Denied => "denied",
            CloseReason::Shutdown => "shutdown",
            CloseReason::LocalError => "local_error",
            CloseReason::Limit => "limit",
            CloseReason::ByteCap => "byte_cap",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::ProxyError => "proxy_error",
            CloseReason::UdpIdleTimeout => "udp_idle_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::NoSocket => "no_socket",
            CloseReason::AdminKill => "admin_kill",
        }
    }

    /// The reset reason for a peer.
    pub fn reset_by(side: Side) -> CloseReason {
        match side {
            Side::Client => CloseReason::ClientRst,
            Side::Backend => CloseReason::BackendRst,
        }
    }

    /// Whether the session's sockets are closed abortively (RST) for this reason, so that a
    /// peer never mistakes a cut stream for a clean end of stream. A session that never
    /// reached a backend closes its client gracefully, as HAProxy does: nothing was relayed.
    pub fn aborts(self) -> bool {
        matches!(
            self,
            CloseReason::ClientRst
                | CloseReason::BackendRst
                | CloseReason::IdleTimeout
                | CloseReason::FinTimeout
                | CloseReason::Shutdown
                | CloseReason::LocalError
                | CloseReason::ByteCap
                | CloseReason::MaxDuration
                | CloseReason::AdminKill
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// The session reached its backend (only when open records are enabled).
    Open,
    /// A long-lived session is still running (every interim interval).
    Interim,
    /// The session ended: always reported.
    Close,
    /// The firewall refused the connection.
    Deny,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Open => "open",
            RecordKind::Interim => "interim",
            RecordKind::Close => "close",
            RecordKind::Deny => "deny",
        }
    }
}

/// The firewall's decision for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// One connection-log record.
#[derive(Debug, Clone)]
pub struct Record {
    pub kind: RecordKind,
    pub worker: usize,
    pub service: Arc<str>,
    pub listener: SocketAddr,
    pub client: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub start: SystemTime,
    /// When the record was made (the end, for a close record).
    pub end: SystemTime,
    pub duration: Duration,
    /// Bytes client -> backend so far.
    pub bytes_up: u64,
    /// Bytes backend -> client so far.
    pub bytes_down: u64,
    /// TCP session or UDP flow.
    pub protocol: Protocol,
    /// UDP flows: datagrams client -> backend and backend -> client (0 for TCP).
    pub packets_up: u64,
    pub packets_down: u64,
    pub verdict: Verdict,
    /// Name of the firewall rule that decided the session; `None` for the default action.
    pub rule: Option<Arc<str>>,
    /// Why the session ended (close and deny records).
    pub reason: Option<CloseReason>,
    /// Version of the tables that decided the session.
    pub tables_version: u64,
}

/// Which records workers produce besides close records (part of the tables, so a reload
/// changes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordPolicy {
    pub open: bool,
    /// Interval of interim records for long-lived sessions; `None` for none.
    pub interim: Option<Duration>,
}

/// A live session, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// What `Engine::kill` takes to cut it (`SessionId::to_u64`).
    pub id: u64,
    pub worker: usize,
    pub service: Arc<str>,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    pub backend: Option<SocketAddr>,
    /// "peeking", "connecting" or "relaying"; "udp" for a UDP flow.
    pub state: &'static str,
    pub age: Duration,
    pub bytes_up: u64,
    pub bytes_down: u64,
}
