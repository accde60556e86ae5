//! `sluice report FILE...`: turns JSON-lines connection logs (plain or gzip'd, as logrotate
//! leaves them) into aggregates: per service, per client network (/24 and /64), per
//! backend, per hour, per close reason, and the top clients; printed as a terminal table,
//! as JSON, or as an HTML page with SVG charts of traffic over time.
//!
//! Only close and deny records are counted (open and interim records describe sessions that
//! a close record reports again). Lines that are not records are counted and skipped.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};

/// Clients listed under "top clients".
pub const TOP_CLIENTS: usize = 10;

/// The fields of a record the report needs.
#[derive(Debug, Deserialize)]
struct Line {
    kind: String,
    start: String,
    #[serde(default)]
    duration_ms: u64,
    service: String,
    client_addr: String,
    backend_addr: Option<String>,
    backend_port: Option<u16>,
    #[serde(default)]
    bytes_up: u64,
    #[serde(default)]
    bytes_down: u64,
    reason: Option<String>,
}

/// Sessions, denials and bytes of one group.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub sessions: u64,
    pub denials: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Tally {
    fn add(&mut self, denied: bool, up: u64, down: u64) {
        if denied {
            self.denials += 1;
        } else {
            self.sessions += 1;
        }
        self.bytes_up += up;
        self.bytes_down += down;
    }

    fn json(&self) -> Value {
        json!({ "sessions": self.sessions, "denials": self.denials, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down })
    }
}

/// Everything the report shows.
#[derive(Debug)]
pub struct Report {
    pub files: Vec<PathBuf>,
    pub records: u64,
    pub skipped_lines: u64,
    pub total: Tally,
    pub services: BTreeMap<String, (Tally, Histogram<u64>)>,
    pub networks: BTreeMap<String, Tally>,
    pub backends: BTreeMap<String, Tally>,
    pub hours: BTreeMap<String, Tally>,
    pub reasons: BTreeMap<String, u64>,
    pub clients: HashMap<String, Tally>,
}

impl Report {
    fn new() -> Self {
        Self {
            files: Vec::new(),
            records: 0,
            skipped_lines: 0,
            total: Tally::default(),
            services: BTreeMap::new(),
            networks: BTreeMap::new(),
            backends: BTreeMap::new(),
            hours: BTreeMap::new(),
            reasons: BTreeMap::new(),
            clients: HashMap::new(),
        }
    }

    /// Reads every file (gzip detected by its magic bytes) and aggregates its records.
    pub fn from_files(paths: &[PathBuf]) -> Result<Report, String> {
        let mut report = Report::new();
        for path in paths {
            let reader = open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for line in reader.lines() {
                let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
                report.add_line(&line);
            }
            report.files.push(path.clone());
        }
        Ok(report)
    }

    fn add_line(&mut self, text: &str) {
        if text.trim().is_empty() {
            return;
        }
        let Ok(line) = serde_json::from_str::<Line>(text) else {
            self.skipped_lines += 1;
            return;
        };
        let denied = match line.kind.as_str() {
            "close" => false,
            "deny" => true,
            "open" | "interim" => return,
            _ => {
                self.skipped_lines += 1;
                return;
            }
        };
        self.records += 1;
        let (up, down) = (line.bytes_up, line.bytes_down);
        self.total.add(denied, up, down);
        let (tally, durations) = self.services.entry(line.service.clone()).or_insert_with(|| {
            (Tally::default(), Histogram::new(3).expect("3 significant digits is valid"))
        });
        tally.add(denied, up, down);
        if !denied {
            durations.saturating_record(line.duration_ms);
        }
        self.networks.entry(network_of(&line.client_addr)).or_default().add(denied, up, down);
        if let (Some(addr), Some(port)) = (&line.backend_addr, line.backend_port) {
            let key = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            self.backends.entry(key).or_default().add(denied, up, down);
        }
        let hour = line.start.get(..13).map_or_else(|| "?".to_string(), |h| format!("{h}:00Z"));
        self.hours.entry(hour).or_default().add(denied, up, down);
        let reason = line.reason.unwrap_or_else(|| "-".into());
        *self.reasons.entry(reason).or_default() += 1;
        self.clients.entry(line.client_addr).or_default().add(denied, up, down);
    }

    /// The clients with the most bytes, most first.
    pub fn top_clients(&self) -> Vec<(&String, &Tally)> {
        let mut all: Vec<_> = self.clients.iter().collect();
        all.sort_by(|a, b| {
            (b.1.bytes_up + b.1.bytes_down).cmp(&(a.1.bytes_up + a.1.bytes_down)).then(a.0.cmp(b.0))
        });
        all.truncate(TOP_CLIENTS);
        all
    }

    pub fn to_json(&self) -> Value {
        let map = |m: &BTreeMap<String, Tally>| {
            m.iter().map(|(k, t)| (k.clone(), t.json())).collect::<serde_json::Map<_, _>>()
        };
        let services: serde_json::Map<_, _> = self
            .services
            .iter()
            .map(|(name, (t, h))| {
                let mut v = t.json();
                v["duration_ms"] = json!({
                    "p50": h.value_at_quantile(0.5), "p90": h.value_at_quantile(0.9),
                    "p99": h.value_at_quantile(0.99), "max": h.max(),
                });
                (name.clone(), v)
            })
            .collect();
        json!({
            "files": self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "records": self.records,
            "skipped_lines": self.skipped_lines,
            "total": self.total.json(),
            "services": services,
            "networks": map(&self.networks),
            "backends": map(&self.backends),
            "hours": map(&self.hours),
            "reasons": self.reasons,
            "top_clients": self.top_clients().iter().map(|(c, t)| { let mut v = t.json(); v["client"] = json!(c); v }).collect::<Vec<_>>(),
        })
    }

    /// The terminal rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} records from {} file(s), {} lines skipped\n",
            self.records,
            self.files.len(),
            self.skipped_lines
        );
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>8} {:>14} {:>14} {:>9} {:>9} {:>9}",
            "service", "sessions", "denied", "bytes up", "bytes down", "p50 ms", "p99 ms", "max ms"
        );
        for (name, (t, h)) in &self.services {
            let _ = writeln!(
                out,
                "{name:<28} {:>9} {:>8} {:>14} {:>14} {:>9} {:>9} {:>9}",
                t.sessions,
                t.denials,
                t.bytes_up,
                t.bytes_down,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
        for (title, map) in [
            ("client network", &self.networks),
            ("backend", &self.backends),
            ("hour (UTC)", &self.hours),
        ] {
            let _ = writeln!(
                out,
                "\n{title:<28} {:>9} {:>8} {:>14} {:>14}",
                "sessions", "denied", "bytes up", "bytes down"
            );
            for (k, t) in map {
                let _ = writeln!(
                    out,
                    "{k:<28} {:>9} {:>8} {:>14} {:>14}",
                    t.sessions, t.denials, t.bytes_up, t.bytes_down
                );
            }
        }
        let _ = writeln!(out, "\n{:<28} {:>9}", "close reason", "count");
        for (reason, n) in &self.reasons {
            let _ = writeln!(out, "{reason:<28} {n:>9}");
        }
        let _ = writeln!(
            out,
            "\n{:<28} {:>9} {:>8} {:>14} {:>14}",
            "top clients (by bytes)", "sessions", "denied", "bytes up", "bytes down"
        );
        for (client, t) in self.top_clients() {
            let _ = writeln!(
                out,
                "{client:<28} {:>9} {:>8} {:>14} {:>14}",
                t.sessions, t.denials, t.bytes_up, t.bytes_down
            );
        }
        out
    }

    /// An HTML page with the tables and SVG charts of traffic and sessions per hour.
    pub fn to_html(&self) -> String {
        let hours: Vec<(&String, &Tally)> = self.hours.iter().collect();
        let bytes: Vec<f64> =
            hours.iter().map(|(_, t)| (t.bytes_up + t.bytes_down) as f64).collect();
        let sessions: Vec<f64> = hours.iter().map(|(_, t)| t.sessions as f64).collect();
        let labels: Vec<&str> = hours.iter().map(|(h, _)| h.as_str()).collect();
        let mut html = String::from("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sluice report</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th:first-child,td:first-child{text-align:left}</style></head><body>\n<h1>sluice connection report</h1>\n");
        let _ = writeln!(
            html,
            "<p>{} records from {} file(s); {} lines skipped.</p>",
            self.records,
            self.files.len(),
            self.skipped_lines
        );
        html.push_str("<h2>Traffic per hour (bytes, both directions)</h2>\n");
        html.push_str(&bar_chart(&labels, &bytes, "#2b6cb0"));
        html.push_str("<h2>Sessions per hour</h2>\n");
        html.push_str(&bar_chart(&labels, &sessions, "#2f855a"));
        let _ = writeln!(html, "<h2>Details</h2>\n<pre>{}</pre>", escape(&self.to_text()));
        html.push_str("</body></html>\n");
        html
    }
}

fn open(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    let mut file = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    let file = std::fs::File::open(path)?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file))))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

/// The client's /24 (IPv4) or /64 (IPv6) network.
pub fn network_of(addr: &str) -> String {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
        Err(_) => "?".into(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A bar chart as inline SVG: one bar per label, the largest value at full height.
fn bar_chart(labels: &[&str], values: &[f64], color: &str) -> String {
    let (width, height, pad) = (900.0, 260.0, 40.0);
    let max = values.iter().cloned().fold(0.0f64, f64::max).max(1.0);
    let n = values.len().max(1) as f64;
    let slot = (width - 2.0 * pad) / n;
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\n");
    let _ = writeln!(
        svg,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>",
        height - pad,
        width - pad,
        height - pad
    );
    let _ = writeln!(svg, "<text x=\"{pad}\" y=\"14\" font-size=\"12\">max {max:.0}</text>");
    for (i, (&label, &v)) in labels.iter().zip(values).enumerate() {
        let h = (height - 2.0 * pad) * v / max;
        let x = pad + i as f64 * slot + slot * 0.1;
        let _ = writeln!(svg, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"><title>{} {v:.0}</title></rect>", height - pad - h, slot * 0.8, escape(label));
        if labels.len() <= 24 || i % (labels.len() / 12).max(1) == 0 {
            let _ = writeln!(svg, "<text x=\"{x:.1}\" y=\"{}\" font-size=\"9\" transform=\"rotate(30 {x:.1},{})\">{}</text>", height - pad + 12.0, height - pad + 12.0, escape(label.get(5..).unwrap_or(label)));
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: &str, client: &str, hour: u8, up: u64, down: u64, ms: u64) -> String {
        format!(
            r#"{{"kind":"{kind}","start":"2026-11-22T{hour:02}:10:00.000Z","end":"x","duration_ms":{ms},"service":"web","listener":"127.0.0.1:80","client_addr":"{client}","client_port":1,"backend_addr":"127.0.0.1","backend_port":8000,"bytes_up":{up},"bytes_down":{down},"verdict":"allow","rule":null,"reason":"client_fin","worker":0,"tables_version":1}}"#
        )
    }

    #[test]
    fn aggregates_close_and_deny_records_and_skips_the_rest() {
        let mut r = Report::new();
        r.add_line(&line("close", "10.1.2.3", 8, 10, 100, 5));
        r.add_line(&line("close", "10.1.2.99", 9, 1, 2, 50));
        r.add_line(&line("deny", "2001:db8::1", 9, 0, 0, 0));
        r.add_line(&line("open", "10.1.2.3", 8, 0, 0, 0));
        r.add_line("not json");
        assert_eq!(r.records, 3);
        assert_eq!(r.skipped_lines, 1);
        assert_eq!(r.total, Tally { sessions: 2, denials: 1, bytes_up: 11, bytes_down: 102 });
        assert_eq!(r.networks["10.1.2.0/24"].sessions, 2);
        assert_eq!(r.networks["2001:db8::/64"].denials, 1);
        assert_eq!(r.hours["2026-11-22T09:00Z"].sessions, 1);
        assert_eq!(r.services["web"].1.max(), 50);
        assert_eq!(r.top_clients()[0].0, "10.1.2.3");
        assert!(r.to_html().contains("<svg"));
        assert_eq!(r.to_json()["backends"]["127.0.0.1:8000"]["sessions"], 2);
    }
}
