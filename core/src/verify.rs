//! Verification, the same on the runner and the server, in the modes of `CONTRACT.md`:
//! `bild NAMESPACE` then `bild --test NAMESPACE` (exit 2: not buildable, or no tests), or
//! build and test commands through `sh -c`, or off.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::process::{self, Spec, Stream, could_not_run, with_tail};
use crate::sandbox::Policy;

/// How commits are verified.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verifier {
    /// Verification is off.
    Off,
    /// `bild NAMESPACE`, then `bild --test NAMESPACE`; a task without a namespace skips it.
    Bild,
    /// Commands through `sh -c` in the worktree, `{namespace}` replaced (quoted).
    Commands {
        build: Option<String>,
        test: Option<String>,
    },
}

impl Verifier {
    /// The commands an operator gave (`--build-cmd`, `--test-cmd`), in order; none under
    /// `bild` or with verification off.
    pub fn commands(&self) -> impl Iterator<Item = &str> {
        let (build, test) = match self {
            Verifier::Commands { build, test } => (build.as_deref(), test.as_deref()),
            Verifier::Off | Verifier::Bild => (None, None),
        };
        build.into_iter().chain(test)
    }

    /// Names this policy: the same on every machine for the same mode and commands, different
    /// for any other (`v1:` and a SHA-256 of the mode and each command, length-prefixed). A
    /// runner's pass counts as a build of a tree only under the server's own digest.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut part = |p: &str| {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        };
        match self {
            Verifier::Off => part("off"),
            Verifier::Bild => part("bild"),
            Verifier::Commands { build, test } => {
                part("commands");
                for c in [build, test] {
                    match c {
                        Some(c) => {
                            part("some");
                            part(c);
                        }
                        None => part("none"),
                    }
                }
            }
        }
        let bytes = h.finalize();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("v1:{}", &hex[..32])
    }

    /// Whether a task with `namespace` has anything to verify.
    pub fn applies_to(&self, namespace: Option<&str>) -> bool {
        match self {
            Verifier::Off => false,
            Verifier::Bild => namespace.is_some(),
            Verifier::Commands { .. } => true,
        }
    }
}

/// What verification concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Nothing to verify, with why.
    Skipped(String),
    /// The reason, with the tail of the failing command's output.
    Fail(String),
    /// The verifier could not be run (missing, not executable): not the commit's fault.
    Infra(String),
    Cancelled,
}

/// Quotes `s` for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Where and how a verification runs.
#[derive(Clone, Copy, Debug)]
pub struct Build<'a> {
    /// The worktree.
    pub dir: &'a Path,
    /// The task's namespace.
    pub namespace: Option<&'a str>,
    /// The commands' whole environment (plus `PIPELINE_NAMESPACE`).
    pub env: &'a [(String, String)],
    pub kill_grace: std::time::Duration,
    /// What the commands may reach; `None`: no sandbox.
    pub sandbox: Option<&'a Policy>,
}

/// Verifies the worktree `build.dir` for a task with `build.namespace`. The commands get
/// exactly `build.env` (plus `PIPELINE_NAMESPACE`), nothing else of this process's
/// environment, and run in `build.sandbox`.
pub async fn verify(
    verifier: &Verifier,
    build: &Build<'_>,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Stream, &str),
) -> Verdict {
    let Build {
        dir,
        namespace,
        env,
        kill_grace,
        sandbox,
    } = *build;
    if *verifier == Verifier::Off {
        return Verdict::Skipped("verification is off (--no-verify)".to_owned());
    }
    let mut env = env.to_vec();
    env.push((
        "PIPELINE_NAMESPACE".to_owned(),
        namespace.unwrap_or_default().to_owned(),
    ));
    let run = |script: String| Spec {
        env: env.clone(),
        clear_env: true,
        kill_grace,
        sandbox: sandbox.cloned(),
        ..Spec::shell(&script, dir.to_path_buf())
    };
    if let Verifier::Commands { build, test } = verifier {
        let quoted = shell_quote(namespace.unwrap_or_default());
        for (what, cmd) in [("build", build), ("tests", test)] {
            let Some(cmd) = cmd else { continue };
            // The command as run, not its template, is what a person needs to see.
            let command = cmd.replace("{namespace}", &quoted);
            let spec = run(command.clone());
            match process::run(&spec, cancel, &mut on_line).await {
                Ok(f) if f.cancelled => return Verdict::Cancelled,
                Ok(f) if f.success() => {}
                Ok(f) if could_not_run(f.code()) => {
                    return Verdict::Infra(with_tail(
                        format!(
                            "the {what} command could not be run ({}): {command}",
                            f.describe()
                        ),
                        &f.tail,
                    ));
                }
                Ok(f) => {
                    return Verdict::Fail(with_tail(
                        format!("{what} failed ({}): {command}", f.describe()),
                        &f.tail,
                    ));
                }
                Err(e) => {
                    return Verdict::Infra(format!("cannot run the {what} command {command}: {e}"));
                }
            }
        }
        return Verdict::Pass;
    }
    let Some(ns) = namespace else {
        return Verdict::Skipped("the task has no namespace".to_owned());
    };
    let bild = |args: &[&str]| Spec {
        program: "bild".into(),
        args: args.iter().map(Into::into).collect(),
        ..run(String::new())
    };
    match process::run(&bild(&[ns]), cancel, &mut on_line).await {
        Ok(f) if f.cancelled => return Verdict::Cancelled,
        Ok(f) if f.success() => {}
        Ok(f) if f.code() == Some(2) => {
            return Verdict::Skipped(format!("{ns} is not buildable (bild exit 2)"));
        }
        Ok(f) => {
            return Verdict::Fail(with_tail(
                format!("build failed for {ns} ({})", f.describe()),
                &f.tail,
            ));
        }
        Err(e) => return Verdict::Infra(format!("cannot run bild {ns}: {e}")),
    }
    match process::run(&bild(&["--test", ns]), cancel, &mut on_line).await {
        Ok(f) if f.cancelled => Verdict::Cancelled,
        // No tests (exit 2): the build passed, and that is all there is to verify.
        Ok(f) if f.success() || f.code() == Some(2) => Verdict::Pass,
        Ok(f) => Verdict::Fail(with_tail(
            format!("tests failed for {ns} ({})", f.describe()),
            &f.tail,
        )),
        Err(e) => Verdict::Infra(format!("cannot run bild --test {ns}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::{Verifier, shell_quote};

    #[test]
    fn digests_tell_policies_apart_and_agree_on_the_same_one() {
        let cmds = |b: Option<&str>, t: Option<&str>| Verifier::Commands {
            build: b.map(str::to_owned),
            test: t.map(str::to_owned),
        };
        let all = [
            Verifier::Off,
            Verifier::Bild,
            cmds(Some("make"), None),
            cmds(None, Some("make")),
            cmds(Some("make"), Some("make test")),
            cmds(Some("ma"), Some("kemake test")),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(a.digest().starts_with("v1:"));
            assert_eq!(a.digest(), a.clone().digest());
            for b in &all[i + 1..] {
                assert_ne!(a.digest(), b.digest(), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn the_commands_are_the_operators_in_order() {
        let cmds = Verifier::Commands {
            build: Some("make".into()),
            test: Some("make test".into()),
        };
        assert_eq!(cmds.commands().collect::<Vec<_>>(), ["make", "make test"]);
        let test_only = Verifier::Commands {
            build: None,
            test: Some("make test".into()),
        };
        assert_eq!(test_only.commands().collect::<Vec<_>>(), ["make test"]);
        assert_eq!(Verifier::Bild.commands().count(), 0);
        assert_eq!(Verifier::Off.commands().count(), 0);
    }

    #[test]
    fn quoting_survives_hostile_namespaces() {
        assert_eq!(shell_quote("Omni/A.hs"), "'Omni/A.hs'");
        assert_eq!(shell_quote("a'b; rm -rf /"), r"'a'\''b; rm -rf /'");
    }
}
