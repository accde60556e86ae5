//! From the reports of every round to the figures a reader needs: the median per
//! contender, ratios to "direct" and to HAProxy, and what else the machine was doing
//! during the windows (the verdicts on the targets are in [`crate::compare::goals`]).
//!
//! Medians, not means, so one disturbed round cannot move a result. A ratio whose
//! denominator is not a positive number is "n/a", never a made-up value.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cpu::OtherProcess;
use crate::report::Report;
use crate::scenario::Scenario;
use crate::stats::{format_figure, format_ratio, median, ratio};
use crate::table::Table;

/// A figure shown in the comparison tables: a scenario (or test) by name, a figure of its
/// reports, and the column label.
#[derive(Debug, Clone, Copy)]
pub struct Headline {
    pub scenario: &'static str,
    pub figure: &'static str,
    pub label: &'static str,
}

const THROUGHPUT: &str = Scenario::Throughput.name();
const RR: &str = Scenario::Rr.name();
const CONNECT: &str = Scenario::Connect.name();
const IDLE: &str = Scenario::Idle.name();

/// The columns of the comparison tables, in order; the CPU costs come last so the older
/// columns keep their places.
pub const HEADLINES: [Headline; 12] = [
    Headline { scenario: THROUGHPUT, figure: "gbit_s_total", label: "throughput Gbit/s" },
    Headline { scenario: RR, figure: "requests_per_s", label: "rr req/s" },
    Headline { scenario: RR, figure: "latency_us_p50", label: "rr p50 µs" },
    Headline { scenario: RR, figure: "latency_us_p99", label: "rr p99 µs" },
    Headline { scenario: RR, figure: "latency_us_p999", label: "rr p99.9 µs" },
    Headline { scenario: CONNECT, figure: "connections_per_s", label: "connect conn/s" },
    Headline { scenario: CONNECT, figure: "latency_us_p99", label: "connect p99 µs" },
    Headline { scenario: IDLE, figure: "kib_per_connection", label: "idle KiB/conn" },
    Headline { scenario: IDLE, figure: "fds_per_connection", label: "idle fds/conn" },
    Headline { scenario: THROUGHPUT, figure: "cpu_s_per_gb", label: "throughput CPU s/GB" },
    Headline { scenario: RR, figure: "cpu_s_per_100k_requests", label: "rr CPU s/100k req" },
    Headline {
        scenario: CONNECT,
        figure: "cpu_s_per_10k_connections",
        label: "connect CPU s/10k conn",
    },
];

/// Median and spread of one figure over the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Spread> {
        let median = median(values)?;
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let min = finite.clone().fold(f64::INFINITY, f64::min);
        let max = finite.fold(f64::NEG_INFINITY, f64::max);
        Some(Spread { median, min, max, rounds: values.len() })
    }
}

/// Key of a figure: contender, scenario, figure name.
type Key = (String, String, String);

/// Every figure of every contender, reduced over rounds.
#[derive(Debug, Clone)]
pub struct Summary {
    contenders: Vec<String>,
    headlines: &'static [Headline],
    spreads: BTreeMap<Key, Spread>,
}

impl Summary {
    /// Reduces reports (grouped by contender and scenario name); `contenders` fixes the row
    /// order, `headlines` the columns of the tables.
    pub fn build(
        contenders: &[String],
        reports: &[Report],
        headlines: &'static [Headline],
    ) -> Summary {
        let mut values: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
        for report in reports {
            let Some(contender) = &report.contender else { continue };
            for (figure, &value) in &report.figures {
                values
                    .entry((contender.clone(), report.scenario.clone(), figure.clone()))
                    .or_default()
                    .push(value);
            }
        }
        let spreads = values.into_iter().filter_map(|(k, v)| Some((k, Spread::of(&v)?))).collect();
        Summary { contenders: contenders.to_vec(), headlines, spreads }
    }

    /// Median of a figure, if measured.
    pub fn median(&self, contender: &str, scenario: &str, figure: &str) -> Option<f64> {
        self.spread(contender, scenario, figure).map(|s| s.median)
    }

    fn spread(&self, contender: &str, scenario: &str, figure: &str) -> Option<Spread> {
        let key = (contender.to_string(), scenario.to_string(), figure.to_string());
        self.spreads.get(&key).copied()
    }

    /// Ratio of two contenders' medians for a figure.
    pub fn ratio(
        &self,
        contender: &str,
        baseline: &str,
        scenario: &str,
        figure: &str,
    ) -> Option<f64> {
        ratio(self.median(contender, scenario, figure)?, self.median(baseline, scenario, figure)?)
    }

    /// Medians (with min-max over rounds when there are several) of the headline figures.
    pub fn absolute_table(&self) -> Table {
        let mut table =
            Table::new(std::iter::once("contender").chain(self.headlines.iter().map(|h| h.label)));
        for contender in &self.contenders {
            let cells =
                self.headlines.iter().map(|h| match self.spread(contender, h.scenario, h.figure) {
                    None => "–".to_string(),
                    Some(s) if s.rounds > 1 => {
                        format!(
                            "{} ({}–{})",
                            format_figure(s.median),
                            format_figure(s.min),
                            format_figure(s.max)
                        )
                    }
                    Some(s) => format_figure(s.median),
                });
            table.row(std::iter::once(contender.clone()).chain(cells));
        }
        table
    }

    /// Headline figures of every contender divided by those of `baseline`.
    pub fn ratio_table(&self, baseline: &str) -> Table {
        let mut table =
            Table::new(std::iter::once("contender").chain(self.headlines.iter().map(|h| h.label)));
        for contender in &self.contenders {
            let cells = self.headlines.iter().map(|h| {
                self.ratio(contender, baseline, h.scenario, h.figure)
                    .map_or("n/a".into(), format_ratio)
            });
            table.row(std::iter::once(contender.clone()).chain(cells));
        }
        table
    }

    /// Headline figures of each contender of the build under test divided by those of its
    /// counterpart in the baseline build (same driver and relay): `pairs` of (this, base).
    pub fn pair_table(&self, pairs: &[(&str, &str)]) -> Table {
        let mut table = Table::new(
            std::iter::once("this / baseline").chain(self.headlines.iter().map(|h| h.label)),
        );
        for (this, base) in pairs {
            let cells = self.headlines.iter().map(|h| {
                self.ratio(this, base, h.scenario, h.figure).map_or("n/a".into(), format_ratio)
            });
            table.row(std::iter::once(format!("{this} / {base}")).chain(cells));
        }
        table
    }

    /// Medians as nested maps contender -> scenario -> figure -> value, for JSON.
    pub fn medians(&self) -> BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> {
        let mut out: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
        for ((contender, scenario, figure), spread) in &self.spreads {
            out.entry(contender.clone())
                .or_default()
                .entry(scenario.clone())
                .or_default()
                .insert(figure.clone(), spread.median);
        }
        out
    }

    /// Headline ratios to `baseline` as contender -> "scenario.figure" -> ratio, for JSON.
    pub fn ratios(&self, baseline: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
        let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for contender in &self.contenders {
            for h in self.headlines {
                if let Some(r) = self.ratio(contender, baseline, h.scenario, h.figure) {
                    out.entry(contender.clone())
                        .or_default()
                        .insert(format!("{}.{}", h.scenario, h.figure), r);
                }
            }
        }
        out
    }
}

/// What else the machine was doing during one scenario's measured windows, over all
/// contenders and rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineNote {
    pub scenario: String,
    pub windows: usize,
    /// One-minute load average, lowest and highest at a window's start or end.
    pub load_average: Option<[f64; 2]>,
    /// Cores used by other processes: median and highest over the windows.
    pub other_cores: Option<[f64; 2]>,
    /// Cores spent in irq and softirq: median and highest.
    pub interrupt_cores: Option<[f64; 2]>,
    /// Cores used by the load generator (this process): median and highest.
    pub load_generator_cores: Option<[f64; 2]>,
    /// The busiest other programs, CPU seconds summed over the windows, busiest first.
    pub busiest_others: Vec<OtherProcess>,
}

/// One [`MachineNote`] per scenario (by name) that has windows.
pub fn machine_notes(reports: &[Report], scenarios: &[&str]) -> Vec<MachineNote> {
    scenarios
        .iter()
        .filter_map(|&scenario| {
            let windows: Vec<&Report> = reports.iter().filter(|r| r.scenario == scenario).collect();
            (!windows.is_empty()).then(|| machine_note(scenario, &windows))
        })
        .collect()
}

fn machine_note(scenario: &str, windows: &[&Report]) -> MachineNote {
    let loads: Vec<f64> = windows
        .iter()
        .flat_map(|r| [r.figures.get("load_average_start"), r.figures.get("load_average_end")])
        .flatten()
        .copied()
        .collect();
    let cores = |figure: &str| -> Option<[f64; 2]> {
        let values: Vec<f64> =
            windows.iter().filter_map(|r| per_window_second(r, figure)).collect();
        Some([median(&values)?, highest(&values)])
    };
    MachineNote {
        scenario: scenario.to_string(),
        windows: windows.len(),
        load_average: (!loads.is_empty()).then(|| [lowest(&loads), highest(&loads)]),
        other_cores: cores("other_cpu_s"),
        interrupt_cores: cores("interrupt_cpu_s"),
        load_generator_cores: cores("bench_cpu_s"),
        busiest_others: busiest_programs(windows),
    }
}

/// The notes as a table, one row per scenario.
pub fn machine_table(notes: &[MachineNote]) -> Table {
    let mut table = Table::new([
        "scenario",
        "windows",
        "load average",
        "other processes, cores",
        "interrupts, cores",
        "load generator, cores",
        "busiest other programs (CPU s)",
    ]);
    let pair =
        |value: Option<[f64; 2]>, text: fn([f64; 2]) -> String| value.map_or("–".into(), text);
    for note in notes {
        let busiest: Vec<String> =
            note.busiest_others.iter().map(|o| format!("{} {:.2}", o.name, o.cpu_s)).collect();
        table.row([
            note.scenario.clone(),
            note.windows.to_string(),
            pair(note.load_average, |[low, high]| format!("{low:.2}–{high:.2}")),
            pair(note.other_cores, median_and_max),
            pair(note.interrupt_cores, median_and_max),
            pair(note.load_generator_cores, median_and_max),
            if busiest.is_empty() { "none".into() } else { busiest.join(", ") },
        ]);
    }
    table
}

/// A CPU-seconds figure of one window divided by the window's length: cores.
fn per_window_second(report: &Report, figure: &str) -> Option<f64> {
    let seconds = *report.figures.get("cpu_window_s")?;
    (seconds > 0.0).then_some(report.figures.get(figure)? / seconds)
}

fn lowest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn highest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn median_and_max([middle, high]: [f64; 2]) -> String {
    format!("{middle:.2} (max {high:.2})")
}

/// The three programs other than the proxies and the load generator that used the most CPU
/// over all `windows`, with their seconds.
fn busiest_programs(windows: &[&Report]) -> Vec<OtherProcess> {
    const SHOWN: usize = 3;
    let mut by_name: BTreeMap<&str, f64> = BTreeMap::new();
    for other in windows.iter().flat_map(|r| &r.other_processes) {
        *by_name.entry(&other.name).or_default() += other.cpu_s;
    }
    let mut busiest: Vec<(&str, f64)> = by_name.into_iter().collect();
    busiest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    busiest
        .into_iter()
        .take(SHOWN)
        .map(|(name, cpu_s)| OtherProcess { name: name.to_string(), cpu_s })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(contender: &str, scenario: &str, figures: &[(&str, f64)]) -> Report {
        let mut report = Report::new(scenario, "t".into(), &()).unwrap();
        report.contender = Some(contender.into());
        for (name, value) in figures {
            report.figure(*name, *value);
        }
        report
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn medians_over_rounds_and_ratios() {
        let reports = vec![
            report("haproxy", "rr", &[("requests_per_s", 100.0), ("latency_us_p99", 50.0)]),
            report("haproxy", "rr", &[("requests_per_s", 300.0), ("latency_us_p99", 70.0)]),
            report("haproxy", "rr", &[("requests_per_s", 200.0), ("latency_us_p99", 60.0)]),
            report("sluice-epoll", "rr", &[("requests_per_s", 260.0), ("latency_us_p99", 45.0)]),
        ];
        let summary = Summary::build(&names(&["haproxy", "sluice-epoll"]), &reports, &HEADLINES);
        assert_eq!(summary.median("haproxy", RR, "requests_per_s"), Some(200.0));
        assert_eq!(summary.ratio("sluice-epoll", "haproxy", RR, "requests_per_s"), Some(1.3));
        assert_eq!(summary.ratio("sluice-epoll", "haproxy", RR, "latency_us_p99"), Some(0.75));
        assert_eq!(summary.median("haproxy", CONNECT, "connections_per_s"), None);
    }

    #[test]
    fn machine_note_per_scenario() {
        let window = |contender: &str, load: (f64, f64), other: f64, rustc: f64| {
            let mut r = report(
                contender,
                "rr",
                &[
                    ("cpu_window_s", 2.0),
                    ("load_average_start", load.0),
                    ("load_average_end", load.1),
                    ("other_cpu_s", other),
                    ("interrupt_cpu_s", 0.2),
                    ("bench_cpu_s", 1.8),
                ],
            );
            r.other_processes = vec![
                OtherProcess { name: "rustc".into(), cpu_s: rustc },
                OtherProcess { name: "sshd".into(), cpu_s: 0.01 },
            ];
            r
        };
        let reports = vec![
            window("haproxy", (1.5, 1.75), 0.4, 0.3),
            window("nginx", (1.75, 2.5), 1.0, 0.5),
            window("direct", (2.5, 2.0), 0.6, 0.2),
        ];
        let notes = machine_notes(&reports, &[THROUGHPUT, RR]);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].load_average, Some([1.5, 2.5]));
        let table = machine_table(&notes).render();
        assert!(!table.contains("| throughput"), "a scenario without windows has no row: {table}");
        assert!(table.contains("| rr "), "{table}");
        assert!(table.contains("1.50–2.50"), "{table}");
        assert!(table.contains("0.30 (max 0.50)"), "other cores: 0.2, 0.5, 0.3: {table}");
        assert!(table.contains("0.90 (max 0.90)"), "load generator: {table}");
        assert!(table.contains("rustc 1.00, sshd 0.03"), "{table}");
    }

    #[test]
    fn tables_show_spread_and_missing_figures() {
        let reports = vec![
            report("direct", "rr", &[("requests_per_s", 100.0)]),
            report("direct", "rr", &[("requests_per_s", 300.0)]),
            report("nginx", "rr", &[("requests_per_s", 50.0)]),
        ];
        let summary = Summary::build(&names(&["direct", "nginx"]), &reports, &HEADLINES);
        let absolute = summary.absolute_table().render();
        assert!(absolute.contains("200 (100–300)"), "{absolute}");
        assert!(absolute.contains("–"));
        let ratios = summary.ratio_table("direct").render();
        assert!(ratios.contains("0.25x"), "{ratios}");
        assert!(ratios.contains("n/a"));
    }
}
