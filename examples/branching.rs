//! Branching: two conversations grown from one checkpoint, and switching
//! between them.
//!
//! A session chats, takes a checkpoint (`"which destination?"`), explores the
//! mountains for two turns, is restored to the checkpoint, and explores the
//! seaside instead. `branches()` then lists both leaves of the conversation
//! tree — head, time of the last message, the checkpoint each grew from and
//! which one is current — and `switch_branch` moves between them, printing
//! each branch's history. Going on after a switch extends that branch.
//!
//! Offline, no set-up (echo model, memory store).
//!
//! ```text
//! cargo run --example branching
//! ```

use troupe::checkpoint::Branch;
use troupe::{Runtime, Session};

async fn chat(s: &Session, message: &str) -> anyhow::Result<()> {
    let reply = s.chat(message).await?;
    println!("  > {message}\n    {}", reply.reply);
    Ok(())
}

async fn print_history(s: &Session) -> anyhow::Result<()> {
    let history = s.history().await?;
    println!("  history: {} messages", history.len());
    for m in &history {
        println!("    {} {:<9} {}", m.id, m.role.as_str(), m.content);
    }
    Ok(())
}

async fn print_branches(s: &Session) -> anyhow::Result<Vec<Branch>> {
    let branches = s.branches().await?;
    println!("  branches(): {}", branches.len());
    for b in &branches {
        println!(
            "    head {}  last message {}  grew from {}  branched at {}{}",
            b.head,
            b.last_message_at
                .map(|t| t.format("%H:%M:%S%.6f").to_string())
                .unwrap_or("-".into()),
            match (&b.label, &b.grew_from) {
                (Some(label), _) => format!("{label:?}"),
                (None, Some(id)) => format!("checkpoint {id}"),
                (None, None) => "(no checkpoint)".into(),
            },
            b.branched_from
                .map(|m| m.to_string())
                .unwrap_or("(root)".into()),
            if b.current { "  <- current" } else { "" }
        );
    }
    Ok(branches)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::builder().memory_store().build().await?;
    let s = rt.session("weekend-trip").open().await?;

    println!("== the shared start, and a checkpoint");
    chat(&s, "Plan a weekend trip for two.").await?;
    let cp = s.checkpoint("which destination?").await?;
    println!(
        "  checkpoint {:?} at head {}",
        cp.label.as_deref().unwrap_or_default(),
        cp.head.map(|h| h.to_string()).unwrap_or("-".into())
    );

    println!("\n== branch 1: the mountains");
    chat(&s, "Let's go to the mountains.").await?;
    chat(&s, "Which trail is easiest?").await?;

    println!("\n== restore the checkpoint; branch 2: the seaside");
    s.restore(&cp).await?;
    chat(&s, "Let's go to the seaside.").await?;
    chat(&s, "Which beach is quietest?").await?;

    println!("\n== the tree");
    let branches = print_branches(&s).await?;

    // Each branch's history: switch to it, read it.
    for (i, b) in branches.iter().enumerate() {
        println!("\n== switch_branch to branch {} (head {})", i + 1, b.head);
        let meta = s.switch_branch(b).await?;
        println!(
            "  head now {}",
            meta.head.map(|h| h.to_string()).unwrap_or("-".into())
        );
        print_history(&s).await?;
    }

    // Back on the mountains and carry on: that branch grows, there are still
    // two branches. (A turn after a switch starts a new segment, so the listing
    // now shows the mountains branch as growing from its old tip, and from the
    // checkpoint `restore` took there when it left that tip.)
    let mountains = branches
        .iter()
        .find(|b| !b.current)
        .ok_or_else(|| anyhow::anyhow!("expected a branch that is not current"))?;
    println!("\n== back to the mountains, and carry on there");
    s.switch_branch(mountains).await?;
    chat(&s, "Book a hut for Saturday night.").await?;
    print_branches(&s).await?;

    rt.shutdown().await?;
    Ok(())
}
