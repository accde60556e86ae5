//! A real headless Chromium driven over WebDriver: Debian's `chromium` and its
//! `chromedriver` (package `chromium-driver`), spoken to with the small HTTP client of
//! [`crate::admin`]. The browser runs with a fresh profile and every background network
//! feature off (this machine's network is closed): `--headless --no-sandbox --disable-gpu
//! --disable-quic --no-first-run --disable-background-networking --disable-component-update
//! --disable-sync --user-data-dir=<fresh>`.
//!
//! Invariants: chromedriver listens on a free loopback port and is killed (with the
//! browser) on drop; every WebDriver call has a timeout.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::exchange;
use crate::ports::free_port;
use crate::sluice::ScratchDir;

/// The browser and its driver, as Debian installs them.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long one WebDriver call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One browser session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: ScratchDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Browser({})", self.session)
    }
}

impl Browser {
    /// Whether Chromium and chromedriver are installed.
    pub fn available() -> bool {
        Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
    }

    /// Starts chromedriver and a headless Chromium with a `width` x `height` window.
    pub fn start(width: u32, height: u32) -> Browser {
        let port = free_port(Ipv4Addr::LOCALHOST.into());
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}"));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let profile = ScratchDir::new();
        let mut browser = Browser { driver, addr, session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(15);
        while browser
            .raw("GET", "/status", None)
            .map(|v| v["value"]["ready"] != true)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
            format!("--window-size={width},{height}"),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let created = browser.raw("POST", "/session", Some(capabilities)).expect("new session");
        browser.session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> std::io::Result<Value> {
        let mut stream = TcpStream::connect_timeout(&self.addr, CALL_TIMEOUT)?;
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(CALL_TIMEOUT))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        // chromedriver answers only requests addressed to a local host name.
        let host = self.addr.to_string();
        let headers =
            [("Content-Type", "application/json; charset=utf-8"), ("Host", host.as_str())];
        let answer = exchange(&mut stream, method, path, body.as_bytes(), &headers)?;
        serde_json::from_slice(&answer.body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// A command of this session; panics with WebDriver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let answer =
            self.raw(method, &path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        if answer["value"]["error"].is_string() {
            panic!("{method} {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": script, "args": args })))
    }

    /// Evaluates `expression` in the page.
    pub fn eval(&self, expression: &str) -> Value {
        self.script(&format!("return ({expression});"), json!([]))
    }

    /// Waits up to `timeout` for `expression` to be truthy; returns its last value.
    pub fn wait_for(&self, expression: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression);
            let truthy =
                !matches!(v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let page = self.eval("document.body.innerText.slice(0, 1500)");
                panic!(
                    "the page never showed: {expression} (last {v}); the page says:\n{}",
                    page.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The WebDriver element reference of the first match of `css`.
    fn element(&self, css: &str) -> Value {
        let found =
            self.call("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        found
            .as_object()
            .and_then(|o| o.values().next().cloned())
            .unwrap_or_else(|| panic!("no element {css}"))
    }

    /// Clicks the first element matching `css`, as a mouse would.
    pub fn click(&self, css: &str) {
        let id = self.element(css);
        let id = id.as_str().expect("element id");
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Types `text` into whatever has the focus, key by key (WebDriver key codes such as
    /// `\u{E007}` for Enter and `\u{E004}` for Tab work too).
    pub fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.push(json!({ "type": "keyDown", "value": c.to_string() }));
            actions.push(json!({ "type": "keyUp", "value": c.to_string() }));
        }
        let body = json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] });
        self.call("POST", "/actions", Some(body));
    }

    /// Saves a PNG of the page as the browser window shows it.
    pub fn screenshot(&self, path: &Path) {
        let data = self.call("GET", "/screenshot", None);
        let png = base64_decode(data.as_str().expect("base64 screenshot")).expect("valid base64");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes().filter(|c| !c.is_ascii_whitespace()) {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
