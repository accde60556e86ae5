//! The administration interface: HTTP/1.1 on a TCP address (loopback by default) or a unix
//! socket, served by its own thread. Reads (`/stats`, `/metrics`) come straight from the
//! shared counters; anything that needs the engine or the configuration (`/connections`,
//! `/reload`) is asked of the control thread over a channel, so the control thread stays the
//! only owner of the configuration.
//!
//! Routes: `GET /stats`, `GET /connections?limit=N`, `GET /metrics`, `POST /reload`,
//! `POST /backends/{service}/{addr}/{enable|disable|drain}`. A bad request gets a 4xx with a
//! JSON `error` and changes nothing.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::{json, Value};
use sluice_engine::events::AdminState;
use sluice_engine::worker::LiveSession;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::metrics::{self, Shared};

/// Where the admin API listens when `[admin]` gives no `listen`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9900";
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Sessions listed by `/connections` without `limit`, and the most it may ask for.
pub const DEFAULT_CONNECTIONS_LIMIT: usize = 100;
pub const MAX_CONNECTIONS_LIMIT: usize = 100_000;
/// How long a request waits for the control thread.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the admin API waits before listening again after its accepting failed (the
/// HTTP server stops accepting on any accept error, such as running out of fds).
pub const ADMIN_RELISTEN: Duration = Duration::from_millis(200);

/// The admin API's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl AdminAddr {
    /// Parses `ip:port`, `unix:/path` or an absolute `/path`.
    pub fn parse(text: &str) -> Result<AdminAddr, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(AdminAddr::Unix(PathBuf::from(text)));
        }
        text.parse().map(AdminAddr::Tcp).map_err(|_| {
            format!("{text:?} is not an address:port such as \"127.0.0.1:9900\" or a socket path such as \"unix:/run/sluice.sock\"")
        })
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "http://{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the admin thread asks of the control thread.
#[derive(Debug)]
pub enum ControlRequest {
    /// Re-read the configuration file; the answer is the new tables version or the errors.
    Reload { reply: Sender<Result<u64, String>> },
    /// Live sessions, at most `limit`.
    Sessions { limit: usize, reply: Sender<Vec<LiveSession>> },
}

/// The running admin server. If accepting fails (out of fds), it listens again on the same
/// address until it can, so the API outlives the overload it is there to observe.
pub struct Admin {
    server: Arc<Mutex<Arc<Server>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn bind(addr: &AdminAddr) -> Result<Server, String> {
    match addr {
        AdminAddr::Tcp(a) => Server::http(a),
        AdminAddr::Unix(path) => {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            Server::http_unix(path)
        }
    }
    .map_err(|e| format!("admin API cannot listen on {addr}: {e}"))
}

/// Serves until stopped, listening again whenever the server's accepting ends.
fn serve(
    addr: &AdminAddr,
    current: &Mutex<Arc<Server>>,
    stopping: &AtomicBool,
    shared: &Shared,
    control: &Sender<ControlRequest>,
) {
    loop {
        let serving = current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for request in serving.incoming_requests() {
            handle(request, shared, control);
        }
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        log::warn!("admin API stopped accepting on {addr}; listening again");
        let mut logged = false;
        loop {
            std::thread::sleep(ADMIN_RELISTEN);
            let mut slot = current.lock().unwrap_or_else(PoisonError::into_inner);
            if stopping.load(Ordering::Relaxed) {
                return;
            }
            match bind(addr) {
                Ok(server) => {
                    *slot = Arc::new(server);
                    break;
                }
                Err(e) if !logged => {
                    logged = true;
                    log::warn!("{e}; trying again every {ADMIN_RELISTEN:?}");
                }
                Err(_) => {}
            }
        }
    }
}

impl Admin {
    /// Binds the address and starts serving.
    pub fn start(
        addr: &AdminAddr,
        shared: Arc<Shared>,
        control: Sender<ControlRequest>,
    ) -> Result<Admin, String> {
        let server = Arc::new(Mutex::new(Arc::new(bind(addr)?)));
        let stopping = Arc::new(AtomicBool::new(false));
        let (current, stop, addr) = (server.clone(), stopping.clone(), addr.clone());
        let thread = std::thread::Builder::new()
            .name("sluice-admin".into())
            .spawn(move || serve(&addr, &current, &stop, &shared, &control))
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        Ok(Admin { server, stopping, thread: Some(thread) })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.server.lock().unwrap_or_else(PoisonError::into_inner).unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Reply = Response<std::io::Cursor<Vec<u8>>>;

fn handle(mut request: Request, shared: &Shared, control: &Sender<ControlRequest>) {
    let response = match read_body(&mut request) {
        Ok(_) => route(&request, shared, control),
        Err(r) => r,
    };
    let _ = request.respond(response);
}

fn read_body(request: &mut Request) -> Result<Vec<u8>, Reply> {
    if request.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(error(413, &format!("request body is larger than {MAX_BODY} bytes")));
    }
    let mut body = Vec::new();
    let read = request.as_reader().take(MAX_BODY as u64 + 1).read_to_end(&mut body);
    match read {
        Ok(n) if n > MAX_BODY => {
            Err(error(413, &format!("request body is larger than {MAX_BODY} bytes")))
        }
        Ok(_) => Ok(body),
        Err(e) => Err(error(400, &format!("cannot read the request body: {e}"))),
    }
}

fn route(request: &Request, shared: &Shared, control: &Sender<ControlRequest>) -> Reply {
    let url = request.url();
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let segments: Vec<String> =
        path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = request.method();
    let allowed = match segments.as_slice() {
        ["stats"] | ["connections"] | ["metrics"] => Method::Get,
        ["reload"] | ["backends", _, _, _] => Method::Post,
        _ => return error(404, &format!("no such endpoint: {path}")),
    };
    if *method != allowed {
        let mut r = error(405, &format!("{path} takes {allowed} only"));
        if let Ok(h) = Header::from_bytes("Allow", allowed.as_str()) {
            r.add_header(h);
        }
        return r;
    }
    match segments.as_slice() {
        ["stats"] => json_response(200, &metrics::stats(shared)),
        ["metrics"] => text_response(metrics::prometheus(shared)),
        ["connections"] => connections(query, control),
        ["reload"] => reload(control),
        ["backends", service, addr, action] => backend_action(shared, service, addr, action),
        _ => error(404, "no such endpoint"),
    }
}

fn connections(query: &str, control: &Sender<ControlRequest>) -> Reply {
    let mut limit = DEFAULT_CONNECTIONS_LIMIT;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => limit = n,
                _ => {
                    return error(
                        400,
                        &format!("limit must be a number from 1 to {MAX_CONNECTIONS_LIMIT}"),
                    )
                }
            },
            _ => return error(400, &format!("unknown query parameter {pair:?}; expected limit=N")),
        }
    }
    let (reply, answer) = crossbeam_channel::bounded(1);
    if control.send(ControlRequest::Sessions { limit, reply }).is_err() {
        return error(503, "sluice is stopping");
    }
    match answer.recv_timeout(CONTROL_TIMEOUT) {
        Ok(sessions) => json_response(200, &metrics::connections(&sessions)),
        Err(_) => error(503, "the control thread did not answer in time"),
    }
}

fn reload(control: &Sender<ControlRequest>) -> Reply {
    let (reply, answer) = crossbeam_channel::bounded(1);
    if control.send(ControlRequest::Reload { reply }).is_err() {
        return error(503, "sluice is stopping");
    }
    match answer.recv_timeout(CONTROL_TIMEOUT) {
        Ok(Ok(version)) => {
            json_response(200, &json!({ "result": "reloaded", "tables_version": version }))
        }
        Ok(Err(message)) => error(422, &message),
        Err(_) => error(503, "the control thread did not answer in time"),
    }
}

fn backend_action(shared: &Shared, service: &str, addr: &str, action: &str) -> Reply {
    let state = match action {
        "enable" => AdminState::Enabled,
        "disable" => AdminState::Disabled,
        "drain" => AdminState::Draining,
        other => {
            return error(
                400,
                &format!("unknown action {other:?}; expected enable, disable or drain"),
            )
        }
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return error(400, &format!("{addr:?} is not a backend address such as 127.0.0.1:8000"));
    };
    let tables = shared.tables.load();
    let Some(s) = tables.service(service) else {
        return error(404, &format!("no service named {service:?}"));
    };
    let Some(backend) = s.pool.backends().iter().find(|b| b.addr == addr) else {
        return error(404, &format!("service {service:?} has no backend {addr}"));
    };
    backend.state.set_admin(state);
    log::info!("admin: backend {addr} of service {service} is now {}", state.as_str());
    json_response(
        200,
        &json!({ "service": service, "backend": addr.to_string(), "state": state.as_str() }),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: u16, value: &Value) -> Reply {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::from_data(body).with_status_code(status);
    if let Ok(h) = Header::from_bytes("Content-Type", "application/json") {
        r.add_header(h);
    }
    r
}

fn text_response(text: String) -> Reply {
    let mut r = Response::from_data(text.into_bytes()).with_status_code(200);
    if let Ok(h) = Header::from_bytes("Content-Type", "text/plain; version=0.0.4; charset=utf-8") {
        r.add_header(h);
    }
    r
}

fn error(status: u16, message: &str) -> Reply {
    json_response(status, &json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_parse() {
        assert_eq!(
            AdminAddr::parse("127.0.0.1:9900"),
            Ok(AdminAddr::Tcp("127.0.0.1:9900".parse().unwrap()))
        );
        assert_eq!(AdminAddr::parse("unix:/run/s.sock"), Ok(AdminAddr::Unix("/run/s.sock".into())));
        assert_eq!(AdminAddr::parse("/run/s.sock"), Ok(AdminAddr::Unix("/run/s.sock".into())));
        assert!(AdminAddr::parse("localhost").is_err());
    }

    #[test]
    fn percent_decoding_handles_ipv6_brackets_and_bad_escapes() {
        assert_eq!(percent_decode("%5B%3A%3A1%5D:80"), "[::1]:80");
        assert_eq!(percent_decode("a%zzb%"), "a%zzb%");
    }
}
