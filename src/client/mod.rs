//! [`RemoteSession`]: a session that lives on a `troupe serve` daemon.
//!
//! The state stays on the server (its store, its actors); the client holds
//! only the session id, the server's address and a credential. The methods
//! mirror [`crate::Session`] where they make sense over a network: `chat`,
//! `chat_stream`, `history`, `recent`, `checkpoint`, `checkpoints`,
//! `restore_id`, `save_version`, `preferences`, `update_preference`,
//! `profile`, `update_profile`, `metadata`.
//!
//! ```no_run
//! # async fn demo(token: String) -> troupe::Result<()> {
//! let remote = troupe::client::RemoteSession::connect("http://127.0.0.1:8000", "user_456")
//!     .token(token)
//!     .await?;
//! let reply = remote.chat("Hello from remote client").await?;
//! # let _ = reply; Ok(()) }
//! ```
//!
//! **Retries.** Calls that are safe to repeat (reads, preference updates,
//! opening the session) are retried on connection errors, 502, 503 and 504
//! with a doubling backoff. A chat turn is *not* retried: the server may have
//! applied it before the connection broke, and sending it again would add a
//! second turn. Its error says so, and `history()` tells what happened.
//!
//! **Errors** are [`Error::Remote`] carrying the request, the HTTP status,
//! the server's error code and its message; `is_not_found()` is true for 404.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::SseParser;
use crate::session::{ChatReply, SessionMetadata, StreamEvent};
use crate::store::{JsonMap, Message, MessageId, Role};
use crate::{Error, Result};

/// How a remote call identifies itself.
#[derive(Clone)]
enum Credential {
    None,
    Bearer(String),
}

/// Opens a [`RemoteSession`]: set the credential and options, then `.await`.
#[must_use = "a Connect does nothing until awaited"]
pub struct Connect {
    base: String,
    session_id: String,
    credential: Credential,
    agent: Option<String>,
    user: Option<String>,
    timeout: Duration,
    retries: u32,
    create: bool,
}

impl Connect {
    /// A signed session token (`troupe token issue --session ID`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.credential = Credential::Bearer(token.into());
        self
    }

    /// The daemon's admin API key instead of a session token.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.credential = Credential::Bearer(key.into());
        self
    }

    /// The agent the session talks to when it is created (default: the server's default agent).
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// The user the session belongs to when it is created.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Per-request timeout (default 60 s; a turn waits for the model).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attempts of an idempotent call on a transient failure (default 3).
    pub fn retries(mut self, attempts: u32) -> Self {
        self.retries = attempts.max(1);
        self
    }

    /// Only attach to a session that exists (404 otherwise) instead of
    /// creating it.
    pub fn existing(mut self) -> Self {
        self.create = false;
        self
    }

    async fn open(self) -> Result<RemoteSession> {
        crate::init_tls();
        let base = self.base.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .user_agent(concat!("troupe-remote/", env!("CARGO_PKG_VERSION")))
            .timeout(self.timeout)
            .connect_timeout(Duration::from_secs(5).min(self.timeout))
            .build()
            .or_else(|first| {
                // No system CA store: a plain-http daemon needs none.
                if base.starts_with("http://") {
                    reqwest::Client::builder()
                        .timeout(self.timeout)
                        .tls_certs_only(Vec::<reqwest::Certificate>::new())
                        .build()
                } else {
                    Err(first)
                }
            })
            .map_err(|e| Error::Remote {
                url: base.clone(),
                status: None,
                code: "client".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let remote = RemoteSession {
            http,
            base,
            id: self.session_id,
            credential: self.credential,
            retries: self.retries,
        };
        let metadata: Value = if self.create {
            let mut body = json!({ "session_id": remote.id });
            if let Some(a) = &self.agent {
                body["agent"] = json!(a);
            }
            if let Some(u) = &self.user {
                body["user_id"] = json!(u);
            }
            // Creating is idempotent on the server (200 when it exists), so it may be retried.
            remote
                .call(Method::POST, "/v1/sessions", Some(&body), true)
                .await?
        } else {
            remote
                .call(Method::GET, &remote.path(""), None, true)
                .await?
        };
        tracing::debug!(session = %remote.id, ?metadata, "remote session open");
        Ok(remote)
    }
}

impl IntoFuture for Connect {
    type Output = Result<RemoteSession>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<RemoteSession>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.open())
    }
}

/// A session served by a daemon. `Clone` is cheap (one shared HTTP pool).
#[derive(Clone)]
pub struct RemoteSession {
    http: reqwest::Client,
    base: String,
    id: String,
    credential: Credential,
    retries: u32,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("base", &self.base)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A checkpoint as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteCheckpoint {
    /// Its id (give it to [`RemoteSession::restore_id`]).
    pub id: String,
    /// Its label.
    #[serde(default)]
    pub label: Option<String>,
    /// `manual`, `auto`, `version`, `branch`.
    #[serde(default)]
    pub kind: Option<Value>,
    /// When it was taken.
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// The head of the history it points at.
    #[serde(default)]
    pub head: Option<MessageId>,
}

#[derive(Deserialize)]
struct WireMessage {
    id: MessageId,
    role: Role,
    content: String,
    #[serde(default)]
    agent: Option<String>,
    created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct HistoryPage {
    messages: Vec<WireMessage>,
    #[serde(default)]
    next: Option<MessageId>,
}

impl RemoteSession {
    /// Starts opening session `session_id` on the daemon at `base_url`
    /// (created there if it does not exist, unless [`Connect::existing`]).
    pub fn connect(base_url: impl Into<String>, session_id: impl Into<String>) -> Connect {
        Connect {
            base: base_url.into(),
            session_id: session_id.into(),
            credential: Credential::None,
            agent: None,
            user: None,
            timeout: Duration::from_secs(60),
            retries: 3,
            create: true,
        }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The daemon's address.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn path(&self, rest: &str) -> String {
        format!("/v1/sessions/{}{rest}", encode_segment(&self.id))
    }

    /// One turn with the session's default agent. Not retried (see the module docs).
    pub async fn chat(&self, message: impl Into<String>) -> Result<ChatReply> {
        self.chat_inner(None, message.into()).await
    }

    /// One turn with a named agent of the session.
    pub async fn chat_with(&self, agent: &str, message: impl Into<String>) -> Result<ChatReply> {
        self.chat_inner(Some(agent), message.into()).await
    }

    async fn chat_inner(&self, agent: Option<&str>, message: String) -> Result<ChatReply> {
        let mut body = json!({ "message": message });
        if let Some(a) = agent {
            body["agent"] = json!(a);
        }
        self.call(Method::POST, &self.path("/chat"), Some(&body), false)
            .await
    }

    /// One turn whose reply arrives piece by piece (Server-Sent Events); the
    /// last item is [`StreamEvent::Done`], sent by the server once the turn is durable.
    pub async fn chat_stream(
        &self,
        message: impl Into<String>,
    ) -> Result<impl Stream<Item = Result<StreamEvent>> + Send + 'static> {
        let url = format!("{}{}", self.base, self.path("/chat"));
        let what = format!("POST {url}");
        let response = self
            .request(Method::POST, &url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&json!({ "message": message.into() }))
            .send()
            .await
            .map_err(|e| transport_error(&what, &e))?;
        let response = check_status(&what, response).await?;
        let body = response.bytes_stream().boxed();
        let state = (
            body,
            SseParser::default(),
            std::collections::VecDeque::new(),
            false,
        );
        Ok(futures::stream::unfold(
            state,
            move |(mut body, mut parser, mut out, mut done)| {
                let what = what.clone();
                async move {
                    loop {
                        if let Some(item) = out.pop_front() {
                            return Some((item, (body, parser, out, done)));
                        }
                        if done {
                            return None;
                        }
                        let events = match body.next().await {
                            Some(Ok(bytes)) => parser.feed(&bytes),
                            Some(Err(e)) => {
                                done = true;
                                out.push_back(Err(transport_error(&what, &e)));
                                continue;
                            }
                            None => {
                                done = true;
                                let rest: Vec<String> = parser.finish().into_iter().collect();
                                let before = out.len();
                                decode_events(&what, rest, &mut out, &mut done);
                                if out.len() == before
                                    && !matches!(out.back(), Some(Ok(StreamEvent::Done(_))))
                                {
                                    out.push_back(Err(Error::Remote {
                                        url: what.clone(),
                                        status: None,
                                        code: "bad_response".into(),
                                        message: "the stream ended before the turn was done".into(),
                                    }));
                                }
                                continue;
                            }
                        };
                        decode_events(&what, events, &mut out, &mut done);
                    }
                }
            },
        ))
    }

    /// The whole history, root to head (fetched page by page).
    pub async fn history(&self) -> Result<Vec<Message>> {
        let mut pages: Vec<Vec<Message>> = Vec::new();
        let mut before: Option<MessageId> = None;
        loop {
            let page = self.history_page(Some(500), before).await?;
            let next = page.1;
            pages.push(page.0);
            match next {
                Some(n) if before != Some(n) => before = Some(n),
                _ => break,
            }
        }
        Ok(pages.into_iter().rev().flatten().collect())
    }

    /// The last `limit` messages of the history, oldest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Message>> {
        Ok(self.history_page(Some(limit), None).await?.0)
    }

    /// One page of history: at most `limit` messages before `before`
    /// (the head when `None`), oldest first, and the cursor of the page before it.
    pub async fn history_page(
        &self,
        limit: Option<usize>,
        before: Option<MessageId>,
    ) -> Result<(Vec<Message>, Option<MessageId>)> {
        let mut query = Vec::new();
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        if let Some(b) = before {
            query.push(format!("before={b}"));
        }
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        let page: HistoryPage = self
            .call(Method::GET, &self.path(&format!("/history{q}")), None, true)
            .await?;
        let messages = page
            .messages
            .into_iter()
            .map(|m| Message {
                id: m.id,
                parent: None,
                role: m.role,
                agent: m.agent,
                content: m.content,
                created_at: m.created_at,
                meta: None,
            })
            .collect();
        Ok((messages, page.next))
    }

    /// The session's metadata.
    pub async fn metadata(&self) -> Result<SessionMetadata> {
        let v: Value = self.call(Method::GET, &self.path(""), None, true).await?;
        metadata_from(&self.id, &v)
    }

    /// Takes a labelled checkpoint.
    pub async fn checkpoint(&self, label: impl Into<String>) -> Result<RemoteCheckpoint> {
        let body = json!({ "label": label.into() });
        // Not retried: a second attempt would take a second checkpoint.
        self.call(Method::POST, &self.path("/checkpoints"), Some(&body), false)
            .await
    }

    /// The session's checkpoints.
    pub async fn checkpoints(&self) -> Result<Vec<RemoteCheckpoint>> {
        let v: Value = self
            .call(Method::GET, &self.path("/checkpoints"), None, true)
            .await?;
        let list = v.get("checkpoints").cloned().unwrap_or(v);
        serde_json::from_value(list).map_err(|e| bad_response(&self.path("/checkpoints"), e))
    }

    /// Moves the session's head back to a checkpoint (nothing is deleted).
    pub async fn restore_id(&self, checkpoint_id: &str) -> Result<SessionMetadata> {
        let body = json!({ "checkpoint_id": checkpoint_id });
        let v: Value = self
            .call(Method::POST, &self.path("/restore"), Some(&body), true)
            .await?;
        metadata_from(&self.id, v.get("session").unwrap_or(&v))
    }

    /// Moves the session's head back to a checkpoint.
    pub async fn restore(&self, checkpoint: &RemoteCheckpoint) -> Result<SessionMetadata> {
        self.restore_id(&checkpoint.id).await
    }

    /// Saves a numbered version; returns its number.
    pub async fn save_version(&self, description: impl Into<String>) -> Result<u32> {
        let body = json!({ "description": description.into() });
        let v: Value = self
            .call(Method::POST, &self.path("/versions"), Some(&body), false)
            .await?;
        v.get("version")
            .and_then(Value::as_u64)
            .map(|n| n as u32)
            .ok_or_else(|| bad_response(&self.path("/versions"), "no \"version\" in the reply"))
    }

    /// Restores a numbered version.
    pub async fn restore_version(&self, version: u32) -> Result<SessionMetadata> {
        let v: Value = self
            .call(
                Method::POST,
                &self.path(&format!("/versions/{version}/restore")),
                Some(&json!({})),
                true,
            )
            .await?;
        metadata_from(&self.id, v.get("session").unwrap_or(&v))
    }

    /// The session's preferences.
    pub async fn preferences(&self) -> Result<JsonMap> {
        self.call(Method::GET, &self.path("/preferences"), None, true)
            .await
    }

    /// Sets one preference; returns them all.
    pub async fn update_preference(
        &self,
        key: impl Into<String>,
        value: impl Into<Value>,
    ) -> Result<JsonMap> {
        self.patch_one("/preferences", key.into(), value.into())
            .await
    }

    /// The user's profile as this session sees it.
    pub async fn profile(&self) -> Result<JsonMap> {
        self.call(Method::GET, &self.path("/profile"), None, true)
            .await
    }

    /// Sets one profile field; returns the whole profile.
    pub async fn update_profile(
        &self,
        key: impl Into<String>,
        value: impl Into<Value>,
    ) -> Result<JsonMap> {
        self.patch_one("/profile", key.into(), value.into()).await
    }

    /// `PATCH` of one key of a map (preferences, profile); idempotent.
    async fn patch_one(&self, map: &str, key: String, value: Value) -> Result<JsonMap> {
        let mut body = serde_json::Map::new();
        body.insert(key, value);
        self.call(
            Method::PATCH,
            &self.path(map),
            Some(&Value::Object(body)),
            true,
        )
        .await
    }

    /// Deletes the session on the server (its checkpoints too).
    pub async fn delete(self) -> Result<()> {
        let url = format!("{}{}", self.base, self.path(""));
        let what = format!("DELETE {url}");
        let response = self
            .request(Method::DELETE, &url)
            .send()
            .await
            .map_err(|e| transport_error(&what, &e))?;
        check_status(&what, response).await.map(|_| ())
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, url);
        match &self.credential {
            Credential::None => rb,
            Credential::Bearer(t) => rb.bearer_auth(t),
        }
    }

    /// One JSON call; `idempotent` calls are retried on transient failures.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotent: bool,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {url}");
        let attempts = if idempotent { self.retries } else { 1 };
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut rb = self.request(method.clone(), &url);
            if let Some(b) = body {
                rb = rb.json(b);
            }
            let result = match rb.send().await {
                Ok(response) => match check_status(&what, response).await {
                    Ok(response) => {
                        let bytes = response
                            .bytes()
                            .await
                            .map_err(|e| transport_error(&what, &e))?;
                        return serde_json::from_slice(&bytes).map_err(|e| bad_response(&what, e));
                    }
                    Err(e) => e,
                },
                Err(e) => transport_error(&what, &e),
            };
            let transient = match &result {
                Error::Remote {
                    status: Some(s), ..
                } => matches!(s, 502..=504),
                Error::Remote { code, .. } => code == "unreachable" || code == "timeout",
                _ => false,
            };
            if !transient || attempt >= attempts {
                return Err(result);
            }
            tracing::debug!(%what, attempt, error = %result, "retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// Percent-encodes one path segment (session ids are validated on the
/// server; this only keeps the URL well formed).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn transport_error(what: &str, e: &reqwest::Error) -> Error {
    let (code, message) = if e.is_timeout() {
        ("timeout", format!("no answer in time: {e}"))
    } else if e.is_connect() {
        ("unreachable", format!("cannot connect: {e}"))
    } else {
        ("unreachable", format!("request failed: {e}"))
    };
    Error::Remote {
        url: what.to_string(),
        status: None,
        code: code.into(),
        message,
    }
}

fn bad_response(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Remote {
        url: what.to_string(),
        status: None,
        code: "bad_response".into(),
        message: format!("unexpected reply from the server: {e}"),
    }
}

/// Turns a non-2xx answer into [`Error::Remote`] with the server's code and message.
async fn check_status(what: &str, response: reqwest::Response) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<Value>(&text) {
        Ok(v) => (
            v.pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or(status_code_name(status))
                .to_string(),
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| text.clone()),
        ),
        Err(_) => (
            status_code_name(status).to_string(),
            text.trim().to_string(),
        ),
    };
    Err(Error::Remote {
        url: what.to_string(),
        status: Some(status.as_u16()),
        code,
        message: format!("{} ({})", message, status.as_u16()),
    })
}

fn status_code_name(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("http_error")
}

/// Decodes SSE `data` payloads: `{"delta"}` → Delta, `{"reply",…}` → Done,
/// `{"error":{…}}` → an error that ends the stream.
fn decode_events(
    what: &str,
    events: Vec<String>,
    out: &mut std::collections::VecDeque<Result<StreamEvent>>,
    done: &mut bool,
) {
    for data in events {
        if *done && out.back().is_some_and(|e| e.is_err()) {
            break;
        }
        let v: Value = match serde_json::from_str(&data) {
            Ok(v) => v,
            Err(e) => {
                out.push_back(Err(bad_response(what, format!("bad event {data:?}: {e}"))));
                *done = true;
                break;
            }
        };
        if let Some(delta) = v.get("delta").and_then(Value::as_str) {
            out.push_back(Ok(StreamEvent::Delta(delta.to_string())));
        } else if let Some(err) = v.get("error") {
            out.push_back(Err(Error::Remote {
                url: what.to_string(),
                status: None,
                code: err
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_string(),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("the turn failed")
                    .to_string(),
            }));
            *done = true;
            break;
        } else if v.get("reply").is_some() {
            match serde_json::from_value::<ChatReply>(v) {
                Ok(r) => out.push_back(Ok(StreamEvent::Done(r))),
                Err(e) => out.push_back(Err(bad_response(what, e))),
            }
            *done = true;
            break;
        }
    }
}

fn metadata_from(id: &str, v: &Value) -> Result<SessionMetadata> {
    let get = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let parse_time = |k: &str| -> DateTime<Utc> {
        get(k)
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(Utc::now)
    };
    Ok(SessionMetadata {
        session_id: get("session_id")
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| id.to_string()),
        user_id: get("user_id").as_str().map(str::to_string),
        agents: serde_json::from_value(get("agents")).unwrap_or_default(),
        created_at: parse_time("created_at"),
        updated_at: parse_time("updated_at"),
        interactions: get("interactions").as_u64().unwrap_or(0),
        head: get("head").as_str().and_then(|s| s.parse().ok()),
        custom: serde_json::from_value(get("metadata")).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("user_456"), "user_456");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn events_decode_to_deltas_then_done() {
        let mut out = std::collections::VecDeque::new();
        let mut done = false;
        decode_events(
            "POST x",
            vec![
                r#"{"delta":"Hel"}"#.into(),
                r#"{"delta":"lo"}"#.into(),
                r#"{"session_id":"s","reply":"Hello","message_id":"a.1","agent":"assistant"}"#
                    .into(),
                r#"{"delta":"ignored after done"}"#.into(),
            ],
            &mut out,
            &mut done,
        );
        assert!(done);
        let items: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(items.len(), 3);
        assert!(matches!(&items[0], StreamEvent::Delta(d) if d == "Hel"));
        assert!(matches!(&items[2], StreamEvent::Done(r) if r.reply == "Hello"));
    }

    #[test]
    fn an_error_event_ends_the_stream_with_the_servers_code() {
        let mut out = std::collections::VecDeque::new();
        let mut done = false;
        decode_events(
            "POST x",
            vec![r#"{"error":{"code":"model_timeout","message":"slow"}}"#.into()],
            &mut out,
            &mut done,
        );
        assert!(done);
        match out.pop_front() {
            Some(Err(Error::Remote { code, message, .. })) => {
                assert_eq!(code, "model_timeout");
                assert_eq!(message, "slow");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
