//! One running sluice per configuration: a pid file held under an exclusive lock (flock) for
//! the life of the process, and a control socket beside it that `sluice upgrade` talks to.
//!
//! Invariants:
//! - a second `sluice run` on the same configuration finds the lock taken and stops with the
//!   pid of the one running; only a binary upgrade passes the lock on, by handing the locked
//!   file itself (the same open file, so the same lock) to the successor, which then writes
//!   its own pid into it;
//! - the lock is released by the kernel when the last process holding the file exits, never
//!   explicitly by a process that handed it over;
//! - a process removes the pid file and the control socket at its exit only if it did not
//!   hand them over (and can: after dropping privileges it may lack the right, and the stale
//!   files are harmless, since the lock, not the file, says whether sluice runs).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::privileges::RunAs;

/// The runtime directory of a root process when `$RUNTIME_DIRECTORY` is not set.
pub const ROOT_RUNTIME_DIR: &str = "/run/sluice";
/// How long the control socket waits for a request line once a client connects.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The request `sluice upgrade` sends.
pub const UPGRADE_REQUEST: &str = "upgrade";

/// Where an instance keeps its pid file and control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub pid_file: PathBuf,
    pub control: PathBuf,
}

impl Paths {
    /// The paths of the instance running `config` (`None`: the embedded default), or the
    /// configured `pid_file` (the control socket beside it, with `.sock`).
    pub fn for_config(config: Option<&Path>, pid_file: Option<&Path>) -> Paths {
        let pid_file = match pid_file {
            Some(p) => p.to_path_buf(),
            None => runtime_dir().join(format!("{}.pid", instance_name(config))),
        };
        let control = pid_file.with_extension("sock");
        Paths { pid_file, control }
    }
}

/// `$RUNTIME_DIRECTORY` (set by systemd's `RuntimeDirectory=`; its first entry), else
/// `/run/sluice` for root, else `$XDG_RUNTIME_DIR/sluice`, else `/tmp/sluice-UID`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        let dir = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        if !dir.is_empty() {
            return PathBuf::from(dir);
        }
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from(ROOT_RUNTIME_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("sluice"),
        _ => std::env::temp_dir().join(format!("sluice-{uid}")),
    }
}

/// `sluice-` and a hash of the configuration file's absolute path (stable across builds:
/// FNV-1a), or `sluice-embedded`.
pub fn instance_name(config: Option<&Path>) -> String {
    let Some(path) = config else { return "sluice-embedded".into() };
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in absolute.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("sluice-{hash:016x}")
}

/// This process's claim on its configuration.
#[derive(Debug)]
pub struct Instance {
    pub paths: Paths,
    /// The locked pid file; `None` once handed over (the lock then belongs to the successor).
    lock: Option<Flock<File>>,
    control: Option<UnixListener>,
    /// Whether the files are this process's: false for a successor until it claims them,
    /// and after a hand-over. Only an owner unlocks or removes anything.
    owned: bool,
}

impl Instance {
    /// Takes the lock of `paths`, writes this process's pid and listens on the control
    /// socket. Fails, naming the running pid, when another process holds the lock.
    pub fn acquire(paths: Paths, config: Option<&Path>) -> Result<Instance, String> {
        if let Some(dir) = paths.pid_file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!("cannot create the runtime directory {}: {e}", dir.display())
            })?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&paths.pid_file)
            .map_err(|e| format!("cannot open the pid file {}: {e}", paths.pid_file.display()))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(already_running(text.trim(), &paths, config));
            }
            Err((_, e)) => {
                return Err(format!("cannot lock the pid file {}: {e}", paths.pid_file.display()))
            }
        };
        let mut this = Instance { paths, lock: Some(lock), control: None, owned: true };
        this.write_pid()?;
        let _ = std::fs::remove_file(&this.paths.control);
        let control = UnixListener::bind(&this.paths.control).map_err(|e| {
            format!("cannot listen on the control socket {}: {e}", this.paths.control.display())
        })?;
        let _ = std::fs::set_permissions(&this.paths.control, PermissionsExt::from_mode(0o600));
        control.set_nonblocking(true).map_err(|e| format!("control socket: {e}"))?;
        this.control = Some(control);
        Ok(this)
    }

    /// The instance a predecessor handed over: its locked pid file and its control socket.
    /// The pid file still names the predecessor until [`Instance::claim`].
    pub fn inherit(paths: Paths, lock: OwnedFd, control: OwnedFd) -> Result<Instance, String> {
        // The same open file as the predecessor's: the lock it holds is this one's too.
        let lock = Flock::lock(File::from(lock), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| format!("the handed-over pid file is not locked: {e}"))?;
        let control = UnixListener::from(control);
        control.set_nonblocking(true).map_err(|e| format!("control socket: {e}"))?;
        Ok(Instance { paths, lock: Some(lock), control: Some(control), owned: false })
    }

    /// Writes this process's pid into the pid file (after taking over from a predecessor).
    pub fn claim(&mut self) -> Result<(), String> {
        self.owned = true;
        self.write_pid()
    }

    fn write_pid(&mut self) -> Result<(), String> {
        let Some(file) = self.lock.as_mut() else { return Ok(()) };
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(format!("{pid}\n").as_bytes()));
        written.map_err(|e| {
            format!("cannot write the pid file {}: {e}", self.paths.pid_file.display())
        })
    }

    /// The locked pid file and the control socket, to hand to a successor.
    pub fn handover_fds(&self) -> Option<(BorrowedFd<'_>, BorrowedFd<'_>)> {
        Some((self.lock.as_ref()?.as_fd(), self.control.as_ref()?.as_fd()))
    }

    /// A client of the control socket, if one is waiting.
    pub fn next_request(&self) -> Option<(String, UnixStream)> {
        let (mut stream, _) = self.control.as_ref()?.accept().ok()?;
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 256 {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
                _ => break,
            }
        }
        Some((String::from_utf8_lossy(&line).trim().to_string(), stream))
    }

    /// Gives the control socket (and the runtime directory, when it is sluice's own) to
    /// `who`, before privileges are dropped, so that the process can still clean up and
    /// `who` can ask for an upgrade.
    pub fn give_to(&self, who: &RunAs) {
        let (uid, gid) =
            (Some(nix::unistd::Uid::from_raw(who.uid)), Some(nix::unistd::Gid::from_raw(who.gid)));
        let own_dir = self.paths.pid_file.parent().filter(|d| *d == runtime_dir());
        for path in [Some(self.paths.control.as_path()), own_dir].into_iter().flatten() {
            if let Err(e) = nix::unistd::chown(path, uid, gid) {
                log::warn!("cannot give {} to {}: {e}", path.display(), who.user);
            }
        }
    }

    /// Leaves the lock and the files to the successor: nothing is unlocked or removed.
    pub fn hand_over(&mut self) {
        self.owned = false;
        self.leave_lock();
        self.control = None;
    }

    fn leave_lock(&mut self) {
        if let Some(lock) = self.lock.take() {
            // Dropping the lock would unlock the file for the other process too (one open
            // file, one lock); its fd is closed when this process exits instead.
            std::mem::forget(lock);
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.owned {
            // A successor that failed before claiming, or a predecessor that handed over:
            // the lock and the files are the other process's.
            self.leave_lock();
            return;
        }
        for path in [&self.paths.control, &self.paths.pid_file] {
            if let Err(e) = std::fs::remove_file(path) {
                log::debug!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

fn already_running(pid: &str, paths: &Paths, config: Option<&Path>) -> String {
    let pid = if pid.is_empty() { "unknown".to_string() } else { pid.to_string() };
    let config_arg = config.map(|c| format!(" --config {}", c.display())).unwrap_or_default();
    format!(
        "sluice is already running on this configuration as pid {pid} (pid file {}, locked); \
         `sluice upgrade{config_arg}` replaces it without dropping a connection",
        paths.pid_file.display()
    )
}

/// `sluice upgrade`: asks the instance running `paths` to start the new binary, and returns
/// its answer (`Ok` when the new process took over).
pub fn request_upgrade(paths: &Paths, timeout: Duration) -> Result<String, String> {
    let mut stream = UnixStream::connect(&paths.control).map_err(|e| {
        let running = is_locked(&paths.pid_file);
        match running {
            Some(false) | None => format!(
                "no sluice is running on this configuration (pid file {} is not locked)",
                paths.pid_file.display()
            ),
            Some(true) => format!(
                "sluice runs (pid file {} is locked) but its control socket {} answers no: {e}",
                paths.pid_file.display(),
                paths.control.display()
            ),
        }
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{UPGRADE_REQUEST}\n").as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("no answer within {timeout:?}: {e}"))?;
    let answer = answer.trim().to_string();
    match answer.strip_prefix("ok: ") {
        Some(rest) => Ok(rest.to_string()),
        None => Err(answer.strip_prefix("failed: ").unwrap_or(&answer).to_string()),
    }
}

/// Whether the pid file is locked by a running sluice (`None`: there is no such file).
fn is_locked(path: &Path) -> Option<bool> {
    let file = File::open(path).ok()?;
    Some(Flock::lock(file, FlockArg::LockSharedNonblock).is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_by_config_path_and_stay_stable() {
        let a = instance_name(Some(Path::new("/nonexistent/a.toml")));
        let b = instance_name(Some(Path::new("/nonexistent/b.toml")));
        assert_ne!(a, b);
        assert_eq!(a, instance_name(Some(Path::new("/nonexistent/a.toml"))));
        // FNV-1a of the bytes: the same in every build, so old and new binaries agree.
        assert_eq!(a, "sluice-64ddcffeb27ee5e1");
        assert_eq!(instance_name(None), "sluice-embedded");
    }

    #[test]
    fn the_control_socket_sits_beside_a_configured_pid_file() {
        let p = Paths::for_config(None, Some(Path::new("/run/x/edge.pid")));
        assert_eq!(p.control, Path::new("/run/x/edge.sock"));
    }
}
