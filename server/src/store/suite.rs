//! The behaviour every [`Store`] backend must have, as generic async checks. A backend runs them
//! all with `store_test_suite!(factory)`, where `factory` is an async fn returning
//! `(guard, store)` over a fresh, empty database. It covers every method of the trait, and
//! writers at the same time (two worker threads): inserts racing for the next generated ID,
//! edits racing to close a dependency cycle. Written against the trait only: the memory store,
//! SQLite and PostgreSQL (a database per test on `pipeline_core::pgtest`'s server) run it as it
//! is.

use crate::domain::{
    Children, CostSource, EventKind, LogLine, LogStream, NewTask, Phase, RunStatus, Task, TaskId,
    TaskState, TaskStatus, Usage,
};
use crate::error::Error;
use crate::store::{
    EndSessions, Journal, NewEvent, NewRun, RunChanges, RunEnd, SessionRecord, Store, TaskFilter,
    TaskRecord, TaskWrite, TrainEnd, TrainOutcome, TrainStat, UsageBucket,
};
use pipeline_core::ids::CommitId;

/// A write that moves `task` to `state` and records `kind`, changing nothing else.
fn write(task: &Task, state: TaskState, kind: EventKind, at: i64) -> TaskWrite {
    let to = state.status;
    let mut next = TaskRecord::of(task);
    next.state = state;
    TaskWrite {
        task_id: task.id.clone(),
        expected_version: task.version,
        depends_on: task.depends_on.clone(),
        at,
        next,
        event: NewEvent {
            kind,
            message: format!("to {to}"),
            from: task.state.status,
            to,
        },
        runs: RunChanges::default(),
        end_integration: false,
    }
}

fn sha(c: char) -> CommitId {
    CommitId::parse(&c.to_string().repeat(40)).expect("sha")
}

fn deps_event(task: &Task) -> NewEvent {
    NewEvent {
        kind: EventKind::DependenciesAdded,
        message: "now also depends on others".into(),
        from: task.state.status,
        to: task.state.status,
    }
}

async fn add_deps<S: Store>(store: &S, task: &str, deps: &[&str], at: i64) -> Result<Task, Error> {
    let t = store
        .get_task(&id(task))
        .await
        .expect("get")
        .unwrap_or_else(|| ghost(task));
    let deps: Vec<TaskId> = deps.iter().map(|d| id(d)).collect();
    store
        .add_dependencies(&t.id, &deps, deps_event(&t), at)
        .await
}

pub(crate) fn ghost(raw: &str) -> Task {
    Task {
        id: id(raw),
        seq: 0,
        title: String::new(),
        description: String::new(),
        namespace: None,
        priority: 2,
        parent: None,
        depends_on: vec![],
        requires: vec![],
        paused: None,
        deps_pending: 0,
        children: Default::default(),
        state: TaskState::new(),
        lease: None,
        lease_epoch: 0,
        patch_commit: None,
        avoid_runner: None,
        verified_tree: None,
        version: 1,
        created_at: 0,
        updated_at: 0,
    }
}

/// Generates one `#[tokio::test]` per check of the suite for a backend.
#[macro_export]
macro_rules! store_test_suite {
    ($factory:path) => {
        $crate::store_test_suite!(@tests $factory;
            generates_ids_and_skips_taken_ones,
            generated_ids_stop_at_the_bound,
            refuses_taken_ids_and_unknown_references,
            refuses_dependency_cycles,
            refuses_cycles_through_epics,
            lists_in_lease_order_and_filters,
            lists_page_by_page_without_descriptions,
            lists_only_the_end_of_each_feedback,
            creates_a_batch_all_or_none,
            creates_a_large_batch_as_one_at_a_time,
            edits_a_task_by_compare_and_swap,
            transitions_are_compare_and_swap,
            keeps_what_holds_a_verified_task,
            runs_are_numbered_and_closed,
            keeps_usage_and_sums_it_by_time,
            counts_by_status,
            counts_pending_dependencies,
            keeps_an_epics_children_figures,
            keeps_an_epic_created_as_one_out_of_the_candidates,
            keeps_meta,
            offers_lease_candidates_out_of_back_off_with_dependencies_done,
            keeps_an_integration_journal,
            records_trains_and_their_runs,
            stores_trims_and_prunes_logs,
            keeps_and_ends_sessions,
            group_commits_write_each_or_refuse_it,
            group_commits_of_leases_start_their_runs_in_order,
            reads_history_after_a_position,
            reads_the_statuses_of_those_that_exist,
            knows_a_fresh_store_and_raises_the_next_id,
            has_no_write_failure_while_writes_succeed,
            racing_inserts_take_distinct_ids,
            racing_edits_close_no_cycle,
            checks_that_it_takes_writes_without_writing,
            keeps_the_change_feed_in_position_order,
            publishes_feed_positions_in_commit_order_with_concurrent_writers,
            publishes_nothing_of_a_refused_write,
            keeps_webhook_cursors_that_never_go_back,
        );
    };
    (@tests $factory:path; $($name:ident),* $(,)?) => {
        $(
            // Two worker threads: the racing checks' writers run in parallel.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_guard, store) = $factory().await;
                $crate::store::suite::$name(&store).await;
            }
        )*
    };
}

fn id(raw: &str) -> TaskId {
    TaskId::parse(raw).expect("valid id")
}

fn new_task(id: Option<&str>, title: &str, priority: u8, deps: &[&str]) -> NewTask {
    NewTask {
        id: id.map(self::id),
        title: title.to_owned(),
        description: String::new(),
        namespace: None,
        priority,
        parent: None,
        depends_on: deps.iter().map(|d| self::id(d)).collect(),
        requires: vec![],
        max_cost_cents: None,
        approval: false,
        epic: false,
    }
}

/// Creates a task with a generated ID.
pub async fn create<S: Store>(store: &S, title: &str) -> Task {
    store
        .create_task(new_task(None, title, 2, &[]), 1_000)
        .await
        .expect("create task")
}

async fn transition<S: Store>(store: &S, task: &Task, to: TaskStatus) -> Result<Task, Error> {
    let state = TaskState {
        status: to,
        ..task.state.clone()
    };
    store
        .commit(write(task, state, EventKind::Recovered, 2_000))
        .await
        .map(|c| c.task)
}

pub async fn generates_ids_and_skips_taken_ones<S: Store>(store: &S) {
    let first = create(store, "first").await;
    assert_eq!(first.id.as_str(), "t-1");
    assert_eq!(first.state, TaskState::new());
    assert_eq!(first.created_at, 1_000);
    store
        .create_task(new_task(Some("t-2"), "by hand", 2, &[]), 1_000)
        .await
        .expect("user-given id");
    assert_eq!(create(store, "third").await.id.as_str(), "t-3");
    let events = store.events(&first.id).await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].kind.as_str(), events[0].from, events[0].to),
        ("created", None, TaskStatus::Open)
    );
}

/// The last generated ID is `t-<MAX_GENERATED>`; past it, a task needs an ID of its own (the
/// counter never wraps).
pub async fn generated_ids_stop_at_the_bound<S: Store>(store: &S) {
    let max = pipeline_core::ids::MAX_GENERATED;
    store.raise_next_task_number(max).await.expect("raise");
    assert_eq!(create(store, "last").await.id, TaskId::generated(max));
    for err in [
        store
            .create_task(new_task(None, "past it", 2, &[]), 1)
            .await
            .expect_err("no ID is left"),
        store
            .create_tasks(vec![new_task(None, "past it", 2, &[])], 1)
            .await
            .expect_err("no ID is left"),
    ] {
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains("no generated task ID is left")),
            "{err}"
        );
    }
    store
        .create_task(new_task(Some("own"), "its own ID", 2, &[]), 1)
        .await
        .expect("a chosen ID");
}

pub async fn refuses_taken_ids_and_unknown_references<S: Store>(store: &S) {
    store
        .create_task(new_task(Some("a"), "a", 2, &[]), 1)
        .await
        .expect("create a");
    let err = store
        .create_task(new_task(Some("a"), "again", 2, &[]), 1)
        .await
        .expect_err("taken");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    let err = store
        .create_task(new_task(Some("b"), "b", 2, &["nope"]), 1)
        .await
        .expect_err("unknown dependency");
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("dependency nope does not exist")),
        "{err}"
    );
    let mut orphan = new_task(Some("c"), "c", 2, &[]);
    orphan.parent = Some(id("ghost"));
    let err = store
        .create_task(orphan, 1)
        .await
        .expect_err("unknown parent");
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("parent task ghost")),
        "{err}"
    );
    // Nothing of the refused tasks was kept.
    assert_eq!(
        store
            .list_tasks(&TaskFilter::default(), None, 100)
            .await
            .expect("list")
            .len(),
        1
    );
}

/// An epic waits for its children: a child that depends on its epic (or on a task that
/// waits for the epic), or an epic that depends on its own descendant, would never move.
pub async fn refuses_cycles_through_epics<S: Store>(store: &S) {
    let child = |name: &str, parent: &str, deps: &[&str]| {
        let mut t = new_task(Some(name), name, 2, deps);
        t.parent = Some(id(parent));
        t
    };
    let is_cycle =
        |e: &Error| matches!(e, Error::FailedPrecondition(m) if m.contains("would make a cycle"));
    store
        .create_task(new_task(Some("e"), "epic", 2, &[]), 1)
        .await
        .expect("epic");
    store
        .create_task(child("sub", "e", &[]), 1)
        .await
        .expect("a sub-epic");
    // X waits for the epic: it depends on it.
    store
        .create_task(new_task(Some("x"), "x", 2, &["e"]), 1)
        .await
        .expect("x depends on the epic");
    for (deps, what) in [
        (&["e"][..], "its own epic"),
        (&["x"][..], "a task that waits for its epic"),
    ] {
        let err = store
            .create_task(child("c", "e", deps), 1)
            .await
            .expect_err(what);
        assert!(is_cycle(&err), "{what}: {err}");
    }
    // A grandchild depending on its grandparent.
    let err = store
        .create_task(child("g", "sub", &["e"]), 1)
        .await
        .expect_err("grandparent");
    assert!(is_cycle(&err), "{err}");
    // In one batch: the epic, then a child that depends on it.
    let err = store
        .create_tasks(
            vec![
                new_task(Some("e2"), "epic 2", 2, &[]),
                child("c2", "e2", &["e2"]),
            ],
            1,
        )
        .await
        .expect_err("batch");
    assert!(is_cycle(&err), "{err}");
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.starts_with("task 2 of the batch")));
    assert!(store.get_task(&id("e2")).await.expect("get").is_none());
    // Added later: the child on its epic, the epic on its child, the sub-epic's child on x.
    store
        .create_task(child("c", "e", &[]), 1)
        .await
        .expect("a plain child");
    for (task, dep) in [("c", "e"), ("e", "c"), ("e", "sub"), ("sub", "x")] {
        let err = add_deps(store, task, &[dep], 2).await.expect_err("refused");
        assert!(is_cycle(&err), "{task} -> {dep}: {err}");
    }
    // What is no cycle still goes: a child on its sibling, a task on an epic it is not under.
    add_deps(store, "c", &["sub"], 2).await.expect("a sibling");
    store
        .create_task(child("c3", "e", &["sub"]), 1)
        .await
        .expect("on a sibling");
    store
        .create_task(new_task(Some("y"), "y", 2, &["e", "x"]), 1)
        .await
        .expect("outside the epic");
    let c = store.get_task(&id("c")).await.expect("get").expect("c");
    assert_eq!(c.depends_on, vec![id("sub")], "refused edges are not kept");
}

pub async fn refuses_dependency_cycles<S: Store>(store: &S) {
    for name in ["a", "b", "c"] {
        store
            .create_task(new_task(Some(name), name, 2, &[]), 1)
            .await
            .expect("create");
    }
    add_deps(store, "b", &["a"], 2).await.expect("b -> a");
    add_deps(store, "c", &["b"], 2).await.expect("c -> b");
    let err = add_deps(store, "a", &["c"], 3)
        .await
        .expect_err("a -> c closes a cycle");
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("cycle")),
        "{err}"
    );
    let err = add_deps(store, "a", &["a"], 3).await.expect_err("self");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    let err = add_deps(store, "a", &["zzz"], 3)
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = add_deps(store, "zzz", &["a"], 3)
        .await
        .expect_err("unknown task");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let a = store.get_task(&id("a")).await.expect("get").expect("a");
    assert!(a.depends_on.is_empty(), "refused edges are not kept");
    let c = store.get_task(&id("c")).await.expect("get").expect("c");
    assert_eq!(c.depends_on, vec![id("b")]);
    assert_eq!(c.deps_pending, 1);
    // Adding an edge that exists is a no-op.
    let again = add_deps(store, "c", &["b"], 4).await.expect("again");
    assert_eq!(again.version, c.version);
    let kinds: Vec<String> = store
        .events(&id("c"))
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect();
    assert_eq!(kinds, ["created", "dependencies_added"]);
}

pub async fn lists_in_lease_order_and_filters<S: Store>(store: &S) {
    for (name, prio) in [("low", 4), ("mid1", 2), ("high", 0), ("mid2", 2)] {
        store
            .create_task(new_task(Some(name), name, prio, &[]), 1)
            .await
            .expect("create");
    }
    let all = store
        .list_tasks(&TaskFilter::default(), None, 100)
        .await
        .expect("list");
    let names: Vec<&str> = all.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(names, ["high", "mid1", "mid2", "low"]);
    transition(store, &all[1], TaskStatus::Cancelled)
        .await
        .expect("cancel mid1");
    let open = store
        .list_tasks(&TaskFilter::status(TaskStatus::Open), None, 100)
        .await
        .expect("list open");
    assert_eq!(open.len(), 3);
    let cancelled = store
        .list_tasks(&TaskFilter::status(TaskStatus::Cancelled), None, 100)
        .await
        .expect("list cancelled");
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].id.as_str(), "mid1");
    let none = store
        .list_tasks(&TaskFilter::status(TaskStatus::Done), None, 100)
        .await
        .expect("list done");
    assert!(none.is_empty());
}

/// A list row carries the end of its feedback only (what `keep_end` keeps of the last
/// `LIST_FEEDBACK_BYTES`), read as such; `get_task` has all of it.
pub async fn lists_only_the_end_of_each_feedback<S: Store>(store: &S) {
    use pipeline_core::lines::{LIST_FEEDBACK_BYTES, MAX_FEEDBACK_BYTES, keep_end};
    // 64 KiB of failure, ending in a multi-byte character that straddles the cut; a short
    // one; none.
    let long =
        "build output\n".repeat(6_000)[..MAX_FEEDBACK_BYTES - 20].to_owned() + "€€ the reason";
    let cut_inside = "é".repeat(LIST_FEEDBACK_BYTES) + "!";
    let feedbacks = [
        Some(long),
        Some("a short reason".to_owned()),
        Some(cut_inside),
        None,
    ];
    for (i, feedback) in feedbacks.iter().enumerate() {
        let t = store
            .create_task(new_task(None, &format!("f{i}"), 2, &[]), 1)
            .await
            .expect("create");
        let state = TaskState {
            feedback: feedback.clone(),
            ..t.state.clone()
        };
        store
            .commit(write(&t, state, EventKind::DevFailed, 2))
            .await
            .expect("feedback");
    }
    let page = store
        .list_tasks(&TaskFilter::default(), None, 100)
        .await
        .expect("page");
    assert_eq!(page.len(), feedbacks.len());
    for (row, feedback) in page.iter().zip(&feedbacks) {
        let want = feedback
            .as_deref()
            .map(|f| keep_end(f, LIST_FEEDBACK_BYTES));
        assert_eq!(row.state.feedback, want, "{}", row.title);
        let full = store.get_task(&row.id).await.expect("get").expect("task");
        assert_eq!(&full.state.feedback, feedback, "show has it all");
    }
    assert!(
        page[0]
            .state
            .feedback
            .as_deref()
            .is_some_and(|f| f.starts_with("[… ") && f.ends_with("€€ the reason")),
        "{:?}",
        page[0].state.feedback
    );
}

pub async fn lists_page_by_page_without_descriptions<S: Store>(store: &S) {
    let mut asked = Vec::new();
    for i in 0..25u8 {
        let mut t = new_task(None, &format!("task {i}"), i % 3, &[]);
        t.description = "a long description that lists leave behind".into();
        asked.push(t);
    }
    let created = store.create_tasks(asked, 5).await.expect("create");
    assert_eq!(created.len(), 25);
    assert!(
        created
            .iter()
            .all(|(t, e)| e.task_id == t.id && e.kind == crate::domain::EventKind::Created)
    );
    let full = store
        .get_task(&created[0].0.id)
        .await
        .expect("get")
        .expect("task");
    assert!(!full.description.is_empty(), "show keeps the description");
    for filter in [TaskFilter::default(), TaskFilter::status(TaskStatus::Open)] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.list_tasks(&filter, after, 7).await.expect("page");
            assert!(page.len() <= 7);
            assert!(
                page.iter().all(|t| t.description.is_empty()),
                "no descriptions"
            );
            after = page.last().map(|t| (t.priority, t.seq));
            let last = page.len() < 7;
            seen.extend(page.into_iter().map(|t| (t.priority, t.seq)));
            if last {
                break;
            }
        }
        assert_eq!(seen.len(), 25, "each once");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in lease order");
    }
    // An epic's children, page by page, in lease order; the others are left out.
    let epic = created[3].0.id.clone();
    let children: Vec<NewTask> = (0..5u8)
        .map(|i| {
            let mut t = new_task(None, &format!("child {i}"), 4 - i % 2, &[]);
            t.parent = Some(epic.clone());
            t
        })
        .collect();
    store.create_tasks(children, 6).await.expect("children");
    let of_epic = TaskFilter {
        status: None,
        parent: Some(epic.clone()),
    };
    let first = store.list_tasks(&of_epic, None, 3).await.expect("page");
    let after = first.last().map(|t| (t.priority, t.seq));
    let rest = store.list_tasks(&of_epic, after, 3).await.expect("page");
    let titles: Vec<String> = first.iter().chain(&rest).map(|t| t.title.clone()).collect();
    assert_eq!(
        titles,
        ["child 1", "child 3", "child 0", "child 2", "child 4"]
    );
    let open_children = TaskFilter {
        status: Some(TaskStatus::Open),
        ..of_epic.clone()
    };
    assert_eq!(
        store
            .list_tasks(&open_children, None, 100)
            .await
            .expect("page")
            .len(),
        5
    );
    // Paused with its epic, the children are no lease candidates until resumed.
    let ready = || async {
        store
            .lease_candidates(i64::MAX, None, 1000)
            .await
            .expect("candidates")
            .iter()
            .filter(|t| t.parent.as_ref() == Some(&epic) || t.id == epic)
            .count()
    };
    assert_eq!(
        ready().await,
        5,
        "its children; an epic is never a candidate"
    );
    let paused = store
        .set_paused(&epic, Some("hold"), "paused", 7)
        .await
        .expect("pause");
    assert_eq!(paused, 6, "the epic and its five children");
    assert_eq!(ready().await, 0);
    let mut late = new_task(Some("late-child"), "late", 2, &[]);
    late.parent = Some(epic.clone());
    let (late, _) = store
        .create_tasks(vec![late], 7)
        .await
        .expect("late child")
        .remove(0);
    assert_eq!(late.paused.as_deref(), Some("hold"), "paused with its epic");
    let stored = store.get_task(&late.id).await.expect("get").expect("task");
    assert_eq!(stored.paused.as_deref(), Some("hold"));
    let child: Vec<Task> = store
        .list_tasks(&of_epic, None, 100)
        .await
        .expect("page")
        .into_iter()
        .filter(|t| t.title == "child 1")
        .collect();
    assert_eq!(child[0].paused.as_deref(), Some("hold"));
    assert_eq!(
        store
            .set_paused(&epic, Some("again"), "paused", 8)
            .await
            .expect("pause again"),
        0,
        "already paused"
    );
    let resumed = store
        .set_paused(&epic, None, "resumed", 9)
        .await
        .expect("resume");
    assert_eq!(resumed, 7);
    assert_eq!(ready().await, 6);
    let events = store.events(&child[0].id).await.expect("events");
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["created", "paused", "resumed"]);
}

pub async fn edits_a_task_by_compare_and_swap<S: Store>(store: &S) {
    let task = create(store, "before").await;
    let edit =
        crate::domain::TaskEdit::new(Some("after".into()), None, Some(String::new()), Some(0))
            .expect("valid");
    let event = NewEvent {
        kind: EventKind::Edited,
        message: "title changed".into(),
        from: TaskStatus::Open,
        to: TaskStatus::Open,
    };
    let edited = store
        .edit_task(&task.id, task.version, &edit, event.clone(), 5)
        .await
        .expect("edit");
    assert_eq!((edited.title.as_str(), edited.priority), ("after", 0));
    assert_eq!(edited.version, task.version + 1);
    assert_eq!(
        store.get_task(&task.id).await.expect("get"),
        Some(edited.clone())
    );
    let stale = store
        .edit_task(&task.id, task.version, &edit, event, 6)
        .await
        .expect_err("a stale version");
    assert!(matches!(stale, Error::Conflict(_)), "{stale}");
    let kinds: Vec<String> = store
        .events(&task.id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["created", "edited"],
        "one entry per edit that happened"
    );
}

pub async fn creates_a_batch_all_or_none<S: Store>(store: &S) {
    let first = new_task(Some("b-1"), "first", 2, &[]);
    let second = new_task(Some("b-2"), "second", 2, &["b-1"]);
    let created = store
        .create_tasks(vec![first, second], 1)
        .await
        .expect("a dependency earlier in the batch");
    assert_eq!(created[1].0.depends_on, [id("b-1")]);
    assert_eq!(created[1].0.deps_pending, 1);
    for (task, _) in &created {
        let stored = store.get_task(&task.id).await.expect("get").expect("task");
        assert_eq!(&stored, task, "what create returns is what is stored");
    }
    let generated = store
        .create_tasks(
            vec![
                new_task(None, "g1", 2, &["b-2", "b-1"]),
                new_task(None, "g2", 2, &[]),
            ],
            1,
        )
        .await
        .expect("generated IDs");
    let ids: Vec<&str> = generated.iter().map(|(t, _)| t.id.as_str()).collect();
    assert_eq!(ids, ["t-1", "t-2"]);
    assert_eq!(
        generated[0].0.depends_on,
        [id("b-1"), id("b-2")],
        "in order"
    );
    let stored = store
        .get_task(&id("t-1"))
        .await
        .expect("get")
        .expect("task");
    assert_eq!(stored, generated[0].0);
    assert_eq!(
        create(store, "next").await.id.as_str(),
        "t-3",
        "the counter moved once"
    );
    let ok = new_task(Some("c-1"), "fine", 2, &[]);
    let bad = new_task(Some("c-2"), "bad", 2, &["ghost"]);
    let err = store
        .create_tasks(vec![ok, bad], 1)
        .await
        .expect_err("unknown dependency");
    assert!(
        matches!(&err, Error::NotFound(m) if m.starts_with("task 2 of the batch: ")),
        "{err}"
    );
    assert!(
        store.get_task(&id("c-1")).await.expect("get").is_none(),
        "none kept"
    );
    assert_eq!(
        store
            .list_tasks(&TaskFilter::default(), None, 100)
            .await
            .expect("list")
            .len(),
        5
    );
}

/// A batch larger than one statement's worth of rows comes out as creating its tasks one at a
/// time would: generated IDs skip taken ones, a task may name one earlier in the batch, a
/// dependency that is done is not pending, and the first task that cannot be created fails
/// the batch with its own error.
pub async fn creates_a_large_batch_as_one_at_a_time<S: Store>(store: &S) {
    store
        .create_task(new_task(Some("t-3"), "taken by hand", 2, &[]), 1)
        .await
        .expect("t-3");
    let done = store
        .create_task(new_task(Some("d-1"), "done", 2, &[]), 1)
        .await
        .expect("d-1");
    transition(store, &done, TaskStatus::Done)
        .await
        .expect("d-1 done");
    let mut asked: Vec<NewTask> = (0..2_500)
        .map(|i| new_task(None, &format!("task {i}"), (i % 5) as u8, &[]))
        .collect();
    asked[1] = new_task(Some("x-1"), "chosen", 2, &[]);
    asked[2] = new_task(None, "waits", 2, &["x-1", "d-1", "t-1"]);
    let created = store.create_tasks(asked, 7).await.expect("create");
    assert_eq!(created.len(), 2_500);
    let ids: Vec<&str> = created.iter().map(|(t, _)| t.id.as_str()).collect();
    assert_eq!(
        &ids[..5],
        ["t-1", "x-1", "t-2", "t-4", "t-5"],
        "t-3 skipped"
    );
    assert_eq!(ids[2_499], "t-2500");
    assert!(
        created.windows(2).all(|w| w[0].0.seq < w[1].0.seq),
        "in order"
    );
    assert!(
        created.iter().all(|(t, e)| e.task_id == t.id
            && e.kind == crate::domain::EventKind::Created
            && e.at == 7),
        "one history entry each"
    );
    let waits = &created[2].0;
    assert_eq!(waits.depends_on, [id("d-1"), id("t-1"), id("x-1")]);
    assert_eq!(waits.deps_pending, 2, "d-1 is done, t-1 and x-1 are open");
    for i in [0, 1, 2, 1_234, 2_499] {
        let (task, event) = &created[i];
        let stored = store.get_task(&task.id).await.expect("get").expect("task");
        assert_eq!(&stored, task, "what create returns is what is stored");
        let history = store.events(&task.id).await.expect("events");
        assert_eq!(history.as_slice(), std::slice::from_ref(event));
    }
    assert_eq!(create(store, "next").await.id.as_str(), "t-2501");

    let err = store
        .create_tasks(
            vec![
                new_task(None, "takes t-2502", 2, &[]),
                new_task(Some("t-2502"), "wants it too", 2, &[]),
            ],
            8,
        )
        .await
        .expect_err("an ID taken earlier in the batch");
    assert!(
        matches!(&err, Error::AlreadyExists(m) if m.starts_with("task 2 of the batch: ")),
        "{err}"
    );
    let err = store
        .create_tasks(
            vec![
                new_task(None, "fine", 2, &[]),
                new_task(None, "names a later one", 2, &["y-1"]),
                new_task(Some("y-1"), "later", 2, &[]),
            ],
            8,
        )
        .await
        .expect_err("a dependency later in the batch");
    assert!(
        matches!(&err, Error::NotFound(m) if m.starts_with("task 2 of the batch: ")),
        "{err}"
    );
    assert_eq!(
        create(store, "after the refusals").await.id.as_str(),
        "t-2502",
        "a refused batch takes no number"
    );
}

pub async fn transitions_are_compare_and_swap<S: Store>(store: &S) {
    let task = create(store, "cas").await;
    let moved = transition(store, &task, TaskStatus::InProgress)
        .await
        .expect("first write");
    assert_eq!(moved.state.status, TaskStatus::InProgress);
    assert_eq!(moved.version, task.version + 1);
    assert_eq!(moved.updated_at, 2_000);
    let err = transition(store, &task, TaskStatus::Cancelled)
        .await
        .expect_err("stale version");
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let now = store.get_task(&task.id).await.expect("get").expect("task");
    assert_eq!(
        now.state.status,
        TaskStatus::InProgress,
        "the loser changed nothing"
    );
    let mut ghost = task.clone();
    ghost.id = id("ghost");
    let err = transition(store, &ghost, TaskStatus::Open)
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let events = store.events(&task.id).await.expect("events");
    let kinds: Vec<(&str, Option<TaskStatus>, TaskStatus)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.from, e.to))
        .collect();
    assert_eq!(
        kinds,
        [
            ("created", None, TaskStatus::Open),
            ("recovered", Some(TaskStatus::Open), TaskStatus::InProgress)
        ]
    );
}

/// What holds a Verified task (a base check, an approval) is part of its state: written, read
/// back by every read (one task, a list, the Verified ones), and changed by the next write;
/// whether a task needs approval is set at its creation (alone or in a batch) and kept.
pub async fn keeps_what_holds_a_verified_task<S: Store>(store: &S) {
    let gated = NewTask {
        approval: true,
        ..new_task(None, "held", 2, &[])
    };
    let task = store.create_task(gated.clone(), 1).await.expect("create");
    assert!(task.state.approval_required);
    let batch = store
        .create_tasks(vec![gated, new_task(None, "free", 2, &[])], 1)
        .await
        .expect("batch");
    let required: Vec<bool> = batch
        .iter()
        .map(|(t, _)| t.state.approval_required)
        .collect();
    assert_eq!(required, [true, false]);
    let held = TaskState {
        status: TaskStatus::Verified,
        patchset: 1,
        amend: true,
        feedback: Some("tests failed".into()),
        base_check: true,
        approved: true,
        ..task.state.clone()
    };
    let written = store
        .commit(write(&task, held.clone(), EventKind::CheckingBase, 2))
        .await
        .expect("write")
        .task;
    assert_eq!(written.state, held);
    let read = store.get_task(&task.id).await.expect("get").expect("task");
    assert_eq!(read.state, held);
    let listed = store
        .list_tasks(&TaskFilter::default(), None, 10)
        .await
        .expect("list");
    assert_eq!(listed[0].state, held);
    let verified = store.verified().await.expect("verified");
    assert_eq!(verified[0].state, held);
    let settled = TaskState {
        base_check: false,
        approved: false,
        ..held
    };
    let written = store
        .commit(write(&read, settled.clone(), EventKind::BaseRed, 3))
        .await
        .expect("write")
        .task;
    assert_eq!(written.state, settled);
}

/// An epic created as such (`task add --epic`) is one before it has any child: kept through a
/// read, never a lease candidate, with or without children; and its children are.
pub async fn keeps_an_epic_created_as_one_out_of_the_candidates<S: Store>(store: &S) {
    let mut new = new_task(Some("plan"), "the plan", 0, &[]);
    new.epic = true;
    let epic = store.create_task(new, 1).await.expect("epic");
    assert!(epic.children.any() && epic.children.declared);
    assert_eq!(epic.children.total, 0);
    let mut listed = new_task(Some("listed"), "an epic in a batch", 0, &[]);
    listed.epic = true;
    store
        .create_tasks(vec![listed, new_task(Some("plain"), "plain", 1, &[])], 2)
        .await
        .expect("batch");
    for id in ["plan", "listed"] {
        let read = store
            .get_task(&self::id(id))
            .await
            .expect("get")
            .expect("there");
        assert!(read.children.declared, "{id} is an epic as read back");
    }
    let candidates = || async {
        store
            .lease_candidates(i64::MAX, None, 100)
            .await
            .expect("candidates")
            .into_iter()
            .map(|t| t.id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(candidates().await, ["plain"], "no epic with no children");
    let mut child = new_task(Some("step-1"), "the first step", 2, &[]);
    child.parent = Some(self::id("plan"));
    store.create_task(child, 3).await.expect("child");
    assert_eq!(candidates().await, ["plain", "step-1"]);
    let plan = store
        .get_task(&self::id("plan"))
        .await
        .expect("get")
        .expect("plan");
    assert_eq!((plan.children.total, plan.children.declared), (1, true));
}

pub async fn keeps_an_epics_children_figures<S: Store>(store: &S) {
    let epic = create(store, "the epic").await;
    assert!(!epic.children.any());
    let child = |title: &str| {
        let mut t = new_task(None, title, 2, &[]);
        t.parent = Some(epic.id.clone());
        t
    };
    let a = store.create_task(child("a"), 2).await.expect("a");
    let batch = store
        .create_tasks(vec![child("b"), child("c")], 3)
        .await
        .expect("b, c");
    let (b, c) = (&batch[0].0, &batch[1].0);
    let read = || async { store.get_task(&epic.id).await.expect("get").expect("epic") };
    let now = read().await;
    assert_eq!((now.children.total, now.children.unfinished()), (3, 3));
    assert!(
        now.version > epic.version,
        "a new child is a change to its epic"
    );
    let candidates = store
        .lease_candidates(i64::MAX, None, 100)
        .await
        .expect("candidates");
    assert!(
        candidates.iter().all(|t| t.id != epic.id),
        "an epic is never a lease candidate"
    );
    assert_eq!(candidates.len(), 3);
    // Costs and endings of the children add up on the epic, in the child's own write.
    let spent = TaskState {
        cost_cents: 12.5,
        ..a.state.clone()
    };
    let a = store
        .commit(write(&a, spent, EventKind::DevFailed, 4))
        .await
        .expect("cost")
        .task;
    let a = transition(store, &a, TaskStatus::Done)
        .await
        .expect("a done");
    transition(store, b, TaskStatus::Cancelled)
        .await
        .expect("b cancelled");
    let now = read().await;
    assert_eq!(
        now.children,
        Children {
            total: 3,
            done: 1,
            cancelled: 1,
            cost_cents: 12.5,
            declared: false,
        }
    );
    assert!(store.finished_epics().await.expect("epics").is_empty());
    transition(store, c, TaskStatus::Done)
        .await
        .expect("c done");
    assert_eq!(
        store.finished_epics().await.expect("epics"),
        std::slice::from_ref(&epic.id),
        "every child is done or cancelled"
    );
    // A child sent back (a retry of a cancelled one) is unfinished again.
    let b = store.get_task(&b.id).await.expect("get").expect("b");
    transition(store, &b, TaskStatus::Open)
        .await
        .expect("b reopened");
    assert_eq!(read().await.children.unfinished(), 1);
    assert!(store.finished_epics().await.expect("epics").is_empty());
    assert_eq!(a.state.status, TaskStatus::Done);
}

pub async fn runs_are_numbered_and_closed<S: Store>(store: &S) {
    let task = create(store, "runs").await;
    let mut current = task.clone();
    for attempt in 1..=2u32 {
        let mut start = write(
            &current,
            current.state.clone(),
            EventKind::Leased,
            10 * i64::from(attempt),
        );
        start.runs.start = Some(NewRun {
            phase: Phase::Dev,
            patchset: 0,
            runner: Some("r1".into()),
            train: None,
        });
        current = store.commit(start).await.expect("start run").task;
        let counts = store.status_counts().await.expect("counts");
        assert_eq!(counts.active_dev_runs, 1);
        let mut end = write(
            &current,
            current.state.clone(),
            EventKind::DevFailed,
            10 * i64::from(attempt) + 5,
        );
        end.runs.close_rest = Some(RunEnd {
            status: RunStatus::Failure,
            cost_cents: 2.5,
            error: Some("agent exited 1".into()),
            failure_kind: Some(crate::domain::FailureKind::Task),
            builds: None,
            usage: None,
        });
        current = store.commit(end).await.expect("close run").task;
    }
    let runs = store.runs(&task.id).await.expect("runs");
    assert_eq!(runs.len(), 2);
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.attempt as usize, i + 1);
        assert_eq!(run.phase, Phase::Dev);
        assert_eq!(run.status, RunStatus::Failure);
        assert_eq!(run.runner.as_deref(), Some("r1"));
        assert_eq!(run.cost_cents, 2.5);
        assert_eq!(run.error.as_deref(), Some("agent exited 1"));
        assert_eq!(run.failure_kind, Some(crate::domain::FailureKind::Task));
        assert_eq!(run.finished_at, Some(run.started_at + 5));
        assert_eq!(run.usage, None);
    }
    assert_eq!(
        store.status_counts().await.expect("counts").active_dev_runs,
        0
    );
}

/// A usage report of `agent` with `input`/`output` tokens, `cents` and session `session`.
fn usage(agent: &str, input: u64, output: u64, cents: f64, session: Option<&str>) -> Usage {
    Usage {
        agent: agent.to_owned(),
        model: Some("gpt-5-codex".into()),
        input_tokens: input,
        cached_input_tokens: input / 2,
        cache_write_tokens: 3,
        output_tokens: output,
        reasoning_tokens: output / 4,
        cost_cents: cents,
        cost_source: CostSource::Estimated,
        complete: session.is_some(),
        session_id: session.map(str::to_owned),
    }
}

pub async fn keeps_usage_and_sums_it_by_time<S: Store>(store: &S) {
    let task = create(store, "usage").await;
    let other = create(store, "other").await;
    assert_eq!(store.latest_session(&task.id).await.expect("none"), None);
    // Dev runs of `task` ending at 60_010, 60_020 and 120_000 (with usage, the last with
    // none but a cost), and of `other` at 30_000 (with usage).
    let ends = [
        (
            &task,
            60_000,
            Some(usage("codex", 1000, 200, 12.5, Some("s-1"))),
            12.5,
        ),
        (&task, 60_010, Some(usage("claude", 10, 2, 0.0, None)), 0.0),
        (&task, 119_990, None, 4.0),
        (
            &other,
            29_990,
            Some(usage("aider", 5, 5, 1.0, Some("s-o"))),
            1.0,
        ),
    ];
    for (t, at, usage, cost_cents) in ends {
        let current = store.get_task(&t.id).await.expect("get").expect("task");
        let mut start = write(&current, current.state.clone(), EventKind::Leased, at);
        start.runs.start = Some(NewRun {
            phase: Phase::Dev,
            patchset: 0,
            runner: Some("r1".into()),
            train: None,
        });
        let current = store.commit(start).await.expect("start").task;
        let mut end = write(
            &current,
            current.state.clone(),
            EventKind::DevFailed,
            at + 10,
        );
        end.runs.close_rest = Some(RunEnd {
            usage,
            ..RunEnd::success(cost_cents, None)
        });
        store.commit(end).await.expect("end");
    }
    let runs = store.runs(&task.id).await.expect("runs");
    assert_eq!(
        runs.iter().map(|r| r.usage.clone()).collect::<Vec<_>>(),
        vec![
            Some(usage("codex", 1000, 200, 12.5, Some("s-1"))),
            Some(usage("claude", 10, 2, 0.0, None)),
            None,
        ],
        "usage round-trips, its cost the run's"
    );
    assert_eq!(runs[2].cost_cents, 4.0);
    assert_eq!(
        store.latest_session(&task.id).await.expect("session"),
        Some("s-1".into()),
        "the latest dev run that reported a session"
    );
    assert_eq!(
        store.latest_session(&other.id).await.expect("session"),
        Some("s-o".into())
    );
    let bucket = |start, cost_cents, tokens| UsageBucket {
        start,
        cost_cents,
        tokens,
    };
    assert_eq!(
        store.usage_since(0, 60_000).await.expect("sums"),
        vec![
            bucket(0, 1.0, 10),
            bucket(60_000, 12.5, 1212),
            bucket(120_000, 4.0, 0),
        ]
    );
    assert_eq!(
        store.usage_since(60_015, 60_000).await.expect("sums"),
        vec![bucket(60_000, 0.0, 12), bucket(120_000, 4.0, 0)],
        "only runs that finished at or after the start"
    );
    assert_eq!(
        store.usage_since(120_001, 60_000).await.expect("sums"),
        vec![]
    );
    // Per task: the reported runs' input and output tokens; a task without a report is left
    // out.
    let quiet = create(store, "no usage").await;
    let mut per_task = store
        .tokens_of(&[task.id.clone(), other.id.clone(), quiet.id.clone()])
        .await
        .expect("tokens");
    per_task.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let mut expected = vec![(task.id.clone(), 1212), (other.id.clone(), 10)];
    expected.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    assert_eq!(per_task, expected);
}

pub async fn counts_by_status<S: Store>(store: &S) {
    let a = create(store, "a").await;
    create(store, "b").await;
    let c = create(store, "c").await;
    transition(store, &a, TaskStatus::Done).await.expect("a");
    transition(store, &c, TaskStatus::NeedsHelp)
        .await
        .expect("c");
    let counts = store.status_counts().await.expect("counts");
    assert_eq!(
        (
            counts.open,
            counts.in_progress,
            counts.verified,
            counts.done,
            counts.needs_help,
            counts.cancelled
        ),
        (1, 0, 0, 1, 1, 0)
    );
}

pub async fn counts_pending_dependencies<S: Store>(store: &S) {
    let dep = store
        .create_task(new_task(Some("dep"), "dep", 2, &[]), 1)
        .await
        .expect("dep");
    let other = store
        .create_task(new_task(Some("other"), "other", 2, &[]), 1)
        .await
        .expect("other");
    let task = store
        .create_task(new_task(Some("task"), "task", 2, &["dep"]), 1)
        .await
        .expect("task");
    assert_eq!(task.depends_on, vec![id("dep")]);
    assert_eq!(task.deps_pending, 1);
    assert_eq!(dep.deps_pending, 0);
    let task = add_deps(store, "task", &["other"], 2).await.expect("more");
    assert_eq!(task.deps_pending, 2);
    transition(store, &dep, TaskStatus::Done)
        .await
        .expect("done");
    let task = store
        .get_task(&id("task"))
        .await
        .expect("get")
        .expect("task");
    assert_eq!(task.deps_pending, 1, "one dependency is done");
    // A dependency that is Done already does not hold a new dependent back.
    let late = store
        .create_task(new_task(Some("late"), "late", 2, &["dep"]), 1)
        .await
        .expect("late");
    assert_eq!(late.deps_pending, 0);
    transition(store, &other, TaskStatus::Cancelled)
        .await
        .expect("cancelled");
    let task = store
        .get_task(&id("task"))
        .await
        .expect("get")
        .expect("task");
    assert_eq!(
        task.deps_pending, 1,
        "a cancelled dependency still holds it"
    );
}

pub async fn keeps_meta<S: Store>(store: &S) {
    assert_eq!(store.get_meta("k").await.expect("get"), None);
    store.put_meta("k", "v1").await.expect("put");
    store.put_meta("k", "v2").await.expect("put");
    assert_eq!(
        store.get_meta("k").await.expect("get").as_deref(),
        Some("v2")
    );
    store.put_meta("p:a", "1").await.expect("put");
    store.put_meta("p:b", "2").await.expect("put");
    store.put_meta("q:c", "3").await.expect("put");
    assert_eq!(
        store.list_meta("p:").await.expect("list"),
        vec![
            ("p:a".to_owned(), "1".to_owned()),
            ("p:b".to_owned(), "2".to_owned())
        ]
    );
    store.delete_meta("p:a").await.expect("delete");
    assert_eq!(store.list_meta("p:").await.expect("list").len(), 1);
}

pub async fn offers_lease_candidates_out_of_back_off_with_dependencies_done<S: Store>(store: &S) {
    let dep = store
        .create_task(new_task(Some("dep"), "dep", 3, &[]), 1)
        .await
        .expect("dep");
    store
        .create_task(new_task(Some("blocked"), "blocked", 0, &["dep"]), 1)
        .await
        .expect("blocked");
    let waiting = store
        .create_task(new_task(Some("waiting"), "waiting", 1, &[]), 1)
        .await
        .expect("waiting");
    let state = TaskState {
        backoff_until: Some(5_000),
        ..waiting.state.clone()
    };
    store
        .commit(write(&waiting, state, EventKind::Recovered, 2))
        .await
        .expect("back off");
    let ids = |tasks: Vec<Task>| {
        tasks
            .into_iter()
            .map(|t| t.id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store
            .lease_candidates(4_999, None, 10)
            .await
            .expect("candidates")),
        ["dep"]
    );
    assert_eq!(
        ids(store
            .lease_candidates(5_000, None, 10)
            .await
            .expect("candidates")),
        ["waiting", "dep"],
        "priority order once the back-off is over"
    );
    assert_eq!(
        store.next_backoff_end(4_000).await.expect("next"),
        Some(5_000)
    );
    assert_eq!(store.next_backoff_end(5_000).await.expect("next"), None);
    let done = TaskState {
        status: TaskStatus::Done,
        ..dep.state.clone()
    };
    store
        .commit(write(&dep, done, EventKind::Recovered, 3))
        .await
        .expect("done");
    assert_eq!(
        ids(store
            .lease_candidates(5_000, None, 10)
            .await
            .expect("candidates")),
        ["blocked", "waiting"]
    );
    let first = store.lease_candidates(5_000, None, 1).await.expect("limit");
    assert_eq!(ids(first.clone()), ["blocked"]);
    // The next page starts after the last one seen.
    let after = Some((first[0].priority, first[0].seq));
    assert_eq!(
        ids(store
            .lease_candidates(5_000, after, 10)
            .await
            .expect("page")),
        ["waiting"]
    );
}

pub async fn keeps_an_integration_journal<S: Store>(store: &S) {
    let task = create(store, "landing").await;
    let other = create(store, "landing too").await;
    let patch = sha('c');
    let train = store.start_train(&sha('a'), &[], 6).await.expect("train");
    let entry = Journal {
        task_id: task.id.clone(),
        train: Some(train),
        old_tip: sha('a'),
        new_commit: sha('b'),
        started_at: 7,
    };
    let pending = async || store.pending_integrations().await.expect("pending");
    let begin = async |entries: &[(Journal, CommitId)]| {
        store.begin_integration(entries).await.expect("begin")
    };
    // Only a Verified task whose patch is still the one being landed gets an entry.
    assert_eq!(
        begin(&[(entry.clone(), patch.clone())]).await,
        Some(task.id.clone())
    );
    let mut verified = task.state.clone();
    verified.status = TaskStatus::Verified;
    let mut w = write(&task, verified.clone(), EventKind::Verified, 8);
    w.next.patch_commit = Some(patch.clone());
    let task = store.commit(w).await.expect("verified").task;
    assert_eq!(task.patch_commit, Some(patch.clone()));
    assert_eq!(store.verified().await.expect("verified").len(), 1);
    assert_eq!(
        begin(&[(entry.clone(), sha('d'))]).await,
        Some(task.id.clone())
    );
    assert!(pending().await.is_empty());
    // A train is journaled whole or not at all: `other` is not Verified, so nothing is.
    let other_entry = Journal {
        task_id: other.id.clone(),
        ..entry.clone()
    };
    assert_eq!(
        begin(&[
            (entry.clone(), patch.clone()),
            (other_entry.clone(), sha('e'))
        ])
        .await,
        Some(other.id.clone())
    );
    assert!(pending().await.is_empty());
    let mut w = write(&other, verified, EventKind::Verified, 8);
    w.next.patch_commit = Some(sha('e'));
    store.commit(w).await.expect("verified");
    assert_eq!(
        begin(&[
            (entry.clone(), patch.clone()),
            (other_entry.clone(), sha('e'))
        ])
        .await,
        None
    );
    assert_eq!(pending().await.len(), 2);
    store.abort_integration(&other.id).await.expect("abort");
    assert_eq!(pending().await, vec![entry.clone()]);
    store.abort_integration(&task.id).await.expect("abort");
    assert!(pending().await.is_empty());
    // Ending it with a transition removes it in the same transaction.
    assert_eq!(begin(&[(entry.clone(), patch.clone())]).await, None);
    let mut w = write(&task, task.state.clone(), EventKind::Recovered, 8);
    w.end_integration = true;
    store.commit(w).await.expect("transition");
    assert!(pending().await.is_empty());
}

pub async fn records_trains_and_their_runs<S: Store>(store: &S) {
    let task = create(store, "train").await;
    assert!(store.trains_since(0).await.expect("trains").is_empty());
    let first = store.start_train(&sha('a'), &[], 100).await.expect("train");
    let second = store.start_train(&sha('b'), &[], 200).await.expect("train");
    assert_ne!(first, second);
    let run = store
        .start_run(
            &task.id,
            &NewRun {
                phase: Phase::Integrate,
                patchset: 0,
                runner: None,
                train: Some(second),
            },
            200,
        )
        .await
        .expect("run");
    // In flight while its member's integrate run runs.
    assert_eq!(
        store.trains_in_flight().await.expect("in flight"),
        [(second, vec![task.id.clone()])]
    );
    store
        .end_run(run, &RunEnd::success(0.0, None).with_builds(3), 250)
        .await
        .expect("end");
    assert!(
        store
            .trains_in_flight()
            .await
            .expect("in flight")
            .is_empty()
    );
    let runs = store.runs(&task.id).await.expect("runs");
    assert_eq!((runs[0].train, runs[0].builds), (Some(second), Some(3)));
    let end = |builds, landed| TrainEnd {
        outcome: TrainOutcome::Landed,
        builds,
        landed,
        red_commit: None,
    };
    store.end_train(first, &end(1, 6), 150).await.expect("end");
    store.end_train(second, &end(4, 3), 300).await.expect("end");
    // Unfinished trains are not counted; the window starts at `since`.
    assert_eq!(store.trains_since(0).await.expect("trains").len(), 2);
    let recent = store.trains_since(200).await.expect("trains");
    assert_eq!(
        recent,
        vec![TrainStat {
            started_at: 200,
            ended_at: 300,
            builds: 4,
            landed: 3
        }]
    );
}

fn log_line(seq: u64, text: &str) -> LogLine {
    LogLine {
        seq,
        at: 10,
        stream: LogStream::Stdout,
        phase: Phase::Dev,
        text: text.to_owned(),
    }
}

pub async fn stores_trims_and_prunes_logs<S: Store>(store: &S) {
    let task = create(store, "logged").await;
    let run = store
        .start_run(
            &task.id,
            &NewRun {
                phase: Phase::Integrate,
                patchset: 0,
                runner: None,
                train: None,
            },
            100,
        )
        .await
        .expect("run");
    assert_eq!(
        store
            .running_runs(&task.id)
            .await
            .expect("running")
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [run]
    );
    assert_eq!(store.last_log_seq(run).await.expect("none yet"), 0);
    let lines: Vec<(i64, LogLine)> = (1..=10).map(|i| (run, log_line(i, "0123456789"))).collect();
    store.append_logs(&lines).await.expect("append");
    // A resent line is ignored, not doubled or overwritten.
    store
        .append_logs(&[(run, log_line(3, "changed"))])
        .await
        .expect("resend");
    let read = store.read_logs(run, 0, 100).await.expect("read");
    assert_eq!(read.len(), 10);
    assert_eq!(store.last_log_seq(run).await.expect("top"), 10);
    assert_eq!(read[2].text, "0123456789");
    assert_eq!(store.read_logs(run, 8, 100).await.expect("after").len(), 2);
    assert_eq!(store.read_logs(run, 0, 4).await.expect("page").len(), 4);
    // Keep the head (1-2) and the newest 33 bytes (three lines of 11): 8, 9, 10.
    let kept = store.trim_log(run, 2, 33).await.expect("trim");
    assert_eq!(kept, 33);
    let seqs: Vec<u64> = store
        .read_logs(run, 0, 100)
        .await
        .expect("read")
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 8, 9, 10]);
    // Pruning removes the logs of runs finished before the cut-off only.
    assert_eq!(
        store.prune_logs(1_000).await.expect("prune"),
        0,
        "still running"
    );
    assert_eq!(
        store
            .abandon_runs(Phase::Integrate, "stopped", 500)
            .await
            .expect("abandon"),
        1
    );
    // Only the server's own runs are abandoned: a runner's may be re-attached.
    let verify = |runner: Option<&str>| NewRun {
        phase: Phase::Verify,
        patchset: 1,
        runner: runner.map(str::to_owned),
        train: None,
    };
    let runners = store
        .start_run(&task.id, &verify(Some("r")), 600)
        .await
        .expect("run");
    let servers = store
        .start_run(&task.id, &verify(None), 600)
        .await
        .expect("run");
    assert_eq!(
        store
            .abandon_runs(Phase::Verify, "stopped", 700)
            .await
            .expect("abandon"),
        1
    );
    let get = |id| async move { store.run(id).await.expect("run").expect("exists") };
    assert_eq!(get(servers).await.status, RunStatus::Failure);
    assert_eq!(get(runners).await.status, RunStatus::Running);
    // The server's verify run (a build of the base the runner's verification failed on)
    // takes the attempt of the runner's it settles; the runner's next one is the next attempt.
    assert_eq!(
        (get(runners).await.attempt, get(servers).await.attempt),
        (1, 1)
    );
    let next = store
        .start_run(&task.id, &verify(Some("r")), 800)
        .await
        .expect("run");
    assert_eq!(get(next).await.attempt, 2);
    assert_eq!(
        store.prune_logs(500).await.expect("prune"),
        0,
        "not before 500"
    );
    assert_eq!(store.prune_logs(501).await.expect("prune"), 5);
    assert!(store.read_logs(run, 0, 100).await.expect("read").is_empty());
    let finished = store.run(run).await.expect("run").expect("exists");
    assert_eq!(finished.status, RunStatus::Failure);
    assert_eq!(finished.error.as_deref(), Some("stopped"));
}

/// The web page's sessions: stored once by ID hash, listed, and ended one by one, by the token
/// that opened them, or by their end.
pub async fn keeps_and_ends_sessions<S: Store>(store: &S) {
    let session = |id: &str, role: &str, token: &str, expires_at| SessionRecord {
        id_sha256: id.to_owned(),
        role: role.to_owned(),
        token_sha256: token.to_owned(),
        created_at: 10,
        expires_at,
    };
    assert!(store.sessions().await.expect("none").is_empty());
    for s in [
        session("a", "admin", "ta", 100),
        session("b", "viewer", "tv", 200),
        session("c", "viewer", "tv", 300),
        session("d", "viewer", "tv2", 50),
    ] {
        store.put_session(&s).await.expect("put");
    }
    let taken = store.put_session(&session("a", "viewer", "tv", 1)).await;
    assert!(matches!(taken, Err(Error::AlreadyExists(_))), "{taken:?}");
    let mut all = store.sessions().await.expect("all");
    all.sort_by(|x, y| x.id_sha256.cmp(&y.id_sha256));
    assert_eq!(all[0], session("a", "admin", "ta", 100), "kept as written");
    assert_eq!(all.len(), 4);
    assert_eq!(
        store
            .end_sessions(EndSessions::ExpiredBefore(60))
            .await
            .expect("expired"),
        1
    );
    assert_eq!(
        store
            .end_sessions(EndSessions::OfToken("tv"))
            .await
            .expect("token"),
        2
    );
    assert_eq!(
        store
            .end_sessions(EndSessions::One("zz"))
            .await
            .expect("none"),
        0
    );
    let left: Vec<String> = store
        .sessions()
        .await
        .expect("left")
        .into_iter()
        .map(|s| s.id_sha256)
        .collect();
    assert_eq!(left, ["a"]);
    assert_eq!(
        store
            .end_sessions(EndSessions::One("a"))
            .await
            .expect("one"),
        1
    );
    assert!(store.sessions().await.expect("none").is_empty());
}

/// A group commit writes each write that holds and refuses, in its place, each that lost its
/// race (`Conflict`) or names no task (`NotFound`); the others are written all the same.
pub async fn group_commits_write_each_or_refuse_it<S: Store>(store: &S) {
    let a = create(store, "a").await;
    let b = create(store, "b").await;
    let leased = |t: &Task| TaskState {
        status: TaskStatus::InProgress,
        ..t.state.clone()
    };
    let mut stale = write(&b, leased(&b), EventKind::Leased, 5);
    stale.expected_version += 1;
    let mut nobody = write(&b, leased(&b), EventKind::Leased, 5);
    nobody.task_id = id("ghost");
    let done = store
        .commit_all(vec![
            write(&a, leased(&a), EventKind::Leased, 5),
            stale,
            nobody,
        ])
        .await
        .expect("group commit");
    assert_eq!(done.len(), 3);
    let written = done[0].as_ref().expect("a is written");
    assert_eq!(written.task.state.status, TaskStatus::InProgress);
    assert_eq!(written.task.version, a.version + 1);
    assert!(matches!(done[1], Err(Error::Conflict(_))), "{:?}", done[1]);
    assert!(matches!(done[2], Err(Error::NotFound(_))), "{:?}", done[2]);
    let read_a = store.get_task(&a.id).await.expect("a").expect("a");
    assert_eq!(read_a.state.status, TaskStatus::InProgress);
    let read_b = store.get_task(&b.id).await.expect("b").expect("b");
    assert_eq!(read_b, b, "b untouched");
    let kinds: Vec<String> = store
        .events(&a.id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect();
    assert_eq!(kinds, ["created", "leased"]);
    assert_eq!(store.events(&b.id).await.expect("events").len(), 1);
    assert!(store.commit_all(vec![]).await.expect("nothing").is_empty());
}

/// A group of leases, each starting its run (a dispatch round's batch), is written as the
/// same writes one after another: the history entries take positions in the group's order,
/// each run is the task's own with its attempt, the feed carries the entries, and a lost race
/// in the middle writes nothing of its own and nothing else differs.
pub async fn group_commits_of_leases_start_their_runs_in_order<S: Store>(store: &S) {
    let tasks = [
        create(store, "a").await,
        create(store, "b").await,
        create(store, "c").await,
    ];
    let lease = |t: &Task, at: i64| {
        let mut w = write(
            t,
            TaskState {
                status: TaskStatus::InProgress,
                ..t.state.clone()
            },
            EventKind::Leased,
            at,
        );
        w.runs.start = Some(NewRun {
            phase: Phase::Dev,
            patchset: 1,
            runner: Some(format!("r-{}", t.id)),
            train: None,
        });
        w
    };
    let mut stale = lease(&tasks[1], 7);
    stale.expected_version += 1;
    let done = store
        .commit_all(vec![lease(&tasks[0], 7), stale, lease(&tasks[2], 7)])
        .await
        .expect("group commit");
    assert_eq!(done.len(), 3);
    assert!(matches!(done[1], Err(Error::Conflict(_))), "{:?}", done[1]);
    let (a, c) = (
        done[0].as_ref().expect("a is written"),
        done[2].as_ref().expect("c is written"),
    );
    assert_eq!(c.event_id, a.event_id + 1, "positions in the group's order");
    assert_eq!(a.task.version, tasks[0].version + 1);
    assert_eq!(a.task.state.status, TaskStatus::InProgress);
    for (t, written) in [(&tasks[0], a), (&tasks[2], c)] {
        let runs = store.runs(&t.id).await.expect("runs");
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(Some(runs[0].id), written.run_id);
        assert_eq!(runs[0].attempt, 1);
        assert_eq!(runs[0].status, RunStatus::Running);
        assert_eq!(
            runs[0].runner.as_deref(),
            Some(format!("r-{}", t.id).as_str())
        );
        assert_eq!(runs[0].started_at, 7);
        assert_eq!(
            store.get_task(&t.id).await.expect("read"),
            Some(written.task.clone())
        );
    }
    assert!(store.runs(&tasks[1].id).await.expect("runs").is_empty());
    assert_eq!(store.events(&tasks[1].id).await.expect("events").len(), 1);
    // The next lease of `a` is its run's second attempt.
    let again = store
        .commit_all(vec![lease(&a.task, 8), lease(&c.task, 8)])
        .await
        .expect("second group");
    let again_a = again[0].as_ref().expect("a again");
    let runs = store.runs(&tasks[0].id).await.expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].attempt, 2);
    assert_eq!(Some(runs[1].id), again_a.run_id);
    // The feed holds each entry at its position, for its task.
    let feed = store.entries_after(0, 100).await.expect("entries");
    for (position, task) in [
        (a.event_id, &tasks[0]),
        (c.event_id, &tasks[2]),
        (again_a.event_id, &tasks[0]),
    ] {
        let entry = feed.iter().find(|e| e.position == position);
        assert_eq!(
            entry.map(|e| (e.subject.as_str(), e.kind.as_str())),
            Some((task.id.as_str(), "leased")),
            "{feed:?}"
        );
    }
}

/// History entries have increasing IDs; `watch` reads them after a position, a page at a time.
pub async fn reads_history_after_a_position<S: Store>(store: &S) {
    assert_eq!(store.last_event_id().await.expect("none yet"), 0);
    assert!(store.events_after(0, 10).await.expect("none").is_empty());
    let a = create(store, "a").await;
    let b = create(store, "b").await;
    transition(store, &a, TaskStatus::Cancelled)
        .await
        .expect("cancel");
    let all = store.events_after(0, 10).await.expect("all");
    let seen: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e.task_id.as_str(), e.kind.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (a.id.as_str(), "created"),
            (b.id.as_str(), "created"),
            (a.id.as_str(), "recovered")
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "in order");
    assert_eq!(store.last_event_id().await.expect("last"), all[2].id);
    let page = store.events_after(all[0].id, 1).await.expect("page");
    assert_eq!(page, all[1..2]);
    assert!(
        store
            .events_after(all[2].id, 10)
            .await
            .expect("after the last")
            .is_empty()
    );
    assert_eq!(all[2].from, Some(TaskStatus::Open));
    assert_eq!(all[2].to, TaskStatus::Cancelled);
}

/// The statuses of the named tasks that exist; the others are left out.
pub async fn reads_the_statuses_of_those_that_exist<S: Store>(store: &S) {
    let a = create(store, "a").await;
    let b = create(store, "b").await;
    transition(store, &b, TaskStatus::Cancelled)
        .await
        .expect("cancel");
    assert!(store.statuses(&[]).await.expect("none").is_empty());
    let mut found = store
        .statuses(&[b.id.clone(), id("ghost"), a.id.clone()])
        .await
        .expect("statuses");
    found.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        found,
        [(a.id, TaskStatus::Open), (b.id, TaskStatus::Cancelled)]
    );
}

/// A store that never held a task and never generated an ID is fresh; raising the next ID
/// (what the repository's landed tasks ask at start-up) makes it not, and never lowers it.
pub async fn knows_a_fresh_store_and_raises_the_next_id<S: Store>(store: &S) {
    assert!(store.is_fresh().await.expect("fresh"));
    store.raise_next_task_number(5).await.expect("raise");
    assert!(!store.is_fresh().await.expect("not fresh"));
    assert_eq!(create(store, "a").await.id.as_str(), "t-5");
    store
        .raise_next_task_number(3)
        .await
        .expect("lower: nothing");
    assert_eq!(create(store, "b").await.id.as_str(), "t-6");
    store.raise_next_task_number(9).await.expect("raise");
    assert_eq!(create(store, "c").await.id.as_str(), "t-9");
}

/// No failure to report while writes succeed.
pub async fn has_no_write_failure_while_writes_succeed<S: Store>(store: &S) {
    assert_eq!(store.write_failure(), None);
    create(store, "a").await;
    store.put_meta("k", "v").await.expect("meta");
    assert_eq!(store.write_failure(), None);
}

/// Writers at the same time (tasks of the runtime, each its own call) never take the same
/// generated ID, and none is used again afterwards.
pub async fn racing_inserts_take_distinct_ids<S: Store>(store: &S) {
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..6u8 {
        let store = store.clone();
        racers.spawn(async move {
            if i % 2 == 0 {
                let batch = vec![
                    new_task(None, "one of a batch", 2, &[]),
                    new_task(None, "one of a batch", 2, &[]),
                ];
                store
                    .create_tasks(batch, 1)
                    .await
                    .map(|c| c.into_iter().map(|(t, _)| t.id).collect::<Vec<_>>())
            } else {
                store
                    .create_task(new_task(None, "alone", 2, &[]), 1)
                    .await
                    .map(|t| vec![t.id])
            }
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = racers.join_next().await {
        ids.extend(done.expect("no panic").expect("created"));
    }
    assert_eq!(ids.len(), 9);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 9, "no ID taken twice: {ids:?}");
    let next = create(store, "after").await;
    assert!(!ids.contains(&next.id), "{} used again", next.id);
    assert_eq!(next.id.as_str(), "t-10", "none skipped either");
}

/// Two edits at the same time that would each close half of a cycle: exactly one is refused.
pub async fn racing_edits_close_no_cycle<S: Store>(store: &S) {
    let a = create(store, "a").await;
    let b = create(store, "b").await;
    let edit = |task: Task, dep: TaskId| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .add_dependencies(&task.id, &[dep], deps_event(&task), 3)
                .await
        })
    };
    let one = edit(a.clone(), b.id.clone());
    let other = edit(b.clone(), a.id.clone());
    let results = [one.await.expect("no panic"), other.await.expect("no panic")];
    let refused: Vec<&Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(
        matches!(refused[0], Error::FailedPrecondition(m) if m.contains("cycle")),
        "{}",
        refused[0]
    );
    let mut edges = 0;
    for t in [a, b] {
        edges += store
            .get_task(&t.id)
            .await
            .expect("get")
            .expect("task")
            .depends_on
            .len();
    }
    assert_eq!(edges, 1, "one edge, not a cycle");
}

pub async fn checks_that_it_takes_writes_without_writing<S: Store>(store: &S) {
    store.put_meta("k", "v").await.expect("put");
    let before = store.list_meta("").await.expect("meta");
    store
        .check_writable()
        .await
        .expect("a fresh store takes writes");
    store
        .check_writable()
        .await
        .expect("and again: the check ended its transaction");
    assert_eq!(
        store.list_meta("").await.expect("meta"),
        before,
        "nothing written"
    );
    assert_eq!(store.write_failure(), None);
    store
        .put_meta("k", "w")
        .await
        .expect("a write after the checks");
}

/// Drains what a feed subscriber has been sent so far.
fn received(
    rx: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<crate::feed::FeedEntry>>,
) -> Vec<crate::feed::FeedEntry> {
    let mut got = Vec::new();
    while let Ok(entry) = rx.try_recv() {
        got.push((*entry).clone());
    }
    got
}

fn runner_entry(name: &str, kind: &str, at: i64) -> crate::feed::NewEntry {
    crate::feed::NewEntry::new(
        crate::feed::Topic::Runner,
        name,
        kind,
        at,
        format!("runner {name} {kind}"),
        serde_json::json!({ "n": at }),
    )
}

/// Every kind of entry (a task's history, a change in memory recorded on its own, a fact
/// written with its entry, a train's formation and end) gets the next position, is read back
/// as written, and is published once committed, in position order.
pub async fn keeps_the_change_feed_in_position_order<S: Store>(store: &S) {
    use crate::feed::Topic;
    let mut rx = store.feed().subscribe();
    let task = create(store, "followed").await;
    let runner = store
        .record(&runner_entry("r1", "connected", 1_100))
        .await
        .expect("record");
    let paused = crate::feed::NewEntry::new(
        Topic::Queue,
        "queue",
        "paused",
        1_200,
        "new leases paused",
        serde_json::json!({ "reason": "lunch" }),
    );
    let pause = store
        .set_meta_recording("queue_paused", Some("{}"), &paused)
        .await
        .expect("pause");
    assert_eq!(
        store
            .get_meta("queue_paused")
            .await
            .expect("meta")
            .as_deref(),
        Some("{}")
    );
    let train = store
        .start_train(&sha('a'), std::slice::from_ref(&task.id), 1_300)
        .await
        .expect("train");
    transition(store, &task, TaskStatus::InProgress)
        .await
        .expect("transition");
    store
        .end_train(
            train,
            &TrainEnd {
                outcome: crate::store::TrainOutcome::Landed,
                builds: 1,
                landed: 1,
                red_commit: None,
            },
            1_400,
        )
        .await
        .expect("end train");
    let resumed = crate::feed::NewEntry::new(
        Topic::Queue,
        "queue",
        "resumed",
        1_500,
        "new leases resumed",
        serde_json::json!({}),
    );
    store
        .set_meta_recording("queue_paused", None, &resumed)
        .await
        .expect("resume");
    assert_eq!(store.get_meta("queue_paused").await.expect("meta"), None);

    let all = store.entries_after(0, 100).await.expect("entries");
    let seen: Vec<(Topic, &str, &str)> = all
        .iter()
        .map(|e| (e.topic, e.subject.as_str(), e.kind.as_str()))
        .collect();
    let train_id = train.to_string();
    assert_eq!(
        seen,
        vec![
            (Topic::Task, task.id.as_str(), "created"),
            (Topic::Runner, "r1", "connected"),
            (Topic::Queue, "queue", "paused"),
            (Topic::Train, train_id.as_str(), "formed"),
            (Topic::Task, task.id.as_str(), all[4].kind.as_str()),
            (Topic::Train, train_id.as_str(), "ended"),
            (Topic::Queue, "queue", "resumed"),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(all[1].position, runner);
    assert_eq!(all[2].position, pause);
    assert_eq!(all[1].at, 1_100);
    assert_eq!(all[1].message, "runner r1 connected");
    assert_eq!(all[1].data, r#"{"n":1100}"#);
    assert_eq!((all[1].from, all[1].to), (None, None));
    assert_eq!(
        (all[4].from, all[4].to),
        (Some(TaskStatus::Open), Some(TaskStatus::InProgress))
    );
    let formed: serde_json::Value = serde_json::from_str(&all[3].data).expect("json");
    assert_eq!(formed["tasks"], serde_json::json!([task.id.as_str()]));
    // The newest position, pages, and the task history as a subset of the feed.
    assert_eq!(
        store.last_event_id().await.expect("newest"),
        all.last().expect("some").position
    );
    let page = store.entries_after(all[1].position, 2).await.expect("page");
    assert_eq!(page, all[2..4].to_vec());
    let history = store.events_after(0, 100).await.expect("events");
    let task_positions: Vec<i64> = history.iter().map(|e| e.id).collect();
    assert_eq!(task_positions, vec![all[0].position, all[4].position]);
    assert_eq!(
        all[4].task_event().expect("a task's"),
        store.events(&task.id).await.expect("history")[1]
    );
    // Published once each, in position order, as stored.
    assert_eq!(received(&mut rx), all);
    // A task's entry is written with its change, never on its own.
    let mut stray = runner_entry("r1", "created", 1);
    stray.topic = Topic::Task;
    assert!(store.record(&stray).await.is_err());
}

/// Writers racing (entries recorded on their own, tasks created, facts with their entries)
/// still publish in position order, each position once, and what a subscriber was sent is
/// exactly what storage holds: a reader that resumes from any position skips nothing.
pub async fn publishes_feed_positions_in_commit_order_with_concurrent_writers<S: Store>(store: &S) {
    let mut rx = store.feed().subscribe();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..6 {
        let store = store.clone();
        writers.spawn(async move {
            for i in 0..10 {
                let at = w * 100 + i;
                match i % 3 {
                    0 => {
                        store
                            .record(&runner_entry(&format!("r{w}"), "connected", at))
                            .await
                            .expect("record");
                    }
                    1 => {
                        store
                            .create_task(new_task(None, &format!("w{w}-{i}"), 2, &[]), at)
                            .await
                            .expect("create");
                    }
                    _ => {
                        store
                            .set_meta_recording(
                                &format!("k{w}"),
                                Some("1"),
                                &runner_entry(&format!("r{w}"), "drained", at),
                            )
                            .await
                            .expect("meta");
                    }
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let stored = store.entries_after(0, 1_000).await.expect("entries");
    assert_eq!(stored.len(), 60);
    let sent = received(&mut rx);
    assert_eq!(sent, stored, "published in position order, none skipped");
    let positions: Vec<i64> = stored.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    // Resuming after any position gives exactly the rest.
    for (k, entry) in stored.iter().enumerate().step_by(7) {
        let rest = store
            .entries_after(entry.position, 1_000)
            .await
            .expect("rest");
        assert_eq!(rest, stored[k + 1..].to_vec());
    }
}

/// A write that is refused (a lost compare-and-swap) records and publishes nothing.
pub async fn publishes_nothing_of_a_refused_write<S: Store>(store: &S) {
    let task = create(store, "raced").await;
    transition(store, &task, TaskStatus::InProgress)
        .await
        .expect("first");
    let newest = store.last_event_id().await.expect("newest");
    let mut rx = store.feed().subscribe();
    let stale = transition(store, &task, TaskStatus::Cancelled).await;
    assert!(matches!(stale, Err(Error::Conflict(_))), "{stale:?}");
    assert_eq!(store.last_event_id().await.expect("newest"), newest);
    assert!(
        store
            .entries_after(newest, 10)
            .await
            .expect("none")
            .is_empty()
    );
    assert!(received(&mut rx).is_empty());
    // The next write's entry comes right after.
    let record = store
        .record(&runner_entry("r", "connected", 5))
        .await
        .expect("record");
    assert_eq!(record, newest + 1);
    assert_eq!(received(&mut rx).len(), 1);
}

/// A webhook endpoint's cursor: made once at the head it is given (opening it again leaves it
/// where it is), written whole, never moved back, and forgotten on demand.
pub async fn keeps_webhook_cursors_that_never_go_back<S: Store>(store: &S) {
    use crate::store::WebhookCursor;
    assert!(store.webhooks().await.expect("none").is_empty());
    let url = "http://127.0.0.1:9/hook";
    let opened = store.open_webhook(url, 7, 1_000).await.expect("open");
    assert_eq!(opened, WebhookCursor::at(url, 7));
    let failing = WebhookCursor {
        attempts: 2,
        next_attempt_at: Some(5_000),
        failing_since: Some(2_000),
        last_error: Some("connection refused".into()),
        last_error_at: Some(3_000),
        ..opened.clone()
    };
    assert!(store.put_webhook(&failing).await.expect("put"));
    assert_eq!(
        store.open_webhook(url, 99, 4_000).await.expect("again"),
        failing,
        "an endpoint that has a cursor keeps it"
    );
    let delivered = WebhookCursor {
        position: 9,
        last_delivered_at: Some(6_000),
        ..WebhookCursor::at(url, 0)
    };
    assert!(store.put_webhook(&delivered).await.expect("forward"));
    assert!(
        !store
            .put_webhook(&WebhookCursor::at(url, 8))
            .await
            .expect("back"),
        "a cursor never goes back"
    );
    assert!(
        !store
            .put_webhook(&WebhookCursor::at("http://127.0.0.1:9/other", 1))
            .await
            .expect("unknown"),
        "an endpoint never opened is not written"
    );
    store
        .open_webhook("http://127.0.0.1:9/a", 3, 1_000)
        .await
        .expect("second");
    let all = store.webhooks().await.expect("all");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].url, "http://127.0.0.1:9/a");
    assert_eq!(all[1], delivered);
    // Forgotten (no longer configured): gone, and opened again it starts afresh.
    assert!(store.forget_webhook(url).await.expect("forget"));
    assert!(!store.forget_webhook(url).await.expect("again"), "gone");
    let all = store.webhooks().await.expect("all");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].url, "http://127.0.0.1:9/a");
    assert_eq!(
        store.open_webhook(url, 12, 7_000).await.expect("reopen"),
        WebhookCursor::at(url, 12)
    );
}
