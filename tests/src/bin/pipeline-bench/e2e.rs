//! End to end with the real `pipeline-runner` and a trivial agent (it writes one file and
//! commits) on a 10,000-file repository: task created → its commit is on the base. The floor is
//! the same work done with bare git and the same agent script, in the same kind of places: a
//! server repository, a runner mirror and a kept worktree (base bundle out and in, reset the
//! worktree, run the agent, bundle the commit, unbundle it and keep it under a ref, land it
//! with merge-tree, commit-tree and update-ref).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pipeline_tests::{Runner, Server, TestRepo};

use crate::common::{Admin, Summary, bare_clone, git, report, wait_transition};
use crate::dispatch::SERVER_FLAGS;

const AGENT: &str = r#"#!/bin/sh
set -e
echo "$PIPELINE_TASK_ID" > "e2e-$PIPELINE_TASK_ID.txt"
git add "e2e-$PIPELINE_TASK_ID.txt"
git -c user.name=bench -c user.email=bench@example.invalid commit -q -m "e2e $PIPELINE_TASK_ID" -m "Task-Id: $PIPELINE_TASK_ID"
"#;

/// Adds `n` files in 100 directories to `main` of the test repository.
fn populate(repo: &Path, n: usize) {
    for i in 0..n {
        let dir = repo.join(format!("src/d{:03}", i % 100));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join(format!("f{i:05}.txt")),
            format!("file {i}\n{}\n", "x".repeat(64)),
        )
        .expect("write");
    }
    git(repo, &["add", "-A"]);
    // No background maintenance racing the clones below; the objects packed, as in a real repo.
    git(
        repo,
        &[
            "-c",
            "maintenance.auto=false",
            "commit",
            "-q",
            "-m",
            "10,000 files",
        ],
    );
    git(repo, &["repack", "-adq"]);
    git(repo, &["update-ref", "refs/heads/main", "HEAD"]);
}

pub async fn e2e(quick: bool) {
    let repo = TestRepo::new();
    populate(&repo.repo(), 10_000);
    let agent = repo.dir.path().join("noop-agent.sh");
    std::fs::write(&agent, AGENT).expect("write agent");
    let n = if quick { 3 } else { 30 };
    let floor = Summary::of(git_floor(&repo.repo(), repo.dir.path(), &agent, n));
    report(
        "floor: bare git + the same agent per task, 10,000 files",
        floor,
        None,
        "-",
    );

    let server = Server::start(&repo, SERVER_FLAGS);
    let agent_cmd = format!("sh {}", agent.display());
    let _runner = Runner::start(
        &repo,
        &server,
        "e2e",
        &[
            "--agent",
            "command",
            "--agent-cmd",
            &agent_cmd,
            "--no-verify",
        ],
    );
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let mut watch = admin.watch().await;
    let mut xs = Vec::new();
    for i in 0..n + 2 {
        let start = Instant::now();
        let id = admin.create(format!("e2e {i}")).await;
        let (at, t) = wait_transition(&mut watch, |t| {
            t.task_id == id
                && matches!(
                    t.kind.as_str(),
                    "integrated" | "dev_failed" | "integration_failed" | "lease_lost"
                )
        })
        .await;
        assert_eq!(t.kind, "integrated", "task {id}: {}", t.message);
        if i >= 2 {
            xs.push(at.duration_since(start));
        }
    }
    report(
        "end to end, real runner, no-op agent, 10,000 files: task created -> integrated",
        Summary::of(xs),
        Some(("bare git floor", floor)),
        "p50 <= 1.5x the bare git floor",
    );
}

/// The same work per task with bare git, `n` times (after one unmeasured round).
fn git_floor(repo: &Path, dir: &Path, agent: &Path, n: usize) -> Vec<Duration> {
    let s = dir.join("floor-server.git");
    let m = dir.join("floor-mirror.git");
    let w = dir.join("floor-worktree");
    let p = |p: &Path| p.to_str().expect("utf-8").to_owned();
    bare_clone(repo, &s);
    bare_clone(repo, &m);
    git(&m, &["worktree", "add", "-q", "--detach", &p(&w), "main"]);
    let mut mirror_tip = git(&m, &["rev-parse", "main"]);
    let mut xs = Vec::new();
    for i in 0..=n {
        let start = Instant::now();
        let tip = git(&s, &["rev-parse", "refs/heads/main"]);
        if tip != mirror_tip {
            let b = p(&dir.join("floor-base.bundle"));
            git(
                &s,
                &[
                    "bundle",
                    "create",
                    "-q",
                    &b,
                    "refs/heads/main",
                    &format!("^{mirror_tip}"),
                ],
            );
            git(&m, &["bundle", "unbundle", &b]);
            mirror_tip = tip.clone();
        }
        git(&w, &["checkout", "-q", "--force", "--detach", &tip]);
        git(&w, &["clean", "-ffdxq"]);
        let id = format!("floor-{i}");
        let status = Command::new("sh")
            .arg(agent)
            .current_dir(&w)
            .env("PIPELINE_TASK_ID", &id)
            .status()
            .expect("agent");
        assert!(status.success(), "the agent failed");
        let out = p(&dir.join("floor-commit.bundle"));
        git(
            &w,
            &["bundle", "create", "-q", &out, "HEAD", &format!("^{tip}")],
        );
        let commit = git(&w, &["rev-parse", "HEAD"]);
        git(&s, &["bundle", "unbundle", &out]);
        git(&s, &["update-ref", &format!("refs/floor/{i}"), &commit]);
        let tree = git(
            &s,
            &[
                "merge-tree",
                "--write-tree",
                &format!("--merge-base={tip}"),
                &tip,
                &commit,
            ],
        );
        let tree = tree.lines().next().expect("tree").to_owned();
        let new = git(&s, &["commit-tree", &tree, "-p", &tip, "-m", &id]);
        git(&s, &["update-ref", "refs/heads/main", &new, &tip]);
        if i > 0 {
            xs.push(start.elapsed());
        }
    }
    xs
}
