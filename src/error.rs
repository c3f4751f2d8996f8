//! The crate's error type: one variant per boundary, each converted with `From`.

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::model::ModelError;
use crate::store::file::FileError;
use crate::store::StoreError;

/// Anything the runtime can fail with. Messages name the thing and the value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A model call.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An agent definition.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A session file.
    #[error(transparent)]
    File(#[from] FileError),
    /// A pipeline or a workflow run.
    #[error(transparent)]
    Workflow(#[from] crate::workflow::WorkflowError),
    /// No session has this id.
    #[error("session '{0}' not found")]
    SessionNotFound(String),
    /// A session id that cannot be used.
    #[error("invalid session id {id:?}: {reason}")]
    InvalidSessionId {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A request that makes no sense for the session (e.g. an empty message).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The session's actor could not serve the request (it stopped or failed to load).
    #[error("session '{id}' is unavailable: {reason}")]
    SessionUnavailable {
        /// The session.
        id: String,
        /// Why.
        reason: String,
    },
    /// The runtime is shut down or could not start.
    #[error("runtime: {0}")]
    Runtime(String),
    /// A call to a remote daemon failed (see [`crate::client::RemoteSession`]).
    #[error("{url}: {message}")]
    Remote {
        /// The request (method and URL).
        url: String,
        /// The HTTP status, if the server answered.
        status: Option<u16>,
        /// The server's error code (`not_found`, `unauthorized`, …), or
        /// `unreachable`/`timeout`/`bad_response` for client-side failures.
        code: String,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// Whether another writer changed the session first, or another node
    /// owns it now (the turn was not applied; retrying it works against the
    /// fresh state).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::Store(
                StoreError::Conflict { .. }
                    | StoreError::Fenced { .. }
                    | StoreError::OwnedElsewhere { .. }
            )
        )
    }

    /// Whether the session actor must drop its state and reload from the
    /// store before the next call: another writer or node changed it
    /// ([`is_conflict`](Self::is_conflict)), or a write was sent but its
    /// outcome is unknown (it may have been applied).
    pub fn must_reload(&self) -> bool {
        self.is_conflict() || matches!(self, Error::Store(StoreError::OutcomeUnknown { .. }))
    }

    /// Whether a shared-state write was refused because the key's version moved on.
    pub fn is_version_mismatch(&self) -> bool {
        matches!(self, Error::Store(StoreError::VersionMismatch { .. }))
    }

    /// Whether this is a "not found" of some record (for exit codes and HTTP 404).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::SessionNotFound(_)
                | Error::Store(StoreError::NotFound { .. })
                | Error::Agent(AgentError::Unknown { .. })
                | Error::Remote {
                    status: Some(404),
                    ..
                }
        )
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
