//! Running sluice as a service: the soft fd limit raised at start (to the hard limit, or to
//! `engine.max_open_files`), logged, with a warning when the caps cannot fit; one instance
//! per configuration (a second `run` names the first's pid and changes nothing; the pid file
//! goes at a graceful stop); `sluice upgrade` with nothing running says so; `--version`
//! names the revision, profile, target and io_uring; the bash completions parse.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_tests::{binary, tagged_round_trip, Backend, Config, Driver, Service, Sluice, PRLIMIT};

/// `Max open files` of /proc/PID/limits: (soft, hard).
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a nofile line");
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

fn has_prlimit() -> bool {
    sluice_tests::prerequisite(Path::new(PRLIMIT).exists(), "prlimit (Debian package util-linux)")
}

fn web(backend: &Backend) -> Config {
    Config::new(Driver::Epoll).service(Service::new("web", &[backend.addr()]))
}

#[test]
fn the_soft_fd_limit_rises_to_the_hard_limit_and_is_logged() {
    if !has_prlimit() {
        return;
    }
    let backend = Backend::tagged_echo(b'A');
    let sluice = Sluice::start(web(&backend).fd_limits(1024, 4096)).expect("epoll runs");
    assert_eq!(open_files_limit(sluice.pid()), (4096, 4096));
    assert!(sluice.wait_for_log("fd limit 4096 (hard 4096)", Duration::from_secs(1)).is_some());
}

#[test]
fn max_open_files_sets_the_soft_limit() {
    if !has_prlimit() {
        return;
    }
    let backend = Backend::tagged_echo(b'A');
    let config = web(&backend).fd_limits(1024, 4096).engine_key("max_open_files", "2048");
    let sluice = Sluice::start(config).expect("epoll runs");
    assert_eq!(open_files_limit(sluice.pid()), (2048, 4096));
    assert!(sluice.wait_for_log("fd limit 2048 (hard 4096)", Duration::from_secs(1)).is_some());
}

#[test]
fn caps_that_cannot_fit_the_fd_limit_are_warned_about() {
    if !has_prlimit() {
        return;
    }
    let backend = Backend::tagged_echo(b'A');
    let config = web(&backend).fd_limit(1024).max_sessions(100_000);
    let sluice = Sluice::start(config).expect("epoll runs");
    let line = sluice
        .wait_for_log("cannot hold", Duration::from_secs(1))
        .expect("a warning about the fd limit");
    assert!(line.contains("WARN") && line.contains("fd limit 1024"), "{line}");
    assert!(line.contains("max_sessions = 100000"), "{line}");
    // Within the limit, no warning.
    let fits = Sluice::start(web(&backend).fd_limit(1024).max_sessions(100)).expect("runs");
    assert!(fits.wait_for_log("fd limit 1024", Duration::from_secs(1)).is_some());
    assert!(!fits.logs().iter().any(|l| l.contains("cannot hold")), "{:?}", fits.logs());
}

#[test]
fn a_second_run_on_the_same_config_is_refused_naming_the_first() {
    let backend = Backend::tagged_echo(b'A');
    let mut first = Sluice::start(web(&backend)).expect("epoll runs");
    let path = first.config_path();
    let second = first.command(&["run", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(second.status.code(), Some(1), "a second run exits 1");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    assert!(stderr.contains("sluice upgrade"), "{stderr}");
    tagged_round_trip(first.addr("web"), b"the first one serves on");
    assert_eq!(first.pid_file_pid(), Some(first.pid()));
    assert!(first.terminate(Duration::from_secs(10)).success());
    assert_eq!(first.pid_file_pid(), None, "the pid file goes at a graceful stop");
    let left: Vec<_> = std::fs::read_dir(first.dir())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock") || n.ends_with(".pid"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn upgrade_with_nothing_running_says_so() {
    let dir = sluice_tests::ScratchDir::new();
    let config = dir.join("none.toml");
    std::fs::write(
        &config,
        "[[service]]\nname = \"x\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\n",
    )
    .expect("write");
    let out = Command::new(binary())
        .args(["upgrade", "--config", config.to_str().expect("utf-8")])
        .env("RUNTIME_DIRECTORY", dir.path())
        .output()
        .expect("run sluice upgrade");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no sluice is running"), "{stderr}");
}

#[test]
fn version_names_revision_profile_target_and_io_uring() {
    let out = Command::new(binary()).arg("--version").output().expect("run sluice");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("sluice {}", env!("CARGO_PKG_VERSION"))), "{text}");
    for key in ["revision: ", "profile: ", "target: ", "io_uring on this kernel: "] {
        let value = text.lines().find_map(|l| l.strip_prefix(key));
        let value = value.unwrap_or_else(|| panic!("no {key:?} line in {text}"));
        assert!(!value.trim().is_empty(), "{key} is empty");
    }
    let revision = text.lines().find_map(|l| l.strip_prefix("revision: ")).unwrap_or_default();
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    if let Some(head) = head.ok().filter(|h| h.status.success()) {
        assert_eq!(revision, String::from_utf8_lossy(&head.stdout).trim(), "the revision built");
    }
    assert!(text.contains(&format!("target: {}", std::env::consts::ARCH)), "{text}");
}

#[test]
fn the_bash_completions_parse_and_offer_the_subcommands() {
    let out = Command::new(binary()).args(["completions", "bash"]).output().expect("run");
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).expect("utf-8");
    let dir = sluice_tests::ScratchDir::new();
    let path = dir.join("sluice.bash");
    std::fs::write(&path, &script).expect("write");
    let check = Command::new("bash").arg("-n").arg(&path).status().expect("bash -n");
    assert!(check.success(), "bash -n rejects the completions");
    // Sourced, they complete `sluice up` to `upgrade`.
    let probe = format!(
        "source {}; COMP_WORDS=(sluice up); COMP_CWORD=1; COMP_LINE='sluice up'; COMP_POINT=9; _sluice sluice up sluice; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let out = Command::new("bash").arg("-c").arg(probe).output().expect("bash");
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(offered.lines().any(|l| l == "upgrade"), "offered: {offered:?}");
}
