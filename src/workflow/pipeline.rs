//! The pipeline file: its shape, its validation, and the order its tasks run in.
//!
//! Everything here is pure: no actors, no model, no store. That keeps the
//! rules a run obeys (what "valid" means, which task may start when) in one
//! place where they can be unit- and property-tested, and lets `troupe
//! pipeline check` and `troupe pipeline graph` work without a runtime.
//!
//! The shape, in TOML (JSON takes the same keys; `tasks` is accepted as an
//! alias of `task`):
//!
//! ```toml
//! name = "article"
//! [inputs]
//! topic = { required = true, description = "What to write about" }
//! review = { default = "yes" }
//! [[task]]
//! id = "research"
//! agent = "researcher"
//! prompt = "Research {{ inputs.topic }} thoroughly."
//! [[task]]
//! id = "write"
//! agent = "writer"
//! depends_on = ["research"]       # default []
//! retries = 2                     # default 0
//! timeout_secs = 120              # default: none
//! when = "{{ inputs.review }} != 'no'"
//! output_to_state = "article.final"
//! context = ["research"]          # default: every dependency
//! prompt = "Write the article from {{ tasks.research.output }}"
//! ```
//!
//! Unknown keys anywhere are errors that name the key.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::template::{is_valid_name, Condition, Context, Template, Var};
use super::{TemplateField, WorkflowError};

/// One declared input of a pipeline (`[inputs]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The run fails before it starts if this input is not given. Default false.
    #[serde(default)]
    pub required: bool,
    /// The value when the input is not given. An optional input without a
    /// default is the empty string, which is falsy in a `when`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// What the input is for, for `troupe pipeline check` and help output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One task (`[[task]]` table): an agent, a prompt, and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Unique within the pipeline; letters, digits, `_` and `-`, so templates
    /// can refer to it as `{{ tasks.ID.output }}`.
    pub id: String,
    /// The agent (`agents/*.toml` name) that performs the task.
    pub agent: String,
    /// The prompt template (see [`Template`]).
    pub prompt: String,
    /// Tasks that must finish before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// How many times to retry after a failure (with backoff), so `retries =
    /// 2` means up to three attempts.
    #[serde(default)]
    pub retries: u32,
    /// Per-attempt time limit in seconds; none means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run the task only if this [`Condition`] holds; otherwise it is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// SharedState key the task's output is written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_to_state: Option<String>,
    /// Which direct dependencies' outputs are passed to the agent; none means
    /// all of `depends_on`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<String>>,
}

impl Task {
    /// The dependencies whose outputs are passed to the agent: `context` if
    /// given, else every dependency.
    pub fn context_ids(&self) -> &[String] {
        self.context.as_deref().unwrap_or(&self.depends_on)
    }

    /// `timeout_secs` as a duration.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_secs.map(Duration::from_secs)
    }
}

/// A parsed pipeline file. Parse with [`Pipeline::parse`] or
/// [`Pipeline::load`], then [`validate`](Pipeline::validate) before running
/// it: the ordering and scheduling methods assume a valid pipeline and only
/// guard against cycles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Where the pipeline came from (the path or name given when parsing);
    /// every error message starts with it.
    #[serde(skip)]
    pub file: String,
    /// The pipeline's name (runs are listed under it).
    pub name: String,
    /// Declared inputs, by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, InputSpec>,
    /// The tasks, in file order (which breaks ties in [`Pipeline::order`]).
    #[serde(rename = "task", alias = "tasks", default)]
    pub tasks: Vec<Task>,
}

/// What to do with a task, from [`Pipeline::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Send `prompt` to the task's agent, with the `context` outputs.
    Run {
        /// The rendered prompt.
        prompt: String,
        /// `(dependency id, output)` for each context dependency whose output
        /// the prompt does not already include, in `context` order.
        context: Vec<(String, String)>,
    },
    /// The `when` condition is false: skip the task.
    Skip {
        /// The condition, as written.
        condition: String,
    },
}

impl Pipeline {
    /// Parses a pipeline from text. `file` names it in errors and picks the
    /// format: `.json` → JSON, `.toml` → TOML, anything else → JSON if the
    /// text starts with `{`, else TOML. Only the syntax and shape are checked
    /// here; call [`validate`](Pipeline::validate) next.
    pub fn parse(file: impl Into<String>, text: &str) -> Result<Self, WorkflowError> {
        let file = file.into();
        let extension = Path::new(&file)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let json = match extension.as_deref() {
            Some("json") => true,
            Some("toml") => false,
            _ => text.trim_start().starts_with('{'),
        };
        let parsed = if json {
            serde_json::from_str::<Pipeline>(text).map_err(|e| e.to_string())
        } else {
            toml::from_str::<Pipeline>(text).map_err(|e| e.to_string())
        };
        match parsed {
            Ok(mut pipeline) => {
                pipeline.file = file;
                Ok(pipeline)
            }
            Err(message) => Err(WorkflowError::Parse {
                file,
                message: message.trim_end().to_string(),
            }),
        }
    }

    /// Reads and parses a pipeline file; errors name it as `path` was given.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, WorkflowError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WorkflowError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// [`load`](Pipeline::load) then [`validate`](Pipeline::validate): what
    /// `troupe pipeline check` does.
    pub fn load_checked(path: impl AsRef<Path>, agents: &[String]) -> Result<Self, WorkflowError> {
        let pipeline = Self::load(path)?;
        pipeline.validate(agents)?;
        Ok(pipeline)
    }

    /// The task with this id.
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }

    /// Checks everything that can be checked before a run: names, duplicate
    /// ids, dependencies (unknown, self, cycles), agents (against `agents`,
    /// the names of the defined agents), templates (syntax, declared inputs,
    /// upstream tasks only), `context`, and field values.
    ///
    /// All problems are collected; one comes back as itself, several as
    /// [`WorkflowError::Invalid`].
    pub fn validate(&self, agents: &[String]) -> Result<(), WorkflowError> {
        WorkflowError::from_problems(&self.file, self.problems(agents))
    }

    /// Every problem [`validate`](Pipeline::validate) would report, in file
    /// order (inputs, then tasks, then cycles). Empty means valid.
    pub fn problems(&self, agents: &[String]) -> Vec<WorkflowError> {
        let file = || self.file.clone();
        let mut out = Vec::new();
        if self.name.trim().is_empty() {
            out.push(WorkflowError::Empty {
                file: file(),
                what: "it has no name (name = \"...\")".into(),
            });
        }
        if self.tasks.is_empty() {
            out.push(WorkflowError::Empty {
                file: file(),
                what: "it has no tasks (add [[task]] tables)".into(),
            });
        }
        for (name, spec) in &self.inputs {
            if !is_valid_name(name) {
                out.push(WorkflowError::InvalidName {
                    file: file(),
                    kind: "input",
                    name: name.clone(),
                });
            }
            if let (true, Some(default)) = (spec.required, &spec.default) {
                out.push(WorkflowError::RequiredWithDefault {
                    file: file(),
                    input: name.clone(),
                    default: default.clone(),
                });
            }
        }
        let graph = Graph::new(self);
        let mut known_agents: Vec<String> = agents.to_vec();
        known_agents.sort();
        known_agents.dedup();
        let mut seen_ids = HashSet::new();
        for (i, task) in self.tasks.iter().enumerate() {
            let id = &task.id;
            if !is_valid_name(id) {
                out.push(WorkflowError::InvalidName {
                    file: file(),
                    kind: "task",
                    name: id.clone(),
                });
            }
            if !seen_ids.insert(id.as_str()) {
                out.push(WorkflowError::DuplicateTask {
                    file: file(),
                    task: id.clone(),
                });
            }
            if !agents.contains(&task.agent) {
                out.push(WorkflowError::UnknownAgent {
                    file: file(),
                    task: id.clone(),
                    agent: task.agent.clone(),
                    known: known_agents.clone(),
                });
            }
            let mut seen_deps = HashSet::new();
            for dep in &task.depends_on {
                if dep == id {
                    out.push(WorkflowError::SelfDependency {
                        file: file(),
                        task: id.clone(),
                    });
                } else if !graph.index.contains_key(dep.as_str()) {
                    out.push(WorkflowError::UnknownDependency {
                        file: file(),
                        task: id.clone(),
                        dependency: dep.clone(),
                    });
                }
                if !seen_deps.insert(dep.as_str()) {
                    out.push(WorkflowError::DuplicateDependency {
                        file: file(),
                        task: id.clone(),
                        dependency: dep.clone(),
                    });
                }
            }
            match Template::parse(&task.prompt) {
                Ok(t) => self.check_vars(&graph, i, TemplateField::Prompt, t.vars(), &mut out),
                Err(source) => out.push(WorkflowError::Template {
                    file: file(),
                    task: id.clone(),
                    field: TemplateField::Prompt,
                    source,
                }),
            }
            if let Some(when) = &task.when {
                match Condition::parse(when) {
                    Ok(c) => self.check_vars(&graph, i, TemplateField::When, c.vars(), &mut out),
                    Err(source) => out.push(WorkflowError::Template {
                        file: file(),
                        task: id.clone(),
                        field: TemplateField::When,
                        source,
                    }),
                }
            }
            for c in task.context.iter().flatten() {
                if !task.depends_on.contains(c) {
                    out.push(WorkflowError::ContextNotDependency {
                        file: file(),
                        task: id.clone(),
                        context: c.clone(),
                    });
                }
            }
            if task.timeout_secs == Some(0) {
                out.push(WorkflowError::BadValue {
                    file: file(),
                    task: id.clone(),
                    field: "timeout_secs",
                    value: "0".into(),
                    reason: "a task needs some time; leave it out for no limit",
                });
            }
            if let Some(key) = &task.output_to_state {
                if key.trim().is_empty() {
                    out.push(WorkflowError::BadValue {
                        file: file(),
                        task: id.clone(),
                        field: "output_to_state",
                        value: format!("{key:?}"),
                        reason: "the state key must not be empty",
                    });
                }
            }
        }
        for cycle in graph.cycles() {
            out.push(WorkflowError::Cycle {
                file: file(),
                cycle: cycle.iter().map(|&i| self.tasks[i].id.clone()).collect(),
            });
        }
        out
    }

    /// Checks the variables of one template of task `i`.
    fn check_vars<'v>(
        &self,
        graph: &Graph<'_>,
        i: usize,
        field: TemplateField,
        vars: impl Iterator<Item = &'v Var>,
        out: &mut Vec<WorkflowError>,
    ) {
        let task = &self.tasks[i].id;
        let mut seen = HashSet::new();
        for var in vars {
            if !seen.insert(var) {
                continue;
            }
            match var {
                Var::Input(name) if !self.inputs.contains_key(name) => {
                    out.push(WorkflowError::UnknownInputRef {
                        file: self.file.clone(),
                        task: task.clone(),
                        field,
                        input: name.clone(),
                    })
                }
                Var::Input(_) => {}
                Var::TaskOutput(t) => match graph.index.get(t.as_str()) {
                    None => out.push(WorkflowError::UnknownTaskRef {
                        file: self.file.clone(),
                        task: task.clone(),
                        field,
                        referenced: t.clone(),
                    }),
                    Some(&target) if target == i || !graph.is_upstream(target, i) => {
                        out.push(WorkflowError::NotUpstream {
                            file: self.file.clone(),
                            task: task.clone(),
                            field,
                            referenced: t.clone(),
                        })
                    }
                    Some(_) => {}
                },
            }
        }
    }

    /// The task ids in an order that runs every task after its dependencies:
    /// Kahn's algorithm, ties broken by file order, so the order is
    /// deterministic. Fails only on a cycle (naming it); unknown dependencies
    /// and self-dependencies are ignored here — [`validate`](Pipeline::validate)
    /// reports them.
    pub fn order(&self) -> Result<Vec<&str>, WorkflowError> {
        let graph = Graph::new(self);
        graph
            .order()
            .map(|order| {
                order
                    .into_iter()
                    .map(|i| self.tasks[i].id.as_str())
                    .collect()
            })
            .map_err(|cycle| self.cycle_error(cycle))
    }

    /// The tasks grouped by depth: level 0 has no dependencies, level *n*
    /// tasks depend on something in level *n − 1* and nothing deeper. Tasks
    /// of one level can run in parallel. Each level is in file order.
    pub fn levels(&self) -> Result<Vec<Vec<&str>>, WorkflowError> {
        let graph = Graph::new(self);
        let order = graph.order().map_err(|cycle| self.cycle_error(cycle))?;
        let mut level = vec![0usize; self.tasks.len()];
        for &i in &order {
            level[i] = graph.deps[i]
                .iter()
                .map(|&d| level[d] + 1)
                .max()
                .unwrap_or(0);
        }
        let depth = level.iter().max().map_or(0, |m| m + 1);
        let mut levels = vec![Vec::new(); depth];
        for (i, task) in self.tasks.iter().enumerate() {
            levels[level[i]].push(task.id.as_str());
        }
        Ok(levels)
    }

    fn cycle_error(&self, cycle: Vec<usize>) -> WorkflowError {
        WorkflowError::Cycle {
            file: self.file.clone(),
            cycle: cycle.iter().map(|&i| self.tasks[i].id.clone()).collect(),
        }
    }

    /// The tasks that may start now: not done, not running, every dependency
    /// done; in file order. A simple scheduler calls this after each task
    /// ends. It costs a pass over all tasks; for large pipelines use
    /// [`Schedule`], which is incremental. A skipped task (false `when`)
    /// should count as done, a failed one not, so its dependents never start.
    pub fn ready(&self, done: &HashSet<String>, running: &HashSet<String>) -> Vec<&Task> {
        self.tasks
            .iter()
            .filter(|t| !done.contains(&t.id) && !running.contains(&t.id))
            .filter(|t| t.depends_on.iter().all(|d| done.contains(d)))
            .collect()
    }

    /// An incremental scheduler over this pipeline (fails on a cycle).
    pub fn schedule(&self) -> Result<Schedule<'_>, WorkflowError> {
        Schedule::new(self)
    }

    /// The values of every declared input for a run: `given` values, else
    /// defaults, else `""` for optional inputs. Fails (collecting all
    /// problems) on a missing required input or an input the pipeline does
    /// not declare.
    pub fn resolve_inputs(
        &self,
        given: &HashMap<String, String>,
    ) -> Result<HashMap<String, String>, WorkflowError> {
        let mut problems = Vec::new();
        let mut unknown: Vec<&String> = given
            .keys()
            .filter(|k| !self.inputs.contains_key(*k))
            .collect();
        unknown.sort();
        for input in unknown {
            problems.push(WorkflowError::UnknownInput {
                file: self.file.clone(),
                input: input.clone(),
                declared: self.inputs.keys().cloned().collect(),
            });
        }
        let mut resolved = HashMap::new();
        for (name, spec) in &self.inputs {
            let value = match (given.get(name), &spec.default) {
                (Some(v), _) => v.clone(),
                (None, _) if spec.required => {
                    problems.push(WorkflowError::MissingInput {
                        file: self.file.clone(),
                        input: name.clone(),
                    });
                    continue;
                }
                (None, Some(d)) => d.clone(),
                (None, None) => String::new(),
            };
            resolved.insert(name.clone(), value);
        }
        WorkflowError::from_problems(&self.file, problems)?;
        Ok(resolved)
    }

    /// Decides what to do with task `id` once its dependencies are done:
    /// evaluate its `when` and render its prompt with the resolved `inputs`
    /// and the `outputs` of finished tasks. A skipped upstream task should be
    /// recorded with an empty output; a referenced output that is missing is
    /// an error ([`WorkflowError::Render`]), never a silent hole.
    pub fn prepare(
        &self,
        id: &str,
        inputs: &HashMap<String, String>,
        outputs: &HashMap<String, String>,
    ) -> Result<Prepared, WorkflowError> {
        let task = self.task(id).ok_or_else(|| WorkflowError::BadTask {
            file: self.file.clone(),
            task: id.to_string(),
            reason: "no task",
        })?;
        self.prepare_task(task, inputs, outputs)
    }

    /// [`prepare`](Self::prepare) for a task the caller already holds (from
    /// a [`Schedule`]): no lookup by id, so a run stays linear in its size.
    pub fn prepare_task(
        &self,
        task: &Task,
        inputs: &HashMap<String, String>,
        outputs: &HashMap<String, String>,
    ) -> Result<Prepared, WorkflowError> {
        let id = task.id.as_str();
        let ctx = Context { inputs, outputs };
        let err = |field, source| WorkflowError::Template {
            file: self.file.clone(),
            task: id.to_string(),
            field,
            source,
        };
        let render_err = |field, source| WorkflowError::Render {
            file: self.file.clone(),
            task: id.to_string(),
            field,
            source,
        };
        if let Some(when) = &task.when {
            let condition = Condition::parse(when).map_err(|e| err(TemplateField::When, e))?;
            if !condition
                .eval(&ctx)
                .map_err(|e| render_err(TemplateField::When, e))?
            {
                return Ok(Prepared::Skip {
                    condition: when.clone(),
                });
            }
        }
        let template = Template::parse(&task.prompt).map_err(|e| err(TemplateField::Prompt, e))?;
        let prompt = template
            .render(&ctx)
            .map_err(|e| render_err(TemplateField::Prompt, e))?;
        let mut context = Vec::new();
        for dep in task.context_ids() {
            if template.uses_output_of(dep) {
                continue;
            }
            let output = outputs.get(dep).ok_or_else(|| {
                render_err(
                    TemplateField::Prompt,
                    super::TemplateError::MissingOutput { task: dep.clone() },
                )
            })?;
            context.push((dep.clone(), output.clone()));
        }
        Ok(Prepared::Run { prompt, context })
    }
}

/// The dependency graph by task index: `deps[i]` are the tasks `i` waits for
/// (known, not itself), `dependents[i]` those waiting for `i`. Duplicate ids
/// resolve to the first task with the id.
struct Graph<'p> {
    index: HashMap<&'p str, usize>,
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
}

impl<'p> Graph<'p> {
    fn new(pipeline: &'p Pipeline) -> Self {
        let n = pipeline.tasks.len();
        let mut index = HashMap::with_capacity(n);
        for (i, t) in pipeline.tasks.iter().enumerate() {
            index.entry(t.id.as_str()).or_insert(i);
        }
        let mut deps = vec![Vec::new(); n];
        let mut dependents = vec![Vec::new(); n];
        for (i, t) in pipeline.tasks.iter().enumerate() {
            let mut seen = HashSet::new();
            for d in &t.depends_on {
                if let Some(&j) = index.get(d.as_str()) {
                    if j != i && seen.insert(j) {
                        deps[i].push(j);
                        dependents[j].push(i);
                    }
                }
            }
        }
        Graph {
            index,
            deps,
            dependents,
        }
    }

    /// Whether `target` is a transitive dependency of `from`.
    fn is_upstream(&self, target: usize, from: usize) -> bool {
        if self.deps[from].contains(&target) {
            return true; // the common case, without the search
        }
        let mut seen = vec![false; self.deps.len()];
        let mut queue: VecDeque<usize> = self.deps[from].iter().copied().collect();
        while let Some(i) = queue.pop_front() {
            if i == target {
                return true;
            }
            if !std::mem::replace(&mut seen[i], true) {
                queue.extend(self.deps[i].iter().copied());
            }
        }
        false
    }

    /// Kahn's algorithm, smallest index first among the ready; `Err` with a
    /// cycle if some tasks can never run.
    fn order(&self) -> Result<Vec<usize>, Vec<usize>> {
        let n = self.deps.len();
        let mut waiting: Vec<usize> = self.deps.iter().map(Vec::len).collect();
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &d in &self.dependents[i] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        Err(self.cycles().into_iter().next().unwrap_or_else(|| {
            // Unreachable when Kahn's stalls, but never panic on input.
            (0..n).filter(|&i| waiting[i] > 0).collect()
        }))
    }

    /// Disjoint dependency cycles, each in running order with its first task
    /// repeated last. Depth-first search along dependents from each task in
    /// file order; iterative, so a 10,000-task chain cannot overflow the stack.
    fn cycles(&self) -> Vec<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Colour {
            White,
            Grey,
            Black,
        }
        let n = self.deps.len();
        let mut colour = vec![Colour::White; n];
        let mut in_reported = vec![false; n];
        let mut cycles = Vec::new();
        for root in 0..n {
            if colour[root] != Colour::White {
                continue;
            }
            // (node, index of the next dependent to visit); `path` mirrors it.
            let mut stack = vec![(root, 0usize)];
            colour[root] = Colour::Grey;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if let Some(&child) = self.dependents[node].get(*next) {
                    *next += 1;
                    match colour[child] {
                        Colour::White => {
                            colour[child] = Colour::Grey;
                            stack.push((child, 0));
                        }
                        Colour::Grey => {
                            let start = stack.iter().position(|&(v, _)| v == child);
                            if let Some(start) = start {
                                let mut cycle: Vec<usize> =
                                    stack[start..].iter().map(|&(v, _)| v).collect();
                                if cycle.iter().all(|&v| !in_reported[v]) {
                                    for &v in &cycle {
                                        in_reported[v] = true;
                                    }
                                    cycle.push(child);
                                    cycles.push(cycle);
                                }
                            }
                        }
                        Colour::Black => {}
                    }
                } else {
                    colour[node] = Colour::Black;
                    stack.pop();
                }
            }
        }
        cycles
    }
}

/// Where a task is in a [`Schedule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Some dependency has not finished.
    Waiting,
    /// Every dependency is done; it may start.
    Ready,
    /// Started and not yet finished.
    Running,
    /// Finished successfully (or skipped, or done in an earlier attempt of the run).
    Done,
    /// Failed after its retries.
    Failed,
    /// Will never run: a (transitive) dependency failed.
    Blocked,
}

impl TaskState {
    /// Whether the task has reached an end state (done, failed or blocked).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Done | TaskState::Failed | TaskState::Blocked
        )
    }
}

/// An incremental scheduler: which tasks may start, updated in O(dependents)
/// as each task ends, so a 10,000-task DAG costs no more than its edges.
/// Ready tasks come out in file order. A failed task blocks exactly its
/// downstream tasks; unrelated branches carry on.
///
/// To resume a run, [`finish`](Schedule::finish) the tasks the run record
/// shows as done before starting anything.
#[derive(Debug, Clone)]
pub struct Schedule<'p> {
    pipeline: &'p Pipeline,
    index: HashMap<&'p str, usize>,
    dependents: Vec<Vec<usize>>,
    waiting_on: Vec<usize>,
    state: Vec<TaskState>,
    ready: BTreeSet<usize>,
    running: usize,
}

impl<'p> Schedule<'p> {
    /// A schedule with nothing started; fails if the pipeline has a cycle.
    pub fn new(pipeline: &'p Pipeline) -> Result<Self, WorkflowError> {
        let graph = Graph::new(pipeline);
        if let Err(cycle) = graph.order() {
            return Err(pipeline.cycle_error(cycle));
        }
        let waiting_on: Vec<usize> = graph.deps.iter().map(Vec::len).collect();
        let state = waiting_on
            .iter()
            .map(|&w| {
                if w == 0 {
                    TaskState::Ready
                } else {
                    TaskState::Waiting
                }
            })
            .collect::<Vec<_>>();
        let ready = (0..state.len())
            .filter(|&i| state[i] == TaskState::Ready)
            .collect();
        Ok(Schedule {
            pipeline,
            index: graph.index,
            dependents: graph.dependents,
            waiting_on,
            state,
            ready,
            running: 0,
        })
    }

    /// The tasks that may start now, in file order (without starting them).
    pub fn ready(&self) -> Vec<&'p Task> {
        self.ready
            .iter()
            .map(|&i| &self.pipeline.tasks[i])
            .collect()
    }

    /// Marks the first ready task running and returns it; `None` if nothing
    /// is ready (everything is running, waiting, or over).
    pub fn start_next(&mut self) -> Option<&'p Task> {
        let i = self.ready.pop_first()?;
        self.state[i] = TaskState::Running;
        self.running += 1;
        Some(&self.pipeline.tasks[i])
    }

    /// Records that task `id` ended well (or was skipped, or was done in an
    /// earlier attempt of this run); its dependents may become ready.
    pub fn finish(&mut self, id: &str) -> Result<(), WorkflowError> {
        let i = self.end(id)?;
        self.state[i] = TaskState::Done;
        for &d in &self.dependents[i] {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.state[d] == TaskState::Waiting {
                self.state[d] = TaskState::Ready;
                self.ready.insert(d);
            }
        }
        Ok(())
    }

    /// Records that task `id` failed for good; every task downstream of it
    /// that has not started is blocked. Returns the blocked task ids in file
    /// order (the run marks them failed because of `id`).
    pub fn fail(&mut self, id: &str) -> Result<Vec<&'p str>, WorkflowError> {
        let i = self.end(id)?;
        self.state[i] = TaskState::Failed;
        let mut blocked = Vec::new();
        let mut queue: VecDeque<usize> = self.dependents[i].iter().copied().collect();
        while let Some(d) = queue.pop_front() {
            if matches!(self.state[d], TaskState::Waiting | TaskState::Ready) {
                self.state[d] = TaskState::Blocked;
                self.ready.remove(&d);
                blocked.push(d);
                queue.extend(self.dependents[d].iter().copied());
            }
        }
        blocked.sort_unstable();
        Ok(blocked
            .into_iter()
            .map(|d| self.pipeline.tasks[d].id.as_str())
            .collect())
    }

    /// Common part of finish/fail: look the task up and take it out of the
    /// ready set or the running count.
    fn end(&mut self, id: &str) -> Result<usize, WorkflowError> {
        let bad = |reason| WorkflowError::BadTask {
            file: self.pipeline.file.clone(),
            task: id.to_string(),
            reason,
        };
        let &i = self.index.get(id).ok_or_else(|| bad("no task"))?;
        match self.state[i] {
            TaskState::Running => self.running -= 1,
            TaskState::Ready => {
                self.ready.remove(&i);
            }
            TaskState::Waiting => {}
            TaskState::Done | TaskState::Failed | TaskState::Blocked => {
                return Err(bad("already ended: task"))
            }
        }
        Ok(i)
    }

    /// The state of task `id`, if it exists.
    pub fn state(&self, id: &str) -> Option<TaskState> {
        self.index.get(id).map(|&i| self.state[i])
    }

    /// How many tasks are running.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Whether every task has ended (done, failed or blocked): the run is over.
    pub fn is_finished(&self) -> bool {
        self.state.iter().all(|s| s.is_final())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTICLE: &str = r#"
name = "article"
[inputs]
topic = { required = true }
review = { default = "yes" }
[[task]]
id = "research"
agent = "researcher"
prompt = "Research {{ inputs.topic }} thoroughly."
[[task]]
id = "outline"
agent = "planner"
depends_on = ["research"]
prompt = "Outline an article from: {{ tasks.research.output }}"
[[task]]
id = "write"
agent = "writer"
depends_on = ["outline", "research"]
retries = 2
timeout_secs = 120
prompt = "Write the article. Outline: {{ tasks.outline.output }}"
[[task]]
id = "review"
agent = "reviewer"
depends_on = ["write"]
when = "{{ inputs.review }} != 'no'"
output_to_state = "article.final"
prompt = "Review: {{ tasks.write.output }}"
"#;

    fn agents() -> Vec<String> {
        ["researcher", "planner", "writer", "reviewer"]
            .map(String::from)
            .to_vec()
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_validates_orders() {
        let p = Pipeline::parse("article.toml", ARTICLE).unwrap();
        p.validate(&agents()).unwrap();
        assert_eq!(p.file, "article.toml");
        let write = p.task("write").unwrap();
        assert_eq!(write.retries, 2);
        assert_eq!(write.timeout(), Some(Duration::from_secs(120)));
        assert_eq!(write.context_ids(), ["outline", "research"]);
        assert_eq!(
            p.order().unwrap(),
            ["research", "outline", "write", "review"]
        );
        assert_eq!(
            p.levels().unwrap(),
            vec![
                vec!["research"],
                vec!["outline"],
                vec!["write"],
                vec!["review"]
            ]
        );
    }

    #[test]
    fn json_round_trip_and_sniffing() {
        let p = Pipeline::parse("article.toml", ARTICLE).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let q = Pipeline::parse("article", &json).unwrap();
        assert_eq!(p.tasks, q.tasks);
        assert_eq!(p.inputs, q.inputs);
        let err = Pipeline::parse("x.json", ARTICLE).unwrap_err();
        assert!(matches!(err, WorkflowError::Parse { .. }), "{err}");
    }

    #[test]
    fn ready_and_prepare() {
        let p = Pipeline::parse("article.toml", ARTICLE).unwrap();
        let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        let ids = |ts: Vec<&Task>| ts.into_iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(p.ready(&set(&[]), &set(&[]))), ["research"]);
        assert!(p.ready(&set(&[]), &set(&["research"])).is_empty());
        assert_eq!(ids(p.ready(&set(&["research"]), &set(&[]))), ["outline"]);

        let inputs = p.resolve_inputs(&map(&[("topic", "bees")])).unwrap();
        assert_eq!(inputs["review"], "yes");
        let outputs = map(&[("research", "R"), ("outline", "O"), ("write", "W")]);
        assert_eq!(
            p.prepare("write", &inputs, &outputs).unwrap(),
            Prepared::Run {
                prompt: "Write the article. Outline: O".into(),
                context: vec![("research".into(), "R".into())],
            }
        );
        let no_review = p
            .resolve_inputs(&map(&[("topic", "bees"), ("review", "no")]))
            .unwrap();
        assert!(matches!(
            p.prepare("review", &no_review, &outputs).unwrap(),
            Prepared::Skip { .. }
        ));
        assert!(matches!(
            p.prepare("write", &inputs, &map(&[("outline", "O")])),
            Err(WorkflowError::Render { .. })
        ));
        assert!(matches!(
            p.prepare("nope", &inputs, &outputs),
            Err(WorkflowError::BadTask { .. })
        ));
    }

    #[test]
    fn resolve_inputs_collects_problems() {
        let p = Pipeline::parse("article.toml", ARTICLE).unwrap();
        let err = p.resolve_inputs(&map(&[("topik", "x")])).unwrap_err();
        let problems = err.problems();
        assert_eq!(problems.len(), 2, "{err}");
        assert_eq!(
            problems[0].to_string(),
            "pipeline 'article.toml': unknown input 'topik' (declared: review, topic)"
        );
        assert_eq!(
            problems[1].to_string(),
            "pipeline 'article.toml': missing required input 'topic' (give it as topic=VALUE)"
        );
    }

    #[test]
    fn schedule_runs_in_order_and_blocks_downstream_of_failures() {
        let p = Pipeline::parse(
            "fan.toml",
            r#"
name = "fan"
[[task]]
id = "a"
agent = "x"
prompt = "a"
[[task]]
id = "b"
agent = "x"
depends_on = ["a"]
prompt = "b"
[[task]]
id = "c"
agent = "x"
depends_on = ["a"]
prompt = "c"
[[task]]
id = "d"
agent = "x"
depends_on = ["b", "c"]
prompt = "d"
"#,
        )
        .unwrap();
        let mut s = p.schedule().unwrap();
        assert_eq!(s.start_next().map(|t| t.id.as_str()), Some("a"));
        assert!(s.start_next().is_none());
        assert_eq!(s.running(), 1);
        s.finish("a").unwrap();
        let started: Vec<&str> = std::iter::from_fn(|| s.start_next())
            .map(|t| t.id.as_str())
            .collect();
        assert_eq!(started, ["b", "c"]);
        s.finish("c").unwrap();
        assert_eq!(s.state("d"), Some(TaskState::Waiting));
        assert_eq!(s.fail("b").unwrap(), ["d"]);
        assert_eq!(s.state("d"), Some(TaskState::Blocked));
        assert!(s.is_finished());
        assert!(matches!(s.finish("b"), Err(WorkflowError::BadTask { .. })));
        assert!(matches!(s.finish("zz"), Err(WorkflowError::BadTask { .. })));
    }

    #[test]
    fn schedule_resume_marks_done_first() {
        let p = Pipeline::parse("article.toml", ARTICLE).unwrap();
        let mut s = p.schedule().unwrap();
        s.finish("research").unwrap();
        s.finish("outline").unwrap();
        assert_eq!(s.start_next().map(|t| t.id.as_str()), Some("write"));
    }

    #[test]
    fn cycles_are_found_in_running_order() {
        let p = Pipeline::parse(
            "c.toml",
            r#"
name = "c"
[[task]]
id = "a"
agent = "x"
prompt = ""
depends_on = ["c"]
[[task]]
id = "b"
agent = "x"
prompt = ""
depends_on = ["a"]
[[task]]
id = "c"
agent = "x"
prompt = ""
depends_on = ["b"]
"#,
        )
        .unwrap();
        let err = p.order().unwrap_err();
        assert_eq!(
            err.to_string(),
            "pipeline 'c.toml': dependency cycle: a -> b -> c -> a"
        );
        assert!(p.schedule().is_err());
        assert!(p.levels().is_err());
    }

    #[test]
    fn long_chain_does_not_overflow() {
        let mut text = String::from("name = \"chain\"\n");
        for i in 0..20_000 {
            text.push_str(&format!(
                "[[task]]\nid = \"t{i}\"\nagent = \"x\"\nprompt = \"\"\n"
            ));
            if i > 0 {
                text.push_str(&format!("depends_on = [\"t{}\"]\n", i - 1));
            }
        }
        let p = Pipeline::parse("chain.toml", &text).unwrap();
        assert!(p.problems(&["x".into()]).is_empty());
        assert_eq!(p.order().unwrap().len(), 20_000);
    }
}
