//! Support for sluice's end-to-end tests. Every test starts the real `sluice` binary on
//! loopback and talks to it through real sockets; nothing here links the engine.
//!
//! - [`Sluice`]: one running process: its config file, its log, its fd count and RSS.
//! - [`Backend`], [`Blackhole`], [`refused_addr`]: the servers behind it.
//! - [`DnsServer`]: a loopback DNS server whose answers a test changes as it runs.
//! - [`Payload`], [`drain`]: deterministic data and byte-exact checks on the client side.
//! - [`Admin`], [`Metrics`]: the admin API over a small HTTP/1.1 client, `/metrics` parsed.
//! - [`read_json_lines`] and friends: connection-log records read back from JSON-lines files.
//! - [`UdpServer`], [`udp_exchange`]: UDP echo and DNS servers and a bounded client.
//! - [`Netns`]: network namespaces joined by veth pairs, made and deleted by one test.
//! - [`timing_bound`], [`load_heavy`]: keep tests with timing bounds from running beside
//!   load-heavy ones.
//! - [`Stop`]: a time-bounded stop flag for helper threads, set on drop of its guard.
//! - [`driver_independent!`]: runs a test that does not depend on the driver once.
//! - [`for_each_driver!`]: runs a relay test once per driver; a driver that sluice cannot
//!   run on this machine is skipped with a reason, counted, and a failure under `CI=true`.
//! - [`prerequisite`], [`skip`]: a test that cannot run here says why; skips are counted in
//!   `scripts/test`'s summary and fail under `CI=true`.
//!
//! Invariants: only loopback addresses are used, or addresses inside namespaces a test made; every wait is bounded by a timeout; every
//! process and thread started here stops by itself or when its handle is dropped.
#![forbid(unsafe_code)]

mod admin;
mod backend;
pub mod browser;
pub mod capture;
mod client;
mod dns;
mod load;
mod netns;
mod payload;
mod ports;
mod process;
mod records;
mod skip;
mod sluice;
mod stop;
mod udp;

pub use admin::{Admin, AdminAddr, HttpResponse, Metrics};

pub use backend::{Backend, Blackhole, Held, Reports};
pub use browser::Browser;
pub use client::{
    abort, connect, connect_from, drain, echo_exchange, echo_round_trip, echo_until, read_exactly,
    set_timeouts, tagged_exchange, tagged_round_trip, try_connect, Drained, End, StreamTotals,
    IO_TIMEOUT,
};
pub use dns::{DnsAnswer, DnsServer};
pub use load::{load_heavy, timing_bound, LoadGuard};
pub use netns::Netns;
pub use nix::sys::signal::Signal;
pub use payload::{hex, Digest, Payload, Verifier};
pub use ports::{free_addr, free_port, free_udp_addr, refused_addr};
pub use process::{
    bound_inodes, cpu_time, is_alive, raise_fd_limit, rss_kib, socket_inodes, status_field,
    tcp_connections_on, thread_count, wait_gone, Adopted,
};
pub use records::{
    is_record_of, read_json_lines, records_of, rfc3339_ms, wait_for_close_record,
    wait_for_json_lines,
};
pub use skip::{prerequisite, program, skip, skip_for_now, uring_unavailable, SKIP_LOG};
pub use sluice::{
    binary, scratch_dir, Config, Reload, ScratchDir, Service, SessionKey, SessionRecord, Sluice,
    StartError, IP, PRLIMIT,
};
pub use stop::{Stop, StopGuard};
pub use udp::{dns_answer, udp_client, udp_exchange, udp_reply, UdpServer, BIG_REPLY, BIG_REQUEST};

/// The relay drivers sluice offers; every relay test runs on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// epoll with the copy relay.
    Epoll,
    /// io_uring with the auto relay (the default: ring copies for messages, splice for a
    /// direction once it carries a bulk stream).
    Uring,
    /// io_uring with the splice relay (payload never enters user space).
    UringSplice,
}

impl Driver {
    /// The value of `engine.driver` that selects this driver.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Epoll => "epoll",
            Driver::Uring | Driver::UringSplice => "uring",
        }
    }

    /// The value of `engine.relay` for this variant, if it sets one.
    pub fn relay(self) -> Option<&'static str> {
        match self {
            Driver::Epoll => Some("copy"),
            Driver::Uring => Some("auto"),
            Driver::UringSplice => Some("splice"),
        }
    }
}

/// Turns test bodies that take a [`Driver`] into one `#[test]` per driver: `epoll::NAME`,
/// `uring::NAME` and `uring_splice::NAME`, each calling `NAME(Driver::...)`. Use it once per test file, naming
/// every such body (a body left out is dead code, which the lints reject).
///
/// ```text
/// /// What the test asserts.
/// fn relays_bytes(driver: Driver) {
///     let Some(sluice) = Sluice::start(Config::new(driver).service(...)) else { return };
///     ...
/// }
///
/// sluice_tests::for_each_driver!(relays_bytes);
/// ```
#[macro_export]
macro_rules! for_each_driver {
    ($($name:ident),+ $(,)?) => {
        mod epoll {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Driver::Epoll)
                }
            )+
        }

        mod uring {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Driver::Uring)
                }
            )+
        }

        mod uring_splice {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Driver::UringSplice)
                }
            )+
        }
    };
}

/// Turns test bodies that take a [`Driver`] but whose behaviour does not depend on it into
/// one `#[test]` each, `any_driver::NAME`, on epoll (which every machine has): UDP (its loop
/// runs on mio whatever the TCP driver), sinks, reports, DNS discovery, config handling.
/// Use [`for_each_driver!`] for anything the relay drivers do.
#[macro_export]
macro_rules! driver_independent {
    ($($name:ident),+ $(,)?) => {
        mod any_driver {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Driver::Epoll)
                }
            )+
        }
    };
}

/// A read token and a write token for `[admin] token_file`.
pub const READ_TOKEN: &str = "read-token-for-tests-0123456789";
pub const WRITE_TOKEN: &str = "write-token-for-tests-0123456789";

/// Writes a token file (mode 0600) with [`READ_TOKEN`] and [`WRITE_TOKEN`] into `dir`;
/// returns the `token_file = "..."` line of the `[admin]` section.
pub fn write_token_file(dir: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("tokens.toml");
    let text = format!("read = \"{READ_TOKEN}\"\nwrite = \"{WRITE_TOKEN}\"\n");
    std::fs::write(&path, text).expect("write the token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    format!("token_file = {:?}", path.display().to_string())
}
