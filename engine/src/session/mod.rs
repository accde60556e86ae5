//! The session core: one TCP session's whole life, written once for every driver. Sans-IO
//! (in the spirit of quinn-proto): it makes no system call and reads no clock. A driver
//! feeds it events (an outcome, a readiness report, a timer) with the current time, asks
//! [`Session::next_action`] what to do until it answers `None`, carries each action out and
//! reports its outcome. Retry across backends, timeouts, byte caps, shaping, PROXY headers,
//! capture and the session's accounting are decided here and only here.
//!
//! LIFECYCLE (docs/LIFECYCLE.md draws it):
//! `new` -> [`Phase::Peeking`] (a PROXY header, then a TLS ClientHello, when the listener or
//! the firewall needs them) -> decided by the firewall and the limits ->
//! [`Phase::Connecting`] (attempt after attempt, until a backend accepts or the pool's
//! attempts are used up) -> [`Phase::Relaying`] (two independent [`Lane`]s) -> closing, once
//! both directions forwarded their end of stream, or cut by a reset, a timeout, a cap, a
//! stop or the admin API -> [`Phase::Closed`] after the [`Action::Close`] was handed out.
//!
//! Invariants: the accounting of a session (records, counters, cap places) is done exactly
//! once, when it starts closing; after [`Action::Close`] the core asks for nothing more;
//! every deadline is computed with saturating arithmetic (no duration can overflow it).

mod action;
mod judge;
mod lane;
mod peek;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use self::action::{Action, ConnectError, IoError, Probed, Readout, Written};
pub use self::lane::{Lane, READS_PER_TURN};

use self::lane::Step;
use self::peek::Peek;
use crate::admission::Admitted;
use crate::balance::Backend;
use crate::counters::WorkerStats;
use crate::limits::Ticket;
use crate::record::{CloseReason, LiveSession, Record, RecordKind, Verdict};
use crate::shape::{self, Allowance, PooledShaper};
use crate::side::{Direction, Side};
use crate::tables::{Decision, Service};

/// What a session is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting, since `since`, for the client's PROXY protocol header (`proxy`: closed as
    /// `proxy_error` at the PROXY timeout) or for its TLS ClientHello (the firewall matches
    /// on SNI; decided without it at the SNI timeout).
    Peeking {
        since: Instant,
        proxy: bool,
    },
    /// Connecting to a backend since `since`; `aborting`: its timeout passed and the driver
    /// was asked to give it up.
    Connecting {
        since: Instant,
        aborting: bool,
    },
    Relaying,
    /// Decided closed for `reason`; its [`Action::Close`] is still to be handed out.
    Closing {
        reason: CloseReason,
        abort: bool,
    },
    /// Closed for this reason: the driver has its last action.
    Closed(CloseReason),
}

/// Whether a connect attempt is to be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connect {
    /// Nothing to do.
    Idle,
    /// Pick the next backend and ask for a connect.
    Start,
    /// Ask the driver to abort the connect in flight.
    Abort,
}

/// Things to hand out once, in this order, after the backend connected.
#[derive(Debug, Clone, Copy, Default)]
struct Opening {
    preamble: bool,
    preamble_busy: bool,
    capture: bool,
    record: bool,
}

/// One TCP session, independent of the driver.
#[derive(Debug)]
pub struct Session {
    admitted: Admitted,
    worker: usize,
    /// Where the session's counters of its worker go.
    stats: Arc<WorkerStats>,
    /// The address the client reached (the accepted socket's local address).
    listener: SocketAddr,
    /// The client: the connection's peer, or the source a trusted PROXY header declared.
    client: SocketAddr,
    /// Where the client connected to: the listener, or what a PROXY header declared.
    destination: SocketAddr,
    started: Instant,
    start_wall: SystemTime,
    phase: Phase,
    peek: Peek,
    /// The firewall's decision, once made.
    decision: Option<Decision>,
    /// Why the session was refused (denied by the firewall, or over a limit).
    refusal: Option<CloseReason>,
    /// The places the session holds under its service's limits, given back at close.
    ticket: Option<Ticket>,
    /// Bandwidth and byte cap; `None` when neither applies (the common case: one branch).
    shaper: Option<PooledShaper>,
    /// The capture policy of an allowed session, by index into the tables' captures.
    capture: Option<usize>,
    pool_start: usize,
    tried: crate::balance::Tried,
    /// The backend of the current connect attempt, then of the relay.
    backend: Option<Backend>,
    connect: Connect,
    /// Why the last connect attempt failed, reported if no attempt succeeds.
    last_failure: CloseReason,
    opening: Opening,
    /// Whether the session ever relayed (reached a backend).
    relayed: bool,
    lanes: [Lane; 2],
    /// When each lane's shaper lets it read again.
    throttled: [Option<Instant>; 2],
    /// The peer whose end of stream arrived first.
    first_eof: Option<Side>,
    last_activity: Instant,
    /// When the last interim record was made (or the session started).
    last_report: Instant,
    /// Bytes (up, down) already added to the client's accounting totals, and when.
    accounted: [u64; 2],
    last_accounted: Instant,
}

/// The time `d` after `t`, or a time far beyond any session's life if that cannot be
/// represented: no configured duration can make a deadline overflow.
pub fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    t.checked_add(d.min(FAR)).unwrap_or(t)
}

fn lane_index(dir: Direction) -> usize {
    match dir {
        Direction::Up => 0,
        Direction::Down => 1,
    }
}

impl Session {
    /// A session for a connection admitted on worker `worker`: `client` is its peer,
    /// `listener` the address it reached; `now` and `wall` are the same instant on the
    /// monotonic and the wall clock. It is counted at once, then starts by peeking or by
    /// being decided.
    pub fn new(
        admitted: Admitted,
        client: SocketAddr,
        listener: SocketAddr,
        worker: usize,
        stats: Arc<WorkerStats>,
        now: Instant,
        wall: SystemTime,
    ) -> Session {
        WorkerStats::add(&stats.accepted, 1);
        WorkerStats::add(&stats.active, 1);
        let mut session = Session {
            admitted,
            worker,
            stats,
            listener,
            client,
            destination: listener,
            started: now,
            start_wall: wall,
            phase: Phase::Connecting { since: now, aborting: false },
            peek: Peek::default(),
            decision: None,
            refusal: None,
            ticket: None,
            shaper: None,
            capture: None,
            pool_start: 0,
            tried: Default::default(),
            backend: None,
            connect: Connect::Idle,
            last_failure: CloseReason::NoBackend,
            opening: Opening::default(),
            relayed: false,
            lanes: [Lane::default(); 2],
            throttled: [None; 2],
            first_eof: None,
            last_activity: now,
            last_report: now,
            accounted: [0; 2],
            last_accounted: now,
        };
        session.begin(now);
        session
    }

    pub fn service(&self) -> &Service {
        self.admitted.service()
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The address the client reached.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// The backend of the current connect attempt, then of the relay.
    pub fn backend_addr(&self) -> Option<SocketAddr> {
        self.backend.as_ref().map(|b| b.addr)
    }

    /// A lane's progress.
    pub fn lane(&self, dir: Direction) -> &Lane {
        &self.lanes[lane_index(dir)]
    }

    /// Whether the session has been handed its last action.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed(_))
    }

    /// Whether the session waits for its backend connect (readiness of the backend socket
    /// then means the connect's outcome).
    pub fn is_connecting(&self) -> bool {
        matches!(self.phase, Phase::Connecting { .. })
    }

    // ---- events ----

    /// `side` has bytes, its end of stream or an error.
    pub fn on_readable(&mut self, side: Side) {
        match self.phase {
            Phase::Peeking { .. } if side == Side::Client => self.peek.ready(),
            Phase::Relaying => self.lanes[lane_index(Direction::from_source(side))].source_ready(),
            _ => {}
        }
    }

    /// `side` can take bytes.
    pub fn on_writable(&mut self, side: Side) {
        if self.phase == Phase::Relaying {
            let dir = Direction::from_source(side.other());
            self.lanes[lane_index(dir)].destination_ready();
        }
    }

    /// `side` has sent its end of stream (POLLRDHUP): its lane reads on to the end, so that
    /// the last bytes and the FIN leave together.
    pub fn on_hangup(&mut self, side: Side) {
        self.lanes[lane_index(Direction::from_source(side))].hangup = true;
    }

    /// The outcome of [`Action::Connect`] (or of its abort).
    pub fn on_connected(&mut self, outcome: Result<(), ConnectError>, now: Instant) {
        let Phase::Connecting { since, aborting } = self.phase else { return };
        match outcome {
            Ok(()) => self.connected(since, now),
            Err(ConnectError::Reset) => self.close(CloseReason::BackendRst),
            Err(ConnectError::NoSocket) => {
                WorkerStats::add(&self.stats.backend_socket_errors, 1);
                self.close(CloseReason::NoSocket)
            }
            Err(e) => {
                let timed_out = aborting || e == ConnectError::TimedOut;
                self.last_failure = if timed_out {
                    CloseReason::ConnectTimeout
                } else {
                    CloseReason::ConnectRefused
                };
                self.attempt_failed(now);
                self.phase = Phase::Connecting { since: now, aborting: false };
                self.connect = Connect::Start;
            }
        }
    }

    /// The outcome of [`Action::SendPreamble`].
    pub fn on_preamble_sent(&mut self, outcome: Result<(), IoError>) {
        self.opening.preamble_busy = false;
        match outcome {
            Ok(()) => {}
            // A fresh socket's send buffer always takes a header of at most 107 bytes; one
            // that does not is a local failure rather than a truncated header.
            Err(IoError::WouldBlock | IoError::Local) => self.close(CloseReason::LocalError),
            Err(IoError::Reset) => self.close(CloseReason::BackendRst),
        }
    }

    /// The outcome of [`Action::Read`] on `dir`.
    pub fn on_read(&mut self, dir: Direction, outcome: Result<Readout, IoError>, now: Instant) {
        let i = lane_index(dir);
        self.lanes[i].busy = false;
        let got = outcome.map_or(0, |r| r.bytes);
        if let Some(shaper) = self.shaper.as_mut() {
            shaper.used(dir, got, shape::nanos(now));
        }
        match outcome {
            Ok(read) => {
                let lane = &mut self.lanes[i];
                lane.held = read.bytes;
                if read.drained {
                    lane.readable = false;
                }
                if read.eof {
                    self.source_eof(dir, now);
                }
            }
            Err(IoError::WouldBlock) => self.lanes[i].readable = false,
            Err(IoError::Reset) => self.close(CloseReason::reset_by(dir.source())),
            Err(IoError::Local) => self.close(CloseReason::LocalError),
        }
    }

    /// The outcome of [`Action::Write`] on `dir`.
    pub fn on_written(&mut self, dir: Direction, outcome: Result<Written, IoError>, now: Instant) {
        let lane = &mut self.lanes[lane_index(dir)];
        lane.busy = false;
        match outcome {
            Ok(written) => {
                lane.held = lane.held.saturating_sub(written.bytes);
                lane.bytes += written.bytes as u64;
                if written.blocked {
                    lane.writable = false;
                }
                if written.bytes > 0 {
                    self.last_activity = now;
                }
            }
            Err(IoError::WouldBlock) => lane.writable = false,
            Err(_) => self.close(CloseReason::reset_by(dir.source().other())),
        }
    }

    /// The outcome of [`Action::Shutdown`] on `dir`.
    pub fn on_shutdown(&mut self, dir: Direction, outcome: Result<(), IoError>, now: Instant) {
        let capturing = self.capture.is_some();
        let lane = &mut self.lanes[lane_index(dir)];
        lane.busy = false;
        if outcome.is_err() {
            return self.close(CloseReason::reset_by(dir.source().other()));
        }
        lane.shut = true;
        lane.capture_fin = capturing;
        self.last_activity = now;
        if self.lanes.iter().all(Lane::is_done) {
            let reason = match self.first_eof {
                Some(Side::Backend) => CloseReason::BackendFin,
                _ => CloseReason::ClientFin,
            };
            self.close(reason);
        }
    }

    /// The outcome of [`Action::Probe`] on `dir` (its session is at its byte cap).
    pub fn on_probed(&mut self, dir: Direction, outcome: Result<Probed, IoError>, now: Instant) {
        let lane = &mut self.lanes[lane_index(dir)];
        lane.busy = false;
        match outcome {
            Ok(Probed::Ended) => self.source_eof(dir, now),
            Ok(Probed::Nothing) | Err(IoError::WouldBlock) => lane.readable = false,
            Ok(Probed::More) => self.close(CloseReason::ByteCap),
            Err(IoError::Reset) => self.close(CloseReason::reset_by(dir.source())),
            Err(IoError::Local) => self.close(CloseReason::LocalError),
        }
    }

    /// Time passed: whatever is due at `now` happens (a timeout, a throttle's end).
    pub fn on_timer(&mut self, now: Instant) {
        for (i, t) in self.throttled.iter_mut().enumerate() {
            if t.is_some_and(|t| t <= now) {
                *t = None;
                self.lanes[i].new_turn();
            }
        }
        let (at, due) = self.deadline();
        if at > now {
            return;
        }
        match due {
            Due::HelloLate => self.hello_unreadable(now),
            Due::AbortConnect => {
                if let Phase::Connecting { since, .. } = self.phase {
                    self.phase = Phase::Connecting { since, aborting: true };
                    self.connect = Connect::Abort;
                }
            }
            Due::Close(reason) => self.close(reason),
            Due::Resume => {}
        }
    }

    /// The worker is stopping and its grace period is over: cut the session.
    pub fn stop(&mut self) {
        self.close(CloseReason::Shutdown);
    }

    /// The admin API cuts the session.
    pub fn kill(&mut self) {
        self.close(CloseReason::AdminKill);
    }

    /// The driver cannot go on with the session (it could not watch its socket): cut it for
    /// `reason`.
    pub fn cut(&mut self, reason: CloseReason) {
        self.close(reason);
    }

    // ---- actions ----

    /// What the driver must do next, or `None` until the next event. `now` is the time of
    /// the driver's current turn.
    pub fn next_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(dir) = self.lanes.iter().position(|l| l.capture_fin) {
            self.lanes[dir].capture_fin = false;
            return Some(Action::CaptureFin(if dir == 0 {
                Direction::Up
            } else {
                Direction::Down
            }));
        }
        if let Some(n) = self.peek.lowat() {
            return Some(Action::Lowat(n));
        }
        match self.phase {
            Phase::Closed(_) => None,
            Phase::Closing { reason, abort } => {
                self.phase = Phase::Closed(reason);
                Some(Action::Close { reason, abort })
            }
            Phase::Peeking { .. } => self.peek.next(),
            Phase::Connecting { .. } => self.next_connect(now),
            Phase::Relaying => self.next_relay(now),
        }
    }

    fn next_connect(&mut self, now: Instant) -> Option<Action> {
        match std::mem::replace(&mut self.connect, Connect::Idle) {
            Connect::Idle => None,
            Connect::Abort => Some(Action::AbortConnect),
            Connect::Start => {
                if self.begin_attempt(now) {
                    return Some(Action::Connect);
                }
                self.close(self.last_failure);
                self.next_action(now)
            }
        }
    }

    fn next_relay(&mut self, now: Instant) -> Option<Action> {
        let o = &mut self.opening;
        if std::mem::take(&mut o.preamble) {
            o.preamble_busy = true;
            return Some(Action::SendPreamble);
        }
        if o.preamble_busy {
            // Nothing is relayed before the PROXY header has left.
            return None;
        }
        if std::mem::take(&mut o.capture) {
            return Some(Action::CaptureOpen);
        }
        if std::mem::take(&mut o.record) {
            return Some(Action::EmitOpen);
        }
        let mut yielded = false;
        for dir in [Direction::Up, Direction::Down] {
            match self.step(dir, now) {
                Step::Act(action) => return Some(action),
                Step::Yield => yielded = true,
                Step::Read | Step::Wait | Step::Done => {}
            }
            if matches!(self.phase, Phase::Closing { .. }) {
                return self.next_action(now);
            }
        }
        self.lanes.iter_mut().for_each(Lane::new_turn);
        yielded.then_some(Action::Yield)
    }

    /// Steps lane `dir`, asking the shaper before a read.
    fn step(&mut self, dir: Direction, now: Instant) -> Step {
        let i = lane_index(dir);
        if self.throttled[i].is_some() {
            return self.lanes[i].throttled(dir);
        }
        let step = self.lanes[i].step(dir);
        if step == Step::Act(Action::Shutdown(dir)) && self.lanes[1 - i].is_done() {
            // The last end of stream leaves with the sockets' close: a close with nothing
            // unread (the other direction read its source to its end) sends the FIN the
            // shutdown would have, one system call fewer per session.
            self.lanes[i].busy = false;
            self.on_shutdown(dir, Ok(()), now);
            return Step::Done;
        }
        if step != Step::Read {
            return step;
        }
        let Some(shaper) = self.shaper.as_mut() else {
            return Step::Act(self.lanes[i].read(dir, usize::MAX));
        };
        match shaper.allowance(dir, shape::nanos(now), usize::MAX) {
            Allowance::Bytes(n) => Step::Act(self.lanes[i].read(dir, n)),
            Allowance::Wait(at) => {
                self.throttled[i] = Some(shape::instant(at));
                self.lanes[i].throttled(dir)
            }
            Allowance::Capped => {
                // At the byte cap a lane reads nothing more; it only learns whether its
                // source ends there (a session that moves exactly its cap ends cleanly).
                self.lanes[i].capped = true;
                self.step(dir, now)
            }
        }
    }

    // ---- deadlines ----

    /// When something must happen if nothing else does first.
    pub fn deadline_at(&self) -> Instant {
        self.deadline().0
    }

    fn deadline(&self) -> (Instant, Due) {
        let timeouts = &self.service().timeouts;
        let mut next = match self.phase {
            Phase::Peeking { since, proxy: true } => {
                (later(since, timeouts.proxy), Due::Close(CloseReason::ProxyError))
            }
            Phase::Peeking { since, proxy: false } => (later(since, timeouts.sni), Due::HelloLate),
            // An abort that is not confirmed within another connect timeout ends the session.
            Phase::Connecting { since, aborting: true } => (
                later(since, timeouts.connect.saturating_mul(2)),
                Due::Close(CloseReason::ConnectTimeout),
            ),
            Phase::Connecting { since, aborting: false } => {
                (later(since, timeouts.connect), Due::AbortConnect)
            }
            Phase::Relaying if self.lanes.iter().any(|l| l.eof) => {
                (later(self.last_activity, timeouts.fin), Due::Close(CloseReason::FinTimeout))
            }
            Phase::Relaying => {
                (later(self.last_activity, timeouts.idle), Due::Close(CloseReason::IdleTimeout))
            }
            // Nothing is due: the driver hands out the close at once.
            Phase::Closing { .. } | Phase::Closed(_) => {
                (later(self.started, Duration::MAX), Due::Resume)
            }
        };
        if let (Some(max), false) = (timeouts.max_duration, self.is_ending()) {
            let cut = (later(self.started, max), Due::Close(CloseReason::MaxDuration));
            next = earlier(next, cut);
        }
        if let Some(t) = self.throttled.iter().flatten().min() {
            next = earlier(next, (*t, Due::Resume));
        }
        next
    }

    fn is_ending(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. } | Phase::Closed(_))
    }

    // ---- transitions ----

    fn connected(&mut self, since: Instant, now: Instant) {
        let latency = now.saturating_duration_since(since);
        self.service().counters.connect_latency.observe(latency);
        if let Some(b) = &self.backend {
            b.state.connect_succeeded();
            WorkerStats::add(&b.state.sessions, 1);
            WorkerStats::add(&b.state.active, 1);
        }
        self.relayed = true;
        self.phase = Phase::Relaying;
        self.last_activity = now;
        self.lanes = [Lane::connected(Direction::Up), Lane::connected(Direction::Down)];
        self.opening = Opening {
            preamble: self.pool().send_proxy.is_some(),
            preamble_busy: false,
            capture: self.capture.is_some(),
            record: self.admitted.tables.records.open,
        };
    }

    /// The source of `dir` sent its end of stream.
    fn source_eof(&mut self, dir: Direction, now: Instant) {
        let lane = &mut self.lanes[lane_index(dir)];
        if lane.eof {
            return;
        }
        lane.eof = true;
        self.first_eof.get_or_insert(dir.source());
        self.last_activity = now;
    }

    /// Decides the session closed for `reason` and does its accounting (once).
    fn close(&mut self, reason: CloseReason) {
        if self.is_ending() {
            return;
        }
        let abort = reason.aborts() || self.deny_resets();
        self.account(reason);
        self.phase = Phase::Closing { reason, abort };
    }

    // ---- reports ----

    /// Whether an interim record is due at `now` (records every `every`); if so, the report
    /// time moves to `now`.
    pub fn take_interim(&mut self, now: Instant) -> bool {
        let Some(every) = self.admitted.tables.records.interim else { return false };
        if self.phase != Phase::Relaying || now < later(self.last_report, every) {
            return false;
        }
        self.last_report = now;
        true
    }

    /// Adds the bytes a long session moved to its client's accounting totals once every
    /// [`ACCOUNTING_INTERVAL`](crate::accounting::ACCOUNTING_INTERVAL) (closing adds the
    /// rest); the driver calls this on its periodic scan.
    pub fn account_interim(&mut self, now: Instant) {
        let every = crate::accounting::ACCOUNTING_INTERVAL;
        // A closed session has already given its ticket back (a close accounts at once).
        if self.ticket.is_none() || now < later(self.last_accounted, every) {
            return;
        }
        self.last_accounted = now;
        self.account_bytes();
    }

    /// What the admin API shows of this session at `now`; `id` names it for a kill.
    pub fn live(&self, id: u64, now: Instant) -> LiveSession {
        LiveSession {
            id,
            worker: self.worker,
            service: self.service().name.clone(),
            client: self.client,
            listener: self.listener,
            backend: self.backend_addr(),
            state: match self.phase {
                Phase::Peeking { .. } => "peeking",
                Phase::Connecting { .. } => "connecting",
                _ => "relaying",
            },
            age: now.saturating_duration_since(self.started),
            bytes_up: self.lanes[0].bytes,
            bytes_down: self.lanes[1].bytes,
        }
    }

    /// A record of this session of `kind`, made at `now`.
    pub fn record(&self, kind: RecordKind, now: Instant) -> Record {
        let duration = now.saturating_duration_since(self.started);
        Record {
            kind,
            worker: self.worker,
            service: self.service().name.clone(),
            listener: self.listener,
            client: self.client,
            backend: self.backend_addr(),
            start: self.start_wall,
            end: self.start_wall.checked_add(duration).unwrap_or(self.start_wall),
            duration,
            bytes_up: self.lanes[0].bytes,
            bytes_down: self.lanes[1].bytes,
            protocol: crate::record::Protocol::Tcp,
            packets_up: 0,
            packets_down: 0,
            verdict: match self.decision {
                Some(Decision { action: crate::acl::Action::Deny { .. }, .. }) => Verdict::Deny,
                _ => Verdict::Allow,
            },
            rule: self.decision.as_ref().and_then(|d| d.rule.clone()),
            reason: None,
            tables_version: self.admitted.tables.version,
        }
    }

    /// The record of a closed session: `deny` for a session the firewall refused, `close`
    /// for every other.
    pub fn final_record(&self, now: Instant) -> Record {
        let reason = match self.phase {
            Phase::Closing { reason, .. } | Phase::Closed(reason) => Some(reason),
            _ => None,
        };
        let kind =
            if reason == Some(CloseReason::Denied) { RecordKind::Deny } else { RecordKind::Close };
        Record { reason, ..self.record(kind, now) }
    }
}

/// What a session's deadline calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// No whole ClientHello in time: the service's `sni_unreadable` decides.
    HelloLate,
    /// The connect attempt timed out: abort it; its outcome moves to the next backend.
    AbortConnect,
    /// Cut the session.
    Close(CloseReason),
    /// A throttled direction may read again.
    Resume,
}

/// The earlier of two deadlines (the first on a tie).
fn earlier(a: (Instant, Due), b: (Instant, Due)) -> (Instant, Due) {
    if b.0 < a.0 {
        b
    } else {
        a
    }
}
