//! The command line: `sluice check` accepts the shipped examples and reports each error of
//! a bad file as `FILE:LINE:COL: key: message` with exit code 2; `--version` and `--help`
//! answer; `sluice run` rejects a bad file the same way, and without `--config` runs the
//! embedded default.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sluice_tests::{binary, scratch_dir, Sluice};

/// A file in a fresh scratch dir, removed on drop.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = scratch_dir();
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).expect("write config");
        Self { dir, path }
    }

    fn name(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sluice(args: &[&str]) -> Output {
    Command::new(binary()).args(args).output().expect("run sluice")
}

fn check(path: &str) -> Output {
    sluice(&["check", "--config", path])
}

/// One `FILE:LINE:COL: key: message` line.
#[derive(Debug)]
struct Reported {
    line: usize,
    column: usize,
    key: String,
    message: String,
}

/// Parses every stderr line of a rejected file; panics on a line of another shape.
fn reported(output: &Output, file: &str) -> Vec<Reported> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            parse_error_line(l, file)
                .unwrap_or_else(|| panic!("not FILE:LINE:COL: key: message: {l:?}"))
        })
        .collect()
}

fn parse_error_line(line: &str, file: &str) -> Option<Reported> {
    let rest = line.strip_prefix(file)?.strip_prefix(':')?;
    let (line_no, rest) = rest.split_once(':')?;
    let (column, rest) = rest.split_once(": ")?;
    let (key, message) = rest.split_once(": ")?;
    Some(Reported {
        line: line_no.parse().ok()?,
        column: column.parse().ok()?,
        key: key.to_string(),
        message: message.to_string(),
    })
}

/// Asserts exit code 2 and exactly the `(line, key)` pairs, in order; returns the errors.
fn assert_rejected(output: &Output, file: &str, expected: &[(usize, &str)]) -> Vec<Reported> {
    assert_eq!(
        output.status.code(),
        Some(2),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let errors = reported(output, file);
    let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(got, expected, "errors: {errors:#?}");
    assert!(errors.iter().all(|e| e.column >= 1 && !e.message.is_empty()), "errors: {errors:#?}");
    errors
}

/// `sluice check` on `path`, killed if it has not answered within 5 s.
fn check_within_5s(path: &str) -> Output {
    let mut child = Command::new(binary())
        .args(["check", "--config", path])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sluice");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice check {path} still running after 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Issue 26 item 11: a path that is not a regular file, or a file without bound, could hang
/// `sluice check` and `run` (a FIFO blocks the open) or fill memory. Each is refused at
/// once with what it is, and a file over 32 MiB without being read.
#[test]
fn check_refuses_what_is_not_a_regular_file_of_bounded_size() {
    let dir = ConfigFile::new(VALID_SERVICE);
    let fifo = dir.dir.join("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success());
    let big = dir.dir.join("big.toml");
    let file = std::fs::File::create(&big).expect("create");
    file.set_len((32 << 20) + 1).expect("a sparse file just over 32 MiB");
    let cases = [
        (fifo.to_str().unwrap().to_string(), "is a FIFO, not a regular file"),
        (dir.dir.to_str().unwrap().to_string(), "is a directory, not a regular file"),
        ("/dev/zero".to_string(), "is a character device, not a regular file"),
        (big.to_str().unwrap().to_string(), "is larger (33554433 bytes or more) than the largest"),
    ];
    for (path, says) in cases {
        let output = check_within_5s(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{path}: {stderr}");
        assert!(stderr.contains(&format!("{path}:0:0: (file): {says}")), "{path}: {stderr}");
    }
    assert!(check_within_5s(dir.name()).status.success(), "the regular file is fine");
}

const VALID_SERVICE: &str =
    "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\n";

#[test]
fn check_accepts_every_example_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", examples.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples/*.toml");
    for file in &files {
        let output = check(file.to_str().expect("utf-8 path"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(": ok"),
            "{} rejected ({}): {stdout}{}",
            file.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn check_reports_bad_toml_at_its_line() {
    let file = ConfigFile::new("[engine]\nworkers = 2\n\n[[service]\nname = \"a\"\n");
    assert_rejected(&check(file.name()), file.name(), &[(4, "service")]);
}

#[test]
fn check_reports_an_unknown_key_by_name_and_line() {
    let file = ConfigFile::new(&format!("[engine]\nworkers = 2\nwokers = 3\n\n{VALID_SERVICE}"));
    let errors = assert_rejected(&check(file.name()), file.name(), &[(3, "engine.wokers")]);
    assert!(errors[0].message.contains("wokers"), "{:?}", errors[0].message);
}

#[test]
fn check_reports_a_bad_listen_address() {
    let text =
        "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1\"]\nbackends = [\"127.0.0.1:2\"]\n";
    let file = ConfigFile::new(text);
    let errors = assert_rejected(&check(file.name()), file.name(), &[(3, "service[0].listen")]);
    assert!(errors[0].message.contains("\"127.0.0.1\""), "{:?}", errors[0].message);
}

#[test]
fn check_reports_a_bad_duration() {
    let file = ConfigFile::new(&format!("{VALID_SERVICE}connect_timeout = \"5 parsecs\"\n"));
    let errors =
        assert_rejected(&check(file.name()), file.name(), &[(5, "service[0].connect_timeout")]);
    assert!(errors[0].message.contains("5 parsecs"), "{:?}", errors[0].message);
}

#[test]
fn check_reports_every_error_of_a_file() {
    let text = "[engine]\n\
                driver = \"kqueue\"\n\
                \n\
                [[service]]\n\
                name = \"a\"\n\
                listen = [\"127.0.0.1:1\", \"nope\"]\n\
                backends = [\"127.0.0.1:2\"]\n\
                connect_timeout = \"5 parsecs\"\n\
                fin_timeout = \"0s\"\n";
    let file = ConfigFile::new(text);
    assert_rejected(
        &check(file.name()),
        file.name(),
        &[
            (2, "engine.driver"),
            (6, "service[0].listen"),
            (8, "service[0].connect_timeout"),
            (9, "service[0].fin_timeout"),
        ],
    );
}

#[test]
fn check_of_a_missing_file_names_it_and_exits_2() {
    let dir = scratch_dir();
    let missing = dir.join("missing.toml");
    let output = check(missing.to_str().expect("utf-8 path"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(missing.to_str().unwrap()) && stderr.contains("cannot read"),
        "{stderr}"
    );
}

/// `-V` is the name and version alone; `--version` begins with them (its other lines, the
/// build and io_uring facts, are checked in operations.rs).
#[test]
fn version_prints_name_and_version() {
    let short = sluice(&["-V"]);
    assert!(short.status.success());
    let expected = format!("sluice {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(String::from_utf8_lossy(&short.stdout).trim(), expected);
    let long = sluice(&["--version"]);
    assert!(long.status.success());
    assert_eq!(String::from_utf8_lossy(&long.stdout).lines().next(), Some(expected.as_str()));
}

#[test]
fn help_lists_the_subcommands() {
    let output = sluice(&["--help"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for command in ["run", "check", "demo"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(command)),
            "no {command} in:\n{stdout}"
        );
    }
}

#[test]
fn run_rejects_a_bad_file_like_check() {
    let file = ConfigFile::new(&format!("{VALID_SERVICE}idle_timeout = \"soon\"\n"));
    let output = sluice(&["run", "--config", file.name()]);
    assert_rejected(&output, file.name(), &[(5, "service[0].idle_timeout")]);
}

#[test]
fn run_without_config_runs_the_embedded_default() {
    if TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).is_err() {
        sluice_tests::skip_for_now(
            "127.0.0.1:8080 is busy, and the embedded default listens there",
        );
        return;
    }
    let mut sluice = Sluice::spawn(&["run"]);
    let ready = sluice.wait_for_log("service default backends=", Duration::from_secs(10));
    if ready.is_none()
        && sluice.logs().iter().any(|l| l.contains("cannot listen on 127.0.0.1:8080"))
    {
        sluice_tests::skip_for_now("127.0.0.1:8080 was taken before sluice could bind it");
        return;
    }
    assert!(ready.is_some(), "not ready; log:\n{}", sluice.logs().join("\n"));
    let logs = sluice.logs();
    assert!(
        logs.iter().any(|l| l.contains("config <embedded default> (no --config given)")),
        "{logs:#?}"
    );
    assert!(logs.iter().any(|l| l.contains("service default listen=127.0.0.1:8080")), "{logs:#?}");
    let status = sluice.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}
