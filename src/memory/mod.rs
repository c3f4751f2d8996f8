//! Memory: the short-term context window and long-term per-user memories.
//!
//! - **Short-term**: what a turn's prompt holds — the agent's instructions,
//!   the user's profile and preferences, the memories recalled for this
//!   message, and the recent history: the last `memory.window` turns, cut
//!   further to `memory.max_context_tokens` when that is set (counted with
//!   [`estimate_message_tokens`]). Built in `session/context.rs`.
//! - **Long-term**: [`MemoryItem`]s per user, kept in the runtime's store
//!   (SQLite: table `memories` with an FTS5 index). A session with a user
//!   learns from what the user says (the [`RuleExtractor`], or your own
//!   [`MemoryExtractor`]), and every turn recalls the memories whose words
//!   match the message (BM25), then the user's best ones, up to
//!   `memory.retrieve`. Each candidate gets a quality score ([`QualityScorer`],
//!   default `0.4 relevance + 0.3 recency + 0.3 importance`); below
//!   `quality_threshold` it is not stored, and past `max_memories` per user
//!   the lowest go. A newer memory of the same subject supersedes the older
//!   one, which stays as history but is never recalled again.
//!
//! ```no_run
//! # async fn demo() -> troupe::Result<()> {
//! use troupe::memory::{Memory, MemoryProvider};
//! use troupe::{Agent, Runtime};
//! let rt = Runtime::builder().sqlite("data/troupe.db").build().await?;
//! let memory = Memory::builder()
//!     .provider(MemoryProvider::Sqlite)
//!     .quality_threshold(0.7)
//!     .max_memories(1000)
//!     .build();
//! let agent = Agent::builder("MemoryAgent")
//!     .instructions("Remember user preferences")
//!     .memory(memory.clone())
//!     .build();
//! let s1 = rt.session("user_123").agent(agent.clone()).persist_memory(true).open().await?;
//! s1.chat("I prefer Python over JavaScript").await?;
//! let s2 = rt.session("user_123-b").user("user_123").agent(agent).open().await?;
//! s2.chat("What's my favourite programming language?").await?; // the prompt carries the Python memory
//! println!("{:#?}", rt.memories().list("user_123").await?);
//! # Ok(()) }
//! ```

pub mod extract;
mod score;
mod text;

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

pub use crate::store::{MemoryHit, MemoryItem, MemoryKind, MemoryWrite, UserRecord};
pub use extract::{Candidate, MemoryExtractor, RuleExtractor};
pub use score::{recency, DefaultScorer, QualityScorer, RECENCY_HALF_LIFE_DAYS};
pub use text::{
    estimate_message_tokens, is_stopword, search_terms, topics, MAX_SEARCH_TERMS,
    MESSAGE_OVERHEAD_TOKENS,
};

use crate::config::MemoryConfig;
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::store::{SessionFilter, Store, StoreError};

/// Where long-term memories live. They always live in the runtime's store
/// (so forgetting a user, checkpoints and sessions all see one place); a
/// provider other than [`MemoryProvider::Store`] is an assertion that the
/// store is that backend, checked when a session opens with the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryProvider {
    /// Whatever store the runtime uses (the default).
    #[default]
    Store,
    /// The embedded SQLite store (FTS5 / BM25 retrieval).
    Sqlite,
    /// The in-process memory store (a simpler word-overlap ranking).
    Memory,
    /// A Redis store (when it implements memories).
    Redis,
}

impl MemoryProvider {
    /// Checks the runtime's store is the one this provider names.
    pub(crate) fn check(self, store: &str) -> Result<()> {
        let want = match self {
            MemoryProvider::Store => return Ok(()),
            MemoryProvider::Sqlite => "sqlite",
            MemoryProvider::Memory => "memory",
            MemoryProvider::Redis => "redis",
        };
        if want == store {
            Ok(())
        } else {
            Err(Error::InvalidRequest(format!(
                "the agent's memory provider is '{want}' but the runtime's store is '{store}' \
                 (memories live in the runtime's store; use MemoryProvider::Store for any)"
            )))
        }
    }
}

struct Inner {
    provider: MemoryProvider,
    quality_threshold: Option<f64>,
    max_memories: Option<usize>,
    retrieve: Option<usize>,
    extract: Option<bool>,
    scorer: RwLock<Arc<dyn QualityScorer>>,
    extractor: RwLock<Arc<dyn MemoryExtractor>>,
}

/// A long-term memory policy: thresholds, limits, scorer and extractor.
/// Give it to agents with [`AgentBuilder::memory`](crate::agent::AgentBuilder::memory);
/// settings left unset come from the runtime's `[memory]` config. Cheap to
/// clone; clones share the scorer, so [`set_quality_scorer`](Self::set_quality_scorer)
/// reaches every agent holding it.
#[derive(Clone)]
pub struct Memory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("provider", &self.inner.provider)
            .field("quality_threshold", &self.inner.quality_threshold)
            .field("max_memories", &self.inner.max_memories)
            .field("retrieve", &self.inner.retrieve)
            .finish()
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::builder().build()
    }
}

/// Builds a [`Memory`].
#[derive(Default)]
pub struct MemoryBuilder {
    provider: MemoryProvider,
    quality_threshold: Option<f64>,
    max_memories: Option<usize>,
    retrieve: Option<usize>,
    extract: Option<bool>,
    scorer: Option<Arc<dyn QualityScorer>>,
    extractor: Option<Arc<dyn MemoryExtractor>>,
}

impl MemoryBuilder {
    /// Which store backend the memories are expected in (default: any).
    pub fn provider(mut self, p: MemoryProvider) -> Self {
        self.provider = p;
        self
    }
    /// Candidates scoring below this are not stored (default `memory.quality_threshold`).
    pub fn quality_threshold(mut self, t: f64) -> Self {
        self.quality_threshold = Some(t);
        self
    }
    /// Most memories kept per user (default `memory.max_memories`).
    pub fn max_memories(mut self, n: usize) -> Self {
        self.max_memories = Some(n);
        self
    }
    /// Memories put into each prompt (default `memory.retrieve`).
    pub fn retrieve(mut self, n: usize) -> Self {
        self.retrieve = Some(n);
        self
    }
    /// Whether to learn memories from what the user says (default `memory.extract`).
    pub fn extract(mut self, on: bool) -> Self {
        self.extract = Some(on);
        self
    }
    /// The quality scorer (default [`DefaultScorer`]).
    pub fn scorer(mut self, s: impl QualityScorer) -> Self {
        self.scorer = Some(Arc::new(s));
        self
    }
    /// The extractor (default [`RuleExtractor`]).
    pub fn extractor(mut self, e: impl MemoryExtractor) -> Self {
        self.extractor = Some(Arc::new(e));
        self
    }
    /// The policy.
    pub fn build(self) -> Memory {
        Memory {
            inner: Arc::new(Inner {
                provider: self.provider,
                quality_threshold: self.quality_threshold,
                max_memories: self.max_memories,
                retrieve: self.retrieve,
                extract: self.extract,
                scorer: RwLock::new(self.scorer.unwrap_or_else(|| Arc::new(DefaultScorer))),
                extractor: RwLock::new(self.extractor.unwrap_or_else(|| Arc::new(RuleExtractor))),
            }),
        }
    }
}

/// A [`Memory`] resolved against the config, for one use.
#[derive(Clone)]
pub(crate) struct Policy {
    pub threshold: f64,
    pub max_memories: usize,
    pub retrieve: usize,
    pub extract: bool,
    pub scorer: Arc<dyn QualityScorer>,
    pub extractor: Arc<dyn MemoryExtractor>,
}

impl Memory {
    /// Starts building a policy.
    pub fn builder() -> MemoryBuilder {
        MemoryBuilder::default()
    }

    /// Replaces the quality scorer — a closure `|m: &MemoryItem| -> f64` or
    /// any [`QualityScorer`]. Applies to memories scored from now on.
    pub fn set_quality_scorer(&self, scorer: impl QualityScorer) {
        self.set_scorer(Arc::new(scorer));
    }

    /// [`set_quality_scorer`](Self::set_quality_scorer) with a shared scorer.
    pub fn set_scorer(&self, scorer: Arc<dyn QualityScorer>) {
        *self.inner.scorer.write().unwrap_or_else(|p| p.into_inner()) = scorer;
    }

    /// Replaces the extractor.
    pub fn set_extractor(&self, extractor: impl MemoryExtractor) {
        *self
            .inner
            .extractor
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(extractor);
    }

    /// The quality score this policy gives `item`, clamped to [0, 1].
    pub fn score(&self, item: &MemoryItem) -> f64 {
        let s = self
            .inner
            .scorer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        score::clamp(s.score(item))
    }

    /// The provider it was built with.
    pub fn provider(&self) -> MemoryProvider {
        self.inner.provider
    }

    /// Whether two handles are the same policy.
    pub fn ptr_eq(&self, other: &Memory) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn policy(&self, c: &MemoryConfig) -> Policy {
        let i = &self.inner;
        Policy {
            threshold: i.quality_threshold.unwrap_or(c.quality_threshold),
            max_memories: i.max_memories.unwrap_or(c.max_memories),
            retrieve: i.retrieve.unwrap_or(c.retrieve),
            extract: i.extract.unwrap_or(c.extract),
            scorer: i.scorer.read().unwrap_or_else(|p| p.into_inner()).clone(),
            extractor: i
                .extractor
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// What adding a memory did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AddOutcome {
    /// Stored (it may have superseded older memories and evicted the lowest).
    Stored {
        /// The memory, with its score.
        item: MemoryItem,
        /// Memories it superseded (kept as history).
        superseded: Vec<String>,
        /// Memories evicted to stay within `max_memories` (may include this one
        /// if it scored lowest of all).
        evicted: Vec<String>,
    },
    /// An active memory of the same subject already says this.
    Duplicate {
        /// Its id.
        existing: String,
    },
    /// Its quality score is below the threshold: not stored.
    Rejected {
        /// The candidate, with its score.
        item: MemoryItem,
        /// The threshold it missed.
        threshold: f64,
    },
}

/// Checks a user id: not empty, at most 256 bytes, no control characters.
pub fn validate_user_id(user: &str) -> Result<()> {
    if user.trim().is_empty() || user.len() > 256 || user.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(format!(
            "invalid user id {:?}: it must be 1 to 256 bytes without control characters",
            user.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// A memory item for a candidate (not yet scored).
pub(crate) fn item_for(user: &str, session: Option<&str>, c: Candidate) -> MemoryItem {
    MemoryItem {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user.to_string(),
        content: c.content,
        kind: c.kind,
        subject: c.subject,
        relevance: c.relevance.clamp(0.0, 1.0),
        importance: c.importance.clamp(0.0, 1.0),
        score: 0.0,
        created_at: crate::store::now(),
        last_used: None,
        uses: 0,
        superseded_by: None,
        session_id: session.map(str::to_string),
    }
}

/// Scores `item` and, at or above the threshold, stores it.
pub(crate) async fn store_item(
    store: &Arc<dyn Store>,
    policy: &Policy,
    mut item: MemoryItem,
) -> Result<AddOutcome> {
    item.score = score::clamp(policy.scorer.score(&item));
    if item.score < policy.threshold {
        return Ok(AddOutcome::Rejected {
            item,
            threshold: policy.threshold,
        });
    }
    let w = store.memory_put(&item, policy.max_memories.max(1)).await?;
    Ok(match w.duplicate_of {
        Some(existing) => AddOutcome::Duplicate { existing },
        None => AddOutcome::Stored {
            item,
            superseded: w.superseded,
            evicted: w.evicted,
        },
    })
}

/// The one memory explicit text becomes: the extractor's reading of it if
/// it finds exactly one, else the text itself as a note (relevance 1,
/// importance 0.8: someone asked for it to be remembered).
pub(crate) fn explicit_candidate(policy: &Policy, text: &str) -> Candidate {
    let mut found = policy.extractor.extract(text);
    if found.len() == 1 {
        if let Some(c) = found.pop() {
            return c;
        }
    }
    Candidate {
        content: text.trim().chars().take(2_000).collect(),
        kind: MemoryKind::Note,
        subject: None,
        relevance: 1.0,
        importance: 0.8,
    }
}

/// What [`Memories::forget`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForgetReport {
    /// The user.
    pub user_id: String,
    /// Memories deleted (active and superseded).
    pub memories_deleted: u64,
    /// Sessions deleted (with their checkpoints), when asked.
    pub sessions_deleted: Vec<String>,
}

/// A runtime's long-term memories, user by user: list, search, add, forget.
/// From [`Runtime::memories`].
#[derive(Clone)]
pub struct Memories {
    rt: Runtime,
    memory: Memory,
}

impl Memories {
    /// Uses this policy (threshold, limits, scorer) instead of the runtime's.
    pub fn with(mut self, memory: Memory) -> Self {
        self.memory = memory;
        self
    }

    fn policy(&self) -> Policy {
        self.memory.policy(&self.rt.config().memory)
    }

    fn store(&self) -> Arc<dyn Store> {
        self.rt.store()
    }

    /// Remembers `text` for `user` (scored; see [`AddOutcome`]). Text the
    /// extractor recognises ("I now prefer Rust") is stored as it reads it,
    /// with its subject, so it supersedes what it replaces.
    pub async fn add(&self, user: &str, text: &str) -> Result<AddOutcome> {
        validate_user_id(user)?;
        if text.trim().is_empty() {
            return Err(Error::InvalidRequest("the memory text is empty".into()));
        }
        let policy = self.policy();
        let item = item_for(user, None, explicit_candidate(&policy, text));
        store_item(&self.store(), &policy, item).await
    }

    /// Stores a memory built by the caller (its id, user and times are
    /// kept; its score is recomputed by the policy's scorer).
    pub async fn add_item(&self, item: MemoryItem) -> Result<AddOutcome> {
        validate_user_id(&item.user_id)?;
        let policy = self.policy();
        store_item(&self.store(), &policy, item).await
    }

    /// The user's active memories, oldest first.
    pub async fn list(&self, user: &str) -> Result<Vec<MemoryItem>> {
        validate_user_id(user)?;
        Ok(self.store().memory_list(user, false).await?)
    }

    /// All of the user's memories, superseded ones too, oldest first.
    pub async fn history(&self, user: &str) -> Result<Vec<MemoryItem>> {
        validate_user_id(user)?;
        Ok(self.store().memory_list(user, true).await?)
    }

    /// Full-text search of the user's active memories, best first.
    pub async fn search(&self, user: &str, query: &str, limit: usize) -> Result<Vec<MemoryHit>> {
        validate_user_id(user)?;
        Ok(self.store().memory_search(user, query, limit).await?)
    }

    /// What a prompt for `message` would recall for the user.
    pub async fn recall(&self, user: &str, message: &str) -> Result<Vec<MemoryItem>> {
        validate_user_id(user)?;
        let limit = self.policy().retrieve;
        Ok(self.store().memory_recall(user, message, limit).await?)
    }

    /// The user's record: profile and preferences that follow them into
    /// new sessions.
    pub async fn user(&self, user: &str) -> Result<Option<UserRecord>> {
        validate_user_id(user)?;
        Ok(self.store().user_get(user).await?)
    }

    /// Deletes the user's memories and user record everywhere in the store
    /// and, with `with_sessions`, their sessions and checkpoints too.
    pub async fn forget(&self, user: &str, with_sessions: bool) -> Result<ForgetReport> {
        self.rt.forget_user(user, with_sessions).await
    }
}

impl Runtime {
    /// The runtime's long-term memories (policy: the one given to
    /// [`RuntimeBuilder::memory`](crate::RuntimeBuilder::memory), else `[memory]`).
    pub fn memories(&self) -> Memories {
        Memories {
            rt: self.clone(),
            memory: self.core().memory.clone(),
        }
    }

    /// Forgets a user: deletes their memories and user record (profile,
    /// preferences) everywhere in the store, and with `with_sessions` every
    /// session of theirs with its checkpoints (live ones are stopped first).
    /// Nothing of theirs is searchable afterwards.
    pub async fn forget_user(&self, user: &str, with_sessions: bool) -> Result<ForgetReport> {
        validate_user_id(user)?;
        let core = self.core();
        let mut sessions_deleted = Vec::new();
        if with_sessions {
            // Sessions first, so none of them can learn anything new meanwhile.
            let sessions = core
                .store
                .list_sessions(&SessionFilter {
                    user_id: Some(user.to_string()),
                    ..Default::default()
                })
                .await?;
            for s in sessions {
                if core.delete_session(&s.id, None).await? {
                    sessions_deleted.push(s.id);
                }
            }
        }
        // Turns in flight on the user's live sessions store what they learn
        // after their commit: let them end (passivating waits for the turn in
        // hand) before deleting, and once more after, so a turn that was
        // taken while the first deletion ran is deleted too.
        drain_user(&core, user).await?;
        let mut memories_deleted = core.store.forget_user(user).await?;
        drain_user(&core, user).await?;
        memories_deleted += core.store.forget_user(user).await?;
        Ok(ForgetReport {
            user_id: user.to_string(),
            memories_deleted,
            sessions_deleted,
        })
    }
}

/// Stops the user's live sessions after the turns they have taken (their
/// state is durable; the next call reactivates them from the store).
async fn drain_user(core: &crate::runtime::Core, user: &str) -> Result<()> {
    let sessions = core
        .store
        .list_sessions(&SessionFilter {
            user_id: Some(user.to_string()),
            ..Default::default()
        })
        .await?;
    for s in sessions {
        if let Some(addr) = core.registry.get(&s.id) {
            let _ = addr.send(crate::session::actor::Passivate).await;
            core.registry.forget(&s.id, &addr);
        }
    }
    Ok(())
}

/// Whether a store error means "this backend has no memories": the
/// runtime then goes on without long-term memory.
pub(crate) fn is_unsupported(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::Unsupported(_)))
}

/// The distinct words of `text` as [`search_terms`] sees them.
pub(crate) fn extract_words(text: &str) -> std::collections::HashSet<String> {
    text::words(text).collect()
}
