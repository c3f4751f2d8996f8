//! The in-memory store: the reference model of the [`Store`] contract.
//!
//! Plain maps behind one mutex, written to be obviously right rather than
//! fast; every other backend is checked against the behaviour of this one.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    check_version, CheckpointRecord, Commit, JsonMap, LoadedSession, MemoryHit, MemoryItem,
    MemoryWrite, Message, MessageId, RunRecord, Segment, SegmentId, SegmentInfo, SessionFilter,
    SessionRecord, SessionSummary, SharedEntry, Store, StoreError, TaskResult, UserRecord,
};

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, SessionRecord>,
    segments: HashMap<SegmentId, Segment>,
    /// Messages by segment, indexed by seq.
    messages: HashMap<SegmentId, Vec<Message>>,
    checkpoints: Vec<CheckpointRecord>,
    shared: std::collections::BTreeMap<(String, String), SharedEntry>,
    /// Last versions of deleted shared keys (tombstones: versions never go back).
    shared_deleted: HashMap<(String, String), u64>,
    runs: HashMap<String, RunRecord>,
    task_results: std::collections::BTreeMap<(String, String), TaskResult>,
    /// Long-term memories by user, in insertion order.
    memories: HashMap<String, Vec<MemoryItem>>,
    users: HashMap<String, UserRecord>,
}

/// A store that keeps everything in process memory (nothing survives the process).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (commits validate before mutating), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn path(&self, head: MessageId, limit: Option<usize>) -> Result<Vec<Message>, StoreError> {
        let mut out = Vec::new();
        let mut cur = Some(head);
        while let Some(id) = cur {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let msg = self
                .messages
                .get(&id.segment)
                .and_then(|v| v.get(id.seq as usize))
                .ok_or_else(|| StoreError::Corrupt(format!("message {id} is missing")))?;
            out.push(msg.clone());
            cur = msg.parent;
        }
        out.reverse();
        Ok(out)
    }

    fn can_append(&self, record: &SessionRecord) -> bool {
        match record.head {
            None => false,
            Some(head) => {
                let owned = self
                    .segments
                    .get(&head.segment)
                    .is_some_and(|s| s.session_id == record.id);
                let len = self.messages.get(&head.segment).map_or(0, |v| v.len());
                owned && head.seq as usize + 1 == len
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn load_session(
        &self,
        id: &str,
        recent: usize,
    ) -> Result<Option<LoadedSession>, StoreError> {
        let inner = self.lock();
        let Some(record) = inner.sessions.get(id).cloned() else {
            return Ok(None);
        };
        let recent = match record.head {
            Some(head) if recent > 0 => inner.path(head, Some(recent))?,
            _ => Vec::new(),
        };
        let can_append = inner.can_append(&record);
        Ok(Some(LoadedSession {
            record,
            recent,
            can_append,
        }))
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let mut inner = self.lock();
        check_version(
            &commit,
            inner
                .sessions
                .get(&commit.record.id)
                .map(|r| r.state_version),
        )?;
        // Validate every message lands at the end of a segment this session owns.
        let mut next: HashMap<SegmentId, usize> = HashMap::new();
        if let Some(seg) = &commit.new_segment {
            if inner.segments.contains_key(&seg.id) {
                return Err(StoreError::Database(format!("segment {:x} exists", seg.id)));
            }
            next.insert(seg.id, 0);
        }
        for m in &commit.messages {
            let expected = match next.get(&m.id.segment) {
                Some(n) => *n,
                None => {
                    let owned = inner
                        .segments
                        .get(&m.id.segment)
                        .is_some_and(|s| s.session_id == commit.record.id);
                    if !owned {
                        return Err(StoreError::Database(format!(
                            "message {} appends to a segment session '{}' does not own",
                            m.id, commit.record.id
                        )));
                    }
                    inner.messages.get(&m.id.segment).map_or(0, |v| v.len())
                }
            };
            if m.id.seq as usize != expected {
                return Err(StoreError::Database(format!(
                    "message {} is not at the end of its segment (next seq is {expected})",
                    m.id
                )));
            }
            next.insert(m.id.segment, expected + 1);
        }
        if let Some(seg) = commit.new_segment {
            inner.messages.insert(seg.id, Vec::new());
            inner.segments.insert(seg.id, seg);
        }
        for m in commit.messages {
            inner.messages.entry(m.id.segment).or_default().push(m);
        }
        let session = commit.record.id.clone();
        inner
            .checkpoints
            .retain(|c| !(c.session_id == session && commit.drop_checkpoints.contains(&c.id)));
        inner.checkpoints.extend(commit.checkpoints);
        inner
            .sessions
            .insert(commit.record.id.clone(), commit.record);
        Ok(())
    }

    async fn history(
        &self,
        head: MessageId,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, StoreError> {
        self.lock().path(head, limit)
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionSummary>, StoreError> {
        let inner = self.lock();
        let mut out: Vec<SessionSummary> = inner
            .sessions
            .values()
            .filter(|r| filter.user_id.is_none() || r.user_id == filter.user_id)
            .filter(|r| filter.updated_before.is_none_or(|t| r.updated_at < t))
            .map(SessionSummary::from)
            .collect();
        out.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
        if let Some(l) = filter.limit {
            out.truncate(l);
        }
        Ok(out)
    }

    async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.sessions.get(id) {
            None => return Ok(false),
            Some(r) if updated_before.is_some_and(|t| r.updated_at >= t) => return Ok(false),
            Some(_) => {}
        }
        inner.sessions.remove(id);
        inner.checkpoints.retain(|c| c.session_id != id);
        // Keep every segment another session's history passes through:
        // where other sessions' heads, checkpoints and segments point, and
        // every ancestor of those. (This session's row and checkpoints are
        // already gone, so only others remain.)
        let starts: Vec<SegmentId> = inner
            .segments
            .values()
            .filter(|s| s.session_id != id)
            .filter_map(|s| s.parent.map(|p| p.segment))
            .chain(
                inner
                    .sessions
                    .values()
                    .filter_map(|r| r.head.map(|h| h.segment)),
            )
            .chain(
                inner
                    .checkpoints
                    .iter()
                    .filter_map(|c| c.head.map(|h| h.segment)),
            )
            .collect();
        let mut keep: HashSet<SegmentId> = HashSet::new();
        for start in starts {
            let mut next = Some(start);
            while let Some(p) = next {
                if !keep.insert(p) {
                    break;
                }
                next = inner
                    .segments
                    .get(&p)
                    .and_then(|s| s.parent.map(|m| m.segment));
            }
        }
        let doomed: Vec<SegmentId> = inner
            .segments
            .values()
            .filter(|s| s.session_id == id && !keep.contains(&s.id))
            .map(|s| s.id)
            .collect();
        for seg in doomed {
            inner.segments.remove(&seg);
            inner.messages.remove(&seg);
        }
        Ok(true)
    }

    async fn list_checkpoints(
        &self,
        session_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        let inner = self.lock();
        let mut out: Vec<CheckpointRecord> = inner
            .checkpoints
            .iter()
            .filter(|c| c.session_id == session_id)
            .cloned()
            .collect();
        out.sort_by_key(|c| c.created_at);
        Ok(out)
    }

    async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        Ok(self.lock().checkpoints.iter().find(|c| c.id == id).cloned())
    }

    async fn list_segments(&self, session_id: &str) -> Result<Vec<SegmentInfo>, StoreError> {
        let inner = self.lock();
        let mut out: Vec<SegmentInfo> = inner
            .segments
            .values()
            .filter(|s| s.session_id == session_id)
            .map(|s| SegmentInfo {
                id: s.id,
                parent: s.parent,
                created_at: s.created_at,
                tip: inner
                    .messages
                    .get(&s.id)
                    .and_then(|v| v.last())
                    .map(|m| (m.id, m.created_at)),
            })
            .collect();
        out.sort_by_key(|s| (s.created_at, s.id));
        Ok(out)
    }

    async fn external_refs(&self, session_id: &str) -> Result<Vec<MessageId>, StoreError> {
        let inner = self.lock();
        let own = |m: &MessageId| {
            inner
                .segments
                .get(&m.segment)
                .is_some_and(|s| s.session_id == session_id)
        };
        let mut out: Vec<MessageId> = Vec::new();
        for r in inner.sessions.values().filter(|r| r.id != session_id) {
            out.extend(r.head.filter(|h| own(h)));
        }
        for c in inner
            .checkpoints
            .iter()
            .filter(|c| c.session_id != session_id)
        {
            out.extend(c.head.filter(|h| own(h)));
        }
        for s in inner
            .segments
            .values()
            .filter(|s| s.session_id != session_id)
        {
            out.extend(s.parent.filter(|p| own(p)));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn trim_segments(
        &self,
        session_id: &str,
        expected_version: u64,
        plan: Vec<(SegmentId, Option<u32>)>,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let found = inner.sessions.get(session_id).map(|r| r.state_version);
        if found != Some(expected_version) {
            return Err(StoreError::Conflict {
                session: session_id.into(),
                expected: Some(expected_version),
                found,
            });
        }
        let mut deleted = 0u64;
        for (seg, keep) in plan {
            if inner
                .segments
                .get(&seg)
                .is_none_or(|s| s.session_id != session_id)
            {
                continue;
            }
            match keep {
                None => {
                    deleted += inner.messages.remove(&seg).map_or(0, |v| v.len() as u64);
                    inner.segments.remove(&seg);
                }
                Some(k) => {
                    if let Some(v) = inner.messages.get_mut(&seg) {
                        let before = v.len();
                        v.truncate(k as usize + 1);
                        deleted += (before - v.len()) as u64;
                    }
                }
            }
        }
        Ok(deleted)
    }

    async fn shared_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        Ok(self
            .lock()
            .shared
            .get(&(namespace.to_string(), key.to_string()))
            .cloned())
    }

    async fn shared_put(
        &self,
        namespace: &str,
        key: &str,
        value: Option<serde_json::Value>,
        expected_version: Option<u64>,
    ) -> Result<SharedEntry, StoreError> {
        let mut inner = self.lock();
        let k = (namespace.to_string(), key.to_string());
        let live = inner.shared.get(&k).map(|e| e.version);
        let last = live
            .or_else(|| inner.shared_deleted.get(&k).copied())
            .unwrap_or(0);
        if let Some(expected) = expected_version {
            let ok = match live {
                Some(v) => expected == v,
                None => expected == 0,
            };
            if !ok {
                return Err(StoreError::VersionMismatch {
                    namespace: namespace.into(),
                    key: key.into(),
                    expected,
                    found: live.unwrap_or(0),
                });
            }
        }
        let found = last;
        let entry = SharedEntry {
            namespace: namespace.into(),
            key: key.into(),
            version: found + 1,
            updated_at: super::now(),
            value: value.clone().unwrap_or(serde_json::Value::Null),
        };
        match value {
            Some(_) => {
                inner.shared_deleted.remove(&k);
                inner.shared.insert(k, entry.clone());
            }
            None => {
                if inner.shared.remove(&k).is_some() {
                    inner.shared_deleted.insert(k, entry.version);
                }
            }
        }
        Ok(entry)
    }

    async fn shared_list(
        &self,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<SharedEntry>, StoreError> {
        Ok(self
            .lock()
            .shared
            .values()
            .filter(|e| e.namespace == namespace && e.key.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.lock().runs.insert(run.id.clone(), run.clone());
        Ok(())
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.lock().runs.get(id).cloned())
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let mut v: Vec<RunRecord> = self.lock().runs.values().cloned().collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        v.truncate(limit);
        Ok(v)
    }

    async fn put_task_result(&self, result: &TaskResult) -> Result<(), StoreError> {
        self.lock().task_results.insert(
            (result.run_id.clone(), result.task_id.clone()),
            result.clone(),
        );
        Ok(())
    }

    async fn task_results(&self, run_id: &str) -> Result<Vec<TaskResult>, StoreError> {
        Ok(self
            .lock()
            .task_results
            .values()
            .filter(|r| r.run_id == run_id)
            .cloned()
            .collect())
    }

    async fn memory_put(
        &self,
        item: &MemoryItem,
        max_per_user: usize,
    ) -> Result<MemoryWrite, StoreError> {
        let mut inner = self.lock();
        let mut out = MemoryWrite::default();
        let list = inner.memories.entry(item.user_id.clone()).or_default();
        if item.subject.is_some() {
            let same = |m: &MemoryItem| {
                m.superseded_by.is_none() && m.kind == item.kind && m.subject == item.subject
            };
            if let Some(d) = list
                .iter()
                .find(|m| same(m) && m.content.to_lowercase() == item.content.to_lowercase())
            {
                out.duplicate_of = Some(d.id.clone());
                return Ok(out);
            }
            for m in list.iter_mut().filter(|m| same(m)) {
                m.superseded_by = Some(item.id.clone());
                out.superseded.push(m.id.clone());
            }
        } else if let Some(d) = list.iter().find(|m| {
            // Without a subject nothing is superseded, but the same text
            // again (ignoring case) is a duplicate.
            m.superseded_by.is_none()
                && m.subject.is_none()
                && m.kind == item.kind
                && m.content.to_lowercase() == item.content.to_lowercase()
        }) {
            out.duplicate_of = Some(d.id.clone());
            return Ok(out);
        }
        let mut new = item.clone();
        new.superseded_by = None;
        list.push(new);
        let max = max_per_user.max(1);
        if list.len() > max {
            // Eviction order: superseded first, then lowest score, oldest first.
            let mut order: Vec<usize> = (0..list.len()).collect();
            order.sort_by(|&a, &b| {
                let (x, y) = (&list[a], &list[b]);
                (x.superseded_by.is_none())
                    .cmp(&y.superseded_by.is_none())
                    .then(x.score.total_cmp(&y.score))
                    .then(x.created_at.cmp(&y.created_at))
                    .then(a.cmp(&b))
            });
            let doomed: HashSet<usize> = order[..list.len() - max].iter().copied().collect();
            let mut i = 0;
            list.retain(|m| {
                let keep = !doomed.contains(&i);
                i += 1;
                if !keep {
                    out.evicted.push(m.id.clone());
                }
                keep
            });
        }
        let count = list.len() as u64;
        let user = inner
            .users
            .entry(item.user_id.clone())
            .or_insert_with(|| UserRecord {
                user_id: item.user_id.clone(),
                updated_at: super::now(),
                ..Default::default()
            });
        user.memories = count;
        Ok(out)
    }

    async fn memory_list(
        &self,
        user_id: &str,
        include_superseded: bool,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        let inner = self.lock();
        let mut v: Vec<MemoryItem> = inner
            .memories
            .get(user_id)
            .map(|l| {
                l.iter()
                    .filter(|m| include_superseded || m.superseded_by.is_none())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|m| m.created_at);
        Ok(v)
    }

    async fn memory_top(&self, user_id: &str, limit: usize) -> Result<Vec<MemoryItem>, StoreError> {
        let mut v = self.memory_list(user_id, false).await?;
        v.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.created_at.cmp(&a.created_at))
        });
        v.truncate(limit);
        Ok(v)
    }

    async fn memory_search(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<MemoryHit>, StoreError> {
        // The reference ranking: how many of the query's terms the memory
        // contains as words; ties by score, then newest.
        let terms = crate::memory::search_terms(query);
        if terms.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let inner = self.lock();
        let mut hits: Vec<MemoryHit> = inner
            .memories
            .get(user_id)
            .into_iter()
            .flatten()
            .filter(|m| m.superseded_by.is_none())
            .filter_map(|m| {
                let words: HashSet<String> = crate::memory::extract_words(&m.content);
                let n = terms.iter().filter(|t| words.contains(*t)).count();
                (n > 0).then(|| MemoryHit {
                    item: m.clone(),
                    rank: n as f64,
                })
            })
            .collect();
        hits.sort_by(|a, b| {
            b.rank
                .total_cmp(&a.rank)
                .then(b.item.score.total_cmp(&a.item.score))
                .then(b.item.created_at.cmp(&a.item.created_at))
        });
        hits.truncate(limit);
        Ok(hits)
    }

    async fn memory_mark_used(&self, ids: &[String], at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for list in inner.memories.values_mut() {
            for m in list.iter_mut().filter(|m| ids.contains(&m.id)) {
                m.uses += 1;
                m.last_used = Some(at);
            }
        }
        Ok(())
    }

    async fn forget_user(&self, user_id: &str) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        inner.users.remove(user_id);
        Ok(inner.memories.remove(user_id).map_or(0, |l| l.len() as u64))
    }

    async fn user_get(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        Ok(self.lock().users.get(user_id).cloned())
    }

    async fn user_update(
        &self,
        user_id: &str,
        profile: &JsonMap,
        preferences: &JsonMap,
    ) -> Result<UserRecord, StoreError> {
        let mut inner = self.lock();
        let u = inner
            .users
            .entry(user_id.to_string())
            .or_insert_with(|| UserRecord {
                user_id: user_id.to_string(),
                ..Default::default()
            });
        for (k, v) in profile {
            u.profile.insert(k.clone(), v.clone());
        }
        for (k, v) in preferences {
            u.preferences.insert(k.clone(), v.clone());
        }
        u.updated_at = super::now();
        Ok(u.clone())
    }
}
