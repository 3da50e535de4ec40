//! Train builds on runners (`--remote-builds`), end to end with real runners: a train built on
//! a runner with the build label lands while the coordinator builds nothing; a build job whose
//! runner is SIGKILLed mid-build is built again on another runner, nobody charged; a runner
//! that answers a build job it lost is refused; with no runner able to build, the server
//! builds itself.
//!
//! The verification below records every train build (a runner's build worktree,
//! `<work dir>/builds/<n>`, or the server's integration worktree) in `$AGENT_LOG_DIR/builds`,
//! by its directory, and holds it while `$AGENT_LOG_DIR/hold-builds` exists until
//! `$AGENT_LOG_DIR/release-build` does. A runner's verification of its own task (in its slot's
//! worktree) records nothing.

use pipeline_proto::v1 as pb;
use pipeline_tests::web::{Browser, browser_missing, get, http_url, viewer_token};
use pipeline_tests::{Runner, Server, TestRepo, agent_args, as_strs, fake_runner, wait_for};

const BUILD_CMD: &str = "case $PWD in */builds/*|*/integration|*/integration-[0-9]*) \
     echo \"$PWD\" >> \"$AGENT_LOG_DIR/builds\"; \
     if [ -e \"$AGENT_LOG_DIR/hold-builds\" ]; then i=0; \
     while [ ! -e \"$AGENT_LOG_DIR/release-build\" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; \
     fi;; esac";

/// The train builds so far (their directories), oldest first.
fn builds(repo: &TestRepo) -> Vec<String> {
    repo.agent_lines("builds")
}

/// The runner a build ran on (`…/runners/<name>/builds/<n>`), or `None` for the server's.
fn built_on(dir: &str) -> Option<String> {
    let (before, _) = dir.rsplit_once("/builds/")?;
    before.rsplit('/').next().map(str::to_owned)
}

/// A server with remote builds: every train built (`--verify-on-server always`), plus `extra`.
fn server(repo: &TestRepo, extra: &[&str]) -> Server {
    let mut args = vec![
        "--remote-builds",
        "--verify-on-server",
        "always",
        "--build-cmd",
        BUILD_CMD,
    ];
    args.extend_from_slice(extra);
    Server::start(repo, &args)
}

fn runner(repo: &TestRepo, server: &Server, name: &str, extra: &[&str]) -> Runner {
    let args = agent_args(extra);
    Runner::start(repo, server, name, &as_strs(&args))
}

fn add(server: &Server, id: &str) {
    server.add(&["--id", id, "--title", id, "--description", "MODE: commit"]);
}

#[test]
fn trains_are_built_on_the_runners_with_the_build_label_and_land() {
    let repo = TestRepo::new();
    let server = server(&repo, &["--build-requires", "builder"]);
    let _dev = runner(&repo, &server, "dev", &["--slots", "2"]);
    let _builder = runner(&repo, &server, "b", &["--label", "builder"]);
    for id in ["a1", "a2", "a3"] {
        add(&server, id);
    }
    for id in ["a1", "a2", "a3"] {
        let task = server.wait_status(id, "done");
        assert_eq!(task["failures"], 0, "{task}");
    }
    let all = builds(&repo);
    assert!(!all.is_empty(), "built");
    for dir in &all {
        assert_eq!(built_on(dir).as_deref(), Some("b"), "only on b: {all:?}");
    }
    // The build's lines are in the log of the last task it covers (each task's says which).
    let log = ["a1", "a2", "a3"]
        .iter()
        .map(|id| server.ctl(&["logs", id]).ok())
        .collect::<String>();
    assert!(log.contains("building on runner b"), "{log}");
    assert!(log.contains("built green on runner b"), "{log}");
    // Every runner has the key, a list.
    for r in server.runners() {
        assert!(r["builds"].is_array(), "{r}");
    }
}

#[test]
fn a_build_jobs_runner_killed_mid_build_is_built_on_another_nobody_charged() {
    let repo = TestRepo::new();
    let server = server(&repo, &[]);
    let mut r1 = runner(&repo, &server, "r1", &[]);
    let mut r2 = runner(&repo, &server, "r2", &[]);
    repo.touch("hold-builds");
    add(&server, "k1");
    let first = wait_for("the train's build to start on a runner", || {
        builds(&repo).first().cloned()
    });
    let holder = built_on(&first).expect("built on a runner");
    // It shows in `runners --json` while it runs.
    server.wait_runner(&holder, "its build job listed", |r| {
        r["builds"].as_array().is_some_and(|b| b.len() == 1)
    });
    // `queue` says where the train's build runs.
    server.wait_queue("the train's step naming its runner", |q| {
        q["train"]["step"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("(on runner {holder})")))
    });
    let other = if holder == "r1" { "r2" } else { "r1" };
    if holder == "r1" {
        r1.proc.kill();
    } else {
        r2.proc.kill();
    }
    repo.touch("release-build");
    let task = server.wait_status("k1", "done");
    assert_eq!(task["failures"], 0, "nobody charged: {task}");
    let all = builds(&repo);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(built_on(&all[1]).as_deref(), Some(other), "{all:?}");
}

#[test]
fn a_late_answer_for_a_lost_build_job_is_refused_and_the_server_builds_when_no_runner_can() {
    let repo = TestRepo::new();
    let server = server(
        &repo,
        &["--build-requires", "fake", "--remote-build-wait", "1s"],
    );
    let _dev = runner(&repo, &server, "dev", &[]);
    server.ctl(&["queue", "pause", "--landing-only"]).ok();
    add(&server, "l1");
    server.wait_status("l1", "verified");
    // The fake runner has the build label; the task is done with, so its one slot takes the
    // build job when landing resumes.
    let mut fake = fake_runner(&repo, &server);
    server.ctl(&["queue", "resume"]).ok();
    let build = match fake.next_push() {
        pb::work_message::Kind::Build(b) => b,
        other => panic!("expected a build job, got {other:?}"),
    };
    let lease = build.build.clone().expect("a build ref");
    let digest = build.verification.as_ref().map(|v| v.digest.clone());
    // Cut off: the job is lost, and its late answer refused.
    fake.close();
    let refused = fake
        .complete_build(lease, pb::BuildOutcome::Green, digest)
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("no longer yours") && !refused.message().contains('\n'),
        "{refused:?}"
    );
    // No other runner may build it: the server does, and the task lands uncharged.
    let task = server.wait_status("l1", "done");
    assert_eq!(task["failures"], 0, "{task}");
    let all = builds(&repo);
    assert!(
        !all.is_empty() && all.iter().all(|d| built_on(d).is_none()),
        "built by the server: {all:?}"
    );
    let log = server.ctl(&["logs", "l1"]).ok();
    assert!(
        log.contains("refused") || log.contains("could not build"),
        "{log}"
    );
    assert!(log.contains("the server builds it"), "{log}");
}

#[test]
fn sigkill_of_the_server_during_a_runners_build_then_restart_lands_each_once() {
    let repo = TestRepo::new();
    let server = server(&repo, &[]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r", &["--slots", "2"]);
    repo.touch("hold-builds");
    add(&server, "s1");
    add(&server, "s2");
    wait_for("the train's build to start on the runner", || {
        builds(&repo).first().cloned()
    });
    server.kill();
    repo.touch("release-build");
    // Nothing of the build job is kept: the restarted server forms the train again from its
    // state and builds it as a new job, on the runner once it is back.
    let server = self::server(&repo, &["--listen", &addr]);
    for id in ["s1", "s2"] {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
    }
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ["s1", "s2"], "each once");
    let all = builds(&repo);
    assert!(
        all.len() >= 2 && all.iter().all(|d| built_on(d).as_deref() == Some("r")),
        "built again, on the runner: {all:?}"
    );
}

/// Two trains in flight at once (`--integration-slots 2`, two tasks each, builds held on the
/// runners): `queue` shows both, the one that lands next first (also as `train`), the second
/// speculative on the first's tip, each with its members and the runner building it; the text
/// output, the web page's queue view (live, in a real browser where there is one: see
/// browser.rs) and `/api/queue` show both. Then both land.
#[test]
fn queue_shows_every_train_in_flight_with_its_members_and_runner() {
    let repo = TestRepo::new();
    let server = server(
        &repo,
        &[
            "--batch-max",
            "2",
            "--integration-slots",
            "2",
            "--http",
            "127.0.0.1:0",
        ],
    );
    let _r1 = runner(&repo, &server, "r1", &["--slots", "2"]);
    let _r2 = runner(&repo, &server, "r2", &["--slots", "2"]);
    repo.touch("hold-builds");
    server.ctl(&["queue", "pause", "--landing-only"]).ok();
    let ids = ["q1", "q2", "q3", "q4"];
    for id in ids {
        add(&server, id);
    }
    for id in ids {
        server.wait_status(id, "verified");
    }
    let http = http_url(&server);
    let viewer = viewer_token(&repo);
    // The queue view open in a browser (where there is one) before the trains form: they show
    // there without a reload.
    let browser = browser_missing().is_none().then(|| {
        let browser = Browser::start();
        browser.sign_in(&http, &viewer);
        browser.goto(&format!("{http}/"));
        browser.wait_text("#live-queue", "no train yet", |t| {
            t.contains("no train is running")
        });
        browser.eval("window.loadedOnce = 'yes'; return true");
        browser
    });
    server.ctl(&["queue", "resume"]).ok();
    let building = |t: &serde_json::Value| {
        t["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("building"))
            && t["runners"].as_array().is_some_and(|r| r.len() == 1)
    };
    let q = server.wait_queue("two trains building on runners at once", |q| {
        q["trains"]
            .as_array()
            .is_some_and(|t| t.len() == 2 && t.iter().all(building))
    });
    let trains = q["trains"].as_array().expect("trains");
    assert_eq!(q["train"], trains[0], "train is the first of trains: {q}");
    let (first, second) = (&trains[0], &trains[1]);
    assert_eq!(first["speculative"], false, "{q}");
    assert_eq!(first["ahead"], serde_json::Value::Null, "{q}");
    assert_eq!(second["speculative"], true, "{q}");
    assert_eq!(second["ahead"], first["id"], "{q}");
    let members = |t: &serde_json::Value| -> Vec<String> {
        let mut m: Vec<String> = t["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect();
        m.sort();
        m
    };
    let mut all = [members(first), members(second)].concat();
    assert_eq!((members(first).len(), members(second).len()), (2, 2), "{q}");
    all.sort();
    assert_eq!(all, ids, "{q}");
    // Each names its runner in its step too, and neither task waits behind them.
    for t in trains {
        let runner = t["runners"][0].as_str().expect("a runner");
        assert!(
            t["step"]
                .as_str()
                .is_some_and(|s| s.ends_with(&format!("(on runner {runner})"))),
            "{t}"
        );
    }
    assert_eq!(q["waiting"].as_array().map(Vec::len), Some(0), "{q}");
    // The text output lists both.
    let text = server.ctl(&["queue"]).ok();
    let line = |t: &serde_json::Value| {
        text.lines()
            .find(|l| l.starts_with(&format!("train {}: ", t["id"])))
            .unwrap_or_else(|| panic!("a line for train {}: {text}", t["id"]))
            .to_owned()
    };
    assert!(!line(first).contains("speculative"), "{text}");
    assert!(
        line(second).ends_with(&format!(", speculative on train {}'s tip", first["id"])),
        "{text}"
    );
    // The web page's queue view shows both, the second as speculative; its API has the key.
    let page = get(&format!("{http}/"), &viewer).body;
    for t in trains {
        let at = page
            .find(&format!("id=\"train-{}\"", t["id"]))
            .unwrap_or_else(|| panic!("train {} on the page: {page}", t["id"]));
        let block = &page[at..];
        let block = &block[..block.find("</div>").unwrap_or(block.len())];
        for id in members(t) {
            assert!(block.contains(&format!("/tasks/{id}")), "{block}");
        }
    }
    assert!(
        page.contains(&format!("speculative on train {}&#x27;s tip", first["id"]))
            || page.contains(&format!("speculative on train {}&#39;s tip", first["id"]))
            || page.contains(&format!("speculative on train {}'s tip", first["id"])),
        "{page}"
    );
    if let Some(browser) = &browser {
        let (a, b) = (&first["id"], &second["id"]);
        browser.wait_text("#live-queue", "both trains, live", |t| {
            t.contains(&format!("train {a}"))
                && t.contains(&format!("train {b}"))
                && t.contains(&format!("speculative on train {a}'s tip"))
        });
        assert_eq!(
            browser.eval("return window.loadedOnce"),
            serde_json::json!("yes"),
            "no reload"
        );
        browser.screenshot("queue-trains");
    }
    let api = get(&format!("{http}/api/queue"), &viewer).json();
    assert_eq!(
        api["trains"]
            .as_array()
            .map(|t| t.iter().map(|t| t["id"].clone()).collect::<Vec<_>>()),
        Some(vec![first["id"].clone(), second["id"].clone()]),
        "{api}"
    );
    repo.touch("release-build");
    for id in ids {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
    }
    let q = server.wait_queue("no train in flight", |q| {
        q["trains"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(q["train"], serde_json::Value::Null, "{q}");
}

/// A train whose build no connected runner can take (`--build-requires` a label none has):
/// `queue` says what the build waits for, and that the server builds it itself after
/// `--remote-build-wait`; it said "building the train's tip" as if a build ran.
#[test]
fn queue_says_a_build_waits_for_a_runner_with_the_build_labels() {
    let repo = TestRepo::new();
    let server = server(
        &repo,
        &["--build-requires", "gpu", "--remote-build-wait", "1m"],
    );
    let _dev = runner(&repo, &server, "dev", &[]);
    add(&server, "w1");
    add(&server, "w2");
    let q = server.wait_queue("a train whose build waits for a runner", |q| {
        q["train"]["step"]
            .as_str()
            .is_some_and(|s| s.contains("waiting for a runner"))
    });
    let step = q["train"]["step"].as_str().expect("a step");
    assert!(
        step.contains(
            "(waiting for a runner with gpu (--build-requires): none connected can take it; \
             the server builds it itself after 60 s)"
        ),
        "{q}"
    );
    assert_eq!(q["train"]["runners"], serde_json::json!([]), "{q}");
    assert!(builds(&repo).is_empty(), "nothing built yet");
}

/// A build job given back by the only runner with the build label (its verifier's program is
/// missing there): nobody is charged, and `queue` says why no connected runner can take the
/// build. It said only "none connected can take it" while that runner sat connected, idle and
/// healthy, the reason in the server's log alone.
#[test]
fn queue_says_why_the_runner_with_the_build_label_could_not_build() {
    let repo = TestRepo::new();
    // The build's program is on the dev runner's PATH, not on the builder's.
    let bin = repo.dir.path().join("dev-bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let program = bin.join("only-on-dev");
    std::fs::write(&program, "#!/bin/sh\nexit 0\n").expect("write");
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let server = Server::start(
        &repo,
        &[
            "--remote-builds",
            "--verify-on-server",
            "always",
            "--build-cmd",
            "only-on-dev",
            "--build-requires",
            "builder",
            "--remote-build-wait",
            "1m",
        ],
    );
    let path = format!("{}:{}", bin.display(), pipeline_tests::scripts_path());
    let args = agent_args(&[]);
    let _dev = Runner::spawn_with_env(
        &repo,
        &server.url,
        "dev",
        &as_strs(&args),
        &[("PATH", &path)],
    );
    server.ctl(&["queue", "pause", "--landing-only"]).ok();
    add(&server, "m1");
    server.wait_status("m1", "verified");
    // The builder comes once the task is verified: its one slot takes the build job first.
    let _b = runner(&repo, &server, "b", &["--label", "builder"]);
    server.ctl(&["queue", "resume"]).ok();
    let q = server.wait_queue("the build given back by b", |q| {
        q["train"]["step"]
            .as_str()
            .is_some_and(|s| s.contains("runner b could not"))
    });
    let step = q["train"]["step"].as_str().expect("a step");
    assert!(
        step.contains("none connected can take it (runner b could not: ")
            && step.contains("only-on-dev is not on PATH"),
        "{q}"
    );
    assert!(!step.contains('\n'), "one line: {step}");
    let task = server.show("m1");
    assert_eq!(task["failures"], 0, "nobody charged: {task}");
    let b = server
        .runners()
        .into_iter()
        .find(|r| r["name"] == "b")
        .expect("b");
    assert_eq!(b["health"], "healthy", "one failure: {b}");
}
