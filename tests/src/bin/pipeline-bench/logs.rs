//! Logs: durable ingest (lines/s, as one runner ships them: sequential batches of up to 5,000
//! lines; and from 4 senders at once), then follow latency with 100 followers attached (line
//! sent to the server → line delivered to each follower, so it includes both loopback hops: an
//! upper bound on the server's share). `follow-memory`: the server's memory with one follower
//! that never reads while a runner ships a flood of lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::control_service_client::ControlServiceClient;
use pipeline_proto::v1::runner_service_client::RunnerServiceClient;
use pipeline_tests::fake_runner::authorized;

use crate::common::{Admin, Sim, channel};
use pipeline_tests::{Server, TestRepo};
use tonic::transport::Channel;

fn summary(xs: Vec<Duration>) -> String {
    crate::common::Summary::of(xs).to_string()
}

fn line(seq: u64, text: String) -> pb::LogLine {
    pb::LogLine {
        seq,
        at_ms: 0,
        stream: pb::LogStream::Stdout.into(),
        phase: pb::RunPhase::Dev.into(),
        text,
    }
}

struct Lease {
    runner: RunnerServiceClient<Channel>,
    credential: String,
    runner_id: String,
    lease: pb::LeaseRef,
    task: String,
    _work: tonic::Streaming<pb::WorkMessage>,
}

/// Registers a runner and takes one lease on a new task.
async fn take_lease(server: &Server, repo: &TestRepo, name: &str) -> Lease {
    let token = repo.registration_token();
    let mut sim = Sim::register(channel(&server.url).await, &token, name, 1).await;
    let mut work = sim.open().await;
    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let task = admin.create(format!("bench {name}")).await;
    let lease = loop {
        match work.message().await.expect("push").and_then(|m| m.kind) {
            Some(pb::work_message::Kind::Assignment(a)) => break a.lease.expect("lease"),
            _ => continue,
        }
    };
    Lease {
        runner: sim.client,
        credential: sim.credential,
        runner_id: sim.id,
        lease,
        task,
        _work: work,
    }
}

/// Sends `lines` lines in batches of `batch`, numbered from `first`, one call at a time.
async fn ship(l: &mut Lease, first: u64, lines: u64, batch: u64) {
    let text = "x".repeat(80);
    let mut seq = first;
    while seq < first + lines {
        let n = batch.min(first + lines - seq);
        let req = pb::AppendLogsRequest {
            runner_id: l.runner_id.clone(),
            lease: Some(l.lease.clone()),
            lines: (seq..seq + n)
                .map(|s| line(s, format!("{s} {text}")))
                .collect(),
        };
        l.runner
            .append_logs(authorized(&l.credential, req))
            .await
            .expect("append");
        seq += n;
    }
}

pub async fn bench_logs(server: &Server, repo: &TestRepo, quick: bool) {
    let total: u64 = if quick { 50_000 } else { 1_000_000 };
    // Ingest, one sender.
    let mut one = take_lease(server, repo, "ingest-1").await;
    ship(&mut one, 1, 5_000, 5_000).await; // warm up
    let start = Instant::now();
    ship(&mut one, 5_001, total, 5_000).await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "logs ingest, one sender (batches of 5,000): {total} lines in {secs:.2} s = {:.0} lines/s",
        total as f64 / secs
    );
    // Ingest, four senders at once.
    let mut senders = Vec::new();
    for i in 0..4 {
        senders.push(take_lease(server, repo, &format!("ingest-4-{i}")).await);
    }
    let start = Instant::now();
    let per = total / 4;
    let handles: Vec<_> = senders
        .into_iter()
        .map(|mut l| tokio::spawn(async move { ship(&mut l, 1, per, 5_000).await }))
        .collect();
    for h in handles {
        h.await.expect("sender");
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "logs ingest, four senders: {} lines in {secs:.2} s = {:.0} lines/s",
        per * 4,
        (per * 4) as f64 / secs
    );

    // Follow latency, 100 followers.
    let followers_n = 100;
    let lines: u64 = if quick { 200 } else { 2_000 };
    let mut lease = take_lease(server, repo, "follow").await;
    let sent: Arc<Vec<std::sync::OnceLock<Instant>>> =
        Arc::new((0..=lines).map(|_| std::sync::OnceLock::new()).collect());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(followers_n);
    let mut followers = Vec::new();
    for _ in 0..followers_n {
        let url = server.url.clone();
        let task = lease.task.clone();
        let sent = Arc::clone(&sent);
        let ready = ready_tx.clone();
        let admin = repo.admin_token();
        followers.push(tokio::spawn(async move {
            let mut control = ControlServiceClient::connect(url).await.expect("connect");
            let mut stream = control
                .task_logs(authorized(
                    &admin,
                    pb::TaskLogsRequest {
                        id: task,
                        follow: true,
                    },
                ))
                .await
                .expect("follow")
                .into_inner();
            let mut latencies = Vec::with_capacity(lines as usize);
            while let Some(msg) = stream.message().await.expect("stream") {
                match msg.kind {
                    Some(pb::task_logs_response::Kind::Status(_)) => {
                        let _ = ready.send(()).await;
                    }
                    Some(pb::task_logs_response::Kind::EncodedLines(bytes)) => {
                        let now = Instant::now();
                        let batch: pb::LogBatch =
                            prost::Message::decode(bytes.as_ref()).expect("decode");
                        for l in batch.lines {
                            if let Some(at) = sent.get(l.seq as usize).and_then(|c| c.get()) {
                                latencies.push(now.duration_since(*at));
                            }
                            if l.seq == lines {
                                return latencies;
                            }
                        }
                    }
                    _ => {}
                }
            }
            latencies
        }));
    }
    for _ in 0..followers_n {
        ready_rx.recv().await.expect("ready");
    }
    let text = "y".repeat(80);
    for seq in 1..=lines {
        let req = pb::AppendLogsRequest {
            runner_id: lease.runner_id.clone(),
            lease: Some(lease.lease.clone()),
            lines: vec![line(seq, format!("{seq} {text}"))],
        };
        let _ = sent[seq as usize].set(Instant::now());
        lease
            .runner
            .append_logs(authorized(&lease.credential, req))
            .await
            .expect("append");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut all = Vec::new();
    for f in followers {
        all.extend(f.await.expect("follower"));
    }
    println!(
        "logs follow latency, {followers_n} followers, {lines} lines at ~1/ms: {}",
        summary(all)
    );
}

/// `VmHWM` (peak) and `VmRSS` of a process, in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Ships `mib` MiB of 1 KB lines in batches of 2,000 (2 MiB, a runner's largest).
async fn ship_mib(l: &mut Lease, mib: u64) {
    let text = "z".repeat(1000);
    let lines = mib * 1024;
    let mut seq = 1;
    while seq <= lines {
        let n = 2_000.min(lines + 1 - seq);
        let req = pb::AppendLogsRequest {
            runner_id: l.runner_id.clone(),
            lease: Some(l.lease.clone()),
            lines: (seq..seq + n)
                .map(|s| line(s, format!("{s} {text}")))
                .collect(),
        };
        l.runner
            .append_logs(authorized(&l.credential, req))
            .await
            .expect("append");
        seq += n;
    }
}

/// A follower that opens `logs --follow` and never reads: the server's memory over a flood of
/// log lines, with no follower and then with the stalled one.
async fn bench_stalled_follower(server: &Server, repo: &TestRepo, quick: bool) {
    let mib: u64 = if quick { 20 } else { 200 };
    let mut alone = take_lease(server, repo, "flood-alone").await;
    ship_mib(&mut alone, mib).await;
    let (before, rss_before) = memory_mib(server.pid());
    let mut followed = take_lease(server, repo, "flood-followed").await;
    let mut control = ControlServiceClient::connect(server.url.clone())
        .await
        .expect("connect");
    let _stalled = control
        .task_logs(authorized(
            &repo.admin_token(),
            pb::TaskLogsRequest {
                id: followed.task.clone(),
                follow: true,
            },
        ))
        .await
        .expect("follow")
        .into_inner();
    ship_mib(&mut followed, mib).await;
    let (after, rss_after) = memory_mib(server.pid());
    println!(
        "logs, one stalled follower: server peak {before} MiB after {mib} MiB of lines with no \
         follower, {after} MiB after {mib} MiB more with a follower that never reads (RSS \
         {rss_before} -> {rss_after} MiB)"
    );
}

pub async fn logs(quick: bool) {
    let repo = TestRepo::new();
    let server = Server::start(&repo, crate::dispatch::SERVER_FLAGS);
    bench_logs(&server, &repo, quick).await;
}

/// The server's memory with one follower that never reads (`follow-memory`).
pub async fn follow_memory(quick: bool) {
    let repo = TestRepo::new();
    let mut flags = crate::dispatch::SERVER_FLAGS.to_vec();
    flags.extend(["--log-cap-bytes", "1073741824"]);
    let server = Server::start(&repo, &flags);
    bench_stalled_follower(&server, &repo, quick).await;
}
