//! Checkpoints: take one, go on, go back — and nothing is lost.
//!
//! 1. A session chats, takes a checkpoint labelled `"before approach A"`,
//!    and tries approach A for two turns.
//! 2. `restore(&cp)` moves the session back: its history shrinks to what it
//!    was at the checkpoint, and its small state (preferences, interaction
//!    count, …) comes back too. Nothing is deleted: the tip it leaves gets a
//!    checkpoint of its own (kind `Branch`).
//! 3. The next turn starts a new branch (approach B); approach A is still in
//!    the store, as `branches()` shows.
//! 4. `checkpoints()` lists the manual checkpoints and the supervisor's
//!    automatic ones (here `config.checkpoint.every = 2`: one every second
//!    turn, taken in the turn's own commit).
//! 5. The runtime shuts down; a new runtime on the same SQLite file finds
//!    every checkpoint and restores them — approach A's tip, then
//!    `"before approach A"` again.
//!
//! Offline, no set-up (echo model); everything goes to a temporary directory
//! that is removed at the end.
//!
//! ```text
//! cargo run --example checkpoints
//! ```

use std::path::Path;

use troupe::checkpoint::{Checkpoint, CheckpointKind};
use troupe::{Config, Runtime, Session};

/// Every runtime here: the crate's agents, a SQLite file, an automatic
/// checkpoint every second turn.
fn config(db: &Path) -> Config {
    let mut c = Config::default();
    c.agents.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/agents").into();
    c.store.path = db.to_path_buf();
    c.checkpoint.every = 2;
    c
}

async fn chat(s: &Session, message: &str) -> anyhow::Result<()> {
    let reply = s.chat(message).await?;
    println!("  > {message}\n    {}", reply.reply);
    Ok(())
}

async fn print_history(s: &Session) -> anyhow::Result<()> {
    let history = s.history().await?;
    println!("  history: {} messages", history.len());
    for m in &history {
        println!("    {:<9} {}", m.role.as_str(), m.content);
    }
    Ok(())
}

fn kind(cp: &Checkpoint) -> &'static str {
    match cp.kind {
        CheckpointKind::Auto => "auto",
        CheckpointKind::Manual => "manual",
        CheckpointKind::Version => "version",
        CheckpointKind::Branch => "branch",
    }
}

fn print_checkpoints(cps: &[Checkpoint]) {
    println!("  {} checkpoints, oldest first:", cps.len());
    for cp in cps {
        println!(
            "    {:<7} taken {}  turn {}  head {:<20} {}",
            kind(cp),
            cp.created_at.format("%H:%M:%S%.3f"),
            cp.state.interactions,
            cp.head.map(|h| h.to_string()).unwrap_or("-".into()),
            cp.label.as_deref().unwrap_or("(no label)"),
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("troupe.db");

    {
        let rt = Runtime::builder().config(config(&db)).build().await?;
        let s = rt.session("launch-plan").user("user_123").open().await?;

        println!("== 1. chat, checkpoint, try approach A");
        chat(&s, "We need a plan for the launch.").await?;
        s.update_preference("tone", "cautious").await?;
        let cp = s.checkpoint("before approach A").await?;
        println!(
            "  checkpoint {:?} taken: id {}, head {}",
            cp.label.as_deref().unwrap_or_default(),
            cp.id,
            cp.head.map(|h| h.to_string()).unwrap_or("-".into())
        );
        s.update_preference("tone", "bold").await?;
        chat(&s, "Approach A: launch everywhere on day one.").await?;
        chat(&s, "And A's budget?").await?;
        print_history(&s).await?;
        println!(
            "  preferences: {}, turns: {}",
            serde_json::Value::Object(s.preferences().await?),
            s.metadata().await?.interactions
        );

        println!("\n== 2. restore(&cp)");
        let meta = s.restore(&cp).await?;
        println!(
            "  head is back at {}, turns: {}",
            meta.head.map(|h| h.to_string()).unwrap_or("-".into()),
            meta.interactions
        );
        print_history(&s).await?;
        println!(
            "  preferences: {}",
            serde_json::Value::Object(s.preferences().await?)
        );

        println!(
            "\n== 3. chat again: a new branch (the echo model sees only the restored history)"
        );
        chat(&s, "Approach B: one city first.").await?;
        chat(&s, "And B's budget?").await?;
        print_history(&s).await?;
        let branches = s.branches().await?;
        println!(
            "  branches: {} (approach A was not deleted)",
            branches.len()
        );
        for b in &branches {
            println!(
                "    head {}{}",
                b.head,
                if b.current { "  <- current" } else { "" }
            );
        }

        println!(
            "\n== 4. checkpoints(): manual, the tip restore left, the supervisor's (every 2 turns)"
        );
        print_checkpoints(&s.checkpoints().await?);

        rt.shutdown().await?;
    } // the first runtime is dropped here

    println!("\n== 5. a new runtime on the same file ({})", db.display());
    let rt = Runtime::builder().config(config(&db)).build().await?;
    let s = rt.session("launch-plan").existing().open().await?;
    let cps = s.checkpoints().await?;
    print_checkpoints(&cps);

    // The tip of approach A, kept by the checkpoint `restore` took when it
    // left it — still there after a restart.
    let tip_of_a = cps
        .iter()
        .find(|c| c.kind == CheckpointKind::Branch)
        .ok_or_else(|| anyhow::anyhow!("no checkpoint of approach A's tip"))?;
    println!(
        "\n  restore {:?} (approach A's tip):",
        tip_of_a.label.as_deref().unwrap_or_default()
    );
    let meta = s.restore(tip_of_a).await?;
    print_history(&s).await?;
    println!(
        "  preferences: {}, turns: {}",
        serde_json::Value::Object(s.preferences().await?),
        meta.interactions
    );

    let before_a = cps
        .iter()
        .find(|c| c.label.as_deref() == Some("before approach A"))
        .ok_or_else(|| anyhow::anyhow!("the labelled checkpoint is gone"))?;
    println!("\n  restore \"before approach A\" again:");
    let meta = s.restore(before_a).await?;
    print_history(&s).await?;
    println!(
        "  preferences: {}, turns: {}",
        serde_json::Value::Object(s.preferences().await?),
        meta.interactions
    );

    // The first restore here left approach B's tip: it got its checkpoint too.
    println!("\n  checkpoints() now:");
    print_checkpoints(&s.checkpoints().await?);

    rt.shutdown().await?;
    Ok(())
}
