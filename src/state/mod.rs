//! Shared state: namespaced, versioned key/value data that several agents
//! and sessions read and write.
//!
//! Each namespace is one [`SharedStateActor`]; its writes are serialised by
//! the actor and durable in the store before they are acknowledged, so a
//! restarted runtime sees them. Every key has a version (1 on first write,
//! +1 per write); [`SharedState::compare_and_set`] writes only if the version
//! is still the one the caller read — the store checks it, so no update is
//! lost even between processes. Subscribers get every change, in version order.
//!
//! ```no_run
//! # async fn demo(rt: troupe::Runtime) -> troupe::Result<()> {
//! let shared = rt.shared_state("project_x");
//! shared.set("topic", "quantum computing").await?;
//! let entry = shared.get("topic").await?.expect("just set");
//! shared.compare_and_set("topic", entry.version, "qubits").await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use actix::prelude::*;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::store::{SharedEntry, Store};

/// One change to a namespace, as subscribers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedChange {
    /// The key.
    pub key: String,
    /// The new value (`None`: deleted).
    pub value: Option<serde_json::Value>,
    /// The key's version after the change.
    pub version: u64,
}

/// The actor owning one namespace.
pub struct SharedStateActor {
    namespace: Arc<str>,
    store: Arc<dyn Store>,
    changes: broadcast::Sender<SharedChange>,
}

impl Actor for SharedStateActor {
    type Context = Context<Self>;
}

impl SharedStateActor {
    pub(crate) fn new(namespace: Arc<str>, store: Arc<dyn Store>) -> Self {
        let (changes, _) = broadcast::channel(1024);
        SharedStateActor {
            namespace,
            store,
            changes,
        }
    }
}

/// Write (or delete, `value: None`) one key, optionally only at a version.
#[derive(Message)]
#[rtype(result = "Result<SharedEntry>")]
pub(crate) struct Put {
    key: String,
    value: Option<serde_json::Value>,
    expected: Option<u64>,
}

impl Handler<Put> for SharedStateActor {
    type Result = AtomicResponse<Self, Result<SharedEntry>>;

    fn handle(&mut self, msg: Put, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let ns = self.namespace.clone();
        let deleted = msg.value.is_none();
        AtomicResponse::new(Box::pin(
            async move {
                store
                    .shared_put(&ns, &msg.key, msg.value, msg.expected)
                    .await
                    .map_err(Error::from)
            }
            .into_actor(self)
            .map(move |res, act, _| {
                if let Ok(e) = &res {
                    let _ = act.changes.send(SharedChange {
                        key: e.key.clone(),
                        value: (!deleted).then(|| e.value.clone()),
                        version: e.version,
                    });
                }
                res
            }),
        ))
    }
}

/// A new receiver of the namespace's changes.
#[derive(Message)]
#[rtype(result = "broadcast::Receiver<SharedChange>")]
pub(crate) struct Subscribe;

impl Handler<Subscribe> for SharedStateActor {
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, _: Subscribe, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.changes.subscribe())
    }
}

/// A handle to one namespace. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct SharedState {
    namespace: Arc<str>,
    addr: Addr<SharedStateActor>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn unavailable(ns: &str, e: MailboxError) -> Error {
    Error::Runtime(format!("shared state '{ns}' is unavailable: {e}"))
}

impl SharedState {
    pub(crate) fn new(
        namespace: Arc<str>,
        addr: Addr<SharedStateActor>,
        store: Arc<dyn Store>,
    ) -> Self {
        SharedState {
            namespace,
            addr,
            store,
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn put(
        &self,
        key: &str,
        value: Option<serde_json::Value>,
        expected: Option<u64>,
    ) -> Result<SharedEntry> {
        if key.is_empty() {
            return Err(Error::InvalidRequest("a shared-state key is empty".into()));
        }
        self.addr
            .send(Put {
                key: key.to_string(),
                value,
                expected,
            })
            .await
            .map_err(|e| unavailable(&self.namespace, e))?
    }

    /// The entry of `key`, if set.
    pub async fn get(&self, key: &str) -> Result<Option<SharedEntry>> {
        Ok(self.store.shared_get(&self.namespace, key).await?)
    }

    /// The value of `key`, if set.
    pub async fn value(&self, key: &str) -> Result<Option<serde_json::Value>> {
        Ok(self.get(key).await?.map(|e| e.value))
    }

    /// Sets `key`; returns its new version.
    pub async fn set(&self, key: &str, value: impl Into<serde_json::Value>) -> Result<u64> {
        Ok(self.put(key, Some(value.into()), None).await?.version)
    }

    /// Sets `key` only if its version is still `expected` (0: only if it is
    /// not set). A stale version is [`StoreError::VersionMismatch`](crate::store::StoreError::VersionMismatch)
    /// (see [`Error::is_version_mismatch`]); nothing is written then.
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected: u64,
        value: impl Into<serde_json::Value>,
    ) -> Result<u64> {
        Ok(self
            .put(key, Some(value.into()), Some(expected))
            .await?
            .version)
    }

    /// Deletes `key`. Returns whether it was set.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        if self.get(key).await?.is_none() {
            return Ok(false);
        }
        self.put(key, None, None).await?;
        Ok(true)
    }

    /// The entries whose key starts with `prefix` (all with `""`), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<SharedEntry>> {
        Ok(self.store.shared_list(&self.namespace, prefix).await?)
    }

    /// Every change from now on, in order. A subscriber that falls more
    /// than 1,024 changes behind gets an error item and then the newer changes.
    pub async fn subscribe(
        &self,
    ) -> Result<impl Stream<Item = Result<SharedChange>> + Send + 'static> {
        let rx = self
            .addr
            .send(Subscribe)
            .await
            .map_err(|e| unavailable(&self.namespace, e))?;
        let ns = self.namespace.clone();
        Ok(futures::stream::unfold(
            (rx, ns),
            |(mut rx, ns)| async move {
                match rx.recv().await {
                    Ok(c) => Some((Ok(c), (rx, ns))),
                    Err(broadcast::error::RecvError::Lagged(n)) => Some((
                        Err(Error::Runtime(format!(
                            "shared state '{ns}': subscriber missed {n} changes"
                        ))),
                        (rx, ns),
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        ))
    }
}
