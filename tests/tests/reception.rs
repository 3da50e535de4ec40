//! What a commit can do to the base, and so to everyone: the server checks what it receives as
//! git's strict reception does, an integration that fails the same way on the same input is
//! the task's failure (never a retry for ever), and no task is charged on the strength of
//! another task's runner's unchecked claim.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pipeline_proto::v1 as pb;
use pipeline_tests::{Server, TestRepo, fake_runner, git, main_tip, runs};
use serde_json::Value;

/// A clone of the test repository to forge commits in.
fn forge(repo: &TestRepo) -> PathBuf {
    let dir = repo.dir.path().join("forge");
    if !dir.exists() {
        git(
            repo.dir.path(),
            &["clone", "-q", repo.repo().to_str().expect("utf-8"), "forge"],
        );
    }
    git(
        &dir,
        &[
            "fetch",
            "-q",
            "origin",
            "+refs/heads/main:refs/remotes/origin/main",
        ],
    );
    dir
}

/// Runs git in `dir` with `input` on stdin; its stdout, trimmed.
fn git_in(dir: &Path, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Writes a tree object exactly as given (git's own tools would refuse or sort it): entries
/// of (mode, object, name), in this order.
fn raw_tree(dir: &Path, entries: &[(&str, &str, &[u8])]) -> String {
    let mut raw = Vec::new();
    for (mode, object, name) in entries {
        raw.extend_from_slice(mode.as_bytes());
        raw.push(b' ');
        raw.extend_from_slice(name);
        raw.push(0);
        for i in (0..40).step_by(2) {
            raw.push(u8::from_str_radix(&object[i..i + 2], 16).expect("hex"));
        }
    }
    git_in(
        dir,
        &["hash-object", "-t", "tree", "-w", "--literally", "--stdin"],
        &raw,
    )
}

/// A blob holding `content`.
fn blob(dir: &Path, content: &str) -> String {
    git_in(dir, &["hash-object", "-w", "--stdin"], content.as_bytes())
}

/// A commit of `tree` on `base`, and a bundle of it (made whatever the tree holds).
fn commit_and_bundle(dir: &Path, tree: &str, base: &str, message: &str) -> (String, Vec<u8>) {
    let commit = git(dir, &["commit-tree", tree, "-p", base, "-m", message]);
    git(dir, &["update-ref", "refs/heads/forged", &commit]);
    let file = dir.join("../forged.bundle");
    git(
        dir,
        &[
            "-c",
            "core.maxTreeDepth=100000",
            "bundle",
            "create",
            "-q",
            file.to_str().expect("utf-8"),
            "refs/heads/forged",
            &format!("^{base}"),
        ],
    );
    (commit, std::fs::read(&file).expect("bundle"))
}

/// A commit on `base` that adds one file at `path` (any depth or length: fast-import writes
/// what git's other tools would not).
fn commit_with_path(dir: &Path, base: &str, path: &str) -> String {
    let script = format!(
        "commit refs/heads/forged\ncommitter a <a@example.invalid> 0 +0000\ndata 6\nforged\n\
         from {base}\nM 100644 inline {path}\ndata 2\nx\n\n"
    );
    git_in(
        dir,
        &["fast-import", "--quiet", "--force"],
        script.as_bytes(),
    );
    git(dir, &["rev-parse", "refs/heads/forged^{tree}"])
}

/// The trees of the hostile commits, each with what its refusal names.
fn hostile_trees(dir: &Path, base: &str) -> Vec<(&'static str, String, &'static str)> {
    let readme = git(dir, &["rev-parse", &format!("{base}:README")]);
    let config = blob(dir, "[core]\n\tbare = false\n");
    let inner = raw_tree(dir, &[("100644", &config, b"config")]);
    let with = |name: &[u8]| {
        raw_tree(
            dir,
            &[("40000", &inner, name), ("100644", &readme, b"README")],
        )
    };
    let gitmodules = blob(
        dir,
        "[submodule \"x\"]\n\tpath = x\n\turl = -upload-pack=touch-pwned\n",
    );
    let mut trees = vec![
        (".git", with(b".git"), "hasDotgit"),
        (".GIT", with(b".GIT"), "hasDotgit"),
        ("HFS .git", with(".g\u{200c}it".as_bytes()), "hasDotgit"),
        ("NTFS .git", with(b"git~1"), "hasDotgit"),
        (
            "duplicate entries",
            raw_tree(
                dir,
                &[
                    ("100644", &readme, b"README"),
                    ("100644", &readme, b"README"),
                ],
            ),
            "duplicateEntries",
        ),
        (
            ".gitmodules that runs a command",
            raw_tree(
                dir,
                &[
                    ("100644", &gitmodules, b".gitmodules"),
                    ("100644", &readme, b"README"),
                ],
            ),
            "gitmodulesUrl",
        ),
    ];
    let deep = vec!["d"; 2100].join("/") + "/f";
    trees.push((
        "2,100 levels deep",
        commit_with_path(dir, base, &deep),
        "deeper than git checks out",
    ));
    let long = vec!["l".repeat(200); 21].join("/") + "/f";
    trees.push((
        "a 4 KiB path",
        commit_with_path(dir, base, &long),
        "bytes long; a checkout can write at most 4095",
    ));
    trees
}

/// Hostile trees from a runner, with no server build to stop them (`--no-verify`): a `.git`
/// entry in any spelling, duplicate entries, a `.gitmodules` that would run a command, a tree
/// 2,100 levels deep, a path no checkout can write. Each is refused as it arrives, with the
/// reason, charged to its task (its agent's work); the base never moves, every runner can
/// still check it out, and the repository passes `git fsck`.
#[test]
fn hostile_trees_are_refused_as_they_arrive_and_charged() {
    let repo = TestRepo::new();
    // One failure and a task needs help: nothing is leased again meanwhile.
    let server = Server::start(&repo, &["--no-verify", "--max-retries", "1"]);
    let mut fake = fake_runner(&repo, &server);
    let base = main_tip(&repo);
    let dir = forge(&repo);
    for (what, tree, says) in hostile_trees(&dir, &base) {
        let id = server.add(&["--title", what]);
        let a = fake.next_assignment();
        assert_eq!(a.base_commit, base);
        let (commit, bundle) = commit_and_bundle(&dir, &tree, &base, what);
        let refused = fake
            .complete(
                a.lease.expect("lease"),
                pb::LeaseOutcome::Verified,
                Some(commit),
                bundle,
            )
            .expect_err(what);
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{what}: {refused:?}"
        );
        assert!(
            refused.message().contains("commit refused") && refused.message().contains(says),
            "{what}: {}",
            refused.message()
        );
        let task = server.show(&id);
        assert_eq!(task["status"], "needs_help", "{what}: {task}");
        let dev = runs(&task)
            .into_iter()
            .find(|r| r["phase"] == "dev")
            .expect("a dev run");
        assert_eq!(dev["failure_kind"], "task", "{what}: {dev}");
        assert!(
            dev["error"].as_str().is_some_and(|e| e.contains(says)),
            "{what}: {dev}"
        );
    }
    assert_eq!(main_tip(&repo), base, "nothing landed");
    git(&repo.repo(), &["fsck", "--no-dangling"]);
    // A plain commit still lands.
    let id = server.add(&["--title", "plain"]);
    let a = fake.next_assignment();
    let readme = blob(&dir, "hello again\n");
    let tree = raw_tree(&dir, &[("100644", &readme, b"README")]);
    let (commit, bundle) = commit_and_bundle(&dir, &tree, &base, "plain");
    fake.complete(
        a.lease.expect("lease"),
        pb::LeaseOutcome::Verified,
        Some(commit),
        bundle,
    )
    .expect("a plain commit");
    server.wait_status(&id, "done");
    git(&repo.repo(), &["fsck", "--no-dangling"]);
}

/// A commit that passes reception but that the server's own build cannot check out (here its
/// repository allows 100 levels, and the tree has 150) failed the same way at every round: the
/// integrator retried once a second for ever, leaving a dangling commit each time, the task
/// Verified and never charged. Now a failure that repeats on the same input is the commit's:
/// the task is charged with git's reason and the base stays where it was.
#[test]
fn a_tree_the_server_cannot_check_out_is_charged_not_retried_for_ever() {
    let repo = TestRepo::new();
    git(&repo.repo(), &["config", "core.maxTreeDepth", "100"]);
    let server = Server::start(
        &repo,
        &[
            "--build-cmd",
            "true",
            "--backoff-base",
            "0",
            "--max-retries",
            "1",
        ],
    );
    let mut fake = fake_runner(&repo, &server);
    let base = main_tip(&repo);
    let dir = forge(&repo);
    let id = server.add(&["--title", "too deep for the server"]);
    let a = fake.next_assignment();
    let tree = commit_with_path(&dir, &base, &(vec!["d"; 150].join("/") + "/f"));
    let (commit, bundle) = commit_and_bundle(&dir, &tree, &base, "deep");
    fake.complete(
        a.lease.expect("lease"),
        pb::LeaseOutcome::Verified,
        Some(commit),
        bundle,
    )
    .expect("it passes reception");
    let task = server.wait_task(&id, "charged for its integration", |t| {
        runs(t)
            .iter()
            .any(|r| r["phase"] == "integrate" && r["failure_kind"] == "task")
    });
    let integrate: Vec<Value> = runs(&task)
        .into_iter()
        .filter(|r| r["phase"] == "integrate")
        .collect();
    let charged = integrate.last().expect("an integrate run");
    assert!(
        charged["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be checked out") && e.contains("tree depth")),
        "{charged}"
    );
    assert!(
        integrate.len() <= 4,
        "a few tries, not one a second for ever: {integrate:?}"
    );
    assert_eq!(main_tip(&repo), base, "the base did not move");
    assert_ne!(task["status"], "verified", "{task}");
}

/// A fake runner with `slots` slots, its work stream open.
fn fake_with_slots(
    repo: &TestRepo,
    server: &Server,
    slots: u32,
) -> pipeline_tests::fake_runner::FakeRunner {
    let mut fake = pipeline_tests::fake_runner::FakeRunner::register_with(
        &server.url,
        &repo.registration_token(),
        pb::RegisterRequest {
            name: "claimer".into(),
            slots,
            version: "test".into(),
            protocol_version: pipeline_proto::PROTOCOL_VERSION,
            ..Default::default()
        },
    )
    .expect("register");
    fake.open(vec![]).expect("open");
    fake
}

/// Sends `file` (with `content`) on the assignment's base as a Verified result that claims the
/// server's verification digest, as a runner that copies it from its assignment without
/// building anything can.
fn claim_verified(
    fake: &mut pipeline_tests::fake_runner::FakeRunner,
    dir: &Path,
    a: &pb::Assignment,
    file: &str,
) {
    let readme = git(dir, &["rev-parse", &format!("{}:README", a.base_commit)]);
    let added = blob(dir, "x\n");
    let mut entries: Vec<(&str, &str, &[u8])> = vec![("100644", &readme, b"README")];
    entries.push(("100644", &added, file.as_bytes()));
    entries.sort_by(|x, y| x.2.cmp(y.2));
    let tree = raw_tree(dir, &entries);
    let (commit, bundle) = commit_and_bundle(dir, &tree, &a.base_commit, file);
    report(fake, a, pb::LeaseOutcome::Verified, commit, bundle);
}

/// Sends a result for the assignment's lease under the server's verification digest (as a
/// runner that ran, or says it ran, the verification the assignment named).
fn report(
    fake: &mut pipeline_tests::fake_runner::FakeRunner,
    a: &pb::Assignment,
    outcome: pb::LeaseOutcome,
    commit: String,
    bundle: Vec<u8>,
) {
    let mut messages = pipeline_tests::fake_runner::complete_messages(
        &fake.id,
        a.lease.clone().expect("lease"),
        outcome,
        Some("test ! -e broken: exit 1".into()),
        1.0,
        Some(commit),
        bundle,
    );
    if let Some(pb::complete_lease_request::Kind::Header(h)) = messages[0].kind.as_mut() {
        h.verify_digest = a.verification.as_ref().map(|v| v.digest.clone());
    }
    fake.complete_raw(messages).expect("accepted");
}

/// The integrate runs of a task, from its JSON.
fn integrate_runs(task: &Value) -> Vec<Value> {
    runs(task)
        .into_iter()
        .filter(|r| r["phase"] == "integrate")
        .collect()
}

/// Two tasks in one train, the first from a runner that claimed the server's verification
/// without building (its commit breaks the build): the train's tip builds red, and the search
/// for the culprit took the claimed prefix as green without building it, so the innocent task
/// after it was charged and the broken one landed. A prefix counts as green in that search only
/// on the server's own build: the claimant is found red and charged, the other lands.
#[test]
fn a_runners_unchecked_claim_never_gets_another_task_charged() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--build-cmd",
            "test ! -e broken",
            "--backoff-base",
            "0",
            "--max-retries",
            "1",
        ],
    );
    let mut fake = fake_with_slots(&repo, &server, 2);
    let dir = forge(&repo);
    let base = main_tip(&repo);
    let liar = server.add(&[
        "--title",
        "claims green, breaks the build",
        "--priority",
        "1",
    ]);
    let innocent = server.add(&["--title", "fine", "--priority", "2"]);
    let first = fake.next_assignment();
    let second = fake.next_assignment();
    let (a_liar, a_innocent) = if first.task_id == liar {
        (first, second)
    } else {
        (second, first)
    };
    // Both verified before the integrator looks: one train of two.
    server.ctl(&["queue", "pause", "--landing"]).ok();
    claim_verified(&mut fake, &dir, &a_liar, "broken");
    claim_verified(&mut fake, &dir, &a_innocent, "fine");
    server.wait_status(&innocent, "verified");
    server.ctl(&["queue", "resume"]).ok();

    let charged = server.wait_task(&liar, "charged", |t| {
        integrate_runs(t)
            .iter()
            .any(|r| r["failure_kind"] == "task")
    });
    assert_ne!(charged["status"], "done", "{charged}");
    server.wait_status(&innocent, "done");
    let innocent_runs = integrate_runs(&server.show(&innocent));
    assert!(
        innocent_runs.iter().all(|r| r["failure_kind"] != "task"),
        "the innocent task was never charged: {innocent_runs:?}"
    );
    let tip = main_tip(&repo);
    assert_ne!(tip, base);
    assert!(
        pipeline_tests::git(&repo.repo(), &["ls-tree", "--name-only", &tip])
            .lines()
            .all(|f| f != "broken"),
        "the broken commit never landed"
    );
}

/// With `--verify-on-server always` no runner's word stands in for a build: a train of one on
/// the base its runner was leased on (which lands on the runner's word by default) is built by
/// the server, so a claim that lies is found out and charged, and an honest one lands covered
/// by the server's own build.
#[test]
fn verify_on_server_always_builds_what_runners_claim() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--build-cmd",
            "test ! -e broken",
            "--verify-on-server",
            "always",
            "--max-retries",
            "1",
        ],
    );
    let mut fake = fake_with_slots(&repo, &server, 1);
    let dir = forge(&repo);
    let base = main_tip(&repo);
    let liar = server.add(&["--title", "claims green, breaks the build"]);
    let a = fake.next_assignment();
    claim_verified(&mut fake, &dir, &a, "broken");
    let charged = server.wait_task(&liar, "charged", |t| {
        integrate_runs(t)
            .iter()
            .any(|r| r["failure_kind"] == "task")
    });
    assert_eq!(charged["status"], "needs_help", "{charged}");
    assert_eq!(main_tip(&repo), base, "nothing landed on the claim");

    let honest = server.add(&["--title", "claims green, is green"]);
    let a = fake.next_assignment();
    claim_verified(&mut fake, &dir, &a, "fine");
    let done = server.wait_status(&honest, "done");
    let landed = integrate_runs(&done);
    assert_eq!(
        landed.last().map(|r| r["builds"].clone()),
        Some(serde_json::json!(1)),
        "covered by the server's build: {landed:?}"
    );
}

/// A commit that lands on its runner's word alone (a train of one on the base it was leased
/// on, under `--verify-on-server when-needed`) is not thereby known green: when the next
/// task's runner reports a failed verification on it, that task is not charged on the first
/// runner's word. The server builds that base itself, finds it red, and charges no one.
#[test]
fn a_failure_on_a_base_that_landed_on_a_claim_is_not_charged_on_that_claim() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--build-cmd", "test ! -e broken"]);
    let mut fake = fake_with_slots(&repo, &server, 1);
    let dir = forge(&repo);
    let base = main_tip(&repo);
    let liar = server.add(&["--title", "claims green, breaks the build"]);
    let a = fake.next_assignment();
    claim_verified(&mut fake, &dir, &a, "broken");
    server.wait_status(&liar, "done");
    let broken_base = main_tip(&repo);
    assert_ne!(broken_base, base, "it landed on its runner's word");

    let next = server.add(&["--title", "fails on the broken base"]);
    let a = fake.next_assignment();
    assert_eq!(a.base_commit, broken_base);
    git(
        &dir,
        &[
            "fetch",
            "-q",
            "origin",
            "+refs/heads/main:refs/remotes/origin/main",
        ],
    );
    let readme = git(&dir, &["rev-parse", &format!("{broken_base}:README")]);
    let broken = git(&dir, &["rev-parse", &format!("{broken_base}:broken")]);
    let fine = blob(&dir, "fine\n");
    let tree = raw_tree(
        &dir,
        &[
            ("100644", &readme, b"README"),
            ("100644", &broken, b"broken"),
            ("100644", &fine, b"fine"),
        ],
    );
    let (commit, bundle) = commit_and_bundle(&dir, &tree, &broken_base, "fine");
    report(
        &mut fake,
        &a,
        pb::LeaseOutcome::VerifyFailed,
        commit,
        bundle,
    );
    // The server builds the base itself: red, so no one is charged.
    let status = pipeline_tests::wait_for("the base to be found red", || {
        let s = server.ctl(&["status", "--json"]).json();
        (s["landing"]["red_base"] == broken_base.as_str()).then_some(s)
    });
    assert_eq!(status["landing"]["red_base"], broken_base.as_str());
    let task = server.show(&next);
    assert_eq!(task["failures"], 0, "not charged: {task}");
    assert_eq!(task["status"], "verified", "its commit is kept: {task}");
}
