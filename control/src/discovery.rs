//! When pools with `dns` or `srv` are looked up, always off the control thread: a round of
//! lookups runs on a helper thread (`sluice-dns`), every due pool at once (at most
//! [`MAX_PARALLEL_LOOKUPS`] at a time), all under one deadline ([`DEFAULT_DNS_DEADLINE`]),
//! and the control thread applies its answers when they arrive. Rounds start at start-up
//! (the control thread waits for that one, bounded by the deadline, while it still obeys
//! stop signals), after every reload, and every `dns_interval`. A changed set republishes
//! the tables (backend states carried over by address through the registry); a failed
//! lookup keeps the last good set and is logged.
//!
//! Invariants: at most one round runs at a time; a pool asked for again while a round runs
//! is looked up by the next round, as soon as this one ends; the control thread never waits
//! on DNS except for the bounded start-up round; an answer is applied only to a pool that
//! still asks the same question.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::clock;
use crate::config::{BackendSpec, Config, DnsSpec};
use crate::dns::{self, DEFAULT_DNS_DEADLINE};

/// Most lookups of a round run at the same time (each on a thread of its own).
pub const MAX_PARALLEL_LOOKUPS: usize = 16;

/// The outcome of one pool's lookup.
#[derive(Debug)]
pub struct Answer {
    pub pool: String,
    pub spec: DnsSpec,
    pub result: Result<Vec<BackendSpec>, String>,
}

/// The schedule of lookups.
#[derive(Debug)]
pub struct Discovery {
    due: HashMap<String, Instant>,
    inflight: bool,
    tx: Sender<Vec<Answer>>,
    rx: Receiver<Vec<Answer>>,
}

impl Default for Discovery {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(1);
        Self { due: HashMap::new(), inflight: false, tx, rx }
    }
}

impl Discovery {
    /// Where the answers of a round arrive.
    pub fn answers(&self) -> &Receiver<Vec<Answer>> {
        &self.rx
    }

    /// Makes every discovered pool of `config` due now (at start, after a reload): the
    /// next [`tick`](Self::tick) starts a round for them, or the one after the round in
    /// flight ends.
    pub fn refresh(&mut self, config: &Config, now: Instant) {
        self.due = lookups(config).into_iter().map(|(name, _)| (name, now)).collect();
    }

    /// Starts a round for the pools that are due, unless one is running; returns whether
    /// it started one.
    pub fn tick(&mut self, config: &Config, now: Instant) -> bool {
        if self.inflight {
            return false;
        }
        let due: Vec<(String, DnsSpec)> = lookups(config)
            .into_iter()
            .filter(|(name, _)| self.due.get(name).is_none_or(|&at| at <= now))
            .collect();
        if due.is_empty() {
            return false;
        }
        for (name, spec) in &due {
            self.due.insert(name.clone(), clock::after(now, spec.interval));
        }
        let tx = self.tx.clone();
        let deadline = clock::after(now, DEFAULT_DNS_DEADLINE);
        let spawned = std::thread::Builder::new().name("sluice-dns".into()).spawn(move || {
            let _ = tx.send(round(due, deadline));
        });
        if let Err(e) = &spawned {
            log::warn!("dns: cannot start a lookup thread: {e}; trying again when next due");
        }
        self.inflight = spawned.is_ok();
        self.inflight
    }

    /// Applies a round's answers to `config`; returns whether a set changed.
    pub fn finish(&mut self, config: &mut Config, answers: Vec<Answer>) -> bool {
        self.inflight = false;
        apply(config, answers)
    }
}

/// Carries the sets found so far over to a reloaded configuration, by pool name, until the
/// next round answers for it: the last good set stays in force meanwhile.
pub fn carry_over(old: &Config, next: &mut Config) {
    for p in next.pools.iter_mut().filter(|p| p.dns.is_some()) {
        if let Some(o) = old.pools.iter().find(|o| o.name == p.name && o.dns.is_some()) {
            p.backends = o.backends.clone();
        }
    }
}

fn lookups(config: &Config) -> Vec<(String, DnsSpec)> {
    config.pools.iter().filter_map(|p| Some((p.name.clone(), p.dns.clone()?))).collect()
}

/// One round: every due lookup, [`MAX_PARALLEL_LOOKUPS`] at a time, all by `deadline`.
fn round(due: Vec<(String, DnsSpec)>, deadline: Instant) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(due.len());
    for batch in due.chunks(MAX_PARALLEL_LOOKUPS) {
        std::thread::scope(|scope| {
            let handles: Vec<_> =
                batch.iter().cloned().map(|d| scope.spawn(move || lookup(d, deadline))).collect();
            answers.extend(handles.into_iter().filter_map(|h| h.join().ok()));
        });
    }
    answers
}

fn lookup((pool, spec): (String, DnsSpec), deadline: Instant) -> Answer {
    let servers: Result<Vec<SocketAddr>, String> =
        spec.resolver.map_or_else(dns::system_resolvers, |r| Ok(vec![r]));
    let result = servers.and_then(|s| dns::resolve(&spec.query, &s, deadline));
    Answer { pool, spec, result }
}

/// Stores each successful answer in its pool (if the pool still asks the same thing);
/// returns whether a set changed.
fn apply(config: &mut Config, answers: Vec<Answer>) -> bool {
    let mut changed = false;
    for a in answers {
        let Some(p) =
            config.pools.iter_mut().find(|p| p.name == a.pool && p.dns.as_ref() == Some(&a.spec))
        else {
            continue;
        };
        match a.result {
            Ok(mut found) => {
                found.sort_by_key(|b| b.addr);
                if found != p.backends {
                    let addrs: Vec<String> = found.iter().map(|b| b.addr.to_string()).collect();
                    log::info!("dns: pool {} now has backends {}", p.name, addrs.join(","));
                    p.backends = found;
                    changed = true;
                }
            }
            Err(e) => log::warn!(
                "dns: lookup of {} for pool {} failed ({e}); keeping its {} backends",
                a.spec.query.name(),
                p.name,
                p.backends.len()
            ),
        }
    }
    changed
}
