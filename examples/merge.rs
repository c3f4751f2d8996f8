//! Merge: two sessions into one.
//!
//! A user talks to the same assistant from a laptop and from a phone — two
//! sessions, with their own user data; both set the key `theme`, to
//! different values. `laptop.merge(&phone)` builds a new session,
//! `laptop_merged`, holding both histories ordered by time and the union of
//! both small states. Where a key conflicts, the more recently updated
//! session wins, and the `MergeReport` lists the key, both values and the
//! winner. The two sessions themselves are left as they were.
//!
//! Offline, no set-up (echo model, memory store).
//!
//! ```text
//! cargo run --example merge
//! ```

use troupe::{Runtime, Session};

async fn chat(s: &Session, message: &str) -> anyhow::Result<()> {
    let reply = s.chat(message).await?;
    println!("  [{}] > {message}", s.id());
    println!("  [{}]   {}", s.id(), reply.reply);
    Ok(())
}

async fn print_state(s: &Session) -> anyhow::Result<()> {
    let meta = s.metadata().await?;
    println!(
        "  {:<14} {} messages, turns: {}, updated {}, user data {}",
        s.id(),
        s.history().await?.len(),
        meta.interactions,
        meta.updated_at.format("%H:%M:%S%.6f"),
        serde_json::Value::Object(s.user_data().await?)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::builder().memory_store().build().await?;
    let laptop = rt.session("laptop").user("user_123").open().await?;
    let phone = rt.session("phone").user("user_123").open().await?;

    println!("== two sessions, turns interleaved in time");
    chat(&laptop, "(laptop) Draft the quarterly report outline.").await?;
    laptop.set_user_data("theme", "dark").await?;
    laptop.set_user_data("report", "Q3 outline").await?;
    chat(&phone, "(phone) Remind me to call the bank.").await?;
    chat(&laptop, "(laptop) Add a section on hiring.").await?;
    // The phone's change comes last: the phone session is the more recently updated.
    phone.set_user_data("reminder", "call the bank").await?;
    phone.set_user_data("theme", "light").await?;

    println!("\n== before the merge");
    print_state(&laptop).await?;
    print_state(&phone).await?;

    println!("\n== laptop.merge(&phone)");
    let (merged, report) = laptop.merge(&phone).await?;
    println!(
        "  new session {} with {} messages; {} conflict(s):",
        report.session_id,
        report.messages,
        report.conflicts.len()
    );
    for c in &report.conflicts {
        let winner = if c.winner == "a" {
            laptop.id()
        } else {
            phone.id()
        };
        println!(
            "    {}.{}: laptop {} / phone {} -> winner {} ({})",
            c.section, c.key, c.a, c.b, c.winner, winner
        );
    }

    println!("\n== the merged history, in time order");
    for m in merged.history().await? {
        println!(
            "    {} {:<9} {}",
            m.created_at.format("%H:%M:%S%.6f"),
            m.role.as_str(),
            m.content
        );
    }

    println!("\n== after the merge");
    print_state(&merged).await?;
    println!(
        "  {} metadata: {}",
        merged.id(),
        serde_json::Value::Object(merged.metadata().await?.custom)
    );
    print_state(&laptop).await?;
    print_state(&phone).await?;

    println!("\n== the merged session carries on with both histories in context");
    chat(&merged, "What were we doing?").await?;

    rt.shutdown().await?;
    Ok(())
}
