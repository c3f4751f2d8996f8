//! Test doubles, in one place: a scripted model that records its prompts,
//! and a store that fails on demand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use crate::store::{
    CheckpointRecord, Commit, LoadedSession, Message, MessageId, SessionFilter, SessionSummary,
    Store, StoreError,
};

/// A model that records every request and answers from a script (or
/// `reply to: <last message>` when the script is empty). A message
/// containing `PANIC` makes it panic; one containing `FAIL` makes it fail.
#[derive(Default)]
pub struct ScriptedModel {
    /// Every request received, in order.
    pub requests: Mutex<Vec<ChatRequest>>,
    script: Mutex<std::collections::VecDeque<String>>,
    delay: Option<Duration>,
    /// Fail this many calls from now (then answer normally).
    pub fail_next: AtomicUsize,
    /// While set, `reply_meta` panics: a panic inside the session actor's
    /// own turn handling (not in the model call), to test supervision.
    pub panic_in_session: std::sync::atomic::AtomicBool,
}

impl ScriptedModel {
    /// An empty script.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A model that waits `delay` before answering.
    pub fn with_delay(delay: Duration) -> Arc<Self> {
        Arc::new(ScriptedModel {
            delay: Some(delay),
            ..Default::default()
        })
    }

    /// Queues replies.
    pub fn push(&self, reply: impl Into<String>) {
        self.script.lock().unwrap().push_back(reply.into());
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<ChatRequest> {
        self.requests.lock().unwrap().clone()
    }
}

#[async_trait]
impl ChatModel for ScriptedModel {
    fn name(&self) -> &str {
        "scripted"
    }

    fn reply_meta(&self) -> serde_json::Value {
        if self.panic_in_session.load(Ordering::SeqCst) {
            panic!("scripted panic inside the session actor");
        }
        serde_json::json!({ "model": "scripted" })
    }

    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.requests.lock().unwrap().push(request.clone());
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        let last = request
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        if last.contains("PANIC") {
            panic!("scripted model panics on marker message");
        }
        if last.contains("FAIL") {
            return Err(ModelError::Failed("scripted failure".into()));
        }
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ModelError::Failed("scripted transient failure".into()));
        }
        let content = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| format!("reply to: {last}"));
        Ok(ChatResponse {
            content,
            model: "scripted".into(),
            usage: None,
        })
    }
}

/// A store that delegates to another and fails every commit after the
/// first `ok_commits` (or when told to).
pub struct FailingStore<S> {
    inner: S,
    commits: AtomicUsize,
    ok_commits: AtomicUsize,
}

impl<S: Store> FailingStore<S> {
    /// Fails commits after `ok_commits` have succeeded.
    pub fn new(inner: S, ok_commits: usize) -> Self {
        FailingStore {
            inner,
            commits: AtomicUsize::new(0),
            ok_commits: AtomicUsize::new(ok_commits),
        }
    }

    /// Lets `n` more commits succeed from now.
    pub fn allow(&self, n: usize) {
        let done = self.commits.load(Ordering::SeqCst);
        self.ok_commits.store(done + n, Ordering::SeqCst);
    }
}

#[async_trait]
impl<S: Store> Store for FailingStore<S> {
    fn name(&self) -> &'static str {
        "failing"
    }
    async fn load_session(
        &self,
        id: &str,
        recent: usize,
    ) -> Result<Option<LoadedSession>, StoreError> {
        self.inner.load_session(id, recent).await
    }
    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let n = self.commits.load(Ordering::SeqCst);
        if n >= self.ok_commits.load(Ordering::SeqCst) {
            return Err(StoreError::Injected(format!("commit #{} refused", n + 1)));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(commit).await
    }
    async fn history(
        &self,
        head: MessageId,
        limit: Option<usize>,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner.history(head, limit).await
    }
    async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionSummary>, StoreError> {
        self.inner.list_sessions(filter).await
    }
    async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<bool, StoreError> {
        self.inner.delete_session(id, updated_before).await
    }
    async fn list_checkpoints(
        &self,
        session_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        self.inner.list_checkpoints(session_id).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
    async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        self.inner.get_checkpoint(id).await
    }
    async fn list_segments(
        &self,
        session_id: &str,
    ) -> Result<Vec<crate::store::SegmentInfo>, StoreError> {
        self.inner.list_segments(session_id).await
    }
    async fn external_refs(&self, session_id: &str) -> Result<Vec<MessageId>, StoreError> {
        self.inner.external_refs(session_id).await
    }
    async fn put_run(&self, run: &crate::store::RunRecord) -> Result<(), StoreError> {
        self.inner.put_run(run).await
    }
    async fn get_run(&self, id: &str) -> Result<Option<crate::store::RunRecord>, StoreError> {
        self.inner.get_run(id).await
    }
    async fn list_runs(&self, limit: usize) -> Result<Vec<crate::store::RunRecord>, StoreError> {
        self.inner.list_runs(limit).await
    }
    async fn put_task_result(&self, result: &crate::store::TaskResult) -> Result<(), StoreError> {
        self.inner.put_task_result(result).await
    }
    async fn task_results(
        &self,
        run_id: &str,
    ) -> Result<Vec<crate::store::TaskResult>, StoreError> {
        self.inner.task_results(run_id).await
    }
    async fn shared_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<crate::store::SharedEntry>, StoreError> {
        self.inner.shared_get(namespace, key).await
    }
    async fn shared_put(
        &self,
        namespace: &str,
        key: &str,
        value: Option<serde_json::Value>,
        expected_version: Option<u64>,
    ) -> Result<crate::store::SharedEntry, StoreError> {
        self.inner
            .shared_put(namespace, key, value, expected_version)
            .await
    }
    async fn shared_list(
        &self,
        namespace: &str,
        prefix: &str,
    ) -> Result<Vec<crate::store::SharedEntry>, StoreError> {
        self.inner.shared_list(namespace, prefix).await
    }
    async fn trim_segments(
        &self,
        session_id: &str,
        expected_version: u64,
        plan: Vec<(crate::store::SegmentId, Option<u32>)>,
    ) -> Result<u64, StoreError> {
        self.inner
            .trim_segments(session_id, expected_version, plan)
            .await
    }
}
