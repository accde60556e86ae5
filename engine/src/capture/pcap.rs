//! The pure half of capture: turns what a session did (a handshake, bytes moved in each
//! direction, a FIN, an RST) into Ethernet + IPv4/IPv6 + TCP frames between the real client
//! and backend addresses, and encodes them as pcapng blocks. No I/O and no clock: callers
//! pass the timestamp of each event.
//!
//! Invariants: sequence numbers follow the bytes (each direction starts at its own ISN, a
//! SYN or FIN counts one); every data segment carries at most [`mss`] payload bytes and the
//! ACK of everything the other side has sent; checksums (IPv4 header, TCP with its pseudo
//! header) are correct, so Wireshark and tcpdump raise no warning.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::side::{Direction, Side};

/// Largest frame captured by default (tcpdump's default snapshot length).
pub const DEFAULT_SNAPLEN: u32 = 262_144;
/// Ethernet link type in pcap and pcapng.
pub const LINKTYPE_ETHERNET: u16 = 1;
/// Initial sequence number of the client (client -> backend) direction.
pub const CLIENT_ISN: u32 = 1_000;
/// Initial sequence number of the backend (backend -> client) direction.
pub const BACKEND_ISN: u32 = 2_000_000_000;

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const MTU: usize = 1500;
const WINDOW: u16 = 65_535;
const TTL: u8 = 64;
const PROTO_TCP: u8 = 6;
/// Synthesized MAC addresses (locally administered) of the two ends.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// One synthesized frame and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub at: SystemTime,
    pub bytes: Vec<u8>,
}

/// The payload bytes one segment carries for a session between `client` and `backend`:
/// an Ethernet MTU less the IP and TCP headers.
pub fn mss(client: SocketAddr, backend: SocketAddr) -> usize {
    MTU - TCP_LEN - if both_v4(client, backend) { IPV4_LEN } else { IPV6_LEN }
}

fn both_v4(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical().is_ipv4() && b.ip().to_canonical().is_ipv4()
}

/// The TCP view of one session: its two endpoints and the next sequence number of each
/// direction.
#[derive(Debug, Clone)]
pub struct TcpSynth {
    client: SocketAddr,
    backend: SocketAddr,
    /// Next sequence number sent by the client (index 0) and by the backend (index 1).
    next: [u32; 2],
    ip_id: u16,
    v4: bool,
}

fn index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

impl TcpSynth {
    pub fn new(client: SocketAddr, backend: SocketAddr) -> Self {
        let v4 = both_v4(client, backend);
        Self { client, backend, next: [CLIENT_ISN + 1, BACKEND_ISN + 1], ip_id: 0, v4 }
    }

    /// The next sequence number `side` would send.
    pub fn next_seq(&self, side: Side) -> u32 {
        self.next[index(side)]
    }

    /// SYN, SYN-ACK, ACK leading to the current sequence numbers: at the start of a
    /// session, and again at the start of each rotated file so that every file can be read
    /// on its own.
    pub fn handshake(&mut self, at: SystemTime) -> Vec<Frame> {
        let (c, b) = (self.next[0].wrapping_sub(1), self.next[1].wrapping_sub(1));
        vec![
            self.frame(Side::Client, c, 0, SYN, &[], at),
            self.frame(Side::Backend, b, self.next[0], SYN | ACK, &[], at),
            self.frame(Side::Client, self.next[0], self.next[1], ACK, &[], at),
        ]
    }

    /// Data segments for `payload` moved in `dir`, split at [`mss`].
    pub fn data(&mut self, dir: Direction, payload: &[u8], at: SystemTime) -> Vec<Frame> {
        let mss = mss(self.client, self.backend);
        payload.chunks(mss).map(|chunk| self.segment(dir.source(), PSH | ACK, chunk, at)).collect()
    }

    /// The source of `dir` ended its stream: FIN-ACK from it, and the ACK of the other side.
    pub fn fin(&mut self, dir: Direction, at: SystemTime) -> Vec<Frame> {
        let from = dir.source();
        let fin = self.segment(from, FIN | ACK, &[], at);
        self.next[index(from)] = self.next[index(from)].wrapping_add(1);
        let (seq, ack) = (self.next[index(from.other())], self.next[index(from)]);
        vec![fin, self.frame(from.other(), seq, ack, ACK, &[], at)]
    }

    /// `from` reset the connection.
    pub fn rst(&mut self, from: Side, at: SystemTime) -> Frame {
        self.segment(from, RST | ACK, &[], at)
    }

    /// A pure ACK from `from`: carries nothing; used to hold a marker comment.
    pub fn ack(&mut self, from: Side, at: SystemTime) -> Frame {
        self.segment(from, ACK, &[], at)
    }

    fn segment(&mut self, from: Side, flags: u8, payload: &[u8], at: SystemTime) -> Frame {
        let (seq, ack) = (self.next[index(from)], self.next[index(from.other())]);
        self.next[index(from)] = seq.wrapping_add(payload.len() as u32);
        self.frame(from, seq, ack, flags, payload, at)
    }

    fn frame(
        &mut self,
        from: Side,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
        at: SystemTime,
    ) -> Frame {
        let (src, dst) = match from {
            Side::Client => (self.client, self.backend),
            Side::Backend => (self.backend, self.client),
        };
        let (src_mac, dst_mac) = match from {
            Side::Client => (CLIENT_MAC, BACKEND_MAC),
            Side::Backend => (BACKEND_MAC, CLIENT_MAC),
        };
        let ip_len = if self.v4 { IPV4_LEN } else { IPV6_LEN };
        let mut bytes = Vec::with_capacity(ETH_LEN + ip_len + TCP_LEN + payload.len());
        bytes.extend_from_slice(&dst_mac);
        bytes.extend_from_slice(&src_mac);
        bytes.extend_from_slice(&(if self.v4 { 0x0800u16 } else { 0x86dd }).to_be_bytes());
        let tcp = tcp_segment(src, dst, seq, ack, flags, payload, self.v4);
        if self.v4 {
            self.ip_id = self.ip_id.wrapping_add(1);
            bytes.extend_from_slice(&ipv4_header(src, dst, tcp.len(), self.ip_id));
        } else {
            bytes.extend_from_slice(&ipv6_header(src, dst, tcp.len()));
        }
        bytes.extend_from_slice(&tcp);
        Frame { at, bytes }
    }
}

fn v4_octets(ip: IpAddr) -> [u8; 4] {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4],
    }
}

/// The address as IPv6 (IPv4 addresses mapped), for sessions that mix families.
fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn ipv4_header(src: SocketAddr, dst: SocketAddr, tcp_len: usize, id: u16) -> [u8; IPV4_LEN] {
    let mut h = [0u8; IPV4_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IPV4_LEN + tcp_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = TTL;
    h[9] = PROTO_TCP;
    h[12..16].copy_from_slice(&v4_octets(src.ip()));
    h[16..20].copy_from_slice(&v4_octets(dst.ip()));
    let sum = finish(add(0, &h));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv6_header(src: SocketAddr, dst: SocketAddr, tcp_len: usize) -> [u8; IPV6_LEN] {
    let mut h = [0u8; IPV6_LEN];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    h[6] = PROTO_TCP;
    h[7] = TTL;
    h[8..24].copy_from_slice(&v6_octets(src.ip()));
    h[24..40].copy_from_slice(&v6_octets(dst.ip()));
    h
}

fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    v4: bool,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(TCP_LEN + payload.len());
    t.extend_from_slice(&src.port().to_be_bytes());
    t.extend_from_slice(&dst.port().to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    let ack = if flags & ACK != 0 { ack } else { 0 };
    t.extend_from_slice(&ack.to_be_bytes());
    t.push((TCP_LEN as u8 / 4) << 4);
    t.push(flags);
    t.extend_from_slice(&WINDOW.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    t.extend_from_slice(payload);
    let len = (t.len() as u32).to_be_bytes();
    let mut sum = if v4 {
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&v4_octets(src.ip()));
        pseudo[4..8].copy_from_slice(&v4_octets(dst.ip()));
        pseudo[9] = PROTO_TCP;
        pseudo[10..12].copy_from_slice(&len[2..4]);
        add(0, &pseudo)
    } else {
        let mut pseudo = [0u8; 40];
        pseudo[0..16].copy_from_slice(&v6_octets(src.ip()));
        pseudo[16..32].copy_from_slice(&v6_octets(dst.ip()));
        pseudo[32..36].copy_from_slice(&len);
        pseudo[39] = PROTO_TCP;
        add(0, &pseudo)
    };
    sum = add(sum, &t);
    t[16..18].copy_from_slice(&finish(sum).to_be_bytes());
    t
}

/// Adds `data` as big-endian 16-bit words to a one's-complement running sum.
fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn finish(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Encodes pcapng (little-endian, one Ethernet interface, microsecond timestamps).
pub mod pcapng {
    use super::*;

    const SHB: u32 = 0x0A0D_0D0A;
    const IDB: u32 = 1;
    const EPB: u32 = 6;
    const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
    const OPT_END: u16 = 0;
    const OPT_COMMENT: u16 = 1;
    const SHB_USERAPPL: u16 = 4;

    /// The start of every file: a section header and the one interface it describes.
    pub fn file_header(snaplen: u32) -> Vec<u8> {
        let mut out = section_header();
        out.extend_from_slice(&interface(snaplen));
        out
    }

    fn section_header() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(-1i64).to_le_bytes()); // section length: unspecified
        option(&mut body, SHB_USERAPPL, b"sluice");
        option(&mut body, OPT_END, &[]);
        block(SHB, &body)
    }

    fn interface(snaplen: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&snaplen.to_le_bytes());
        block(IDB, &body)
    }

    /// An enhanced packet block: the frame cut to `snaplen`, with an optional comment.
    pub fn packet(frame: &Frame, snaplen: u32, comment: Option<&str>) -> Vec<u8> {
        let captured = frame.bytes.len().min(snaplen as usize);
        let micros = frame.at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros();
        let micros = micros as u64;
        let mut body = Vec::with_capacity(28 + captured + 4);
        body.extend_from_slice(&0u32.to_le_bytes()); // interface 0
        body.extend_from_slice(&((micros >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(micros as u32).to_le_bytes());
        body.extend_from_slice(&(captured as u32).to_le_bytes());
        body.extend_from_slice(&(frame.bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(&frame.bytes[..captured]);
        pad(&mut body);
        if let Some(text) = comment {
            option(&mut body, OPT_COMMENT, text.as_bytes());
            option(&mut body, OPT_END, &[]);
        }
        block(EPB, &body)
    }

    fn option(body: &mut Vec<u8>, code: u16, value: &[u8]) {
        body.extend_from_slice(&code.to_le_bytes());
        body.extend_from_slice(&(value.len() as u16).to_le_bytes());
        body.extend_from_slice(value);
        pad(body);
    }

    fn pad(body: &mut Vec<u8>) {
        while body.len() % 4 != 0 {
            body.push(0);
        }
    }

    fn block(kind: u32, body: &[u8]) -> Vec<u8> {
        let total = (12 + body.len()) as u32;
        let mut out = Vec::with_capacity(total as usize);
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&total.to_le_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(&total.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    /// A minimal reader of what this module writes: (timestamp µs, captured frame,
    /// original length) per enhanced packet block.
    fn read_blocks(data: &[u8]) -> Vec<(u64, Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let kind = u32::from_le_bytes(data[i..i + 4].try_into().unwrap());
            let len = u32::from_le_bytes(data[i + 4..i + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            let trailer = u32::from_le_bytes(data[i + len - 4..i + len].try_into().unwrap());
            assert_eq!(trailer as usize, len, "block trailer");
            if kind == 6 {
                let b = &data[i + 8..];
                let word = |k: usize| u32::from_le_bytes(b[k..k + 4].try_into().unwrap());
                let ts = (u64::from(word(4)) << 32) | u64::from(word(8));
                let (cap, orig) = (word(12) as usize, word(16) as usize);
                out.push((ts, b[20..20 + cap].to_vec(), orig));
            }
            i += len;
        }
        out
    }

    struct Seg {
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    }

    fn parse(frame: &[u8]) -> Seg {
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let (ip, src, dst, tcp) = if ethertype == 0x0800 {
            let ip = &frame[ETH_LEN..];
            assert_eq!(finish(add(0, &ip[..IPV4_LEN])), 0, "IPv4 header checksum");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let s: [u8; 4] = ip[12..16].try_into().unwrap();
            let d: [u8; 4] = ip[16..20].try_into().unwrap();
            (ip, IpAddr::from(s), IpAddr::from(d), &ip[IPV4_LEN..total])
        } else {
            let ip = &frame[ETH_LEN..];
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let s: [u8; 16] = ip[8..24].try_into().unwrap();
            let d: [u8; 16] = ip[24..40].try_into().unwrap();
            (ip, IpAddr::from(s), IpAddr::from(d), &ip[IPV6_LEN..IPV6_LEN + len])
        };
        let _ = ip;
        let port = |k: usize| u16::from_be_bytes([tcp[k], tcp[k + 1]]);
        let word = |k: usize| u32::from_be_bytes(tcp[k..k + 4].try_into().unwrap());
        Seg {
            src: SocketAddr::new(src, port(0)),
            dst: SocketAddr::new(dst, port(2)),
            seq: word(4),
            ack: word(8),
            flags: tcp[13],
            payload: tcp[TCP_LEN..].to_vec(),
        }
    }

    fn tcp_checksum_ok(frame: &[u8]) -> bool {
        let s = parse(frame);
        let v4 = u16::from_be_bytes([frame[12], frame[13]]) == 0x0800;
        let off = ETH_LEN + if v4 { IPV4_LEN } else { IPV6_LEN };
        let mut tcp = frame[off..].to_vec();
        let stored = u16::from_be_bytes([tcp[16], tcp[17]]);
        tcp[16] = 0;
        tcp[17] = 0;
        let again = tcp_segment(s.src, s.dst, s.seq, s.ack, s.flags, &s.payload, v4);
        stored == u16::from_be_bytes([again[16], again[17]])
    }

    fn session(client: &str, backend: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let (c, b) = (client.parse().unwrap(), backend.parse().unwrap());
        let mut s = TcpSynth::new(c, b);
        let up: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let down: Vec<u8> = (0..3001u32).map(|i| (i * 13 + 1) as u8).collect();
        let mut frames = s.handshake(at(0));
        frames.extend(s.data(Direction::Up, &up[..100], at(1)));
        frames.extend(s.data(Direction::Down, &down, at(2)));
        frames.extend(s.data(Direction::Up, &up[100..], at(3)));
        frames.extend(s.fin(Direction::Up, at(4)));
        frames.push(s.rst(Side::Backend, at(5)));
        let mut file = pcapng::file_header(DEFAULT_SNAPLEN);
        for f in &frames {
            file.extend(pcapng::packet(f, DEFAULT_SNAPLEN, None));
        }
        (file, up, down)
    }

    #[test]
    fn a_session_reads_back_as_ordered_segments_with_correct_checksums() {
        for (client, backend) in
            [("127.0.0.2:40000", "127.0.0.1:8000"), ("[::1]:40000", "[::1]:8000")]
        {
            let (file, up, down) = session(client, backend);
            let blocks = read_blocks(&file);
            let segs: Vec<Seg> = blocks.iter().map(|(_, f, _)| parse(f)).collect();
            assert_eq!(segs[0].flags, SYN);
            assert_eq!(segs[1].flags, SYN | ACK);
            assert_eq!(segs[1].ack, segs[0].seq + 1);
            assert_eq!(segs[2].flags, ACK);
            let mut streams = (Vec::new(), Vec::new());
            let mut expect = [segs[0].seq + 1, segs[1].seq + 1];
            for s in &segs[3..] {
                let up_dir = s.src == client.parse().unwrap();
                let k = usize::from(!up_dir);
                assert_eq!(s.seq, expect[k], "sequence numbers follow the bytes");
                expect[k] += s.payload.len() as u32 + u32::from(s.flags & FIN != 0);
                let out = if up_dir { &mut streams.0 } else { &mut streams.1 };
                out.extend_from_slice(&s.payload);
                assert!(s.payload.len() <= mss(client.parse().unwrap(), backend.parse().unwrap()));
            }
            assert_eq!((streams.0, streams.1), (up, down));
            assert!(blocks.iter().all(|(_, f, _)| tcp_checksum_ok(f)));
            let last = &segs[segs.len() - 1];
            assert_eq!(last.flags, RST | ACK);
            assert_eq!(last.src, backend.parse().unwrap());
            let fin = segs.iter().position(|s| s.flags & FIN != 0).unwrap();
            assert_eq!(segs[fin].src, client.parse().unwrap());
            assert_eq!(segs[fin + 1].ack, segs[fin].seq + 1, "the FIN is acknowledged");
            let times: Vec<u64> = blocks.iter().map(|b| b.0).collect();
            assert!(times.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(times[0], 1_700_000_000_000_000);
        }
    }

    #[test]
    fn mixed_families_are_written_as_ipv6_with_mapped_addresses() {
        let mut s = TcpSynth::new("[::1]:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap());
        let f = s.data(Direction::Down, b"hi", at(0)).remove(0);
        let seg = parse(&f.bytes);
        assert_eq!(seg.src.ip(), "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(seg.payload, b"hi");
        assert!(tcp_checksum_ok(&f.bytes));
    }

    #[test]
    fn snaplen_cuts_the_frame_but_keeps_its_original_length() {
        let mut s = TcpSynth::new("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let f = s.data(Direction::Up, &[9u8; 1000], at(0)).remove(0);
        let block = pcapng::packet(&f, 64, Some("a note"));
        let blocks = read_blocks(&block);
        assert_eq!(blocks[0].1.len(), 64);
        assert_eq!(blocks[0].2, f.bytes.len());
        assert!(block.windows(6).any(|w| w == b"a note"));
    }

    #[test]
    fn a_handshake_after_data_leads_to_the_current_sequence_numbers() {
        let mut s = TcpSynth::new("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        s.data(Direction::Up, &[1; 10], at(0));
        s.data(Direction::Down, &[1; 20], at(0));
        let hs = s.handshake(at(1));
        let (syn, synack) = (parse(&hs[0].bytes), parse(&hs[1].bytes));
        assert_eq!(syn.seq + 1, s.next_seq(Side::Client));
        assert_eq!(synack.seq + 1, s.next_seq(Side::Backend));
        assert_eq!(s.next_seq(Side::Client), CLIENT_ISN + 11);
    }
}
