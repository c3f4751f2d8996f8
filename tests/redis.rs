//! The Redis backend beyond the shared contract: expiry with no orphan keys,
//! the per-session lease and its fencing epoch, two runtimes handing one
//! session back and forth, and Redis outages.
//!
//! Needs `TROUPE_TEST_REDIS_URL` (`.ci/run` sets redis://127.0.0.1:6379/15):
//! unset, every test prints why it skips; set but down, they fail. Each test
//! uses its own random key prefix and deletes its keys at the end.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use troupe::config::{Config, StoreBackend};
use troupe::state::SharedChange;
use troupe::store::{
    new_segment_id, now, CheckpointKind, CheckpointRecord, Commit, Message, MessageId,
    RedisOptions, RedisStore, Role, Segment, SessionRecord, Store, StoreError,
};
use troupe::Runtime;

fn redis_url(test: &str) -> Option<String> {
    match std::env::var("TROUPE_TEST_REDIS_URL") {
        Ok(u) => Some(u),
        Err(_) => {
            eprintln!(
                "skipping {test}: set TROUPE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15) to run it"
            );
            None
        }
    }
}

fn fresh_prefix() -> String {
    format!("troupe-test:{}:", uuid::Uuid::new_v4())
}

fn options(url: &str, prefix: &str, node: &str) -> RedisOptions {
    let mut o = RedisOptions::new(url);
    o.key_prefix = prefix.to_string();
    o.node_id = node.to_string();
    o
}

async fn open(o: RedisOptions) -> RedisStore {
    let url = o.url.clone();
    RedisStore::open(o)
        .await
        .unwrap_or_else(|e| panic!("TROUPE_TEST_REDIS_URL={url} is set but unusable: {e}"))
}

/// Polls `f` every 20 ms until it holds, or fails after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn message(id: MessageId, parent: Option<MessageId>, role: Role, content: &str) -> Message {
    Message {
        id,
        parent,
        role,
        agent: None,
        content: content.into(),
        created_at: now(),
        meta: None,
    }
}

/// A writer of one session, as a session actor is.
struct Writer {
    record: SessionRecord,
    segment: Option<i64>,
    next_seq: u32,
}

impl Writer {
    async fn create(store: &dyn Store, id: &str) -> Result<Writer, StoreError> {
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
            .await?;
        Ok(Writer {
            record,
            segment: None,
            next_seq: 0,
        })
    }

    fn from_loaded(record: SessionRecord) -> Writer {
        let (segment, next_seq) = match record.head {
            Some(h) => (Some(h.segment), h.seq + 1),
            None => (None, 0),
        };
        Writer {
            record,
            segment,
            next_seq,
        }
    }

    /// A user message and a reply, optionally on a new branch, optionally
    /// with a checkpoint.
    async fn turn(
        &mut self,
        store: &dyn Store,
        text: &str,
        branch: bool,
        checkpoint: bool,
    ) -> Result<(), StoreError> {
        let mut new_segment = None;
        let (segment, next_seq) = if branch || self.segment.is_none() {
            let id = new_segment_id();
            new_segment = Some(Segment {
                id,
                session_id: self.record.id.clone(),
                parent: self.record.head,
                created_at: now(),
            });
            (id, 0)
        } else {
            (self.segment.unwrap_or_default(), self.next_seq)
        };
        let u = MessageId {
            segment,
            seq: next_seq,
        };
        let a = MessageId {
            segment,
            seq: next_seq + 1,
        };
        let mut next = self.record.clone();
        next.head = Some(a);
        next.interactions += 1;
        next.state_version += 1;
        next.updated_at = now();
        let checkpoints = if checkpoint {
            vec![CheckpointRecord {
                id: uuid::Uuid::new_v4().to_string(),
                session_id: next.id.clone(),
                head: next.head,
                label: Some(text.into()),
                description: None,
                kind: CheckpointKind::Manual,
                state: next.clone(),
                created_at: now(),
            }]
        } else {
            vec![]
        };
        store
            .commit(Commit {
                record: next.clone(),
                expected_version: Some(self.record.state_version),
                small_state_changed: false,
                new_segment,
                messages: vec![
                    message(u, self.record.head, Role::User, text),
                    message(a, Some(u), Role::Assistant, &format!("re: {text}")),
                ],
                checkpoints,
                drop_checkpoints: vec![],
            })
            .await?;
        self.record = next;
        self.segment = Some(segment);
        self.next_seq = next_seq + 2;
        Ok(())
    }
}

// ---- expiry ----

#[tokio::test]
async fn expired_sessions_leave_no_key_behind() {
    let Some(url) = redis_url("expired_sessions_leave_no_key_behind") else {
        return;
    };
    let prefix = fresh_prefix();
    let mut o = options(&url, &prefix, "ttl");
    o.ttl = Some(Duration::from_millis(2000));
    let store = open(o).await;
    let s: &dyn Store = &store;

    // A session with branches and checkpoints, and a fork of it (the fork
    // references the first session's messages).
    let mut w = Writer::create(s, "short-lived").await.unwrap();
    w.turn(s, "one", false, true).await.unwrap();
    w.turn(s, "two", false, false).await.unwrap();
    w.turn(s, "branch", true, true).await.unwrap();
    s.shared_put("ns", "k", Some(serde_json::json!(1)), None)
        .await
        .unwrap();
    let before = store.keys().await.unwrap();
    assert!(
        before.iter().any(|k| k.contains(":m:")) && before.iter().any(|k| k.contains("c:")),
        "{before:?}"
    );

    // Every commit refreshes the expiry: touched twice within the TTL, it lives on.
    for t in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        w.turn(s, &format!("keep-alive {t}"), false, false)
            .await
            .unwrap();
    }
    let loaded = s.load_session("short-lived", 100).await.unwrap().unwrap();
    assert_eq!(loaded.record, w.record);
    assert_eq!(loaded.recent.len(), 12);

    // Untouched, everything of the session goes: SCAN finds only keys that
    // are not the session's (shared state, and the index until a listing).
    store.release("short-lived");
    eventually(
        "the session's keys to expire",
        Duration::from_secs(10),
        || {
            let store = &store;
            let prefix = &prefix;
            async move {
                let keys = store.keys().await.unwrap();
                keys.iter().all(|k| {
                    *k == format!("{prefix}sessions")
                        || *k == format!("{prefix}sh:ns")
                        || *k == format!("{prefix}epochs")
                })
            }
        },
    )
    .await;
    assert!(s.load_session("short-lived", 10).await.unwrap().is_none());
    // The index member cannot expire: the listing drops it lazily.
    assert!(s
        .list_sessions(&Default::default())
        .await
        .unwrap()
        .is_empty());
    // Left: shared state, and the one epoch counter of all sessions.
    let mut left = store.keys().await.unwrap();
    left.sort();
    assert_eq!(
        left,
        vec![format!("{prefix}epochs"), format!("{prefix}sh:ns")],
        "orphan keys: {left:?}"
    );
    store.delete_all_keys().await.unwrap();
}

// ---- lease and fencing ----

#[tokio::test]
async fn a_stale_writer_with_an_old_epoch_is_refused() {
    let Some(url) = redis_url("a_stale_writer_with_an_old_epoch_is_refused") else {
        return;
    };
    let prefix = fresh_prefix();
    // Long leases: renewal does not run during the test, so the "pause" is
    // ours to stage.
    let mut oa = options(&url, &prefix, "node-a");
    oa.lease = Duration::from_secs(60);
    let mut ob = options(&url, &prefix, "node-b");
    ob.lease = Duration::from_secs(60);
    ob.lease_wait = Duration::ZERO;
    let a = open(oa).await;
    let b = open(ob).await;

    let mut wa = Writer::create(&a, "fenced").await.unwrap();
    wa.turn(&a, "from a", false, false).await.unwrap();
    assert_eq!(a.held_epoch("fenced"), Some(1));

    // While A holds the lease, B cannot activate the session.
    match b.load_session("fenced", 10).await {
        Err(StoreError::OwnedElsewhere { node, .. }) => assert_eq!(node, "node-a"),
        other => panic!("expected OwnedElsewhere, got {other:?}"),
    }

    // A "pauses" past its lease: the lease lapses (deleted here, as expiry would).
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}s:{{fenced}}:lease"))
        .query_async(&mut raw)
        .await
        .unwrap();

    // B takes over with a higher epoch and writes a turn.
    let loaded = b.load_session("fenced", 10).await.unwrap().unwrap();
    assert_eq!(b.held_epoch("fenced"), Some(2));
    let mut wb = Writer::from_loaded(loaded.record);
    wb.turn(&b, "from b", false, false).await.unwrap();

    // A wakes up and writes with its old epoch: refused, nothing changed.
    let err = wa.turn(&a, "stale", false, false).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                epoch: 1,
                current: 2,
                ..
            }
        ),
        "{err}"
    );
    // Even with the right state_version, the old epoch is refused.
    let mut forged = Writer::from_loaded(wb.record.clone());
    let err = forged.turn(&a, "forged", false, false).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OwnedElsewhere { .. } | StoreError::Fenced { .. }
        ),
        "{err}"
    );
    let h = b.history(wb.record.head.unwrap(), None).await.unwrap();
    let texts: Vec<_> = h.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["from a", "re: from a", "from b", "re: from b"]);
    // B's writes go on.
    wb.turn(&b, "again", false, false).await.unwrap();
    a.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn one_node_at_a_time_and_the_epoch_grows_with_each_owner() {
    let Some(url) = redis_url("one_node_at_a_time_and_the_epoch_grows_with_each_owner") else {
        return;
    };
    let prefix = fresh_prefix();
    let lease = Duration::from_millis(1500);
    let node = |name: &str, wait: Duration| {
        let mut o = options(&url, &prefix, name);
        o.lease = lease;
        o.lease_wait = wait;
        o
    };
    let a = open(node("node-a", Duration::ZERO)).await;
    let b = open(node("node-b", Duration::ZERO)).await;
    let mut wa = Writer::create(&a, "s1").await.unwrap();
    wa.turn(&a, "a1", false, false).await.unwrap();
    let e1 = a.held_epoch("s1").unwrap();

    // Renewal keeps A's lease alive well past lease_ms: B is refused throughout.
    for _ in 0..3 {
        tokio::time::sleep(lease / 2).await;
        assert!(matches!(
            b.load_session("s1", 10).await,
            Err(StoreError::OwnedElsewhere { .. })
        ));
    }
    // A releases (its actor passivated): B gets it at once, with a higher epoch.
    a.release("s1");
    eventually("B to take the lease", Duration::from_secs(2), || async {
        b.load_session("s1", 10).await.is_ok()
    })
    .await;
    let e2 = b.held_epoch("s1").unwrap();
    assert!(e2 > e1, "{e2} > {e1}");
    // A's later commit is refused, whatever its state.
    let fresh = b.load_session("s1", 10).await.unwrap().unwrap();
    let mut wa2 = Writer::from_loaded(fresh.record.clone());
    assert!(matches!(
        wa2.turn(&a, "a-late", false, false).await,
        Err(StoreError::OwnedElsewhere { .. } | StoreError::Fenced { .. })
    ));
    let mut wb = Writer::from_loaded(fresh.record);
    wb.turn(&b, "b1", false, false).await.unwrap();

    // B dies without releasing: after the lease runs out, a third node
    // (waiting for it) takes over with a higher epoch and every acknowledged turn.
    drop(b);
    let c = open(node("node-c", lease * 4)).await;
    let started = Instant::now();
    let loaded = c.load_session("s1", 10).await.unwrap().unwrap();
    assert!(started.elapsed() < lease * 3, "{:?}", started.elapsed());
    let e3 = c.held_epoch("s1").unwrap();
    assert!(e3 > e2);
    assert_eq!(loaded.record, wb.record);
    let texts: Vec<_> = loaded.recent.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["a1", "re: a1", "b1", "re: b1"]);
    c.delete_all_keys().await.unwrap();
}

async fn raw_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn raw_get(url: &str, key: &str) -> Option<String> {
    let mut c = raw_conn(url).await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_stale_node_cannot_write_over_a_deleted_and_recreated_session() {
    let Some(url) = redis_url("a_stale_node_cannot_write_over_a_deleted_and_recreated_session")
    else {
        return;
    };
    let prefix = fresh_prefix();
    let mut oa = options(&url, &prefix, "node-a");
    oa.lease = Duration::from_secs(60);
    let mut ob = options(&url, &prefix, "node-b");
    ob.lease = Duration::from_secs(60);
    ob.lease_wait = Duration::ZERO;
    let a = open(oa).await;
    let b = open(ob).await;

    // A activates and writes: version 3, its epoch held.
    let mut wa = Writer::create(&a, "reborn").await.unwrap();
    wa.turn(&a, "a1", false, false).await.unwrap();
    wa.turn(&a, "a2", false, false).await.unwrap();
    assert_eq!(wa.record.state_version, 3);
    let ea = a.held_epoch("reborn").unwrap();

    // B deletes the session, recreates it, writes it up to the same version
    // and lets it go (its lease is free again).
    assert!(b.delete_session("reborn", None).await.unwrap());
    let mut wb = Writer::create(&b, "reborn").await.unwrap();
    wb.turn(&b, "b1", false, false).await.unwrap();
    wb.turn(&b, "b2", false, false).await.unwrap();
    assert_eq!(wb.record.state_version, 3);
    assert_ne!(b.held_epoch("reborn"), Some(ea), "epochs never repeat");
    b.release("reborn");
    b.flush().await.unwrap();

    // A's stale actor writes with its old epoch and the same version: on
    // its old segment, and on a new branch. Both are refused as conflicts.
    let mut on_branch = Writer {
        record: wa.record.clone(),
        segment: wa.segment,
        next_seq: wa.next_seq,
    };
    for (w, branch) in [(&mut wa, false), (&mut on_branch, true)] {
        let err = w
            .turn(&a, "stale", branch, false)
            .await
            .err()
            .unwrap_or_else(|| {
                panic!(
                    "branch {branch}: the stale write was accepted (epoch {ea}, now {:?})",
                    a.held_epoch("reborn")
                )
            });
        assert!(
            matches!(
                err,
                StoreError::Fenced { .. }
                    | StoreError::Conflict { .. }
                    | StoreError::OwnedElsewhere { .. }
            ),
            "branch {branch}: {err}"
        );
    }
    // The recreated session is intact, and B (or anyone) goes on with it.
    let loaded = b.load_session("reborn", 100).await.unwrap().unwrap();
    assert_eq!(loaded.record, wb.record);
    let texts: Vec<_> = loaded.recent.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["b1", "re: b1", "b2", "re: b2"]);
    wb.turn(&b, "b3", false, false).await.unwrap();
    b.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn a_commit_on_a_stale_picture_of_the_messages_is_a_conflict() {
    let Some(url) = redis_url("a_commit_on_a_stale_picture_of_the_messages_is_a_conflict") else {
        return;
    };
    let prefix = fresh_prefix();
    let a = open(options(&url, &prefix, "node-a")).await;
    let mut w = Writer::create(&a, "s").await.unwrap();
    w.turn(&a, "one", false, false).await.unwrap();
    // Right version, but the messages do not land at the end of the segment.
    let mut behind = Writer {
        record: w.record.clone(),
        segment: w.segment,
        next_seq: 0,
    };
    let err = behind.turn(&a, "again", false, false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    // A segment the session does not own.
    let mut foreign = Writer {
        record: w.record.clone(),
        segment: Some(new_segment_id()),
        next_seq: 0,
    };
    let err = foreign
        .turn(&a, "elsewhere", false, false)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    w.turn(&a, "two", false, false).await.unwrap();
    a.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn every_activation_takes_a_new_epoch_so_a_late_release_frees_nothing() {
    let Some(url) = redis_url("every_activation_takes_a_new_epoch_so_a_late_release_frees_nothing")
    else {
        return;
    };
    let prefix = fresh_prefix();
    let mut oa = options(&url, &prefix, "node-a");
    oa.lease = Duration::from_secs(60);
    let mut ob = options(&url, &prefix, "node-b");
    ob.lease = Duration::from_secs(60);
    ob.lease_wait = Duration::ZERO;
    let a = open(oa).await;
    let b = open(ob).await;
    let lease_key = format!("{prefix}s:{{again}}:lease");
    let mut w = Writer::create(&a, "again").await.unwrap();
    w.turn(&a, "one", false, false).await.unwrap();
    let e1 = a.held_epoch("again").unwrap();
    // Activating again while this instance's lease is live: a new epoch.
    a.load_session("again", 10).await.unwrap().unwrap();
    let e2 = a.held_epoch("again").unwrap();
    assert!(e2 > e1, "{e2} > {e1}");
    assert!(raw_get(&url, &lease_key)
        .await
        .is_some_and(|l| l.ends_with(&format!("|{e2}"))));

    // The old actor leaves (its release goes in the background) while the
    // new one activates: the late release must not delete the new lease.
    for _ in 0..20 {
        a.release("again");
        a.load_session("again", 10).await.unwrap().unwrap();
        a.flush().await.unwrap();
        let held = a.held_epoch("again").unwrap();
        let lease = raw_get(&url, &lease_key).await;
        assert_eq!(
            lease
                .as_deref()
                .and_then(|l| l.rsplit_once('|'))
                .map(|(_, e)| e.to_string()),
            Some(held.to_string()),
            "the live actor's lease is gone: {lease:?}"
        );
        // So no second node can activate it meanwhile.
        assert!(matches!(
            b.load_session("again", 10).await,
            Err(StoreError::OwnedElsewhere { .. })
        ));
    }
    a.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn a_refused_commit_leaves_no_key_behind() {
    let Some(url) = redis_url("a_refused_commit_leaves_no_key_behind") else {
        return;
    };
    let prefix = fresh_prefix();
    let a = open(options(&url, &prefix, "node-a")).await;
    let c = open(options(&url, &prefix, "node-c")).await;
    let mut w = Writer::create(&a, "gone").await.unwrap();
    w.turn(&a, "one", false, false).await.unwrap();
    assert!(a.delete_session("gone", None).await.unwrap());
    // A writer holding no epoch (another node, or one whose lease was
    // forgotten) commits to the deleted session: refused, nothing created.
    let mut stale = Writer {
        record: w.record.clone(),
        segment: None,
        next_seq: 0,
    };
    let err = stale.turn(&c, "late", true, false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let left: Vec<String> = c
        .keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("{gone}"))
        .collect();
    assert!(left.is_empty(), "orphan keys: {left:?}");
    a.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn forget_user_never_reuses_a_write_count() {
    let Some(url) = redis_url("forget_user_never_reuses_a_write_count") else {
        return;
    };
    let prefix = fresh_prefix();
    let a = open(options(&url, &prefix, "node-a")).await;
    let key = format!("{prefix}u:{{alice}}:v");
    let put = |n: usize| {
        let a = &a;
        async move {
            let item = troupe::store::MemoryItem {
                id: uuid::Uuid::new_v4().to_string(),
                user_id: "alice".into(),
                content: format!("fact number {n}"),
                kind: troupe::store::MemoryKind::Fact,
                subject: None,
                relevance: 0.5,
                importance: 0.5,
                score: 0.5,
                created_at: now(),
                last_used: None,
                uses: 0,
                superseded_by: None,
                session_id: None,
            };
            a.memory_put(&item, 100).await.unwrap();
        }
    };
    let mut seen = Vec::new();
    for n in 0..3 {
        put(n).await;
        seen.push(raw_get(&url, &key).await.unwrap());
    }
    assert_eq!(a.forget_user("alice").await.unwrap(), 3);
    for n in 0..3 {
        put(n).await;
        let v = raw_get(&url, &key).await.unwrap();
        assert!(
            !seen.contains(&v),
            "write count {v} came back after forget_user ({seen:?})"
        );
    }
    assert_eq!(a.memory_list("alice", true).await.unwrap().len(), 3);
    a.delete_all_keys().await.unwrap();
}

// ---- two runtimes, one session ----

fn redis_config(url: &str, prefix: &str, node: &str) -> Config {
    let mut c = Config::default();
    c.store.backend = StoreBackend::Redis;
    c.store.url = url.into();
    c.store.key_prefix = prefix.into();
    c.store.lease_ms = 5_000;
    c.server.node_id = node.into();
    c.agents.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_alternate_500_turns_on_one_session() {
    let Some(url) = redis_url("two_runtimes_alternate_500_turns_on_one_session") else {
        return;
    };
    let prefix = fresh_prefix();
    let a = Runtime::builder()
        .config(redis_config(&url, &prefix, "a"))
        .build()
        .await
        .unwrap();
    let b = Runtime::builder()
        .config(redis_config(&url, &prefix, "b"))
        .build()
        .await
        .unwrap();
    assert_eq!(a.store().name(), "redis");
    let sa = a.session("shared-conversation").open().await.unwrap();
    let sb = b.session("shared-conversation").open().await.unwrap();
    for i in 0..500 {
        let s = if i % 2 == 0 { &sa } else { &sb };
        s.chat(format!("turn {i}"))
            .await
            .unwrap_or_else(|e| panic!("turn {i}: {e}"));
    }
    // Read through either node: one conversation, in order.
    let history = sa.history().await.unwrap();
    assert_eq!(history.len(), 1000);
    for (i, pair) in history.chunks(2).enumerate() {
        assert_eq!(pair[0].role, Role::User, "message {}", 2 * i);
        assert_eq!(pair[0].content, format!("turn {i}"));
        assert_eq!(pair[1].role, Role::Assistant, "message {}", 2 * i + 1);
        assert_eq!(pair[1].parent, Some(pair[0].id));
    }
    let again = sb.history().await.unwrap();
    assert_eq!(again, history);
    // Each turn ran on the node that held the lease: the session changed
    // owner at every turn, each new owner with a higher epoch.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let epoch: u64 = redis::cmd("GET")
        .arg(format!("{prefix}s:{{shared-conversation}}:epoch"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(epoch >= 500, "epoch {epoch}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let store = open(options(&url, &prefix, "cleanup")).await;
    store.delete_all_keys().await.unwrap();
}

// ---- outage ----

#[tokio::test]
async fn a_store_pointed_at_a_closed_port_fails_fast_and_names_it() {
    // Needs no Redis at all.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let started = Instant::now();
    let err = RedisStore::open(RedisOptions::new(url.clone()))
        .await
        .err()
        .expect("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    // The same through the runtime's configuration.
    let mut c = Config::default();
    c.store.backend = StoreBackend::Redis;
    c.store.url = url.clone();
    let err = Runtime::builder().config(c).build().await.unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1)
}

/// A private redis-server (append-only file, fsync always) on `port`.
fn start_redis(port: u16, dir: &Path) -> Child {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "private redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test]
async fn redis_down_fails_fast_and_the_store_recovers_with_every_acknowledged_turn() {
    if redis_url("redis_down_fails_fast_and_the_store_recovers_with_every_acknowledged_turn")
        .is_none()
    {
        return;
    }
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "TROUPE_TEST_REDIS_URL is set but redis-server is not installed for the outage test"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start_redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/0");
    let store = open(options(&url, "outage:", "node-a")).await;
    let s: &dyn Store = &store;
    let mut w = Writer::create(s, "steady").await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let t = format!("before {i}");
        w.turn(s, &t, false, false).await.unwrap();
        acked.push(t);
    }

    // Down: every operation fails fast, with the URL, and nothing is acknowledged.
    server.kill().unwrap();
    server.wait().unwrap();
    for i in 0..3 {
        let started = Instant::now();
        let err = w
            .turn(s, &format!("lost {i}"), false, false)
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // Refused: Unavailable. The first write may meet the dead
        // connection instead, where it cannot tell whether it was sent:
        // OutcomeUnknown (Redis was killed before, so it was not applied).
        assert!(
            matches!(
                err,
                StoreError::Unavailable { ref url, .. } | StoreError::OutcomeUnknown { ref url, .. }
                    if url.contains(&port.to_string())
            ),
            "{err}"
        );
        let err = s.load_session("steady", 1).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    }

    // Back (from its append-only file): the same store works again by itself.
    let mut server = start_redis(port, dir.path());
    eventually(
        "the store to reconnect",
        Duration::from_secs(10),
        || async { s.load_session("steady", 1).await.is_ok() },
    )
    .await;
    for i in 0..5 {
        let t = format!("after {i}");
        w.turn(s, &t, false, false).await.unwrap();
        acked.push(t);
    }
    let loaded = s.load_session("steady", 1000).await.unwrap().unwrap();
    assert_eq!(loaded.record, w.record);
    let users: Vec<String> = loaded
        .recent
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .collect();
    assert_eq!(users, acked);
    let _ = server.kill();
    let _ = server.wait();
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} of the private redis-server");
}

#[tokio::test]
async fn a_commit_without_answer_is_resolved_by_reading_back_or_reported_as_unknown() {
    if redis_url("a_commit_without_answer_is_resolved_by_reading_back_or_reported_as_unknown")
        .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start_redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut o = options(&url, "paused:", "node-a");
    o.response_timeout = Duration::from_millis(400);
    let store = open(o).await;
    let s: &dyn Store = &store;
    let mut w = Writer::create(s, "paused").await.unwrap();
    w.turn(s, "before", false, false).await.unwrap();

    // Redis stops answering past the response timeout, then resumes: the
    // commit was sent, so it runs when Redis resumes. The store reads the
    // session back and finds it applied: Ok, not a failure inviting a retry.
    signal(&server, "-STOP");
    let resume = std::thread::spawn({
        let pid = server.id();
        move || {
            std::thread::sleep(Duration::from_millis(600));
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    });
    w.turn(s, "during a pause", false, false)
        .await
        .expect("applied, and found so by reading back");
    resume.join().unwrap();

    // Paused for longer than the store waits: it cannot tell.
    signal(&server, "-STOP");
    let mut unknown = Writer {
        record: w.record.clone(),
        segment: w.segment,
        next_seq: w.next_seq,
    };
    let err = unknown
        .turn(s, "during a long pause", false, false)
        .await
        .unwrap_err();
    signal(&server, "-CONT");
    assert!(
        matches!(err, StoreError::OutcomeUnknown { ref url, .. } if url.contains(&port.to_string())),
        "{err}"
    );
    // It may well have been applied (here it was): whoever retries reloads first.
    let loaded = eventually_loaded(s, "paused").await;
    let users: Vec<_> = loaded
        .recent
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(users, ["before", "during a pause", "during a long pause"]);
    let _ = server.kill();
    let _ = server.wait();
}

async fn eventually_loaded(s: &dyn Store, id: &str) -> troupe::store::LoadedSession {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.load_session(id, 100).await {
            Ok(Some(l)) => return l,
            other => {
                assert!(Instant::now() < deadline, "cannot load {id}: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_on_a_dead_redis_answers_turns_with_a_clear_error() {
    if redis_url("a_runtime_on_a_dead_redis_answers_turns_with_a_clear_error").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start_redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/0");
    let rt = Runtime::builder()
        .config(redis_config(&url, "rt-outage:", "a"))
        .build()
        .await
        .unwrap();
    let s = rt.session("s").open().await.unwrap();
    s.chat("saved").await.unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    let started = Instant::now();
    let err = s.chat("not saved").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(err.to_string().contains(&url), "{err}");
    let mut server = start_redis(port, dir.path());
    // The node recovers by itself; the failed turn is not there, the saved one is.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.chat("after").await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let texts: Vec<String> = s
        .history()
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content)
        .collect();
    assert_eq!(texts, ["saved", "after"]);
    drop(rt);
    let _ = server.kill();
    let _ = server.wait();
}

// ---- shared state across nodes ----

fn change(key: &str, version: u64, value: Option<serde_json::Value>) -> SharedChange {
    SharedChange {
        key: key.into(),
        value,
        version,
    }
}

/// Reads `sub` until a change of `until` arrives (each within 10 s).
async fn changes_until<S>(sub: &mut S, until: &str) -> Vec<SharedChange>
where
    S: Stream<Item = troupe::Result<SharedChange>> + Unpin,
{
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("no change of '{until}' within 10 s; got {out:?}"))
            .expect("the subscription ended")
            .expect("a change, not an error");
        let done = next.key == until;
        out.push(next);
        if done {
            return out;
        }
    }
}

fn of_key(changes: &[SharedChange], key: &str) -> Vec<SharedChange> {
    changes.iter().filter(|c| c.key == key).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_every_nodes_shared_state_changes_once_in_order() {
    let Some(url) = redis_url("a_subscriber_sees_every_nodes_shared_state_changes_once_in_order")
    else {
        return;
    };
    let prefix = fresh_prefix();
    let a = Runtime::builder()
        .config(redis_config(&url, &prefix, "a"))
        .build()
        .await
        .unwrap();
    let b = Runtime::builder()
        .config(redis_config(&url, &prefix, "b"))
        .build()
        .await
        .unwrap();
    let (sa, sb) = (a.shared_state("board"), b.shared_state("board"));
    // Written before the subscription: not a change the subscriber sees.
    assert_eq!(sb.set("k", "zero").await.unwrap(), 1);
    let mut sub = Box::pin(sa.subscribe().await.unwrap());

    // Set, compare-and-set (one refused) and delete through B only.
    assert_eq!(sb.set("k", "one").await.unwrap(), 2);
    assert_eq!(sb.compare_and_set("k", 2, "two").await.unwrap(), 3);
    let stale = sb.compare_and_set("k", 2, "stale").await.unwrap_err();
    assert!(stale.is_version_mismatch(), "{stale}");
    assert!(sb.delete("k").await.unwrap());
    assert_eq!(sb.set("end-1", true).await.unwrap(), 1);
    let got = changes_until(&mut sub, "end-1").await;
    assert_eq!(
        got,
        [
            change("k", 2, Some("one".into())),
            change("k", 3, Some("two".into())),
            change("k", 4, None),
            change("end-1", 1, Some(true.into())),
        ]
    );

    // Both nodes write the same keys in turn: A's own writes come once (not
    // again when Redis reports them back), B's between them, each key in
    // version order with no gap. B's last write closes the round: the feed
    // delivers in Redis's order, so everything else came before it.
    for i in 0..20u64 {
        let (first, second) = if i % 2 == 0 { (&sa, &sb) } else { (&sb, &sa) };
        assert_eq!(first.set("x", i).await.unwrap(), i + 1);
        assert_eq!(second.set("y", i).await.unwrap(), i + 1);
    }
    assert_eq!(sa.set("k", "back").await.unwrap(), 5);
    assert_eq!(sb.set("end-2", true).await.unwrap(), 1);
    let got = changes_until(&mut sub, "end-2").await;
    for key in ["x", "y"] {
        let expected: Vec<SharedChange> = (0..20u64)
            .map(|i| change(key, i + 1, Some(i.into())))
            .collect();
        assert_eq!(of_key(&got, key), expected, "changes of '{key}'");
    }
    assert_eq!(of_key(&got, "k"), [change("k", 5, Some("back".into()))]);
    assert_eq!(got.len(), 42, "{got:?}");

    // A second subscriber on A starts from now, and sees B's next write once.
    let mut late = Box::pin(sa.subscribe().await.unwrap());
    assert_eq!(sb.set("end-3", 3).await.unwrap(), 1);
    assert_eq!(
        changes_until(&mut late, "end-3").await,
        [change("end-3", 1, Some(3.into()))]
    );
    assert_eq!(
        changes_until(&mut sub, "end-3").await,
        [change("end-3", 1, Some(3.into()))]
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let store = open(options(&url, &prefix, "cleanup")).await;
    store.delete_all_keys().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_state_subscriptions_survive_a_redis_restart() {
    if redis_url("shared_state_subscriptions_survive_a_redis_restart").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start_redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/0");
    let a = Runtime::builder()
        .config(redis_config(&url, "shared-outage:", "a"))
        .build()
        .await
        .unwrap();
    let b = Runtime::builder()
        .config(redis_config(&url, "shared-outage:", "b"))
        .build()
        .await
        .unwrap();
    let (sa, sb) = (a.shared_state("ns"), b.shared_state("ns"));
    let mut sub = Box::pin(sa.subscribe().await.unwrap());
    assert_eq!(sb.set("k", 1).await.unwrap(), 1);
    assert_eq!(
        changes_until(&mut sub, "k").await,
        [change("k", 1, Some(1.into()))]
    );

    server.kill().unwrap();
    server.wait().unwrap();
    assert!(sb.set("k", 2).await.is_err(), "a write with Redis down");
    let mut server = start_redis(port, dir.path());
    // B's first write after the restart may land before A's feed is back:
    // then A finds it when it re-reads the namespace. Either way, once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        match sb.set("k", 2).await {
            Ok(v) => break v,
            Err(e) => {
                assert!(Instant::now() < deadline, "B does not recover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(v, 2);
    assert_eq!(
        changes_until(&mut sub, "k").await,
        [change("k", 2, Some(2.into()))]
    );
    // And the live feed is back: a later write arrives through it.
    eventually("the feed to reconnect", Duration::from_secs(10), || {
        let sb = sb.clone();
        async move { sb.set("tick", 0).await.is_ok() }
    })
    .await;
    let got = changes_until(&mut sub, "tick").await;
    assert!(got.iter().all(|c| c.key == "tick"), "{got:?}");
    assert_eq!(sb.set("k", 3).await.unwrap(), 3);
    assert_eq!(
        changes_until(&mut sub, "k").await,
        [change("k", 3, Some(3.into()))]
    );
    drop((a, b));
    let _ = server.kill();
    let _ = server.wait();
}

#[allow(dead_code)]
fn _assert_store_is_shareable(s: RedisStore) -> Arc<dyn Store> {
    Arc::new(s)
}
