//! Language models: the [`ChatModel`] trait and its providers.
//!
//! - [`EchoModel`]: offline and deterministic, for demos, tests and
//!   benchmarks. It says what it is in every reply's metadata
//!   (`{"model": "echo", "offline": true}`) and never pretends to understand.
//! - [`OpenAiModel`]: any OpenAI-compatible `/v1/chat/completions` server
//!   (OpenAI, Ollama, vLLM, llama.cpp, LM Studio), with timeouts, retries
//!   with exponential backoff on 429/5xx/connection errors, and SSE streaming.

mod echo;
mod openai;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub use echo::EchoModel;
pub(crate) use openai::SseParser;
pub use openai::{OpenAiModel, OpenAiSettings};

use crate::config::{ModelConfig, ModelProvider};
use crate::store::Role;

/// One message of a prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// Who says it.
    pub role: Role,
    /// What is said.
    pub content: String,
    /// The speaker's name (an agent's, in multi-agent sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl PromptMessage {
    /// A message with no name.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        PromptMessage {
            role,
            content: content.into(),
            name: None,
        }
    }
}

/// A request to a chat model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The prompt, system message first.
    pub messages: Vec<PromptMessage>,
    /// Sampling temperature (provider default if `None`).
    pub temperature: Option<f32>,
    /// Most tokens in the reply.
    pub max_tokens: Option<u32>,
}

/// Tokens used by one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Reply tokens.
    pub completion_tokens: u32,
}

/// A model's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The reply text.
    pub content: String,
    /// The model that answered, as it names itself.
    pub model: String,
    /// Token usage, when the provider reports it (or an estimate, for echo).
    pub usage: Option<Usage>,
}

/// A stream of reply text pieces.
pub type TextStream = BoxStream<'static, Result<String, ModelError>>;

/// What can go wrong talking to a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The server could not be reached.
    #[error("model server {url} unreachable: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server did not answer in time.
    #[error("model server {url} did not answer within {secs} s")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        secs: u64,
    },
    /// The server answered with an error status.
    #[error("model server {url} answered {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The server answered something that is not a chat completion.
    #[error("model server {url} sent an unreadable reply: {reason}")]
    BadReply {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The model is misconfigured (e.g. its API key variable is unset).
    #[error("model configuration: {0}")]
    Config(String),
    /// The model call panicked or its actor died.
    #[error("model call failed: {0}")]
    Failed(String),
}

/// A chat model. Small on purpose: one call, one streaming call.
#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    /// The model's name, for metadata and logs.
    fn name(&self) -> &str;

    /// Answers a prompt.
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError>;

    /// Answers a prompt piece by piece. The default streams the whole
    /// [`complete`](ChatModel::complete) answer as one piece.
    async fn stream(&self, request: &ChatRequest) -> Result<TextStream, ModelError> {
        let resp = self.complete(request).await?;
        Ok(Box::pin(futures::stream::once(
            async move { Ok(resp.content) },
        )))
    }

    /// Metadata recorded with each reply (which model, whether offline).
    fn reply_meta(&self) -> serde_json::Value {
        serde_json::json!({ "model": self.name() })
    }
}

#[async_trait]
impl<T: ChatModel + ?Sized> ChatModel for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        (**self).complete(request).await
    }
    async fn stream(&self, request: &ChatRequest) -> Result<TextStream, ModelError> {
        (**self).stream(request).await
    }
    fn reply_meta(&self) -> serde_json::Value {
        (**self).reply_meta()
    }
}

/// Builds the model a configuration names.
pub fn from_config(config: &ModelConfig) -> Result<Arc<dyn ChatModel>, ModelError> {
    match config.provider {
        ModelProvider::Echo => Ok(Arc::new(EchoModel::new())),
        ModelProvider::Openai => Ok(Arc::new(OpenAiModel::new(OpenAiSettings::from_config(
            config,
        )?)?)),
    }
}

/// A rough token count (about four characters a token), used where a
/// provider reports none. Documented as an estimate wherever it is shown.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.len() as u32).div_ceil(4)
}
