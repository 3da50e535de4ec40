//! Early builds end to end (`pipeline-server --early-builds`, issue 29): real runners offer
//! their commits before their verification ends, the server builds the train they will ride
//! meanwhile, and the train lands on that build when the results come, with no second build.
//! A runner whose own verification fails drops its group (the others land on a build of their
//! own, nobody else is charged); SIGKILL of the server during an early build loses nothing and
//! lands nothing twice.
//!
//! The build command records each of the server's builds (`$AGENT_LOG_DIR/builds`); on a runner
//! (its dev verification) it waits for `$AGENT_LOG_DIR/verify-go`, so that the test holds the
//! runners' verifications while the server's early build runs, and fails a task's first attempt
//! when the task's description asks for it (`FAIL-VERIFY-ONCE` in its notes is not used: the
//! attempts file the scripted agent keeps says which attempt it is).
//!
//! A log line checked on purpose (the line is the feature): the server's start-up warning
//! that `--early-builds` does nothing with `--no-verify`.

use pipeline_tests::{Runner, Server, TestRepo, agent_args, as_strs, runs, wait_for};
use serde_json::Value;

/// The build: on the server, record it (and then run `then`); on a runner, wait for
/// `verify-go`, and fail when `fail_first` is the task whose first attempt this is.
fn build_cmd(then: &str, fail_first: Option<&str>) -> String {
    let fail = fail_first.map_or_else(String::new, |id| {
        format!(
            "if [ -e notes/{id}.md ] && [ \"$(cat \"$AGENT_LOG_DIR/{id}.attempts\")\" = 1 ]; then \
             echo \"{id}'s own tests fail\"; exit 1; fi; "
        )
    });
    format!(
        "case $PWD in */integration|*/integration-[0-9]*) mkdir -p \"$AGENT_LOG_DIR\"; \
         echo \"$(ls notes 2>/dev/null | tr '\\n' ' ')\" >> \"$AGENT_LOG_DIR/builds\"; {then};; \
         *) while [ ! -e \"$AGENT_LOG_DIR/verify-go\" ]; do sleep 0.05; done; {fail}true;; esac"
    )
}

/// The server's builds so far, oldest first (the notes each built).
fn builds(repo: &TestRepo) -> Vec<String> {
    repo.agent_file("builds")
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn runner(repo: &TestRepo, server: &Server, slots: u32) -> Runner {
    let slots = slots.to_string();
    let args = agent_args(&["--slots", &slots]);
    Runner::start(repo, server, "r", &as_strs(&args))
}

fn add(server: &Server, ids: &[&str]) {
    for id in ids {
        server.add(&["--id", id, "--title", id]);
    }
}

fn show(server: &Server, id: &str) -> Value {
    server.ctl(&["task", "show", id, "--json"]).json()
}

fn integrate_logs(server: &Server, id: &str) -> String {
    server.ctl(&["logs", id]).ok()
}

#[test]
fn a_train_built_early_lands_on_that_build_when_its_runners_verifications_pass() {
    let repo = TestRepo::new();
    // The server's build waits for `build-go`: the runners' results come while the early
    // build runs (a train waits for its early build no longer than the build took).
    let build = build_cmd(
        "while [ ! -e \"$AGENT_LOG_DIR/build-go\" ]; do sleep 0.05; done",
        None,
    );
    let server = Server::start(&repo, &["--early-builds", "--build-cmd", &build]);
    let _r = runner(&repo, &server, 3);
    let ids = ["e1", "e2", "e3"];
    add(&server, &ids);
    // The server builds the three while every runner's verification is held.
    wait_for("the early build of the three", || {
        builds(&repo)
            .first()
            .is_some_and(|b| ids.iter().all(|id| b.contains(&format!("{id}.md"))))
            .then_some(())
    });
    for id in ids {
        let t = show(&server, id);
        assert_eq!(t["status"], "in_progress", "{t}");
        assert!(t["offered_commit"].is_string(), "{t}");
    }
    repo.touch("verify-go");
    for id in ids {
        server.wait_status(id, "verified");
    }
    repo.touch("build-go");
    for id in ids {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
    }
    assert_eq!(
        builds(&repo).len(),
        1,
        "no second build: {:?}",
        builds(&repo)
    );
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ids, "each once");
    let logs: String = ids.iter().map(|id| integrate_logs(&server, id)).collect();
    assert!(logs.contains("built early"), "{logs}");
    let status = server.ctl(&["status", "--json"]).json();
    let per_landed = status["builds_per_landed"].as_f64().expect("a figure");
    assert!((per_landed - 1.0 / 3.0).abs() < 1e-9, "{status}");
}

#[test]
fn a_group_whose_runner_fails_its_own_verification_is_dropped_and_the_others_land() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--early-builds",
            "--backoff-base",
            "0",
            "--build-cmd",
            &build_cmd("true", Some("f2")),
        ],
    );
    let _r = runner(&repo, &server, 3);
    let ids = ["f1", "f2", "f3"];
    add(&server, &ids);
    wait_for("the early build of the three", || {
        (!builds(&repo).is_empty()).then_some(())
    });
    repo.touch("verify-go");
    for id in ids {
        server.wait_status(id, "done");
    }
    // f2 was charged for its own verification (one failure), nobody else for anything.
    assert_eq!(show(&server, "f1")["failures"], 0);
    assert_eq!(show(&server, "f3")["failures"], 0);
    let f2 = show(&server, "f2");
    assert_eq!(f2["failures"], 1, "{f2}");
    let dev = runs(&f2).iter().filter(|r| r["phase"] == "dev").count();
    assert_eq!(dev, 2, "{f2}");
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ids, "each once");
    // The three built early once, a build no train took (f2's commit did not verify): f1
    // and f3 land on another build (alone, or with f2's second attempt if it came first);
    // the base built alone (f2's failure on a base not known green) is no train's.
    let all = builds(&repo);
    let trains: Vec<&String> = all.iter().filter(|b| !b.trim().is_empty()).collect();
    let has = |b: &str, id: &str| b.contains(&format!("{id}.md"));
    assert!(
        has(trains[0], "f1") && has(trains[0], "f2") && has(trains[0], "f3"),
        "{all:?}"
    );
    assert!((2..=3).contains(&trains.len()), "{all:?}");
    let status = server.ctl(&["status", "--json"]).json();
    let per_landed = status["builds_per_landed"].as_f64().expect("a figure");
    assert!(
        (per_landed - trains.len() as f64 / 3.0).abs() < 1e-9,
        "every train build counts, the wasted early one too: {status} {all:?}"
    );
}

#[test]
fn sigkill_of_the_server_during_an_early_build_then_restart_lands_each_once() {
    let repo = TestRepo::new();
    let build = build_cmd(
        "while [ ! -e \"$AGENT_LOG_DIR/build-go\" ]; do sleep 0.05; done",
        None,
    );
    let server = Server::start(&repo, &["--early-builds", "--build-cmd", &build]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, 3);
    let ids = ["k1", "k2", "k3"];
    add(&server, &ids);
    wait_for("the early build", || {
        (!builds(&repo).is_empty()).then_some(())
    });
    server.kill();
    repo.touch("build-go");
    repo.touch("verify-go");
    let server = Server::start(
        &repo,
        &["--early-builds", "--build-cmd", &build, "--listen", &addr],
    );
    for id in ids {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
    }
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ids, "each once");
}

/// `--early-builds` with `--no-verify` (a mistake people make trying it out): trains never
/// build, so nothing would be built early; the server says so at start, in one line (it also
/// asks runners for no offers, which would travel and be checked for nothing), and tasks land
/// as without the flag.
#[test]
fn early_builds_with_verification_off_say_at_start_that_they_do_nothing() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--early-builds", "--no-verify"]);
    let log = server.log();
    assert!(
        log.contains("--early-builds does nothing with --no-verify"),
        "{log}"
    );
    let _r = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    let id = server.add(&["--title", "plain"]);
    let t = server.wait_status(&id, "done");
    assert_eq!(t["failures"], 0, "{t}");
    assert_eq!(repo.landed(), [id.as_str()], "landed once");
}
