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
