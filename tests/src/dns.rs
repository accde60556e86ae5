//! A DNS server on loopback UDP for discovery tests: it answers A and SRV questions from a
//! table the test changes while it runs (AAAA questions get an empty answer), fails on
//! purpose (SERVFAIL) to show that sluice keeps the last good set, or, as a hostile server,
//! names SRV targets without their addresses and never answers for them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server answers for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// A records.
    A(Vec<Ipv4Addr>),
    /// SRV records (priority, weight, port, address of the target), each target's A record
    /// in the additional section.
    Srv(Vec<(u16, u16, u16, Ipv4Addr)>),
    /// SERVFAIL.
    Fail,
    /// No answer at all, ever (a hostile or broken server).
    Silent,
    /// SRV records (priority, weight, port) of targets `t0.NAME`, `t1.NAME`... without
    /// their addresses (no additional section): the client must ask for them.
    SrvNoGlue(Vec<(u16, u16, u16)>),
}

type Table = Arc<Mutex<HashMap<String, DnsAnswer>>>;

/// A running DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    table: Table,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Listens on a free UDP port of 127.0.0.1.
    pub fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind dns server");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let addr = socket.local_addr().expect("dns addr");
        let table: Table = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (table, queries, stop) = (table.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || serve(&socket, &table, &queries, &stop))
        };
        DnsServer { addr, table, queries, stop, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets what `name` resolves to from now on.
    pub fn set(&self, name: &str, answer: DnsAnswer) {
        self.table.lock().expect("dns table").insert(name.to_ascii_lowercase(), answer);
    }

    /// Questions received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, table: &Table, queries: &AtomicUsize, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        let Some((name, qtype, question_end)) = question(&buf[..n]) else { continue };
        queries.fetch_add(1, Ordering::Relaxed);
        let answer = table.lock().expect("dns table").get(&name).cloned();
        if answer == Some(DnsAnswer::Silent) {
            continue;
        }
        let reply = reply(&buf[..question_end], qtype, answer.as_ref());
        let _ = socket.send_to(&reply, from);
    }
}

/// The question's name, type, and where the question ends.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// A reply: the question echoed, then answers that point back at its name (offset 12).
fn reply(query: &[u8], qtype: u16, answer: Option<&DnsAnswer>) -> Vec<u8> {
    let mut m = query.to_vec();
    m[2] = 0x81;
    m[3] = 0x80;
    m[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    let record = |m: &mut Vec<u8>, name: &[u8], rtype: u16, data: &[u8]| {
        m.extend_from_slice(name);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 5]);
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
    };
    let (mut answers, mut additional) = (0u16, 0u16);
    match (answer, qtype) {
        (None, _) => m[3] = 0x83,
        (Some(DnsAnswer::Fail), _) => m[3] = 0x82,
        (Some(DnsAnswer::A(ips)), 1) => {
            for ip in ips {
                record(&mut m, &[0xc0, 12], 1, &ip.octets());
                answers += 1;
            }
        }
        (Some(DnsAnswer::Srv(targets)), 33) => {
            let target = |i: usize| target_name(i);
            for (i, (prio, weight, port, _)) in targets.iter().enumerate() {
                let mut data = Vec::new();
                for v in [prio, weight, port] {
                    data.extend_from_slice(&v.to_be_bytes());
                }
                data.extend_from_slice(&target(i));
                record(&mut m, &[0xc0, 12], 33, &data);
                answers += 1;
            }
            for (i, (_, _, _, ip)) in targets.iter().enumerate() {
                record(&mut m, &target(i), 1, &ip.octets());
                additional += 1;
            }
        }
        (Some(DnsAnswer::SrvNoGlue(targets)), 33) => {
            for (i, (prio, weight, port)) in targets.iter().enumerate() {
                let mut data = Vec::new();
                for v in [prio, weight, port] {
                    data.extend_from_slice(&v.to_be_bytes());
                }
                data.extend_from_slice(&target_name(i));
                record(&mut m, &[0xc0, 12], 33, &data);
                answers += 1;
            }
        }
        _ => {}
    }
    m[6..8].copy_from_slice(&answers.to_be_bytes());
    m[10..12].copy_from_slice(&additional.to_be_bytes());
    m
}

/// The name of SRV target `i`, `t{i}.` before the question's name (a pointer to offset 12).
fn target_name(i: usize) -> Vec<u8> {
    let label = format!("t{i}");
    [&[label.len() as u8][..], label.as_bytes(), &[0xc0, 12]].concat()
}
