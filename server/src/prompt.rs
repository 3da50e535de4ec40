//! The dev prompt, built by the server so that every runner uses the same one. Pure.
//!
//! A prompt is a [MiniJinja](https://docs.rs/minijinja) template rendered from the task and
//! what surrounds it ([`PromptContext`]): the built-in [`DEFAULT_TEMPLATE`], or a person's own
//! (`pipeline-server --prompt-template FILE`). A person's template is checked once, at
//! start-up ([`PromptTemplate::parse`]): one that does not parse, or that names a variable the
//! context does not have, is refused with its line and column, so a typo cannot reach an
//! agent. The variables are [`VARIABLES`] (documented in the README).

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior, context};
use pipeline_core::verify::{Verifier, shell_quote};

use crate::domain::Task;

/// What goes into a prompt besides the task itself.
#[derive(Clone, Debug)]
pub struct PromptContext<'a> {
    /// The base branch's name.
    pub base: &'a str,
    /// The commit the work starts from.
    pub base_commit: &'a str,
    /// Whether the agent amends the previous patchset's commit.
    pub amend: bool,
    /// The dev attempt this prompt is for (from 1).
    pub attempt: u64,
    /// The verification the commit will be judged by, as it will run (see
    /// [`verification_text`]); `None` when nothing is verified.
    pub verification: Option<String>,
    /// The project's instructions for agents (`AGENTS.md` at the base commit), if any.
    pub instructions: Option<&'a str>,
}

/// The variables a template may use: the task's fields under `task`, and the rest at the top.
pub const VARIABLES: &[&str] = &[
    "task.id",
    "task.title",
    "task.description",
    "task.namespace",
    "task.patchset",
    "task.attempt",
    "base",
    "base_commit",
    "amend",
    "verification",
    "instructions",
    "feedback",
    "note",
    "review",
];

/// The functions MiniJinja offers every template (they are not the context's variables).
const GLOBALS: &[&str] = &["range", "dict", "namespace", "debug", "loop"];

/// The built-in prompt.
pub const DEFAULT_TEMPLATE: &str = r#"# Dev task

You are a coder. Implement the task below in this workspace.

## Rules
1. Make exactly one commit on top of the base commit, with the trailer `Task-Id: {{ task.id }}` in its message.
{% if amend %}
2. This is a new patchset of an existing commit: the workspace is at that commit. Amend it with `git commit --amend`; do not add a second commit.
{% else %}
2. The workspace is at the base commit; commit your change on top of it.
{% endif %}
3. Do NOT push.
4. Do NOT change task status; the pipeline handles transitions.
{% if verification %}
5. Your commit is judged by this verification, run in the workspace: {{ verification }}. Make sure it passes before you finish.
{% endif %}

## Task
- ID: {{ task.id }}
- Base: {{ base }} ({{ base_commit }})
- Patchset: {{ task.patchset }}
- Namespace: {{ task.namespace or "(none)" }}

### Title
{{ task.title }}
{% if task.description %}

### Description
{{ task.description }}
{% endif %}
{% if instructions %}

## Project instructions (AGENTS.md)
{{ instructions }}
{% endif %}
{% if note %}

## Guidance from a person
{{ note }}
{% endif %}
{% if review %}

## A person rejected the previous patchset
Change it as they ask:

{{ review }}
{% endif %}
{% if feedback %}

## The previous {{ "patchset was rejected" if task.patchset > 0 else "attempt failed" }}
Fix the problem below.

```
{{ feedback }}
```
{% endif %}
"#;

/// A checked prompt template.
#[derive(Debug, Clone)]
pub struct PromptTemplate {
    env: Environment<'static>,
}

/// Why a person's template is refused: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct TemplateError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

const NAME: &str = "prompt";

impl Default for PromptTemplate {
    fn default() -> Self {
        Self::parse(DEFAULT_TEMPLATE.to_owned()).expect("the built-in prompt template is valid")
    }
}

impl PromptTemplate {
    /// Checks a template: it must parse, and every variable it reads must be one of
    /// [`VARIABLES`] (or a name it sets itself).
    pub fn parse(source: String) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        env.add_template_owned(NAME, source.clone()).map_err(|e| {
            let (line, column) = position(&source, &e);
            TemplateError {
                line,
                column,
                message: e.detail().unwrap_or(&e.kind().to_string()).to_owned(),
            }
        })?;
        let template = env.get_template(NAME).map_err(|e| TemplateError {
            line: 1,
            column: 1,
            message: e.to_string(),
        })?;
        let known: BTreeSet<&str> = VARIABLES.iter().copied().collect();
        let tops: BTreeSet<&str> = VARIABLES
            .iter()
            .map(|v| v.split('.').next().unwrap_or(v))
            .collect();
        let mut unknown: Vec<String> = template
            .undeclared_variables(true)
            .into_iter()
            .filter(|v| {
                let top = v.split('.').next().unwrap_or(v);
                !(known.contains(v.as_str())
                    || (tops.contains(top) && !v.contains('.'))
                    || GLOBALS.contains(&top))
            })
            .collect();
        unknown.sort();
        if let Some(name) = unknown.first() {
            let (line, column) = find(&source, name);
            return Err(TemplateError {
                line,
                column,
                message: format!(
                    "unknown variable {name}; a prompt template may use {}",
                    VARIABLES.join(", ")
                ),
            });
        }
        drop(template);
        Ok(Self { env })
    }

    /// The prompt for the next dev attempt of `task`. A person's template that fails while
    /// rendering (a filter on a value it cannot take, say) falls back to the built-in prompt,
    /// with a warning in the log: the agent gets a prompt either way.
    pub fn render(&self, task: &Task, ctx: &PromptContext<'_>) -> String {
        let rendered = self
            .env
            .get_template(NAME)
            .and_then(|t| t.render(values(task, ctx)));
        match rendered {
            Ok(prompt) => prompt,
            Err(err) => {
                tracing::warn!(task = %task.id, error = %err, "the prompt template failed; the built-in prompt is used");
                build(task, ctx)
            }
        }
    }
}

/// The built-in prompt for the next dev attempt of `task`.
pub fn build(task: &Task, ctx: &PromptContext<'_>) -> String {
    let env = {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        env
    };
    env.render_str(DEFAULT_TEMPLATE, values(task, ctx))
        .unwrap_or_else(|e| format!("# Dev task\n\nThe prompt could not be built: {e}\n"))
}

/// The template's context: the task's fields, its feedback split into a person's note, a
/// person's review and the rest, and the surroundings.
fn values(task: &Task, ctx: &PromptContext<'_>) -> minijinja::Value {
    let (note, review, feedback) = split_feedback(task.state.feedback.as_deref());
    let description = task.description.trim_end();
    context! {
        task => context! {
            id => task.id.as_str(),
            title => task.title.as_str(),
            description => description,
            namespace => task.namespace.as_deref(),
            patchset => task.state.patchset,
            attempt => ctx.attempt,
        },
        base => ctx.base,
        base_commit => ctx.base_commit,
        amend => ctx.amend,
        verification => ctx.verification.as_deref(),
        instructions => ctx.instructions.map(str::trim_end).filter(|i| !i.is_empty()),
        feedback => feedback,
        note => note,
        review => review,
    }
}

/// The task's feedback in its parts: a person's note (`task retry --note`, which leads it),
/// a person's review (`task reject --note`), and the last rejection's text.
fn split_feedback(feedback: Option<&str>) -> (Option<&str>, Option<&str>, Option<&str>) {
    let mut rest = feedback;
    let mut note = None;
    if let Some(after) = rest.and_then(|f| f.strip_prefix(crate::lifecycle::GUIDANCE)) {
        let (n, after) = after.split_once("\n\n").unwrap_or((after, ""));
        note = Some(n.trim_end());
        rest = Some(after);
    }
    let mut review = None;
    if let Some(r) = rest.and_then(|f| f.strip_prefix(crate::lifecycle::REJECTED)) {
        review = Some(r.trim_end());
        rest = None;
    }
    let rest = rest.map(str::trim_end).filter(|f| !f.trim().is_empty());
    (note, review, rest)
}

/// The verification a task's commit will be judged by, as it runs: `None` when there is none
/// (off, or `bild` and no namespace).
pub fn verification_text(verifier: &Verifier, namespace: Option<&str>) -> Option<String> {
    match verifier {
        Verifier::Off => None,
        Verifier::Bild => namespace.map(|ns| format!("`bild {ns}`, then `bild --test {ns}`")),
        Verifier::Commands { build, test } => {
            let quoted = shell_quote(namespace.unwrap_or_default());
            let steps: Vec<String> = [(build, "build"), (test, "tests")]
                .into_iter()
                .filter_map(|(cmd, what)| {
                    cmd.as_ref()
                        .map(|c| format!("`{}` ({what})", c.replace("{namespace}", &quoted)))
                })
                .collect();
            (!steps.is_empty()).then(|| steps.join(", then "))
        }
    }
}

/// Where a MiniJinja error is, as (line, column), both from 1.
fn position(source: &str, err: &minijinja::Error) -> (usize, usize) {
    match err.range() {
        Some(range) => line_column(source, range.start),
        None => (err.line().unwrap_or(1), 1),
    }
}

/// The line and column (from 1) of the first use of the variable `name` in `source`.
fn find(source: &str, name: &str) -> (usize, usize) {
    let first = name.split('.').next_back().unwrap_or(name);
    let at = source
        .find(name)
        .or_else(|| source.find(first))
        .unwrap_or(0);
    line_column(source, at)
}

fn line_column(source: &str, at: usize) -> (usize, usize) {
    let before = &source[..at.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TaskId, TaskState};

    fn task(patchset: u32, feedback: Option<&str>) -> Task {
        Task {
            id: TaskId::parse("t-999").expect("id"),
            seq: 1,
            title: "Test task".into(),
            description: "A test task".into(),
            namespace: Some("Omni/Test.hs".into()),
            priority: 2,
            parent: None,
            depends_on: vec![],
            requires: vec![],
            paused: None,
            deps_pending: 0,
            children: Default::default(),
            state: TaskState {
                patchset,
                feedback: feedback.map(str::to_owned),
                ..TaskState::new()
            },
            lease: None,
            lease_epoch: 0,
            patch_commit: None,
            avoid_runner: None,
            verified_tree: None,
            version: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    const CTX: PromptContext<'static> = PromptContext {
        base: "main",
        base_commit: "abc123",
        amend: false,
        attempt: 1,
        verification: None,
        instructions: None,
    };

    fn bild() -> PromptContext<'static> {
        PromptContext {
            verification: verification_text(&Verifier::Bild, Some("Omni/Test.hs")),
            ..CTX
        }
    }

    #[test]
    fn a_first_prompt_has_the_task_and_the_rules() {
        let p = build(&task(0, None), &bild());
        for needle in [
            "- ID: t-999",
            "`Task-Id: t-999`",
            "Do NOT push",
            "Do NOT change task status",
            "- Base: main (abc123)",
            "- Patchset: 0",
            "- Namespace: Omni/Test.hs",
            "### Title\nTest task",
            "### Description\nA test task",
            "judged by this verification, run in the workspace: `bild Omni/Test.hs`, then \
             `bild --test Omni/Test.hs`",
        ] {
            assert!(p.contains(needle), "{needle:?} missing from:\n{p}");
        }
        assert!(!p.contains("rejected"));
        assert!(!p.contains("--amend"));
    }

    #[test]
    fn a_rejected_patchset_is_amended_with_the_feedback() {
        let p = build(
            &task(1, Some("Build failed: missing import")),
            &PromptContext { amend: true, ..CTX },
        );
        assert!(p.contains("## The previous patchset was rejected"), "{p}");
        assert!(p.contains("Build failed: missing import"));
        assert!(p.contains("git commit --amend"));
        assert!(p.contains("- Patchset: 1"));
    }

    #[test]
    fn a_failed_attempt_without_a_patchset_says_so() {
        let p = build(&task(0, Some("the agent made no commit")), &CTX);
        assert!(p.contains("## The previous attempt failed"), "{p}");
        assert!(p.contains("the agent made no commit"));
    }

    /// The whole prompt, as agents read it: a change to the template shows in review.
    #[test]
    fn the_prompt_of_a_rejected_patchset() {
        let p = build(
            &task(
                2,
                Some("tests failed (exit 1): bild --test Omni/Test.hs\nassertion failed"),
            ),
            &PromptContext {
                amend: true,
                ..bild()
            },
        );
        insta::assert_snapshot!(p);
    }

    #[test]
    fn the_prompt_of_a_first_attempt() {
        insta::assert_snapshot!(build(&task(0, None), &bild()));
    }

    #[test]
    fn the_prompt_with_the_projects_instructions() {
        let p = build(
            &task(0, None),
            &PromptContext {
                instructions: Some("Run `make lint` before you commit.\n\n"),
                ..bild()
            },
        );
        insta::assert_snapshot!(p);
    }

    #[test]
    fn a_persons_rejection_is_shown_as_their_review() {
        let p = build(
            &task(1, Some("Rejected by a person: use the other parser")),
            &PromptContext { amend: true, ..CTX },
        );
        assert!(
            p.contains(
                "## A person rejected the previous patchset\nChange it as they ask:\n\nuse the \
                 other parser\n"
            ),
            "{p}"
        );
        assert!(!p.contains("Rejected by a person"), "{p}");
        assert!(!p.contains("previous patchset was rejected"), "{p}");
        assert!(p.contains("git commit --amend"), "{p}");
    }

    #[test]
    fn a_persons_note_is_shown_as_guidance() {
        let p = build(
            &task(
                1,
                Some("Guidance from a person: use the other parser\n\nbuild failed"),
            ),
            &PromptContext { amend: true, ..CTX },
        );
        assert!(
            p.contains("## Guidance from a person\nuse the other parser\n"),
            "{p}"
        );
        assert!(p.contains("## The previous patchset was rejected"), "{p}");
        assert!(p.contains("build failed"));
        let alone = build(&task(0, Some("Guidance from a person: start over")), &CTX);
        assert!(alone.contains("start over"));
        assert!(!alone.contains("previous attempt failed"), "{alone}");
    }

    #[test]
    fn the_verification_is_said_as_it_runs() {
        let cmds = Verifier::Commands {
            build: Some("make {namespace}".into()),
            test: Some("make test".into()),
        };
        assert_eq!(
            verification_text(&cmds, Some("a b")).as_deref(),
            Some("`make 'a b'` (build), then `make test` (tests)")
        );
        assert_eq!(verification_text(&Verifier::Bild, None), None);
        assert_eq!(verification_text(&Verifier::Off, Some("x")), None);
    }

    #[test]
    fn a_persons_template_gets_every_variable() {
        let t = PromptTemplate::parse(
            "{{ task.id }}|{{ task.title }}|{{ task.description }}|{{ task.namespace }}|\
             {{ task.patchset }}|{{ task.attempt }}|{{ base }}|{{ base_commit }}|{{ amend }}|\
             {{ verification }}|{{ instructions }}|{{ feedback }}|{{ note }}|{{ review }}"
                .into(),
        )
        .expect("valid");
        let p = t.render(
            &task(1, Some("Guidance from a person: be brief\n\ntests failed")),
            &PromptContext {
                attempt: 3,
                instructions: Some("lint first"),
                ..bild()
            },
        );
        assert_eq!(
            p,
            "t-999|Test task|A test task|Omni/Test.hs|1|3|main|abc123|False|`bild Omni/Test.hs`, \
             then `bild --test Omni/Test.hs`|lint first|tests failed|be brief|None"
        );
        // Loops and its own names are fine.
        PromptTemplate::parse(
            "{% set x = task.title %}{% for i in range(2) %}{{ x }}{{ loop.index }}{% endfor %}"
                .into(),
        )
        .expect("valid");
    }

    #[test]
    fn a_template_that_does_not_parse_or_names_an_unknown_variable_is_refused_where() {
        let err = PromptTemplate::parse("# Task\n\n{{ task.title }\n".into()).expect_err("refused");
        assert_eq!(err.line, 3, "{err}");
        let err = PromptTemplate::parse("# Task\n\nDo {{ task.titel }} now.\n".into())
            .expect_err("refused");
        assert_eq!((err.line, err.column), (3, 7), "{err}");
        assert!(err.message.contains("unknown variable task.titel"), "{err}");
        let err = PromptTemplate::parse("{% if ok %}\n  {{ feedbak }}\n{% endif %}".into())
            .expect_err("refused");
        assert!(err.message.contains("unknown variable feedbak"), "{err}");
        assert_eq!((err.line, err.column), (2, 6), "the first by name: {err}");
    }
}
