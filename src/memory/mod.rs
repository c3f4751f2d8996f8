//! Memory: the short-term context window and long-term per-user memories. Not built yet.
