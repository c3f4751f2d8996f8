//! Sessions that remember: persistence across runtimes and processes,
//! strict turn order, concurrency, failures that change nothing.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use troupe::config::Config;
use troupe::store::{MemoryStore, Role, SessionFilter, SqliteStore, SyncMode};
use troupe::test_utils::{FailingStore, ScriptedModel};
use troupe::{Agent, Error, NewMessage, Runtime, StreamEvent};

fn sqlite_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.store.path = dir.join("troupe.db");
    c.store.sync = SyncMode::Normal;
    c.agents.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
    c
}

async fn sqlite_rt(dir: &Path, model: Option<Arc<ScriptedModel>>) -> Runtime {
    let mut b = Runtime::builder().config(sqlite_config(dir));
    if let Some(m) = model {
        b = b.model(m);
    }
    b.build().await.unwrap()
}

/// Waits for `cond` with a deadline (never a fixed sleep).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_new_runtime_sees_the_history_of_an_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = sqlite_rt(dir.path(), None).await;
        let s = rt.session("alice").open().await.unwrap();
        s.chat("My name is Alice").await.unwrap();
        s.update_preference("language", "en").await.unwrap();
        rt.shutdown().await.unwrap();
    }
    let model = ScriptedModel::new();
    let rt = sqlite_rt(dir.path(), Some(model.clone())).await;
    let s = rt.session("alice").open().await.unwrap();
    s.chat("What's my name?").await.unwrap();
    let h = s.history().await.unwrap();
    assert_eq!(h.len(), 4);
    assert_eq!(h[0].content, "My name is Alice");
    assert_eq!(h[2].content, "What's my name?");
    // The model saw the earlier turn, in order, and the preference.
    let req = &model.requests()[0];
    let contents: Vec<&str> = req.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(req.messages[0].role, Role::System);
    assert!(contents[0].contains("language: en"), "{}", contents[0]);
    assert_eq!(contents[1], "My name is Alice");
    assert_eq!(req.messages[2].role, Role::Assistant);
    assert_eq!(contents[3], "What's my name?");
    assert_eq!(s.metadata().await.unwrap().interactions, 2);
}

#[tokio::test]
async fn a_new_process_sees_the_history_of_an_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = \"db/t.db\"\n[agents]\ndir = \"{}\"\n",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("agents")
                .display()
        ),
    )
    .unwrap();
    let run = |msg: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_troupe"))
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "chat",
                "--session",
                "alice",
            ])
            .args(["--message", msg, "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = run("My name is Alice");
    assert_eq!(first["session_id"], "alice");
    let second = run("What's my name?");
    let reply = second["reply"].as_str().unwrap();
    assert!(reply.contains("2 earlier messages"), "{reply}");
    assert!(reply.contains("My name is Alice"), "{reply}");
    assert_ne!(first["message_id"], second["message_id"]);
}

#[tokio::test]
async fn concurrent_chats_on_one_session_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::with_delay(Duration::from_millis(1));
    let rt = sqlite_rt(dir.path(), Some(model)).await;
    let s = rt.session("busy").open().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.chat(format!("message {i}")).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = s.history().await.unwrap();
    assert_eq!(h.len(), 200);
    let mut seen = HashSet::new();
    for pair in h.chunks(2) {
        assert_eq!(pair[0].role, Role::User);
        assert_eq!(pair[1].role, Role::Assistant);
        // Each reply answers the user message right before it.
        assert_eq!(pair[1].content, format!("reply to: {}", pair[0].content));
        assert_eq!(pair[1].parent, Some(pair[0].id));
        assert!(seen.insert(pair[0].content.clone()));
    }
    assert_eq!(seen.len(), 100);
    // And the same from a fresh runtime reading the file.
    drop(s);
    drop(rt);
    let rt = sqlite_rt(dir.path(), None).await;
    let h2 = rt
        .session("busy")
        .open()
        .await
        .unwrap()
        .history()
        .await
        .unwrap();
    assert_eq!(h, h2);
}

#[tokio::test]
async fn a_thousand_sessions_in_parallel_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = sqlite_rt(dir.path(), None).await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            let s = rt.session(format!("s{i}")).open().await.unwrap();
            for t in 0..3 {
                s.chat(format!("s{i} turn {t}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(rt);
    let rt = sqlite_rt(dir.path(), None).await;
    let all = rt.list_sessions(&SessionFilter::default()).await.unwrap();
    assert_eq!(all.len(), 1000);
    for i in (0..1000).step_by(37) {
        let h = rt
            .session(format!("s{i}"))
            .open()
            .await
            .unwrap()
            .history()
            .await
            .unwrap();
        let users: Vec<_> = h
            .iter()
            .filter(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .collect();
        assert_eq!(
            users,
            (0..3).map(|t| format!("s{i} turn {t}")).collect::<Vec<_>>()
        );
    }
    assert!(all.iter().all(|s| s.interactions == 3));
}

#[tokio::test]
async fn idle_sessions_are_passivated_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = sqlite_config(dir.path());
    c.sessions.idle_secs = 0.05;
    let rt = Runtime::builder().config(c).build().await.unwrap();
    let s = rt.session("sleepy").open().await.unwrap();
    s.chat("hello").await.unwrap();
    assert_eq!(rt.live_sessions(), 1);
    eventually("passivation", || rt.live_sessions() == 0).await;
    // The same handle activates it again, from the store.
    s.chat("again").await.unwrap();
    assert_eq!(s.history().await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_failed_model_call_changes_nothing() {
    let model = ScriptedModel::new();
    let rt = Runtime::builder()
        .memory_store()
        .model(model)
        .build()
        .await
        .unwrap();
    let s = rt.session("f").open().await.unwrap();
    s.chat("ok").await.unwrap();
    let before = s.record().await.unwrap();
    let err = s.chat("please FAIL").await.unwrap_err();
    assert!(matches!(err, Error::Model(_)), "{err}");
    let err = s.chat("please PANIC").await.unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(s.record().await.unwrap(), before);
    assert_eq!(s.history().await.unwrap().len(), 2);
    // And the session (and its arbiter) still serves.
    s.chat("still here").await.unwrap();
    assert_eq!(s.history().await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_failed_store_write_changes_nothing_and_is_reported() {
    let store = Arc::new(FailingStore::new(MemoryStore::new(), 2)); // open + 1 turn
    let rt = Runtime::builder()
        .store(store.clone())
        .build()
        .await
        .unwrap();
    let s = rt.session("w").open().await.unwrap();
    s.chat("one").await.unwrap();
    let before = s.record().await.unwrap();
    let err = s.chat("two").await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(s.record().await.unwrap(), before);
    store.allow(10);
    s.chat("three").await.unwrap();
    let h = s.history().await.unwrap();
    let users: Vec<_> = h
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(users, ["one", "three"]);
}

#[tokio::test]
async fn two_runtimes_writing_one_session_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let a = sqlite_rt(dir.path(), None).await;
    let b = sqlite_rt(dir.path(), None).await;
    let sa = a.session("shared").open().await.unwrap();
    let sb = b.session("shared").open().await.unwrap();
    sa.chat("from a").await.unwrap();
    // b's actor loaded the session before a's turn: its write is stale and refused.
    let err = sb.chat("from b").await.unwrap_err();
    assert!(
        err.to_string().contains("changed by another writer"),
        "{err}"
    );
    // Retrying activates a fresh actor that sees a's turn.
    sb.chat("from b again").await.unwrap();
    let h = sa.history().await.unwrap_or_default();
    let h = if h.len() == 4 {
        h
    } else {
        b.session("shared")
            .open()
            .await
            .unwrap()
            .history()
            .await
            .unwrap()
    };
    let users: Vec<_> = h
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(users, ["from a", "from b again"]);
}

#[tokio::test]
async fn streaming_delivers_pieces_then_a_durable_done() {
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    let s = rt.session("st").open().await.unwrap();
    let mut stream = Box::pin(s.chat_stream("stream me please").await.unwrap());
    let mut text = String::new();
    let mut done = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            StreamEvent::Delta(p) => text.push_str(&p),
            StreamEvent::Done(r) => done = Some(r),
        }
    }
    let done = done.expect("a Done event");
    assert_eq!(done.reply, text);
    assert!(text.contains("stream me please"));
    let h = s.history().await.unwrap();
    assert_eq!(h[1].content, text);
    assert_eq!(h[1].id, done.message_id);
}

#[tokio::test]
async fn an_attached_handle_chats_without_open_and_keeps_no_actor_for_a_missing_session() {
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    rt.session("there")
        .open()
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    // An existing session: the attached handle chats and sees the history.
    let s = rt.session("there").attach().unwrap();
    s.chat("one").await.unwrap();
    let r = s.chat("two").await.unwrap();
    assert!(r.reply.contains("2 earlier messages"), "{}", r.reply);
    // A missing one: the turn fails as not found, nothing is created, and
    // no actor stays live for it.
    s.close().await.unwrap();
    let missing = rt.session("nobody").attach().unwrap();
    let err = missing.chat("hello").await.unwrap_err();
    assert!(
        matches!(err, Error::SessionNotFound(ref id) if id == "nobody"),
        "{err}"
    );
    let mut stream = Box::pin(missing.chat_stream("hello").await.unwrap());
    let first = stream.next().await.unwrap();
    assert!(matches!(first, Err(Error::SessionNotFound(_))), "{first:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rt.live_sessions() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} live actors remain",
            rt.live_sessions()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rt.session("nobody").existing().open().await.is_err());
    // Options that need `open` are refused, naming the session.
    let err = rt.session("there").user("u").attach().unwrap_err();
    assert!(err.to_string().contains("there"), "{err}");
    assert!(rt.session("bad id!").attach().is_err());
    rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_clearly() {
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    for bad in ["../etc/passwd", "a/b", "", ".hidden", &"x".repeat(200)] {
        let err = rt.session(bad).open().await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidSessionId { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = rt.session("nobody").existing().open().await.unwrap_err();
    assert!(
        matches!(err, Error::SessionNotFound(ref id) if id == "nobody"),
        "{err}"
    );
    let s = rt.session("ok").open().await.unwrap();
    let err = s.chat("   ").await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = s.chat_with("nonexistent-agent", "hi").await.unwrap_err();
    assert!(err.to_string().contains("nonexistent-agent"), "{err}");
    assert_eq!(s.history().await.unwrap().len(), 0);
}

#[tokio::test]
async fn state_history_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let rt = sqlite_rt(dir.path(), None).await;
    let agent = Agent::builder("Tutor").instructions("Teach Rust.").build();
    let s = rt
        .session("u1")
        .user("user_1")
        .agent(agent)
        .open()
        .await
        .unwrap();
    s.update_profile("name", "Alice").await.unwrap();
    s.update_preference("timezone", "Europe/Paris")
        .await
        .unwrap();
    s.set_user_data("plan", serde_json::json!({"tier": "pro"}))
        .await
        .unwrap();
    s.set_metadata("title", "Learning Rust").await.unwrap();
    s.chat("hi").await.unwrap();
    let meta = s.metadata().await.unwrap();
    assert_eq!(meta.user_id.as_deref(), Some("user_1"));
    assert_eq!(meta.agents, ["Tutor"]);
    assert_eq!(meta.interactions, 1);
    assert!(meta.updated_at >= meta.created_at);
    s.set_history(vec![
        NewMessage::new(Role::User, "replaced question"),
        NewMessage::new(Role::Assistant, "replaced answer"),
    ])
    .await
    .unwrap();
    s.chat("next").await.unwrap();
    drop(s);
    drop(rt);
    let rt = sqlite_rt(dir.path(), None).await;
    let s = rt.session("u1").open().await.unwrap();
    let rec = s.record().await.unwrap();
    assert_eq!(rec.profile["name"], "Alice");
    assert_eq!(rec.preferences["timezone"], "Europe/Paris");
    assert_eq!(rec.user_data["plan"]["tier"], "pro");
    assert_eq!(rec.metadata["title"], "Learning Rust");
    let h = s.history().await.unwrap();
    let contents: Vec<_> = h.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(&contents[..2], ["replaced question", "replaced answer"]);
    assert_eq!(contents[2], "next");
    assert_eq!(h.len(), 4);
    let list = rt
        .list_sessions(&SessionFilter {
            user_id: Some("user_1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
}

#[tokio::test]
async fn scope_closes_the_session_even_when_the_body_fails() {
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    let r: troupe::Result<()> = rt
        .session("scoped")
        .scope(|s| async move {
            s.chat("inside").await?;
            Err(Error::InvalidRequest("the body failed".into()))
        })
        .await;
    assert!(r.unwrap_err().to_string().contains("the body failed"));
    assert_eq!(rt.live_sessions(), 0);
    let s = rt.session("scoped").existing().open().await.unwrap();
    assert_eq!(s.history().await.unwrap().len(), 2);
}

#[tokio::test]
async fn cleanup_deletes_only_old_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let rt = sqlite_rt(dir.path(), None).await;
    rt.session("old")
        .open()
        .await
        .unwrap()
        .chat("x")
        .await
        .unwrap();
    let cutoff_wait = Instant::now();
    eventually("time to pass", || {
        cutoff_wait.elapsed() > Duration::from_millis(1200)
    })
    .await;
    rt.session("new")
        .open()
        .await
        .unwrap()
        .chat("y")
        .await
        .unwrap();
    let deleted = rt.cleanup(Duration::from_secs(1)).await.unwrap();
    assert_eq!(deleted, ["old"]);
    let left: Vec<_> = rt
        .list_sessions(&SessionFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, ["new"]);
    let err = rt.session("old").existing().open().await.unwrap_err();
    assert!(matches!(err, Error::SessionNotFound(_)));
}

#[tokio::test]
async fn the_store_file_is_not_shared_between_sync_modes_by_accident() {
    // Opening the same file with the other sync mode works (sync is a connection setting).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.db");
    drop(SqliteStore::open(&p, SyncMode::Full).unwrap());
    drop(SqliteStore::open(&p, SyncMode::Normal).unwrap());
}

#[tokio::test]
async fn a_damaged_database_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.db");
    std::fs::write(
        &p,
        b"this is not a database, just text that is long enough to look like one",
    )
    .unwrap();
    let err = match SqliteStore::open(&p, SyncMode::Full) {
        Ok(_) => panic!("a text file opened as a store"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bad.db"), "{err}");
}

#[tokio::test]
async fn session_files_round_trip_between_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    let s = rt.session("alice").user("user_a").open().await.unwrap();
    s.chat("My name is Alice").await.unwrap();
    s.update_preference("language", "fr").await.unwrap();
    s.chat("What's my name?").await.unwrap();
    for name in ["alice.json", "alice.bin"] {
        let path = dir.path().join(name);
        s.save(&path).await.unwrap();
        let other = sqlite_rt(dir.path(), None).await;
        let again = troupe::Session::load(&other, &path).await.unwrap();
        assert_eq!(again.id(), "alice");
        let h1: Vec<_> = s
            .history()
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect();
        let h2: Vec<_> = again
            .history()
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect();
        assert_eq!(h1, h2);
        let rec = again.record().await.unwrap();
        assert_eq!(rec.preferences["language"], "fr");
        assert_eq!(rec.user_id.as_deref(), Some("user_a"));
        assert_eq!(rec.interactions, 2);
        // The loaded session carries on.
        again.chat("and now?").await.unwrap();
        assert_eq!(again.history().await.unwrap().len(), 6);
    }
}

#[tokio::test]
async fn a_damaged_session_file_is_refused_and_the_old_one_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    let s = rt.session("bob").open().await.unwrap();
    s.chat("first").await.unwrap();
    let path = dir.path().join("bob.json");
    s.save(&path).await.unwrap();
    s.chat("second").await.unwrap();
    s.save(&path).await.unwrap(); // the first save is now bob.json.bak
                                  // Damage the current file: cut it in half.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let fresh = Runtime::builder().memory_store().build().await.unwrap();
    let err = troupe::Session::load(&fresh, &path).await.unwrap_err();
    assert!(matches!(err, Error::File(_)), "{err}");
    assert!(err.to_string().contains("bob.json"), "{err}");
    // Nothing was half-loaded.
    assert!(fresh.session("bob").existing().open().await.is_err());
    let bak = dir.path().join("bob.json.bak");
    let old = troupe::Session::load(&fresh, &bak).await.unwrap();
    assert_eq!(old.history().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_panicking_session_actor_is_restarted_from_durable_state() {
    let model = ScriptedModel::new();
    let rt = Runtime::builder()
        .memory_store()
        .model(model.clone())
        .build()
        .await
        .unwrap();
    let s = rt.session("phoenix").open().await.unwrap();
    let other = rt.session("bystander").open().await.unwrap();
    s.chat("acknowledged one").await.unwrap();
    s.chat("acknowledged two").await.unwrap();
    model
        .panic_in_session
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = s.chat("this turn panics").await.unwrap_err();
    assert!(matches!(err, Error::SessionUnavailable { .. }), "{err}");
    model
        .panic_in_session
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // Other sessions on the same arbiters were never affected.
    other.chat("still fine").await.unwrap();
    // The session comes back from the store with every acknowledged turn, and serves.
    s.chat("after the panic").await.unwrap();
    let users: Vec<_> = s
        .history()
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content)
        .collect();
    assert_eq!(
        users,
        ["acknowledged one", "acknowledged two", "after the panic"]
    );
}

#[tokio::test]
async fn sessions_past_their_ttl_are_deleted_by_the_sweeper() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = sqlite_config(dir.path());
    c.sessions.ttl_secs = 1;
    let rt = Runtime::builder().config(c).build().await.unwrap();
    rt.session("ephemeral")
        .open()
        .await
        .unwrap()
        .chat("hi")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = rt.list_sessions(&SessionFilter::default()).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the TTL sweeper never deleted {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = rt.session("ephemeral").existing().open().await.unwrap_err();
    assert!(matches!(err, Error::SessionNotFound(_)), "{err}");
}
