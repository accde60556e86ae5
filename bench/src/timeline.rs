//! The clock of one measurement: warm-up, measured window, stop.
//!
//! Load threads read the shared [`RunControl`] to know whether to record and when to stop;
//! the calling thread runs [`drive`], which owns all timing. The measured window starts and
//! ends with a snapshot of the scenario's counters, so figures are deltas over exactly the
//! window, never including warm-up; a [`CpuSample`] taken right after each snapshot gives
//! the CPU time used over the same window. Once a second a progress line goes to stderr. A
//! SIGINT or SIGTERM ends the run early with [`BenchError::Interrupted`].

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::cpu::{clock_ticks, CpuSample, CpuUse};
use crate::error::{io_context, BenchError, Result};

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// How often the clock wakes to check for interruption.
const TICK: Duration = Duration::from_millis(50);
/// How often a progress line is printed (a tick early still counts, so a phase's last
/// second gets its line too).
const PROGRESS_EVERY: Duration = Duration::from_millis(950);

/// Phase flag shared by the clock and the load threads.
#[derive(Debug, Default)]
pub struct RunControl {
    phase: AtomicU8,
}

impl RunControl {
    /// A control in the warm-up phase.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { phase: AtomicU8::new(WARMUP) })
    }

    /// True while samples belong to the measured window.
    pub fn measuring(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == MEASURE
    }

    /// True once load threads must wind down.
    pub fn stopped(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == STOP
    }

    /// Tells load threads to wind down.
    pub fn stop(&self) {
        self.phase.store(STOP, Ordering::Relaxed);
    }

    fn start_measuring(&self) {
        self.phase.store(MEASURE, Ordering::Relaxed);
    }
}

/// Warm-up and measured durations of a run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// Words one progress line from the previous and current counters and the seconds between.
pub type Describe = dyn Fn(&[u64], &[u64], f64) -> String;

/// What the clock needs from a scenario: its counters, and how to word one progress line.
pub struct Meter<'a> {
    /// Short scenario name, printed at the start of each progress line.
    pub label: &'a str,
    /// Current values of the scenario's monotonically increasing counters.
    pub counters: &'a dyn Fn() -> Vec<u64>,
    /// Progress text from the previous and current counters and the seconds between them.
    pub describe: &'a Describe,
    /// The proxy whose process tree's CPU time the window reads, if any.
    pub proxy: Option<u32>,
}

/// Counters at the start and end of the measured window, and its exact length.
#[derive(Debug, Clone)]
pub struct Window {
    pub start: Vec<u64>,
    pub end: Vec<u64>,
    pub elapsed: Duration,
    /// CPU time used over the window, by the proxy and by everything else.
    pub cpu: CpuUse,
}

impl Window {
    /// Growth of counter `index` over the window.
    pub fn delta(&self, index: usize) -> u64 {
        self.end[index].saturating_sub(self.start[index])
    }

    /// Growth of every counter over the window.
    pub fn deltas(&self) -> Vec<u64> {
        (0..self.end.len()).map(|i| self.delta(i)).collect()
    }

    /// Window length in seconds.
    pub fn seconds(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }
}

/// Runs warm-up then the measured window, printing progress; always leaves `control` stopped.
pub fn drive(control: &RunControl, timing: Timing, meter: &Meter<'_>) -> Result<Window> {
    let outcome = drive_phases(control, timing, meter);
    control.stop();
    outcome
}

fn drive_phases(control: &RunControl, timing: Timing, meter: &Meter<'_>) -> Result<Window> {
    run_phase(meter, "warmup", timing.warmup)?;
    let start = (meter.counters)();
    let cpu_start = CpuSample::take();
    let began = Instant::now();
    control.start_measuring();
    run_phase(meter, "measure", timing.duration)?;
    let end = (meter.counters)();
    let elapsed = began.elapsed();
    let cpu_end = CpuSample::take();
    let own = std::process::id();
    let cpu = CpuUse::between(&cpu_start, &cpu_end, meter.proxy, own, clock_ticks());
    Ok(Window { start, end, elapsed, cpu })
}

fn run_phase(meter: &Meter<'_>, phase: &str, length: Duration) -> Result<()> {
    let began = Instant::now();
    let mut last_at = began;
    let mut last = (meter.counters)();
    while let Some(left) = length.checked_sub(began.elapsed()).filter(|l| !l.is_zero()) {
        if interrupted() {
            return Err(BenchError::Interrupted);
        }
        thread::sleep(TICK.min(left));
        if last_at.elapsed() < PROGRESS_EVERY {
            continue;
        }
        let now = (meter.counters)();
        let seconds = last_at.elapsed().as_secs_f64();
        let text = (meter.describe)(&last, &now, seconds);
        eprintln!(
            "[{}] {phase} {:>4.1}/{:.1}s  {text}",
            meter.label,
            began.elapsed().as_secs_f64(),
            length.as_secs_f64()
        );
        last = now;
        last_at = Instant::now();
    }
    Ok(())
}

fn interrupt_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Makes SIGINT and SIGTERM set a flag that every wait in the crate checks.
pub fn install_interrupt_handler() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(interrupt_flag()))
            .map_err(io_context("installing signal handler"))?;
    }
    Ok(())
}

/// True once SIGINT or SIGTERM has arrived.
pub fn interrupted() -> bool {
    interrupt_flag().load(Ordering::Relaxed)
}

/// Sleeps up to `length`, returning early with an error if interrupted.
pub fn pause(length: Duration) -> Result<()> {
    let until = Instant::now() + length;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if interrupted() {
            return Err(BenchError::Interrupted);
        }
        if left.is_zero() {
            break;
        }
        thread::sleep(TICK.min(left));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn window_counts_only_the_measured_phase() {
        let control = RunControl::new();
        let counter = AtomicU64::new(0);
        let counters = || {
            // Grows by one each time it is read, so warm-up reads must not show up.
            vec![counter.fetch_add(1, Ordering::Relaxed)]
        };
        let describe = |_: &[u64], _: &[u64], _: f64| String::new();
        let meter = Meter { label: "test", counters: &counters, describe: &describe, proxy: None };
        let timing =
            Timing { warmup: Duration::from_millis(20), duration: Duration::from_millis(30) };
        let window = drive(&control, timing, &meter).unwrap();
        assert!(control.stopped());
        assert!(window.start[0] >= 1, "warm-up read the counter first");
        assert_eq!(window.delta(0), window.end[0] - window.start[0]);
        assert!(window.elapsed >= Duration::from_millis(30));
        assert!(window.elapsed < Duration::from_millis(500));
    }

    #[test]
    fn phases_follow_in_order() {
        let control = RunControl::new();
        assert!(!control.measuring() && !control.stopped());
        control.start_measuring();
        assert!(control.measuring() && !control.stopped());
        control.stop();
        assert!(!control.measuring() && control.stopped());
    }
}
