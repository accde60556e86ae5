//! The UDP loop of one worker: readiness from mio (edge-triggered), batched datagram I/O
//! through `sys::udp`, flow state in a [`FlowTable`]. Each turn: wait (bounded by the next
//! flow expiry and record flush), read every ready socket for at most [`BATCHES_PER_TURN`]
//! batches (sockets with more left are revisited next turn without waiting), send what was
//! read, expire idle flows, flush records.
//!
//! Up (client -> backend): one recvmmsg(2) on a listener, then one [`Outbox`] per upstream
//! socket the batch's datagrams go to, each sent with one sendmmsg(2) before the next
//! receive; a run of equal datagrams of one flow leaves as one segmented (GSO) send. Down
//! (backend -> client): replies of every upstream socket ready in a turn gather in one
//! batch and leave with one sendmmsg(2) per listener at the end of the turn (or when the
//! batch is full). An outbox message is tagged with its flow's id and generation, so a
//! flow that closed meanwhile is never credited with it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::flows::{deadline_after, FlowId, FlowTable};
use super::sources::SourcePool;
use super::{UdpCommand, UdpContext, BATCHES_PER_TURN, DEFAULT_SOCKET_BUFFER, RECV_BATCH};
use crate::acl::{Action, Query};
use crate::balance::{client_key, Backend, Pick};
use crate::counters::{UdpCounters, WorkerStats};
use crate::record::{CloseReason, LiveSession, Protocol, Record, RecordKind, Verdict};
use crate::sys::{self, Datagram, Outbox, RecvBatch, SendOutcome};
use crate::tables::{Service, Tables, UdpUpstream};
use crate::worker::SessionId;

const WAKE: Token = Token(usize::MAX);
/// How often flows are scanned for due interim records (and empty shared sockets closed).
const REPORT_SCAN: Duration = Duration::from_secs(1);
/// Listener tokens are `LISTENER_BASE + slot`, shared sockets' `SHARED_BASE + slot`; flow
/// tokens are their [`FlowId`].
const LISTENER_BASE: usize = 1 << 40;
const SHARED_BASE: usize = 1 << 41;

/// A flow's key: the local address the client sent to (on a wildcard listener, the
/// address it used, not 0.0.0.0) with the listener's port, and the client's address.
type Key = (SocketAddr, SocketAddr);

struct Listener {
    addr: SocketAddr,
    socket: UdpSocket,
    /// Replies waiting to leave from this listener (down path).
    outbox: Outbox,
}

/// Where a flow's datagrams go up.
enum Upstream {
    /// Its own socket, connected to its backend.
    Connected(UdpSocket),
    /// A shared socket (by slot), from the flow's own source address.
    Shared { socket: usize, source: IpAddr },
}

/// One client's flow: the tables that admitted it and its upstream.
struct Flow {
    tables: Arc<Tables>,
    service: usize,
    /// Index of the listener socket its replies leave from.
    listener: usize,
    backend: Backend,
    rule: Option<Arc<str>>,
    upstream: Upstream,
    start: Instant,
    start_wall: SystemTime,
    /// When the flow's last open or interim record was made.
    reported: Instant,
    packets_up: u64,
    bytes_up: u64,
    packets_down: u64,
    bytes_down: u64,
}

impl Flow {
    fn service(&self) -> &Service {
        &self.tables.services()[self.service]
    }

    fn udp(&self) -> &UdpCounters {
        &self.service().counters.udp
    }
}

/// An unconnected socket that a worker's flows to one backend share, and which of them
/// holds which source address.
struct SharedSocket {
    socket: UdpSocket,
    backend: SocketAddr,
    net: IpNet,
    sources: SourcePool,
    flows: HashMap<IpAddr, FlowId>,
}

/// An upstream socket, named by who owns it: found again when its outbox is sent, so an
/// outbox can never send through a socket that closed meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpSocket {
    /// The connected socket of flow `id` of generation `generation`.
    Flow { id: FlowId, generation: u32 },
    /// A shared socket, by slot.
    Shared(usize),
}

/// An outbox for one upstream socket (up path), reused from batch to batch.
struct UpOutbox {
    socket: UpSocket,
    outbox: Outbox,
}

pub(super) struct UdpLoop {
    ctx: UdpContext,
    poll: Poll,
    /// Indexed by token - LISTENER_BASE; a removed listener leaves `None`.
    listeners: Vec<Option<Listener>>,
    flows: FlowTable<Key, Flow>,
    /// Indexed by token - SHARED_BASE; a closed one leaves `None`.
    shared: Vec<Option<SharedSocket>>,
    shared_by: HashMap<(SocketAddr, IpNet), usize>,
    /// Datagrams read from a listener, on their way up.
    up: Option<RecvBatch>,
    /// Replies read from upstream sockets this turn, on their way down.
    down: Option<RecvBatch>,
    /// Outboxes of the up path, the first `up_used` in use.
    outboxes: Vec<UpOutbox>,
    up_used: usize,
    /// Segmented sends (GSO) and joined receives (GRO) are in use.
    gso: bool,
    /// Sockets whose last read stopped at the batch budget: read again next turn.
    pending: Vec<Token>,
    draining: bool,
    /// When flows are next scanned for due interim records.
    next_report_scan: Instant,
    /// Flows whose tables ask for interim records: without any, no scan walks the table.
    interim_flows: usize,
}

/// The tag of a flow's outbox messages: its id and generation.
fn tag(id: FlowId, generation: u32) -> u64 {
    ((id as u64) << 32) | u64::from(generation)
}

impl UdpLoop {
    pub(super) fn new(mut ctx: UdpContext) -> io::Result<Self> {
        let poll = Poll::new()?;
        let wake = ctx.wake.as_raw_fd();
        poll.registry().register(&mut SourceFd(&wake), WAKE, Interest::READABLE)?;
        let sockets = std::mem::take(&mut ctx.sockets);
        let gso = sys::gso_supported();
        let slot = if gso { ctx.max_datagram.max(sys::GRO_BUFFER) } else { ctx.max_datagram };
        let flows = FlowTable::new(ctx.max_flows);
        let mut this = Self {
            ctx,
            poll,
            listeners: Vec::new(),
            flows,
            shared: Vec::new(),
            shared_by: HashMap::new(),
            up: Some(RecvBatch::new(RECV_BATCH, slot)),
            down: Some(RecvBatch::new(RECV_BATCH, slot)),
            outboxes: Vec::new(),
            up_used: 0,
            gso,
            pending: Vec::new(),
            draining: false,
            next_report_scan: deadline_after(Instant::now(), REPORT_SCAN),
            interim_flows: 0,
        };
        this.add_listeners(sockets)?;
        Ok(this)
    }

    pub(super) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !self.draining {
            let timeout = self.timeout(Instant::now());
            self.turn(&mut events, timeout)?;
        }
        self.close_all(Instant::now());
        Ok(())
    }

    /// One loop turn: waits up to `timeout` for readiness, reads every ready socket, sends
    /// what was read, expires idle flows and flushes records.
    pub(super) fn turn(
        &mut self,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let mut ready = std::mem::take(&mut self.pending);
        ready.extend(events.iter().map(|e| e.token()));
        let now = Instant::now();
        for token in ready {
            self.on_ready(token, now);
        }
        self.flush_down();
        self.expire(now);
        self.report_interim(now);
        self.ctx.events.flush_if_due(now);
        Ok(())
    }

    /// The poller's fd: readable when a turn has work.
    pub(super) fn fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    pub(super) fn draining(&self) -> bool {
        self.draining
    }

    pub(super) fn timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let scan =
            (!self.flows.is_empty() || !self.shared_by.is_empty()).then_some(self.next_report_scan);
        let next = [self.flows.next_deadline(), self.ctx.events.flush_deadline(), scan]
            .into_iter()
            .flatten()
            .min()?;
        // Round up so the loop never wakes a hair early and spins.
        Some(next.saturating_duration_since(now).saturating_add(Duration::from_millis(1)))
    }

    fn on_ready(&mut self, token: Token, now: Instant) {
        let more = match token {
            WAKE => {
                self.on_wake();
                false
            }
            Token(t) if t >= SHARED_BASE => self.read_shared(t - SHARED_BASE, now),
            Token(t) if t >= LISTENER_BASE => self.read_listener(t - LISTENER_BASE, now),
            Token(id) => self.read_flow(id, now),
        };
        if more && !self.pending.contains(&token) {
            self.pending.push(token);
        }
    }

    fn on_wake(&mut self) {
        self.ctx.wake.drain();
        while let Ok(command) = self.ctx.commands.try_recv() {
            match command {
                UdpCommand::Drain => self.draining = true,
                UdpCommand::AddListeners { sockets } => {
                    if let Err(e) = self.add_listeners(sockets) {
                        log::warn!("udp worker {}: cannot add listeners: {e}", self.ctx.id);
                    }
                }
                UdpCommand::Snapshot { limit, reply } => {
                    let _ = reply.send(self.snapshot(limit, Instant::now()));
                }
                UdpCommand::Kill { id, reply } => {
                    let flow = id.index as FlowId;
                    let found = self.flows.generation(flow) == Some(id.generation);
                    if found {
                        self.flush_down();
                        self.close(flow, CloseReason::AdminKill, Instant::now());
                    }
                    let _ = reply.send(found);
                }
                UdpCommand::RemoveListeners { addrs, done } => {
                    self.flush_down();
                    let n = self.remove_listeners(&addrs, Instant::now());
                    let _ = done.send(n);
                }
            }
        }
    }

    fn add_listeners(&mut self, sockets: Vec<UdpSocket>) -> io::Result<()> {
        for socket in sockets {
            let addr = socket.local_addr()?;
            self.tune(&socket, true);
            let slot = self.listeners.len();
            let fd = socket.as_raw_fd();
            let token = Token(LISTENER_BASE + slot);
            self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE)?;
            let outbox = Outbox::new(self.gso);
            self.listeners.push(Some(Listener { addr, socket, outbox }));
            // Datagrams may have queued before registration (edge-triggered): read once.
            self.pending.push(token);
        }
        Ok(())
    }

    /// GRO on a socket (when segmented sends are in use) and, for a socket many flows
    /// share, a larger receive buffer.
    fn tune(&self, socket: &UdpSocket, many_flows: bool) {
        if self.gso {
            sys::enable_gro(socket);
        }
        if many_flows {
            if let Err(e) = sys::set_receive_buffer(socket, DEFAULT_SOCKET_BUFFER) {
                log::debug!("udp worker {}: receive buffer: {e}", self.ctx.id);
            }
        }
    }

    fn remove_listeners(&mut self, addrs: &[SocketAddr], now: Instant) -> usize {
        let mut closed = 0;
        for slot in 0..self.listeners.len() {
            let Some(l) = &self.listeners[slot] else { continue };
            if !addrs.contains(&l.addr) {
                continue;
            }
            let doomed: Vec<FlowId> = self
                .flows
                .ids()
                .into_iter()
                .filter(|&id| self.flows.get(id).is_some_and(|(_, f)| f.listener == slot))
                .collect();
            for id in doomed {
                self.close(id, CloseReason::Shutdown, now);
            }
            if let Some(l) = self.listeners[slot].take() {
                let _ = self.poll.registry().deregister(&mut SourceFd(&l.socket.as_raw_fd()));
                closed += 1;
            }
        }
        closed
    }

    /// Client -> backend: reads datagrams from a listener and sends each up its flow.
    fn read_listener(&mut self, slot: usize, now: Instant) -> bool {
        let Some(mut batch) = self.up.take() else { return false };
        let mut more = false;
        for _ in 0..BATCHES_PER_TURN {
            let Some(l) = self.listeners.get(slot).and_then(Option::as_ref) else { break };
            let addr = l.addr;
            batch.clear();
            match batch.recv(l.socket.as_fd()) {
                Ok(n) => {
                    self.relay_up(&batch, slot, addr, now);
                    self.flush_up(&batch);
                    more = n == batch.capacity();
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::debug!("udp worker {}: receive on {addr}: {e}", self.ctx.id);
                    }
                    more = false;
                    break;
                }
            }
        }
        batch.clear();
        self.up = Some(batch);
        more
    }

    /// Queues a batch's datagrams in the outboxes of their flows' upstream sockets.
    fn relay_up(&mut self, batch: &RecvBatch, slot: usize, listener: SocketAddr, now: Instant) {
        for i in 0..batch.len() {
            let d = batch.get(i);
            let Some(client) = d.from else { continue };
            let reached = SocketAddr::new(d.local.unwrap_or(listener.ip()), listener.port());
            let id = match self.flows.find(&(reached, client)) {
                Some(id) => id,
                None => {
                    // Admitting may evict a flow, and close its socket: nothing may wait
                    // for that socket then.
                    if self.flows.len() >= self.flows.capacity() {
                        self.flush_up(batch);
                    }
                    match self.admit(slot, (listener, reached), client, &d, now) {
                        Some(id) => id,
                        None => continue,
                    }
                }
            };
            let Some((_, flow)) = self.flows.get(id) else { continue };
            if self.oversized(&d) {
                WorkerStats::add(&flow.udp().oversized, d.count() as u64);
                continue;
            }
            let generation = self.flows.generation(id).unwrap_or_default();
            let (socket, to, from) = match &flow.upstream {
                Upstream::Connected(_) => (UpSocket::Flow { id, generation }, None, None),
                Upstream::Shared { socket, source } => {
                    let Some(s) = self.shared.get(*socket).and_then(Option::as_ref) else {
                        continue;
                    };
                    (UpSocket::Shared(*socket), Some(s.backend), Some(*source))
                }
            };
            self.flows.touch(id, now);
            self.up_outbox(socket).push(batch, i, tag(id, generation), to, from);
        }
    }

    /// The outbox of upstream socket `socket` for this batch.
    fn up_outbox(&mut self, socket: UpSocket) -> &mut Outbox {
        let used = self.up_used;
        let at = match self.outboxes[..used].iter().position(|o| o.socket == socket) {
            Some(at) => at,
            None => {
                if used == self.outboxes.len() {
                    self.outboxes.push(UpOutbox { socket, outbox: Outbox::new(self.gso) });
                }
                self.outboxes[used].socket = socket;
                self.outboxes[used].outbox.set_gso(self.gso);
                self.up_used += 1;
                used
            }
        };
        &mut self.outboxes[at].outbox
    }

    /// Sends every up outbox and credits the flows with what left.
    fn flush_up(&mut self, batch: &RecvBatch) {
        for at in 0..self.up_used {
            let socket = self.outboxes[at].socket;
            let mut outbox = std::mem::replace(&mut self.outboxes[at].outbox, Outbox::new(false));
            let outcome = match self.up_socket(socket) {
                Some(fd) => outbox.send(fd, batch),
                // Its flow or shared socket is gone: its datagrams go nowhere.
                None => SendOutcome::default(),
            };
            if outcome.gso_refused {
                self.gso_refused();
            }
            let mut refused = None;
            for d in outbox.deliveries() {
                let Some(flow) = self.flow_of(d.tag) else { continue };
                let udp = &flow.udp();
                if !d.sent {
                    WorkerStats::add(&udp.dropped, d.datagrams as u64);
                    refused = refused.or(Some(d.tag));
                    continue;
                }
                WorkerStats::add(&udp.datagrams_up, d.datagrams as u64);
                WorkerStats::add(&udp.bytes_up, d.bytes as u64);
                if let Some(flow) = self.flow_of_mut(d.tag) {
                    flow.packets_up += d.datagrams as u64;
                    flow.bytes_up += d.bytes as u64;
                }
            }
            outbox.clear();
            self.outboxes[at].outbox = outbox;
            let refused_error = outcome
                .error
                .as_ref()
                .is_some_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
            if let (true, Some(tag)) = (refused_error, refused) {
                // The backend's port answered ICMP unreachable: the flow is done; the
                // client's next datagram makes a new flow, to the pool's next backend.
                self.backend_refused((tag >> 32) as FlowId);
            }
        }
        self.up_used = 0;
    }

    /// The socket `socket` names, if it is still open.
    fn up_socket(&self, socket: UpSocket) -> Option<BorrowedFd<'_>> {
        match socket {
            UpSocket::Flow { id, generation } => {
                if self.flows.generation(id) != Some(generation) {
                    return None;
                }
                match &self.flows.get(id)?.1.upstream {
                    Upstream::Connected(s) => Some(s.as_fd()),
                    Upstream::Shared { .. } => None,
                }
            }
            UpSocket::Shared(at) => self.shared.get(at)?.as_ref().map(|s| s.socket.as_fd()),
        }
    }

    fn gso_refused(&mut self) {
        if self.gso {
            log::info!("udp worker {}: the kernel refused a segmented send; GSO off", self.ctx.id);
        }
        self.gso = false;
    }

    /// The live flow a tag names (`None` once it closed, even if its slot was reused).
    fn flow_of(&self, tag: u64) -> Option<&Flow> {
        let id = (tag >> 32) as FlowId;
        (self.flows.generation(id)? == tag as u32).then(|| self.flows.get(id).map(|(_, f)| f))?
    }

    fn flow_of_mut(&mut self, tag: u64) -> Option<&mut Flow> {
        let id = (tag >> 32) as FlowId;
        (self.flows.generation(id)? == tag as u32).then(|| self.flows.get_mut(id))?
    }

    fn oversized(&self, d: &Datagram<'_>) -> bool {
        d.truncated || d.largest() > self.ctx.max_datagram
    }

    fn backend_refused(&mut self, id: FlowId) {
        if let Some((_, flow)) = self.flows.get(id) {
            WorkerStats::add(&flow.service().counters.connect_errors, 1);
            WorkerStats::add(&flow.backend.state.connect_errors, 1);
        }
        self.close(id, CloseReason::ConnectRefused, Instant::now());
    }

    /// Decides a new client with the tables in force and opens its flow; `None` (counted)
    /// when the datagram is to be dropped. `listener` is the bound address (which finds the
    /// service) and the address the client reached (which the firewall's `to` rules and
    /// the record see).
    fn admit(
        &mut self,
        slot: usize,
        (listener, reached): (SocketAddr, SocketAddr),
        client: SocketAddr,
        d: &Datagram<'_>,
        now: Instant,
    ) -> Option<FlowId> {
        let tables = self.ctx.tables.load_full();
        let service = tables.udp_service_for(listener)?;
        let udp = &tables.services()[service].counters.udp;
        if self.oversized(d) {
            WorkerStats::add(&udp.oversized, d.count() as u64);
            return None;
        }
        let start_wall = SystemTime::now();
        let unix = start_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let query = Query { client, listener: reached, now: unix, sni: None };
        let decision = tables.judge(service, &query);
        if !matches!(decision.action, Action::Allow { .. }) {
            WorkerStats::add(&udp.denied, d.count() as u64);
            return None;
        }
        let pool = tables.pool_for(service, &decision);
        let pick = Pick { start: pool.start(), key: client_key(client), tried: &[], now };
        let Some(backend) = pool.pick(&pick).map(|i| pool.backends()[i].clone()) else {
            WorkerStats::add(&udp.no_backend, d.count() as u64);
            return None;
        };
        let mode = &tables.services()[service].udp_upstream;
        let upstream = match self.upstream(mode, backend.addr) {
            Ok(u) => u,
            Err(e) => {
                log::debug!("udp worker {}: upstream to {}: {e}", self.ctx.id, backend.addr);
                WorkerStats::add(&udp.dropped, d.count() as u64);
                return None;
            }
        };
        let flow = Flow {
            tables: tables.clone(),
            service,
            listener: slot,
            backend,
            rule: decision.rule,
            upstream,
            start: now,
            start_wall,
            reported: now,
            packets_up: 0,
            bytes_up: 0,
            packets_down: 0,
            bytes_down: 0,
        };
        self.open(reached, client, flow, now)
    }

    /// A new flow's way up: its own connected socket, or a source address on the shared
    /// socket to its backend.
    fn upstream(&mut self, mode: &UdpUpstream, backend: SocketAddr) -> io::Result<Upstream> {
        let Some(net) = mode.source_for(backend) else {
            let socket = sys::connect_udp(backend)?;
            self.tune(&socket, false);
            return Ok(Upstream::Connected(socket));
        };
        let socket = self.shared_socket(backend, net)?;
        let shared = self.shared[socket].as_mut().ok_or(io::ErrorKind::NotFound)?;
        let no_source = || io::Error::other(format!("every address of {net} is in use"));
        let source = shared.sources.take().ok_or_else(no_source)?;
        Ok(Upstream::Shared { socket, source })
    }

    /// The slot of the shared socket to `backend` for sources in `net`, opened if needed.
    fn shared_socket(&mut self, backend: SocketAddr, net: IpNet) -> io::Result<usize> {
        if let Some(&at) = self.shared_by.get(&(backend, net)) {
            return Ok(at);
        }
        let socket = sys::bind_udp_shared(backend)?;
        self.tune(&socket, true);
        let at = self.shared.iter().position(Option::is_none).unwrap_or(self.shared.len());
        let fd = socket.as_raw_fd();
        let token = Token(SHARED_BASE + at);
        self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE)?;
        let shared = SharedSocket {
            socket,
            backend,
            net,
            sources: SourcePool::new(net),
            flows: HashMap::new(),
        };
        if at == self.shared.len() {
            self.shared.push(Some(shared));
        } else {
            self.shared[at] = Some(shared);
        }
        self.shared_by.insert((backend, net), at);
        Ok(at)
    }

    /// Puts a flow in the table (evicting the least recently used if it is full),
    /// registers its upstream and counts it.
    fn open(
        &mut self,
        listener: SocketAddr,
        client: SocketAddr,
        flow: Flow,
        now: Instant,
    ) -> Option<FlowId> {
        let idle = flow.service().udp_idle_timeout;
        let (id, displaced) = self.flows.insert((listener, client), flow, idle, now);
        if let Some((key, old)) = displaced {
            WorkerStats::add(&self.ctx.stats.udp_flows_evicted, 1);
            self.finish(key, old, CloseReason::Evicted, now);
        }
        let registered = match &self.flows.get(id)?.1.upstream {
            Upstream::Connected(socket) => {
                let fd = socket.as_raw_fd();
                self.poll.registry().register(&mut SourceFd(&fd), Token(id), Interest::READABLE)
            }
            &Upstream::Shared { socket, source } => {
                if let Some(s) = self.shared.get_mut(socket).and_then(Option::as_mut) {
                    s.flows.insert(source, id);
                }
                Ok(())
            }
        };
        if let Err(e) = registered {
            log::warn!("udp worker {}: cannot register a flow socket: {e}", self.ctx.id);
            self.flows.remove(id);
            return None;
        }
        let (_, flow) = self.flows.get(id)?;
        let counters = &flow.service().counters;
        for c in
            [&counters.sessions, &counters.active, &counters.udp.flows, &counters.udp.flows_active]
        {
            WorkerStats::add(c, 1);
        }
        WorkerStats::add(&flow.backend.state.sessions, 1);
        WorkerStats::add(&flow.backend.state.active, 1);
        self.interim_flows += usize::from(flow.tables.records.interim.is_some());
        let open = flow
            .tables
            .records
            .open
            .then(|| self.record(&(listener, client), flow, RecordKind::Open, now));
        self.set_active();
        if let Some(record) = open {
            self.ctx.events.send(record);
        }
        Some(id)
    }

    /// Backend -> client on a flow's own socket: reads its replies into the down batch.
    fn read_flow(&mut self, id: FlowId, now: Instant) -> bool {
        let mut more = false;
        for _ in 0..BATCHES_PER_TURN {
            if !matches!(self.flows.get(id), Some((_, f)) if matches!(f.upstream, Upstream::Connected(_)))
            {
                break;
            }
            let Some(mut batch) = self.take_down_room() else { break };
            let start = batch.len();
            let received = match self.flows.get(id).map(|(_, f)| &f.upstream) {
                Some(Upstream::Connected(socket)) => batch.recv(socket.as_fd()),
                _ => Ok(0),
            };
            match received {
                Ok(n) => {
                    for i in start..batch.len() {
                        self.relay_down(&batch, i, id, now);
                    }
                    more = n > 0 && batch.is_full();
                }
                Err(ref e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.down = Some(batch);
                    self.flush_down();
                    self.backend_refused(id);
                    return false;
                }
                Err(_) => more = false,
            }
            self.down = Some(batch);
            if !more {
                break;
            }
        }
        more
    }

    /// The down batch with at least one free slot (sending what it holds if it is full).
    fn take_down_room(&mut self) -> Option<RecvBatch> {
        if self.down.as_ref().is_some_and(RecvBatch::is_full) {
            self.flush_down();
        }
        self.down.take()
    }

    /// Backend -> client on a shared socket: reads replies, finds each one's flow by the
    /// address it reached, and queues it for its listener.
    fn read_shared(&mut self, at: usize, now: Instant) -> bool {
        let mut more = false;
        for _ in 0..BATCHES_PER_TURN {
            let Some(s) = self.shared.get(at).and_then(Option::as_ref) else { break };
            let backend = s.backend;
            let Some(mut batch) = self.take_down_room() else { break };
            let start = batch.len();
            let received = match self.shared.get(at).and_then(Option::as_ref) {
                Some(s) => batch.recv(s.socket.as_fd()),
                None => Ok(0),
            };
            match received {
                Ok(n) => {
                    for i in start..batch.len() {
                        let d = batch.get(i);
                        let id = d.local.filter(|_| d.from == Some(backend)).and_then(|local| {
                            self.shared[at].as_ref().and_then(|s| s.flows.get(&local).copied())
                        });
                        match id {
                            Some(id) => self.relay_down(&batch, i, id, now),
                            None => WorkerStats::add(&self.ctx.stats.udp_unmatched, 1),
                        }
                    }
                    more = n > 0 && batch.is_full();
                    self.down = Some(batch);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.down = Some(batch);
                    break;
                }
                Err(_) => {
                    self.down = Some(batch);
                    self.flush_down();
                    self.shared_refusals(at);
                    more = true;
                }
            }
            if !more {
                break;
            }
        }
        more
    }

    /// Closes the flows whose datagrams a shared socket's ICMP errors answer
    /// (`connect_refused`, as a connected flow's).
    fn shared_refusals(&mut self, at: usize) {
        let Some(s) = self.shared.get(at).and_then(Option::as_ref) else { return };
        let refusals = sys::recv_refusals(s.socket.as_fd());
        let refused: Vec<FlowId> = refusals
            .iter()
            .filter(|r| r.to == s.backend && r.errno == libc::ECONNREFUSED)
            .filter_map(|r| s.flows.get(&r.from?).copied())
            .collect();
        for id in refused {
            self.backend_refused(id);
        }
    }

    /// Queues reply `i` of the down batch for flow `id`'s client.
    fn relay_down(&mut self, batch: &RecvBatch, i: usize, id: FlowId, now: Instant) {
        let d = batch.get(i);
        let oversized = self.oversized(&d);
        let generation = self.flows.generation(id).unwrap_or_default();
        let Some((key, flow)) = self.flows.get(id) else { return };
        if oversized {
            WorkerStats::add(&flow.udp().oversized, d.count() as u64);
            return;
        }
        let (reached, client) = *key;
        let slot = flow.listener;
        let Some(l) = self.listeners.get_mut(slot).and_then(Option::as_mut) else { return };
        let from = l.addr.ip().is_unspecified().then_some(reached.ip());
        l.outbox.set_gso(self.gso);
        l.outbox.push(batch, i, tag(id, generation), Some(client), from);
        self.flows.touch(id, now);
    }

    /// Sends the replies gathered in the down batch from their listeners, credits their
    /// flows, and empties the batch.
    fn flush_down(&mut self) {
        let Some(mut batch) = self.down.take() else { return };
        if batch.is_empty() {
            self.down = Some(batch);
            return;
        }
        for slot in 0..self.listeners.len() {
            let Some(l) = self.listeners[slot].as_mut() else { continue };
            if l.outbox.is_empty() {
                continue;
            }
            let outcome = l.outbox.send(l.socket.as_fd(), &batch);
            let mut outbox = std::mem::replace(&mut l.outbox, Outbox::new(false));
            if outcome.gso_refused {
                self.gso_refused();
            }
            for d in outbox.deliveries() {
                let Some(flow) = self.flow_of(d.tag) else { continue };
                let udp = flow.udp();
                if !d.sent {
                    WorkerStats::add(&udp.dropped, d.datagrams as u64);
                    continue;
                }
                WorkerStats::add(&udp.datagrams_down, d.datagrams as u64);
                WorkerStats::add(&udp.bytes_down, d.bytes as u64);
                if let Some(flow) = self.flow_of_mut(d.tag) {
                    flow.packets_down += d.datagrams as u64;
                    flow.bytes_down += d.bytes as u64;
                }
            }
            outbox.clear();
            if let Some(l) = self.listeners[slot].as_mut() {
                l.outbox = outbox;
            }
        }
        batch.clear();
        self.down = Some(batch);
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, flow)) = self.flows.pop_expired(now) {
            WorkerStats::add(&flow.udp().flows_expired, 1);
            self.finish(key, flow, CloseReason::UdpIdleTimeout, now);
        }
        self.set_active();
    }

    /// Interim records of flows that have run for their tables' interim interval since
    /// their last record, and shared sockets left without flows closed (scanned every
    /// [`REPORT_SCAN`]).
    fn report_interim(&mut self, now: Instant) {
        if now < self.next_report_scan {
            return;
        }
        self.next_report_scan = deadline_after(now, REPORT_SCAN);
        self.close_empty_shared();
        if self.interim_flows == 0 {
            return;
        }
        for id in self.flows.ids() {
            let Some((key, flow)) = self.flows.get(id) else { continue };
            let Some(every) = flow.tables.records.interim else { continue };
            if now.saturating_duration_since(flow.reported) < every {
                continue;
            }
            let record = self.record(key, flow, RecordKind::Interim, now);
            self.ctx.events.send(record);
            if let Some(flow) = self.flows.get_mut(id) {
                flow.reported = now;
            }
        }
    }

    fn close_empty_shared(&mut self) {
        for at in 0..self.shared.len() {
            if !self.shared[at].as_ref().is_some_and(|s| s.flows.is_empty()) {
                continue;
            }
            if let Some(s) = self.shared[at].take() {
                let _ = self.poll.registry().deregister(&mut SourceFd(&s.socket.as_raw_fd()));
                self.shared_by.remove(&(s.backend, s.net));
            }
        }
    }

    fn close(&mut self, id: FlowId, reason: CloseReason, now: Instant) {
        if let Some((key, flow)) = self.flows.remove(id) {
            self.finish(key, flow, reason, now);
        }
        self.set_active();
    }

    pub(super) fn close_all(&mut self, now: Instant) {
        self.flush_down();
        for (key, flow) in self.flows.drain() {
            self.finish(key, flow, CloseReason::Shutdown, now);
        }
        self.set_active();
        self.listeners.clear();
        self.shared.clear();
        self.shared_by.clear();
        self.ctx.events.flush();
    }

    /// Accounts for a flow that left the table, releases its upstream and reports it.
    fn finish(&mut self, key: Key, flow: Flow, reason: CloseReason, now: Instant) {
        if flow.tables.records.interim.is_some() {
            self.interim_flows = self.interim_flows.saturating_sub(1);
        }
        match &flow.upstream {
            Upstream::Connected(socket) => {
                let _ = self.poll.registry().deregister(&mut SourceFd(&socket.as_raw_fd()));
            }
            &Upstream::Shared { socket, source } => {
                if let Some(s) = self.shared.get_mut(socket).and_then(Option::as_mut) {
                    s.flows.remove(&source);
                    s.sources.give_back(source);
                }
            }
        }
        let c = &flow.service().counters;
        c.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        c.udp.flows_active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        WorkerStats::add(&c.bytes_up, flow.bytes_up);
        WorkerStats::add(&c.bytes_down, flow.bytes_down);
        if reason == CloseReason::Evicted {
            WorkerStats::add(&c.udp.flows_evicted, 1);
        }
        let b = &flow.backend.state;
        b.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        WorkerStats::add(&b.bytes_up, flow.bytes_up);
        WorkerStats::add(&b.bytes_down, flow.bytes_down);
        let record =
            Record { reason: Some(reason), ..self.record(&key, &flow, RecordKind::Close, now) };
        self.ctx.events.send(record);
    }

    fn record(&self, key: &Key, flow: &Flow, kind: RecordKind, now: Instant) -> Record {
        let duration = now.saturating_duration_since(flow.start);
        Record {
            kind,
            worker: self.ctx.id,
            service: flow.service().name.clone(),
            listener: key.0,
            client: key.1,
            backend: Some(flow.backend.addr),
            start: flow.start_wall,
            end: flow.start_wall.checked_add(duration).unwrap_or(flow.start_wall),
            duration,
            bytes_up: flow.bytes_up,
            bytes_down: flow.bytes_down,
            protocol: Protocol::Udp,
            packets_up: flow.packets_up,
            packets_down: flow.packets_down,
            verdict: Verdict::Allow,
            rule: flow.rule.clone(),
            reason: None,
            tables_version: flow.tables.version,
        }
    }

    /// Up to `limit` live flows, as the admin API shows them (state `udp`).
    fn snapshot(&self, limit: usize, now: Instant) -> Vec<LiveSession> {
        let ids = self.flows.ids();
        let flows = ids.into_iter().filter_map(|id| Some((id, self.flows.get(id)?))).take(limit);
        flows
            .map(|(id, (key, f))| LiveSession {
                id: SessionId {
                    worker: self.ctx.id,
                    udp: true,
                    index: id as u32,
                    generation: self.flows.generation(id).unwrap_or_default(),
                }
                .to_u64(),
                worker: self.ctx.id,
                service: f.service().name.clone(),
                client: key.1,
                listener: key.0,
                backend: Some(f.backend.addr),
                state: "udp",
                age: now.saturating_duration_since(f.start),
                bytes_up: f.bytes_up,
                bytes_down: f.bytes_down,
            })
            .collect()
    }

    fn set_active(&self) {
        let n = self.flows.len() as u64;
        self.ctx.stats.udp_flows_active.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}
