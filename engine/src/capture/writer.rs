//! The capture thread: turns what taps report into frames ([`super::pcap`]) and writes them
//! into one file per session, rotated at `max_file`, within the policy's `max_total`.
//!
//! Invariants: files are created 0600 with O_EXCL, so an existing file is never
//! overwritten (a taken name gets a `~N` suffix); every rotated file starts with its own
//! header and a handshake leading to the current sequence numbers, so each file reads on
//! its own; a capture stopped early ends with a marker packet whose comment says why.

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::pcap::{pcapng, Frame, TcpSynth};
use super::{
    CapturePolicy, CaptureStats, Msg, StopReason, FLUSH_INTERVAL, MARKER_RESERVE, MESSAGE_COST,
};
use crate::side::{Direction, Side};
use crate::sys::{self, Pipe};

/// Buffer of each open capture file.
const FILE_BUFFER: usize = 64 * 1024;
/// Suffixes tried when a file name is taken.
const NAME_ATTEMPTS: usize = 100;
/// At most one warning per this many seconds about captures stopped at `max_total` or by a
/// write error.
const WARN_EVERY_SECS: u64 = 10;

/// Unix second of the last warning about a stopped capture.
static LAST_WARNING: AtomicU64 = AtomicU64::new(0);

/// Warns that captures stop for `reason`, at most once per [`WARN_EVERY_SECS`].
fn warn_stopped(reason: StopReason, dir: &std::path::Path) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST_WARNING.load(Ordering::Relaxed);
    if now < last + WARN_EVERY_SECS
        || LAST_WARNING.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
    {
        return;
    }
    log::warn!(
        "capture into {} stopped ({}): sessions go on uncaptured; see sluice_capture_stopped_total",
        dir.display(),
        reason.as_str()
    );
}

/// One captured session on the capture thread.
struct Capture {
    policy: Arc<CapturePolicy>,
    synth: TcpSynth,
    stem: String,
    file: Option<BufWriter<File>>,
    file_len: u64,
    part: u32,
    stopped: Arc<AtomicBool>,
    halted: bool,
}

struct Writer {
    sessions: HashMap<u64, Capture>,
    stats: Arc<CaptureStats>,
    scratch: Vec<u8>,
}

pub(super) fn run(rx: Receiver<Msg>, stats: Arc<CaptureStats>) {
    let mut w = Writer { sessions: HashMap::new(), stats, scratch: Vec::new() };
    let mut last_flush = Instant::now();
    loop {
        match rx.recv_timeout(FLUSH_INTERVAL) {
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(msg) => w.handle(msg),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            w.flush_all();
            last_flush = Instant::now();
        }
    }
    // Messages already queued (sessions cut by the shutdown) are written before leaving.
    while let Ok(msg) = rx.try_recv() {
        if !matches!(msg, Msg::Shutdown) {
            w.handle(msg);
        }
    }
    w.flush_all();
}

impl Writer {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Open { id, policy, service, client, backend, at, stopped } => {
                self.open(id, policy, &service, client, backend, at, stopped)
            }
            Msg::Data { id, dir, bytes, at } => {
                let cost = bytes.len() as u64 + MESSAGE_COST;
                self.stats.queued.fetch_sub(cost, Ordering::Relaxed);
                self.data(id, dir, &bytes, at);
            }
            Msg::Teed { id, dir, pipe, len, at } => {
                let mut bytes = std::mem::take(&mut self.scratch);
                if read_exactly(&pipe, len, &mut bytes).is_ok() {
                    self.data(id, dir, &bytes, at);
                }
                self.scratch = bytes;
            }
            Msg::Fin { id, dir, at } => self.with(id, |c, stats| {
                let frames = c.synth.fin(dir, at);
                c.frames(&frames, stats, at)
            }),
            Msg::Stop { id, reason, at } => {
                if let Some(c) = self.sessions.get_mut(&id) {
                    c.halt(reason, &self.stats, at);
                }
            }
            Msg::Close { id, resets, at } => self.close(id, resets, at),
            Msg::Shutdown => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        id: u64,
        policy: Arc<CapturePolicy>,
        service: &str,
        client: SocketAddr,
        backend: SocketAddr,
        at: SystemTime,
        stopped: Arc<AtomicBool>,
    ) {
        let stem = file_stem(at, service, client);
        let synth = TcpSynth::new(client, backend);
        let mut c = Capture {
            policy,
            synth,
            stem,
            file: None,
            file_len: 0,
            part: 0,
            stopped,
            halted: false,
        };
        if let Err(reason) = c.rotate(&self.stats, at) {
            c.halt(reason, &self.stats, at);
        }
        self.sessions.insert(id, c);
    }

    fn data(&mut self, id: u64, dir: Direction, bytes: &[u8], at: SystemTime) {
        self.with(id, |c, stats| {
            let frames = c.synth.data(dir, bytes, at);
            c.frames(&frames, stats, at)?;
            stats.payload_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok(())
        });
    }

    /// Runs `f` on a live capture; an error stops it.
    fn with(
        &mut self,
        id: u64,
        f: impl FnOnce(&mut Capture, &CaptureStats) -> Result<(), StopReason>,
    ) {
        let Some(c) = self.sessions.get_mut(&id) else { return };
        if c.halted {
            return;
        }
        let at = SystemTime::now();
        if let Err(reason) = f(c, &self.stats) {
            c.halt(reason, &self.stats, at);
        }
    }

    fn close(&mut self, id: u64, resets: &[Side], at: SystemTime) {
        self.with(id, |c, stats| {
            let frames: Vec<Frame> = resets.iter().map(|&side| c.synth.rst(side, at)).collect();
            c.frames(&frames, stats, at)
        });
        if let Some(mut c) = self.sessions.remove(&id) {
            c.close_file();
        }
    }

    fn flush_all(&mut self) {
        for c in self.sessions.values_mut() {
            if let Some(f) = c.file.as_mut() {
                let _ = f.flush();
            }
        }
    }
}

impl Capture {
    fn frames(
        &mut self,
        frames: &[Frame],
        stats: &CaptureStats,
        at: SystemTime,
    ) -> Result<(), StopReason> {
        for frame in frames {
            let block = pcapng::packet(frame, self.policy.spec.snaplen, None);
            self.write(&block, false, stats, at)?;
        }
        Ok(())
    }

    /// Writes one block, rotating first if it would push the file past `max_file`; a
    /// marker may use the room kept under `max_total` for it.
    fn write(
        &mut self,
        block: &[u8],
        marker: bool,
        stats: &CaptureStats,
        at: SystemTime,
    ) -> Result<(), StopReason> {
        let spec = &self.policy.spec;
        if self.file.is_none() || self.file_len + block.len() as u64 > spec.max_file {
            self.rotate(stats, at)?;
        }
        self.put(block, marker, stats)?;
        stats.packets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Appends bytes to the current file within `max_total`.
    fn put(&mut self, bytes: &[u8], marker: bool, stats: &CaptureStats) -> Result<(), StopReason> {
        let spec = &self.policy.spec;
        let limit = if marker { spec.max_total } else { spec.max_total - MARKER_RESERVE };
        let len = bytes.len() as u64;
        if self.policy.used.load(Ordering::Relaxed) + len > limit {
            return Err(StopReason::MaxTotal);
        }
        let file = self.file.as_mut().ok_or(StopReason::WriteError)?;
        file.write_all(bytes).map_err(|_| StopReason::WriteError)?;
        self.policy.used.fetch_add(len, Ordering::Relaxed);
        self.file_len += len;
        stats.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the current file and starts the next part: header and handshake.
    fn rotate(&mut self, stats: &CaptureStats, at: SystemTime) -> Result<(), StopReason> {
        let policy = self.policy.clone();
        let spec = &policy.spec;
        let mut head = pcapng::file_header(spec.snaplen);
        for frame in self.synth.handshake(at) {
            head.extend(pcapng::packet(&frame, spec.snaplen, None));
        }
        let limit = spec.max_total - MARKER_RESERVE;
        if self.policy.used.load(Ordering::Relaxed) + head.len() as u64 > limit {
            return Err(StopReason::MaxTotal);
        }
        self.close_file();
        self.part += 1;
        let file = create(&spec.dir, &self.stem, self.part).map_err(|e| {
            log::warn!("capture: cannot create a file in {}: {e}", spec.dir.display());
            StopReason::WriteError
        })?;
        stats.files.fetch_add(1, Ordering::Relaxed);
        self.file = Some(BufWriter::with_capacity(FILE_BUFFER, file));
        self.file_len = 0;
        self.put(&head, false, stats)?;
        stats.packets.fetch_add(3, Ordering::Relaxed);
        Ok(())
    }

    /// Stops this capture: says so in a marker packet and in the counters.
    fn halt(&mut self, reason: StopReason, stats: &CaptureStats, at: SystemTime) {
        if self.halted {
            return;
        }
        self.halted = true;
        self.stopped.store(true, Ordering::Relaxed);
        stats.count_stop(reason);
        if matches!(reason, StopReason::MaxTotal | StopReason::WriteError) {
            warn_stopped(reason, &self.policy.spec.dir);
        }
        if self.file.is_some() {
            let text = format!(
                "sluice: capture stopped ({}); the session went on uncaptured",
                reason.as_str()
            );
            let frame = self.synth.ack(Side::Client, at);
            let block = pcapng::packet(&frame, self.policy.spec.snaplen, Some(&text));
            // The marker never rotates: it belongs at the end of the file it ends.
            let _ = self.put(&block, true, stats);
        }
        self.close_file();
    }

    fn close_file(&mut self) {
        if let Some(mut f) = self.file.take() {
            if f.flush().is_err() {
                log::warn!("capture: cannot finish a file of {}", self.stem);
            }
        }
    }
}

/// Reads exactly `len` bytes from a capture pipe (they are there: the tee completed before
/// its message was sent).
fn read_exactly(pipe: &Pipe, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.resize(len, 0);
    let mut got = 0;
    while got < len {
        match sys::read(pipe.read_end(), &mut out[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.truncate(got);
    if got == len {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "capture pipe came up short"))
    }
}

/// Creates part `part` of a session's capture: 0600, never over an existing file.
fn create(dir: &PathBuf, stem: &str, part: u32) -> io::Result<File> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let base = if part <= 1 { stem.to_string() } else { format!("{stem}-{part}") };
    let mut last = None;
    for attempt in 0..NAME_ATTEMPTS {
        let name = if attempt == 0 {
            format!("{base}.pcapng")
        } else {
            format!("{base}~{attempt}.pcapng")
        };
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(dir.join(name));
        match opened {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free file name")))
}

/// `20261122T021503.123Z-web-127.0.0.2_40000`: when, which service, which client.
pub(crate) fn file_stem(at: SystemTime, service: &str, client: SocketAddr) -> String {
    let client = format!("{}_{}", client.ip(), client.port());
    format!("{}-{}-{}", utc_stamp(at), clean(service), clean(&client))
}

/// Keeps letters, digits, `.`, `_` and `-`; anything else (`:` of IPv6, `/`) becomes `_`.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect()
}

/// UTC time as `YYYYMMDDTHHMMSS.mmmZ`.
fn utc_stamp(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_say_when_which_service_and_which_client() {
        let at = UNIX_EPOCH + Duration::from_millis(1_795_400_103_123);
        let stem = file_stem(at, "web/api", "[::1]:4000".parse().unwrap());
        assert_eq!(stem, "20261123T021503.123Z-web_api-__1_4000");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sluice-capture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s.pcapng"), b"keep").unwrap();
        let f = create(&dir, "s", 1).unwrap();
        drop(f);
        assert_eq!(std::fs::read(dir.join("s.pcapng")).unwrap(), b"keep");
        let mode = std::fs::metadata(dir.join("s~1.pcapng")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        create(&dir, "s", 2).unwrap();
        assert!(dir.join("s-2.pcapng").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
