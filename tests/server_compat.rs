//! Clients people already use, against the daemon on 127.0.0.1:0: the
//! OpenAI-compatible endpoint (reqwest, and the official `openai` Python
//! package when `TROUPE_TEST_PYTHON` names an interpreter that has it) and
//! the PraisonAI agent protocol, with per-session isolation.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use troupe::config::{Config, SyncMode};
use troupe::server::auth::issue_token;
use troupe::server::{Auth, Server, ServerHandle, TokenKeys};
use troupe::Runtime;

fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.store.path = dir.join("troupe.db");
    c.store.sync = SyncMode::Normal;
    c.agents.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
    c.server.workers = 2;
    c
}

async fn start(dir: &Path, auth: Auth) -> (Runtime, ServerHandle) {
    let rt = Runtime::builder()
        .config(config(dir))
        .build()
        .await
        .unwrap();
    let server = Server::new(rt.clone(), rt.config().server.clone())
        .auth(auth)
        .bind("127.0.0.1:0")
        .unwrap()
        .run()
        .unwrap();
    (rt, server)
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

async fn json_of(res: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value, String) {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, headers, body, text)
}

async fn history(http: &reqwest::Client, base: &str, id: &str) -> Vec<String> {
    let res = http
        .get(format!("{base}/v1/sessions/{id}/history?limit=1000"))
        .send()
        .await
        .unwrap();
    let (status, _, body, text) = json_of(res).await;
    assert_eq!(status, 200, "{text}");
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn openai_chat_completions_keep_the_history_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, server) = start(dir.path(), Auth::off()).await;
    let http = http();
    let url = format!("{}/v1/chat/completions", server.url());
    let ask = |session: Option<&str>, body: Value| {
        let mut rb = http.post(&url).json(&body);
        if let Some(s) = session {
            rb = rb.header("X-Session-Id", s);
        }
        rb.send()
    };
    // A whole transcript: only the last user message is the turn.
    let r = ask(
        Some("oa-1"),
        json!({"model": "writer", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "My name is Ada"}
        ], "temperature": 0.3}),
    )
    .await
    .unwrap();
    let (status, headers, body, text) = json_of(r).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-session-id"], "oa-1");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "writer");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let u = &body["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let reply = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(reply.starts_with("echo: My name is Ada"), "{reply}");
    assert!(reply.contains("no earlier messages"), "{reply}");
    assert_eq!(
        history(&http, &server.url(), "oa-1").await,
        ["My name is Ada", reply]
    );
    // Only the new message: the server remembers.
    let r = ask(
        Some("oa-1"),
        json!({"model": "writer", "messages": [{"role": "user", "content": "What is my name?"}]}),
    )
    .await
    .unwrap();
    let (_, _, body, _) = json_of(r).await;
    let reply = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        reply.contains("2 earlier messages in context, the first: \"My name is Ada\""),
        "{reply}"
    );

    // Streaming: chat.completion.chunk events, then [DONE].
    let r = ask(
        Some("oa-1"),
        json!({"model": "writer", "stream": true, "messages": [{"role": "user", "content": "stream this please"}]}),
    )
    .await
    .unwrap();
    let (status, headers, _, text) = json_of(r).await;
    assert_eq!(status, 200, "{text}");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(headers["x-session-id"], "oa-1");
    let data: Vec<&str> = text
        .split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|b| b.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(*data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() > 4, "{text}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.windows(2).all(|w| w[0]["id"] == w[1]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(
        streamed.starts_with("echo: stream this please"),
        "{streamed}"
    );
    assert!(streamed.contains("4 earlier messages"), "{streamed}");
    assert_eq!(history(&http, &server.url(), "oa-1").await.len(), 6);

    // No X-Session-Id: `user` names the session; with neither, a new one.
    let r = ask(
        None,
        json!({"model": "assistant", "user": "oa-user", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    let (_, headers, _, _) = json_of(r).await;
    assert_eq!(headers["x-session-id"], "oa-user");
    let r = ask(
        None,
        json!({"model": "assistant", "messages": [{"role": "user", "content": "who am I?"}]}),
    )
    .await
    .unwrap();
    let (status, headers, _, _) = json_of(r).await;
    assert_eq!(status, 200);
    let new_id = headers["x-session-id"].to_str().unwrap().to_string();
    assert_eq!(new_id.len(), 36, "{new_id}");
    assert_eq!(history(&http, &server.url(), &new_id).await.len(), 2);

    // Errors are JSON with the right status.
    let r = ask(
        Some("oa-1"),
        json!({"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    let (status, _, body, _) = json_of(r).await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nobody"));
    let r = ask(
        Some("oa-1"),
        json!({"model": "assistant", "messages": [{"role": "system", "content": "x"}]}),
    )
    .await
    .unwrap();
    let (status, _, body, _) = json_of(r).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    let r = ask(Some("oa-1"), json!({"messages": []})).await.unwrap();
    assert_eq!(json_of(r).await.0, 400);
    // The models list names the agents.
    let r = http
        .get(format!("{}/v1/models", server.url()))
        .send()
        .await
        .unwrap();
    let (_, _, body, _) = json_of(r).await;
    assert!(body["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "writer"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn session_tokens_reach_only_their_session_on_the_compatible_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TokenKeys::parse("k1:secret").unwrap();
    let (_rt, server) = start(dir.path(), Auth::new("admin", Some(keys.clone()))).await;
    let http = http();
    let token = issue_token(&keys, "tok-a", Duration::from_secs(600)).unwrap();
    let completions = format!("{}/v1/chat/completions", server.url());
    let body = json!({"model": "assistant", "messages": [{"role": "user", "content": "hi"}]});
    let r = http
        .post(&completions)
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, headers, _, text) = json_of(r).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-session-id"], "tok-a");
    let r = http
        .post(&completions)
        .bearer_auth(&token)
        .header("X-Session-Id", "tok-b")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 403);
    let r = http.post(&completions).json(&body).send().await.unwrap();
    assert_eq!(json_of(r).await.0, 401);
    let agent = format!("{}/agents/assistant", server.url());
    let r = http
        .post(&agent)
        .bearer_auth(&token)
        .json(&json!({"query": "hello"}))
        .send()
        .await
        .unwrap();
    let (status, _, body, _) = json_of(r).await;
    assert_eq!(status, 200);
    assert_eq!(body["session_id"], "tok-a");
    let r = http
        .post(&agent)
        .bearer_auth(&token)
        .json(&json!({"query": "hello", "session_id": "tok-b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 403);
    // The health checks stay public, so a PraisonAI client can connect.
    let r = http.get(format!("{agent}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_token_never_selects_a_user_on_the_compatible_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TokenKeys::parse("k1:secret").unwrap();
    let (rt, server) = start(dir.path(), Auth::new("admin", Some(keys.clone()))).await;
    let http = http();
    let base = server.url();
    let token = issue_token(&keys, "tok-u", Duration::from_secs(600)).unwrap();
    let user_of = |id: &'static str| {
        let rt = rt.clone();
        async move {
            let s = rt.session(id).existing().open().await.unwrap();
            s.metadata().await.unwrap().user_id
        }
    };
    let completions = format!("{base}/v1/chat/completions");
    let msg = json!([{"role": "user", "content": "hi"}]);
    // `user` as the session id (no X-Session-Id): the session is created
    // without a user.
    let r = http
        .post(&completions)
        .bearer_auth(&token)
        .json(&json!({"model": "assistant", "messages": msg, "user": "tok-u"}))
        .send()
        .await
        .unwrap();
    let (status, headers, _, text) = json_of(r).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-session-id"], "tok-u");
    assert_eq!(user_of("tok-u").await, None);
    // With X-Session-Id, `user` names a user: ignored for a token, also
    // after deleting the session so that this request creates it.
    for _ in 0..2 {
        let r = http
            .post(&completions)
            .bearer_auth(&token)
            .header("X-Session-Id", "tok-u")
            .json(&json!({"model": "assistant", "messages": msg, "user": "victim"}))
            .send()
            .await
            .unwrap();
        let (status, _, _, text) = json_of(r).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(user_of("tok-u").await, None);
        let r = http
            .delete(format!("{base}/v1/sessions/tok-u"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
    }
    // PraisonAI's user_id (its clients always send one): ignored for a
    // token, never a way to reach another user.
    let agent = format!("{base}/agents/assistant");
    let r = http
        .post(&agent)
        .bearer_auth(&token)
        .json(&json!({"query": "hello", "session_id": "tok-u", "user_id": "victim"}))
        .send()
        .await
        .unwrap();
    let (status, _, _, text) = json_of(r).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        user_of("tok-u").await,
        None,
        "a token's user_id selected a user"
    );
    let r = http
        .post(&agent)
        .bearer_auth(&token)
        .json(&json!({"query": "hello", "session_id": "tok-u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 200);
    assert_eq!(user_of("tok-u").await, None);
    // The admin sets users, on both endpoints.
    let r = http
        .post(&agent)
        .bearer_auth("admin")
        .json(&json!({"query": "hello", "session_id": "adm-p", "user_id": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 200);
    assert_eq!(user_of("adm-p").await.as_deref(), Some("alice"));
    let r = http
        .post(&completions)
        .bearer_auth("admin")
        .header("X-Session-Id", "adm-o")
        .json(&json!({"model": "assistant", "messages": msg, "user": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 200);
    assert_eq!(user_of("adm-o").await.as_deref(), Some("alice"));
    // Once the admin gave tok-u a user, the token may name that one.
    let r = http
        .post(format!("{base}/v1/sessions"))
        .bearer_auth("admin")
        .json(&json!({"session_id": "tok-u", "user_id": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 200);
    let r = http
        .post(&agent)
        .bearer_auth(&token)
        .json(&json!({"query": "hello", "session_id": "tok-u", "user_id": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 200);
    assert_eq!(user_of("tok-u").await.as_deref(), Some("bob"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn openai_messages_must_end_with_the_new_user_message() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, server) = start(dir.path(), Auth::off()).await;
    let http = http();
    let base = server.url();
    let url = format!("{base}/v1/chat/completions");
    let ask = |messages: Value| {
        http.post(&url)
            .header("X-Session-Id", "oa-tools")
            .json(&json!({"model": "assistant", "messages": messages}))
            .send()
    };
    let r = ask(json!([{"role": "user", "content": "What is the weather?"}]))
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 200);
    // A tool-calling client sends the tool's result (or ends with the
    // assistant's message): the old user message must not be replayed.
    for (last, role) in [
        (
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
            "tool",
        ),
        (
            json!({"role": "assistant", "content": "It is sunny."}),
            "assistant",
        ),
    ] {
        let r = ask(json!([
            {"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "weather", "arguments": "{}"}}]},
            last
        ]))
        .await
        .unwrap();
        let (status, _, body, text) = json_of(r).await;
        assert_eq!(status, 400, "{text}");
        assert_eq!(body["error"]["code"], "bad_request");
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains(&format!("\"{role}\"")), "{m}");
    }
    assert_eq!(history(&http, &base, "oa-tools").await.len(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_official_openai_python_client_talks_to_a_persistent_session() {
    let Some(python) = std::env::var_os("TROUPE_TEST_PYTHON") else {
        eprintln!(
            "skipped: TROUPE_TEST_PYTHON is not set (.ci/run sets it to a venv with the openai package)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = TokenKeys::parse("k1:py-secret").unwrap();
    let (rt, server) = start(dir.path(), Auth::new("py-admin", Some(keys.clone()))).await;
    let token = issue_token(&keys, "py-token", Duration::from_secs(600)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let base = format!("{}/v1", server.url());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([base.as_str(), "py-admin", token.as_str(), "py-token", "1"])
            .output()
    })
    .await
    .unwrap()
    .expect("run the TROUPE_TEST_PYTHON interpreter");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("openai client: ok"), "{stdout}\n{stderr}");
    // What the Python client did is in the server's sessions.
    let s = rt.session("py-1").existing().open().await.unwrap();
    let h = s.history().await.unwrap();
    assert_eq!(h.len(), 6);
    assert_eq!(h[0].content, "My name is Ada");
    assert_eq!(h[4].content, "Third message, streamed");
    let t = rt.session("py-token").existing().open().await.unwrap();
    assert_eq!(t.history().await.unwrap()[0].content, "token turn");
    server.stop().await.unwrap();
}

/// A client that speaks exactly PraisonAI's remote-agent protocol: given
/// `agent_url`, it checks `GET {agent_url}/health` (200), falling back to
/// `HEAD {agent_url}` (200 or 405); then every message is `POST {agent_url}`
/// with `{"query", "session_id", "user_id", …}`, reading `"response"`.
struct PraisonClient {
    http: reqwest::Client,
    agent_url: String,
    session_id: Option<String>,
    user_id: String,
}

impl PraisonClient {
    async fn connect(agent_url: String, session_id: Option<&str>) -> Result<Self, String> {
        let http = http();
        let health = http.get(format!("{agent_url}/health")).send().await;
        let ok = match health {
            Ok(r) if r.status().as_u16() == 200 => true,
            _ => {
                let head = http
                    .request(Method::HEAD, &agent_url)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                matches!(head.status().as_u16(), 200 | 405)
            }
        };
        if !ok {
            return Err(format!("agent at {agent_url} is not available"));
        }
        Ok(PraisonClient {
            http,
            agent_url,
            session_id: session_id.map(str::to_string),
            user_id: "praison-user".into(),
        })
    }

    async fn chat(&self, query: &str) -> (String, Value) {
        let mut body =
            json!({"query": query, "user_id": self.user_id, "stream": false, "context": {"k": 1}});
        if let Some(s) = &self.session_id {
            body["session_id"] = json!(s);
        }
        let r = self
            .http
            .post(&self.agent_url)
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, _, body, text) = json_of(r).await;
        assert_eq!(status, 200, "{text}");
        (body["response"].as_str().unwrap().to_string(), body)
    }
}

#[tokio::test]
async fn the_praisonai_protocol_with_a_history_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, server) = start(dir.path(), Auth::off()).await;
    let http = http();
    let base = server.url();
    // The probes, exactly.
    let r = http
        .get(format!("{base}/agents/writer/health"))
        .send()
        .await
        .unwrap();
    let (status, _, body, _) = json_of(r).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status": "ok", "agent": "writer"}));
    let r = http
        .request(Method::HEAD, format!("{base}/agents/writer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .request(Method::HEAD, format!("{base}/agents/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert!(
        PraisonClient::connect(format!("{base}/agents/nobody"), None)
            .await
            .is_err()
    );

    // Two clients with their own sessions: each remembers only its own.
    let a = PraisonClient::connect(format!("{base}/agents/writer"), Some("pr-a"))
        .await
        .unwrap();
    let b = PraisonClient::connect(format!("{base}/agents/writer"), Some("pr-b"))
        .await
        .unwrap();
    let (first, body) = a.chat("I like green tea").await;
    assert_eq!(body["session_id"], "pr-a");
    assert_eq!(body["agent"], "writer");
    assert!(first.contains("no earlier messages"), "{first}");
    let (rb, _) = b.chat("I like coffee").await;
    assert!(
        rb.contains("no earlier messages"),
        "b saw a's history: {rb}"
    );
    let (again, _) = a.chat("What do I like?").await;
    assert!(
        again.contains("2 earlier messages in context, the first: \"I like green tea\""),
        "{again}"
    );
    let (b2, _) = b.chat("And me?").await;
    assert!(b2.contains("the first: \"I like coffee\""), "{b2}");
    assert!(!b2.contains("tea"), "{b2}");
    // Persistent: the sessions are real sessions with the agent and user.
    let s = rt.session("pr-a").existing().open().await.unwrap();
    let meta = s.metadata().await.unwrap();
    assert_eq!(meta.agents, ["writer"]);
    assert_eq!(meta.user_id.as_deref(), Some("praison-user"));
    assert_eq!(s.history().await.unwrap().len(), 4);

    // No session id: a fresh session each time, its id returned.
    let anon = PraisonClient::connect(format!("{base}/agents/writer"), None)
        .await
        .unwrap();
    let (r1, body1) = anon.chat("hello").await;
    let (_, body2) = anon.chat("hello").await;
    assert!(r1.contains("no earlier messages"));
    assert_ne!(body1["session_id"], body2["session_id"]);
    assert_eq!(body1["session_id"].as_str().unwrap().len(), 36);
    // Bad requests are JSON errors.
    let r = http
        .post(format!("{base}/agents/writer"))
        .json(&json!({"session_id": "pr-a"}))
        .send()
        .await
        .unwrap();
    let (status, _, body, _) = json_of(r).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("query"));
    let r = http
        .post(format!("{base}/agents/nobody"))
        .json(&json!({"query": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.0, 404);
    server.stop().await.unwrap();
}
