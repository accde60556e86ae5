//! `sluice ctl top`: a live terminal view of the admin API, redrawn every interval (one
//! second by default) until `q` (or Ctrl-C, or Esc) is pressed.
//!
//! Invariants: the terminal is put back as it was (echo, line mode, main screen, cursor)
//! whatever ends the view; when stdin is not a terminal the view still runs and still
//! quits on a `q` line; a failed poll of the API is shown in the view, not fatal.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use serde_json::Value;

use super::{age, bytes, list, table, thousands, Target};

/// Connections listed, longest-lived first.
const TOP_CONNECTIONS: usize = 12;

/// Raw keyboard mode for as long as it lives.
struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    fn enter(stdin: BorrowedFd<'_>) -> RawMode {
        let Ok(saved) = termios::tcgetattr(stdin) else { return RawMode { saved: None } };
        let mut raw = saved.clone();
        raw.local_flags.remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
        let _ = termios::tcsetattr(stdin, SetArg::TCSANOW, &raw);
        let mut out = io::stdout();
        let _ = out.write_all(b"\x1b[?1049h\x1b[?25l");
        let _ = out.flush();
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let mut out = io::stdout();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// Shows the view until quit, or for `iterations` redraws when given.
pub fn run(target: &Target, interval: Duration, iterations: Option<u64>) -> Result<(), String> {
    let stdin = io::stdin();
    let _raw = RawMode::enter(stdin.as_fd());
    let mut view = View::default();
    let mut drawn = 0u64;
    loop {
        let frame = view.frame(target);
        let mut out = io::stdout();
        let _ = write!(out, "\x1b[H\x1b[2J{}", frame.replace('\n', "\r\n"));
        let _ = out.flush();
        drawn += 1;
        if iterations.is_some_and(|n| drawn >= n) {
            return Ok(());
        }
        if wait_for_quit(stdin.as_fd(), interval) {
            return Ok(());
        }
    }
}

/// Waits up to `interval` for a key; true when it asks to quit.
fn wait_for_quit(stdin: BorrowedFd<'_>, interval: Duration) -> bool {
    let deadline = Instant::now() + interval;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stdin, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => return false,
            Ok(_) => {
                let mut key = [0u8; 64];
                match io::stdin().read(&mut key) {
                    // End of input: nobody can press q any more.
                    Ok(0) => return true,
                    Ok(n) => {
                        if key[..n].iter().any(|&k| matches!(k, b'q' | b'Q' | 3 | 27)) {
                            return true;
                        }
                    }
                    Err(_) => return true,
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

/// What the view remembers between frames: the history seen so far.
#[derive(Default)]
struct View {
    since: u64,
    /// The latest history sample: `[time, total, [service...]]`.
    latest: Option<Value>,
    names: Vec<String>,
}

impl View {
    fn frame(&mut self, target: &Target) -> String {
        let stats = match target.get_ok("/stats") {
            Ok(s) => s,
            Err(e) => return format!("sluice ctl top: {e}\n\n(q quits; trying again)\n"),
        };
        if let Ok(history) = target.get_ok(&format!("/history?since={}", self.since)) {
            self.names = list(&history["services"])
                .iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect();
            if let Some(last) = list(&history["samples"]).last() {
                self.since = last[0].as_u64().unwrap_or(self.since);
                self.latest = Some(last.clone());
            }
        }
        let connections = target.get_ok(&format!("/connections?limit={TOP_CONNECTIONS}")).ok();
        self.render(&stats, connections.as_ref())
    }

    /// `[active, new/s, up B/s, down B/s, denied/s]` of a service (or the total).
    fn figures(&self, service: Option<&str>) -> Option<Vec<u64>> {
        let latest = self.latest.as_ref()?;
        let figures = match service {
            None => &latest[1],
            Some(name) => &latest[2][self.names.iter().position(|n| n == name)?],
        };
        Some(list(figures).iter().map(|v| v.as_u64().unwrap_or(0)).collect())
    }

    fn render(&self, stats: &Value, connections: Option<&Value>) -> String {
        let rate = |f: &Option<Vec<u64>>, i: usize, unit: bool| match f {
            Some(f) if unit => format!("{}/s", bytes(f[i])),
            Some(f) => thousands(f[i]),
            None => "-".into(),
        };
        let total = self.figures(None);
        let active: u64 =
            list(&stats["services"]).iter().filter_map(|s| s["active"].as_u64()).sum();
        let mut out = format!(
            "sluice {} · {} · up {} · tables v{} · reloads {}          q quits\n",
            stats["version"].as_str().unwrap_or("?"),
            stats["driver"].as_str().unwrap_or("?"),
            age(stats["uptime_seconds"].as_u64().unwrap_or(0) * 1000),
            stats["tables_version"],
            stats["reloads"],
        );
        out.push_str(&format!(
            "active {}   new/s {}   in {}   out {}   denied/s {}\n\n",
            thousands(active),
            rate(&total, 1, false),
            rate(&total, 2, true),
            rate(&total, 3, true),
            rate(&total, 4, false),
        ));
        let services = list(&stats["services"]);
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|s| {
                let name = s["name"].as_str().unwrap_or("?");
                let f = self.figures(Some(name));
                vec![
                    name.to_string(),
                    thousands(s["active"].as_u64().unwrap_or(0)),
                    rate(&f, 1, false),
                    rate(&f, 2, true),
                    rate(&f, 3, true),
                    thousands(s["sessions"].as_u64().unwrap_or(0)),
                    thousands(s["denied"].as_u64().unwrap_or(0)),
                ]
            })
            .collect();
        out.push_str(&table(
            &["SERVICE", ">ACTIVE", ">NEW/S", ">IN/S", ">OUT/S", ">SESSIONS", ">DENIED"],
            &rows,
        ));
        let mut rows = Vec::new();
        for s in &services {
            for b in list(&s["backends"]) {
                rows.push(vec![
                    b["addr"].as_str().unwrap_or("?").to_string(),
                    s["name"].as_str().unwrap_or("?").to_string(),
                    b["state"].as_str().unwrap_or("?").to_string(),
                    if b["health"]["up"].as_bool() == Some(true) { "up" } else { "down" }
                        .to_string(),
                    thousands(b["active"].as_u64().unwrap_or(0)),
                    thousands(b["connect_errors"].as_u64().unwrap_or(0)),
                ]);
            }
        }
        out.push('\n');
        out.push_str(&table(&["BACKEND", "SERVICE", "STATE", "NEW", ">ACTIVE", ">ERRORS"], &rows));
        if let Some(c) = connections {
            let rows: Vec<Vec<String>> = list(&c["connections"])
                .iter()
                .map(|c| {
                    vec![
                        c["id"].as_str().unwrap_or("?").to_string(),
                        c["client"].as_str().unwrap_or("?").to_string(),
                        c["service"].as_str().unwrap_or("?").to_string(),
                        age(c["age_ms"].as_u64().unwrap_or(0)),
                        bytes(c["bytes_up"].as_u64().unwrap_or(0)),
                        bytes(c["bytes_down"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&table(
                &["CONNECTION", "CLIENT", "SERVICE", ">AGE", ">IN", ">OUT"],
                &rows,
            ));
        }
        out
    }
}
