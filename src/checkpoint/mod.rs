//! Checkpoints, versions, branches, fork and merge — all of them follow from
//! one choice of the data model: a conversation is a tree of messages and a
//! session has a head.
//!
//! - a **checkpoint** is the head plus a snapshot of the session's small state
//!   (profile, preferences, user data, metadata, interaction count): one row,
//!   whatever the history's length;
//! - **restore** moves the head (and the small state) back; nothing is
//!   deleted, and the next turn starts a new branch;
//! - a **version** is a checkpoint with a description and a number;
//! - **fork** makes a new session whose head is a checkpoint's head: the
//!   messages up to it are shared, not copied;
//! - **merge** builds a new session from two: both histories ordered by time,
//!   small state merged key by key (the more recently updated session wins a
//!   conflict), and a report of every conflicting key.
//!
//! ```no_run
//! # async fn demo(session: troupe::Session) -> troupe::Result<()> {
//! let cp = session.checkpoint("before approach A").await?;
//! session.chat("What if we use approach A?").await?;
//! session.restore(&cp).await?;
//! session.chat("What if we use approach B?").await?;
//! for b in session.branches().await? {
//!     println!("{} (from {:?})", b.head, b.grew_from);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{CheckpointRecord, JsonMap, Message, MessageId, SegmentInfo};

pub use crate::store::CheckpointKind;

/// A checkpoint, as the API returns it.
pub type Checkpoint = CheckpointRecord;

/// One branch of a session's conversation tree: a leaf and where it grew from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Branch {
    /// The branch's last message (restore it to switch to this branch).
    pub head: MessageId,
    /// When its last message was written.
    pub last_message_at: Option<DateTime<Utc>>,
    /// The message it branched off from (`None`: the first branch).
    pub branched_from: Option<MessageId>,
    /// The checkpoint taken at that branch point, if any.
    pub grew_from: Option<String>,
    /// That checkpoint's label.
    pub label: Option<String>,
    /// Whether the session's head is on this branch's leaf.
    pub current: bool,
}

/// A saved version of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// Its number, from 1.
    pub version: u32,
    /// The checkpoint behind it.
    pub checkpoint_id: String,
    /// When it was saved.
    pub timestamp: DateTime<Utc>,
    /// What it is.
    pub description: Option<String>,
}

impl Version {
    /// The version a checkpoint stands for, if it is one (label `vN`).
    pub fn from_checkpoint(cp: &CheckpointRecord) -> Option<Version> {
        if cp.kind != CheckpointKind::Version {
            return None;
        }
        let version = cp.label.as_deref()?.strip_prefix('v')?.parse().ok()?;
        Some(Version {
            version,
            checkpoint_id: cp.id.clone(),
            timestamp: cp.created_at,
            description: cp.description.clone(),
        })
    }
}

/// A key both merged sessions set to different values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeConflict {
    /// `profile`, `preferences`, `user_data` or `metadata`.
    pub section: String,
    /// The key.
    pub key: String,
    /// The first session's value.
    pub a: serde_json::Value,
    /// The second session's value.
    pub b: serde_json::Value,
    /// Which won: `"a"` or `"b"` (the more recently updated session).
    pub winner: String,
}

/// What a merge did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeReport {
    /// The new session.
    pub session_id: String,
    /// Messages in its history.
    pub messages: usize,
    /// Every conflicting key, with both values.
    pub conflicts: Vec<MergeConflict>,
}

/// Both histories in one, ordered by time; on equal times `a`'s message comes
/// first, and each history keeps its own order (a stable merge).
pub fn merge_histories(a: &[Message], b: &[Message]) -> Vec<Message> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if b[j].created_at < a[i].created_at {
            out.push(b[j].clone());
            j += 1;
        } else {
            out.push(a[i].clone());
            i += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// The union of two maps; where both have a key with different values, the
/// newer side wins and the conflict is recorded.
pub fn merge_maps(
    section: &str,
    a: &JsonMap,
    b: &JsonMap,
    b_is_newer: bool,
    conflicts: &mut Vec<MergeConflict>,
) -> JsonMap {
    let mut out = a.clone();
    for (k, bv) in b {
        match a.get(k) {
            Some(av) if av != bv => {
                conflicts.push(MergeConflict {
                    section: section.into(),
                    key: k.clone(),
                    a: av.clone(),
                    b: bv.clone(),
                    winner: if b_is_newer { "b" } else { "a" }.into(),
                });
                if b_is_newer {
                    out.insert(k.clone(), bv.clone());
                }
            }
            Some(_) => {}
            None => {
                out.insert(k.clone(), bv.clone());
            }
        }
    }
    out
}

/// The leaves of a session's own segments: each segment's last message,
/// unless another of the session's segments branches from exactly there.
pub fn leaves(segments: &[SegmentInfo]) -> Vec<(MessageId, DateTime<Utc>, &SegmentInfo)> {
    let branch_points: HashSet<MessageId> = segments.iter().filter_map(|s| s.parent).collect();
    segments
        .iter()
        .filter_map(|s| s.tip.map(|(id, at)| (id, at, s)))
        .filter(|(id, _, _)| !branch_points.contains(id))
        .collect()
}

/// The branches of a session, from its segments, its checkpoints and its head.
pub fn branches(
    segments: &[SegmentInfo],
    checkpoints: &[CheckpointRecord],
    head: Option<MessageId>,
) -> Vec<Branch> {
    let checkpoint_at = |m: Option<MessageId>| {
        m.and_then(|m| {
            checkpoints
                .iter()
                .rev()
                .find(|c| c.head == Some(m))
                .map(|c| (c.id.clone(), c.label.clone()))
        })
    };
    let mut out: Vec<Branch> = leaves(segments)
        .into_iter()
        .map(|(id, at, seg)| {
            // Where this leaf's path last split: the latest point inside its
            // own segment that another segment branches from, else the point
            // its segment branched from.
            let split = segments
                .iter()
                .filter_map(|s| s.parent)
                .filter(|p| p.segment == seg.id && p.seq < id.seq)
                .max_by_key(|p| p.seq)
                .or(seg.parent);
            let (grew_from, label) = checkpoint_at(split).unzip();
            Branch {
                head: id,
                last_message_at: Some(at),
                branched_from: split,
                grew_from,
                label: label.flatten(),
                current: head == Some(id),
            }
        })
        .collect();
    if let Some(h) = head {
        if !out.iter().any(|b| b.current) {
            // The head is not a leaf (just restored, or a fork not yet extended).
            let (grew_from, label) = checkpoint_at(Some(h)).unzip();
            out.push(Branch {
                head: h,
                last_message_at: None,
                branched_from: None,
                grew_from,
                label: label.flatten(),
                current: true,
            });
        }
    }
    out.sort_by_key(|b| (b.last_message_at, b.head));
    out
}

/// What a garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Messages deleted.
    pub messages_deleted: u64,
    /// Segments whose unreachable tail was cut.
    pub segments_trimmed: usize,
    /// Segments deleted whole.
    pub segments_deleted: usize,
}

/// What garbage collection would delete from a session's own segments:
/// `(segment, keep)` — the messages after seq `keep`, or the whole segment
/// for `None`. A message is kept if a root (the session's head, a kept
/// checkpoint or version, or a reference from another session) is it or
/// comes after it on the same path.
pub fn gc_plan(
    segments: &[SegmentInfo],
    roots: impl IntoIterator<Item = MessageId>,
) -> Vec<(crate::store::SegmentId, Option<u32>)> {
    use std::collections::HashMap;
    let own: HashMap<_, _> = segments.iter().map(|s| (s.id, s)).collect();
    let mut keep: HashMap<crate::store::SegmentId, i64> = HashMap::new();
    let mut work: Vec<MessageId> = roots.into_iter().collect();
    while let Some(r) = work.pop() {
        let Some(seg) = own.get(&r.segment) else {
            continue;
        };
        let k = keep.entry(r.segment).or_insert(-1);
        if (r.seq as i64) <= *k {
            continue;
        }
        let first = *k < 0;
        *k = r.seq as i64;
        // The first time a segment is kept, its branch point is kept too.
        if first {
            if let Some(p) = seg.parent {
                work.push(p);
            }
        }
    }
    segments
        .iter()
        .filter_map(|s| {
            let tip = s.tip.map(|(id, _)| id.seq as i64)?;
            match keep.get(&s.id) {
                None => Some((s.id, None)),
                Some(&k) if k < tip => Some((s.id, Some(k as u32))),
                Some(_) => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{now, Role};
    use proptest::prelude::*;

    fn msg(seg: i64, seq: u32, t: i64) -> Message {
        Message {
            id: MessageId { segment: seg, seq },
            parent: None,
            role: Role::User,
            agent: None,
            content: format!("{seg}.{seq}"),
            created_at: DateTime::from_timestamp_micros(t).unwrap(),
            meta: None,
        }
    }

    proptest! {
        #[test]
        fn merge_keeps_every_message_once_in_time_order(
            mut ta in proptest::collection::vec(0i64..50, 0..30),
            mut tb in proptest::collection::vec(0i64..50, 0..30),
        ) {
            ta.sort();
            tb.sort();
            let a: Vec<_> = ta.iter().enumerate().map(|(i, t)| msg(1, i as u32, *t)).collect();
            let b: Vec<_> = tb.iter().enumerate().map(|(i, t)| msg(2, i as u32, *t)).collect();
            let m = merge_histories(&a, &b);
            prop_assert_eq!(m.len(), a.len() + b.len());
            let ids: HashSet<_> = m.iter().map(|x| x.id).collect();
            prop_assert_eq!(ids.len(), m.len());
            for w in m.windows(2) {
                prop_assert!(w[0].created_at <= w[1].created_at);
                if w[0].created_at == w[1].created_at && w[0].id.segment != w[1].id.segment {
                    // stable: a's messages first on ties
                    prop_assert!(w[0].id.segment == 1);
                }
            }
            // each side keeps its own order
            let only_a: Vec<_> = m.iter().filter(|x| x.id.segment == 1).map(|x| x.id).collect();
            prop_assert_eq!(only_a, a.iter().map(|x| x.id).collect::<Vec<_>>());
            // deterministic
            prop_assert_eq!(merge_histories(&a, &b), m);
        }
    }

    #[test]
    fn merge_maps_reports_conflicts_and_newer_wins() {
        let a: JsonMap = serde_json::from_str(r#"{"x": 1, "same": true, "only_a": "a"}"#).unwrap();
        let b: JsonMap = serde_json::from_str(r#"{"x": 2, "same": true, "only_b": "b"}"#).unwrap();
        let mut c = Vec::new();
        let m = merge_maps("user_data", &a, &b, true, &mut c);
        assert_eq!(m["x"], 2);
        assert_eq!(m["only_a"], "a");
        assert_eq!(m["only_b"], "b");
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].key.as_str(), c[0].winner.as_str()), ("x", "b"));
        let mut c = Vec::new();
        let m = merge_maps("user_data", &a, &b, false, &mut c);
        assert_eq!(m["x"], 1);
        assert_eq!(c[0].winner, "a");
    }

    #[test]
    fn leaves_skip_branch_points() {
        let t = now();
        let s1 = SegmentInfo {
            id: 1,
            parent: None,
            created_at: t,
            tip: Some((MessageId { segment: 1, seq: 5 }, t)),
        };
        let s2 = SegmentInfo {
            id: 2,
            parent: Some(MessageId { segment: 1, seq: 3 }),
            created_at: t,
            tip: Some((MessageId { segment: 2, seq: 1 }, t)),
        };
        let s3 = SegmentInfo {
            id: 3,
            parent: Some(MessageId { segment: 1, seq: 5 }),
            created_at: t,
            tip: Some((MessageId { segment: 3, seq: 0 }, t)),
        };
        let l: Vec<_> = leaves(&[s1, s2, s3])
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(
            l,
            [
                MessageId { segment: 2, seq: 1 },
                MessageId { segment: 3, seq: 0 }
            ]
        );
    }
}
