//! The per-connection state machine, shared by both drivers. Pure: drivers feed it what
//! happened (bytes moved, end of stream, shutdown sent) with the time, and ask it what the
//! session waits for and when it must be cut.
//!
//! LIFECYCLE: accepted -> `Connecting` (attempt 0, 1, ... until a backend accepts or the
//! pool's attempts are used up) -> `Relaying` (two independent directions) -> finished when
//! both directions have forwarded their end of stream, or cut by a reset, a timeout or
//! shutdown. A direction is done only after every byte read from its source was written to
//! its destination and the destination was shut down for writing.

use std::fmt;
use std::time::{Duration, Instant};

use crate::tables::Timeouts;

/// One of the two peers of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// A direction of relay, named by where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// client -> backend
    Up,
    /// backend -> client
    Down,
}

impl Direction {
    /// The peer this direction reads from.
    pub fn source(self) -> Side {
        match self {
            Direction::Up => Side::Client,
            Direction::Down => Side::Backend,
        }
    }

    /// The direction that reads from `side`.
    pub fn from_source(side: Side) -> Direction {
        match side {
            Side::Client => Direction::Up,
            Side::Backend => Direction::Down,
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
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes written to the destination.
    pub bytes: u64,
    /// The source sent its end of stream.
    pub eof: bool,
    /// The destination was shut down for writing (the end of stream was forwarded).
    pub shut: bool,
    /// The direction's shaper lets it read again at this time (it reads nothing until).
    pub throttled: Option<Instant>,
}

/// What the session is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting, since `since`, for the client's PROXY protocol header (`proxy`: closed as
    /// `proxy_error` at the PROXY timeout) or for its TLS ClientHello (the firewall matches
    /// on SNI; decided without it at the SNI timeout).
    Peeking {
        since: Instant,
        proxy: bool,
    },
    /// Waiting for the `attempt`-th backend connect, begun at `since`.
    Connecting {
        attempt: usize,
        since: Instant,
    },
    Relaying,
}

/// What a session's deadline calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// No ClientHello in time: decide the session without SNI.
    DecideWithoutSni,
    /// The connect attempt timed out: try the next backend.
    NextBackend,
    /// Cut the session.
    Close(CloseReason),
    /// A throttled direction may read again.
    Resume,
}

/// The state of one session, independent of the driver.
#[derive(Debug, Clone)]
pub struct Session {
    pub started: Instant,
    pub phase: Phase,
    pub last_activity: Instant,
    pub up: Flow,
    pub down: Flow,
    /// The peer whose end of stream arrived first.
    pub first_eof: Option<Side>,
    /// When the last interim record was made (or the session started).
    pub last_report: Instant,
}

impl Session {
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            phase: Phase::Connecting { attempt: 0, since: now },
            last_activity: now,
            up: Flow::default(),
            down: Flow::default(),
            first_eof: None,
            last_report: now,
        }
    }

    /// Whether an interim record is due at `now` for reports every `every`; if so, the
    /// report time moves to `now`.
    pub fn take_interim(&mut self, every: Duration, now: Instant) -> bool {
        if self.phase != Phase::Relaying || now < self.last_report + every {
            return false;
        }
        self.last_report = now;
        true
    }

    pub fn flow(&self, dir: Direction) -> &Flow {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    fn flow_mut(&mut self, dir: Direction) -> &mut Flow {
        match dir {
            Direction::Up => &mut self.up,
            Direction::Down => &mut self.down,
        }
    }

    /// The session waits for the client's ClientHello before it is decided.
    pub fn peek(&mut self, now: Instant) {
        self.phase = Phase::Peeking { since: now, proxy: false };
    }

    /// The session waits for the client's PROXY protocol header before it is decided.
    pub fn await_proxy(&mut self, now: Instant) {
        self.phase = Phase::Peeking { since: now, proxy: true };
    }

    /// The session was decided (allowed): its first connect attempt starts now.
    pub fn decided(&mut self, now: Instant) {
        self.phase = Phase::Connecting { attempt: 0, since: now };
    }

    /// The next connect attempt starts now.
    pub fn retry_connect(&mut self, now: Instant) {
        if let Phase::Connecting { attempt, .. } = self.phase {
            self.phase = Phase::Connecting { attempt: attempt + 1, since: now };
        }
    }

    /// The backend accepted the connection.
    pub fn connected(&mut self, now: Instant) {
        self.phase = Phase::Relaying;
        self.last_activity = now;
    }

    /// `n` bytes were written to the destination of `dir`.
    pub fn moved(&mut self, dir: Direction, n: usize, now: Instant) {
        self.flow_mut(dir).bytes += n as u64;
        self.last_activity = now;
    }

    /// The source of `dir` sent its end of stream.
    pub fn source_eof(&mut self, dir: Direction, now: Instant) {
        let flow = self.flow_mut(dir);
        if flow.eof {
            return;
        }
        flow.eof = true;
        self.first_eof.get_or_insert(dir.source());
        self.last_activity = now;
    }

    /// The end of stream of `dir` was forwarded (shutdown for writing).
    pub fn shut(&mut self, dir: Direction, now: Instant) {
        self.flow_mut(dir).shut = true;
        self.last_activity = now;
    }

    /// `dir` may read nothing until `until` (its shaper's buckets are empty).
    pub fn throttle(&mut self, dir: Direction, until: Instant) {
        self.flow_mut(dir).throttled = Some(until);
    }

    /// Lifts the throttles that end at or before `now`.
    pub fn resume(&mut self, now: Instant) {
        for flow in [&mut self.up, &mut self.down] {
            if flow.throttled.is_some_and(|t| t <= now) {
                flow.throttled = None;
            }
        }
    }

    /// Both directions have forwarded their end of stream.
    pub fn is_finished(&self) -> bool {
        self.up.shut && self.down.shut
    }

    /// The reason recorded for a session that finished cleanly.
    pub fn finish_reason(&self) -> CloseReason {
        match self.first_eof {
            Some(Side::Backend) => CloseReason::BackendFin,
            _ => CloseReason::ClientFin,
        }
    }

    /// When something must happen if nothing else does first, and what.
    pub fn deadline(&self, timeouts: &Timeouts) -> (Instant, Due) {
        let mut next = self.phase_deadline(timeouts);
        if let Some(max) = timeouts.max_duration {
            let cut = (self.started + max, Due::Close(CloseReason::MaxDuration));
            next = earlier(next, cut);
        }
        let throttles = [self.up.throttled, self.down.throttled];
        if let Some(t) = throttles.into_iter().flatten().min() {
            next = earlier(next, (t, Due::Resume));
        }
        next
    }

    fn phase_deadline(&self, timeouts: &Timeouts) -> (Instant, Due) {
        match self.phase {
            Phase::Peeking { since, proxy: true } => {
                (since + timeouts.proxy, Due::Close(CloseReason::ProxyError))
            }
            Phase::Peeking { since, proxy: false } => (since + timeouts.sni, Due::DecideWithoutSni),
            Phase::Connecting { since, .. } => (since + timeouts.connect, Due::NextBackend),
            Phase::Relaying if self.up.eof || self.down.eof => {
                (self.last_activity + timeouts.fin, Due::Close(CloseReason::FinTimeout))
            }
            Phase::Relaying => {
                (self.last_activity + timeouts.idle, Due::Close(CloseReason::IdleTimeout))
            }
        }
    }

    /// Age of the session at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

/// The earlier of two deadlines (the first on a tie).
fn earlier(a: (Instant, Due), b: (Instant, Due)) -> (Instant, Due) {
    if b.0 < a.0 {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_awaiting_its_proxy_header_is_closed_at_the_proxy_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.await_proxy(t0);
        let t = timeouts();
        assert_eq!(s.deadline(&t), (t0 + t.proxy, Due::Close(CloseReason::ProxyError)));
        s.peek(t0 + Duration::from_secs(1));
        assert_eq!(s.deadline(&t).1, Due::DecideWithoutSni);
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(3),
            idle: Duration::from_secs(60),
            fin: Duration::from_secs(10),
            sni: Duration::from_secs(2),
            max_duration: None,
            proxy: Duration::from_secs(4),
        }
    }

    #[test]
    fn a_throttled_direction_wakes_the_session_before_its_idle_deadline() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.connected(t0);
        let later = t0 + Duration::from_millis(20);
        s.throttle(Direction::Down, later);
        assert_eq!(s.deadline(&timeouts()), (later, Due::Resume));
        s.resume(t0 + Duration::from_millis(10));
        assert_eq!(s.deadline(&timeouts()), (later, Due::Resume));
        s.resume(later);
        assert_eq!(s.deadline(&timeouts()).1, Due::Close(CloseReason::IdleTimeout));
    }

    #[test]
    fn a_session_is_cut_at_its_maximum_duration_whatever_its_traffic() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.connected(t0);
        let limits = Timeouts { max_duration: Some(Duration::from_secs(5)), ..timeouts() };
        s.moved(Direction::Up, 10, t0 + Duration::from_secs(4));
        let cut = (t0 + Duration::from_secs(5), Due::Close(CloseReason::MaxDuration));
        assert_eq!(s.deadline(&limits), cut);
        // A connect that outlasts the maximum duration is cut too.
        let s = Session::new(t0);
        let limits = Timeouts { max_duration: Some(Duration::from_secs(1)), ..timeouts() };
        assert_eq!(s.deadline(&limits), (t0 + Duration::from_secs(1), cut.1));
    }

    #[test]
    fn connecting_session_is_cut_at_the_connect_timeout_of_its_current_attempt() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        assert_eq!(s.deadline(&timeouts()), (t0 + Duration::from_secs(3), Due::NextBackend));
        let t1 = t0 + Duration::from_secs(3);
        s.retry_connect(t1);
        assert_eq!(s.phase, Phase::Connecting { attempt: 1, since: t1 });
        assert_eq!(s.deadline(&timeouts()).0, t1 + Duration::from_secs(3));
    }

    #[test]
    fn a_peeking_session_is_decided_at_the_sni_timeout_then_connects() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.peek(t0);
        assert_eq!(s.deadline(&timeouts()), (t0 + Duration::from_secs(2), Due::DecideWithoutSni));
        let t1 = t0 + Duration::from_secs(1);
        s.decided(t1);
        assert_eq!(s.deadline(&timeouts()), (t1 + Duration::from_secs(3), Due::NextBackend));
    }

    #[test]
    fn traffic_pushes_the_idle_deadline() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.connected(t0);
        let t1 = t0 + Duration::from_secs(30);
        s.moved(Direction::Up, 10, t1);
        assert_eq!(
            s.deadline(&timeouts()),
            (t1 + Duration::from_secs(60), Due::Close(CloseReason::IdleTimeout))
        );
        assert_eq!(s.up.bytes, 10);
    }

    #[test]
    fn half_closed_session_uses_the_fin_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.connected(t0);
        s.source_eof(Direction::Up, t0);
        s.shut(Direction::Up, t0);
        assert_eq!(
            s.deadline(&timeouts()),
            (t0 + Duration::from_secs(10), Due::Close(CloseReason::FinTimeout))
        );
        assert!(!s.is_finished());
    }

    #[test]
    fn finish_reason_names_the_peer_that_closed_first() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.connected(t0);
        s.source_eof(Direction::Down, t0);
        s.source_eof(Direction::Up, t0);
        s.shut(Direction::Down, t0);
        s.shut(Direction::Up, t0);
        assert!(s.is_finished());
        assert_eq!(s.finish_reason(), CloseReason::BackendFin);
    }

    #[test]
    fn interim_reports_come_once_per_interval_and_only_while_relaying() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let mut s = Session::new(t0);
        assert!(!s.take_interim(every, t0 + every), "a connecting session has nothing to report");
        s.connected(t0);
        assert!(!s.take_interim(every, t0 + Duration::from_secs(59)));
        assert!(s.take_interim(every, t0 + every));
        assert!(!s.take_interim(every, t0 + every + Duration::from_secs(1)));
        assert!(s.take_interim(every, t0 + every * 2));
    }

    #[test]
    fn only_clean_finishes_close_gracefully() {
        assert!(!CloseReason::ClientFin.aborts());
        assert!(!CloseReason::BackendFin.aborts());
        assert!(!CloseReason::ConnectRefused.aborts());
        for r in [
            CloseReason::ClientRst,
            CloseReason::IdleTimeout,
            CloseReason::FinTimeout,
            CloseReason::Shutdown,
        ] {
            assert!(r.aborts(), "{r}");
        }
    }
}
