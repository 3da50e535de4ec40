//! Early builds (`--early-builds`): a train's build started from the commits runners offer
//! before their own verification ends ([`crate::coordinator::offers`]), so that the server's
//! build and the runners' verifications run at once instead of one after the other.
//!
//! The integrator plans the train those commits will ride, an early group: the tasks that
//! would form the next train (Verified ones not riding a train, and offered ones), in landing
//! order, gathered as a train is (`--gather-window`, `--batch-max`), on the tip that train will
//! be formed on (the tip of the group planned before it, else the tip of the train formed last
//! while it is in flight, else the base's). It cherry-picks their commits onto that tip as a
//! train does and builds the result with the server's builder. Nothing lands and no one is
//! charged on it: once every task of the group is Verified, the real train forms with exactly
//! them ([`Integrator::early_form`] waits for them, no longer than the build itself took), and
//! its build of the same tree with the same runs takes the early build's result (in flight or
//! done) instead of building again ([`Integrator::early_result`]). A build is a function of its
//! tree and its runs, so that result is the one the train's own build would have given. A
//! group one of whose tasks is neither offered nor Verified any more (its runner's
//! verification failed, its lease lapsed) is dropped; its build, wasted, still counts in
//! builds per landed, as does an early build no train took; its offers are not planned again
//! (a runner that verifies for longer than a build would have them built over and over). No
//! group is planned on the tip of one whose early build came back red (that tip does not land
//! as it is), and nothing with verification off (trains never build then). Groups planned on
//! a tip that will not be the next train's (the train ahead withdrew it: its tip came back red,
//! or it landed another) leave, their builds stopped, and are planned again on the right tip;
//! a group whose commits do not apply on its tip is not planned again before a train ends.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pipeline_core::git::Merged;
use pipeline_core::ids::{CommitId, TreeId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::train::{self, Candidate};
use super::{Form, Integrator, candidate};
use crate::domain::{Millis, Task, TaskId};
use crate::error::Result;
use crate::ports::{BuildJob, BuildRun, Builder, Built, Repository};
use crate::store::Store;

/// The most output lines an early build keeps for the train that takes it.
const MAX_LINES: usize = 2_000;

/// The most groups planned ahead at once.
const MAX_GROUPS: usize = 8;

/// What a build is a function of: its tree, its base's tree (`PIPELINE_BASE_COMMIT` names a
/// commit with that tree) and its runs (namespace, task).
type Key = (TreeId, TreeId, Vec<(Option<String>, Option<TaskId>)>);

fn key(tree: TreeId, base_tree: TreeId, runs: &[BuildRun]) -> Key {
    (
        tree,
        base_tree,
        runs.iter()
            .map(|r| (r.namespace.clone(), r.task.clone()))
            .collect(),
    )
}

/// How an early build ended.
#[derive(Clone, Debug)]
enum End {
    Green,
    Red(String),
    /// It did not build (a conflict, an error, the server stopping): the train builds itself.
    None,
}

/// An early build's result, once it ended: how, its output, when it began and ended.
type Done = Option<(End, Arc<Vec<String>>, Millis, Millis)>;

/// One planned group.
struct Group {
    id: u64,
    members: Vec<TaskId>,
    /// The offers it was planned from: (task, commit).
    offered: Vec<(TaskId, CommitId)>,
    /// The tree of the tip it is planned on: the group is stale once the train it would
    /// ride is to form on another.
    on: TreeId,
    /// Stops its build (the group left before its build ended).
    cancel: CancellationToken,
    /// The tip of its chain, once its commits are cherry-picked (the next group's tip), and
    /// its tree.
    chain_tip: Option<(CommitId, TreeId)>,
    /// What its build is of, once known.
    key: Option<Key>,
    done: watch::Receiver<Done>,
    /// A train formed with it (its tasks ride it).
    formed: bool,
    /// A train took its result.
    taken: bool,
}

/// The early groups, in the order their trains are to form.
#[derive(Default)]
pub(super) struct Board {
    groups: VecDeque<Group>,
    next_id: AtomicU64,
    /// Groups dropped while their build ran, untaken: counted wasted when it ends.
    orphans: HashSet<u64>,
    /// How long the last early build took.
    last_build: Option<Millis>,
    /// Offers (task, commit) whose group left without forming: not planned again (their
    /// build was spent; a runner that verifies longer than a build would have them built
    /// over and over).
    spent: HashSet<(TaskId, CommitId)>,
    /// Offers whose group could not be built on its tip (a conflict there): not planned
    /// again before a train ends (the tips move then).
    unbuildable: HashSet<(TaskId, CommitId)>,
}

impl Board {
    /// Takes `group` off the board; a build no train took is a build wasted. Its offers are
    /// spent unless it was `stale` (planned on a tip its train will not form on: they are
    /// planned again on the right one) or formed.
    fn leave<S: Store, R: Repository>(
        &mut self,
        group: &Group,
        stale: bool,
        c: &crate::coordinator::Coordinator<S, R>,
    ) {
        if !group.formed && !stale {
            self.spent.extend(group.offered.iter().cloned());
        }
        if stale {
            // Its build, if still running, is of no use: stopped (a build stopped is not
            // counted; one that ended counts as wasted, below).
            group.cancel.cancel();
        }
        if group.taken || group.key.is_none() {
            return;
        }
        match group.done.borrow().as_ref() {
            Some((End::None, ..)) => {}
            Some((_, _, began, ended)) => c.count_wasted_build(*began, *ended),
            None => {
                self.orphans.insert(group.id);
            }
        }
    }
}

/// What the integrator knows of the trains in flight, for planning the next group's tip.
pub(super) enum Ahead {
    /// None in flight: the next train forms on the base's tip.
    Nothing,
    /// The train formed last is in flight; its tip (and tree) once its members are placed.
    Train(Option<(CommitId, TreeId)>),
    /// The train formed last is in flight and its tip came back red: it will not land as it
    /// is (nothing is planned on it).
    Doomed,
}

impl<S: Store, R: Repository, B: Builder> Integrator<S, R, B> {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.early_board
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Plans the next early group from the offers not planned yet and starts its build;
    /// returns when to look again if its gathering window is still open.
    pub(super) async fn plan_early(
        self: &Arc<Self>,
        riding: &HashSet<TaskId>,
        ahead: Ahead,
        shutdown: &CancellationToken,
    ) -> Result<Option<tokio::time::Instant>> {
        let c = self.c();
        // Verification off: trains never build, so no early build could be taken.
        if self.never_build().is_some() || shutdown.is_cancelled() {
            return Ok(None);
        }
        let offers = c.offers();
        if offers.is_empty() {
            return Ok(None);
        }
        // Groups planned on a tip their train will not form on leave, their builds stopped;
        // their offers are planned again on the right tip: those after a group whose early
        // build came back red, all of them once the train ahead's tip came back red, and all
        // of them if the first is on another tip than the train ahead's (or the base's).
        let (first_on, after_red) = {
            let board = self.board();
            let first = board
                .groups
                .iter()
                .find(|g| !g.formed)
                .map(|g| g.on.clone());
            let after_red = board
                .groups
                .iter()
                .position(|g| matches!(g.done.borrow().as_ref(), Some((End::Red(_), ..))))
                .map(|red| red + 1);
            (first, after_red)
        };
        if let Some(on) = first_on {
            let stale_from = match &ahead {
                Ahead::Doomed => Some(0),
                Ahead::Train(Some((_, tree))) if *tree != on => Some(0),
                Ahead::Nothing if c.repo().tree_of(&self.base_tip().await?).await? != on => Some(0),
                _ => after_red,
            };
            if let Some(from) = stale_from {
                let mut board = self.board();
                let first = board.groups.iter().position(|g| !g.formed).unwrap_or(0);
                let from = from.max(first).min(board.groups.len());
                let stale: Vec<Group> = board.groups.drain(from..).collect();
                for g in &stale {
                    board.leave(g, true, c);
                }
                drop(board);
                if !stale.is_empty() {
                    tracing::info!(
                        groups = stale.len(),
                        "early groups planned on a tip that will not be the next train's leave"
                    );
                }
            }
        }
        // Nothing new offered: nothing to plan (and no read of the store).
        {
            let mut board = self.board();
            let offered = |(t, commit): &(TaskId, CommitId)| {
                offers
                    .iter()
                    .any(|(o, off)| o == t && &off.commit == commit)
            };
            board.spent.retain(offered);
            board.unbuildable.retain(offered);
            let new = offers.iter().any(|(t, o)| {
                let offer = (t.clone(), o.commit.clone());
                !riding.contains(t)
                    && !board.groups.iter().any(|g| g.members.contains(t))
                    && !board.spent.contains(&offer)
                    && !board.unbuildable.contains(&offer)
            });
            if !new {
                return Ok(None);
            }
        }
        let policy = c.policy();
        let verified: Vec<Task> = c
            .verified_tasks()
            .await?
            .into_iter()
            .filter(|t| !t.state.base_check && !policy.awaits_approval(&t.state))
            .collect();
        // A group not formed, one of whose tasks can no longer ride it (neither offered nor
        // Verified and waiting, nor its result being stored), will never form: it leaves (its
        // tip would mislead the groups planned after it).
        let members: Vec<(u64, Vec<TaskId>)> = self
            .board()
            .groups
            .iter()
            .filter(|g| !g.formed)
            .map(|g| (g.id, g.members.clone()))
            .collect();
        let mut dead = HashSet::new();
        for (id, members) in members {
            for m in &members {
                if !self.may_ride(m, &verified, riding).await {
                    tracing::info!(group = id, task = %m, "an early group's task can no longer ride it");
                    dead.insert(id);
                    break;
                }
            }
        }
        if !dead.is_empty() {
            let mut board = self.board();
            let (gone, kept): (VecDeque<Group>, VecDeque<Group>) =
                std::mem::take(&mut board.groups)
                    .into_iter()
                    .partition(|g| dead.contains(&g.id));
            board.groups = kept;
            for g in &gone {
                tracing::info!(
                    group = g.id,
                    "an early group leaves: one of its tasks can no longer ride its train"
                );
                board.leave(g, false, c);
            }
        }
        let (planned, tip_of_last, full) = {
            let board = self.board();
            let planned: HashSet<TaskId> = board
                .groups
                .iter()
                .flat_map(|g| g.members.iter().cloned())
                .chain(board.spent.iter().map(|(t, _)| t.clone()))
                .chain(board.unbuildable.iter().map(|(t, _)| t.clone()))
                .collect();
            // A group after one whose build came back red would be built on a tip that does
            // not land as it is: wait for that group's train to end (the tip is real then).
            if board
                .groups
                .iter()
                .any(|g| matches!(g.done.borrow().as_ref(), Some((End::Red(_), ..))))
            {
                return Ok(None);
            }
            let last = board.groups.back().map(|g| g.chain_tip.clone());
            (planned, last, board.groups.len() >= MAX_GROUPS)
        };
        let fresh: Vec<_> = offers
            .iter()
            .filter(|(t, _)| !planned.contains(t) && !riding.contains(t))
            .collect();
        if fresh.is_empty() || full {
            return Ok(None);
        }
        let (tip, on) = match (tip_of_last, ahead) {
            // The group before is not picked yet: its tip is not known.
            (Some(None), _) | (None, Ahead::Train(None) | Ahead::Doomed) => return Ok(None),
            (Some(Some(tip)), _) | (None, Ahead::Train(Some(tip))) => tip,
            (None, Ahead::Nothing) => {
                let tip = self.base_tip().await?;
                let tree = c.repo().tree_of(&tip).await?;
                (tip, tree)
            }
        };
        // The tasks the next train would take: the Verified ones not riding nor planned, and
        // the offered ones, in landing order.
        let mut tasks: Vec<(Task, Option<(CommitId, CommitId)>)> = verified
            .into_iter()
            .filter(|t| !riding.contains(&t.id) && !planned.contains(&t.id))
            .map(|t| (t, None))
            .collect();
        for (task, offered) in &fresh {
            if tasks.iter().any(|(t, _)| &t.id == task) {
                continue;
            }
            let Ok(t) = c.get(task).await else { continue };
            tasks.push((t, Some((offered.commit.clone(), offered.parent.clone()))));
        }
        tasks.sort_by_key(|(t, _)| (t.priority, t.seq));
        let batch_max = c.settings().batch_max.max(1);
        let candidates: Vec<Candidate<TaskId>> = tasks.iter().map(|(t, _)| candidate(t)).collect();
        let chosen = train::select(&candidates, batch_max);
        if !chosen.iter().any(|(i, _)| tasks[*i].1.is_some()) {
            return Ok(None);
        }
        // Gathered like a train: the window from the first fresh offer, unless the group is
        // full or no more can come (every leased task has offered, none waits for a lease). The window is at
        // least half a build: a commit offered that much later still has its result about
        // when the group's build ends (a runner's verification takes about a build), so
        // gathering it costs little time and saves a build of its own.
        // Before any early build has ended its length is not known: while the first one
        // builds, the next group gathers until it ends (woken then).
        let first = fresh.iter().map(|(_, o)| o.at).min().unwrap_or_default();
        let (last_build, first_building) = {
            let board = self.board();
            let building = board.groups.iter().any(|g| g.done.borrow().is_none());
            (board.last_build, board.last_build.is_none() && building)
        };
        let half_build = last_build.unwrap_or(0) / 2;
        let window = Millis::try_from(self.gather_window.as_millis())
            .unwrap_or(Millis::MAX)
            .max(half_build);
        let wait = first.saturating_add(window) - c.now();
        // No more can come: every leased task has offered, and no task waits for a lease
        // (a runner whose result comes leases the next one, whose offer follows soon).
        let all_offered =
            c.leased_now().is_some_and(|n| n <= offers.len() as u64) && c.open_now() == Some(0);
        if chosen.len() < batch_max && !all_offered && first_building {
            return Ok(None);
        }
        if chosen.len() < batch_max && wait > 0 && !all_offered {
            let wait = std::time::Duration::from_millis(u64::try_from(wait).unwrap_or(0));
            return Ok(Some(tokio::time::Instant::now() + wait));
        }
        let mut members = Vec::with_capacity(chosen.len());
        for (i, _) in &chosen {
            let (task, offered) = &tasks[*i];
            let (commit, parent) = match offered {
                Some(o) => o.clone(),
                None => {
                    let Some(commit) = task.patch_commit.clone() else {
                        return Ok(None);
                    };
                    let parents = c.repo().parents(&commit).await?;
                    let [parent] = parents.as_slice() else {
                        return Ok(None);
                    };
                    (commit, parent.clone())
                }
            };
            members.push((task.clone(), commit, parent));
        }
        let (tx, rx) = watch::channel(None);
        let cancel = shutdown.child_token();
        let id = {
            let mut board = self.board();
            let id = board.next_id.fetch_add(1, Ordering::Relaxed);
            board.groups.push_back(Group {
                id,
                members: members.iter().map(|(t, ..)| t.id.clone()).collect(),
                offered: chosen
                    .iter()
                    .filter_map(|(i, _)| {
                        tasks[*i]
                            .1
                            .as_ref()
                            .map(|(c, _)| (tasks[*i].0.id.clone(), c.clone()))
                    })
                    .collect(),
                on,
                cancel: cancel.clone(),
                chain_tip: None,
                key: None,
                done: rx,
                formed: false,
                taken: false,
            });
            id
        };
        let names: Vec<&str> = members.iter().map(|(t, ..)| t.id.as_str()).collect();
        tracing::info!(group = id, tasks = %names.join(" "), %tip, "building early");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let end = this.build_early(id, members, tip, &cancel).await;
            let _ = tx.send(Some(end));
            this.early_woken.notify_one();
        });
        Ok(None)
    }

    /// Picks the group's commits onto `tip` and builds the result.
    async fn build_early(
        &self,
        id: u64,
        members: Vec<(Task, CommitId, CommitId)>,
        tip: CommitId,
        shutdown: &CancellationToken,
    ) -> (End, Arc<Vec<String>>, Millis, Millis) {
        let c = self.c();
        let began = c.now();
        let none = |at| (End::None, Arc::new(Vec::new()), began, at);
        let mut onto = tip.clone();
        let mut tree = None;
        for (task, commit, parent) in &members {
            match c.repo().cherry_pick(parent, &onto, commit).await {
                Ok(Merged::Clean(t)) => {
                    match c.repo().commit_for_task(&t, &onto, commit, &task.id).await {
                        Ok(new) => onto = new,
                        Err(e) => {
                            let why = format!("{}'s commit could not be written: {e}", task.id);
                            return self.early_failed(id, &why, none(c.now()));
                        }
                    }
                    tree = Some(t);
                }
                // The train finds the conflict itself.
                Ok(Merged::Conflict(_)) => {
                    let why = format!("{}'s commit conflicts there", task.id);
                    return self.early_failed(id, &why, none(c.now()));
                }
                Err(e) => {
                    let why = format!("{}'s commit could not be picked: {e}", task.id);
                    return self.early_failed(id, &why, none(c.now()));
                }
            }
        }
        let Some(tree) = tree else {
            return self.early_failed(id, "it has no commit", none(c.now()));
        };
        let covered: Vec<&Task> = members.iter().map(|(t, ..)| t).collect();
        let runs = self.runs_for(&covered);
        let base_tree = match c.repo().tree_of(&tip).await {
            Ok(tree) => tree,
            Err(e) => {
                let why = format!("its tip's tree could not be read: {e}");
                return self.early_failed(id, &why, none(c.now()));
            }
        };
        let key = key(tree, base_tree, &runs);
        {
            let mut board = self.board();
            if let Some(g) = board.groups.iter_mut().find(|g| g.id == id) {
                g.chain_tip = Some((onto.clone(), key.0.clone()));
                g.key = Some(key);
            }
        }
        // The next group may be planned on this one's tip now.
        self.early_woken.notify_one();
        let job = BuildJob {
            commit: onto,
            verifier: c.settings().verifier.clone(),
            base_commit: tip,
            runs,
        };
        let lines = std::sync::Mutex::new(Vec::new());
        let keep = |line: &str| {
            let mut lines = lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if lines.len() < MAX_LINES {
                lines.push(line.to_owned());
            }
        };
        let built = self.builder.build(&job, shutdown, &keep).await;
        let lines = Arc::new(lines.into_inner().unwrap_or_default());
        let end = match built {
            Ok(Built::Green) => End::Green,
            Ok(Built::Red(why)) => End::Red(why),
            Ok(Built::Cancelled | Built::NoCheckout(_)) | Err(_) => End::None,
        };
        let ended = c.now();
        if !matches!(end, End::None) {
            let mut board = self.board();
            board.last_build = Some(ended - began);
            // Dropped while it built, no train took it: a build wasted.
            if board.orphans.remove(&id) {
                c.count_wasted_build(began, ended);
            }
        }
        (end, lines, began, ended)
    }

    /// A group that could not be built is dropped at once.
    fn early_failed(
        &self,
        id: u64,
        why: &str,
        end: (End, Arc<Vec<String>>, Millis, Millis),
    ) -> (End, Arc<Vec<String>>, Millis, Millis) {
        // Nothing was built: nothing to count. Its offers are not planned again on this tip
        // (they would fail the same way, over and over): not before a train ends.
        let mut board = self.board();
        if let Some(at) = board.groups.iter().position(|g| g.id == id) {
            tracing::info!(
                group = id,
                %why,
                "an early group could not be built on its tip; its train builds itself"
            );
            let gone = board.groups.remove(at).expect("found");
            board.unbuildable.extend(gone.offered);
        }
        drop(board);
        self.early_woken.notify_one();
        end
    }

    /// The early build of `job`'s tree and runs, waited for if still in flight: what it
    /// concluded and its output; `None` if there is none (or it did not build).
    pub(super) async fn early_result(
        &self,
        job: &BuildJob,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Built, Arc<Vec<String>>)>> {
        // No early build to take: no git call on a train's build.
        if !self.early
            || !self
                .board()
                .groups
                .iter()
                .any(|g| g.key.is_some() && !g.taken)
        {
            return Ok(None);
        }
        let tree = self.c().repo().tree_of(&job.commit).await?;
        let base_tree = self.c().repo().tree_of(&job.base_commit).await?;
        let key = key(tree, base_tree, &job.runs);
        let found = {
            let mut board = self.board();
            board
                .groups
                .iter_mut()
                .find(|g| g.key.as_ref() == Some(&key) && !g.taken)
                .map(|g| {
                    g.taken = true;
                    g.done.clone()
                })
        };
        let Some(mut done) = found else {
            return Ok(None);
        };
        let ended = tokio::select! {
            () = shutdown.cancelled() => return Ok(Some((Built::Cancelled, Arc::default()))),
            ended = done.wait_for(Option::is_some) => ended.ok().and_then(|d| d.clone()),
        };
        Ok(match ended {
            Some((End::Green, lines, ..)) => Some((Built::Green, lines)),
            Some((End::Red(why), lines, ..)) => Some((Built::Red(why), lines)),
            _ => None,
        })
    }

    /// Whether `member` of a group may still ride the group's train: offered, or Verified and
    /// not riding a train (in `verified`, read a moment ago, or read again: its result may
    /// have been stored since, its offer gone with its lease), or its result being stored now
    /// (no live lease, the task still in progress). A live lease without an offer is a new
    /// attempt: not the commit the group was planned with.
    async fn may_ride(&self, member: &TaskId, verified: &[Task], riding: &HashSet<TaskId>) -> bool {
        let c = self.c();
        if riding.contains(member) {
            return false;
        }
        if c.offer_of(member).is_some() || verified.iter().any(|t| &t.id == member) {
            return true;
        }
        if c.leased(member) {
            return false;
        }
        c.get(member).await.is_ok_and(|t| {
            matches!(
                t.state.status,
                crate::domain::TaskStatus::Verified | crate::domain::TaskStatus::InProgress
            )
        })
    }

    /// Whether the next train forms now, with an early group planned (`--early-builds`):
    /// `Some` if the group decides it. The group's tasks all Verified: the train is exactly
    /// them. Some still offered: wait for them (no longer after the group's build ended than
    /// the build took: building again would take as long). `verified` is what the train would
    /// take otherwise, in landing order; a candidate ahead of the group's in it forms as
    /// usual.
    pub(super) async fn early_form(
        &self,
        verified: &[Task],
        riding: &HashSet<TaskId>,
        chosen: &[(usize, Vec<usize>)],
    ) -> Option<Form> {
        if !self.early || chosen.is_empty() {
            return None;
        }
        let c = self.c();
        // The first group's members neither offered nor in `verified`: whether they may still
        // ride it (read again: a result may have been stored since `verified` was read).
        let unseen: Vec<TaskId> = {
            let board = self.board();
            board
                .groups
                .iter()
                .find(|g| !g.formed)
                .map(|g| {
                    g.members
                        .iter()
                        .filter(|m| {
                            !verified.iter().any(|t| &t.id == *m) && c.offer_of(m).is_none()
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut coming = HashSet::new();
        for m in unseen {
            if self.may_ride(&m, verified, riding).await {
                coming.insert(m);
            }
        }
        let now = c.now();
        let mut board = self.board();
        let g = board.groups.iter().position(|g| !g.formed)?;
        // A candidate in no group forms as usual (the groups' builds may be wasted); one in
        // a group waits for the groups ahead of it to form first.
        if chosen.iter().any(|(i, _)| {
            !board
                .groups
                .iter()
                .skip(g)
                .any(|group| group.members.contains(&verified[*i].id))
        }) {
            return None;
        }
        let group = &board.groups[g];
        let mut pending = false;
        let mut dead = false;
        let mut at = Vec::with_capacity(group.members.len());
        for m in &group.members {
            match verified.iter().position(|t| &t.id == m) {
                Some(i) => at.push(i),
                None if c.offer_of(m).is_some() || coming.contains(m) => pending = true,
                None => dead = true,
            }
        }
        let ended = group
            .done
            .borrow()
            .as_ref()
            .map(|(_, _, began, ended)| (*began, *ended));
        let overdue = ended.is_some_and(|(began, ended)| now > ended + (ended - began));
        if dead || (pending && overdue) {
            let gone = board.groups.remove(g).expect("found");
            board.leave(&gone, false, c);
            drop(board);
            tracing::info!(
                group = gone.id,
                "an early group is dropped: not all of its tasks came Verified"
            );
            self.early_woken.notify_one();
            return None;
        }
        if pending {
            return Some(match ended {
                Some((began, ended)) => {
                    let left = u64::try_from(ended + (ended - began) - now).unwrap_or(0);
                    Form::Wait(tokio::time::Instant::now() + std::time::Duration::from_millis(left))
                }
                // Woken when the build ends or a task's state moves.
                None => Form::Nothing,
            });
        }
        board.groups[g].formed = true;
        let candidates: Vec<Candidate<TaskId>> =
            at.iter().map(|i| candidate(&verified[*i])).collect();
        let picked = train::select(&candidates, candidates.len());
        if picked.len() != at.len() {
            board.groups[g].formed = false;
            return None;
        }
        Some(Form::Now(
            picked
                .into_iter()
                .map(|(j, after)| (at[j], after))
                .collect(),
        ))
    }

    /// A train of `tasks` ended: the groups it formed from leave the board.
    pub(super) fn early_train_ended(&self, tasks: &[TaskId]) {
        if !self.early {
            return;
        }
        let c = self.c();
        let mut board = self.board();
        let (over, kept): (VecDeque<Group>, VecDeque<Group>) = std::mem::take(&mut board.groups)
            .into_iter()
            .partition(|g| g.formed && g.members.iter().all(|m| tasks.contains(m)));
        board.groups = kept;
        for g in &over {
            board.leave(g, false, c);
        }
        // The base moved: an offer that could not be built on the old tips may be now.
        board.unbuildable.clear();
        drop(board);
        self.early_woken.notify_one();
    }
}
