//! The dev prompt, built by the server so that every runner uses the same template. Pure.

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
}

/// Builds the prompt for the next dev attempt of `task`.
pub fn build(task: &Task, ctx: &PromptContext<'_>) -> String {
    let id = &task.id;
    let ns = task.namespace.as_deref().unwrap_or("(none)");
    let mut out = String::new();
    out.push_str("# Dev task\n\nYou are a coder. Implement the task below in this workspace.\n\n");
    out.push_str("## Rules\n");
    out.push_str(&format!(
        "1. Make exactly one commit on top of the base commit, with the trailer `Task-Id: {id}` \
         in its message.\n"
    ));
    if ctx.amend {
        out.push_str(
            "2. This is a new patchset of an existing commit: the workspace is at that commit. \
             Amend it with `git commit --amend`; do not add a second commit.\n",
        );
    } else {
        out.push_str("2. The workspace is at the base commit; commit your change on top of it.\n");
    }
    out.push_str("3. Do NOT push.\n");
    out.push_str("4. Do NOT change task status; the pipeline handles transitions.\n");
    if task.namespace.is_some() {
        out.push_str(&format!(
            "5. Make sure `{ns}` builds and its tests pass before you finish.\n"
        ));
    }
    out.push_str("\n## Task\n");
    out.push_str(&format!("- ID: {id}\n"));
    out.push_str(&format!("- Base: {} ({})\n", ctx.base, ctx.base_commit));
    out.push_str(&format!("- Patchset: {}\n", task.state.patchset));
    out.push_str(&format!("- Namespace: {ns}\n"));
    out.push_str(&format!("\n### Title\n{}\n", task.title));
    if !task.description.trim().is_empty() {
        out.push_str(&format!(
            "\n### Description\n{}\n",
            task.description.trim_end()
        ));
    }
    // A person's note (`task retry --note`) leads the feedback; what follows it, if anything,
    // is the last rejection.
    let mut feedback = task.state.feedback.as_deref();
    if let Some(rest) = feedback.and_then(|f| f.strip_prefix(crate::lifecycle::GUIDANCE)) {
        let (note, after) = rest.split_once("\n\n").unwrap_or((rest, ""));
        out.push_str("\n## Guidance from a person\n");
        out.push_str(note.trim_end());
        out.push('\n');
        feedback = Some(after).filter(|f| !f.trim().is_empty());
    }
    // A person's review of the previous patchset (`task reject --note`).
    if let Some(note) = feedback.and_then(|f| f.strip_prefix(crate::lifecycle::REJECTED)) {
        out.push_str("\n## A person rejected the previous patchset\n");
        out.push_str("Change it as they ask:\n\n");
        out.push_str(note.trim_end());
        out.push('\n');
        feedback = None;
    }
    if let Some(feedback) = feedback {
        if task.state.patchset > 0 {
            out.push_str("\n## The previous patchset was rejected\n");
        } else {
            out.push_str("\n## The previous attempt failed\n");
        }
        out.push_str("Fix the problem below.\n\n```\n");
        out.push_str(feedback.trim_end());
        out.push_str("\n```\n");
    }
    out
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
    };

    #[test]
    fn a_first_prompt_has_the_task_and_the_rules() {
        let p = build(&task(0, None), &CTX);
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
            &PromptContext { amend: true, ..CTX },
        );
        insta::assert_snapshot!(p);
    }

    #[test]
    fn the_prompt_of_a_first_attempt() {
        insta::assert_snapshot!(build(&task(0, None), &CTX));
    }

    #[test]
    fn a_persons_rejection_is_shown_as_their_review() {
        let p = build(
            &task(1, Some("Rejected by a person: use the other parser")),
            &PromptContext { amend: true, ..CTX },
        );
        assert!(
            p.contains("## A person rejected the previous patchset\nChange it as they ask:\n\nuse the other parser\n"),
            "{p}"
        );
        assert!(!p.contains("Rejected by a person"), "{p}");
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
}
