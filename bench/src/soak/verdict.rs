//! A soak's figures and its verdict: samples over time, the CSV and SVG they are written
//! to, and the pass criteria judged on them (pure, unit-tested).
//!
//! RSS drift is robust to the load's own noise: the median of the last third of the samples
//! after warm-up against the median of the first third, scaled to 10 minutes.
//!
//! fds are judged when sluice is quiet instead: the load is held until no session is open,
//! once at the end of warm-up and once after the run, and the two counts must be equal
//! (or fall). Sampled under load, the count moves by several fds with the sessions caught
//! half-open or half-closed, far more than 1% of a base of about twenty; quiet, it is exact,
//! and any fd that leaked is still held.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;

use crate::error::{BenchError, Result};

/// Largest drift of RSS and of fds allowed, in percent per 10 minutes.
pub const DRIFT_LIMIT: f64 = 1.0;
/// Largest failed-connection rate allowed.
pub const FAILURE_LIMIT: f64 = 1e-6;
/// Drift is judged only over at least this long after warm-up: a shorter window,
/// extrapolated to 10 minutes, would magnify the allocator's first growth. Shorter runs
/// (the CI smoke run) report drift and judge panics and failures only.
pub const DRIFT_WINDOW: Duration = Duration::from_secs(300);

/// One sample of a soak.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub seconds: f64,
    pub rss_kib: u64,
    pub fds: u64,
    /// Live sessions (admin API).
    pub sessions: u64,
    /// Connections that did what they should, so far.
    pub connections: u64,
    pub failures: u64,
    /// Reloads applied so far (admin API).
    pub reloads: u64,
}

impl Sample {
    /// fds beyond the two sockets of each live session.
    pub fn base_fds(&self) -> f64 {
        self.fds as f64 - 2.0 * self.sessions as f64
    }

    pub fn line(&self) -> String {
        format!(
            "t={:.0}s rss={} KiB fds={} sessions={} connections={} failures={} reloads={}",
            self.seconds,
            self.rss_kib,
            self.fds,
            self.sessions,
            self.connections,
            self.failures,
            self.reloads
        )
    }
}

/// sluice's fd count with no session open, at the end of warm-up and after the run; `None`
/// when not measured (a run shorter than its warm-up) or when sessions never drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuietFds {
    pub before: Option<u64>,
    pub after: Option<u64>,
}

impl QuietFds {
    /// fds held after the run beyond those held after warm-up; `None` unless both counts
    /// were taken.
    pub fn leaked(&self) -> Option<i64> {
        Some(self.after? as i64 - self.before? as i64)
    }

    /// Flat: nothing more is held than after warm-up. A run that measured the first count
    /// but could not drain its sessions for the second is not flat; one that never took the
    /// first (shorter than its warm-up) is not judged.
    fn judged(&self) -> Judgement {
        match self.before {
            None => Judgement::NotJudged("no count with no session open after warm-up"),
            Some(_) => Judgement::of(self.leaked().is_some_and(|n| n <= 0)),
        }
    }
}

/// How one criterion of a soak came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    Pass,
    Fail,
    /// Not judged, and why: it counts neither for nor against the run.
    NotJudged(&'static str),
}

impl Judgement {
    fn of(passed: bool) -> Judgement {
        if passed {
            Judgement::Pass
        } else {
            Judgement::Fail
        }
    }

    fn word(&self) -> String {
        match self {
            Judgement::Pass => "pass".into(),
            Judgement::Fail => "FAIL".into(),
            Judgement::NotJudged(why) => format!("not judged: {why}"),
        }
    }
}

/// What a soak concluded.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Percent per 10 minutes after warm-up; `None` with too few samples.
    pub rss_drift: Option<f64>,
    /// fds sampled under load, beyond two per live session, as drift (reported, not judged:
    /// see the module notes).
    pub fd_drift: Option<f64>,
    pub quiet_fds: QuietFds,
    pub panics: u64,
    pub connections: u64,
    pub failures: u64,
    /// RSS flat after warm-up (judged over at least [`DRIFT_WINDOW`]).
    pub rss: Judgement,
    /// No fd held beyond warm-up (counted with no session open).
    pub fds: Judgement,
    /// No panic in sluice's log.
    pub no_panic: Judgement,
    /// Connections made, and the failure rate under [`FAILURE_LIMIT`].
    pub failure_rate_ok: Judgement,
}

/// The outcome of a whole soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every criterion was judged and passed.
    Pass,
    /// A criterion failed.
    Fail,
    /// Nothing failed, but some criterion was not judged: not a pass.
    Incomplete,
}

impl Verdict {
    pub fn failure_rate(&self) -> f64 {
        self.failures as f64 / (self.connections + self.failures).max(1) as f64
    }

    /// Each criterion by name.
    pub fn criteria(&self) -> [(&'static str, Judgement); 4] {
        [
            ("rss drift", self.rss),
            ("quiet fds", self.fds),
            ("panics", self.no_panic),
            ("failure rate", self.failure_rate_ok),
        ]
    }

    pub fn outcome(&self) -> Outcome {
        let criteria = self.criteria();
        if criteria.iter().any(|(_, j)| *j == Judgement::Fail) {
            Outcome::Fail
        } else if criteria.iter().all(|(_, j)| *j == Judgement::Pass) {
            Outcome::Pass
        } else {
            Outcome::Incomplete
        }
    }

    /// One line: the outcome (`PASS` only when every criterion was judged and passed,
    /// `INCOMPLETE` when nothing failed but something was not judged, else `FAIL`), the
    /// figures, and each criterion's judgement.
    pub fn summary(&self) -> String {
        let pct = |d: Option<f64>| d.map_or("n/a".into(), |d| format!("{d:+.3}%/10min"));
        let count = |n: Option<u64>| n.map_or("n/a".into(), |n| n.to_string());
        let outcome = match self.outcome() {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Incomplete => "INCOMPLETE",
        };
        let judged: Vec<String> =
            self.criteria().iter().map(|(name, j)| format!("{name} {}", j.word())).collect();
        format!(
            "{outcome}: rss drift {}, quiet fds {} -> {} (sampled under load: {}), panics {}, \
             connections {}, failures {} (rate {:.2e}); {}",
            pct(self.rss_drift),
            count(self.quiet_fds.before),
            count(self.quiet_fds.after),
            pct(self.fd_drift),
            self.panics,
            self.connections,
            self.failures,
            self.failure_rate(),
            judged.join(", ")
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Drift of `value` over the samples, in percent per 10 minutes: median of the last third
/// against the median of the first third. `None` with fewer than 6 samples.
pub fn drift(samples: &[Sample], value: fn(&Sample) -> f64) -> Option<f64> {
    if samples.len() < 6 {
        return None;
    }
    let third = samples.len() / 3;
    let (first, last) = (&samples[..third], &samples[samples.len() - third..]);
    let mid = |s: &[Sample]| (s[0].seconds + s[s.len() - 1].seconds) / 2.0;
    let span = mid(last) - mid(first);
    let base = median(first.iter().map(value).collect());
    if span <= 0.0 || base <= 0.0 {
        return None;
    }
    let change = median(last.iter().map(value).collect()) - base;
    Some(change / base * 100.0 * 600.0 / span)
}

/// Judges a soak: RSS drift after `warmup`, fds when quiet, panics, failure rate.
pub fn judge(samples: &[Sample], warmup: Duration, quiet_fds: QuietFds, panics: u64) -> Verdict {
    let after: Vec<Sample> =
        samples.iter().filter(|s| s.seconds >= warmup.as_secs_f64()).cloned().collect();
    let rss_drift = drift(&after, |s| s.rss_kib as f64);
    let fd_drift = drift(&after, Sample::base_fds);
    let last = samples.last();
    let connections = last.map_or(0, |s| s.connections);
    let failures = last.map_or(0, |s| s.failures);
    let window = match (after.first(), after.last()) {
        (Some(a), Some(b)) => b.seconds - a.seconds,
        _ => 0.0,
    };
    let rss = match rss_drift {
        _ if window < DRIFT_WINDOW.as_secs_f64() => {
            Judgement::NotJudged("run shorter than 300 s after warm-up")
        }
        None => Judgement::NotJudged("too few samples"),
        Some(d) => Judgement::of(d.abs() < DRIFT_LIMIT),
    };
    let mut v = Verdict {
        rss_drift,
        fd_drift,
        quiet_fds,
        panics,
        connections,
        failures,
        rss,
        fds: quiet_fds.judged(),
        no_panic: Judgement::of(panics == 0),
        failure_rate_ok: Judgement::Pass,
    };
    v.failure_rate_ok = Judgement::of(connections > 0 && v.failure_rate() < FAILURE_LIMIT);
    v
}

/// Writes samples as CSV lines, flushed as they come.
pub struct CsvWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl CsvWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)
            .map_err(|source| BenchError::File { path: path.to_path_buf(), source })?;
        let mut w = Self { out: BufWriter::new(file), path: path.to_path_buf() };
        w.put("seconds,rss_kib,fds,sessions,connections,failures,reloads\n")?;
        Ok(w)
    }

    pub fn write(&mut self, s: &Sample) -> Result<()> {
        self.put(&format!(
            "{:.1},{},{},{},{},{},{}\n",
            s.seconds, s.rss_kib, s.fds, s.sessions, s.connections, s.failures, s.reloads
        ))
    }

    fn put(&mut self, text: &str) -> Result<()> {
        let error = |source| BenchError::File { path: self.path.clone(), source };
        self.out.write_all(text.as_bytes()).map_err(error)?;
        self.out.flush().map_err(|source| BenchError::File { path: self.path.clone(), source })
    }
}

/// Draws RSS (MiB), fds and live sessions over time; the warm-up is shaded.
pub fn chart(path: &Path, samples: &[Sample], warmup: Duration) -> Result<()> {
    draw(path, samples, warmup)
        .map_err(|detail| BenchError::Chart { path: path.to_path_buf(), detail })
}

fn draw(path: &Path, samples: &[Sample], warmup: Duration) -> std::result::Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let end = samples.last().map_or(1.0, |s| s.seconds).max(1.0);
    type Series = (&'static str, fn(&Sample) -> f64, RGBColor);
    let series: [Series; 3] = [
        ("RSS (MiB)", |s| s.rss_kib as f64 / 1024.0, RGBColor(31, 119, 180)),
        ("open fds", |s| s.fds as f64, RGBColor(214, 39, 40)),
        ("live sessions", |s| s.sessions as f64, RGBColor(44, 160, 44)),
    ];
    let panels = root.split_evenly((3, 1));
    for (area, (name, value, colour)) in panels.iter().zip(series) {
        let top = samples.iter().map(value).fold(1.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("soak: {name}"), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..end, 0.0..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        let shade = RGBColor(230, 230, 230).filled();
        let warm = warmup.as_secs_f64().min(end);
        chart
            .draw_series([Rectangle::new([(0.0, 0.0), (warm, top)], shade)])
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(samples.iter().map(|s| (s.seconds, value(s))), colour))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: impl Fn(f64) -> f64, fds: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..120)
            .map(|i| {
                let t = i as f64 * 5.0;
                Sample {
                    seconds: t,
                    rss_kib: rss(t) as u64,
                    fds: fds(t) as u64,
                    sessions: i % 5,
                    connections: 1_000_000 + i,
                    failures: 0,
                    reloads: i / 2,
                }
            })
            .collect()
    }

    const QUIET: QuietFds = QuietFds { before: Some(20), after: Some(20) };

    #[test]
    fn flat_figures_with_noise_pass() {
        // Noise of the load: sessions come and go (two fds each), RSS wobbles.
        let s = samples(|t| 20_000.0 + (t * 7.0) % 300.0, |_| 20.0);
        let s: Vec<Sample> = s
            .into_iter()
            .map(|mut x| {
                x.fds += 2 * x.sessions;
                x
            })
            .collect();
        let v = judge(&s, Duration::from_secs(60), QUIET, 0);
        assert_eq!(v.outcome(), Outcome::Pass, "{}", v.summary());
        assert!(v.fd_drift.unwrap().abs() < 1e-9, "sessions' fds are not drift");
    }

    #[test]
    fn a_leak_of_two_percent_per_ten_minutes_fails() {
        let s = samples(|t| 20_000.0 * (1.0 + 0.02 * t / 600.0), |_| 20.0);
        let v = judge(&s, Duration::from_secs(60), QUIET, 0);
        assert_eq!((v.outcome(), v.rss), (Outcome::Fail, Judgement::Fail));
        let d = v.rss_drift.unwrap();
        assert!((1.5..2.5).contains(&d), "measured {d}%/10min");
    }

    #[test]
    fn fds_are_judged_quiet_and_any_fd_held_beyond_warm_up_fails() {
        // Under load the sampled count wanders by several fds: not judged.
        let s = samples(|_| 20_000.0, |t| 20.0 + (t * 13.0) % 9.0);
        let outcome = |q| judge(&s, Duration::from_secs(60), q, 0).outcome();
        assert_eq!(outcome(QUIET), Outcome::Pass);
        let leaked = QuietFds { before: Some(20), after: Some(21) };
        let v = judge(&s, Duration::from_secs(60), leaked, 0);
        assert_eq!(v.outcome(), Outcome::Fail, "one fd held beyond warm-up fails: {}", v.summary());
        assert_eq!(leaked.leaked(), Some(1));
        assert_eq!(outcome(QuietFds { before: Some(20), after: Some(19) }), Outcome::Pass);
        assert_eq!(outcome(QuietFds { before: Some(20), after: None }), Outcome::Fail);
    }

    #[test]
    fn a_panic_or_one_failure_in_a_hundred_thousand_fails() {
        let s = samples(|_| 20_000.0, |_| 20.0);
        assert_eq!(judge(&s, Duration::from_secs(60), QUIET, 1).outcome(), Outcome::Fail);
        let mut s = s;
        s.last_mut().unwrap().failures = 10;
        let v = judge(&s, Duration::from_secs(60), QUIET, 0);
        assert!(v.outcome() == Outcome::Fail && v.failure_rate() > FAILURE_LIMIT);
    }

    /// Issue 26 item 18: a short run printed PASS although it had judged neither RSS drift
    /// nor (without a quiet count) fds.
    #[test]
    fn a_short_run_is_incomplete_never_a_pass() {
        let s = samples(|t| 20_000.0 * (1.0 + 0.1 * t / 600.0), |_| 20.0);
        let v = judge(&s[..12], Duration::ZERO, QuietFds::default(), 0);
        assert_eq!(v.outcome(), Outcome::Incomplete, "{}", v.summary());
        let line = v.summary();
        assert!(line.starts_with("INCOMPLETE: ") && !line.contains("PASS"), "{line}");
        assert!(line.contains("rss drift not judged: run shorter than 300 s"), "{line}");
        assert!(line.contains("quiet fds not judged"), "{line}");
        assert!(line.contains("panics pass"), "{line}");
        assert!(v.rss_drift.unwrap() > 5.0, "drift is still reported");
        let v = judge(&s[..12], Duration::ZERO, QuietFds::default(), 1);
        assert_eq!(v.outcome(), Outcome::Fail);
    }
}
