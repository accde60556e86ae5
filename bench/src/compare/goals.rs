//! The performance targets sluice must reach, and a plain verdict on each: MET, NOT MET or
//! NOT MEASURED (with the reason), never a guess.
//!
//! Most targets are ratios of a sluice contender's median to a peer's (HAProxy with
//! `option splice-auto`, or HAProxy with forced splice); a few are absolute bounds on a
//! figure of sluice alone. A throughput target holds for one stream count only, and is not
//! measured by a run with another `--streams`.

use serde::Serialize;

use crate::compare::contender::ContenderKind;
use crate::compare::summary::Summary;
use crate::scenario::Scenario;
use crate::stats::{format_figure, format_ratio, ratio};
use crate::table::Table;

/// How a measured value must compare with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Bound {
    fn holds(self, value: f64) -> bool {
        match self {
            Bound::AtLeast(limit) => value >= limit,
            Bound::AtMost(limit) => value <= limit,
            Bound::Below(limit) => value < limit,
        }
    }

    fn describe(self, unit: &str) -> String {
        let (sign, limit) = match self {
            Bound::AtLeast(limit) => (">=", limit),
            Bound::AtMost(limit) => ("<=", limit),
            Bound::Below(limit) => ("<", limit),
        };
        format!("{sign} {limit}{unit}")
    }
}

/// What a goal's figure is held against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Against {
    /// The ratio of sluice's median to this peer's.
    Peer(ContenderKind),
    /// sluice's median itself, in this unit.
    Absolute(&'static str),
}

/// A target for sluice.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub label: &'static str,
    pub scenario: Scenario,
    pub figure: &'static str,
    pub bound: Bound,
    pub against: Against,
    /// Throughput goals hold for this many streams only.
    pub streams: Option<usize>,
}

impl Goal {
    const fn peer(
        label: &'static str,
        scenario: Scenario,
        figure: &'static str,
        bound: Bound,
        peer: ContenderKind,
    ) -> Goal {
        Goal { label, scenario, figure, bound, against: Against::Peer(peer), streams: None }
    }

    const fn streams(mut self, streams: usize) -> Goal {
        self.streams = Some(streams);
        self
    }

    /// The goal and its bound in words, e.g. `rr requests/s >= 1.3x haproxy`.
    pub fn describe(&self) -> String {
        match self.against {
            Against::Peer(peer) => {
                format!("{} {} {}", self.label, self.bound.describe("x"), peer.name())
            }
            Against::Absolute(unit) => {
                format!("{} {}", self.label, self.bound.describe(&format!(" {unit}")))
            }
        }
    }
}

const HAPROXY: ContenderKind = ContenderKind::Haproxy;
const HAPROXY_SPLICE: ContenderKind = ContenderKind::HaproxySplice;

/// The targets: ratios to HAProxy (splice-auto unless named) and absolute bounds.
pub const GOALS: [Goal; 11] = [
    Goal::peer(
        "throughput, one stream",
        Scenario::Throughput,
        "gbit_s_total",
        Bound::AtLeast(2.0),
        HAPROXY,
    )
    .streams(1),
    Goal::peer(
        "throughput, one stream",
        Scenario::Throughput,
        "gbit_s_total",
        Bound::AtLeast(1.3),
        HAPROXY_SPLICE,
    )
    .streams(1),
    Goal::peer(
        "throughput, four streams",
        Scenario::Throughput,
        "gbit_s_total",
        Bound::AtLeast(1.5),
        HAPROXY,
    )
    .streams(4),
    Goal::peer("rr requests/s", Scenario::Rr, "requests_per_s", Bound::AtLeast(1.3), HAPROXY),
    Goal::peer("rr p99 latency", Scenario::Rr, "latency_us_p99", Bound::AtMost(0.5), HAPROXY),
    Goal::peer(
        "connect connections/s",
        Scenario::Connect,
        "connections_per_s",
        Bound::AtLeast(1.2),
        HAPROXY,
    ),
    Goal::peer(
        "throughput CPU s per GB",
        Scenario::Throughput,
        "cpu_s_per_gb",
        Bound::Below(1.0),
        HAPROXY,
    ),
    Goal::peer(
        "connect CPU s per 10k connections",
        Scenario::Connect,
        "cpu_s_per_10k_connections",
        Bound::Below(1.0),
        HAPROXY,
    ),
    Goal::peer(
        "rr CPU s per 100k requests",
        Scenario::Rr,
        "cpu_s_per_100k_requests",
        Bound::Below(1.0),
        HAPROXY,
    ),
    Goal {
        label: "idle memory per connection",
        scenario: Scenario::Idle,
        figure: "kib_per_connection",
        bound: Bound::AtMost(1.0),
        against: Against::Absolute("KiB"),
        streams: None,
    },
    Goal {
        label: "idle descriptors per connection",
        scenario: Scenario::Idle,
        figure: "fds_per_connection",
        bound: Bound::AtMost(2.0),
        against: Against::Absolute("fds"),
        streams: None,
    },
];

/// What was measured for a goal: a ratio to a peer, or sluice's own figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measured {
    Ratio(f64),
    Value(f64),
}

impl Measured {
    fn number(self) -> f64 {
        match self {
            Measured::Ratio(v) | Measured::Value(v) => v,
        }
    }

    fn text(self, against: Against) -> String {
        match (self, against) {
            (Measured::Ratio(r), _) => format_ratio(r),
            (Measured::Value(v), Against::Absolute(unit)) => format!("{} {unit}", format_figure(v)),
            (Measured::Value(v), Against::Peer(_)) => format_figure(v),
        }
    }
}

/// Whether a goal was met.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Met {
        #[serde(flatten)]
        measured: Measured,
    },
    NotMet {
        #[serde(flatten)]
        measured: Measured,
    },
    NotMeasured {
        reason: String,
    },
}

/// One goal judged for one sluice contender.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub goal: String,
    pub contender: String,
    pub bound: Bound,
    pub against: Against,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Verdict {
    /// The verdict in words, e.g. `MET (1.42x, needs >= 1.3x)`.
    pub fn text(&self) -> String {
        let unit = match self.against {
            Against::Peer(_) => "x".to_string(),
            Against::Absolute(unit) => format!(" {unit}"),
        };
        let needs = self.bound.describe(&unit);
        match &self.outcome {
            Outcome::Met { measured } => {
                format!("MET ({}, needs {needs})", measured.text(self.against))
            }
            Outcome::NotMet { measured } => {
                format!("NOT MET ({}, needs {needs})", measured.text(self.against))
            }
            Outcome::NotMeasured { reason } => format!("NOT MEASURED ({reason})"),
        }
    }
}

/// Judges every goal for every sluice contender.
pub fn verdicts(summary: &Summary, sluice: &[String], throughput_streams: usize) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    for contender in sluice {
        for goal in &GOALS {
            verdicts.push(Verdict {
                goal: goal.describe(),
                contender: contender.clone(),
                bound: goal.bound,
                against: goal.against,
                outcome: judge(summary, contender, goal, throughput_streams),
            });
        }
    }
    verdicts
}

fn judge(summary: &Summary, contender: &str, goal: &Goal, throughput_streams: usize) -> Outcome {
    if let Some(streams) = goal.streams.filter(|&s| s != throughput_streams) {
        return not_measured(&format!("needs --streams {streams}"));
    }
    let scenario = goal.scenario.name();
    let Some(mine) = summary.median(contender, goal.scenario.name(), goal.figure) else {
        return not_measured(&format!("no {scenario} {} for {contender}", goal.figure));
    };
    let measured = match goal.against {
        Against::Absolute(_) => Measured::Value(mine),
        Against::Peer(peer) => {
            let Some(theirs) = summary.median(peer.name(), goal.scenario.name(), goal.figure)
            else {
                return not_measured(&format!("no {scenario} {} for {}", goal.figure, peer.name()));
            };
            match ratio(mine, theirs) {
                Some(r) => Measured::Ratio(r),
                None => {
                    return not_measured(&format!(
                        "{} figure {} is not positive",
                        peer.name(),
                        format_figure(theirs)
                    ))
                }
            }
        }
    };
    if goal.bound.holds(measured.number()) {
        Outcome::Met { measured }
    } else {
        Outcome::NotMet { measured }
    }
}

fn not_measured(reason: &str) -> Outcome {
    Outcome::NotMeasured { reason: reason.into() }
}

/// The verdicts as a table: one row per goal, one column per sluice contender.
pub fn verdict_table(verdicts: &[Verdict], sluice: &[String]) -> Table {
    let mut table = Table::new(std::iter::once("target".to_string()).chain(sluice.iter().cloned()));
    for goal in &GOALS {
        let label = goal.describe();
        let cells = sluice.iter().map(|contender| {
            verdicts
                .iter()
                .find(|v| v.goal == label && &v.contender == contender)
                .map_or("NOT MEASURED".into(), Verdict::text)
        });
        table.row(std::iter::once(label.clone()).chain(cells));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::summary::HEADLINES;
    use crate::report::Report;

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

    fn outcome(verdicts: &[Verdict], goal: &str) -> Outcome {
        verdicts
            .iter()
            .find(|v| v.goal == goal)
            .unwrap_or_else(|| panic!("no goal {goal}"))
            .outcome
            .clone()
    }

    fn sample() -> Summary {
        let reports = vec![
            report("haproxy", "rr", &[("requests_per_s", 100.0), ("latency_us_p99", 100.0)]),
            report("sluice-uring", "rr", &[("requests_per_s", 129.0), ("latency_us_p99", 50.0)]),
            report(
                "sluice-uring",
                "idle",
                &[("kib_per_connection", 1.2), ("fds_per_connection", 2.0)],
            ),
            report("haproxy", "throughput", &[("gbit_s_total", 10.0), ("cpu_s_per_gb", 0.2)]),
            report("haproxy-splice", "throughput", &[("gbit_s_total", 15.0)]),
            report("sluice-uring", "throughput", &[("gbit_s_total", 20.0), ("cpu_s_per_gb", 0.2)]),
        ];
        Summary::build(&names(&["haproxy", "haproxy-splice", "sluice-uring"]), &reports, &HEADLINES)
    }

    #[test]
    fn ratios_and_absolute_bounds_are_judged() {
        let verdicts = verdicts(&sample(), &names(&["sluice-uring"]), 1);
        let ratio = |r| Outcome::Met { measured: Measured::Ratio(r) };
        assert_eq!(outcome(&verdicts, "throughput, one stream >= 2x haproxy"), ratio(2.0));
        let splice = outcome(&verdicts, "throughput, one stream >= 1.3x haproxy-splice");
        assert!(
            matches!(splice, Outcome::Met { measured: Measured::Ratio(r) } if (r - 4.0 / 3.0).abs() < 1e-9)
        );
        assert!(matches!(
            outcome(&verdicts, "rr requests/s >= 1.3x haproxy"),
            Outcome::NotMet { measured: Measured::Ratio(_) }
        ));
        assert_eq!(
            outcome(&verdicts, "rr p99 latency <= 0.5x haproxy"),
            ratio(0.5),
            "the bound itself is met"
        );
        assert_eq!(
            outcome(&verdicts, "throughput CPU s per GB < 1x haproxy"),
            Outcome::NotMet { measured: Measured::Ratio(1.0) },
            "equal CPU is not below"
        );
        assert_eq!(
            outcome(&verdicts, "idle memory per connection <= 1 KiB"),
            Outcome::NotMet { measured: Measured::Value(1.2) }
        );
        assert_eq!(
            outcome(&verdicts, "idle descriptors per connection <= 2 fds"),
            Outcome::Met { measured: Measured::Value(2.0) }
        );
        assert!(matches!(
            outcome(&verdicts, "connect connections/s >= 1.2x haproxy"),
            Outcome::NotMeasured { .. }
        ));
        let four = outcome(&verdicts, "throughput, four streams >= 1.5x haproxy");
        assert_eq!(four, not_measured("needs --streams 4"));
    }

    #[test]
    fn a_run_with_four_streams_judges_only_the_four_stream_target() {
        let verdicts = verdicts(&sample(), &names(&["sluice-uring"]), 4);
        assert_eq!(
            outcome(&verdicts, "throughput, four streams >= 1.5x haproxy"),
            Outcome::Met { measured: Measured::Ratio(2.0) }
        );
        assert_eq!(
            outcome(&verdicts, "throughput, one stream >= 2x haproxy"),
            not_measured("needs --streams 1")
        );
    }

    #[test]
    fn table_and_json_say_what_was_measured() {
        let sluice = names(&["sluice-uring"]);
        let verdicts = verdicts(&sample(), &sluice, 1);
        let table = verdict_table(&verdicts, &sluice).render();
        assert!(table.contains("MET (2.00x, needs >= 2x)"), "{table}");
        assert!(table.contains("NOT MET (1.29x, needs >= 1.3x)"), "{table}");
        assert!(table.contains("NOT MET (1.200 KiB, needs <= 1 KiB)"), "{table}");
        assert!(
            table.contains("NOT MEASURED (no connect connections_per_s for sluice-uring)"),
            "{table}"
        );
        let json = serde_json::to_value(&verdicts[0]).unwrap();
        assert_eq!(json["status"], "met");
        assert_eq!(json["ratio"], 2.0);
        assert_eq!(json["against"]["peer"], "haproxy");
        let idle = verdicts.iter().find(|v| v.goal.starts_with("idle memory")).unwrap();
        let json = serde_json::to_value(idle).unwrap();
        assert_eq!((json["status"].as_str(), json["value"].as_f64()), (Some("not_met"), Some(1.2)));
    }
}
