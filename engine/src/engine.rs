//! The running data plane: [`Engine::start`] chooses the driver, binds every listener for
//! every worker before any thread runs (a bad address is a startup error, not a log line from
//! a thread), starts one pinned worker per core with its UDP loop, and returns once every
//! loop is set up. [`Engine::publish`] swaps the tables and diffs the listeners (reload);
//! [`Engine::drain`] and [`Engine::join`] stop it.
//!
//! LIFECYCLE of a publication (docs/LIFECYCLE.md): added listeners are bound for every worker
//! first (a failure changes nothing); removed ones stop accepting, their queued connections
//! are admitted under the tables in force and they are closed; then the new tables are
//! stored and the added listeners start accepting. Unchanged listeners are never touched.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::admission::{SessionCap, DEFAULT_MAX_SESSIONS};
use crate::counters::WorkerStats;
use crate::driver::{self, DriverChoice, Selection, DEFAULT_RING_BUFFERS};
use crate::events::EventSink;
use crate::handover::{self, Inherited, Ledger};
use crate::record::{LiveSession, Protocol};
use crate::sys::{self, EventFd};
use crate::tables::{Listen, Tables};
use crate::udp::{self, UdpCommand, UdpContext};
use crate::worker::{Command, Relay, SessionId, Startup, WorkerContext, CONTROL_SIGNALS};
use crate::EngineError;

/// Default capacity of each relay pipe (splice relay), per direction.
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;
/// Default size of the large relay buffers (copy relay), per direction. Directions start
/// with 64 KiB and move to this size once a read fills their buffer (bulk streams).
pub const DEFAULT_BUFFER_SIZE: usize = 1024 * 1024;

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
    /// How workers move payload, on either driver.
    pub relay: Relay,
    /// Small provided buffers per worker for the io_uring copy relay (a power of two; a
    /// sixteenth as many large ones come with them).
    pub ring_buffers: u16,
    /// Most UDP flows per worker (least recently used evicted beyond it).
    pub max_flows: usize,
    /// Largest UDP datagram relayed, in bytes; larger ones are dropped and counted.
    pub udp_max_datagram: usize,
    /// Most sessions at once across all workers; `None`: no cap.
    pub max_sessions: Option<u64>,
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
            ring_buffers: DEFAULT_RING_BUFFERS,
            max_flows: udp::DEFAULT_MAX_FLOWS,
            udp_max_datagram: udp::DEFAULT_MAX_DATAGRAM,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// What a relay pipe asked to hold `size` bytes holds on this system: the kernel rounds a
/// size up, and above fs.pipe-max-size keeps its default unless the process may raise it
/// (CAP_SYS_RESOURCE). One pipe is made to find out.
pub fn pipe_capacity(size: usize) -> io::Result<usize> {
    sys::Pipe::new(size)?.capacity()
}

/// One worker per CPU this process may run on.
pub fn default_workers() -> usize {
    sys::allowed_cpus().len().max(1)
}

/// How long a reload waits for every worker to close its removed listeners.
pub const LISTENER_REMOVAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Engine::sessions`] waits for each worker's answer.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a publication changed in the listener set. A listener whose interface changed is
/// both removed and added: it is bound afresh and the old sockets are closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerChange {
    pub added: Vec<Listen>,
    pub removed: Vec<Listen>,
    /// UDP listeners opened and closed.
    pub udp_added: Vec<Listen>,
    pub udp_removed: Vec<Listen>,
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

/// Binds a socket for each listener, for one worker.
fn bind_all<T>(
    listeners: &[Listen],
    bind: fn(&Listen) -> Result<T, EngineError>,
) -> Result<Vec<T>, EngineError> {
    listeners.iter().map(bind).collect()
}

/// The addresses of `listeners` (what workers know their sockets by).
fn addrs_of(listeners: &[Listen]) -> Vec<SocketAddr> {
    listeners.iter().map(|l| l.addr).collect()
}

/// Sets on every listening socket what its service may change without rebinding it: the
/// accept backlog and the client options accepted sockets inherit (keepalive, user
/// timeout). Every socket is tried; the first failure is returned, naming its listener.
fn configure_listeners(ledger: &Ledger, tables: &Tables) -> io::Result<()> {
    let mut first = Ok(());
    let mut note = |addr: SocketAddr, set: io::Result<()>| {
        if first.is_ok() {
            first = set.map_err(|e| io::Error::new(e.kind(), format!("listener {addr}: {e}")));
        }
    };
    ledger.each(Protocol::Tcp, |addr, fd| {
        let Some(i) = tables.service_for(addr) else { return };
        let s = &tables.services()[i];
        let set = sys::set_backlog(fd, s.backlog)
            .and_then(|()| sys::set_side_options(fd, &s.client_socket))
            .and_then(|()| sys::set_filter(fd, tables.silent_filter(i, addr.is_ipv6()).as_deref()));
        note(addr, set);
    });
    ledger.each(Protocol::Udp, |addr, fd| {
        let Some(i) = tables.udp_service_for(addr) else { return };
        note(addr, sys::set_filter(fd, tables.silent_filter(i, addr.is_ipv6()).as_deref()));
    });
    first
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
    /// A copy of every listening socket the workers hold, for a binary upgrade.
    ledger: Ledger,
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
        Engine::start_with(config, tables, events, Inherited::default())
    }

    /// [`Engine::start`] on the sockets of `inherited` where it has some for an address
    /// (see [`Inherited`] for how they are dealt to the workers), binding the others.
    /// Inherited sockets of addresses the tables do not listen on are closed: the caller
    /// releases them only while another process still holds them.
    pub fn start_with(
        config: &EngineConfig,
        tables: Arc<ArcSwap<Tables>>,
        events: EventSink,
        mut inherited: Inherited,
    ) -> Result<Engine, EngineError> {
        let selection = driver::select(config.driver)?;
        let addrs = tables.load().listeners();
        let udp_addrs = tables.load().udp_listeners();
        let cpus = sys::allowed_cpus();
        let count = config.workers.max(1);
        let mut contexts = Vec::with_capacity(count);
        let mut udp_contexts = Vec::with_capacity(count);
        let cap = Arc::new(SessionCap::new(config.max_sessions));
        let (report, reports) = crossbeam_channel::unbounded();
        let mut gos = Vec::with_capacity(count);
        let mut tcp = inherited.tcp_for_workers(&addrs, count)?.into_iter();
        let mut udp = inherited.udp_for_workers(&udp_addrs, count)?.into_iter();
        drop(inherited);
        let ledger = Ledger::default();
        for id in 0..count {
            let listeners = tcp.next().unwrap_or_default();
            let sockets = udp.next().unwrap_or_default();
            let recorded = ledger
                .record(Protocol::Tcp, &listeners)
                .and_then(|()| ledger.record(Protocol::Udp, &sockets));
            recorded.map_err(|source| EngineError::Spawn { worker: id, source })?;
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
                ring_buffers: config.ring_buffers,
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
        configure_listeners(&ledger, &tables.load()).map_err(EngineError::Listeners)?;
        // Only the loops' copies are left: a loop that dies before it reports is seen.
        drop(report);
        let mut engine =
            Engine { tables, selection, workers: Vec::new(), stats: Vec::new(), cap, ledger };
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

    /// Packets the kernel dropped at the listening sockets (their socket filters' silent
    /// drops, and connections that found an accept queue full), summed over the sockets
    /// that listen now: a listener closed by a reload takes its count with it.
    pub fn listener_drops(&self) -> u64 {
        let mut total = 0;
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            self.ledger.each(protocol, |_, fd| {
                total += u64::from(sys::socket_drops(fd).unwrap_or(0));
            });
        }
        total
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
        let diff = |current: Vec<Listen>, wanted: Vec<Listen>| {
            let added = wanted.iter().filter(|l| !current.contains(l)).cloned().collect();
            let removed = current.iter().filter(|l| !wanted.contains(l)).cloned().collect();
            (added, removed)
        };
        let (added, removed) = diff(current.listeners(), next.listeners());
        let (udp_added, udp_removed) = diff(current.udp_listeners(), next.udp_listeners());
        drop(current);
        let change = ListenerChange { added, removed, udp_added, udp_removed };
        let mut bound = Vec::with_capacity(self.workers.len());
        for _ in &self.workers {
            let listeners = bind_all(&change.added, handover::bind_tcp)?;
            let sockets = bind_all(&change.udp_added, handover::bind_udp)?;
            bound.push((listeners, sockets));
        }
        // Removed before the new sockets are recorded: a listener whose interface changed
        // keeps its address, and workers and the ledger know sockets by address.
        if !change.removed.is_empty() {
            let addrs = addrs_of(&change.removed);
            self.ledger.forget(Protocol::Tcp, &addrs);
            self.remove_listeners(&addrs);
        }
        if !change.udp_removed.is_empty() {
            let addrs = addrs_of(&change.udp_removed);
            self.ledger.forget(Protocol::Udp, &addrs);
            self.remove_udp_listeners(&addrs);
        }
        for (listeners, sockets) in &bound {
            let recorded = self
                .ledger
                .record(Protocol::Tcp, listeners)
                .and_then(|()| self.ledger.record(Protocol::Udp, sockets));
            if let Err(e) = recorded {
                log::warn!("cannot keep a copy of the new listeners for an upgrade: {e}");
            }
        }
        if let Err(e) = configure_listeners(&self.ledger, &next) {
            log::warn!("reload: {e}");
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

    /// Cuts one live session or UDP flow, named by its [`LiveSession::id`], abortively
    /// (RST to both peers) with reason `admin_kill`. False when no such session lives (it
    /// ended, or the id is stale or unknown) or its worker did not answer within
    /// [`SNAPSHOT_TIMEOUT`].
    pub fn kill(&self, id: u64) -> bool {
        let id = SessionId::from_u64(id);
        let Some(w) = self.workers.get(id.worker) else { return false };
        let (reply, answer) = crossbeam_channel::bounded(1);
        if id.udp {
            w.udp.send(UdpCommand::Kill { id, reply });
        } else {
            let _ = w.commands.send(Command::Kill { id, reply });
            w.wake.notify();
        }
        answer.recv_timeout(SNAPSHOT_TIMEOUT).unwrap_or(false)
    }

    /// Whether every worker thread and UDP loop is still running.
    pub fn all_running(&self) -> bool {
        self.workers.iter().all(|w| !w.thread.is_finished() && !w.udp.thread.is_finished())
    }

    /// The tables in force.
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    /// A fresh fd of every listening socket the workers hold (one per worker and address,
    /// TCP and UDP), with its protocol and address: what a successor process needs to take
    /// over accepting without a connection reset.
    pub fn listening_sockets(&self) -> io::Result<Vec<(Protocol, SocketAddr, OwnedFd)>> {
        self.ledger.duplicates()
    }

    /// Stops accepting on every listener while sessions go on, as a reload that removes
    /// them all would: each worker admits what its accept queues hold (under the tables in
    /// force) and closes its listeners; each UDP loop closes its sockets and flows. Returns
    /// once every worker has confirmed (or [`LISTENER_REMOVAL_TIMEOUT`] passed). For a
    /// binary upgrade, once the successor accepts on the same sockets: they stay open in
    /// it, with whatever their queues hold.
    pub fn stop_accepting(&self) {
        self.ledger.clear();
        let tables = self.tables.load();
        self.remove_listeners(&tables.listen_addrs());
        self.remove_udp_listeners(&tables.udp_listen_addrs());
    }

    /// Asks every worker to stop accepting and drain its sessions until `grace` has passed.
    pub fn drain(&self, grace: Duration) {
        self.ledger.clear();
        let deadline = crate::session::later(Instant::now(), grace);
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
