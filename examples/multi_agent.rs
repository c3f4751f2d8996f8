//! Several agents in one session, sharing state.
//!
//! A researcher and a writer work in one session: each message records which
//! agent wrote it, and each agent's prompt shows the other's words under its
//! name. A `SharedState` namespace holds data every agent (and every session
//! attached to it) sees; `compare_and_set` makes concurrent updates safe, and
//! `subscribe` streams every change in order.
//!
//! Offline, no set-up (echo model, SQLite in a temporary directory):
//!
//! ```text
//! cargo run --example multi_agent
//! ```

use futures::StreamExt;
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

    // A namespace shared by every agent of the project.
    let shared = rt.shared_state("project_x");
    let mut changes = Box::pin(shared.subscribe().await?);
    shared.set("style", "plain English").await?;

    let session = rt
        .session("project_x")
        .agents([rt.agent("researcher")?, rt.agent("writer")?])
        .shared_state(shared.clone())
        .open()
        .await?;

    println!("== two agents, one conversation");
    let research = session
        .run_agent("researcher", "Research quantum computing")
        .await?;
    println!("researcher: {}", research.reply);
    let article = session
        .run_agent("writer", "Write an article based on the research")
        .await?;
    println!("writer:     {}", article.reply);

    println!("\n== every message knows its agent");
    for m in session.history().await? {
        println!(
            "  {:<9} {:<10} {}",
            m.role.as_str(),
            m.agent.as_deref().unwrap_or("-"),
            m.content
        );
    }

    println!("\n== shared state: concurrent increments with compare_and_set lose nothing");
    shared.set("drafts", 0).await?;
    let mut writers = Vec::new();
    for _ in 0..8 {
        let shared = shared.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let entry = shared.get("drafts").await?.expect("set above");
                    let n = entry.value.as_i64().unwrap_or(0);
                    match shared.compare_and_set("drafts", entry.version, n + 1).await {
                        Ok(_) => break,
                        Err(e) if e.is_version_mismatch() => continue, // someone else won; retry
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<_, troupe::Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let drafts = shared.value("drafts").await?;
    println!(
        "drafts = {} (8 writers x 25 increments)",
        drafts.unwrap_or_default()
    );

    println!("\n== the first changes a subscriber saw, in order");
    for _ in 0..3 {
        if let Some(change) = changes.next().await {
            let c = change?;
            println!("  v{} {} = {:?}", c.version, c.key, c.value);
        }
    }

    rt.shutdown().await?;
    Ok(())
}
