//! The route table: every route of the daemon, once. The app is built from
//! it (`mod.rs`) and so is the OpenAPI document (`openapi.rs`), so the two
//! cannot drift apart.

use actix_web::{web, HttpResponse, Route};
use serde_json::json;

use super::auth::Access;
use super::sessions::StateMap;
use super::{openai, praison, runs, sessions, state, Data};

/// An HTTP method of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE
    Delete,
}

impl Verb {
    /// Upper case, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Head => "HEAD",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Patch => "PATCH",
            Verb::Delete => "DELETE",
        }
    }

    pub(crate) fn route(self) -> Route {
        match self {
            Verb::Get => web::get(),
            Verb::Head => web::head(),
            Verb::Post => web::post(),
            Verb::Put => web::put(),
            Verb::Patch => web::patch(),
            Verb::Delete => web::delete(),
        }
    }
}

/// One route: method, path pattern, who may call it, what it does.
#[derive(Clone, Copy)]
pub struct RouteSpec {
    /// The method.
    pub verb: Verb,
    /// The path pattern, with `{param}` segments.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// The status of a successful answer.
    pub status: u16,
    /// What it does, one line.
    pub summary: &'static str,
    /// An example request body, for the document.
    pub body: Option<fn() -> serde_json::Value>,
    pub(crate) handler: fn(Route) -> Route,
}

impl std::fmt::Debug for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb.as_str(), self.path)
    }
}

const fn r(
    verb: Verb,
    path: &'static str,
    access: Access,
    status: u16,
    summary: &'static str,
    handler: fn(Route) -> Route,
) -> RouteSpec {
    RouteSpec {
        verb,
        path,
        access,
        status,
        summary,
        body: None,
        handler,
    }
}

impl RouteSpec {
    const fn with_body(mut self, body: fn() -> serde_json::Value) -> Self {
        self.body = Some(body);
        self
    }
}

async fn healthz(state: Data) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "live_sessions": state.rt.live_sessions(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn metrics(state: Data) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(state.rt.live_sessions()))
}

async fn openapi_doc() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::document())
}

async fn agents(state: Data) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "agents": state.rt.agents() }))
}

/// Every route of the daemon.
pub fn table() -> Vec<RouteSpec> {
    use Access::*;
    use Verb::*;
    vec![
        r(Get, "/healthz", Public, 200, "Liveness: status, live sessions, version", |r| r.to(healthz)),
        r(Get, "/health", Public, 200, "Liveness (PraisonAI's path)", |r| r.to(healthz)),
        r(Get, "/metrics", Admin, 200, "Prometheus metrics (text format)", |r| r.to(metrics)),
        r(Get, "/v1/openapi.json", Public, 200, "This OpenAPI document", |r| r.to(openapi_doc)),
        r(Get, "/v1/agents", Admin, 200, "The agent definitions", |r| r.to(agents)),
        r(Post, "/v1/sessions", Caller, 201, "Create a session (200 if it exists)", |r| r.to(sessions::create))
            .with_body(|| json!({"session_id": "user_456", "agent": "assistant", "user_id": "alice"})),
        r(Get, "/v1/sessions", Admin, 200, "List sessions (?user_id=&limit=)", |r| r.to(sessions::list)),
        r(Get, "/v1/sessions/{id}", OwnSession, 200, "A session with its preferences and profile", |r| r.to(sessions::get)),
        r(Delete, "/v1/sessions/{id}", OwnSession, 204, "Delete a session", |r| r.to(sessions::delete)),
        r(Post, "/v1/sessions/{id}/chat", OwnSession, 200, "One turn; SSE with Accept: text/event-stream", |r| r.to(sessions::chat))
            .with_body(|| json!({"message": "Hello", "agent": "assistant"})),
        r(Get, "/v1/sessions/{id}/history", OwnSession, 200, "A page of the history (?limit=&before=)", |r| r.to(sessions::history)),
        r(Get, "/v1/sessions/{id}/checkpoints", OwnSession, 200, "The session's checkpoints", |r| r.to(sessions::checkpoints)),
        r(Post, "/v1/sessions/{id}/checkpoints", OwnSession, 201, "Take a checkpoint", |r| r.to(sessions::create_checkpoint))
            .with_body(|| json!({"label": "before-refactor"})),
        r(Post, "/v1/sessions/{id}/restore", OwnSession, 200, "Restore a checkpoint", |r| r.to(sessions::restore))
            .with_body(|| json!({"checkpoint_id": "…"})),
        r(Get, "/v1/sessions/{id}/versions", OwnSession, 200, "The saved versions", |r| r.to(sessions::versions)),
        r(Post, "/v1/sessions/{id}/versions", OwnSession, 201, "Save a version", |r| r.to(sessions::save_version))
            .with_body(|| json!({"description": "first draft"})),
        r(Post, "/v1/sessions/{id}/versions/{n}/restore", OwnSession, 200, "Restore version n", |r| r.to(sessions::restore_version)),
        r(Post, "/v1/sessions/{id}/fork", OwnSession, 201, "A new session from a checkpoint", |r| r.to(sessions::fork))
            .with_body(|| json!({"checkpoint_id": "…", "new_session_id": "user_456-b"})),
        r(Post, "/v1/sessions/{id}/merge", OwnSession, 201, "A new session with both histories", |r| r.to(sessions::merge))
            .with_body(|| json!({"other": "user_789", "new_session_id": "merged"})),
        r(Get, "/v1/sessions/{id}/preferences", OwnSession, 200, "The preferences", |r| {
            r.to(|s: Data, id: web::Path<String>| sessions::get_map(s, id, StateMap::Preferences))
        }),
        r(Patch, "/v1/sessions/{id}/preferences", OwnSession, 200, "Set preferences (an object of keys)", |r| {
            r.to(|s: Data, id: web::Path<String>, b: web::Json<serde_json::Value>| {
                sessions::patch_map(s, id, b, StateMap::Preferences)
            })
        })
        .with_body(|| json!({"language": "fr"})),
        r(Get, "/v1/sessions/{id}/profile", OwnSession, 200, "The profile", |r| {
            r.to(|s: Data, id: web::Path<String>| sessions::get_map(s, id, StateMap::Profile))
        }),
        r(Patch, "/v1/sessions/{id}/profile", OwnSession, 200, "Set profile fields (an object of keys)", |r| {
            r.to(|s: Data, id: web::Path<String>, b: web::Json<serde_json::Value>| {
                sessions::patch_map(s, id, b, StateMap::Profile)
            })
        })
        .with_body(|| json!({"name": "Alice"})),
        r(Get, "/v1/sessions/{id}/analytics", OwnSession, 200, "Session analytics: turns, duration, per-agent messages/latency/tokens, topics, feedback", |r| r.to(sessions::analytics)),
        r(Get, "/v1/sessions/{id}/context", OwnSession, 200, "What the agent sees of the user: profile, preferences, topics, duration", |r| r.to(sessions::context)),
        r(Post, "/v1/sessions/{id}/feedback", OwnSession, 204, "Rate a reply: {message_id, score}", |r| r.to(sessions::feedback))
            .with_body(|| json!({"message_id": "3f9a01c2.1", "score": 5})),
        r(Get, "/v1/users/{user}/memories", Admin, 200, "A user's memories (?q= full-text search, ?limit=)", |r| r.to(sessions::user_memories)),
        r(Post, "/v1/users/{user}/memories", Admin, 201, "Add a memory: {text} (200 if duplicate or below the threshold)", |r| r.to(sessions::add_user_memory))
            .with_body(|| json!({"text": "I prefer Python over JavaScript"})),
        r(Delete, "/v1/users/{user}", Admin, 200, "Forget a user's memories and profile (?sessions=true: and their sessions)", |r| r.to(sessions::forget_user)),
        r(Get, "/v1/state/{ns}", Admin, 200, "Entries of a namespace (?prefix=)", |r| r.to(state::list)),
        r(Get, "/v1/state/{ns}/{key}", Admin, 200, "A key's value and version (ETag)", |r| r.to(state::get)),
        r(Put, "/v1/state/{ns}/{key}", Admin, 200, "Set a key (If-Match / If-None-Match: *)", |r| r.to(state::put))
            .with_body(|| json!({"value": {"topic": "qubits"}})),
        r(Delete, "/v1/state/{ns}/{key}", Admin, 204, "Delete a key (If-Match)", |r| r.to(state::delete)),
        r(Post, "/v1/runs", Admin, 202, "Start a pipeline run", |r| r.to(runs::start))
            .with_body(|| json!({"pipeline": "article.toml", "inputs": {"topic": "qubits"}})),
        r(Get, "/v1/runs", Admin, 200, "Runs, newest first (?limit=)", |r| r.to(runs::list)),
        r(Get, "/v1/runs/{id}", Admin, 200, "A run with its task results", |r| r.to(runs::get)),
        r(Post, "/v1/chat/completions", Caller, 200, "OpenAI-compatible chat completions", |r| r.to(openai::completions))
            .with_body(|| json!({"model": "assistant", "messages": [{"role": "user", "content": "Hello"}], "stream": false})),
        r(Get, "/v1/models", Caller, 200, "The agents, as OpenAI models", |r| r.to(openai::models)),
        r(Get, "/agents/{name}/health", Public, 200, "PraisonAI agent health", |r| r.to(praison::health)),
        r(Head, "/agents/{name}", Public, 200, "PraisonAI agent health (HEAD fallback)", |r| r.to(praison::head)),
        r(Post, "/agents/{name}", Caller, 200, "PraisonAI query: {query, session_id} → {response}", |r| r.to(praison::query))
            .with_body(|| json!({"query": "Hello", "session_id": "user_456"})),
    ]
}
