//! One merge train, as a pure state machine: it says what to do next ([`Step`]) and is told
//! what came of it ([`Input`]); the driver in [`super`] does the git, the builds, the journal
//! and the swap. So every path (conflicts, a red tip and the search for its culprit, a red
//! base, skipped builds, a base that moves under the train, a task that changes meanwhile) is
//! unit-tested without a repository.
//!
//! ```text
//! ReadTip ─▶ members already on the base are recorded as landed
//!    │
//!    ▼
//! Pick each member onto the chain ─conflict─▶ PickAlone onto the tip: conflicts there too →
//!    │                                         charged; applies alone → waits for the next train
//!    ▼
//! Build the chain's tip Pk (unless its tree is known green, or nothing can be built)
//!    │ green                       │ red
//!    ▼                             ▼
//! Journal P1…Pk, Swap        Bisect: build the middle of the prefixes not yet known, until the
//!    │                       first red prefix Pc is found (no prefix built twice; Pk is red).
//!    ▼                       c = 1 and the base not known green: build the base alone; red →
//! Done: all landed           landing pauses (no one is charged).
//!                            Otherwise P1…Pc-1 land (Journal, Swap), the culprit Pc is charged
//!                            with its build's output, and Pc+1…Pk wait for the next train,
//!                            uncharged, their commits re-chained there.
//! ```
//!
//! A lost swap (the base moved: someone pushed) forms the train again on the new tip, at most
//! [`MAX_SWAP_ATTEMPTS`] times. Nothing is charged until the base has moved (or needed not).

use std::collections::HashSet;

use pipeline_core::ids::{CommitId, TreeId};

/// How many times a train is formed again because the base moved under it before the
/// integrator gives up for now (the tasks are tried again on the next wake).
pub const MAX_SWAP_ATTEMPTS: usize = 20;

/// A task in the train, in train order.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// The task's commit (its patchset) and that commit's parent.
    pub commit: CommitId,
    pub parent: CommitId,
    /// The tree the runner verified under the server's own verification, when it did.
    pub verified_tree: Option<TreeId>,
    /// The members (indexes, all earlier) this one depends on: it cannot land without them.
    pub after: Vec<usize>,
    /// Whether the server's verification has anything to build for it (under `bild`, a task
    /// without a namespace has not).
    pub buildable: bool,
    /// What a build covering it builds for it: its namespace when the server's verification
    /// builds each namespace on its own (`bild`), else `None` (one build covers every task).
    pub scope: Option<String>,
}

pub use crate::landing::Green;

/// What the train needs to know besides its members.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub members: Vec<Member>,
    /// Why no build can change the outcome whatever the trees (verification off, nothing to
    /// build), if so.
    pub never_build: Option<String>,
    /// Trees built green under the server's verification (recently landed tips), each with
    /// the scope it was built for.
    pub green: HashSet<Green>,
    /// How many builds may run at once (the builder's slots; 0 counts as 1). With more than
    /// one, a red tip's prefixes are built in waves ([`Step::BuildMany`]) instead of one at
    /// a time.
    pub slots: usize,
    /// A speculative train: its first formation sits on the tip of the train ahead of it as if
    /// that had landed (the driver's answer to [`Step::ReadTip`]), and nothing it decides
    /// takes effect before [`Step::Confirm`] says the train ahead landed exactly that tip.
    pub speculative: bool,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Read the base tip (following the push remote, if any), its tree, and which members'
    /// own landed commits are on it already.
    ReadTip,
    /// Cherry-pick member `member`'s commit onto `onto` (the chain so far) and write the
    /// integrated commit.
    Pick { member: usize, onto: CommitId },
    /// Cherry-pick member `member`'s commit onto the base tip alone, only to learn whether it
    /// conflicts with the base or only with the train before it (nothing is written).
    PickAlone { member: usize, tip: CommitId },
    /// Build `commit`: the chain's prefix of `len` commits (0: the base tip alone).
    Build { len: usize, commit: CommitId },
    /// Build each of these prefixes (`len`, `commit`, as [`Step::Build`]) at once: a wave of
    /// the search for the first red prefix, when the builder has slots to spare.
    BuildMany { builds: Vec<(usize, CommitId)> },
    /// Record the move of the base from `tip` to `commit` (the prefix of `len`) in the journal,
    /// for every member in that prefix (only if each is still Verified with that patchset).
    Journal {
        len: usize,
        tip: CommitId,
        commit: CommitId,
    },
    /// Push (with `--push-remote`) and move the base from `tip` to `commit` (the prefix of
    /// `len`, journaled).
    Swap {
        len: usize,
        tip: CommitId,
        commit: CommitId,
    },
    /// A speculative train is about to journal a landing or to end: wait for the train ahead
    /// of it and say whether it landed exactly the tip this train was formed on
    /// ([`Input::Ahead`]).
    Confirm,
    /// Over.
    Done(Outcome),
}

/// What came of the last step.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The tip, its tree, and the members whose own landed commit is on it already.
    Tip {
        tip: CommitId,
        tree: TreeId,
        landed: Vec<(usize, CommitId)>,
    },
    /// The cherry-pick: the integrated commit and its tree, or git's conflict messages.
    Picked(Result<(CommitId, TreeId), String>),
    /// The pick onto the tip alone: `None` if it applies, git's conflict messages if not.
    PickedAlone(Option<String>),
    /// The build: passed, or failed with why (the tail of its output).
    Built(Result<(), String>),
    /// The builds of a [`Step::BuildMany`], in its order.
    BuiltMany(Vec<Result<(), String>>),
    /// The journal: written, or the member that changed meanwhile (nothing written).
    Journaled(Result<(), usize>),
    /// Whether the base (and the remote) moved to the commit (false: it moved first).
    Swapped(bool),
    /// What became of the train ahead: it landed exactly the guessed tip (`Some(true)`: what
    /// this train decided stands), the base is elsewhere (`Some(false)`: formed again on the
    /// real base, nothing charged), or it could not finish (`None`: every member waits for
    /// a later train, uncharged).
    Ahead(Option<bool>),
}

/// What became of one member.
#[derive(Clone, Debug, PartialEq)]
pub enum Fate {
    /// On the base now as `commit`.
    Landed { commit: CommitId },
    /// Its own commit was on the base already.
    AlreadyLanded { commit: CommitId },
    /// It is the reason it cannot land (a conflict with the base, the first red commit):
    /// charged, with why.
    Failed { reason: String },
    /// Not landed, through no fault of its own (behind the culprit, a conflict only with the
    /// train before it, a dependency left out, a red base, another member changed): it waits
    /// for the next train, uncharged, with why.
    Requeued { reason: String },
}

/// How the train ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Each member's fate, by index.
    pub fates: Vec<Fate>,
    /// How many builds covered each member.
    pub builds: Vec<u32>,
    /// How many builds the train ran (the base's included).
    pub total_builds: u32,
    /// The base tip the train was formed on, and where the base is after it.
    pub tip: Option<CommitId>,
    pub new_tip: Option<CommitId>,
    /// The first red commit of the chain, when one was found.
    pub red: Option<CommitId>,
    /// Why no build ran, when none did.
    pub skipped: Option<String>,
    /// The base itself fails its build: landing pauses with this reason.
    pub red_base: Option<String>,
    /// The base kept moving; nothing was decided.
    pub gave_up: bool,
    /// The trees this train built green (the base's included), with their scopes, to
    /// remember.
    pub green_trees: Vec<Green>,
}

/// A Verified task the next train may take, in landing order.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<Id> {
    pub id: Id,
    /// How many of its dependencies are not Done.
    pub deps_pending: u32,
    pub depends_on: Vec<Id>,
}

/// Picks the next train: up to `max` candidates in landing order, each of whose dependencies
/// are Done or earlier in the same train (so a dependency always comes before its dependent).
/// Returns each chosen candidate's index with the members it depends on.
pub fn select<Id: PartialEq>(candidates: &[Candidate<Id>], max: usize) -> Vec<(usize, Vec<usize>)> {
    let mut chosen: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut taken = vec![false; candidates.len()];
    // A dependent may come before its dependency in landing order: go round until no
    // candidate can join any more.
    loop {
        let mut grew = false;
        for (i, c) in candidates.iter().enumerate() {
            if chosen.len() >= max {
                return chosen;
            }
            if taken[i] {
                continue;
            }
            let after: Vec<usize> = chosen
                .iter()
                .enumerate()
                .filter(|(_, (j, _))| c.depends_on.contains(&candidates[*j].id))
                .map(|(member, _)| member)
                .collect();
            // Every dependency not Done is Verified and in the train already.
            if after.len() as u32 >= c.deps_pending {
                taken[i] = true;
                chosen.push((i, after));
                grew = true;
            }
        }
        if !grew {
            return chosen;
        }
    }
}

/// One link of the chain: a member and its commit on the one before.
#[derive(Clone, Debug, PartialEq)]
struct Link {
    member: usize,
    commit: CommitId,
    tree: TreeId,
}

/// The search for the first red prefix: prefixes up to `green` are known green (0: the base,
/// assumed green until shown otherwise), the prefix of `red` is known red.
#[derive(Clone, Debug, PartialEq)]
struct Search {
    green: usize,
    red: usize,
    /// The failing build's output for the prefix of `red`.
    why: String,
    /// The base's own build failed (built in a wave beside the prefixes), with why: it
    /// decides only if the first prefix turns out red.
    base_red: Option<String>,
}

/// One merge train.
#[derive(Clone, Debug)]
pub struct Train {
    plan: Plan,
    swaps: usize,
    tip: Option<(CommitId, TreeId)>,
    fates: Vec<Option<Fate>>,
    chain: Vec<Link>,
    builds: Vec<u32>,
    total_builds: u32,
    search: Option<Search>,
    /// Built red or green, by prefix length, in this formation.
    built: Vec<Option<bool>>,
    skipped: Option<String>,
    /// Trees built green, over every formation.
    green_trees: Vec<Green>,
    /// What is to be landed once the swap succeeds: the prefix length, and the culprit with
    /// its reason.
    landing: Option<(usize, Option<(usize, String)>)>,
    /// While the tip is the train ahead's guessed tip: the step held back until it is
    /// confirmed ([`Step::Confirm`]).
    guess: bool,
    held: Option<Step>,
    step: Step,
}

impl Train {
    pub fn new(plan: Plan) -> Self {
        let n = plan.members.len();
        let guess = plan.speculative;
        Self {
            plan,
            swaps: 0,
            tip: None,
            fates: vec![None; n],
            chain: Vec::new(),
            builds: vec![0; n],
            total_builds: 0,
            search: None,
            built: Vec::new(),
            skipped: None,
            green_trees: Vec::new(),
            landing: None,
            guess,
            held: None,
            step: Step::ReadTip,
        }
    }

    /// What to do now.
    pub fn step(&self) -> &Step {
        &self.step
    }

    /// The members in the chain now, in order, for the queue view.
    pub fn chained(&self) -> Vec<usize> {
        self.chain.iter().map(|l| l.member).collect()
    }

    /// How many builds ran so far.
    pub fn total_builds(&self) -> u32 {
        self.total_builds
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// How many builds covered each member so far.
    pub fn builds(&self) -> &[u32] {
        &self.builds
    }

    /// Whether the current formation sits on a guess (the train ahead's tip, not landed yet):
    /// [`Step::ReadTip`] is then answered with that guess.
    pub fn guessing(&self) -> bool {
        self.guess
    }

    /// Whether this formation's chain tip is known not to land as it is: a build of it came
    /// back red (the search for its culprit is on, or over). The train behind must not build
    /// on it: the driver withdraws it as the guess of the train behind.
    pub fn doomed(&self) -> bool {
        self.search.is_some()
    }

    /// The train ahead withdrew the tip this one is built on (its own tip came back red, or it
    /// was formed again): whatever this one was doing on the guess is dropped, and it waits
    /// for the train ahead to end ([`Step::Confirm`]), to be formed again on the real base.
    pub fn guess_withdrawn(&mut self) {
        if self.guess {
            self.held = None;
            self.step = Step::Confirm;
        }
    }

    /// The tip this train would leave the base at if every member in its chain landed: the
    /// chain's last commit and its tree, or the base tip when the chain is empty. What a
    /// train behind it guesses; `None` before the tip is read.
    pub fn chain_tip(&self) -> Option<(CommitId, TreeId)> {
        match self.chain.last() {
            Some(l) => Some((l.commit.clone(), l.tree.clone())),
            None => self.tip.clone(),
        }
    }

    /// Whether every member is placed (picked into the chain or left out), so that
    /// [`Train::chain_tip`] is final for this formation.
    pub fn placed(&self) -> bool {
        !matches!(
            self.step,
            Step::ReadTip | Step::Pick { .. } | Step::PickAlone { .. }
        )
    }

    /// The base tip of the current formation.
    pub fn base_tip(&self) -> Option<&CommitId> {
        self.tip.as_ref().map(|(c, _)| c)
    }

    /// The member's commit in the chain, once it is picked.
    pub fn link(&self, member: usize) -> Option<&CommitId> {
        self.chain
            .iter()
            .find(|l| l.member == member)
            .map(|l| &l.commit)
    }

    /// The members of the chain's prefix of `len`, in order.
    pub fn prefix(&self, len: usize) -> Vec<usize> {
        self.chain.iter().take(len).map(|l| l.member).collect()
    }

    fn tip_commit(&self) -> CommitId {
        self.tip.as_ref().map(|(c, _)| c.clone()).expect("tip read")
    }

    /// Starts a formation on a freshly read tip: everything but the fates decided for good
    /// (landed already) is forgotten.
    fn reform(&mut self, tip: CommitId, tree: TreeId, landed: Vec<(usize, CommitId)>) -> Step {
        self.tip = Some((tip, tree));
        for fate in &mut self.fates {
            if !matches!(fate, Some(Fate::AlreadyLanded { .. })) {
                *fate = None;
            }
        }
        for (member, commit) in landed {
            if let Some(slot) = self.fates.get_mut(member) {
                *slot = Some(Fate::AlreadyLanded { commit });
            }
        }
        self.chain.clear();
        self.search = None;
        self.built.clear();
        self.skipped = None;
        self.landing = None;
        self.next_pick(0)
    }

    /// The next member from `from` on still to be picked (its dependencies all in the chain
    /// or landed), the others requeued; or the first build once every member is placed.
    fn next_pick(&mut self, from: usize) -> Step {
        for member in from..self.plan.members.len() {
            if self.fates[member].is_some() {
                continue;
            }
            let missing = self.plan.members[member].after.iter().copied().find(|dep| {
                !self.chain.iter().any(|l| l.member == *dep)
                    && !matches!(self.fates.get(*dep), Some(Some(Fate::AlreadyLanded { .. })))
            });
            if let Some(dep) = missing {
                self.fates[member] = Some(Fate::Requeued {
                    reason: format!("its dependency (member {}) is not in this train", dep + 1),
                });
                continue;
            }
            let onto = self
                .chain
                .last()
                .map_or_else(|| self.tip_commit(), |l| l.commit.clone());
            return Step::Pick { member, onto };
        }
        self.first_build()
    }

    /// Whether the prefix of `len` needs no build: nothing can be built, or its tree is known
    /// green (a landed tip, or the tree the runner verified under the server's verification).
    fn known_green(&self, len: usize) -> Option<String> {
        self.known_green_by_server(len)
            .or_else(|| self.claimed_green(len))
    }

    /// Whether the prefix of `len` needs no build on the server's own knowledge: nothing can be
    /// built, or the server built its tree green before. Never a runner's claim: the search
    /// for a culprit rests on this only, so that no task is charged because another task's
    /// runner said its commit was green.
    fn known_green_by_server(&self, len: usize) -> Option<String> {
        if let Some(why) = &self.plan.never_build {
            return Some(why.clone());
        }
        if len > 0
            && !self.chain[..len]
                .iter()
                .any(|l| self.plan.members[l.member].buildable)
        {
            return Some(if len == 1 {
                "the task has no namespace".to_owned()
            } else {
                "no task in it has a namespace".to_owned()
            });
        }
        let tree = self.tree_of(len)?;
        let scopes = self.scopes(len);
        if !scopes.is_empty()
            && scopes
                .into_iter()
                .all(|s| self.plan.green.contains(&(tree.clone(), s)))
        {
            return Some("the tree was built green before".to_owned());
        }
        None
    }

    /// Whether a runner said it verified the prefix's tree under the server's verification
    /// (a member alone on the base it was leased on). Its word, unchecked: it may let the
    /// train's tip land without a build, but never decides whom a red build blames.
    fn claimed_green(&self, len: usize) -> Option<String> {
        let tree = self.tree_of(len)?;
        let verified = self.chain[..len]
            .iter()
            .any(|l| self.plan.members[l.member].verified_tree.as_ref() == Some(&tree));
        verified
            .then(|| "the tree is the one the runner verified (the base did not move)".to_owned())
    }

    /// The tree of the prefix of `len` (0: the base tip's).
    fn tree_of(&self, len: usize) -> Option<TreeId> {
        match len {
            0 => self.tip.as_ref().map(|(_, t)| t.clone()),
            n => self.chain.get(n - 1).map(|l| l.tree.clone()),
        }
    }

    /// What a build of the prefix of `len` builds: the scopes of its buildable members (the
    /// base alone is built for the first member's).
    fn scopes(&self, len: usize) -> Vec<Option<String>> {
        let members = &self.chain[..len.max(1).min(self.chain.len())];
        let mut scopes: Vec<Option<String>> = members
            .iter()
            .map(|l| &self.plan.members[l.member])
            .filter(|m| m.buildable || len == 0)
            .map(|m| m.scope.clone())
            .collect();
        scopes.sort();
        scopes.dedup();
        scopes
    }

    fn first_build(&mut self) -> Step {
        let k = self.chain.len();
        if k == 0 {
            return self.done(None);
        }
        self.built = vec![None; k + 1];
        if let Some(why) = self.known_green(k) {
            // A tree that lands on a runner's word alone is not remembered green: that word
            // may let its own task land, never charge another (a failure on the base it
            // becomes is judged on the server's own build of it).
            self.skipped = Some(why);
            return self.land(k, None);
        }
        Step::Build {
            len: k,
            commit: self.chain[k - 1].commit.clone(),
        }
    }

    /// How many builds may run at once.
    fn slots(&self) -> usize {
        self.plan.slots.max(1)
    }

    /// The next step of the search for the first red prefix.
    fn bisect(&mut self) -> Step {
        let Some(search) = self.search.clone() else {
            return self.land(self.chain.len(), None);
        };
        if search.red - search.green > 1 && self.slots() > 1 {
            return self.wave(&search);
        }
        if search.red - search.green > 1 {
            let mid = (search.green + search.red) / 2;
            if self.known_green_by_server(mid).is_some() {
                self.built[mid] = Some(true);
                self.search.as_mut().expect("search").green = mid;
                return self.bisect();
            }
            return Step::Build {
                len: mid,
                commit: self.chain[mid - 1].commit.clone(),
            };
        }
        // The culprit is the commit that makes prefix `red` red.
        if search.red == 1 && self.known_green_by_server(0).is_none() {
            match (&self.built[0], search.base_red) {
                // Its base may be the red one: build the base alone.
                (None, _) => {
                    return Step::Build {
                        len: 0,
                        commit: self.tip_commit(),
                    };
                }
                (Some(false), Some(why)) => return self.red_base(why),
                _ => {}
            }
        }
        let culprit = self.chain[search.red - 1].member;
        self.land(search.red - 1, Some((culprit, search.why)))
    }

    /// A wave of the search: the prefixes strictly between the last known green and the first
    /// known red, all of them if the slots allow, else `slots` of them evenly spaced (an
    /// (S+1)-ary search); and the base alone beside them when the search may end on it and a
    /// slot is left. Prefixes the server knows green move the search on without a build.
    fn wave(&mut self, search: &Search) -> Step {
        let slots = self.slots();
        let (lo, hi) = (search.green, search.red);
        let mut points: Vec<usize> = if hi - lo - 1 <= slots {
            (lo + 1..hi).collect()
        } else {
            (1..=slots)
                .map(|j| lo + j * (hi - lo) / (slots + 1))
                .collect()
        };
        points.retain(|p| *p > lo && *p < hi);
        points.dedup();
        if let Some(green) = points
            .iter()
            .rev()
            .copied()
            .find(|p| self.known_green_by_server(*p).is_some())
        {
            self.built[green] = Some(true);
            self.search.as_mut().expect("search").green = green;
            return self.bisect();
        }
        let mut builds: Vec<(usize, CommitId)> = points
            .into_iter()
            .map(|len| (len, self.chain[len - 1].commit.clone()))
            .collect();
        if lo == 0
            && builds.len() < slots
            && self.built[0].is_none()
            && self.known_green_by_server(0).is_none()
        {
            builds.insert(0, (0, self.tip_commit()));
        }
        match builds.as_slice() {
            [(len, commit)] => Step::Build {
                len: *len,
                commit: commit.clone(),
            },
            _ => Step::BuildMany { builds },
        }
    }

    /// Counts a build of the prefix of `len` (0: the base) and what it showed.
    fn record_build(&mut self, len: usize, green: bool) {
        self.total_builds += 1;
        for link in &self.chain[..len] {
            self.builds[link.member] += 1;
        }
        self.built[len] = Some(green);
        if green && let Some(tree) = self.tree_of(len) {
            for scope in self.scopes(len) {
                self.green_trees.push((tree.clone(), scope));
            }
        }
    }

    /// The base fails its own build (`why`): nothing lands, no one is charged, landing pauses.
    fn red_base(&mut self, why: String) -> Step {
        let tip = self.tip_commit();
        let mut step = self.requeue_all(&format!(
            "the base at {tip} fails its own build; landing is paused"
        ));
        if let Step::Done(outcome) = &mut step {
            outcome.red_base = Some(why);
        }
        step
    }

    /// Takes a wave's results: the first red prefix among them bounds the search from above,
    /// the last green one below it from below (a prefix green after a red one is a later
    /// fix: the first red one is what counts, as in the search one at a time).
    fn waved(&mut self, builds: &[(usize, CommitId)], results: Vec<Result<(), String>>) -> Step {
        for ((len, _), result) in builds.iter().zip(&results) {
            self.record_build(*len, result.is_ok());
        }
        let Some(mut search) = self.search.clone() else {
            return self.land(self.chain.len(), None);
        };
        for ((len, _), result) in builds.iter().zip(results) {
            match result {
                Err(why) if *len == 0 => search.base_red = Some(why),
                Err(why) if *len < search.red => {
                    search.red = *len;
                    search.why = why;
                }
                _ => {}
            }
        }
        for (len, _) in builds {
            if *len > search.green && *len < search.red && self.built[*len] == Some(true) {
                search.green = *len;
            }
        }
        self.search = Some(search);
        self.bisect()
    }

    /// Lands the prefix of `len` (journal, then swap), or ends at once if it is empty.
    fn land(&mut self, len: usize, culprit: Option<(usize, String)>) -> Step {
        self.landing = Some((len, culprit));
        if len == 0 {
            return self.settle();
        }
        Step::Journal {
            len,
            tip: self.tip_commit(),
            commit: self.chain[len - 1].commit.clone(),
        }
    }

    /// The landing is done (or needed no swap): every member gets its fate.
    fn settle(&mut self) -> Step {
        let (len, culprit) = self.landing.take().unwrap_or((0, None));
        let red = culprit.as_ref().map(|_| self.chain[len].commit.clone());
        for (i, link) in self.chain.clone().into_iter().enumerate() {
            let fate = if i < len {
                Fate::Landed {
                    commit: link.commit,
                }
            } else if culprit.as_ref().is_some_and(|(m, _)| *m == link.member) {
                Fate::Failed {
                    reason: culprit
                        .as_ref()
                        .map(|(_, why)| why.clone())
                        .unwrap_or_default(),
                }
            } else {
                Fate::Requeued {
                    reason: format!(
                        "a commit before it in the train ({}) failed the build; it waits for the \
                         next train",
                        red.as_ref().map_or_else(String::new, ToString::to_string)
                    ),
                }
            };
            self.fates[link.member] = Some(fate);
        }
        let new_tip = match len {
            0 => self.tip_commit(),
            n => self.chain[n - 1].commit.clone(),
        };
        let mut step = self.done(Some(new_tip));
        if let Step::Done(outcome) = &mut step {
            outcome.red = red;
        }
        step
    }

    /// Over: members without a fate are requeued.
    fn done(&mut self, new_tip: Option<CommitId>) -> Step {
        let fates = self
            .fates
            .iter()
            .map(|f| {
                f.clone().unwrap_or_else(|| Fate::Requeued {
                    reason: "the train ended before it was placed".to_owned(),
                })
            })
            .collect();
        Step::Done(Outcome {
            fates,
            builds: self.builds.clone(),
            total_builds: self.total_builds,
            tip: self.tip.as_ref().map(|(c, _)| c.clone()),
            new_tip,
            red: None,
            skipped: (self.total_builds == 0)
                .then(|| self.skipped.clone())
                .flatten(),
            red_base: None,
            gave_up: false,
            green_trees: self.green_trees.clone(),
        })
    }

    /// Every member not decided for good is requeued with `reason`, nothing landed.
    fn requeue_all(&mut self, reason: &str) -> Step {
        for fate in &mut self.fates {
            if !matches!(fate, Some(Fate::AlreadyLanded { .. })) {
                *fate = Some(Fate::Requeued {
                    reason: reason.to_owned(),
                });
            }
        }
        let tip = self.tip.as_ref().map(|(c, _)| c.clone());
        self.done(tip)
    }

    /// Takes what came of the current step; returns the next.
    pub fn on(&mut self, input: Input) -> &Step {
        let next = match (std::mem::replace(&mut self.step, Step::ReadTip), input) {
            (Step::ReadTip, Input::Tip { tip, tree, landed }) => self.reform(tip, tree, landed),
            (Step::Pick { member, .. }, Input::Picked(Ok((commit, tree)))) => {
                self.chain.push(Link {
                    member,
                    commit,
                    tree,
                });
                self.next_pick(member + 1)
            }
            (Step::Pick { member, onto }, Input::Picked(Err(conflict))) => {
                if self.chain.is_empty() || onto == self.tip_commit() {
                    self.fates[member] = Some(Fate::Failed { reason: conflict });
                    self.next_pick(member + 1)
                } else {
                    Step::PickAlone {
                        member,
                        tip: self.tip_commit(),
                    }
                }
            }
            (Step::PickAlone { member, .. }, Input::PickedAlone(conflict)) => {
                self.fates[member] = Some(match conflict {
                    None => Fate::Requeued {
                        reason: "it conflicts with a commit before it in the train, not with the \
                                 base; it waits for the next train"
                            .to_owned(),
                    },
                    Some(conflict) => Fate::Failed { reason: conflict },
                });
                self.next_pick(member + 1)
            }
            (Step::BuildMany { builds }, Input::BuiltMany(results))
                if results.len() == builds.len() =>
            {
                self.waved(&builds, results)
            }
            (Step::Build { len, .. }, Input::Built(result)) => {
                self.record_build(len, result.is_ok());
                match (len, result) {
                    (0, Ok(())) => self.bisect(),
                    (0, Err(why)) => self.red_base(why),
                    (len, Ok(())) => match &mut self.search {
                        None => self.land(len, None),
                        Some(search) => {
                            search.green = len;
                            self.bisect()
                        }
                    },
                    (len, Err(why)) => {
                        let search = self.search.get_or_insert(Search {
                            green: 0,
                            red: len,
                            why: why.clone(),
                            base_red: None,
                        });
                        search.red = len;
                        search.why = why;
                        self.bisect()
                    }
                }
            }
            (Step::Journal { .. }, Input::Journaled(Err(member))) => self.requeue_all(&format!(
                "member {} of the train changed while it was being integrated; the train is \
                 formed again",
                member + 1
            )),
            (Step::Journal { len, tip, commit }, Input::Journaled(Ok(()))) => {
                Step::Swap { len, tip, commit }
            }
            (Step::Confirm, Input::Ahead(Some(true))) => {
                self.guess = false;
                self.held.take().unwrap_or(Step::ReadTip)
            }
            (Step::Confirm, Input::Ahead(Some(false))) => {
                // Nothing decided on the guess stands: formed again on the real base.
                self.guess = false;
                self.held = None;
                Step::ReadTip
            }
            (Step::Confirm, Input::Ahead(None)) => {
                self.guess = false;
                self.held = None;
                let mut step = self.requeue_all(
                    "the train ahead of it, on whose tip it was built, did not finish; it waits \
                     for the next train",
                );
                if let Step::Done(outcome) = &mut step {
                    outcome.new_tip = None;
                }
                step
            }
            (Step::Swap { .. }, Input::Swapped(true)) => self.settle(),
            (Step::Swap { .. }, Input::Swapped(false)) => {
                self.swaps += 1;
                if self.swaps >= MAX_SWAP_ATTEMPTS {
                    let mut step = self.requeue_all("the base kept moving; tried again later");
                    if let Step::Done(outcome) = &mut step {
                        outcome.gave_up = true;
                    }
                    step
                } else {
                    Step::ReadTip
                }
            }
            // An input that does not answer the step: a driver bug, stop rather than guess.
            (step, input) => {
                tracing::error!(?step, ?input, "merge train: unexpected input");
                let mut step = self.requeue_all("the integrator lost its way; tried again later");
                if let Step::Done(outcome) = &mut step {
                    outcome.gave_up = true;
                }
                step
            }
        };
        // On a guess, nothing lands or ends before the train ahead is known to have landed it;
        // nor does a red tip's search for its culprit begin: the red may be the train ahead's
        // (its culprit is in the guess), and every prefix would be built red for nothing.
        self.step = match next {
            next @ (Step::Journal { .. } | Step::Done(_)) if self.guess => {
                self.held = Some(next);
                Step::Confirm
            }
            next @ (Step::Build { .. } | Step::BuildMany { .. })
                if self.guess && self.search.is_some() =>
            {
                self.held = Some(next);
                Step::Confirm
            }
            next => next,
        };
        &self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: usize) -> CommitId {
        CommitId::parse(&format!("{n:040x}")).expect("sha")
    }

    fn t(n: usize) -> TreeId {
        TreeId::parse(&format!("{:040x}", n + 0xf000)).expect("sha")
    }

    fn members(k: usize) -> Vec<Member> {
        (0..k)
            .map(|i| Member {
                commit: c(100 + i),
                parent: c(0),
                verified_tree: None,
                after: vec![],
                buildable: true,
                scope: None,
            })
            .collect()
    }

    /// Drives a train: the chain's commits are c(1..), trees t(1..); `red(len)` says whether
    /// the prefix of `len` builds red (0: the base); `conflicts` are members that conflict
    /// with the base, `chain_conflicts` ones that conflict only with the train.
    struct World {
        red: Box<dyn Fn(usize) -> bool>,
        conflicts: Vec<usize>,
        chain_conflicts: Vec<usize>,
        built: Vec<usize>,
        /// The build steps (one build, or a wave of them), in order: the builds' sizes.
        rounds: Vec<usize>,
        swap_fails: usize,
        /// The answer to [`Step::Confirm`] (a speculative train's), and the tips journaled.
        ahead: Option<Option<bool>>,
        journaled: Vec<CommitId>,
        confirms: usize,
    }

    impl World {
        fn new(red: impl Fn(usize) -> bool + 'static) -> Self {
            Self {
                red: Box::new(red),
                conflicts: vec![],
                chain_conflicts: vec![],
                built: vec![],
                rounds: vec![],
                swap_fails: 0,
                ahead: None,
                journaled: vec![],
                confirms: 0,
            }
        }

        fn run(&mut self, train: &mut Train) -> Outcome {
            let mut chain_len = 0;
            for _ in 0..1000 {
                let input = match train.step().clone() {
                    Step::ReadTip => {
                        chain_len = 0;
                        // A speculative train's first formation: the train ahead's tip.
                        let at = if train.guessing() { 900 } else { 0 };
                        self.built.clear();
                        Input::Tip {
                            tip: c(at),
                            tree: t(at),
                            landed: vec![],
                        }
                    }
                    Step::Confirm => {
                        self.confirms += 1;
                        Input::Ahead(self.ahead.expect("a speculative train's confirmation"))
                    }
                    Step::Pick { member, onto } => {
                        if self.conflicts.contains(&member)
                            || (self.chain_conflicts.contains(&member) && onto != c(0))
                        {
                            Input::Picked(Err(format!("conflict {member}")))
                        } else {
                            chain_len += 1;
                            Input::Picked(Ok((c(chain_len), t(chain_len))))
                        }
                    }
                    Step::PickAlone { member, .. } => Input::PickedAlone(
                        self.conflicts
                            .contains(&member)
                            .then(|| format!("conflict {member} with the base")),
                    ),
                    Step::Build { len, commit } => {
                        self.rounds.push(1);
                        Input::Built(self.build(len, &commit))
                    }
                    Step::BuildMany { builds } => {
                        assert!(builds.len() > 1, "a wave of one: {builds:?}");
                        self.rounds.push(builds.len());
                        Input::BuiltMany(
                            builds
                                .iter()
                                .map(|(len, commit)| self.build(*len, commit))
                                .collect(),
                        )
                    }
                    Step::Journal { tip, .. } => {
                        assert!(!train.guessing(), "journaled on a guess");
                        self.journaled.push(tip);
                        Input::Journaled(Ok(()))
                    }
                    Step::Swap { .. } => {
                        if self.swap_fails > 0 {
                            self.swap_fails -= 1;
                            self.built.clear();
                            Input::Swapped(false)
                        } else {
                            Input::Swapped(true)
                        }
                    }
                    Step::Done(outcome) => return outcome,
                };
                train.on(input);
            }
            panic!("the train did not end")
        }

        fn build(&mut self, len: usize, commit: &CommitId) -> Result<(), String> {
            assert!(!self.built.contains(&len), "prefix {len} built twice");
            if len > 0 {
                assert_eq!(*commit, c(len));
            }
            self.built.push(len);
            if (self.red)(len) {
                Err(format!("red {len}"))
            } else {
                Ok(())
            }
        }
    }

    fn plan(k: usize) -> Plan {
        Plan {
            members: members(k),
            ..Plan::default()
        }
    }

    fn landed(o: &Outcome) -> Vec<usize> {
        (0..o.fates.len())
            .filter(|i| matches!(o.fates[*i], Fate::Landed { .. }))
            .collect()
    }

    fn failed(o: &Outcome) -> Vec<usize> {
        (0..o.fates.len())
            .filter(|i| matches!(o.fates[*i], Fate::Failed { .. }))
            .collect()
    }

    fn requeued(o: &Outcome) -> Vec<usize> {
        (0..o.fates.len())
            .filter(|i| matches!(o.fates[*i], Fate::Requeued { .. }))
            .collect()
    }

    #[test]
    fn a_train_takes_dependencies_before_their_dependents_and_no_more_than_max() {
        let cand = |id: &'static str, deps: &[&'static str], pending: u32| Candidate {
            id,
            deps_pending: pending,
            depends_on: deps.to_vec(),
        };
        // b depends on a (Verified, later in landing order); d on something not Verified.
        let candidates = [
            cand("b", &["a"], 1),
            cand("a", &[], 0),
            cand("c", &["x"], 0),
            cand("d", &["y"], 1),
        ];
        let picked = select(&candidates, 8);
        assert_eq!(picked, vec![(1, vec![]), (2, vec![]), (0, vec![0])]);
        assert_eq!(select(&candidates, 1), vec![(1, vec![])]);
        assert!(select::<&str>(&[], 8).is_empty());
    }

    #[test]
    fn a_green_train_lands_with_one_build() {
        let mut w = World::new(|_| false);
        let o = w.run(&mut Train::new(plan(6)));
        assert_eq!(landed(&o), (0..6).collect::<Vec<_>>());
        assert_eq!(o.total_builds, 1);
        assert_eq!(w.built, vec![6]);
        assert_eq!(o.builds, vec![1; 6]);
        assert_eq!(o.new_tip, Some(c(6)));
    }

    #[test]
    fn the_first_red_commit_is_found_by_bisection_and_the_prefix_before_it_lands() {
        // Member 3 (the 4th) breaks the build: every prefix from 4 on is red.
        let mut w = World::new(|len| len >= 4);
        let o = w.run(&mut Train::new(plan(8)));
        assert_eq!(landed(&o), vec![0, 1, 2]);
        assert_eq!(failed(&o), vec![3]);
        assert_eq!(requeued(&o), vec![4, 5, 6, 7]);
        assert_eq!(o.red, Some(c(4)));
        assert_eq!(o.new_tip, Some(c(3)));
        // 8 red, 4 red, 2 green, 3 green: each once.
        assert_eq!(w.built, vec![8, 4, 2, 3]);
        assert_eq!(o.total_builds, 4);
        let Fate::Failed { reason } = &o.fates[3] else {
            panic!()
        };
        assert_eq!(reason, "red 4", "the culprit's own build's output");
    }

    #[test]
    fn every_position_of_the_culprit_is_found_without_building_a_prefix_twice() {
        for k in 1..=9 {
            for culprit in 1..=k {
                let mut w = World::new(move |len| len >= culprit);
                let mut p = plan(k);
                // The base is known green, so a culprit in first place is not the base's fault.
                p.green.insert((t(0), None));
                let o = w.run(&mut Train::new(p));
                assert_eq!(failed(&o), vec![culprit - 1], "k={k} culprit={culprit}");
                assert_eq!(landed(&o), (0..culprit - 1).collect::<Vec<_>>());
                assert!(o.total_builds as usize <= 1 + (k as f64).log2().ceil() as usize);
            }
        }
    }

    /// With a slot for every prefix, a red tip's culprit is found in one wave after the tip
    /// (a culprit costs about one build time), wherever it is, and no prefix is built twice;
    /// with fewer slots, in (slots + 1)-ary search waves.
    #[test]
    fn with_slots_to_spare_the_prefixes_are_built_at_once() {
        for slots in [2, 3, 8] {
            for k in 1..=9 {
                for culprit in 1..=k {
                    let mut w = World::new(move |len| len >= culprit);
                    let mut p = plan(k);
                    p.slots = slots;
                    p.green.insert((t(0), None));
                    let o = w.run(&mut Train::new(p));
                    let at = format!("slots={slots} k={k} culprit={culprit}");
                    assert_eq!(failed(&o), vec![culprit - 1], "{at}");
                    assert_eq!(landed(&o), (0..culprit - 1).collect::<Vec<_>>(), "{at}");
                    assert_eq!(
                        requeued(&o),
                        (culprit..k).collect::<Vec<_>>(),
                        "{at}: the tasks after it wait, uncharged"
                    );
                    assert_eq!(o.new_tip, Some(c(culprit - 1)), "{at}");
                    assert!(w.rounds.iter().all(|n| *n <= slots), "{at}: {:?}", w.rounds);
                    // The tip, then waves: with S slots each wave cuts the interval S+1 ways.
                    let mut waves = 0;
                    let mut left = k.saturating_sub(1);
                    while left > 0 {
                        waves += 1;
                        left /= slots + 1;
                    }
                    assert!(w.rounds.len() <= 1 + waves, "{at}: {:?}", w.rounds);
                    if slots + 1 >= k {
                        assert!(w.rounds.len() <= 2, "{at}: one wave: {:?}", w.rounds);
                    }
                }
            }
        }
    }

    /// In a wave, the base is built beside the prefixes when it is not known green and a slot
    /// is left: a red first commit then costs one wave, and a red base still pauses landing,
    /// charging no one; a red base that a member fixes decides nothing.
    #[test]
    fn a_wave_builds_the_base_beside_the_prefixes_and_a_red_base_still_charges_no_one() {
        let mut p = plan(4);
        p.slots = 4;
        let mut w = World::new(|_| true);
        let o = w.run(&mut Train::new(p.clone()));
        assert_eq!(w.built, vec![4, 0, 1, 2, 3]);
        assert_eq!(w.rounds, vec![1, 4]);
        assert!(o.red_base.is_some());
        assert!(failed(&o).is_empty() && landed(&o).is_empty());
        assert_eq!(requeued(&o), vec![0, 1, 2, 3]);
        // A green base: the first commit is the culprit, found in the same wave.
        let mut w = World::new(|len| len >= 1);
        let o = w.run(&mut Train::new(p.clone()));
        assert_eq!(w.rounds, vec![1, 4]);
        assert_eq!(failed(&o), vec![0]);
        assert!(o.red_base.is_none());
        // The base is red, the first member fixes it, the third breaks the build again: the
        // third is charged, the first two land.
        let mut w = World::new(|len| len == 0 || len >= 3);
        let o = w.run(&mut Train::new(p.clone()));
        assert_eq!(failed(&o), vec![2]);
        assert_eq!(landed(&o), vec![0, 1]);
        assert!(o.red_base.is_none());
        // No slot left for the base: it is built after, alone, only when the first is red.
        let mut p = plan(5);
        p.slots = 4;
        let mut w = World::new(|len| len >= 1);
        let o = w.run(&mut Train::new(p));
        assert_eq!(w.built, vec![5, 1, 2, 3, 4, 0]);
        assert_eq!(failed(&o), vec![0]);
    }

    /// A prefix the server knows green is not built in a wave: the search moves past it.
    #[test]
    fn a_wave_skips_a_prefix_known_green() {
        let mut p = plan(4);
        p.slots = 8;
        p.green.insert((t(0), None));
        p.green.insert((t(2), None));
        let mut w = World::new(|len| len >= 4);
        let o = w.run(&mut Train::new(p));
        assert_eq!(w.built, vec![4, 3]);
        assert_eq!(failed(&o), vec![3]);
        assert_eq!(landed(&o), vec![0, 1, 2]);
    }

    fn speculative(k: usize) -> Plan {
        Plan {
            speculative: true,
            ..plan(k)
        }
    }

    /// A speculative train whose train ahead lands exactly the guessed tip: its decisions
    /// stand once confirmed, and it lands on that tip without building again.
    #[test]
    fn a_speculative_train_lands_once_the_train_ahead_landed_its_guess() {
        let mut w = World::new(|len| len >= 3);
        w.ahead = Some(Some(true));
        let o = w.run(&mut Train::new(speculative(4)));
        assert_eq!(w.confirms, 1);
        assert_eq!(w.journaled, vec![c(900)], "journaled on the confirmed tip");
        assert_eq!(landed(&o), vec![0, 1]);
        assert_eq!(failed(&o), vec![2], "charged once confirmed");
        assert_eq!(o.tip, Some(c(900)));
        // Nothing to land and a member charged: confirmed before it ends, too.
        let mut w = World::new(|_| false);
        w.conflicts = vec![0];
        w.ahead = Some(Some(true));
        let o = w.run(&mut Train::new(speculative(1)));
        assert_eq!((w.confirms, failed(&o)), (1, vec![0]));
    }

    /// A speculative train whose train ahead did not land the guessed tip (it turned red): it
    /// is formed again and built on the real base, never journaled or landed on the guess, and
    /// nothing it found on the guess is charged.
    #[test]
    fn a_speculative_train_whose_train_ahead_turned_red_is_rebuilt_on_the_real_base() {
        // On the guess, member 1 looks red (say the train ahead broke it); on the real base
        // everything is green.
        let red_on_guess = std::rc::Rc::new(std::cell::Cell::new(true));
        let flag = std::rc::Rc::clone(&red_on_guess);
        let mut w = World::new(move |len| flag.get() && len >= 2);
        w.ahead = Some(Some(false));
        let mut train = Train::new(speculative(3));
        // Drive by hand up to the confirmation, then let the world go on.
        let mut steps = 0;
        while !matches!(train.step(), Step::Confirm) {
            let input = match train.step().clone() {
                Step::ReadTip => {
                    assert!(train.guessing());
                    Input::Tip {
                        tip: c(900),
                        tree: t(900),
                        landed: vec![],
                    }
                }
                Step::Pick { member, .. } => Input::Picked(Ok((c(member + 1), t(member + 1)))),
                Step::Build { len, commit } => Input::Built(w.build(len, &commit)),
                Step::BuildMany { builds } => Input::BuiltMany(
                    builds
                        .iter()
                        .map(|(len, commit)| w.build(*len, commit))
                        .collect(),
                ),
                other => panic!("unexpected before the confirmation: {other:?}"),
            };
            train.on(input);
            steps += 1;
            assert!(steps < 100);
        }
        assert!(train.guessing());
        red_on_guess.set(false);
        let o = w.run(&mut train);
        assert_eq!(w.journaled, vec![c(0)], "landed on the real base only");
        assert_eq!(landed(&o), vec![0, 1, 2]);
        assert!(
            failed(&o).is_empty(),
            "nothing found on the guess is charged"
        );
        assert_eq!(o.tip, Some(c(0)));
        assert!(o.total_builds >= 2, "built again on the real base");
    }

    /// The train ahead withdrew its guess while this one built on it (its own tip came back
    /// red): the build's answer is never taken, the train waits for the train ahead to end
    /// and is formed again on the real base; nothing decided on the guess is charged. A train
    /// whose tip came back red is doomed (its tip is no guess for the train behind).
    #[test]
    fn a_speculative_train_whose_guess_is_withdrawn_mid_build_waits_and_forms_again() {
        let mut w = World::new(|_| false);
        w.ahead = Some(Some(false));
        let mut train = Train::new(speculative(2));
        while !matches!(train.step(), Step::Build { .. }) {
            let input = match train.step().clone() {
                Step::ReadTip => Input::Tip {
                    tip: c(900),
                    tree: t(900),
                    landed: vec![],
                },
                Step::Pick { member, .. } => Input::Picked(Ok((c(member + 1), t(member + 1)))),
                other => panic!("unexpected before the build: {other:?}"),
            };
            train.on(input);
        }
        assert!(!train.doomed());
        train.guess_withdrawn();
        assert!(matches!(train.step(), Step::Confirm), "{:?}", train.step());
        assert_eq!(
            train.total_builds(),
            0,
            "the build on the guess is not counted"
        );
        let o = w.run(&mut train);
        assert_eq!(w.journaled, vec![c(0)], "landed on the real base only");
        assert_eq!(landed(&o), vec![0, 1]);
        assert!(failed(&o).is_empty());
        // A train not on a guess ignores it; one whose tip is red is doomed.
        let mut w = World::new(|len| len >= 2);
        let mut train = Train::new(plan(3));
        train.guess_withdrawn();
        assert!(matches!(train.step(), Step::ReadTip));
        let mut doomed_after = Vec::new();
        for _ in 0..100 {
            let input = match train.step().clone() {
                Step::ReadTip => Input::Tip {
                    tip: c(0),
                    tree: t(0),
                    landed: vec![],
                },
                Step::Pick { member, .. } => Input::Picked(Ok((c(member + 1), t(member + 1)))),
                Step::Build { len, commit } => Input::Built(w.build(len, &commit)),
                Step::BuildMany { builds } => Input::BuiltMany(
                    builds
                        .iter()
                        .map(|(len, commit)| w.build(*len, commit))
                        .collect(),
                ),
                Step::Journal { .. } => Input::Journaled(Ok(())),
                Step::Swap { .. } => Input::Swapped(true),
                _ => break,
            };
            let building = matches!(input, Input::Built(_) | Input::BuiltMany(_));
            train.on(input);
            if building {
                doomed_after.push(train.doomed());
            }
        }
        assert_eq!(
            doomed_after.first(),
            Some(&true),
            "the red tip dooms the chain tip at once: {doomed_after:?}"
        );
    }

    /// A red tip on the guess: no prefix is built before the train ahead is known to have
    /// landed that guess (its culprit may be what is red); once it has, the search goes on and
    /// charges the culprit.
    #[test]
    fn a_speculative_train_searches_a_red_tip_only_once_its_guess_is_confirmed() {
        let mut w = World::new(|len| len >= 2);
        let mut train = Train::new(speculative(4));
        let mut builds = 0;
        while !matches!(train.step(), Step::Confirm) {
            let input = match train.step().clone() {
                Step::ReadTip => Input::Tip {
                    tip: c(900),
                    tree: t(900),
                    landed: vec![],
                },
                Step::Pick { member, .. } => Input::Picked(Ok((c(member + 1), t(member + 1)))),
                Step::Build { len, commit } => {
                    builds += 1;
                    Input::Built(w.build(len, &commit))
                }
                other => panic!("unexpected before the confirmation: {other:?}"),
            };
            train.on(input);
        }
        assert_eq!(builds, 1, "the tip alone is built on the guess");
        // The train ahead landed the guess: the search goes on, and member 1 is charged.
        train.on(Input::Ahead(Some(true)));
        assert!(!train.guessing());
        assert!(
            matches!(train.step(), Step::Build { .. } | Step::BuildMany { .. }),
            "{:?}",
            train.step()
        );
        let o = w.run(&mut train);
        assert_eq!(landed(&o), vec![0]);
        assert_eq!(failed(&o), vec![1]);
        assert_eq!(requeued(&o), vec![2, 3]);
    }

    /// The train ahead could not finish (stopped, or an error): the speculative train's
    /// members all wait for a later train, uncharged, nothing landed.
    #[test]
    fn a_speculative_train_whose_train_ahead_did_not_finish_requeues_everyone() {
        let mut w = World::new(|len| len >= 1);
        w.ahead = Some(None);
        let o = w.run(&mut Train::new(speculative(3)));
        assert!(landed(&o).is_empty() && failed(&o).is_empty());
        assert_eq!(requeued(&o), vec![0, 1, 2]);
        assert!(w.journaled.is_empty());
        assert_eq!(o.new_tip, None);
    }

    #[test]
    fn a_red_first_commit_builds_the_base_and_a_red_base_pauses_landing_charging_no_one() {
        let mut w = World::new(|_| true);
        let o = w.run(&mut Train::new(plan(3)));
        assert_eq!(w.built, vec![3, 1, 0]);
        assert!(o.red_base.is_some());
        assert!(failed(&o).is_empty() && landed(&o).is_empty());
        assert_eq!(requeued(&o), vec![0, 1, 2]);
        // A green base: the first commit is the culprit.
        let mut w = World::new(|len| len >= 1);
        let o = w.run(&mut Train::new(plan(3)));
        assert_eq!(w.built, vec![3, 1, 0]);
        assert_eq!(failed(&o), vec![0]);
        assert!(o.red_base.is_none());
        assert_eq!(
            o.green_trees,
            vec![(t(0), None)],
            "the base, built green, is remembered"
        );
        // A base known green is not built.
        let mut w = World::new(|len| len >= 1);
        let mut p = plan(1);
        p.green.insert((t(0), None));
        let o = w.run(&mut Train::new(p));
        assert_eq!(w.built, vec![1]);
        assert_eq!(failed(&o), vec![0]);
    }

    #[test]
    fn a_tree_green_for_one_namespace_is_not_green_for_another() {
        // The base was built green for namespace a; a red first commit of namespace b has
        // the base built for b, and a base red for b charges no one.
        let mut p = plan(1);
        p.members[0].scope = Some("b".to_owned());
        p.green.insert((t(0), Some("a".to_owned())));
        let mut w = World::new(|_| true);
        let o = w.run(&mut Train::new(p.clone()));
        assert_eq!(w.built, vec![1, 0]);
        assert!(o.red_base.is_some());
        assert!(failed(&o).is_empty());
        // Built green for b as well, it is known green for b.
        p.green.insert((t(0), Some("b".to_owned())));
        let mut w = World::new(|len| len >= 1);
        let o = w.run(&mut Train::new(p));
        assert_eq!(w.built, vec![1]);
        assert_eq!(failed(&o), vec![0]);
        // A prefix built green covers every namespace in it.
        let mut p = plan(2);
        p.members[0].scope = Some("a".to_owned());
        p.members[1].scope = Some("b".to_owned());
        let mut w = World::new(|_| false);
        let o = w.run(&mut Train::new(p));
        assert_eq!(
            o.green_trees,
            vec![(t(2), Some("a".to_owned())), (t(2), Some("b".to_owned()))]
        );
    }

    #[test]
    fn a_conflict_with_the_base_is_charged_without_a_build_and_one_with_the_train_waits() {
        let mut w = World::new(|_| false);
        w.conflicts = vec![1];
        w.chain_conflicts = vec![3];
        let o = w.run(&mut Train::new(plan(5)));
        assert_eq!(failed(&o), vec![1]);
        assert_eq!(requeued(&o), vec![3]);
        assert_eq!(landed(&o), vec![0, 2, 4]);
        assert_eq!(o.total_builds, 1);
        // All conflicting: no build at all.
        let mut w = World::new(|_| false);
        w.conflicts = vec![0];
        let o = w.run(&mut Train::new(plan(1)));
        assert_eq!(failed(&o), vec![0]);
        assert_eq!(o.total_builds, 0);
        assert!(w.built.is_empty());
    }

    #[test]
    fn a_member_whose_dependency_left_the_train_waits_too() {
        let mut p = plan(3);
        p.members[2].after = vec![0];
        let mut w = World::new(|_| false);
        w.conflicts = vec![0];
        let o = w.run(&mut Train::new(p));
        assert_eq!(failed(&o), vec![0]);
        assert_eq!(requeued(&o), vec![2]);
        assert_eq!(landed(&o), vec![1]);
    }

    #[test]
    fn a_known_green_tree_is_not_built() {
        // A train of one whose tree is the one the runner verified.
        let mut p = plan(1);
        p.members[0].verified_tree = Some(t(1));
        let mut w = World::new(|_| panic!("no build"));
        let o = w.run(&mut Train::new(p));
        assert_eq!(landed(&o), vec![0]);
        assert_eq!(o.total_builds, 0);
        assert!(o.skipped.as_deref().is_some_and(|s| s.contains("verified")));
        assert!(
            o.green_trees.is_empty(),
            "a runner's word is not remembered as the server's knowledge: {:?}",
            o.green_trees
        );
        // Verification off: nothing is built, and no tree is known green by it.
        let mut p = plan(4);
        p.never_build = Some("verification is off".into());
        let o = World::new(|_| panic!("no build")).run(&mut Train::new(p));
        assert_eq!(landed(&o).len(), 4);
        assert!(o.green_trees.is_empty());
    }

    /// A runner that claims its commit green without building it must not get the task after
    /// it charged: in the search for the culprit, a prefix counts as green only on a build of
    /// the server's own, so the claimed prefix is built, and the claimant found red.
    #[test]
    fn a_runners_claim_never_decides_whom_a_red_build_blames() {
        let mut p = plan(2);
        // Member 0's runner verified its tree (the prefix of 1) and lied: it builds red.
        p.members[0].verified_tree = Some(t(1));
        let mut w = World::new(|len| len >= 1);
        let o = w.run(&mut Train::new(p));
        assert_eq!(failed(&o), vec![0], "the claimant is the culprit");
        assert_eq!(requeued(&o), vec![1], "the task after it waits, uncharged");
        assert!(landed(&o).is_empty());
        assert_eq!(
            w.built,
            vec![2, 1, 0],
            "the tip, the claimed prefix, the base"
        );
    }

    #[test]
    fn a_lost_swap_forms_the_train_again_on_the_new_tip() {
        let mut w = World::new(|_| false);
        w.swap_fails = 2;
        let o = w.run(&mut Train::new(plan(3)));
        assert_eq!(landed(&o), vec![0, 1, 2]);
        assert_eq!(o.total_builds, 3, "one build per formation");
        let mut w = World::new(|_| false);
        w.swap_fails = MAX_SWAP_ATTEMPTS;
        let o = w.run(&mut Train::new(plan(2)));
        assert!(o.gave_up);
        assert!(landed(&o).is_empty() && failed(&o).is_empty());
    }

    #[test]
    fn a_member_that_changed_before_the_journal_requeues_the_train_uncharged() {
        let mut train = Train::new(plan(2));
        train.on(Input::Tip {
            tip: c(0),
            tree: t(0),
            landed: vec![],
        });
        train.on(Input::Picked(Ok((c(1), t(1)))));
        train.on(Input::Picked(Ok((c(2), t(2)))));
        assert!(matches!(train.step(), Step::Build { len: 2, .. }));
        train.on(Input::Built(Ok(())));
        assert!(matches!(train.step(), Step::Journal { len: 2, .. }));
        let Step::Done(o) = train.on(Input::Journaled(Err(1))).clone() else {
            panic!()
        };
        assert_eq!(requeued(&o), vec![0, 1]);
    }

    #[test]
    fn members_already_on_the_base_are_recorded_and_the_rest_chained() {
        let mut train = Train::new(plan(2));
        let step = train
            .on(Input::Tip {
                tip: c(0),
                tree: t(0),
                landed: vec![(0, c(50))],
            })
            .clone();
        assert_eq!(
            step,
            Step::Pick {
                member: 1,
                onto: c(0)
            }
        );
    }
}
