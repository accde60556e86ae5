//! Time ranges and buckets of `sluice report`, in UTC (connection records carry UTC
//! times): parsing `--since`/`--until` (an RFC 3339 timestamp, `Z` or an offset, or a date
//! meaning its midnight UTC), writing times back, and cutting time into minutes, hours,
//! days or weeks (ISO weeks, from Monday 00:00 UTC). Pure: times are milliseconds since
//! 1970 (negative before), no clock is read.

/// Milliseconds in a minute, an hour, a day.
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// The length of a report's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Minute,
    Hour,
    Day,
    /// ISO weeks: Monday 00:00 UTC to the next Monday.
    Week,
}

impl By {
    pub fn as_str(self) -> &'static str {
        match self {
            By::Minute => "minute",
            By::Hour => "hour",
            By::Day => "day",
            By::Week => "week",
        }
    }

    fn len(self) -> i64 {
        match self {
            By::Minute => MINUTE,
            By::Hour => HOUR,
            By::Day => DAY,
            By::Week => 7 * DAY,
        }
    }

    /// The start of the bucket holding `ms`; the bucket is `[start, start + len)`.
    pub fn start_of(self, ms: i64) -> i64 {
        match self {
            // 1970-01-01 was a Thursday: Monday is 3 days before day 0 of a week.
            By::Week => (ms + 3 * DAY).div_euclid(7 * DAY) * 7 * DAY - 3 * DAY,
            _ => ms.div_euclid(self.len()) * self.len(),
        }
    }

    /// The end (exclusive) of the bucket starting at `start`.
    pub fn end_of(self, start: i64) -> i64 {
        start.saturating_add(self.len())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Takes `n` ASCII digits from the front of `s`.
fn digits(s: &mut &str, n: usize) -> Option<u32> {
    let head = s.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    *s = &s[n..];
    head.parse().ok()
}

fn expect(s: &mut &str, c: char) -> Option<()> {
    *s = s.strip_prefix(c)?;
    Some(())
}

/// Parses `YYYY-MM-DD` into days since 1970, taking it off the front of `s`.
fn date(s: &mut &str) -> Option<i64> {
    let y = digits(s, 4)?;
    expect(s, '-')?;
    let m = digits(s, 2)?;
    expect(s, '-')?;
    let d = digits(s, 2)?;
    let y = i64::from(y);
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// A date (`2026-11-22`, its midnight UTC) or an RFC 3339 timestamp
/// (`2026-11-22T08:00:00Z`, `2026-11-22T09:00:00.5+01:00`; seconds may be left out), as
/// milliseconds since 1970.
pub fn parse_time(text: &str) -> Result<i64, String> {
    parse(text.trim()).ok_or_else(|| {
        format!(
            "{text:?} is not a date (2026-11-22) or an RFC 3339 time (2026-11-22T08:00:00Z, \
             2026-11-22T09:00:00+01:00)"
        )
    })
}

fn parse(text: &str) -> Option<i64> {
    let mut s = text;
    let day = date(&mut s)?;
    if s.is_empty() {
        return Some(day * DAY);
    }
    s = s.strip_prefix(['T', 't', ' '])?;
    let h = digits(&mut s, 2)?;
    expect(&mut s, ':')?;
    let min = digits(&mut s, 2)?;
    let mut sec = 0;
    let mut ms = 0i64;
    if s.starts_with(':') {
        expect(&mut s, ':')?;
        sec = digits(&mut s, 2)?;
        if let Some(rest) = s.strip_prefix('.') {
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return None;
            }
            let frac = &rest[..n];
            let padded: String = frac.chars().chain("000".chars()).take(3).collect();
            ms = padded.parse().ok()?;
            s = &rest[n..];
        }
    }
    if h > 23 || min > 59 || sec > 60 {
        return None;
    }
    let offset = match s {
        "Z" | "z" => 0,
        _ => {
            let sign = match s.get(..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            s = &s[1..];
            let oh = digits(&mut s, 2)?;
            expect(&mut s, ':')?;
            let om = digits(&mut s, 2)?;
            if !s.is_empty() || oh > 23 || om > 59 {
                return None;
            }
            sign * (i64::from(oh) * HOUR + i64::from(om) * MINUTE)
        }
    };
    let local = day * DAY
        + i64::from(h) * HOUR
        + i64::from(min) * MINUTE
        + i64::from(sec.min(59)) * 1000
        + ms;
    Some(local - offset)
}

/// `ms` as `2026-11-22T08:00:00Z` (whole seconds, UTC).
pub fn format_time(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY));
    let in_day = ms.rem_euclid(DAY) / 1000;
    let (h, min, s) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z")
}

/// The date of `ms` (UTC) as `2026-11-22`.
pub fn format_date(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The UTC day `[start, end)` before the one holding `now`.
pub fn previous_day(now: i64) -> (i64, i64) {
    let today = By::Day.start_of(now);
    (today - DAY, today)
}

/// The UTC day `[start, end)` of the date `text` (`2026-11-22`).
pub fn day(text: &str) -> Result<(i64, i64), String> {
    let mut s = text.trim();
    match date(&mut s) {
        Some(d) if s.is_empty() => Ok((d * DAY, (d + 1) * DAY)),
        _ => Err(format!("{text:?} is not a date such as 2026-11-22")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-22T00:00:00Z, from `date -u -d 2026-11-22 +%s`.
    const NOV_22: i64 = 1_795_305_600_000;

    #[test]
    fn dates_and_rfc3339_times_parse_to_utc_milliseconds() {
        assert_eq!(parse_time("2026-11-22"), Ok(NOV_22));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_time("2026-11-22T08:30:15Z"),
            Ok(NOV_22 + 8 * HOUR + 30 * MINUTE + 15_000)
        );
        assert_eq!(parse_time("2026-11-22T08:30Z"), Ok(NOV_22 + 8 * HOUR + 30 * MINUTE));
        assert_eq!(parse_time("2026-11-22T00:00:00.123Z"), Ok(NOV_22 + 123));
        assert_eq!(parse_time("2026-11-22T00:00:00.1Z"), Ok(NOV_22 + 100));
        assert_eq!(parse_time("2026-11-22T09:00:00+01:00"), Ok(NOV_22 + 8 * HOUR));
        assert_eq!(parse_time("2026-11-21T19:00:00-05:00"), Ok(NOV_22));
        assert_eq!(parse_time("2024-02-29"), Ok(1_709_164_800_000));
        assert_eq!(parse_time("1969-12-31T23:59:59Z"), Ok(-1000));
        for bad in [
            "2026-11-31",
            "2026-13-01",
            "2025-02-29",
            "2026-11-22T24:00:00Z",
            "2026-11-22T08:00:00",
            "2026-11-22T08:00:00+1",
            "yesterday",
            "2026-11-22T08:00:00.Z",
            "",
        ] {
            assert!(parse_time(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn times_format_back_in_utc() {
        assert_eq!(format_time(NOV_22 + 8 * HOUR + 61_500), "2026-11-22T08:01:01Z");
        assert_eq!(format_time(-1000), "1969-12-31T23:59:59Z");
        assert_eq!(format_date(NOV_22 + DAY - 1), "2026-11-22");
        assert_eq!(format_date(1_709_164_800_000), "2024-02-29");
    }

    #[test]
    fn buckets_start_on_their_boundary_and_weeks_on_monday() {
        let t = NOV_22 + 8 * HOUR + 30 * MINUTE + 15_000;
        assert_eq!(By::Minute.start_of(t), NOV_22 + 8 * HOUR + 30 * MINUTE);
        assert_eq!(By::Hour.start_of(t), NOV_22 + 8 * HOUR);
        assert_eq!(By::Day.start_of(t), NOV_22);
        assert_eq!(By::Hour.start_of(NOV_22 + HOUR), NOV_22 + HOUR, "a boundary opens its bucket");
        assert_eq!(By::Hour.start_of(NOV_22 + HOUR - 1), NOV_22, "and closes the one before");
        // 2026-11-22 is a Sunday: its week began on Monday 2026-11-16.
        assert_eq!(format_time(By::Week.start_of(t)), "2026-11-16T00:00:00Z");
        assert_eq!(format_time(By::Week.start_of(NOV_22 + DAY)), "2026-11-23T00:00:00Z");
        assert_eq!(By::Week.end_of(By::Week.start_of(t)), NOV_22 + DAY);
        assert_eq!(format_time(By::Week.start_of(0)), "1969-12-29T00:00:00Z");
        assert_eq!(By::Day.start_of(-1), -DAY);
    }

    #[test]
    fn the_previous_day_is_the_whole_utc_day_before() {
        assert_eq!(previous_day(NOV_22 + 5 * HOUR), (NOV_22 - DAY, NOV_22));
        assert_eq!(previous_day(NOV_22), (NOV_22 - DAY, NOV_22));
        assert_eq!(day("2026-11-22"), Ok((NOV_22, NOV_22 + DAY)));
        assert!(day("2026-11-22T00:00:00Z").is_err());
    }
}
