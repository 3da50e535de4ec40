//! Credentials and roles end to end: nothing without a credential, each credential only for its
//! role, a runner only for itself; revoke, rotate, rate limits; no token value in any log.
//!
//! Log lines checked on purpose, each the feature: no token value in any log (and the server
//! saying where the token files are), a refused runner's reason as it exits (revoked, its
//! credential not valid), and the server saying it freed a runner name.

use pipeline_proto::v1 as pb;
use pipeline_tests::fake_runner::FakeRunner;
use pipeline_tests::{
    Runner, Server, TestRepo, alive, fake_runner, git, run, runner, scripted_agent, wait_for,
};

/// `pipelinectl` with no way to find a token (no `--token`, no local note).
fn ctl_without_token(server: &Server, args: &[&str]) -> pipeline_tests::Output {
    run(pipeline_tests::ctl_command(&pipeline_tests::empty_home(), &server.url).args(args))
}

#[test]
fn the_control_api_needs_the_admin_token() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    ctl_without_token(&server, &["status"]).refused(
        6,
        "no credential: pass --token, or set PIPELINE_ADMIN_TOKEN",
    );
    ctl_without_token(&server, &["--token", "pla_wrong", "task", "list"])
        .refused(6, "the credential is not valid");
    let registration = repo.registration_token();
    ctl_without_token(&server, &["--token", &registration, "status"]).refused(
        6,
        "this credential may not use the control API; use the admin token",
    );
    let admin = repo.admin_token();
    let out = ctl_without_token(&server, &["--token", &admin, "status", "--json"]).json();
    assert_eq!(out["open"], 0);
    // The local quick start needs no token: pipelinectl finds it.
    assert_eq!(server.ctl(&["status", "--json"]).json()["open"], 0);
    // The token files are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for file in ["admin.token", "runner-registration.token"] {
        let mode = std::fs::metadata(repo.state_dir().join(file))
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn each_credential_serves_only_its_role() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let v = pipeline_proto::PROTOCOL_VERSION;
    // The admin token cannot register a runner; a made-up one cannot either.
    let err = FakeRunner::register(&server.url, &repo.admin_token(), "a", v)
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = FakeRunner::register(&server.url, "plr_made_up", "a", v)
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // A runner's credential is its own: not for the control API, not for another runner.
    let mut a = FakeRunner::register(&server.url, &repo.registration_token(), "a", v).expect("a");
    assert!(a.credential.starts_with("plc_"), "{}", a.credential);
    let b = FakeRunner::register(&server.url, &repo.registration_token(), "b", v).expect("b");
    ctl_without_token(&server, &["--token", &a.credential, "status"])
        .refused(6, "may not use the control API");
    a.id = b.id.clone();
    let err = a.heartbeat(vec![]).expect_err("not its own");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("runner a may act only for itself, not for runner b")
    );
    // It may register again under its own name only.
    let err = FakeRunner::register(&server.url, &b.credential, "c", v)
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[test]
fn a_revoked_runner_is_cut_off_and_its_task_runs_elsewhere() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "t"]);
    let a = fake.next_assignment();
    let lease = a.lease.clone().expect("lease");
    let out = server.ctl(&["runners", "revoke", "fake"]).ok();
    assert_eq!(out.trim(), "fake: revoked; 1 lease(s) given back");
    // Its late result and any other call are refused; the task goes to another runner.
    let err = fake
        .complete(
            lease,
            pb::LeaseOutcome::Verified,
            Some(a.base_commit.clone()),
            vec![1],
        )
        .expect_err("revoked");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let _r = runner(&repo, &server, "honest");
    let task = server.wait_status(&id, "done");
    let runs = task["runs"].as_array().cloned().unwrap_or_default();
    assert_eq!(runs[0]["runner"], "fake");
    assert_eq!(runs[0]["error"], "released: runner fake was revoked");
    assert_eq!(runs[1]["runner"], "honest");
    assert_eq!(
        task["failures"], 0,
        "a revocation is not the task's failure"
    );
    server
        .ctl(&["runners", "revoke", "nobody"])
        .refused(3, "no runner named nobody");
}

#[test]
fn a_revoked_real_runner_stops_its_agent_and_exits() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "3"]);
    let mut r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t", "--description", "MODE: wait"]);
    let pid = repo.wait_agent(&id);
    server.ctl(&["runners", "revoke", "r"]).ok();
    let (status, log) = r.proc.wait_exit_log();
    assert!(!status.success(), "a revoked runner exits with an error");
    assert!(
        log.contains("credential is not valid")
            || log.contains("no longer accepts this runner's credential"),
        "{log}"
    );
    let start = std::time::Instant::now();
    while alive(&pid) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the agent {pid} outlived its revoked runner; runner log:\n{}",
            r.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(server.show(&id)["status"], "open");
    repo.release_agents();
}

#[test]
fn rotating_the_registration_token_retires_the_old_one() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let old = repo.registration_token();
    let new = server.ctl(&["token", "rotate"]).ok().trim().to_owned();
    assert!(new.starts_with("plr_") && new != old);
    assert_eq!(
        repo.registration_token(),
        new,
        "the file holds the new token"
    );
    let v = pipeline_proto::PROTOCOL_VERSION;
    let err = FakeRunner::register(&server.url, &old, "r", v)
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    FakeRunner::register(&server.url, &new, "r", v).expect("the new token works");
}

#[test]
fn registrations_are_rate_limited_per_credential() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-registrations-per-minute", "2"]);
    let token = repo.registration_token();
    let v = pipeline_proto::PROTOCOL_VERSION;
    FakeRunner::register(&server.url, &token, "r1", v).expect("1");
    FakeRunner::register(&server.url, &token, "r2", v).expect("2");
    let err = FakeRunner::register(&server.url, &token, "r3", v)
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("more than 2 registrations a minute"),
        "{}",
        err.message()
    );
}

#[test]
fn no_token_value_appears_in_any_log() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t"]);
    server.wait_status(&id, "done");
    let tokens = [repo.admin_token(), repo.registration_token()];
    let logs = format!("{}\n{}", server.log(), r.log());
    for token in &tokens {
        assert!(!logs.contains(token.as_str()), "a token value was logged");
        assert!(!logs.contains(&token[4..]), "a token value was logged");
    }
    assert!(!logs.contains("plc_"), "no runner credential was logged");
    assert!(
        server.log().contains("admin.token") && server.log().contains("runner-registration.token"),
        "the server says where the tokens are"
    );
}

#[test]
fn a_tls_round_trip_with_a_ca_made_in_the_test() {
    let repo = TestRepo::new();
    let (ca, cert, key) = pipeline_tests::make_certs(repo.dir.path());
    // With TLS, a non-loopback address needs no --insecure.
    let server = Server::start(
        &repo,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--listen",
            "0.0.0.0:0",
        ],
    );
    let port = server.addr.rsplit(':').next().expect("port").to_owned();
    let url = format!("https://127.0.0.1:{port}");
    let ok = pipeline_tests::ctl(&url, &["--tls-ca", &ca, "status", "--json"]).json();
    assert_eq!(ok["open"], 0);
    // Not trusting the CA, or speaking plain HTTP to a TLS port: one line, exit 5.
    let line =
        pipeline_tests::ctl(&url, &["status"]).refused(5, "cannot reach the pipeline server");
    assert!(
        line.to_lowercase().contains("certificate") || line.contains("UnknownIssuer"),
        "{line}"
    );
    pipeline_tests::ctl(&format!("http://127.0.0.1:{port}"), &["status"])
        .refused(5, "cannot reach");
    pipeline_tests::ctl(
        &format!("http://127.0.0.1:{port}"),
        &["--tls-ca", &ca, "status"],
    )
    .refused(2, "--tls-ca is set but the server URL");
    // A runner over TLS: register, lease, bundles both ways, logs, result.
    let mut args = scripted_agent();
    args.extend(["--no-verify".to_owned(), "--tls-ca".to_owned(), ca.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let runner = Runner::spawn(&repo, &url, "tls-runner", &args);
    pipeline_tests::wait_connected(&runner.proc, "tls-runner", || {
        pipeline_tests::listed(
            pipeline_tests::ctl(&url, &["--tls-ca", &ca, "runners", "--json"]).json(),
        )
    });
    let id = pipeline_tests::ctl(
        &url,
        &["--tls-ca", &ca, "task", "add", "--title", "over tls"],
    )
    .ok()
    .trim()
    .to_owned();
    wait_for("the task to land", || {
        let t = pipeline_tests::ctl(&url, &["--tls-ca", &ca, "task", "show", &id, "--json"]).json();
        (t["status"] == "done").then_some(())
    });
    let log = pipeline_tests::ctl(&url, &["--tls-ca", &ca, "logs", &id]).ok();
    assert!(log.contains("landed on main"), "{log}");
}

#[test]
fn a_runner_name_belongs_to_its_credential_not_to_the_registration_token() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "30"]);
    let mut victim = FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "victim",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .expect("register");
    victim.open(vec![]).expect("open");
    server.add(&["--title", "the victim's"]);
    let lease = victim.next_assignment().lease.expect("lease");
    // The victim loses its connection; its lease lives on for it.
    victim.close();
    wait_for("the victim to be offline", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners[0]["state"] == "offline").then_some(())
    });
    // The registration token cannot take the victim's name...
    let err = FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "victim",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .err()
    .expect("the takeover was refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("belongs to a registered runner"),
        "{err:?}"
    );
    // ...nor, under a name of its own, the victim's lease.
    let mut mallory = FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "mallory",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .expect("register");
    let attached = mallory.open(vec![lease.clone()]).expect("open");
    assert!(attached.kept.is_empty(), "{attached:?}");
    // The victim, with its own credential, gets it back.
    let mut back = FakeRunner::register(
        &server.url,
        &victim.credential,
        "victim",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .expect("the victim registers again");
    let attached = back.open(vec![lease.clone()]).expect("open");
    assert_eq!(attached.kept, [lease]);
}

#[test]
fn a_runner_keeps_its_credential_and_a_revoked_one_needs_an_admin_to_come_back() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut args = scripted_agent();
    args.push("--no-verify".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = Runner::start(&repo, &server, "keeper", &args);
    // The runner keeps its own credential, for its owner only.
    let saved = repo.dir.path().join("runners/keeper/credential");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&saved)
        .expect("saved credential")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&saved)
            .expect("read")
            .starts_with("plc_")
    );
    first.proc.kill();
    server.wait_runner_gone("keeper");
    // After a restart it needs no registration token: its own credential is enough.
    let second = pipeline_tests::Proc::spawn(
        repo.command("pipeline-runner")
            .args(["--server", &server.url, "--name", "keeper", "--slots", "1"])
            .args(["--token", "plr_not-the-token"])
            .arg("--work-dir")
            .arg(repo.dir.path().join("runners/keeper"))
            .args(["--env-allow", "AGENT_LOG_DIR"])
            .args(&args)
            .env("PATH", pipeline_tests::scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(pipeline_tests::sandbox_env(&repo))
            .env("RUST_LOG", "info"),
    );
    server.wait_connected(&second, "keeper");
    let id = server.add(&["--title", "after a restart"]);
    server.wait_status(&id, "done");
    // Revoked, it cannot come back with the registration token alone...
    server.ctl(&["runners", "revoke", "keeper"]).ok();
    let mut second = second;
    second.wait_exit();
    let mut again = Runner::spawn(&repo, &server.url, "keeper", &args);
    let (status, log) = again.proc.wait_exit_log();
    assert!(!status.success(), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("refused this runner"))
        .unwrap_or_else(|| panic!("no refusal: {log}"));
    assert!(line.contains("was revoked"), "{line}");
    // ...until an admin forgets it; a connected runner cannot be forgotten.
    server.ctl(&["runners", "forget", "keeper"]).ok();
    let _back = Runner::start(&repo, &server, "keeper", &args);
    let next = server.add(&["--title", "after forgiveness"]);
    server.wait_status(&next, "done");
    server
        .ctl(&["runners", "forget", "keeper"])
        .refused(4, "is connected");
}

#[test]
fn a_commit_cannot_speak_for_another_task() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "2"]);
    let victim = server.add(&["--title", "the victim", "--description", "MODE: wait"]);
    let spoofer = server.add(&[
        "--title",
        "the spoofer",
        "--description",
        &format!("MODE: spoof\nSPOOF: {victim}"),
        "--priority",
        "0",
    ]);
    // Only the spoofer runs first: the victim waits for its agent's release.
    let r = runner(&repo, &server, "r");
    server.wait_status(&spoofer, "done");
    // The landed commit carries the spoofer's trailer alone.
    let landed = git(&repo.repo(), &["log", "-1", "--format=%B", "main"]);
    let ids: Vec<&str> = landed
        .lines()
        .filter_map(|l| l.strip_prefix("Task-Id: "))
        .collect();
    assert_eq!(ids, [spoofer.as_str()], "{landed}");
    // Across a restart the victim is not taken for landed: its own work lands.
    drop(r);
    server.kill();
    let server = Server::start(&repo, &["--lease-ttl", "2"]);
    let _r = runner(&repo, &server, "r2");
    repo.release_agents();
    let task = server.wait_status(&victim, "done");
    // Its agent's own notes (of whichever attempt: the first one's agent died with its runner,
    // before or after it counted itself).
    let notes = git(&repo.repo(), &["show", &format!("main:notes/{victim}.md")]);
    assert!(
        notes.starts_with(&format!("task {victim} attempt ")),
        "the victim's own work is on the base: {notes} {task}"
    );
}

#[test]
fn a_revoked_runner_is_listed_as_revoked_until_forgotten() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _fake = fake_runner(&repo, &server);
    server.ctl(&["runners", "revoke", "fake"]).ok();
    // Its name stays reserved, and `runners` says so, also after a restart.
    let listed = |server: &Server| {
        let runners = server.ctl(&["runners", "--json"]).json();
        runners
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == "fake").cloned())
    };
    let check = |server: &Server| {
        let fake = listed(server).expect("the revoked runner is listed");
        assert_eq!(fake["state"], "revoked", "{fake}");
        assert_eq!(fake["health"], "unhealthy", "{fake}");
        assert!(
            fake["health_reason"]
                .as_str()
                .is_some_and(|r| r.contains("pipelinectl runners forget fake")),
            "{fake}"
        );
        let table = server.ctl(&["runners"]).ok();
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("fake ") && l.contains("revoked")),
            "{table}"
        );
    };
    check(&server);
    let addr = server.addr.clone();
    assert!(server.terminate().success());
    let server = Server::start(&repo, &["--listen", &addr]);
    check(&server);
    // Forgotten, it is gone, and its name free.
    server.ctl(&["runners", "forget", "fake"]).ok();
    assert_eq!(listed(&server), None);
}

/// A name registered with the registration token whose runner never opens its work stream is
/// freed after `--free-unconnected-names-after`: its credential stops working and the token
/// can register the name again. A runner that connected keeps its name however long it is
/// away.
#[test]
fn names_whose_runners_never_connected_are_freed_after_the_time_set() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--free-unconnected-names-after",
            "4s",
            "--max-registrations-per-name",
            "1000",
            "--max-registrations-per-address",
            "1000",
        ],
    );
    let token = repo.registration_token();
    let register = |name: &str| {
        FakeRunner::register(&server.url, &token, name, pipeline_proto::PROTOCOL_VERSION)
    };
    let ghost = register("ghost").expect("ghost registers and never connects");
    let mut kept = register("kept").expect("kept registers");
    kept.open(vec![]).expect("kept connects");
    kept.close();
    let err = register("ghost").err().expect("taken at first");
    assert!(
        err.message().contains("belongs to a registered runner"),
        "{}",
        err.message()
    );
    // Once the time has passed, a registration frees it (polled: the time is the server's).
    let again = wait_for("the name ghost to be freed", || register("ghost").ok());
    assert_ne!(again.credential, ghost.credential, "a new credential");
    // The old one no longer works, and the runner that connected keeps its name.
    let old = FakeRunner::register_with(
        &server.url,
        &ghost.credential,
        pb::RegisterRequest {
            name: "ghost".into(),
            slots: 1,
            version: "test".into(),
            protocol_version: pipeline_proto::PROTOCOL_VERSION,
            ..Default::default()
        },
    )
    .err()
    .expect("the freed credential is refused");
    assert_eq!(old.code(), tonic::Code::Unauthenticated, "{old:?}");
    let err = register("kept").err().expect("kept is still taken");
    assert!(
        err.message().contains("belongs to a registered runner"),
        "{}",
        err.message()
    );
    assert!(
        server.log().contains("freed the runner name"),
        "the server says so"
    );
}
