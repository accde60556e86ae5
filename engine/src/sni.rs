//! TLS ClientHello reader: the server name (SNI) a client asks for, from the first bytes it
//! sent (read with MSG_PEEK, so the backend still receives them).
//!
//! Pure: [`read_sni`] looks at a byte slice and allocates nothing: the name it returns is
//! kept inline ([`HostName`]).
//!
//! Invariants:
//! - It never panics and checks every length against the bytes present and the enclosing
//!   structure.
//! - It answers `Found`, `Absent`, `Invalid` or `NotTls` only once the whole ClientHello
//!   handshake message is in the buffer; any shorter prefix of a valid ClientHello is
//!   `Incomplete`.
//! - Names are normalised as TLS servers compare them: lowercased, trailing dots dropped.
//!   A name that is still not a host name is `Invalid`, never `Absent`: a client must not
//!   escape a rule on its name by spelling the name so that it is not read.
//! - The ClientHello may span several TLS records; with their 5-byte headers they must fit in
//!   [`MAX_CLIENT_HELLO`] bytes, or the answer is `TooLarge`. A caller that has peeked
//!   `MAX_CLIENT_HELLO` bytes therefore never gets `Incomplete`.

/// The most bytes (records with their headers) a ClientHello may take.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const MAX_RECORD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_HEADER: usize = 4;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// The longest host name read (a DNS name).
pub const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;

/// What the first bytes of a connection say about the server name.
// The name is kept inline so that reading it allocates nothing; an `Sni` lives on the stack
// for one decision.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// A valid host name, lowercase, without trailing dots.
    Found(HostName),
    /// A ClientHello without a `server_name` host name.
    Absent,
    /// A ClientHello whose first `server_name` host name is not a host name (characters
    /// other than letters, digits, `-`, `_`, `.`; empty or long labels; over 255 bytes).
    Invalid,
    /// Not a TLS handshake record carrying a well-formed ClientHello.
    NotTls,
    /// So far a valid beginning: more bytes are needed.
    Incomplete,
    /// The ClientHello, with its record headers, needs more than [`MAX_CLIENT_HELLO`] bytes.
    TooLarge,
}

/// A host name of at most [`MAX_NAME`] bytes, kept inline so that reading it allocates
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HostName {
    bytes: [u8; MAX_NAME],
    len: u8,
}

impl HostName {
    /// `name` as a host name (validated, lowercased, trailing dots dropped), or `None`.
    pub fn parse(name: &str) -> Option<HostName> {
        host_name(name.as_bytes())
    }

    /// The name; only ASCII letters, digits, `-`, `_` and `.` are ever stored.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for HostName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Reads the server name from the first bytes a client sent.
pub fn read_sni(buf: &[u8]) -> Sni {
    let body_len = match locate(buf) {
        Ok(len) => len,
        Err(stop) => return stop.into(),
    };
    let mut stream = Stream::new(buf);
    if stream.skip(HANDSHAKE_HEADER).is_err() {
        return Sni::NotTls;
    }
    let mut body = Body { stream, left: body_len };
    match client_hello(&mut body) {
        Ok(Named::Host(name)) => Sni::Found(name),
        Ok(Named::Nothing) => Sni::Absent,
        Ok(Named::Invalid) => Sni::Invalid,
        Err(stop) => stop.into(),
    }
}

/// What the `server_name` extension of a whole ClientHello names.
// Inline like `Sni`, and as short-lived: one lives on the stack while a hello is read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    Nothing,
    Host(HostName),
    Invalid,
}

/// Why reading a ClientHello stopped short of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    NotTls,
    Incomplete,
    TooLarge,
}

impl From<Stop> for Sni {
    fn from(stop: Stop) -> Sni {
        match stop {
            Stop::NotTls => Sni::NotTls,
            Stop::Incomplete => Sni::Incomplete,
            Stop::TooLarge => Sni::TooLarge,
        }
    }
}

/// Checks that a whole ClientHello handshake message is in `buf`; returns its body length.
fn locate(buf: &[u8]) -> Result<usize, Stop> {
    let mut stream = Stream::new(buf);
    let mut header = [0u8; HANDSHAKE_HEADER];
    stream.read(&mut header)?;
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(Stop::NotTls);
    }
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    if RECORD_HEADER + HANDSHAKE_HEADER + len > MAX_CLIENT_HELLO {
        return Err(Stop::TooLarge);
    }
    stream.skip(len)?;
    Ok(len)
}

/// The ClientHello body after its handshake header: the host name it names, if any.
fn client_hello(body: &mut Body) -> Result<Named, Stop> {
    let version = body.u16()?;
    if version >> 8 != 3 {
        return Err(Stop::NotTls);
    }
    body.skip(32)?; // random
    let session_id = usize::from(body.u8()?);
    if session_id > 32 {
        return Err(Stop::NotTls);
    }
    body.skip(session_id)?;
    let suites = usize::from(body.u16()?);
    if suites < 2 || suites % 2 != 0 {
        return Err(Stop::NotTls);
    }
    body.skip(suites)?;
    let compressions = usize::from(body.u8()?);
    if compressions == 0 {
        return Err(Stop::NotTls);
    }
    body.skip(compressions)?;
    if body.left == 0 {
        return Ok(Named::Nothing); // no extensions at all
    }
    if usize::from(body.u16()?) != body.left {
        return Err(Stop::NotTls);
    }
    extensions(body)
}

/// Walks every extension (checking each length) and keeps the first `server_name`'s host name.
fn extensions(body: &mut Body) -> Result<Named, Stop> {
    let mut name = Named::Nothing;
    let mut seen = false;
    while body.left > 0 {
        let kind = body.u16()?;
        let len = usize::from(body.u16()?);
        if kind != EXTENSION_SERVER_NAME || seen {
            body.skip(len)?;
            continue;
        }
        seen = true;
        let end = body.left.checked_sub(len).ok_or(Stop::NotTls)?;
        name = server_name(body, len)?;
        if body.left != end {
            return Err(Stop::NotTls);
        }
    }
    Ok(name)
}

/// The `server_name` extension data of `len` bytes: a list of (type, name) entries. The first
/// host name entry decides, valid or not.
fn server_name(body: &mut Body, len: usize) -> Result<Named, Stop> {
    if len == 0 {
        return Ok(Named::Nothing);
    }
    let list = usize::from(body.u16()?);
    if list + 2 != len {
        return Err(Stop::NotTls);
    }
    let end = body.left.checked_sub(list).ok_or(Stop::NotTls)?;
    let mut first = Named::Nothing;
    while body.left > end {
        let kind = body.u8()?;
        let name_len = usize::from(body.u16()?);
        let room = body.left.checked_sub(end).ok_or(Stop::NotTls)?;
        if name_len > room {
            return Err(Stop::NotTls);
        }
        if kind != NAME_TYPE_HOST || first != Named::Nothing || name_len > MAX_NAME {
            body.skip(name_len)?;
            if kind == NAME_TYPE_HOST && first == Named::Nothing {
                first = Named::Invalid; // too long to be a host name
            }
            continue;
        }
        let mut name = [0u8; MAX_NAME];
        body.read(&mut name[..name_len])?;
        first = host_name(&name[..name_len]).map_or(Named::Invalid, Named::Host);
    }
    Ok(first)
}

/// A valid host name of at most [`MAX_NAME`] bytes, lowercased, without its trailing dots.
fn host_name(raw: &[u8]) -> Option<HostName> {
    let end = raw.iter().rposition(|&b| b != b'.').map_or(0, |last| last + 1);
    let name = &raw[..end];
    if name.is_empty() || name.len() > MAX_NAME {
        return None;
    }
    for label in name.split(|&b| b == b'.') {
        let valid = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        if label.is_empty() || label.len() > MAX_LABEL || !label.iter().all(valid) {
            return None;
        }
    }
    let mut host = HostName { bytes: [0; MAX_NAME], len: name.len() as u8 };
    host.bytes[..name.len()].copy_from_slice(name);
    host.bytes.make_ascii_lowercase();
    Some(host)
}

/// The handshake bytes carried by consecutive handshake records, read across record headers.
struct Stream<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of the current record not yet read.
    left_in_record: usize,
}

impl<'a> Stream<'a> {
    fn new(buf: &'a [u8]) -> Stream<'a> {
        Stream { buf, pos: 0, left_in_record: 0 }
    }

    /// Why the bytes ran out: the ClientHello is not all there yet, or never can be.
    fn short(&self) -> Stop {
        if self.buf.len() >= MAX_CLIENT_HELLO {
            return Stop::TooLarge;
        }
        Stop::Incomplete
    }

    /// Steps over the next record header; rejects what is not a handshake record early.
    fn next_record(&mut self) -> Result<(), Stop> {
        let header = &self.buf[self.pos.min(self.buf.len())..];
        if header.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
            return Err(Stop::NotTls);
        }
        if header.get(1).is_some_and(|&major| major != 3) {
            return Err(Stop::NotTls);
        }
        if self.pos + RECORD_HEADER > MAX_CLIENT_HELLO {
            return Err(Stop::TooLarge);
        }
        if header.len() < RECORD_HEADER {
            return Err(self.short());
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(Stop::NotTls);
        }
        self.pos += RECORD_HEADER;
        self.left_in_record = len;
        Ok(())
    }

    /// Consumes `n` handshake bytes, handing each contiguous piece to `sink`.
    fn take(&mut self, mut n: usize, mut sink: impl FnMut(&[u8])) -> Result<(), Stop> {
        while n > 0 {
            if self.left_in_record == 0 {
                self.next_record()?;
            }
            let end = self.buf.len().min(MAX_CLIENT_HELLO);
            let piece = n.min(self.left_in_record).min(end.saturating_sub(self.pos));
            if piece == 0 {
                return Err(self.short());
            }
            sink(&self.buf[self.pos..self.pos + piece]);
            self.pos += piece;
            self.left_in_record -= piece;
            n -= piece;
        }
        Ok(())
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        self.take(n, |_| ())
    }

    fn read(&mut self, out: &mut [u8]) -> Result<(), Stop> {
        let mut filled = 0;
        self.take(out.len(), |piece| {
            out[filled..filled + piece.len()].copy_from_slice(piece);
            filled += piece.len();
        })
    }
}

/// The ClientHello body: a [`Stream`] that may not read past the body's declared length.
struct Body<'a> {
    stream: Stream<'a>,
    left: usize,
}

impl Body<'_> {
    fn reserve(&mut self, n: usize) -> Result<(), Stop> {
        self.left = self.left.checked_sub(n).ok_or(Stop::NotTls)?;
        Ok(())
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        self.reserve(n)?;
        self.stream.skip(n)
    }

    fn read(&mut self, out: &mut [u8]) -> Result<(), Stop> {
        self.reserve(out.len())?;
        self.stream.read(out)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        let mut b = [0u8; 2];
        self.read(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;
    use proptest::test_runner::Config;

    use super::*;

    /// First bytes sent by `openssl s_client` (OpenSSL 3.0) to a local listener, with
    /// `-tls1_2 -servername example.com`.
    const TLS12_SNI: &str = "\
        16030100cb010000c703036bc91dfa6292f60dae5bdd0185eb6692860a95ad635ff6c407e4812daa0ccaee000038c02c\
        c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c\
        0035002f00ff0100006600000010000e00000b6578616d706c652e636f6d000b000403000102000a000c000a001d0017\
        001e00190018002300000016000000170000000d002a0028040305030603080708080809080a080b0804080508060401\
        05010601030303010302040205020602";

    /// `-tls1_2 -noservername`.
    const TLS12_NO_SNI: &str = "\
        16030100b7010000b30303ae42aa752bdff1e8bcc4455ac0ead499a564c11cbb5e03159a011996b04438f1000038c02c\
        c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c\
        0035002f00ff01000052000b000403000102000a000c000a001d0017001e00190018002300000016000000170000000d\
        002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602";

    /// `-tls1_3 -servername www.Example.org`: a TLS 1.3 hello (record version 3.1, key share,
    /// supported_versions), with a capital letter in the name.
    const TLS13_SNI: &str = "\
        16030100f4010000f00303cedcc28e5a8621a93ec5b97d5e88f5deebf9f2db4d743386d0c36a713f10d3c2209f4c4594\
        ccaa917485e878391f5721b945836bf4755c4b5668fcccce341dfa04000813021303130100ff0100009f000000140012\
        00000f7777772e4578616d706c652e6f7267000b000403000102000a00160014001d0017001e00190018010001010102\
        01030104002300000016000000170000000d001e001c040305030603080708080809080a080b08040805080604010501\
        0601002b0003020304002d00020101003300260024001d0020fd274780da83dd0a28d3befe2b9407ca6ccb9814640a0f\
        dc191f24c7dbdecb35";

    /// `-tls1_3 -noservername`.
    const TLS13_NO_SNI: &str = "\
        16030100dc010000d803036d4f80ace1d8634073b2813f503253ab006f1144263c534b49da3ffde63d82ea2049363ebb\
        8d335261c59f363d36a8fa6e1ea7a6ce9e7c8d21410d15e0a2d66d6f000813021303130100ff01000087000b00040300\
        0102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d001e001c0403\
        05030603080708080809080a080b080408050806040105010601002b0003020304002d00020101003300260024001d00\
        2072379666a79701fbb3fea5af0ce914a7cd15c82d03ee35eaab3c00662c68590f";

    fn found(name: &str) -> Sni {
        Sni::Found(HostName::parse(name).unwrap())
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn vectors() -> Vec<(Vec<u8>, Sni)> {
        vec![
            (hex(TLS12_SNI), found("example.com")),
            (hex(TLS12_NO_SNI), Sni::Absent),
            (hex(TLS13_SNI), found("www.example.org")),
            (hex(TLS13_NO_SNI), Sni::Absent),
        ]
    }

    /// The handshake bytes of a single-record hello, cut into records of `sizes` (cycled).
    fn fragment(record: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = &record[RECORD_HEADER..];
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at(size.clamp(1, rest.len()));
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
            rest = tail;
        }
        out
    }

    /// A one-record ClientHello with these extensions (or none at all with `None`).
    pub(crate) fn hello(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        if let Some(extensions) = extensions {
            let mut all = Vec::new();
            for (kind, data) in extensions {
                all.extend_from_slice(&kind.to_be_bytes());
                all.extend_from_slice(&(data.len() as u16).to_be_bytes());
                all.extend_from_slice(data);
            }
            body.extend_from_slice(&(all.len() as u16).to_be_bytes());
            body.extend_from_slice(&all);
        }
        let mut message = vec![HANDSHAKE_CLIENT_HELLO, 0];
        message.extend_from_slice(&(body.len() as u16).to_be_bytes());
        message.extend_from_slice(&body);
        let mut record = vec![CONTENT_HANDSHAKE, 3, 1];
        record.extend_from_slice(&(message.len() as u16).to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    /// A `server_name` extension with these (type, name) entries.
    pub(crate) fn server_names(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (EXTENSION_SERVER_NAME, data)
    }

    #[test]
    fn real_client_hellos() {
        for (bytes, want) in vectors() {
            assert_eq!(read_sni(&bytes), want);
            // Bytes after the hello (a peek may catch more) change nothing.
            let mut more = bytes.clone();
            more.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
            assert_eq!(read_sni(&more), want);
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for (bytes, want) in vectors() {
            for len in 0..bytes.len() {
                assert_eq!(read_sni(&bytes[..len]), Sni::Incomplete, "{want:?} cut at {len}");
            }
        }
    }

    #[test]
    fn hello_over_several_records() {
        for (bytes, want) in vectors() {
            for sizes in [&[1][..], &[2], &[3], &[5, 1], &[64], &[100, 7]] {
                let split = fragment(&bytes, sizes);
                assert_eq!(read_sni(&split), want, "records of {sizes:?}");
                for len in 0..split.len() {
                    assert_eq!(read_sni(&split[..len]), Sni::Incomplete, "{sizes:?} cut at {len}");
                }
            }
        }
    }

    #[test]
    fn not_tls() {
        let cases: [&[u8]; 9] = [
            b"GET / HTTP/1.1\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"G",
            &[0x16, 0x02],
            &[0x17, 0x03, 0x03, 0x00, 0x05],
            &[0x80, 0x2e, 0x01, 0x03, 0x01],
            &[0x16, 0x03, 0x01, 0x00, 0x00],
            &[0x16, 0x03, 0x01, 0x40, 0x01],
            &[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00],
        ];
        for bytes in cases {
            assert_eq!(read_sni(bytes), Sni::NotTls, "{bytes:02x?}");
        }
        let mut bad_version = hex(TLS12_SNI);
        bad_version[9] = 2;
        assert_eq!(read_sni(&bad_version), Sni::NotTls);
        // Another record type in the middle of a fragmented hello.
        let mut split = fragment(&hex(TLS12_SNI), &[50]);
        split[55] = 0x17;
        assert_eq!(read_sni(&split), Sni::NotTls);
    }

    #[test]
    fn malformed_lengths_are_not_tls() {
        let bytes = hex(TLS12_SNI);
        // Extensions total, one extension length, the server_name list length, the name length.
        for (at, value) in [(0x69, 0x67), (0x6d, 0x11), (0x6f, 0x0f), (0x72, 0x0c), (0x72, 0xff)] {
            let mut broken = bytes.clone();
            broken[at] = value;
            assert_eq!(read_sni(&broken), Sni::NotTls, "byte {at:#x} = {value:#x}");
        }
        let mut short_suites = bytes.clone();
        short_suites[0x2d] = 0x37; // odd cipher suite length
        assert_eq!(read_sni(&short_suites), Sni::NotTls);
    }

    #[test]
    fn built_hellos() {
        let ok = found("example.com");
        assert_eq!(read_sni(&hello(None)), Sni::Absent);
        assert_eq!(read_sni(&hello(Some(&[]))), Sni::Absent);
        assert_eq!(read_sni(&hello(Some(&[server_names(&[(0, b"Example.COM.")])]))), ok);
        let other_type_first = server_names(&[(7, b"x"), (0, b"example.com")]);
        assert_eq!(read_sni(&hello(Some(&[other_type_first]))), ok);
        let first_host_decides = server_names(&[(0, b"bad name"), (0, b"example.com")]);
        assert_eq!(read_sni(&hello(Some(&[first_host_decides]))), Sni::Invalid);
        let after_padding = [(21, vec![0; 300]), server_names(&[(0, b"example.com")])];
        assert_eq!(read_sni(&hello(Some(&after_padding))), ok);
        assert_eq!(read_sni(&hello(Some(&[(EXTENSION_SERVER_NAME, Vec::new())]))), Sni::Absent);
        let long = [b'a'; 63].repeat(4);
        let too_long = server_names(&[(0, &long[..])]);
        assert_eq!(read_sni(&hello(Some(&[too_long]))), Sni::Invalid);
    }

    /// Issue 26 item 6: "example.com.." and names that are no host names were read as no
    /// name at all, so a rule denying the name let them through.
    #[test]
    fn names_are_normalised_and_the_rest_is_invalid_not_absent() {
        let ok = found("example.com");
        for name in [&b"example.com."[..], b"example.com..", b"EXAMPLE.com...."] {
            let bytes = hello(Some(&[server_names(&[(0, name)])]));
            assert_eq!(read_sni(&bytes), ok, "{name:?}");
        }
        for name in
            [&b"exa%ple.com"[..], b"a..b", b".a", b".", b"..", b"", b"caf\xc3\xa9.fr", b"a\0b"]
        {
            let bytes = hello(Some(&[server_names(&[(0, name)])]));
            assert_eq!(read_sni(&bytes), Sni::Invalid, "{name:?}");
        }
        let label = [b'a'; 64];
        assert_eq!(read_sni(&hello(Some(&[server_names(&[(0, &label[..])])]))), Sni::Invalid);
    }

    #[test]
    fn too_large() {
        // The handshake header alone announces more than the bound.
        let big = [0x16, 0x03, 0x01, 0x00, 0x09, 0x01, 0x00, 0x40, 0x00];
        assert_eq!(read_sni(&big), Sni::TooLarge);
        // A hello that fits one record but not the bound once cut into one-byte records.
        let padded = hello(Some(&[(21, vec![0; 3000]), server_names(&[(0, b"example.com")])]));
        assert!(matches!(read_sni(&padded), Sni::Found(_)));
        let split = fragment(&padded, &[1]);
        assert!(split.len() > MAX_CLIENT_HELLO);
        assert_eq!(read_sni(&split), Sni::TooLarge);
        assert_eq!(read_sni(&split[..MAX_CLIENT_HELLO]), Sni::TooLarge);
        assert_eq!(read_sni(&split[..MAX_CLIENT_HELLO - 1000]), Sni::Incomplete);
    }

    /// A one-record hello naming example.com, padded to `total` bytes with its record header.
    fn hello_of_size(total: usize) -> Vec<u8> {
        let name = server_names(&[(0, b"example.com")]);
        let bare = hello(Some(&[(21, Vec::new()), name.clone()])).len();
        let bytes = hello(Some(&[(21, vec![0; total - bare]), name]));
        assert_eq!(bytes.len(), total);
        bytes
    }

    #[test]
    fn host_names_print_and_compare_as_their_normalised_text() {
        let name = HostName::parse("Example.COM.").unwrap();
        assert_eq!(format!("{name:?}"), "\"example.com\"");
        assert_eq!(format!("{:?}", Sni::Found(name)), "Found(\"example.com\")");
        assert!(name == "example.com");
        assert!(name != "example.org");
        assert!(name != "Example.COM.");
    }

    /// The handshake length is 24 bits: its top byte alone (1, 0, 0) announces 64 KiB.
    #[test]
    fn the_top_byte_of_the_handshake_length_counts() {
        let big = [0x16, 0x03, 0x01, 0x00, 0x09, 0x01, 0x01, 0x00, 0x00];
        assert_eq!(read_sni(&big), Sni::TooLarge);
    }

    /// A hello whose record (header included) is exactly `MAX_CLIENT_HELLO` bytes is read; one
    /// a byte longer is `TooLarge`, known from its record and handshake headers alone.
    #[test]
    fn a_hello_filling_the_bound_exactly_is_read() {
        let headers = RECORD_HEADER + HANDSHAKE_HEADER;
        let exact = hello_of_size(MAX_CLIENT_HELLO);
        assert_eq!(read_sni(&exact), found("example.com"));
        assert_eq!(read_sni(&exact[..headers]), Sni::Incomplete);
        let over = hello_of_size(MAX_CLIENT_HELLO + 1);
        assert_eq!(read_sni(&over), Sni::TooLarge);
        assert_eq!(read_sni(&over[..headers]), Sni::TooLarge);
    }

    /// Each record header is held against the bound. One that ends exactly at
    /// `MAX_CLIENT_HELLO` is read and checked like any other (a zero-length record there is
    /// `NotTls`); one that would end a byte later is `TooLarge` at once, from its first byte
    /// and whatever its length says.
    #[test]
    fn a_record_header_ending_at_the_bound_is_read_one_crossing_it_is_too_large() {
        let bytes = hello_of_size(MAX_CLIENT_HELLO);
        let message = MAX_CLIENT_HELLO - RECORD_HEADER;
        // The message in two records: the second header ends at the bound.
        let first = message - RECORD_HEADER;
        let mut split = fragment(&bytes, &[first]);
        let at = RECORD_HEADER + first;
        assert_eq!(split[at..at + RECORD_HEADER], [CONTENT_HANDSHAKE, 3, 1, 0, 5]);
        assert_eq!(at + RECORD_HEADER, MAX_CLIENT_HELLO);
        assert_eq!(read_sni(&split), Sni::TooLarge); // its 5 bytes are past the bound
        split[at + 3..at + 5].copy_from_slice(&[0, 0]);
        assert_eq!(read_sni(&split), Sni::NotTls);
        // One byte later, the second header crosses the bound.
        let first = message - RECORD_HEADER + 1;
        let mut split = fragment(&bytes, &[first]);
        let at = RECORD_HEADER + first;
        assert_eq!(split[at..at + RECORD_HEADER], [CONTENT_HANDSHAKE, 3, 1, 0, 4]);
        assert_eq!(read_sni(&split[..at + 1]), Sni::TooLarge);
        split[at + 3..at + 5].copy_from_slice(&[0, 0]);
        assert_eq!(read_sni(&split), Sni::TooLarge);
    }

    /// A record may carry 2^14 bytes: a hello at the start of a record that long is read
    /// (without the rest of the record); one byte more is no TLS record.
    #[test]
    fn a_record_of_two_to_the_fourteen_bytes_is_accepted() {
        let mut bytes = hello(Some(&[server_names(&[(0, b"example.com")])]));
        bytes[3..5].copy_from_slice(&(MAX_RECORD as u16).to_be_bytes());
        assert_eq!(read_sni(&bytes), found("example.com"));
        bytes[3..5].copy_from_slice(&(MAX_RECORD as u16 + 1).to_be_bytes());
        assert_eq!(read_sni(&bytes), Sni::NotTls);
    }

    /// An empty cipher suite list is no ClientHello, even when the lengths around it add up.
    #[test]
    fn an_empty_cipher_suite_list_is_not_tls() {
        let mut bytes = hello(Some(&[server_names(&[(0, b"example.com")])]));
        assert_eq!(read_sni(&bytes), found("example.com"));
        // After the empty session id: suites (00 02 13 01) and compressions (01 00), rewritten
        // in the same 6 bytes as no suites and three null compressions.
        assert_eq!(bytes[44..50], [0, 2, 0x13, 0x01, 1, 0]);
        bytes[44..50].copy_from_slice(&[0, 0, 3, 0, 0, 0]);
        assert_eq!(read_sni(&bytes), Sni::NotTls);
    }

    #[test]
    fn hyphens_and_underscores_are_host_name_characters() {
        let bytes = hello(Some(&[server_names(&[(0, b"My-Host_1.example-2.com")])]));
        assert_eq!(read_sni(&bytes), found("my-host_1.example-2.com"));
    }

    /// 255 bytes in labels of 63 is read; 256 bytes (labels all short enough) is `Invalid`,
    /// not skipped as if there were no name, and decides even before a valid name.
    #[test]
    fn the_longest_name_and_label_are_read_a_longer_name_is_invalid() {
        let label = "a".repeat(MAX_LABEL);
        let longest = [label.as_str(); 4].join(".");
        assert_eq!(longest.len(), MAX_NAME);
        let bytes = hello(Some(&[server_names(&[(0, longest.as_bytes())])]));
        assert_eq!(read_sni(&bytes), found(&longest));
        let over = format!("b.{}", &longest[1..]);
        assert_eq!(over.len(), MAX_NAME + 1);
        let bytes = hello(Some(&[server_names(&[(0, over.as_bytes())])]));
        assert_eq!(read_sni(&bytes), Sni::Invalid);
        let then_valid = server_names(&[(0, over.as_bytes()), (0, b"example.com")]);
        assert_eq!(read_sni(&hello(Some(&[then_valid]))), Sni::Invalid);
        assert!(HostName::parse(&longest).is_some());
        assert_eq!(HostName::parse(&over), None);
    }

    /// Only the first host name entry counts: a later one, even valid, changes nothing.
    #[test]
    fn a_second_host_name_entry_is_ignored() {
        let two = server_names(&[(0, b"example.com"), (0, b"example.org")]);
        assert_eq!(read_sni(&hello(Some(&[two]))), found("example.com"));
    }

    fn any_vector() -> impl Strategy<Value = Vec<u8>> {
        prop::sample::select(vec![TLS12_SNI, TLS12_NO_SNI, TLS13_SNI, TLS13_NO_SNI]).prop_map(hex)
    }

    fn valid_name(name: &str) -> bool {
        name.len() <= MAX_NAME
            && name.split('.').all(|l| {
                (1..=MAX_LABEL).contains(&l.len())
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
            })
    }

    proptest! {
        #![proptest_config(Config { cases: 3000, failure_persistence: None, ..Config::default() })]

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read_sni(&bytes);
        }

        #[test]
        fn garbage_after_a_record_header_never_panics(
            len in any::<u16>(),
            rest in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![0x16, 0x03, 0x01];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.push(HANDSHAKE_CLIENT_HELLO);
            bytes.extend_from_slice(&rest);
            let _ = read_sni(&bytes);
        }

        #[test]
        fn mutated_hellos_never_panic(
            mut bytes in any_vector(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Sni::Found(name) = read_sni(&bytes) {
                prop_assert!(valid_name(name.as_str()), "{:?}", name);
            }
        }

        #[test]
        fn any_fragmentation_reads_the_same(
            (bytes, want) in prop::sample::select(vectors()),
            sizes in prop::collection::vec(1usize..80, 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let split = fragment(&bytes, &sizes);
            prop_assert_eq!(read_sni(&split), want);
            let len = cut.index(split.len());
            prop_assert_eq!(read_sni(&split[..len]), Sni::Incomplete);
        }
    }
}
