//! The result of one measurement and the ways it is written out.
//!
//! A [`Report`] carries the scenario, the target it ran against, the parameters as given,
//! and flat named figures whose names carry their unit (`gbit_s_total`, `requests_per_s`,
//! `latency_us_p99`, `kib_per_connection`), so two reports compare figure by figure.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cpu::OtherProcess;
use crate::error::{file_context, Result};
use crate::stats::{cdf_points, format_figure};
use crate::table::Table;

/// One measurement, ready to print or compare.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `throughput`, `rr`, `connect` or `idle`.
    pub scenario: String,
    /// Where clients connected: `direct (ADDR)` or the proxy address.
    pub target: String,
    /// Name of the contender in a comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contender: Option<String>,
    /// Round number in a comparison, from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// The scenario's parameters as used.
    pub parameters: serde_json::Value,
    /// Named figures; the name says the unit.
    pub figures: BTreeMap<String, f64>,
    /// Per-stream rates of a throughput run (upload streams first when both ways).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_stream_gbit_s: Vec<f64>,
    /// `[latency_us, cumulative_fraction]` points of a latency run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_cdf_us: Vec<[f64; 2]>,
    /// The busiest processes other than the proxy and the load generator during the
    /// measured window (see [`crate::cpu`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_processes: Vec<OtherProcess>,
    /// The full latency histogram, kept in memory for merging and charts.
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

impl Report {
    /// A report without figures yet.
    pub fn new(scenario: &str, target: String, parameters: &impl Serialize) -> Result<Self> {
        Ok(Self {
            scenario: scenario.into(),
            target,
            contender: None,
            round: None,
            parameters: serde_json::to_value(parameters)?,
            figures: BTreeMap::new(),
            per_stream_gbit_s: Vec::new(),
            latency_cdf_us: Vec::new(),
            other_processes: Vec::new(),
            histogram: None,
        })
    }

    /// Sets one figure.
    pub fn figure(&mut self, name: impl Into<String>, value: f64) -> &mut Self {
        self.figures.insert(name.into(), value);
        self
    }

    /// Stores a latency histogram and its CDF points.
    pub fn attach_histogram(&mut self, histogram: Histogram<u64>) {
        self.latency_cdf_us = cdf_points(&histogram);
        self.histogram = Some(histogram);
    }

    /// A figure by name.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.get(name).copied()
    }

    /// The report as one line of JSON.
    pub fn to_json_line(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Human-readable result: what ran, then one row per figure.
    pub fn render_text(&self) -> String {
        let mut about = Table::new(["scenario", &self.scenario]);
        about.row(["target", &self.target]);
        if let serde_json::Value::Object(parameters) = &self.parameters {
            for (name, value) in parameters {
                about.row([name.clone(), plain(value)]);
            }
        }
        let mut figures = Table::new(["figure", "value"]);
        for (name, value) in &self.figures {
            figures.row([name.clone(), format_figure(*value)]);
        }
        if !self.per_stream_gbit_s.is_empty() {
            let rates: Vec<String> =
                self.per_stream_gbit_s.iter().map(|v| format!("{v:.2}")).collect();
            figures.row(["per_stream_gbit_s".to_string(), rates.join(" ")]);
        }
        format!("{}\n{}", about.render(), figures.render())
    }
}

fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Appends each report as one JSON line to `path`, creating it if needed.
pub fn append_json_lines(path: &Path, reports: &[Report]) -> Result<()> {
    let mut file =
        OpenOptions::new().create(true).append(true).open(path).map_err(file_context(path))?;
    for report in reports {
        writeln!(file, "{}", report.to_json_line()?).map_err(file_context(path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Params {
        size: usize,
    }

    #[test]
    fn json_line_is_flat_and_machine_comparable() {
        let mut report =
            Report::new("rr", "direct (127.0.0.1:1)".into(), &Params { size: 64 }).unwrap();
        report.figure("requests_per_s", 1234.5);
        let line = report.to_json_line().unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["scenario"], "rr");
        assert_eq!(value["parameters"]["size"], 64);
        assert_eq!(value["figures"]["requests_per_s"], 1234.5);
        assert!(value.get("contender").is_none());
        assert!(value.get("latency_cdf_us").is_none());
        assert!(!line.contains('\n'));
    }

    #[test]
    fn text_lists_every_figure() {
        let mut report = Report::new("idle", "127.0.0.1:2".into(), &Params { size: 1 }).unwrap();
        report.figure("kib_per_connection", 1.5).figure("fds_per_connection", 2.0);
        let text = report.render_text();
        assert!(text.contains("| kib_per_connection |"));
        assert!(text.contains("| fds_per_connection |"));
        assert!(text.contains("| size "));
    }

    #[test]
    fn json_lines_append() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        let report = Report::new("rr", "t".into(), &Params { size: 1 }).unwrap();
        append_json_lines(&path, std::slice::from_ref(&report)).unwrap();
        append_json_lines(&path, &[report]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
