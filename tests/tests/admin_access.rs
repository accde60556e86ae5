//! Who may use the admin API: read and write tokens from `[admin] token_file`, Basic login
//! for browsers, write routes refused where anyone could reach them without a write token
//! (and `sluice check` saying so), the unix socket's mode, tokens replaced by a reload, and
//! token file errors located like config errors.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use sluice_tests::{
    binary, write_token_file, Admin, Backend, Config, Driver, ScratchDir, Service, Sluice,
    READ_TOKEN, WRITE_TOKEN,
};

fn status(admin: &Admin, method: &str, path: &str) -> u16 {
    admin.request(method, path, b"").status
}

fn start_with_tokens(dir: &ScratchDir) -> (Sluice, Backend) {
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .admin_tcp()
        .admin_key(&write_token_file(dir.path()))
        .service(Service::new("web", &[echo.addr()]));
    (Sluice::start(config).expect("epoll runs everywhere"), echo)
}

/// With both tokens set: read routes answer 401 without a token or with a wrong one and
/// 200 with either token; write routes answer 401 without a token, 403 with the read
/// token, and act with the write token; `/healthz` and `/readyz` need none. Refusals carry
/// a JSON error and a `WWW-Authenticate` challenge.
#[test]
fn read_and_write_tokens_grant_their_routes_only() {
    let dir = ScratchDir::new();
    let (sluice, echo) = start_with_tokens(&dir);
    let anonymous = sluice.admin();
    let wrong = anonymous.with_token("a-wrong-token-of-some-length");
    let reader = anonymous.with_token(READ_TOKEN);
    let writer = anonymous.with_token(WRITE_TOKEN);
    let drain = format!("/backends/web/{}/drain", echo.addr());
    for path in ["/stats", "/metrics", "/connections", "/history", "/denials", "/"] {
        assert_eq!(status(&anonymous, "GET", path), 401, "GET {path} without a token");
        assert_eq!(status(&wrong, "GET", path), 401, "GET {path} with a wrong token");
        assert_eq!(status(&reader, "GET", path), 200, "GET {path} with the read token");
        assert_eq!(status(&writer, "GET", path), 200, "GET {path} with the write token");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(status(&anonymous, "GET", path), 200, "{path} is open");
    }
    for (method, path) in
        [("POST", "/reload"), ("POST", drain.as_str()), ("DELETE", "/connections/1")]
    {
        let refused = anonymous.request(method, path, b"");
        assert_eq!(refused.status, 401, "{method} {path} without a token");
        assert!(refused.header("www-authenticate").is_some_and(|c| c.starts_with("Bearer")));
        assert!(refused.json()["error"].as_str().is_some_and(|e| e.contains("write token")));
        assert_eq!(status(&reader, method, path), 403, "{method} {path} with the read token");
    }
    let stats = reader.stats();
    assert_eq!(
        (stats["reloads"].clone(), stats["services"][0]["backends"][0]["state"].clone()),
        (0.into(), "enabled".into())
    );
    assert_eq!(status(&writer, "POST", &drain), 200);
    assert_eq!(status(&writer, "POST", "/reload"), 200);
    assert_eq!(status(&writer, "DELETE", "/connections/1"), 404, "authorized, no such session");
    let stats = reader.stats();
    assert_eq!(
        (stats["reloads"].clone(), stats["services"][0]["backends"][0]["state"].clone()),
        (1.into(), "draining".into())
    );
}

/// A browser without a token gets 401 with a Basic challenge on the dashboard, and the
/// page once it sends the token as the password of Basic credentials (any user name).
#[test]
fn browsers_log_in_with_basic_credentials() {
    let dir = ScratchDir::new();
    let (sluice, _echo) = start_with_tokens(&dir);
    let admin = sluice.admin();
    let challenge = admin.get("/");
    assert_eq!(challenge.status, 401);
    assert!(challenge.header("www-authenticate").is_some_and(|c| c.starts_with("Basic")));
    // "operator:read-token-for-tests-0123456789" in base64.
    let basic = format!("Basic {}", base64(&format!("operator:{READ_TOKEN}")));
    let page = admin
        .try_request("GET", "/", b"", &[("Authorization", &basic)], Duration::from_secs(5))
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>sluice</title>"));
    assert!(page
        .header("content-security-policy")
        .is_some_and(|p| p.contains("default-src 'none'")));
    let basic_wrong = format!("Basic {}", base64("operator:nope"));
    let refused = admin
        .try_request(
            "GET",
            "/stats",
            b"",
            &[("Authorization", &basic_wrong)],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(refused.status, 401);
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Without a write token, an admin API on a non-loopback address (0.0.0.0 here, reached
/// through loopback) refuses write routes with 403 and says how to allow them, answers
/// reads, and `sluice check` warns about it (exit 0).
#[test]
fn writes_are_refused_on_a_public_listener_without_a_write_token() {
    let echo = Backend::echo();
    let config = Config::new(Driver::Epoll)
        .admin_tcp_on([0, 0, 0, 0].into())
        .service(Service::new("web", &[echo.addr()]));
    let sluice = Sluice::start(config).expect("epoll runs everywhere");
    let admin = sluice.admin();
    let refused = admin.post("/reload");
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.json()["error"].as_str().is_some_and(|e| e.contains("admin.token_file")));
    assert_eq!(status(&admin, "POST", &format!("/backends/web/{}/drain", echo.addr())), 403);
    assert_eq!(status(&admin, "GET", "/stats"), 200);
    assert_eq!(admin.stats()["services"][0]["backends"][0]["state"], "enabled");
    let warned = sluice.wait_for_log(
        "write routes (reload, backend actions, killing sessions) will be refused",
        Duration::from_secs(1),
    );
    assert!(warned.is_some(), "sluice run warns at start");

    let check = Command::new(binary())
        .args(["check", "--config"])
        .arg(sluice.config_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "a warning is not an error: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("warning: write routes"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(line.contains("sluice.toml:") && line.contains(": admin.listen: "), "located: {line}");
    assert!(line.contains("is not a loopback address"), "{line}");
}

/// A service that forwards to the admin API (`backends = ["admin"]`) makes every admin
/// connection possibly remote: without a write token, write routes are refused even on a
/// loopback listener, directly and through the service; check warns with the reason.
#[test]
fn exposing_the_admin_api_through_a_service_needs_a_write_token() {
    let config = Config::new(Driver::Epoll).admin_tcp().service(Service::new("ops", &[]));
    let text = config.to_toml().replace("backends = []", "backends = [\"admin\"]");
    let dir = ScratchDir::new();
    let path = dir.join("exposed.toml");
    std::fs::write(&path, &text).unwrap();
    let sluice = Sluice::spawn(&["run", "--config", path.to_str().unwrap()]);
    assert!(sluice.wait_for_log("admin API on", Duration::from_secs(10)).is_some());
    let admin = Admin::new(config.admin.clone().unwrap());
    assert_eq!(status(&admin, "POST", "/reload"), 403, "direct, on loopback");
    let through = Admin::new(sluice_tests::AdminAddr::Tcp(config.services[0].listen[0]));
    assert_eq!(status(&through, "GET", "/stats"), 200, "reads pass through the service");
    assert_eq!(status(&through, "POST", "/reload"), 403, "writes through the service");
    let check = Command::new(binary()).args(["check", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success());
    assert!(stderr.contains("a service forwards to the admin API"), "{stderr}");
}

/// The unix socket is created with mode 0600 by default, and with `socket_mode` when set;
/// a socket_mode on a TCP listener is a check error.
#[test]
fn the_unix_socket_gets_its_mode() {
    for (key, expected) in [
        (None, 0o600),
        (Some("socket_mode = \"0660\""), 0o660),
        (Some("socket_mode = 0o640"), 0o640),
    ] {
        let dir = ScratchDir::new();
        let socket = dir.join("admin.sock");
        let echo = Backend::echo();
        let mut config = Config::new(Driver::Epoll)
            .admin_unix(&socket)
            .service(Service::new("web", &[echo.addr()]));
        if let Some(k) = key {
            config = config.admin_key(k);
        }
        let sluice = Sluice::start(config).expect("epoll runs everywhere");
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, expected, "{key:?}: mode {mode:o}");
        assert_eq!(status(&sluice.admin(), "GET", "/healthz"), 200);
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(stray.is_empty(), "no temporary socket left: {stray:?}");
    }
    let dir = ScratchDir::new();
    let path = dir.join("bad.toml");
    let text = Config::new(Driver::Epoll)
        .admin_tcp()
        .admin_key("socket_mode = \"0600\"")
        .service(Service::new("web", &[Backend::echo().addr()]))
        .to_toml();
    std::fs::write(&path, text).unwrap();
    let check = Command::new(binary()).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr)
        .contains("admin.socket_mode: applies to a unix socket only"));
}

/// Rewriting the token file and reloading (with the old write token) puts the new tokens
/// in force: the old ones are refused, the new ones accepted.
#[test]
fn a_reload_replaces_the_tokens() {
    let dir = ScratchDir::new();
    let (sluice, _echo) = start_with_tokens(&dir);
    let new_read = "rotated-read-token-000000001";
    let new_write = "rotated-write-token-00000001";
    let file = dir.path().join("tokens.toml");
    std::fs::write(&file, format!("read = \"{new_read}\"\nwrite = \"{new_write}\"\n")).unwrap();
    let admin = sluice.admin();
    assert_eq!(status(&admin.with_token(WRITE_TOKEN), "POST", "/reload"), 200);
    assert_eq!(status(&admin.with_token(READ_TOKEN), "GET", "/stats"), 401);
    assert_eq!(status(&admin.with_token(WRITE_TOKEN), "POST", "/reload"), 401);
    assert_eq!(status(&admin.with_token(new_read), "GET", "/stats"), 200);
    assert_eq!(status(&admin.with_token(new_write), "POST", "/reload"), 200);
}

/// A token file with a short token, an unknown key, or that cannot be read is refused by
/// `sluice check` with a line that names the token file (or config), line and key.
#[test]
fn token_file_errors_name_file_line_and_key() {
    let dir = ScratchDir::new();
    let tokens = dir.join("tokens.toml");
    let config = dir.join("sluice.toml");
    let text = Config::new(Driver::Epoll)
        .admin_tcp()
        .admin_key("token_file = \"tokens.toml\"")
        .service(Service::new("web", &[Backend::echo().addr()]))
        .to_toml();
    std::fs::write(&config, text).unwrap();
    let check = || {
        let out = Command::new(binary()).args(["check", "--config"]).arg(&config).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = check();
    assert_eq!(code, Some(2));
    assert!(stderr.contains(": admin.token_file: cannot read token file"), "{stderr}");
    std::fs::write(&tokens, "# tokens\nread = \"short\"\n").unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = check();
    assert_eq!(code, Some(2));
    let expected = format!(
        "{}:2:8: admin.token_file: read: a token has at least 16 characters",
        tokens.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    std::fs::write(&tokens, format!("write = \"{WRITE_TOKEN}\"\nwrites = \"x\"\n")).unwrap();
    let (code, stderr) = check();
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains(&format!("{}:2:", tokens.display())) && stderr.contains("unknown field"),
        "{stderr}"
    );
    std::fs::write(&tokens, format!("write = \"{WRITE_TOKEN}\"\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = check();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("can be read by other users"), "a loose mode is a warning: {stderr}");
}
