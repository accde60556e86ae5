//! Connection-log sinks and the log thread. Workers send records over a bounded channel
//! (a full channel drops and counts, never blocks a worker); the log thread hands each
//! record to every sink whose filter accepts it.
//!
//! Sinks: a file (JSON lines or a text template; reopened on SIGUSR1 for logrotate), syslog
//! RFC 5424 over a unix datagram socket (`/dev/log`), UDP or TCP (octet-counted frames),
//! stdout, and the process log (the default when no `[[log]]` is configured). Network sinks
//! never block the log thread: a datagram that cannot be sent now, or a TCP frame that does
//! not fit the sink's pending buffer, is dropped and counted for that sink.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::history::Denials;

use crossbeam_channel::Receiver;
use sluice_engine::events::Batch;
use sluice_engine::record::{Record, RecordKind, Verdict};

use crate::clock;
use crate::logger::rfc3339;
use crate::records::{json_line, Template};

/// How often the log thread flushes files and retries network sinks when idle.
const TICK: Duration = Duration::from_millis(200);
/// Bytes a TCP syslog sink may hold while its peer is slow; beyond that records are dropped.
pub const TCP_PENDING_LIMIT: usize = 256 * 1024;
/// Wait before reconnecting a TCP syslog sink.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(PathBuf),
    Stdout,
    /// The process log (stderr), through the logger.
    ProcessLog,
    Syslog {
        addr: SyslogAddr,
        facility: u8,
        tag: String,
    },
}

/// A syslog receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogAddr {
    Unix(PathBuf),
    Udp(SocketAddr),
    Tcp(SocketAddr),
}

impl SyslogAddr {
    /// Parses `/dev/log`, `unix:/path`, `udp:HOST:PORT` or `tcp:HOST:PORT`.
    pub fn parse(text: &str) -> Result<SyslogAddr, String> {
        let bad = || {
            format!("{text:?} is not a syslog address such as \"/dev/log\", \"unix:/path\", \"udp:127.0.0.1:514\" or \"tcp:127.0.0.1:601\"")
        };
        if let Some(p) = text.strip_prefix("unix:") {
            return Ok(SyslogAddr::Unix(p.into()));
        }
        if text.starts_with('/') {
            return Ok(SyslogAddr::Unix(text.into()));
        }
        let (proto, addr) = text.split_once(':').ok_or_else(bad)?;
        let addr: SocketAddr = addr.parse().map_err(|_| bad())?;
        match proto {
            "udp" => Ok(SyslogAddr::Udp(addr)),
            "tcp" => Ok(SyslogAddr::Tcp(addr)),
            _ => Err(bad()),
        }
    }
}

/// Syslog facility number by name (RFC 5424 table 1).
pub fn facility(name: &str) -> Result<u8, String> {
    const NAMES: [&str; 24] = [
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2",
        "local3", "local4", "local5", "local6", "local7",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u8).ok_or_else(|| {
        format!("unknown syslog facility {name:?}; expected one of {}", NAMES.join(", "))
    })
}

/// How records are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Json,
    Text(Template),
}

/// Which records a sink takes; an empty set means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub kinds: HashSet<RecordKind>,
    pub verdicts: HashSet<Verdict>,
    pub services: HashSet<String>,
    pub reasons: HashSet<String>,
}

impl Filter {
    pub fn accepts(&self, r: &Record) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&r.kind))
            && (self.verdicts.is_empty() || self.verdicts.contains(&r.verdict))
            && (self.services.is_empty() || self.services.contains(&*r.service))
            && (self.reasons.is_empty()
                || r.reason.is_some_and(|x| self.reasons.contains(x.as_str())))
    }
}

/// A validated `[[log]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    pub name: String,
    pub target: Target,
    pub format: Format,
    pub filter: Filter,
}

/// What one sink wrote and dropped, for the admin API.
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub name: String,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

enum Output {
    File { path: PathBuf, out: BufWriter<File> },
    Stdout(BufWriter<io::Stdout>),
    ProcessLog,
    Unix { socket: UnixDatagram, path: PathBuf },
    Udp(UdpSocket),
    Tcp { addr: SocketAddr, stream: Option<TcpStream>, pending: Vec<u8>, retry_at: Instant },
}

/// An open sink.
pub struct Sink {
    spec: SinkSpec,
    output: Output,
    counters: Arc<SinkCounters>,
    hostname: String,
    /// `[records] instance`: names this process in every record.
    instance: Arc<str>,
}

fn open_file(path: &PathBuf) -> io::Result<BufWriter<File>> {
    let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
    Ok(BufWriter::with_capacity(64 * 1024, file))
}

impl Sink {
    /// Opens the sink's output (creates the file, binds the socket); its records name
    /// `instance`.
    pub fn open(spec: SinkSpec, instance: Arc<str>) -> Result<Sink, String> {
        let output = match &spec.target {
            Target::File(path) => Output::File {
                path: path.clone(),
                out: open_file(path)
                    .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?,
            },
            Target::Stdout => Output::Stdout(BufWriter::new(io::stdout())),
            Target::ProcessLog => Output::ProcessLog,
            Target::Syslog { addr: SyslogAddr::Unix(path), .. } => {
                let socket = UnixDatagram::unbound()
                    .map_err(|e| format!("cannot create a unix socket: {e}"))?;
                socket.set_nonblocking(true).map_err(|e| e.to_string())?;
                Output::Unix { socket, path: path.clone() }
            }
            Target::Syslog { addr: SyslogAddr::Udp(addr), .. } => {
                let local: SocketAddr =
                    if addr.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }
                        .map_err(|_| "bad address".to_string())?;
                let socket =
                    UdpSocket::bind(local).map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
                socket.set_nonblocking(true).map_err(|e| e.to_string())?;
                Output::Udp(socket)
            }
            Target::Syslog { addr: SyslogAddr::Tcp(addr), .. } => Output::Tcp {
                addr: *addr,
                stream: None,
                pending: Vec::new(),
                retry_at: Instant::now(),
            },
        };
        let counters = Arc::new(SinkCounters { name: spec.name.clone(), ..Default::default() });
        let hostname = host_name().map_or_else(|| "-".into(), |h| syslog_hostname(&h));
        Ok(Sink { spec, output, counters, hostname, instance })
    }

    pub fn counters(&self) -> Arc<SinkCounters> {
        self.counters.clone()
    }

    fn render(&self, r: &Record) -> String {
        match &self.spec.format {
            Format::Json => json_line(r, &self.instance),
            Format::Text(t) => t.render(r, &self.instance),
        }
    }

    fn syslog_frame(&self, r: &Record, msg: &str) -> String {
        let Target::Syslog { facility, tag, .. } = &self.spec.target else {
            return msg.to_string();
        };
        let severity = if r.kind == RecordKind::Deny { 5 } else { 6 };
        let pri = u32::from(*facility) * 8 + severity;
        let pid = std::process::id();
        format!(
            "<{pri}>1 {} {} {tag} {pid} {} - {msg}",
            rfc3339(r.end),
            self.hostname,
            r.kind.as_str()
        )
    }

    /// Writes one record; failures are counted as drops.
    fn write(&mut self, r: &Record) {
        if !self.spec.filter.accepts(r) {
            return;
        }
        if matches!(self.output, Output::ProcessLog) && !log::log_enabled!(log::Level::Info) {
            return;
        }
        let msg = self.render(r);
        let ok = match &mut self.output {
            Output::File { out, .. } => writeln!(out, "{msg}").is_ok(),
            Output::Stdout(out) => writeln!(out, "{msg}").is_ok(),
            Output::ProcessLog => {
                log::info!("{msg}");
                true
            }
            Output::Unix { .. } | Output::Udp(_) | Output::Tcp { .. } => {
                let frame = self.syslog_frame(r, &msg);
                self.send_network(frame)
            }
        };
        let counter = if ok { &self.counters.written } else { &self.counters.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn send_network(&mut self, frame: String) -> bool {
        match &mut self.output {
            Output::Unix { socket, path } => socket.send_to(frame.as_bytes(), &*path).is_ok(),
            Output::Udp(socket) => match &self.spec.target {
                Target::Syslog { addr: SyslogAddr::Udp(addr), .. } => {
                    socket.send_to(frame.as_bytes(), addr).is_ok()
                }
                _ => false,
            },
            Output::Tcp { pending, .. } => {
                let framed = format!("{} {frame}", frame.len());
                if pending.len() + framed.len() > TCP_PENDING_LIMIT {
                    return false;
                }
                pending.extend_from_slice(framed.as_bytes());
                self.pump_tcp();
                true
            }
            _ => false,
        }
    }

    /// Sends what a TCP sink holds, connecting (or reconnecting) when needed.
    fn pump_tcp(&mut self) {
        let Output::Tcp { addr, stream, pending, retry_at } = &mut self.output else { return };
        if stream.is_none() && !pending.is_empty() && Instant::now() >= *retry_at {
            match TcpStream::connect_timeout(addr, Duration::from_millis(200))
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
            {
                Ok(s) => *stream = Some(s),
                Err(_) => *retry_at = clock::after(Instant::now(), RECONNECT_AFTER),
            }
        }
        let Some(s) = stream else { return };
        while !pending.is_empty() {
            match s.write(pending) {
                Ok(0) => break,
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    *stream = None;
                    *retry_at = clock::after(Instant::now(), RECONNECT_AFTER);
                    break;
                }
            }
        }
    }

    fn flush(&mut self) {
        match &mut self.output {
            Output::File { out, .. } => {
                let _ = out.flush();
            }
            Output::Stdout(out) => {
                let _ = out.flush();
            }
            Output::Tcp { .. } => self.pump_tcp(),
            _ => {}
        }
    }

    /// Reopens a file sink (after logrotate renamed the file).
    fn reopen(&mut self) {
        if let Output::File { path, out } = &mut self.output {
            let _ = out.flush();
            match open_file(path) {
                Ok(f) => *out = f,
                Err(e) => log::error!("cannot reopen log file {}: {e}", path.display()),
            }
        }
    }
}

/// The HOSTNAME of a syslog frame: the host's name if it is 1 to 255 printable US-ASCII
/// characters (RFC 5424 6.2.4), else the nil value `-`.
/// This host's name, as the kernel has it.
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string())
}

fn syslog_hostname(name: &str) -> String {
    let ok = !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| (33..=126).contains(&b));
    if ok {
        name.to_string()
    } else {
        "-".to_string()
    }
}

/// What the control thread tells the log thread.
pub enum LogCommand {
    /// Reopen files (SIGUSR1).
    Reopen,
    /// Use these sinks from now on (reload).
    Replace(Vec<Sink>),
}

/// Runs the log thread until every record sender has gone.
pub fn run_log_thread(
    records: Receiver<Batch>,
    commands: Receiver<LogCommand>,
    mut sinks: Vec<Sink>,
    denials: &Denials,
) {
    loop {
        crossbeam_channel::select! {
            recv(records) -> r => match r {
                Ok(batch) => {
                    batch.iter().for_each(|r| dispatch(&mut sinks, r, denials));
                    for batch in records.try_iter().take(64) {
                        batch.iter().for_each(|r| dispatch(&mut sinks, r, denials));
                    }
                    sinks.iter_mut().for_each(Sink::flush);
                }
                Err(_) => {
                    sinks.iter_mut().for_each(Sink::flush);
                    return;
                }
            },
            recv(commands) -> c => match c {
                Ok(LogCommand::Reopen) => sinks.iter_mut().for_each(Sink::reopen),
                Ok(LogCommand::Replace(next)) => {
                    sinks.iter_mut().for_each(Sink::flush);
                    sinks = next;
                }
                Err(_) => {}
            },
            default(TICK) => sinks.iter_mut().for_each(Sink::flush),
        }
    }
}

fn dispatch(sinks: &mut [Sink], r: &Record, denials: &Denials) {
    denials.note(r);
    for sink in sinks.iter_mut() {
        sink.write(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::tests::sample;

    #[test]
    fn syslog_addresses_parse() {
        assert_eq!(SyslogAddr::parse("/dev/log"), Ok(SyslogAddr::Unix("/dev/log".into())));
        assert_eq!(
            SyslogAddr::parse("udp:127.0.0.1:514"),
            Ok(SyslogAddr::Udp("127.0.0.1:514".parse().unwrap()))
        );
        assert_eq!(
            SyslogAddr::parse("tcp:[::1]:601"),
            Ok(SyslogAddr::Tcp("[::1]:601".parse().unwrap()))
        );
        assert!(SyslogAddr::parse("smtp:1.2.3.4:25").is_err());
        assert_eq!(facility("local0"), Ok(16));
        assert!(facility("local9").is_err());
    }

    #[test]
    fn filters_combine_their_criteria() {
        let r = sample();
        let mut f = Filter::default();
        assert!(f.accepts(&r));
        f.kinds.insert(RecordKind::Deny);
        assert!(!f.accepts(&r));
        f.kinds.insert(RecordKind::Close);
        f.reasons.insert("backend_fin".into());
        assert!(f.accepts(&r));
        f.services.insert("db".into());
        assert!(!f.accepts(&r));
    }

    #[test]
    fn syslog_frames_follow_rfc5424() {
        let spec = SinkSpec {
            name: "s".into(),
            target: Target::Syslog {
                addr: SyslogAddr::Udp("127.0.0.1:9".parse().unwrap()),
                facility: 16,
                tag: "sluice".into(),
            },
            format: Format::Json,
            filter: Filter::default(),
        };
        let sink = Sink::open(spec, "edge-1".into()).unwrap();
        let frame = sink.syslog_frame(&sample(), "{}");
        let pid = std::process::id();
        assert!(frame.starts_with("<134>1 2026-11-22T00:00:00.135Z "), "{frame}");
        assert!(frame.ends_with(&format!(" sluice {pid} close - {{}}")), "{frame}");
    }
}
