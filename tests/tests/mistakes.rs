//! Mistakes are told from what waiting heals. Before it first registers, a runner that cannot
//! use its URL (a host that does not resolve, an address that is not a pipeline server, a
//! malformed URL, a certificate it does not trust, TLS on one side only), whose credential or
//! name the server refuses, or whose work dir another runner holds, exits at once with one line
//! saying what to fix; one whose server is not up yet waits for it. `pipelinectl` reads a
//! server it cannot reach the same way. And each credential has a variable of its own.
//!
//! Log lines checked on purpose (each is the feature): the one line a refused runner prints as
//! it exits, and the waiting runner's "retrying", the only sign, while nothing listens, that it
//! waits instead of giving up.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use pipeline_tests::{
    Proc, Server, TestRepo, as_strs, ctl, listed, make_certs, run, scripted_agent, scripts_path,
    wait_connected,
};

/// A runner named `name` for `url`, working in `work`, presenting `token` (if any), with the
/// scripted agent and `extra` flags; nothing of the test's environment names a server or token.
fn runner_with(
    repo: &TestRepo,
    url: &str,
    name: &str,
    work: &Path,
    token: Option<&str>,
    extra: &[&str],
) -> Command {
    let mut cmd = repo.command("pipeline-runner");
    cmd.args([
        "--server",
        url,
        "--name",
        name,
        "--slots",
        "1",
        "--work-dir",
    ])
    .arg(work)
    .args(as_strs(&scripted_agent()))
    .args(["--no-verify", "--env-allow", "AGENT_LOG_DIR"])
    .args(extra)
    .env("PATH", scripts_path())
    .env("AGENT_LOG_DIR", repo.agent_log())
    .envs(pipeline_tests::sandbox_env(repo))
    .env("RUST_LOG", "info")
    .env_remove("PIPELINE_SERVER")
    .env_remove("PIPELINE_TOKEN")
    .env_remove("PIPELINE_RUNNER_TOKEN");
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    cmd
}

/// [`runner_with`] the registration token, in a work dir of its own.
fn runner(repo: &TestRepo, url: &str, name: &str, extra: &[&str]) -> Command {
    let work = repo.dir.path().join("runners").join(name);
    runner_with(
        repo,
        url,
        name,
        &work,
        Some(&repo.registration_token()),
        extra,
    )
}

/// Runs the runner `cmd`, which must exit non-zero with one line on stderr; returns it.
fn one_line_exit(cmd: &mut Command) -> String {
    cmd.env("RUST_LOG", "off");
    let (status, log) = Proc::spawn(cmd).wait_exit_log();
    assert!(!status.success(), "the runner exited 0: {log}");
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    assert!(log.starts_with("pipeline-runner: "), "{log}");
    log
}

/// A web server that answers every request with HTTP/1.1 400, as a web server does to gRPC;
/// its address.
fn http1_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    addr
}

#[test]
fn a_runner_exits_at_once_on_a_url_it_cannot_use() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    // A host that does not resolve (.invalid never does: RFC 6761).
    let line = one_line_exit(&mut runner(
        &repo,
        "http://pipeline.invalid:50051",
        "a",
        &[],
    ));
    assert!(
        line.contains("pipeline.invalid does not resolve") && line.contains("--server"),
        "{line}"
    );
    // An address that is not a pipeline server.
    let web = http1_server();
    let line = one_line_exit(&mut runner(&repo, &format!("http://{web}"), "b", &[]));
    assert!(
        line.contains("does not answer as a pipeline server") && line.contains("--server"),
        "{line}"
    );
    // A URL that is not one.
    let line = one_line_exit(&mut runner(&repo, "http://[::1:50051", "c", &[]));
    assert!(line.contains("invalid server URL"), "{line}");
    let runners = server.ctl(&["runners", "--json"]).json();
    assert_eq!(runners.as_array().map(Vec::len), Some(0), "{runners}");
}

#[test]
fn a_runner_exits_at_once_on_tls_it_cannot_use_and_pipelinectl_says_why() {
    let repo = TestRepo::new();
    let (ca, cert, key) = make_certs(repo.dir.path());
    let server = Server::start(&repo, &["--tls-cert", &cert, "--tls-key", &key]);
    let port = server.addr.rsplit(':').next().expect("port").to_owned();
    let https = format!("https://127.0.0.1:{port}");
    let http = format!("http://127.0.0.1:{port}");
    // A certificate the runner does not trust: --tls-ca is what it lacks.
    let line = one_line_exit(&mut runner(&repo, &https, "a", &[]));
    assert!(
        line.contains("UnknownIssuer") && line.contains("--tls-ca"),
        "{line}"
    );
    // Plain HTTP to the TLS port.
    let line = one_line_exit(&mut runner(&repo, &http, "b", &[]));
    assert!(
        line.contains("speaks TLS") && line.contains(&https),
        "{line}"
    );
    // TLS to a server without it.
    let plain_repo = TestRepo::new();
    let plain = Server::start(&plain_repo, &[]);
    let plain_https = plain.url.replacen("http://", "https://", 1);
    let line = one_line_exit(&mut runner(
        &plain_repo,
        &plain_https,
        "c",
        &["--tls-ca", &ca],
    ));
    assert!(
        line.contains("does not speak TLS") && line.contains(&plain.url),
        "{line}"
    );
    // pipelinectl reads them the same way (exit 5: the server cannot be reached).
    let line = ctl(&https, &["status"]).refused(5, "--tls-ca");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(!line.contains("is pipeline-server running"), "{line}");
    ctl(&plain_https, &["--tls-ca", &ca, "status"]).refused(5, "does not speak TLS");
    ctl(&http, &["status"]).refused(5, "https://");
    // Trusting the CA, it works.
    let ok = Proc::spawn(&mut runner(&repo, &https, "d", &["--tls-ca", &ca]));
    wait_connected(&ok, "d", || {
        listed(ctl(&https, &["--tls-ca", &ca, "runners", "--json"]).json())
    });
}

#[test]
fn a_runner_waits_for_a_server_that_is_not_listening_yet() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let addr = server.addr.clone();
    server.kill();
    // Nothing listens there: that heals once the server is up.
    let patient = Proc::spawn(&mut runner(
        &repo,
        &format!("http://{addr}"),
        "patient",
        &[],
    ));
    patient.wait_for_line("retrying").expect("still trying");
    let server = Server::start(&repo, &["--listen", &addr]);
    server.wait_connected(&patient, "patient");
    let id = server.add(&["--title", "after the wait"]);
    server.wait_status(&id, "done");
}

#[test]
fn a_runner_the_server_refuses_exits_with_what_to_do() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    // A token the server does not know.
    let work = repo.dir.path().join("runners/stranger");
    let line = one_line_exit(&mut runner_with(
        &repo,
        &server.url,
        "stranger",
        &work,
        Some("plr_not-a-token"),
        &[],
    ));
    assert!(
        line.contains("--token") && line.contains("PIPELINE_RUNNER_TOKEN"),
        "{line}"
    );
    // A runner and another one on its work dir: the second is refused, naming the first.
    let first_work = repo.dir.path().join("runners/first");
    let first = Proc::spawn(&mut runner_with(
        &repo,
        &server.url,
        "first",
        &first_work,
        Some(&repo.registration_token()),
        &[],
    ));
    server.wait_connected(&first, "first");
    let line = one_line_exit(&mut runner_with(
        &repo,
        &server.url,
        "first",
        &first_work,
        None,
        &[],
    ));
    assert!(
        line.contains(&format!("pid {}", first.pid())) && line.contains("--work-dir"),
        "{line}"
    );
    // Its name, with its own credential, from elsewhere while it is connected.
    let copy = repo.dir.path().join("runners/copy");
    std::fs::create_dir_all(&copy).expect("mkdir");
    std::fs::copy(first_work.join("credential"), copy.join("credential")).expect("copy");
    let line = one_line_exit(&mut runner_with(
        &repo,
        &server.url,
        "first",
        &copy,
        None,
        &[],
    ));
    assert!(
        line.contains("already connected") && line.contains("--name"),
        "{line}"
    );
    // The first runner is unharmed.
    let id = server.add(&["--title", "still served"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(pipeline_tests::runs(&task)[0]["runner"], "first", "{task}");
}

#[test]
fn each_credential_has_a_variable_of_its_own() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let (admin, registration) = (repo.admin_token(), repo.registration_token());
    // No note of a local server's token: only what the environment says counts.
    let home = tempfile::tempdir().expect("home");
    let status = |env: &[(&str, &str)]| {
        run(pipeline_tests::command("pipelinectl", home.path())
            .args(["--server", &server.url, "status", "--json"])
            .env_remove("PIPELINE_SERVER")
            .env_remove("PIPELINE_TOKEN")
            .env_remove("PIPELINE_ADMIN_TOKEN")
            .envs(env.iter().copied()))
    };
    status(&[]).refused(6, "no credential");
    status(&[("PIPELINE_ADMIN_TOKEN", &admin)]).json();
    // The old name keeps working, and the specific one wins when both are set.
    status(&[("PIPELINE_TOKEN", &admin)]).json();
    status(&[
        ("PIPELINE_ADMIN_TOKEN", &admin),
        ("PIPELINE_TOKEN", &registration),
    ])
    .json();
    status(&[
        ("PIPELINE_ADMIN_TOKEN", &registration),
        ("PIPELINE_TOKEN", &admin),
    ])
    .refused(6, "admin token");
    // A runner reads PIPELINE_RUNNER_TOKEN, over PIPELINE_TOKEN (here the admin's, exported
    // for pipelinectl).
    let work = repo.dir.path().join("runners/by-name");
    let mut cmd = runner_with(&repo, &server.url, "by-name", &work, None, &[]);
    cmd.env("PIPELINE_RUNNER_TOKEN", &registration)
        .env("PIPELINE_TOKEN", &admin);
    let by_name = Proc::spawn(&mut cmd);
    server.wait_connected(&by_name, "by-name");
    // And PIPELINE_TOKEN alone still.
    let work = repo.dir.path().join("runners/by-old-name");
    let mut cmd = runner_with(&repo, &server.url, "by-old-name", &work, None, &[]);
    cmd.env("PIPELINE_TOKEN", &registration);
    let by_old_name = Proc::spawn(&mut cmd);
    server.wait_connected(&by_old_name, "by-old-name");
}
