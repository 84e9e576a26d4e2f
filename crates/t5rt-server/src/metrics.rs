//! Prometheus metrics, under Text Generation Inference's names so that its dashboards work:
//! request counts, durations, queue time, time per token, input and generated lengths as
//! histograms; queue size and current batch size as gauges (read from the engine).

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use t5rt::engine::EngineStats;

/// A histogram with fixed bucket bounds.
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Histogram {
        let n = bounds.len();
        Histogram {
            bounds,
            counts: vec![0; n],
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

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Durations in seconds: 35 geometric buckets from 0.15 ms, as TGI.
fn duration_buckets() -> Vec<f64> {
    (0..35).map(|i| 0.00015 * 1.5f64.powi(i)).collect()
}

/// Token counts: powers of two to 2^20.
fn length_buckets() -> Vec<f64> {
    (0..=20).map(|i| (1u64 << i) as f64).collect()
}

struct Inner {
    requests: u64,
    success: u64,
    /// Failures by error type.
    failures: Vec<(String, u64)>,
    duration: Histogram,
    queue: Histogram,
    per_token: Histogram,
    input_length: Histogram,
    generated: Histogram,
}

/// The server's metrics.
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// What one finished request reports.
pub struct RequestTimes {
    pub total_secs: f64,
    pub queue_secs: f64,
    pub input_tokens: usize,
    pub generated_tokens: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: 0,
                success: 0,
                failures: Vec::new(),
                duration: Histogram::new(duration_buckets()),
                queue: Histogram::new(duration_buckets()),
                per_token: Histogram::new(duration_buckets()),
                input_length: Histogram::new(length_buckets()),
                generated: Histogram::new(length_buckets()),
            }),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request arrived at a generation route.
    pub fn request(&self) {
        self.lock().requests += 1;
    }

    pub fn success(&self, t: &RequestTimes) {
        let mut m = self.lock();
        m.success += 1;
        m.duration.observe(t.total_secs);
        m.queue.observe(t.queue_secs);
        if t.generated_tokens > 0 {
            let decode = (t.total_secs - t.queue_secs).max(0.0);
            m.per_token.observe(decode / t.generated_tokens as f64);
        }
        m.input_length.observe(t.input_tokens as f64);
        m.generated.observe(t.generated_tokens as f64);
    }

    pub fn failure(&self, kind: &str) {
        let mut m = self.lock();
        match m.failures.iter_mut().find(|(k, _)| k == kind) {
            Some((_, n)) => *n += 1,
            None => m.failures.push((kind.to_string(), 1)),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, engine: &EngineStats) -> String {
        let m = self.lock();
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "tgi_request_count",
            "Requests received",
            m.requests,
        );
        counter(
            &mut out,
            "tgi_request_success",
            "Requests answered",
            m.success,
        );
        let _ = writeln!(
            out,
            "# HELP tgi_request_failure Requests failed, by error type\n# TYPE tgi_request_failure counter"
        );
        for (kind, n) in &m.failures {
            let _ = writeln!(out, "tgi_request_failure{{err=\"{kind}\"}} {n}");
        }
        m.duration.render(
            &mut out,
            "tgi_request_duration",
            "End-to-end request time, seconds",
        );
        m.queue.render(
            &mut out,
            "tgi_request_queue_duration",
            "Time waiting for a place in the batch, seconds",
        );
        m.per_token.render(
            &mut out,
            "tgi_request_mean_time_per_token_duration",
            "Decoding time per generated token, seconds",
        );
        m.input_length.render(
            &mut out,
            "tgi_request_input_length",
            "Input tokens per request",
        );
        m.generated.render(
            &mut out,
            "tgi_request_generated_tokens",
            "Generated tokens per request",
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "tgi_queue_size",
            "Requests waiting for the batch",
            engine.waiting.load(Ordering::SeqCst),
        );
        gauge(
            &mut out,
            "tgi_batch_current_size",
            "Rows in the decoding batch",
            engine.batch_rows.load(Ordering::SeqCst),
        );
        gauge(
            &mut out,
            "t5rt_requests_in_flight",
            "Requests waiting or decoding",
            engine.in_flight.load(Ordering::SeqCst),
        );
        counter(
            &mut out,
            "t5rt_decoding_steps",
            "Decoding steps run",
            engine.steps.load(Ordering::Relaxed) as u64,
        );
        out
    }
}
