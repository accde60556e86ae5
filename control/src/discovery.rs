//! When pools with `dns` or `srv` are looked up: at start and on every reload (in the
//! control thread, before the tables are compiled), and every `dns_interval` in a helper
//! thread whose answers the control thread applies. A changed set republishes the tables
//! (backend states carried over by address through the registry); a failed lookup keeps
//! the last good set and is logged.
//!
//! Invariant: at most one background lookup round runs at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::config::{BackendSpec, Config, DnsSpec};
use crate::dns::{self, DEFAULT_DNS_TIMEOUT};

/// The outcome of one pool's lookup.
#[derive(Debug)]
pub struct Answer {
    pub pool: String,
    pub spec: DnsSpec,
    pub result: Result<Vec<BackendSpec>, String>,
}

/// The schedule of background lookups.
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
    /// Where background answers arrive.
    pub fn answers(&self) -> &Receiver<Vec<Answer>> {
        &self.rx
    }

    /// Looks up every discovered pool of `config` now (blocking, bounded by the query
    /// timeouts), keeping the sets already in `config` where a lookup fails, and schedules
    /// the next lookups.
    pub fn resolve_now(&mut self, config: &mut Config) {
        let answers: Vec<Answer> = lookups(config).into_iter().map(lookup).collect();
        apply(config, answers);
        let now = Instant::now();
        self.due = config
            .pools
            .iter()
            .filter_map(|p| Some((p.name.clone(), now + p.dns.as_ref()?.interval)))
            .collect();
    }

    /// Starts a background round for the pools that are due, unless one is running.
    pub fn tick(&mut self, config: &Config, now: Instant) {
        if self.inflight {
            return;
        }
        let due: Vec<(String, DnsSpec)> = lookups(config)
            .into_iter()
            .filter(|(name, _)| self.due.get(name).is_none_or(|&at| at <= now))
            .collect();
        if due.is_empty() {
            return;
        }
        for (name, spec) in &due {
            self.due.insert(name.clone(), now + spec.interval);
        }
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new().name("sluice-dns".into()).spawn(move || {
            let _ = tx.send(due.into_iter().map(lookup).collect());
        });
        self.inflight = spawned.is_ok();
    }

    /// Applies a background round's answers to `config`; returns whether a set changed.
    pub fn finish(&mut self, config: &mut Config, answers: Vec<Answer>) -> bool {
        self.inflight = false;
        apply(config, answers)
    }
}

/// Carries the sets found so far over to a reloaded configuration, for pools whose lookup
/// did not change.
pub fn carry_over(old: &Config, next: &mut Config) {
    for p in next.pools.iter_mut().filter(|p| p.dns.is_some()) {
        if let Some(o) = old.pools.iter().find(|o| o.name == p.name && o.dns == p.dns) {
            p.backends = o.backends.clone();
        }
    }
}

fn lookups(config: &Config) -> Vec<(String, DnsSpec)> {
    config.pools.iter().filter_map(|p| Some((p.name.clone(), p.dns.clone()?))).collect()
}

fn lookup((pool, spec): (String, DnsSpec)) -> Answer {
    let resolver: Result<SocketAddr, String> = spec.resolver.map_or_else(dns::system_resolver, Ok);
    let result = resolver.and_then(|r| dns::resolve(&spec.query, r, DEFAULT_DNS_TIMEOUT));
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
