//! Binary upgrade: the running process (the predecessor) starts the binary installed at its
//! own path and hands it every listening socket over a private Unix socket (SCM_RIGHTS); the
//! new process (the successor) checks its configuration, starts its engine on those very
//! sockets, and says so; only then does the predecessor stop accepting, drain its sessions
//! and exit.
//!
//! The dialogue, one JSON message per SOCK_SEQPACKET datagram, on the socket the successor
//! finds as its standard input:
//!
//! ```text
//! predecessor -> successor   hello {version, pid}
//!                            sockets (fds attached, at most 64 a message), repeated
//!                            instance {pid_file, control} (fds: the locked pid file and
//!                                      the control socket)
//!                            end
//! successor -> predecessor   ready {pid}     every worker accepts on the inherited sockets
//!                         or failed {reason} (then it exits; the predecessor goes on)
//! predecessor -> successor   done            it stopped accepting and named the successor
//!                                            the main process to the service manager
//! ```
//!
//! Invariants: the predecessor changes nothing before `ready`, so a successor that fails
//! (bad configuration, a crash, no answer within [`DEFAULT_UPGRADE_TIMEOUT`]) leaves it
//! serving exactly as before; sockets are the same kernel objects in both processes, so
//! connections waiting in accept queues stay queued whoever accepts them.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crossbeam_channel::Receiver;
use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};
use sluice_engine::handover::{self as fdpass, MAX_FDS_PER_MESSAGE};
use sluice_engine::Inherited;

use crate::instance::Paths;

/// The version of the dialogue; a successor that speaks another refuses the handover.
pub const PROTOCOL_VERSION: u32 = 1;
/// How long the predecessor waits for the successor's `ready` before giving up on it.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the successor waits for `done` once it is ready (it serves either way).
pub const DONE_TIMEOUT: Duration = Duration::from_secs(15);
/// The hidden `run` flag that tells a successor its standard input is the handover socket.
pub const HANDOVER_FLAG: &str = "--handover";
/// How long a successor that failed may take to exit before it is killed.
pub const EXIT_WAIT: Duration = Duration::from_secs(2);
/// Largest message of the dialogue.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Hello { version: u32, pid: u32 },
    Sockets,
    Instance { pid_file: PathBuf, control: PathBuf },
    End,
    Ready { pid: u32 },
    Failed { reason: String },
    Done,
}

fn send(socket: BorrowedFd<'_>, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    fdpass::send_with_fds(socket, &bytes, fds)
}

/// The next message and its fds; the peer's exit reads as an error.
fn receive(socket: BorrowedFd<'_>) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = fdpass::recv_with_fds(socket, &mut buf)?;
    if n == 0 && fds.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other process is gone"));
    }
    let message = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
    Ok((message, fds))
}

fn set_timeout(socket: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    setsockopt(&socket, sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
}

/// How the predecessor starts its successor: the binary at the path it was started from
/// (the newly installed one, after a package upgrade) with the same command line.
#[derive(Debug, Clone)]
pub struct Relaunch {
    pub binary: PathBuf,
    pub args: Vec<OsString>,
}

/// What the predecessor hands over.
#[derive(Debug)]
pub struct Handout {
    pub sockets: Vec<OwnedFd>,
    pub paths: Paths,
    pub lock: OwnedFd,
    pub control: OwnedFd,
}

/// A successor being started; its outcome arrives on [`Attempt::outcome`].
#[derive(Debug)]
pub struct Attempt {
    pub pid: u32,
    pub outcome: Receiver<Outcome>,
}

/// How an attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// The successor accepts on every listener and waits for [`Successor::release`].
    Ready(Successor),
    /// It failed (and has exited, or was stopped): nothing changed.
    Failed(String),
}

/// A successor that is ready.
#[derive(Debug)]
pub struct Successor {
    pub pid: u32,
    channel: OwnedFd,
    /// Not waited for: the successor outlives this process.
    _child: Child,
}

impl Successor {
    /// Tells the successor that this process has stopped accepting: it is on its own.
    pub fn release(self) -> io::Result<()> {
        send(self.channel.as_fd(), &Message::Done, &[])
    }
}

/// Starts `relaunch` with the handover socket as its standard input, and hands it
/// `handout` on a thread of its own; the outcome follows on the attempt's channel.
pub fn begin(relaunch: &Relaunch, handout: Handout, timeout: Duration) -> Result<Attempt, String> {
    let (mine, theirs) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| format!("cannot create the handover socket: {e}"))?;
    let mut command = Command::new(&relaunch.binary);
    command.args(&relaunch.args).arg(HANDOVER_FLAG).stdin(Stdio::from(theirs));
    // The watchdog is the successor's once it is the main process.
    command.env_remove(crate::notify::WATCHDOG_PID);
    let child =
        command.spawn().map_err(|e| format!("cannot start {}: {e}", relaunch.binary.display()))?;
    drop(command); // closes this process's copy of the successor's end
    let pid = child.id();
    let (tx, outcome) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("sluice-upgrade".into())
        .spawn(move || {
            let _ = tx.send(converse(mine, child, handout, timeout));
        })
        .map_err(|e| format!("cannot start the upgrade thread: {e}"))?;
    Ok(Attempt { pid, outcome })
}

/// The predecessor's side of the dialogue.
fn converse(channel: OwnedFd, mut child: Child, handout: Handout, timeout: Duration) -> Outcome {
    let pid = child.id();
    let result =
        hand(channel.as_fd(), &handout, timeout).and_then(|()| match receive(channel.as_fd()) {
            Ok((Message::Ready { .. }, _)) => Ok(()),
            Ok((Message::Failed { reason }, _)) => Err(reason),
            Ok((other, _)) => Err(format!("unexpected answer {other:?}")),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(format!("no answer within {timeout:?}"))
            }
            Err(e) => Err(format!("{e}")),
        });
    match result {
        Ok(()) => Outcome::Ready(Successor { pid, channel, _child: child }),
        Err(reason) => {
            drop(channel);
            let status = reap(&mut child);
            Outcome::Failed(format!("new process {pid} ({status}): {reason}"))
        }
    }
}

/// Waits up to [`EXIT_WAIT`] for a failed successor to exit, then stops it; its status.
fn reap(child: &mut Child) -> String {
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().map(|s| format!("{s}, stopped after {EXIT_WAIT:?}")).unwrap_or_default()
}

fn hand(channel: BorrowedFd<'_>, handout: &Handout, timeout: Duration) -> Result<(), String> {
    let broken = |e: io::Error| format!("cannot hand over: {e}");
    set_timeout(channel, timeout).map_err(broken)?;
    send(channel, &Message::Hello { version: PROTOCOL_VERSION, pid: std::process::id() }, &[])
        .map_err(broken)?;
    for chunk in handout.sockets.chunks(MAX_FDS_PER_MESSAGE) {
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(AsFd::as_fd).collect();
        send(channel, &Message::Sockets, &fds).map_err(broken)?;
    }
    let instance = Message::Instance {
        pid_file: handout.paths.pid_file.clone(),
        control: handout.paths.control.clone(),
    };
    send(channel, &instance, &[handout.lock.as_fd(), handout.control.as_fd()]).map_err(broken)?;
    send(channel, &Message::End, &[]).map_err(broken)
}

/// What a successor received.
#[derive(Debug)]
pub struct Handover {
    channel: OwnedFd,
    pub predecessor: u32,
    /// Every listening socket of the predecessor, one fd per socket.
    pub sockets: Inherited,
    pub paths: Paths,
    pub lock: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
}

impl Handover {
    /// Reads the handover from standard input (a successor started with [`HANDOVER_FLAG`]),
    /// then puts /dev/null in its place.
    pub fn receive() -> Result<Handover, String> {
        let channel = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("no handover socket on standard input: {e}"))?;
        if let Ok(null) = std::fs::File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(null);
        }
        Handover::read_from(channel).map_err(|e| format!("handover: {e}"))
    }

    fn read_from(channel: OwnedFd) -> Result<Handover, String> {
        let predecessor = match receive(channel.as_fd()).map_err(|e| e.to_string())? {
            (Message::Hello { version: PROTOCOL_VERSION, pid }, _) => pid,
            (Message::Hello { version, .. }, _) => {
                let reason = format!(
                    "handover protocol {version} is not this binary's ({PROTOCOL_VERSION})"
                );
                let _ = send(channel.as_fd(), &Message::Failed { reason: reason.clone() }, &[]);
                return Err(reason);
            }
            (other, _) => return Err(format!("expected hello, got {other:?}")),
        };
        let mut this = Handover {
            channel,
            predecessor,
            sockets: Inherited::default(),
            paths: Paths { pid_file: PathBuf::new(), control: PathBuf::new() },
            lock: None,
            control: None,
        };
        loop {
            let (message, fds) = receive(this.channel.as_fd()).map_err(|e| e.to_string())?;
            match message {
                Message::Sockets => {
                    for fd in fds {
                        this.sockets.adopt(fd).map_err(|e| format!("a handed-over fd: {e}"))?;
                    }
                }
                Message::Instance { pid_file, control } => {
                    let mut fds = fds.into_iter();
                    this.paths = Paths { pid_file, control };
                    this.lock = fds.next();
                    this.control = fds.next();
                }
                Message::End => return Ok(this),
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }

    /// Tells the predecessor that this process cannot take over (it goes on serving).
    pub fn fail(&self, reason: &str) {
        let _ = send(self.channel.as_fd(), &Message::Failed { reason: reason.to_string() }, &[]);
    }

    /// Tells the predecessor that every worker accepts, and waits up to [`DONE_TIMEOUT`]
    /// for it to stop accepting. An error only means the wait ended without `done`.
    pub fn ready(&self) -> Result<(), String> {
        let ready = Message::Ready { pid: std::process::id() };
        send(self.channel.as_fd(), &ready, &[]).map_err(|e| format!("cannot say ready: {e}"))?;
        set_timeout(self.channel.as_fd(), DONE_TIMEOUT).map_err(|e| e.to_string())?;
        match receive(self.channel.as_fd()) {
            Ok((Message::Done, _)) => Ok(()),
            Ok((other, _)) => Err(format!("expected done, got {other:?}")),
            Err(e) => Err(format!("no word from pid {} ({e})", self.predecessor)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    #[test]
    fn a_handout_arrives_whole_in_more_than_one_message() {
        let (a, b) = pair();
        let listeners: Vec<TcpListener> = (0..MAX_FDS_PER_MESSAGE + 3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let lock = tempfile_fd();
        let control = tempfile_fd();
        let handout = Handout {
            sockets: listeners.iter().map(|l| l.try_clone().unwrap().into()).collect(),
            paths: Paths { pid_file: "/p.pid".into(), control: "/p.sock".into() },
            lock,
            control,
        };
        let sender = std::thread::spawn(move || hand(a.as_fd(), &handout, Duration::from_secs(5)));
        let got = Handover::read_from(b).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(got.sockets.len(), MAX_FDS_PER_MESSAGE + 3);
        assert_eq!(got.paths.pid_file, PathBuf::from("/p.pid"));
        assert!(got.lock.is_some() && got.control.is_some());
        assert_eq!(got.predecessor, std::process::id());
    }

    #[test]
    fn another_protocol_version_is_refused_and_said_so() {
        let (a, b) = pair();
        send(a.as_fd(), &Message::Hello { version: PROTOCOL_VERSION + 1, pid: 1 }, &[]).unwrap();
        let e = Handover::read_from(b).unwrap_err();
        assert!(e.contains("protocol"), "{e}");
        match receive(a.as_fd()).unwrap().0 {
            Message::Failed { reason } => assert!(reason.contains("protocol")),
            other => panic!("{other:?}"),
        }
    }

    fn tempfile_fd() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("sluice-upgrade-test-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        file.into()
    }
}
