//! The Redis backend. Not built yet.
