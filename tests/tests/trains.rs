//! Merge trains end to end: Verified tasks land in batches with one build of the train's tip,
//! a red tip is searched for its first red commit, a conflicting task is left out without a
//! build, a red base pauses landing until it is fixed, and SIGKILL of the server during a
//! train's build or right after its swap loses and duplicates nothing.
//!
//! The server's build below records every build of its integration worktree (the notes in the
//! tree and a checksum of them) in `$AGENT_LOG_DIR/builds`; the runners run the same command
//! (the server's verification) in their own worktrees, where it records nothing.

use pipeline_proto::v1 as pb;
use pipeline_tests::{
    Runner, Server, TestRepo, agent_args, as_strs, fake_runner, git, hand_made_bundle, main_tip,
    runs, wait_for,
};
use serde_json::Value;

/// A build command that records each integration build (in any of the server's build slots'
/// worktrees, `integration`, `integration-2`, …) and then runs `then` there.
fn build_cmd(then: &str) -> String {
    format!(
        "case $PWD in */integration|*/integration-[0-9]*) mkdir -p \"$AGENT_LOG_DIR\"; \
         echo \"$(ls notes 2>/dev/null | tr '\\n' ' ')$(cat notes/* 2>/dev/null | cksum)\" \
         >> \"$AGENT_LOG_DIR/builds\"; {then};; esac"
    )
}

/// A build command that fails while task `id`'s note is in the tree and not marked fixed.
fn breaks_until_fixed(id: &str) -> String {
    build_cmd(&format!(
        "if [ -e notes/{id}.md ] && ! grep -q fixed notes/{id}.md; then \
         echo '{id} breaks the build' >&2; exit 1; fi"
    ))
}

/// A server that builds with `build`, trains of two, at most `slots` trains at once, plus
/// `extra` flags.
fn speculating_server(repo: &TestRepo, build: &str, slots: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--build-cmd",
        build,
        "--batch-max",
        "2",
        "--integration-slots",
        slots,
    ];
    args.extend_from_slice(extra);
    Server::start(repo, &args)
}

/// The integration builds so far, oldest first.
fn builds(repo: &TestRepo) -> Vec<String> {
    repo.agent_lines("builds")
}

fn integrate_runs(task: &Value) -> Vec<Value> {
    runs(task)
        .into_iter()
        .filter(|r| r["phase"] == "integrate")
        .collect()
}

fn dev_runs(task: &Value) -> usize {
    runs(task).iter().filter(|r| r["phase"] == "dev").count()
}

/// The train a task landed in (its successful integrate run's).
fn landed_train(task: &Value) -> i64 {
    let runs = integrate_runs(task);
    let landed: Vec<&Value> = runs.iter().filter(|r| r["status"] == "success").collect();
    assert_eq!(landed.len(), 1, "one successful integration: {runs:?}");
    landed[0]["train"].as_i64().expect("a train ID")
}

/// A runner with `slots` slots and the scripted agent.
fn runner_with_slots(repo: &TestRepo, server: &Server, slots: u32) -> Runner {
    let slots = slots.to_string();
    let args = agent_args(&["--slots", &slots]);
    Runner::start(repo, server, "r", &as_strs(&args))
}

/// Adds tasks `ids` (in that order) whose agents wait, each with `description` after the mode.
fn add_waiting(server: &Server, ids: &[&str], description: &str) {
    for id in ids {
        server.add(&[
            "--id",
            id,
            "--title",
            id,
            "--description",
            &format!("MODE: {description}"),
        ]);
    }
}

/// Whether the agent of task `id` would go on at once instead of waiting: a release file that
/// lets it go (all agents', or its own) is there already. Release files stay once written.
fn released(repo: &TestRepo, id: &str) -> bool {
    ["release".to_owned(), format!("release-{id}")]
        .iter()
        .any(|f| repo.agent_log().join(f).exists())
}

/// Lets the waiting agents of `ids` commit while landing is held, then lets them land together:
/// the integrator sees all of them Verified at once. Each agent is released by a file of its
/// own: the agents of a later call (and of other tasks) still wait, so none of theirs can
/// reach Verified, and form a train, before landing is held.
fn verify_then_land_together(repo: &TestRepo, server: &Server, ids: &[&str]) {
    for id in ids {
        assert!(
            !released(repo, id),
            "the agent of {id} was released already: it would not wait for landing to be held"
        );
        // Leased first (a timeout here prints the server's log), then its agent started.
        server.wait_status(id, "in_progress");
        repo.wait_agent(id);
    }
    server.ctl(&["queue", "pause", "--landing"]).ok();
    for id in ids {
        repo.release_task(id);
    }
    for id in ids {
        server.wait_status(id, "verified");
    }
    let queue = server.ctl(&["queue", "--json"]).json();
    // Should this fail, all that explains it: the queue, and each task as the server sees it.
    let explain = || {
        let tasks: Vec<Value> = ids.iter().map(|id| server.show(id)).collect();
        format!(
            "queue: {queue}\ntasks: {}\nthe server's log:\n{}",
            Value::from(tasks),
            server.log()
        )
    };
    assert_eq!(queue["landing"]["state"], "paused", "{}", explain());
    assert_eq!(
        queue["waiting"].as_array().map(Vec::len),
        Some(ids.len()),
        "{}",
        explain()
    );
    // Nothing lands while landing is held: no task says when it will.
    for w in queue["waiting"].as_array().into_iter().flatten() {
        assert!(w["eta_seconds"].is_null(), "{w}: {}", explain());
    }
    server.ctl(&["queue", "resume"]).ok();
}

#[test]
fn a_train_of_six_lands_with_one_build() {
    let repo = TestRepo::new();
    // Every value the base takes is in its reflog.
    git(&repo.repo(), &["config", "core.logAllRefUpdates", "always"]);
    let server = Server::start(&repo, &["--build-cmd", &build_cmd("true")]);
    let _r = runner_with_slots(&repo, &server, 6);
    let ids = ["a1", "a2", "a3", "a4", "a5", "a6"];
    add_waiting(&server, &ids, "wait");
    let before = main_tip(&repo);
    let reflog = || {
        git(
            &repo.repo(),
            &["reflog", "show", "--format=%H", "refs/heads/main"],
        )
        .lines()
        .count()
    };
    let updates_before = reflog();
    verify_then_land_together(&repo, &server, &ids);
    let tasks: Vec<Value> = ids
        .iter()
        .map(|id| server.wait_status(id, "done"))
        .collect();
    assert_eq!(builds(&repo).len(), 1, "one build: {:?}", builds(&repo));
    let mut newest_first = ids.to_vec();
    newest_first.reverse();
    assert_eq!(repo.landed(), newest_first, "in order, each once");
    // One compare-and-swap moved the base over the whole chain.
    assert_eq!(
        git(
            &repo.repo(),
            &["rev-list", "--count", &format!("{before}..main")]
        ),
        "6"
    );
    assert_eq!(reflog(), updates_before + 1, "one update of the base");
    let train = landed_train(&tasks[0]);
    for t in &tasks {
        assert_eq!(landed_train(t), train, "the same train");
        let run = integrate_runs(t).pop().expect("integrate run");
        assert_eq!(run["builds"], 1, "{run}");
        assert!(
            run["error"]
                .as_str()
                .is_some_and(|n| n.contains(&format!("landed in train {train} with 5 other"))),
            "{run}"
        );
    }
    let status = server.ctl(&["status", "--json"]).json();
    let per_landed = status["builds_per_landed"].as_f64().expect("a figure");
    assert!((per_landed - 1.0 / 6.0).abs() < 1e-9, "{status}");
    assert_eq!(status["landing"]["state"], "running");
    assert_eq!(status["queue_paused"], false);
}

#[test]
fn a_culprit_in_the_middle_of_a_train_is_found_and_the_others_land_without_new_dev_runs() {
    let repo = TestRepo::new();
    let build = breaks_until_fixed("c4");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner_with_slots(&repo, &server, 8);
    let ids = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"];
    add_waiting(&server, &ids, "wait-once");
    verify_then_land_together(&repo, &server, &ids);
    let tasks: Vec<Value> = ids
        .iter()
        .map(|id| server.wait_status(id, "done"))
        .collect();

    let first = landed_train(&tasks[0]);
    for t in &tasks[..3] {
        assert_eq!(landed_train(t), first, "the green prefix landed: {t}");
    }
    // The culprit was charged, with the build's output in its next prompt.
    let culprit = &tasks[3];
    let failed = &integrate_runs(culprit)[0];
    assert_eq!(failed["status"], "failure");
    assert_eq!(failed["failure_kind"], "task");
    assert_eq!(failed["train"], first);
    let error = failed["error"].as_str().expect("error");
    assert!(error.contains("c4 breaks the build"), "{error}");
    assert!(error.contains("this task's commit, red"), "{error}");
    assert_eq!(culprit["failures"], 1);
    let prompt = repo.agent_file("dev-c4-2.prompt").expect("second prompt");
    assert!(prompt.contains("c4 breaks the build"), "{prompt}");
    // The ones after it went back uncharged and landed later with their first commit.
    let mut later = None;
    for t in &tasks[4..] {
        assert_eq!(dev_runs(t), 1, "no new dev run: {t}");
        assert_eq!(t["failures"], 0);
        let requeued = &integrate_runs(t)[0];
        assert_eq!(requeued["status"], "failure");
        assert_eq!(requeued["failure_kind"], Value::Null, "not charged");
        assert!(
            requeued["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("not landed, not charged")),
            "{requeued}"
        );
        let train = landed_train(t);
        assert_ne!(train, first);
        assert_eq!(*later.get_or_insert(train), train, "together in one train");
    }
    // The first train built its tip and then bisected: no tree twice, at most 1 + log2(8).
    let all = builds(&repo);
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), all.len(), "no tree built twice: {all:?}");
    assert!(
        all[0].starts_with("c1.md c2.md c3.md c4.md c5.md c6.md c7.md c8.md "),
        "{all:?}"
    );
    // The bisection: the tip (8, red), then prefixes 4 (red), 2 and 3 (green): c4 is the
    // first red commit, in four builds.
    let prefix = |b: &str, n: usize| {
        let notes: Vec<&str> = b.split(' ').take_while(|w| w.ends_with(".md")).collect();
        notes
            == ids[..n]
                .iter()
                .map(|id| format!("{id}.md"))
                .collect::<Vec<_>>()
    };
    assert!(prefix(&all[0], 8) && prefix(&all[1], 4), "{all:?}");
    assert!(prefix(&all[2], 2) && prefix(&all[3], 3), "{all:?}");
    // Each task is on the base once, and no red tree ever was: no commit of the base has c4's
    // note without its fix.
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ids);
    for commit in git(&repo.repo(), &["rev-list", "--first-parent", "main"]).lines() {
        let note = std::process::Command::new("git")
            .arg("-C")
            .arg(repo.repo())
            .args(["show", &format!("{commit}:notes/c4.md")])
            .output()
            .expect("git show");
        if note.status.success() {
            assert!(
                String::from_utf8_lossy(&note.stdout).contains("fixed"),
                "{commit} on the base is red"
            );
        }
    }
}

#[test]
fn a_conflicting_task_is_left_out_of_the_train_without_a_build() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--build-cmd", &build_cmd("true")]);
    let _r = runner_with_slots(&repo, &server, 3);
    // x1 and x2 write the same line of shared.txt; x3 writes only its own file.
    add_waiting(&server, &["x1", "x2"], "sameline");
    add_waiting(&server, &["x3"], "wait");
    verify_then_land_together(&repo, &server, &["x1", "x2", "x3"]);
    let x1 = server.wait_status("x1", "done");
    let x3 = server.wait_status("x3", "done");
    assert_eq!(landed_train(&x1), landed_train(&x3));
    let first_build = builds(&repo).first().cloned().expect("a build");
    assert!(
        first_build.starts_with("x1.md x3.md "),
        "the chain without x2: {first_build}"
    );
    let x2 = server.wait_status("x2", "done");
    let runs = integrate_runs(&x2);
    // It conflicted only with x1, a commit before it in the same train: it waited for the
    // next train uncharged (x1 might not have landed), where it conflicted with the base.
    let waited = &runs[0];
    assert_eq!(waited["status"], "failure");
    assert_eq!(waited["failure_kind"], Value::Null, "{waited}");
    assert_eq!(waited["builds"], 0, "no build spent on it: {waited}");
    let sent_back = &runs[1];
    assert_eq!(sent_back["status"], "failure");
    assert_eq!(sent_back["failure_kind"], "task", "{sent_back}");
    assert_eq!(sent_back["builds"], 0, "no build spent on it: {sent_back}");
    assert!(
        sent_back["error"]
            .as_str()
            .is_some_and(|e| e.contains("cherry-pick conflict")),
        "{sent_back}"
    );
    assert_eq!(x2["failures"], 1);
    assert_eq!(dev_runs(&x2), 2);
    let prompt = repo.agent_file("dev-x2-2.prompt").expect("second prompt");
    assert!(prompt.contains("CONFLICT"), "git's message: {prompt}");
    assert_eq!(repo.landed(), ["x2", "x3", "x1"]);
}

#[test]
fn a_red_base_pauses_landing_until_a_fix_is_pushed() {
    let repo = TestRepo::new();
    let build = build_cmd(
        "if [ -e broken.txt ] && [ ! -e fixed.txt ]; then echo 'the base is broken' >&2; \
         exit 1; fi",
    );
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner_with_slots(&repo, &server, 2);
    add_waiting(&server, &["r1", "r2"], "wait");
    repo.wait_agent("r1");
    repo.wait_agent("r2");
    // A person breaks the base while the agents work on the green one before it.
    let broken = repo.push_to_main("broken.txt", "oops");
    repo.release_agents();
    let status = wait_for("landing to pause", || {
        let s = server.ctl(&["status", "--json"]).json();
        (s["landing"]["state"] == "paused").then_some(s)
    });
    let reason = status["landing"]["reason"].as_str().expect("a reason");
    assert!(reason.contains(&broken), "names the red base: {reason}");
    let text = server.ctl(&["status"]).ok();
    assert!(
        text.contains("landing:         PAUSED: the base main"),
        "{text}"
    );
    // No one was charged, and nothing landed on the red base.
    for id in ["r1", "r2"] {
        let t = server.show(id);
        assert_eq!(t["status"], "verified", "{t}");
        assert_eq!(t["failures"], 0);
        assert!(
            t["waiting_for"].as_array().is_some_and(|w| w
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("landing is paused")))),
            "{t}"
        );
    }
    assert_eq!(main_tip(&repo), broken);
    // A person pushes a fix: landing resumes on its own.
    repo.push_to_main("fixed.txt", "fixed");
    server.wait_status("r1", "done");
    server.wait_status("r2", "done");
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["landing"]["state"], "running", "{status}");
    for id in ["r1", "r2"] {
        let t = server.show(id);
        assert_eq!(t["failures"], 0, "{t}");
        assert_eq!(dev_runs(&t), 1);
    }
}

/// A lone task whose runner verified it on the base as it is lands on its runner's word, without
/// waiting out the gathering window (an hour here: a server that waited would fail the test's
/// deadline) and without a build.
#[test]
fn a_lone_task_verified_on_the_base_lands_without_waiting_out_the_gathering_window() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &["--test-cmd", &build_cmd("true"), "--gather-window", "1h"],
    );
    let _runner = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    let id = server.add(&["--title", "t"]);
    server.wait_status(&id, "done");
    assert!(builds(&repo).is_empty(), "no build: {:?}", builds(&repo));
}

#[test]
fn a_pass_under_another_verification_does_not_make_the_server_skip_its_build() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &["--test-cmd", &build_cmd("true"), "--build-cmd", "true"],
    );
    // A runner that does not run the server's verification (an older one) says Verified
    // with no digest: the base did not move, yet the server builds the tree itself.
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let a = fake.next_assignment();
    let v = a
        .verification
        .clone()
        .expect("the server sends its verification");
    assert!(v.test_cmd.is_some_and(|c| c.contains("integration")));
    let (head, bundle) = hand_made_bundle(&repo, &a.base_commit, 1, &["refs/heads/out"]);
    fake.complete(
        a.lease.expect("lease"),
        pb::LeaseOutcome::Verified,
        Some(head),
        bundle,
    )
    .expect("complete");
    server.wait_status(&id, "done");
    assert_eq!(
        builds(&repo).len(),
        1,
        "the server built it: {}",
        server.ctl(&["logs", &id]).ok()
    );

    // A real runner given its own --test-cmd runs the server's instead.
    fake.close();
    let args = agent_args(&["--test-cmd", "touch \"$AGENT_LOG_DIR/runner-test-ran\""]);
    let r = Runner::start(&repo, &server, "real", &as_strs(&args));
    let id = server.add(&["--title", "u"]);
    server.wait_status(&id, "done");
    assert!(repo.agent_file("runner-test-ran").is_none(), "{}", r.log());
    let logs = server.ctl(&["logs", &id]).ok();
    assert!(logs.contains("the server's verification"), "{logs}");
}

#[test]
fn dependencies_inside_one_train_keep_their_order() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--build-cmd", &build_cmd("true")]);
    let _r = runner_with_slots(&repo, &server, 2);
    // `later` comes first by priority, but depends on `first`.
    server.add(&[
        "--id",
        "later",
        "--title",
        "l",
        "--priority",
        "0",
        "--description",
        "MODE: wait",
    ]);
    server.add(&[
        "--id",
        "first",
        "--title",
        "f",
        "--priority",
        "3",
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent("later");
    repo.wait_agent("first");
    server
        .ctl(&["task", "depend", "later", "--on", "first"])
        .ok();
    verify_then_land_together(&repo, &server, &["later", "first"]);
    let later = server.wait_status("later", "done");
    let first = server.wait_status("first", "done");
    assert_eq!(landed_train(&later), landed_train(&first), "one train");
    assert_eq!(repo.landed(), ["later", "first"], "the dependency first");
    assert_eq!(builds(&repo).len(), 1);
}

#[test]
fn sigkill_of_the_server_during_a_trains_build_then_restart() {
    let repo = TestRepo::new();
    let build = build_cmd("while [ ! -e \"$AGENT_LOG_DIR/build-go\" ]; do sleep 0.05; done");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let addr = server.addr.clone();
    let _r = runner_with_slots(&repo, &server, 3);
    let ids = ["k1", "k2", "k3"];
    add_waiting(&server, &ids, "wait");
    verify_then_land_together(&repo, &server, &ids);
    server.wait_train_building();
    server.kill();
    repo.touch("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build, "--listen", &addr]);
    for id in ids {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
        assert_eq!(dev_runs(&t), 1, "{t}");
    }
    assert_eq!(repo.landed(), ["k3", "k2", "k1"], "each once");
}

#[test]
fn sigkill_of_the_server_right_after_a_trains_swap_then_restart() {
    let repo = TestRepo::new();
    let build = build_cmd("true");
    let mut cmd = Server::command(&repo, &["--build-cmd", &build]);
    cmd.env("PIPELINE_FAILPOINT", "after-base-update");
    let mut server = Server::spawn(&mut cmd).expect("server");
    let addr = server.addr.clone();
    let _r = runner_with_slots(&repo, &server, 3);
    let ids = ["s1", "s2", "s3"];
    add_waiting(&server, &ids, "wait");
    verify_then_land_together(&repo, &server, &ids);
    let status = server.proc.wait_exit();
    assert!(
        !status.success(),
        "aborted right after the swap: {status:?}"
    );
    assert_eq!(
        repo.landed(),
        ["s3", "s2", "s1"],
        "the swap reached the base"
    );
    let server = Server::start(&repo, &["--build-cmd", &build, "--listen", &addr]);
    for id in ids {
        let t = server.wait_status(id, "done");
        let runs = integrate_runs(&t);
        assert!(
            runs.last()
                .and_then(|r| r["error"].as_str())
                .is_some_and(|e| e.contains("before a restart; recorded after it")),
            "{runs:?}"
        );
    }
    assert_eq!(repo.landed(), ["s3", "s2", "s1"], "nothing landed twice");
    assert_eq!(builds(&repo).len(), 1, "not built again");
}

#[test]
fn batch_max_one_builds_every_commit_of_the_base_on_its_own() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &["--build-cmd", &build_cmd("true"), "--batch-max", "1"],
    );
    let _r = runner_with_slots(&repo, &server, 3);
    let ids = ["b1", "b2", "b3"];
    add_waiting(&server, &ids, "wait");
    verify_then_land_together(&repo, &server, &ids);
    let trains: Vec<i64> = ids
        .iter()
        .map(|id| landed_train(&server.wait_status(id, "done")))
        .collect();
    let mut distinct = trains.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "a train each: {trains:?}");
    // The first one's tree is the one its runner built under the server's verification; each
    // later one sits on a base that moved, and the server builds it.
    assert_eq!(builds(&repo).len(), 2, "{:?}", builds(&repo));
    assert_eq!(repo.landed(), ["b3", "b2", "b1"]);
}

#[test]
fn a_base_red_for_want_of_its_environment_lands_again_on_queue_resume() {
    let repo = TestRepo::new();
    // The build fails while the machine lacks something (a marker file): the base itself is
    // red, and nobody's commit is to blame.
    let build = build_cmd(
        "if [ -e \"$AGENT_LOG_DIR/env-broken\" ]; then echo 'the toolchain is gone' >&2; \
         exit 1; fi",
    );
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner_with_slots(&repo, &server, 2);
    add_waiting(&server, &["e1", "e2"], "wait");
    repo.wait_agent("e1");
    repo.wait_agent("e2");
    std::fs::write(repo.agent_log().join("env-broken"), "").expect("break");
    // A person's commit moves the base, so no tree of the train is one a runner verified.
    let tip = repo.push_to_main("unrelated.txt", "a person's change");
    verify_then_land_together(&repo, &server, &["e1", "e2"]);
    let status = wait_for("landing to pause on the red base", || {
        let s = server.ctl(&["status", "--json"]).json();
        (s["landing"]["state"] == "paused").then_some(s)
    });
    let reason = status["landing"]["reason"].as_str().expect("a reason");
    assert!(reason.contains(&tip), "names the base: {reason}");
    for id in ["e1", "e2"] {
        let t = server.show(id);
        assert_eq!(
            (t["status"].as_str(), t["failures"].as_u64()),
            (Some("verified"), Some(0))
        );
    }
    // Someone mends the machine; the base did not change, so a person resumes.
    std::fs::remove_file(repo.agent_log().join("env-broken")).expect("mend");
    let resumed = server.ctl(&["queue", "resume"]).ok();
    assert!(!resumed.contains("nothing was paused"), "{resumed}");
    for id in ["e1", "e2"] {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
        assert_eq!(dev_runs(&t), 1, "no new dev run: {t}");
    }
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ["e1", "e2"]);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["landing"]["state"], "running", "{status}");
}

#[test]
fn queue_shows_the_train_its_step_and_when_the_next_ones_land() {
    let repo = TestRepo::new();
    // The server's build waits while $AGENT_LOG_DIR/hold exists, so a train can be seen in
    // the middle of its build.
    let build = build_cmd("while [ -e \"$AGENT_LOG_DIR/hold\" ]; do sleep 0.05; done");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner_with_slots(&repo, &server, 5);
    // A first train of two, built: the estimates learn how long a train takes.
    add_waiting(&server, &["q1", "q2"], "wait");
    verify_then_land_together(&repo, &server, &["q1", "q2"]);
    server.wait_status("q2", "done");
    // The next train holds in its build.
    std::fs::write(repo.agent_log().join("hold"), "").expect("hold");
    add_waiting(&server, &["q3", "q4", "q5"], "wait");
    for id in ["q3", "q4", "q5"] {
        repo.wait_agent(id);
    }
    server.ctl(&["queue", "pause", "--landing"]).ok();
    repo.release_task("q3");
    repo.release_task("q4");
    server.wait_status("q3", "verified");
    server.wait_status("q4", "verified");
    server.ctl(&["queue", "resume"]).ok();
    let queue = wait_for("the train to be building", || {
        let q = server.ctl(&["queue", "--json"]).json();
        q["train"]["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("building"))
            .then_some(q)
    });
    assert_eq!(
        queue["train"]["tasks"],
        serde_json::json!(["q3", "q4"]),
        "{queue}"
    );
    assert_eq!(
        queue["train"]["step"], "building the train's tip (2 commits)",
        "{queue}"
    );
    // A task verified now waits behind the train, with an estimate.
    repo.release_task("q5");
    server.wait_status("q5", "verified");
    let queue = server.ctl(&["queue", "--json"]).json();
    let waiting = queue["waiting"].as_array().cloned().unwrap_or_default();
    let q5 = waiting
        .iter()
        .find(|w| w["id"] == "q5")
        .unwrap_or_else(|| panic!("q5 waits: {queue}"));
    assert_eq!(
        (q5["status"].as_str(), q5["position"].as_u64()),
        (Some("verified"), Some(1))
    );
    assert!(
        q5["eta_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "an estimate from the first train: {queue}"
    );
    let text = server.ctl(&["queue"]).ok();
    assert!(text.contains("q3") && text.contains("q5"), "{text}");
    assert!(text.contains("lands ~"), "{text}");
    std::fs::remove_file(repo.agent_log().join("hold")).expect("let it build");
    for id in ["q3", "q4", "q5"] {
        server.wait_status(id, "done");
    }
}

/// `queue pause --landing-only` while a train builds: nothing lands (CONTRACT: "nothing
/// lands"). The train finishes its build, then holds before landing, its step saying so, and
/// lands once a person resumes.
#[test]
fn a_train_in_flight_holds_its_landing_while_a_person_pauses_landing() {
    let repo = TestRepo::new();
    let build = build_cmd("while [ -e \"$AGENT_LOG_DIR/hold\" ]; do sleep 0.05; done");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner_with_slots(&repo, &server, 2);
    std::fs::write(repo.agent_log().join("hold"), "").expect("hold");
    add_waiting(&server, &["h1", "h2"], "wait");
    verify_then_land_together(&repo, &server, &["h1", "h2"]);
    wait_for("the train to be building", || {
        let q = server.ctl(&["queue", "--json"]).json();
        q["train"]["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("building"))
            .then_some(q)
    });
    let before = main_tip(&repo);
    server.ctl(&["queue", "pause", "--landing-only"]).ok();
    std::fs::remove_file(repo.agent_log().join("hold")).expect("let it build");
    let queue = wait_for("the train to hold before landing", || {
        let q = server.ctl(&["queue", "--json"]).json();
        q["train"]["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("held"))
            .then_some(q)
    });
    assert_eq!(queue["landing"]["state"], "paused", "{queue}");
    for id in ["h1", "h2"] {
        assert_eq!(server.show(id)["status"], "verified", "{id} did not land");
    }
    assert_eq!(
        main_tip(&repo),
        before,
        "the base did not move while paused"
    );
    server.ctl(&["queue", "resume"]).ok();
    for id in ["h1", "h2"] {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
    }
    assert_eq!(repo.landed().len(), 2, "each once: {:?}", repo.landed());
}

/// Whether a commit of the base's first-parent history has `id`'s note without its fix.
fn red_on_base(repo: &TestRepo, id: &str) -> Option<String> {
    git(&repo.repo(), &["rev-list", "--first-parent", "main"])
        .lines()
        .find(|commit| {
            let note = std::process::Command::new("git")
                .arg("-C")
                .arg(repo.repo())
                .args(["show", &format!("{commit}:notes/{id}.md")])
                .output()
                .expect("git show");
            note.status.success() && !String::from_utf8_lossy(&note.stdout).contains("fixed")
        })
        .map(str::to_owned)
}

/// Two trains at once (`--integration-slots 2`, two tasks each): the second is formed on the
/// first's tip as if it had landed; the first turns red (x2), so the second's guess never
/// lands: it is formed again on the real base and lands there, none of its tasks charged for
/// anything on the guess (x2 was in it).
#[test]
fn a_speculative_train_whose_train_ahead_turns_red_is_rebuilt_on_the_new_base() {
    let repo = TestRepo::new();
    let build = breaks_until_fixed("x2");
    let server = speculating_server(&repo, &build, "2", &[]);
    let _r = runner_with_slots(&repo, &server, 4);
    let ids = ["x1", "x2", "y1", "y2"];
    add_waiting(&server, &ids, "wait-once");
    verify_then_land_together(&repo, &server, &ids);
    let tasks: Vec<Value> = ids
        .iter()
        .map(|id| server.wait_status(id, "done"))
        .collect();
    // x2 was charged in the first train; the second train's tasks never were.
    assert_eq!(tasks[1]["failures"], 1, "{}", tasks[1]);
    for t in [&tasks[0], &tasks[2], &tasks[3]] {
        assert_eq!(t["failures"], 0, "{t}");
        assert_eq!(dev_runs(t), 1, "{t}");
    }
    let (first, second) = (landed_train(&tasks[0]), landed_train(&tasks[2]));
    assert_ne!(first, second);
    assert_eq!(landed_train(&tasks[3]), second, "y1 and y2 together");
    let runs = integrate_runs(&tasks[2]);
    assert_eq!(
        runs.len(),
        1,
        "one train for y1, formed again within it: {runs:?}"
    );
    assert_eq!(runs[0]["train"], second);
    // The second train was built on the real base (x1 only). On the guess (x2's note in it)
    // it was built at most until the first's tip came back red: then that build was stopped
    // (or, formed after that, it was never built on it).
    let all = builds(&repo);
    assert!(
        all.iter().any(|b| b.starts_with("x1.md y1.md y2.md ")),
        "a build on the real base: {all:?}"
    );
    // Each task on the base once, the first train's before the second's, and no red tree.
    let landed = repo.landed();
    let at = |id: &str| landed.iter().position(|l| l == id).expect("landed");
    assert_eq!(landed.len(), 4, "{landed:?}");
    assert!(at("x1") > at("y1") && at("x1") > at("y2"), "{landed:?}");
    assert_eq!(
        red_on_base(&repo, "x2"),
        None,
        "never a red tree on the base"
    );
}

/// The server SIGKILLed right after the first of two trains built at once moved the base,
/// the second (speculative, on the first's tip) still in flight: after a restart, the first's
/// landing is finished from the journal, the second's is formed again, and nothing lands twice.
#[test]
fn sigkill_of_the_server_with_speculative_trains_in_flight_then_restart() {
    let repo = TestRepo::new();
    let build = build_cmd("true");
    let args = [
        "--build-cmd",
        &build,
        "--batch-max",
        "2",
        "--integration-slots",
        "2",
    ];
    let mut cmd = Server::command(&repo, &args);
    cmd.env("PIPELINE_FAILPOINT", "after-base-update");
    let mut server = Server::spawn(&mut cmd).expect("server");
    let addr = server.addr.clone();
    let _r = runner_with_slots(&repo, &server, 4);
    let ids = ["p1", "p2", "q1", "q2"];
    add_waiting(&server, &ids, "wait");
    verify_then_land_together(&repo, &server, &ids);
    let status = server.proc.wait_exit();
    assert!(
        !status.success(),
        "aborted right after the first swap: {status:?}"
    );
    assert_eq!(repo.landed(), ["p2", "p1"], "only the first train's swap");
    let mut restart = args.to_vec();
    restart.extend(["--listen", &addr]);
    let server = Server::start(&repo, &restart);
    for id in ids {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
        assert_eq!(dev_runs(&t), 1, "{t}");
    }
    for id in ["p1", "p2"] {
        let runs = integrate_runs(&server.show(id));
        assert!(
            runs.last()
                .and_then(|r| r["error"].as_str())
                .is_some_and(|e| e.contains("before a restart; recorded after it")),
            "{runs:?}"
        );
    }
    assert_eq!(
        repo.landed(),
        ["q2", "q1", "p2", "p1"],
        "each once, in order"
    );
}

/// The depth of speculation adapts (`--integration-slots 3`: at most three trains at once): it
/// starts at two, a red train halves it, each green train adds one up to the ceiling. `status`
/// shows the depth in use and the ceiling; each change is a `depth` entry of the feed.
#[test]
fn the_depth_of_speculation_shrinks_after_a_red_train_and_grows_after_green_ones() {
    let repo = TestRepo::new();
    let build = breaks_until_fixed("d2");
    // No back-off for d2 after its red train (10 s doubled by default): its next attempt
    // starts at once.
    let server = speculating_server(&repo, &build, "3", &["--backoff-base", "0"]);
    let watch = server.feed();
    let _r = runner_with_slots(&repo, &server, 2);
    let depth = || {
        let status = server.ctl(&["status", "--json"]).json();
        (
            status["integration_depth"].clone(),
            status["integration_slots"].clone(),
        )
    };
    let start = wait_for("the integrator's depth in status", || {
        Some(depth()).filter(|(d, _)| !d.is_null())
    });
    assert_eq!(start, (2.into(), 3.into()), "it starts at two");
    // A red train (d1 lands, d2 is its culprit): the depth halves to one.
    add_waiting(&server, &["d1", "d2"], "wait-once");
    verify_then_land_together(&repo, &server, &["d1", "d2"]);
    let red = watch.wait("the depth after the red train", |e| e["kind"] == "depth");
    assert_eq!(
        (&red["topic"], &red["data"]["depth"], &red["data"]["green"]),
        (&Value::from("train"), &Value::from(1), &Value::from(false)),
        "{red}"
    );
    // d2, fixed on its next attempt, lands alone: green, two.
    let d2 = server.wait_status("d2", "done");
    assert_eq!(d2["failures"], 1, "{d2}");
    // Two more land together: green, three (the ceiling).
    add_waiting(&server, &["e1", "e2"], "wait");
    verify_then_land_together(&repo, &server, &["e1", "e2"]);
    for id in ["e1", "e2"] {
        server.wait_status(id, "done");
    }
    watch.wait("the depth at the ceiling", |e| {
        e["kind"] == "depth" && e["data"]["depth"] == 3
    });
    let depths: Vec<(i64, bool)> = watch
        .entries()
        .iter()
        .filter(|e| e["kind"] == "depth")
        .map(|e| {
            (
                e["data"]["depth"].as_i64().expect("a depth"),
                e["data"]["green"].as_bool().expect("green or not"),
            )
        })
        .collect();
    assert_eq!(depths, [(1, false), (2, true), (3, true)], "{depths:?}");
    assert_eq!(depth(), (3.into(), 3.into()));
    assert_eq!(
        red_on_base(&repo, "d2"),
        None,
        "never a red tree on the base"
    );
    assert_eq!(repo.landed().len(), 4, "each once: {:?}", repo.landed());
}
