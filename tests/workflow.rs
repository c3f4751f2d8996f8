//! Running pipelines: order, parallelism, retries, timeouts, failures,
//! durable results and resume, results in the session and shared state.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use troupe::config::Config;
use troupe::store::{RunStatus, SyncMode};
use troupe::test_utils::ScriptedModel;
use troupe::workflow::{run_pipeline, Pipeline, RunEvent, RunOptions};
use troupe::Runtime;

fn agents_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("agents")
}

/// Fails every call whose user message starts with `prefix`; else asks `inner`.
struct FailOn {
    prefix: String,
    inner: std::sync::Arc<ScriptedModel>,
}

#[async_trait::async_trait]
impl troupe::ChatModel for FailOn {
    fn name(&self) -> &str {
        "fail-on"
    }
    async fn complete(
        &self,
        request: &troupe::model::ChatRequest,
    ) -> Result<troupe::model::ChatResponse, troupe::model::ModelError> {
        if request
            .messages
            .last()
            .is_some_and(|m| m.content.starts_with(&self.prefix))
        {
            self.inner.requests.lock().unwrap().push(request.clone());
            return Err(troupe::model::ModelError::Failed("refused by test".into()));
        }
        self.inner.complete(request).await
    }
}

async fn rt_with_model(dir: &Path, model: std::sync::Arc<dyn troupe::ChatModel>) -> Runtime {
    let mut c = Config::default();
    c.store.path = dir.join("wf.db");
    c.store.sync = SyncMode::Normal;
    c.agents.dir = agents_dir();
    Runtime::builder()
        .config(c)
        .model(model)
        .build()
        .await
        .unwrap()
}

async fn rt_with(dir: &Path, model: std::sync::Arc<ScriptedModel>) -> Runtime {
    let mut c = Config::default();
    c.store.path = dir.join("wf.db");
    c.store.sync = SyncMode::Normal;
    c.agents.dir = agents_dir();
    Runtime::builder()
        .config(c)
        .model(model)
        .build()
        .await
        .unwrap()
}

fn opts() -> RunOptions {
    RunOptions {
        retry_backoff: Duration::from_millis(5),
        ..RunOptions::default()
    }
}

async fn run_collecting(
    rt: &Runtime,
    p: &Pipeline,
    o: RunOptions,
) -> (troupe::Result<troupe::workflow::RunReport>, Vec<RunEvent>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = run_pipeline(rt, p, "test", o, Some(tx)).await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (r, events)
}

const FAN_OUT: &str = r#"
name = "fan"
[[task]]
id = "plan"
agent = "planner"
prompt = "plan it"
[[task]]
id = "a"
agent = "researcher"
depends_on = ["plan"]
prompt = "a from {{ tasks.plan.output }}"
[[task]]
id = "b"
agent = "researcher"
depends_on = ["plan"]
prompt = "b"
[[task]]
id = "c"
agent = "researcher"
depends_on = ["plan"]
prompt = "c"
[[task]]
id = "join"
agent = "writer"
depends_on = ["a", "b", "c"]
prompt = "join {{ tasks.a.output }} {{ tasks.b.output }} {{ tasks.c.output }}"
output_to_state = "article.final"
"#;

#[tokio::test]
async fn dependencies_first_and_independent_tasks_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::with_delay(Duration::from_millis(50));
    let rt = rt_with(dir.path(), model.clone()).await;
    let p = Pipeline::parse("fan.toml", FAN_OUT).unwrap();
    let (report, events) = run_collecting(
        &rt,
        &p,
        RunOptions {
            session: Some("proj".into()),
            ..opts()
        },
    )
    .await;
    let report = report.unwrap();
    assert_eq!(report.run.status, RunStatus::Succeeded);
    let pos = |want: &RunEvent| events.iter().position(|e| e == want).unwrap();
    let start = |t: &str| {
        events
            .iter()
            .position(|e| matches!(e, RunEvent::TaskStarted { task, .. } if task == t))
            .unwrap()
    };
    let end = |t: &str| {
        events
            .iter()
            .position(|e| matches!(e, RunEvent::TaskEnded { task, .. } if task == t))
            .unwrap()
    };
    // Never before its dependencies end.
    for t in ["a", "b", "c"] {
        assert!(
            end("plan") < start(t),
            "{t} started before plan ended: {events:?}"
        );
        assert!(end(t) < start("join"));
    }
    // Independent tasks overlap: all three started before any of them ended.
    let first_end = ["a", "b", "c"].iter().map(|t| end(t)).min().unwrap();
    assert!(
        ["a", "b", "c"].iter().all(|t| start(t) < first_end),
        "{events:?}"
    );
    let _ = pos;
    // The join saw every upstream output; results are in the session and the shared state.
    let join = report.tasks.iter().find(|t| t.task_id == "join").unwrap();
    assert!(join
        .output
        .as_ref()
        .unwrap()
        .contains("reply to: join reply to: a from"));
    let shared = rt.shared_state("proj");
    assert_eq!(
        shared.value("article.final").await.unwrap(),
        Some(serde_json::json!(join.output.clone().unwrap()))
    );
    let h = rt
        .session("proj")
        .existing()
        .open()
        .await
        .unwrap()
        .history()
        .await
        .unwrap();
    assert_eq!(h.len(), 5);
    assert_eq!(h.last().unwrap().agent.as_deref(), Some("writer"));
}

#[tokio::test]
async fn a_failing_task_is_retried_then_fails_only_its_dependents() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::new();
    let rt = rt_with(dir.path(), model.clone()).await;
    let text = r#"
name = "f"
[[task]]
id = "flaky"
agent = "assistant"
retries = 2
prompt = "flaky"
[[task]]
id = "ok"
agent = "assistant"
prompt = "fine"
[[task]]
id = "broken"
agent = "assistant"
retries = 1
prompt = "please FAIL"
[[task]]
id = "after_broken"
agent = "assistant"
depends_on = ["broken"]
prompt = "never"
[[task]]
id = "after_flaky"
agent = "assistant"
depends_on = ["flaky"]
prompt = "after {{ tasks.flaky.output }}"
"#;
    let p = Pipeline::parse("f.toml", text).unwrap();
    // The first two calls fail: flaky's first two attempts (it is first in the file).
    model.fail_next.store(2, Ordering::SeqCst);
    let (report, _) = run_collecting(
        &rt,
        &p,
        RunOptions {
            max_parallel: 1,
            ..opts()
        },
    )
    .await;
    let report = report.unwrap();
    let by = |id: &str| {
        report
            .tasks
            .iter()
            .find(|t| t.task_id == id)
            .unwrap()
            .clone()
    };
    assert_eq!(report.run.status, RunStatus::Failed);
    assert_eq!(by("broken").status, RunStatus::Failed);
    assert_eq!(by("broken").attempts, 2);
    assert!(by("after_broken")
        .error
        .unwrap()
        .contains("dependency 'broken' failed"));
    assert_eq!(by("flaky").status, RunStatus::Succeeded);
    assert_eq!(by("flaky").attempts, 3);
    assert_eq!(by("after_flaky").status, RunStatus::Succeeded);
    assert_eq!(by("ok").status, RunStatus::Succeeded);
    // "after_broken" was never sent to the model.
    assert!(!model
        .requests()
        .iter()
        .any(|r| r.messages[1].content.contains("never")));
}

#[tokio::test]
async fn a_hanging_call_times_out_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::with_delay(Duration::from_millis(1500));
    let rt = rt_with(dir.path(), model.clone()).await;
    let text = r#"
name = "t"
[[task]]
id = "slow"
agent = "assistant"
timeout_secs = 1
retries = 1
prompt = "slow"
"#;
    let p = Pipeline::parse("t.toml", text).unwrap();
    let (report, events) = run_collecting(&rt, &p, opts()).await;
    let report = report.unwrap();
    let slow = &report.tasks[0];
    assert_eq!(slow.status, RunStatus::Failed);
    assert_eq!(slow.attempts, 2);
    assert!(
        slow.error.as_ref().unwrap().contains("timed out after 1 s"),
        "{slow:?}"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, RunEvent::TaskRetrying { .. })));
}

#[tokio::test]
async fn resume_does_not_send_finished_tasks_to_the_model_again() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::new();
    let p = Pipeline::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/article.toml"))
        .unwrap();
    let mut o = opts();
    o.inputs.insert("topic".into(), "qubits".into());
    o.max_parallel = 1;
    // research and outline succeed; write fails every attempt (3 with retries = 2).
    let failing = std::sync::Arc::new(FailOn {
        prefix: "Write".into(),
        inner: model.clone(),
    });
    let rt_failing = rt_with_model(dir.path(), failing).await;
    let first = run_pipeline(&rt_failing, &p, "pipelines/article.toml", o.clone(), None)
        .await
        .unwrap();
    drop(rt_failing);
    assert_eq!(first.run.status, RunStatus::Failed);
    let sent_before = model.requests().len();
    let done: Vec<_> = first
        .tasks
        .iter()
        .filter(|t| t.status == RunStatus::Succeeded)
        .map(|t| t.task_id.clone())
        .collect();
    assert_eq!(done, ["research", "outline"]);
    // Resume in a fresh runtime on the same store (as after a crash).
    let model2 = ScriptedModel::new();
    let rt = rt_with(dir.path(), model2.clone()).await;
    let resumed = run_pipeline(
        &rt,
        &p,
        "pipelines/article.toml",
        RunOptions {
            resume: Some(first.run.id.clone()),
            ..opts()
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(resumed.run.status, RunStatus::Succeeded);
    assert_eq!(resumed.run.id, first.run.id);
    let prompts: Vec<String> = model2
        .requests()
        .iter()
        .map(|r| r.messages[1].content.clone())
        .collect();
    assert_eq!(prompts.len(), 2, "only write and review: {prompts:?}");
    assert!(prompts[0].starts_with("Write the article."));
    assert!(!prompts.iter().any(|p| p.starts_with("Research")));
    assert_eq!(
        sent_before, 5,
        "research, outline, and three attempts at write"
    );
    let stored = rt.store().task_results(&first.run.id).await.unwrap();
    assert!(stored.iter().all(|t| t.status == RunStatus::Succeeded));
}

#[tokio::test]
async fn a_bad_pipeline_or_missing_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::new();
    let rt = rt_with(dir.path(), model.clone()).await;
    let p = Pipeline::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/article.toml"))
        .unwrap();
    let err = run_pipeline(&rt, &p, "x", opts(), None).await.unwrap_err();
    assert!(err.to_string().contains("topic"), "{err}");
    assert!(model.requests().is_empty());
    assert!(rt.store().list_runs(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_bad_session_id_leaves_no_run_behind() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt_with(dir.path(), ScriptedModel::new()).await;
    let p = Pipeline::parse(
        "one.toml",
        "name = \"one\"\n[[task]]\nid = \"a\"\nagent = \"assistant\"\nprompt = \"hi\"\n",
    )
    .unwrap();
    let err = run_pipeline(
        &rt,
        &p,
        "one.toml",
        RunOptions {
            session: Some("bad id!".into()),
            ..opts()
        },
        None,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("bad id!"), "{err}");
    assert!(rt.store().list_runs(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_workflow_actor_cancelled_mid_run_ends_interrupted_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::with_delay(Duration::from_millis(30));
    let rt = rt_with(dir.path(), model.clone()).await;
    let text = r#"
name = "chain"
[[task]]
id = "a"
agent = "assistant"
prompt = "step a"
[[task]]
id = "b"
agent = "assistant"
depends_on = ["a"]
prompt = "step b"
[[task]]
id = "c"
agent = "assistant"
depends_on = ["b"]
prompt = "step c"
"#;
    let p = Pipeline::parse("chain.toml", text).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle =
        troupe::workflow::start_pipeline(&rt, p.clone(), "chain.toml".into(), opts(), Some(tx));
    // Cancel as soon as the first task has ended.
    while let Some(e) = rx.recv().await {
        if matches!(e, RunEvent::TaskEnded { ref task, .. } if task == "a") {
            handle.cancel().await;
            break;
        }
    }
    let report = handle.wait().await.unwrap();
    assert_eq!(report.run.status, RunStatus::Interrupted);
    let done: Vec<_> = report.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert!(done.starts_with(&["a"]) && !done.contains(&"c"), "{done:?}");
    let sent_before = model.requests().len();
    let resumed = run_pipeline(
        &rt,
        &p,
        "chain.toml",
        RunOptions {
            resume: Some(report.run.id.clone()),
            ..opts()
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(resumed.run.status, RunStatus::Succeeded);
    let later: Vec<String> = model.requests()[sent_before..]
        .iter()
        .map(|r| r.messages[1].content.clone())
        .collect();
    assert!(!later.iter().any(|m| m.starts_with("step a")), "{later:?}");
    assert!(
        later.last().is_some_and(|m| m.starts_with("step c")),
        "{later:?}"
    );
}
