//! Connection-log records as a JSON sink writes them: one object per line, read back from
//! files (several, after a rename) and matched to the sessions a test made.
//!
//! Only complete lines count: a sink may have flushed part of its last line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sluice::SessionKey;

/// How often files are re-read while waiting.
const POLL: Duration = Duration::from_millis(20);

/// Every complete JSON line of `path` (none if the file does not exist); panics on a
/// complete line that is not JSON.
pub fn read_json_lines(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {l}", path.display()))
        })
        .collect()
}

/// Re-reads `paths` until `done` holds for the lines of all of them (in order) or `timeout`
/// passes; returns the last lines read.
pub fn wait_for_json_lines(
    paths: &[PathBuf],
    timeout: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines: Vec<Value> = paths.iter().flat_map(|p| read_json_lines(p)).collect();
        if done(&lines) || Instant::now() >= deadline {
            return lines;
        }
        std::thread::sleep(POLL);
    }
}

/// Whether `record` is of kind `kind` and belongs to the session `key`.
pub fn is_record_of(record: &Value, kind: &str, key: SessionKey) -> bool {
    record["kind"] == kind
        && record["client_addr"] == key.client.ip().to_string()
        && record["client_port"] == key.client.port()
        && record["listener"] == key.listener.to_string()
}

/// The records of kind `kind` of session `key`, in file order.
pub fn records_of<'a>(records: &'a [Value], kind: &str, key: SessionKey) -> Vec<&'a Value> {
    records.iter().filter(|r| is_record_of(r, kind, key)).collect()
}

/// Waits up to `timeout` for the close record of `key` in `path`; panics with what the
/// file holds if it does not come.
pub fn wait_for_close_record(path: &Path, key: SessionKey, timeout: Duration) -> Value {
    let paths = [path.to_path_buf()];
    let lines = wait_for_json_lines(&paths, timeout, |lines| {
        lines.iter().any(|r| is_record_of(r, "close", key))
    });
    let found = lines.iter().find(|r| is_record_of(r, "close", key)).cloned();
    found.unwrap_or_else(|| {
        panic!("no close record of {key:?} in {} after {timeout:?}: {lines:#?}", path.display())
    })
}
