//! Nothing lost, nothing misattributed: a task is charged only for its own failures. A
//! missing program, a git or disk error, a lost connection are the infrastructure's, and give
//! the lease back uncharged, with the reason on the run.

use std::process::Command;

use pipeline_tests::{Runner, Server, TestRepo, bin, scripted_agent, scripts_dir, wait_for};
use serde_json::Value;

fn runs(task: &Value) -> Vec<Value> {
    task["runs"].as_array().cloned().unwrap_or_default()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `pipeline-runner ARGS` against `url` with `path` as its PATH, run to completion.
fn runner_once(repo: &TestRepo, url: &str, path: &str, args: &[&str]) -> pipeline_tests::Output {
    pipeline_tests::run(
        Command::new(bin("pipeline-runner"))
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
        "git", "sh", "cat", "env", "sed", "grep", "mkdir", "sort", "cp", "pwd",
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
    // bild (the default verifier) is not on PATH.
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    let out = runner_once(
        &repo,
        &server.url,
        &path,
        &["--agent", "command", "--agent-cmd", &agent],
    );
    assert!(!out.status.success(), "started without bild");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.contains("bild"), "{}", out.stderr);
    // The work dir cannot be written.
    let file = repo.dir.path().join("a-file");
    std::fs::write(&file, "").expect("write");
    let out = pipeline_tests::run(
        Command::new(bin("pipeline-runner"))
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
    let broken = Runner::start(
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
    assert!(
        broken.log().contains("infrastructure failure"),
        "{}",
        broken.log()
    );
    // Nothing was charged: every task is open, with no failure counted.
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
            }
        }
    }
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
