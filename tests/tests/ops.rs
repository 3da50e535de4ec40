//! What operators use, through the real server: `/metrics` (who may read it, and the families
//! after a task's life), `/healthz` and `/readyz` (and `/readyz` while another process holds
//! the database's write lock, with the gRPC health service following), the gRPC health service and server reflection (no token, while
//! the API keeps needing one), and the spans exported to an OTLP/HTTP collector, which carry
//! the task's ID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use pipeline_proto::v1 as pb;
use pipeline_tests::fake_runner::complete_messages;
use pipeline_tests::web::{client, get, http_url, login, send, viewer_token};
use pipeline_tests::{Server, TestRepo, fake_runner, runner, wait_for};

/// A server with the web page on, on `repo`, plus `extra` flags.
fn server(repo: &TestRepo, extra: &[&str]) -> (Server, String) {
    let mut flags = vec!["--http", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    let server = Server::start(repo, &flags);
    let url = http_url(&server);
    (server, url)
}

/// The value of the sample `name` (with its labels, as the text shows them), if there is one.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_need_a_credential_and_count_a_tasks_life() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let _runner = runner(&repo, &server, "r1");
    let id = server.add(&["--title", "measured"]);
    server.wait_status(&id, "done");

    let refused = send(client().get(format!("{http}/metrics")));
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.body.contains("no credential"), "{}", refused.body);
    let wrong = get(&format!("{http}/metrics"), "not-a-token");
    assert_eq!(wrong.status, 401, "{wrong:?}");

    let viewer = viewer_token(&repo);
    let m = get(&format!("{http}/metrics"), &viewer);
    assert_eq!(m.status, 200, "{m:?}");
    assert!(
        m.header("content-type")
            .starts_with("application/openmetrics-text"),
        "{}",
        m.header("content-type")
    );
    let text = &m.body;
    let has = |name: &str, at_least: f64| {
        let v = sample(text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert!(
            v >= at_least,
            "{name} = {v}, expected at least {at_least}:\n{text}"
        );
    };
    has("pipeline_tasks{status=\"done\"}", 1.0);
    assert_eq!(sample(text, "pipeline_tasks{status=\"open\"}"), Some(0.0));
    assert_eq!(
        sample(text, "pipeline_tasks_landed_total"),
        Some(1.0),
        "{text}"
    );
    has("pipeline_leases_total", 1.0);
    has("pipeline_dispatch_latency_seconds_count", 1.0);
    has(
        "pipeline_runs_total{phase=\"dev\",outcome=\"success\"}",
        1.0,
    );
    has("pipeline_run_duration_seconds_count{phase=\"dev\"}", 1.0);
    // The server's integrate run, ended with the task's landing, is timed too.
    has(
        "pipeline_runs_total{phase=\"integrate\",outcome=\"success\"}",
        1.0,
    );
    has(
        "pipeline_run_duration_seconds_count{phase=\"integrate\"}",
        1.0,
    );
    has("pipeline_trains_total{outcome=\"landed\"}", 1.0);
    has("pipeline_runners{state=\"idle\"}", 1.0);
    has("pipeline_log_lines_total", 1.0);
    has("pipeline_db_write_seconds_count", 1.0);
    assert_eq!(
        sample(text, "pipeline_db_errors_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(text, "pipeline_queue_paused"), Some(0.0));
    assert_eq!(sample(text, "pipeline_landing_paused"), Some(0.0));
    assert_eq!(sample(text, "pipeline_leader"), Some(1.0));
    // Known label values are there from the start, at zero or more.
    has("pipeline_integration_builds_total{result=\"green\"}", 0.0);
    has(
        "pipeline_runs_total{phase=\"dev\",outcome=\"infrastructure\"}",
        0.0,
    );

    // A paused queue shows; the admin's token and a browser's session read it too.
    server.ctl(&["queue", "pause"]).ok();
    let m = get(&format!("{http}/metrics"), &repo.admin_token());
    assert_eq!(m.status, 200);
    assert_eq!(
        sample(&m.body, "pipeline_queue_paused"),
        Some(1.0),
        "{}",
        m.body
    );
    let cookie = login(&http, &viewer);
    let m = send(
        client()
            .get(format!("{http}/metrics"))
            .header("cookie", cookie),
    );
    assert_eq!(m.status, 200, "{m:?}");
}

#[test]
fn metrics_count_a_failed_attempt_and_what_its_agent_used() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &["--backoff-base", "0"]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "costly"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let mut messages = complete_messages(
        &fake.id,
        lease,
        pb::LeaseOutcome::DevFailed,
        Some("the agent gave up".into()),
        1.0,
        None,
        vec![],
    );
    if let Some(pb::complete_lease_request::Kind::Header(h)) = &mut messages[0].kind {
        h.usage = Some(pb::Usage {
            agent: "claude".into(),
            model: Some("claude-sonnet-4-5".into()),
            input_tokens: 1000,
            cached_input_tokens: 800,
            cache_write_tokens: 50,
            output_tokens: 200,
            reasoning_tokens: 0,
            cost_cents: 30.0,
            cost_source: pb::CostSource::Reported.into(),
            complete: true,
            session_id: None,
        });
    }
    fake.complete_raw(messages)
        .expect("a dev failure with its usage");
    server.wait_task(&id, "its failed attempt", |t| t["failures"] == 1);
    let m = get(&format!("{http}/metrics"), &viewer_token(&repo));
    let text = &m.body;
    for (name, value) in [
        (
            "pipeline_runs_total{phase=\"dev\",outcome=\"task_failure\"}",
            1.0,
        ),
        (
            "pipeline_agent_cost_cents_total{agent=\"claude\",model=\"claude-sonnet-4-5\"}",
            30.0,
        ),
        (
            "pipeline_agent_tokens_total{agent=\"claude\",model=\"claude-sonnet-4-5\",kind=\"input\"}",
            1000.0,
        ),
        (
            "pipeline_agent_tokens_total{agent=\"claude\",model=\"claude-sonnet-4-5\",kind=\"output\"}",
            200.0,
        ),
        ("pipeline_tasks_landed_total", 0.0),
    ] {
        assert_eq!(sample(text, name), Some(value), "{name}:\n{text}");
    }
}

#[test]
fn a_verification_under_way_when_its_task_is_cancelled_is_counted_and_timed() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "cancelled while verifying"]);
    let lease = fake.next_assignment().lease.expect("lease");
    // The first line of the verify phase starts the lease's verify run on the server.
    let line = pb::LogLine {
        seq: 1,
        at_ms: 1_700_000_000_000,
        stream: pb::LogStream::Stdout.into(),
        phase: pb::RunPhase::Verify.into(),
        text: "cargo test".to_owned(),
    };
    fake.append_logs(lease, vec![line]).expect("a verify line");
    server.wait_task(&id, "its verify run", |t| {
        t["runs"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["phase"] == "verify"))
    });
    server.ctl(&["task", "cancel", &id]).ok();
    server.wait_status(&id, "cancelled");
    let text = get(&format!("{http}/metrics"), &viewer_token(&repo)).body;
    for (name, value) in [
        (
            "pipeline_runs_total{phase=\"dev\",outcome=\"cancelled\"}",
            1.0,
        ),
        ("pipeline_run_duration_seconds_count{phase=\"dev\"}", 1.0),
        (
            "pipeline_runs_total{phase=\"verify\",outcome=\"cancelled\"}",
            1.0,
        ),
        ("pipeline_run_duration_seconds_count{phase=\"verify\"}", 1.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name}:\n{text}");
    }
}

#[test]
fn health_needs_no_credential_and_metrics_public_serves_metrics_to_anyone() {
    let repo = TestRepo::new();
    let (_server, http) = server(&repo, &["--metrics-public"]);
    let healthz = send(client().get(format!("{http}/healthz")));
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));
    let readyz = send(client().get(format!("{http}/readyz")));
    assert_eq!((readyz.status, readyz.body.as_str()), (200, "ready\n"));
    let m = send(client().get(format!("{http}/metrics")));
    assert_eq!(m.status, 200, "{m:?}");
    assert_eq!(sample(&m.body, "pipeline_leader"), Some(1.0), "{}", m.body);
}

#[test]
fn metrics_public_needs_the_http_port() {
    let repo = TestRepo::new();
    let out = pipeline_tests::run(&mut Server::command(&repo, &["--metrics-public"]));
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains("--metrics-public needs --http ADDR"),
        "{}",
        out.stderr
    );
}

/// What the gRPC health service says of the empty service name (the server as a whole).
fn grpc_health(rt: &tokio::runtime::Runtime, url: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel);
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health")
            .into_inner()
            .status
    })
}

#[test]
fn readyz_says_when_the_database_takes_no_writes_and_recovers() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let ready = || send(client().get(format!("{http}/readyz")));
    assert_eq!(ready().status, 200);
    // Another process takes the database's write lock and keeps it (sqlite3's BEGIN
    // IMMEDIATE, or psql's lock on the row every PostgreSQL write locks first).
    let holder = repo.hold_write_lock();
    let refused = wait_for("readyz to refuse", || {
        let a = ready();
        (a.status == 503).then_some(a)
    });
    assert!(
        refused.body.starts_with("not ready: the database") && refused.body.ends_with('\n'),
        "{}",
        refused.body
    );
    assert_eq!(
        refused.body.lines().count(),
        1,
        "one line: {}",
        refused.body
    );
    // Health still says the process serves; gRPC health follows readiness.
    assert_eq!(send(client().get(format!("{http}/healthz"))).status, 200);
    wait_for("gRPC health to say NOT_SERVING", || {
        (grpc_health(&rt, &server.url) == ServingStatus::NotServing as i32).then_some(())
    });
    holder.release();
    wait_for("readyz to say ready again", || {
        (ready().status == 200).then_some(())
    });
    wait_for("gRPC health to say SERVING again", || {
        (grpc_health(&rt, &server.url) == ServingStatus::Serving as i32).then_some(())
    });
    // And the server works on.
    let _runner = runner(&repo, &server, "r1");
    let id = server.add(&["--title", "after the lock"]);
    server.wait_status(&id, "done");
}

#[test]
fn grpc_health_and_reflection_answer_without_a_token_and_the_api_still_needs_one() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel.clone());
        // The services' health is set once the server's first readiness check is done
        // (a moment after it listens; longer on PostgreSQL): until then a service is not
        // found. Each becomes SERVING within the deadline.
        let deadline = std::time::Instant::now() + pipeline_tests::DEADLINE;
        for service in [
            "",
            "pipeline.v1.ControlService",
            "pipeline.v1.RunnerService",
        ] {
            loop {
                let answer = health
                    .check(HealthCheckRequest {
                        service: service.to_owned(),
                    })
                    .await;
                let last = match answer {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => break,
                    Ok(r) => format!("{:?}", r.into_inner().status),
                    Err(e) if e.code() == tonic::Code::NotFound => e.to_string(),
                    Err(e) => panic!("health of {service:?}: {e}"),
                };
                assert!(
                    std::time::Instant::now() < deadline,
                    "health of {service:?} never SERVING: {last}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }

        let mut reflection = ServerReflectionClient::new(channel.clone());
        let ask = |request: MessageRequest| {
            tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            }])
        };
        let mut answers = reflection
            .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
            .await
            .expect("reflection")
            .into_inner();
        let listed = answers.message().await.expect("answer").expect("one");
        let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
            panic!("not a list: {listed:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for name in [
            "pipeline.v1.ControlService",
            "pipeline.v1.RunnerService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
        let mut answers = reflection
            .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
                "pipeline.v1.ControlService".to_owned(),
            )))
            .await
            .expect("reflection")
            .into_inner();
        let file = answers.message().await.expect("answer").expect("one");
        let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
            panic!("not a file: {file:?}");
        };
        let protos: Vec<prost_types::FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|b| prost::Message::decode(b.as_slice()).expect("a file descriptor"))
            .collect();
        let pipeline = protos
            .iter()
            .find(|p| p.package() == "pipeline.v1")
            .expect("the pipeline.v1 file");
        let methods: Vec<&str> = pipeline
            .service
            .iter()
            .find(|s| s.name() == "ControlService")
            .expect("ControlService")
            .method
            .iter()
            .map(|m| m.name())
            .collect();
        assert!(methods.contains(&"GetStatus"), "{methods:?}");

        // v1alpha, for older clients.
        {
            use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
            use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
            let mut old = ServerReflectionClient::new(channel.clone());
            let mut answers = old
                .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                }]))
                .await
                .expect("v1alpha reflection")
                .into_inner();
            let listed = answers.message().await.expect("answer").expect("one");
            let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
                panic!("not a list: {listed:?}");
            };
            assert!(
                list.service
                    .iter()
                    .any(|s| s.name == "pipeline.v1.ControlService")
            );
        }

        // The API itself still needs its token.
        let mut control =
            pipeline_proto::v1::control_service_client::ControlServiceClient::new(channel);
        let refused = control
            .get_status(pipeline_proto::v1::GetStatusRequest::default())
            .await
            .expect_err("no token");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    });
}

/// What an OTLP/HTTP collector was sent: each span's name and its string attributes.
type Spans = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// A tiny OTLP/HTTP collector on a free port: it answers every POST 200 and keeps the spans
/// of each `ExportTraceServiceRequest` (HTTP/1.1, keep-alive).
fn collector() -> (String, Spans) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let spans: Spans = Arc::default();
    let kept = Arc::clone(&spans);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || serve_otlp(conn, &kept));
        }
    });
    (url, spans)
}

fn serve_otlp(conn: std::net::TcpStream, kept: &Spans) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let mut writer = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(request) = <ExportTraceServiceRequest as prost::Message>::decode(body.as_slice())
        {
            let mut spans = kept.lock().unwrap_or_else(|e| e.into_inner());
            for span in request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
                        _ => None,
                    })
                    .collect();
                spans.push((span.name.clone(), attributes));
            }
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn a_tasks_spans_reach_an_otlp_collector_carrying_its_id() {
    let repo = TestRepo::new();
    let (endpoint, spans) = collector();
    let mut cmd = Server::command(&repo, &["--otlp-endpoint", &endpoint]);
    // Batches go out every 100 ms instead of every 5 s.
    cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("server:\n{log}"));
    let _runner = runner(&repo, &server, "r1");
    let id = server.add(&["--title", "traced"]);
    server.wait_status(&id, "done");
    let of_task = |name: &str| {
        spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(n, attrs)| n == name && attrs.iter().any(|(k, v)| k == "task" && *v == id))
    };
    for step in ["lease", "run", "result", "train", "land"] {
        wait_for(&format!("the {step} span of {id}"), || {
            of_task(step).then_some(())
        });
    }
}

#[test]
fn an_otlp_endpoint_that_is_not_plain_http_is_refused_with_the_reason() {
    let repo = TestRepo::new();
    let out = pipeline_tests::run(&mut Server::command(
        &repo,
        &["--otlp-endpoint", "https://collector:4318"],
    ));
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains("only http:// is supported"),
        "{}",
        out.stderr
    );
}
