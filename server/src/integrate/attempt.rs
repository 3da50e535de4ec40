//! One attempt to land a task, as a small state machine. Pure: it says what to do next
//! ([`Step`]) and is told what came of it ([`Input`]); the driver in [`super`] does the git,
//! the build, the journal and the swap. So every path (a conflict, a red build, a skipped build,
//! a base that moves under it, a task that changed meanwhile, a task already landed) is
//! unit-tested without a repository.
//!
//! ```text
//! ReadTip ─▶ (already landed?) ─▶ Done(AlreadyLanded)
//!    │
//!    ▼
//! CherryPick ─conflict─▶ Done(Failed)
//!    │
//!    ▼
//! Build (unless skipped) ─red─▶ Done(Failed)
//!    │
//!    ▼
//! Journal ─task changed─▶ Done(Abandoned)
//!    │
//!    ▼
//! Swap (push, then update-ref) ─base moved─▶ ReadTip (at most MAX_SWAP_ATTEMPTS times)
//!    │
//!    ▼
//! Done(Landed)
//! ```

use pipeline_core::ids::{CommitId, TreeId};

/// How many times an attempt is redone because the base moved under it before it gives up
/// for now (the task is tried again on the next wake).
pub const MAX_SWAP_ATTEMPTS: usize = 20;

/// What the attempt needs to know of its task.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The task's commit (its patchset) and that commit's parent.
    pub commit: CommitId,
    pub parent: CommitId,
    /// The tree the runner verified, when it really did.
    pub verified_tree: Option<TreeId>,
    /// Why no build is needed whatever the tree (verification off, nothing to build), if so.
    pub never_build: Option<String>,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Read the base tip (following the push remote, if any) and whether the task's own landed
    /// commit is on it.
    ReadTip,
    /// Cherry-pick the task's commit onto `tip` and write the integrated commit.
    CherryPick { tip: CommitId },
    /// Build `commit` (on `tip`).
    Build { tip: CommitId, commit: CommitId },
    /// Record the move in the journal (only if the task is still this patchset, Verified).
    Journal { tip: CommitId, commit: CommitId },
    /// Push (with `--push-remote`) and move the base from `tip` to `commit`.
    Swap { tip: CommitId, commit: CommitId },
    /// Over.
    Done(Outcome),
}

/// What came of the last step.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The tip, and the task's own landed commit if it is already on it.
    Tip {
        tip: CommitId,
        landed: Option<CommitId>,
    },
    /// The cherry-pick: the integrated commit and its tree, or git's conflict messages.
    Picked(Result<(CommitId, TreeId), String>),
    /// The build: passed, or failed with why.
    Built(Result<(), String>),
    /// Whether the journal entry was written (false: the task changed meanwhile).
    Journaled(bool),
    /// Whether the base (and the remote) moved to the commit (false: it moved first).
    Swapped(bool),
}

/// How the attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The base is at `commit` now; `note` says why no build ran, if none did.
    Landed {
        commit: CommitId,
        tip: CommitId,
        note: Option<String>,
    },
    /// The task's own commit was on the base already.
    AlreadyLanded { commit: CommitId },
    /// The task is the reason it cannot land (a conflict, a red build): back to it.
    Failed { reason: String, tip: CommitId },
    /// The task changed while it was being integrated (cancelled, a newer patchset).
    Abandoned,
    /// The base kept moving; try again later.
    GaveUp,
}

/// One attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    plan: Plan,
    swaps: usize,
    /// Why the build was skipped, for the landing's note.
    skipped: Option<String>,
    step: Step,
}

impl Attempt {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            swaps: 0,
            skipped: None,
            step: Step::ReadTip,
        }
    }

    /// What to do now.
    pub fn step(&self) -> &Step {
        &self.step
    }

    /// Why the build of `tree` can be skipped, if it can.
    fn skip(&self, tree: &TreeId) -> Option<String> {
        if let Some(why) = &self.plan.never_build {
            return Some(why.clone());
        }
        (self.plan.verified_tree.as_ref() == Some(tree))
            .then(|| "the tree is the one the runner verified (the base did not move)".to_owned())
    }

    /// Takes what came of the current step; returns the next.
    pub fn on(&mut self, input: Input) -> &Step {
        let next = match (std::mem::replace(&mut self.step, Step::ReadTip), input) {
            (Step::ReadTip, Input::Tip { tip, landed }) => match landed {
                Some(commit) => Step::Done(Outcome::AlreadyLanded { commit }),
                None => Step::CherryPick { tip },
            },
            (Step::CherryPick { tip }, Input::Picked(Err(conflict))) => {
                Step::Done(Outcome::Failed {
                    reason: conflict,
                    tip,
                })
            }
            (Step::CherryPick { tip }, Input::Picked(Ok((commit, tree)))) => {
                self.skipped = self.skip(&tree);
                if self.skipped.is_some() {
                    Step::Journal { tip, commit }
                } else {
                    Step::Build { tip, commit }
                }
            }
            (Step::Build { tip, .. }, Input::Built(Err(why))) => {
                Step::Done(Outcome::Failed { reason: why, tip })
            }
            (Step::Build { tip, commit }, Input::Built(Ok(()))) => Step::Journal { tip, commit },
            (Step::Journal { .. }, Input::Journaled(false)) => Step::Done(Outcome::Abandoned),
            (Step::Journal { tip, commit }, Input::Journaled(true)) => Step::Swap { tip, commit },
            (Step::Swap { tip, commit }, Input::Swapped(true)) => Step::Done(Outcome::Landed {
                commit,
                tip,
                note: self
                    .skipped
                    .take()
                    .map(|why| format!("build skipped: {why}")),
            }),
            (Step::Swap { .. }, Input::Swapped(false)) => {
                self.swaps += 1;
                if self.swaps >= MAX_SWAP_ATTEMPTS {
                    Step::Done(Outcome::GaveUp)
                } else {
                    Step::ReadTip
                }
            }
            // An input that does not answer the step: a driver bug, stop rather than guess.
            (step, input) => {
                tracing::error!(?step, ?input, "integration attempt: unexpected input");
                Step::Done(Outcome::GaveUp)
            }
        };
        self.step = next;
        &self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(x: char) -> CommitId {
        CommitId::parse(&x.to_string().repeat(40)).expect("sha")
    }

    fn t(x: char) -> TreeId {
        TreeId::parse(&x.to_string().repeat(40)).expect("sha")
    }

    fn plan(verified_tree: Option<TreeId>, never_build: Option<&str>) -> Plan {
        Plan {
            commit: c('1'),
            parent: c('0'),
            verified_tree,
            never_build: never_build.map(str::to_owned),
        }
    }

    fn tip(x: char) -> Input {
        Input::Tip {
            tip: c(x),
            landed: None,
        }
    }

    #[test]
    fn builds_then_lands() {
        let mut a = Attempt::new(plan(None, None));
        assert_eq!(a.step(), &Step::ReadTip);
        assert_eq!(a.on(tip('a')), &Step::CherryPick { tip: c('a') });
        assert_eq!(
            a.on(Input::Picked(Ok((c('b'), t('e'))))),
            &Step::Build {
                tip: c('a'),
                commit: c('b')
            }
        );
        assert!(matches!(a.on(Input::Built(Ok(()))), Step::Journal { .. }));
        assert!(matches!(a.on(Input::Journaled(true)), Step::Swap { .. }));
        assert_eq!(
            a.on(Input::Swapped(true)),
            &Step::Done(Outcome::Landed {
                commit: c('b'),
                tip: c('a'),
                note: None
            })
        );
    }

    #[test]
    fn skips_the_build_of_the_tree_the_runner_verified_or_when_nothing_is_to_build() {
        for p in [
            plan(Some(t('e')), None),
            plan(None, Some("verification is off")),
        ] {
            let mut a = Attempt::new(p);
            a.on(tip('a'));
            assert!(matches!(
                a.on(Input::Picked(Ok((c('b'), t('e'))))),
                Step::Journal { .. }
            ));
            a.on(Input::Journaled(true));
            let Step::Done(Outcome::Landed { note, .. }) = a.on(Input::Swapped(true)) else {
                panic!("landed")
            };
            assert!(
                note.as_deref()
                    .is_some_and(|n| n.starts_with("build skipped:"))
            );
        }
        // Another tree than the one verified (the base moved) is built.
        let mut a = Attempt::new(plan(Some(t('e')), None));
        a.on(tip('a'));
        assert!(matches!(
            a.on(Input::Picked(Ok((c('b'), t('f'))))),
            Step::Build { .. }
        ));
    }

    #[test]
    fn a_conflict_or_a_red_build_is_the_tasks() {
        let mut a = Attempt::new(plan(None, None));
        a.on(tip('a'));
        assert_eq!(
            a.on(Input::Picked(Err("CONFLICT (content): x".into()))),
            &Step::Done(Outcome::Failed {
                reason: "CONFLICT (content): x".into(),
                tip: c('a')
            })
        );
        let mut a = Attempt::new(plan(None, None));
        a.on(tip('a'));
        a.on(Input::Picked(Ok((c('b'), t('e')))));
        assert!(matches!(
            a.on(Input::Built(Err("tests failed".into()))),
            Step::Done(Outcome::Failed { .. })
        ));
    }

    #[test]
    fn a_base_that_moves_is_read_again_and_a_base_that_keeps_moving_gives_up() {
        let mut a = Attempt::new(plan(Some(t('e')), None));
        for round in 0..MAX_SWAP_ATTEMPTS {
            assert_eq!(a.step(), &Step::ReadTip, "round {round}");
            a.on(tip('a'));
            a.on(Input::Picked(Ok((c('b'), t('e')))));
            a.on(Input::Journaled(true));
            a.on(Input::Swapped(false));
        }
        assert_eq!(a.step(), &Step::Done(Outcome::GaveUp));
    }

    #[test]
    fn a_task_landed_already_or_changed_meanwhile_is_not_landed() {
        let mut a = Attempt::new(plan(None, None));
        assert_eq!(
            a.on(Input::Tip {
                tip: c('a'),
                landed: Some(c('9'))
            }),
            &Step::Done(Outcome::AlreadyLanded { commit: c('9') })
        );
        let mut a = Attempt::new(plan(Some(t('e')), None));
        a.on(tip('a'));
        a.on(Input::Picked(Ok((c('b'), t('e')))));
        assert_eq!(
            a.on(Input::Journaled(false)),
            &Step::Done(Outcome::Abandoned)
        );
    }

    #[test]
    fn an_input_out_of_turn_stops_the_attempt() {
        let mut a = Attempt::new(plan(None, None));
        assert_eq!(a.on(Input::Swapped(true)), &Step::Done(Outcome::GaveUp));
    }
}
