//! Agents: who answers in a session.
//!
//! An [`AgentSpec`] is a definition (name, role, instructions, optional model
//! overrides), read from `agents/*.toml` or built in code with
//! [`Agent::builder`]. An [`Agent`] is a cheap handle to a spec, optionally
//! with its own model. When a session uses an agent the runtime binds it to
//! [`AgentActor`]s (one per arbiter, so a session's model call never hops
//! threads) that own the model client and the agent's metrics.

mod actor;

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use actor::{AgentActor, AgentMetrics, Generate, GenerateStream};

use crate::config::{ModelConfig, ModelProvider};
use crate::model::ChatModel;

/// An agent definition that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The file could not be read.
    #[error("agent file '{path}': {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is not a valid agent definition.
    #[error("agent file '{path}': {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// No agent of that name is defined.
    #[error("unknown agent '{name}' (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
}

/// Model settings an agent may override (any field left out keeps `[model]`'s).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    /// Provider.
    pub provider: Option<ModelProvider>,
    /// Base URL.
    pub base_url: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// API key variable.
    pub api_key_env: Option<String>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Max tokens.
    pub max_tokens: Option<u32>,
    /// Timeout.
    pub timeout_secs: Option<u64>,
    /// Retries.
    pub max_retries: Option<u32>,
}

impl ModelOverrides {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: &ModelConfig) -> ModelConfig {
        let mut c = base.clone();
        if let Some(v) = self.provider {
            c.provider = v;
        }
        if let Some(v) = &self.base_url {
            c.base_url = v.clone();
        }
        if let Some(v) = &self.model {
            c.model = v.clone();
        }
        if let Some(v) = &self.api_key_env {
            c.api_key_env = v.clone();
        }
        if self.temperature.is_some() {
            c.temperature = self.temperature;
        }
        if self.max_tokens.is_some() {
            c.max_tokens = self.max_tokens;
        }
        if let Some(v) = self.timeout_secs {
            c.timeout_secs = v;
        }
        if let Some(v) = self.max_retries {
            c.max_retries = v;
        }
        c
    }

    /// Whether any field is set.
    pub fn is_empty(&self) -> bool {
        self == &ModelOverrides::default()
    }

    /// Whether these overrides need a model client of their own (another
    /// provider, server, model, key, timeout or retry policy). Sampling
    /// settings (temperature, max tokens) travel with each request instead.
    pub fn needs_own_client(&self) -> bool {
        self.provider.is_some()
            || self.base_url.is_some()
            || self.model.is_some()
            || self.api_key_env.is_some()
            || self.timeout_secs.is_some()
            || self.max_retries.is_some()
    }
}

/// An agent definition, as in `agents/NAME.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The agent's name (unique in a runtime).
    pub name: String,
    /// Its role, in a few words ("researcher").
    #[serde(default)]
    pub role: Option<String>,
    /// Its instructions: the system prompt.
    #[serde(default)]
    pub instructions: String,
    /// Model overrides.
    #[serde(default, skip_serializing_if = "ModelOverrides::is_empty")]
    pub model: ModelOverrides,
}

impl AgentSpec {
    /// Reads one agent file.
    pub fn from_file(path: &Path) -> Result<AgentSpec, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let spec: AgentSpec = toml::from_str(&text).map_err(|e| AgentError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string().trim_end().to_string(),
        })?;
        if spec.name.trim().is_empty() {
            return Err(AgentError::Invalid {
                path: path.display().to_string(),
                reason: "field `name` is empty".into(),
            });
        }
        Ok(spec)
    }

    /// Reads every `*.toml` in a folder, sorted by file name. A missing folder
    /// is no agents; a broken file is an error naming it.
    pub fn load_dir(dir: &Path) -> Result<Vec<AgentSpec>, AgentError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(AgentError::Read {
                    path: dir.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut specs: Vec<AgentSpec> = Vec::new();
        for p in paths {
            let spec = AgentSpec::from_file(&p)?;
            if specs.iter().any(|s| s.name == spec.name) {
                return Err(AgentError::Invalid {
                    path: p.display().to_string(),
                    reason: format!(
                        "field `name`: another file already defines agent '{}'",
                        spec.name
                    ),
                });
            }
            specs.push(spec);
        }
        Ok(specs)
    }

    /// The built-in assistant, used when no `agents/assistant.toml` exists.
    pub fn default_assistant() -> AgentSpec {
        AgentSpec {
            name: "assistant".into(),
            role: Some("assistant".into()),
            instructions: "You are a helpful assistant. Use the conversation so far and what you know about the user.".into(),
            model: ModelOverrides::default(),
        }
    }
}

/// A handle to an agent definition, optionally with its own model.
/// Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Agent {
    pub(crate) spec: Arc<AgentSpec>,
    pub(crate) model: Option<Arc<dyn ChatModel>>,
    pub(crate) memory: Option<crate::memory::Memory>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.spec.name)
            .field(
                "own_model",
                &self.model.as_ref().map(|m| m.name().to_string()),
            )
            .finish()
    }
}

impl Agent {
    /// Starts building an agent in code.
    pub fn builder(name: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            spec: AgentSpec {
                name: name.into(),
                role: None,
                instructions: String::new(),
                model: ModelOverrides::default(),
            },
            model: None,
            memory: None,
        }
    }

    /// An agent from a definition.
    pub fn from_spec(spec: AgentSpec) -> Agent {
        Agent {
            spec: Arc::new(spec),
            model: None,
            memory: None,
        }
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The agent's definition.
    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    /// The agent's own long-term memory policy, if any.
    pub fn memory(&self) -> Option<&crate::memory::Memory> {
        self.memory.as_ref()
    }
}

/// Builds an [`Agent`] in code.
pub struct AgentBuilder {
    spec: AgentSpec,
    model: Option<Arc<dyn ChatModel>>,
    memory: Option<crate::memory::Memory>,
}

impl AgentBuilder {
    /// Its role.
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.spec.role = Some(role.into());
        self
    }
    /// Its instructions (system prompt).
    pub fn instructions(mut self, text: impl Into<String>) -> Self {
        self.spec.instructions = text.into();
        self
    }
    /// Model overrides on top of the runtime's `[model]`.
    pub fn model_overrides(mut self, overrides: ModelOverrides) -> Self {
        self.spec.model = overrides;
        self
    }
    /// A model of its own (any [`ChatModel`]), instead of the configured one.
    pub fn model(mut self, model: Arc<dyn ChatModel>) -> Self {
        self.model = Some(model);
        self
    }
    /// A long-term memory policy of its own (threshold, limits, scorer,
    /// extractor). Sessions with a user recall and learn memories with it
    /// even when `memory.long_term` is off. Without one, the runtime's
    /// policy and `[memory]` config apply.
    pub fn memory(mut self, memory: crate::memory::Memory) -> Self {
        self.memory = Some(memory);
        self
    }
    /// The agent.
    pub fn build(self) -> Agent {
        Agent {
            spec: Arc::new(self.spec),
            model: self.model,
            memory: self.memory,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_file_names_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "name = \"x\"\ninstructions = 5\n").unwrap();
        let err = AgentSpec::from_file(&p).unwrap_err().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("instructions"),
            "{err}"
        );
        std::fs::write(&p, "name = \"x\"\ninstuctions = \"hi\"\n").unwrap();
        let err = AgentSpec::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("instuctions"), "{err}");
    }

    #[test]
    fn shipped_agents_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
        let specs = AgentSpec::load_dir(&dir).unwrap();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        for n in ["assistant", "researcher", "writer", "planner", "reviewer"] {
            assert!(names.contains(&n), "{names:?}");
        }
    }
}
