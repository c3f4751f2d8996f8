//! `troupe serve` and `troupe token`.

use clap::{Args, Subcommand};
use troupe::config::ConfigError;
use troupe::server::auth::{issue_token, parse_ttl, TokenKeys};
use troupe::server::{shutdown_timeout_for, Server};
use troupe::{Config, Error, Runtime};

/// `troupe serve`: the daemon.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (default: `[server] bind`, 127.0.0.1:8000).
    #[arg(long)]
    pub bind: Option<String>,
    /// This node's name when several nodes share a Redis store.
    #[arg(long)]
    pub node_id: Option<String>,
}

/// `troupe token`: session tokens for remote clients.
#[derive(Subcommand)]
pub enum TokenCmd {
    /// Print a signed token for one session.
    Issue {
        /// The session the token opens.
        #[arg(long)]
        session: String,
        /// How long it is valid (`30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `troupe serve` until SIGTERM/Ctrl-C: then it stops accepting,
/// finishes the requests in flight, flushes the store and returns.
pub async fn serve(mut config: Config, args: ServeArgs) -> troupe::Result<()> {
    if let Some(bind) = args.bind {
        config.server.bind = bind;
    }
    if let Some(node) = args.node_id {
        config.server.node_id = node;
    }
    let server_config = config.server.clone();
    // Long enough for a turn in flight to finish (all its model retries):
    // a shorter wait would drop the replies of turns that still commit.
    let grace = shutdown_timeout_for(&server_config, &config.model);
    let rt = Runtime::builder().config(config).build().await?;
    let handle = match Server::new(rt.clone(), server_config.clone())
        .shutdown_timeout(grace)
        .bind(&server_config.bind)
        .and_then(Server::run)
    {
        Ok(h) => h,
        Err(e) => {
            let _ = rt.shutdown().await;
            return Err(e);
        }
    };
    eprintln!("troupe: listening on {}", handle.url());
    shutdown_signal().await;
    eprintln!(
        "troupe: shutting down (finishing in-flight requests, waiting up to {} s)",
        grace.as_secs()
    );
    handle.stop().await?;
    eprintln!("troupe: stopped");
    Ok(())
}

/// Runs `troupe token …`.
pub async fn token(config: Config, cmd: TokenCmd) -> troupe::Result<()> {
    match cmd {
        TokenCmd::Issue { session, ttl, json } => {
            let var = config.server.token_keys_env.clone();
            let invalid = |value: String, reason: String| {
                Error::Config(ConfigError::Invalid {
                    key: var.clone(),
                    value,
                    reason,
                })
            };
            let keys = TokenKeys::from_env(&var)
                .map_err(|e| invalid("<hidden>".into(), e.to_string()))?
                .ok_or_else(|| {
                    invalid(
                        String::new(),
                        format!("set ${var} to kid:secret[,kid:secret…] to sign session tokens"),
                    )
                })?;
            let ttl_d = parse_ttl(&ttl).map_err(|reason| {
                Error::Config(ConfigError::Invalid {
                    key: "--ttl".into(),
                    value: ttl.clone(),
                    reason,
                })
            })?;
            let token = issue_token(&keys, &session, ttl_d)?;
            if json {
                let expires_at = chrono::Duration::from_std(ttl_d)
                    .ok()
                    .and_then(|d| chrono::Utc::now().checked_add_signed(d));
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "token": token,
                        "session_id": session,
                        "kid": keys.signing_kid(),
                        "expires_at": expires_at,
                    }))
                    .unwrap_or_default()
                );
            } else {
                println!("{token}");
            }
            Ok(())
        }
    }
}
