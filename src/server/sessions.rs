//! `/v1/sessions…`: sessions, chat (JSON and SSE), history, checkpoints,
//! versions, fork, merge, preferences and profile.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::{sse, Data};
use crate::checkpoint::{Checkpoint, CheckpointKind};
use crate::error::Error;
use crate::session::{validate_session_id, ChatReply, Session, SessionMetadata, StreamEvent};
use crate::store::{JsonMap, Message, MessageId, SessionFilter, SessionRecord};

/// Opens a session that must exist (404 otherwise).
pub(crate) async fn open_existing(state: &Data, id: &str) -> Result<Session, ApiError> {
    validate_session_id(id)?;
    Ok(state.rt.session(id).existing().open().await?)
}

/// Opens `id` if it exists, else creates it with `agent` and `user`:
/// what the compatible endpoints do on a session's first use.
pub(crate) async fn open_or_create(
    state: &Data,
    id: &str,
    agent: &str,
    user: Option<&str>,
) -> Result<Session, ApiError> {
    validate_session_id(id)?;
    match state.rt.session(id).existing().open().await {
        Ok(s) => Ok(s),
        Err(Error::SessionNotFound(_)) => {
            let mut b = state.rt.session(id).agent_named(agent);
            if let Some(u) = user {
                b = b.user(u);
            }
            Ok(b.open().await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The user to give session `id` when `caller` asks for `user`: only the
/// admin sets or changes a session's user. A session token may name a user
/// only if it already is the session's user (then nothing changes: `None`
/// is returned, so no later open can attach another one); otherwise 403.
/// Without this, a token could attach its session to any user and read
/// that user's profile, preferences and memories.
pub(crate) async fn user_for(
    state: &Data,
    caller: &Caller,
    id: &str,
    user: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let Some(user) = user else {
        return Ok(None);
    };
    if *caller == Caller::Admin {
        return Ok(Some(user.to_string()));
    }
    validate_session_id(id)?;
    let current = match state.rt.session(id).existing().open().await {
        Ok(s) => s.metadata().await?.user_id,
        Err(Error::SessionNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if current.as_deref() == Some(user) {
        return Ok(None);
    }
    Err(ApiError::Forbidden(format!(
        "session '{id}': only the admin API key sets or changes a session's user; \
         this session token cannot give it user '{user}'"
    )))
}

/// One turn, counted in the metrics.
pub(crate) async fn turn(
    state: &Data,
    session: &Session,
    agent: Option<&str>,
    message: String,
) -> Result<ChatReply, ApiError> {
    let started = Instant::now();
    let reply = match agent {
        Some(a) => session.chat_with(a, message).await?,
        None => session.chat(message).await?,
    };
    state.metrics.turn(started.elapsed());
    Ok(reply)
}

/// A streamed turn whose first event has arrived: an error before any
/// text is returned as a plain error (with its status); after that, errors
/// come as events. Counted in the metrics when done.
pub(crate) async fn turn_stream(
    state: &Data,
    session: &Session,
    agent: Option<&str>,
    message: String,
) -> Result<impl futures::Stream<Item = Result<StreamEvent, ApiError>> + 'static, ApiError> {
    let started = Instant::now();
    let mut events = Box::pin(session.chat_stream_with(agent, message).await?);
    let first = match events.next().await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => return Err(e.into()),
        None => {
            return Err(ApiError::Unavailable(format!(
                "session '{}' ended the stream before the turn began",
                session.id()
            )))
        }
    };
    let metrics = state.metrics.clone();
    let rest = events.map(move |ev| {
        let ev = ev.map_err(ApiError::from);
        match &ev {
            Ok(StreamEvent::Done(_)) => metrics.turn(started.elapsed()),
            Err(ApiError::StoreFailed(_) | ApiError::StoreUnavailable(_)) => metrics.store_error(),
            _ => {}
        }
        ev
    });
    if let StreamEvent::Done(_) = &first {
        state.metrics.turn(started.elapsed());
    }
    Ok(futures::stream::once(async move { Ok(first) }).chain(rest))
}

fn metadata_json(m: &SessionMetadata) -> Value {
    json!({
        "session_id": m.session_id,
        "user_id": m.user_id,
        "agents": m.agents,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "interactions": m.interactions,
        "head": m.head,
        "metadata": m.custom,
    })
}

fn record_json(r: &SessionRecord) -> Value {
    let mut v = metadata_json(&SessionMetadata::from(r));
    v["preferences"] = Value::Object(r.preferences.clone());
    v["profile"] = Value::Object(r.profile.clone());
    v
}

fn message_json(m: &Message) -> Value {
    json!({
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "agent": m.agent,
        "created_at": m.created_at,
    })
}

fn checkpoint_json(c: &Checkpoint) -> Value {
    json!({
        "id": c.id,
        "session_id": c.session_id,
        "label": c.label,
        "description": c.description,
        "kind": c.kind,
        "created_at": c.created_at,
        "head": c.head,
        "interactions": c.state.interactions,
    })
}

/// Parses an optional JSON body: empty means `T::default()`.
pub(crate) fn optional_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

#[derive(Debug, Default, Deserialize)]
struct CreateBody {
    session_id: Option<String>,
    agent: Option<String>,
    #[serde(default)]
    agents: Vec<String>,
    user_id: Option<String>,
}

/// `POST /v1/sessions`: 201 with the new session, 200 if it existed.
pub(crate) async fn create(
    state: Data,
    caller: Caller,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: CreateBody = optional_body(&body)?;
    let id = match (body.session_id, caller.session()) {
        (Some(id), _) => id,
        (None, Some(own)) => own.to_string(),
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    validate_session_id(&id)?;
    caller.check_session(&id)?;
    let user = user_for(&state, &caller, &id, body.user_id.as_deref()).await?;
    let mut agents = body.agents;
    if let Some(a) = body.agent {
        if !agents.contains(&a) {
            agents.insert(0, a);
        }
    }
    for a in &agents {
        state.rt.agent(a)?;
    }
    let build = |existing: bool| {
        let mut b = state.rt.session(id.clone());
        if existing {
            b = b.existing();
        }
        if let Some(u) = &user {
            b = b.user(u.clone());
        }
        for a in &agents {
            b = b.agent_named(a.clone());
        }
        b
    };
    let (session, created) = match build(true).open().await {
        Ok(s) => (s, false),
        Err(Error::SessionNotFound(_)) => (build(false).open().await?, true),
        Err(e) => return Err(e.into()),
    };
    let meta = session.metadata().await?;
    let mut res = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(res.json(metadata_json(&meta)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    user_id: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/sessions?user_id=&limit=`.
pub(crate) async fn list(state: Data, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let filter = SessionFilter {
        user_id: q.user_id.clone(),
        limit: Some(q.limit.unwrap_or(100)),
        ..Default::default()
    };
    let sessions: Vec<Value> = state
        .rt
        .list_sessions(&filter)
        .await?
        .into_iter()
        .map(|s| {
            json!({
                "session_id": s.id,
                "user_id": s.user_id,
                "agents": s.agents,
                "created_at": s.created_at,
                "updated_at": s.updated_at,
                "interactions": s.interactions,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "sessions": sessions })))
}

/// `GET /v1/sessions/{id}`: the session with its preferences and profile.
pub(crate) async fn get(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    Ok(HttpResponse::Ok().json(record_json(&session.record().await?)))
}

/// `DELETE /v1/sessions/{id}`: 204, or 404 if there was no such session.
pub(crate) async fn delete(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    validate_session_id(&id)?;
    if state.rt.delete_session(&id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound(format!("session '{id}' not found")))
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatBody {
    message: String,
    agent: Option<String>,
}

/// `POST /v1/sessions/{id}/chat`: JSON, or SSE with `Accept: text/event-stream`.
pub(crate) async fn chat(
    state: Data,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Json<ChatBody>,
) -> Result<HttpResponse, ApiError> {
    let ChatBody { message, agent } = body.into_inner();
    // No `Open` round trip on the hot path: an unknown session fails the
    // turn itself with SessionNotFound (404) and keeps nothing alive.
    validate_session_id(&id)?;
    let session = state.rt.session(id.as_str()).attach()?;
    if !sse::wants_stream(&req) {
        let r = turn(&state, &session, agent.as_deref(), message).await?;
        return Ok(HttpResponse::Ok().json(json!({
            "session_id": r.session_id,
            "reply": r.reply,
            "message_id": r.message_id,
            "agent": r.agent,
        })));
    }
    let events = turn_stream(&state, &session, agent.as_deref(), message).await?;
    let frames = events.map(|ev| {
        Ok(match ev {
            Ok(StreamEvent::Delta(d)) => sse::event("token", &json!({ "delta": d })),
            Ok(StreamEvent::Done(r)) => sse::event(
                "done",
                &json!({"reply": r.reply, "message_id": r.message_id, "agent": r.agent, "session_id": r.session_id}),
            ),
            Err(e) => sse::event("error", &e.body()),
        })
    });
    Ok(sse::response(frames))
}

#[derive(Debug, Deserialize)]
pub(crate) struct HistoryQuery {
    limit: Option<usize>,
    before: Option<String>,
}

/// `GET /v1/sessions/{id}/history?limit=&before=`: a page of the history,
/// oldest first, ending just before `before` (or at the head); `next` is the
/// `before` of the previous (older) page, `null` on the first page.
pub(crate) async fn history(
    state: Data,
    id: web::Path<String>,
    q: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit={limit}: use 1 to 1000"
        )));
    }
    let before: Option<MessageId> = match &q.before {
        Some(b) => Some(b.parse().map_err(ApiError::BadRequest)?),
        None => None,
    };
    let session = open_existing(&state, &id).await?;
    // The whole path, so `before` is checked against this session's own
    // history: a message of another session is never a page boundary.
    let all = session.history().await?;
    let end = match before {
        Some(b) => all.iter().position(|m| m.id == b).ok_or_else(|| {
            ApiError::NotFound(format!(
                "message '{b}' is not in the history of session '{id}'"
            ))
        })?,
        None => all.len(),
    };
    let start = end.saturating_sub(limit);
    let messages: Vec<Value> = all[start..end].iter().map(message_json).collect();
    let next = (start > 0).then(|| all[start].id.to_string());
    Ok(HttpResponse::Ok().json(json!({ "messages": messages, "next": next })))
}

/// `GET /v1/sessions/{id}/checkpoints`.
pub(crate) async fn checkpoints(
    state: Data,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    let list: Vec<Value> = session
        .checkpoints()
        .await?
        .iter()
        .map(checkpoint_json)
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "checkpoints": list })))
}

#[derive(Debug, Default, Deserialize)]
struct CheckpointBody {
    label: Option<String>,
    description: Option<String>,
}

/// `POST /v1/sessions/{id}/checkpoints {"label"?, "description"?}` → 201.
pub(crate) async fn create_checkpoint(
    state: Data,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: CheckpointBody = optional_body(&body)?;
    let session = open_existing(&state, &id).await?;
    let cp = session
        .checkpoint_with(body.label, body.description, CheckpointKind::Manual)
        .await?;
    Ok(HttpResponse::Created().json(checkpoint_json(&cp)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct RestoreBody {
    checkpoint_id: String,
}

/// `POST /v1/sessions/{id}/restore {"checkpoint_id"}` → the session.
pub(crate) async fn restore(
    state: Data,
    id: web::Path<String>,
    body: web::Json<RestoreBody>,
) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    let meta = session.restore_id(&body.checkpoint_id).await?;
    Ok(HttpResponse::Ok().json(metadata_json(&meta)))
}

/// `GET /v1/sessions/{id}/versions`.
pub(crate) async fn versions(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    Ok(HttpResponse::Ok().json(json!({ "versions": session.list_versions().await? })))
}

#[derive(Debug, Default, Deserialize)]
struct VersionBody {
    #[serde(default)]
    description: String,
}

/// `POST /v1/sessions/{id}/versions {"description"}` → 201 `{"version": N}`.
pub(crate) async fn save_version(
    state: Data,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: VersionBody = optional_body(&body)?;
    let session = open_existing(&state, &id).await?;
    let version = session.save_version(body.description).await?;
    Ok(HttpResponse::Created().json(json!({ "version": version })))
}

/// `POST /v1/sessions/{id}/versions/{n}/restore` → the session.
pub(crate) async fn restore_version(
    state: Data,
    path: web::Path<(String, u32)>,
) -> Result<HttpResponse, ApiError> {
    let (id, n) = path.into_inner();
    let session = open_existing(&state, &id).await?;
    let meta = session.restore_version(n).await?;
    Ok(HttpResponse::Ok().json(metadata_json(&meta)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ForkBody {
    checkpoint_id: String,
    new_session_id: String,
}

async fn refuse_existing(state: &Data, id: &str) -> Result<(), ApiError> {
    validate_session_id(id)?;
    if state.rt.store().load_session(id, 0).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "session '{id}' already exists; choose another id"
        )));
    }
    Ok(())
}

/// `POST /v1/sessions/{id}/fork {"checkpoint_id", "new_session_id"}` → 201
/// with the new session (its messages shared with this one, not copied).
pub(crate) async fn fork(
    state: Data,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<ForkBody>,
) -> Result<HttpResponse, ApiError> {
    caller.check_session(&body.new_session_id)?;
    open_existing(&state, &id).await?;
    refuse_existing(&state, &body.new_session_id).await?;
    let cp = state
        .rt
        .store()
        .get_checkpoint(&body.checkpoint_id)
        .await?
        .filter(|c| c.session_id == *id)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "checkpoint '{}' not found in session '{id}'",
                body.checkpoint_id
            ))
        })?;
    let forked = state.rt.fork(&cp, body.new_session_id.clone()).await?;
    let meta = forked.metadata().await?;
    Ok(HttpResponse::Created().json(metadata_json(&meta)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct MergeBody {
    other: String,
    new_session_id: Option<String>,
}

/// `POST /v1/sessions/{id}/merge {"other", "new_session_id"?}` → 201
/// `{"session", "report"}`: a new session with both histories by time.
pub(crate) async fn merge(
    state: Data,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<MergeBody>,
) -> Result<HttpResponse, ApiError> {
    let new_id = body
        .new_session_id
        .clone()
        .unwrap_or_else(|| format!("{id}_merged"));
    caller.check_session(&body.other)?;
    caller.check_session(&new_id)?;
    let a = open_existing(&state, &id).await?;
    let b = open_existing(&state, &body.other).await?;
    refuse_existing(&state, &new_id).await?;
    let (merged, report) = a.merge_as(&b, new_id).await?;
    let meta = merged.metadata().await?;
    Ok(HttpResponse::Created().json(json!({ "session": metadata_json(&meta), "report": report })))
}

/// Which small-state map a route reads and writes.
#[derive(Clone, Copy)]
pub(crate) enum StateMap {
    Preferences,
    Profile,
}

async fn read_map(session: &Session, which: StateMap) -> Result<JsonMap, ApiError> {
    let r = session.record().await?;
    Ok(match which {
        StateMap::Preferences => r.preferences,
        StateMap::Profile => r.profile,
    })
}

/// `GET /v1/sessions/{id}/preferences` (and `/profile`).
pub(crate) async fn get_map(
    state: Data,
    id: web::Path<String>,
    which: StateMap,
) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    Ok(HttpResponse::Ok().json(read_map(&session, which).await?))
}

/// `PATCH /v1/sessions/{id}/preferences` (and `/profile`): sets each key of
/// the body's object; returns the whole map.
pub(crate) async fn patch_map(
    state: Data,
    id: web::Path<String>,
    body: web::Json<Value>,
    which: StateMap,
) -> Result<HttpResponse, ApiError> {
    let Value::Object(changes) = body.into_inner() else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object of keys to set".into(),
        ));
    };
    let session = open_existing(&state, &id).await?;
    for (k, v) in changes {
        match which {
            StateMap::Preferences => session.update_preference(k, v).await?,
            StateMap::Profile => session.update_profile(k, v).await?,
        }
    }
    Ok(HttpResponse::Ok().json(read_map(&session, which).await?))
}

/// `GET /v1/sessions/{id}/analytics`: interactions, duration, messages,
/// latency and tokens per agent, topics, feedback.
pub(crate) async fn analytics(
    state: Data,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    Ok(HttpResponse::Ok().json(session.analytics().await?))
}

/// `GET /v1/sessions/{id}/context`: what the agent sees of the user
/// (profile, preferences, recent topics, duration, interactions).
pub(crate) async fn context(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let session = open_existing(&state, &id).await?;
    Ok(HttpResponse::Ok().json(session.build_context().await?))
}

#[derive(Debug, Deserialize)]
pub(crate) struct FeedbackBody {
    message_id: String,
    score: f64,
}

/// `POST /v1/sessions/{id}/feedback` `{"message_id", "score"}` → 204.
pub(crate) async fn feedback(
    state: Data,
    id: web::Path<String>,
    body: web::Json<FeedbackBody>,
) -> Result<HttpResponse, ApiError> {
    let message_id: MessageId = body.message_id.parse().map_err(ApiError::BadRequest)?;
    let session = open_existing(&state, &id).await?;
    session.feedback(message_id, body.score).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
pub(crate) struct MemoryQuery {
    #[serde(default)]
    q: String,
    limit: Option<usize>,
}

/// `GET /v1/users/{user}/memories?q=&limit=`: the user's memories, best
/// first; with `q`, a full-text search ranked by relevance.
pub(crate) async fn user_memories(
    state: Data,
    user: web::Path<String>,
    q: web::Query<MemoryQuery>,
) -> Result<HttpResponse, ApiError> {
    crate::memory::validate_user_id(&user)?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit={limit}: use 1 to 1000"
        )));
    }
    let memories = state.rt.memories();
    if q.q.trim().is_empty() {
        let mut all = memories.list(&user).await?;
        all.truncate(limit);
        return Ok(HttpResponse::Ok().json(json!({ "user_id": *user, "memories": all })));
    }
    let hits = memories.search(&user, &q.q, limit).await?;
    Ok(HttpResponse::Ok().json(json!({ "user_id": *user, "query": q.q, "hits": hits })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct AddMemoryBody {
    text: String,
}

/// `POST /v1/users/{user}/memories` `{"text"}`: scored like a memory the
/// conversation yields; 201 when stored, 200 when a duplicate or below the
/// quality threshold (the body says which).
pub(crate) async fn add_user_memory(
    state: Data,
    user: web::Path<String>,
    body: web::Json<AddMemoryBody>,
) -> Result<HttpResponse, ApiError> {
    crate::memory::validate_user_id(&user)?;
    if body.text.trim().is_empty() {
        return Err(ApiError::BadRequest("the memory text is empty".into()));
    }
    let outcome = state.rt.memories().add(&user, &body.text).await?;
    let stored = matches!(outcome, crate::memory::AddOutcome::Stored { .. });
    let mut resp = if stored {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(resp.json(outcome))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ForgetQuery {
    #[serde(default)]
    sessions: bool,
}

/// `DELETE /v1/users/{user}?sessions=true`: forget the user's memories and
/// profile (and, with `sessions`, their sessions and checkpoints).
pub(crate) async fn forget_user(
    state: Data,
    user: web::Path<String>,
    q: web::Query<ForgetQuery>,
) -> Result<HttpResponse, ApiError> {
    crate::memory::validate_user_id(&user)?;
    let report = state.rt.forget_user(&user, q.sessions).await?;
    Ok(HttpResponse::Ok().json(report))
}
