//! Validation: [`FileConfig`] -> [`Config`]. The [`Validator`] walks the file's tables,
//! turns every value into its engine type, and records every error it finds with the file,
//! line, column and dotted key (`service[0].listen`), going on after an error so that one
//! pass reports them all. Each room below validates one part of the file: `service`,
//! `pools` (pools, backends, health checks, DNS discovery), `rules` (firewall rules and
//! captures), `logs` (sinks and templates) and `shaping` (bandwidth and limits blocks);
//! `text` says what strings may hold for the sinks they reach.
//!
//! Invariants: a [`Config`] is returned only when no error was recorded; every duration,
//! size and rate is within its bound in `defaults` (durations at most `MAX_DURATION`);
//! host names are resolved only when [`Names::Resolve`] says so (parsing untrusted text
//! does no I/O).

pub mod admin;
mod logs;
mod pools;
mod process;
mod rules;
mod service;
pub(super) mod shaping;
pub mod text;

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::capture::CaptureSpec;
use sluice_engine::record::RecordPolicy;
use sluice_engine::{DriverChoice, EngineConfig};
use toml::Spanned;

use super::defaults::*;
use super::error::{locate, ConfigError};
use super::schema::{EngineSection, FileConfig, RecordsSection, Size, Workers};
use super::spec::Config;
use super::units::parse_duration;

pub(super) struct Validator<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
    pub(super) warnings: Vec<ConfigError>,
    /// A service forwards to the admin API (`backends = ["admin"]`).
    pub(super) admin_exposed: bool,
    /// Distinct capture configurations seen so far.
    pub(super) captures: Vec<CaptureSpec>,
    pub(super) names: Names,
}

/// How backend host names are turned into addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Resolved through the system resolver (DNS), as `run` and `check` do.
    Resolve,
    /// Not resolved: a host name is an error. Parsing then does no I/O at all (for
    /// fuzzing and other untrusted input).
    Offline,
}

impl Validator<'_> {
    pub(super) fn error(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        self.errors.push(locate(self.file, self.text, span, Some(key), message.into()));
    }

    pub(super) fn config(&mut self, raw: FileConfig) -> Config {
        let engine = self.engine(&raw.engine);
        let process = self.process(&raw.engine);
        let shutdown_timeout = raw
            .engine
            .shutdown_timeout
            .as_ref()
            .and_then(|d| self.duration(d, "engine.shutdown_timeout"))
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        let mut admin = raw.admin.as_ref().and_then(|a| self.admin(a));
        let admin_addr = admin.as_ref().map(|a| a.listen.clone());
        let admin_addr = admin_addr.as_ref();
        let records = raw.records.as_ref().map(|r| self.records(r)).unwrap_or_default();
        let instance = self.instance(raw.records.as_ref());
        let logs = raw.logs.iter().enumerate().filter_map(|(i, l)| self.log(i, l)).collect();
        let pools = self.pools(&raw.pools, admin_addr);
        let (firewall, firewall_bandwidth) =
            self.rules("firewall", "firewall", &raw.firewall, &pools, 1);
        if raw.services.is_empty() {
            self.error(0..0, "service", "at least one [[service]] is required");
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut services = Vec::new();
        for (i, s) in raw.services.iter().enumerate() {
            let spec = self.service(i, s, admin_addr, &pools, &mut listens);
            self.udp_sources_fit(i, s, &spec, engine.max_flows);
            if !names.insert(spec.name.clone()) {
                self.error(
                    s.name.span(),
                    &format!("service[{i}].name"),
                    format!("duplicate service name {:?}", spec.name),
                );
            }
            for ipv6 in [false, true] {
                let rules = firewall.iter().chain(&spec.rules);
                if let Err(e) = sluice_engine::acl::silent::program(rules, ipv6) {
                    self.error(s.name.span(), &format!("service[{i}].rule"), e.to_string());
                }
            }
            services.push(spec);
        }
        if let Some(spec) = admin.as_mut() {
            self.admin_access(spec, raw.admin.as_ref(), self.admin_exposed);
        }
        Config {
            source: self.file.to_string(),
            engine,
            process,
            shutdown_timeout,
            admin,
            warnings: std::mem::take(&mut self.warnings),
            records,
            instance,
            logs,
            firewall,
            firewall_bandwidth,
            pools,
            services,
            captures: std::mem::take(&mut self.captures),
        }
    }

    fn records(&mut self, raw: &RecordsSection) -> RecordPolicy {
        let interim = raw.interim.as_ref().and_then(|d| self.duration(d, "records.interim"));
        RecordPolicy { open: raw.open.unwrap_or(DEFAULT_RECORDS_OPEN), interim }
    }

    /// `records.instance`, which must be a name; without it the host name when that is one,
    /// else `-`.
    fn instance(&mut self, raw: Option<&RecordsSection>) -> Arc<str> {
        if let Some(value) = raw.and_then(|r| r.instance.as_ref()) {
            match text::name(value.get_ref()) {
                Ok(()) => return value.get_ref().as_str().into(),
                Err(m) => self.error(value.span(), "records.instance", m),
            }
        }
        let host = crate::sinks::host_name().filter(|h| text::name(h).is_ok());
        host.as_deref().unwrap_or("-").into()
    }

    fn engine(&mut self, raw: &EngineSection) -> EngineConfig {
        let mut engine = EngineConfig::default();
        if let Some(w) = &raw.workers {
            match w.get_ref() {
                Workers::Named(s) if s == "auto" => {}
                Workers::Count(n) if (1..=MAX_WORKERS).contains(n) => engine.workers = *n as usize,
                _ => self.error(
                    w.span(),
                    "engine.workers",
                    format!("expected \"auto\" or a number from 1 to {MAX_WORKERS}"),
                ),
            }
        }
        if let Some(pin) = raw.pin {
            engine.pin = pin;
        }
        if let Some(d) = &raw.driver {
            match d.get_ref().parse::<DriverChoice>() {
                Ok(choice) => engine.driver = choice,
                Err(message) => self.error(d.span(), "engine.driver", message),
            }
        }
        if let Some(r) = &raw.relay {
            match r.get_ref().parse() {
                Ok(relay) => engine.relay = relay,
                Err(message) => self.error(r.span(), "engine.relay", message),
            }
        }
        if let Some(size) = self.size(&raw.pipe_size, "engine.pipe_size") {
            engine.pipe_size = size;
        }
        if let Some(size) = self.size(&raw.buffer_size, "engine.buffer_size") {
            engine.buffer_size = size;
        }
        engine.max_sessions = self.max_sessions(&raw.max_sessions, "engine.max_sessions");
        if let Some(n) = &raw.ring_buffers {
            match u16::try_from(*n.get_ref()) {
                Ok(count @ MIN_RING_BUFFERS..=MAX_RING_BUFFERS) if count.is_power_of_two() => {
                    engine.ring_buffers = count;
                }
                _ => self.error(
                    n.span(),
                    "engine.ring_buffers",
                    format!(
                        "expected a power of two from {MIN_RING_BUFFERS} to {MAX_RING_BUFFERS}"
                    ),
                ),
            }
        }
        self.udp_engine(raw, &mut engine);
        engine
    }

    /// `engine.max_flows` and `engine.udp_max_datagram`.
    fn udp_engine(&mut self, raw: &EngineSection, engine: &mut EngineConfig) {
        if let Some(n) = &raw.max_flows {
            match usize::try_from(*n.get_ref()) {
                Ok(v) if (1..=MAX_FLOWS).contains(n.get_ref()) => engine.max_flows = v,
                _ => self.error(
                    n.span(),
                    "engine.max_flows",
                    format!("expected a number of flows per worker from 1 to {MAX_FLOWS}"),
                ),
            }
        }
        let Some(value) = &raw.udp_max_datagram else { return };
        let parsed = value.get_ref().bytes();
        match parsed {
            Ok(n) if (MIN_UDP_DATAGRAM..=MAX_UDP_DATAGRAM).contains(&n) => {
                engine.udp_max_datagram = n as usize;
            }
            Ok(_) => self.error(
                value.span(),
                "engine.udp_max_datagram",
                format!("must be between {MIN_UDP_DATAGRAM} and {MAX_UDP_DATAGRAM} bytes"),
            ),
            Err(message) => self.error(value.span(), "engine.udp_max_datagram", message),
        }
    }

    /// A session cap: a positive number of sessions; absent means no cap.
    fn max_sessions(&mut self, value: &Option<Spanned<i64>>, key: &str) -> Option<u64> {
        let value = value.as_ref()?;
        match u64::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_SESSIONS_CAP).contains(&n) => Some(n),
            _ => {
                let message = format!(
                    "expected a number of sessions from 1 to {MAX_SESSIONS_CAP}; leave it out for no cap"
                );
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// A pipe or buffer size within the accepted range.
    fn size(&mut self, value: &Option<Spanned<Size>>, key: &str) -> Option<usize> {
        let value = value.as_ref()?;
        let parsed = value.get_ref().bytes();
        match parsed {
            Ok(n) if (MIN_PIPE_SIZE..=MAX_PIPE_SIZE).contains(&n) => Some(n as usize),
            Ok(_) => {
                let message = format!("must be between {MIN_PIPE_SIZE} and {MAX_PIPE_SIZE} bytes");
                self.error(value.span(), key, message);
                None
            }
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// A value parsed from text, or an error at its position.
    fn parsed<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = value.as_ref()?;
        parse(value.get_ref()).map_err(|m| self.error(value.span(), key, m)).ok()
    }

    /// Parses every entry of a list, reporting each bad one at its own position.
    fn list<T>(
        &mut self,
        items: &[Spanned<String>],
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        items
            .iter()
            .filter_map(|item| {
                parse(item.get_ref()).map_err(|m| self.error(item.span(), key, m)).ok()
            })
            .collect()
    }

    fn duration(&mut self, value: &Spanned<String>, key: &str) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.error(value.span(), key, "must be greater than zero");
                None
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(value.span(), key, "must be at most 365 days");
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }
}
