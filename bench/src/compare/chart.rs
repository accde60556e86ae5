//! SVG charts of a comparison: bars for rates and footprints, and latency CDFs drawn from
//! the histograms merged over all rounds.
//!
//! Each contender keeps one colour across every chart. Charts only read figures; a chart
//! with nothing to show is not written.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{BenchError, Result};
use crate::stats::format_figure;

const SIZE: (u32, u32) = (820, 480);
const FONT: &str = "sans-serif";

/// Colours by contender, in `ContenderKind::ALL` order; others cycle through the rest.
const PALETTE: [RGBColor; 11] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(227, 119, 194),
    RGBColor(31, 60, 120),
];
const KNOWN: [&str; 8] = [
    "direct",
    "sluice-uring",
    "sluice-uring-splice",
    "sluice-epoll",
    "haproxy",
    "nginx",
    "sluice-uring-nopin",
    "haproxy-splice",
];

/// The colour of a contender.
pub fn colour(name: &str) -> RGBColor {
    let index = KNOWN.iter().position(|k| *k == name).unwrap_or_else(|| {
        KNOWN.len() + name.bytes().map(usize::from).sum::<usize>() % (PALETTE.len() - KNOWN.len())
    });
    PALETTE[index]
}

fn failed(path: &Path) -> impl Fn(String) -> BenchError + '_ {
    move |detail| BenchError::Chart { path: path.to_path_buf(), detail }
}

/// One bar per contender; the value is printed above each bar.
pub fn bars(path: &Path, title: &str, unit: &str, items: &[(String, f64)]) -> Result<()> {
    draw_bars(path, title, unit, items).map_err(failed(path))
}

fn draw_bars(
    path: &Path,
    title: &str,
    unit: &str,
    items: &[(String, f64)],
) -> std::result::Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let top = items.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9) * 1.15;
    // Integer ranges are inclusive in plotters: 0..=last gives one segment per bar.
    let last = items.len().saturating_sub(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)
        .map_err(|e| err(&e))?;
    let label = |x: &SegmentValue<usize>| match x {
        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
            items.get(*i).map(|(name, _)| name.clone()).unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .x_labels(items.len() + 1)
        .x_label_formatter(&label)
        .y_desc(unit)
        .draw()
        .map_err(|e| err(&e))?;
    let end = |i: usize| if i < last { SegmentValue::Exact(i + 1) } else { SegmentValue::Last };
    chart
        .draw_series(items.iter().enumerate().map(|(i, (name, value))| {
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (end(i), *value)],
                colour(name).filled(),
            );
            bar.set_margin(0, 0, 14, 14);
            bar
        }))
        .map_err(|e| err(&e))?;
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, value))| {
            Text::new(format_figure(*value), (SegmentValue::CenterOf(i), *value), style.clone())
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Latency CDF of each contender: x is latency in µs on a log scale, y the fraction of
/// requests at or below it. `series` holds `[latency_us, fraction]` points.
pub fn cdf(path: &Path, title: &str, series: &[(String, Vec<[f64; 2]>)]) -> Result<()> {
    draw_cdf(path, title, series).map_err(failed(path))
}

fn draw_cdf(
    path: &Path,
    title: &str,
    series: &[(String, Vec<[f64; 2]>)],
) -> std::result::Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let latencies = series.iter().flat_map(|(_, points)| points.iter().map(|p| p[0]));
    let (low, high) = latencies.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = ((low * 0.8).max(0.1), (high * 1.25).max(1.0));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((low..high).log_scale(), 0.0..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of requests")
        .x_label_formatter(&|v| format_figure(*v))
        .draw()
        .map_err(|e| err(&e))?;
    for (name, points) in series {
        let colour = colour(name);
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p[0], p[1])),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-bench-chart-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn known_contenders_keep_distinct_colours() {
        let colours: Vec<RGBColor> = KNOWN.iter().map(|n| colour(n)).collect();
        for (i, a) in colours.iter().enumerate() {
            for b in &colours[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(colour("someone-else"), colour("someone-else"));
    }

    #[test]
    fn charts_are_written_as_svg_with_labels() {
        let dir = temp_dir("svg");
        let bars_path = dir.join("bars.svg");
        let items = vec![("direct".to_string(), 40.0), ("haproxy".to_string(), 12.5)];
        bars(&bars_path, "throughput", "Gbit/s", &items).unwrap();
        let svg = std::fs::read_to_string(&bars_path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("haproxy") && svg.contains("12.50"));

        let cdf_path = dir.join("cdf.svg");
        let series = vec![("nginx".to_string(), vec![[10.0, 0.0], [20.0, 0.5], [90.0, 1.0]])];
        cdf(&cdf_path, "rr latency", &series).unwrap();
        let svg = std::fs::read_to_string(&cdf_path).unwrap();
        assert!(svg.contains("nginx") && svg.contains("polyline"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
