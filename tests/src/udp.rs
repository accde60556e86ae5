//! UDP servers and clients for the UDP forwarding tests: an echo server that tags its
//! replies (so a client knows which backend answered), a minimal DNS server (A records for
//! any name), and a bounded request/reply exchange.
//!
//! Invariants: every server binds 127.0.0.1 on a port the kernel picks, polls its stop flag
//! at least every [`POLL`], and stops when dropped.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a server checks its stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A request beginning with this makes [`UdpServer::tagged_echo`] answer with
/// [`BIG_REPLY`] bytes instead of an echo.
pub const BIG_REQUEST: &[u8] = b"BIG?";
/// Size of the reply to [`BIG_REQUEST`].
pub const BIG_REPLY: usize = 2000;

/// What a server's handler sees of one datagram: its payload and sender.
pub type Handler = dyn Fn(&[u8], SocketAddr) -> Option<Vec<u8>> + Send + Sync;

/// A UDP server on its own thread.
pub struct UdpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    /// Every distinct sender address seen (the upstream sockets of sluice's flows).
    senders: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UdpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpServer").field("addr", &self.addr).finish()
    }
}

impl UdpServer {
    /// Serves every datagram with `handler`; a `Some` reply goes back to its sender.
    pub fn spawn(handler: Box<Handler>) -> UdpServer {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind udp server");
        socket.set_read_timeout(Some(POLL)).expect("read timeout");
        let addr = socket.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let senders = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, received, senders) = (stop.clone(), received.clone(), senders.clone());
            std::thread::Builder::new()
                .name(format!("udp-server-{}", addr.port()))
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                        received.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut s = senders.lock().expect("senders lock");
                            if !s.contains(&from) {
                                s.push(from);
                            }
                        }
                        if let Some(reply) = handler(&buf[..n], from) {
                            let _ = socket.send_to(&reply, from);
                        }
                    }
                })
                .expect("spawn udp server")
        };
        UdpServer { addr, stop, received, senders, thread: Some(thread) }
    }

    /// Replies `[tag] ++ payload`, or [`BIG_REPLY`] bytes to a [`BIG_REQUEST`].
    pub fn tagged_echo(tag: u8) -> UdpServer {
        UdpServer::spawn(Box::new(move |payload, _| {
            if payload.starts_with(BIG_REQUEST) {
                return Some(vec![tag; BIG_REPLY]);
            }
            let mut reply = Vec::with_capacity(payload.len() + 1);
            reply.push(tag);
            reply.extend_from_slice(payload);
            Some(reply)
        }))
    }

    /// Answers every DNS query with one A record, `answer`, for the name asked.
    pub fn dns(answer: Ipv4Addr) -> UdpServer {
        UdpServer::spawn(Box::new(move |query, _| dns_answer(query, answer)))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    /// Distinct sender addresses seen so far.
    pub fn senders(&self) -> Vec<SocketAddr> {
        self.senders.lock().expect("senders lock").clone()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The response to a DNS query (RFC 1035): the question echoed, one A record with a TTL of
/// 60 s. `None` for anything that is not a one-question query.
pub fn dns_answer(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + *query.get(end)? as usize;
    }
    let question_end = end + 5;
    if query.len() < question_end {
        return None;
    }
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(&query[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&query[12..question_end]);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    r.extend_from_slice(&answer.octets());
    Some(r)
}

/// A client socket bound to `ip` (port chosen by the kernel) with a read timeout.
pub fn udp_client(ip: Ipv4Addr, timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).expect("bind udp client");
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s
}

/// Sends `payload` to `to` and waits for one reply (`None` after the socket's timeout).
pub fn udp_exchange(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(payload, to).expect("send datagram");
    udp_reply(socket, to)
}

/// The next datagram from `from` (`None` after the socket's timeout).
pub fn udp_reply(socket: &UdpSocket, from: SocketAddr) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, sender)) if sender == from => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}
