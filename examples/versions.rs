//! Versions and forks: numbered save points, and a new session grown from one.
//!
//! 1. `save_version("after onboarding")` returns a version number (1); more
//!    turns and a second `save_version` give 2. `list_versions()` prints them.
//! 2. `restore_version(1)` brings the session back to version 1: history and
//!    small state (profile, user data, …).
//! 3. `fork(&checkpoint, "new-id")` starts a new session at version 2's
//!    checkpoint: its history shares the messages up to there (same message
//!    ids — shared in the store, not copied), then the two go their own ways.
//!
//! Offline, no set-up (echo model, memory store).
//!
//! ```text
//! cargo run --example versions
//! ```

use troupe::{Runtime, Session};

async fn chat(s: &Session, message: &str) -> anyhow::Result<()> {
    let reply = s.chat(message).await?;
    println!("  > {message}\n    {}", reply.reply);
    Ok(())
}

async fn print_state(s: &Session) -> anyhow::Result<()> {
    let r = s.record().await?;
    println!(
        "  {}: {} messages, turns: {}, profile {}, user data {}",
        s.id(),
        s.history().await?.len(),
        r.interactions,
        serde_json::Value::Object(r.profile),
        serde_json::Value::Object(r.user_data)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::builder().memory_store().build().await?;
    let s = rt.session("onboarding").user("user_123").open().await?;

    println!("== onboarding, then version 1");
    chat(&s, "Hi, I'm Dana and I'm new here.").await?;
    s.update_profile("name", "Dana").await?;
    chat(&s, "I work in finance.").await?;
    s.update_profile("team", "finance").await?;
    let v1 = s.save_version("after onboarding").await?;
    println!("  save_version(\"after onboarding\") -> {v1}");

    println!("\n== more turns, then version 2");
    chat(&s, "Set up my dashboard: revenue and churn.").await?;
    s.set_user_data("dashboard", "revenue+churn").await?;
    let v2 = s.save_version("dashboard configured").await?;
    println!("  save_version(\"dashboard configured\") -> {v2}");
    chat(&s, "Actually, replace churn with cash flow.").await?;
    s.set_user_data("dashboard", "revenue+cash-flow").await?;
    print_state(&s).await?;

    println!("\n== list_versions()");
    for v in s.list_versions().await? {
        println!(
            "  v{}  {:<22} saved {}  checkpoint {}",
            v.version,
            v.description.as_deref().unwrap_or("-"),
            v.timestamp.format("%H:%M:%S%.3f"),
            v.checkpoint_id
        );
    }

    println!("\n== restore_version({v1})");
    let meta = s.restore_version(v1).await?;
    println!(
        "  head {}, turns {}",
        meta.head.map(|h| h.to_string()).unwrap_or("-".into()),
        meta.interactions
    );
    print_state(&s).await?;
    for m in s.history().await? {
        println!("    {:<9} {}", m.role.as_str(), m.content);
    }

    // A version names its checkpoint; fork takes the checkpoint itself.
    println!("\n== fork version {v2} into a new session");
    let versions = s.list_versions().await?;
    let v2_checkpoint_id = &versions
        .iter()
        .find(|v| v.version == v2)
        .ok_or_else(|| anyhow::anyhow!("version {v2} is missing"))?
        .checkpoint_id;
    let cp = s
        .checkpoints()
        .await?
        .into_iter()
        .find(|c| &c.id == v2_checkpoint_id)
        .ok_or_else(|| anyhow::anyhow!("the checkpoint of version {v2} is missing"))?;
    let fork = s.fork(&cp, "onboarding-experiment").await?;
    println!(
        "  {} forked_from {}",
        fork.id(),
        fork.metadata()
            .await?
            .custom
            .get("forked_from")
            .cloned()
            .unwrap_or_default()
    );
    print_state(&fork).await?;
    chat(&fork, "In the experiment: try a weekly report instead.").await?;

    // Both sessions from the root: shared message ids up to version 2's head.
    println!(
        "\n== the fork's history, and whether each message is shared with the original at v{v2}"
    );
    s.restore_version(v2).await?;
    let original = s.history().await?;
    let forked = fork.history().await?;
    let shared = original
        .iter()
        .zip(&forked)
        .take_while(|(a, b)| a.id == b.id)
        .count();
    for (i, m) in forked.iter().enumerate() {
        println!(
            "    {:<6} {} {:<9} {}",
            if i < shared { "shared" } else { "own" },
            m.id,
            m.role.as_str(),
            m.content
        );
    }
    println!(
        "  {shared} of the fork's {} messages are the original's (same ids, stored once); the original, at v{v2}, has {}",
        forked.len(),
        original.len()
    );

    rt.shutdown().await?;
    Ok(())
}
