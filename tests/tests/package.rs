//! The Debian package, installed for real: `dpkg -i` of the .deb that `scripts/package`
//! built, then the files it must hold (binary, unit, /etc/sluice/sluice.toml, man page,
//! completions, logrotate snippet), the `sluice` system user its postinst creates, `sluice
//! check` of the shipped configuration, `systemd-analyze verify` of the installed unit, the
//! installed binary started as the unit starts it (it serves the shipped service, runs as the
//! `sluice` user, writes its session log and stops cleanly on SIGTERM), and `dpkg --purge`.
//!
//! It changes the system (a package, a user), so it is ignored by `cargo test` and run by
//! `scripts/package --test` (CI does, as its own step), which passes the .deb in
//! `SLUICE_DEB`. Without it, or without root, it fails: whoever runs it asked for it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Purges the package when dropped, whatever happened.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "sluice"]);
    }
}

#[test]
#[ignore = "installs a package: run by scripts/package --test"]
fn the_package_installs_checks_its_config_starts_and_purges() {
    let deb =
        std::env::var("SLUICE_DEB").expect("SLUICE_DEB names the .deb (scripts/package --test)");
    assert!(Path::new(&deb).is_file(), "{deb} is not a file");
    assert!(nix::unistd::geteuid().is_root(), "dpkg -i needs root");
    let _installed = Installed;
    ok("dpkg", &["-i", &deb]);

    for file in [
        "/usr/bin/sluice",
        "/usr/lib/systemd/system/sluice.service",
        "/etc/sluice/sluice.toml",
        "/etc/logrotate.d/sluice",
        "/usr/share/man/man1/sluice.1.gz",
        "/usr/share/bash-completion/completions/sluice",
        "/usr/share/zsh/vendor-completions/_sluice",
        "/usr/share/fish/vendor_completions.d/sluice.fish",
        "/usr/share/doc/sluice/README.md",
    ] {
        assert!(Path::new(file).is_file(), "the package lacks {file}");
    }
    let conffiles = ok("dpkg-query", &["--showformat=${Conffiles}", "--show", "sluice"]);
    assert!(conffiles.contains("/etc/sluice/sluice.toml"), "not a conffile: {conffiles}");

    // The postinst made the user the shipped configuration runs as, and its directories.
    assert!(ok("getent", &["passwd", "sluice"]).starts_with("sluice:"));
    for dir in ["/var/log/sluice", "/var/lib/sluice"] {
        assert!(Path::new(dir).is_dir(), "no {dir}");
    }

    // The shipped configuration checks, with the installed binary.
    let checked = ok("/usr/bin/sluice", &["check", "--config", "/etc/sluice/sluice.toml"]);
    assert!(checked.contains(": ok ("), "{checked}");
    let version = ok("/usr/bin/sluice", &["--version"]);
    assert!(version.contains("profile: release"), "{version}");

    // The unit is valid for this systemd, and the binary it names exists.
    if Path::new("/usr/bin/systemd-analyze").exists() {
        ok("systemd-analyze", &["verify", "/usr/lib/systemd/system/sluice.service"]);
    }
    // The man page renders.
    if Path::new("/usr/bin/man").exists() {
        let page = ok("man", &["-P", "cat", "sluice"]);
        assert!(page.contains("upgrade"), "{page}");
    }
    starts_as_the_unit_starts_it();
}

/// The shipped service's backend (dist/sluice.toml) and listener.
const BACKEND: &str = "127.0.0.1:8000";
const SERVICE: &str = "127.0.0.1:8080";
const SESSION_LOG: &str = "/var/log/sluice/sessions.jsonl";

/// Runs the installed binary with the unit's ExecStart (no systemd here: the runtime
/// directory the unit would make is made by hand), and checks that it serves the shipped
/// service through a backend of the test's own, as the user the package made.
fn starts_as_the_unit_starts_it() {
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/sluice.service").unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let mut words = exec.split_whitespace();
    let program = words.next().unwrap();
    std::fs::create_dir_all("/run/sluice").unwrap();
    let backend = TcpListener::bind(BACKEND).expect("the shipped backend's port is free");
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = backend.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&buf[..n]).unwrap();
    });
    let mut sluice = Command::new(program)
        .args(words)
        .env("RUNTIME_DIRECTORY", "/run/sluice")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match TcpStream::connect(SERVICE) {
            Ok(c) => break c,
            Err(e) => {
                if let Some(status) = sluice.try_wait().unwrap() {
                    let mut err = String::new();
                    sluice.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                    panic!("the installed sluice exited ({status}): {err}");
                }
                assert!(Instant::now() < deadline, "{SERVICE} never listened: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    client.write_all(b"through the package").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = [0u8; 19];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"through the package");
    drop(client);
    echo.join().unwrap();

    // It runs as the package's user, with no capability.
    let uid = ok("id", &["-u", "sluice"]).trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{}/status", sluice.id())).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("").trim().to_string()
    };
    assert!(field("Uid:").split_whitespace().all(|id| id == uid), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");

    // The session's record reaches the shipped log, written as that user.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(SESSION_LOG).is_ok_and(|l| l.contains("\"bytes_up\":19")) {
        assert!(Instant::now() < deadline, "no record of the session in {SESSION_LOG}");
        std::thread::sleep(Duration::from_millis(50));
    }

    ok("kill", &["-TERM", &sluice.id().to_string()]);
    let exit = sluice.wait().unwrap();
    assert!(exit.success(), "the installed sluice stops cleanly on SIGTERM: {exit}");
}
