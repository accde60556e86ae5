//! DNS discovery of a pool's backends: a small blocking DNS client (no runtime) for A/AAAA
//! (`dns = "name:port"`) and SRV (`srv = "_service._proto.name"`) lookups, as Consul and
//! Kubernetes headless services serve them.
//!
//! Every question of a lookup is asked at once on one UDP socket (an SRV lookup's target
//! addresses together), with an EDNS0 record offering answers of up to [`EDNS_PAYLOAD`]
//! bytes; a truncated answer is asked again over TCP. Each nameserver is tried in turn
//! (for [`DEFAULT_DNS_TIMEOUT`] each) for the questions the ones before left unanswered or
//! failed (SERVFAIL, REFUSED); "no such name" is an answer. Query ids are random, and a
//! reply counts only if it comes from the server asked, with the query's id and question.
//!
//! Invariants: a lookup never waits past its deadline, whatever the servers do (the caller
//! gives one deadline to all the lookups of a round); at most [`MAX_SRV_TARGETS`] targets
//! are looked up; a lookup that fails or finds no address is an error, and the caller keeps
//! the last good set.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::clock;
use crate::config::BackendSpec;

/// How often a discovered pool is looked up again.
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(30);
/// How long the questions of a lookup wait for one nameserver before the next is asked.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a round of lookups (every discovered pool, at start, on reload or when due)
/// may take in all; a lookup still unanswered then has failed.
pub const DEFAULT_DNS_DEADLINE: Duration = Duration::from_secs(5);
/// The UDP answer size offered with EDNS0 (the DNS flag day 2020 figure); larger answers
/// come truncated and are asked again over TCP.
pub const EDNS_PAYLOAD: u16 = 1232;
/// Most nameservers of /etc/resolv.conf tried in turn.
pub const MAX_NAMESERVERS: usize = 8;
/// The resolver's port when `resolver` names only an address.
pub const DEFAULT_DNS_PORT: u16 = 53;
/// Most SRV targets whose addresses are looked up separately (when the reply's additional
/// section does not carry them).
pub const MAX_SRV_TARGETS: usize = 64;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Most compression pointers followed in one name (guards against loops).
const MAX_POINTERS: usize = 32;

/// What a pool asks DNS for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// A and AAAA records of `name`, each address with `port`.
    Host { name: String, port: u16 },
    /// SRV records of `name`: targets, ports, priorities (lowest first; higher ones become
    /// backups) and weights.
    Srv { name: String },
}

impl Query {
    /// Parses `name:port`.
    pub fn host(text: &str) -> Result<Query, String> {
        let bad = || format!("{text:?} is not \"name:port\"");
        let (name, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        check_name(name)?;
        Ok(Query::Host { name: name.to_string(), port })
    }

    /// Parses an SRV name such as `_http._tcp.web.service.consul`.
    pub fn srv(text: &str) -> Result<Query, String> {
        check_name(text)?;
        Ok(Query::Srv { name: text.to_string() })
    }

    pub fn name(&self) -> &str {
        match self {
            Query::Host { name, .. } | Query::Srv { name } => name,
        }
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let name = name.trim_end_matches('.');
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a DNS name"))
    }
}

/// Parses a resolver address: `ip` or `ip:port`.
pub fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_DNS_PORT))
        .map_err(|_| format!("{text:?} is not a resolver address such as \"127.0.0.1:53\""))
}

/// Every nameserver of /etc/resolv.conf (at most [`MAX_NAMESERVERS`]), in order.
pub fn system_resolvers() -> Result<Vec<SocketAddr>, String> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?;
    let servers = nameservers(&text);
    if servers.is_empty() {
        return Err("no nameserver in /etc/resolv.conf".to_string());
    }
    Ok(servers)
}

/// The `nameserver` lines of a resolv.conf text, as addresses on port 53.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, DEFAULT_DNS_PORT))
        .take(MAX_NAMESERVERS)
        .collect()
}

/// Looks `query` up, asking `servers` in turn, until `deadline`: the backends it names, or
/// why there are none.
pub fn resolve(
    query: &Query,
    servers: &[SocketAddr],
    deadline: Instant,
) -> Result<Vec<BackendSpec>, String> {
    let found = match query {
        Query::Host { name, port } => addresses(name, servers, deadline)?
            .into_iter()
            .map(|ip| BackendSpec::plain(SocketAddr::new(ip, *port)))
            .collect(),
        Query::Srv { name } => srv(name, servers, deadline)?,
    };
    if found.is_empty() {
        return Err(format!("{} has no address", query.name()));
    }
    Ok(found)
}

/// A and AAAA addresses of `name`; an error only when both lookups fail.
fn addresses(name: &str, servers: &[SocketAddr], deadline: Instant) -> Result<Vec<IpAddr>, String> {
    let questions = [Question::new(name, TYPE_A), Question::new(name, TYPE_AAAA)];
    let [a, aaaa]: [Result<Vec<Record>, String>; 2] =
        ask_all(&questions, servers, deadline).try_into().map_err(|_| "lookup lost".to_string())?;
    if let (Err(e), Err(_)) = (&a, &aaaa) {
        return Err(e.clone());
    }
    let records = a.unwrap_or_default().into_iter().chain(aaaa.unwrap_or_default());
    let mut ips: Vec<IpAddr> = records.filter_map(|r| r.ip()).collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// SRV targets with their addresses: from the additional section, or asked for all at once.
fn srv(name: &str, servers: &[SocketAddr], deadline: Instant) -> Result<Vec<BackendSpec>, String> {
    let records = ask_all(&[Question::new(name, TYPE_SRV)], servers, deadline)
        .pop()
        .unwrap_or_else(|| Err("lookup lost".to_string()))?;
    let mut known: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut targets = Vec::new();
    for r in records {
        match r {
            Record::Addr { name, ip } => known.entry(name).or_default().push(ip),
            Record::Srv { priority, weight, port, target } => {
                targets.push((priority, weight, port, target))
            }
        }
    }
    targets.truncate(MAX_SRV_TARGETS);
    let unknown: Vec<&String> =
        targets.iter().map(|t| &t.3).filter(|t| !known.contains_key(*t)).collect();
    let questions: Vec<Question> = unknown
        .iter()
        .flat_map(|t| [Question::new(t, TYPE_A), Question::new(t, TYPE_AAAA)])
        .collect();
    for (q, answer) in questions.iter().zip(ask_all(&questions, servers, deadline)) {
        let ips = answer.unwrap_or_default().into_iter().filter_map(|r| r.ip());
        known.entry(q.name.clone()).or_default().extend(ips);
    }
    let best = targets.iter().map(|t| t.0).min();
    let mut out = Vec::new();
    for (priority, weight, port, target) in targets {
        for &ip in known.get(&target).into_iter().flatten() {
            out.push(BackendSpec {
                addr: SocketAddr::new(ip, port),
                weight: u32::from(weight.max(1)).min(sluice_engine::balance::MAX_WEIGHT),
                max_sessions: 0,
                backup: Some(priority) != best,
            });
        }
    }
    out.sort_by_key(|b| b.addr);
    out.dedup_by_key(|b| b.addr);
    Ok(out)
}

/// One question: a name and a record type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    name: String,
    qtype: u16,
}

impl Question {
    fn new(name: &str, qtype: u16) -> Self {
        Self { name: name.trim_end_matches('.').to_ascii_lowercase(), qtype }
    }
}

/// What a reply says about its question.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The answer's records (answer and additional sections).
    Records(Vec<Record>),
    /// The answer did not fit the datagram: ask again over TCP.
    Truncated,
    /// This server could not answer (SERVFAIL, REFUSED...): ask the next one.
    Retry(String),
    /// The answer is that there is no such name, or another final error.
    Final(String),
}

/// Asks every question of `servers` in turn: all at once on one UDP socket, each server for
/// at most [`DEFAULT_DNS_TIMEOUT`], all before `deadline`. One result per question.
fn ask_all(
    questions: &[Question],
    servers: &[SocketAddr],
    deadline: Instant,
) -> Vec<Result<Vec<Record>, String>> {
    let mut results: Vec<Option<Result<Vec<Record>, String>>> = vec![None; questions.len()];
    let mut why = vec![String::from("no nameserver to ask"); questions.len()];
    for &server in servers {
        let pending: Vec<usize> = (0..questions.len()).filter(|&i| results[i].is_none()).collect();
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        let turn_end = clock::after(now, DEFAULT_DNS_TIMEOUT).min(deadline);
        if let Err(e) = ask_server(questions, &pending, server, turn_end, &mut results, &mut why) {
            pending.iter().filter(|&&i| results[i].is_none()).for_each(|&i| why[i] = e.clone());
        }
    }
    if Instant::now() >= deadline {
        why.iter_mut().for_each(|w| w.push_str(" (the lookup's deadline passed)"));
    }
    results.into_iter().zip(why).map(|(r, why)| r.unwrap_or(Err(why))).collect()
}

/// One server's turn: sends the pending questions and takes their answers until `turn_end`.
fn ask_server(
    questions: &[Question],
    pending: &[usize],
    server: SocketAddr,
    turn_end: Instant,
    results: &mut [Option<Result<Vec<Record>, String>>],
    why: &mut [String],
) -> Result<(), String> {
    let socket = udp_socket(server)?;
    let mut asked: HashMap<u16, usize> = HashMap::new();
    for &i in pending {
        let id = fresh_id(&asked);
        asked.insert(id, i);
        let query = encode_query(id, &questions[i].name, questions[i].qtype);
        socket.send(&query).map_err(|e| format!("dns query to {server}: {e}"))?;
    }
    let mut buf = vec![0u8; 4096];
    while !asked.is_empty() {
        let left = turn_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for &i in asked.values() {
                why[i] = format!("no answer from {server} for {}", questions[i].name);
            }
            return Ok(());
        }
        socket.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("dns answer from {server}: {e}")),
        };
        let Some((id, outcome)) = reply_id(&buf[..n]).and_then(|id| {
            let q = &questions[*asked.get(&id)?];
            Some((id, decode_reply(&buf[..n], id, q)?))
        }) else {
            continue;
        };
        let Some(i) = asked.remove(&id) else { continue };
        let outcome = match outcome {
            Outcome::Truncated => ask_tcp(&questions[i], server, turn_end),
            other => other,
        };
        match outcome {
            Outcome::Records(r) => results[i] = Some(Ok(r)),
            Outcome::Final(e) => results[i] = Some(Err(format!("{}: {e}", questions[i].name))),
            Outcome::Retry(e) => why[i] = format!("{}: {e} (from {server})", questions[i].name),
            Outcome::Truncated => {
                why[i] = format!("{}: truncated (from {server})", questions[i].name)
            }
        }
    }
    Ok(())
}

/// Asks one question over TCP (after a truncated UDP answer), within `until`.
fn ask_tcp(q: &Question, server: SocketAddr, until: Instant) -> Outcome {
    let left = || until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let exchange = || -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&server, left())?;
        stream.set_write_timeout(Some(left()))?;
        let id = fresh_id(&HashMap::new());
        let query = encode_query(id, &q.name, q.qtype);
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        stream.write_all(&framed)?;
        stream.set_read_timeout(Some(left()))?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.set_read_timeout(Some(left()))?;
        stream.read_exact(&mut reply)?;
        Ok(reply)
    };
    match exchange() {
        Ok(reply) => match reply_id(&reply).and_then(|id| decode_reply(&reply, id, q)) {
            Some(Outcome::Truncated) => Outcome::Retry("truncated over TCP".into()),
            Some(outcome) => outcome,
            None => Outcome::Retry("a TCP reply to another question".into()),
        },
        Err(e) => Outcome::Retry(format!("truncated, and over TCP: {e}")),
    }
}

fn udp_socket(server: SocketAddr) -> Result<UdpSocket, String> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("dns socket: {e}"))?;
    socket.connect(server).map_err(|e| format!("dns resolver {server}: {e}"))?;
    Ok(socket)
}

/// A random query id not in `taken`.
fn fresh_id(taken: &HashMap<u16, usize>) -> u16 {
    loop {
        let id = random_id();
        if !taken.contains_key(&id) {
            return id;
        }
    }
}

/// A query id from the system's random source (a hash of the time and a counter only if
/// that source fails).
fn random_id() -> u16 {
    let mut bytes = [0u8; 2];
    if getrandom::fill(&mut bytes).is_ok() {
        return u16::from_ne_bytes(bytes);
    }
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish() as u16
}

/// One record of a reply that discovery uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Addr { name: String, ip: IpAddr },
    Srv { priority: u16, weight: u16, port: u16, target: String },
}

impl Record {
    fn ip(&self) -> Option<IpAddr> {
        match self {
            Record::Addr { ip, .. } => Some(*ip),
            Record::Srv { .. } => None,
        }
    }
}

fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // Recursion desired; one question; one additional record (EDNS0's OPT).
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    // OPT: root name, type 41, class = the UDP payload size offered, no flags, no data.
    q.push(0);
    q.extend_from_slice(&TYPE_OPT.to_be_bytes());
    q.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    q
}

/// The id of a DNS reply, if it is one.
fn reply_id(msg: &[u8]) -> Option<u16> {
    let header = msg.get(..12)?;
    (header[2] & 0x80 != 0).then(|| u16::from_be_bytes([header[0], header[1]]))
}

/// What a reply to query `id` about `question` says; `None` when it is a reply to
/// something else (ignored). A malformed reply is a reason to ask the next server.
fn decode_reply(msg: &[u8], id: u16, question: &Question) -> Option<Outcome> {
    let header = msg.get(..12)?;
    if u16::from_be_bytes([header[0], header[1]]) != id || header[2] & 0x80 == 0 {
        return None;
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([header[i], header[i + 1]]));
    if count(4) != 1 {
        return Some(Outcome::Retry("a reply without its question".into()));
    }
    let asked = read_name(msg, 12).ok().and_then(|(name, at)| {
        let qtype = msg.get(at..at + 2).map(|t| u16::from_be_bytes([t[0], t[1]]))?;
        Some((name, qtype, at + 4))
    });
    let Some((name, qtype, at)) = asked else {
        return Some(Outcome::Retry("a malformed question in the reply".into()));
    };
    if name != question.name || qtype != question.qtype {
        return None;
    }
    let rcode = header[3] & 0x0f;
    match rcode {
        0 if header[2] & 0x02 != 0 => return Some(Outcome::Truncated),
        0 => {}
        3 => return Some(Outcome::Final("no such name (rcode 3)".into())),
        2 => return Some(Outcome::Retry("resolver answered server failure (rcode 2)".into())),
        5 => return Some(Outcome::Retry("resolver answered refused (rcode 5)".into())),
        _ => return Some(Outcome::Retry(format!("resolver answered error (rcode {rcode})"))),
    }
    let sections = (count(6), count(8), count(10));
    Some(match records(msg, at, sections) {
        Ok(records) => Outcome::Records(records),
        Err(e) => Outcome::Retry(e),
    })
}

/// The A, AAAA and SRV records of the answer and additional sections that start at `at`.
fn records(
    msg: &[u8],
    mut at: usize,
    (answers, authority, additional): (usize, usize, usize),
) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    for section in 0..answers + authority + additional {
        let (name, next) = read_name(msg, at)?;
        let fixed = msg.get(next..next + 10).ok_or("truncated record")?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let start = next + 10;
        let data = msg.get(start..start + len).ok_or("truncated record data")?;
        at = start + len;
        if (answers..answers + authority).contains(&section) {
            continue;
        }
        match (rtype, len) {
            (TYPE_A, 4) => records.push(Record::Addr {
                name,
                ip: IpAddr::from([data[0], data[1], data[2], data[3]]),
            }),
            (TYPE_AAAA, 16) => {
                let octets: [u8; 16] = data.try_into().map_err(|_| "bad AAAA record")?;
                records.push(Record::Addr { name, ip: IpAddr::from(octets) });
            }
            (TYPE_SRV, 7..) => {
                let field = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
                let (target, _) = read_name(msg, start + 6)?;
                records.push(Record::Srv {
                    priority: field(0),
                    weight: field(2),
                    port: field(4),
                    target,
                });
            }
            _ => {}
        }
    }
    Ok(records)
}

/// Reads a (possibly compressed) name at `at`: the name, lower-case without the final dot,
/// and the offset after it in the record.
fn read_name(msg: &[u8], mut at: usize) -> Result<(String, usize), String> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    for _ in 0..MAX_POINTERS {
        loop {
            let len = *msg.get(at).ok_or("name runs past the reply")? as usize;
            match len {
                0 => {
                    let name = labels.join(".").to_ascii_lowercase();
                    return Ok((name, end.unwrap_or(at + 1)));
                }
                l if l & 0xc0 == 0xc0 => {
                    let low = *msg.get(at + 1).ok_or("name runs past the reply")? as usize;
                    end.get_or_insert(at + 2);
                    at = ((l & 0x3f) << 8) | low;
                    break;
                }
                l if l <= 63 => {
                    let label = msg.get(at + 1..at + 1 + l).ok_or("name runs past the reply")?;
                    labels.push(String::from_utf8_lossy(label).into_owned());
                    at += 1 + l;
                }
                _ => return Err("bad label in name".into()),
            }
        }
    }
    Err("too many compression pointers in a name".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// The query `id` for `name` as a server sees it, without the OPT record: header and
    /// question.
    fn question_of(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let q = encode_query(id, name, qtype);
        q[..q.len() - 11].to_vec()
    }

    /// A reply to `query` (its header and question) with `records` (type, data), each
    /// named by a pointer to the question's name.
    fn answer(query: &[u8], records: &[(u16, Vec<u8>)], truncated: bool) -> Vec<u8> {
        let end = read_name(query, 12).unwrap().1 + 4;
        let mut m = query[..end].to_vec();
        m[2] = 0x81 | if truncated { 0x02 } else { 0 };
        m[3] = 0x80;
        m[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        m[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (rtype, data) in records {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
        }
        m
    }

    /// `n` A records 10.0.x.y.
    fn a_records(n: usize) -> Vec<(u16, Vec<u8>)> {
        (0..n).map(|i| (TYPE_A, vec![10, 0, (i / 250) as u8, (i % 250) as u8 + 1])).collect()
    }

    /// The EDNS0 payload size a query offers (512 without an OPT record).
    fn offered(query: &[u8]) -> usize {
        let arcount = u16::from_be_bytes([query[10], query[11]]);
        let end = read_name(query, 12).unwrap().1 + 4;
        match (arcount, query.get(end..end + 5)) {
            (1, Some([0, 0, 41, hi, lo])) => usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => 512,
        }
    }

    /// A DNS server on loopback (UDP, and TCP on the same port) answering with `reply`
    /// (query, over TCP?) -> reply, or silence; stops when dropped.
    struct FakeServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
    }

    impl FakeServer {
        fn start(reply: impl Fn(&[u8], bool) -> Option<Vec<u8>> + Send + Sync + 'static) -> Self {
            // A UDP port whose TCP twin is free too.
            let (udp, tcp) = (0..50)
                .find_map(|_| {
                    let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                    let tcp = TcpListener::bind(udp.local_addr().ok()?).ok()?;
                    Some((udp, tcp))
                })
                .expect("a free UDP and TCP port");
            let addr = udp.local_addr().unwrap();
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (flag, reply) = (stop.clone(), Arc::new(reply));
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        if let Some(r) = reply(&buf[..n], false) {
                            let _ = udp.send_to(&r, from);
                        }
                    }
                    if let Ok((mut s, _)) = tcp.accept() {
                        s.set_nonblocking(false).unwrap();
                        let mut len = [0u8; 2];
                        s.read_exact(&mut len).unwrap();
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        s.read_exact(&mut q).unwrap();
                        if let Some(r) = reply(&q, true) {
                            s.write_all(&(r.len() as u16).to_be_bytes()).unwrap();
                            s.write_all(&r).unwrap();
                        }
                    }
                }
            });
            FakeServer { addr, stop }
        }
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn soon(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    fn host(name: &str) -> Query {
        Query::Host { name: name.into(), port: 80 }
    }

    /// A reply to `id` for `_web._tcp.example` with two SRV records (one a lower priority)
    /// and the first target's address in the additional section, using compression.
    fn srv_reply(id: u16) -> Vec<u8> {
        let mut m = question_of(id, "_web._tcp.example", TYPE_SRV);
        m[2] = 0x81;
        m[3] = 0x80;
        m[6..8].copy_from_slice(&2u16.to_be_bytes());
        m[10..12].copy_from_slice(&1u16.to_be_bytes());
        let srv = |m: &mut Vec<u8>, prio: u16, weight: u16, port: u16, target: &[u8]| {
            m.extend_from_slice(&[0xc0, 12, 0, 33, 0, 1, 0, 0, 0, 30]);
            m.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
            m.extend_from_slice(&prio.to_be_bytes());
            m.extend_from_slice(&weight.to_be_bytes());
            m.extend_from_slice(&port.to_be_bytes());
            m.extend_from_slice(target);
        };
        let target_at = m.len() + 12 + 6;
        srv(&mut m, 10, 3, 8001, b"\x01a\xc0\x16");
        srv(&mut m, 20, 1, 8002, b"\x01b\xc0\x16");
        m.extend_from_slice(&[0xc0, target_at as u8, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 127, 0, 0, 7]);
        m
    }

    #[test]
    fn replies_decode_with_compressed_names() {
        let q = Question::new("_web._tcp.example", TYPE_SRV);
        assert_eq!(
            decode_reply(&srv_reply(77), 77, &q),
            Some(Outcome::Records(vec![
                Record::Srv { priority: 10, weight: 3, port: 8001, target: "a.example".into() },
                Record::Srv { priority: 20, weight: 1, port: 8002, target: "b.example".into() },
                Record::Addr { name: "a.example".into(), ip: "127.0.0.7".parse().unwrap() },
            ]))
        );
        assert_eq!(decode_reply(&srv_reply(77), 78, &q), None, "another query's reply");
        let other = Question::new("_web._tcp.other", TYPE_SRV);
        assert_eq!(decode_reply(&srv_reply(77), 77, &other), None, "another question");
        let mut nx = srv_reply(5);
        nx[3] = 0x83;
        assert!(matches!(decode_reply(&nx, 5, &q), Some(Outcome::Final(_))));
        nx[3] = 0x82;
        assert!(matches!(decode_reply(&nx, 5, &q), Some(Outcome::Retry(_))), "SERVFAIL");
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let whole = srv_reply(9);
        let q = Question::new("_web._tcp.example", TYPE_SRV);
        for n in 0..whole.len() {
            let _ = decode_reply(&whole[..n], 9, &q);
        }
        let mut looped = whole.clone();
        let at = looped.len() - 16;
        looped[at..at + 2].copy_from_slice(&[0xc0, at as u8]);
        assert!(matches!(decode_reply(&looped, 9, &q), Some(Outcome::Retry(_))));
    }

    #[test]
    fn names_and_resolvers_parse() {
        assert_eq!(
            Query::host("web.internal:8080"),
            Ok(Query::Host { name: "web.internal".into(), port: 8080 })
        );
        assert!(Query::host("web.internal").is_err());
        assert!(Query::host("bad name:80").is_err());
        assert!(Query::srv("_http._tcp.web.service.consul").is_ok());
        assert_eq!(parse_resolver("127.0.0.1"), Ok("127.0.0.1:53".parse().unwrap()));
        assert_eq!(parse_resolver("[::1]:5353"), Ok("[::1]:5353".parse().unwrap()));
        assert!(parse_resolver("resolver").is_err());
    }

    /// Issue 26 item 7: without EDNS0 a standard server truncates answers past 512 bytes,
    /// and the old client used the part that came.
    #[test]
    fn queries_offer_edns0_so_large_answers_arrive_whole() {
        let server = FakeServer::start(|q, _| {
            let full = answer(q, &a_records(40), false);
            Some(if full.len() <= offered(q) { full } else { answer(q, &a_records(10), true) })
        });
        let found = resolve(&host("big.test"), &[server.addr], soon(5)).unwrap();
        assert_eq!(
            found.len(),
            40,
            "an answer of {} bytes",
            answer(&question_of(1, "big.test", 1), &a_records(40), false).len()
        );
    }

    /// Issue 26 item 7: a truncated answer is asked again over TCP.
    #[test]
    fn truncated_answers_are_asked_again_over_tcp() {
        let server = FakeServer::start(|q, tcp| {
            Some(if tcp {
                answer(q, &a_records(200), false)
            } else {
                answer(q, &a_records(3), true)
            })
        });
        let found = resolve(&host("huge.test"), &[server.addr], soon(5)).unwrap();
        assert_eq!(found.len(), 200);
    }

    /// Issue 26 item 7: every nameserver of resolv.conf is asked in turn (the old client
    /// asked only the first); a server that fails (SERVFAIL) passes on at once, one that
    /// is silent after its turn.
    #[test]
    fn every_nameserver_is_asked_in_turn() {
        let conf = "search x\nnameserver 127.0.0.1\n# c\nnameserver ::1\nnameserver bad\n";
        assert_eq!(
            nameservers(conf),
            vec!["127.0.0.1:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let failing = FakeServer::start(|q, _| {
            let mut r = answer(q, &[], false);
            r[3] = 0x82;
            Some(r)
        });
        let good = FakeServer::start(|q, _| Some(answer(q, &a_records(1), false)));
        let started = Instant::now();
        let servers = [failing.addr, good.addr];
        assert_eq!(resolve(&host("a.test"), &servers, soon(5)).unwrap().len(), 1);
        assert!(started.elapsed() < Duration::from_secs(1), "SERVFAIL passes on at once");
        let servers = [silent.local_addr().unwrap(), good.addr];
        let started = Instant::now();
        assert_eq!(resolve(&host("a.test"), &servers, soon(5)).unwrap().len(), 1);
        let took = started.elapsed();
        assert!(took >= DEFAULT_DNS_TIMEOUT && took < DEFAULT_DNS_TIMEOUT * 2, "{took:?}");
    }

    /// Issue 26 item 7: an SRV answer with many targets whose addresses never come took
    /// 2 s per question, one after another (256 s for 64 targets). Now every target's
    /// questions go at once and the lookup ends at its deadline.
    #[test]
    fn a_lookup_with_silent_targets_ends_at_its_deadline() {
        let server = FakeServer::start(|q, _| {
            let (name, end) = read_name(q, 12).ok()?;
            let qtype = u16::from_be_bytes([q[end], q[end + 1]]);
            (qtype == TYPE_SRV && name == "_web._tcp.test").then(|| {
                let targets: Vec<(u16, Vec<u8>)> = (0..64u16)
                    .map(|i| {
                        let mut d =
                            [10u16.to_be_bytes(), 1u16.to_be_bytes(), (8000 + i).to_be_bytes()]
                                .concat();
                        let label = format!("t{i}");
                        d.push(label.len() as u8);
                        d.extend_from_slice(label.as_bytes());
                        d.extend_from_slice(&[0xc0, 12]);
                        (TYPE_SRV, d)
                    })
                    .collect();
                answer(q, &targets, false)
            })
        });
        let started = Instant::now();
        let query = Query::Srv { name: "_web._tcp.test".into() };
        let e = resolve(&query, &[server.addr], Instant::now() + Duration::from_millis(1500));
        let took = started.elapsed();
        assert!(e.is_err(), "no target has an address: {e:?}");
        assert!(took < Duration::from_millis(1800), "took {took:?}");
    }

    #[test]
    fn query_ids_are_random_and_distinct_within_a_lookup() {
        let ids: std::collections::HashSet<u16> = (0..1000).map(|_| random_id()).collect();
        assert!(ids.len() > 950, "{} distinct ids of 1000", ids.len());
        let mut taken = HashMap::new();
        for i in 0..5000 {
            let id = fresh_id(&taken);
            assert!(taken.insert(id, i).is_none());
        }
        let q = encode_query(0x1234, "a.test", TYPE_A);
        assert_eq!(offered(&q), usize::from(EDNS_PAYLOAD), "the query carries EDNS0");
    }
}
