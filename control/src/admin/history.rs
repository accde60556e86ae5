//! What the dashboard charts and lists beyond the live counters: a per-second history of
//! the last hour ([`History`], served at `/history`) and the latest denied connections
//! ([`Denials`], served at `/denials`).
//!
//! Invariants:
//! - the history holds at most [`HISTORY_SECONDS`] samples (the oldest goes first), each
//!   with the process totals and the figures of at most [`HISTORY_SERVICES`] services (the
//!   first ones seen, by name; a service removed by a reload keeps its past);
//! - one sample per second: seconds the sampler missed get samples of their own, sharing
//!   the difference so the samples sum exactly to what was counted;
//! - rates are differences of cumulative counts, never negative: byte counts add the running bytes of live sessions to those of closed
//!   ones, read in that order, so a session closing between the two reads is missed for
//!   one sample and counted in the next, never counted twice;
//! - the control thread samples (it owns the engine); readers lock only to copy out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde_json::{json, Value};
use sluice_engine::record::{Record, RecordKind};

use crate::logger::rfc3339;

/// Samples kept: one hour of seconds.
pub const HISTORY_SECONDS: usize = 3600;
/// Services with a history of their own; the totals cover every service.
pub const HISTORY_SERVICES: usize = 16;
/// Denied connections kept for `/denials`.
pub const DEFAULT_RECENT_DENIALS: usize = 100;

/// Cumulative counts of one service at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Sessions open now.
    pub active: u64,
    /// Sessions accepted since start.
    pub sessions: u64,
    /// Bytes relayed client -> backend and back, closed and live sessions.
    pub up: u64,
    pub down: u64,
    /// Connections the firewall denied.
    pub denied: u64,
}

/// One second's figures of a service or of the whole process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub active: u64,
    /// New sessions per second.
    pub new: u64,
    /// Bytes per second, each way.
    pub up: u64,
    pub down: u64,
    /// Denials per second.
    pub denied: u64,
}

impl Figures {
    fn add(&mut self, other: &Figures) {
        self.active += other.active;
        self.new += other.new;
        self.up += other.up;
        self.down += other.down;
        self.denied += other.denied;
    }

    fn to_json(self) -> Value {
        json!([self.active, self.new, self.up, self.down, self.denied])
    }

    /// Second `k` of `seconds`' share of these differences: an even share, plus one for the
    /// first `remainder` seconds; `active` is a level, not a difference, and stays whole.
    fn share(&self, seconds: u64, k: u64) -> Figures {
        let part = |total: u64| total / seconds + u64::from(k < total % seconds);
        Figures {
            active: self.active,
            new: part(self.new),
            up: part(self.up),
            down: part(self.down),
            denied: part(self.denied),
        }
    }
}

#[derive(Debug)]
struct Sample {
    /// Seconds since 1970.
    time: u64,
    total: Figures,
    /// By index in [`History::names`]; shorter when later services were added since.
    services: Vec<Figures>,
}

/// The per-second history ring.
#[derive(Debug, Default)]
pub struct History {
    names: Vec<Arc<str>>,
    samples: VecDeque<Sample>,
    previous: HashMap<Arc<str>, Observed>,
    last_time: Option<u64>,
}

impl History {
    /// Adds the sample of second `time` from every service's cumulative counts. When the
    /// sampler missed seconds (a busy control thread), each missed second gets a sample of
    /// its own with an even share of the difference, the remainder going to the earliest, so
    /// the samples still come one a second and their sum is exactly what was counted.
    pub fn record(&mut self, time: u64, observed: &[(Arc<str>, Observed)]) {
        if self.last_time.is_some_and(|t| time <= t) {
            return;
        }
        let seconds = self.last_time.map_or(1, |t| time - t).min(HISTORY_SECONDS as u64);
        self.last_time = Some(time);
        let mut differences: Vec<(Option<usize>, Figures)> = Vec::with_capacity(observed.len());
        for (name, now) in observed {
            let difference = match self.previous.insert(name.clone(), *now) {
                Some(before) => Figures {
                    active: now.active,
                    new: now.sessions.saturating_sub(before.sessions),
                    up: now.up.saturating_sub(before.up),
                    down: now.down.saturating_sub(before.down),
                    denied: now.denied.saturating_sub(before.denied),
                },
                None => Figures { active: now.active, ..Figures::default() },
            };
            let index = match self.names.iter().position(|n| n == name) {
                Some(i) => Some(i),
                None if self.names.len() < HISTORY_SERVICES => {
                    self.names.push(name.clone());
                    Some(self.names.len() - 1)
                }
                None => None,
            };
            differences.push((index, difference));
        }
        self.previous.retain(|name, _| observed.iter().any(|(n, _)| n == name));
        for k in 0..seconds {
            let mut total = Figures::default();
            let mut services = vec![Figures::default(); self.names.len()];
            for (index, difference) in &differences {
                let figures = difference.share(seconds, k);
                total.add(&figures);
                if let Some(i) = index {
                    services[*i] = figures;
                }
            }
            if self.samples.len() == HISTORY_SECONDS {
                self.samples.pop_front();
            }
            self.samples.push_back(Sample { time: time + 1 + k - seconds, total, services });
        }
    }

    /// Samples after `since` (seconds since 1970; 0 for all) as JSON: each sample is
    /// `[time, total, [service...]]` and each figure list `[active, new/s, up B/s, down
    /// B/s, denied/s]`, in the order `fields` names.
    pub fn to_json(&self, since: u64) -> Value {
        let samples: Vec<Value> = self
            .samples
            .iter()
            .filter(|s| s.time > since)
            .map(|s| {
                let services: Vec<Value> = s.services.iter().map(|f| f.to_json()).collect();
                json!([s.time, s.total.to_json(), services])
            })
            .collect();
        json!({
            "interval_seconds": 1,
            "capacity": HISTORY_SECONDS,
            "fields": ["active", "new_per_second", "bytes_up_per_second", "bytes_down_per_second", "denied_per_second"],
            "services": self.names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "samples": samples,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A history shared by the sampler and the readers.
#[derive(Debug, Default)]
pub struct SharedHistory(Mutex<History>);

impl SharedHistory {
    pub fn record(&self, time: u64, observed: &[(Arc<str>, Observed)]) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).record(time, observed);
    }

    pub fn to_json(&self, since: u64) -> Value {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).to_json(since)
    }
}

/// One denied connection.
#[derive(Debug, Clone)]
struct Denial {
    time: SystemTime,
    service: Arc<str>,
    client: std::net::SocketAddr,
    listener: std::net::SocketAddr,
    rule: Option<Arc<str>>,
    reason: &'static str,
}

/// The latest denied connections, newest last, fed by the log thread from deny records.
#[derive(Debug)]
pub struct Denials {
    capacity: usize,
    recent: Mutex<VecDeque<Denial>>,
}

impl Default for Denials {
    fn default() -> Self {
        Self { capacity: DEFAULT_RECENT_DENIALS, recent: Mutex::default() }
    }
}

impl Denials {
    /// Keeps `record` if it is a denial.
    pub fn note(&self, record: &Record) {
        if record.kind != RecordKind::Deny {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(Denial {
            time: record.end,
            service: record.service.clone(),
            client: record.client,
            listener: record.listener,
            rule: record.rule.clone(),
            reason: record.reason.map_or("denied", |r| r.as_str()),
        });
    }

    /// Newest first.
    pub fn to_json(&self) -> Value {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let list: Vec<Value> = recent
            .iter()
            .rev()
            .map(|d| {
                json!({
                    "time": rfc3339(d.time),
                    "service": &*d.service,
                    "client": d.client.to_string(),
                    "listener": d.listener.to_string(),
                    "rule": d.rule.as_deref().unwrap_or(crate::config::DEFAULT_RULE),
                    "reason": d.reason,
                })
            })
            .collect();
        json!({ "capacity": self.capacity, "denials": list })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(sessions: u64, up: u64) -> Observed {
        Observed { active: 1, sessions, up, down: up * 2, denied: 0 }
    }

    #[test]
    fn rates_are_differences_per_second_and_never_negative() {
        let mut h = History::default();
        let web: Arc<str> = "web".into();
        h.record(100, &[(web.clone(), obs(10, 1000))]);
        h.record(101, &[(web.clone(), obs(15, 4000))]);
        // Three seconds later: second 102 and 103 each get a sample, sharing the difference
        // of 11 sessions and 4001 bytes exactly (the remainder to the earliest).
        h.record(104, &[(web.clone(), obs(26, 8001))]);
        // A session closed between the reads: the count dips; no negative rate.
        h.record(105, &[(web.clone(), obs(26, 7000))]);
        let times: Vec<u64> = h.samples.iter().map(|s| s.time).collect();
        let news: Vec<u64> = h.samples.iter().map(|s| s.services[0].new).collect();
        let ups: Vec<u64> = h.samples.iter().map(|s| s.total.up).collect();
        assert_eq!(times, [100, 101, 102, 103, 104, 105]);
        assert_eq!(news, [0, 5, 4, 4, 3, 0]);
        assert_eq!(ups, [0, 3000, 1334, 1334, 1333, 0]);
        h.record(105, &[(web, obs(30, 9000))]);
        assert_eq!(h.len(), 6, "a second already sampled is not sampled again");
    }

    #[test]
    fn the_ring_keeps_one_hour_and_a_bounded_set_of_services() {
        let mut h = History::default();
        let names: Vec<Arc<str>> =
            (0..HISTORY_SERVICES + 4).map(|i| format!("s{i}").into()).collect();
        for t in 0..(HISTORY_SECONDS as u64 + 10) {
            let observed: Vec<_> = names.iter().map(|n| (n.clone(), obs(t, t))).collect();
            h.record(t + 1, &observed);
        }
        assert_eq!(h.len(), HISTORY_SECONDS);
        assert_eq!(h.samples.front().map(|s| s.time), Some(11));
        assert_eq!(h.names.len(), HISTORY_SERVICES);
        // The totals still count every service: 20 services, one new session/s each.
        assert_eq!(h.samples.back().unwrap().total.new, names.len() as u64);
        let json = h.to_json(HISTORY_SECONDS as u64 + 8);
        assert_eq!(json["samples"].as_array().map(Vec::len), Some(2));
    }
}
