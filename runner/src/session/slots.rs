//! The session's bookkeeping of its slots, pure (no IO, no clock, no tokio), so that each rule
//! is tested on its own:
//!
//! - A slot is free or holds one job, known by its lease. A job keeps its slot until it reports
//!   its end.
//! - An assignment that arrives while no slot is free is queued (at most one per slot): the
//!   server frees a slot as soon as it accepts a result, which can be before the job that
//!   delivered it has reported its end here. It starts in the next slot freed.
//! - A job the session stops is marked to be given back (a release: drain timeout, stop) or not
//!   (a cancellation: the server took the lease back, or no longer takes the runner's word).
//! - Infrastructure failures in a row are counted (a delivered result starts the count again);
//!   at `--max-infra-failures` the runner turns unhealthy and takes no more work until it is
//!   restarted.
//! - An agent that cannot work on this machine at all (no credentials, no network) makes the
//!   runner unhealthy at once; a provider's rate limit pauses it (no new work) until a time
//!   the session watches for.
//! - A full disk (the work dir's) is not counted towards `--max-infra-failures`, since it heals
//!   without a restart: it pauses the runner instead, for [`DISK_FULL_FIRST_PAUSE_MS`] doubling
//!   with each full disk in a row up to [`DISK_FULL_MAX_PAUSE_MS`]; at the end of each pause the
//!   session checks that the disk has room before the runner takes work again.
//! - Draining, the runner takes no more work, and it has finished once no job is left, running
//!   or queued.
//!
//! A job's handle `H` (the session's cancellation token) is kept with it, opaque.

use std::collections::{BTreeSet, HashMap, VecDeque};

use pipeline_core::ids::{LeaseRef, TaskId};

use crate::domain::{Assignment, JobEnd};

/// The first pause after the work dir's disk is found full (ms).
pub const DISK_FULL_FIRST_PAUSE_MS: i64 = 1_000;
/// The longest pause for a full disk (ms): a disk freed is found within this.
pub const DISK_FULL_MAX_PAUSE_MS: i64 = 300_000;

/// A lease to give back to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub lease: LeaseRef,
    pub reason: String,
    /// The runner could not do the work: recorded as its failure, never charged to the task.
    pub infrastructure: bool,
}

/// Why an assignment offered is given back at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    Draining,
    Unhealthy,
    /// No free slot and the queue full: the server gave the runner more than it has slots.
    NoSlot,
}

/// What to do with an assignment offered.
#[derive(Debug, PartialEq)]
pub enum Offer {
    /// Start it in this slot: it is the slot's job from now on.
    Start(Box<Assignment>, usize),
    /// Kept until a slot is freed.
    Queued(TaskId),
    /// Give it back.
    Refuse {
        task: TaskId,
        busy: Busy,
        release: Release,
    },
}

/// An infrastructure failure, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfraFailure {
    /// Failures in a row, this one included.
    pub in_a_row: u32,
    /// The first line of why.
    pub why: String,
    /// Whether this one made the runner unhealthy.
    pub turned_unhealthy: bool,
    /// A full disk (not counted in `in_a_row`): how long the runner now takes no work before it
    /// checks the disk again (ms).
    pub disk_full_pause_ms: Option<i64>,
}

/// Why the runner takes no work for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseCause {
    /// A provider's rate limit: over at its reset.
    RateLimit,
    /// The work dir's disk is full: over once it has room, checked at the pause's end.
    DiskFull,
}

/// What a job's end means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub task: TaskId,
    /// Its lease, when it must go back.
    pub release: Option<Release>,
    /// Set when it ended with an infrastructure failure.
    pub infra: Option<InfraFailure>,
}

struct Job<H> {
    lease: LeaseRef,
    task: TaskId,
    slot: usize,
    handle: H,
    /// Set when the session stops the job and must give its lease back.
    release: bool,
}

/// The runner's slots, its jobs and queued assignments, and its health.
pub struct Slots<H> {
    capacity: usize,
    free: BTreeSet<usize>,
    /// By lease ID.
    jobs: HashMap<String, Job<H>>,
    queued: VecDeque<Assignment>,
    draining: bool,
    max_infra_failures: u32,
    infra_failures: u32,
    /// Why the runner takes no work, once it has had too many infrastructure failures.
    unhealthy: Option<String>,
    /// Until when (ms since the epoch), why and for what it takes no new work.
    paused: Option<(i64, String, PauseCause)>,
    /// Full disks met in a row (a delivered result starts the count again): the back-off.
    disk_full_in_a_row: u32,
}

impl<H> Slots<H> {
    /// `capacity` free slots (numbered from 0); unhealthy after `max_infra_failures` in a row.
    pub fn new(capacity: u32, max_infra_failures: u32) -> Self {
        Self {
            capacity: capacity as usize,
            free: (0..capacity as usize).collect(),
            jobs: HashMap::new(),
            queued: VecDeque::new(),
            draining: false,
            max_infra_failures,
            infra_failures: 0,
            unhealthy: None,
            paused: None,
            disk_full_in_a_row: 0,
        }
    }

    /// Whether an assignment would find no free slot though the runner takes work: then the
    /// session first collects ends its jobs have reported but it has not yet read.
    pub fn needs_a_slot(&self) -> bool {
        !self.draining && self.unhealthy.is_none() && self.free.is_empty()
    }

    /// An assignment from the server; `handle` is kept with the job if it starts.
    pub fn offer(&mut self, a: Assignment, handle: H) -> Offer {
        if self.draining {
            let release = Release {
                lease: a.lease,
                reason: "the runner is draining".to_owned(),
                infrastructure: false,
            };
            return Offer::Refuse {
                task: a.task,
                busy: Busy::Draining,
                release,
            };
        }
        self.place(a, handle)
    }

    /// Starts the first queued assignment if a slot is free (draining or not: the runner took
    /// it before); `None` if there is none or no slot.
    pub fn start_queued(&mut self, handle: H) -> Option<Offer> {
        if self.free.is_empty() {
            return None;
        }
        let a = self.queued.pop_front()?;
        Some(self.place(a, handle))
    }

    fn place(&mut self, a: Assignment, handle: H) -> Offer {
        if let Some(why) = self.unhealthy() {
            let release = Release {
                lease: a.lease,
                reason: format!("the runner is unhealthy: {why}"),
                infrastructure: false,
            };
            return Offer::Refuse {
                task: a.task,
                busy: Busy::Unhealthy,
                release,
            };
        }
        let Some(slot) = self.free.pop_first() else {
            if self.queued.len() < self.capacity {
                let task = a.task.clone();
                self.queued.push_back(a);
                return Offer::Queued(task);
            }
            let release = Release {
                lease: a.lease,
                reason: "the runner had no free slot".to_owned(),
                infrastructure: false,
            };
            return Offer::Refuse {
                task: a.task,
                busy: Busy::NoSlot,
                release,
            };
        };
        self.jobs.insert(
            a.lease.id.clone(),
            Job {
                lease: a.lease.clone(),
                task: a.task.clone(),
                slot,
                handle,
                release: false,
            },
        );
        Offer::Start(Box::new(a), slot)
    }

    /// The job holding `lease_id` ended: its slot is free, its end counted towards the runner's
    /// health, and its lease must go back if it failed for the runner's reasons or the session
    /// stopped it to give it back (`stopping` says whether that was a stop or the end of a
    /// drain). `None` for a lease no job holds.
    pub fn ended(&mut self, lease_id: &str, end: &JobEnd, stopping: bool) -> Option<Ended> {
        let job = self.jobs.remove(lease_id)?;
        self.free.insert(job.slot);
        let infra = match end {
            JobEnd::Delivered(_) => {
                self.infra_failures = 0;
                self.disk_full_in_a_row = 0;
                None
            }
            JobEnd::Infra(why) => Some(self.infra_failure(why, false)),
            JobEnd::Unusable(why) => Some(self.infra_failure(why, true)),
            JobEnd::DiskFull { reason, at_ms } => Some(self.disk_full(reason, *at_ms)),
            JobEnd::RateLimited { reason, until_ms } => {
                self.paused = Some((*until_ms, reason.clone(), PauseCause::RateLimit));
                None
            }
            JobEnd::Refused(_) | JobEnd::Cancelled => None,
        };
        let release = match (end, job.release) {
            (
                JobEnd::Infra(why) | JobEnd::Unusable(why) | JobEnd::DiskFull { reason: why, .. },
                _,
            ) => Some((why.clone(), true)),
            (JobEnd::RateLimited { reason, .. }, _) => Some((reason.clone(), true)),
            (JobEnd::Cancelled, true) => Some((
                if stopping {
                    "the runner was stopped".to_owned()
                } else {
                    "the runner drained and its grace period ran out".to_owned()
                },
                false,
            )),
            _ => None,
        };
        Some(Ended {
            task: job.task,
            release: release.map(|(reason, infrastructure)| Release {
                lease: job.lease,
                reason,
                infrastructure,
            }),
            infra,
        })
    }

    /// An assignment refused at the edge (it could not be worked on): its lease goes back as
    /// the runner's failure, counted like a job's.
    pub fn refused(&mut self, lease: LeaseRef, why: &str) -> (Release, InfraFailure) {
        let infra = self.infra_failure(why, false);
        let release = Release {
            lease,
            reason: why.to_owned(),
            infrastructure: true,
        };
        (release, infra)
    }

    /// Counts an infrastructure failure; `at_once`: the next task would fail the same way, so
    /// the runner turns unhealthy now, in the failure's words.
    fn infra_failure(&mut self, why: &str, at_once: bool) -> InfraFailure {
        self.infra_failures = self.infra_failures.saturating_add(1);
        let first = pipeline_core::lines::one_line_reason(why);
        let turned_unhealthy =
            (at_once || self.infra_failures >= self.max_infra_failures) && self.unhealthy.is_none();
        if turned_unhealthy {
            self.unhealthy = Some(if at_once {
                first.clone()
            } else {
                format!(
                    "{} infrastructure failures in a row; last: {first}",
                    self.infra_failures
                )
            });
        }
        InfraFailure {
            in_a_row: self.infra_failures,
            why: first,
            turned_unhealthy,
            disk_full_pause_ms: None,
        }
    }

    /// A full disk at `at_ms` (`why` says so): the runner takes no work for a pause that
    /// doubles with each one in a row, not counted towards `--max-infra-failures`.
    fn disk_full(&mut self, why: &str, at_ms: i64) -> InfraFailure {
        let first = pipeline_core::lines::one_line_reason(why);
        let pause = self.pause_for_disk(&first, at_ms);
        InfraFailure {
            in_a_row: self.infra_failures,
            why: first,
            turned_unhealthy: false,
            disk_full_pause_ms: Some(pause),
        }
    }

    /// The disk was checked at `at_ms` and is still full (`why`): a longer pause; returns it
    /// (ms).
    pub fn still_full(&mut self, why: &str, at_ms: i64) -> i64 {
        self.pause_for_disk(why, at_ms)
    }

    fn pause_for_disk(&mut self, why: &str, at_ms: i64) -> i64 {
        let n = self.disk_full_in_a_row.min(20);
        self.disk_full_in_a_row = self.disk_full_in_a_row.saturating_add(1);
        let pause = DISK_FULL_FIRST_PAUSE_MS
            .saturating_mul(1 << n)
            .min(DISK_FULL_MAX_PAUSE_MS);
        let reason =
            format!("the work dir's disk is full; taking no work until it has room: {why}");
        // A rate limit that ends later still holds.
        match &self.paused {
            Some((until, _, PauseCause::RateLimit)) if *until > at_ms + pause => {}
            _ => self.paused = Some((at_ms + pause, reason, PauseCause::DiskFull)),
        }
        pause
    }

    /// The server took `lease` back: a queued assignment for it is forgotten; the job holding
    /// it (at that epoch), if any, is returned to be stopped. It is not given back.
    pub fn drop_lease(&mut self, lease: &LeaseRef) -> Option<(&TaskId, &H)> {
        self.queued.retain(|a| a.lease != *lease);
        self.jobs
            .get(&lease.id)
            .filter(|job| job.lease.epoch == lease.epoch)
            .map(|job| (&job.task, &job.handle))
    }

    /// Stops everything: every job's handle, to be stopped, and the queue is emptied. With
    /// `release` the jobs' leases go back when they end, and the queued ones now (returned).
    pub fn stop_all(&mut self, release: bool) -> (Vec<&H>, Vec<Release>) {
        let queued: Vec<Release> = std::mem::take(&mut self.queued)
            .into_iter()
            .filter(|_| release)
            .map(|a| Release {
                lease: a.lease,
                reason: "the runner stopped before starting it".to_owned(),
                infrastructure: false,
            })
            .collect();
        let handles = self
            .jobs
            .values_mut()
            .map(|job| {
                job.release |= release;
                &job.handle
            })
            .collect();
        (handles, queued)
    }

    /// The leases the runner holds: its jobs' and its queued assignments'.
    pub fn held(&self) -> Vec<LeaseRef> {
        self.jobs
            .values()
            .map(|j| j.lease.clone())
            .chain(self.queued.iter().map(|a| a.lease.clone()))
            .collect()
    }

    /// Running jobs (queued assignments not counted).
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Takes no more work from now on; true the first time.
    pub fn drain(&mut self) -> bool {
        !std::mem::replace(&mut self.draining, true)
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Draining with nothing left to do.
    pub fn finished(&self) -> bool {
        self.draining && self.jobs.is_empty() && self.queued.is_empty()
    }

    /// Why the runner takes no work: it is unhealthy, or paused by a rate limit or a full
    /// disk.
    pub fn unhealthy(&self) -> Option<&str> {
        self.unhealthy
            .as_deref()
            .or(self.paused.as_ref().map(|(_, why, _)| why.as_str()))
    }

    /// Until when (ms since the epoch) a rate limit or a full disk pauses the runner, and for
    /// which.
    pub fn paused_until(&self) -> Option<(i64, PauseCause)> {
        self.paused
            .as_ref()
            .map(|(until, _, cause)| (*until, *cause))
    }

    /// The pause is over (the rate limit reset, the disk has room): the runner takes work again
    /// (unless it is unhealthy).
    pub fn resume(&mut self) {
        self.paused = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::ids::CommitId;

    use crate::domain::{Outcome, RunId};

    fn assignment(task: &str) -> Assignment {
        let task = TaskId::parse(task).expect("task");
        Assignment {
            lease: LeaseRef::of(&task, 1),
            run_id: RunId::parse(&format!("dev-{task}-1")).expect("run id"),
            task,
            title: "a task".into(),
            namespace: None,
            base_branch: "main".into(),
            base: CommitId::parse(&"a".repeat(40)).expect("commit"),
            previous: None,
            patchset: 1,
            prompt: String::new(),
            verification: None,
            budget_cents: None,
            resume_session: None,
        }
    }

    fn lease(task: &str) -> LeaseRef {
        LeaseRef::of(&TaskId::parse(task).expect("task"), 1)
    }

    fn lease_id(task: &str) -> String {
        lease(task).id
    }

    /// Slots whose handles are the tasks' names.
    fn slots(capacity: u32) -> Slots<&'static str> {
        Slots::new(capacity, 3)
    }

    fn started(offer: Offer) -> usize {
        match offer {
            Offer::Start(_, slot) => slot,
            other => panic!("not started: {other:?}"),
        }
    }

    #[test]
    fn assignments_take_the_lowest_free_slot_and_a_job_ending_frees_it() {
        let mut s = slots(2);
        assert_eq!(started(s.offer(assignment("t-1"), "t-1")), 0);
        assert_eq!(started(s.offer(assignment("t-2"), "t-2")), 1);
        assert_eq!(s.jobs(), 2);
        assert!(s.needs_a_slot());
        let ended = s
            .ended(
                &lease_id("t-1"),
                &JobEnd::Delivered(Outcome::Verified),
                false,
            )
            .expect("a job");
        assert_eq!(ended.task.as_str(), "t-1");
        assert_eq!((ended.release, ended.infra), (None, None));
        assert!(!s.needs_a_slot());
        assert_eq!(started(s.offer(assignment("t-3"), "t-3")), 0);
        assert_eq!(
            s.ended(
                &lease_id("t-1"),
                &JobEnd::Delivered(Outcome::Verified),
                false
            ),
            None,
            "ended once"
        );
    }

    #[test]
    fn an_assignment_that_overtakes_its_slots_report_waits_for_it() {
        let mut s = slots(1);
        started(s.offer(assignment("t-1"), "t-1"));
        // The server took t-1's result and assigned t-2 before t-1's job reported its end.
        assert_eq!(
            s.offer(assignment("t-2"), "t-2"),
            Offer::Queued(TaskId::parse("t-2").expect("task"))
        );
        assert_eq!(s.held(), [lease("t-1"), lease("t-2")]);
        assert_eq!(s.start_queued("t-2"), None, "no free slot yet");
        // One queued per slot: beyond that the server is wrong, and it is given back.
        match s.offer(assignment("t-3"), "t-3") {
            Offer::Refuse { busy, release, .. } => {
                assert_eq!(busy, Busy::NoSlot);
                assert_eq!(release.lease, lease("t-3"));
                assert!(!release.infrastructure);
            }
            other => panic!("{other:?}"),
        }
        s.ended(
            &lease_id("t-1"),
            &JobEnd::Delivered(Outcome::Verified),
            false,
        );
        match s.start_queued("t-2") {
            Some(Offer::Start(a, 0)) => assert_eq!(a.task.as_str(), "t-2"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.start_queued("none"), None);
    }

    #[test]
    fn a_dropped_lease_is_cancelled_not_given_back() {
        let mut s = slots(1);
        started(s.offer(assignment("t-1"), "t-1"));
        s.offer(assignment("t-2"), "t-2");
        // The queued one is forgotten; the running one is handed out to be stopped.
        assert_eq!(s.drop_lease(&lease("t-2")), None);
        assert_eq!(s.held(), [lease("t-1")]);
        let other_epoch = LeaseRef::of(&TaskId::parse("t-1").expect("task"), 2);
        assert_eq!(s.drop_lease(&other_epoch), None, "another epoch's lease");
        let (task, handle) = s.drop_lease(&lease("t-1")).expect("the job");
        assert_eq!((task.as_str(), *handle), ("t-1", "t-1"));
        let ended = s
            .ended(&lease_id("t-1"), &JobEnd::Cancelled, false)
            .expect("a job");
        assert_eq!(ended.release, None);
    }

    #[test]
    fn stopped_jobs_are_released_when_they_end_and_cancelled_ones_are_not() {
        let mut s = slots(2);
        started(s.offer(assignment("t-1"), "t-1"));
        started(s.offer(assignment("t-2"), "t-2"));
        s.offer(assignment("t-3"), "t-3");
        let (mut handles, queued) = s.stop_all(true);
        handles.sort();
        assert_eq!(handles, [&"t-1", &"t-2"]);
        assert_eq!(
            queued,
            [Release {
                lease: lease("t-3"),
                reason: "the runner stopped before starting it".into(),
                infrastructure: false,
            }]
        );
        let drained = s.ended(&lease_id("t-1"), &JobEnd::Cancelled, false);
        let release = drained.and_then(|e| e.release).expect("given back");
        assert_eq!(
            release.reason,
            "the runner drained and its grace period ran out"
        );
        let stopped = s.ended(&lease_id("t-2"), &JobEnd::Cancelled, true);
        let release = stopped.and_then(|e| e.release).expect("given back");
        assert_eq!(release.reason, "the runner was stopped");

        // Stopped without releasing (the watchdog, a revoked runner): nothing goes back.
        let mut s = slots(1);
        started(s.offer(assignment("t-1"), "t-1"));
        s.offer(assignment("t-2"), "t-2");
        let (handles, queued) = s.stop_all(false);
        assert_eq!((handles.len(), queued.len()), (1, 0));
        assert_eq!(s.held(), [lease("t-1")]);
        let ended = s.ended(&lease_id("t-1"), &JobEnd::Cancelled, true);
        assert_eq!(ended.and_then(|e| e.release), None);
        // A job that finished its work anyway is not given back either.
        started(s.offer(assignment("t-4"), "t-4"));
        s.stop_all(true);
        let ended = s.ended(
            &lease_id("t-4"),
            &JobEnd::Delivered(Outcome::Verified),
            true,
        );
        assert_eq!(ended.and_then(|e| e.release), None);
    }

    #[test]
    fn an_unusable_agent_makes_the_runner_unhealthy_at_once() {
        let mut s = slots(2);
        started(s.offer(assignment("t-1"), "t-1"));
        let ended = s
            .ended(
                &lease_id("t-1"),
                &JobEnd::Unusable(
                    "claude cannot authenticate on this runner: Not logged in".into(),
                ),
                false,
            )
            .expect("a job");
        assert!(ended.infra.expect("counted").turned_unhealthy);
        assert!(ended.release.expect("given back").infrastructure);
        assert_eq!(
            s.unhealthy(),
            Some("claude cannot authenticate on this runner: Not logged in")
        );
    }

    #[test]
    fn a_rate_limit_pauses_the_runner_until_it_resets() {
        let mut s = slots(2);
        started(s.offer(assignment("t-1"), "t-1"));
        let ended = s
            .ended(
                &lease_id("t-1"),
                &JobEnd::RateLimited {
                    reason: "claude's rate limit was reached".into(),
                    until_ms: 5_000,
                },
                false,
            )
            .expect("a job");
        assert_eq!(ended.infra, None, "not counted as a failure");
        assert!(
            ended.release.expect("given back").infrastructure,
            "uncharged"
        );
        assert_eq!(s.paused_until(), Some((5_000, PauseCause::RateLimit)));
        assert_eq!(s.unhealthy(), Some("claude's rate limit was reached"));
        assert!(matches!(
            s.offer(assignment("t-2"), "t-2"),
            Offer::Refuse {
                busy: Busy::Unhealthy,
                ..
            }
        ));
        s.resume();
        assert_eq!(s.unhealthy(), None);
    }

    #[test]
    fn infrastructure_failures_in_a_row_make_the_runner_unhealthy() {
        let mut s = slots(1);
        let fail = |s: &mut Slots<&str>, task: &'static str| {
            started(s.offer(assignment(task), task));
            s.ended(
                &lease_id(task),
                &JobEnd::Infra("git: Too many open files\nmore".into()),
                false,
            )
            .expect("a job")
        };
        let first = fail(&mut s, "t-1");
        let release = first.release.expect("given back");
        assert!(release.infrastructure);
        assert_eq!(release.reason, "git: Too many open files\nmore");
        assert_eq!(
            first.infra,
            Some(InfraFailure {
                in_a_row: 1,
                why: "git: Too many open files … more".into(),
                turned_unhealthy: false,
                disk_full_pause_ms: None,
            })
        );
        fail(&mut s, "t-2");
        // A delivered result starts the count again.
        started(s.offer(assignment("t-3"), "t-3"));
        s.ended(
            &lease_id("t-3"),
            &JobEnd::Delivered(Outcome::Verified),
            false,
        );
        fail(&mut s, "t-4");
        fail(&mut s, "t-5");
        assert_eq!(s.unhealthy(), None);
        let third = fail(&mut s, "t-6");
        assert!(third.infra.expect("counted").turned_unhealthy);
        assert_eq!(
            s.unhealthy(),
            Some("3 infrastructure failures in a row; last: git: Too many open files … more")
        );
        assert!(!s.needs_a_slot(), "an unhealthy runner takes no work");
        match s.offer(assignment("t-7"), "t-7") {
            Offer::Refuse { busy, release, .. } => {
                assert_eq!(busy, Busy::Unhealthy);
                assert!(
                    release
                        .reason
                        .starts_with("the runner is unhealthy: 3 infrastructure")
                );
                assert!(!release.infrastructure);
            }
            other => panic!("{other:?}"),
        }
        // It turns unhealthy once, and stays so.
        let (_, again) = s.refused(lease("t-8"), "the assignment's base is invalid");
        assert!(!again.turned_unhealthy);
        assert_eq!(again.in_a_row, 4);
        assert!(s.unhealthy().is_some());
    }

    #[test]
    fn a_full_disk_pauses_the_runner_longer_each_time_and_counts_nothing() {
        let mut s = slots(1);
        let full = |s: &mut Slots<&str>, task: &'static str, at_ms: i64| {
            started(s.offer(assignment(task), task));
            s.ended(
                &lease_id(task),
                &JobEnd::DiskFull {
                    reason: "cannot prepare the worktree: No space left on device".into(),
                    at_ms,
                },
                false,
            )
            .expect("a job")
        };
        // Never unhealthy for good, however often (3 would be with other failures).
        for (i, task) in ["t-1", "t-2", "t-3", "t-4"].into_iter().enumerate() {
            let at = 10_000 * i as i64;
            let ended = full(&mut s, task, at);
            let infra = ended.infra.expect("said");
            assert!(!infra.turned_unhealthy);
            assert_eq!(infra.in_a_row, 0, "not counted");
            let pause = DISK_FULL_FIRST_PAUSE_MS << i;
            assert_eq!(infra.disk_full_pause_ms, Some(pause));
            assert!(ended.release.expect("given back").infrastructure);
            assert_eq!(s.paused_until(), Some((at + pause, PauseCause::DiskFull)));
            assert!(
                s.unhealthy()
                    .is_some_and(|w| w.starts_with("the work dir's disk is full"))
            );
            assert!(matches!(
                s.offer(assignment("t-9"), "t-9"),
                Offer::Refuse {
                    busy: Busy::Unhealthy,
                    ..
                }
            ));
            s.resume();
        }
        // Checked and still full: longer again, up to the cap.
        let pause = s.still_full("No space left on device", 50_000);
        assert_eq!(pause, DISK_FULL_FIRST_PAUSE_MS << 4);
        for _ in 0..20 {
            s.still_full("No space left on device", 50_000);
        }
        assert_eq!(
            s.paused_until(),
            Some((50_000 + DISK_FULL_MAX_PAUSE_MS, PauseCause::DiskFull))
        );
        s.resume();
        // A delivered result starts the back-off again; the disk never made it unhealthy.
        started(s.offer(assignment("t-5"), "t-5"));
        s.ended(
            &lease_id("t-5"),
            &JobEnd::Delivered(Outcome::Verified),
            false,
        );
        let again = full(&mut s, "t-6", 0);
        assert_eq!(
            again.infra.and_then(|i| i.disk_full_pause_ms),
            Some(DISK_FULL_FIRST_PAUSE_MS)
        );
        s.resume();
        assert_eq!(s.unhealthy(), None);
    }

    #[test]
    fn an_assignment_refused_at_the_edge_counts_as_an_infrastructure_failure() {
        let mut s = slots(1);
        let (release, infra) = s.refused(lease("t-1"), "the assignment's base is invalid: x");
        assert_eq!(
            release,
            Release {
                lease: lease("t-1"),
                reason: "the assignment's base is invalid: x".into(),
                infrastructure: true,
            }
        );
        assert_eq!(infra.in_a_row, 1);
        assert!(s.held().is_empty());
    }

    #[test]
    fn a_drain_takes_no_more_work_and_finishes_with_the_last_job() {
        let mut s = slots(1);
        started(s.offer(assignment("t-1"), "t-1"));
        s.offer(assignment("t-2"), "t-2");
        assert!(!s.finished());
        assert!(s.drain());
        assert!(!s.drain(), "once");
        assert!(s.is_draining() && !s.needs_a_slot());
        match s.offer(assignment("t-3"), "t-3") {
            Offer::Refuse { busy, release, .. } => {
                assert_eq!(busy, Busy::Draining);
                assert_eq!(release.reason, "the runner is draining");
            }
            other => panic!("{other:?}"),
        }
        s.ended(
            &lease_id("t-1"),
            &JobEnd::Delivered(Outcome::Verified),
            false,
        );
        assert!(
            !s.finished(),
            "the queued one was taken before the drain: it runs"
        );
        started(s.start_queued("t-2").expect("started"));
        assert!(!s.finished());
        s.ended(&lease_id("t-2"), &JobEnd::Refused("gone".into()), false);
        assert!(s.finished());
    }
}
