//! Skipped tests, counted. A test that cannot run here (a tool or the tz database missing,
//! io_uring refused) says so through [`prerequisite`], [`skip`] or [`uring_unavailable`]
//! rather than returning quietly: the reason is printed and appended, with the test's name,
//! to the file named by `SLUICE_SKIP_LOG` (`scripts/test` sets it and prints the count and
//! the list at the end).
//!
//! Invariant: under `CI=true` a missing prerequisite is a failure (`.ci/run` installs every
//! one), and so is io_uring refused unless `.ci/run` found a kernel without it and set
//! `SLUICE_NO_URING=1`. Only [`skip_for_now`], for a condition of the moment that no
//! install can fix, records without failing.

use std::io::Write;

/// The environment variable naming the file skips are appended to.
pub const SKIP_LOG: &str = "SLUICE_SKIP_LOG";
/// Set to `1` by `.ci/run` when the kernel has no io_uring at all.
pub const NO_URING: &str = "SLUICE_NO_URING";

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether a test's prerequisite (a Debian package, a browser, the tz database...) is
/// present. Missing, the test is skipped with `skipped: WHAT is missing` and counted, and
/// under `CI=true` it fails instead.
pub fn prerequisite(present: bool, what: &str) -> bool {
    if !present {
        skip(&format!("{what} is missing"));
    }
    present
}

/// Whether `program` runs (`program ARGS` can be started at all); a [`prerequisite`].
pub fn program(program: &str, args: &[&str], package: &str) -> bool {
    let runs = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    prerequisite(runs, &format!("{program} (Debian package {package})"))
}

/// Records that the running test is skipped for `reason`; panics under `CI=true`.
pub fn skip(reason: &str) {
    assert!(!in_ci(), "{reason}, and CI=true: .ci/run must provide it");
    record(reason);
}

/// Records that the running test is skipped because io_uring is unavailable: a failure under
/// `CI=true` unless `.ci/run` found that the kernel has no io_uring (`SLUICE_NO_URING=1`).
pub fn uring_unavailable(reason: &str) {
    let kernel_lacks_it = std::env::var(NO_URING).as_deref() == Ok("1");
    assert!(
        kernel_lacks_it || !in_ci(),
        "{reason}, and CI=true on a kernel with io_uring: the io_uring tests must run"
    );
    record(reason);
}

/// Records a skip that no install could prevent (a fixed port another process holds);
/// counted like the others, but not a failure under `CI=true`.
pub fn skip_for_now(reason: &str) {
    record(reason);
}

/// Prints the skip and appends `BINARY TEST: REASON` to the skip log, if one is named.
fn record(reason: &str) {
    println!("skipped: {reason}");
    let Ok(path) = std::env::var(SKIP_LOG) else { return };
    let line = format!("{} {}: {}\n", binary_name(), test_name(), reason.replace('\n', " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {path}: {e}");
    }
}

/// The test binary without cargo's hash suffix (`udp`, `sluice_engine`).
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_ref().and_then(|p| p.file_stem()).and_then(|s| s.to_str());
    let stem = stem.unwrap_or("?");
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem.to_string(),
    }
}

/// The running test's name: libtest names each test's thread after it.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}
