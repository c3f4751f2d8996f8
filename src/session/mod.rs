//! Sessions: the [`Session`] handle, its builder, and the actor behind it.
//!
//! A session is a conversation that remembers: its history, the user's
//! profile and preferences, application data. Each live session is one
//! [`SessionActor`](actor::SessionActor); the [`Session`] handle is a cheap,
//! `Send + Sync + Clone` name for it that works from any tokio program. If the
//! actor was passivated (idle), the next call activates it again from the
//! store, transparently.
//!
//! ```no_run
//! # async fn demo() -> troupe::Result<()> {
//! let rt = troupe::Runtime::builder().memory_store().build().await?;
//! let session = rt.session("user_123").open().await?;
//! let reply = session.chat("My name is Alice").await?;
//! println!("{}", reply.reply);
//! # Ok(()) }
//! ```

pub(crate) mod actor;
mod analytics;
mod context;
pub(crate) mod registry;

pub use analytics::{AgentStats, Feedback, SessionAnalytics, SessionContext};

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};

pub use actor::SessionState;

use crate::agent::Agent;
use crate::checkpoint::{self, Branch, Checkpoint, CheckpointKind, MergeReport, Version};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::store::file::{self, SessionDocument};
use crate::store::StoreError;
use crate::store::{JsonMap, Message, MessageId, Role, SessionRecord};

/// The longest session id accepted.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// Checks that a session id is safe everywhere it goes: in file names, URLs
/// and store keys. Letters, digits, `-`, `_`, `.`, `@`, `:`; not starting
/// with `.`; at most [`MAX_SESSION_ID_LEN`] bytes.
pub fn validate_session_id(id: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidSessionId {
            id: id.chars().take(MAX_SESSION_ID_LEN + 8).collect(),
            reason: reason.into(),
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > MAX_SESSION_ID_LEN {
        return bad(&format!("it is longer than {MAX_SESSION_ID_LEN} bytes"));
    }
    if id.starts_with('.') {
        return bad("it starts with '.'");
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':')))
    {
        return bad(&format!(
            "it contains {c:?} (allowed: letters, digits, '-', '_', '.', '@', ':')"
        ));
    }
    Ok(())
}

/// The answer to one chat turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatReply {
    /// The session.
    pub session_id: String,
    /// The reply's message id.
    pub message_id: MessageId,
    /// The reply text.
    pub reply: String,
    /// The agent that answered.
    pub agent: String,
    /// Metadata of the reply (model, usage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// A piece of a streamed reply.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// More reply text.
    Delta(String),
    /// The turn is done and durable.
    Done(ChatReply),
}

/// A session's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionMetadata {
    /// The session id.
    pub session_id: String,
    /// Its user.
    pub user_id: Option<String>,
    /// Its agents, the default first.
    pub agents: Vec<String>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
    /// Completed turns.
    pub interactions: u64,
    /// The head of the history.
    pub head: Option<MessageId>,
    /// Application metadata.
    pub custom: JsonMap,
}

impl From<&SessionRecord> for SessionMetadata {
    fn from(r: &SessionRecord) -> Self {
        SessionMetadata {
            session_id: r.id.clone(),
            user_id: r.user_id.clone(),
            agents: r.agents.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            interactions: r.interactions,
            head: r.head,
            custom: r.metadata.clone(),
        }
    }
}

/// A message to put into a history with [`Session::set_history`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The agent, if any.
    #[serde(default)]
    pub agent: Option<String>,
    /// When (now, if unset).
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// Metadata.
    #[serde(default)]
    pub meta: Option<serde_json::Value>,
}

impl NewMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        NewMessage {
            role,
            content: content.into(),
            agent: None,
            created_at: None,
            meta: None,
        }
    }
}

impl From<Message> for NewMessage {
    fn from(m: Message) -> Self {
        NewMessage {
            role: m.role,
            content: m.content,
            agent: m.agent,
            created_at: Some(m.created_at),
            meta: m.meta,
        }
    }
}

/// A change to a session's small state.
#[derive(Clone, Debug, PartialEq)]
pub enum StateChange {
    /// Set a preference.
    Preference(String, serde_json::Value),
    /// Set a profile field.
    Profile(String, serde_json::Value),
    /// Set a user-data key.
    UserData(String, serde_json::Value),
    /// Set an application metadata key.
    Metadata(String, serde_json::Value),
    /// Remove a user-data key.
    RemoveUserData(String),
}

impl StateChange {
    fn apply(self, r: &mut SessionRecord) {
        match self {
            StateChange::Preference(k, v) => {
                r.preferences.insert(k, v);
            }
            StateChange::Profile(k, v) => {
                r.profile.insert(k, v);
            }
            StateChange::UserData(k, v) => {
                r.user_data.insert(k, v);
            }
            StateChange::Metadata(k, v) => {
                r.metadata.insert(k, v);
            }
            StateChange::RemoveUserData(k) => {
                r.user_data.remove(&k);
            }
        }
    }
}

/// Opens a session: `rt.session(id).agent(a).user(u).open()`.
pub struct SessionBuilder {
    rt: Runtime,
    id: Option<String>,
    user_id: Option<String>,
    agents: Vec<Agent>,
    agent_names: Vec<String>,
    create: bool,
    shared_state: Option<String>,
    persist_memory: Option<bool>,
}

impl SessionBuilder {
    pub(crate) fn new(rt: Runtime, id: Option<String>) -> Self {
        SessionBuilder {
            rt,
            id,
            user_id: None,
            agents: Vec::new(),
            agent_names: Vec::new(),
            create: true,
            shared_state: None,
            persist_memory: None,
        }
    }

    /// Long-term memory for this session, on or off (remembered with the
    /// session; default: on when the agent has a `Memory` or
    /// `memory.long_term` is set). On, for a session without a user, makes
    /// the session id its user id — so `rt.session("user_123")
    /// .persist_memory(true)` remembers for user `user_123`.
    pub fn persist_memory(mut self, on: bool) -> Self {
        self.persist_memory = Some(on);
        self
    }

    /// The user this session belongs to.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Adds an agent (the first added is the default).
    pub fn agent(mut self, agent: Agent) -> Self {
        self.agents.push(agent);
        self
    }

    /// Adds several agents.
    pub fn agents(mut self, agents: impl IntoIterator<Item = Agent>) -> Self {
        self.agents.extend(agents);
        self
    }

    /// Adds an agent by name (from `agents/`).
    pub fn agent_named(mut self, name: impl Into<String>) -> Self {
        self.agent_names.push(name.into());
        self
    }

    /// Shares this namespace with the session's agents: its entries are put
    /// in every prompt (remembered with the session).
    pub fn shared_state(mut self, shared: crate::state::SharedState) -> Self {
        self.shared_state = Some(shared.namespace().to_string());
        self
    }

    /// Open only an existing session: a missing one is [`Error::SessionNotFound`].
    pub fn existing(mut self) -> Self {
        self.create = false;
        self
    }

    /// Opens (creating if needed) the session.
    pub async fn open(self) -> Result<Session> {
        let id = self.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        validate_session_id(&id)?;
        let core = self.rt.core();
        let mut bindings = Vec::new();
        for a in &self.agents {
            bindings.push(core.bind(a)?);
        }
        for n in &self.agent_names {
            bindings.push(core.binding_by_name(n)?);
        }
        for b in &bindings {
            if let Some(m) = &b.memory {
                m.provider().check(core.store.name())?;
            }
        }
        if let Some(u) = &self.user_id {
            crate::memory::validate_user_id(u)?;
        }
        let session = Session {
            rt: self.rt.clone(),
            id: Arc::from(id.as_str()),
        };
        let create = self.create;
        let user_id = self.user_id;
        let shared_state = self.shared_state;
        let persist_memory = self.persist_memory;
        session
            .call(move || actor::Open {
                create,
                user_id: user_id.clone(),
                agents: bindings.clone(),
                shared_state: shared_state.clone(),
                persist_memory,
            })
            .await??;
        Ok(session)
    }

    /// A handle to an existing session without a round trip to its actor
    /// (what [`open`](Self::open) with [`existing`](Self::existing) costs):
    /// for a hot path that sends one call per handle, like the daemon's chat
    /// route. The session is not checked here: the first call on a session
    /// that does not exist fails with [`Error::SessionNotFound`] and keeps
    /// nothing alive. The builder's user, agents and shared-state options
    /// need [`open`](Self::open); setting any of them here is an error.
    pub fn attach(self) -> Result<Session> {
        let id = self.id.ok_or_else(|| {
            Error::InvalidRequest("attach needs a session id (rt.session(id))".into())
        })?;
        validate_session_id(&id)?;
        if self.user_id.is_some()
            || !self.agents.is_empty()
            || !self.agent_names.is_empty()
            || self.shared_state.is_some()
            || self.persist_memory.is_some()
        {
            return Err(Error::InvalidRequest(format!(
                "session '{id}': attach takes no user, agents, shared state or memory options; use open()"
            )));
        }
        Ok(Session {
            rt: self.rt,
            id: Arc::from(id.as_str()),
        })
    }

    /// Opens the session, runs `body` with it, and closes it afterwards —
    /// also when `body` fails. Every turn is durable when acknowledged, so
    /// closing only releases the live actor.
    pub async fn scope<F, Fut, T>(self, body: F) -> Result<T>
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let session = self.open().await?;
        let result = body(session.clone()).await;
        let closed = session.close().await;
        let value = result?;
        closed?;
        Ok(value)
    }
}

/// A handle to a session. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Session {
    rt: Runtime,
    id: Arc<str>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

impl Session {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends a message to the session's actor, activating it if needed. If
    /// the actor stopped before taking the message (it was passivated at
    /// that moment), the message is sent once more to a fresh actor.
    async fn call<M, F>(&self, make: F) -> Result<M::Result>
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        actor::SessionActor: actix::Handler<M>,
        F: Fn() -> M,
    {
        let core = self.rt.core();
        for _ in 0..3 {
            let addr = core.registry.activate(&self.id, &core)?;
            match addr.send(make()).await {
                Ok(r) => return Ok(r),
                Err(actix::MailboxError::Closed) => {
                    core.registry.forget(&self.id, &addr);
                    continue;
                }
                Err(actix::MailboxError::Timeout) => {
                    return Err(Error::SessionUnavailable {
                        id: self.id.to_string(),
                        reason: "timed out".into(),
                    })
                }
            }
        }
        Err(Error::SessionUnavailable {
            id: self.id.to_string(),
            reason: "its actor stopped three times while taking this request (a panic?); \
                     acknowledged turns are safe in the store"
                .into(),
        })
    }

    /// One turn with the default agent: the reply is returned once the
    /// turn (message and reply) is durable in the store.
    pub async fn chat(&self, message: impl Into<String>) -> Result<ChatReply> {
        let message = message.into();
        self.call(|| actor::Chat {
            message: message.clone(),
            agent: None,
        })
        .await?
    }

    /// One turn with the named agent of this session.
    pub async fn chat_with(&self, agent: &str, message: impl Into<String>) -> Result<ChatReply> {
        let message = message.into();
        self.call(|| actor::Chat {
            message: message.clone(),
            agent: Some(agent.to_string()),
        })
        .await?
    }

    /// Runs one agent of a multi-agent session on the shared conversation:
    /// it sees every earlier message, including the other agents' (named).
    pub async fn run_agent(&self, agent: &str, prompt: impl Into<String>) -> Result<ChatReply> {
        self.chat_with(agent, prompt).await
    }

    /// Appends a result (a workflow task's output, a tool's answer) to the
    /// history without calling a model; it is durable when this returns.
    pub async fn add_result(
        &self,
        agent: &str,
        content: impl Into<String>,
        meta: Option<serde_json::Value>,
    ) -> Result<MessageId> {
        let mut m = NewMessage::new(Role::Assistant, content);
        m.agent = Some(agent.to_string());
        m.meta = meta;
        let ids = self
            .call(|| actor::Append {
                messages: vec![m.clone()],
            })
            .await??;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::Runtime("append returned no id".into()))
    }

    /// One turn whose reply arrives piece by piece. The last event is
    /// [`StreamEvent::Done`], sent once the turn is durable.
    pub async fn chat_stream(
        &self,
        message: impl Into<String>,
    ) -> Result<impl Stream<Item = Result<StreamEvent>> + Send + 'static> {
        self.chat_stream_with(None, message).await
    }

    /// [`chat_stream`](Self::chat_stream) with a named agent.
    pub async fn chat_stream_with(
        &self,
        agent: Option<&str>,
        message: impl Into<String>,
    ) -> Result<impl Stream<Item = Result<StreamEvent>> + Send + 'static> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let message = message.into();
        let id = self.id.to_string();
        let core = self.rt.core();
        core.registry.activate(&self.id, &core)?;
        // Sent from a task, so that a message racing a passivation is sent
        // again to a fresh actor, as `chat` does.
        let this = self.clone();
        let agent = agent.map(str::to_string);
        tokio::spawn(async move {
            let sent = this
                .call(|| actor::ChatStream {
                    message: message.clone(),
                    agent: agent.clone(),
                    tx: tx.clone(),
                })
                .await;
            if let Err(e) = sent {
                let _ = tx.send(Err(e));
            }
        });
        Ok(futures::stream::unfold(
            (rx, false),
            move |(mut rx, finished)| {
                let id = id.clone();
                async move {
                    if finished {
                        return None;
                    }
                    match rx.recv().await {
                        Some(Ok(StreamEvent::Done(r))) => {
                            Some((Ok(StreamEvent::Done(r)), (rx, true)))
                        }
                        Some(Err(e)) => Some((Err(e), (rx, true))),
                        Some(ev) => Some((ev, (rx, false))),
                        None => Some((
                            Err(Error::SessionUnavailable {
                                id,
                                reason: "the session stopped before the turn ended".into(),
                            }),
                            (rx, true),
                        )),
                    }
                }
            },
        ))
    }

    /// The whole history, root to head.
    pub async fn history(&self) -> Result<Vec<Message>> {
        self.call(|| actor::History { limit: None }).await?
    }

    /// The last `limit` messages of the history.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Message>> {
        self.call(|| actor::History { limit: Some(limit) }).await?
    }

    /// Replaces the history. The old messages stay in the store: unless a
    /// kept checkpoint already points at the old head, a `Branch` checkpoint
    /// of it is taken in the same commit, so this loses nothing (even to
    /// garbage collection).
    pub async fn set_history(&self, messages: Vec<NewMessage>) -> Result<()> {
        self.call(|| actor::SetHistory {
            messages: messages.clone(),
            record: None,
        })
        .await?
    }

    /// The session's metadata (created, updated, interaction count, …).
    pub async fn metadata(&self) -> Result<SessionMetadata> {
        self.call(|| actor::Info).await?
    }

    /// The session's user.
    pub async fn user_id(&self) -> Result<Option<String>> {
        Ok(self.metadata().await?.user_id)
    }

    /// The whole durable record (profile, preferences, user data, metadata).
    pub async fn record(&self) -> Result<SessionRecord> {
        self.call(|| actor::Record).await?
    }

    /// The user's preferences.
    pub async fn preferences(&self) -> Result<JsonMap> {
        Ok(self.record().await?.preferences)
    }

    /// The user's profile.
    pub async fn profile(&self) -> Result<JsonMap> {
        Ok(self.record().await?.profile)
    }

    /// The application data.
    pub async fn user_data(&self) -> Result<JsonMap> {
        Ok(self.record().await?.user_data)
    }

    /// Applies one change to the small state, durably.
    pub async fn update(&self, change: StateChange) -> Result<()> {
        self.call(|| actor::Update(change.clone())).await?
    }

    /// Sets a preference (language, timezone, output format, …).
    pub async fn update_preference(
        &self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Result<()> {
        self.update(StateChange::Preference(key.into(), value.into()))
            .await
    }

    /// Sets a profile field.
    pub async fn update_profile(
        &self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Result<()> {
        self.update(StateChange::Profile(key.into(), value.into()))
            .await
    }

    /// Sets an application-data key.
    pub async fn set_user_data(
        &self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Result<()> {
        self.update(StateChange::UserData(key.into(), value.into()))
            .await
    }

    /// Sets an application metadata key.
    pub async fn set_metadata(
        &self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Result<()> {
        self.update(StateChange::Metadata(key.into(), value.into()))
            .await
    }

    /// Releases the live actor. The session stays in the store; the next
    /// call on any handle activates it again.
    pub async fn close(&self) -> Result<()> {
        let core = self.rt.core();
        if let Some(addr) = core.registry.get(&self.id) {
            let _ = addr.send(actor::Passivate).await;
            core.registry.forget(&self.id, &addr);
        }
        Ok(())
    }

    /// Takes a checkpoint labelled `label`: the head plus a snapshot of the
    /// small state. O(1) whatever the history's length; kept until deleted.
    pub async fn checkpoint(&self, label: impl Into<String>) -> Result<Checkpoint> {
        self.checkpoint_with(Some(label.into()), None, CheckpointKind::Manual)
            .await
    }

    /// Takes a checkpoint with an optional label and description.
    pub async fn checkpoint_with(
        &self,
        label: Option<String>,
        description: Option<String>,
        kind: CheckpointKind,
    ) -> Result<Checkpoint> {
        self.call(|| actor::TakeCheckpoint {
            label: label.clone(),
            description: description.clone(),
            kind,
        })
        .await?
    }

    /// The session's checkpoints (automatic, manual and versions), oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        Ok(self.rt.store().list_checkpoints(&self.id).await?)
    }

    /// Moves the head and the small state back to a checkpoint. Nothing is
    /// deleted: the next turn starts a new branch, and the old branch stays
    /// reachable (see [`branches`](Self::branches)).
    pub async fn restore(&self, checkpoint: &Checkpoint) -> Result<SessionMetadata> {
        self.restore_id(&checkpoint.id).await
    }

    /// [`restore`](Self::restore) by checkpoint id.
    pub async fn restore_id(&self, checkpoint_id: &str) -> Result<SessionMetadata> {
        self.call(|| actor::Restore {
            to: actor::RestoreTarget::Checkpoint(checkpoint_id.to_string()),
        })
        .await?
    }

    /// Every leaf of the conversation tree, with its head, its last message
    /// time and the checkpoint it grew from. Switch to one with
    /// [`switch_branch`](Self::switch_branch).
    pub async fn branches(&self) -> Result<Vec<Branch>> {
        self.call(|| actor::Branches).await?
    }

    /// Makes a branch's leaf the head. Only the head moves: the small state
    /// (preferences, turn count, …) stays as it is. The tip being left is
    /// checkpointed (kind `Branch`) so it stays reachable.
    pub async fn switch_branch(&self, branch: &Branch) -> Result<SessionMetadata> {
        let known = self.branches().await?;
        if !known.iter().any(|b| b.head == branch.head) {
            return Err(Error::InvalidRequest(format!(
                "{} is not a branch of session '{}'",
                branch.head, self.id
            )));
        }
        let head = branch.head;
        self.call(|| actor::Restore {
            to: actor::RestoreTarget::Head(Some(head)),
        })
        .await?
    }

    /// Deletes a checkpoint (or version) of this session. Returns whether it existed.
    pub async fn delete_checkpoint(&self, checkpoint_id: &str) -> Result<bool> {
        self.call(|| actor::DeleteCheckpoint {
            checkpoint_id: checkpoint_id.to_string(),
        })
        .await?
    }

    /// Deletes the messages nothing can reach any more: not the head, not a
    /// kept checkpoint or version, not another session (a fork). Restoring
    /// away from a branch tip checkpoints it first, so a branch goes only
    /// when its checkpoints are deleted.
    pub async fn collect_garbage(&self) -> Result<checkpoint::GcReport> {
        self.call(|| actor::CollectGarbage).await?
    }

    /// Saves a numbered version with a description; returns its number.
    pub async fn save_version(&self, description: impl Into<String>) -> Result<u32> {
        let cp = self
            .checkpoint_with(None, Some(description.into()), CheckpointKind::Version)
            .await?;
        Version::from_checkpoint(&cp)
            .map(|v| v.version)
            .ok_or_else(|| Error::Runtime("a version checkpoint without a number".into()))
    }

    /// The saved versions, oldest first.
    pub async fn list_versions(&self) -> Result<Vec<Version>> {
        let mut v: Vec<Version> = self
            .checkpoints()
            .await?
            .iter()
            .filter_map(Version::from_checkpoint)
            .collect();
        v.sort_by_key(|v| v.version);
        Ok(v)
    }

    /// Restores version number `version`.
    pub async fn restore_version(&self, version: u32) -> Result<SessionMetadata> {
        let v = self
            .list_versions()
            .await?
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| StoreError::NotFound {
                what: "version",
                id: format!("{}#{version}", self.id),
            })?;
        self.restore_id(&v.checkpoint_id).await
    }

    /// A new session `new_id` that starts at a checkpoint of this one. The
    /// messages up to the checkpoint are shared in the store, not copied.
    pub async fn fork(
        &self,
        checkpoint: &Checkpoint,
        new_id: impl Into<String>,
    ) -> Result<Session> {
        self.rt.fork(checkpoint, new_id.into()).await
    }

    /// A new session `<this id>_merged` holding both histories ordered by
    /// time and the union of both small states (the more recently updated
    /// session wins a conflicting key; every conflict is reported).
    pub async fn merge(&self, other: &Session) -> Result<(Session, MergeReport)> {
        self.merge_as(other, format!("{}_merged", self.id)).await
    }

    /// [`merge`](Self::merge) into a session named `new_id`.
    pub async fn merge_as(
        &self,
        other: &Session,
        new_id: impl Into<String>,
    ) -> Result<(Session, MergeReport)> {
        let new_id = new_id.into();
        validate_session_id(&new_id)?;
        let a = self.export().await?;
        let b = other.export().await?;
        let b_newer = b.record.updated_at > a.record.updated_at;
        let mut conflicts = Vec::new();
        let mut record = a.record.clone();
        record.id = new_id.clone();
        record.profile = checkpoint::merge_maps(
            "profile",
            &a.record.profile,
            &b.record.profile,
            b_newer,
            &mut conflicts,
        );
        record.preferences = checkpoint::merge_maps(
            "preferences",
            &a.record.preferences,
            &b.record.preferences,
            b_newer,
            &mut conflicts,
        );
        record.user_data = checkpoint::merge_maps(
            "user_data",
            &a.record.user_data,
            &b.record.user_data,
            b_newer,
            &mut conflicts,
        );
        record.metadata = checkpoint::merge_maps(
            "metadata",
            &a.record.metadata,
            &b.record.metadata,
            b_newer,
            &mut conflicts,
        );
        record.metadata.insert(
            "merged_from".into(),
            serde_json::json!([a.record.id, b.record.id]),
        );
        for agent in &b.record.agents {
            if !record.agents.contains(agent) {
                record.agents.push(agent.clone());
            }
        }
        record.interactions = a.record.interactions + b.record.interactions;
        let history = checkpoint::merge_histories(&a.history, &b.history);
        let report = MergeReport {
            session_id: new_id.clone(),
            messages: history.len(),
            conflicts,
        };
        let merged = self
            .rt
            .create_from(SessionDocument { record, history })
            .await
            .map_err(|e| match e {
                Error::Store(StoreError::Conflict { .. }) => Error::InvalidRequest(format!(
                    "session '{new_id}' already exists; choose another id for the merge"
                )),
                other => other,
            })?;
        Ok((merged, report))
    }

    /// The session as a document: its record and its history.
    pub async fn export(&self) -> Result<SessionDocument> {
        self.call(|| actor::Export).await?
    }

    /// Writes the session to a file: JSON, or bincode for `.bin`; atomic,
    /// with a format version and a checksum; the previous file is kept as
    /// `PATH.bak`.
    pub async fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let doc = self.export().await?;
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || file::write(&path, &doc))
            .await
            .map_err(|e| Error::Runtime(format!("file writer failed: {e}")))??;
        Ok(())
    }

    /// Writes the session as it was at a checkpoint to a session file (the
    /// checkpoint's small state and the history up to its head). Loading the
    /// file into any store ([`Session::load`]) gives that same history.
    pub async fn save_checkpoint(
        &self,
        checkpoint: &Checkpoint,
        path: impl AsRef<Path>,
    ) -> Result<()> {
        if checkpoint.session_id != *self.id {
            return Err(Error::InvalidRequest(format!(
                "checkpoint '{}' belongs to session '{}', not '{}'",
                checkpoint.id, checkpoint.session_id, self.id
            )));
        }
        let history = match checkpoint.head {
            Some(h) => self.rt.store().history(h, None).await?,
            None => Vec::new(),
        };
        let mut record = checkpoint.state.clone();
        record.head = checkpoint.head;
        let doc = SessionDocument { record, history };
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || file::write(&path, &doc))
            .await
            .map_err(|e| Error::Runtime(format!("file writer failed: {e}")))??;
        Ok(())
    }

    /// Reads a session file into the runtime's store and opens it. The
    /// session keeps the file's id; if it exists already, its history and
    /// state are replaced (the old messages stay reachable in the store).
    /// A damaged file changes nothing.
    pub async fn load(rt: &Runtime, path: impl AsRef<Path>) -> Result<Session> {
        let path = path.as_ref().to_path_buf();
        let doc = tokio::task::spawn_blocking(move || file::read(&path))
            .await
            .map_err(|e| Error::Runtime(format!("file reader failed: {e}")))??;
        rt.import(doc).await
    }
}

impl Runtime {
    /// A new session `new_id` starting at `checkpoint` (of any session): its
    /// head is the checkpoint's head (messages shared, not copied) and its
    /// small state the checkpoint's snapshot.
    pub async fn fork(&self, checkpoint: &Checkpoint, new_id: String) -> Result<Session> {
        validate_session_id(&new_id)?;
        if let Some(head) = checkpoint.head {
            // A deleted and collected checkpoint may point at nothing now.
            let reachable =
                matches!(self.store().history(head, Some(1)).await, Ok(h) if !h.is_empty());
            if !reachable {
                return Err(Error::InvalidRequest(format!(
                    "checkpoint '{}' points at message {head}, which no longer exists",
                    checkpoint.id
                )));
            }
        }
        let mut record = checkpoint.state.clone();
        let at = crate::store::now();
        record.id = new_id.clone();
        record.created_at = at;
        record.updated_at = at;
        record.head = checkpoint.head;
        record.state_version = 1;
        record.metadata.insert(
            "forked_from".into(),
            serde_json::json!({"session": checkpoint.session_id, "checkpoint": checkpoint.id}),
        );
        let commit = crate::store::Commit {
            record,
            expected_version: None,
            small_state_changed: true,
            new_segment: None,
            messages: Vec::new(),
            checkpoints: Vec::new(),
            drop_checkpoints: Vec::new(),
        };
        match self.store().commit(commit).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => {
                return Err(Error::InvalidRequest(format!(
                    "session '{new_id}' already exists; choose another id for the fork"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.evict(&new_id).await;
        self.session(new_id).existing().open().await
    }

    /// Creates a new session from a document in one atomic write: its record
    /// and its whole history (copied into a new segment). Refused with a
    /// conflict if the id exists — it never replaces anything.
    pub async fn create_from(&self, doc: SessionDocument) -> Result<Session> {
        self.create_from_doc(doc, false).await
    }

    /// [`create_from`](Self::create_from); `keep_times` keeps the document's
    /// `created_at`/`updated_at` (a session file is the same session, so its
    /// age, and with it cleanup and TTL, carries over).
    async fn create_from_doc(&self, doc: SessionDocument, keep_times: bool) -> Result<Session> {
        validate_session_id(&doc.record.id)?;
        let at = crate::store::now();
        let mut record = doc.record;
        let segment = crate::store::Segment {
            id: crate::store::new_segment_id(),
            session_id: record.id.clone(),
            parent: None,
            created_at: at,
        };
        let mut parent = None;
        let messages: Vec<Message> = doc
            .history
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let id = MessageId {
                    segment: segment.id,
                    seq: i as u32,
                };
                let out = Message { id, parent, ..m };
                parent = Some(id);
                out
            })
            .collect();
        record.head = messages.last().map(|m| m.id);
        if !keep_times {
            record.created_at = at;
            record.updated_at = at;
        }
        record.state_version = 1;
        let id = record.id.clone();
        self.store()
            .commit(crate::store::Commit {
                record,
                expected_version: None,
                small_state_changed: true,
                new_segment: (!messages.is_empty()).then_some(segment),
                messages,
                checkpoints: Vec::new(),
                drop_checkpoints: Vec::new(),
            })
            .await?;
        self.evict(&id).await;
        self.session(id).existing().open().await
    }

    /// Drops a live actor of `id` that may have loaded the session before a
    /// direct store write created it (it would answer "not found").
    async fn evict(&self, id: &str) {
        let core = self.core();
        if let Some(addr) = core.registry.get(id) {
            let _ = addr.send(actor::Passivate).await;
            core.registry.forget(id, &addr);
        }
    }

    /// Puts a session document into the store and opens the session.
    pub async fn import(&self, doc: SessionDocument) -> Result<Session> {
        validate_session_id(&doc.record.id)?;
        // A new id: one atomic write creates the session with its history.
        let doc = match self.create_from_doc(doc.clone(), true).await {
            Ok(session) => return Ok(session),
            Err(Error::Store(StoreError::Conflict { .. })) => doc,
            Err(e) => return Err(e),
        };
        // An existing id: its history and state are replaced in one commit
        // (the old messages stay reachable from its checkpoints).
        let session = self
            .session(doc.record.id.clone())
            .existing()
            .open()
            .await?;
        let messages: Vec<NewMessage> = doc.history.into_iter().map(NewMessage::from).collect();
        let record = doc.record;
        session
            .call(|| actor::SetHistory {
                messages: messages.clone(),
                record: Some(record.clone()),
            })
            .await??;
        Ok(session)
    }
}
