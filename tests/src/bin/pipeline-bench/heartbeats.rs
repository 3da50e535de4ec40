//! Heartbeats: 1,000 simulated runners, each on its own connection with its work stream and
//! heartbeat stream open (as `pipeline-runner` keeps them), heartbeat once a second (a 3 s
//! lease TTL); the server's CPU time over a window of that is the figure. Meanwhile a few runners holding leases fall silent and drop their connection
//! (as a killed runner does); the time from each one's last heartbeat to its lease's
//! `lease_lost` transition is the detection figure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline_proto::v1 as pb;
use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, Summary, cpu_time, register_sims, report, wait_transition};

pub async fn heartbeats(quick: bool) {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--lease-ttl",
            "3",
            "--max-registrations-per-minute",
            "1000000",
            "--max-registrations-per-address",
            "1000000",
            "--no-verify",
        ],
    );
    let interval = Duration::from_secs(1);
    let n = if quick { 100 } else { 1_000 };
    let victims_n = if quick { 2 } else { 5 };
    let window = Duration::from_secs(if quick { 3 } else { 10 });
    let token = repo.registration_token();
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let mut watch = admin.watch().await;

    // The victims take one lease each before the others connect.
    let victims = register_sims(&server.url, &token, "victim", victims_n, 1).await;
    let mut victim_works = Vec::new();
    for mut v in victims {
        let work = v.open().await;
        victim_works.push((v, work));
    }
    let mut leased = Vec::new();
    for (i, (v, work)) in victim_works.iter_mut().enumerate() {
        let id = admin.create(format!("victim {i}")).await;
        let lease = loop {
            let m = work.message().await.expect("push").expect("open");
            if let Some(pb::work_message::Kind::Assignment(a)) = m.kind {
                break a;
            }
        };
        assert_eq!(lease.task_id, id);
        leased.push((v.clone(), lease));
    }

    // The load: n runners heartbeating every interval, evenly spread.
    let sims = register_sims(&server.url, &token, "hb", n, 1).await;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut streams = Vec::new();
    for (i, mut s) in sims.into_iter().enumerate() {
        streams.push(s.open().await);
        let mut beats = s.beats().await;
        let latencies = Arc::clone(&latencies);
        let stop = stop.clone();
        let offset = interval.mul_f64(i as f64 / n as f64);
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if *stop.borrow() {
                    return;
                }
                let start = Instant::now();
                if !beats.beat(vec![]).await {
                    return;
                }
                latencies.lock().expect("lock").push(start.elapsed());
            }
        });
    }
    // The victims heartbeat with their lease until they die, staggered across the window.
    let mut deaths = Vec::new();
    for (k, (mut v, a)) in leased.into_iter().enumerate() {
        let lifetime = window.mul_f64((k + 1) as f64 / (victims_n + 1) as f64);
        let lease = a.lease.expect("lease");
        let mut beats = v.beats().await;
        deaths.push(tokio::spawn(async move {
            let born = Instant::now();
            let mut last = Instant::now();
            let mut tick = tokio::time::interval(interval);
            while born.elapsed() < lifetime {
                tick.tick().await;
                assert!(beats.beat(vec![lease.clone()]).await, "heartbeat failed");
                last = Instant::now();
            }
            (a.task_id, last)
        }));
    }
    drop(victim_works); // their work streams close: the connection of a killed runner
    tokio::time::sleep(Duration::from_secs(2)).await; // every load runner is in its rhythm
    let cpu0 = cpu_time(server.pid());
    let t0 = Instant::now();
    latencies.lock().expect("lock").clear();
    tokio::time::sleep(window).await;
    let cpu = cpu_time(server.pid()) - cpu0;
    let wall = t0.elapsed();
    let beats = Summary::of(std::mem::take(&mut *latencies.lock().expect("lock")));
    println!(
        "heartbeats, {n} runners at 1/s: server CPU {:.2}% of one core over {:.1} s ({} beats, {:.0}/s); \
         heartbeat RPC {beats}  [goal: <= 5% of one core]",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        wall.as_secs_f64(),
        beats.n,
        beats.n as f64 / wall.as_secs_f64()
    );
    let mut detection = Vec::new();
    for d in deaths {
        let (task, last) = d.await.expect("victim");
        let (at, _) =
            wait_transition(&mut watch, |t| t.task_id == task && t.kind == "lease_lost").await;
        detection.push(at.duration_since(last));
    }
    report(
        "dead runner detected: last heartbeat -> lease_lost",
        Summary::of(detection),
        None,
        "<= 3 intervals + 1 s = 4 s",
    );
    let _ = stop_tx.send(true);
    drop(streams);
}
