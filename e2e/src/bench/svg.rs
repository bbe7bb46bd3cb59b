//! The latency-distribution chart of `cargo xtask bench l4`, written as SVG
//! by hand: percentile on a "nines" axis (0, 90, 99, 99.9, 99.99, max) so
//! the tail gets as much room as the body, latency on a log scale.

use std::fmt::Write;

use crate::apps::Quantile;

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Where "max" (the 100th percentile) sits on the nines axis.
const MAX_NINES: f64 = 4.5;
const COLOURS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// A percentile's position on the nines axis: -log10(1 - p/100).
fn nines(percentile: f64) -> f64 {
    if percentile >= 100.0 {
        return MAX_NINES;
    }
    (-(1.0 - percentile / 100.0).log10()).clamp(0.0, MAX_NINES)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A chart of each named distribution (microseconds) as a line.
pub fn latency_chart(title: &str, series: &[(&str, &[Quantile])]) -> String {
    let values = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|q| q.us / 1000.0))
        .filter(|ms| *ms > 0.0 && ms.is_finite());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi { (0.01, 1.0) } else { (lo, hi) };
    // Whole decades around the data.
    let decade_lo = lo.log10().floor();
    let decade_hi = hi.log10().ceil().max(decade_lo + 1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |p: f64| LEFT + nines(p) / MAX_NINES * plot_w;
    let y = |ms: f64| {
        let v = ms.max(10f64.powf(decade_lo)).log10();
        TOP + plot_h - (v - decade_lo) / (decade_hi - decade_lo) * plot_h
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Latency grid: one line per decade, labelled.
    let mut decade = decade_lo;
    while decade <= decade_hi + 1e-9 {
        let ms = 10f64.powf(decade);
        let yy = y(ms);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w
        );
        let label = if ms >= 1.0 {
            format!("{ms:.0} ms")
        } else {
            format!("{ms} ms")
        };
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
            LEFT - 6.0,
            yy + 4.0
        );
        decade += 1.0;
    }
    // Percentile ticks.
    for (p, label) in [
        (0.0, "p0"),
        (50.0, "p50"),
        (90.0, "p90"),
        (99.0, "p99"),
        (99.9, "p99.9"),
        (99.99, "p99.99"),
        (100.0, "max"),
    ] {
        let xx = x(p);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            svg,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + plot_h + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency (log scale)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|q| format!("{:.1},{:.1}", x(q.percentile), y(q.us / 1000.0)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for q in points.iter() {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{} p{}: {:.3} ms</title></circle>"#,
                x(q.percentile),
                y(q.us / 1000.0),
                escape(name),
                q.percentile,
                q.us / 1000.0
            );
        }
        let ly = TOP + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/>"#,
            LEFT + 14.0,
            LEFT + 40.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 46.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nines_axis_spreads_the_tail() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
    }

    #[test]
    fn a_chart_has_a_line_per_series_and_escaped_text() {
        let q = |percentile, us| Quantile { percentile, us };
        let direct = [q(0.0, 50.0), q(50.0, 80.0), q(99.0, 150.0), q(100.0, 900.0)];
        let mesh = [
            q(0.0, 90.0),
            q(50.0, 130.0),
            q(99.0, 300.0),
            q(100.0, 2500.0),
        ];
        let svg = latency_chart("a < b & c", &[("direct", &direct), ("mesh", &mesh)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 8);
        assert!(svg.contains("a &lt; b &amp; c"));
        // Decades from 0.01 ms to 10 ms frame 0.05 .. 2.5 ms.
        assert!(
            svg.contains(">0.01 ms<") && svg.contains(">10 ms<"),
            "{svg}"
        );
    }
}
