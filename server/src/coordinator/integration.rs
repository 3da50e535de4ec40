//! What the integrator asks of the coordinator, as everything else does: the Verified tasks,
//! the runs the server itself runs (an integrate run per task of a train, a verify run for a
//! base built alone), a train's life (formed, each step, ended), the journal of base moves,
//! and what landing knows (the red base, the trees built green). Each is the one place it
//! happens: the store is written first, then memory (`Landing`) follows; the change feed's
//! train and landing entries belong here.

use pipeline_core::ids::{CommitId, TreeId};

use crate::domain::{Millis, NewRun, Phase, RunEnd, Task, TaskId};
use crate::error::Result;
use crate::feed::{NewEntry, Topic};
use crate::landing::{Green, RedBase, TrainView};
use crate::ports::Repository;
use crate::store::{Journal, Store, TrainEnd, TrainStat};

use super::Coordinator;

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// The Verified tasks, in landing order (priority, then age).
    pub async fn verified_tasks(&self) -> Result<Vec<Task>> {
        self.store.verified().await
    }

    /// Starts a run the server runs itself for `task` (no runner): `phase` is `Integrate` for a
    /// train's member, `Verify` for a build of its base alone. Returns the run's ID.
    pub async fn start_server_run(
        &self,
        task: &Task,
        phase: Phase,
        train: Option<i64>,
    ) -> Result<i64> {
        let run = NewRun {
            phase,
            patchset: task.state.patchset,
            runner: None,
            train,
        };
        let at = self.now();
        let id = self.store.start_run(&task.id, &run, at).await?;
        self.run_clocks().start(id, &task.id, phase, at);
        Ok(id)
    }

    /// Ends a server run that leaves its task as it is (a train member that waits for the next
    /// train, a build the server could not finish).
    pub async fn end_server_run(&self, run: i64, end: &RunEnd) -> Result<()> {
        let at = self.now();
        self.store.end_run(run, end, at).await?;
        // Counted as a committed write's runs are (`Coordinator::count`); one begun before a
        // restart was ended by it, so every run ended here was started by this process.
        if let Some((_, phase, started)) = self.run_clocks().end(run) {
            crate::metrics::metrics().run_ended(
                phase.as_str(),
                super::run_outcome(end.status, end.failure_kind, false),
                Some((at - started).max(0) as f64 / 1000.0),
            );
        }
        Ok(())
    }

    /// At start-up: the server's own runs a crash interrupted (integrate and verify) end.
    pub async fn abandon_server_runs(&self) -> Result<()> {
        for phase in [Phase::Integrate, Phase::Verify] {
            self.store
                .abandon_runs(phase, "interrupted by a restart of the server", self.now())
                .await?;
        }
        Ok(())
    }

    /// Forms a train of `members` on the base tip `tip` (or, `ahead`, on the tip of that train
    /// in flight, as if it had landed): recorded, an integrate run started for each member,
    /// and shown behind the trains in flight (`queue`). Returns the train's ID and the
    /// members' run IDs, in order.
    pub async fn start_train(
        &self,
        tip: &CommitId,
        members: &[Task],
        ahead: Option<i64>,
    ) -> Result<(i64, Vec<i64>)> {
        let ids: Vec<TaskId> = members.iter().map(|t| t.id.clone()).collect();
        let train = self.store.start_train(tip, &ids, self.now()).await?;
        let mut runs = Vec::with_capacity(members.len());
        for task in members {
            runs.push(
                self.start_server_run(task, Phase::Integrate, Some(train))
                    .await?,
            );
        }
        let mut landing = self.landing();
        // The train ahead may have ended meanwhile: then this one is not built on it.
        let ahead = ahead.filter(|a| landing.trains.iter().any(|t| t.id == *a));
        landing.train_formed(TrainView {
            id: train,
            tasks: ids,
            step: "cherry-picking".to_owned(),
            ahead,
            runners: Vec::new(),
        });
        Ok((train, runs))
    }

    /// What a train in flight is doing, in a few words ("building prefix 2 of 4", "landing"):
    /// shown in `queue`, and a `step` entry of the feed (in a transaction of its own: the step
    /// lives in memory only; one that cannot be written is only logged, the train goes on).
    pub async fn train_step(&self, train: i64, step: String) {
        let in_flight = {
            let mut landing = self.landing();
            match landing.trains.iter_mut().find(|t| t.id == train) {
                Some(view) => {
                    view.step = step.clone();
                    true
                }
                None => false,
            }
        };
        if in_flight {
            let entry = NewEntry::new(
                Topic::Train,
                train.to_string(),
                "step",
                self.now(),
                format!("train {train}: {step}"),
                serde_json::json!({ "id": train, "step": step }),
            );
            if let Err(e) = self.store.record(&entry).await {
                tracing::warn!(train, "cannot record the train's step in the feed: {e}");
            }
        }
    }

    /// The train is over: no longer shown in flight; with its `end`, recorded and counted in
    /// the last hour's trains. Without one the server is stopping mid-train: the train is
    /// formed again after the restart.
    pub async fn end_train(
        &self,
        train: i64,
        started_at: Millis,
        end: Option<&TrainEnd>,
    ) -> Result<()> {
        self.landing().train_over(train);
        let Some(end) = end else {
            return Ok(());
        };
        let now = self.now();
        self.store.end_train(train, end, now).await?;
        crate::metrics::metrics().train_ended(end.outcome.as_str());
        self.landing().record(
            TrainStat {
                started_at,
                ended_at: now,
                builds: end.builds,
                landed: end.landed,
            },
            now,
        );
        Ok(())
    }

    /// Journals the base moves of a train's landing prefix, all or none, while each task is
    /// still Verified with that commit; the task that changed, if one did (nothing written).
    pub async fn begin_landing(&self, entries: &[(Journal, CommitId)]) -> Result<Option<TaskId>> {
        self.store.begin_integration(entries).await
    }

    /// Forgets a journaled base move that did not happen.
    pub async fn abort_landing(&self, task: &TaskId) -> Result<()> {
        self.store.abort_integration(task).await
    }

    /// The journaled base moves a crash may have interrupted.
    pub async fn pending_landings(&self) -> Result<Vec<Journal>> {
        self.store.pending_integrations().await
    }

    /// How many tasks are leased now (dev work whose result may come), when known.
    /// Counts a build no train took (an early build whose group was dropped) in builds per
    /// landed change, as a train of one build that landed nothing.
    pub fn count_wasted_build(&self, started_at: Millis, ended_at: Millis) {
        let now = self.now();
        self.landing().record(
            crate::store::TrainStat {
                started_at,
                ended_at,
                builds: 1,
                landed: 0,
            },
            now,
        );
    }

    pub fn leased_now(&self) -> Option<u64> {
        self.counts_mut().as_ref().map(|c| c.in_progress)
    }

    /// How many tasks are Open now (waiting for a lease, or for their back-off or
    /// dependencies), once counted.
    pub fn open_now(&self) -> Option<u64> {
        self.counts_mut().as_ref().map(|c| c.open)
    }

    /// The depth of speculation in use (trains built at once) and its ceiling
    /// (`--integration-slots`), shown by `status`; a change after a train (`green`: it was
    /// green; else red) is a `depth` entry of the feed (its own transaction; one that cannot
    /// be written is only logged).
    pub async fn set_depth(&self, in_use: usize, ceiling: usize, green: Option<bool>) {
        let (in_use, ceiling) = (in_use as u32, ceiling as u32);
        self.landing().integration_depth = Some((in_use, ceiling));
        let Some(green) = green else {
            return;
        };
        let why = if green {
            "after a green train"
        } else {
            "after a red train"
        };
        let entry = NewEntry::new(
            Topic::Train,
            "depth".to_owned(),
            "depth",
            self.now(),
            format!("trains built at once: {in_use} of at most {ceiling} ({why})"),
            serde_json::json!({ "depth": in_use, "ceiling": ceiling, "green": green }),
        );
        if let Err(e) = self.store.record(&entry).await {
            tracing::warn!("cannot record the depth of speculation in the feed: {e}");
        }
    }

    /// The base found red, while it is.
    pub fn red_base(&self) -> Option<RedBase> {
        self.landing().red_base.clone()
    }

    /// A person's hold on landing (`queue pause --landing-only`, `--landing`), with its
    /// reason, while there is one.
    pub fn landing_hold(&self) -> Option<String> {
        self.landing().paused.as_ref().map(|p| p.reason.clone())
    }

    /// Whether landing is held (a person's hold, or a red base).
    pub fn landing_held(&self) -> bool {
        self.landing().landing_held()
    }

    /// Whether `tree` was built green for `scope`.
    pub fn is_green(&self, tree: &TreeId, scope: &Option<String>) -> bool {
        self.landing().is_green(tree, scope)
    }

    /// The trees known green, for a train's plan.
    pub fn green_trees(&self) -> std::collections::HashSet<Green> {
        self.landing().green_trees().cloned().collect()
    }

    /// Remembers a tree built green (by the server, or a landed tip).
    pub fn remember_green(&self, green: Green) {
        self.landing().remember_green(green);
    }
}
