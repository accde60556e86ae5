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

use crate::clients::ClientMap;
use crate::side::Direction;

/// Burst of a bandwidth limit that names none: this long at the configured rate...
pub const DEFAULT_BURST_TIME: Duration = Duration::from_millis(50);
/// ...but at least this many bytes, so that slow rates still move whole packets.
pub const DEFAULT_MIN_BURST: u64 = 16 * 1024;
/// The most a shaped direction reserves at once: this long at its slowest rate...
pub const QUANTUM_TIME: Duration = Duration::from_millis(20);
/// ...bounded by these sizes (and by the smallest burst).
pub const MIN_QUANTUM: u64 = 4 * 1024;
pub const MAX_QUANTUM: u64 = 1024 * 1024;

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

/// A rate: `count` units (bytes, or sessions) per `period`, with the burst allowed at once.
/// Kept as a fraction in lowest terms (units per nanoseconds), so a rate that is not a whole
/// number per second ("90 per minute" is 1.5 per second, "12 bit/s" is 1.5 B/s) is exact,
/// and two rates are equal exactly when they are the same rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units per `nanos` (both at least 1, without a common factor).
    count: u64,
    nanos: u64,
    /// Units that may be taken at once.
    pub burst: u64,
}

impl Rate {
    /// `count` units per `period` (each at least 1 unit and 1 ns), with `burst`.
    pub fn new(count: u64, period: Duration, burst: u64) -> Rate {
        let count = count.max(1);
        let nanos = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1);
        let common = gcd(count, nanos);
        Rate { count: count / common, nanos: nanos / common, burst }
    }

    /// `per_sec` units per second, with `burst`.
    pub fn per_second(per_sec: u64, burst: u64) -> Rate {
        Rate::new(per_sec, Duration::from_secs(1), burst)
    }

    /// A bandwidth of `per_sec` bytes per second with the default burst.
    pub fn bandwidth(per_sec: u64) -> Rate {
        Rate::bandwidth_per(per_sec, Duration::from_secs(1))
    }

    /// A bandwidth of `count` bytes per `period` with the default burst: [`DEFAULT_BURST_TIME`]
    /// at the rate, at least [`DEFAULT_MIN_BURST`].
    pub fn bandwidth_per(count: u64, period: Duration) -> Rate {
        let rate = Rate::new(count, period, 0);
        Rate { burst: rate.units_in(DEFAULT_BURST_TIME).max(DEFAULT_MIN_BURST), ..rate }
    }

    /// The same rate with another burst.
    pub fn with_burst(self, burst: u64) -> Rate {
        Rate { burst, ..self }
    }

    /// Units per second, rounded down (for display).
    pub fn per_sec(&self) -> u64 {
        self.units_in(Duration::from_secs(1))
    }

    /// Units this rate gives in `d`, rounded down (saturating).
    pub fn units_in(&self, d: Duration) -> u64 {
        let units = d.as_nanos().saturating_mul(u128::from(self.count)) / u128::from(self.nanos);
        units.min(u128::from(u64::MAX)) as u64
    }

    /// Nanoseconds that `units` take at this rate, rounded up (saturating).
    fn cost(&self, units: u64) -> u64 {
        let nanos = u128::from(units) * u128::from(self.nanos);
        nanos.div_ceil(u128::from(self.count)).min(u128::from(u64::MAX)) as u64
    }
}

/// The greatest common divisor (both at least 1).
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
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
            self.clients.get_or_insert(client, now, make, |c, now| c.is_idle(now).then_some(0))
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

/// Meters one direction can draw from at most: a service's and a rule's `bandwidth`
/// blocks, each with a per-connection, a per-client and a total rate.
const MAX_METERS: usize = 6;

/// A direction's meters, kept inline: making a session's shaper allocates nothing.
#[derive(Debug, Default)]
struct Meters {
    at: [Option<Meter>; MAX_METERS],
    len: usize,
}

impl Meters {
    fn push(&mut self, meter: Meter) {
        debug_assert!(self.len < MAX_METERS, "more meters than two bandwidth blocks make");
        if let Some(slot) = self.at.get_mut(self.len) {
            *slot = Some(meter);
            self.len += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = &Meter> {
        self.at[..self.len].iter().flatten()
    }
}

/// A direction's meters and its outstanding reservation.
#[derive(Debug, Default)]
struct Lane {
    meters: Meters,
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
        let quantum =
            rate.units_in(QUANTUM_TIME).clamp(MIN_QUANTUM, MAX_QUANTUM).min(rate.burst.max(1));
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
            for m in self.meters.iter() {
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

/// Spare shapers a thread keeps for its next sessions.
const SPARE_SHAPERS: usize = 256;

thread_local! {
    /// Emptied shapers of this thread's ended sessions, reused by its next ones: a worker
    /// makes shapers on its own thread and drops them there, so after warm-up a shaped
    /// session allocates nothing for its shaper.
    // The boxes are the point: each is handed out whole, and its address must not move.
    #[allow(clippy::vec_box)]
    static SPARE: std::cell::RefCell<Vec<Box<Shaper>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A session's shaper, kept out of line (sessions without one stay small) in a box taken
/// from and given back to its thread's spares.
#[derive(Debug)]
pub struct PooledShaper(Option<Box<Shaper>>);

impl PooledShaper {
    /// A shaper with a byte cap only (meters are attached after).
    pub fn with_byte_cap(cap: Option<u64>) -> Self {
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        let mut shaper = spare.unwrap_or_default();
        shaper.byte_cap = cap;
        PooledShaper(Some(shaper))
    }
}

impl std::ops::Deref for PooledShaper {
    type Target = Shaper;

    fn deref(&self) -> &Shaper {
        self.0.as_deref().expect("a pooled shaper is present until dropped")
    }
}

impl std::ops::DerefMut for PooledShaper {
    fn deref_mut(&mut self) -> &mut Shaper {
        self.0.as_deref_mut().expect("a pooled shaper is present until dropped")
    }
}

impl Drop for PooledShaper {
    fn drop(&mut self) {
        let Some(mut shaper) = self.0.take() else { return };
        // What the session reserved goes back to the buckets, its meters are let go.
        *shaper = Shaper::default();
        let _ = SPARE.try_with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARE_SHAPERS {
                spare.push(shaper);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    fn rate(per_sec: u64, burst: u64) -> Rate {
        Rate::per_second(per_sec, burst)
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
    fn a_rate_below_one_per_second_is_exact() {
        // 90 per minute is 1.5 per second: one every 666.67 ms, 90 in a minute.
        let r = Rate::new(90, Duration::from_secs(60), 1);
        assert_eq!(r, Rate::new(3, Duration::from_secs(2), 1), "kept in lowest terms");
        assert_eq!(r.units_in(Duration::from_secs(60)), 90);
        let b = Bucket::new(r);
        let t0 = 10 * SEC;
        let taken = (0..60_000u64).filter(|ms| b.try_take(t0 + ms * MS, 1)).count();
        assert_eq!(taken, 90, "one at once, then 1.5 per second for 60 s (less the last)");
        let half = Bucket::new(Rate::new(30, Duration::from_secs(60), 1));
        let taken = (0..60_000u64).filter(|ms| half.try_take(t0 + ms * MS, 1)).count();
        assert_eq!(taken, 30, "0.5 per second");
        assert_eq!(
            Rate::bandwidth_per(12, Duration::from_secs(8)).units_in(Duration::from_secs(2)),
            3
        );
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
    fn rates_keep_their_burst_and_name_their_rate_per_second() {
        assert_eq!(gcd(12, 18), 6);
        assert_eq!(gcd(7, 1_000_000_000), 1);
        // Slow rates still get a burst of whole packets; fast ones 50 ms of their rate.
        assert_eq!(Rate::bandwidth(1_000).burst, DEFAULT_MIN_BURST);
        assert_eq!(DEFAULT_MIN_BURST, 16_384);
        assert_eq!(Rate::bandwidth(10_000_000).burst, 500_000);
        assert_eq!(Rate::bandwidth(1_000).with_burst(5).burst, 5);
        assert_eq!(Rate::bandwidth(1_000).per_sec(), 1_000);
        assert_eq!(Rate::new(90, Duration::from_secs(60), 1).per_sec(), 1);
        assert_eq!(Rate::new(3, Duration::from_secs(2), 1).units_in(Duration::from_secs(4)), 6);
    }

    #[test]
    fn a_bandwidth_block_is_empty_only_without_any_rate() {
        assert!(BandwidthSpec::default().is_empty());
        let one = BandwidthSpec { total: [None, Some(rate(1_000, 1_000))], ..Default::default() };
        assert!(!one.is_empty());
    }

    #[test]
    fn a_clients_buckets_are_idle_once_refilled_and_each_client_is_tracked() {
        let c = ClientBuckets([Some(Bucket::new(rate(1_000, 100))), None]);
        let t = SEC;
        assert!(c.is_idle(t));
        assert!(c.0[0].as_ref().unwrap().try_take(t, 50));
        assert!(!c.is_idle(t), "50 units owed for 50 ms");
        assert!(c.is_idle(t + 50 * MS));
        let bw = Bandwidth::new(BandwidthSpec {
            per_client: [Some(rate(1_000, 100)), None],
            ..BandwidthSpec::default()
        });
        for i in 1..=3 {
            bw.attach(&mut Shaper::default(), [127, 0, 0, i].into(), t);
        }
        assert_eq!(bw.tracked_clients(), 3);
    }

    /// Two sessions under one total of 1 MB/s with a burst (and so a quantum) of 16384 B:
    /// what one holds, the other waits for.
    fn two_under_a_total(cap: Option<u64>) -> (Shaper, Shaper) {
        let bw = Bandwidth::new(BandwidthSpec {
            total: [Some(rate(1_000_000, 16_384)), None],
            ..BandwidthSpec::default()
        });
        let mut a = Shaper::with_byte_cap(cap);
        bw.attach(&mut a, [127, 0, 0, 1].into(), 0);
        let mut b = Shaper::default();
        bw.attach(&mut b, [127, 0, 0, 2].into(), 0);
        (a, b)
    }

    #[test]
    fn a_read_that_finds_nothing_gives_its_turn_to_the_others() {
        let t = SEC;
        let (mut a, mut b) = two_under_a_total(None);
        assert_eq!(a.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(16_384));
        a.used(Direction::Up, 0, t);
        assert_eq!(b.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(16_384));
        // A turn that was used keeps the bucket's queue going: the next one waits.
        let (mut a, mut b) = two_under_a_total(None);
        assert_eq!(a.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(16_384));
        a.used(Direction::Up, 16_384, t);
        assert!(matches!(b.allowance(Direction::Up, t, 1 << 20), Allowance::Wait(_)));
        // An ask for nothing keeps the turn (nothing was looked for, so nothing is known).
        let (mut a, mut b) = two_under_a_total(None);
        assert_eq!(a.allowance(Direction::Up, t, 0), Allowance::Bytes(0));
        a.used(Direction::Up, 0, t);
        assert_eq!(b.allowance(Direction::Up, t, 1 << 20), Allowance::Wait(t + 16_384 * 1_000));
    }

    #[test]
    fn an_ended_session_gives_back_its_reservation() {
        let t = SEC;
        let (mut a, mut b) = two_under_a_total(None);
        assert_eq!(a.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(16_384));
        drop(a);
        assert_eq!(b.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(16_384));
    }

    #[test]
    fn a_capped_session_reserves_no_more_than_its_cap_leaves() {
        let t = SEC;
        let (mut a, mut b) = two_under_a_total(Some(10_000));
        // The unshaped direction reads 6000 of the 10000 first: the shaped one then reserves
        // 4000 (4 ms at 1 MB/s), not a whole quantum.
        assert_eq!(a.allowance(Direction::Down, t, 6_000), Allowance::Bytes(6_000));
        a.used(Direction::Down, 6_000, t);
        assert_eq!(a.allowance(Direction::Up, t, 1 << 20), Allowance::Bytes(4_000));
        a.used(Direction::Up, 4_000, t);
        assert_eq!(a.allowance(Direction::Up, t, 1 << 20), Allowance::Capped);
        assert_eq!(b.allowance(Direction::Up, t, 1 << 20), Allowance::Wait(t + 4 * MS));
    }

    #[test]
    fn pooled_shapers_are_reused_emptied_and_the_pool_is_bounded() {
        let bw = Bandwidth::new(BandwidthSpec {
            per_connection: [Some(rate(1_000_000, 16_384)), None],
            ..BandwidthSpec::default()
        });
        let spares = || SPARE.with(|s| s.borrow().len());
        let mut first = PooledShaper::with_byte_cap(Some(10));
        assert!(first.is_active());
        bw.attach(&mut first, [127, 0, 0, 1].into(), 0);
        let at: *const Shaper = &*first;
        let before = spares();
        drop(first);
        assert_eq!(spares(), before + 1);
        let again = PooledShaper::with_byte_cap(None);
        assert_eq!(&*again as *const Shaper, at, "the spare box is reused");
        assert!(!again.is_active(), "without the last session's cap or meters");
        drop(again);
        let many: Vec<PooledShaper> =
            (0..SPARE_SHAPERS + 10).map(|_| PooledShaper::with_byte_cap(None)).collect();
        drop(many);
        assert_eq!(spares(), SPARE_SHAPERS);
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
