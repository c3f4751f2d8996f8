//! The agent actor: owns a model client and the agent's metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use std::panic::AssertUnwindSafe;

use actix::prelude::*;
use futures::FutureExt;
use serde::Serialize;

use crate::model::{ChatModel, ChatRequest, ChatResponse, ModelError, TextStream};

/// Counters of one agent, shared by all its actors.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    calls: AtomicU64,
    failures: AtomicU64,
    latency_us: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// A snapshot of [`AgentMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentMetricsSnapshot {
    /// Model calls.
    pub calls: u64,
    /// Failed model calls.
    pub failures: u64,
    /// Total model latency, microseconds.
    pub latency_us: u64,
    /// Prompt tokens (reported, or estimated for echo).
    pub prompt_tokens: u64,
    /// Reply tokens.
    pub completion_tokens: u64,
}

impl AgentMetrics {
    /// The current values.
    pub fn snapshot(&self) -> AgentMetricsSnapshot {
        AgentMetricsSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
        }
    }

    fn record(&self, started: Instant, result: &Result<ChatResponse, ModelError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.latency_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(r) => {
                if let Some(u) = r.usage {
                    self.prompt_tokens
                        .fetch_add(u.prompt_tokens as u64, Ordering::Relaxed);
                    self.completion_tokens
                        .fetch_add(u.completion_tokens as u64, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One agent's actor on one arbiter.
pub struct AgentActor {
    model: Arc<dyn ChatModel>,
    metrics: Arc<AgentMetrics>,
}

impl AgentActor {
    /// An actor answering with `model`, counting into `metrics`.
    pub fn new(model: Arc<dyn ChatModel>, metrics: Arc<AgentMetrics>) -> Self {
        AgentActor { model, metrics }
    }
}

impl Actor for AgentActor {
    type Context = Context<Self>;
}

/// Answer a prompt built by a session.
#[derive(Message)]
#[rtype(result = "Result<ChatResponse, ModelError>")]
pub struct Generate(pub ChatRequest);

/// Answer a prompt piece by piece.
#[derive(Message)]
#[rtype(result = "Result<TextStream, ModelError>")]
pub struct GenerateStream(pub ChatRequest);

impl Handler<Generate> for AgentActor {
    type Result = ResponseFuture<Result<ChatResponse, ModelError>>;

    fn handle(&mut self, msg: Generate, _: &mut Self::Context) -> Self::Result {
        // Not atomic: many sessions' calls to one agent run concurrently.
        let model = self.model.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = Instant::now();
            // A panicking model must not take the arbiter thread (and every
            // session on it) down with it: it is a failed call, nothing more.
            let result = AssertUnwindSafe(model.complete(&msg.0))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(ModelError::Failed(panic_message(&panic))));
            metrics.record(started, &result);
            result
        })
    }
}

impl Handler<GenerateStream> for AgentActor {
    type Result = ResponseFuture<Result<TextStream, ModelError>>;

    fn handle(&mut self, msg: GenerateStream, _: &mut Self::Context) -> Self::Result {
        let model = self.model.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            metrics.calls.fetch_add(1, Ordering::Relaxed);
            let r = AssertUnwindSafe(model.stream(&msg.0))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(ModelError::Failed(panic_message(&panic))));
            if r.is_err() {
                metrics.failures.fetch_add(1, Ordering::Relaxed);
            }
            r
        })
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the model panicked: {what}")
}
