//! Configuration errors and where they are: every error names the file, the line and
//! column (1-based) and the dotted key it concerns, and [`ConfigErrors`] carries every error
//! of one file, not just the first.
//!
//! Invariant: a byte span outside the text is clamped to its end, so locating never panics.

use std::fmt;
use std::ops::Range;

/// One configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (file, key, message) = (shown(&self.file), shown(&self.key), shown(&self.message));
        write!(f, "{file}:{}:{}: {key}: {message}", self.line, self.column)
    }
}

/// Every error found in one file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Turns a byte span into line and column (1-based) and finds the key it belongs to.
pub(super) fn locate(
    file: &str,
    text: &str,
    span: Range<usize>,
    key: Option<&str>,
    message: String,
) -> ConfigError {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let key = key.map(str::to_string).unwrap_or_else(|| key_at(text, start));
    ConfigError { file: file.to_string(), line, column, key, message }
}

/// The dotted key at a byte offset: the table header above it plus the key on its line.
fn key_at(text: &str, offset: usize) -> String {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if line.starts_with('[') {
        return line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
    }
    let local = line.split('=').next().filter(|_| line.contains('=')).map(|k| k.trim().to_string());
    match (header, local) {
        (Some(h), Some(k)) => format!("{h}.{k}"),
        (None, Some(k)) => k,
        (Some(h), None) => h,
        (None, None) => "(document)".to_string(),
    }
}

/// `text` with every control character escaped (`\n`, `\u{1b}`), so that an error quoting
/// the file can neither split a log line nor drive a terminal.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}
