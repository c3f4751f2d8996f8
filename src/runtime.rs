//! The runtime: the actix system, the store, the agents and the registry.
//!
//! actix actors need an actix `System` and its arbiters (each a thread with a
//! single-threaded tokio runtime). The runtime starts its own — one arbiter
//! per core by default — so its handles work from any tokio program,
//! including a plain `#[tokio::main]`. Dropping the last handle of a runtime
//! stops its threads; [`Runtime::shutdown`] does it explicitly after
//! releasing every live session and flushing the store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, ArbiterHandle};
use dashmap::DashMap;

use crate::agent::{Agent, AgentActor, AgentError, AgentMetrics, AgentSpec};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{self, ChatModel};
use crate::session::registry::Registry;
use crate::session::{actor, SessionBuilder};
use crate::store::{self, SessionFilter, SessionSummary, Store};

/// An agent bound to a runtime: its spec, its model, and its actors (one per arbiter).
pub struct AgentBinding {
    /// The definition.
    pub spec: Arc<AgentSpec>,
    /// The model.
    pub model: Arc<dyn ChatModel>,
    /// Counters.
    pub metrics: Arc<AgentMetrics>,
    pub(crate) temperature: Option<f32>,
    pub(crate) max_tokens: Option<u32>,
    /// The agent's long-term memory policy, if it has its own.
    pub(crate) memory: Option<crate::memory::Memory>,
    addrs: Vec<Addr<AgentActor>>,
}

impl AgentBinding {
    /// The actor on arbiter `i` (sessions use the one on their own thread).
    pub(crate) fn addr(&self, i: usize) -> Addr<AgentActor> {
        self.addrs[i % self.addrs.len()].clone()
    }
}

/// What every actor of a runtime shares.
pub struct Core {
    pub(crate) config: Config,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Registry,
    pub(crate) arbiters: Vec<ArbiterHandle>,
    pub(crate) idle: Duration,
    default_model: Arc<dyn ChatModel>,
    catalog: DashMap<String, AgentSpec>,
    bound: DashMap<String, Arc<AgentBinding>>,
    shared: DashMap<String, actix::Addr<crate::state::SharedStateActor>>,
    /// The long-term memory policy of agents without their own.
    pub(crate) memory: crate::memory::Memory,
}

impl Core {
    /// Binds an agent handle (re-using its binding if this exact agent is bound).
    pub(crate) fn bind(&self, agent: &Agent) -> Result<Arc<AgentBinding>> {
        if let Some(b) = self.bound.get(agent.name()) {
            let same_model = match (&agent.model, &b.model) {
                (Some(a), b) => Arc::ptr_eq(a, b),
                (None, _) => true,
            };
            let same_memory = match (&agent.memory, &b.memory) {
                (Some(a), Some(b)) => a.ptr_eq(b),
                (None, None) => true,
                _ => false,
            };
            if (Arc::ptr_eq(&b.spec, &agent.spec) || *b.spec == *agent.spec)
                && same_model
                && same_memory
            {
                return Ok(b.clone());
            }
        }
        let model: Arc<dyn ChatModel> = match &agent.model {
            Some(m) => m.clone(),
            None if !agent.spec.model.needs_own_client() => self.default_model.clone(),
            None => model::from_config(&agent.spec.model.apply(&self.config.model))?,
        };
        let resolved = agent.spec.model.apply(&self.config.model);
        let metrics = Arc::new(AgentMetrics::default());
        let addrs = self
            .arbiters
            .iter()
            .map(|arb| {
                let (m, me) = (model.clone(), metrics.clone());
                AgentActor::start_in_arbiter(arb, move |_| AgentActor::new(m, me))
            })
            .collect();
        let binding = Arc::new(AgentBinding {
            spec: agent.spec.clone(),
            model,
            metrics,
            temperature: resolved.temperature,
            max_tokens: resolved.max_tokens,
            memory: agent.memory.clone(),
            addrs,
        });
        self.bound.insert(agent.name().to_string(), binding.clone());
        Ok(binding)
    }

    /// The binding of a named agent: one already bound, else one from the catalog.
    pub(crate) fn binding_by_name(&self, name: &str) -> Result<Arc<AgentBinding>> {
        if let Some(b) = self.bound.get(name) {
            return Ok(b.clone());
        }
        let spec = self.catalog.get(name).map(|s| s.clone()).ok_or_else(|| {
            let mut known: Vec<String> = self.catalog.iter().map(|e| e.key().clone()).collect();
            known.sort();
            AgentError::Unknown {
                name: name.to_string(),
                known: known.join(", "),
            }
        })?;
        self.bind(&Agent::from_spec(spec))
    }
    /// See [`Runtime::delete_session`].
    pub(crate) async fn delete_session(
        &self,
        id: &str,
        updated_before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<bool> {
        crate::session::validate_session_id(id)?;
        if let Some(addr) = self.registry.get(id) {
            let _ = addr.send(actor::Passivate).await;
            self.registry.forget(id, &addr);
        }
        Ok(self.store.delete_session(id, updated_before).await?)
    }

    /// See [`Runtime::cleanup`].
    pub(crate) async fn cleanup(&self, older_than: Duration) -> Result<Vec<String>> {
        let cutoff = cutoff(older_than)?;
        let old = self
            .store
            .list_sessions(&SessionFilter {
                updated_before: Some(cutoff),
                ..Default::default()
            })
            .await?;
        let mut deleted = Vec::new();
        for s in old {
            // Re-checked atomically by the store: a turn acknowledged since
            // the listing keeps the session.
            if self.delete_session(&s.id, Some(cutoff)).await? {
                deleted.push(s.id);
            }
        }
        Ok(deleted)
    }
}

/// Now minus `age`, or a clear error if that is before the calendar's start.
pub fn cutoff(age: Duration) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .ok_or_else(|| Error::InvalidRequest(format!("age {age:?} is too large")))
}

struct Inner {
    core: Arc<Core>,
    system: actix::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for a in &self.core.arbiters {
            a.stop();
        }
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A troupe runtime. Cheap to clone; `Send + Sync`; usable from any tokio program.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("store", &self.inner.core.store.name())
            .field("arbiters", &self.inner.core.arbiters.len())
            .finish()
    }
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    model: Option<Arc<dyn ChatModel>>,
    agents: Vec<AgentSpec>,
    memory: Option<crate::memory::Memory>,
}

impl RuntimeBuilder {
    /// The long-term memory policy (scorer, thresholds) of agents that have
    /// none of their own, and of [`Runtime::memories`]. Default: `[memory]`.
    pub fn memory(mut self, memory: crate::memory::Memory) -> Self {
        self.memory = Some(memory);
        self
    }

    /// Uses this configuration (default: built-in defaults).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Uses this store instead of the configured one.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Keeps everything in memory (nothing survives the process).
    pub fn memory_store(self) -> Self {
        self.store(Arc::new(store::MemoryStore::new()))
    }

    /// Uses a SQLite file at `path`.
    pub fn sqlite(mut self, path: impl AsRef<Path>) -> Self {
        self.config.store.backend = crate::config::StoreBackend::Sqlite;
        self.config.store.path = path.as_ref().to_path_buf();
        self
    }

    /// Answers with this model unless an agent has its own.
    pub fn model(mut self, model: Arc<dyn ChatModel>) -> Self {
        self.model = Some(model);
        self
    }

    /// Adds an agent definition to the catalog.
    pub fn agent_spec(mut self, spec: AgentSpec) -> Self {
        self.agents.push(spec);
        self
    }

    /// Starts the runtime: opens the store, reads the agents, starts the actors' threads.
    pub async fn build(self) -> Result<Runtime> {
        let RuntimeBuilder {
            config,
            store,
            model,
            agents,
            memory,
        } = self;
        config.validate()?;
        // Opening SQLite (and migrating) blocks: keep it off async threads.
        let store = match store {
            Some(s) => s,
            None => {
                let c = config.clone();
                tokio::task::spawn_blocking(move || store::open(&c))
                    .await
                    .map_err(|e| Error::Runtime(format!("store open failed: {e}")))??
            }
        };
        let default_model = match model {
            Some(m) => m,
            None => model::from_config(&config.model)?,
        };
        let catalog = DashMap::new();
        for spec in AgentSpec::load_dir(&config.agents.dir)? {
            catalog.insert(spec.name.clone(), spec);
        }
        for spec in agents {
            catalog.insert(spec.name.clone(), spec);
        }
        if !catalog.contains_key("assistant") {
            catalog.insert("assistant".into(), AgentSpec::default_assistant());
        }
        let n = match config.sessions.arbiters {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let (system, arbiters, thread) = start_system(n)?;
        let idle = Duration::from_secs_f64(config.sessions.idle_secs);
        let core = Arc::new(Core {
            config,
            registry: Registry::with_store(store.clone()),
            store,
            arbiters,
            idle,
            default_model,
            catalog,
            bound: DashMap::new(),
            shared: DashMap::new(),
            memory: memory.unwrap_or_default(),
        });
        let rt = Runtime {
            inner: Arc::new(Inner {
                core,
                system,
                thread: Some(thread),
            }),
        };
        rt.start_ttl_sweeper();
        rt.start_handoff_listener();
        Ok(rt)
    }
}

type Started = (
    actix::System,
    Vec<ArbiterHandle>,
    std::thread::JoinHandle<()>,
);

fn start_system(n: usize) -> Result<Started> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("troupe-actix".into())
        .spawn(move || {
            let sys = actix::System::new();
            let arbiters: Vec<actix::Arbiter> =
                sys.block_on(async { (0..n).map(|_| actix::Arbiter::new()).collect() });
            let handles: Vec<ArbiterHandle> = arbiters.iter().map(|a| a.handle()).collect();
            let _ = tx.send((actix::System::current(), handles));
            let _ = sys.run();
            drop(arbiters);
        })
        .map_err(|e| Error::Runtime(format!("cannot start the actor system thread: {e}")))?;
    let (system, handles) = rx
        .recv()
        .map_err(|_| Error::Runtime("the actor system failed to start".into()))?;
    Ok((system, handles, thread))
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            config: Config::default(),
            store: None,
            model: None,
            agents: Vec::new(),
            memory: None,
        }
    }

    /// A runtime from a config file (plus environment overrides).
    pub async fn from_config(path: impl AsRef<Path>) -> Result<Runtime> {
        let mut config = Config::from_file(path)?;
        config.apply_env()?;
        Runtime::builder().config(config).build().await
    }

    pub(crate) fn core(&self) -> Arc<Core> {
        self.inner.core.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.core.config
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.core.store.clone()
    }

    /// Opens a session by id (created if new): `rt.session("id").agent(a).open()`.
    pub fn session(&self, id: impl Into<String>) -> SessionBuilder {
        SessionBuilder::new(self.clone(), Some(id.into()))
    }

    /// Opens a new session with a fresh uuid v4 id.
    pub fn new_session(&self) -> SessionBuilder {
        SessionBuilder::new(self.clone(), None)
    }

    /// The shared state of a namespace (its actor started on first use).
    pub fn shared_state(&self, namespace: impl Into<String>) -> crate::state::SharedState {
        let ns: String = namespace.into();
        let core = &self.inner.core;
        let addr = core
            .shared
            .entry(ns.clone())
            .or_insert_with(|| {
                let n = core.arbiters.len().max(1);
                let i = ns
                    .bytes()
                    .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
                    % n;
                let (name, store) = (Arc::<str>::from(ns.as_str()), core.store.clone());
                crate::state::SharedStateActor::start_in_arbiter(&core.arbiters[i], move |_| {
                    crate::state::SharedStateActor::new(name, store)
                })
            })
            .clone();
        crate::state::SharedState::new(Arc::from(ns.as_str()), addr, core.store.clone())
    }

    /// A named agent from the catalog (`agents/NAME.toml`).
    pub fn agent(&self, name: &str) -> Result<Agent> {
        let core = &self.inner.core;
        if let Some(b) = core.bound.get(name) {
            return Ok(Agent {
                spec: b.spec.clone(),
                model: None,
                memory: None,
            });
        }
        core.catalog
            .get(name)
            .map(|s| Agent::from_spec(s.clone()))
            .ok_or_else(|| {
                let mut known: Vec<String> = core.catalog.iter().map(|e| e.key().clone()).collect();
                known.sort();
                AgentError::Unknown {
                    name: name.into(),
                    known: known.join(", "),
                }
                .into()
            })
    }

    /// Every agent definition in the catalog, by name.
    pub fn agents(&self) -> Vec<AgentSpec> {
        let mut v: Vec<AgentSpec> = self
            .inner
            .core
            .catalog
            .iter()
            .map(|e| e.value().clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Sessions in the store.
    pub async fn list_sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionSummary>> {
        Ok(self.inner.core.store.list_sessions(filter).await?)
    }

    /// Deletes a session (its live actor first). Returns whether it existed.
    pub async fn delete_session(&self, id: &str) -> Result<bool> {
        self.inner.core.delete_session(id, None).await
    }

    /// Deletes every session not updated for `older_than`. Returns their ids.
    pub async fn cleanup(&self, older_than: Duration) -> Result<Vec<String>> {
        self.inner.core.cleanup(older_than).await
    }

    /// How many sessions are live (have an actor) right now.
    pub fn live_sessions(&self) -> usize {
        self.inner.core.registry.len()
    }

    /// Releases every live session and flushes the store. Every acknowledged
    /// turn was already durable; this makes the stop clean.
    pub async fn shutdown(&self) -> Result<()> {
        let core = &self.inner.core;
        for addr in core.registry.all() {
            let _ = addr.send(actor::Passivate).await;
        }
        core.store.flush().await?;
        Ok(())
    }

    /// Another node asks for a session live here (a leasing store, Redis):
    /// its actor passivates after the turn in hand, which releases the lease
    /// (see [`Registry::with_store`]); with no live actor the lease is
    /// released at once.
    fn start_handoff_listener(&self) {
        let Some(mut requests) = self.inner.core.store.handoff_requests() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner.core);
        self.inner.core.arbiters[0].spawn(async move {
            while let Some(id) = requests.recv().await {
                let Some(core) = weak.upgrade() else { return };
                match core.registry.get(&id) {
                    Some(addr) => {
                        actix::spawn(async move {
                            if addr.send(actor::Passivate).await.is_err() {
                                core.registry.forget(&id, &addr);
                                core.store.release(&id);
                            }
                        });
                    }
                    None => core.store.release(&id),
                }
            }
        });
    }

    fn start_ttl_sweeper(&self) {
        let ttl = self.inner.core.config.sessions.ttl_secs;
        if ttl == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.inner.core);
        let every = Duration::from_secs(ttl.clamp(1, 60));
        self.inner.core.arbiters[0].spawn(async move {
            loop {
                actix::clock::sleep(every).await;
                let Some(core) = weak.upgrade() else { return };
                match core.cleanup(Duration::from_secs(ttl)).await {
                    Ok(ids) if !ids.is_empty() => {
                        tracing::info!(
                            count = ids.len(),
                            "expired sessions deleted (sessions.ttl_secs)"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "session expiry sweep failed"),
                }
            }
        });
    }
}
