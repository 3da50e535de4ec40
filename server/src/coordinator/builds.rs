//! Train builds on runners (`--remote-builds`): the board of build jobs, their fence, and the
//! runner side of them (a commit to fetch, log lines, a result).
//!
//! A build job is submitted by the builder the integrator uses (`remote_build.rs`) and waits
//! on the board until the dispatch loop hands it to a runner with a free slot and the build's
//! labels, before any new dev work in the same round (a build unblocks many tasks). It is then
//! live in the registry beside the leases, fenced as they are: an ID, an epoch (the server's
//! start, so a job of an earlier run of the server is never taken for one of this run),
//! renewed by the runner's heartbeats, and lost when the runner's work stream ends, it is
//! drained or revoked, or its heartbeats lapse. A lost job ends as an infrastructure failure,
//! which the builder retries on another runner (nobody is charged); the runner's late answer
//! is refused with one line. Nothing of a build job is stored: a restarted server forms its
//! trains again (the train journal is what survives), and their builds are new jobs.

use std::collections::{HashMap, VecDeque};

use pipeline_core::ids::{CommitId, TaskId};
use pipeline_core::verify::Verifier;
use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::{LogLine, Millis};
use crate::error::{Error, Result};
use crate::ports::Repository;
use crate::scheduler::registry::{BuildAssignment, LeaseRef, LiveBuild, Push};
use crate::store::Store;

use super::Coordinator;

/// A build to run on a runner.
#[derive(Clone, Debug)]
pub struct RemoteJob {
    pub commit: CommitId,
    pub base_commit: CommitId,
    pub verification: Verifier,
    /// (namespace, task) of each run, in order.
    pub runs: Vec<(Option<String>, Option<TaskId>)>,
    /// Labels the runner must have (`--build-requires`).
    pub requires: Vec<String>,
    /// Runners (by name) not to hand it to: they failed it.
    pub avoid: Vec<String>,
    /// Why the last of them could not build it (`runner NAME could not: WHY`), for `queue`
    /// to say when none left can take it.
    pub failed: Option<String>,
    /// How long it waits while no connected runner can take it before the server builds it
    /// itself (`--remote-build-wait`), for `queue` to say.
    pub wait: std::time::Duration,
}

/// A build job not yet handed to a runner, as `queue` tells it.
#[derive(Clone, Debug)]
pub(crate) struct WaitingBuild {
    /// The tasks it is built for.
    pub tasks: Vec<TaskId>,
    /// The labels a runner needs to take it (`--build-requires`).
    pub requires: Vec<String>,
    pub wait: std::time::Duration,
    /// Whether a connected runner may take it (its slots are busy); else none can.
    pub able: bool,
    /// Why the last runner that had it could not build it ([`RemoteJob::failed`]).
    pub failed: Option<String>,
}

/// How a build job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteEnd {
    /// Every run passed on `runner`.
    Green { runner: String },
    /// A run failed on `runner`: why, with the tail of its output.
    Red { runner: String, why: String },
    /// `runner` could not build it (a missing program, a git or disk error, a lost runner):
    /// nobody's fault; build it elsewhere.
    Infra { runner: String, why: String },
}

/// A submitted build job: its lines and its end as they come. Withdraw it
/// ([`Coordinator::withdraw_build`]) when no longer waited for.
pub struct BuildTicket {
    pub id: String,
    pub lines: mpsc::UnboundedReceiver<String>,
    pub end: oneshot::Receiver<RemoteEnd>,
    /// The runner it runs on, once handed out.
    pub assigned: watch::Receiver<Option<String>>,
}

/// A build job on the board.
struct Job {
    /// Its number (its ref, `refs/pipeline/builds/<n>`).
    n: u64,
    spec: RemoteJob,
    end: Option<oneshot::Sender<RemoteEnd>>,
    lines: mpsc::UnboundedSender<String>,
    assigned: watch::Sender<Option<String>>,
}

/// The build jobs submitted and not ended.
#[derive(Default)]
pub(crate) struct BuildBoard {
    next: u64,
    /// Jobs not yet handed out, oldest first.
    waiting: VecDeque<String>,
    jobs: HashMap<String, Job>,
}

/// The one line a runner is told when it answers for a build job it no longer holds.
fn refused(build: &LeaseRef, why: impl std::fmt::Display) -> Error {
    Error::FailedPrecondition(format!(
        "build job {} (epoch {}) is no longer yours: {why}; drop it",
        build.id, build.epoch
    ))
}

impl<S: Store, R: Repository> Coordinator<S, R> {
    fn board(&self) -> std::sync::MutexGuard<'_, BuildBoard> {
        self.builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a build job on the board; the dispatch loop hands it to a runner.
    pub fn submit_build(&self, spec: RemoteJob) -> BuildTicket {
        let (end_tx, end) = oneshot::channel();
        let (lines_tx, lines) = mpsc::unbounded_channel();
        let (assigned_tx, assigned) = watch::channel(None);
        let id = {
            let mut board = self.board();
            board.next += 1;
            let n = board.next;
            let id = format!("build-{n}");
            board.jobs.insert(
                id.clone(),
                Job {
                    n,
                    spec,
                    end: Some(end_tx),
                    lines: lines_tx,
                    assigned: assigned_tx,
                },
            );
            board.waiting.push_back(id.clone());
            id
        };
        self.build_wake.notify_one();
        BuildTicket {
            id,
            lines,
            end,
            assigned,
        }
    }

    /// The build jobs running on runners now: each one's runner (by name) and the tasks it
    /// is built for, so that `queue` can say which runners build which train.
    pub(crate) fn live_build_runners(&self) -> Vec<(String, Vec<TaskId>)> {
        let board = self.board();
        let registry = self.registry();
        board
            .jobs
            .iter()
            .filter(|(id, _)| registry.is_build(id))
            .filter_map(|(_, job)| {
                let runner = job.assigned.borrow().clone()?;
                let tasks = job
                    .spec
                    .runs
                    .iter()
                    .filter_map(|(_, t)| t.clone())
                    .collect();
                Some((runner, tasks))
            })
            .collect()
    }

    /// The build jobs waiting for a runner, oldest first: what each is built for, and whether
    /// a connected runner could take it, so that `queue` can say why a train's build has not
    /// started.
    pub(crate) fn waiting_builds(&self) -> Vec<WaitingBuild> {
        let specs: Vec<RemoteJob> = {
            let board = self.board();
            board
                .waiting
                .iter()
                .filter_map(|id| board.jobs.get(id))
                .map(|job| job.spec.clone())
                .collect()
        };
        let registry = self.registry();
        specs
            .into_iter()
            .map(|spec| WaitingBuild {
                able: registry.build_capacity(&spec.requires, &spec.avoid) > 0,
                tasks: spec.runs.iter().filter_map(|(_, t)| t.clone()).collect(),
                requires: spec.requires,
                wait: spec.wait,
                failed: spec.failed,
            })
            .collect()
    }

    /// Takes a build job off the board (its builder no longer waits for it); a runner that
    /// runs it is told to stop.
    pub fn withdraw_build(&self, id: &str) {
        {
            let mut board = self.board();
            board.waiting.retain(|w| w != id);
            board.jobs.remove(id);
        }
        let mut registry = self.registry();
        if let Some(live) = registry.remove_build(id) {
            registry.push(
                &live.runner_id,
                Push::Cancel(LeaseRef {
                    id: id.to_owned(),
                    epoch: live.epoch,
                }),
            );
            drop(registry);
            self.build_wake.notify_one();
        }
    }

    /// The slots of the connected runners that may take a build job needing `requires`
    /// (busy or not), less those named in `avoid`: 0 when no runner can build it.
    pub fn build_capacity(&self, requires: &[String], avoid: &[String]) -> u32 {
        self.registry().build_capacity(requires, avoid)
    }

    /// Wakes the dispatch loop (a build job waits, or one ended and freed a slot).
    pub(crate) fn build_woken(&self) -> &tokio::sync::Notify {
        &self.build_wake
    }

    /// Hands the waiting build jobs to runners with free slots (called by the dispatch loop
    /// first in each round: builds go before new dev work), and ends the build jobs whose
    /// runners' heartbeats lapsed. Returns when the next build job expires.
    pub(crate) fn assign_builds(&self) -> Option<Millis> {
        let now = self.now();
        let expired = self.registry().expired_builds(now);
        for id in expired {
            let ttl = self.settings.lease_ttl_ms / 1000;
            self.end_build_lost(&id, |runner| {
                format!("runner {runner} sent no heartbeat for {ttl} s")
            });
        }
        let mut board = self.board();
        let mut registry = self.registry();
        let waiting: Vec<String> = board.waiting.iter().cloned().collect();
        for id in waiting {
            let Some(job) = board.jobs.get(&id) else {
                continue;
            };
            let Some(runner_id) = registry
                .build_slots(&job.spec.requires, &job.spec.avoid)
                .into_iter()
                .next()
            else {
                continue;
            };
            let Some(runner) = registry.runner(&runner_id).map(|r| r.name.clone()) else {
                continue;
            };
            let build = LeaseRef {
                id: id.clone(),
                epoch: self.build_epoch,
            };
            let assignment = BuildAssignment {
                build: build.clone(),
                commit: job.spec.commit.clone(),
                base: self.settings.base.to_string(),
                base_commit: job.spec.base_commit.clone(),
                verification: job.spec.verification.clone(),
                runs: job.spec.runs.clone(),
            };
            registry.add_build(
                id.clone(),
                LiveBuild {
                    epoch: self.build_epoch,
                    runner_id: runner_id.clone(),
                    runner: runner.clone(),
                    commit: job.spec.commit.clone(),
                    expires_at: now + self.settings.lease_ttl_ms,
                },
            );
            if !registry.push(&runner_id, Push::Build(Box::new(assignment))) {
                // Its stream is gone or full: the job waits for the next round.
                registry.remove_build(&id);
                continue;
            }
            tracing::info!(build = %id, %runner, commit = %job.spec.commit, "build job handed out");
            let _ = job.assigned.send(Some(runner));
            board.waiting.retain(|w| w != &id);
        }
        registry.next_build_expiry()
    }

    /// Ends a live build job as lost (its runner went away or lapsed): an infrastructure
    /// failure, retried elsewhere by its builder.
    fn end_build_lost(&self, id: &str, why: impl FnOnce(&str) -> String) {
        let Some(live) = self.registry().remove_build(id) else {
            return;
        };
        let why = why(&live.runner);
        tracing::warn!(build = %id, runner = %live.runner, "build job lost: {why}");
        self.registry().push(
            &live.runner_id,
            Push::Cancel(LeaseRef {
                id: id.to_owned(),
                epoch: live.epoch,
            }),
        );
        self.end_build(
            id,
            RemoteEnd::Infra {
                runner: live.runner,
                why,
            },
        );
    }

    /// Sends a build job's end to its builder.
    fn end_build(&self, id: &str, end: RemoteEnd) {
        let job = self.board().jobs.remove(id);
        if let Some(mut job) = job
            && let Some(tx) = job.end.take()
        {
            let _ = tx.send(end);
        }
        self.build_wake.notify_one();
    }

    /// The build jobs of runner `runner_id` are lost (its work stream ended, it was drained
    /// or revoked): each is built elsewhere.
    pub(crate) fn lose_builds_of(&self, runner_id: &str, why: &str) {
        let ids = self.registry().builds_of(runner_id);
        for id in ids {
            self.end_build_lost(&id, |runner| format!("runner {runner} {why}"));
        }
    }

    /// Checks that `build` is live and `runner_id`'s; returns its number and commit, for the
    /// bundle the runner fetches.
    pub fn check_build(&self, runner_id: &str, build: &LeaseRef) -> Result<(u64, CommitId)> {
        let commit = {
            let registry = self.registry();
            if registry.runner(runner_id).is_none() {
                return Err(super::runners::unregistered(runner_id));
            }
            registry
                .check_build(runner_id, build, self.now())
                .map_err(|why| refused(build, why))?
                .commit
                .clone()
        };
        let n = self
            .board()
            .jobs
            .get(&build.id)
            .map(|j| j.n)
            .ok_or_else(|| refused(build, "nobody waits for it now"))?;
        Ok((n, commit))
    }

    /// A build job's log lines (the runner's), for its builder; returns the highest seq.
    pub fn build_lines(
        &self,
        runner_id: &str,
        build: &LeaseRef,
        lines: Vec<LogLine>,
    ) -> Result<u64> {
        self.check_build(runner_id, build)?;
        let top = lines.iter().map(|l| l.seq).max().unwrap_or(0);
        let board = self.board();
        if let Some(job) = board.jobs.get(&build.id) {
            for line in lines {
                let _ = job.lines.send(crate::logs::cut_line(line.text));
            }
        }
        Ok(top)
    }

    /// A runner's result for a build job: refused unless the runner holds it now; a pass
    /// counts only under this server's verification digest.
    pub fn complete_build(
        &self,
        runner_id: &str,
        build: &LeaseRef,
        result: BuildResult,
    ) -> Result<()> {
        self.check_build(runner_id, build)?;
        let live = self
            .registry()
            .remove_build(&build.id)
            .ok_or_else(|| refused(build, "it is not live"))?;
        let runner = live.runner;
        let end = match result {
            BuildResult::Green { digest } if digest.as_deref() == Some(&self.verify_digest) => {
                RemoteEnd::Green { runner }
            }
            BuildResult::Green { digest } => RemoteEnd::Infra {
                why: format!(
                    "runner {runner} ran another verification (digest {}, not the server's {})",
                    digest.as_deref().unwrap_or("none"),
                    self.verify_digest
                ),
                runner,
            },
            BuildResult::Red { why, digest } if digest.as_deref() == Some(&self.verify_digest) => {
                RemoteEnd::Red { runner, why }
            }
            BuildResult::Red { digest, .. } => RemoteEnd::Infra {
                why: format!(
                    "runner {runner} ran another verification (digest {}, not the server's {})",
                    digest.as_deref().unwrap_or("none"),
                    self.verify_digest
                ),
                runner,
            },
            BuildResult::Infra { why } => RemoteEnd::Infra { runner, why },
        };
        tracing::info!(build = %build.id, ?end, "build job ended");
        self.end_build(&build.id, end);
        Ok(())
    }
}

/// What a runner says of a build job.
#[derive(Clone, Debug)]
pub enum BuildResult {
    Green { digest: Option<String> },
    Red { why: String, digest: Option<String> },
    Infra { why: String },
}
