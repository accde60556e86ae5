//! Token buckets for bandwidth and rates, and the per-session shaper the drivers ask before
//! every read. Pure: no I/O; time is passed in as nanoseconds on one monotonic scale
//! ([`nanos`] / [`instant`] convert from and to `Instant`).
//!
//! A [`Bucket`] is a GCRA (generic cell rate algorithm) meter: one atomic "theoretical
//! arrival time" (TAT). Taking `n` units moves the TAT forward by `n / rate`; the units may be
//! used at `TAT - burst`. So a bucket shared by every worker costs one compare-and-swap per
//! take and never a lock, and its long-run rate is exact whatever the pattern of takes.
//!
//! Sessions *reserve* a quantum before they read and wait until the reservation is due when
//! the bucket is empty. Reservations queue in arrival order, so N sessions that share a
//! budget (a service total, a client, a rule) take turns and each gets about 1/N of it.
//! Bytes reserved but not read (a short read) are given back.
//!
//! Invariants: a direction never reads more than its shaper allowed; while a direction waits
//! it has no readiness poll armed, only a deadline (no busy polling while a bucket is empty).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::limits::ClientMap;
use crate::session::Direction;

/// Burst of a bandwidth limit that names none: this long at the configured rate...
pub const DEFAULT_BURST_TIME: Duration = Duration::from_millis(50);
/// ...but at least this many bytes, so that slow rates still move whole packets.
pub const DEFAULT_MIN_BURST: u64 = 16 * 1024;
/// The most a shaped direction reserves at once: this long at its slowest rate...
pub const QUANTUM_TIME: Duration = Duration::from_millis(20);
/// ...bounded by these sizes (and by the smallest burst).
pub const MIN_QUANTUM: u64 = 4 * 1024;
pub const MAX_QUANTUM: u64 = 1024 * 1024;

const NANOS: u128 = 1_000_000_000;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `t` in nanoseconds on the shapers' scale (times before the scale began map to 0).
pub fn nanos(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos().min(u128::from(u64::MAX)) as u64
}

/// The instant of `ns` on the shapers' scale.
pub fn instant(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// A rate in units (bytes, or sessions) per second, with the burst allowed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u64,
    pub burst: u64,
}

impl Rate {
    /// A bandwidth with the default burst.
    pub fn bandwidth(per_sec: u64) -> Rate {
        let time_burst = (u128::from(per_sec) * DEFAULT_BURST_TIME.as_nanos() / NANOS) as u64;
        Rate { per_sec, burst: time_burst.max(DEFAULT_MIN_BURST) }
    }

    /// Nanoseconds that `units` take at this rate, rounded up.
    fn cost(&self, units: u64) -> u64 {
        let per_sec = u128::from(self.per_sec.max(1));
        (u128::from(units) * NANOS).div_ceil(per_sec).min(u128::from(u64::MAX)) as u64
    }
}

/// A GCRA meter, shareable between threads.
#[derive(Debug)]
pub struct Bucket {
    rate: Rate,
    /// Nanoseconds of `burst` at `rate`.
    tolerance: u64,
    tat: AtomicU64,
}

impl Bucket {
    pub fn new(rate: Rate) -> Self {
        Self { rate, tolerance: rate.cost(rate.burst), tat: AtomicU64::new(0) }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Reserves `n` units at `now` and returns when they may be used (at or before `now`
    /// when the bucket holds them).
    pub fn reserve(&self, now: u64, n: u64) -> u64 {
        let cost = self.rate.cost(n);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            match self.tat.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next.saturating_sub(self.tolerance),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Takes `n` units if the bucket holds them at `now`; otherwise takes nothing.
    pub fn try_take(&self, now: u64, n: u64) -> bool {
        let cost = self.rate.cost(n);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            if next.saturating_sub(self.tolerance) > now {
                return false;
            }
            match self.tat.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => tat = seen,
            }
        }
    }

    /// Gives back `n` reserved units that were not used.
    pub fn refund(&self, n: u64) {
        let cost = self.rate.cost(n);
        let _ = self.tat.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
            Some(tat.saturating_sub(cost))
        });
    }

    /// Whether the bucket is full at `now` (nothing reserved ahead): its state can be
    /// forgotten.
    pub fn is_idle(&self, now: u64) -> bool {
        self.tat.load(Ordering::Relaxed) <= now
    }
}

/// A bandwidth limit for each direction (`None`: that direction is not limited).
pub type PerDirection<T> = [Option<T>; 2];

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Up => 0,
        Direction::Down => 1,
    }
}

/// What a `bandwidth` block configures, for each direction separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BandwidthSpec {
    pub per_connection: PerDirection<Rate>,
    pub per_client: PerDirection<Rate>,
    pub total: PerDirection<Rate>,
}

impl BandwidthSpec {
    pub fn is_empty(&self) -> bool {
        *self == BandwidthSpec::default()
    }
}

/// One client's buckets under a [`Bandwidth`].
#[derive(Debug)]
pub struct ClientBuckets([Option<Bucket>; 2]);

impl ClientBuckets {
    fn is_idle(&self, now: u64) -> bool {
        self.0.iter().flatten().all(|b| b.is_idle(now))
    }
}

/// A compiled `bandwidth` block of a service or a rule: its shared buckets (the total, and
/// one pair per client address), shared by every worker.
#[derive(Debug)]
pub struct Bandwidth {
    pub spec: BandwidthSpec,
    total: [Option<Arc<Bucket>>; 2],
    clients: ClientMap<ClientBuckets>,
}

impl Bandwidth {
    pub fn new(spec: BandwidthSpec) -> Self {
        let total = spec.total.map(|r| r.map(|r| Arc::new(Bucket::new(r))));
        Self { spec, total, clients: ClientMap::default() }
    }

    /// Clients with state held (active sessions or a recent burst).
    pub fn tracked_clients(&self) -> usize {
        self.clients.len()
    }

    /// Adds this block's buckets for a session of `client` to `shaper`.
    pub fn attach(&self, shaper: &mut Shaper, client: std::net::IpAddr, now: u64) {
        let spec = self.spec;
        let per_client = if spec.per_client.iter().any(Option::is_some) {
            let make = || ClientBuckets(spec.per_client.map(|r| r.map(Bucket::new)));
            self.clients.get_or_insert(client, now, make, |c, now| c.is_idle(now))
        } else {
            None
        };
        for dir in [Direction::Up, Direction::Down] {
            let i = index(dir);
            if let Some(rate) = spec.per_connection[i] {
                shaper.add(dir, Meter::Own(Bucket::new(rate)));
            }
            if let Some(c) = &per_client {
                if c.0[i].is_some() {
                    shaper.add(dir, Meter::Client(c.clone(), i));
                }
            }
            if let Some(total) = &self.total[i] {
                shaper.add(dir, Meter::Shared(total.clone()));
            }
        }
    }
}

/// One bucket a session's direction draws from.
#[derive(Debug)]
enum Meter {
    /// The session's own (per connection).
    Own(Bucket),
    /// Its client's, in a [`Bandwidth`]'s client map.
    Client(Arc<ClientBuckets>, usize),
    /// A total shared by every session under a service or rule.
    Shared(Arc<Bucket>),
}

impl Meter {
    fn bucket(&self) -> &Bucket {
        match self {
            Meter::Own(b) => b,
            Meter::Client(c, i) => c.0[*i].as_ref().expect("attached only when configured"),
            Meter::Shared(b) => b,
        }
    }
}

/// A direction's meters and its outstanding reservation.
#[derive(Debug, Default)]
struct Lane {
    meters: Vec<Meter>,
    quantum: u64,
    /// Units reserved on every meter and not yet used.
    reserved: u64,
    /// When the reservation may be used.
    due: u64,
    /// What the last [`Allowance::Bytes`] allowed.
    granted: u64,
    /// The size of the current reservation.
    size: u64,
}

/// What a direction may read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Read at most this many bytes, then report them with [`Shaper::used`].
    Bytes(usize),
    /// Read nothing until this time (nanoseconds, see [`instant`]).
    Wait(u64),
    /// The session's byte cap is reached.
    Capped,
}

/// The shaping and byte cap of one session; absent for sessions without either.
#[derive(Debug, Default)]
pub struct Shaper {
    lanes: [Lane; 2],
    /// Bytes the session may read in both directions together.
    byte_cap: Option<u64>,
    read: u64,
}

impl Shaper {
    /// A shaper with a byte cap only.
    pub fn with_byte_cap(cap: Option<u64>) -> Self {
        let mut shaper = Self::default();
        shaper.byte_cap = cap;
        shaper
    }

    fn add(&mut self, dir: Direction, meter: Meter) {
        let lane = &mut self.lanes[index(dir)];
        let rate = meter.bucket().rate();
        let quantum = ((u128::from(rate.per_sec) * QUANTUM_TIME.as_nanos() / NANOS) as u64)
            .clamp(MIN_QUANTUM, MAX_QUANTUM)
            .min(rate.burst.max(1));
        lane.quantum = if lane.meters.is_empty() { quantum } else { lane.quantum.min(quantum) };
        lane.meters.push(meter);
    }

    /// Whether anything limits this session (else the drivers skip it altogether).
    pub fn is_active(&self) -> bool {
        self.byte_cap.is_some() || self.lanes.iter().any(|l| !l.meters.is_empty())
    }

    /// Bytes read so far in both directions.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// How much `dir` may read at `now`, for a read of up to `want` bytes.
    pub fn allowance(&mut self, dir: Direction, now: u64, want: usize) -> Allowance {
        let mut want = want as u64;
        if let Some(cap) = self.byte_cap {
            let left = cap.saturating_sub(self.read);
            if left == 0 {
                return Allowance::Capped;
            }
            want = want.min(left);
        }
        let lane = &mut self.lanes[index(dir)];
        if lane.meters.is_empty() {
            return Allowance::Bytes(want as usize);
        }
        if lane.reserved == 0 {
            // Always a whole quantum, whatever this read could take: turns are equal in
            // bytes, so sessions that read into smaller buffers get the same share.
            let n = match self.byte_cap {
                Some(cap) => lane.quantum.min(cap - self.read),
                None => lane.quantum,
            };
            lane.reserve(now, n);
        }
        if lane.due > now {
            return Allowance::Wait(lane.due);
        }
        lane.granted = lane.reserved.min(want);
        Allowance::Bytes(lane.granted as usize)
    }

    /// `dir` read `got` bytes at `now` under its last [`Allowance::Bytes`]. The rest of the
    /// reservation stays for the next read; a reservation nothing could be read under goes
    /// back to the buckets. A reservation used up is renewed at once, so a
    /// busy direction keeps its place in the buckets' queue even while its destination is
    /// slow to take what it read: turns go round the sessions whatever their write timing.
    pub fn used(&mut self, dir: Direction, got: usize, now: u64) {
        let got = got as u64;
        self.read += got;
        let lane = &mut self.lanes[index(dir)];
        lane.reserved = lane.reserved.saturating_sub(got);
        // A read that found nothing at all gives the untouched reservation back; one that
        // found part of it keeps the rest for when more arrives (the socket's buffer may hold
        // less than a quantum), so that it does not lose its turn.
        let nothing = got == 0 && lane.granted > 0 && lane.reserved == lane.size;
        lane.granted = 0;
        if nothing {
            lane.give_back();
        } else if lane.reserved == 0 && !lane.meters.is_empty() {
            let left = self.byte_cap.map_or(u64::MAX, |cap| cap.saturating_sub(self.read));
            if left > 0 {
                lane.reserve(now, lane.quantum.min(left));
            }
        }
    }
}

impl Lane {
    fn reserve(&mut self, now: u64, n: u64) {
        self.due = self.meters.iter().map(|m| m.bucket().reserve(now, n)).max().unwrap_or(0);
        self.reserved = n;
        self.size = n;
    }

    /// Returns what is reserved and unused to the buckets.
    fn give_back(&mut self) {
        if self.reserved > 0 {
            for m in &self.meters {
                m.bucket().refund(self.reserved);
            }
        }
        self.reserved = 0;
    }
}

impl Drop for Shaper {
    /// A session that ends gives back what it had reserved and not read.
    fn drop(&mut self) {
        self.lanes.iter_mut().for_each(Lane::give_back);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    fn rate(per_sec: u64, burst: u64) -> Rate {
        Rate { per_sec, burst }
    }

    #[test]
    fn a_bucket_gives_its_burst_at_once_then_its_rate() {
        let b = Bucket::new(rate(1000, 100));
        let t0 = 10 * SEC;
        assert!(b.try_take(t0, 100));
        assert!(!b.try_take(t0, 1));
        // 10 units come back every 10 ms.
        assert!(!b.try_take(t0 + 9 * MS, 10));
        assert!(b.try_take(t0 + 10 * MS, 10));
        // A reservation past the burst is due when the rate has paid for it.
        assert_eq!(b.reserve(t0 + 10 * MS, 50), t0 + 60 * MS);
    }

    #[test]
    fn a_refund_makes_the_units_available_again() {
        let b = Bucket::new(rate(1000, 10));
        let t0 = SEC;
        assert!(b.try_take(t0, 10));
        b.refund(10);
        assert!(b.try_take(t0, 10));
        assert!(!b.is_idle(t0));
        assert!(b.is_idle(t0 + 10 * MS));
    }

    #[test]
    fn an_idle_bucket_never_saves_more_than_its_burst() {
        let b = Bucket::new(rate(1000, 100));
        let t = 3600 * SEC;
        assert!(b.try_take(t, 100));
        assert!(!b.try_take(t, 1));
    }

    /// Drives a shaper as a driver would: read whenever allowed, as much as allowed,
    /// from a source that always has `want` bytes; returns the bytes read by `end`.
    fn stream(shaper: &mut Shaper, dir: Direction, start: u64, end: u64, want: usize) -> u64 {
        let mut now = start;
        let mut total = 0;
        while now < end {
            match shaper.allowance(dir, now, want) {
                Allowance::Bytes(n) => {
                    shaper.used(dir, n, now);
                    total += n as u64;
                }
                Allowance::Wait(t) => now = t,
                Allowance::Capped => break,
            }
        }
        total
    }

    #[test]
    fn a_shaped_stream_moves_at_its_rate_from_64_kb_to_1_gb_per_second() {
        for per_sec in [64_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000] {
            let bw = Bandwidth::new(BandwidthSpec {
                per_connection: [Some(Rate::bandwidth(per_sec)), None],
                ..BandwidthSpec::default()
            });
            let mut s = Shaper::default();
            bw.attach(&mut s, [127, 0, 0, 1].into(), SEC);
            let burst = Rate::bandwidth(per_sec).burst;
            let got = stream(&mut s, Direction::Up, SEC, 11 * SEC, 1 << 20);
            let expected = per_sec * 10 + burst;
            let error = got.abs_diff(expected) as f64 / expected as f64;
            assert!(error < 0.01, "{per_sec} B/s: {got} bytes in 10 s, expected {expected}");
            // The other direction is not limited.
            assert_eq!(s.allowance(Direction::Down, SEC, 1 << 20), Allowance::Bytes(1 << 20));
        }
    }

    #[test]
    fn sessions_under_a_shared_total_take_turns() {
        let bw = Bandwidth::new(BandwidthSpec {
            total: [None, Some(Rate::bandwidth(1_000_000))],
            ..BandwidthSpec::default()
        });
        let mut shapers: Vec<Shaper> = (0..4)
            .map(|i| {
                let mut s = Shaper::default();
                bw.attach(&mut s, [127, 0, 0, i + 1].into(), 0);
                s
            })
            .collect();
        // Event loop: each session reads whenever its reservation is due.
        let mut due = [0u64; 4];
        let mut got = [0u64; 4];
        let end = 10 * SEC;
        loop {
            let (i, &now) = due.iter().enumerate().min_by_key(|(_, &t)| t).unwrap();
            if now >= end {
                break;
            }
            // Sessions read into buffers of different sizes, and after each read are busy
            // writing for different times (their clients drain at different moments):
            // shares are equal all the same.
            match shapers[i].allowance(Direction::Down, now, 16 * 1024 * (i + 1)) {
                Allowance::Bytes(n) => {
                    shapers[i].used(Direction::Down, n, now);
                    got[i] += n as u64;
                    due[i] = now + [0, 10, 30, 50][i] * MS;
                }
                Allowance::Wait(t) => due[i] = t,
                Allowance::Capped => unreachable!(),
            }
        }
        let sum: u64 = got.iter().sum();
        assert!(sum.abs_diff(10_000_000) < 200_000, "total {sum}");
        for g in got {
            let share = g as f64 / sum as f64;
            assert!((share - 0.25).abs() < 0.025, "shares {got:?}");
        }
    }

    #[test]
    fn the_tightest_meter_decides_and_a_short_read_is_given_back() {
        let bw = Bandwidth::new(BandwidthSpec {
            per_connection: [Some(rate(1_000_000, 16_384)), None],
            per_client: [Some(rate(100_000, 16_384)), None],
            ..BandwidthSpec::default()
        });
        let client = [127, 0, 0, 2].into();
        let mut a = Shaper::default();
        bw.attach(&mut a, client, 0);
        let mut b = Shaper::default();
        bw.attach(&mut b, client, 0);
        assert_eq!(bw.tracked_clients(), 1);
        // Two sessions of one client share its 100 kB/s.
        let got = stream(&mut a, Direction::Up, SEC, 2 * SEC, 65_536)
            + stream(&mut b, Direction::Up, 2 * SEC, 3 * SEC, 65_536);
        assert!(got.abs_diff(216_384) < 8_192, "{got}");
        // A read that finds less than it reserved returns the rest.
        let t = 10 * SEC;
        let Allowance::Bytes(n) = a.allowance(Direction::Up, t, 65_536) else { panic!() };
        a.used(Direction::Up, 0, t);
        assert_eq!(a.allowance(Direction::Up, t, 65_536), Allowance::Bytes(n));
    }

    #[test]
    fn a_partial_read_keeps_the_rest_of_its_turn() {
        let bw = Bandwidth::new(BandwidthSpec {
            total: [Some(rate(1_000_000, 100_000)), None],
            ..BandwidthSpec::default()
        });
        let mut s = Shaper::default();
        bw.attach(&mut s, [127, 0, 0, 1].into(), 0);
        let t = SEC;
        let Allowance::Bytes(n) = s.allowance(Direction::Up, t, 1 << 20) else { panic!() };
        // The socket held only part of the turn: the rest is still this session's.
        s.used(Direction::Up, n / 2, t);
        assert_eq!(s.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(n - n / 2));
    }

    #[test]
    fn the_byte_cap_counts_both_directions() {
        let mut s = Shaper::with_byte_cap(Some(1000));
        assert!(s.is_active());
        assert_eq!(s.allowance(Direction::Up, 0, 600), Allowance::Bytes(600));
        s.used(Direction::Up, 600, 0);
        assert_eq!(s.allowance(Direction::Down, 0, 600), Allowance::Bytes(400));
        s.used(Direction::Down, 400, 0);
        assert_eq!(s.allowance(Direction::Down, 0, 600), Allowance::Capped);
        assert_eq!(s.bytes_read(), 1000);
        assert!(!Shaper::default().is_active());
    }
}
