//! Capture of chosen sessions to pcapng files that Wireshark and tcpdump open: each
//! direction's payload as TCP segments between the real client and backend addresses, with
//! a synthesized handshake, FIN and RST (see [`pcap`]).
//!
//! Roles: a rule or service names a [`CapturePolicy`]; the firewall's decision gives an
//! allowed session a [`Tap`], the per-session handle drivers call once per direction when
//! bytes move ([`Tap::copied`] after a send on the copy relays, [`Tap::teed`] on the splice
//! relay, which duplicates the relay pipe into a capture pipe with tee(2): still zero-copy)
//! and when a FIN is forwarded. The tap hands everything to one capture thread per process
//! (the only engine code that writes files), which synthesizes frames and writes them.
//!
//! Invariants: a tap never blocks or slows its session. Copies are admitted only within a
//! process-wide byte budget ([`DEFAULT_CAPTURE_QUEUE`]) and tees only while the capture
//! pipe has room; otherwise capture stops for that session, a marker (a packet with a
//! comment) ends its file, and `stopped{reason}` counts it. The same happens when the
//! policy's `max_total` is reached or a write fails. Files are created 0600 with O_EXCL
//! (never overwriting) and rotated at `max_file`. Sessions not captured pay one branch.

pub mod pcap;
mod writer;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;

use crate::record::CloseReason;
use crate::side::{Direction, Side};
use crate::sys::{self, Pipe};

/// A capture file is rotated before it would grow past this many bytes.
pub const DEFAULT_MAX_FILE: u64 = 100_000_000;
/// Capture under one policy stops once its files would hold more than this many bytes.
pub const DEFAULT_MAX_TOTAL: u64 = 10_000_000_000;
/// Bytes of each frame kept (the rest is cut, its original length recorded).
pub const DEFAULT_SNAPLEN: u32 = pcap::DEFAULT_SNAPLEN;
/// Capacity asked for each capture pipe (splice relay), per captured direction.
pub const DEFAULT_CAPTURE_PIPE: usize = 1 << 20;
/// Bytes copied for capture (copy relays) that may wait for the capture thread, across the
/// process; a copy beyond it stops capture for its session.
pub const DEFAULT_CAPTURE_QUEUE: u64 = 64 << 20;
/// What one copy message counts against [`DEFAULT_CAPTURE_QUEUE`] besides its bytes, so that
/// a peer sending many tiny chunks cannot queue unbounded message overhead.
pub const MESSAGE_COST: u64 = 128;
/// How often the capture thread flushes files of sessions still running.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Sessions captured at the same time, across the process: each holds an open file and, on
/// the splice relay, up to two capture pipes. A session beyond it is not captured (and
/// counted), so that many connections to a captured service cannot exhaust fds or memory.
pub const DEFAULT_MAX_CAPTURES: u64 = 256;
/// Room kept under `max_total` for the marker that ends a stopped capture.
pub const MARKER_RESERVE: u64 = 512;

/// What a `capture = { ... }` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    pub dir: PathBuf,
    pub max_file: u64,
    pub max_total: u64,
    pub snaplen: u32,
}

impl CaptureSpec {
    /// A spec with the documented defaults.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            max_file: DEFAULT_MAX_FILE,
            max_total: DEFAULT_MAX_TOTAL,
            snaplen: DEFAULT_SNAPLEN,
        }
    }
}

/// A capture configuration as the tables hold it: its spec, the bytes its files hold
/// (shared across reloads by the control crate, so `max_total` spans them), and the
/// capture thread.
#[derive(Debug)]
pub struct CapturePolicy {
    pub spec: CaptureSpec,
    pub used: Arc<AtomicU64>,
    capturer: Capturer,
}

impl CapturePolicy {
    pub fn new(spec: CaptureSpec, used: Arc<AtomicU64>, capturer: Capturer) -> Self {
        Self { spec, used, capturer }
    }
}

/// Why capture stopped for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The copy budget ([`DEFAULT_CAPTURE_QUEUE`]) was used up: the capture thread is behind.
    QueueFull,
    /// The capture pipe was full (splice relay): the capture thread is behind.
    PipeFull,
    /// The policy's `max_total` was reached.
    MaxTotal,
    /// A file could not be created or written.
    WriteError,
    /// [`DEFAULT_MAX_CAPTURES`] sessions were being captured already: not captured at all.
    TooMany,
}

impl StopReason {
    pub const ALL: [StopReason; 5] = [
        StopReason::QueueFull,
        StopReason::PipeFull,
        StopReason::MaxTotal,
        StopReason::WriteError,
        StopReason::TooMany,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::QueueFull => "queue_full",
            StopReason::PipeFull => "pipe_full",
            StopReason::MaxTotal => "max_total",
            StopReason::WriteError => "write_error",
            StopReason::TooMany => "too_many",
        }
    }
}

/// Capture counters for the whole process. Monotonic except `queued`.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Sessions whose capture began (a file was asked for).
    pub sessions: AtomicU64,
    /// Payload bytes written into capture files.
    pub payload_bytes: AtomicU64,
    /// Bytes written into capture files (headers and framing included).
    pub bytes: AtomicU64,
    pub packets: AtomicU64,
    pub files: AtomicU64,
    /// Captures stopped early, by [`StopReason`] (index in [`StopReason::ALL`]).
    pub stopped: [AtomicU64; StopReason::ALL.len()],
    /// Bytes copied and not yet written (a gauge).
    pub queued: AtomicU64,
    /// Sessions being captured now (a gauge).
    pub active: AtomicU64,
}

impl CaptureStats {
    pub fn stopped(&self, reason: StopReason) -> u64 {
        let i = StopReason::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.stopped[i].load(Ordering::Relaxed)
    }

    fn count_stop(&self, reason: StopReason) {
        let i = StopReason::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.stopped[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// What taps tell the capture thread.
#[derive(Debug)]
enum Msg {
    Open {
        id: u64,
        policy: Arc<CapturePolicy>,
        service: Arc<str>,
        client: SocketAddr,
        backend: SocketAddr,
        at: SystemTime,
        stopped: Arc<AtomicBool>,
    },
    Data {
        id: u64,
        dir: Direction,
        bytes: Vec<u8>,
        at: SystemTime,
    },
    Teed {
        id: u64,
        dir: Direction,
        pipe: Arc<Pipe>,
        len: usize,
        at: SystemTime,
    },
    Fin {
        id: u64,
        dir: Direction,
        at: SystemTime,
    },
    Stop {
        id: u64,
        reason: StopReason,
        at: SystemTime,
    },
    Close {
        id: u64,
        resets: &'static [Side],
        at: SystemTime,
    },
    Shutdown,
}

/// The capture thread and the way to it; cheap to clone.
#[derive(Debug, Clone)]
pub struct Capturer {
    tx: Sender<Msg>,
    stats: Arc<CaptureStats>,
    next_id: Arc<AtomicU64>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Capturer {
    /// Starts the capture thread, counting into `stats`.
    pub fn start(stats: Arc<CaptureStats>) -> io::Result<Capturer> {
        // Unbounded, yet bounded in practice: data messages are admitted only within the
        // copy budget or the capture pipe's room, and each session sends a handful of
        // others.
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-capture".into())
            .spawn(move || writer::run(rx, thread_stats))?;
        Ok(Capturer {
            tx,
            stats,
            next_id: Arc::default(),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }

    /// Finishes every file (what the workers sent before is written first) and waits up to
    /// `timeout` for the capture thread to end.
    pub fn stop(&self, timeout: Duration) {
        let _ = self.tx.send(Msg::Shutdown);
        let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) else { return };
        let deadline = std::time::Instant::now() + timeout;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("capture thread did not finish its files within {timeout:?}");
        }
    }
}

/// One session's capture, owned by the session. Every method returns at once.
#[derive(Debug)]
pub struct Tap {
    id: u64,
    policy: Arc<CapturePolicy>,
    service: Arc<str>,
    /// Set by the capture thread when it stops this capture (max_total, write error).
    stopped: Arc<AtomicBool>,
    opened: bool,
    /// Capture stopped: nothing more is sent.
    halted: bool,
    /// The capture pipe of each direction (splice relay), made on first use.
    pipes: [Option<Arc<Pipe>>; 2],
}

fn lane(dir: Direction) -> usize {
    match dir {
        Direction::Up => 0,
        Direction::Down => 1,
    }
}

impl Tap {
    /// A tap for a session of `service` under `policy`; nothing is sent before [`open`].
    ///
    /// [`open`]: Tap::open
    pub fn new(policy: Arc<CapturePolicy>, service: Arc<str>) -> Tap {
        let id = policy.capturer.next_id.fetch_add(1, Ordering::Relaxed);
        let stopped = Arc::default();
        Tap { id, policy, service, stopped, opened: false, halted: false, pipes: [None, None] }
    }

    /// The backend connection is made: the capture begins with a handshake.
    pub fn open(&mut self, client: SocketAddr, backend: SocketAddr) {
        if self.opened {
            return;
        }
        let stats = &self.policy.capturer.stats;
        if stats.active.fetch_add(1, Ordering::Relaxed) >= DEFAULT_MAX_CAPTURES {
            stats.active.fetch_sub(1, Ordering::Relaxed);
            stats.count_stop(StopReason::TooMany);
            self.halted = true;
            return;
        }
        self.opened = true;
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.send(Msg::Open {
            id: self.id,
            policy: self.policy.clone(),
            service: self.service.clone(),
            client,
            backend,
            at: SystemTime::now(),
            stopped: self.stopped.clone(),
        });
    }

    fn live(&mut self) -> bool {
        if self.halted || !self.opened {
            return false;
        }
        if self.stopped.load(Ordering::Relaxed) {
            self.halted = true;
            self.pipes = [None, None];
            return false;
        }
        true
    }

    /// `bytes` were just sent on in `dir` (copy relays).
    pub fn copied(&mut self, dir: Direction, bytes: &[u8]) {
        if bytes.is_empty() || !self.live() {
            return;
        }
        let stats = &self.policy.capturer.stats;
        let cost = bytes.len() as u64 + MESSAGE_COST;
        if stats.queued.fetch_add(cost, Ordering::Relaxed) + cost > DEFAULT_CAPTURE_QUEUE {
            stats.queued.fetch_sub(cost, Ordering::Relaxed);
            return self.stop(StopReason::QueueFull);
        }
        let msg = Msg::Data { id: self.id, dir, bytes: bytes.to_vec(), at: SystemTime::now() };
        self.send(msg);
    }

    /// `relay` holds exactly `len` bytes just read in `dir`, not yet sent on (splice
    /// relay): duplicate them into this direction's capture pipe with tee(2).
    pub fn teed(&mut self, dir: Direction, relay: &Pipe, len: usize) {
        if len == 0 || !self.live() {
            return;
        }
        let pipe = match &self.pipes[lane(dir)] {
            Some(p) => p.clone(),
            None => match Pipe::new(DEFAULT_CAPTURE_PIPE) {
                Ok(p) => self.pipes[lane(dir)].insert(Arc::new(p)).clone(),
                Err(_) => return self.stop(StopReason::PipeFull),
            },
        };
        let at = SystemTime::now();
        let mut done = 0;
        while done < len {
            match sys::tee(relay.read_end(), pipe.write_end(), len) {
                // tee always starts at the head of the relay pipe: only a whole copy is
                // usable, so a short one means the capture pipe is full.
                Ok(n) if n == len => done = n,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if done < len {
            // What a short tee put in the capture pipe is never read: the pipe goes away.
            self.pipes[lane(dir)] = None;
            return self.stop(StopReason::PipeFull);
        }
        self.send(Msg::Teed { id: self.id, dir, pipe, len, at });
    }

    /// The end of stream of `dir` was forwarded.
    pub fn fin(&mut self, dir: Direction) {
        if self.live() {
            self.send(Msg::Fin { id: self.id, dir, at: SystemTime::now() });
        }
    }

    /// The session ended for `reason`; its capture file is finished.
    pub fn close(mut self, reason: CloseReason) {
        self.finish(resets_of(reason));
    }

    fn finish(&mut self, resets: &'static [Side]) {
        if !self.opened {
            return;
        }
        self.opened = false;
        self.pipes = [None, None];
        self.policy.capturer.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.send(Msg::Close { id: self.id, resets, at: SystemTime::now() });
    }

    fn stop(&mut self, reason: StopReason) {
        self.halted = true;
        self.pipes = [None, None];
        self.send(Msg::Stop { id: self.id, reason, at: SystemTime::now() });
    }

    fn send(&self, msg: Msg) {
        // The capture thread outlives the workers; if it is gone, capture is simply lost.
        let _ = self.policy.capturer.tx.send(msg);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.finish(&[]);
    }
}

/// Who resets the synthesized connection when a session ends for `reason`.
fn resets_of(reason: CloseReason) -> &'static [Side] {
    match reason {
        CloseReason::ClientRst => &[Side::Client],
        CloseReason::BackendRst => &[Side::Backend],
        r if r.aborts() => &[Side::Backend, Side::Client],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::Receiver;

    /// A tap whose capture thread never drains: what it sends stays in `rx`.
    fn stalled_tap() -> (Tap, Receiver<Msg>, Arc<CaptureStats>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(CaptureStats::default());
        let capturer = Capturer {
            tx,
            stats: stats.clone(),
            next_id: Arc::default(),
            thread: Arc::new(Mutex::new(None)),
        };
        let spec = CaptureSpec::new(PathBuf::from("/nonexistent"));
        let policy = Arc::new(CapturePolicy::new(spec, Arc::default(), capturer));
        let mut tap = Tap::new(policy, "svc".into());
        tap.open("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        assert!(matches!(rx.try_recv(), Ok(Msg::Open { .. })));
        (tap, rx, stats)
    }

    fn kinds(rx: &Receiver<Msg>) -> (usize, Vec<StopReason>) {
        let (mut data, mut stops) = (0, Vec::new());
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Data { .. } | Msg::Teed { .. } => data += 1,
                Msg::Stop { reason, .. } => stops.push(reason),
                _ => {}
            }
        }
        (data, stops)
    }

    #[test]
    fn a_full_capture_pipe_stops_capture_at_once_and_for_good() {
        let (mut tap, rx, _) = stalled_tap();
        let relay = Pipe::new(1 << 16).unwrap();
        let chunk = vec![5u8; 1 << 16];
        let written = crate::sys::pipe::write_all_to_pipe(&relay, &chunk);
        assert_eq!(written, chunk.len());
        let started = std::time::Instant::now();
        for _ in 0..64 {
            tap.teed(Direction::Up, &relay, chunk.len());
        }
        assert!(started.elapsed() < Duration::from_secs(1), "tee never waits");
        let (teed, stops) = kinds(&rx);
        let capacity = DEFAULT_CAPTURE_PIPE >> 16;
        assert!(teed >= 1 && teed <= capacity, "{teed} tees of 64 KiB into the capture pipe");
        assert_eq!(stops, vec![StopReason::PipeFull]);
        assert_eq!(relay.buffered().unwrap(), chunk.len(), "the relay's bytes stay for the relay");
        tap.copied(Direction::Down, b"later");
        tap.fin(Direction::Up);
        assert_eq!(kinds(&rx), (0, vec![]), "nothing more after the stop");
    }

    #[test]
    fn copies_beyond_the_budget_stop_capture() {
        let (mut tap, rx, stats) = stalled_tap();
        let chunk = vec![1u8; (1 << 20) - MESSAGE_COST as usize];
        let rounds = (DEFAULT_CAPTURE_QUEUE >> 20) as usize;
        for _ in 0..rounds + 3 {
            tap.copied(Direction::Down, &chunk);
        }
        assert_eq!(kinds(&rx), (rounds, vec![StopReason::QueueFull]));
        assert_eq!(stats.queued.load(Ordering::Relaxed), DEFAULT_CAPTURE_QUEUE);
    }

    #[test]
    fn tiny_copies_count_their_overhead_against_the_budget() {
        let (mut tap, rx, _) = stalled_tap();
        let most = DEFAULT_CAPTURE_QUEUE / (1 + MESSAGE_COST);
        for _ in 0..most + 1 {
            tap.copied(Direction::Up, b"x");
        }
        assert_eq!(kinds(&rx), (most as usize, vec![StopReason::QueueFull]));
    }

    #[test]
    fn sessions_beyond_the_limit_are_not_captured_and_counted() {
        let (tap, rx, stats) = stalled_tap();
        let mut taps = vec![tap];
        for _ in 1..DEFAULT_MAX_CAPTURES + 2 {
            let mut t = Tap::new(taps[0].policy.clone(), "svc".into());
            t.open("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
            taps.push(t);
        }
        let opens = std::iter::from_fn(|| rx.try_recv().ok())
            .filter(|m| matches!(m, Msg::Open { .. }))
            .count() as u64;
        assert_eq!(opens, DEFAULT_MAX_CAPTURES - 1, "the first one was opened before");
        assert_eq!(stats.stopped(StopReason::TooMany), 2);
        assert_eq!(stats.active.load(Ordering::Relaxed), DEFAULT_MAX_CAPTURES);
        taps.clear();
        assert_eq!(stats.active.load(Ordering::Relaxed), 0, "closing frees the places");
    }

    #[test]
    fn the_capture_thread_stopping_a_capture_silences_its_tap() {
        let (mut tap, rx, _) = stalled_tap();
        tap.stopped.store(true, Ordering::Relaxed);
        tap.copied(Direction::Up, b"x");
        assert_eq!(kinds(&rx), (0, vec![]));
        drop(tap);
        assert!(matches!(rx.try_recv(), Ok(Msg::Close { .. })), "the file is still finished");
    }
}
