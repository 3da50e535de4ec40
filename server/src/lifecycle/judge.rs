//! The judge of a runner's result: what a lease's outcome means for its task, as the event to
//! apply and how its runs end. Pure: the coordinator receives the commit first (or learns it was
//! refused) and hands the judge what happened.

use super::Event;
use crate::domain::{
    CostSource, FailureKind, FinishedRun, Millis, Phase, RunEnd, RunStatus, Usage,
};
use pipeline_core::ids::{CommitId, TreeId};

/// How a lease ended on the runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The agent failed or left something other than one commit; no commit comes with it.
    DevFailed,
    /// The commit was made but its verification failed.
    VerifyFailed,
    /// The commit passed (or skipped) verification.
    Verified,
}

/// A runner's result for a lease, as it reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerResult {
    pub outcome: Outcome,
    /// The reason, for a failure (with the tail of the failing command's output).
    pub error: Option<String>,
    /// The cost the result's header reports (for runners that send no usage report).
    pub cost_cents: f64,
    /// What the agent used, when the runner says.
    pub usage: Option<Usage>,
    /// Why verification was skipped, when it was.
    pub verify_skipped: Option<String>,
    /// The digest of the verification the runner ran, when it ran one.
    pub verify_digest: Option<String>,
    pub dev_finished_at: Millis,
}

impl RunnerResult {
    /// What the attempt cost: the usage report's cents when it has a cost (reported or
    /// estimated), else the header's.
    pub fn charged_cents(&self) -> f64 {
        match &self.usage {
            Some(u) if u.cost_source != CostSource::None => u.cost_cents,
            _ => self.cost_cents,
        }
    }

    /// The usage report as the dev run keeps it: its cost is the run's.
    fn run_usage(&self) -> Option<Usage> {
        let cost_cents = self.charged_cents();
        self.usage.clone().map(|u| Usage { cost_cents, ..u })
    }
}

/// What became of the commit a result carried.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    /// A dev failure carries none.
    Nothing,
    /// Checked and stored; with its tree when the runner really verified it (not skipped).
    Stored {
        commit: CommitId,
        verified_tree: Option<TreeId>,
    },
    /// Refused, with why (it is not one commit on the leased base, say).
    Refused(String),
}

/// The judgement.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub event: Event,
    /// How the dev run ends.
    pub dev: RunEnd,
    /// The verify run, when there was a verification.
    pub verify: Option<FinishedRun>,
    /// The new patchset's commit, if one was accepted.
    pub patch_commit: Option<CommitId>,
    /// The tree the runner verified, if it really did.
    pub verified_tree: Option<TreeId>,
    /// Why the commit was refused, to tell the runner.
    pub refusal: Option<String>,
}

/// Judges `result`: `received` says what became of its commit, `patchset` is the number the
/// new patchset would get, `runner` who ran it.
/// `server_digest` names the server's own verification: only a pass under it counts as a
/// build of the commit's tree (one the integrator may then skip).
pub fn judge(
    result: &RunnerResult,
    received: Received,
    patchset: u32,
    runner: &str,
    server_digest: &str,
) -> Judgement {
    let cost_cents = result.charged_cents();
    let usage = result.run_usage();
    let task_failure = |reason: String| RunEnd {
        status: RunStatus::Failure,
        cost_cents,
        error: Some(reason),
        failure_kind: Some(FailureKind::Task),
        builds: None,
        usage: usage.clone(),
    };
    let success = || RunEnd {
        usage: usage.clone(),
        ..RunEnd::success(cost_cents, None)
    };
    let (commit, verified_tree) = match received {
        Received::Refused(why) => {
            return Judgement {
                event: Event::DevFailed {
                    reason: why.clone(),
                    cost_cents,
                },
                dev: task_failure(why.clone()),
                verify: None,
                patch_commit: None,
                verified_tree: None,
                refusal: Some(why),
            };
        }
        Received::Nothing => (None, None),
        Received::Stored {
            commit,
            verified_tree,
        } => (Some(commit), verified_tree),
    };
    let verify_run = |status: RunStatus, error: Option<String>| FinishedRun {
        phase: Phase::Verify,
        patchset,
        runner: Some(runner.to_owned()),
        status,
        cost_cents: 0.0,
        started_at: result.dev_finished_at,
        failure_kind: (status == RunStatus::Failure).then_some(FailureKind::Task),
        error,
        train: None,
        builds: None,
    };
    match (result.outcome, commit) {
        (Outcome::DevFailed, _) => {
            let reason = result
                .error
                .clone()
                .unwrap_or_else(|| "the agent failed".to_owned());
            Judgement {
                event: Event::DevFailed {
                    reason: reason.clone(),
                    cost_cents,
                },
                dev: task_failure(reason),
                verify: None,
                patch_commit: None,
                verified_tree: None,
                refusal: None,
            }
        }
        (Outcome::VerifyFailed, Some(commit)) => {
            let reason = result
                .error
                .clone()
                .unwrap_or_else(|| "verification failed".to_owned());
            Judgement {
                event: Event::VerifyFailed {
                    reason: reason.clone(),
                    cost_cents,
                },
                dev: success(),
                verify: Some(verify_run(RunStatus::Failure, Some(reason))),
                patch_commit: Some(commit),
                verified_tree: None,
                refusal: None,
            }
        }
        (Outcome::Verified, Some(commit)) => Judgement {
            event: Event::Verified { cost_cents },
            dev: success(),
            verify: Some(verify_run(
                RunStatus::Success,
                result
                    .verify_skipped
                    .as_ref()
                    .map(|s| format!("skipped: {s}")),
            )),
            patch_commit: Some(commit),
            verified_tree: if result.verify_skipped.is_none()
                && result.verify_digest.as_deref() == Some(server_digest)
            {
                verified_tree
            } else {
                None
            },
            refusal: None,
        },
        // A verified or verify-failed result without a stored commit is refused earlier; if
        // one gets here, it is the runner's fault, counted as a failed attempt.
        (Outcome::VerifyFailed | Outcome::Verified, None) => {
            let why = "commit refused: a verified or verify-failed result needs the commit and \
                       its bundle"
                .to_owned();
            Judgement {
                event: Event::DevFailed {
                    reason: why.clone(),
                    cost_cents,
                },
                dev: task_failure(why.clone()),
                verify: None,
                patch_commit: None,
                verified_tree: None,
                refusal: Some(why),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome, error: Option<&str>, skipped: Option<&str>) -> RunnerResult {
        RunnerResult {
            outcome,
            error: error.map(str::to_owned),
            cost_cents: 7.0,
            usage: None,
            verify_skipped: skipped.map(str::to_owned),
            verify_digest: Some("D".into()),
            dev_finished_at: 500,
        }
    }

    fn commit() -> CommitId {
        CommitId::parse(&"c".repeat(40)).expect("sha")
    }

    fn tree() -> TreeId {
        TreeId::parse(&"e".repeat(40)).expect("sha")
    }

    fn stored() -> Received {
        Received::Stored {
            commit: commit(),
            verified_tree: Some(tree()),
        }
    }

    #[test]
    fn a_dev_failure_is_the_tasks_with_its_reason_and_cost() {
        let j = judge(
            &result(Outcome::DevFailed, Some("agent exited 1"), None),
            Received::Nothing,
            1,
            "r",
            "D",
        );
        assert_eq!(
            j.event,
            Event::DevFailed {
                reason: "agent exited 1".into(),
                cost_cents: 7.0
            }
        );
        assert_eq!(j.dev.status, RunStatus::Failure);
        assert_eq!(j.dev.failure_kind, Some(FailureKind::Task));
        assert_eq!(j.dev.cost_cents, 7.0);
        assert!(j.verify.is_none() && j.patch_commit.is_none() && j.refusal.is_none());
    }

    #[test]
    fn a_verify_failure_keeps_the_commit_and_records_the_verify_run() {
        let j = judge(
            &result(Outcome::VerifyFailed, Some("tests failed"), None),
            stored(),
            3,
            "r",
            "D",
        );
        assert!(matches!(j.event, Event::VerifyFailed { .. }));
        assert_eq!(j.dev.status, RunStatus::Success, "the agent did its part");
        let v = j.verify.expect("verify run");
        assert_eq!(
            (v.status, v.patchset, v.started_at),
            (RunStatus::Failure, 3, 500)
        );
        assert_eq!(v.failure_kind, Some(FailureKind::Task));
        assert_eq!(j.patch_commit, Some(commit()));
        assert_eq!(j.verified_tree, None);
    }

    #[test]
    fn a_pass_remembers_the_tree_only_when_really_verified() {
        let j = judge(
            &result(Outcome::Verified, None, None),
            stored(),
            1,
            "r",
            "D",
        );
        assert_eq!(j.event, Event::Verified { cost_cents: 7.0 });
        assert_eq!(j.verified_tree, Some(tree()));
        assert_eq!(j.verify.map(|v| v.status), Some(RunStatus::Success));
        let j = judge(
            &result(Outcome::Verified, None, Some("the task has no namespace")),
            stored(),
            1,
            "r",
            "D",
        );
        assert_eq!(j.verified_tree, None, "skipped is not verified");
        assert_eq!(
            j.verify.and_then(|v| v.error).as_deref(),
            Some("skipped: the task has no namespace")
        );
        // A pass under another verification (the runner's own commands, an older runner
        // without a digest) is no build of the tree for the server.
        for digest in [Some("E"), None] {
            let mut r = result(Outcome::Verified, None, None);
            r.verify_digest = digest.map(str::to_owned);
            let j = judge(&r, stored(), 1, "r", "D");
            assert_eq!(j.event, Event::Verified { cost_cents: 7.0 });
            assert_eq!(j.verified_tree, None, "{digest:?}");
        }
    }

    fn usage(cost_cents: f64, cost_source: CostSource) -> Usage {
        Usage {
            agent: "claude".into(),
            model: None,
            input_tokens: 10,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 5,
            reasoning_tokens: 0,
            cost_cents,
            cost_source,
            complete: true,
            session_id: Some("s".into()),
        }
    }

    #[test]
    fn the_usage_report_names_the_cost_and_goes_with_the_dev_run() {
        for (outcome, received) in [
            (Outcome::DevFailed, Received::Nothing),
            (Outcome::VerifyFailed, stored()),
            (Outcome::Verified, stored()),
            (Outcome::Verified, Received::Refused("two commits".into())),
        ] {
            let mut r = result(outcome, None, None);
            r.usage = Some(usage(30.0, CostSource::Reported));
            let j = judge(&r, received, 1, "r", "D");
            assert_eq!(
                j.dev.cost_cents, 30.0,
                "{outcome:?}: the report's, not the header's"
            );
            assert_eq!(j.dev.usage, r.usage, "{outcome:?}");
            let charged = match j.event {
                Event::DevFailed { cost_cents, .. }
                | Event::VerifyFailed { cost_cents, .. }
                | Event::Verified { cost_cents } => cost_cents,
                other => panic!("{other:?}"),
            };
            assert_eq!(charged, 30.0, "{outcome:?}");
            assert!(j.verify.is_none_or(|v| v.cost_cents == 0.0));
        }
        // A report without a cost leaves the header's, and keeps it as the run's.
        let mut r = result(Outcome::DevFailed, None, None);
        r.usage = Some(usage(0.0, CostSource::None));
        let j = judge(&r, Received::Nothing, 1, "r", "D");
        assert_eq!(j.dev.cost_cents, 7.0);
        assert_eq!(j.dev.usage.map(|u| u.cost_cents), Some(7.0));
        // An estimate is a cost.
        r.usage = Some(usage(2.5, CostSource::Estimated));
        assert_eq!(r.charged_cents(), 2.5);
        r.usage = None;
        assert_eq!(r.charged_cents(), 7.0);
        let j = judge(&r, Received::Nothing, 1, "r", "D");
        assert_eq!((j.dev.cost_cents, j.dev.usage), (7.0, None));
    }

    #[test]
    fn a_refused_commit_fails_the_attempt_and_says_why() {
        for outcome in [Outcome::Verified, Outcome::VerifyFailed] {
            let j = judge(
                &result(outcome, None, None),
                Received::Refused("commit refused: two commits".into()),
                1,
                "r",
                "D",
            );
            assert!(matches!(j.event, Event::DevFailed { .. }));
            assert_eq!(j.refusal.as_deref(), Some("commit refused: two commits"));
            assert!(j.patch_commit.is_none() && j.verify.is_none());
        }
        let j = judge(
            &result(Outcome::Verified, None, None),
            Received::Nothing,
            1,
            "r",
            "D",
        );
        assert!(j.refusal.is_some_and(|r| r.contains("needs the commit")));
    }
}
