//! Workers: one pinned thread per core, each with its own SO_REUSEPORT listener on every
//! service address and its own driver loop over its own sessions. No lock and no shared
//! queue on the data path; the kernel spreads connections between the listeners.
//!
//! [`Engine::start`] binds every listener before any thread runs, so a bad address is a
//! startup error, not a log line from a thread.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::acl::{Action, Query};
use crate::balance::{client_key, Backend, Pick, Pool, Tried};
use crate::capture::Tap;
use crate::driver::{self, DriverChoice, Selection};
use crate::events::{EventSink, Record, RecordKind, Verdict, WorkerStats};
use crate::limits::Ticket;
use crate::session::{CloseReason, Direction, Phase, Session};
use crate::shape::{self, Allowance, Shaper};
use crate::sys::{self, EventFd};
use crate::tables::{Decision, Service, Tables};
use crate::udp::{self, UdpCommand, UdpContext};
use crate::EngineError;
use std::sync::atomic::{AtomicU64, Ordering};

/// Default capacity of each relay pipe (splice relay), per direction.
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;
/// Default size of the large relay buffers (copy relay), per direction. Directions start
/// with 64 KiB and move to this size once a read fills their buffer (bulk streams).
pub const DEFAULT_BUFFER_SIZE: usize = 1024 * 1024;

/// No engine-wide session cap unless configured: each session holds two fds (four more
/// while a splice relay moves bytes), so the process's fd limit is the natural bound, and
/// running out of fds pauses accepting instead of failing (see `driver::schedule`).
pub const DEFAULT_MAX_SESSIONS: Option<u64> = None;

/// How the engine runs, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of worker threads (at least 1).
    pub workers: usize,
    /// Pin worker `i` to the i-th allowed CPU.
    pub pin: bool,
    pub driver: DriverChoice,
    /// Relay pipe capacity per direction (splice relay), in bytes.
    pub pipe_size: usize,
    /// Largest relay buffer per direction (copy relay), in bytes.
    pub buffer_size: usize,
    /// How the io_uring driver moves bytes (the epoll driver always copies).
    pub relay: Relay,
    /// Most UDP flows per worker (least recently used evicted beyond it).
    pub max_flows: usize,
    /// Largest UDP datagram relayed, in bytes; larger ones are dropped and counted.
    pub udp_max_datagram: usize,
    /// Most sessions at once across all workers; `None`: no cap.
    pub max_sessions: Option<u64>,
}

/// How a driver moves payload from one socket to the other.
///
/// The default is measured, not assumed: on loopback on this project's reference machine
/// (2 cores), copying through adaptive buffers moved one bulk stream about 30% faster than
/// splice through pipes of any size, and request/response traffic no slower (see
/// bench/results). splice(2) keeps payload out of user space and remains available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Relay {
    /// splice(2) through a pipe: payload never enters user space.
    Splice,
    /// read(2)/send(2) through a bounded user-space buffer.
    #[default]
    Copy,
}

impl std::str::FromStr for Relay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "splice" => Ok(Relay::Splice),
            "copy" => Ok(Relay::Copy),
            other => Err(format!("unknown relay {other:?}; expected \"splice\" or \"copy\"")),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            pin: true,
            driver: DriverChoice::Auto,
            pipe_size: DEFAULT_PIPE_SIZE,
            buffer_size: DEFAULT_BUFFER_SIZE,
            relay: Relay::default(),
            max_flows: udp::DEFAULT_MAX_FLOWS,
            udp_max_datagram: udp::DEFAULT_MAX_DATAGRAM,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// Takes one place on `active` under `limit` (`None`: no limit); false when it is full.
/// The check and the increment are one atomic step, so workers admitting at the same
/// moment never overshoot the limit together.
pub fn reserve(active: &AtomicU64, limit: Option<u64>) -> bool {
    match limit {
        None => {
            active.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(limit) => active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok(),
    }
}

/// Whether `active` is below `limit` (`None`: no limit).
fn below(active: &AtomicU64, limit: Option<u64>) -> bool {
    limit.is_none_or(|limit| active.load(Ordering::Relaxed) < limit)
}

/// The engine-wide session cap, shared by every worker: a place is taken when a session
/// is admitted and given back when it finishes.
#[derive(Debug, Default)]
pub struct SessionCap {
    limit: Option<u64>,
    active: AtomicU64,
}

impl SessionCap {
    pub fn new(limit: Option<u64>) -> Self {
        Self { limit, active: AtomicU64::new(0) }
    }

    /// The cap; `None`: no cap.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Sessions holding a place now, across workers.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a new session on `listener` fits under the engine-wide cap and its service's
/// cap right now. Drivers ask before accepting; [`Admission::decide`] then takes the places
/// atomically. A listener no service owns has room (its connections are admitted and
/// dropped by `decide`).
pub fn has_room(tables: &Tables, cap: &SessionCap, listener: SocketAddr) -> bool {
    if !below(&cap.active, cap.limit) {
        return false;
    }
    let Some(service) = tables.service_for(listener) else { return true };
    let s = &tables.services()[service];
    below(&s.counters.active, s.max_sessions)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No service owns the listener any more (removed by a reload): drop the connection.
    NoService,
    /// The engine-wide or the service's session cap is reached: keep the connection
    /// waiting and stop accepting until a place frees up.
    Full,
}

/// One worker per CPU this process may run on.
pub fn default_workers() -> usize {
    sys::allowed_cpus().len().max(1)
}

/// Signals handled by the control thread, blocked in every worker.
pub const CONTROL_SIGNALS: [libc::c_int; 4] =
    [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// How long a reload waits for every worker to close its removed listeners.
pub const LISTENER_REMOVAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A request from the control thread to a worker.
#[derive(Debug)]
pub enum Command {
    /// Stop accepting, let sessions finish until `deadline`, cut the rest, then exit.
    Drain { deadline: Instant },
    /// Stop accepting on these addresses: admit what is already in their accept queues
    /// (decided by the tables in force), close them, then report on `done`.
    RemoveListeners { addrs: Vec<SocketAddr>, done: Sender<usize> },
    /// Start accepting on these listeners (already bound and listening).
    AddListeners { listeners: Vec<TcpListener> },
    /// Report up to `limit` live sessions.
    Snapshot { limit: usize, reply: Sender<Vec<LiveSession>> },
}

/// A live session, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
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

/// How long [`Engine::sessions`] waits for each worker's answer.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a publication changed in the listener set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerChange {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
    /// UDP listen addresses opened and closed.
    pub udp_added: Vec<SocketAddr>,
    pub udp_removed: Vec<SocketAddr>,
}

/// Everything one worker thread owns.
#[derive(Debug)]
pub struct WorkerContext {
    pub id: usize,
    pub listeners: Vec<TcpListener>,
    pub tables: Arc<ArcSwap<Tables>>,
    pub commands: Receiver<Command>,
    pub wake: Arc<EventFd>,
    pub stats: Arc<WorkerStats>,
    pub events: EventSink,
    pub pipe_size: usize,
    pub buffer_size: usize,
    pub relay: Relay,
    /// The engine-wide session cap, shared by every worker.
    pub cap: Arc<SessionCap>,
    /// How the worker reports its setup and waits for the engine's go.
    pub startup: Startup,
}

/// A loop's part in starting the engine (each worker's TCP driver and UDP loop). Every loop
/// sets up (a ring or poller: fds of its own) and reports the outcome; none runs until all
/// have succeeded, so that no setup can fail for fds that other loops' first accepts took,
/// and `Engine::start` returns only an engine whose every loop is up (or the first setup
/// error).
#[derive(Debug, Clone)]
pub struct Startup {
    /// The loop's index: worker `i`'s TCP loop is `i`, its UDP loop `workers + i`.
    id: usize,
    report: Sender<(usize, io::Result<()>)>,
    go: Receiver<bool>,
}

impl Startup {
    /// Reports `setup`; a worker that set up waits for the engine's go and gets its driver
    /// back to run, or `None` when the engine does not start (another worker failed).
    pub fn settle<T>(&self, setup: io::Result<T>) -> Option<T> {
        match setup {
            Ok(driver) => {
                let _ = self.report.send((self.id, Ok(())));
                (self.go.recv() == Ok(true)).then_some(driver)
            }
            Err(e) => {
                let _ = self.report.send((self.id, Err(e)));
                None
            }
        }
    }
}

/// What a session learned when it was accepted: the tables that decide it for its whole
/// life, its service and addresses, and the backend it is connecting or connected to. It
/// also keeps the service and backend counters up to date.
#[derive(Debug)]
pub struct Admission {
    pub tables: Arc<Tables>,
    pub service: usize,
    pub listener: SocketAddr,
    /// The client: the connection's peer, or the source a trusted PROXY header declared.
    pub client: SocketAddr,
    /// Where the client connected to: the listener, or what a PROXY header declared.
    pub destination: SocketAddr,
    pub pool_start: usize,
    /// Backends (pool indices) this session has tried, in order.
    pub tried: Tried,
    pub start_wall: SystemTime,
    /// The backend of the current connect attempt, then of the relay.
    pub backend: Option<Backend>,
    /// The firewall's decision, once made.
    pub decision: Option<Decision>,
    /// Why the session was refused (denied by the firewall, or over a limit).
    pub refusal: Option<CloseReason>,
    /// The places the session holds under its service's limits, given back on drop.
    pub ticket: Option<Ticket>,
    /// Bandwidth and byte cap; `None` when neither applies (the common case: one branch).
    pub shaper: Option<Box<Shaper>>,
    /// This session's capture, when its rule or service asks for one; drivers report to
    /// it once per direction as bytes move (one branch for sessions not captured).
    pub tap: Option<Tap>,
    /// The engine-wide cap this session holds a place of until it finishes.
    cap: Arc<SessionCap>,
}

/// Why a direction may not read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Its buckets are empty; the session's deadline wakes it.
    Throttled,
    /// The session's byte cap is reached: cut it with [`CloseReason::ByteCap`].
    Capped,
}

impl Admission {
    /// Admits a freshly accepted connection under the current tables, taking a place under
    /// the engine-wide cap and its service's cap. The firewall's decision follows with
    /// [`judge`](Self::judge).
    pub fn decide(
        tables: &ArcSwap<Tables>,
        cap: &Arc<SessionCap>,
        listener: SocketAddr,
        client: SocketAddr,
    ) -> Result<Self, Refusal> {
        let tables = tables.load_full();
        let service = tables.service_for(listener).ok_or(Refusal::NoService)?;
        let s = &tables.services()[service];
        if !reserve(&cap.active, cap.limit) {
            return Err(Refusal::Full);
        }
        if !reserve(&s.counters.active, s.max_sessions) {
            cap.release();
            return Err(Refusal::Full);
        }
        WorkerStats::add(&s.counters.sessions, 1);
        let start_wall = SystemTime::now();
        let (backend, decision) = (None, None);
        Ok(Self {
            tables,
            service,
            listener,
            client,
            destination: listener,
            pool_start: 0,
            tried: Tried::default(),
            start_wall,
            backend,
            decision,
            refusal: None,
            ticket: None,
            shaper: None,
            tap: None,
            cap: cap.clone(),
        })
    }

    /// Whether the firewall needs the client's TLS server name to decide this session.
    pub fn needs_sni(&self) -> bool {
        self.tables.needs_sni(self.service)
    }

    /// Decides the session with the firewall (given the client's TLS server name, if any),
    /// then with the service's session limits; an allowed session gets its shaper. `Err`
    /// names why the session is refused ([`CloseReason::Denied`] or [`CloseReason::Limit`]).
    pub fn judge(&mut self, sni: Option<&str>, now: Instant) -> Result<(), CloseReason> {
        let wall = self.start_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let q = Query { client: self.client, listener: self.listener, now: wall, sni };
        let decision = self.tables.judge(self.service, &q);
        let allowed = matches!(decision.action, Action::Allow { .. });
        self.decision = Some(decision);
        if !allowed {
            WorkerStats::add(&self.service().counters.denied, 1);
            return Err(self.refuse(CloseReason::Denied));
        }
        let s = self.service();
        let at = shape::nanos(now);
        match s.limit_state.admit(&s.limits, self.client.ip(), at) {
            Ok(ticket) => self.ticket = Some(ticket),
            Err(_) => {
                WorkerStats::add(&s.counters.limited, 1);
                return Err(self.refuse(CloseReason::Limit));
            }
        }
        self.shaper = self.shaper_at(at);
        let policy = self.decision.as_ref().and_then(|d| d.capture);
        let policy = policy.and_then(|i| self.tables.captures.get(i));
        self.tap = policy.map(|p| Tap::new(p.clone(), self.service().name.clone()));
        self.pool_start = self.pool().start();
        Ok(())
    }

    fn refuse(&mut self, reason: CloseReason) -> CloseReason {
        self.refusal = Some(reason);
        reason
    }

    /// The shaper of an allowed session: the service's and the rule's bandwidth blocks and
    /// the byte cap, or `None` when none applies.
    fn shaper_at(&self, now: u64) -> Option<Box<Shaper>> {
        let s = self.service();
        let rule = self.decision.as_ref().and_then(|d| d.bandwidth.as_ref());
        let blocks = [s.bandwidth.as_ref(), rule];
        if s.limits.max_bytes.is_none() && blocks.iter().all(Option::is_none) {
            return None;
        }
        let mut shaper = Shaper::with_byte_cap(s.limits.max_bytes);
        for bw in blocks.into_iter().flatten() {
            bw.attach(&mut shaper, self.client.ip(), now);
        }
        Some(Box::new(shaper))
    }

    /// How many bytes `dir` may read now, for a read of up to `want`. A throttled direction
    /// is marked on `session`, whose deadline then wakes it.
    #[inline]
    pub fn allowance(
        &mut self,
        session: &mut Session,
        dir: Direction,
        now: Instant,
        want: usize,
    ) -> Result<usize, Stall> {
        let Some(shaper) = self.shaper.as_mut() else { return Ok(want) };
        match shaper.allowance(dir, shape::nanos(now), want) {
            Allowance::Bytes(n) => Ok(n),
            Allowance::Wait(at) => {
                session.throttle(dir, shape::instant(at));
                Err(Stall::Throttled)
            }
            Allowance::Capped => Err(Stall::Capped),
        }
    }

    /// `dir` read `got` bytes at `now` (0 for nothing, an error or the end of stream) under
    /// its last allowance.
    #[inline]
    pub fn used(&mut self, dir: Direction, got: usize, now: Instant) {
        if let Some(shaper) = self.shaper.as_mut() {
            shaper.used(dir, got, shape::nanos(now));
        }
    }

    /// The trusted sources of PROXY headers when this session's listener expects one.
    pub fn accept_proxy(&self) -> Option<&[ipnet::IpNet]> {
        self.service().accept_proxy.as_deref()
    }

    /// The PROXY protocol header to send to the backend before any relayed byte, if its
    /// pool asks for one.
    pub fn proxy_header(&self) -> Option<Vec<u8>> {
        let version = self.pool().send_proxy?;
        Some(crate::proxy::encode(version, self.client, self.destination))
    }

    /// Whether a refused session's client must see a reset rather than a clean close.
    pub fn deny_resets(&self) -> bool {
        match self.refusal {
            Some(CloseReason::Limit) => self.service().limits.reset,
            _ => {
                matches!(self.decision, Some(Decision { action: Action::Deny { reset: true }, .. }))
            }
        }
    }

    /// The pool this session's rule sends it to, or the service's own.
    fn pool(&self) -> &Pool {
        match self.decision {
            Some(Decision { action: Action::Allow { pool: Some(i) }, .. }) => {
                self.tables.pools.get(i).map_or(&self.service().pool, |p| &p.pool)
            }
            _ => &self.service().pool,
        }
    }

    pub fn service(&self) -> &Service {
        &self.tables.services()[self.service]
    }

    /// Chooses the backend for the next connect attempt (the `attempt`-th) with the pool's
    /// algorithm among the eligible backends this session has not tried; `None` when none
    /// is left (the session closes as `no_backend` if no attempt was made).
    pub fn begin_attempt(&mut self, attempt: usize) -> Option<SocketAddr> {
        debug_assert_eq!(attempt, self.tried.len());
        let pick = Pick {
            start: self.pool_start,
            key: client_key(self.client),
            tried: self.tried.as_slice(),
            now: Instant::now(),
        };
        let i = self.pool().pick(&pick)?;
        let backend = self.pool().backends()[i].clone();
        let addr = backend.addr;
        self.tried.push(i);
        self.backend = Some(backend);
        Some(addr)
    }

    /// The current connect attempt failed: counted, and the backend ejected after too many
    /// consecutive failures (the control plane's health checker logs the ejection).
    pub fn attempt_failed(&self) {
        WorkerStats::add(&self.service().counters.connect_errors, 1);
        let Some(b) = &self.backend else { return };
        WorkerStats::add(&b.state.connect_errors, 1);
        if let Some(i) = self.tried.last() {
            self.pool().connect_failed(i, Instant::now());
        }
    }

    /// The backend accepted the connection after `latency`; a capture begins.
    pub fn connected(&mut self, latency: Duration) {
        if let (Some(tap), Some(b)) = (self.tap.as_mut(), &self.backend) {
            tap.open(self.client, b.addr);
        }
        self.service().counters.connect_latency.observe(latency);
        if let Some(b) = &self.backend {
            b.state.connect_succeeded();
            WorkerStats::add(&b.state.sessions, 1);
            WorkerStats::add(&b.state.active, 1);
        }
    }

    /// What the admin API shows of this session at `now`.
    pub fn live(&self, worker: usize, session: &Session, now: Instant) -> LiveSession {
        LiveSession {
            worker,
            service: self.service().name.clone(),
            client: self.client,
            listener: self.listener,
            backend: self.backend.as_ref().map(|b| b.addr),
            state: match session.phase {
                Phase::Peeking { .. } => "peeking",
                Phase::Connecting { .. } => "connecting",
                Phase::Relaying => "relaying",
            },
            age: session.age(now),
            bytes_up: session.up.bytes,
            bytes_down: session.down.bytes,
        }
    }

    /// A record of this session of `kind`, made at `now`.
    pub fn record(
        &self,
        kind: RecordKind,
        worker: usize,
        session: &Session,
        now: Instant,
    ) -> Record {
        let duration = session.age(now);
        Record {
            kind,
            worker,
            service: self.service().name.clone(),
            listener: self.listener,
            client: self.client,
            backend: self.backend.as_ref().map(|b| b.addr),
            start: self.start_wall,
            end: self.start_wall + duration,
            duration,
            bytes_up: session.up.bytes,
            bytes_down: session.down.bytes,
            protocol: crate::tables::Protocol::Tcp,
            packets_up: 0,
            packets_down: 0,
            verdict: match self.decision {
                Some(Decision { action: Action::Deny { .. }, .. }) => Verdict::Deny,
                _ => Verdict::Allow,
            },
            rule: self.decision.as_ref().and_then(|d| d.rule.clone()),
            reason: None,
            tables_version: self.tables.version,
        }
    }

    /// Accounts for the end of the session (and of its capture) and returns its close
    /// record.
    pub fn finish(
        &mut self,
        worker: usize,
        session: &Session,
        reason: CloseReason,
        now: Instant,
    ) -> Record {
        if let Some(tap) = self.tap.take() {
            tap.close(reason);
        }
        let counters = &self.service().counters;
        counters.active.fetch_sub(1, Ordering::Relaxed);
        self.cap.release();
        WorkerStats::add(&counters.bytes_up, session.up.bytes);
        WorkerStats::add(&counters.bytes_down, session.down.bytes);
        let relayed = session.phase == Phase::Relaying;
        if matches!(reason, CloseReason::ByteCap | CloseReason::MaxDuration) {
            WorkerStats::add(&counters.cut, 1);
        }
        if !relayed && !matches!(reason, CloseReason::Denied | CloseReason::Limit) {
            WorkerStats::add(&counters.unserved, 1);
        }
        if reason == CloseReason::NoBackend {
            WorkerStats::add(&counters.no_backend, 1);
        }
        if reason == CloseReason::ProxyError {
            WorkerStats::add(&counters.proxy_errors, 1);
        }
        if let (true, Some(b)) = (relayed, &self.backend) {
            b.state.active.fetch_sub(1, Ordering::Relaxed);
            WorkerStats::add(&b.state.bytes_up, session.up.bytes);
            WorkerStats::add(&b.state.bytes_down, session.down.bytes);
        }
        let kind = if reason == CloseReason::Denied { RecordKind::Deny } else { RecordKind::Close };
        Record { reason: Some(reason), ..self.record(kind, worker, session, now) }
    }
}

struct WorkerHandle {
    thread: JoinHandle<io::Result<()>>,
    commands: Sender<Command>,
    wake: Arc<EventFd>,
    udp: UdpHandle,
}

/// A worker's UDP loop (its own thread, on the worker's CPU).
struct UdpHandle {
    thread: JoinHandle<io::Result<()>>,
    commands: Sender<UdpCommand>,
    wake: Arc<EventFd>,
}

impl UdpHandle {
    fn send(&self, command: UdpCommand) {
        let _ = self.commands.send(command);
        self.wake.notify();
    }
}

/// Binds a socket on each address for one worker.
fn bind_all<T>(
    addrs: &[SocketAddr],
    bind: fn(SocketAddr) -> io::Result<T>,
) -> Result<Vec<T>, EngineError> {
    addrs
        .iter()
        .map(|&addr| bind(addr).map_err(|source| EngineError::Bind { addr, source }))
        .collect()
}

/// Starts worker `id`'s UDP loop on `cpu`.
fn spawn_udp(
    ctx: UdpContext,
    commands: Sender<UdpCommand>,
    cpu: Option<usize>,
) -> Result<UdpHandle, EngineError> {
    let id = ctx.id;
    let wake = ctx.wake.clone();
    let thread = std::thread::Builder::new()
        .name(format!("sluice-u{id}"))
        .spawn(move || {
            if let Err(e) = sys::block_signals(&CONTROL_SIGNALS) {
                log::warn!("udp worker {id}: cannot block signals: {e}");
            }
            if let Some(cpu) = cpu {
                if let Err(e) = sys::pin_to_cpu(cpu) {
                    log::warn!("udp worker {id}: cannot pin to cpu {cpu}: {e}");
                }
            }
            udp::run(ctx)
        })
        .map_err(|source| EngineError::Spawn { worker: id, source })?;
    Ok(UdpHandle { thread, commands, wake })
}

/// The running data plane.
pub struct Engine {
    tables: Arc<ArcSwap<Tables>>,
    selection: Selection,
    workers: Vec<WorkerHandle>,
    stats: Vec<Arc<WorkerStats>>,
    cap: Arc<SessionCap>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("selection", &self.selection)
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Engine {
    /// Chooses the driver, binds every listener for every worker and starts the workers.
    pub fn start(
        config: &EngineConfig,
        tables: Arc<ArcSwap<Tables>>,
        events: EventSink,
    ) -> Result<Engine, EngineError> {
        let selection = driver::select(config.driver)?;
        let addrs = tables.load().listen_addrs();
        let udp_addrs = tables.load().udp_listen_addrs();
        let cpus = sys::allowed_cpus();
        let count = config.workers.max(1);
        let mut contexts = Vec::with_capacity(count);
        let mut udp_contexts = Vec::with_capacity(count);
        let cap = Arc::new(SessionCap::new(config.max_sessions));
        let (report, reports) = crossbeam_channel::unbounded();
        let mut gos = Vec::with_capacity(count);
        for id in 0..count {
            let listeners = bind_all(&addrs, sys::bind_reuseport)?;
            let sockets = bind_all(&udp_addrs, sys::bind_udp_reuseport)?;
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = Arc::new(
                EventFd::new().map_err(|source| EngineError::Spawn { worker: id, source })?,
            );
            let (go, go_rx) = crossbeam_channel::bounded(1);
            let (udp_go, udp_go_rx) = crossbeam_channel::bounded(1);
            gos.extend([go, udp_go]);
            let ctx = WorkerContext {
                id,
                listeners,
                tables: tables.clone(),
                commands: rx,
                wake: wake.clone(),
                stats: Arc::default(),
                events: events.clone(),
                pipe_size: config.pipe_size,
                buffer_size: config.buffer_size,
                relay: config.relay,
                cap: cap.clone(),
                startup: Startup { id, report: report.clone(), go: go_rx },
            };
            let (udp_tx, udp_rx) = crossbeam_channel::unbounded();
            let udp_wake = Arc::new(
                EventFd::new().map_err(|source| EngineError::Spawn { worker: id, source })?,
            );
            udp_contexts.push((
                UdpContext {
                    id,
                    sockets,
                    tables: tables.clone(),
                    commands: udp_rx,
                    wake: udp_wake,
                    stats: ctx.stats.clone(),
                    events: events.clone(),
                    max_flows: config.max_flows,
                    max_datagram: config.udp_max_datagram,
                    startup: Startup { id: count + id, report: report.clone(), go: udp_go_rx },
                },
                udp_tx,
            ));
            contexts.push((ctx, tx, wake));
        }
        // Only the loops' copies are left: a loop that dies before it reports is seen.
        drop(report);
        let mut engine = Engine { tables, selection, workers: Vec::new(), stats: Vec::new(), cap };
        let started = engine
            .spawn_workers(config, contexts, udp_contexts, &cpus)
            .and_then(|()| engine.await_setup(&reports));
        match started {
            Ok(()) => {
                for go in &gos {
                    let _ = go.send(true);
                }
                Ok(engine)
            }
            Err(e) => {
                // Loops waiting for the go see that it will not come, and exit.
                drop(gos);
                engine.join_all();
                Err(e)
            }
        }
    }

    /// Starts each worker's UDP loop and TCP worker thread.
    fn spawn_workers(
        &mut self,
        config: &EngineConfig,
        contexts: Vec<(WorkerContext, Sender<Command>, Arc<EventFd>)>,
        udp_contexts: Vec<(UdpContext, Sender<UdpCommand>)>,
        cpus: &[usize],
    ) -> Result<(), EngineError> {
        for ((ctx, commands, wake), (udp_ctx, udp_commands)) in
            contexts.into_iter().zip(udp_contexts)
        {
            let id = ctx.id;
            let cpu = config.pin.then(|| cpus.get(id % cpus.len().max(1)).copied()).flatten();
            let udp = spawn_udp(udp_ctx, udp_commands, cpu)?;
            let stats = ctx.stats.clone();
            let kind = self.selection.kind;
            let thread =
                std::thread::Builder::new().name(format!("sluice-w{id}")).spawn(move || {
                    // Signals belong to the control thread; a worker never runs a handler
                    // (nor sees EINTR on its ring wait for one).
                    if let Err(e) = sys::block_signals(&CONTROL_SIGNALS) {
                        log::warn!("worker {id}: cannot block signals: {e}");
                    }
                    if let Some(cpu) = cpu {
                        if let Err(e) = sys::pin_to_cpu(cpu) {
                            log::warn!("worker {id}: cannot pin to cpu {cpu}: {e}");
                        }
                    }
                    driver::run(kind, ctx)
                });
            // Without its TCP thread, the UDP loop exits by itself once the go is refused.
            let thread = thread.map_err(|source| EngineError::Spawn { worker: id, source })?;
            self.stats.push(stats);
            self.workers.push(WorkerHandle { thread, commands, wake, udp });
        }
        Ok(())
    }

    /// Waits until every loop has reported its setup; the first failure is returned. A loop
    /// that ends without reporting (a panic) fails the start too.
    fn await_setup(&self, reports: &Receiver<(usize, io::Result<()>)>) -> Result<(), EngineError> {
        let count = self.workers.len();
        let thread = |i: usize| {
            let w = &self.workers[i % count];
            if i < count {
                &w.thread
            } else {
                &w.udp.thread
            }
        };
        let mut reported = vec![false; 2 * count];
        let mut first = Ok(());
        while reported.contains(&false) {
            match reports.recv_timeout(Duration::from_millis(50)) {
                Ok((i, outcome)) => {
                    reported[i] = true;
                    if let (Err(source), true) = (outcome, first.is_ok()) {
                        first = Err(EngineError::Spawn { worker: i % count, source });
                    }
                }
                Err(_) => {
                    let gone = (0..2 * count).find(|&i| !reported[i] && thread(i).is_finished());
                    if let Some(i) = gone {
                        return Err(EngineError::Panicked { worker: i % count });
                    }
                }
            }
        }
        first
    }

    /// Joins the loops of an engine that did not start (they exit once the go is refused).
    fn join_all(self) {
        for w in self.workers {
            let _ = w.thread.join();
            let _ = w.udp.thread.join();
        }
    }

    /// The driver in use and why.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The engine-wide session cap and how many places are taken.
    pub fn cap(&self) -> &SessionCap {
        &self.cap
    }

    /// Counters of each worker, by worker id.
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        &self.stats
    }

    /// Publishes new tables. Listeners are diffed: every added address is bound for every
    /// worker first (a failure changes nothing); removed addresses stop accepting, their
    /// queued connections are admitted under the tables in force and they are closed; then
    /// the new tables are stored and the added listeners start accepting. Unchanged
    /// listeners are never touched.
    pub fn publish(&self, next: Tables) -> Result<ListenerChange, EngineError> {
        let current = self.tables.load();
        let diff = |current: Vec<SocketAddr>, wanted: Vec<SocketAddr>| {
            let added = wanted.iter().filter(|a| !current.contains(a)).copied().collect();
            let removed = current.iter().filter(|a| !wanted.contains(a)).copied().collect();
            (added, removed)
        };
        let (added, removed) = diff(current.listen_addrs(), next.listen_addrs());
        let (udp_added, udp_removed) = diff(current.udp_listen_addrs(), next.udp_listen_addrs());
        drop(current);
        let change = ListenerChange { added, removed, udp_added, udp_removed };
        let mut bound = Vec::with_capacity(self.workers.len());
        for _ in &self.workers {
            let listeners = bind_all(&change.added, sys::bind_reuseport)?;
            let sockets = bind_all(&change.udp_added, sys::bind_udp_reuseport)?;
            bound.push((listeners, sockets));
        }
        if !change.removed.is_empty() {
            self.remove_listeners(&change.removed);
        }
        if !change.udp_removed.is_empty() {
            self.remove_udp_listeners(&change.udp_removed);
        }
        self.tables.store(Arc::new(next));
        for (w, (listeners, sockets)) in self.workers.iter().zip(bound) {
            if !listeners.is_empty() {
                let _ = w.commands.send(Command::AddListeners { listeners });
                w.wake.notify();
            }
            if !sockets.is_empty() {
                w.udp.send(UdpCommand::AddListeners { sockets });
            }
        }
        Ok(change)
    }

    fn remove_listeners(&self, addrs: &[SocketAddr]) {
        let (done, acks) = crossbeam_channel::bounded(self.workers.len());
        for w in &self.workers {
            let command = Command::RemoveListeners { addrs: addrs.to_vec(), done: done.clone() };
            let _ = w.commands.send(command);
            w.wake.notify();
        }
        let deadline = Instant::now() + LISTENER_REMOVAL_TIMEOUT;
        for _ in &self.workers {
            if acks.recv_deadline(deadline).is_err() {
                log::warn!("a worker did not confirm closing removed listeners in time");
                return;
            }
        }
    }

    fn remove_udp_listeners(&self, addrs: &[SocketAddr]) {
        let (done, acks) = crossbeam_channel::bounded(self.workers.len());
        for w in &self.workers {
            w.udp.send(UdpCommand::RemoveListeners { addrs: addrs.to_vec(), done: done.clone() });
        }
        let deadline = Instant::now() + LISTENER_REMOVAL_TIMEOUT;
        for _ in &self.workers {
            if acks.recv_deadline(deadline).is_err() {
                log::warn!("a UDP loop did not confirm closing removed sockets in time");
                return;
            }
        }
    }

    /// Up to `limit` live sessions and UDP flows across all workers (each worker and UDP
    /// loop answers between two of its loop turns; one that does not answer in time is
    /// left out).
    pub fn sessions(&self, limit: usize) -> Vec<LiveSession> {
        let (reply, answers) = crossbeam_channel::bounded(2 * self.workers.len());
        for w in &self.workers {
            let _ = w.commands.send(Command::Snapshot { limit, reply: reply.clone() });
            w.wake.notify();
            w.udp.send(UdpCommand::Snapshot { limit, reply: reply.clone() });
        }
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        let mut all = Vec::new();
        for _ in 0..2 * self.workers.len() {
            match answers.recv_deadline(deadline) {
                Ok(mut sessions) => all.append(&mut sessions),
                Err(_) => break,
            }
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.age));
        all.truncate(limit);
        all
    }

    /// The tables in force.
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    /// Asks every worker to stop accepting and drain its sessions until `grace` has passed.
    pub fn drain(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for w in &self.workers {
            let _ = w.commands.send(Command::Drain { deadline });
            w.wake.notify();
            w.udp.send(UdpCommand::Drain);
        }
    }

    /// Whether every worker thread has exited.
    pub fn is_stopped(&self) -> bool {
        self.workers.iter().all(|w| w.thread.is_finished() && w.udp.thread.is_finished())
    }

    /// Waits for every worker; the first worker error is returned.
    pub fn join(self) -> Result<(), EngineError> {
        let mut result = Ok(());
        for (worker, w) in self.workers.into_iter().enumerate() {
            // A TCP worker exits when drained; its UDP loop follows the same drain.
            w.udp.send(UdpCommand::Drain);
            for thread in [w.thread, w.udp.thread] {
                let outcome = match thread.join() {
                    Ok(r) => r.map_err(|source| EngineError::Worker { worker, source }),
                    Err(_) => Err(EngineError::Panicked { worker }),
                };
                if result.is_ok() {
                    result = outcome;
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Backend;
    use crate::tables::Timeouts;

    fn tables(max_sessions: Option<u64>) -> (Tables, SocketAddr) {
        let listen: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let pool = Pool::new(vec![Backend::new("127.0.0.1:1".parse().unwrap())]);
        let mut web = Service::new("web", vec![listen], pool, Timeouts::default());
        web.max_sessions = max_sessions;
        (Tables::new(1, vec![web]), listen)
    }

    #[test]
    fn reserve_takes_places_up_to_the_limit_and_no_further() {
        let active = AtomicU64::new(0);
        assert!((0..3).all(|_| reserve(&active, Some(3))));
        assert!(!reserve(&active, Some(3)));
        assert_eq!(active.load(Ordering::Relaxed), 3, "a refusal takes nothing");
        assert!(reserve(&active, None), "no limit, always room");
    }

    #[test]
    fn workers_reserving_at_once_never_overshoot_the_cap() {
        let active = Arc::new(AtomicU64::new(0));
        let taken: u64 = (0..4)
            .map(|_| {
                let active = active.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| reserve(&active, Some(100))).count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap() as u64)
            .sum();
        assert_eq!(taken, 100);
        assert_eq!(active.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_session_holds_its_places_until_it_finishes() {
        let (t, listen) = tables(Some(1));
        let swap = ArcSwap::from_pointee(t);
        let cap = Arc::new(SessionCap::new(Some(5)));
        let client: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let mut first = Admission::decide(&swap, &cap, listen, client).unwrap();
        assert_eq!(cap.active(), 1);
        assert!(!has_room(&swap.load(), &cap, listen), "the service's cap of 1 is full");
        let refused = Admission::decide(&swap, &cap, listen, client).unwrap_err();
        assert_eq!(refused, Refusal::Full);
        assert_eq!(cap.active(), 1, "a refusal gives back the engine-wide place");
        let session = Session::new(Instant::now());
        first.finish(0, &session, CloseReason::ClientFin, Instant::now());
        assert_eq!(cap.active(), 0);
        assert!(has_room(&swap.load(), &cap, listen));
        let other: SocketAddr = "127.0.0.1:81".parse().unwrap();
        let none = Admission::decide(&swap, &cap, other, client).unwrap_err();
        assert_eq!(none, Refusal::NoService);
    }

    #[test]
    fn the_engine_wide_cap_counts_every_service() {
        let (t, listen) = tables(None);
        let swap = ArcSwap::from_pointee(t);
        let cap = Arc::new(SessionCap::new(Some(2)));
        let client: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let _a = Admission::decide(&swap, &cap, listen, client).unwrap();
        let _b = Admission::decide(&swap, &cap, listen, client).unwrap();
        assert!(!has_room(&swap.load(), &cap, listen));
        assert_eq!(Admission::decide(&swap, &cap, listen, client).unwrap_err(), Refusal::Full);
        assert_eq!(swap.load().services()[0].counters.active.load(Ordering::Relaxed), 2);
    }
}
