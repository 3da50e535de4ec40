//! The integrator: lands Verified tasks on the base branch, one at a time, by priority then age,
//! each only once its dependencies are Done. It is the only writer of `refs/heads/<base>`.
//!
//! For a task: start from the base tip; if a commit with the task's `Task-Id:` trailer is
//! already there, the task is Done. Otherwise cherry-pick without touching files
//! (`git merge-tree --write-tree` + `commit-tree`, adding the trailer if missing); a conflict is
//! known here. Build only when it can change the outcome (not when the tree is the one the
//! runner verified), in the integration worktree. Then journal the move, push with a lease if
//! `--push-remote` is set, and move the base by compare-and-swap. If the base moved meanwhile the
//! swap fails and the integration is redone on the new tip, so nothing anyone pushed is lost.
//! A crash after the journal entry is finished or undone by [`Coordinator::recover_integrations`]
//! at start-up, so a task's commit lands exactly once.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::coordinator::{Coordinator, now_ms};
use crate::domain::{LogLine, LogStream, Phase, RunStatus, Task, TaskId, TaskStatus};
use crate::error::{Error, Result};
use crate::lifecycle::Event;
use crate::store::{FinishedRun, Journal, NewRun, RunEnd, Store};

/// Where the integrator's lines for one run go: the task log, numbered.
struct RunLog<'a, S> {
    coordinator: &'a Coordinator<S>,
    task: TaskId,
    run_id: i64,
    seq: AtomicU64,
}

impl<S: Store> RunLog<'_, S> {
    fn line(&self, text: String) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let line = LogLine {
            seq,
            at: now_ms(),
            stream: LogStream::Server,
            phase: Phase::Integrate,
            text: crate::logs::cut_line(text),
        };
        self.coordinator
            .logs
            .append_nowait(self.task.clone(), self.run_id, vec![line]);
    }

    /// Waits until every line so far is stored and published (the writer works in order), so
    /// that a transition published next cannot overtake them.
    async fn flush(&self) {
        let _ = self
            .coordinator
            .logs
            .append(self.task.clone(), self.run_id, Vec::new())
            .await;
    }
}

/// How many times an integration is redone because the base moved under it before giving up
/// for now (it is tried again on the next wake).
const MAX_SWAP_ATTEMPTS: usize = 20;
/// After a failed round (git or database trouble), try again this much later.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Aborts the process at a named point when `PIPELINE_FAILPOINT` names it: the crash-safety
/// tests use it to kill the server at the worst moment.
fn failpoint(name: &str) {
    if std::env::var("PIPELINE_FAILPOINT").is_ok_and(|v| v == name) {
        tracing::error!("failpoint {name}: aborting");
        std::process::abort();
    }
}

impl<S: Store> Coordinator<S> {
    /// Integrates Verified tasks as they come, until `shutdown`.
    pub async fn integrate_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let pause = match self.integrate_next(&shutdown).await {
                Ok(true) => continue,
                Ok(false) => None,
                Err(err) => {
                    tracing::error!(error = %err, "integration round failed; retrying");
                    Some(RETRY_AFTER_ERROR)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.integrate_wake.notified() => {}
                () = tokio::time::sleep(pause.unwrap_or(Duration::from_secs(24 * 3600))) => {}
            }
        }
    }

    /// Integrates the first Verified task whose dependencies are Done; false if there is none.
    pub async fn integrate_next(&self, shutdown: &CancellationToken) -> Result<bool> {
        for task in self.store.list_tasks(Some(TaskStatus::Verified)).await? {
            if !task.depends_on.is_empty() && !self.store.dependencies_done(&task.id).await? {
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
    async fn base_tip(&self) -> Result<String> {
        let base = &self.settings.base;
        let local = self.repo.tip(base).await?;
        let Some(remote) = &self.settings.push_remote else {
            return Ok(local);
        };
        let theirs = self.repo.fetch_branch(remote, base).await?;
        if theirs == local {
            return Ok(local);
        }
        if self.repo.is_ancestor(&local, &theirs).await? {
            let refname = format!("refs/heads/{base}");
            if !self
                .repo
                .compare_and_swap_ref(&refname, &theirs, &local)
                .await?
            {
                return Err(Error::Conflict(format!(
                    "{refname} moved while following {remote}"
                )));
            }
            return Ok(theirs);
        }
        Err(Error::FailedPrecondition(format!(
            "the base {base} in the repository has commits that {remote} lacks; push them to \
             {remote} or reset {base} to {remote}/{base}"
        )))
    }

    /// Why the post-integration build can be skipped, if it can.
    fn build_skip_reason(&self, task: &Task, tree: &str) -> Option<String> {
        let verify = &self.settings.verify;
        if verify.no_verify {
            return Some("verification is off (--no-verify)".to_owned());
        }
        if verify.build_cmd.is_none() && verify.test_cmd.is_none() && task.namespace.is_none() {
            return Some("the task has no namespace".to_owned());
        }
        if task.verified_tree.as_deref() == Some(tree) {
            return Some(
                "the tree is the one the runner verified (the base did not move)".to_owned(),
            );
        }
        None
    }

    async fn integrate(&self, task: &Task, shutdown: &CancellationToken) -> Result<()> {
        let id = &task.id;
        let base = self.settings.base.clone();
        let run = NewRun {
            phase: Phase::Integrate,
            patchset: task.state.patchset,
            runner: None,
        };
        let log = RunLog {
            coordinator: self,
            task: id.clone(),
            run_id: self.store.start_run(id, &run, now_ms()).await?,
            seq: AtomicU64::new(0),
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
        let parent = match self.repo.parents(&commit).await?.as_slice() {
            [p] => p.clone(),
            other => {
                let reason = format!("the commit {commit} has {} parents", other.len());
                return self.integration_failed(task, reason).await;
            }
        };
        for _ in 0..MAX_SWAP_ATTEMPTS {
            let tip = self.base_tip().await?;
            if let Some(landed) = self.repo.landed_on(id.as_str(), &tip).await? {
                let note = format!("already on {base} as {landed}");
                log.line(note.clone());
                log.flush().await;
                return self.integrated(task, &commit, None, Some(note)).await;
            }
            let tree = match self.repo.cherry_pick_tree(&parent, &tip, &commit).await? {
                Ok(tree) => tree,
                Err(conflict) => {
                    let reason = format!(
                        "the commit does not apply to {base} at {tip} (cherry-pick conflict); \
                         redo the task on the current base:\n{conflict}"
                    );
                    log.line(reason.clone());
                    log.flush().await;
                    return self.integration_failed(task, reason).await;
                }
            };
            let new = self
                .repo
                .commit_for_task(&tree, &tip, &commit, id.as_str())
                .await?;
            log.line(format!("cherry-picked onto {base} at {tip} as {new}"));
            let skipped = self.build_skip_reason(task, &tree);
            if let Some(why) = &skipped {
                log.line(format!("build skipped: {why}"));
            } else {
                let dir = &self.settings.integration_dir;
                self.repo.checkout_worktree(dir, &new).await?;
                tracing::info!(task = %id, commit = %new, "building the integrated commit");
                log.line(format!("building {new} in {}", dir.display()));
                let mut env = self.settings.build_env.clone();
                env.extend([
                    ("PIPELINE_TASK_ID".to_owned(), id.to_string()),
                    ("PIPELINE_BASE".to_owned(), base.clone()),
                    ("PIPELINE_BASE_COMMIT".to_owned(), tip.clone()),
                ]);
                let verdict = pipeline_core::verify::verify(
                    &self.settings.verify.verifier(),
                    dir,
                    task.namespace.as_deref(),
                    &env,
                    self.settings.kill_grace,
                    shutdown,
                    |_, line| log.line(line.to_owned()),
                )
                .await;
                use pipeline_core::verify::Verdict;
                match verdict {
                    Verdict::Pass | Verdict::Skipped(_) => log.line("build passed".to_owned()),
                    Verdict::Cancelled => return Ok(()),
                    Verdict::Infra(why) => {
                        // The server cannot build at all: nobody's commit is to blame.
                        log.line(format!(
                            "the build could not run (not the task's fault): {why}"
                        ));
                        log.flush().await;
                        self.store
                            .abandon_runs(Phase::Integrate, &why, now_ms())
                            .await?;
                        return Err(Error::Internal(format!(
                            "the integration build of task {id} could not run: {why}"
                        )));
                    }
                    Verdict::Fail(why) => {
                        let reason =
                            format!("the build of the commit on {base} at {tip} failed: {why}");
                        log.line(format!("build failed; {base} stays at {tip}"));
                        log.flush().await;
                        return self.integration_failed(task, reason).await;
                    }
                }
            }
            // Journaled only if the task is still this patchset, Verified: it may have been
            // cancelled while it was being built.
            let journal = Journal {
                task_id: id.clone(),
                old_tip: tip.clone(),
                new_commit: new.clone(),
                started_at: now_ms(),
            };
            if !self.store.begin_integration(&journal, &commit).await? {
                tracing::info!(task = %id, "task changed during integration; not landing it");
                return Ok(());
            }
            // The server's own record of the task's commit, in the repository itself, so that
            // it outlives the database (a rolled-back or lost database cannot land it twice).
            self.repo.record_landing(id.as_str(), &new).await?;
            if let Some(remote) = &self.settings.push_remote
                && !self.repo.push_with_lease(remote, &base, &new, &tip).await?
            {
                self.store.abort_integration(id).await?;
                tracing::info!(task = %id, remote, "push rejected: the remote moved; fetching and redoing");
                log.line(format!(
                    "push to {remote} rejected: it moved; fetching and redoing"
                ));
                continue;
            }
            failpoint("before-base-update");
            let refname = format!("refs/heads/{base}");
            if !self.repo.compare_and_swap_ref(&refname, &new, &tip).await? {
                self.store.abort_integration(id).await?;
                tracing::info!(task = %id, "the base moved during the integration; redoing it on the new tip");
                log.line(format!(
                    "{base} moved during the integration; redoing it on the new tip"
                ));
                continue;
            }
            failpoint("after-base-update");
            tracing::info!(task = %id, commit = %new, "landed on {base}");
            log.line(format!("landed on {base} as {new}"));
            log.flush().await;
            let note = skipped.map(|why| format!("build skipped: {why}"));
            return self.integrated(task, &commit, None, note).await;
        }
        Err(Error::Conflict(format!(
            "the base kept moving while task {id} was being integrated; will try again"
        )))
    }

    /// Records the task Done (and ends its journal entry), ending its running integrate run,
    /// or recording one that started at `recorded_from` (after a restart).
    async fn integrated(
        &self,
        task: &Task,
        commit: &str,
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
        let end = RunEnd {
            status: RunStatus::Success,
            cost_cents: 0.0,
            error: note,
            failure_kind: None,
        };
        let commit = commit.to_owned();
        self.transition_from(
            task.clone(),
            &Event::Integrated,
            |t| {
                if t.patch_commit.as_deref() == Some(commit.as_str()) {
                    Ok(())
                } else {
                    Err(Error::Conflict(format!(
                        "task {} has a newer patchset",
                        t.id
                    )))
                }
            },
            |_, w| {
                w.record_runs.extend(run.clone());
                w.close_runs = Some(end.clone());
                w.end_integration = true;
            },
        )
        .await
        .map(drop)
    }

    /// Sends the task back to Open with the reason; its next attempt starts from the base.
    async fn integration_failed(&self, task: &Task, reason: String) -> Result<()> {
        tracing::warn!(task = %task.id, "integration failed: {reason}");
        let end = RunEnd {
            status: RunStatus::Failure,
            cost_cents: 0.0,
            error: Some(reason.clone()),
            failure_kind: Some(crate::domain::FailureKind::Task),
        };
        self.transition_with(
            &task.id,
            &Event::IntegrationFailed { reason },
            |_| Ok(()),
            |_, w| {
                w.close_runs = Some(end.clone());
                w.verified_tree = Some(None);
                w.end_integration = true;
            },
        )
        .await
        .map(drop)
    }

    /// At start-up: finishes every journaled base move that happened (the task becomes Done)
    /// and forgets the ones that did not (the task is integrated again). Returns how many were
    /// finished.
    pub async fn recover_integrations(&self) -> Result<usize> {
        self.store
            .abandon_runs(
                Phase::Integrate,
                "interrupted by a restart of the server",
                now_ms(),
            )
            .await?;
        let mut finished = 0;
        for entry in self.store.pending_integrations().await? {
            let landed_on = match &self.settings.push_remote {
                Some(remote) => self.repo.fetch_branch(remote, &self.settings.base).await?,
                None => self.repo.tip(&self.settings.base).await?,
            };
            let landed = self.repo.is_ancestor(&entry.new_commit, &landed_on).await?;
            let task = self.get(&entry.task_id).await?;
            if landed && task.state.status == TaskStatus::Verified {
                if self.settings.push_remote.is_some() {
                    // Bring the local base along if the crash came between push and update-ref.
                    let refname = format!("refs/heads/{}", self.settings.base);
                    let local = self.repo.tip(&self.settings.base).await?;
                    if local == entry.old_tip {
                        self.repo
                            .compare_and_swap_ref(&refname, &entry.new_commit, &local)
                            .await?;
                    }
                }
                let commit = task.patch_commit.clone().unwrap_or_default();
                let note = Some(format!(
                    "landed as {} before a restart; recorded after it",
                    entry.new_commit
                ));
                self.integrated(&task, &commit, Some(entry.started_at), note)
                    .await?;
                tracing::warn!(task = %task.id, "finished an integration interrupted by a restart");
                finished += 1;
            } else {
                self.store.abort_integration(&entry.task_id).await?;
                if !landed {
                    tracing::warn!(task = %task.id, "undid an integration interrupted before the base moved");
                }
            }
        }
        Ok(finished)
    }
}
