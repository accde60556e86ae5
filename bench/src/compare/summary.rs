//! From the reports of every round to the figures a reader needs: the median per
//! contender, ratios to "direct" and to HAProxy, and a plain verdict on each target.
//!
//! Medians, not means, so one disturbed round cannot move a result. A ratio whose
//! denominator is not a positive number is "n/a", never a made-up value.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::compare::contender::ContenderKind;
use crate::report::Report;
use crate::scenario::Scenario;
use crate::stats::{format_figure, format_ratio, median, ratio};
use crate::table::Table;

/// A figure shown in the comparison tables.
#[derive(Debug, Clone, Copy)]
pub struct Headline {
    pub scenario: Scenario,
    pub figure: &'static str,
    pub label: &'static str,
}

/// The columns of the comparison tables, in order.
pub const HEADLINES: [Headline; 9] = [
    Headline { scenario: Scenario::Throughput, figure: "gbit_s_total", label: "throughput Gbit/s" },
    Headline { scenario: Scenario::Rr, figure: "requests_per_s", label: "rr req/s" },
    Headline { scenario: Scenario::Rr, figure: "latency_us_p50", label: "rr p50 µs" },
    Headline { scenario: Scenario::Rr, figure: "latency_us_p99", label: "rr p99 µs" },
    Headline { scenario: Scenario::Rr, figure: "latency_us_p999", label: "rr p99.9 µs" },
    Headline { scenario: Scenario::Connect, figure: "connections_per_s", label: "connect conn/s" },
    Headline { scenario: Scenario::Connect, figure: "latency_us_p99", label: "connect p99 µs" },
    Headline { scenario: Scenario::Idle, figure: "kib_per_connection", label: "idle KiB/conn" },
    Headline { scenario: Scenario::Idle, figure: "fds_per_connection", label: "idle fds/conn" },
];

/// How a ratio must compare with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, value: f64) -> bool {
        match self {
            Bound::AtLeast(limit) => value >= limit,
            Bound::AtMost(limit) => value <= limit,
        }
    }

    fn describe(self) -> String {
        match self {
            Bound::AtLeast(limit) => format!(">= {limit}"),
            Bound::AtMost(limit) => format!("<= {limit}"),
        }
    }
}

/// A target for sluice, stated as a ratio sluice / HAProxy.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub label: &'static str,
    pub scenario: Scenario,
    pub figure: &'static str,
    pub bound: Bound,
}

/// The targets, as ratios of sluice to HAProxy.
pub const GOALS: [Goal; 5] = [
    Goal {
        label: "throughput, one stream",
        scenario: Scenario::Throughput,
        figure: "gbit_s_total",
        bound: Bound::AtLeast(1.3),
    },
    Goal {
        label: "rr requests/s",
        scenario: Scenario::Rr,
        figure: "requests_per_s",
        bound: Bound::AtLeast(1.2),
    },
    Goal {
        label: "connect connections/s",
        scenario: Scenario::Connect,
        figure: "connections_per_s",
        bound: Bound::AtLeast(1.2),
    },
    Goal {
        label: "rr p99 latency",
        scenario: Scenario::Rr,
        figure: "latency_us_p99",
        bound: Bound::AtMost(0.8),
    },
    Goal {
        label: "idle KiB per connection",
        scenario: Scenario::Idle,
        figure: "kib_per_connection",
        bound: Bound::AtMost(0.6),
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

/// Whether a goal was met.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Met { ratio: f64 },
    NotMet { ratio: f64 },
    NotMeasured { reason: String },
}

/// One goal judged for one sluice contender.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub goal: &'static str,
    pub contender: String,
    pub bound: Bound,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Verdict {
    /// The verdict in words, e.g. `MET (1.42x, needs >= 1.3)`.
    pub fn text(&self) -> String {
        let needs = self.bound.describe();
        match &self.outcome {
            Outcome::Met { ratio } => format!("MET ({}, needs {needs})", format_ratio(*ratio)),
            Outcome::NotMet { ratio } => {
                format!("NOT MET ({}, needs {needs})", format_ratio(*ratio))
            }
            Outcome::NotMeasured { reason } => format!("NOT MEASURED ({reason})"),
        }
    }
}

/// Key of a figure: contender, scenario, figure name.
type Key = (String, Scenario, String);

/// Every figure of every contender, reduced over rounds.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    contenders: Vec<String>,
    spreads: BTreeMap<Key, Spread>,
}

impl Summary {
    /// Reduces reports; `contenders` fixes the row order.
    pub fn build(contenders: &[String], reports: &[Report]) -> Summary {
        let mut values: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
        for report in reports {
            let (Some(contender), Some(scenario)) = (&report.contender, scenario_of(report)) else {
                continue;
            };
            for (figure, &value) in &report.figures {
                values
                    .entry((contender.clone(), scenario, figure.clone()))
                    .or_default()
                    .push(value);
            }
        }
        let spreads = values.into_iter().filter_map(|(k, v)| Some((k, Spread::of(&v)?))).collect();
        Summary { contenders: contenders.to_vec(), spreads }
    }

    /// Median of a figure, if measured.
    pub fn median(&self, contender: &str, scenario: Scenario, figure: &str) -> Option<f64> {
        self.spread(contender, scenario, figure).map(|s| s.median)
    }

    fn spread(&self, contender: &str, scenario: Scenario, figure: &str) -> Option<Spread> {
        self.spreads.get(&(contender.to_string(), scenario, figure.to_string())).copied()
    }

    /// Ratio of two contenders' medians for a figure.
    pub fn ratio(
        &self,
        contender: &str,
        baseline: &str,
        scenario: Scenario,
        figure: &str,
    ) -> Option<f64> {
        ratio(self.median(contender, scenario, figure)?, self.median(baseline, scenario, figure)?)
    }

    /// Medians (with min-max over rounds when there are several) of the headline figures.
    pub fn absolute_table(&self) -> Table {
        let mut table =
            Table::new(std::iter::once("contender").chain(HEADLINES.iter().map(|h| h.label)));
        for contender in &self.contenders {
            let cells =
                HEADLINES.iter().map(|h| match self.spread(contender, h.scenario, h.figure) {
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
            Table::new(std::iter::once("contender").chain(HEADLINES.iter().map(|h| h.label)));
        for contender in &self.contenders {
            let cells = HEADLINES.iter().map(|h| {
                self.ratio(contender, baseline, h.scenario, h.figure)
                    .map_or("n/a".into(), format_ratio)
            });
            table.row(std::iter::once(contender.clone()).chain(cells));
        }
        table
    }

    /// Judges every goal for every sluice contender against HAProxy.
    pub fn verdicts(&self, sluice: &[String], throughput_streams: usize) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        for contender in sluice {
            for goal in &GOALS {
                let outcome = self.judge(contender, goal, throughput_streams);
                verdicts.push(Verdict {
                    goal: goal.label,
                    contender: contender.clone(),
                    bound: goal.bound,
                    outcome,
                });
            }
        }
        verdicts
    }

    fn judge(&self, contender: &str, goal: &Goal, throughput_streams: usize) -> Outcome {
        let haproxy = ContenderKind::Haproxy.name();
        if goal.scenario == Scenario::Throughput && throughput_streams != 1 {
            return not_measured("needs --streams 1");
        }
        let Some(mine) = self.median(contender, goal.scenario, goal.figure) else {
            return not_measured(&format!("no {} figure for {contender}", goal.scenario.name()));
        };
        let Some(theirs) = self.median(haproxy, goal.scenario, goal.figure) else {
            return not_measured(&format!("no {} figure for haproxy", goal.scenario.name()));
        };
        match ratio(mine, theirs) {
            None => {
                not_measured(&format!("haproxy figure {} is not positive", format_figure(theirs)))
            }
            Some(r) if goal.bound.holds(r) => Outcome::Met { ratio: r },
            Some(r) => Outcome::NotMet { ratio: r },
        }
    }

    /// Medians as nested maps contender -> scenario -> figure -> value, for JSON.
    pub fn medians(&self) -> BTreeMap<String, BTreeMap<&'static str, BTreeMap<String, f64>>> {
        let mut out: BTreeMap<String, BTreeMap<&'static str, BTreeMap<String, f64>>> =
            BTreeMap::new();
        for ((contender, scenario, figure), spread) in &self.spreads {
            out.entry(contender.clone())
                .or_default()
                .entry(scenario.name())
                .or_default()
                .insert(figure.clone(), spread.median);
        }
        out
    }

    /// Headline ratios to `baseline` as contender -> "scenario.figure" -> ratio, for JSON.
    pub fn ratios(&self, baseline: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
        let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for contender in &self.contenders {
            for h in &HEADLINES {
                if let Some(r) = self.ratio(contender, baseline, h.scenario, h.figure) {
                    out.entry(contender.clone())
                        .or_default()
                        .insert(format!("{}.{}", h.scenario.name(), h.figure), r);
                }
            }
        }
        out
    }
}

fn not_measured(reason: &str) -> Outcome {
    Outcome::NotMeasured { reason: reason.into() }
}

fn scenario_of(report: &Report) -> Option<Scenario> {
    Scenario::ALL.into_iter().find(|s| s.name() == report.scenario)
}

/// The verdicts as a table: one row per goal, one column per sluice contender.
pub fn verdict_table(verdicts: &[Verdict], sluice: &[String]) -> Table {
    let mut table = Table::new(
        std::iter::once("target (sluice / haproxy)".to_string()).chain(sluice.iter().cloned()),
    );
    for goal in &GOALS {
        let label = format!("{} {}", goal.label, goal.bound.describe());
        let cells = sluice.iter().map(|contender| {
            verdicts
                .iter()
                .find(|v| v.goal == goal.label && &v.contender == contender)
                .map_or("NOT MEASURED".into(), Verdict::text)
        });
        table.row(std::iter::once(label).chain(cells));
    }
    table
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
        let summary = Summary::build(&names(&["haproxy", "sluice-epoll"]), &reports);
        assert_eq!(summary.median("haproxy", Scenario::Rr, "requests_per_s"), Some(200.0));
        assert_eq!(
            summary.ratio("sluice-epoll", "haproxy", Scenario::Rr, "requests_per_s"),
            Some(1.3)
        );
        assert_eq!(
            summary.ratio("sluice-epoll", "haproxy", Scenario::Rr, "latency_us_p99"),
            Some(0.75)
        );
        assert_eq!(summary.median("haproxy", Scenario::Connect, "connections_per_s"), None);
    }

    #[test]
    fn verdicts_compare_against_the_bound() {
        let reports = vec![
            report("haproxy", "rr", &[("requests_per_s", 100.0), ("latency_us_p99", 100.0)]),
            report("sluice-uring", "rr", &[("requests_per_s", 119.0), ("latency_us_p99", 90.0)]),
            report("haproxy", "idle", &[("kib_per_connection", 0.0)]),
            report("sluice-uring", "idle", &[("kib_per_connection", 1.0)]),
            report("haproxy", "throughput", &[("gbit_s_total", 10.0)]),
            report("sluice-uring", "throughput", &[("gbit_s_total", 13.0)]),
        ];
        let sluice = names(&["sluice-uring"]);
        let summary = Summary::build(&names(&["haproxy", "sluice-uring"]), &reports);
        let verdicts = summary.verdicts(&sluice, 1);
        let by_goal =
            |goal: &str| verdicts.iter().find(|v| v.goal == goal).unwrap().outcome.clone();
        assert_eq!(by_goal("throughput, one stream"), Outcome::Met { ratio: 1.3 });
        assert!(matches!(by_goal("rr requests/s"), Outcome::NotMet { .. }));
        assert_eq!(by_goal("rr p99 latency"), Outcome::NotMet { ratio: 0.9 });
        assert!(matches!(by_goal("connect connections/s"), Outcome::NotMeasured { .. }));
        assert!(matches!(by_goal("idle KiB per connection"), Outcome::NotMeasured { .. }));
        let four_streams = summary.verdicts(&sluice, 4);
        assert!(matches!(four_streams[0].outcome, Outcome::NotMeasured { .. }));
        let table = verdict_table(&verdicts, &sluice).render();
        assert!(table.contains("MET (1.30x, needs >= 1.3)"), "{table}");
        assert!(table.contains("NOT MET (1.19x, needs >= 1.2)"), "{table}");
    }

    #[test]
    fn p99_at_exactly_the_bound_is_met() {
        let reports = vec![
            report("haproxy", "rr", &[("latency_us_p99", 100.0)]),
            report("sluice-uring", "rr", &[("latency_us_p99", 80.0)]),
        ];
        let summary = Summary::build(&names(&["haproxy", "sluice-uring"]), &reports);
        let verdicts = summary.verdicts(&names(&["sluice-uring"]), 1);
        let p99 = verdicts.iter().find(|v| v.goal == "rr p99 latency").unwrap();
        assert_eq!(p99.outcome, Outcome::Met { ratio: 0.8 });
    }

    #[test]
    fn tables_show_spread_and_missing_figures() {
        let reports = vec![
            report("direct", "rr", &[("requests_per_s", 100.0)]),
            report("direct", "rr", &[("requests_per_s", 300.0)]),
            report("nginx", "rr", &[("requests_per_s", 50.0)]),
        ];
        let summary = Summary::build(&names(&["direct", "nginx"]), &reports);
        let absolute = summary.absolute_table().render();
        assert!(absolute.contains("200 (100–300)"), "{absolute}");
        assert!(absolute.contains("–"));
        let ratios = summary.ratio_table("direct").render();
        assert!(ratios.contains("0.25x"), "{ratios}");
        assert!(ratios.contains("n/a"));
    }
}
