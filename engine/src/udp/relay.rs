//! The UDP loop of one worker: readiness from mio (edge-triggered), batched datagram I/O
//! through `sys::udp`, flow state in a [`FlowTable`]. Each turn: wait (bounded by the next
//! flow expiry and record flush), read every ready socket for at most
//! [`BATCHES_PER_TURN`] batches (sockets with more left are revisited next turn without
//! waiting), expire idle flows, flush records.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::SockAddr;

use super::flows::{FlowId, FlowTable};
use super::{UdpCommand, UdpContext, BATCHES_PER_TURN, RECV_BATCH};
use crate::acl::{Action, Query};
use crate::balance::{client_key, Backend, Pick};
use crate::events::{Record, RecordKind, UdpCounters, Verdict, WorkerStats};
use crate::session::CloseReason;
use crate::sys::{self, Datagram, Outgoing, RecvBatch};
use crate::tables::{Protocol, Service, Tables};
use crate::worker::LiveSession;

const WAKE: Token = Token(usize::MAX);
/// How often flows are scanned for due interim records.
const REPORT_SCAN: Duration = Duration::from_secs(1);
/// Listener tokens are `LISTENER_BASE + slot`; flow tokens are their [`FlowId`].
const LISTENER_BASE: usize = 1 << 40;

/// A flow's key: the listener it came in on and the client's address.
type Key = (SocketAddr, SocketAddr);

struct Listener {
    addr: SocketAddr,
    socket: UdpSocket,
}

/// One client's flow: the tables that admitted it and its upstream socket.
struct Flow {
    tables: Arc<Tables>,
    service: usize,
    /// Index of the listener socket its replies leave from.
    listener: usize,
    client: SockAddr,
    backend: Backend,
    rule: Option<Arc<str>>,
    socket: UdpSocket,
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

pub(super) struct UdpLoop {
    ctx: UdpContext,
    poll: Poll,
    /// Indexed by token - LISTENER_BASE; a removed listener leaves `None`.
    listeners: Vec<Option<Listener>>,
    flows: FlowTable<Key, Flow>,
    batch: Option<RecvBatch>,
    /// Sockets whose last read stopped at the batch budget: read again next turn.
    pending: Vec<Token>,
    draining: bool,
    /// When flows are next scanned for due interim records.
    next_report_scan: Instant,
}

impl UdpLoop {
    pub(super) fn new(mut ctx: UdpContext) -> io::Result<Self> {
        let poll = Poll::new()?;
        let wake = ctx.wake.as_raw_fd();
        poll.registry().register(&mut SourceFd(&wake), WAKE, Interest::READABLE)?;
        let sockets = std::mem::take(&mut ctx.sockets);
        let batch = RecvBatch::new(RECV_BATCH, ctx.max_datagram);
        let flows = FlowTable::new(ctx.max_flows);
        let mut this = Self {
            ctx,
            poll,
            listeners: Vec::new(),
            flows,
            batch: Some(batch),
            pending: Vec::new(),
            draining: false,
            next_report_scan: Instant::now() + REPORT_SCAN,
        };
        this.add_listeners(sockets)?;
        Ok(this)
    }

    pub(super) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !self.draining {
            let timeout = self.timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
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
            self.expire(now);
            self.report_interim(now);
            self.ctx.events.flush_if_due(now);
        }
        self.close_all(Instant::now());
        self.ctx.events.flush();
        Ok(())
    }

    fn timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let scan = (!self.flows.is_empty()).then_some(self.next_report_scan);
        let next = [self.flows.next_deadline(), self.ctx.events.flush_deadline(), scan]
            .into_iter()
            .flatten()
            .min()?;
        // Round up so the loop never wakes a hair early and spins.
        Some(next.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn on_ready(&mut self, token: Token, now: Instant) {
        let more = match token {
            WAKE => {
                self.on_wake();
                false
            }
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
                UdpCommand::RemoveListeners { addrs, done } => {
                    let n = self.remove_listeners(&addrs, Instant::now());
                    let _ = done.send(n);
                }
            }
        }
    }

    fn add_listeners(&mut self, sockets: Vec<UdpSocket>) -> io::Result<()> {
        for socket in sockets {
            let addr = socket.local_addr()?;
            let slot = self.listeners.len();
            let fd = socket.as_raw_fd();
            let token = Token(LISTENER_BASE + slot);
            self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE)?;
            self.listeners.push(Some(Listener { addr, socket }));
            // Datagrams may have queued before registration (edge-triggered): read once.
            self.pending.push(token);
        }
        Ok(())
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
        let Some(mut batch) = self.batch.take() else { return false };
        let mut more = false;
        for _ in 0..BATCHES_PER_TURN {
            let Some(l) = self.listeners.get(slot).and_then(Option::as_ref) else { break };
            let (fd, addr) = (l.socket.as_raw_fd(), l.addr);
            match batch.recv(fd) {
                Ok(n) => {
                    self.relay_up(&batch, slot, addr, now);
                    more = n == RECV_BATCH;
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
        self.batch = Some(batch);
        more
    }

    /// Sends a batch's datagrams up their flows, one sendmmsg(2) per run of datagrams of
    /// the same flow.
    fn relay_up(&mut self, batch: &RecvBatch, slot: usize, listener: SocketAddr, now: Instant) {
        let mut run: Option<FlowId> = None;
        let mut outs: Vec<Outgoing<'_>> = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            let d = batch.get(i);
            let Some(client) = d.from else { continue };
            let id = match self.flows.find(&(listener, client)) {
                Some(id) => id,
                None => {
                    // Admitting may evict, and reuse, the flow of the current run.
                    if let Some(id) = run.take() {
                        self.send_up(id, &outs);
                        outs.clear();
                    }
                    match self.admit(slot, listener, client, &d, now) {
                        Some(id) => id,
                        None => continue,
                    }
                }
            };
            if self.oversized(&d) {
                if let Some((_, f)) = self.flows.get(id) {
                    WorkerStats::add(&f.udp().oversized, 1);
                }
                continue;
            }
            self.flows.touch(id, now);
            if run.is_some_and(|r| r != id) {
                self.send_up(run.take().unwrap_or(id), &outs);
                outs.clear();
            }
            run = Some(id);
            outs.push(Outgoing { payload: d.payload, to: None });
        }
        if let Some(id) = run {
            self.send_up(id, &outs);
        }
    }

    fn oversized(&self, d: &Datagram<'_>) -> bool {
        d.truncated || d.payload.len() > self.ctx.max_datagram
    }

    fn send_up(&mut self, id: FlowId, outs: &[Outgoing<'_>]) {
        let Some(flow) = self.flows.get_mut(id) else { return };
        let fd = flow.socket.as_raw_fd();
        let sent = match sys::send_batch(fd, outs) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // The backend's port answered ICMP unreachable: this flow is done; the
                // client's next datagram makes a new flow, to the pool's next backend.
                WorkerStats::add(&flow.udp().dropped, outs.len() as u64);
                self.backend_refused(id);
                return;
            }
            Err(_) => 0,
        };
        let bytes: u64 = outs[..sent].iter().map(|o| o.payload.len() as u64).sum();
        flow.packets_up += sent as u64;
        flow.bytes_up += bytes;
        let udp = flow.udp();
        WorkerStats::add(&udp.datagrams_up, sent as u64);
        WorkerStats::add(&udp.bytes_up, bytes);
        WorkerStats::add(&udp.dropped, (outs.len() - sent) as u64);
    }

    fn backend_refused(&mut self, id: FlowId) {
        if let Some((_, flow)) = self.flows.get(id) {
            WorkerStats::add(&flow.service().counters.connect_errors, 1);
            WorkerStats::add(&flow.backend.state.connect_errors, 1);
        }
        self.close(id, CloseReason::ConnectRefused, Instant::now());
    }

    /// Decides a new client with the tables in force and opens its flow; `None` (counted)
    /// when the datagram is to be dropped.
    fn admit(
        &mut self,
        slot: usize,
        listener: SocketAddr,
        client: SocketAddr,
        d: &Datagram<'_>,
        now: Instant,
    ) -> Option<FlowId> {
        let tables = self.ctx.tables.load_full();
        let service = tables.udp_service_for(listener)?;
        let udp = &tables.services()[service].counters.udp;
        if self.oversized(d) {
            WorkerStats::add(&udp.oversized, 1);
            return None;
        }
        let start_wall = SystemTime::now();
        let unix = start_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let decision = tables.judge(service, &Query { client, listener, now: unix, sni: None });
        if !matches!(decision.action, Action::Allow { .. }) {
            WorkerStats::add(&udp.denied, 1);
            return None;
        }
        let pool = tables.pool_for(service, &decision);
        let pick = Pick { start: pool.start(), key: client_key(client), tried: &[], now };
        let Some(backend) = pool.pick(&pick).map(|i| pool.backends()[i].clone()) else {
            WorkerStats::add(&udp.no_backend, 1);
            return None;
        };
        let socket = match sys::connect_udp(backend.addr) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("udp worker {}: socket to {}: {e}", self.ctx.id, backend.addr);
                WorkerStats::add(&udp.dropped, 1);
                return None;
            }
        };
        let flow = Flow {
            tables: tables.clone(),
            service,
            listener: slot,
            client: SockAddr::from(client),
            backend,
            rule: decision.rule,
            socket,
            start: now,
            start_wall,
            reported: now,
            packets_up: 0,
            bytes_up: 0,
            packets_down: 0,
            bytes_down: 0,
        };
        self.open(listener, client, flow, now)
    }

    /// Puts a flow in the table (evicting the least recently used if it is full),
    /// registers its socket and counts it.
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
        let fd = self.flows.get(id).map(|(_, f)| f.socket.as_raw_fd())?;
        if let Err(e) =
            self.poll.registry().register(&mut SourceFd(&fd), Token(id), Interest::READABLE)
        {
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

    /// Backend -> client: reads a flow's replies and sends them from the listener.
    fn read_flow(&mut self, id: FlowId, now: Instant) -> bool {
        let Some(mut batch) = self.batch.take() else { return false };
        let mut more = false;
        for _ in 0..BATCHES_PER_TURN {
            let Some(fd) = self.flows.get(id).map(|(_, f)| f.socket.as_raw_fd()) else { break };
            match batch.recv(fd) {
                Ok(n) => {
                    self.relay_down(&batch, id, now);
                    more = n == RECV_BATCH;
                    if !more {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.backend_refused(id);
                    more = false;
                    break;
                }
                Err(_) => {
                    more = false;
                    break;
                }
            }
        }
        self.batch = Some(batch);
        more
    }

    fn relay_down(&mut self, batch: &RecvBatch, id: FlowId, now: Instant) {
        let max = self.ctx.max_datagram;
        let Some(flow) = self.flows.get_mut(id) else { return };
        let Some(l) = self.listeners.get(flow.listener).and_then(Option::as_ref) else { return };
        let mut outs = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            let d = batch.get(i);
            if d.truncated || d.payload.len() > max {
                WorkerStats::add(&flow.udp().oversized, 1);
                continue;
            }
            outs.push(Outgoing { payload: d.payload, to: Some(&flow.client) });
        }
        let sent = sys::send_batch(l.socket.as_raw_fd(), &outs).unwrap_or(0);
        let bytes: u64 = outs[..sent].iter().map(|o| o.payload.len() as u64).sum();
        let dropped = (outs.len() - sent) as u64;
        drop(outs);
        flow.packets_down += sent as u64;
        flow.bytes_down += bytes;
        let udp = flow.udp();
        WorkerStats::add(&udp.datagrams_down, sent as u64);
        WorkerStats::add(&udp.bytes_down, bytes);
        WorkerStats::add(&udp.dropped, dropped);
        self.flows.touch(id, now);
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, flow)) = self.flows.pop_expired(now) {
            WorkerStats::add(&flow.udp().flows_expired, 1);
            self.finish(key, flow, CloseReason::UdpIdleTimeout, now);
        }
        self.set_active();
    }

    /// Interim records of flows that have run for their tables' interim interval since
    /// their last record (scanned every [`REPORT_SCAN`]).
    fn report_interim(&mut self, now: Instant) {
        if now < self.next_report_scan {
            return;
        }
        self.next_report_scan = now + REPORT_SCAN;
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

    fn close(&mut self, id: FlowId, reason: CloseReason, now: Instant) {
        if let Some((key, flow)) = self.flows.remove(id) {
            self.finish(key, flow, reason, now);
        }
        self.set_active();
    }

    fn close_all(&mut self, now: Instant) {
        for (key, flow) in self.flows.drain() {
            self.finish(key, flow, CloseReason::Shutdown, now);
        }
        self.set_active();
        self.listeners.clear();
    }

    /// Accounts for a flow that left the table, closes its socket and reports it.
    fn finish(&mut self, key: Key, flow: Flow, reason: CloseReason, now: Instant) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&flow.socket.as_raw_fd()));
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
            end: flow.start_wall + duration,
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
        let flows = ids.into_iter().filter_map(|id| self.flows.get(id)).take(limit);
        flows
            .map(|(key, f)| LiveSession {
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
