//! Commits offered early (`--early-builds`): a runner sends its task's commit as soon as the
//! agent has made it, before its own verification ends, so that the integrator can build the
//! train that commit will ride while the runner verifies. An offer is a fact about a live
//! lease and lives on it in the registry: it is gone when the lease ends, however it ends (the
//! result, a release, a lapse, the runner lost), and a restarted server has none. Nothing lands
//! and nothing is charged on an offer: the task still becomes Verified (or not) by its runner's
//! result, as without it; an early build only spares the train's build of the same tree.

use pipeline_core::ids::CommitId;

use crate::domain::TaskId;
use crate::error::Result;
use crate::ports::Repository;
use crate::scheduler::registry::{LeaseRef, Offered};
use crate::store::Store;

use super::Coordinator;
use super::runners::refused;

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// Takes a commit `runner_id` offers on `lease` with its bundle at `bundle`: received as
    /// a result's commit is ([`Repository::receive_bundle`]: one commit whose only parent is
    /// the lease's base, nothing else needed, git's strict checks), then recorded as the
    /// lease's offer ([`Coordinator::offer_commit`]). A commit that is not that is refused
    /// (`InvalidArgument`, saying why) and changes nothing: the task is judged by its result
    /// alone.
    #[tracing::instrument(name = "offer", skip_all, fields(lease = %lease.id, %commit))]
    pub async fn receive_offer(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        commit: &CommitId,
        bundle: &std::path::Path,
    ) -> Result<TaskId> {
        let task = self.check_lease(runner_id, lease).await?;
        let base = task
            .lease
            .as_ref()
            .map(|l| l.base_commit.clone())
            .ok_or_else(|| refused(lease, "the task has no lease"))?;
        let received = self.repo.receive_bundle(bundle, &base, commit).await?;
        let task = self.offer_commit(runner_id, lease, received.clone(), base)?;
        tracing::debug!(%task, "commit offered before its verification");
        Ok(task)
    }

    /// Records `commit` (on `parent`), which the repository holds already, as offered on
    /// `lease` by `runner_id`; refused like any call on a lease that is not live and theirs.
    pub fn offer_commit(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        commit: CommitId,
        parent: CommitId,
    ) -> Result<TaskId> {
        let now = self.now();
        let task = {
            let mut registry = self.registry();
            let live = registry
                .check(runner_id, lease, now)
                .map_err(|why| refused(lease, why))?;
            let task = live.task.clone();
            if let Some(live) = registry.lease_mut(&lease.id) {
                live.offered = Some(Offered {
                    commit,
                    parent,
                    at: now,
                });
            }
            task
        };
        self.offers_moved.send_modify(|n| *n += 1);
        Ok(task)
    }

    /// The live offers, oldest first.
    pub fn offers(&self) -> Vec<(TaskId, Offered)> {
        let mut offers: Vec<(TaskId, Offered)> = self
            .registry()
            .leases()
            .filter_map(|l| l.offered.clone().map(|o| (l.task.clone(), o)))
            .collect();
        offers.sort_by_key(|(_, o)| o.at);
        offers
    }

    /// The live offer for `task`, if any.
    pub fn offer_of(&self, task: &TaskId) -> Option<Offered> {
        self.registry()
            .leases()
            .find(|l| &l.task == task)
            .and_then(|l| l.offered.clone())
    }

    /// Whether `task` has a live lease (its result not in yet).
    pub fn leased(&self, task: &TaskId) -> bool {
        self.registry().leases().any(|l| &l.task == task)
    }

    /// Moves on each time a commit is offered (an offer's end is its lease's, which the
    /// change feed tells).
    pub fn offers_moved(&self) -> tokio::sync::watch::Receiver<u64> {
        self.offers_moved.subscribe()
    }
}
