//! `/v1/state/{ns}/{key}`: shared state over HTTP, with the key's version
//! as its `ETag` and `If-Match` / `If-None-Match: *` as write preconditions
//! (a stale version → 412, nothing written).

use actix_web::http::header::{HeaderMap, ETAG, IF_MATCH, IF_NONE_MATCH};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::Data;

/// A write precondition from the request headers.
#[derive(Debug, PartialEq, Eq)]
enum Precondition {
    /// None given: write unconditionally.
    None,
    /// The key must be at this version (0: must be absent).
    Version(u64),
    /// `If-Match: *`: the key must exist.
    Exists,
}

fn header<'a>(
    headers: &'a HeaderMap,
    name: &actix_web::http::header::HeaderName,
) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| ApiError::BadRequest(format!("{name} is not ASCII")))
        })
        .transpose()
}

fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    if let Some(v) = header(headers, &IF_NONE_MATCH)? {
        if v == "*" {
            return Ok(Precondition::Version(0));
        }
        return Err(ApiError::BadRequest(format!(
            "If-None-Match: {v:?} is not supported (only '*': the key must not be set)"
        )));
    }
    let Some(v) = header(headers, &IF_MATCH)? else {
        return Ok(Precondition::None);
    };
    if v == "*" {
        return Ok(Precondition::Exists);
    }
    let bare = v.trim_start_matches("W/").trim_matches('"');
    bare.parse().map(Precondition::Version).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match: {v:?} is not a version (expected \"N\" as the ETag gave it)"
        ))
    })
}

fn etag(version: u64) -> (actix_web::http::header::HeaderName, String) {
    (ETAG, format!("\"{version}\""))
}

/// `GET /v1/state/{ns}/{key}` → `{"value", "version"}` with `ETag: "N"`.
pub(crate) async fn get(
    state: Data,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, key) = path.into_inner();
    let entry = state
        .rt
        .shared_state(ns.as_str())
        .get(&key)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("key '{key}' is not set in namespace '{ns}'")))?;
    Ok(HttpResponse::Ok().insert_header(etag(entry.version)).json(
        json!({"value": entry.value, "version": entry.version, "updated_at": entry.updated_at}),
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PutBody {
    value: Option<Value>,
}

/// `PUT /v1/state/{ns}/{key} {"value"}` → `{"version"}`, honouring
/// `If-Match: "N"` (compare-and-set) and `If-None-Match: *` (create only).
pub(crate) async fn put(
    state: Data,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Json<PutBody>,
) -> Result<HttpResponse, ApiError> {
    let (ns, key) = path.into_inner();
    let value = body.into_inner().value.ok_or_else(|| {
        ApiError::BadRequest("the body needs a \"value\" (use DELETE to remove a key)".into())
    })?;
    let shared = state.rt.shared_state(ns.as_str());
    let version = match precondition(req.headers())? {
        Precondition::None => shared.set(&key, value).await?,
        Precondition::Version(v) => shared.compare_and_set(&key, v, value).await?,
        Precondition::Exists => {
            let current = shared.get(&key).await?.ok_or_else(|| {
                ApiError::PreconditionFailed(format!(
                    "If-Match: * but key '{key}' is not set in namespace '{ns}'"
                ))
            })?;
            shared.compare_and_set(&key, current.version, value).await?
        }
    };
    Ok(HttpResponse::Ok()
        .insert_header(etag(version))
        .json(json!({ "version": version })))
}

/// `DELETE /v1/state/{ns}/{key}` → 204 (404 if unset; `If-Match` → 412 if stale).
pub(crate) async fn delete(
    state: Data,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, key) = path.into_inner();
    let shared = state.rt.shared_state(ns.as_str());
    let not_set = || ApiError::NotFound(format!("key '{key}' is not set in namespace '{ns}'"));
    match precondition(req.headers())? {
        Precondition::None | Precondition::Exists => {}
        Precondition::Version(expected) => {
            // SharedState has no compare-and-delete yet: the check and the
            // delete are two steps (a write landing between them is lost).
            let found = shared.get(&key).await?.map_or(0, |e| e.version);
            if found != expected {
                return Err(ApiError::PreconditionFailed(format!(
                    "shared state '{ns}/{key}': expected version {expected}, found {found}"
                )));
            }
        }
    }
    if shared.delete(&key).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(not_set())
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    prefix: String,
}

/// `GET /v1/state/{ns}?prefix=` → `{"entries": [{"key", "value", "version"}]}`.
pub(crate) async fn list(
    state: Data,
    ns: web::Path<String>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let entries: Vec<Value> = state
        .rt
        .shared_state(ns.as_str())
        .list(&q.prefix)
        .await?
        .into_iter()
        .map(|e| json!({"key": e.key, "value": e.value, "version": e.version}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "entries": entries })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn with(name: actix_web::http::header::HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn preconditions_parse() {
        assert_eq!(precondition(&HeaderMap::new()).unwrap(), Precondition::None);
        assert_eq!(
            precondition(&with(IF_MATCH, "\"3\"")).unwrap(),
            Precondition::Version(3)
        );
        assert_eq!(
            precondition(&with(IF_MATCH, "W/\"4\"")).unwrap(),
            Precondition::Version(4)
        );
        assert_eq!(
            precondition(&with(IF_MATCH, "5")).unwrap(),
            Precondition::Version(5)
        );
        assert_eq!(
            precondition(&with(IF_MATCH, "*")).unwrap(),
            Precondition::Exists
        );
        assert_eq!(
            precondition(&with(IF_NONE_MATCH, "*")).unwrap(),
            Precondition::Version(0)
        );
        assert!(precondition(&with(IF_MATCH, "\"abc\"")).is_err());
        assert!(precondition(&with(IF_NONE_MATCH, "\"1\"")).is_err());
    }
}
