//! The io_uring driver: one ring per worker (SINGLE_ISSUER + DEFER_TASKRUN where the kernel
//! has them, COOP_TASKRUN otherwise) for multishot accept, asynchronous connect, readiness
//! (PollAdd), wake-ups and timed waits; relay with splice(2) through pipes borrowed from a
//! per-worker pool. No epoll on this path.
//!
//! Each turn: submit what was queued and wait for at least one completion (bounded by the
//! next timer), handle the completions, continue work cut short by a budget, expire timers.
//! See docs/LIFECYCLE.md for the life of a session on this driver.

mod conn;
mod ops;
mod pipes;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use self::conn::{Conn, Pump, RelayPools};
use self::ops::{bit, Op, SESSION_OPS};
use self::pipes::PipePool;
use super::buffers::BufferPool;
use super::epoll::is_resource_exhaustion;
use super::is_connect_failure;
use super::peek::{self, Peeked, Start};
use super::schedule::{AcceptBackoff, Deadlines, FullPause};
use super::slots::{SlotId, Slots};
use crate::events::{RecordKind, WorkerStats};
use crate::session::{CloseReason, Direction, Due, Phase};
use crate::sys;
use crate::worker::{self, Admission, Command, LiveSession, Refusal, WorkerContext};

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// Completion queue entries per ring (the kernel keeps overflow, FEAT_NODROP, beyond this).
const CQ_ENTRIES: u32 = 8192;
/// Completions copied off the ring and handled at a time: a few KiB that stay warm, where
/// room for the whole completion queue would be touched a little deeper by every burst.
const REAP_BATCH: usize = 256;
/// How often sessions are scanned for due interim records.
const REPORT_SCAN: Duration = Duration::from_secs(1);
/// How long the worker waits when the kernel refused a submission for want of fds or
/// memory, before it submits again.
const SUBMIT_BACKOFF: Duration = Duration::from_millis(10);

/// How the ring runs completion work, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskRun {
    /// SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1+): completion work runs only when the
    /// worker asks for completions, on the worker's own thread.
    Defer,
    /// COOP_TASKRUN (Linux 5.19+): no interrupting IPIs for completion work.
    Coop,
}

fn build_ring() -> io::Result<(IoUring, TaskRun)> {
    let defer = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(RING_ENTRIES);
    if let Ok(ring) = defer {
        return Ok((ring, TaskRun::Defer));
    }
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(CQ_ENTRIES)
        .build(RING_ENTRIES)?;
    Ok((ring, TaskRun::Coop))
}

/// Checks that this kernel can run the driver; returns the features line, or why not.
/// COOP_TASKRUN support implies Linux 5.19+, which also has multishot accept.
pub fn probe() -> Result<String, String> {
    let (ring, taskrun) = build_ring()
        .map_err(|e| format!("cannot create a ring with COOP_TASKRUN (needs Linux 5.19+): {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe opcodes: {e}"))?;
    for (name, code) in [
        ("accept", opcode::Accept::CODE),
        ("connect", opcode::Connect::CODE),
        ("poll_add", opcode::PollAdd::CODE),
        ("async_cancel", opcode::AsyncCancel::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("opcode {name} is not supported"));
        }
    }
    let params = ring.params();
    if !params.is_feature_ext_arg() {
        return Err("no IORING_FEAT_EXT_ARG for timed waits (needs Linux 5.11+)".into());
    }
    if !params.is_feature_nodrop() {
        return Err("no IORING_FEAT_NODROP (needs Linux 5.5+)".into());
    }
    let taskrun = match taskrun {
        TaskRun::Defer => "single_issuer,defer_taskrun",
        TaskRun::Coop => "coop_taskrun",
    };
    Ok(format!(
        "{taskrun},multishot_accept,connect,poll_add,splice=inline,fast_poll={}",
        params.is_feature_fast_poll()
    ))
}

pub(crate) fn run(ctx: WorkerContext) -> io::Result<()> {
    let (id, startup) = (ctx.id, ctx.startup.clone());
    let worker = UringWorker::new(ctx)
        .inspect_err(|e| log::error!("worker {id}: cannot set up its ring: {e}"));
    let Some(worker) = startup.settle(worker) else { return Ok(()) };
    worker.run().inspect_err(|e| log::error!("worker {id}: ring wait failed: {e}"))
}

/// Queues an entry, handing a full submission queue to the kernel first.
fn push(ring: &mut IoUring, entry: &squeue::Entry) {
    loop {
        // SAFETY: every entry built in this driver refers only to fds and buffers that stay
        // alive until its completion arrives (see ops.rs: sessions are finalised only when
        // nothing of theirs is in flight; listeners and the eventfd outlive the ring).
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return;
        }
        if let Err(e) = ring.submit() {
            log::warn!("io_uring submit failed while the queue was full: {e}");
        }
    }
}

struct Listener {
    socket: Option<TcpListener>,
    addr: SocketAddr,
    armed: bool,
    /// Being removed by a reload: closed once its accept is off the ring.
    retiring: bool,
}

/// Boxed addresses for connect operations, kept for reuse. A connect's address must stay put
/// until its completion (the session table may move), and a fresh box per session would
/// churn the allocator on every new connection.
#[derive(Default)]
struct AddrPool {
    // The boxes are the point: each is handed to a connect whose address must not move.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<socket2::SockAddr>>,
}

/// Spare connect addresses kept at most: more than a worker has connects in flight at once
/// under any sane load, and only a few KiB.
const MAX_SPARE_ADDRS: usize = 256;

impl AddrPool {
    fn take(&mut self, addr: SocketAddr) -> Box<socket2::SockAddr> {
        match self.spare.pop() {
            Some(mut target) => {
                *target = socket2::SockAddr::from(addr);
                target
            }
            None => Box::new(socket2::SockAddr::from(addr)),
        }
    }

    fn give(&mut self, target: Box<socket2::SockAddr>) {
        if self.spare.len() < MAX_SPARE_ADDRS {
            self.spare.push(target);
        }
    }
}

struct UringWorker {
    ctx: WorkerContext,
    ring: IoUring,
    listeners: Vec<Listener>,
    conns: Slots<Conn>,
    deadlines: Deadlines,
    pending: Vec<SlotId>,
    backoff: AcceptBackoff,
    full: FullPause,
    /// Connections accepted while a session cap was full (completions of a multishot accept
    /// that was being cancelled), by listener index: they wait here, unread, for a place.
    parked: std::collections::VecDeque<(OwnedFd, usize)>,
    pools: RelayPools,
    addrs: AddrPool,
    /// Where ClientHellos are peeked at.
    scratch: Box<[u8]>,
    completions: Vec<(u64, i32, u32)>,
    draining: Option<Instant>,
    /// A reload waiting for this worker to close listeners: who to tell, and how many are left.
    removal: Option<(crossbeam_channel::Sender<usize>, usize)>,
    /// When sessions are next scanned for due interim records.
    next_report_scan: Instant,
    now: Instant,
}

impl UringWorker {
    fn new(mut ctx: WorkerContext) -> io::Result<Self> {
        let (ring, _) = build_ring()?;
        let listeners = std::mem::take(&mut ctx.listeners)
            .into_iter()
            .map(|l| {
                Ok(Listener {
                    addr: l.local_addr()?,
                    socket: Some(l),
                    armed: false,
                    retiring: false,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let pools = RelayPools {
            relay: ctx.relay,
            pipes: PipePool::new(ctx.pipe_size, ctx.stats.clone()),
            buffers: BufferPool::new(ctx.buffer_size),
        };
        let mut worker = Self {
            ctx,
            ring,
            listeners,
            conns: Slots::default(),
            deadlines: Deadlines::default(),
            pending: Vec::new(),
            backoff: AcceptBackoff::default(),
            full: FullPause::default(),
            parked: Default::default(),
            pools,
            addrs: AddrPool::default(),
            scratch: peek::scratch(),
            completions: Vec::with_capacity(REAP_BATCH),
            draining: None,
            removal: None,
            next_report_scan: Instant::now() + REPORT_SCAN,
            now: Instant::now(),
        };
        worker.arm_wake();
        for index in 0..worker.listeners.len() {
            worker.arm_accept(index);
        }
        Ok(worker)
    }

    fn run(mut self) -> io::Result<()> {
        loop {
            self.submit_and_wait()?;
            self.now = Instant::now();
            self.reap();
            for id in std::mem::take(&mut self.pending) {
                self.pump(id, [Direction::Up, Direction::Down]);
            }
            self.resume_paused();
            self.resume_full();
            self.expire_timers();
            self.report_interim();
            self.ctx.events.flush_if_due(self.now);
            if self.drained() {
                // Dropping the ring first cancels whatever is left on it; only then are the
                // fds those operations named closed (listeners, sessions).
                let UringWorker { ring, listeners, conns, .. } = self;
                drop(ring);
                drop(listeners);
                drop(conns);
                return Ok(());
            }
        }
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
        let wait = if self.pending.is_empty() { self.next_wakeup() } else { Some(Duration::ZERO) };
        let result = match wait {
            None => self.ring.submit_and_wait(1),
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            // Out of fds or memory, the kernel may fail the submission itself (the entries
            // stay queued for the next call). Not fatal: pause briefly instead of spinning.
            Err(e) if is_resource_exhaustion(&e) => {
                WorkerStats::add(&self.ctx.stats.accept_backoffs, 1);
                std::thread::sleep(SUBMIT_BACKOFF);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn next_wakeup(&self) -> Option<Duration> {
        let next = [
            self.deadlines.next(),
            self.backoff.next(),
            self.full.next(),
            self.draining,
            Some(self.next_report_scan),
            self.ctx.events.flush_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(next.saturating_duration_since(Instant::now()) + Duration::from_micros(200))
    }

    /// Handles the completions on the ring, a batch at a time.
    fn reap(&mut self) {
        let mut batch = std::mem::take(&mut self.completions);
        loop {
            let cq = self.ring.completion().take(REAP_BATCH);
            batch.extend(cq.map(|c| (c.user_data(), c.result(), c.flags())));
            for &(user_data, result, flags) in &batch {
                let Some((op, index, dir)) = ops::unpack(user_data) else { continue };
                match op {
                    Op::Accept => self.on_accept(index as usize, result, flags),
                    Op::Wake => self.on_wake(),
                    Op::Cancel => {}
                    Op::Connect | Op::PollIn | Op::PollOut => {
                        self.on_session_op(op, index, dir, result)
                    }
                }
            }
            let full = batch.len() == REAP_BATCH;
            batch.clear();
            if !full {
                break;
            }
        }
        self.completions = batch;
    }

    fn arm_wake(&mut self) {
        let entry = ops::poll(
            self.ctx.wake.as_raw_fd(),
            libc::POLLIN,
            ops::pack(Op::Wake, 0, Direction::Up),
        );
        push(&mut self.ring, &entry);
    }

    fn on_wake(&mut self) {
        self.ctx.wake.drain();
        while let Ok(command) = self.ctx.commands.try_recv() {
            match command {
                Command::Drain { deadline } => self.start_drain(deadline),
                Command::RemoveListeners { addrs, done } => self.remove_listeners(&addrs, done),
                Command::Snapshot { limit, reply } => {
                    let _ = reply.send(self.snapshot(limit));
                }
                Command::AddListeners { listeners } => {
                    for listener in listeners {
                        self.add_listener(listener);
                    }
                }
            }
        }
        self.arm_wake();
    }

    fn add_listener(&mut self, socket: TcpListener) {
        let Ok(addr) = socket.local_addr() else { return };
        self.listeners.push(Listener { socket: Some(socket), addr, armed: false, retiring: false });
        self.arm_accept(self.listeners.len() - 1);
    }

    fn remove_listeners(&mut self, addrs: &[SocketAddr], done: crossbeam_channel::Sender<usize>) {
        let mut waiting = 0;
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if listener.socket.is_none() || !addrs.contains(&listener.addr) {
                continue;
            }
            listener.retiring = true;
            if listener.armed {
                waiting += 1;
                let entry = ops::cancel(ops::pack(Op::Accept, index as u32, Direction::Up));
                push(&mut self.ring, &entry);
            } else {
                self.retire_listener(index);
            }
        }
        if waiting == 0 {
            let _ = done.send(self.ctx.id);
        } else {
            self.removal = Some((done, waiting));
        }
    }

    /// Admits the connections already queued on a retiring listener, then closes it.
    fn retire_listener(&mut self, index: usize) {
        self.backoff.forget(index);
        self.full.forget(index);
        while let Some(socket) = &self.listeners[index].socket {
            match socket.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        if let Err(fd) = self.admit(stream.into(), index) {
                            self.parked.push_back((fd, index));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.listeners[index].socket = None;
    }

    fn start_drain(&mut self, deadline: Instant) {
        self.draining = Some(deadline);
        self.backoff.clear();
        self.full.clear();
        self.parked.clear();
        for index in 0..self.listeners.len() {
            if self.listeners[index].armed {
                let entry = ops::cancel(ops::pack(Op::Accept, index as u32, Direction::Up));
                push(&mut self.ring, &entry);
            } else {
                self.listeners[index].socket = None;
            }
        }
    }

    fn drained(&mut self) -> bool {
        let Some(deadline) = self.draining else { return false };
        if self.now >= deadline {
            for id in self.conns.ids() {
                self.close(id, CloseReason::Shutdown);
            }
        }
        self.conns.is_empty()
    }

    /// Puts a multishot accept on listener `index`, unless one is there or the listener is
    /// paused; a listener whose session cap is full is paused instead.
    fn arm_accept(&mut self, index: usize) {
        if self.full.is_paused(index) || self.backoff.is_paused(index) {
            return;
        }
        let addr = self.listeners[index].addr;
        if !worker::has_room(&self.ctx.tables.load(), &self.ctx.cap, addr) {
            return self.pause_full(index);
        }
        let listener = &mut self.listeners[index];
        let Some(socket) = &listener.socket else { return };
        if listener.armed {
            return;
        }
        let entry = ops::accept_multi(socket.as_raw_fd(), index as u32);
        listener.armed = true;
        push(&mut self.ring, &entry);
    }

    fn on_accept(&mut self, index: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        if !more {
            self.listeners[index].armed = false;
        }
        if result >= 0 {
            // SAFETY: a successful accept completion carries a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(result) };
            if self.draining.is_none() {
                if let Err(fd) = self.admit(fd, index) {
                    self.parked.push_back((fd, index));
                    self.pause_full(index);
                }
            }
        } else {
            let error = io::Error::from_raw_os_error(-result);
            if -result != libc::ECANCELED {
                WorkerStats::add(&self.ctx.stats.accept_errors, 1);
            }
            if is_resource_exhaustion(&error) && !more && !self.listeners[index].retiring {
                self.pause_accept(index, &error);
                return;
            }
        }
        if more {
            return;
        }
        if self.draining.is_some() {
            self.listeners[index].socket = None;
        } else if self.listeners[index].retiring {
            self.retire_listener(index);
            if let Some((done, left)) = self.removal.take() {
                if left <= 1 {
                    let _ = done.send(self.ctx.id);
                } else {
                    self.removal = Some((done, left - 1));
                }
            }
        } else {
            self.arm_accept(index);
        }
    }

    /// Pauses the live listener on `addr` after running out of fds or memory: its multishot
    /// accept is cancelled and re-armed when the back-off ends.
    fn pause_listener_at(&mut self, addr: SocketAddr, error: &io::Error) {
        let found = self.listeners.iter().position(|l| l.addr == addr && l.socket.is_some());
        let Some(index) = found.filter(|&i| !self.listeners[i].retiring) else { return };
        if self.backoff.is_paused(index) {
            return;
        }
        self.pause_accept(index, error);
        if self.listeners[index].armed {
            let entry = ops::cancel(ops::pack(Op::Accept, index as u32, Direction::Up));
            push(&mut self.ring, &entry);
        }
    }

    fn pause_accept(&mut self, index: usize, error: &io::Error) {
        let addr = self.listeners[index].addr;
        if self.backoff.pause(self.ctx.id, index, addr, error, self.now) {
            WorkerStats::add(&self.ctx.stats.accept_backoffs, 1);
        }
    }

    /// Stops accepting on listener `index` until a session cap has room again: its
    /// multishot accept is cancelled (connections it still completes are parked) and not
    /// re-armed while paused.
    fn pause_full(&mut self, index: usize) {
        if !self.full.pause(index, self.now) {
            return;
        }
        WorkerStats::add(&self.ctx.stats.accept_paused_full, 1);
        if self.listeners[index].armed {
            let entry = ops::cancel(ops::pack(Op::Accept, index as u32, Direction::Up));
            push(&mut self.ring, &entry);
        }
    }

    /// Admits parked connections, then re-arms the listeners whose caps have room again.
    fn resume_full(&mut self) {
        let due = self.full.due(self.now);
        if due.is_empty() {
            return;
        }
        while let Some((fd, index)) = self.parked.pop_front() {
            if let Err(fd) = self.admit(fd, index) {
                self.parked.push_front((fd, index));
                break;
            }
        }
        for index in due {
            let listener = &self.listeners[index];
            if listener.socket.is_none() || listener.retiring || self.draining.is_some() {
                continue;
            }
            let waiting = self.parked.iter().any(|&(_, i)| i == index);
            if waiting || !worker::has_room(&self.ctx.tables.load(), &self.ctx.cap, listener.addr) {
                self.full.pause(index, self.now);
            } else {
                self.arm_accept(index);
            }
        }
    }

    fn resume_paused(&mut self) {
        for index in self.backoff.due(self.now) {
            let listener = &self.listeners[index];
            if self.draining.is_none() && !listener.armed && !listener.retiring {
                self.arm_accept(index);
            }
        }
    }

    /// Admits an accepted connection; gives it back when a session cap is full.
    fn admit(&mut self, fd: OwnedFd, index: usize) -> Result<(), OwnedFd> {
        let listener = self.listeners[index].addr;
        // Multishot accept carries no address: a client that reset before this point has
        // none left to read, and is recorded as a reset from an unknown address.
        let peer = sys::peer_addr(fd.as_raw_fd());
        let client = peer.as_ref().map_or_else(|_| unspecified_like(listener), |&a| a);
        match Admission::decide(&self.ctx.tables, &self.ctx.cap, listener, client) {
            Ok(admission) => self.start(admission, fd, peer.is_ok()),
            Err(Refusal::NoService) => {}
            Err(Refusal::Full) => return Err(fd),
        }
        Ok(())
    }

    /// Starts a session for an admitted connection (`has_peer`: its address could be read).
    fn start(&mut self, admission: Admission, fd: OwnedFd, has_peer: bool) {
        WorkerStats::add(&self.ctx.stats.accepted, 1);
        WorkerStats::add(&self.ctx.stats.active, 1);
        let id = self.conns.insert(Conn::new(admission, fd, self.now));
        if !has_peer {
            return self.close(id, CloseReason::ClientRst);
        }
        let conn = self.conns.get_mut(id).expect("just inserted");
        match peek::start(&conn.admission, &mut conn.session, self.now) {
            Start::Decide => self.decide(id, None),
            Start::Peek => {
                self.poll_client(id);
                self.rearm(id);
            }
            Start::Reject => self.close(id, CloseReason::ProxyError),
        }
    }

    /// Queues a readiness poll on the client while its ClientHello is awaited.
    fn poll_client(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        if conn.inflight & bit(Op::PollIn, Direction::Up) != 0 {
            return;
        }
        conn.inflight |= bit(Op::PollIn, Direction::Up);
        let user_data = ops::pack(Op::PollIn, id.index, Direction::Up);
        let entry = ops::poll(conn.client.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP, user_data);
        push(&mut self.ring, &entry);
    }

    /// Peeks at the client's PROXY header and ClientHello; decides once they are read. The
    /// poll is level-triggered: incomplete bytes raise SO_RCVLOWAT first, so the next
    /// completion comes only when the rest has arrived.
    fn peek(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let fd = conn.client.as_raw_fd();
        match peek::peek_client(
            &mut conn.admission,
            &mut conn.session,
            fd,
            &mut self.scratch,
            self.now,
        ) {
            Peeked::Decide(sni) => self.decide(id, sni.as_deref()),
            Peeked::Wait | Peeked::NotReady => {
                self.poll_client(id);
                self.rearm(id);
            }
            Peeked::Reset => self.close(id, CloseReason::ClientRst),
            Peeked::Reject => self.close(id, CloseReason::ProxyError),
        }
    }

    /// Asks the firewall; an allowed session starts connecting, a denied one is closed.
    fn decide(&mut self, id: SlotId, sni: Option<&str>) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let client = conn.client.as_raw_fd();
        if let Err(reason) =
            peek::decide(&mut conn.admission, &mut conn.session, client, sni, self.now)
        {
            return self.close(id, reason);
        }
        self.connect(id);
    }

    /// Starts the next connect attempt, walking past backends that fail at once.
    fn connect(&mut self, id: SlotId) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        loop {
            let Phase::Connecting { attempt, .. } = conn.session.phase else { return };
            let Some(addr) = conn.admission.begin_attempt(attempt) else {
                let reason = conn.last_failure;
                return self.close(id, reason);
            };
            match sys::tcp_socket_for(addr) {
                Ok(socket) => {
                    let _ = socket.set_tcp_nodelay(true);
                    let target = self.addrs.take(addr);
                    let fd: OwnedFd = socket.into();
                    // SAFETY: `target` is boxed and kept in `conn.connect_addr` until the
                    // connect completion arrives (taken back in on_session_op).
                    let entry = unsafe { ops::connect(fd.as_raw_fd(), &target, id.index) };
                    conn.backend = Some(fd);
                    conn.connect_addr = Some(target);
                    conn.inflight |= bit(Op::Connect, Direction::Up);
                    push(&mut self.ring, &entry);
                    self.rearm(id);
                    return;
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    // Out of fds for the backend: close this client, and let the next
                    // ones wait in the backlog rather than be accepted only to be closed.
                    WorkerStats::add(&self.ctx.stats.backend_socket_errors, 1);
                    let listener = conn.admission.listener;
                    self.close(id, CloseReason::NoSocket);
                    return self.pause_listener_at(listener, &e);
                }
                Err(_) => {
                    WorkerStats::add(&self.ctx.stats.connect_errors, 1);
                    conn.admission.attempt_failed();
                    conn.last_failure = CloseReason::ConnectRefused;
                    conn.session.retry_connect(now);
                }
            }
        }
    }

    fn on_session_op(&mut self, op: Op, index: u32, dir: Direction, result: i32) {
        let Some((id, conn)) = self.conns.at_mut(index) else { return };
        conn.inflight &= !bit(op, dir);
        if op == Op::Connect {
            if let Some(target) = conn.connect_addr.take() {
                self.addrs.give(target);
            }
        }
        if conn.closing.is_some() {
            if conn.inflight == 0 {
                self.free(id);
            }
            return;
        }
        match op {
            Op::Connect => {
                if result == 0 {
                    let backend = conn.backend.as_ref().map(|fd| fd.as_raw_fd());
                    let sent = backend.map(|fd| peek::send_proxy_header(&conn.admission, fd));
                    if let Some(Err(reason)) = sent {
                        return self.close(id, reason);
                    }
                    if let Phase::Connecting { since, .. } = conn.session.phase {
                        conn.admission.connected(self.now.saturating_duration_since(since));
                    }
                    conn.session.connected(self.now);
                    if conn.admission.tables.records.open {
                        let record = conn.admission.record(
                            RecordKind::Open,
                            self.ctx.id,
                            &conn.session,
                            self.now,
                        );
                        self.ctx.events.send(record);
                    }
                    // The client usually speaks first; the backend's side just waits (the
                    // poll is level-triggered, so a backend that speaks first completes it).
                    self.pump(id, [Direction::Up]);
                    self.wait_readable(id, Direction::Down);
                } else if !is_connect_failure(-result) {
                    // Accepted, then reset before the completion was handled.
                    self.close(id, CloseReason::BackendRst);
                } else {
                    let reason = match -result {
                        libc::ECANCELED | libc::ETIMEDOUT => CloseReason::ConnectTimeout,
                        _ => CloseReason::ConnectRefused,
                    };
                    self.connect_failed(id, reason);
                }
            }
            Op::PollIn if matches!(conn.session.phase, Phase::Peeking { .. }) => self.peek(id),
            Op::PollIn => {
                // A poll's result is its revents: the source's FIN has arrived (and no error).
                if result > 0
                    && result & libc::POLLRDHUP as i32 != 0
                    && result & libc::POLLERR as i32 == 0
                {
                    conn.source_ended(dir);
                }
                self.pump(id, [dir])
            }
            _ => self.pump(id, [dir]),
        }
    }

    /// The current connect failed and its completion has arrived: drop the socket and try
    /// the next backend.
    fn connect_failed(&mut self, id: SlotId, reason: CloseReason) {
        WorkerStats::add(&self.ctx.stats.connect_errors, 1);
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        conn.admission.attempt_failed();
        conn.backend = None;
        conn.last_failure = reason;
        conn.session.retry_connect(now);
        self.connect(id);
    }

    fn pump<const N: usize>(&mut self, id: SlotId, dirs: [Direction; N]) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        if conn.closing.is_some() || conn.session.phase != Phase::Relaying {
            return;
        }
        let mut again = false;
        for dir in dirs {
            let Some((src, dst)) = conn.ends(dir) else { return };
            let wait = match conn.pump(dir, &mut self.pools, now) {
                Pump::WaitIn => Some((Op::PollIn, src, libc::POLLIN | libc::POLLRDHUP)),
                Pump::WaitOut => Some((Op::PollOut, dst, libc::POLLOUT)),
                // A throttled direction waits for its deadline, not for readiness.
                Pump::Done | Pump::Throttled => None,
                Pump::Capped => return self.close(id, CloseReason::ByteCap),
                Pump::Budget => {
                    again = true;
                    None
                }
                Pump::Reset(side) => return self.close(id, CloseReason::reset_by(side)),
                Pump::NoPipe => return self.close(id, CloseReason::LocalError),
            };
            if let Some((op, fd, events)) = wait {
                if conn.inflight & bit(op, dir) == 0 {
                    conn.inflight |= bit(op, dir);
                    push(&mut self.ring, &ops::poll(fd, events, ops::pack(op, id.index, dir)));
                }
            }
        }
        if conn.session.is_finished() {
            let reason = conn.session.finish_reason();
            return self.close(id, reason);
        }
        if again {
            self.pending.push(id);
        }
        self.rearm(id);
    }

    /// Queues a readiness poll on the source of `dir`, unless one is on the ring already.
    fn wait_readable(&mut self, id: SlotId, dir: Direction) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        if conn.closing.is_some() || conn.inflight & bit(Op::PollIn, dir) != 0 {
            return;
        }
        let Some((src, _)) = conn.ends(dir) else { return };
        conn.inflight |= bit(Op::PollIn, dir);
        let entry =
            ops::poll(src, libc::POLLIN | libc::POLLRDHUP, ops::pack(Op::PollIn, id.index, dir));
        push(&mut self.ring, &entry);
    }

    fn rearm(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let timeouts = conn.admission.service().timeouts;
        let (deadline, _) = conn.session.deadline(&timeouts);
        self.deadlines.arm(id, &mut conn.armed, deadline);
    }

    fn expire_timers(&mut self) {
        while let Some((at, id)) = self.deadlines.pop_due(self.now) {
            let Some(conn) = self.conns.get_mut(id) else { continue };
            if conn.armed != Some(at) || conn.closing.is_some() {
                continue;
            }
            let timeouts = conn.admission.service().timeouts;
            let (deadline, due) = conn.session.deadline(&timeouts);
            if deadline > self.now {
                self.deadlines.set(id, &mut conn.armed, deadline);
                continue;
            }
            conn.armed = None;
            match due {
                // The client poll stays on the ring; its completion finds the session decided.
                Due::DecideWithoutSni => self.decide(id, None),
                Due::NextBackend => {
                    // The connect completion (-ECANCELED) moves on to the next backend.
                    let target = ops::pack(Op::Connect, id.index, Direction::Up);
                    push(&mut self.ring, &ops::cancel(target));
                }
                Due::Close(reason) => self.close(id, reason),
                Due::Resume => {
                    conn.session.resume(self.now);
                    self.pump(id, [Direction::Up, Direction::Down]);
                }
            }
        }
    }

    /// Sends an interim record for every long-lived session whose interval has passed.
    fn report_interim(&mut self) {
        if self.now < self.next_report_scan {
            return;
        }
        self.next_report_scan = self.now + REPORT_SCAN;
        let (worker, now) = (self.ctx.id, self.now);
        for id in self.conns.ids() {
            let Some(c) = self.conns.get_mut(id).filter(|c| c.closing.is_none()) else { continue };
            let Some(every) = c.admission.tables.records.interim else { continue };
            if c.session.take_interim(every, now) {
                let record = c.admission.record(RecordKind::Interim, worker, &c.session, now);
                self.ctx.events.send(record);
            }
        }
    }

    fn snapshot(&mut self, limit: usize) -> Vec<LiveSession> {
        let (worker, now) = (self.ctx.id, Instant::now());
        let mut out = Vec::new();
        for id in self.conns.ids() {
            if out.len() >= limit {
                break;
            }
            if let Some(c) = self.conns.get_mut(id).filter(|c| c.closing.is_none()) {
                out.push(c.admission.live(worker, &c.session, now));
            }
        }
        out
    }

    /// Forgets a session whose last operation is off the ring.
    fn free(&mut self, id: SlotId) {
        self.deadlines.remove(id);
        self.conns.remove(id);
    }

    /// Decides the session closed: records it, cancels what it has on the ring, and frees it
    /// once nothing of it is in flight.
    fn close(&mut self, id: SlotId, reason: CloseReason) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        if conn.closing.is_some() {
            return;
        }
        conn.closing = Some(reason);
        conn.prepare_close(reason, &mut self.pools);
        let stats = &self.ctx.stats;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        WorkerStats::add(&stats.closed, 1);
        WorkerStats::add(&stats.bytes_up, conn.session.up.bytes);
        WorkerStats::add(&stats.bytes_down, conn.session.down.bytes);
        let record = conn.admission.finish(self.ctx.id, &conn.session, reason, self.now);
        self.ctx.events.send(record);
        let inflight = conn.inflight;
        self.full.poke(self.now);
        for (op, dir) in SESSION_OPS {
            if inflight & bit(op, dir) != 0 {
                push(&mut self.ring, &ops::cancel(ops::pack(op, id.index, dir)));
            }
        }
        if inflight == 0 {
            self.free(id);
        }
    }
}

/// The unspecified address (port 0) of the same family as `addr`.
fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}
