//! What the repository ships for running sluice as a service, checked without installing it:
//!
//! - dist/sluice.service: Type=notify, `sluice check` before start and reload, reload by
//!   SIGHUP, `systemd-analyze verify` clean, and a system-call filter that, expanded by this
//!   systemd, allows io_uring_setup, io_uring_enter and io_uring_register;
//! - dist/sluice.toml: valid in every key (only its `user`, made by the package, may be
//!   missing on this machine);
//! - dist/sluice.logrotate: accepted by `logrotate --debug`;
//! - Dockerfile: every COPY source exists, every shell RUN parses, the config it ships checks
//!   in its build, the binary it copies is the one the build stage makes. (`docker build`
//!   itself needs a Docker daemon, which the test machines do not run.)
//!
//! systemd-analyze and logrotate are prerequisites: without them the test is skipped, or
//! fails under CI=true.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_tests::{binary, ScratchDir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether `tool` is installed; under CI=true a missing one fails.
fn have(tool: &str) -> bool {
    sluice_tests::prerequisite(Path::new(tool).exists(), tool)
}

/// Every `Key=value` of a unit, in order.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values<'a>(entries: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    entries.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

#[test]
fn the_unit_is_notify_checks_before_start_and_reload_and_reloads_by_sighup() {
    let unit = read("dist/sluice.service");
    let entries = unit_entries(&unit);
    let config = "--config /etc/sluice/sluice.toml";
    assert_eq!(values(&entries, "Type"), ["notify"]);
    assert_eq!(values(&entries, "ExecStart"), [format!("/usr/bin/sluice run {config}")]);
    assert_eq!(values(&entries, "ExecStartPre"), [format!("/usr/bin/sluice check {config}")]);
    assert_eq!(
        values(&entries, "ExecReload"),
        [format!("/usr/bin/sluice check {config}").as_str(), "/bin/kill -HUP $MAINPID"],
        "check first, then SIGHUP"
    );
    assert!(!values(&entries, "WatchdogSec").is_empty());
}

/// The system calls a filter entry names: a call, or every call of a `@set` (recursively,
/// as this systemd defines it).
fn expand(entry: &str, out: &mut HashSet<String>) {
    if !entry.starts_with('@') {
        out.insert(entry.to_string());
        return;
    }
    let listed = Command::new("systemd-analyze").args(["syscall-filter", entry]).output();
    let listed = listed.expect("systemd-analyze syscall-filter");
    assert!(listed.status.success(), "systemd-analyze does not know {entry}");
    let text = String::from_utf8_lossy(&listed.stdout);
    for line in text.lines().map(str::trim).skip(1) {
        if !line.is_empty() && !line.starts_with('#') {
            expand(line, out);
        }
    }
}

#[test]
fn the_system_call_filter_lets_io_uring_through() {
    if !have("/usr/bin/systemd-analyze") {
        return;
    }
    let entries = unit_entries(&read("dist/sluice.service"));
    let (mut allowed, mut denied) = (HashSet::new(), HashSet::new());
    for filter in values(&entries, "SystemCallFilter") {
        let (list, set) = match filter.strip_prefix('~') {
            Some(rest) => (rest, &mut denied),
            None => (filter, &mut allowed),
        };
        for entry in list.split_whitespace() {
            expand(entry, set);
        }
    }
    assert!(allowed.contains("epoll_wait") && allowed.contains("setresuid"), "sanity");
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(call) && !denied.contains(call), "{call} is filtered out");
    }
    for call in ["setgroups", "setresgid", "setrlimit", "prctl", "sendmsg", "recvmsg"] {
        assert!(
            allowed.contains(call) && !denied.contains(call),
            "{call}, which sluice needs, is filtered out"
        );
    }
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !have("/usr/bin/systemd-analyze") {
        return;
    }
    let dir = ScratchDir::new();
    let unit = read("dist/sluice.service")
        .replace("/usr/bin/sluice", binary().to_str().expect("utf-8 path"));
    let path = dir.join("sluice.service");
    std::fs::write(&path, unit).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// dist/sluice-report.service and .timer: the report of the previous day into a directory,
/// daily; `systemd-analyze verify` clean, and the command they run is one `sluice report`
/// accepts.
#[test]
fn the_report_timer_runs_the_previous_days_report() {
    let entries = unit_entries(&read("dist/sluice-report.service"));
    assert_eq!(values(&entries, "Type"), ["oneshot"]);
    let exec = values(&entries, "ExecStart");
    assert_eq!(exec.len(), 1);
    assert!(
        exec[0].contains(
            "/usr/bin/sluice report --previous-day --by hour --out-dir /var/lib/sluice/reports"
        ),
        "{exec:?}"
    );
    let timer = unit_entries(&read("dist/sluice-report.timer"));
    assert_eq!(values(&timer, "OnCalendar"), ["*-*-* 00:15:00 UTC"]);
    assert_eq!(values(&timer, "Persistent"), ["yes"]);
    // The same arguments work against this build, on an empty log.
    let dir = ScratchDir::new();
    let log = dir.join("sessions.jsonl");
    std::fs::write(&log, "").expect("write the log");
    let out = Command::new(binary())
        .args(["report", "--previous-day", "--by", "hour", "--out-dir"])
        .arg(dir.path())
        .arg(&log)
        .output()
        .expect("sluice report");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if !have("/usr/bin/systemd-analyze") {
        return;
    }
    let sluice = binary();
    let sluice = sluice.to_str().expect("utf-8 path");
    for name in ["sluice-report.service", "sluice-report.timer"] {
        let unit = read(&format!("dist/{name}")).replace("/usr/bin/sluice", sluice);
        std::fs::write(dir.join(name), unit).expect("write the unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("sluice-report.timer"))
        .arg(dir.join("sluice-report.service"))
        .output()
        .expect("systemd-analyze verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_shipped_config_is_valid_but_for_a_user_the_package_makes() {
    let path = repo().join("dist/sluice.toml");
    let out = Command::new(binary())
        .args(["check", "--config", path.to_str().expect("utf-8")])
        .output()
        .expect("sluice check");
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("engine.user: no user \"sluice\""), "{stderr}");
}

#[test]
fn logrotate_accepts_the_snippet() {
    if !have("/usr/sbin/logrotate") {
        return;
    }
    let dir = ScratchDir::new();
    // The snippet creates files for the user the package makes; where that user does not
    // exist (a machine without the package), logrotate refuses the line, so the copy
    // checked here names root instead. Nothing else of the snippet changes.
    let snippet = read("dist/sluice.logrotate");
    assert!(snippet.contains("create 0640 sluice adm"), "{snippet}");
    let has_user = Command::new("id").arg("sluice").output().is_ok_and(|o| o.status.success());
    let checked = dir.join("sluice.logrotate");
    let text = if has_user {
        snippet
    } else {
        snippet.replace("create 0640 sluice adm", "create 0640 root adm")
    };
    std::fs::write(&checked, text).expect("write the snippet");
    let out = Command::new("/usr/sbin/logrotate")
        .arg("--debug")
        .arg("--state")
        .arg(dir.join("state"))
        .arg(&checked)
        .output()
        .expect("logrotate --debug");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("error"), "{text}");
    assert!(text.contains("/var/log/sluice/*.jsonl"), "{text}");
}

#[test]
fn the_dockerfile_copies_what_exists_and_its_shell_steps_parse() {
    let dockerfile = read("Dockerfile");
    let mut stages = Vec::new();
    let mut copied_config = false;
    // Instructions, with continuation lines joined.
    let joined = dockerfile.replace("\\\n", " ");
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction {
            "FROM" => {
                let image = rest.split_whitespace().next().unwrap_or_default();
                assert!(image.contains(':'), "FROM {image} names no tag");
                stages.extend(rest.split_whitespace().skip_while(|w| *w != "AS").nth(1));
            }
            "COPY" => {
                let args: Vec<&str> = rest.split_whitespace().collect();
                let from = args.iter().find_map(|a| a.strip_prefix("--from="));
                let sources = &args[..args.len() - 1];
                for source in sources.iter().filter(|a| !a.starts_with("--")) {
                    match from {
                        Some(stage) => {
                            assert!(stages.contains(&stage), "no stage {stage}");
                            assert_eq!(*source, "/src/target/release/sluice", "the built binary");
                        }
                        None if *source == "." => {}
                        None => {
                            assert!(repo().join(source).exists(), "COPY {source}: no such file");
                            copied_config |= *source == "dist/sluice.toml";
                        }
                    }
                }
            }
            "RUN" if !rest.starts_with('[') => {
                let check = Command::new("sh").arg("-n").arg("-c").arg(rest).status();
                assert!(check.expect("sh -n").success(), "RUN does not parse: {rest}");
            }
            _ => {}
        }
    }
    assert!(copied_config, "the image ships dist/sluice.toml");
    assert!(
        joined.contains("\"check\", \"--config\", \"/etc/sluice/sluice.toml\""),
        "the image checks its config when built"
    );
    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|l| l.trim() == "target"), ".dockerignore keeps target/ out");
}
