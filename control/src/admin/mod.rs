//! The administration interface: HTTP/1.1 on a TCP address (loopback by default) or a unix
//! socket, served by hyper on a current-thread tokio runtime confined to one thread
//! (`sluice-admin`). Reads (`/stats`, `/metrics`, `/history`) come straight from the
//! shared counters; anything that needs the engine or the configuration (`/connections`,
//! `/reload`, killing a session) is asked of the control thread over a channel and awaited,
//! so the control thread stays the only owner of the configuration and a slow answer never
//! holds up another client.
//!
//! Routes: see [`routes`]. Limits (see [`server`]): at most `max_connections` connections,
//! the oldest idle one closed to make room for a new one; a request head must arrive
//! within `header_timeout` (also the keep-alive idle limit), a body within `body_timeout`,
//! and a write that makes no progress for `write_timeout` closes its connection. Access:
//! see [`auth`]. Accept errors (out of fds) never end the server: it backs off and accepts
//! again on the same socket.

pub mod auth;
pub mod dashboard;
pub mod history;
pub mod routes;
pub mod server;

pub use server::Listener;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use sluice_engine::accounting::AccountSpec;
use sluice_engine::record::LiveSession;

use crate::config::ConfigError;
use crate::metrics::Shared;

/// Where the admin API listens when `[admin]` gives no `listen`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9900";
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Sessions listed by `/connections` without `limit`, and the most it may ask for.
pub const DEFAULT_CONNECTIONS_LIMIT: usize = 100;
pub const MAX_CONNECTIONS_LIMIT: usize = 100_000;
/// How long a request waits for the control thread.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Permission bits of the admin unix socket (`admin.socket_mode`): the owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Most admin connections at once (`admin.max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// How long a request head may take to arrive, counted from the connection's start or
/// the end of its previous answer; also how long a kept-alive connection may sit idle
/// (`admin.header_timeout`).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request body may take to arrive (`admin.body_timeout`).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may make no progress (`admin.write_timeout`).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers), in bytes; larger ones get 431.
pub const MAX_HEAD: usize = 16 * 1024;

/// The server's limits (`[admin]` keys of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// The validated `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSpec {
    pub listen: AdminAddr,
    /// Where the tokens were read from (re-read on reload).
    pub token_file: Option<PathBuf>,
    pub tokens: auth::Tokens,
    /// Permission bits of a unix socket.
    pub socket_mode: u32,
    pub limits: Limits,
    /// A service forwards to the admin API (`backends = ["admin"]`): every connection then
    /// may come from elsewhere, whatever its address.
    pub exposed: bool,
    /// Per-client accounting shown by `/stats` and `/metrics` (`admin.top_clients`,
    /// `admin.client_network_v4`, `admin.client_network_v6`); `top == 0`: off.
    pub accounting: AccountSpec,
}

impl AdminSpec {
    /// Whether only this host's users can reach the listener: a unix socket, or a
    /// loopback TCP address that no service forwards to. Write routes need no token there.
    pub fn private_listener(&self) -> bool {
        match &self.listen {
            AdminAddr::Unix(_) => !self.exposed,
            AdminAddr::Tcp(a) => a.ip().is_loopback() && !self.exposed,
        }
    }

    /// The access policy this section sets.
    pub fn policy(&self) -> auth::Policy {
        auth::Policy {
            private_listener: self.private_listener(),
            listener: self.listen.to_string(),
        }
    }
}

/// The admin API's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl AdminAddr {
    /// Parses `ip:port`, `unix:/path` or an absolute `/path`.
    pub fn parse(text: &str) -> Result<AdminAddr, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(AdminAddr::Unix(PathBuf::from(text)));
        }
        text.parse().map(AdminAddr::Tcp).map_err(|_| {
            format!("{text:?} is not an address:port such as \"127.0.0.1:9900\" or a socket path such as \"unix:/run/sluice.sock\"")
        })
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "http://{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why a reload was refused: the whole message, and each config error located.
#[derive(Debug, Clone)]
pub struct ReloadError {
    pub message: String,
    pub errors: Vec<ConfigError>,
}

impl From<String> for ReloadError {
    fn from(message: String) -> Self {
        Self { message, errors: Vec::new() }
    }
}

/// A reply the control thread sends once (from its own, blocking thread) and the admin
/// thread awaits.
pub type Reply<T> = tokio::sync::oneshot::Sender<T>;

/// What the admin thread asks of the control thread.
#[derive(Debug)]
pub enum ControlRequest {
    /// Re-read the configuration file; the answer is the new tables version or the errors.
    Reload { reply: Reply<Result<u64, ReloadError>> },
    /// Live sessions, at most `limit`.
    Sessions { limit: usize, reply: Reply<Vec<LiveSession>> },
    /// Cut the live session `id` (reason `admin_kill`); whether it was there.
    Kill { id: u64, reply: Reply<bool> },
}

/// The running admin server: one thread with its own runtime.
pub struct Admin {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds the admin API's address without serving yet (a unix socket gets
/// `spec.socket_mode`): before privileges are dropped, a port below 1024 or a root-owned
/// directory can only be bound then.
pub fn listen(spec: &AdminSpec) -> Result<Listener, String> {
    Listener::bind(&spec.listen, spec.socket_mode)
}

impl Admin {
    /// Binds the address (a unix socket gets `spec.socket_mode`) and starts serving.
    pub fn start(
        spec: &AdminSpec,
        shared: Arc<Shared>,
        control: Sender<ControlRequest>,
    ) -> Result<Admin, String> {
        Admin::start_on(spec, listen(spec)?, shared, control)
    }

    /// Starts serving on a listener bound by [`listen`].
    pub fn start_on(
        spec: &AdminSpec,
        listener: Listener,
        shared: Arc<Shared>,
        control: Sender<ControlRequest>,
    ) -> Result<Admin, String> {
        let state = Arc::new(routes::State::new(shared, control, spec));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = server::Server::new(listener, state, spec.limits)
            .map_err(|e| format!("cannot start the admin API's runtime: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("sluice-admin".into())
            .spawn(move || server.run(stopped))
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        Ok(Admin { stop: Some(stop), thread: Some(thread) })
    }

    /// Stops serving (open admin connections are closed) and waits for the thread.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_parse() {
        assert_eq!(
            AdminAddr::parse("127.0.0.1:9900"),
            Ok(AdminAddr::Tcp("127.0.0.1:9900".parse().unwrap()))
        );
        assert_eq!(AdminAddr::parse("unix:/run/s.sock"), Ok(AdminAddr::Unix("/run/s.sock".into())));
        assert_eq!(AdminAddr::parse("/run/s.sock"), Ok(AdminAddr::Unix("/run/s.sock".into())));
        assert!(AdminAddr::parse("localhost").is_err());
    }
}
