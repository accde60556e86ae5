//! The `[admin]` section: where the admin API listens, who may use it (`token_file`), the
//! unix socket's mode and the server's limits. Errors name file, line and key like the
//! rest of the config; an error inside the token file names the token file. A write route
//! that nobody could use (a public listener without a write token) is a warning, which
//! `sluice check` and `sluice run` print.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{Names, Validator};
use sluice_engine::accounting::{AccountSpec, MAX_TOP_CLIENTS};

use crate::admin::auth::{self, Tokens};
use crate::admin::{AdminAddr, AdminSpec, Limits, DEFAULT_ADMIN_LISTEN, DEFAULT_SOCKET_MODE};
use crate::config::error::locate;
use crate::config::validate::text;

/// Largest `max_connections` accepted.
pub const MAX_ADMIN_CONNECTIONS: i64 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    socket_mode: Option<Spanned<SocketMode>>,
    max_connections: Option<Spanned<i64>>,
    header_timeout: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    write_timeout: Option<Spanned<String>>,
    top_clients: Option<Spanned<i64>>,
    client_network_v4: Option<Spanned<i64>>,
    client_network_v6: Option<Spanned<i64>>,
}

/// `socket_mode = "0660"` or `socket_mode = 0o660`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SocketMode {
    Text(String),
    Number(i64),
}

impl Validator<'_> {
    pub(in crate::config) fn admin(&mut self, raw: &AdminSection) -> Option<AdminSpec> {
        let listen = match &raw.listen {
            None => AdminAddr::parse(DEFAULT_ADMIN_LISTEN).ok()?,
            Some(listen) => match text::printable(listen.get_ref())
                .and_then(|()| AdminAddr::parse(listen.get_ref()))
            {
                Ok(addr) => addr,
                Err(message) => {
                    self.error(listen.span(), "admin.listen", message);
                    return None;
                }
            },
        };
        let mut limits = Limits::default();
        if let Some(n) = &raw.max_connections {
            match *n.get_ref() {
                n @ 1..=MAX_ADMIN_CONNECTIONS => limits.max_connections = n as usize,
                _ => self.error(
                    n.span(),
                    "admin.max_connections",
                    format!("must be from 1 to {MAX_ADMIN_CONNECTIONS}"),
                ),
            }
        }
        for (value, key, slot) in [
            (&raw.header_timeout, "admin.header_timeout", &mut limits.header_timeout),
            (&raw.body_timeout, "admin.body_timeout", &mut limits.body_timeout),
            (&raw.write_timeout, "admin.write_timeout", &mut limits.write_timeout),
        ] {
            if let Some(d) = value.as_ref().and_then(|v| self.duration(v, key)) {
                *slot = d;
            }
        }
        let socket_mode = raw.socket_mode.as_ref().and_then(|m| self.socket_mode(m));
        if socket_mode.is_some() && matches!(listen, AdminAddr::Tcp(_)) {
            let span = raw.socket_mode.as_ref().map(Spanned::span).unwrap_or_default();
            self.error(span, "admin.socket_mode", "applies to a unix socket only");
        }
        let (token_file, tokens) = match &raw.token_file {
            Some(path) => {
                let resolved = self.relative_to_config(path.get_ref());
                (Some(resolved.clone()), self.tokens(path, &resolved))
            }
            None => (None, Tokens::default()),
        };
        let accounting = self.accounting(raw);
        Some(AdminSpec {
            listen,
            token_file,
            tokens,
            socket_mode: socket_mode.unwrap_or(DEFAULT_SOCKET_MODE),
            limits,
            exposed: false,
            accounting,
        })
    }

    /// `top_clients` (0 turns per-client accounting off) and the prefixes that group
    /// clients into networks.
    fn accounting(&mut self, raw: &AdminSection) -> AccountSpec {
        let mut spec = AccountSpec::default();
        if let Some(n) = &raw.top_clients {
            match usize::try_from(*n.get_ref()) {
                Ok(n) if n <= MAX_TOP_CLIENTS => spec.top = n,
                _ => self.error(
                    n.span(),
                    "admin.top_clients",
                    format!("must be from 0 (accounting off) to {MAX_TOP_CLIENTS}"),
                ),
            }
        }
        for (value, key, max, slot) in [
            (&raw.client_network_v4, "admin.client_network_v4", 32, &mut spec.network_v4),
            (&raw.client_network_v6, "admin.client_network_v6", 128, &mut spec.network_v6),
        ] {
            let Some(v) = value else { continue };
            match u8::try_from(*v.get_ref()) {
                Ok(bits) if bits <= max => *slot = bits,
                _ => self.error(v.span(), key, format!("must be a prefix length from 0 to {max}")),
            }
        }
        spec
    }

    fn socket_mode(&mut self, raw: &Spanned<SocketMode>) -> Option<u32> {
        let parsed = match raw.get_ref() {
            SocketMode::Text(t) => u32::from_str_radix(t.trim_start_matches("0o"), 8).ok(),
            SocketMode::Number(n) => u32::try_from(*n).ok(),
        };
        match parsed {
            Some(mode) if mode <= 0o777 => Some(mode),
            _ => {
                self.error(
                    raw.span(),
                    "admin.socket_mode",
                    "expected permission bits such as \"0600\" or 0o660 (octal, at most 0777)",
                );
                None
            }
        }
    }

    /// A path of the config, relative to the config file's directory.
    fn relative_to_config(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            return path.to_path_buf();
        }
        let dir = Path::new(self.file).parent().filter(|d| !d.as_os_str().is_empty());
        dir.map_or_else(|| path.to_path_buf(), |d| d.join(path))
    }

    /// Reads and validates the token file (not when names are offline: parsing untrusted
    /// text then does no I/O at all).
    fn tokens(&mut self, raw: &Spanned<String>, path: &Path) -> Tokens {
        if self.names == Names::Offline {
            return Tokens::default();
        }
        let text = match auth::read_token_file(path) {
            Ok(text) => text,
            Err(e) => {
                let message = format!("cannot read token file {}: {e}", path.display());
                self.error(raw.span(), "admin.token_file", message);
                return Tokens::default();
            }
        };
        self.token_file_mode(raw, path);
        match auth::parse_tokens(&text) {
            Ok(tokens) => tokens,
            Err(errors) => {
                let file = path.display().to_string();
                for e in errors {
                    let key = format!("admin.token_file: {}", e.key);
                    self.errors.push(locate(&file, &text, e.span, Some(&key), e.message));
                }
                Tokens::default()
            }
        }
    }

    fn token_file_mode(&mut self, raw: &Spanned<String>, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else { return };
        if meta.permissions().mode() & 0o077 != 0 {
            let message = format!(
                "warning: token file {} can be read by other users (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
            self.warn(raw.span(), "admin.token_file", message);
        }
    }

    /// Warns when write routes will be refused to everyone; marks the listener private
    /// when writes may go without a token.
    pub(super) fn admin_access(
        &mut self,
        admin: &mut AdminSpec,
        raw: Option<&AdminSection>,
        exposed: bool,
    ) {
        admin.exposed = exposed;
        if admin.tokens.write.is_some() || admin.private_listener() {
            return;
        }
        let span = raw.and_then(|r| r.listen.as_ref()).map(Spanned::span).unwrap_or(0..0);
        let why = if exposed {
            "a service forwards to the admin API (backends = [\"admin\"])".to_string()
        } else {
            format!("{} is not a loopback address", admin.listen)
        };
        let message = format!(
            "warning: write routes (reload, backend actions, killing sessions) will be refused: \
             {why} and admin.token_file sets no write token"
        );
        self.warn(span, "admin.listen", message);
    }

    fn warn(&mut self, span: std::ops::Range<usize>, key: &str, message: String) {
        self.warnings.push(locate(self.file, self.text, span, Some(key), message));
    }
}

/// The listener and limits of the admin API, for messages.
pub fn describe(spec: &AdminSpec) -> String {
    format!(
        "{} max_connections={} header_timeout={:?} body_timeout={:?} write_timeout={:?}",
        spec.listen,
        spec.limits.max_connections,
        spec.limits.header_timeout,
        spec.limits.body_timeout,
        spec.limits.write_timeout
    )
}
