//! The session core driven by a scripted fake driver: each test delivers events with a
//! simulated clock and checks the actions the core hands out, so every transition of
//! docs/LIFECYCLE.md runs in microseconds, without a socket.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use super::*;
use crate::acl::{Action as Verdict, NamePattern, Rule, RuleSet};
use crate::admission::{self, SessionCap};
use crate::balance::{Backend, Pool};
use crate::limits::LimitSpec;
use crate::proxy::Version;
use crate::record::RecordPolicy;
use crate::shape::{Bandwidth, BandwidthSpec, Rate};
use crate::sni::tests::{hello, server_names};
use crate::tables::{Rules, Service, SniUnreadable, Tables, Timeouts};

const LISTEN: &str = "127.0.0.1:80";
const CLIENT: &str = "127.0.0.2:5000";
const B1: &str = "127.0.0.1:9001";
const B2: &str = "127.0.0.1:9002";
const B3: &str = "127.0.0.1:9003";

use Direction::{Down, Up};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        idle: Duration::from_secs(60),
        fin: Duration::from_secs(10),
        sni: Duration::from_secs(2),
        max_duration: None,
        proxy: Duration::from_secs(4),
    }
}

/// A service on [`LISTEN`] forwarding to `backends`, shaped by `edit`.
fn service(backends: &[&str], edit: impl FnOnce(&mut Service)) -> Service {
    let pool = Pool::new(backends.iter().map(|b| Backend::new(addr(b))).collect());
    let mut s = Service::new("web", vec![addr(LISTEN)], pool, timeouts());
    edit(&mut s);
    s
}

/// A fake driver: it owns one session, a clock, and what the session asked for.
struct Sim {
    s: Session,
    now: Instant,
    cap: Arc<SessionCap>,
    tables: Arc<Tables>,
    stats: Arc<WorkerStats>,
}

impl Sim {
    fn start(tables: Tables) -> Sim {
        Sim::with_client(tables, addr(CLIENT))
    }

    fn with_client(tables: Tables, client: SocketAddr) -> Sim {
        let swap = ArcSwap::from_pointee(tables);
        let cap = Arc::new(SessionCap::new(None));
        let admitted = admission::admit(&swap, &cap, addr(LISTEN)).expect("admitted");
        let tables = swap.load_full();
        let stats = Arc::new(WorkerStats::default());
        let now = Instant::now();
        let s =
            Session::new(admitted, client, addr(LISTEN), 3, stats.clone(), now, SystemTime::now());
        Sim { s, now, cap, tables, stats }
    }

    /// Every action the session hands out until it waits.
    fn drain(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.s.next_action(self.now) {
            out.push(a);
            assert!(out.len() < 1000, "the session never waits: {out:?}");
        }
        out
    }

    fn expect(&mut self, want: &[Action]) {
        assert_eq!(self.drain(), want);
    }

    /// Moves the clock on and delivers the timer.
    fn wait(&mut self, d: Duration) {
        self.now += d;
        self.s.on_timer(self.now);
    }

    /// Moves the clock to the session's deadline and delivers the timer.
    fn until_deadline(&mut self) {
        self.now = self.s.deadline_at();
        self.s.on_timer(self.now);
    }

    fn connected(&mut self) {
        self.s.on_connected(Ok(()), self.now);
    }

    fn read(&mut self, dir: Direction, bytes: usize, eof: bool) {
        let drained = !eof;
        self.s.on_read(dir, Ok(Readout { bytes, eof, drained }), self.now);
    }

    fn written(&mut self, dir: Direction, bytes: usize) {
        self.s.on_written(dir, Ok(Written { bytes, blocked: false }), self.now);
    }

    fn service(&self) -> &Service {
        &self.tables.services()[0]
    }

    /// A plain session, connected to its first backend, its opening reads handed out.
    fn relaying(tables: Tables) -> Sim {
        let mut sim = Sim::start(tables);
        sim.expect(&[Action::Connect]);
        sim.connected();
        sim.expect(&[read(Up), Action::AwaitReadable(Side::Backend)]);
        sim
    }
}

fn read(dir: Direction) -> Action {
    Action::Read { dir, max: usize::MAX, to_end: false }
}

fn one(backends: &[&str]) -> Tables {
    Tables::new(1, vec![service(backends, |_| {})])
}

fn close(reason: CloseReason) -> Action {
    Action::Close { reason, abort: reason.aborts() }
}

// ---- accept -> decide -> connect ----

#[test]
fn a_session_without_peeking_is_decided_at_once_and_connects_to_its_backend() {
    let mut sim = Sim::start(one(&[B1]));
    assert_eq!(sim.stats.accepted.load(Ordering::Relaxed), 1);
    sim.expect(&[Action::Connect]);
    assert_eq!(sim.s.backend_addr(), Some(addr(B1)));
    assert!(sim.s.is_connecting());
}

#[test]
fn a_refused_connect_moves_to_the_next_backend_until_none_is_left() {
    let mut sim = Sim::start(one(&[B1, B2]));
    sim.expect(&[Action::Connect]);
    let first = sim.s.backend_addr().unwrap();
    sim.s.on_connected(Err(ConnectError::Refused), sim.now);
    sim.expect(&[Action::Connect]);
    let second = sim.s.backend_addr().unwrap();
    assert_ne!(first, second, "the next attempt goes to a backend not tried");
    sim.s.on_connected(Err(ConnectError::Refused), sim.now);
    sim.expect(&[close(CloseReason::ConnectRefused)]);
    assert_eq!(sim.stats.connect_errors.load(Ordering::Relaxed), 2);
    assert_eq!(sim.service().counters.unserved.load(Ordering::Relaxed), 1);
}

#[test]
fn a_connect_timeout_aborts_the_attempt_and_its_outcome_moves_to_the_next_backend() {
    let mut sim = Sim::start(one(&[B1, B2]));
    sim.expect(&[Action::Connect]);
    sim.wait(Duration::from_secs(2));
    sim.expect(&[]);
    sim.wait(Duration::from_secs(1));
    sim.expect(&[Action::AbortConnect]);
    // The abort is confirmed by the connect's outcome (the same on every driver).
    sim.s.on_connected(Err(ConnectError::TimedOut), sim.now);
    sim.expect(&[Action::Connect]);
    assert_eq!(sim.s.backend_addr(), Some(addr(B2)));
    // The second attempt has a timeout of its own, from its start.
    assert_eq!(sim.s.deadline_at(), sim.now + Duration::from_secs(3));
    sim.until_deadline();
    sim.expect(&[Action::AbortConnect]);
    // An abort the driver reports as a cancellation is a timeout too.
    sim.s.on_connected(Err(ConnectError::Refused), sim.now);
    sim.expect(&[close(CloseReason::ConnectTimeout)]);
}

#[test]
fn a_connect_made_just_before_its_abort_is_used() {
    let mut sim = Sim::start(one(&[B1, B2]));
    sim.expect(&[Action::Connect]);
    sim.until_deadline();
    sim.expect(&[Action::AbortConnect]);
    sim.connected();
    assert_eq!(sim.s.phase(), Phase::Relaying);
    assert_eq!(sim.s.backend_addr(), Some(addr(B1)));
}

#[test]
fn an_abort_that_is_never_confirmed_ends_the_session() {
    let mut sim = Sim::start(one(&[B1]));
    sim.expect(&[Action::Connect]);
    sim.until_deadline();
    sim.expect(&[Action::AbortConnect]);
    sim.until_deadline();
    sim.expect(&[close(CloseReason::ConnectTimeout)]);
}

#[test]
fn a_pool_with_no_backend_up_closes_the_client_gracefully_as_no_backend() {
    let tables = one(&[B1]);
    tables.services()[0].pool.backends()[0].state.set_healthy(false);
    let mut sim = Sim::start(tables);
    sim.expect(&[close(CloseReason::NoBackend)]);
    assert_eq!(sim.service().counters.no_backend.load(Ordering::Relaxed), 1);
}

#[test]
fn no_socket_for_the_backend_closes_the_client_gracefully() {
    let mut sim = Sim::start(one(&[B1, B2]));
    sim.expect(&[Action::Connect]);
    sim.s.on_connected(Err(ConnectError::NoSocket), sim.now);
    sim.expect(&[close(CloseReason::NoSocket)]);
    assert_eq!(sim.stats.backend_socket_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn a_backend_that_accepts_then_resets_before_the_outcome_is_a_backend_reset() {
    let mut sim = Sim::start(one(&[B1, B2]));
    sim.expect(&[Action::Connect]);
    sim.s.on_connected(Err(ConnectError::Reset), sim.now);
    sim.expect(&[close(CloseReason::BackendRst)]);
}

// ---- the firewall and the limits ----

fn with_rules(rules: Vec<Rule>, edit: impl FnOnce(&mut Service)) -> Tables {
    let s = service(&[B1], |s| {
        s.rules = Rules::new(RuleSet::compile(rules));
        edit(s);
    });
    Tables::new(1, vec![s])
}

#[test]
fn a_denied_session_closes_without_a_byte_and_is_recorded_as_a_denial() {
    let mut sim =
        Sim::start(with_rules(vec![Rule::new("no", Verdict::Deny { reset: false })], |_| {}));
    sim.expect(&[Action::Close { reason: CloseReason::Denied, abort: false }]);
    let record = sim.s.final_record(sim.now);
    assert_eq!(record.kind, RecordKind::Deny);
    assert_eq!(record.verdict, crate::record::Verdict::Deny);
    assert_eq!(record.rule.as_deref(), Some("no"));
    assert_eq!(sim.service().counters.denied.load(Ordering::Relaxed), 1);
    assert_eq!(sim.cap.active(), 0, "a refused session gives its place back");
}

#[test]
fn a_deny_rule_with_reset_closes_abortively() {
    let mut sim =
        Sim::start(with_rules(vec![Rule::new("no", Verdict::Deny { reset: true })], |_| {}));
    sim.expect(&[Action::Close { reason: CloseReason::Denied, abort: true }]);
}

#[test]
fn a_session_over_a_limit_is_refused_as_limit() {
    let tables = with_rules(Vec::new(), |s| {
        s.limits = LimitSpec { per_client: Some(1), reset: true, ..LimitSpec::default() };
    });
    let swap = Arc::new(tables);
    let first = Sim::start(clone_tables(&swap));
    let mut second = Sim::start(clone_tables(&swap));
    second.expect(&[Action::Close { reason: CloseReason::Limit, abort: true }]);
    drop(first);
}

/// Tables that share `t`'s services (and so their limit state and counters).
fn clone_tables(t: &Arc<Tables>) -> Tables {
    let services = t
        .services()
        .iter()
        .map(|s| Service {
            name: s.name.clone(),
            listen: s.listen.clone(),
            protocol: s.protocol,
            udp_idle_timeout: s.udp_idle_timeout,
            udp_upstream: s.udp_upstream.clone(),
            pool: Pool::new(s.pool.backends().to_vec()),
            timeouts: s.timeouts,
            rules: Rules::default(),
            default: s.default,
            default_hits: s.default_hits.clone(),
            counters: s.counters.clone(),
            limits: s.limits,
            limit_state: s.limit_state.clone(),
            bandwidth: s.bandwidth.clone(),
            accept_proxy: s.accept_proxy.clone(),
            capture: s.capture,
            max_sessions: s.max_sessions,
            sni_unreadable: s.sni_unreadable,
            client_socket: s.client_socket,
            backend_socket: s.backend_socket,
            backlog: s.backlog,
        })
        .collect();
    Tables::new(t.version, services)
}

// ---- peeking: SNI ----

fn sni_tables_rules() -> Vec<Rule> {
    let mut deny = Rule::new("no-evil", Verdict::Deny { reset: false });
    deny.sni = vec![NamePattern::parse("evil.example").unwrap()];
    vec![deny]
}

fn sni_tables() -> Tables {
    with_rules(sni_tables_rules(), |_| {})
}

fn hello_for(name: &str) -> Vec<u8> {
    hello(Some(&[server_names(&[(0, name.as_bytes())])]))
}

#[test]
fn an_sni_rule_makes_the_session_wait_for_the_hello_then_decides_on_its_name() {
    let mut sim = Sim::start(sni_tables());
    assert!(matches!(sim.s.phase(), Phase::Peeking { proxy: false, .. }));
    sim.expect(&[Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Client);
    sim.expect(&[Action::Peek { max: crate::sni::MAX_CLIENT_HELLO }]);
    let hello = hello_for("evil.example");
    // A part of the hello: wait until the whole record is there (SO_RCVLOWAT).
    sim.s.on_peeked(Ok(&hello[..10]), sim.now);
    sim.expect(&[Action::Lowat(hello.len()), Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Client);
    sim.expect(&[Action::Peek { max: crate::sni::MAX_CLIENT_HELLO }]);
    sim.s.on_peeked(Ok(&hello), sim.now);
    // The watermark goes back to 1 before anything else; then the verdict.
    sim.expect(&[Action::Lowat(1), close(CloseReason::Denied)]);
}

#[test]
fn an_allowed_name_connects() {
    let mut sim = Sim::start(sni_tables());
    sim.expect(&[Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Client);
    sim.drain();
    sim.s.on_peeked(Ok(&hello_for("good.example")), sim.now);
    sim.expect(&[Action::Connect]);
}

/// Routing by name only (no rule denies by it): what cannot be read is judged nameless.
fn sni_routing_tables(edit: impl FnOnce(&mut Service)) -> Tables {
    let mut route = Rule::new("to-b2", Verdict::Allow { pool: None });
    route.sni = vec![NamePattern::parse("b.example").unwrap()];
    with_rules(vec![route], edit)
}

/// The record of a session closed as the service's `sni_unreadable = "deny"` says.
fn assert_denied_as_unreadable(sim: &mut Sim) {
    let closed = sim.drain();
    assert_eq!(closed.last(), Some(&close(CloseReason::Denied)), "{closed:?}");
    let record = sim.s.final_record(sim.now);
    assert_eq!(record.verdict, crate::record::Verdict::Deny);
    assert_eq!(record.rule.as_deref(), Some(crate::tables::SNI_UNREADABLE_RULE));
    assert_eq!(sim.service().counters.denied.load(Ordering::Relaxed), 1);
}

/// Issue 26 item 6: a hello that paused past the SNI timeout was judged without a name,
/// and reached the backend with the name a rule denies.
#[test]
fn a_hello_that_does_not_come_in_time_is_denied_where_a_rule_denies_by_name() {
    let mut sim = Sim::start(sni_tables());
    sim.drain();
    sim.s.on_readable(Side::Client);
    sim.drain();
    let hello = hello_for("evil.example");
    sim.s.on_peeked(Ok(&hello[..20]), sim.now);
    sim.drain();
    assert_eq!(sim.s.deadline_at(), sim.now + Duration::from_secs(2));
    sim.until_deadline();
    assert_denied_as_unreadable(&mut sim);
}

#[test]
fn a_hello_that_does_not_come_in_time_is_judged_without_a_name_where_names_only_route() {
    let mut sim = Sim::start(sni_routing_tables(|_| {}));
    sim.drain();
    sim.until_deadline();
    sim.expect(&[Action::Connect]);
    // The service may say so where a rule denies by name too.
    let mut sim = Sim::start(with_rules(sni_tables_rules(), |s| {
        s.sni_unreadable = Some(SniUnreadable::WithoutName);
    }));
    sim.drain();
    sim.until_deadline();
    sim.expect(&[Action::Connect]);
}

/// Issue 26 item 6: a hello over the 16 KiB bound, or naming no host name, was judged
/// without a name.
#[test]
fn a_hello_too_large_or_with_an_invalid_name_is_denied_where_a_rule_denies_by_name() {
    // A handshake header announcing more than the bound.
    let too_large = [0x16, 0x03, 0x01, 0x00, 0x09, 0x01, 0x00, 0x40, 0x00];
    let invalid = hello_for("evil.example;");
    for bytes in [&too_large[..], &invalid[..]] {
        let mut sim = Sim::start(sni_tables());
        sim.drain();
        sim.s.on_readable(Side::Client);
        sim.drain();
        sim.s.on_peeked(Ok(bytes), sim.now);
        assert_denied_as_unreadable(&mut sim);
    }
    let mut routed = Sim::start(sni_routing_tables(|_| {}));
    routed.drain();
    routed.s.on_readable(Side::Client);
    routed.drain();
    routed.s.on_peeked(Ok(&invalid), routed.now);
    routed.expect(&[Action::Connect]);
}

/// Issue 26 item 6: `evil.example..` was no name at all, and passed a rule on
/// `evil.example`; names are compared as TLS servers do, trailing dots dropped.
#[test]
fn a_name_with_trailing_dots_meets_the_rule_on_the_name() {
    let mut sim = Sim::start(sni_tables());
    sim.drain();
    sim.s.on_readable(Side::Client);
    sim.drain();
    sim.s.on_peeked(Ok(&hello_for("Evil.Example..")), sim.now);
    sim.expect(&[close(CloseReason::Denied)]);
    assert_eq!(sim.s.final_record(sim.now).rule.as_deref(), Some("no-evil"));
}

#[test]
fn which_rules_make_an_unreadable_hello_a_denial() {
    let deny_by_name = sni_tables();
    assert_eq!(deny_by_name.sni_unreadable(0), SniUnreadable::Deny);
    assert_eq!(sni_routing_tables(|_| {}).sni_unreadable(0), SniUnreadable::WithoutName);
    // Allowing all but a name denies that name: no name passes `not_sni`.
    let mut all_but = Rule::new("all-but-evil", Verdict::Allow { pool: None });
    all_but.not_sni = vec![NamePattern::parse("evil.example").unwrap()];
    let t = with_rules(vec![all_but], |s| s.default = Verdict::Deny { reset: false });
    assert_eq!(t.sni_unreadable(0), SniUnreadable::Deny);
    // Denying all but a name already denies the nameless.
    let mut only = Rule::new("only-good", Verdict::Deny { reset: false });
    only.not_sni = vec![NamePattern::parse("good.example").unwrap()];
    assert_eq!(with_rules(vec![only], |_| {}).sni_unreadable(0), SniUnreadable::WithoutName);
    // The service's own setting wins.
    let t = with_rules(sni_tables_rules(), |s| s.sni_unreadable = Some(SniUnreadable::WithoutName));
    assert_eq!(t.sni_unreadable(0), SniUnreadable::WithoutName);
}

#[test]
fn a_client_that_resets_while_peeked_at_is_a_client_reset() {
    let mut sim = Sim::start(sni_tables());
    sim.drain();
    sim.s.on_readable(Side::Client);
    sim.drain();
    sim.s.on_peeked(Err(IoError::Reset), sim.now);
    sim.expect(&[close(CloseReason::ClientRst)]);
}

// ---- peeking: PROXY protocol ----

fn proxy_tables(trusted: &str) -> Tables {
    Tables::new(1, vec![service(&[B1], |s| s.accept_proxy = Some(vec![trusted.parse().unwrap()]))])
}

#[test]
fn an_untrusted_source_of_proxy_headers_is_closed_at_once() {
    let mut sim = Sim::start(proxy_tables("10.0.0.0/8"));
    sim.expect(&[close(CloseReason::ProxyError)]);
    assert_eq!(sim.service().counters.proxy_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn a_proxy_header_is_read_off_and_its_source_becomes_the_client() {
    let mut sim = Sim::start(proxy_tables("127.0.0.0/8"));
    sim.expect(&[Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Client);
    sim.expect(&[Action::Peek { max: crate::proxy::MAX_HEADER }]);
    let header =
        crate::proxy::encode(Version::V2, addr("192.0.2.7:4444"), addr("198.51.100.1:443"));
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(b"GET /");
    sim.s.on_peeked(Ok(&bytes[..7]), sim.now);
    sim.expect(&[Action::Lowat(16), Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Client);
    sim.drain();
    sim.s.on_peeked(Ok(&bytes), sim.now);
    sim.expect(&[Action::Consume(header.as_bytes().len())]);
    sim.s.on_consumed(Ok(header.as_bytes().len()), sim.now);
    sim.expect(&[Action::Lowat(1), Action::Connect]);
    assert_eq!(sim.s.client(), addr("192.0.2.7:4444"));
    assert_eq!(sim.s.final_record(sim.now).client, addr("192.0.2.7:4444"));
}

#[test]
fn a_malformed_or_late_proxy_header_is_a_proxy_error() {
    let mut bad = Sim::start(proxy_tables("127.0.0.0/8"));
    bad.drain();
    bad.s.on_readable(Side::Client);
    bad.drain();
    bad.s.on_peeked(Ok(b"HELLO WORLD\r\n"), bad.now);
    bad.expect(&[close(CloseReason::ProxyError)]);

    let mut late = Sim::start(proxy_tables("127.0.0.0/8"));
    late.drain();
    assert_eq!(late.s.deadline_at(), late.now + Duration::from_secs(4));
    late.until_deadline();
    late.expect(&[close(CloseReason::ProxyError)]);

    let mut short = Sim::start(proxy_tables("127.0.0.0/8"));
    short.drain();
    short.s.on_readable(Side::Client);
    short.drain();
    let header = crate::proxy::encode(Version::V1, addr(CLIENT), addr(LISTEN));
    short.s.on_peeked(Ok(header.as_bytes()), short.now);
    short.drain();
    short.s.on_consumed(Ok(3), short.now);
    short.expect(&[close(CloseReason::ProxyError)]);
}

#[test]
fn a_proxy_header_then_an_sni_rule_peeks_at_the_hello_that_follows_it() {
    let tables = with_rules(
        vec![{
            let mut r = Rule::new("no-evil", Verdict::Deny { reset: false });
            r.sni = vec![NamePattern::parse("evil.example").unwrap()];
            r
        }],
        |s| s.accept_proxy = Some(vec!["127.0.0.0/8".parse().unwrap()]),
    );
    let mut sim = Sim::start(tables);
    sim.drain();
    sim.s.on_readable(Side::Client);
    sim.drain();
    let header = crate::proxy::encode(Version::V1, addr("192.0.2.1:1"), addr(LISTEN));
    sim.s.on_peeked(Ok(header.as_bytes()), sim.now);
    sim.drain();
    sim.s.on_consumed(Ok(header.as_bytes().len()), sim.now);
    // The hello may be right behind the header: peek at once.
    sim.expect(&[Action::Peek { max: crate::sni::MAX_CLIENT_HELLO }]);
    sim.s.on_peeked(Ok(&hello_for("evil.example")), sim.now);
    sim.expect(&[close(CloseReason::Denied)]);
}

// ---- relaying ----

#[test]
fn the_client_speaks_first_and_its_bytes_reach_the_backend() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 5, false);
    sim.expect(&[Action::Write { dir: Up, fin: false }]);
    sim.written(Up, 5);
    sim.expect(&[Action::Release(Up), Action::AwaitReadable(Side::Client)]);
    assert_eq!(sim.s.lane(Up).bytes, 5);
}

#[test]
fn the_backend_speaking_first_is_read_once_it_is_readable() {
    let mut sim = Sim::relaying(one(&[B1]));
    // The client had nothing yet.
    sim.s.on_read(Up, Err(IoError::WouldBlock), sim.now);
    sim.expect(&[Action::Release(Up), Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Backend);
    sim.expect(&[read(Down)]);
    sim.read(Down, 7, false);
    sim.expect(&[Action::Write { dir: Down, fin: false }]);
    sim.written(Down, 7);
    sim.expect(&[Action::Release(Down), Action::AwaitReadable(Side::Backend)]);
    // A later client write still reaches the backend.
    sim.s.on_readable(Side::Client);
    sim.expect(&[read(Up)]);
}

#[test]
fn a_destination_that_takes_part_is_written_again_once_writable() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 100, false);
    sim.drain();
    sim.s.on_written(Up, Ok(Written { bytes: 40, blocked: true }), sim.now);
    sim.expect(&[Action::AwaitWritable(Side::Backend)]);
    assert_eq!(sim.s.lane(Up).held, 60, "no read while bytes wait: one buffer per direction");
    sim.s.on_writable(Side::Backend);
    sim.expect(&[Action::Write { dir: Up, fin: false }]);
    sim.written(Up, 60);
    assert_eq!(sim.s.lane(Up).bytes, 100);
}

#[test]
fn a_readiness_report_that_comes_while_writing_is_not_lost() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 10, false);
    sim.drain();
    // The client sends more while its last bytes are being written.
    sim.s.on_readable(Side::Client);
    sim.written(Up, 10);
    sim.expect(&[read(Up)]);
}

#[test]
fn a_read_that_finds_nothing_gives_its_buffer_back_and_waits() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.on_read(Up, Err(IoError::WouldBlock), sim.now);
    sim.expect(&[Action::Release(Up), Action::AwaitReadable(Side::Client)]);
    assert_eq!(sim.s.lane(Up).held, 0);
}

#[test]
fn half_close_from_the_client_keeps_the_other_direction_open() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 3, true);
    // The last bytes leave with the FIN that follows them.
    sim.expect(&[Action::Write { dir: Up, fin: true }]);
    sim.written(Up, 3);
    sim.expect(&[Action::Release(Up), Action::Shutdown(Up)]);
    sim.s.on_shutdown(Up, Ok(()), sim.now);
    sim.expect(&[]);
    assert!(!sim.s.is_closed());
    // The backend can still send, and the client gets it all, then the end.
    sim.s.on_readable(Side::Backend);
    sim.expect(&[read(Down)]);
    sim.read(Down, 9, true);
    sim.expect(&[Action::Write { dir: Down, fin: true }]);
    sim.written(Down, 9);
    // The last end leaves with the close (nothing is left unread): no shutdown first.
    sim.expect(&[Action::Release(Down), close(CloseReason::ClientFin)]);
    let record = sim.s.final_record(sim.now);
    assert_eq!((record.bytes_up, record.bytes_down), (3, 9));
}

#[test]
fn half_close_from_the_backend_first_is_recorded_as_backend_fin() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.on_read(Up, Err(IoError::WouldBlock), sim.now);
    sim.drain();
    sim.s.on_readable(Side::Backend);
    sim.drain();
    sim.read(Down, 0, true);
    sim.expect(&[Action::Release(Down), Action::Shutdown(Down)]);
    sim.s.on_shutdown(Down, Ok(()), sim.now);
    sim.drain();
    sim.s.on_readable(Side::Client);
    sim.drain();
    sim.read(Up, 0, true);
    sim.expect(&[Action::Release(Up), close(CloseReason::BackendFin)]);
}

#[test]
fn a_backend_that_closes_before_the_client_sends_forwards_its_end() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.on_read(Up, Err(IoError::WouldBlock), sim.now);
    sim.drain();
    sim.s.on_hangup(Side::Backend);
    sim.s.on_readable(Side::Backend);
    // The hangup asks the read to go on to the end of stream.
    sim.expect(&[Action::Read { dir: Down, max: usize::MAX, to_end: true }]);
    sim.read(Down, 0, true);
    sim.expect(&[Action::Release(Down), Action::Shutdown(Down)]);
}

#[test]
fn a_reset_from_either_peer_is_forwarded_as_a_reset() {
    for (dir, reason) in [(Up, CloseReason::ClientRst), (Down, CloseReason::BackendRst)] {
        let mut sim = Sim::relaying(one(&[B1]));
        sim.s.on_readable(Side::Backend);
        sim.s.on_read(dir, Err(IoError::Reset), sim.now);
        sim.expect(&[Action::Close { reason, abort: true }]);
    }
    // A destination that fails a write is the destination's reset.
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 4, false);
    sim.drain();
    sim.s.on_written(Up, Err(IoError::Reset), sim.now);
    sim.expect(&[Action::Close { reason: CloseReason::BackendRst, abort: true }]);
}

#[test]
fn a_pipe_that_cannot_be_had_is_a_local_error() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.on_read(Up, Err(IoError::Local), sim.now);
    sim.expect(&[Action::Close { reason: CloseReason::LocalError, abort: true }]);
}

#[test]
fn a_failed_shutdown_is_the_destination_resetting() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 0, true);
    sim.drain();
    sim.s.on_shutdown(Up, Err(IoError::Reset), sim.now);
    sim.expect(&[Action::Close { reason: CloseReason::BackendRst, abort: true }]);
}

// ---- timeouts ----

#[test]
fn an_idle_session_is_cut_at_the_idle_timeout_and_traffic_pushes_it() {
    let mut sim = Sim::relaying(one(&[B1]));
    let t0 = sim.now;
    assert_eq!(sim.s.deadline_at(), t0 + Duration::from_secs(60));
    sim.wait(Duration::from_secs(30));
    sim.read(Up, 1, false);
    sim.drain();
    sim.written(Up, 1);
    sim.drain();
    assert_eq!(sim.s.deadline_at(), t0 + Duration::from_secs(90));
    sim.until_deadline();
    sim.expect(&[Action::Close { reason: CloseReason::IdleTimeout, abort: true }]);
}

#[test]
fn after_a_half_close_the_fin_timeout_applies() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 0, true);
    sim.drain();
    sim.s.on_shutdown(Up, Ok(()), sim.now);
    sim.drain();
    assert_eq!(sim.s.deadline_at(), sim.now + Duration::from_secs(10));
    sim.until_deadline();
    sim.expect(&[Action::Close { reason: CloseReason::FinTimeout, abort: true }]);
}

#[test]
fn a_session_is_cut_at_its_maximum_duration_whatever_its_traffic() {
    let tables = Tables::new(
        1,
        vec![service(&[B1], |s| s.timeouts.max_duration = Some(Duration::from_secs(5)))],
    );
    let mut sim = Sim::relaying(tables);
    let t0 = sim.now;
    sim.wait(Duration::from_secs(4));
    sim.read(Up, 10, false);
    sim.drain();
    assert_eq!(sim.s.deadline_at(), t0 + Duration::from_secs(5));
    sim.until_deadline();
    sim.expect(&[Action::Close { reason: CloseReason::MaxDuration, abort: true }]);
    assert_eq!(sim.service().counters.cut.load(Ordering::Relaxed), 1);
}

#[test]
fn durations_too_long_for_the_clock_never_overflow_a_deadline() {
    let huge = Duration::from_secs(u64::MAX / 2);
    let tables = Tables::new(
        1,
        vec![service(&[B1], |s| {
            s.timeouts = Timeouts {
                connect: huge,
                idle: huge,
                fin: huge,
                sni: huge,
                max_duration: Some(huge),
                proxy: huge,
            }
        })],
    );
    let mut sim = Sim::relaying(tables);
    assert!(sim.s.deadline_at() > sim.now + Duration::from_secs(365 * 24 * 3600));
    sim.wait(Duration::from_secs(3600));
    sim.expect(&[]);
}

// ---- caps, shaping, preamble, capture, records ----

#[test]
fn at_the_byte_cap_more_bytes_cut_the_session() {
    let tables = Tables::new(1, vec![service(&[B1], |s| s.limits.max_bytes = Some(10))]);
    let mut sim = Sim::start(tables);
    sim.drain();
    sim.connected();
    sim.expect(&[
        Action::Read { dir: Up, max: 10, to_end: false },
        Action::AwaitReadable(Side::Backend),
    ]);
    sim.s.on_read(Up, Ok(Readout { bytes: 10, eof: false, drained: false }), sim.now);
    sim.expect(&[Action::Write { dir: Up, fin: false }]);
    sim.written(Up, 10);
    // At the cap the lane takes nothing more; it only asks whether its source ends there.
    sim.expect(&[Action::Probe(Up)]);
    sim.s.on_probed(Up, Ok(Probed::More), sim.now);
    sim.expect(&[Action::Close { reason: CloseReason::ByteCap, abort: true }]);
}

#[test]
fn a_session_that_moves_exactly_its_byte_cap_ends_cleanly() {
    let tables = Tables::new(1, vec![service(&[B1], |s| s.limits.max_bytes = Some(10))]);
    let mut sim = Sim::start(tables);
    sim.drain();
    sim.connected();
    sim.drain();
    sim.s.on_read(Up, Ok(Readout { bytes: 10, eof: false, drained: false }), sim.now);
    sim.drain();
    sim.written(Up, 10);
    sim.expect(&[Action::Probe(Up)]);
    sim.s.on_probed(Up, Ok(Probed::Nothing), sim.now);
    sim.expect(&[Action::Release(Up), Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Client);
    sim.expect(&[Action::Probe(Up)]);
    sim.s.on_probed(Up, Ok(Probed::Ended), sim.now);
    sim.expect(&[Action::Shutdown(Up)]);
    sim.s.on_shutdown(Up, Ok(()), sim.now);
    sim.s.on_readable(Side::Backend);
    sim.expect(&[Action::Probe(Down)]);
    sim.s.on_probed(Down, Ok(Probed::Ended), sim.now);
    sim.expect(&[Action::Close { reason: CloseReason::ClientFin, abort: false }]);
}

#[test]
fn a_shaped_direction_waits_for_its_turn_without_its_buffer_and_without_polling() {
    let spec = BandwidthSpec {
        per_connection: [Some(Rate::per_second(100_000, 4096)), None],
        ..BandwidthSpec::default()
    };
    let tables = Tables::new(
        1,
        vec![service(&[B1], |s| s.bandwidth = Some(Arc::new(Bandwidth::new(spec))))],
    );
    let mut sim = Sim::start(tables);
    sim.drain();
    sim.connected();
    let actions = sim.drain();
    let Action::Read { dir: Up, max, .. } = actions[0] else { panic!("{actions:?}") };
    assert!(max > 0 && max <= 4096, "a read no larger than the burst: {max}");
    sim.s.on_read(Up, Ok(Readout { bytes: max, eof: false, drained: false }), sim.now);
    sim.drain();
    sim.written(Up, max);
    // The bucket is empty: the lane gives its buffer back and waits for a timer, with no
    // readiness request.
    sim.expect(&[Action::Release(Up)]);
    let resume = sim.s.deadline_at();
    assert!(
        resume > sim.now && resume < sim.now + Duration::from_secs(1),
        "{:?}",
        resume - sim.now
    );
    sim.until_deadline();
    let again = sim.drain();
    assert!(matches!(again[..], [Action::Read { dir: Up, .. }]), "{again:?}");
}

#[test]
fn a_proxy_header_goes_to_the_backend_before_any_relayed_byte() {
    let mut s = service(&[B1], |_| {});
    s.pool.send_proxy = Some(Version::V1);
    let mut sim = Sim::start(Tables::new(1, vec![s]));
    sim.drain();
    sim.connected();
    sim.expect(&[Action::SendPreamble]);
    let preamble = sim.s.preamble().unwrap();
    assert_eq!(preamble.as_bytes(), b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 80\r\n");
    sim.s.on_preamble_sent(Ok(()));
    sim.expect(&[read(Up), Action::AwaitReadable(Side::Backend)]);

    let mut s = service(&[B1], |_| {});
    s.pool.send_proxy = Some(Version::V2);
    let mut failing = Sim::start(Tables::new(1, vec![s]));
    failing.drain();
    failing.connected();
    failing.drain();
    failing.s.on_preamble_sent(Err(IoError::WouldBlock));
    failing.expect(&[Action::Close { reason: CloseReason::LocalError, abort: true }]);
}

#[test]
fn an_open_record_is_asked_for_once_connected_when_the_policy_wants_one() {
    let tables = one(&[B1])
        .with_records(RecordPolicy { open: true, interim: Some(Duration::from_secs(60)) });
    let mut sim = Sim::start(tables);
    sim.drain();
    sim.connected();
    sim.expect(&[Action::EmitOpen, read(Up), Action::AwaitReadable(Side::Backend)]);
    assert_eq!(sim.s.record(RecordKind::Open, sim.now).backend, Some(addr(B1)));
    assert!(!sim.s.take_interim(sim.now + Duration::from_secs(59)));
    assert!(sim.s.take_interim(sim.now + Duration::from_secs(60)));
    assert!(!sim.s.take_interim(sim.now + Duration::from_secs(61)));
}

#[test]
fn a_busy_lane_yields_after_its_reads_of_a_turn() {
    let mut sim = Sim::relaying(one(&[B1]));
    let mut reads = 0;
    loop {
        sim.s.on_read(Up, Ok(Readout { bytes: 100, eof: false, drained: false }), sim.now);
        assert_eq!(sim.s.next_action(sim.now), Some(Action::Write { dir: Up, fin: false }));
        sim.written(Up, 100);
        let next = sim.s.next_action(sim.now);
        if next == Some(Action::Yield) {
            break;
        }
        assert_eq!(next, Some(read(Up)));
        reads += 1;
        assert!(reads <= READS_PER_TURN, "no yield after {reads} reads");
    }
    assert_eq!(reads, READS_PER_TURN, "a turn's reads, then the yield");
    // The next turn reads again.
    assert_eq!(sim.s.next_action(sim.now), Some(read(Up)));
}

// ---- the end ----

#[test]
fn a_stop_or_a_kill_cuts_the_session_abortively() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.stop();
    sim.expect(&[Action::Close { reason: CloseReason::Shutdown, abort: true }]);
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.kill();
    sim.expect(&[Action::Close { reason: CloseReason::AdminKill, abort: true }]);
    assert_eq!(sim.s.final_record(sim.now).reason, Some(CloseReason::AdminKill));
}

#[test]
fn a_closed_session_asks_for_nothing_more_and_is_accounted_once() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 8, false);
    sim.drain();
    sim.written(Up, 8);
    sim.drain();
    let backend = sim.service().pool.backends()[0].state.clone();
    assert_eq!(backend.active.load(Ordering::Relaxed), 1);
    assert_eq!(sim.cap.active(), 1);
    sim.s.on_read(Up, Err(IoError::Reset), sim.now);
    sim.s.stop();
    sim.s.kill();
    sim.expect(&[Action::Close { reason: CloseReason::ClientRst, abort: true }]);
    sim.s.on_readable(Side::Backend);
    sim.s.on_timer(sim.now + Duration::from_secs(3600));
    sim.expect(&[]);
    assert!(sim.s.is_closed());
    assert_eq!(sim.cap.active(), 0);
    assert_eq!(backend.active.load(Ordering::Relaxed), 0);
    assert_eq!(backend.bytes_up.load(Ordering::Relaxed), 8);
    let counters = &sim.service().counters;
    assert_eq!(counters.bytes_up.load(Ordering::Relaxed), 8);
    assert_eq!(counters.active.load(Ordering::Relaxed), 0);
    assert_eq!(sim.stats.closed.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats.active.load(Ordering::Relaxed), 0);
}

#[test]
fn an_accounted_session_adds_its_bytes_to_its_client_every_interval_and_at_close() {
    use crate::accounting::{AccountSpec, ACCOUNTING_INTERVAL};
    let tables = one(&[B1]).with_accounting(Some(AccountSpec::default()));
    let mut sim = Sim::relaying(tables);
    let shared = sim.tables.clone();
    let client = || {
        let list = sim_state(&shared).accounted_clients();
        list.into_iter().find(|(a, _)| *a == addr(CLIENT).ip()).map(|(_, u)| u).unwrap()
    };
    sim.read(Up, 8, false);
    sim.drain();
    sim.written(Up, 8);
    sim.drain();
    // Counted as a session at once; its bytes only at the interval or at close.
    assert_eq!((client().sessions, client().active, client().bytes_up), (1, 1, 0));
    sim.s.account_interim(sim.now + ACCOUNTING_INTERVAL - Duration::from_millis(1));
    assert_eq!(client().bytes_up, 0);
    sim.s.account_interim(sim.now + ACCOUNTING_INTERVAL);
    assert_eq!(client().bytes_up, 8);
    sim.read(Up, 5, false);
    sim.drain();
    sim.written(Up, 5);
    sim.drain();
    sim.s.kill();
    sim.drain();
    let u = client();
    assert_eq!((u.bytes_up, u.bytes_down, u.sessions, u.active), (13, 0, 1, 0));
    let net = sim_state(&sim.tables).accounted_networks();
    assert_eq!(net, vec![("127.0.0.0".parse().unwrap(), u)]);
}

fn sim_state(tables: &Tables) -> &crate::limits::LimitState {
    &tables.services()[0].limit_state
}

/// Random drivers: any order of outcomes, readiness reports, timers, stops and kills that a
/// driver may deliver never makes the core ask for a second operation on a busy lane,
/// never hands out anything after its close, and always accounts the session exactly once.
#[test]
fn any_sequence_of_events_keeps_the_contract() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..3000 {
        let mut s = service(&[B1, B2, B3], |s| {
            if round % 3 == 0 {
                s.limits.max_bytes = Some(rand(5000));
            }
            if round % 5 == 0 {
                s.timeouts.max_duration = Some(Duration::from_secs(rand(100)));
            }
        });
        if round % 4 == 0 {
            s.pool.send_proxy = Some(Version::V1);
        }
        let mut sim = Sim::start(Tables::new(1, vec![s]));
        let mut pending: Vec<Action> = Vec::new();
        let mut closes = 0;
        for _ in 0..200 {
            while let Some(a) = sim.s.next_action(sim.now) {
                assert!(closes == 0, "round {round}: {a:?} after the close");
                if let Action::Close { .. } = a {
                    closes += 1;
                }
                if let Action::Read { dir, .. }
                | Action::Write { dir, .. }
                | Action::Shutdown(dir)
                | Action::Probe(dir) = a
                {
                    assert!(
                        !pending.iter().any(|p| lane_op(p) == Some(dir)),
                        "round {round}: {a:?} while {pending:?}"
                    );
                }
                if matches!(
                    a,
                    Action::Read { .. }
                        | Action::Write { .. }
                        | Action::Shutdown(_)
                        | Action::Probe(_)
                        | Action::Connect
                        | Action::SendPreamble
                ) {
                    pending.push(a);
                }
            }
            if sim.s.is_closed() {
                break;
            }
            deliver(&mut sim, &mut pending, &mut rand);
        }
        if !sim.s.is_closed() {
            sim.s.stop();
            while sim.s.next_action(sim.now).is_some() {}
        }
        assert_eq!(sim.cap.active(), 0, "round {round}: the place is given back");
        assert_eq!(sim.stats.closed.load(Ordering::Relaxed), 1, "round {round}");
        assert_eq!(sim.stats.active.load(Ordering::Relaxed), 0, "round {round}");
        let b = sim
            .service()
            .pool
            .backends()
            .iter()
            .map(|b| b.state.active.load(Ordering::Relaxed))
            .sum::<u64>();
        assert_eq!(b, 0, "round {round}: backend sessions given back");
    }
}

fn lane_op(a: &Action) -> Option<Direction> {
    match *a {
        Action::Read { dir, .. }
        | Action::Write { dir, .. }
        | Action::Shutdown(dir)
        | Action::Probe(dir) => Some(dir),
        _ => None,
    }
}

/// Delivers one random event: the outcome of a pending operation, a readiness report, a
/// timer, or a cut.
fn deliver(sim: &mut Sim, pending: &mut Vec<Action>, rand: &mut impl FnMut(u64) -> u64) {
    let now = sim.now;
    let pick = rand(10);
    if pick < 6 && !pending.is_empty() {
        let a = pending.remove(rand(pending.len() as u64) as usize);
        let fail = rand(20) == 0;
        match a {
            Action::Connect => {
                let outcome = match rand(4) {
                    0 => Err(ConnectError::Refused),
                    _ => Ok(()),
                };
                sim.s.on_connected(outcome, now);
            }
            Action::SendPreamble => {
                sim.s.on_preamble_sent(if fail { Err(IoError::Reset) } else { Ok(()) })
            }
            Action::Read { dir, max, .. } => {
                let bytes = (rand(3000) as usize).min(max);
                let outcome = match (fail, rand(6)) {
                    (true, _) => Err(IoError::Reset),
                    (_, 0) => Err(IoError::WouldBlock),
                    (_, 1) => Ok(Readout { bytes, eof: true, drained: false }),
                    _ => Ok(Readout { bytes, eof: false, drained: rand(2) == 0 }),
                };
                sim.s.on_read(dir, outcome, now);
            }
            Action::Write { dir, .. } => {
                let held = sim.s.lane(dir).held;
                let bytes = rand(held as u64 + 1) as usize;
                let outcome = if fail {
                    Err(IoError::Reset)
                } else {
                    Ok(Written { bytes, blocked: bytes < held })
                };
                sim.s.on_written(dir, outcome, now);
            }
            Action::Shutdown(dir) => {
                sim.s.on_shutdown(dir, if fail { Err(IoError::Reset) } else { Ok(()) }, now)
            }
            Action::Probe(dir) => {
                let p = [Probed::More, Probed::Ended, Probed::Nothing][rand(3) as usize];
                sim.s.on_probed(dir, Ok(p), now);
            }
            _ => {}
        }
        return;
    }
    match pick {
        6 => sim.s.on_readable(if rand(2) == 0 { Side::Client } else { Side::Backend }),
        7 => sim.s.on_writable(if rand(2) == 0 { Side::Client } else { Side::Backend }),
        8 => sim.wait(Duration::from_millis(rand(5000))),
        _ => match rand(40) {
            0 => sim.s.stop(),
            1 => sim.s.kill(),
            2 => sim.s.on_hangup(Side::Client),
            _ => {}
        },
    }
}

// ---- what drivers and the admin API read of a session ----

#[test]
fn a_session_says_it_is_connecting_only_while_its_connect_is_outstanding() {
    let mut sim = Sim::start(sni_tables());
    sim.drain();
    assert!(!sim.s.is_connecting(), "peeking");
    assert_eq!(sim.s.live(7, sim.now).state, "peeking");
    sim.s.on_readable(Side::Client);
    sim.drain();
    sim.s.on_peeked(Ok(&hello_for("good.example")), sim.now);
    sim.expect(&[Action::Connect]);
    assert!(sim.s.is_connecting());
    assert_eq!(sim.s.live(7, sim.now).state, "connecting");
    sim.connected();
    assert!(!sim.s.is_connecting(), "relaying");
    let live = sim.s.live(7, sim.now + Duration::from_secs(2));
    assert_eq!((live.id, live.state, live.age), (7, "relaying", Duration::from_secs(2)));
    assert_eq!((live.client, live.backend), (addr(CLIENT), Some(addr(B1))));
}

/// A readiness report for the backend while the session still peeks at its client (a
/// stale event a driver may deliver) is ignored: it does not make the session peek again.
#[test]
fn backend_readiness_while_peeking_is_ignored() {
    let mut sim = Sim::start(sni_tables());
    sim.expect(&[Action::AwaitReadable(Side::Client)]);
    sim.s.on_readable(Side::Backend);
    sim.expect(&[]);
    sim.s.on_readable(Side::Client);
    sim.expect(&[Action::Peek { max: crate::sni::MAX_CLIENT_HELLO }]);
}

/// A write that moved nothing (the destination's buffer was full) is not activity: the idle
/// timeout is not pushed by it.
#[test]
fn a_write_that_moves_nothing_does_not_push_the_idle_timeout() {
    let mut sim = Sim::relaying(one(&[B1]));
    let t0 = sim.now;
    sim.read(Up, 4, false);
    sim.drain();
    sim.now += Duration::from_secs(30);
    sim.s.on_written(Up, Ok(Written { bytes: 0, blocked: true }), sim.now);
    assert_eq!(sim.s.deadline_at(), t0 + Duration::from_secs(60));
    sim.s.on_written(Up, Ok(Written { bytes: 4, blocked: false }), sim.now);
    assert_eq!(sim.s.deadline_at(), t0 + Duration::from_secs(90));
}

#[test]
fn a_session_the_driver_cannot_go_on_with_is_cut_for_the_reason_given() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.s.cut(CloseReason::LocalError);
    sim.expect(&[close(CloseReason::LocalError)]);
    assert_eq!(sim.s.final_record(sim.now).reason, Some(CloseReason::LocalError));
    assert_eq!(sim.stats.closed.load(Ordering::Relaxed), 1);
}

/// On a tie between the phase's own deadline and the maximum duration, the phase's wins:
/// an idle session is recorded as idle.
#[test]
fn an_idle_timeout_at_the_maximum_duration_is_recorded_as_idle() {
    let tables = Tables::new(
        1,
        vec![service(&[B1], |s| s.timeouts.max_duration = Some(Duration::from_secs(60)))],
    );
    let mut sim = Sim::relaying(tables);
    assert_eq!(sim.s.deadline_at(), sim.now + Duration::from_secs(60));
    sim.until_deadline();
    sim.expect(&[close(CloseReason::IdleTimeout)]);
}

/// Deadlines far away but within the clock are kept exactly (the cap on a deadline is far
/// beyond any configured duration).
#[test]
fn a_deadline_decades_away_is_kept_exactly() {
    let t = Instant::now();
    for years in [1u64, 10, 50, 99] {
        let d = Duration::from_secs(years * 365 * 24 * 3600);
        assert_eq!(later(t, d), t + d, "{years} years");
    }
}

/// A rule that sends its sessions to a named pool connects them to that pool's backends,
/// with the pool's own source binding.
#[test]
fn a_rule_naming_a_pool_connects_to_that_pool_with_its_source() {
    use crate::socket_options::{BackendBind, Source};
    use crate::tables::NamedPool;
    let mut rule = Rule::new("to-other", Verdict::Allow { pool: Some(0) });
    rule.from = vec!["127.0.0.0/8".parse().unwrap()];
    let mut other = Pool::new(vec![Backend::new(addr(B3))]);
    other.source = Some(Source::Addr("127.0.0.9".parse().unwrap()));
    let tables = one(&[B1]).with_firewall(
        Rules::new(RuleSet::compile(vec![rule])),
        vec![NamedPool { name: "other".into(), pool: other }],
    );
    let mut sim = Sim::start(tables);
    sim.expect(&[Action::Connect]);
    assert_eq!(sim.s.backend_addr(), Some(addr(B3)));
    let socket = sim.s.backend_socket().expect("a backend to connect to");
    assert_eq!(socket.bind, Some(BackendBind::Local("127.0.0.9".parse().unwrap())));
    // The service's own pool binds nothing.
    let mut plain = Sim::start(one(&[B1]));
    plain.drain();
    assert_eq!(plain.s.backend_socket().map(|b| b.bind), Some(None));
}

/// A captured session names its capture, and each direction's end is handed to the capture
/// once it has been forwarded, as the direction it belongs to.
#[test]
fn a_captured_session_reports_the_end_of_each_direction_to_its_capture() {
    use crate::capture::{CapturePolicy, CaptureSpec, CaptureStats, Capturer};
    let capturer = Capturer::start(Arc::new(CaptureStats::default())).unwrap();
    let spec = CaptureSpec::new(std::env::temp_dir());
    let policy = Arc::new(CapturePolicy::new(spec, Arc::default(), capturer.clone()));
    let tables = || {
        let mut rule = Rule::new("tap", Verdict::Allow { pool: None });
        rule.capture = Some(0);
        with_rules(vec![rule], |_| {}).with_captures(vec![policy.clone()])
    };
    for dir in [Up, Down] {
        let mut sim = Sim::start(tables());
        sim.expect(&[Action::Connect]);
        sim.connected();
        sim.expect(&[Action::CaptureOpen, read(Up), Action::AwaitReadable(Side::Backend)]);
        let (captured, service) = sim.s.capture().expect("a captured session");
        assert!(Arc::ptr_eq(captured, &policy));
        assert_eq!(&**service, "web");
        if dir == Down {
            sim.s.on_readable(Side::Backend);
            sim.drain();
        }
        sim.read(dir, 0, true);
        sim.expect(&[Action::Release(dir), Action::Shutdown(dir)]);
        sim.s.on_shutdown(dir, Ok(()), sim.now);
        sim.expect(&[Action::CaptureFin(dir)]);
    }
    // A session no rule captures names none.
    let plain = Sim::relaying(one(&[B1]));
    assert!(plain.s.capture().is_none());
    capturer.stop(Duration::from_secs(1));
}

#[test]
fn a_relayed_session_that_ends_is_not_counted_as_unserved() {
    let mut sim = Sim::relaying(one(&[B1]));
    sim.read(Up, 0, true);
    sim.drain();
    sim.s.on_shutdown(Up, Ok(()), sim.now);
    sim.s.on_readable(Side::Backend);
    sim.drain();
    sim.read(Down, 0, true);
    sim.drain();
    assert!(sim.s.is_closed());
    assert_eq!(sim.service().counters.unserved.load(Ordering::Relaxed), 0);
}
