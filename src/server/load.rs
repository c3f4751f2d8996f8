//! W5: the daemon under load — chat requests over loopback HTTP
//! (`troupe bench --scenario http`).
//!
//! `connections` client tasks, each with its own keep-alive connection,
//! send `POST /v1/sessions/{id}/chat` back to back for `duration`, spread
//! over `sessions` sessions (task *i* takes sessions *i*, *i + connections*,
//! …, so no two tasks share a session and no request waits on another's
//! turn). Every turn is persisted by the server before it answers. Latency is
//! measured per request on the client side, from send to the last byte.
//!
//! The load generator runs in the same process as the server and shares the
//! machine's cores with it, so the figures are a floor of what the server
//! alone would reach.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

/// What one load run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Client connections (concurrent requests).
    pub connections: usize,
    /// Sessions the requests were spread over.
    pub sessions: usize,
    /// Measured seconds (after warm-up).
    pub secs: f64,
    /// Requests answered 200 in the measured window.
    pub requests: u64,
    /// Requests that failed (non-200 or transport error).
    pub errors: u64,
    /// Requests per second.
    pub req_per_sec: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

/// Creates `sessions` sessions on the daemon at `base` (`http://host:port`)
/// with ids `{prefix}{i}`, `connections` at a time.
pub async fn create_sessions(
    base: &str,
    prefix: &str,
    sessions: usize,
    connections: usize,
    bearer: Option<&str>,
) -> Result<(), String> {
    let client = client(connections)?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let (client, next) = (client.clone(), next.clone());
        let url = format!("{base}/v1/sessions");
        let prefix = prefix.to_string();
        let bearer = bearer.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= sessions {
                    return Ok(());
                }
                let mut rb = client
                    .post(&url)
                    .json(&json!({ "session_id": format!("{prefix}{i}") }));
                if let Some(b) = &bearer {
                    rb = rb.bearer_auth(b);
                }
                let r = rb.send().await.map_err(|e| format!("POST {url}: {e}"))?;
                if !r.status().is_success() {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    return Err(format!("POST {url}: {status}: {body}"));
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Drives chat load against sessions `{prefix}0..{prefix}{sessions}`
/// (which must exist) for `warmup + duration`; measures the last `duration`.
pub async fn run_load(
    base: &str,
    prefix: &str,
    sessions: usize,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    bearer: Option<&str>,
) -> Result<LoadReport, String> {
    let connections = connections.max(1);
    let client = client(connections)?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let client = client.clone();
        let base = base.to_string();
        let prefix = prefix.to_string();
        let bearer = bearer.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let mine: Vec<String> = (c..sessions.max(connections))
                .step_by(connections)
                .map(|i| format!("{base}/v1/sessions/{prefix}{}/chat", i % sessions.max(1)))
                .collect();
            let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 14);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut k = 0usize;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let url = &mine[k % mine.len()];
                k += 1;
                let mut rb = client
                    .post(url)
                    .json(&json!({ "message": format!("turn {k}") }));
                if let Some(b) = &bearer {
                    rb = rb.bearer_auth(b);
                }
                let t0 = Instant::now();
                let ok = match rb.send().await {
                    Ok(r) => {
                        let status = r.status();
                        match r.bytes().await {
                            Ok(body) if status.is_success() => Ok(body.len()),
                            Ok(body) => Err(format!(
                                "{url}: {status}: {}",
                                String::from_utf8_lossy(&body)
                            )),
                            Err(e) => Err(format!("{url}: {e}")),
                        }
                    }
                    Err(e) => Err(format!("{url}: {e}")),
                };
                let t1 = Instant::now();
                if t0 < measure_from {
                    continue;
                }
                match ok {
                    Ok(_) => lat_us.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (lat_us, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await.map_err(|e| e.to_string())?;
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i] as f64 / 1000.0
    };
    let secs = duration.as_secs_f64();
    Ok(LoadReport {
        connections,
        sessions,
        secs,
        requests: all.len() as u64,
        errors,
        req_per_sec: all.len() as f64 / secs,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: all.last().map(|&v| v as f64 / 1000.0).unwrap_or(0.0),
        first_error,
    })
}

fn client(connections: usize) -> Result<reqwest::Client, String> {
    crate::init_tls();
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .tls_certs_only(Vec::<reqwest::Certificate>::new())
        .build()
        .map_err(|e| format!("cannot build the load client: {e}"))
}

/// The W5 workload: a daemon on loopback (`config`'s store and model, auth
/// off) with `sessions` sessions, driven by `connections` connections for
/// `duration` after a `warmup`. Starts and stops its own server.
pub async fn w5(
    rt: crate::Runtime,
    sessions: usize,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> crate::Result<LoadReport> {
    let mut server_config = rt.config().server.clone();
    server_config.max_body_bytes = server_config.max_body_bytes.max(4096);
    let server = super::Server::new(rt.clone(), server_config)
        .auth(super::Auth::off())
        .bind("127.0.0.1:0")?
        .run()?;
    let base = server.url();
    let bench_err = |e: String| crate::Error::Runtime(format!("http bench: {e}"));
    let prefix = format!("w5-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let result = async {
        create_sessions(&base, &prefix, sessions, connections, None)
            .await
            .map_err(bench_err)?;
        run_load(
            &base,
            &prefix,
            sessions,
            connections,
            warmup,
            duration,
            None,
        )
        .await
        .map_err(bench_err)
    }
    .await;
    server.stop().await?;
    result
}
