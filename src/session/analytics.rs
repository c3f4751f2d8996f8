//! What a session knows about its user and how it went: [`SessionContext`]
//! (`build_context`), [`SessionAnalytics`] (`analytics`), feedback, and the
//! session's side of long-term memory (`add_memory`, `memories`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{actor, context, Session};
use crate::error::{Error, Result};
use crate::memory::{self, AddOutcome, MemoryItem};
use crate::store::{JsonMap, MessageId, Role};

/// What the agent sees of the user and the session, besides the history:
/// the profile, the preferences, the remembered memories, the session's
/// recent topics, its duration and its interaction count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionContext {
    /// The session.
    pub session_id: String,
    /// Its user.
    pub user_id: Option<String>,
    /// The user's profile.
    pub profile: JsonMap,
    /// The user's preferences.
    pub preferences: JsonMap,
    /// The user's best memories (what a prompt recalls when its message
    /// matches none by text); empty without a user or long-term memory.
    pub memories: Vec<MemoryItem>,
    /// Keywords of the user's recent messages, most frequent first.
    pub recent_topics: Vec<String>,
    /// Completed turns.
    pub interactions: u64,
    /// When the session started.
    pub started_at: DateTime<Utc>,
    /// Seconds from the start to the last change.
    pub duration_secs: f64,
    /// The system message the default agent gets with this context (the
    /// recalled memories of an actual turn also depend on its message).
    pub system_prompt: String,
}

/// Per-agent figures of a session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Replies by this agent.
    pub replies: u64,
    /// User messages addressed to it.
    pub user_messages: u64,
    /// Replies with a recorded model latency.
    pub timed_calls: u64,
    /// Mean model latency, milliseconds.
    pub mean_latency_ms: f64,
    /// Slowest model call, milliseconds.
    pub max_latency_ms: f64,
    /// Prompt tokens the model reported (or estimated, for echo).
    pub prompt_tokens: u64,
    /// Reply tokens.
    pub completion_tokens: u64,
}

/// Explicit user feedback on replies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// How many replies were rated.
    pub count: usize,
    /// The mean score, if any.
    pub average: Option<f64>,
    /// Score by reply id.
    pub scores: BTreeMap<String, f64>,
}

/// How a session went. Computed from its history (root to head) and its
/// record; the model figures come from each reply's `meta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionAnalytics {
    /// The session.
    pub session_id: String,
    /// Its user.
    pub user_id: Option<String>,
    /// Completed turns.
    pub interactions: u64,
    /// Started at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
    /// Seconds from the start to the last change.
    pub duration_secs: f64,
    /// Messages in the history.
    pub messages: usize,
    /// Of which from the user.
    pub user_messages: usize,
    /// Figures per agent.
    pub agents: BTreeMap<String, AgentStats>,
    /// What the user talked about: keywords of their messages and counts.
    pub topics: Vec<(String, u32)>,
    /// Explicit feedback.
    pub feedback: Feedback,
}

fn feedback_of(metadata: &JsonMap) -> Feedback {
    let scores: BTreeMap<String, f64> = metadata
        .get(actor::FEEDBACK_KEY)
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default();
    let count = scores.len();
    let average = (count > 0).then(|| scores.values().sum::<f64>() / count as f64);
    Feedback {
        count,
        average,
        scores,
    }
}

impl Session {
    /// The long-term memory policy this session's default agent uses.
    fn memory_policy(&self, agent: Option<&str>) -> Result<(memory::Policy, bool)> {
        let core = self.rt.core();
        let binding = match agent {
            Some(a) => Some(core.binding_by_name(a)?),
            None => None,
        };
        let own = binding.as_ref().and_then(|b| b.memory.clone());
        let has_own = own.is_some();
        let m = own.unwrap_or_else(|| core.memory.clone());
        Ok((m.policy(&core.config.memory), has_own))
    }

    /// Remembers `text` for this session's user (explicitly, scored like
    /// any candidate; see [`AddOutcome`]). The session needs a user.
    pub async fn add_memory(&self, text: impl AsRef<str>) -> Result<AddOutcome> {
        let text = text.as_ref();
        if text.trim().is_empty() {
            return Err(Error::InvalidRequest("the memory text is empty".into()));
        }
        let record = self.record().await?;
        let user = record.user_id.clone().ok_or_else(|| {
            Error::InvalidRequest(format!(
                "session '{}' has no user to remember for (open it with .user(..))",
                self.id
            ))
        })?;
        let (policy, _) = self.memory_policy(record.agents.first().map(String::as_str))?;
        let candidate = memory::explicit_candidate(&policy, text);
        let item = memory::item_for(&user, Some(&self.id), candidate);
        memory::store_item(&self.rt.store(), &policy, item).await
    }

    /// The active memories of this session's user (none without a user).
    pub async fn memories(&self) -> Result<Vec<MemoryItem>> {
        match self.user_id().await? {
            Some(u) => self.rt.memories().list(&u).await,
            None => Ok(Vec::new()),
        }
    }

    /// What the agent sees of the user and the session: profile,
    /// preferences, remembered memories, recent topics, duration and
    /// interaction count, and the system message they make.
    pub async fn build_context(&self) -> Result<SessionContext> {
        let record = self.record().await?;
        let core = self.rt.core();
        let recent = self
            .recent(core.config.memory.window.saturating_mul(2))
            .await?;
        let topics = memory::topics(
            recent
                .iter()
                .filter(|m| m.role == Role::User)
                .map(|m| m.content.as_str()),
            5,
        );
        let agent = record
            .agents
            .first()
            .cloned()
            .unwrap_or_else(|| core.config.agents.default.clone());
        let binding = core.binding_by_name(&agent)?;
        let (policy, has_own) = self.memory_policy(Some(&agent))?;
        let on = match record
            .metadata
            .get(actor::LONG_TERM_KEY)
            .and_then(|v| v.as_bool())
        {
            Some(on) => on,
            None => has_own || core.config.memory.long_term,
        };
        let memories = match (&record.user_id, on) {
            (Some(u), true) => match core.store.memory_top(u, policy.retrieve).await {
                Ok(v) => v,
                Err(crate::store::StoreError::Unsupported(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            },
            _ => Vec::new(),
        };
        let mut system_prompt = context::system_prompt(&binding.spec, &record);
        if record.user_id.is_some() && on {
            context::memory_section(&mut system_prompt, &memories);
            let minutes = (crate::store::now() - record.created_at).num_minutes();
            system_prompt.push_str(&context::session_line(
                record.interactions,
                minutes,
                &topics,
            ));
        }
        Ok(SessionContext {
            session_id: record.id.clone(),
            user_id: record.user_id.clone(),
            profile: record.profile.clone(),
            preferences: record.preferences.clone(),
            memories,
            recent_topics: topics.into_iter().map(|(t, _)| t).collect(),
            interactions: record.interactions,
            started_at: record.created_at,
            duration_secs: (record.updated_at - record.created_at).num_milliseconds() as f64 / 1e3,
            system_prompt,
        })
    }

    /// How the session went: interactions, duration, messages per agent,
    /// topics, model latency and tokens per agent, feedback. Reads the
    /// whole history (one store read).
    pub async fn analytics(&self) -> Result<SessionAnalytics> {
        let record = self.record().await?;
        let history = self.history().await?;
        let mut agents: BTreeMap<String, AgentStats> = BTreeMap::new();
        let mut latency_sum: BTreeMap<String, f64> = BTreeMap::new();
        let mut user_messages = 0;
        for m in &history {
            let name = m.agent.clone().unwrap_or_else(|| "-".into());
            match m.role {
                Role::User => {
                    user_messages += 1;
                    agents.entry(name).or_default().user_messages += 1;
                }
                Role::Assistant => {
                    let a = agents.entry(name.clone()).or_default();
                    a.replies += 1;
                    let meta = m.meta.as_ref();
                    if let Some(ms) = meta.and_then(|v| v["latency_ms"].as_f64()) {
                        a.timed_calls += 1;
                        a.max_latency_ms = a.max_latency_ms.max(ms);
                        *latency_sum.entry(name).or_default() += ms;
                    }
                    if let Some(u) = meta.map(|v| &v["usage"]) {
                        a.prompt_tokens += u["prompt_tokens"].as_u64().unwrap_or(0);
                        a.completion_tokens += u["completion_tokens"].as_u64().unwrap_or(0);
                    }
                }
                _ => {}
            }
        }
        for (name, sum) in latency_sum {
            if let Some(a) = agents.get_mut(&name) {
                a.mean_latency_ms = sum / a.timed_calls.max(1) as f64;
            }
        }
        let topics = memory::topics(
            history
                .iter()
                .filter(|m| m.role == Role::User)
                .map(|m| m.content.as_str()),
            10,
        );
        Ok(SessionAnalytics {
            session_id: record.id.clone(),
            user_id: record.user_id.clone(),
            interactions: record.interactions,
            created_at: record.created_at,
            updated_at: record.updated_at,
            duration_secs: (record.updated_at - record.created_at).num_milliseconds() as f64 / 1e3,
            messages: history.len(),
            user_messages,
            agents,
            topics,
            feedback: feedback_of(&record.metadata),
        })
    }

    /// Records the user's rating of a reply (any finite number, e.g. 1–5
    /// stars or −1/+1); a second rating of the same reply replaces the
    /// first. The reply must be an assistant message of this session's
    /// history. Durable when this returns; [`analytics`](Self::analytics)
    /// averages them.
    pub async fn feedback(&self, message_id: MessageId, score: f64) -> Result<()> {
        if !score.is_finite() {
            return Err(Error::InvalidRequest(format!(
                "feedback score {score} is not a finite number"
            )));
        }
        self.call(|| actor::SetFeedback {
            message: message_id,
            score,
        })
        .await?
    }
}
