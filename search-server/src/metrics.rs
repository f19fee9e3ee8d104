//! Prometheus metrics, written in the text exposition format by hand: a handful of counters
//! and histograms do not justify a metrics crate and its dependency tree.
//!
//! Routes are recorded by their pattern (`/api/images/{id}`), never the raw path, so a
//! client cannot grow the label set without bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Upper bounds (seconds) of the request-latency buckets.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the embedding batch-size buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// Upper bounds (seconds) of the embedding batch duration buckets.
const EMBED_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch_size: Histogram,
    embed_seconds: Histogram,
}

/// All the server's metrics; shared by the request middleware and the inference thread.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                batch_size: Histogram::new(BATCH_BUCKETS),
                embed_seconds: Histogram::new(EMBED_BUCKETS),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way
        // that matters, so keep serving metrics rather than poisoning every request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one finished HTTP request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let mut g = self.lock();
        *g.requests
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        g.latency
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(seconds);
    }

    /// Records one embedding batch run by the inference thread.
    pub fn observe_batch(&self, size: usize, seconds: f64) {
        let mut g = self.lock();
        g.batch_size.observe(size as f64);
        g.embed_seconds.observe(seconds);
    }

    /// Number of requests seen for `(route, status)`; for tests and the load generator.
    pub fn request_count(&self, route: &str, status: u16) -> u64 {
        self.lock()
            .requests
            .iter()
            .filter(|((r, _, s), _)| r == route && *s == status)
            .map(|(_, n)| n)
            .sum()
    }

    /// Sizes of embedding batches observed so far: `(count, sum)`.
    pub fn batch_stats(&self) -> (u64, f64) {
        let g = self.lock();
        (g.batch_size.count, g.batch_size.sum)
    }

    /// The exposition text; `gallery_items` is read by the caller from the live index.
    pub fn render(&self, gallery_items: usize, queue_depth: usize) -> String {
        let g = self.lock();
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP deep_metric_http_requests_total HTTP requests by route pattern, method and status.\n");
        out.push_str("# TYPE deep_metric_http_requests_total counter\n");
        for ((route, method, status), n) in &g.requests {
            let _ = writeln!(
                out,
                "deep_metric_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                escape(route),
                escape(method)
            );
        }
        out.push_str("# HELP deep_metric_http_request_duration_seconds Time from request to response, by route pattern.\n");
        out.push_str("# TYPE deep_metric_http_request_duration_seconds histogram\n");
        for (route, h) in &g.latency {
            h.write(
                &mut out,
                "deep_metric_http_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str("# HELP deep_metric_embed_batch_size Images per embedding batch run by the inference thread.\n");
        out.push_str("# TYPE deep_metric_embed_batch_size histogram\n");
        g.batch_size
            .write(&mut out, "deep_metric_embed_batch_size", "");
        out.push_str("# HELP deep_metric_embed_batch_duration_seconds Time to embed one batch.\n");
        out.push_str("# TYPE deep_metric_embed_batch_duration_seconds histogram\n");
        g.embed_seconds
            .write(&mut out, "deep_metric_embed_batch_duration_seconds", "");
        out.push_str("# HELP deep_metric_gallery_items Items in the gallery index.\n");
        out.push_str("# TYPE deep_metric_gallery_items gauge\n");
        let _ = writeln!(out, "deep_metric_gallery_items {gallery_items}");
        out.push_str(
            "# HELP deep_metric_inference_queue_depth Images waiting for the inference thread.\n",
        );
        out.push_str("# TYPE deep_metric_inference_queue_depth gauge\n");
        let _ = writeln!(out, "deep_metric_inference_queue_depth {queue_depth}");
        out
    }
}

/// Escapes a label value per the exposition format.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::new();
        m.observe_request("/api/search", "POST", 200, 0.004);
        m.observe_request("/api/search", "POST", 200, 0.2);
        m.observe_request("/api/search", "POST", 422, 0.001);
        m.observe_batch(3, 0.05);
        let text = m.render(7, 0);
        assert!(text.contains("deep_metric_http_requests_total{route=\"/api/search\",method=\"POST\",status=\"200\"} 2"));
        assert!(text.contains("deep_metric_http_requests_total{route=\"/api/search\",method=\"POST\",status=\"422\"} 1"));
        assert!(text.contains("deep_metric_http_request_duration_seconds_bucket{route=\"/api/search\",le=\"0.005\"} 2"));
        assert!(text.contains(
            "deep_metric_http_request_duration_seconds_bucket{route=\"/api/search\",le=\"+Inf\"} 3"
        ));
        assert!(text.contains("deep_metric_embed_batch_size_bucket{le=\"2\"} 0"));
        assert!(text.contains("deep_metric_embed_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("deep_metric_embed_batch_size_sum 3"));
        assert!(text.contains("deep_metric_gallery_items 7"));
        assert_eq!(m.request_count("/api/search", 200), 2);
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
