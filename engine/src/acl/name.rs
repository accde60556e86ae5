//! TLS server name patterns for `sni` and `not_sni`: exact names and `*.` wildcards, compared
//! ASCII case-insensitively; and the host name check both configuration and patterns use.

/// A TLS server name pattern. Names compare ASCII case-insensitively, ignoring one trailing dot
/// of the queried name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// Exactly this name (lowercase, no trailing dot, as [`NamePattern::parse`] stores it).
    Exact(String),
    /// `*.example.com`, stored as `"example.com"`: any name that ends in `.example.com` with at
    /// least one label before it, such as `a.example.com` or `a.b.example.com`, but not
    /// `example.com` itself.
    Wildcard(String),
}

impl NamePattern {
    /// Parses `"example.com"` or `"*.example.com"`; a `*` is allowed only as the whole first
    /// label.
    pub fn parse(text: &str) -> Result<NamePattern, String> {
        let t = text.trim();
        let t = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
        let fail = |why: &str| format!("invalid server name {text:?}: {why}");
        let (wildcard, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, t),
        };
        check_hostname(&name).map_err(|e| fail(&e))?;
        Ok(if wildcard { NamePattern::Wildcard(name) } else { NamePattern::Exact(name) })
    }

    /// Whether `name` (as sent by the client) fits the pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        match self {
            NamePattern::Exact(exact) => name.eq_ignore_ascii_case(exact.as_bytes()),
            NamePattern::Wildcard(parent) => {
                let parent = parent.as_bytes();
                let Some(dot) = name.len().checked_sub(parent.len() + 1) else { return false };
                dot > 0 && name[dot] == b'.' && name[dot + 1..].eq_ignore_ascii_case(parent)
            }
        }
    }
}

/// Letters, digits, `-` and `_`; labels of 1 to 63 bytes; at most 253 bytes in all.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a name has 1 to 253 characters".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label has 1 to 63 characters".to_string());
        }
        let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if !label.bytes().all(valid) {
            return Err("only letters, digits, '-' and '_' (and '*.' in front)".to_string());
        }
    }
    Ok(())
}
