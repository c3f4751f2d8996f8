//! [`ApiError`]: every error the daemon answers with, as one JSON shape,
//! `{"error": {"code": C, "message": M}}`, with the HTTP status its code
//! stands for. Runtime errors ([`crate::Error`]) are mapped here and only here.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::agent::AgentError;
use crate::model::ModelError;
use crate::store::StoreError;
use crate::workflow::WorkflowError;
use crate::Error;

/// An error answer of the HTTP API. The variant decides the status and the
/// `code`; the message says what was wrong and with what value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400 `bad_request`: malformed JSON, a missing field, an invalid id.
    #[error("{0}")]
    BadRequest(String),
    /// 401 `unauthorized`: no credentials, or a key/token that is not valid.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`: valid credentials that do not reach this resource.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`: no such session, agent, checkpoint, key, run or route.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`: the route exists, not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409 `conflict`: the thing exists already, or another writer won.
    #[error("{0}")]
    Conflict(String),
    /// 412 `precondition_failed`: an `If-Match` version that is not current.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413 `payload_too_large`: the body is over `server.max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 500 `internal`: a bug or a damaged store.
    #[error("{0}")]
    Internal(String),
    /// 500 `internal`, caused by the store (counted in `troupe_store_errors_total`).
    #[error("{0}")]
    StoreFailed(String),
    /// 501 `not_implemented`: a part of the runtime that is not built yet.
    #[error("{0}")]
    NotImplemented(String),
    /// 502 `model_unavailable`: the model server is down, refused, or failed.
    #[error("{0}")]
    ModelUnavailable(String),
    /// 503 `unavailable`: the session or the runtime cannot serve right now.
    #[error("{0}")]
    Unavailable(String),
    /// 503 `unavailable`, caused by the store (counted in `troupe_store_errors_total`).
    #[error("{0}")]
    StoreUnavailable(String),
    /// 504 `model_timeout`: the model server did not answer in time.
    #[error("{0}")]
    ModelTimeout(String),
}

/// Marks a response made from a store failure, so the metrics middleware
/// can count it without knowing about errors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StoreFailure;

/// Marks a response whose body is already the JSON error shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct JsonErrorBody;

impl ApiError {
    /// The machine-readable code (`not_found`, `model_timeout`, …).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Internal(_) | ApiError::StoreFailed(_) => "internal",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::ModelUnavailable(_) => "model_unavailable",
            ApiError::Unavailable(_) | ApiError::StoreUnavailable(_) => "unavailable",
            ApiError::ModelTimeout(_) => "model_timeout",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::Conflict(m)
            | ApiError::PreconditionFailed(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::Internal(m)
            | ApiError::StoreFailed(m)
            | ApiError::NotImplemented(m)
            | ApiError::ModelUnavailable(m)
            | ApiError::Unavailable(m)
            | ApiError::StoreUnavailable(m)
            | ApiError::ModelTimeout(m) => m,
        }
    }

    /// The status for a code (used to wrap errors actix made itself).
    pub(crate) fn from_status(status: StatusCode, message: String) -> ApiError {
        match status.as_u16() {
            400 => ApiError::BadRequest(message),
            401 => ApiError::Unauthorized(message),
            403 => ApiError::Forbidden(message),
            404 => ApiError::NotFound(message),
            405 => ApiError::MethodNotAllowed(message),
            409 => ApiError::Conflict(message),
            412 => ApiError::PreconditionFailed(message),
            413 => ApiError::PayloadTooLarge(message),
            501 => ApiError::NotImplemented(message),
            502 => ApiError::ModelUnavailable(message),
            503 => ApiError::Unavailable(message),
            504 => ApiError::ModelTimeout(message),
            s if (400..500).contains(&s) => ApiError::BadRequest(message),
            _ => ApiError::Internal(message),
        }
    }

    /// The JSON body: `{"error": {"code", "message"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code(), "message": self.message()}})
    }

    fn is_store(&self) -> bool {
        matches!(
            self,
            ApiError::StoreFailed(_) | ApiError::StoreUnavailable(_)
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        let s = match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Conflict(_) => 409,
            ApiError::PreconditionFailed(_) => 412,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::Internal(_) | ApiError::StoreFailed(_) => 500,
            ApiError::NotImplemented(_) => 501,
            ApiError::ModelUnavailable(_) => 502,
            ApiError::Unavailable(_) | ApiError::StoreUnavailable(_) => 503,
            ApiError::ModelTimeout(_) => 504,
        };
        StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut builder = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized(_)) {
            builder.insert_header(("WWW-Authenticate", "Bearer"));
        }
        let mut res = builder.json(self.body());
        res.extensions_mut().insert(JsonErrorBody);
        if self.is_store() {
            res.extensions_mut().insert(StoreFailure);
        }
        res
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        if e.is_not_found() {
            return ApiError::NotFound(message);
        }
        if e.is_version_mismatch() {
            return ApiError::PreconditionFailed(message);
        }
        if e.is_conflict() {
            return ApiError::Conflict(message);
        }
        match e {
            Error::InvalidRequest(_) | Error::InvalidSessionId { .. } => {
                ApiError::BadRequest(message)
            }
            Error::Model(ModelError::Timeout { .. }) => ApiError::ModelTimeout(message),
            Error::Model(_) => ApiError::ModelUnavailable(message),
            Error::Store(StoreError::Corrupt(_)) => ApiError::StoreFailed(message),
            Error::Store(_) => ApiError::StoreUnavailable(message),
            Error::SessionUnavailable { .. } => ApiError::Unavailable(message),
            Error::Workflow(WorkflowError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ApiError::NotFound(message)
            }
            Error::Workflow(_) => ApiError::BadRequest(message),
            Error::Agent(AgentError::Unknown { .. }) | Error::SessionNotFound(_) => {
                ApiError::NotFound(message)
            }
            // A daemon calling another daemon: keep its status.
            Error::Remote { status, .. } => ApiError::from_status(
                status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY),
                message,
            ),
            Error::Agent(_) | Error::Config(_) | Error::File(_) | Error::Runtime(_) => {
                ApiError::Internal(message)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from(Error::from(e))
    }
}

/// The JSON-body extractor's errors: 413 for a body over the limit, 400
/// with the parser's message for anything else.
pub(crate) fn json_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::{JsonPayloadError as J, PayloadError};
    match err {
        J::OverflowKnownLength { length, limit } => ApiError::PayloadTooLarge(format!(
            "request body is {length} bytes; the limit is {limit} bytes (server.max_body_bytes)"
        )),
        J::Overflow { limit } => ApiError::PayloadTooLarge(format!(
            "request body is over the limit of {limit} bytes (server.max_body_bytes)"
        )),
        J::Payload(PayloadError::Overflow) => {
            ApiError::PayloadTooLarge("request body is over the size limit".into())
        }
        J::Deserialize(e) => ApiError::BadRequest(format!("malformed JSON body: {e}")),
        J::ContentType => {
            ApiError::BadRequest("the body must be JSON (Content-Type: application/json)".into())
        }
        other => ApiError::BadRequest(format!("cannot read the request body: {other}")),
    }
}
