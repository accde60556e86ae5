//! Counters that workers, the UDP loops and the control plane share: atomics that anyone
//! reads at any time (per worker, per service, per backend), and the backend health state
//! that passive ejection and active checks both write. Monotonic unless a field says
//! otherwise; no locks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
    /// Datagrams a shared upstream socket received that belong to no flow of this worker
    /// (not from the socket's backend, or to an address no flow holds now): dropped.
    pub udp_unmatched: AtomicU64,
    /// Times a listener paused accepting because the process ran out of fds or memory.
    pub accept_backoffs: AtomicU64,
    /// Times a listener paused accepting because a session cap was reached.
    pub accept_paused_full: AtomicU64,
    /// Sessions closed because no socket for the backend could be created (`no_socket`).
    pub backend_socket_errors: AtomicU64,
    /// Pipes (two fds each) the splice relay keeps empty for reuse now; a gauge.
    pub spare_pipes: AtomicU64,
    /// Connections whose client reset them before they could be admitted (their address
    /// was already gone): neither sessions nor records.
    pub accepted_reset: AtomicU64,
    /// Receives of the io_uring relay that found every provided buffer taken (many peers
    /// not reading) and read inline, into a buffer of the worker's pool, instead.
    pub ring_fallbacks: AtomicU64,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
