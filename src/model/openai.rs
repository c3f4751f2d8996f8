//! The OpenAI-compatible provider (stub: being written).

use std::time::Duration;

use async_trait::async_trait;

use super::{ChatModel, ChatRequest, ChatResponse, ModelError};
use crate::config::ModelConfig;

/// Settings of an OpenAI-compatible model.
#[derive(Clone, Debug)]
pub struct OpenAiSettings {
    /// Base URL, up to and including `/v1`.
    pub base_url: String,
    /// Model name sent to the server.
    pub model: String,
    /// Bearer token, if the server needs one.
    pub api_key: Option<String>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Most tokens in a reply.
    pub max_tokens: Option<u32>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff delay; doubles each retry.
    pub backoff: Duration,
}

impl OpenAiSettings {
    /// Settings from `[model]`; the API key is read from the variable `api_key_env` names.
    pub fn from_config(config: &ModelConfig) -> Result<Self, ModelError> {
        Ok(OpenAiSettings {
            base_url: config.base_url.trim_end_matches('/').to_string(),
            model: config.model.clone(),
            api_key: std::env::var(&config.api_key_env).ok().filter(|k| !k.is_empty()),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            timeout: Duration::from_secs(config.timeout_secs),
            max_retries: config.max_retries,
            backoff: Duration::from_millis(200),
        })
    }
}

/// A model behind an OpenAI-compatible HTTP API.
pub struct OpenAiModel {
    settings: OpenAiSettings,
}

impl OpenAiModel {
    /// A client for the server the settings name.
    pub fn new(settings: OpenAiSettings) -> Result<Self, ModelError> {
        Ok(OpenAiModel { settings })
    }
}

#[async_trait]
impl ChatModel for OpenAiModel {
    fn name(&self) -> &str {
        &self.settings.model
    }

    async fn complete(&self, _request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        Err(ModelError::Config("the openai provider is not built yet".into()))
    }
}
