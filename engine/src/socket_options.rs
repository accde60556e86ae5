//! Socket options of a service, per side: TCP keepalive and TCP_USER_TIMEOUT of client and
//! backend sockets, and the listen backlog. Plain data with their documented defaults and
//! bounds; `sys` sets them.
//!
//! Where they are set: client options on the service's listening sockets, which accepted
//! sockets inherit (no system call per connection), again on every listener at each
//! reload; backend options on each backend socket before its connect.

use std::time::Duration;

/// Listen backlog of a service's listeners, unless configured (the kernel caps it at
/// net.core.somaxconn).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Accepted range of a configured backlog.
pub const MIN_BACKLOG: u32 = 1;
pub const MAX_BACKLOG: u32 = 65535;
/// Accepted range of keepalive `idle` and `interval`, in seconds (the kernel's bounds,
/// MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL).
pub const MAX_KEEPALIVE_SECS: u64 = 32767;
/// Accepted range of keepalive `count` (the kernel's MAX_TCP_KEEPCNT).
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
/// Keepalive settings a `client_keepalive` or `backend_keepalive` block leaves out.
pub const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEPALIVE_COUNT: u32 = 6;
/// Longest TCP_USER_TIMEOUT (the kernel takes milliseconds in a signed int: 24 days).
pub const MAX_USER_TIMEOUT: Duration = Duration::from_secs(24 * 86_400);

/// TCP keepalive probes: after `idle` without traffic, a probe every `interval`; `count`
/// unanswered probes reset the connection. Whole seconds (what the kernel keeps), each
/// within 1 ..= [`MAX_KEEPALIVE_SECS`]; `count` within 1 ..= [`MAX_KEEPALIVE_COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// The TCP options of one side's sockets. The default sets nothing: no keepalive, and the
/// kernel's retransmission limits rather than a user timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SideOptions {
    pub keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the connection
    /// is reset (within 1 ms ..= [`MAX_USER_TIMEOUT`]).
    pub user_timeout: Option<Duration>,
}

impl SideOptions {
    /// Whether any option is set (a fresh socket then needs no system call for them).
    pub fn is_default(&self) -> bool {
        *self == SideOptions::default()
    }
}

/// Where a pool's backend connections come from (`source`); without one, the kernel picks
/// the address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's own address and port (IP_TRANSPARENT): the backend sees the client.
    /// The host must route the backend's replies back through sluice (README, Transparent
    /// proxying).
    Client,
    /// A local address of this host; the port is chosen at connect
    /// (IP_BIND_ADDRESS_NO_PORT), so one address serves as many connections as 4-tuples.
    Addr(std::net::IpAddr),
}

/// What one backend socket is bound to before its connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendBind {
    /// A foreign address and port (the client's), with IP_TRANSPARENT.
    Transparent(std::net::SocketAddr),
    /// A local address, the port chosen at connect.
    Local(std::net::IpAddr),
}

/// Everything a backend socket is made with besides its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendSocket {
    pub options: SideOptions,
    pub bind: Option<BackendBind>,
}

impl BackendSocket {
    /// The socket of a connection from `client` to `backend` under `source`. A source of
    /// the other family than the backend (an IPv6 client of an IPv4 backend) cannot be
    /// kept: such a connection leaves from an address the kernel picks.
    pub fn new(
        options: SideOptions,
        source: Option<Source>,
        client: std::net::SocketAddr,
        backend: std::net::SocketAddr,
    ) -> Self {
        let bind = match source {
            Some(Source::Client) if client.is_ipv4() == backend.is_ipv4() => {
                Some(BackendBind::Transparent(client))
            }
            Some(Source::Addr(ip)) if ip.is_ipv4() == backend.is_ipv4() => {
                Some(BackendBind::Local(ip))
            }
            _ => None,
        };
        Self { options, bind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_kept_only_within_its_family() {
        let v4: std::net::SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let v6: std::net::SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let backend: std::net::SocketAddr = "10.0.1.1:80".parse().unwrap();
        let o = SideOptions::default();
        let client = BackendSocket::new(o, Some(Source::Client), v4, backend);
        assert_eq!(client.bind, Some(BackendBind::Transparent(v4)));
        assert_eq!(BackendSocket::new(o, Some(Source::Client), v6, backend).bind, None);
        let local = Source::Addr("127.0.0.3".parse().unwrap());
        let bound = BackendSocket::new(o, Some(local), v6, backend).bind;
        assert_eq!(bound, Some(BackendBind::Local("127.0.0.3".parse().unwrap())));
        let other = Source::Addr("::1".parse().unwrap());
        assert_eq!(BackendSocket::new(o, Some(other), v4, backend).bind, None);
        assert_eq!(BackendSocket::new(o, None, v4, backend).bind, None);
    }
}
