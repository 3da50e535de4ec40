//! The integration build on the server's own machine: the middle layer's
//! [`Builder`](crate::ports::Builder) port over the integration worktrees, one per build slot
//! (`--build-slots`: `integration` and `build-tmp` in the state dir, then `integration-2`,
//! `build-tmp-2`, …). Each build takes a free slot (or waits for one), puts its worktree on
//! the commit (clean), empties its temp dir, and runs the verification there, in a sandbox
//! that writes the worktree and the temp dir and reads the repository (its git needs it) but
//! for the other worktrees' state and the server's state dir.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Where one build slot builds.
struct Site {
    /// Its integration worktree.
    dir: PathBuf,
    /// Its builds' temp dir (their `TMPDIR`, emptied before each build).
    tmp: PathBuf,
}

/// Builds in the integration worktrees, one build per slot at a time.
pub struct LocalBuilder {
    repo: Repo,
    /// The base branch (`PIPELINE_BASE`).
    base: BranchName,
    sites: Vec<Site>,
    /// The slots free now (indexes into `sites`), and a permit for each.
    free: Mutex<Vec<usize>>,
    permits: tokio::sync::Semaphore,
    /// The environment builds start from (the allow-listed variables).
    env: Vec<(String, String)>,
    sandbox: Sandbox,
    /// SIGTERM → SIGKILL delay when a build is stopped.
    kill_grace: std::time::Duration,
}

/// A build slot taken: given back when dropped.
struct Taken<'a> {
    free: &'a Mutex<Vec<usize>>,
    slot: usize,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.free.lock() {
            free.push(self.slot);
        }
    }
}

/// The name of build slot `slot`'s dir beside `first` (slot 0's): `first` itself, then
/// `first-2`, `first-3`, …
pub fn slot_dir(first: &Path, slot: usize) -> PathBuf {
    match slot {
        0 => first.to_path_buf(),
        n => {
            let mut name = first.file_name().unwrap_or_default().to_os_string();
            name.push(format!("-{}", n + 1));
            first.with_file_name(name)
        }
    }
}

impl LocalBuilder {
    /// Builds in `settings`' integration worktree of `repo`, and `slots - 1` more beside it.
    pub fn new(repo: Repo, settings: &Settings, slots: usize) -> Self {
        let slots = slots.max(1);
        Self {
            repo,
            base: settings.base.clone(),
            sites: (0..slots)
                .map(|i| Site {
                    dir: slot_dir(&settings.integration_dir, i),
                    tmp: slot_dir(&settings.build_tmp, i),
                })
                .collect(),
            free: Mutex::new((0..slots).rev().collect()),
            permits: tokio::sync::Semaphore::new(slots),
            env: settings.build_env.clone(),
            sandbox: settings.sandbox.clone(),
            kill_grace: settings.kill_grace,
        }
    }

    /// Puts the slot's worktree on `commit` and readies what a build there runs with: an
    /// empty temp dir, and its sandbox. `Ok(Err)` when git cannot put the worktree on the
    /// commit for a reason that is not the machine's: git's error, for the caller to judge.
    async fn ready(
        &self,
        site: &Site,
        job: &BuildJob,
    ) -> Result<std::result::Result<Option<Policy>, GitError>> {
        let worktree = self.repo.worktree(&site.dir).await?;
        match self.repo.prepare_worktree(&worktree, &job.commit).await {
            Ok(()) => {}
            Err(e) if e.is_infrastructure() => return Err(e.into()),
            Err(e) => return Ok(Err(e)),
        }
        let _ = std::fs::remove_dir_all(&site.tmp);
        std::fs::create_dir_all(&site.tmp).map_err(|e| {
            Error::Internal(format!(
                "cannot create the build's temp dir {}: {e}",
                site.tmp.display()
            ))
        })?;
        let mut own = Rules::default();
        own.own(&site.dir)
            .own(&site.tmp)
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
        site: &Site,
        task: Option<&pipeline_core::ids::TaskId>,
        base_commit: &CommitId,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| k != "TMPDIR")
            .cloned()
            .collect();
        env.push(("TMPDIR".to_owned(), site.tmp.display().to_string()));
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
        match self.sites.as_slice() {
            [one] => format!("in {}", one.dir.display()),
            [first, ..] => format!(
                "in {} (or one of the {} build slots beside it)",
                first.dir.display(),
                self.sites.len()
            ),
            [] => "nowhere".to_owned(),
        }
    }

    fn slots(&self) -> usize {
        self.sites.len()
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
        let Ok(_permit) = self.permits.acquire().await else {
            return Ok(Built::Cancelled);
        };
        let slot = self
            .free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .ok_or_else(|| Error::Internal("no free build slot under a permit".to_owned()))?;
        // The slot is free again however the build ends (a dropped future included).
        let _taken = Taken {
            free: &self.free,
            slot,
        };
        self.build_in(&self.sites[slot], job, shutdown, log).await
    }

    /// One build in `site`.
    async fn build_in(
        &self,
        site: &Site,
        job: &BuildJob,
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Built> {
        let sandbox = match self.ready(site, job).await? {
            Ok(sandbox) => sandbox,
            Err(e) => return Ok(Built::NoCheckout(e)),
        };
        for run in &job.runs {
            let env = self.env(site, run.task.as_ref(), &job.base_commit);
            let verdict = verify::verify(
                &job.verifier,
                &verify::Build {
                    dir: &site.dir,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_build_slot_has_dirs_of_its_own_beside_the_first() {
        let first = Path::new("/state/integration");
        assert_eq!(slot_dir(first, 0), first);
        assert_eq!(slot_dir(first, 1), Path::new("/state/integration-2"));
        assert_eq!(
            slot_dir(Path::new("/state/build-tmp"), 7),
            Path::new("/state/build-tmp-8")
        );
    }
}
