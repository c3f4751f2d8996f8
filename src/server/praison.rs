//! PraisonAI-compatible agent endpoints, for `Session(agent_url=…)` clients
//! given `agent_url = http://host:port/agents/{name}`:
//!
//! - `GET {agent_url}/health` → 200 `{"status": "ok", "agent"}` (and `GET /health`);
//! - `HEAD {agent_url}` → 200 (the client's fallback health check);
//! - `POST {agent_url}` `{"query", "session_id"?, "user_id"?, …}` → `{"response", "session_id", "agent"}`.
//!
//! Unlike PraisonAI's own server, every `session_id` has its own persistent
//! history (created on first use, with this agent); a request without one
//! gets a fresh session, whose id comes back in the reply. `user_id` sets
//! the user of a session it creates only for the admin; with a session
//! token it must be the session's current user (else 403).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::sessions::{open_or_create, turn, user_for};
use super::Data;

/// `GET /agents/{name}/health`.
pub(crate) async fn health(state: Data, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    state.rt.agent(&name)?;
    Ok(HttpResponse::Ok().json(json!({"status": "ok", "agent": name.as_str()})))
}

/// `HEAD /agents/{name}`.
pub(crate) async fn head(state: Data, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    state.rt.agent(&name)?;
    Ok(HttpResponse::Ok().finish())
}

/// The request; PraisonAI clients send more keys, which are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct Query {
    query: String,
    session_id: Option<String>,
    user_id: Option<String>,
}

/// `POST /agents/{name}`.
pub(crate) async fn query(
    state: Data,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<Query>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    state.rt.agent(&name)?;
    let id = body
        .session_id
        .filter(|s| !s.is_empty())
        .or_else(|| caller.session().map(str::to_string))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    caller.check_session(&id)?;
    // PraisonAI clients send `user_id` with every request: for a session
    // token it selects nothing (only the admin sets a session's user), and
    // it is ignored rather than refused, so such clients keep working.
    let user = match caller {
        Caller::Admin => user_for(&state, &caller, &id, body.user_id.as_deref()).await?,
        _ => None,
    };
    let session = open_or_create(&state, &id, &name, user.as_deref()).await?;
    let r = turn(&state, &session, Some(&name), body.query).await?;
    Ok(HttpResponse::Ok().json(json!({
        "response": r.reply,
        "session_id": r.session_id,
        "agent": r.agent,
    })))
}
