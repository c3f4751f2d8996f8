//! `/v1/runs`: start a pipeline run (202 with its id; it goes on in its
//! `WorkflowActor`), list runs, show one with its task results.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::Data;
use crate::session::validate_session_id;
use crate::store::{RunStatus, StoreError};
use crate::workflow::{start_pipeline, Pipeline, RunCanceller, RunEvent, RunOptions};
use crate::Runtime;

/// The runs this daemon started and that have not ended, so a graceful
/// stop can interrupt them (they end `interrupted`, resumable).
#[derive(Default)]
pub(crate) struct RunTracker {
    running: DashMap<String, RunCanceller>,
}

impl RunTracker {
    /// Asks every running run to stop starting tasks, then waits (up to
    /// `limit`) until the store shows none of them running.
    pub(crate) async fn interrupt_all(&self, rt: &Runtime, limit: Duration) {
        let runs: Vec<(String, RunCanceller)> = self
            .running
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (_, c) in &runs {
            c.cancel().await;
        }
        let deadline = Instant::now() + limit;
        for (id, _) in runs {
            while Instant::now() < deadline {
                match rt.store().get_run(&id).await {
                    Ok(Some(r)) if r.status == RunStatus::Running => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    _ => break,
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct StartBody {
    pipeline: Option<String>,
    pipeline_toml: Option<String>,
    #[serde(default)]
    inputs: serde_json::Map<String, Value>,
    session_id: Option<String>,
}

/// `pipeline` as a file under the pipelines folder: relative, no `..`.
fn pipeline_path(dir: &Path, name: &str) -> Result<PathBuf, ApiError> {
    let rel = Path::new(name.strip_prefix("pipelines/").unwrap_or(name));
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ApiError::BadRequest(format!(
            "pipeline {name:?} must be a relative path under pipelines/ without '..'"
        )));
    }
    Ok(dir.join(rel))
}

/// `POST /v1/runs {"pipeline" | "pipeline_toml", "inputs", "session_id"?}`
/// → 202 `{"run_id"}`. An invalid pipeline is a 400 listing every problem.
pub(crate) async fn start(
    state: Data,
    body: web::Json<StartBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let (pipeline, path) = match (&body.pipeline, &body.pipeline_toml) {
        (Some(name), None) => {
            let path = pipeline_path(&state.pipelines_dir, name)?;
            let p = Pipeline::load(&path).map_err(crate::Error::from)?;
            (p, path.display().to_string())
        }
        (None, Some(text)) => {
            let p = Pipeline::parse("pipeline_toml.toml", text).map_err(crate::Error::from)?;
            (p, "pipeline_toml".to_string())
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of \"pipeline\" (a file under pipelines/) or \"pipeline_toml\" (its text)"
                    .into(),
            ))
        }
    };
    let agents: Vec<String> = state.rt.agents().into_iter().map(|a| a.name).collect();
    pipeline.validate(&agents).map_err(crate::Error::from)?;
    if let Some(s) = &body.session_id {
        validate_session_id(s)?;
    }
    let inputs: HashMap<String, String> = body
        .inputs
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect();
    let wf = &state.rt.config().workflow;
    let opts = RunOptions {
        inputs,
        session: body.session_id,
        max_parallel: wf.max_parallel,
        retry_backoff: Duration::from_millis(wf.retry_backoff_ms),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = start_pipeline(&state.rt, pipeline, path, opts, Some(tx));
    let run_id = match rx.recv().await {
        Some(RunEvent::Started { run_id, .. }) => run_id,
        // The run ended before it started (missing input, bad session): say why.
        _ => {
            return match handle.wait().await {
                Err(e) => Err(e.into()),
                Ok(report) => Ok(HttpResponse::Accepted().json(json!({ "run_id": report.run.id }))),
            }
        }
    };
    state
        .runs
        .running
        .insert(run_id.clone(), handle.canceller());
    let st = state.clone();
    let id = run_id.clone();
    tokio::spawn(async move {
        if let Err(e) = handle.wait().await {
            tracing::warn!(run = %id, error = %e, "workflow run failed");
        }
        st.runs.running.remove(&id);
    });
    Ok(HttpResponse::Accepted().json(json!({ "run_id": run_id })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
}

/// `GET /v1/runs?limit=` → `{"runs": [...]}`, newest first.
pub(crate) async fn list(state: Data, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let runs = state.rt.store().list_runs(q.limit.unwrap_or(50)).await?;
    Ok(HttpResponse::Ok().json(json!({ "runs": runs })))
}

/// `GET /v1/runs/{id}` → the run, its status and every task's result.
pub(crate) async fn get(state: Data, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let store = state.rt.store();
    let run = store
        .get_run(&id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "run",
            id: id.to_string(),
        })?;
    let tasks = store.task_results(&id).await?;
    Ok(HttpResponse::Ok().json(json!({
        "id": run.id,
        "pipeline": run.pipeline,
        "path": run.path,
        "status": run.status,
        "inputs": run.inputs,
        "session_id": run.session_id,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "tasks": tasks,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_paths_stay_under_the_folder() {
        let dir = Path::new("/srv/p");
        assert_eq!(pipeline_path(dir, "a.toml").unwrap(), dir.join("a.toml"));
        assert_eq!(
            pipeline_path(dir, "pipelines/a.toml").unwrap(),
            dir.join("a.toml")
        );
        assert!(pipeline_path(dir, "../etc/passwd").is_err());
        assert!(pipeline_path(dir, "/etc/passwd").is_err());
        assert!(pipeline_path(dir, "x/../../y").is_err());
        assert!(pipeline_path(dir, "").is_err());
    }
}
