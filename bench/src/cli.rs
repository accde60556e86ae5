//! The command line of `sluice-bench`: one subcommand per scenario, plus `compare`.
//!
//! Every address given on the command line must be loopback (127.0.0.0/8 or ::1);
//! durations read as `5s`, `500ms`, `1m` or plain seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::compare::contender::{ContenderKind, DEFAULT_BASE_PORT};
use crate::net::parse_loopback;
use crate::scenario::throughput::Direction;
use crate::scenario::{Scenario, TimingParams};

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
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The sluice binary (default: `sluice` next to this program).
    #[arg(long, value_name = "PATH", default_value_os_t = crate::capture::default_sluice_bin())]
    pub sluice_bin: PathBuf,
    /// `engine.driver`: uring or epoll.
    #[arg(long, default_value = "uring")]
    pub driver: String,
    /// `engine.relay` on the uring driver: copy or splice.
    #[arg(long, default_value = "copy")]
    pub relay: String,
    /// `engine.workers` of each sluice.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Number of parallel streams per measurement.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Which way the bytes flow.
    #[arg(long, value_enum, default_value = "upload")]
    pub direction: Direction,
    /// Rounds; each measures the three routes, in a rotating order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// `max_total` of the capture.
    #[arg(long, default_value = "2 GB")]
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
    /// The sluice binary to run.
    #[arg(long, value_name = "PATH", default_value = "target/release/sluice")]
    pub sluice: PathBuf,
    /// How long to run.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub duration: Duration,
    /// Samples before this are not judged.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub warmup: Duration,
    /// How often RSS, fds and sessions are sampled.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub sample: Duration,
    /// How often the configuration is reloaded (SIGHUP).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub reload_every: Duration,
    /// Client threads per traffic kind (bulk, rr, churn, half_close, reset).
    #[arg(long, default_value_t = 1)]
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
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Warm-up before the window, not counted.
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
    #[arg(long, default_value_t = 1)]
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
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Persistent connections, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Client threads the connections are spread over.
    #[arg(long, default_value_t = 1)]
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
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Bytes of the request and of the reply.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Client threads the concurrency is spread over.
    #[arg(long, default_value_t = 1)]
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
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Pid of the proxy whose memory and descriptors are read (with its children).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Pause between "all established" and the second reading.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub settle: Duration,
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct UdpArgs {
    /// Bytes per datagram (the echo returns as many).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Clients (each its own socket and flow), each with one datagram in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Client threads the clients are spread over.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Rounds; each measures direct, then the forwarder.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// sluice workers; default: the number of cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// sluice binary (default: target/release/sluice of this workspace).
    #[arg(long, value_name = "PATH")]
    pub sluice_bin: Option<PathBuf>,
    /// Measure an already running UDP forwarder at ADDR instead of starting sluice
    /// (it must forward to --backend-listen).
    #[arg(long, value_parser = parse_loopback, value_name = "ADDR", requires = "backend_listen")]
    pub target: Option<SocketAddr>,
    /// Address the in-process UDP echo backend binds (default: a free port).
    #[arg(long, value_parser = parse_loopback, value_name = "ADDR")]
    pub backend_listen: Option<SocketAddr>,
    /// Address sluice listens on when it is started here.
    #[arg(long, value_parser = parse_loopback, value_name = "ADDR", default_value = "127.0.0.1:19053")]
    pub sluice_listen: SocketAddr,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Rounds; each round runs every contender once per scenario, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Finish within 20 s: one round, 0.15 s warm-up and 0.5 s windows, 1000 idle connections.
    #[arg(long)]
    pub quick: bool,
    /// Contenders, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = ContenderKind::ALL)]
    pub contenders: Vec<ContenderKind>,
    /// Scenarios, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    pub scenarios: Vec<Scenario>,
    /// Throughput streams (the one-stream target needs 1).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Throughput direction.
    #[arg(long, value_enum, default_value = "upload")]
    pub direction: Direction,
    /// rr and connect request size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// rr persistent connections.
    #[arg(long, default_value_t = 32)]
    pub rr_concurrency: usize,
    /// connect connections in flight.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Client threads for rr and connect.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Idle connections per contender.
    #[arg(long, default_value_t = 5000)]
    pub idle_connections: usize,
    /// Proxy workers (threads or processes); default: the number of cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// sluice binary (default: target/release/sluice of this workspace).
    #[arg(long, value_name = "PATH")]
    pub sluice_bin: Option<PathBuf>,
    /// HAProxy program.
    #[arg(long, value_name = "PATH", default_value = "haproxy")]
    pub haproxy_bin: PathBuf,
    /// nginx program.
    #[arg(long, value_name = "PATH", default_value = "nginx")]
    pub nginx_bin: PathBuf,
    /// Read peer templates from DIR instead of the built-in copies of bench/peers/.
    #[arg(long, value_name = "DIR")]
    pub peers_dir: Option<PathBuf>,
    /// First loopback port tried for proxy listeners.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
    /// Where report.md, compare.json and the SVG charts go (default: bench/results/DATE/).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    #[command(flatten)]
    pub output: Output,
}

/// Parses `5s`, `500ms`, `1m`, `2.5s` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?}: expected a number with ms, s, m or h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1_000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3_600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations_in_the_usual_units() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
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
    }
}
