//! The built-in benchmark (`troupe bench`). (being written)
