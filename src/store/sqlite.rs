//! The embedded default store: one SQLite file, WAL, group commit.
//!
//! All writes go to one writer thread that owns the write connection. It
//! takes every job waiting in its queue (up to [`MAX_BATCH`]) and applies them
//! in one transaction. A job refused before it changed anything (a version
//! conflict is decided by its first statement) is simply reported; if a job
//! fails after changing rows, the transaction is rolled back and the batch
//! redone with one savepoint per job, so a failing job never takes its
//! neighbours with it. A job is acknowledged only after its transaction
//! committed — with `sync = "full"`, after the fsync. Many sessions' turns so
//! share one fsync (group commit). WAL checkpoints run on a background thread,
//! never inside a commit.
//!
//! Reads run on a small pool of reader threads, each with its own connection
//! (WAL lets readers run beside the writer). Nothing here ever blocks an actix
//! arbiter thread: callers await a oneshot channel.
//!
//! Layout (schema v1): `sessions` keyed by a compact integer, `segments` of
//! the message tree, `messages` clustered by `(segment, seq)` (`WITHOUT
//! ROWID`) so that a history read is a few range scans, and `checkpoints`.
//! Schema v4 adds long-term `memories` (an FTS5 index `memories_fts`, BM25
//! ranking) and per-user `users` records; v5 adds each memory's owner token
//! to that index, so a search walks only the user's matches. Migrations are
//! numbered and recorded in `schema_version`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    check_version, from_micros, to_micros, CheckpointKind, CheckpointRecord, Commit, JsonMap,
    LoadedSession, MemoryHit, MemoryItem, MemoryKind, MemoryWrite, Message, MessageId, Role,
    RunRecord, RunStatus, SegmentId, SegmentInfo, SessionFilter, SessionRecord, SessionSummary,
    SharedEntry, Store, StoreError, TaskResult, UserRecord,
};

/// Most jobs one transaction takes.
pub const MAX_BATCH: usize = 512;
const READERS: usize = 2;

/// How hard SQLite works to make a commit survive a crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync at every commit: an acknowledged turn survives a power loss.
    #[default]
    Full,
    /// No fsync at commit (WAL): an acknowledged turn survives a crash of the
    /// process, but the last ones may be lost on a power loss.
    Normal,
}

const MIGRATIONS: &[&str] = &[
    // v1: sessions, the message tree, checkpoints.
    r#"
    CREATE TABLE sessions (
        key INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT,
        agents TEXT NOT NULL,
        head_segment INTEGER,
        head_seq INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        interactions INTEGER NOT NULL,
        state_version INTEGER NOT NULL,
        profile TEXT NOT NULL,
        preferences TEXT NOT NULL,
        user_data TEXT NOT NULL,
        metadata TEXT NOT NULL
    );
    CREATE INDEX sessions_user ON sessions(user_id);
    CREATE TABLE segments (
        id INTEGER PRIMARY KEY,
        session_key INTEGER NOT NULL,
        parent_segment INTEGER,
        parent_seq INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX segments_session ON segments(session_key);
    CREATE INDEX segments_parent ON segments(parent_segment);
    CREATE TABLE messages (
        segment INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        role INTEGER NOT NULL,
        agent TEXT,
        content TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        meta TEXT,
        PRIMARY KEY (segment, seq)
    ) WITHOUT ROWID;
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        session_key INTEGER NOT NULL,
        head_segment INTEGER,
        head_seq INTEGER,
        label TEXT,
        description TEXT,
        kind INTEGER NOT NULL,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX checkpoints_session ON checkpoints(session_key, created_at);
    "#,
    // v2: shared state (namespaced, versioned key/value).
    r#"
    CREATE TABLE shared (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    "#,
    // v3: workflow runs and their task results.
    r#"
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        path TEXT NOT NULL,
        inputs TEXT NOT NULL,
        session_id TEXT,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX runs_created ON runs(created_at);
    CREATE TABLE task_results (
        run_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        status TEXT NOT NULL,
        output TEXT,
        attempts INTEGER NOT NULL,
        error TEXT,
        started_at INTEGER,
        finished_at INTEGER,
        PRIMARY KEY (run_id, task_id)
    ) WITHOUT ROWID;
    "#,
    // v4: long-term memories (with an FTS5 index) and per-user records.
    r#"
    CREATE TABLE memories (
        key INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        content TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT,
        relevance REAL NOT NULL,
        importance REAL NOT NULL,
        score REAL NOT NULL,
        created_at INTEGER NOT NULL,
        last_used INTEGER,
        uses INTEGER NOT NULL DEFAULT 0,
        active INTEGER NOT NULL DEFAULT 1,
        superseded_by TEXT,
        session_id TEXT
    );
    CREATE INDEX memories_user ON memories(user_id, active, score);
    CREATE INDEX memories_subject ON memories(user_id, subject) WHERE subject IS NOT NULL;
    CREATE VIRTUAL TABLE memories_fts USING fts5(
        content, content='memories', content_rowid='key', tokenize='porter unicode61'
    );
    CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts(rowid, content) VALUES (new.key, new.content);
    END;
    CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.key, old.content);
    END;
    CREATE TRIGGER memories_fts_update AFTER UPDATE OF content ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.key, old.content);
        INSERT INTO memories_fts(rowid, content) VALUES (new.key, new.content);
    END;
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        profile TEXT NOT NULL,
        preferences TEXT NOT NULL,
        memories INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // v5: an owner token in the FTS index, so a search intersects the user's
    // postings with the terms' instead of walking every user's matches. The
    // token is `owner_token(user_id)`, computed here from `hex(user_id)` (the
    // UTF-8 bytes) for the rows already stored; the index is rebuilt from
    // `memories`.
    r#"
    DROP TRIGGER memories_fts_insert;
    DROP TRIGGER memories_fts_delete;
    DROP TRIGGER memories_fts_update;
    DROP TABLE memories_fts;
    ALTER TABLE memories ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    WITH RECURSIVE
        u(user_id, h) AS (SELECT DISTINCT user_id, hex(user_id) FROM memories),
        t(user_id, h, i, tok) AS (
            SELECT user_id, h, 1, 'u' FROM u
            UNION ALL
            SELECT user_id, h, i + 2, tok || printf('%03d',
                (instr('0123456789ABCDEF', substr(h, i, 1)) - 1) * 16
                + instr('0123456789ABCDEF', substr(h, i + 1, 1)) - 1)
            FROM t WHERE i < length(h)
        )
    UPDATE memories SET owner = t.tok FROM t
        WHERE t.user_id = memories.user_id AND t.i > length(t.h);
    CREATE VIRTUAL TABLE memories_fts USING fts5(
        content, owner, content='memories', content_rowid='key', tokenize='porter unicode61'
    );
    INSERT INTO memories_fts(memories_fts) VALUES ('rebuild');
    CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts(rowid, content, owner) VALUES (new.key, new.content, new.owner);
    END;
    CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, content, owner)
            VALUES ('delete', old.key, old.content, old.owner);
    END;
    CREATE TRIGGER memories_fts_update AFTER UPDATE OF content, owner ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, content, owner)
            VALUES ('delete', old.key, old.content, old.owner);
        INSERT INTO memories_fts(rowid, content, owner) VALUES (new.key, new.content, new.owner);
    END;
    "#,
    // v6: the case-folded text of memories without a subject, indexed, so a
    // repeated note is found as a duplicate by one index lookup (not a scan
    // of the user's memories). Rust folds new rows (full Unicode); rows
    // already stored get SQLite's lower() (ASCII).
    r#"
    ALTER TABLE memories ADD COLUMN folded TEXT;
    UPDATE memories SET folded = lower(content) WHERE subject IS NULL;
    CREATE INDEX memories_folded ON memories(user_id, folded)
        WHERE subject IS NULL AND active = 1;
    "#,
];

/// The FTS5 token of a memory's owner (column `owner` of `memories` and
/// `memories_fts`): `u` and each UTF-8 byte of the user id as three decimal
/// digits (`"ab"` → `u097098`). Any user id so becomes one token of letters
/// and digits under `porter unicode61` — never split, folded or stemmed (no
/// suffix rule ends in a digit) — and different ids give different tokens.
/// Migration v5 computes the same in SQL for the rows it finds.
fn owner_token(user_id: &str) -> String {
    use std::fmt::Write;
    let mut token = String::with_capacity(1 + 3 * user_id.len());
    token.push('u');
    for b in user_id.bytes() {
        let _ = write!(token, "{b:03}");
    }
    token
}

enum WriteOp {
    Commit(Box<Encoded>),
    Trim(String, u64, Vec<(i64, Option<u32>)>),
    Shared(Box<SharedWrite>),
    /// Plain statements (runs, task results); may run twice on the redo path.
    Sql(Box<SqlWrite>),
    Delete(String, Option<i64>),
    /// Copy the whole WAL into the database file and truncate it.
    Checkpoint,
}

type SqlWrite = dyn Fn(&Transaction<'_>) -> Result<bool, StoreError> + Send;

/// A shared-state write; the entry written is left in `out` for the caller.
struct SharedWrite {
    namespace: String,
    key: String,
    value: Option<String>,
    expected: Option<u64>,
    out: Arc<Mutex<Option<SharedEntry>>>,
}

/// A commit with its JSON already encoded, so the single writer thread spends
/// its time in SQLite, not in serde (encoding runs on the caller's thread).
struct Encoded {
    commit: Commit,
    agents: String,
    /// profile, preferences, user data, metadata — when they changed (or the session is new).
    maps: Option<[String; 4]>,
    metas: Vec<Option<String>>,
    checkpoint_states: Vec<String>,
}

impl Encoded {
    fn new(commit: Commit) -> Result<Encoded, StoreError> {
        let r = &commit.record;
        let maps = (commit.small_state_changed || commit.expected_version.is_none()).then(|| {
            [
                json_text(&r.profile),
                json_text(&r.preferences),
                json_text(&r.user_data),
                json_text(&r.metadata),
            ]
        });
        let agents = serde_json::to_string(&r.agents).unwrap_or_else(|_| "[]".into());
        let metas = commit
            .messages
            .iter()
            .map(|m| m.meta.as_ref().map(|v| v.to_string()))
            .collect();
        let checkpoint_states = commit
            .checkpoints
            .iter()
            .map(|cp| {
                serde_json::to_string(&cp.state).map_err(|e| {
                    StoreError::Database(format!("cannot encode checkpoint state: {e}"))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Encoded {
            commit,
            agents,
            maps,
            metas,
            checkpoint_states,
        })
    }
}

struct WriteJob {
    op: WriteOp,
    ack: oneshot::Sender<Result<bool, StoreError>>,
}

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The SQLite store. See the module docs.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Option<crossbeam_channel::Sender<WriteJob>>>,
    readers: Mutex<Option<crossbeam_channel::Sender<ReadJob>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn open_connection(path: &Path, sync: SyncMode) -> Result<Connection, StoreError> {
    let err = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    let conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
    let sync = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; \
         PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY; PRAGMA mmap_size = 1073741824;"
    ))
    .map_err(|e| err(format!("{e} (is it a SQLite database?)")))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| err(e.to_string()))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(|e| err(format!("{e} (is it a SQLite database?)")))?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(|e| err(e.to_string()))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(err(format!(
            "it was written by a newer troupe (schema v{current}; this build knows up to v{known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let v = i as i64 + 1;
        tx.execute_batch(sql)
            .map_err(|e| err(format!("migration to schema v{v} failed: {e}")))?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [v])
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(path = %path.display(), version = v, "store schema migrated");
    }
    tx.commit().map_err(|e| err(e.to_string()))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts its
    /// writer and reader threads.
    pub fn open(path: impl AsRef<Path>, sync: SyncMode) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: format!("cannot create directory '{}': {e}", dir.display()),
            })?;
        }
        let mut conn = open_connection(&path, sync)?;
        migrate(&mut conn, &path)?;
        // Checkpoints run on their own thread (below), not inside a commit.
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")?;
        let mut threads = Vec::new();

        let checkpointer = open_connection(&path, sync)?;
        let wal_frames = Arc::new(AtomicU64::new(0));
        let requested = Arc::new(AtomicBool::new(false));
        let (ctx, crx) = crossbeam_channel::bounded::<()>(1);
        let frames = wal_frames.clone();
        let req = requested.clone();
        threads.push(
            std::thread::Builder::new()
                .name("troupe-sqlite-checkpoint".into())
                .spawn(move || checkpoint_loop(checkpointer, crx, frames, req))
                .map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    reason: format!("cannot start checkpoint thread: {e}"),
                })?,
        );
        let (wtx, wrx) = crossbeam_channel::unbounded::<WriteJob>();
        threads.push(
            std::thread::Builder::new()
                .name("troupe-sqlite-writer".into())
                .spawn(move || writer_loop(conn, wrx, ctx, wal_frames, requested))
                .map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    reason: format!("cannot start writer thread: {e}"),
                })?,
        );
        let (rtx, rrx) = crossbeam_channel::unbounded::<ReadJob>();
        for i in 0..READERS {
            let conn = open_connection(&path, sync)?;
            let rrx = rrx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("troupe-sqlite-reader-{i}"))
                    .spawn(move || {
                        warm_up(&conn);
                        for job in rrx {
                            job(&conn);
                        }
                    })
                    .map_err(|e| StoreError::Open {
                        path: path.display().to_string(),
                        reason: format!("cannot start reader thread: {e}"),
                    })?,
            );
        }
        Ok(SqliteStore {
            path,
            writer: Mutex::new(Some(wtx)),
            readers: Mutex::new(Some(rtx)),
            threads: Mutex::new(threads),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: WriteOp) -> Result<bool, StoreError> {
        let (ack, rx) = oneshot::channel();
        {
            let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = guard.as_ref().ok_or(StoreError::Closed)?;
            tx.send(WriteJob { op, ack })
                .map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            let readers = guard.as_ref().ok_or(StoreError::Closed)?;
            readers
                .send(Box::new(move |conn: &Connection| {
                    let _ = tx.send(f(conn));
                }))
                .map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops the threads after the queued work is done. Later calls fail
    /// with [`StoreError::Closed`].
    pub fn close(&self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// WAL frames (pages) past which the writer itself checkpoints, blocking,
/// because the background checkpointer is not keeping up (about 256 MB).
const WAL_HARD_LIMIT: u64 = 65_536;

fn writer_loop(
    mut conn: Connection,
    rx: crossbeam_channel::Receiver<WriteJob>,
    checkpoint: crossbeam_channel::Sender<()>,
    wal_frames: Arc<AtomicU64>,
    requested: Arc<AtomicBool>,
) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_BATCH);
    let (mut batches, mut jobs) = (0u64, 0u64);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batches += 1;
        jobs += batch.len() as u64;
        let results = apply_batch(&mut conn, &batch);
        if batch.iter().any(|j| matches!(j.op, WriteOp::Checkpoint)) {
            // A flush: everything acknowledged so far goes into the main file.
            if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
                tracing::warn!(error = %e, "WAL checkpoint (flush) failed");
            }
        }
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.ack.send(result);
        }
        // Ask for a background checkpoint; one request per period wakes the
        // checkpointer, later ones in the period cost nothing.
        if !requested.swap(true, Ordering::AcqRel) {
            let _ = checkpoint.try_send(());
        }
        if wal_frames.load(Ordering::Relaxed) > WAL_HARD_LIMIT {
            tracing::warn!("WAL over {WAL_HARD_LIMIT} frames: checkpointing in the writer");
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(RESTART);");
            wal_frames.store(0, Ordering::Relaxed);
        }
    }
    drop(checkpoint);
    tracing::debug!(
        batches,
        jobs,
        mean_batch = jobs as f64 / batches.max(1) as f64,
        "sqlite writer stopping"
    );
    // The channel is closed: checkpoint the WAL so the file is self-contained.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

/// How often, at most, the background checkpointer runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Copies committed WAL pages back into the database file, beside the
/// writer (a PASSIVE checkpoint never blocks it), so commits never pay for it.
fn checkpoint_loop(
    conn: Connection,
    rx: crossbeam_channel::Receiver<()>,
    wal_frames: Arc<AtomicU64>,
    requested: Arc<AtomicBool>,
) {
    while rx.recv().is_ok() {
        // Coalesce: a page rewritten by many commits is copied back once.
        let deadline = std::time::Instant::now() + CHECKPOINT_EVERY;
        let mut closed = false;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(()) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => break,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            break;
        }
        requested.store(false, Ordering::Release);
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, done)) => {
                wal_frames.store(log.saturating_sub(done).max(0) as u64, Ordering::Relaxed)
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
}

fn apply_job(tx: &Transaction<'_>, job: &WriteJob) -> Result<bool, StoreError> {
    match &job.op {
        WriteOp::Commit(e) => apply_commit(tx, e).map(|_| true),
        WriteOp::Delete(id, before) => apply_delete(tx, id, *before),
        WriteOp::Checkpoint => Ok(true),
        WriteOp::Trim(session, version, plan) => apply_trim(tx, session, *version, plan),
        WriteOp::Shared(w) => apply_shared(tx, w),
        WriteOp::Sql(f) => f(tx),
    }
}

/// The same failure for every job of a batch.
fn fail_all(batch: &[WriteJob], reason: &str) -> Vec<Result<bool, StoreError>> {
    batch
        .iter()
        .map(|_| Err(StoreError::Database(reason.to_string())))
        .collect()
}

/// Applies a batch in one transaction. Fast path: no savepoints — a job that
/// fails before changing anything (a version conflict is detected by the
/// first statement) is simply reported. Only if a job fails after changing
/// rows is the transaction rolled back and the batch redone with one
/// savepoint per job.
fn apply_batch(conn: &mut Connection, batch: &[WriteJob]) -> Vec<Result<bool, StoreError>> {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let mut results = Vec::with_capacity(batch.len());
    let mut dirty_failure = false;
    for job in batch {
        let before = tx.total_changes();
        let r = apply_job(&tx, job);
        if r.is_err() && tx.is_autocommit() {
            // SQLite rolled the whole transaction back by itself (I/O error,
            // disk full): nothing of this batch is applied; run no more of it.
            let reason = r.err().map(|e| e.to_string()).unwrap_or_default();
            return fail_all(batch, &format!("batch rolled back: {reason}"));
        }
        if r.is_err() && tx.total_changes() != before {
            dirty_failure = true;
            break;
        }
        results.push(r);
    }
    if !dirty_failure {
        return match tx.commit() {
            Ok(()) => results,
            Err(e) => fail_all(batch, &e.to_string()),
        };
    }
    if let Err(e) = tx.rollback() {
        return fail_all(batch, &e.to_string());
    }
    apply_batch_isolated(conn, batch)
}

/// The slow path: one savepoint per job, so a failing job is undone alone.
fn apply_batch_isolated(
    conn: &mut Connection,
    batch: &[WriteJob],
) -> Vec<Result<bool, StoreError>> {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        if let Err(e) = tx.execute_batch("SAVEPOINT job") {
            results.push(Err(e.into()));
            continue;
        }
        let r = apply_job(&tx, job);
        let end = if r.is_ok() {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        if let Err(e) = tx.execute_batch(end) {
            results.push(Err(e.into()));
            continue;
        }
        results.push(r);
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => fail_all(batch, &e.to_string()),
    }
}

fn json_text(map: &JsonMap) -> String {
    // A map of JSON values always serialises.
    serde_json::to_string(map).unwrap_or_else(|_| "{}".into())
}

fn split(head: Option<MessageId>) -> (Option<i64>, Option<i64>) {
    match head {
        Some(h) => (Some(h.segment), Some(h.seq as i64)),
        None => (None, None),
    }
}

fn apply_commit(tx: &Transaction<'_>, e: &Encoded) -> Result<(), StoreError> {
    let c = &e.commit;
    let r = &c.record;
    let (hs, hq) = split(r.head);
    let now = to_micros(r.updated_at);
    let mut session_key: Option<i64> = None;
    // The first statement decides a version conflict, before anything changed.
    match c.expected_version {
        Some(expected) => {
            let changed = if let Some([profile, preferences, user_data, metadata]) = &e.maps {
                tx.prepare_cached(
                    "UPDATE sessions SET user_id=?1, agents=?2, head_segment=?3, head_seq=?4, \
                     updated_at=?5, interactions=?6, state_version=?7, profile=?8, preferences=?9, \
                     user_data=?10, metadata=?11 WHERE id=?12 AND state_version=?13",
                )?
                .execute(params![
                    r.user_id,
                    e.agents,
                    hs,
                    hq,
                    now,
                    r.interactions as i64,
                    r.state_version as i64,
                    profile,
                    preferences,
                    user_data,
                    metadata,
                    r.id,
                    expected as i64
                ])?
            } else {
                tx.prepare_cached(
                    "UPDATE sessions SET head_segment=?1, head_seq=?2, updated_at=?3, \
                     interactions=?4, state_version=?5 WHERE id=?6 AND state_version=?7",
                )?
                .execute(params![
                    hs,
                    hq,
                    now,
                    r.interactions as i64,
                    r.state_version as i64,
                    r.id,
                    expected as i64
                ])?
            };
            if changed != 1 {
                let found: Option<i64> = tx
                    .prepare_cached("SELECT state_version FROM sessions WHERE id=?1")?
                    .query_row([&r.id], |row| row.get(0))
                    .optional()?;
                check_version(c, found.map(|v| v as u64))?;
                return Err(StoreError::Database(format!(
                    "session '{}' update matched no row",
                    r.id
                )));
            }
        }
        None => {
            let exists: Option<i64> = tx
                .prepare_cached("SELECT state_version FROM sessions WHERE id=?1")?
                .query_row([&r.id], |row| row.get(0))
                .optional()?;
            check_version(c, exists.map(|v| v as u64))?;
            let empty = String::from("{}");
            let [profile, preferences, user_data, metadata] = match &e.maps {
                Some([a, b, c, d]) => [a, b, c, d],
                None => [&empty, &empty, &empty, &empty],
            };
            tx.prepare_cached(
                "INSERT INTO sessions (id, user_id, agents, head_segment, head_seq, created_at, \
                 updated_at, interactions, state_version, profile, preferences, user_data, metadata) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                r.id,
                r.user_id,
                e.agents,
                hs,
                hq,
                to_micros(r.created_at),
                now,
                r.interactions as i64,
                r.state_version as i64,
                profile,
                preferences,
                user_data,
                metadata,
            ])?;
            session_key = Some(tx.last_insert_rowid());
        }
    }
    let mut key = || -> Result<i64, StoreError> {
        if let Some(k) = session_key {
            return Ok(k);
        }
        let k: i64 = tx
            .prepare_cached("SELECT key FROM sessions WHERE id=?1")?
            .query_row([&r.id], |row| row.get(0))?;
        session_key = Some(k);
        Ok(k)
    };
    if let Some(seg) = &c.new_segment {
        let k = key()?;
        let (ps, pq) = split(seg.parent);
        tx.prepare_cached(
            "INSERT INTO segments (id, session_key, parent_segment, parent_seq, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![seg.id, k, ps, pq, to_micros(seg.created_at)])?;
    }
    if !c.messages.is_empty() {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO messages (segment, seq, role, agent, content, created_at, meta) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (m, meta) in c.messages.iter().zip(&e.metas) {
            stmt.execute(params![
                m.id.segment,
                m.id.seq as i64,
                m.role.code() as i64,
                m.agent,
                m.content,
                to_micros(m.created_at),
                meta
            ])?;
        }
    }
    for id in &c.drop_checkpoints {
        let k = key()?;
        tx.prepare_cached("DELETE FROM checkpoints WHERE id=?1 AND session_key=?2")?
            .execute(params![id, k])?;
    }
    for (cp, state) in c.checkpoints.iter().zip(&e.checkpoint_states) {
        let k = key()?;
        let (hs, hq) = split(cp.head);
        tx.prepare_cached(
            "INSERT INTO checkpoints (id, session_key, head_segment, head_seq, label, description, \
             kind, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            cp.id,
            k,
            hs,
            hq,
            cp.label,
            cp.description,
            kind_code(cp.kind),
            state,
            to_micros(cp.created_at)
        ])?;
    }
    Ok(())
}

fn kind_code(k: CheckpointKind) -> i64 {
    match k {
        CheckpointKind::Auto => 0,
        CheckpointKind::Manual => 1,
        CheckpointKind::Version => 2,
        CheckpointKind::Branch => 3,
    }
}

fn kind_from(code: i64) -> Result<CheckpointKind, StoreError> {
    Ok(match code {
        0 => CheckpointKind::Auto,
        1 => CheckpointKind::Manual,
        2 => CheckpointKind::Version,
        3 => CheckpointKind::Branch,
        other => {
            return Err(StoreError::Corrupt(format!(
                "unknown checkpoint kind {other}"
            )))
        }
    })
}

fn apply_delete(
    tx: &Transaction<'_>,
    id: &str,
    updated_before: Option<i64>,
) -> Result<bool, StoreError> {
    let key: Option<i64> = tx
        .prepare_cached("SELECT key FROM sessions WHERE id=?1 AND (?2 IS NULL OR updated_at < ?2)")?
        .query_row(params![id, updated_before], |r| r.get(0))
        .optional()?;
    let Some(key) = key else { return Ok(false) };
    // This session's segments except those another session's history passes
    // through: where other sessions' heads, checkpoints and segments point,
    // and every ancestor of those. Session
    // keys are never reused (AUTOINCREMENT), so a kept segment's owner key
    // can never be mistaken for a later session's.
    const DOOMED: &str = "WITH RECURSIVE keep(id) AS ( \
          SELECT parent_segment FROM segments WHERE session_key != ?1 AND parent_segment IS NOT NULL \
          UNION SELECT head_segment FROM sessions WHERE key != ?1 AND head_segment IS NOT NULL \
          UNION SELECT head_segment FROM checkpoints WHERE session_key != ?1 AND head_segment IS NOT NULL \
          UNION SELECT s.parent_segment FROM segments s JOIN keep k ON s.id = k.id \
          WHERE s.parent_segment IS NOT NULL) \
        SELECT id FROM segments WHERE session_key = ?1 AND id NOT IN keep";
    tx.execute(
        &format!("DELETE FROM messages WHERE segment IN ({DOOMED})"),
        [key],
    )?;
    tx.execute(
        &format!("DELETE FROM segments WHERE id IN ({DOOMED})"),
        [key],
    )?;
    tx.execute("DELETE FROM checkpoints WHERE session_key=?1", [key])?;
    tx.execute("DELETE FROM sessions WHERE key=?1", [key])?;
    Ok(true)
}

fn apply_shared(tx: &Transaction<'_>, w: &SharedWrite) -> Result<bool, StoreError> {
    // A deleted key keeps its row as a tombstone, so versions never go back
    // and a compare-and-set made before a delete can never succeed after it.
    let row: Option<(i64, bool)> = tx
        .prepare_cached("SELECT version, deleted FROM shared WHERE namespace=?1 AND key=?2")?
        .query_row(params![w.namespace, w.key], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0))
        })
        .optional()?;
    let last = row.map_or(0, |r| r.0);
    let exists = row.is_some_and(|r| !r.1);
    if let Some(expected) = w.expected {
        let ok = if exists {
            expected as i64 == last
        } else {
            expected == 0
        };
        if !ok {
            return Err(StoreError::VersionMismatch {
                namespace: w.namespace.clone(),
                key: w.key.clone(),
                expected,
                found: if exists { last as u64 } else { 0 },
            });
        }
    }
    let at = super::now();
    let version = last + 1;
    let value = match &w.value {
        Some(text) => {
            tx.prepare_cached(
                "INSERT INTO shared (namespace, key, value, version, updated_at, deleted) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 0) ON CONFLICT (namespace, key) DO UPDATE SET \
                 value = excluded.value, version = excluded.version, \
                 updated_at = excluded.updated_at, deleted = 0",
            )?
            .execute(params![w.namespace, w.key, text, version, to_micros(at)])?;
            serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
        }
        None => {
            if exists {
                tx.prepare_cached(
                    "UPDATE shared SET value = 'null', version = ?3, updated_at = ?4, deleted = 1 \
                     WHERE namespace = ?1 AND key = ?2",
                )?
                .execute(params![w.namespace, w.key, version, to_micros(at)])?;
            }
            serde_json::Value::Null
        }
    };
    *w.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(SharedEntry {
        namespace: w.namespace.clone(),
        key: w.key.clone(),
        value,
        version: version as u64,
        updated_at: at,
    });
    Ok(true)
}

fn shared_row(row: &rusqlite::Row<'_>) -> Result<SharedEntry, StoreError> {
    let text: String = row.get(2)?;
    Ok(SharedEntry {
        namespace: row.get(0)?,
        key: row.get(1)?,
        value: serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("shared value: {e}")))?,
        version: row.get::<_, i64>(3)? as u64,
        updated_at: from_micros(row.get(4)?),
    })
}

fn apply_trim(
    tx: &Transaction<'_>,
    session: &str,
    expected_version: u64,
    plan: &[(i64, Option<u32>)],
) -> Result<bool, StoreError> {
    let row: Option<(i64, i64)> = tx
        .prepare_cached("SELECT key, state_version FROM sessions WHERE id=?1")?
        .query_row([session], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    // The plan was made from one state of the session: refuse it if another
    // writer has moved the session on since (its new messages are roots the
    // plan did not see).
    if row.map(|r| r.1 as u64) != Some(expected_version) {
        return Err(StoreError::Conflict {
            session: session.into(),
            expected: Some(expected_version),
            found: row.map(|r| r.1 as u64),
        });
    }
    let Some((key, _)) = row else {
        return Ok(false);
    };
    for (seg, keep) in plan {
        let owned: Option<i64> = tx
            .prepare_cached("SELECT 1 FROM segments WHERE id=?1 AND session_key=?2")?
            .query_row(params![seg, key], |r| r.get(0))
            .optional()?;
        if owned.is_none() {
            continue;
        }
        match keep {
            None => {
                tx.execute("DELETE FROM messages WHERE segment=?1", [seg])?;
                tx.execute("DELETE FROM segments WHERE id=?1", [seg])?;
            }
            Some(k) => {
                tx.execute(
                    "DELETE FROM messages WHERE segment=?1 AND seq>?2",
                    params![seg, *k as i64],
                )?;
            }
        }
    }
    Ok(true)
}

fn parse_json_map(text: &str, what: &str, session: &str) -> Result<JsonMap, StoreError> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Corrupt(format!(
            "session '{session}': {what} is not a JSON object: {e}"
        ))
    })
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, RawRecord)> {
    Ok((
        row.get(0)?,
        RawRecord {
            id: row.get(1)?,
            user_id: row.get(2)?,
            agents: row.get(3)?,
            head_segment: row.get(4)?,
            head_seq: row.get(5)?,
            created_at: row.get(6)?,
            updated_at: row.get(7)?,
            interactions: row.get(8)?,
            state_version: row.get(9)?,
            profile: row.get(10)?,
            preferences: row.get(11)?,
            user_data: row.get(12)?,
            metadata: row.get(13)?,
        },
    ))
}

const PATH_SQL: &str = "SELECT seq, role, agent, content, created_at, meta FROM messages \
    WHERE segment=?1 AND seq<=?2 ORDER BY seq DESC LIMIT ?3";
const TIP_SQL: &str = "SELECT MAX(seq) FROM messages WHERE segment=?1";
const SEGMENT_SQL: &str =
    "SELECT session_key, parent_segment, parent_seq FROM segments WHERE id=?1";
const SESSION_SQL: &str = "SELECT key, id, user_id, agents, head_segment, head_seq, created_at, \
    updated_at, interactions, state_version, profile, preferences, user_data, metadata \
    FROM sessions WHERE id=?1";

/// Loads the schema and prepares the hot statements on a fresh reader
/// connection, so the first session opened after start-up does not pay for it.
fn warm_up(conn: &Connection) {
    for sql in [PATH_SQL, TIP_SQL, SEGMENT_SQL, SESSION_SQL] {
        if let Err(e) = conn.prepare_cached(sql) {
            tracing::warn!(error = %e, "cannot prepare a store statement");
        }
    }
}

const RUN_SQL: &str =
    "SELECT id, pipeline, path, inputs, session_id, status, created_at, updated_at FROM runs";

fn run_row(row: &rusqlite::Row<'_>) -> Result<RunRecord, StoreError> {
    let inputs: String = row.get(3)?;
    let status: String = row.get(5)?;
    Ok(RunRecord {
        id: row.get(0)?,
        pipeline: row.get(1)?,
        path: row.get(2)?,
        inputs: serde_json::from_str(&inputs)
            .map_err(|e| StoreError::Corrupt(format!("run inputs: {e}")))?,
        session_id: row.get(4)?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status '{status}'")))?,
        created_at: from_micros(row.get(6)?),
        updated_at: from_micros(row.get(7)?),
    })
}

const CHECKPOINT_SQL: &str = "SELECT c.id, c.head_segment, c.head_seq, c.label, c.description, \
    c.kind, c.state, c.created_at, s.id FROM checkpoints c JOIN sessions s ON s.key = c.session_key";

fn checkpoint_row(row: &rusqlite::Row<'_>) -> Result<CheckpointRecord, StoreError> {
    let hs: Option<i64> = row.get(1)?;
    let hq: Option<i64> = row.get(2)?;
    let state: String = row.get(6)?;
    Ok(CheckpointRecord {
        id: row.get(0)?,
        session_id: row.get(8)?,
        head: hs.zip(hq).map(|(segment, seq)| MessageId {
            segment,
            seq: seq as u32,
        }),
        label: row.get(3)?,
        description: row.get(4)?,
        kind: kind_from(row.get(5)?)?,
        state: serde_json::from_str(&state)
            .map_err(|e| StoreError::Corrupt(format!("checkpoint state: {e}")))?,
        created_at: from_micros(row.get(7)?),
    })
}

const RECORD_COLUMNS: &str = "key, id, user_id, agents, head_segment, head_seq, created_at, \
    updated_at, interactions, state_version, profile, preferences, user_data, metadata";

struct RawRecord {
    id: String,
    user_id: Option<String>,
    agents: String,
    head_segment: Option<i64>,
    head_seq: Option<i64>,
    created_at: i64,
    updated_at: i64,
    interactions: i64,
    state_version: i64,
    profile: String,
    preferences: String,
    user_data: String,
    metadata: String,
}

impl RawRecord {
    fn decode(self) -> Result<SessionRecord, StoreError> {
        let agents = serde_json::from_str(&self.agents)
            .map_err(|e| StoreError::Corrupt(format!("session '{}': agents list: {e}", self.id)))?;
        let head = match (self.head_segment, self.head_seq) {
            (Some(segment), Some(seq)) => Some(MessageId {
                segment,
                seq: seq as u32,
            }),
            _ => None,
        };
        Ok(SessionRecord {
            profile: parse_json_map(&self.profile, "profile", &self.id)?,
            preferences: parse_json_map(&self.preferences, "preferences", &self.id)?,
            user_data: parse_json_map(&self.user_data, "user data", &self.id)?,
            metadata: parse_json_map(&self.metadata, "metadata", &self.id)?,
            id: self.id,
            user_id: self.user_id,
            agents,
            head,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
            interactions: self.interactions as u64,
            state_version: self.state_version as u64,
        })
    }
}

/// The segment's owner and the message it branches from.
fn segment_meta(conn: &Connection, seg: i64) -> Result<(i64, Option<MessageId>), StoreError> {
    let row: Option<(i64, Option<i64>, Option<i64>)> = conn
        .prepare_cached(SEGMENT_SQL)?
        .query_row([seg], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (owner, ps, pq) =
        row.ok_or_else(|| StoreError::Corrupt(format!("segment {seg:x} is missing")))?;
    let parent = match (ps, pq) {
        (Some(segment), Some(seq)) => Some(MessageId {
            segment,
            seq: seq as u32,
        }),
        _ => None,
    };
    Ok((owner, parent))
}

/// The last `limit` messages of the path from the root to `head`.
fn read_path(
    conn: &Connection,
    head: MessageId,
    limit: Option<usize>,
) -> Result<Vec<Message>, StoreError> {
    let mut out: Vec<Message> = Vec::new();
    let mut cur = Some(head);
    let mut stmt = conn.prepare_cached(PATH_SQL)?;
    while let Some(at) = cur {
        let want = match limit {
            Some(l) if out.len() >= l => break,
            Some(l) => (l - out.len()) as i64,
            None => -1,
        };
        let (_, seg_parent) = segment_meta(conn, at.segment)?;
        let mut rows = stmt.query(params![at.segment, at.seq as i64, want])?;
        let mut expected = at.seq as i64;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            if seq != expected {
                return Err(StoreError::Corrupt(format!(
                    "message {:x}.{expected} is missing",
                    at.segment
                )));
            }
            expected -= 1;
            let role_code: i64 = row.get(1)?;
            let role = Role::from_code(role_code as u8)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown role code {role_code}")))?;
            let meta: Option<String> = row.get(5)?;
            let meta = match meta {
                Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                    StoreError::Corrupt(format!("message {:x}.{seq} meta: {e}", at.segment))
                })?),
                None => None,
            };
            let id = MessageId {
                segment: at.segment,
                seq: seq as u32,
            };
            out.push(Message {
                id,
                parent: id.prev_in_segment().or(seg_parent),
                role,
                agent: row.get(2)?,
                content: row.get(3)?,
                created_at: from_micros(row.get(4)?),
                meta,
            });
        }
        if expected >= 0 && limit.is_none_or(|l| out.len() < l) {
            return Err(StoreError::Corrupt(format!(
                "message {:x}.{expected} is missing",
                at.segment
            )));
        }
        cur = seg_parent;
    }
    out.reverse();
    Ok(out)
}

fn read_session(
    conn: &Connection,
    id: &str,
    recent: usize,
) -> Result<Option<LoadedSession>, StoreError> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM sessions WHERE id=?1"
        ))?
        .query_row([id], row_to_record)
        .optional()?;
    let Some((key, raw)) = row else {
        return Ok(None);
    };
    let record = raw.decode()?;
    let (recent, can_append) = match record.head {
        None => (Vec::new(), false),
        Some(head) => {
            let recent = if recent > 0 {
                read_path(conn, head, Some(recent))?
            } else {
                Vec::new()
            };
            let (owner, _) = segment_meta(conn, head.segment)?;
            let tip: Option<i64> = conn
                .prepare_cached(TIP_SQL)?
                .query_row([head.segment], |r| r.get(0))?;
            (recent, owner == key && tip == Some(head.seq as i64))
        }
    };
    Ok(Some(LoadedSession {
        record,
        recent,
        can_append,
    }))
}

#[async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn load_session(
        &self,
        id: &str,
        recent: usize,
    ) -> Result<Option<LoadedSession>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| read_session(conn, &id, recent)).await
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let encoded = Encoded::new(commit)?;
        self.write(WriteOp::Commit(Box::new(encoded)))
            .await
            .map(|_| ())
    }

    async fn history(
        &self,
        head: MessageId,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, StoreError> {
        self.read(move |conn| read_path(conn, head, limit)).await
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionSummary>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM sessions \
                 WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR updated_at < ?2) \
                 ORDER BY updated_at DESC, id LIMIT ?3"
            ))?;
            let limit = filter.limit.map_or(-1, |l| l as i64);
            let rows = stmt.query_map(
                params![filter.user_id, filter.updated_before.map(to_micros), limit],
                row_to_record,
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (_, raw) = row?;
                out.push(SessionSummary::from(&raw.decode()?));
            }
            Ok(out)
        })
        .await
    }

    async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        self.write(WriteOp::Delete(
            id.to_owned(),
            updated_before.map(to_micros),
        ))
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.write(WriteOp::Checkpoint).await.map(|_| ())
    }

    async fn list_checkpoints(
        &self,
        session_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        let session_id = session_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{CHECKPOINT_SQL} WHERE s.id = ?1 ORDER BY c.created_at, c.id"
            ))?;
            let mut rows = stmt.query([&session_id])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(checkpoint_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!("{CHECKPOINT_SQL} WHERE c.id = ?1"))?;
            let mut rows = stmt.query([&id])?;
            match rows.next()? {
                Some(row) => Ok(Some(checkpoint_row(row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn shared_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        let (ns, key) = (namespace.to_owned(), key.to_owned());
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT namespace, key, value, version, updated_at FROM shared \
                 WHERE namespace=?1 AND key=?2 AND deleted = 0",
            )?;
            let mut rows = stmt.query(params![ns, key])?;
            match rows.next()? {
                Some(row) => Ok(Some(shared_row(row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn shared_put(
        &self,
        namespace: &str,
        key: &str,
        value: Option<serde_json::Value>,
        expected_version: Option<u64>,
    ) -> Result<SharedEntry, StoreError> {
        let out = Arc::new(Mutex::new(None));
        self.write(WriteOp::Shared(Box::new(SharedWrite {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            value: value.map(|v| v.to_string()),
            expected: expected_version,
            out: out.clone(),
        })))
        .await?;
        let entry = out.lock().unwrap_or_else(|p| p.into_inner()).take();
        entry.ok_or_else(|| StoreError::Database("shared write left no entry".into()))
    }

    async fn shared_list(
        &self,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<SharedEntry>, StoreError> {
        let (ns, prefix) = (namespace.to_owned(), prefix.to_owned());
        self.read(move |conn| {
            // Range scan on the primary key: keys >= prefix, stopping at the first that does not match.
            let mut stmt = conn.prepare_cached(
                "SELECT namespace, key, value, version, updated_at FROM shared \
                 WHERE namespace=?1 AND key>=?2 AND deleted = 0 ORDER BY key",
            )?;
            let mut rows = stmt.query(params![ns, prefix])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let e = shared_row(row)?;
                if !e.key.starts_with(&prefix) {
                    break;
                }
                out.push(e);
            }
            Ok(out)
        })
        .await
    }

    async fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let r = run.clone();
        let inputs = serde_json::to_string(&r.inputs).unwrap_or_else(|_| "{}".into());
        self.write(WriteOp::Sql(Box::new(move |tx: &Transaction<'_>| {
            tx.prepare_cached(
                "INSERT INTO runs (id, pipeline, path, inputs, session_id, status, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO UPDATE SET \
                 pipeline = excluded.pipeline, path = excluded.path, inputs = excluded.inputs, \
                 session_id = excluded.session_id, status = excluded.status, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at",
            )?
            .execute(params![
                r.id,
                r.pipeline,
                r.path,
                inputs,
                r.session_id,
                r.status.as_str(),
                to_micros(r.created_at),
                to_micros(r.updated_at)
            ])?;
            Ok(true)
        })))
        .await
        .map(|_| ())
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!("{RUN_SQL} WHERE id = ?1"))?;
            let mut rows = stmt.query([&id])?;
            match rows.next()? {
                Some(row) => Ok(Some(run_row(row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("{RUN_SQL} ORDER BY created_at DESC, id LIMIT ?1"))?;
            let mut rows = stmt.query([limit as i64])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(run_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_task_result(&self, result: &TaskResult) -> Result<(), StoreError> {
        let r = result.clone();
        self.write(WriteOp::Sql(Box::new(move |tx: &Transaction<'_>| {
            tx.prepare_cached(
                "INSERT INTO task_results (run_id, task_id, status, output, attempts, error, started_at, finished_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (run_id, task_id) DO UPDATE SET \
                 status = excluded.status, output = excluded.output, attempts = excluded.attempts, \
                 error = excluded.error, started_at = excluded.started_at, finished_at = excluded.finished_at",
            )?
            .execute(params![
                r.run_id,
                r.task_id,
                r.status.as_str(),
                r.output,
                r.attempts as i64,
                r.error,
                r.started_at.map(to_micros),
                r.finished_at.map(to_micros)
            ])?;
            Ok(true)
        })))
        .await
        .map(|_| ())
    }

    async fn task_results(&self, run_id: &str) -> Result<Vec<TaskResult>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT run_id, task_id, status, output, attempts, error, started_at, finished_at \
                 FROM task_results WHERE run_id = ?1 ORDER BY task_id",
            )?;
            let mut rows = stmt.query([&run_id])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let status: String = row.get(2)?;
                out.push(TaskResult {
                    run_id: row.get(0)?,
                    task_id: row.get(1)?,
                    status: RunStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("task status '{status}'")))?,
                    output: row.get(3)?,
                    attempts: row.get::<_, i64>(4)? as u32,
                    error: row.get(5)?,
                    started_at: row.get::<_, Option<i64>>(6)?.map(from_micros),
                    finished_at: row.get::<_, Option<i64>>(7)?.map(from_micros),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn external_refs(&self, session_id: &str) -> Result<Vec<MessageId>, StoreError> {
        let session_id = session_id.to_owned();
        self.read(move |conn| {
            // Positions inside this session's segments referred to by other
            // sessions' heads, checkpoints and segments.
            let mut stmt = conn.prepare_cached(
                "WITH me AS (SELECT key FROM sessions WHERE id = ?1), \
                 own AS (SELECT g.id FROM segments g, me WHERE g.session_key = me.key) \
                 SELECT s.head_segment, s.head_seq FROM sessions s, me \
                   WHERE s.key != me.key AND s.head_segment IN (SELECT id FROM own) \
                 UNION SELECT c.head_segment, c.head_seq FROM checkpoints c, me \
                   WHERE c.session_key != me.key AND c.head_segment IN (SELECT id FROM own) \
                 UNION SELECT g.parent_segment, g.parent_seq FROM segments g, me \
                   WHERE g.session_key != me.key AND g.parent_segment IN (SELECT id FROM own)",
            )?;
            let rows = stmt.query_map([&session_id], |r| {
                Ok(MessageId {
                    segment: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u32,
                })
            })?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r?);
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn trim_segments(
        &self,
        session_id: &str,
        expected_version: u64,
        plan: Vec<(SegmentId, Option<u32>)>,
    ) -> Result<u64, StoreError> {
        // Counted first: the session's actor runs collection atomically, so
        // nothing changes these segments in between.
        let before: u64 = {
            let plan2 = plan.clone();
            self.read(move |conn| {
                let mut n = 0u64;
                for (seg, keep) in plan2 {
                    let c: i64 = conn.query_row(
                        "SELECT COUNT(*) FROM messages WHERE segment=?1 AND seq>?2",
                        params![seg, keep.map_or(-1, |k| k as i64)],
                        |r| r.get(0),
                    )?;
                    n += c as u64;
                }
                Ok(n)
            })
            .await?
        };
        self.write(WriteOp::Trim(session_id.to_owned(), expected_version, plan))
            .await?;
        Ok(before)
    }

    async fn list_segments(&self, session_id: &str) -> Result<Vec<SegmentInfo>, StoreError> {
        let session_id = session_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT g.id, g.parent_segment, g.parent_seq, g.created_at, \
                 (SELECT m.seq FROM messages m WHERE m.segment = g.id ORDER BY m.seq DESC LIMIT 1), \
                 (SELECT m.created_at FROM messages m WHERE m.segment = g.id ORDER BY m.seq DESC LIMIT 1) \
                 FROM segments g JOIN sessions s ON s.key = g.session_key WHERE s.id = ?1 \
                 ORDER BY g.created_at, g.id",
            )?;
            let mut rows = stmt.query([&session_id])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let ps: Option<i64> = row.get(1)?;
                let pq: Option<i64> = row.get(2)?;
                let tip_seq: Option<i64> = row.get(4)?;
                let tip_at: Option<i64> = row.get(5)?;
                out.push(SegmentInfo {
                    id,
                    parent: ps.zip(pq).map(|(segment, seq)| MessageId {
                        segment,
                        seq: seq as u32,
                    }),
                    created_at: from_micros(row.get(3)?),
                    tip: tip_seq.zip(tip_at).map(|(seq, at)| {
                        (
                            MessageId {
                                segment: id,
                                seq: seq as u32,
                            },
                            from_micros(at),
                        )
                    }),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn memory_put(
        &self,
        item: &MemoryItem,
        max_per_user: usize,
    ) -> Result<MemoryWrite, StoreError> {
        let item = item.clone();
        let max = max_per_user.max(1) as i64;
        let out = Arc::new(Mutex::new(MemoryWrite::default()));
        let out2 = out.clone();
        self.write(WriteOp::Sql(Box::new(move |tx: &Transaction<'_>| {
            let w = apply_memory_put(tx, &item, max)?;
            *out2.lock().unwrap_or_else(|p| p.into_inner()) = w;
            Ok(true)
        })))
        .await?;
        let w = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(w)
    }

    async fn memory_list(
        &self,
        user_id: &str,
        include_superseded: bool,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        let user = user_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {MEMORY_COLUMNS} FROM memories m WHERE m.user_id = ?1 \
                 AND (?2 OR m.active = 1) ORDER BY m.created_at, m.key"
            ))?;
            let mut rows = stmt.query(params![user, include_superseded])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(memory_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn memory_top(&self, user_id: &str, limit: usize) -> Result<Vec<MemoryItem>, StoreError> {
        let user = user_id.to_owned();
        self.read(move |conn| read_top(conn, &user, limit)).await
    }

    async fn memory_search(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryHit>, StoreError> {
        let user = user_id.to_owned();
        let query = query.to_owned();
        self.read(move |conn| read_search(conn, &user, &query, limit))
            .await
    }

    async fn memory_recall(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        let user = user_id.to_owned();
        let query = query.to_owned();
        // One reader job: the search, then the best to fill up.
        self.read(move |conn| {
            let mut out: Vec<MemoryItem> = read_search(conn, &user, &query, limit)?
                .into_iter()
                .map(|h| h.item)
                .collect();
            if out.len() < limit {
                for m in read_top(conn, &user, limit)? {
                    if out.len() >= limit {
                        break;
                    }
                    if !out.iter().any(|o| o.id == m.id) {
                        out.push(m);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn memory_mark_used(&self, ids: &[String], at: DateTime<Utc>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        let at = to_micros(at);
        self.write(WriteOp::Sql(Box::new(move |tx: &Transaction<'_>| {
            let mut stmt = tx.prepare_cached(
                "UPDATE memories SET uses = uses + 1, last_used = ?2 WHERE id = ?1",
            )?;
            for id in &ids {
                stmt.execute(params![id, at])?;
            }
            Ok(true)
        })))
        .await
        .map(|_| ())
    }

    async fn forget_user(&self, user_id: &str) -> Result<u64, StoreError> {
        let user = user_id.to_owned();
        let out = Arc::new(AtomicU64::new(0));
        let out2 = out.clone();
        self.write(WriteOp::Sql(Box::new(move |tx: &Transaction<'_>| {
            // The delete trigger takes each row out of the FTS index too.
            let n = tx.execute("DELETE FROM memories WHERE user_id = ?1", [&user])?;
            tx.execute("DELETE FROM users WHERE user_id = ?1", [&user])?;
            out2.store(n as u64, Ordering::Relaxed);
            Ok(true)
        })))
        .await?;
        Ok(out.load(Ordering::Relaxed))
    }

    async fn user_get(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        let user = user_id.to_owned();
        self.read(move |conn| read_user(conn, &user)).await
    }

    async fn user_update(
        &self,
        user_id: &str,
        profile: &JsonMap,
        preferences: &JsonMap,
    ) -> Result<UserRecord, StoreError> {
        let user = user_id.to_owned();
        let (profile, preferences) = (profile.clone(), preferences.clone());
        let out = Arc::new(Mutex::new(None));
        let out2 = out.clone();
        self.write(WriteOp::Sql(Box::new(move |tx: &Transaction<'_>| {
            let mut rec = read_user(tx, &user)?.unwrap_or_else(|| UserRecord {
                user_id: user.clone(),
                ..Default::default()
            });
            for (k, v) in &profile {
                rec.profile.insert(k.clone(), v.clone());
            }
            for (k, v) in &preferences {
                rec.preferences.insert(k.clone(), v.clone());
            }
            rec.updated_at = super::now();
            tx.prepare_cached(
                "INSERT INTO users (user_id, profile, preferences, memories, updated_at) \
                 VALUES (?1, ?2, ?3, 0, ?4) ON CONFLICT (user_id) DO UPDATE SET \
                 profile = excluded.profile, preferences = excluded.preferences, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![
                user,
                json_text(&rec.profile),
                json_text(&rec.preferences),
                to_micros(rec.updated_at)
            ])?;
            *out2.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec);
            Ok(true)
        })))
        .await?;
        let rec = out.lock().unwrap_or_else(|p| p.into_inner()).take();
        rec.ok_or_else(|| StoreError::Database("user update left no record".into()))
    }
}

const MEMORY_COLUMNS: &str = "m.id, m.user_id, m.content, m.kind, m.subject, m.relevance, \
    m.importance, m.score, m.created_at, m.last_used, m.uses, m.superseded_by, m.session_id";

fn memory_row(row: &rusqlite::Row<'_>) -> Result<MemoryItem, StoreError> {
    let kind: String = row.get(3)?;
    Ok(MemoryItem {
        id: row.get(0)?,
        user_id: row.get(1)?,
        content: row.get(2)?,
        kind: MemoryKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("memory kind '{kind}'")))?,
        subject: row.get(4)?,
        relevance: row.get(5)?,
        importance: row.get(6)?,
        score: row.get(7)?,
        created_at: from_micros(row.get(8)?),
        last_used: row.get::<_, Option<i64>>(9)?.map(from_micros),
        uses: row.get::<_, i64>(10)? as u64,
        superseded_by: row.get(11)?,
        session_id: row.get(12)?,
    })
}

fn read_top(conn: &Connection, user: &str, limit: usize) -> Result<Vec<MemoryItem>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MEMORY_COLUMNS} FROM memories m WHERE m.user_id = ?1 AND m.active = 1 \
         ORDER BY m.score DESC, m.created_at DESC LIMIT ?2"
    ))?;
    let mut rows = stmt.query(params![user, limit as i64])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(memory_row(row)?);
    }
    Ok(out)
}

/// Matching memories considered per search: the user's newest active ones.
const SEARCH_CANDIDATES: i64 = 256;

/// When a search is scoped by the owner token: while `mine² ≤ OWNER_SCOPE ×
/// all` (`mine` = the user's memories, `all` ≈ every user's). FTS5 walks a
/// doclist newest first without its skip index, so the owner token costs a
/// scan of the user's whole posting list (about 0.07 µs a memory); without
/// it, finding [`SEARCH_CANDIDATES`] of the user's matches walks about
/// `SEARCH_CANDIDATES × all / mine` matches of every user (about 3 µs each,
/// with the join). The two meet near `mine² = 10,000 × all`: a user holding
/// most of the memories (the 100,000 of `troupe bench --scenario memory`)
/// is served without the token, a user among many others' memories with it.
const OWNER_SCOPE: i64 = 10_000;

/// Whether [`read_search`] scopes its FTS query with the user's owner token
/// (see [`OWNER_SCOPE`]). Two primary-key reads: the user's count, kept in
/// `users`, and the largest key as the number of memories (keys grow; gaps
/// left by deletions only make it larger).
fn owner_scoped(conn: &Connection, user: &str) -> Result<bool, StoreError> {
    let mine: i64 = conn
        .prepare_cached("SELECT memories FROM users WHERE user_id = ?1")?
        .query_row([user], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let all: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(key), 0) FROM memories")?
        .query_row([], |r| r.get(0))?;
    Ok(mine.max(0).saturating_mul(mine.max(0)) <= OWNER_SCOPE.saturating_mul(all))
}

/// Full-text search in two steps, so the cost does not grow with how many
/// memories match: (1) the user's newest active memories containing any
/// term — FTS5 walks its matches newest first (no ranking), skipping other
/// users' and superseded ones, and stops at [`SEARCH_CANDIDATES`]; (2) BM25
/// of those candidates (`bm25()` over the matches from the oldest candidate
/// on), best first. Unless the user holds most of the memories, the FTS
/// query is scoped by the user's owner token (see [`OWNER_SCOPE`]), so its
/// cost depends on the user's own matches, not on other users'.
fn read_search(
    conn: &Connection,
    user: &str,
    query: &str,
    limit: usize,
) -> Result<Vec<MemoryHit>, StoreError> {
    let terms = crate::memory::search_terms(query);
    if terms.is_empty() || limit == 0 {
        return Ok(Vec::new());
    }
    let scoped = owner_scoped(conn, user)?;
    search_scoped(conn, user, &terms, limit, scoped)
}

/// [`read_search`] with the choice of scoping made.
fn search_scoped(
    conn: &Connection,
    user: &str,
    terms: &[String],
    limit: usize,
    scoped: bool,
) -> Result<Vec<MemoryHit>, StoreError> {
    // `owner : <token> AND content : (t1 OR t2 …)`: FTS5 intersects the
    // user's postings with the terms'. The `user_id` check below stays as the
    // guarantee of isolation; the token only narrows the walk. The terms are
    // confined to `content`, so a term never matches an owner token.
    let fts: Vec<String> = terms.iter().map(|t| format!("\"{t}\"")).collect();
    let fts = format!("content : ({})", fts.join(" OR "));
    let fts = if scoped {
        format!("owner : \"{}\" AND {fts}", owner_token(user))
    } else {
        fts
    };
    let candidates: std::collections::HashSet<i64> = {
        let mut stmt = conn.prepare_cached(
            "SELECT f.rowid FROM memories_fts f CROSS JOIN memories m ON m.key = f.rowid \
             WHERE memories_fts MATCH ?1 AND m.user_id = ?2 AND m.active = 1 \
             ORDER BY f.rowid DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![fts, user, SEARCH_CANDIDATES], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let Some(oldest) = candidates.iter().min().copied() else {
        return Ok(Vec::new());
    };
    let mut ranked: Vec<(i64, f64)> = Vec::with_capacity(candidates.len());
    {
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, bm25(memories_fts, 1.0, 0.0) FROM memories_fts \
             WHERE memories_fts MATCH ?1 AND rowid >= ?2",
        )?;
        let mut rows = stmt.query(params![fts, oldest])?;
        while let Some(row) = rows.next()? {
            let key: i64 = row.get(0)?;
            if candidates.contains(&key) {
                ranked.push((key, row.get(1)?));
            }
        }
    }
    // bm25() is lower for better matches; ties: newest first.
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    ranked.truncate(limit);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MEMORY_COLUMNS} FROM memories m WHERE m.key = ?1"
    ))?;
    let mut out = Vec::with_capacity(ranked.len());
    for (key, rank) in ranked {
        let mut rows = stmt.query([key])?;
        if let Some(row) = rows.next()? {
            out.push(MemoryHit {
                item: memory_row(row)?,
                rank: -rank,
            });
        }
    }
    Ok(out)
}

fn read_user(conn: &Connection, user: &str) -> Result<Option<UserRecord>, StoreError> {
    let row: Option<(String, String, i64, i64)> = conn
        .prepare_cached(
            "SELECT profile, preferences, memories, updated_at FROM users WHERE user_id = ?1",
        )?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((profile, preferences, memories, updated_at)) = row else {
        return Ok(None);
    };
    let map = |text: &str, what: &str| -> Result<JsonMap, StoreError> {
        serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("user '{user}': {what}: {e}")))
    };
    Ok(Some(UserRecord {
        user_id: user.to_string(),
        profile: map(&profile, "profile")?,
        preferences: map(&preferences, "preferences")?,
        memories: memories.max(0) as u64,
        updated_at: from_micros(updated_at),
    }))
}

/// One memory write (see [`Store::memory_put`]), inside the writer's transaction.
fn apply_memory_put(
    tx: &Transaction<'_>,
    item: &MemoryItem,
    max: i64,
) -> Result<MemoryWrite, StoreError> {
    let mut out = MemoryWrite::default();
    if let Some(subject) = &item.subject {
        let same: Vec<(String, String)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT id, content FROM memories WHERE user_id = ?1 AND subject = ?2 \
                 AND kind = ?3 AND active = 1",
            )?;
            let rows = stmt.query_map(params![item.user_id, subject, item.kind.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let lower = item.content.to_lowercase();
        if let Some((id, _)) = same.iter().find(|(_, c)| c.to_lowercase() == lower) {
            out.duplicate_of = Some(id.clone());
            return Ok(out);
        }
        let mut stmt =
            tx.prepare_cached("UPDATE memories SET active = 0, superseded_by = ?2 WHERE id = ?1")?;
        for (id, _) in same {
            stmt.execute(params![id, item.id])?;
            out.superseded.push(id);
        }
    } else {
        // Without a subject nothing is superseded, but the same text again
        // (ignoring case) is still a duplicate: one lookup in the index of
        // folded texts (schema v6; folded in Rust, since SQLite's lower()
        // folds only ASCII).
        let existing: Option<String> = tx
            .prepare_cached(
                "SELECT id FROM memories WHERE user_id = ?1 AND folded = ?2 \
                 AND subject IS NULL AND active = 1 AND kind = ?3 LIMIT 1",
            )?
            .query_row(
                params![
                    item.user_id,
                    item.content.to_lowercase(),
                    item.kind.as_str()
                ],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            out.duplicate_of = Some(id);
            return Ok(out);
        }
    }
    tx.prepare_cached(
        "INSERT INTO memories (id, user_id, content, kind, subject, relevance, \
         importance, score, created_at, last_used, uses, active, superseded_by, session_id, \
         owner, folded) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1, NULL, ?12, ?13, ?14)",
    )?
    .execute(params![
        item.id,
        item.user_id,
        item.content,
        item.kind.as_str(),
        item.subject,
        item.relevance,
        item.importance,
        item.score,
        to_micros(item.created_at),
        item.last_used.map(to_micros),
        item.uses as i64,
        item.session_id,
        owner_token(&item.user_id),
        item.subject.is_none().then(|| item.content.to_lowercase()),
    ])?;
    // The per-user count, so the limit is checked without counting rows.
    let count: i64 = tx
        .prepare_cached(
            "INSERT INTO users (user_id, profile, preferences, memories, updated_at) \
             VALUES (?1, '{}', '{}', 1, ?2) ON CONFLICT (user_id) DO UPDATE SET \
             memories = memories + 1 RETURNING memories",
        )?
        .query_row(params![item.user_id, to_micros(super::now())], |r| r.get(0))?;
    if count > max {
        let doomed: Vec<(i64, String)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT key, id FROM memories WHERE user_id = ?1 \
                 ORDER BY active, score, created_at, key LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![item.user_id, count - max], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut del = tx.prepare_cached("DELETE FROM memories WHERE key = ?1")?;
        for (key, id) in doomed {
            del.execute([key])?;
            out.evicted.push(id);
        }
        tx.prepare_cached("UPDATE users SET memories = memories - ?2 WHERE user_id = ?1")?
            .execute(params![item.user_id, out.evicted.len() as i64])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `porter unicode61` makes of `text`: its tokens, in order.
    fn tokens(conn: &Connection, text: &str) -> Vec<String> {
        conn.execute_batch(
            "CREATE VIRTUAL TABLE IF NOT EXISTS t USING fts5(x, tokenize='porter unicode61');
             CREATE VIRTUAL TABLE IF NOT EXISTS t_vocab USING fts5vocab(t, 'instance');
             DELETE FROM t;",
        )
        .unwrap();
        conn.execute("INSERT INTO t(x) VALUES (?1)", [text])
            .unwrap();
        let mut stmt = conn
            .prepare("SELECT term FROM t_vocab ORDER BY offset")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn an_owner_token_is_one_unstemmed_token() {
        assert_eq!(owner_token(""), "u");
        assert_eq!(owner_token("ab"), "u097098");
        assert_eq!(owner_token("é"), "u195169");
        let conn = Connection::open_in_memory().unwrap();
        for user in [
            "alice",
            "bench-user-1k",
            "Zoë Ünal",
            "a b\tc",
            "users",
            "running",
            "名前",
            "x\"y OR z",
        ] {
            let token = owner_token(user);
            assert_eq!(tokens(&conn, &token), vec![token.clone()], "{user:?}");
        }
        assert_ne!(owner_token("ab"), owner_token("a\u{0}b"));
    }

    /// A schema v4 database (built by hand with the released migrations)
    /// opens as v5, its owner column is filled with the same token the
    /// insert path computes, and its old memories are searchable beside new
    /// ones.
    #[tokio::test]
    async fn a_v4_database_migrates_to_v5_and_stays_searchable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        let users = ["alice", "Zoë Ünal", "名前", ""];
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                .unwrap();
            for (i, sql) in MIGRATIONS[..4].iter().enumerate() {
                conn.execute_batch(sql).unwrap();
                conn.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [i as i64 + 1],
                )
                .unwrap();
            }
            for (n, user) in users.iter().enumerate() {
                for i in 0..3 {
                    conn.execute(
                        "INSERT INTO memories (id, user_id, content, kind, relevance, \
                         importance, score, created_at) VALUES (?1, ?2, ?3, 'note', 0.5, 0.5, \
                         0.5, ?4)",
                        params![
                            format!("old-{n}-{i}"),
                            user,
                            format!("User likes python number{i}"),
                            i as i64
                        ],
                    )
                    .unwrap();
                }
            }
        }
        let store = SqliteStore::open(&path, SyncMode::Normal).unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            let v: i64 = conn
                .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, MIGRATIONS.len() as i64);
            assert_eq!(v, 6);
            for user in users {
                let owners: Vec<String> = conn
                    .prepare("SELECT DISTINCT owner FROM memories WHERE user_id = ?1")
                    .unwrap()
                    .query_map([user], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(owners, vec![owner_token(user)], "{user:?}");
            }
            conn.execute(
                "INSERT INTO memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)",
                [],
            )
            .unwrap();
        }
        for (n, user) in users.iter().enumerate() {
            // Old memories: found, only the user's own.
            let hits = store.memory_search(user, "python", 10).await.unwrap();
            assert_eq!(hits.len(), 3, "{user:?}: {hits:?}");
            assert!(hits.iter().all(|h| h.item.user_id == *user));
            let hits = store.memory_search(user, "number1", 10).await.unwrap();
            assert_eq!(hits.len(), 1, "{user:?}: {hits:?}");
            assert_eq!(hits[0].item.id, format!("old-{n}-1"));
            // A new memory of the same user sits beside them.
            let mut item = MemoryItem {
                id: format!("new-{n}"),
                user_id: user.to_string(),
                content: "User now writes python and rust".into(),
                kind: MemoryKind::Note,
                subject: None,
                relevance: 0.5,
                importance: 0.5,
                score: 0.5,
                created_at: super::super::now(),
                last_used: None,
                uses: 0,
                superseded_by: None,
                session_id: None,
            };
            store.memory_put(&item, 100).await.unwrap();
            let hits = store.memory_search(user, "python", 10).await.unwrap();
            assert_eq!(hits.len(), 4, "{user:?}: {hits:?}");
            let hits = store.memory_search(user, "rust", 10).await.unwrap();
            assert_eq!(hits.len(), 1, "{user:?}: {hits:?}");
            item.id = hits[0].item.id.clone();
            assert_eq!(hits[0].item, item);
        }
        // Forgetting takes the migrated rows out of the index too.
        store.forget_user("alice").await.unwrap();
        assert!(store
            .memory_search("alice", "python", 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            store.memory_search("", "python", 10).await.unwrap().len(),
            4
        );
    }

    fn note(id: String, user: &str, content: String) -> MemoryItem {
        MemoryItem {
            id,
            user_id: user.into(),
            content,
            kind: MemoryKind::Note,
            subject: None,
            relevance: 0.5,
            importance: 0.5,
            score: 0.5,
            created_at: super::super::now(),
            last_used: None,
            uses: 0,
            superseded_by: None,
            session_id: None,
        }
    }

    /// A search with and without the owner token finds the same memories,
    /// ranked the same; which one runs depends on the user's share.
    #[tokio::test]
    async fn searches_with_and_without_the_owner_token_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteStore::open(&path, SyncMode::Normal).unwrap();
        let words = ["tea", "python", "rust", "lyon", "rain"];
        for i in 0..40 {
            let text = format!("User likes {} and {}", words[i % 5], words[(i / 5) % 5]);
            store
                .memory_put(&note(format!("many-{i}"), "many", text), 1000)
                .await
                .unwrap();
            if i % 10 == 0 {
                let text = format!("User drinks {} in {}", words[i % 3], words[4 - i % 4]);
                store
                    .memory_put(&note(format!("few-{i}"), "few", text), 1000)
                    .await
                    .unwrap();
            }
        }
        let conn = Connection::open(&path).unwrap();
        assert!(owner_scoped(&conn, "few").unwrap());
        assert!(owner_scoped(&conn, "nobody").unwrap());
        for user in ["many", "few", "nobody"] {
            for query in ["tea", "python rust", "lyon rain tea", "likes", "drinks"] {
                let terms = crate::memory::search_terms(query);
                let ids = |scoped| -> Vec<(String, String)> {
                    search_scoped(&conn, user, &terms, 10, scoped)
                        .unwrap()
                        .into_iter()
                        .map(|h| (h.item.id, format!("{:.9}", h.rank)))
                        .collect()
                };
                let (with, without) = (ids(true), ids(false));
                assert_eq!(with, without, "{user} {query:?}");
                assert!(with.iter().all(|(id, _)| id.starts_with(user)));
            }
        }
        // A user holding most of a large store is searched without it.
        conn.execute(
            "UPDATE users SET memories = 1000000 WHERE user_id = 'many'",
            [],
        )
        .unwrap();
        assert!(!owner_scoped(&conn, "many").unwrap());
    }
}
