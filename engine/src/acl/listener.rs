//! What the listener a client reached must be, for `to` and `not_to`: an address, a port, or
//! both; and client port ranges for `from_port`. Parsing and matching only.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

/// What the listener the client reached must be: its address, its port, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerMatch {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl ListenerMatch {
    /// Parses `"127.0.0.1:8080"`, `"[::1]:8080"`, `":8080"`, `"127.0.0.1"` or `"::1"`.
    pub fn parse(text: &str) -> Result<ListenerMatch, String> {
        let t = text.trim();
        let fail = |why: &str| format!("invalid listener {text:?}: {why}");
        if let Ok(addr) = t.parse::<SocketAddr>() {
            let port = nonzero_port(addr.port()).map_err(|e| fail(&e))?;
            return Ok(ListenerMatch { ip: Some(addr.ip().to_canonical()), port: Some(port) });
        }
        let bare = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(t);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(ListenerMatch { ip: Some(ip.to_canonical()), port: None });
        }
        let Some(port) = t.strip_prefix(':') else {
            return Err(fail("expected ADDRESS:PORT, [V6]:PORT, :PORT or ADDRESS"));
        };
        let port = port.parse::<u16>().map_err(|_| fail("port must be 1..=65535"))?;
        Ok(ListenerMatch { ip: None, port: Some(nonzero_port(port).map_err(|e| fail(&e))?) })
    }

    /// Whether `listener` (the local address of the accepted socket) is the one described.
    pub fn matches(&self, listener: SocketAddr) -> bool {
        self.ip.is_none_or(|ip| ip.to_canonical() == listener.ip().to_canonical())
            && self.port.is_none_or(|port| port == listener.port())
    }
}

fn nonzero_port(port: u16) -> Result<u16, String> {
    if port == 0 {
        return Err("port must be 1..=65535".to_string());
    }
    Ok(port)
}

/// Parses a client port range: `"1024-65535"` or a single port `"22"`.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let fail = |why: &str| format!("invalid port range {text:?}: {why}");
    let port = |s: &str| s.trim().parse::<u16>().map_err(|_| fail("ports are 0..=65535"));
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (port(low)?, port(high)?),
        None => (port(text)?, port(text)?),
    };
    if low > high {
        return Err(fail("the first port is above the second"));
    }
    Ok(low..=high)
}
