//! The Grafana dashboard shipped in docs/grafana/sluice.json is built on metrics sluice
//! exports: every `sluice_*` and `process_*` metric its queries name (panels and template
//! variables) has samples in the `/metrics` of a running sluice with a TCP and a UDP
//! service; and the file is a dashboard Grafana imports (panels with targets, a
//! datasource input).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;
use sluice_tests::{echo_round_trip, Backend, Config, Driver, Service, Sluice, UdpServer};

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/sluice.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every string under a key named `expr`, `query` or `definition`.
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

/// The metric names a PromQL text mentions: identifiers that start with `sluice_` or
/// `process_`.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && bytes[i].is_ascii_alphabetic() {
            let end = (i..bytes.len())
                .find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_'))
                .unwrap_or(bytes.len());
            let word = &query[i..end];
            if word.starts_with("sluice_") || word.starts_with("process_") {
                names.push(word.to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let board = dashboard();
    let panels = board["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard with {} panels", panels.len());
    for p in panels {
        let targets =
            p["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(!targets.is_empty() && p["title"].is_string() && p["gridPos"].is_object(), "{p}");
    }
    assert_eq!(board["__inputs"][0]["pluginId"], "prometheus");
    let mut texts = Vec::new();
    queries(&board, &mut texts);
    let wanted: BTreeSet<String> = texts.iter().flat_map(|q| metric_names(q)).collect();
    assert!(wanted.len() >= 15, "the dashboard queries {} metrics: {wanted:?}", wanted.len());

    let echo = Backend::echo();
    let udp = UdpServer::tagged_echo(b'U');
    let config = Config::new(Driver::Epoll)
        .admin_tcp()
        .service(Service::new("web", &[echo.addr()]))
        .service(Service::udp("dns", &[udp.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    echo_round_trip(sluice.addr("web"), 1, 1000);
    let text = sluice.admin().get("/metrics").text();
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not have: {missing:?}"
    );
    // The check can fail: a name /metrics lacks is caught.
    assert!(!exported.contains("sluice_no_such_metric_total"));
    assert_eq!(
        metric_names("rate(sluice_a_total[1m]) / process_b"),
        ["sluice_a_total", "process_b"]
    );
}
