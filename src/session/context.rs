//! Building the prompt a model sees for one turn.
//!
//! The prompt is: the agent's instructions (and role), the user's profile
//! and preferences when there are any, then — for a session with long-term
//! memory — what is remembered about the user and a line of session context
//! (turn, duration, recent topics); the last `memory.window` turns of the
//! history, and the new message. With `memory.max_context_tokens` the
//! oldest history messages are then left out until the whole prompt fits
//! the budget ([`apply_budget`], counted with
//! [`estimate_message_tokens`](crate::memory::estimate_message_tokens)).
//! Older turns stay in the store and in `history()`; they are just not
//! sent. The cost is bounded by the window, not by the history's length.

use std::collections::VecDeque;
use std::fmt::Write as _;

use crate::agent::AgentSpec;
use crate::memory::estimate_message_tokens;
use crate::model::{ChatRequest, PromptMessage};
use crate::store::{JsonMap, MemoryItem, Message, Role, SessionRecord};

/// The heading of the recalled memories in the system message.
pub(crate) const MEMORY_HEADING: &str = "What you remember about this user (long-term memory):";

/// Appends the recalled memories to a system message.
pub(crate) fn memory_section(s: &mut String, memories: &[MemoryItem]) {
    if memories.is_empty() {
        return;
    }
    let _ = write!(s, "\n\n{MEMORY_HEADING}");
    for m in memories {
        let _ = write!(s, "\n- {}", m.content);
    }
}

/// The line of session context the agent sees (long-term memory sessions).
pub(crate) fn session_line(interactions: u64, minutes: i64, topics: &[(String, u32)]) -> String {
    let mut s = format!("\n\nSession context: turn {}", interactions + 1);
    if minutes > 0 {
        let _ = write!(s, ", started {minutes} min ago");
    }
    if !topics.is_empty() {
        let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
        let _ = write!(s, "; recent topics: {}", names.join(", "));
    }
    s.push('.');
    s
}

/// The estimated tokens of a whole request.
pub(crate) fn request_tokens(request: &ChatRequest) -> usize {
    request
        .messages
        .iter()
        .map(|m| estimate_message_tokens(&m.content))
        .sum()
}

/// Leaves out the oldest history messages (everything between the system
/// message and the new user message) until the request's estimated tokens
/// fit `budget`; 0 = no budget. The system message and the new message are
/// always sent, even if they alone exceed it. Returns how many were left out.
pub(crate) fn apply_budget(request: &mut ChatRequest, budget: usize) -> usize {
    if budget == 0 || request.messages.len() < 3 {
        return 0;
    }
    let last = request.messages.len() - 1;
    let mut total = request_tokens(request);
    // History occupies 1..last; drop from the front.
    let mut drop = 0;
    while total > budget && 1 + drop < last {
        total -= estimate_message_tokens(&request.messages[1 + drop].content);
        drop += 1;
    }
    if drop > 0 {
        request.messages.drain(1..1 + drop);
    }
    drop
}

/// The system message for `spec` talking to the session in `record`.
pub(crate) fn system_prompt(spec: &AgentSpec, record: &SessionRecord) -> String {
    let mut s = String::with_capacity(spec.instructions.len() + 64);
    if let Some(role) = &spec.role {
        let _ = write!(s, "You are {}, the {}. ", spec.name, role);
    }
    s.push_str(&spec.instructions);
    section(&mut s, "User profile", &record.profile);
    section(&mut s, "User preferences", &record.preferences);
    s
}

fn section(s: &mut String, title: &str, map: &JsonMap) {
    if map.is_empty() {
        return;
    }
    let _ = write!(s, "\n\n{title}:");
    for (k, v) in map {
        match v {
            serde_json::Value::String(text) => {
                let _ = write!(s, "\n- {k}: {text}");
            }
            other => {
                let _ = write!(s, "\n- {k}: {other}");
            }
        }
    }
}

/// The request for one turn: system prompt, the last `window` turns of
/// `recent`, then `message`.
pub(crate) fn build_request(
    spec: &AgentSpec,
    record: &SessionRecord,
    recent: &VecDeque<Message>,
    window: usize,
    message: &str,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
) -> ChatRequest {
    let keep = window.saturating_mul(2).min(recent.len());
    let mut messages = Vec::with_capacity(keep + 2);
    messages.push(PromptMessage::new(
        Role::System,
        system_prompt(spec, record),
    ));
    for m in recent.iter().skip(recent.len() - keep) {
        messages.push(PromptMessage {
            role: m.role,
            content: m.content.clone(),
            // Another agent's words carry its name, so agents can tell each other apart.
            name: match (&m.agent, m.role) {
                (Some(a), Role::Assistant) if a != &spec.name => Some(a.clone()),
                _ => None,
            },
        });
    }
    messages.push(PromptMessage::new(Role::User, message));
    ChatRequest {
        messages,
        temperature,
        max_tokens,
    }
}
