//! RELIABILITY 22 and issue 23 item 1: a fleet of three sluice instances behind Linux ECMP,
//! in network namespaces the test makes. A router namespace routes the virtual service
//! address (VIP) over a resilient nexthop group across three sluice namespaces
//! (`fib_multipath_hash_policy=1`: layer-4 hash, so a client's connections spread over the
//! instances by source port); each instance runs the same config, a `source_hash` pool over
//! four backends, each in its own namespace. A backend first answers with its name and the
//! peer it sees, which is the address of the instance that relayed the connection.
//!
//! Resilient, not hash-threshold: a hash-threshold group splits the hash space into one
//! range per nexthop, so removing a nexthop moves range boundaries and rehashes established
//! flows of the other instances too (which then reset them); a resilient group maps hash
//! buckets to nexthops and moves only the buckets of the removed one (and, on re-adding,
//! only buckets idle for `idle_timer`).
//!
//! Shown, with figures printed: (a) every instance maps each client to the same backend;
//! (b) removing one of four backends by reload moves that backend's clients and (almost) no
//! other; (c) withdrawing one instance and stopping it moves only its own flows: the other
//! instances' streams stay byte-exact, new connections keep their backend, and bringing it
//! back restores the mapping; (d) a rolling reload and a rolling binary upgrade across the
//! fleet under load lose no connection and no byte.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_tests::{
    set_timeouts, Adopted, Backend, Config, Driver, End, Netns, Payload, Reload, Service, Sluice,
    Stop, Verifier,
};
use socket2::{Domain, Protocol, Socket, Type};

/// The virtual service address every instance has on its loopback.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const PORT: u16 = 8080;
const INSTANCES: usize = 3;
const BACKENDS: usize = 4;
const BACKEND_PORT: u16 = 9000;
/// Client source addresses 10.1.0.1 ..= 10.1.0.CLIENTS.
const CLIENTS: usize = 60;
/// Connections per client address in a survey: several source ports, so ECMP spreads them.
const ROUNDS: usize = 4;
/// The router's nexthop group and its buckets.
const GROUP: &str = "10";
const BUCKETS: usize = 64;
/// Seconds a bucket must see no packet before a re-added nexthop may take it.
const IDLE_TIMER: &str = "1";
/// Bytes each probe connection echoes.
const PROBE_BYTES: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Long streams: at least this many through each instance, opened in at most so many tries.
const STREAMS_PER_INSTANCE: usize = 2;
const STREAM_TRIES: usize = 60;
const STREAM_CHUNK: usize = 8 * 1024;
const STREAM_STEP: Duration = Duration::from_millis(10);
/// The longest any helper thread runs.
const THREAD_LIMIT: Duration = Duration::from_secs(90);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Maglev keeps survivors' keys in place up to a small reshuffle: the engine's unit test
/// bounds it at 1/50 of all keys (`source_hash_moves_only_the_removed_backends_keys`). With
/// 60 clients that is about one client; allow two.
const SURVIVORS_MOVED_MAX: usize = 2;

fn client_ip(c: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, u8::try_from(c + 1).expect("client index fits"))
}

/// Instance `i`'s address toward the router (and the backends).
fn instance_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, u8::try_from(i + 1).expect("instance index fits"), 2)
}

fn backend_addr(j: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, 2, u8::try_from(j + 1).expect("backend index fits"), 2);
    SocketAddr::from((ip, BACKEND_PORT))
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, PORT))
}

/// Where one connection went: the backend that answered and the instance that relayed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Served {
    backend: usize,
    instance: usize,
}

/// A backend that first writes `bJ PEER\n`, then echoes every byte.
fn named_echo(j: usize) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut stream| {
        let Ok(peer) = stream.peer_addr() else { return };
        let Ok(mut reader) = stream.try_clone() else { return };
        if stream.write_all(format!("b{} {peer}\n", j + 1).as_bytes()).is_err() {
            return;
        }
        if io::copy(&mut reader, &mut stream).is_ok() {
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}

/// Reads the backend's greeting line: which backend, through which instance.
fn greeting(stream: &mut TcpStream) -> Result<Served, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("end of stream in the greeting {line:?}")),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("greeting: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let parsed = (|| {
        let (name, peer) = text.split_once(' ')?;
        let backend = name.strip_prefix('b')?.parse::<usize>().ok()?.checked_sub(1)?;
        let peer: SocketAddr = peer.parse().ok()?;
        let instance = (0..INSTANCES).find(|&i| peer.ip() == IpAddr::V4(instance_ip(i)))?;
        Some(Served { backend, instance })
    })();
    parsed.ok_or_else(|| format!("bad greeting {text:?}"))
}

/// A new connection from `client` to the VIP; must run inside the client namespace.
fn connect_from(client: Ipv4Addr) -> Result<TcpStream, String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    socket.bind(&SocketAddr::from((client, 0)).into()).map_err(|e| format!("bind: {e}"))?;
    socket
        .connect_timeout(&vip().into(), CONNECT_TIMEOUT)
        .map_err(|e| format!("connect from {client}: {e}"))?;
    let stream: TcpStream = socket.into();
    set_timeouts(&stream, IO_TIMEOUT);
    Ok(stream)
}

/// One short connection from `client`: the greeting, then a payload echoed exactly.
fn probe(client: Ipv4Addr, seed: u64) -> Result<Served, String> {
    let mut stream = connect_from(client)?;
    let served = greeting(&mut stream)?;
    let payload = Payload::bytes(seed, PROBE_BYTES);
    stream.write_all(&payload).map_err(|e| format!("write: {e}"))?;
    stream.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut echo = Vec::new();
    stream.read_to_end(&mut echo).map_err(|e| format!("read the echo: {e}"))?;
    if echo != payload {
        return Err(format!("echo of {} bytes differs from the {PROBE_BYTES} sent", echo.len()));
    }
    Ok(served)
}

/// The namespaces: router `r`, client `c`, instances `s1..s3`, backends `b1..b4`.
fn topology() -> Netns {
    let mut ns = Netns::new();
    ns.add("r");
    ns.add("c");
    for i in 1..=INSTANCES {
        ns.add(&format!("s{i}"));
    }
    for j in 1..=BACKENDS {
        ns.add(&format!("b{j}"));
    }
    ns.link("c", "10.1.0.1/24", "r", "10.1.0.254/24");
    let mut client: Vec<String> =
        (1..CLIENTS).map(|c| format!("addr add {}/24 dev c-r", client_ip(c))).collect();
    client.push("route add default via 10.1.0.254".into());
    ns.batch("c", &client);
    let mut router = Vec::new();
    for i in 0..INSTANCES {
        let s = format!("s{}", i + 1);
        ns.link(&s, &format!("{}/24", instance_ip(i)), "r", &format!("10.0.{}.1/24", i + 1));
        ns.batch(
            &s,
            &[
                format!("addr add {VIP}/32 dev lo"),
                format!("route add default via 10.0.{}.1", i + 1),
            ],
        );
        router.push(format!("nexthop add id {} via {} dev r-{s}", i + 1, instance_ip(i)));
    }
    for j in 0..BACKENDS {
        let b = format!("b{}", j + 1);
        ns.link(&b, &format!("{}/24", backend_addr(j).ip()), "r", &format!("10.2.{}.1/24", j + 1));
        ns.batch(&b, &[format!("route add default via 10.2.{}.1", j + 1)]);
    }
    for key in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.fib_multipath_hash_policy=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        ns.exec("r", &["sysctl", "-qw", key]);
    }
    router.push(group_command("add", &[0, 1, 2]));
    router.push(format!("route add {VIP}/32 nhid {GROUP}"));
    ns.batch("r", &router);
    ns
}

/// `nexthop VERB id GROUP group ...` over `members` (instance indices), resilient.
fn group_command(verb: &str, members: &[usize]) -> String {
    let ids: Vec<String> = members.iter().map(|i| (i + 1).to_string()).collect();
    format!(
        "nexthop {verb} id {GROUP} group {} type resilient buckets {BUCKETS} idle_timer {IDLE_TIMER}",
        ids.join("/")
    )
}

/// Buckets of the group that point at instance `i`'s nexthop.
fn buckets_of(ns: &Netns, i: usize) -> usize {
    let shown = ns.output("r", &["nexthop", "bucket", "show", "id", GROUP]);
    let needle = format!("nhid {}", i + 1);
    shown.lines().filter(|l| l.trim_end().ends_with(&needle)).count()
}

/// Three sluice instances, their backends and namespaces. Fields drop in order: processes
/// first, then backends, then the namespaces.
struct Fleet {
    instances: Vec<Option<Sluice>>,
    backends: Vec<Backend>,
    driver: Driver,
    /// The backends (indices) in the pool of the config the instances run.
    pool: Vec<usize>,
    shutdown_timeout: &'static str,
    connect_timeout: &'static str,
    ns: Netns,
}

impl Fleet {
    /// Builds the topology and starts the instances; `None` when the test cannot run here
    /// (recorded as a skip, a failure under CI=true).
    fn start(driver: Driver, shutdown_timeout: &'static str) -> Option<Fleet> {
        if !sluice_tests::prerequisite(Netns::available(), "root and ip (iproute2)")
            || !sluice_tests::program("sysctl", &["-V"], "procps")
        {
            return None;
        }
        let ns = topology();
        let backends = (0..BACKENDS)
            .map(|j| {
                ns.run_in(&format!("b{}", j + 1), move || {
                    Backend::spawn_on(backend_addr(j), named_echo(j))
                })
            })
            .collect();
        let mut fleet = Fleet {
            instances: Vec::new(),
            backends,
            driver,
            pool: (0..BACKENDS).collect(),
            shutdown_timeout,
            connect_timeout: "5s",
            ns,
        };
        for i in 0..INSTANCES {
            let sluice = Sluice::start(fleet.config(i))?;
            fleet.instances.push(Some(sluice));
        }
        Some(fleet)
    }

    /// The config of instance `i`: the same file for all (only the namespace differs).
    fn config(&self, i: usize) -> Config {
        let mut service = Service::with_pool("vip", "fleet").connect_timeout(self.connect_timeout);
        service.listen = vec![vip()];
        let backends: Vec<String> =
            self.pool.iter().map(|&j| format!("\"{}\"", backend_addr(j))).collect();
        let pool = format!(
            "[[pool]]\nname = \"fleet\"\nalgorithm = \"source_hash\"\nbackends = [{}]\n",
            backends.join(", ")
        );
        Config::new(self.driver)
            .workers(1)
            .shutdown_timeout(self.shutdown_timeout)
            .in_netns(&self.ns.name(&format!("s{}", i + 1)))
            .service(service)
            .section(&pool)
            // Session records to stdout (discarded): stderr keeps the lifecycle lines.
            .section("[[log]]\ntype = \"stdout\"\n")
    }

    fn instance(&self, i: usize) -> &Sluice {
        self.instances[i].as_ref().expect("instance running")
    }

    /// Writes the current config to every instance and reloads each, one after the other.
    fn reload_all(&self, pause: Duration) {
        for i in 0..INSTANCES {
            let sluice = self.instance(i);
            sluice.write_config(&self.config(i));
            let outcome = sluice.reload(RELOAD_TIMEOUT);
            assert!(matches!(outcome, Reload::Applied(_)), "instance s{}: {outcome:?}", i + 1);
            std::thread::sleep(pause);
        }
    }

    /// `rounds` probe connections from every client address; where each went.
    fn survey(&self, rounds: usize, seed: u64) -> Vec<Vec<Served>> {
        let results = self.ns.run_in("c", move || {
            (0..CLIENTS)
                .map(|c| {
                    (0..rounds)
                        .map(|r| probe(client_ip(c), seed + (c * rounds + r) as u64))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        });
        results
            .into_iter()
            .enumerate()
            .map(|(c, tries)| {
                tries
                    .into_iter()
                    .map(|t| t.unwrap_or_else(|e| panic!("client {}: {e}", client_ip(c))))
                    .collect()
            })
            .collect()
    }

    /// Withdraws or restores nexthops: the group becomes `members`.
    fn set_group(&self, members: &[usize]) {
        self.ns.batch("r", &[group_command("replace", members)]);
    }
}

/// Connections per instance and per backend in a survey.
fn distribution(survey: &[Vec<Served>]) -> ([usize; INSTANCES], [usize; BACKENDS]) {
    let (mut per_instance, mut per_backend) = ([0; INSTANCES], [0; BACKENDS]);
    for served in survey.iter().flatten() {
        per_instance[served.instance] += 1;
        per_backend[served.backend] += 1;
    }
    (per_instance, per_backend)
}

/// Asserts that every connection of each client reached one backend, whichever instance
/// relayed it; returns each client's backend.
fn one_backend_per_client(survey: &[Vec<Served>], what: &str) -> Vec<usize> {
    survey
        .iter()
        .enumerate()
        .map(|(c, tries)| {
            let backend = tries[0].backend;
            assert!(
                tries.iter().all(|s| s.backend == backend),
                "{what}: client {} reached several backends: {tries:?}",
                client_ip(c)
            );
            backend
        })
        .collect()
}

/// Opens long streams from the client addresses in turn until every instance in `expected`
/// relays at least [`STREAMS_PER_INSTANCE`]; each stream with its client and where it went.
fn open_streams(ns: &Netns, expected: &'static [usize]) -> Vec<(usize, TcpStream, Served)> {
    let streams = ns.run_in("c", move || {
        let mut streams = Vec::new();
        for t in 0..STREAM_TRIES {
            let enough = expected.iter().all(|&i| {
                streams
                    .iter()
                    .filter(|(_, _, s): &&(usize, TcpStream, Served)| s.instance == i)
                    .count()
                    >= STREAMS_PER_INSTANCE
            });
            if enough {
                break;
            }
            let c = t % CLIENTS;
            let mut stream = connect_from(client_ip(c)).expect("open a long stream");
            let served = greeting(&mut stream).expect("long stream greeting");
            streams.push((c, stream, served));
        }
        streams
    });
    for &i in expected {
        let n = streams.iter().filter(|(_, _, s)| s.instance == i).count();
        assert!(
            n >= STREAMS_PER_INSTANCE,
            "only {n} of {} streams through s{}",
            streams.len(),
            i + 1
        );
    }
    streams
}

/// How a long stream ended.
#[derive(Debug)]
struct StreamEnd {
    written: u64,
    received: u64,
    prefix_exact: bool,
    write_error: Option<String>,
    end: End,
}

impl StreamEnd {
    /// Every byte written came back, in order, then a clean end of stream.
    fn intact(&self) -> bool {
        self.write_error.is_none()
            && self.end == End::Eof
            && self.prefix_exact
            && self.received == self.written
            && self.written > 0
    }
}

/// Writes payload `seed` in chunks until `stop`, then SHUT_WR, while reading the echo to its
/// end and checking it against the payload.
fn run_stream(stream: TcpStream, seed: u64, stop: &Stop) -> StreamEnd {
    let mut writer = stream.try_clone().expect("try_clone");
    let mut reader = stream;
    std::thread::scope(|scope| {
        let written = scope.spawn(move || {
            let mut payload = Payload::new(seed, u64::MAX);
            let mut chunk = vec![0; STREAM_CHUNK];
            let mut bytes = 0u64;
            while !stop.is_set() {
                payload.fill(&mut chunk);
                if let Err(e) = writer.write_all(&chunk) {
                    return (bytes, Some(format!("write after {bytes} bytes: {e}")));
                }
                bytes += chunk.len() as u64;
                std::thread::sleep(STREAM_STEP);
            }
            let shut = writer.shutdown(Shutdown::Write).err().map(|e| format!("shutdown: {e}"));
            (bytes, shut)
        });
        let mut verifier = Verifier::new(seed, u64::MAX);
        let mut buf = vec![0; 64 * 1024];
        let end = loop {
            match reader.read(&mut buf) {
                Ok(0) => break End::Eof,
                Ok(n) => verifier.update(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break End::of(&e),
            }
        };
        let (written, write_error) = written.join().expect("stream writer");
        StreamEnd {
            written,
            received: verifier.received(),
            prefix_exact: verifier.is_prefix(),
            write_error,
            end,
        }
    })
}

/// (a) and (b): all three instances map each client alike; removing one of four backends
/// moves its clients and at most [`SURVIVORS_MOVED_MAX`] others.
fn every_instance_maps_a_client_alike_and_a_removed_backend_moves_only_its_clients(driver: Driver) {
    let Some(mut fleet) = Fleet::start(driver, "5s") else { return };
    let before = fleet.survey(ROUNDS, 1);
    let (per_instance, per_backend) = distribution(&before);
    println!(
        "fleet ({driver:?}): {} connections from {CLIENTS} clients: per instance {per_instance:?}, \
         per backend {per_backend:?}",
        CLIENTS * ROUNDS
    );
    for (i, n) in per_instance.iter().enumerate() {
        assert!(*n > 0, "ECMP sent no connection to s{}: {per_instance:?}", i + 1);
    }
    let mapping = one_backend_per_client(&before, "all instances");
    let mut mixed = 0;
    for tries in &before {
        mixed += usize::from(tries.iter().any(|s| s.instance != tries[0].instance));
    }
    println!("fleet ({driver:?}): {mixed} of {CLIENTS} clients were served by several instances, each still by one backend");
    assert!(mixed > 0, "no client was spread over several instances: the check proves nothing");

    // (b) The backend with the most clients leaves every instance's config.
    let mut clients_of = [0usize; BACKENDS];
    for &b in &mapping {
        clients_of[b] += 1;
    }
    let removed = (0..BACKENDS).max_by_key(|&j| clients_of[j]).expect("backends");
    fleet.pool.retain(|&j| j != removed);
    fleet.reload_all(Duration::ZERO);
    let accepted = fleet.backends[removed].accepted();
    let after = fleet.survey(2, 10_000);
    assert_eq!(fleet.backends[removed].accepted(), accepted, "the removed backend got sessions");
    let new_mapping = one_backend_per_client(&after, "after the reload");
    let (per_instance, _) = distribution(&after);
    assert!(per_instance.iter().all(|&n| n > 0), "after the reload, per instance {per_instance:?}");
    let (mut moved_theirs, mut moved_others) = (0, 0);
    for (c, (&old, &new)) in mapping.iter().zip(&new_mapping).enumerate() {
        assert_ne!(new, removed, "client {} still reaches the removed backend", client_ip(c));
        if old == removed {
            moved_theirs += 1;
        } else if old != new {
            moved_others += 1;
        }
    }
    let moved = moved_theirs + moved_others;
    println!(
        "fleet ({driver:?}): removing b{} (1 of {BACKENDS}) moved {moved} of {CLIENTS} clients \
         ({:.3}, 1/N = {:.3}): its {} clients and {moved_others} of the others",
        removed + 1,
        moved as f64 / CLIENTS as f64,
        1.0 / BACKENDS as f64,
        clients_of[removed],
    );
    assert_eq!(moved_theirs, clients_of[removed]);
    assert!(
        moved_others <= SURVIVORS_MOVED_MAX,
        "{moved_others} clients of surviving backends moved (at most {SURVIVORS_MOVED_MAX})"
    );
}

/// (c) Withdraw s1's nexthop, SIGTERM it: only its flows move; streams through s2 and s3
/// stay byte-exact; new connections keep their backend; s1 back restores the mapping.
fn stopping_one_instance_moves_only_its_flows(driver: Driver) {
    let Some(mut fleet) = Fleet::start(driver, "2s") else { return };
    let mapping = one_backend_per_client(&fleet.survey(2, 1), "before");
    let streams = open_streams(&fleet.ns, &[0, 1, 2]);
    let stop = Stop::after(THREAD_LIMIT);
    let ends = std::thread::scope(|scope| {
        let _stop_on_exit = stop.guard();
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(k, (_, stream, served))| {
                let stop = &stop;
                (served, scope.spawn(move || run_stream(stream, 500 + k as u64, stop)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // A health checker withdraws s1, then it stops gracefully.
        fleet.set_group(&[1, 2]);
        let mut stopped = fleet.instances[0].take().expect("s1 runs");
        let begun = Instant::now();
        let status = stopped.terminate(Duration::from_secs(15));
        assert!(status.success(), "s1 stopped with {status}");
        println!("fleet ({driver:?}): s1 withdrawn and stopped (exit 0) in {:?}", begun.elapsed());
        drop(stopped);
        let during = fleet.survey(2, 20_000);
        let (per_instance, _) = distribution(&during);
        println!("fleet ({driver:?}): without s1, per instance {per_instance:?}");
        assert_eq!(per_instance[0], 0, "a new connection went to the withdrawn s1");
        assert_eq!(
            one_backend_per_client(&during, "without s1"),
            mapping,
            "a client changed backend"
        );
        // s1 comes back: started again, its nexthop re-added.
        fleet.instances[0] = Some(Sluice::start(fleet.config(0)).expect("s1 starts again"));
        fleet.set_group(&[0, 1, 2]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while buckets_of(&fleet.ns, 0) < BUCKETS / INSTANCES - 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "fleet ({driver:?}): s1 back with {} of {BUCKETS} buckets",
            buckets_of(&fleet.ns, 0)
        );
        let back = fleet.survey(2, 30_000);
        let (per_instance, _) = distribution(&back);
        println!("fleet ({driver:?}): s1 back, per instance {per_instance:?}");
        assert!(per_instance.iter().all(|&n| n > 0), "s1 back: per instance {per_instance:?}");
        assert_eq!(one_backend_per_client(&back, "s1 back"), mapping, "the mapping changed");
        stop.set();
        handles.into_iter().map(|(s, h)| (s, h.join().expect("stream"))).collect::<Vec<_>>()
    });
    let (mut kept, mut cut) = (0, 0);
    for (served, end) in &ends {
        if served.instance == 0 {
            // Its buckets now lead to s2 or s3, which know no such connection and reset it.
            assert!(!end.intact(), "a stream through the stopped s1 claims to be intact: {end:?}");
            assert!(end.prefix_exact, "a stream through s1 got wrong bytes: {end:?}");
            cut += 1;
        } else {
            assert!(end.intact(), "a stream through s{} was harmed: {end:?}", served.instance + 1);
            kept += 1;
        }
    }
    let bytes: u64 = ends.iter().filter(|(s, _)| s.instance != 0).map(|(_, e)| e.received).sum();
    println!(
        "fleet ({driver:?}): {kept} streams through s2/s3 byte-exact ({bytes} bytes echoed), \
         {cut} through s1 ended ({:?})",
        ends.iter().filter(|(s, _)| s.instance == 0).map(|(_, e)| e.end).collect::<Vec<_>>()
    );
}

/// What the load threads saw.
#[derive(Debug, Default)]
struct Load {
    opened: AtomicU64,
    per_instance: [AtomicU64; INSTANCES],
    failures: Mutex<Vec<String>>,
}

/// (d) Under new connections and long streams, a rolling reload then a rolling binary
/// upgrade across the three instances: no connection fails, every byte comes back.
fn rolling_reload_and_upgrade_lose_nothing(driver: Driver) {
    let _load = sluice_tests::load_heavy();
    let Some(mut fleet) = Fleet::start(driver, "60s") else { return };
    let mapping = Arc::new(one_backend_per_client(&fleet.survey(1, 1), "before"));
    let streams = open_streams(&fleet.ns, &[0, 1, 2]);
    let stop = Arc::new(Stop::after(THREAD_LIMIT));
    let load = Arc::new(Load::default());
    let mut successors = Vec::new();
    let started = Instant::now();
    let ends = std::thread::scope(|scope| {
        let _stop_on_exit = stop.guard();
        let loaders: Vec<_> = (0..2)
            .map(|l| {
                let (stop, load, mapping) = (stop.clone(), load.clone(), mapping.clone());
                fleet.ns.spawn_in("c", move || {
                    let mut n = 0usize;
                    while !stop.is_set() {
                        let c = (n * 2 + l) % CLIENTS;
                        n += 1;
                        load.opened.fetch_add(1, Ordering::Relaxed);
                        match probe(client_ip(c), 100_000 + n as u64) {
                            Ok(s) if s.backend == mapping[c] => {
                                load.per_instance[s.instance].fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(s) => load.failures.lock().expect("lock").push(format!(
                                "client {c} reached b{} instead of b{}",
                                s.backend + 1,
                                mapping[c] + 1
                            )),
                            Err(e) => load.failures.lock().expect("lock").push(e),
                        }
                        std::thread::sleep(Duration::from_millis(3));
                    }
                })
            })
            .collect();
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(k, (_, stream, served))| {
                let stop = &*stop;
                (served, scope.spawn(move || run_stream(stream, 900 + k as u64, stop)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1000));
        fleet.connect_timeout = "4s";
        fleet.reload_all(Duration::from_millis(500));
        for i in 0..INSTANCES {
            let pid =
                fleet.instance(i).upgrade().unwrap_or_else(|e| panic!("upgrade s{}: {e}", i + 1));
            successors.push(Adopted::new(pid));
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_millis(1000));
        stop.set();
        for l in loaders {
            l.join().expect("load thread");
        }
        handles.into_iter().map(|(s, h)| (s, h.join().expect("stream"))).collect::<Vec<_>>()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let failures = load.failures.lock().expect("lock");
    let opened = load.opened.load(Ordering::Relaxed);
    let per_instance: Vec<u64> =
        load.per_instance.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let bytes: u64 = ends.iter().map(|(_, e)| e.received).sum();
    println!(
        "fleet ({driver:?}): rolling reload + upgrade under load: {opened} connections \
         ({:.0}/s, per instance {per_instance:?}), {} failed; {} streams, {bytes} bytes echoed",
        opened as f64 / elapsed,
        failures.len(),
        ends.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {opened} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(per_instance.iter().all(|&n| n > 0), "per instance {per_instance:?}");
    for (served, end) in &ends {
        assert!(end.intact(), "a stream through s{} was harmed: {end:?}", served.instance + 1);
    }
    for (i, slot) in fleet.instances.iter_mut().enumerate() {
        let old = slot.as_mut().expect("instance");
        let status = old.wait_exit(Duration::from_secs(20)).expect("the old process exits");
        assert!(status.success(), "old s{}: {status}", i + 1);
    }
    // The successors serve: every client still reaches its backend through every instance.
    let after = fleet.survey(2, 200_000);
    assert_eq!(&one_backend_per_client(&after, "after the upgrade"), &*mapping);
    drop(successors);
}

sluice_tests::for_each_driver!(
    every_instance_maps_a_client_alike_and_a_removed_backend_moves_only_its_clients,
    stopping_one_instance_moves_only_its_flows,
    rolling_reload_and_upgrade_lose_nothing
);

/// `scripts/fleet` (the same topology built by hand, for people) runs, cleans up after
/// itself, and shows what the tests assert: no failed connection, every client on one
/// backend, withdrawing and restoring s1 changing no client's backend.
#[test]
fn the_fleet_script_shows_one_backend_per_client() {
    if !sluice_tests::prerequisite(Netns::available(), "root and ip (iproute2)")
        || !sluice_tests::program("python3", &["--version"], "python3")
    {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fleet");
    let child = std::process::Command::new(script)
        .env("SLUICE_BIN", sluice_tests::binary())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run scripts/fleet");
    // The script names its namespaces after its pid.
    let prefix = format!("sf{}-", child.id());
    let output = child.wait_with_output().expect("scripts/fleet ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.matches(", 0 failed").count(), 3, "{stdout}");
    assert_eq!(stdout.matches("always reached one backend: 60 of 60").count(), 3, "{stdout}");
    assert_eq!(stdout.matches("backend changed: 0\n").count(), 2, "{stdout}");
    assert!(stdout.contains("per instance: s1 0,"), "withdrawn s1 got connections: {stdout}");
    let left = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout).into_owned();
    assert!(!left.lines().any(|l| l.starts_with(&prefix)), "namespaces left behind: {left}");
}
