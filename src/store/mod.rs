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
    /// The store's server cannot be reached (nothing was written).
    #[error("store at '{url}' is unavailable: {reason}")]
    Unavailable {
        /// The server's address.
        url: String,
        /// Why.
        reason: String,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
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
