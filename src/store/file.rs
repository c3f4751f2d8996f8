//! Session files: a session written to, and read from, one portable file.
//! (stub: being written)

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Message, SessionRecord};

/// What a session file holds: the session's record and its history (root to head).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionDocument {
    /// The session's durable state.
    pub record: SessionRecord,
    /// The history, oldest first.
    pub history: Vec<Message>,
}

/// The encoding of a session file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// JSON (the default).
    Json,
    /// bincode (files ending in `.bin`).
    Bincode,
}

impl FileFormat {
    /// The format a path's extension implies: `.bin` is bincode, anything else JSON.
    pub fn from_path(path: &Path) -> FileFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("bin") => FileFormat::Bincode,
            _ => FileFormat::Json,
        }
    }
}

/// A session file that could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading or writing failed.
    #[error("session file '{path}': {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is not a troupe session file, or it is damaged.
    #[error("session file '{path}' is not usable: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Writes `doc` to `path` atomically. Blocking: call from a blocking thread.
pub fn write(path: &Path, doc: &SessionDocument) -> Result<(), FileError> {
    let _ = (path, doc);
    Err(FileError::Io {
        path: path.display().to_string(),
        reason: "session files are not built yet".into(),
    })
}

/// Reads and verifies the file at `path`. Blocking: call from a blocking thread.
pub fn read(path: &Path) -> Result<SessionDocument, FileError> {
    Err(FileError::Io {
        path: path.display().to_string(),
        reason: "session files are not built yet".into(),
    })
}
