//! Webhooks end to end: a real server posts to a receiver on loopback (a small HTTP/1 server
//! in this file), which checks each message's Standard Webhooks signature with its own HMAC
//! (written here from SHA-256, checked against the spec's published test vector), not the
//! server's code. A task that lands is sent as `task.done` with the task's JSON; a receiver
//! that is down, then slow, then answers 429 gets every event at least once, in order, each
//! under one `webhook-id`; an event pending across a server crash is delivered after it; a
//! 400 is not retried; `--webhook-events` filters; a new endpoint is not sent the past; a bad
//! secret file stops the server at start with its reason.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pipeline_tests::fake_runner::FakeRunner;
use pipeline_tests::{Server, TestRepo, runner, wait_for};
use serde_json::Value;
use sha2::{Digest, Sha256};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// HMAC-SHA256 (RFC 2104), written out: the test's own, independent of the server's.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Whether `signature` (the header's value, possibly several space-separated) signs
/// `{id}.{timestamp}.{body}` with `secret`, as Standard Webhooks 1.0 says.
fn verifies(secret: &str, id: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_"))
        .expect("base64 key");
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let expected = format!("v1,{}", STANDARD.encode(hmac_sha256(&key, &signed)));
    signature.split(' ').any(|s| s == expected)
}

#[test]
fn the_tests_verifier_accepts_the_spec_test_vector() {
    assert!(verifies(
        SECRET,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265330",
        br#"{"test": 2432232314}"#,
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    ));
    assert!(!verifies(
        SECRET,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265331",
        br#"{"test": 2432232314}"#,
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    ));
}

/// How the receiver answers a request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// This status, at once.
    Status(u16),
    /// No answer until the client gives up and closes the connection (its time limit).
    Never,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    /// What it was answered (`None`: nothing, the client gave up).
    answered: Option<u16>,
}

impl Got {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn signed(&self) -> bool {
        verifies(
            SECRET,
            self.id(),
            &self.headers["webhook-timestamp"],
            &self.body,
            &self.headers["webhook-signature"],
        )
    }

    fn delivered(&self) -> bool {
        self.answered.is_some_and(|s| (200..300).contains(&s))
    }
}

#[derive(Default)]
struct Shared {
    got: Vec<Got>,
    /// The next answers, in order; then `otherwise`.
    script: VecDeque<Reply>,
    otherwise: Option<Reply>,
}

/// A webhook receiver on a loopback port: HTTP/1, one connection at a time.
struct Receiver {
    port: u16,
    shared: Arc<Mutex<Shared>>,
}

impl Receiver {
    /// A port with nothing listening on it yet (a receiver that is down).
    fn down() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Self {
            port,
            shared: Arc::default(),
        }
    }

    /// A receiver that answers 204 to everything.
    fn up() -> Self {
        let receiver = Self::down();
        receiver.listen();
        receiver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/pipeline?key=x", self.port)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers these first, in order.
    fn script(&self, replies: &[Reply]) {
        self.lock().script.extend(replies.iter().copied());
    }

    /// Answers this once the script is done (204 unless told).
    fn otherwise(&self, reply: Reply) {
        self.lock().otherwise = Some(reply);
    }

    fn got(&self) -> Vec<Got> {
        self.lock().got.clone()
    }

    /// Waits until `cond` holds of what it got; returns that.
    fn wait(&self, what: &str, cond: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        wait_for(what, || {
            let got = self.got();
            cond(&got).then_some(got)
        })
    }

    /// Starts listening on its port.
    fn listen(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the port again");
        let shared = Arc::clone(&self.shared);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                serve(conn, &shared);
            }
        });
    }
}

/// Reads one request from `conn`, records it and answers it as scripted.
fn serve(conn: TcpStream, shared: &Mutex<Shared>) {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    assert!(line.starts_with("POST /hooks/pipeline?key=x "), "{line}");
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("a header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':').expect("a header");
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("the body");
    let reply = {
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        let reply = s
            .script
            .pop_front()
            .or(s.otherwise)
            .unwrap_or(Reply::Status(204));
        s.got.push(Got {
            headers,
            body,
            answered: match reply {
                Reply::Status(code) => Some(code),
                Reply::Never => None,
            },
        });
        reply
    };
    let mut conn = reader.into_inner();
    match reply {
        Reply::Status(code) => {
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        Reply::Never => {
            // Until the client hangs up.
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest);
        }
    }
}

/// A secret file, mode 0600, holding `text`.
fn secret_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("webhook.secret");
    std::fs::write(&path, text).expect("write the secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// The server's flags for `receiver`, retrying fast.
fn flags(receiver: &Receiver, secret: &Path, events: Option<&str>) -> Vec<String> {
    let mut flags = vec![
        "--webhook".to_owned(),
        receiver.url(),
        "--webhook-secret-file".to_owned(),
        secret.display().to_string(),
    ];
    if let Some(events) = events {
        flags.extend(["--webhook-events".to_owned(), events.to_owned()]);
    }
    flags
}

fn start(repo: &TestRepo, flags: &[String]) -> Server {
    let mut cmd = Server::command(repo, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.env("PIPELINE_WEBHOOK_BACKOFF_MS", "20")
        .env("PIPELINE_WEBHOOK_TIMEOUT_MS", "500");
    Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("server did not start:\n{log}"))
}

/// The endpoint's entry of `status --json`.
fn endpoint(server: &Server) -> Value {
    server.ctl(&["status", "--json"]).json()["webhooks"][0].clone()
}

#[test]
fn a_landed_task_is_sent_signed_as_task_done_with_its_json_and_other_events_are_filtered() {
    let repo = TestRepo::new();
    let receiver = Receiver::up();
    let secret = secret_file(&dir_of(&repo), SECRET);
    let server = start(&repo, &flags(&receiver, &secret, Some("task.done")));
    // Cancelled first: not one of the endpoint's events, so never sent (else it would come
    // first, the events going in order).
    let cancelled = server.add(&["--title", "never mind"]);
    server.ctl(&["task", "cancel", &cancelled]).ok();
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "lands"]);
    server.wait_status(&id, "done");
    let got = receiver.wait("task.done", |got| !got.is_empty());
    let message = &got[0];
    assert!(message.signed(), "a valid signature: {message:?}");
    assert!(message.id().starts_with("msg_"), "{message:?}");
    assert!(
        message.headers["webhook-timestamp"].parse::<i64>().is_ok(),
        "{message:?}"
    );
    assert_eq!(message.headers["content-type"], "application/json");
    let body = message.json();
    assert_eq!(body["type"], "task.done", "{body}");
    assert!(
        body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    assert_eq!(body["data"]["id"], id.as_str(), "{body}");
    assert_eq!(body["data"]["status"], "done", "{body}");
    assert_eq!(body["data"]["title"], "lands", "{body}");
    // The task as the JSON API shows it: the keys of `task list --json`.
    let listed = server.ctl(&["task", "list", "--json"]).json();
    let listed = listed
        .as_array()
        .and_then(|l| l.iter().find(|t| t["id"] == id.as_str()))
        .expect("listed")
        .clone();
    let keys = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(keys(&body["data"]), keys(&listed), "{body}");
    let status = wait_for("the delivery in status", || {
        let e = endpoint(&server);
        (!e["last_delivery"].is_null()).then_some(e)
    });
    assert!(status["pending"].is_null(), "{status}");
    assert_eq!(
        status["url"],
        format!("http://127.0.0.1:{}/…", receiver.port),
        "the URL's path and query are not shown: {status}"
    );
    assert!(
        receiver
            .got()
            .iter()
            .all(|g| g.json()["type"] == "task.done"),
        "only task.done is sent"
    );
}

#[test]
fn a_receiver_down_then_slow_then_refusing_then_up_gets_every_event_in_order_under_one_id_each() {
    let repo = TestRepo::new();
    let receiver = Receiver::down();
    let secret = secret_file(&dir_of(&repo), SECRET);
    let server = start(&repo, &flags(&receiver, &secret, None));
    let ids: Vec<String> = (1..=3)
        .map(|i| server.add(&["--title", &format!("t{i}")]))
        .collect();
    for id in &ids {
        server.ctl(&["task", "cancel", id]).ok();
    }
    // Down: nothing listens; the first event is tried again and again, and status says why.
    let pending = wait_for("attempts while the receiver is down", || {
        let e = endpoint(&server);
        (e["pending"]["attempts"].as_u64() >= Some(2)).then_some(e)
    });
    assert_eq!(pending["pending"]["type"], "task.cancelled", "{pending}");
    assert!(
        pending["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect")),
        "{pending}"
    );
    // Then slow (no answer within the time limit, twice), then 429 (retried), then up.
    receiver.script(&[Reply::Never, Reply::Never, Reply::Status(429)]);
    receiver.listen();
    let got = receiver.wait("every event delivered", |got| {
        got.iter().filter(|g| g.delivered()).count() >= 3
    });
    assert!(got.iter().all(Got::signed), "every attempt signed");
    // The first three attempts were the first event, under one ID, the last two retried.
    let first = got[0].id().to_owned();
    assert!(got[..4].iter().all(|g| g.id() == first), "{got:?}");
    assert!(got[3].delivered());
    // Each event delivered once it was answered, in order, each under its own ID.
    let delivered: Vec<&Got> = got.iter().filter(|g| g.delivered()).collect();
    let tasks: Vec<String> = delivered
        .iter()
        .map(|g| {
            g.json()["data"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(tasks, ids, "in order");
    let numbers: Vec<i64> = got
        .iter()
        .map(|g| g.id()["msg_".len()..].parse().expect("msg_<n>"))
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] <= w[1]), "{numbers:?}");
    let distinct: std::collections::BTreeSet<&str> = delivered.iter().map(|g| g.id()).collect();
    assert_eq!(distinct.len(), 3, "{got:?}");
    let status = wait_for("nothing pending", || {
        let e = endpoint(&server);
        (e["pending"].is_null() && !e["last_delivery"].is_null()).then_some(e)
    });
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("429")),
        "the last error stays on show: {status}"
    );
}

#[test]
fn a_pending_event_survives_a_crash_a_400_is_not_retried_and_a_new_endpoint_skips_the_past() {
    let repo = TestRepo::new();
    let receiver = Receiver::up();
    let secret = secret_file(&dir_of(&repo), SECRET);
    // Before the endpoint existed: never sent to it.
    let server = Server::start(&repo, &[]);
    let past = server.add(&["--title", "before"]);
    server.ctl(&["task", "cancel", &past]).ok();
    server.terminate();

    receiver.otherwise(Reply::Status(503));
    let server = start(&repo, &flags(&receiver, &secret, None));
    let first = server.add(&["--title", "first"]);
    server.ctl(&["task", "cancel", &first]).ok();
    let got = receiver.wait("attempts answered 503", |got| got.len() >= 2);
    let id = got[0].id().to_owned();
    assert_eq!(
        got[0].json()["data"]["id"],
        first.as_str(),
        "not the past: {got:?}"
    );
    wait_for("the pending message in status", || {
        let e = endpoint(&server);
        (e["pending"]["id"] == id.as_str()).then_some(())
    });
    // A crash while it is pending: the next server sends it again, under the same ID.
    server.kill();
    receiver.script(&[Reply::Status(204), Reply::Status(400)]);
    receiver.otherwise(Reply::Status(204));
    let seen = receiver.got().len();
    let server = start(&repo, &flags(&receiver, &secret, None));
    let got = receiver.wait("the pending message after the restart", |got| {
        got[seen..].iter().any(Got::delivered)
    });
    let after = &got[seen];
    assert_eq!(after.id(), id, "the same webhook-id after the restart");
    assert!(after.delivered() && after.signed(), "{after:?}");
    // A 400 is not retried: the next event goes.
    let refused = server.add(&["--title", "refused"]);
    server.ctl(&["task", "cancel", &refused]).ok();
    let next = server.add(&["--title", "next"]);
    server.ctl(&["task", "cancel", &next]).ok();
    let got = receiver.wait("the event after the refused one", |got| {
        got.iter().any(|g| g.json()["data"]["id"] == next.as_str())
    });
    let refused_attempts: Vec<&Got> = got
        .iter()
        .filter(|g| g.json()["data"]["id"] == refused.as_str())
        .collect();
    assert_eq!(refused_attempts.len(), 1, "{got:?}");
    assert_eq!(refused_attempts[0].answered, Some(400));
    assert!(
        got.iter().all(|g| g.json()["data"]["id"] != past.as_str()),
        "the past is not sent to a new endpoint"
    );
    let status = wait_for("the refusal in status", || {
        let e = endpoint(&server);
        e["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("400"))
            .then_some(e)
    });
    assert!(status["pending"].is_null(), "{status}");
}

#[test]
fn a_bad_secret_file_or_event_stops_the_server_at_start_with_its_reason() {
    let repo = TestRepo::new();
    let receiver = Receiver::down();
    let dir = dir_of(&repo);
    let refused = |flags: &[String], says: &str| {
        let mut cmd = Server::command(&repo, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        let Err(log) = Server::spawn(&mut cmd) else {
            panic!("the server started with {flags:?}");
        };
        assert!(log.contains(says), "{says:?} not in:\n{log}");
    };
    let secret = secret_file(&dir, SECRET);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    refused(&flags(&receiver, &secret, None), "chmod 600");
    let secret = secret_file(&dir, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    refused(&flags(&receiver, &secret, None), "whsec_");
    let secret = secret_file(&dir, SECRET);
    refused(
        &flags(&receiver, &secret, Some("task.done,task.landed")),
        "unknown event \"task.landed\"",
    );
    refused(
        &[
            "--webhook".to_owned(),
            "ftp://example.com/".to_owned(),
            "--webhook-secret-file".to_owned(),
            secret.display().to_string(),
        ],
        "http:// or https://",
    );
}

/// The test's own directory, beside the repository.
fn dir_of(repo: &TestRepo) -> PathBuf {
    repo.repo().parent().expect("the test's dir").to_path_buf()
}

#[test]
fn landing_paused_and_resumed_by_a_person_are_sent_from_the_change_feed() {
    let repo = TestRepo::new();
    let receiver = Receiver::up();
    let secret = secret_file(&dir_of(&repo), SECRET);
    let server = start(
        &repo,
        &flags(&receiver, &secret, Some("landing.paused,landing.resumed")),
    );
    server
        .ctl(&[
            "queue",
            "pause",
            "--landing-only",
            "--reason",
            "release freeze",
        ])
        .ok();
    server.ctl(&["queue", "resume"]).ok();
    let got = receiver.wait("landing.paused then landing.resumed", |got| {
        got.iter().filter(|g| g.delivered()).count() >= 2
    });
    let bodies: Vec<Value> = got.iter().map(Got::json).collect();
    assert!(got.iter().all(Got::signed), "{got:?}");
    assert_eq!(bodies[0]["type"], "landing.paused", "{bodies:?}");
    assert_eq!(bodies[0]["data"]["state"], "paused", "{bodies:?}");
    assert!(
        bodies[0]["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("release freeze")),
        "{bodies:?}"
    );
    assert_eq!(bodies[1]["type"], "landing.resumed", "{bodies:?}");
    assert_eq!(bodies[1]["data"]["state"], "running", "{bodies:?}");
    let position = |g: &Got| -> i64 { g.id().trim_start_matches("msg_").parse().expect("msg_N") };
    assert!(position(&got[0]) < position(&got[1]), "{got:?}");
}

#[test]
fn a_runner_turning_unhealthy_is_sent_whole_as_the_runners_view_shows_it() {
    let repo = TestRepo::new();
    let receiver = Receiver::up();
    let secret = secret_file(&dir_of(&repo), SECRET);
    let server = start(&repo, &flags(&receiver, &secret, Some("runner.unhealthy")));
    let mut sick = FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "sick",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .expect("register");
    sick.open(vec![]).expect("open the work stream");
    sick.heartbeat_saying(vec![], Some("the work dir's disk is full"))
        .expect("heartbeat");
    let got = receiver.wait("runner.unhealthy", |got| got.iter().any(Got::delivered));
    let message = &got[0];
    assert!(message.signed(), "{message:?}");
    let body = message.json();
    assert_eq!(body["type"], "runner.unhealthy", "{body}");
    let data = &body["data"];
    assert_eq!(data["health"], "unhealthy", "{body}");
    assert_eq!(
        data["health_reason"], "the work dir's disk is full",
        "{body}"
    );
    // The whole runner, as `runners --json` (and `/api/runners`) shows it: the same keys, and
    // the same values for what has not moved since (its heartbeat time may have).
    let listed = server
        .runners()
        .into_iter()
        .find(|r| r["name"] == "sick")
        .expect("listed");
    let keys = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(keys(data), keys(&listed), "{body}\n{listed}");
    for key in [
        "id",
        "name",
        "state",
        "labels",
        "slots_total",
        "version",
        "health",
        "health_reason",
    ] {
        assert_eq!(data[key], listed[key], "{key}: {body}\n{listed}");
    }
    assert_eq!(data["labels"], serde_json::json!(["fake"]), "{body}");
}

#[test]
fn an_endpoint_dropped_from_the_flags_is_forgotten_and_given_again_starts_afresh() {
    let repo = TestRepo::new();
    let receiver = Receiver::up();
    let secret = secret_file(&dir_of(&repo), SECRET);
    // The endpoint fails, so an event is pending on it when the server stops.
    receiver.otherwise(Reply::Status(503));
    let server = start(&repo, &flags(&receiver, &secret, Some("task.cancelled")));
    let pending = server.add(&["--title", "pending when dropped"]);
    server.ctl(&["task", "cancel", &pending]).ok();
    wait_for("the message pending in status", || {
        (!endpoint(&server)["pending"].is_null()).then_some(())
    });
    server.terminate();
    // Started without it: its place is forgotten (said in the log), and it shows nowhere.
    let server = start(&repo, &[]);
    assert!(
        server
            .proc
            .log()
            .contains("forgot a webhook endpoint no longer configured"),
        "{}",
        server.proc.log()
    );
    assert_eq!(
        server.ctl(&["status", "--json"]).json()["webhooks"],
        serde_json::json!([]),
    );
    let meanwhile = server.add(&["--title", "cancelled while dropped"]);
    server.ctl(&["task", "cancel", &meanwhile]).ok();
    server.terminate();
    // Given again, it is a new endpoint: sent what happens from now on, not what it missed
    // nor what was pending on it when it was dropped.
    receiver.otherwise(Reply::Status(204));
    let seen = receiver.got().len();
    let server = start(&repo, &flags(&receiver, &secret, Some("task.cancelled")));
    let now = server.add(&["--title", "after"]);
    server.ctl(&["task", "cancel", &now]).ok();
    let got = receiver.wait("the event after it was given again", |got| {
        got[seen..].iter().any(Got::delivered)
    });
    let sent: Vec<Value> = got[seen..]
        .iter()
        .map(|g| g.json()["data"]["id"].clone())
        .collect();
    assert_eq!(sent, vec![Value::from(now.as_str())], "{got:?}");
}
