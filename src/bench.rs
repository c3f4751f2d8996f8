//! The built-in benchmark (`troupe bench`): being written.

use clap::Args;

use crate::config::Config;
use crate::error::Result;

/// Options of `troupe bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchOptions {
    /// Sessions driven concurrently (W1).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
}

/// Runs the benchmark from the command line.
pub async fn run_cli(_config: Config, _opts: BenchOptions) -> Result<()> {
    Ok(())
}
