//! `pipeline-bench replay --repo PATH --last N --test-cmd CMD [--runners K]`: a real
//! repository's last N first-parent changes replayed through the real server and real
//! `pipeline-runner`s, with the project's own test command as the verification (the runners'
//! and the server's train builds).
//!
//! The server gets a bare copy of the repository with `main` at the commit before the first
//! replayed change, and N tasks filed at once, one per change, oldest first. The agent (a shell
//! script) redoes its task's change on whatever base it is given: for each path the change
//! touched, it deletes it, or writes the change's version of it, merging the change into the
//! base's version (`git merge-file`, three-way) when the base's version is not the one the
//! change was made on, the change's version winning where the two overlap. It commits with the
//! original subject and the `Task-Id:` trailer. A merge commit of the first-parent history is
//! replayed as one change: its diff against its first parent (what it brought to the branch).
//!
//! Reported: landed/min (wall from the first task filed to the last landed), the server's
//! integration builds per landed change (`status`), the runners' dev runs and what the trains
//! sent back, whether the final tree is the original's (path by path), and whether every commit
//! the base passed through is green: CMD run again, outside the server, on each of them (every
//! value the base took, from its reflog, and every commit of its first-parent history).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pipeline_proto::v1 as pb;
use pipeline_tests::fake_runner::authorized;
use pipeline_tests::{Runner, Server, TestRepo};

use crate::common::Admin;

const USAGE: &str = "pipeline-bench replay --repo PATH --last N --test-cmd CMD [--runners K] [--rev REV] [--batch-max N] [--build-slots N] [--integration-slots N] [--gather-window D] [--backoff-base D] [--no-recheck] [--timeout SECS]";

/// What to replay, and how.
#[derive(Debug)]
pub struct Options {
    repo: PathBuf,
    rev: String,
    last: usize,
    test_cmd: String,
    runners: usize,
    batch_max: u32,
    build_slots: u32,
    integration_slots: u32,
    gather_window: Option<String>,
    /// The server's `--backoff-base` (0: a failed task is offered again at once).
    backoff_base: String,
    recheck: bool,
    timeout: Option<Duration>,
}

/// Reads `replay`'s flags (those after the word `replay`); `Err` is the one line to print.
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut repo = None;
    let mut last = None;
    let mut test_cmd = None;
    let mut o = Options {
        repo: PathBuf::new(),
        rev: "HEAD".to_owned(),
        last: 0,
        test_cmd: String::new(),
        runners: 4,
        batch_max: 8,
        build_slots: 1,
        integration_slots: 1,
        gather_window: None,
        backoff_base: "0".to_owned(),
        recheck: true,
        timeout: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (flag.as_str(), None),
        };
        if matches!(flag, "--no-recheck" | "--quick") {
            o.recheck &= flag != "--no-recheck";
            continue;
        }
        let value = match inline.or_else(|| it.next().cloned()) {
            Some(v) => v,
            None if flag.starts_with("--") => return Err(format!("{flag} needs a value")),
            None => return Err(format!("unexpected argument {flag:?}")),
        };
        let number = |min: u64, max: u64| -> Result<u64, String> {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{flag} {value:?}: a whole number from {min} to {max}"))
        };
        match flag {
            "--repo" => repo = Some(PathBuf::from(&value)),
            "--last" => last = Some(number(1, 100_000)? as usize),
            "--test-cmd" if value.trim().is_empty() => {
                return Err("--test-cmd is empty: give the command that tests a tree".to_owned());
            }
            "--test-cmd" => test_cmd = Some(value),
            "--runners" => o.runners = number(1, 64)? as usize,
            "--rev" => o.rev = value,
            "--batch-max" => o.batch_max = number(1, 64)? as u32,
            "--build-slots" => o.build_slots = number(1, 64)? as u32,
            "--integration-slots" => o.integration_slots = number(1, 8)? as u32,
            "--gather-window" => o.gather_window = Some(value),
            "--backoff-base" => o.backoff_base = value,
            "--timeout" => o.timeout = Some(Duration::from_secs(number(1, 86_400)?)),
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    o.repo = repo.ok_or("--repo PATH is missing")?;
    o.last = last.ok_or("--last N is missing")?;
    o.test_cmd = test_cmd.ok_or("--test-cmd CMD is missing")?;
    Ok(o)
}

/// Runs `replay` with its flags; exits 2 with one line on bad input.
pub async fn main(args: &[String]) {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: {USAGE}");
        std::process::exit(0);
    }
    let opts = match parse(args) {
        Ok(o) => o,
        Err(why) if args.is_empty() => refuse(&format!("{why} ({USAGE})")),
        Err(why) => refuse(&why),
    };
    let scratch = tempfile::tempdir().expect("temp dir");
    let plan = match prepare(&opts, scratch.path()) {
        Ok(plan) => plan,
        Err(why) => refuse(&why),
    };
    run(&opts, plan, scratch).await;
}

fn refuse(why: &str) -> ! {
    eprintln!("pipeline-bench replay: {why}");
    std::process::exit(2);
}

/// Git in `dir`; `Err` with its stderr's first line.
fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().next().unwrap_or("git failed").to_owned())
    }
}

fn git_bytes(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One change of the first-parent history.
struct Change {
    id: String,
    commit: String,
    parent: String,
    subject: String,
    merge: bool,
}

/// What `prepare` made: the changes, the base, the original's final tree, and where things are.
struct Plan {
    source: PathBuf,
    base: String,
    changes: Vec<Change>,
    /// The original's tree after the last change: path → (mode, object).
    original: BTreeMap<Vec<u8>, (String, String)>,
    /// The agent script and the changes it reads.
    data: PathBuf,
}

fn prepare(o: &Options, scratch: &Path) -> Result<Plan, String> {
    let source = std::path::absolute(&o.repo).map_err(|e| format!("--repo: {e}"))?;
    let shown = source.display();
    if !source.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    git(&source, &["rev-parse", "--git-dir"])
        .map_err(|_| format!("{shown} is not a git repository"))?;
    let head = git(
        &source,
        &[
            "rev-parse",
            "--verify",
            "-q",
            &format!("{}^{{commit}}", o.rev),
        ],
    )
    .map_err(|_| format!("{shown} has no commit {:?}", o.rev))?;
    let lines = git(
        &source,
        &[
            "rev-list",
            "--first-parent",
            "--parents",
            &format!("--max-count={}", o.last),
            &head,
        ],
    )?;
    let mut changes: Vec<Change> = Vec::new();
    for line in lines.lines().rev() {
        let mut words = line.split_whitespace();
        let commit = words.next().unwrap_or_default().to_owned();
        let parents: Vec<&str> = words.collect();
        let Some(parent) = parents.first() else {
            let total = lines.lines().count() - 1;
            return Err(format!(
                "--last {}: {} has only {total} first-parent changes up to {} (its root commit has no parent to replay it on)",
                o.last, shown, o.rev
            ));
        };
        changes.push(Change {
            id: format!("rp-{:04}", changes.len() + 1),
            subject: git(&source, &["log", "-1", "--format=%s", &commit])?,
            commit,
            parent: (*parent).to_owned(),
            merge: parents.len() > 1,
        });
    }
    if changes.len() < o.last {
        return Err(format!(
            "--last {}: {} has only {} first-parent changes up to {}",
            o.last,
            shown,
            changes.len(),
            o.rev
        ));
    }
    let base = changes[0].parent.clone();
    let data = scratch.join("replay");
    std::fs::create_dir_all(data.join("changes")).expect("mkdir");
    for c in &changes {
        write_change(&source, c, &data.join("changes").join(&c.id))?;
    }
    std::fs::write(data.join("agent.sh"), agent_script(&data)).expect("write the agent");
    Ok(Plan {
        original: tree(&source, &head),
        source,
        base,
        changes,
        data,
    })
}

/// Writes what the agent needs to redo one change: per path (numbered from 1) its name, what to
/// do (`D` delete, `W` write), its mode, and its contents before and after the change.
fn write_change(source: &Path, c: &Change, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let raw = git_bytes(
        source,
        &[
            "diff-tree",
            "-r",
            "-z",
            "--no-renames",
            "--no-commit-id",
            &c.parent,
            &c.commit,
        ],
    );
    // `:old-mode new-mode old-object new-object status\0path\0`, one per path.
    let mut fields = raw.split(|b| *b == 0).filter(|f| !f.is_empty());
    let mut n = 0;
    while let (Some(meta), Some(path)) = (fields.next(), fields.next()) {
        let meta = String::from_utf8_lossy(meta);
        let m: Vec<&str> = meta.trim_start_matches(':').split_whitespace().collect();
        let [old_mode, new_mode, old, new, status] = m[..] else {
            return Err(format!(
                "{}: cannot read git diff-tree's {meta:?}",
                c.commit
            ));
        };
        if old_mode == "160000" || new_mode == "160000" {
            return Err(format!(
                "{} ({}) changes a submodule ({}): a submodule cannot be replayed by files",
                c.commit,
                c.subject,
                String::from_utf8_lossy(path)
            ));
        }
        n += 1;
        let file = |what: &str| dir.join(format!("{n}.{what}"));
        std::fs::write(file("path"), path).expect("write");
        let delete = status.starts_with('D');
        std::fs::write(file("op"), if delete { "D" } else { "W" }).expect("write");
        std::fs::write(file("mode"), new_mode).expect("write");
        if !old.bytes().all(|b| b == b'0') {
            std::fs::write(
                file("before"),
                git_bytes(source, &["cat-file", "blob", old]),
            )
            .expect("write");
        }
        if !delete {
            std::fs::write(file("after"), git_bytes(source, &["cat-file", "blob", new]))
                .expect("write");
        }
    }
    std::fs::write(dir.join("n"), n.to_string()).expect("write");
    std::fs::write(
        dir.join("message"),
        format!(
            "{}\n\nReplays {} ({}).\n\nTask-Id: {}\n",
            c.subject,
            c.commit,
            if c.merge {
                "a merge: its diff against its first parent"
            } else {
                "its diff against its parent"
            },
            c.id
        ),
    )
    .expect("write");
    Ok(())
}

/// The agent: redoes its task's change on the worktree's base (see the module doc).
fn agent_script(data: &Path) -> String {
    format!(
        r#"#!/bin/sh
set -e
c='{}/changes'/"$PIPELINE_TASK_ID"
git reset -q --hard "$PIPELINE_BASE_COMMIT"
n=$(cat "$c/n")
k=1
while [ "$k" -le "$n" ]; do
    p=$(cat "$c/$k.path")
    if [ "$(cat "$c/$k.op")" = D ]; then
        git rm -q -r --ignore-unmatch -- "$p"
    else
        mode=$(cat "$c/$k.mode")
        mkdir -p "$(dirname -- "$p")"
        if [ "$mode" = 120000 ]; then
            rm -f -- "$p"
            ln -s "$(cat "$c/$k.after")" "$p"
        elif [ -f "$p" ] && [ -f "$c/$k.before" ] && ! cmp -s "$p" "$c/$k.before"; then
            # The base's version is not the one the change was made on: merge the change
            # into it; where they overlap (or the file is binary) the change's version wins.
            git merge-file -q "$p" "$c/$k.before" "$c/$k.after" || cp "$c/$k.after" "$p"
        else
            cp "$c/$k.after" "$p"
        fi
        if [ "$mode" = 100755 ]; then chmod +x "$p"; elif [ "$mode" = 100644 ]; then chmod -x "$p"; fi
        git add -- "$p"
    fi
    k=$((k + 1))
done
git -c user.name=replay -c user.email=replay@example.invalid commit -q --allow-empty -F "$c/message"
"#,
        data.display()
    )
}

/// Runs the test command in `dir` (outside the server, with this process's environment).
fn run_test(cmd: &str, dir: &Path) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A task's title: the change's subject, cut to fit (a title is at most 1,024 bytes).
fn title(subject: &str) -> String {
    let mut end = subject.len().min(200);
    while !subject.is_char_boundary(end) {
        end -= 1;
    }
    subject[..end].to_owned()
}

/// A tree, path by path: path → (mode, object).
fn tree(repo: &Path, rev: &str) -> BTreeMap<Vec<u8>, (String, String)> {
    let raw = git_bytes(repo, &["ls-tree", "-r", "-z", "--full-tree", rev]);
    raw.split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let tab = e.iter().position(|b| *b == b'\t')?;
            let meta = String::from_utf8_lossy(&e[..tab]);
            let mut m = meta.split_whitespace();
            let mode = m.next()?.to_owned();
            let _kind = m.next()?;
            let object = m.next()?.to_owned();
            Some((e[tab + 1..].to_vec(), (mode, object)))
        })
        .collect()
}

/// The tool directories the test command may need, read-only in the sandbox, and the
/// variables that point at them: the user's own toolchains (the bench's processes have homes of
/// their own).
fn toolchains() -> (Vec<PathBuf>, Vec<(String, String)>) {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut dirs = Vec::new();
    let mut vars = Vec::new();
    for (var, under_home) in [("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")] {
        let dir = std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(under_home)));
        if let Some(dir) = dir.filter(|d| d.is_dir()) {
            vars.push((var.to_owned(), dir.display().to_string()));
            dirs.push(dir);
        }
    }
    (dirs, vars)
}

/// How the tasks ended, from their runs.
#[derive(Default)]
struct Outcome {
    dev_runs: usize,
    /// Dev runs beyond each task's first.
    dev_retries: usize,
    /// Integrate runs: landed, sent back (charged to the task), put back to wait for the next
    /// train (not charged).
    landed_runs: usize,
    sent_back: usize,
    waited: usize,
    trains: BTreeSet<i64>,
}

async fn run(o: &Options, plan: Plan, scratch: tempfile::TempDir) {
    let n = plan.changes.len();
    let merges = plan.changes.iter().filter(|c| c.merge).count();
    println!(
        "replay: {} changes of {} ({}..{}), {} runners, test command {:?}",
        n,
        plan.source.display(),
        &plan.base[..12.min(plan.base.len())],
        &plan.changes[n - 1].commit[..12.min(plan.changes[n - 1].commit.len())],
        o.runners,
        o.test_cmd
    );
    if merges > 0 {
        println!(
            "replay: {merges} of the {n} changes are merge commits: each is replayed as one change, its diff against its first parent"
        );
    }
    let repo = TestRepo { dir: scratch };
    let bare = repo.repo();
    let path = |p: &Path| p.to_str().expect("utf-8 paths").to_owned();
    pipeline_tests::git(
        repo.dir.path(),
        &[
            "clone",
            "-q",
            "--bare",
            "--no-tags",
            &path(&plan.source),
            &path(&bare),
        ],
    );
    for r in pipeline_tests::git(&bare, &["for-each-ref", "--format=%(refname)"]).lines() {
        pipeline_tests::git(&bare, &["update-ref", "-d", r]);
    }
    pipeline_tests::git(&bare, &["update-ref", "refs/heads/main", &plan.base]);
    pipeline_tests::git(&bare, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    // Every value the base takes, for the green-base check (a bare repository keeps no reflog
    // unless asked).
    pipeline_tests::git(&bare, &["config", "core.logAllRefUpdates", "always"]);
    std::fs::create_dir_all(repo.agent_log()).expect("mkdir");

    let (tool_dirs, tool_vars) = toolchains();
    let env_allow = tool_vars
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut sandbox: Vec<String> = vec!["--sandbox-read".into(), path(&plan.data)];
    for d in &tool_dirs {
        sandbox.extend(["--sandbox-read".into(), path(d)]);
    }
    if !env_allow.is_empty() {
        sandbox.extend(["--env-allow".into(), env_allow]);
    }
    let mut server_args: Vec<String> = vec![
        "--lease-ttl".into(),
        "600".into(),
        "--backoff-base".into(),
        o.backoff_base.clone(),
        "--batch-max".into(),
        o.batch_max.to_string(),
        "--build-slots".into(),
        o.build_slots.to_string(),
        "--integration-slots".into(),
        o.integration_slots.to_string(),
        "--test-cmd".into(),
        o.test_cmd.clone(),
    ];
    if let Some(g) = &o.gather_window {
        server_args.extend(["--gather-window".into(), g.clone()]);
    }
    server_args.extend(sandbox.iter().cloned());
    let mut cmd = Server::command(&repo, &pipeline_tests::as_strs(&server_args));
    cmd.envs(tool_vars.iter().map(|(k, v)| (k, v)));
    let server =
        Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("server did not start:\n{log}"));
    let agent = format!("sh {}", plan.data.join("agent.sh").display());
    let mut runner_args: Vec<String> = vec![
        "--agent".into(),
        "command".into(),
        "--agent-cmd".into(),
        agent,
        "--test-cmd".into(),
        o.test_cmd.clone(),
    ];
    runner_args.extend(sandbox.iter().cloned());
    let runners: Vec<Runner> = (0..o.runners)
        .map(|i| {
            let name = format!("replay-{i}");
            server.wait_runner_gone(&name);
            let mut cmd = Runner::command(
                &repo,
                &server.url,
                &name,
                &pipeline_tests::as_strs(&runner_args),
            );
            cmd.envs(tool_vars.iter().map(|(k, v)| (k, v)));
            let runner = Runner {
                proc: pipeline_tests::Proc::spawn(&mut cmd),
                name: name.clone(),
            };
            server.wait_connected(&runner.proc, &name);
            runner
        })
        .collect();

    let mut admin = Admin::connect(&server.url, repo.admin_token()).await;
    let mut watch = admin.watch().await;
    // Landing's changes: a base red under the test command holds every lease and every landing
    // until the base is green again, which nothing in a replay makes it.
    let mut landing = admin
        .client
        .feed(authorized(
            &admin.token,
            pb::FeedRequest {
                after: None,
                topics: vec!["landing".to_owned()],
            },
        ))
        .await
        .expect("follow the feed")
        .into_inner();
    let mut following = true;
    let start = Instant::now();
    for c in &plan.changes {
        admin
            .client
            .create_task(authorized(
                &admin.token,
                pb::CreateTaskRequest {
                    id: Some(c.id.clone()),
                    title: title(&c.subject),
                    ..Default::default()
                },
            ))
            .await
            .expect("create a task");
    }
    let limit = o
        .timeout
        .unwrap_or(Duration::from_secs(600 + 60 * n as u64));
    let mut landed_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut stuck: BTreeMap<String, String> = BTreeMap::new();
    let mut timed_out = false;
    while landed_at.len() + stuck.len() < n {
        let left = limit.saturating_sub(start.elapsed());
        let next = tokio::select! {
            t = tokio::time::timeout(left, watch.recv()) => t,
            entry = landing.message(), if following => {
                let red = match entry {
                    Ok(Some(_)) => admin.status().await.landing.and_then(|l| l.red_base),
                    // The feed ended (the server went away): the watch says the rest.
                    _ => {
                        following = false;
                        None
                    }
                };
                if let Some(red) = red {
                    drop(runners);
                    drop(server);
                    drop(repo);
                    refuse(&format!(
                        "the test command fails on the base itself (main at {}{}), so nothing \
                         can land; choose a range whose base passes it (--last, --rev) or \
                         another --test-cmd",
                        &red[..12.min(red.len())],
                        if red == plan.base {
                            ", the parent of the first change"
                        } else {
                            ""
                        }
                    ));
                }
                continue;
            }
        };
        let Ok(Some((at, t))) = next else {
            timed_out = true;
            break;
        };
        if t.kind == "integrated" {
            landed_at.insert(t.task_id.clone(), at);
        } else if t.to_status == pb::TaskStatus::NeedsHelp as i32
            || t.to_status == pb::TaskStatus::Cancelled as i32
        {
            stuck.insert(t.task_id.clone(), format!("{}: {}", t.kind, t.message));
        }
    }
    let last = landed_at.values().max().copied().unwrap_or(start);
    let wall = last.duration_since(start).as_secs_f64();

    let mut out = Outcome::default();
    for c in &plan.changes {
        let task = admin
            .client
            .get_task(authorized(
                &admin.token,
                pb::GetTaskRequest { id: c.id.clone() },
            ))
            .await
            .expect("get a task")
            .into_inner();
        let mut devs = 0;
        for r in &task.runs {
            if r.phase == pb::RunPhase::Dev as i32 {
                devs += 1;
            } else if r.phase == pb::RunPhase::Integrate as i32 {
                if let Some(train) = r.train {
                    out.trains.insert(train);
                }
                if r.status == pb::RunStatus::Success as i32 {
                    out.landed_runs += 1;
                } else if r.failure_kind == pb::FailureKind::Task as i32 {
                    out.sent_back += 1;
                } else {
                    out.waited += 1;
                }
            }
        }
        out.dev_runs += devs;
        out.dev_retries += devs.saturating_sub(1);
        // What kept a task that did not land: its last failed run's error.
        if !landed_at.contains_key(&c.id)
            && let Some(r) = task.runs.iter().rev().find(|r| r.error.is_some())
        {
            let error = r.error.as_deref().unwrap_or_default();
            let error = error.lines().next().unwrap_or_default();
            println!(
                "replay: {} not landed ({} runs); its last failed run: {error}",
                c.id,
                task.runs.len()
            );
        }
    }
    // The last train's figure reaches `status` just after its tasks' transitions: read it until
    // two readings agree (or 3 s pass).
    let settle = Instant::now() + Duration::from_secs(3);
    let mut per_landed = admin.status().await.builds_per_landed;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = admin.status().await.builds_per_landed;
        if again == per_landed || Instant::now() > settle {
            per_landed = again;
            break;
        }
        per_landed = again;
    }
    drop(runners);
    drop(server);

    let landed = landed_at.len();
    println!(
        "replay: {landed} of {n} landed in {wall:.2} s = {:.1} landed/min{}",
        landed as f64 / wall.max(1e-9) * 60.0,
        if timed_out {
            format!(" (stopped after {limit:?})")
        } else {
            String::new()
        }
    );
    for (id, why) in &stuck {
        println!("replay: {id} cannot land ({why})");
    }
    println!(
        "replay: integration builds per landed change {} ({} trains); dev runs {} for {n} tasks = {} retries; trains sent back {} (charged to the task), put back to wait {}",
        per_landed.map_or_else(
            || "unset".to_owned(),
            |b| format!("{b:.3} = {:.0} builds", b * landed as f64)
        ),
        out.trains.len(),
        out.dev_runs,
        out.dev_retries,
        out.sent_back,
        out.waited
    );

    // The final tree against the original's, path by path.
    let fin = tree(&bare, "refs/heads/main");
    let differ: Vec<String> = plan
        .original
        .keys()
        .chain(fin.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|p| plan.original.get(*p) != fin.get(*p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if differ.is_empty() {
        println!("replay: final tree equals the original's: yes");
    } else {
        println!(
            "replay: final tree equals the original's: no, {} paths differ ({}{})",
            differ.len(),
            differ[..differ.len().min(5)].join(", "),
            if differ.len() > 5 { ", ..." } else { "" }
        );
    }

    // Every commit the base passed through, tested again.
    let tips: Vec<String> =
        pipeline_tests::git(&bare, &["reflog", "show", "--format=%H", "refs/heads/main"])
            .lines()
            .map(str::to_owned)
            .collect();
    let history: Vec<String> = pipeline_tests::git(
        &bare,
        &[
            "rev-list",
            "--first-parent",
            &format!("{}..refs/heads/main", plan.base),
        ],
    )
    .lines()
    .map(str::to_owned)
    .collect();
    if !o.recheck {
        println!(
            "replay: green base: not checked (--no-recheck); {} tips, {} commits",
            tips.len(),
            history.len()
        );
        return;
    }
    let check = repo.dir.path().join("recheck");
    pipeline_tests::git(
        repo.dir.path(),
        &["clone", "-q", "--no-checkout", &path(&bare), &path(&check)],
    );
    let mut seen = HashSet::new();
    let mut red = Vec::new();
    let mut checked = 0;
    let recheck_start = Instant::now();
    for c in history.iter().chain(&tips) {
        if c == &plan.base || !seen.insert(c.clone()) {
            continue;
        }
        pipeline_tests::git(&check, &["checkout", "-q", "--force", "--detach", c]);
        // Ignored files (build caches) stay, as on a CI runner that keeps its cache.
        pipeline_tests::git(&check, &["clean", "-q", "-f", "-f", "-d"]);
        checked += 1;
        if !run_test(&o.test_cmd, &check) {
            red.push(c[..12].to_owned());
        }
    }
    // A change that did not land: is the original commit itself red under the test command?
    for c in plan
        .changes
        .iter()
        .filter(|c| !landed_at.contains_key(&c.id))
    {
        let tree = repo.dir.path().join("original").join(&c.id);
        std::fs::create_dir_all(&tree).expect("mkdir");
        let unpacked = Command::new("sh")
            .arg("-c")
            .arg("git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"")
            .args(["sh", &path(&plan.source), &c.commit, &path(&tree)])
            .status()
            .is_ok_and(|s| s.success());
        let green = unpacked && run_test(&o.test_cmd, &tree);
        println!(
            "replay: {} ({}) did not land; the original commit under the test command: {}",
            c.id,
            &c.commit[..12],
            match (unpacked, green) {
                (false, _) => "could not be checked out",
                (true, true) => "green",
                (true, false) => "red too",
            }
        );
    }
    println!(
        "replay: green base: {} of {checked} commits the base passed through are red{} ({} tips, {} first-parent commits; the test command run again on each, {:.1} s)",
        red.len(),
        if red.is_empty() {
            String::new()
        } else {
            format!(": {}", red.join(", "))
        },
        tips.len(),
        history.len(),
        recheck_start.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_are_read_and_bad_ones_refused_in_one_line() {
        let o = parse(&args("--repo /r --last 5 --test-cmd true --runners 2")).expect("parse");
        assert_eq!((o.last, o.runners, o.test_cmd.as_str()), (5, 2, "true"));
        for (bad, says) in [
            ("--last 5 --test-cmd true", "--repo PATH is missing"),
            ("--repo /r --test-cmd true", "--last N is missing"),
            ("--repo /r --last 5", "--test-cmd CMD is missing"),
            ("--repo /r --last 0 --test-cmd true", "--last \"0\""),
            (
                "--repo /r --last 5 --test-cmd true --runners",
                "--runners needs a value",
            ),
            (
                "--repo /r --last 5 --test-cmd true --bogus 1",
                "unknown flag",
            ),
        ] {
            let err = parse(&args(bad)).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains('\n'), "{bad}: {err}");
        }
    }
}
