//! `troupe memory …` and `troupe sessions analytics`.

use clap::Subcommand;
use troupe::{Error, Runtime};

/// `troupe memory`: a user's long-term memories.
#[derive(Subcommand)]
pub enum MemoryCmd {
    /// List a user's memories.
    List {
        /// The user.
        #[arg(long)]
        user: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `troupe memory …`.
pub async fn run(_rt: &Runtime, _cmd: MemoryCmd) -> troupe::Result<()> {
    Err(Error::InvalidRequest("long-term memory is not built yet".into()))
}

/// Runs `troupe sessions analytics SESSION`.
pub async fn analytics(_rt: &Runtime, _session: String, _json: bool) -> troupe::Result<()> {
    Err(Error::InvalidRequest("session analytics are not built yet".into()))
}
