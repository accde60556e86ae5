//! Reading capture files back, two independent ways: with the `pcap-file` crate and with
//! `tcpdump -r` (hex dump of every frame), then parsing Ethernet/IP/TCP and reassembling
//! each direction's stream by sequence number.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
use pcap_file::pcapng::{Block, PcapNgReader};

/// TCP flags as they appear in a segment.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;

/// One TCP segment read from a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
    /// The packet's comment (pcap-file reader only).
    pub comment: Option<String>,
}

/// Every segment of a pcapng file, in file order, read with the `pcap-file` crate.
pub fn read_pcapng(path: &Path) -> Vec<Segment> {
    try_read_pcapng(path).unwrap_or_else(|e| panic!("{e}"))
}

/// [`read_pcapng`], with an error for a file that is not (yet) complete.
pub fn try_read_pcapng(path: &Path) -> Result<Vec<Segment>, String> {
    let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut reader =
        PcapNgReader::new(file).map_err(|e| format!("{}: no header: {e}", path.display()))?;
    let mut out = Vec::new();
    while let Some(block) = reader.next_block() {
        let block = block.map_err(|e| format!("{}: bad block: {e}", path.display()))?;
        if let Block::EnhancedPacket(p) = block {
            let mut seg = parse_frame(&p.data);
            seg.comment = p.options.iter().find_map(|o| match o {
                EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                _ => None,
            });
            out.push(seg);
        }
    }
    Ok(out)
}

/// Every segment of a capture file as `tcpdump -r` reads it, or `None` (the skip recorded,
/// a failure under `CI=true`) when tcpdump is not installed.
pub fn read_tcpdump(path: &Path) -> Option<Vec<Segment>> {
    let output = match Command::new("tcpdump").args(["-nn", "-xx", "-r"]).arg(path).output() {
        Ok(o) => o,
        Err(e) => {
            crate::skip(&format!("the tcpdump check: cannot run tcpdump ({e})"));
            return None;
        }
    };
    assert!(
        output.status.success(),
        "tcpdump -r {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for line in text.lines() {
        let Some(hex) = line.trim_start().strip_prefix("0x") else {
            frames.push(Vec::new());
            continue;
        };
        let (_, bytes) = hex.split_once(':').expect("tcpdump hex line");
        let frame = frames.last_mut().expect("a packet line before its hex");
        for word in bytes.split_whitespace() {
            for i in (0..word.len()).step_by(2) {
                frame.push(u8::from_str_radix(&word[i..i + 2], 16).expect("hex"));
            }
        }
    }
    Some(frames.iter().map(|f| parse_frame(f)).collect())
}

/// Parses an Ethernet + IPv4/IPv6 + TCP frame.
pub fn parse_frame(frame: &[u8]) -> Segment {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[14..];
    let (src, dst, tcp) = if ethertype == 0x0800 {
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let s: [u8; 4] = ip[12..16].try_into().unwrap();
        let d: [u8; 4] = ip[16..20].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), &ip[ihl..total])
    } else {
        assert_eq!(ethertype, 0x86dd, "neither IPv4 nor IPv6");
        let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), &ip[40..40 + len])
    };
    let offset = usize::from(tcp[12] >> 4) * 4;
    Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        seq: u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
        flags: tcp[13],
        payload: tcp[offset..].to_vec(),
        comment: None,
    }
}

/// The bytes `from` sent, reassembled by sequence number (retransmitted or repeated
/// ranges, as after a rotation, count once); panics on a gap.
pub fn stream(segments: &[Segment], from: SocketAddr) -> Vec<u8> {
    let mut parts: Vec<(u32, &[u8])> = segments
        .iter()
        .filter(|s| s.src == from && !s.payload.is_empty())
        .map(|s| (s.seq, s.payload.as_slice()))
        .collect();
    parts.sort_by_key(|p| p.0);
    let Some(syn) = segments.iter().find(|s| s.src == from && s.flags & SYN != 0) else {
        return Vec::new();
    };
    let mut next = syn.seq.wrapping_add(1);
    let mut out = Vec::new();
    for (seq, data) in parts {
        let end = seq.wrapping_add(data.len() as u32);
        if end <= next {
            continue;
        }
        assert!(seq <= next, "a gap in the stream of {from}: {next} .. {seq}");
        out.extend_from_slice(&data[(next - seq) as usize..]);
        next = end;
    }
    out
}

/// The capture files of the session of `client` in `dir`, in rotation order.
pub fn capture_files(dir: &Path, client: SocketAddr) -> Vec<PathBuf> {
    let tag = format!("-{}_{}", client.ip(), client.port()).replace(':', "_");
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.strip_suffix(".pcapng")?.to_string();
            let at = name.find(&tag)?;
            let rest = &name[at + tag.len()..];
            let part = if rest.is_empty() { 1 } else { rest.strip_prefix('-')?.parse().ok()? };
            Some((part, p))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}
