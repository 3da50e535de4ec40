//! Memory and limits: what one client can make the server hold, and requests that must fit
//! the server's message limit.

use pipeline_tests::{Server, TestRepo};

/// `task add --from-file` batches by the bytes a request carries, not by count only: a
/// thousand lines at the fields' limits (long titles, sixteen long labels, many dependencies)
/// make more than the server's 4 MiB and are sent in several requests, all created. A line
/// too large for any request is refused before anything is sent, exit 2, naming the line
/// and its size (it was exit 5, "cannot reach the server", after 100 MB were sent).
#[test]
fn tasks_from_a_file_are_batched_by_bytes_and_a_huge_line_is_named() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let dep = "d".repeat(64);
    server.add(&["--title", "the dependency", "--id", &dep]);
    let labels: Vec<String> = (0..16)
        .map(|i| format!("\"k{i}={}\"", "v".repeat(120)))
        .collect();
    let deps = vec![format!("\"{dep}\""); 16].join(", ");
    let mut lines = String::new();
    for i in 0..1000 {
        lines.push_str(&format!(
            "{{\"title\": \"{i:04} {}\", \"description\": \"{}\", \"requires\": [{}], \
             \"depends_on\": [{deps}]}}\n",
            "t".repeat(1000),
            "d".repeat(1000),
            labels.join(", "),
        ));
    }
    assert!(lines.len() > 4_400_000, "{} bytes", lines.len());
    let file = repo.dir.path().join("tasks.jsonl");
    std::fs::write(&file, &lines).expect("write");
    let out = server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("utf-8")])
        .ok();
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 1000, "every line created");
    assert_eq!((ids[0], ids[999]), ("t-1", "t-1000"));
    let last = server.show("t-1000");
    assert!(
        last["title"]
            .as_str()
            .is_some_and(|t| t.starts_with("0999 ")),
        "in order: {}",
        last["title"]
    );
    assert_eq!(last["depends_on"], serde_json::json!([dep]));

    let huge = repo.dir.path().join("huge.jsonl");
    let big = format!(
        "{{\"title\": \"huge\", \"description\": \"{}\"}}",
        "x".repeat(100_000_000)
    );
    std::fs::write(&huge, format!("{{\"title\": \"small\"}}\n{big}\n")).expect("write");
    let line = server
        .ctl(&["task", "add", "--from-file", huge.to_str().expect("utf-8")])
        .refused(2, "line 2");
    assert!(line.contains(&format!("{} bytes", big.len())), "{line}");
    assert!(line.contains("no task was created"), "{line}");
    let listed = server.ctl(&["task", "list", "--json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1001), "nothing more");
}

/// `VmHWM` (the peak resident memory) of a process, in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        / 1024
}

/// Lines of 1 KB a flood ships: 200 MiB.
const FLOOD_LINES: u64 = 200 * 1024;

/// Ships a flood of [`FLOOD_LINES`] lines for `lease`, numbered from 1, in batches of 2,000
/// (2 MiB, a runner's largest), each call answered once its lines are stored.
fn ship_flood(
    fake: &mut pipeline_tests::fake_runner::FakeRunner,
    lease: &pipeline_proto::v1::LeaseRef,
) {
    use pipeline_proto::v1 as pb;
    let pad = "x".repeat(1000);
    let mut seq = 1;
    while seq <= FLOOD_LINES {
        let n = 2_000.min(FLOOD_LINES + 1 - seq);
        let lines = (seq..seq + n)
            .map(|s| pb::LogLine {
                seq: s,
                at_ms: 0,
                stream: pb::LogStream::Stdout.into(),
                phase: pb::RunPhase::Dev.into(),
                text: format!("line {s} {pad}"),
            })
            .collect();
        fake.append_logs(lease.clone(), lines).expect("stored");
        seq += n;
    }
}

/// Reads a `logs --follow` stream until it has delivered `count` flood lines; their numbers,
/// in the order they came.
async fn read_flood(
    stream: &mut tonic::Streaming<pipeline_proto::v1::TaskLogsResponse>,
    count: u64,
) -> Vec<u64> {
    use pipeline_proto::v1 as pb;
    use prost::Message as _;
    let mut got = Vec::with_capacity(count as usize);
    while (got.len() as u64) < count {
        let msg = tokio::time::timeout(pipeline_tests::DEADLINE, stream.message())
            .await
            .expect("a message within the deadline")
            .expect("the stream is fine")
            .expect("a follow stream goes on");
        if let Some(pb::task_logs_response::Kind::EncodedLines(bytes)) = msg.kind {
            let batch = pb::LogBatch::decode(bytes.as_ref()).expect("a batch");
            got.extend(batch.lines.iter().filter_map(|l| {
                l.text
                    .strip_prefix("line ")
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
            }));
        }
    }
    got
}

/// One `logs --follow` that stops reading (a client that opens the stream and never polls it)
/// pinned every log batch published meanwhile: the server's memory grew by the whole log (13
/// to 1,045 MiB for 1 GiB). A follower now holds at most its byte budget; past it, what it
/// held is dropped and it catches up from storage. Here a runner ships 200 MiB with a follower
/// that reads along, then 200 MiB more with one that never reads: the server's peak memory may
/// grow by at most 64 MiB between the two (the stalled follower's 8 MiB budget and a handful
/// of 2 MiB batches on their way to it, about 24 MiB, and as much again for the allocator's
/// slack); it grew by the whole flood before. Then the stalled follower reads again and gets
/// every line, in order, once.
#[test]
fn a_stalled_follower_holds_a_bounded_amount_and_still_gets_every_line() {
    use pipeline_proto::v1 as pb;
    let repo = TestRepo::new();
    // The fake runner sends no heartbeats while it ships: its lease must outlast a flood's
    // storing (over 30 s on PostgreSQL on a loaded machine).
    let server = Server::start(
        &repo,
        &[
            "--log-cap-bytes",
            "1073741824",
            "--max-retries",
            "1",
            "--lease-ttl",
            "10m",
        ],
    );
    let mut fake = pipeline_tests::fake_runner(&repo, &server);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt
        .block_on(pb::control_service_client::ControlServiceClient::connect(
            server.url.clone(),
        ))
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let follow = |id: &str| {
        let request = pipeline_tests::fake_runner::authorized(
            &repo.admin_token(),
            pb::TaskLogsRequest {
                id: id.to_owned(),
                follow: true,
            },
        );
        let mut client = client.clone();
        rt.block_on(client.task_logs(request))
            .expect("follow")
            .into_inner()
    };

    // A flood with a follower that reads along: the server's peak memory for it.
    let along = server.add(&["--title", "read along"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let mut reading = follow(&along);
    let reader = rt.spawn(async move { read_flood(&mut reading, FLOOD_LINES).await.len() });
    ship_flood(&mut fake, &lease);
    assert_eq!(rt.block_on(reader).expect("reader") as u64, FLOOD_LINES);
    let before = peak_mib(server.pid());
    fake.complete(lease, pb::LeaseOutcome::DevFailed, None, vec![])
        .expect("done with it");

    // The same flood with a follower that reads nothing while the whole log is stored.
    let stalled_task = server.add(&["--title", "stalled"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let mut stalled = follow(&stalled_task);
    ship_flood(&mut fake, &lease);
    let after = peak_mib(server.pid());
    eprintln!(
        "server peak memory: {before} MiB with a follower reading along, {after} MiB with a stalled one"
    );
    assert!(
        after < before + 64,
        "the server's peak memory went from {before} MiB to {after} MiB with a stalled follower"
    );

    // Now it reads: every line, in order, once.
    let got = rt.block_on(read_flood(&mut stalled, FLOOD_LINES));
    assert!(
        got.iter().copied().eq(1..=FLOOD_LINES),
        "every line, in order, once: {} lines, first out of order at {:?}",
        got.len(),
        got.iter().zip(1..).find(|(g, want)| **g != *want)
    );
}
