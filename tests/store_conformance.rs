//! One behaviour contract, every backend: the same checks run against the
//! in-memory reference model and SQLite (and, when they exist, the others).

use std::sync::Arc;

use chrono::Duration;
use troupe::store::now as troupe_now;
use troupe::store::{
    new_segment_id, CheckpointKind, CheckpointRecord, Commit, MemoryStore, Message, MessageId,
    Role, RunRecord, RunStatus, Segment, SessionFilter, SessionRecord, SqliteStore, Store,
    StoreError, SyncMode, TaskResult,
};

fn msg(id: MessageId, parent: Option<MessageId>, role: Role, content: &str) -> Message {
    Message {
        id,
        parent,
        role,
        agent: Some("assistant".into()),
        content: content.into(),
        created_at: troupe_now(),
        meta: Some(serde_json::json!({"model": "echo"})),
    }
}

/// A writer of one session, as a session actor would be.
struct Writer {
    record: SessionRecord,
    segment: Option<i64>,
    next_seq: u32,
}

impl Writer {
    async fn create(store: &dyn Store, id: &str) -> Writer {
        let mut record = SessionRecord::new(id, Some("u".into()), vec!["assistant".into()]);
        record.state_version = 1;
        store
            .commit(Commit {
                record: record.clone(),
                expected_version: None,
                small_state_changed: true,
                new_segment: None,
                messages: vec![],
                checkpoints: vec![],
                drop_checkpoints: vec![],
            })
            .await
            .unwrap();
        Writer {
            record,
            segment: None,
            next_seq: 0,
        }
    }

    /// Appends a user message and a reply; `branch` starts a new segment at the head.
    async fn turn(
        &mut self,
        store: &dyn Store,
        text: &str,
        branch: bool,
    ) -> Result<(), StoreError> {
        let mut new_segment = None;
        if branch || self.segment.is_none() {
            let id = new_segment_id();
            new_segment = Some(Segment {
                id,
                session_id: self.record.id.clone(),
                parent: self.record.head,
                created_at: troupe_now(),
            });
            self.segment = Some(id);
            self.next_seq = 0;
        }
        let seg = self.segment.unwrap();
        let u = MessageId {
            segment: seg,
            seq: self.next_seq,
        };
        let a = MessageId {
            segment: seg,
            seq: self.next_seq + 1,
        };
        let mut next = self.record.clone();
        next.head = Some(a);
        next.interactions += 1;
        next.state_version += 1;
        next.updated_at = troupe_now();
        store
            .commit(Commit {
                record: next.clone(),
                expected_version: Some(self.record.state_version),
                small_state_changed: false,
                new_segment,
                messages: vec![
                    msg(u, self.record.head, Role::User, text),
                    msg(a, Some(u), Role::Assistant, &format!("re: {text}")),
                ],
                checkpoints: vec![],
                drop_checkpoints: vec![],
            })
            .await?;
        self.record = next;
        self.next_seq += 2;
        Ok(())
    }
}

async fn contract(store: Arc<dyn Store>) {
    let s = store.as_ref();

    // Absent sessions are None, not errors.
    assert!(s.load_session("ghost", 10).await.unwrap().is_none());

    // Create, append, read back.
    let mut w = Writer::create(s, "alpha").await;
    for i in 0..5 {
        w.turn(s, &format!("t{i}"), false).await.unwrap();
    }
    let loaded = s.load_session("alpha", 4).await.unwrap().unwrap();
    assert_eq!(loaded.record, w.record);
    assert!(loaded.can_append);
    assert_eq!(loaded.recent.len(), 4);
    assert_eq!(loaded.recent[3].content, "re: t4");
    let h = s.history(w.record.head.unwrap(), None).await.unwrap();
    assert_eq!(h.len(), 10);
    for (i, m) in h.iter().enumerate() {
        let expected_parent = if i == 0 { None } else { Some(h[i - 1].id) };
        assert_eq!(m.parent, expected_parent, "message {i}");
    }
    assert_eq!(h[0].meta, Some(serde_json::json!({"model": "echo"})));
    let tail = s.history(w.record.head.unwrap(), Some(3)).await.unwrap();
    assert_eq!(tail, h[7..].to_vec());

    // Creating an existing session is a conflict; so is a stale version.
    let dup = Commit {
        record: w.record.clone(),
        expected_version: None,
        small_state_changed: true,
        new_segment: None,
        messages: vec![],
        checkpoints: vec![],
        drop_checkpoints: vec![],
    };
    assert!(matches!(
        s.commit(dup).await,
        Err(StoreError::Conflict { .. })
    ));
    let mut stale = Writer {
        record: w.record.clone(),
        segment: w.segment,
        next_seq: w.next_seq,
    };
    stale.record.state_version -= 1;
    let err = stale.turn(s, "stale", false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    // ... and it changed nothing.
    assert_eq!(
        s.load_session("alpha", 0).await.unwrap().unwrap().record,
        w.record
    );
    assert_eq!(
        s.history(w.record.head.unwrap(), None).await.unwrap().len(),
        10
    );

    // A commit that fails half-way (a message id that exists) leaves nothing behind.
    let mut next = w.record.clone();
    next.state_version += 1;
    next.interactions += 1;
    let clash = Commit {
        record: next,
        expected_version: Some(w.record.state_version),
        small_state_changed: false,
        new_segment: None,
        messages: vec![msg(h[9].id, Some(h[8].id), Role::User, "clash")],
        checkpoints: vec![],
        drop_checkpoints: vec![],
    };
    assert!(s.commit(clash).await.is_err());
    assert_eq!(
        s.load_session("alpha", 0).await.unwrap().unwrap().record,
        w.record
    );
    assert_eq!(s.history(h[9].id, None).await.unwrap()[9].content, "re: t4");

    // Branch: a new segment from an earlier message; both paths stay readable.
    let old_head = w.record.head.unwrap();
    w.record.head = Some(h[3].id); // as a restore would (state_version unchanged for the store)
    w.turn(s, "branch", true).await.unwrap();
    let hb = s.history(w.record.head.unwrap(), None).await.unwrap();
    assert_eq!(hb.len(), 6);
    assert_eq!(hb[..4], h[..4]);
    assert_eq!(hb[4].content, "branch");
    assert_eq!(hb[4].parent, Some(h[3].id));
    assert_eq!(s.history(old_head, None).await.unwrap(), h);
    let loaded = s.load_session("alpha", 100).await.unwrap().unwrap();
    assert_eq!(loaded.recent, hb);
    assert!(loaded.can_append);

    // Small state round-trips exactly.
    let mut next = w.record.clone();
    next.profile.insert("name".into(), "Ada".into());
    next.preferences.insert(
        "lang".into(),
        serde_json::json!({"code": "en", "n": [1, 2.5]}),
    );
    next.user_data.insert("ünïcødé".into(), "✓".into());
    next.metadata
        .insert("title".into(), serde_json::Value::Null);
    next.state_version += 1;
    s.commit(Commit {
        record: next.clone(),
        expected_version: Some(w.record.state_version),
        small_state_changed: true,
        new_segment: None,
        messages: vec![],
        checkpoints: vec![CheckpointRecord {
            id: "cp-1".into(),
            session_id: "alpha".into(),
            head: next.head,
            label: Some("before".into()),
            description: None,
            kind: CheckpointKind::Manual,
            state: next.clone(),
            created_at: troupe_now(),
        }],
        drop_checkpoints: vec![],
    })
    .await
    .unwrap();
    w.record = next;
    assert_eq!(
        s.load_session("alpha", 0).await.unwrap().unwrap().record,
        w.record
    );
    let cps = s.list_checkpoints("alpha").await.unwrap();
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].state, w.record);
    assert_eq!(cps[0].label.as_deref(), Some("before"));

    // Listing: filter by user and age, newest first, limit.
    let mut other = Writer::create(s, "beta").await;
    other.record.user_id = None;
    other.turn(s, "hello", false).await.unwrap();
    let all = s.list_sessions(&SessionFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        ["beta", "alpha"]
    );
    let mine = s
        .list_sessions(&SessionFilter {
            user_id: Some("u".into()),
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    let none = s
        .list_sessions(&SessionFilter {
            updated_before: Some(troupe_now() - Duration::hours(1)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());

    // Deleting one session leaves the other whole, and messages another
    // session's segment branches from are kept.
    let mut fork = Writer::create(s, "gamma").await;
    fork.record.head = Some(h[5].id);
    fork.turn(s, "forked", true).await.unwrap();
    // A fork of alpha's branch: its history passes through two of alpha's segments.
    let mut deep = Writer::create(s, "delta").await;
    deep.record.head = Some(hb[5].id);
    deep.turn(s, "deep fork", true).await.unwrap();
    // A conditional delete of a recently updated session does nothing.
    let long_ago = troupe_now() - Duration::hours(1);
    assert!(!s.delete_session("alpha", Some(long_ago)).await.unwrap());
    assert!(s.load_session("alpha", 0).await.unwrap().is_some());
    assert!(s
        .delete_session("alpha", Some(troupe_now() + Duration::seconds(1)))
        .await
        .unwrap());
    assert!(!s.delete_session("alpha", None).await.unwrap());
    let hd = s.history(deep.record.head.unwrap(), None).await.unwrap();
    assert_eq!(hd.len(), 8);
    assert_eq!(hd[..6], hb[..]);
    assert!(s.load_session("alpha", 1).await.unwrap().is_none());
    assert!(s.list_checkpoints("alpha").await.unwrap().is_empty());
    let hf = s.history(fork.record.head.unwrap(), None).await.unwrap();
    assert_eq!(hf.len(), 8);
    assert_eq!(hf[..6], h[..6]);
    assert_eq!(
        s.history(other.record.head.unwrap(), None)
            .await
            .unwrap()
            .len(),
        2
    );

    // Shared state: versions from 1, preconditions, deletes, prefix listing per namespace.
    assert!(s.shared_get("ns", "k").await.unwrap().is_none());
    let e = s
        .shared_put("ns", "k", Some(serde_json::json!({"a": 1})), Some(0))
        .await
        .unwrap();
    assert_eq!(e.version, 1);
    assert!(matches!(
        s.shared_put("ns", "k", Some(serde_json::json!(2)), Some(0))
            .await,
        Err(StoreError::VersionMismatch {
            expected: 0,
            found: 1,
            ..
        })
    ));
    assert_eq!(
        s.shared_put("ns", "k", Some(serde_json::json!(2)), Some(1))
            .await
            .unwrap()
            .version,
        2
    );
    s.shared_put("ns", "k2", Some(serde_json::json!("x")), None)
        .await
        .unwrap();
    s.shared_put("ns", "j", Some(serde_json::json!("y")), None)
        .await
        .unwrap();
    s.shared_put("other", "k3", Some(serde_json::json!("z")), None)
        .await
        .unwrap();
    let got = s.shared_get("ns", "k").await.unwrap().unwrap();
    assert_eq!((got.value, got.version), (serde_json::json!(2), 2));
    let keys: Vec<_> = s
        .shared_list("ns", "k")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["k", "k2"]);
    s.shared_put("ns", "k", None, Some(2)).await.unwrap();
    assert!(s.shared_get("ns", "k").await.unwrap().is_none());
    // Versions never go back: a compare-and-set from before the delete fails,
    // and re-creating continues after the deleted version.
    assert!(matches!(
        s.shared_put("ns", "k", Some(serde_json::json!("stale")), Some(2))
            .await,
        Err(StoreError::VersionMismatch { found: 0, .. })
    ));
    let again = s
        .shared_put("ns", "k", Some(serde_json::json!("new")), Some(0))
        .await
        .unwrap();
    assert_eq!(again.version, 4);
    s.shared_put("ns", "k", None, None).await.unwrap();
    assert_eq!(s.shared_list("ns", "").await.unwrap().len(), 2);

    // Workflow runs and task results: upserts, newest first.
    let mut run = RunRecord {
        id: "run-1".into(),
        pipeline: "article".into(),
        path: "pipelines/article.toml".into(),
        inputs: serde_json::from_str(r#"{"topic": "qubits"}"#).unwrap(),
        session_id: Some("alpha".into()),
        status: RunStatus::Running,
        created_at: troupe_now(),
        updated_at: troupe_now(),
    };
    s.put_run(&run).await.unwrap();
    run.status = RunStatus::Succeeded;
    s.put_run(&run).await.unwrap();
    assert_eq!(s.get_run("run-1").await.unwrap(), Some(run.clone()));
    assert!(s.get_run("run-2").await.unwrap().is_none());
    assert_eq!(s.list_runs(10).await.unwrap(), vec![run]);
    let mut tr = TaskResult {
        run_id: "run-1".into(),
        task_id: "research".into(),
        status: RunStatus::Running,
        output: None,
        attempts: 1,
        error: None,
        started_at: Some(troupe_now()),
        finished_at: None,
    };
    s.put_task_result(&tr).await.unwrap();
    tr.status = RunStatus::Succeeded;
    tr.output = Some("facts".into());
    tr.finished_at = Some(troupe_now());
    s.put_task_result(&tr).await.unwrap();
    assert_eq!(s.task_results("run-1").await.unwrap(), vec![tr]);
    assert!(s.task_results("run-2").await.unwrap().is_empty());

    // Many sessions committing at once all land (group commit must not mix them up).
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = Writer::create(store.as_ref(), &format!("many-{i}")).await;
            for t in 0..5 {
                w.turn(store.as_ref(), &format!("{i}/{t}"), false)
                    .await
                    .unwrap();
            }
            w.record
        }));
    }
    for t in tasks {
        let rec = t.await.unwrap();
        let h = store.history(rec.head.unwrap(), None).await.unwrap();
        let users: Vec<_> = h
            .iter()
            .filter(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .collect();
        let i = rec.id.trim_start_matches("many-");
        assert_eq!(
            users,
            (0..5).map(|t| format!("{i}/{t}")).collect::<Vec<_>>()
        );
        assert_eq!(
            store
                .load_session(&rec.id, 0)
                .await
                .unwrap()
                .unwrap()
                .record,
            rec
        );
    }
}

#[tokio::test]
async fn memory_store_meets_the_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn sqlite_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(
        SqliteStore::open(dir.path().join("c.db"), SyncMode::Normal).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn sqlite_store_meets_the_contract_with_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(
        SqliteStore::open(dir.path().join("c.db"), SyncMode::Full).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn sqlite_commits_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let record = {
        let store = SqliteStore::open(&path, SyncMode::Full).unwrap();
        let mut w = Writer::create(&store, "keep").await;
        w.turn(&store, "durable", false).await.unwrap();
        w.record
    };
    let store = SqliteStore::open(&path, SyncMode::Full).unwrap();
    let loaded = store.load_session("keep", 10).await.unwrap().unwrap();
    assert_eq!(loaded.record, record);
    assert_eq!(loaded.recent[0].content, "durable");
}

/// One bad commit among many concurrent good ones (SQLite puts them in one
/// batch): the bad one fails and changes nothing, every good one lands.
async fn one_bad_commit_among_many(store: Arc<dyn Store>) {
    let mut writers = Vec::new();
    for i in 0..40 {
        let mut w = Writer::create(store.as_ref(), &format!("batch-{i}")).await;
        w.turn(store.as_ref(), "first", false).await.unwrap();
        writers.push(w);
    }
    let victim = writers[7].record.clone();
    let victim_head = victim.head.unwrap();
    let mut tasks = Vec::new();
    for (i, mut w) in writers.into_iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            if i == 7 {
                // Valid version (its UPDATE succeeds) but a message id that
                // exists already: it fails after changing a row.
                let mut next = w.record.clone();
                next.state_version += 1;
                next.interactions += 1;
                let clash = Commit {
                    record: next,
                    expected_version: Some(w.record.state_version),
                    small_state_changed: false,
                    new_segment: None,
                    messages: vec![msg(victim_head, None, Role::User, "clash")],
                    checkpoints: vec![],
                    drop_checkpoints: vec![],
                };
                (i, store.commit(clash).await.is_ok())
            } else {
                (i, w.turn(store.as_ref(), "second", false).await.is_ok())
            }
        }));
    }
    for t in tasks {
        let (i, ok) = t.await.unwrap();
        assert_eq!(ok, i != 7, "commit {i}");
    }
    assert_eq!(
        store
            .load_session("batch-7", 0)
            .await
            .unwrap()
            .unwrap()
            .record,
        victim
    );
    for i in (0..40).filter(|i| *i != 7) {
        let l = store
            .load_session(&format!("batch-{i}"), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.recent.len(), 4, "batch-{i}");
        assert_eq!(l.recent[2].content, "second");
    }
}

#[tokio::test]
async fn one_bad_commit_among_many_memory() {
    one_bad_commit_among_many(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn one_bad_commit_among_many_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    one_bad_commit_among_many(Arc::new(
        SqliteStore::open(dir.path().join("b.db"), SyncMode::Full).unwrap(),
    ))
    .await;
}

// ---- Redis (runs when TROUPE_TEST_REDIS_URL is set; fails if it is set and Redis is down) ----

/// A Redis store on a fresh key prefix, or `None` (with a printed reason)
/// when `TROUPE_TEST_REDIS_URL` is unset.
async fn redis_store(test: &str) -> Option<Arc<troupe::store::RedisStore>> {
    let Ok(url) = std::env::var("TROUPE_TEST_REDIS_URL") else {
        eprintln!(
            "skipping {test}: set TROUPE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15) to run it"
        );
        return None;
    };
    let mut o = troupe::store::RedisOptions::new(url.clone());
    o.key_prefix = format!("troupe-test:{}:", uuid::Uuid::new_v4());
    o.node_id = format!("conformance-{test}");
    let store = troupe::store::RedisStore::open(o)
        .await
        .unwrap_or_else(|e| panic!("TROUPE_TEST_REDIS_URL={url} is set but unusable: {e}"));
    Some(Arc::new(store))
}

#[tokio::test]
async fn redis_store_meets_the_contract() {
    let Some(store) = redis_store("redis_store_meets_the_contract").await else {
        return;
    };
    contract(store.clone()).await;
    store.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn one_bad_commit_among_many_redis() {
    let Some(store) = redis_store("one_bad_commit_among_many_redis").await else {
        return;
    };
    one_bad_commit_among_many(store.clone()).await;
    store.delete_all_keys().await.unwrap();
}

// ---- long-term memory (issue 4) ----

fn memory_item(
    user: &str,
    content: &str,
    subject: Option<&str>,
    score: f64,
) -> troupe::store::MemoryItem {
    troupe::store::MemoryItem {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user.into(),
        content: content.into(),
        kind: troupe::store::MemoryKind::Preference,
        subject: subject.map(str::to_string),
        relevance: 0.5,
        importance: 0.5,
        score,
        created_at: troupe_now(),
        last_used: None,
        uses: 0,
        superseded_by: None,
        session_id: Some("s-1".into()),
    }
}

/// The memory part of the store contract: per-user scoping, full-text
/// search of active memories, supersede, duplicates, eviction order,
/// usage marks, user records, forgetting.
async fn memory_contract(store: Arc<dyn Store>) {
    let s = store.as_ref();
    assert!(s.memory_list("alice", true).await.unwrap().is_empty());
    assert!(s.user_get("alice").await.unwrap().is_none());

    let blue = memory_item(
        "alice",
        "User's favourite colour is blue",
        Some("favourite colour"),
        0.8,
    );
    let w = s.memory_put(&blue, 100).await.unwrap();
    assert_eq!(w, troupe::store::MemoryWrite::default());
    let python = memory_item(
        "alice",
        "User prefers Python over JavaScript",
        Some("preference: language"),
        0.9,
    );
    s.memory_put(&python, 100).await.unwrap();
    // Another user with the same words: never visible to alice.
    let bob = memory_item(
        "bob",
        "User prefers Python over Perl",
        Some("preference: language"),
        0.9,
    );
    s.memory_put(&bob, 100).await.unwrap();

    // Read back exactly.
    let listed = s.memory_list("alice", false).await.unwrap();
    assert_eq!(listed, vec![blue.clone(), python.clone()]);

    // Search: any query word, only this user's, nothing for stop words.
    let hits = s
        .memory_search("alice", "Do I like python?", 10)
        .await
        .unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].item, python);
    assert!(s
        .memory_search("alice", "perl", 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.memory_search("bob", "perl", 10).await.unwrap()[0].item,
        bob
    );
    assert!(s
        .memory_search("alice", "what is it", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .memory_search("carol", "python", 10)
        .await
        .unwrap()
        .is_empty());
    let two = s.memory_search("alice", "blue python", 10).await.unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(
        s.memory_search("alice", "blue python", 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // Top: by score, then newest.
    let top = s.memory_top("alice", 1).await.unwrap();
    assert_eq!(top, vec![python.clone()]);
    // Recall: the hits first, then the best to fill up, no repeats.
    let recall = s.memory_recall("alice", "blue", 5).await.unwrap();
    assert_eq!(recall, vec![blue.clone(), python.clone()]);

    // A duplicate of an active memory with the same subject writes nothing.
    let again = memory_item(
        "alice",
        "user's favourite colour is BLUE",
        Some("favourite colour"),
        0.8,
    );
    let w = s.memory_put(&again, 100).await.unwrap();
    assert_eq!(w.duplicate_of.as_deref(), Some(blue.id.as_str()));
    assert_eq!(s.memory_list("alice", true).await.unwrap().len(), 2);

    // Supersede: same kind and subject; the old one stays as history only.
    let rust = memory_item(
        "alice",
        "User prefers Rust",
        Some("preference: language"),
        0.9,
    );
    let w = s.memory_put(&rust, 100).await.unwrap();
    assert_eq!(w.superseded, vec![python.id.clone()]);
    assert!(w.evicted.is_empty());
    let active: Vec<String> = s
        .memory_list("alice", false)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(active, vec![blue.id.clone(), rust.id.clone()]);
    let all = s.memory_list("alice", true).await.unwrap();
    let old = all
        .iter()
        .find(|m| m.id == python.id)
        .expect("kept as history");
    assert_eq!(old.superseded_by.as_deref(), Some(rust.id.as_str()));
    assert!(s
        .memory_search("alice", "python javascript", 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.memory_search("alice", "rust", 10).await.unwrap()[0].item,
        rust
    );
    // Bob's memory of the same subject is untouched.
    assert!(s.memory_list("bob", false).await.unwrap()[0]
        .superseded_by
        .is_none());

    // Usage marks.
    let at = troupe_now();
    s.memory_mark_used(&[rust.id.clone(), "no-such-id".into()], at)
        .await
        .unwrap();
    s.memory_mark_used(std::slice::from_ref(&rust.id), at)
        .await
        .unwrap();
    let used = s
        .memory_list("alice", false)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == rust.id)
        .unwrap();
    assert_eq!((used.uses, used.last_used), (2, Some(at)));

    // Eviction: the limit counts every memory of the user; superseded go
    // first, then the lowest score, oldest first.
    let low = memory_item("alice", "User likes olives", None, 0.1);
    let w = s.memory_put(&low, 3).await.unwrap();
    assert_eq!(
        w.evicted,
        vec![python.id.clone()],
        "the superseded one goes first"
    );
    let high = memory_item("alice", "User lives in Lyon", None, 0.95);
    let w = s.memory_put(&high, 3).await.unwrap();
    assert_eq!(w.evicted, vec![low.id.clone()], "then the lowest score");
    let lowest = memory_item("alice", "User likes rain", None, 0.05);
    let w = s.memory_put(&lowest, 3).await.unwrap();
    assert_eq!(
        w.evicted,
        vec![lowest.id.clone()],
        "a new memory scoring lowest goes itself"
    );
    assert_eq!(s.memory_list("alice", true).await.unwrap().len(), 3);
    assert_eq!(s.user_get("alice").await.unwrap().unwrap().memories, 3);

    // User records: keys merged, other keys kept.
    let mut profile = troupe::JsonMap::new();
    profile.insert("name".into(), "Alice".into());
    let mut prefs = troupe::JsonMap::new();
    prefs.insert("language".into(), "fr".into());
    s.user_update("alice", &profile, &troupe::JsonMap::new())
        .await
        .unwrap();
    let rec = s
        .user_update("alice", &troupe::JsonMap::new(), &prefs)
        .await
        .unwrap();
    assert_eq!(rec.profile["name"], "Alice");
    assert_eq!(rec.preferences["language"], "fr");
    let got = s.user_get("alice").await.unwrap().unwrap();
    assert_eq!(
        (got.profile, got.preferences, got.memories),
        (rec.profile, rec.preferences, 3)
    );

    // Forgetting: every memory and the user record; other users untouched;
    // nothing searchable afterwards.
    assert_eq!(s.forget_user("alice").await.unwrap(), 3);
    assert!(s.memory_list("alice", true).await.unwrap().is_empty());
    assert!(s
        .memory_search("alice", "blue rust lyon", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .memory_recall("alice", "blue", 5)
        .await
        .unwrap()
        .is_empty());
    assert!(s.user_get("alice").await.unwrap().is_none());
    assert_eq!(s.memory_search("bob", "python", 10).await.unwrap().len(), 1);
    assert_eq!(s.forget_user("alice").await.unwrap(), 0);
    // A forgotten user can start again.
    s.memory_put(&memory_item("alice", "User likes tea", None, 0.5), 3)
        .await
        .unwrap();
    assert_eq!(s.user_get("alice").await.unwrap().unwrap().memories, 1);

    // A user with few matches among another user's many (newer) ones finds
    // exactly theirs — and the other user exactly theirs. The ids are chosen
    // so that one is a prefix of the other.
    let mine = memory_item("dave", "User drinks green tea with python", None, 0.6);
    s.memory_put(&mine, 1000).await.unwrap();
    let old_pet = memory_item("dave", "User's pet is a python", Some("pet"), 0.6);
    s.memory_put(&old_pet, 1000).await.unwrap();
    let pet = memory_item(
        "dave",
        "User's pet is a python called Monty",
        Some("pet"),
        0.6,
    );
    s.memory_put(&pet, 1000).await.unwrap();
    for i in 0..300 {
        let crowd = memory_item(
            "dav",
            &format!("User wrote python script {i} on tea"),
            None,
            0.5,
        );
        s.memory_put(&crowd, 1000).await.unwrap();
    }
    let mut found: Vec<String> = s
        .memory_search("dave", "python tea", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.item.id)
        .collect();
    found.sort();
    let mut expected = vec![mine.id.clone(), pet.id.clone()];
    expected.sort();
    assert_eq!(found, expected, "only dave's active matches");
    assert_eq!(
        s.memory_search("dave", "monty", 10).await.unwrap()[0].item,
        pet
    );
    assert!(s
        .memory_search("dave", "script", 10)
        .await
        .unwrap()
        .is_empty());
    let crowd = s.memory_search("dav", "python monty", 500).await.unwrap();
    assert!(!crowd.is_empty());
    assert!(crowd.iter().all(|h| h.item.user_id == "dav"), "{crowd:?}");
    assert!(s
        .memory_search("dav", "monty green", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .memory_search("da", "python tea", 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn memory_store_meets_the_memory_contract() {
    memory_contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn sqlite_store_meets_the_memory_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    memory_contract(Arc::new(
        SqliteStore::open(&path, SyncMode::Normal).unwrap(),
    ))
    .await;
    // And the memories survive reopening the file.
    let store = SqliteStore::open(&path, SyncMode::Normal).unwrap();
    assert_eq!(
        store
            .memory_search("bob", "python", 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn redis_store_meets_the_memory_contract() {
    let Some(store) = redis_store("redis_store_meets_the_memory_contract").await else {
        return;
    };
    memory_contract(store.clone()).await;
    // Forgetting leaves no key of the user: neither its own keys (hash tag
    // `{alice}`) nor the id → user index entries of its memories.
    // Every other user's memories (the contract also leaves bob's, dave's and dav's).
    let mut bob: Vec<String> = Vec::new();
    for user in ["bob", "dave", "dav"] {
        bob.extend(
            store
                .memory_list(user, true)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.id),
        );
    }
    bob.sort();
    assert_eq!(store.forget_user("alice").await.unwrap(), 1);
    let keys = store.keys().await.unwrap();
    assert!(
        keys.iter().all(|k| !k.contains("{alice}")),
        "alice's keys left: {keys:?}"
    );
    let mut index: Vec<String> = keys
        .iter()
        .filter_map(|k| k.split_once(":mi:").map(|(_, id)| id.to_string()))
        .collect();
    index.sort();
    assert_eq!(
        index, bob,
        "the memory index holds only the other users': {keys:?}"
    );
    store.delete_all_keys().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_memory_writes_of_one_user_from_many_tasks_lose_nothing() {
    let Some(store) =
        redis_store("redis_memory_writes_of_one_user_from_many_tasks_lose_nothing").await
    else {
        return;
    };
    // 30 concurrent puts under a limit of 20: exactly 20 stay, 10 evicted.
    let puts = (0..30).map(|i| {
        let store = store.clone();
        async move {
            let m = memory_item("dana", &format!("User fact number {i}"), None, 0.5);
            store.memory_put(&m, 20).await.unwrap()
        }
    });
    let writes = futures::future::join_all(puts).await;
    let evicted: usize = writes.iter().map(|w| w.evicted.len()).sum();
    assert_eq!(evicted, 10);
    let left = store.memory_list("dana", true).await.unwrap();
    assert_eq!(left.len(), 20);
    assert_eq!(store.user_get("dana").await.unwrap().unwrap().memories, 20);
    // Concurrent usage marks: none lost.
    let id = left[0].id.clone();
    let marks = (0..25).map(|_| {
        let store = store.clone();
        let id = id.clone();
        async move { store.memory_mark_used(&[id], troupe_now()).await.unwrap() }
    });
    futures::future::join_all(marks).await;
    let used = store
        .memory_list("dana", true)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == id)
        .unwrap();
    assert_eq!(used.uses, 25);
    store.delete_all_keys().await.unwrap();
}
