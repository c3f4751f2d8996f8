//! A deliberately tiny template language for pipeline prompts and `when`
//! conditions.
//!
//! Why not a general template engine: a pipeline file is outside input that
//! must be checked *before* anything runs, so every variable a template uses
//! has to be listable and checkable against the pipeline (declared inputs,
//! upstream tasks). Two variable forms are enough for that and leave nothing
//! to evaluate at run time but a lookup:
//!
//! - `{{ inputs.NAME }}` — the value of a pipeline input;
//! - `{{ tasks.ID.output }}` — the output of an (upstream) task.
//!
//! Whitespace inside the braces and around the dots is ignored
//! (`{{inputs.topic}}` = `{{ inputs . topic }}`). Anything else between `{{`
//! and `}}` is an error at parse time; a lone `}}` is plain text. There are no
//! filters, loops or escapes.
//!
//! A [`Condition`] (a task's `when`) is a template, optionally compared with a
//! quoted literal: `{{ inputs.review }} != 'no'`, `{{ tasks.check.output }} ==
//! "yes"`. Comparison trims the rendered text and ignores ASCII case, because
//! the left side is often a model's answer (`"Yes\n"`). Without a comparison
//! the rendered text is tested for truthiness (see [`is_truthy`]).
//!
//! ```
//! use std::collections::HashMap;
//! use troupe::workflow::template::{Condition, Context, Template};
//!
//! let inputs = HashMap::from([("topic".to_string(), "bees".to_string())]);
//! let outputs = HashMap::new();
//! let ctx = Context { inputs: &inputs, outputs: &outputs };
//! let t = Template::parse("Research {{ inputs.topic }}.").unwrap();
//! assert_eq!(t.render(&ctx).unwrap(), "Research bees.");
//! assert!(Condition::parse("{{ inputs.topic }} != 'no'").unwrap().eval(&ctx).unwrap());
//! ```

use std::collections::HashMap;
use std::fmt;

/// A template that could not be parsed, or rendered with the values at hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` without its `}}`.
    #[error("'{{{{' at character {position} is never closed with '}}}}'")]
    Unclosed {
        /// Where the `{{` starts (0-based, in characters).
        position: usize,
    },
    /// Something between the braces that is not one of the two variable forms.
    #[error(
        "unknown template variable '{{{{ {expr} }}}}': use '{{{{ inputs.NAME }}}}' or '{{{{ tasks.ID.output }}}}'"
    )]
    UnknownVariable {
        /// The text between the braces, trimmed.
        expr: String,
    },
    /// A `when` that is neither a template nor `template == 'literal'` /
    /// `template != 'literal'`.
    #[error("condition '{condition}': {reason}")]
    BadCondition {
        /// The whole condition.
        condition: String,
        /// What is wrong with it.
        reason: String,
    },
    /// At render time: the context has no value for this input.
    #[error("no value for input '{name}'")]
    MissingInput {
        /// The input.
        name: String,
    },
    /// At render time: the context has no output for this task (it has not
    /// finished, or the scheduler did not record it).
    #[error("no output for task '{task}'")]
    MissingOutput {
        /// The task.
        task: String,
    },
}

/// A variable a template refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Var {
    /// `{{ inputs.NAME }}`.
    Input(String),
    /// `{{ tasks.ID.output }}`.
    TaskOutput(String),
}

impl fmt::Display for Var {
    /// Writes the variable back in its canonical form, e.g. `{{ inputs.topic }}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Input(name) => write!(f, "{{{{ inputs.{name} }}}}"),
            Var::TaskOutput(task) => write!(f, "{{{{ tasks.{task}.output }}}}"),
        }
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// The values a template is rendered with: resolved pipeline inputs and the
/// outputs of finished tasks, by task id.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Input name → value (see `Pipeline::resolve_inputs`).
    pub inputs: &'a HashMap<String, String>,
    /// Task id → that task's output.
    pub outputs: &'a HashMap<String, String>,
}

/// A parsed template: text with `{{ inputs.NAME }}` / `{{ tasks.ID.output }}`
/// variables. Parse once, list its [`vars`](Template::vars) to validate,
/// [`render`](Template::render) per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Whether `s` is usable as an input name or task id in a template:
/// non-empty ASCII letters, digits, `_` and `-`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Template {
    /// Parses `src`. Fails on an unclosed `{{` or a variable of an unknown form.
    pub fn parse(src: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = src;
        let mut consumed = 0; // bytes of `src` before `rest`
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                let position = src[..consumed + open].chars().count();
                return Err(TemplateError::Unclosed { position });
            };
            parts.push(Part::Var(parse_var(&after[..close])?));
            let used = open + 2 + close + 2;
            consumed += used;
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The variables in order of appearance (repeats included).
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Text(_) => None,
        })
    }

    /// Whether the template uses this task's output.
    pub fn uses_output_of(&self, task: &str) -> bool {
        self.vars()
            .any(|v| matches!(v, Var::TaskOutput(t) if t == task))
    }

    /// Substitutes every variable from `ctx`. A variable without a value is an
    /// error rather than an empty string, so a scheduler bug cannot silently
    /// send a model a prompt with a hole in it.
    pub fn render(&self, ctx: &Context<'_>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Var(Var::Input(name)) => out.push_str(
                    ctx.inputs
                        .get(name)
                        .ok_or_else(|| TemplateError::MissingInput { name: name.clone() })?,
                ),
                Part::Var(Var::TaskOutput(task)) => out.push_str(
                    ctx.outputs
                        .get(task)
                        .ok_or_else(|| TemplateError::MissingOutput { task: task.clone() })?,
                ),
            }
        }
        Ok(out)
    }
}

/// Parses the text between `{{` and `}}`.
fn parse_var(expr: &str) -> Result<Var, TemplateError> {
    let unknown = || TemplateError::UnknownVariable {
        expr: expr.trim().to_string(),
    };
    let segments: Vec<&str> = expr.split('.').map(str::trim).collect();
    match segments.as_slice() {
        ["inputs", name] if is_valid_name(name) => Ok(Var::Input((*name).to_string())),
        ["tasks", id, "output"] if is_valid_name(id) => Ok(Var::TaskOutput((*id).to_string())),
        _ => Err(unknown()),
    }
}

/// Whether a rendered value counts as true: after trimming it is non-empty and
/// not `false`, `no` or `0` (ignoring ASCII case).
pub fn is_truthy(value: &str) -> bool {
    let v = value.trim();
    !(v.is_empty() || v.eq_ignore_ascii_case("false") || v.eq_ignore_ascii_case("no") || v == "0")
}

/// How a [`Condition`] compares its rendered template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `==`: equal to the literal.
    Eq,
    /// `!=`: not equal to the literal.
    Ne,
}

/// A task's `when`: run the task only if this evaluates to true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    lhs: Template,
    compare: Option<(Comparison, String)>,
}

impl Condition {
    /// Parses `template`, `template == 'literal'` or `template != 'literal'`
    /// (single or double quotes). The operator is the first `==`/`!=` outside
    /// `{{ }}`.
    pub fn parse(src: &str) -> Result<Self, TemplateError> {
        let bad = |reason: &str| TemplateError::BadCondition {
            condition: src.to_string(),
            reason: reason.to_string(),
        };
        let Some((at, op)) = find_operator(src) else {
            if src.trim().is_empty() {
                return Err(bad("it is empty"));
            }
            return Ok(Condition {
                lhs: Template::parse(src.trim())?,
                compare: None,
            });
        };
        let lhs = src[..at].trim();
        let rhs = src[at + 2..].trim();
        if lhs.is_empty() {
            return Err(bad("nothing before the comparison"));
        }
        let literal = unquote(rhs).ok_or_else(|| {
            bad("the right side of a comparison must be one quoted literal, like 'no'")
        })?;
        Ok(Condition {
            lhs: Template::parse(lhs)?,
            compare: Some((op, literal.to_string())),
        })
    }

    /// The variables the condition uses.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.lhs.vars()
    }

    /// Renders the template and compares (trimmed, ASCII case-insensitive) or
    /// tests it for truthiness.
    pub fn eval(&self, ctx: &Context<'_>) -> Result<bool, TemplateError> {
        let value = self.lhs.render(ctx)?;
        Ok(match &self.compare {
            None => is_truthy(&value),
            Some((op, literal)) => {
                let equal = value.trim().eq_ignore_ascii_case(literal.trim());
                match op {
                    Comparison::Eq => equal,
                    Comparison::Ne => !equal,
                }
            }
        })
    }
}

/// Finds the first `==` or `!=` outside `{{ }}`. Quotes on the left are not
/// tracked, so an apostrophe in plain text (`isn't`) needs no escaping; the
/// literal comes after the operator and may itself contain `==`.
fn find_operator(src: &str) -> Option<(usize, Comparison)> {
    let bytes = src.as_bytes();
    let mut in_braces = false;
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (in_braces, bytes[i], bytes[i + 1]) {
            (false, b'{', b'{') => {
                in_braces = true;
                i += 1;
            }
            (true, b'}', b'}') => {
                in_braces = false;
                i += 1;
            }
            (false, b'=', b'=') => return Some((i, Comparison::Eq)),
            (false, b'!', b'=') => return Some((i, Comparison::Ne)),
            _ => {}
        }
        i += 1;
    }
    None
}

/// `'x'` or `"x"` → `x`, if `s` is exactly one quoted literal.
fn unquote(s: &str) -> Option<&str> {
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let inner = s.strip_prefix(q)?.strip_suffix(q)?;
    (!inner.contains(q)).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_maps() -> (HashMap<String, String>, HashMap<String, String>) {
        (
            HashMap::from([
                ("topic".into(), "quantum computing".into()),
                ("review".into(), "no".into()),
            ]),
            HashMap::from([("research".into(), "Facts.\n".into())]),
        )
    }

    #[test]
    fn parses_and_renders_both_forms_whitespace_tolerant() {
        let (i, o) = ctx_maps();
        let ctx = Context {
            inputs: &i,
            outputs: &o,
        };
        let t = Template::parse("A {{inputs.topic}} B {{  tasks . research . output }}}}").unwrap();
        assert_eq!(
            t.vars().cloned().collect::<Vec<_>>(),
            vec![
                Var::Input("topic".into()),
                Var::TaskOutput("research".into())
            ]
        );
        assert_eq!(t.render(&ctx).unwrap(), "A quantum computing B Facts.\n}}");
        assert!(t.uses_output_of("research"));
    }

    #[test]
    fn plain_text_and_empty() {
        assert_eq!(Template::parse("").unwrap().vars().count(), 0);
        let (i, o) = ctx_maps();
        let ctx = Context {
            inputs: &i,
            outputs: &o,
        };
        assert_eq!(
            Template::parse("no vars } here")
                .unwrap()
                .render(&ctx)
                .unwrap(),
            "no vars } here"
        );
    }

    #[test]
    fn rejects_unknown_forms_and_unclosed() {
        for bad in [
            "{{ input.topic }}",
            "{{ inputs }}",
            "{{ tasks.a }}",
            "{{ tasks.a.result }}",
            "{{ inputs.a.b }}",
            "{{ }}",
            "{{ inputs.to pic }}",
        ] {
            assert!(
                matches!(
                    Template::parse(bad),
                    Err(TemplateError::UnknownVariable { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            Template::parse("héllo {{ inputs.x").unwrap_err(),
            TemplateError::Unclosed { position: 6 }
        );
    }

    #[test]
    fn render_reports_missing_values() {
        let (i, o) = (HashMap::new(), HashMap::new());
        let ctx = Context {
            inputs: &i,
            outputs: &o,
        };
        assert_eq!(
            Template::parse("{{ inputs.x }}").unwrap().render(&ctx),
            Err(TemplateError::MissingInput { name: "x".into() })
        );
        assert_eq!(
            Template::parse("{{ tasks.t.output }}")
                .unwrap()
                .render(&ctx),
            Err(TemplateError::MissingOutput { task: "t".into() })
        );
    }

    #[test]
    fn conditions() {
        let (i, o) = ctx_maps();
        let ctx = Context {
            inputs: &i,
            outputs: &o,
        };
        let eval = |s: &str| Condition::parse(s).unwrap().eval(&ctx).unwrap();
        assert!(!eval("{{ inputs.review }} != 'no'"));
        assert!(eval("{{ inputs.review }} == \"NO\""));
        assert!(eval("{{ tasks.research.output }} == 'facts.'"));
        assert!(eval("{{ inputs.topic }}"));
        assert!(!eval("{{ inputs.review }}"));
        assert!(eval("{{ inputs.topic }} != 'a == b'"));
        for bad in [
            "",
            "   ",
            "== 'x'",
            "{{ inputs.a }} != no",
            "{{ inputs.a }} != 'a' 'b'",
        ] {
            assert!(
                matches!(
                    Condition::parse(bad),
                    Err(TemplateError::BadCondition { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn truthiness() {
        for t in ["yes", "1", "anything", " true "] {
            assert!(is_truthy(t), "{t}");
        }
        for f in ["", "  ", "false", "No", "0", "FALSE\n"] {
            assert!(!is_truthy(f), "{f:?}");
        }
    }
}
