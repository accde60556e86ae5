//! Time windows for `time` and `not_time`: days of the week and a span of minutes in a
//! [`Zone`]. Pure: a query's time is passed in as unix seconds; only the zone constructors
//! read zone data, once, while the configuration is compiled. [`Clock`] converts a query's
//! time at most once per zone in a row.

use std::fmt;
use std::sync::Arc;

pub(crate) const MINUTES_PER_DAY: u16 = 24 * 60;
pub(crate) const SECONDS_PER_DAY: i64 = 24 * 60 * 60;
const DAY_NAMES: [&str; 7] =
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

/// Days of the week and a span of minutes, in a zone.
///
/// The window opens at `start` on each chosen day and closes at `end`. When `end <= start` it
/// crosses midnight: the part after midnight falls on the next date but belongs to the day the
/// window opened, so `Fri 22:00-06:00` covers Friday 22:00 to Saturday 06:00. `start == end`
/// is a full 24 hours from `start`. `end` is exclusive; `24:00` is the end of the day.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    days: u8,
    start: u16,
    end: u16,
    zone: Zone,
}

impl TimeWindow {
    /// The day mask with every day set (bit 0 is Monday, bit 6 Sunday).
    pub const ALL_DAYS: u8 = 0x7f;

    /// `days`: bit 0 is Monday .. bit 6 Sunday; `start` in 0..1440 and `end` in 0..=1440 are
    /// minutes of the day.
    pub fn new(days: u8, start: u16, end: u16, zone: Zone) -> Result<TimeWindow, String> {
        if days == 0 || days > Self::ALL_DAYS {
            return Err(format!("invalid day mask {days:#x}"));
        }
        if start >= MINUTES_PER_DAY || end > MINUTES_PER_DAY {
            return Err(format!("invalid minutes {start}-{end}: start < 1440, end <= 1440"));
        }
        Ok(TimeWindow { days, start, end, zone })
    }

    /// Parses `"Mon-Fri 08:00-18:00"`, `"Sat,Sun 10:00-14:00"`, `"22:00-06:00"` (every day) or
    /// `"Mon 00:00-24:00"`. Day names are English, three letters or whole, any case; a day
    /// range may wrap (`Fri-Mon`).
    pub fn parse(text: &str, zone: &Zone) -> Result<TimeWindow, String> {
        let fail = |why: String| format!("invalid time window {text:?}: {why}");
        let t = text.trim();
        let (days, span) = match t.rsplit_once(char::is_whitespace) {
            Some((days, span)) => (parse_days(days).map_err(fail)?, span),
            None => (Self::ALL_DAYS, t),
        };
        let Some((start, end)) = span.split_once('-') else {
            return Err(fail("expected [DAYS] HH:MM-HH:MM, e.g. Mon-Fri 08:00-18:00".into()));
        };
        let start = parse_clock(start, false).map_err(fail)?;
        let end = parse_clock(end, true).map_err(fail)?;
        TimeWindow::new(days, start, end, zone.clone())
    }

    /// The day mask: bit 0 is Monday .. bit 6 Sunday.
    pub fn days(&self) -> u8 {
        self.days
    }

    /// Minute of the day the window opens.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Minute of the day the window closes (exclusive); at or before `start` it is the next day.
    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Whether the instant `now` (unix seconds) falls inside the window.
    pub fn contains(&self, now: i64) -> bool {
        self.contains_at(self.zone.local_time(now))
    }

    /// Whether the local (weekday, minute of day) falls inside the window.
    pub(super) fn contains_at(&self, (weekday, minute): (u8, u16)) -> bool {
        let on = |day: u8| self.days & (1 << day) != 0;
        if self.end > self.start {
            return on(weekday) && self.start <= minute && minute < self.end;
        }
        let yesterday = (weekday + 6) % 7;
        (on(weekday) && minute >= self.start) || (on(yesterday) && minute < self.end)
    }
}

/// `"Mon-Fri"`, `"Sat,Sun"`, `"Mon,Wed-Fri"` into a day mask.
fn parse_days(text: &str) -> Result<u8, String> {
    let mut mask = 0u8;
    for item in text.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (parse_day(first)?, parse_day(last)?),
            None => (parse_day(item)?, parse_day(item)?),
        };
        let mut day = first;
        mask |= 1 << day;
        while day != last {
            day = (day + 1) % 7;
            mask |= 1 << day;
        }
    }
    Ok(mask)
}

/// A day name, 0 for Monday.
fn parse_day(text: &str) -> Result<u8, String> {
    let name = text.trim().to_ascii_lowercase();
    let hit = |full: &&str| name == *full || (name.len() == 3 && full.starts_with(&name));
    match DAY_NAMES.iter().position(hit) {
        Some(day) => Ok(day as u8),
        None => Err(format!("unknown day {:?} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)", text.trim())),
    }
}

/// `"HH:MM"` into a minute of the day; `"24:00"` only as an end.
fn parse_clock(text: &str, is_end: bool) -> Result<u16, String> {
    let fail = || format!("invalid time {text:?}: expected HH:MM from 00:00 to 24:00");
    let (h, m) = text.split_once(':').ok_or_else(fail)?;
    let digits = |s: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return Err(fail());
    }
    let (h, m) = (h.parse::<u16>().map_err(|_| fail())?, m.parse::<u16>().map_err(|_| fail())?);
    let minute = h * 60 + m;
    match (h, m) {
        (24, 0) if is_end => Ok(minute),
        (0..=23, 0..=59) => Ok(minute),
        _ => Err(fail()),
    }
}

/// A time zone: converts unix seconds to the local weekday and minute of the day. Cheap to
/// clone; clones share the parsed zone.
#[derive(Clone)]
pub struct Zone(Arc<ZoneData>);

struct ZoneData {
    name: String,
    /// `None` is UTC.
    tz: Option<tz::TimeZone>,
}

impl Zone {
    /// Coordinated Universal Time.
    pub fn utc() -> Zone {
        Zone(Arc::new(ZoneData { name: "UTC".to_string(), tz: None }))
    }

    /// A zone from the bytes of a TZif file.
    pub fn from_tzif(name: &str, bytes: &[u8]) -> Result<Zone, String> {
        tz::TimeZone::from_tz_data(bytes)
            .map(|zone| Zone::from_tz(name, zone))
            .map_err(|e| format!("time zone {name:?}: invalid TZif data: {e}"))
    }

    fn from_tz(name: &str, tz: tz::TimeZone) -> Zone {
        Zone(Arc::new(ZoneData { name: name.to_string(), tz: Some(tz) }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Seconds east of UTC at the instant `now`; 0 if the zone data does not cover it.
    pub fn offset(&self, now: i64) -> i32 {
        let Some(tz) = &self.0.tz else { return 0 };
        tz.find_local_time_type(now).map_or(0, |t| t.ut_offset())
    }

    /// The local (weekday, minute of day) at the instant `now` (unix seconds); weekday 0 is
    /// Monday.
    pub fn local_time(&self, now: i64) -> (u8, u16) {
        let local = now.saturating_add(i64::from(self.offset(now)));
        let weekday = (local.div_euclid(SECONDS_PER_DAY) + 3).rem_euclid(7);
        let minute = local.rem_euclid(SECONDS_PER_DAY) / 60;
        (weekday as u8, minute as u16)
    }

    fn same(&self, other: &Zone) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({})", self.0.name)
    }
}

/// The local time of one query, converted at most once per zone in a row.
pub(super) struct Clock<'r> {
    now: i64,
    last: Option<(&'r Zone, (u8, u16))>,
}

impl<'r> Clock<'r> {
    pub(super) fn new(now: i64) -> Clock<'r> {
        Clock { now, last: None }
    }

    pub(super) fn local(&mut self, zone: &'r Zone) -> (u8, u16) {
        if let Some((last, local)) = self.last {
            if last.same(zone) {
                return local;
            }
        }
        let local = zone.local_time(self.now);
        self.last = Some((zone, local));
        local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clones share the parsed zone, so a query's [`Clock`] converts once for all of them;
    /// zones built apart are not the same, even from the same data.
    #[test]
    fn zone_clones_are_the_same_zone() {
        let utc = Zone::utc();
        assert!(utc.same(&utc.clone()));
        assert!(!utc.same(&Zone::utc()));
    }
}
