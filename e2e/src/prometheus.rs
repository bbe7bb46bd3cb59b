//! Reads the Prometheus text exposition (and OpenMetrics) the components
//! serve on `/metrics`, so the demo, the scenarios and the benchmark can take
//! their evidence from the same numbers an operator would look at.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("metrics line {line}: {problem}: {text:?}")]
    Line {
        line: usize,
        problem: &'static str,
        text: String,
    },
}

/// One sample: a series (name and labels) and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    /// Whether every `(label, value)` of `filter` is on this sample.
    pub fn matches(&self, filter: &[(&str, &str)]) -> bool {
        filter.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// Every sample of a scrape. Comments (`# HELP`, `# TYPE`, `# EOF`) and
/// blank lines are skipped; timestamps after the value are ignored.
pub fn parse(text: &str) -> Result<Vec<Sample>, PrometheusError> {
    let mut samples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |problem| PrometheusError::Line {
            line: i + 1,
            problem,
            text: raw.to_string(),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() {
            return Err(bad("no metric name"));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end + 1..]).ok_or_else(|| bad("malformed labels"))?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| bad("no value"))?;
        let value = parse_value(value).ok_or_else(|| bad("value is not a number"))?;
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// The sum of the values of `name`'s series that carry all of `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.matches(filter))
        .map(|s| s.value)
        // From +0.0: an empty sum of f64 is -0.0, which prints as "-0".
        .fold(0.0, |total, v| total + v)
}

/// Parses `a="x",b="y"}` (after the opening brace); returns the labels and
/// what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = s[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_with_labels_and_escapes() {
        let text = "# HELP istio_tcp_connections_opened The total.\n\
                    # TYPE istio_tcp_connections_opened counter\n\
                    istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/demo/sa/client\",odd=\"a\\\"b\\\\c\\nd\"} 3\n\
                    process_resident_memory_bytes 1.5e7\n\
                    up{} 1 1700000000\n\
                    # EOF\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 3);
        let s = &samples[0];
        assert_eq!(s.name, "istio_tcp_connections_opened_total");
        assert_eq!(s.label("reporter"), Some("destination"));
        assert_eq!(s.label("odd"), Some("a\"b\\c\nd"));
        assert_eq!(s.value, 3.0);
        assert_eq!(samples[1].value, 1.5e7);
        assert!(samples[2].labels.is_empty());
        assert_eq!(
            sum(
                &samples,
                "istio_tcp_connections_opened_total",
                &[("reporter", "destination")]
            ),
            3.0
        );
        assert_eq!(
            sum(
                &samples,
                "istio_tcp_connections_opened_total",
                &[("reporter", "source")]
            ),
            0.0
        );
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let err = parse("ok 1\nbroken{a=\"x\" 2\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("malformed labels"),
            "{err}"
        );
        let err = parse("x abc\n").unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
    }
}
