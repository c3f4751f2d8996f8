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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::Stream;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
pub use crate::store::SharedChange;
use crate::store::{SharedEntry, Store};

/// How long an own write waits for the other nodes' earlier versions of its
/// key before it is shown anyway (only if the store's change feed stalls).
const HOLD: Duration = Duration::from_secs(2);

/// Whether the namespace's changes also come from other nodes.
enum Feed {
    /// Nobody subscribed yet: the store was not asked.
    Unasked,
    /// The store has no feed (one process): own writes are all there is.
    Local,
    /// The store reports every node's writes ([`Store::shared_changes`]).
    Remote,
}

/// The actor owning one namespace.
///
/// With a store shared by several nodes (Redis), subscribers see every
/// node's changes: the first subscription attaches the store's change feed
/// ([`Store::shared_changes`]), and the actor merges it with its own writes —
/// each `(key, version)` is shown once (a key's versions only grow, so
/// anything at or below the last version shown is a repeat), in version order
/// per key. An own write whose predecessor has not been shown yet (another
/// node wrote in between, and its change is still on the way) is held until
/// the feed catches up, or for 2 s at most.
pub struct SharedStateActor {
    namespace: Arc<str>,
    store: Arc<dyn Store>,
    changes: broadcast::Sender<SharedChange>,
    feed: Feed,
    /// With a remote feed: the last version shown of each key.
    shown: HashMap<String, u64>,
    /// With a remote feed: own writes waiting for earlier versions.
    held: BTreeMap<(String, u64), SharedChange>,
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
            feed: Feed::Unasked,
            shown: HashMap::new(),
            held: BTreeMap::new(),
        }
    }

    fn show(&mut self, c: SharedChange) {
        self.shown.insert(c.key.clone(), c.version);
        let _ = self.changes.send(c);
    }

    /// A write made through this actor succeeded.
    fn own_change(&mut self, c: SharedChange, ctx: &mut Context<Self>) {
        if !matches!(self.feed, Feed::Remote) {
            let _ = self.changes.send(c);
            return;
        }
        let last = self.shown.get(&c.key).copied();
        if last.is_some_and(|l| l >= c.version) {
            return; // the feed brought it first
        }
        if c.version == 1 || last == Some(c.version - 1) {
            self.show(c);
            return;
        }
        // Versions before this one are still on their way through the feed
        // (or came before the subscription): wait for them, or for HOLD.
        let at = (c.key.clone(), c.version);
        self.held.insert(at.clone(), c);
        ctx.run_later(HOLD, move |act, _| act.release_held(&at.0, at.1));
    }

    /// Shows the held writes of `key` up to `version` that are still new.
    fn release_held(&mut self, key: &str, version: u64) {
        let due: Vec<(String, u64)> = self
            .held
            .range((key.to_string(), 0)..=(key.to_string(), version))
            .map(|(k, _)| k.clone())
            .collect();
        for at in due {
            if let Some(c) = self.held.remove(&at) {
                if self.shown.get(&c.key).is_none_or(|&l| l < c.version) {
                    self.show(c);
                }
            }
        }
    }

    /// A change reported by the store's feed (any node's, own ones too).
    fn feed_change(&mut self, c: SharedChange) {
        if self.shown.get(&c.key).is_some_and(|&l| l >= c.version) {
            return;
        }
        let (key, version) = (c.key.clone(), c.version);
        self.show(c);
        // Own writes held for this or an earlier version are shown or superseded.
        let stale: Vec<(String, u64)> = self
            .held
            .range((key.clone(), 0)..=(key.clone(), version))
            .map(|(k, _)| k.clone())
            .collect();
        for at in stale {
            self.held.remove(&at);
        }
        // Own writes held for the versions right after it are due now.
        let mut next = version + 1;
        while let Some(c) = self.held.remove(&(key.clone(), next)) {
            self.show(c);
            next += 1;
        }
    }
}

impl StreamHandler<SharedChange> for SharedStateActor {
    fn handle(&mut self, c: SharedChange, _: &mut Context<Self>) {
        self.feed_change(c);
    }

    /// The store dropped the feed (it is shutting down): own writes only.
    fn finished(&mut self, _: &mut Context<Self>) {
        self.feed = Feed::Local;
        for (_, c) in std::mem::take(&mut self.held) {
            if self.shown.get(&c.key).is_none_or(|&l| l < c.version) {
                self.show(c);
            }
        }
        self.shown.clear();
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
            .map(move |res, act, ctx| {
                if let Ok(e) = &res {
                    act.own_change(
                        SharedChange {
                            key: e.key.clone(),
                            value: (!deleted).then(|| e.value.clone()),
                            version: e.version,
                        },
                        ctx,
                    );
                }
                res
            }),
        ))
    }
}

/// A new receiver of the namespace's changes.
#[derive(Message)]
#[rtype(result = "Result<broadcast::Receiver<SharedChange>>")]
pub(crate) struct Subscribe;

impl Handler<Subscribe> for SharedStateActor {
    type Result = AtomicResponse<Self, Result<broadcast::Receiver<SharedChange>>>;

    fn handle(&mut self, _: Subscribe, _: &mut Context<Self>) -> Self::Result {
        if !matches!(self.feed, Feed::Unasked) {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(self.changes.subscribe()))));
        }
        // The first subscriber attaches the store's feed of other nodes'
        // writes (if it has one) before it gets its receiver, so it misses
        // nothing written after `subscribe` returns.
        let store = self.store.clone();
        let ns = self.namespace.clone();
        AtomicResponse::new(Box::pin(
            async move { store.shared_changes(&ns).await }
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(Some(mut rx)) => {
                        act.feed = Feed::Remote;
                        ctx.add_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
                        Ok(act.changes.subscribe())
                    }
                    Ok(None) => {
                        act.feed = Feed::Local;
                        Ok(act.changes.subscribe())
                    }
                    Err(e) => Err(Error::Runtime(format!(
                        "shared state '{}': cannot follow the other nodes' changes: {e}",
                        act.namespace
                    ))),
                }),
        ))
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

    /// Every change from now on, in version order per key. A subscriber that
    /// falls more than 1,024 changes behind gets an error item and then the
    /// newer changes. With a store several nodes share (Redis), this includes
    /// the changes made through the other nodes, each once; with Redis down
    /// the first subscription of a namespace fails.
    pub async fn subscribe(
        &self,
    ) -> Result<impl Stream<Item = Result<SharedChange>> + Send + 'static> {
        let rx = self
            .addr
            .send(Subscribe)
            .await
            .map_err(|e| unavailable(&self.namespace, e))??;
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
