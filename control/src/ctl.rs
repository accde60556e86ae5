//! `sluice ctl`: a client of the admin API for operators. It reaches the API on TCP or a
//! unix socket (`--admin`, `$SLUICE_ADMIN`, or the `[admin]` section of `--config`), with a
//! token from `--token-file` (the admin's token file, or a file holding one token) or
//! `$SLUICE_TOKEN`, and prints what it gets as aligned tables.
//!
//! Exit status: 0 when the API did what was asked, 1 when it refused (the reason is
//! printed: a reload's errors with file, line and key) or could not be reached, 2 for a
//! usage error (clap).

mod top;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::admin::auth::{self, Tokens};
use crate::admin::{AdminAddr, DEFAULT_ADMIN_LISTEN};

/// How long one request may take, connection included.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(15);
/// Environment variables read when no option is given.
pub const ADMIN_ENV: &str = "SLUICE_ADMIN";
pub const TOKEN_ENV: &str = "SLUICE_TOKEN";

/// Where the admin API is and the tokens to present.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: AdminAddr,
    pub tokens: Tokens,
}

/// The options every `ctl` command shares.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub admin: Option<String>,
    pub config: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl Target {
    /// Resolves the address and tokens: options first, then the environment, then the
    /// config file's `[admin]` section, then the default address.
    pub fn resolve(options: &Options) -> Result<Target, String> {
        let from_config = match &options.config {
            Some(path) => admin_section(path)?,
            None => (None, None),
        };
        let addr_text = options
            .admin
            .clone()
            .or_else(|| std::env::var(ADMIN_ENV).ok().filter(|a| !a.is_empty()))
            .or(from_config.0)
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let addr = AdminAddr::parse(addr_text.trim_start_matches("http://"))?;
        let token_file = options.token_file.clone().or(from_config.1);
        let tokens = match token_file {
            Some(path) => read_tokens(&path)?,
            None => match std::env::var(TOKEN_ENV) {
                Ok(t) if !t.trim().is_empty() => {
                    Tokens { read: Some(t.trim().into()), write: Some(t.trim().into()) }
                }
                _ => Tokens::default(),
            },
        };
        Ok(Target { addr, tokens })
    }

    /// Sends one request and returns the status and the body as JSON (or as a string
    /// when it is not JSON). A write presents the write token, a read the read token (or
    /// the write token when there is no read token).
    pub fn request(&self, method: Method, path: &str, write: bool) -> Result<(u16, Value), String> {
        let token = if write {
            self.tokens.write.as_ref()
        } else {
            self.tokens.read.as_ref().or(self.tokens.write.as_ref())
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let exchange = exchange(&self.addr, method.clone(), path, token.map(String::as_str));
        let result = runtime.block_on(async { tokio::time::timeout(CTL_TIMEOUT, exchange).await });
        let (status, body) = match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(format!("cannot reach the admin API at {}: {e}", self.addr)),
            Err(_) => {
                return Err(format!(
                    "the admin API at {} did not answer within {CTL_TIMEOUT:?}",
                    self.addr
                ))
            }
        };
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        Ok((status, value))
    }

    /// [`request`](Self::request), with any status but 200 turned into an error that
    /// carries the API's message.
    pub fn get_ok(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.request(Method::GET, path, false)?;
        if status != 200 {
            return Err(refusal(status, &body));
        }
        Ok(body)
    }
}

/// The message of an error answer.
pub fn refusal(status: u16, body: &Value) -> String {
    let message = body["error"].as_str().map(str::to_string).unwrap_or_else(|| body.to_string());
    format!("{status}: {message}")
}

/// `listen` and `token_file` of a config file's `[admin]` section (the token file relative
/// to the config file), without validating or resolving the rest of the file.
fn admin_section(path: &Path) -> Result<(Option<String>, Option<PathBuf>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let Some(admin) = table.get("admin").and_then(|a| a.as_table()) else {
        return Err(format!("{} has no [admin] section", path.display()));
    };
    let listen = admin.get("listen").and_then(|v| v.as_str()).map(str::to_string);
    let token_file = admin.get("token_file").and_then(|v| v.as_str()).map(|t| {
        let t = Path::new(t);
        match path.parent() {
            Some(dir) if t.is_relative() => dir.join(t),
            _ => t.to_path_buf(),
        }
    });
    Ok((listen.or_else(|| Some(DEFAULT_ADMIN_LISTEN.to_string())), token_file))
}

/// The tokens of a token file: the admin's (TOML with `read` and `write`), or a file that
/// holds one token on its first line.
fn read_tokens(path: &Path) -> Result<Tokens, String> {
    let text = auth::read_token_file(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    if let Ok(tokens) = auth::parse_tokens(&text) {
        return Ok(tokens);
    }
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
    match line {
        Some(token) => Ok(Tokens { read: Some(token.into()), write: Some(token.into()) }),
        None => Err(format!("token file {} holds no token", path.display())),
    }
}

async fn exchange(
    addr: &AdminAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Bytes), String> {
    match addr {
        AdminAddr::Tcp(a) => {
            let stream = tokio::net::TcpStream::connect(a).await.map_err(|e| e.to_string())?;
            send(stream, method, path, token).await
        }
        AdminAddr::Unix(p) => {
            let stream = tokio::net::UnixStream::connect(p).await.map_err(|e| e.to_string())?;
            send(stream, method, path, token).await
        }
    }
}

async fn send<S>(
    stream: S,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sluice")
        .header("user-agent", concat!("sluice-ctl/", env!("CARGO_PKG_VERSION")));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

/// What `sluice ctl` was asked to do.
#[derive(Debug, Clone)]
pub enum Action {
    Status,
    Connections { service: Option<String>, client: Option<String>, limit: Option<usize> },
    Kill { id: String },
    Backend { action: &'static str, service: String, addr: String },
    Reload,
    Top { interval: Duration, iterations: Option<u64> },
}

/// Runs one command; `Ok` text is printed to stdout, `Err` to stderr with exit status 1.
pub fn run(target: &Target, action: Action) -> Result<String, String> {
    match action {
        Action::Status => status(&target.get_ok("/stats")?),
        Action::Connections { service, client, limit } => {
            let mut query = Vec::new();
            if let Some(s) = service {
                query.push(format!("service={}", encode(&s)));
            }
            if let Some(c) = client {
                query.push(format!("client={}", encode(&c)));
            }
            if let Some(n) = limit {
                query.push(format!("limit={n}"));
            }
            let path = if query.is_empty() {
                "/connections".to_string()
            } else {
                format!("/connections?{}", query.join("&"))
            };
            Ok(connections(&target.get_ok(&path)?))
        }
        Action::Kill { id } => {
            let (status, body) =
                target.request(Method::DELETE, &format!("/connections/{}", encode(&id)), true)?;
            match status {
                200 => Ok(format!("session {id} cut (reason admin_kill)\n")),
                _ => Err(refusal(status, &body)),
            }
        }
        Action::Backend { action, service, addr } => {
            let path = format!("/backends/{}/{}/{action}", encode(&service), encode(&addr));
            let (status, body) = target.request(Method::POST, &path, true)?;
            match status {
                200 => Ok(format!(
                    "backend {} of service {} is now {}\n",
                    body["backend"].as_str().unwrap_or(&addr),
                    service,
                    body["state"].as_str().unwrap_or("?")
                )),
                _ => Err(refusal(status, &body)),
            }
        }
        Action::Reload => reload(target),
        Action::Top { interval, iterations } => {
            top::run(target, interval, iterations).map(|()| String::new())
        }
    }
}

fn reload(target: &Target) -> Result<String, String> {
    let (status, body) = target.request(Method::POST, "/reload", true)?;
    match status {
        200 => Ok(format!("reloaded: tables version {} in force\n", body["tables_version"])),
        422 => {
            let mut out =
                String::from("reload refused: the running configuration stays in force\n");
            let errors = body["errors"].as_array().cloned().unwrap_or_default();
            for e in &errors {
                let _ = writeln!(
                    out,
                    "{}:{}:{}: {}: {}",
                    e["file"].as_str().unwrap_or("?"),
                    e["line"],
                    e["column"],
                    e["key"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("?")
                );
            }
            if errors.is_empty() {
                let _ = writeln!(out, "{}", body["error"].as_str().unwrap_or("refused"));
            }
            Err(out.trim_end().to_string())
        }
        _ => Err(refusal(status, &body)),
    }
}

/// Percent-encodes what a path segment or query value cannot hold as it is.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A table with a header row; columns whose header starts with `>` are right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let titles: Vec<&str> = headers.iter().map(|h| h.trim_start_matches('>')).collect();
    let right: Vec<bool> = headers.iter().map(|h| h.starts_with('>')).collect();
    let mut widths: Vec<usize> = titles.iter().map(|t| t.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                text.push_str("  ");
            }
            if right[i] {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&titles.iter().map(|t| t.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    out
}

fn n(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), thousands)
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes with a binary unit.
pub fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Milliseconds as `12s`, `3m04s`, `2h03m`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn status(stats: &Value) -> Result<String, String> {
    let mut out = format!(
        "sluice {} · driver {} · up {} · tables v{} · reloads {} ({} refused)\n\n",
        stats["version"].as_str().unwrap_or("?"),
        stats["driver"].as_str().unwrap_or("?"),
        age(stats["uptime_seconds"].as_u64().unwrap_or(0) * 1000),
        stats["tables_version"],
        stats["reloads"],
        stats["reload_failures"]
    );
    let services = list(&stats["services"]);
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s["name"].as_str().unwrap_or("?").to_string(),
                s["protocol"].as_str().unwrap_or("tcp").to_string(),
                list(&s["listen"]).iter().filter_map(|l| l.as_str()).collect::<Vec<_>>().join(","),
                n(&s["active"]),
                n(&s["sessions"]),
                bytes(s["bytes_up"].as_u64().unwrap_or(0)),
                bytes(s["bytes_down"].as_u64().unwrap_or(0)),
                n(&s["denied"]),
                n(&s["connect_errors"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SERVICE",
            "PROTO",
            "LISTEN",
            ">ACTIVE",
            ">SESSIONS",
            ">IN",
            ">OUT",
            ">DENIED",
            ">CONNECT ERRORS",
        ],
        &rows,
    ));
    let mut rows = Vec::new();
    for s in &services {
        for b in list(&s["backends"]) {
            let health = &b["health"];
            let condition = if health["ejected"].as_bool() == Some(true) {
                "ejected"
            } else if health["healthy"].as_bool() == Some(false) {
                "down"
            } else {
                "healthy"
            };
            rows.push(vec![
                s["name"].as_str().unwrap_or("?").to_string(),
                b["addr"].as_str().unwrap_or("?").to_string(),
                b["state"].as_str().unwrap_or("?").to_string(),
                condition.to_string(),
                if health["up"].as_bool() == Some(true) { "yes" } else { "no" }.to_string(),
                n(&health["weight"]),
                n(&b["active"]),
                n(&b["sessions"]),
                n(&b["connect_errors"]),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "SERVICE",
            "BACKEND",
            "STATE",
            "HEALTH",
            "TAKES NEW",
            ">WEIGHT",
            ">ACTIVE",
            ">SESSIONS",
            ">CONNECT ERRORS",
        ],
        &rows,
    ));
    let rows: Vec<Vec<String>> = list(&stats["workers"])
        .iter()
        .map(|w| {
            vec![
                n(&w["id"]),
                n(&w["accepted"]),
                n(&w["active"]),
                n(&w["closed"]),
                n(&w["accept_errors"]),
                n(&w["connect_errors"]),
                n(&w["accept_backoffs"]),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            ">WORKER",
            ">ACCEPTED",
            ">ACTIVE",
            ">CLOSED",
            ">ACCEPT ERRORS",
            ">CONNECT ERRORS",
            ">BACKOFFS",
        ],
        &rows,
    ));
    Ok(out)
}

fn connections(list_json: &Value) -> String {
    let rows: Vec<Vec<String>> = list(&list_json["connections"])
        .iter()
        .map(|c| {
            vec![
                c["id"].as_str().unwrap_or("?").to_string(),
                c["client"].as_str().unwrap_or("?").to_string(),
                c["service"].as_str().unwrap_or("?").to_string(),
                c["backend"].as_str().unwrap_or("-").to_string(),
                c["state"].as_str().unwrap_or("?").to_string(),
                age(c["age_ms"].as_u64().unwrap_or(0)),
                bytes(c["bytes_up"].as_u64().unwrap_or(0)),
                bytes(c["bytes_down"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    let mut out =
        table(&["ID", "CLIENT", "SERVICE", "BACKEND", "STATE", ">AGE", ">IN", ">OUT"], &rows);
    let _ = writeln!(out, "{} connection(s)", rows.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_left_and_right() {
        let t = table(
            &["NAME", ">N"],
            &[vec!["a".into(), "1".into()], vec!["long".into(), "1,000".into()]],
        );
        assert_eq!(t, "NAME      N\na         1\nlong  1,000\n");
    }

    #[test]
    fn figures_read_at_a_glance() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(age(4_000), "4s");
        assert_eq!(age(184_000), "3m04s");
        assert_eq!(age(7_380_000), "2h03m");
        assert_eq!(encode("[::1]:80"), "%5B::1%5D:80");
        assert_eq!(encode("10.0.0.0/8"), "10.0.0.0%2F8");
    }
}
