//! TLS ClientHello reader: the server name (SNI) a client asks for, from the first bytes it
//! sent (read with MSG_PEEK, so the backend still receives them).
//!
//! Pure: [`read_sni`] looks at a byte slice and allocates nothing but the name it returns.
//!
//! Invariants:
//! - It never panics and checks every length against the bytes present and the enclosing
//!   structure.
//! - It answers `Found`, `Absent` or `NotTls` only once the whole ClientHello handshake message
//!   is in the buffer; any shorter prefix of a valid ClientHello is `Incomplete`.
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
const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;

/// What the first bytes of a connection say about the server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// A valid host name, lowercase, without a trailing dot.
    Found(String),
    /// A ClientHello without a `server_name` host name, or with one that is not a valid host
    /// name (characters other than letters, digits, `-`, `_`, `.`, empty or long labels).
    Absent,
    /// Not a TLS handshake record carrying a well-formed ClientHello.
    NotTls,
    /// So far a valid beginning: more bytes are needed.
    Incomplete,
    /// The ClientHello, with its record headers, needs more than [`MAX_CLIENT_HELLO`] bytes.
    TooLarge,
}

/// Reads the server name from the first bytes a client sent.
pub fn read_sni(buf: &[u8]) -> Sni {
    let body_len = match locate(buf) {
        Ok(len) => len,
        Err(stop) => return stop,
    };
    let mut stream = Stream::new(buf);
    if stream.skip(HANDSHAKE_HEADER).is_err() {
        return Sni::NotTls;
    }
    let mut body = Body { stream, left: body_len };
    match client_hello(&mut body) {
        Ok(Some(name)) => Sni::Found(name),
        Ok(None) => Sni::Absent,
        Err(stop) => stop,
    }
}

/// Checks that a whole ClientHello handshake message is in `buf`; returns its body length.
fn locate(buf: &[u8]) -> Result<usize, Sni> {
    let mut stream = Stream::new(buf);
    let mut header = [0u8; HANDSHAKE_HEADER];
    stream.read(&mut header)?;
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(Sni::NotTls);
    }
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    if RECORD_HEADER + HANDSHAKE_HEADER + len > MAX_CLIENT_HELLO {
        return Err(Sni::TooLarge);
    }
    stream.skip(len)?;
    Ok(len)
}

/// The ClientHello body after its handshake header; `Some(name)` for a valid host name.
fn client_hello(body: &mut Body) -> Result<Option<String>, Sni> {
    let version = body.u16()?;
    if version >> 8 != 3 {
        return Err(Sni::NotTls);
    }
    body.skip(32)?; // random
    let session_id = usize::from(body.u8()?);
    if session_id > 32 {
        return Err(Sni::NotTls);
    }
    body.skip(session_id)?;
    let suites = usize::from(body.u16()?);
    if suites < 2 || suites % 2 != 0 {
        return Err(Sni::NotTls);
    }
    body.skip(suites)?;
    let compressions = usize::from(body.u8()?);
    if compressions == 0 {
        return Err(Sni::NotTls);
    }
    body.skip(compressions)?;
    if body.left == 0 {
        return Ok(None); // no extensions at all
    }
    if usize::from(body.u16()?) != body.left {
        return Err(Sni::NotTls);
    }
    extensions(body)
}

/// Walks every extension (checking each length) and keeps the first `server_name`'s host name.
fn extensions(body: &mut Body) -> Result<Option<String>, Sni> {
    let mut name = None;
    let mut seen = false;
    while body.left > 0 {
        let kind = body.u16()?;
        let len = usize::from(body.u16()?);
        if kind != EXTENSION_SERVER_NAME || seen {
            body.skip(len)?;
            continue;
        }
        seen = true;
        let end = body.left.checked_sub(len).ok_or(Sni::NotTls)?;
        name = server_name(body, len)?;
        if body.left != end {
            return Err(Sni::NotTls);
        }
    }
    Ok(name)
}

/// The `server_name` extension data of `len` bytes: a list of (type, name) entries. The first
/// host name entry decides; `None` when there is none or it is not a valid host name.
fn server_name(body: &mut Body, len: usize) -> Result<Option<String>, Sni> {
    if len == 0 {
        return Ok(None);
    }
    let list = usize::from(body.u16()?);
    if list + 2 != len {
        return Err(Sni::NotTls);
    }
    let end = body.left.checked_sub(list).ok_or(Sni::NotTls)?;
    let mut first: Option<Option<String>> = None;
    while body.left > end {
        let kind = body.u8()?;
        let name_len = usize::from(body.u16()?);
        let room = body.left.checked_sub(end).ok_or(Sni::NotTls)?;
        if name_len > room {
            return Err(Sni::NotTls);
        }
        if kind != NAME_TYPE_HOST || first.is_some() || name_len > MAX_NAME {
            body.skip(name_len)?;
            first = first.or((kind == NAME_TYPE_HOST).then_some(None));
            continue;
        }
        let mut name = [0u8; MAX_NAME];
        body.read(&mut name[..name_len])?;
        first = Some(host_name(&name[..name_len]));
    }
    Ok(first.flatten())
}

/// A valid host name, lowercased, without one trailing dot.
fn host_name(raw: &[u8]) -> Option<String> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() {
        return None;
    }
    for label in name.split(|&b| b == b'.') {
        let valid = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        if label.is_empty() || label.len() > MAX_LABEL || !label.iter().all(valid) {
            return None;
        }
    }
    let name = std::str::from_utf8(name).ok()?;
    Some(name.to_ascii_lowercase())
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
    fn short(&self) -> Sni {
        if self.buf.len() >= MAX_CLIENT_HELLO {
            return Sni::TooLarge;
        }
        Sni::Incomplete
    }

    /// Steps over the next record header; rejects what is not a handshake record early.
    fn next_record(&mut self) -> Result<(), Sni> {
        let header = &self.buf[self.pos.min(self.buf.len())..];
        if header.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
            return Err(Sni::NotTls);
        }
        if header.get(1).is_some_and(|&major| major != 3) {
            return Err(Sni::NotTls);
        }
        if self.pos + RECORD_HEADER > MAX_CLIENT_HELLO {
            return Err(Sni::TooLarge);
        }
        if header.len() < RECORD_HEADER {
            return Err(self.short());
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(Sni::NotTls);
        }
        self.pos += RECORD_HEADER;
        self.left_in_record = len;
        Ok(())
    }

    /// Consumes `n` handshake bytes, handing each contiguous piece to `sink`.
    fn take(&mut self, mut n: usize, mut sink: impl FnMut(&[u8])) -> Result<(), Sni> {
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

    fn skip(&mut self, n: usize) -> Result<(), Sni> {
        self.take(n, |_| ())
    }

    fn read(&mut self, out: &mut [u8]) -> Result<(), Sni> {
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
    fn reserve(&mut self, n: usize) -> Result<(), Sni> {
        self.left = self.left.checked_sub(n).ok_or(Sni::NotTls)?;
        Ok(())
    }

    fn skip(&mut self, n: usize) -> Result<(), Sni> {
        self.reserve(n)?;
        self.stream.skip(n)
    }

    fn read(&mut self, out: &mut [u8]) -> Result<(), Sni> {
        self.reserve(out.len())?;
        self.stream.read(out)
    }

    fn u8(&mut self) -> Result<u8, Sni> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, Sni> {
        let mut b = [0u8; 2];
        self.read(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
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

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn vectors() -> Vec<(Vec<u8>, Sni)> {
        vec![
            (hex(TLS12_SNI), Sni::Found("example.com".into())),
            (hex(TLS12_NO_SNI), Sni::Absent),
            (hex(TLS13_SNI), Sni::Found("www.example.org".into())),
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
    fn hello(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
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
    fn server_names(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
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
        let ok = Sni::Found("example.com".into());
        assert_eq!(read_sni(&hello(None)), Sni::Absent);
        assert_eq!(read_sni(&hello(Some(&[]))), Sni::Absent);
        assert_eq!(read_sni(&hello(Some(&[server_names(&[(0, b"Example.COM.")])]))), ok);
        let other_type_first = server_names(&[(7, b"x"), (0, b"example.com")]);
        assert_eq!(read_sni(&hello(Some(&[other_type_first]))), ok);
        let first_host_decides = server_names(&[(0, b"bad name"), (0, b"example.com")]);
        assert_eq!(read_sni(&hello(Some(&[first_host_decides]))), Sni::Absent);
        let after_padding = [(21, vec![0; 300]), server_names(&[(0, b"example.com")])];
        assert_eq!(read_sni(&hello(Some(&after_padding))), ok);
        assert_eq!(read_sni(&hello(Some(&[(EXTENSION_SERVER_NAME, Vec::new())]))), Sni::Absent);
        let long = [b'a'; 63].repeat(4);
        let too_long = server_names(&[(0, &long[..])]);
        assert_eq!(read_sni(&hello(Some(&[too_long]))), Sni::Absent);
    }

    #[test]
    fn invalid_names_are_absent() {
        for name in [&b"exa%ple.com"[..], b"a..b", b".a", b".", b"", b"caf\xc3\xa9.fr", b"a\0b"] {
            let bytes = hello(Some(&[server_names(&[(0, name)])]));
            assert_eq!(read_sni(&bytes), Sni::Absent, "{name:?}");
        }
        let label = [b'a'; 64];
        assert_eq!(read_sni(&hello(Some(&[server_names(&[(0, &label[..])])]))), Sni::Absent);
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
                prop_assert!(valid_name(&name), "{:?}", name);
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
