//! The administration API seen from outside: a minimal HTTP/1.1 client over a TCP or unix
//! stream (one request per connection, `Connection: close`, so the answer ends at EOF), and
//! the `/metrics` exposition parsed by a Prometheus text-format parser.
//!
//! Invariants: every request has a read and write timeout, so none blocks a test forever;
//! a transport failure panics with the address and request.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value as Prom};
use serde_json::Value;

/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for AdminAddr {
    /// The value of `admin.listen` for this address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("status {} body is not JSON ({e}): {}", self.status, self.text())
        })
    }
}

/// A client of one sluice's admin API, optionally presenting a bearer token.
#[derive(Debug, Clone)]
pub struct Admin {
    addr: AdminAddr,
    token: Option<String>,
}

impl Admin {
    pub fn new(addr: AdminAddr) -> Self {
        Self { addr, token: None }
    }

    /// The same API, presenting `token` (`Authorization: Bearer`) on every request.
    pub fn with_token(&self, token: &str) -> Self {
        Self { addr: self.addr.clone(), token: Some(token.to_string()) }
    }

    pub fn addr(&self) -> &AdminAddr {
        &self.addr
    }

    /// The TCP address; panics for a unix socket.
    pub fn tcp_addr(&self) -> SocketAddr {
        match &self.addr {
            AdminAddr::Tcp(a) => *a,
            AdminAddr::Unix(p) => panic!("admin is on unix socket {}", p.display()),
        }
    }

    /// Sends one request and returns the answer, whatever its status.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        self.try_request(method, path, body, &[], REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {path} on admin {}: {e}", self.addr))
    }

    /// One request with extra headers, every step bounded by `timeout`; transport
    /// failures are returned, not panicked on.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> io::Result<HttpResponse> {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(b) = &bearer {
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
                all.push(("Authorization", b));
            }
        }
        match &self.addr {
            AdminAddr::Tcp(a) => TcpStream::connect_timeout(a, timeout).and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                exchange(&mut s, method, path, body, &all)
            }),
            AdminAddr::Unix(p) => UnixStream::connect(p).and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                exchange(&mut s, method, path, body, &all)
            }),
        }
    }

    pub fn delete(&self, path: &str) -> HttpResponse {
        self.request("DELETE", path, b"")
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, b"")
    }

    pub fn post(&self, path: &str) -> HttpResponse {
        self.request("POST", path, b"")
    }

    /// `GET /stats`, asserted 200.
    pub fn stats(&self) -> Value {
        ok(self.get("/stats"), "/stats").json()
    }

    /// `GET /metrics`, asserted 200, parsed.
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&ok(self.get("/metrics"), "/metrics").text())
    }

    /// `GET /connections` (with `?limit=N` if given), asserted 200.
    pub fn connections(&self, limit: Option<usize>) -> Value {
        let path = match limit {
            Some(n) => format!("/connections?limit={n}"),
            None => "/connections".to_string(),
        };
        ok(self.get(&path), &path).json()
    }
}

fn ok(response: HttpResponse, what: &str) -> HttpResponse {
    assert_eq!(response.status, 200, "{what} answered {}: {}", response.status, response.text());
    response
}

/// Writes one request and reads the answer to EOF. The body is written best-effort: a
/// server may answer (413) and close before reading it all, and that answer is what counts.
pub fn exchange<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head += "Host: sluice\r\n";
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if complete(&raw) {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A reset after a complete answer (unread request bytes) still leaves the answer.
            Err(e) if !raw.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    parse_response(&raw)
}

/// Whether `raw` holds a whole answer with a `Content-Length` (a server that keeps the
/// connection open despite `Connection: close` is not waited for).
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "content-length")
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    length.is_some_and(|n| raw.len() >= split + 4 + n)
}

pub fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let split =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("header is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = HttpResponse { status, headers, body: raw[split + 4..].to_vec() };
    if response.header("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        response.body = dechunk(&response.body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(response)
}

/// Decodes a chunked transfer-encoded body (no trailers expected).
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// A `/metrics` exposition, parsed.
#[derive(Debug)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus text format; panics with the text if it does not parse.
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = Scrape::parse(lines)
            .unwrap_or_else(|e| panic!("/metrics is not Prometheus text ({e}):\n{text}"));
        Metrics { samples: scrape.samples }
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect()
    }

    /// The value of the one counter, gauge or untyped sample of `name` with `labels`;
    /// `None` if there is none, a panic if several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.matching(name, labels);
        assert!(found.len() <= 1, "{} samples of {name} match {labels:?}", found.len());
        match &found.first()?.value {
            Prom::Counter(v) | Prom::Gauge(v) | Prom::Untyped(v) => Some(*v),
            other => panic!("{name} {labels:?} is not a scalar: {other:?}"),
        }
    }

    /// How many samples of `name` there are, whatever their labels.
    pub fn series(&self, name: &str) -> usize {
        self.matching(name, &[]).len()
    }

    /// [`Metrics::value`], required.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    /// The cumulative buckets `(le, count)` of histogram `name` with `labels`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let found = self.matching(name, labels);
        assert_eq!(found.len(), 1, "histogram {name} {labels:?}: {} matches", found.len());
        match &found[0].value {
            Prom::Histogram(buckets) => buckets.iter().map(|b| (b.less_than, b.count)).collect(),
            other => panic!("{name} {labels:?} is not a histogram: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_and_chunked_answers() {
        let fixed =
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: POST\r\nContent-Length: 2\r\n\r\n{}";
        let r = parse_response(fixed).unwrap();
        assert_eq!(
            (r.status, r.header("allow"), r.body.as_slice()),
            (405, Some("POST"), &b"{}"[..])
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body, b"abcde");
    }
}
