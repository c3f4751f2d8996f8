//! The library quickstart: a session that remembers.
//!
//! Builds a runtime on a SQLite file in a temporary directory, takes the
//! `assistant` agent from the crate's `agents/` folder, opens a session for a
//! user and chats twice — the second reply shows the first turn was in the
//! model's context. Then: the history, preferences and metadata, a second
//! agent built in code, the scoped form (`SessionBuilder::scope`, which
//! closes the session afterwards) and a streamed reply (`chat_stream`).
//!
//! Offline, no set-up: the default model is `echo`, a deterministic stand-in
//! that quotes the last message and says how much conversation it was given.
//!
//! ```text
//! cargo run --example sessions
//! ```

use futures::StreamExt;
use troupe::{Agent, Config, Runtime, StreamEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Everything this example writes goes to a temporary directory, removed at the end.
    let dir = tempfile::tempdir()?;

    let mut config = Config::default(); // model: echo (offline)
    config.agents.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/agents").into();
    let rt = Runtime::builder()
        .config(config)
        .sqlite(dir.path().join("troupe.db"))
        .build()
        .await?;

    // An agent from agents/assistant.toml.
    let assistant = rt.agent("assistant")?;
    println!(
        "agents in the catalog: {:?}",
        rt.agents()
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
    );

    // Open (or create) a session; every turn is durable before `chat` returns.
    let session = rt
        .session("alice-demo")
        .user("user_123")
        .agent(assistant)
        .open()
        .await?;
    println!("\n== chat ({})", session.id());
    for message in ["My name is Alice", "What's my name?"] {
        let reply = session.chat(message).await?;
        println!("> {message}\n{}: {}", reply.agent, reply.reply);
    }

    println!("\n== history (root to head)");
    for m in session.history().await? {
        println!("  {:<9} {}", m.role.as_str(), m.content);
    }

    // Small state: preferences and profile go into the model's context;
    // metadata is the application's own.
    session.update_preference("language", "en").await?;
    session.update_profile("name", "Alice").await?;
    session.set_metadata("channel", "example").await?;
    println!("\n== state");
    println!(
        "  preferences: {}",
        serde_json::Value::Object(session.preferences().await?)
    );
    println!(
        "  profile:     {}",
        serde_json::Value::Object(session.profile().await?)
    );
    let meta = session.metadata().await?;
    println!(
        "  metadata:    user {:?}, agents {:?}, {} turns, created {}, custom {}",
        meta.user_id,
        meta.agents,
        meta.interactions,
        meta.created_at.format("%Y-%m-%d %H:%M:%S"),
        serde_json::Value::Object(meta.custom)
    );

    // A second agent, defined in code, in a session of its own. The scoped
    // form opens the session, runs the body and closes it — also on error.
    let reviewer = Agent::builder("terse-reviewer")
        .role("reviewer")
        .instructions("Review the user's text in one sentence.")
        .build();
    println!("\n== scope (agent built in code)");
    let replies = rt
        .session("review-demo")
        .agent(reviewer)
        .scope(|s| async move {
            let first = s.chat("Here is my draft.").await?;
            let second = s
                .chat_with("terse-reviewer", "And the new version?")
                .await?;
            Ok(vec![first.reply, second.reply])
        })
        .await?;
    for r in &replies {
        println!("  {r}");
    }
    // Only alice-demo is still live: the scope closed review-demo (its turns stay in the store).
    println!("  live sessions after the scope: {}", rt.live_sessions());

    // Streaming: pieces as the model produces them, then `Done` once the turn is durable.
    println!("\n== chat_stream");
    print!("  ");
    let mut stream = Box::pin(session.chat_stream("Tell me a story").await?);
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Delta(piece) => print!("{piece}"),
            StreamEvent::Done(reply) => println!("\n  (durable as message {})", reply.message_id),
        }
    }
    println!(
        "  the session now has {} messages",
        session.history().await?.len()
    );

    rt.shutdown().await?;
    Ok(())
}
