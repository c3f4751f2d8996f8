//! Configuration: `config.toml`, then environment overrides.
//!
//! Where the file comes from, first match wins: an explicit path
//! (`--config`), `TROUPE_CONFIG`, `./config.toml` if present, else built-in
//! defaults. Relative paths inside the file (the store, the agents folder)
//! are relative to the file's own directory, so a command works from any
//! working directory. Unknown keys and wrong types are errors that name the
//! key and the file.
//!
//! Environment overrides, applied last: `TROUPE_MODEL_PROVIDER`,
//! `TROUPE_MODEL_BASE_URL`, `TROUPE_MODEL_NAME`, `TROUPE_STORE_PATH`,
//! `TROUPE_STORE_BACKEND`, `TROUPE_STORE_URL`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::store::SyncMode;

/// A configuration that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file '{path}': {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("config file '{path}': {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// A value (from the file or the environment) is not acceptable.
    #[error("config: {key} = {value:?}: {reason}")]
    Invalid {
        /// The key (or environment variable).
        key: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// Which store backend holds the durable state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Embedded SQLite file (the default; no set-up).
    #[default]
    Sqlite,
    /// In process memory; nothing survives the process.
    Memory,
    /// A Redis server shared by several nodes (`store.url`).
    Redis,
}

/// `[store]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The backend.
    pub backend: StoreBackend,
    /// The SQLite file.
    pub path: PathBuf,
    /// fsync policy.
    pub sync: SyncMode,
    /// The server URL of a networked backend (`redis://127.0.0.1:6379/0`).
    pub url: String,
    /// Prefix of every key a networked backend writes, so several
    /// deployments can share one server.
    pub key_prefix: String,
    /// How long a node's claim on a live session lasts without renewal
    /// (Redis backend), milliseconds.
    pub lease_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            path: PathBuf::from("data/troupe.db"),
            sync: SyncMode::Full,
            url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "troupe:".into(),
            lease_ms: 10_000,
        }
    }
}

/// Which model provider answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelProvider {
    /// The offline deterministic echo model.
    #[default]
    Echo,
    /// Any OpenAI-compatible `/v1/chat/completions` server.
    Openai,
}

impl std::str::FromStr for ModelProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "echo" => Ok(ModelProvider::Echo),
            "openai" => Ok(ModelProvider::Openai),
            other => Err(format!(
                "unknown model provider '{other}' (expected echo or openai)"
            )),
        }
    }
}

/// `[model]`: the default model; agents may override any field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The provider.
    pub provider: ModelProvider,
    /// Base URL of an OpenAI-compatible server (up to and including `/v1`).
    pub base_url: String,
    /// The model name sent to the server.
    pub model: String,
    /// The environment variable holding the API key (none needed for local servers).
    pub api_key_env: String,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Most tokens in a reply.
    pub max_tokens: Option<u32>,
    /// Per-request timeout.
    pub timeout_secs: u64,
    /// Retries on 429, 5xx and connection errors (exponential backoff).
    pub max_retries: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            provider: ModelProvider::Echo,
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            temperature: None,
            max_tokens: None,
            timeout_secs: 60,
            max_retries: 3,
        }
    }
}

/// `[sessions]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// A live session idle this long is passivated (its actor stops; its state stays in the store).
    pub idle_secs: f64,
    /// A session not updated for this long is deleted (0 = never).
    pub ttl_secs: u64,
    /// Actor threads (arbiters); 0 = one per core.
    pub arbiters: usize,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_secs: 300.0,
            ttl_secs: 0,
            arbiters: 0,
        }
    }
}

/// `[memory]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Turns of recent history sent to the model.
    pub window: usize,
    /// A token budget for the whole prompt (estimated: ceil(chars / 4) + 4
    /// per message); the oldest history messages are left out until it
    /// fits. 0 = no budget (only `window` applies).
    pub max_context_tokens: usize,
    /// Long-term memory for sessions that have a user: recall memories into
    /// every prompt and learn new ones from what the user says. An agent's
    /// own `Memory` or `persist_memory(..)` on a session overrides it.
    pub long_term: bool,
    /// Learn memories from what the user says (the rule-based extractor).
    pub extract: bool,
    /// Candidate memories with a quality score below this are not stored (0 to 1).
    pub quality_threshold: f64,
    /// Most memories kept per user; past it the lowest-scoring are evicted.
    pub max_memories: usize,
    /// Memories put into each prompt (best text matches, then best scores).
    pub retrieve: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            window: 20,
            max_context_tokens: 0,
            long_term: true,
            extract: true,
            quality_threshold: 0.5,
            max_memories: 1000,
            retrieve: 5,
        }
    }
}

/// `[checkpoint]`: the supervisor's automatic checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Take an automatic checkpoint every this many interactions (0 = never).
    pub every: u64,
    /// Keep this many automatic checkpoints per session (labelled checkpoints
    /// and versions are kept until deleted).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 5, keep: 10 }
    }
}

/// `[workflow]`: pipeline runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkflowConfig {
    /// Most tasks of one run at once.
    pub max_parallel: usize,
    /// First retry delay of a failed task, milliseconds (doubles each retry).
    pub retry_backoff_ms: u64,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        WorkflowConfig {
            max_parallel: 4,
            retry_backoff_ms: 500,
        }
    }
}

/// `[agents]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// The folder of agent definitions (`*.toml`).
    pub dir: PathBuf,
    /// The agent a session gets when none is named.
    pub default: String,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            dir: PathBuf::from("agents"),
            default: "assistant".into(),
        }
    }
}

/// `[server]`: the daemon (`troupe serve`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: String,
    /// Environment variable holding the admin API key (unset = auth off).
    pub api_key_env: String,
    /// Environment variable holding the session-token signing keys,
    /// `kid:secret[,kid:secret…]`; the first signs, all verify (rotation).
    pub token_keys_env: String,
    /// Largest request body accepted, bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Allow binding a non-loopback address with auth off.
    pub allow_public_without_auth: bool,
    /// This node's name (several nodes sharing a Redis store); empty = host-pid.
    pub node_id: String,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// How long a graceful stop waits for requests in flight (their turns
    /// included), seconds; 0 = derived from `[model]`:
    /// `(max_retries + 1) × timeout_secs + 10`.
    pub shutdown_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: "127.0.0.1:8000".into(),
            api_key_env: "TROUPE_API_KEY".into(),
            token_keys_env: "TROUPE_TOKEN_KEYS".into(),
            max_body_bytes: 1 << 20,
            allow_public_without_auth: false,
            node_id: String::new(),
            workers: 0,
            shutdown_timeout_secs: 0,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[store]`
    pub store: StoreConfig,
    /// `[model]`
    pub model: ModelConfig,
    /// `[sessions]`
    pub sessions: SessionsConfig,
    /// `[memory]`
    pub memory: MemoryConfig,
    /// `[checkpoint]`
    pub checkpoint: CheckpointConfig,
    /// `[workflow]`
    pub workflow: WorkflowConfig,
    /// `[agents]`
    pub agents: AgentsConfig,
    /// `[server]`
    pub server: ServerConfig,
    /// The file this was read from, if any.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Reads a config file (relative paths in it are made relative to its directory).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut config = Config::from_toml_str(&text).map_err(|reason| ConfigError::Parse {
            path: path.display().to_string(),
            reason,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        config.store.path = rebase(base, &config.store.path);
        config.agents.dir = rebase(base, &config.agents.dir);
        config.source = Some(path.to_path_buf());
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no path rebasing, no environment).
    pub fn from_toml_str(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Finds and reads the configuration (see the module docs), then applies
    /// the environment overrides.
    pub fn discover(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os("TROUPE_CONFIG").map(PathBuf::from);
        let mut config = match explicit.map(Path::to_path_buf).or(env_path) {
            Some(p) => Config::from_file(p)?,
            None if Path::new("config.toml").is_file() => Config::from_file("config.toml")?,
            None => Config::default(),
        };
        config.apply_env()?;
        Ok(config)
    }

    /// Applies the `TROUPE_*` environment overrides.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("TROUPE_MODEL_PROVIDER") {
            self.model.provider = v.parse().map_err(|reason| ConfigError::Invalid {
                key: "TROUPE_MODEL_PROVIDER".into(),
                value: v.clone(),
                reason,
            })?;
        }
        if let Some(v) = var("TROUPE_MODEL_BASE_URL") {
            self.model.base_url = v;
        }
        if let Some(v) = var("TROUPE_MODEL_NAME") {
            self.model.model = v;
        }
        if let Some(v) = var("TROUPE_STORE_PATH") {
            self.store.path = PathBuf::from(v);
        }
        if let Some(v) = var("TROUPE_STORE_BACKEND") {
            self.store.backend = match v.as_str() {
                "sqlite" => StoreBackend::Sqlite,
                "memory" => StoreBackend::Memory,
                "redis" => StoreBackend::Redis,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "TROUPE_STORE_BACKEND".into(),
                        value: v,
                        reason: "expected sqlite, memory or redis".into(),
                    })
                }
            };
        }
        if let Some(v) = var("TROUPE_STORE_URL") {
            self.store.url = v;
        }
        self.validate()
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                value,
                reason: reason.into(),
            })
        };
        // Ten years: anything longer is "never" and would overflow timers.
        const MAX_SECS: f64 = 315_360_000.0;
        let idle = self.sessions.idle_secs;
        if !(idle.is_finite() && idle > 0.0 && idle <= MAX_SECS) {
            return invalid(
                "sessions.idle_secs",
                idle.to_string(),
                "must be a number of seconds greater than 0 and at most 315360000 (ten years)",
            );
        }
        if self.sessions.ttl_secs as f64 > MAX_SECS {
            return invalid(
                "sessions.ttl_secs",
                self.sessions.ttl_secs.to_string(),
                "must be at most 315360000 (ten years); 0 means never expire",
            );
        }
        if self.memory.window == 0 {
            return invalid("memory.window", "0".into(), "must be at least 1");
        }
        let t = self.memory.quality_threshold;
        if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            return invalid(
                "memory.quality_threshold",
                t.to_string(),
                "must be between 0 and 1",
            );
        }
        if self.memory.max_memories == 0 {
            return invalid("memory.max_memories", "0".into(), "must be at least 1");
        }
        if self.model.timeout_secs == 0 {
            return invalid("model.timeout_secs", "0".into(), "must be at least 1");
        }
        Ok(())
    }
}

fn rebase(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() || base.as_os_str().is_empty() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err =
            Config::from_toml_str("[store]\nbackend = \"sqlite\"\npaht = \"x\"\n").unwrap_err();
        assert!(err.contains("paht"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml_str("[sessions]\nidle_secs = \"soon\"\n").unwrap_err();
        assert!(err.contains("idle_secs"), "{err}");
    }

    #[test]
    fn defaults_are_the_embedded_ones() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.store.backend, StoreBackend::Sqlite);
        assert_eq!(c.store.sync, SyncMode::Full);
        assert_eq!(c.model.provider, ModelProvider::Echo);
        assert_eq!(c.memory.window, 20);
    }

    #[test]
    fn absurd_durations_are_refused_not_panics() {
        for text in [
            "[sessions]\nidle_secs = inf\n",
            "[sessions]\nidle_secs = 0\n",
            "[sessions]\nttl_secs = 18446744073709551615\n",
        ] {
            let c = Config::from_toml_str(text).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("sessions."), "{text}: {err}");
        }
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[store]\npath = \"db/x.db\"\n").unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.store.path, dir.path().join("db/x.db"));
    }
}
