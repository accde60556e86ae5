//! Central logs of a fleet: two sluice instances, each naming itself with `[records]
//! instance`, send their records through their syslog sinks (RFC 5424 over TCP) to one
//! rsyslog that runs the shipped `examples/collect/rsyslog.conf` (only its port and output
//! path replaced). The collected file is JSON lines that `sluice report` reads as it is, and
//! its per-instance sums equal what the clients of each instance did. Driver-independent
//! (records are written by the control plane's log thread): it runs once.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{
    binary, connect, prerequisite, read_json_lines, tagged_exchange, Backend, Config, Driver,
    Payload, ScratchDir, Service, Sluice,
};

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
/// How long the collected records may take: a batch of at most 50 ms, then TCP and rsyslog.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(10);

/// rsyslogd in the foreground on the shipped config, stopped when dropped.
struct Collector {
    child: Child,
    out: PathBuf,
    port: u16,
}

impl Collector {
    fn start(dir: &Path) -> Collector {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/collect/rsyslog.conf");
        let text = std::fs::read_to_string(&example).expect("read the example rsyslog.conf");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = dir.join("fleet.jsonl");
        assert!(text.contains("port=\"601\"") && text.contains("/var/log/fleet/sessions.jsonl"));
        let text = text
            .replace("port=\"601\"", &format!("port=\"{port}\""))
            .replace("/var/log/fleet/sessions.jsonl", out.to_str().unwrap());
        let conf = dir.join("rsyslog.conf");
        std::fs::write(&conf, text).unwrap();
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start rsyslogd");
        let collector = Collector { child, out, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "rsyslogd does not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        collector
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sluice report --json FILE`, parsed.
fn report(file: &Path) -> Value {
    let output = Command::new(binary()).arg("report").arg("--json").arg(file).output().unwrap();
    assert!(output.status.success(), "sluice report: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("report --json prints JSON")
}

#[test]
fn records_of_a_fleet_gathered_by_rsyslog_are_reported_per_instance() {
    if !prerequisite(Path::new(RSYSLOGD).exists(), "rsyslogd (Debian package rsyslog)") {
        return;
    }
    let dir = ScratchDir::new();
    let collector = Collector::start(dir.path());
    let echo = Backend::tagged_echo(b'E');
    let instance = |name: &str| {
        let sink = format!(
            "[[log]]\nname = \"central\"\ntype = \"syslog\"\naddress = \"tcp:127.0.0.1:{}\"\n",
            collector.port
        );
        let config = Config::new(Driver::Epoll)
            .service(Service::new("web", &[echo.addr()]))
            .section(&format!("[records]\ninstance = \"{name}\"\n"))
            .section(&sink);
        Sluice::start(config)
    };
    let (Some(a), Some(b)) = (instance("edge-a"), instance("edge-b")) else { return };
    // edge-a: 3 sessions of 100 bytes each way; edge-b: 5 of 1,000.
    for (sluice, sessions, size) in [(&a, 3, 100), (&b, 5, 1000)] {
        for i in 0..sessions {
            let client = connect(sluice.addr("web"));
            assert_eq!(tagged_exchange(client, &Payload::bytes(i, size)), Ok(b'E'));
        }
    }
    let deadline = Instant::now() + COLLECT_TIMEOUT;
    let lines = loop {
        let lines = read_json_lines(&collector.out);
        if lines.len() >= 8 || Instant::now() >= deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 8, "one line a session, each a JSON record: {lines:#?}");
    let report = report(&collector.out);
    assert_eq!(report["skipped_lines"], 0, "{report:#}");
    let of = |name: &str| {
        let t = &report["instances"][name];
        (t["sessions"].as_u64(), t["bytes_up"].as_u64(), t["bytes_down"].as_u64())
    };
    // The tagged echo answers its tag byte before the echoed bytes.
    assert_eq!(of("edge-a"), (Some(3), Some(300), Some(303)), "{report:#}");
    assert_eq!(of("edge-b"), (Some(5), Some(5000), Some(5005)), "{report:#}");
    assert_eq!(report["instances"].as_object().map(|m| m.len()), Some(2), "{report:#}");
}
