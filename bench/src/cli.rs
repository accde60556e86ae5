//! The command line of `sluice-bench`: one subcommand per scenario, plus `compare`.
//!
//! Every address given on the command line must be loopback (127.0.0.0/8 or ::1);
//! durations and sizes read as sluice's configuration reads them (`5s`, `500ms`, `1m`,
//! `1h 30m`; `2 GB`, `512 MiB`: `sluice::config::units`, one grammar for both).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sluice::config::units::{parse_duration, parse_size};

use crate::compare::contender::{ContenderKind, DEFAULT_BASE_PORT};
use crate::crosscheck::{
    Test, DEFAULT_DURATION, DEFAULT_FILE_SIZE, DEFAULT_ROUNDS, DEFAULT_WRK_CONNECTIONS,
    DEFAULT_WRK_THREADS,
};
use crate::net::parse_loopback;
use crate::scenario::throughput::Direction;
use crate::scenario::{Scenario, TimingParams};
use crate::topology::{TopologyKind, DEFAULT_VETH_MTU};
use crate::udp::proxy::UdpContender;
use crate::udp::UdpScenario;

/// Load generator and peer comparison for the sluice TCP forwarder (loopback only).
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bulk streams: Gbit/s per stream and in total, counted at the receiving side.
    Throughput(ThroughputArgs),
    /// Request/response on persistent connections against an echo backend.
    Rr(RrArgs),
    /// One new connection per request: connections/s and latency.
    ///
    /// The backend closes first and clients close only after end of stream, so TIME_WAIT
    /// stays on the server side and client ephemeral ports never run out.
    Connect(ConnectArgs),
    /// N idle connections through a proxy: its memory and descriptors per connection.
    Idle(IdleArgs),
    /// Direct, sluice (uring, epoll), HAProxy and nginx, interleaved over rounds.
    Compare(CompareArgs),
    /// UDP request/response (datagrams/s and latency), direct and through sluice (or
    /// `--target`), interleaved over rounds in the same run.
    Udp(UdpArgs),
    /// What capture costs: throughput through sluice without capture, through an
    /// uncaptured service of a sluice that captures another, and through a captured one.
    Capture(CaptureArgs),
    /// A bounded run of mixed traffic with reloads through a sluice it starts; RSS, fds and
    /// sessions over time to soak.csv and soak.svg; exit 1 unless it passes.
    Soak(SoakArgs),
    /// The comparison measured with standard tools: iperf3 (1 and 4 streams) and wrk
    /// (keep-alive and `Connection: close`, to an nginx HTTP server) through each proxy and
    /// direct, interleaved over rounds; raw outputs and a summary with ratios to HAProxy.
    Crosscheck(CrosscheckArgs),
}

#[derive(Debug, Args)]
pub struct CrosscheckArgs {
    /// Rounds; each runs every test through every contender in turn.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub rounds: u32,
    /// Length of each tool run, in whole seconds (at least 1).
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_DURATION)]
    pub duration: Duration,
    /// Contenders, comma-separated (`sluice` is sluice with its default driver and relay).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = CROSSCHECK_CONTENDERS)]
    pub contenders: Vec<ContenderKind>,
    /// Tests, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Test::ALL)]
    pub tests: Vec<Test>,
    /// wrk threads.
    #[arg(long, default_value_t = DEFAULT_WRK_THREADS)]
    pub wrk_threads: usize,
    /// wrk connections.
    #[arg(long, default_value_t = DEFAULT_WRK_CONNECTIONS)]
    pub wrk_connections: usize,
    /// Size in bytes of the file the HTTP server serves.
    #[arg(long, default_value_t = DEFAULT_FILE_SIZE)]
    pub file_size: usize,
    /// Proxy workers (threads or processes); default: the number of cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// `[engine] pin` of the sluice contenders; without it, sluice's default.
    #[arg(long, value_name = "true|false")]
    pub pin: Option<bool>,
    /// The sluice binary (default: `sluice` next to this program, else on the PATH).
    #[arg(long, value_name = "PATH", default_value_os_t = default_sluice_bin())]
    pub sluice_bin: PathBuf,
    /// HAProxy program.
    #[arg(long, value_name = "PATH", default_value = "haproxy")]
    pub haproxy_bin: PathBuf,
    /// nginx program (stream proxy, and the HTTP server behind every proxy).
    #[arg(long, value_name = "PATH", default_value = "nginx")]
    pub nginx_bin: PathBuf,
    /// iperf3 program.
    #[arg(long, value_name = "PATH", default_value = "iperf3")]
    pub iperf3_bin: PathBuf,
    /// wrk program.
    #[arg(long, value_name = "PATH", default_value = "wrk")]
    pub wrk_bin: PathBuf,
    /// Read peer templates from DIR instead of the built-in copies of bench/peers/.
    #[arg(long, value_name = "DIR")]
    pub peers_dir: Option<PathBuf>,
    /// First loopback port tried for listeners.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
    /// Where summary.md, summary.json, raw/ and configs/ go (default:
    /// bench/results/DATE/crosscheck/).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// The contenders of `crosscheck` unless told otherwise.
const CROSSCHECK_CONTENDERS: [ContenderKind; 4] =
    [ContenderKind::Direct, ContenderKind::Sluice, ContenderKind::Haproxy, ContenderKind::Nginx];

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The sluice binary (default: `sluice` next to this program, else on the PATH).
    #[arg(long, value_name = "PATH", default_value_os_t = default_sluice_bin())]
    pub sluice_bin: PathBuf,
    /// `engine.driver`: uring or epoll.
    #[arg(long, default_value = "uring")]
    pub driver: String,
    /// `engine.relay` on the uring driver: copy or splice.
    #[arg(long, default_value = "copy")]
    pub relay: String,
    /// `engine.workers` of each sluice.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub workers: usize,
    /// Number of parallel streams per measurement.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub streams: usize,
    /// Which way the bytes flow.
    #[arg(long, value_enum, default_value = "upload")]
    pub direction: Direction,
    /// Rounds; each measures the three routes, in a rotating order.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<usize>)]
    pub rounds: usize,
    /// `max_total` of the capture (a size, as the config reads it).
    #[arg(long, default_value = "2 GB", value_parser = size_text)]
    pub max_total: String,
    /// Keep the capture files (printed where).
    #[arg(long)]
    pub keep: bool,
    /// Also print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub timing: TimingArgs,
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// The sluice binary (default: `sluice` next to this program, else on the PATH).
    #[arg(long, value_name = "PATH", default_value_os_t = default_sluice_bin())]
    pub sluice_bin: PathBuf,
    /// How long to run.
    #[arg(long, value_parser = positive_duration, default_value = "10m")]
    pub duration: Duration,
    /// Samples before this are not judged ("0s" for none).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub warmup: Duration,
    /// How often RSS, fds and sessions are sampled.
    #[arg(long, value_parser = positive_duration, default_value = "5s")]
    pub sample: Duration,
    /// How often the configuration is reloaded (SIGHUP).
    #[arg(long, value_parser = positive_duration, default_value = "3s")]
    pub reload_every: Duration,
    /// Client threads per traffic kind (bulk, rr, churn, half_close, reset).
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub concurrency: usize,
    /// engine.driver of the sluice under test.
    #[arg(long, default_value = "auto")]
    pub driver: String,
    /// engine.relay of the sluice under test.
    #[arg(long, default_value = "copy")]
    pub relay: String,
    /// Where soak.csv, soak.svg, soak.toml and sluice.log go.
    #[arg(long, value_name = "DIR", default_value = "bench/out/soak")]
    pub out_dir: PathBuf,
}

/// Where the load goes.
#[derive(Debug, Clone, Args)]
pub struct Endpoints {
    /// Address clients connect to (the proxy under test); without it, clients connect
    /// straight to the backend ("direct").
    #[arg(long, value_parser = parse_loopback, value_name = "ADDR")]
    pub target: Option<SocketAddr>,
    /// Use an external backend at ADDR instead of starting one in this process.
    #[arg(long, value_parser = parse_loopback, value_name = "ADDR", conflicts_with = "backend_listen")]
    pub backend: Option<SocketAddr>,
    /// Address the in-process backend listens on: what the proxy must forward to.
    #[arg(long, value_parser = parse_loopback, value_name = "ADDR")]
    pub backend_listen: Option<SocketAddr>,
}

/// How results are written.
#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also append the result as a JSON line to FILE.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// How long to run.
#[derive(Debug, Clone, Copy, Args)]
pub struct TimingArgs {
    /// Measured window.
    #[arg(long, value_parser = positive_duration, default_value = "5s")]
    pub duration: Duration,
    /// Warm-up before the window, not counted ("0s" for none).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
}

impl From<TimingArgs> for TimingParams {
    fn from(t: TimingArgs) -> Self {
        TimingParams { warmup: t.warmup, duration: t.duration }
    }
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    /// Number of parallel streams.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub streams: usize,
    /// Which way the bytes flow.
    #[arg(long, value_enum, default_value = "upload")]
    pub direction: Direction,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RrArgs {
    /// Bytes per request (the echo returns as many).
    #[arg(long, default_value_t = 64, value_parser = at_least_one::<usize>)]
    pub size: usize,
    /// Persistent connections, each with one request in flight.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    pub concurrency: usize,
    /// Client threads the connections are spread over.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub threads: usize,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Connections in flight at any time.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    pub concurrency: usize,
    /// Bytes of the request and of the reply.
    #[arg(long, default_value_t = 64, value_parser = at_least_one::<usize>)]
    pub size: usize,
    /// Client threads the concurrency is spread over.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub threads: usize,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Idle connections to open and hold.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one::<usize>)]
    pub connections: usize,
    /// Pid of the proxy whose memory and descriptors are read (with its children).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Pause between "all established" and the second reading ("0s" for none).
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub settle: Duration,
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct UdpArgs {
    /// Rounds; each runs every contender once per scenario, in turn.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<u32>)]
    pub rounds: u32,
    /// Scenarios, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = UdpScenario::ALL)]
    pub scenarios: Vec<UdpScenario>,
    /// Contenders, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = UdpContender::ALL)]
    pub contenders: Vec<UdpContender>,
    #[command(flatten)]
    pub load: UdpLoadArgs,
    /// Forwarder workers; default: the number of cores.
    #[arg(long, value_parser = at_least_one::<usize>)]
    pub workers: Option<usize>,
    /// The sluice binary (default: `sluice` next to this program, else on the PATH).
    #[arg(long, value_name = "PATH", default_value_os_t = default_sluice_bin())]
    pub sluice_bin: PathBuf,
    /// nginx program.
    #[arg(long, value_name = "PATH", default_value = "nginx")]
    pub nginx_bin: PathBuf,
    /// Where udp.md and udp.json go (default: bench/results/udp-latest).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub output: Output,
}

/// The load of the UDP scenarios (also `compare`'s).
#[derive(Debug, Clone, Args)]
pub struct UdpLoadArgs {
    /// rr: bytes per datagram (the echo returns as many).
    #[arg(id = "udp_size", long = "udp-size", default_value_t = 64, value_parser = at_least_one::<usize>)]
    pub size: usize,
    /// rr: clients (each its own socket and flow), each with one datagram in flight.
    #[arg(id = "udp_clients", long = "udp-clients", default_value_t = 128, value_parser = at_least_one::<usize>)]
    pub clients: usize,
    /// rr: client threads.
    #[arg(id = "udp_threads", long = "udp-threads", default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub threads: usize,
    /// bulk: bytes per datagram.
    #[arg(id = "udp_bulk_size", long = "udp-bulk-size", default_value_t = 1200, value_parser = at_least_one::<usize>)]
    pub bulk_size: usize,
    /// bulk: sending sockets (flows).
    #[arg(id = "udp_senders", long = "udp-senders", default_value_t = 4, value_parser = at_least_one::<usize>)]
    pub senders: usize,
    /// churn: distinct new sources, one request each.
    #[arg(id = "udp_sources", long = "udp-sources", default_value_t = 100_000, value_parser = at_least_one::<usize>)]
    pub sources: usize,
    /// churn and idle: requests in flight at once.
    #[arg(id = "udp_in_flight", long = "udp-in-flight", default_value_t = 64, value_parser = at_least_one::<usize>)]
    pub in_flight: usize,
    /// idle: flows opened and left idle.
    #[arg(id = "udp_idle_flows", long = "udp-idle-flows", default_value_t = 5000, value_parser = at_least_one::<usize>)]
    pub idle_flows: usize,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Rounds; each round runs every contender once per scenario, in turn.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<u32>)]
    pub rounds: u32,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Finish within 20 s: one round, 0.15 s warm-up and 0.5 s windows, 1000 idle connections.
    #[arg(long)]
    pub quick: bool,
    /// Contenders, comma-separated [default: all but sluice (its defaults, as the
    /// other sluice contenders cover them) and the baseline build's; with --quick: direct,
    /// sluice-uring, sluice-uring-splice, sluice-epoll, haproxy, nginx].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub contenders: Vec<ContenderKind>,
    /// Scenarios, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    pub scenarios: Vec<Scenario>,
    /// Throughput streams (the one-stream target needs 1).
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub streams: usize,
    /// Throughput direction.
    #[arg(long, value_enum, default_value = "upload")]
    pub direction: Direction,
    /// rr and connect request size in bytes.
    #[arg(long, default_value_t = 64, value_parser = at_least_one::<usize>)]
    pub size: usize,
    /// rr persistent connections.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    pub rr_concurrency: usize,
    /// connect connections in flight.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    pub connect_concurrency: usize,
    /// Client threads for rr and connect.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub threads: usize,
    /// Idle connections per contender.
    #[arg(long, default_value_t = 5000, value_parser = at_least_one::<usize>)]
    pub idle_connections: usize,
    /// Proxy workers (threads or processes); default: the number of cores.
    #[arg(long, value_parser = at_least_one::<usize>)]
    pub workers: Option<usize>,
    /// The sluice binary (default: `sluice` next to this program, else on the PATH).
    #[arg(long, value_name = "PATH", default_value_os_t = default_sluice_bin())]
    pub sluice_bin: PathBuf,
    /// `[engine] pin` of every sluice contender but sluice-uring-nopin (always false);
    /// without it, sluice's default.
    #[arg(long, value_name = "true|false")]
    pub pin: Option<bool>,
    /// A second sluice build to measure beside the first, as the contenders base-uring,
    /// base-uring-splice and base-epoll (added to the list when this is given).
    #[arg(long, value_name = "PATH")]
    pub baseline_bin: Option<PathBuf>,
    /// HAProxy program.
    #[arg(long, value_name = "PATH", default_value = "haproxy")]
    pub haproxy_bin: PathBuf,
    /// nginx program.
    #[arg(long, value_name = "PATH", default_value = "nginx")]
    pub nginx_bin: PathBuf,
    /// Read peer templates from DIR instead of the built-in copies of bench/peers/.
    #[arg(long, value_name = "DIR")]
    pub peers_dir: Option<PathBuf>,
    /// First port tried for proxy listeners.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT, value_parser = at_least_one::<u16>)]
    pub base_port: u16,
    /// Where clients, proxies and backends run: all on loopback, or each in a network
    /// namespace of its own joined by veth pairs (needs root).
    #[arg(long, value_enum, default_value = "loopback")]
    pub topology: TopologyKind,
    /// MTU of the veth pairs (with --topology veth).
    #[arg(long, default_value_t = DEFAULT_VETH_MTU)]
    pub veth_mtu: u32,
    /// Where report.md, compare.json and the SVG charts go (default: bench/results/DATE/).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// UDP scenarios run after the TCP ones, comma-separated (direct, sluice, sluice-shared
    /// and nginx; HAProxy has no UDP).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = UdpScenario::ALL)]
    pub udp_scenarios: Vec<UdpScenario>,
    /// Skip the UDP scenarios.
    #[arg(long)]
    pub no_udp: bool,
    #[command(flatten)]
    pub udp: UdpLoadArgs,
    #[command(flatten)]
    pub output: Output,
}

/// Where the sluice binary is looked for when `--sluice-bin` is not given: `sluice` in the
/// directory of this program (cargo builds both into one), else `sluice` on the PATH.
pub fn default_sluice_bin() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|p| Some(p.parent()?.join("sluice")));
    beside.filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("sluice"))
}

/// A count that must be at least 1 (a zero count or window measures nothing).
fn at_least_one<T: std::str::FromStr + Default + PartialEq>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    match text.parse::<T>() {
        Ok(n) if n == T::default() => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration that must be longer than zero (a measured window, a sampling or reload
/// interval).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be longer than zero".to_string()),
        d => Ok(d),
    }
}

/// A size as the config reads it, kept as its text (it goes into a config file).
fn size_text(text: &str) -> Result<String, String> {
    parse_size(text).map(|_| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    #[test]
    fn durations_and_sizes_read_as_the_config_reads_them() {
        let soak = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["sluice-bench", "soak"], args].concat());
            cli.map(|c| match c.command {
                Command::Soak(a) => (a.duration, a.warmup),
                _ => unreachable!("soak"),
            })
        };
        let (duration, warmup) = soak(&["--duration", "1h 30m", "--warmup", "1.5s"]).unwrap();
        assert_eq!((duration, warmup), (Duration::from_secs(5400), Duration::from_millis(1500)));
        assert!(soak(&["--duration", "5 parsecs"]).is_err());
        let capture = Cli::try_parse_from(["sluice-bench", "capture", "--max-total", "1.5 GiB"]);
        assert!(capture.is_ok());
        let capture = Cli::try_parse_from(["sluice-bench", "capture", "--max-total", "lots"]);
        assert!(capture.is_err(), "a size the config would refuse is refused here");
    }

    /// Issue 26 item 18: the binary option was `--sluice` on soak and `--sluice-bin`
    /// elsewhere, its default an absolute path of the machine that built the bench, and
    /// zero windows and counts were taken (and measured nothing, or looped).
    #[test]
    fn one_binary_option_a_portable_default_and_no_zero_windows_or_counts() {
        for sub in ["soak", "capture", "udp", "compare"] {
            let cli = Cli::try_parse_from(["sluice-bench", sub, "--sluice-bin", "/x/sluice"]);
            assert!(cli.is_ok(), "{sub} --sluice-bin: {:?}", cli.err());
        }
        assert!(Cli::try_parse_from(["sluice-bench", "soak", "--sluice", "/x/sluice"]).is_err());
        let default = default_sluice_bin();
        let beside = std::env::current_exe().unwrap().parent().unwrap().join("sluice");
        assert!(default == beside || default == Path::new("sluice"), "{}", default.display());
        assert!(!default.starts_with(env!("CARGO_MANIFEST_DIR")), "not the build machine's path");
        for args in [
            &["soak", "--duration", "0s"][..],
            &["soak", "--sample", "0ms"],
            &["soak", "--reload-every", "0s"],
            &["soak", "--concurrency", "0"],
            &["rr", "--duration", "0s"],
            &["rr", "--concurrency", "0"],
            &["throughput", "--streams", "0"],
            &["connect", "--threads", "0"],
            &["idle", "--connections", "0"],
            &["udp", "--rounds", "0"],
            &["compare", "--rounds", "0"],
            &["compare", "--workers", "0"],
            &["capture", "--streams", "0"],
        ] {
            let parsed = Cli::try_parse_from([&["sluice-bench"], args].concat());
            assert!(parsed.is_err(), "{args:?} accepted");
        }
        assert!(
            Cli::try_parse_from(["sluice-bench", "rr", "--warmup", "0s"]).is_ok(),
            "no warm-up"
        );
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn non_loopback_target_is_refused() {
        let parsed = Cli::try_parse_from(["sluice-bench", "rr", "--target", "10.1.2.3:80"]);
        assert!(parsed.is_err());
        let parsed = Cli::try_parse_from([
            "sluice-bench",
            "rr",
            "--target",
            "127.0.0.1:80",
            "--duration",
            "2s",
        ]);
        assert!(parsed.is_ok());
    }

    #[test]
    fn crosscheck_defaults_to_the_four_tests_through_direct_sluice_haproxy_nginx() {
        let cli = Cli::try_parse_from(["sluice-bench", "crosscheck"]).unwrap();
        let Command::Crosscheck(args) = cli.command else { panic!("not crosscheck") };
        assert_eq!(args.contenders, CROSSCHECK_CONTENDERS);
        assert_eq!(args.tests, Test::ALL);
        assert_eq!((args.wrk_threads, args.wrk_connections), (2, 64));
        assert_eq!(args.duration, Duration::from_secs(5));
        let cli =
            Cli::try_parse_from(["sluice-bench", "crosscheck", "--tests", "iperf3-4,wrk-close"])
                .unwrap();
        let Command::Crosscheck(args) = cli.command else { panic!("not crosscheck") };
        assert_eq!(args.tests, [Test::IperfMany, Test::WrkClose]);
    }

    #[test]
    fn compare_lists_parse_comma_separated() {
        let cli = Cli::try_parse_from([
            "sluice-bench",
            "compare",
            "--contenders",
            "direct,haproxy",
            "--scenarios",
            "rr",
        ])
        .unwrap();
        let Command::Compare(args) = cli.command else { panic!("not compare") };
        assert_eq!(args.contenders, vec![ContenderKind::Direct, ContenderKind::Haproxy]);
        assert_eq!(args.scenarios, vec![Scenario::Rr]);
        assert_eq!(args.udp_scenarios, UdpScenario::ALL, "UDP scenarios run by default");
        assert!(!args.no_udp);
    }

    /// Issue 25: the UDP load options read the same on `udp` and `compare` (where `--size`
    /// and `--threads` are the TCP scenarios' own).
    #[test]
    fn udp_options_parse_on_both_subcommands() {
        let args = ["--udp-size", "128", "--udp-sources", "5000", "--udp-threads", "2"];
        let udp = Cli::try_parse_from(
            [&["sluice-bench", "udp", "--contenders", "nginx,sluice-shared"], &args[..]].concat(),
        )
        .unwrap();
        let Command::Udp(u) = udp.command else { panic!("not udp") };
        assert_eq!((u.load.size, u.load.sources, u.load.threads), (128, 5000, 2));
        assert_eq!(u.contenders, vec![UdpContender::Nginx, UdpContender::SluiceShared]);
        let cmp = Cli::try_parse_from(
            [
                &["sluice-bench", "compare", "--size", "32", "--udp-scenarios", "bulk,idle"],
                &args[..],
            ]
            .concat(),
        )
        .unwrap();
        let Command::Compare(c) = cmp.command else { panic!("not compare") };
        assert_eq!((c.size, c.udp.size, c.udp.threads, c.threads), (32, 128, 2, 1));
        assert_eq!(c.udp_scenarios, vec![UdpScenario::Bulk, UdpScenario::Idle]);
        assert!(Cli::try_parse_from(["sluice-bench", "udp", "--udp-sources", "0"]).is_err());
    }
}
