//! What a string from the file may hold, by where it ends up. Names (of services, pools,
//! rules and log sinks) reach text log lines as `key=value`, syslog frames, Prometheus
//! labels and capture file names; paths and templates reach log lines; a syslog tag is the
//! frame's APP-NAME. So none of them may carry a control character (a newline would forge
//! a log line, an escape sequence would drive a terminal), names hold no space, quote or
//! slash, and a tag is what RFC 5424 allows.
//!
//! Invariant: every config string that a sink or a log line shows has passed one of these
//! checks; messages quote the offending text escaped (`{:?}`), never raw.

/// Longest name of a service, pool, rule or log sink.
pub const MAX_NAME_LEN: usize = 64;
/// Longest syslog APP-NAME (RFC 5424).
pub const MAX_SYSLOG_TAG_LEN: usize = 48;

/// A name: 1 to [`MAX_NAME_LEN`] characters, each a letter, a digit, `-`, `_`, `.` or `:`.
pub fn name(text: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if text.is_empty() || text.chars().count() > MAX_NAME_LEN || !text.chars().all(ok) {
        return Err(format!(
            "{text:?} is not a name: 1 to {MAX_NAME_LEN} characters, each a letter, a digit, '-', '_', '.' or ':'"
        ));
    }
    Ok(())
}

/// Text shown as it is (a path, a template): no control character but a tab.
pub fn printable(text: &str) -> Result<(), String> {
    match text.chars().find(|&c| c.is_control() && c != '\t') {
        Some(c) => Err(format!(
            "{text:?} holds the control character {c:?}, which a log line cannot carry"
        )),
        None => Ok(()),
    }
}

/// A syslog APP-NAME: 1 to 48 printable US-ASCII characters, no space (RFC 5424 6.2.5).
pub fn syslog_tag(text: &str) -> Result<(), String> {
    let ok = |b: u8| (33..=126).contains(&b);
    if text.is_empty() || text.len() > MAX_SYSLOG_TAG_LEN || !text.bytes().all(ok) {
        return Err(format!(
            "{text:?} is not a syslog APP-NAME: 1 to {MAX_SYSLOG_TAG_LEN} printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_tags_hold_only_what_their_sinks_carry() {
        for good in ["web", "db-1", "web.rule.0", "pool:a", "A_b"] {
            assert!(name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "web\nINFO forged", "../x", "x\"y", "ä", &"n".repeat(65)] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
        assert!(printable("/var/log/x y.jsonl").is_ok());
        assert!(printable("{kind}\t{service}").is_ok());
        assert!(printable("/var/log/x\n").is_err());
        assert!(printable("\u{1b}[31m").is_err());
        assert!(syslog_tag("sluice-edge_1").is_ok());
        for bad in ["", "two words", "é", &"t".repeat(49)] {
            assert!(syslog_tag(bad).is_err(), "{bad:?}");
        }
        assert!(syslog_tag(&"t".repeat(48)).is_ok());
    }
}
