//! Clients that follow the leader (issue 28): `pipeline-runner` and `pipelinectl` given several
//! server URLs (`--server URL1,URL2`) use the next when one refuses connections or answers
//! `UNAVAILABLE`, going first to the leader a standby's refusal names; a runner keeps its work
//! across the change of server.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pipeline_tests::{Runner, Server, TestRepo, agent_args, as_strs, runs};
use serde_json::Value;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{Context, Future, Pin, Poll, Service};
use tonic::server::NamedService;

/// A loopback port nothing listens on (taken, then let go).
fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A gRPC service that answers every call as a standby does: `UNAVAILABLE`, naming `leader`.
#[derive(Clone)]
struct Standby<const RUNNER: bool> {
    leader: String,
}

impl<const RUNNER: bool> NamedService for Standby<RUNNER> {
    const NAME: &'static str = if RUNNER {
        "pipeline.v1.RunnerService"
    } else {
        "pipeline.v1.ControlService"
    };
}

impl<const RUNNER: bool> Service<http::Request<Body>> for Standby<RUNNER> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        let status = pipeline_proto::servers::not_the_leader(Some(&self.leader));
        Box::pin(async move { Ok(status.into_http()) })
    }
}

/// A fake standby naming `leader`, served on a runtime of its own; returns its URL.
fn start_standby(rt: &tokio::runtime::Runtime, leader: &str) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let leader = leader.to_owned();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(Standby::<true> {
                leader: leader.clone(),
            })
            .add_service(Standby::<false> { leader })
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    url
}

/// A port that accepts connections and drops them at once, counting them: a server that is
/// away, which a client should not have tried.
fn start_counting_dropper(rt: &tokio::runtime::Runtime) -> (String, Arc<AtomicUsize>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    rt.spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (url, count)
}

/// A port that accepts connections and never answers on them: a server frozen (SIGSTOP), whose
/// kernel still completes the TCP handshake. Returns its URL.
fn start_frozen(rt: &tokio::runtime::Runtime) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    rt.spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    url
}

#[test]
fn a_runner_and_pipelinectl_given_a_url_that_refuses_connections_first_use_the_next() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let urls = format!("{dead},{}", server.url);
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start_with_urls(&repo, &urls, &server, "r", &as_strs(&args));
    // pipelinectl, from the server's home (its admin token), given the same list.
    let ctl = |args: &[&str]| {
        pipeline_tests::run(pipeline_tests::ctl_command(server.home(), &urls).args(args))
    };
    let id = ctl(&["task", "add", "--title", "via the second URL"])
        .ok()
        .trim()
        .to_owned();
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0);
    let status = ctl(&["status", "--json"]).json();
    assert_eq!(status["server"]["role"], "leader");
    assert_eq!(status["server"]["term"], 1);
    assert_eq!(status["server"]["leader"], server.url.as_str());
}

#[test]
fn a_runner_follows_the_server_restarted_on_another_port_and_keeps_its_work() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "10"]);
    let second = format!("127.0.0.1:{}", free_port());
    let urls = format!("{},http://{second}", server.url);
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start_with_urls(&repo, &urls, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "survivor", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    server.kill();
    // The same database, another address: the first URL now refuses connections.
    let server = Server::start(&repo, &["--lease-ttl", "10", "--listen", &second]);
    server.wait_runner("r", "back with its lease", |r| {
        pipeline_tests::connected(r) && r["slots_used"] == 1
    });
    repo.release_agents();
    let task = server.wait_status(&id, "done");
    let runs = runs(&task);
    assert_eq!(
        runs.len(),
        3,
        "one dev, one verify, one integrate: {runs:?}"
    );
    pipeline_tests::assert_kept_its_lease(&task);
}

#[test]
fn a_standbys_refusal_sends_runner_and_pipelinectl_to_the_leader_it_names_first() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let standby = start_standby(&rt, &server.url);
    // Between the standby and the leader in the list: never tried, since the standby named
    // the leader.
    let (away, tried) = start_counting_dropper(&rt);
    let urls = format!("{standby},{away},{}", server.url);
    let args = agent_args(&["--no-verify"]);
    let _runner = Runner::start_with_urls(&repo, &urls, &server, "r", &as_strs(&args));
    let ctl = |args: &[&str]| {
        pipeline_tests::run(pipeline_tests::ctl_command(server.home(), &urls).args(args))
    };
    let id = ctl(&["task", "add", "--title", "sent to the leader"])
        .ok()
        .trim()
        .to_owned();
    server.wait_status(&id, "done");
    assert_eq!(
        tried.load(Ordering::SeqCst),
        0,
        "the server after the standby was tried"
    );
    // One task: the standby's refusal did nothing, and the command ran once, on the leader.
    let listed = ctl(&["task", "list", "--json"]).json();
    assert_eq!(pipeline_tests::listed(listed).len(), 1);
}

#[test]
fn a_runner_gives_up_on_a_frozen_server_and_uses_the_next() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let frozen = start_frozen(&rt);
    let urls = format!("{frozen},{}", server.url);
    let args = agent_args(&["--no-verify"]);
    // Its calls to the frozen server never get an answer: the connection's keepalive ends them.
    let _runner = Runner::start_with_urls(&repo, &urls, &server, "r", &as_strs(&args));
    let id = server.add(&["--title", "after the frozen one"]);
    server.wait_status(&id, "done");
    // pipelinectl too: it connects to the next server.
    let status = pipeline_tests::run(
        pipeline_tests::ctl_command(server.home(), &urls).args(["status", "--json"]),
    )
    .json();
    assert_eq!(status["done"], 1);
}

/// Two servers on one PostgreSQL database, each with its own clone of one bare upstream
/// repository (`--push-remote upstream`, a short `--leader-ttl`): the leader, started and
/// serving, and the second, a standby serving the read calls. Also the upstream's path.
struct Pair {
    leader: Server,
    standby: Server,
    upstream: std::path::PathBuf,
    /// The shared PostgreSQL's database they use (none: the test's own server's).
    _db: Option<pipeline_core::pgtest::PgDatabase<'static>>,
}

fn two_servers(repo: &TestRepo, lease_ttl: &str) -> Pair {
    two_servers_with(repo, &["--lease-ttl", lease_ttl], &[])
}

/// [`two_servers`], both given `extra` flags, the leader also `leader_env`.
fn two_servers_with(repo: &TestRepo, extra: &[&str], leader_env: &[(&str, &str)]) -> Pair {
    let db = pipeline_core::pgtest::PgServer::shared().database();
    let mut pair = two_servers_at(repo, db.url(), extra, leader_env);
    pair._db = Some(db);
    pair
}

/// [`two_servers_with`] on the database at `url`.
fn two_servers_at(repo: &TestRepo, url: &str, extra: &[&str], leader_env: &[(&str, &str)]) -> Pair {
    let dir = repo.dir.path();
    let upstream = dir.join("upstream.git");
    let upstream_url = upstream.to_str().expect("utf-8").to_owned();
    let repo_path = repo.repo();
    pipeline_tests::git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            repo_path.to_str().expect("utf-8"),
            &upstream_url,
        ],
    );
    pipeline_tests::git(&repo_path, &["remote", "add", "upstream", &upstream_url]);
    let second_repo = dir.join("repo-b");
    pipeline_tests::git(
        dir,
        &[
            "clone",
            "-q",
            "--origin",
            "upstream",
            &upstream_url,
            second_repo.to_str().expect("utf-8"),
        ],
    );
    pipeline_tests::git(&second_repo, &["checkout", "-q", "--detach"]);
    let mut shared = vec![
        "--db",
        url,
        "--push-remote",
        "upstream",
        "--leader-ttl",
        "2",
    ];
    shared.extend_from_slice(extra);
    let leader = Server::spawn(Server::command(repo, &shared).envs(leader_env.iter().copied()))
        .unwrap_or_else(|log| panic!("the leader did not start:\n{log}"));
    let second_home = dir.join("home-b");
    std::fs::create_dir_all(&second_home).expect("mkdir");
    let mut cmd = repo.command("pipeline-server");
    cmd.arg("--repo")
        .arg(&second_repo)
        .arg("--state-dir")
        .arg(dir.join("state-b"))
        .args(["--env-allow", "AGENT_LOG_DIR", "--listen", "127.0.0.1:0"])
        .args(&shared)
        .env("HOME", &second_home)
        .env("RUST_LOG", "info")
        .env("PATH", pipeline_tests::scripts_path())
        .env("AGENT_LOG_DIR", repo.agent_log())
        .envs(pipeline_tests::sandbox_env(repo))
        .env_remove("PIPELINE_DB");
    let standby =
        Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("the standby did not start:\n{log}"));
    Pair {
        leader,
        standby,
        upstream,
        _db: None,
    }
}

/// `pipelinectl ARGS` against `server`, from an empty home, holding `token`: a token of
/// another server's state dir.
fn ctl_holding(server: &Server, token: &str, args: &[&str]) -> pipeline_tests::Output {
    pipeline_tests::run(
        pipeline_tests::ctl_command(&pipeline_tests::empty_home(), &server.url)
            .env("PIPELINE_ADMIN_TOKEN", token)
            .args(args),
    )
}

/// `status --json`'s `server` object: the role, the term, the leader's URL.
fn server_role(server: &Server) -> Value {
    server.ctl(&["status", "--json"]).json()["server"].clone()
}

/// The term `server` leads in, as `status --json` says; panics unless it leads.
fn leading_term(server: &Server) -> i64 {
    let role = server_role(server);
    assert_eq!(role["role"], "leader", "{role}");
    role["term"].as_i64().expect("term")
}

/// Waits until `server` says it has role `role` (`leader`, `standby`); returns its `server`
/// object.
fn wait_role(server: &Server, role: &str) -> Value {
    pipeline_tests::wait_for(
        &format!("the server at {} to be the {role}", server.url),
        || Some(server_role(server)).filter(|r| r["role"] == role),
    )
}

/// The task ended done with one dev run, and its `Task-Id` trailer is once on upstream `main`.
fn done_once(task: &Value, upstream: &std::path::Path) {
    let id = task["id"].as_str().expect("id");
    let runs = runs(task);
    let devs = runs.iter().filter(|r| r["phase"] == "dev").count();
    assert_eq!(devs, 1, "the agent ran once: {runs:?}");
    assert_eq!(task["failures"], 0);
    let trailers = pipeline_tests::git(
        upstream,
        &["log", "--format=%(trailers:key=Task-Id,valueonly)", "main"],
    );
    let landed = trailers.lines().filter(|l| l.trim() == id).count();
    assert_eq!(landed, 1, "once upstream: {trailers}");
}

/// The leader killed (SIGKILL) while an agent works: the standby takes the lease over (a higher
/// term), follows the upstream branch and recovers as a restarted server does; the runner,
/// given both URLs, re-attaches its lease to it, and the task lands once upstream with its
/// agent run once.
#[test]
fn the_standby_takes_over_from_a_killed_leader_and_the_runner_keeps_its_work() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    let pair = two_servers(&repo, "10");
    let first_term = leading_term(&pair.leader);
    let args = agent_args(&["--no-verify"]);
    let urls = format!("{},{}", pair.leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &pair.leader, "r", &as_strs(&args));
    let id = pair
        .leader
        .add(&["--title", "survivor", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    pair.leader.kill();

    let second = pair.standby;
    assert!(wait_role(&second, "leader")["term"].as_i64().expect("term") > first_term);
    second.wait_runner("r", "back with its lease", |r| {
        pipeline_tests::connected(r) && r["slots_used"] == 1
    });
    repo.release_agents();
    let task = second.wait_status(&id, "done");
    done_once(&task, &pair.upstream);
    // Tokens live in the database: the first server's admin token steers the new leader.
    ctl_holding(
        &second,
        &repo.admin_token(),
        &["task", "add", "--title", "next"],
    )
    .ok();
    drop(runner);
}

/// The leader frozen (SIGSTOP) past its lease: the standby takes over and the runner follows
/// it. Resumed, the old leader writes nothing (its deadline passed, its term is fenced): it
/// stops its loops and serves as a standby, naming the new leader, and reads the task's end
/// from the database; the task lands once, by the new leader. The new leader killed in turn,
/// the old one leads again (a higher term) and lands the next task.
#[test]
fn a_leader_frozen_past_its_lease_and_resumed_writes_nothing_and_stands_by() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    // A runner gives a frozen server up only after its keepalive (10 s) times out (10 s
    // more): the task's lease outlasts that and the takeover.
    let pair = two_servers(&repo, "60");
    let first_term = leading_term(&pair.leader);
    let args = agent_args(&["--no-verify"]);
    let urls = format!("{},{}", pair.leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &pair.leader, "r", &as_strs(&args));
    let id = pair
        .leader
        .add(&["--title", "survivor", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    let before = pipeline_tests::git(&pair.upstream, &["rev-parse", "main"]);
    pair.leader.proc.signal("STOP");

    let second = &pair.standby;
    let new_term = wait_role(second, "leader")["term"].as_i64().expect("term");
    assert!(new_term > first_term);
    second.wait_runner("r", "back with its lease", |r| {
        pipeline_tests::connected(r) && r["slots_used"] == 1
    });
    pair.leader.proc.signal("CONT");
    // A standby, which learns the new leader at its elector's next look.
    pipeline_tests::wait_for("the old leader to name the new one", || {
        Some(server_role(&pair.leader))
            .filter(|r| r["role"] == "standby" && r["leader"] == second.url.as_str())
    });
    assert_eq!(
        pipeline_tests::git(&pair.upstream, &["rev-parse", "main"]),
        before,
        "nothing pushed while the task is not finished"
    );
    assert_eq!(leading_term(second), new_term, "the new leader still leads");
    repo.release_agents();
    let task = second.wait_status(&id, "done");
    done_once(&task, &pair.upstream);
    // The old leader, a standby, reads the task's end from the database, and is alive.
    let seen = pair.leader.wait_status(&id, "done");
    assert_eq!(seen["runs"], task["runs"]);
    assert_eq!(server_role(&pair.leader)["role"], "standby");
    // The new leader killed, the old one takes the lease again (a higher term still),
    // recovers as a takeover does, and lands the next task; the runner follows it.
    let Pair {
        leader: old,
        standby: second,
        upstream,
        _db,
    } = pair;
    second.kill();
    let term = wait_role(&old, "leader")["term"].as_i64().expect("term");
    assert!(term > new_term);
    let next = old.add(&["--title", "after the second takeover"]);
    let task = old.wait_status(&next, "done");
    done_once(&task, &upstream);
    drop(runner);
}

/// A standby serves `status` and the read calls from the database (a task the leader created,
/// its history, the queue, the feed) and refuses writes with `UNAVAILABLE` naming the leader;
/// it is not ready (`/readyz`, gRPC health) while the leader is.
#[test]
fn a_standby_serves_the_read_calls_and_refuses_writes_naming_the_leader() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    let pair = two_servers(&repo, "10");
    let term = leading_term(&pair.leader);
    let role = server_role(&pair.standby);
    assert_eq!(role["role"], "standby", "{role}");
    assert_eq!(role["leader"], pair.leader.url.as_str(), "{role}");
    let id = pair.leader.add(&["--title", "seen from the standby"]);
    // Straight from the database: the task, its history, the counts.
    let shown = pair.standby.show(&id);
    assert_eq!(shown["title"], "seen from the standby");
    assert_eq!(shown["status"], "open");
    let listed = pipeline_tests::listed(pair.standby.ctl(&["task", "list", "--json"]).json());
    assert_eq!(listed.len(), 1, "{listed:?}");
    let status = pair.standby.ctl(&["status", "--json"]).json();
    assert_eq!(status["open"], 1, "{status}");
    pair.standby.ctl(&["queue", "--json"]).json();
    // Tokens live in the database: the leader's admin and viewer tokens (its state dir's
    // files) are taken by the standby too, as is the standby's own.
    let viewer = pipeline_tests::read_token(&repo.state_dir().join("viewer.token"));
    for token in [repo.admin_token(), viewer] {
        let status = ctl_holding(&pair.standby, &token, &["status", "--json"]).json();
        assert_eq!(status["server"]["role"], "standby", "{status}");
    }
    // The standby's own token files work against it alone, and its log says so: a runner
    // given its registration token would be refused by the leader.
    pair.standby
        .wait_for_log("this server's token files work against this server only");
    assert!(
        !pair
            .leader
            .log()
            .contains("this server's token files work against this server only"),
        "the first server's tokens are the group's"
    );
    // Runners connect to the leader: none is connected here.
    assert!(!pair.standby.runners().iter().any(pipeline_tests::connected));
    // A write is refused, naming the leader; nothing is created.
    let refused = pipeline_tests::run(
        pair.standby
            .ctl_command()
            .args(["task", "add", "--title", "refused"]),
    );
    let said = &refused.stderr;
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("standby") && said.contains(&pair.leader.url),
        "{said}"
    );
    let listed = pipeline_tests::listed(pair.leader.ctl(&["task", "list", "--json"]).json());
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(leading_term(&pair.leader), term);
    // Asked to stop (SIGTERM), the standby stops cleanly: its loops ending with the signal are
    // no failure (it said "the health loop stopped unexpectedly" and exited 1).
    let mut standby = pair.standby;
    standby.proc.signal("TERM");
    let (status, log) = standby.proc.wait_exit_log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("unexpectedly"), "{log}");
}

/// A result the leader accepted and had not landed (landing held): its commit was kept on the
/// remote before the result was acknowledged, so the standby that takes over from the killed
/// leader fetches it and lands it; the agent is not run again.
#[test]
fn a_result_the_killed_leader_accepted_and_had_not_landed_lands_once_by_the_new_leader() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    let pair = two_servers(&repo, "30");
    let first_term = leading_term(&pair.leader);
    pair.leader
        .ctl(&["queue", "pause", "--landing-only", "--reason", "held"])
        .ok();
    let args = agent_args(&["--no-verify"]);
    let urls = format!("{},{}", pair.leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &pair.leader, "r", &as_strs(&args));
    let id = pair.leader.add(&["--title", "accepted, not landed"]);
    pair.leader.wait_status(&id, "verified");
    pair.leader.kill();

    let second = &pair.standby;
    let term = wait_role(second, "leader")["term"].as_i64().expect("term");
    assert!(term > first_term);
    second.ctl(&["queue", "resume"]).ok();
    let task = second.wait_status(&id, "done");
    done_once(&task, &pair.upstream);
    drop(runner);
}

/// The names of `task`'s refs under `refs/pipeline/tasks/` in the repository at `git_dir`.
fn task_refs(git_dir: &std::path::Path, task: &str) -> Vec<String> {
    pipeline_tests::git(
        git_dir,
        &[
            "for-each-ref",
            "--format=%(refname)",
            &format!("refs/pipeline/tasks/{task}/"),
        ],
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Accepted results are kept on the push remote only until they land: the leader deletes a
/// landed task's refs there, and a task accepted and not landed (waiting for its approval)
/// keeps its own. The leader dies (a failpoint's abort) between a landing and that deletion:
/// the new leader's first sweep deletes them, and the waiting task's ref is still there for
/// it to fetch and land.
#[test]
fn the_refs_of_landed_tasks_leave_the_remote_and_those_of_unlanded_ones_stay() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    let pair = two_servers_with(
        &repo,
        &["--lease-ttl", "30"],
        &[("PIPELINE_FAILPOINT", "before-task-refs-deleted")],
    );
    let mut leader = pair.leader;
    let first_term = leading_term(&leader);
    let args = agent_args(&["--no-verify"]);
    let urls = format!("{},{}", leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &leader, "r", &as_strs(&args));
    let held = leader.add(&["--title", "waits for its approval", "--approval"]);
    leader.wait_status(&held, "verified");
    assert_eq!(task_refs(&pair.upstream, &held).len(), 1, "kept upstream");
    let landed = leader.add(&["--title", "lands"]);
    let exit = leader.proc.wait_exit();
    assert!(!exit.success(), "the failpoint aborts the leader: {exit:?}");
    // It landed, and died before deleting its refs.
    assert_eq!(
        task_refs(&pair.upstream, &landed).len(),
        1,
        "not yet deleted"
    );

    let second = &pair.standby;
    assert!(wait_role(second, "leader")["term"].as_i64().expect("term") > first_term);
    let task = second.wait_status(&landed, "done");
    done_once(&task, &pair.upstream);
    pipeline_tests::wait_for("the landed task's refs to leave the remote", || {
        task_refs(&pair.upstream, &landed).is_empty().then_some(())
    });
    assert_eq!(
        task_refs(&pair.upstream, &held).len(),
        1,
        "a task not landed keeps its ref"
    );
    second.ctl(&["task", "approve", &held]).ok();
    let task = second.wait_status(&held, "done");
    done_once(&task, &pair.upstream);
    pipeline_tests::wait_for("the approved task's refs to leave the remote", || {
        task_refs(&pair.upstream, &held).is_empty().then_some(())
    });
    drop(runner);
}

/// A build slow in the servers' integration worktrees only (runners run the same command): it
/// waits for `file` in the agent log dir.
fn slow_build(file: &str) -> String {
    format!(
        "case $PWD in */integration) while [ ! -e \"$AGENT_LOG_DIR/{file}\" ]; do sleep 0.05; \
         done;; esac"
    )
}

/// The leader killed (SIGKILL) while its merge train builds: the standby takes over, forms
/// the train again and lands the task once; the agent is not run again.
#[test]
fn the_leader_killed_during_a_train_build_lands_nothing_and_the_standby_lands_once() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    let build = slow_build("build-go");
    let pair = two_servers_with(
        &repo,
        &[
            "--lease-ttl",
            "30",
            "--build-cmd",
            &build,
            "--verify-on-server",
            "always",
        ],
        &[],
    );
    let first_term = leading_term(&pair.leader);
    let before = pipeline_tests::git(&pair.upstream, &["rev-parse", "main"]);
    let args = agent_args(&[]);
    let urls = format!("{},{}", pair.leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &pair.leader, "r", &as_strs(&args));
    let id = pair.leader.add(&["--title", "built twice, landed once"]);
    let building = pair.leader.wait_train_building();
    // The standby shows the train in flight from the database: its ID and members.
    let seen = pair.standby.queue();
    let train = &seen["trains"][0];
    assert_eq!(train["id"], building["train"]["id"], "{seen}");
    assert_eq!(train["tasks"], serde_json::json!([id]), "{seen}");
    assert_eq!(seen["train"], *train, "{seen}");
    pair.leader.kill();
    assert_eq!(
        pipeline_tests::git(&pair.upstream, &["rev-parse", "main"]),
        before,
        "nothing pushed during the build"
    );

    let second = &pair.standby;
    assert!(wait_role(second, "leader")["term"].as_i64().expect("term") > first_term);
    repo.touch("build-go");
    let task = second.wait_status(&id, "done");
    done_once(&task, &pair.upstream);
    drop(runner);
}

/// The leader dies (a failpoint's abort) after its push moved the remote's branch and before
/// it moved its own base and recorded the landing: the standby that takes over follows the
/// remote, finds the task landed there and finishes it, without landing it again.
#[test]
fn the_leader_killed_between_its_push_and_its_base_update_lands_once() {
    if pipeline_tests::runs_the_same_on_both_passes("its two servers are on PostgreSQL anyway") {
        return;
    }
    let repo = TestRepo::new();
    let pair = two_servers_with(
        &repo,
        &["--lease-ttl", "30"],
        &[("PIPELINE_FAILPOINT", "before-base-update")],
    );
    let mut leader = pair.leader;
    let first_term = leading_term(&leader);
    let args = agent_args(&["--no-verify"]);
    let urls = format!("{},{}", leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &leader, "r", &as_strs(&args));
    let id = leader.add(&["--title", "pushed, then the leader died"]);
    let exit = leader.proc.wait_exit();
    assert!(!exit.success(), "the failpoint aborts the leader: {exit:?}");
    let trailers = pipeline_tests::git(
        &pair.upstream,
        &["log", "--format=%(trailers:key=Task-Id,valueonly)", "main"],
    );
    assert!(
        trailers.lines().any(|l| l.trim() == id),
        "pushed: {trailers}"
    );

    let second = &pair.standby;
    assert!(wait_role(second, "leader")["term"].as_i64().expect("term") > first_term);
    let task = second.wait_status(&id, "done");
    done_once(&task, &pair.upstream);
    drop(runner);
}

/// The database restarted (a fast shutdown, then started again) while agents work and tasks
/// land: the servers and the runner reconnect, one server leads, and every task ends done once
/// upstream with its agent run once.
#[test]
fn the_database_restarted_under_load_loses_nothing_and_lands_nothing_twice() {
    if pipeline_tests::runs_the_same_on_both_passes(
        "it starts a PostgreSQL of its own on either pass",
    ) {
        return;
    }
    use pipeline_core::pgtest::{Options, PgServer};
    let mut pg = PgServer::start(Options::default()).expect("a PostgreSQL of its own");
    let url = pg.url("postgres");
    let repo = TestRepo::new();
    let pair = two_servers_at(&repo, &url, &["--lease-ttl", "30"], &[]);
    let args = agent_args(&["--no-verify", "--slots", "2"]);
    let urls = format!("{},{}", pair.leader.url, pair.standby.url);
    let runner = Runner::start_with_urls(&repo, &urls, &pair.leader, "r", &as_strs(&args));
    let waiting = pair.leader.add(&[
        "--title",
        "at work across the restart",
        "--description",
        "MODE: wait",
    ]);
    let quick: Vec<String> = (0..3)
        .map(|i| pair.leader.add(&["--title", &format!("quick {i}")]))
        .collect();
    repo.wait_agent(&waiting);

    pg.shut_down();
    pg.start_again().expect("PostgreSQL back");
    repo.release_agents();
    let more = pipeline_tests::wait_for("a leader taking a task after the restart", || {
        [&pair.leader, &pair.standby].into_iter().find_map(|s| {
            let added =
                pipeline_tests::run(s.ctl_command().args(["task", "add", "--title", "after"]));
            added
                .status
                .success()
                .then(|| added.stdout.trim().to_owned())
        })
    });
    let leader = pipeline_tests::wait_for("one server to lead", || {
        [&pair.leader, &pair.standby].into_iter().find(|s| {
            let out = pipeline_tests::run(s.ctl_command().args(["status", "--json"]));
            out.status.success()
                && serde_json::from_str::<Value>(&out.stdout)
                    .is_ok_and(|v| v["server"]["role"] == "leader")
        })
    });
    for id in quick.iter().chain([&waiting, &more]) {
        let task = leader.wait_status(id, "done");
        done_once(&task, &pair.upstream);
    }
    drop(runner);
}
