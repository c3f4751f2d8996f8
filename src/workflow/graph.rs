//! The pipeline DAG as a picture: Mermaid (renders in GitHub Markdown) or
//! Graphviz DOT (`dot -Tsvg`). Why: a pipeline file lists tasks one by one;
//! the shape of the run — what fans out, what joins, what is conditional —
//! is only obvious drawn. `troupe pipeline graph` prints these.
//!
//! Nodes are labelled `id: agent`; a conditional task (`when`) gets a `?`
//! after its agent. Edges go from a dependency to its dependent (running
//! order), in file order. Unknown dependencies are drawn too, so the picture
//! of a broken pipeline shows what it refers to.
//!
//! ```
//! use troupe::workflow::{graph, Pipeline};
//! let p = Pipeline::parse("p.toml", r#"
//!     name = "p"
//!     [[task]]
//!     id = "a"
//!     agent = "planner"
//!     prompt = "plan"
//!     [[task]]
//!     id = "b"
//!     agent = "writer"
//!     depends_on = ["a"]
//!     prompt = "write"
//! "#)?;
//! assert!(graph::mermaid(&p).contains("    a --> b\n"));
//! assert!(graph::dot(&p).contains("    \"a\" -> \"b\";\n"));
//! # Ok::<(), troupe::workflow::WorkflowError>(())
//! ```

use std::fmt::{self, Write as _};
use std::str::FromStr;

use super::pipeline::{Pipeline, Task};
use super::template::is_valid_name;

/// An output format for [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphFormat {
    /// Mermaid flowchart (`graph TD`).
    #[default]
    Mermaid,
    /// Graphviz DOT (`digraph`).
    Dot,
}

impl FromStr for GraphFormat {
    type Err = String;

    /// `mermaid` or `dot` (also `graphviz`), ignoring case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "mermaid" => Ok(GraphFormat::Mermaid),
            "dot" | "graphviz" => Ok(GraphFormat::Dot),
            other => Err(format!(
                "unknown graph format '{other}' (use mermaid or dot)"
            )),
        }
    }
}

impl fmt::Display for GraphFormat {
    /// The format's name as [`FromStr`] accepts it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GraphFormat::Mermaid => "mermaid",
            GraphFormat::Dot => "dot",
        })
    }
}

/// The pipeline's DAG in `format`.
pub fn render(pipeline: &Pipeline, format: GraphFormat) -> String {
    match format {
        GraphFormat::Mermaid => mermaid(pipeline),
        GraphFormat::Dot => dot(pipeline),
    }
}

fn label(task: &Task) -> String {
    let when = if task.when.is_some() { "?" } else { "" };
    format!("{}: {}{when}", task.id, task.agent)
}

/// Every edge `(dependency, dependent)` in file order.
fn edges(pipeline: &Pipeline) -> impl Iterator<Item = (&str, &str)> {
    pipeline.tasks.iter().flat_map(|t| {
        t.depends_on
            .iter()
            .map(move |d| (d.as_str(), t.id.as_str()))
    })
}

/// A Mermaid node id: task ids are already `[A-Za-z0-9_-]+`, which Mermaid
/// accepts, except the keyword `end`, which breaks a flowchart; anything
/// else (an invalid id in an unvalidated pipeline) is hex-encoded.
fn mermaid_id(id: &str) -> String {
    if id.eq_ignore_ascii_case("end") {
        format!("{id}_")
    } else if is_valid_name(id) {
        id.to_string()
    } else {
        format!("n_{}", hex::encode(id))
    }
}

/// The DAG as a Mermaid flowchart: `graph TD`, one `id[id: agent]` node per
/// task, then one `a --> b` edge per dependency.
pub fn mermaid(pipeline: &Pipeline) -> String {
    let mut out = String::from("graph TD\n");
    for task in &pipeline.tasks {
        let text = label(task);
        let plain = text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " :_-?.".contains(c));
        let text = if plain {
            text
        } else {
            format!("\"{}\"", text.replace('"', "#quot;"))
        };
        let _ = writeln!(out, "    {}[{text}]", mermaid_id(&task.id));
    }
    for (from, to) in edges(pipeline) {
        let _ = writeln!(out, "    {} --> {}", mermaid_id(from), mermaid_id(to));
    }
    out
}

/// A DOT double-quoted string.
fn dot_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The DAG as Graphviz DOT: a `digraph` named after the pipeline, one
/// labelled node per task (dashed if conditional), one `"a" -> "b";` edge
/// per dependency.
pub fn dot(pipeline: &Pipeline) -> String {
    let mut out = format!(
        "digraph {} {{\n    rankdir=TB;\n    node [shape=box];\n",
        dot_str(&pipeline.name)
    );
    for task in &pipeline.tasks {
        let style = if task.when.is_some() {
            ", style=dashed"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "    {} [label={}{style}];",
            dot_str(&task.id),
            dot_str(&label(task))
        );
    }
    for (from, to) in edges(pipeline) {
        let _ = writeln!(out, "    {} -> {};", dot_str(from), dot_str(to));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> Pipeline {
        Pipeline::parse(
            "g.toml",
            r#"
name = "g \"quoted\""
[[task]]
id = "a"
agent = "planner"
prompt = ""
[[task]]
id = "end"
agent = "writer"
depends_on = ["a"]
when = "{{ tasks.a.output }}"
prompt = ""
"#,
        )
        .unwrap()
    }

    #[test]
    fn mermaid_shape() {
        assert_eq!(
            mermaid(&pipeline()),
            "graph TD\n    a[a: planner]\n    end_[end: writer?]\n    a --> end_\n"
        );
    }

    #[test]
    fn dot_shape_and_escaping() {
        let d = dot(&pipeline());
        assert!(d.starts_with("digraph \"g \\\"quoted\\\"\" {\n"), "{d}");
        assert!(d.contains("    \"a\" [label=\"a: planner\"];\n"), "{d}");
        assert!(d.contains("    \"end\" [label=\"end: writer?\", style=dashed];\n"));
        assert!(d.contains("    \"a\" -> \"end\";\n"));
        assert!(d.ends_with("}\n"));
    }

    #[test]
    fn formats_parse() {
        assert_eq!("Mermaid".parse::<GraphFormat>(), Ok(GraphFormat::Mermaid));
        assert_eq!("dot".parse::<GraphFormat>(), Ok(GraphFormat::Dot));
        assert!("png".parse::<GraphFormat>().is_err());
        assert_eq!(render(&pipeline(), GraphFormat::Dot), dot(&pipeline()));
    }
}
