//! Durable state: the [`Store`] trait, its backends, and session files.
//!
//! Every backend honours one behaviour contract, checked by one conformance
//! suite (`tests/store_conformance.rs`):
//!
//! - [`Store::commit`] is atomic: the record, the new segment, the messages and
//!   the checkpoints of one [`Commit`] are all durable or none is, and it is
//!   refused with [`StoreError::Conflict`] unless the stored `state_version`
//!   is the one the writer expected (no lost update, ever);
//! - a commit that returned `Ok` survives a restart of the process (for
//!   SQLite with `sync = "full"`, also a power loss);
//! - history is the path from the root of the message tree to the head.
//!
//! Backends: [`MemoryStore`] (the reference model, for tests and ephemeral
//! sessions) and [`SqliteStore`] (the embedded default).

mod memory;
pub mod redis;
mod sqlite;
mod types;

pub mod file;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use self::redis::{RedisOptions, RedisStore};
pub use memory::MemoryStore;
pub use sqlite::{SqliteStore, SyncMode};
pub use types::*;

use crate::config::{Config, StoreBackend};

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the session since this writer read it.
    #[error("session '{session}' was changed by another writer (expected version {expected:?}, found {found:?})")]
    Conflict {
        /// The session.
        session: String,
        /// The version the writer expected.
        expected: Option<u64>,
        /// The version in the store.
        found: Option<u64>,
    },
    /// A shared-state write's version precondition failed.
    #[error("shared state '{namespace}/{key}': expected version {expected}, found {found}")]
    VersionMismatch {
        /// The namespace.
        namespace: String,
        /// The key.
        key: String,
        /// The version the writer expected (0: absent).
        expected: u64,
        /// The version stored (0: absent).
        found: u64,
    },
    /// A record the operation needs is not there.
    #[error("{what} '{id}' not found in the store")]
    NotFound {
        /// What kind of record.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The database refused or failed.
    #[error("store database error: {0}")]
    Database(String),
    /// Stored data could not be decoded (a damaged or foreign database).
    #[error("store data is damaged: {0}")]
    Corrupt(String),
    /// The database file could not be opened or migrated.
    #[error("cannot open store at '{path}': {reason}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The store is shut down or its worker died.
    #[error("the store is closed")]
    Closed,
    /// An injected fault (test doubles).
    #[error("injected store fault: {0}")]
    Injected(String),
    /// The session is live on another node (it holds the session's lease),
    /// and this node could not take it over in time: forward the request to
    /// that node, or try again.
    #[error("session '{session}' is live on node '{node}'")]
    OwnedElsewhere {
        /// The session.
        session: String,
        /// The node holding its lease.
        node: String,
    },
    /// This node lost the session's lease (it paused or was cut off longer
    /// than the lease) and another node took the session over: the write
    /// was refused, the session must be reloaded.
    #[error("session '{session}': this node's lease (epoch {epoch}) was taken over (epoch now {current}); the write was refused")]
    Fenced {
        /// The session.
        session: String,
        /// The epoch this node held.
        epoch: u64,
        /// The session's epoch in the store now.
        current: u64,
    },
    /// The store's server cannot be reached: the operation was not carried
    /// out (nothing was written). A write whose answer was lost after it was
    /// sent is [`StoreError::OutcomeUnknown`] instead.
    #[error("store at '{url}' is unavailable: {reason}")]
    Unavailable {
        /// The server's address.
        url: String,
        /// Why.
        reason: String,
    },
    /// A write was sent to the store's server but no answer came back (the
    /// response timed out, or the connection dropped while waiting): it may
    /// or may not have been applied. Do not retry it blindly — reload the
    /// state it changed and decide from what is there. A session actor
    /// treats it as a conflict (its in-memory state may be stale).
    #[error("store at '{url}': a write got no answer and may or may not have been applied ({reason}); reload before retrying")]
    OutcomeUnknown {
        /// The server's address.
        url: String,
        /// Why no answer came.
        reason: String,
    },
    /// The backend does not implement this operation (yet): e.g. long-term
    /// memory on a backend that has no memory tables. Nothing was changed.
    #[error("the {0} is not supported by this store backend")]
    Unsupported(String),
}

fn unsupported(store: &str, what: &str) -> StoreError {
    StoreError::Unsupported(format!("{what} operation ({store} store)"))
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// One change to a shared-state namespace: what subscribers see, and what a
/// store that spans several nodes reports of the other nodes' writes
/// ([`Store::shared_changes`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedChange {
    /// The key.
    pub key: String,
    /// The new value (`None`: deleted).
    pub value: Option<serde_json::Value>,
    /// The key's version after the change.
    pub version: u64,
}

/// The storage contract every backend meets. See the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name, for logs (`"sqlite"`, `"memory"`).
    fn name(&self) -> &'static str;

    /// Loads a session with the last `recent` messages of its history.
    async fn load_session(
        &self,
        id: &str,
        recent: usize,
    ) -> Result<Option<LoadedSession>, StoreError>;

    /// Applies one atomic write (see [`Commit`]).
    async fn commit(&self, commit: Commit) -> Result<(), StoreError>;

    /// The last `limit` messages (all if `None`) of the path from the root to
    /// `head`, oldest first.
    async fn history(
        &self,
        head: MessageId,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, StoreError>;

    /// Sessions matching `filter`, most recently updated first.
    async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionSummary>, StoreError>;

    /// Deletes a session, its checkpoints and the messages no other session
    /// can reach. With `updated_before`, only if the session was last updated
    /// before that time (checked in the same atomic step, so a turn that
    /// lands meanwhile is never deleted). Returns whether it was deleted.
    async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError>;

    /// The checkpoints of a session, oldest first.
    async fn list_checkpoints(&self, session_id: &str)
        -> Result<Vec<CheckpointRecord>, StoreError>;

    /// One checkpoint by id.
    async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>, StoreError>;

    /// The segments a session owns, with their tips (for branch listings).
    async fn list_segments(&self, session_id: &str) -> Result<Vec<SegmentInfo>, StoreError>;

    /// One shared-state key.
    async fn shared_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError>;

    /// Writes (`Some`) or deletes (`None`) a shared-state key. With
    /// `expected_version`, only if the stored version is that one (0: the key
    /// must not exist) — else [`StoreError::VersionMismatch`]. Returns the
    /// entry written (for a delete: the last version, value null).
    async fn shared_put(
        &self,
        namespace: &str,
        key: &str,
        value: Option<serde_json::Value>,
        expected_version: Option<u64>,
    ) -> Result<SharedEntry, StoreError>;

    /// The keys of a namespace starting with `prefix`, sorted.
    async fn shared_list(
        &self,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<SharedEntry>, StoreError>;

    /// Creates or updates a workflow run.
    async fn put_run(&self, run: &RunRecord) -> Result<(), StoreError>;

    /// A run by id.
    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError>;

    /// Runs, newest first.
    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError>;

    /// Creates or updates one task's result (durable when this returns).
    async fn put_task_result(&self, result: &TaskResult) -> Result<(), StoreError>;

    /// A run's task results.
    async fn task_results(&self, run_id: &str) -> Result<Vec<TaskResult>, StoreError>;

    /// Messages in `session_id`'s segments that something outside the
    /// session refers to: other sessions' heads and checkpoints, and the
    /// branch points of other sessions' segments. Garbage collection keeps
    /// everything these reach.
    async fn external_refs(&self, session_id: &str) -> Result<Vec<MessageId>, StoreError>;

    /// Deletes messages of `session_id`'s own segments: for each
    /// `(segment, keep)`, those after seq `keep`, or the whole segment when
    /// `keep` is `None`. Refused with [`StoreError::Conflict`] unless the
    /// session's `state_version` is still `expected_version` (the plan was
    /// made from that state). Returns how many messages were deleted.
    async fn trim_segments(
        &self,
        session_id: &str,
        expected_version: u64,
        plan: Vec<(SegmentId, Option<u32>)>,
    ) -> Result<u64, StoreError>;

    /// Settles everything acknowledged so far: acknowledged writes are
    /// already durable; SQLite also copies its WAL into the main file.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// This node stopped serving `session_id` (its actor passivated): a
    /// store that leases sessions to one node at a time (Redis) gives the
    /// lease back so another node can take the session at once. Returns at
    /// once; the release happens in the background. Default: nothing.
    fn release(&self, _session_id: &str) {}

    /// Session ids that another node asked this node to hand over (their
    /// actors should passivate, which releases them). `Some` once, for a
    /// store that leases sessions; `None` for the others.
    fn handoff_requests(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        None
    }

    /// Every change to `namespace`'s shared state made through this store
    /// *and through every other store on the same data* (other nodes), from
    /// the moment this returns, for a backend that several nodes share
    /// (Redis: pub/sub). Each key's changes come in version order; after a
    /// lost connection the store reports each key's newest state once it is
    /// back (intermediate versions may be skipped, never reordered). `None`
    /// (the default): only this process writes, so the shared-state actor's
    /// own writes are all there is. An error means the feed could not be set
    /// up (e.g. the server is down).
    async fn shared_changes(
        &self,
        _namespace: &str,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<SharedChange>>, StoreError> {
        Ok(None)
    }

    // ---- long-term memory and per-user records ----
    //
    // Every method below has a default that fails with
    // [`StoreError::Unsupported`], so a backend without memory support still
    // compiles and serves sessions (the runtime then runs without long-term
    // memory). The contract is `memory_contract` in tests/store_conformance.rs.

    /// Stores a memory of `item.user_id`, in one atomic step: if it has a
    /// subject, an active memory of the same user, kind and subject with
    /// the same content (ignoring case) makes it a duplicate (nothing
    /// written); otherwise those memories are superseded by it (kept, never
    /// searched). Then, while the user has more than `max_per_user`
    /// memories, the lowest are evicted: superseded ones first, then by
    /// `score`, oldest first.
    async fn memory_put(
        &self,
        _item: &MemoryItem,
        _max_per_user: usize,
    ) -> Result<MemoryWrite, StoreError> {
        Err(unsupported(self.name(), "memory_put"))
    }

    /// A user's memories, oldest first; superseded ones only if asked.
    async fn memory_list(
        &self,
        _user_id: &str,
        _include_superseded: bool,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        Err(unsupported(self.name(), "memory_list"))
    }

    /// A user's `limit` best active memories: highest `score` first, then newest.
    async fn memory_top(
        &self,
        _user_id: &str,
        _limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        Err(unsupported(self.name(), "memory_top"))
    }

    /// Full-text search of a user's active memories for the words of
    /// `query` (any of them; see [`crate::memory::search_terms`]), best
    /// first, at most `limit`. Never returns another user's memories; a
    /// query with no searchable word finds nothing.
    async fn memory_search(
        &self,
        _user_id: &str,
        _query: &str,
        _limit: usize,
    ) -> Result<Vec<MemoryHit>, StoreError> {
        Err(unsupported(self.name(), "memory_search"))
    }

    /// What a prompt gets: the search hits for `query`, then the user's
    /// best memories to fill up to `limit` (no repeats). One read where the
    /// backend can.
    async fn memory_recall(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        let mut out: Vec<MemoryItem> = self
            .memory_search(user_id, query, limit)
            .await?
            .into_iter()
            .map(|h| h.item)
            .collect();
        if out.len() < limit {
            for m in self.memory_top(user_id, limit).await? {
                if out.len() >= limit {
                    break;
                }
                if !out.iter().any(|o| o.id == m.id) {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    /// Records that these memories went into a prompt at `at` (`uses + 1`,
    /// `last_used = at`). Unknown ids are ignored.
    async fn memory_mark_used(
        &self,
        _ids: &[String],
        _at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Err(unsupported(self.name(), "memory_mark_used"))
    }

    /// Deletes everything the store keeps per user: every memory (active
    /// and superseded, and their full-text entries) and the user record.
    /// Sessions are not touched. Returns how many memories were deleted.
    async fn forget_user(&self, _user_id: &str) -> Result<u64, StoreError> {
        Err(unsupported(self.name(), "forget_user"))
    }

    /// The user's record (profile, preferences, memory count), if any.
    async fn user_get(&self, _user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        Err(unsupported(self.name(), "user_get"))
    }

    /// Sets these profile and preference keys on the user's record
    /// (created if absent; other keys kept), atomically. Returns the record.
    async fn user_update(
        &self,
        _user_id: &str,
        _profile: &JsonMap,
        _preferences: &JsonMap,
    ) -> Result<UserRecord, StoreError> {
        Err(unsupported(self.name(), "user_update"))
    }
}

#[async_trait]
impl<T: Store + ?Sized> Store for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn load_session(
        &self,
        id: &str,
        recent: usize,
    ) -> Result<Option<LoadedSession>, StoreError> {
        (**self).load_session(id, recent).await
    }
    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        (**self).commit(commit).await
    }
    async fn history(
        &self,
        head: MessageId,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, StoreError> {
        (**self).history(head, limit).await
    }
    async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionSummary>, StoreError> {
        (**self).list_sessions(filter).await
    }
    async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        (**self).delete_session(id, updated_before).await
    }
    async fn list_checkpoints(
        &self,
        session_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        (**self).list_checkpoints(session_id).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        (**self).flush().await
    }
    fn release(&self, session_id: &str) {
        (**self).release(session_id)
    }
    fn handoff_requests(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        (**self).handoff_requests()
    }
    async fn shared_changes(
        &self,
        namespace: &str,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<SharedChange>>, StoreError> {
        (**self).shared_changes(namespace).await
    }
    async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        (**self).get_checkpoint(id).await
    }
    async fn list_segments(&self, session_id: &str) -> Result<Vec<SegmentInfo>, StoreError> {
        (**self).list_segments(session_id).await
    }
    async fn external_refs(&self, session_id: &str) -> Result<Vec<MessageId>, StoreError> {
        (**self).external_refs(session_id).await
    }
    async fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        (**self).put_run(run).await
    }
    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        (**self).get_run(id).await
    }
    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        (**self).list_runs(limit).await
    }
    async fn put_task_result(&self, result: &TaskResult) -> Result<(), StoreError> {
        (**self).put_task_result(result).await
    }
    async fn task_results(&self, run_id: &str) -> Result<Vec<TaskResult>, StoreError> {
        (**self).task_results(run_id).await
    }
    async fn shared_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        (**self).shared_get(namespace, key).await
    }
    async fn shared_put(
        &self,
        namespace: &str,
        key: &str,
        value: Option<serde_json::Value>,
        expected_version: Option<u64>,
    ) -> Result<SharedEntry, StoreError> {
        (**self)
            .shared_put(namespace, key, value, expected_version)
            .await
    }
    async fn shared_list(
        &self,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<SharedEntry>, StoreError> {
        (**self).shared_list(namespace, prefix).await
    }
    async fn trim_segments(
        &self,
        session_id: &str,
        expected_version: u64,
        plan: Vec<(SegmentId, Option<u32>)>,
    ) -> Result<u64, StoreError> {
        (**self)
            .trim_segments(session_id, expected_version, plan)
            .await
    }
    async fn memory_put(
        &self,
        item: &MemoryItem,
        max_per_user: usize,
    ) -> Result<MemoryWrite, StoreError> {
        (**self).memory_put(item, max_per_user).await
    }
    async fn memory_list(
        &self,
        user_id: &str,
        include_superseded: bool,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        (**self).memory_list(user_id, include_superseded).await
    }
    async fn memory_top(&self, user_id: &str, limit: usize) -> Result<Vec<MemoryItem>, StoreError> {
        (**self).memory_top(user_id, limit).await
    }
    async fn memory_search(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryHit>, StoreError> {
        (**self).memory_search(user_id, query, limit).await
    }
    async fn memory_recall(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        (**self).memory_recall(user_id, query, limit).await
    }
    async fn memory_mark_used(&self, ids: &[String], at: DateTime<Utc>) -> Result<(), StoreError> {
        (**self).memory_mark_used(ids, at).await
    }
    async fn forget_user(&self, user_id: &str) -> Result<u64, StoreError> {
        (**self).forget_user(user_id).await
    }
    async fn user_get(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        (**self).user_get(user_id).await
    }
    async fn user_update(
        &self,
        user_id: &str,
        profile: &JsonMap,
        preferences: &JsonMap,
    ) -> Result<UserRecord, StoreError> {
        (**self).user_update(user_id, profile, preferences).await
    }
}

/// Opens the store the configuration names.
pub fn open(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    match config.store.backend {
        StoreBackend::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreBackend::Sqlite => Ok(Arc::new(SqliteStore::open(
            &config.store.path,
            config.store.sync,
        )?)),
        // Called from `spawn_blocking` (see `RuntimeBuilder::build`): the
        // runtime's handle is there, and the connection, its reconnects and
        // the lease renewal live on that runtime.
        StoreBackend::Redis => {
            let handle = tokio::runtime::Handle::try_current().map_err(|_| StoreError::Open {
                path: config.store.url.clone(),
                reason: "the redis store must be opened from inside a tokio runtime".into(),
            })?;
            let options = self::redis::RedisOptions::from_config(config);
            let store = handle.block_on(self::redis::RedisStore::open(options))?;
            Ok(Arc::new(store))
        }
    }
}

/// Checks the version precondition of a commit against what is stored.
pub(crate) fn check_version(commit: &Commit, stored: Option<u64>) -> Result<(), StoreError> {
    if commit.expected_version != stored {
        return Err(StoreError::Conflict {
            session: commit.record.id.clone(),
            expected: commit.expected_version,
            found: stored,
        });
    }
    Ok(())
}

/// Microseconds since the epoch: how times are stored.
pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`].
pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}
