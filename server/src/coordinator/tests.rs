//! The coordinator's middle layer, against the in-memory store, a fake clock and the in-memory
//! repository and builder (`ports::fake`): transitions through the one commit path, leases
//! handed out by the dispatcher and expired by the clock, results judged with their commits,
//! recovery, and the integrator's trains (landing, bisection of a red member).

use std::sync::Arc;

use pipeline_core::clock::FakeClock;
use pipeline_core::git::BranchName;
use pipeline_core::verify::Verifier;
use tokio::sync::mpsc;

use super::*;
use std::collections::{HashMap, HashSet};

use pipeline_core::git::RefName;
use pipeline_core::ids::CommitId;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::domain::Task;
use crate::domain::{NewTask, RunStatus, TaskId};
use crate::integrate::Integrator;
use crate::ports::fake::{FakeBuilder, FakeRepo};
use crate::scheduler::registry::Assignment;
use crate::scheduler::registry::Push;
use crate::store::memory::MemoryStore;

const TTL: i64 = 30_000;

struct World {
    _dir: tempfile::TempDir,
    clock: FakeClock,
    repo: FakeRepo,
    c: Arc<Coordinator<MemoryStore, FakeRepo>>,
}

async fn world() -> World {
    world_with(Policy::default()).await
}

async fn world_with(policy: Policy) -> World {
    world_of(policy, Verifier::Off).await
}

/// A world whose server verifies with a build command (the fake builder's).
async fn world_verifying() -> World {
    world_of(
        Policy::default(),
        Verifier::Commands {
            build: Some("make".into()),
            test: None,
        },
    )
    .await
}

async fn world_of(policy: Policy, verifier: Verifier) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = MemoryStore::new();
    let base = BranchName::parse("main").expect("branch");
    let repo = FakeRepo::new(&base, &[("README", "root")]);
    let clock = FakeClock::at(1_000_000);
    let c = start(&dir, store, repo.clone(), &clock, policy, verifier).await;
    World {
        _dir: dir,
        clock,
        repo,
        c,
    }
}

/// A coordinator over `store` and `repo`, as a server starts one (again, after a restart).
async fn start(
    dir: &tempfile::TempDir,
    store: MemoryStore,
    repo: FakeRepo,
    clock: &FakeClock,
    policy: Policy,
    verifier: Verifier,
) -> Arc<Coordinator<MemoryStore, FakeRepo>> {
    let settings = Settings {
        policy,
        base: BranchName::parse("main").expect("branch"),
        spool_dir: dir.path().join("spool"),
        lease_ttl_ms: TTL,
        max_bundle_bytes: 1 << 20,
        verifier,
        kill_grace: std::time::Duration::from_secs(1),
        integration_dir: dir.path().join("integration"),
        push_remote: None,
        log_cap_bytes: 1 << 20,
        build_env: Vec::new(),
        sandbox: pipeline_core::sandbox::Sandbox::off(),
        build_tmp: dir.path().join("build-tmp"),
        dispatch_batch: 64,
        batch_max: 8,
        prompt: Arc::new(crate::prompt::PromptTemplate::default()),
        verify_on_server: Default::default(),
        early_builds: false,
    };
    let auth = crate::auth::Auth::open(&store, dir.path(), 10)
        .await
        .expect("auth");
    let c = Coordinator::new(store.clone(), settings, repo, auth, Arc::new(clock.clone()));
    c.load_counts().await.expect("counts");
    c.load_landing().await.expect("landing");
    // The log writer, as the server runs it (the integrator waits for its runs' lines).
    tokio::spawn(crate::logs::writer(
        Arc::clone(c.logs()),
        store,
        CancellationToken::new(),
    ));
    Arc::new(c)
}

fn new_task(title: &str) -> NewTask {
    NewTask::new(None, title.into(), String::new(), None, None, None, vec![]).expect("valid")
}

/// A runner registered and connected, with the receiving end of its pushes.
async fn runner(
    c: &Coordinator<MemoryStore, FakeRepo>,
    name: &str,
    slots: u32,
) -> (String, mpsc::Receiver<Push>) {
    let registered = c
        .register(
            RunnerHello {
                name: name.into(),
                labels: vec![],
                scope: Default::default(),
                slots,
                version: "test".into(),
                protocol_version: pipeline_proto::PROTOCOL_VERSION,
                sandbox: None,
            },
            &Caller::Registration,
        )
        .await
        .expect("register");
    let (_, attached, rx) = c
        .open_work(&registered.runner_id, &[], false, None)
        .await
        .expect("open");
    assert!(attached.kept.is_empty());
    (registered.runner_id, rx)
}

#[tokio::test]
async fn cancel_and_retry_go_through_the_lifecycle() {
    let w = world().await;
    let c = &w.c;
    let t = c.create_task(new_task("x")).await.expect("create");
    let t = c.cancel(&t.id).await.expect("cancel");
    assert_eq!(t.state.status, TaskStatus::Cancelled);
    let err = c.cancel(&t.id).await.expect_err("twice");
    assert_eq!(
        err.to_string(),
        "task t-1: cannot cancel a task that is cancelled already"
    );
    let t = c.retry(&t.id, None, false).await.expect("retry");
    assert_eq!(t.state.status, TaskStatus::Open);
    let detail = c.show_task(&t.id).await.expect("show");
    let kinds: Vec<&str> = detail.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["created", "cancelled", "retried"]);
    let unknown = TaskId::parse("nope").expect("id");
    let err = c.cancel(&unknown).await.expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)));
}

#[tokio::test]
async fn the_dispatcher_leases_to_free_slots_and_pushes_the_work() {
    let w = world().await;
    let c = &w.c;
    let (runner_id, mut rx) = runner(c, "r1", 2).await;
    let a = c.create_task(new_task("a")).await.expect("a");
    let b = c.create_task(new_task("b")).await.expect("b");
    let blocked = c
        .create_task(
            NewTask::new(
                None,
                "c".into(),
                String::new(),
                None,
                None,
                None,
                vec![a.id.clone()],
            )
            .expect("valid"),
        )
        .await
        .expect("c");
    assert_eq!(blocked.deps_pending, 1);
    c.dispatch_once().await.expect("round");
    for task in [&a, &b] {
        let leased = c.get(&task.id).await.expect("get");
        assert_eq!(leased.state.status, TaskStatus::InProgress, "{}", task.id);
        let lease = leased.lease.expect("lease");
        assert_eq!(
            (lease.runner.as_str(), lease.runner_id.as_str()),
            ("r1", runner_id.as_str())
        );
        let Push::Assign(assignment) = rx.try_recv().expect("pushed") else {
            panic!("an assignment")
        };
        assert_eq!(assignment.lease, lease.lease_ref());
        assert_eq!(
            assignment.base_commit,
            w.repo.branch_tip(&c.settings().base),
            "on the base tip"
        );
        assert!(assignment.prompt.contains(task.id.as_str()));
    }
    assert_eq!(
        c.get(&blocked.id).await.expect("get").state.status,
        TaskStatus::Open
    );
    let status = c.status().await.expect("status");
    assert_eq!(
        (status.counts.in_progress, status.counts.active_dev_runs),
        (2, 2)
    );
    let runs = c.store().runs(&a.id).await.expect("runs");
    assert_eq!((runs.len(), runs[0].status), (1, RunStatus::Running));
}

#[tokio::test]
async fn a_lease_the_clock_lets_lapse_goes_back_uncharged_and_its_runner_is_told() {
    let w = world().await;
    let c = &w.c;
    let (_runner_id, mut rx) = runner(c, "r1", 1).await;
    let t = c.create_task(new_task("a")).await.expect("a");
    let next = c.dispatch_once().await.expect("round");
    assert_eq!(
        next,
        Some(w.clock.now_ms() + TTL),
        "it wakes when the lease would lapse"
    );
    let Push::Assign(assignment) = rx.try_recv().expect("pushed") else {
        panic!("an assignment")
    };
    w.clock.advance(TTL);
    c.dispatch_once().await.expect("round");
    assert_eq!(
        rx.try_recv().expect("told"),
        Push::Cancel(assignment.lease.clone())
    );
    let lapsed = c.get(&t.id).await.expect("get");
    // Back to Open, uncharged, and at once given to the runner again (it is the only one).
    assert_eq!(lapsed.state.failures, 0);
    assert_eq!(lapsed.state.lost_leases, 1);
    assert_eq!(lapsed.avoid_runner.as_deref(), Some("r1"));
    assert_eq!(lapsed.state.status, TaskStatus::InProgress, "re-leased");
    let runs = c.store().runs(&t.id).await.expect("runs");
    assert_eq!(runs[0].failure_kind, Some(FailureKind::Infrastructure));
}

#[tokio::test]
async fn recovery_reopens_in_progress_tasks_without_a_lease() {
    let w = world().await;
    let c = &w.c;
    let t = c.create_task(new_task("x")).await.expect("create");
    // A lease taken before a crash, whose lease record was lost.
    let mut decision = c
        .decide(&t, &Event::Leased { deps_pending: 0 })
        .expect("decide");
    decision.write.runs.start = Some(crate::domain::NewRun {
        phase: Phase::Dev,
        patchset: 0,
        runner: Some("r1".into()),
        train: None,
    });
    c.store().commit(decision.write).await.expect("lease");
    assert_eq!(c.recover().await.expect("recover"), (0, 1));
    let detail = c.show_task(&t.id).await.expect("show");
    assert_eq!(detail.task.state.status, TaskStatus::Open);
    assert_eq!(detail.task.state.failures, 0);
    assert_eq!(detail.runs.len(), 1);
    assert_eq!(detail.runs[0].status, RunStatus::Failure);
    assert!(
        detail.runs[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("restarted"))
    );
    assert_eq!(c.recover().await.expect("again"), (0, 0));
}

#[tokio::test]
async fn status_counts_kept_in_memory_match_the_store() {
    let w = world().await;
    let c = &w.c;
    let (_id, _rx) = runner(c, "r1", 1).await;
    let a = c.create_task(new_task("a")).await.expect("create");
    c.dispatch_once().await.expect("round");
    let check = || async {
        let memory = c.status().await.expect("status").counts;
        let stored = c.store().status_counts().await.expect("counts");
        assert_eq!(memory, stored);
        memory
    };
    assert_eq!(check().await.active_dev_runs, 1);
    let b = c.create_task(new_task("b")).await.expect("create");
    c.create_task(new_task("c")).await.expect("create");
    c.cancel(&b.id).await.expect("cancel");
    c.cancel(&a.id).await.expect("cancel the leased one");
    let after = check().await;
    assert_eq!(
        (after.open, after.cancelled, after.active_dev_runs),
        (1, 2, 0)
    );
    c.retry(&b.id, None, false).await.expect("retry");
    assert_eq!(check().await.open, 2);
}

/// What an agent used, by the runner's report.
fn usage(cost_cents: f64, session: &str) -> crate::domain::Usage {
    crate::domain::Usage {
        agent: "claude".into(),
        model: Some("claude-sonnet-4-5".into()),
        input_tokens: 1000,
        cached_input_tokens: 800,
        cache_write_tokens: 0,
        output_tokens: 200,
        reasoning_tokens: 0,
        cost_cents,
        cost_source: crate::domain::CostSource::Reported,
        complete: true,
        session_id: Some(session.into()),
    }
}

#[tokio::test]
async fn a_dev_runs_usage_is_its_cost_counts_for_the_day_and_shapes_the_next_assignment() {
    use crate::lifecycle::judge::{Outcome, RunnerResult};
    let w = world_with(Policy {
        max_task_cost_cents: 100.0,
        ..Policy::default()
    })
    .await;
    let c = &w.c;
    let (runner_id, mut rx) = runner(c, "r1", 1).await;
    let t = c.create_task(new_task("a")).await.expect("create");
    c.dispatch_once().await.expect("round");
    let Push::Assign(first) = rx.try_recv().expect("pushed") else {
        panic!("an assignment")
    };
    assert_eq!(
        (first.budget_cents, first.resume_session.as_deref()),
        (Some(100.0), None),
        "the whole cap, and nothing to resume"
    );
    let result = LeaseResult {
        lease: first.lease.clone(),
        result: RunnerResult {
            outcome: Outcome::DevFailed,
            error: Some("the agent stopped".into()),
            // The header's cost gives way to the report's.
            cost_cents: 1.0,
            usage: Some(usage(30.0, "s-1")),
            verify_skipped: None,
            verify_digest: None,
            dev_finished_at: w.clock.now_ms(),
        },
        commit: None,
    };
    let failed = c
        .complete(&runner_id, result, None)
        .await
        .expect("complete");
    assert_eq!(failed.state.cost_cents, 30.0);
    let runs = c.store().runs(&t.id).await.expect("runs");
    assert_eq!(runs[0].cost_cents, 30.0);
    assert_eq!(runs[0].usage, Some(usage(30.0, "s-1")));
    let status = c.status().await.expect("status");
    assert_eq!(
        (status.cost_cents_last_day, status.tokens_last_day),
        (30.0, 1200)
    );
    // Loaded again from the store, memory says the same.
    c.load_counts().await.expect("reload");
    let status = c.status().await.expect("status");
    assert_eq!(
        (status.cost_cents_last_day, status.tokens_last_day),
        (30.0, 1200)
    );

    w.clock.advance(3_600_000);
    c.dispatch_once().await.expect("round");
    let Push::Assign(second) = rx.try_recv().expect("pushed again") else {
        panic!("an assignment")
    };
    assert_eq!(second.lease.epoch, 2);
    assert_eq!(
        (second.budget_cents, second.resume_session.as_deref()),
        (Some(70.0), Some("s-1"))
    );
    // A day later the run no longer counts.
    w.clock.advance(crate::usage::DAY_MS);
    let status = c.status().await.expect("status");
    assert_eq!(
        (status.cost_cents_last_day, status.tokens_last_day),
        (0.0, 0)
    );
}

#[tokio::test]
async fn a_red_base_holds_leases_and_landing_apart_from_a_persons_hold_and_outlives_a_restart() {
    use crate::coordinator::queue::Hold;
    use crate::landing::{LANDING_PAUSED, RED_BASE, RedBase};
    let w = world().await;
    let c = &w.c;
    let commit = pipeline_core::ids::CommitId::parse(&"c".repeat(40)).expect("sha");
    // An older server kept a red base as a landing pause naming it: it loads as a red base.
    c.store()
        .put_meta(
            LANDING_PAUSED,
            &format!(r#"{{"reason":"the base is red","red_base":"{commit}"}}"#),
        )
        .await
        .expect("meta");
    c.load_landing().await.expect("load");
    {
        let l = c.landing();
        assert_eq!(l.paused, None, "no person's hold");
        assert_eq!(l.red_base.as_ref().map(|r| &r.commit), Some(&commit));
    }
    assert!(c.leases_paused(), "a red base holds leases");
    // A person holds landing too; the red base ends, the person's hold stays.
    c.pause_queue(Some("freeze".into()), Hold::LandingOnly)
        .await
        .expect("hold");
    c.clear_red_base("fixed").await.expect("clear");
    assert!(!c.leases_paused(), "a landing-only hold lets leases go on");
    assert_eq!(c.landing().state(), ("paused", Some("freeze".to_owned())));
    // Both are stored apart, and loaded back so.
    c.mark_red_base(RedBase {
        commit: commit.clone(),
        reason: "red again".into(),
        namespace: None,
        digest: None,
    })
    .await
    .expect("red");
    assert!(c.store().get_meta(RED_BASE).await.expect("meta").is_some());
    c.load_landing().await.expect("load");
    let (state, reason) = c.landing().state();
    assert_eq!(state, "paused");
    assert_eq!(
        reason.as_deref(),
        Some("red again; landing is also held: freeze")
    );
    assert!(c.resume_queue().await.expect("resume"), "it was paused");
    assert_eq!(c.landing().state(), ("running", None));
    c.load_landing().await.expect("load");
    assert_eq!(c.landing().state(), ("running", None), "resumed for good");
    // A base found red under another verification is not held for under this one.
    c.store()
        .put_meta(
            RED_BASE,
            &format!(r#"{{"commit":"{commit}","reason":"red","digest":"v1:other"}}"#),
        )
        .await
        .expect("meta");
    c.load_landing().await.expect("load");
    assert!(c.landing().red_base.is_none());
    assert!(c.store().get_meta(RED_BASE).await.expect("meta").is_none());
}

/// The assignments pushed so far, by task.
fn assignments(rx: &mut mpsc::Receiver<Push>) -> HashMap<TaskId, Assignment> {
    let mut out = HashMap::new();
    while let Ok(push) = rx.try_recv() {
        if let Push::Assign(a) = push {
            out.insert(a.task_id.clone(), *a);
        }
    }
    out
}

/// A runner's result for `assignment`: verified, with `commit` sent in a bundle.
fn verified(assignment: &Assignment, commit: &CommitId, at: i64) -> LeaseResult {
    use crate::lifecycle::judge::{Outcome, RunnerResult};
    LeaseResult {
        lease: assignment.lease.clone(),
        result: RunnerResult {
            outcome: Outcome::Verified,
            error: None,
            cost_cents: 2.0,
            usage: None,
            verify_skipped: None,
            verify_digest: None,
            dev_finished_at: at,
        },
        commit: Some(commit.clone()),
    }
}

/// The bundle path a runner's result comes with (the fake repository does not read it).
fn bundle() -> &'static std::path::Path {
    std::path::Path::new("spool/bundle")
}

/// Tasks `files.len()`, each leased to one runner and brought to Verified with a commit of its
/// own (on the base tip) writing its files. Returns the runner (its ID and pushes) and the
/// tasks.
async fn verified_tasks(
    w: &World,
    files: &[&[(&str, &str)]],
) -> ((String, mpsc::Receiver<Push>), Vec<Task>) {
    let c = &w.c;
    let slots = u32::try_from(files.len()).expect("few");
    let (runner_id, mut rx) = runner(c, "r1", slots).await;
    let mut tasks = Vec::new();
    for (i, _) in files.iter().enumerate() {
        tasks.push(
            c.create_task(new_task(&format!("task {i}")))
                .await
                .expect("create"),
        );
    }
    c.dispatch_once().await.expect("round");
    let pushed = assignments(&mut rx);
    let mut out = Vec::new();
    for (task, files) in tasks.iter().zip(files) {
        let a = &pushed[&task.id];
        let commit = w.repo.runner_commit(&a.base_commit, files);
        let done = c
            .complete(
                &runner_id,
                verified(a, &commit, w.clock.now_ms()),
                Some(bundle()),
            )
            .await
            .expect("complete");
        assert_eq!(done.state.status, TaskStatus::Verified, "{}", task.id);
        out.push(done);
    }
    ((runner_id, rx), out)
}

#[tokio::test]
async fn a_result_is_judged_with_its_commit_which_is_stored_under_the_lease_or_refused() {
    let w = world().await;
    let c = &w.c;
    let (runner_id, mut rx) = runner(c, "r1", 2).await;
    let good = c.create_task(new_task("good")).await.expect("create");
    let bad = c.create_task(new_task("bad")).await.expect("create");
    c.dispatch_once().await.expect("round");
    let pushed = assignments(&mut rx);

    // A commit on the lease's base: stored under the task's patch ref, the task Verified
    // with it, its dev and verify runs ended as the runner said.
    let a = &pushed[&good.id];
    let commit = w.repo.runner_commit(&a.base_commit, &[("good.txt", "x")]);
    let task = c
        .complete(
            &runner_id,
            verified(a, &commit, w.clock.now_ms()),
            Some(bundle()),
        )
        .await
        .expect("complete");
    assert_eq!(task.state.status, TaskStatus::Verified);
    assert_eq!(task.patch_commit.as_ref(), Some(&commit));
    assert_eq!((task.state.patchset, task.state.failures), (1, 0));
    assert_eq!(
        w.repo
            .reference(&RefName::task_patch(&good.id, a.lease.epoch)),
        Some(commit.clone())
    );
    let runs = c.store().runs(&good.id).await.expect("runs");
    let phases: Vec<(Phase, RunStatus)> = runs.iter().map(|r| (r.phase, r.status)).collect();
    assert_eq!(
        phases,
        [
            (Phase::Dev, RunStatus::Success),
            (Phase::Verify, RunStatus::Success)
        ]
    );

    // A commit that is not one commit on the lease's base is refused: the call says why, and
    // the attempt is the task's failure; nothing is stored.
    let b = &pushed[&bad.id];
    let elsewhere = w
        .repo
        .commit_on(&b.base_commit, &[("other", "y")], "elsewhere");
    let stray = w.repo.runner_commit(&elsewhere, &[("bad.txt", "z")]);
    let err = c
        .complete(
            &runner_id,
            verified(b, &stray, w.clock.now_ms()),
            Some(bundle()),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, Error::InvalidArgument(why) if why.contains("not one commit on the base")),
        "{err}"
    );
    let task = c.get(&bad.id).await.expect("get");
    assert_eq!(task.state.failures, 1, "charged to the task");
    assert_ne!(task.state.status, TaskStatus::Verified);
    assert_eq!(task.patch_commit, None);
    assert_eq!(
        w.repo.received(),
        [commit],
        "only the good bundle was taken"
    );

    // A verified result without its commit is refused the same way.
    let again = c.get(&bad.id).await.expect("get");
    if let Some(lease) = again.lease {
        let mut result = verified(b, &stray, w.clock.now_ms());
        result.lease = lease.lease_ref();
        result.commit = None;
        let err = c
            .complete(&runner_id, result, None)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("needs the commit"), "{err}");
    }
}

#[tokio::test]
async fn a_restart_keeps_leases_for_their_runners_and_finishes_only_the_landings_that_happened() {
    let w = world().await;
    let base = w.c.settings().base.clone();
    let ((_runner, mut rx), tasks) = verified_tasks(
        &w,
        &[&[("a.txt", "a")], &[("b.txt", "b")], &[("c.txt", "c")]],
    )
    .await;
    let (a, b) = (&tasks[0], &tasks[1]);
    let c = &w.c;
    // One more task, leased when the server dies.
    let leased = c.create_task(new_task("leased")).await.expect("create");
    c.dispatch_once().await.expect("round");
    let lease = assignments(&mut rx)[&leased.id].lease.clone();

    // The integrator journaled a's and b's base moves; the base moved to a's, then the server
    // died (b's never happened).
    let tip = w.repo.branch_tip(&base);
    let a_on_base = w.repo.commit_on(&tip, &[("a.txt", "a")], "a");
    let b_on_base = w.repo.commit_on(&tip, &[("b.txt", "b")], "b");
    let journal = |task: &Task, new_commit: &CommitId| {
        (
            crate::store::Journal {
                task_id: task.id.clone(),
                train: None,
                old_tip: tip.clone(),
                new_commit: new_commit.clone(),
                started_at: w.clock.now_ms(),
            },
            task.patch_commit.clone().expect("a commit"),
        )
    };
    assert_eq!(
        c.begin_landing(&[journal(a, &a_on_base)])
            .await
            .expect("journal"),
        None
    );
    assert_eq!(
        c.begin_landing(&[journal(b, &b_on_base)])
            .await
            .expect("journal"),
        None
    );
    w.repo.set_branch(&base, &a_on_base);

    // The restart: a new coordinator over the same store and repository.
    let c = start(
        &w._dir,
        c.store().clone(),
        w.repo.clone(),
        &w.clock,
        Policy::default(),
        Verifier::Off,
    )
    .await;
    assert_eq!(
        c.recover().await.expect("recover"),
        (1, 0),
        "the lease kept"
    );
    let kept = c.get(&leased.id).await.expect("get");
    assert_eq!(kept.state.status, TaskStatus::InProgress);
    assert_eq!(kept.lease.map(|l| l.lease_ref()), Some(lease));
    let integrator = Integrator::new(Arc::clone(&c), FakeBuilder::new(&w.repo));
    assert_eq!(integrator.recover().await.expect("recover"), 1);
    assert_eq!(
        c.get(&a.id).await.expect("a").state.status,
        TaskStatus::Done
    );
    let b_now = c.get(&b.id).await.expect("b");
    assert_eq!(
        (b_now.state.status, b_now.state.failures),
        (TaskStatus::Verified, 0),
        "integrated again, uncharged"
    );
    assert!(c.pending_landings().await.expect("journal").is_empty());
    assert_eq!(w.repo.branch_tip(&base), a_on_base, "nothing landed twice");
    // Recovering again finds nothing to do.
    assert_eq!(integrator.recover().await.expect("again"), 0);
    assert_eq!(c.recover().await.expect("again"), (1, 0));
}

/// Runs trains until the integrator has none to run (at most `n`).
async fn integrate_all(integrator: &Integrator<MemoryStore, FakeRepo, FakeBuilder>, n: usize) {
    let shutdown = CancellationToken::new();
    for _ in 0..n {
        if !integrator.next(&shutdown).await.expect("a train") {
            return;
        }
    }
    panic!("the integrator still had trains to run after {n}");
}

#[tokio::test]
async fn a_train_with_a_red_member_lands_the_others_and_charges_only_the_red_one() {
    let w = world_verifying().await;
    let base = w.c.settings().base.clone();
    let root = w.repo.branch_tip(&base);
    let (_runner, tasks) = verified_tasks(
        &w,
        &[&[("a.txt", "a")], &[("b.txt", "red")], &[("c.txt", "c")]],
    )
    .await;
    let (a, b, cc) = (&tasks[0], &tasks[1], &tasks[2]);
    let c = &w.c;
    let builder = FakeBuilder::new(&w.repo);
    let integrator = Integrator::new(Arc::clone(c), builder.clone());
    integrate_all(&integrator, 10).await;

    for t in [a, cc] {
        assert_eq!(
            c.get(&t.id).await.expect("get").state.status,
            TaskStatus::Done,
            "{}",
            t.id
        );
    }
    let red = c.get(&b.id).await.expect("get");
    assert_ne!(red.state.status, TaskStatus::Done);
    assert_eq!(red.state.failures, 1, "the red member is charged");
    let runs = c.store().runs(&b.id).await.expect("runs");
    let integrate = runs
        .iter()
        .find(|r| r.phase == Phase::Integrate && r.status == RunStatus::Failure)
        .expect("its integrate run failed");
    assert_eq!(integrate.failure_kind, Some(FailureKind::Task));
    assert!(
        integrate
            .error
            .as_deref()
            .is_some_and(|e| e.contains("b.txt is red")),
        "{:?}",
        integrate.error
    );
    for t in [a, cc] {
        let runs = c.store().runs(&t.id).await.expect("runs");
        assert!(
            runs.iter()
                .all(|r| r.failure_kind != Some(FailureKind::Task)),
            "{} is not charged: {runs:?}",
            t.id
        );
    }

    // The base has a's and c's changes, each in a commit of its own with its Task-Id, and
    // not b's; each landing is recorded in the repository.
    let tip = w.repo.branch_tip(&base);
    let files = w.repo.files_of(&tip);
    assert!(
        files.contains_key("a.txt") && files.contains_key("c.txt"),
        "{files:?}"
    );
    assert!(!files.contains_key("b.txt"), "{files:?}");
    let mut trailers = w.repo.trailers(&tip);
    trailers.sort();
    assert_eq!(trailers, [a.id.clone(), cc.id.clone()]);
    for t in [a, cc] {
        assert!(
            w.repo.reference(&RefName::landed(&t.id)).is_some(),
            "{}",
            t.id
        );
    }
    assert!(w.repo.reference(&RefName::landed(&b.id)).is_none());

    // The builds: the train's tip (red), then its prefixes, halving: a alone (green), a and
    // b (red: b is the first red commit); then c in a train of its own on the new base.
    let builds = builder.builds();
    let built: Vec<(Vec<String>, Option<TaskId>)> = builds
        .iter()
        .map(|b| {
            let files = w.repo.files_of(&b.commit).into_keys().collect();
            (files, b.runs[0].task.clone())
        })
        .collect();
    let files = |names: &[&str]| -> Vec<String> {
        std::iter::once("README")
            .chain(names.iter().copied())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        built,
        [
            (files(&["a.txt", "b.txt", "c.txt"]), Some(cc.id.clone())),
            (files(&["a.txt"]), Some(a.id.clone())),
            (files(&["a.txt", "b.txt"]), Some(b.id.clone())),
            (files(&["a.txt", "c.txt"]), Some(cc.id.clone())),
        ]
    );
    assert!(
        builds[..3].iter().all(|b| b.base_commit == root),
        "the first train sits on the root"
    );
    assert!(
        builds.iter().all(|b| b.verifier == c.settings().verifier),
        "under the server's verification"
    );
    // Nothing is left running, and the train is no longer shown.
    let queue = c.queue().await.expect("queue");
    assert!(queue.trains.is_empty());
}

/// With build slots to spare, a red train's prefixes are built at once: the tip, then one
/// wave of every prefix (and nothing twice); the culprit alone is charged, the prefix before
/// it lands, the task after it lands in the next train, every task exactly once.
#[tokio::test]
async fn with_build_slots_a_red_trains_prefixes_are_built_at_once() {
    let w = world_verifying().await;
    let base = w.c.settings().base.clone();
    let (_runner, tasks) = verified_tasks(
        &w,
        &[
            &[("a.txt", "a")],
            &[("b.txt", "b")],
            &[("c.txt", "red")],
            &[("d.txt", "d")],
            &[("e.txt", "e")],
        ],
    )
    .await;
    let c = &w.c;
    let builder = FakeBuilder::new(&w.repo).with_slots(8);
    let integrator = Integrator::new(Arc::clone(c), builder.clone());
    integrate_all(&integrator, 10).await;
    let red = c.get(&tasks[2].id).await.expect("get");
    assert_eq!(red.state.failures, 1, "the red member is charged");
    assert_ne!(red.state.status, TaskStatus::Done);
    for i in [0, 1, 3, 4] {
        let t = c.get(&tasks[i].id).await.expect("get");
        assert_eq!(
            (t.state.status, t.state.failures),
            (TaskStatus::Done, 0),
            "{}",
            t.id
        );
    }
    let tip = w.repo.branch_tip(&base);
    let mut trailers = w.repo.trailers(&tip);
    trailers.sort();
    let mut want: Vec<TaskId> = [0, 1, 3, 4].iter().map(|i| tasks[*i].id.clone()).collect();
    want.sort();
    assert_eq!(trailers, want, "each landed exactly once");
    // The tip (5), then prefixes 1 to 4 and the base (not known green) at once; then d and e
    // on the new base.
    let sizes: Vec<usize> = builder
        .builds()
        .iter()
        .map(|b| w.repo.files_of(&b.commit).len() - 1)
        .collect();
    assert_eq!(sizes, [5, 0, 1, 2, 3, 4, 4]);
    assert_eq!(
        builder.most_at_once(),
        5,
        "the wave's five builds ran at once"
    );
}

/// A train's gathering window: with a window too long to end on its own, the train waits
/// while fewer than --batch-max (8) tasks are Verified and one is still leased, and forms as
/// the eighth arrives; a window that has ended forms it whatever is Verified; with no task
/// leased (no result can come) it forms at once.
#[tokio::test]
async fn a_train_gathers_results_until_it_is_full_its_window_ends_or_nothing_is_leased() {
    use crate::integrate::Form;
    let w = world_verifying().await;
    let c = &w.c;
    c.load_counts().await.expect("counts");
    let (runner_id, mut rx) = runner(c, "r1", 8).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(
            c.create_task(new_task(&format!("task {i}")))
                .await
                .expect("create"),
        );
    }
    c.dispatch_once().await.expect("round");
    let pushed = assignments(&mut rx);
    let complete = async |i: usize| {
        let a = &pushed[&tasks[i].id];
        let commit = w
            .repo
            .runner_commit(&a.base_commit, &[(format!("f{i}.txt").as_str(), "x")]);
        c.complete(
            &runner_id,
            verified(a, &commit, w.clock.now_ms()),
            Some(bundle()),
        )
        .await
        .expect("complete");
    };
    let integrator = Integrator::new(Arc::clone(c), FakeBuilder::new(&w.repo))
        .gathering(std::time::Duration::from_secs(3600));
    let mut window = None;
    let form = async |window: &mut Option<tokio::time::Instant>| {
        let verified = c.verified_tasks().await.expect("verified");
        match integrator
            .formable(&verified, &HashSet::new(), false, window)
            .await
        {
            Form::Now(chosen) => Some(chosen.len()),
            Form::Wait(_) => None,
            Form::Nothing => Some(0),
        }
    };
    for i in 0..7 {
        complete(i).await;
        assert_eq!(
            form(&mut window).await,
            None,
            "{} Verified: it waits",
            i + 1
        );
    }
    // The window that ended forms the train of seven.
    let ended = Some(tokio::time::Instant::now() - std::time::Duration::from_millis(1));
    assert_eq!(form(&mut ended.clone()).await, Some(7));
    complete(7).await;
    assert_eq!(form(&mut window).await, Some(8), "eight: the train is full");
    // One train of all eight, one build.
    let builder = FakeBuilder::new(&w.repo);
    let integrator = Integrator::new(Arc::clone(c), builder.clone())
        .gathering(std::time::Duration::from_millis(1));
    integrate_all(&integrator, 2).await;
    assert_eq!(builder.builds().len(), 1);

    // Two Verified and none leased: no result can come, it forms at once.
    for i in 0..2 {
        c.create_task(new_task(&format!("more {i}")))
            .await
            .expect("create");
    }
    c.dispatch_once().await.expect("round");
    let more = assignments(&mut rx);
    for (i, a) in more.values().enumerate() {
        let commit = w
            .repo
            .runner_commit(&a.base_commit, &[(format!("g{i}.txt").as_str(), "x")]);
        c.complete(
            &runner_id,
            verified(a, &commit, w.clock.now_ms()),
            Some(bundle()),
        )
        .await
        .expect("complete");
    }
    assert_eq!(c.leased_now(), Some(0));
    let integrator = Integrator::new(Arc::clone(c), FakeBuilder::new(&w.repo))
        .gathering(std::time::Duration::from_secs(3600));
    let verified = c.verified_tasks().await.expect("verified");
    assert!(matches!(
        integrator.formable(&verified, &HashSet::new(), false, &mut None).await,
        Form::Now(chosen) if chosen.len() == 2
    ));
}

/// Ten Verified tasks, each writing its own file `f0.txt` … `f9.txt`; the fourth's is red.
/// Returns the file names, the runner and the tasks.
async fn ten_verified_the_fourth_red(
    w: &World,
) -> (Vec<String>, (String, mpsc::Receiver<Push>), Vec<Task>) {
    let names: Vec<String> = (0..10).map(|i| format!("f{i}.txt")).collect();
    let files: Vec<[(&str, &str); 1]> = names
        .iter()
        .enumerate()
        .map(|(i, n)| [(n.as_str(), if i == 3 { "red" } else { "ok" })])
        .collect();
    let files: Vec<&[(&str, &str)]> = files.iter().map(|f| &f[..]).collect();
    let (runner, tasks) = verified_tasks(w, &files).await;
    (names, runner, tasks)
}

/// Two trains at once (`--integration-slots 2`): eight tasks in the first, one of them red,
/// two in the second, built on the first's tip as if it had landed. The first lands three
/// and charges the red one; the second's guess (with the red commit in it) never lands: it is
/// formed again on the real base, lands there, and none of its tasks is charged.
#[tokio::test]
async fn a_speculative_train_whose_predecessor_turns_red_lands_on_the_real_base_uncharged() {
    let w = world_verifying().await;
    let base = w.c.settings().base.clone();
    let (names, _runner, tasks) = ten_verified_the_fourth_red(&w).await;
    let c = &w.c;
    let builder = FakeBuilder::new(&w.repo).with_slots(2);
    let integrator = Integrator::new(Arc::clone(c), builder.clone()).speculating(2);
    // One round: both trains.
    assert!(
        integrator
            .next(&CancellationToken::new())
            .await
            .expect("a round")
    );
    let status = async |i: usize| {
        let t = c.get(&tasks[i].id).await.expect("get");
        (t.state.status, t.state.failures)
    };
    for i in [0, 1, 2, 8, 9] {
        assert_eq!(status(i).await, (TaskStatus::Done, 0), "task {i}");
    }
    assert_eq!(status(3).await.1, 1, "the red one is charged");
    for i in 4..8 {
        assert_eq!(status(i).await, (TaskStatus::Verified, 0), "task {i} waits");
    }
    // The second train was built on the guess (the first's whole chain, red member included)
    // and then on the real base (the first's three).
    let built: Vec<Vec<String>> = builder
        .builds()
        .iter()
        .map(|b| w.repo.files_of(&b.commit).into_keys().collect())
        .collect();
    let has = |b: &Vec<String>, i: usize| b.contains(&names[i]);
    assert!(
        built.iter().any(|b| has(b, 3) && has(b, 8) && has(b, 9)),
        "on the guess: {built:?}"
    );
    assert!(
        built
            .iter()
            .any(|b| !has(b, 3) && has(b, 2) && has(b, 8) && has(b, 9) && !has(b, 4)),
        "on the real base: {built:?}"
    );
    // Each once on the base, the first train's first, never the red file.
    let tip = w.repo.branch_tip(&base);
    assert!(!w.repo.files_of(&tip).contains_key(&names[3]));
    let on_base = w.repo.trailers(&tip);
    let want: Vec<TaskId> = [9, 8, 2, 1, 0]
        .iter()
        .map(|i| tasks[*i].id.clone())
        .collect();
    assert_eq!(on_base, want, "newest first, each once");
    // The rest land in the next round.
    integrate_all(&integrator, 5).await;
    for i in 4..8 {
        assert_eq!(status(i).await, (TaskStatus::Done, 0), "task {i}");
    }
}

/// Two trains at once: the second is built on the first's tip as if it had landed. When the
/// first's tip comes back red, that guess is withdrawn: the second's build on it is stopped
/// at once (not built to its end for nothing), and the second is formed again on the real
/// base once the first is over, where it lands uncharged.
#[tokio::test]
async fn a_build_on_a_guess_is_stopped_when_the_train_ahead_finds_its_tip_red() {
    let w = world_verifying().await;
    let (names, _runner, tasks) = ten_verified_the_fourth_red(&w).await;
    let c = Arc::clone(&w.c);
    let builder = FakeBuilder::new(&w.repo).with_slots(8).holding();
    let integrator = Integrator::new(Arc::clone(&c), builder.clone()).speculating(2);
    let round = tokio::spawn(async move { integrator.next(&CancellationToken::new()).await });
    let deadline = std::time::Duration::from_secs(30);
    // The first train's tip and the second's, on the guess, both held.
    tokio::time::timeout(deadline, builder.started(2))
        .await
        .expect("two builds started");
    let has = |commit: &CommitId, i: usize| w.repo.files_of(commit).contains_key(&names[i]);
    let started: Vec<CommitId> = builder.builds().iter().map(|b| b.commit.clone()).collect();
    let first_tip = started
        .iter()
        .find(|b| !has(b, 8))
        .expect("the first train's tip")
        .clone();
    let on_guess = started
        .iter()
        .find(|b| has(b, 8) && has(b, 9) && has(b, 3))
        .expect("the second train's tip, on the first's")
        .clone();
    // The first train's tip is red: the build on its guess stops, though it was never let go.
    builder.release(Some(&first_tip));
    let cancelled = tokio::time::timeout(deadline, builder.cancelled(1))
        .await
        .expect("the build on the guess stopped");
    assert_eq!(cancelled, vec![on_guess.clone()]);
    builder.release(None);
    assert!(round.await.expect("the round").expect("a round"));
    let status = async |i: usize| {
        let t = c.get(&tasks[i].id).await.expect("get");
        (t.state.status, t.state.failures)
    };
    for i in [0, 1, 2, 8, 9] {
        assert_eq!(status(i).await, (TaskStatus::Done, 0), "task {i}");
    }
    assert_eq!(status(3).await.1, 1, "the red one is charged");
    let base = c.settings().base.clone();
    let tip = w.repo.branch_tip(&base);
    assert!(!has(&tip, 3), "never the red file on the base");
    // The second train was formed again on the real base: built without the red file.
    assert!(
        builder
            .builds()
            .iter()
            .any(|b| has(&b.commit, 8) && has(&b.commit, 2) && !has(&b.commit, 3)),
        "built again on the real base"
    );
}

#[tokio::test]
async fn a_build_that_cannot_run_charges_nobody_and_the_train_is_formed_again() {
    let w = world_verifying().await;
    let base = w.c.settings().base.clone();
    let root = w.repo.branch_tip(&base);
    let (_runner, tasks) = verified_tasks(&w, &[&[("a.txt", "a")]]).await;
    let c = &w.c;
    let builder = FakeBuilder::new(&w.repo);
    let integrator = Integrator::new(Arc::clone(c), builder.clone());
    builder.break_with(Some("no make"));
    let err = integrator
        .next(&CancellationToken::new())
        .await
        .expect_err("the build could not run");
    assert!(err.to_string().contains("no make"), "{err}");
    let task = c.get(&tasks[0].id).await.expect("get");
    assert_eq!(
        (task.state.status, task.state.failures),
        (TaskStatus::Verified, 0)
    );
    assert_eq!(w.repo.branch_tip(&base), root);
    builder.break_with(None);
    integrate_all(&integrator, 5).await;
    let task = c.get(&tasks[0].id).await.expect("get");
    assert_eq!(
        (task.state.status, task.state.failures),
        (TaskStatus::Done, 0)
    );
}

#[tokio::test]
async fn a_member_that_conflicts_with_the_one_before_it_waits_then_is_charged_for_the_base() {
    let w = world_verifying().await;
    let base = w.c.settings().base.clone();
    let (_runner, tasks) = verified_tasks(&w, &[&[("f.txt", "a")], &[("f.txt", "b")]]).await;
    let (a, b) = (&tasks[0], &tasks[1]);
    let c = &w.c;
    let integrator = Integrator::new(Arc::clone(c), FakeBuilder::new(&w.repo));
    // The first train lands a; b conflicts only with a, in the same train: it waits, uncharged.
    assert!(
        integrator
            .next(&CancellationToken::new())
            .await
            .expect("a train")
    );
    assert_eq!(
        c.get(&a.id).await.expect("a").state.status,
        TaskStatus::Done
    );
    let waiting = c.get(&b.id).await.expect("b");
    assert_eq!(
        (waiting.state.status, waiting.state.failures),
        (TaskStatus::Verified, 0)
    );
    // The next train finds b in conflict with the base itself: its own failure, with git's
    // words and what to do.
    integrate_all(&integrator, 5).await;
    let charged = c.get(&b.id).await.expect("b");
    assert_eq!(charged.state.failures, 1);
    assert_ne!(charged.state.status, TaskStatus::Done);
    let runs = c.store().runs(&b.id).await.expect("runs");
    let failed = runs
        .iter()
        .rfind(|r| r.phase == Phase::Integrate)
        .expect("an integrate run");
    assert_eq!(failed.failure_kind, Some(FailureKind::Task));
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("Merge conflict in f.txt")),
        "{:?}",
        failed.error
    );
    assert_eq!(w.repo.files_of(&w.repo.branch_tip(&base))["f.txt"], "a");
}

#[test]
fn run_clocks_end_a_run_by_id_or_every_run_of_its_task() {
    let (a, b) = (
        crate::domain::TaskId::parse("t-1").expect("id"),
        crate::domain::TaskId::parse("t-2").expect("id"),
    );
    let mut clocks = RunClocks::default();
    clocks.start(1, &a, Phase::Verify, 1_000);
    clocks.start(2, &a, Phase::Integrate, 2_000);
    clocks.start(3, &b, Phase::Integrate, 3_000);
    assert_eq!(clocks.end(1), Some((a.clone(), Phase::Verify, 1_000)));
    assert_eq!(clocks.end(1), None, "ended once");
    assert_eq!(clocks.end_all(&a), vec![(Phase::Integrate, 2_000)]);
    assert_eq!(clocks.end_all(&a), vec![], "nothing of t-1 left");
    assert_eq!(clocks.end(3), Some((b, Phase::Integrate, 3_000)));
    assert!(
        clocks.running.is_empty(),
        "nothing kept once every run ended"
    );
}

#[test]
fn a_runs_outcome_blames_the_right_party() {
    use crate::domain::{FailureKind, RunStatus};
    assert_eq!(run_outcome(RunStatus::Success, None, false), "success");
    let failed = |kind, cancelled| run_outcome(RunStatus::Failure, kind, cancelled);
    assert_eq!(failed(Some(FailureKind::Task), false), "task_failure");
    assert_eq!(
        failed(Some(FailureKind::Infrastructure), true),
        "infrastructure"
    );
    assert_eq!(failed(None, true), "cancelled");
    assert_eq!(failed(None, false), "infrastructure");
}

/// The next push to a runner, waited for with a deadline.
async fn next_push(rx: &mut mpsc::Receiver<Push>) -> Push {
    tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
        .await
        .expect("a push before the deadline")
        .expect("the runner's channel is open")
}

#[tokio::test]
async fn the_dispatch_loop_is_woken_by_the_feed_once_memory_has_followed() {
    let w = world().await;
    let c = &w.c;
    let (runner_id, mut rx) = runner(c, "r1", 1).await;
    let shutdown = CancellationToken::new();
    let dispatcher = tokio::spawn(Arc::clone(c).dispatch_loop(shutdown.clone()));
    // A task created: its entry wakes the loop.
    let a = c.create_task(new_task("a")).await.expect("a");
    let Push::Assign(first) = next_push(&mut rx).await else {
        panic!("an assignment")
    };
    assert_eq!(first.task_id, a.id);
    // The only slot is taken: b waits. The release's entry wakes the loop, which must see
    // the slot the release freed in memory (the registry follows the commit).
    let b = c.create_task(new_task("b")).await.expect("b");
    c.release(&runner_id, &first.lease, "giving it back", true)
        .await
        .expect("release");
    let Push::Assign(second) = next_push(&mut rx).await else {
        panic!("an assignment")
    };
    assert!(
        second.task_id == b.id || second.task_id == a.id,
        "{second:?}"
    );
    // A paused queue leases nothing; its resumption's entry wakes the loop, which must see
    // the pause lifted in memory.
    c.release(&runner_id, &second.lease, "giving it back", true)
        .await
        .expect("release");
    c.pause_queue(None, super::queue::Hold::Leases)
        .await
        .expect("pause");
    c.resume_queue().await.expect("resume");
    let Push::Assign(third) = next_push(&mut rx).await else {
        panic!("an assignment")
    };
    assert_ne!(third.lease, second.lease);
    shutdown.cancel();
    dispatcher.await.expect("the loop ends");
}

#[tokio::test]
async fn a_runners_revocation_and_forgetting_are_entries_of_the_feed() {
    let w = world().await;
    let c = &w.c;
    let _runner = runner(c, "r1", 1).await;
    c.revoke("r1").await.expect("revoke");
    // Revoked, it is no longer connected: it may be forgotten.
    c.forget("r1").await.expect("forget");
    // A name nobody has is refused and writes nothing.
    assert!(matches!(c.forget("nobody").await, Err(Error::NotFound(_))));
    // (Its registration and connection are recorded by another task, in their own time.)
    let runner_entries: Vec<(String, String, String)> = c
        .store()
        .entries_after(0, 100)
        .await
        .expect("entries")
        .into_iter()
        .filter(|e| {
            e.topic == crate::feed::Topic::Runner && ["revoked", "forgotten"].contains(&&*e.kind)
        })
        .map(|e| (e.subject, e.kind, e.message))
        .collect();
    assert_eq!(
        runner_entries,
        [
            (
                "r1".to_owned(),
                "revoked".to_owned(),
                "runner r1 revoked: its credential no longer works and its leases go back"
                    .to_owned()
            ),
            (
                "r1".to_owned(),
                "forgotten".to_owned(),
                "runner r1 forgotten: its name is free again".to_owned()
            ),
        ]
    );
}

/// Waits (a deadline, no fixed sleep) until `check` holds, yielding to the spawned loops.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// `--early-builds`: three leases offer their commits before their results; the integrator
/// builds the train they will form while no task is Verified yet, and when the results come
/// the train lands on that build, with no second one. Then a group one of whose runners fails
/// its own verification is dropped (its build counts, wasted) and the others land on a build
/// of their own.
#[tokio::test]
async fn a_train_built_early_from_offered_commits_lands_without_a_second_build() {
    let w = world_verifying().await;
    let c = &w.c;
    let base = c.settings().base.clone();
    c.load_counts().await.expect("counts");
    let (runner_id, mut rx) = runner(c, "r1", 3).await;
    let builder = FakeBuilder::new(&w.repo);
    let shutdown = CancellationToken::new();
    let integrator = Integrator::new(Arc::clone(c), builder.clone())
        .building_early(true)
        .gathering(std::time::Duration::from_secs(3600));
    let running = tokio::spawn(integrator.run(shutdown.clone()));
    // Leases, their commits offered (the bundle received first, as the server does).
    let lease = async |rx: &mut mpsc::Receiver<Push>, tag: &str| {
        let mut tasks = Vec::new();
        for i in 0..3 {
            tasks.push(
                c.create_task(new_task(&format!("{tag} {i}")))
                    .await
                    .expect("create"),
            );
        }
        c.dispatch_once().await.expect("round");
        let pushed = assignments(rx);
        let mut out = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let a = pushed[&t.id].clone();
            let commit = w
                .repo
                .runner_commit(&a.base_commit, &[(format!("{tag}{i}.txt").as_str(), "x")]);
            c.repo()
                .receive_bundle(bundle(), &a.base_commit, &commit)
                .await
                .expect("received");
            c.offer_commit(&runner_id, &a.lease, commit.clone(), a.base_commit.clone())
                .expect("offered");
            out.push((a, commit));
        }
        out
    };
    let first = lease(&mut rx, "a").await;
    eventually("the early build", || builder.builds().len() == 1).await;
    assert_eq!(
        c.verified_tasks().await.expect("verified").len(),
        0,
        "built before any result"
    );
    for (a, commit) in &first {
        c.complete(
            &runner_id,
            verified(a, commit, w.clock.now_ms()),
            Some(bundle()),
        )
        .await
        .expect("complete");
    }
    let done = async |ids: Vec<TaskId>| {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        for id in ids {
            while c.get(&id).await.expect("task").state.status != TaskStatus::Done {
                assert!(tokio::time::Instant::now() < deadline, "{id} did not land");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };
    done(first.iter().map(|(a, _)| a.task_id.clone()).collect()).await;
    assert_eq!(builder.builds().len(), 1, "the train took the early build");
    let mut landed = w.repo.trailers(&w.repo.branch_tip(&base));
    landed.sort();
    let mut want: Vec<TaskId> = first.iter().map(|(a, _)| a.task_id.clone()).collect();
    want.sort();
    assert_eq!(landed, want);

    // A group whose second runner's verification fails: dropped, the other two land on a build
    // of their own, and the wasted build counts.
    let second = lease(&mut rx, "b").await;
    eventually("the second early build", || builder.builds().len() == 2).await;
    for (i, (a, commit)) in second.iter().enumerate() {
        let mut result = verified(a, commit, w.clock.now_ms());
        if i == 1 {
            result.result.outcome = crate::lifecycle::judge::Outcome::VerifyFailed;
            result.result.error = Some("its own tests failed".into());
        }
        c.complete(&runner_id, result, Some(bundle()))
            .await
            .expect("complete");
    }
    done(vec![
        second[0].0.task_id.clone(),
        second[2].0.task_id.clone(),
    ])
    .await;
    assert_eq!(
        builder.builds().len(),
        3,
        "the train of two built its own tree"
    );
    assert_ne!(
        c.get(&second[1].0.task_id)
            .await
            .expect("task")
            .state
            .status,
        TaskStatus::Done
    );
    // 3 builds for 5 landed, the dropped group's build included.
    let per_landed = c.landing().builds_per_landed(c.now()).expect("a figure");
    assert!((per_landed - 3.0 / 5.0).abs() < 1e-9, "{per_landed}");
    shutdown.cancel();
    running.await.expect("the loop ends");
}
