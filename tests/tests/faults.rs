//! The fault run: tasks on several runners while the server is SIGKILLed and restarted, a
//! runner is SIGKILLed, another is SIGSTOPped past the lease TTL, and the server's state disk
//! fills up and is freed again. At the end every task is done, each task's commit is on the base
//! exactly once, and no attempt was charged for a fault that was not the task's: a task's
//! failure count is exactly the failures it was made to have.
//!
//! Without the right to mount the small disk (root), the run goes on without the full-disk step,
//! and says so. The short form runs in CI; `PIPELINE_FAULT_TASKS`, `PIPELINE_FAULT_RUNNERS` and
//! `PIPELINE_FAULT_SERVER_KILLS` make it the long one (e.g. 100, 3 and 10).
//!
//! A log line checked on purpose: the server's "cannot spool a commit" warning, one of the
//! ways it can meet the full disk (a bundle it cannot store is the runner's to send again, so
//! the server's log is the only place that says so).

use std::path::Path;

use pipeline_tests::{Proc, Server, SmallDisk, TestRepo, scripts_dir, wait_for};
use serde_json::Value;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The server, its state in `state`, on `listen`.
fn server(repo: &TestRepo, state: &Path, listen: &str) -> Server {
    let mut cmd = repo.command("pipeline-server");
    cmd.arg("--repo")
        .arg(repo.repo())
        .arg("--state-dir")
        .arg(state)
        .args([
            "--listen",
            listen,
            "--lease-ttl",
            "2",
            "--backoff-base",
            "0",
        ])
        .args(["--max-retries", "5", "--env-allow", "AGENT_LOG_DIR"])
        .env("RUST_LOG", "info")
        .env("PATH", pipeline_tests::scripts_path())
        .env("AGENT_LOG_DIR", repo.agent_log())
        .envs(pipeline_tests::sandbox_env(repo));
    Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("the server did not start:\n{log}"))
}

fn runner(repo: &TestRepo, state: &Path, url: &str, name: &str) -> Proc {
    let token = std::fs::read_to_string(state.join("runner-registration.token"))
        .expect("token")
        .trim()
        .to_owned();
    let agent = format!("sh {}", scripts_dir().join("agent.sh").display());
    Proc::spawn(
        repo.command("pipeline-runner")
            .args(["--server", url, "--name", name, "--token", &token])
            .arg("--work-dir")
            .arg(repo.dir.path().join("runners").join(name))
            .args(["--agent-cmd", &agent, "--kill-grace", "1", "--slots", "1"])
            .args(["--env-allow", "AGENT_LOG_DIR"])
            .env("RUST_LOG", "info")
            .env("PATH", pipeline_tests::scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(pipeline_tests::sandbox_env(repo)),
    )
}

/// The tasks' JSON, by ID.
fn tasks(server: &Server) -> Vec<Value> {
    server
        .ctl(&["task", "list", "--json"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn done_count(server: &Server) -> usize {
    tasks(server)
        .iter()
        .filter(|t| t["status"] == "done")
        .count()
}

/// Waits until at least `n` tasks are done, through whatever the server is living through.
fn wait_done(server: &Server, n: usize) {
    wait_for(&format!("{n} tasks done"), || {
        (done_count(server) >= n).then_some(())
    });
}

/// A runner that holds a lease now, by name.
fn busy_runner(server: &Server) -> String {
    wait_for("a runner with work", || {
        server
            .ctl(&["runners", "--json"])
            .json()
            .as_array()
            .and_then(|rs| {
                rs.iter()
                    .find(|r| r["slots_used"] == 1 && r["state"] == "busy")
                    .and_then(|r| r["name"].as_str().map(str::to_owned))
            })
    })
}

/// The task `runner` works on now (its run there `running`), with how many events the task
/// has so far.
fn task_of(server: &Server, runner: &str) -> Option<(String, usize)> {
    tasks(server)
        .iter()
        .filter(|t| t["status"] == "in_progress")
        .filter_map(|t| t["id"].as_str())
        .map(|id| server.show(id))
        .find(|t| {
            pipeline_tests::runs(t)
                .last()
                .is_some_and(|r| r["runner"] == runner && r["status"] == "running")
        })
        .map(|t| {
            let id = t["id"].as_str().unwrap_or_default().to_owned();
            (id, pipeline_tests::event_kinds(&t).len())
        })
}

/// Waits until the lease of `task` that was `runner`'s (the task had `events` events then) is
/// over, as the task's history shows: true when it lapsed (a `lease_lost` event), false when
/// it ended otherwise (the runner handed its result in first).
fn wait_lease_over(server: &Server, task: &str, events: usize) -> bool {
    wait_for(&format!("the lease on {task} to end"), || {
        let later: Vec<String> = pipeline_tests::event_kinds(&server.show(task))
            .into_iter()
            .skip(events)
            .collect();
        if later.iter().any(|k| k == "lease_lost") {
            Some(true)
        } else {
            (!later.is_empty()).then_some(false)
        }
    })
}

#[test]
fn the_fault_run_loses_nothing_and_charges_no_task_for_a_fault() {
    let n_tasks = env_or("PIPELINE_FAULT_TASKS", 18);
    let n_runners = env_or("PIPELINE_FAULT_RUNNERS", 3).max(2);
    let server_kills = env_or("PIPELINE_FAULT_SERVER_KILLS", 3);
    let repo = TestRepo::new();
    // The server's state on a small disk of its own, to fill it (if this machine lets it).
    let disk = SmallDisk::try_new(32);
    let state = match &disk {
        Some(disk) => disk.path.join("state"),
        None => repo.state_dir(),
    };
    let mut srv = server(&repo, &state, "127.0.0.1:0");
    let addr = srv.addr.clone();
    let names: Vec<String> = (1..=n_runners).map(|i| format!("r{i}")).collect();
    let mut runners: Vec<Proc> = names
        .iter()
        .map(|n| runner(&repo, &state, &srv.url, n))
        .collect();
    // Every sixth task fails its verification once, by its own fault (needs-fix); the others
    // take a moment, so that the faults meet work in progress.
    let mut expected_failures = std::collections::BTreeMap::new();
    for i in 0..n_tasks {
        let id = if i % 6 == 5 {
            srv.add(&["--title", &format!("fix {i}"), "--namespace", "needs-fix"])
        } else {
            srv.add(&[
                "--title",
                &format!("slow {i}"),
                "--description",
                "MODE: slow",
            ])
        };
        expected_failures.insert(id, u64::from(i % 6 == 5));
    }
    let step = (n_tasks / (server_kills + 4)).max(1);
    let mut goal = 0;
    // The server is killed and restarted, again and again.
    for _ in 0..server_kills {
        goal = (goal + step).min(n_tasks);
        wait_done(&srv, goal);
        srv.kill();
        srv = server(&repo, &state, &addr);
    }
    // Work that waits for the test's word (`release-<task>` in the agent log dir), so that a
    // runner is at work when the next two steps look for one: the other tasks take 0.3 s
    // each, and on a loaded machine they could all be done by then (the wait timed out).
    let mut held = Vec::new();
    for what in ["the kill", "the freeze"] {
        let id = srv.add(&[
            "--title",
            &format!("held for {what}"),
            "--description",
            "MODE: wait",
        ]);
        expected_failures.insert(id.clone(), 0);
        held.push(id);
    }
    let n_tasks = n_tasks + held.len();
    // A runner is killed while it works, and comes back.
    goal = (goal + step).min(n_tasks);
    wait_done(&srv, goal);
    let (victim, (task, events)) = wait_for("a runner with work", || {
        let victim = busy_runner(&srv);
        task_of(&srv, &victim).map(|t| (victim, t))
    });
    let i = names
        .iter()
        .position(|n| *n == victim)
        .expect("known runner");
    runners[i].kill();
    // Its lease lapses (unless it handed its result in just before), before it comes back.
    wait_lease_over(&srv, &task, events);
    runners[i] = runner(&repo, &state, &srv.url, &victim);
    // Another freezes past the lease TTL, then thaws.
    goal = (goal + step).min(n_tasks);
    wait_done(&srv, goal);
    // A busy runner can hand in its result just before SIGSTOP lands, and then holds no lease
    // to lose: it is thawed and another is frozen.
    loop {
        let frozen = busy_runner(&srv);
        let i = names
            .iter()
            .position(|n| *n == frozen)
            .expect("known runner");
        runners[i].signal("STOP");
        let lapsed = match task_of(&srv, &frozen) {
            Some((task, events)) => wait_lease_over(&srv, &task, events),
            None => false,
        };
        runners[i].signal("CONT");
        if lapsed {
            break;
        }
    }
    for id in &held {
        std::fs::write(repo.agent_log().join(format!("release-{id}")), "").expect("release");
    }
    // The state disk fills up (if it is a small disk of its own), and is freed, while a task
    // with a large commit comes. New leases are held back while it fills, and it is left 1 MiB, so that the database's small writes may go on but the 3 MB bundle of a
    // task added then cannot be spooled: the server meets the full disk whatever else it
    // frees meanwhile (a spooled bundle removed as its task lands gives the next small one
    // room).
    goal = (goal + step).min(n_tasks);
    wait_done(&srv, goal);
    let n_tasks = n_tasks + 1;
    if let Some(disk) = &disk {
        full_disk_step(&srv, disk, &mut expected_failures);
    } else {
        let big = srv.add(&["--title", "a large commit", "--description", "MODE: big"]);
        expected_failures.insert(big, 0);
    }
    wait_done(&srv, n_tasks);

    // Every task is done, each commit on the base exactly once, and no task was charged for
    // anything but its own failures.
    let landed = repo.landed();
    for task in tasks(&srv) {
        let id = task["id"].as_str().expect("id").to_owned();
        assert_eq!(task["status"], "done", "{task}");
        assert_eq!(
            landed.iter().filter(|t| **t == id).count(),
            1,
            "{id} on the base: {landed:?}"
        );
        assert_eq!(
            task["failures"],
            expected_failures[&id],
            "{id} was charged for a fault not its own: {}",
            srv.show(&id)
        );
        let detail = srv.show(&id);
        for run in detail["runs"].as_array().cloned().unwrap_or_default() {
            if run["failure_kind"] == "task" {
                assert_eq!(expected_failures[&id], 1, "{detail}");
            }
        }
    }
    assert_eq!(landed.len(), n_tasks, "{landed:?}");
    let (mut infra, mut lost, mut own) = (0, 0, 0);
    for task in tasks(&srv) {
        let detail = srv.show(task["id"].as_str().unwrap_or_default());
        lost += detail["lost_leases"].as_u64().unwrap_or(0);
        for run in detail["runs"].as_array().cloned().unwrap_or_default() {
            match run["failure_kind"].as_str() {
                Some("infrastructure") => infra += 1,
                Some("task") => own += 1,
                _ => {}
            }
        }
    }
    let full_disk = if disk.is_some() {
        ", a full state disk"
    } else {
        " (no full disk: it needs root)"
    };
    println!(
        "fault run: {n_tasks} tasks on {n_runners} runners, {server_kills} server SIGKILLs, a \
         runner SIGKILL and a SIGSTOP past the TTL{full_disk}: all done, each landed once; \
         {own} runs failed by the tasks' own fault (as made), {infra} runs ended by \
         infrastructure faults ({lost} lost leases), none charged"
    );
    let status = srv.ctl(&["status", "--json"]).json();
    assert_eq!(status["health"], "healthy", "{status}");
}

/// The state disk fills up, and is freed, while a task with a 3 MB commit is added.
fn full_disk_step(
    srv: &Server,
    disk: &SmallDisk,
    expected_failures: &mut std::collections::BTreeMap<String, u64>,
) {
    srv.ctl(&["queue", "pause", "--reason", "the disk fills"])
        .ok();
    disk.fill_leaving(1 << 20);
    let big = srv.add(&["--title", "a large commit", "--description", "MODE: big"]);
    expected_failures.insert(big, 0);
    wait_for("the server to meet the full disk", || {
        // Refused (the pause cannot be lifted on a full disk), or lifted, and the large
        // commit cannot be spooled.
        let resume = srv.ctl(&["queue", "resume"]);
        let refused = resume.code() != Some(0) && resume.stderr.contains("full");
        let status = srv.ctl(&["status", "--json"]).json();
        (refused || status["health"] == "unhealthy" || srv.log().contains("cannot spool a commit"))
            .then_some(())
    });
    disk.free();
    wait_for("leases to go out again", || {
        srv.ctl(&["queue", "resume"]).code().filter(|c| *c == 0)
    });
}
