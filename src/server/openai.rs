//! OpenAI-compatible `POST /v1/chat/completions` (and `GET /v1/models`).
//!
//! `model` names a troupe agent. The session is the `X-Session-Id` header,
//! else the `user` field, else the caller's session token, else a new one;
//! the response's `X-Session-Id` says which. `user` is also the user of a
//! session this creates, but only for the admin: with a session token it
//! never selects a user. The server keeps the history, so the turn is the
//! **last message**, which must have role `user` (else 400), and everything
//! before it is ignored: a client may send only the new message, or its
//! whole transcript as usual.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::sessions::{open_or_create, turn, turn_stream};
use super::{sse, Data};
use crate::session::{validate_session_id, StreamEvent};

/// The request (unknown keys such as `temperature` are accepted and ignored).
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    model: String,
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    user: Option<String>,
}

/// The text of a message's `content`: a string, or the text parts of an array.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let text: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!text.is_empty()).then(|| text.join("\n"))
        }
        _ => None,
    }
}

/// The turn: the text of the last message, which must be a user message. A
/// transcript ending with an assistant or tool message (a tool-calling
/// client) has no new user message; answering an earlier one would append
/// it again as a new turn, so it is a 400.
fn last_user_message(messages: &[Value]) -> Result<String, ApiError> {
    let m = messages.last().ok_or_else(|| {
        ApiError::BadRequest("messages is empty: send the new user message".into())
    })?;
    match m.get("role").and_then(Value::as_str) {
        Some("user") => {}
        Some(role) => {
            return Err(ApiError::BadRequest(format!(
                "the last message has role \"{role}\"; it must be the new \"user\" message \
                 (tool results and assistant turns are not supported: the server keeps the history)"
            )))
        }
        None => {
            return Err(ApiError::BadRequest(
                "the last message has no role; it must be the new \"user\" message".into(),
            ))
        }
    }
    m.get("content")
        .and_then(content_text)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            ApiError::BadRequest(
                "the last user message has no text content (a string, or text parts)".into(),
            )
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Picks the session: header, `user`, the token's session, or a new id.
fn session_id(req: &HttpRequest, user: Option<&str>, caller: &Caller) -> Result<String, ApiError> {
    let header = req
        .headers()
        .get("x-session-id")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::BadRequest("X-Session-Id is not ASCII".into()))
        })
        .transpose()?;
    let id = header
        .or_else(|| user.map(str::to_string))
        .or_else(|| caller.session().map(str::to_string))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    validate_session_id(&id)?;
    caller.check_session(&id)?;
    Ok(id)
}

fn estimate_tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(4)
}

/// `POST /v1/chat/completions`.
pub(crate) async fn completions(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let agent = body.model.clone();
    state.rt.agent(&agent)?;
    let message = last_user_message(&body.messages)?;
    let id = session_id(&req, body.user.as_deref(), &caller)?;
    // `user` names the user of a session this creates only for the admin: a
    // session token never selects a user (its session keeps the user the
    // admin gave it, or none), whatever `user` says.
    let user = match caller {
        Caller::Admin => body.user.as_deref(),
        Caller::Session(_) => None,
    };
    let session = open_or_create(&state, &id, &agent, user).await?;
    let created = unix_now();
    if !body.stream {
        let prompt_tokens = estimate_tokens(&message);
        let r = turn(&state, &session, Some(&agent), message).await?;
        let usage = r
            .meta
            .as_ref()
            .and_then(|m| m.get("usage"))
            .and_then(|u| {
                Some((
                    u.get("prompt_tokens")?.as_u64()?,
                    u.get("completion_tokens")?.as_u64()?,
                ))
            })
            .unwrap_or((prompt_tokens, estimate_tokens(&r.reply)));
        return Ok(HttpResponse::Ok()
            .insert_header(("X-Session-Id", id.clone()))
            .json(json!({
                "id": format!("chatcmpl-{}", r.message_id),
                "object": "chat.completion",
                "created": created,
                "model": agent,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": r.reply},
                    "finish_reason": "stop",
                }],
                "usage": {
                    "prompt_tokens": usage.0,
                    "completion_tokens": usage.1,
                    "total_tokens": usage.0 + usage.1,
                },
            })));
    }
    let events = turn_stream(&state, &session, Some(&agent), message).await?;
    let chunk_id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let chunk = move |delta: Value, finish: Option<&str>| {
        sse::data(
            &json!({
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": agent,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
            .to_string(),
        )
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let frames = events.flat_map(move |ev| {
        let out: Vec<actix_web::web::Bytes> = match ev {
            Ok(StreamEvent::Delta(d)) => vec![chunk(json!({ "content": d }), None)],
            Ok(StreamEvent::Done(_)) => vec![chunk(json!({}), Some("stop")), sse::data("[DONE]")],
            Err(e) => vec![sse::data(&e.body().to_string())],
        };
        futures::stream::iter(out.into_iter().map(Ok::<_, actix_web::Error>))
    });
    let frames = futures::stream::once(async move { Ok(first) }).chain(frames);
    let mut res = sse::response(frames);
    res.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static("x-session-id"),
        actix_web::http::header::HeaderValue::from_str(&id)
            .map_err(|_| ApiError::Internal(format!("session id {id:?} cannot go in a header")))?,
    );
    Ok(res)
}

/// `GET /v1/models`: the agents, as OpenAI's model list.
pub(crate) async fn models(state: Data) -> HttpResponse {
    let data: Vec<Value> = state
        .rt
        .agents()
        .into_iter()
        .map(|a| json!({"id": a.name, "object": "model", "created": 0, "owned_by": "troupe"}))
        .collect();
    HttpResponse::Ok().json(json!({ "object": "list", "data": data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_last_user_message() {
        let msgs = vec![
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": "first"}),
            json!({"role": "assistant", "content": "ok"}),
            json!({"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}]}),
        ];
        assert_eq!(last_user_message(&msgs).unwrap(), "second");
        assert!(last_user_message(&msgs[..1]).is_err());
        assert!(last_user_message(&[]).is_err());
        // Ends with an assistant message: no new user message to answer.
        let e = last_user_message(&msgs[..3]).unwrap_err();
        assert!(e.to_string().contains("\"assistant\""), "{e}");
        assert!(last_user_message(&[json!({"role": "user", "content": "  "})]).is_err());
    }
}
