//! The web page in a real browser: Debian's headless Chromium driven through `chromedriver`
//! (WebDriver, with `fantoccini`). Each view loads; a task moves from open to done and its live
//! log fills while the page stays as it was loaded (no reload); an admin cancels with a click;
//! a visitor without a token is sent to sign in and a viewer's click on an action is refused; a
//! title holding `<script>` shows as text. A screenshot of each view is saved under
//! `<target>/screenshots/`.
//!
//! CI installs `chromium` and `chromium-driver`; without them these tests fail, unless
//! `PIPELINE_SKIP_BROWSER=1`, which skips them saying why.

use pipeline_tests::wait_for;
use pipeline_tests::web::{Browser, browser_missing, http_url, viewer_token};
use pipeline_tests::{Runner, Server, TestRepo, agent_args, as_strs};

#[test]
fn the_page_in_a_browser() {
    if let Some(why) = browser_missing() {
        println!("skipped: {why}");
        return;
    }
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--http", "127.0.0.1:0"]);
    let http = http_url(&server);
    let args = agent_args(&["--no-verify", "--slots", "2"]);
    let _runner = Runner::start(&repo, &server, "build-1", &as_strs(&args));
    // The epic and its children in one batch, so the epic is never leased on its own.
    let lines = [
        serde_json::json!({"id": "greetings", "title": "Greetings in every language"}),
        serde_json::json!({"id": "hello", "title": "Say hello", "parent": "greetings", "priority": 1}),
        serde_json::json!({"id": "hostile", "parent": "greetings",
            "title": "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"}),
    ];
    let batch = repo.dir.path().join("epic.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&batch, text).expect("batch");
    server
        .ctl(&["task", "add", "--from-file", batch.to_str().expect("path")])
        .ok();
    let (epic, first, hostile) = ("greetings", "hello", "hostile");
    server.wait_status(first, "done");
    server.wait_status(hostile, "done");
    let browser = Browser::start();
    // Without a token: the page asks to sign in.
    browser.goto(&format!("{http}/tasks/{first}"));
    assert!(
        browser.url().contains("/login?next=/tasks/"),
        "{}",
        browser.url()
    );
    browser.screenshot("login");
    browser.type_into("#token", "plv_not-a-token");
    browser.click("#sign-in");
    assert!(
        browser
            .text("#refusal")
            .contains("not the admin or the viewer token")
    );

    // As the viewer: every view loads.
    browser.sign_in(&http, &viewer_token(&repo));
    browser.goto(&format!("{http}/"));
    assert!(browser.text(".cards").contains("done"));
    browser.wait_text("#live-queue", "a landed task", |t| t.contains(hostile));
    browser.screenshot("queue");
    browser.goto(&format!("{http}/tasks"));
    browser.wait_text("table.tasks", "the tasks", |t| t.contains(first));
    browser.screenshot("tasks");
    browser.goto(&format!("{http}/runners"));
    browser.wait_text("table.runners", "the runner", |t| t.contains("build-1"));
    browser.screenshot("runners");
    browser.goto(&format!("{http}/epics/{epic}"));
    browser.wait_text("table.tasks", "the epic's children", |t| t.contains(first));
    browser.screenshot("epic");

    // A title holding markup shows as text and runs nothing.
    browser.goto(&format!("{http}/tasks/{hostile}"));
    assert_eq!(
        browser.text("#task-title"),
        "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
    );
    assert_eq!(
        browser.eval("return window.pwned === undefined"),
        serde_json::json!(true)
    );

    // A task held until released and one waiting on it: the waiting one's page, loaded
    // while it is open, shows it done without a reload.
    let gate = &server.add(&["--title", "Open the gate", "--description", "MODE: wait"]);
    let after = &server.add(&["--title", "Say bonjour", "--depends-on", gate]);
    server.wait_status(gate, "in_progress");
    // A viewer's click on an action is refused, and nothing changes.
    browser.goto(&format!("{http}/tasks/{gate}"));
    browser.click("#cancel");
    assert!(
        browser
            .text("#refusal")
            .contains("the viewer token may only look")
    );
    assert_eq!(server.show(gate)["status"], "in_progress");
    browser.goto(&format!("{http}/tasks/{after}"));
    assert_eq!(browser.text("#task-status"), "open");
    browser.eval("window.loadedOnce = 'yes'; return true");
    repo.release_task(gate);
    server.wait_status(after, "done");
    browser.wait_text("#task-status", "the waiting task done", |t| t == "done");
    assert_eq!(
        browser.eval("return window.loadedOnce"),
        serde_json::json!("yes"),
        "no reload"
    );
    browser.screenshot("task-done");

    // One that works until released (printing as it goes) and one to cancel: made now, since
    // a waiting agent waits a minute at most.
    let chatty = &server.add(&[
        "--title",
        "Translate the greeting",
        "--description",
        "MODE: chatty-wait\nLINES: 40",
    ]);
    let doomed = &server.add(&["--title", "A task to cancel", "--description", "MODE: wait"]);
    server.wait_status(chatty, "in_progress");
    server.wait_status(doomed, "in_progress");
    let hola = &server.add(&[
        "--title",
        "Say hola",
        "--depends-on",
        chatty,
        "--priority",
        "1",
    ]);
    // The queue at work: two tasks leased, one waiting for another (the README's picture).
    browser.goto(&format!("{http}/"));
    browser.wait_text(
        "#live-queue",
        "the tasks at work and the one waiting",
        |t| t.contains(chatty) && t.contains(doomed) && t.contains(hola),
    );
    browser.screenshot("queue-busy");

    // As the admin: the live log, followed as it is written, and the task done in place.
    browser.goto(&format!("{http}/"));
    browser.click("form[action='/logout'] button");
    browser.sign_in(&http, &repo.admin_token());
    browser.goto(&format!("{http}/tasks/{chatty}"));
    browser.wait_text("#log", "the first half of the log", |t| {
        t.contains("line 20 of 40")
    });
    assert!(
        !browser.text("#log").contains("line 21 of 40"),
        "the agent is held at 20"
    );
    browser.eval("window.loadedOnce = 'yes'; return true");
    browser.screenshot("task");
    repo.release_task(chatty);
    browser.wait_text("#log", "the rest of the log, live", |t| {
        t.contains("line 40 of 40")
    });
    server.wait_status(chatty, "done");
    browser.wait_text("#task-status", "done, without a reload", |t| t == "done");
    assert_eq!(
        browser.eval("return window.loadedOnce"),
        serde_json::json!("yes"),
        "no reload"
    );
    let log = browser.text("#log");
    assert!(
        log.contains("stdout") && log.contains("runner"),
        "streams told apart: {log}"
    );

    // A click cancels (the agent of `doomed` still waits).
    browser.goto(&format!("{http}/tasks/{doomed}"));
    browser.click("#cancel");
    browser.wait_text("#task-status", "cancelled", |t| t == "cancelled");
    assert_eq!(server.show(doomed)["status"], "cancelled");
}

/// A page left open while its server is killed and started again comes back by itself: its
/// session (kept in the database) still holds, its event stream reconnects and what changed
/// meanwhile shows without a reload.
#[test]
fn a_page_recovers_by_itself_after_a_server_restart() {
    if let Some(why) = browser_missing() {
        println!("skipped: {why}");
        return;
    }
    let repo = TestRepo::new();
    // A fixed port, so that the page's address stays the same across the restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(&repo, &["--http", &addr]);
    let http = http_url(&server);
    let first = server.add(&["--title", "Before the restart"]);
    let browser = Browser::start();
    browser.sign_in(&http, &viewer_token(&repo));
    browser.goto(&format!("{http}/"));
    browser.wait_text("#live-queue", "the open task", |t| t.contains(&first));
    browser.eval("window.loadedOnce = 'yes'; return true");
    server.kill();
    wait_for("the page to see the server go", || {
        let off =
            browser.eval("return document.getElementById('live-dot').classList.contains('off')");
        (off == serde_json::json!(true)).then_some(())
    });
    let server = Server::start(&repo, &["--http", &addr]);
    let second = server.add(&["--title", "After the restart"]);
    browser.wait_text("#live-queue", "the task added after the restart", |t| {
        t.contains(&second)
    });
    assert_eq!(
        browser.eval("return window.loadedOnce"),
        serde_json::json!("yes"),
        "no reload"
    );
    assert!(
        browser.url().ends_with(&format!("{port}/")),
        "still signed in: {}",
        browser.url()
    );
}
