//! DNS discovery of a pool's backends: a small blocking DNS client over UDP (no runtime)
//! for A/AAAA (`dns = "name:port"`) and SRV (`srv = "_service._proto.name"`) lookups, as
//! Consul and Kubernetes headless services serve them.
//!
//! Invariants: every lookup is bounded ([`DEFAULT_DNS_TIMEOUT`] per query, at most
//! [`MAX_SRV_TARGETS`] follow-up queries); a reply is accepted only from the resolver it was
//! sent to, with the query's id; a lookup that fails or finds no address is an error, and
//! the caller keeps the last good set. Truncated replies are used as far as they go (no TCP
//! fallback).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::config::BackendSpec;

/// How often a discovered pool is looked up again.
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(30);
/// How long one query waits for its answer.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// The resolver's port when `resolver` names only an address.
pub const DEFAULT_DNS_PORT: u16 = 53;
/// Most SRV targets whose addresses are looked up separately (when the reply's additional
/// section does not carry them).
pub const MAX_SRV_TARGETS: usize = 64;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
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

/// The first nameserver of /etc/resolv.conf.
pub fn system_resolver() -> Result<SocketAddr, String> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, DEFAULT_DNS_PORT))
        .ok_or_else(|| "no nameserver in /etc/resolv.conf".to_string())
}

/// Looks `query` up at `resolver`: the backends it names, or why there are none.
pub fn resolve(
    query: &Query,
    resolver: SocketAddr,
    timeout: Duration,
) -> Result<Vec<BackendSpec>, String> {
    let client = Client::new(resolver, timeout)?;
    let found = match query {
        Query::Host { name, port } => client
            .addresses(name)?
            .into_iter()
            .map(|ip| BackendSpec::plain(SocketAddr::new(ip, *port)))
            .collect(),
        Query::Srv { name } => client.srv(name)?,
    };
    if found.is_empty() {
        return Err(format!("{} has no address", query.name()));
    }
    Ok(found)
}

struct Client {
    socket: UdpSocket,
    resolver: SocketAddr,
    timeout: Duration,
}

impl Client {
    fn new(resolver: SocketAddr, timeout: Duration) -> Result<Self, String> {
        let local: SocketAddr = if resolver.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            "[::]:0".parse().expect("address")
        };
        let socket = UdpSocket::bind(local).map_err(|e| format!("dns socket: {e}"))?;
        socket.connect(resolver).map_err(|e| format!("dns resolver {resolver}: {e}"))?;
        Ok(Self { socket, resolver, timeout })
    }

    /// A and AAAA addresses of `name`; an error only when both lookups fail.
    fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let a = self.ask(name, TYPE_A);
        let aaaa = self.ask(name, TYPE_AAAA);
        if let (Err(e), Err(_)) = (&a, &aaaa) {
            return Err(e.clone());
        }
        let records = a.unwrap_or_default().into_iter().chain(aaaa.unwrap_or_default());
        let mut ips: Vec<IpAddr> = records.filter_map(|r| r.ip()).collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    }

    /// SRV targets with their addresses (from the additional section or looked up).
    fn srv(&self, name: &str) -> Result<Vec<BackendSpec>, String> {
        let records = self.ask(name, TYPE_SRV)?;
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
        let best = targets.iter().map(|t| t.0).min();
        let mut out = Vec::new();
        for (priority, weight, port, target) in targets.into_iter().take(MAX_SRV_TARGETS) {
            let ips = match known.get(&target) {
                Some(ips) => ips.clone(),
                None => self.addresses(&target).unwrap_or_default(),
            };
            for ip in ips {
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

    /// Sends one query and reads its answer records (answer and additional sections).
    fn ask(&self, name: &str, qtype: u16) -> Result<Vec<Record>, String> {
        let id = query_id(name, qtype);
        let query = encode_query(id, name, qtype);
        self.socket.send(&query).map_err(|e| format!("dns query to {}: {e}", self.resolver))?;
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no answer from {} for {name} within {:?}",
                    self.resolver, self.timeout
                ));
            }
            self.socket.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.socket.recv(&mut buf) {
                Ok(n) => match decode_reply(&buf[..n], id) {
                    Ok(Some(records)) => return Ok(records),
                    Ok(None) => continue,
                    Err(e) => return Err(format!("{name}: {e}")),
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(format!("dns answer from {}: {e}", self.resolver)),
            }
        }
    }
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

/// A query id that differs per name, type and moment.
fn query_id(name: &str, qtype: u16) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let h = name.bytes().fold(nanos ^ u32::from(qtype), |h, b| h.rotate_left(5) ^ u32::from(b));
    (h ^ (h >> 16)) as u16
}

fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The A, AAAA and SRV records of a reply to query `id`; `Ok(None)` when it is a reply to
/// something else (ignored), an error when the server reports one or the reply is malformed.
fn decode_reply(msg: &[u8], id: u16) -> Result<Option<Vec<Record>>, String> {
    let header = msg.get(..12).ok_or("short reply")?;
    if u16::from_be_bytes([header[0], header[1]]) != id || header[2] & 0x80 == 0 {
        return Ok(None);
    }
    let rcode = header[3] & 0x0f;
    if rcode != 0 {
        let what = match rcode {
            2 => "server failure",
            3 => "no such name",
            5 => "refused",
            _ => "error",
        };
        return Err(format!("resolver answered {what} (rcode {rcode})"));
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([header[i], header[i + 1]]));
    let (questions, answers, authority, additional) = (count(4), count(6), count(8), count(10));
    let mut at = 12;
    for _ in 0..questions {
        at = read_name(msg, at)?.1 + 4;
    }
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
                let octets: [u8; 16] = data.try_into().expect("16 bytes");
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
    Ok(Some(records))
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

    /// A reply to `id` for `_web._tcp.example` with two SRV records (one a lower priority)
    /// and the first target's address in the additional section, using compression.
    fn srv_reply(id: u16) -> Vec<u8> {
        let mut m = encode_query(id, "_web._tcp.example", TYPE_SRV);
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
        let records = decode_reply(&srv_reply(77), 77).unwrap().unwrap();
        assert_eq!(
            records,
            vec![
                Record::Srv { priority: 10, weight: 3, port: 8001, target: "a.example".into() },
                Record::Srv { priority: 20, weight: 1, port: 8002, target: "b.example".into() },
                Record::Addr { name: "a.example".into(), ip: "127.0.0.7".parse().unwrap() },
            ]
        );
        assert_eq!(decode_reply(&srv_reply(77), 78), Ok(None), "another query's reply");
        let mut nx = srv_reply(5);
        nx[3] = 0x83;
        assert!(decode_reply(&nx, 5).unwrap_err().contains("no such name"));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let whole = srv_reply(9);
        for n in 0..whole.len() {
            let _ = decode_reply(&whole[..n], 9);
        }
        let mut looped = whole.clone();
        let at = looped.len() - 16;
        looped[at..at + 2].copy_from_slice(&[0xc0, at as u8]);
        assert!(decode_reply(&looped, 9).is_err());
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
}
