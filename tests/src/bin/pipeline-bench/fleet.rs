//! A big fleet (issue 16): 10,000 simulated runners, each on its own connection with its work
//! stream and its heartbeat stream open (as `pipeline-runner` keeps them), heartbeating at the
//! interval the server gives them (a third of the lease TTL: 10 s for `--lease-ttl 30`), spread
//! evenly. The figures are the server's CPU time over three intervals and what the connections
//! add to its resident memory (after they are all in their rhythm, against before the first
//! registered).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use pipeline_tests::{Server, TestRepo};

use crate::common::{Summary, cpu_time, register_sims, rss, verdict};

/// The soft limit on open files of this process (the server inherits it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub async fn fleet(quick: bool) {
    let (n, ttl) = if quick { (200, 3) } else { (10_000, 30) };
    // Each runner is a socket here and one in the server, and the server needs some for
    // itself (the database, git, the listener).
    if let Some(limit) = open_files_limit() {
        assert!(
            limit >= n as u64 + 500,
            "the fleet benchmark needs {} open files (ulimit -n is {limit}); raise it",
            n + 500
        );
    }
    let ttl = ttl.to_string();
    let connections = (n + 1_000).to_string();
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--lease-ttl",
            &ttl,
            "--max-registrations-per-minute",
            "1000000",
            "--max-registrations-per-address",
            "1000000",
            "--max-connections",
            &connections,
            "--no-verify",
        ],
    );
    let pid = server.pid();
    let (rss_before, _) = rss(pid);
    let start = Instant::now();
    let sims = register_sims(&server.url, &repo.registration_token(), "f", n, 1).await;
    let registered = start.elapsed();
    let interval = sims[0].heartbeat_interval;
    assert!(
        sims.iter().all(|s| s.heartbeat_interval == interval),
        "one interval for the whole fleet"
    );

    let (rss_registered, _) = rss(pid);

    // Every runner opens its work stream (64 at a time), then its heartbeat stream, and beats
    // every interval from its own offset.
    let t0 = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let opening: Vec<_> = sims
        .into_iter()
        .map(|mut s| {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                let work = s.open().await;
                (s, work)
            })
        })
        .collect();
    let mut works = Vec::with_capacity(n);
    let mut sims = Vec::with_capacity(n);
    for o in opening {
        let (s, work) = o.await.expect("a work stream opened");
        works.push(work);
        sims.push(s);
    }
    let (rss_work, _) = rss(pid);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut opened = Vec::with_capacity(n);
    let first = Instant::now() + interval;
    for (i, mut s) in sims.into_iter().enumerate() {
        let (gate, latencies, mut stop) = (Arc::clone(&gate), Arc::clone(&latencies), stop.clone());
        let offset = interval.mul_f64(i as f64 / n as f64);
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore");
            let mut beats = s.beats().await;
            drop(permit);
            let _ = ready_tx.send(());
            let mut tick = tokio::time::interval_at((first + offset).into(), interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let sent = Instant::now();
                if !beats.beat(vec![]).await {
                    return;
                }
                latencies.lock().expect("lock").push(sent.elapsed());
            }
        });
        opened.push(ready);
    }
    for r in opened {
        r.await.expect("a runner connected");
    }
    let connected = t0.elapsed();
    // Into the rhythm: every runner has beaten once.
    tokio::time::sleep((first + interval).saturating_duration_since(Instant::now())).await;
    let (rss_connected, _) = rss(pid);
    let window = interval * 3;
    latencies.lock().expect("lock").clear();
    let cpu0 = cpu_time(pid);
    let w0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = cpu_time(pid) - cpu0;
    let wall = w0.elapsed();
    let (rss_after, peak) = rss(pid);
    let _ = stop_tx.send(true);
    let beats = Summary::of(std::mem::take(&mut *latencies.lock().expect("lock")));
    let share = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    println!(
        "fleet, {n} runners registered in {:.1} s, their streams opened in {:.1} s",
        registered.as_secs_f64(),
        connected.as_secs_f64()
    );
    println!(
        "fleet, {n} runners heartbeating every {:.0} s (lease TTL {ttl} s): server CPU {share:.2}% of one core over {:.1} s ({} beats, {:.0}/s); heartbeat {beats}  [goal: <= 12% of one core: {}]",
        interval.as_secs_f64(),
        wall.as_secs_f64(),
        beats.n,
        beats.n as f64 / wall.as_secs_f64(),
        verdict(share <= 12.0)
    );
    let added = rss_after.max(rss_connected).saturating_sub(rss_before);
    let mb = |b: u64| b as f64 / 1e6;
    let per = |b: u64| b as f64 / n as f64 / 1e3;
    println!(
        "fleet, {n} runners connected: server RSS {:.1} MB, {:.1} MB more than before they came \
         (peak {:.1} MB; per runner {:.1} KB: {:.1} KB its connection after registering, \
         {:.1} KB its work stream, {:.1} KB its heartbeat stream)  \
         [goal: <= 35 KB a connected runner: {}]",
        mb(rss_after),
        mb(added),
        mb(peak),
        per(added),
        per(rss_registered.saturating_sub(rss_before)),
        per(rss_work.saturating_sub(rss_registered)),
        per(rss_after.max(rss_connected).saturating_sub(rss_work)),
        verdict(added as f64 / n as f64 <= 35e3)
    );
    drop(works);
    assert!(
        beats.n as f64 >= 2.5 * n as f64,
        "every runner beat in the window ({} beats from {n} runners)",
        beats.n
    );
}
