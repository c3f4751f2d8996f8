//! `troupe serve` and `troupe token`.

use clap::{Args, Subcommand};
use troupe::{Config, Error};

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

/// Runs `troupe serve` until SIGTERM/Ctrl-C.
pub async fn serve(_config: Config, _args: ServeArgs) -> troupe::Result<()> {
    Err(Error::InvalidRequest("troupe serve is not built yet".into()))
}

/// Runs `troupe token …`.
pub async fn token(_config: Config, _cmd: TokenCmd) -> troupe::Result<()> {
    Err(Error::InvalidRequest("session tokens are not built yet".into()))
}
