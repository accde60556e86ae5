//! The standard tools of the cross-check, iperf3 and wrk: their command lines, how one run
//! is bounded, and what their output says.
//!
//! Parsing is strict about the figures the summary needs and names what is missing; every
//! other line is left alone (it stays in the raw output). A run is stopped when it outlives
//! its time limit or on Ctrl-C, and its whole process group with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::{file_context, io_context, BenchError, Result};
use crate::timeline;

/// What one iperf3 client run measured, at the receiver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfResult {
    pub gbit_s: f64,
    pub bytes: f64,
    pub seconds: f64,
    /// Retransmitted segments on the sending side.
    pub retransmits: f64,
}

/// Reads `iperf3 -J` output: the receiver's sum, or the error iperf3 reported.
pub fn parse_iperf3(json: &str) -> std::result::Result<IperfResult, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("iperf3 output is not JSON: {e}"))?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {error}"));
    }
    let end = &value["end"];
    let number = |section: &str, key: &str| {
        end[section][key].as_f64().ok_or_else(|| format!("iperf3 output lacks end.{section}.{key}"))
    };
    Ok(IperfResult {
        gbit_s: number("sum_received", "bits_per_second")? / 1e9,
        bytes: number("sum_received", "bytes")?,
        seconds: number("sum_received", "seconds")?,
        retransmits: number("sum_sent", "retransmits").unwrap_or(0.0),
    })
}

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub requests_per_s: f64,
    pub requests: f64,
    pub seconds: f64,
    /// `latency_us_p50` ... from the latency distribution (`--latency`), in µs.
    pub latency_us: BTreeMap<String, f64>,
    /// connect + read + write + timeout errors.
    pub socket_errors: f64,
    pub non_2xx: f64,
}

/// Reads wrk's text output (run with `--latency`).
pub fn parse_wrk(text: &str) -> std::result::Result<WrkResult, String> {
    let mut result = WrkResult {
        requests_per_s: f64::NAN,
        requests: f64::NAN,
        seconds: f64::NAN,
        latency_us: BTreeMap::new(),
        socket_errors: 0.0,
        non_2xx: 0.0,
    };
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            result.requests_per_s = rate.trim().parse().map_err(|_| format!("bad rate: {line}"))?;
        } else if let Some((count, rest)) = line.split_once(" requests in ") {
            result.requests = count.trim().parse().map_err(|_| format!("bad count: {line}"))?;
            let duration = rest.split(',').next().unwrap_or_default();
            result.seconds = duration_us(duration.trim())
                .map(|us| us / 1e6)
                .ok_or_else(|| format!("bad duration: {line}"))?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            result.socket_errors = errors
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum();
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx = count.trim().parse().map_err(|_| format!("bad count: {line}"))?;
        } else if line == "Latency Distribution" {
            in_distribution = true;
        } else if in_distribution {
            match distribution_line(line) {
                Some((name, us)) => {
                    result.latency_us.insert(name, us);
                }
                None => in_distribution = false,
            }
        }
    }
    if result.requests_per_s.is_nan() || result.requests.is_nan() {
        return Err("wrk output lacks \"Requests/sec:\" or \"N requests in\"".into());
    }
    Ok(result)
}

/// `50%  419.00us` -> (`latency_us_p50`, 419.0); `99.9%` -> `p999`.
fn distribution_line(line: &str) -> Option<(String, f64)> {
    let (percent, value) = line.split_once('%')?;
    let digits: String = percent.trim().chars().filter(|c| c.is_ascii_digit()).collect();
    Some((format!("latency_us_p{digits}"), duration_us(value.trim())?))
}

/// wrk's durations (`419.00us`, `1.21ms`, `5.00s`, `1.50m`) in µs.
fn duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.trim().parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(value * scale)
}

/// A one-off iperf3 server on `listen`: it serves one test and exits.
pub fn iperf3_server(program: &Path, listen: SocketAddr) -> Command {
    let mut command = Command::new(program);
    command
        .arg("--server")
        .arg("--one-off")
        .arg("--bind")
        .arg(listen.ip().to_string())
        .arg("--port")
        .arg(listen.port().to_string());
    command
}

/// An iperf3 client sending to `target` for `seconds` over `streams` streams, JSON output.
pub fn iperf3_client(program: &Path, target: SocketAddr, seconds: u64, streams: usize) -> Command {
    let mut command = Command::new(program);
    command
        .arg("--client")
        .arg(target.ip().to_string())
        .arg("--port")
        .arg(target.port().to_string())
        .arg("--time")
        .arg(seconds.to_string())
        .arg("--parallel")
        .arg(streams.to_string())
        .arg("--connect-timeout")
        .arg("5000")
        .arg("--json");
    command
}

/// How wrk loads the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct WrkLoad {
    pub threads: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Sends `Connection: close`, so each request opens a new connection.
    /// (`duration` is given to wrk in whole seconds, at least one: its only units are s, m
    /// and h.)
    pub close: bool,
}

/// wrk against `url` with latency percentiles.
pub fn wrk(program: &Path, url: &str, load: WrkLoad) -> Command {
    let mut command = Command::new(program);
    command
        .arg("--threads")
        .arg(load.threads.to_string())
        .arg("--connections")
        .arg(load.connections.to_string())
        .arg("--duration")
        .arg(format!("{}s", load.duration.as_secs().max(1)))
        .arg("--latency");
    if load.close {
        command.arg("--header").arg("Connection: close");
    }
    command.arg(url);
    command
}

/// Runs `command` to its end, output to `stdout` and `stdout` + `.err`; kills it (its
/// process group) after `limit` or on Ctrl-C.
pub fn run_bounded(mut command: Command, stdout: &Path, limit: Duration) -> Result<ExitStatus> {
    let errors = stderr_path(stdout);
    let out = File::create(stdout).map_err(file_context(stdout))?;
    let err = File::create(&errors).map_err(file_context(&errors))?;
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(io_context(format!("cannot run {program}")))?;
    let group = Pid::from_raw(child.id() as i32);
    let began = Instant::now();
    loop {
        if let Some(status) =
            child.try_wait().map_err(io_context(format!("waiting for {program}")))?
        {
            return Ok(status);
        }
        let mut stop = |error: BenchError| {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            Err(error)
        };
        if began.elapsed() > limit {
            return stop(BenchError::Usage(format!(
                "{program} still running after {limit:?}; killed"
            )));
        }
        if let Err(interrupted) = timeline::pause(Duration::from_millis(20)) {
            return stop(interrupted);
        }
    }
}

/// Where [`run_bounded`] writes standard error for `stdout`.
pub fn stderr_path(stdout: &Path) -> PathBuf {
    let mut name = stdout.as_os_str().to_owned();
    name.push(".err");
    PathBuf::from(name)
}

/// The first line a program prints for its version flag (stdout or stderr), or why not.
pub fn version(program: &Path, flag: &str) -> String {
    match Command::new(program).arg(flag).stdin(Stdio::null()).output() {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            text.lines().find(|l| !l.trim().is_empty()).unwrap_or("?").trim().to_string()
        }
        Err(e) => format!("not runnable ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://127.0.0.1:21003/file
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   461.03us  218.13us   6.99ms   83.64%
    Req/Sec    69.94k     4.39k   77.22k    70.00%
  Latency Distribution
     50%  419.00us
     75%  531.00us
     90%  667.00us
     99%    1.21ms
  695911 requests in 5.00s, 557.60MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec: 139169.41
Transfer/sec:    111.51MB
";

    #[test]
    fn wrk_rate_count_percentiles_and_errors() {
        let result = parse_wrk(WRK).unwrap();
        assert_eq!(result.requests_per_s, 139_169.41);
        assert_eq!(result.requests, 695_911.0);
        assert_eq!(result.seconds, 5.0);
        assert_eq!(result.latency_us["latency_us_p50"], 419.0);
        assert_eq!(result.latency_us["latency_us_p99"], 1_210.0);
        assert_eq!(result.latency_us.len(), 4, "{:?}", result.latency_us);
        assert_eq!(result.socket_errors, 16.0);
        assert_eq!(result.non_2xx, 7.0);
    }

    #[test]
    fn wrk_output_without_figures_is_an_error() {
        let broken = "unable to connect to 127.0.0.1:1 Connection refused\n";
        assert!(parse_wrk(broken).unwrap_err().contains("Requests/sec"));
        let clean = WRK.replace("  Socket errors: connect 0, read 12, write 3, timeout 1\n", "");
        assert_eq!(parse_wrk(&clean).unwrap().socket_errors, 0.0);
    }

    #[test]
    fn wrk_durations_in_every_unit() {
        assert_eq!(duration_us("419.00us"), Some(419.0));
        assert_eq!(duration_us("1.21ms"), Some(1210.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert_eq!(duration_us("1.50m"), Some(90e6));
        assert_eq!(duration_us("12"), None);
        assert_eq!(distribution_line("99.9%   3.00ms"), Some(("latency_us_p999".into(), 3000.0)));
    }

    #[test]
    fn iperf3_receiver_figures_or_its_error() {
        let json = r#"{"start": {}, "intervals": [], "end": {
            "sum_sent": {"seconds": 5.0, "bytes": 12500000000, "bits_per_second": 2.0e10, "retransmits": 3},
            "sum_received": {"seconds": 5.0004, "bytes": 12400000000, "bits_per_second": 1.98e10}}}"#;
        let result = parse_iperf3(json).unwrap();
        assert_eq!(result.gbit_s, 19.8);
        assert_eq!(result.bytes, 12.4e9);
        assert_eq!(result.seconds, 5.0004);
        assert_eq!(result.retransmits, 3.0);
        let failed = r#"{"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}"#;
        assert_eq!(
            parse_iperf3(failed).unwrap_err(),
            "iperf3: unable to connect to server: Connection refused"
        );
        assert!(parse_iperf3(r#"{"end": {}}"#).unwrap_err().contains("sum_received"));
        assert!(parse_iperf3("iperf3: error").is_err());
    }

    #[test]
    fn command_lines() {
        let words = |c: &Command| {
            c.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
        };
        let target: SocketAddr = "127.0.0.1:21000".parse().unwrap();
        assert_eq!(
            words(&iperf3_client(Path::new("iperf3"), target, 5, 4)),
            "--client 127.0.0.1 --port 21000 --time 5 --parallel 4 --connect-timeout 5000 --json"
        );
        assert_eq!(
            words(&iperf3_server(Path::new("iperf3"), target)),
            "--server --one-off --bind 127.0.0.1 --port 21000"
        );
        let load =
            WrkLoad { threads: 2, connections: 64, duration: Duration::from_secs(5), close: true };
        assert_eq!(
            words(&wrk(Path::new("wrk"), "http://127.0.0.1:21000/f", load)),
            "--threads 2 --connections 64 --duration 5s --latency --header Connection: close http://127.0.0.1:21000/f"
        );
        let keep_alive = WrkLoad { close: false, ..load };
        assert!(!words(&wrk(Path::new("wrk"), "u", keep_alive)).contains("close"));
    }

    #[test]
    fn bounded_run_is_killed_at_its_limit() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("sleep.txt");
        let mut sleep = Command::new("sleep");
        sleep.arg("10");
        let began = Instant::now();
        let error = run_bounded(sleep, &out, Duration::from_millis(200)).unwrap_err();
        assert!(began.elapsed() < Duration::from_secs(5));
        assert!(error.to_string().contains("killed"), "{error}");
        let mut echo = Command::new("sh");
        echo.arg("-c").arg("echo out; echo err >&2");
        assert!(run_bounded(echo, &out, Duration::from_secs(5)).unwrap().success());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "out\n");
        assert_eq!(std::fs::read_to_string(stderr_path(&out)).unwrap(), "err\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
