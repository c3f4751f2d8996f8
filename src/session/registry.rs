//! The registry of live sessions: virtual actors, as in Orleans.
//!
//! A session is activated (its actor started and loaded from the store) on
//! first use and passivated after `sessions.idle_secs` without use. The live
//! count is bounded by memory; the persisted count only by disk.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use actix::{Actor, Addr};
use dashmap::DashMap;

use super::actor::SessionActor;
use super::validate_session_id;
use crate::error::Result;
use crate::runtime::Core;
use crate::store::Store;

/// Live session actors by id.
#[derive(Default)]
pub struct Registry {
    live: DashMap<Arc<str>, Addr<SessionActor>>,
    /// Told when a session leaves (a leasing store gives its lease back).
    store: Option<Arc<dyn Store>>,
}

impl Registry {
    /// A registry that tells `store` when a session stops being live here
    /// ([`Store::release`]), so a store that leases sessions to one node at
    /// a time (Redis) frees them for other nodes at once.
    pub(crate) fn with_store(store: Arc<dyn Store>) -> Self {
        Registry {
            live: DashMap::new(),
            store: Some(store),
        }
    }

    fn left(&self, id: &str) {
        if let Some(store) = &self.store {
            store.release(id);
        }
    }

    /// The live actor of `id`, if any.
    pub fn get(&self, id: &str) -> Option<Addr<SessionActor>> {
        self.live.get(id).map(|a| a.clone())
    }

    /// The actor of `id`, started (on the arbiter the id hashes to) if not live.
    pub fn activate(&self, id: &str, core: &Arc<Core>) -> Result<Addr<SessionActor>> {
        if let Some(a) = self.live.get(id) {
            if a.connected() {
                return Ok(a.clone());
            }
        }
        validate_session_id(id)?;
        let key: Arc<str> = Arc::from(id);
        let entry = self.live.entry(key.clone());
        match entry {
            dashmap::Entry::Occupied(e) if e.get().connected() => Ok(e.get().clone()),
            e => {
                let arbiter = arbiter_for(id, core.arbiters.len());
                let core2 = core.clone();
                let addr = SessionActor::start_in_arbiter(&core.arbiters[arbiter], move |_| {
                    SessionActor::new(key, core2, arbiter)
                });
                e.insert_entry(addr.clone());
                Ok(addr)
            }
        }
    }

    /// Drops `addr` from the registry if it is still the one registered.
    pub fn forget(&self, id: &str, addr: &Addr<SessionActor>) {
        if self.live.remove_if(id, |_, a| a == addr).is_some() {
            self.left(id);
        }
    }

    /// Removes `id` if the predicate holds.
    pub(crate) fn remove_if(
        &self,
        id: &str,
        f: impl FnOnce(&Arc<str>, &Addr<SessionActor>) -> bool,
    ) {
        if self.live.remove_if(id, f).is_some() {
            self.left(id);
        }
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// All live actors (for shutdown).
    pub(crate) fn all(&self) -> Vec<Addr<SessionActor>> {
        self.live.iter().map(|e| e.value().clone()).collect()
    }
}

fn arbiter_for(id: &str, n: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
}
