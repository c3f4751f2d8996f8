//! `RemoteSession`: a session served by a `troupe serve` daemon. Not built yet.
