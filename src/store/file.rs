//! Session files: a session written to, and read from, one portable file.
//!
//! [`write()`] puts a [`SessionDocument`] (a session's record and its history)
//! in a file; [`read()`] gets it back. `Session::save` and `Session::load` are
//! built on them. A session file is a user's conversation and state, often
//! the only copy of it outside the store, so it is written and read with care:
//!
//! - **Atomic writes.** The new content goes to a temporary file in the same
//!   directory, which is flushed to disk (`fsync`) and then renamed over the
//!   target; the directory is flushed too. A crash or a full disk leaves
//!   either the old file or the new one, never a half-written mix.
//! - **One previous version is kept** as `PATH.bak` (`alice.json` →
//!   `alice.json.bak`): a save that replaces a good file by a bad one (the
//!   wrong session, a bug) can be undone by hand. The old file becomes the
//!   backup (a hard link, or a copy where links are not supported) before
//!   the new one replaces it, so the target exists at every moment.
//! - **A format name, a format version and a checksum** (SHA-256) in every
//!   file. A truncated, edited, damaged or foreign file is refused with an
//!   error that says which of these it is ([`FileError`]), and nothing of it
//!   is loaded: [`read()`] returns the whole document or an error.
//! - **Size limits.** Files over [`MAX_FILE_BYTES`] are refused before they are
//!   read, and binary decoding runs under a byte limit scaled to the payload,
//!   so a corrupt length prefix cannot make the reader allocate gigabytes.
//!
//! # Formats
//!
//! The writer picks the format from the extension ([`FileFormat::from_path`]):
//! bincode for `.bin`, JSON for anything else. The reader detects it from the
//! content (the binary magic, or a JSON object), whatever the extension.
//!
//! **JSON** (version 1), pretty-printed for humans:
//!
//! ```text
//! {
//!   "format": "troupe.session",
//!   "version": 1,
//!   "checksum": "sha256:<64 lowercase hex digits>",
//!   "session": { ...SessionRecord... },
//!   "history": [ ...Message... ]
//! }
//! ```
//!
//! The checksum is the SHA-256 of the *canonical payload*: the object
//! `{"history": …, "session": …}` serialised by `serde_json::to_vec` (compact,
//! no whitespace, object keys sorted, as serde_json's `Map` keeps them, and
//! strings escaped the serde_json way). The reader parses the file, rebuilds
//! that object from the parsed `session` and `history` values and hashes it
//! again, so whitespace and the order of the envelope's fields may change
//! freely while any change of the data is caught. The writer hashes the
//! payload after one parse of its own output, so that a float serde_json does
//! not read back bit-exactly still verifies. Unknown envelope fields are
//! ignored. A message's `meta` of JSON `null` reads as no meta.
//!
//! **Binary** (version 1), all integers little-endian:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "TRPSESS\0"
//! 8       2     format version (u16)
//! 10      8     payload length in bytes (u64)
//! 18      32    SHA-256 of the payload
//! 50      n     payload: bincode 2, standard config (varint integers)
//! ```
//!
//! bincode cannot encode `serde_json::Value`, so the payload is a private
//! mirror of the document: JSON maps and `meta` are carried as JSON text,
//! times as seconds and nanoseconds since the epoch (lossless), message ids
//! as `(segment, seq)` pairs and roles as their [`Role::code`]. bincode
//! itself is kept behind this module and the version field, so it can be
//! replaced by a version 2 without breaking version 1 files.
//!
//! Version 1 of both layouts is pinned by fixtures
//! (`tests/fixtures/session-v1.json`, `tests/fixtures/session-v1.bin`): a
//! later release must still read them.
//!
//! ```no_run
//! use std::path::Path;
//! use troupe::store::file::{self, SessionDocument};
//! use troupe::store::SessionRecord;
//!
//! # fn demo() -> Result<(), file::FileError> {
//! let doc = SessionDocument {
//!     record: SessionRecord::new("alice", None, vec!["assistant".into()]),
//!     history: Vec::new(),
//! };
//! file::write(Path::new("sessions/alice.json"), &doc)?; // old file → alice.json.bak
//! let back = file::read(Path::new("sessions/alice.json"))?;
//! assert_eq!(back, doc);
//! # Ok(()) }
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{JsonMap, Message, MessageId, Role, SessionRecord};

/// The format name every session file carries (the JSON `format` field).
pub const FORMAT_NAME: &str = "troupe.session";

/// The newest format version this build writes and reads (it reads every
/// version from 1 up to this one).
pub const FORMAT_VERSION: u16 = 1;

/// The first eight bytes of a binary session file.
pub const BINARY_MAGIC: [u8; 8] = *b"TRPSESS\0";

/// The largest session file [`read()`] accepts (and [`write()`] produces): 1 GiB.
/// Anything bigger is far beyond a real session and is refused before it is
/// read into memory.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Length of the binary header: magic, version, payload length, checksum.
const BINARY_HEADER_LEN: usize = 8 + 2 + 8 + 32;

/// The prefix of the JSON checksum field.
const CHECKSUM_PREFIX: &str = "sha256:";

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

    /// The format of a file's content, told from its first bytes: the binary
    /// magic, or a JSON object or array. `None` when it is neither.
    pub fn detect(bytes: &[u8]) -> Option<FileFormat> {
        if bytes.starts_with(&BINARY_MAGIC) {
            return Some(FileFormat::Bincode);
        }
        let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        match text.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | Some(b'[') => Some(FileFormat::Json),
            _ => None,
        }
    }
}

/// A session file that could not be written or read. Each variant names one
/// thing that can be wrong, so callers (and people) can tell a damaged file
/// from a foreign one or from one written by a newer release.
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
    /// The file is a troupe session file of the right version, but its
    /// content does not fit the format (a field missing or of the wrong kind).
    #[error("session file '{path}' is not usable: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file is not a troupe session file at all.
    #[error("'{path}' is not a troupe session file: {reason}")]
    NotSessionFile {
        /// The file.
        path: String,
        /// What it looks like instead.
        reason: String,
    },
    /// The file was written by a newer (or unknown) format version.
    #[error("session file '{path}' has unsupported format version {found} (this build reads up to {supported})")]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// The version in the file.
        found: u64,
        /// The newest version this build reads ([`FORMAT_VERSION`]).
        supported: u16,
    },
    /// The content does not match its checksum: it was edited or damaged.
    #[error("session file '{path}': checksum mismatch (file edited or damaged)")]
    ChecksumMismatch {
        /// The file.
        path: String,
    },
    /// The file ends early (an interrupted copy or a full disk).
    #[error("session file '{path}' is truncated: {detail}")]
    Truncated {
        /// The file.
        path: String,
        /// Where it ends.
        detail: String,
    },
    /// The file looks like JSON but is not valid JSON.
    #[error("session file '{path}' is invalid JSON at line {line}, column {column}: {reason}")]
    InvalidJson {
        /// The file.
        path: String,
        /// The line of the error, from 1.
        line: usize,
        /// The column of the error, from 1.
        column: usize,
        /// What the JSON parser found.
        reason: String,
    },
    /// The file (or the document to write) is larger than [`MAX_FILE_BYTES`].
    #[error("session file '{path}' is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// The limit ([`MAX_FILE_BYTES`]).
        limit: u64,
    },
    /// The document could not be encoded (nothing was written).
    #[error("session file '{path}': cannot encode the session: {reason}")]
    Encode {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The path the previous version of `path` is kept at: `PATH.bak`
/// (`alice.json` → `alice.json.bak`).
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".bak");
    PathBuf::from(name)
}

/// Writes `doc` to `path` atomically. Blocking: call from a blocking thread.
///
/// The format follows the extension ([`FileFormat::from_path`]). A missing
/// parent directory is created. The file that was at `path`, if any, is kept
/// as [`backup_path`]`(path)`, replacing an older backup. On error the target
/// is unchanged and no temporary file is left behind.
pub fn write(path: &Path, doc: &SessionDocument) -> Result<(), FileError> {
    write_as(path, doc, FileFormat::from_path(path))
}

/// Writes `doc` to `path` atomically in `format`, whatever the extension.
/// Otherwise the same as [`write()`].
pub fn write_as(path: &Path, doc: &SessionDocument, format: FileFormat) -> Result<(), FileError> {
    let name = path.display().to_string();
    let bytes = encode(&name, doc, format)?;
    replace_atomically(path, &bytes).map_err(|reason| FileError::Io { path: name, reason })
}

/// Reads and verifies the file at `path`. Blocking: call from a blocking thread.
///
/// The format is detected from the content. Returns the whole document, or an
/// error that says what is wrong with the file; never part of a document.
pub fn read(path: &Path) -> Result<SessionDocument, FileError> {
    let name = path.display().to_string();
    let io_err = |what: &str, e: io::Error| FileError::Io {
        path: name.clone(),
        reason: format!("cannot {what}: {e}"),
    };
    let file = File::open(path).map_err(|e| io_err("open it", e))?;
    let size = file
        .metadata()
        .map_err(|e| io_err("read its size", e))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(too_large(&name, size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // Read at most one byte past the limit: the file may grow after `metadata`.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err("read it", e))?;
    decode(&name, &bytes)
}

/// Encodes `doc` as the bytes of a session file in `format` (what [`write()`]
/// puts on disk).
pub fn to_bytes(doc: &SessionDocument, format: FileFormat) -> Result<Vec<u8>, FileError> {
    encode("<memory>", doc, format)
}

/// Decodes and verifies the bytes of a session file of either format (what
/// [`read()`] does after reading the file). For fuzzing and for files that
/// arrive by other means than the file system.
pub fn from_bytes(bytes: &[u8]) -> Result<SessionDocument, FileError> {
    decode("<memory>", bytes)
}

fn too_large(name: &str, size: u64) -> FileError {
    FileError::TooLarge {
        path: name.to_string(),
        size,
        limit: MAX_FILE_BYTES,
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(bytes));
    out
}

// ---------------------------------------------------------------- encoding

fn encode(name: &str, doc: &SessionDocument, format: FileFormat) -> Result<Vec<u8>, FileError> {
    let bytes = match format {
        FileFormat::Json => encode_json(name, doc)?,
        FileFormat::Bincode => encode_binary(name, doc)?,
    };
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(name, bytes.len() as u64));
    }
    Ok(bytes)
}

/// The JSON envelope, in the order a human reads it.
#[derive(Serialize)]
struct JsonEnvelope<'a> {
    format: &'a str,
    version: u16,
    checksum: String,
    session: &'a serde_json::Value,
    history: &'a serde_json::Value,
}

/// The canonical payload the JSON checksum is over (see the module docs).
fn canonical_payload(session: &serde_json::Value, history: &serde_json::Value) -> Vec<u8> {
    let mut payload = serde_json::Map::new();
    payload.insert("session".into(), session.clone());
    payload.insert("history".into(), history.clone());
    // Serialising a `Value` cannot fail: its keys are strings, its numbers finite.
    serde_json::to_vec(&serde_json::Value::Object(payload)).unwrap_or_default()
}

fn encode_json(name: &str, doc: &SessionDocument) -> Result<Vec<u8>, FileError> {
    let enc = |e: serde_json::Error| FileError::Encode {
        path: name.to_string(),
        reason: e.to_string(),
    };
    let session = serde_json::to_value(&doc.record).map_err(enc)?;
    let history = serde_json::to_value(&doc.history).map_err(enc)?;
    // Hash what a reader will see: the payload after one trip through JSON
    // text (floats serde_json does not parse back bit-exactly still verify).
    let text = canonical_payload(&session, &history);
    let reparsed: serde_json::Value = serde_json::from_slice(&text).map_err(enc)?;
    let (r_session, r_history) = match &reparsed {
        serde_json::Value::Object(m) => (
            m.get("session").unwrap_or(&serde_json::Value::Null),
            m.get("history").unwrap_or(&serde_json::Value::Null),
        ),
        _ => (&serde_json::Value::Null, &serde_json::Value::Null),
    };
    let checksum = sha256(&canonical_payload(r_session, r_history));
    let envelope = JsonEnvelope {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        checksum: format!("{CHECKSUM_PREFIX}{}", hex::encode(checksum)),
        // The original values: the reader parses this text exactly as the
        // writer parsed `text` above, so it gets the hashed values back.
        session: &session,
        history: &history,
    };
    let mut out = serde_json::to_vec_pretty(&envelope).map_err(enc)?;
    out.push(b'\n');
    Ok(out)
}

fn encode_binary(name: &str, doc: &SessionDocument) -> Result<Vec<u8>, FileError> {
    let dto = DocDto::from_doc(doc).map_err(|reason| FileError::Encode {
        path: name.to_string(),
        reason,
    })?;
    let payload =
        bincode::serde::encode_to_vec(&dto, bincode::config::standard()).map_err(|e| {
            FileError::Encode {
                path: name.to_string(),
                reason: e.to_string(),
            }
        })?;
    let mut out = Vec::with_capacity(BINARY_HEADER_LEN + payload.len());
    out.extend_from_slice(&BINARY_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

// ---------------------------------------------------------------- decoding

fn decode(name: &str, bytes: &[u8]) -> Result<SessionDocument, FileError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(name, bytes.len() as u64));
    }
    match FileFormat::detect(bytes) {
        Some(FileFormat::Bincode) => decode_binary(name, bytes),
        Some(FileFormat::Json) => decode_json(name, bytes),
        None if bytes.iter().all(u8::is_ascii_whitespace) => Err(FileError::Truncated {
            path: name.to_string(),
            detail: "the file is empty".into(),
        }),
        None if BINARY_MAGIC.starts_with(bytes) => Err(FileError::Truncated {
            path: name.to_string(),
            detail: format!(
                "it ends after {} bytes, inside the {BINARY_HEADER_LEN}-byte binary header",
                bytes.len()
            ),
        }),
        None => {
            let start: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            Err(FileError::NotSessionFile {
                path: name.to_string(),
                reason: format!(
                    "it is neither JSON nor a troupe binary file (it starts with bytes {})",
                    start.join(" ")
                ),
            })
        }
    }
}

fn decode_json(name: &str, bytes: &[u8]) -> Result<SessionDocument, FileError> {
    let invalid = |reason: String| FileError::Invalid {
        path: name.to_string(),
        reason,
    };
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
        if e.is_eof() {
            FileError::Truncated {
                path: name.to_string(),
                detail: format!(
                    "the JSON ends early, at line {}, column {}",
                    e.line(),
                    e.column()
                ),
            }
        } else {
            let full = e.to_string();
            let reason = match full.rsplit_once(" at line ") {
                Some((msg, _)) => msg.to_string(),
                None => full,
            };
            FileError::InvalidJson {
                path: name.to_string(),
                line: e.line(),
                column: e.column(),
                reason,
            }
        }
    })?;
    let not_ours = |reason: String| FileError::NotSessionFile {
        path: name.to_string(),
        reason,
    };
    let serde_json::Value::Object(top) = value else {
        return Err(not_ours(format!(
            "it is JSON {}, not an object with \"format\": \"{FORMAT_NAME}\"",
            json_kind(&value)
        )));
    };
    match top.get("format") {
        Some(serde_json::Value::String(f)) if f == FORMAT_NAME => {}
        Some(serde_json::Value::String(f)) => {
            return Err(not_ours(format!(
                "its format is \"{f}\", expected \"{FORMAT_NAME}\""
            )))
        }
        Some(other) => {
            return Err(not_ours(format!(
                "its \"format\" field is {}, expected \"{FORMAT_NAME}\"",
                json_kind(other)
            )))
        }
        None => {
            return Err(not_ours(format!(
                "it is JSON without a \"format\": \"{FORMAT_NAME}\" field"
            )))
        }
    }
    let version = match top.get("version") {
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(format!(
                "the \"version\" field is {v}, expected a positive integer"
            ))
        })?,
        None => return Err(invalid("the \"version\" field is missing".into())),
    };
    check_version(name, version)?;
    let expected = match top.get("checksum") {
        Some(serde_json::Value::String(s)) => parse_checksum(s).ok_or_else(|| {
            invalid(format!(
                "the \"checksum\" field is \"{s}\", expected \"{CHECKSUM_PREFIX}\" and 64 hex digits"
            ))
        })?,
        Some(other) => {
            return Err(invalid(format!(
                "the \"checksum\" field is {}, expected a string",
                json_kind(other)
            )))
        }
        None => return Err(invalid("the \"checksum\" field is missing".into())),
    };
    let field = |key: &str| {
        top.get(key)
            .ok_or_else(|| invalid(format!("the \"{key}\" field is missing")))
    };
    let session = field("session")?;
    let history = field("history")?;
    if sha256(&canonical_payload(session, history)) != expected {
        return Err(FileError::ChecksumMismatch {
            path: name.to_string(),
        });
    }
    let record: SessionRecord = serde_json::from_value(session.clone()).map_err(|e| {
        invalid(format!(
            "the \"session\" field does not fit format version {version}: {e}"
        ))
    })?;
    let history: Vec<Message> = serde_json::from_value(history.clone()).map_err(|e| {
        invalid(format!(
            "the \"history\" field does not fit format version {version}: {e}"
        ))
    })?;
    Ok(SessionDocument { record, history })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parse_checksum(s: &str) -> Option<[u8; 32]> {
    let digits = s.strip_prefix(CHECKSUM_PREFIX)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

fn check_version(name: &str, version: u64) -> Result<(), FileError> {
    if version == 0 || version > u64::from(FORMAT_VERSION) {
        return Err(FileError::UnsupportedVersion {
            path: name.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}

fn decode_binary(name: &str, bytes: &[u8]) -> Result<SessionDocument, FileError> {
    let invalid = |reason: String| FileError::Invalid {
        path: name.to_string(),
        reason,
    };
    let (Some(header), Some(payload)) = (
        bytes.get(..BINARY_HEADER_LEN),
        bytes.get(BINARY_HEADER_LEN..),
    ) else {
        return Err(FileError::Truncated {
            path: name.to_string(),
            detail: format!(
                "it ends after {} bytes, inside the {BINARY_HEADER_LEN}-byte binary header",
                bytes.len()
            ),
        });
    };
    let version = u16::from_le_bytes([header[8], header[9]]);
    check_version(name, u64::from(version))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[10..18]);
    let declared = u64::from_le_bytes(len);
    let found = payload.len() as u64;
    if found < declared {
        return Err(FileError::Truncated {
            path: name.to_string(),
            detail: format!("the payload has {found} of its {declared} bytes"),
        });
    }
    if found > declared {
        return Err(invalid(format!(
            "{} unexpected bytes follow the {declared}-byte payload",
            found - declared
        )));
    }
    if sha256(payload) != header[18..50] {
        return Err(FileError::ChecksumMismatch {
            path: name.to_string(),
        });
    }
    let (dto, used) = decode_payload(payload)
        .map_err(|e| invalid(format!("the binary payload does not decode: {e}")))?;
    if used != payload.len() {
        return Err(invalid(format!(
            "the binary payload decodes in {used} of its {} bytes",
            payload.len()
        )));
    }
    dto.into_doc().map_err(invalid)
}

/// Decodes the binary payload under a byte limit scaled to its size. A
/// legitimate payload claims at most 8× its length (a one-byte varint
/// decodes to an eight-byte integer), so a limit of 16× the length never
/// refuses a good file, while a corrupt length prefix cannot allocate more
/// than that. bincode takes the limit as a constant, so it is rounded up to
/// the next of 1 MiB, 16 MiB, 256 MiB, 4 GiB and 16 GiB.
fn decode_payload(payload: &[u8]) -> Result<(DocDto, usize), bincode::error::DecodeError> {
    use bincode::config::standard;
    use bincode::serde::decode_from_slice;
    const MIB: usize = 1 << 20;
    const GIB4: usize = MIB.saturating_mul(4096);
    const TOP: usize = (MAX_FILE_BYTES as usize).saturating_mul(16);
    let need = payload.len().saturating_mul(16);
    if need <= MIB {
        decode_from_slice(payload, standard().with_limit::<MIB>())
    } else if need <= 16 * MIB {
        decode_from_slice(payload, standard().with_limit::<{ 16 * MIB }>())
    } else if need <= 256 * MIB {
        decode_from_slice(payload, standard().with_limit::<{ 256 * MIB }>())
    } else if need <= GIB4 {
        decode_from_slice(payload, standard().with_limit::<GIB4>())
    } else {
        decode_from_slice(payload, standard().with_limit::<TOP>())
    }
}

/// The binary payload: a mirror of [`SessionDocument`] that bincode can
/// encode (no `serde_json::Value`, no self-describing types). Field order is
/// the format: changing it needs a new format version.
#[derive(Serialize, Deserialize)]
struct DocDto {
    record: RecordDto,
    history: Vec<MessageDto>,
}

#[derive(Serialize, Deserialize)]
struct RecordDto {
    id: String,
    user_id: Option<String>,
    agents: Vec<String>,
    head: Option<(i64, u32)>,
    created_at: (i64, u32),
    updated_at: (i64, u32),
    interactions: u64,
    state_version: u64,
    profile: String,
    preferences: String,
    user_data: String,
    metadata: String,
}

#[derive(Serialize, Deserialize)]
struct MessageDto {
    id: (i64, u32),
    parent: Option<(i64, u32)>,
    role: u8,
    agent: Option<String>,
    content: String,
    created_at: (i64, u32),
    meta: Option<String>,
}

fn id_to_dto(id: MessageId) -> (i64, u32) {
    (id.segment, id.seq)
}

fn id_from_dto((segment, seq): (i64, u32)) -> MessageId {
    MessageId { segment, seq }
}

fn time_to_dto(t: DateTime<Utc>) -> (i64, u32) {
    (t.timestamp(), t.timestamp_subsec_nanos())
}

fn time_from_dto((secs, nanos): (i64, u32), what: &str) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp(secs, nanos)
        .ok_or_else(|| format!("{what} is not a valid time ({secs} s + {nanos} ns since 1970)"))
}

fn map_to_text(map: &JsonMap, what: &str) -> Result<String, String> {
    serde_json::to_string(map).map_err(|e| format!("{what}: {e}"))
}

fn map_from_text(text: &str, what: &str) -> Result<JsonMap, String> {
    serde_json::from_str(text).map_err(|e| format!("{what} is not a JSON object: {e}"))
}

impl DocDto {
    fn from_doc(doc: &SessionDocument) -> Result<DocDto, String> {
        let r = &doc.record;
        let record = RecordDto {
            id: r.id.clone(),
            user_id: r.user_id.clone(),
            agents: r.agents.clone(),
            head: r.head.map(id_to_dto),
            created_at: time_to_dto(r.created_at),
            updated_at: time_to_dto(r.updated_at),
            interactions: r.interactions,
            state_version: r.state_version,
            profile: map_to_text(&r.profile, "profile")?,
            preferences: map_to_text(&r.preferences, "preferences")?,
            user_data: map_to_text(&r.user_data, "user_data")?,
            metadata: map_to_text(&r.metadata, "metadata")?,
        };
        let history = doc
            .history
            .iter()
            .map(|m| {
                let meta = match &m.meta {
                    // JSON files read `"meta": null` as no meta; do the same here.
                    None | Some(serde_json::Value::Null) => None,
                    Some(v) => Some(
                        serde_json::to_string(v)
                            .map_err(|e| format!("meta of message {}: {e}", m.id))?,
                    ),
                };
                Ok(MessageDto {
                    id: id_to_dto(m.id),
                    parent: m.parent.map(id_to_dto),
                    role: m.role.code(),
                    agent: m.agent.clone(),
                    content: m.content.clone(),
                    created_at: time_to_dto(m.created_at),
                    meta,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(DocDto { record, history })
    }

    fn into_doc(self) -> Result<SessionDocument, String> {
        let r = self.record;
        let record = SessionRecord {
            id: r.id,
            user_id: r.user_id,
            agents: r.agents,
            head: r.head.map(id_from_dto),
            created_at: time_from_dto(r.created_at, "the session's created_at")?,
            updated_at: time_from_dto(r.updated_at, "the session's updated_at")?,
            interactions: r.interactions,
            state_version: r.state_version,
            profile: map_from_text(&r.profile, "the profile")?,
            preferences: map_from_text(&r.preferences, "the preferences")?,
            user_data: map_from_text(&r.user_data, "the user data")?,
            metadata: map_from_text(&r.metadata, "the metadata")?,
        };
        let history = self
            .history
            .into_iter()
            .map(|m| {
                let id = id_from_dto(m.id);
                let role = Role::from_code(m.role)
                    .ok_or_else(|| format!("message {id} has unknown role code {}", m.role))?;
                let meta = match m.meta {
                    None => None,
                    Some(text) => Some(
                        serde_json::from_str(&text)
                            .map_err(|e| format!("message {id} has invalid meta JSON: {e}"))?,
                    ),
                };
                Ok(Message {
                    id,
                    parent: m.parent.map(id_from_dto),
                    role,
                    agent: m.agent,
                    content: m.content,
                    created_at: time_from_dto(m.created_at, &format!("message {id}'s created_at"))?,
                    meta,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(SessionDocument { record, history })
    }
}

// ---------------------------------------------------------------- atomic replace

/// Puts `bytes` at `path` atomically, keeping the old file as `PATH.bak`.
/// Errors are reasons (the caller adds the path); on error the target is
/// unchanged and the temporary file is removed.
fn replace_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let file_name = path
        .file_name()
        .ok_or_else(|| "the path does not name a file".to_string())?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create directory '{}': {e}", dir.display()))?;

    let (tmp_path, tmp) = create_temp(&dir, file_name)?;
    let result = (|| {
        let mut tmp = tmp;
        tmp.write_all(bytes)
            .map_err(|e| format!("cannot write '{}': {e}", tmp_path.display()))?;
        copy_permissions(path, &tmp);
        tmp.sync_all()
            .map_err(|e| format!("cannot flush '{}' to disk: {e}", tmp_path.display()))?;
        drop(tmp);
        keep_backup(path, &dir, file_name)?;
        fs::rename(&tmp_path, path).map_err(|e| {
            format!(
                "cannot rename '{}' over the target: {e}",
                tmp_path.display()
            )
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
        return result;
    }
    sync_dir(&dir)
}

/// Creates a new, unique temporary file next to the target.
fn create_temp(dir: &Path, file_name: &std::ffi::OsStr) -> Result<(PathBuf, File), String> {
    let mut last_err = None;
    for _ in 0..16 {
        let mut name = std::ffi::OsString::from(".");
        name.push(file_name);
        name.push(format!(
            ".tmp-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let tmp_path = dir.join(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
        {
            Ok(f) => return Ok((tmp_path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => {
                return Err(format!(
                    "cannot create a temporary file in '{}': {e}",
                    dir.display()
                ))
            }
        }
    }
    Err(format!(
        "cannot create a temporary file in '{}': {}",
        dir.display(),
        last_err.map_or_else(|| "no free name".to_string(), |e| e.to_string())
    ))
}

/// Gives the new file the old file's permissions (a session file made
/// private stays private). Best effort.
fn copy_permissions(path: &Path, tmp: &File) {
    if let Ok(meta) = fs::metadata(path) {
        let _ = tmp.set_permissions(meta.permissions());
    }
}

/// Makes the current file at `path`, if any, the backup `PATH.bak`, without
/// ever removing `path`: a hard link (or, where links are not supported, a
/// copy) under a temporary name, renamed over the old backup.
fn keep_backup(path: &Path, dir: &Path, file_name: &std::ffi::OsStr) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(format!(
                "'{}' exists and is not a regular file; not replacing it",
                path.display()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect the existing file: {e}")),
    }
    let bak = backup_path(path);
    let mut name = std::ffi::OsString::from(".");
    name.push(file_name);
    name.push(format!(
        ".bak-tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let bak_tmp = dir.join(name);
    let linked = fs::hard_link(path, &bak_tmp).is_ok();
    if !linked {
        let copied = fs::copy(path, &bak_tmp).and_then(|_| File::open(&bak_tmp)?.sync_all());
        if let Err(e) = copied {
            let _ = fs::remove_file(&bak_tmp);
            return Err(format!(
                "cannot keep the previous version as '{}': {e}",
                bak.display()
            ));
        }
    }
    fs::rename(&bak_tmp, &bak).map_err(|e| {
        let _ = fs::remove_file(&bak_tmp);
        format!(
            "cannot keep the previous version as '{}': {e}",
            bak.display()
        )
    })
}

/// Flushes a directory's entries (the rename) to disk. Only Unix can open a
/// directory for this; elsewhere the rename is as durable as the OS makes it.
fn sync_dir(dir: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot flush directory '{}' to disk: {e}", dir.display()))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> SessionDocument {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap_or_default();
        let mut record = SessionRecord::new("alice", Some("u1".into()), vec!["assistant".into()]);
        record.created_at = t;
        record.updated_at = t;
        record.profile.insert("name".into(), json!("Alice"));
        let id = MessageId {
            segment: 0x3f9a,
            seq: 0,
        };
        record.head = Some(id);
        SessionDocument {
            record,
            history: vec![Message {
                id,
                parent: None,
                role: Role::User,
                agent: Some("assistant".into()),
                content: "héllo ✓".into(),
                created_at: t,
                meta: Some(json!({"tokens": 3, "t": 0.30000000000000004})),
            }],
        }
    }

    #[test]
    fn both_formats_round_trip_in_memory() {
        let d = doc();
        for format in [FileFormat::Json, FileFormat::Bincode] {
            let bytes = to_bytes(&d, format).unwrap();
            assert_eq!(FileFormat::detect(&bytes), Some(format));
            assert_eq!(from_bytes(&bytes).unwrap(), d, "{format:?}");
        }
    }

    #[test]
    fn json_starts_with_the_envelope_in_reading_order() {
        let text = String::from_utf8(to_bytes(&doc(), FileFormat::Json).unwrap()).unwrap();
        let format = text.find("\"format\"").unwrap();
        let version = text.find("\"version\"").unwrap();
        let checksum = text.find("\"checksum\"").unwrap();
        let session = text.find("\"session\"").unwrap();
        assert!(format < version && version < checksum && checksum < session);
    }

    #[test]
    fn binary_header_layout() {
        let bytes = to_bytes(&doc(), FileFormat::Bincode).unwrap();
        assert_eq!(&bytes[..8], b"TRPSESS\0");
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[10..18]);
        assert_eq!(u64::from_le_bytes(len) as usize, bytes.len() - 50);
        assert_eq!(bytes[18..50], sha256(&bytes[50..]));
    }

    #[test]
    fn meta_null_reads_as_none_in_both_formats() {
        let mut d = doc();
        d.history[0].meta = Some(serde_json::Value::Null);
        for format in [FileFormat::Json, FileFormat::Bincode] {
            let back = from_bytes(&to_bytes(&d, format).unwrap()).unwrap();
            assert_eq!(back.history[0].meta, None, "{format:?}");
        }
    }

    #[test]
    fn short_inputs_are_named() {
        assert!(matches!(from_bytes(b""), Err(FileError::Truncated { .. })));
        assert!(matches!(
            from_bytes(b"TRPS"),
            Err(FileError::Truncated { .. })
        ));
        assert!(matches!(
            from_bytes(b"TRPSESS\0\x01\x00"),
            Err(FileError::Truncated { .. })
        ));
        assert!(matches!(
            from_bytes(b"hello"),
            Err(FileError::NotSessionFile { .. })
        ));
    }

    #[test]
    fn corrupt_length_prefix_in_payload_is_refused_without_allocating() {
        // A payload whose first string claims u64::MAX bytes, with a valid checksum.
        let mut payload = vec![0xFFu8; 9];
        payload[0] = 253; // varint marker for a u64
        let mut bytes = BINARY_MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&sha256(&payload));
        bytes.extend_from_slice(&payload);
        let err = from_bytes(&bytes).unwrap_err();
        assert!(matches!(err, FileError::Invalid { .. }), "{err}");
    }

    #[test]
    fn backup_path_appends_bak() {
        assert_eq!(
            backup_path(Path::new("s/alice.json")),
            PathBuf::from("s/alice.json.bak")
        );
    }
}
