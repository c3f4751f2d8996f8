//! The records the store keeps: sessions, the message tree, checkpoints.
//!
//! A conversation is a tree of messages. Messages are stored in *segments*:
//! a segment is a run of messages that one session appended one after another,
//! and it hangs off a parent message (the point it branched from), or off
//! nothing (a root). A message id is `(segment, seq)`: its parent is
//! `(segment, seq - 1)`, or the segment's parent for `seq == 0`. History is the
//! path from the root to the session's head, read as a few clustered range
//! scans (one per segment on the path) instead of one lookup per message.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A JSON object: profile, preferences, user data and metadata are all maps
/// of this shape. Keys are kept sorted, so serialising one is deterministic.
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// The current time at the precision every store keeps (microseconds), so
/// that what an actor holds in memory equals what a store gives back.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Identifies one segment of the message tree.
pub type SegmentId = i64;

/// Identifies one message: the segment it lives in and its position there.
///
/// Printed as `<segment in hex>.<seq>`, e.g. `3f9a01c2.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The segment holding the message.
    pub segment: SegmentId,
    /// Its position in the segment, from 0.
    pub seq: u32,
}

impl MessageId {
    /// The message that precedes this one in its own segment, if any.
    pub fn prev_in_segment(self) -> Option<MessageId> {
        self.seq.checked_sub(1).map(|seq| MessageId {
            segment: self.segment,
            seq,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{}", self.segment, self.seq)
    }
}

impl FromStr for MessageId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a message id (expected <hex segment>.<seq>)");
        let (seg, seq) = s.split_once('.').ok_or_else(bad)?;
        let segment = i64::from_str_radix(seg, 16).map_err(|_| bad())?;
        let seq = seq.parse().map_err(|_| bad())?;
        Ok(MessageId { segment, seq })
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A fresh segment id: random, positive, never zero. Random ids need no
/// coordination between processes or nodes sharing one store.
pub fn new_segment_id() -> SegmentId {
    loop {
        let id = (rand::random::<u64>() >> 1) as i64;
        if id != 0 {
            return id;
        }
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions or context injected by the application.
    System,
    /// The human (or program) talking to the session.
    User,
    /// An agent's reply.
    Assistant,
    /// The output of a tool or a workflow task.
    Tool,
}

impl Role {
    /// The stable small integer a role is stored as.
    pub fn code(self) -> u8 {
        match self {
            Role::System => 0,
            Role::User => 1,
            Role::Assistant => 2,
            Role::Tool => 3,
        }
    }

    /// The role stored as `code`, if it is one.
    pub fn from_code(code: u8) -> Option<Role> {
        Some(match code {
            0 => Role::System,
            1 => Role::User,
            2 => Role::Assistant,
            3 => Role::Tool,
            _ => return None,
        })
    }

    /// The role's name as the OpenAI chat API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "tool" => Ok(Role::Tool),
            other => Err(format!(
                "unknown role '{other}' (expected system, user, assistant or tool)"
            )),
        }
    }
}

/// One message of a conversation, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// This message's id.
    pub id: MessageId,
    /// The message it follows in the conversation tree (`None` for a root).
    pub parent: Option<MessageId>,
    /// Who wrote it.
    pub role: Role,
    /// The agent that wrote it (assistant messages) or was addressed (user messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The text.
    pub content: String,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Free-form metadata, e.g. which model produced a reply and its token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// A segment of the message tree: a run of messages appended by one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// The segment's id.
    pub id: SegmentId,
    /// The session that owns it: only the owner appends to a segment.
    pub session_id: String,
    /// The message it branches from (`None`: a root).
    pub parent: Option<MessageId>,
    /// When it was started.
    pub created_at: DateTime<Utc>,
}

/// A session's durable state: everything but the messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session id (validated, see [`crate::session::validate_session_id`]).
    pub id: String,
    /// The user the session belongs to, if any.
    pub user_id: Option<String>,
    /// Names of the agents taking part, the default one first.
    pub agents: Vec<String>,
    /// The last message of the current history (`None`: empty).
    pub head: Option<MessageId>,
    /// When the session was created.
    pub created_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
    /// Completed turns.
    pub interactions: u64,
    /// Incremented by every commit; a commit names the version it expects, so
    /// two writers of one session can never silently overwrite each other.
    pub state_version: u64,
    /// The user's profile (name, role, …).
    pub profile: JsonMap,
    /// The user's preferences (language, timezone, output format, …).
    pub preferences: JsonMap,
    /// Application data attached to the session.
    pub user_data: JsonMap,
    /// Application metadata (title, tags, …).
    pub metadata: JsonMap,
}

impl SessionRecord {
    /// A new, empty session record.
    pub fn new(id: impl Into<String>, user_id: Option<String>, agents: Vec<String>) -> Self {
        let now = now();
        SessionRecord {
            id: id.into(),
            user_id,
            agents,
            head: None,
            created_at: now,
            updated_at: now,
            interactions: 0,
            state_version: 0,
            profile: JsonMap::new(),
            preferences: JsonMap::new(),
            user_data: JsonMap::new(),
            metadata: JsonMap::new(),
        }
    }
}

/// A session as a list shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// The session id.
    pub id: String,
    /// Its user.
    pub user_id: Option<String>,
    /// Its agents.
    pub agents: Vec<String>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
    /// Completed turns.
    pub interactions: u64,
}

impl From<&SessionRecord> for SessionSummary {
    fn from(r: &SessionRecord) -> Self {
        SessionSummary {
            id: r.id.clone(),
            user_id: r.user_id.clone(),
            agents: r.agents.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            interactions: r.interactions,
        }
    }
}

/// Which sessions a listing returns.
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    /// Only this user's sessions.
    pub user_id: Option<String>,
    /// Only sessions last changed before this time.
    pub updated_before: Option<DateTime<Utc>>,
    /// At most this many (newest first).
    pub limit: Option<usize>,
}

/// What kind of checkpoint this is; it decides how long it is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// Taken by the supervisor on its schedule; only the newest few are kept.
    Auto,
    /// Taken on request; kept until deleted.
    Manual,
    /// A named version; kept until deleted.
    Version,
    /// Taken when the head leaves the tip of a branch (restore, switching
    /// branches), so the branch stays reachable; kept until deleted.
    Branch,
}

/// A checkpoint: a head plus a snapshot of the session's small state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The checkpoint id (a uuid).
    pub id: String,
    /// The session it was taken of.
    pub session_id: String,
    /// The head at that moment.
    pub head: Option<MessageId>,
    /// A short label.
    pub label: Option<String>,
    /// A longer description (versions).
    pub description: Option<String>,
    /// Its kind.
    pub kind: CheckpointKind,
    /// The session record at that moment (profile, preferences, …).
    pub state: SessionRecord,
    /// When it was taken.
    pub created_at: DateTime<Utc>,
}

/// Everything a session actor needs to come back to life.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedSession {
    /// The durable state.
    pub record: SessionRecord,
    /// The last messages of the history, oldest first.
    pub recent: Vec<Message>,
    /// Whether the next message may be appended to the head's segment (the
    /// head is the last message of a segment this session owns); otherwise
    /// the next turn starts a new segment (a branch).
    pub can_append: bool,
}

/// One atomic write for one session: its new record, and optionally a new
/// segment, new messages and new checkpoints. A store applies all of it or
/// none of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Commit {
    /// The session's record after the write. Its `state_version` must be
    /// `expected_version + 1`.
    pub record: SessionRecord,
    /// The version the writer last saw (`None`: the session must not exist yet).
    pub expected_version: Option<u64>,
    /// Whether profile, preferences, user data or metadata changed (a store may
    /// skip rewriting them when not).
    pub small_state_changed: bool,
    /// A segment started by this write.
    pub new_segment: Option<Segment>,
    /// Messages appended by this write, in order.
    pub messages: Vec<Message>,
    /// Checkpoints taken by this write.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Checkpoints (of this session) deleted by this write, e.g. automatic
    /// ones past `checkpoint.keep`.
    pub drop_checkpoints: Vec<String>,
}

/// Where a workflow run or one of its tasks stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Not started yet.
    Pending,
    /// In progress.
    Running,
    /// Finished well.
    Succeeded,
    /// Failed (after its retries), or a dependency failed.
    Failed,
    /// Its `when` condition was false.
    Skipped,
    /// Stopped before the end (Ctrl-C, `--fail-fast`, a crash): resumable.
    Interrupted,
}

impl RunStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Skipped => "skipped",
            RunStatus::Interrupted => "interrupted",
        }
    }

    /// The status stored as `s`.
    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "pending" => RunStatus::Pending,
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "skipped" => RunStatus::Skipped,
            "interrupted" => RunStatus::Interrupted,
            _ => return None,
        })
    }

    /// Whether a task in this state is done for good (not run again on resume).
    pub fn is_final(self) -> bool {
        matches!(self, RunStatus::Succeeded | RunStatus::Skipped)
    }
}

/// A workflow run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run id.
    pub id: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline file it was started from.
    pub path: String,
    /// The inputs it was started with.
    pub inputs: JsonMap,
    /// The session its results go to, if any.
    pub session_id: Option<String>,
    /// Where it stands.
    pub status: RunStatus,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// One task's result in a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// Where it stands.
    pub status: RunStatus,
    /// Its output (the agent's reply).
    pub output: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, if it failed.
    pub error: Option<String>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One key of a shared-state namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedEntry {
    /// The namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// The value.
    pub value: serde_json::Value,
    /// Incremented by every write of this key, from 1.
    pub version: u64,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
}

/// A segment of a session, as the branch listing needs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// The segment.
    pub id: SegmentId,
    /// The message it branches from.
    pub parent: Option<MessageId>,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// Its last message and that message's time (`None`: no message yet).
    pub tip: Option<(MessageId, DateTime<Utc>)>,
}

/// What a long-term memory records about a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryKind {
    /// Something true about the user ("lives in Lyon", "is called Al").
    Fact,
    /// Something the user likes, dislikes or prefers.
    Preference,
    /// Anything else the user or the application asked to remember.
    Note,
}

impl MemoryKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Fact => "fact",
            MemoryKind::Preference => "preference",
            MemoryKind::Note => "note",
        }
    }

    /// The kind stored as `s`.
    pub fn parse(s: &str) -> Option<MemoryKind> {
        Some(match s {
            "fact" => MemoryKind::Fact,
            "preference" => MemoryKind::Preference,
            "note" => MemoryKind::Note,
            _ => return None,
        })
    }
}

/// One long-term memory of one user. Memories outlive sessions: a new
/// session of the same user recalls them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryItem {
    /// The memory's id (a uuid).
    pub id: String,
    /// The user it belongs to; it never reaches another user's prompt.
    pub user_id: String,
    /// The text put into prompts ("User prefers Python over JavaScript").
    pub content: String,
    /// Fact, preference or note.
    pub kind: MemoryKind,
    /// What it is about ("favourite colour", "preference: programming
    /// language"): a newer memory of the same kind and subject supersedes
    /// an older one. `None`: never superseded.
    #[serde(default)]
    pub subject: Option<String>,
    /// How useful it is for conversations, in [0, 1].
    pub relevance: f64,
    /// How much it matters, in [0, 1].
    pub importance: f64,
    /// The quality score it was given when stored (eviction order).
    pub score: f64,
    /// When it was learned.
    pub created_at: DateTime<Utc>,
    /// When it was last put into a prompt.
    #[serde(default)]
    pub last_used: Option<DateTime<Utc>>,
    /// How many prompts it was put into.
    #[serde(default)]
    pub uses: u64,
    /// The memory that replaced it, if any (kept as history, never retrieved).
    #[serde(default)]
    pub superseded_by: Option<String>,
    /// The session it was learned in, if any.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// What [`Store::memory_put`](super::Store::memory_put) did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryWrite {
    /// An active memory of the same user, kind and subject already says the
    /// same thing (case-insensitively): nothing was written.
    pub duplicate_of: Option<String>,
    /// Active memories of the same kind and subject now superseded by the new one.
    pub superseded: Vec<String>,
    /// Memories deleted to keep the user within the limit (superseded ones
    /// first, then the lowest scores, oldest first). May include the new one.
    pub evicted: Vec<String>,
}

/// A memory found by a search, with its text rank (higher is better).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryHit {
    /// The memory.
    pub item: MemoryItem,
    /// How well it matches the query (SQLite: −bm25; memory store: matching terms).
    pub rank: f64,
}

/// What a store keeps per user, across sessions: profile and preferences.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The user.
    pub user_id: String,
    /// Profile fields (name, role, …).
    pub profile: JsonMap,
    /// Preferences (language, timezone, output format, …).
    pub preferences: JsonMap,
    /// How many memories (active and superseded) the user has.
    pub memories: u64,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}
