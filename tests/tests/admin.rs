//! The administration API, every endpoint: `/metrics` (parsed as Prometheus text) and
//! `/stats` count exactly the sessions the clients made; `/connections` lists live sessions
//! and honours `limit`; drain, disable and enable steer new sessions without touching open
//! ones; `POST /reload` applies a changed file; bad requests get the documented 4xx and
//! change nothing; the API also answers on a unix socket.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{
    connect, read_exactly, tagged_round_trip, Admin, Backend, Config, Driver, Payload, ScratchDir,
    Service, Sluice,
};

/// Tags of the two backends: the first byte each writes.
const A: u8 = b'A';
const B: u8 = b'B';
/// Payload sizes of the sessions whose totals the counters must show.
const SIZES: [usize; 6] = [0, 1, 1000, 4096, 65_536, 100_000];

/// What the clients did, summed per backend tag and in total.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    sessions: u64,
    up: u64,
    down: u64,
}

impl Totals {
    fn add(&mut self, up: usize) {
        self.sessions += 1;
        self.up += up as u64;
        // The backend's tag byte, then the echo.
        self.down += up as u64 + 1;
    }
}

/// A sluice with the admin API and one service "web" over tagged echo backends A and B.
fn start(driver: Driver) -> Option<(Sluice, Backend, Backend)> {
    let (a, b) = (Backend::tagged_echo(A), Backend::tagged_echo(B));
    let config =
        Config::new(driver).admin_tcp().service(Service::new("web", &[a.addr(), b.addr()]));
    Some((Sluice::start(config)?, a, b))
}

/// Runs one session per entry of [`SIZES`], each to its close; returns the totals per
/// backend (A, B) and overall.
fn run_sessions(sluice: &Sluice) -> (Totals, Totals, Totals) {
    let (mut a, mut b, mut all) = (Totals::default(), Totals::default(), Totals::default());
    for (i, &size) in SIZES.iter().enumerate() {
        let (tag, _) = tagged_round_trip(sluice.addr("web"), &Payload::bytes(i as u64, size));
        match tag {
            A => a.add(size),
            B => b.add(size),
            other => panic!("unknown backend tag {other}"),
        }
        all.add(size);
    }
    (a, b, all)
}

/// `/stats` once no session is open any more and the (only) log sink has taken every close
/// record: a client sees its EOF a moment before sluice closes and accounts for the
/// session, and records reach the log thread in batches.
fn settled_stats(admin: &Admin) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = admin.stats();
        let sum = |list: &str, key: &str| {
            let items = stats[list].as_array().expect("list");
            items.iter().map(|x| x[key].as_u64().expect("counter")).sum::<u64>()
        };
        let logged = sum("log_sinks", "written") + sum("log_sinks", "dropped");
        if sum("services", "active") == 0 && logged == sum("workers", "closed") {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "sessions or records still pending after 5 s: {stats:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn service<'a>(stats: &'a Value, name: &str) -> &'a Value {
    let services = stats["services"].as_array().expect("services");
    services.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no service {name}"))
}

fn backend<'a>(stats: &'a Value, service_name: &str, addr: &str) -> &'a Value {
    let backends = service(stats, service_name)["backends"].as_array().expect("backends");
    backends.iter().find(|b| b["addr"] == addr).unwrap_or_else(|| panic!("no backend {addr}"))
}

/// After six closed sessions with known sizes, `/metrics` parses as Prometheus text and its
/// session, byte, per-backend and connect-latency counts equal what the clients did.
fn metrics_count_exactly_the_closed_sessions_and_their_bytes(driver: Driver) {
    let Some((sluice, a, b)) = start(driver) else { return };
    let admin = sluice.admin();
    let (on_a, on_b, all) = run_sessions(&sluice);
    settled_stats(&admin);
    let m = admin.metrics();

    let web = [("service", "web")];
    assert_eq!(m.get("sluice_sessions_total", &web), all.sessions as f64);
    assert_eq!(m.get("sluice_sessions_active", &web), 0.0);
    let up = [("service", "web"), ("direction", "up")];
    let down = [("service", "web"), ("direction", "down")];
    assert_eq!(m.get("sluice_session_bytes_total", &up), all.up as f64);
    assert_eq!(m.get("sluice_session_bytes_total", &down), all.down as f64);
    assert_eq!(m.get("sluice_connect_latency_seconds_count", &web), all.sessions as f64);
    let buckets = m.histogram("sluice_connect_latency_seconds", &web);
    assert_eq!(buckets.last().map(|b| b.1), Some(all.sessions as f64), "+Inf bucket: {buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "buckets not cumulative: {buckets:?}");
    for (backend, totals) in [(a.addr(), on_a), (b.addr(), on_b)] {
        let addr = backend.to_string();
        let labels = [("service", "web"), ("backend", addr.as_str())];
        assert_eq!(m.get("sluice_backend_sessions_total", &labels), totals.sessions as f64);
        let up = [("service", "web"), ("backend", addr.as_str()), ("direction", "up")];
        let down = [("service", "web"), ("backend", addr.as_str()), ("direction", "down")];
        assert_eq!(m.get("sluice_backend_bytes_total", &up), totals.up as f64);
        assert_eq!(m.get("sluice_backend_bytes_total", &down), totals.down as f64);
    }
    assert_eq!(on_a.sessions + on_b.sessions, SIZES.len() as u64);
    assert_eq!(a.accepted() as u64, on_a.sessions);
}

/// After the same six sessions, `/stats` shows the same figures per service and backend,
/// and its worker counters add up to them.
fn stats_show_the_same_figures(driver: Driver) {
    let Some((sluice, a, b)) = start(driver) else { return };
    let admin = sluice.admin();
    let (on_a, on_b, all) = run_sessions(&sluice);
    let stats = settled_stats(&admin);

    let web = service(&stats, "web");
    let figures =
        |v: &Value| (v["sessions"].clone(), v["bytes_up"].clone(), v["bytes_down"].clone());
    assert_eq!(figures(web), (all.sessions.into(), all.up.into(), all.down.into()), "{web:#}");
    assert_eq!((web["active"].clone(), web["connect_errors"].clone()), (0.into(), 0.into()));
    for (addr, totals) in [(a.addr(), on_a), (b.addr(), on_b)] {
        let entry = backend(&stats, "web", &addr.to_string());
        assert_eq!(
            figures(entry),
            (totals.sessions.into(), totals.up.into(), totals.down.into()),
            "{entry:#}"
        );
        assert_eq!(entry["state"], "enabled");
    }
    let workers = stats["workers"].as_array().expect("workers");
    let sum = |key: &str| workers.iter().map(|w| w[key].as_u64().expect("counter")).sum::<u64>();
    assert_eq!((sum("accepted"), sum("closed")), (all.sessions, all.sessions), "{stats:#}");
    assert_eq!((sum("bytes_up"), sum("bytes_down")), (all.up, all.down), "{stats:#}");
    assert_eq!((stats["reloads"].clone(), stats["reload_failures"].clone()), (0.into(), 0.into()));
}

/// While three sessions are open, `/connections` lists them with client, service, backend
/// and the bytes relayed so far; `limit=2` lists two.
fn connections_list_live_sessions_and_honour_limit(driver: Driver) {
    let Some((sluice, a, b)) = start(driver) else { return };
    let admin = sluice.admin();
    let mut clients: Vec<_> = (0..3).map(|_| connect(sluice.addr("web"))).collect();
    let mut tags = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let payload = Payload::bytes(i as u64, 1000 * (i + 1));
        client.write_all(&payload).unwrap();
        let back = read_exactly(client, payload.len() + 1);
        assert_eq!(&back[1..], &payload[..]);
        tags.push(back[0]);
    }

    let listed = admin.connections(None);
    assert_eq!(listed["count"], 3, "{listed:#}");
    let entries = listed["connections"].as_array().expect("connections");
    for (i, client) in clients.iter().enumerate() {
        let local = client.local_addr().unwrap().to_string();
        let entry = entries
            .iter()
            .find(|e| e["client"] == local)
            .unwrap_or_else(|| panic!("client {local} not listed: {listed:#}"));
        let backend = if tags[i] == A { a.addr() } else { b.addr() };
        assert_eq!(entry["service"], "web");
        assert_eq!(entry["listener"], sluice.addr("web").to_string());
        assert_eq!(entry["backend"], backend.to_string());
        assert_eq!(entry["state"], "relaying");
        let sent = 1000 * (i as u64 + 1);
        assert_eq!(
            (entry["bytes_up"].clone(), entry["bytes_down"].clone()),
            (sent.into(), (sent + 1).into())
        );
    }
    let limited = admin.connections(Some(2));
    assert_eq!(limited["count"], 2, "{limited:#}");
    assert_eq!(limited["connections"].as_array().map(Vec::len), Some(2));
}

/// Opens sessions until one is served by the backend tagged `tag`; returns it open, after
/// checking that it relays. Round-robin over two backends makes this take one or two tries.
fn open_session_on(sluice: &Sluice, tag: u8) -> std::net::TcpStream {
    for _ in 0..4 {
        let mut client = connect(sluice.addr("web"));
        client.write_all(b"hello").unwrap();
        let back = read_exactly(&mut client, 6);
        if back[0] == tag {
            return client;
        }
    }
    panic!("no session reached backend {}", tag as char);
}

/// Whether an open session still relays both ways.
fn assert_relays(client: &mut std::net::TcpStream, what: &str) {
    client.write_all(what.as_bytes()).unwrap();
    assert_eq!(read_exactly(client, what.len()), what.as_bytes(), "open session after {what}");
}

/// Tags of the backends that serve `n` new sessions.
fn serve(sluice: &Sluice, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| tagged_round_trip(sluice.addr("web"), &Payload::bytes(i as u64, 100)).0)
        .collect()
}

/// Drain, then disable backend A: each time A gets no new session (B gets them all) while
/// the session already open on A keeps relaying, and `/stats` shows A's state; enable
/// gives A new sessions again.
fn drained_and_disabled_backends_get_no_new_sessions_until_enabled(driver: Driver) {
    let Some((sluice, a, _b)) = start(driver) else { return };
    let admin = sluice.admin();
    let mut on_a = open_session_on(&sluice, A);
    let path = |action: &str| format!("/backends/web/{}/{action}", a.addr());

    for (action, state) in [("drain", "draining"), ("disable", "disabled")] {
        let answer = admin.post(&path(action));
        assert_eq!(answer.status, 200, "{action}: {}", answer.text());
        assert_eq!(answer.json()["state"], state);
        assert_eq!(backend(&admin.stats(), "web", &a.addr().to_string())["state"], state);
        let accepted_before = a.accepted();
        assert_eq!(serve(&sluice, 6), vec![B; 6], "new sessions while A is {state}");
        assert_eq!(a.accepted(), accepted_before, "A accepted a connection while {state}");
        assert_relays(&mut on_a, action);
    }

    let answer = admin.post(&path("enable"));
    assert_eq!((answer.status, answer.json()["state"].clone()), (200, "enabled".into()));
    let tags = serve(&sluice, 4);
    assert_eq!(tags.iter().filter(|&&t| t == A).count(), 2, "after enable: {tags:?}");
    assert_relays(&mut on_a, "enable");
}

/// `POST /reload` with the file changed to route "web" to B alone answers 200 with tables
/// version 2, and the next session is served by B.
fn reload_endpoint_applies_a_valid_changed_file(driver: Driver) {
    let (a, b) = (Backend::tagged_echo(A), Backend::tagged_echo(B));
    let config = Config::new(driver).admin_tcp().service(Service::new("web", &[a.addr()]));
    let Some(sluice) = Sluice::start(config.clone()) else { return };
    assert_eq!(tagged_round_trip(sluice.addr("web"), b"before").0, A);

    let mut next = config;
    next.service_mut("web").backends = vec![b.addr()];
    sluice.write_config(&next);
    let answer = sluice.admin().post("/reload");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["tables_version"], 2);
    assert_eq!(tagged_round_trip(sluice.addr("web"), b"after").0, B);
    assert_eq!(sluice.admin().stats()["reloads"], 1);
}

/// `/stats` without the fields that move by themselves.
fn comparable(mut stats: Value) -> Value {
    stats.as_object_mut().expect("stats object").remove("uptime_seconds");
    stats
}

/// One bad request and the answer it must get.
struct BadRequest<'a> {
    method: &'a str,
    path: &'a str,
    body: &'a [u8],
    status: u16,
    /// The `Allow` header a 405 must carry.
    allow: Option<&'a str>,
}

impl<'a> BadRequest<'a> {
    fn new(method: &'a str, path: &'a str, status: u16) -> Self {
        Self { method, path, body: b"", status, allow: None }
    }

    fn body(self, body: &'a [u8]) -> Self {
        Self { body, ..self }
    }

    fn allow(self, allow: &'a str) -> Self {
        Self { allow: Some(allow), ..self }
    }
}

/// Unknown service or backend 404, wrong method 405 with an Allow header, a body over
/// 64 KiB 413, `limit=0` 400, an unknown path 404; each answers a JSON `error`, leaves
/// `/stats` as it was, and a probe session afterwards is still served by A.
fn bad_requests_get_4xx_and_change_nothing(driver: Driver) {
    let a = Backend::tagged_echo(A);
    let config = Config::new(driver).admin_tcp().service(Service::new("web", &[a.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let admin = sluice.admin();
    let big = vec![b'x'; 64 * 1024 + 1];
    let backend_path = format!("/backends/web/{}/drain", a.addr());
    let cases = [
        BadRequest::new("POST", "/backends/nosuch/127.0.0.1:1/drain", 404),
        BadRequest::new("POST", "/backends/web/127.0.0.1:1/drain", 404),
        BadRequest::new("GET", &backend_path, 405).allow("POST"),
        BadRequest::new("GET", "/reload", 405).allow("POST"),
        BadRequest::new("POST", "/stats", 405).allow("GET"),
        BadRequest::new("POST", "/reload", 413).body(&big),
        BadRequest::new("GET", "/connections?limit=0", 400),
        BadRequest::new("GET", "/nosuch", 404),
    ];
    assert_eq!(tagged_round_trip(sluice.addr("web"), b"probe").0, A);
    for BadRequest { method, path, body, status, allow } in cases {
        let before = comparable(settled_stats(&admin));
        let answer = admin.request(method, path, body);
        let what = format!("{method} {path} ({} body bytes)", body.len());
        assert_eq!(answer.status, status, "{what}: {}", answer.text());
        let error = answer.json()["error"].clone();
        assert!(
            error.as_str().is_some_and(|e| !e.is_empty()),
            "{what}: no error: {}",
            answer.text()
        );
        assert_eq!(answer.header("Allow"), allow, "{what}: Allow header");
        assert_eq!(comparable(admin.stats()), before, "{what} changed /stats");
        assert_eq!(tagged_round_trip(sluice.addr("web"), b"probe").0, A, "routing after {what}");
    }
}

/// With `listen = "unix:PATH"`, `GET /stats` over the socket answers 200 with the service.
#[test]
fn admin_on_a_unix_socket_answers_stats() {
    let dir = ScratchDir::new();
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .admin_unix(&dir.join("admin.sock"))
        .service(Service::new("web", &[echo.addr()]));
    let sluice = Sluice::start(config).expect("epoll is always available");
    let stats = sluice.admin().stats();
    assert_eq!(service(&stats, "web")["listen"][0], sluice.addr("web").to_string());
    assert_eq!(stats["driver"], "epoll");
}

sluice_tests::for_each_driver!(
    metrics_count_exactly_the_closed_sessions_and_their_bytes,
    stats_show_the_same_figures,
    connections_list_live_sessions_and_honour_limit,
    drained_and_disabled_backends_get_no_new_sessions_until_enabled,
    reload_endpoint_applies_a_valid_changed_file,
    bad_requests_get_4xx_and_change_nothing
);
