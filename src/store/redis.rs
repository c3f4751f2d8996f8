//! The Redis backend: session state shared by several `troupe serve` nodes.
//!
//! [`RedisStore`] meets the same contract as [`MemoryStore`](super::MemoryStore)
//! (checked by `tests/store_conformance.rs`) on the async `redis` crate, through
//! a [`ConnectionManager`] that reconnects by itself. On top of the contract it
//! adds what several nodes need: a per-session **lease** with a **fencing
//! epoch**, so one session is live on one node at a time and a node that lost
//! its lease cannot write, and **expiry** of whole sessions (`sessions.ttl_secs`).
//!
//! # Key layout
//!
//! `P` is `store.key_prefix` (default `troupe:`). Segment and checkpoint ids are
//! written in decimal. A session's own keys share the hash tag `{<id>}`.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P s:{id}` | hash | the session record: `v` state_version, `j` record JSON, `h` head (`seg.seq`, empty: none), `u` updated_at µs |
//! | `P s:{id}:segs` | hash | segment id → [`Segment`] JSON, for every segment the session owns |
//! | `P s:{id}:m:<seg>` | list | the messages of one segment, JSON, index = seq |
//! | `P s:{id}:cp` | hash | checkpoint id → [`CheckpointRecord`] JSON |
//! | `P s:{id}:in` | hash | references from *other* sessions into this session's segments: `h:<sid>` (a head), `c:<cp>` (a checkpoint's head), `g:<seg>` (a segment's branch point) → message id; what garbage collection and delete must keep |
//! | `P s:{id}:lease` | string, `PX` | `<node>#<instance>\|<epoch>`: who holds the session |
//! | `P s:{id}:epoch` | string | the session's current fencing epoch (the last one given to an owner) |
//! | `P epochs` | string | the one epoch counter of all sessions (`INCR`ed at every new owner; never deleted, never expires) |
//! | `P g:<seg>` | string | `<owner id>\n<parent message id>`: finds a segment from a message id |
//! | `P c:<cp>` | string | `<session id>\n<head>`: finds a checkpoint from its id |
//! | `P sessions` | zset | session id scored by updated_at µs (listing, age filter) |
//! | `P sh:<ns>` | hash | shared state: key → `<version>\n<updated µs>\n<value JSON>` |
//! | `P shv:<ns>` | hash | last version of deleted shared keys (versions never go back) |
//! | `P run:<id>` / `P runs` | string / zset | a workflow run's JSON / run ids by created_at |
//! | `P run:<id>:tasks` | hash | task id → [`TaskResult`] JSON |
//! | `P u:{user}` | string | the [`UserRecord`] JSON (its `memories` count is `HLEN` of `:m`) |
//! | `P u:{user}:m` | hash | memory id → `<insertion no.>\n<`[`MemoryItem`]` JSON>` |
//! | `P u:{user}:v` | string | the user's write stamp: memory writes are read, decided in Rust, and applied by a script only if it is unchanged |
//! | `P userv` | string | the one counter write stamps come from (a stamp never comes back, not even after `forget_user`) |
//! | `P mi:<id>` | string | a memory's user (`memory_mark_used` gets ids only) |
//! | channel `P shch:<ns>` | pub/sub | shared-state changes, published by the write's script |
//!
//! # Shared state across nodes
//!
//! [`Store::shared_changes`] feeds a namespace's subscribers with every
//! node's writes: one pub/sub connection per store (`PSUBSCRIBE P shch:*`,
//! started on first use, reconnecting with a backoff), and after each
//! reconnection a re-read of the watched namespaces that forwards what changed
//! meanwhile. Per key, only versions above the last one forwarded pass.
//!
//! # Long-term memory
//!
//! Search reads the user's memories and ranks them as the memory store does
//! (query terms found as words; no index, no stemming) — see `docs/redis.md`.
//!
//! Records are JSON (serde_json, the types' own serde): the record must be
//! readable by people debugging a fleet with `redis-cli`, and a turn writes
//! two small messages, where the encoding is not what costs.
//!
//! # Atomicity
//!
//! Every write that touches more than one key is one Lua script (`EVALSHA`),
//! which Redis runs atomically: a commit checks the lease (without taking
//! it), the `state_version` and every message (each lands at the end of a
//! segment the session owns) *before* its first write — taking or refreshing
//! the lease included — so a refused commit changes nothing. A message that
//! does not fit is a [`StoreError::Conflict`] (the writer's picture of the
//! session is stale), like a version mismatch. Shared-state compare-and-set
//! is a script too. Reads of the message tree (`history`, `load_session`) are
//! scripts so they see one state. The scripts reach keys they compute (the
//! segment owner lookups), so the backend targets one Redis server, not
//! Redis Cluster: the hash tags keep a session's own keys in one slot, but
//! `g:`, `c:`, `epochs`, `sessions` and other sessions' `:in` are elsewhere.
//!
//! Replication is not part of the guarantee: an answer means the primary
//! applied the write; no `WAIT`/`WAITAOF` is issued, so a failover to a
//! replica (Sentinel) can lose writes that were acknowledged.
//!
//! # Expiry (`sessions.ttl_secs`)
//!
//! With a TTL, every commit sets it again (`PEXPIRE`) on every key of the
//! session: the record, `:segs`, `:cp`, `:in`, `:epoch`, each `:m:<seg>` and
//! `g:<seg>` of its segments and each `c:<cp>` of its checkpoints — so an
//! expired session leaves no key behind. The cost is one `PEXPIRE` per
//! segment and checkpoint per commit. A zset member cannot expire: the
//! `sessions` index keeps the ids of expired sessions until a listing finds
//! their record gone and removes them (lazily, on read). References other
//! sessions hold into an expired one (`:in` of the expired session) vanish
//! with it; a fork whose history passes through an expired session's
//! messages loses them too (its own messages stay) — fork long-lived
//! sessions, or run without TTL.
//!
//! # Lease and fencing epoch
//!
//! Each store instance has an owner token `<node id>#<random instance>` (the
//! node id is `server.node_id`, else `<hostname>-<pid>`).
//!
//! - **Activation** ([`Store::load_session`]) takes the lease with a new
//!   epoch, `INCR P epochs` (one counter for all sessions, so an epoch never
//!   repeats, not even for a session deleted and created again), stored in
//!   `:epoch`, and `SET lease <token>|<epoch> PX lease_ms` — if the lease is
//!   free, and also if it is already this instance's (a release of the
//!   previous actor's epoch still on its way then deletes nothing). The
//!   store remembers the epoch it holds.
//!   If another node holds it, the loader asks that node to hand the session
//!   over (`PUBLISH P handoff:<token> <id>`; that node's runtime passivates its
//!   actor, which releases the lease) and polls until the lease is free or
//!   `lease_wait` passes (then [`StoreError::OwnedElsewhere`]). A dead owner
//!   answers nothing; its lease expires after at most `lease_ms`.
//! - **Every write** (commit, trim) runs the lease check in the same script as
//!   the `state_version` check: the lease must carry this instance's token and
//!   the epoch it holds; if the lease has expired but the session's epoch is
//!   still the one held (nobody took over, and the session was not deleted:
//!   epochs never repeat), it is taken again; otherwise the write is refused
//!   with [`StoreError::Fenced`] (another owner came after us, or the session
//!   is gone) or [`StoreError::OwnedElsewhere`]. A write for a session this
//!   instance never activated (creation) takes the lease like an activation.
//!   An epoch this instance lost (fenced, renewal found the lease taken, or
//!   it deleted the session) stays its write credential for that session
//!   until it activates it again, so a stale actor keeps being refused
//!   instead of presenting no epoch and taking a free lease.
//! - **Renewal**: a background task refreshes every held lease each
//!   `lease_ms / 3`, and every commit refreshes its own. A lease found taken
//!   is forgotten.
//! - **Release** ([`Store::release`], called when the actor passivates): the
//!   lease is deleted if it is still this instance's, with this epoch.
//!
//! Timing rule: safety does not depend on clocks. The decision "is this
//! writer still the owner" is made by Redis, inside the write's script, from
//! the lease key and the epoch — a node paused past its lease finds its
//! epoch superseded and is refused, whatever its own clock says. Timing only
//! decides liveness: a session whose owner died is unavailable for at most
//! `lease_ms`; renewal every `lease_ms / 3` tolerates two missed renewals
//! (a stall of up to ~2/3 of the lease) before the lease can lapse. If it
//! lapses and nobody else took the session, the owner's next write simply
//! takes it again.
//!
//! # Outage
//!
//! Connection and response timeouts are short (1 s / 5 s by default) and the
//! manager retries a connection once: with Redis down an operation fails in
//! about a second with [`StoreError::Unavailable`] naming the URL: nothing
//! was written. A write that was (or may have been) sent but got no answer —
//! response timeout, connection dropped — is [`StoreError::OutcomeUnknown`]:
//! it may have been applied. A commit resolves it when it can by reading the
//! session back (for up to twice the response timeout): its own record there
//! → `Ok`; another version than the one it expected → `Conflict`. The manager
//! reconnects by itself when Redis is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Script};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::{
    from_micros, to_micros, CheckpointRecord, Commit, JsonMap, LoadedSession, MemoryHit,
    MemoryItem, MemoryWrite, Message, MessageId, RunRecord, Segment, SegmentId, SegmentInfo,
    SessionFilter, SessionRecord, SessionSummary, SharedChange, SharedEntry, Store, StoreError,
    TaskResult, UserRecord,
};
use crate::config::Config;

/// How to reach and use a Redis store.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key (several deployments can share one database).
    pub key_prefix: String,
    /// This node's name (shown to other nodes as a session's owner).
    pub node_id: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How long an activation waits for another node to hand a session over
    /// (zero: refuse at once with [`StoreError::OwnedElsewhere`]).
    pub lease_wait: Duration,
    /// Sessions not written for this long expire with all their keys.
    pub ttl: Option<Duration>,
    /// Connecting gives up after this long.
    pub connect_timeout: Duration,
    /// A command gives up after this long.
    pub response_timeout: Duration,
}

impl RedisOptions {
    /// Options for `url` with the defaults: prefix `troupe:`, lease 10 s,
    /// wait up to twice the lease for a hand-over, no TTL.
    pub fn new(url: impl Into<String>) -> Self {
        let lease = Duration::from_secs(10);
        RedisOptions {
            url: url.into(),
            key_prefix: "troupe:".into(),
            node_id: default_node_id(),
            lease,
            lease_wait: lease * 2,
            ttl: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
        }
    }

    /// `store.url`, `store.key_prefix`, `store.lease_ms`, `sessions.ttl_secs`
    /// and `server.node_id` (empty: `<hostname>-<pid>`).
    pub fn from_config(config: &Config) -> Self {
        let mut o = RedisOptions::new(config.store.url.clone());
        o.key_prefix = config.store.key_prefix.clone();
        o.lease = Duration::from_millis(config.store.lease_ms.max(1));
        o.lease_wait = o.lease * 2;
        if config.sessions.ttl_secs > 0 {
            o.ttl = Some(Duration::from_secs(config.sessions.ttl_secs));
        }
        if !config.server.node_id.is_empty() {
            o.node_id = config.server.node_id.clone();
        }
        o
    }
}

/// `<hostname>-<pid>`.
fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// The Redis store. Cheap to share behind an `Arc`; see the module docs.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    client: ::redis::Client,
    url: String,
    prefix: String,
    node: String,
    /// `<node>#<instance>`: what the lease key holds.
    token: String,
    lease_ms: u64,
    lease_wait: Duration,
    ttl_ms: u64,
    /// Sessions whose lease this instance holds, with the epoch.
    held: DashMap<String, u64>,
    /// Epochs this instance held and lost (fenced, lease lost to another
    /// node, session deleted here): a later write of a stale actor presents
    /// that epoch and is refused, rather than presenting none and taking a
    /// free lease on the strength of its `state_version` alone. Forgotten
    /// when this instance activates the session again.
    lost: DashMap<String, u64>,
    handoff_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Releases sent but not yet answered (flush waits for them).
    releasing: AtomicUsize,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// The runtime the store was opened on: its background tasks run there.
    runtime: tokio::runtime::Handle,
    /// The shared-state change listener, started by the first
    /// [`Store::shared_changes`].
    shared_watch: Mutex<Option<mpsc::UnboundedSender<Watch>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|p| p.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
    }
}

impl RedisStore {
    /// Connects (failing within `connect_timeout` if Redis is not there),
    /// loads the scripts, and starts lease renewal and the hand-over listener
    /// on the current tokio runtime.
    pub async fn open(options: RedisOptions) -> Result<RedisStore, StoreError> {
        let url = options.url.clone();
        let open_err = |reason: String| StoreError::Open {
            path: url.clone(),
            reason,
        };
        let client = ::redis::Client::open(options.url.as_str())
            .map_err(|e| open_err(format!("not a redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            options.connect_timeout * 3,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| open_err("connecting timed out".into()))?
        .map_err(|e| open_err(format!("cannot connect: {e}")))?;
        let instance = format!("{:08x}", rand::random::<u32>());
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            conn,
            client,
            url: options.url.clone(),
            prefix: options.key_prefix.clone(),
            token: format!("{}#{instance}", options.node_id),
            node: options.node_id,
            lease_ms: options.lease.as_millis().max(1) as u64,
            lease_wait: options.lease_wait,
            ttl_ms: options.ttl.map_or(0, |t| t.as_millis().max(1) as u64),
            held: DashMap::new(),
            lost: DashMap::new(),
            handoff_rx: Mutex::new(Some(rx)),
            releasing: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
            connect_timeout: options.connect_timeout,
            response_timeout: options.response_timeout,
            runtime: tokio::runtime::Handle::current(),
            shared_watch: Mutex::new(None),
        });
        // Load the scripts once, so the first EVALSHA of each does not miss.
        let mut c = inner.conn.clone();
        for s in all_scripts() {
            s.prepare_invoke()
                .load_async(&mut c)
                .await
                .map_err(|e| open_err(format!("cannot load scripts: {e}")))?;
        }
        let renew = tokio::spawn(renew_leases(Arc::downgrade(&inner)));
        let listen = tokio::spawn(listen_handoffs(Arc::downgrade(&inner), tx));
        inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([renew, listen]);
        Ok(RedisStore { inner })
    }

    /// This instance's node id.
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// The epoch of the lease this instance holds on `session_id`, if any.
    pub fn held_epoch(&self, session_id: &str) -> Option<u64> {
        self.inner.held.get(session_id).map(|e| *e)
    }

    /// Every key under this store's prefix (tests and tooling; uses `SCAN`).
    pub async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.inner.conn.clone();
        let pattern = format!("{}*", glob_escape(&self.inner.prefix));
        let mut it: ::redis::AsyncIter<String> = c
            .scan_match(&pattern)
            .await
            .map_err(|e| self.inner.err(e))?;
        let mut out = Vec::new();
        while let Some(k) = it.next().await {
            out.push(k.map_err(|e| self.inner.err(e))?);
        }
        Ok(out)
    }

    /// Deletes every key under this store's prefix (tests: never `FLUSHDB`
    /// a shared server). Returns how many were deleted.
    pub async fn delete_all_keys(&self) -> Result<usize, StoreError> {
        let keys = self.keys().await?;
        let mut c = self.inner.conn.clone();
        for chunk in keys.chunks(500) {
            let _: () = c.del(chunk).await.map_err(|e| self.inner.err(e))?;
        }
        Ok(keys.len())
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

impl Inner {
    /// A Redis error as a store error: unreachable → `Unavailable` with the URL.
    fn err(&self, e: ::redis::RedisError) -> StoreError {
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            StoreError::Unavailable {
                url: self.url.clone(),
                reason: e.to_string(),
            }
        } else {
            StoreError::Database(format!("redis at '{}': {e}", self.url))
        }
    }

    /// A Redis error of a write: a connection refused is `Unavailable`
    /// (nothing was sent); a timeout or a dropped connection is
    /// `OutcomeUnknown` (the write may have been sent, and applied).
    fn write_err(&self, e: ::redis::RedisError) -> StoreError {
        if !e.is_connection_refusal()
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.is_unrecoverable_error())
        {
            StoreError::OutcomeUnknown {
                url: self.url.clone(),
                reason: e.to_string(),
            }
        } else {
            self.err(e)
        }
    }

    /// Runs a script that writes (see [`write_err`](Self::write_err)).
    async fn run_write(
        &self,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn();
        inv.invoke_async(&mut c)
            .await
            .map_err(|e| self.write_err(e))
    }

    /// A commit got no answer: reads the session back to learn whether it
    /// was applied. Its record there (`j`, which carries its `updated_at`
    /// in µs) → applied, `Ok`. Another version than the one it expected →
    /// it can no longer apply: `Conflict`. Still the expected version, or
    /// no answer again within twice the response timeout → `OutcomeUnknown`
    /// (it may still be applied later, if it is still on its way).
    async fn resolve_commit(
        &self,
        commit: &Commit,
        url: String,
        reason: String,
    ) -> Result<(), StoreError> {
        let sid = &commit.record.id;
        let mine = json(&commit.record)?;
        let new_version = commit.record.state_version.to_string();
        let expected = commit.expected_version.map(|v| v.to_string());
        let deadline = Instant::now() + self.response_timeout * 2;
        let mut pending = 0;
        while Instant::now() < deadline && pending < 5 {
            let mut c = self.conn();
            let sk = self.session_key(sid);
            let read: Result<(Option<String>, Option<String>, Option<String>), _> = ::redis::pipe()
                .atomic()
                .hget(&sk, "v")
                .hget(&sk, "j")
                .get(format!("{sk}:lease"))
                .query_async(&mut c)
                .await;
            match read {
                Ok((v, j, lease)) => {
                    if v.as_deref() == Some(new_version.as_str()) && j.as_deref() == Some(&mine) {
                        // Applied. The epoch it took (a creation takes one).
                        if let Some(l) = lease {
                            if token_of(&l) == self.token {
                                if let Some((_, e)) = l.rsplit_once('|') {
                                    self.note_epoch(sid, e);
                                }
                            }
                        }
                        tracing::info!(session = %sid, "a commit without answer was applied");
                        return Ok(());
                    }
                    if v != expected {
                        return Err(StoreError::Conflict {
                            session: sid.clone(),
                            expected: commit.expected_version,
                            found: v.and_then(|v| v.parse().ok()),
                        });
                    }
                    pending += 1;
                }
                Err(e) if e.is_connection_refusal() => break,
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(StoreError::OutcomeUnknown { url, reason })
    }

    fn session_key(&self, sid: &str) -> String {
        format!("{}s:{{{sid}}}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn run(&self, inv: &::redis::ScriptInvocation<'_>) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn();
        inv.invoke_async(&mut c).await.map_err(|e| self.err(e))
    }

    fn held_arg(&self, sid: &str) -> u64 {
        self.held
            .get(sid)
            .map(|e| *e)
            .or_else(|| self.lost.get(sid).map(|e| *e))
            .unwrap_or(0)
    }

    /// Stops renewing the lease of `sid` but remembers its epoch as lost.
    fn lose(&self, sid: &str) -> u64 {
        let e = self.held.remove(sid).map_or(0, |(_, e)| e);
        if e > 0 {
            self.lost.insert(sid.to_string(), e);
        }
        e
    }

    /// Records the epoch a script reported (`"0"`: none).
    fn note_epoch(&self, sid: &str, epoch: &str) {
        match epoch.parse::<u64>() {
            Ok(e) if e > 0 => {
                self.held.insert(sid.to_string(), e);
                self.lost.remove(sid);
            }
            _ => {}
        }
    }

    /// Turns a refusal from a script's lease check into an error.
    fn lease_refusal(&self, sid: &str, r: &[String]) -> StoreError {
        let holder = r.get(2).map(String::as_str).unwrap_or("");
        match r.first().map(String::as_str) {
            Some("fenced") => {
                let held = self.lose(sid);
                StoreError::Fenced {
                    session: sid.to_string(),
                    epoch: held,
                    current: r.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
                }
            }
            _ => {
                self.lose(sid);
                StoreError::OwnedElsewhere {
                    session: sid.to_string(),
                    node: node_of(holder).to_string(),
                }
            }
        }
    }
}

/// The node id in a lease value `<node>#<instance>|<epoch>`.
fn node_of(lease: &str) -> &str {
    let token = lease.rsplit_once('|').map_or(lease, |(t, _)| t);
    token.rsplit_once('#').map_or(token, |(n, _)| n)
}

/// The owner token in a lease value.
fn token_of(lease: &str) -> &str {
    lease.rsplit_once('|').map_or(lease, |(t, _)| t)
}

fn mid(m: Option<MessageId>) -> String {
    m.map_or_else(String::new, |m| format!("{}.{}", m.segment, m.seq))
}

fn parse_mid(s: &str) -> Option<MessageId> {
    let (seg, seq) = s.split_once('.')?;
    Some(MessageId {
        segment: seg.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Database(format!("cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn unexpected(what: &str, r: &[String]) -> StoreError {
    StoreError::Database(format!("redis script '{what}' answered {r:?}"))
}

/// Background: refreshes every held lease each `lease_ms / 3`.
async fn renew_leases(weak: Weak<Inner>) {
    let every = {
        let Some(inner) = weak.upgrade() else { return };
        Duration::from_millis((inner.lease_ms / 3).max(1))
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let held: Vec<(String, u64)> = inner
            .held
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        for chunk in held.chunks(200) {
            let mut inv = RENEW.prepare_invoke();
            inv.arg(&inner.prefix).arg(&inner.token).arg(inner.lease_ms);
            for (sid, epoch) in chunk {
                inv.arg(sid).arg(*epoch);
            }
            match inner.run(&inv).await {
                Ok(kept) => {
                    for ((sid, epoch), ok) in chunk.iter().zip(kept) {
                        if ok != "1" {
                            tracing::warn!(session = %sid, epoch, "lease lost to another node");
                            if inner.held.remove_if(sid, |_, e| e == epoch).is_some() {
                                inner.lost.insert(sid.clone(), *epoch);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    break;
                }
            }
        }
    }
}

/// Background: listens on `P handoff:<token>` for sessions other nodes want.
async fn listen_handoffs(weak: Weak<Inner>, tx: mpsc::UnboundedSender<String>) {
    loop {
        let (client, channel) = {
            let Some(inner) = weak.upgrade() else { return };
            (
                inner.client.clone(),
                format!("{}handoff:{}", inner.prefix, inner.token),
            )
        };
        match client.get_async_pubsub().await {
            Ok(mut ps) => match ps.subscribe(&channel).await {
                Ok(()) => {
                    let mut stream = ps.on_message();
                    while let Some(msg) = stream.next().await {
                        if weak.strong_count() == 0 {
                            return;
                        }
                        if let Ok(sid) = msg.get_payload::<String>() {
                            if tx.send(sid.clone()).is_err() {
                                // Nobody takes hand-over requests: release directly.
                                if let Some(inner) = weak.upgrade() {
                                    release(&inner, &sid);
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "hand-over subscription failed"),
            },
            Err(e) => tracing::debug!(error = %e, "hand-over listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---- shared-state change feed ----

/// A request to the shared-state change listener: feed `tx` with the changes
/// of `namespace`; `ready` is answered once the feed is live.
struct Watch {
    namespace: String,
    tx: mpsc::UnboundedSender<SharedChange>,
    ready: oneshot::Sender<()>,
}

/// What the listener keeps per watched namespace.
#[derive(Default)]
struct Watched {
    /// Each key's last version forwarded, or found when the watch began.
    known: HashMap<String, u64>,
    subs: Vec<mpsc::UnboundedSender<SharedChange>>,
}

/// Every key of a namespace now: live ones with their values, deleted ones
/// with their last version (one `MULTI`, so one state).
async fn shared_snapshot(inner: &Inner, ns: &str) -> Result<Vec<SharedChange>, StoreError> {
    let mut c = inner.conn();
    let (live, gone): (HashMap<String, String>, HashMap<String, u64>) = ::redis::pipe()
        .atomic()
        .hgetall(format!("{}sh:{ns}", inner.prefix))
        .hgetall(format!("{}shv:{ns}", inner.prefix))
        .query_async(&mut c)
        .await
        .map_err(|e| inner.err(e))?;
    let mut out = Vec::with_capacity(live.len() + gone.len());
    for (key, raw) in live {
        let e = parse_shared(ns, &key, &raw)?;
        out.push(SharedChange {
            key,
            value: Some(e.value),
            version: e.version,
        });
    }
    for (key, version) in gone {
        out.push(SharedChange {
            key,
            value: None,
            version,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// A change as `SHARED_PUT` publishes it: `<version> <key bytes>\n<key><value JSON>`.
fn parse_shared_change(payload: &[u8]) -> Option<SharedChange> {
    let nl = payload.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&payload[..nl]).ok()?;
    let (version, len) = header.split_once(' ')?;
    let len: usize = len.parse().ok()?;
    let rest = &payload[nl + 1..];
    let key = std::str::from_utf8(rest.get(..len)?).ok()?.to_string();
    let value = &rest[len..];
    Some(SharedChange {
        key,
        value: if value.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(value).ok()?)
        },
        version: version.parse().ok()?,
    })
}

/// Forwards `change` to the namespace's subscribers unless they have it.
fn forward(w: &mut Watched, change: SharedChange) {
    if w.known
        .get(&change.key)
        .is_some_and(|&k| k >= change.version)
    {
        return;
    }
    w.known.insert(change.key.clone(), change.version);
    w.subs.retain(|tx| tx.send(change.clone()).is_ok());
}

/// After a (re)connection: what changed while no connection listened.
async fn resync(inner: &Inner, watched: &mut HashMap<String, Watched>) -> bool {
    watched.retain(|_, w| {
        w.subs.retain(|tx| !tx.is_closed());
        !w.subs.is_empty()
    });
    for (ns, w) in watched.iter_mut() {
        match shared_snapshot(inner, ns).await {
            Ok(snapshot) => snapshot.into_iter().for_each(|c| forward(w, c)),
            Err(e) => {
                tracing::debug!(namespace = %ns, error = %e, "shared-state resync failed");
                return false;
            }
        }
    }
    true
}

/// Starts feeding a new subscriber; false if Redis failed meanwhile.
async fn watch(inner: &Inner, watched: &mut HashMap<String, Watched>, w: Watch) -> bool {
    if w.tx.is_closed() {
        return true; // the caller gave up waiting
    }
    if !watched.contains_key(&w.namespace) {
        match shared_snapshot(inner, &w.namespace).await {
            Ok(snapshot) => {
                let known = snapshot.into_iter().map(|c| (c.key, c.version)).collect();
                watched.insert(
                    w.namespace.clone(),
                    Watched {
                        known,
                        subs: Vec::new(),
                    },
                );
            }
            Err(e) => {
                tracing::debug!(namespace = %w.namespace, error = %e, "shared-state watch failed");
                return false; // `ready` dropped: the caller hears of it
            }
        }
    }
    if let Some(entry) = watched.get_mut(&w.namespace) {
        entry.subs.push(w.tx);
    }
    let _ = w.ready.send(());
    true
}

/// Background (started by the first [`Store::shared_changes`]): one pub/sub
/// connection `PSUBSCRIBE`d to `P shch:*`, feeding the watched namespaces'
/// subscribers. Reconnects with a backoff (50 → 500 ms) whenever the
/// connection drops, then re-reads the watched namespaces and forwards what
/// changed meanwhile (each key's newest state).
async fn listen_shared(weak: Weak<Inner>, mut watches: mpsc::UnboundedReceiver<Watch>) {
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut pause = Duration::from_millis(50);
    loop {
        let (client, prefix, timeout) = {
            let Some(inner) = weak.upgrade() else { return };
            (
                inner.client.clone(),
                inner.prefix.clone(),
                inner.connect_timeout,
            )
        };
        let pattern = format!("{}shch:*", glob_escape(&prefix));
        let connected = tokio::time::timeout(timeout * 2, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.psubscribe(&pattern).await?;
            Ok::<_, ::redis::RedisError>(ps)
        })
        .await;
        match connected {
            Ok(Ok(ps)) => {
                let synced = match weak.upgrade() {
                    Some(inner) => resync(&inner, &mut watched).await,
                    None => return,
                };
                if synced {
                    pause = Duration::from_millis(50);
                    let mut stream = ps.into_on_message();
                    let channel_prefix = format!("{prefix}shch:");
                    loop {
                        tokio::select! {
                            msg = stream.next() => {
                                let Some(msg) = msg else { break };
                                let Some(ns) = msg.get_channel_name().strip_prefix(&channel_prefix)
                                else {
                                    continue;
                                };
                                let Some(w) = watched.get_mut(ns) else { continue };
                                match parse_shared_change(msg.get_payload_bytes()) {
                                    Some(c) => forward(w, c),
                                    None => tracing::warn!(namespace = %ns, "malformed shared-state change ignored"),
                                }
                                if w.subs.is_empty() {
                                    watched.remove(ns);
                                }
                            }
                            w = watches.recv() => {
                                let Some(w) = w else { return };
                                let Some(inner) = weak.upgrade() else { return };
                                if !watch(&inner, &mut watched, w).await {
                                    break;
                                }
                            }
                        }
                    }
                    tracing::debug!("shared-state change feed disconnected; reconnecting");
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "shared-state change feed cannot connect"),
            Err(_) => tracing::debug!("shared-state change feed: connecting timed out"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Gives the lease of `sid` back if this instance still holds it.
fn release(inner: &Arc<Inner>, sid: &str) {
    let Some((_, epoch)) = inner.held.remove(sid) else {
        return;
    };
    inner.releasing.fetch_add(1, Ordering::SeqCst);
    let inner = inner.clone();
    let sid = sid.to_string();
    let go = async move {
        let mut c = inner.conn();
        let r: Result<i64, _> = RELEASE
            .key(format!("{}:lease", inner.session_key(&sid)))
            .arg(format!("{}|{epoch}", inner.token))
            .invoke_async(&mut c)
            .await;
        if let Err(e) = r {
            tracing::debug!(session = %sid, error = %e, "lease release failed (it will expire)");
        }
        inner.releasing.fetch_sub(1, Ordering::SeqCst);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(go);
        }
        Err(_) => {
            // No runtime here: the lease expires by itself.
            tracing::debug!("lease release outside a runtime; it will expire");
        }
    }
}

// ---- Lua ----

/// Helpers every script shares. `P` is ARGV[1].
const PRELUDE: &str = r#"
local P = ARGV[1]
local function skey(sid, suffix) return P .. 's:{' .. sid .. '}' .. suffix end
local function gkey(seg) return P .. 'g:' .. seg end
local function ckey(cp) return P .. 'c:' .. cp end
local function split(v)
  local nl = string.find(v, '\n', 1, true)
  return string.sub(v, 1, nl - 1), string.sub(v, nl + 1)
end
local function seg_of(m)
  local d = string.find(m, '.', 1, true)
  return string.sub(m, 1, d - 1), tonumber(string.sub(m, d + 1))
end
-- owner session and parent message of a segment (nil if unknown)
local function owner(seg)
  local v = redis.call('GET', gkey(seg))
  if not v then return nil, nil end
  return split(v)
end
-- records in the owner's :in hash that `field` of session `sid` points at message `m`
local function add_ref(m, sid, field)
  if m == '' then return end
  local o = owner((seg_of(m)))
  if o and o ~= sid then redis.call('HSET', skey(o, ':in'), field, m) end
end
local function del_ref(m, sid, field)
  if m == '' then return end
  local o = owner((seg_of(m)))
  if o and o ~= sid then redis.call('HDEL', skey(o, ':in'), field) end
end
-- the lease check of every write and activation, without writing anything:
-- returns how the lease is to be taken ('refresh' | 'retake' | 'new') and the
-- epoch, or nil and a refusal {'fenced'|'owned', '0', holder, epoch}.
-- held = 0 (an activation, or a write of an instance that holds no epoch)
-- always gets a new epoch, even when the lease is already this instance's:
-- a release of the previous epoch still in flight then finds nothing to delete.
local function lease_check(sid, token, held)
  local cur = redis.call('GET', skey(sid, ':lease'))
  local ep = tonumber(redis.call('GET', skey(sid, ':epoch')) or '0')
  local mine = cur and string.sub(cur, 1, #token + 1) == token .. '|'
  if held > 0 then
    if cur == token .. '|' .. held then return 'refresh', held end
    -- lapsed and nobody took over: epochs never repeat (one counter for all
    -- sessions), so an unchanged epoch means the same session, not a
    -- deleted-and-recreated one
    if (not cur) and ep == held then return 'retake', held end
    if cur and not mine then return nil, {'fenced', '0', cur, tostring(ep)} end
    if cur then
      -- this instance's own newer lease (re-activated meanwhile)
      return 'refresh', tonumber(string.sub(cur, #token + 2))
    end
    return nil, {'fenced', '0', '', tostring(ep)}
  end
  if (not cur) or mine then return 'new', 0 end
  return nil, {'owned', '0', cur, tostring(ep)}
end
-- takes the lease as lease_check decided; returns the epoch
local function lease_take(sid, token, kind, e, lease_ms)
  local lk = skey(sid, ':lease')
  if kind == 'refresh' then
    redis.call('PEXPIRE', lk, lease_ms)
    return e
  end
  if kind == 'new' then
    e = redis.call('INCR', P .. 'epochs')
    local ek = skey(sid, ':epoch')
    redis.call('SET', ek, e)
    -- an activation of an expiring session: the epoch expires with it
    local t = redis.call('PTTL', skey(sid, ''))
    if t > 0 then redis.call('PEXPIRE', ek, t) end
  end
  redis.call('SET', lk, token .. '|' .. e, 'PX', lease_ms)
  return e
end
local function lease(sid, token, held, lease_ms)
  local kind, e = lease_check(sid, token, held)
  if not kind then return nil, e end
  return lease_take(sid, token, kind, e, lease_ms)
end
-- the path ending at message (seg, seq), newest first, at most `limit` (-1: all)
local function walk(seg, seq, limit)
  local out = {}
  while seg do
    local o, parent = owner(seg)
    if not o then return nil, 'segment ' .. seg .. ' is missing' end
    local from = 0
    if limit >= 0 then
      local left = limit - #out
      if left <= 0 then break end
      from = seq + 1 - left
      if from < 0 then from = 0 end
    end
    local msgs = redis.call('LRANGE', skey(o, ':m:' .. seg), from, seq)
    if #msgs ~= seq - from + 1 then
      return nil, 'message ' .. seg .. '.' .. seq .. ' is missing'
    end
    for i = #msgs, 1, -1 do out[#out + 1] = msgs[i] end
    if from > 0 or parent == '' then break end
    seg, seq = seg_of(parent)
  end
  return out
end
-- sets the TTL of every key of a session
local function touch(sid, ttl)
  if ttl <= 0 then return end
  for _, suffix in ipairs({'', ':segs', ':cp', ':in', ':epoch'}) do
    redis.call('PEXPIRE', skey(sid, suffix), ttl)
  end
  for _, seg in ipairs(redis.call('HKEYS', skey(sid, ':segs'))) do
    redis.call('PEXPIRE', skey(sid, ':m:' .. seg), ttl)
    redis.call('PEXPIRE', gkey(seg), ttl)
  end
  for _, cp in ipairs(redis.call('HKEYS', skey(sid, ':cp'))) do
    redis.call('PEXPIRE', ckey(cp), ttl)
  end
end
local function drop_cp(sid, cp)
  local v = redis.call('GET', ckey(cp))
  if not v then return end
  local s, head = split(v)
  if s ~= sid then return end
  del_ref(head, sid, 'c:' .. cp)
  redis.call('DEL', ckey(cp))
  redis.call('HDEL', skey(sid, ':cp'), cp)
end
local function drop_seg(sid, seg)
  local o, parent = owner(seg)
  if parent then del_ref(parent, sid, 'g:' .. seg) end
  local n = redis.call('LLEN', skey(sid, ':m:' .. seg))
  redis.call('DEL', skey(sid, ':m:' .. seg), gkey(seg))
  redis.call('HDEL', skey(sid, ':segs'), seg)
  return n
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// ARGV: P, sid, token, held, lease_ms, ttl_ms, expected ('' none),
/// new_version, record JSON, head, updated µs, new segment ('' none),
/// its parent, its JSON, n messages, (seg, seq, JSON)×n, n checkpoints,
/// (id, head, JSON)×n, n drops, id×n.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local sid = ARGV[2]
-- every check before the first write: lease (read only), version, messages;
-- a refused commit changes nothing, not even the lease
local kind, ep = lease_check(sid, ARGV[3], tonumber(ARGV[4]))
if not kind then return ep end
local rk = skey(sid, '')
local stored = redis.call('HGET', rk, 'v')
if ARGV[7] == '' then
  if stored then return {'conflict', '0', stored} end
elseif stored ~= ARGV[7] then
  return {'conflict', '0', stored or ''}
end
local nseg = ARGV[12]
if nseg ~= '' and redis.call('EXISTS', gkey(nseg)) == 1 then
  return {'segment_exists', '0', nseg}
end
local nmsg = tonumber(ARGV[15])
local nexts = {}
if nseg ~= '' then nexts[nseg] = 0 end
local i = 16
for k = 1, nmsg do
  local seg, seq = ARGV[i], tonumber(ARGV[i + 1])
  local n = nexts[seg]
  if n == nil then
    if owner(seg) ~= sid then return {'foreign', '0', tostring(k), '', stored or ''} end
    n = redis.call('LLEN', skey(sid, ':m:' .. seg))
  end
  if seq ~= n then return {'not_at_end', '0', tostring(k), tostring(n), stored or ''} end
  nexts[seg] = n + 1
  i = i + 3
end
ep = tostring(lease_take(sid, ARGV[3], kind, ep, ARGV[5]))
local ncp = tonumber(ARGV[i])
local cps_at = i + 1
local drops_at = cps_at + 3 * ncp
local ndrop = tonumber(ARGV[drops_at])
for k = 1, ndrop do drop_cp(sid, ARGV[drops_at + k]) end
if nseg ~= '' then
  redis.call('SET', gkey(nseg), sid .. '\n' .. ARGV[13])
  redis.call('HSET', skey(sid, ':segs'), nseg, ARGV[14])
  add_ref(ARGV[13], sid, 'g:' .. nseg)
end
i = 16
for k = 1, nmsg do
  redis.call('RPUSH', skey(sid, ':m:' .. ARGV[i]), ARGV[i + 2])
  i = i + 3
end
i = cps_at
for k = 1, ncp do
  local cp, head = ARGV[i], ARGV[i + 1]
  drop_cp(sid, cp)
  redis.call('SET', ckey(cp), sid .. '\n' .. head)
  redis.call('HSET', skey(sid, ':cp'), cp, ARGV[i + 2])
  add_ref(head, sid, 'c:' .. cp)
  i = i + 3
end
local old = redis.call('HGET', rk, 'h') or ''
local new = ARGV[10]
if old ~= new then
  del_ref(old, sid, 'h:' .. sid)
  add_ref(new, sid, 'h:' .. sid)
end
redis.call('HSET', rk, 'v', ARGV[8], 'j', ARGV[9], 'h', new, 'u', ARGV[11])
redis.call('ZADD', P .. 'sessions', ARGV[11], sid)
touch(sid, tonumber(ARGV[6]))
return {'ok', ep}
"#,
    )
});

/// ARGV: P, sid, token, held, lease_ms, acquire ('1'/'0'), recent.
/// → {'none'} | refusal | {'ok', epoch, record JSON, can_append, msg…}
/// (messages newest first) | {'corrupt', '0', why}
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local sid = ARGV[2]
local rk = skey(sid, '')
local rec = redis.call('HMGET', rk, 'j', 'h')
if not rec[1] then return {'none'} end
local ep = '0'
if ARGV[6] == '1' then
  local e, refusal = lease(sid, ARGV[3], tonumber(ARGV[4]), ARGV[5])
  if not e then return refusal end
  ep = tostring(e)
end
local head = rec[2] or ''
local can = '0'
local out = {'ok', ep, rec[1], can}
if head ~= '' then
  local seg, seq = seg_of(head)
  if owner(seg) == sid and redis.call('LLEN', skey(sid, ':m:' .. seg)) == seq + 1 then
    out[4] = '1'
  end
  local n = tonumber(ARGV[7])
  if n > 0 then
    local msgs, why = walk(seg, seq, n)
    if not msgs then return {'corrupt', '0', why} end
    for _, m in ipairs(msgs) do out[#out + 1] = m end
  end
end
return out
"#,
    )
});

/// ARGV: P, seg, seq, limit (-1: all) → {'ok', msg…} newest first | {'corrupt', why}
static HISTORY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local msgs, why = walk(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if not msgs then return {'corrupt', why} end
local out = {'ok'}
for _, m in ipairs(msgs) do out[#out + 1] = m end
return out
"#,
    )
});

/// ARGV: P, sid, cutoff µs ('' none) → {'0'|'1'}
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local sid = ARGV[2]
local rk = skey(sid, '')
local u = redis.call('HGET', rk, 'u')
if not u then return {'0'} end
if ARGV[3] ~= '' and tonumber(u) >= tonumber(ARGV[3]) then return {'0'} end
-- keep every own segment another session's history passes through
local keep = {}
local any = false
for _, m in ipairs(redis.call('HVALS', skey(sid, ':in'))) do
  local seg = (seg_of(m))
  while seg and not keep[seg] do
    local o, parent = owner(seg)
    if o ~= sid then break end
    keep[seg] = true
    any = true
    if parent == '' then break end
    seg = (seg_of(parent))
  end
end
for _, seg in ipairs(redis.call('HKEYS', skey(sid, ':segs'))) do
  if not keep[seg] then drop_seg(sid, seg) end
end
for _, cp in ipairs(redis.call('HKEYS', skey(sid, ':cp'))) do drop_cp(sid, cp) end
del_ref(redis.call('HGET', rk, 'h') or '', sid, 'h:' .. sid)
redis.call('DEL', rk, skey(sid, ':cp'), skey(sid, ':lease'), skey(sid, ':epoch'))
if not any then redis.call('DEL', skey(sid, ':segs'), skey(sid, ':in')) end
redis.call('ZREM', P .. 'sessions', sid)
return {'1'}
"#,
    )
});

/// ARGV: P, sid, token, held, lease_ms, expected, (seg, keep ('' all))…
static TRIM: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local sid = ARGV[2]
local stored = redis.call('HGET', skey(sid, ''), 'v')
if stored ~= ARGV[6] then return {'conflict', '0', stored or ''} end
local ep, refusal = lease(sid, ARGV[3], tonumber(ARGV[4]), ARGV[5])
if not ep then return refusal end
local deleted = 0
local i = 7
while i <= #ARGV do
  local seg, k = ARGV[i], ARGV[i + 1]
  if owner(seg) == sid then
    if k == '' then
      deleted = deleted + drop_seg(sid, seg)
    else
      local key = skey(sid, ':m:' .. seg)
      local n = redis.call('LLEN', key)
      local keep = tonumber(k) + 1
      if n > keep then
        redis.call('LTRIM', key, 0, keep - 1)
        deleted = deleted + n - keep
      end
    end
  end
  i = i + 2
end
return {'ok', tostring(ep), tostring(deleted)}
"#,
    )
});

/// ARGV: P, sid → message ids other sessions hold in this session's segments
static EXTERNAL: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local sid = ARGV[2]
local out = {}
for _, m in ipairs(redis.call('HVALS', skey(sid, ':in'))) do
  local seg = (seg_of(m))
  if owner(seg) == sid then out[#out + 1] = m end
end
return out
"#,
    )
});

/// ARGV: P, ns, key, expected ('' none), value JSON ('' delete), now µs
/// → {'ok', version} | {'mismatch', found}. A change is published on
/// `P shch:<ns>` as `<version> <key bytes>\n<key><value JSON>` (no value:
/// deleted), in the same script, so the channel's order is the writes' order.
static SHARED_PUT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local hk, vk, key = P .. 'sh:' .. ARGV[2], P .. 'shv:' .. ARGV[2], ARGV[3]
local live = redis.call('HGET', hk, key)
local lv = nil
if live then lv = tonumber(string.sub(live, 1, string.find(live, '\n', 1, true) - 1)) end
local last = lv or tonumber(redis.call('HGET', vk, key) or '0')
if ARGV[4] ~= '' then
  local want = tonumber(ARGV[4])
  local ok
  if lv then ok = (want == lv) else ok = (want == 0) end
  if not ok then return {'mismatch', tostring(lv or 0)} end
end
local v = last + 1
local ch = P .. 'shch:' .. ARGV[2]
if ARGV[5] ~= '' then
  redis.call('HSET', hk, key, v .. '\n' .. ARGV[6] .. '\n' .. ARGV[5])
  redis.call('HDEL', vk, key)
  redis.call('PUBLISH', ch, v .. ' ' .. #key .. '\n' .. key .. ARGV[5])
elseif lv then
  redis.call('HDEL', hk, key)
  redis.call('HSET', vk, key, v)
  redis.call('PUBLISH', ch, v .. ' ' .. #key .. '\n' .. key)
end
return {'ok', tostring(v)}
"#,
    )
});

/// ARGV: P, token, lease_ms, (sid, epoch)… → '1'/'0' per session
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local out = {}
local i = 4
while i <= #ARGV do
  local lk = skey(ARGV[i], ':lease')
  if redis.call('GET', lk) == ARGV[2] .. '|' .. ARGV[i + 1] then
    redis.call('PEXPIRE', lk, ARGV[3])
    out[#out + 1] = '1'
  else
    out[#out + 1] = '0'
  end
  i = i + 2
end
return out
"#,
    )
});

/// KEYS: the lease; ARGV: its expected value → 1 if deleted.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// ARGV: P, user, expected write count, record JSON ('' keep), n puts,
/// (id, `<seq>\n<JSON>`)×n, n deletes, id×n, n new ids, id×n
/// → 'ok' | 'retry' (another write came between the read and this one).
static MEMORY_APPLY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local u = P .. 'u:{' .. ARGV[2] .. '}'
local cur = redis.call('GET', u .. ':v') or '0'
if cur ~= ARGV[3] then return 'retry' end
-- the next write count comes from one counter for all users, so a value
-- never comes back (not even after forget_user): a write planned on data
-- read before a forget can never match again
local v = redis.call('INCR', P .. 'userv')
if v <= tonumber(cur) then
  v = tonumber(cur) + 1
  redis.call('SET', P .. 'userv', v)
end
redis.call('SET', u .. ':v', v)
if ARGV[4] ~= '' then redis.call('SET', u, ARGV[4]) end
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  redis.call('HSET', u .. ':m', ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('HDEL', u .. ':m', ARGV[i])
  redis.call('DEL', P .. 'mi:' .. ARGV[i])
  i = i + 1
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('SET', P .. 'mi:' .. ARGV[i], ARGV[2])
  i = i + 1
end
return 'ok'
"#,
    )
});

/// ARGV: P, user → how many memories were deleted.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local u = P .. 'u:{' .. ARGV[2] .. '}'
local ids = redis.call('HKEYS', u .. ':m')
for _, id in ipairs(ids) do redis.call('DEL', P .. 'mi:' .. id) end
redis.call('DEL', u, u .. ':m', u .. ':v')
return #ids
"#,
    )
});

fn all_scripts() -> [&'static Script; 11] {
    [
        &COMMIT,
        &LOAD,
        &HISTORY,
        &DELETE,
        &TRIM,
        &EXTERNAL,
        &SHARED_PUT,
        &RENEW,
        &RELEASE,
        &MEMORY_APPLY,
        &FORGET,
    ]
}

fn decode_messages(raw: &[String]) -> Result<Vec<Message>, StoreError> {
    let mut out: Vec<Message> = raw
        .iter()
        .map(|m| decode("message", m))
        .collect::<Result<_, _>>()?;
    out.reverse();
    Ok(out)
}

fn parse_shared(namespace: &str, key: &str, raw: &str) -> Result<SharedEntry, StoreError> {
    let bad = || StoreError::Corrupt(format!("shared state '{namespace}/{key}' is malformed"));
    let mut parts = raw.splitn(3, '\n');
    let version = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let updated = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let value = decode("shared value", parts.next().ok_or_else(bad)?)?;
    Ok(SharedEntry {
        namespace: namespace.into(),
        key: key.into(),
        value,
        version,
        updated_at: from_micros(updated),
    })
}

// ---- long-term memory ----

/// One user's memories and record as read in one `MULTI`.
struct UserData {
    /// The user's write count (`P u:{u}:v`): a write applies only if it is unchanged.
    version: String,
    record: Option<UserRecord>,
    /// Memories with their insertion number, in insertion order.
    items: Vec<(u64, MemoryItem)>,
}

/// What a read-modify-write of one user's data changes.
#[derive(Default)]
struct UserWrite {
    record: Option<UserRecord>,
    puts: Vec<(u64, MemoryItem)>,
    deletes: Vec<String>,
    new_ids: Vec<String>,
}

/// How many times a user write is tried again when another write to the
/// same user came between its read and its write.
const USER_WRITE_TRIES: usize = 50;

/// Memories ranked as the reference model does: how many of the query's
/// terms each active memory contains as words; ties by score, then newest.
fn search_items(items: &[(u64, MemoryItem)], query: &str, limit: usize) -> Vec<MemoryHit> {
    let terms = crate::memory::search_terms(query);
    if terms.is_empty() || limit == 0 {
        return Vec::new();
    }
    let mut hits: Vec<(u64, MemoryHit)> = items
        .iter()
        .filter(|(_, m)| m.superseded_by.is_none())
        .filter_map(|(seq, m)| {
            let words = crate::memory::extract_words(&m.content);
            let n = terms.iter().filter(|t| words.contains(*t)).count();
            (n > 0).then(|| {
                (
                    *seq,
                    MemoryHit {
                        item: m.clone(),
                        rank: n as f64,
                    },
                )
            })
        })
        .collect();
    hits.sort_by(|(sa, a), (sb, b)| {
        b.rank
            .total_cmp(&a.rank)
            .then(b.item.score.total_cmp(&a.item.score))
            .then(b.item.created_at.cmp(&a.item.created_at))
            .then(sb.cmp(sa))
    });
    hits.truncate(limit);
    hits.into_iter().map(|(_, h)| h).collect()
}

/// The `limit` best active memories: highest score, then newest.
fn top_items(items: &[(u64, MemoryItem)], limit: usize) -> Vec<MemoryItem> {
    let mut v: Vec<&(u64, MemoryItem)> = items
        .iter()
        .filter(|(_, m)| m.superseded_by.is_none())
        .collect();
    v.sort_by(|(sa, a), (sb, b)| {
        b.score
            .total_cmp(&a.score)
            .then(b.created_at.cmp(&a.created_at))
            .then(sb.cmp(sa))
    });
    v.into_iter().take(limit).map(|(_, m)| m.clone()).collect()
}

impl Inner {
    fn user_key(&self, user: &str) -> String {
        format!("{}u:{{{user}}}", self.prefix)
    }

    async fn user_data(&self, user: &str) -> Result<UserData, StoreError> {
        let u = self.user_key(user);
        let mut c = self.conn();
        let (version, record, raw): (Option<String>, Option<String>, HashMap<String, String>) =
            ::redis::pipe()
                .atomic()
                .get(format!("{u}:v"))
                .get(&u)
                .hgetall(format!("{u}:m"))
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
        let mut items = Vec::with_capacity(raw.len());
        for (id, v) in &raw {
            let bad =
                || StoreError::Corrupt(format!("memory '{id}' of user '{user}' is malformed"));
            let (seq, j) = v.split_once('\n').ok_or_else(bad)?;
            let seq: u64 = seq.parse().map_err(|_| bad())?;
            items.push((seq, decode::<MemoryItem>("memory", j)?));
        }
        items.sort_by(|(a, x), (b, y)| x.created_at.cmp(&y.created_at).then(a.cmp(b)));
        let record = match record {
            Some(r) => {
                let mut r: UserRecord = decode("user record", &r)?;
                r.memories = items.len() as u64;
                Some(r)
            }
            None => None,
        };
        Ok(UserData {
            version: version.unwrap_or_else(|| "0".into()),
            record,
            items,
        })
    }

    /// Reads the user's data, lets `plan` decide the write, and applies it
    /// only if nobody wrote to the user meanwhile (else reads again).
    async fn user_write<T>(
        &self,
        user: &str,
        mut plan: impl FnMut(&UserData, u64) -> Result<(UserWrite, T), StoreError>,
    ) -> Result<T, StoreError> {
        for _ in 0..USER_WRITE_TRIES {
            let data = self.user_data(user).await?;
            let next_seq = data.version.parse::<u64>().unwrap_or(0) + 1;
            let (w, out) = plan(&data, next_seq)?;
            if w.record.is_none() && w.puts.is_empty() && w.deletes.is_empty() {
                return Ok(out);
            }
            let mut inv = MEMORY_APPLY.prepare_invoke();
            inv.arg(&self.prefix).arg(user).arg(&data.version);
            match &w.record {
                Some(r) => inv.arg(json(r)?),
                None => inv.arg(""),
            };
            inv.arg(w.puts.len());
            for (seq, m) in &w.puts {
                inv.arg(&m.id).arg(format!("{seq}\n{}", json(m)?));
            }
            inv.arg(w.deletes.len());
            for id in &w.deletes {
                inv.arg(id);
            }
            inv.arg(w.new_ids.len());
            for id in &w.new_ids {
                inv.arg(id);
            }
            let mut c = self.conn();
            let r: String = inv
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.write_err(e))?;
            match r.as_str() {
                "ok" => return Ok(out),
                "retry" => tokio::task::yield_now().await,
                _ => return Err(unexpected("memory_apply", &[r])),
            }
        }
        Err(StoreError::Database(format!(
            "user '{user}': {USER_WRITE_TRIES} concurrent writes in a row got in the way"
        )))
    }
}

#[async_trait]
impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn load_session(
        &self,
        id: &str,
        recent: usize,
    ) -> Result<Option<LoadedSession>, StoreError> {
        let inner = &self.inner;
        let start = Instant::now();
        let mut asked: Option<(String, Instant)> = None;
        let mut pause = Duration::from_millis(2);
        loop {
            // An activation always asks for a lease afresh (held = 0): this
            // instance's own live lease is adopted, a free one is taken with a
            // new epoch.
            let mut inv = LOAD.prepare_invoke();
            inv.arg(&inner.prefix)
                .arg(id)
                .arg(&inner.token)
                .arg(0)
                .arg(inner.lease_ms)
                .arg("1")
                .arg(recent);
            let r = inner.run(&inv).await?;
            match r.first().map(String::as_str) {
                Some("none") => return Ok(None),
                Some("ok") if r.len() >= 4 => {
                    inner.note_epoch(id, &r[1]);
                    let record: SessionRecord = decode("session record", &r[2])?;
                    return Ok(Some(LoadedSession {
                        record,
                        recent: decode_messages(&r[4..])?,
                        can_append: r[3] == "1",
                    }));
                }
                Some("corrupt") => {
                    return Err(StoreError::Corrupt(format!(
                        "session '{id}': {}",
                        r.get(2).map(String::as_str).unwrap_or("")
                    )))
                }
                Some("owned") | Some("fenced") => {
                    let holder = r.get(2).cloned().unwrap_or_default();
                    inner.held.remove(id);
                    if start.elapsed() >= inner.lease_wait {
                        return Err(StoreError::OwnedElsewhere {
                            session: id.to_string(),
                            node: node_of(&holder).to_string(),
                        });
                    }
                    // Ask the holder to hand the session over (again every
                    // half lease, in case it restarted its listener).
                    let ask = match &asked {
                        Some((h, at)) => {
                            *h != holder
                                || at.elapsed() * 2 >= Duration::from_millis(inner.lease_ms)
                        }
                        None => true,
                    };
                    if ask && !holder.is_empty() {
                        let channel = format!("{}handoff:{}", inner.prefix, token_of(&holder));
                        let mut c = inner.conn();
                        let _: i64 = c.publish(channel, id).await.map_err(|e| inner.err(e))?;
                        asked = Some((holder, Instant::now()));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(25));
                }
                _ => return Err(unexpected("load", &r)),
            }
        }
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let inner = &self.inner;
        let sid = commit.record.id.clone();
        let r = &commit.record;
        let mut inv = COMMIT.prepare_invoke();
        inv.arg(&inner.prefix)
            .arg(&sid)
            .arg(&inner.token)
            .arg(inner.held_arg(&sid))
            .arg(inner.lease_ms)
            .arg(inner.ttl_ms)
            .arg(
                commit
                    .expected_version
                    .map_or_else(String::new, |v| v.to_string()),
            )
            .arg(r.state_version)
            .arg(json(r)?)
            .arg(mid(r.head))
            .arg(to_micros(r.updated_at));
        match &commit.new_segment {
            Some(s) => {
                inv.arg(s.id).arg(mid(s.parent)).arg(json(s)?);
            }
            None => {
                inv.arg("").arg("").arg("");
            }
        }
        inv.arg(commit.messages.len());
        for m in &commit.messages {
            inv.arg(m.id.segment).arg(m.id.seq).arg(json(m)?);
        }
        inv.arg(commit.checkpoints.len());
        for c in &commit.checkpoints {
            inv.arg(&c.id).arg(mid(c.head)).arg(json(c)?);
        }
        inv.arg(commit.drop_checkpoints.len());
        for d in &commit.drop_checkpoints {
            inv.arg(d);
        }
        let res = match inner.run_write(&inv).await {
            Ok(res) => res,
            Err(StoreError::OutcomeUnknown { url, reason }) => {
                return inner.resolve_commit(&commit, url, reason).await
            }
            Err(e) => return Err(e),
        };
        let status = res.first().map(String::as_str).unwrap_or("");
        if let Some(ep) = res.get(1) {
            if !matches!(status, "owned" | "fenced") {
                inner.note_epoch(&sid, ep);
            }
        }
        match status {
            "ok" => Ok(()),
            "conflict" => Err(StoreError::Conflict {
                session: sid,
                expected: commit.expected_version,
                found: res.get(2).and_then(|v| v.parse().ok()),
            }),
            "owned" | "fenced" => Err(inner.lease_refusal(&sid, &res)),
            "segment_exists" => Err(StoreError::Database(format!(
                "segment {:x} exists",
                commit.new_segment.as_ref().map_or(0, |s| s.id)
            ))),
            "foreign" | "not_at_end" => {
                // The writer's picture of the session's messages is stale
                // (the session was deleted, recreated or written elsewhere):
                // a conflict, so the actor drops its state and reloads.
                let k: usize = res.get(2).and_then(|v| v.parse().ok()).unwrap_or(1);
                let m = commit
                    .messages
                    .get(k.saturating_sub(1))
                    .map_or_else(String::new, |m| m.id.to_string());
                if status == "foreign" {
                    tracing::warn!(session = %sid, message = %m, "commit refused: appends to a segment the session does not own");
                } else {
                    tracing::warn!(session = %sid, message = %m, next = res.get(3).map(String::as_str).unwrap_or("?"), "commit refused: message not at the end of its segment");
                }
                Err(StoreError::Conflict {
                    session: sid,
                    expected: commit.expected_version,
                    found: res.get(4).and_then(|v| v.parse().ok()),
                })
            }
            _ => Err(unexpected("commit", &res)),
        }
    }

    async fn history(
        &self,
        head: MessageId,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, StoreError> {
        let inner = &self.inner;
        let mut inv = HISTORY.prepare_invoke();
        inv.arg(&inner.prefix)
            .arg(head.segment)
            .arg(head.seq)
            .arg(limit.map_or(-1i64, |l| l.min(i64::MAX as usize) as i64));
        let r = inner.run(&inv).await?;
        match r.first().map(String::as_str) {
            Some("ok") => decode_messages(&r[1..]),
            Some("corrupt") => Err(StoreError::Corrupt(
                r.get(1)
                    .cloned()
                    .unwrap_or_default()
                    .replace(&format!("{}.{}", head.segment, head.seq), &head.to_string()),
            )),
            _ => Err(unexpected("history", &r)),
        }
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionSummary>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let index = format!("{}sessions", inner.prefix);
        let max = filter
            .updated_before
            .map_or_else(|| "+inf".to_string(), |t| format!("({}", to_micros(t)));
        let mut ids: Vec<(String, f64)> = c
            .zrevrangebyscore_withscores(&index, max, "-inf")
            .await
            .map_err(|e| inner.err(e))?;
        // Newest first; ties by id, as the reference model.
        ids.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let want = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for chunk in ids.chunks(256) {
            let mut pipe = ::redis::pipe();
            for (id, _) in chunk {
                pipe.hget(inner.session_key(id), "j");
            }
            let recs: Vec<Option<String>> =
                pipe.query_async(&mut c).await.map_err(|e| inner.err(e))?;
            for ((id, _), rec) in chunk.iter().zip(recs) {
                let Some(rec) = rec else {
                    stale.push(id.clone());
                    continue;
                };
                let r: SessionRecord = decode("session record", &rec)?;
                if filter.user_id.is_some() && r.user_id != filter.user_id {
                    continue;
                }
                if filter.updated_before.is_some_and(|t| r.updated_at >= t) {
                    continue;
                }
                out.push(SessionSummary::from(&r));
            }
            if out.len() >= want {
                break;
            }
        }
        if !stale.is_empty() {
            // Expired sessions: their index entries go lazily, here. A record
            // that came back meanwhile is scored again by its next commit.
            let mut pipe = ::redis::pipe();
            for id in &stale {
                pipe.cmd("EVAL")
                    .arg("if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('ZREM', KEYS[2], ARGV[1]) end return 0")
                    .arg(2)
                    .arg(inner.session_key(id))
                    .arg(&index)
                    .arg(id)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut c).await.map_err(|e| inner.err(e))?;
        }
        out.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
        out.truncate(want);
        Ok(out)
    }

    async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let mut inv = DELETE.prepare_invoke();
        inv.arg(&inner.prefix)
            .arg(id)
            .arg(updated_before.map_or_else(String::new, |t| to_micros(t).to_string()));
        let r = inner.run_write(&inv).await?;
        let deleted = r.first().map(String::as_str) == Some("1");
        if deleted {
            // A stale actor of this node must not write over a recreation.
            inner.lose(id);
        }
        Ok(deleted)
    }

    async fn list_checkpoints(
        &self,
        session_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let raw: Vec<String> = c
            .hvals(format!("{}:cp", inner.session_key(session_id)))
            .await
            .map_err(|e| inner.err(e))?;
        let mut out: Vec<CheckpointRecord> = raw
            .iter()
            .map(|s| decode("checkpoint", s))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let at: Option<String> = c
            .get(format!("{}c:{id}", inner.prefix))
            .await
            .map_err(|e| inner.err(e))?;
        let Some(at) = at else { return Ok(None) };
        let sid = at.split('\n').next().unwrap_or("");
        let raw: Option<String> = c
            .hget(format!("{}:cp", inner.session_key(sid)), id)
            .await
            .map_err(|e| inner.err(e))?;
        raw.map(|s| decode("checkpoint", &s)).transpose()
    }

    async fn list_segments(&self, session_id: &str) -> Result<Vec<SegmentInfo>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let sk = inner.session_key(session_id);
        let segs: HashMap<String, String> = c
            .hgetall(format!("{sk}:segs"))
            .await
            .map_err(|e| inner.err(e))?;
        let segs: Vec<Segment> = segs
            .values()
            .map(|s| decode("segment", s))
            .collect::<Result<_, _>>()?;
        let mut pipe = ::redis::pipe();
        for s in &segs {
            pipe.cmd("LINDEX").arg(format!("{sk}:m:{}", s.id)).arg(-1);
        }
        let tips: Vec<Option<String>> = if segs.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut c).await.map_err(|e| inner.err(e))?
        };
        let mut out = Vec::with_capacity(segs.len());
        for (s, tip) in segs.into_iter().zip(tips) {
            let tip = match tip {
                Some(t) => {
                    let m: Message = decode("message", &t)?;
                    Some((m.id, m.created_at))
                }
                None => None,
            };
            out.push(SegmentInfo {
                id: s.id,
                parent: s.parent,
                created_at: s.created_at,
                tip,
            });
        }
        out.sort_by_key(|s| (s.created_at, s.id));
        Ok(out)
    }

    async fn external_refs(&self, session_id: &str) -> Result<Vec<MessageId>, StoreError> {
        let inner = &self.inner;
        let mut inv = EXTERNAL.prepare_invoke();
        inv.arg(&inner.prefix).arg(session_id);
        let raw = inner.run(&inv).await?;
        let mut out: Vec<MessageId> = raw.iter().filter_map(|m| parse_mid(m)).collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn trim_segments(
        &self,
        session_id: &str,
        expected_version: u64,
        plan: Vec<(SegmentId, Option<u32>)>,
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let mut inv = TRIM.prepare_invoke();
        inv.arg(&inner.prefix)
            .arg(session_id)
            .arg(&inner.token)
            .arg(inner.held_arg(session_id))
            .arg(inner.lease_ms)
            .arg(expected_version);
        for (seg, keep) in &plan {
            inv.arg(*seg)
                .arg(keep.map_or_else(String::new, |k| k.to_string()));
        }
        let r = inner.run_write(&inv).await?;
        match r.first().map(String::as_str) {
            Some("ok") => {
                inner.note_epoch(session_id, r.get(1).map(String::as_str).unwrap_or(""));
                Ok(r.get(2).and_then(|v| v.parse().ok()).unwrap_or(0))
            }
            Some("conflict") => Err(StoreError::Conflict {
                session: session_id.into(),
                expected: Some(expected_version),
                found: r.get(2).and_then(|v| v.parse().ok()),
            }),
            Some("owned") | Some("fenced") => Err(inner.lease_refusal(session_id, &r)),
            _ => Err(unexpected("trim", &r)),
        }
    }

    async fn shared_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let raw: Option<String> = c
            .hget(format!("{}sh:{namespace}", inner.prefix), key)
            .await
            .map_err(|e| inner.err(e))?;
        raw.map(|r| parse_shared(namespace, key, &r)).transpose()
    }

    async fn shared_put(
        &self,
        namespace: &str,
        key: &str,
        value: Option<serde_json::Value>,
        expected_version: Option<u64>,
    ) -> Result<SharedEntry, StoreError> {
        let inner = &self.inner;
        let at = super::now();
        let mut inv = SHARED_PUT.prepare_invoke();
        inv.arg(&inner.prefix)
            .arg(namespace)
            .arg(key)
            .arg(expected_version.map_or_else(String::new, |v| v.to_string()))
            .arg(match &value {
                Some(v) => json(v)?,
                None => String::new(),
            })
            .arg(to_micros(at));
        let r = inner.run_write(&inv).await?;
        let n = r.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match r.first().map(String::as_str) {
            Some("ok") => Ok(SharedEntry {
                namespace: namespace.into(),
                key: key.into(),
                value: value.unwrap_or(serde_json::Value::Null),
                version: n,
                updated_at: at,
            }),
            Some("mismatch") => Err(StoreError::VersionMismatch {
                namespace: namespace.into(),
                key: key.into(),
                expected: expected_version.unwrap_or(0),
                found: n,
            }),
            _ => Err(unexpected("shared_put", &r)),
        }
    }

    async fn shared_list(
        &self,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<SharedEntry>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let all: HashMap<String, String> = c
            .hgetall(format!("{}sh:{namespace}", inner.prefix))
            .await
            .map_err(|e| inner.err(e))?;
        let mut out: Vec<SharedEntry> = all
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| parse_shared(namespace, k, v))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let _: () = ::redis::pipe()
            .atomic()
            .set(format!("{}run:{}", inner.prefix, run.id), json(run)?)
            .ignore()
            .zadd(
                format!("{}runs", inner.prefix),
                &run.id,
                to_micros(run.created_at),
            )
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(|e| inner.err(e))?;
        Ok(())
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let raw: Option<String> = c
            .get(format!("{}run:{id}", inner.prefix))
            .await
            .map_err(|e| inner.err(e))?;
        raw.map(|r| decode("run", &r)).transpose()
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let ids: Vec<String> = c
            .zrange(format!("{}runs", inner.prefix), 0, -1)
            .await
            .map_err(|e| inner.err(e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}run:{id}", inner.prefix))
            .collect();
        let raw: Vec<Option<String>> = ::redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .map_err(|e| inner.err(e))?;
        let mut out: Vec<RunRecord> = raw
            .iter()
            .flatten()
            .map(|r| decode("run", r))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        out.truncate(limit);
        Ok(out)
    }

    async fn put_task_result(&self, result: &TaskResult) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let _: () = c
            .hset(
                format!("{}run:{}:tasks", inner.prefix, result.run_id),
                &result.task_id,
                json(result)?,
            )
            .await
            .map_err(|e| inner.err(e))?;
        Ok(())
    }

    async fn task_results(&self, run_id: &str) -> Result<Vec<TaskResult>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let raw: Vec<String> = c
            .hvals(format!("{}run:{run_id}:tasks", inner.prefix))
            .await
            .map_err(|e| inner.err(e))?;
        let mut out: Vec<TaskResult> = raw
            .iter()
            .map(|r| decode("task result", r))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        Ok(out)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Acknowledged writes are applied in Redis already (durable as far as
        // the server's own persistence goes); wait briefly for releases.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.inner.releasing.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn release(&self, session_id: &str) {
        release(&self.inner, session_id);
    }

    async fn memory_put(
        &self,
        item: &MemoryItem,
        max_per_user: usize,
    ) -> Result<MemoryWrite, StoreError> {
        self.inner
            .user_write(&item.user_id, |data, seq| {
                let mut out = MemoryWrite::default();
                let mut w = UserWrite::default();
                let mut list = data.items.clone();
                if item.subject.is_some() {
                    let same = |m: &MemoryItem| {
                        m.superseded_by.is_none()
                            && m.kind == item.kind
                            && m.subject == item.subject
                    };
                    let lower = item.content.to_lowercase();
                    if let Some((_, d)) = list
                        .iter()
                        .find(|(_, m)| same(m) && m.content.to_lowercase() == lower)
                    {
                        out.duplicate_of = Some(d.id.clone());
                        return Ok((w, out));
                    }
                    for (s, m) in list.iter_mut().filter(|(_, m)| same(m)) {
                        m.superseded_by = Some(item.id.clone());
                        out.superseded.push(m.id.clone());
                        w.puts.push((*s, m.clone()));
                    }
                }
                let mut new = item.clone();
                new.superseded_by = None;
                list.push((seq, new.clone()));
                w.puts.push((seq, new));
                w.new_ids.push(item.id.clone());
                let max = max_per_user.max(1);
                if list.len() > max {
                    // Superseded first, then lowest score, oldest first.
                    let mut order: Vec<&(u64, MemoryItem)> = list.iter().collect();
                    order.sort_by(|(sa, x), (sb, y)| {
                        (x.superseded_by.is_none())
                            .cmp(&y.superseded_by.is_none())
                            .then(x.score.total_cmp(&y.score))
                            .then(x.created_at.cmp(&y.created_at))
                            .then(sa.cmp(sb))
                    });
                    let doomed: Vec<String> = order[..list.len() - max]
                        .iter()
                        .map(|(_, m)| m.id.clone())
                        .collect();
                    // Reported in list order, as the reference model does.
                    for (_, m) in &list {
                        if doomed.contains(&m.id) {
                            out.evicted.push(m.id.clone());
                        }
                    }
                    w.puts.retain(|(_, m)| !doomed.contains(&m.id));
                    w.new_ids.retain(|id| !doomed.contains(id));
                    w.deletes = doomed.into_iter().filter(|id| *id != item.id).collect();
                }
                if data.record.is_none() {
                    w.record = Some(UserRecord {
                        user_id: item.user_id.clone(),
                        updated_at: super::now(),
                        ..Default::default()
                    });
                }
                Ok((w, out))
            })
            .await
    }

    async fn memory_list(
        &self,
        user_id: &str,
        include_superseded: bool,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        let data = self.inner.user_data(user_id).await?;
        Ok(data
            .items
            .into_iter()
            .map(|(_, m)| m)
            .filter(|m| include_superseded || m.superseded_by.is_none())
            .collect())
    }

    async fn memory_top(&self, user_id: &str, limit: usize) -> Result<Vec<MemoryItem>, StoreError> {
        let data = self.inner.user_data(user_id).await?;
        Ok(top_items(&data.items, limit))
    }

    async fn memory_search(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryHit>, StoreError> {
        if crate::memory::search_terms(query).is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let data = self.inner.user_data(user_id).await?;
        Ok(search_items(&data.items, query, limit))
    }

    async fn memory_recall(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        // One read for both parts.
        let data = self.inner.user_data(user_id).await?;
        let mut out: Vec<MemoryItem> = search_items(&data.items, query, limit)
            .into_iter()
            .map(|h| h.item)
            .collect();
        for m in top_items(&data.items, limit) {
            if out.len() >= limit {
                break;
            }
            if !out.iter().any(|o| o.id == m.id) {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn memory_mark_used(&self, ids: &[String], at: DateTime<Utc>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}mi:{id}", inner.prefix))
            .collect();
        let mut c = inner.conn();
        let users: Vec<Option<String>> = ::redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .map_err(|e| inner.err(e))?;
        let mut by_user: HashMap<String, Vec<&String>> = HashMap::new();
        for (id, user) in ids.iter().zip(users) {
            if let Some(u) = user {
                by_user.entry(u).or_default().push(id);
            }
        }
        for (user, ids) in by_user {
            inner
                .user_write(&user, |data, _| {
                    let mut w = UserWrite::default();
                    for (seq, m) in &data.items {
                        // An id given twice counts twice, as in one UPDATE per id.
                        let n = ids.iter().filter(|id| ***id == m.id).count() as u64;
                        if n > 0 {
                            let mut m = m.clone();
                            m.uses += n;
                            m.last_used = Some(at);
                            w.puts.push((*seq, m));
                        }
                    }
                    Ok((w, ()))
                })
                .await?;
        }
        Ok(())
    }

    async fn forget_user(&self, user_id: &str) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let mut inv = FORGET.prepare_invoke();
        inv.arg(&inner.prefix).arg(user_id);
        let mut c = inner.conn();
        let n: u64 = inv
            .invoke_async(&mut c)
            .await
            .map_err(|e| inner.write_err(e))?;
        Ok(n)
    }

    async fn user_get(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        let inner = &self.inner;
        let u = inner.user_key(user_id);
        let mut c = inner.conn();
        let (raw, count): (Option<String>, u64) = ::redis::pipe()
            .atomic()
            .get(&u)
            .hlen(format!("{u}:m"))
            .query_async(&mut c)
            .await
            .map_err(|e| inner.err(e))?;
        raw.map(|r| {
            let mut r: UserRecord = decode("user record", &r)?;
            r.memories = count;
            Ok(r)
        })
        .transpose()
    }

    async fn user_update(
        &self,
        user_id: &str,
        profile: &JsonMap,
        preferences: &JsonMap,
    ) -> Result<UserRecord, StoreError> {
        self.inner
            .user_write(user_id, |data, _| {
                let mut r = data.record.clone().unwrap_or_else(|| UserRecord {
                    user_id: user_id.to_string(),
                    ..Default::default()
                });
                for (k, v) in profile {
                    r.profile.insert(k.clone(), v.clone());
                }
                for (k, v) in preferences {
                    r.preferences.insert(k.clone(), v.clone());
                }
                r.updated_at = super::now();
                r.memories = data.items.len() as u64;
                Ok((
                    UserWrite {
                        record: Some(r.clone()),
                        ..Default::default()
                    },
                    r,
                ))
            })
            .await
    }

    async fn shared_changes(
        &self,
        namespace: &str,
    ) -> Result<Option<mpsc::UnboundedReceiver<SharedChange>>, StoreError> {
        let inner = &self.inner;
        let ctl = {
            let mut slot = inner.shared_watch.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let task = inner
                        .runtime
                        .spawn(listen_shared(Arc::downgrade(inner), rx));
                    inner
                        .tasks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(task);
                    *slot = Some(tx.clone());
                    tx
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready, answer) = oneshot::channel();
        ctl.send(Watch {
            namespace: namespace.to_string(),
            tx,
            ready,
        })
        .map_err(|_| StoreError::Closed)?;
        match tokio::time::timeout(inner.connect_timeout * 3, answer).await {
            Ok(Ok(())) => Ok(Some(rx)),
            _ => Err(StoreError::Unavailable {
                url: inner.url.clone(),
                reason: format!(
                    "cannot follow the changes of shared-state namespace '{namespace}'"
                ),
            }),
        }
    }

    fn handoff_requests(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.inner
            .handoff_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_parse() {
        assert_eq!(node_of("node-a#0a1b2c3d|7"), "node-a");
        assert_eq!(token_of("node-a#0a1b2c3d|7"), "node-a#0a1b2c3d");
        assert_eq!(node_of("we#ird#00000000|1"), "we#ird");
    }

    #[test]
    fn message_ids_round_trip_in_decimal() {
        let m = MessageId {
            segment: i64::MAX,
            seq: 42,
        };
        assert_eq!(parse_mid(&mid(Some(m))), Some(m));
        assert_eq!(mid(None), "");
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("t[1]*:"), "t\\[1\\]\\*:");
    }
}
