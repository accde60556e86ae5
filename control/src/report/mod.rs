//! `sluice report FILE...`: turns JSON-lines connection logs (plain or gzip'd, as logrotate
//! leaves them) into aggregates: per service, per client network (/24 and /64), per
//! backend, per hour, per close reason, and the top clients; printed as a terminal table,
//! as JSON, or as an HTML page with SVG charts of traffic over time.
//!
//! Over a time range (`--since`, `--until`) and in buckets (`--by` minute, hour, day or
//! week) it adds per-bucket accounting tables: totals, client networks and clients, as
//! text, JSON or CSV ([`Report::to_csv`]); `--previous-day --out-dir DIR` writes the
//! previous UTC day's report to `DIR` atomically (see [`write_atomically`]). Times are UTC
//! ([`range`]). A record belongs to the range and the bucket of its session's `start`:
//! `since` is inclusive, `until` exclusive, and so is each bucket's start and end.
//!
//! Only close and deny records are counted (open and interim records describe sessions that
//! a close record reports again). Lines that are not records are counted and skipped, and
//! so are records whose `start` is not a time when a range or buckets are asked for.
//! Every sum saturates at 2^64 - 1 instead of wrapping: hostile input (byte counts near
//! 2^64) can make a figure read "at least this much", never a small wrong one.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub mod range;

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};

use self::range::{format_time, By};

/// Clients listed under "top clients".
pub const TOP_CLIENTS: usize = 10;
/// Prefix grouping IPv4 clients into a network (`--network-v4`).
pub const DEFAULT_REPORT_NETWORK_V4: u8 = 24;
/// Prefix grouping IPv6 clients into a network (`--network-v6`).
pub const DEFAULT_REPORT_NETWORK_V6: u8 = 64;
/// The columns of [`Report::to_csv`].
pub const CSV_HEADER: &str =
    "bucket_start,bucket_end,scope,key,sessions,denials,bytes_up,bytes_down";

/// What a report covers and how it groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Only sessions that started at or after this time (ms since 1970, UTC).
    pub since: Option<i64>,
    /// Only sessions that started before this time.
    pub until: Option<i64>,
    /// Accounting tables per bucket of this length.
    pub by: Option<By>,
    pub network_v4: u8,
    pub network_v6: u8,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            since: None,
            until: None,
            by: None,
            network_v4: DEFAULT_REPORT_NETWORK_V4,
            network_v6: DEFAULT_REPORT_NETWORK_V6,
        }
    }
}

impl Options {
    /// Whether records need a readable start time.
    fn needs_time(&self) -> bool {
        self.since.is_some() || self.until.is_some() || self.by.is_some()
    }

    fn contains(&self, t: i64) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }
}

/// The accounting of one bucket: its totals, per client network and per client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub total: Tally,
    pub networks: HashMap<String, Tally>,
    pub clients: HashMap<String, Tally>,
}

/// Rows heaviest first (bytes both ways), then by key.
fn heaviest(map: &HashMap<String, Tally>) -> Vec<(&String, &Tally)> {
    let mut all: Vec<_> = map.iter().collect();
    all.sort_by(|a, b| b.1.bytes().cmp(&a.1.bytes()).then(a.0.cmp(b.0)));
    all
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

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
    /// Which sluice wrote it (absent in logs from before the field existed).
    instance: Option<String>,
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
            self.denials = self.denials.saturating_add(1);
        } else {
            self.sessions = self.sessions.saturating_add(1);
        }
        self.bytes_up = self.bytes_up.saturating_add(up);
        self.bytes_down = self.bytes_down.saturating_add(down);
    }

    /// Bytes both ways (saturating).
    pub fn bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }

    fn json(&self) -> Value {
        json!({ "sessions": self.sessions, "denials": self.denials, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down })
    }
}

/// Everything the report shows.
#[derive(Debug)]
pub struct Report {
    pub options: Options,
    pub files: Vec<PathBuf>,
    /// Records left out for starting outside the range.
    pub outside_range: u64,
    /// Per bucket start (ms since 1970), with `options.by`.
    pub buckets: BTreeMap<i64, Bucket>,
    pub records: u64,
    pub skipped_lines: u64,
    pub total: Tally,
    pub services: BTreeMap<String, (Tally, Histogram<u64>)>,
    pub networks: BTreeMap<String, Tally>,
    pub backends: BTreeMap<String, Tally>,
    /// Per `instance` (the sluice that wrote the record; `-` when absent): logs of a fleet
    /// gathered in one place.
    pub instances: BTreeMap<String, Tally>,
    pub hours: BTreeMap<String, Tally>,
    pub reasons: BTreeMap<String, u64>,
    pub clients: HashMap<String, Tally>,
}

impl Report {
    #[cfg(test)]
    fn new() -> Self {
        Self::with_options(Options::default())
    }

    fn with_options(options: Options) -> Self {
        Self {
            options,
            files: Vec::new(),
            outside_range: 0,
            buckets: BTreeMap::new(),
            records: 0,
            skipped_lines: 0,
            total: Tally::default(),
            services: BTreeMap::new(),
            networks: BTreeMap::new(),
            backends: BTreeMap::new(),
            instances: BTreeMap::new(),
            hours: BTreeMap::new(),
            reasons: BTreeMap::new(),
            clients: HashMap::new(),
        }
    }

    /// Reads every file (gzip detected by its magic bytes) and aggregates its records.
    pub fn from_files(paths: &[PathBuf]) -> Result<Report, String> {
        Self::from_files_with(paths, Options::default())
    }

    /// [`Report::from_files`] over a range, in buckets, with network prefixes.
    pub fn from_files_with(paths: &[PathBuf], options: Options) -> Result<Report, String> {
        let mut report = Report::with_options(options);
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
            self.skipped_lines = self.skipped_lines.saturating_add(1);
            return;
        };
        let denied = match line.kind.as_str() {
            "close" => false,
            "deny" => true,
            "open" | "interim" => return,
            _ => {
                self.skipped_lines = self.skipped_lines.saturating_add(1);
                return;
            }
        };
        let at = range::parse_time(&line.start).ok();
        if self.options.needs_time() {
            match at {
                Some(t) if self.options.contains(t) => {}
                Some(_) => {
                    self.outside_range = self.outside_range.saturating_add(1);
                    return;
                }
                None => {
                    self.skipped_lines = self.skipped_lines.saturating_add(1);
                    return;
                }
            }
        }
        self.records = self.records.saturating_add(1);
        let (up, down) = (line.bytes_up, line.bytes_down);
        let network =
            network_with(&line.client_addr, self.options.network_v4, self.options.network_v6);
        if let (Some(by), Some(t)) = (self.options.by, at) {
            let bucket = self.buckets.entry(by.start_of(t)).or_default();
            bucket.total.add(denied, up, down);
            bucket.networks.entry(network.clone()).or_default().add(denied, up, down);
            bucket.clients.entry(line.client_addr.clone()).or_default().add(denied, up, down);
        }
        self.total.add(denied, up, down);
        let (tally, durations) = self.services.entry(line.service.clone()).or_insert_with(|| {
            (Tally::default(), Histogram::new(3).expect("3 significant digits is valid"))
        });
        tally.add(denied, up, down);
        if !denied {
            durations.saturating_record(line.duration_ms);
        }
        self.networks.entry(network).or_default().add(denied, up, down);
        if let (Some(addr), Some(port)) = (&line.backend_addr, line.backend_port) {
            let key = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            self.backends.entry(key).or_default().add(denied, up, down);
        }
        let instance = line.instance.unwrap_or_else(|| "-".into());
        self.instances.entry(instance).or_default().add(denied, up, down);
        let hour = line.start.get(..13).map_or_else(|| "?".to_string(), |h| format!("{h}:00Z"));
        self.hours.entry(hour).or_default().add(denied, up, down);
        let reason = line.reason.unwrap_or_else(|| "-".into());
        let count = self.reasons.entry(reason).or_default();
        *count = count.saturating_add(1);
        self.clients.entry(line.client_addr).or_default().add(denied, up, down);
    }

    /// The clients with the most bytes, most first.
    pub fn top_clients(&self) -> Vec<(&String, &Tally)> {
        let mut all: Vec<_> = self.clients.iter().collect();
        all.sort_by(|a, b| b.1.bytes().cmp(&a.1.bytes()).then(a.0.cmp(b.0)));
        all.truncate(TOP_CLIENTS);
        all
    }

    /// The bucket rows, in order: per bucket (oldest first) its total, then its networks,
    /// then its clients, each heaviest first. Each row: (bucket start, bucket end, scope,
    /// key, tally); the total's key is empty.
    pub fn bucket_rows(&self) -> Vec<(i64, i64, &'static str, &str, &Tally)> {
        let Some(by) = self.options.by else { return Vec::new() };
        let mut rows = Vec::new();
        for (&start, b) in &self.buckets {
            let end = by.end_of(start);
            rows.push((start, end, "total", "", &b.total));
            for (scope, map) in [("network", &b.networks), ("client", &b.clients)] {
                for (key, t) in heaviest(map) {
                    rows.push((start, end, scope, key.as_str(), t));
                }
            }
        }
        rows
    }

    /// The accounting tables as CSV ([`CSV_HEADER`]): one row per bucket total, per client
    /// network and per client of each bucket, times in RFC 3339 UTC.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(CSV_HEADER);
        out.push('\n');
        for (start, end, scope, key, t) in self.bucket_rows() {
            let _ = writeln!(
                out,
                "{},{},{scope},{},{},{},{},{}",
                format_time(start),
                format_time(end),
                csv_field(key),
                t.sessions,
                t.denials,
                t.bytes_up,
                t.bytes_down
            );
        }
        out
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
            "instances": map(&self.instances),
            "hours": map(&self.hours),
            "reasons": self.reasons,
            "top_clients": self.top_clients().iter().map(|(c, t)| { let mut v = t.json(); v["client"] = json!(c); v }).collect::<Vec<_>>(),
            "since": self.options.since.map(format_time),
            "until": self.options.until.map(format_time),
            "outside_range": self.outside_range,
            "by": self.options.by.map(By::as_str),
            "buckets": self.options.by.map(|by| self.buckets.iter().map(|(&start, b)| {
                let rows = |m: &HashMap<String, Tally>, key: &str| heaviest(m).into_iter().map(|(k, t)| {
                    let mut v = t.json();
                    v[key] = json!(k);
                    v
                }).collect::<Vec<_>>();
                json!({
                    "start": format_time(start),
                    "end": format_time(by.end_of(start)),
                    "total": b.total.json(),
                    "networks": rows(&b.networks, "network"),
                    "clients": rows(&b.clients, "client"),
                })
            }).collect::<Vec<_>>()),
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
        if self.options.since.is_some() || self.options.until.is_some() {
            let show = |t: Option<i64>| t.map_or_else(|| "-".to_string(), format_time);
            let _ = writeln!(
                out,
                "sessions started from {} (inclusive) to {} (exclusive); {} records outside\n",
                show(self.options.since),
                show(self.options.until),
                self.outside_range
            );
        }
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
            ("instance", &self.instances),
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
        if let Some(by) = self.options.by {
            let _ = writeln!(
                out,
                "\n{:<20} {:<8} {:<28} {:>9} {:>8} {:>14} {:>14}",
                format!("{} start (UTC)", by.as_str()),
                "scope",
                "network or client",
                "sessions",
                "denied",
                "bytes up",
                "bytes down"
            );
            for (start, _, scope, key, t) in self.bucket_rows() {
                let _ = writeln!(
                    out,
                    "{:<20} {scope:<8} {key:<28} {:>9} {:>8} {:>14} {:>14}",
                    format_time(start),
                    t.sessions,
                    t.denials,
                    t.bytes_up,
                    t.bytes_down
                );
            }
        }
        out
    }

    /// An HTML page with the tables and SVG charts of traffic and sessions per hour.
    pub fn to_html(&self) -> String {
        let hours: Vec<(&String, &Tally)> = self.hours.iter().collect();
        let bytes: Vec<f64> = hours.iter().map(|(_, t)| t.bytes() as f64).collect();
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
    network_with(addr, DEFAULT_REPORT_NETWORK_V4, DEFAULT_REPORT_NETWORK_V6)
}

/// The client's network under these prefix lengths (`192.0.2.0/24`), or `?`.
pub fn network_with(addr: &str, v4: u8, v6: u8) -> String {
    let Ok(ip) = addr.parse::<IpAddr>() else { return "?".into() };
    let len = if ip.is_ipv4() { v4.min(32) } else { v6.min(128) };
    let net = sluice_engine::limits::network_of(ip, v4.min(32), v6.min(128));
    format!("{net}/{len}")
}

/// Writes `contents` to `path` so that a reader sees the old file or the whole new one:
/// into a temporary file beside it, flushed to disk, then renamed over it (and the
/// directory synced). Running it again with the same contents leaves the same file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    std::fs::File::open(dir)?.sync_all()
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

    /// Issue 26 item 16: sums of hostile byte counts wrapped (or panicked in a debug build).
    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut r = Report::new();
        let max = u64::MAX;
        r.add_line(&line("close", "10.1.2.3", 8, max, max, 5));
        r.add_line(&line("close", "10.1.2.3", 8, max, 7, 5));
        r.add_line(&line("close", "10.9.9.9", 8, 1, 1, 5));
        assert_eq!((r.total.bytes_up, r.total.bytes_down), (max, max));
        assert_eq!(r.clients["10.1.2.3"].bytes(), max);
        assert_eq!(r.top_clients()[0].0, "10.1.2.3", "the saturated client is still the top one");
        assert_eq!(r.hours["2026-11-22T08:00Z"].bytes_up, max);
        assert!(r.to_html().contains("<svg"));
        assert_eq!(r.to_json()["total"]["bytes_up"], max);
    }

    #[test]
    fn ranges_keep_since_and_leave_until_and_buckets_sum_per_client_and_network() {
        let options = Options {
            since: Some(range::parse_time("2026-11-22T08:00:00Z").unwrap()),
            until: Some(range::parse_time("2026-11-22T09:00:00Z").unwrap()),
            by: Some(By::Hour),
            network_v4: 16,
            network_v6: 32,
        };
        let mut r = Report::with_options(options);
        // `line` starts sessions at HH:10:00; 07 and 09 fall outside [08:00, 09:00).
        r.add_line(&line("close", "10.1.2.3", 7, 1, 1, 5));
        r.add_line(&line("close", "10.1.2.3", 8, 10, 100, 5));
        r.add_line(&line("close", "10.1.9.9", 8, 5, 5, 5));
        r.add_line(&line("deny", "2001:db8:1::1", 8, 0, 0, 0));
        r.add_line(&line("close", "10.1.2.3", 9, 1, 1, 5));
        assert_eq!((r.records, r.outside_range), (3, 2));
        assert_eq!(r.networks["10.1.0.0/16"].sessions, 2, "the report's own prefix");
        assert_eq!(r.networks["2001:db8::/32"].denials, 1);
        assert_eq!(
            r.to_csv(),
            "bucket_start,bucket_end,scope,key,sessions,denials,bytes_up,bytes_down\n\
             2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,total,,2,1,15,105\n\
             2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,network,10.1.0.0/16,2,0,15,105\n\
             2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,network,2001:db8::/32,0,1,0,0\n\
             2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,client,10.1.2.3,1,0,10,100\n\
             2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,client,10.1.9.9,1,0,5,5\n\
             2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,client,2001:db8:1::1,0,1,0,0\n"
        );
        let mut bad = Report::with_options(options);
        bad.add_line(&line("close", "10.1.2.3", 8, 1, 1, 5).replace("2026-11-22T08", "soon"));
        assert_eq!((bad.records, bad.skipped_lines), (0, 1));
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("10.0.0.0/24"), "10.0.0.0/24");
        assert_eq!(csv_field("2001:db8::1"), "2001:db8::1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
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
        assert_eq!(r.instances["-"].sessions, 2, "records from before the instance field");
    }

    /// A fleet's records gathered in one file are told apart by their `instance`.
    #[test]
    fn records_are_counted_per_instance() {
        let mut r = Report::new();
        let of = |instance: &str, up| {
            let l = line("close", "10.1.2.3", 8, up, 1, 5);
            l.replace("\"kind\"", &format!("\"instance\":\"{instance}\",\"kind\""))
        };
        r.add_line(&of("edge-1", 10));
        r.add_line(&of("edge-2", 20));
        r.add_line(&of("edge-2", 30));
        let json = r.to_json();
        assert_eq!(json["instances"]["edge-1"]["bytes_up"], 10);
        assert_eq!((json["instances"]["edge-2"]["sessions"].as_u64()), Some(2));
        assert!(r.to_text().contains("\ninstance "), "{}", r.to_text());
    }
}
