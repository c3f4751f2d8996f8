//! SharedState: versioned key/value shared across agents and sessions.

use std::path::Path;

use futures::StreamExt;
use troupe::config::Config;
use troupe::store::SyncMode;
use troupe::Runtime;

async fn sqlite_rt(dir: &Path) -> Runtime {
    let mut c = Config::default();
    c.store.path = dir.join("s.db");
    c.store.sync = SyncMode::Normal;
    Runtime::builder().config(c).build().await.unwrap()
}

#[tokio::test]
async fn set_get_list_delete_and_versions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = sqlite_rt(dir.path()).await;
        let s = rt.shared_state("project_x");
        assert_eq!(s.set("article.draft", "v1 text").await.unwrap(), 1);
        assert_eq!(s.set("article.draft", "v2 text").await.unwrap(), 2);
        s.set("article.title", serde_json::json!({"en": "Qubits"}))
            .await
            .unwrap();
        s.set("notes", 3).await.unwrap();
        rt.shared_state("other")
            .set("article.draft", "elsewhere")
            .await
            .unwrap();
        rt.shutdown().await.unwrap();
    }
    let rt = sqlite_rt(dir.path()).await;
    let s = rt.shared_state("project_x");
    let e = s.get("article.draft").await.unwrap().unwrap();
    assert_eq!((e.value.as_str(), e.version), (Some("v2 text"), 2));
    let keys: Vec<_> = s
        .list("article.")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["article.draft", "article.title"]);
    assert_eq!(s.list("").await.unwrap().len(), 3);
    assert!(s.delete("notes").await.unwrap());
    assert!(!s.delete("notes").await.unwrap());
    assert!(s.get("notes").await.unwrap().is_none());
    assert_eq!(
        rt.shared_state("other")
            .value("article.draft")
            .await
            .unwrap(),
        Some(serde_json::json!("elsewhere"))
    );
}

#[tokio::test]
async fn compare_and_set_refuses_a_stale_version_and_changes_nothing() {
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    let s = rt.shared_state("cas");
    assert_eq!(s.compare_and_set("k", 0, "first").await.unwrap(), 1);
    let err = s.compare_and_set("k", 0, "again").await.unwrap_err();
    assert!(err.is_version_mismatch(), "{err}");
    assert!(err.to_string().contains("cas/k"), "{err}");
    let err = s.compare_and_set("k", 7, "stale").await.unwrap_err();
    assert!(err.is_version_mismatch());
    assert_eq!(
        s.value("k").await.unwrap(),
        Some(serde_json::json!("first"))
    );
    assert_eq!(s.compare_and_set("k", 1, "second").await.unwrap(), 2);
}

#[tokio::test]
async fn a_thousand_concurrent_cas_increments_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let rt = sqlite_rt(dir.path()).await;
    let s = rt.shared_state("counter");
    s.set("n", 0).await.unwrap();
    // 1,000 increments from 50 concurrent writers (each retrying on a stale
    // version): every increment must land exactly once.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0;
            for _ in 0..20 {
                loop {
                    attempts += 1;
                    let e = s.get("n").await.unwrap().unwrap();
                    let n = e.value.as_i64().unwrap();
                    match s.compare_and_set("n", e.version, n + 1).await {
                        Ok(_) => break,
                        Err(err) if err.is_version_mismatch() => tokio::task::yield_now().await,
                        Err(err) => panic!("{err}"),
                    }
                }
            }
            attempts - 20
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    assert_eq!(s.value("n").await.unwrap(), Some(serde_json::json!(1000)));
    assert_eq!(s.get("n").await.unwrap().unwrap().version, 1001);
    // Contention really happened, so the check means something.
    assert!(retries > 0);
}

#[tokio::test]
async fn subscribers_see_every_change_in_order() {
    let rt = Runtime::builder().memory_store().build().await.unwrap();
    let s = rt.shared_state("news");
    let mut sub = Box::pin(s.subscribe().await.unwrap());
    s.set("a", 1).await.unwrap();
    s.set("a", 2).await.unwrap();
    s.delete("a").await.unwrap();
    let mut changes = Vec::new();
    for _ in 0..3 {
        changes.push(sub.next().await.unwrap().unwrap());
    }
    assert_eq!(changes[0].value, Some(serde_json::json!(1)));
    assert_eq!(changes[1].version, 2);
    assert_eq!((changes[2].value.clone(), changes[2].version), (None, 3));
}

#[tokio::test]
async fn agents_of_a_session_see_each_other_and_the_shared_state() {
    let model = troupe::test_utils::ScriptedModel::new();
    let rt = Runtime::builder()
        .memory_store()
        .model(model.clone())
        .build()
        .await
        .unwrap();
    let researcher = rt.agent("researcher").unwrap();
    let writer = rt.agent("writer").unwrap();
    let shared = rt.shared_state("project_x");
    shared.set("style", "plain English").await.unwrap();
    let session = rt
        .session("project_x")
        .agents([researcher, writer])
        .shared_state(shared.clone())
        .open()
        .await
        .unwrap();
    model.push("Qubits are two-level quantum systems.");
    session
        .run_agent("researcher", "Research quantum computing")
        .await
        .unwrap();
    session
        .run_agent("writer", "Write an article based on the research")
        .await
        .unwrap();
    let requests = model.requests();
    let writer_prompt = &requests[1];
    let system = &writer_prompt.messages[0].content;
    assert!(system.contains("writer"), "{system}");
    assert!(
        system.contains("Shared state (project_x):\n- style: plain English"),
        "{system}"
    );
    // The writer sees the researcher's words, named as the researcher's.
    let research = writer_prompt
        .messages
        .iter()
        .find(|m| m.content == "Qubits are two-level quantum systems.")
        .expect("the writer sees the research");
    assert_eq!(research.name.as_deref(), Some("researcher"));
    // Each message records which agent wrote it.
    let h = session.history().await.unwrap();
    let authors: Vec<_> = h
        .iter()
        .map(|m| m.agent.clone().unwrap_or_default())
        .collect();
    assert_eq!(authors, ["researcher", "researcher", "writer", "writer"]);
    // The namespace is remembered with the session.
    drop(session);
    let again = rt.session("project_x").existing().open().await.unwrap();
    assert_eq!(
        again.record().await.unwrap().metadata["shared_state"],
        "project_x"
    );
}
