//! What the process asks of the host at start: the fd limit it runs with, and the user it
//! runs as.
//!
//! - [`raise_fd_limit`]: the soft RLIMIT_NOFILE goes up to the hard limit (or to
//!   `engine.max_open_files`), once, before anything is opened; the figure is logged and
//!   compared with what `max_sessions` and `max_flows` may need.
//! - [`drop_to`]: with `[engine] user`, a process started as root binds every listener
//!   first, then becomes that user for good: supplementary groups set to the one group,
//!   real, effective and saved ids changed (which clears every capability), no new
//!   privileges on exec. Nothing can bind a port below 1024 afterwards, nor regain root.

use std::fmt;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{Gid, Uid};

use crate::config::Config;

/// fds a process needs beyond its sessions and flows: the workers' rings, pollers, eventfds
/// and listeners, the log and admin sockets, a few spare.
pub const FD_OVERHEAD: u64 = 64;
/// fds per worker beyond its sessions (ring or poller, UDP poller, eventfds, listeners).
pub const FD_PER_WORKER: u64 = 16;
/// fds a TCP session may hold: two sockets, and two pipes per direction on the splice relay.
pub const FDS_PER_SESSION_COPY: u64 = 2;
pub const FDS_PER_SESSION_SPLICE: u64 = 6;

/// The user (and group) `[engine] user`/`group` name, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {} (uid {}), group {} (gid {})", self.user, self.uid, self.group, self.gid)
    }
}

/// The fd limit in force after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to `wanted` (the hard limit when `None`). A `wanted` above
/// the hard limit raises the hard limit too, which only a privileged process may; otherwise
/// the hard limit is used and a warning says so. Returns the limit in force.
pub fn raise_fd_limit(wanted: Option<u64>) -> Result<FdLimit, String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("cannot read the fd limit (RLIMIT_NOFILE): {e}"))?;
    let target = wanted.unwrap_or(hard);
    if target > hard {
        if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
            return Ok(FdLimit { soft: target, hard: target });
        }
        log::warn!(
            "engine.max_open_files = {target} is above the hard fd limit {hard}, which this \
             process may not raise; using {hard}"
        );
        return raise_fd_limit(Some(hard));
    }
    if target == soft {
        return Ok(FdLimit { soft, hard });
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)
        .map_err(|e| format!("cannot set the fd limit to {target}: {e}"))?;
    Ok(FdLimit { soft: target, hard })
}

/// What the configured caps may need in fds, and whether it fits `limit`: a warning line
/// when it does not.
pub fn fd_budget_warning(config: &Config, limit: FdLimit) -> Option<String> {
    let workers = config.engine.workers as u64;
    let per_session = match config.engine.relay {
        sluice_engine::worker::Relay::Splice | sluice_engine::worker::Relay::Auto => {
            FDS_PER_SESSION_SPLICE
        }
        sluice_engine::worker::Relay::Copy => FDS_PER_SESSION_COPY,
    };
    // Flows of shared upstream sockets hold no fd; connected ones one each.
    let connected_udp = config.services.iter().any(|s| {
        s.protocol == sluice_engine::record::Protocol::Udp
            && s.udp_upstream == sluice_engine::tables::UdpUpstream::Connected
    });
    let flows = if connected_udp { workers * config.engine.max_flows as u64 } else { 0 };
    let sessions = config.engine.max_sessions.map(|n| n * per_session).unwrap_or(0);
    let need = sessions + flows + FD_OVERHEAD + FD_PER_WORKER * workers;
    if need <= limit.soft {
        return None;
    }
    let mut parts = Vec::new();
    if let Some(n) = config.engine.max_sessions {
        parts.push(format!("max_sessions = {n} ({per_session} fds each: {sessions})"));
    }
    if flows > 0 {
        parts.push(format!(
            "max_flows = {} per worker x {workers} workers (1 fd each: {flows})",
            config.engine.max_flows
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!(
        "fd limit {} cannot hold {} plus about {} for the workers: about {need} fds needed; \
         raise LimitNOFILE= (or ulimit -n) and engine.max_open_files, or lower the caps \
         (when fds run out, accepting pauses)",
        limit.soft,
        parts.join(" and "),
        FD_OVERHEAD + FD_PER_WORKER * workers
    ))
}

/// Looks up a user and group by name: the group defaults to the user's primary group.
pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, String> {
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| format!("cannot look up user {user:?}: {e}"))?
        .ok_or_else(|| format!("no user {user:?} on this system"))?;
    let (group, gid) = match group {
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)
                .map_err(|e| format!("cannot look up group {name:?}: {e}"))?
                .ok_or_else(|| format!("no group {name:?} on this system"))?;
            (g.name, g.gid)
        }
        None => {
            let name = nix::unistd::Group::from_gid(found.gid)
                .ok()
                .flatten()
                .map_or_else(|| found.gid.to_string(), |g| g.name);
            (name, found.gid)
        }
    };
    Ok(RunAs { user: found.name, uid: found.uid.as_raw(), group, gid: gid.as_raw() })
}

/// Whether the process already runs as `who` (a successor started by a process that had
/// dropped its privileges).
pub fn is_running_as(who: &RunAs) -> bool {
    let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
    nix::unistd::getuid() == uid && nix::unistd::geteuid() == uid && nix::unistd::getegid() == gid
}

/// Becomes `who` for good. A process that already runs as `who` changes nothing; one that
/// is neither root nor `who` cannot switch, which is an error.
pub fn drop_to(who: &RunAs) -> Result<(), String> {
    if is_running_as(who) {
        return Ok(());
    }
    let cannot = |what: &str, e: nix::Error| format!("cannot switch to {who}: {what}: {e}");
    if !nix::unistd::geteuid().is_root() {
        return Err(format!(
            "cannot switch to {who}: running as uid {} without the privilege to change user \
             (start as root, or leave [engine] user out)",
            nix::unistd::geteuid()
        ));
    }
    let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
    nix::unistd::setgroups(&[gid]).map_err(|e| cannot("setgroups", e))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| cannot("setresgid", e))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| cannot("setresuid", e))?;
    // Changing every uid away from 0 clears the permitted, effective and ambient
    // capabilities; check it rather than trust it.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!("switched to {who}, yet root could be regained"));
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| cannot("no_new_privs", e))?;
    // A process that changed its ids is not dumpable, which makes its own /proc/self/fd
    // unreadable to it (the fd counts it logs when fds run out); the user is its own.
    nix::sys::prctl::set_dumpable(true).map_err(|e| cannot("set_dumpable", e))?;
    let held = capabilities()?;
    if held.iter().any(|(_, v)| *v != 0) {
        return Err(format!("switched to {who}, yet capabilities remain: {held:?}"));
    }
    Ok(())
}

/// The capability sets of this process (`CapPrm`, `CapEff`, `CapAmb`) from /proc/self/status.
pub fn capabilities() -> Result<Vec<(String, u64)>, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    Ok(status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| matches!(*k, "CapPrm" | "CapEff" | "CapAmb"))
        .map(|(k, v)| (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX)))
        .collect())
}

/// Whether a bind failure is one that privileges would have avoided: a port below 1024
/// after the process gave them up. The message to add to the error, if so.
pub fn bind_hint(addr: std::net::SocketAddr, dropped: Option<&RunAs>) -> Option<String> {
    let who = dropped?;
    (addr.port() < 1024).then(|| {
        format!(
            "sluice runs as {} since it dropped root at start, and ports below 1024 can only \
             be bound at start: restart sluice to listen on {addr}",
            who.user
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(engine: &str, service: &str) -> Config {
        let text = format!(
            "[engine]\nworkers = 2\n{engine}\n[[service]]\nname = \"s\"\nlisten = \
             [\"127.0.0.1:7000\"]\nbackends = [\"127.0.0.1:7001\"]\n{service}\n"
        );
        Config::parse("test.toml", &text).unwrap()
    }

    const LIMIT: FdLimit = FdLimit { soft: 1024, hard: 4096 };

    /// Connected UDP flows need one fd each, per worker: 2 workers x 1,000 flows do not fit
    /// in 1,024 fds, and the warning names them; shared upstream sockets need none.
    #[test]
    fn connected_udp_flows_that_cannot_fit_are_warned_about() {
        let udp = "protocol = \"udp\"";
        let warning = fd_budget_warning(&config("max_flows = 1000", udp), LIMIT)
            .expect("2,000 flows cannot fit in 1,024 fds");
        assert!(
            warning.contains("max_flows = 1000 per worker x 2 workers (1 fd each: 2000)"),
            "{warning}"
        );
        assert!(warning.contains("fd limit 1024"), "{warning}");
        // 64 + 2 x 16 fds of overhead and 2 x 400 flows: 896, within 1,024.
        assert_eq!(fd_budget_warning(&config("max_flows = 400", udp), LIMIT), None);
        // Flows of shared upstream sockets hold no fd; nor does a TCP service have flows.
        let shared =
            "protocol = \"udp\"\nudp_upstream = \"shared\"\nudp_source = [\"127.0.0.0/8\"]";
        assert_eq!(fd_budget_warning(&config("max_flows = 100000", shared), LIMIT), None);
        assert_eq!(fd_budget_warning(&config("max_flows = 100000", ""), LIMIT), None);
    }
}
