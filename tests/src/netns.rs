//! Network namespaces a test makes for itself: [`Netns`] creates named namespaces, veth
//! pairs between them, addresses, routes, rules and nexthop groups (all through `ip`, many
//! at once with [`Netns::batch`]), reads what `ip` shows ([`Netns::output`]), runs code
//! inside one on a thread of its own ([`Netns::run_in`], setns(2) affects only that thread),
//! and deletes every namespace it made when dropped, panics included (deleting a namespace
//! removes its veth ends). Names carry the process id and a counter, so tests running in
//! parallel never share one.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{setns, CloneFlags};

use crate::sluice::IP;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Namespaces made by one test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    prefix: String,
    made: Vec<String>,
}

impl Netns {
    /// Whether this process may make namespaces (root with `ip`); a test without skips.
    pub fn available() -> bool {
        nix::unistd::geteuid().is_root() && std::path::Path::new(IP).exists()
    }

    /// A fresh set; namespaces are added with [`Netns::add`].
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self { prefix: format!("sl{}x{n}", std::process::id() % 100_000), made: Vec::new() }
    }

    /// The full name of namespace `short` of this set.
    pub fn name(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// Makes namespace `short` with its loopback up; returns its full name.
    pub fn add(&mut self, short: &str) -> String {
        let name = self.name(short);
        ip(&["netns", "add", &name]);
        self.made.push(name.clone());
        self.exec(short, &["ip", "link", "set", "lo", "up"]);
        name
    }

    /// Runs a command in namespace `short`; panics when it fails.
    pub fn exec(&self, short: &str, command: &[&str]) {
        let name = self.name(short);
        let mut args = vec!["netns", "exec", &name];
        args.extend_from_slice(command);
        ip(&args);
    }

    /// Runs `ip` commands (each without the leading `ip`, such as `"addr add 10.0.0.2/24 dev
    /// a-b"`) in namespace `short` through one `ip -batch`; panics when one fails.
    pub fn batch(&self, short: &str, commands: &[String]) {
        let name = self.name(short);
        let mut child = Command::new(IP)
            .args(["-n", &name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run ip: {e}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all((commands.join("\n") + "\n").as_bytes()).expect("write ip -batch input");
        drop(stdin);
        let out = child.wait_with_output().expect("wait for ip -batch");
        assert!(
            out.status.success(),
            "ip -n {name} -batch:\n{}\n{}",
            commands.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What `ip ARGS` prints in namespace `short`; panics when it fails.
    pub fn output(&self, short: &str, args: &[&str]) -> String {
        let name = self.name(short);
        let out = Command::new(IP)
            .args(["-n", &name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run ip: {e}"));
        assert!(
            out.status.success(),
            "ip -n {name} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Joins namespaces `a` and `b` with a veth pair, each end given its address
    /// (`"10.0.0.1/24"`) and up. The ends are made right inside their namespaces, so their
    /// names (`{a}-{b}` in `a`, `{b}-{a}` in `b`) need be unique only there. Returns them.
    pub fn link(&self, a: &str, a_addr: &str, b: &str, b_addr: &str) -> (String, String) {
        let (ea, eb) = (format!("{a}-{b}"), format!("{b}-{a}"));
        assert!(ea.len() < 16, "interface names are at most 15 characters: {ea}");
        let (na, nb) = (self.name(a), self.name(b));
        ip(&["link", "add", &ea, "netns", &na, "type", "veth", "peer", "name", &eb, "netns", &nb]);
        for (ns, end, addr) in [(a, &ea, a_addr), (b, &eb, b_addr)] {
            self.exec(ns, &["ip", "addr", "add", addr, "dev", end]);
            self.exec(ns, &["ip", "link", "set", end, "up"]);
        }
        (ea, eb)
    }

    /// Runs `f` on a new thread inside namespace `short` and returns what it returns.
    pub fn run_in<T: Send + 'static>(
        &self,
        short: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/var/run/netns/{}", self.name(short));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Spawns `f` on a thread inside namespace `short` (for a server that keeps running).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        short: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name(short));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.made.drain(..) {
            let _ = Command::new(IP).args(["netns", "del", &name]).status();
        }
    }
}

/// Runs `ip` with `args`; panics with its error output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new(IP).args(args).output().unwrap_or_else(|e| panic!("run ip: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
