//! Peer configuration templates: plain text with `{{NAME}}` placeholders.
//!
//! The templates live in `bench/peers/` and are built into the binary; `--peers-dir`
//! reads them from another directory instead. Rendering is strict: a placeholder without a
//! value, or a malformed one, is an error naming the template, never an empty string in a
//! config the proxy then misreads.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::error::{file_context, BenchError, Result};

/// Built-in HAProxy template.
pub const HAPROXY: &str = include_str!("../../peers/haproxy.cfg.tmpl");
/// Built-in nginx stream template.
pub const NGINX: &str = include_str!("../../peers/nginx.conf.tmpl");
/// Built-in sluice template.
pub const SLUICE: &str = include_str!("../../peers/sluice.toml.tmpl");
/// Built-in template of the nginx HTTP server behind the proxies in `crosscheck`.
pub const NGINX_HTTP: &str = include_str!("../../peers/nginx-http.conf.tmpl");

/// The templates, as text.
#[derive(Debug, Clone)]
pub struct Templates {
    pub haproxy: String,
    pub nginx: String,
    pub sluice: String,
    pub nginx_http: String,
}

impl Templates {
    /// The templates built into the binary.
    pub fn builtin() -> Self {
        Self {
            haproxy: HAPROXY.into(),
            nginx: NGINX.into(),
            sluice: SLUICE.into(),
            nginx_http: NGINX_HTTP.into(),
        }
    }

    /// Templates read from `dir` (haproxy.cfg.tmpl, nginx.conf.tmpl, sluice.toml.tmpl,
    /// nginx-http.conf.tmpl).
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(file_context(path))
        };
        Ok(Self {
            haproxy: read("haproxy.cfg.tmpl")?,
            nginx: read("nginx.conf.tmpl")?,
            sluice: read("sluice.toml.tmpl")?,
            nginx_http: read("nginx-http.conf.tmpl")?,
        })
    }
}

/// Replaces every `{{NAME}}` in `template` with its value.
pub fn render(name: &str, template: &str, values: &BTreeMap<String, String>) -> Result<String> {
    let fail = |detail: String| BenchError::Template { template: name.into(), detail };
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| fail(format!("unclosed placeholder at {:?}", excerpt(after))))?;
        let key = after[..close].trim();
        if !is_placeholder_name(key) {
            return Err(fail(format!("bad placeholder name {key:?}")));
        }
        let value = values.get(key).ok_or_else(|| fail(format!("no value for {key}")))?;
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_placeholder_name(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn excerpt(text: &str) -> &str {
    let end = text.char_indices().nth(20).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn replaces_every_placeholder() {
        let text = render(
            "t",
            "listen {{LISTEN}} -> {{ BACKEND }};{{LISTEN}}",
            &values(&[("LISTEN", "127.0.0.1:1"), ("BACKEND", "127.0.0.1:2")]),
        )
        .unwrap();
        assert_eq!(text, "listen 127.0.0.1:1 -> 127.0.0.1:2;127.0.0.1:1");
    }

    #[test]
    fn missing_value_or_bad_syntax_is_an_error() {
        let err = render("haproxy", "bind {{LISTEN}}", &values(&[])).unwrap_err();
        assert!(err.to_string().contains("haproxy") && err.to_string().contains("LISTEN"));
        assert!(render("t", "bind {{LISTEN", &values(&[("LISTEN", "x")])).is_err());
        assert!(render("t", "bind {{lower}}", &values(&[("lower", "x")])).is_err());
        assert_eq!(render("t", "no braces { } here", &values(&[])).unwrap(), "no braces { } here");
    }

    #[test]
    fn builtin_templates_render_with_the_documented_values() {
        let mut all = values(&[
            ("WORKERS", "2"),
            ("MAXCONN", "9000"),
            ("NOFILE", "19500"),
            ("WORKER_CONNECTIONS", "15064"),
            ("RUN_DIR", "/tmp/x"),
            ("ENGINE_KEYS", "driver = \"epoll\""),
            ("SPLICE_OPTIONS", "option splice-auto"),
            ("NGINX_MODULES", ""),
            ("LISTEN", "127.0.0.1:2"),
            ("ROOT", "/tmp/x/www"),
        ]);
        for scenario in ["THROUGHPUT", "RR", "CONNECT", "IDLE"] {
            all.insert(format!("{scenario}_LISTEN"), "127.0.0.1:1".into());
            all.insert(format!("{scenario}_BACKEND"), "127.0.0.1:2".into());
        }
        let templates = Templates::builtin();
        for (name, text) in [
            ("haproxy", &templates.haproxy),
            ("nginx", &templates.nginx),
            ("sluice", &templates.sluice),
            ("nginx-http", &templates.nginx_http),
        ] {
            let rendered = render(name, text, &all).unwrap();
            assert!(!rendered.contains("{{"), "{name} left a placeholder");
            assert!(rendered.contains("127.0.0.1:2"), "{name} lost a backend");
        }
        let nginx = render("nginx", &templates.nginx, &all).unwrap();
        assert!(nginx.contains("daemon off;") && nginx.contains("master_process on;"));
        let haproxy = render("haproxy", &templates.haproxy, &all).unwrap();
        assert!(haproxy.contains("option splice-auto") && haproxy.contains("nbthread 2"));
    }
}
