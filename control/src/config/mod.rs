//! Configuration in stages: TOML text -> [`schema`] (serde, `deny_unknown_fields`, with
//! spans) -> [`validate`]d [`Config`] -> [`compile`]d [`Tables`](sluice_engine::tables::Tables).
//! Every error names the file, the line and column, and the key ([`error`]); validation
//! reports every error it finds, not just the first. Every default and bound is a
//! documented constant in [`defaults`]; durations, sizes and rates are parsed by [`units`].
//!
//! Rooms: `schema` (what TOML deserializes into), `validate` (schema -> spec, one room per
//! part of the file), `spec` (the validated types), `compile` (spec -> tables, and the
//! registry that carries state across reloads), `units`, `defaults`, `error`, `file`
//! (reading the file itself, bounded).

mod compile;
pub mod defaults;
mod error;
mod file;
mod schema;
mod spec;
#[cfg(test)]
mod tests;
pub mod units;
mod validate;

pub use validate::admin;

use std::path::{Path, PathBuf};

pub use compile::{Registry, DEFAULT_RULE, FIREWALL_SCOPE};
pub use defaults::*;
pub use error::{ConfigError, ConfigErrors};
pub use spec::{BackendSpec, Config, DnsSpec, PoolSpec, ProcessSpec, ServiceSpec};
pub use units::{parse_duration, parse_size};
pub use validate::Names;

use error::locate;
use schema::FileConfig;
use validate::Validator;

/// The configuration `sluice run` uses when no file is given: one service forwarding
/// 127.0.0.1:8080 to a server on 127.0.0.1:8000.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../examples/default.toml");
/// The name shown for the embedded default in messages.
pub const EMBEDDED_NAME: &str = "<embedded default>";

impl Config {
    /// Reads and validates a file (see [`file::read`]: a regular file of at most
    /// [`MAX_CONFIG_SIZE`] bytes, opened without blocking).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        match file::read(path) {
            Ok(text) => Config::parse(&name, &text),
            Err(message) => Err(ConfigErrors(vec![ConfigError {
                file: name,
                line: 0,
                column: 0,
                key: "(file)".into(),
                message,
            }])),
        }
    }

    /// The file at `path`, or the embedded default when there is none.
    pub fn load_or_default(path: Option<&PathBuf>) -> Result<Config, ConfigErrors> {
        match path {
            Some(p) => Config::load(p),
            None => Config::parse(EMBEDDED_NAME, EMBEDDED_DEFAULT),
        }
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
        Config::parse_with(file, text, Names::Resolve)
    }

    /// Parses and validates TOML text, resolving backend host names as `names` says.
    pub fn parse_with(file: &str, text: &str, names: Names) -> Result<Config, ConfigErrors> {
        let raw: FileConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            ConfigErrors(vec![locate(file, text, span, None, message)])
        })?;
        let mut v = Validator {
            file,
            text,
            errors: Vec::new(),
            warnings: Vec::new(),
            admin_exposed: false,
            captures: Vec::new(),
            names,
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }
}

/// Parses untrusted bytes as a configuration and compiles what validates into tables, with
/// no I/O (host names are not resolved). What the `config` fuzz target and its corpus
/// replay run: any input must return, without a panic, in bounded time and memory.
pub fn check_untrusted(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::parse_with("fuzz.toml", text, Names::Offline) {
        let tables = config.tables(1, &mut Registry::default());
        assert_eq!(tables.services().len(), config.services.len());
    }
}

/// Default values, for `sluice check` and the documentation.
pub fn defaults_summary() -> String {
    format!(
        "connect_timeout={:?} idle_timeout={:?} fin_timeout={:?} shutdown_timeout={:?} relay=auto buffer_size={} pipe_size={} udp_idle_timeout={:?} max_flows={} udp_max_datagram={}",
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_IDLE_TIMEOUT,
        DEFAULT_FIN_TIMEOUT,
        DEFAULT_SHUTDOWN_TIMEOUT,
        DEFAULT_BUFFER_SIZE,
        DEFAULT_PIPE_SIZE,
        DEFAULT_UDP_IDLE_TIMEOUT,
        DEFAULT_MAX_FLOWS,
        DEFAULT_MAX_DATAGRAM
    )
}
