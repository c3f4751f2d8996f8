//! The OpenAI-compatible provider against a fake server that records every
//! request and answers from a script: what troupe sends (prompt, history,
//! model, auth), how it retries, times out and fails, how it reads streams,
//! and one end-to-end conversation through the runtime.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use serde_json::{json, Value};
use troupe::model::{
    ChatModel, ChatRequest, ModelError, OpenAiModel, OpenAiSettings, PromptMessage,
};
use troupe::Role;

/// One request the fake server received.
#[derive(Clone, Debug)]
struct Recorded {
    path: String,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `(role, content)` of each message sent.
    fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or("?").to_string(),
                            m["content"].as_str().unwrap_or("?").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What the fake server does with one request.
enum Reply {
    /// A status and a JSON body.
    Json(u16, Value),
    /// A status, a text body and optional `Retry-After`.
    Text(u16, &'static str, Option<&'static str>),
    /// Never answer.
    Hang,
    /// `text/event-stream`, written piece by piece with a short pause
    /// between writes so they reach the client as separate reads.
    Sse(Vec<Vec<u8>>),
}

fn sse<P: Into<Vec<u8>>>(parts: impl IntoIterator<Item = P>) -> Reply {
    Reply::Sse(parts.into_iter().map(Into::into).collect())
}

fn completion(text: &str) -> Reply {
    Reply::Json(
        200,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "fake-model-0613",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        }),
    )
}

fn delta(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": text}}]})
    )
}

type Script = dyn Fn(usize) -> Reply + Send + Sync;

struct State {
    requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Script>,
}

async fn handle(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    let recorded = Recorded {
        path: req.path().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or("<binary>").to_string(),
                )
            })
            .collect(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let n = {
        let mut all = state.requests.lock().unwrap();
        all.push(recorded);
        all.len() - 1
    };
    let status =
        |code: u16| HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap());
    match (state.script)(n) {
        Reply::Json(code, v) => status(code).json(v),
        Reply::Text(code, text, retry_after) => {
            let mut r = status(code);
            if let Some(s) = retry_after {
                r.insert_header(("Retry-After", s));
            }
            r.body(text)
        }
        Reply::Hang => {
            futures::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Sse(writes) => {
            let body =
                futures::stream::iter(writes.into_iter().enumerate()).then(|(i, w)| async move {
                    if i > 0 {
                        actix_web::rt::time::sleep(Duration::from_millis(15)).await;
                    }
                    Ok::<_, actix_web::Error>(web::Bytes::from(w))
                });
            HttpResponse::Ok()
                .content_type("text/event-stream")
                .streaming(body)
        }
    }
}

/// A fake OpenAI-compatible server on `127.0.0.1:0`, on its own thread
/// with its own actix system; stopped when dropped.
struct FakeServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> FakeServer {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (tx, rx) = std::sync::mpsc::channel();
        let recs = requests.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(State {
                            requests: recs.clone(),
                            script: script.clone(),
                        }))
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

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn settings(&self) -> OpenAiSettings {
        settings(&self.base_url())
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Sends the stop command now; the thread ends once the server has stopped.
        drop(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn settings(base_url: &str) -> OpenAiSettings {
    OpenAiSettings {
        base_url: base_url.to_string(),
        model: "fake-model".into(),
        api_key: None,
        temperature: None,
        max_tokens: None,
        timeout: Duration::from_secs(5),
        max_retries: 2,
        backoff: Duration::from_millis(10),
    }
}

fn prompt() -> ChatRequest {
    ChatRequest {
        messages: vec![
            PromptMessage::new(Role::System, "You are terse."),
            PromptMessage::new(Role::User, "My name is Alice"),
            PromptMessage {
                role: Role::Assistant,
                content: "Hello Alice".into(),
                name: Some("greeter".into()),
            },
            PromptMessage::new(Role::User, "What is my name?"),
        ],
        temperature: None,
        max_tokens: None,
    }
}

async fn collect(model: &OpenAiModel, req: &ChatRequest) -> Result<Vec<String>, ModelError> {
    let mut stream = model.stream(req).await?;
    let mut pieces = Vec::new();
    while let Some(p) = stream.next().await {
        pieces.push(p?);
    }
    Ok(pieces)
}

#[tokio::test]
async fn sends_the_prompt_model_and_key_and_reads_the_reply() {
    let server = FakeServer::start(|_| completion("Your name is Alice."));
    let model = OpenAiModel::new(OpenAiSettings {
        api_key: Some("sk-test-123".into()),
        temperature: Some(0.25),
        max_tokens: Some(64),
        ..server.settings()
    })
    .unwrap();

    let reply = model.complete(&prompt()).await.unwrap();
    assert_eq!(reply.content, "Your name is Alice.");
    assert_eq!(reply.model, "fake-model-0613");
    let usage = reply.usage.expect("usage reported");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (11, 7));

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some("Bearer sk-test-123"));
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/json"));
    assert_eq!(r.body["model"], "fake-model");
    assert_eq!(r.body["stream"], false);
    assert_eq!(r.body["temperature"], 0.25);
    assert_eq!(r.body["max_tokens"], 64);
    assert_eq!(
        r.messages(),
        vec![
            ("system".to_string(), "You are terse.".to_string()),
            ("user".into(), "My name is Alice".into()),
            ("assistant".into(), "Hello Alice".into()),
            ("user".into(), "What is my name?".into()),
        ]
    );
    assert_eq!(r.body["messages"][2]["name"], "greeter");
    assert!(r.body["messages"][1].get("name").is_none());

    assert_eq!(
        model.reply_meta(),
        json!({"model": "fake-model", "provider": "openai"})
    );
}

#[tokio::test]
async fn no_key_means_no_authorization_header_and_no_unset_options() {
    let server = FakeServer::start(|_| completion("ok"));
    let model = OpenAiModel::new(server.settings()).unwrap();
    model.complete(&prompt()).await.unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.header("authorization"), None);
    assert!(r.body.get("temperature").is_none(), "{}", r.body);
    assert!(r.body.get("max_tokens").is_none(), "{}", r.body);
}

#[tokio::test]
async fn request_options_override_the_settings() {
    let server = FakeServer::start(|_| completion("ok"));
    let model = OpenAiModel::new(OpenAiSettings {
        temperature: Some(0.9),
        max_tokens: Some(500),
        ..server.settings()
    })
    .unwrap();
    let req = ChatRequest {
        temperature: Some(0.0),
        max_tokens: Some(5),
        ..prompt()
    };
    model.complete(&req).await.unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.body["temperature"], 0.0);
    assert_eq!(r.body["max_tokens"], 5);
}

#[tokio::test]
async fn retries_503_then_succeeds() {
    let server = FakeServer::start(|n| match n {
        0 | 1 => Reply::Text(503, "busy", None),
        _ => completion("third time lucky"),
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    let reply = model.complete(&prompt()).await.unwrap();
    assert_eq!(reply.content, "third time lucky");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    // Every attempt carries the same request.
    assert!(reqs.iter().all(|r| r.body == reqs[0].body));
}

#[tokio::test]
async fn retries_429_honouring_retry_after() {
    let server = FakeServer::start(|n| match n {
        0 => Reply::Text(429, "slow down", Some("0")),
        _ => completion("ok"),
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    assert_eq!(model.complete(&prompt()).await.unwrap().content, "ok");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn gives_up_after_max_retries_with_the_last_status() {
    let server = FakeServer::start(|_| Reply::Text(500, "internal trouble", None));
    let model = OpenAiModel::new(OpenAiSettings {
        max_retries: 1,
        ..server.settings()
    })
    .unwrap();
    match model.complete(&prompt()).await {
        Err(ModelError::Status { status, body, .. }) => {
            assert_eq!(status, 500);
            assert_eq!(body, "internal trouble");
        }
        other => panic!("expected a status error, got {other:?}"),
    }
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_400_fails_at_once_naming_the_status_and_body() {
    let server = FakeServer::start(|_| {
        Reply::Json(
            400,
            json!({"error": {"message": "model 'fake-model' does not exist", "type": "invalid_request_error"}}),
        )
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    let err = model.complete(&prompt()).await.unwrap_err();
    match &err {
        ModelError::Status { status, body, url } => {
            assert_eq!(*status, 400);
            assert!(body.contains("does not exist"), "{body}");
            assert!(url.ends_with("/v1/chat/completions"), "{url}");
        }
        other => panic!("expected a status error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("400") && text.contains("does not exist"),
        "{text}"
    );
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_long_error_body_is_cut() {
    let long: &'static str = Box::leak("x".repeat(5000).into_boxed_str());
    let server = FakeServer::start(move |_| Reply::Text(401, long, None));
    let model = OpenAiModel::new(server.settings()).unwrap();
    match model.complete(&prompt()).await {
        Err(ModelError::Status {
            status: 401, body, ..
        }) => {
            assert!(
                body.chars().count() <= 501,
                "{} chars",
                body.chars().count()
            )
        }
        other => panic!("expected a 401, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_replies_are_bad_replies_not_retried() {
    let server = FakeServer::start(|n| match n {
        0 => Reply::Text(200, "this is not json", None),
        _ => Reply::Json(200, json!({"id": "x", "object": "chat.completion"})),
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    match model.complete(&prompt()).await {
        Err(ModelError::BadReply { reason, .. }) => {
            assert!(reason.contains("not JSON"), "{reason}")
        }
        other => panic!("expected a bad reply, got {other:?}"),
    }
    match model.complete(&prompt()).await {
        Err(ModelError::BadReply { reason, .. }) => assert!(reason.contains("choices"), "{reason}"),
        other => panic!("expected a bad reply, got {other:?}"),
    }
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_hanging_server_times_out() {
    let server = FakeServer::start(|_| Reply::Hang);
    let model = OpenAiModel::new(OpenAiSettings {
        timeout: Duration::from_millis(200),
        max_retries: 0,
        ..server.settings()
    })
    .unwrap();
    match model.complete(&prompt()).await {
        Err(ModelError::Timeout { url, secs }) => {
            assert!(url.ends_with("/chat/completions"), "{url}");
            assert_eq!(secs, 1, "a sub-second timeout reads as 1 s, not 0");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    match model.stream(&prompt()).await {
        Err(ModelError::Timeout { .. }) => {}
        Err(other) => panic!("expected a timeout, got {other:?}"),
        Ok(_) => panic!("expected a timeout, got a stream"),
    }
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let server = FakeServer::start(|n| match n {
        0 => Reply::Hang,
        _ => completion("after the hang"),
    });
    let model = OpenAiModel::new(OpenAiSettings {
        timeout: Duration::from_millis(200),
        max_retries: 1,
        ..server.settings()
    })
    .unwrap();
    assert_eq!(
        model.complete(&prompt()).await.unwrap().content,
        "after the hang"
    );
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_closed_port_is_unreachable_after_the_retries() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let model = OpenAiModel::new(settings(&format!("http://127.0.0.1:{port}/v1"))).unwrap();
    match model.complete(&prompt()).await {
        Err(ModelError::Unreachable { url, reason }) => {
            assert_eq!(url, format!("http://127.0.0.1:{port}/v1/chat/completions"));
            assert!(reason.contains("after 3 attempts"), "{reason}");
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    match model.stream(&prompt()).await {
        Err(ModelError::Unreachable { .. }) => {}
        Err(other) => panic!("expected unreachable, got {other:?}"),
        Ok(_) => panic!("expected unreachable, got a stream"),
    }
}

#[tokio::test]
async fn stream_pieces_arrive_in_order() {
    let server = FakeServer::start(|_| {
        sse([
            ": a comment first\n\n".to_string(),
            format!(
                "data: {}\n\n",
                json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            ),
            delta("Hel"),
            delta("lo, "),
            delta("Alice") + &delta("!"),
            "data: [DONE]\n\n".into(),
        ])
    });
    let model = OpenAiModel::new(OpenAiSettings {
        api_key: Some("sk-stream".into()),
        ..server.settings()
    })
    .unwrap();
    let pieces = collect(&model, &prompt()).await.unwrap();
    assert_eq!(pieces, vec!["Hel", "lo, ", "Alice", "!"]);
    let r = &server.requests()[0];
    assert_eq!(r.body["stream"], true);
    assert_eq!(r.header("authorization"), Some("Bearer sk-stream"));
    assert_eq!(r.messages().len(), 4);
}

#[tokio::test]
async fn stream_event_split_across_writes_is_reassembled() {
    let server = FakeServer::start(|_| {
        let first = delta("Bonjour");
        let (a, b) = first.split_at(first.len() / 2);
        let second = delta(" ✓ ça va").replace("\n\n", "\r\n\r\n");
        let cut = second.find('✓').unwrap_or(0) + 1; // inside the UTF-8 bytes of ✓
        let (c, d) = second.as_bytes().split_at(cut);
        sse([
            a.as_bytes(),
            b.as_bytes(),
            c, // ends inside the UTF-8 bytes of ✓
            d,
            b"data: [DO",
            b"NE]\n\n",
        ])
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    let pieces = collect(&model, &prompt()).await.unwrap();
    assert_eq!(pieces, vec!["Bonjour", " ✓ ça va"]);
}

#[tokio::test]
async fn stream_establishment_is_retried_but_a_400_is_not() {
    let server = FakeServer::start(|n| match n {
        0 => Reply::Text(503, "warming up", Some("0")),
        1 => sse([delta("ready"), "data: [DONE]\n\n".into()]),
        _ => Reply::Text(400, "bad stream request", None),
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    assert_eq!(collect(&model, &prompt()).await.unwrap(), vec!["ready"]);
    assert_eq!(server.requests().len(), 2);
    match model.stream(&prompt()).await {
        Err(ModelError::Status {
            status: 400, body, ..
        }) => assert_eq!(body, "bad stream request"),
        Err(other) => panic!("expected a 400, got {other:?}"),
        Ok(_) => panic!("expected a 400, got a stream"),
    }
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_stream_error_event_ends_the_stream_with_an_error() {
    let server = FakeServer::start(|_| {
        sse([
            delta("partial"),
            format!(
                "data: {}\n\n",
                json!({"error": {"message": "backend crashed"}})
            ),
            delta("never seen"),
        ])
    });
    let model = OpenAiModel::new(server.settings()).unwrap();
    let mut stream = model.stream(&prompt()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "partial");
    match stream.next().await {
        Some(Err(ModelError::BadReply { reason, .. })) => {
            assert!(reason.contains("backend crashed"), "{reason}")
        }
        other => panic!("expected a bad reply, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn conversation_through_the_runtime_sends_the_history_in_order() {
    let server = FakeServer::start(|n| completion(&format!("reply {}", n + 1)));
    let model = OpenAiModel::new(server.settings()).unwrap();
    let rt = troupe::Runtime::builder()
        .memory_store()
        .model(Arc::new(model))
        .build()
        .await
        .unwrap();
    let session = rt.session("s1").open().await.unwrap();

    let first = session.chat("My name is Alice").await.unwrap();
    assert_eq!(first.reply, "reply 1");
    let meta = first.meta.clone().expect("reply metadata");
    assert_eq!(meta["provider"], "openai");
    assert_eq!(meta["model"], "fake-model");
    let second = session.chat("What is my name?").await.unwrap();
    assert_eq!(second.reply, "reply 2");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    let msgs = reqs[1].messages();
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    assert_eq!(msgs[0].0, "system");
    assert!(!msgs[0].1.is_empty());
    assert_eq!(
        msgs[1..].to_vec(),
        vec![
            ("user".to_string(), "My name is Alice".to_string()),
            ("assistant".into(), "reply 1".into()),
            ("user".into(), "What is my name?".into()),
        ]
    );
    assert_eq!(reqs[1].body["model"], "fake-model");
    rt.shutdown().await.unwrap();
}
