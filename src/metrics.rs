//! `/metrics` in the Prometheus text format (version 0.0.4): counters the pipeline keeps in
//! atomics, and per-partition figures read from the supervisors' views at scrape time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram of batch sizes with power-of-two buckets (1, 2, 4, … 8192, +Inf).
#[derive(Debug)]
pub struct SizeHistogram {
    buckets: [AtomicU64; SIZE_BUCKETS.len()],
    sum: AtomicU64,
    count: AtomicU64,
}

/// Upper bounds of [`SizeHistogram`]'s buckets.
pub const SIZE_BUCKETS: [u64; 14] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
];

impl Default for SizeHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl SizeHistogram {
    /// Counts one batch of `size`.
    pub fn observe(&self, size: u64) {
        if let Some(i) = SIZE_BUCKETS.iter().position(|b| size <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(size, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative bucket counts (per upper bound), the sum and the count.
    pub fn read(&self) -> HistogramFigures {
        let mut cumulative = 0;
        let buckets = SIZE_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        HistogramFigures {
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's figures at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistogramFigures {
    /// (upper bound, batches of at most that size).
    pub buckets: Vec<(u64, u64)>,
    pub sum: u64,
    pub count: u64,
}

/// A metric family's type.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Writes the Prometheus text format.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
        self
    }

    /// The samples of a histogram family named `name` (`_bucket`, `_sum`, `_count`).
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        figures: &HistogramFigures,
    ) -> &mut Self {
        let bucket = format!("{name}_bucket");
        for (bound, n) in &figures.buckets {
            let le = bound.to_string();
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, *n as f64);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, figures.count as f64);
        self.sample(&format!("{name}_sum"), labels, figures.sum as f64);
        self.sample(&format!("{name}_count"), labels, figures.count as f64)
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_help_type_escaped_labels_and_cumulative_buckets() {
        let h = SizeHistogram::default();
        for size in [1, 3, 3, 5000, 100_000] {
            h.observe(size);
        }
        let mut out = Exposition::default();
        out.family("x_total", Kind::Counter, "Things.\nCounted")
            .sample("x_total", &[("stage", "a\"b")], 3.0)
            .sample("x_total", &[], 0.5);
        out.family("b", Kind::Histogram, "Sizes")
            .histogram("b", &[("stage", "zones")], &h.read());
        let text = out.finish();
        assert!(text.starts_with("# HELP x_total Things.\\nCounted\n# TYPE x_total counter\n"));
        assert!(text.contains("x_total{stage=\"a\\\"b\"} 3\n"));
        assert!(text.contains("x_total 0.5\n"));
        assert!(text.contains("b_bucket{stage=\"zones\",le=\"1\"} 1\n"));
        assert!(text.contains("b_bucket{stage=\"zones\",le=\"4\"} 3\n"));
        assert!(text.contains("b_bucket{stage=\"zones\",le=\"4096\"} 3\n"));
        assert!(text.contains("b_bucket{stage=\"zones\",le=\"8192\"} 4\n"));
        assert!(text.contains("b_bucket{stage=\"zones\",le=\"+Inf\"} 5\n"));
        assert!(text.contains("b_sum{stage=\"zones\"} 105007\n"));
        assert!(text.contains("b_count{stage=\"zones\"} 5\n"));
    }
}
