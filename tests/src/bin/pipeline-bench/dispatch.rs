//! Dispatch latency (a task becomes eligible → an idle connected runner holds its lease) and
//! lease throughput (100 simulated runners take a queue of tasks as fast as the server hands
//! them out), with one database transaction per lease and with batched commits.

use std::time::{Duration, Instant};

use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, Sim, Summary, channel, register_sims, report};
use crate::floors::Floors;

/// Flags every benchmark server gets: long leases (nothing expires mid-run) and no cap on
/// registrations (hundreds of simulated runners register at once, all from 127.0.0.1).
pub const SERVER_FLAGS: &[&str] = &[
    "--lease-ttl",
    "600",
    "--max-registrations-per-minute",
    "1000000",
    "--max-registrations-per-address",
    "1000000",
    "--no-verify",
];

pub async fn latency(floors: &Floors, quick: bool) {
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let n: usize = if quick { 100 } else { 1_000 };
    report(
        "dispatch latency: create task sent -> its lease pushed to an idle runner",
        created_to_leased(&server, &repo, n, "d").await,
        Some(("fsync", floors.fsync)),
        "p50 <= 2 ms, p99 <= 10 ms",
    );
}

/// Created → leased, `n` times after 20 warm-ups: enough idle runners (64 slots each, named
/// `<prefix>-<i>`) wait with their work streams open; one task is created at a time and timed
/// from sending `CreateTask` to its assignment arriving on a runner's stream. Each leased task
/// stays leased, and the runners have exactly as many slots as there are tasks, so that they
/// end full and take nothing after.
pub async fn created_to_leased(
    server: &Server,
    repo: &TestRepo,
    n: usize,
    prefix: &str,
) -> Summary {
    let warm = 20;
    let (full, rest) = ((n + warm) / 64, (n + warm) % 64);
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let token = repo.registration_token();
    let mut sims = register_sims(&server.url, &token, prefix, full, 64).await;
    if rest > 0 {
        let name = format!("{prefix}-rest");
        sims.push(Sim::register(channel(&server.url).await, &token, &name, rest as u32).await);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for mut s in sims {
        s.forward_assignments(tx.clone()).await;
    }
    let mut xs = Vec::with_capacity(n);
    for i in 0..n + warm {
        let start = Instant::now();
        let id = admin.create(format!("dispatch {i}")).await;
        let (at, a) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("an assignment within 30 s")
            .expect("assignments");
        assert_eq!(a.task_id, id, "the new task was the one leased");
        if i >= warm {
            xs.push(at.duration_since(start));
        }
    }
    Summary::of(xs)
}

/// 100 simulated runners connect to a server with a queue of tasks and take leases until every
/// slot is full; `extra` are extra server flags (the batch size).
pub async fn throughput(label: &str, extra: &[&str], goal: &str, quick: bool) {
    let repo = TestRepo::new();
    let mut flags = SERVER_FLAGS.to_vec();
    flags.extend_from_slice(extra);
    let server = Server::start(&repo, &flags);
    let runners = 100;
    let slots: u32 = if quick { 4 } else { 64 };
    let total = runners * slots as usize;
    let admin = Admin::connect(&server.url, repo.admin_token()).await;
    let sims = register_sims(&server.url, &repo.registration_token(), "l", runners, slots).await;
    admin.create_many(total, 16, "lease").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let opens: Vec<_> = sims
        .into_iter()
        .map(|mut s| {
            let tx = tx.clone();
            tokio::spawn(async move { s.forward_assignments(tx).await })
        })
        .collect();
    for o in opens {
        o.await.expect("open");
    }
    let mut arrivals = Vec::with_capacity(total);
    while arrivals.len() < total {
        let (at, _) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("an assignment within 120 s")
            .expect("assignments");
        arrivals.push(at);
    }
    arrivals.sort();
    let secs = arrivals[total - 1].duration_since(start).as_secs_f64();
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    println!(
        "lease throughput, {label}: {total} leases to {runners} runners in {secs:.3} s = {:.0} leases/s; \
         gap between leases {}  [goal: {goal}]",
        total as f64 / secs,
        Summary::of(gaps)
    );
}
