//! PROXY protocol v1 (text) and v2 (binary), as HAProxy specifies it: [`parse`] reads the
//! header a trusted load balancer puts before a client's bytes, [`encode`] writes the header
//! sluice puts before the bytes it relays to a backend. Pure: no I/O.
//!
//! Invariants: [`parse`] never reads past the header it reports, never asks for more than
//! [`MAX_HEADER`] bytes, and never panics on any input (fuzzed, with a replayed corpus in
//! `fuzz/corpus/proxy_header/`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
pub const MAX_V1_HEADER: usize = 107;
/// The longest v2 header accepted: 16 fixed bytes and up to this much address and TLV data
/// (the spec allows 64 KiB; real senders stay far below, and sluice holds no more).
pub const MAX_V2_PAYLOAD: usize = 2048;
/// The longest header of either version.
pub const MAX_HEADER: usize = 16 + MAX_V2_PAYLOAD;

const V1_PREFIX: &[u8] = b"PROXY ";

/// Which version of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

impl std::str::FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            other => {
                Err(format!("unknown PROXY protocol version {other:?}; expected \"v1\" or \"v2\""))
            }
        }
    }
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// Bytes the header occupies at the start of the stream.
    pub len: usize,
    /// The original client and the address it connected to; `None` for `UNKNOWN` (v1),
    /// `LOCAL` or a non-IP family (v2): the connection's own addresses then stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning: wait until at least `need` bytes have arrived (never more than
    /// [`MAX_HEADER`]).
    Incomplete {
        need: usize,
    },
    Complete(Header),
}

/// Why a header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("v1 header without CRLF within {MAX_V1_HEADER} bytes")]
    V1TooLong,
    #[error("malformed v1 header")]
    V1Malformed,
    #[error("unsupported v2 version or command")]
    V2Command,
    #[error("unsupported v2 address family or transport")]
    V2Family,
    #[error("v2 header longer than {MAX_HEADER} bytes")]
    V2TooLong,
    #[error("v2 address block shorter than its family needs")]
    V2Short,
}

/// Parses the start of a stream as a PROXY protocol header of either version.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete { need: 1 });
    }
    if buf[0] == V2_SIGNATURE[0] {
        return parse_v2(buf);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let prefix = buf.len().min(V1_PREFIX.len());
    if buf[..prefix] != V1_PREFIX[..prefix] {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(MAX_V1_HEADER)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= MAX_V1_HEADER {
            return Err(ProxyError::V1TooLong);
        }
        return Ok(Parsed::Incomplete { need: buf.len() + 1 });
    };
    let line =
        std::str::from_utf8(&buf[V1_PREFIX.len()..end]).map_err(|_| ProxyError::V1Malformed)?;
    let len = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    let addresses = match fields.as_slice() {
        ["UNKNOWN", ..] => None,
        ["TCP4", src, dst, sport, dport] => {
            Some((v1_addr::<Ipv4Addr>(src, sport)?, v1_addr::<Ipv4Addr>(dst, dport)?))
        }
        ["TCP6", src, dst, sport, dport] => {
            Some((v1_addr::<Ipv6Addr>(src, sport)?, v1_addr::<Ipv6Addr>(dst, dport)?))
        }
        _ => return Err(ProxyError::V1Malformed),
    };
    Ok(Parsed::Complete(Header { version: Version::V1, len, addresses }))
}

fn v1_addr<A>(ip: &str, port: &str) -> Result<SocketAddr, ProxyError>
where
    A: std::str::FromStr + Into<IpAddr>,
{
    let ip: A = ip.parse().map_err(|_| ProxyError::V1Malformed)?;
    let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = port.len() > 1 && port.starts_with('0');
    if !digits || leading_zero {
        return Err(ProxyError::V1Malformed);
    }
    let port: u16 = port.parse().map_err(|_| ProxyError::V1Malformed)?;
    Ok(SocketAddr::new(ip.into(), port))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..prefix] != V2_SIGNATURE[..prefix] {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete { need: 16 });
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 || ver_cmd & 0x0f > 1 {
        return Err(ProxyError::V2Command);
    }
    if payload > MAX_V2_PAYLOAD {
        return Err(ProxyError::V2TooLong);
    }
    let len = 16 + payload;
    if buf.len() < len {
        return Ok(Parsed::Incomplete { need: len });
    }
    let block = &buf[16..len];
    let local = ver_cmd & 0x0f == 0;
    let addresses = match (family >> 4, family & 0x0f) {
        (af, transport) if af > 3 || transport > 2 => return Err(ProxyError::V2Family),
        _ if local => None,
        (1, 1) => {
            let b: &[u8; 12] =
                block.get(..12).and_then(|b| b.try_into().ok()).ok_or(ProxyError::V2Short)?;
            let ip = |o: usize| IpAddr::from([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        (2, 1) => {
            let b: &[u8; 36] =
                block.get(..36).and_then(|b| b.try_into().ok()).ok_or(ProxyError::V2Short)?;
            let ip = |o: usize| {
                let octets: [u8; 16] = b[o..o + 16].try_into().expect("16 bytes");
                IpAddr::from(octets)
            };
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        (1 | 2, 2) => return Err(ProxyError::V2Family),
        _ => None,
    };
    Ok(Parsed::Complete(Header { version: Version::V2, len, addresses }))
}

/// A header as [`encode`] writes it, kept inline (at most [`MAX_V1_HEADER`] bytes), so that
/// a session that sends one allocates nothing for it.
#[derive(Clone, Copy)]
pub struct Encoded {
    bytes: [u8; MAX_V1_HEADER],
    len: u8,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn push(&mut self, data: &[u8]) {
        let at = usize::from(self.len);
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.len += data.len() as u8;
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({:?})", self.as_bytes())
    }
}

impl std::fmt::Write for Encoded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if usize::from(self.len) + s.len() > MAX_V1_HEADER {
            return Err(std::fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

/// The header that tells a backend a session came from `source` to `destination`. Mixed
/// families are both written as IPv6 (IPv4-mapped), as the protocol needs one family.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Encoded {
    use std::fmt::Write;
    let (source, destination) = same_family(source, destination);
    let mut out = Encoded { bytes: [0; MAX_V1_HEADER], len: 0 };
    match version {
        Version::V1 => {
            let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            // The longest line (two full IPv6 addresses) is 104 bytes: it always fits.
            let _ = write!(
                out,
                "PROXY {proto} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            );
        }
        Version::V2 => {
            out.push(&V2_SIGNATURE);
            out.push(&[0x21]);
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(&[0x11, 0, 12]);
                    out.push(&s.octets());
                    out.push(&d.octets());
                }
                (s, d) => {
                    out.push(&[0x21, 0, 36]);
                    out.push(&v6(s).octets());
                    out.push(&v6(d).octets());
                }
            }
            out.push(&source.port().to_be_bytes());
            out.push(&destination.port().to_be_bytes());
        }
    }
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    (SocketAddr::new(v6(a.ip()).into(), a.port()), SocketAddr::new(v6(b.ip()).into(), b.port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    #[test]
    fn v1_tcp4_and_tcp6_headers_give_the_addresses_and_the_length() {
        let h = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /");
        assert_eq!(h.len, 45);
        assert_eq!(h.addresses, Some((addr("192.0.2.1:56324"), addr("198.51.100.2:443"))));
        let h = complete(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
        assert_eq!(h.addresses, Some((addr("[2001:db8::1]:1"), addr("[::1]:65535"))));
        let h = complete(b"PROXY UNKNOWN whatever\r\n");
        assert_eq!((h.len, h.addresses), (24, None));
    }

    #[test]
    fn v1_rejects_malformed_headers() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
        ] {
            assert!(
                parse(bad).is_err() || matches!(parse(bad), Ok(Parsed::Incomplete { .. })),
                "{bad:?}"
            );
            let mut closed = bad.to_vec();
            closed.extend_from_slice(b"\r\n");
            assert!(parse(&closed).is_err(), "{:?}", String::from_utf8_lossy(&closed));
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(&[b'P'; 200]), Err(ProxyError::NotProxy));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_HEADER, b'x');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn partial_headers_ask_for_more_within_the_bound() {
        let full = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
        for n in 0..full.len() {
            match parse(&full[..n]) {
                Ok(Parsed::Incomplete { need }) => assert!(need > n && need <= MAX_HEADER),
                other => panic!("{n}: {other:?}"),
            }
        }
        let v2 = encode(Version::V2, addr("[2001:db8::1]:5"), addr("[::1]:6")).as_bytes().to_vec();
        for n in 0..v2.len() {
            match parse(&v2[..n]) {
                Ok(Parsed::Incomplete { need }) => assert!(need > n && need <= v2.len()),
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    #[test]
    fn v2_headers_are_encoded_byte_for_byte_and_parsed_back() {
        let h = encode(Version::V2, addr("192.0.2.1:56324"), addr("198.51.100.2:443"))
            .as_bytes()
            .to_vec();
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 2]);
        expected.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(h, expected);
        let parsed = complete(&h);
        assert_eq!(parsed.len, 28);
        assert_eq!(parsed.addresses, Some((addr("192.0.2.1:56324"), addr("198.51.100.2:443"))));
        assert_eq!(
            encode(Version::V1, addr("192.0.2.1:56324"), addr("198.51.100.2:443"))
                .as_bytes()
                .to_vec(),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
        );
        let mixed = encode(Version::V1, addr("192.0.2.1:1"), addr("[::1]:2")).as_bytes().to_vec();
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n");
    }

    #[test]
    fn v2_local_tlvs_and_bad_fields() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(complete(&local), Header { version: Version::V2, len: 16, addresses: None });
        let mut tlv =
            encode(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2")).as_bytes().to_vec();
        tlv[15] += 7;
        tlv.extend_from_slice(&[0x04, 0, 4, 1, 2, 3, 4]);
        assert_eq!(complete(&tlv).len, 35);
        let with = |i: usize, v: u8| {
            let mut h =
                encode(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2")).as_bytes().to_vec();
            h[i] = v;
            parse(&h)
        };
        assert_eq!(with(12, 0x11), Err(ProxyError::V2Command));
        assert_eq!(with(12, 0x22), Err(ProxyError::V2Command));
        assert_eq!(with(13, 0x51), Err(ProxyError::V2Family));
        assert_eq!(with(13, 0x12), Err(ProxyError::V2Family));
        assert_eq!(with(13, 0x21), Err(ProxyError::V2Short));
        assert_eq!(with(14, 0xff), Err(ProxyError::V2TooLong));
        assert_eq!(with(5, 0), Err(ProxyError::NotProxy));
    }

    #[test]
    fn the_longest_v2_header_accepted_is_max_header_bytes() {
        let mut h = encode(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2")).as_bytes().to_vec();
        // Address block (12 bytes) and one TLV filling the rest of the payload.
        let tlv = MAX_V2_PAYLOAD - 12 - 3;
        h[14..16].copy_from_slice(&(MAX_V2_PAYLOAD as u16).to_be_bytes());
        h.extend_from_slice(&[0x04, (tlv >> 8) as u8, tlv as u8]);
        h.resize(16 + MAX_V2_PAYLOAD, 0);
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete { need: MAX_HEADER }));
        assert_eq!(complete(&h).len, MAX_HEADER);
        h[14..16].copy_from_slice(&(MAX_V2_PAYLOAD as u16 + 1).to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::V2TooLong));
    }

    #[test]
    fn v1_port_zero_is_a_port_and_a_leading_zero_is_not() {
        let h = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 0 443\r\n");
        assert_eq!(h.addresses, Some((addr("192.0.2.1:0"), addr("198.51.100.2:443"))));
        assert!(parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 00 443\r\n").is_err());
    }

    /// v2 families and commands: LOCAL ignores any address block, AF_UNIX (3) and
    /// UNSPEC are accepted without addresses, a transport above DGRAM (2) or a family above
    /// AF_UNIX is refused, and TCP over UDP's transport is refused for IP families.
    #[test]
    fn v2_families_and_local_headers() {
        let with = |ver_cmd: u8, family: u8, block: usize| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, family, 0, block as u8]);
            h.resize(16 + block, 7);
            parse(&h)
        };
        let complete = |r: Result<Parsed, ProxyError>| match r {
            Ok(Parsed::Complete(h)) => Some(h.addresses),
            _ => None,
        };
        assert_eq!(complete(with(0x20, 0x11, 12)), Some(None), "LOCAL over TCP4: no addresses");
        assert_eq!(complete(with(0x20, 0x21, 36)), Some(None), "LOCAL over TCP6");
        assert!(complete(with(0x21, 0x11, 12)).unwrap().is_some(), "PROXY over TCP4");
        assert_eq!(complete(with(0x21, 0x31, 216)), Some(None), "AF_UNIX stream");
        assert_eq!(complete(with(0x21, 0x32, 216)), Some(None), "AF_UNIX datagram");
        assert_eq!(complete(with(0x21, 0x00, 0)), Some(None), "UNSPEC");
        assert_eq!(with(0x21, 0x13, 12), Err(ProxyError::V2Family), "transport 3");
        assert_eq!(with(0x21, 0x41, 12), Err(ProxyError::V2Family), "family 4");
        assert_eq!(with(0x21, 0x12, 12), Err(ProxyError::V2Family), "UDP over IPv4");
    }

    #[test]
    fn an_encoded_header_holds_at_most_the_longest_v1_header() {
        use std::fmt::Write;
        let mut e = Encoded { bytes: [0; MAX_V1_HEADER], len: 0 };
        assert!(e.write_str(&"x".repeat(MAX_V1_HEADER)).is_ok());
        assert_eq!(e.as_bytes().len(), MAX_V1_HEADER);
        let mut e = Encoded { bytes: [0; MAX_V1_HEADER], len: 0 };
        assert!(e.write_str(&"x".repeat(MAX_V1_HEADER + 1)).is_err());
        assert!(e.as_bytes().is_empty(), "nothing written");
        let longest = encode(
            Version::V1,
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
        assert_eq!(longest.as_bytes().len(), 104);
        assert!(
            format!("{longest:?}").starts_with("Encoded([80, 82, 79, 88, 89, 32,"),
            "{longest:?}"
        );
    }

    #[test]
    fn versions_are_named_as_configured() {
        for (version, name) in [(Version::V1, "v1"), (Version::V2, "v2")] {
            assert_eq!(version.as_str(), name);
            assert_eq!(name.parse::<Version>(), Ok(version));
        }
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse(&bytes) {
                Ok(Parsed::Complete(h)) => prop_assert!(h.len <= bytes.len() && h.len <= MAX_HEADER),
                Ok(Parsed::Incomplete { need }) => prop_assert!(need > bytes.len() && need <= MAX_HEADER),
                Err(_) => {}
            }
        }

        #[test]
        fn encoded_headers_parse_back(a in any::<[u8; 4]>(), b in any::<[u8; 16]>(), p in any::<u16>(), q in any::<u16>(), v2 in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..20)) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let (s, d) = (SocketAddr::from((a, p)), SocketAddr::from((b, q)));
            let mut h = encode(version, s, d).as_bytes().to_vec();
            let len = h.len();
            h.extend_from_slice(&tail);
            let parsed = complete(&h);
            prop_assert_eq!(parsed.len, len);
            let (ps, pd) = parsed.addresses.unwrap();
            prop_assert_eq!((ps.port(), pd.port()), (p, q));
            prop_assert_eq!(v6(ps.ip()), v6(s.ip()));
            prop_assert_eq!(v6(pd.ip()), v6(d.ip()));
        }
    }
}
