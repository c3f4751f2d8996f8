//! A session served by a daemon, used from another program: `RemoteSession`.
//!
//! Starts the daemon in-process on a free loopback port (what `troupe serve`
//! runs), with an admin API key and session-token signing keys, issues a
//! token for one session (what `troupe token issue --session user_456`
//! prints), then talks to that session over HTTP with `RemoteSession`:
//! chat, a streamed reply, history, preferences, a checkpoint and a restore.
//! The state lives on the server; the client holds only an id and a token.
//! A token for one session cannot touch another (403).
//!
//! Offline, no set-up (echo model, SQLite in a temporary directory):
//!
//! ```text
//! cargo run --example remote
//! ```

use std::time::Duration;

use futures::StreamExt;
use troupe::client::RemoteSession;
use troupe::server::auth::{issue_token, TokenKeys};
use troupe::server::{Auth, Server};
use troupe::{Config, Runtime, StreamEvent};

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

    // `troupe serve` reads these from $TROUPE_API_KEY and $TROUPE_TOKEN_KEYS.
    let keys = TokenKeys::parse("k1:a-long-random-secret")?;
    let server = Server::new(rt.clone(), rt.config().server.clone())
        .auth(Auth::new("admin-key", Some(keys.clone())))
        .bind("127.0.0.1:0")?
        .run()?;
    let url = server.url();
    println!("daemon listening on {url}");

    // The admin creates the session; its user gets a token for it alone.
    let admin = RemoteSession::connect(&url, "user_456")
        .api_key("admin-key")
        .agent("assistant")
        .user("user_456")
        .await?;
    let token = issue_token(&keys, admin.id(), Duration::from_secs(3600))?;
    println!("session token for user_456: {}…", &token[..24]);

    let remote = RemoteSession::connect(&url, "user_456")
        .token(&token)
        .existing()
        .await?;
    let reply = remote.chat("Hello from remote client").await?;
    println!(
        "\n> Hello from remote client\n{}: {}",
        reply.agent, reply.reply
    );

    print!("\n> Tell me more (streamed)\n{}: ", reply.agent);
    let mut stream = Box::pin(remote.chat_stream("Tell me more").await?);
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Delta(text) => print!("{text}"),
            StreamEvent::Done(r) => println!("\n(durable as message {})", r.message_id),
        }
    }

    remote.update_preference("language", "en").await?;
    println!("\npreferences: {:?}", remote.preferences().await?);

    let checkpoint = remote.checkpoint("after greeting").await?;
    remote.chat("A turn we will step back from").await?;
    println!(
        "history before restore: {} messages",
        remote.history().await?.len()
    );
    remote.restore(&checkpoint).await?;
    println!(
        "history after restore:  {} messages",
        remote.history().await?.len()
    );

    // The same token cannot open someone else's session.
    let other = RemoteSession::connect(&url, "someone_else")
        .token(&token)
        .await;
    match other {
        Err(e) => println!("\nanother session with this token: {e}"),
        Ok(_) => anyhow::bail!("a token for user_456 opened another session"),
    }

    server.stop().await?; // stop accepting, finish in-flight turns, flush the store
    Ok(())
}
