//! Tests of the whole pipeline: TOML text -> validated [`Config`] -> compiled tables, and
//! the errors each bad value produces (file, line, column and key).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::acl::Action;
use sluice_engine::balance::{Algorithm, Ejection};
use sluice_engine::proxy;
use sluice_engine::record::Protocol;
use sluice_engine::tables::{self, Listen, SniUnreadable, Timeouts};
use sluice_engine::DriverChoice;

use super::*;
use crate::admin::AdminAddr;

fn errors(text: &str) -> Vec<ConfigError> {
    Config::parse("test.toml", text).expect_err("config should be rejected").0
}

const MINIMAL: &str =
    "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8000\"]\n";

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = Config::parse("test.toml", MINIMAL).unwrap();
    let s = &c.services[0];
    assert_eq!(s.listen, vec![Listen::new("127.0.0.1:8080".parse().unwrap())]);
    assert_eq!(s.timeouts, Timeouts::default());
    assert_eq!(c.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
    assert_eq!(c.engine.driver, DriverChoice::Auto);
    assert!(c.engine.pin);
}

#[test]
fn ipv6_and_several_addresses_are_accepted() {
    let text = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\", \"[::1]:1\"]\nbackends = [\"[::1]:2\", \"localhost:3\"]\n";
    let c = Config::parse("t", text).unwrap();
    assert_eq!(c.services[0].listen.len(), 2);
    assert!(c.services[0].backends.len() >= 2);
}

#[test]
fn session_caps_are_read_for_the_engine_and_each_service() {
    let text = "[engine]\nmax_sessions = 1000\n\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\nmax_sessions = 10\n\n[[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:3\"]\nbackends = [\"127.0.0.1:2\"]\n";
    let c = Config::parse("t", text).unwrap();
    assert_eq!(c.engine.max_sessions, Some(1000));
    assert_eq!(c.services[0].max_sessions, Some(10));
    assert_eq!(c.services[1].max_sessions, None, "no cap unless configured");
    let tables = c.tables(1, &mut Registry::default());
    assert_eq!(tables.services()[0].max_sessions, Some(10));
    assert_eq!(Config::parse("t", MINIMAL).unwrap().engine.max_sessions, None);
}

#[test]
fn a_bad_session_cap_names_its_key_and_line() {
    let e = errors(&format!("[engine]\nmax_sessions = 0\n\n{MINIMAL}max_sessions = -5\n"));
    let keys: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(keys, [(2, "engine.max_sessions"), (8, "service[0].max_sessions")], "{e:?}");
    assert!(e[0].message.contains("leave it out for no cap"), "{}", e[0].message);
}

#[test]
fn offline_parsing_rejects_host_names_without_resolving_them() {
    let text =
        "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"localhost:3\"]\n";
    let e = Config::parse_with("t", text, Names::Offline).unwrap_err().0;
    assert_eq!(e[0].key, "service[0].backends");
    assert!(e[0].message.contains("not resolved"), "{}", e[0].message);
    check_untrusted(text.as_bytes());
    check_untrusted(b"\xff\xfe not utf-8");
}

#[test]
fn bad_toml_is_located_by_line_and_column() {
    let e = errors("[engine]\nworkers = 2\npin = \n");
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].file.as_str(), e[0].line), ("test.toml", 3));
    assert!(e[0].to_string().starts_with("test.toml:3:"), "{}", e[0]);
}

#[test]
fn unknown_key_names_the_key_and_its_line() {
    let e = errors(&format!("{MINIMAL}colour = \"blue\"\n"));
    assert_eq!(e[0].line, 5);
    assert_eq!(e[0].key, "service.colour");
    assert!(e[0].message.contains("unknown field"), "{}", e[0].message);
}

#[test]
fn every_validation_error_is_reported_with_its_key() {
    let text = "[engine]\nworkers = 0\ndriver = \"kqueue\"\n\n[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:99999\"]\nbackends = [\"nowhere\"]\nidle_timeout = \"soon\"\n";
    let e = errors(text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (2, "engine.workers"),
            (3, "engine.driver"),
            (7, "service[0].listen"),
            (8, "service[0].backends"),
            (9, "service[0].idle_timeout"),
        ]
    );
    assert_eq!(e[2].column, 11);
}

const UDP: &str = "[engine]\nmax_flows = 100\nudp_max_datagram = \"1 KiB\"\n\n[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:53\"]\nudp_idle_timeout = \"5s\"\n";

#[test]
fn udp_services_take_their_keys_and_share_addresses_with_tcp() {
    let c = Config::parse("t", &format!("{UDP}\n{MINIMAL}")).unwrap();
    assert_eq!((c.engine.max_flows, c.engine.udp_max_datagram), (100, 1024));
    let dns = &c.services[0];
    assert_eq!((dns.protocol, dns.udp_idle_timeout), (Protocol::Udp, Duration::from_secs(5)));
    assert_eq!(c.services[1].protocol, Protocol::Tcp);
    assert_eq!(c.services[1].udp_idle_timeout, tables::DEFAULT_UDP_IDLE_TIMEOUT);
    let t = c.tables(1, &mut Registry::default());
    let addr = "127.0.0.1:8080".parse().unwrap();
    assert_eq!((t.udp_service_for(addr), t.service_for(addr)), (Some(0), Some(1)));
    assert_eq!(t.listen_addrs(), vec![addr]);
    assert_eq!(t.udp_listen_addrs(), vec![addr]);
    let d = Config::parse("t", MINIMAL).unwrap();
    assert_eq!(d.engine.max_flows, sluice_engine::udp::DEFAULT_MAX_FLOWS);
    assert_eq!(d.engine.udp_max_datagram, sluice_engine::udp::DEFAULT_MAX_DATAGRAM);
}

#[test]
fn bad_udp_keys_are_reported_with_line_and_key() {
    let text = "[engine]\nmax_flows = 0\nudp_max_datagram = 70000\n\n[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\nfin_timeout = \"1s\"\n\n[[service]]\nname = \"web\"\nprotocol = \"sctp\"\nlisten = [\"127.0.0.1:3\"]\nbackends = [\"127.0.0.1:4\"]\nudp_idle_timeout = \"1s\"\n\n[[service]]\nname = \"dns2\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\n";
    let e = errors(text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (2, "engine.max_flows"),
            (3, "engine.udp_max_datagram"),
            (10, "service[0].fin_timeout"),
            (14, "service[1].protocol"),
            (17, "service[1].udp_idle_timeout"),
            (22, "service[2].listen"),
        ]
    );
}

/// Issue 25: `udp_upstream = "shared"` with its source prefixes reaches the tables; a
/// prefix too small for `max_flows`, two of one family, a shared service without sources,
/// sources without sharing, an unknown mode and either key on TCP are errors with their line.
#[test]
fn shared_udp_upstreams_take_a_source_prefix_that_fits_max_flows() {
    let shared = format!(
        "{UDP}udp_upstream = \"shared\"\nudp_source = [\"127.64.0.0/10\", \"fd00:5::/64\"]\n"
    );
    let c = Config::parse("t", &shared).unwrap();
    let sources = vec!["127.64.0.0/10".parse().unwrap(), "fd00:5::/64".parse().unwrap()];
    assert_eq!(c.services[0].udp_upstream, tables::UdpUpstream::Shared { sources });
    let t = c.tables(1, &mut Registry::default());
    let v6 = t.services()[0].udp_upstream.source_for("[::1]:53".parse().unwrap());
    assert_eq!(v6, Some("fd00:5::/64".parse().unwrap()));
    assert_eq!(
        Config::parse("t", UDP).unwrap().services[0].udp_upstream,
        tables::UdpUpstream::Connected
    );
    let service = |name: &str, port: u16, keys: &str| {
        format!("\n[[service]]\nname = \"{name}\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:{port}\"]\nbackends = [\"127.0.0.1:53\"]\n{keys}")
    };
    let text = [
        "[engine]\nmax_flows = 100\n".to_string(),
        service("small", 1, "udp_upstream = \"shared\"\nudp_source = [\"10.0.0.0/26\"]\n"),
        service("twice", 2, "udp_upstream = \"shared\"\nudp_source = [\"10.0.0.0/16\", \"10.1.0.0/16\"]\n"),
        service("none", 3, "udp_upstream = \"shared\"\n"),
        service("loose", 4, "udp_source = [\"10.0.0.0/16\"]\n"),
        service("odd", 5, "udp_upstream = \"pooled\"\n"),
        "\n[[service]]\nname = \"tcp\"\nlisten = [\"127.0.0.1:6\"]\nbackends = [\"127.0.0.1:7\"]\nudp_upstream = \"shared\"\n".into(),
    ]
    .concat();
    let e = errors(&text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (10, "service[0].udp_source"),
            (18, "service[1].udp_source"),
            (25, "service[2].udp_upstream"),
            (32, "service[3].udp_source"),
            (39, "service[4].udp_upstream"),
            (45, "service[5].udp_upstream"),
        ],
        "{e:?}"
    );
    assert!(e[0].message.contains("62 usable addresses"), "{}", e[0].message);
}

#[test]
fn listen_addresses_are_unique_across_services() {
    let text = format!("{MINIMAL}\n[[service]]\nname = \"web2\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8001\"]\n");
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].key.as_str()), (8, "service[1].listen"));
}

#[test]
fn admin_accounting_keys_default_and_reject_bad_values_by_key() {
    use sluice_engine::accounting::AccountSpec;
    let c = Config::parse("t", &format!("[admin]\n{MINIMAL}")).unwrap();
    assert_eq!(c.accounting(), Some(AccountSpec { top: 20, network_v4: 24, network_v6: 64 }));
    assert_eq!(Config::parse("t", MINIMAL).unwrap().accounting(), None);
    let text = format!(
        "[admin]\ntop_clients = 5\nclient_network_v4 = 16\nclient_network_v6 = 48\n{MINIMAL}"
    );
    let c = Config::parse("t", &text).unwrap();
    assert_eq!(c.accounting(), Some(AccountSpec { top: 5, network_v4: 16, network_v6: 48 }));
    let off = format!("[admin]\ntop_clients = 0\n{MINIMAL}");
    assert_eq!(Config::parse("t", &off).unwrap().accounting(), None);
    for (line, key) in [
        ("top_clients = -1", "admin.top_clients"),
        ("top_clients = 1001", "admin.top_clients"),
        ("client_network_v4 = 33", "admin.client_network_v4"),
        ("client_network_v6 = 129", "admin.client_network_v6"),
    ] {
        let e = errors(&format!("[admin]\n{line}\n{MINIMAL}"));
        assert_eq!((e[0].line, e[0].key.as_str()), (2, key), "{line}");
    }
}

#[test]
fn admin_section_defaults_to_loopback_and_can_be_a_backend() {
    let text = format!("[admin]\n{MINIMAL}").replace("\"127.0.0.1:8000\"", "\"admin\"");
    let c = Config::parse("t", &text).unwrap();
    assert_eq!(c.admin.map(|a| a.listen), Some(AdminAddr::Tcp("127.0.0.1:9900".parse().unwrap())));
    assert_eq!(c.services[0].backends, vec![BackendSpec::plain("127.0.0.1:9900".parse().unwrap())]);
    assert!(Config::parse("t", MINIMAL).unwrap().admin.is_none());
    let e = errors(&MINIMAL.replace("\"127.0.0.1:8000\"", "\"admin\""));
    assert_eq!(e[0].key, "service[0].backends");
    let e = errors(&format!("[admin]\nlisten = \"nowhere\"\n{MINIMAL}"));
    assert_eq!((e[0].line, e[0].key.as_str()), (2, "admin.listen"));
}

#[test]
fn captures_take_defaults_and_are_shared_by_equal_settings() {
    let text = format!(
        "[[firewall]]\naction = \"allow\"\nfrom = [\"10.0.0.0/8\"]\ncapture = {{ dir = \"/var/cap\", max_file = \"1 MB\", max_total = \"1 GB\", snaplen = 128 }}\n\n{MINIMAL}capture = {{ dir = \"/var/cap\" }}\n\n[[service.rule]]\naction = \"allow\"\ncapture = {{ dir = \"/var/cap\" }}\n"
    );
    let c = Config::parse("t.toml", &text).unwrap();
    assert_eq!(c.captures.len(), 2, "equal settings share one capture");
    assert_eq!(c.captures[0].max_file, 1_000_000);
    assert_eq!(c.captures[0].max_total, 1_000_000_000);
    assert_eq!(c.captures[0].snaplen, 128);
    let d = &c.captures[1];
    let defaults = (
        sluice_engine::capture::DEFAULT_MAX_FILE,
        sluice_engine::capture::DEFAULT_MAX_TOTAL,
        sluice_engine::capture::DEFAULT_SNAPLEN,
    );
    assert_eq!((d.max_file, d.max_total, d.snaplen), defaults);
    assert_eq!(c.firewall[0].capture, Some(0));
    assert_eq!(c.services[0].capture, Some(1));
    assert_eq!(c.services[0].rules[0].capture, Some(1));
}

#[test]
fn every_bad_capture_value_is_reported_with_line_and_key() {
    let text = format!(
        "[[firewall]]\naction = \"deny\"\ncapture = {{ dir = \"/c\" }}\n\n{MINIMAL}capture = {{ dir = \"\", max_file = \"2 MB\", max_total = \"1 MB\", snaplen = 10 }}\n\n[[service.rule]]\naction = \"allow\"\ncapture = {{ dir = \"/c\", max_file = \"12 parsecs\" }}\n"
    );
    let e = errors(&text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert!(found.contains(&(3, "firewall[0].capture")), "{e:?}");
    for key in ["dir", "snaplen", "max_total"] {
        let key = format!("service[0].capture.{key}");
        assert!(found.contains(&(9, key.as_str())), "{key}: {e:?}");
    }
    assert!(found.contains(&(13, "service[0].rule[0].capture.max_file")), "{e:?}");
    let e = errors(&format!("{MINIMAL}capture = {{ dir = \"/c\", max_file = \"12 parsecs\" }}\n"));
    assert_eq!((e[0].line, e[0].key.as_str()), (5, "service[0].capture.max_file"));
    let e = errors(&format!("{MINIMAL}capture = {{ dir = \"/c\", size = 1 }}\n"));
    assert_eq!(e[0].line, 5);
    assert!(e[0].message.contains("size"), "{:?}", e[0]);
    let e = errors(&format!("{MINIMAL}capture = {{ dir = \"/c\", max_total = 100 }}\n"));
    assert_eq!(e[0].key, "service[0].capture.max_total");
}

#[test]
fn firewall_rules_compile_with_pools_and_defaults() {
    let text = format!(
        "[[firewall]]\nname = \"block\"\naction = \"deny\"\nreset = true\nfrom = [\"10.0.0.0/8\", \"192.0.2.1\"]\n\n[[pool]]\nname = \"office\"\nbackends = [\"127.0.0.1:9001\"]\n\n{MINIMAL}default = \"reject\"\n\n[[service.rule]]\naction = \"allow\"\npool = \"office\"\nfrom_port = [22, \"1024-2048\"]\nto = [\":8080\"]\nsni = [\"*.example.com\"]\ntime = [\"Mon-Fri 08:00-18:00\"]\ntimezone = \"UTC\"\n"
    );
    let c = Config::parse("t", &text).unwrap();
    assert_eq!(c.firewall.len(), 1);
    assert_eq!(&*c.firewall[0].name, "block");
    assert_eq!(c.firewall[0].action, Action::Deny { reset: true });
    assert_eq!(c.firewall[0].from.len(), 2);
    let s = &c.services[0];
    assert_eq!(s.default, Action::Deny { reset: true });
    assert_eq!(s.rules[0].action, Action::Allow { pool: Some(0) });
    assert_eq!(&*s.rules[0].name, "web.rule.0");
    assert_eq!(s.rules[0].from_port, vec![22..=22, 1024..=2048]);
    let mut registry = Registry::default();
    let t = c.tables(1, &mut registry);
    assert!(t.needs_sni(0));
    assert_eq!(&*t.pools[0].name, "office");
}

#[test]
fn every_bad_firewall_value_is_reported_with_line_and_key() {
    let text = format!(
        "[[firewall]]\naction = \"allow\"\nreset = true\nfrom = [\"10.0.0.0/33\"]\n\n{MINIMAL}default = \"maybe\"\n\n[[service.rule]]\naction = \"allow\"\npool = \"nowhere\"\nfrom_port = [\"9-2\"]\nsni = [\"bad name!\"]\ntime = [\"Someday 10:00-11:00\"]\ntimezone = \"UTC\"\n"
    );
    let e = errors(&text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (3, "firewall[0].reset"),
            (4, "firewall[0].from"),
            (14, "service[0].rule[0].pool"),
            (15, "service[0].rule[0].from_port"),
            (16, "service[0].rule[0].sni"),
            (17, "service[0].rule[0].time"),
            (10, "service[0].default"),
        ]
    );
    let e = errors(&format!("{MINIMAL}\n[[service.rule]]\naction = \"deny\"\ntime = [\"10:00-11:00\"]\ntimezone = \"Nowhere/Atlantis\"\n"));
    assert_eq!((e[0].line, e[0].key.as_str()), (9, "service[0].rule[0].timezone"));
}

#[test]
fn a_config_without_services_is_rejected() {
    assert!(errors("[engine]\nworkers = 1\n")[0].message.contains("[[service]]"));
}

#[test]
fn the_embedded_default_is_valid_and_forwards_8080_to_8000() {
    let c = Config::load_or_default(None).unwrap();
    assert_eq!(c.services[0].listen, vec![Listen::new("127.0.0.1:8080".parse().unwrap())]);
    assert_eq!(c.services[0].backends, vec![BackendSpec::plain("127.0.0.1:8000".parse().unwrap())]);
}

#[test]
fn tables_map_each_listener_to_its_service() {
    let c = Config::parse("t", MINIMAL).unwrap();
    let mut registry = Registry::default();
    let tables = c.tables(7, &mut registry);
    assert_eq!(tables.version, 7);
    assert_eq!(tables.service_for("127.0.0.1:8080".parse().unwrap()), Some(0));
    assert_eq!(tables.service_for("127.0.0.1:8081".parse().unwrap()), None);
}

#[test]
fn counters_and_backend_states_survive_recompilation_by_name() {
    let c = Config::parse("t", MINIMAL).unwrap();
    let mut registry = Registry::default();
    let first = c.tables(1, &mut registry);
    let second = c.tables(2, &mut registry);
    let (a, b) = (&first.services()[0], &second.services()[0]);
    assert!(Arc::ptr_eq(&a.counters, &b.counters));
    assert!(Arc::ptr_eq(&a.pool.backends()[0].state, &b.pool.backends()[0].state));
    let renamed = Config::parse("t", &MINIMAL.replace("\"web\"", "\"www\"")).unwrap();
    let third = renamed.tables(3, &mut registry);
    registry.retain(&renamed);
    assert!(!Arc::ptr_eq(&a.counters, &third.services()[0].counters));
    assert_eq!(registry.services.len(), 1);
}

#[test]
fn pools_take_algorithms_backend_tables_health_proxy_and_dns() {
    let text = "[[pool]]\nname = \"web\"\nalgorithm = \"weighted\"\nsend_proxy = \"v2\"\neject_after = 5\neject_for = \"30s\"\nbackends = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9002\", weight = 3, max_sessions = 100 }, { addr = \"127.0.0.1:9003\", backup = true }]\n[pool.health]\ninterval = \"500ms\"\nrise = 1\nfall = 2\nsend = \"PING\\r\\n\"\nexpect = \"PONG\"\n\n[[pool]]\nname = \"found\"\nsrv = \"_web._tcp.example\"\nresolver = \"127.0.0.1:5353\"\ndns_interval = \"5s\"\n\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:8080\"]\npool = \"web\"\naccept_proxy = { from = [\"127.0.0.0/8\"] }\nproxy_timeout = \"2s\"\n";
    let c = Config::parse("t", text).unwrap();
    let web = &c.pools[0];
    assert_eq!(web.algorithm, Algorithm::Weighted);
    assert_eq!(web.send_proxy, Some(proxy::Version::V2));
    assert_eq!(web.ejection, Ejection { after: 5, cooldown: Duration::from_secs(30) });
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    assert_eq!(
        web.backends,
        vec![
            BackendSpec::plain(addr(9001)),
            BackendSpec { weight: 3, max_sessions: 100, ..BackendSpec::plain(addr(9002)) },
            BackendSpec { backup: true, ..BackendSpec::plain(addr(9003)) },
        ]
    );
    let h = web.health.as_ref().unwrap();
    assert_eq!((h.interval, h.rise, h.fall), (Duration::from_millis(500), 1, 2));
    assert_eq!((h.send.as_slice(), h.expect.as_slice()), (&b"PING\r\n"[..], &b"PONG"[..]));
    let dns = c.pools[1].dns.as_ref().unwrap();
    assert_eq!(dns.query, crate::dns::Query::Srv { name: "_web._tcp.example".into() });
    assert_eq!((dns.resolver, dns.interval), (Some(addr(5353)), Duration::from_secs(5)));
    let s = &c.services[0];
    assert_eq!((s.pool, s.backends.len()), (Some(0), 0));
    assert_eq!(s.accept_proxy, Some(vec!["127.0.0.0/8".parse().unwrap()]));
    assert_eq!(s.timeouts.proxy, Duration::from_secs(2));
    let t = c.tables(1, &mut Registry::default());
    let pool = &t.services()[0].pool;
    assert_eq!((pool.algorithm(), pool.backends().len()), (Algorithm::Weighted, 3));
    assert!(Arc::ptr_eq(&pool.backends()[1].state, &t.pools[0].pool.backends()[1].state));
}

#[test]
fn bad_pool_values_are_reported_with_line_and_key() {
    let text = "[[pool]]\nname = \"web\"\nalgorithm = \"fastest\"\nsend_proxy = \"v3\"\nbackends = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n\n[[pool]]\nname = \"d\"\ndns = \"no-port\"\n\n[[pool]]\nname = \"both\"\ndns = \"a:1\"\nbackends = [\"127.0.0.1:1\"]\n\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:8080\"]\npool = \"nowhere\"\naccept_proxy = { from = [\"not-a-net\"] }\n";
    let e = errors(text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (5, "pool[0].backends.weight"),
            (3, "pool[0].algorithm"),
            (4, "pool[0].send_proxy"),
            (9, "pool[1].dns"),
            (14, "pool[2].backends"),
            (19, "service[0].pool"),
            (20, "service[0].accept_proxy.from"),
        ]
    );
}

/// Issue 26 item 3: a duration or size beyond what the clock or a counter can hold passed
/// `check` and made workers, the UDP loop and the health thread panic at run time.
#[test]
fn every_duration_and_size_has_an_upper_bound() {
    let huge = "\"100000000000000d\"";
    let text = format!(
        "[engine]\nshutdown_timeout = {huge}\n\n[records]\ninterim = {huge}\n\n[[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:1\"]\neject_for = {huge}\n[pool.health]\ninterval = {huge}\ntimeout = {huge}\n\n\
         [[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\npool = \"p\"\nconnect_timeout = {huge}\nidle_timeout = {huge}\nfin_timeout = {huge}\nsni_timeout = {huge}\nproxy_timeout = {huge}\n\
         limits = {{ max_duration = {huge}, max_bytes = \"2 PiB\", rate_per_client = \"2000000/s\" }}\nbandwidth = {{ total = \"2 PiB/s\", burst = \"2 PiB\" }}\ncapture = {{ dir = \"/c\", max_file = \"2 PiB\", max_total = \"3 PiB\" }}\n"
    );
    let e = errors(&text);
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "engine.shutdown_timeout",
        "records.interim",
        "pool[0].eject_for",
        "pool[0].health.interval",
        "pool[0].health.timeout",
        "service[0].connect_timeout",
        "service[0].idle_timeout",
        "service[0].fin_timeout",
        "service[0].sni_timeout",
        "service[0].proxy_timeout",
        "service[0].limits.max_duration",
        "service[0].limits.max_bytes",
        "service[0].limits.rate_per_client",
        "service[0].bandwidth.total",
        "service[0].bandwidth.burst",
        "service[0].capture.max_file",
        "service[0].capture.max_total",
    ] {
        assert!(keys.contains(&key), "{key} not bounded: {keys:?}");
    }
    let line_of = |key: &str| e.iter().find(|e| e.key == key).map(|e| e.line);
    assert_eq!(line_of("engine.shutdown_timeout"), Some(2));
    assert!(e.iter().all(|e| e.line > 0), "every error has its line: {e:?}");
    let at_bound = MINIMAL.to_string() + "idle_timeout = \"365d\"\n";
    assert_eq!(
        Config::parse("t", &at_bound).unwrap().services[0].timeouts.idle,
        Duration::from_secs(365 * 86_400)
    );
}

/// Issue 26 item 10: port 0 passed `check` (each worker bound a different unlogged port and
/// nothing was served) and an IPv4-mapped IPv6 address passed `check` and failed `run` with
/// EINVAL. Both are check errors now, for TCP and UDP services.
#[test]
fn listen_port_zero_and_ipv4_mapped_addresses_are_refused() {
    for (listen, says) in [
        ("127.0.0.1:0", "port 0"),
        ("[::1]:0", "port 0"),
        ("[::ffff:127.0.0.1]:8080", "write \"127.0.0.1:8080\""),
    ] {
        for protocol in ["tcp", "udp"] {
            let text =
                MINIMAL.replace("127.0.0.1:8080", listen) + &format!("protocol = \"{protocol}\"\n");
            let e = errors(&text);
            assert_eq!((e[0].line, e[0].key.as_str()), (3, "service[0].listen"), "{listen}");
            assert!(e[0].message.contains(says), "{listen}: {}", e[0].message);
        }
    }
}

#[test]
fn a_listener_may_name_its_interface_and_plain_addresses_still_work() {
    let text = MINIMAL.replace(
        "listen = [\"127.0.0.1:8080\"]",
        "listen = [\"127.0.0.1:8080\", { addr = \"127.0.0.1:8081\", interface = \"lo\" }]",
    );
    for protocol in ["tcp", "udp"] {
        let c =
            Config::parse("t", &(text.clone() + &format!("protocol = \"{protocol}\"\n"))).unwrap();
        let lo = Listen::on("127.0.0.1:8081".parse().unwrap(), "lo");
        assert_eq!(c.services[0].listen, [Listen::new("127.0.0.1:8080".parse().unwrap()), lo]);
    }
}

#[test]
fn an_interface_that_does_not_exist_is_an_error_at_its_line_and_key() {
    let text = MINIMAL.replace(
        "listen = [\"127.0.0.1:8080\"]",
        "listen = [\n  \"127.0.0.1:8080\",\n  { addr = \"127.0.0.1:8081\", interface = \"nosuchif0\" },\n  { addr = \"127.0.0.1:8082\", interface = \"a/b\" },\n]",
    );
    let e = errors(&text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(found, [(5, "service[0].listen.interface"), (6, "service[0].listen.interface")]);
    assert!(e[0].message.contains("no network interface named \"nosuchif0\""), "{}", e[0].message);
    assert!(e[1].message.contains("not an interface name"), "{}", e[1].message);
}

#[test]
fn a_port_range_is_one_listener_a_port_up_to_the_cap() {
    let text = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:8000-8099");
    let c = Config::parse("t", &text).unwrap();
    let ports: Vec<u16> = c.services[0].listen.iter().map(|l| l.addr.port()).collect();
    assert_eq!(ports, (8000..=8099).collect::<Vec<_>>());
    let v6 = MINIMAL.replace("127.0.0.1:8080", "[::1]:9000-9001");
    let c = Config::parse("t", &v6).unwrap();
    let addrs: Vec<String> = c.services[0].listen.iter().map(|l| l.addr.to_string()).collect();
    assert_eq!(addrs, ["[::1]:9000", "[::1]:9001"]);
    let most = format!("127.0.0.1:10000-{}", 10000 + MAX_LISTEN_RANGE - 1);
    assert!(Config::parse("t", &MINIMAL.replace("127.0.0.1:8080", &most)).is_ok());
    for (range, says) in [
        (format!("127.0.0.1:10000-{}", 10000 + MAX_LISTEN_RANGE), "at most 1024"),
        ("127.0.0.1:8099-8000".to_string(), "not a port range"),
        ("127.0.0.1:0-5".to_string(), "port 0"),
        ("127.0.0.1:1-x".to_string(), "not a port range"),
    ] {
        let e = errors(&MINIMAL.replace("127.0.0.1:8080", &range));
        assert_eq!((e[0].line, e[0].key.as_str()), (3, "service[0].listen"), "{range}");
        assert!(e[0].message.contains(says), "{range}: {}", e[0].message);
    }
    let overlap = format!(
        "{MINIMAL}\n[[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:8075-8085\"]\nbackends = [\"127.0.0.1:8000\"]\n"
    );
    let e = errors(&overlap.replace("127.0.0.1:8080", "127.0.0.1:8000-8080"));
    assert_eq!(e.len(), 6, "ports 8075 to 8080 are the first service's: {e:?}");
    assert_eq!((e[0].line, e[0].key.as_str()), (8, "service[1].listen"));
}

#[test]
fn tcp_options_of_each_side_and_the_backlog_are_read_with_their_defaults() {
    use sluice_engine::socket_options::{Keepalive, SideOptions, DEFAULT_BACKLOG};
    let c = Config::parse("t", MINIMAL).unwrap();
    let s = &c.services[0];
    assert_eq!(
        (s.client_socket, s.backend_socket, s.backlog),
        (SideOptions::default(), SideOptions::default(), DEFAULT_BACKLOG)
    );
    let text = format!("{MINIMAL}backlog = 128\nclient_keepalive = {{ idle = \"2m\", interval = \"5s\", count = 3 }}\nbackend_keepalive = {{ idle = \"30s\" }}\nclient_user_timeout = \"20s\"\nbackend_user_timeout = \"1500ms\"\n");
    let c = Config::parse("t", &text).unwrap();
    let s = &c.services[0];
    let secs = Duration::from_secs;
    assert_eq!(s.backlog, 128);
    assert_eq!(
        s.client_socket.keepalive,
        Some(Keepalive { idle: secs(120), interval: secs(5), count: 3 })
    );
    assert_eq!(s.client_socket.user_timeout, Some(secs(20)));
    assert_eq!(
        s.backend_socket.keepalive,
        Some(Keepalive { idle: secs(30), interval: secs(10), count: 6 })
    );
    assert_eq!(s.backend_socket.user_timeout, Some(Duration::from_millis(1500)));
    let t = c.tables(1, &mut Registry::default());
    assert_eq!(t.services()[0].client_socket, s.client_socket);
    assert_eq!(t.services()[0].backlog, 128);
}

#[test]
fn tcp_options_out_of_bounds_name_their_line_and_key() {
    let text = format!("{MINIMAL}backlog = 0\nclient_keepalive = {{ idle = \"1.5s\", interval = \"10h\", count = 128 }}\nbackend_user_timeout = \"30d\"\n");
    let e = errors(&text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        [
            (5, "service[0].backlog"),
            (6, "service[0].client_keepalive.idle"),
            (6, "service[0].client_keepalive.interval"),
            (6, "service[0].client_keepalive.count"),
            (7, "service[0].backend_user_timeout"),
        ]
    );
    let udp = format!("{MINIMAL}protocol = \"udp\"\nbacklog = 10\n");
    let e = errors(&udp);
    assert_eq!((e[0].line, e[0].key.as_str()), (6, "service[0].backlog"));
}

#[test]
fn silent_drop_takes_deny_rules_by_source_only() {
    let text = format!("{MINIMAL}\n[[service.rule]]\nname = \"scanners\"\naction = \"deny\"\ndrop = \"silent\"\nfrom = [\"192.0.2.0/24\"]\n");
    let c = Config::parse("t", &text).unwrap();
    assert!(c.services[0].rules[0].silent);
    let t = c.tables(1, &mut Registry::default());
    assert!(t.silent_filter(0, false).is_some());
    assert!(t.silent_filter(0, true).is_none(), "no IPv6 network to drop");
    let bad = format!("[[firewall]]\naction = \"deny\"\ndrop = \"silent\"\nfrom = [\"10.0.0.0/8\"]\nsni = [\"a.example\"]\n\n[[firewall]]\naction = \"allow\"\ndrop = \"silent\"\nfrom = [\"10.0.0.0/8\"]\n\n[[firewall]]\naction = \"deny\"\ndrop = \"loud\"\n\n[[firewall]]\naction = \"deny\"\nreset = true\ndrop = \"silent\"\nfrom = [\"10.0.0.0/8\"]\n\n{MINIMAL}");
    let e = errors(&bad);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        [
            (3, "firewall[0].drop"),
            (9, "firewall[1].drop"),
            (14, "firewall[2].drop"),
            (19, "firewall[3].drop")
        ]
    );
    assert!(e[0].message.contains("needs `from` and no other criterion"), "{}", e[0].message);
    assert!(e[1].message.contains("deny rules"), "{}", e[1].message);
}

#[test]
fn a_pool_source_is_the_client_or_a_local_address() {
    use sluice_engine::socket_options::Source;
    let pool = |source: &str| {
        format!("[[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:8000\"]\nsource = {source:?}\n\n[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\npool = \"p\"\n")
    };
    let c = Config::parse("t", &pool("client")).unwrap();
    assert_eq!(c.pools[0].source, Some(Source::Client));
    let c = Config::parse("t", &pool("127.0.0.3")).unwrap();
    assert_eq!(c.pools[0].source, Some(Source::Addr("127.0.0.3".parse().unwrap())));
    let t = c.tables(1, &mut Registry::default());
    assert_eq!(t.pools[0].pool.source, Some(Source::Addr("127.0.0.3".parse().unwrap())));
    assert_eq!(
        Config::parse("t", MINIMAL).unwrap().tables(1, &mut Registry::default()).services()[0]
            .pool
            .source,
        None
    );
    let e = errors(&pool("clients"));
    assert_eq!((e[0].line, e[0].key.as_str()), (4, "pool[0].source"));
    assert!(e[0].message.contains("neither \"client\" nor an address"), "{}", e[0].message);
}

/// Issue 26 item 13: config strings reached log lines, syslog frames and templates as they
/// were: a newline in a service name forged a log line, a 100-character tag with spaces
/// broke the syslog frame. Each is now refused with its line and key.
#[test]
fn strings_that_reach_a_sink_hold_only_what_it_carries() {
    let text = "[admin]\nlisten = \"unix:/run/a\\nb\"\n\n[[log]]\nname = \"my sink\"\ntype = \"syslog\"\ntag = \"a tag with spaces\"\n\n[[log]]\ntype = \"file\"\npath = \"/var/log/x\\n\"\nformat = \"text\"\ntemplate = \"{kind}\\n{service}\"\n\n[[pool]]\nname = \"p/../x\"\nbackends = [\"127.0.0.1:1\"]\n\n[[service]]\nname = \"web\\nINFO forged\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8000\"]\ncapture = { dir = \"/c\\u001b[31m\" }\n\n[[service.rule]]\nname = \"two words\"\naction = \"allow\"\n";
    let e = errors(text);
    let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    for expected in [
        (2, "admin.listen"),
        (5, "log[0].name"),
        (7, "log[0].tag"),
        (11, "log[1].path"),
        (13, "log[1].template"),
        (16, "pool[0].name"),
        (20, "service[0].name"),
        (23, "service[0].capture.dir"),
        (26, "service[0].rule[0].name"),
    ] {
        assert!(found.contains(&expected), "{expected:?} not refused: {e:#?}");
    }
    let shown: Vec<String> = e.iter().map(ToString::to_string).collect();
    assert!(shown.iter().all(|l| !l.contains('\n') && !l.contains('\u{1b}')), "{shown:#?}");
    let tag = |t: &str| format!("{MINIMAL}\n[[log]]\ntype = \"syslog\"\ntag = {t:?}\n");
    assert!(Config::parse("t", &tag(&"t".repeat(48))).is_ok());
    assert_eq!(errors(&tag(&"t".repeat(49)))[0].key, "log[0].tag");
}

/// An error that quotes the file shows its control characters escaped.
#[test]
fn errors_escape_control_characters_from_the_file() {
    let e = errors(&format!("{MINIMAL}\"\u{1b}[2J\" = 1\n"));
    let line = e[0].to_string();
    assert!(!line.contains('\u{1b}') && line.contains("\\u{1b}"), "{line}");
}

#[test]
fn ring_buffers_are_a_power_of_two_within_bounds() {
    let with = |n: &str| format!("[engine]\nring_buffers = {n}\n{MINIMAL}");
    let c = Config::parse("t", &with("1024")).unwrap();
    assert_eq!(c.engine.ring_buffers, 1024);
    assert_eq!(
        Config::parse("t", MINIMAL).unwrap().engine.ring_buffers,
        sluice_engine::DEFAULT_RING_BUFFERS
    );
    for bad in ["1000", "32", "65536", "-1"] {
        let e = errors(&with(bad));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert_eq!(e[0].key, "engine.ring_buffers", "{bad}");
        assert_eq!(e[0].line, 2, "{bad}");
    }
}

#[test]
fn sni_unreadable_is_deny_or_without_name() {
    let service = |extra: &str| {
        format!("[[service]]\nname = \"tls\"\nlisten = [\"127.0.0.1:8443\"]\nbackends = [\"127.0.0.1:1\"]\n{extra}")
    };
    let c = Config::parse("t", &service("sni_unreadable = \"without_name\"\n")).unwrap();
    assert_eq!(c.services[0].sni_unreadable, Some(SniUnreadable::WithoutName));
    let c = Config::parse("t", &service("sni_unreadable = \"deny\"\n")).unwrap();
    assert_eq!(c.services[0].sni_unreadable, Some(SniUnreadable::Deny));
    assert_eq!(Config::parse("t", &service("")).unwrap().services[0].sni_unreadable, None);
    let e = errors(&service("sni_unreadable = \"allow\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].key.as_str()), (5, "service[0].sni_unreadable"));
    assert!(e[0].message.contains("\"without_name\""), "{}", e[0].message);
}

/// `[records] instance` names this process in every record: a name as services have, or the
/// host name when not given; anything else is an error at its line and key.
#[test]
fn records_name_their_instance() {
    let named = format!("[records]\ninstance = \"edge-2.fra\"\n\n{MINIMAL}");
    assert_eq!(&*Config::parse("t", &named).unwrap().instance, "edge-2.fra");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(&*Config::parse("t", MINIMAL).unwrap().instance, host.trim());
    for bad in ["\"\"", "\"two words\"", "\"a\\nINFO forged\"", "7"] {
        let e = errors(&format!("[records]\ninstance = {bad}\n\n{MINIMAL}"));
        assert_eq!((e[0].line, e[0].key.as_str()), (2, "records.instance"), "{bad}: {e:?}");
    }
}
