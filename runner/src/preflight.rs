//! What the runner checks before it registers: that the programs it will start exist (the
//! agent, the verifier, git) and that its work dir can be written. A runner missing one of them
//! would fail every task it takes; it refuses to start instead, with one line saying what is
//! missing.

use std::path::{Path, PathBuf};

use crate::config::{AgentArgs, AgentMode, VerifyArgs};

/// Why the runner cannot start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Missing(pub String);

/// Shell words that are not programs: a command starting with one is not checked.
const SHELL_WORDS: &[&str] = &[
    "exec", "cd", "if", "for", "while", "until", "case", "set", "export", "eval", ".", "source",
    "{", "(", "!", "command", "env", "nice", "nohup", "time", "timeout", "true", "false", ":",
];

/// The program a `sh -c` command line starts, when it can be told without running it: the first
/// word after any `NAME=value` assignments, if it is a plain name (looked up on `PATH`) or an
/// absolute path. `None` for anything the shell interprets first (builtins, expansions,
/// relative paths, which resolve in the worktree).
pub fn command_program(cmd: &str) -> Option<String> {
    let words = shell_words::split(cmd).ok()?;
    let word = words
        .into_iter()
        .find(|w| !(w.contains('=') && !w.starts_with('=') && !w.contains('/')))?;
    if SHELL_WORDS.contains(&word.as_str())
        || word.contains(['$', '`', '(', ')', ';', '|', '&', '<', '>', '*', '?', '~'])
        || (word.contains('/') && !word.starts_with('/'))
    {
        return None;
    }
    Some(word)
}

/// Where `program` is: an absolute path that is an executable file, or the first executable
/// `program` in the directories of `path`.
pub fn find_program(program: &str, path: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

fn require(program: &str, path: &str, role: &str, fix: &str) -> Result<(), Missing> {
    if find_program(program, path).is_some() {
        return Ok(());
    }
    let where_ = if program.contains('/') {
        "is not an executable file".to_owned()
    } else {
        format!("is not on PATH ({path})")
    };
    Err(Missing(format!("{role} {program} {where_}; {fix}")))
}

/// Checks the agent, the verifier and git against `path` (the runner's `PATH`, which agents and
/// builds inherit).
pub fn check_programs(agent: &AgentArgs, verify: &VerifyArgs, path: &str) -> Result<(), Missing> {
    require("git", path, "git:", "install git")?;
    match agent.mode() {
        AgentMode::Agentd => require(
            "agentd",
            path,
            "the agent program",
            "install agentd, or run another agent with --agent command --agent-cmd 'CMD'",
        )?,
        mode @ (AgentMode::Claude | AgentMode::Codex | AgentMode::Aider) => {
            let program = mode.program().unwrap_or_default();
            require(
                program,
                path,
                "the agent program",
                &format!("install {program}, or choose another --agent"),
            )?;
        }
        AgentMode::Command => {
            require("sh", path, "the shell", "agent commands run through sh -c")?;
            if let Some(program) = agent.agent_cmd.as_deref().and_then(command_program) {
                require(
                    &program,
                    path,
                    "the --agent-cmd program",
                    "install it or fix --agent-cmd",
                )?;
            }
        }
    }
    if verify.no_verify {
        return Ok(());
    }
    if verify.build_cmd.is_none() && verify.test_cmd.is_none() {
        return require(
            "bild",
            path,
            "the verifier",
            "install bild, or verify with --build-cmd/--test-cmd, or pass --no-verify",
        );
    }
    for (flag, cmd) in [
        ("--build-cmd", &verify.build_cmd),
        ("--test-cmd", &verify.test_cmd),
    ] {
        if let Some(program) = cmd.as_deref().and_then(command_program) {
            require(
                &program,
                path,
                &format!("the {flag} program"),
                &format!("install it or fix {flag}"),
            )?;
        }
    }
    Ok(())
}

/// Creates the work dir if needed and checks a file can be written there.
/// The agent's own account of its version (`claude --version`, …), for the log; `None` for
/// agentd and command, or when it says nothing within 10 s.
pub async fn agent_version(agent: &AgentArgs, path: &str) -> Option<String> {
    let program = agent.mode().program()?;
    let found = find_program(program, path)?;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::process::Command::new(&found)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| format!("{program} {line}"))
}

pub fn check_work_dir(dir: &Path) -> Result<(), Missing> {
    let fail = |e: std::io::Error| {
        Missing(format!(
            "the work dir {} cannot be written: {e}; pass a writable --work-dir",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(".pipeline-write-check");
    std::fs::write(&probe, b"ok").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_of_a_command_line() {
        for (cmd, program) in [
            ("my-agent --fast", Some("my-agent")),
            ("/opt/bin/agent -x 'a b'", Some("/opt/bin/agent")),
            ("FOO=1 BAR=2 claude -p", Some("claude")),
            ("sh agent.sh", Some("sh")),
            ("./agent.sh", None),
            ("exec agent", None),
            ("$HOME/agent", None),
            ("cd x && make", None),
            ("'unbalanced", None),
            ("", None),
        ] {
            assert_eq!(command_program(cmd).as_deref(), program, "{cmd:?}");
        }
    }

    #[test]
    fn programs_are_found_on_the_path_or_by_absolute_path() {
        let dir = tempfile::tempdir().expect("dir");
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").expect("write");
        let path = format!("/nonexistent:{}", dir.path().display());
        assert!(find_program("tool", &path).is_none(), "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_program("tool", &path), Some(tool.clone()));
        assert_eq!(find_program(tool.to_str().expect("utf-8"), ""), Some(tool));
        assert!(find_program("missing", &path).is_none());
    }
}
