//! The cost of a task against the backlog (issue 16): the same work on a server with no
//! backlog, with 100,000 blocked open tasks (all depending on one cancelled task, so never
//! leasable), and with 100,000 done tasks. Two figures in each: created → leased (as
//! `dispatch`), and the server's CPU time per task over a batch driven through added → leased
//! → completed → done by simulated runners. The no-backlog figures, from the same run, are the
//! floor of the other two.
//!
//! The blocked tasks are created through `CreateTasks`. The done tasks are created through
//! `CreateTasks` too, then, with the server stopped, marked done in the SQLite file with the
//! `sqlite3` CLI (each with the dev, verify and integrate runs and the history a landed task
//! has): landing 100,000 tasks through the integrator would take most of an hour. In every
//! case, the one without a backlog too, the figures are taken on a server started afresh on
//! its database after the backlog was made.

use std::path::Path;
use std::time::{Duration, Instant};

use pipeline_proto::v1 as pb;
use pipeline_tests::{Server, TestRepo};

use crate::common::{
    Admin, Sim, Summary, cpu_times, ms, register_sims, report_judged, verdict, wait_transition,
};
use crate::dispatch::{SERVER_FLAGS, created_to_leased};
use crate::integration::make_commits;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    None,
    Blocked,
    Done,
}

impl Case {
    fn name(self, size: usize) -> String {
        match self {
            Case::None => "no backlog".to_owned(),
            Case::Blocked => format!("{size} blocked open tasks"),
            Case::Done => format!("{size} done tasks"),
        }
    }
}

/// What one case measured.
struct Figures {
    latency: Summary,
    /// Server CPU per task, its own and its git children's.
    cpu: (Duration, Duration),
}

pub async fn backlog(quick: bool) {
    let size = if quick { 2_000 } else { 100_000 };
    let latency_n = if quick { 50 } else { 1_000 };
    let batch = if quick { 20 } else { 500 };
    let mut floor: Option<Figures> = None;
    for case in [Case::None, Case::Blocked, Case::Done] {
        let name = case.name(size);
        let f = measure(case, size, latency_n, batch).await;
        let (own, children) = f.cpu;
        let lat_ok =
            f.latency.p50 <= Duration::from_millis(2) && f.latency.p99 <= Duration::from_millis(10);
        match &floor {
            None => {
                report_judged(
                    &format!("backlog, {name}: created -> leased"),
                    f.latency,
                    "p50 <= 2 ms, p99 <= 10 ms",
                    lat_ok,
                );
                println!(
                    "backlog, {name}: server CPU per task, added -> done: {} (+ {} in its git \
                     processes; {batch} tasks)  [goal: the floor of the backlog cases]",
                    ms(own),
                    ms(children)
                );
            }
            Some(base) => {
                let lat_ratio = ratio(f.latency.p50, base.latency.p50);
                let cpu_ratio = ratio(own, base.cpu.0);
                println!(
                    "backlog, {name}: created -> leased: {}; p50 = {lat_ratio:.2}x no backlog \
                     (p50 {})  [goal: p50 <= 1.5x no backlog, p50 <= 2 ms, p99 <= 10 ms: {}]",
                    f.latency,
                    ms(base.latency.p50),
                    verdict(lat_ok && lat_ratio <= 1.5)
                );
                println!(
                    "backlog, {name}: server CPU per task, added -> done: {} (+ {} in its git \
                     processes; {batch} tasks) = {cpu_ratio:.2}x no backlog ({})  \
                     [goal: <= 1.5x no backlog: {}]",
                    ms(own),
                    ms(children),
                    ms(base.cpu.0),
                    verdict(cpu_ratio <= 1.5)
                );
            }
        }
        if case == Case::None {
            floor = Some(f);
        }
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// One case on a server of its own: the backlog, then the latency, then the CPU batch.
async fn measure(case: Case, size: usize, latency_n: usize, batch: usize) -> Figures {
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let start = Instant::now();
    match case {
        Case::None => {}
        Case::Blocked => {
            let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
            let blocker = admin.create("backlog: the blocker".to_owned()).await;
            let on = blocker.clone();
            admin
                .seed(size, 10_000, move |i| backlog_task(i, vec![on.clone()]))
                .await;
            admin.cancel(&blocker).await;
        }
        Case::Done => {
            let admin = Admin::connect(&server.url, repo.admin_token()).await;
            admin.seed(size, 10_000, |i| backlog_task(i, vec![])).await;
        }
    }
    // Every case measures a server started afresh on its database (the done tasks are
    // marked done while it is stopped), so that only the backlog differs.
    assert!(server.terminate().success(), "the server stopped cleanly");
    if case == Case::Done {
        mark_done(&repo.state_dir().join("pipeline.db"));
    }
    let server = Server::start(&repo, SERVER_FLAGS);
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let before = admin.status().await;
    let (open, done) = match case {
        Case::None => (0, 0),
        Case::Blocked => (size as u64, 0),
        Case::Done => (0, size as u64),
    };
    assert_eq!(
        (before.open, before.done),
        (open, done),
        "the backlog is in place"
    );
    if case != Case::None {
        println!(
            "backlog, {}: seeded in {:.1} s",
            case.name(size),
            start.elapsed().as_secs_f64()
        );
    }
    // The latency first: its runners end with every slot full, so the batch's tasks go to
    // the batch's runners.
    let latency = created_to_leased(&server, &repo, latency_n, "b").await;
    let cpu = cpu_per_task(&server, &repo, batch).await;
    let after = admin.status().await;
    assert_eq!(
        (after.open, after.done, after.in_progress),
        (open, done + batch as u64, (latency_n + 20) as u64),
        "the backlog was left alone: only the measured tasks moved"
    );
    Figures { latency, cpu }
}

/// The i-th task of a backlog.
fn backlog_task(i: usize, depends_on: Vec<String>) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest {
        title: format!("backlog task {i}"),
        description: format!(
            "Backlog task {i}: change the greeting in README to say hello to number {i}, \
             and nothing else."
        ),
        priority: Some((i % 5) as u32),
        depends_on,
        ..Default::default()
    }
}

/// Marks every open task of the stopped server's database done, with the runs and history a
/// landed task has (a dev, a verify and an integrate run; leased, verified, integrated).
fn mark_done(db: &Path) {
    let sql = "PRAGMA busy_timeout = 10000;
        BEGIN IMMEDIATE;
        INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, started_at,
                          finished_at)
          SELECT id, phase, 1, 1, 'seed', 'success', created_at, created_at + 1000
          FROM tasks, (SELECT 'dev' AS phase UNION ALL SELECT 'verify'
                       UNION ALL SELECT 'integrate')
          WHERE status = 'open';
        INSERT INTO task_events (task_id, at, kind, from_status, to_status, message)
          SELECT id, created_at + 1000, kind, from_status, to_status, message
          FROM tasks, (SELECT 'leased' AS kind, 'open' AS from_status,
                         'in_progress' AS to_status, 'leased to seed (epoch 1)' AS message
                       UNION ALL SELECT 'verified', 'in_progress', 'verified', 'verified'
                       UNION ALL SELECT 'integrated', 'verified', 'done', 'integrated')
          WHERE status = 'open';
        UPDATE tasks SET status = 'done', patchset = 1, lease_epoch = 1,
          version = version + 3, updated_at = created_at + 1000
          WHERE status = 'open';
        COMMIT;";
    let out = std::process::Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .unwrap_or_else(|e| {
            panic!("the backlog benchmark seeds done tasks with the sqlite3 CLI; install it: {e}")
        });
    assert!(
        out.status.success(),
        "sqlite3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Server CPU time per task, its own and its git children's, over `batch` tasks created one
/// call each (8 callers), leased by simulated runners, completed with a one-commit bundle each
/// and landed. The time the harness spends writing the commits is left out.
async fn cpu_per_task(server: &Server, repo: &TestRepo, batch: usize) -> (Duration, Duration) {
    let per_sim = 50;
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let mut sims: Vec<Sim> = register_sims(
        &server.url,
        &repo.registration_token(),
        "c",
        batch.div_ceil(per_sim),
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
    let mut watch = admin.watch().await;
    let pid = server.pid();

    let (own0, children0) = cpu_times(pid);
    admin.create_many(batch, 8, "batch").await;
    let mut assignments = Vec::with_capacity(batch);
    while assignments.len() < batch {
        let got = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("an assignment within 60 s")
            .expect("assignments");
        assignments.push(got);
    }
    let (own1, children1) = cpu_times(pid);

    let works = make_commits(&repo.repo(), repo.dir.path(), &assignments);

    let (own2, children2) = cpu_times(pid);
    let senders: Vec<_> = works
        .into_iter()
        .map(|w| {
            let mut sim = sims[w.sim].clone();
            let lease = w.assignment.lease.expect("lease");
            tokio::spawn(async move {
                sim.complete(lease, pb::LeaseOutcome::Verified, Some(w.commit), w.bundle)
                    .await;
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
    for _ in 0..batch {
        let (_, t) = wait_transition(&mut watch, |t| {
            t.kind == "integrated" || t.kind == "integration_failed"
        })
        .await;
        assert_eq!(t.kind, "integrated", "task {}: {}", t.task_id, t.message);
    }
    let (own3, children3) = cpu_times(pid);
    let per = |d: Duration| d / u32::try_from(batch).expect("a small batch");
    (
        per((own1 - own0) + (own3 - own2)),
        per((children1 - children0) + (children3 - children2)),
    )
}
