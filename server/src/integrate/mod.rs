//! The integrator: lands Verified tasks on the base branch in merge trains. It is the only
//! writer of `refs/heads/<base>`.
//!
//! A train takes up to `--batch-max` Verified tasks, by priority then age, each of whose
//! dependencies is Done or earlier in the train ([`train::select`]), and is driven as a pure
//! state machine ([`train::Train`]): read the tip (a task may be on it already: the server's
//! own landed record says so), cherry-pick the commits in order onto it without touching files
//! (a conflict is known here, without a build), build the chain's tip once, and on red search
//! the prefixes for the first red commit; the green prefix before it lands, the culprit goes
//! back with its build's output, the tasks after it wait for the next train uncharged. A base
//! that fails its own build holds leases and landing (no one is charged) until it moves to a
//! commit that builds green, or `queue resume`. Before each train, the runners' verifications
//! that failed on a base the server did not know green are settled ([`Integrator::check_bases`]):
//! that base is built alone, once per base commit and scope; green charges the tasks, red
//! charges no one and records the base red. Each landing is journaled for the whole train before the base moves by
//! compare-and-swap (with a push with lease first when `--push-remote` is set); a crash after
//! the journal entry is finished or undone by [`Integrator::recover`] at start-up, so a
//! task's commit lands exactly once.
//!
//! Git failing on a train's own input (a commit it cannot cherry-pick onto a tree, a tree it
//! cannot check out) for no reason of the machine's is counted per input; the [`REPEATS`]th
//! failure in a row is fed to the train as a conflict or a red build, so it is blamed on its
//! commit like any other, never retried for ever.

mod early;
pub mod train;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pipeline_core::git::{GitError, Merged, RefName};
use pipeline_core::ids::{CommitId, TreeId};
use pipeline_core::verify::Verifier;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::VerifyOnServer;
use crate::coordinator::Coordinator;
use crate::domain::{
    FailureKind, FinishedRun, LogLine, LogStream, Phase, RunEnd, RunStatus, Task, TaskId,
    TaskStatus,
};
use crate::error::{Error, Result};
use crate::landing::RedBase;
use crate::lifecycle::Event;
use crate::ports::{BuildJob, BuildRun, Builder, Built, Repository};
use crate::store::{Journal, Store, TrainEnd, TrainOutcome};
use train::{Candidate, Fate, Green, Input, Member, Outcome, Plan, Step, Train};

/// After a failed round (git or database trouble), try again this much later.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// While landing is paused because the base is red, how often the base is looked at for a
/// change (a person pushing a fix wakes nothing here; `queue resume` does at once). Not a hot
/// path: nothing lands meanwhile.
const RED_BASE_RECHECK: Duration = Duration::from_secs(5);

/// How many times in a row git may fail on the same input (a commit cherry-picked onto a tree,
/// a tree checked out) for a reason that is not the machine's before the input is taken to be
/// the cause: the train then blames it as it blames a conflict or a red build. Fewer would
/// charge a task for a passing hiccup; without a bound, a commit git cannot handle was retried
/// once a second for ever, its task never charged.
const REPEATS: u32 = 3;

/// How many inputs' failures are counted at once (more is a flood of trouble, not a pattern).
const COUNTED_INPUTS: usize = 256;

/// A step's own input, for counting git's failures on it: the same input fails the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Attempt {
    /// `commit` cherry-picked onto a commit whose tree is `onto`.
    Pick { commit: CommitId, onto: TreeId },
    /// A tree checked out in the integration worktree.
    Checkout { tree: TreeId },
}

/// The integrator over a coordinator, building with `B`.
pub struct Integrator<S, R, B> {
    coordinator: Arc<Coordinator<S, R>>,
    builder: B,
    /// Git's failures in a row on each step input that failed lately, not for the machine's
    /// reasons (see [`REPEATS`]).
    failures: std::sync::Mutex<HashMap<Attempt, u32>>,
    /// How long a train's first candidate waits for more Verified tasks before the train
    /// forms ([`Integrator::formable`]).
    gather_window: Duration,
    /// How many trains are built at most at once (`--integration-slots`): each behind the
    /// first on the tip of the one ahead of it, as if that had landed. [`Integrator::run`]
    /// adapts the depth in use up to it ([`Depth`]); [`Integrator::next`] uses all of it.
    depth: usize,
    /// Whether trains are built from the commits runners offer before their verification ends
    /// (`--early-builds`).
    early: bool,
    /// The early groups planned ([`early`]).
    early_board: std::sync::Mutex<early::Board>,
    /// Wakes the integrator's loop when an early group's picks or build end, or a train's
    /// members are placed (the next group may be planned on its tip).
    early_woken: tokio::sync::Notify,
}

/// What a train tells the train behind it (a speculative one, built on its tip).
#[derive(Clone, Debug, Default)]
struct Relay {
    /// Its ID, once formed (for `queue`: the train behind is shown as built on it).
    train: Option<i64>,
    /// The tip it leaves the base at if its whole chain lands, once every member is placed:
    /// the train behind is formed on it.
    guess: Option<(CommitId, TreeId)>,
    /// Whether a build of its tip came back red (its chain tip will not land as it is).
    doomed: bool,
    /// Once it is over: where the base is after it, or `None` if it could not finish (an
    /// error, the server stopping, the base found red, the base kept moving).
    end: Option<Option<CommitId>>,
}

/// A train's links to the trains beside it when several are built at once.
#[derive(Default)]
struct Links {
    /// The train ahead's relay (this train is speculative).
    ahead: Option<tokio::sync::watch::Receiver<Relay>>,
    /// This train's relay, for the train behind.
    behind: Option<tokio::sync::watch::Sender<Relay>>,
}

/// What the integrator may do next ([`Integrator::prepare`]).
enum Ready {
    /// Nothing: landing is held, or the server is stopping.
    Idle,
    /// Something was settled: what was read is stale, read again.
    Again,
    /// The Verified tasks a train may take, in landing order.
    Tasks(Vec<Task>),
}

/// What a train's end says of the depth of speculation ([`Integrator::run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Its tip landed (built green, or known green) and no build of it was red.
    Green,
    /// A build of it was red (a culprit, or the base itself).
    Red,
    /// Neither: nothing to judge by (requeued, the server stopping, nothing built or landed).
    Neither,
}

/// Whether a pending train may form now ([`Integrator::formable`]).
pub(crate) enum Form {
    /// These candidates, by index, each with the members it depends on.
    Now(Vec<(usize, Vec<usize>)>),
    /// Not yet: the gathering window ends then.
    Wait(tokio::time::Instant),
    /// Nothing can form (no candidate whose dependencies are met).
    Nothing,
}

/// The depth of speculation in use: the trains built at once, from 1 up to the ceiling
/// (`--integration-slots`); it starts at 2 (or the ceiling, if lower), grows by 1 after each
/// green train and halves after a red one (Zuul's window), so that a run of red trains stops
/// wasting builds on guesses and a green run speculates as deep as allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depth {
    pub in_use: usize,
    pub ceiling: usize,
}

impl Depth {
    pub fn new(ceiling: usize) -> Self {
        let ceiling = ceiling.max(1);
        Self {
            in_use: ceiling.min(2),
            ceiling,
        }
    }

    /// After a train ended with `verdict`: whether the depth changed.
    fn after(&mut self, verdict: Verdict) -> bool {
        let before = self.in_use;
        self.in_use = match verdict {
            Verdict::Green => (self.in_use + 1).min(self.ceiling),
            Verdict::Red => (self.in_use / 2).max(1),
            Verdict::Neither => self.in_use,
        };
        self.in_use != before
    }
}

/// Resolves once the train ahead withdraws the guess `train` is built on (its tip came back
/// red, or it was formed again) before it ends; never if `train` is not on a guess, or once
/// the train ahead ended (its end is answered at [`train::Step::Confirm`]).
fn guess_withdrawn(links: &Links, train: &Train) -> impl Future<Output = ()> + use<> {
    let ahead = links.ahead.clone();
    let on = train
        .guessing()
        .then(|| train.base_tip().cloned())
        .flatten();
    async move {
        if let (Some(mut ahead), Some(on)) = (ahead, on) {
            let gone = ahead
                .wait_for(|r| {
                    r.end.is_none() && r.guess.as_ref().is_none_or(|(commit, _)| *commit != on)
                })
                .await
                .is_ok();
            if gone {
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}

/// Runs `work` (builds, stopped by `cancel`) unless `withdrawn` resolves first: then the
/// builds are stopped, waited for, and `None` says their answers are not to be taken.
async fn unless_withdrawn<T>(
    work: impl Future<Output = T>,
    withdrawn: impl Future<Output = ()>,
    cancel: &CancellationToken,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        biased;
        out = &mut work => Some(out),
        () = withdrawn => {
            cancel.cancel();
            let _ = work.await;
            None
        }
    }
}

/// Tells each rider that its build on the guess was stopped.
fn withdrawn_note(riders: &[Rider<'_>]) {
    for r in riders {
        r.log.line(
            "the train ahead will not land the tip this train was being built on (its own \
             build came back red, or it was formed again): the build on that guess was \
             stopped; formed again once the train ahead is over"
                .to_owned(),
        );
    }
}

/// A train's span, naming its tasks (`task` when it has one).
fn train_span(tasks: &[(Task, Vec<usize>)]) -> tracing::Span {
    let members: Vec<String> = tasks.iter().map(|(t, _)| t.id.to_string()).collect();
    match members.as_slice() {
        [one] => tracing::info_span!("train", task = %one, tasks = %one),
        _ => tracing::info_span!("train", tasks = %members.join(",")),
    }
}

/// What a build of the base alone concluded.
enum BaseVerdict {
    Green,
    /// Red, with why (the failing command and the tail of its output).
    Red(String),
    /// The base already recorded red (for this scope), with the reason recorded then (a
    /// sentence of its own: "the base … fails its own build: …"; not to be wrapped again).
    KnownRed(String),
}

/// Where the integrator's lines for one run go: the task log, numbered.
struct RunLog<'a> {
    logs: &'a crate::logs::LogHub,
    task: TaskId,
    run_id: i64,
    phase: Phase,
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
            phase: self.phase,
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

/// A task of the train being driven, with its run and log.
struct Rider<'a> {
    task: Task,
    commit: CommitId,
    log: RunLog<'a>,
}

impl<S: Store, R: Repository, B: Builder> Integrator<S, R, B> {
    pub fn new(coordinator: Arc<Coordinator<S, R>>, builder: B) -> Self {
        Self {
            coordinator,
            builder,
            failures: std::sync::Mutex::new(HashMap::new()),
            gather_window: Duration::ZERO,
            depth: 1,
            early: false,
            early_board: std::sync::Mutex::default(),
            early_woken: tokio::sync::Notify::new(),
        }
    }

    /// Builds trains early, from the commits runners offer before their verification ends
    /// (`--early-builds`).
    pub fn building_early(mut self, early: bool) -> Self {
        self.early = early;
        self
    }

    /// Builds up to `depth` trains at once (`--integration-slots`), each behind the first on
    /// the tip of the one ahead of it.
    pub fn speculating(mut self, depth: usize) -> Self {
        self.depth = depth.max(1);
        self
    }

    /// Waits up to `window` from a train's first candidate for more Verified tasks
    /// (`--gather-window`).
    pub fn gathering(mut self, window: Duration) -> Self {
        self.gather_window = window;
        self
    }

    /// Whether `task`, alone in a train, would land on its runner's word: its runner verified
    /// its tree under the server's verification, and its commit sits on the base's tip.
    async fn lands_unbuilt(&self, task: &Task) -> bool {
        let c = self.c();
        if task.verified_tree.is_none()
            || c.settings().verify_on_server != VerifyOnServer::WhenNeeded
            || self.never_build().is_some()
        {
            return false;
        }
        let Some(commit) = &task.patch_commit else {
            return false;
        };
        let (Ok(parents), Ok(tip)) = (
            c.repo().parents(commit).await,
            c.repo().tip(&c.settings().base).await,
        ) else {
            return false;
        };
        parents.as_slice() == [tip]
    }

    /// Judges git's failure on `attempt`'s input: the machine's (a resource, a timeout) is an
    /// error, and so is a failure on an input that has not failed [`REPEATS`] times in a row
    /// yet (the train is formed again, uncharged); from the [`REPEATS`]th on it is the
    /// input's own: its reason is returned for the train to blame.
    fn judge_failure(&self, attempt: Attempt, err: GitError) -> Result<String> {
        if err.is_infrastructure() {
            return Err(err.into());
        }
        let Ok(mut failures) = self.failures.lock() else {
            return Err(err.into());
        };
        if failures.len() >= COUNTED_INPUTS && !failures.contains_key(&attempt) {
            failures.clear();
        }
        let count = failures.entry(attempt.clone()).or_default();
        *count += 1;
        if *count < REPEATS {
            return Err(Error::Internal(format!(
                "{err} (failure {count} of {REPEATS} on this input before it is taken for the \
                 commit's fault)"
            )));
        }
        // Kept until the input goes through: it is judged at once from now on (a pick judged
        // so may need its pick onto the tip alone judged next, in a later formation).
        *count = REPEATS;
        Ok(format!(
            "git failed the same way {REPEATS} times in a row: {err}"
        ))
    }

    /// Forgets the failures counted on `attempt`'s input, once it went through.
    fn succeeded(&self, attempt: &Attempt) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(attempt);
        }
    }

    /// Whether any input has failures counted (else nothing needs forgetting).
    fn counting(&self) -> bool {
        self.failures.lock().is_ok_and(|f| !f.is_empty())
    }

    fn c(&self) -> &Coordinator<S, R> {
        &self.coordinator
    }

    /// Integrates Verified tasks as they come, until `shutdown`: a train forms as soon as
    /// there is room for it (fewer trains in flight than the depth in use) and its gathering
    /// window allows ([`Integrator::formable`]); behind a train in flight it is built on that
    /// train's tip, as if it had landed. Each train runs as a task of its own, so that one
    /// building never holds up the forming of the next.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        // Subscribed before the first round: nothing published from now on is missed.
        let mut wakeups = this.c().integrator_wakeups(this.early);
        let mut offers = this.c().offers_moved();
        let mut depth = Depth::new(this.depth);
        this.c().set_depth(depth.in_use, depth.ceiling, None).await;
        let mut in_flight: tokio::task::JoinSet<Result<Verdict>> = tokio::task::JoinSet::new();
        // The tasks of each train in flight, and all of them.
        let mut trains: HashMap<tokio::task::Id, Vec<TaskId>> = HashMap::new();
        let mut riding: HashSet<TaskId> = HashSet::new();
        // The relay of the train formed last, for the next one to ride on while it is in flight.
        let mut last: Option<tokio::sync::watch::Receiver<Relay>> = None;
        // The gathering window of the train to form next, once it has a candidate.
        let mut window: Option<tokio::time::Instant> = None;
        // No train forms before then (after an error, or while the base is red).
        let mut hold: Option<tokio::time::Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                // A train stopped by the shutdown is formed again after the restart.
                while in_flight.join_next().await.is_some() {}
                return;
            }
            // Early builds (`--early-builds`): the next group, from the commits offered.
            let mut early_until = None;
            if this.early {
                let ahead = if in_flight.is_empty() {
                    early::Ahead::Nothing
                } else {
                    match last.as_ref().map(|r| r.borrow().clone()) {
                        Some(relay) if relay.doomed => early::Ahead::Doomed,
                        relay => early::Ahead::Train(relay.and_then(|r| r.guess)),
                    }
                };
                match this.plan_early(&riding, ahead, &shutdown).await {
                    Ok(at) => early_until = at,
                    Err(err) => tracing::warn!(error = %err, "an early build could not be planned"),
                }
            }
            let now = tokio::time::Instant::now();
            let mut until = hold.filter(|h| *h > now);
            if in_flight.len() < depth.in_use && until.is_none() {
                hold = None;
                match this
                    .pending(&riding, in_flight.is_empty(), &shutdown, &mut window)
                    .await
                {
                    Err(err) => {
                        tracing::error!(error = %err, "integration round failed; retrying");
                        hold = Some(now + RETRY_AFTER_ERROR);
                        until = hold;
                    }
                    Ok(None) => {
                        window = None;
                        if in_flight.is_empty() && this.red_base().is_some() {
                            hold = Some(now + RED_BASE_RECHECK);
                            until = hold;
                        }
                    }
                    Ok(Some((_, Form::Nothing))) => window = None,
                    Ok(Some((_, Form::Wait(deadline)))) => until = Some(deadline),
                    Ok(Some((verified, Form::Now(group)))) => {
                        window = None;
                        let tasks: Vec<(Task, Vec<usize>)> = group
                            .into_iter()
                            .map(|(i, after)| (verified[i].clone(), after))
                            .collect();
                        let ids: Vec<TaskId> = tasks.iter().map(|(t, _)| t.id.clone()).collect();
                        riding.extend(ids.iter().cloned());
                        let (tx, rx) = tokio::sync::watch::channel(Relay::default());
                        let links = Links {
                            // Behind the train formed last while it is not over.
                            ahead: last
                                .take()
                                .filter(|r| !in_flight.is_empty() && r.borrow().end.is_none()),
                            behind: Some(tx),
                        };
                        last = Some(rx);
                        let span = train_span(&tasks);
                        let train = Arc::clone(&this);
                        let stop = shutdown.clone();
                        let handle = in_flight.spawn(
                            async move { train.run_train(tasks, links, &stop).await }
                                .instrument(span),
                        );
                        trains.insert(handle.id(), ids);
                        continue;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                Some(joined) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let (id, verdict) = match joined {
                        Ok((id, verdict)) => (id, verdict),
                        // A train that panicked: its tasks are formed again.
                        Err(err) => (
                            err.id(),
                            Err(Error::Internal(format!("a train's task failed: {err}"))),
                        ),
                    };
                    let ended = trains.remove(&id).unwrap_or_default();
                    this.early_train_ended(&ended);
                    for task in ended {
                        riding.remove(&task);
                    }
                    match verdict {
                        Ok(verdict) => {
                            if depth.after(verdict) {
                                this.c()
                                    .set_depth(depth.in_use, depth.ceiling, Some(verdict == Verdict::Green))
                                    .await;
                            }
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "integration round failed; retrying");
                            hold = Some(tokio::time::Instant::now() + RETRY_AFTER_ERROR);
                        }
                    }
                }
                () = wakeups.next() => {}
                Ok(()) = offers.changed(), if this.early => {}
                () = this.early_woken.notified(), if this.early => {}
                () = sleep_until_or_never(until) => {}
                () = sleep_until_or_never(early_until), if early_until.is_some() => {}
            }
        }
    }

    /// The train to form next, from the Verified tasks not `riding` a train in flight, and
    /// whether it may form now: `None` if nothing can (landing held, the server stopping).
    /// With nothing in flight (`alone`), a red base that moved and the runners' held failures
    /// are settled first.
    async fn pending(
        &self,
        riding: &HashSet<TaskId>,
        alone: bool,
        shutdown: &CancellationToken,
        window: &mut Option<tokio::time::Instant>,
    ) -> Result<Option<(Vec<Task>, Form)>> {
        let verified = loop {
            match self.prepare(alone, shutdown).await? {
                Ready::Idle => return Ok(None),
                Ready::Again => {}
                Ready::Tasks(verified) => break verified,
            }
        };
        let verified: Vec<Task> = verified
            .into_iter()
            .filter(|t| !riding.contains(&t.id))
            .collect();
        let form = self.formable(&verified, riding, alone, window).await;
        Ok(Some((verified, form)))
    }

    /// Whether a train of `verified` (in landing order) forms now. The gathering window
    /// (`--gather-window`), started by the first candidate, lets a wave of results
    /// milliseconds apart go in one train; it ends early once the train is full
    /// (`--batch-max`), once no task is leased (no result can come), or, with no train in
    /// flight (`alone`), when the one candidate lands without a build (its runner verified
    /// its tree on the base as it is: waiting would gain no build).
    pub(crate) async fn formable(
        &self,
        verified: &[Task],
        riding: &HashSet<TaskId>,
        alone: bool,
        window: &mut Option<tokio::time::Instant>,
    ) -> Form {
        let batch_max = self.c().settings().batch_max.max(1);
        let candidates: Vec<Candidate<TaskId>> = verified.iter().map(candidate).collect();
        let chosen = train::select(&candidates, batch_max);
        if chosen.is_empty() {
            return Form::Nothing;
        }
        if let Some(form) = self.early_form(verified, riding, &chosen).await {
            return form;
        }
        if self.gather_window.is_zero()
            || chosen.len() >= batch_max
            || self.c().leased_now() == Some(0)
            || (alone && verified.len() == 1 && self.lands_unbuilt(&verified[0]).await)
        {
            return Form::Now(chosen);
        }
        let now = tokio::time::Instant::now();
        let deadline = *window.get_or_insert(now + self.gather_window);
        if deadline <= now {
            Form::Now(chosen)
        } else {
            Form::Wait(deadline)
        }
    }

    /// The base commit found red, while it is.
    fn red_base(&self) -> Option<CommitId> {
        self.c().red_base().map(|r| r.commit)
    }

    /// What a train may take now: first (with `settle`, when no train is in flight) a red
    /// base that moved is built again (green ends the hold) and the runners' failures held on
    /// an unchecked base are settled; then the Verified tasks, in landing order, without those
    /// whose failure is held or that await a person's approval.
    async fn prepare(&self, settle: bool, shutdown: &CancellationToken) -> Result<Ready> {
        if settle && let Some(red) = self.c().red_base() {
            let tip = self.base_tip().await?;
            if tip != red.commit {
                let base = self.c().settings().base.clone();
                match self
                    .base_verdict(&tip, red.namespace.as_deref(), None, shutdown)
                    .await?
                {
                    None => return Ok(Ready::Idle),
                    Some(BaseVerdict::Green) => {
                        self.c()
                            .clear_red_base(&format!(
                                "the base {base} moved from {} to {tip}, which builds green",
                                red.commit
                            ))
                            .await?;
                    }
                    Some(BaseVerdict::Red(why)) => {
                        self.c()
                            .mark_red_base(red_base(&base, tip, &why, red.namespace))
                            .await?;
                    }
                    // Recorded red already: nothing to record.
                    Some(BaseVerdict::KnownRed(_)) => {}
                }
            }
        }
        let verified = self.c().verified_tasks().await?;
        if settle {
            match self.check_bases(&verified, shutdown).await? {
                None => return Ok(Ready::Idle),
                // What was read is stale now: read again.
                Some(true) => return Ok(Ready::Again),
                Some(false) => {}
            }
        }
        if self.c().landing_held() {
            return Ok(Ready::Idle);
        }
        // A held failure is settled first; an unapproved task waits for a person.
        let policy = self.c().policy();
        Ok(Ready::Tasks(
            verified
                .into_iter()
                .filter(|t| !t.state.base_check && !policy.awaits_approval(&t.state))
                .collect(),
        ))
    }

    /// Runs the next train; false if there is none to run (nothing Verified can land, or
    /// landing is held). Before it: a red base that moved is built again (green ends the
    /// hold), and the runners' failures held on an unchecked base are settled. With
    /// `--integration-slots N`, up to N trains are formed at once and all of them run to
    /// their end (the round a test drives; [`Integrator::run`] forms them as they come).
    pub async fn next(&self, shutdown: &CancellationToken) -> Result<bool> {
        let verified = match self.prepare(true, shutdown).await? {
            Ready::Idle => return Ok(false),
            Ready::Again => return Ok(true),
            Ready::Tasks(verified) => verified,
        };
        let batch_max = self.c().settings().batch_max.max(1);
        let candidates: Vec<Candidate<TaskId>> = verified.iter().map(candidate).collect();
        let chosen = train::select(&candidates, batch_max);
        if chosen.len() < batch_max {
            for (i, t) in verified.iter().enumerate() {
                if t.deps_pending > 0 && !chosen.iter().any(|(c, _)| *c == i) {
                    tracing::info!(task = %t.id, "waiting for its dependencies before integrating");
                }
            }
        }
        if chosen.is_empty() {
            return Ok(false);
        }
        // With --integration-slots N, up to N - 1 more trains from the tasks left, each to be
        // built on the tip of the one ahead (a task whose dependency is in a train ahead waits:
        // `select` takes it only with its dependencies in the same train).
        let mut groups = vec![chosen];
        while groups.len() < self.depth {
            let taken: HashSet<usize> = groups.iter().flatten().map(|(i, _)| *i).collect();
            let rest: Vec<usize> = (0..candidates.len())
                .filter(|i| !taken.contains(i))
                .collect();
            let left: Vec<Candidate<TaskId>> =
                rest.iter().map(|i| candidates[*i].clone()).collect();
            let more = train::select(&left, batch_max);
            if more.is_empty() {
                break;
            }
            groups.push(
                more.into_iter()
                    .map(|(j, after)| (rest[j], after))
                    .collect(),
            );
        }
        let mut trains = Vec::with_capacity(groups.len());
        let mut ahead = None;
        let several = groups.len() > 1;
        for group in groups {
            let tasks: Vec<(Task, Vec<usize>)> = group
                .into_iter()
                .map(|(i, after)| (verified[i].clone(), after))
                .collect();
            let span = train_span(&tasks);
            let mut links = Links {
                ahead: ahead.take(),
                behind: None,
            };
            if several {
                let (tx, rx) = tokio::sync::watch::channel(Relay::default());
                links.behind = Some(tx);
                ahead = Some(rx);
            }
            trains.push(self.run_train(tasks, links, shutdown).instrument(span));
        }
        for result in futures_util::future::join_all(trains).await {
            result?;
        }
        Ok(true)
    }

    /// Settles the runners' verifications that failed on a base the server did not know
    /// green (`base_check`): each such base is built once per scope, unless known green or
    /// red already, in the integration worktree, its output in a run of the first task that
    /// waits on it. Green: the failures were the tasks' own, charged. Red: the base is
    /// recorded red (leases and landing wait) and no one is charged. Returns whether it
    /// settled any; `None` if the server is stopping.
    pub(crate) async fn check_bases(
        &self,
        verified: &[Task],
        shutdown: &CancellationToken,
    ) -> Result<Option<bool>> {
        let c = self.c();
        let base_branch = c.settings().base.clone();
        let mut groups: Vec<(CommitId, Option<String>, Vec<&Task>)> = Vec::new();
        for task in verified.iter().filter(|t| t.state.base_check) {
            let parents = match &task.patch_commit {
                Some(commit) => c.repo().parents(commit).await?,
                None => Vec::new(),
            };
            let [base] = parents.as_slice() else {
                // No one base to build: judged as it always was, the task's own failure.
                self.settle_base_check(task, &Event::BaseGreen, None)
                    .await?;
                continue;
            };
            let scope = self.scope(task);
            match groups.iter_mut().find(|(b, s, _)| b == base && *s == scope) {
                Some((_, _, tasks)) => tasks.push(task),
                None => groups.push((base.clone(), scope, vec![task])),
            }
        }
        if groups.is_empty() {
            return Ok(Some(false));
        }
        let now = || c.now();
        for (base, _, tasks) in groups {
            let first = tasks[0];
            let run_id = c.start_server_run(first, Phase::Verify, None).await?;
            let log = RunLog {
                logs: c.logs(),
                task: first.id.clone(),
                run_id,
                phase: Phase::Verify,
                seq: AtomicU64::new(0),
                now: &now,
            };
            log.line(format!(
                "the runner's verification failed on {base_branch} at {base}; the server builds \
                 that base alone to learn whether the base itself is red"
            ));
            let verdict = self
                .base_verdict(&base, first.namespace.as_deref(), Some(&log), shutdown)
                .await;
            log.flush().await;
            let end = |why: String, kind| RunEnd::failure(why, kind);
            let verdict = match verdict {
                Ok(Some(v)) => v,
                Ok(None) => {
                    let why = "interrupted: the server is stopping".to_owned();
                    c.end_server_run(run_id, &end(why, Some(FailureKind::Infrastructure)))
                        .await?;
                    return Ok(None);
                }
                Err(err) => {
                    let why = format!("the base could not be built (not the task's fault): {err}");
                    c.end_server_run(run_id, &end(why, Some(FailureKind::Infrastructure)))
                        .await?;
                    return Err(err);
                }
            };
            let (event, end) = match verdict {
                BaseVerdict::Green => {
                    tracing::info!(%base, "the base builds green: the runners' failures on it are the tasks' own");
                    (
                        Event::BaseGreen,
                        end(
                            format!(
                                "the base {base_branch} at {base} builds green, so the runner's \
                                 failed verification is the task's own: {}",
                                first
                                    .state
                                    .feedback
                                    .as_deref()
                                    .unwrap_or("verification failed")
                            ),
                            Some(FailureKind::Task),
                        ),
                    )
                }
                BaseVerdict::Red(why) => {
                    c.mark_red_base(red_base(
                        &base_branch,
                        base.clone(),
                        &why,
                        first.namespace.clone(),
                    ))
                    .await?;
                    (
                        Event::BaseRed {
                            base: base.to_string(),
                        },
                        end(
                            format!(
                                "not charged: the base {base_branch} at {base} fails its own \
                                 build too: {why}"
                            ),
                            None,
                        ),
                    )
                }
                // Recorded red already (its reason says so in full): said once, not wrapped.
                BaseVerdict::KnownRed(reason) => (
                    Event::BaseRed {
                        base: base.to_string(),
                    },
                    end(format!("not charged: {reason}"), None),
                ),
            };
            for (i, task) in tasks.iter().enumerate() {
                // The first task's run holds the build's output; the others record the verdict.
                let recorded = (i > 0).then(|| FinishedRun {
                    phase: Phase::Verify,
                    patchset: task.state.patchset,
                    runner: None,
                    status: RunStatus::Failure,
                    cost_cents: 0.0,
                    started_at: c.now(),
                    error: end
                        .error
                        .clone()
                        .map(|e| format!("{e}\n(the build's output is in {}'s log)", first.id)),
                    failure_kind: end.failure_kind,
                    train: None,
                    builds: None,
                });
                let settled = match recorded {
                    Some(run) => self.settle_base_check(task, &event, Some(Err(run))),
                    None => self.settle_base_check(task, &event, Some(Ok(end.clone()))),
                };
                settled.await?;
            }
        }
        Ok(Some(true))
    }

    /// Settles one task's held failure with `event` (a lost race is re-decided; a task that
    /// moved on meanwhile, cancelled say, is left as it is), ending its server run
    /// (`Ok`) or recording one (`Err`).
    async fn settle_base_check(
        &self,
        task: &Task,
        event: &Event,
        run: Option<std::result::Result<RunEnd, FinishedRun>>,
    ) -> Result<()> {
        let patchset = task.state.patchset;
        let settled = self
            .c()
            .transition_from(
                task.clone(),
                event,
                |t| {
                    if t.state.base_check && t.state.patchset == patchset {
                        Ok(())
                    } else {
                        Err(Error::FailedPrecondition(format!(
                            "task {} has no failed verification to settle now",
                            t.id
                        )))
                    }
                },
                |_, w| match &run {
                    Some(Ok(end)) => w.runs.close_rest = Some(end.clone()),
                    Some(Err(recorded)) => w.runs.record.push(recorded.clone()),
                    None => {}
                },
            )
            .await;
        match settled {
            Ok(_) | Err(Error::FailedPrecondition(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Whether `commit`, as the base, builds green under the server's verification for a
    /// task with `namespace`: known red (the red base) or green (a tree built green for that
    /// scope) without a build, else built by the builder (its output to `log`) and
    /// remembered. `None` if the server is stopping; an error if the build could not run.
    async fn base_verdict(
        &self,
        commit: &CommitId,
        namespace: Option<&str>,
        log: Option<&RunLog<'_>>,
        shutdown: &CancellationToken,
    ) -> Result<Option<BaseVerdict>> {
        let c = self.c();
        let verifier = &c.settings().verifier;
        let scope = crate::landing::scope(verifier, namespace);
        if let Some(red) = c.red_base()
            && red.commit == *commit
            && crate::landing::scope(verifier, red.namespace.as_deref()) == scope
        {
            return Ok(Some(BaseVerdict::KnownRed(red.reason)));
        }
        let tree = c.repo().tree_of(commit).await?;
        if c.is_green(&tree, &scope) {
            if let Some(log) = log {
                log.line("the base was built green before; not built again".to_owned());
            }
            return Ok(Some(BaseVerdict::Green));
        }
        let base = &c.settings().base;
        tracing::info!(%commit, "building the base alone");
        if let Some(log) = log {
            log.line(format!(
                "building {base} at {commit} {}",
                self.builder.site()
            ));
        }
        let job = BuildJob {
            commit: commit.clone(),
            verifier: verifier.clone(),
            base_commit: commit.clone(),
            runs: vec![BuildRun {
                namespace: namespace.map(str::to_owned),
                task: None,
            }],
        };
        let to_log = |line: &str| {
            if let Some(log) = log {
                log.line(line.to_owned());
            }
        };
        Ok(Some(
            match self.builder.build(&job, shutdown, &to_log).await? {
                Built::Green => {
                    if let Some(log) = log {
                        log.line("the base builds green".to_owned());
                    }
                    self.remember_green((tree, scope));
                    BaseVerdict::Green
                }
                Built::Red(why) => {
                    if let Some(log) = log {
                        log.line("the base fails its own build".to_owned());
                    }
                    BaseVerdict::Red(why)
                }
                Built::Cancelled => return Ok(None),
                // The base alone: git's trouble with it is the server's, whatever it is.
                Built::NoCheckout(e) => return Err(e.into()),
            },
        ))
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

    /// Whether the server's verification builds anything for `task`.
    fn buildable(&self, task: &Task) -> bool {
        self.c()
            .settings()
            .verifier
            .applies_to(task.namespace.as_deref())
    }

    /// What the server's verification builds for `task`: its namespace when each namespace
    /// is a build of its own, else nothing in particular.
    fn scope(&self, task: &Task) -> Option<String> {
        crate::landing::scope(&self.c().settings().verifier, task.namespace.as_deref())
    }

    /// Why no build can change any outcome (verification is off), if so.
    fn never_build(&self) -> Option<String> {
        matches!(self.c().settings().verifier, Verifier::Off)
            .then(|| "verification is off (--no-verify)".to_owned())
    }

    /// The trees known green, for a train's plan.
    fn green_set(&self) -> HashSet<Green> {
        self.c().green_trees()
    }

    fn remember_green(&self, green: Green) {
        self.c().remember_green(green);
    }

    async fn set_step(&self, train: i64, step: String) {
        self.c().train_step(train, step).await;
    }

    /// Forms and drives one train of `tasks` (each with the members it depends on), then
    /// records what became of each.
    async fn run_train(
        &self,
        tasks: Vec<(Task, Vec<usize>)>,
        links: Links,
        shutdown: &CancellationToken,
    ) -> Result<Verdict> {
        let c = self.c();
        let base = c.settings().base.clone();
        // A task whose record is broken (no commit, a merge commit) fails on its own; its
        // dependents wait for another train.
        let mut kept: Vec<(Task, CommitId, CommitId, Vec<usize>)> = Vec::new();
        let mut index: Vec<Option<usize>> = Vec::new();
        for (task, after) in tasks {
            let mapped: Option<Vec<usize>> = after.iter().map(|a| index[*a]).collect();
            let Some(after) = mapped else {
                index.push(None);
                continue;
            };
            let Some(commit) = task.patch_commit.clone() else {
                self.integration_failed(&task, "no commit was recorded for the task".into())
                    .await?;
                index.push(None);
                continue;
            };
            match c.repo().parents(&commit).await?.as_slice() {
                [parent] => {
                    index.push(Some(kept.len()));
                    let parent = parent.clone();
                    kept.push((task, commit, parent, after));
                }
                other => {
                    let reason = format!("the commit {commit} has {} parents", other.len());
                    self.integration_failed(&task, reason).await?;
                    index.push(None);
                }
            }
        }
        if kept.is_empty() {
            return Ok(Verdict::Neither);
        }
        let tip = self.base_tip().await?;
        let started_at = c.now();
        let tasks: Vec<Task> = kept.iter().map(|(task, ..)| task.clone()).collect();
        // A speculative train is shown behind the train ahead, once that is formed.
        let ahead = match &links.ahead {
            Some(ahead) => ahead
                .clone()
                .wait_for(|r| r.train.is_some() || r.end.is_some())
                .await
                .ok()
                .and_then(|r| r.train),
            None => None,
        };
        let (train_id, run_ids) = c.start_train(&tip, &tasks, ahead).await?;
        if let Some(behind) = &links.behind {
            behind.send_modify(|r| r.train = Some(train_id));
        }
        let now = || c.now();
        let mut riders = Vec::with_capacity(kept.len());
        let mut members = Vec::with_capacity(kept.len());
        for ((task, commit, parent, after), run_id) in kept.into_iter().zip(run_ids) {
            members.push(Member {
                commit: commit.clone(),
                parent,
                // Under --verify-on-server always, no runner's word stands in for a build.
                verified_tree: task
                    .verified_tree
                    .clone()
                    .filter(|_| c.settings().verify_on_server == VerifyOnServer::WhenNeeded),
                after,
                buildable: self.buildable(&task),
                scope: self.scope(&task),
            });
            riders.push(Rider {
                log: RunLog {
                    logs: c.logs(),
                    task: task.id.clone(),
                    run_id,
                    phase: Phase::Integrate,
                    seq: AtomicU64::new(0),
                    now: &now,
                },
                task,
                commit,
            });
        }
        let ids: Vec<TaskId> = riders.iter().map(|r| r.task.id.clone()).collect();
        let names = ids.iter().map(TaskId::as_str).collect::<Vec<_>>().join(" ");
        for r in &riders {
            r.log.line(format!(
                "integrating patchset {} onto {base} in train {train_id} ({} task{}: {names})",
                r.task.state.patchset,
                ids.len(),
                if ids.len() == 1 { "" } else { "s" }
            ));
        }
        let mut train = Train::new(Plan {
            members,
            never_build: self.never_build(),
            green: self.green_set(),
            slots: self.builder.slots(),
            speculative: links.ahead.is_some(),
        });
        let driven = self
            .drive(train_id, &mut train, &riders, &links, shutdown)
            .await;
        // The train behind learns where the base is now (before this train's tasks are
        // recorded: the base has moved already).
        if let Some(behind) = &links.behind {
            let end = match &driven {
                Ok(Some(o)) if !o.gave_up && o.red_base.is_none() => {
                    o.new_tip.clone().or_else(|| o.tip.clone())
                }
                _ => None,
            };
            behind.send_modify(|r| r.end = Some(end));
        }
        match driven {
            Ok(Some(outcome)) => {
                let verdict = if outcome.red.is_some() || outcome.red_base.is_some() {
                    Verdict::Red
                } else if outcome
                    .fates
                    .iter()
                    .any(|f| matches!(f, Fate::Landed { .. }))
                {
                    Verdict::Green
                } else {
                    Verdict::Neither
                };
                self.finish(train_id, started_at, &riders, outcome)
                    .await
                    .map(|()| verdict)
            }
            Ok(None) => c
                .end_train(train_id, started_at, None)
                .await
                .map(|()| Verdict::Neither),
            Err(err) => {
                // Nobody's fault: the train ends uncharged and is formed again.
                let end = TrainEnd {
                    outcome: TrainOutcome::Error,
                    builds: train.total_builds(),
                    landed: 0,
                    red_commit: None,
                };
                c.end_train(train_id, started_at, Some(&end)).await?;
                let why = format!("the integration could not go on (not the task's fault): {err}");
                for (i, r) in riders.iter().enumerate() {
                    r.log.line(why.clone());
                    r.log.flush().await;
                    c.end_server_run(
                        r.log.run_id,
                        &RunEnd::failure(why.clone(), Some(FailureKind::Infrastructure))
                            .with_builds(train.builds()[i]),
                    )
                    .await?;
                }
                Err(err)
            }
        }
    }

    /// Drives the train to its outcome; `None` if the server is stopping.
    async fn drive(
        &self,
        train_id: i64,
        train: &mut Train,
        riders: &[Rider<'_>],
        links: &Links,
        shutdown: &CancellationToken,
    ) -> Result<Option<Outcome>> {
        let c = self.c();
        let base = c.settings().base.clone();
        loop {
            // Once its members are placed, the train behind may be formed on its tip; once
            // that tip is doomed (built red) or the train is formed again, the guess is
            // withdrawn, and the train behind stops building on it.
            if let Some(behind) = &links.behind {
                let guess = if train.placed() && !train.doomed() {
                    train.chain_tip()
                } else {
                    None
                };
                let doomed = train.doomed();
                if behind.borrow().guess != guess || behind.borrow().doomed != doomed {
                    behind.send_modify(|r| {
                        r.guess = guess;
                        r.doomed = doomed;
                    });
                    // An early group may be planned on this tip now (or not any more).
                    self.early_woken.notify_one();
                }
            }
            let guess = match (&links.ahead, train.step()) {
                (Some(ahead), Step::ReadTip) if train.guessing() => {
                    let mut ahead = ahead.clone();
                    let relay = async {
                        ahead
                            .wait_for(|r| r.guess.is_some() || r.end.is_some())
                            .await
                            .ok()
                            .and_then(|r| r.guess.clone())
                    };
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(None),
                        guess = relay => guess,
                    }
                }
                _ => None,
            };
            let input = match train.step().clone() {
                Step::ReadTip if guess.is_some() => {
                    let (tip, tree) = guess.expect("matched");
                    let mut landed = Vec::new();
                    for (i, r) in riders.iter().enumerate() {
                        if let Some(commit) = c.repo().landed_on(&r.task.id, &tip).await? {
                            landed.push((i, commit));
                        }
                    }
                    for r in riders {
                        r.log.line(format!(
                            "built speculatively on {tip}, the tip of the train ahead, as if it \
                             had landed; nothing lands or is charged before it has"
                        ));
                    }
                    Input::Tip { tip, tree, landed }
                }
                Step::Confirm => {
                    self.set_step(train_id, "waiting for the train ahead to land".to_owned())
                        .await;
                    let end = match &links.ahead {
                        Some(ahead) => {
                            let mut ahead = ahead.clone();
                            let relay = async {
                                ahead
                                    .wait_for(|r| r.end.is_some())
                                    .await
                                    .ok()
                                    .and_then(|r| r.end.clone())
                                    .flatten()
                            };
                            tokio::select! {
                                () = shutdown.cancelled() => return Ok(None),
                                end = relay => end,
                            }
                        }
                        None => None,
                    };
                    let guessed = train.base_tip().cloned();
                    let landed = end.as_ref().map(|tip| Some(tip) == guessed.as_ref());
                    let note = match landed {
                        Some(true) => {
                            "the train ahead landed the tip this train was built on".to_owned()
                        }
                        Some(false) => format!(
                            "the train ahead did not land the tip this train was built on; \
                             forming it again on {base}"
                        ),
                        None => "the train ahead did not finish; this train waits for the next"
                            .to_owned(),
                    };
                    for r in riders {
                        r.log.line(note.clone());
                    }
                    Input::Ahead(landed)
                }
                Step::ReadTip => {
                    let tip = self.base_tip().await?;
                    let tree = c.repo().tree_of(&tip).await?;
                    let mut landed = Vec::new();
                    for (i, r) in riders.iter().enumerate() {
                        if let Some(commit) = c.repo().landed_on(&r.task.id, &tip).await? {
                            landed.push((i, commit));
                        }
                    }
                    Input::Tip { tip, tree, landed }
                }
                Step::Pick { member, onto } => {
                    let r = &riders[member];
                    let parent = &train.plan().members[member].parent;
                    match self.pick(parent, &onto, &r.commit).await? {
                        Ok(Merged::Clean(tree)) => {
                            let new = c
                                .repo()
                                .commit_for_task(&tree, &onto, &r.commit, &r.task.id)
                                .await?;
                            r.log.line(format!("cherry-picked onto {onto} as {new}"));
                            Input::Picked(Ok((new, tree)))
                        }
                        Ok(Merged::Conflict(conflict)) => {
                            Input::Picked(Err(conflict_reason(&base, &onto, &conflict)))
                        }
                        Err(why) => Input::Picked(Err(format!(
                            "the commit cannot be cherry-picked onto {base} at {onto}: {why}"
                        ))),
                    }
                }
                Step::PickAlone { member, tip } => {
                    let r = &riders[member];
                    let parent = &train.plan().members[member].parent;
                    match self.pick(parent, &tip, &r.commit).await? {
                        Ok(Merged::Clean(_)) => Input::PickedAlone(None),
                        Ok(Merged::Conflict(conflict)) => {
                            Input::PickedAlone(Some(conflict_reason(&base, &tip, &conflict)))
                        }
                        Err(why) => Input::PickedAlone(Some(format!(
                            "the commit cannot be cherry-picked onto {base} at {tip}: {why}"
                        ))),
                    }
                }
                Step::Build { len, commit } => {
                    let k = train.chained().len();
                    self.set_step(
                        train_id,
                        match len {
                            0 => format!("building the base {base} alone"),
                            1 if k == 1 => "building the train's tip (1 commit)".to_owned(),
                            n if n == k => format!("building the train's tip ({k} commits)"),
                            n => format!("building prefix {n} of {k}"),
                        },
                    )
                    .await;
                    let cancel = shutdown.child_token();
                    let withdrawn = guess_withdrawn(links, train);
                    let built = self.build(train, riders, len, &commit, &cancel);
                    match unless_withdrawn(built, withdrawn, &cancel).await {
                        Some(built) => match built? {
                            Some(result) => Input::Built(result),
                            None => return Ok(None),
                        },
                        None => {
                            withdrawn_note(riders);
                            train.guess_withdrawn();
                            continue;
                        }
                    }
                }
                Step::BuildMany { builds } => {
                    let k = train.chained().len();
                    let lens: Vec<String> = builds
                        .iter()
                        .map(|(len, _)| match len {
                            0 => "the base".to_owned(),
                            n => n.to_string(),
                        })
                        .collect();
                    self.set_step(
                        train_id,
                        format!("building prefixes {} of {k} at once", lens.join(", ")),
                    )
                    .await;
                    let cancel = shutdown.child_token();
                    let withdrawn = guess_withdrawn(links, train);
                    let building = &*train;
                    let built =
                        futures_util::future::join_all(builds.iter().map(|(len, commit)| {
                            self.build(building, riders, *len, commit, &cancel)
                        }));
                    let Some(built) = unless_withdrawn(built, withdrawn, &cancel).await else {
                        withdrawn_note(riders);
                        train.guess_withdrawn();
                        continue;
                    };
                    let mut results = Vec::with_capacity(built.len());
                    for b in built {
                        match b? {
                            Some(result) => results.push(result),
                            None => return Ok(None),
                        }
                    }
                    Input::BuiltMany(results)
                }
                Step::Journal { len, tip, commit } => {
                    // A person's hold on landing: nothing lands, not even a train built
                    // before it; it waits here, built, until the hold is lifted (the base
                    // may have moved by then: the swap finds out and it is formed again).
                    if !self.wait_while_held(train_id, riders, shutdown).await {
                        return Ok(None);
                    }
                    self.set_step(train_id, "landing".to_owned()).await;
                    let prefix = train.prefix(len);
                    let entries: Vec<(Journal, CommitId)> = prefix
                        .iter()
                        .map(|m| {
                            (
                                Journal {
                                    task_id: riders[*m].task.id.clone(),
                                    train: Some(train_id),
                                    old_tip: tip.clone(),
                                    new_commit: commit.clone(),
                                    started_at: c.now(),
                                },
                                riders[*m].commit.clone(),
                            )
                        })
                        .collect();
                    match c.begin_landing(&entries).await? {
                        Some(changed) => {
                            tracing::info!(task = %changed, "task changed during integration; not landing it");
                            let member = riders
                                .iter()
                                .position(|r| r.task.id == changed)
                                .unwrap_or_default();
                            Input::Journaled(Err(member))
                        }
                        None => {
                            // The server's own record of each task's commit, in the repository
                            // itself, so that it outlives the database (a rolled-back or lost
                            // database cannot land it twice).
                            for m in &prefix {
                                if let Some(own) = train.link(*m) {
                                    c.repo().record_landing(&riders[*m].task.id, own).await?;
                                }
                            }
                            Input::Journaled(Ok(()))
                        }
                    }
                }
                Step::Swap { len, tip, commit } => {
                    let prefix: Vec<&Rider<'_>> =
                        train.prefix(len).iter().map(|m| &riders[*m]).collect();
                    Input::Swapped(self.swap(&prefix, &tip, &commit).await?)
                }
                Step::Done(outcome) => return Ok(Some(outcome)),
            };
            train.on(input);
        }
    }

    /// Waits while a person holds landing (not a red base: a train in flight is how a red
    /// base turns green again); false if the server is stopping meanwhile.
    async fn wait_while_held(
        &self,
        train_id: i64,
        riders: &[Rider<'_>],
        shutdown: &CancellationToken,
    ) -> bool {
        let c = self.c();
        let mut moved = c.landing_moved();
        let mut told = false;
        while let Some(reason) = c.landing_hold() {
            if !told {
                told = true;
                self.set_step(
                    train_id,
                    "held before landing: landing is paused (pipelinectl queue resume)".to_owned(),
                )
                .await;
                for r in riders {
                    r.log.line(format!(
                        "built; held before landing while landing is paused ({reason})"
                    ));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                changed = moved.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Cherry-picks `commit` (on `parent`) onto `onto`: the merge, or (`Ok(Err)`) why git
    /// cannot, once it failed the same way on the same input [`REPEATS`] times in a row.
    async fn pick(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> Result<std::result::Result<Merged, String>> {
        let repo = self.c().repo();
        match repo.cherry_pick(parent, onto, commit).await {
            Ok(merged) => {
                if self.counting() {
                    let onto = repo.tree_of(onto).await?;
                    self.succeeded(&Attempt::Pick {
                        commit: commit.clone(),
                        onto,
                    });
                }
                Ok(Ok(merged))
            }
            Err(e) => {
                let onto = repo.tree_of(onto).await?;
                let attempt = Attempt::Pick {
                    commit: commit.clone(),
                    onto,
                };
                self.judge_failure(attempt, e).map(Err)
            }
        }
    }

    /// Builds the chain's prefix of `len` (`commit`; 0: the base alone) in the integration
    /// worktree, once per namespace its tasks name (under `bild`); `None` if the server is
    /// stopping. A build that cannot run at all is an error: no one's commit is to blame.
    async fn build(
        &self,
        train: &Train,
        riders: &[Rider<'_>],
        len: usize,
        commit: &CommitId,
        shutdown: &CancellationToken,
    ) -> Result<Option<std::result::Result<(), String>>> {
        let c = self.c();
        let base = &c.settings().base;
        let chain = train.chained();
        let covered: Vec<&Rider<'_>> = chain.iter().take(len.max(1)).map(|m| &riders[*m]).collect();
        // The build's output goes to the run of the task whose commit is built (the first
        // task's for the base); the others get one line saying where.
        let owner = covered.last().expect("a chain is never empty here");
        let what = if len == 0 {
            format!("the base {base} at {commit} alone")
        } else {
            format!("{commit} (prefix {len} of {} of the train)", chain.len())
        };
        for r in riders {
            if covered.iter().any(|c| c.task.id == r.task.id) || len == 0 {
                r.log.line(if r.task.id == owner.task.id {
                    format!("building {what} {}", self.builder.site())
                } else {
                    format!("building {what}; its output is in {}'s log", owner.task.id)
                });
            }
        }
        tracing::info!(commit = %commit, len, "building the integrated commit");
        let tip_of_base = train.base_tip().cloned().unwrap_or_else(|| commit.clone());
        let covered_tasks: Vec<&Task> = covered.iter().map(|r| &r.task).collect();
        let job = BuildJob {
            commit: commit.clone(),
            verifier: c.settings().verifier.clone(),
            base_commit: tip_of_base.clone(),
            runs: self.runs_for(&covered_tasks),
        };
        let to_log = |line: &str| owner.log.line(line.to_owned());
        // Built early, while its runners verified (`--early-builds`): the same tree and runs.
        let built = match self.early_result(&job, shutdown).await? {
            Some((built, lines)) => {
                owner.log.line(
                    "built early, from the commits its runners offered before their \
                     verification ended; its output:"
                        .to_owned(),
                );
                for line in lines.iter() {
                    owner.log.line(line.clone());
                }
                built
            }
            None => self.builder.build(&job, shutdown, &to_log).await?,
        };
        // A tree git cannot check out (the same way, again and again) fails its build: the
        // train blames it as it blames a red one.
        if let Built::NoCheckout(e) = built {
            let tree = c.repo().tree_of(commit).await?;
            let why = self.judge_failure(Attempt::Checkout { tree }, e)?;
            owner.log.line(format!("cannot check out {what}"));
            return Ok(Some(Err(format!(
                "the tree of {commit} cannot be checked out, so it cannot be built: {why}"
            ))));
        }
        if self.counting() {
            let tree = c.repo().tree_of(commit).await?;
            self.succeeded(&Attempt::Checkout { tree });
        }
        match built {
            Built::Green => {}
            Built::Cancelled => return Ok(None),
            Built::NoCheckout(_) => unreachable!("judged above"),
            Built::Red(why) => {
                owner.log.line(format!("build failed: {what}"));
                return Ok(Some(Err(if len == 0 {
                    format!("the build of the base {base} at {commit} failed: {why}")
                } else if len == 1 {
                    format!("the build of the commit on {base} at {tip_of_base} failed: {why}")
                } else {
                    let before: Vec<&str> = covered[..covered.len() - 1]
                        .iter()
                        .map(|r| r.task.id.as_str())
                        .collect();
                    format!(
                        "the build of the commit on {base} at {tip_of_base}, after {} (which \
                         build green without it), failed: {why}",
                        before.join(" ")
                    )
                })));
            }
        }
        owner.log.line("build passed".to_owned());
        Ok(Some(Ok(())))
    }

    /// The runs of a build of `covered` (in train order): one per namespace named among them
    /// (the last task naming it gives the task ID), or one when the commands do not name one.
    fn runs_for(&self, covered: &[&Task]) -> Vec<BuildRun> {
        let c = self.c();
        let mut runs: Vec<(&Task, Option<&str>)> = Vec::new();
        for t in covered {
            let ns = t.namespace.as_deref();
            if !c.settings().verifier.applies_to(ns) {
                continue;
            }
            match runs.iter_mut().find(|(_, n)| *n == ns) {
                Some(slot) => slot.0 = t,
                None => runs.push((t, ns)),
            }
        }
        if !crate::landing::names_namespace(&c.settings().verifier) && runs.len() > 1 {
            let last = runs.last().copied().expect("not empty");
            runs = vec![last];
        }
        runs.into_iter()
            .map(|(t, ns)| BuildRun {
                namespace: ns.map(str::to_owned),
                task: Some(t.id.clone()),
            })
            .collect()
    }

    /// Pushes (with `--push-remote`) and moves the base from `tip` to `new`; false (and the
    /// journal entries undone) if either moved first.
    async fn swap(&self, prefix: &[&Rider<'_>], tip: &CommitId, new: &CommitId) -> Result<bool> {
        let c = self.c();
        let base = &c.settings().base;
        let undo = async || -> Result<()> {
            for r in prefix {
                c.abort_landing(&r.task.id).await?;
            }
            Ok(())
        };
        if let Some(remote) = &c.settings().push_remote
            && !c.repo().push_with_lease(remote, base, new, tip).await?
        {
            undo().await?;
            let remote = remote.as_str();
            tracing::info!(
                remote,
                "push rejected: the remote moved; fetching and redoing"
            );
            for r in prefix {
                r.log.line(format!(
                    "push to {remote} rejected: it moved; fetching and forming the train again"
                ));
            }
            return Ok(false);
        }
        crate::failpoint::abort_at("before-base-update");
        if !c
            .repo()
            .compare_and_swap(&RefName::branch(base), new, tip)
            .await?
        {
            undo().await?;
            tracing::info!("the base moved during the integration; redoing it on the new tip");
            for r in prefix {
                r.log.line(format!(
                    "{base} moved during the integration; forming the train again on the new tip"
                ));
            }
            return Ok(false);
        }
        crate::failpoint::abort_at("after-base-update");
        Ok(true)
    }

    /// Records the train's end, then what became of each of its tasks.
    async fn finish(
        &self,
        train_id: i64,
        started_at: i64,
        riders: &[Rider<'_>],
        outcome: Outcome,
    ) -> Result<()> {
        let c = self.c();
        let base = &c.settings().base;
        let k = riders.len();
        let landed = outcome
            .fates
            .iter()
            .filter(|f| matches!(f, Fate::Landed { .. } | Fate::AlreadyLanded { .. }))
            .count();
        let landed = u32::try_from(landed).unwrap_or(u32::MAX);
        let word = if outcome.red_base.is_some() {
            TrainOutcome::RedBase
        } else if outcome.red.is_some() {
            TrainOutcome::Red
        } else if outcome.gave_up {
            TrainOutcome::GaveUp
        } else if landed > 0 {
            TrainOutcome::Landed
        } else {
            TrainOutcome::NothingLanded
        };
        let end = TrainEnd {
            outcome: word,
            builds: outcome.total_builds,
            landed,
            red_commit: outcome.red.clone(),
        };
        c.end_train(train_id, started_at, Some(&end)).await?;
        for (i, (r, fate)) in riders.iter().zip(&outcome.fates).enumerate() {
            let builds = outcome.builds[i];
            let covered = match builds {
                0 => String::new(),
                1 => "; 1 build covered it".to_owned(),
                n => format!("; {n} builds covered it"),
            };
            match fate {
                Fate::Landed { commit } => {
                    tracing::info!(task = %r.task.id, commit = %commit, train = train_id, "landed on {base}");
                    let note = match &outcome.skipped {
                        Some(why) => format!("build skipped: {why}"),
                        None if k == 1 => format!("landed in train {train_id}{covered}"),
                        None => format!(
                            "landed in train {train_id} with {} other task{}{covered}",
                            k - 1,
                            if k == 2 { "" } else { "s" }
                        ),
                    };
                    r.log.line(note.clone());
                    r.log.line(format!("landed on {base} as {commit}"));
                    r.log.flush().await;
                    self.integrated(&r.task, &r.commit, None, Some(note), builds)
                        .await?;
                }
                Fate::AlreadyLanded { commit } => {
                    let note = format!("already on {base} as {commit}");
                    r.log.line(note.clone());
                    r.log.flush().await;
                    self.integrated(&r.task, &r.commit, None, Some(note), builds)
                        .await?;
                }
                Fate::Failed { reason } => {
                    let reason = match &outcome.red {
                        Some(red) if outcome.fates.len() > 1 => {
                            format!(
                                "{reason}\n(train {train_id} found {red}, this task's commit, red)"
                            )
                        }
                        _ => reason.clone(),
                    };
                    r.log.line(reason.clone());
                    r.log.flush().await;
                    self.integration_failed_in_run(&r.task, reason, builds)
                        .await?;
                }
                Fate::Requeued { reason } => {
                    let why = format!("not landed, not charged: {reason}");
                    r.log.line(why.clone());
                    r.log.flush().await;
                    c.end_server_run(
                        r.log.run_id,
                        &RunEnd::failure(why, None).with_builds(builds),
                    )
                    .await?;
                }
            }
        }
        if let Some(why) = &outcome.red_base {
            let tip = outcome
                .tip
                .clone()
                .unwrap_or_else(|| riders[0].commit.clone());
            let namespace = riders[0].task.namespace.clone();
            c.mark_red_base(red_base(base, tip, why, namespace)).await?;
        }
        // Trees built green (the base's, a landed tip's): a red first commit on them is then
        // the commit's fault, without building the base again.
        for tree in &outcome.green_trees {
            self.remember_green(tree.clone());
        }
        if outcome.gave_up {
            return Err(Error::Conflict(
                "the base kept moving while a train was being integrated; will try again".into(),
            ));
        }
        Ok(())
    }

    /// Records the task Done (and ends its journal entry), ending its running integrate run,
    /// or recording one that started at `recorded_from` (after a restart).
    #[tracing::instrument(name = "land", skip_all, fields(task = %task.id, commit = %commit))]
    async fn integrated(
        &self,
        task: &Task,
        commit: &CommitId,
        recorded_from: Option<(i64, Option<i64>)>,
        note: Option<String>,
        builds: u32,
    ) -> Result<()> {
        let run = recorded_from.map(|(started_at, train)| FinishedRun {
            phase: Phase::Integrate,
            patchset: task.state.patchset,
            runner: None,
            status: RunStatus::Success,
            cost_cents: 0.0,
            started_at,
            error: note.clone(),
            failure_kind: None,
            train,
            builds: None,
        });
        let end = RunEnd::success(0.0, note).with_builds(builds);
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

    /// Sends the task back to Open with the reason (charged: a conflict or a red build of its
    /// own); its next attempt starts from the base.
    async fn integration_failed_in_run(
        &self,
        task: &Task,
        reason: String,
        builds: u32,
    ) -> Result<()> {
        tracing::warn!(task = %task.id, "integration failed: {reason}");
        let end = RunEnd::failure(reason.clone(), Some(FailureKind::Task)).with_builds(builds);
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

    /// [`Self::integration_failed_in_run`] for a task that never joined a train.
    async fn integration_failed(&self, task: &Task, reason: String) -> Result<()> {
        self.integration_failed_in_run(task, reason, 0).await
    }

    /// At start-up: finishes every journaled base move that happened (the task becomes Done)
    /// and forgets the ones that did not (the task is integrated again). Returns how many were
    /// finished.
    pub async fn recover(&self) -> Result<usize> {
        let c = self.c();
        let settings = c.settings();
        c.abandon_server_runs().await?;
        let mut finished = 0;
        for entry in c.pending_landings().await? {
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
                self.integrated(
                    &task,
                    &commit,
                    Some((entry.started_at, entry.train)),
                    note,
                    0,
                )
                .await?;
                tracing::warn!(task = %task.id, "finished an integration interrupted by a restart");
                finished += 1;
            } else {
                c.abort_landing(&entry.task_id).await?;
                if !landed {
                    tracing::warn!(task = %task.id, "undid an integration interrupted before the base moved");
                }
            }
        }
        Ok(finished)
    }
}

/// Sleeps until `until`, or for ever without one.
/// What train selection needs of a task ([`train::select`]).
fn candidate(t: &Task) -> Candidate<TaskId> {
    Candidate {
        id: t.id.clone(),
        deps_pending: t.deps_pending,
        depends_on: t.depends_on.clone(),
    }
}

async fn sleep_until_or_never(until: Option<tokio::time::Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// The feedback for a cherry-pick conflict: git's messages, and what to do.
fn conflict_reason(
    base: &pipeline_core::git::BranchName,
    onto: &CommitId,
    conflict: &str,
) -> String {
    format!(
        "the commit does not apply to {base} at {onto} (cherry-pick conflict); redo the task on \
         the current base:\n{conflict}"
    )
}

/// The first `max` bytes of one line, marked when cut.
fn line_start(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_owned();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// The last `max` bytes of one line, marked when cut.
fn line_end(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_owned();
    }
    let mut start = line.len() - max;
    while !line.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &line[start..])
}

/// The red base `commit` whose build (for `namespace`) failed with `why` (the failing command
/// and the tail of its output), as people are told of it: the commit, the command, the last
/// line of the output, and what ends it.
fn red_base(
    base: &pipeline_core::git::BranchName,
    commit: CommitId,
    why: &str,
    namespace: Option<String>,
) -> RedBase {
    let lines: Vec<&str> = why
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let command = lines.first().map_or_else(
        || "its build failed".to_owned(),
        |l| line_start(l.trim_end_matches(':'), 300),
    );
    let said = match lines.as_slice() {
        [_, .., last] => format!(" (its output ends: {})", line_end(last, 300)),
        _ => String::new(),
    };
    RedBase {
        reason: format!(
            "the base {base} at {commit} fails its own build: {command}{said}; nothing is \
             leased or landed and no one is charged until {base} is green again (push a fix) \
             or pipelinectl queue resume"
        ),
        commit,
        namespace,
        digest: None,
    }
}
