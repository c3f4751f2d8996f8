//! Server-sent events: framing and the streaming response.

use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures::Stream;

/// One named event: `event: NAME\ndata: JSON\n\n`.
pub(crate) fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// One unnamed event: `data: TEXT\n\n` (the OpenAI stream format).
pub(crate) fn data(text: &str) -> Bytes {
    Bytes::from(format!("data: {text}\n\n"))
}

/// Whether the request asks for an event stream.
pub(crate) fn wants_stream(req: &actix_web::HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// A `200 text/event-stream` response from a stream of frames. Proxies are
/// asked not to buffer it.
pub(crate) fn response<S>(frames: S) -> HttpResponse
where
    S: Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
{
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(frames)
}
