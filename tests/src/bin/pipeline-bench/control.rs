//! The control API: `status` one call at a time (latency against a raw TCP round trip) and
//! from many concurrent callers (requests per second), on a server holding a queue of tasks;
//! and the server's resident memory with 1,000 runners connected and 100,000 tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, Summary, register_sims, report, rss, time_each};
use crate::dispatch::SERVER_FLAGS;
use crate::floors::Floors;

pub async fn status(floors: &Floors, quick: bool) {
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let tasks = if quick { 500 } else { 10_000 };
    let admin = Admin::connect(&server.url, repo.admin_token()).await;
    admin.create_many(tasks, 8, "status").await;
    let n = if quick { 2_000 } else { 20_000 };
    // The caller is built like `pipelinectl`: a current-thread runtime of its own.
    let (url, token) = (server.url.clone(), repo.admin_token());
    let xs = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let admin = Admin::connect(&url, token).await;
            timed_status_calls(&admin, n).await
        })
    })
    .join()
    .expect("caller thread");
    report(
        &format!("control RPC status, one caller (like pipelinectl), {tasks} tasks queued"),
        Summary::of(xs),
        Some(("TCP round trip", floors.tcp)),
        "p50 <= 1.5x TCP round trip",
    );
    // The same from a multi-threaded caller: the wakeups between its threads are the difference.
    report(
        "  the same from a caller on a multi-threaded runtime",
        Summary::of(timed_status_calls(&admin, n).await),
        Some(("TCP round trip", floors.tcp)),
        "-",
    );

    let connections = 4;
    let per_connection = 16;
    let window = Duration::from_secs(if quick { 1 } else { 5 });
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..connections {
        let admin = Admin::connect(&server.url, repo.admin_token()).await;
        for _ in 0..per_connection {
            let mut admin = admin.clone();
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            callers.push(tokio::spawn(async move {
                let mut xs = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    admin.status().await;
                    xs.push(start.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                xs
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = done.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let count = done.load(Ordering::Relaxed) - before;
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for c in callers {
        all.extend(c.await.expect("caller"));
    }
    println!(
        "control RPC status, {} concurrent callers on {connections} connections: {:.0} requests/s; \
         latency under load {}  [goal: >= 30,000 requests/s]",
        connections * per_connection,
        count as f64 / secs,
        Summary::of(all)
    );
}

/// `n` status calls one after another (after 200 unmeasured), each timed.
async fn timed_status_calls(admin: &Admin, n: usize) -> Vec<Duration> {
    for _ in 0..200 {
        admin.clone().status().await;
    }
    time_each(n, |_| {
        let mut a = admin.clone();
        async move {
            a.status().await;
        }
    })
    .await
}

pub async fn memory(quick: bool) {
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let runners = if quick { 100 } else { 1_000 };
    let tasks = if quick { 5_000 } else { 100_000 };
    let admin = Admin::connect(&server.url, repo.admin_token()).await;
    let sims = register_sims(&server.url, &repo.registration_token(), "m", runners, 1).await;
    let mut streams = Vec::new();
    for mut s in sims {
        streams.push(s.open().await);
    }
    let start = Instant::now();
    admin.create_many(tasks, 32, "memory").await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "task creation, 32 concurrent callers: {tasks} tasks in {secs:.1} s = {:.0} tasks/s",
        tasks as f64 / secs
    );
    let mut a = admin.clone();
    let s = a.status().await;
    assert_eq!(s.runners, runners as u64, "every runner is connected");
    assert_eq!(
        s.open + s.in_progress,
        tasks as u64,
        "every task is queued or leased"
    );
    let (now, peak) = rss(server.pid());
    println!(
        "memory: server RSS {:.1} MB (peak {:.1} MB) with {runners} runners connected and {tasks} tasks ({} leased)  [goal: <= 150 MB]",
        now as f64 / 1e6,
        peak as f64 / 1e6,
        s.in_progress
    );
    drop(streams);
}
