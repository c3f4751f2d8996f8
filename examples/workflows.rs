//! A config-file pipeline run from code: research → outline → write → review.
//!
//! Loads `pipelines/article.toml`, checks it against the agents, runs it
//! (independent tasks in parallel, each result stored durably as it ends),
//! prints the progress events and the report, and shows the results
//! appended to the session and the review written to shared state. The same
//! run from the command line is `troupe run pipelines/article.toml --input
//! topic="quantum computing" --session project_x`.
//!
//! Offline, no set-up (echo model, SQLite in a temporary directory):
//!
//! ```text
//! cargo run --example workflows
//! ```

use std::collections::HashMap;

use troupe::workflow::{start_pipeline, Pipeline, RunEvent, RunOptions};
use troupe::{Config, Runtime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.agents.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/agents").into();
    let rt = Runtime::builder()
        .config(config)
        .sqlite(dir.path().join("troupe.db"))
        .build()
        .await?;

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/article.toml");
    let agents: Vec<String> = rt.agents().into_iter().map(|a| a.name).collect();
    // Every problem of the file at once (unknown agents, cycles, bad templates…), before anything runs.
    let pipeline = Pipeline::load_checked(path, &agents)?;
    println!("pipeline '{}' in levels:", pipeline.name);
    for (i, level) in pipeline.levels()?.iter().enumerate() {
        println!("  {i}: {}", level.join(", "));
    }

    let opts = RunOptions {
        inputs: HashMap::from([("topic".to_string(), "quantum computing".to_string())]),
        session: Some("project_x".into()),
        ..RunOptions::default()
    };
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let run = start_pipeline(&rt, pipeline, path.into(), opts, Some(tx));
    let printer = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            match e {
                RunEvent::TaskStarted { task, attempt } => {
                    println!("  start {task} (attempt {attempt})")
                }
                RunEvent::TaskEnded { task, status, secs } => {
                    println!("  end   {task}: {status:?} in {secs:.3}s")
                }
                other => println!("  {other:?}"),
            }
        }
    });
    let report = run.wait().await?;
    printer.await?;

    println!("\nrun {} ended {:?}", report.run.id, report.run.status);
    for t in &report.tasks {
        println!(
            "  {:<9} {:?} after {} attempt(s): {}",
            t.task_id,
            t.status,
            t.attempts,
            t.output
                .as_deref()
                .unwrap_or("-")
                .chars()
                .take(60)
                .collect::<String>()
        );
    }

    // The results went into the session, and the review into shared state.
    let session = rt.session("project_x").existing().open().await?;
    println!(
        "\nsession project_x now has {} messages",
        session.history().await?.len()
    );
    let review = rt.shared_state("project_x").value("article.final").await?;
    println!("shared state article.final is set: {}", review.is_some());

    rt.shutdown().await?;
    Ok(())
}
