//! Defaults and bounds of the configuration: every value a key takes when it is left out
//! (`DEFAULT_*`) and the accepted range of every number and size that validation checks
//! (`MIN_*`, `MAX_*`). Defaults that the engine owns (timeouts, buffer and pipe sizes, flow
//! bounds) are its own `DEFAULT_*` constants, re-exported where the config names them.
//!
//! Invariant: validation compares against these constants only, so the README's table of
//! bounds and this file say the same thing.

use std::time::Duration;

pub use crate::admin::DEFAULT_ADMIN_LISTEN;
pub use crate::dns::{DEFAULT_DNS_INTERVAL, DEFAULT_DNS_PORT};
pub use crate::records::{DEFAULT_TEMPLATE, DEFAULT_UDP_TEMPLATE};
pub use sluice_engine::balance::{
    DEFAULT_EJECT_AFTER, DEFAULT_EJECT_FOR, DEFAULT_HEALTH_FALL, DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_RISE, DEFAULT_HEALTH_TIMEOUT, DEFAULT_WEIGHT, MAX_WEIGHT,
};
pub use sluice_engine::capture::{DEFAULT_MAX_FILE, DEFAULT_MAX_TOTAL, DEFAULT_SNAPLEN};
pub use sluice_engine::engine::{DEFAULT_BUFFER_SIZE, DEFAULT_PIPE_SIZE};
pub use sluice_engine::limits::{DEFAULT_NETWORK_V4, DEFAULT_NETWORK_V6};
pub use sluice_engine::tables::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_FIN_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_PROXY_TIMEOUT,
    DEFAULT_SNI_TIMEOUT, DEFAULT_UDP_IDLE_TIMEOUT,
};
pub use sluice_engine::udp::{DEFAULT_MAX_DATAGRAM, DEFAULT_MAX_FLOWS};
pub use sluice_engine::DEFAULT_RING_BUFFERS;

/// Where a syslog sink sends without an `address`.
pub const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";
/// Facility of a syslog sink without one: local0.
pub const DEFAULT_SYSLOG_FACILITY: u8 = 16;
/// The APP-NAME of a syslog sink without a `tag`.
pub const DEFAULT_SYSLOG_TAG: &str = "sluice";
/// Whether workers make a record when a session's backend connection is made
/// (`[records] open`); close records are always made.
pub const DEFAULT_RECORDS_OPEN: bool = false;
/// Accepted range of a health check's `rise` and `fall` (checks in a row).
pub const MIN_HEALTH_COUNT: u32 = 1;
pub const MAX_HEALTH_COUNT: u32 = 100;

/// Largest configuration file read, in bytes (32 MiB: room for a few hundred thousand
/// firewall rules); a larger file is refused without being read.
pub const MAX_CONFIG_SIZE: u64 = 32 << 20;
/// Longest duration any key accepts (timeouts, intervals, `shutdown_timeout`...): a year.
/// Every deadline the process computes from the config stays far from what its clock can
/// hold.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);
/// Largest byte count any size key accepts where no tighter bound is given (`max_bytes`,
/// a capture's `max_file` and `max_total`, a bandwidth's `burst`): 1 PiB.
pub const MAX_BYTES: u64 = 1 << 50;
/// Largest bandwidth accepted, in bytes per second: 1 PiB/s.
pub const MAX_BANDWIDTH: u64 = 1 << 50;
/// Largest session rate accepted (`rate_per_client`), in sessions per second.
pub const MAX_SESSION_RATE: u64 = 1_000_000;

/// How long a graceful stop lets sessions finish before cutting them.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest and largest relay pipe or buffer size accepted.
pub const MIN_PIPE_SIZE: u64 = 4096;
pub const MAX_PIPE_SIZE: u64 = 64 << 20;
/// Most workers accepted.
pub const MAX_WORKERS: i64 = 1024;
/// Largest `engine.max_flows` accepted (per worker; each flow holds one fd).
pub const MAX_FLOWS: i64 = 1 << 20;
/// Smallest and largest `engine.udp_max_datagram` accepted, in bytes.
pub const MIN_UDP_DATAGRAM: u64 = 512;
pub const MAX_UDP_DATAGRAM: u64 = 65535;
/// Smallest `max_file` and `max_total` of a capture.
pub const MIN_CAPTURE_SIZE: u64 = 4096;
/// Accepted range of a capture's `snaplen` (bytes of each frame kept).
pub const MIN_SNAPLEN: i64 = 64;
pub const MAX_SNAPLEN: i64 = 262_144;
/// How long a stop waits for the capture thread to finish its files.
pub const CAPTURE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest session cap accepted (engine or service).
pub const MAX_SESSIONS_CAP: u64 = 1 << 32;
/// Largest `limits.fleet_size` accepted (instances sharing a service's limits).
pub const MAX_FLEET_SIZE: u32 = 1024;
/// New sessions per client per second allowed at once when `rate_burst` is not given.
pub const DEFAULT_RATE_BURST: u64 = 1;

/// Smallest `engine.max_open_files` accepted.
pub const MIN_OPEN_FILES: i64 = 64;
/// Largest `engine.max_open_files` accepted (the kernel's usual fs.nr_open ceiling).
pub const MAX_OPEN_FILES: i64 = 1 << 30;

/// Fewest small provided buffers a worker's io_uring copy relay may have
/// (`engine.ring_buffers`).
pub const MIN_RING_BUFFERS: u16 = 64;
/// Most (the kernel's limit for one buffer ring).
pub const MAX_RING_BUFFERS: u16 = 32768;
/// Most ports one `listen` range (`"0.0.0.0:8000-8099"`) may span: each port is a listener
/// on every worker, so a range costs ports x workers fds.
pub const MAX_LISTEN_RANGE: usize = 1024;
