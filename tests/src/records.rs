//! Connection-log records as a JSON sink writes them: one object per line, read back from
//! files (several, after a rename) and matched to the sessions a test made.
//!
//! Only complete lines count: a sink may have flushed part of its last line. Timestamps are
//! RFC 3339 UTC with milliseconds, as sluice writes them.

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

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp with milliseconds, such as
/// `2026-11-22T00:20:01.532Z`; `None` for any other shape.
pub fn rfc3339_ms(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let shape_ok = b.len() == 24
        && [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')]
            .iter()
            .all(|&(i, c)| b[i] == c);
    if !shape_ok {
        return None;
    }
    let num = |from: usize, to: usize| text.get(from..to)?.parse::<u64>().ok();
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let seconds = u64::try_from(days).ok()? * 86_400 + hour * 3600 + minute * 60 + second;
    Some(seconds * 1000 + ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_convert_to_epoch_milliseconds() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(rfc3339_ms("2026-11-22T00:00:00.123Z"), Some(1_795_305_600_123));
        assert_eq!(rfc3339_ms("2000-02-29T00:00:00.000Z"), Some(951_782_400_000));
        assert_eq!(rfc3339_ms("2026-11-22 00:00:00.123Z"), None);
        assert_eq!(rfc3339_ms("2026-11-22T00:00:00Z"), None);
    }
}
