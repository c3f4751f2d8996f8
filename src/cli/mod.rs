//! Subcommands of the `troupe` binary that live in their own files
//! (the older ones are still in `main.rs`).

pub mod memory;
pub mod serve;
