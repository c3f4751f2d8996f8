//! Long-term memory, offline: two sessions of one user on one SQLite file,
//! the second in a new runtime (as after a restart). The model is the echo
//! model, wrapped to print the system message it is sent — so you can see
//! the second session's prompt carry what the first one learned.
//!
//! `cargo run --example memory`

use std::sync::Arc;

use async_trait::async_trait;
use troupe::memory::{recency, Memory, MemoryItem, MemoryProvider};
use troupe::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use troupe::{Agent, EchoModel, Runtime};

/// The echo model, printing the system message of every prompt.
struct ShowPrompt(EchoModel);

#[async_trait]
impl ChatModel for ShowPrompt {
    fn name(&self) -> &str {
        "echo"
    }
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ModelError> {
        if let Some(system) = request.messages.first() {
            println!("  ┌ system message sent to the model:");
            for line in system.content.lines() {
                println!("  │ {line}");
            }
            println!(
                "  └ (+ {} history messages)",
                request.messages.len().saturating_sub(2)
            );
        }
        self.0.complete(request).await
    }
    fn reply_meta(&self) -> serde_json::Value {
        self.0.reply_meta()
    }
}

async fn runtime(db: &std::path::Path) -> troupe::Result<Runtime> {
    Runtime::builder()
        .sqlite(db)
        .model(Arc::new(ShowPrompt(EchoModel::new())))
        .build()
        .await
}

fn memory_agent() -> Agent {
    let memory = Memory::builder()
        .provider(MemoryProvider::Sqlite)
        .quality_threshold(0.7)
        .max_memories(1000)
        .build();
    // The default scorer, written out: replace it with your own.
    memory.set_quality_scorer(|m: &MemoryItem| {
        0.4 * m.relevance + 0.3 * recency(m.created_at) + 0.3 * m.importance
    });
    Agent::builder("MemoryAgent")
        .instructions("Remember user preferences")
        .memory(memory)
        .build()
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let dir = std::env::temp_dir().join(format!("troupe-memory-example-{}", std::process::id()));
    let db = dir.join("memory.db");

    println!("== session 1 (user_123)");
    {
        let rt = runtime(&db).await?;
        // persist_memory(true) without .user(..): the session id is the user id.
        let s1 = rt
            .session("user_123")
            .agent(memory_agent())
            .persist_memory(true)
            .open()
            .await?;
        for text in [
            "I prefer Python over JavaScript",
            "My favourite colour is blue",
        ] {
            println!("> {text}");
            println!("{}", s1.chat(text).await?.reply);
        }
        s1.update_preference("language", "en").await?;
        rt.shutdown().await?;
    }

    println!("\n== session 2 (user_123-b, same user, new runtime on the same file)");
    let rt = runtime(&db).await?;
    let s2 = rt
        .session("user_123-b")
        .user("user_123")
        .agent(memory_agent())
        .open()
        .await?;
    let q = "What's my favourite programming language?";
    println!("> {q}");
    println!("{}", s2.chat(q).await?.reply);

    println!("\n== a newer preference supersedes the older one");
    println!("> I now prefer Rust");
    s2.chat("I now prefer Rust").await?;
    for m in rt.memories().history("user_123").await? {
        let state = if m.superseded_by.is_some() {
            "superseded"
        } else {
            "active"
        };
        println!("  {:<10} {:.2}  {}", state, m.score, m.content);
    }

    println!("\n== build_context(): what the agent sees");
    let ctx = s2.build_context().await?;
    println!(
        "  user {:?}, {} interactions, preferences {:?}",
        ctx.user_id, ctx.interactions, ctx.preferences
    );
    println!(
        "  memories: {:?}",
        ctx.memories.iter().map(|m| &m.content).collect::<Vec<_>>()
    );
    println!("  recent topics: {:?}", ctx.recent_topics);

    println!("\n== search, then forget");
    for hit in rt.memories().search("user_123", "colour", 5).await? {
        println!("  {:.3}  {}", hit.rank, hit.item.content);
    }
    let report = rt.forget_user("user_123", true).await?;
    println!(
        "  forgot user_123: {} memories, sessions {:?}; search now finds {}",
        report.memories_deleted,
        report.sessions_deleted,
        rt.memories().search("user_123", "colour", 5).await?.len()
    );
    rt.shutdown().await?;
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
