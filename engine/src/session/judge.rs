//! The session's policy, decided once and kept for its life: the firewall's verdict, the
//! service's session limits, shaping and byte cap, capture, the pool and each backend
//! attempt; and its accounting when it ends. All of it against the tables the session was
//! admitted under, with the time passed in.

use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use super::{Connect, Phase, Session};
use crate::acl::{Action as Verdict, Query};
use crate::balance::{client_key, Pick, Pool};
use crate::capture::CapturePolicy;
use crate::counters::WorkerStats;
use crate::proxy;
use crate::record::CloseReason;
use crate::shape::{self, PooledShaper};
use crate::socket_options::BackendSocket;
use crate::tables::Decision;

impl Session {
    /// Decides the session with the firewall (given the client's TLS server name, if one was
    /// read), then with the service's limits. An allowed session gets its shaper and
    /// capture and starts connecting; a refused one closes as `denied` or `limit`.
    pub(super) fn decide(&mut self, sni: Option<&str>, now: Instant) {
        self.peek.restore();
        let wall = self.start_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let q = Query { client: self.client, listener: self.listener, now: wall, sni };
        let decision = self.admitted.tables.judge(self.admitted.service, &q);
        let allowed = matches!(decision.action, Verdict::Allow { .. });
        self.decision = Some(decision);
        if !allowed {
            WorkerStats::add(&self.service().counters.denied, 1);
            return self.refuse(CloseReason::Denied);
        }
        let s = self.admitted.service();
        let at = shape::nanos(now);
        let account = self.admitted.tables.accounting.as_ref();
        match s.limit_state.admit(&s.limits, account, self.client.ip(), at) {
            Ok(ticket) => self.ticket = Some(ticket),
            Err(_) => {
                WorkerStats::add(&s.counters.limited, 1);
                return self.refuse(CloseReason::Limit);
            }
        }
        self.shaper = self.shaper_at(at);
        self.capture = self.decision.as_ref().and_then(|d| d.capture);
        self.pool_start = self.pool().start();
        self.phase = Phase::Connecting { since: now, aborting: false };
        self.connect = Connect::Start;
    }

    pub(super) fn refuse(&mut self, reason: CloseReason) {
        self.refusal = Some(reason);
        self.close(reason);
    }

    /// The shaper of an allowed session: the service's and the rule's bandwidth blocks and
    /// the byte cap, or `None` when none applies.
    fn shaper_at(&self, now: u64) -> Option<PooledShaper> {
        let s = self.service();
        let rule = self.decision.as_ref().and_then(|d| d.bandwidth.as_ref());
        let blocks = [s.bandwidth.as_ref(), rule];
        if s.limits.max_bytes.is_none() && blocks.iter().all(Option::is_none) {
            return None;
        }
        let mut shaper = PooledShaper::with_byte_cap(s.limits.max_bytes);
        for bw in blocks.into_iter().flatten() {
            bw.attach(&mut shaper, self.client.ip(), now);
        }
        Some(shaper)
    }

    /// The pool this session's rule sends it to, or the service's own.
    pub(super) fn pool(&self) -> &Pool {
        let s = self.service();
        match self.decision {
            Some(Decision { action: Verdict::Allow { pool: Some(i) }, .. }) => {
                self.admitted.tables.pools.get(i).map_or(&s.pool, |p| &p.pool)
            }
            _ => &s.pool,
        }
    }

    /// Chooses the backend of the next connect attempt with the pool's algorithm among the
    /// eligible backends this session has not tried; false when none is left.
    pub(super) fn begin_attempt(&mut self, now: Instant) -> bool {
        let pick = Pick {
            start: self.pool_start,
            key: client_key(self.client),
            tried: self.tried.as_slice(),
            now,
        };
        let Some(i) = self.pool().pick(&pick) else { return false };
        self.backend = Some(self.pool().backends()[i].clone());
        self.tried.push(i);
        true
    }

    /// The current connect attempt failed: counted, and the backend ejected after too many
    /// consecutive failures (the control plane's health checker logs the ejection).
    pub(super) fn attempt_failed(&self, now: Instant) {
        WorkerStats::add(&self.stats.connect_errors, 1);
        WorkerStats::add(&self.service().counters.connect_errors, 1);
        let Some(b) = &self.backend else { return };
        WorkerStats::add(&b.state.connect_errors, 1);
        if let Some(i) = self.tried.last() {
            self.pool().connect_failed(i, now);
        }
    }

    /// Whether a refused session's client must see a reset rather than a clean close.
    pub(super) fn deny_resets(&self) -> bool {
        match self.refusal {
            Some(CloseReason::Limit) => self.service().limits.reset,
            _ => matches!(
                self.decision,
                Some(Decision { action: Verdict::Deny { reset: true }, .. })
            ),
        }
    }

    /// The PROXY protocol header to send to the backend before any relayed byte, if the
    /// session's pool asks for one.
    pub fn preamble(&self) -> Option<proxy::Encoded> {
        let version = self.pool().send_proxy?;
        Some(proxy::encode(version, self.client, self.destination))
    }

    /// How the socket of the current connect attempt is made: the service's backend
    /// options, bound as the pool's `source` says (the client's own address, or a local one).
    pub fn backend_socket(&self) -> Option<BackendSocket> {
        let backend = self.backend.as_ref()?.addr;
        let options = self.service().backend_socket;
        Some(BackendSocket::new(options, self.pool().source, self.client, backend))
    }

    /// The capture policy of a captured session, and its service's name.
    pub fn capture(&self) -> Option<(&Arc<CapturePolicy>, &Arc<str>)> {
        let policy = self.admitted.tables.captures.get(self.capture?)?;
        Some((policy, &self.service().name))
    }

    /// Adds the bytes moved since the last time to the client's and network's totals.
    pub(super) fn account_bytes(&mut self) {
        let Some(ticket) = &self.ticket else { return };
        let (up, down) = (self.lanes[0].bytes, self.lanes[1].bytes);
        let [up_done, down_done] = self.accounted;
        ticket.account(up.saturating_sub(up_done), down.saturating_sub(down_done));
        self.accounted = [up, down];
    }

    /// The accounting of a session that ends for `reason`: its places and limits given
    /// back, its bytes and outcome added to the service's, backend's and worker's counters.
    pub(super) fn account(&mut self, reason: CloseReason) {
        self.admitted.release();
        self.account_bytes();
        self.ticket = None;
        self.shaper = None;
        let (up, down) = (self.lanes[0].bytes, self.lanes[1].bytes);
        let counters = &self.service().counters;
        WorkerStats::add(&counters.bytes_up, up);
        WorkerStats::add(&counters.bytes_down, down);
        if matches!(reason, CloseReason::ByteCap | CloseReason::MaxDuration) {
            WorkerStats::add(&counters.cut, 1);
        }
        if !self.relayed && !matches!(reason, CloseReason::Denied | CloseReason::Limit) {
            WorkerStats::add(&counters.unserved, 1);
        }
        if reason == CloseReason::NoBackend {
            WorkerStats::add(&counters.no_backend, 1);
        }
        if reason == CloseReason::ProxyError {
            WorkerStats::add(&counters.proxy_errors, 1);
        }
        if let (true, Some(b)) = (self.relayed, &self.backend) {
            b.state.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            WorkerStats::add(&b.state.bytes_up, up);
            WorkerStats::add(&b.state.bytes_down, down);
        }
        let stats = &self.stats;
        stats.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        WorkerStats::add(&stats.closed, 1);
        WorkerStats::add(&stats.bytes_up, up);
        WorkerStats::add(&stats.bytes_down, down);
    }
}
