//! The integration build on the server's own machine: the middle layer's
//! [`Builder`](crate::ports::Builder) port over the integration worktree. Each build puts the
//! worktree on the commit (clean), empties its temp dir, and runs the verification there, in
//! a sandbox that writes the worktree and the temp dir and reads the repository (its git needs
//! it) but for the other worktrees' state and the server's state dir.

use std::path::PathBuf;

use pipeline_core::git::{BranchName, GitError};
use pipeline_core::ids::CommitId;
use pipeline_core::sandbox::{Policy, Rules, Sandbox};
use pipeline_core::verify::{self, Verdict};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::coordinator::Settings;
use crate::error::{Error, Result};
use crate::ports::{BuildJob, Builder, Built};
use crate::repo::Repo;

/// Builds in the integration worktree, one at a time (the integrator builds one at a time).
pub struct LocalBuilder {
    repo: Repo,
    /// The base branch (`PIPELINE_BASE`).
    base: BranchName,
    /// The integration worktree.
    dir: PathBuf,
    /// The builds' temp dir (their `TMPDIR`, emptied before each build).
    tmp: PathBuf,
    /// The environment builds start from (the allow-listed variables).
    env: Vec<(String, String)>,
    sandbox: Sandbox,
    /// SIGTERM → SIGKILL delay when a build is stopped.
    kill_grace: std::time::Duration,
}

impl LocalBuilder {
    /// Builds in `settings`' integration worktree of `repo`.
    pub fn new(repo: Repo, settings: &Settings) -> Self {
        Self {
            repo,
            base: settings.base.clone(),
            dir: settings.integration_dir.clone(),
            tmp: settings.build_tmp.clone(),
            env: settings.build_env.clone(),
            sandbox: settings.sandbox.clone(),
            kill_grace: settings.kill_grace,
        }
    }

    /// Puts the integration worktree on `commit` and readies what a build there runs with: an
    /// empty temp dir, and its sandbox. `Ok(Err)` when git cannot put the worktree on the
    /// commit for a reason that is not the machine's: git's error, for the caller to judge.
    async fn ready(&self, job: &BuildJob) -> Result<std::result::Result<Option<Policy>, GitError>> {
        let worktree = self.repo.worktree(&self.dir).await?;
        match self.repo.prepare_worktree(&worktree, &job.commit).await {
            Ok(()) => {}
            Err(e) if e.is_infrastructure() => return Err(e.into()),
            Err(e) => return Ok(Err(e)),
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
        std::fs::create_dir_all(&self.tmp).map_err(|e| {
            Error::Internal(format!(
                "cannot create the build's temp dir {}: {e}",
                self.tmp.display()
            ))
        })?;
        let mut own = Rules::default();
        own.own(&self.dir)
            .own(&self.tmp)
            .read(&worktree.common)
            .deny(worktree.common.join("worktrees"))
            .read(&worktree.admin)
            .named_in_all(job.verifier.commands());
        Ok(Ok(self.sandbox.policy(&own)))
    }

    /// A run's environment: the allowed variables, `TMPDIR` the build's own, and the
    /// pipeline's.
    fn env(
        &self,
        task: Option<&pipeline_core::ids::TaskId>,
        base_commit: &CommitId,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| k != "TMPDIR")
            .cloned()
            .collect();
        env.push(("TMPDIR".to_owned(), self.tmp.display().to_string()));
        if let Some(task) = task {
            env.push(("PIPELINE_TASK_ID".to_owned(), task.to_string()));
        }
        env.extend([
            ("PIPELINE_BASE".to_owned(), self.base.to_string()),
            ("PIPELINE_BASE_COMMIT".to_owned(), base_commit.to_string()),
        ]);
        env
    }
}

impl Builder for LocalBuilder {
    async fn build(
        &self,
        job: &BuildJob,
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Built> {
        // The server's own run of a train's build (the `run` step of a task's trace).
        let span = tracing::info_span!("run", phase = "integrate", commit = %job.commit);
        let built = self.build_here(job, shutdown, log).instrument(span).await;
        crate::metrics::metrics().integration_build(match &built {
            Ok(Built::Green) => "green",
            Ok(Built::Red(_)) => "red",
            Ok(Built::Cancelled) => "cancelled",
            Ok(Built::NoCheckout(_)) => "no_checkout",
            Err(_) => "error",
        });
        built
    }

    fn site(&self) -> String {
        format!("in {}", self.dir.display())
    }
}

impl LocalBuilder {
    /// One build, in the integration worktree (counted by [`Builder::build`]).
    async fn build_here(
        &self,
        job: &BuildJob,
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Built> {
        let sandbox = match self.ready(job).await? {
            Ok(sandbox) => sandbox,
            Err(e) => return Ok(Built::NoCheckout(e)),
        };
        for run in &job.runs {
            let env = self.env(run.task.as_ref(), &job.base_commit);
            let verdict = verify::verify(
                &job.verifier,
                &verify::Build {
                    dir: &self.dir,
                    namespace: run.namespace.as_deref(),
                    env: &env,
                    kill_grace: self.kill_grace,
                    sandbox: sandbox.as_ref(),
                },
                shutdown,
                |_, line| log(line),
            )
            .await;
            match verdict {
                Verdict::Pass | Verdict::Skipped(_) => {}
                Verdict::Fail(why) => return Ok(Built::Red(why)),
                Verdict::Cancelled => return Ok(Built::Cancelled),
                Verdict::Infra(why) => {
                    return Err(Error::Internal(format!(
                        "the integration build could not run: {why}"
                    )));
                }
            }
        }
        Ok(Built::Green)
    }
}
