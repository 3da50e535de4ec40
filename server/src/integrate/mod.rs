//! The integrator: lands Verified tasks on the base branch, one at a time, by priority then age,
//! each only once its dependencies are Done. It is the only writer of `refs/heads/<base>`.
//!
//! One task's landing is an [`attempt::Attempt`], a pure state machine this module drives: read
//! the tip (the task may be on it already: the server's own landed record says so), cherry-pick
//! without touching files (a conflict is known here), build only when it can change the outcome,
//! journal the move, push with a lease if `--push-remote` is set, and move the base by
//! compare-and-swap (a base that moved meanwhile is read again, so nothing anyone pushed is
//! lost). A crash after the journal entry is finished or undone by
//! [`Integrator::recover`] at start-up, so a task's commit lands exactly once.

pub mod attempt;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pipeline_core::git::{Merged, RefName};
use pipeline_core::ids::CommitId;
use pipeline_core::verify::{Verdict, Verifier};
use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::domain::{
    FailureKind, FinishedRun, LogLine, LogStream, NewRun, Phase, RunEnd, RunStatus, Task, TaskId,
    TaskStatus,
};
use crate::error::{Error, Result};
use crate::lifecycle::Event;
use crate::store::{Journal, Store};
use attempt::{Attempt, Input, Outcome, Plan, Step};

/// After a failed round (git or database trouble), try again this much later.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// The integrator over a coordinator.
pub struct Integrator<S> {
    coordinator: Arc<Coordinator<S>>,
}

/// Where the integrator's lines for one run go: the task log, numbered.
struct RunLog<'a> {
    logs: &'a crate::logs::LogHub,
    task: TaskId,
    run_id: i64,
    seq: AtomicU64,
    now: &'a (dyn Fn() -> i64 + Sync),
}

impl RunLog<'_> {
    fn line(&self, text: String) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let line = LogLine {
            seq,
            at: (self.now)(),
            stream: LogStream::Server,
            phase: Phase::Integrate,
            text: crate::logs::cut_line(text),
        };
        self.logs
            .append_nowait(self.task.clone(), self.run_id, vec![line]);
    }

    /// Waits until every line so far is stored (the writer works in order).
    async fn flush(&self) {
        let _ = self
            .logs
            .append(self.task.clone(), self.run_id, Vec::new())
            .await;
    }
}

impl<S: Store> Integrator<S> {
    pub fn new(coordinator: Arc<Coordinator<S>>) -> Self {
        Self { coordinator }
    }

    fn c(&self) -> &Coordinator<S> {
        &self.coordinator
    }

    /// Integrates Verified tasks as they come, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.next(&shutdown).await {
                Ok(true) => continue,
                Ok(false) => None,
                Err(err) => {
                    tracing::error!(error = %err, "integration round failed; retrying");
                    Some(RETRY_AFTER_ERROR)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.c().integrator_wakeup().notified() => {}
                () = tokio::time::sleep(pause.unwrap_or(Duration::from_secs(24 * 3600))) => {}
            }
        }
    }

    /// Integrates the first Verified task whose dependencies are Done; false if there is none.
    pub async fn next(&self, shutdown: &CancellationToken) -> Result<bool> {
        for task in self.c().store().verified().await? {
            if task.deps_pending > 0 {
                tracing::info!(task = %task.id, "waiting for its dependencies before integrating");
                continue;
            }
            self.integrate(&task, shutdown).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The base tip to integrate on. With `--push-remote`, the remote's branch is the truth:
    /// it is fetched and the local base fast-forwarded to it.
    async fn base_tip(&self) -> Result<CommitId> {
        let settings = self.c().settings();
        let repo = self.c().repo();
        let base = &settings.base;
        let local = repo.tip(base).await?;
        let Some(remote) = &settings.push_remote else {
            return Ok(local);
        };
        let theirs = repo.fetch_branch(remote, base).await?;
        if theirs == local {
            return Ok(local);
        }
        if repo.is_ancestor(&local, &theirs).await? {
            let name = RefName::branch(base);
            if !repo.compare_and_swap(&name, &theirs, &local).await? {
                return Err(Error::Conflict(format!(
                    "{name} moved while following {}",
                    remote.as_str()
                )));
            }
            return Ok(theirs);
        }
        Err(Error::FailedPrecondition(format!(
            "the base {base} in the repository has commits that {remote} lacks; push them to \
             {remote} or reset {base} to {remote}/{base}",
            remote = remote.as_str()
        )))
    }

    /// Why no build of the task can change the outcome, whatever its tree.
    fn never_build(&self, task: &Task) -> Option<String> {
        match &self.c().settings().verifier {
            Verifier::Off => Some("verification is off (--no-verify)".to_owned()),
            verifier if !verifier.applies_to(task.namespace.as_deref()) => {
                Some("the task has no namespace".to_owned())
            }
            _ => None,
        }
    }

    async fn integrate(&self, task: &Task, shutdown: &CancellationToken) -> Result<()> {
        let c = self.c();
        let id = &task.id;
        let base = c.settings().base.clone();
        let run = NewRun {
            phase: Phase::Integrate,
            patchset: task.state.patchset,
            runner: None,
        };
        let now = || c.now();
        let log = RunLog {
            logs: c.logs(),
            task: id.clone(),
            run_id: c.store().start_run(id, &run, c.now()).await?,
            seq: AtomicU64::new(0),
            now: &now,
        };
        log.line(format!(
            "integrating patchset {} onto {base}",
            task.state.patchset
        ));
        let Some(commit) = task.patch_commit.clone() else {
            return self
                .integration_failed(task, "no commit was recorded for the task".into())
                .await;
        };
        let parent = match c.repo().parents(&commit).await?.as_slice() {
            [p] => p.clone(),
            other => {
                let reason = format!("the commit {commit} has {} parents", other.len());
                return self.integration_failed(task, reason).await;
            }
        };
        let mut attempt = Attempt::new(Plan {
            commit: commit.clone(),
            parent: parent.clone(),
            verified_tree: task.verified_tree.clone(),
            never_build: self.never_build(task),
        });
        loop {
            let input = match attempt.step().clone() {
                Step::ReadTip => {
                    let tip = self.base_tip().await?;
                    let landed = c.repo().landed_on(id, &tip).await?;
                    Input::Tip { tip, landed }
                }
                Step::CherryPick { tip } => {
                    match c.repo().cherry_pick(&parent, &tip, &commit).await? {
                        Merged::Clean(tree) => {
                            let new = c.repo().commit_for_task(&tree, &tip, &commit, id).await?;
                            log.line(format!("cherry-picked onto {base} at {tip} as {new}"));
                            Input::Picked(Ok((new, tree)))
                        }
                        Merged::Conflict(conflict) => Input::Picked(Err(format!(
                            "the commit does not apply to {base} at {tip} (cherry-pick \
                             conflict); redo the task on the current base:\n{conflict}"
                        ))),
                    }
                }
                Step::Build { tip, commit: new } => {
                    let dir = &c.settings().integration_dir;
                    c.repo().checkout_worktree(dir, &new).await?;
                    tracing::info!(task = %id, commit = %new, "building the integrated commit");
                    log.line(format!("building {new} in {}", dir.display()));
                    let mut env = c.settings().build_env.clone();
                    env.extend([
                        ("PIPELINE_TASK_ID".to_owned(), id.to_string()),
                        ("PIPELINE_BASE".to_owned(), base.to_string()),
                        ("PIPELINE_BASE_COMMIT".to_owned(), tip.to_string()),
                    ]);
                    let verdict = pipeline_core::verify::verify(
                        &c.settings().verifier,
                        dir,
                        task.namespace.as_deref(),
                        &env,
                        c.settings().kill_grace,
                        shutdown,
                        |_, line| log.line(line.to_owned()),
                    )
                    .await;
                    match verdict {
                        Verdict::Pass | Verdict::Skipped(_) => {
                            log.line("build passed".to_owned());
                            Input::Built(Ok(()))
                        }
                        Verdict::Cancelled => return Ok(()),
                        Verdict::Infra(why) => {
                            // The server cannot build at all: nobody's commit is to blame.
                            log.line(format!(
                                "the build could not run (not the task's fault): {why}"
                            ));
                            log.flush().await;
                            c.store()
                                .end_run(
                                    log.run_id,
                                    &RunEnd::failure(
                                        why.clone(),
                                        Some(FailureKind::Infrastructure),
                                    ),
                                    c.now(),
                                )
                                .await?;
                            return Err(Error::Internal(format!(
                                "the integration build of task {id} could not run: {why}"
                            )));
                        }
                        Verdict::Fail(why) => {
                            log.line(format!("build failed; {base} stays at {tip}"));
                            Input::Built(Err(format!(
                                "the build of the commit on {base} at {tip} failed: {why}"
                            )))
                        }
                    }
                }
                Step::Journal { tip, commit: new } => {
                    // Journaled only if the task is still this patchset, Verified: it may have
                    // been cancelled while it was being built.
                    let journal = Journal {
                        task_id: id.clone(),
                        old_tip: tip.clone(),
                        new_commit: new.clone(),
                        started_at: c.now(),
                    };
                    let written = c.store().begin_integration(&journal, &commit).await?;
                    if written {
                        // The server's own record of the task's commit, in the repository
                        // itself, so that it outlives the database (a rolled-back or lost
                        // database cannot land it twice).
                        c.repo().record_landing(id, &new).await?;
                    }
                    Input::Journaled(written)
                }
                Step::Swap { tip, commit: new } => {
                    Input::Swapped(self.swap(id, &tip, &new, &log).await?)
                }
                Step::Done(outcome) => return self.finish(task, &commit, outcome, &log).await,
            };
            attempt.on(input);
        }
    }

    /// Pushes (with `--push-remote`) and moves the base from `tip` to `new`; false (and the
    /// journal entry undone) if either moved first.
    async fn swap(
        &self,
        id: &TaskId,
        tip: &CommitId,
        new: &CommitId,
        log: &RunLog<'_>,
    ) -> Result<bool> {
        let c = self.c();
        let base = &c.settings().base;
        if let Some(remote) = &c.settings().push_remote
            && !c.repo().push_with_lease(remote, base, new, tip).await?
        {
            c.store().abort_integration(id).await?;
            let remote = remote.as_str();
            tracing::info!(task = %id, remote, "push rejected: the remote moved; fetching and redoing");
            log.line(format!(
                "push to {remote} rejected: it moved; fetching and redoing"
            ));
            return Ok(false);
        }
        crate::failpoint::abort_at("before-base-update");
        if !c
            .repo()
            .compare_and_swap(&RefName::branch(base), new, tip)
            .await?
        {
            c.store().abort_integration(id).await?;
            tracing::info!(task = %id, "the base moved during the integration; redoing it on the new tip");
            log.line(format!(
                "{base} moved during the integration; redoing it on the new tip"
            ));
            return Ok(false);
        }
        crate::failpoint::abort_at("after-base-update");
        Ok(true)
    }

    /// Records what the attempt came to.
    async fn finish(
        &self,
        task: &Task,
        commit: &CommitId,
        outcome: Outcome,
        log: &RunLog<'_>,
    ) -> Result<()> {
        let base = &self.c().settings().base;
        match outcome {
            Outcome::Landed {
                commit: new, note, ..
            } => {
                tracing::info!(task = %task.id, commit = %new, "landed on {base}");
                if let Some(note) = &note {
                    log.line(note.clone());
                }
                log.line(format!("landed on {base} as {new}"));
                log.flush().await;
                self.integrated(task, commit, None, note).await
            }
            Outcome::AlreadyLanded { commit: landed } => {
                let note = format!("already on {base} as {landed}");
                log.line(note.clone());
                log.flush().await;
                self.integrated(task, commit, None, Some(note)).await
            }
            Outcome::Failed { reason, .. } => {
                log.line(reason.clone());
                log.flush().await;
                self.integration_failed(task, reason).await
            }
            Outcome::Abandoned => {
                tracing::info!(task = %task.id, "task changed during integration; not landing it");
                Ok(())
            }
            Outcome::GaveUp => Err(Error::Conflict(format!(
                "the base kept moving while task {} was being integrated; will try again",
                task.id
            ))),
        }
    }

    /// Records the task Done (and ends its journal entry), ending its running integrate run,
    /// or recording one that started at `recorded_from` (after a restart).
    async fn integrated(
        &self,
        task: &Task,
        commit: &CommitId,
        recorded_from: Option<i64>,
        note: Option<String>,
    ) -> Result<()> {
        let run = recorded_from.map(|started_at| FinishedRun {
            phase: Phase::Integrate,
            patchset: task.state.patchset,
            runner: None,
            status: RunStatus::Success,
            cost_cents: 0.0,
            started_at,
            error: note.clone(),
            failure_kind: None,
        });
        let end = RunEnd::success(0.0, note);
        let commit = commit.clone();
        self.c()
            .transition_from(
                task.clone(),
                &Event::Integrated,
                |t| {
                    if t.patch_commit.as_ref() == Some(&commit) {
                        Ok(())
                    } else {
                        Err(Error::Conflict(format!(
                            "task {} has a newer patchset",
                            t.id
                        )))
                    }
                },
                |_, w| {
                    w.runs.record.extend(run.clone());
                    w.runs.close_rest = Some(end.clone());
                    w.end_integration = true;
                },
            )
            .await
            .map(drop)
    }

    /// Sends the task back to Open with the reason; its next attempt starts from the base.
    async fn integration_failed(&self, task: &Task, reason: String) -> Result<()> {
        tracing::warn!(task = %task.id, "integration failed: {reason}");
        let end = RunEnd::failure(reason.clone(), Some(FailureKind::Task));
        let current = self.c().get(&task.id).await?;
        self.c()
            .transition_from(
                current,
                &Event::IntegrationFailed { reason },
                |_| Ok(()),
                |_, w| {
                    w.runs.close_rest = Some(end.clone());
                    w.next.verified_tree = None;
                    w.end_integration = true;
                },
            )
            .await
            .map(drop)
    }

    /// At start-up: finishes every journaled base move that happened (the task becomes Done)
    /// and forgets the ones that did not (the task is integrated again). Returns how many were
    /// finished.
    pub async fn recover(&self) -> Result<usize> {
        let c = self.c();
        let settings = c.settings();
        c.store()
            .abandon_runs(
                Phase::Integrate,
                "interrupted by a restart of the server",
                c.now(),
            )
            .await?;
        let mut finished = 0;
        for entry in c.store().pending_integrations().await? {
            let landed_on = match &settings.push_remote {
                Some(remote) => c.repo().fetch_branch(remote, &settings.base).await?,
                None => c.repo().tip(&settings.base).await?,
            };
            let landed = c.repo().is_ancestor(&entry.new_commit, &landed_on).await?;
            let task = c.get(&entry.task_id).await?;
            if landed && task.state.status == TaskStatus::Verified {
                if settings.push_remote.is_some() {
                    // Bring the local base along if the crash came between push and update-ref.
                    let local = c.repo().tip(&settings.base).await?;
                    if local == entry.old_tip {
                        c.repo()
                            .compare_and_swap(
                                &RefName::branch(&settings.base),
                                &entry.new_commit,
                                &local,
                            )
                            .await?;
                    }
                }
                let Some(commit) = task.patch_commit.clone() else {
                    continue;
                };
                let note = Some(format!(
                    "landed as {} before a restart; recorded after it",
                    entry.new_commit
                ));
                self.integrated(&task, &commit, Some(entry.started_at), note)
                    .await?;
                tracing::warn!(task = %task.id, "finished an integration interrupted by a restart");
                finished += 1;
            } else {
                c.store().abort_integration(&entry.task_id).await?;
                if !landed {
                    tracing::warn!(task = %task.id, "undid an integration interrupted before the base moved");
                }
            }
        }
        Ok(finished)
    }
}
