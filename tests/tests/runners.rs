//! Runners end to end: the real `pipeline-server` and `pipeline-runner` binaries, real git, the
//! scripted agent (`tests/scripts/agent.sh`, driven by a `MODE:` line in the description) and
//! fake `bild`/`agentd` scripts.
//!
//! Log lines checked on purpose, each the runner telling its operator something nothing else
//! shows: why it stopped its agent when it could not renew its leases for a whole TTL, what a
//! base fetch carried ("fetched the base's missing objects" with its bytes, "base already in
//! the mirror": how much travels is the feature), and that an old server takes heartbeats one
//! call at a time.

use std::collections::BTreeSet;

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::runner_service_server::{RunnerService, RunnerServiceServer};
use pipeline_tests::fake_runner::FakeRunner;
use pipeline_tests::{
    Runner, Server, TestRepo, agent_args, alive, as_strs, assert_kept_its_lease, event_kinds,
    fake_runner, git, hand_made_bundle, main_tip, runs, task_ref, wait_for,
};
use serde_json::Value;
use tonic::{Request, Response, Status};

#[test]
fn happy_path_on_two_runners() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&["--no-verify"]);
    let _a = Runner::start(&repo, &server, "runner-a", &as_strs(&args));
    let _b = Runner::start(&repo, &server, "runner-b", &as_strs(&args));
    wait_for("two connected runners", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners.as_array().map(Vec::len) == Some(2)
            && runners
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["state"] != "offline")))
        .then_some(())
    });

    let ids: Vec<String> = (1..=4)
        .map(|i| server.add(&["--title", &format!("task {i}")]))
        .collect();
    let mut used = BTreeSet::new();
    for id in &ids {
        let task = server.wait_status(id, "done");
        assert_eq!(task["patchset"], 1);
        assert_eq!(task["failures"], 0);
        let runs = runs(&task);
        assert_eq!(runs.len(), 3, "dev, verify and integrate runs: {runs:?}");
        assert_eq!(runs[0]["phase"], "dev");
        assert_eq!(runs[0]["status"], "success");
        assert_eq!(runs[1]["phase"], "verify");
        assert_eq!(runs[1]["status"], "success");
        assert_eq!(runs[2]["phase"], "integrate");
        assert_eq!(runs[2]["status"], "success");
        assert_eq!(runs[2]["runner"], Value::Null, "the server's own run");
        assert_eq!(runs[0]["runner"], runs[1]["runner"]);
        assert!(runs[0]["finished_at"].is_string());
        used.insert(runs[0]["runner"].as_str().expect("runner").to_owned());
        // The runner's commit is kept under the task's ref, with the trailer.
        let commit = task_ref(&repo.repo(), id, 1);
        let message = git(&repo.repo(), &["log", "-1", "--format=%B", &commit]);
        assert!(message.contains(&format!("Task-Id: {id}")), "{message}");
        assert_eq!(
            git(&repo.repo(), &["show", &format!("{commit}:notes/{id}.md")]),
            format!("task {id} attempt 1")
        );
        assert_eq!(
            event_kinds(&task),
            ["created", "leased", "verified", "integrated"]
        );
    }
    assert_eq!(
        used,
        BTreeSet::from(["runner-a".to_owned(), "runner-b".to_owned()]),
        "both runners worked"
    );
    // Every task's commit is on the base exactly once.
    let landed = git(
        &repo.repo(),
        &["log", "--format=%(trailers:key=Task-Id,valueonly)", "main"],
    );
    for id in &ids {
        assert_eq!(
            landed.lines().filter(|l| l.trim() == id).count(),
            1,
            "{landed}"
        );
    }

    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["done"], 4);
    assert_eq!(status["runners"], 2);
    assert_eq!(status["active_dev_runs"], 0);
    let runners = server.ctl(&["runners", "--json"]).json();
    for r in runners.as_array().expect("array") {
        assert_eq!(r["state"], "idle");
        assert_eq!(r["slots_used"], 0);
        assert_eq!(r["slots_total"], 1);
        assert!(r["last_heartbeat"].is_string());
    }
    let table = server.ctl(&["runners"]).ok();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("runner-a") && table.contains("0/1"),
        "{table}"
    );
}

#[test]
fn verify_fails_then_passes_with_the_feedback_in_the_second_prompt() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let args = agent_args(&[]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let base = main_tip(&repo);
    let id = server.add(&["--title", "needs a fix", "--namespace", "needs-fix"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["patchset"], 2, "two commits accepted");
    assert_eq!(task["failures"], 1);
    let runs = runs(&task);
    let shape: Vec<(&str, &str)> = runs
        .iter()
        .map(|r| {
            (
                r["phase"].as_str().unwrap_or_default(),
                r["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("dev", "success"),
            ("verify", "failure"),
            // The server built the base alone: green, so the failure was the task's.
            ("verify", "failure"),
            ("dev", "success"),
            ("verify", "success"),
            ("integrate", "success")
        ]
    );
    assert_eq!(
        runs[2]["runner"],
        Value::Null,
        "the server's: {:?}",
        runs[2]
    );
    assert_eq!(runs[2]["failure_kind"], "task", "charged: {:?}", runs[2]);
    assert!(
        runs[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("builds green") && e.contains("missing fix")),
        "{:?}",
        runs[2]
    );
    assert_eq!(
        runs[5]["error"],
        "build skipped: the tree is the one the runner verified (the base did not move)"
    );
    let error = runs[1]["error"].as_str().expect("verify error");
    assert!(
        error.contains("build failed for needs-fix (exit 1)"),
        "{error}"
    );
    assert!(error.contains("missing fix"), "the output's tail: {error}");

    let first = repo
        .agent_file(&format!("dev-{id}-1.prompt"))
        .expect("prompt 1");
    assert!(!first.contains("rejected"), "{first}");
    let second = repo
        .agent_file(&format!("dev-{id}-2.prompt"))
        .expect("prompt 2");
    assert!(
        second.contains("## The previous patchset was rejected"),
        "{second}"
    );
    assert!(second.contains("missing fix"), "{second}");
    assert!(second.contains("git commit --amend"), "{second}");
    let env = repo.agent_file(&format!("dev-{id}-2.env")).expect("env 2");
    assert!(env.contains("PIPELINE_PATCHSET=1"), "{env}");

    // The agent amended: still one commit on the base, now with the fix.
    let commit = task_ref(&repo.repo(), &id, 2);
    assert_eq!(
        git(&repo.repo(), &["rev-parse", &format!("{commit}^")]),
        base
    );
    let notes = git(&repo.repo(), &["show", &format!("{commit}:notes/{id}.md")]);
    assert!(notes.contains("fixed"), "{notes}");
}

#[test]
fn a_dev_failure_is_retried_after_the_back_off() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "1"]);
    let args = agent_args(&["--no-verify"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "flaky", "--description", "MODE: fail-once"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 1);
    let runs = runs(&task);
    assert_eq!(runs[0]["phase"], "dev");
    assert_eq!(runs[0]["status"], "failure");
    let error = runs[0]["error"].as_str().expect("error");
    assert!(error.contains("the agent failed (exit 1)"), "{error}");
    assert!(
        error.contains("first attempt fails"),
        "output tail: {error}"
    );
    assert_eq!(runs[1]["phase"], "dev");
    assert_eq!(runs[1]["status"], "success");
    assert_eq!(runs[1]["attempt"], 2);
    let failed = task["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "dev_failed"))
        .expect("dev_failed event");
    let message = failed["message"].as_str().expect("message");
    assert!(message.contains("retrying after 2 s"), "1 * 2^1: {message}");
    // The second attempt waited out the back-off.
    let first_end = runs[0]["finished_at"].as_str().expect("finished");
    let second_start = runs[1]["started_at"].as_str().expect("started");
    let secs = |t: &str| -> f64 {
        let (_, time) = t.split_once('T').expect("time");
        let parts: Vec<f64> = time
            .trim_end_matches('Z')
            .split(':')
            .map(|p| p.parse().expect("number"))
            .collect();
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    };
    assert!(
        secs(second_start) - secs(first_end) >= 1.99,
        "{first_end} -> {second_start}"
    );
    let second_prompt = repo
        .agent_file(&format!("dev-{id}-2.prompt"))
        .expect("prompt");
    assert!(
        second_prompt.contains("## The previous attempt failed"),
        "{second_prompt}"
    );
}

#[test]
fn needs_help_after_the_retry_limit_and_retry_clears_it() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "2", "--backoff-base", "0"]);
    let args = agent_args(&["--no-verify"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "hopeless", "--description", "MODE: fail"]);
    let task = server.wait_status(&id, "needs_help");
    assert_eq!(task["failures"], 2);
    let first = runs(&task);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|r| r["status"] == "failure"));
    let last = task["events"]
        .as_array()
        .and_then(|e| e.last())
        .expect("event");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs help after 2 failed attempts (limit 2)")),
        "{last}"
    );
    // A retry clears the count: two more attempts, then needs help again.
    server.ctl(&["task", "retry", &id]).ok();
    let task = server.wait_task(&id, "needs help again", |t| {
        t["status"] == "needs_help" && runs(t).len() == 4
    });
    assert_eq!(task["failures"], 2);
}

#[test]
fn an_agent_that_makes_no_commit_or_two_commits_fails_with_what_was_found() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1"]);
    let args = agent_args(&["--no-verify"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let none = server.add(&["--title", "lazy", "--description", "MODE: nocommit"]);
    let two = server.add(&["--title", "chatty", "--description", "MODE: twocommits"]);
    let task = server.wait_status(&none, "needs_help");
    let error = runs(&task)[0]["error"].as_str().expect("error").to_owned();
    assert!(
        error.contains("the agent made no commit on top of the base"),
        "{error}"
    );
    let task = server.wait_status(&two, "needs_help");
    let error = runs(&task)[0]["error"].as_str().expect("error").to_owned();
    assert!(
        error.contains("the agent made 2 commits on top of the base; there must be exactly one"),
        "{error}"
    );
    assert_eq!(task["patchset"], 0, "nothing was accepted");
}

#[test]
fn a_runner_killed_mid_task_loses_its_lease_to_another_runner() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "2", "--backoff-base", "0"]);
    let args = agent_args(&["--no-verify"]);
    let mut a = Runner::start(&repo, &server, "runner-a", &as_strs(&args));
    let id = server.add(&["--title", "slow first", "--description", "MODE: wait-once"]);
    repo.wait_agent(&id);
    let _b = Runner::start(&repo, &server, "runner-b", &as_strs(&args));
    a.proc.kill();
    let task = server.wait_status(&id, "done");
    let runs = runs(&task);
    assert_eq!(runs[0]["runner"], "runner-a");
    assert_eq!(runs[0]["status"], "failure");
    let error = runs[0]["error"].as_str().expect("error");
    assert!(
        error.contains("lease lost: runner runner-a sent no heartbeat for 2 s"),
        "{error}"
    );
    // A runner that dies is the infrastructure's failure, not the task's: recorded, not
    // counted (the contract counted it until the second round; see the README).
    assert_eq!(runs[0]["failure_kind"], "infrastructure");
    assert_eq!(runs[1]["runner"], "runner-b");
    assert_eq!(runs[1]["status"], "success");
    assert_eq!(
        task["failures"], 0,
        "a lapsed lease is not the task's failure"
    );
    assert!(event_kinds(&task).contains(&"lease_lost".to_owned()));
    let runners = server.ctl(&["runners", "--json"]).json();
    let a_state = runners
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "runner-a"))
        .map(|r| r["state"].clone());
    assert_eq!(a_state, Some("offline".into()));
    repo.release_agents();
}

#[test]
fn a_lease_outlives_its_ttl_while_the_runner_heartbeats() {
    let repo = TestRepo::new();
    // A 2 s TTL: the runner heartbeats every 2/3 s on its heartbeat stream.
    let server = Server::start(&repo, &["--lease-ttl", "2", "--backoff-base", "0"]);
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&[
        "--title",
        "longer than a ttl",
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent(&id);
    // Seven distinct heartbeats after the agent started span six intervals: two TTLs.
    let mut seen = BTreeSet::new();
    wait_for("seven heartbeats while the agent works", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        let beat = runners[0]["last_heartbeat"].as_str().map(str::to_owned);
        seen.extend(beat);
        (seen.len() >= 7).then_some(())
    });
    assert_eq!(server.show(&id)["status"], "in_progress");
    repo.release_agents();
    let task = server.wait_status(&id, "done");
    assert_kept_its_lease(&task);
}

#[test]
fn a_late_result_from_a_dead_lease_is_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "2", "--backoff-base", "0"]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "contested"]);
    let assignment = fake.next_assignment();
    assert_eq!(assignment.task_id, id);
    assert!(assignment.prompt.contains(&format!("- ID: {id}")));
    let lease = assignment.lease.clone().expect("lease");
    let bundle = fake
        .fetch(lease.clone())
        .expect("fetch while the lease lives");
    assert!(bundle.starts_with(b"# v2 git bundle"), "a git bundle");
    // The fake stops heartbeating; a real runner takes over after the lease lapses.
    let args = agent_args(&["--no-verify"]);
    let _b = Runner::start(&repo, &server, "runner-b", &as_strs(&args));
    match fake.next_push() {
        pb::work_message::Kind::Cancel(l) => assert_eq!(l, lease),
        other => panic!("expected a cancel of the lapsed lease, got {other:?}"),
    }
    let task = server.wait_status(&id, "done");
    // The late result, the late fetch and the late heartbeat are all refused.
    let late = fake
        .complete(
            lease.clone(),
            pb::LeaseOutcome::Verified,
            Some(assignment.base_commit.clone()),
            bundle,
        )
        .expect_err("late result");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");
    assert!(
        late.message().contains("is no longer yours"),
        "{}",
        late.message()
    );
    let late = fake.fetch(lease.clone()).expect_err("late fetch");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    let beat = fake.heartbeat(vec![lease.clone()]).expect("heartbeat");
    assert_eq!(beat.dropped, vec![lease]);
    assert_eq!(server.show(&id), task, "nothing changed");
}

#[test]
fn a_bundle_that_is_not_one_commit_on_the_base_is_refused() {
    let repo = TestRepo::new();
    // The default back-off keeps the task Open after the refusal.
    let server = Server::start(&repo, &[]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let lease = fake.next_assignment().lease.expect("lease");
    fake.heartbeat(vec![lease.clone()]).expect("heartbeat");
    let err = fake
        .complete(
            lease,
            pb::LeaseOutcome::Verified,
            Some("0".repeat(40)),
            b"not a bundle".to_vec(),
        )
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("commit refused: not a valid bundle"),
        "{}",
        err.message()
    );
    let task = server.show(&id);
    assert_eq!(task["status"], "open", "the attempt failed");
    assert_eq!(task["failures"], 1);
    assert_eq!(task["patchset"], 0);
    let error = runs(&task)[0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("commit refused: not a valid bundle"),
        "{error}"
    );
}

#[test]
fn the_protocol_version_is_checked_at_registration() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let err = FakeRunner::register(&server.url, &repo.registration_token(), "old", 99)
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("protocol version 99 but the server speaks 1"),
        "{}",
        err.message()
    );
    let err = FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "../bad",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .err()
    .expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[test]
fn cancel_stops_the_agent_group_and_cleans_the_worktree() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "endless", "--description", "MODE: wait"]);
    let pid = repo.wait_agent(&id);
    let scratch = repo.dir.path().join("runners/r/slots/0/scratch.txt");
    wait_for("the scratch file", || scratch.exists().then_some(()));
    assert!(alive(&pid));
    server.ctl(&["task", "cancel", &id]).ok();
    wait_for("the agent to be stopped", || (!alive(&pid)).then_some(()));
    wait_for("the worktree to be cleaned", || {
        (!scratch.exists()).then_some(())
    });
    let task = server.show(&id);
    assert_eq!(task["status"], "cancelled");
    assert_eq!(runs(&task)[0]["status"], "failure");
    assert_eq!(runs(&task)[0]["error"], "cancelled");
    // The runner is free again.
    let next = server.add(&["--title", "next"]);
    server.wait_status(&next, "done");
}

#[test]
fn the_server_restarting_while_a_runner_works_loses_nothing() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "10"]);
    let addr = server.addr.clone();
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "survivor", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    server.kill();
    let server = Server::start(&repo, &["--lease-ttl", "10", "--listen", &addr]);
    // The runner reconnects holding its lease, and the server keeps it.
    server.wait_runner("r", "back with its lease", |r| {
        pipeline_tests::connected(r) && r["slots_used"] == 1
    });
    repo.release_agents();
    let task = server.wait_status(&id, "done");
    let runs = runs(&task);
    assert_eq!(
        runs.len(),
        3,
        "one dev, one verify and one integrate run: {runs:?}"
    );
    assert_kept_its_lease(&task);
}

#[test]
fn agentd_mode_passes_the_limits_through() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(
        &repo,
        &server,
        "r",
        &[
            "--agent",
            "agentd",
            "--timeout",
            "77",
            "--max-iter",
            "5",
            "--max-cost",
            "42",
            "--provider",
            "test-provider",
            "--no-verify",
        ],
    );
    let id = server.add(&["--title", "via agentd"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(runs(&task)[0]["cost_cents"], 7.0, "cost from agentd status");
    assert_eq!(task["cost_cents"], 7.0);
    let args = repo
        .agent_file(&format!("agentd-dev-{id}-1.args"))
        .expect("agentd args");
    let (prompt, flags) = args.trim().split_once(' ').expect("prompt and flags");
    assert_eq!(
        flags,
        format!("-n dev-{id}-1 --timeout 77 --max-iter 5 --max-cost 42 -p test-provider")
    );
    let worktree = repo.dir.path().join("runners/r/slots/0");
    assert!(
        !std::path::Path::new(prompt).starts_with(&worktree),
        "the prompt {prompt} is outside the worktree"
    );
}

#[test]
fn the_command_agent_gets_the_contract_environment_and_its_cost_is_recorded() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--no-verify"]);
    let args = agent_args(&["--no-verify"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&[
        "--title",
        "costly",
        "--description",
        "MODE: cost",
        "--namespace",
        "Omni/X.hs",
    ]);
    let base = main_tip(&repo);
    let task = server.wait_status(&id, "done");
    assert_eq!(runs(&task)[0]["cost_cents"], 25.0);
    assert_eq!(task["cost_cents"], 25.0);
    let env = repo.agent_file(&format!("dev-{id}-1.env")).expect("env");
    for line in [
        format!("PIPELINE_TASK_ID={id}"),
        format!("PIPELINE_RUN_ID=dev-{id}-1"),
        "PIPELINE_BASE=main".to_owned(),
        format!("PIPELINE_BASE_COMMIT={base}"),
        "PIPELINE_PATCHSET=0".to_owned(),
        "PIPELINE_NAMESPACE=Omni/X.hs".to_owned(),
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    let prompt_file = env
        .lines()
        .find_map(|l| l.strip_prefix("PIPELINE_PROMPT_FILE="))
        .expect("prompt file");
    let cwd = repo.agent_file(&format!("dev-{id}-1.cwd")).expect("cwd");
    assert!(
        !prompt_file.starts_with(cwd.trim()),
        "prompt outside the worktree"
    );
    assert!(env.contains("PIPELINE_COST_FILE="));
}

#[test]
fn bild_exit_codes_0_2_and_1() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1"]);
    let args = agent_args(&[]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let ok = server.add(&["--title", "ok", "--namespace", "ok"]);
    let unbuildable = server.add(&["--title", "u", "--namespace", "unbuildable"]);
    let notests = server.add(&["--title", "n", "--namespace", "notests"]);
    let broken = server.add(&["--title", "b", "--namespace", "broken"]);
    let none = server.add(&["--title", "no namespace"]);

    let verify_run = |id: &str, status: &str| -> Value {
        let task = server.wait_status(id, status);
        runs(&task)
            .into_iter()
            .find(|r| r["phase"] == "verify")
            .expect("a verify run")
    };
    let run = verify_run(&ok, "done");
    assert_eq!(
        (run["status"].clone(), run["error"].clone()),
        ("success".into(), Value::Null)
    );
    let run = verify_run(&unbuildable, "done");
    assert_eq!(run["status"], "success");
    assert_eq!(
        run["error"],
        "skipped: unbuildable is not buildable (bild exit 2)"
    );
    let run = verify_run(&notests, "done");
    assert_eq!(
        (run["status"].clone(), run["error"].clone()),
        ("success".into(), Value::Null)
    );
    let run = verify_run(&broken, "needs_help");
    assert_eq!(run["status"], "failure");
    let error = run["error"].as_str().expect("error");
    assert!(
        error.contains("build failed for broken (exit 1)"),
        "{error}"
    );
    assert!(error.contains("error: broken does not compile"), "{error}");
    let run = verify_run(&none, "done");
    assert_eq!(run["error"], "skipped: the task has no namespace");

    let calls = repo.agent_file("bild.calls").expect("bild calls");
    for call in [
        "test=0 ok",
        "test=1 ok",
        "test=1 notests",
        "test=0 unbuildable",
    ] {
        assert!(
            calls.lines().any(|l| l == call),
            "{call} missing from:\n{calls}"
        );
    }
    assert!(
        !calls.lines().any(|l| l == "test=1 unbuildable"),
        "no tests run on an unbuildable namespace"
    );
}

#[test]
fn a_draining_runner_finishes_its_work_and_a_second_signal_gives_it_back() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&["--no-verify"]);
    let mut runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "finish me", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    runner.proc.signal("TERM");
    wait_for("the runner to drain", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners[0]["state"] == "draining").then_some(())
    });
    // A task added while draining is not given to it.
    let waiting = server.add(&["--title", "not for a draining runner"]);
    repo.release_agents();
    server.wait_status(&id, "done");
    let status = runner.proc.wait_exit();
    assert!(status.success(), "a drained runner exits 0: {status:?}");
    assert_eq!(server.show(&waiting)["status"], "open");

    // Stop: two signals give the work back at once, without counting a failure.
    std::fs::remove_file(repo.agent_log().join("release")).expect("unrelease");
    let mut runner = Runner::start(&repo, &server, "r2", &as_strs(&args));
    let id = server.add(&["--title", "give me back", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    runner.proc.signal("TERM");
    server.wait_runner("r2", "draining", |r| r["state"] == "draining");
    runner.proc.signal("TERM");
    let status = runner.proc.wait_exit();
    assert!(status.success(), "{status:?}\n{}", runner.log());
    let task = server.wait_task(&id, "given back", |t| {
        event_kinds(t).contains(&"released".to_owned())
    });
    assert_eq!(task["failures"], 0);
    assert_ne!(task["status"], "in_progress");
    repo.release_agents();
}

#[test]
fn one_command_runs_the_pipeline_with_local_runners_and_the_example_agent() {
    let repo = TestRepo::new();
    let agent = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runner/agents/example-agent.sh")
        .canonicalize()
        .expect("example agent");
    let agent = agent.to_str().expect("utf-8");
    let server = Server::start(
        &repo,
        &[
            "--local-runners",
            "2",
            "--agent",
            "command",
            "--agent-cmd",
            agent,
            "--no-verify",
        ],
    );
    wait_for("two local runners", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        let names: Vec<&str> = runners
            .as_array()?
            .iter()
            .filter(|r| r["state"] == "idle")
            .filter_map(|r| r["name"].as_str())
            .collect();
        (names == ["local-1", "local-2"]).then_some(())
    });
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            server.add(&[
                "--title",
                &format!("note {i}"),
                "--description",
                &format!("Remember thing {i}."),
            ])
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        server.wait_status(id, "done");
        let commit = task_ref(&repo.repo(), id, 1);
        let note = git(&repo.repo(), &["show", &format!("{commit}:notes/{id}.md")]);
        assert_eq!(note, format!("Remember thing {}.", i + 1));
        let message = git(&repo.repo(), &["log", "-1", "--format=%B", &commit]);
        assert!(message.contains(&format!("Task-Id: {id}")), "{message}");
    }
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_gives_a_busy_local_runners_lease_back_before_the_server_stops() {
    let repo = TestRepo::new();
    let mut flags = vec!["--local-runners".to_owned(), "1".to_owned()];
    flags.extend(agent_args(&["--no-verify"]));
    let server = Server::start(&repo, &as_strs(&flags));
    let addr = server.addr.clone();
    let id = server.add(&["--title", "busy at shutdown", "--description", "MODE: wait"]);
    let pid = repo.wait_agent(&id);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!alive(&pid), "the agent was stopped");
    // Given back, not left to lapse: the task is Open again and nothing counts against it.
    let server = Server::start(&repo, &["--listen", &addr]);
    let task = server.show(&id);
    assert_eq!(task["status"], "open", "{task}");
    assert_eq!(task["failures"], 0);
    assert!(
        event_kinds(&task).contains(&"released".to_owned()),
        "{task}"
    );
}

#[test]
fn a_runner_that_cannot_renew_its_lease_for_a_ttl_stops_its_agent() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "2", "--backoff-base", "0"]);
    let args = agent_args(&["--no-verify"]);
    let runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "cut off", "--description", "MODE: wait-once"]);
    let pid = repo.wait_agent(&id);
    // A frozen server answers nothing: the runner cannot renew and must stop by itself.
    server.proc.signal("STOP");
    wait_for("the runner to stop its agent", || {
        (!alive(&pid)).then_some(())
    });
    assert!(
        runner
            .log()
            .contains("could not renew leases for a whole TTL"),
        "{}",
        runner.log()
    );
    server.proc.signal("CONT");
    let task = server.wait_status(&id, "done");
    assert_eq!(runs(&task)[0]["status"], "failure");
    assert_eq!(runs(&task)[0]["failure_kind"], "infrastructure");
    assert_eq!(
        task["failures"], 0,
        "a frozen server is not the task's failure"
    );
}

#[test]
fn the_agent_time_limit_is_enforced() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1"]);
    let args = agent_args(&["--no-verify", "--timeout", "1"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "too slow", "--description", "MODE: wait"]);
    let task = server.wait_status(&id, "needs_help");
    let error = runs(&task)[0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.starts_with("the agent timed out after 1 s"),
        "{error}"
    );
    let pid = repo.agent_file(&format!("{id}.pid")).expect("pid");
    wait_for("the agent to be gone", || (!alive(&pid)).then_some(()));
}

#[test]
fn a_bundle_of_two_commits_is_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let a = fake.next_assignment();
    let (head, bundle) = hand_made_bundle(&repo, &a.base_commit, 2, &["refs/heads/out"]);
    let err = fake
        .complete(
            a.lease.expect("lease"),
            pb::LeaseOutcome::Verified,
            Some(head.clone()),
            bundle,
        )
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains(&format!(
            "{head} is not one commit on top of the leased base"
        )),
        "{}",
        err.message()
    );
    let task = server.show(&id);
    assert_eq!(
        (task["status"].clone(), task["patchset"].clone()),
        ("open".into(), 0.into())
    );
    let refs = git(&repo.repo(), &["for-each-ref", "refs/pipeline/tasks/"]);
    assert!(refs.is_empty(), "nothing stored: {refs}");
}

#[test]
fn a_runner_fetches_only_what_its_mirror_lacks() {
    let repo = TestRepo::new();
    // A base with a large file (incompressible, so the bundle cannot shrink it).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let big: String = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let work = repo.dir.path().join("seed");
    git(
        repo.dir.path(),
        &["clone", "-q", repo.repo().to_str().expect("utf-8"), "seed"],
    );
    std::fs::write(work.join("big.txt"), big).expect("write");
    git(&work, &["add", "big.txt"]);
    git(&work, &["commit", "-q", "-m", "big"]);
    git(&work, &["push", "-q", "origin", "HEAD:main"]);

    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let args = agent_args(&["--no-verify"]);
    let runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let fetched = |log: &str| -> Vec<usize> {
        log.lines()
            .filter(|l| l.contains("fetched the base's missing objects"))
            .filter_map(|l| {
                l.split("bytes=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let first = server.add(&["--title", "first"]);
    server.wait_status(&first, "done");
    // The base moved by one small commit: only that is sent.
    let second = server.add(&["--title", "second"]);
    server.wait_status(&second, "done");
    let sizes = fetched(&runner.log());
    assert_eq!(sizes.len(), 2, "{}", runner.log());
    assert!(
        sizes[0] > 100_000,
        "the first fetch carries the big file: {sizes:?}"
    );
    assert!(
        sizes[1] < 5_000,
        "the second only the new commit: {sizes:?}"
    );
    // A retry on an unchanged base fetches nothing.
    let third = server.add(&["--title", "third", "--description", "MODE: fail-once"]);
    server.wait_status(&third, "done");
    assert!(
        runner.log().contains("base already in the mirror"),
        "{}",
        runner.log()
    );
    // A restarted runner still knows what its mirror holds: again only the new commits.
    drop(runner);
    let runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let fourth = server.add(&["--title", "fourth"]);
    server.wait_status(&fourth, "done");
    let sizes = fetched(&runner.log());
    assert_eq!(sizes.len(), 1, "{}", runner.log());
    assert!(sizes[0] < 5_000, "after a restart: {sizes:?}");
}

#[test]
fn agents_and_builds_get_a_controlled_environment() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&[]);
    let mut cmd_runner = Runner::spawn_with_env(
        &repo,
        &server.url,
        "r",
        &as_strs(&args),
        &[("SECRET_TOKEN", "hunter2"), ("PIPELINE_TOKEN", "hunter3")],
    );
    server.wait_connected(&cmd_runner.proc, "r");
    let id = server.add(&["--title", "t", "--namespace", "ok"]);
    server.wait_status(&id, "done");
    let agent_env = repo
        .agent_file(&format!("dev-{id}-1.fullenv"))
        .expect("agent env");
    let build_env = repo.agent_file("bild.env").expect("build env");
    for env in [&agent_env, &build_env] {
        assert!(!env.contains("hunter"), "a secret leaked:\n{env}");
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
        assert!(
            env.lines().any(|l| l.starts_with("AGENT_LOG_DIR=")),
            "allowed: {env}"
        );
        assert!(env.contains(&format!("PIPELINE_TASK_ID={id}")), "{env}");
    }
    assert!(build_env.contains("PIPELINE_NAMESPACE=ok"));
    assert!(
        !agent_env.lines().any(|l| l.starts_with("RUST_LOG=")),
        "only allowed variables: {agent_env}"
    );
    cmd_runner.proc.kill();
}

#[test]
fn a_bundle_over_the_size_cap_is_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-bundle-bytes", "1000"]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let err = fake
        .complete(
            lease,
            pb::LeaseOutcome::Verified,
            Some("0".repeat(40)),
            vec![b'x'; 2000],
        )
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("over the 1000-byte limit"),
        "{}",
        err.message()
    );
    let task = server.show(&id);
    assert_eq!(task["patchset"], 0);
    assert!(
        std::fs::read_dir(repo.state_dir().join("spool"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "nothing left in the spool"
    );
}

#[test]
fn a_bundle_carrying_other_refs_is_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let a = fake.next_assignment();
    let (head, bundle) = hand_made_bundle(
        &repo,
        &a.base_commit,
        1,
        &["refs/heads/out", "refs/heads/smuggled"],
    );
    let err = fake
        .complete(
            a.lease.expect("lease"),
            pb::LeaseOutcome::Verified,
            Some(head),
            bundle,
        )
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("the bundle holds 2 refs; send exactly one"),
        "{}",
        err.message()
    );
    assert_eq!(server.show(&id)["patchset"], 0);
}

/// A server of the runner protocol from before the heartbeat stream: it answers single
/// `Heartbeat` calls (counting them) and nothing else beyond registering and the work stream.
struct OldServer {
    beats: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

type Boxed<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RunnerService for OldServer {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(pb::RegisterResponse {
            runner_id: "old-1".into(),
            heartbeat_interval_ms: 100,
            lease_ttl_ms: 30_000,
            credential: None,
            early_builds: false,
        }))
    }

    type OpenWorkStream = Boxed<pb::WorkMessage>;

    async fn open_work(
        &self,
        _: Request<pb::OpenWorkRequest>,
    ) -> Result<Response<Self::OpenWorkStream>, Status> {
        let attached = pb::WorkMessage {
            kind: Some(pb::work_message::Kind::Attached(pb::Attached::default())),
        };
        let stream = tokio_stream::StreamExt::chain(
            tokio_stream::iter([Ok(attached)]),
            tokio_stream::pending(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.beats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Response::new(pb::HeartbeatResponse::default()))
    }

    type HeartbeatsStream = Boxed<pb::HeartbeatResponse>;

    async fn heartbeats(
        &self,
        _: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatsStream>, Status> {
        Err(Status::unimplemented("not in this version"))
    }

    type FetchBuildStream = Boxed<pb::BundleChunk>;

    async fn fetch_build(
        &self,
        _: Request<pb::FetchBuildRequest>,
    ) -> Result<Response<Self::FetchBuildStream>, Status> {
        Err(Status::unimplemented("not in this version"))
    }

    async fn complete_build(
        &self,
        _: Request<pb::CompleteBuildRequest>,
    ) -> Result<Response<pb::CompleteBuildResponse>, Status> {
        Err(Status::unimplemented("not in this version"))
    }

    type FetchBaseStream = Boxed<pb::BundleChunk>;

    async fn fetch_base(
        &self,
        _: Request<pb::FetchBaseRequest>,
    ) -> Result<Response<Self::FetchBaseStream>, Status> {
        Err(Status::unimplemented("not needed here"))
    }

    async fn complete_lease(
        &self,
        _: Request<tonic::Streaming<pb::CompleteLeaseRequest>>,
    ) -> Result<Response<pb::CompleteLeaseResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }

    async fn offer_commit(
        &self,
        _: Request<tonic::Streaming<pb::OfferCommitRequest>>,
    ) -> Result<Response<pb::OfferCommitResponse>, Status> {
        Err(Status::unimplemented("not in this version"))
    }

    async fn release_lease(
        &self,
        _: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }

    async fn append_logs(
        &self,
        _: Request<pb::AppendLogsRequest>,
    ) -> Result<Response<pb::AppendLogsResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }
}

#[test]
fn a_runner_heartbeats_with_single_calls_to_a_server_without_the_heartbeat_stream() {
    let repo = TestRepo::new();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let beats = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let service = RunnerServiceServer::new(OldServer {
        beats: std::sync::Arc::clone(&beats),
    });
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // This server takes any token; the runner presents the one a real server would have made.
    std::fs::create_dir_all(repo.state_dir()).expect("mkdir");
    std::fs::write(
        repo.state_dir().join("runner-registration.token"),
        "plr_old",
    )
    .expect("token");
    let args = agent_args(&["--no-verify"]);
    let runner = Runner::spawn(&repo, &url, "old", &as_strs(&args));
    wait_for("three single heartbeat calls", || {
        (beats.load(std::sync::atomic::Ordering::Relaxed) >= 3).then_some(())
    });
    assert!(
        runner
            .log()
            .contains("the server takes heartbeats one call at a time"),
        "{}",
        runner.log()
    );
}

/// Early offers (`--early-builds`): a runner's verification held in its own worktree until
/// `$AGENT_LOG_DIR/verify-go` exists (at most a minute); the server's integration builds pass
/// at once, each noted in `$AGENT_LOG_DIR/server-builds`.
const HELD_VERIFY: &str = "case $PWD in */integration|*/integration-[0-9]*) \
     echo \"$PWD\" >> \"$AGENT_LOG_DIR/server-builds\";; *) i=0; \
     while [ ! -e \"$AGENT_LOG_DIR/verify-go\" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); \
     done;; esac";

/// The commit a task's lease offers now (`offered_commit` in `task show --json`), if any.
fn offered(task: &Value) -> Option<String> {
    task["offered_commit"].as_str().map(str::to_owned)
}

#[test]
fn a_runner_offers_its_commit_while_it_verifies_and_that_commit_lands() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--early-builds",
            "--build-cmd",
            HELD_VERIFY,
            "--test-cmd",
            "true",
        ],
    );
    let args = agent_args(&[]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "offered early"]);
    let task = server.wait_task(&id, "offered", |t| offered(t).is_some());
    let commit = offered(&task).expect("offered");
    // The server builds the train it will ride while the runner still verifies (held until
    // the test says so).
    wait_for("an early build of the offered commit", || {
        repo.agent_file("server-builds").filter(|b| !b.is_empty())
    });
    let task = server.show(&id);
    assert_eq!(task["status"], "in_progress", "{task}");
    assert_eq!(offered(&task).as_deref(), Some(commit.as_str()));
    assert_eq!(
        git(&repo.repo(), &["rev-parse", &format!("{commit}^")]),
        main_tip(&repo),
        "one commit on the leased base"
    );
    repo.touch("verify-go");
    let done = server.wait_status(&id, "done");
    assert_eq!(offered(&done), None, "the offer ended with its lease");
    assert_eq!(
        task_ref(&repo.repo(), &id, 1),
        commit,
        "the result carried the offered commit"
    );
    let landed = main_tip(&repo);
    assert_eq!(
        git(&repo.repo(), &["rev-parse", &format!("{landed}^{{tree}}")]),
        git(&repo.repo(), &["rev-parse", &format!("{commit}^{{tree}}")]),
        "what landed is the offered commit's tree"
    );
}

#[test]
fn an_offer_ends_with_its_lease_when_the_runner_is_killed() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--early-builds",
            "--lease-ttl",
            "2",
            "--build-cmd",
            HELD_VERIFY,
        ],
    );
    let args = agent_args(&[]);
    let mut r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "offered, then lost"]);
    server.wait_task(&id, "offered", |t| offered(t).is_some());
    r.proc.kill();
    let task = server.wait_task(&id, "without its offer", |t| offered(t).is_none());
    assert_ne!(task["status"], "done", "{task}");
    // The orphaned verification ends.
    repo.touch("verify-go");
}

#[test]
fn an_offer_is_taken_only_on_a_live_lease_of_the_runner_and_only_when_asked_for() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--early-builds"]);
    let mut fake = fake_runner(&repo, &server);
    assert!(fake.early_builds, "the server says it takes offers");
    let id = server.add(&["--title", "t"]);
    let a = fake.next_assignment();
    let lease = a.lease.clone().expect("lease");
    let (head, bundle) = hand_made_bundle(&repo, &a.base_commit, 2, &["refs/heads/out"]);
    // Two commits: not one on the base.
    let err = fake
        .offer(lease.clone(), &head, bundle)
        .expect_err("two commits");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("not one commit on top of the leased base"),
        "{}",
        err.message()
    );
    assert_eq!(offered(&server.show(&id)), None);
    // One commit on the base, as a runner sends it.
    let work = repo.dir.path().join("hand-made");
    git(&work, &["update-ref", "refs/heads/one", "HEAD~1"]);
    let one = git(&work, &["rev-parse", "HEAD~1"]);
    let not_base = format!("^{}", a.base_commit);
    git(
        &work,
        &[
            "bundle",
            "create",
            "-q",
            "../one.bundle",
            "refs/heads/one",
            &not_base,
        ],
    );
    let bundle = std::fs::read(repo.dir.path().join("one.bundle")).expect("bundle");
    // On another runner's lease: refused.
    let mut other = FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "other",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .expect("register");
    let err = other
        .offer(lease.clone(), &one, bundle.clone())
        .expect_err("not its lease");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(!pipeline_proto::is_offers_off(&err), "{err:?}");
    // On a stale epoch: refused.
    let stale = pb::LeaseRef {
        epoch: lease.epoch + 1,
        ..lease.clone()
    };
    let err = fake
        .offer(stale, &one, bundle.clone())
        .expect_err("stale lease");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(offered(&server.show(&id)), None);
    // Its own live lease: taken, and shown.
    fake.offer(lease.clone(), &one, bundle.clone())
        .expect("offered");
    assert_eq!(offered(&server.show(&id)).as_deref(), Some(one.as_str()));
    // The result ends the lease and its offer; an offer after it is refused.
    fake.complete(
        lease.clone(),
        pb::LeaseOutcome::Verified,
        Some(one.clone()),
        bundle.clone(),
    )
    .expect("result");
    assert_eq!(offered(&server.show(&id)), None);
    let err = fake.offer(lease, &one, bundle).expect_err("lease over");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}

#[test]
fn a_server_without_early_builds_asks_for_no_offers_and_refuses_them() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut fake = fake_runner(&repo, &server);
    assert!(!fake.early_builds);
    let id = server.add(&["--title", "t"]);
    let a = fake.next_assignment();
    let (head, bundle) = hand_made_bundle(&repo, &a.base_commit, 1, &["refs/heads/out"]);
    let err = fake
        .offer(a.lease.clone().expect("lease"), &head, bundle)
        .expect_err("no offers taken");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(pipeline_proto::is_offers_off(&err), "{err:?}");
    assert_eq!(
        err.message(),
        "this server does not take early offers (--early-builds is off)"
    );
    assert_eq!(offered(&server.show(&id)), None);
}
