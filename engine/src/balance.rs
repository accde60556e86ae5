//! Backend choice: a [`Pool`] of weighted backends, the algorithm that picks one for a new
//! session, and the order in which a session retries. Pure: no I/O, `now` is passed in.
//! Shared by all workers, so the only mutable state is atomic (a cursor, and the backends'
//! shared [`BackendState`]).
//!
//! Invariants:
//! - passive ejection never takes out a pool's last eligible backend;
//! - a backend is *eligible* when its admin state is enabled, it is up (healthy and not
//!   ejected) and below its `max_sessions` cap; only eligible backends are picked;
//! - backups are eligible only while no primary is (or, for a session's retry, while no
//!   primary it has not tried yet is);
//! - each connect attempt of one session goes to a backend it has not tried yet, chosen by
//!   the pool's algorithm among the eligible untried ones, at most [`Pool::attempts`] times;
//! - [`Algorithm::SourceHash`] depends only on the client IP and the configured backend
//!   list (Maglev table), so every instance with the same configuration maps a client to
//!   the same backend, and adding or removing one of N backends moves about 1/N of clients.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters::BackendState;
use crate::proxy;

/// At most this many backends are tried for one session before the client is closed.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;
/// Weight of a backend that names none.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 1000;
/// Consecutive connect failures after which a backend is ejected (0 turns ejection off).
pub const DEFAULT_EJECT_AFTER: u32 = 3;
/// How long an ejected backend gets no new sessions.
pub const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(10);
/// Size of the Maglev lookup table (a prime well above 100 times any sane pool size).
pub const MAGLEV_TABLE_SIZE: usize = 65_537;

/// How a pool picks the backend of a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Each session starts at the next backend.
    #[default]
    RoundRobin,
    /// Smooth weighted round-robin (nginx): spread in proportion to weights, interleaved.
    Weighted,
    /// The backend with the fewest open sessions relative to its weight.
    LeastSessions,
    /// Of two backends drawn at random, the one with fewer sessions relative to its weight.
    TwoChoices,
    /// Consistent hashing of the client IP (Maglev).
    SourceHash,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::LeastSessions,
        Algorithm::TwoChoices,
        Algorithm::SourceHash,
    ];

    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::Weighted => "weighted",
            Algorithm::LeastSessions => "least_sessions",
            Algorithm::TwoChoices => "two_choices",
            Algorithm::SourceHash => "source_hash",
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
            format!("unknown algorithm {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// Passive ejection: after `after` consecutive connect failures a backend is left out for
/// `cooldown`; the first session after that tries it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub after: u32,
    pub cooldown: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Self { after: DEFAULT_EJECT_AFTER, cooldown: DEFAULT_EJECT_FOR }
    }
}

/// How often a pool's backends are checked.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one check may take (connect, send, and reading the expected bytes).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive passed checks that bring a down backend up.
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Consecutive failed checks that take an up backend down.
pub const DEFAULT_HEALTH_FALL: u32 = 3;

/// Active health checks of a pool (run by the control plane, which sets each backend's
/// `healthy` flag): a TCP connect, then optionally `send` and reading until `expect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
            send: Vec::new(),
            expect: Vec::new(),
        }
    }
}

/// One backend server: its address, its shares and its shared state.
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    pub weight: u32,
    /// Most sessions open at once (0: no cap).
    pub max_sessions: u64,
    /// Used only while no primary backend is eligible.
    pub backup: bool,
}

impl Backend {
    /// A primary backend of weight 1 with fresh state.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_state(addr, Arc::new(BackendState::new(addr)))
    }

    /// A primary backend of weight 1 with the given state.
    pub fn with_state(addr: SocketAddr, state: Arc<BackendState>) -> Self {
        Self { addr, state, weight: DEFAULT_WEIGHT, max_sessions: 0, backup: false }
    }

    /// Whether a new session may go to this backend at `now`.
    pub fn eligible(&self, now: Instant) -> bool {
        self.state.accepts_sessions()
            && self.state.is_up(now)
            && (self.max_sessions == 0
                || self.state.active.load(Ordering::Relaxed) < self.max_sessions)
    }

    /// Open sessions per unit of weight, scaled to compare without division.
    fn load(&self) -> u128 {
        let active = self.state.active.load(Ordering::Relaxed) as u128;
        active * 1_000_000 / u128::from(self.weight.max(1))
    }
}

/// A set of interchangeable backends and how to choose among them.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Backend>,
    algorithm: Algorithm,
    pub ejection: Ejection,
    /// The PROXY protocol header sent to backends before any relayed byte, if any.
    pub send_proxy: Option<proxy::Version>,
    /// Active checks of the backends, if any (run by the control plane).
    pub health: Option<HealthCheck>,
    /// Where backend connections come from; `None`: the kernel picks.
    pub source: Option<crate::socket_options::Source>,
    cursor: AtomicUsize,
    attempts: usize,
    /// Smooth weighted round-robin order of the primaries, then of the backups (indices).
    schedule: [Vec<usize>; 2],
    /// Maglev tables of the primaries and of the backups (indices), for source hashing.
    maglev: [Vec<usize>; 2],
}

/// What one connect attempt needs to know to pick a backend.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    /// The session's own draw from [`Pool::start`].
    pub start: usize,
    /// Hash of the client IP ([`client_key`]).
    pub key: u64,
    /// Backends (indices) this session already tried.
    pub tried: &'a [usize],
    pub now: Instant,
}

/// The backends (indices) one session has tried, in order. A pool allows at most
/// [`DEFAULT_CONNECT_ATTEMPTS`] attempts, so they are kept inline: picking a backend
/// allocates nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tried {
    len: usize,
    at: [usize; DEFAULT_CONNECT_ATTEMPTS],
}

impl Tried {
    /// Records an attempt on backend `i`. [`Pool::pick`] never gives more than the
    /// attempts allow, so there is always room.
    pub fn push(&mut self, i: usize) {
        debug_assert!(self.len < self.at.len(), "more attempts than a pool allows");
        if let Some(slot) = self.at.get_mut(self.len) {
            *slot = i;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.at[..self.len]
    }

    pub fn last(&self) -> Option<usize> {
        self.as_slice().last().copied()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Pool {
    /// A round-robin pool.
    pub fn new(backends: Vec<Backend>) -> Self {
        Self::with_algorithm(backends, Algorithm::RoundRobin)
    }

    pub fn with_algorithm(backends: Vec<Backend>, algorithm: Algorithm) -> Self {
        let attempts = backends.len().min(DEFAULT_CONNECT_ATTEMPTS);
        let tier = |backup: bool| -> Vec<usize> {
            (0..backends.len()).filter(|&i| backends[i].backup == backup).collect()
        };
        let (primaries, backups) = (tier(false), tier(true));
        let schedule =
            [smooth_schedule(&backends, &primaries), smooth_schedule(&backends, &backups)];
        let maglev = if algorithm == Algorithm::SourceHash {
            [maglev_table(&backends, &primaries), maglev_table(&backends, &backups)]
        } else {
            [Vec::new(), Vec::new()]
        };
        Self {
            backends,
            algorithm,
            ejection: Ejection::default(),
            send_proxy: None,
            health: None,
            source: None,
            cursor: AtomicUsize::new(0),
            attempts,
            schedule,
            maglev,
        }
    }

    /// The same pool with another ejection policy.
    pub fn with_ejection(mut self, ejection: Ejection) -> Self {
        self.ejection = ejection;
        self
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// How many connects a session may try before giving up.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// A new session's draw: where its round-robin walk starts, and its random seed.
    pub fn start(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether any backend could take a session at `now`.
    pub fn any_eligible(&self, now: Instant) -> bool {
        self.backends.iter().any(|b| b.eligible(now))
    }

    /// The backend (index) for the next connect attempt of a session, or `None` when its
    /// attempts are used up or no untried backend is eligible. Backups are considered only
    /// while no untried primary is eligible.
    pub fn pick(&self, p: &Pick<'_>) -> Option<usize> {
        if p.tried.len() >= self.attempts {
            return None;
        }
        let open = |i: usize| self.backends[i].eligible(p.now) && !p.tried.contains(&i);
        // Backups step in when no primary is left to try: none is up, or this session has
        // already been refused by every one that is.
        let primary_open = (0..self.backends.len()).any(|i| !self.backends[i].backup && open(i));
        let tier = usize::from(!primary_open);
        // No allocation per session: the tier's candidates and the open ones among them are
        // walked as often as needed instead of collected (pools are small; a walk is cheap).
        let candidates =
            || (0..self.backends.len()).filter(move |&i| self.backends[i].backup == (tier == 1));
        let open_ones = || candidates().filter(|&i| open(i));
        let n_open = open_ones().count();
        if n_open == 0 {
            return None;
        }
        match self.algorithm {
            // Turns go round the backends that can take the session, so a backend that is
            // out does not hand its share to its neighbour alone.
            Algorithm::RoundRobin => open_ones().nth(p.start % n_open),
            Algorithm::Weighted => walk(&self.schedule[tier], p.start, open),
            Algorithm::LeastSessions => {
                // From the session's own place in the tier, so ties spread evenly.
                let from = p.start % candidates().count();
                candidates()
                    .skip(from)
                    .chain(candidates().take(from))
                    .filter(|&i| open(i))
                    .min_by_key(|&i| self.backends[i].load())
            }
            Algorithm::TwoChoices => {
                let seed = mix(p.start as u64 ^ 0x9e37_79b9_7f4a_7c15);
                let a = open_ones().nth((seed % n_open as u64) as usize)?;
                let b = open_ones().nth((mix(seed) % n_open as u64) as usize)?;
                let w = |i: usize| (self.backends[i].load(), self.backends[i].weight);
                Some(if w(b).0 < w(a).0 { b } else { a })
            }
            Algorithm::SourceHash => {
                let table = &self.maglev[tier];
                walk(table, (p.key % table.len().max(1) as u64) as usize, open)
            }
        }
    }

    /// Counts a failed connect to backend `i`; returns true when it was ejected by it. The
    /// last eligible backend of a pool is never ejected: that would refuse every session,
    /// while trying it costs only a connect.
    pub fn connect_failed(&self, i: usize, now: Instant) -> bool {
        let Some(b) = self.backends.get(i) else { return false };
        let others = self.backends.iter().enumerate().any(|(j, o)| j != i && o.eligible(now));
        b.state.connect_failed(self.ejection.after, self.ejection.cooldown, others, now)
    }
}

/// The first entry of `order`, from `from` on (wrapping), that `open` accepts.
fn walk(order: &[usize], from: usize, open: impl Fn(usize) -> bool) -> Option<usize> {
    let n = order.len();
    (0..n).map(|k| order[from.wrapping_add(k) % n]).find(|&i| open(i))
}

/// The smooth weighted round-robin sequence over `members` (one period: each backend
/// appears `weight / gcd` times, interleaved as nginx does).
fn smooth_schedule(backends: &[Backend], members: &[usize]) -> Vec<usize> {
    let g = members.iter().map(|&i| backends[i].weight.max(1)).fold(0, gcd).max(1);
    let weights: Vec<i64> =
        members.iter().map(|&i| i64::from(backends[i].weight.max(1) / g)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; members.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let Some((best, _)) = current.iter().enumerate().max_by_key(|&(k, &c)| (c, -(k as i64)))
        else {
            break;
        };
        current[best] -= total;
        order.push(members[best]);
    }
    order
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The Maglev lookup table over `members`: each slot names a backend; a backend of weight
/// w claims w slots per round. Depends only on the backends' addresses, weights and order.
fn maglev_table(backends: &[Backend], members: &[usize]) -> Vec<usize> {
    if members.is_empty() {
        return Vec::new();
    }
    let m = MAGLEV_TABLE_SIZE as u64;
    let perms: Vec<(u64, u64)> = members.iter().map(|&i| maglev_walk(backends[i].addr)).collect();
    let mut next = vec![0u64; members.len()];
    let mut table = vec![usize::MAX; MAGLEV_TABLE_SIZE];
    let mut filled = 0;
    'fill: loop {
        for (k, &(offset, skip)) in perms.iter().enumerate() {
            for _ in 0..backends[members[k]].weight.max(1) {
                let mut slot = ((offset + next[k] * skip) % m) as usize;
                while table[slot] != usize::MAX {
                    next[k] += 1;
                    slot = ((offset + next[k] * skip) % m) as usize;
                }
                table[slot] = members[k];
                next[k] += 1;
                filled += 1;
                if filled == MAGLEV_TABLE_SIZE {
                    break 'fill;
                }
            }
        }
    }
    table
}

/// Where the backend at `addr` starts in the Maglev table and its step: any slot, and a
/// step from 1 to the table's size less one, which (the size being prime) walks every slot.
fn maglev_walk(addr: SocketAddr) -> (u64, u64) {
    let m = MAGLEV_TABLE_SIZE as u64;
    let h = hash_addr(addr);
    (h % m, mix(h) % (m - 1) + 1)
}

/// A stable 64-bit hash of a client's IP address (the port is left out, so every
/// connection of one client maps alike): the key of [`Algorithm::SourceHash`].
pub fn client_key(client: SocketAddr) -> u64 {
    match client.ip() {
        IpAddr::V4(ip) => fnv1a(&ip.octets()),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => fnv1a(&v4.octets()),
            None => fnv1a(&ip.octets()),
        },
    }
}

fn hash_addr(addr: SocketAddr) -> u64 {
    let mut bytes = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    fnv1a(&bytes)
}

/// FNV-1a, finished with a mixer: stable across builds, platforms and instances.
fn fnv1a(bytes: &[u8]) -> u64 {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(h)
}

/// The splitmix64 finalizer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::AdminState;

    fn backend(i: u16, weight: u32) -> Backend {
        Backend { weight, ..Backend::new(([127, 0, 0, 1], 9000 + i).into()) }
    }

    fn pool(n: u16) -> Pool {
        Pool::new((0..n).map(|i| backend(i, 1)).collect())
    }

    fn first(pool: &Pool, key: u64, now: Instant) -> Option<usize> {
        pool.pick(&Pick { start: pool.start(), key, tried: &[], now })
    }

    fn counts(pool: &Pool, picks: usize) -> Vec<usize> {
        let now = Instant::now();
        let mut counts = vec![0; pool.backends().len()];
        for k in 0..picks {
            counts[first(pool, mix(k as u64), now).unwrap()] += 1;
        }
        counts
    }

    /// Each count within `tolerance` (a fraction) of its share of the weights.
    fn assert_shares(counts: &[usize], weights: &[u32], tolerance: f64) {
        let total: usize = counts.iter().sum();
        let wsum: u32 = weights.iter().sum();
        for (c, &w) in counts.iter().zip(weights) {
            let expected = total as f64 * f64::from(w) / f64::from(wsum);
            let off = (*c as f64 - expected).abs() / expected;
            assert!(off <= tolerance, "counts {counts:?} vs weights {weights:?}");
        }
    }

    /// The names the README documents for `balance`, written out.
    #[test]
    fn algorithms_are_named_as_documented() {
        let documented = [
            (Algorithm::RoundRobin, "round_robin"),
            (Algorithm::Weighted, "weighted"),
            (Algorithm::LeastSessions, "least_sessions"),
            (Algorithm::TwoChoices, "two_choices"),
            (Algorithm::SourceHash, "source_hash"),
        ];
        for (algorithm, name) in documented {
            assert_eq!(algorithm.as_str(), name);
            assert_eq!(name.parse::<Algorithm>(), Ok(algorithm));
        }
        let e = "random".parse::<Algorithm>().unwrap_err();
        assert!(e.contains("\"random\"") && e.contains("round_robin, weighted"), "{e}");
    }

    #[test]
    fn a_pool_tells_its_algorithm_attempts_and_whether_any_backend_can_take_a_session() {
        let p =
            Pool::with_algorithm((0..5).map(|i| backend(i, 1)).collect(), Algorithm::TwoChoices);
        assert_eq!(p.algorithm(), Algorithm::TwoChoices);
        assert_eq!(p.attempts(), DEFAULT_CONNECT_ATTEMPTS);
        assert_eq!(pool(2).attempts(), 2, "no more attempts than backends");
        let now = Instant::now();
        assert!(p.any_eligible(now));
        for b in p.backends() {
            b.state.set_admin(AdminState::Disabled);
        }
        assert!(!p.any_eligible(now));
        p.backends()[3].state.set_admin(AdminState::Enabled);
        assert!(p.any_eligible(now));
    }

    #[test]
    fn tried_backends_are_counted() {
        let mut tried = Tried::default();
        assert!(tried.is_empty());
        assert_eq!(tried.as_slice(), &[] as &[usize]);
        tried.push(4);
        tried.push(1);
        assert!(!tried.is_empty());
        assert_eq!((tried.len(), tried.as_slice(), tried.last()), (2, &[4, 1][..], Some(1)));
    }

    /// Least sessions breaks ties from each session's own place, so sessions arriving at
    /// idle backends go round them rather than all to the first.
    #[test]
    fn least_sessions_ties_go_round_the_backends() {
        let p =
            Pool::with_algorithm((0..3).map(|i| backend(i, 1)).collect(), Algorithm::LeastSessions);
        let now = Instant::now();
        let picks: Vec<usize> = (0..6).map(|_| first(&p, 0, now).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    /// The weighted schedule is one period of the weights in lowest terms: weights 200, 400
    /// and 600 make a schedule of 6 entries, not 1,200.
    #[test]
    fn the_weighted_schedule_is_one_period_in_lowest_terms() {
        let p = Pool::with_algorithm(
            [200, 400, 600].iter().enumerate().map(|(i, &w)| backend(i as u16, w)).collect(),
            Algorithm::Weighted,
        );
        // nginx's smooth weighted round-robin over 1:2:3 by hand (current weights before
        // each pick; the first of equals wins): [1,2,3] -> 2, [2,4,0] -> 1, [3,0,3] -> 0,
        // [-2,2,6] -> 2, [-1,4,3] -> 1, [0,0,6] -> 2.
        assert_eq!(p.schedule[0], [2, 1, 0, 2, 1, 2]);
        assert_eq!((gcd(12, 18), gcd(7, 5), gcd(0, 4)), (6, 1, 4));
    }

    /// A backend whose address hashes to the smallest Maglev skip (1) still gets its
    /// share of the table: skips run from 1 to the table size less one, never 0 (a skip
    /// of 0 would never leave the backend's first slot).
    #[test]
    fn a_maglev_table_fills_whatever_the_backends_addresses_hash_to() {
        let m = MAGLEV_TABLE_SIZE as u64;
        // Every address's walk starts on a slot and steps by 1 to m - 1 (a step of 0, or of
        // m, would stay on one slot): checked over 262,144 addresses, where a rule off by
        // one in 65,537 would show about four times.
        for a in 0..1u32 << 18 {
            let (offset, skip) =
                maglev_walk((std::net::Ipv4Addr::from(0x0a00_0000 | a), 80).into());
            assert!(offset < m && (1..m).contains(&skip), "{a}: {offset} {skip}");
        }
        let port = (1..=u16::MAX)
            .find(|&p| mix(hash_addr(([10, 0, 0, 1], p).into())) % (m - 1) == 0)
            .expect("a port whose address makes the smallest skip");
        let special = Backend::new(([10, 0, 0, 1], port).into());
        let p = Pool::with_algorithm(vec![special, backend(1, 1)], Algorithm::SourceHash);
        let table = &p.maglev[0];
        assert_eq!(table.len(), MAGLEV_TABLE_SIZE);
        let mine = table.iter().filter(|&&i| i == 0).count();
        assert!(mine.abs_diff(MAGLEV_TABLE_SIZE / 2) <= 1, "{mine} slots of {MAGLEV_TABLE_SIZE}");
    }

    /// Source hashing must map a client alike on every instance of a fleet and across
    /// builds: `mix` is splitmix64's finalizer, checked against the published sequence of
    /// splitmix64 from seed 0.
    #[test]
    fn the_hash_mixer_is_splitmix64() {
        let golden = 0x9e37_79b9_7f4a_7c15u64;
        assert_eq!(mix(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix(golden), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix(golden.wrapping_mul(2)), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn round_robin_spreads_sessions_evenly() {
        assert_eq!(counts(&pool(3), 3000), vec![1000, 1000, 1000]);
    }

    #[test]
    fn smooth_weighted_round_robin_honours_weights_and_interleaves() {
        let weights = [5, 1, 1];
        let p = Pool::with_algorithm(
            weights.iter().enumerate().map(|(i, &w)| backend(i as u16, w)).collect(),
            Algorithm::Weighted,
        );
        // Smooth weighted round-robin as nginx documents it (ngx_http_upstream_round_robin,
        // weights 5:1:1 give "a a b a c a a"), seen through the picks of successive
        // sessions, twice round.
        let now = Instant::now();
        let picks: Vec<usize> = (0..14).map(|_| first(&p, 0, now).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
        let weights = [3, 2, 1, 4];
        let p = Pool::with_algorithm(
            weights.iter().enumerate().map(|(i, &w)| backend(i as u16, w)).collect(),
            Algorithm::Weighted,
        );
        let c = counts(&p, 100_000);
        println!("weighted 3:2:1:4 over 100000 picks: {c:?}");
        assert_shares(&c, &weights, 0.01);
    }

    #[test]
    fn least_sessions_goes_to_the_least_loaded_relative_to_weight() {
        let p = Pool::with_algorithm(vec![backend(0, 1), backend(1, 2)], Algorithm::LeastSessions);
        p.backends()[0].state.active.store(3, Ordering::Relaxed);
        p.backends()[1].state.active.store(5, Ordering::Relaxed);
        assert_eq!(first(&p, 0, Instant::now()), Some(1));
        p.backends()[1].state.active.store(7, Ordering::Relaxed);
        assert_eq!(first(&p, 0, Instant::now()), Some(0));
        // Picks that open sessions converge to the weights.
        let now = Instant::now();
        for b in p.backends() {
            b.state.active.store(0, Ordering::Relaxed);
        }
        for _ in 0..30_000 {
            let i = first(&p, 0, now).unwrap();
            p.backends()[i].state.active.fetch_add(1, Ordering::Relaxed);
        }
        let active: Vec<usize> =
            p.backends().iter().map(|b| b.state.active.load(Ordering::Relaxed) as usize).collect();
        assert_shares(&active, &[1, 2], 0.001);
    }

    #[test]
    fn two_choices_spreads_evenly_when_load_is_equal_and_avoids_the_loaded_one() {
        let p =
            Pool::with_algorithm((0..4).map(|i| backend(i, 1)).collect(), Algorithm::TwoChoices);
        assert_shares(&counts(&p, 100_000), &[1, 1, 1, 1], 0.03);
        p.backends()[2].state.active.store(1000, Ordering::Relaxed);
        let c = counts(&p, 10_000);
        // Backend 2 wins only when both draws land on it: about 1/16 of picks.
        assert!(c[2] < 1000 && c[2] > 300, "{c:?}");
    }

    #[test]
    fn source_hash_is_stable_weighted_and_moves_about_one_nth_of_keys() {
        let mk = |n: u16| {
            Pool::with_algorithm((0..n).map(|i| backend(i, 1)).collect(), Algorithm::SourceHash)
        };
        let (four, five, again) = (mk(4), mk(5), mk(4));
        let now = Instant::now();
        let keys: Vec<u64> =
            (0..100_000u32).map(|i| client_key(SocketAddr::from((i.to_be_bytes(), 1)))).collect();
        let addr = |p: &Pool, k: u64| p.backends()[first(p, k, now).unwrap()].addr;
        let (mut moved, mut elsewhere) = (0, 0);
        let mut c = vec![0; 5];
        for &k in &keys {
            assert_eq!(addr(&four, k), addr(&again, k), "same config, same backend");
            let (a, b) = (addr(&four, k), addr(&five, k));
            if a != b {
                moved += 1;
                elsewhere += usize::from(b.port() != 9004);
            }
            c[(b.port() - 9000) as usize] += 1;
        }
        let share = moved as f64 / keys.len() as f64;
        println!("4 -> 5 backends: {share:.4} of keys moved, {elsewhere} between old backends");
        assert!((0.17..=0.25).contains(&share), "moved {share}");
        // Maglev trades perfect minimal disruption for balance: a few keys shuffle among
        // the old backends too.
        assert!(elsewhere * 50 < keys.len(), "{elsewhere} keys moved between old backends");
        println!("source hash, 5 backends, 100000 client IPs: {c:?}");
        assert_shares(&c, &[1; 5], 0.05);
        let weighted =
            Pool::with_algorithm(vec![backend(0, 3), backend(1, 1)], Algorithm::SourceHash);
        let mut c = vec![0; 2];
        for &k in &keys {
            c[first(&weighted, k, now).unwrap()] += 1;
        }
        assert_shares(&c, &[3, 1], 0.05);
    }

    #[test]
    fn source_hash_moves_only_the_removed_backends_keys() {
        let all =
            Pool::with_algorithm((0..5).map(|i| backend(i, 1)).collect(), Algorithm::SourceHash);
        let fewer = Pool::with_algorithm(
            [0, 1, 3, 4].into_iter().map(|i| backend(i, 1)).collect(),
            Algorithm::SourceHash,
        );
        let now = Instant::now();
        let (mut moved, mut elsewhere) = (0, 0);
        for i in 0..50_000u32 {
            let k = client_key(SocketAddr::from((i.to_be_bytes(), 7)));
            let a = all.backends()[first(&all, k, now).unwrap()].addr;
            let b = fewer.backends()[first(&fewer, k, now).unwrap()].addr;
            if a != b {
                moved += 1;
                elsewhere += u32::from(a.port() != 9002);
            }
        }
        println!("5 -> 4 backends: {moved} of 50000 keys moved, {elsewhere} of survivors");
        assert!((0.17..=0.25).contains(&(f64::from(moved) / 50_000.0)), "{moved}");
        assert!(elsewhere * 50 < 50_000, "{elsewhere} keys of surviving backends moved");
    }

    #[test]
    fn retries_try_untried_backends_and_stop_after_the_attempts() {
        let p = pool(5);
        let now = Instant::now();
        let start = p.start();
        let mut tried = Tried::default();
        while let Some(i) = p.pick(&Pick { start, key: 0, tried: tried.as_slice(), now }) {
            tried.push(i);
        }
        assert_eq!(tried.as_slice(), [0, 1, 2]);
        assert_eq!(tried.last(), Some(2));
        let small = pool(2);
        let mut tried = Tried::default();
        while let Some(i) = small.pick(&Pick { start: 1, key: 0, tried: tried.as_slice(), now }) {
            tried.push(i);
        }
        assert_eq!(tried.as_slice(), [1, 0]);
        assert!(Pool::new(Vec::new()).pick(&Pick { start: 0, key: 0, tried: &[], now }).is_none());
    }

    #[test]
    fn drained_and_disabled_backends_get_no_new_sessions() {
        let p = pool(3);
        p.backends()[0].state.set_admin(AdminState::Draining);
        p.backends()[2].state.set_admin(AdminState::Disabled);
        let now = Instant::now();
        for _ in 0..10 {
            let start = p.start();
            assert_eq!(p.pick(&Pick { start, key: 0, tried: &[], now }), Some(1));
            assert_eq!(p.pick(&Pick { start, key: 0, tried: &[1], now }), None);
        }
        p.backends()[1].state.set_admin(AdminState::Disabled);
        assert!(first(&p, 0, now).is_none());
    }

    #[test]
    fn backups_serve_only_while_no_primary_is_up() {
        let mut backends: Vec<Backend> = (0..3).map(|i| backend(i, 1)).collect();
        backends[2].backup = true;
        let p = Pool::new(backends);
        let now = Instant::now();
        assert!(counts(&p, 100).iter().enumerate().all(|(i, &c)| (i == 2) == (c == 0)));
        p.backends()[0].state.set_healthy(false);
        assert_eq!(counts(&p, 10), vec![0, 10, 0]);
        p.backends()[1].state.set_healthy(false);
        assert_eq!(counts(&p, 10), vec![0, 0, 10]);
        p.backends()[2].state.set_healthy(false);
        assert!(first(&p, 0, now).is_none(), "every backend down: no backend");
        p.backends()[0].state.set_healthy(true);
        assert_eq!(counts(&p, 10), vec![10, 0, 0]);
        // The only primary refused this session: its retry goes to the backup.
        p.backends()[2].state.set_healthy(true);
        assert_eq!(p.pick(&Pick { start: 0, key: 0, tried: &[0], now }), Some(2));
    }

    #[test]
    fn max_sessions_caps_a_backend() {
        let mut backends: Vec<Backend> = (0..2).map(|i| backend(i, 1)).collect();
        backends[0].max_sessions = 2;
        let p = Pool::new(backends);
        p.backends()[0].state.active.store(2, Ordering::Relaxed);
        assert_eq!(counts(&p, 10), vec![0, 10]);
        p.backends()[0].state.active.store(1, Ordering::Relaxed);
        assert_eq!(counts(&p, 10), vec![5, 5]);
    }

    #[test]
    fn consecutive_connect_failures_eject_for_the_cooldown() {
        let ejection = Ejection { after: 2, cooldown: Duration::from_secs(10) };
        let p = pool(2).with_ejection(ejection);
        let t0 = Instant::now();
        assert!(!p.connect_failed(0, t0));
        p.backends()[0].state.connect_succeeded();
        assert!(!p.connect_failed(0, t0), "a success resets the streak");
        assert!(p.connect_failed(0, t0));
        assert!(!p.backends()[0].eligible(t0 + Duration::from_secs(9)));
        assert!(p.backends()[0].eligible(t0 + Duration::from_secs(11)));
        // Still failing after the cool-down: ejected again at once.
        assert!(p.connect_failed(0, t0 + Duration::from_secs(11)));
        let off = pool(2).with_ejection(Ejection { after: 0, ..ejection });
        for _ in 0..10 {
            assert!(!off.connect_failed(0, t0));
        }
        assert!(off.backends()[0].eligible(t0));
        // The last backend that can serve is never ejected.
        let p = pool(2).with_ejection(ejection);
        p.backends()[1].state.set_healthy(false);
        for _ in 0..10 {
            assert!(!p.connect_failed(0, t0));
        }
        assert!(p.backends()[0].eligible(t0));
    }
}
