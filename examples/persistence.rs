//! Persistence: a session outlives its runtime, travels as a file, and a
//! damaged file is refused rather than half-loaded.
//!
//! 1. A runtime on a SQLite file chats in session `alice`, shuts down and is
//!    dropped; a new runtime on the same file finds the history and carries on.
//! 2. `session.save(…)` writes the session to `alice.json` (JSON) and
//!    `alice.bin` (bincode); `Session::load` reads each into another runtime.
//! 3. A file edited by hand and a truncated file are refused with a clear
//!    error; the previous save, kept as `alice.json.bak`, still loads.
//! 4. `Runtime::cleanup` deletes the sessions not updated for a while.
//!
//! Offline, no set-up (echo model); everything goes to a temporary directory
//! that is removed at the end.
//!
//! ```text
//! cargo run --example persistence
//! ```

use std::path::Path;
use std::time::Duration;

use troupe::{Config, Runtime, Session};

/// The configuration of every runtime here: the crate's agents, a SQLite file.
fn config(db: &Path) -> Config {
    let mut c = Config::default();
    c.agents.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/agents").into();
    c.store.path = db.to_path_buf();
    c
}

fn print_history(history: &[troupe::Message]) {
    for m in history {
        println!("  {:<9} {}", m.role.as_str(), m.content);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("troupe.db");

    // 1. A session survives a restart of the runtime.
    println!("== first runtime on {}", db.display());
    {
        let rt = Runtime::builder().config(config(&db)).build().await?;
        let s = rt.session("alice").user("user_123").open().await?;
        let reply = s.chat("My name is Alice").await?;
        println!("  {}", reply.reply);
        s.update_preference("language", "en").await?;
        // Every turn was durable when acknowledged; shutdown just stops cleanly.
        rt.shutdown().await?;
    } // the runtime is dropped here: its threads stop, the file is closed

    println!("\n== second runtime on the same file");
    let rt = Runtime::builder().config(config(&db)).build().await?;
    let alice = rt.session("alice").existing().open().await?;
    print_history(&alice.history().await?);
    let reply = alice.chat("What's my name?").await?;
    println!("  {}", reply.reply);
    println!(
        "  preferences: {}",
        serde_json::Value::Object(alice.preferences().await?)
    );

    // 2. Session files: JSON or bincode (by extension), atomic, checksummed.
    let json = dir.path().join("alice.json");
    let bin = dir.path().join("alice.bin");
    alice.save(&json).await?;
    alice.save(&bin).await?;
    println!("\n== session files");
    for p in [&json, &bin] {
        println!(
            "  {} ({} bytes)",
            p.file_name().unwrap_or_default().to_string_lossy(),
            std::fs::metadata(p)?.len()
        );
    }
    let elsewhere = Runtime::builder()
        .config(config(&db))
        .memory_store()
        .build()
        .await?;
    for p in [&json, &bin] {
        let loaded = Session::load(&elsewhere, p).await?;
        let meta = loaded.metadata().await?;
        println!(
            "  loaded {} from {}: {} messages, {} turns, user {:?}",
            loaded.id(),
            p.file_name().unwrap_or_default().to_string_lossy(),
            loaded.history().await?.len(),
            meta.interactions,
            meta.user_id
        );
    }

    // 3. Damaged files are refused, and nothing of them is loaded.
    alice.chat("Remember that I like tea").await?;
    alice.save(&json).await?; // the previous alice.json becomes alice.json.bak
    let edited = std::fs::read_to_string(&json)?.replace("Alice", "Alina");
    std::fs::write(&json, edited)?;
    let bytes = std::fs::read(&bin)?;
    std::fs::write(&bin, &bytes[..bytes.len() / 2])?;

    println!("\n== damaged files");
    let fresh = Runtime::builder()
        .config(config(&db))
        .memory_store()
        .build()
        .await?;
    for p in [&json, &bin] {
        match Session::load(&fresh, p).await {
            Ok(_) => anyhow::bail!("a damaged file was loaded: {}", p.display()),
            Err(e) => println!("  refused: {e}"),
        }
    }
    let half_loaded = fresh.session("alice").existing().open().await.is_ok();
    println!("  anything half-loaded? {half_loaded}");
    let backup = dir.path().join("alice.json.bak");
    let restored = Session::load(&fresh, &backup).await?;
    println!(
        "  alice.json.bak loads: {} messages",
        restored.history().await?.len()
    );

    // 4. Cleanup of sessions not updated for a while (here: half a second).
    println!("\n== cleanup");
    rt.session("stale").open().await?.chat("hello?").await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    alice.chat("Still here").await?;
    let deleted = rt.cleanup(Duration::from_millis(500)).await?;
    println!("  deleted: {deleted:?}");
    let left: Vec<String> = rt
        .list_sessions(&Default::default())
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    println!("  left:    {left:?}");

    for r in [rt, elsewhere, fresh] {
        r.shutdown().await?;
    }
    Ok(()) // `dir` is dropped last: the temporary directory is removed
}
