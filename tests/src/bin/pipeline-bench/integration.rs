//! Integration: simulated runners send verified one-commit bundles; the figure is the time
//! from sending a result to the task's `integrated` transition (bundle in → base moved, no
//! build), one task at a time, and the rate with many results queued. The floor is the bare
//! git the work needs, run on the same bundles: `bundle unbundle` (store the commit),
//! `update-ref` (keep it under a ref until it lands), `merge-tree --write-tree`, `commit-tree`,
//! `update-ref` (move the base by compare-and-swap); like the server, it lets `git gc --auto`
//! tidy the packs every 20 bundles (untimed).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pipeline_proto::v1 as pb;
use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, Sim, Summary, bare_clone, git, register_sims, report, wait_transition};
use crate::dispatch::SERVER_FLAGS;

/// A task's work as a runner would send it.
pub struct Work {
    pub sim: usize,
    pub assignment: pb::Assignment,
    pub commit: String,
    pub bundle: Vec<u8>,
}

/// Writes one commit per assignment on top of its base commit (one new file each), with
/// `git fast-import` in a bare clone of `repo` under `dir`, and bundles each.
pub fn make_commits(repo: &Path, dir: &Path, assignments: &[(usize, pb::Assignment)]) -> Vec<Work> {
    let clone = dir.join("bench-work.git");
    bare_clone(repo, &clone);
    let mut stream = Vec::new();
    for (i, (_, a)) in assignments.iter().enumerate() {
        let msg = format!("bench: {}\n\nTask-Id: {}\n", a.task_id, a.task_id);
        let content = format!("{}\n", a.task_id);
        write!(
            stream,
            "commit refs/bench/{i}\ncommitter Bench <bench@example.invalid> 1700000000 +0000\n\
             data {}\n{msg}from {}\nM 100644 inline bench/{}.txt\ndata {}\n{content}\n",
            msg.len(),
            a.base_commit,
            a.task_id,
            content.len()
        )
        .expect("write");
    }
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(&clone)
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stream)
        .expect("feed fast-import");
    assert!(
        child.wait().expect("fast-import").success(),
        "git fast-import failed"
    );
    assignments
        .iter()
        .enumerate()
        .map(|(i, (sim, a))| {
            let refname = format!("refs/bench/{i}");
            let commit = git(&clone, &["rev-parse", &refname]);
            let file = dir.join(format!("bench-{i}.bundle"));
            git(
                &clone,
                &[
                    "bundle",
                    "create",
                    "-q",
                    file.to_str().expect("utf-8"),
                    &refname,
                    &format!("^{}", a.base_commit),
                ],
            );
            Work {
                sim: *sim,
                assignment: a.clone(),
                commit,
                bundle: std::fs::read(&file).expect("read bundle"),
            }
        })
        .collect()
}

/// The bare git for landing each bundle in turn on `branch` of a bare copy of `repo`.
pub fn git_floor(repo: &Path, dir: &Path, branch: &str, works: &[Work]) -> Vec<Duration> {
    let floor = dir.join("bench-floor.git");
    bare_clone(repo, &floor);
    let refname = format!("refs/heads/{branch}");
    let mut tip = git(&floor, &["rev-parse", &refname]);
    let mut xs = Vec::new();
    for (i, w) in works.iter().enumerate() {
        let file = dir.join(format!("bench-floor-{i}.bundle"));
        std::fs::write(&file, &w.bundle).expect("write bundle");
        let start = Instant::now();
        git(
            &floor,
            &["bundle", "unbundle", file.to_str().expect("utf-8")],
        );
        git(
            &floor,
            &["update-ref", &format!("refs/floor/{i}"), &w.commit],
        );
        let base = &w.assignment.base_commit;
        let tree = git(
            &floor,
            &[
                "merge-tree",
                "--write-tree",
                &format!("--merge-base={base}"),
                &tip,
                &w.commit,
            ],
        );
        let tree = tree.lines().next().expect("tree").to_owned();
        let new = git(
            &floor,
            &[
                "commit-tree",
                &tree,
                "-p",
                &tip,
                "-m",
                &w.assignment.task_id,
            ],
        );
        git(&floor, &["update-ref", &refname, &new, &tip]);
        xs.push(start.elapsed());
        tip = new;
        // The server lets git tidy its packs every 20 bundles, off the request path: so does
        // the floor, untimed.
        if (i + 1) % 20 == 0 {
            git(
                &floor,
                &["-c", "gc.autoPackLimit=10", "gc", "--auto", "--quiet"],
            );
        }
    }
    xs
}

pub async fn integration(floors: &crate::floors::Floors, quick: bool) {
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let n: usize = if quick { 20 } else { 200 };
    let per_sim: usize = 50;
    let sims_n = (2 * n).div_ceil(per_sim);
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let mut sims = register_sims(
        &server.url,
        &repo.registration_token(),
        "i",
        sims_n,
        per_sim as u32,
    )
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (k, s) in sims.iter_mut().enumerate() {
        let (one_tx, mut one_rx) = tokio::sync::mpsc::unbounded_channel();
        s.forward_assignments(one_tx).await;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some((_, a)) = one_rx.recv().await {
                if tx.send((k, a)).is_err() {
                    return;
                }
            }
        });
    }
    admin.create_many(2 * n, 8, "integrate").await;
    let mut assignments = Vec::new();
    while assignments.len() < 2 * n {
        assignments.push(rx.recv().await.expect("assignment"));
    }
    let works = make_commits(&repo.repo(), repo.dir.path(), &assignments);
    let (one_by_one, queued) = works.split_at(n);
    let floor = Summary::of(git_floor(&repo.repo(), repo.dir.path(), "main", one_by_one));
    report(
        "floor: bare git per integration (unbundle, update-ref, merge-tree, commit-tree, update-ref)",
        floor,
        None,
        "-",
    );

    let mut watch = admin.watch().await;
    let (mut received, mut total) = (Vec::new(), Vec::new());
    for w in one_by_one {
        let start = Instant::now();
        let sim = &mut sims[w.sim];
        sim.complete(
            w.assignment.lease.clone().expect("lease"),
            pb::LeaseOutcome::Verified,
            Some(w.commit.clone()),
            w.bundle.clone(),
        )
        .await;
        received.push(start.elapsed());
        let task = w.assignment.task_id.clone();
        let (at, t) =
            wait_transition(&mut watch, |t| t.task_id == task && t.kind != "verified").await;
        assert_eq!(t.kind, "integrated", "task {task}: {}", t.message);
        total.push(at.duration_since(start));
    }
    report(
        "  of which the result call (bundle stored, task verified)",
        Summary::of(received),
        Some(("one git spawn", floors.git_spawn)),
        "-",
    );
    report(
        "integration, one at a time: result sent -> integrated (base moved)",
        Summary::of(total),
        Some(("bare git", floor)),
        "p50 <= 1.25x bare git",
    );

    let start = Instant::now();
    let senders: Vec<_> = queued
        .iter()
        .map(|w| {
            let mut sim: Sim = sims[w.sim].clone();
            let lease = w.assignment.lease.clone().expect("lease");
            let (commit, bundle) = (w.commit.clone(), w.bundle.clone());
            tokio::spawn(async move {
                sim.complete(lease, pb::LeaseOutcome::Verified, Some(commit), bundle)
                    .await;
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
    let mut landed = 0;
    let mut last = start;
    while landed < n {
        let (at, t) = wait_transition(&mut watch, |t| {
            t.kind == "integrated" || t.kind == "integration_failed"
        })
        .await;
        assert_eq!(t.kind, "integrated", "task {}: {}", t.task_id, t.message);
        landed += 1;
        last = at;
    }
    let secs = last.duration_since(start).as_secs_f64();
    println!(
        "integration, {n} results sent at once: all integrated in {secs:.2} s = {:.1} integrations/s  [goal: >= 50/s]",
        n as f64 / secs
    );
}
