//! The daemon (`troupe serve`): the runtime over HTTP.
//!
//! - REST/JSON under `/v1` (sessions, chat with SSE streaming, history,
//!   checkpoints, versions, fork, merge, preferences, shared state, runs);
//! - an OpenAI-compatible `POST /v1/chat/completions` ([`openai`](self));
//! - PraisonAI-compatible `/agents/{name}` endpoints;
//! - `/healthz`, `/metrics` (Prometheus), `/v1/openapi.json`.
//!
//! Every route is listed once in [`routes::table`]; the app and the OpenAPI
//! document are both built from it. Errors are [`ApiError`]s, always the
//! JSON shape `{"error": {"code", "message"}}`. Auth is in [`auth`].
//!
//! The HTTP server runs on its own threads (one single-threaded runtime per
//! worker); the workers share the [`Runtime`] (whose actors live on the
//! runtime's own threads), the credentials and the metrics. Requests to one
//! session are serialised by its actor, whichever worker they come through.
//!
//! ```no_run
//! # async fn demo() -> troupe::Result<()> {
//! use troupe::server::{Auth, Server};
//! let rt = troupe::Runtime::builder().memory_store().build().await?;
//! let server = Server::new(rt.clone(), rt.config().server.clone())
//!     .auth(Auth::off())
//!     .bind("127.0.0.1:0")?
//!     .run()?;
//! println!("listening on {}", server.url());
//! // … later: stop accepting, finish in-flight turns, flush the store.
//! server.stop().await?;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod error;
pub mod load;
pub mod metrics;
pub mod openapi;
pub mod routes;

mod openai;
mod praison;
mod runs;
mod sessions;
mod sse;
mod state;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::AUTHORIZATION;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpServer, ResponseError};

pub use auth::{Access, Auth, Caller, TokenKeys};
pub use error::ApiError;
pub use metrics::Metrics;

use crate::config::{ConfigError, ModelConfig, ServerConfig};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use error::{JsonErrorBody, StoreFailure};

/// What every worker shares.
pub(crate) struct AppState {
    pub(crate) rt: Runtime,
    pub(crate) auth: Auth,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pipelines_dir: PathBuf,
    pub(crate) runs: runs::RunTracker,
    pub(crate) max_body_bytes: usize,
}

pub(crate) type Data = web::Data<AppState>;

/// Builds and starts the daemon: `Server::new(rt, config).bind(addr)?.run()?`.
pub struct Server {
    runtime: Runtime,
    config: ServerConfig,
    auth: Option<Auth>,
    pipelines_dir: Option<PathBuf>,
    listener: Option<TcpListener>,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("auth_on", &self.auth.as_ref().map(Auth::is_on))
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
}

impl Server {
    /// A server for `runtime` with `config` (`[server]`). Credentials are
    /// read from the variables `config` names when it binds, unless
    /// [`auth`](Self::auth) sets them. A graceful stop waits
    /// [`shutdown_timeout_for`] for the requests in flight.
    pub fn new(runtime: Runtime, config: ServerConfig) -> Server {
        let shutdown_timeout = shutdown_timeout_for(&config, &runtime.config().model);
        Server {
            runtime,
            config,
            auth: None,
            pipelines_dir: None,
            listener: None,
            shutdown_timeout,
        }
    }

    /// Uses these credentials instead of the environment's.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Where `POST /v1/runs {"pipeline": "x.toml"}` finds `x.toml` (default:
    /// `pipelines/` next to the config file, else in the working directory).
    pub fn pipelines_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pipelines_dir = Some(dir.into());
        self
    }

    /// How long a graceful stop waits for in-flight requests (default:
    /// [`shutdown_timeout_for`] the config).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    fn resolve_auth(&mut self) -> Result<Auth> {
        if let Some(a) = &self.auth {
            return Ok(a.clone());
        }
        let a = Auth::from_env(&self.config).map_err(|e| {
            Error::Config(ConfigError::Invalid {
                key: self.config.token_keys_env.clone(),
                value: "<hidden>".into(),
                reason: e.to_string(),
            })
        })?;
        self.auth = Some(a.clone());
        Ok(a)
    }

    /// Binds `addr` now (port 0 picks a free port; see
    /// [`ServerHandle::addr`]). With auth off, only a loopback address is
    /// accepted unless `allow_public_without_auth` is set.
    pub fn bind(mut self, addr: &str) -> Result<Server> {
        let auth = self.resolve_auth()?;
        let invalid = |reason: String| {
            Error::Config(ConfigError::Invalid {
                key: "server.bind".into(),
                value: addr.to_string(),
                reason,
            })
        };
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| invalid(format!("not an address to listen on: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(invalid("resolves to no address".into()));
        }
        if !auth.is_on()
            && !self.config.allow_public_without_auth
            && addrs.iter().any(|a| !a.ip().is_loopback())
        {
            return Err(invalid(format!(
                "refusing to listen on a non-loopback address with auth off: set ${} (the admin API key) \
                 or ${} (session-token keys), or server.allow_public_without_auth = true",
                self.config.api_key_env,
                self.config.token_keys_env
            )));
        }
        let listener = TcpListener::bind(&addrs[..])
            .map_err(|e| Error::Runtime(format!("cannot listen on {addr}: {e}")))?;
        self.listener = Some(listener);
        Ok(self)
    }

    /// Starts serving (binding `config.bind` first if [`bind`](Self::bind)
    /// was not called) on threads of its own; returns at once.
    pub fn run(mut self) -> Result<ServerHandle> {
        if self.listener.is_none() {
            let addr = self.config.bind.clone();
            self = self.bind(&addr)?;
        }
        let auth = self.resolve_auth()?;
        if auth.is_on() && !auth.has_admin_key() {
            tracing::warn!(
                target: "troupe::server",
                api_key_env = %self.config.api_key_env,
                "session-token keys are set but no admin API key: auth is on, session tokens work, \
                 and every admin route is refused"
            );
        }
        let listener = self
            .listener
            .take()
            .ok_or_else(|| Error::Runtime("the server has no listener".into()))?;
        let io = |e: std::io::Error| Error::Runtime(format!("cannot start the HTTP server: {e}"));
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let pipelines_dir = self.pipelines_dir.clone().unwrap_or_else(|| {
            self.runtime
                .config()
                .source
                .as_ref()
                .and_then(|p| p.parent())
                .map_or_else(|| PathBuf::from("pipelines"), |d| d.join("pipelines"))
        });
        let max_body_bytes = self.config.max_body_bytes;
        let state = web::Data::new(AppState {
            rt: self.runtime.clone(),
            auth,
            metrics: Arc::new(Metrics::default()),
            pipelines_dir,
            runs: runs::RunTracker::default(),
            max_body_bytes,
        });
        let workers = match self.config.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let timeout = self.shutdown_timeout.as_secs().max(1);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("troupe-http".into())
            .spawn(move || {
                let result = actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || app(shared.clone()))
                        .workers(workers)
                        .disable_signals()
                        .shutdown_timeout(timeout)
                        .listen(listener);
                    let server = match server {
                        Ok(s) => s.run(),
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let _ = started_tx.send(Ok(server.handle()));
                    server.await
                });
                let _ = done_tx.send(result);
            })
            .map_err(io)?;
        let handle = started_rx
            .recv()
            .map_err(|_| Error::Runtime("the HTTP server thread died while starting".into()))?
            .map_err(io)?;
        tracing::info!(target: "troupe::server", %addr, workers, "listening");
        Ok(ServerHandle {
            addr,
            handle,
            done: Some(done_rx),
            thread: Some(thread),
            state,
            stopped: false,
        })
    }
}

/// How long a graceful stop waits for the requests in flight:
/// `server.shutdown_timeout_secs`, or when that is 0 the longest a turn's
/// model call can take, `(model.max_retries + 1) × model.timeout_secs`,
/// plus 10 s (backoff, the commit). A shorter wait would drop the replies of
/// turns that still commit.
pub fn shutdown_timeout_for(server: &ServerConfig, model: &ModelConfig) -> Duration {
    if server.shutdown_timeout_secs > 0 {
        return Duration::from_secs(server.shutdown_timeout_secs);
    }
    let attempts = u64::from(model.max_retries).saturating_add(1);
    Duration::from_secs(
        attempts
            .saturating_mul(model.timeout_secs)
            .saturating_add(10),
    )
}

/// A running daemon: its address, and a graceful stop.
pub struct ServerHandle {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    done: Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: Data,
    stopped: bool,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ServerHandle {
    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The runtime it serves.
    pub fn runtime(&self) -> &Runtime {
        &self.state.rt
    }

    /// The daemon's counters (what `/metrics` shows).
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Graceful stop: stop accepting, let in-flight requests (and so their
    /// turns) finish, interrupt running workflow runs (resumable), then
    /// [`Runtime::shutdown`]: release the sessions and flush the store.
    pub async fn stop(mut self) -> Result<()> {
        self.stopped = true;
        self.handle.stop(true).await;
        if let Some(done) = self.done.take() {
            if let Ok(Err(e)) = done.await {
                tracing::warn!(target: "troupe::server", error = %e, "HTTP server ended with an error");
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.state
            .runs
            .interrupt_all(&self.state.rt, Duration::from_secs(10))
            .await;
        self.state.rt.shutdown().await
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.stopped {
            // Not stopped with `stop()` (a panicking test, say): stop at once.
            drop(self.handle.stop(false));
        }
    }
}

/// Serves `runtime` on `config.bind` until `shutdown` completes, then stops
/// gracefully (see [`ServerHandle::stop`]). Credentials from the environment.
pub async fn run(
    runtime: Runtime,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let handle = Server::new(runtime, config).run()?;
    shutdown.await;
    tracing::info!(target: "troupe::server", "shutting down: finishing in-flight requests");
    handle.stop().await
}

fn app(
    state: Data,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let max = state.max_body_bytes;
    let json = web::JsonConfig::default()
        .limit(max)
        .content_type_required(false)
        .error_handler(|e, _| error::json_error(e).into());
    let query = web::QueryConfig::default()
        .error_handler(|e, _| ApiError::BadRequest(format!("bad query string: {e}")).into());
    let path = web::PathConfig::default()
        .error_handler(|e, _| ApiError::BadRequest(format!("bad path parameter: {e}")).into());
    let mut app = App::new()
        .app_data(state)
        .app_data(json)
        .app_data(web::PayloadConfig::new(max))
        .app_data(query)
        .app_data(path)
        .default_service(web::to(no_route));
    let table = routes::table();
    let mut paths: Vec<&'static str> = Vec::new();
    for spec in &table {
        if !paths.contains(&spec.path) {
            paths.push(spec.path);
        }
    }
    for path in paths {
        let mut resource = web::resource(path).default_service(web::to(method_not_allowed));
        for spec in table.iter().filter(|s| s.path == path) {
            let access = spec.access;
            let route = (spec.handler)(spec.verb.route())
                .wrap(from_fn(move |req, next| gate(access, req, next)));
            resource = resource.route(route);
        }
        app = app.service(resource);
    }
    app.wrap(from_fn(observe))
}

async fn no_route(req: HttpRequest) -> ApiError {
    ApiError::NotFound(format!("no route for {} {}", req.method(), req.path()))
}

async fn method_not_allowed(req: HttpRequest) -> ApiError {
    let allowed: Vec<&str> = req
        .match_pattern()
        .map(|p| {
            routes::table()
                .into_iter()
                .filter(|s| s.path == p)
                .map(|s| s.verb.as_str())
                .collect()
        })
        .unwrap_or_default();
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {} (allowed: {})",
        req.method(),
        req.path(),
        allowed.join(", ")
    ))
}

impl actix_web::Responder for ApiError {
    type Body = BoxBody;
    fn respond_to(self, _: &HttpRequest) -> actix_web::HttpResponse {
        self.error_response()
    }
}

/// Route middleware: authenticates, checks the route's [`Access`], and
/// hands the [`Caller`] to the handler.
async fn gate(
    access: Access,
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> std::result::Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<Data>().cloned() else {
        return Ok(req.error_response(ApiError::Internal("the app state is missing".into())));
    };
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("<not ASCII>"));
    match access.authorize(&state.auth, header, req.match_info().get("id")) {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.call(req).await
        }
        Err(e) => Ok(req.error_response(e)),
    }
}

/// App middleware: logs every request, counts it, and makes sure every
/// error body is the JSON error shape (also the ones actix makes itself).
async fn observe(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> std::result::Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.path().to_string();
    let state = req.app_data::<Data>().cloned();
    let res = match next.call(req).await {
        Ok(res) => res,
        Err(e) => {
            let status = e.as_response_error().status_code();
            if let Some(s) = &state {
                s.metrics
                    .request("unmatched", status.as_u16(), started.elapsed());
            }
            tracing::info!(target: "troupe::server", %method, %path, status = status.as_u16(), "request failed");
            return Err(e);
        }
    };
    let status = res.status();
    let res =
        if status.as_u16() >= 400 && res.response().extensions().get::<JsonErrorBody>().is_none() {
            let message = match (status.as_u16(), &state) {
                (413, Some(s)) => format!(
                    "request body is over the limit of {} bytes (server.max_body_bytes)",
                    s.max_body_bytes
                ),
                _ => res
                    .response()
                    .error()
                    .map(|e| e.to_string())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string()),
            };
            let (req, _) = res.into_parts();
            ServiceResponse::new(req, ApiError::from_status(status, message).error_response())
        } else {
            res
        };
    let took = started.elapsed();
    if let Some(s) = &state {
        let route = res.request().match_pattern();
        s.metrics.request(
            route.as_deref().unwrap_or("unmatched"),
            status.as_u16(),
            took,
        );
        if res.response().extensions().get::<StoreFailure>().is_some() {
            s.metrics.store_error();
        }
    }
    tracing::info!(
        target: "troupe::server",
        %method,
        %path,
        status = res.status().as_u16(),
        latency_ms = took.as_secs_f64() * 1e3,
        "request"
    );
    Ok(res)
}
