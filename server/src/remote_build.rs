//! Train builds on runners (`--remote-builds`): one more [`Builder`] for the integrator, a
//! pool over the connected runners. Each build (a train's tip, a bisection prefix, a base
//! alone) becomes a build job on the coordinator's board ([`crate::coordinator::builds`]),
//! which the dispatch loop hands to a runner with a free slot and the `--build-requires`
//! labels; the runner fetches the exact commit, runs the server's verification in a clean
//! worktree, streams its lines (they go to the build's log, as the server's own would) and
//! says green or red under the server's digest. A runner that cannot build it (a missing
//! program, a git or disk error, its connection or heartbeats lost) ends the job as an
//! infrastructure failure: the build is asked of another runner, and nobody is charged. While
//! no connected runner can take it for `--remote-build-wait` (none with the labels, or all of
//! them drained or unhealthy, or every one already failed it), the server builds it itself,
//! as without `--remote-builds`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::build::LocalBuilder;
use crate::coordinator::Coordinator;
use crate::coordinator::builds::{BuildTicket, RemoteEnd, RemoteJob};
use crate::error::Result;
use crate::ports::{BuildJob, Builder, Built};
use crate::repo::Repo;
use crate::store::Store;

/// How many runners a build is tried on before the server builds it itself.
const MAX_RUNNERS_TRIED: usize = 3;

/// The server's builder: on runners with `--remote-builds`, else (or while no runner can)
/// on this machine.
pub struct ServerBuilder<S> {
    local: LocalBuilder,
    remote: Option<Remote<S>>,
}

/// Where remote builds go, and how long one waits for a runner able to take it.
pub struct Remote<S> {
    pub coordinator: Arc<Coordinator<S, Repo>>,
    /// Labels a runner must have to take a build job (`--build-requires`).
    pub requires: Vec<String>,
    /// `--remote-build-wait`.
    pub wait: Duration,
}

/// Withdraws a build job from the board when its build is no longer waited for (ended, or
/// its future dropped).
struct Withdraw<'a, S: Store> {
    coordinator: &'a Coordinator<S, Repo>,
    id: String,
}

impl<S: Store> Drop for Withdraw<'_, S> {
    fn drop(&mut self) {
        self.coordinator.withdraw_build(&self.id);
    }
}

impl<S: Store> ServerBuilder<S> {
    pub fn new(local: LocalBuilder, remote: Option<Remote<S>>) -> Self {
        Self { local, remote }
    }
}

/// What came of one build job.
enum Attempt {
    Done(Built),
    /// The runner could not build it (why): try another.
    Elsewhere {
        runner: String,
        why: String,
    },
    /// No runner could take it for the whole wait: build it here.
    Here,
}

impl<S: Store> Remote<S> {
    /// Builds `job` on runners; `None` when the server is to build it itself.
    async fn build(
        &self,
        job: &BuildJob,
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Option<Built> {
        let mut avoid: Vec<String> = Vec::new();
        let mut failed = None;
        while avoid.len() < MAX_RUNNERS_TRIED {
            let spec = RemoteJob {
                commit: job.commit.clone(),
                base_commit: job.base_commit.clone(),
                verification: job.verifier.clone(),
                runs: job
                    .runs
                    .iter()
                    .map(|r| (r.namespace.clone(), r.task.clone()))
                    .collect(),
                requires: self.requires.clone(),
                avoid: avoid.clone(),
                failed: failed.clone(),
                wait: self.wait,
            };
            let ticket = self.coordinator.submit_build(spec);
            match self.attempt(ticket, &avoid, shutdown, log).await {
                Attempt::Done(built) => return Some(built),
                Attempt::Elsewhere { runner, why } => {
                    failed = Some(format!("runner {runner} could not: {why}"));
                    avoid.push(runner);
                }
                Attempt::Here => return None,
            }
        }
        log(&format!(
            "{} runners could not build {}; the server builds it",
            avoid.len(),
            job.commit
        ));
        None
    }

    /// Waits for one build job: its lines to `log`, its end.
    async fn attempt(
        &self,
        mut ticket: BuildTicket,
        avoid: &[String],
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Attempt {
        let _withdraw = Withdraw {
            coordinator: &self.coordinator,
            id: ticket.id.clone(),
        };
        let mut deadline = tokio::time::Instant::now() + self.wait;
        let mut told = false;
        loop {
            let unassigned = ticket.assigned.borrow().is_none();
            if !told && let Some(runner) = ticket.assigned.borrow().clone() {
                log(&format!(
                    "building on runner {runner} (build job {})",
                    ticket.id
                ));
                told = true;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Attempt::Done(Built::Cancelled),
                Some(line) = ticket.lines.recv() => log(&line),
                end = &mut ticket.end => {
                    // The lines sent before the end come first.
                    while let Ok(line) = ticket.lines.try_recv() {
                        log(&line);
                    }
                    return match end {
                        Ok(RemoteEnd::Green { runner }) => {
                            log(&format!("built green on runner {runner}"));
                            Attempt::Done(Built::Green)
                        }
                        Ok(RemoteEnd::Red { runner, why }) => {
                            log(&format!("built red on runner {runner}"));
                            Attempt::Done(Built::Red(why))
                        }
                        Ok(RemoteEnd::Infra { runner, why }) => {
                            log(&format!(
                                "runner {runner} could not build it (not a task's fault): {why}; \
                                 building it elsewhere"
                            ));
                            Attempt::Elsewhere { runner, why }
                        }
                        // The board let go of it (it cannot: only a withdraw does).
                        Err(_) => Attempt::Here,
                    };
                }
                _ = ticket.assigned.changed() => {}
                () = tokio::time::sleep_until(deadline), if unassigned => {
                    if self.coordinator.build_capacity(&self.requires, avoid) == 0 {
                        log(&format!(
                            "no runner can build for {} s{}; the server builds it",
                            self.wait.as_secs(),
                            if self.requires.is_empty() {
                                String::new()
                            } else {
                                format!(" (--build-requires {})", self.requires.join(","))
                            }
                        ));
                        return Attempt::Here;
                    }
                    // Runners that can build are busy: it goes to the first free slot.
                    deadline += self.wait;
                }
            }
        }
    }
}

impl<S: Store> Builder for ServerBuilder<S> {
    async fn build(
        &self,
        job: &BuildJob,
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Built> {
        if let Some(remote) = &self.remote
            && !job.runs.is_empty()
            && let Some(built) = remote.build(job, shutdown, log).await
        {
            crate::metrics::metrics().integration_build(match &built {
                Built::Green => "green",
                Built::Red(_) => "red",
                Built::Cancelled => "cancelled",
                Built::NoCheckout(_) => "no_checkout",
            });
            return Ok(built);
        }
        self.local.build(job, shutdown, log).await
    }

    fn site(&self) -> String {
        match &self.remote {
            Some(_) => format!("on runners (else {})", self.local.site()),
            None => self.local.site(),
        }
    }

    fn slots(&self) -> usize {
        let local = self.local.slots();
        match &self.remote {
            Some(r) => local.max(r.coordinator.build_capacity(&r.requires, &[]) as usize),
            None => local,
        }
    }
}
