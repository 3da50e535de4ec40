//! The web page and the HTTP API through the real server, without a browser: what the API
//! answers (the bytes `pipelinectl --json` prints), who may read and act, cookies and CSRF,
//! the headers every page carries, escaping, refusals of bad input, TLS, server-sent events and
//! their bounds. The browser's own tests are in `browser.rs`.

use pipeline_tests::web::{self, EventStream, client, get, http_url, login, send, viewer_token};
use pipeline_tests::{Server, TestRepo, agent_args, as_strs, runner, wait_for};

/// A server with the web page on, on `repo`, plus `extra` flags.
fn server(repo: &TestRepo, extra: &[&str]) -> (Server, String) {
    let mut flags = vec!["--http", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    let server = Server::start(repo, &flags);
    let url = http_url(&server);
    (server, url)
}

#[test]
fn the_api_answers_what_pipelinectl_prints() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let _runner = runner(&repo, &server, "r1");
    let viewer = viewer_token(&repo);
    let a = server.add(&[
        "--title",
        "Say <script>alert(1)</script> hello",
        "--priority",
        "1",
    ]);
    let b = server.add(&["--title", "second", "--depends-on", &a]);
    server.wait_status(&b, "done");
    let same = |route: &str, args: &[&str]| {
        let api = get(&format!("{http}{route}"), &viewer);
        assert_eq!(api.status, 200, "{route}: {api:?}");
        assert_eq!(api.header("content-type"), "application/json");
        assert_eq!(api.body, server.ctl(args).ok(), "{route} against {args:?}");
    };
    same("/api/status", &["status", "--json"]);
    same("/api/queue", &["queue", "--json"]);
    same("/api/tasks", &["task", "list", "--json"]);
    same(&format!("/api/tasks/{a}"), &["task", "show", &a, "--json"]);
    // Runners move (heartbeats): the same keys and the same runner.
    let api = get(&format!("{http}/api/runners"), &viewer).json();
    let cli = server.ctl(&["runners", "--json"]).json();
    assert_eq!(api[0]["name"], cli[0]["name"]);
    let keys = |v: &serde_json::Value| {
        v[0].as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(keys(&api), keys(&cli));
    // A page of one, and the link to the next.
    let page = get(&format!("{http}/api/tasks?limit=1"), &viewer);
    assert_eq!(page.json().as_array().map(Vec::len), Some(1));
    let link = page.header("link");
    assert!(
        link.starts_with("</api/tasks?after=") && link.ends_with(">; rel=\"next\""),
        "{link}"
    );
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .expect("link");
    let rest = get(&format!("{http}{next}"), &viewer);
    assert_eq!(rest.json()[0]["id"], b.as_str());
    assert_eq!(rest.header("link"), "", "the last page names no next");
    // Filters: by status, by text (any case), by epic.
    let done = get(&format!("{http}/api/tasks?status=done&q=HELLO"), &viewer).json();
    assert_eq!(done.as_array().map(Vec::len), Some(1));
    assert_eq!(done[0]["id"], a.as_str());
    // The task's page shows the change it landed: its commit's diff, read on the server.
    let page = get(&format!("{http}/tasks/{a}"), &viewer);
    assert!(page.body.contains("The change it landed"), "{}", page.body);
    assert!(
        page.body.contains(&format!("notes/{a}.md"))
            && page.body.contains(&format!("+task {a} attempt 1")),
        "the diff: {}",
        page.body
    );
}

#[test]
fn reading_needs_a_credential_and_acting_needs_the_admins_from_this_site() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let viewer = viewer_token(&repo);
    let admin = repo.admin_token();
    let id = server.add(&[
        "--title",
        "a <b>bold</b> & \"quoted\" <script>alert(1)</script>",
    ]);

    // Nothing without a credential: a page sends the browser to sign in, the API says 401.
    let page = send(client().get(format!("{http}/tasks/{id}")));
    assert_eq!(page.status, 303);
    assert_eq!(page.header("location"), format!("/login?next=/tasks/{id}"));
    let api = send(client().get(format!("{http}/api/status")));
    assert_eq!(api.status, 401);
    assert!(
        api.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("no credential"))
    );
    let wrong = get(&format!("{http}/api/status"), "plv_wrong");
    assert_eq!(wrong.status, 401);
    let events = send(client().get(format!("{http}/events")));
    assert_eq!(events.status, 401);

    // Every page carries the headers; titles are escaped.
    let shown = get(&format!("{http}/tasks/{id}"), &viewer);
    assert_eq!(shown.status, 200);
    let csp = shown.header("content-security-policy");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(shown.header("x-content-type-options"), "nosniff");
    assert_eq!(shown.header("x-frame-options"), "DENY");
    assert!(
        !shown.body.contains("<script>alert"),
        "the title is escaped"
    );
    assert!(!shown.body.contains("<b>bold"), "the title is escaped");
    assert!(
        shown
            .body
            .contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{}",
        shown.body
    );
    let listed = get(&format!("{http}/tasks"), &viewer);
    assert!(!listed.body.contains("<script>alert") && listed.body.contains("&#60;script&#62;"));
    // Every script is a same-origin file: no inline script at all.
    for body in [&shown.body, &listed.body] {
        assert_eq!(body.matches("<script").count(), 1, "only app.js");
        assert!(body.contains("<script src=\"/static/app.js\" defer></script>"));
    }

    // The viewer reads (gRPC too) and changes nothing, with a reason.
    let refused = send(
        client()
            .post(format!("{http}/tasks/{id}/cancel"))
            .bearer_auth(&viewer)
            .header("accept", "application/json"),
    );
    assert_eq!(refused.status, 403);
    assert!(
        refused.body.contains("the viewer token may only look"),
        "{}",
        refused.body
    );
    let grpc_viewer = |args: &[&str]| {
        let mut full = vec!["--token", viewer.as_str()];
        full.extend_from_slice(args);
        server.ctl(&full)
    };
    grpc_viewer(&["status"]).ok();
    grpc_viewer(&["task", "show", &id]).ok();
    grpc_viewer(&["explain", &id]).ok();
    grpc_viewer(&["queue", "--json"]).ok();
    grpc_viewer(&["task", "cancel", &id]).refused(6, "the viewer token may only read");
    grpc_viewer(&["token", "rotate"]).refused(6, "the viewer token may only read");
    assert_eq!(server.show(&id)["status"], "open", "nothing changed");

    // A session: HttpOnly, SameSite=Strict, no Secure without TLS; it works as the token does.
    let login_answer = send(
        client()
            .post(format!("{http}/login"))
            .header("sec-fetch-site", "same-origin")
            .form(&[("token", admin.as_str()), ("next", "/tasks")]),
    );
    assert_eq!(login_answer.status, 303);
    assert_eq!(login_answer.header("location"), "/tasks");
    let set = login_answer.header("set-cookie");
    assert!(set.starts_with("pipeline_session=pls_"), "{set}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "{set}");
    let cookie = set.split(';').next().expect("cookie").to_owned();
    let bad_login = send(
        client()
            .post(format!("{http}/login"))
            .header("sec-fetch-site", "same-origin")
            .form(&[("token", "pla_nope")]),
    );
    assert_eq!(bad_login.status, 401);
    assert!(bad_login.body.contains("not the admin or the viewer token"));

    // A cross-site form post with the admin's session is refused, and changes nothing.
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "http://evil.example"),
    ] {
        let csrf = send(
            client()
                .post(format!("{http}/tasks/{id}/cancel"))
                .header("cookie", &cookie)
                .header(name, value),
        );
        assert_eq!(csrf.status, 403, "{name}");
        assert!(
            csrf.body.contains("cross-site request refused"),
            "{}",
            csrf.body
        );
    }
    let bare = send(
        client()
            .post(format!("{http}/tasks/{id}/cancel"))
            .header("cookie", &cookie),
    );
    assert_eq!(
        bare.status, 403,
        "a cookie without Origin or Sec-Fetch-Site"
    );
    assert_eq!(server.show(&id)["status"], "open");
    // The same from this site goes through, back to the task's page.
    let host = http.trim_start_matches("http://");
    let ok = send(
        client()
            .post(format!("{http}/tasks/{id}/cancel"))
            .header("cookie", &cookie)
            .header("origin", format!("http://{host}")),
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    assert_eq!(ok.header("location"), format!("/tasks/{id}"));
    assert_eq!(server.show(&id)["status"], "cancelled");
    // A script with the admin token acts without either header.
    let retried = send(
        client()
            .post(format!("{http}/tasks/{id}/retry"))
            .bearer_auth(&admin)
            .header("accept", "application/json"),
    );
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(server.show(&id)["status"], "open");

    // Sessions live in the database: one survives a restart; logout ends it.
    let viewer_cookie = login(&http, &viewer);
    drop(server);
    let (server, http) = self::server(&repo, &[]);
    let with = |cookie: &str, path: &str| {
        send(
            client()
                .get(format!("{http}{path}"))
                .header("cookie", cookie),
        )
    };
    assert_eq!(
        with(&cookie, "/api/status").status,
        200,
        "the admin's session after a restart"
    );
    assert_eq!(with(&viewer_cookie, "/tasks").status, 200);
    let out = send(
        client()
            .post(format!("{http}/logout"))
            .header("cookie", &cookie)
            .header("sec-fetch-site", "same-origin"),
    );
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(
        with(&cookie, "/tasks").status,
        303,
        "logged out: sign in again"
    );
    assert_eq!(with(&cookie, "/api/status").status, 401);

    // Rotating the viewer token ends its sessions and the old token.
    let rotated = server.ctl(&["token", "rotate", "--viewer"]);
    assert!(
        rotated.stderr.contains("1 session of the web page ended"),
        "{}",
        rotated.stderr
    );
    let new_viewer = rotated.ok().trim().to_owned();
    assert!(new_viewer.starts_with("plv_") && new_viewer != viewer);
    assert_eq!(
        viewer_token(&repo),
        new_viewer,
        "the file holds the new one"
    );
    assert_eq!(with(&viewer_cookie, "/api/status").status, 401);
    assert_eq!(get(&format!("{http}/api/status"), &viewer).status, 401);
    server
        .ctl(&["--token", &viewer, "status"])
        .refused(6, "not valid");
    assert_eq!(get(&format!("{http}/api/status"), &new_viewer).status, 200);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(repo.state_dir().join("viewer.token"))
        .expect("viewer.token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bad_input_gets_a_clear_4xx_in_html_for_pages_and_json_for_the_api() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let viewer = viewer_token(&repo);
    let admin = repo.admin_token();
    server.add(&["--title", "one"]);
    let api = |path: &str| get(&format!("{http}{path}"), &viewer);
    for (path, status, says) in [
        ("/api/tasks/..x", 400, "invalid task id"),
        ("/api/tasks/t-404", 404, "task t-404 does not exist"),
        (
            "/api/tasks?status=sleeping",
            400,
            "unknown status \"sleeping\"",
        ),
        ("/api/tasks?after=zzz", 400, "page token"),
        ("/api/tasks?epic=..", 400, "epic: invalid task id"),
        ("/api/nothing", 404, "no such page"),
    ] {
        let a = api(path);
        assert_eq!(a.status, status, "{path}: {a:?}");
        assert_eq!(a.header("content-type"), "application/json", "{path}");
        let error = a.json()["error"].as_str().expect("error").to_owned();
        assert!(
            error.contains(says) && !error.contains('\n'),
            "{path}: {error}"
        );
    }
    for (path, status, says) in [
        ("/tasks/..x", 400, "invalid task id"),
        ("/tasks/t-404", 404, "task t-404 does not exist"),
        ("/epics/t-404", 404, "task t-404 does not exist"),
        ("/tasks?status=sleeping", 400, "unknown status"),
        ("/nothing", 404, "no such page"),
    ] {
        let a = api(path);
        assert_eq!(a.status, status, "{path}: {a:?}");
        assert!(a.header("content-type").starts_with("text/html"), "{path}");
        assert!(
            a.body.contains("id=\"refusal\"") && a.body.contains(says),
            "{path}: {}",
            a.body
        );
    }
    let post = |path: &str, form: &[(&str, &str)]| {
        send(
            client()
                .post(format!("{http}{path}"))
                .bearer_auth(&admin)
                .header("accept", "application/json")
                .form(form),
        )
    };
    /// A form's fields.
    type Form<'a> = Vec<(&'a str, &'a str)>;
    let cases: [(&str, Form, u16, &str); 5] = [
        (
            "/tasks/t-1/priority",
            vec![("priority", "9")],
            400,
            "invalid priority 9",
        ),
        ("/tasks/t-1/reject", vec![], 400, "a rejection needs a note"),
        ("/tasks/t-1/approve", vec![], 409, "only a verified task"),
        ("/tasks/t-9/cancel", vec![], 404, "does not exist"),
        (
            "/queue/pause",
            vec![("hold", "everything")],
            400,
            "use leases, landing or landing_only",
        ),
    ];
    for (path, form, status, says) in cases {
        let a = post(path, &form);
        assert_eq!(a.status, status, "{path}: {a:?}");
        assert!(a.body.contains(says), "{path}: {}", a.body);
    }
    // A body over the limit is refused whole.
    let huge = "x".repeat(1024 * 1024);
    let a = post("/tasks/t-1/retry", &[("note", huge.as_str())]);
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(server.show("t-1")["status"], "open");
    // An action from the page: the priority is edited and the queue paused, with the reason.
    assert_eq!(
        post("/tasks/t-1/priority", &[("priority", "0")]).status,
        200
    );
    assert_eq!(server.show("t-1")["priority"], 0);
    assert_eq!(
        post(
            "/queue/pause",
            &[("reason", "release day"), ("hold", "landing")]
        )
        .status,
        200
    );
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["queue_paused"], true);
    assert_eq!(status["landing"]["state"], "paused");
    assert_eq!(post("/queue/resume", &[]).status, 200);
    assert_eq!(
        server.ctl(&["status", "--json"]).json()["queue_paused"],
        false
    );
}

#[test]
fn https_with_the_servers_certificate_and_a_host_only_cookie() {
    let repo = TestRepo::new();
    let certs = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = pipeline_tests::make_certs(certs.path());
    let server = Server::start(
        &repo,
        &[
            "--http",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
        ],
    );
    let url = http_url(&server).replace("http://127.0.0.1", "https://localhost");
    let ca_pem = std::fs::read(&ca).expect("ca");
    let tls = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).expect("ca"))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let viewer = viewer_token(&repo);
    let a = send(tls.get(format!("{url}/api/status")).bearer_auth(&viewer));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["open"], 0);
    let login = send(
        tls.post(format!("{url}/login"))
            .header("sec-fetch-site", "same-origin")
            .form(&[("token", viewer.as_str())]),
    );
    let set = login.header("set-cookie");
    assert!(set.starts_with("__Host-pipeline_session=pls_"), "{set}");
    assert!(
        set.contains("; Secure") && set.contains("Path=/") && set.contains("HttpOnly"),
        "{set}"
    );
    // Plain HTTP to the TLS port gets nothing.
    let plain = client().get(http_url(&server) + "/api/status").send();
    assert!(plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()));
}

#[test]
fn events_and_a_live_log_stream_as_they_happen_and_resume() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &[]);
    let viewer = viewer_token(&repo);
    let mut events = EventStream::open(&http, "/events", &viewer, &[], None);
    assert_eq!(events.status, 200);
    let ready = events.until("ready", |e| e.event == "ready");
    let from = ready.last().and_then(|e| e.id.clone()).expect("a position");
    let id = server.add(&["--title", "chatty", "--description", "MODE: interleave"]);
    let created = events.until("the task's creation", |e| e.event == "task");
    let created = created.last().expect("event");
    let data: serde_json::Value = serde_json::from_str(&created.data).expect("json");
    assert_eq!(data["id"], id.as_str());
    assert_eq!(data["status"], "open");
    let args = agent_args(&["--no-verify"]);
    let _r = pipeline_tests::Runner::start(&repo, &server, "r1", &as_strs(&args));
    let seen = events.until("done", |e| {
        e.event == "task" && e.data.contains("\"status\":\"done\"")
    });
    // The change feed: the runner connecting and the train that landed the task come too,
    // each with its position.
    let runner = seen
        .iter()
        .find(|e| e.event == "runner" && e.data.contains("\"kind\":\"connected\""))
        .unwrap_or_else(|| panic!("a runner event: {seen:?}"));
    let runner: serde_json::Value = serde_json::from_str(&runner.data).expect("json");
    assert_eq!(runner["subject"], "r1", "{runner}");
    assert!(
        seen.iter()
            .any(|e| e.event == "train" && e.data.contains("\"kind\":\"formed\"")),
        "a train event: {seen:?}"
    );
    let positions: Vec<i64> = seen
        .iter()
        .filter_map(|e| e.id.as_deref()?.parse().ok())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    // Resumed from where it started: everything after, in order, nothing before.
    let mut again = EventStream::open(&http, "/events", &viewer, &[("Last-Event-ID", &from)], None);
    let replay = again.until("done again", |e| e.data.contains("\"status\":\"done\""));
    let statuses: Vec<String> = replay
        .iter()
        .filter(|e| e.event == "task")
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.data).expect("json")["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(statuses.first().map(String::as_str), Some("open"));
    assert_eq!(statuses.last().map(String::as_str), Some("done"));

    // The log: stdout and stderr told apart, then the end.
    let mut log = EventStream::open(&http, &format!("/tasks/{id}/log"), &viewer, &[], None);
    assert_eq!(log.status, 200);
    let seen = log.until("the status at the end", |e| {
        e.event == "status" && e.data.contains("done")
    });
    let lines: Vec<serde_json::Value> = seen
        .iter()
        .filter(|e| e.event == "line")
        .map(|e| serde_json::from_str(&e.data).expect("json"))
        .collect();
    let stream_of = |text: &str| {
        lines
            .iter()
            .find(|l| l["text"] == text)
            .map(|l| l["stream"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(stream_of("out-1").as_deref(), Some("stdout"));
    assert_eq!(stream_of("err-2").as_deref(), Some("stderr"));
    assert!(lines.iter().any(|l| l["stream"] == "runner"));
    assert!(
        lines.iter().any(|l| l["stream"] == "server"),
        "the integration's lines"
    );
    assert!(
        log.next_event().is_none(),
        "the stream ends once the task is done"
    );
    // Resumed after a line: only what came after it.
    let mark = seen
        .iter()
        .find(|e| e.data.contains("\"text\":\"out-5\""))
        .and_then(|e| e.id.clone())
        .expect("out-5's id");
    let mut resumed = EventStream::open(
        &http,
        &format!("/tasks/{id}/log"),
        &viewer,
        &[("Last-Event-ID", &mark)],
        None,
    );
    let rest = resumed.until("the end", |e| {
        e.event == "status" && e.data.contains("done")
    });
    let texts: Vec<&str> = rest
        .iter()
        .filter(|e| e.event == "line")
        .map(|e| e.data.as_str())
        .collect();
    assert!(
        !texts
            .iter()
            .any(|t| t.contains("\"out-5\"") || t.contains("\"out-1\""))
    );
    assert!(texts.iter().any(|t| t.contains("\"err-6\"")), "{texts:?}");
    // A log of an unknown task is refused before it streams.
    let missing = EventStream::open(&http, "/tasks/t-77/log", &viewer, &[], None);
    assert_eq!(missing.status, 404);
}

/// The streams are bounded: past `--http-max-streams` a new one is refused (503); a reader that
/// stops reading is dropped once its queue is full instead of being buffered for ever (its
/// connection closed); and open streams cost bounded memory each.
#[test]
fn live_streams_are_bounded_and_a_reader_that_stops_is_dropped() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &["--http-max-streams", "1000"]);
    let viewer = viewer_token(&repo);
    // A reader that stops reading, with a small receive buffer.
    let mut stalled = EventStream::open(&http, "/events", &viewer, &[], Some(4096));
    assert_eq!(stalled.status, 200);
    // Enough that half of it is far more than the kernel's socket buffers can hold (the send
    // buffer autotunes up to tcp_wmem's maximum, 4 MiB by default: about 13,000 of these events,
    // which made 20,000 too few to tell a dropped stream from a buffered one).
    let total = 50_000;
    let lines: String = (0..total)
        .map(|i| format!("{{\"title\": \"task {i} with a title long enough to fill the stream's queue and the socket's buffers quickly\"}}\n"))
        .collect();
    let file = repo.dir.path().join("many.jsonl");
    std::fs::write(&file, lines).expect("write");
    server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("path")])
        .ok();
    // Read again: what was queued comes, then the end (the server closed the connection),
    // far short of every transition. (A stream buffered for ever would deliver them all; one
    // left hanging would fail the read's deadline.)
    let mut got = 0;
    while let Some(e) = stalled.next_event() {
        if e.event == "task" {
            got += 1;
        }
    }
    assert!(
        got < total / 2,
        "the stalled stream was dropped after {got} of {total}"
    );

    // Many open streams cost bounded memory: 1,000 streams, the 1,001st refused.
    let before = web::rss_kib(server.pid());
    let open: Vec<EventStream> = (0..1000)
        .map(|_| {
            let s = EventStream::open(&http, "/events", &viewer, &[], None);
            assert_eq!(s.status, 200);
            s
        })
        .collect();
    let refused = EventStream::open(&http, "/events", &viewer, &[], None);
    assert_eq!(refused.status, 503);
    let after = web::rss_kib(server.pid());
    let per_stream = after.saturating_sub(before) / 1000;
    println!("1,000 open event streams: {before} KiB -> {after} KiB, {per_stream} KiB each");
    assert!(per_stream < 64, "each open stream costs {per_stream} KiB");
    drop(open);
    // Once they are closed, a new one is taken again.
    wait_for("a stream slot to free", || {
        let s = EventStream::open(&http, "/events", &viewer, &[], None);
        (s.status == 200).then_some(())
    });
}

/// A peer that sends part of a request's head and then nothing is closed after
/// `--handshake-timeout`, so trickling bytes cannot hold the HTTP port's connection slots.
#[test]
fn a_request_head_that_never_ends_is_closed() {
    use std::io::{Read, Write};
    let repo = TestRepo::new();
    let (_server, http) = server(&repo, &["--handshake-timeout", "1"]);
    let mut sock =
        std::net::TcpStream::connect(http.trim_start_matches("http://")).expect("connect");
    sock.set_read_timeout(Some(pipeline_tests::DEADLINE))
        .expect("timeout");
    sock.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    let mut got = Vec::new();
    let read = sock.read_to_end(&mut got);
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection was left open: {read:?}"
    );
    let said = String::from_utf8_lossy(&got);
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "{said}"
    );
}

/// A million tasks: the pages and the API answer one keyset page at a time (50 rows, or the
/// `limit` asked, at most 500), each with the link to the next, never the whole table.
#[test]
fn a_million_tasks_are_paged_never_rendered_whole() {
    let repo = TestRepo::new();
    let (first, _) = server(&repo, &[]);
    first.add(&["--title", "the first"]);
    assert!(first.terminate().success());
    let n = 1_000_000;
    // The rows made in bulk behind the stopped server's back, in the backend's own SQL.
    let sql = if repo.on_postgres() {
        format!(
            "INSERT INTO tasks (id, title, status, priority, patchset, version, created_at,
                                updated_at)
               SELECT 'bulk-' || n, 'bulk task ' || n, 'done', n % 5, 1, 4,
                      1780000000000 + n, 1780000000000 + n
               FROM generate_series(1, {n}) AS n"
        )
    } else {
        format!(
            "PRAGMA busy_timeout = 10000;
             BEGIN IMMEDIATE;
             WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < {n})
             INSERT INTO tasks (id, title, status, priority, patchset, version, created_at,
                                updated_at)
               SELECT 'bulk-' || n, 'bulk task ' || n, 'done', n % 5, 1, 4,
                      1780000000000 + n, 1780000000000 + n
               FROM i;
             COMMIT;"
        )
    };
    repo.sql(&sql);

    let (_server, http) = server(&repo, &[]);
    let viewer = viewer_token(&repo);
    let status = get(&format!("{http}/api/status"), &viewer).json();
    assert_eq!(status["done"], n);
    assert_eq!(status["open"], 1);
    // The page: 50 rows and a link to the next page, a few tens of KiB.
    let page = get(&format!("{http}/tasks?status=done"), &viewer);
    assert_eq!(page.status, 200);
    let rows = page.body.matches("<tr><td><a href=\"/tasks/").count();
    assert_eq!(rows, 50, "one page of rows");
    assert!(page.body.contains("id=\"next-page\""), "a next page");
    println!("a page of tasks out of {n}: {} bytes", page.body.len());
    assert!(page.body.len() < 256 * 1024, "{} bytes", page.body.len());
    // The API: the limit asked, at most 500, and pages that follow on.
    let first = get(
        &format!("{http}/api/tasks?status=done&limit=100000"),
        &viewer,
    );
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json().as_array().map(Vec::len), Some(500));
    let link = first.header("link");
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .expect("link");
    let second = get(&format!("{http}{next}"), &viewer).json();
    let (a, b) = (first.json(), second);
    assert_eq!(b.as_array().map(Vec::len), Some(500));
    assert_ne!(a[0]["id"], b[0]["id"], "the next page goes on");
    // A title filter over the million finds its one task, looking at a bounded part at a
    // time.
    let mut url = format!("{http}/tasks?q=bulk+task+4320");
    wait_for("the filtered task, page by page", || {
        let page = get(&url, &viewer);
        assert_eq!(page.status, 200);
        if page.body.contains("/tasks/bulk-4320\"") {
            return Some(());
        }
        assert!(
            page.body.contains("id=\"next-page\""),
            "neither found nor a next page"
        );
        let next = page.body.split("id=\"next-page\"").next()?;
        let href = next.rsplit("href=\"").next()?.split('"').next()?;
        url = format!("{http}{}", href.replace("&amp;", "&"));
        None
    });
}

/// The admin's actions from the page do what the matching `pipelinectl` commands do: approve
/// (it lands, the note in its history) and reject with a note (back to open with it), drain and
/// undrain a runner, cancel.
#[test]
fn the_admins_actions_approve_reject_drain_and_cancel() {
    let repo = TestRepo::new();
    let (server, http) = server(&repo, &["--require-approval", "--backoff-base", "0"]);
    let _r = runner(&repo, &server, "r1");
    let admin = repo.admin_token();
    // As a browser's form sends them: urlencoded, from this site.
    let post = |path: &str, form: &[(&str, &str)]| {
        send(
            client()
                .post(format!("{http}{path}"))
                .bearer_auth(&admin)
                .header("sec-fetch-site", "same-origin")
                .form(form),
        )
    };
    let a = server.add(&["--title", "approve me"]);
    let b = server.add(&["--title", "reject me"]);
    server.wait_status(&a, "verified");
    server.wait_status(&b, "verified");
    let page = get(&format!("{http}/tasks/{a}"), &admin);
    assert!(page.body.contains("id=\"approve\""), "the approve button");
    let approved = post(&format!("/tasks/{a}/approve"), &[("note", "looks right")]);
    assert_eq!(approved.status, 303, "{approved:?}");
    assert_eq!(approved.header("location"), format!("/tasks/{a}"));
    let done = server.wait_status(&a, "done");
    assert_eq!(done["approval"], "approved", "{done}");
    assert!(done.to_string().contains("looks right"), "{done}");
    let rejected = post(
        &format!("/tasks/{b}/reject"),
        &[("note", "say it in French")],
    );
    assert_eq!(rejected.status, 303, "{rejected:?}");
    let again = server.wait_task(&b, "the rejection's feedback", |t| {
        t["feedback"]
            .as_str()
            .is_some_and(|f| f.contains("say it in French"))
    });
    assert_ne!(again["status"], "done", "{again}");

    // Drain: the runner takes nothing new until undrained.
    assert_eq!(post("/runners/r1/drain", &[]).status, 303);
    let state = |server: &pipeline_tests::Server| {
        server.ctl(&["runners", "--json"]).json()[0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(state(&server), "draining");
    let c = server.add(&["--title", "after the drain", "--description", "MODE: wait"]);
    assert_eq!(server.show(&c)["status"], "open");
    let runners = get(&format!("{http}/runners"), &admin);
    assert!(
        runners.body.contains("action=\"/runners/r1/undrain\""),
        "the undrain button"
    );
    assert_eq!(post("/runners/r1/undrain", &[]).status, 303);
    assert_ne!(state(&server), "draining");
    server.wait_status(&c, "in_progress");
    // Cancel, with a click's form.
    assert_eq!(post(&format!("/tasks/{c}/cancel"), &[]).status, 303);
    server.wait_status(&c, "cancelled");
    // An unknown runner: a one-line 404.
    let missing = post("/runners/nobody/drain", &[]);
    assert_eq!(missing.status, 404, "{missing:?}");
}
