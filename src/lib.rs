//! troupe: a runtime for stateful multi-agent applications.
//!
//! Give agents **sessions that remember**: a conversation survives restarts,
//! a user's state follows them, and every turn is durable before it is
//! acknowledged. Every session and every agent is an actix actor; the
//! embedded default store is a SQLite file that needs no set-up.
//!
//! ```no_run
//! # async fn demo() -> troupe::Result<()> {
//! let rt = troupe::Runtime::from_config("config.toml").await?;
//! let agent = rt.agent("assistant")?;
//! let session = rt.session("user_123").agent(agent).open().await?;
//! let reply = session.chat("My name is Alice").await?;
//! session.save("sessions/alice.json").await?;
//! let again = troupe::Session::load(&rt, "sessions/alice.json").await?;
//! # let _ = (reply, again); Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`runtime`]: the [`Runtime`] — actix system, store, agents, registry.
//! - [`session`]: the [`Session`] handle and the `SessionActor` behind it.
//! - [`checkpoint`]: checkpoints, versions, branches, fork and merge.
//! - [`agent`]: agent definitions (`agents/*.toml`) and the `AgentActor`.
//! - [`model`]: the [`ChatModel`] trait; `echo` and `openai` providers.
//! - [`state`]: [`SharedState`] — namespaced, versioned key/value shared by agents and sessions.
//! - [`workflow`]: config-file pipelines — parsing, validation, templates, scheduling, graphs.
//! - [`store`]: the [`Store`] trait; `memory`, `sqlite` and `redis` backends; session files.
//! - [`memory`]: the context window, long-term per-user memories, analytics.
//! - [`server`]: the daemon (`troupe serve`): REST `/v1`, OpenAI- and PraisonAI-compatible endpoints, auth.
//! - [`client`]: [`client::RemoteSession`], a session served by a daemon.
//! - [`config`]: `config.toml` and environment overrides.
//! - [`bench`]: the built-in benchmark (`troupe bench`).
//! - [`error`]: the crate's [`Error`].
#![warn(missing_docs)]

pub mod agent;
pub mod bench;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod error;
pub mod memory;
pub mod model;
pub mod runtime;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod workflow;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use agent::{Agent, AgentSpec};
pub use config::Config;
pub use error::{Error, Result};
pub use memory::{recency, Memory, MemoryItem, MemoryKind, MemoryProvider, QualityScorer};
pub use model::{ChatModel, EchoModel};
pub use runtime::{Runtime, RuntimeBuilder};
pub use session::{
    ChatReply, NewMessage, Session, SessionAnalytics, SessionBuilder, SessionContext,
    SessionMetadata, StateChange, StreamEvent,
};
pub use state::SharedState;
pub use store::{JsonMap, Message, MessageId, Role, SessionFilter, SessionRecord, Store};

/// Installs the process-wide TLS provider reqwest needs (ring). Idempotent;
/// the runtime calls it on start, programs may call it earlier.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
