//! The session actor: one per live session, owner of its state.
//!
//! Every handler that reads or changes the session is atomic
//! ([`AtomicResponse`]): the actor takes no other message until it ends, so
//! turns on one session run strictly one after another and a read never sees
//! half a turn. A change is applied to the actor's state only after the store
//! acknowledged it; a failed turn (model error, store error) leaves the state
//! exactly as it was.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::context::{apply_budget, build_request, memory_section, session_line};
use super::{ChatReply, NewMessage, SessionMetadata, StateChange, StreamEvent};
use crate::agent::{Generate, GenerateStream};
use crate::error::{Error, Result};
use crate::model::ChatResponse;
use crate::runtime::{AgentBinding, Core};
use crate::store::file::SessionDocument;
use crate::store::{
    new_segment_id, now, CheckpointKind, CheckpointRecord, Commit, LoadedSession, Message,
    MessageId, Role, Segment, SessionRecord, StoreError,
};

/// The plain state a session actor owns; snapshots are of this, never of the actor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionState {
    /// The durable record.
    pub record: SessionRecord,
    /// The last messages of the history (at most `2 × memory.window`).
    pub recent: VecDeque<Message>,
    /// Whether the next message may extend the head's segment.
    pub can_append: bool,
}

#[allow(clippy::large_enum_variant)] // one per actor, almost always Live
enum Phase {
    Loading,
    Absent,
    Live(SessionState),
    Failed(String),
}

/// The actor. Built by the registry.
pub struct SessionActor {
    id: Arc<str>,
    core: Arc<Core>,
    arbiter: usize,
    phase: Phase,
    last_active: Instant,
    agents: Vec<Arc<AgentBinding>>,
    /// The ids of this session's automatic checkpoints, oldest first (read
    /// from the store the first time one is taken).
    auto_ids: Option<VecDeque<String>>,
}

impl SessionActor {
    pub(crate) fn new(id: Arc<str>, core: Arc<Core>, arbiter: usize) -> Self {
        SessionActor {
            id,
            core,
            arbiter,
            phase: Phase::Loading,
            last_active: Instant::now(),
            agents: Vec::new(),
            auto_ids: None,
        }
    }

    fn recent_cap(&self) -> usize {
        self.core.config.memory.window.saturating_mul(2)
    }

    fn live(&self) -> Result<&SessionState> {
        match &self.phase {
            Phase::Live(s) => Ok(s),
            Phase::Absent => Err(Error::SessionNotFound(self.id.to_string())),
            Phase::Failed(reason) => Err(Error::SessionUnavailable {
                id: self.id.to_string(),
                reason: reason.clone(),
            }),
            Phase::Loading => Err(Error::SessionUnavailable {
                id: self.id.to_string(),
                reason: "still loading".into(),
            }),
        }
    }

    fn live_mut(&mut self) -> Option<&mut SessionState> {
        match &mut self.phase {
            Phase::Live(s) => Some(s),
            _ => None,
        }
    }

    fn set_loaded(&mut self, loaded: LoadedSession) {
        let mut recent: VecDeque<Message> = loaded.recent.into();
        let cap = self.recent_cap();
        while recent.len() > cap {
            recent.pop_front();
        }
        self.phase = Phase::Live(SessionState {
            record: loaded.record,
            recent,
            can_append: loaded.can_append,
        });
    }

    /// The binding of `name` (or the session's default agent).
    fn agent(&mut self, name: Option<&str>) -> Result<Arc<AgentBinding>> {
        let state = self.live()?;
        let name = match name {
            Some(n) => n.to_string(),
            None => state
                .record
                .agents
                .first()
                .cloned()
                .unwrap_or_else(|| self.core.config.agents.default.clone()),
        };
        if let Some(b) = self.agents.iter().find(|b| b.spec.name == name) {
            return Ok(b.clone());
        }
        let b = self.core.binding_by_name(&name)?;
        self.agents.push(b.clone());
        Ok(b)
    }

    /// A turn sent to a session that does not exist (through a handle from
    /// [`SessionBuilder::attach`](super::SessionBuilder::attach)) keeps no
    /// actor alive for it, as `Open { create: false }` does not.
    fn leave_if_absent(&mut self, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Absent) {
            self.leave_soon(ctx);
        }
    }

    /// Prefers these bindings for their agents' names.
    fn use_agents(&mut self, bindings: &[Arc<AgentBinding>]) {
        for b in bindings {
            self.agents.retain(|x| x.spec.name != b.spec.name);
            self.agents.push(b.clone());
        }
    }

    /// Stops the actor after taking it out of the registry (only if the
    /// registry still points at this actor).
    fn passivate(&mut self, ctx: &mut Context<Self>) {
        let me = ctx.address();
        self.core
            .registry
            .remove_if(&self.id, |_, addr| *addr == me);
        ctx.stop();
    }

    /// After a conflict the in-memory state cannot be trusted: leave, and
    /// let the next request activate a fresh actor.
    fn invalidate(&mut self, ctx: &mut Context<Self>) {
        tracing::warn!(session = %self.id, "session state is stale; reloading on next use");
        self.leave_soon(ctx);
    }

    /// A write failed: after a conflict the in-memory state is stale, so the
    /// actor leaves (see [`invalidate`](Self::invalidate)). Returns the error.
    fn failed<E: Into<Error>>(&mut self, ctx: &mut Context<Self>, e: E) -> Error {
        let e = e.into();
        if e.must_reload() {
            self.invalidate(ctx);
        }
        e
    }

    /// Leaves the registry now (new requests get a fresh actor) but stops
    /// only after answering what is already queued, so no caller sees its
    /// request dropped.
    fn leave_soon(&mut self, ctx: &mut Context<Self>) {
        let me = ctx.address();
        self.core
            .registry
            .remove_if(&self.id, |_, addr| *addr == me);
        ctx.run_later(Duration::ZERO, |_, ctx| ctx.stop());
    }

    /// Plans the messages of one turn: ids, parents, and the segment they go in.
    fn plan(&self, state: &SessionState, count: u32) -> (Option<Segment>, Vec<MessageId>) {
        let head = state.record.head;
        let (segment, start, new_segment) = match head {
            Some(h) if state.can_append => (h.segment, h.seq + 1, None),
            _ => {
                let id = new_segment_id();
                let seg = Segment {
                    id,
                    session_id: state.record.id.clone(),
                    parent: head,
                    created_at: now(),
                };
                (id, 0, Some(seg))
            }
        };
        let ids = (0..count)
            .map(|i| MessageId {
                segment,
                seq: start + i,
            })
            .collect();
        (new_segment, ids)
    }

    fn apply_turn(&mut self, turn: Applied) {
        let cap = self.recent_cap();
        self.last_active = Instant::now();
        if let Some(state) = self.live_mut() {
            // Invariant: `recent` is the tail of the path ending at the head,
            // and these messages continue from the head.
            state.recent.extend(turn.messages);
            while state.recent.len() > cap {
                state.recent.pop_front();
            }
            let r = &mut state.record;
            r.head = Some(turn.head);
            r.interactions = turn.interactions;
            r.updated_at = turn.updated_at;
            r.state_version = turn.state_version;
            state.can_append = true;
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let store = self.core.store.clone();
        let id = self.id.clone();
        let recent = self.recent_cap();
        ctx.wait(
            async move { store.load_session(&id, recent).await }
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Ok(Some(loaded)) => act.set_loaded(loaded),
                    Ok(None) => act.phase = Phase::Absent,
                    Err(e) => {
                        tracing::error!(session = %act.id, error = %e, "session failed to load");
                        act.phase = Phase::Failed(e.to_string());
                        // Answer what is queued with the error, then leave.
                        act.leave_soon(ctx);
                    }
                }),
        );
        let idle = self.core.idle;
        let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        ctx.run_interval(every, move |act, ctx| {
            if act.last_active.elapsed() >= idle {
                tracing::debug!(session = %act.id, "passivating idle session");
                act.passivate(ctx);
            }
        });
    }
}

type Reply<T> = AtomicResponse<SessionActor, Result<T>>;

fn done<T: 'static>(r: Result<T>) -> Reply<T> {
    AtomicResponse::new(Box::pin(fut::ready(r)))
}

/// Commits `commit`; on success runs `apply` on the actor, on a conflict
/// invalidates the actor. Used by every handler that writes.
fn commit_then<T: 'static>(
    act: &SessionActor,
    commit: Commit,
    apply: impl FnOnce(&mut SessionActor) -> T + 'static,
) -> Reply<T> {
    let store = act.core.store.clone();
    AtomicResponse::new(Box::pin(
        async move { store.commit(commit).await }
            .into_actor(act)
            .map(move |res, act, ctx| match res {
                Ok(()) => Ok(apply(act)),
                Err(e) => Err(act.failed(ctx, e)),
            }),
    ))
}

// ---- messages ----

/// Create the session if absent; set its user and agents if given.
#[derive(Message)]
#[rtype(result = "Result<SessionMetadata>")]
pub(crate) struct Open {
    pub create: bool,
    pub user_id: Option<String>,
    pub agents: Vec<Arc<AgentBinding>>,
    /// The shared-state namespace its agents read (kept in metadata).
    pub shared_state: Option<String>,
    /// Turn long-term memory on or off for this session (kept in metadata);
    /// on, without a user, makes the session id the user id.
    pub persist_memory: Option<bool>,
}

/// The metadata key holding a session's shared-state namespace.
pub(crate) const SHARED_STATE_KEY: &str = "shared_state";
/// The metadata key holding `persist_memory(..)`: long-term memory on/off.
pub(crate) const LONG_TERM_KEY: &str = "long_term_memory";
/// The metadata key holding user feedback: `{message id: score}`.
pub(crate) const FEEDBACK_KEY: &str = "feedback";

impl Handler<Open> for SessionActor {
    type Result = Reply<SessionMetadata>;

    fn handle(&mut self, msg: Open, ctx: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        if matches!(self.phase, Phase::Absent) && !msg.create {
            // Nothing to keep live for a session that does not exist.
            self.leave_soon(ctx);
            return done(Err(Error::SessionNotFound(self.id.to_string())));
        }
        let names: Vec<String> = msg.agents.iter().map(|b| b.spec.name.clone()).collect();
        let persist_user = |user: &Option<String>, id: &str| match (msg.persist_memory, user) {
            (Some(true), None) => Some(id.to_string()),
            _ => user.clone(),
        };
        let (next, expected) = match &self.phase {
            Phase::Absent if msg.create => {
                let agents = if names.is_empty() {
                    vec![self.core.config.agents.default.clone()]
                } else {
                    names
                };
                let user = persist_user(&msg.user_id, &self.id);
                let mut r = SessionRecord::new(&*self.id, user, agents);
                if let Some(ns) = &msg.shared_state {
                    r.metadata
                        .insert(SHARED_STATE_KEY.into(), ns.clone().into());
                }
                if let Some(on) = msg.persist_memory {
                    r.metadata.insert(LONG_TERM_KEY.into(), on.into());
                }
                r.state_version = 1;
                (r, None)
            }
            Phase::Live(state) => {
                let r = &state.record;
                let wanted_user =
                    persist_user(&msg.user_id.clone().or_else(|| r.user_id.clone()), &self.id);
                let user_changes = wanted_user.is_some() && wanted_user != r.user_id;
                let agents_change = !names.is_empty() && names != r.agents;
                let shared_change = msg.shared_state.as_ref().is_some_and(|ns| {
                    r.metadata.get(SHARED_STATE_KEY).and_then(|v| v.as_str()) != Some(ns.as_str())
                });
                let persist_change = msg.persist_memory.is_some_and(|on| {
                    r.metadata.get(LONG_TERM_KEY).and_then(|v| v.as_bool()) != Some(on)
                });
                if !user_changes && !agents_change && !shared_change && !persist_change {
                    let meta = SessionMetadata::from(r);
                    self.use_agents(&msg.agents);
                    return done(Ok(meta));
                }
                let mut next = r.clone();
                if user_changes {
                    next.user_id = wanted_user;
                }
                if agents_change {
                    next.agents = names;
                }
                if let (true, Some(ns)) = (shared_change, &msg.shared_state) {
                    next.metadata
                        .insert(SHARED_STATE_KEY.into(), ns.clone().into());
                }
                if let (true, Some(on)) = (persist_change, msg.persist_memory) {
                    next.metadata.insert(LONG_TERM_KEY.into(), on.into());
                }
                next.updated_at = now();
                next.state_version += 1;
                (next, Some(r.state_version))
            }
            _ => return done(self.live().map(|s| SessionMetadata::from(&s.record))),
        };
        // A new session of a known user starts with the user's profile and
        // preferences (one read, only when a session with a user is created).
        let seed_user = match (expected, &next.user_id) {
            (None, Some(u)) => Some(u.clone()),
            _ => None,
        };
        let store = self.core.store.clone();
        let bindings = msg.agents;
        AtomicResponse::new(Box::pin(
            async move {
                let mut next = next;
                if let Some(user) = seed_user {
                    match store.user_get(&user).await {
                        Ok(Some(u)) => {
                            next.profile = u.profile;
                            next.preferences = u.preferences;
                        }
                        Ok(None) | Err(StoreError::Unsupported(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                store
                    .commit(Commit {
                        record: next.clone(),
                        expected_version: expected,
                        small_state_changed: true,
                        new_segment: None,
                        messages: Vec::new(),
                        checkpoints: Vec::new(),
                        drop_checkpoints: Vec::new(),
                    })
                    .await?;
                Ok::<_, Error>(next)
            }
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok(next) => {
                    let meta = SessionMetadata::from(&next);
                    act.use_agents(&bindings);
                    match &mut act.phase {
                        Phase::Live(s) => s.record = next,
                        _ => {
                            act.phase = Phase::Live(SessionState {
                                record: next,
                                recent: VecDeque::new(),
                                can_append: false,
                            })
                        }
                    }
                    Ok(meta)
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// One chat turn.
#[derive(Message)]
#[rtype(result = "Result<ChatReply>")]
pub(crate) struct Chat {
    pub message: String,
    pub agent: Option<String>,
}

/// What a turn needs from the actor before the model call.
struct TurnPlan {
    binding: Arc<AgentBinding>,
    /// The shared-state namespace whose entries go into the prompt.
    shared_state: Option<String>,
    user: Message,
    reply_id: MessageId,
    new_segment: Option<Segment>,
    record: SessionRecord,
    /// An automatic checkpoint is due with this turn: the known automatic
    /// checkpoint ids (if already read) and how many to keep.
    auto: Option<(Option<VecDeque<String>>, usize)>,
    /// Long-term memory for this turn (a session with a user, memory on).
    long_term: Option<LongTerm>,
    /// `memory.max_context_tokens` (0 = none).
    budget: usize,
}

/// What a turn with long-term memory needs.
struct LongTerm {
    user: String,
    policy: crate::memory::Policy,
    /// The session-context line appended to the system message.
    session_line: String,
}

impl SessionActor {
    /// Whether this turn uses long-term memory, and with which policy: the
    /// session needs a user; `persist_memory(..)` decides if set, else
    /// whether the agent has a `Memory` of its own or `memory.long_term`.
    fn long_term(&self, binding: &AgentBinding, state: &SessionState) -> Option<LongTerm> {
        let record = &state.record;
        let user = record.user_id.as_ref()?;
        let config = &self.core.config.memory;
        let on = match record.metadata.get(LONG_TERM_KEY).and_then(|v| v.as_bool()) {
            Some(on) => on,
            None => binding.memory.is_some() || config.long_term,
        };
        if !on {
            return None;
        }
        let memory = binding.memory.as_ref().unwrap_or(&self.core.memory);
        let topics = crate::memory::topics(
            state
                .recent
                .iter()
                .filter(|m| m.role == Role::User)
                .map(|m| m.content.as_str()),
            5,
        );
        let minutes = (now() - record.created_at).num_minutes();
        Some(LongTerm {
            user: user.clone(),
            policy: memory.policy(config),
            session_line: session_line(record.interactions, minutes, &topics),
        })
    }
}

impl SessionActor {
    fn plan_turn(
        &mut self,
        message: String,
        agent: Option<&str>,
    ) -> Result<(TurnPlan, crate::model::ChatRequest)> {
        if message.trim().is_empty() {
            return Err(Error::InvalidRequest("the message is empty".into()));
        }
        let binding = self.agent(agent)?;
        let window = self.core.config.memory.window;
        let state = self.live()?;
        let request = build_request(
            &binding.spec,
            &state.record,
            &state.recent,
            window,
            &message,
            binding.temperature,
            binding.max_tokens,
        );
        let long_term = self.long_term(&binding, state);
        let budget = self.core.config.memory.max_context_tokens;
        let (new_segment, ids) = self.plan(state, 2);
        let every = self.core.config.checkpoint.every;
        let auto = (every > 0 && (state.record.interactions + 1) % every == 0).then(|| {
            (
                self.auto_ids.clone(),
                self.core.config.checkpoint.keep.max(1),
            )
        });
        let user = Message {
            id: ids[0],
            parent: state.record.head,
            role: Role::User,
            agent: Some(binding.spec.name.clone()),
            content: message,
            created_at: now(),
            meta: None,
        };
        Ok((
            TurnPlan {
                binding,
                user,
                reply_id: ids[1],
                new_segment,
                shared_state: state
                    .record
                    .metadata
                    .get(SHARED_STATE_KEY)
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                record: state.record.clone(),
                auto,
                long_term,
                budget,
            },
            request,
        ))
    }
}

/// What the actor applies once a turn's commit is durable.
struct Applied {
    head: MessageId,
    updated_at: chrono::DateTime<chrono::Utc>,
    interactions: u64,
    state_version: u64,
    messages: Vec<Message>,
    reply: ChatReply,
    /// The automatic checkpoint ids after this turn, if it took one.
    auto_ids: Option<VecDeque<String>>,
}

impl TurnPlan {
    /// The commit of a finished turn, and what to apply once it is durable.
    /// `latency` is the model call's (recorded in the reply's `meta` as
    /// `latency_ms`, with `usage` when the model reports it).
    fn finish(self, resp: ChatResponse, latency: Duration) -> (Commit, Applied) {
        let mut meta = self.binding.model.reply_meta();
        if let Some(obj) = meta.as_object_mut() {
            if let Some(u) = resp.usage {
                obj.insert("usage".into(), serde_json::json!(u));
            }
            let ms = (latency.as_secs_f64() * 1e6).round() / 1e3;
            obj.insert("latency_ms".into(), serde_json::json!(ms));
        }
        let reply = Message {
            id: self.reply_id,
            parent: Some(self.user.id),
            role: Role::Assistant,
            agent: Some(self.binding.spec.name.clone()),
            content: resp.content,
            created_at: now().max(self.user.created_at),
            meta: Some(meta),
        };
        let mut record = self.record;
        let expected = record.state_version;
        record.head = Some(reply.id);
        record.interactions += 1;
        record.updated_at = reply.created_at;
        record.state_version += 1;
        let messages = vec![self.user, reply];
        let applied = Applied {
            head: messages[1].id,
            updated_at: record.updated_at,
            interactions: record.interactions,
            state_version: record.state_version,
            reply: ChatReply {
                session_id: record.id.clone(),
                message_id: messages[1].id,
                reply: messages[1].content.clone(),
                agent: self.binding.spec.name.clone(),
                meta: messages[1].meta.clone(),
            },
            messages: messages.clone(),
            auto_ids: None,
        };
        let commit = Commit {
            record,
            expected_version: Some(expected),
            small_state_changed: false,
            new_segment: self.new_segment,
            messages,
            checkpoints: Vec::new(),
            drop_checkpoints: Vec::new(),
        };
        (commit, applied)
    }
}

/// Puts what is remembered about the user into the system message (and
/// the session-context line); returns the ids of the memories used.
/// A store without memory support is a session without long-term memory.
async fn with_memories(
    store: &Arc<dyn crate::store::Store>,
    long_term: Option<&LongTerm>,
    message: &str,
    request: &mut crate::model::ChatRequest,
) -> Result<Vec<String>> {
    let Some(lt) = long_term else {
        return Ok(Vec::new());
    };
    let recalled = if lt.policy.retrieve == 0 {
        Vec::new()
    } else {
        match store
            .memory_recall(&lt.user, message, lt.policy.retrieve)
            .await
        {
            Ok(v) => v,
            Err(StoreError::Unsupported(_)) => return Ok(Vec::new()),
            // Recall makes a turn better, not possible: a failed read leaves
            // the memories out of this prompt instead of failing the turn.
            Err(e) => {
                tracing::warn!(user = %lt.user, error = %e, "memory recall failed; this turn goes without memories");
                Vec::new()
            }
        }
    };
    if let Some(system) = request.messages.first_mut() {
        memory_section(&mut system.content, &recalled);
        system.content.push_str(&lt.session_line);
    }
    Ok(recalled.into_iter().map(|m| m.id).collect())
}

/// After a durable turn: marks the recalled memories used (in the
/// background: usage counts are statistics, not part of the turn) and
/// stores what the extractor found in the user's message. A failure here
/// is logged; the turn is already durable and stays acknowledged.
async fn after_turn(
    store: &Arc<dyn crate::store::Store>,
    long_term: Option<LongTerm>,
    session: &str,
    message: &str,
    used: Vec<String>,
) {
    let Some(lt) = long_term else { return };
    if !used.is_empty() {
        let store = store.clone();
        actix::spawn(async move {
            if let Err(e) = store.memory_mark_used(&used, now()).await {
                tracing::debug!(error = %e, "could not mark memories used");
            }
        });
    }
    if !lt.policy.extract {
        return;
    }
    for c in lt.policy.extractor.extract(message) {
        let item = crate::memory::item_for(&lt.user, Some(session), c);
        match crate::memory::store_item(store, &lt.policy, item).await {
            Ok(outcome) => tracing::debug!(?outcome, "memory candidate"),
            Err(e) if crate::memory::is_unsupported(&e) => return,
            Err(e) => {
                tracing::warn!(session, error = %e, "could not store a memory");
            }
        }
    }
}

/// Most shared-state entries, and characters of each value, put in a prompt.
const SHARED_IN_PROMPT: (usize, usize) = (50, 2_000);

/// Appends the session's shared state to the system message, so every agent
/// of the session sees what the others wrote there.
async fn with_shared_state(
    store: &Arc<dyn crate::store::Store>,
    namespace: Option<&str>,
    mut request: crate::model::ChatRequest,
) -> Result<crate::model::ChatRequest> {
    let Some(ns) = namespace else {
        return Ok(request);
    };
    let entries = store.shared_list(ns, "").await?;
    if entries.is_empty() {
        return Ok(request);
    }
    if let Some(system) = request.messages.first_mut() {
        use std::fmt::Write as _;
        let _ = write!(system.content, "\n\nShared state ({ns}):");
        for e in entries.iter().take(SHARED_IN_PROMPT.0) {
            let text = match &e.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let clipped: String = text.chars().take(SHARED_IN_PROMPT.1).collect();
            let _ = write!(system.content, "\n- {}: {}", e.key, clipped);
        }
    }
    Ok(request)
}

/// Adds the supervisor's automatic checkpoint to a turn's commit when one is
/// due — in the same transaction, so it is a consistent cut of whole turns —
/// and drops the oldest automatic ones past `checkpoint.keep`.
async fn add_auto_checkpoint(
    store: &Arc<dyn crate::store::Store>,
    auto: Option<(Option<VecDeque<String>>, usize)>,
    commit: &mut Commit,
    applied: &mut Applied,
) -> Result<()> {
    let Some((known, keep)) = auto else {
        return Ok(());
    };
    let mut ids = match known {
        Some(ids) => ids,
        None => store
            .list_checkpoints(&commit.record.id)
            .await?
            .into_iter()
            .filter(|c| c.kind == CheckpointKind::Auto)
            .map(|c| c.id)
            .collect(),
    };
    while ids.len() >= keep {
        if let Some(old) = ids.pop_front() {
            commit.drop_checkpoints.push(old);
        }
    }
    let cp = CheckpointRecord {
        id: uuid::Uuid::new_v4().to_string(),
        session_id: commit.record.id.clone(),
        head: commit.record.head,
        label: Some(format!("auto after turn {}", commit.record.interactions)),
        description: None,
        kind: CheckpointKind::Auto,
        state: commit.record.clone(),
        created_at: commit.record.updated_at,
    };
    ids.push_back(cp.id.clone());
    commit.checkpoints.push(cp);
    applied.auto_ids = Some(ids);
    Ok(())
}

fn finish_turn(act: &mut SessionActor, applied: Applied) -> ChatReply {
    let reply = applied.reply.clone();
    if applied.auto_ids.is_some() {
        act.auto_ids = applied.auto_ids.clone();
    }
    act.apply_turn(applied);
    reply
}

impl Handler<Chat> for SessionActor {
    type Result = Reply<ChatReply>;

    fn handle(&mut self, msg: Chat, ctx: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let (plan, request) = match self.plan_turn(msg.message, msg.agent.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                self.leave_if_absent(ctx);
                return done(Err(e));
            }
        };
        let addr = plan.binding.addr(self.arbiter);
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut plan = plan;
                let mut request =
                    with_shared_state(&store, plan.shared_state.as_deref(), request).await?;
                let used = with_memories(
                    &store,
                    plan.long_term.as_ref(),
                    &plan.user.content,
                    &mut request,
                )
                .await?;
                apply_budget(&mut request, plan.budget);
                let started = Instant::now();
                let resp = addr
                    .send(Generate(request))
                    .await
                    .map_err(|e| crate::model::ModelError::Failed(e.to_string()))??;
                let latency = started.elapsed();
                let auto = plan.auto.clone();
                let long_term = plan.long_term.take();
                let message = plan.user.content.clone();
                let (mut commit, mut applied) = plan.finish(resp, latency);
                add_auto_checkpoint(&store, auto, &mut commit, &mut applied).await?;
                let session = commit.record.id.clone();
                store.commit(commit).await?;
                after_turn(&store, long_term, &session, &message, used).await;
                Ok::<_, Error>(applied)
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(applied) => Ok(finish_turn(act, applied)),
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// One chat turn whose reply is streamed into `tx`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChatStream {
    pub message: String,
    pub agent: Option<String>,
    pub tx: mpsc::UnboundedSender<Result<StreamEvent>>,
}

impl Handler<ChatStream> for SessionActor {
    type Result = AtomicResponse<SessionActor, ()>;

    fn handle(&mut self, msg: ChatStream, ctx: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let tx = msg.tx;
        let (plan, request) = match self.plan_turn(msg.message, msg.agent.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                self.leave_if_absent(ctx);
                let _ = tx.send(Err(e));
                return AtomicResponse::new(Box::pin(fut::ready(())));
            }
        };
        let addr = plan.binding.addr(self.arbiter);
        let store = self.core.store.clone();
        let tx2 = tx.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut plan = plan;
                let mut request =
                    with_shared_state(&store, plan.shared_state.as_deref(), request).await?;
                let used = with_memories(
                    &store,
                    plan.long_term.as_ref(),
                    &plan.user.content,
                    &mut request,
                )
                .await?;
                apply_budget(&mut request, plan.budget);
                let started = Instant::now();
                let mut stream = addr
                    .send(GenerateStream(request))
                    .await
                    .map_err(|e| crate::model::ModelError::Failed(e.to_string()))??;
                let mut content = String::new();
                while let Some(piece) = stream.next().await {
                    let piece = piece?;
                    content.push_str(&piece);
                    // A caller that stopped listening does not stop the turn.
                    let _ = tx.send(Ok(StreamEvent::Delta(piece)));
                }
                let latency = started.elapsed();
                let model = plan.binding.model.name().to_string();
                let auto = plan.auto.clone();
                let long_term = plan.long_term.take();
                let message = plan.user.content.clone();
                let (mut commit, mut applied) = plan.finish(
                    ChatResponse {
                        content,
                        model,
                        usage: None,
                    },
                    latency,
                );
                add_auto_checkpoint(&store, auto, &mut commit, &mut applied).await?;
                let session = commit.record.id.clone();
                store.commit(commit).await?;
                after_turn(&store, long_term, &session, &message, used).await;
                Ok::<_, Error>(applied)
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                let event = match res {
                    Ok(applied) => Ok(StreamEvent::Done(finish_turn(act, applied))),
                    Err(e) => Err(act.failed(ctx, e)),
                };
                let _ = tx2.send(event);
            }),
        ))
    }
}

/// The history from the root to the head (the last `limit` messages).
#[derive(Message)]
#[rtype(result = "Result<Vec<Message>>")]
pub(crate) struct History {
    pub limit: Option<usize>,
}

impl Handler<History> for SessionActor {
    type Result = Reply<Vec<Message>>;

    fn handle(&mut self, msg: History, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let state = match self.live() {
            Ok(s) => s,
            Err(e) => return done(Err(e)),
        };
        let Some(head) = state.record.head else {
            return done(Ok(Vec::new()));
        };
        // The tail we hold answers small reads without the store.
        if let Some(limit) = msg.limit {
            if limit <= state.recent.len() {
                let skip = state.recent.len() - limit;
                return done(Ok(state.recent.iter().skip(skip).cloned().collect()));
            }
        }
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move { store.history(head, msg.limit).await.map_err(Error::from) }
                .into_actor(self),
        ))
    }
}

/// The session's metadata.
#[derive(Message)]
#[rtype(result = "Result<SessionMetadata>")]
pub(crate) struct Info;

impl Handler<Info> for SessionActor {
    type Result = Result<SessionMetadata>;

    fn handle(&mut self, _: Info, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        self.live().map(|s| SessionMetadata::from(&s.record))
    }
}

/// The session's whole record (profile, preferences, user data, …).
#[derive(Message)]
#[rtype(result = "Result<SessionRecord>")]
pub(crate) struct Record;

impl Handler<Record> for SessionActor {
    type Result = Result<SessionRecord>;

    fn handle(&mut self, _: Record, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        self.live().map(|s| s.record.clone())
    }
}

/// Change profile, preferences, user data or metadata.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct Update(pub StateChange);

impl Handler<Update> for SessionActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: Update, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let state = match self.live() {
            Ok(s) => s,
            Err(e) => return done(Err(e)),
        };
        let mut next = state.record.clone();
        // Profile and preferences follow the user: also written to the
        // user's record, so a new session of the user starts with them.
        let mut profile = crate::store::JsonMap::new();
        let mut preferences = crate::store::JsonMap::new();
        match &msg.0 {
            StateChange::Profile(k, v) => {
                profile.insert(k.clone(), v.clone());
            }
            StateChange::Preference(k, v) => {
                preferences.insert(k.clone(), v.clone());
            }
            _ => {}
        }
        let user = next
            .user_id
            .clone()
            .filter(|_| !profile.is_empty() || !preferences.is_empty());
        msg.0.apply(&mut next);
        next.updated_at = now();
        next.state_version += 1;
        let commit = Commit {
            record: next.clone(),
            expected_version: Some(state.record.state_version),
            small_state_changed: true,
            new_segment: None,
            messages: Vec::new(),
            checkpoints: Vec::new(),
            drop_checkpoints: Vec::new(),
        };
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                store.commit(commit).await?;
                if let Some(user) = user {
                    match store.user_update(&user, &profile, &preferences).await {
                        Ok(_) | Err(StoreError::Unsupported(_)) => {}
                        // The session's own change is durable: report, do not undo.
                        Err(e) => {
                            tracing::warn!(user, error = %e, "could not update the user record")
                        }
                    }
                }
                Ok::<_, Error>(())
            }
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok(()) => {
                    if let Some(s) = act.live_mut() {
                        s.record = next;
                    }
                    Ok(())
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// Replace the history with `messages` (a new branch from the root; the old
/// messages stay in the store, reachable from their checkpoints).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct SetHistory {
    pub messages: Vec<NewMessage>,
    /// Also replace the small state (used when loading a session file).
    pub record: Option<SessionRecord>,
}

impl Handler<SetHistory> for SessionActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: SetHistory, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let state = match self.live() {
            Ok(s) => s,
            Err(e) => return done(Err(e)),
        };
        let mut next = match msg.record {
            Some(mut r) => {
                r.id = state.record.id.clone();
                r.created_at = state.record.created_at;
                r
            }
            None => state.record.clone(),
        };
        let expected = state.record.state_version;
        next.state_version = expected + 1;
        next.updated_at = now();
        let now = now();
        let (new_segment, messages) = if msg.messages.is_empty() {
            (None, Vec::new())
        } else {
            let seg = Segment {
                id: new_segment_id(),
                session_id: next.id.clone(),
                parent: None,
                created_at: now,
            };
            let mut parent = None;
            let msgs: Vec<Message> = msg
                .messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| {
                    let id = MessageId {
                        segment: seg.id,
                        seq: i as u32,
                    };
                    let out = Message {
                        id,
                        parent,
                        role: m.role,
                        agent: m.agent,
                        content: m.content,
                        created_at: m.created_at.unwrap_or(now),
                        meta: m.meta,
                    };
                    parent = Some(id);
                    out
                })
                .collect();
            (Some(seg), msgs)
        };
        next.head = messages.last().map(|m| m.id);
        let before = state.record.clone();
        let cap = self.recent_cap();
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                // The history being replaced stays reachable: guard its head
                // unless a kept checkpoint already points at it.
                let protect =
                    branch_guard(&store, &before, next.head, "a replaced history").await?;
                store
                    .commit(Commit {
                        record: next.clone(),
                        expected_version: Some(expected),
                        small_state_changed: true,
                        new_segment,
                        messages: messages.clone(),
                        checkpoints: protect.into_iter().collect(),
                        drop_checkpoints: Vec::new(),
                    })
                    .await?;
                Ok::<_, Error>((next, messages))
            }
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok((next, messages)) => {
                    if let Some(s) = act.live_mut() {
                        let skip = messages.len().saturating_sub(cap);
                        s.recent = messages.into_iter().skip(skip).collect();
                        s.can_append = next.head.is_some();
                        s.record = next;
                    }
                    Ok(())
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// The session as a document (record + full history), for session files.
#[derive(Message)]
#[rtype(result = "Result<SessionDocument>")]
pub(crate) struct Export;

impl Handler<Export> for SessionActor {
    type Result = Reply<SessionDocument>;

    fn handle(&mut self, _: Export, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let state = match self.live() {
            Ok(s) => s,
            Err(e) => return done(Err(e)),
        };
        let record = state.record.clone();
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let history = match record.head {
                    Some(h) => store.history(h, None).await?,
                    None => Vec::new(),
                };
                Ok(SessionDocument { record, history })
            }
            .into_actor(self),
        ))
    }
}

/// Leave memory now (the state is already durable).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;

impl Handler<Passivate> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Context<Self>) {
        self.passivate(ctx);
    }
}

/// Take a checkpoint now.
#[derive(Message)]
#[rtype(result = "Result<CheckpointRecord>")]
pub(crate) struct TakeCheckpoint {
    pub label: Option<String>,
    pub description: Option<String>,
    pub kind: CheckpointKind,
}

impl Handler<TakeCheckpoint> for SessionActor {
    type Result = Reply<CheckpointRecord>;

    fn handle(&mut self, msg: TakeCheckpoint, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let record = match self.live() {
            Ok(s) => s.record.clone(),
            Err(e) => return done(Err(e)),
        };
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut label = msg.label;
                if msg.kind == CheckpointKind::Version {
                    let last = store
                        .list_checkpoints(&record.id)
                        .await?
                        .iter()
                        .filter_map(crate::checkpoint::Version::from_checkpoint)
                        .map(|v| v.version)
                        .max()
                        .unwrap_or(0);
                    label = Some(format!("v{}", last + 1));
                }
                let cp = CheckpointRecord {
                    id: uuid::Uuid::new_v4().to_string(),
                    session_id: record.id.clone(),
                    head: record.head,
                    label,
                    description: msg.description,
                    kind: msg.kind,
                    state: record.clone(),
                    created_at: now(),
                };
                let mut next = record;
                let expected = next.state_version;
                next.state_version += 1;
                let version = next.state_version;
                store
                    .commit(Commit {
                        record: next,
                        expected_version: Some(expected),
                        small_state_changed: false,
                        new_segment: None,
                        messages: Vec::new(),
                        checkpoints: vec![cp.clone()],
                        drop_checkpoints: Vec::new(),
                    })
                    .await?;
                Ok::<_, Error>((cp, version))
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((cp, version)) => {
                    if let Some(s) = act.live_mut() {
                        s.record.state_version = version;
                    }
                    Ok(cp)
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// Where a restore moves the head.
pub(crate) enum RestoreTarget {
    /// A checkpoint of this session: head and small state go back.
    Checkpoint(String),
    /// A message (a branch's leaf): only the head moves.
    Head(Option<MessageId>),
}

/// Move the head (and, to a checkpoint, the small state) somewhere else.
/// Nothing is deleted; the head being left is guarded (see [`branch_guard`]).
#[derive(Message)]
#[rtype(result = "Result<SessionMetadata>")]
pub(crate) struct Restore {
    pub to: RestoreTarget,
}

impl Handler<Restore> for SessionActor {
    type Result = Reply<SessionMetadata>;

    fn handle(&mut self, msg: Restore, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let record = match self.live() {
            Ok(s) => s.record.clone(),
            Err(e) => return done(Err(e)),
        };
        let store = self.core.store.clone();
        let cap = self.recent_cap();
        AtomicResponse::new(Box::pin(
            async move {
                let mut next = record.clone();
                let target = match msg.to {
                    RestoreTarget::Head(head) => {
                        next.head = head;
                        head.map_or_else(|| "the root".to_string(), |h| h.to_string())
                    }
                    RestoreTarget::Checkpoint(id) => {
                        let cp = store.get_checkpoint(&id).await?.ok_or_else(|| {
                            StoreError::NotFound {
                                what: "checkpoint",
                                id: id.clone(),
                            }
                        })?;
                        if cp.session_id != record.id {
                            return Err(Error::InvalidRequest(format!(
                                "checkpoint '{}' belongs to session '{}', not '{}' (fork it instead)",
                                cp.id, cp.session_id, record.id
                            )));
                        }
                        next.head = cp.head;
                        next.profile = cp.state.profile;
                        next.preferences = cp.state.preferences;
                        next.user_data = cp.state.user_data;
                        next.metadata = cp.state.metadata;
                        next.interactions = cp.state.interactions;
                        // The shared-state namespace is how the session is
                        // wired, not part of its past: it stays as it is now.
                        match record.metadata.get(SHARED_STATE_KEY) {
                            Some(ns) => {
                                next.metadata.insert(SHARED_STATE_KEY.into(), ns.clone());
                            }
                            None => {
                                next.metadata.remove(SHARED_STATE_KEY);
                            }
                        }
                        cp.label.unwrap_or(cp.id)
                    }
                };
                // Read first: if this fails nothing has changed.
                let recent = match next.head {
                    Some(h) => store.history(h, Some(cap)).await?,
                    None => Vec::new(),
                };
                next.updated_at = now();
                next.state_version = record.state_version + 1;
                let protect = branch_guard(&store, &record, next.head, &target).await?;
                store
                    .commit(Commit {
                        record: next.clone(),
                        expected_version: Some(record.state_version),
                        small_state_changed: true,
                        new_segment: None,
                        messages: Vec::new(),
                        checkpoints: protect.into_iter().collect(),
                        drop_checkpoints: Vec::new(),
                    })
                    .await?;
                Ok::<_, Error>((next, recent))
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((next, recent)) => {
                    let meta = SessionMetadata::from(&next);
                    if let Some(s) = act.live_mut() {
                        s.record = next;
                        s.recent = recent.into();
                        // The next turn starts a new branch; the old one stays.
                        s.can_append = false;
                    }
                    Ok(meta)
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// The branches of the conversation tree.
#[derive(Message)]
#[rtype(result = "Result<Vec<crate::checkpoint::Branch>>")]
pub(crate) struct Branches;

impl Handler<Branches> for SessionActor {
    type Result = Reply<Vec<crate::checkpoint::Branch>>;

    fn handle(&mut self, _: Branches, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let (id, head) = match self.live() {
            Ok(s) => (s.record.id.clone(), s.record.head),
            Err(e) => return done(Err(e)),
        };
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let segments = store.list_segments(&id).await?;
                let checkpoints = store.list_checkpoints(&id).await?;
                Ok(crate::checkpoint::branches(&segments, &checkpoints, head))
            }
            .into_actor(self),
        ))
    }
}

/// Leaving the head for another place: unless a checkpoint already points
/// at the head being left, one is added (kind `Branch`), so that branch stays
/// reachable and garbage collection never takes it.
async fn branch_guard(
    store: &Arc<dyn crate::store::Store>,
    record: &SessionRecord,
    new_head: Option<MessageId>,
    target: &str,
) -> Result<Option<CheckpointRecord>> {
    if record.head.is_none() || record.head == new_head {
        return Ok(None);
    }
    // Already reachable through a checkpoint that is kept until deleted:
    // nothing to add. (Automatic checkpoints do not count: they are pruned.)
    let covered = store
        .list_checkpoints(&record.id)
        .await?
        .iter()
        .any(|c| c.head == record.head && c.kind != CheckpointKind::Auto);
    Ok((!covered).then(|| CheckpointRecord {
        id: uuid::Uuid::new_v4().to_string(),
        session_id: record.id.clone(),
        head: record.head,
        label: Some(format!("branch tip left for '{target}'")),
        description: None,
        kind: CheckpointKind::Branch,
        state: record.clone(),
        created_at: now(),
    }))
}

/// Delete a checkpoint of this session.
#[derive(Message)]
#[rtype(result = "Result<bool>")]
pub(crate) struct DeleteCheckpoint {
    pub checkpoint_id: String,
}

impl Handler<DeleteCheckpoint> for SessionActor {
    type Result = Reply<bool>;

    fn handle(&mut self, msg: DeleteCheckpoint, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let record = match self.live() {
            Ok(s) => s.record.clone(),
            Err(e) => return done(Err(e)),
        };
        let store = self.core.store.clone();
        let checkpoint_id = msg.checkpoint_id.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let exists = store
                    .get_checkpoint(&msg.checkpoint_id)
                    .await?
                    .is_some_and(|c| c.session_id == record.id);
                if !exists {
                    return Ok((false, record.state_version));
                }
                let mut next = record.clone();
                next.state_version += 1;
                let version = next.state_version;
                store
                    .commit(Commit {
                        record: next,
                        expected_version: Some(record.state_version),
                        small_state_changed: false,
                        new_segment: None,
                        messages: Vec::new(),
                        checkpoints: Vec::new(),
                        drop_checkpoints: vec![msg.checkpoint_id],
                    })
                    .await?;
                Ok::<_, Error>((true, version))
            }
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok((deleted, version)) => {
                    if let Some(s) = act.live_mut() {
                        s.record.state_version = version;
                    }
                    // Only once the delete is durable does the pruning list forget it.
                    if let Some(ids) = &mut act.auto_ids {
                        ids.retain(|i| i != &checkpoint_id);
                    }
                    Ok(deleted)
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}

/// Delete the messages nothing can reach any more.
#[derive(Message)]
#[rtype(result = "Result<crate::checkpoint::GcReport>")]
pub(crate) struct CollectGarbage;

impl Handler<CollectGarbage> for SessionActor {
    type Result = Reply<crate::checkpoint::GcReport>;

    fn handle(&mut self, _: CollectGarbage, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let (id, head, version) = match self.live() {
            Ok(s) => (s.record.id.clone(), s.record.head, s.record.state_version),
            Err(e) => return done(Err(e)),
        };
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let segments = store.list_segments(&id).await?;
                let checkpoints = store.list_checkpoints(&id).await?;
                let external = store.external_refs(&id).await?;
                let roots = head
                    .into_iter()
                    .chain(checkpoints.iter().filter_map(|c| c.head))
                    .chain(external);
                let plan = crate::checkpoint::gc_plan(&segments, roots);
                let segments_trimmed = plan.iter().filter(|p| p.1.is_some()).count();
                let segments_deleted = plan.iter().filter(|p| p.1.is_none()).count();
                let messages_deleted = if plan.is_empty() {
                    0
                } else {
                    store.trim_segments(&id, version, plan).await?
                };
                Ok(crate::checkpoint::GcReport {
                    messages_deleted,
                    segments_trimmed,
                    segments_deleted,
                })
            }
            .into_actor(self)
            // The head is a root, so its segment's tip is never cut:
            // `can_append` stays true where it was.
            .map(|res: Result<crate::checkpoint::GcReport>, act, ctx| {
                res.map_err(|e| act.failed(ctx, e))
            }),
        ))
    }
}

/// Append messages at the head without a model call (workflow results).
#[derive(Message)]
#[rtype(result = "Result<Vec<MessageId>>")]
pub(crate) struct Append {
    pub messages: Vec<super::NewMessage>,
}

impl Handler<Append> for SessionActor {
    type Result = Reply<Vec<MessageId>>;

    fn handle(&mut self, msg: Append, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let state = match self.live() {
            Ok(s) => s,
            Err(e) => return done(Err(e)),
        };
        if msg.messages.is_empty() {
            return done(Ok(Vec::new()));
        }
        let (new_segment, ids) = self.plan(state, msg.messages.len() as u32);
        let mut parent = state.record.head;
        let at = now();
        let messages: Vec<Message> = msg
            .messages
            .into_iter()
            .zip(&ids)
            .map(|(m, id)| {
                let out = Message {
                    id: *id,
                    parent,
                    role: m.role,
                    agent: m.agent,
                    content: m.content,
                    created_at: m.created_at.unwrap_or(at),
                    meta: m.meta,
                };
                parent = Some(*id);
                out
            })
            .collect();
        let mut next = state.record.clone();
        next.head = parent;
        next.updated_at = at;
        next.state_version += 1;
        let commit = Commit {
            record: next.clone(),
            expected_version: Some(state.record.state_version),
            small_state_changed: false,
            new_segment,
            messages: messages.clone(),
            checkpoints: Vec::new(),
            drop_checkpoints: Vec::new(),
        };
        let cap = self.recent_cap();
        commit_then(self, commit, move |act| {
            if let Some(s) = act.live_mut() {
                s.recent.extend(messages);
                while s.recent.len() > cap {
                    s.recent.pop_front();
                }
                s.record = next;
                s.can_append = true;
            }
            ids
        })
    }
}

/// Record user feedback on a reply (kept in the metadata key `feedback`).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct SetFeedback {
    pub message: MessageId,
    pub score: f64,
}

impl Handler<SetFeedback> for SessionActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: SetFeedback, _: &mut Context<Self>) -> Self::Result {
        self.last_active = Instant::now();
        let record = match self.live() {
            Ok(s) => s.record.clone(),
            Err(e) => return done(Err(e)),
        };
        let store = self.core.store.clone();
        AtomicResponse::new(Box::pin(
            async move {
                // The reply must be on this session's path (one read; feedback is rare).
                let history = match record.head {
                    Some(h) => store.history(h, None).await?,
                    None => Vec::new(),
                };
                let found = history.iter().find(|m| m.id == msg.message);
                if !found.is_some_and(|m| m.role == Role::Assistant) {
                    return Err(Error::InvalidRequest(format!(
                        "message {} is not a reply in session '{}'",
                        msg.message, record.id
                    )));
                }
                let mut next = record.clone();
                let mut map = next
                    .metadata
                    .get(FEEDBACK_KEY)
                    .and_then(|v| v.as_object())
                    .cloned()
                    .unwrap_or_default();
                map.insert(msg.message.to_string(), serde_json::json!(msg.score));
                next.metadata
                    .insert(FEEDBACK_KEY.into(), serde_json::Value::Object(map));
                next.updated_at = now();
                next.state_version += 1;
                store
                    .commit(Commit {
                        record: next.clone(),
                        expected_version: Some(record.state_version),
                        small_state_changed: true,
                        new_segment: None,
                        messages: Vec::new(),
                        checkpoints: Vec::new(),
                        drop_checkpoints: Vec::new(),
                    })
                    .await?;
                Ok::<_, Error>(next)
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(next) => {
                    if let Some(s) = act.live_mut() {
                        s.record = next;
                    }
                    Ok(())
                }
                Err(e) => Err(act.failed(ctx, e)),
            }),
        ))
    }
}
