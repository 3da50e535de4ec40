//! Nothing lost, nothing misattributed: a task is charged only for its own failures. A
//! missing program, a git or disk error, a lost connection are the infrastructure's, and give
//! the lease back uncharged, with the reason on the run.
//!
//! Log lines checked on purpose, each operator-facing and the only sign of what it says:
//! - a refusal's one line as a server or runner exits;
//! - the output of `pipelinectl watch` and `logs --follow` (their stdout, read through the
//!   captured stream: what a user sees, the feature), and a server's "stopped" with no error
//!   and no "still running" once a graceful stop is over;
//! - a runner's "no contact with the server": the only sign that a whole TTL went by with the
//!   server down while the runner kept its agent;
//! - "dispatch round failed": a lapsed lease the server could not record on a full disk
//!   changes nothing anyone can see (that is the point), so only the error says the round met
//!   the full disk before it is freed;
//! - "cannot spool a commit's bundle": the server says so in its log and nowhere else (the
//!   runner sends it again).

use std::process::Command;

use pipeline_tests::{
    Runner, Server, TestRepo, agent_args, as_strs, bin, runs, scripted_agent, scripts_dir, wait_for,
};
use serde_json::Value;

/// `pipeline-runner ARGS` against `url` with `path` as its PATH, run to completion.
fn runner_once(repo: &TestRepo, url: &str, path: &str, args: &[&str]) -> pipeline_tests::Output {
    pipeline_tests::run(
        repo.command("pipeline-runner")
            .args(["--server", url, "--name", "checked"])
            .args(["--token", &repo.registration_token()])
            .arg("--work-dir")
            .arg(repo.dir.path().join("runners").join("checked"))
            .args(args)
            .env("PATH", path)
            .env("RUST_LOG", "off")
            .env_remove("PIPELINE_SERVER")
            .env_remove("PIPELINE_TOKEN"),
    )
}

/// A PATH with git and sh but none of the test fakes (no `agentd`, no `bild`).
fn bare_path() -> String {
    let dir = tempfile::tempdir().expect("dir").keep();
    for tool in [
        "git", "sh", "cat", "env", "sed", "grep", "mkdir", "sort", "cp", "pwd", "head", "rm",
        "sleep", "tr",
    ] {
        if let Some(found) = which(tool) {
            let _ = std::os::unix::fs::symlink(found, dir.join(tool));
        }
    }
    dir.display().to_string()
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file())
}

#[test]
fn agent_cmd_alone_runs_the_command_not_agentd() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let cmd = format!("sh {}", scripts_dir().join("agent.sh").display());
    let _r = Runner::start(&repo, &server, "r", &["--agent-cmd", &cmd, "--no-verify"]);
    let id = server.add(&["--title", "a command agent"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0);
    assert!(
        repo.agent_file(&format!("agentd-dev-{id}-1.args"))
            .is_none(),
        "agentd was run instead of --agent-cmd"
    );
    // Naming agentd and a command at once is a contradiction, refused in one line.
    let out = runner_once(
        &repo,
        &server.url,
        &pipeline_tests::scripts_path(),
        &["--agent", "agentd", "--agent-cmd", "x"],
    );
    let line = out.stderr.lines().last().unwrap_or_default().to_owned();
    assert!(!out.status.success());
    assert!(line.contains("--agent-cmd"), "{}", out.stderr);
}

#[test]
fn a_runner_refuses_to_start_without_what_it_needs() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let path = bare_path();
    // agentd (the default agent) is not on PATH.
    let out = runner_once(&repo, &server.url, &path, &["--no-verify"]);
    assert!(!out.status.success(), "started without agentd");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.contains("agentd"), "{}", out.stderr);
    // The --agent-cmd program does not exist.
    let out = runner_once(
        &repo,
        &server.url,
        &path,
        &[
            "--agent",
            "command",
            "--agent-cmd",
            "/nonexistent/agent --fast",
            "--no-verify",
        ],
    );
    assert!(!out.status.success(), "started without its agent");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.contains("/nonexistent/agent"), "{}", out.stderr);
    // The work dir cannot be written.
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    let file = repo.dir.path().join("a-file");
    std::fs::write(&file, "").expect("write");
    let out = pipeline_tests::run(
        repo.command("pipeline-runner")
            .args(["--server", &server.url, "--name", "w"])
            .args(["--token", &repo.registration_token()])
            .arg("--work-dir")
            .arg(file.join("sub"))
            .args(["--agent", "command", "--agent-cmd", &agent, "--no-verify"])
            .env("PATH", &path)
            .env("RUST_LOG", "off"),
    );
    assert!(!out.status.success(), "started without a work dir");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.contains("work dir"), "{}", out.stderr);
    // Nothing registered.
    let runners = server.ctl(&["runners", "--json"]).json();
    assert_eq!(runners.as_array().map(Vec::len), Some(0), "{runners}");
}

#[test]
fn an_agent_that_cannot_start_is_not_charged_and_its_runner_turns_unhealthy() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    // The agent exists when the runner starts, and is gone when the work comes.
    let wrapper = repo.dir.path().join("vanishing-agent.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec sh {}\n",
            scripts_dir().join("agent.sh").display()
        ),
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cmd = wrapper.display().to_string();
    let _broken = Runner::start(
        &repo,
        &server,
        "broken",
        &[
            "--agent",
            "command",
            "--agent-cmd",
            &cmd,
            "--no-verify",
            "--max-infra-failures",
            "2",
        ],
    );
    std::fs::remove_file(&wrapper).expect("remove");
    let ids: Vec<String> = (1..=3)
        .map(|i| server.add(&["--title", &format!("t{i}")]))
        .collect();
    let runners = wait_for("the broken runner to turn unhealthy", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners[0]["health"] == "unhealthy").then_some(runners)
    });
    let reason = runners[0]["health_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("vanishing-agent.sh"), "{reason}");
    // Nothing was charged: every task is open, with no failure counted, and the runs that
    // failed say it was the infrastructure.
    let mut infra = 0;
    for id in &ids {
        let task = server.show(id);
        assert_eq!(task["failures"], 0, "{task}");
        assert_ne!(task["status"], "needs_help", "{task}");
        for run in runs(&task) {
            if run["status"] == "failure" {
                assert_eq!(run["failure_kind"], "infrastructure", "{run}");
                assert!(
                    run["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("vanishing-agent.sh")
                            && e.contains("exit 127")),
                    "{run}"
                );
                infra += 1;
            }
        }
    }
    assert!(infra > 0, "no run ended as an infrastructure failure");
    // A healthy runner does the work; the unhealthy one takes none.
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let _good = Runner::start(&repo, &server, "good", &as_strs(&args));
    for id in &ids {
        let task = server.wait_status(id, "done");
        assert_eq!(task["failures"], 0, "{task}");
        let last_dev = runs(&task)
            .into_iter()
            .rfind(|r| r["phase"] == "dev")
            .expect("dev run");
        assert_eq!(last_dev["runner"], "good");
    }
    let status = server.ctl(&["runners"]).ok();
    assert!(status.contains("unhealthy"), "{status}");
}

#[test]
fn a_runner_without_bild_starts_and_gives_back_only_the_leases_it_cannot_verify() {
    let repo = TestRepo::new();
    // The server verifies with bild (the default) and sends that to its runners.
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    // The README's command for another machine: an agent, no verification flags, no bild.
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    let path = bare_path();
    let bildless = Runner::spawn_with_env(
        &repo,
        &server.url,
        "bildless",
        &["--agent-cmd", &agent, "--max-infra-failures", "2"],
        &[("PATH", &path)],
    );
    server.wait_connected(&bildless.proc, "bildless");
    // Bild does not apply to a task without a namespace: its work is done.
    let plain = server.add(&["--title", "no namespace"]);
    let task = server.wait_status(&plain, "done");
    assert_eq!(task["failures"], 0, "{task}");
    // One with a namespace would be verified with bild: the lease goes back before its agent
    // runs, uncharged, saying why.
    let id = server.add(&["--title", "built with bild", "--namespace", "ok"]);
    let failed = wait_for("the lease to come back", || {
        let task = server.show(&id);
        runs(&task).into_iter().find(|r| r["status"] == "failure")
    });
    assert_eq!(failed["failure_kind"], "infrastructure", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("bild") && error.contains("not on PATH"),
        "{failed}"
    );
    assert!(
        repo.agent_file(&format!("{id}.attempts")).is_none(),
        "the agent ran for work its runner cannot verify"
    );
    // A runner that has bild does it; nothing was charged.
    let _with_bild = Runner::start(&repo, &server, "with-bild", &as_strs(&scripted_agent()));
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
}

#[test]
fn a_server_refuses_to_start_with_local_runners_it_cannot_run() {
    let repo = TestRepo::new();
    let path = bare_path();
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    let refused = |args: &[&str]| -> String {
        let mut cmd = Server::command(&repo, args);
        cmd.env("PATH", &path).env("RUST_LOG", "off");
        let (status, log) = pipeline_tests::Proc::spawn(&mut cmd).wait_exit_log();
        assert!(!status.success(), "the server started: {log}");
        assert_eq!(log.lines().count(), 1, "one line: {log}");
        log
    };
    // bild verification (the default) without bild on PATH.
    let line = refused(&["--local-runners", "1", "--agent-cmd", &agent]);
    assert!(
        line.contains("bild") && line.contains("--no-verify"),
        "{line}"
    );
    // An agent program that does not exist.
    let line = refused(&[
        "--local-runners",
        "1",
        "--agent-cmd",
        "/nonexistent/agent",
        "--no-verify",
    ]);
    assert!(line.contains("/nonexistent/agent"), "{line}");
    assert!(
        !repo.state_dir().join("pipeline.db").exists(),
        "a database was made for a server that did not start"
    );
    // With what they need, the local runners do the work.
    let mut cmd = Server::command(
        &repo,
        &[
            "--local-runners",
            "1",
            "--agent-cmd",
            &agent,
            "--build-cmd",
            "true",
        ],
    );
    cmd.env("PATH", &path);
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("no server:\n{log}"));
    let id = server.add(&["--title", "local work", "--namespace", "ok"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
}

#[test]
fn a_relative_agent_command_runs_from_where_the_runner_started() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let home = repo.dir.path().join("home");
    std::fs::create_dir_all(&home).expect("mkdir");
    let script = home.join("my-agent.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec sh {}\n",
            scripts_dir().join("agent.sh").display()
        ),
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = Runner::command(
        &repo,
        &server.url,
        "rel",
        &["--agent-cmd", "./my-agent.sh --fast", "--no-verify"],
    );
    cmd.current_dir(&home);
    let runner = pipeline_tests::Proc::spawn(&mut cmd);
    server.wait_connected(&runner, "rel");
    let id = server.add(&["--title", "relative agent"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
    // One that is not there is refused at start, in one line.
    let mut cmd = Runner::command(
        &repo,
        &server.url,
        "rel-missing",
        &["--agent-cmd", "./missing-agent.sh", "--no-verify"],
    );
    cmd.current_dir(&home).env("RUST_LOG", "off");
    let (status, log) = pipeline_tests::Proc::spawn(&mut cmd).wait_exit_log();
    assert!(!status.success(), "{log}");
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    assert!(
        log.contains("./missing-agent.sh") && log.contains(&home.display().to_string()),
        "{log}"
    );
}

#[test]
fn explain_names_the_unhealthy_runner_that_could_take_the_task() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    // The agent exists when the runner starts, and is gone when the work comes.
    let wrapper = repo.dir.path().join("vanishing-agent.sh");
    std::fs::write(&wrapper, "#!/bin/sh\nexit 0\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cmd = wrapper.display().to_string();
    let _broken = Runner::start(
        &repo,
        &server,
        "broken",
        &[
            "--agent-cmd",
            &cmd,
            "--no-verify",
            "--max-infra-failures",
            "1",
            "--label",
            "gpu",
        ],
    );
    std::fs::remove_file(&wrapper).expect("remove");
    let gpu = server.add(&["--title", "needs a gpu", "--requires", "gpu"]);
    let runners = wait_for("the runner to turn unhealthy", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners[0]["health"] == "unhealthy").then_some(runners)
    });
    let reason = runners[0]["health_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("vanishing-agent.sh"), "{runners}");
    let any = server.add(&["--title", "needs nothing"]);
    for id in [&gpu, &any] {
        let said = server.ctl(&["explain", id]).ok();
        assert!(
            said.contains("broken") && said.contains("unhealthy") && said.contains(reason),
            "{said}"
        );
        assert!(
            !said.contains("no connected runner has the labels"),
            "{said}"
        );
        let task = server.show(id);
        let waiting = task["waiting_for"].to_string();
        assert!(waiting.contains("broken is unhealthy"), "{task}");
    }
}

#[test]
fn a_second_server_on_the_same_state_dir_refuses_to_start() {
    let repo = TestRepo::new();
    let first = Server::start(&repo, &[]);
    let refused = |cmd: &mut Command| match Server::spawn(cmd) {
        Ok(second) => panic!("a second server started:\n{}", second.log()),
        Err(log) => log,
    };
    let log = refused(&mut Server::command(&repo, &[]));
    let line = log
        .lines()
        .find(|l| l.starts_with("pipeline-server:"))
        .unwrap_or_else(|| panic!("no one-line reason: {log}"))
        .to_owned();
    assert!(
        line.contains(&format!("pid {}", first.pid()))
            && line.contains(&format!("address {}", first.addr)),
        "{line}"
    );
    // The same SQLite file from another state dir is refused too (on PostgreSQL a second
    // server on one database stands by instead: failover.rs).
    if !repo.on_postgres() {
        let db = repo.state_dir().join("pipeline.db");
        let other = repo.dir.path().join("other-state");
        let log = refused(
            repo.command("pipeline-server")
                .arg("--repo")
                .arg(repo.repo())
                .arg("--state-dir")
                .arg(&other)
                .arg("--db")
                .arg(format!("sqlite://{}", db.display()))
                .args(["--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "info"),
        );
        assert!(log.contains("is using the database"), "{log}");
    }
    // The first one is unharmed, and once it stops another may start.
    first.ctl(&["status"]).ok();
    first.terminate();
    let again = Server::start(&repo, &[]);
    again.ctl(&["status"]).ok();
}

#[test]
fn sigterm_ends_watch_and_follow_streams_at_once() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let id = server.add(&["--title", "never starts"]);
    // Their output goes to the captured stderr, to see that they are connected.
    let ctl = |args: &str| {
        pipeline_tests::Proc::spawn(
            pipeline_tests::isolate(&mut Command::new("sh"), server.home())
                .arg("-c")
                .arg(format!(
                    "exec {} --server {} {args} 1>&2",
                    bin("pipelinectl").display(),
                    server.url
                ))
                .env_remove("PIPELINE_TOKEN"),
        )
    };
    let follow = ctl(&format!("logs {id} --follow"));
    let watch = ctl("watch");
    let other = server.add(&["--title", "a transition to see"]);
    server.ctl(&["task", "cancel", &other]).ok();
    watch.wait_for_line("cancelled").expect("watch connected");
    let log = {
        let mut server = server;
        server.proc.signal("TERM");
        // Its whole log: the last lines may still be on their way when it has exited.
        server.proc.wait_exit_log().1
    };
    assert!(log.contains("stopped"), "{log}");
    assert!(
        !log.contains("still running"),
        "the shutdown waited for read-only streams:\n{log}"
    );
    let _ = follow;
}

/// A graceful stop with work under way and clients following it logs no error: streams end,
/// requests under way finish, and only then is the database closed (a follower that
/// reconnected while the server stopped read it after it was closed: `ERROR … attempted to
/// acquire a connection on a closed pool`).
#[test]
fn a_graceful_stop_with_work_and_followers_logs_no_error() {
    let repo = TestRepo::new();
    // A local runner: the server gives its lease back before it stops serving.
    let args = pipeline_tests::agent_args(&["--no-verify", "--local-runners", "1"]);
    let server = Server::start(&repo, &as_strs(&args));
    let id = server.add(&["--title", "busy", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    // Followers of its log and watchers of every transition, each connected (it printed a
    // line) before the signal; each reconnects when its stream ends.
    let ctl = |args: &str| {
        pipeline_tests::Proc::spawn(
            pipeline_tests::isolate(&mut Command::new("sh"), server.home())
                .arg("-c")
                .arg(format!(
                    "exec {} --server {} {args} 1>&2",
                    bin("pipelinectl").display(),
                    server.url
                ))
                .env_remove("PIPELINE_TOKEN"),
        )
    };
    let clients: Vec<pipeline_tests::Proc> = (0..8)
        .map(|i| match i % 4 {
            0 => ctl("watch"),
            _ => ctl(&format!("logs {id} --follow")),
        })
        .collect();
    let other = server.add(&["--title", "a transition to see"]);
    server.ctl(&["task", "cancel", &other]).ok();
    for (i, client) in clients.iter().enumerate() {
        let seen = if i % 4 == 0 {
            "cancelled"
        } else {
            "agent: task"
        };
        client.wait_for_line(seen).expect("connected");
    }
    let mut server = server;
    server.proc.signal("TERM");
    let (status, log) = server.proc.wait_exit_log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("stopped"), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.is_empty(),
        "a graceful stop logged errors: {errors:#?}"
    );
    drop(clients);
}

#[test]
fn a_server_down_longer_than_the_ttl_keeps_the_runners_work() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "2"]);
    let addr = server.addr.clone();
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "long work", "--description", "MODE: wait"]);
    let pid = repo.wait_agent(&id);
    server.kill();
    // The runner has had no answer for a whole TTL, and keeps working.
    runner
        .proc
        .wait_for_line("no contact with the server")
        .expect("runner alive");
    assert!(
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok(),
        "the agent was stopped"
    );
    let server = Server::start(&repo, &["--lease-ttl", "2", "--listen", &addr]);
    // The runner comes back holding its lease, and the server keeps it.
    server.wait_runner("r", "back with its lease", |r| {
        pipeline_tests::connected(r) && r["slots_used"] == 1
    });
    repo.release_agents();
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
    let dev: Vec<Value> = runs(&task)
        .into_iter()
        .filter(|r| r["phase"] == "dev")
        .collect();
    assert_eq!(dev.len(), 1, "one dev run, not redone: {dev:?}");
    assert_eq!(dev[0]["status"], "success");
}

/// The files in the server's spool dir.
fn spooled(repo: &TestRepo) -> Vec<String> {
    std::fs::read_dir(repo.state_dir().join("spool"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn spooled_bundles_never_leak() {
    use pipeline_proto::v1 as pb;
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut fake = pipeline_tests::fake_runner(&repo, &server);
    server.add(&["--title", "t"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let runner_id = fake.id.clone();
    let header = || {
        pipeline_tests::fake_runner::complete_messages(
            &runner_id,
            lease.clone(),
            pb::LeaseOutcome::Verified,
            None,
            0.0,
            Some("0".repeat(40)),
            vec![b'x'; 1000],
        )
    };
    // An upload cancelled half way.
    let messages = header();
    fake.complete_then_hang_up(messages, || !spooled(&repo).is_empty());
    wait_for("the cancelled upload's file to go", || {
        spooled(&repo).is_empty().then_some(())
    });
    // An upload with a second header.
    let mut messages = header();
    messages.extend(header());
    let err = fake.complete_raw(messages).expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(spooled(&repo).is_empty(), "{:?}", spooled(&repo));
    // What a crash leaves is cleaned at start-up.
    drop(fake);
    server.kill();
    std::fs::write(repo.state_dir().join("spool").join("9-9.bundle"), "junk").expect("write");
    let _server = Server::start(&repo, &[]);
    assert!(spooled(&repo).is_empty(), "{:?}", spooled(&repo));
}

/// A `git` for the server that fails `index-pack` (storing a received commit) for want of
/// file descriptors while `marker` exists (and then leaves `git-failed` in the agent log dir),
/// and is the real git otherwise.
fn failing_git(repo: &TestRepo, marker: &std::path::Path) -> std::path::PathBuf {
    let dir = repo.dir.path().join("failing-git");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let real = which("git").expect("git on PATH");
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = index-pack ] && [ -e {marker} ]; then\n    \
         echo 'fatal: unable to create pipe: Too many open files' >&2\n    \
         touch {failed}\n    exit 128\n  fi\n\
         done\nexec {real} \"$@\"\n",
        marker = marker.display(),
        failed = repo.agent_log().join("git-failed").display(),
        real = real.display()
    );
    let git = dir.join("git");
    std::fs::write(&git, script).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&git, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn a_git_failure_on_the_server_is_not_charged_to_the_task() {
    let repo = TestRepo::new();
    let marker = repo.dir.path().join("git-fails");
    std::fs::write(&marker, "").expect("marker");
    let path = format!(
        "{}:{}",
        failing_git(&repo, &marker).display(),
        pipeline_tests::scripts_path()
    );
    let mut cmd = Server::command(&repo, &[]);
    cmd.env("PATH", &path);
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("no server:\n{log}"));
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "a valid commit"]);
    wait_for("the server's git to fail on the commit", || {
        repo.agent_file("git-failed").map(|_| ())
    });
    std::fs::remove_file(&marker).expect("git works again");
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
    assert_eq!(task["patchset"], 1, "{task}");
    let dev: Vec<Value> = runs(&task)
        .into_iter()
        .filter(|r| r["phase"] == "dev")
        .collect();
    assert_eq!(dev.len(), 1, "the same run delivered again: {dev:?}");
}

#[test]
fn relative_paths_are_resolved_at_start_up() {
    let repo = TestRepo::new();
    let cwd = repo.dir.path();
    let mut cmd = repo.command("pipeline-server");
    cmd.current_dir(cwd)
        .args(["--repo", "repo", "--state-dir", "st-scratch"])
        .args(["--listen", "127.0.0.1:0", "--env-allow", "AGENT_LOG_DIR"])
        .env("RUST_LOG", "info")
        .env("PATH", pipeline_tests::scripts_path())
        .env("AGENT_LOG_DIR", repo.agent_log())
        .envs(pipeline_tests::sandbox_env(&repo));
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("no server:\n{log}"));
    let token = std::fs::read_to_string(cwd.join("st-scratch/runner-registration.token"))
        .expect("token")
        .trim()
        .to_owned();
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    let _runner = pipeline_tests::Proc::spawn(
        repo.command("pipeline-runner")
            .current_dir(cwd)
            .args(["--server", &server.url, "--name", "rel", "--token", &token])
            .args([
                "--work-dir",
                "runner-scratch",
                "--agent-cmd",
                &agent,
                "--no-verify",
            ])
            .args(["--env-allow", "AGENT_LOG_DIR"])
            .env("PATH", pipeline_tests::scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(pipeline_tests::sandbox_env(&repo)),
    );
    let id = server.add(&["--title", "relative"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
    assert!(cwd.join("runner-scratch/mirror.git").is_dir());
}

#[test]
fn a_retry_starts_from_the_current_base() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1", "--backoff-base", "0"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&scripted_agent()));
    // Its first commit fails its verification on a green base: its own failure.
    let id = server.add(&["--title", "needs a fix", "--namespace", "needs-fix"]);
    let task = server.wait_status(&id, "needs_help");
    assert_eq!(task["patchset"], 1, "its commit was kept: {task}");
    // A person moves the base; the retry must build on it.
    let moved = repo.push_to_main("person.txt", "a person's change\n");
    server.ctl(&["task", "retry", &id]).ok();
    let task = server.wait_status(&id, "done");
    let env = repo
        .agent_file(&format!("dev-{id}-2.env"))
        .expect("second run's env");
    assert!(
        env.contains(&format!("PIPELINE_BASE_COMMIT={moved}")),
        "the retry ran on the old base:\n{env}"
    );
    assert_eq!(task["patchset"], 2, "{task}");
    let prompt = repo
        .agent_file(&format!("dev-{id}-2.prompt"))
        .expect("prompt");
    assert!(
        prompt.contains("previous patchset was rejected"),
        "{prompt}"
    );
    assert!(repo.landed().contains(&id));
}

#[test]
fn a_retry_whose_patchset_no_longer_applies_starts_fresh() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1", "--backoff-base", "0"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&scripted_agent()));
    let id = server.add(&["--title", "needs a fix", "--namespace", "needs-fix"]);
    server.wait_status(&id, "needs_help");
    // A person rewrites the very file the patchset wrote.
    let moved = repo.push_to_main(&format!("notes/{id}.md"), "the person's version\n");
    server.ctl(&["task", "retry", &id]).ok();
    let task = server.wait_status(&id, "done");
    let env = repo.agent_file(&format!("dev-{id}-2.env")).expect("env");
    assert!(
        env.contains(&format!("PIPELINE_BASE_COMMIT={moved}")),
        "{env}"
    );
    let prompt = repo
        .agent_file(&format!("dev-{id}-2.prompt"))
        .expect("prompt");
    assert!(prompt.contains("no longer applies"), "{prompt}");
    assert!(!prompt.contains("--amend"), "a fresh start: {prompt}");
    assert_eq!(task["status"], "done");
}

#[test]
fn an_empty_database_beside_an_earlier_pipelines_history_is_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--no-verify"]);
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let first = server.add(&["--title", "first"]);
    server.wait_status(&first, "done");
    drop(runner);
    server.kill();
    // The database is lost (SQLite's files, or PostgreSQL's database made again empty).
    repo.lose_database();
    let log = match Server::spawn(&mut Server::command(&repo, &[])) {
        Ok(s) => panic!("started on an empty database:\n{}", s.log()),
        Err(log) => log,
    };
    assert!(
        log.contains("the database is empty but the repository shows an earlier pipeline"),
        "{log}"
    );
    // The same with the pipeline's refs gone too: the base's trailers are history enough.
    let refs = pipeline_tests::git(
        &repo.repo(),
        &["for-each-ref", "--format=%(refname)", "refs/pipeline"],
    );
    assert!(!refs.is_empty(), "the server keeps refs of its own");
    for r in refs.lines() {
        pipeline_tests::git(&repo.repo(), &["update-ref", "-d", r]);
    }
    let log = match Server::spawn(&mut Server::command(&repo, &[])) {
        Ok(s) => panic!("started beside the trailers alone:\n{}", s.log()),
        Err(log) => log,
    };
    assert!(
        log.contains("the database is empty but the repository shows an earlier pipeline"),
        "{log}"
    );
    // Knowingly: the new IDs do not repeat the old ones.
    let server = Server::start(&repo, &["--accept-existing-history"]);
    let _runner = Runner::start(&repo, &server, "r2", &as_strs(&args));
    let next = server.add(&["--title", "after the loss"]);
    assert_ne!(next, first, "a task ID was reused");
    server.wait_status(&next, "done");
    let landed = repo.landed();
    assert_eq!(
        landed.iter().filter(|t| **t == first).count(),
        1,
        "{landed:?}"
    );
}

#[test]
fn done_tasks_a_rolled_back_database_forgot_are_recorded_done_not_redone() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    // A snapshot of the database while the task is in progress...
    let id = server.add(&[
        "--title",
        "landed, then forgotten",
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent(&id);
    let snapshot = repo.snapshot_database("in-progress");
    repo.release_agents();
    server.wait_status(&id, "done");
    drop(runner);
    // ...comes back after a power loss: the task is in progress again, its commit on the base.
    server.kill();
    repo.restore_database(&snapshot);
    let server = Server::start(&repo, &[]);
    let _runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let task = server.wait_status(&id, "done");
    let dev = runs(&task)
        .into_iter()
        .filter(|r| r["phase"] == "dev")
        .count();
    assert_eq!(dev, 1, "leased again: {task}");
    let landed = repo.landed();
    assert_eq!(landed.iter().filter(|t| **t == id).count(), 1, "{landed:?}");
}

/// The server with its state on a small disk of its own, and `extra` flags; the server, and
/// its registration token.
fn server_on(
    repo: &TestRepo,
    disk: &pipeline_tests::SmallDisk,
    extra: &[&str],
) -> (Server, String) {
    let state = disk.path.join("state");
    let mut cmd = repo.command("pipeline-server");
    cmd.arg("--repo")
        .arg(repo.repo())
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--backoff-base", "0"])
        .args(extra)
        .env("RUST_LOG", "info");
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("no server:\n{log}"));
    let token = std::fs::read_to_string(state.join("runner-registration.token"))
        .expect("token")
        .trim()
        .to_owned();
    (server, token)
}

/// A runner `name` of `url` with the scripted agent, no verification and its work in
/// `work_dir`.
fn script_runner(
    repo: &TestRepo,
    url: &str,
    token: &str,
    name: &str,
    work_dir: &std::path::Path,
) -> pipeline_tests::Proc {
    script_runner_with(repo, url, token, name, work_dir, &[])
}

/// [`script_runner`] with `extra` flags.
fn script_runner_with(
    repo: &TestRepo,
    url: &str,
    token: &str,
    name: &str,
    work_dir: &std::path::Path,
    extra: &[&str],
) -> pipeline_tests::Proc {
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    pipeline_tests::Proc::spawn(
        repo.command("pipeline-runner")
            .args(["--server", url, "--name", name, "--token", token])
            .arg("--work-dir")
            .arg(work_dir)
            .args(["--agent-cmd", &agent, "--no-verify", "--kill-grace", "1"])
            .args(["--env-allow", "AGENT_LOG_DIR"])
            .args(extra)
            .env("PATH", pipeline_tests::scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(pipeline_tests::sandbox_env(repo)),
    )
}

#[test]
fn a_full_disk_fails_writes_cleanly_and_they_come_back_with_the_space() {
    let repo = TestRepo::new();
    let Some(disk) = pipeline_tests::SmallDisk::try_new(24) else {
        return;
    };
    let (server, token) = server_on(&repo, &disk, &["--lease-ttl", "2"]);
    let runner = |name: &str| {
        let work = repo.dir.path().join("runners").join(name);
        script_runner(&repo, &server.url, &token, name, &work)
    };
    let mut first = runner("first");
    let id = server.add(&[
        "--title",
        "running when the disk fills",
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent(&id);
    disk.fill();
    // Writes fail with one line, every time, and the server says it is not healthy.
    for _ in 0..2 {
        let out = server.ctl(&["task", "add", "--title", "no room"]);
        let line = out.refused(1, "disk is full");
        assert!(!line.contains("transaction depth"), "{line}");
    }
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["health"], "unhealthy", "{status}");
    assert!(
        status["health_reason"]
            .as_str()
            .is_some_and(|r| r.contains("database")),
        "{status}"
    );
    // The lease lapses while nothing can be written: it must not be forgotten.
    first.kill();
    server.wait_for_log("dispatch round failed");
    disk.free();
    let next = server.add(&["--title", "room again"]);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["health"], "healthy", "{status}");
    let _second = runner("second");
    repo.release_agents();
    for task in [&id, &next] {
        let done = server.wait_status(task, "done");
        assert_eq!(done["failures"], 0, "{done}");
    }
}

#[test]
fn a_full_spool_disk_is_not_charged_and_leaves_no_file_behind() {
    let repo = TestRepo::new();
    let Some(disk) = pipeline_tests::SmallDisk::try_new(24) else {
        return;
    };
    let (server, token) = server_on(&repo, &disk, &[]);
    let work = repo.dir.path().join("runners").join("r");
    let _runner = script_runner(&repo, &server.url, &token, "r", &work);
    let id = server.add(&[
        "--title",
        "a large commit",
        "--description",
        "MODE: big-wait",
    ]);
    repo.wait_agent(&id);
    // The disk fills while the agent works, but for 1 MiB: the database's small writes go
    // on, the commit's 3 MB bundle cannot be spooled.
    disk.fill_leaving(1 << 20);
    repo.release_agents();
    let spool = disk.path.join("state").join("spool");
    let files = || {
        std::fs::read_dir(&spool)
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    };
    server.wait_for_log("cannot spool a commit's bundle (spool write)");
    wait_for("the refused upload's file to go", || {
        (files() == 0).then_some(())
    });
    let task = server.show(&id);
    assert_eq!(task["failures"], 0, "{task}");
    assert_eq!(task["status"], "in_progress", "the runner keeps it: {task}");
    // With room again, the runner's next try lands it, charged nothing.
    disk.free();
    let done = server.wait_status(&id, "done");
    assert_eq!(done["failures"], 0, "{done}");
    for run in runs(&done) {
        assert_ne!(run["failure_kind"], "task", "{run}");
    }
    assert_eq!(repo.landed(), [id.as_str()]);
    assert_eq!(files(), 0, "no spool file left");
}

#[test]
fn a_build_tool_missing_when_the_build_runs_is_not_charged() {
    let repo = TestRepo::new();
    // The server's verification names a program no machine has: the runners run it (the
    // server's policy), it cannot start, and that is no task's fault.
    let server = Server::start(
        &repo,
        &[
            "--build-cmd",
            "no-such-build-tool --all",
            "--backoff-base",
            "0",
        ],
    );
    let _r = Runner::start(
        &repo,
        &server,
        "r",
        &as_strs(
            &[
                scripted_agent(),
                vec!["--max-infra-failures".into(), "2".into()],
            ]
            .concat(),
        ),
    );
    let id = server.add(&["--title", "t"]);
    // The runner's health (a heartbeat) and its last attempt's release (a call of its own)
    // may reach the server in either order: both are waited for.
    let task = wait_for(
        "the runner to turn unhealthy and the task to be back",
        || {
            let runners = server.ctl(&["runners", "--json"]).json();
            let task = server.show(&id);
            (runners[0]["health"] == "unhealthy" && task["status"] != "in_progress").then_some(task)
        },
    );
    assert_eq!(task["failures"], 0, "{task}");
    assert_eq!(task["status"], "open", "{task}");
    let failed: Vec<Value> = runs(&task)
        .into_iter()
        .filter(|r| r["status"] == "failure")
        .collect();
    assert!(!failed.is_empty(), "{task}");
    for run in &failed {
        assert_eq!(run["failure_kind"], "infrastructure", "{run}");
        assert!(
            run["error"]
                .as_str()
                .is_some_and(|e| e.contains("no-such-build-tool")),
            "{run}"
        );
    }
}

#[test]
fn a_full_disk_on_the_runner_is_not_charged() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let Some(disk) = pipeline_tests::SmallDisk::try_new(16) else {
        return;
    };
    let token = repo.registration_token();
    // A runner that turns unhealthy for good at its first infrastructure failure: a full disk
    // must not count as one, since it heals once room is made (however often it is met
    // meanwhile: it failed three times within 150 ms once, and the task never finished).
    let runner = script_runner_with(
        &repo,
        &server.url,
        &token,
        "r",
        &disk.path.join("work"),
        &["--max-infra-failures", "1"],
    );
    let runner_health = || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (
            runners[0]["health"].as_str().unwrap_or_default().to_owned(),
            runners[0]["health_reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    wait_for("the runner to connect", || {
        (server.ctl(&["status", "--json"]).json()["runners"] == 1).then_some(())
    });
    // Its work dir is full before the work comes: the worktree cannot be made.
    disk.fill();
    let id = server.add(&["--title", "t"]);
    wait_for("an attempt to meet the full disk", || {
        disk.fill();
        runs(&server.show(&id))
            .iter()
            .any(|r| r["status"] == "failure")
            .then_some(())
    });
    let task = server.show(&id);
    assert_eq!(task["failures"], 0, "{task}");
    for run in runs(&task) {
        if run["status"] == "failure" {
            assert_eq!(run["failure_kind"], "infrastructure", "{run}");
            assert!(
                run["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("No space left on device")),
                "the reason is on the run: {run}"
            );
        }
    }
    // The runner takes no work while its disk is full, and says why.
    wait_for("the runner to say its disk is full", || {
        let (health, reason) = runner_health();
        (health == "unhealthy" && reason.contains("disk is full")).then_some(())
    });
    // Room again: it finds out by itself, and the task is done, charged nothing.
    disk.free();
    let done = server.wait_status(&id, "done");
    assert_eq!(done["failures"], 0, "{done}");
    assert_eq!(runner_health().0, "healthy", "{}", runner.log());
}

#[test]
fn a_dependency_on_a_cancelled_task_is_refused_and_waiting_is_explained() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let cancelled = server.add(&["--title", "abandoned"]);
    server.ctl(&["task", "cancel", &cancelled]).ok();
    server
        .ctl(&[
            "task",
            "add",
            "--title",
            "waits for ever",
            "--depends-on",
            &cancelled,
        ])
        .refused(4, &format!("{cancelled} is cancelled"));
    let other = server.add(&["--title", "other"]);
    server
        .ctl(&["task", "depend", &other, "--on", &cancelled])
        .refused(4, "is cancelled");
    // What holds a task, in show and list; no runner is connected yet.
    let first = server.add(&["--title", "first"]);
    let second = server.add(&["--title", "second", "--depends-on", &first]);
    let show = server.show(&second);
    assert_eq!(
        show["waiting_for"],
        serde_json::json!([format!("depends on {first}, which is open")]),
        "{show}"
    );
    assert_eq!(
        server.show(&first)["waiting_for"],
        serde_json::json!(["no runner is connected"])
    );
    let list = server.ctl(&["task", "list", "--json"]).json();
    let listed = list
        .as_array()
        .and_then(|l| l.iter().find(|t| t["id"] == second.as_str()))
        .cloned()
        .expect("listed");
    assert_eq!(listed["waiting_for"], show["waiting_for"]);
    let table = server.ctl(&["task", "show", &second]).ok();
    assert!(
        table.contains(&format!("waiting:     depends on {first}")),
        "{table}"
    );
    // `logs --follow` of a task that has not started says why, then waits.
    let follow =
        pipeline_tests::Proc::spawn(server.ctl_command().args(["logs", &second, "--follow"]));
    let line = follow
        .wait_for_line("is waiting")
        .expect("logs --follow said nothing");
    assert!(line.contains(&format!("depends on {first}")), "{line}");
}

#[test]
fn logs_name_the_real_phase_and_attempt_and_end_with_the_reason() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&scripted_agent()));
    // Fails its verification once (needs-fix), then passes.
    let id = server.add(&["--title", "fix me", "--namespace", "needs-fix"]);
    let task = server.wait_status(&id, "done");
    let verify_runs: Vec<Value> = runs(&task)
        .into_iter()
        .filter(|r| r["phase"] == "verify")
        .collect();
    assert_eq!(verify_runs.len(), 3, "{task}");
    let logs = server.ctl(&["logs", &id]).ok();
    // Each run's lines are under a header naming its phase and the attempt task show gives;
    // the server's build of the base the first verification failed on is of that attempt.
    let headers: Vec<&str> = logs.lines().filter(|l| l.starts_with("=== ")).collect();
    assert_eq!(
        headers,
        [
            "=== dev · attempt 1 · r ===",
            "=== verify · attempt 1 · r ===",
            "=== verify · attempt 1 · server ===",
            "=== dev · attempt 2 · r ===",
            "=== verify · attempt 2 · r ===",
            "=== integrate · attempt 1 · server ===",
        ],
        "{logs}"
    );
    assert!(!logs.contains("lines 1–"), "no cut marker: {logs}");
    // The failed verification's log ends with its reason.
    let first_verify: Vec<&str> = logs
        .split("=== verify · attempt 1 · r ===")
        .nth(1)
        .and_then(|rest| rest.split("=== ").next())
        .expect("the first verify run's lines")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let last = first_verify.last().expect("a line");
    assert!(
        last.contains("build failed for needs-fix (exit 1)"),
        "{logs}"
    );
}

#[test]
fn a_cancel_leaves_a_line_in_the_log() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "cancelled", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    // Wait until the agent's first line is in the log, then cancel.
    wait_for("the agent's first line", || {
        server
            .ctl(&["logs", &id])
            .ok()
            .contains("agent: task")
            .then_some(())
    });
    server.ctl(&["task", "cancel", &id]).ok();
    let logs = wait_for("the cancel in the log", || {
        let logs = server.ctl(&["logs", &id]).ok();
        logs.contains("cancelled").then_some(logs)
    });
    let last = logs.lines().last().unwrap_or_default();
    assert!(
        last.contains("server") && last.contains("cancelled"),
        "{logs}"
    );
    assert!(!logs.contains("cut:"), "{logs}");
}

#[test]
fn failure_messages_show_the_command_as_run_and_are_not_cut_after_a_colon() {
    let repo = TestRepo::new();
    // The server's verification, which the runner runs.
    let server = Server::start(
        &repo,
        &[
            "--max-retries",
            "1",
            "--test-cmd",
            // Red only with the agent's notes: the base itself is green.
            "if [ -d notes ]; then echo checking {namespace}; echo 'error: no good' >&2; \
             exit 3; fi",
        ],
    );
    let args = scripted_agent();
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "red", "--namespace", "Omni/A.hs"]);
    let task = server.wait_status(&id, "needs_help");
    let error = runs(&task)
        .into_iter()
        .find(|r| r["phase"] == "verify")
        .and_then(|r| r["error"].as_str().map(str::to_owned))
        .expect("verify error");
    assert!(error.contains("echo checking 'Omni/A.hs'"), "{error}");
    assert!(!error.contains("{namespace}"), "{error}");
    let table = server.ctl(&["task", "show", &id]).ok();
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("verify"))
        .expect("verify row");
    assert!(row.contains("error: no good"), "cut after a colon: {row}");
    let transitions = pipeline_tests::run(server.ctl_command().args(["task", "show", &id]));
    assert!(transitions.status.success());
}

#[test]
fn stdout_and_stderr_keep_the_order_they_were_written_in() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = {
        let mut a = scripted_agent();
        a.push("--no-verify".into());
        a
    };
    let _r = Runner::start(&repo, &server, "r", &as_strs(&args));
    for _ in 0..3 {
        let id = server.add(&["--title", "chatty", "--description", "MODE: interleave"]);
        server.wait_status(&id, "done");
        let logs = server.ctl(&["logs", &id]).ok();
        let order: Vec<String> = logs
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
            .filter(|w| w.starts_with("out-") || w.starts_with("err-"))
            .collect();
        let want: Vec<String> = (1..=10)
            .map(|i| format!("{}-{i}", if i % 2 == 1 { "out" } else { "err" }))
            .collect();
        assert_eq!(order, want, "{logs}");
    }
}

#[test]
fn a_killed_servers_token_note_is_not_offered_to_the_next_server_on_its_port() {
    let repo = TestRepo::new();
    let home = repo.home();
    let start = |state: &str, listen: &str| {
        let mut cmd = repo.command("pipeline-server");
        cmd.arg("--repo")
            .arg(repo.repo())
            .arg("--state-dir")
            .arg(repo.dir.path().join(state))
            // The second state dir's database takes the repository over.
            .args([
                "--listen",
                listen,
                "--insecure",
                "--accept-existing-history",
            ])
            .env("RUST_LOG", "info");
        Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("no server:\n{log}"))
    };
    let ctl = |url: &str| pipeline_tests::ctl_in(&home, url, &["status", "--json"]);
    let first = start("state-a", "127.0.0.1:0");
    let port = first.addr.rsplit(':').next().expect("port").to_owned();
    first.kill();
    // Another server takes the port on every address; the dead one's note must not be used.
    let second = start("state-b", &format!("0.0.0.0:{port}"));
    let out = ctl(&format!("http://0.0.0.0:{port}"));
    assert!(out.status.success(), "{}", out.stderr);
    let out = ctl(&format!("http://127.0.0.1:{port}"));
    assert!(out.status.success(), "{}", out.stderr);
    drop(second);
}

#[test]
fn a_task_in_back_off_says_so_and_for_how_long() {
    use pipeline_proto::v1 as pb;
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "600"]);
    let mut fake = pipeline_tests::fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let lease = fake.next_assignment().lease.expect("lease");
    fake.complete(lease, pb::LeaseOutcome::DevFailed, None, vec![])
        .expect("a failure");
    let task = server.show(&id);
    assert_eq!(task["status"], "open", "{task}");
    let waiting = task["waiting_for"].as_array().cloned().unwrap_or_default();
    assert!(
        waiting.iter().any(|w| w.as_str().is_some_and(
            |w| w.starts_with("in back-off for ") && w.contains("after 1 failed attempt")
        )),
        "{task}"
    );
    assert!(task["backoff_until"].is_string(), "{task}");
    let text = server.ctl(&["task", "show", &id]).ok();
    assert!(text.contains("in back-off for"), "{text}");
}

#[test]
fn a_server_takes_its_note_with_it_and_clears_those_of_servers_that_are_gone() {
    let repo = TestRepo::new();
    // The harness gives each test a home of its own: the notes go there, not to the user's.
    let notes = repo.home().join(".local/state/pipeline/servers");
    let listed = || {
        let mut names: Vec<String> = std::fs::read_dir(&notes)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let note_of = |server: &Server| server.addr.replace(':', "-");
    let first = Server::start(&repo, &[]);
    assert_eq!(listed(), [note_of(&first)]);
    // A graceful stop removes it.
    assert!(first.terminate().success());
    assert_eq!(listed(), Vec::<String>::new());
    // A server that is SIGKILLed cannot; nor can a test's, whose temp dir is gone since.
    let killed = Server::start(&repo, &[]);
    let stale = note_of(&killed);
    killed.kill();
    std::fs::write(notes.join("127.0.0.1-1"), "/nonexistent/state/admin.token").expect("note");
    assert_eq!(listed(), ["127.0.0.1-1".to_owned(), stale.clone()]);
    // The next server removes both: their servers no longer hold their locks.
    let mut next = Server::start(&repo, &[]);
    assert_eq!(listed(), [note_of(&next)]);
    // An upload under way holds a graceful stop up (for up to its drain deadline)...
    use pipeline_proto::v1 as pb;
    let mut fake = pipeline_tests::fake_runner(&repo, &next);
    next.add(&["--title", "t"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let messages = pipeline_tests::fake_runner::complete_messages(
        &fake.id,
        lease,
        pb::LeaseOutcome::Verified,
        None,
        0.0,
        Some("0".repeat(40)),
        vec![b'x'; 1000],
    );
    let _held = fake.complete_and_hold(messages, || !spooled(&repo).is_empty());
    // ...so a second signal meets it: it stops at once (exit 130), note and all.
    next.proc.signal("INT");
    next.proc.signal("TERM");
    let status = next.proc.wait_exit();
    assert_eq!(status.code(), Some(130), "{}", next.log());
    assert_eq!(listed(), Vec::<String>::new());
}

#[test]
fn a_port_in_use_is_refused_before_anything_is_created() {
    let repo = TestRepo::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let log = match Server::spawn(&mut Server::command(&repo, &["--listen", &addr])) {
        Ok(server) => panic!("started on a port in use:\n{}", server.log()),
        Err(log) => log,
    };
    assert!(
        !repo.state_dir().exists(),
        "the state dir was created: {:?}",
        std::fs::read_dir(repo.state_dir())
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("pipeline-server:"))
        .unwrap_or_else(|| panic!("no one-line reason: {log}"));
    assert!(
        line.contains(&format!("cannot listen on {addr}")) && line.contains("--listen"),
        "{line}"
    );
    // Once the port is free, the same command starts.
    drop(taken);
    let server = Server::start(&repo, &["--listen", &addr]);
    server.ctl(&["status"]).ok();
}

/// A job that panics (a bug in the runner) ends like any other infrastructure failure: its slot
/// is freed, its lease goes back uncharged with the panic as the reason, and it counts towards
/// the runner's health. It used to keep its slot for ever and report its lease in every
/// heartbeat, so the server never expired it and the task hung in progress.
#[test]
fn a_panicking_job_gives_its_lease_back_and_frees_its_slot() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let mut args = scripted_agent();
    args.extend(["--no-verify", "--max-infra-failures", "2"].map(String::from));
    let panicky = Runner::spawn_with_env(
        &repo,
        &server.url,
        "panicky",
        &as_strs(&args),
        &[("PIPELINE_FAILPOINT", "panic-job")],
    );
    let id = server.add(&["--title", "met a panic"]);
    // Each job panics; each gives its lease back and frees the slot for the next, until the
    // runner has failed twice in a row and turns unhealthy.
    let runners = wait_for("the panicking runner to turn unhealthy", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners[0]["health"] == "unhealthy").then_some(runners)
    });
    let reason = runners[0]["health_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("panicked"), "{reason}");
    let task = server.wait_task(&id, "given back", |t| t["status"] == "open");
    assert_eq!(
        task["failures"], 0,
        "a panic is not the task's failure: {task}"
    );
    let dev = runs(&task);
    assert!(dev.len() >= 2, "one run per panicked job: {task}");
    for run in &dev {
        assert_eq!(run["status"], "failure", "{run}");
        assert_eq!(run["failure_kind"], "infrastructure", "{run}");
        let error = run["error"].as_str().unwrap_or_default();
        assert!(error.contains("panicked"), "{error}");
    }
    drop(panicky);
    // Nothing was lost: a sound runner takes the task and lands it.
    let args = scripted_agent();
    let mut sound = as_strs(&args);
    sound.push("--no-verify");
    let _sound = Runner::start(&repo, &server, "sound", &sound);
    server.wait_status(&id, "done");
}

/// A server that stops in the middle of sending a lease's base bundle ends the stream with
/// an error (`UNAVAILABLE`), not as if the bundle were whole: the runner fetches it again from
/// the restarted server and keeps its lease (no lease given back, nothing charged). The send
/// is held after its first chunk by a fault point, so the stop always falls mid-stream.
#[test]
fn a_server_stopped_mid_base_fetch_tells_the_runner_which_fetches_again() {
    let repo = TestRepo::new();
    // A base of several chunks (256 KiB each): 2 MiB of hex digits that do not repeat.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: String = (0..(2 << 20) / 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect();
    repo.push_to_main("big.txt", &big);
    let gate = repo.dir.path().join("gate");
    let mut cmd = Server::command(&repo, &["--no-verify"]);
    cmd.env("PIPELINE_FAILPOINT", "base-fetch-mid-stream")
        .env("PIPELINE_FAILPOINT_FILE", &gate);
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("server:\n{log}"));
    let addr = server.addr.clone();
    let runner = Runner::start(&repo, &server, "r", &as_strs(&scripted_agent()));
    let id = server.add(&["--title", "fetched"]);
    wait_for("the base fetch to be held mid-stream", || {
        gate.with_extension("reached").exists().then_some(())
    });
    let status = server.terminate();
    assert!(status.success(), "{status}");
    let server = Server::start(&repo, &["--no-verify", "--listen", &addr]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
    let dev = runs(&task).iter().filter(|r| r["phase"] == "dev").count();
    assert_eq!(dev, 1, "the lease was kept, not given back: {task}");
    assert_eq!(repo.landed(), [id.as_str()], "landed once");
    drop(runner);
}

/// Runners unhealthy for the same reason are named together, the reason said once: a queue
/// of tasks each said the whole reason again for every runner (three runners missing the
/// build command's program made each task's line about 1000 characters of the same text).
#[test]
fn runners_unhealthy_for_one_reason_are_named_together_the_reason_once() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--build-cmd", "not-installed-anywhere"]);
    let args = agent_args(&["--max-infra-failures", "1"]);
    let _r1 = Runner::start(&repo, &server, "r1", &as_strs(&args));
    let _r2 = Runner::start(&repo, &server, "r2", &as_strs(&args));
    let id = server.add(&["--title", "waits"]);
    wait_for("both runners to turn unhealthy", || {
        let runners = server.runners();
        runners
            .iter()
            .all(|r| r["health"] == "unhealthy")
            .then_some(())
    });
    let task = server.show(&id);
    let waiting = task["waiting_for"].to_string();
    assert!(waiting.contains("r1 and r2 are unhealthy: "), "{task}");
    assert_eq!(
        waiting.matches("not-installed-anywhere").count(),
        1,
        "the reason once: {task}"
    );
    assert!(waiting.contains("restart the runners"), "{task}");
}
