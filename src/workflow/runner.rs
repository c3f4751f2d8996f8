//! Running a pipeline: every task whose dependencies are done is sent to its
//! agent's actor, up to `max_parallel` at once; each result is stored
//! durably the moment it ends, so a crashed or interrupted run resumes
//! (`--resume RUN_ID`) without sending finished tasks to a model again.
//!
//! One run is owned by one task (the future returned by [`run_pipeline`]):
//! it alone holds the DAG state and talks to the agents by message, which
//! is what an actor per run gives, without a mailbox nobody else writes to.
//! Task results go into the run record and, with a session, into the
//! session's history (`add_result`); `output_to_state` keys go into the
//! session's shared state (or the pipeline's namespace).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Pipeline, Prepared, Schedule};
use crate::agent::Generate;
use crate::error::{Error, Result};
use crate::model::{ChatRequest, PromptMessage};
use crate::runtime::Runtime;
use crate::store::{now, Role, RunRecord, RunStatus, StoreError, TaskResult};

/// How to run a pipeline.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Input values (`--input k=v`).
    pub inputs: HashMap<String, String>,
    /// The session the results go into (created if needed).
    pub session: Option<String>,
    /// Most tasks running at once.
    pub max_parallel: usize,
    /// Stop starting tasks after the first failure.
    pub fail_fast: bool,
    /// First retry delay; doubles each retry.
    pub retry_backoff: Duration,
    /// Continue this run instead of starting a new one.
    pub resume: Option<String>,
    /// Set to stop starting tasks (the running ones end and are recorded;
    /// the run ends `interrupted`, resumable). [`WorkflowActor`]'s `Cancel`.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            inputs: HashMap::new(),
            session: None,
            max_parallel: 4,
            fail_fast: false,
            retry_backoff: Duration::from_millis(500),
            resume: None,
            cancel: None,
        }
    }
}

/// What a run reports while it goes (for progress displays).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    /// The run started (or resumed, with the tasks already done).
    Started {
        /// The run id.
        run_id: String,
        /// Tasks finished in an earlier attempt and not run again.
        already_done: Vec<String>,
    },
    /// A task was sent to its agent.
    TaskStarted {
        /// The task.
        task: String,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// An attempt failed and will be retried.
    TaskRetrying {
        /// The task.
        task: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A task ended.
    TaskEnded {
        /// The task.
        task: String,
        /// How.
        status: RunStatus,
        /// Seconds it took.
        secs: f64,
    },
    /// The run ended.
    Ended {
        /// How.
        status: RunStatus,
    },
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The run record.
    pub run: RunRecord,
    /// Every task's result, in the pipeline's order.
    pub tasks: Vec<TaskResult>,
}

enum Outcome {
    Done(String),
    Skipped,
    Failed(String),
}

fn emit(events: &Option<mpsc::UnboundedSender<RunEvent>>, e: RunEvent) {
    if let Some(tx) = events {
        let _ = tx.send(e);
    }
}

/// Runs (or resumes) `pipeline` on `rt`. `path` is recorded with the run.
pub async fn run_pipeline(
    rt: &Runtime,
    pipeline: &Pipeline,
    path: &str,
    opts: RunOptions,
    events: Option<mpsc::UnboundedSender<RunEvent>>,
) -> Result<RunReport> {
    let agents: Vec<String> = rt.agents().into_iter().map(|a| a.name).collect();
    pipeline.validate(&agents)?;
    let store = rt.store();
    let mut outputs: HashMap<String, String> = HashMap::new();
    let mut results: HashMap<String, TaskResult> = HashMap::new();
    let mut schedule = Schedule::new(pipeline)?;
    let (mut run, inputs) = match &opts.resume {
        Some(id) => {
            let run = store
                .get_run(id)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    what: "run",
                    id: id.clone(),
                })?;
            if run.pipeline != pipeline.name {
                return Err(Error::InvalidRequest(format!(
                    "run '{id}' is of pipeline '{}', not '{}'",
                    run.pipeline, pipeline.name
                )));
            }
            let given: HashMap<String, String> = run
                .inputs
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let inputs = pipeline.resolve_inputs(&given)?;
            let known: std::collections::HashSet<&str> =
                pipeline.tasks.iter().map(|t| t.id.as_str()).collect();
            for r in store.task_results(id).await? {
                if r.status.is_final() && known.contains(r.task_id.as_str()) {
                    outputs.insert(r.task_id.clone(), r.output.clone().unwrap_or_default());
                    results.insert(r.task_id.clone(), r);
                }
            }
            // Finish them in dependency order, so the schedule stays consistent.
            for id in pipeline.order()? {
                if results.contains_key(id) {
                    schedule.finish(id)?;
                }
            }
            (run, inputs)
        }
        None => {
            let inputs = pipeline.resolve_inputs(&opts.inputs)?;
            let at = now();
            let run = RunRecord {
                id: uuid::Uuid::new_v4().to_string(),
                pipeline: pipeline.name.clone(),
                path: path.to_string(),
                inputs: opts
                    .inputs
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
                session_id: opts.session.clone(),
                status: RunStatus::Running,
                created_at: at,
                updated_at: at,
            };
            (run, inputs)
        }
    };
    run.status = RunStatus::Running;
    run.updated_at = now();
    if opts.session.is_some() {
        run.session_id = opts.session.clone();
    }
    // Opened before the run is recorded: a bad session id leaves no run behind.
    let session = match &run.session_id {
        Some(id) => Some(rt.session(id.clone()).open().await?),
        None => None,
    };
    store.put_run(&run).await?;
    let mut already: Vec<String> = results.keys().cloned().collect();
    already.sort();
    emit(
        &events,
        RunEvent::Started {
            run_id: run.id.clone(),
            already_done: already,
        },
    );
    // `output_to_state` goes to the namespace the session shares with its
    // agents, else one named after the session, else after the pipeline.
    let namespace = match &session {
        Some(s) => s
            .record()
            .await?
            .metadata
            .get("shared_state")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| s.id().to_string()),
        None => pipeline.name.clone(),
    };
    let shared = rt.shared_state(namespace);

    let mut running = FuturesUnordered::new();
    let mut stop_starting = false;
    let mut failed_any = false;
    loop {
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            stop_starting = true;
        }
        while !stop_starting && schedule.running() < opts.max_parallel.max(1) {
            let Some(task) = schedule.start_next() else {
                break;
            };
            let prepared = pipeline.prepare_task(task, &inputs, &outputs);
            let rt = rt.clone();
            let store = store.clone();
            let run_id = run.id.clone();
            let events = events.clone();
            let backoff = opts.retry_backoff;
            let session = session.clone();
            let shared = shared.clone();
            running.push(async move {
                let started = Instant::now();
                let at = now();
                let (outcome, attempts) = match prepared {
                    Err(e) => (Outcome::Failed(e.to_string()), 0),
                    Ok(Prepared::Skip { .. }) => (Outcome::Skipped, 0),
                    Ok(Prepared::Run { prompt, context }) => {
                        run_task(
                            &rt, &store, &run_id, task, prompt, context, backoff, &events,
                        )
                        .await
                    }
                };
                let mut result = TaskResult {
                    run_id: run_id.clone(),
                    task_id: task.id.clone(),
                    status: RunStatus::Succeeded,
                    output: None,
                    attempts,
                    error: None,
                    started_at: Some(at),
                    finished_at: Some(now()),
                };
                match &outcome {
                    Outcome::Done(text) => {
                        // Delivered before the result is recorded: a crash in
                        // between re-runs the task on resume (a duplicate
                        // append), never loses its delivery.
                        if let Some(key) = &task.output_to_state {
                            shared.set(key, text.clone()).await?;
                        }
                        if let Some(s) = &session {
                            s.add_result(
                                &task.agent,
                                text.clone(),
                                Some(serde_json::json!({"run": run_id, "task": task.id})),
                            )
                            .await?;
                        }
                        result.output = Some(text.clone());
                    }
                    Outcome::Skipped => {
                        result.status = RunStatus::Skipped;
                        result.output = Some(String::new());
                    }
                    Outcome::Failed(error) => {
                        result.status = RunStatus::Failed;
                        result.error = Some(error.clone());
                    }
                }
                // Durable before anything that depends on it starts (the
                // scheduler learns of the end only when this future ends).
                store.put_task_result(&result).await?;
                Ok::<_, Error>((task, outcome, result, started.elapsed()))
            });
        }
        let Some(ended) = running.next().await else {
            break;
        };
        let (task, outcome, result, took) = ended?;
        match outcome {
            Outcome::Done(text) => {
                outputs.insert(task.id.clone(), text);
                schedule.finish(&task.id)?;
            }
            Outcome::Skipped => {
                outputs.insert(task.id.clone(), String::new());
                schedule.finish(&task.id)?;
            }
            Outcome::Failed(_) => {
                failed_any = true;
                let blocked: Vec<String> = schedule
                    .fail(&task.id)?
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                for b in blocked {
                    let r = TaskResult {
                        run_id: run.id.clone(),
                        task_id: b.clone(),
                        status: RunStatus::Failed,
                        output: None,
                        attempts: 0,
                        error: Some(format!("dependency '{}' failed", task.id)),
                        started_at: None,
                        finished_at: Some(now()),
                    };
                    store.put_task_result(&r).await?;
                    results.insert(b, r);
                }
                if opts.fail_fast {
                    stop_starting = true;
                }
            }
        }
        emit(
            &events,
            RunEvent::TaskEnded {
                task: task.id.clone(),
                status: result.status,
                secs: took.as_secs_f64(),
            },
        );
        results.insert(task.id.clone(), result);
    }
    run.status = if stop_starting && !schedule.is_finished() {
        RunStatus::Interrupted
    } else if failed_any {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    run.updated_at = now();
    store.put_run(&run).await?;
    emit(&events, RunEvent::Ended { status: run.status });
    let tasks = pipeline
        .tasks
        .iter()
        .filter_map(|t| results.remove(&t.id))
        .collect();
    Ok(RunReport { run, tasks })
}

/// One task: the agent's model call with timeout and retries; every retry
/// is recorded (status running, attempt count) before it is made.
#[allow(clippy::too_many_arguments)]
async fn run_task(
    rt: &Runtime,
    store: &std::sync::Arc<dyn crate::store::Store>,
    run_id: &str,
    task: &super::Task,
    prompt: String,
    context: Vec<(String, String)>,
    backoff: Duration,
    events: &Option<mpsc::UnboundedSender<RunEvent>>,
) -> (Outcome, u32) {
    let binding = match rt.core().binding_by_name(&task.agent) {
        Ok(b) => b,
        Err(e) => return (Outcome::Failed(e.to_string()), 0),
    };
    let mut user = prompt;
    if !context.is_empty() {
        user.push_str("\n\nContext from earlier tasks:");
        for (id, out) in &context {
            user.push_str(&format!("\n\n### {id}\n{out}"));
        }
    }
    let system = match &binding.spec.role {
        Some(role) => format!(
            "You are {}, the {role}. {}",
            binding.spec.name, binding.spec.instructions
        ),
        None => binding.spec.instructions.clone(),
    };
    let request = ChatRequest {
        messages: vec![
            PromptMessage::new(Role::System, system),
            PromptMessage::new(Role::User, user),
        ],
        temperature: binding.temperature,
        max_tokens: binding.max_tokens,
    };
    let attempts = task.retries + 1;
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        let record = TaskResult {
            run_id: run_id.to_string(),
            task_id: task.id.clone(),
            status: RunStatus::Running,
            output: None,
            attempts: attempt,
            error: None,
            started_at: Some(now()),
            finished_at: None,
        };
        // Retries are recorded as they start (a first attempt is implied by
        // the task having no final result yet), so `runs show` tells a
        // struggling task from a waiting one.
        if attempt > 1 {
            if let Err(e) = store.put_task_result(&record).await {
                return (
                    Outcome::Failed(format!("cannot record the attempt: {e}")),
                    attempt,
                );
            }
        }
        emit(
            events,
            RunEvent::TaskStarted {
                task: task.id.clone(),
                attempt,
            },
        );
        let call = binding.addr(0).send(Generate(request.clone()));
        let result = match task.timeout() {
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r,
                Err(_) => {
                    last_error = format!(
                        "task '{}' timed out after {} s (attempt {attempt} of {attempts})",
                        task.id,
                        t.as_secs()
                    );
                    retry_pause(events, task, attempt, attempts, &last_error, backoff).await;
                    continue;
                }
            },
            None => call.await,
        };
        match result {
            Ok(Ok(resp)) => return (Outcome::Done(resp.content), attempt),
            Ok(Err(e)) => last_error = e.to_string(),
            Err(e) => last_error = format!("agent '{}' unavailable: {e}", task.agent),
        }
        retry_pause(events, task, attempt, attempts, &last_error, backoff).await;
    }
    (Outcome::Failed(last_error), attempts)
}

async fn retry_pause(
    events: &Option<mpsc::UnboundedSender<RunEvent>>,
    task: &super::Task,
    attempt: u32,
    attempts: u32,
    error: &str,
    backoff: Duration,
) {
    if attempt < attempts {
        emit(
            events,
            RunEvent::TaskRetrying {
                task: task.id.clone(),
                attempt,
                error: error.to_string(),
            },
        );
        tokio::time::sleep(backoff * 2u32.saturating_pow(attempt - 1)).await;
    }
}

/// The actor of one run: it owns the run (the future of [`run_pipeline`],
/// spawned in its context) and takes `Cancel`; it stops when the run ends.
pub struct WorkflowActor {
    cancel: Arc<AtomicBool>,
    run: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>,
}

impl Actor for WorkflowActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(run) = self.run.take() {
            ctx.spawn(run.into_actor(self).map(|_, _, ctx| ctx.stop()));
        }
    }
}

/// Stop starting tasks; the running ones end and are recorded, and the run
/// ends `interrupted` (continue it with `--resume`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel;

impl Handler<Cancel> for WorkflowActor {
    type Result = ();

    fn handle(&mut self, _: Cancel, _: &mut Self::Context) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// A started run: cancel it, or wait for its report.
pub struct RunHandle {
    addr: Addr<WorkflowActor>,
    done: tokio::sync::oneshot::Receiver<Result<RunReport>>,
}

/// Cancels a run from anywhere (a clone of its actor's address).
#[derive(Clone)]
pub struct RunCanceller(Addr<WorkflowActor>);

impl RunCanceller {
    /// Asks the run to stop starting tasks (see [`Cancel`]).
    pub async fn cancel(&self) {
        let _ = self.0.send(Cancel).await;
    }
}

impl RunHandle {
    /// Asks the run to stop starting tasks (see [`Cancel`]).
    pub async fn cancel(&self) {
        let _ = self.addr.send(Cancel).await;
    }

    /// A canceller that can outlive a borrow of this handle.
    pub fn canceller(&self) -> RunCanceller {
        RunCanceller(self.addr.clone())
    }

    /// The run's report, once it ends.
    pub async fn wait(self) -> Result<RunReport> {
        self.done
            .await
            .map_err(|_| Error::Runtime("the workflow actor stopped before its run ended".into()))?
    }
}

/// Starts a run in a [`WorkflowActor`] (one per run) and returns its handle.
pub fn start_pipeline(
    rt: &Runtime,
    pipeline: Pipeline,
    path: String,
    mut opts: RunOptions,
    events: Option<mpsc::UnboundedSender<RunEvent>>,
) -> RunHandle {
    let cancel = opts.cancel.clone().unwrap_or_default();
    opts.cancel = Some(cancel.clone());
    let (tx, done) = tokio::sync::oneshot::channel();
    let rt2 = rt.clone();
    let core = rt.core();
    let arbiter = &core.arbiters[0];
    let addr = WorkflowActor::start_in_arbiter(arbiter, move |_| WorkflowActor {
        cancel,
        run: Some(Box::pin(async move {
            let report = run_pipeline(&rt2, &pipeline, &path, opts, events).await;
            let _ = tx.send(report);
        })),
    });
    RunHandle { addr, done }
}
