//! The echo model: offline, deterministic, honest about being one.

use async_trait::async_trait;

use super::{estimate_tokens, ChatModel, ChatRequest, ChatResponse, ModelError, TextStream, Usage};
use crate::store::Role;

/// Replies by quoting the last user message and saying how much conversation
/// it was given — enough to show that a session remembers, with no model
/// server. It does not understand anything, and its replies say so.
#[derive(Clone, Debug, Default)]
pub struct EchoModel;

impl EchoModel {
    /// The echo model.
    pub fn new() -> Self {
        EchoModel
    }

    fn reply(request: &ChatRequest) -> String {
        let convo: Vec<_> = request
            .messages
            .iter()
            .filter(|m| m.role != Role::System)
            .collect();
        let last_user = convo
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str());
        let earlier = convo.len().saturating_sub(1);
        let first_user = convo
            .iter()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str());
        match first_user {
            Some(first) if earlier > 0 => format!(
                "echo: {} [offline echo model; {} earlier messages in context, the first: \"{}\"]",
                clip(last_user, 200),
                earlier,
                clip(first, 80)
            ),
            _ => format!(
                "echo: {} [offline echo model; no earlier messages in context]",
                clip(last_user, 200)
            ),
        }
    }
}

fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[async_trait]
impl ChatModel for EchoModel {
    fn name(&self) -> &str {
        "echo"
    }

    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let content = Self::reply(request);
        let prompt_tokens = request
            .messages
            .iter()
            .map(|m| estimate_tokens(&m.content))
            .sum();
        Ok(ChatResponse {
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens: estimate_tokens(&content),
            }),
            content,
            model: "echo".into(),
        })
    }

    async fn stream(&self, request: &ChatRequest) -> Result<TextStream, ModelError> {
        let content = Self::reply(request);
        // Word by word, so streaming paths are exercised offline too.
        let pieces: Vec<Result<String, ModelError>> = content
            .split_inclusive(' ')
            .map(|w| Ok(w.to_string()))
            .collect();
        Ok(Box::pin(futures::stream::iter(pieces)))
    }

    fn reply_meta(&self) -> serde_json::Value {
        serde_json::json!({ "model": "echo", "offline": true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PromptMessage;

    #[tokio::test]
    async fn quotes_and_counts_context() {
        let req = ChatRequest {
            messages: vec![
                PromptMessage::new(Role::System, "be nice"),
                PromptMessage::new(Role::User, "My name is Alice"),
                PromptMessage::new(Role::Assistant, "hi"),
                PromptMessage::new(Role::User, "What's my name?"),
            ],
            ..Default::default()
        };
        let r = EchoModel.complete(&req).await.unwrap();
        assert!(
            r.content.starts_with("echo: What's my name?"),
            "{}",
            r.content
        );
        assert!(r.content.contains("2 earlier messages"), "{}", r.content);
        assert!(r.content.contains("My name is Alice"), "{}", r.content);
    }
}
