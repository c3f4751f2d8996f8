//! Pipelines: multi-agent workflows defined in a file.
//!
//! A pipeline is a TOML (or JSON) file of tasks, each naming an agent, a
//! prompt template and the tasks it depends on. This module is the part of
//! the workflow runner that needs no runtime: it parses the file, checks it
//! completely *before* anything runs (so a typo costs an error message, not a
//! half-finished run and a model bill), orders the tasks, tells a scheduler
//! which tasks are ready, renders prompts and `when` conditions, and draws
//! the DAG. The runner ([`runner::run_pipeline`], `troupe run`) builds on these pieces.
//!
//! - [`pipeline`]: [`Pipeline`], [`Task`], [`InputSpec`]; parsing, validation,
//!   ordering, [`Schedule`] and [`Pipeline::prepare`].
//! - [`template`]: the `{{ inputs.NAME }}` / `{{ tasks.ID.output }}` template
//!   language and `when` conditions.
//! - [`graph`]: the DAG as Mermaid or Graphviz DOT.
//!
//! ```
//! use std::collections::HashMap;
//! use troupe::workflow::Pipeline;
//!
//! let pipeline = Pipeline::parse("hello.toml", r#"
//!     name = "hello"
//!     [inputs]
//!     topic = { required = true }
//!     [[task]]
//!     id = "research"
//!     agent = "researcher"
//!     prompt = "Research {{ inputs.topic }}."
//!     [[task]]
//!     id = "write"
//!     agent = "writer"
//!     depends_on = ["research"]
//!     prompt = "Write from: {{ tasks.research.output }}"
//! "#)?;
//! pipeline.validate(&["researcher".to_string(), "writer".to_string()])?;
//! assert_eq!(pipeline.order()?, ["research", "write"]);
//! let inputs = pipeline.resolve_inputs(&HashMap::from([("topic".into(), "bees".into())]))?;
//! assert_eq!(inputs["topic"], "bees");
//! # Ok::<(), troupe::workflow::WorkflowError>(())
//! ```

pub mod graph;
pub mod pipeline;
pub mod runner;
pub mod template;

pub use graph::{dot, mermaid, GraphFormat};
pub use pipeline::{InputSpec, Pipeline, Prepared, Schedule, Task, TaskState};
pub use runner::{
    run_pipeline, start_pipeline, Cancel, RunCanceller, RunEvent, RunHandle, RunOptions, RunReport,
    WorkflowActor,
};
pub use template::{Condition, Context, Template, TemplateError};

use std::fmt;

/// Which template of a task a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateField {
    /// The task's `prompt`.
    Prompt,
    /// The task's `when` condition.
    When,
}

impl fmt::Display for TemplateField {
    /// The field's name as written in the pipeline file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TemplateField::Prompt => "prompt",
            TemplateField::When => "when",
        })
    }
}

/// Everything that can be wrong with a pipeline or a run's inputs. Every
/// message starts with `pipeline '<file>':` and names the task and the value,
/// e.g. `pipeline 'article.toml': task 'write' depends on unknown task
/// 'reserch'`.
///
/// Validation collects *all* problems rather than stopping at the first, so
/// one `troupe pipeline check` shows everything to fix; when there is more
/// than one, they come wrapped in [`WorkflowError::Invalid`] (see
/// [`WorkflowError::problems`]).
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The file could not be read.
    #[error("pipeline '{file}': cannot read it: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML/JSON or not in the pipeline's shape (an
    /// unknown key, a missing `id`, a wrong type); the message names the key
    /// and the line.
    #[error("pipeline '{file}': {message}")]
    Parse {
        /// The file.
        file: String,
        /// The parser's message.
        message: String,
    },
    /// The pipeline has no `name` or no tasks.
    #[error("pipeline '{file}': {what}")]
    Empty {
        /// The file.
        file: String,
        /// What is missing.
        what: String,
    },
    /// A task id or input name that templates could not refer to.
    #[error(
        "pipeline '{file}': {kind} name '{name}' is not valid: use letters, digits, '_' and '-'"
    )]
    InvalidName {
        /// The file.
        file: String,
        /// `task` or `input`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// Two tasks with one id.
    #[error("pipeline '{file}': task id '{task}' is used more than once")]
    DuplicateTask {
        /// The file.
        file: String,
        /// The id.
        task: String,
    },
    /// `depends_on` names a task that does not exist.
    #[error("pipeline '{file}': task '{task}' depends on unknown task '{dependency}'")]
    UnknownDependency {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// The missing dependency.
        dependency: String,
    },
    /// `depends_on` names a task twice.
    #[error("pipeline '{file}': task '{task}' lists dependency '{dependency}' more than once")]
    DuplicateDependency {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// The repeated dependency.
        dependency: String,
    },
    /// A task depends on itself.
    #[error("pipeline '{file}': task '{task}' depends on itself")]
    SelfDependency {
        /// The file.
        file: String,
        /// The task.
        task: String,
    },
    /// The dependencies go round in a circle. `cycle` lists the tasks in
    /// running order and repeats the first at the end: in `a -> b -> a`, `b`
    /// depends on `a` and `a` on `b`.
    #[error("pipeline '{file}': dependency cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The file.
        file: String,
        /// The cycle's tasks, first repeated last.
        cycle: Vec<String>,
    },
    /// A task names an agent that is not defined.
    #[error("pipeline '{file}': task '{task}' uses unknown agent '{agent}' (known: {})", known.join(", "))]
    UnknownAgent {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// The agent asked for.
        agent: String,
        /// The agents that exist.
        known: Vec<String>,
    },
    /// A template that does not parse (unclosed `{{`, unknown variable form,
    /// malformed `when`).
    #[error("pipeline '{file}': task '{task}': {field}: {source}")]
    Template {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// Which template.
        field: TemplateField,
        /// What is wrong.
        #[source]
        source: TemplateError,
    },
    /// A template uses `{{ inputs.NAME }}` for an input the pipeline does not declare.
    #[error("pipeline '{file}': task '{task}': {field} uses undeclared input '{input}' (declare it under [inputs])")]
    UnknownInputRef {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// Which template.
        field: TemplateField,
        /// The input.
        input: String,
    },
    /// A template uses the output of a task that does not exist.
    #[error(
        "pipeline '{file}': task '{task}': {field} uses the output of unknown task '{referenced}'"
    )]
    UnknownTaskRef {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// Which template.
        field: TemplateField,
        /// The task referred to.
        referenced: String,
    },
    /// A template uses the output of a task that will not have finished: it
    /// is not a (transitive) dependency.
    #[error("pipeline '{file}': task '{task}': {field} uses the output of task '{referenced}', which is not among its dependencies (add it to depends_on)")]
    NotUpstream {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// Which template.
        field: TemplateField,
        /// The task referred to.
        referenced: String,
    },
    /// `context` names a task that is not in `depends_on`.
    #[error("pipeline '{file}': task '{task}': context names '{context}', which is not in its depends_on")]
    ContextNotDependency {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// The task named in `context`.
        context: String,
    },
    /// A task field with a value that cannot work (`timeout_secs = 0`,
    /// `output_to_state = ""`).
    #[error("pipeline '{file}': task '{task}': {field} = {value} is not allowed: {reason}")]
    BadValue {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// The field.
        field: &'static str,
        /// The value, as written.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// An input declared both `required = true` and with a `default`.
    #[error(
        "pipeline '{file}': input '{input}' is required but has a default ('{default}'); drop one"
    )]
    RequiredWithDefault {
        /// The file.
        file: String,
        /// The input.
        input: String,
        /// Its default.
        default: String,
    },
    /// At run time: a required input was not given.
    #[error("pipeline '{file}': missing required input '{input}' (give it as {input}=VALUE)")]
    MissingInput {
        /// The file.
        file: String,
        /// The input.
        input: String,
    },
    /// At run time: an input was given that the pipeline does not declare.
    #[error("pipeline '{file}': unknown input '{input}' (declared: {})", if declared.is_empty() { "none".to_string() } else { declared.join(", ") })]
    UnknownInput {
        /// The file.
        file: String,
        /// The input given.
        input: String,
        /// The inputs the pipeline declares.
        declared: Vec<String>,
    },
    /// An id given to [`Schedule`] or [`Pipeline::prepare`] that is not a task
    /// of the pipeline, or a task reported finished twice.
    #[error("pipeline '{file}': {reason} '{task}'")]
    BadTask {
        /// The file.
        file: String,
        /// The task id.
        task: String,
        /// What is wrong (`no task`, `already finished: task`).
        reason: &'static str,
    },
    /// At run time: a prompt or condition could not be rendered (an input or
    /// an upstream output is missing from the context).
    #[error("pipeline '{file}': task '{task}': cannot render {field}: {source}")]
    Render {
        /// The file.
        file: String,
        /// The task.
        task: String,
        /// Which template.
        field: TemplateField,
        /// What was missing.
        #[source]
        source: TemplateError,
    },
    /// More than one problem; each is listed on its own line.
    #[error("pipeline '{file}': {} problems:{}", problems.len(), list_problems(file, problems))]
    Invalid {
        /// The file.
        file: String,
        /// Every problem found, in file order (cycles last).
        problems: Vec<WorkflowError>,
    },
}

impl WorkflowError {
    /// The individual problems: the list inside [`WorkflowError::Invalid`], or
    /// this error alone.
    pub fn problems(&self) -> Vec<&WorkflowError> {
        match self {
            WorkflowError::Invalid { problems, .. } => problems.iter().collect(),
            other => vec![other],
        }
    }

    /// Folds a list of problems into one result: none → `Ok`, one → that
    /// error, several → [`WorkflowError::Invalid`].
    pub(crate) fn from_problems(file: &str, mut problems: Vec<WorkflowError>) -> Result<(), Self> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(WorkflowError::Invalid {
                file: file.to_string(),
                problems,
            }),
        }
    }
}

/// One problem per line, without repeating the `pipeline '<file>': ` prefix.
fn list_problems(file: &str, problems: &[WorkflowError]) -> String {
    let prefix = format!("pipeline '{file}': ");
    problems
        .iter()
        .map(|p| {
            let text = p.to_string();
            let text = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
            format!("\n  - {text}")
        })
        .collect()
}
