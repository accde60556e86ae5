//! Formatting connection-log records: JSON lines and text templates with named fields
//! (like HAProxy's log-format). Pure: the sinks decide where the bytes go.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use sluice_engine::record::{Protocol, Record};

use crate::logger::{rfc3339, Rfc3339};

/// Every field a template may name, in the order of the JSON object (which has every one
/// but the last two, `client` and `backend`). `instance` is the process's, not the
/// record's: `[records] instance`, by default the host name.
pub const FIELDS: [&str; 23] = [
    "kind",
    "start",
    "end",
    "duration_ms",
    "service",
    "listener",
    "client_addr",
    "client_port",
    "backend_addr",
    "backend_port",
    "bytes_up",
    "bytes_down",
    "verdict",
    "rule",
    "reason",
    "worker",
    "tables_version",
    "protocol",
    "packets_up",
    "packets_down",
    "instance",
    "client",
    "backend",
];

/// The template of the default sink (the process log, when no `[[log]]` is configured).
pub const PROCESS_LOG_TEMPLATE: &str = "session service={service} client={client} listener={listener} backend={backend} start={start} duration_ms={duration_ms} bytes_up={bytes_up} bytes_down={bytes_down} reason={reason} worker={worker} kind={kind} verdict={verdict} rule={rule} instance={instance}";

/// The process-log template for UDP flow records: the TCP one with datagram counts.
pub const PROCESS_LOG_UDP_TEMPLATE: &str = "flow protocol=udp service={service} client={client} listener={listener} backend={backend} start={start} duration_ms={duration_ms} packets_up={packets_up} packets_down={packets_down} bytes_up={bytes_up} bytes_down={bytes_down} reason={reason} worker={worker} kind={kind} verdict={verdict} rule={rule} instance={instance}";

/// The template used for UDP flow records when a text sink names none.
pub const DEFAULT_UDP_TEMPLATE: &str = "{kind} protocol=udp service={service} client={client} listener={listener} backend={backend_addr}:{backend_port} start={start} duration_ms={duration_ms} packets_up={packets_up} packets_down={packets_down} bytes_up={bytes_up} bytes_down={bytes_down} verdict={verdict} rule={rule} reason={reason} worker={worker} instance={instance}";

/// The template used when a text sink names none.
pub const DEFAULT_TEMPLATE: &str = "{kind} service={service} client={client} listener={listener} backend={backend_addr}:{backend_port} start={start} duration_ms={duration_ms} bytes_up={bytes_up} bytes_down={bytes_down} verdict={verdict} rule={rule} reason={reason} worker={worker} instance={instance}";

/// A record as one JSON object: its keys in the documented order ([`FIELDS`], less the
/// template-only `client` and `backend`), serialized straight from the record's fields.
#[derive(Serialize)]
struct JsonRecord<'a> {
    kind: &'static str,
    start: Shown<Rfc3339>,
    end: Shown<Rfc3339>,
    duration_ms: u64,
    service: &'a str,
    listener: Shown<SocketAddr>,
    client_addr: Shown<IpAddr>,
    client_port: u16,
    backend_addr: Option<Shown<IpAddr>>,
    backend_port: Option<u16>,
    bytes_up: u64,
    bytes_down: u64,
    verdict: &'static str,
    rule: Option<&'a str>,
    reason: Option<&'static str>,
    worker: usize,
    tables_version: u64,
    protocol: &'static str,
    packets_up: Option<u64>,
    packets_down: Option<u64>,
    instance: &'a str,
}

/// A value serialized as the string its `Display` writes.
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'a> JsonRecord<'a> {
    fn of(r: &'a Record, instance: &'a str) -> Self {
        JsonRecord {
            kind: r.kind.as_str(),
            start: Shown(Rfc3339(r.start)),
            end: Shown(Rfc3339(r.end)),
            duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
            service: &r.service,
            listener: Shown(r.listener),
            client_addr: Shown(r.client.ip()),
            client_port: r.client.port(),
            backend_addr: r.backend.map(|b| Shown(b.ip())),
            backend_port: r.backend.map(|b| b.port()),
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            verdict: r.verdict.as_str(),
            rule: r.rule.as_deref(),
            reason: r.reason.map(|x| x.as_str()),
            worker: r.worker,
            tables_version: r.tables_version,
            protocol: r.protocol.as_str(),
            packets_up: udp_count(r, r.packets_up),
            packets_down: udp_count(r, r.packets_down),
            instance,
        }
    }
}

/// Datagram counts exist for UDP records only (`null` in TCP records).
fn udp_count(r: &Record, n: u64) -> Option<u64> {
    (r.protocol == Protocol::Udp).then_some(n)
}

/// Appends one JSON line (without the newline) to `out`; `instance` names this process.
pub fn write_json(out: &mut Vec<u8>, r: &Record, instance: &str) {
    // Serializing plain fields into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &JsonRecord::of(r, instance));
}

/// One JSON line (without the newline).
pub fn json_line(r: &Record, instance: &str) -> String {
    let mut out = Vec::with_capacity(512);
    write_json(&mut out, r, instance);
    String::from_utf8(out).unwrap_or_default()
}

/// A parsed text template: literal text and field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// The template UDP flow records use instead, for the built-in templates.
    udp: Option<Box<Template>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(&'static str),
}

impl Template {
    /// Parses `{field}` placeholders; `{{` and `}}` are literal braces. Unknown fields are
    /// errors that list the known ones.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('{', Some('{')) | ('}', Some('}')) => {
                    chars.next();
                    literal.push(c);
                }
                ('{', _) => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let field = FIELDS.iter().find(|f| **f == name).ok_or_else(|| {
                        format!(
                            "unknown field {{{name}}} in template; known fields: {}",
                            FIELDS.join(", ")
                        )
                    })?;
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(field));
                }
                ('}', _) => return Err("unmatched '}' in template (write '}}' for a brace)".into()),
                _ => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts, udp: None })
    }

    /// This template for TCP records and `udp` for UDP flow records.
    pub fn with_udp(mut self, udp: Template) -> Template {
        self.udp = Some(Box::new(udp));
        self
    }

    /// Renders a record of the process named `instance`; absent values are written as `-`.
    pub fn render(&self, r: &Record, instance: &str) -> String {
        if let (Some(udp), Protocol::Udp) = (&self.udp, r.protocol) {
            return udp.render(r, instance);
        }
        let mut out = String::with_capacity(256);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => write_field(&mut out, f, r, instance),
            }
        }
        out
    }
}

fn write_field(out: &mut String, field: &str, r: &Record, instance: &str) {
    let addr = |a: Option<SocketAddr>| a.map(|a| a.ip().to_string()).unwrap_or_else(|| "-".into());
    let port =
        |a: Option<SocketAddr>| a.map(|a| a.port().to_string()).unwrap_or_else(|| "-".into());
    let _ = match field {
        "kind" => write!(out, "{}", r.kind.as_str()),
        "start" => write!(out, "{}", rfc3339(r.start)),
        "end" => write!(out, "{}", rfc3339(r.end)),
        "duration_ms" => write!(out, "{}", r.duration.as_millis()),
        "service" => write!(out, "{}", r.service),
        "listener" => write!(out, "{}", r.listener),
        "client" => write!(out, "{}", r.client),
        "client_addr" => write!(out, "{}", r.client.ip()),
        "client_port" => write!(out, "{}", r.client.port()),
        "backend" => match r.backend {
            Some(b) => write!(out, "{b}"),
            None => write!(out, "-"),
        },
        "backend_addr" => write!(out, "{}", addr(r.backend)),
        "backend_port" => write!(out, "{}", port(r.backend)),
        "bytes_up" => write!(out, "{}", r.bytes_up),
        "bytes_down" => write!(out, "{}", r.bytes_down),
        "verdict" => write!(out, "{}", r.verdict.as_str()),
        "rule" => write!(out, "{}", r.rule.as_deref().unwrap_or("-")),
        "reason" => write!(out, "{}", r.reason.map_or("-", |x| x.as_str())),
        "worker" => write!(out, "{}", r.worker),
        "tables_version" => write!(out, "{}", r.tables_version),
        "protocol" => write!(out, "{}", r.protocol.as_str()),
        "packets_up" => write_count(out, udp_count(r, r.packets_up)),
        "packets_down" => write_count(out, udp_count(r, r.packets_down)),
        "instance" => write!(out, "{instance}"),
        _ => Ok(()),
    };
}

fn write_count(out: &mut String, n: Option<u64>) -> std::fmt::Result {
    match n {
        Some(n) => write!(out, "{n}"),
        None => write!(out, "-"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::Value;
    use sluice_engine::record::{CloseReason, RecordKind, Verdict};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub fn sample() -> Record {
        Record {
            kind: RecordKind::Close,
            worker: 1,
            service: "web".into(),
            listener: "127.0.0.1:8080".parse().unwrap(),
            client: "127.0.0.2:50312".parse().unwrap(),
            backend: Some("127.0.0.1:8000".parse().unwrap()),
            start: UNIX_EPOCH + Duration::from_millis(1_795_305_600_123),
            end: UNIX_EPOCH + Duration::from_millis(1_795_305_600_135),
            duration: Duration::from_millis(12),
            bytes_up: 73,
            bytes_down: 1024,
            protocol: Protocol::Tcp,
            packets_up: 0,
            packets_down: 0,
            verdict: Verdict::Allow,
            rule: None,
            reason: Some(CloseReason::BackendFin),
            tables_version: 3,
        }
    }

    /// The JSON record's keys as the README's "Fields:" paragraph lists them, in its order:
    /// written out here rather than taken from [`FIELDS`], which they check.
    const DOCUMENTED: [&str; 21] = [
        "kind",
        "start",
        "end",
        "duration_ms",
        "service",
        "listener",
        "client_addr",
        "client_port",
        "backend_addr",
        "backend_port",
        "bytes_up",
        "bytes_down",
        "verdict",
        "rule",
        "reason",
        "worker",
        "tables_version",
        "protocol",
        "packets_up",
        "packets_down",
        "instance",
    ];

    const INSTANCE: &str = "edge-2";

    fn to_json(r: &Record) -> Value {
        serde_json::from_str(&json_line(r, INSTANCE)).expect("a JSON object")
    }

    /// A template may name every documented field and `client` and `backend`, no other.
    #[test]
    fn template_fields_are_the_documented_ones() {
        assert_eq!(FIELDS[..21], DOCUMENTED);
        assert_eq!(FIELDS[21..], ["client", "backend"]);
    }

    /// Issue 26 item 19: keys came out in alphabetical order (a serde_json map), not the
    /// documented one.
    #[test]
    fn json_keys_come_in_the_documented_order() {
        for r in [sample(), Record { protocol: Protocol::Udp, backend: None, ..sample() }] {
            let line = json_line(&r, INSTANCE);
            let keys: Vec<&str> = line
                .split('"')
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[1].starts_with(':'))
                .map(|w| w[0])
                .collect();
            assert_eq!(keys, DOCUMENTED, "{line}");
        }
    }

    #[test]
    fn json_has_every_field_with_split_addresses() {
        let v = to_json(&sample());
        assert_eq!(v["client_addr"], "127.0.0.2");
        assert_eq!(v["client_port"], 50312);
        assert_eq!(v["backend_port"], 8000);
        assert_eq!(v["start"], "2026-11-22T00:00:00.123Z");
        assert_eq!(v["reason"], "backend_fin");
        assert_eq!(v["rule"], Value::Null);
        assert_eq!(v["instance"], INSTANCE);
        for f in DOCUMENTED {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        assert_eq!(v.as_object().unwrap().len(), DOCUMENTED.len(), "no other key: {v}");
        let _ = SystemTime::now();
    }

    #[test]
    fn udp_records_carry_datagram_counts_in_json_and_built_in_templates() {
        let udp = Record {
            protocol: Protocol::Udp,
            packets_up: 3,
            packets_down: 2,
            reason: Some(CloseReason::UdpIdleTimeout),
            ..sample()
        };
        let v = to_json(&udp);
        assert_eq!(
            (v["protocol"].as_str(), v["packets_up"].as_u64(), v["packets_down"].as_u64()),
            (Some("udp"), Some(3), Some(2))
        );
        assert_eq!(v["reason"], "udp_idle_timeout");
        let tcp = to_json(&sample());
        assert_eq!((tcp["protocol"].as_str(), &tcp["packets_up"]), (Some("tcp"), &Value::Null));
        let t = Template::parse(PROCESS_LOG_TEMPLATE)
            .unwrap()
            .with_udp(Template::parse(PROCESS_LOG_UDP_TEMPLATE).unwrap());
        let line = t.render(&udp, INSTANCE);
        assert!(line.starts_with("flow protocol=udp service=web"), "{line}");
        assert!(line.contains(" packets_up=3 packets_down=2 bytes_up=73 "), "{line}");
        assert!(line.ends_with(" instance=edge-2"), "{line}");
        let line = t.render(&sample(), INSTANCE);
        assert!(line.starts_with("session service=web") && line.ends_with(" instance=edge-2"));
        let t = Template::parse("{protocol} {packets_up}").unwrap();
        let both = (t.render(&udp, INSTANCE), t.render(&sample(), INSTANCE));
        assert_eq!((both.0.as_str(), both.1.as_str()), ("udp 3", "tcp -"));
        for default in [DEFAULT_TEMPLATE, DEFAULT_UDP_TEMPLATE] {
            let line = Template::parse(default).unwrap().render(&udp, INSTANCE);
            assert!(line.ends_with(" instance=edge-2"), "{line}");
        }
    }

    #[test]
    fn templates_render_named_fields_and_literal_braces() {
        let t =
            Template::parse("{{{client}}} -> {backend_addr}:{backend_port} {bytes_down}B {rule}")
                .unwrap();
        assert_eq!(t.render(&sample(), "x"), "{127.0.0.2:50312} -> 127.0.0.1:8000 1024B -");
        let e = Template::parse("{clinet}").unwrap_err();
        assert!(e.contains("unknown field {clinet}"), "{e}");
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse(DEFAULT_TEMPLATE).is_ok());
    }
}
