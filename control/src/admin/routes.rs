//! The admin API's routes: each request is matched to a route (404 otherwise), its method
//! checked (405 with `Allow`), its token checked ([`auth`](super::auth): 401 or 403), its
//! body read within the body timeout (408) and size (413), then answered. A bad request
//! gets a 4xx with a JSON `error` and changes nothing.
//!
//! | route | method | needs |
//! |---|---|---|
//! | `/` and `/assets/*` (the dashboard) | GET | read |
//! | `/healthz`, `/readyz` | GET | nothing |
//! | `/stats`, `/metrics`, `/history?since=T`, `/denials` | GET | read |
//! | `/connections?limit=N&service=S&client=NET` | GET | read |
//! | `/connections/{id}` | DELETE | write |
//! | `/reload` | POST | write |
//! | `/backends/{service}/{addr}/{enable,disable,drain}` | POST | write |

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Sender, TrySendError};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use ipnet::IpNet;
use serde_json::{json, Value};
use sluice_engine::counters::AdminState;
use sluice_engine::record::LiveSession;

use super::auth::{self, Need, Policy};
use super::{
    dashboard, AdminSpec, ControlRequest, ReloadError, CONTROL_TIMEOUT, DEFAULT_CONNECTIONS_LIMIT,
    MAX_BODY, MAX_CONNECTIONS_LIMIT,
};
use crate::metrics::{self, Shared};

/// An answer.
pub type Answer = Response<Full<Bytes>>;

/// What every request handler shares.
#[derive(Debug)]
pub struct State {
    shared: Arc<Shared>,
    control: Sender<ControlRequest>,
    policy: Policy,
    body_timeout: Duration,
}

/// A matched route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Dashboard,
    Asset(&'a str),
    Healthz,
    Readyz,
    Stats,
    Metrics,
    History,
    Denials,
    Connections,
    Kill(&'a str),
    Reload,
    Backend { service: &'a str, addr: &'a str, action: &'a str },
}

impl Route<'_> {
    fn method(self) -> Method {
        match self {
            Route::Kill(_) => Method::DELETE,
            Route::Reload | Route::Backend { .. } => Method::POST,
            _ => Method::GET,
        }
    }

    fn need(self) -> Need {
        match self {
            Route::Healthz | Route::Readyz => Need::Open,
            Route::Kill(_) | Route::Reload | Route::Backend { .. } => Need::Write,
            _ => Need::Read,
        }
    }
}

fn route<'a>(segments: &'a [String]) -> Option<Route<'a>> {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    Some(match segments.as_slice() {
        [] => Route::Dashboard,
        ["assets", name] => Route::Asset(name),
        ["healthz"] => Route::Healthz,
        ["readyz"] => Route::Readyz,
        ["stats"] => Route::Stats,
        ["metrics"] => Route::Metrics,
        ["history"] => Route::History,
        ["denials"] => Route::Denials,
        ["connections"] => Route::Connections,
        ["connections", id] => Route::Kill(id),
        ["reload"] => Route::Reload,
        ["backends", service, addr, action] => Route::Backend { service, addr, action },
        _ => return None,
    })
}

impl State {
    pub fn new(shared: Arc<Shared>, control: Sender<ControlRequest>, spec: &AdminSpec) -> Self {
        Self { shared, control, policy: spec.policy(), body_timeout: spec.limits.body_timeout }
    }

    /// Answers one request. `answering` is called once the request is admitted and read:
    /// from then on its connection is busy, not waiting.
    pub async fn answer(&self, request: Request<Incoming>, answering: impl FnOnce()) -> Answer {
        let uri = request.uri().clone();
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        let segments: Vec<String> =
            path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
        let Some(route) = route(&segments) else {
            return error(404, &format!("no such endpoint: {path}"));
        };
        let allowed = route.method();
        if request.method() != allowed {
            let mut r = error(405, &format!("{path} takes {allowed} only"));
            if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
                r.headers_mut().insert(ALLOW, v);
            }
            return r;
        }
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::presented);
        let tokens = self.shared.admin_tokens.load();
        if let Err(refused) = self.policy.check(&tokens, route.need(), presented.as_deref()) {
            return refusal(refused, route);
        }
        if let Err(r) = self.read_body(request.into_body()).await {
            return r;
        }
        answering();
        self.dispatch(route, query).await
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, Answer> {
        let too_large = || error(413, &format!("request body is larger than {MAX_BODY} bytes"));
        if hyper::body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
            return Err(too_large());
        }
        let collect = Limited::new(body, MAX_BODY).collect();
        match tokio::time::timeout(self.body_timeout, collect).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(error(400, &format!("cannot read the request body: {e}"))),
            Err(_) => Err(error(
                408,
                &format!("the request body did not arrive within {:?}", self.body_timeout),
            )),
        }
    }

    async fn dispatch(&self, route: Route<'_>, query: &str) -> Answer {
        let shared = &self.shared;
        match route {
            Route::Dashboard => dashboard::page(),
            Route::Asset(name) => dashboard::asset(name),
            Route::Healthz => json_response(
                200,
                &json!({ "status": "alive", "uptime_seconds": shared.started.elapsed().as_secs() }),
            ),
            Route::Readyz => readiness(shared),
            Route::Stats => json_response(200, &metrics::stats(shared)),
            Route::Metrics => text_response(metrics::prometheus(shared)),
            Route::History => history(shared, query),
            Route::Denials => json_response(200, &shared.denials.to_json()),
            Route::Connections => self.connections(query).await,
            Route::Kill(id) => self.kill(id).await,
            Route::Reload => self.reload().await,
            Route::Backend { service, addr, action } => {
                backend_action(shared, service, addr, action)
            }
        }
    }

    /// Sends a request to the control thread and awaits its answer; 503 when the control
    /// thread is stopping, busy, or does not answer within [`CONTROL_TIMEOUT`].
    async fn ask<T>(
        &self,
        request: impl FnOnce(super::Reply<T>) -> ControlRequest,
    ) -> Result<T, Answer> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.control.try_send(request(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(error(503, "the control thread is busy; try again"))
            }
            Err(TrySendError::Disconnected(_)) => return Err(error(503, "sluice is stopping")),
        }
        match tokio::time::timeout(CONTROL_TIMEOUT, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(error(503, "sluice is stopping")),
            Err(_) => Err(error(503, "the control thread did not answer in time")),
        }
    }

    async fn connections(&self, query: &str) -> Answer {
        let filter = match SessionFilter::parse(query) {
            Ok(f) => f,
            Err(message) => return error(400, &message),
        };
        let ask = if filter.is_empty() { filter.limit } else { MAX_CONNECTIONS_LIMIT };
        match self.ask(|reply| ControlRequest::Sessions { limit: ask, reply }).await {
            Ok(sessions) => {
                let kept: Vec<LiveSession> =
                    sessions.into_iter().filter(|s| filter.matches(s)).take(filter.limit).collect();
                json_response(200, &metrics::connections(&kept))
            }
            Err(r) => r,
        }
    }

    async fn kill(&self, id: &str) -> Answer {
        let Ok(id) = id.parse::<u64>() else {
            return error(400, &format!("{id:?} is not a session id (the `id` of /connections)"));
        };
        match self.ask(|reply| ControlRequest::Kill { id, reply }).await {
            Ok(true) => {
                log::info!("admin: session {id} cut (reason admin_kill)");
                json_response(
                    200,
                    &json!({ "id": id.to_string(), "result": "cut", "reason": "admin_kill" }),
                )
            }
            Ok(false) => error(404, &format!("no live session {id}")),
            Err(r) => r,
        }
    }

    async fn reload(&self) -> Answer {
        match self.ask(|reply| ControlRequest::Reload { reply }).await {
            Ok(Ok(version)) => {
                json_response(200, &json!({ "result": "reloaded", "tables_version": version }))
            }
            Ok(Err(refused)) => json_response(422, &reload_error(&refused)),
            Err(r) => r,
        }
    }
}

fn reload_error(refused: &ReloadError) -> Value {
    let errors: Vec<Value> = refused
        .errors
        .iter()
        .map(|e| {
            json!({
                "file": e.file, "line": e.line, "column": e.column, "key": e.key,
                "message": e.message,
            })
        })
        .collect();
    json!({ "error": refused.message, "errors": errors })
}

/// `/readyz`: 200 while every worker runs, the tables are loaded and sluice is not
/// stopping; 503 with the reasons otherwise.
fn readiness(shared: &Shared) -> Answer {
    let mut reasons = Vec::new();
    if shared.tables.load().version == 0 {
        reasons.push("no tables loaded");
    }
    if !shared.workers_running.load(std::sync::atomic::Ordering::Relaxed) {
        reasons.push("a worker has stopped");
    }
    if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        reasons.push("stopping: listeners closed, sessions draining");
    }
    let ready = reasons.is_empty();
    let status = if ready { 200 } else { 503 };
    json_response(
        status,
        &json!({
            "ready": ready,
            "reasons": reasons,
            "tables_version": shared.tables.load().version,
            "workers": shared.workers.len(),
        }),
    )
}

fn history(shared: &Shared, query: &str) -> Answer {
    let mut since = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => match v.parse::<u64>() {
                Ok(t) => since = t,
                Err(_) => return error(400, "since must be a time in seconds since 1970"),
            },
            _ => return error(400, &format!("unknown query parameter {pair:?}; expected since=T")),
        }
    }
    json_response(200, &shared.history_json(since))
}

/// The filters of `/connections`.
#[derive(Debug, Default)]
struct SessionFilter {
    limit: usize,
    service: Option<String>,
    client: Option<IpNet>,
}

impl SessionFilter {
    fn parse(query: &str) -> Result<Self, String> {
        let mut f = SessionFilter { limit: DEFAULT_CONNECTIONS_LIMIT, ..Default::default() };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "limit" => match value.parse::<usize>() {
                    Ok(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => f.limit = n,
                    _ => return Err(format!("limit must be a number from 1 to {MAX_CONNECTIONS_LIMIT}")),
                },
                "service" => f.service = Some(value),
                "client" => f.client = Some(parse_net(&value)?),
                _ => {
                    return Err(format!(
                        "unknown query parameter {pair:?}; expected limit=N, service=NAME or client=NET"
                    ))
                }
            }
        }
        Ok(f)
    }

    fn is_empty(&self) -> bool {
        self.service.is_none() && self.client.is_none()
    }

    fn matches(&self, s: &LiveSession) -> bool {
        self.service.as_deref().is_none_or(|name| *s.service == *name)
            && self.client.is_none_or(|net| net.contains(&s.client.ip()))
    }
}

/// A network (`10.0.0.0/8`) or a single address.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("client={text:?} is not a network such as 10.0.0.0/8 or an address"))
}

fn backend_action(shared: &Shared, service: &str, addr: &str, action: &str) -> Answer {
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

/// Decodes `%XX` escapes; a malformed escape is kept as it is.
pub fn percent_decode(s: &str) -> String {
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

/// An answer with `body` and `content_type`, marked not to be cached or sniffed.
pub fn respond(status: u16, content_type: &'static str, body: Vec<u8>) -> Answer {
    let len = body.len();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

fn json_response(status: u16, value: &Value) -> Answer {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn text_response(text: String) -> Answer {
    respond(200, "text/plain; version=0.0.4; charset=utf-8", text.into_bytes())
}

fn error(status: u16, message: &str) -> Answer {
    json_response(status, &json!({ "error": message }))
}

/// A 401 or 403. A 401 on the dashboard asks the browser for credentials (Basic: any user
/// name, the token as password); elsewhere it names the Bearer scheme.
fn refusal(refused: auth::Refused, route: Route<'_>) -> Answer {
    let mut r = error(refused.status, &refused.message);
    if refused.status == 401 {
        let challenge = match route {
            Route::Dashboard | Route::Asset(_) => {
                "Basic realm=\"sluice admin (user: any, password: the token)\", charset=\"UTF-8\""
            }
            _ => "Bearer realm=\"sluice admin\"",
        };
        r.headers_mut().insert("www-authenticate", HeaderValue::from_static(challenge));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_ipv6_brackets_and_bad_escapes() {
        assert_eq!(percent_decode("%5B%3A%3A1%5D:80"), "[::1]:80");
        assert_eq!(percent_decode("a%zzb%"), "a%zzb%");
    }

    #[test]
    fn routes_match_with_their_method_and_access() {
        let seg =
            |p: &str| p.split('/').filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>();
        let cases = [
            ("/", Method::GET, Need::Read),
            ("/healthz", Method::GET, Need::Open),
            ("/readyz", Method::GET, Need::Open),
            ("/stats", Method::GET, Need::Read),
            ("/connections/42", Method::DELETE, Need::Write),
            ("/reload", Method::POST, Need::Write),
            ("/backends/web/127.0.0.1:1/drain", Method::POST, Need::Write),
        ];
        for (path, method, need) in cases {
            let segments = seg(path);
            let r = route(&segments).unwrap_or_else(|| panic!("{path} unmatched"));
            assert_eq!((r.method(), r.need()), (method, need), "{path}");
        }
        assert!(route(&seg("/nosuch")).is_none());
        assert!(route(&seg("/connections/1/2")).is_none());
    }

    #[test]
    fn connection_filters_parse_and_match() {
        let f = SessionFilter::parse("service=web&client=10.0.0.0%2F8&limit=5").unwrap();
        assert_eq!((f.limit, f.service.as_deref()), (5, Some("web")));
        let session = |service: &str, client: &str| LiveSession {
            id: 1,
            worker: 0,
            service: service.into(),
            client: client.parse().unwrap(),
            listener: "127.0.0.1:1".parse().unwrap(),
            backend: None,
            state: "relaying",
            age: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
        };
        assert!(f.matches(&session("web", "10.1.2.3:5")));
        assert!(!f.matches(&session("web", "11.1.2.3:5")));
        assert!(!f.matches(&session("api", "10.1.2.3:5")));
        assert!(SessionFilter::parse("client=banana").is_err());
        assert!(SessionFilter::parse("limit=0").is_err());
        assert!(SessionFilter::parse("color=red").is_err());
        assert_eq!(
            SessionFilter::parse("client=::1").unwrap().client,
            Some("::1/128".parse().unwrap())
        );
    }
}
