//! Deterministic test data. A [`Payload`] is a pseudo-random byte stream named by a seed and
//! a length: byte `i` depends only on the seed and `i`, so any chunking of the stream yields
//! the same bytes, and a receiver can regenerate what it should have got without the sender
//! keeping a copy.

use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Bytes written per `write` call by [`Payload::write_to`].
const CHUNK: usize = 64 * 1024;

/// A pseudo-random stream of `len` bytes, read from the front.
#[derive(Debug, Clone)]
pub struct Payload {
    seed: u64,
    len: u64,
    pos: u64,
}

impl Payload {
    pub fn new(seed: u64, len: u64) -> Self {
        Self { seed, len, pos: 0 }
    }

    /// Total length of the stream.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not yet produced.
    pub fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Fills the front of `buf` with the next bytes; returns how many (0 at the end).
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.remaining()) as usize;
        let mut i = 0;
        while i < n {
            let at = self.pos + i as u64;
            let word = mix(self.seed, at / 8).to_le_bytes();
            let offset = (at % 8) as usize;
            let take = (8 - offset).min(n - i);
            buf[i..i + take].copy_from_slice(&word[offset..offset + take]);
            i += take;
        }
        self.pos += n as u64;
        n
    }

    /// The whole stream in memory (for small payloads).
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Payload::new(seed, len as u64).fill(&mut v);
        v
    }

    /// SHA-256 of the whole stream.
    pub fn sha256(seed: u64, len: u64) -> Digest {
        let mut p = Payload::new(seed, len);
        let mut hasher = Sha256::new();
        let mut buf = vec![0; CHUNK];
        loop {
            let n = p.fill(&mut buf);
            if n == 0 {
                return hasher.finalize().into();
            }
            hasher.update(&buf[..n]);
        }
    }

    /// Writes the rest of the stream to `w`; returns the SHA-256 of what was written.
    /// `progress` is called with the running total after every write.
    pub fn write_to(
        &mut self,
        w: &mut impl Write,
        mut progress: impl FnMut(u64),
    ) -> io::Result<Digest> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0; CHUNK];
        let mut written = 0u64;
        loop {
            let n = self.fill(&mut buf);
            if n == 0 {
                return Ok(hasher.finalize().into());
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])?;
            written += n as u64;
            progress(written);
        }
    }
}

/// splitmix64 of the seed and word index: a fast, well-mixed 64-bit value per 8 bytes.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checks a received stream against the payload it should be, chunk by chunk, and remembers
/// where it first differed.
#[derive(Debug)]
pub struct Verifier {
    expected: Payload,
    scratch: Vec<u8>,
    received: u64,
    first_mismatch: Option<u64>,
}

impl Verifier {
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            expected: Payload::new(seed, len),
            scratch: Vec::new(),
            received: 0,
            first_mismatch: None,
        }
    }

    /// Feeds the next received bytes.
    pub fn update(&mut self, chunk: &[u8]) {
        self.scratch.resize(chunk.len(), 0);
        let n = self.expected.fill(&mut self.scratch);
        if self.first_mismatch.is_none() {
            let differs = chunk[..n].iter().zip(&self.scratch[..n]).position(|(a, b)| a != b);
            if let Some(i) = differs {
                self.first_mismatch = Some(self.received + i as u64);
            } else if n < chunk.len() {
                self.first_mismatch = Some(self.received + n as u64);
            }
        }
        self.received += chunk.len() as u64;
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// `Ok` if exactly the whole payload was received; otherwise what went wrong.
    pub fn finish(&self) -> Result<(), String> {
        if let Some(at) = self.first_mismatch {
            return Err(format!("received stream differs from the payload at byte {at}"));
        }
        if self.received != self.expected.len() {
            return Err(format!("received {} of {} bytes", self.received, self.expected.len()));
        }
        Ok(())
    }

    /// Whether every byte received so far matches the payload (a correct prefix).
    pub fn is_prefix(&self) -> bool {
        self.first_mismatch.is_none()
    }
}

/// Lower-case hex of a digest, for messages.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
