//! Turns per second through a runtime on Redis, against SQLite (`sync = full`)
//! on the same machine, with the offline echo model (so the store is what
//! is measured).
//!
//! ```text
//! TROUPE_TEST_REDIS_URL=redis://127.0.0.1:6379/15 cargo run --release --example redis_bench
//! ```
//!
//! Reads the Redis URL from `TROUPE_TEST_REDIS_URL`, else `TROUPE_STORE_URL`;
//! skips (exit 0, with a message) when neither is set or Redis does not answer.
//! Optional arguments: concurrent sessions (64) and turns per session (50).
//! Keys go under a fresh `troupe-bench:<uuid>:` prefix, deleted at the end.

use std::time::{Duration, Instant};

use troupe::config::{Config, StoreBackend};
use troupe::store::{RedisOptions, RedisStore, SyncMode};
use troupe::Runtime;

struct Figures {
    turns_per_sec: f64,
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn figures(mut lat: Vec<Duration>, wall: Duration) -> Figures {
    lat.sort();
    let n = lat.len().max(1);
    let mean = lat.iter().sum::<Duration>() / n as u32;
    Figures {
        turns_per_sec: lat.len() as f64 / wall.as_secs_f64(),
        mean,
        p50: lat[n / 2],
        p99: lat[(n * 99 / 100).min(n - 1)],
    }
}

async fn run(config: Config, sessions: usize, turns: usize) -> (Figures, Figures) {
    let rt = Runtime::builder()
        .config(config)
        .build()
        .await
        .expect("runtime starts");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    // One session, one turn after another: the latency of a turn.
    let s = rt
        .session(format!("seq-{tag}"))
        .open()
        .await
        .expect("session opens");
    s.chat("warm-up").await.expect("turn");
    let mut lat = Vec::new();
    let started = Instant::now();
    for i in 0..300 {
        let t = Instant::now();
        s.chat(format!("turn {i}")).await.expect("turn");
        lat.push(t.elapsed());
    }
    let sequential = figures(lat, started.elapsed());

    // `sessions` sessions at once, `turns` turns each.
    let mut handles = Vec::new();
    for i in 0..sessions {
        let s = rt
            .session(format!("c{i}-{tag}"))
            .open()
            .await
            .expect("session opens");
        s.chat("warm-up").await.expect("turn");
        handles.push(s);
    }
    let started = Instant::now();
    let tasks: Vec<_> = handles
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(turns);
                for i in 0..turns {
                    let t = Instant::now();
                    s.chat(format!("turn {i}")).await.expect("turn");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let concurrent = figures(lat, started.elapsed());
    rt.shutdown().await.expect("shutdown");
    (sequential, concurrent)
}

fn print(name: &str, sessions: usize, (seq, conc): &(Figures, Figures)) {
    println!(
        "{name:<13} 1 session : {:>7.0} turns/s  mean {:>6.2} ms  p50 {:>6.2} ms  p99 {:>6.2} ms",
        seq.turns_per_sec,
        seq.mean.as_secs_f64() * 1e3,
        seq.p50.as_secs_f64() * 1e3,
        seq.p99.as_secs_f64() * 1e3
    );
    println!(
        "{name:<13} {sessions} sessions: {:>7.0} turns/s  mean {:>6.2} ms  p50 {:>6.2} ms  p99 {:>6.2} ms",
        conc.turns_per_sec,
        conc.mean.as_secs_f64() * 1e3,
        conc.p50.as_secs_f64() * 1e3,
        conc.p99.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sessions = args.first().copied().unwrap_or(64);
    let turns = args.get(1).copied().unwrap_or(50);
    let Some(url) = std::env::var("TROUPE_TEST_REDIS_URL")
        .or_else(|_| std::env::var("TROUPE_STORE_URL"))
        .ok()
    else {
        println!("redis_bench: skipped (set TROUPE_TEST_REDIS_URL=redis://127.0.0.1:6379/15)");
        return;
    };
    let prefix = format!("troupe-bench:{}:", uuid::Uuid::new_v4());
    let mut o = RedisOptions::new(url.clone());
    o.key_prefix = prefix.clone();
    let cleanup = match RedisStore::open(o).await {
        Ok(s) => s,
        Err(e) => {
            println!("redis_bench: skipped, Redis at {url} does not answer: {e}");
            return;
        }
    };
    let agents = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");

    let mut redis = Config::default();
    redis.store.backend = StoreBackend::Redis;
    redis.store.url = url.clone();
    redis.store.key_prefix = prefix;
    redis.agents.dir = agents.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sqlite = Config::default();
    sqlite.store.backend = StoreBackend::Sqlite;
    sqlite.store.path = dir.path().join("bench.db");
    sqlite.store.sync = SyncMode::Full;
    sqlite.agents.dir = agents;

    println!(
        "echo model; {sessions} concurrent sessions x {turns} turns; 300 sequential turns on one session"
    );
    let r = run(redis, sessions, turns).await;
    print("redis", sessions, &r);
    let s = run(sqlite, sessions, turns).await;
    print("sqlite(full)", sessions, &s);
    println!(
        "extra latency per turn, redis vs sqlite(full): 1 session {:+.2} ms (mean), {sessions} sessions {:+.2} ms (mean)",
        (r.0.mean.as_secs_f64() - s.0.mean.as_secs_f64()) * 1e3,
        (r.1.mean.as_secs_f64() - s.1.mean.as_secs_f64()) * 1e3
    );
    let _ = cleanup.delete_all_keys().await;
}
