//! What workers report: counters (atomics, read by anyone at any time) and connection-log
//! records (open, interim, close, deny), sent over a bounded channel. A full channel drops the record and
//! counts the drop: reporting never blocks a worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::session::CloseReason;
use crate::tables::Protocol;

/// Capacity of the record channel from workers to the log thread, in batches.
pub const DEFAULT_EVENT_QUEUE: usize = 4096;

/// Counters of one worker. Monotonic except `active`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub accept_errors: AtomicU64,
    pub connect_errors: AtomicU64,
    /// UDP flows in this worker's flow table now (bounded by `max_flows`).
    pub udp_flows_active: AtomicU64,
    /// UDP flows this worker evicted to stay within `max_flows`.
    pub udp_flows_evicted: AtomicU64,
    /// Times a listener paused accepting because the process ran out of fds or memory.
    pub accept_backoffs: AtomicU64,
    /// Times a listener paused accepting because a session cap was reached.
    pub accept_paused_full: AtomicU64,
    /// Sessions closed because no socket for the backend could be created (`no_socket`).
    pub backend_socket_errors: AtomicU64,
    /// Pipes (two fds each) the splice relay keeps empty for reuse now; a gauge.
    pub spare_pipes: AtomicU64,
}

impl WorkerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Upper bounds, in microseconds, of the connect-latency histogram buckets (the last
/// bucket, +Inf, is implicit).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// A lock-free cumulative histogram of durations (Prometheus style).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations at or below each bound of [`LATENCY_BUCKETS_US`] (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, then the total count and the sum in microseconds.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut running = 0;
        let cumulative = LATENCY_BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, c)| {
                running += c.load(Ordering::Relaxed);
                (bound, running)
            })
            .collect();
        (cumulative, self.count.load(Ordering::Relaxed), self.sum_us.load(Ordering::Relaxed))
    }
}

/// Counters of one service, kept across reloads for as long as the service's name exists.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub sessions: AtomicU64,
    pub active: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Sessions closed because no backend could be reached.
    pub unserved: AtomicU64,
    /// Sessions the firewall refused.
    pub denied: AtomicU64,
    /// Sessions refused by a session limit (per client, per network, new-session rate).
    pub limited: AtomicU64,
    /// Sessions cut at their byte cap or maximum duration.
    pub cut: AtomicU64,
    pub connect_latency: LatencyHistogram,
    /// Sessions closed because their PROXY protocol header was missing, malformed, or came
    /// from an untrusted source.
    pub proxy_errors: AtomicU64,
    /// Sessions closed because no backend was up to take them (`no_backend`).
    pub no_backend: AtomicU64,
    /// UDP services only.
    pub udp: UdpCounters,
}

/// Counters of one UDP service (all workers). Flows are also counted as sessions in
/// [`ServiceCounters`] (`sessions`, `active`, bytes when they close).
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Flows created.
    pub flows: AtomicU64,
    pub flows_active: AtomicU64,
    /// Flows closed after `udp_idle_timeout` without a datagram.
    pub flows_expired: AtomicU64,
    /// Flows closed to make room in a full flow table (`max_flows`).
    pub flows_evicted: AtomicU64,
    /// Datagrams and payload bytes relayed client -> backend.
    pub datagrams_up: AtomicU64,
    pub bytes_up: AtomicU64,
    /// Datagrams and payload bytes relayed backend -> client.
    pub datagrams_down: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Datagrams dropped because the firewall denied their source (no flow is created).
    pub denied: AtomicU64,
    /// Datagrams dropped because they were larger than `udp_max_datagram` (either way).
    pub oversized: AtomicU64,
    /// Datagrams dropped because no backend takes new flows.
    pub no_backend: AtomicU64,
    /// Datagrams dropped because a socket could not take them (full buffer, error).
    pub dropped: AtomicU64,
}

/// Administrative state of a backend, set through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Gets new sessions.
    Enabled,
    /// No new sessions; existing ones finish.
    Draining,
    /// No new sessions (maintenance); existing ones finish.
    Disabled,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

/// State and counters of one backend of one service, kept across reloads.
///
/// Health has two sources: active checks (control's health checker sets `healthy`) and
/// passive ejection (the engine counts consecutive connect failures and ejects the backend
/// for a cool-down). A backend is *up* when it is healthy and not ejected.
#[derive(Debug)]
pub struct BackendState {
    pub addr: SocketAddr,
    admin: AtomicU64,
    pub sessions: AtomicU64,
    pub active: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Result of the active checks (true until a check says otherwise).
    healthy: AtomicBool,
    /// Connect failures since the last successful connect.
    consecutive_failures: AtomicU32,
    /// Ejected until this many milliseconds after [`clock_ms`]'s origin (0: not ejected).
    ejected_until: AtomicU64,
    /// Times the backend was ejected after consecutive connect failures.
    pub ejections: AtomicU64,
}

/// Milliseconds from a process-wide origin to `now`: the clock of ejection deadlines,
/// shared by all threads.
pub fn clock_ms(now: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
    now.saturating_duration_since(origin).as_millis() as u64
}

impl BackendState {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            admin: AtomicU64::new(0),
            sessions: AtomicU64::default(),
            active: AtomicU64::default(),
            bytes_up: AtomicU64::default(),
            bytes_down: AtomicU64::default(),
            connect_errors: AtomicU64::default(),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::default(),
            ejected_until: AtomicU64::default(),
            ejections: AtomicU64::default(),
        }
    }

    pub fn admin(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }

    pub fn set_admin(&self, state: AdminState) {
        let v = match state {
            AdminState::Enabled => 0,
            AdminState::Draining => 1,
            AdminState::Disabled => 2,
        };
        self.admin.store(v, Ordering::Relaxed);
    }

    /// Whether new sessions may go to this backend as far as its admin state goes.
    pub fn accepts_sessions(&self) -> bool {
        self.admin() == AdminState::Enabled
    }

    /// What the active checks last concluded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records the active checks' conclusion; returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Whether passive ejection keeps this backend out at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        clock_ms(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Healthy and not ejected at `now`.
    pub fn is_up(&self, now: Instant) -> bool {
        self.healthy() && !self.ejected(now)
    }

    /// Counts a failed connect; after `after` consecutive failures (0: never) the backend is
    /// ejected until `now + cooldown`, if `may_eject`. Returns true when this call ejected it.
    pub fn connect_failed(
        &self,
        after: u32,
        cooldown: Duration,
        may_eject: bool,
        now: Instant,
    ) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if after == 0 || failures < after || !may_eject || self.ejected(now) {
            return false;
        }
        let until = clock_ms(now) + cooldown.as_millis() as u64;
        self.ejected_until.store(until, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Ends an ejection early (an active check has just shown the backend reachable).
    pub fn end_ejection(&self) {
        self.ejected_until.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A connect succeeded: the failure streak ends.
    pub fn connect_succeeded(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
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

/// Records sent at once: a worker collects its records and sends them as one message when
/// the batch is full or [`FLUSH_INTERVAL`] has passed, so the log thread is woken a few
/// times a second under load, not once per session. Read it as a slice; when the receiver
/// drops it, its vector goes back to the worker that sent it, so that a busy worker reuses a
/// few vectors instead of allocating one per batch (fresh allocations of varying sizes,
/// freed on another thread, slowly fragment a long-running process's heap).
#[derive(Debug)]
pub struct Batch {
    records: Vec<Record>,
    home: Sender<Vec<Record>>,
}

impl std::ops::Deref for Batch {
    type Target = [Record];

    fn deref(&self) -> &[Record] {
        &self.records
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        // A worker that is gone, or holds enough spares, lets this one go.
        let _ = self.home.try_send(records);
    }
}

/// Most records a worker holds before sending them.
pub const MAX_BATCH: usize = 256;
/// Longest a record waits in a worker before it is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Emptied batch vectors a worker keeps for reuse: enough for the batches in flight to the
/// log thread at a steady rate; under a backlog, more are allocated and later let go.
const SPARE_BATCHES: usize = 8;

/// The sending half held by each worker (each clone has its own pending batch and spares).
#[derive(Debug)]
pub struct EventSink {
    tx: Sender<Batch>,
    dropped: Arc<AtomicU64>,
    pending: Vec<Record>,
    /// When the oldest pending record was queued.
    oldest: Option<Instant>,
    /// Where receivers return emptied vectors, and where they are taken from.
    spare: (Sender<Vec<Record>>, Receiver<Vec<Record>>),
}

impl Clone for EventSink {
    fn clone(&self) -> Self {
        Self::new(self.tx.clone(), self.dropped.clone())
    }
}

impl EventSink {
    /// A bounded channel of `capacity` batches; the receiver goes to the control thread.
    pub fn bounded(capacity: usize) -> (EventSink, Receiver<Batch>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (EventSink::new(tx, Arc::default()), rx)
    }

    fn new(tx: Sender<Batch>, dropped: Arc<AtomicU64>) -> Self {
        let spare = crossbeam_channel::bounded(SPARE_BATCHES);
        Self { tx, dropped, pending: Vec::new(), oldest: None, spare }
    }

    /// Queues a record; it leaves with the next [`flush`](Self::flush).
    pub fn send(&mut self, record: Record) {
        if self.pending.capacity() == 0 {
            self.pending =
                self.spare.1.try_recv().unwrap_or_else(|_| Vec::with_capacity(MAX_BATCH));
        }
        self.pending.push(record);
        self.oldest.get_or_insert_with(Instant::now);
        if self.pending.len() >= MAX_BATCH {
            self.flush();
        }
    }

    /// When the pending records must leave, if there are any.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + FLUSH_INTERVAL)
    }

    /// Flushes if the oldest pending record has waited [`FLUSH_INTERVAL`].
    pub fn flush_if_due(&mut self, now: Instant) {
        if self.flush_deadline().is_some_and(|d| now >= d) {
            self.flush();
        }
    }

    /// Sends the pending records without blocking; a full or closed channel drops them and
    /// counts them.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.oldest = None;
        let records = std::mem::take(&mut self.pending);
        let n = records.len() as u64;
        let batch = Batch { records, home: self.spare.0.clone() };
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            kind: RecordKind::Close,
            worker: 0,
            service: "s".into(),
            listener: ([127, 0, 0, 1], 1).into(),
            client: ([127, 0, 0, 1], 2).into(),
            backend: None,
            start: SystemTime::now(),
            end: SystemTime::now(),
            duration: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
            protocol: Protocol::Tcp,
            packets_up: 0,
            packets_down: 0,
            verdict: Verdict::Allow,
            rule: None,
            reason: Some(CloseReason::NoBackend),
            tables_version: 1,
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let h = LatencyHistogram::default();
        for us in [50, 100, 101, 3_000, 10_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(buckets[0], (100, 2));
        assert_eq!(buckets[1], (250, 3));
        assert_eq!(buckets.iter().find(|(b, _)| *b == 5_000).unwrap().1, 4);
        assert_eq!(buckets.last().unwrap().1, 4, "10 s lies beyond the last finite bound");
        assert_eq!(count, 5);
        assert_eq!(sum, 50 + 100 + 101 + 3_000 + 10_000_000);
    }

    #[test]
    fn admin_state_round_trips() {
        let b = BackendState::new(([127, 0, 0, 1], 1).into());
        assert!(b.accepts_sessions());
        for s in [AdminState::Draining, AdminState::Disabled, AdminState::Enabled] {
            b.set_admin(s);
            assert_eq!(b.admin(), s);
            assert_eq!(b.accepts_sessions(), s == AdminState::Enabled);
        }
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (mut sink, rx) = EventSink::bounded(2);
        for _ in 0..5 {
            sink.send(record());
            sink.flush();
        }
        assert_eq!(rx.len(), 2);
        assert_eq!(sink.dropped(), 3);
    }

    #[test]
    fn records_travel_in_batches() {
        let (mut sink, rx) = EventSink::bounded(8);
        for _ in 0..3 {
            sink.send(record());
        }
        assert!(rx.is_empty(), "nothing leaves before a flush");
        sink.flush();
        assert_eq!(rx.try_recv().unwrap().len(), 3);
        for _ in 0..MAX_BATCH {
            sink.send(record());
        }
        assert_eq!(rx.try_recv().unwrap().len(), MAX_BATCH, "a full batch leaves at once");
    }

    #[test]
    fn a_received_batch_comes_back_to_its_worker_for_reuse() {
        let (mut sink, rx) = EventSink::bounded(8);
        sink.send(record());
        sink.flush();
        let batch = rx.try_recv().unwrap();
        let vector = batch.as_ptr();
        assert_eq!(batch.len(), 1);
        drop(batch);
        sink.send(record());
        sink.flush();
        let again = rx.try_recv().unwrap();
        assert_eq!((again.as_ptr(), again.len()), (vector, 1), "the same vector, refilled");
    }
}
