//! Building the prompt a model sees for one turn.
//!
//! The prompt is: the agent's instructions (and role), the user's profile
//! and preferences when there are any, the last `memory.window` turns of the
//! history, and the new message. Older turns stay in the store and in
//! `history()`; they are just not sent. The cost is bounded by the window,
//! not by the history's length.

use std::collections::VecDeque;
use std::fmt::Write as _;

use crate::agent::AgentSpec;
use crate::model::{ChatRequest, PromptMessage};
use crate::store::{JsonMap, Message, Role, SessionRecord};

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
