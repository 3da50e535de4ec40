//! What an agent or a build can reach, and how long it can live: agents and builds die with
//! the runner or server that started them, however it dies (SIGKILL included), what a crash
//! left behind is stopped at the next start, and they run in a sandbox that keeps them out of
//! the secrets and the other work beside them, while a legitimate build still works.
//!
//! Log lines checked on purpose (the line is the feature): the server's warning that agents run
//! unconfined under `--no-sandbox`, an operator-facing message (checked after `status` and
//! `runners` have shown it).

use std::path::{Path, PathBuf};
use std::process::Command;

use pipeline_tests::*;

/// Waits until none of `pids` is a live process.
fn wait_gone(what: &str, pids: &[String]) {
    wait_for(what, || pids.iter().all(|p| !alive(p)).then_some(()));
}

/// The pid written in the agent log's file `name`, once it is there.
fn pid_in(repo: &TestRepo, name: &str) -> String {
    wait_for(&format!("a pid in {name}"), || {
        repo.agent_file(name)
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A runner's worktree of slot 0 is still at `base`, with nothing an agent or a daemon of it
/// left there (no `late.txt`).
fn slot_untouched(repo: &TestRepo, runner: &str, base: &str) {
    let slot = repo.dir.path().join("runners").join(runner).join("slots/0");
    assert!(
        !slot.join("late.txt").exists(),
        "a daemon wrote into the slot"
    );
    let head = Command::new("git")
        .arg("-C")
        .arg(&slot)
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("git");
    assert_eq!(
        String::from_utf8_lossy(&head.stdout).trim(),
        base,
        "something committed into the slot after its runner died"
    );
}

#[test]
fn a_sigkilled_runner_takes_its_agent_and_what_the_agent_daemonized_with_it() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let base = main_tip(&repo);
    let args = agent_args(&["--no-verify"]);
    let mut runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "t", "--description", "MODE: orphan"]);
    let agent = repo.wait_agent(&id);
    let daemon = pid_in(&repo, &format!("{id}.daemon.pid"));
    runner.proc.kill();
    wait_gone(
        "the agent and its daemon to die with their runner",
        &[agent, daemon],
    );
    // Released now, nothing of them is left to commit.
    repo.release_agents();
    slot_untouched(&repo, "r", &base);
}

#[test]
fn a_sigkilled_runner_takes_its_build_and_what_the_build_daemonized_with_it() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&[]);
    let mut runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "t", "--namespace", "orphan"]);
    let build = pid_in(&repo, "bild.pid");
    let daemon = pid_in(&repo, "bild.daemon.pid");
    assert_eq!(server.show(&id)["status"], "in_progress");
    runner.proc.kill();
    wait_gone(
        "the build and its daemon to die with their runner",
        &[build, daemon],
    );
    repo.release_agents();
}

#[test]
fn agentd_runs_left_in_the_background_die_with_their_runner() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let base = main_tip(&repo);
    let mut runner = Runner::start(&repo, &server, "r", &["--agent", "agentd", "--no-verify"]);
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    // `agentd run` has exited; the scripted agent runs on in its own session.
    let agent = repo.wait_agent(&id);
    runner.proc.kill();
    wait_gone("the agentd run to die with its runner", &[agent]);
    repo.release_agents();
    slot_untouched(&repo, "r", &base);
}

#[test]
fn a_sigkilled_server_takes_its_integration_build_with_it() {
    let repo = TestRepo::new();
    let build = "case $PWD in */integration) exec bild orphan;; esac";
    let server = Server::start(&repo, &["--build-cmd", build]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    // The base moves while the agent works, so the server builds what it lands.
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    repo.push_to_main("person.txt", "a person's change");
    repo.release_task(&id);
    let build_pid = pid_in(&repo, "bild.pid");
    let daemon = pid_in(&repo, "bild.daemon.pid");
    server.kill();
    wait_gone(
        "the integration build and its daemon to die with the server",
        &[build_pid, daemon],
    );
    // A restarted server builds again and lands the task.
    std::fs::remove_file(repo.agent_log().join("bild.pid")).expect("rm");
    repo.release_agents();
    let server = Server::start(&repo, &["--build-cmd", build, "--listen", &addr]);
    server.wait_status(&id, "done");
}

#[test]
fn what_a_crash_left_running_is_stopped_at_the_next_start() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&["--no-verify"]);
    let mut runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    let agent = repo.wait_agent(&id);
    // The runner is stopped (so that it cannot react), the guard of the agent (its process
    // group's leader) killed, then the runner: the agent is nobody's now, until the runner
    // starts again.
    let pgid = pgid_of(&agent);
    assert_ne!(pgid, agent, "the agent is not its own group's leader");
    runner.proc.signal("STOP");
    let _ = Command::new("kill").args(["-KILL", &pgid]).status();
    wait_for("the guard to die", || (!alive(&pgid)).then_some(()));
    runner.proc.kill();
    assert!(
        alive(&agent),
        "the agent outlived its guard and runner (the crash to recover from)"
    );
    let _again = Runner::start(&repo, &server, "r", &as_strs(&args));
    wait_gone(
        "the runner's next start to stop what its crash left",
        &[agent],
    );
    repo.release_agents();
}

/// The process group of `pid` (its guard's pid, for an agent or build).
fn pgid_of(pid: &str) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .expect("pgid")
        .to_owned()
}

#[test]
fn a_killed_guard_takes_its_group_with_it_and_the_lease_goes_back_uncharged() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start(&repo, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "t", "--description", "MODE: wait-once"]);
    let agent = repo.wait_agent(&id);
    let guard = pgid_of(&agent);
    let _ = Command::new("kill").args(["-KILL", &guard]).status();
    wait_gone("the agent to go with its guard", &[agent]);
    let task = server.wait_status(&id, "done");
    let first = &runs(&task)[0];
    assert_eq!(first["failure_kind"], "infrastructure", "{task}");
    assert!(
        first["error"]
            .as_str()
            .unwrap_or_default()
            .contains("the guard of the process died"),
        "{task}"
    );
    assert_eq!(task["failures"], 0);
}

/// Paths a sandboxed agent or build tries to read, one a line, in the agent log's `targets`.
fn targets(repo: &TestRepo, paths: &[PathBuf]) {
    let text: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(repo.agent_log().join("targets"), text).expect("targets");
}

/// The record a hostile agent or build left in the agent log's file `name`: every target
/// denied, and none of `secrets` in it.
fn all_denied(repo: &TestRepo, name: &str, paths: &[PathBuf], secrets: &[String]) -> String {
    let record = wait_for(&format!("the record {name}"), || repo.agent_file(name));
    for path in paths {
        assert!(
            record.contains(&format!("DENIED {}\n", path.display())),
            "{name}: {} was read:\n{record}",
            path.display()
        );
    }
    for secret in secrets {
        assert!(
            !record.contains(secret.as_str()),
            "{name} holds a secret:\n{record}"
        );
    }
    record
}

/// None of `secrets` is anywhere in the base's tree.
fn base_keeps_none_of(repo: &TestRepo, secrets: &[String]) {
    let files = git(&repo.repo(), &["ls-tree", "-r", "--name-only", "main"]);
    for file in files.lines() {
        let content = git(&repo.repo(), &["show", &format!("main:{file}")]);
        for secret in secrets {
            assert!(
                !content.contains(secret.as_str()),
                "{file} on the base holds a secret"
            );
        }
    }
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn a_hostile_agent_and_build_on_a_runner_reach_none_of_its_secrets_nor_the_other_slot() {
    let repo = TestRepo::new();
    let build = format!("sh {}", scripts_dir().join("hostile-build.sh").display());
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let token = repo.registration_token();
    // The registration token in the runner's environment (as PIPELINE_TOKEN) and in a file.
    let token_file = repo.dir.path().join("runner.token");
    std::fs::write(&token_file, &token).expect("token file");
    let work = repo.dir.path().join("runners/r");
    let mut cmd = repo.command("pipeline-runner");
    cmd.args(["--server", &server.url, "--name", "r", "--slots", "2"])
        .arg("--work-dir")
        .arg(&work)
        .args(["--kill-grace", "2", "--env-allow", "AGENT_LOG_DIR"])
        .args(as_strs(&scripted_agent()))
        .env("RUST_LOG", "info")
        .env("PATH", scripts_path())
        .env("AGENT_LOG_DIR", repo.agent_log())
        .envs(sandbox_env(&repo))
        .env("PIPELINE_TOKEN", &token)
        .env_remove("PIPELINE_SERVER");
    let runner = Proc::spawn(&mut cmd);
    server.wait_connected(&runner, "r");
    let credential = read_trimmed(&work.join("credential"));
    // Another task's agent works in the other slot, its scratch file in its worktree.
    let other = server.add(&["--title", "other", "--description", "MODE: wait"]);
    repo.wait_agent(&other);
    let paths = [
        work.join("credential"),
        token_file.clone(),
        work.join("slots/0/scratch.txt"),
        work.join("slots/1/scratch.txt"),
        PathBuf::from(format!("/proc/{}/environ", runner.pid())),
        PathBuf::from(format!("/proc/{}/mem", runner.pid())),
    ];
    targets(&repo, &paths);
    let secrets = vec![credential, token];
    let id = server.add(&["--title", "hostile", "--description", "MODE: hostile"]);
    let task = server.wait_status(&id, "done");
    let stolen = all_denied(&repo, &format!("{id}.stolen"), &paths, &secrets);
    assert!(!stolen.contains("READ"), "{stolen}");
    let built = all_denied(&repo, "build-runner.stolen", &paths, &secrets);
    assert!(built.contains("legit build ok"), "{built}");
    assert!(
        runs(&task)
            .iter()
            .any(|r| r["phase"] == "verify" && r["status"] == "success"),
        "the hostile build's legitimate part passed on the runner"
    );
    base_keeps_none_of(&repo, &secrets);
    repo.release_agents();
    server.wait_status(&other, "done");
}

#[test]
fn a_hostile_agent_and_build_on_the_servers_host_reach_none_of_its_secrets() {
    let repo = TestRepo::new();
    let build = format!("sh {}", scripts_dir().join("hostile-build.sh").display());
    let mut args = vec!["--local-runners".to_owned(), "1".to_owned()];
    args.extend(agent_args(&["--build-cmd", &build]));
    let server = Server::start(&repo, &as_strs(&args));
    let state = repo.state_dir();
    let paths = [
        state.join("admin.token"),
        state.join("runner-registration.token"),
        state.join("pipeline.db"),
        state.join("runners/local-1/credential"),
        PathBuf::from(format!("/proc/{}/environ", server.pid())),
    ];
    targets(&repo, &paths);
    let secrets = vec![repo.admin_token(), repo.registration_token()];
    let id = server.add(&["--title", "hostile", "--description", "MODE: hostile-wait"]);
    all_denied(&repo, &format!("{id}.stolen"), &paths, &secrets);
    // The base moves meanwhile, so the server builds what it lands, in its own worktree.
    repo.push_to_main("person.txt", "a person's change");
    repo.release_agents();
    let task = server.wait_status(&id, "done");
    let built = all_denied(&repo, "build-runner.stolen", &paths, &secrets);
    assert!(built.contains("legit build ok"), "{built}");
    let built = all_denied(&repo, "build-server.stolen", &paths, &secrets);
    assert!(built.contains("legit build ok"), "{built}");
    assert!(
        runs(&task)
            .iter()
            .any(|r| r["phase"] == "integrate" && r["status"] == "success"),
        "the server built and landed it"
    );
    base_keeps_none_of(&repo, &secrets);
    let logs = server.ctl(&["logs", &id]).ok();
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret reached the task's log"
        );
    }
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["sandbox"], "landlock");
    let runners = server.ctl(&["runners", "--json"]).json();
    assert_eq!(runners[0]["sandbox"], "landlock");
}

#[test]
fn tokens_given_in_files_stay_out_of_the_command_line_and_the_environment() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let token = repo.registration_token();
    let token_file = repo.dir.path().join("runner.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let mut cmd = repo.command("pipeline-runner");
    cmd.args(["--server", &server.url, "--name", "r"])
        .arg("--work-dir")
        .arg(repo.dir.path().join("runners/r"))
        .arg("--token-file")
        .arg(&token_file)
        .args(as_strs(&agent_args(&["--no-verify"])))
        .env("RUST_LOG", "info")
        .env("PATH", scripts_path())
        .envs(sandbox_env(&repo))
        .env_remove("PIPELINE_TOKEN")
        .env_remove("PIPELINE_SERVER");
    let runner = Proc::spawn(&mut cmd);
    server.wait_connected(&runner, "r");
    for what in ["cmdline", "environ"] {
        let seen = std::fs::read(format!("/proc/{}/{what}", runner.pid())).expect("proc");
        assert!(
            !String::from_utf8_lossy(&seen).contains(&token),
            "the token is in the runner's {what}"
        );
    }
    // pipelinectl reads one from a file too; an empty one is refused as a malformed request.
    let admin = repo.dir.path().join("admin.token");
    std::fs::copy(repo.state_dir().join("admin.token"), &admin).expect("copy");
    // The connected runner is seen through the admin token's file too.
    wait_for("the runner, through the admin token's file", || {
        let status = ctl(
            &server.url,
            &[
                "--token-file",
                admin.to_str().expect("utf-8"),
                "status",
                "--json",
            ],
        )
        .json();
        (status["runners"] == 1).then_some(())
    });
    let empty = repo.dir.path().join("empty.token");
    std::fs::write(&empty, "\n").expect("write");
    ctl(
        &server.url,
        &["--token-file", empty.to_str().expect("utf-8"), "status"],
    )
    .refused(2, "is empty");
}

#[test]
fn without_a_sandbox_status_and_runners_say_so() {
    let repo = TestRepo::new();
    let mut args = vec!["--local-runners", "1", "--no-sandbox"];
    let agent = agent_args(&["--no-verify"]);
    args.extend(as_strs(&agent));
    let mut cmd = Server::command(&repo, &args);
    cmd.env_remove("PIPELINE_SANDBOX_READ")
        .env_remove("PIPELINE_SANDBOX_WRITE");
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("no server:\n{log}"));
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["sandbox"], "off");
    let text = server.ctl(&["status"]).ok();
    assert!(text.contains("sandbox:         OFF"), "{text}");
    let runners = wait_for("the local runner", || {
        let r = server.ctl(&["runners", "--json"]).json();
        (r[0]["sandbox"] == "off").then_some(r)
    });
    assert_eq!(runners[0]["name"], "local-1");
    // ...and the log warns the operator.
    server.wait_for_log("run unconfined (--no-sandbox)");
    // Asking for no sandbox and for a sandbox's paths at once is a mistake, said at once.
    let out = run(
        Server::command(&repo, &["--no-sandbox", "--sandbox-read", "/srv"])
            .env_remove("PIPELINE_SANDBOX_READ")
            .env_remove("PIPELINE_SANDBOX_WRITE"),
    );
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--sandbox-read"), "{}", out.stderr);
}

#[test]
fn a_token_given_in_the_environment_leaves_the_runners_environment() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let token = repo.registration_token();
    for var in ["PIPELINE_RUNNER_TOKEN", "PIPELINE_TOKEN"] {
        let name = format!("r-{}", var.len());
        let mut cmd = repo.command("pipeline-runner");
        cmd.args(["--server", &server.url, "--name", &name])
            .arg("--work-dir")
            .arg(repo.dir.path().join("runners").join(&name))
            .args(["--kill-grace", "2", "--env-allow", "AGENT_LOG_DIR"])
            .args(as_strs(&agent_args(&["--no-verify"])))
            .env("RUST_LOG", "info")
            .env("PATH", scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(sandbox_env(&repo))
            .env_remove("PIPELINE_TOKEN")
            .env_remove("PIPELINE_RUNNER_TOKEN")
            .env(var, &token)
            .env_remove("PIPELINE_SERVER");
        let runner = Proc::spawn(&mut cmd);
        server.wait_connected(&runner, &name);
        for what in ["environ", "cmdline"] {
            let seen = std::fs::read(format!("/proc/{}/{what}", runner.pid())).expect("proc");
            let seen = String::from_utf8_lossy(&seen);
            assert!(
                !seen.contains(&token),
                "the token ({var}) is in the runner's {what}"
            );
            if what == "environ" {
                assert!(
                    seen.contains("RUST_LOG=info"),
                    "not its environment: {seen}"
                );
            }
        }
        // It works: a task lands through it.
        let id = server.add(&["--title", &name]);
        server.wait_status(&id, "done");
        drop(runner);
    }
    assert_eq!(
        server
            .ctl(&["runners", "--json"])
            .json()
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

/// The unprivileged user the tests run agents as under `--sandbox user`, made when missing;
/// `None` (the test skipped, saying why) when the tests do not run as root.
fn sandbox_user() -> Option<&'static str> {
    const NAME: &str = "pipeline-test-box";
    let uid = Command::new("id").arg("-u").output().expect("id");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("skipped: --sandbox user needs the tests to run as root");
        return None;
    }
    let exists = || {
        Command::new("id")
            .arg(NAME)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !exists() {
        // Another test may make it at the same moment: then it exists all the same.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .status();
    }
    assert!(exists(), "cannot create the sandbox user {NAME} (useradd)");
    Some(NAME)
}

/// Lets every user pass through `dir` (not list it), and write `writable`.
fn open_to_others(dir: &Path, writable: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(writable, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

#[test]
fn a_hostile_agent_run_as_a_separate_user_reaches_none_of_the_runners_secrets() {
    let Some(user) = sandbox_user() else {
        return;
    };
    let repo = TestRepo::new();
    open_to_others(repo.dir.path(), &repo.agent_log());
    let server = Server::start(&repo, &[]);
    let token = repo.registration_token();
    let token_file = repo.dir.path().join("runner.token");
    std::fs::write(&token_file, &token).expect("token file");
    let work = repo.dir.path().join("runners/r");
    let start = |token_file: &Path| {
        let mut cmd = repo.command("pipeline-runner");
        cmd.args(["--server", &server.url, "--name", "r", "--slots", "1"])
            .arg("--work-dir")
            .arg(&work)
            .arg("--token-file")
            .arg(token_file)
            .args(["--sandbox", "user", "--sandbox-user", user])
            .args(["--kill-grace", "2", "--env-allow", "AGENT_LOG_DIR"])
            .args(as_strs(&agent_args(&["--no-verify"])))
            .env("RUST_LOG", "info")
            .env("PATH", scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .env_remove("PIPELINE_TOKEN")
            .env_remove("PIPELINE_SERVER");
        cmd
    };
    // A token file the sandbox user could read is refused, saying what to do.
    let out = run(&mut start(&token_file));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let runner = Proc::spawn(&mut start(&token_file));
    server.wait_connected(&runner, "r");
    let credential = read_trimmed(&work.join("credential"));
    let state = repo.state_dir();
    let paths = [
        work.join("credential"),
        token_file.clone(),
        state.join("admin.token"),
        state.join("runner-registration.token"),
        state.join("pipeline.db"),
        PathBuf::from(format!("/proc/{}/environ", runner.pid())),
        PathBuf::from(format!("/proc/{}/mem", runner.pid())),
    ];
    targets(&repo, &paths);
    let writes = [
        work.join("evil"),
        work.join("mirror/evil"),
        state.join("evil"),
        repo.repo().join("evil"),
        scripts_dir().join("evil"),
    ];
    let text: String = writes
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    std::fs::write(repo.agent_log().join("write-targets"), text).expect("write-targets");
    let secrets = vec![credential, token, repo.admin_token()];
    let id = server.add(&["--title", "hostile", "--description", "MODE: hostile"]);
    server.wait_status(&id, "done");
    let stolen = all_denied(&repo, &format!("{id}.stolen"), &paths, &secrets);
    for path in &writes {
        assert!(
            stolen.contains(&format!("UNWRITABLE {}\n", path.display())),
            "{} was written:\n{stolen}",
            path.display()
        );
        assert!(!path.exists(), "{} exists", path.display());
    }
    base_keeps_none_of(&repo, &secrets);
    // The agent ran as the sandbox user (its files in the agent log are that user's).
    let pid_owner = Command::new("stat")
        .args(["-c", "%U"])
        .arg(repo.agent_log().join(format!("{id}.stolen")))
        .output()
        .expect("stat");
    assert_eq!(String::from_utf8_lossy(&pid_owner.stdout).trim(), user);
    // A normal task still lands, and the runner says which sandbox it uses.
    let normal = server.add(&["--title", "normal"]);
    server.wait_status(&normal, "done");
    let runners = server.ctl(&["runners", "--json"]).json();
    assert_eq!(runners[0]["sandbox"], "user", "{runners}");
}

#[test]
fn without_landlock_a_runner_falls_back_to_a_separate_user_or_refuses() {
    let Some(user) = sandbox_user() else {
        return;
    };
    let repo = TestRepo::new();
    open_to_others(repo.dir.path(), &repo.agent_log());
    let server = Server::start(&repo, &[]);
    let args = agent_args(&["--no-verify"]);
    // No user to fall back to: refused, saying both ways out.
    let out = run(Runner::command(
        &repo,
        &server.url,
        "r",
        &[
            &as_strs(&args)[..],
            &["--sandbox-user", "no-such-user-here"],
        ]
        .concat(),
    )
    .env("PIPELINE_FAILPOINT", "no-landlock"));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("no Landlock"), "{}", out.stderr);
    assert!(out.stderr.contains("useradd"), "{}", out.stderr);
    assert!(out.stderr.contains("--no-sandbox"), "{}", out.stderr);
    // With one, agents run as it, and the runner says so.
    let mut cmd = Runner::command(
        &repo,
        &server.url,
        "r",
        &[&as_strs(&args)[..], &["--sandbox-user", user]].concat(),
    );
    cmd.env("PIPELINE_FAILPOINT", "no-landlock");
    let runner = Proc::spawn(&mut cmd);
    server.wait_connected(&runner, "r");
    let id = server.add(&["--title", "t"]);
    server.wait_status(&id, "done");
    let runners = server.ctl(&["runners", "--json"]).json();
    assert_eq!(runners[0]["sandbox"], "user", "{runners}");
}

#[test]
fn a_hostile_agent_and_build_run_as_a_separate_user_on_the_servers_host_reach_none_of_its_secrets()
{
    let Some(user) = sandbox_user() else {
        return;
    };
    let repo = TestRepo::new();
    open_to_others(repo.dir.path(), &repo.agent_log());
    let build = format!("sh {}", scripts_dir().join("hostile-build.sh").display());
    let mut args = vec!["--local-runners".to_owned(), "1".to_owned()];
    args.extend(agent_args(&["--build-cmd", &build]));
    args.extend(["--sandbox", "user", "--sandbox-user", user].map(String::from));
    let server = Server::start(&repo, &as_strs(&args));
    let state = repo.state_dir();
    let paths = [
        state.join("admin.token"),
        state.join("runner-registration.token"),
        state.join("pipeline.db"),
        state.join("runners/local-1/credential"),
        PathBuf::from(format!("/proc/{}/environ", server.pid())),
    ];
    targets(&repo, &paths);
    let secrets = vec![repo.admin_token(), repo.registration_token()];
    let id = server.add(&["--title", "hostile", "--description", "MODE: hostile-wait"]);
    all_denied(&repo, &format!("{id}.stolen"), &paths, &secrets);
    // The base moves meanwhile, so the server builds what it lands, in its own worktree.
    repo.push_to_main("person.txt", "a person's change");
    repo.release_agents();
    let task = server.wait_status(&id, "done");
    let built = all_denied(&repo, "build-server.stolen", &paths, &secrets);
    assert!(built.contains("legit build ok"), "{built}");
    assert!(
        runs(&task)
            .iter()
            .any(|r| r["phase"] == "integrate" && r["status"] == "success"),
        "the server built and landed it"
    );
    base_keeps_none_of(&repo, &secrets);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["sandbox"], "user");
}

/// An agent's ordinary `git commit` in its sandbox leaves no error in its log: git deletes the
/// worktree's `AUTO_MERGE` on every commit, which locks `packed-refs` in the slot's repository,
/// a directory the sandbox keeps read-only (its configuration and hooks are the runner's). The
/// commit succeeded before too, but "Unable to create …/packed-refs.lock: Permission denied"
/// in every task's log alarmed people. The slot's repository itself stays out of reach.
#[test]
fn an_agents_git_commit_in_the_sandbox_logs_no_permission_error() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--no-verify"]);
    let runner = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    let id = server.add(&["--title", "plain"]);
    server.wait_status(&id, "done");
    // A second lease in the same slot, on the slot's repository as the first one left it.
    let again = server.add(&["--title", "again"]);
    server.wait_status(&again, "done");
    for task in [&id, &again] {
        let log = server.ctl(&["logs", task]).ok();
        assert!(!log.contains("packed-refs"), "{log}");
        assert!(!log.contains("Permission denied"), "{log}");
    }
    // What the agent can write stays its own: the slot's repository (its configuration, its
    // refs) is not writable from inside the sandbox.
    let common = repo.dir.path().join("runners/r/slot-git/0");
    assert!(
        common.join("config").is_file(),
        "the slot's repository is where it was"
    );
    drop(runner);
}

/// The server's verification runs a script by absolute path that this runner's sandbox does
/// not let builds read (never granted on the server's word alone): the runner gives the lease
/// back before its agent runs, uncharged, saying what to grant; with `--sandbox-read` on that
/// directory the task lands.
#[test]
fn a_server_script_the_runners_sandbox_cannot_read_is_told_before_the_agent_runs() {
    let repo = TestRepo::new();
    let ci = repo.dir.path().join("ci");
    std::fs::create_dir_all(&ci).expect("mkdir");
    let script = ci.join("build.sh");
    std::fs::write(&script, "true\n").expect("write the build");
    let build = format!("sh {}", script.display());
    let server = Server::start(&repo, &["--build-cmd", &build]);
    let runner = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    let id = server.add(&["--title", "t"]);
    let task = server.wait_task(&id, "a lease given back, saying what to grant", |t| {
        runs(t).iter().any(|r| {
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("--sandbox-read"))
        })
    });
    assert_eq!(task["failures"], 0, "nobody charged: {task}");
    let why = runs(&task)
        .iter()
        .find_map(|r| r["error"].as_str().map(str::to_owned))
        .expect("a reason");
    assert!(why.contains(&script.display().to_string()), "{why}");
    assert!(
        repo.agent_file(&format!("{id}.attempts")).is_none(),
        "no agent ran"
    );
    // The runner stops taking leases it cannot verify (unhealthy, saying why); one granted
    // the directory takes the task and lands it.
    server.wait_runner("r", "unhealthy", |r| r["health"] == "unhealthy");
    let ci = ci.display().to_string();
    let args = agent_args(&["--sandbox-read", &ci]);
    let _granted = Runner::start(&repo, &server, "r2", &as_strs(&args));
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0, "{task}");
    drop(runner);
}
