//! `sluice ctl` end to end, against a running sluice: `status` prints aligned tables that
//! agree with `/stats`; `connections` filters; `kill` cuts a session; `drain`/`enable`
//! steer new sessions; `reload` prints a refused file's errors with their locations and
//! exits 1; tokens come from the token file or `$SLUICE_TOKEN`; the address from
//! `--config`; and `top` runs in a real terminal (tmux), shows live figures and quits on q.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sluice_tests::{
    binary, connect, drain, prerequisite, read_exactly, set_timeouts, write_token_file, Backend,
    Config, Driver, End, ScratchDir, Service, Sluice, READ_TOKEN, WRITE_TOKEN,
};

struct Ctl {
    admin: String,
    token_file: Option<std::path::PathBuf>,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(binary());
        c.arg("ctl")
            .arg("--admin")
            .arg(&self.admin)
            .env_remove("SLUICE_TOKEN")
            .env_remove("SLUICE_ADMIN");
        if let Some(t) = &self.token_file {
            c.arg("--token-file").arg(t);
        }
        c.args(args).output().expect("run sluice ctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ctl {args:?} failed ({}): {stderr}", out.status);
        stdout.into_owned()
    }
}

fn start(dir: &ScratchDir) -> (Sluice, Backend, Backend, Ctl) {
    let (a, b) = (Backend::tagged_echo(b'A'), Backend::tagged_echo(b'B'));
    let config = Config::new(Driver::Epoll)
        .admin_tcp()
        .admin_key(&write_token_file(dir.path()))
        .service(Service::new("web", &[a.addr(), b.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    let ctl = Ctl {
        admin: sluice.admin().tcp_addr().to_string(),
        token_file: Some(dir.join("tokens.toml")),
    };
    (sluice, a, b, ctl)
}

/// Opens a session through "web" and waits for its echo: it is then listed as relaying.
fn open_session(sluice: &Sluice) -> TcpStream {
    let mut c = connect(sluice.addr("web"));
    c.write_all(b"hi").unwrap();
    read_exactly(&mut c, 3);
    c
}

/// The column of `header` in a table's header line, and the same column's text in `row`.
fn column_end(header: &str, name: &str) -> usize {
    header.find(name).unwrap_or_else(|| panic!("no column {name} in {header:?}")) + name.len()
}

/// `status` lists the service with its live session count right-aligned under ACTIVE, each
/// backend with its state, and each worker; the figures agree with `/stats`.
#[test]
fn status_prints_aligned_tables_that_agree_with_stats() {
    let dir = ScratchDir::new();
    let (sluice, a, b, ctl) = start(&dir);
    let _sessions: Vec<_> = (0..3).map(|_| open_session(&sluice)).collect();
    let out = ctl.ok(&["status"]);
    let lines: Vec<&str> = out.lines().collect();
    let header = lines.iter().find(|l| l.starts_with("SERVICE  PROTO")).expect("services table");
    let row = lines.iter().find(|l| l.starts_with("web ")).expect("the web row");
    let end = column_end(header, "ACTIVE");
    assert_eq!(row[..end].trim_end().rsplit(' ').next(), Some("3"), "ACTIVE column:\n{out}");
    assert!(row.len() >= end && row.as_bytes()[end - 1] == b'3', "right-aligned:\n{out}");
    for backend in [a.addr(), b.addr()] {
        let line = lines
            .iter()
            .find(|l| l.contains(&backend.to_string()))
            .unwrap_or_else(|| panic!("{backend}:\n{out}"));
        assert!(line.contains("enabled") && line.contains("healthy"), "{line}");
    }
    assert!(lines.iter().any(|l| l.trim_start().starts_with("WORKER")), "{out}");
    let stats = sluice.admin().with_token(READ_TOKEN).stats();
    assert_eq!(stats["services"][0]["active"], 3);
}

/// `connections` lists the open sessions with their ids, `--service` and `--client`
/// filter them; `kill ID` cuts one (its client sees a reset) and a second kill exits 1.
#[test]
fn connections_and_kill() {
    let dir = ScratchDir::new();
    let (sluice, _a, _b, ctl) = start(&dir);
    let mut victim = open_session(&sluice);
    let _other = open_session(&sluice);
    let client = victim.local_addr().unwrap().to_string();
    let out = ctl.ok(&["connections"]);
    assert!(out.contains("2 connection(s)"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&client))
        .unwrap_or_else(|| panic!("{client} not listed:\n{out}"));
    let id = line.split_whitespace().next().unwrap().to_string();
    assert!(ctl.ok(&["connections", "--service", "nosuch"]).contains("0 connection(s)"));
    assert!(ctl.ok(&["connections", "--client", "10.0.0.0/8"]).contains("0 connection(s)"));
    assert!(ctl
        .ok(&["connections", "--client", "127.0.0.1", "--service", "web"])
        .contains("2 connection(s)"));
    assert!(ctl.ok(&["connections", "--limit", "1"]).contains("1 connection(s)"));
    let killed = ctl.ok(&["kill", &id]);
    assert!(killed.contains(&format!("session {id} cut")), "{killed}");
    set_timeouts(&victim, Duration::from_secs(2));
    assert_eq!(drain(&mut victim).end, End::Reset);
    let again = ctl.run(&["kill", &id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("404: no live session"));
}

/// `drain` makes new sessions avoid a backend and `enable` brings it back; without a
/// token (nor `$SLUICE_TOKEN`) the action exits 1 with the API's 401; with the read token
/// in `$SLUICE_TOKEN` a read works and a write exits 1 with 403.
#[test]
fn backend_actions_and_tokens() {
    let dir = ScratchDir::new();
    let (sluice, a, _b, ctl) = start(&dir);
    let addr = a.addr().to_string();
    let out = ctl.ok(&["drain", "web", &addr]);
    assert_eq!(out.trim(), format!("backend {addr} of service web is now draining"));
    let tags: Vec<u8> =
        (0..4).map(|i| sluice_tests::tagged_round_trip(sluice.addr("web"), &[i]).0).collect();
    assert_eq!(tags, vec![b'B'; 4]);
    ctl.ok(&["enable", "web", &addr]);
    let tags: Vec<u8> =
        (0..4).map(|i| sluice_tests::tagged_round_trip(sluice.addr("web"), &[i]).0).collect();
    assert!(tags.contains(&b'A'), "{tags:?}");

    let anonymous = Ctl { admin: ctl.admin.clone(), token_file: None };
    let refused = anonymous.run(&["disable", "web", &addr]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let read_only = |args: &[&str]| {
        Command::new(binary())
            .args(["ctl", "--admin", &ctl.admin])
            .args(args)
            .env("SLUICE_TOKEN", READ_TOKEN)
            .output()
            .unwrap()
    };
    assert!(read_only(&["status"]).status.success());
    let refused = read_only(&["disable", "web", &addr]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"));
    assert_eq!(
        sluice.admin().with_token(WRITE_TOKEN).stats()["services"][0]["backends"][0]["state"],
        "enabled"
    );
}

/// `reload` of a valid file prints the new version and exits 0; of an invalid one prints
/// each error as FILE:LINE:COL: key: message and exits 1, and the old tables stay.
#[test]
fn reload_prints_errors_with_locations_and_exits_1() {
    let dir = ScratchDir::new();
    let (sluice, _a, _b, ctl) = start(&dir);
    assert!(ctl.ok(&["reload"]).contains("reloaded: tables version 2"));
    let good = std::fs::read_to_string(sluice.config_path()).unwrap();
    let bad = good.replacen("[[service]]\n", "[[service]]\nidle_timeout = \"soon\"\n", 1);
    sluice.write_config_text(&bad);
    let out = ctl.run(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reload refused: the running configuration stays in force"),
        "{stderr}"
    );
    let path = sluice.config_path().display().to_string();
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&path))
        .unwrap_or_else(|| panic!("no located error: {stderr}"));
    assert!(line.contains(": service[0].idle_timeout: "), "{line}");
    assert_eq!(sluice.admin().with_token(READ_TOKEN).stats()["tables_version"], 2);
}

/// `--config FILE` takes the admin address (here a unix socket) and the token file from
/// the file's `[admin]` section.
#[test]
fn the_config_file_names_the_admin_api() {
    let dir = ScratchDir::new();
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .admin_unix(&dir.join("admin.sock"))
        .admin_key(&write_token_file(dir.path()))
        .service(Service::new("web", &[echo.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    let out = Command::new(binary())
        .args(["ctl", "--config"])
        .arg(sluice.config_path())
        .arg("status")
        .env_remove("SLUICE_ADMIN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("web "));
}

/// A tmux server of its own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// `top` in a 120x40 tmux pane shows the service with its live session count as `/stats`
/// has it, the backends and the open connections; the count follows new sessions within
/// the refresh; q quits and the pane's program ends.
#[test]
fn top_shows_live_figures_in_a_terminal_and_quits_on_q() {
    if !prerequisite(Path::new("/usr/bin/tmux").exists(), "tmux (Debian package tmux)") {
        return;
    }
    let dir = ScratchDir::new();
    let (sluice, a, _b, ctl) = start(&dir);
    let mut sessions: Vec<_> = (0..2).map(|_| open_session(&sluice)).collect();
    let tmux = Tmux { socket: format!("sluice-test-{}", std::process::id()) };
    let command = format!(
        "{} ctl --admin {} --token-file {} top",
        binary().display(),
        ctl.admin,
        ctl.token_file.as_ref().unwrap().display()
    );
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "120", "-y", "40", &command]);
    assert!(started.status.success(), "tmux: {}", String::from_utf8_lossy(&started.stderr));
    let web_active = |screen: &str| -> Option<String> {
        let line = screen.lines().find(|l| l.starts_with("web "))?;
        line.split_whitespace().nth(1).map(str::to_string)
    };
    let wait_for = |what: &str, check: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            let screen = tmux.screen();
            if check(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "top never showed {what}:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let screen = wait_for("2 active sessions of web", &|s| web_active(s).as_deref() == Some("2"));
    assert!(screen.contains("q quits") && screen.contains(&a.addr().to_string()), "{screen}");
    assert!(
        screen.lines().filter(|l| l.contains("127.0.0.1:") && l.contains(" web ")).count() >= 2,
        "connections listed:\n{screen}"
    );
    sessions.push(open_session(&sluice));
    wait_for("3 active sessions after a new one", &|s| web_active(s).as_deref() == Some("3"));
    let sent = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(sent.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "top did not quit on q:\n{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(50));
    }
}
