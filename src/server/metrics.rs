//! Prometheus metrics (`GET /metrics`, text format 0.0.4), counted with
//! atomics: requests by route and status, request latency by route, chat
//! turns and their latency, live sessions, store errors.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

/// Histogram bucket upper bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram: cumulative-on-render buckets, a count and a sum.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: DashMap<(String, u16), AtomicU64>,
    request_duration: DashMap<String, Histogram>,
    turns: AtomicU64,
    turn_duration: Histogram,
    store_errors: AtomicU64,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one request on `route` (its pattern, e.g. `/v1/sessions/{id}/chat`).
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        let key = (route.to_string(), status);
        match self.requests.get(&key) {
            Some(c) => {
                c.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.requests
                    .entry(key)
                    .or_default()
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        match self.request_duration.get(route) {
            Some(h) => h.observe(took),
            None => self
                .request_duration
                .entry(route.to_string())
                .or_default()
                .observe(took),
        }
    }

    /// Counts one completed chat turn.
    pub fn turn(&self, took: Duration) {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.turn_duration.observe(took);
    }

    /// Counts one request that failed in the store.
    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, live_sessions: usize) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP troupe_http_requests_total HTTP requests by route pattern and status.\n",
        );
        out.push_str("# TYPE troupe_http_requests_total counter\n");
        let mut rows: Vec<(String, u16, u64)> = self
            .requests
            .iter()
            .map(|e| {
                (
                    e.key().0.clone(),
                    e.key().1,
                    e.value().load(Ordering::Relaxed),
                )
            })
            .collect();
        rows.sort();
        for (route, status, n) in rows {
            let _ = writeln!(
                out,
                "troupe_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(&route)
            );
        }
        out.push_str("# HELP troupe_http_request_duration_seconds HTTP request latency (to the response head) by route pattern.\n");
        out.push_str("# TYPE troupe_http_request_duration_seconds histogram\n");
        let mut routes: Vec<String> = self
            .request_duration
            .iter()
            .map(|e| e.key().clone())
            .collect();
        routes.sort();
        for route in routes {
            if let Some(h) = self.request_duration.get(&route) {
                h.render(
                    &mut out,
                    "troupe_http_request_duration_seconds",
                    &format!("route=\"{}\"", escape(&route)),
                );
            }
        }
        out.push_str("# HELP troupe_turns_total Chat turns completed through the daemon.\n");
        out.push_str("# TYPE troupe_turns_total counter\n");
        let _ = writeln!(
            out,
            "troupe_turns_total {}",
            self.turns.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP troupe_turn_duration_seconds Chat turn latency, message to durable reply.\n",
        );
        out.push_str("# TYPE troupe_turn_duration_seconds histogram\n");
        self.turn_duration
            .render(&mut out, "troupe_turn_duration_seconds", "");
        out.push_str("# HELP troupe_live_sessions Sessions with a live actor.\n");
        out.push_str("# TYPE troupe_live_sessions gauge\n");
        let _ = writeln!(out, "troupe_live_sessions {live_sessions}");
        out.push_str("# HELP troupe_store_errors_total Requests that failed in the store.\n");
        out.push_str("# TYPE troupe_store_errors_total counter\n");
        let _ = writeln!(
            out,
            "troupe_store_errors_total {}",
            self.store_errors.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("/healthz", 200, Duration::from_micros(300));
        m.request("/healthz", 200, Duration::from_millis(3));
        m.request("/healthz", 404, Duration::from_secs(20));
        m.turn(Duration::from_millis(2));
        let text = m.render(3);
        assert!(text.contains("troupe_http_requests_total{route=\"/healthz\",status=\"200\"} 2"));
        assert!(text.contains("troupe_http_requests_total{route=\"/healthz\",status=\"404\"} 1"));
        assert!(text.contains(
            "troupe_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains(
            "troupe_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.005\"} 2"
        ));
        assert!(text.contains(
            "troupe_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"+Inf\"} 3"
        ));
        assert!(text.contains("troupe_turns_total 1"));
        assert!(text.contains("troupe_turn_duration_seconds_count 1"));
        assert!(text.contains("troupe_live_sessions 3"));
        assert!(text.contains("troupe_store_errors_total 0"));
    }
}
