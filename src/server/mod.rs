//! The daemon: the runtime over HTTP (`troupe serve`). Not built yet.
