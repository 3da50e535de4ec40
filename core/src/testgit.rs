//! Git for unit tests that build a repository by hand (feature `test-support`; a
//! dev-dependency only, never in a binary): a command that must succeed, and a commit of one
//! file. The end-to-end tests have their own (`pipeline_tests::git`, with an isolated home).

use std::path::Path;

use crate::ids::CommitId;

/// Runs `git -C dir ARGS` with a test identity; panics with its output if it fails; returns
/// stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=T", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Writes `file` in `dir` (its content its name), commits it with `message`; returns the commit.
pub fn commit(dir: &Path, file: &str, message: &str) -> CommitId {
    std::fs::write(dir.join(file), file).expect("write");
    git(dir, &["add", file]);
    git(dir, &["commit", "-q", "-m", message]);
    CommitId::parse(&git(dir, &["rev-parse", "HEAD"])).expect("id")
}
