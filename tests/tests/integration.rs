//! Integration end to end: verified commits land on the base by cherry-pick and compare-and-swap,
//! exactly once, never red, never before their dependencies, never losing a person's push, and
//! surviving SIGKILL of the server at any point.
//!
//! Log lines checked on purpose (each the feature, read once the server has exited): the
//! server's last word when its dispatch loop panics, and the failpoint line that says where a
//! crash test aborted it (the only sign of which point of the integration it died at).

use pipeline_tests::{Server, TestRepo, git, main_tip, runner, runs, wait_for};
use serde_json::Value;

fn integrate_runs(task: &Value) -> Vec<Value> {
    runs(task)
        .into_iter()
        .filter(|r| r["phase"] == "integrate")
        .collect()
}

/// The commit on `main` carrying `Task-Id: id`.
fn landed_commit(repo: &TestRepo, id: &str) -> String {
    let log = git(
        &repo.repo(),
        &[
            "log",
            "--format=%H %(trailers:key=Task-Id,valueonly)",
            "main",
        ],
    );
    let found: Vec<&str> = log
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(id))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(found.len(), 1, "{id} landed once: {log}");
    found[0].to_owned()
}

/// A build command that waits for `$AGENT_LOG_DIR/<file>`.
fn slow_build(file: &str) -> String {
    // Slow in the server's integration worktree only: the runners run the same command.
    format!(
        "case $PWD in */integration) while [ ! -e \"$AGENT_LOG_DIR/{file}\" ]; do sleep 0.05; \
         done;; esac"
    )
}

#[test]
fn a_verified_task_lands_once_with_its_trailer_and_author() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = runner(&repo, &server, "r");
    let before = main_tip(&repo);
    let id = server.add(&["--title", "no trailer", "--description", "MODE: notrailer"]);
    let task = server.wait_status(&id, "done");
    let landed = landed_commit(&repo, &id);
    assert_eq!(main_tip(&repo), landed);
    assert_eq!(
        git(&repo.repo(), &["rev-parse", &format!("{landed}^")]),
        before
    );
    let message = git(&repo.repo(), &["log", "-1", "--format=%B", &landed]);
    assert!(
        message.starts_with(&format!("notes for {id}, no trailer")),
        "{message}"
    );
    assert!(
        message.contains(&format!("Task-Id: {id}")),
        "trailer added: {message}"
    );
    assert_eq!(
        git(&repo.repo(), &["log", "-1", "--format=%an <%ae>", &landed]),
        "agent <agent@example.invalid>",
        "the agent stays the author"
    );
    let runs = integrate_runs(&task);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["status"], "success");
    assert_eq!(runs[0]["runner"], Value::Null);
    assert_eq!(runs[0]["error"], "build skipped: the task has no namespace");
}

#[test]
fn two_tasks_editing_the_same_line_both_land_the_second_redeveloped() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let _a = runner(&repo, &server, "runner-a");
    let _b = runner(&repo, &server, "runner-b");
    let first = server.add(&["--title", "first", "--description", "MODE: sameline"]);
    let second = server.add(&["--title", "second", "--description", "MODE: sameline"]);
    // Both are developed on the same base before either lands.
    repo.wait_agent(&first);
    repo.wait_agent(&second);
    repo.release_task(&first);
    server.wait_status(&first, "done");
    repo.release_task(&second);
    let task = server.wait_status(&second, "done");
    assert_eq!(task["failures"], 1, "the conflict counted");
    let failed = integrate_runs(&task)
        .into_iter()
        .find(|r| r["status"] == "failure")
        .expect("a failed integration");
    let error = failed["error"].as_str().expect("error");
    assert!(error.contains("cherry-pick conflict"), "{error}");
    assert!(error.contains("CONFLICT"), "git's message: {error}");
    let prompt = repo
        .agent_file(&format!("dev-{second}-2.prompt"))
        .expect("second prompt");
    assert!(prompt.contains("CONFLICT"), "{prompt}");
    let env = repo
        .agent_file(&format!("dev-{second}-2.env"))
        .expect("env");
    let landed_first = landed_commit(&repo, &first);
    assert!(
        env.contains(&format!("PIPELINE_BASE_COMMIT={landed_first}")),
        "redeveloped on the new base: {env}"
    );
    let landed_second = landed_commit(&repo, &second);
    assert_eq!(main_tip(&repo), landed_second);
    assert_eq!(
        git(&repo.repo(), &["show", "main:shared.txt"]),
        format!("{second} attempt 2")
    );
}

#[test]
fn a_commit_that_fails_the_servers_build_never_reaches_the_base() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--max-retries",
            "1",
            "--build-cmd",
            // The runner runs the server's verification too, so it passes there: the task's
            // change breaks the build only together with what a person pushed meanwhile (a
            // semantic conflict the runner could not see); the base alone builds green.
            "if ls notes/*.md >/dev/null 2>&1 && [ -e person.txt ]; then \
             echo the server build broke >&2; exit 1; fi",
        ],
    );
    let _r = runner(&repo, &server, "r");
    let id = server.add(&[
        "--title",
        "green on the runner only",
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent(&id);
    let before = repo.push_to_main("person.txt", "a person's change");
    repo.release_agents();
    let task = server.wait_status(&id, "needs_help");
    assert_eq!(main_tip(&repo), before, "the base did not move");
    let runs = integrate_runs(&task);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["status"], "failure");
    let error = runs[0]["error"].as_str().expect("error");
    assert!(error.contains("the build of the commit on main"), "{error}");
    assert!(
        error.contains("the server build broke"),
        "the output's tail: {error}"
    );
    assert!(repo.landed().is_empty());
}

#[test]
fn a_concurrent_push_to_the_base_by_a_person_is_kept() {
    let repo = TestRepo::new();
    let build = slow_build("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    // The base moves before integration, so the server must build ...
    let p1 = repo.push_to_main("person1.txt", "one");
    repo.release_agents();
    server.wait_train_building();
    // ... and moves again while it builds: the server redoes it on the new tip.
    let p2 = repo.push_to_main("person2.txt", "two");
    repo.touch("build-go");
    server.wait_status(&id, "done");
    let landed = landed_commit(&repo, &id);
    assert_eq!(main_tip(&repo), landed);
    assert_eq!(git(&repo.repo(), &["rev-parse", &format!("{landed}^")]), p2);
    for person in [&p1, &p2] {
        assert!(
            git(&repo.repo(), &["branch", "--contains", person, "main"]).contains("main"),
            "{person} kept"
        );
    }
}

#[test]
fn a_task_never_lands_before_the_tasks_it_depends_on() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _a = runner(&repo, &server, "runner-a");
    let _b = runner(&repo, &server, "runner-b");
    let dep = server.add(&["--title", "dependency", "--description", "MODE: wait"]);
    let later = server.add(&["--title", "dependent", "--description", "MODE: wait"]);
    repo.wait_agent(&dep);
    repo.wait_agent(&later);
    // The dependency is added while both are in progress.
    server.ctl(&["task", "depend", &later, "--on", &dep]).ok();
    repo.release_task(&later);
    server.wait_status(&later, "verified");
    // A task without dependencies, verified after it, lands past it: the integrator saw it
    // and held it back.
    let free = server.add(&["--title", "independent"]);
    server.wait_status(&free, "done");
    let held = server.show(&later);
    assert_eq!(held["status"], "verified", "held back: {held}");
    assert!(
        held["waiting_for"]
            .to_string()
            .contains(&format!("depends on {dep}")),
        "{held}"
    );
    assert_eq!(repo.landed(), [free]);
    repo.release_task(&dep);
    server.wait_status(&later, "done");
    let (d, l) = (landed_commit(&repo, &dep), landed_commit(&repo, &later));
    assert_eq!(
        git(&repo.repo(), &["rev-parse", &format!("{l}^")]),
        d,
        "in order"
    );
}

#[test]
fn sigkill_of_the_server_during_a_dev_run_then_restart() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "10"]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    server.kill();
    let server = Server::start(&repo, &["--lease-ttl", "10", "--listen", &addr]);
    repo.release_agents();
    server.wait_status(&id, "done");
    assert_eq!(repo.landed(), [id]);
}

#[test]
fn sigkill_of_the_server_during_an_integration_build_then_restart() {
    let repo = TestRepo::new();
    let build = slow_build("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    // The base moves while the agent works, so the runner's pass is not a build of the tree
    // the server lands: the server builds.
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    repo.push_to_main("person.txt", "a person's change");
    repo.release_agents();
    server.wait_train_building();
    server.kill();
    repo.touch("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build, "--listen", &addr]);
    server.wait_status(&id, "done");
    assert_eq!(repo.landed(), [id]);
}

/// SIGTERM while the integrator builds stops the build and the server (it used to form the
/// train again at once, build-cancelled, for ever, and never exit); the train is formed again
/// after the restart.
#[test]
fn sigterm_during_an_integration_build_stops_the_server_and_the_restart_lands_it() {
    let repo = TestRepo::new();
    let build = slow_build("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    // The base moves while the agent works, so the server builds (see above).
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    repo.push_to_main("person.txt", "a person's change");
    repo.release_agents();
    wait_for("the train's build", || {
        let queue = server.ctl(&["queue", "--json"]).json();
        queue["train"]["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("building"))
            .then_some(())
    });
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    repo.touch("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build, "--listen", &addr]);
    server.wait_status(&id, "done");
    assert_eq!(repo.landed(), [id]);
}

#[test]
fn a_task_cancelled_while_its_integration_builds_never_lands() {
    let repo = TestRepo::new();
    let build = slow_build("build-go");
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let _r = runner(&repo, &server, "r");
    let id = server.add(&[
        "--title",
        "cancelled mid-build",
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent(&id);
    // The base moves, so the server builds (see above).
    let before = repo.push_to_main("person.txt", "a person's change");
    repo.release_agents();
    server.wait_train_building();
    server.ctl(&["task", "cancel", &id]).ok();
    repo.touch("build-go");
    // The train ends without it.
    server.wait_queue("the train to end", |q| q["train"].is_null());
    assert_eq!(server.show(&id)["status"], "cancelled");
    assert_eq!(main_tip(&repo), before, "the base did not move");
    assert!(repo.landed().is_empty());
}

/// A background loop that dies does not leave a server that answers but does nothing: the
/// server says which loop ended and exits non-zero, so a supervisor restarts it.
#[test]
fn a_server_whose_dispatch_loop_panics_stops_with_an_error() {
    let repo = TestRepo::new();
    let mut cmd = Server::command(&repo, &[]);
    // (No backtrace: resolving one in a debug build takes seconds.)
    cmd.env("PIPELINE_FAILPOINT", "panic-dispatch")
        .env("RUST_BACKTRACE", "0");
    let mut server = Server::spawn(&mut cmd).expect("server");
    let (status, log) = server.proc.wait_exit_log();
    assert!(!status.success(), "exits non-zero: {status:?}");
    assert!(
        log.contains("the dispatch loop panicked; stopping the server"),
        "{log}"
    );
    // Nothing was lost: the next server (without the fault) serves the same state.
    let server = Server::start(&repo, &[]);
    assert_eq!(server.ctl(&["status", "--json"]).json()["open"], 0);
}

/// Kills the server (abort) at a failpoint of the integration, restarts it, and checks the task
/// ends Done with its commit on the base once.
fn crash_at(failpoint: &str) -> Value {
    let repo = TestRepo::new();
    let mut cmd = Server::command(&repo, &[]);
    cmd.env("PIPELINE_FAILPOINT", failpoint);
    let mut server = Server::spawn(&mut cmd).expect("server");
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t"]);
    let (status, log) = server.proc.wait_exit_log();
    assert!(!status.success(), "aborted at the failpoint: {status:?}");
    assert!(log.contains(&format!("failpoint {failpoint}")), "{log}");
    let server = Server::start(&repo, &["--listen", &addr]);
    let task = server.wait_status(&id, "done");
    assert_eq!(repo.landed(), std::slice::from_ref(&id), "exactly once");
    task
}

#[test]
fn a_crash_after_moving_the_base_is_finished_on_restart() {
    let task = crash_at("after-base-update");
    let runs = integrate_runs(&task);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0]["status"], "failure");
    assert_eq!(runs[0]["error"], "interrupted by a restart of the server");
    assert_eq!(runs[1]["status"], "success");
    assert!(
        runs[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("before a restart; recorded after it")),
        "{runs:?}"
    );
}

#[test]
fn a_crash_before_moving_the_base_is_undone_and_redone() {
    let task = crash_at("before-base-update");
    let runs = integrate_runs(&task);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0]["error"], "interrupted by a restart of the server");
    assert_eq!(runs[1]["status"], "success", "redone after the restart");
    assert_eq!(
        task["failures"], 0,
        "an interruption is not the task's failure"
    );
}

#[test]
fn a_checked_out_base_is_refused_and_a_bare_repo_works() {
    let repo = TestRepo::new();
    git(&repo.repo(), &["checkout", "-q", "main"]);
    let log = Server::spawn(&mut Server::command(&repo, &[]))
        .err()
        .expect("refused");
    assert!(
        log.contains("the base branch main is checked out in") && log.contains("use a bare clone"),
        "{log}"
    );
    // A bare clone is fine.
    let bare = repo.dir.path().join("bare.git");
    git(
        repo.dir.path(),
        &[
            "clone",
            "-q",
            "--bare",
            repo.repo().to_str().expect("utf-8"),
            "bare.git",
        ],
    );
    let mut cmd = repo.command("pipeline-server");
    cmd.arg("--repo")
        .arg(&bare)
        .arg("--state-dir")
        .arg(repo.state_dir())
        .args(["--listen", "127.0.0.1:0"])
        .env("AGENT_LOG_DIR", repo.agent_log())
        .envs(pipeline_tests::sandbox_env(&repo));
    let server = Server::spawn(&mut cmd).expect("a bare repo is accepted");
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "into a bare repo"]);
    server.wait_status(&id, "done");
    let log = git(
        &bare,
        &["log", "--format=%(trailers:key=Task-Id,valueonly)", "main"],
    );
    assert_eq!(log.lines().filter(|l| l.trim() == id).count(), 1, "{log}");
}

#[test]
fn push_remote_keeps_the_remote_in_step_and_retries_a_rejected_push() {
    let repo = TestRepo::new();
    let origin = repo.dir.path().join("origin.git");
    git(
        repo.dir.path(),
        &[
            "clone",
            "-q",
            "--bare",
            repo.repo().to_str().expect("utf-8"),
            "origin.git",
        ],
    );
    git(
        &repo.repo(),
        &["remote", "add", "origin", origin.to_str().expect("utf-8")],
    );
    let build = slow_build("build-go");
    let server = Server::start(&repo, &["--push-remote", "origin", "--build-cmd", &build]);
    let _r = runner(&repo, &server, "r");
    let person = repo.dir.path().join("person");

    // A person's push to the remote before integration is followed, and kept.
    let id = server.add(&["--title", "one", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    let p1 = pipeline_tests::push_commit(&origin, &person, "p1.txt", "one");
    repo.release_agents();
    server.wait_train_building();
    // Another push while the server builds: its own push is rejected, then redone on top.
    let p2 = pipeline_tests::push_commit(&origin, &person, "p2.txt", "two");
    repo.touch("build-go");
    server.wait_status(&id, "done");
    let remote_tip = wait_for("local and remote to agree", || {
        let remote_tip = git(&origin, &["rev-parse", "main"]);
        (remote_tip == main_tip(&repo)).then_some(remote_tip)
    });
    assert_eq!(git(&origin, &["rev-parse", &format!("{remote_tip}^")]), p2);
    let trailers = git(
        &origin,
        &["log", "--format=%(trailers:key=Task-Id,valueonly)", "main"],
    );
    assert_eq!(trailers.lines().filter(|l| l.trim() == id).count(), 1);
    for p in [&p1, &p2] {
        assert!(git(&origin, &["branch", "--contains", p]).contains("main"));
    }
}

#[test]
fn push_remote_must_name_a_remote() {
    let repo = TestRepo::new();
    let log = Server::spawn(&mut Server::command(&repo, &["--push-remote", "nowhere"]))
        .err()
        .expect("refused");
    assert!(
        log.contains("--push-remote nowhere: the repository has no such remote"),
        "{log}"
    );
}
