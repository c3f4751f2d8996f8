//! The OpenAI-compatible provider: one HTTP client for any server that
//! speaks `POST /v1/chat/completions` (OpenAI, Ollama, vLLM, llama.cpp,
//! LM Studio).
//!
//! Why it looks the way it does:
//!
//! - **One client, built once.** [`OpenAiModel::new`] builds a single
//!   `reqwest::Client` (its connection pool is shared by every session and
//!   agent using the model). Building fails where the machine has no CA
//!   store; for a plain `http://` server (the usual local set-up) the model
//!   then falls back to a client that trusts no certificate, since it never
//!   speaks TLS; for `https://` the failure is a clear
//!   [`ModelError::Config`].
//! - **Every attempt has a deadline** ([`OpenAiSettings::timeout`]); a model
//!   server that hangs costs one timeout per attempt, not a stuck session.
//!   For streams the deadline covers establishing the stream and each gap
//!   between pieces, not the whole reply (a long reply legitimately takes
//!   long).
//! - **Retries only where retrying can help**: HTTP 429, any 5xx, connection
//!   errors and timeouts, with exponential backoff (plus a little jitter so
//!   many sessions do not retry in lockstep) and the server's `Retry-After`
//!   (capped) on 429/503. Any other 4xx means the request itself is wrong:
//!   it fails at once with the status and the start of the body. A stream is
//!   retried only until its first byte; once pieces were handed out a retry
//!   would repeat them.
//! - **The SSE parser is a small pure state machine** ([`SseParser`]), so
//!   network chunking (an event split across reads, CRLF line ends, a UTF-8
//!   character cut in half) is tested without a network.
//!
//! ```no_run
//! # async fn demo() -> Result<(), troupe::model::ModelError> {
//! use std::time::Duration;
//! use troupe::model::{ChatModel, ChatRequest, OpenAiModel, OpenAiSettings, PromptMessage};
//! use troupe::Role;
//!
//! let model = OpenAiModel::new(OpenAiSettings {
//!     base_url: "http://localhost:11434/v1".into(), // Ollama
//!     model: "llama3.2".into(),
//!     api_key: None,
//!     temperature: Some(0.2),
//!     max_tokens: None,
//!     timeout: Duration::from_secs(60),
//!     max_retries: 3,
//!     backoff: Duration::from_millis(200),
//! })?;
//! let reply = model
//!     .complete(&ChatRequest {
//!         messages: vec![PromptMessage::new(Role::User, "Hello")],
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("{}", reply.content);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;

use super::{ChatModel, ChatRequest, ChatResponse, ModelError, TextStream, Usage};
use crate::config::ModelConfig;

/// The longest a `Retry-After` header (or the doubling backoff) may make us wait.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// How much of an error body goes into [`ModelError::Status`].
const ERROR_BODY_CHARS: usize = 500;
/// The longest SSE line accepted; a server sending more without a line end is broken.
const MAX_SSE_LINE: usize = 8 * 1024 * 1024;

/// Settings of an OpenAI-compatible model.
///
/// `Debug` shows whether an API key is set, never the key itself, so the
/// settings can be logged.
#[derive(Clone)]
pub struct OpenAiSettings {
    /// Base URL, up to and including `/v1`.
    pub base_url: String,
    /// Model name sent to the server.
    pub model: String,
    /// Bearer token, if the server needs one.
    pub api_key: Option<String>,
    /// Sampling temperature (a request's own temperature wins).
    pub temperature: Option<f32>,
    /// Most tokens in a reply (a request's own limit wins).
    pub max_tokens: Option<u32>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff delay; doubles each retry.
    pub backoff: Duration,
}

impl std::fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl OpenAiSettings {
    /// Settings from `[model]`; the API key is read from the variable `api_key_env` names.
    pub fn from_config(config: &ModelConfig) -> Result<Self, ModelError> {
        Ok(OpenAiSettings {
            base_url: config.base_url.trim_end_matches('/').to_string(),
            model: config.model.clone(),
            api_key: std::env::var(&config.api_key_env)
                .ok()
                .filter(|k| !k.is_empty()),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            timeout: Duration::from_secs(config.timeout_secs),
            max_retries: config.max_retries,
            backoff: Duration::from_millis(200),
        })
    }
}

/// A model behind an OpenAI-compatible HTTP API.
///
/// Cheap to share (`Arc`): every call reuses the one HTTP client and its
/// connection pool.
pub struct OpenAiModel {
    settings: OpenAiSettings,
    client: reqwest::Client,
    /// `{base_url}/chat/completions`.
    url: String,
    /// `Bearer <key>`, marked sensitive, when a key is set.
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for OpenAiModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiModel")
            .field("url", &self.url)
            .field("settings", &self.settings)
            .finish()
    }
}

impl OpenAiModel {
    /// A client for the server the settings name. Fails with
    /// [`ModelError::Config`] when the base URL is not an `http(s)` URL, the
    /// API key cannot go in a header, or no HTTP client can be built.
    pub fn new(settings: OpenAiSettings) -> Result<Self, ModelError> {
        let base = settings.base_url.trim_end_matches('/');
        let parsed = reqwest::Url::parse(base).map_err(|e| {
            ModelError::Config(format!(
                "model base_url '{}' is not a URL: {e}",
                settings.base_url
            ))
        })?;
        let plain_http = match parsed.scheme() {
            "http" => true,
            "https" => false,
            other => {
                return Err(ModelError::Config(format!(
                    "model base_url '{}' must start with http:// or https://, not {other}://",
                    settings.base_url
                )))
            }
        };
        if settings.model.trim().is_empty() {
            return Err(ModelError::Config(format!(
                "no model name set for the server at '{}'",
                settings.base_url
            )));
        }
        let url = format!("{base}/chat/completions");
        let auth = match &settings.api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    ModelError::Config(
                        "the API key contains characters not allowed in an HTTP header \
                         (a stray newline or quote in the variable?)"
                            .into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let client = build_client(plain_http, &settings.base_url)?;
        Ok(OpenAiModel {
            settings,
            client,
            url,
            auth,
        })
    }

    /// The endpoint every request goes to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The JSON body for `request`.
    fn body<'a>(&'a self, request: &'a ChatRequest, stream: bool) -> WireRequest<'a> {
        WireRequest {
            model: &self.settings.model,
            messages: request
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: m.role.as_str(),
                    content: &m.content,
                    name: m.name.as_deref(),
                })
                .collect(),
            temperature: request.temperature.or(self.settings.temperature),
            max_tokens: request.max_tokens.or(self.settings.max_tokens),
            stream,
        }
    }

    /// Sends the request once and checks the status; the caller bounds it with the timeout.
    async fn send_once(&self, body: &WireRequest<'_>) -> Result<reqwest::Response, Failure> {
        let mut req = self.client.post(&self.url).json(body);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if body.stream {
            req = req.header(reqwest::header::ACCEPT, "text/event-stream");
        }
        let resp = req.send().await.map_err(|e| self.transport_failure(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                retry_after(resp.headers())
            }
            _ => None,
        };
        // The body explains the status; read what arrives, but a broken
        // body must not hide the status itself.
        let text = resp.text().await.unwrap_or_default();
        Err(Failure {
            error: ModelError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
                body: clip(text.trim(), ERROR_BODY_CHARS),
            },
            retry: is_retryable_status(status),
            retry_after,
        })
    }

    /// A request that never got an answer: bad configuration (not retried)
    /// or a transport problem (retried).
    fn transport_failure(&self, e: &reqwest::Error) -> Failure {
        if e.is_builder() {
            return Failure::fatal(ModelError::Config(format!(
                "cannot build the request to {}: {}",
                self.url,
                error_chain(e)
            )));
        }
        if e.is_timeout() {
            return Failure::retry(self.timeout_error());
        }
        Failure::retry(ModelError::Unreachable {
            url: self.url.clone(),
            reason: error_chain(e),
        })
    }

    fn timeout_error(&self) -> ModelError {
        ModelError::Timeout {
            url: self.url.clone(),
            // Rounded up so a sub-second timeout never reads "within 0 s".
            secs: self.settings.timeout.as_secs_f64().ceil() as u64,
        }
    }

    /// Runs `attempt` (bounded by the per-attempt timeout) until it succeeds,
    /// fails for good, or the retries are spent.
    async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T, ModelError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempts = self.settings.max_retries.saturating_add(1);
        let mut n = 0u32;
        loop {
            n += 1;
            let failure = match tokio::time::timeout(self.settings.timeout, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(f)) => f,
                Err(_) => Failure::retry(self.timeout_error()),
            };
            if !failure.retry || n >= attempts {
                return Err(match failure.error {
                    ModelError::Unreachable { url, reason } if n > 1 => ModelError::Unreachable {
                        url,
                        reason: format!("{reason} (after {n} attempts)"),
                    },
                    e => e,
                });
            }
            let wait = failure
                .retry_after
                .map(|d| d.min(MAX_RETRY_WAIT))
                .unwrap_or_else(|| backoff_delay(self.settings.backoff, n - 1, rand::random()));
            tracing::warn!(
                url = %self.url,
                attempt = n,
                of = attempts,
                wait_ms = wait.as_millis() as u64,
                error = %failure.error,
                "model call failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// Builds the one HTTP client. Without a system CA store reqwest cannot
/// build a TLS verifier; a plain-http model never needs one, so it gets a
/// client that trusts no certificate at all instead of an error.
fn build_client(plain_http: bool, base_url: &str) -> Result<reqwest::Client, ModelError> {
    crate::init_tls();
    let builder =
        || reqwest::Client::builder().user_agent(concat!("troupe/", env!("CARGO_PKG_VERSION")));
    match builder().build() {
        Ok(c) => Ok(c),
        Err(first) if plain_http => {
            tracing::debug!(
                error = %error_chain(&first),
                "no TLS verifier (no CA store?); plain-http model client without TLS roots"
            );
            builder()
                .tls_certs_only(Vec::<reqwest::Certificate>::new())
                .build()
                .map_err(|e| {
                    ModelError::Config(format!(
                        "cannot build the HTTP client for '{base_url}': {} (and without TLS: {})",
                        error_chain(&first),
                        error_chain(&e)
                    ))
                })
        }
        Err(e) => Err(ModelError::Config(format!(
            "cannot build the HTTPS client for '{base_url}': {} \
             (is a system CA certificate store installed, e.g. the ca-certificates package?)",
            error_chain(&e)
        ))),
    }
}

#[async_trait]
impl ChatModel for OpenAiModel {
    fn name(&self) -> &str {
        &self.settings.model
    }

    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let body = self.body(request, false);
        self.with_retries(|| async {
            let resp = self.send_once(&body).await?;
            // A body cut off mid-way is a transport failure like any other.
            let bytes = resp.bytes().await.map_err(|e| {
                Failure::retry(ModelError::Unreachable {
                    url: self.url.clone(),
                    reason: format!("the reply was cut off: {}", error_chain(&e)),
                })
            })?;
            parse_completion(&bytes, &self.settings.model).map_err(|reason| {
                Failure::fatal(ModelError::BadReply {
                    url: self.url.clone(),
                    reason,
                })
            })
        })
        .await
    }

    async fn stream(&self, request: &ChatRequest) -> Result<TextStream, ModelError> {
        let body = self.body(request, true);
        let resp = self.with_retries(|| self.send_once(&body)).await?;
        let state = StreamState {
            body: resp.bytes_stream().boxed(),
            parser: SseParser::default(),
            out: VecDeque::new(),
            done: false,
            url: self.url.clone(),
            idle: self.settings.timeout,
            secs: self.settings.timeout.as_secs_f64().ceil() as u64,
        };
        Ok(futures::stream::unfold(state, StreamState::next_piece).boxed())
    }

    fn reply_meta(&self) -> Value {
        serde_json::json!({ "model": self.settings.model, "provider": "openai" })
    }
}

/// Why one attempt failed, and whether another may help.
struct Failure {
    error: ModelError,
    retry: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn retry(error: ModelError) -> Self {
        Failure {
            error,
            retry: true,
            retry_after: None,
        }
    }

    fn fatal(error: ModelError) -> Self {
        Failure {
            error,
            retry: false,
            retry_after: None,
        }
    }
}

/// 429 (slow down) and 5xx (server trouble) may pass; other statuses will not.
fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: the backoff applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = text.parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_RETRY_WAIT.as_secs_f64()),
    ))
}

/// The wait before retry number `retry + 1`: `first * 2^retry`, plus up to
/// 25% jitter (`jitter` in `[0, 1)`), never more than [`MAX_RETRY_WAIT`].
fn backoff_delay(first: Duration, retry: u32, jitter: f64) -> Duration {
    let base = first.saturating_mul(1u32 << retry.min(20));
    let jitter = jitter.clamp(0.0, 1.0) * 0.25;
    base.saturating_add(base.mul_f64(jitter))
        .min(MAX_RETRY_WAIT)
}

/// An error and its causes, `outer: inner: innermost` (reqwest's own
/// message alone says only "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// At most `max` characters of `s`, marked when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    stream: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// The server's own error message, when a JSON body carries one
/// (`{"error": {"message": ...}}` or `{"error": "..."}`).
fn server_error(v: &Value) -> Option<String> {
    let err = v.get("error")?;
    if err.is_null() {
        return None;
    }
    Some(match err.get("message").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None => match err.as_str() {
            Some(m) => m.to_string(),
            None => err.to_string(),
        },
    })
}

/// A chat completion body → the response, or what was wrong with it.
fn parse_completion(bytes: &[u8], fallback_model: &str) -> Result<ChatResponse, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not JSON ({e}): {}",
            clip(&String::from_utf8_lossy(bytes), 200)
        )
    })?;
    if let Some(msg) = server_error(&v) {
        return Err(format!("the server reported an error: {msg}"));
    }
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no 'choices' array in {}", clip(&v.to_string(), 200)))?
        .first()
        .ok_or("'choices' is empty")?;
    let content = choice
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "choices[0].message.content is missing or not text in {}",
                clip(&choice.to_string(), 200)
            )
        })?;
    let usage = v.get("usage").and_then(|u| {
        let tokens = |k: &str| {
            u.get(k)
                .and_then(Value::as_u64)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        match (tokens("prompt_tokens"), tokens("completion_tokens")) {
            (None, None) => None,
            (p, c) => Some(Usage {
                prompt_tokens: p.unwrap_or(0),
                completion_tokens: c.unwrap_or(0),
            }),
        }
    });
    Ok(ChatResponse {
        content: content.to_string(),
        model: v
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .unwrap_or(fallback_model)
            .to_string(),
        usage,
    })
}

/// What one SSE event of a chat stream means.
#[derive(Debug, PartialEq)]
enum Chunk {
    /// A piece of reply text.
    Text(String),
    /// Nothing to show (a role-only delta, a usage chunk, an empty piece).
    Nothing,
    /// `data: [DONE]`: the reply is complete.
    Done,
}

/// One SSE event's data → what it means for the reply.
fn parse_chunk(data: &str) -> Result<Chunk, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("stream event is not JSON ({e}): {}", clip(data, 200)))?;
    if let Some(msg) = server_error(&v) {
        return Err(format!("the server reported an error mid-stream: {msg}"));
    }
    let text = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(|c| c.get("delta"))
        .and_then(|d| d.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(if text.is_empty() {
        Chunk::Nothing
    } else {
        Chunk::Text(text.to_string())
    })
}

/// A Server-Sent Events parser: feed it bytes as they arrive, get back the
/// `data` of each complete event.
///
/// Follows the SSE rules that matter here: lines end in `\n`, `\r\n` or
/// `\r` (also when the two bytes of a `\r\n` arrive in different reads); a
/// blank line ends an event; the `data` lines of one event are joined with
/// `\n`; `:` lines are comments; other fields (`event`, `id`, `retry`) are
/// ignored. Bytes are decoded per complete line, so a UTF-8 character cut
/// between two reads survives.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// Bytes of the line being received.
    buf: Vec<u8>,
    /// The `data` of the event being received.
    data: String,
    /// Whether the event being received has any `data` line.
    has_data: bool,
}

impl SseParser {
    /// Takes the next bytes; returns the data of every event they complete.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(off) = self.buf[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = start + off;
            let width = if self.buf[end] == b'\r' {
                match self.buf.get(end + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    // A `\r` last: its `\n` may be in the next read.
                    None => break,
                }
            } else {
                1
            };
            let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
            if let Some(ev) = self.line(&line) {
                events.push(ev);
            }
            start = end + width;
        }
        self.buf.drain(..start);
        events
    }

    /// The stream ended: the data of an event left without its blank line, if any.
    pub(crate) fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let mut last = None;
        let text = String::from_utf8_lossy(&rest);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        if !text.is_empty() {
            last = self.line(text);
        }
        last.or_else(|| self.line(""))
    }

    /// Bytes held waiting for a line end.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    fn line(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            if !self.has_data {
                return None;
            }
            self.has_data = false;
            let mut data = std::mem::take(&mut self.data);
            if data.ends_with('\n') {
                data.pop();
            }
            return Some(data);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            self.data.push_str(value);
            self.data.push('\n');
            self.has_data = true;
        }
        None
    }
}

/// The state of a reply stream being read. Generic over the chunk type so
/// reqwest's `Bytes` need not be named (no direct `bytes` dependency).
struct StreamState<B> {
    body: BoxStream<'static, reqwest::Result<B>>,
    parser: SseParser,
    /// Items decoded but not handed out yet, in order.
    out: VecDeque<Result<String, ModelError>>,
    /// No more reading: `[DONE]`, the end of the body, or an error.
    done: bool,
    url: String,
    /// The longest wait for the next bytes.
    idle: Duration,
    secs: u64,
}

impl<B: AsRef<[u8]> + Send + 'static> StreamState<B> {
    async fn next_piece(mut self) -> Option<(Result<String, ModelError>, Self)> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match tokio::time::timeout(self.idle, self.body.next()).await {
                Err(_) => {
                    self.done = true;
                    let err = ModelError::Timeout {
                        url: self.url.clone(),
                        secs: self.secs,
                    };
                    return Some((Err(err), self));
                }
                Ok(Some(Ok(bytes))) => {
                    let events = self.parser.feed(bytes.as_ref());
                    self.take(events);
                    if !self.done && self.parser.pending_bytes() > MAX_SSE_LINE {
                        self.fail(format!("a stream line is longer than {MAX_SSE_LINE} bytes"));
                    }
                }
                Ok(Some(Err(e))) => {
                    self.done = true;
                    let err = ModelError::Unreachable {
                        url: self.url.clone(),
                        reason: format!("the stream broke off: {}", error_chain(&e)),
                    };
                    return Some((Err(err), self));
                }
                Ok(None) => {
                    // A clean end without `[DONE]`: take what the server sent.
                    let last = self.parser.finish();
                    self.take(last);
                    self.done = true;
                }
            }
        }
    }

    /// Queues what `events` mean, up to `[DONE]` or the first error.
    fn take(&mut self, events: impl IntoIterator<Item = String>) {
        for data in events {
            if self.done {
                return;
            }
            match parse_chunk(&data) {
                Ok(Chunk::Text(t)) => self.out.push_back(Ok(t)),
                Ok(Chunk::Nothing) => {}
                Ok(Chunk::Done) => self.done = true,
                Err(reason) => self.fail(reason),
            }
        }
    }

    fn fail(&mut self, reason: String) {
        self.done = true;
        self.out.push_back(Err(ModelError::BadReply {
            url: self.url.clone(),
            reason,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(p: &mut SseParser, parts: &[&[u8]]) -> Vec<String> {
        parts.iter().flat_map(|b| p.feed(b)).collect()
    }

    #[test]
    fn sse_events_in_one_read() {
        let mut p = SseParser::default();
        let ev = p.feed(b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n");
        assert_eq!(ev, vec!["{\"a\":1}", "{\"a\":2}", "[DONE]"]);
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn sse_event_split_anywhere_is_reassembled() {
        let whole = b"data: {\"x\":\"hello\"}\n\ndata: [DONE]\n\n";
        for cut in 0..=whole.len() {
            let mut p = SseParser::default();
            let ev = feed_all(&mut p, &[&whole[..cut], &whole[cut..]]);
            assert_eq!(ev, vec!["{\"x\":\"hello\"}", "[DONE]"], "cut at {cut}");
        }
        // One byte at a time.
        let mut p = SseParser::default();
        let parts: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(
            feed_all(&mut p, &parts),
            vec!["{\"x\":\"hello\"}", "[DONE]"]
        );
    }

    #[test]
    fn sse_crlf_and_cr_line_ends_including_split_crlf() {
        let mut p = SseParser::default();
        let ev = feed_all(
            &mut p,
            &[b"data: a\r", b"\n\r", b"\ndata: b\r\rdata: c\r\n\r\n"],
        );
        assert_eq!(ev, vec!["a", "b", "c"]);
    }

    #[test]
    fn sse_multi_line_data_is_joined_with_newlines() {
        let mut p = SseParser::default();
        let ev = p.feed(b"data: {\"a\":\ndata:  1}\ndata\n\n");
        assert_eq!(ev, vec!["{\"a\":\n 1}\n"]);
    }

    #[test]
    fn sse_comments_other_fields_and_blank_lines_are_ignored() {
        let mut p = SseParser::default();
        let ev = p.feed(b": keep-alive\n\n\n\nevent: message\nid: 7\nretry: 10\ndata:x\n\n");
        assert_eq!(ev, vec!["x"]);
    }

    #[test]
    fn sse_utf8_character_split_between_reads_survives() {
        let whole = "data: héllo ✓\n\n".as_bytes();
        let cut = whole
            .iter()
            .position(|&b| b == 0xE2)
            .map(|i| i + 1)
            .unwrap_or(0);
        let mut p = SseParser::default();
        let ev = feed_all(&mut p, &[&whole[..cut], &whole[cut..]]);
        assert_eq!(ev, vec!["héllo ✓"]);
    }

    #[test]
    fn sse_event_without_final_blank_line_is_kept_at_the_end() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: last").is_empty());
        assert_eq!(p.finish(), Some("last".into()));
        let mut p = SseParser::default();
        assert!(p.feed(b"data: last\r\n").is_empty());
        assert_eq!(p.finish(), Some("last".into()));
    }

    proptest::proptest! {
        /// However the network cuts the bytes, and whichever line ends the
        /// server uses, the same events come out in the same order.
        #[test]
        fn sse_events_survive_any_chunking(
            events in proptest::collection::vec("[^\r\n]{0,20}", 0..6),
            ends in proptest::collection::vec(0usize..3, 6),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let eol = |i: usize| ["\n", "\r\n", "\r"][ends[i % ends.len()]];
            let mut wire = String::from(": hello\n");
            for (i, e) in events.iter().enumerate() {
                wire.push_str("data: ");
                wire.push_str(e);
                // The same end twice: "\r" then "\n" would be one CRLF.
                wire.push_str(eol(i));
                wire.push_str(eol(i));
            }
            let bytes = wire.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut p = SseParser::default();
            let mut got = Vec::new();
            let mut from = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(p.feed(&bytes[from..c]));
                from = c;
            }
            got.extend(p.finish());
            proptest::prop_assert_eq!(got, events);
        }
    }

    #[test]
    fn chunks_mean_text_nothing_done_or_error() {
        let text = r#"{"choices":[{"delta":{"content":"Hi"}}]}"#;
        assert_eq!(parse_chunk(text), Ok(Chunk::Text("Hi".into())));
        let role = r#"{"choices":[{"delta":{"role":"assistant"}}]}"#;
        assert_eq!(parse_chunk(role), Ok(Chunk::Nothing));
        assert_eq!(
            parse_chunk(r#"{"choices":[],"usage":{}}"#),
            Ok(Chunk::Nothing)
        );
        assert_eq!(parse_chunk(" [DONE] "), Ok(Chunk::Done));
        let err = parse_chunk(r#"{"error":{"message":"overloaded"}}"#).unwrap_err();
        assert!(err.contains("overloaded"), "{err}");
        assert!(parse_chunk("{nope").is_err());
    }

    #[test]
    fn completion_is_parsed_with_usage_and_model() {
        let body =
            br#"{"model":"m-1","choices":[{"message":{"role":"assistant","content":"Hello"}}],
                        "usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        let r = parse_completion(body, "fallback").unwrap();
        assert_eq!(r.content, "Hello");
        assert_eq!(r.model, "m-1");
        assert_eq!(
            r.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 3
            })
        );
        let r = parse_completion(br#"{"choices":[{"message":{"content":""}}]}"#, "fb").unwrap();
        assert_eq!(
            (r.content.as_str(), r.model.as_str(), r.usage),
            ("", "fb", None)
        );
    }

    #[test]
    fn bad_completions_say_what_is_wrong() {
        let e = parse_completion(b"<html>oops</html>", "m").unwrap_err();
        assert!(e.contains("not JSON") && e.contains("oops"), "{e}");
        let e = parse_completion(br#"{"id":"x"}"#, "m").unwrap_err();
        assert!(e.contains("choices"), "{e}");
        let e = parse_completion(br#"{"choices":[]}"#, "m").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e =
            parse_completion(br#"{"choices":[{"message":{"content":null}}]}"#, "m").unwrap_err();
        assert!(e.contains("content"), "{e}");
        let e = parse_completion(br#"{"error":{"message":"model not found"}}"#, "m").unwrap_err();
        assert!(e.contains("model not found"), "{e}");
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_a_cap() {
        let first = Duration::from_millis(100);
        assert_eq!(backoff_delay(first, 0, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(first, 1, 0.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(first, 3, 0.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(first, 1, 1.0), Duration::from_millis(250));
        assert_eq!(backoff_delay(first, 30, 0.5), MAX_RETRY_WAIT);
        assert_eq!(backoff_delay(first, u32::MAX, 0.0), MAX_RETRY_WAIT);
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("3600"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_WAIT));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn only_429_and_5xx_are_retried() {
        assert!(is_retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_retryable_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(is_retryable_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!is_retryable_status(StatusCode::BAD_REQUEST));
        assert!(!is_retryable_status(StatusCode::UNAUTHORIZED));
        assert!(!is_retryable_status(StatusCode::NOT_FOUND));
    }

    #[test]
    fn settings_debug_hides_the_key() {
        let s = OpenAiSettings {
            base_url: "http://x/v1".into(),
            model: "m".into(),
            api_key: Some("sk-secret".into()),
            temperature: None,
            max_tokens: None,
            timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff: Duration::from_millis(1),
        };
        let text = format!("{s:?}");
        assert!(
            !text.contains("sk-secret") && text.contains("<set>"),
            "{text}"
        );
    }

    #[test]
    fn bad_settings_are_config_errors() {
        let ok = OpenAiSettings {
            base_url: "http://127.0.0.1:1/v1/".into(),
            model: "m".into(),
            api_key: None,
            temperature: None,
            max_tokens: None,
            timeout: Duration::from_secs(1),
            max_retries: 0,
            backoff: Duration::from_millis(1),
        };
        let m = OpenAiModel::new(ok.clone()).unwrap();
        assert_eq!(m.url(), "http://127.0.0.1:1/v1/chat/completions");
        for (base, key) in [
            ("not a url", None),
            ("ftp://x/v1", None),
            ("http://x/v1", Some("a\nb")),
        ] {
            let s = OpenAiSettings {
                base_url: base.into(),
                api_key: key.map(String::from),
                ..ok.clone()
            };
            match OpenAiModel::new(s) {
                Err(ModelError::Config(msg)) => assert!(!msg.is_empty()),
                other => panic!("{base}: expected a config error, got {other:?}"),
            }
        }
    }
}
