//! The daemon over real HTTP: the server on 127.0.0.1:0 with a SQLite store
//! in a temp dir and the echo model (or a scripted / unreachable one),
//! reqwest as the client. Sessions, chat (JSON and SSE), history paging,
//! checkpoints/versions/fork/merge, preferences, shared state with
//! preconditions, runs, health/metrics/OpenAPI, auth, and robustness.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use troupe::config::{Config, SyncMode};
use troupe::model::{ChatModel, OpenAiModel, OpenAiSettings};
use troupe::server::auth::{issue_token, issue_token_until};
use troupe::server::{Auth, Server, ServerHandle, TokenKeys};
use troupe::store::MemoryStore;
use troupe::test_utils::{FailingStore, ScriptedModel};
use troupe::Runtime;

fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.store.path = dir.join("troupe.db");
    c.store.sync = SyncMode::Normal;
    c.agents.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
    c.server.workers = 2;
    c
}

async fn runtime(config: Config, model: Option<Arc<dyn ChatModel>>) -> Runtime {
    let mut b = Runtime::builder().config(config);
    if let Some(m) = model {
        b = b.model(m);
    }
    b.build().await.unwrap()
}

fn start(rt: &Runtime, auth: Auth) -> ServerHandle {
    Server::new(rt.clone(), rt.config().server.clone())
        .auth(auth)
        .bind("127.0.0.1:0")
        .unwrap()
        .run()
        .unwrap()
}

fn http() -> reqwest::Client {
    troupe::init_tls();
    reqwest::Client::builder()
        .build()
        .or_else(|_| {
            reqwest::Client::builder()
                .tls_certs_only(Vec::<reqwest::Certificate>::new())
                .build()
        })
        .unwrap()
}

/// A test client of one server.
struct Api {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

struct Reply {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

impl Api {
    fn new(server: &ServerHandle) -> Api {
        Api {
            http: http(),
            base: server.url(),
            bearer: None,
        }
    }

    fn with_bearer(&self, bearer: &str) -> Api {
        Api {
            http: self.http.clone(),
            base: self.base.clone(),
            bearer: Some(bearer.to_string()),
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.bearer {
            Some(b) => rb.bearer_auth(b),
            None => rb,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Reply {
        let res = rb.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
        };
        Reply {
            status,
            body,
            headers,
            text,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut rb = self.request(method, path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        self.send(rb).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn create(&self, id: &str) -> Reply {
        let r = self.post("/v1/sessions", json!({ "session_id": id })).await;
        assert!(r.status == 201 || r.status == 200, "create {id}: {r:?}");
        r
    }

    async fn chat(&self, id: &str, message: &str) -> Reply {
        self.post(
            &format!("/v1/sessions/{id}/chat"),
            json!({ "message": message }),
        )
        .await
    }

    async fn history(&self, id: &str) -> Vec<Value> {
        let r = self
            .get(&format!("/v1/sessions/{id}/history?limit=1000"))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        r.body["messages"].as_array().unwrap().clone()
    }
}

/// Parses a whole SSE body into (event name, data) pairs.
fn sse_events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = String::from("message");
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            (event, data.join("\n"))
        })
        .collect()
}

fn contents(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn sessions_are_created_listed_read_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);

    let r = api
        .post(
            "/v1/sessions",
            json!({"session_id": "alice-1", "agent": "writer", "user_id": "alice"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["session_id"], "alice-1");
    assert_eq!(r.body["user_id"], "alice");
    assert_eq!(r.body["agents"], json!(["writer"]));
    assert_eq!(r.body["interactions"], 0);
    assert!(r.body["created_at"].is_string() && r.body["updated_at"].is_string());
    // Again: 200, the same session.
    let again = api
        .post("/v1/sessions", json!({"session_id": "alice-1"}))
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["created_at"], r.body["created_at"]);
    assert_eq!(again.body["agents"], json!(["writer"]));
    // No id: a fresh one; no body at all works too.
    let fresh = api.call(Method::POST, "/v1/sessions", None).await;
    assert_eq!(fresh.status, 201, "{fresh:?}");
    let fresh_id = fresh.body["session_id"].as_str().unwrap().to_string();
    assert_eq!(fresh_id.len(), 36, "a uuid: {fresh_id}");
    api.post(
        "/v1/sessions",
        json!({"session_id": "bob-1", "user_id": "bob"}),
    )
    .await;

    let get = api.get("/v1/sessions/alice-1").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.body["preferences"], json!({}));
    assert_eq!(get.body["profile"], json!({}));
    assert_eq!(get.body["user_id"], "alice");

    let all = api.get("/v1/sessions").await;
    let ids: Vec<&str> = all.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let bobs = api.get("/v1/sessions?user_id=bob").await;
    assert_eq!(bobs.body["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(bobs.body["sessions"][0]["session_id"], "bob-1");
    let one = api.get("/v1/sessions?limit=1").await;
    assert_eq!(one.body["sessions"].as_array().unwrap().len(), 1);

    // Unknown agent, invalid id.
    let bad_agent = api
        .post(
            "/v1/sessions",
            json!({"session_id": "c", "agent": "nobody"}),
        )
        .await;
    assert_eq!(bad_agent.status, 404);
    assert!(bad_agent.message().contains("nobody"), "{bad_agent:?}");
    let bad_id = api.post("/v1/sessions", json!({"session_id": "a b"})).await;
    assert_eq!(bad_id.status, 400);
    assert_eq!(bad_id.code(), "bad_request");
    assert!(bad_id.message().contains("a b"), "{bad_id:?}");

    let del = api.call(Method::DELETE, "/v1/sessions/alice-1", None).await;
    assert_eq!(del.status, 204, "{del:?}");
    let gone = api.get("/v1/sessions/alice-1").await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.code(), "not_found");
    assert!(gone.message().contains("alice-1"), "{gone:?}");
    let del2 = api.call(Method::DELETE, "/v1/sessions/alice-1", None).await;
    assert_eq!(del2.status, 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn chat_answers_json_and_history_pages_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("pager").await;
    let mut reply_ids = Vec::new();
    for i in 0..5 {
        let r = api.chat("pager", &format!("message {i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["session_id"], "pager");
        assert_eq!(r.body["agent"], "assistant");
        let reply = r.body["reply"].as_str().unwrap();
        assert!(reply.starts_with(&format!("echo: message {i}")), "{reply}");
        if i > 0 {
            assert!(reply.contains("the first: \"message 0\""), "{reply}");
        }
        reply_ids.push(r.body["message_id"].as_str().unwrap().to_string());
    }
    // 10 messages; pages of 4 from the newest: [6..10], [2..6], [0..2].
    let p1 = api.get("/v1/sessions/pager/history?limit=4").await;
    assert_eq!(p1.status, 200, "{p1:?}");
    let m1 = p1.body["messages"].as_array().unwrap().clone();
    assert_eq!(
        contents(&m1)[0],
        "message 3",
        "oldest first within the page"
    );
    assert_eq!(m1.len(), 4);
    assert_eq!(m1[3]["id"], json!(reply_ids[4]));
    assert_eq!(m1[3]["role"], "assistant");
    assert_eq!(m1[3]["agent"], "assistant");
    assert!(m1[3]["created_at"].is_string());
    let next = p1.body["next"].as_str().unwrap().to_string();
    assert_eq!(next, m1[0]["id"].as_str().unwrap());
    let p2 = api
        .get(&format!("/v1/sessions/pager/history?limit=4&before={next}"))
        .await;
    let m2 = p2.body["messages"].as_array().unwrap().clone();
    assert_eq!(contents(&m2)[0], "message 1");
    let next2 = p2.body["next"].as_str().unwrap().to_string();
    let p3 = api
        .get(&format!(
            "/v1/sessions/pager/history?limit=4&before={next2}"
        ))
        .await;
    let m3 = p3.body["messages"].as_array().unwrap().clone();
    assert_eq!(m3.len(), 2);
    assert!(p3.body["next"].is_null(), "{p3:?}");
    let all: Vec<Value> = m3.into_iter().chain(m2).chain(m1).collect();
    assert_eq!(all, api.history("pager").await);
    for (i, m) in all.iter().enumerate() {
        assert_eq!(m["role"], if i % 2 == 0 { "user" } else { "assistant" });
    }
    // A cursor that is not in this history, or not a message id at all.
    let other = api.get("/v1/sessions/pager/history?before=abc.1").await;
    assert_eq!(other.status, 404, "{other:?}");
    let garbage = api.get("/v1/sessions/pager/history?before=zz").await;
    assert_eq!(garbage.status, 400, "{garbage:?}");
    // One message older than the page: it still points at it.
    let p9 = api.get("/v1/sessions/pager/history?limit=9").await;
    assert_eq!(p9.body["messages"].as_array().unwrap().len(), 9);
    assert_eq!(p9.body["next"], all[1]["id"]);
    let zero = api.get("/v1/sessions/pager/history?limit=0").await;
    assert_eq!(zero.status, 400, "{zero:?}");
    // Chat on a session that was never created.
    let unknown = api.chat("nobody", "hi").await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(unknown.message().contains("nobody"));
    let empty = api.chat("pager", "   ").await;
    assert_eq!(empty.status, 400, "{empty:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn chat_streams_tokens_as_server_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("streamer").await;
    api.chat("streamer", "first").await;
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/streamer/chat")
                .header("Accept", "text/event-stream")
                .json(&json!({"message": "tell me a story please"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&r.text);
    let tokens: Vec<&(String, String)> = events.iter().filter(|(e, _)| e == "token").collect();
    assert!(tokens.len() > 3, "word by word: {events:?}");
    let streamed: String = tokens
        .iter()
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["delta"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let (last_event, last_data) = events.last().unwrap();
    assert_eq!(last_event, "done");
    let done: Value = serde_json::from_str(last_data).unwrap();
    assert_eq!(done["reply"].as_str().unwrap(), streamed);
    assert!(
        streamed.starts_with("echo: tell me a story please"),
        "{streamed}"
    );
    assert_eq!(done["agent"], "assistant");
    // Durable: the history ends with exactly that reply, under that id.
    let h = api.history("streamer").await;
    assert_eq!(h.len(), 4);
    assert_eq!(h[3]["id"], done["message_id"]);
    assert_eq!(h[3]["content"].as_str().unwrap(), streamed);
    // Unknown session: a plain JSON 404, not a stream.
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/ghost/chat")
                .header("Accept", "text/event-stream")
                .json(&json!({"message": "hi"})),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "not_found");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_store_failure_mid_stream_is_an_error_event_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // One commit succeeds (creating the session); the turn's commit fails.
    let store = Arc::new(FailingStore::new(MemoryStore::new(), 1));
    let rt = Runtime::builder()
        .config(config(dir.path()))
        .store(store.clone())
        .build()
        .await
        .unwrap();
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("fragile").await;
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/fragile/chat")
                .header("Accept", "text/event-stream")
                .json(&json!({"message": "this will not be kept"})),
        )
        .await;
    assert_eq!(r.status, 200, "the stream had started: {r:?}");
    let events = sse_events(&r.text);
    assert!(events.iter().any(|(e, _)| e == "token"), "{events:?}");
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "error", "{events:?}");
    let err: Value = serde_json::from_str(data).unwrap();
    assert_eq!(err["error"]["code"], "unavailable", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected"),
        "{err}"
    );
    assert!(!events.iter().any(|(e, _)| e == "done"));
    // Nothing was kept, and the store error was counted.
    assert!(api.history("fragile").await.is_empty());
    let m = api.get("/metrics").await;
    assert!(m.text.contains("troupe_store_errors_total 1"), "{}", m.text);
    // The same failure on a JSON chat: 503 with the JSON error body.
    let r = api.chat("fragile", "again").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.code(), "unavailable");
    let m = api.get("/metrics").await;
    assert!(m.text.contains("troupe_store_errors_total 2"), "{}", m.text);
    store.allow(100);
    assert_eq!(api.chat("fragile", "now it works").await.status, 200);
    assert_eq!(api.history("fragile").await.len(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn checkpoints_versions_restore_fork_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("cp").await;
    api.chat("cp", "one").await;
    let cp = api
        .post("/v1/sessions/cp/checkpoints", json!({"label": "after-one"}))
        .await;
    assert_eq!(cp.status, 201, "{cp:?}");
    assert_eq!(cp.body["label"], "after-one");
    assert_eq!(cp.body["kind"], "manual");
    assert_eq!(cp.body["interactions"], 1);
    let cp_id = cp.body["id"].as_str().unwrap().to_string();
    api.chat("cp", "two").await;
    assert_eq!(api.history("cp").await.len(), 4);
    let list = api.get("/v1/sessions/cp/checkpoints").await;
    let listed: Vec<&str> = list.body["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&cp_id.as_str()), "{list:?}");

    // Restore: back to one turn.
    let restored = api
        .post("/v1/sessions/cp/restore", json!({"checkpoint_id": cp_id}))
        .await;
    assert_eq!(restored.status, 200, "{restored:?}");
    assert_eq!(restored.body["session_id"], "cp");
    assert_eq!(restored.body["interactions"], 1);
    let h = api.history("cp").await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["content"], "one");
    let missing = api
        .post("/v1/sessions/cp/restore", json!({"checkpoint_id": "nope"}))
        .await;
    assert_eq!(missing.status, 404, "{missing:?}");

    // Versions.
    let v1 = api
        .post("/v1/sessions/cp/versions", json!({"description": "v one"}))
        .await;
    assert_eq!(v1.status, 201, "{v1:?}");
    assert_eq!(v1.body["version"], 1);
    api.chat("cp", "three").await;
    let v2 = api
        .post("/v1/sessions/cp/versions", json!({"description": "v two"}))
        .await;
    assert_eq!(v2.body["version"], 2);
    let versions = api.get("/v1/sessions/cp/versions").await;
    assert_eq!(versions.body["versions"].as_array().unwrap().len(), 2);
    assert_eq!(versions.body["versions"][0]["description"], "v one");
    let back = api
        .post("/v1/sessions/cp/versions/1/restore", json!({}))
        .await;
    assert_eq!(back.status, 200, "{back:?}");
    assert_eq!(api.history("cp").await.len(), 2);
    let no_v = api
        .post("/v1/sessions/cp/versions/9/restore", json!({}))
        .await;
    assert_eq!(no_v.status, 404, "{no_v:?}");

    // Fork from the checkpoint: the new session has the history up to it.
    let fork = api
        .post(
            "/v1/sessions/cp/fork",
            json!({"checkpoint_id": cp_id, "new_session_id": "cp-fork"}),
        )
        .await;
    assert_eq!(fork.status, 201, "{fork:?}");
    assert_eq!(fork.body["session_id"], "cp-fork");
    assert_eq!(contents(&api.history("cp-fork").await)[0], "one");
    assert_eq!(api.history("cp-fork").await.len(), 2);
    let again = api
        .post(
            "/v1/sessions/cp/fork",
            json!({"checkpoint_id": cp_id, "new_session_id": "cp-fork"}),
        )
        .await;
    assert_eq!(again.status, 409, "{again:?}");

    // Merge two sessions into a new one with both histories.
    api.create("other").await;
    api.chat("other", "from other").await;
    let merged = api
        .post(
            "/v1/sessions/cp/merge",
            json!({"other": "other", "new_session_id": "both"}),
        )
        .await;
    assert_eq!(merged.status, 201, "{merged:?}");
    assert_eq!(merged.body["session"]["session_id"], "both");
    assert_eq!(merged.body["report"]["messages"], 4);
    let both = contents(&api.history("both").await);
    assert!(both.contains(&"one".to_string()) && both.contains(&"from other".to_string()));
    let dup = api
        .post(
            "/v1/sessions/cp/merge",
            json!({"other": "other", "new_session_id": "both"}),
        )
        .await;
    assert_eq!(dup.status, 409, "{dup:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn preferences_and_profile_are_patched_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("prefs").await;
    let p = api
        .call(
            Method::PATCH,
            "/v1/sessions/prefs/preferences",
            Some(json!({"language": "fr", "tz": "Europe/Paris"})),
        )
        .await;
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(p.body, json!({"language": "fr", "tz": "Europe/Paris"}));
    let p = api
        .call(
            Method::PATCH,
            "/v1/sessions/prefs/preferences",
            Some(json!({"language": "de"})),
        )
        .await;
    assert_eq!(p.body, json!({"language": "de", "tz": "Europe/Paris"}));
    assert_eq!(api.get("/v1/sessions/prefs/preferences").await.body, p.body);
    let prof = api
        .call(
            Method::PATCH,
            "/v1/sessions/prefs/profile",
            Some(json!({"name": "Alice", "age": 30})),
        )
        .await;
    assert_eq!(prof.body, json!({"name": "Alice", "age": 30}));
    let whole = api.get("/v1/sessions/prefs").await;
    assert_eq!(whole.body["profile"]["name"], "Alice");
    assert_eq!(whole.body["preferences"]["language"], "de");
    let not_object = api
        .call(
            Method::PATCH,
            "/v1/sessions/prefs/profile",
            Some(json!(["name"])),
        )
        .await;
    assert_eq!(not_object.status, 400, "{not_object:?}");
    let unknown = api.get("/v1/sessions/nobody/preferences").await;
    assert_eq!(unknown.status, 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn memories_analytics_feedback_and_forgetting_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    let created = api
        .post(
            "/v1/sessions",
            json!({"session_id": "mem-a", "agent": "assistant", "user_id": "alice"}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let reply = api
        .post(
            "/v1/sessions/mem-a/chat",
            json!({"message": "My favourite colour is blue"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // The conversation left a memory for alice, listed and searchable.
    let listed = api.get("/v1/users/alice/memories").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let texts = listed.body["memories"].to_string();
    assert!(texts.contains("blue"), "{texts}");
    let added = api
        .post(
            "/v1/users/alice/memories",
            json!({"text": "I prefer Python over JavaScript"}),
        )
        .await;
    assert_eq!(added.status, 201, "{added:?}");
    assert_eq!(added.body["outcome"], "stored");
    let hits = api.get("/v1/users/alice/memories?q=python").await;
    assert_eq!(hits.status, 200, "{hits:?}");
    let hits_text = hits.body["hits"].to_string();
    assert!(hits_text.contains("Python"), "{hits_text}");
    assert!(!hits_text.contains("blue"), "{hits_text}");
    // Another user has none of them.
    let bob = api.get("/v1/users/bob/memories?q=python").await;
    assert_eq!(bob.body["hits"], json!([]), "{bob:?}");
    let empty = api
        .post("/v1/users/alice/memories", json!({"text": " "}))
        .await;
    assert_eq!(empty.status, 400, "{empty:?}");

    // Analytics and feedback.
    let rated = api
        .post(
            "/v1/sessions/mem-a/feedback",
            json!({"message_id": reply.body["message_id"], "score": 4}),
        )
        .await;
    assert_eq!(rated.status, 204, "{rated:?}");
    let bad = api
        .post(
            "/v1/sessions/mem-a/feedback",
            json!({"message_id": "not-an-id", "score": 4}),
        )
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    let a = api.get("/v1/sessions/mem-a/analytics").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["interactions"], 1);
    assert_eq!(a.body["messages"], 2);
    assert_eq!(a.body["feedback"]["count"], 1);
    assert_eq!(a.body["feedback"]["average"], 4.0);
    assert!(a.body["agents"]["assistant"].is_object(), "{a:?}");
    let ctx = api.get("/v1/sessions/mem-a/context").await;
    assert_eq!(ctx.status, 200, "{ctx:?}");
    assert_eq!(ctx.body["user_id"], "alice");
    assert_eq!(ctx.body["interactions"], 1);
    assert_eq!(api.get("/v1/sessions/nobody/analytics").await.status, 404);

    // Forget alice with her sessions: nothing of hers is left.
    let forgot = api
        .call(Method::DELETE, "/v1/users/alice?sessions=true", None)
        .await;
    assert_eq!(forgot.status, 200, "{forgot:?}");
    assert_eq!(forgot.body["sessions_deleted"], json!(["mem-a"]));
    let after = api.get("/v1/users/alice/memories?q=python").await;
    assert_eq!(after.body["hits"], json!([]), "{after:?}");
    assert_eq!(
        api.get("/v1/users/alice/memories").await.body["memories"],
        json!([])
    );
    assert_eq!(api.get("/v1/sessions/mem-a").await.status, 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shared_state_honours_if_match_and_if_none_match() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    let path = "/v1/state/team/topic";
    assert_eq!(api.get(path).await.status, 404);
    // Create only if absent.
    let put = |v: Value, h: Option<(&'static str, String)>| {
        let mut rb = api.request(Method::PUT, path).json(&json!({ "value": v }));
        if let Some((k, val)) = h {
            rb = rb.header(k, val);
        }
        api.send(rb)
    };
    let r = put(json!("qubits"), Some(("If-None-Match", "*".into()))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["version"], 1);
    let r = put(json!("again"), Some(("If-None-Match", "*".into()))).await;
    assert_eq!(r.status, 412, "{r:?}");
    assert_eq!(r.code(), "precondition_failed");
    let g = api.get(path).await;
    assert_eq!(
        g.body,
        json!({"value": "qubits", "version": 1, "updated_at": g.body["updated_at"]})
    );
    assert_eq!(g.headers["etag"], "\"1\"");
    // Compare-and-set with the ETag.
    let r = put(json!({"t": "lasers"}), Some(("If-Match", "\"1\"".into()))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.headers["etag"], "\"2\"");
    let stale = put(json!("stale"), Some(("If-Match", "\"1\"".into()))).await;
    assert_eq!(stale.status, 412, "{stale:?}");
    assert!(
        stale.message().contains("expected version 1, found 2"),
        "{stale:?}"
    );
    assert_eq!(api.get(path).await.body["value"], json!({"t": "lasers"}));
    // Unconditional write.
    assert_eq!(put(json!(3), None).await.body["version"], 3);
    let bad = put(json!(3), Some(("If-Match", "\"x\"".into()))).await;
    assert_eq!(bad.status, 400);
    let no_value = api
        .send(api.request(Method::PUT, path).json(&json!({"valu": 1})))
        .await;
    assert_eq!(no_value.status, 400, "{no_value:?}");
    // List by prefix.
    put(json!(1), None).await;
    api.send(
        api.request(Method::PUT, "/v1/state/team/todo")
            .json(&json!({"value": ["a"]})),
    )
    .await;
    api.send(
        api.request(Method::PUT, "/v1/state/team/name")
            .json(&json!({"value": "x"})),
    )
    .await;
    let l = api.get("/v1/state/team?prefix=to").await;
    let keys: Vec<&str> = l.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["todo", "topic"]);
    assert_eq!(
        api.get("/v1/state/team").await.body["entries"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // Delete with a stale version: refused; with the right one: gone.
    let del = api
        .send(
            api.request(Method::DELETE, path)
                .header("If-Match", "\"1\""),
        )
        .await;
    assert_eq!(del.status, 412, "{del:?}");
    let del = api
        .send(
            api.request(Method::DELETE, path)
                .header("If-Match", "\"4\""),
        )
        .await;
    assert_eq!(del.status, 204, "{del:?}");
    assert_eq!(api.get(path).await.status, 404);
    assert_eq!(api.call(Method::DELETE, path, None).await.status, 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn runs_start_report_and_reject_invalid_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::write(
        pipelines.join("two.toml"),
        r#"
name = "two"
[inputs]
topic = { required = true }
[[task]]
id = "research"
agent = "researcher"
prompt = "Research {{ inputs.topic }}."
[[task]]
id = "write"
agent = "writer"
depends_on = ["research"]
prompt = "Write from: {{ tasks.research.output }}"
"#,
    )
    .unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = Server::new(rt.clone(), rt.config().server.clone())
        .auth(Auth::off())
        .pipelines_dir(&pipelines)
        .bind("127.0.0.1:0")
        .unwrap()
        .run()
        .unwrap();
    let api = Api::new(&server);
    let r = api
        .post(
            "/v1/runs",
            json!({"pipeline": "two.toml", "inputs": {"topic": "qubits"}, "session_id": "proj"}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let run_id = r.body["run_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let run = loop {
        let run = api.get(&format!("/v1/runs/{run_id}")).await;
        assert_eq!(run.status, 200, "{run:?}");
        if run.body["status"] != "running" {
            break run;
        }
        assert!(Instant::now() < deadline, "run did not end: {run:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(run.body["status"], "succeeded", "{run:?}");
    assert_eq!(run.body["pipeline"], "two");
    assert_eq!(run.body["session_id"], "proj");
    let tasks = run.body["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert!(tasks
        .iter()
        .all(|t| t["status"] == "succeeded" && t["output"].as_str().unwrap().starts_with("echo:")));
    let listed = api.get("/v1/runs").await;
    assert_eq!(listed.body["runs"][0]["id"], json!(run_id));
    // The results went into the session.
    assert_eq!(api.history("proj").await.len(), 2);

    // Inline TOML with several problems: 400 naming each.
    let bad = api
        .post(
            "/v1/runs",
            json!({"pipeline_toml": "name = \"bad\"\n[[task]]\nid = \"a\"\nagent = \"nobody\"\nprompt = \"x\"\n[[task]]\nid = \"b\"\nagent = \"writer\"\ndepends_on = [\"reserch\"]\nprompt = \"y\"\n"}),
        )
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.message().contains("nobody"), "{bad:?}");
    assert!(bad.message().contains("reserch"), "{bad:?}");
    // A missing required input, a missing file, a path outside pipelines/.
    let no_input = api.post("/v1/runs", json!({"pipeline": "two.toml"})).await;
    assert_eq!(no_input.status, 400, "{no_input:?}");
    assert!(no_input.message().contains("topic"), "{no_input:?}");
    let missing = api.post("/v1/runs", json!({"pipeline": "nope.toml"})).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    let escape = api
        .post("/v1/runs", json!({"pipeline": "../config.toml"}))
        .await;
    assert_eq!(escape.status, 400, "{escape:?}");
    assert_eq!(api.get("/v1/runs/nope").await.status, 404);
    server.stop().await.unwrap();
}

/// Every route of the API contract.
const CONTRACT: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("post", "/v1/sessions"),
    ("get", "/v1/sessions"),
    ("get", "/v1/sessions/{id}"),
    ("delete", "/v1/sessions/{id}"),
    ("post", "/v1/sessions/{id}/chat"),
    ("get", "/v1/sessions/{id}/history"),
    ("get", "/v1/sessions/{id}/checkpoints"),
    ("post", "/v1/sessions/{id}/checkpoints"),
    ("post", "/v1/sessions/{id}/restore"),
    ("get", "/v1/sessions/{id}/versions"),
    ("post", "/v1/sessions/{id}/versions"),
    ("post", "/v1/sessions/{id}/versions/{n}/restore"),
    ("post", "/v1/sessions/{id}/fork"),
    ("post", "/v1/sessions/{id}/merge"),
    ("get", "/v1/sessions/{id}/preferences"),
    ("patch", "/v1/sessions/{id}/preferences"),
    ("get", "/v1/sessions/{id}/profile"),
    ("patch", "/v1/sessions/{id}/profile"),
    ("get", "/v1/sessions/{id}/analytics"),
    ("get", "/v1/users/{user}/memories"),
    ("post", "/v1/users/{user}/memories"),
    ("delete", "/v1/users/{user}"),
    ("get", "/v1/sessions/{id}/context"),
    ("post", "/v1/sessions/{id}/feedback"),
    ("get", "/v1/state/{ns}/{key}"),
    ("put", "/v1/state/{ns}/{key}"),
    ("delete", "/v1/state/{ns}/{key}"),
    ("get", "/v1/state/{ns}"),
    ("post", "/v1/runs"),
    ("get", "/v1/runs"),
    ("get", "/v1/runs/{id}"),
    ("post", "/v1/chat/completions"),
    ("get", "/agents/{name}/health"),
    ("head", "/agents/{name}"),
    ("post", "/agents/{name}"),
];

#[tokio::test]
async fn health_metrics_and_an_openapi_document_that_matches_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    let h = api.get("/healthz").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body["status"], "ok");
    assert_eq!(h.body["live_sessions"], 0);
    assert_eq!(h.body["version"], env!("CARGO_PKG_VERSION"));
    api.create("m").await;
    api.chat("m", "hello").await;
    api.chat("m", "again").await;
    let h = api.get("/health").await;
    assert_eq!(h.body["live_sessions"], 1, "{h:?}");
    api.get("/v1/sessions/ghost").await;

    let m = api.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in [
        "troupe_http_requests_total{route=\"/healthz\",status=\"200\"} 1",
        "troupe_http_requests_total{route=\"/v1/sessions/{id}/chat\",status=\"200\"} 2",
        "troupe_http_requests_total{route=\"/v1/sessions/{id}\",status=\"404\"} 1",
        "troupe_http_request_duration_seconds_count{route=\"/v1/sessions/{id}/chat\"} 2",
        "troupe_http_request_duration_seconds_bucket{route=\"/v1/sessions/{id}/chat\",le=\"+Inf\"} 2",
        "troupe_turns_total 2",
        "troupe_turn_duration_seconds_count 2",
        "troupe_live_sessions 1",
        "troupe_store_errors_total 0",
        "# TYPE troupe_turn_duration_seconds histogram",
    ] {
        assert!(m.text.contains(line), "missing {line:?} in\n{}", m.text);
    }

    let doc = api.get("/v1/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    for (verb, path) in CONTRACT {
        assert!(
            doc.body["paths"][path][verb].is_object(),
            "{verb} {path} is not in the OpenAPI document"
        );
    }
    // Every documented operation is served (none falls through to "no route").
    let mut ops: Vec<(String, String)> = Vec::new();
    for (path, item) in doc.body["paths"].as_object().unwrap() {
        for verb in item.as_object().unwrap().keys() {
            ops.push((verb.clone(), path.clone()));
        }
    }
    assert!(ops.len() >= CONTRACT.len());
    ops.sort_by_key(|(v, _)| v == "delete");
    for (verb, path) in &ops {
        let url = path
            .replace("{id}", "m")
            .replace("{n}", "1")
            .replace("{name}", "assistant")
            .replace(['{', '}'], "");
        let method = Method::from_bytes(verb.to_uppercase().as_bytes()).unwrap();
        let body = matches!(verb.as_str(), "post" | "put" | "patch").then(|| json!({}));
        let r = api.call(method, &url, body).await;
        assert!(
            !(r.status == 404 && r.message().starts_with("no route")) && r.status != 405,
            "{verb} {url}: {r:?}"
        );
    }
    // And what is not documented is not served, as JSON.
    let r = api.get("/v1/nothing-here").await;
    assert_eq!(r.status, 404);
    assert!(r.message().starts_with("no route"), "{r:?}");
    let r = api.call(Method::PUT, "/healthz", Some(json!({}))).await;
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.code(), "method_not_allowed");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn admin_key_and_session_tokens_guard_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    // k2 signs; k1 (the previous key) still verifies: a rotation in progress.
    let keys = TokenKeys::parse("k2:new-secret,k1:old-secret").unwrap();
    let server = start(&rt, Auth::new("the-admin-key", Some(keys.clone())));
    let anon = Api::new(&server);
    let admin = anon.with_bearer("the-admin-key");

    // Public routes need nothing.
    assert_eq!(anon.get("/healthz").await.status, 200);
    assert_eq!(anon.get("/health").await.status, 200);
    assert_eq!(anon.get("/v1/openapi.json").await.status, 200);
    // Everything else does.
    let r = anon.get("/v1/sessions").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.code(), "unauthorized");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(anon.get("/metrics").await.status, 401);
    assert_eq!(
        anon.with_bearer("the-admin-kez")
            .get("/v1/sessions")
            .await
            .status,
        401
    );
    let r = anon
        .send(
            anon.request(Method::GET, "/v1/sessions")
                .header("Authorization", "Basic abc"),
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(admin.get("/v1/sessions").await.status, 200);
    assert_eq!(admin.get("/metrics").await.status, 200);
    admin.create("A").await;
    admin.create("B").await;
    admin.chat("B", "B's secret").await;

    let token_a = issue_token(&keys, "A", Duration::from_secs(600)).unwrap();
    assert!(token_a.starts_with("tt1.k2."), "{token_a}");
    let a = anon.with_bearer(&token_a);
    // Its own session: everything.
    assert_eq!(a.get("/v1/sessions/A").await.status, 200);
    assert_eq!(a.chat("A", "hello").await.status, 200);
    assert_eq!(a.get("/v1/sessions/A/history").await.status, 200);
    assert_eq!(
        a.post("/v1/sessions", json!({"session_id": "A"}))
            .await
            .status,
        200
    );
    // Another session, or admin routes: 403 saying why.
    let r = a.get("/v1/sessions/B/history").await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.code(), "forbidden");
    assert!(
        r.message().contains("'A'") && r.message().contains("'B'"),
        "{r:?}"
    );
    assert_eq!(a.chat("B", "let me in").await.status, 403);
    assert_eq!(
        a.post("/v1/sessions", json!({"session_id": "C"}))
            .await
            .status,
        403
    );
    assert_eq!(a.get("/v1/sessions").await.status, 403);
    assert_eq!(a.get("/v1/state/ns/k").await.status, 403);
    assert_eq!(a.get("/v1/runs").await.status, 403);
    assert_eq!(a.get("/metrics").await.status, 403);
    let r = a
        .post(
            "/v1/sessions/A/merge",
            json!({"other": "B", "new_session_id": "AB"}),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    // B's history was never touched.
    assert_eq!(admin.history("B").await.len(), 2);

    // Expired, forged, malformed, unknown key: 401 saying which.
    let expired = issue_token_until(&keys, "A", chrono::Utc::now().timestamp() - 5).unwrap();
    let r = anon.with_bearer(&expired).get("/v1/sessions/A").await;
    assert_eq!(r.status, 401);
    assert!(r.message().contains("expired"), "{r:?}");
    let parts: Vec<&str> = token_a.split('.').collect();
    let b_token = issue_token(&keys, "B", Duration::from_secs(600)).unwrap();
    let b_part = b_token.split('.').nth(2).unwrap();
    let forged = format!(
        "{}.{}.{}.{}.{}",
        parts[0], parts[1], b_part, parts[3], parts[4]
    );
    let r = anon.with_bearer(&forged).get("/v1/sessions/B").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.message().contains("signature"), "{r:?}");
    let other_secret = TokenKeys::parse("k2:guessed").unwrap();
    let guessed = issue_token(&other_secret, "B", Duration::from_secs(600)).unwrap();
    let r = anon.with_bearer(&guessed).get("/v1/sessions/B").await;
    assert_eq!(r.status, 401);
    assert!(r.message().contains("signature"), "{r:?}");
    let r = anon
        .with_bearer("tt1.k2.garbage")
        .get("/v1/sessions/A")
        .await;
    assert_eq!(r.status, 401);
    assert!(r.message().contains("malformed"), "{r:?}");
    let unknown_kid = TokenKeys::parse("k9:whatever").unwrap();
    let t = issue_token(&unknown_kid, "A", Duration::from_secs(600)).unwrap();
    let r = anon.with_bearer(&t).get("/v1/sessions/A").await;
    assert_eq!(r.status, 401);
    assert!(r.message().contains("unknown key id 'k9'"), "{r:?}");

    // Rotation: a token signed with the old key k1 still works.
    let old = TokenKeys::parse("k1:old-secret").unwrap();
    let t_old = issue_token(&old, "A", Duration::from_secs(600)).unwrap();
    assert_eq!(
        anon.with_bearer(&t_old).get("/v1/sessions/A").await.status,
        200
    );
    server.stop().await.unwrap();

    // Once k1 is removed, its tokens are refused.
    let rt = runtime(config(dir.path()), None).await;
    let server = start(
        &rt,
        Auth::new(
            "the-admin-key",
            Some(TokenKeys::parse("k2:new-secret").unwrap()),
        ),
    );
    let anon = Api::new(&server);
    let r = anon.with_bearer(&t_old).get("/v1/sessions/A").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.message().contains("unknown key id 'k1'"), "{r:?}");
    assert_eq!(
        anon.with_bearer(&token_a)
            .get("/v1/sessions/A")
            .await
            .status,
        200
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn only_the_admin_sets_or_changes_a_sessions_user() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let keys = TokenKeys::parse("k1:secret").unwrap();
    let server = start(&rt, Auth::new("adm", Some(keys.clone())));
    let anon = Api::new(&server);
    let admin = anon.with_bearer("adm");
    // The victim: a user with a profile, reached through their own session.
    let r = admin
        .post(
            "/v1/sessions",
            json!({"session_id": "victim-s", "user_id": "victim"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = admin
        .call(
            Method::PATCH,
            "/v1/sessions/victim-s/profile",
            Some(json!({"secret": "victim's address"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    admin.create("A").await;
    let a = anon.with_bearer(&issue_token(&keys, "A", Duration::from_secs(600)).unwrap());
    let user_of = |r: &Reply| r.body["user_id"].clone();

    // A token cannot give its session a user …
    let r = a
        .post(
            "/v1/sessions",
            json!({"session_id": "A", "user_id": "victim"}),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.code(), "forbidden");
    assert!(
        r.message().contains("'A'") && r.message().contains("only the admin"),
        "{r:?}"
    );
    let got = admin.get("/v1/sessions/A").await;
    assert_eq!(user_of(&got), Value::Null, "{got:?}");
    assert_eq!(got.body["profile"], json!({}), "{got:?}");
    // … nor by deleting its session and creating it again with one.
    assert_eq!(
        a.call(Method::DELETE, "/v1/sessions/A", None).await.status,
        204
    );
    let r = a
        .post(
            "/v1/sessions",
            json!({"session_id": "A", "user_id": "victim"}),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(admin.get("/v1/sessions/A").await.status, 404);
    // Re-created without a user: it gets none.
    let r = a.post("/v1/sessions", json!({"session_id": "A"})).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(user_of(&r), Value::Null, "{r:?}");
    let r = a.chat("A", "hello").await;
    assert_eq!(r.status, 200, "{r:?}");
    let got = admin.get("/v1/sessions/A").await;
    assert_eq!(user_of(&got), Value::Null, "{got:?}");
    assert_eq!(got.body["profile"], json!({}), "{got:?}");

    // A session the admin gave a user: the token may name that user (no
    // change), but not another one.
    let r = admin
        .post("/v1/sessions", json!({"session_id": "B", "user_id": "bob"}))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let b = anon.with_bearer(&issue_token(&keys, "B", Duration::from_secs(600)).unwrap());
    let r = b
        .post("/v1/sessions", json!({"session_id": "B", "user_id": "bob"}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(user_of(&r), "bob");
    let r = b
        .post(
            "/v1/sessions",
            json!({"session_id": "B", "user_id": "victim"}),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(user_of(&admin.get("/v1/sessions/B").await), "bob");

    // The admin may set and change it.
    let r = admin
        .post(
            "/v1/sessions",
            json!({"session_id": "A", "user_id": "carol"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(user_of(&r), "carol");
    let r = admin
        .post(
            "/v1/sessions",
            json!({"session_id": "B", "user_id": "dave"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(user_of(&r), "dave");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn token_keys_without_an_admin_key_still_turn_auth_on() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let mut cfg = rt.config().server.clone();
    // Variables of this test only: the admin key's is never set.
    cfg.api_key_env = "TROUPE_TEST_TOKENS_ONLY_ADMIN_KEY_UNSET".into();
    cfg.token_keys_env = "TROUPE_TEST_TOKENS_ONLY_KEYS".into();
    std::env::set_var(&cfg.token_keys_env, "k1:only-tokens-secret");
    let auth = Auth::from_env(&cfg).unwrap();
    assert!(auth.is_on() && auth.has_token_keys() && !auth.has_admin_key());
    // Auth is on, so a public address is allowed.
    assert!(Server::new(rt.clone(), cfg.clone())
        .bind("0.0.0.0:0")
        .is_ok());
    let server = Server::new(rt.clone(), cfg)
        .bind("127.0.0.1:0")
        .unwrap()
        .run()
        .unwrap();
    let anon = Api::new(&server);
    // No credential: 401, not the admin.
    let r = anon.get("/v1/sessions").await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = anon.post("/v1/sessions", json!({"session_id": "x"})).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(anon.get("/metrics").await.status, 401);
    // An empty or made-up bearer is no admin key either.
    for bearer in ["", " ", "anything"] {
        let r = anon
            .send(
                anon.request(Method::GET, "/v1/sessions")
                    .header("Authorization", format!("Bearer {bearer}")),
            )
            .await;
        assert_eq!(r.status, 401, "{bearer:?}: {r:?}");
    }
    // Tokens work on their session; admin routes are refused.
    let keys = TokenKeys::parse("k1:only-tokens-secret").unwrap();
    let t = anon.with_bearer(&issue_token(&keys, "tok-only", Duration::from_secs(600)).unwrap());
    assert_eq!(t.create("tok-only").await.status, 201);
    assert_eq!(t.chat("tok-only", "hi").await.status, 200);
    assert_eq!(t.get("/v1/sessions").await.status, 403);
    assert_eq!(t.get("/metrics").await.status, 403);
    assert_eq!(t.get("/v1/sessions/other").await.status, 403);
    // Public routes stay public.
    assert_eq!(anon.get("/healthz").await.status, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_graceful_stop_waits_as_long_as_a_turn_can_take() {
    use troupe::server::shutdown_timeout_for;
    let c = Config::default();
    // 0 (the default): every model attempt, plus 10 s.
    assert_eq!(c.server.shutdown_timeout_secs, 0);
    assert_eq!(
        shutdown_timeout_for(&c.server, &c.model),
        Duration::from_secs((u64::from(c.model.max_retries) + 1) * c.model.timeout_secs + 10)
    );
    let mut c2 = c.clone();
    c2.model.timeout_secs = 120;
    c2.model.max_retries = 2;
    assert_eq!(
        shutdown_timeout_for(&c2.server, &c2.model),
        Duration::from_secs(370)
    );
    c2.server.shutdown_timeout_secs = 7;
    assert_eq!(
        shutdown_timeout_for(&c2.server, &c2.model),
        Duration::from_secs(7)
    );
    // The server uses it (unless set with `shutdown_timeout`).
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.model.timeout_secs = 100;
    cfg.model.max_retries = 3;
    let rt = runtime(cfg, None).await;
    let s = Server::new(rt.clone(), rt.config().server.clone());
    assert!(format!("{s:?}").contains("shutdown_timeout: 410s"), "{s:?}");
    let s = s.shutdown_timeout(Duration::from_secs(3));
    assert!(format!("{s:?}").contains("shutdown_timeout: 3s"), "{s:?}");
    // And it reads as a `[server]` key.
    let parsed: Config = toml::from_str("[server]\nshutdown_timeout_secs = 42\n").unwrap();
    assert_eq!(parsed.server.shutdown_timeout_secs, 42);
}

#[tokio::test]
async fn auth_off_binds_only_to_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let err = Server::new(rt.clone(), rt.config().server.clone())
        .auth(Auth::off())
        .bind("0.0.0.0:0")
        .unwrap_err();
    assert!(err.to_string().contains("non-loopback"), "{err}");
    let mut allowed = rt.config().server.clone();
    allowed.allow_public_without_auth = true;
    let ok = Server::new(rt.clone(), allowed)
        .auth(Auth::off())
        .bind("0.0.0.0:0");
    assert!(ok.is_ok());
    let with_auth = Server::new(rt.clone(), rt.config().server.clone())
        .auth(Auth::new("k", None))
        .bind("0.0.0.0:0");
    assert!(with_auth.is_ok());
}

#[tokio::test]
async fn oversized_and_malformed_bodies_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.server.max_body_bytes = 2048;
    let rt = runtime(c, None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("s").await;
    let big = "x".repeat(10_000);
    let r = api.chat("s", &big).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    assert!(r.message().contains("2048"), "{r:?}");
    // Also for a body read as bytes (optional-body routes) and a chunked body.
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/s/checkpoints")
                .header("content-type", "application/json")
                .body(format!("{{\"label\": \"{big}\"}}")),
        )
        .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1000])));
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/s/chat")
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(chunks)),
        )
        .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    // Malformed JSON: 400 with the parser's message.
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/s/chat")
                .header("content-type", "application/json")
                .body("{\"message\": \"hi\""),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.code(), "bad_request");
    assert!(
        r.message().contains("malformed JSON") && r.message().contains("line 1"),
        "{r:?}"
    );
    let r = api
        .post("/v1/sessions/s/chat", json!({"mesage": "hi"}))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.message().contains("missing field `message`"), "{r:?}");
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions")
                .header("content-type", "application/json")
                .body("not json"),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    // Nothing above changed the session.
    assert!(api.history("s").await.is_empty());
    server.stop().await.unwrap();
}

fn openai_model(base_url: String) -> Arc<dyn ChatModel> {
    Arc::new(
        OpenAiModel::new(OpenAiSettings {
            base_url,
            model: "m".into(),
            api_key: None,
            temperature: None,
            max_tokens: None,
            timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff: Duration::from_millis(10),
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn a_dead_model_is_502_and_a_slow_one_504_and_the_session_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let rt = runtime(
        config(&dir.path().join("dead")),
        Some(openai_model(format!("http://127.0.0.1:{port}/v1"))),
    )
    .await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("s").await;
    let r = api.chat("s", "hello?").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.code(), "model_unavailable");
    assert!(r.message().contains(&port.to_string()), "{r:?}");
    let r = api
        .send(
            api.request(Method::POST, "/v1/sessions/s/chat")
                .header("Accept", "text/event-stream")
                .json(&json!({"message": "stream?"})),
        )
        .await;
    assert_eq!(
        r.status, 502,
        "an error before any token keeps its status: {r:?}"
    );
    assert!(api.history("s").await.is_empty());
    assert_eq!(api.get("/v1/sessions/s").await.body["interactions"], 0);
    server.stop().await.unwrap();

    // A server that accepts and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_addr = hang.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hang.incoming() {
            held.push(s);
        }
    });
    let rt = runtime(
        config(&dir.path().join("slow")),
        Some(openai_model(format!("http://{hang_addr}/v1"))),
    )
    .await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("s").await;
    let r = api.chat("s", "are you there?").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.code(), "model_timeout");
    assert!(r.message().contains("did not answer"), "{r:?}");
    assert!(api.history("s").await.is_empty());
    assert_eq!(api.get("/v1/sessions/s").await.body["interactions"], 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn two_sessions_never_see_each_others_history() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::new();
    let rt = runtime(config(dir.path()), Some(model.clone())).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    api.create("left").await;
    api.create("right").await;
    api.chat("left", "left secret: 1111").await;
    api.chat("right", "right secret: 2222").await;
    api.chat("left", "left again").await;
    api.chat("right", "right again").await;
    let left = contents(&api.history("left").await).join("|");
    let right = contents(&api.history("right").await).join("|");
    assert!(left.contains("1111") && !left.contains("2222"), "{left}");
    assert!(right.contains("2222") && !right.contains("1111"), "{right}");
    // And the model was never shown the other session's messages.
    for req in model.requests() {
        let prompt: String = req.messages.iter().map(|m| m.content.as_str()).collect();
        assert!(
            !(prompt.contains("1111") && prompt.contains("2222")),
            "a prompt mixed sessions: {prompt}"
        );
    }
    assert_eq!(model.requests().len(), 4);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_chats_on_one_session_are_serialised() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Arc::new(Api::new(&server));
    api.create("busy").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.chat("busy", &format!("message number {i}")).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    let h = api.history("busy").await;
    assert_eq!(h.len(), 40);
    let mut seen = std::collections::HashSet::new();
    for pair in h.chunks(2) {
        assert_eq!(pair[0]["role"], "user");
        assert_eq!(pair[1]["role"], "assistant");
        let asked = pair[0]["content"].as_str().unwrap();
        let answer = pair[1]["content"].as_str().unwrap();
        assert!(
            answer.starts_with(&format!("echo: {asked} [")),
            "reply {answer:?} does not follow its own message {asked:?}"
        );
        assert!(seen.insert(asked.to_string()));
    }
    assert_eq!(api.get("/v1/sessions/busy").await.body["interactions"], 20);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn history_survives_a_restart_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = runtime(config(dir.path()), None).await;
        let server = start(&rt, Auth::off());
        let api = Api::new(&server);
        api.create("durable").await;
        api.chat("durable", "remember the number 42").await;
        server.stop().await.unwrap();
    }
    let rt = runtime(config(dir.path()), None).await;
    let server = start(&rt, Auth::off());
    let api = Api::new(&server);
    let h = api.history("durable").await;
    assert_eq!(contents(&h)[0], "remember the number 42");
    assert_eq!(h.len(), 2);
    let r = api.chat("durable", "what was it?").await;
    assert!(
        r.body["reply"]
            .as_str()
            .unwrap()
            .contains("2 earlier messages in context, the first: \"remember the number 42\""),
        "{r:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_graceful_stop_finishes_the_turns_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::with_delay(Duration::from_millis(600));
    let rt = runtime(config(dir.path()), Some(model.clone())).await;
    let server = start(&rt, Auth::off());
    let api = Arc::new(Api::new(&server));
    api.create("inflight").await;
    let api2 = api.clone();
    let chat = tokio::spawn(async move { api2.chat("inflight", "slow turn").await });
    // Stop once the model has the request (the turn is in flight).
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the turn never reached the model"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.stop().await.unwrap();
    let r = chat.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["reply"], "reply to: slow turn");
    // The server is gone; the turn is in the store.
    assert!(api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .is_err());
    drop(rt);
    let rt = runtime(config(dir.path()), None).await;
    let s = rt.session("inflight").existing().open().await.unwrap();
    let h = s.history().await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].content, "reply to: slow turn");
}
