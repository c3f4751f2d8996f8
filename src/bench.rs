//! The built-in benchmark: `troupe bench`.
//!
//! Measures the runtime's own cost with the offline echo model on a SQLite
//! file on local disk — the workloads of the project's benchmark card:
//!
//! - `overhead`: per-turn latency of one session at history length 10 and
//!   10,000 (`sync = "normal"`: runtime overhead), and the same with
//!   `sync = "full"` (the durable latency a lone session sees);
//! - `growth` (G): time of turn 1, 100, 500 and 1,000 of one session;
//! - `throughput` (W1): N sessions × T turns driven concurrently,
//!   `sync = "full"`: turns/s, store bytes, peak resident memory;
//! - `cold-open` (W2): open a 2,000-message session in a fresh runtime and
//!   read its history;
//! - `idle-memory`: resident memory of 100,000 live idle sessions.
//! - `memory`: long-term memory search over 100,000 memories of one user
//!   (SQLite FTS5, BM25), and the cost long-term memory adds to a turn.
//!
//! This machine is shared and noisy: read medians, compare ratios.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::config::{Config, StoreBackend, SyncMode};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::session::NewMessage;
use crate::store::Role;
use crate::EchoModel;

/// Which workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Everything below.
    All,
    /// Per-turn latency at history length 10 and 10,000.
    Overhead,
    /// Turn 1, 100, 500, 1,000 of one session.
    Growth,
    /// Many sessions × turns, concurrently (W1).
    Throughput,
    /// Cold open + history read of a 2,000-message session (W2).
    ColdOpen,
    /// Resident memory of many idle live sessions.
    IdleMemory,
    /// Checkpoint create / restore / fork at 10, 10,000 and 100,000 messages
    /// (W3), and store size with a checkpoint after every turn (W4).
    Checkpoints,
    /// A 10,000-task DAG pipeline on the echo model (W6).
    Workflow,
    /// Long-term memory: search over 100,000 memories of one user; the
    /// extra cost of memory in a turn.
    Memory,
    /// The daemon on loopback: chat requests over HTTP from `--connections`
    /// connections spread over `--sessions` sessions, every turn durable (W5).
    Http,
}

/// Options of `troupe bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchOptions {
    /// The workload.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Sessions driven concurrently (throughput).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Turns per session (throughput).
    #[arg(long, default_value_t = 20)]
    pub turns: usize,
    /// Turns measured per history length (overhead).
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Live idle sessions (idle-memory).
    #[arg(long, default_value_t = 100_000)]
    pub idle_sessions: usize,
    /// Run the throughput workload on the in-memory store instead of SQLite
    /// (isolates the actors' cost from the store's).
    #[arg(long)]
    pub memory_store: bool,
    /// Directory for the benchmark's SQLite files (default: a fresh one in the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Client connections (http).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured seconds, after a 2 s warm-up (http).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            scenario: Scenario::All,
            sessions: 1000,
            turns: 20,
            samples: 2000,
            idle_sessions: 100_000,
            memory_store: false,
            dir: None,
            connections: 64,
            secs: 10,
            json: false,
        }
    }
}

/// Latency figures, microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Samples.
    pub samples: usize,
}

impl Latency {
    fn from(mut d: Vec<Duration>) -> Latency {
        if d.is_empty() {
            return Latency::default();
        }
        d.sort();
        let us = |x: Duration| x.as_secs_f64() * 1e6;
        let pick = |q: f64| us(d[((d.len() as f64 - 1.0) * q).round() as usize]);
        Latency {
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            mean_us: d.iter().map(|x| us(*x)).sum::<f64>() / d.len() as f64,
            samples: d.len(),
        }
    }
}

/// Per-turn latency at two history lengths.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overhead {
    /// History of 10 messages, `sync = "normal"`.
    pub at_10: Latency,
    /// History of 10,000 messages, `sync = "normal"`.
    pub at_10000: Latency,
    /// `at_10000.p50 / at_10.p50`.
    pub ratio: f64,
    /// History of 10 messages, `sync = "full"` (an fsync per turn for a lone session).
    pub durable_at_10: Latency,
}

/// Turn latency as one session grows (G).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Growth {
    /// (turn number, microseconds).
    pub turns: Vec<(usize, f64)>,
}

/// W1.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Throughput {
    /// Sessions.
    pub sessions: usize,
    /// Turns per session.
    pub turns: usize,
    /// Turns per second, wall clock.
    pub turns_per_sec: f64,
    /// Wall time, seconds.
    pub wall_secs: f64,
    /// Per-turn latency seen by the callers.
    pub latency: Latency,
    /// Store file bytes (database + WAL) afterwards.
    pub store_bytes: u64,
    /// Peak resident memory of the process, bytes.
    pub peak_rss_bytes: u64,
}

/// W2.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ColdOpen {
    /// Messages in the session.
    pub messages: usize,
    /// Open + read the whole history in a fresh runtime.
    pub open_and_read: Latency,
}

/// Idle sessions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleMemory {
    /// Live sessions.
    pub sessions: usize,
    /// Resident memory added by them, bytes.
    pub rss_delta_bytes: u64,
    /// Per session, bytes.
    pub bytes_per_session: f64,
}

/// W3 at one history length.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointCosts {
    /// Messages in the session.
    pub messages: usize,
    /// Create a checkpoint.
    pub create: Latency,
    /// Restore an older checkpoint.
    pub restore: Latency,
    /// Fork a checkpoint into a new session.
    pub fork: Latency,
}

/// W3 and W4.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Checkpoints {
    /// W3 at 10, 10,000 and 100,000 messages.
    pub sizes: Vec<CheckpointCosts>,
    /// W4: store bytes after 1,000 turns with a checkpoint after every turn.
    pub store_bytes_with_checkpoints: u64,
    /// The same 1,000 turns without checkpoints.
    pub store_bytes_without: u64,
}

/// W6.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkflowBench {
    /// Tasks in the DAG.
    pub tasks: usize,
    /// Wall time of the whole run, seconds (the echo model answers at once,
    /// so this is the runner's own cost: scheduling, prompts, durable results).
    pub wall_secs: f64,
    /// Per task, microseconds.
    pub per_task_us: f64,
}

/// Long-term memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryBench {
    /// Memories of the one user searched.
    pub memories: usize,
    /// Seconds to store them (each through `memory_put`, group-committed).
    pub load_secs: f64,
    /// `memory_search` (FTS5 BM25, top 5) of a three-word query.
    pub search: Latency,
    /// `memory_recall` (search + fill with the best-scoring): what a turn does.
    pub recall: Latency,
    /// A turn of a session with a user and long-term memory off (`sync = "normal"`).
    pub turn_without: Latency,
    /// The same with long-term memory on over those 100,000 memories.
    pub turn_with: Latency,
    /// `turn_with.p50 - turn_without.p50`, microseconds.
    pub extra_p50_us: f64,
    /// A turn with long-term memory on for a user with 1,000 memories (the
    /// default `memory.max_memories`).
    pub turn_with_1k: Latency,
    /// `turn_with_1k.p50 - turn_without.p50`, microseconds.
    pub extra_p50_1k_us: f64,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    /// Per-turn overhead.
    pub overhead: Option<Overhead>,
    /// Growth.
    pub growth: Option<Growth>,
    /// W1.
    pub throughput: Option<Throughput>,
    /// W2.
    pub cold_open: Option<ColdOpen>,
    /// Idle memory.
    pub idle_memory: Option<IdleMemory>,
    /// W3, W4.
    pub checkpoints: Option<Checkpoints>,
    /// W6.
    pub workflow: Option<WorkflowBench>,
    /// Long-term memory.
    pub memory: Option<MemoryBench>,
    /// W5: the daemon under load.
    pub http: Option<crate::server::load::LoadReport>,
}

struct Workdir {
    path: PathBuf,
    owned: bool,
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn config_for(base: &Config, db: &Path, sync: SyncMode) -> Config {
    let mut c = base.clone();
    c.store.backend = StoreBackend::Sqlite;
    c.store.path = db.to_path_buf();
    c.store.sync = sync;
    c
}

async fn runtime(base: &Config, db: &Path, sync: SyncMode) -> Result<Runtime> {
    Runtime::builder()
        .config(config_for(base, db, sync))
        .model(Arc::new(EchoModel::new()))
        .build()
        .await
}

/// Runs the chosen workloads.
pub async fn run(config: Config, opts: &BenchOptions) -> Result<BenchReport> {
    let work = match &opts.dir {
        Some(d) => Workdir {
            path: d.clone(),
            owned: false,
        },
        None => Workdir {
            path: std::env::temp_dir().join(format!("troupe-bench-{}", uuid::Uuid::new_v4())),
            owned: true,
        },
    };
    std::fs::create_dir_all(&work.path).map_err(|e| {
        Error::InvalidRequest(format!("cannot create '{}': {e}", work.path.display()))
    })?;
    let wants = |s: Scenario| opts.scenario == Scenario::All || opts.scenario == s;
    let mut report = BenchReport::default();
    if wants(Scenario::Overhead) {
        report.overhead = Some(overhead(&config, &work.path, opts.samples).await?);
    }
    if wants(Scenario::Growth) {
        report.growth = Some(growth(&config, &work.path).await?);
    }
    if wants(Scenario::ColdOpen) {
        report.cold_open = Some(cold_open(&config, &work.path).await?);
    }
    if wants(Scenario::Throughput) {
        report.throughput = Some(
            throughput(
                &config,
                &work.path,
                opts.sessions,
                opts.turns,
                opts.memory_store,
            )
            .await?,
        );
    }
    if wants(Scenario::Checkpoints) {
        report.checkpoints = Some(checkpoints(&config, &work.path).await?);
    }
    if wants(Scenario::Workflow) {
        report.workflow = Some(workflow(&config, &work.path).await?);
    }
    if wants(Scenario::Memory) {
        report.memory = Some(memory_bench(&config, &work.path, opts.samples).await?);
    }
    if wants(Scenario::Http) {
        let db = work.path.join("http.db");
        let rt = runtime(&config, &db, SyncMode::Full).await?;
        report.http = Some(
            crate::server::load::w5(
                rt,
                opts.sessions.max(1),
                opts.connections.max(1),
                Duration::from_secs(2),
                Duration::from_secs(opts.secs.max(1)),
            )
            .await?,
        );
    }
    if wants(Scenario::IdleMemory) {
        report.idle_memory = Some(idle_memory(&config, &work.path, opts.idle_sessions).await?);
    }
    Ok(report)
}

async fn prefill(rt: &Runtime, id: &str, messages: usize) -> Result<crate::Session> {
    let s = rt.session(id).open().await?;
    let history: Vec<NewMessage> = (0..messages)
        .map(|i| {
            let role = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            NewMessage::new(
                role,
                format!("prefilled message number {i} with a little text"),
            )
        })
        .collect();
    s.set_history(history).await?;
    Ok(s)
}

async fn time_turns(s: &crate::Session, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        s.chat(format!("benchmark turn {i}: how is it going?"))
            .await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

async fn overhead(config: &Config, dir: &Path, samples: usize) -> Result<Overhead> {
    let mut result = Overhead::default();
    for (len, slot) in [(10usize, 0), (10_000, 1)] {
        // One file each, so neither measurement inherits the other's WAL.
        let rt = runtime(
            config,
            &dir.join(format!("overhead-{len}.db")),
            SyncMode::Normal,
        )
        .await?;
        let s = prefill(&rt, &format!("overhead-{len}"), len).await?;
        time_turns(&s, samples / 10).await?; // warm-up
        let lat = Latency::from(time_turns(&s, samples).await?);
        if slot == 0 {
            result.at_10 = lat;
        } else {
            result.at_10000 = lat;
        }
    }
    result.ratio = result.at_10000.p50_us / result.at_10.p50_us.max(f64::MIN_POSITIVE);
    let rt = runtime(config, &dir.join("overhead-full.db"), SyncMode::Full).await?;
    let s = prefill(&rt, "durable", 10).await?;
    time_turns(&s, 20).await?;
    result.durable_at_10 = Latency::from(time_turns(&s, samples.min(500)).await?);
    Ok(result)
}

async fn growth(config: &Config, dir: &Path) -> Result<Growth> {
    let rt = runtime(config, &dir.join("growth.db"), SyncMode::Normal).await?;
    let s = rt.session("growth").open().await?;
    let times = time_turns(&s, 1000).await?;
    Ok(Growth {
        turns: [1usize, 100, 500, 1000]
            .iter()
            .map(|&n| (n, times[n - 1].as_secs_f64() * 1e6))
            .collect(),
    })
}

async fn cold_open(config: &Config, dir: &Path) -> Result<ColdOpen> {
    let db = dir.join("cold.db");
    {
        let rt = runtime(config, &db, SyncMode::Normal).await?;
        prefill(&rt, "cold", 2000).await?;
        rt.shutdown().await?;
    }
    let mut times = Vec::new();
    for _ in 0..15 {
        let rt = runtime(config, &db, SyncMode::Normal).await?;
        let t = Instant::now();
        let s = rt.session("cold").existing().open().await?;
        let opened = t.elapsed();
        let h = s.history().await?;
        times.push(t.elapsed());
        tracing::debug!(
            open_us = opened.as_micros() as u64,
            total_us = t.elapsed().as_micros() as u64,
            "cold open"
        );
        if h.len() != 2000 {
            return Err(Error::Runtime(format!(
                "cold open read {} messages, expected 2000",
                h.len()
            )));
        }
    }
    Ok(ColdOpen {
        messages: 2000,
        open_and_read: Latency::from(times),
    })
}

async fn throughput(
    config: &Config,
    dir: &Path,
    sessions: usize,
    turns: usize,
    memory_store: bool,
) -> Result<Throughput> {
    let db = dir.join("w1.db");
    let rt = if memory_store {
        Runtime::builder()
            .config(config.clone())
            .memory_store()
            .model(Arc::new(EchoModel::new()))
            .build()
            .await?
    } else {
        let sync = match std::env::var("TROUPE_BENCH_SYNC").as_deref() {
            Ok("normal") => SyncMode::Normal,
            _ => SyncMode::Full,
        };
        runtime(config, &db, sync).await?
    };
    let mut handles = Vec::with_capacity(sessions);
    for i in 0..sessions {
        handles.push(rt.session(format!("w1-{i}")).open().await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(sessions);
    for s in handles {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(turns);
            for t in 0..turns {
                let at = Instant::now();
                s.chat(format!("turn {t}: tell me something")).await?;
                lat.push(at.elapsed());
            }
            Ok::<_, Error>(lat)
        }));
    }
    let mut all = Vec::with_capacity(sessions * turns);
    for t in tasks {
        all.extend(
            t.await
                .map_err(|e| Error::Runtime(format!("bench task failed: {e}")))??,
        );
    }
    let wall = start.elapsed();
    let total = sessions * turns;
    let rss = peak_rss();
    rt.shutdown().await?;
    let store_bytes = file_size(&db) + file_size(&db.with_extension("db-wal"));
    Ok(Throughput {
        sessions,
        turns,
        turns_per_sec: total as f64 / wall.as_secs_f64(),
        wall_secs: wall.as_secs_f64(),
        latency: Latency::from(all),
        store_bytes,
        peak_rss_bytes: rss,
    })
}

async fn idle_memory(config: &Config, dir: &Path, n: usize) -> Result<IdleMemory> {
    let mut c = config_for(config, &dir.join("idle.db"), SyncMode::Normal);
    c.sessions.idle_secs = 86_400.0;
    let rt = Runtime::builder()
        .config(c)
        .model(Arc::new(EchoModel::new()))
        .build()
        .await?;
    // Warm up the runtime's own allocations before the baseline.
    rt.session("idle-warmup").open().await?;
    let before = current_rss();
    let mut pending = Vec::new();
    for i in 0..n {
        let rt = rt.clone();
        pending.push(tokio::spawn(async move {
            rt.session(format!("idle-{i}")).open().await.map(|_| ())
        }));
        if pending.len() >= 512 {
            for p in pending.drain(..) {
                p.await
                    .map_err(|e| Error::Runtime(format!("bench task failed: {e}")))??;
            }
        }
    }
    for p in pending {
        p.await
            .map_err(|e| Error::Runtime(format!("bench task failed: {e}")))??;
    }
    let live = rt.live_sessions();
    let delta = current_rss().saturating_sub(before);
    Ok(IdleMemory {
        sessions: live,
        rss_delta_bytes: delta,
        bytes_per_session: delta as f64 / live.max(1) as f64,
    })
}

async fn checkpoints(config: &Config, dir: &Path) -> Result<Checkpoints> {
    let mut out = Checkpoints::default();
    let mut c = config.clone();
    c.checkpoint.every = 0;
    for len in [10usize, 10_000, 100_000] {
        let rt = runtime(&c, &dir.join(format!("w3-{len}.db")), SyncMode::Normal).await?;
        let s = prefill(&rt, &format!("w3-{len}"), len).await?;
        let older = s.checkpoint("older").await?;
        let mut create = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            s.checkpoint("bench").await?;
            create.push(t.elapsed());
        }
        let newer = s.checkpoint("newer").await?;
        let mut restore = Vec::new();
        for i in 0..300 {
            let cp = if i % 2 == 0 { &older } else { &newer };
            let t = Instant::now();
            s.restore(cp).await?;
            restore.push(t.elapsed());
        }
        let mut fork = Vec::new();
        for i in 0..100 {
            let t = Instant::now();
            rt.fork(&older, format!("w3-{len}-fork-{i}")).await?;
            fork.push(t.elapsed());
        }
        out.sizes.push(CheckpointCosts {
            messages: len,
            create: Latency::from(create),
            restore: Latency::from(restore),
            fork: Latency::from(fork),
        });
    }
    for with in [true, false] {
        let db = dir.join(format!("w4-{with}.db"));
        let rt = runtime(&c, &db, SyncMode::Normal).await?;
        let s = rt.session("w4").open().await?;
        for i in 0..1000 {
            s.chat(format!(
                "turn {i}: a question of ordinary length for the store"
            ))
            .await?;
            if with {
                s.checkpoint(format!("after turn {i}")).await?;
            }
        }
        rt.shutdown().await?;
        let bytes = file_size(&db) + file_size(&db.with_extension("db-wal"));
        if with {
            out.store_bytes_with_checkpoints = bytes;
        } else {
            out.store_bytes_without = bytes;
        }
    }
    Ok(out)
}

async fn workflow(config: &Config, dir: &Path) -> Result<WorkflowBench> {
    use std::fmt::Write as _;
    let n: usize = 10_000;
    // 100 layers of 100 tasks; each task depends on two tasks of the layer
    // before, so there is wide parallelism and about 20,000 edges to track.
    let mut text = String::from("name = \"w6\"\n");
    for i in 0..n {
        let _ = write!(
            text,
            "[[task]]\nid = \"t{i}\"\nagent = \"assistant\"\nprompt = \"step {i}\"\n"
        );
        let (layer, pos) = (i / 100, i % 100);
        let mut deps: Vec<String> = Vec::new();
        if layer > 0 {
            let prev = (layer - 1) * 100;
            deps.push(format!("\"t{}\"", prev + pos));
            let other = prev + (pos * 37 + 11) % 100;
            if other != prev + pos {
                deps.push(format!("\"t{other}\""));
            }
        }
        if !deps.is_empty() {
            let _ = writeln!(text, "depends_on = [{}]", deps.join(", "));
        }
    }
    let pipeline = crate::workflow::Pipeline::parse("w6.toml", &text)?;
    let rt = runtime(config, &dir.join("w6.db"), SyncMode::Normal).await?;
    let opts = crate::workflow::RunOptions {
        max_parallel: 64,
        ..Default::default()
    };
    let t = Instant::now();
    let report = crate::workflow::run_pipeline(&rt, &pipeline, "w6.toml", opts, None).await?;
    let wall = t.elapsed();
    if report.run.status != crate::store::RunStatus::Succeeded {
        return Err(Error::Runtime(format!(
            "W6 run ended {:?}",
            report.run.status
        )));
    }
    Ok(WorkflowBench {
        tasks: n,
        wall_secs: wall.as_secs_f64(),
        per_task_us: wall.as_secs_f64() * 1e6 / n as f64,
    })
}

/// A deterministic vocabulary of `n` made-up words (two or three syllables).
fn vocabulary(n: usize) -> Vec<String> {
    const SYL: [&str; 24] = [
        "ka", "lo", "mi", "ter", "sun", "bra", "vel", "dor", "pi", "qua", "ran", "sol", "tem",
        "ul", "ve", "wen", "xo", "yar", "zel", "mon", "fi", "gus", "hal", "jo",
    ];
    (0..n)
        .map(|i| {
            let (a, b, c) = (i % 24, (i / 24) % 24, (i / 576) % 24);
            format!("{}{}{}", SYL[a], SYL[b], if i >= 576 { SYL[c] } else { "" })
        })
        .collect()
}

/// A small deterministic generator (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One synthetic memory: five words of `words`, an importance and a score
/// that cycle with `i`.
fn bench_memory(
    rng: &mut Rng,
    words: &[String],
    user: &str,
    id: &str,
    i: usize,
) -> crate::memory::MemoryItem {
    let text: Vec<&str> = (0..5)
        .map(|_| words[rng.next(words.len())].as_str())
        .collect();
    crate::memory::MemoryItem {
        id: id.into(),
        user_id: user.into(),
        content: format!(
            "User mentioned {} and {}",
            text[..3].join(" "),
            text[3..].join(" ")
        ),
        kind: crate::memory::MemoryKind::Note,
        subject: None,
        relevance: 0.5,
        importance: (i % 100) as f64 / 100.0,
        score: 0.5 + (i % 100) as f64 / 200.0,
        created_at: crate::store::now(),
        last_used: None,
        uses: 0,
        superseded_by: None,
        session_id: None,
    }
}

async fn memory_bench(config: &Config, dir: &Path, samples: usize) -> Result<MemoryBench> {
    const N: usize = 100_000;
    const USER: &str = "bench-user";
    const SMALL: usize = 1_000;
    const USER_SMALL: &str = "bench-user-1k";
    let mut c = config.clone();
    c.checkpoint.every = 0;
    c.memory.max_memories = 2 * N;
    let rt = runtime(&c, &dir.join("memory.db"), SyncMode::Normal).await?;
    let store = rt.store();
    let words = vocabulary(1000);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // 100,000 memories of one user, 5 words each from 1,000: each word is in
    // about 500 memories.
    let t = Instant::now();
    let mut pending = Vec::new();
    for i in 0..N {
        let item = bench_memory(&mut rng, &words, USER, &format!("bench-{i}"), i);
        let store = store.clone();
        pending.push(tokio::spawn(
            async move { store.memory_put(&item, 2 * N).await },
        ));
        if pending.len() >= 512 {
            for p in pending.drain(..) {
                p.await
                    .map_err(|e| Error::Runtime(format!("bench task failed: {e}")))??;
            }
        }
    }
    for p in pending {
        p.await
            .map_err(|e| Error::Runtime(format!("bench task failed: {e}")))??;
    }
    let load_secs = t.elapsed().as_secs_f64();
    // A second user at the default cap (`memory.max_memories` = 1,000): the
    // common case of a turn with memory.
    for i in 0..SMALL {
        let item = bench_memory(&mut rng, &words, USER_SMALL, &format!("bench-small-{i}"), i);
        store.memory_put(&item, 2 * N).await?;
    }
    let query = |rng: &mut Rng| {
        format!(
            "What about {} and the {} {}?",
            words[rng.next(words.len())],
            words[rng.next(words.len())],
            words[rng.next(words.len())]
        )
    };
    let n = samples.clamp(100, 5000);
    for _ in 0..50 {
        store.memory_search(USER, &query(&mut rng), 5).await?; // warm-up
    }
    let mut search = Vec::with_capacity(n);
    let mut found = 0usize;
    for _ in 0..n {
        let q = query(&mut rng);
        let t = Instant::now();
        found += store.memory_search(USER, &q, 5).await?.len();
        search.push(t.elapsed());
    }
    if found == 0 {
        return Err(Error::Runtime(
            "memory bench: no search found anything".into(),
        ));
    }
    let mut recall = Vec::with_capacity(n);
    for _ in 0..n {
        let q = query(&mut rng);
        let t = Instant::now();
        store.memory_recall(USER, &q, 5).await?;
        recall.push(t.elapsed());
    }
    // Turns: the same user, long-term memory off and on, interleaved.
    let off = rt
        .session("memory-off")
        .user(USER)
        .persist_memory(false)
        .open()
        .await?;
    let on = rt
        .session("memory-on")
        .user(USER)
        .persist_memory(true)
        .open()
        .await?;
    let on_small = rt
        .session("memory-on-1k")
        .user(USER_SMALL)
        .persist_memory(true)
        .open()
        .await?;
    let turns = n.min(2000);
    let (mut without, mut with, mut with_small) = (
        Vec::with_capacity(turns),
        Vec::with_capacity(turns),
        Vec::with_capacity(turns),
    );
    for i in 0..turns + 100 {
        // Questions: nothing for the extractor to learn, words to recall by.
        let q = query(&mut rng);
        let t = Instant::now();
        off.chat(q.clone()).await?;
        let a = t.elapsed();
        let t = Instant::now();
        on.chat(q.clone()).await?;
        let b = t.elapsed();
        let t = Instant::now();
        on_small.chat(q).await?;
        let c = t.elapsed();
        if i >= 100 {
            without.push(a);
            with.push(b);
            with_small.push(c);
        }
    }
    rt.shutdown().await?;
    let (turn_without, turn_with, turn_with_1k) = (
        Latency::from(without),
        Latency::from(with),
        Latency::from(with_small),
    );
    Ok(MemoryBench {
        memories: N,
        load_secs,
        search: Latency::from(search),
        recall: Latency::from(recall),
        extra_p50_us: turn_with.p50_us - turn_without.p50_us,
        extra_p50_1k_us: turn_with_1k.p50_us - turn_without.p50_us,
        turn_without,
        turn_with,
        turn_with_1k,
    })
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn current_rss() -> u64 {
    status_kb("VmRSS:") * 1024
}

fn peak_rss() -> u64 {
    status_kb("VmHWM:") * 1024
}

fn show(l: &Latency) -> String {
    format!(
        "p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs ({} turns)",
        l.p50_us, l.p99_us, l.mean_us, l.samples
    )
}

/// Prints a report for people.
pub fn print(report: &BenchReport) {
    if let Some(o) = &report.overhead {
        println!("per-turn overhead (echo model, sync=normal)");
        println!("  history 10:      {}", show(&o.at_10));
        println!("  history 10,000:  {}", show(&o.at_10000));
        println!("  ratio (p50):     {:.2}", o.ratio);
        println!(
            "  durable, sync=full, history 10: {}",
            show(&o.durable_at_10)
        );
    }
    if let Some(g) = &report.growth {
        let parts: Vec<String> = g
            .turns
            .iter()
            .map(|(n, us)| format!("turn {n}: {us:.0} µs"))
            .collect();
        println!("growth (G, one session): {}", parts.join(", "));
    }
    if let Some(c) = &report.cold_open {
        println!(
            "cold open + read {} messages (W2): {}",
            c.messages,
            show(&c.open_and_read)
        );
    }
    if let Some(t) = &report.throughput {
        println!(
            "throughput (W1, sync=full): {} sessions x {} turns: {:.0} turns/s in {:.2} s",
            t.sessions, t.turns, t.turns_per_sec, t.wall_secs
        );
        println!("  turn latency: {}", show(&t.latency));
        println!(
            "  store {:.1} MB, peak RSS {:.1} MB",
            t.store_bytes as f64 / 1e6,
            t.peak_rss_bytes as f64 / 1e6
        );
    }
    if let Some(c) = &report.checkpoints {
        println!("checkpoints (W3, sync=normal)");
        for s in &c.sizes {
            println!("  {:>7} messages: create p50 {:.1} µs, restore p50 {:.1} µs, fork p50 {:.1} µs (p99 {:.0} / {:.0} / {:.0} µs)",
                s.messages, s.create.p50_us, s.restore.p50_us, s.fork.p50_us,
                s.create.p99_us, s.restore.p99_us, s.fork.p99_us);
        }
        println!(
            "  store after 1,000 turns (W4): {:.2} MB with a checkpoint after every turn, {:.2} MB without",
            c.store_bytes_with_checkpoints as f64 / 1e6,
            c.store_bytes_without as f64 / 1e6
        );
    }
    if let Some(w) = &report.workflow {
        println!(
            "workflow (W6): {} tasks in {:.2} s on the echo model ({:.0} µs per task: scheduling, prompts, durable results)",
            w.tasks, w.wall_secs, w.per_task_us
        );
    }
    if let Some(m) = &report.memory {
        println!(
            "long-term memory: {} memories of one user stored in {:.1} s (SQLite, FTS5)",
            m.memories, m.load_secs
        );
        println!("  search (BM25, top 5): {}", show(&m.search));
        println!("  recall (search + best-scoring fill): {}", show(&m.recall));
        println!("  turn, memory off: {}", show(&m.turn_without));
        println!(
            "  turn, memory on (100,000 memories):  {}",
            show(&m.turn_with)
        );
        println!(
            "  turn, memory on (1,000 memories):    {}",
            show(&m.turn_with_1k)
        );
        println!(
            "  extra per turn (p50): {:.1} µs at 100,000 memories, {:.1} µs at 1,000",
            m.extra_p50_us, m.extra_p50_1k_us
        );
    }
    if let Some(h) = &report.http {
        println!(
            "daemon (W5): {:.0} chat requests/s over HTTP, {} connections, {} sessions, sync=full; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.1} ms; {} errors{}",
            h.req_per_sec,
            h.connections,
            h.sessions,
            h.p50_ms,
            h.p90_ms,
            h.p99_ms,
            h.max_ms,
            h.errors,
            h.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    if let Some(m) = &report.idle_memory {
        println!(
            "idle memory: {} live sessions use {:.1} MB ({:.0} bytes each)",
            m.sessions,
            m.rss_delta_bytes as f64 / 1e6,
            m.bytes_per_session
        );
    }
}

/// `troupe bench`: runs and prints.
pub async fn run_cli(config: Config, opts: BenchOptions) -> Result<()> {
    let report = run(config, &opts).await?;
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print(&report);
    }
    Ok(())
}
