//! Validation of `[[log]]` sinks: the target (file, syslog, stdout), syslog address and
//! facility, the format (JSON lines or a text template) and the record filters.

use std::path::PathBuf;

use sluice_engine::record::{CloseReason, RecordKind, Verdict};

use super::{text, Validator};
use crate::config::defaults::{DEFAULT_SYSLOG_FACILITY, DEFAULT_SYSLOG_SOCKET, DEFAULT_SYSLOG_TAG};
use crate::config::schema::LogSection;
use crate::records::{Template, DEFAULT_TEMPLATE, DEFAULT_UDP_TEMPLATE};
use crate::sinks::{self, Filter, Format, SinkSpec, SyslogAddr, Target};

impl Validator<'_> {
    pub(super) fn log(&mut self, i: usize, raw: &LogSection) -> Option<SinkSpec> {
        let key = |k: &str| format!("log[{i}].{k}");
        let before = self.errors.len();
        let target = match raw.kind.get_ref().as_str() {
            "file" => match &raw.path {
                Some(p) => text::printable(p.get_ref())
                    .map_err(|m| self.error(p.span(), &key("path"), m))
                    .ok()
                    .map(|()| Target::File(PathBuf::from(p.get_ref()))),
                None => {
                    self.error(raw.kind.span(), &key("path"), "a file sink needs a path");
                    None
                }
            },
            "stdout" => Some(Target::Stdout),
            "syslog" => {
                let addr = match &raw.address {
                    None => Some(SyslogAddr::Unix(DEFAULT_SYSLOG_SOCKET.into())),
                    Some(a) => text::printable(a.get_ref())
                        .and_then(|()| SyslogAddr::parse(a.get_ref()))
                        .map_err(|m| self.error(a.span(), &key("address"), m))
                        .ok(),
                };
                let facility = match &raw.facility {
                    None => Some(DEFAULT_SYSLOG_FACILITY),
                    Some(f) => sinks::facility(f.get_ref())
                        .map_err(|m| self.error(f.span(), &key("facility"), m))
                        .ok(),
                };
                let tag = match &raw.tag {
                    None => Some(DEFAULT_SYSLOG_TAG.to_string()),
                    Some(t) => text::syslog_tag(t.get_ref())
                        .map_err(|m| self.error(t.span(), &key("tag"), m))
                        .ok()
                        .map(|()| t.get_ref().clone()),
                };
                let target = addr.zip(facility).zip(tag);
                target.map(|((addr, facility), tag)| Target::Syslog { addr, facility, tag })
            }
            other => {
                self.error(
                    raw.kind.span(),
                    &key("type"),
                    format!(
                        "unknown sink type {other:?}; expected \"file\", \"syslog\" or \"stdout\""
                    ),
                );
                None
            }
        };
        let format = self.log_format(raw, &key);
        let mut filter =
            Filter { services: raw.services.iter().cloned().collect(), ..Filter::default() };
        for k in &raw.kinds {
            match k.get_ref().as_str() {
                "open" => filter.kinds.insert(RecordKind::Open),
                "interim" => filter.kinds.insert(RecordKind::Interim),
                "close" => filter.kinds.insert(RecordKind::Close),
                "deny" => filter.kinds.insert(RecordKind::Deny),
                other => {
                    self.error(
                        k.span(),
                        &key("kinds"),
                        format!(
                            "unknown record kind {other:?}; expected open, interim, close or deny"
                        ),
                    );
                    false
                }
            };
        }
        for v in &raw.verdicts {
            match v.get_ref().as_str() {
                "allow" => filter.verdicts.insert(Verdict::Allow),
                "deny" => filter.verdicts.insert(Verdict::Deny),
                other => {
                    self.error(
                        v.span(),
                        &key("verdicts"),
                        format!("unknown verdict {other:?}; expected allow or deny"),
                    );
                    false
                }
            };
        }
        for r in &raw.reasons {
            if CloseReason::ALL.iter().any(|c| c.as_str() == r.get_ref()) {
                filter.reasons.insert(r.get_ref().clone());
            } else {
                let known: Vec<&str> = CloseReason::ALL.iter().map(|c| c.as_str()).collect();
                self.error(
                    r.span(),
                    &key("reasons"),
                    format!(
                        "unknown close reason {:?}; expected one of {}",
                        r.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
        let name = match &raw.name {
            None => format!("log{i}"),
            Some(n) => {
                if let Err(m) = text::name(n.get_ref()) {
                    self.error(n.span(), &key("name"), m);
                }
                n.get_ref().clone()
            }
        };
        if self.errors.len() > before {
            return None;
        }
        Some(SinkSpec { name, target: target?, format: format?, filter })
    }

    /// JSON lines unless a template is given or `format = "text"`.
    fn log_format(&mut self, raw: &LogSection, key: &dyn Fn(&str) -> String) -> Option<Format> {
        let format = raw.format.as_ref().map(|f| f.get_ref().as_str());
        match (format, &raw.template) {
            (Some("json") | None, None) => Some(Format::Json),
            (Some("json"), Some(t)) => {
                self.error(t.span(), &key("template"), "a template needs format = \"text\"");
                None
            }
            (Some("text") | None, t) => {
                let (text, span) = t
                    .as_ref()
                    .map_or((DEFAULT_TEMPLATE, 0..0), |t| (t.get_ref().as_str(), t.span()));
                let built_in = t.is_none();
                if let Err(m) = text::printable(text) {
                    self.error(span, &key("template"), m);
                    return None;
                }
                Template::parse(text)
                    .map(|t| match built_in {
                        true => t.with_udp(Template::parse(DEFAULT_UDP_TEMPLATE).expect("valid")),
                        false => t,
                    })
                    .map(Format::Text)
                    .map_err(|m| self.error(span, &key("template"), m))
                    .ok()
            }
            (Some(other), _) => {
                let span = raw.format.as_ref().map_or(0..0, |f| f.span());
                self.error(
                    span,
                    &key("format"),
                    format!("unknown format {other:?}; expected \"json\" or \"text\""),
                );
                None
            }
        }
    }
}
