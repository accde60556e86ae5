//! What the admin API reports: a JSON view of the counters (`/stats`, `/connections`) and
//! the Prometheus text exposition (`/metrics`, format 0.0.4). Both read the same atomics
//! the workers update; nothing here takes a lock the data path uses.
//!
//! Byte and session totals of services and backends are added when a session closes; live
//! sessions show their running byte counts in `/connections`. Per-client accounting
//! (`clients` in `/stats`, `sluice_client_*` and `sluice_network_*` in `/metrics`) lists the
//! top `admin.top_clients` client addresses and networks by bytes, summed over services:
//! bytes of a session are added when it closes and every
//! [`ACCOUNTING_INTERVAL`](sluice_engine::accounting::ACCOUNTING_INTERVAL) while it lasts.

use std::fmt::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde_json::{json, Value};
use sluice_engine::accounting::{self, Usage};
use sluice_engine::acl::Action;
use sluice_engine::balance::Backend;
use sluice_engine::capture::{CaptureStats, StopReason};
use sluice_engine::counters::{BackendState, ServiceCounters, UdpCounters, WorkerStats};
use sluice_engine::events::EventSink;
use sluice_engine::record::{LiveSession, Protocol};
use sluice_engine::tables::{Rules, Tables};

use crate::admin::auth::Tokens;
use crate::admin::history::{Denials, SharedHistory};
use crate::sinks::SinkCounters;

/// Everything the admin API reads, shared with the control thread.
#[derive(Debug)]
pub struct Shared {
    pub tables: Arc<ArcSwap<Tables>>,
    pub workers: Vec<Arc<WorkerStats>>,
    pub driver: &'static str,
    pub driver_detail: String,
    pub started: Instant,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub events: EventSink,
    /// Counters of the connection-log sinks in use.
    pub sinks: ArcSwap<Vec<Arc<SinkCounters>>>,
    /// The flow-table bound of each worker's UDP loop.
    pub max_flows: usize,
    /// Capture counters of the process.
    pub capture: Arc<CaptureStats>,
    /// The admin API's tokens in force (a reload may change them).
    pub admin_tokens: ArcSwap<Tokens>,
    /// The per-second history of the last hour (sampled by the control thread).
    pub history: SharedHistory,
    /// The latest denied connections (noted by the log thread).
    pub denials: Arc<Denials>,
    /// Every worker thread runs (updated by the control thread).
    pub workers_running: AtomicBool,
    /// A graceful stop has begun.
    pub draining: AtomicBool,
}

impl Shared {
    /// The `/history` document: samples after `since` (seconds since 1970).
    pub fn history_json(&self, since: u64) -> Value {
        self.history.to_json(since)
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The `/stats` document.
pub fn stats(shared: &Shared) -> Value {
    let tables = shared.tables.load();
    let now = Instant::now();
    let services: Vec<Value> = tables
        .services()
        .iter()
        .map(|s| {
            let c = &s.counters;
            let backends: Vec<Value> = s
                .pool
                .backends()
                .iter()
                .map(|b| {
                    let st = &b.state;
                    json!({
                        "addr": b.addr.to_string(),
                        "state": st.admin().as_str(),
                        "health": health_json(b, now),
                        "sessions": get(&st.sessions),
                        "active": get(&st.active),
                        "bytes_up": get(&st.bytes_up),
                        "bytes_down": get(&st.bytes_down),
                        "connect_errors": get(&st.connect_errors),
                    })
                })
                .collect();
            json!({
                "name": &*s.name,
                "listen": s.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "sessions": get(&c.sessions),
                "active": get(&c.active),
                "bytes_up": get(&c.bytes_up),
                "bytes_down": get(&c.bytes_down),
                "connect_errors": get(&c.connect_errors),
                "unserved": get(&c.unserved),
                "no_backend": get(&c.no_backend),
                "proxy_errors": get(&c.proxy_errors),
                "denied": get(&c.denied),
                "limited": get(&c.limited),
                "cut": get(&c.cut),
                "limit_refusals": s.limit_state.refusals().iter().map(|(e, n)| (e.as_str().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "limit_tracked_clients": s.limit_state.tracked().0,
                "limit_tracked_networks": s.limit_state.tracked().1,
                "algorithm": s.pool.algorithm().as_str(),
                "rules": rules_json(&s.rules),
                "default_action": action_name(&s.default),
                "default_hits": get(&s.default_hits),
                "backends": backends,
                "protocol": s.protocol.as_str(),
                "udp": (s.protocol == Protocol::Udp).then(|| udp_json(&c.udp)),
            })
        })
        .collect();
    let workers: Vec<Value> = shared
        .workers
        .iter()
        .enumerate()
        .map(|(id, w)| {
            json!({
                "id": id,
                "accepted": get(&w.accepted),
                "active": get(&w.active),
                "closed": get(&w.closed),
                "bytes_up": get(&w.bytes_up),
                "bytes_down": get(&w.bytes_down),
                "accept_errors": get(&w.accept_errors),
                "connect_errors": get(&w.connect_errors),
                "udp_flows_active": get(&w.udp_flows_active),
                "udp_flows_evicted": get(&w.udp_flows_evicted),
                "udp_unmatched": get(&w.udp_unmatched),
                "accept_backoffs": get(&w.accept_backoffs),
                "accept_paused_full": get(&w.accept_paused_full),
                "backend_socket_errors": get(&w.backend_socket_errors),
                "spare_pipes": get(&w.spare_pipes),
                "accepted_reset": get(&w.accepted_reset),
                "ring_fallbacks": get(&w.ring_fallbacks),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "driver": shared.driver,
        "driver_detail": shared.driver_detail,
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "tables_version": tables.version,
        "reloads": get(&shared.reloads),
        "reload_failures": get(&shared.reload_failures),
        "records_dropped": shared.events.dropped(),
        "log_sinks": shared.sinks.load().iter().map(|s| json!({
            "name": s.name,
            "written": get(&s.written),
            "dropped": get(&s.dropped),
        })).collect::<Vec<_>>(),
        "capture": capture_json(&shared.capture),
        "firewall": rules_json(&tables.firewall),
        "pools": tables.pools.iter().map(|p| json!({
            "name": &*p.name,
            "algorithm": p.pool.algorithm().as_str(),
            "send_proxy": p.pool.send_proxy.map(|v| v.as_str()),
            "backends": p.pool.backends().iter().map(|b| json!({
                "addr": b.addr.to_string(),
                "state": b.state.admin().as_str(),
                "health": health_json(b, now),
                "sessions": get(&b.state.sessions),
                "active": get(&b.state.active),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "services": services,
        "clients": clients_json(&tables),
        "workers": workers,
        "udp_max_flows_per_worker": shared.max_flows,
    })
}

/// The listed clients and the listed networks, heaviest first.
pub type TopClients = (Vec<(IpAddr, Usage)>, Vec<(IpNet, Usage)>);

/// The top clients and networks of every TCP service, by bytes, summed over services.
pub fn top_clients(tables: &Tables) -> Option<TopClients> {
    let spec = tables.accounting?;
    let states = || tables.services().iter().map(|s| &s.limit_state);
    let clients = accounting::top(states().flat_map(|l| l.accounted_clients()), spec.top);
    let networks = accounting::top(states().flat_map(|l| l.accounted_networks()), spec.top);
    let networks = networks
        .into_iter()
        .map(|(addr, u)| {
            let len = if addr.is_ipv4() { spec.network_v4 } else { spec.network_v6 };
            (IpNet::new(addr, len).unwrap_or_else(|_| IpNet::from(addr)), u)
        })
        .collect();
    Some((clients, networks))
}

fn usage_json(u: &Usage) -> serde_json::Map<String, Value> {
    let v = json!({
        "bytes_up": u.bytes_up,
        "bytes_down": u.bytes_down,
        "sessions": u.sessions,
        "active": u.active,
    });
    match v {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The `clients` object of `/stats`: `null` when accounting is off.
fn clients_json(tables: &Tables) -> Value {
    let Some(spec) = tables.accounting else { return Value::Null };
    let Some((clients, networks)) = top_clients(tables) else { return Value::Null };
    let row = |key: &str, name: String, u: &Usage| {
        let mut m = usage_json(u);
        m.insert(key.to_string(), json!(name));
        Value::Object(m)
    };
    json!({
        "top": spec.top,
        "network_v4": spec.network_v4,
        "network_v6": spec.network_v6,
        "clients": clients.iter().map(|(a, u)| row("client", a.to_string(), u)).collect::<Vec<_>>(),
        "networks": networks.iter().map(|(n, u)| row("network", n.to_string(), u)).collect::<Vec<_>>(),
    })
}

/// The `sluice_client_*` and `sluice_network_*` families: one series per listed client or
/// network, never more than `admin.top_clients` of each.
fn client_metrics(f: &mut Family<'_>, tables: &Tables) {
    let Some((clients, networks)) = top_clients(tables) else { return };
    let clients: Vec<(String, Usage)> = clients.iter().map(|(a, u)| (a.to_string(), *u)).collect();
    let networks: Vec<(String, Usage)> =
        networks.iter().map(|(n, u)| (n.to_string(), *u)).collect();
    for (prefix, label, list) in [("client", "client", &clients), ("network", "network", &networks)]
    {
        let name = format!("sluice_{prefix}_bytes_total");
        f.header(
            &name,
            "counter",
            &format!("Bytes of the top {prefix}s' sessions, by direction (up: from the client)."),
        );
        for (who, u) in list {
            f.sample(&name, &[(label, who), ("direction", "up")], u.bytes_up);
            f.sample(&name, &[(label, who), ("direction", "down")], u.bytes_down);
        }
        let name = format!("sluice_{prefix}_sessions_total");
        f.header(&name, "counter", &format!("Sessions admitted of the top {prefix}s."));
        for (who, u) in list {
            f.sample(&name, &[(label, who)], u.sessions);
        }
        let name = format!("sluice_{prefix}_sessions_active");
        f.header(&name, "gauge", &format!("Sessions open now of the top {prefix}s."));
        for (who, u) in list {
            f.sample(&name, &[(label, who)], u.active);
        }
    }
}

/// A backend's share and health: `up` means it takes new sessions (enabled, healthy, not
/// ejected, below its cap).
fn health_json(b: &Backend, now: Instant) -> Value {
    json!({
        "up": b.eligible(now),
        "healthy": b.state.healthy(),
        "ejected": b.state.ejected(now),
        "ejections": get(&b.state.ejections),
        "weight": b.weight,
        "max_sessions": b.max_sessions,
        "backup": b.backup,
    })
}

fn udp_json(u: &UdpCounters) -> Value {
    json!({
        "flows": get(&u.flows),
        "flows_active": get(&u.flows_active),
        "flows_expired": get(&u.flows_expired),
        "flows_evicted": get(&u.flows_evicted),
        "datagrams_up": get(&u.datagrams_up),
        "datagrams_down": get(&u.datagrams_down),
        "bytes_up": get(&u.bytes_up),
        "bytes_down": get(&u.bytes_down),
        "denied": get(&u.denied),
        "oversized": get(&u.oversized),
        "no_backend": get(&u.no_backend),
        "dropped": get(&u.dropped),
    })
}

type UdpMetric = (&'static str, &'static str, &'static str, fn(&UdpCounters) -> u64);

/// UDP families, per UDP service (and per worker for the flow table).
fn udp_metrics(f: &mut Family<'_>, tables: &Tables, shared: &Shared) {
    let udp: Vec<_> = tables.services().iter().filter(|s| s.protocol == Protocol::Udp).collect();
    let metrics: [UdpMetric; 8] = [
        ("sluice_udp_flows_total", "counter", "UDP flows created.", |u| get(&u.flows)),
        ("sluice_udp_flows_active", "gauge", "UDP flows open now.", |u| get(&u.flows_active)),
        (
            "sluice_udp_flows_expired_total",
            "counter",
            "UDP flows closed after udp_idle_timeout.",
            |u| get(&u.flows_expired),
        ),
        (
            "sluice_udp_flows_evicted_total",
            "counter",
            "UDP flows evicted from a full flow table (max_flows).",
            |u| get(&u.flows_evicted),
        ),
        (
            "sluice_udp_denied_datagrams_total",
            "counter",
            "Datagrams dropped because the firewall denied their source.",
            |u| get(&u.denied),
        ),
        (
            "sluice_udp_oversized_datagrams_total",
            "counter",
            "Datagrams dropped as larger than udp_max_datagram.",
            |u| get(&u.oversized),
        ),
        (
            "sluice_udp_no_backend_datagrams_total",
            "counter",
            "Datagrams dropped because no backend takes new flows.",
            |u| get(&u.no_backend),
        ),
        (
            "sluice_udp_dropped_datagrams_total",
            "counter",
            "Datagrams a socket could not take (full buffer, unreachable backend).",
            |u| get(&u.dropped),
        ),
    ];
    for (name, kind, help, value) in metrics {
        f.header(name, kind, help);
        for s in &udp {
            f.sample(name, &[("service", &s.name)], value(&s.counters.udp));
        }
    }
    type Pair = (&'static str, &'static str, fn(&UdpCounters) -> u64, fn(&UdpCounters) -> u64);
    let pairs: [Pair; 2] = [
        (
            "sluice_udp_datagrams_total",
            "Datagrams relayed, by direction (up: client to backend).",
            |u| get(&u.datagrams_up),
            |u| get(&u.datagrams_down),
        ),
        (
            "sluice_udp_bytes_total",
            "UDP payload bytes relayed, by direction.",
            |u| get(&u.bytes_up),
            |u| get(&u.bytes_down),
        ),
    ];
    for (name, help, up, down) in pairs {
        f.header(name, "counter", help);
        for s in &udp {
            f.sample(name, &[("service", &s.name), ("direction", "up")], up(&s.counters.udp));
            f.sample(name, &[("service", &s.name), ("direction", "down")], down(&s.counters.udp));
        }
    }
    let name = "sluice_worker_udp_flows_active";
    f.header(name, "gauge", "UDP flows in each worker's flow table now.");
    for (id, w) in shared.workers.iter().enumerate() {
        f.sample(name, &[("worker", &id.to_string())], get(&w.udp_flows_active));
    }
    let name = "sluice_worker_udp_flows_evicted_total";
    f.header(name, "counter", "UDP flows each worker evicted to stay within max_flows.");
    for (id, w) in shared.workers.iter().enumerate() {
        f.sample(name, &[("worker", &id.to_string())], get(&w.udp_flows_evicted));
    }
    let name = "sluice_worker_udp_unmatched_datagrams_total";
    f.header(name, "counter", "Datagrams a shared upstream socket got for no flow (dropped).");
    for (id, w) in shared.workers.iter().enumerate() {
        f.sample(name, &[("worker", &id.to_string())], get(&w.udp_unmatched));
    }
    f.header(
        "sluice_udp_max_flows",
        "gauge",
        "Flow-table bound of each worker (engine.max_flows).",
    );
    f.sample("sluice_udp_max_flows", &[], shared.max_flows);
}

fn capture_json(c: &CaptureStats) -> Value {
    let stopped: serde_json::Map<String, Value> =
        StopReason::ALL.iter().map(|&r| (r.as_str().to_string(), json!(c.stopped(r)))).collect();
    json!({
        "sessions": get(&c.sessions),
        "payload_bytes": get(&c.payload_bytes),
        "bytes": get(&c.bytes),
        "packets": get(&c.packets),
        "files": get(&c.files),
        "queued_bytes": get(&c.queued),
        "active": get(&c.active),
        "stopped": stopped,
    })
}

fn capture_metrics(f: &mut Family<'_>, c: &CaptureStats) {
    for (name, help, value) in [
        ("sluice_capture_sessions_total", "Sessions whose capture began.", get(&c.sessions)),
        (
            "sluice_capture_payload_bytes_total",
            "Payload bytes written into capture files.",
            get(&c.payload_bytes),
        ),
        ("sluice_capture_bytes_total", "Bytes written into capture files.", get(&c.bytes)),
        ("sluice_capture_packets_total", "Packets written into capture files.", get(&c.packets)),
        ("sluice_capture_files_total", "Capture files created.", get(&c.files)),
    ] {
        f.header(name, "counter", help);
        f.sample(name, &[], value);
    }
    let name = "sluice_capture_stopped_total";
    f.header(name, "counter", "Captures stopped early (the session went on), by reason.");
    for r in StopReason::ALL {
        f.sample(name, &[("reason", r.as_str())], c.stopped(r));
    }
    let name = "sluice_capture_queued_bytes";
    f.header(name, "gauge", "Bytes copied for capture, not yet written.");
    f.sample(name, &[], get(&c.queued));
    let name = "sluice_capture_sessions_active";
    f.header(name, "gauge", "Sessions being captured now.");
    f.sample(name, &[], get(&c.active));
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Allow { .. } => "allow",
        Action::Deny { reset: false } => "deny",
        Action::Deny { reset: true } => "reject",
    }
}

fn rules_json(rules: &Rules) -> Vec<Value> {
    rules
        .set
        .rules()
        .iter()
        .zip(&rules.hits)
        .map(|(r, hits)| json!({ "name": &*r.name, "action": action_name(&r.action), "hits": get(hits) }))
        .collect()
}

/// The `/connections` document.
pub fn connections(sessions: &[LiveSession]) -> Value {
    let list: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "id": s.id.to_string(),
                "worker": s.worker,
                "service": &*s.service,
                "client": s.client.to_string(),
                "listener": s.listener.to_string(),
                "backend": s.backend.map(|b| b.to_string()),
                "state": s.state,
                "age_ms": s.age.as_millis() as u64,
                "bytes_up": s.bytes_up,
                "bytes_down": s.bytes_down,
            })
        })
        .collect();
    json!({ "count": list.len(), "connections": list })
}

/// Writes Prometheus text exposition for one metric family.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Escapes a label value as the text format requires (backslash, quote, newline).
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `/metrics` exposition.
pub fn prometheus(shared: &Shared) -> String {
    let tables = shared.tables.load();
    let mut out = String::with_capacity(8192);
    let mut f = Family { out: &mut out };
    type ServiceMetric = (&'static str, &'static str, &'static str, fn(&ServiceCounters) -> u64);
    let service_metrics: [ServiceMetric; 6] = [
        ("sluice_sessions_total", "counter", "Sessions accepted.", |c| get(&c.sessions)),
        ("sluice_sessions_active", "gauge", "Sessions open now.", |c| get(&c.active)),
        ("sluice_connect_errors_total", "counter", "Backend connect attempts that failed.", |c| {
            get(&c.connect_errors)
        }),
        (
            "sluice_unserved_sessions_total",
            "counter",
            "Sessions closed before reaching a backend.",
            |c| get(&c.unserved),
        ),
        (
            "sluice_no_backend_sessions_total",
            "counter",
            "Sessions refused because no backend was up (no_backend).",
            |c| get(&c.no_backend),
        ),
        (
            "sluice_proxy_errors_total",
            "counter",
            "Sessions closed for a missing, bad or untrusted PROXY protocol header.",
            |c| get(&c.proxy_errors),
        ),
    ];
    for (name, kind, help, value) in service_metrics {
        f.header(name, kind, help);
        for s in tables.services() {
            f.sample(name, &[("service", &s.name)], value(&s.counters));
        }
    }
    f.header("sluice_denied_sessions_total", "counter", "Sessions the firewall refused.");
    for s in tables.services() {
        f.sample("sluice_denied_sessions_total", &[("service", &s.name)], get(&s.counters.denied));
    }
    let name = "sluice_limited_sessions_total";
    f.header(name, "counter", "Sessions refused by a session limit, by limit.");
    for s in tables.services() {
        for (limit, n) in s.limit_state.refusals() {
            f.sample(name, &[("service", &s.name), ("limit", limit.as_str())], n);
        }
    }
    let name = "sluice_cut_sessions_total";
    f.header(name, "counter", "Sessions cut at their byte cap or maximum duration.");
    for s in tables.services() {
        f.sample(name, &[("service", &s.name)], get(&s.counters.cut));
    }
    let name = "sluice_rule_verdicts_total";
    f.header(
        name,
        "counter",
        "Sessions decided by each firewall rule (scope: firewall or the service).",
    );
    for (r, hits) in tables.firewall.set.rules().iter().zip(&tables.firewall.hits) {
        f.sample(
            name,
            &[("scope", "firewall"), ("rule", &r.name), ("action", action_name(&r.action))],
            get(hits),
        );
    }
    for s in tables.services() {
        for (r, hits) in s.rules.set.rules().iter().zip(&s.rules.hits) {
            f.sample(
                name,
                &[("scope", &s.name), ("rule", &r.name), ("action", action_name(&r.action))],
                get(hits),
            );
        }
        f.sample(
            name,
            &[("scope", &s.name), ("rule", "(default)"), ("action", action_name(&s.default))],
            get(&s.default_hits),
        );
    }
    client_metrics(&mut f, &tables);
    let name = "sluice_session_bytes_total";
    f.header(
        name,
        "counter",
        "Bytes relayed by closed sessions, by direction (up: client to backend).",
    );
    for s in tables.services() {
        f.sample(name, &[("service", &s.name), ("direction", "up")], get(&s.counters.bytes_up));
        f.sample(name, &[("service", &s.name), ("direction", "down")], get(&s.counters.bytes_down));
    }
    f.header(
        "sluice_connect_latency_seconds",
        "histogram",
        "Time from connect start to an established backend connection.",
    );
    for s in tables.services() {
        let (buckets, count, sum_us) = s.counters.connect_latency.snapshot();
        for (bound_us, n) in buckets {
            let le = format!("{}", bound_us as f64 / 1e6);
            f.sample(
                "sluice_connect_latency_seconds_bucket",
                &[("service", &s.name), ("le", &le)],
                n,
            );
        }
        f.sample(
            "sluice_connect_latency_seconds_bucket",
            &[("service", &s.name), ("le", "+Inf")],
            count,
        );
        f.sample(
            "sluice_connect_latency_seconds_sum",
            &[("service", &s.name)],
            sum_us as f64 / 1e6,
        );
        f.sample("sluice_connect_latency_seconds_count", &[("service", &s.name)], count);
    }
    backend_metrics(&mut f, &tables);
    udp_metrics(&mut f, &tables, shared);
    type WorkerMetric = (&'static str, &'static str, &'static str, fn(&WorkerStats) -> u64);
    let worker_metrics: [WorkerMetric; 9] = [
        ("sluice_worker_accepted_total", "counter", "Connections accepted, per worker.", |w| {
            get(&w.accepted)
        }),
        ("sluice_worker_sessions_active", "gauge", "Sessions open now, per worker.", |w| {
            get(&w.active)
        }),
        ("sluice_worker_accept_errors_total", "counter", "Accept failures, per worker.", |w| {
            get(&w.accept_errors)
        }),
        (
            "sluice_worker_accept_backoffs_total",
            "counter",
            "Times accepting paused because the process ran out of fds or memory, per worker.",
            |w| get(&w.accept_backoffs),
        ),
        (
            "sluice_worker_accept_paused_full_total",
            "counter",
            "Times accepting paused because a session cap was reached, per worker.",
            |w| get(&w.accept_paused_full),
        ),
        (
            "sluice_worker_backend_socket_errors_total",
            "counter",
            "Sessions closed (no_socket) because no backend socket could be created, per worker.",
            |w| get(&w.backend_socket_errors),
        ),
        (
            "sluice_worker_spare_pipes",
            "gauge",
            "Pipes the splice relay keeps empty for reuse (two fds each), per worker.",
            |w| get(&w.spare_pipes),
        ),
        (
            "sluice_worker_accepted_reset_total",
            "counter",
            "Connections reset by their client before they could be admitted, per worker.",
            |w| get(&w.accepted_reset),
        ),
        (
            "sluice_worker_ring_fallbacks_total",
            "counter",
            "io_uring receives that found every provided buffer taken and read inline, per worker.",
            |w| get(&w.ring_fallbacks),
        ),
    ];
    for (name, kind, help, value) in worker_metrics {
        f.header(name, kind, help);
        for (id, w) in shared.workers.iter().enumerate() {
            f.sample(name, &[("worker", &id.to_string())], value(w));
        }
    }
    for (name, help, value) in [
        ("sluice_reloads_total", "Successful configuration reloads.", get(&shared.reloads)),
        (
            "sluice_reload_failures_total",
            "Rejected configuration reloads.",
            get(&shared.reload_failures),
        ),
        (
            "sluice_records_dropped_total",
            "Session records dropped because the log queue was full.",
            shared.events.dropped(),
        ),
    ] {
        f.header(name, "counter", help);
        f.sample(name, &[], value);
    }
    let sinks = shared.sinks.load();
    f.header("sluice_log_records_total", "counter", "Records written, per log sink.");
    for s in sinks.iter() {
        f.sample("sluice_log_records_total", &[("sink", &s.name)], get(&s.written));
    }
    f.header(
        "sluice_log_dropped_total",
        "counter",
        "Records a log sink could not take (slow peer, write error).",
    );
    for s in sinks.iter() {
        f.sample("sluice_log_dropped_total", &[("sink", &s.name)], get(&s.dropped));
    }
    capture_metrics(&mut f, &shared.capture);
    f.header("sluice_tables_version", "gauge", "Version of the tables in force.");
    f.sample("sluice_tables_version", &[], tables.version);
    operator_metrics(&mut f);
    out
}

/// `sluice_build_info` and the standard `process_*` families (as Prometheus client
/// libraries name them). A figure /proc cannot give right now (no fd free to read it) is
/// left out rather than shown wrong.
fn operator_metrics(f: &mut Family<'_>) {
    let name = "sluice_build_info";
    f.header(name, "gauge", "Always 1; the labels name the running build.");
    f.sample(
        name,
        &[("version", env!("CARGO_PKG_VERSION")), ("revision", crate::process::REVISION)],
        1,
    );
    let p = crate::process::Process::read();
    let figures: [(&str, &str, &str, Option<f64>); 7] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            p.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, in bytes.",
            p.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, in bytes.",
            p.virtual_bytes,
        ),
        ("process_open_fds", "gauge", "Open file descriptors.", p.open_fds),
        (
            "process_max_fds",
            "gauge",
            "Most open file descriptors allowed (RLIMIT_NOFILE, soft).",
            p.max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process, in seconds since 1970.",
            p.start_time_seconds,
        ),
        ("process_threads", "gauge", "Threads of the process.", p.threads),
    ];
    for (name, kind, help, value) in figures {
        let Some(value) = value else { continue };
        f.header(name, kind, help);
        f.sample(name, &[], value);
    }
}

fn backend_metrics(f: &mut Family<'_>, tables: &Tables) {
    f.header(
        "sluice_backend_up",
        "gauge",
        "1 if the backend takes new sessions (enabled, healthy, not ejected, below its cap).",
    );
    let now = Instant::now();
    for s in tables.services() {
        for b in s.pool.backends() {
            let addr = b.addr.to_string();
            f.sample(
                "sluice_backend_up",
                &[("service", &s.name), ("backend", &addr)],
                b.eligible(now) as u8,
            );
        }
    }
    type BackendMetric = (&'static str, &'static str, &'static str, fn(&BackendState) -> u64);
    let metrics: [BackendMetric; 5] = [
        ("sluice_backend_healthy", "gauge", "1 if the backend passes its active checks.", |b| {
            b.healthy() as u64
        }),
        (
            "sluice_backend_ejections_total",
            "counter",
            "Times the backend was ejected after consecutive connect failures.",
            |b| get(&b.ejections),
        ),
        ("sluice_backend_sessions_total", "counter", "Sessions relayed to the backend.", |b| {
            get(&b.sessions)
        }),
        ("sluice_backend_sessions_active", "gauge", "Sessions open to the backend now.", |b| {
            get(&b.active)
        }),
        (
            "sluice_backend_connect_errors_total",
            "counter",
            "Connect attempts to the backend that failed.",
            |b| get(&b.connect_errors),
        ),
    ];
    for (name, kind, help, value) in metrics {
        f.header(name, kind, help);
        for s in tables.services() {
            for b in s.pool.backends() {
                let addr = b.addr.to_string();
                f.sample(name, &[("service", &s.name), ("backend", &addr)], value(&b.state));
            }
        }
    }
    f.header(
        "sluice_backend_bytes_total",
        "counter",
        "Bytes relayed by closed sessions of the backend, by direction.",
    );
    for s in tables.services() {
        for b in s.pool.backends() {
            let addr = b.addr.to_string();
            f.sample(
                "sluice_backend_bytes_total",
                &[("service", &s.name), ("backend", &addr), ("direction", "up")],
                get(&b.state.bytes_up),
            );
            f.sample(
                "sluice_backend_bytes_total",
                &[("service", &s.name), ("backend", &addr), ("direction", "down")],
                get(&b.state.bytes_down),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
    }
}
