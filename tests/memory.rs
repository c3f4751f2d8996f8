//! Memory (issue 4) through the runtime, against a fake OpenAI-compatible
//! server that records every prompt: long-term memories recalled in a new
//! session (also after a restart on the same SQLite file), the quality
//! threshold, `max_memories`, the window and the token budget exactly,
//! user isolation, supersede, forgetting, profile that follows the user,
//! and analytics.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};
use troupe::memory::{
    estimate_message_tokens, AddOutcome, Memory, MemoryItem, MemoryKind, MemoryProvider,
};
use troupe::model::{OpenAiModel, OpenAiSettings};
use troupe::{Agent, Config, Runtime};

/// A fake `/v1/chat/completions` server on 127.0.0.1:0 that records the
/// messages of every request and answers `reply N` with a fixed usage.
struct FakeServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Value>>>,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

async fn handle(body: web::Bytes, state: web::Data<Arc<Mutex<Vec<Value>>>>) -> HttpResponse {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = {
        let mut all = state.lock().unwrap();
        all.push(v);
        all.len()
    };
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("reply {n}")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    }))
}

impl FakeServer {
    fn start() -> FakeServer {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recs = requests.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(recs.clone()))
                        .default_service(web::to(handle))
                })
                .workers(1)
                .disable_signals()
                .bind(("127.0.0.1", 0))
                .expect("bind the fake server");
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle()))
                    .expect("report the address");
                let _ = server.await;
            })
        });
        let (addr, handle) = rx.recv().expect("fake server started");
        FakeServer {
            addr,
            requests,
            handle,
            thread: Some(thread),
        }
    }

    fn model(&self) -> Arc<OpenAiModel> {
        Arc::new(
            OpenAiModel::new(OpenAiSettings {
                base_url: format!("http://{}/v1", self.addr),
                model: "fake-model".into(),
                api_key: None,
                temperature: None,
                max_tokens: None,
                timeout: Duration::from_secs(5),
                max_retries: 0,
                backoff: Duration::from_millis(10),
            })
            .unwrap(),
        )
    }

    /// `(role, content)` of each message of request `i`.
    fn prompt(&self, i: usize) -> Vec<(String, String)> {
        let all = self.requests.lock().unwrap();
        all[i]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn last_prompt(&self) -> Vec<(String, String)> {
        let n = self.requests.lock().unwrap().len();
        self.prompt(n - 1)
    }

    fn last_system(&self) -> String {
        self.last_prompt()[0].1.clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config(db: Option<&Path>) -> Config {
    let mut c = Config::default();
    c.agents.dir = "/nonexistent-agents-dir".into();
    c.checkpoint.every = 0;
    if let Some(p) = db {
        c.store.path = p.to_path_buf();
        c.store.sync = troupe::config::SyncMode::Normal;
    }
    c
}

async fn runtime(server: &FakeServer, c: Config, sqlite: bool) -> Runtime {
    let b = Runtime::builder().config(c).model(server.model());
    let b = if sqlite { b } else { b.memory_store() };
    b.build().await.unwrap()
}

fn agent(memory: &Memory) -> Agent {
    Agent::builder("MemoryAgent")
        .instructions("Remember user preferences")
        .memory(memory.clone())
        .build()
}

#[tokio::test]
async fn a_new_session_recalls_the_fact_even_after_a_restart() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    {
        let rt = runtime(&server, config(Some(&db)), true).await;
        let memory = Memory::builder()
            .provider(MemoryProvider::Sqlite)
            .quality_threshold(0.7)
            .max_memories(1000)
            .build();
        let s1 = rt
            .session("user_123")
            .agent(agent(&memory))
            .persist_memory(true)
            .open()
            .await
            .unwrap();
        assert_eq!(s1.user_id().await.unwrap().as_deref(), Some("user_123"));
        s1.chat("I prefer Python over JavaScript").await.unwrap();
        s1.chat("My favourite colour is blue").await.unwrap();
        // The second turn of the same session already recalls the first's fact.
        assert!(server
            .last_system()
            .contains("User prefers Python over JavaScript"));
        rt.shutdown().await.unwrap();
    }
    // A new runtime on the same file, a new session of the same user.
    let rt = runtime(&server, config(Some(&db)), true).await;
    let memory = Memory::builder()
        .provider(MemoryProvider::Sqlite)
        .quality_threshold(0.7)
        .build();
    let s2 = rt
        .session("user_123-b")
        .user("user_123")
        .agent(agent(&memory))
        .open()
        .await
        .unwrap();
    s2.chat("What's my favourite programming language?")
        .await
        .unwrap();
    let prompt = server.last_prompt();
    // No history in the new session: system + the question.
    assert_eq!(prompt.len(), 2, "{prompt:?}");
    let system = &prompt[0].1;
    assert!(system.starts_with("Remember user preferences"), "{system}");
    assert!(
        system.contains("What you remember about this user (long-term memory):"),
        "{system}"
    );
    assert!(
        system.contains("- User prefers Python over JavaScript"),
        "{system}"
    );
    assert!(
        system.contains("- User's favourite colour is blue"),
        "{system}"
    );
    // The recalled memories' use is recorded (in the background).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let items = rt.memories().list("user_123").await.unwrap();
        if items.iter().all(|m| m.uses >= 1 && m.last_used.is_some()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{items:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The provider must match the store.
    let wrong = Memory::builder().provider(MemoryProvider::Memory).build();
    let err = rt
        .session("x")
        .agent(agent(&wrong))
        .open()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("provider"), "{err}");
}

#[tokio::test]
async fn a_threshold_above_the_facts_score_stores_nothing() {
    let server = FakeServer::start();
    let rt = runtime(&server, config(None), false).await;
    // "I prefer …" scores 0.4 × 0.9 + 0.3 × 1 + 0.3 × 0.8 = 0.90.
    let strict = Memory::builder().quality_threshold(0.95).build();
    let s1 = rt
        .session("s1")
        .user("u")
        .agent(agent(&strict))
        .open()
        .await
        .unwrap();
    s1.chat("I prefer Python over JavaScript").await.unwrap();
    assert!(rt.memories().list("u").await.unwrap().is_empty());
    let s2 = rt
        .session("s2")
        .user("u")
        .agent(agent(&strict))
        .open()
        .await
        .unwrap();
    s2.chat("Which language do I prefer?").await.unwrap();
    assert!(
        !server.last_system().contains("Python"),
        "{}",
        server.last_system()
    );
    // Just below the score it is stored.
    let lenient = Memory::builder().quality_threshold(0.89).build();
    let s3 = rt
        .session("s3")
        .user("u")
        .agent(agent(&lenient))
        .open()
        .await
        .unwrap();
    s3.chat("I prefer Python over JavaScript").await.unwrap();
    let items = rt.memories().list("u").await.unwrap();
    assert_eq!(items.len(), 1);
    assert!((items[0].score - 0.9).abs() < 1e-3, "{}", items[0].score);
    // A custom scorer replaces the default.
    lenient.set_quality_scorer(|m: &MemoryItem| if m.content.contains("tea") { 0.0 } else { 1.0 });
    s3.chat("I like tea").await.unwrap();
    s3.chat("I like coffee").await.unwrap();
    let items = rt.memories().list("u").await.unwrap();
    let contents: Vec<&str> = items.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        ["User prefers Python over JavaScript", "User likes coffee"]
    );
    assert_eq!(items[1].score, 1.0);
}

async fn five_thousand(rt: &Runtime) {
    let memory = Memory::builder()
        .max_memories(1000)
        .quality_threshold(0.0)
        .build();
    let memories = rt.memories().with(memory);
    // Scores cycle through 0.000 … 0.999: the survivors must be the best.
    for i in 0..5000u32 {
        let item = MemoryItem {
            id: format!("m{i}"),
            user_id: "heavy".into(),
            content: format!("note number {i}"),
            kind: MemoryKind::Note,
            subject: None,
            relevance: f64::from((i * 7919) % 1000) / 1000.0,
            importance: 0.0,
            score: 0.0,
            created_at: troupe::store::now(),
            last_used: None,
            uses: 0,
            superseded_by: None,
            session_id: None,
        };
        match memories.add_item(item).await.unwrap() {
            AddOutcome::Stored { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let kept = memories.list("heavy").await.unwrap();
    assert_eq!(kept.len(), 1000);
    assert_eq!(
        memories.user("heavy").await.unwrap().unwrap().memories,
        1000
    );
    // relevance r scores 0.4 r + 0.3 (recency ≈ 1): the lowest kept is at least
    // as good as anything evicted (every relevance value appears 5 times).
    let min = kept.iter().map(|m| m.relevance).fold(f64::MAX, f64::min);
    assert!(min >= 0.799, "lowest kept relevance {min}");
    // And the newest copy of each kept value survived over the oldest (ties: oldest go).
    assert!(kept.iter().all(|m| m.relevance >= 0.8));
}

#[tokio::test]
async fn max_memories_holds_after_5000_additions_memory_store() {
    let server = FakeServer::start();
    five_thousand(&runtime(&server, config(None), false).await).await;
}

#[tokio::test]
async fn max_memories_holds_after_5000_additions_sqlite() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    five_thousand(&runtime(&server, config(Some(&dir.path().join("h.db"))), true).await).await;
}

#[tokio::test]
async fn the_window_is_exact() {
    let server = FakeServer::start();
    let mut c = config(None);
    c.memory.window = 2;
    let rt = runtime(&server, c, false).await;
    let s = rt.session("w").open().await.unwrap();
    for i in 0..5 {
        s.chat(format!("question {i}")).await.unwrap();
    }
    s.chat("last").await.unwrap();
    let p = server.last_prompt();
    let tail: Vec<(&str, &str)> = p[1..]
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("user", "question 3"),
            ("assistant", "reply 4"),
            ("user", "question 4"),
            ("assistant", "reply 5"),
            ("user", "last"),
        ]
    );
    // Older turns are still in the history.
    assert_eq!(s.history().await.unwrap().len(), 12);
}

#[tokio::test]
async fn the_token_budget_is_exact() {
    let server = FakeServer::start();
    let mut c = config(None);
    c.memory.window = 50;
    c.memory.max_context_tokens = 120;
    let rt = runtime(&server, c, false).await;
    let s = rt.session("b").open().await.unwrap();
    for i in 0..12 {
        // 40 + 2 characters: 11 + 4 = 15 tokens each.
        s.chat(format!("{i:02}{}", "x".repeat(40))).await.unwrap();
    }
    let history = s.history().await.unwrap();
    s.chat("the new message").await.unwrap();
    let p = server.last_prompt();
    let tokens = |c: &str| estimate_message_tokens(c);
    let fixed = tokens(&p[0].1) + tokens("the new message");
    // The longest suffix of the history that fits the budget.
    let mut used = fixed;
    let mut keep = 0;
    for m in history.iter().rev() {
        if used + tokens(&m.content) > 120 {
            break;
        }
        used += tokens(&m.content);
        keep += 1;
    }
    assert!(keep > 0 && keep < history.len(), "keep {keep}");
    let sent: Vec<&str> = p[1..p.len() - 1].iter().map(|(_, c)| c.as_str()).collect();
    let expected: Vec<&str> = history[history.len() - keep..]
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(sent, expected);
    let total: usize = p.iter().map(|(_, c)| tokens(c)).sum();
    assert!(total <= 120, "{total}");
    let next_older = &history[history.len() - keep - 1].content;
    assert!(total + tokens(next_older) > 120);
}

#[tokio::test]
async fn one_users_memories_never_reach_another_users_prompt() {
    let server = FakeServer::start();
    let rt = runtime(&server, config(None), false).await;
    let a = rt.session("a").user("alice").open().await.unwrap();
    a.chat("My favourite colour is blue").await.unwrap();
    a.chat("I live in Lyon").await.unwrap();
    a.chat("call me Ali").await.unwrap();
    assert_eq!(rt.memories().list("alice").await.unwrap().len(), 3);
    let b = rt.session("b").user("bob").open().await.unwrap();
    b.chat("What colour is my favourite? Where do I live? What is my name?")
        .await
        .unwrap();
    let system = server.last_system();
    for secret in ["blue", "Lyon", "Ali"] {
        assert!(!system.contains(secret), "{secret} leaked: {system}");
    }
    assert!(rt
        .memories()
        .search("bob", "blue lyon ali", 10)
        .await
        .unwrap()
        .is_empty());
    // Alice's next session does recall them.
    let a2 = rt.session("a2").user("alice").open().await.unwrap();
    a2.chat("Where do I live?").await.unwrap();
    assert!(server.last_system().contains("- User lives in Lyon"));
}

#[tokio::test]
async fn a_newer_preference_supersedes_the_older_one() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&server, config(Some(&dir.path().join("s.db"))), true).await;
    let s = rt.session("s").user("dev").open().await.unwrap();
    s.chat("I prefer Python over JavaScript").await.unwrap();
    s.chat("I now prefer Rust").await.unwrap();
    s.chat("Which programming language should I use?")
        .await
        .unwrap();
    let system = server.last_system();
    assert!(system.contains("- User prefers Rust"), "{system}");
    assert!(!system.contains("Python"), "{system}");
    let active = rt.memories().list("dev").await.unwrap();
    assert_eq!(active.len(), 1);
    let all = rt.memories().history("dev").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].content, "User prefers Python over JavaScript");
    assert_eq!(all[0].superseded_by.as_deref(), Some(active[0].id.as_str()));
    assert!(rt
        .memories()
        .search("dev", "python", 5)
        .await
        .unwrap()
        .is_empty());
    // Saying it again changes nothing.
    s.chat("I now prefer Rust").await.unwrap();
    assert_eq!(rt.memories().history("dev").await.unwrap().len(), 2);
}

#[tokio::test]
async fn forgetting_a_user_leaves_nothing_searchable() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&server, config(Some(&dir.path().join("f.db"))), true).await;
    let s = rt.session("f1").user("gone").open().await.unwrap();
    s.chat("My favourite colour is green").await.unwrap();
    s.update_preference("language", "de").await.unwrap();
    s.checkpoint("before").await.unwrap();
    s.add_memory("the meeting is on Friday").await.unwrap();
    let other = rt.session("f2").user("stays").open().await.unwrap();
    other.chat("My favourite colour is green").await.unwrap();
    assert_eq!(rt.memories().list("gone").await.unwrap().len(), 2);

    let report = rt.forget_user("gone", true).await.unwrap();
    assert_eq!(report.memories_deleted, 2);
    assert_eq!(report.sessions_deleted, ["f1"]);
    assert!(rt.memories().history("gone").await.unwrap().is_empty());
    assert!(rt
        .memories()
        .search("gone", "green colour meeting friday", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(rt.memories().user("gone").await.unwrap().is_none());
    assert!(rt
        .list_sessions(&troupe::SessionFilter {
            user_id: Some("gone".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    assert!(rt.store().list_checkpoints("f1").await.unwrap().is_empty());
    // Another user keeps theirs.
    assert_eq!(rt.memories().list("stays").await.unwrap().len(), 1);
    // A new session of the forgotten user starts blank.
    let again = rt.session("f3").user("gone").open().await.unwrap();
    assert!(again.preferences().await.unwrap().is_empty());
    again.chat("What is my favourite colour?").await.unwrap();
    assert!(!server.last_system().contains("green"));
}

#[tokio::test]
async fn profile_and_preferences_follow_the_user() {
    let server = FakeServer::start();
    let rt = runtime(&server, config(None), false).await;
    let s1 = rt.session("p1").user("carol").open().await.unwrap();
    s1.update_profile("name", "Carol").await.unwrap();
    s1.update_preference("timezone", "Europe/Paris")
        .await
        .unwrap();
    s1.chat("I work as a nurse").await.unwrap();
    let s2 = rt.session("p2").user("carol").open().await.unwrap();
    assert_eq!(s2.profile().await.unwrap()["name"], "Carol");
    assert_eq!(s2.preferences().await.unwrap()["timezone"], "Europe/Paris");
    s2.chat("Rust traits and lifetimes").await.unwrap();
    s2.chat("more about rust traits").await.unwrap();
    let ctx = s2.build_context().await.unwrap();
    assert_eq!(ctx.user_id.as_deref(), Some("carol"));
    assert_eq!(ctx.profile["name"], "Carol");
    assert_eq!(ctx.interactions, 2);
    assert_eq!(&ctx.recent_topics[..2], ["rust", "traits"]);
    assert_eq!(ctx.memories[0].content, "User works as a nurse");
    assert!(ctx.system_prompt.contains("- name: Carol"));
    assert!(ctx.system_prompt.contains("- User works as a nurse"));
    // What the agent saw on the last turn is what build_context describes.
    let seen = server.last_system();
    assert!(
        seen.contains("- timezone: Europe/Paris") && seen.contains("- User works as a nurse"),
        "{seen}"
    );
    assert!(seen.contains("Session context: turn 2"), "{seen}");
    // Topics of the user's messages before this turn (one each: alphabetical).
    assert!(
        seen.contains("recent topics: lifetimes, rust, traits."),
        "{seen}"
    );
    // A session without a user has no memory part at all.
    let anon = rt.session("anon").open().await.unwrap();
    anon.chat("I prefer tea").await.unwrap();
    assert!(!server.last_system().contains("Session context"));
    assert!(anon.build_context().await.unwrap().memories.is_empty());
}

#[tokio::test]
async fn analytics_count_turns_agents_latency_tokens_and_feedback() {
    let server = FakeServer::start();
    let rt = runtime(&server, config(None), false).await;
    let tutor = Agent::builder("tutor").instructions("Teach.").build();
    let critic = Agent::builder("critic").instructions("Criticise.").build();
    let s = rt
        .session("an")
        .user("dana")
        .agent(tutor)
        .agent(critic)
        .open()
        .await
        .unwrap();
    let mut replies = Vec::new();
    for q in [
        "Explain Rust ownership",
        "Explain Rust borrowing",
        "And lifetimes?",
    ] {
        replies.push(s.chat(q).await.unwrap());
    }
    for q in ["Is ownership a good idea?", "What about borrowing?"] {
        replies.push(s.chat_with("critic", q).await.unwrap());
    }
    s.feedback(replies[0].message_id, 5.0).await.unwrap();
    s.feedback(replies[3].message_id, 2.0).await.unwrap();
    s.feedback(replies[3].message_id, 3.0).await.unwrap(); // replaces
                                                           // Only replies of this session can be rated; scores must be numbers.
    let user_msg = s.history().await.unwrap()[0].id;
    assert!(s.feedback(user_msg, 1.0).await.is_err());
    assert!(s.feedback(replies[1].message_id, f64::NAN).await.is_err());

    let a = s.analytics().await.unwrap();
    assert_eq!(a.interactions, 5);
    assert_eq!(a.messages, 10);
    assert_eq!(a.user_messages, 5);
    let (t, c) = (&a.agents["tutor"], &a.agents["critic"]);
    assert_eq!(
        (t.replies, t.user_messages, c.replies, c.user_messages),
        (3, 3, 2, 2)
    );
    assert_eq!((t.timed_calls, c.timed_calls), (3, 2));
    assert!(t.mean_latency_ms > 0.0 && t.max_latency_ms >= t.mean_latency_ms);
    assert_eq!((t.prompt_tokens, t.completion_tokens), (33, 21));
    assert_eq!((c.prompt_tokens, c.completion_tokens), (22, 14));
    assert_eq!(a.feedback.count, 2);
    assert_eq!(a.feedback.average, Some(4.0));
    // Keywords of the user's messages, most frequent first, ties alphabetical.
    let top: Vec<(&str, u32)> = a
        .topics
        .iter()
        .take(5)
        .map(|(w, n)| (w.as_str(), *n))
        .collect();
    assert_eq!(
        top,
        [
            ("borrowing", 2),
            ("explain", 2),
            ("ownership", 2),
            ("rust", 2),
            ("good", 1)
        ]
    );
    assert!(a.duration_secs >= 0.0);
    // Every reply records its model latency in its meta.
    assert!(replies
        .iter()
        .all(|r| r.meta.as_ref().unwrap()["latency_ms"].as_f64().unwrap() > 0.0));
}

async fn repeated_note(rt: &Runtime) {
    let memories = rt
        .memories()
        .with(Memory::builder().quality_threshold(0.0).build());
    let note = |id: &str, text: &str| MemoryItem {
        id: id.into(),
        user_id: "notes".into(),
        content: text.into(),
        kind: MemoryKind::Note,
        subject: None,
        relevance: 0.9,
        importance: 0.8,
        score: 0.0,
        created_at: troupe::store::now(),
        last_used: None,
        uses: 0,
        superseded_by: None,
        session_id: None,
    };
    let first = memories
        .add_item(note("n1", "The wifi password is on the fridge"))
        .await
        .unwrap();
    assert!(matches!(first, AddOutcome::Stored { .. }), "{first:?}");
    // The same text again, in another case: a duplicate, nothing written.
    let again = memories
        .add_item(note("n2", "the WIFI password is on the Fridge"))
        .await
        .unwrap();
    assert!(
        matches!(&again, AddOutcome::Duplicate { existing } if existing == "n1"),
        "{again:?}"
    );
    // Another text of the same length is not a duplicate.
    let other = memories
        .add_item(note("n3", "The wifi password is in the fridge"))
        .await
        .unwrap();
    assert!(matches!(other, AddOutcome::Stored { .. }), "{other:?}");
    let ids: Vec<String> = memories
        .list("notes")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&"n2".to_string()));
}

#[tokio::test]
async fn a_repeated_note_without_a_subject_is_a_duplicate() {
    let server = FakeServer::start();
    repeated_note(&runtime(&server, config(None), false).await).await;
    let dir = tempfile::tempdir().unwrap();
    repeated_note(&runtime(&server, config(Some(&dir.path().join("n.db"))), true).await).await;
}

#[tokio::test]
async fn forgetting_waits_for_a_turn_in_flight_so_what_it_learns_is_forgotten_too() {
    let dir = tempfile::tempdir().unwrap();
    let model = troupe::test_utils::ScriptedModel::with_delay(Duration::from_millis(400));
    let rt = Runtime::builder()
        .config(config(Some(&dir.path().join("f.db"))))
        .model(model)
        .build()
        .await
        .unwrap();
    let s = rt.session("inflight").user("ivy").open().await.unwrap();
    // The turn states a fact; its memory is written after the (slow) reply.
    let turn = tokio::spawn({
        let s = s.clone();
        async move { s.chat("My favourite colour is green").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    rt.forget_user("ivy", false).await.unwrap();
    turn.await.unwrap().unwrap();
    assert!(
        rt.memories().history("ivy").await.unwrap().is_empty(),
        "a memory of a turn that was in flight survived forget_user"
    );
    rt.shutdown().await.unwrap();
}
