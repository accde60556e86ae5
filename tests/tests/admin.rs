//! The administration API, every endpoint: `/metrics` (parsed as Prometheus text) and
//! `/stats` count exactly the sessions the clients made; `/connections` lists live sessions
//! and honours `limit`; drain, disable and enable steer new sessions without touching open
//! ones; `POST /reload` applies a changed file; bad requests get the documented 4xx and
//! change nothing; the API also answers on a unix socket. `DELETE /connections/{id}` cuts
//! one live session abortively (both peers see a reset, the record says `admin_kill`) and
//! nothing else; `/connections` filters by service and client network; `/healthz`,
//! `/readyz` and `/history` answer what they promise; `sluice_build_info` and the
//! `process_*` figures are the running process's own.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{
    connect, drain, echo_round_trip, read_exactly, set_timeouts, tagged_round_trip, udp_client,
    udp_exchange, Admin, Backend, Config, Driver, End, Payload, ScratchDir, Service, SessionKey,
    Sluice, UdpServer,
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

/// The `/connections` entry of the session whose client is `client`.
fn entry_of(admin: &Admin, client: std::net::SocketAddr) -> Value {
    let listed = admin.connections(None);
    let entries = listed["connections"].as_array().expect("connections").clone();
    entries
        .into_iter()
        .find(|e| e["client"] == client.to_string())
        .unwrap_or_else(|| panic!("{client} not listed: {listed:#}"))
}

/// Two sessions relay through a sink backend; `DELETE /connections/{id}` of one answers
/// 200, its client sees a reset (not a clean EOF) within a second, the backend side is
/// reset too, its close record says `admin_kill`; the other session still relays. Killing
/// it again answers 404, a malformed id 400, and neither touches the survivor.
fn kill_cuts_one_session_abortively(driver: Driver) {
    let (sink, drained) = Backend::sink();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .admin_tcp()
        .service(Service::new("web", &[sink.addr()]))
        .service(Service::new("echo", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let admin = sluice.admin();
    let mut victim = connect(sluice.addr("web"));
    victim.write_all(b"before the cut").unwrap();
    let mut survivor = connect(sluice.addr("echo"));
    survivor.write_all(b"ping").unwrap();
    assert_eq!(read_exactly(&mut survivor, 4), b"ping");
    let key = SessionKey::of(&victim);
    let deadline = Instant::now() + Duration::from_secs(5);
    let entry = loop {
        let e = entry_of(&admin, key.client);
        if e["state"] == "relaying" || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let id = entry["id"].as_str().expect("an id string").to_string();
    assert!(id.parse::<u64>().is_ok(), "id {id} is a number");

    let answer = admin.delete(&format!("/connections/{id}"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["reason"], "admin_kill");
    set_timeouts(&victim, Duration::from_secs(2));
    let end = drain(&mut victim);
    assert_eq!(end.end, End::Reset, "the client must see a reset, not {:?}", end.end);
    let backend_side = drained.first(Duration::from_secs(2)).expect("the backend side ended");
    assert_eq!(backend_side.end, End::Reset, "the backend must see a reset");
    assert_eq!(backend_side.bytes, b"before the cut".len() as u64);
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("a close record");
    assert_eq!(record.reason, "admin_kill");

    assert_eq!(admin.delete(&format!("/connections/{id}")).status, 404, "a second kill");
    assert_eq!(admin.delete("/connections/not-a-number").status, 400);
    assert_eq!(admin.request("GET", &format!("/connections/{id}"), b"").status, 405);
    survivor.write_all(b"pong").unwrap();
    assert_eq!(read_exactly(&mut survivor, 4), b"pong", "the other session is untouched");
    echo_round_trip(sluice.addr("echo"), 3, 1000);
}

/// `/connections?service=S` lists that service's sessions only and `client=NET` those
/// whose client is in NET; a bad network is a 400.
fn connections_filter_by_service_and_client(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver)
        .admin_tcp()
        .service(Service::new("web", &[echo.addr()]))
        .service(Service::new("api", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let admin = sluice.admin();
    let open = |service: &str, ip: [u8; 4]| {
        let mut c = sluice_tests::connect_from(ip.into(), sluice.addr(service));
        c.write_all(b"x").unwrap();
        assert_eq!(read_exactly(&mut c, 1), b"x");
        c
    };
    let _clients =
        [open("web", [127, 0, 0, 1]), open("web", [127, 0, 0, 2]), open("api", [127, 0, 0, 2])];
    let count = |query: &str| {
        let r = admin.get(&format!("/connections?{query}"));
        assert_eq!(r.status, 200, "{query}: {}", r.text());
        r.json()["count"].as_u64().expect("count")
    };
    assert_eq!(count("service=web"), 2);
    assert_eq!(count("service=api"), 1);
    assert_eq!(count("client=127.0.0.2"), 2);
    assert_eq!(count("client=127.0.0.0%2F24&service=web"), 2);
    assert_eq!(count("client=127.0.0.2&service=web&limit=1"), 1);
    assert_eq!(count("service=nosuch"), 0);
    assert_eq!(admin.get("/connections?client=banana").status, 400);
}

/// A UDP flow is listed with an id and `DELETE /connections/{id}` ends it (its record says
/// `admin_kill`); the next datagram from the same client opens a new flow.
fn kill_ends_a_udp_flow(driver: Driver) {
    let server = UdpServer::tagged_echo(b'U');
    let config = Config::new(driver).admin_tcp().service(Service::udp("dns", &[server.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let admin = sluice.admin();
    let client = udp_client(std::net::Ipv4Addr::LOCALHOST, Duration::from_secs(2));
    assert_eq!(udp_exchange(&client, sluice.addr("dns"), b"one").as_deref(), Some(&b"Uone"[..]));
    let local = client.local_addr().unwrap().to_string();
    let listed = admin.connections(None);
    let flow =
        listed["connections"].as_array().unwrap().iter().find(|e| e["client"] == local).cloned();
    let flow = flow.unwrap_or_else(|| panic!("flow of {local} not listed: {listed:#}"));
    assert_eq!(flow["state"], "udp");
    let id = flow["id"].as_str().unwrap();
    assert_eq!(admin.delete(&format!("/connections/{id}")).status, 200);
    let line = sluice.wait_for_log("reason=admin_kill", Duration::from_secs(5));
    assert!(line.is_some_and(|l| l.contains(&local)), "the flow's record names admin_kill");
    assert_eq!(admin.delete(&format!("/connections/{id}")).status, 404);
    assert_eq!(udp_exchange(&client, sluice.addr("dns"), b"two").as_deref(), Some(&b"Utwo"[..]));
}

/// `/healthz` and `/readyz` answer 200 with JSON while sluice serves; `/history` gains one
/// sample a second whose totals count the sessions made, and `since` returns only newer
/// ones.
fn health_readiness_and_history(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver).admin_tcp().service(Service::new("web", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let admin = sluice.admin();
    let health = admin.get("/healthz");
    assert_eq!((health.status, health.json()["status"].clone()), (200, "alive".into()));
    let ready = admin.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["ready"], true);
    for i in 0..20 {
        echo_round_trip(sluice.addr("web"), i, 10_000);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let history = admin.get("/history");
    assert_eq!(history.status, 200);
    let history = history.json();
    assert_eq!(history["services"][0], "web");
    let samples = history["samples"].as_array().expect("samples").clone();
    assert!(samples.len() >= 2, "a sample a second: {history:#}");
    let new: u64 = samples.iter().map(|s| s[1][1].as_u64().unwrap()).sum();
    let up: u64 = samples.iter().map(|s| s[1][2].as_u64().unwrap()).sum();
    // The first sample has no earlier one to count from; the 20 sessions happened after it
    // or are counted in its successors.
    assert!(new <= 20 && up <= 200_000, "{history:#}");
    let last = samples.last().unwrap()[0].as_u64().unwrap();
    let since = admin.get(&format!("/history?since={last}")).json();
    assert_eq!(since["samples"].as_array().map(Vec::len), Some(0));
    assert_eq!(admin.get("/history?since=soon").status, 400);
    // After the sessions, another second counts them all.
    for i in 0..10 {
        echo_round_trip(sluice.addr("web"), i, 1000);
    }
    std::thread::sleep(Duration::from_millis(2200));
    let later = admin.get(&format!("/history?since={last}")).json();
    let samples = later["samples"].as_array().unwrap();
    let new: u64 = samples.iter().map(|s| s[2][0][1].as_u64().unwrap()).sum();
    let up: u64 = samples.iter().map(|s| s[2][0][2].as_u64().unwrap()).sum();
    assert_eq!((new, up), (10, 10_000), "{later:#}");
}

/// `sluice_build_info` names the build `sluice --version` names, and the `process_*`
/// figures are the process's own as /proc shows them. Driver-independent: once.
#[test]
fn build_info_and_process_figures_are_the_processs_own() {
    let backend = Backend::echo();
    let config =
        Config::new(Driver::Epoll).admin_tcp().service(Service::new("web", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let version = sluice.command(&["--version"]);
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let number = version.lines().next().and_then(|l| l.strip_prefix("sluice ")).unwrap();
    let revision = version.lines().find_map(|l| l.strip_prefix("revision: ")).unwrap();
    // Some CPU time to show (the clock counts in 10 ms ticks).
    for i in 0..2000 {
        if sluice_tests::cpu_time(sluice.pid()) > Duration::ZERO {
            break;
        }
        echo_round_trip(sluice.addr("web"), i, 1000);
    }
    let cpu_before = sluice_tests::cpu_time(sluice.pid()).as_secs_f64();
    let m = sluice.admin().metrics();
    let cpu_after = sluice_tests::cpu_time(sluice.pid()).as_secs_f64();
    assert_eq!(m.get("sluice_build_info", &[("version", number), ("revision", revision)]), 1.0);
    assert_eq!(m.series("sluice_build_info"), 1);

    let status = std::fs::read_to_string(format!("/proc/{}/status", sluice.pid())).unwrap();
    let threads: f64 =
        status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap();
    assert_eq!(m.get("process_threads", &[]), threads);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", sluice.pid())).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(m.get("process_max_fds", &[]), soft);
    // The scrape's own connection comes and goes around the count.
    let fds = sluice.fd_count() as f64;
    assert!((m.get("process_open_fds", &[]) - fds).abs() <= 2.0, "{fds} fds open");
    let rss = (sluice.rss_kib() * 1024) as f64;
    let resident = m.get("process_resident_memory_bytes", &[]);
    assert!(resident > rss * 0.5 && resident < rss * 1.5, "{resident} against {rss}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let started = m.get("process_start_time_seconds", &[]);
    assert!(started <= now.as_secs_f64() && started > now.as_secs_f64() - 60.0, "{started}");
    let cpu = m.get("process_cpu_seconds_total", &[]);
    assert!(
        cpu > 0.0 && cpu >= cpu_before && cpu <= cpu_after,
        "{cpu_before} <= {cpu} <= {cpu_after}"
    );
}

sluice_tests::for_each_driver!(
    kill_cuts_one_session_abortively,
    connections_filter_by_service_and_client,
    kill_ends_a_udp_flow,
    health_readiness_and_history,
    metrics_count_exactly_the_closed_sessions_and_their_bytes,
    stats_show_the_same_figures,
    connections_list_live_sessions_and_honour_limit,
    drained_and_disabled_backends_get_no_new_sessions_until_enabled,
    reload_endpoint_applies_a_valid_changed_file,
    bad_requests_get_4xx_and_change_nothing
);
