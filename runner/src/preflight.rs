//! What the runner checks before it registers: that the programs its agent needs exist (the
//! agent, git, `sh`) and that its work dir can be written. A runner missing one of them would
//! fail every task it takes; it refuses to start instead, with one line saying what is
//! missing. An `--agent-cmd` that starts with a relative path is resolved here, against the
//! directory the runner starts in (each task's worktree would resolve it differently).
//!
//! The verifier is not checked at start: which one runs is the server's to say, in each lease
//! (the runner's own flags serve only an older server that sends none). [`check_verifier`]
//! checks the one a lease will run when the lease comes, and `pipeline-server
//! --local-runners` checks its own with it before it starts.

use std::path::{Path, PathBuf};

use pipeline_core::verify::Verifier;

use crate::config::{AgentArgs, AgentMode};

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
    let word = words.into_iter().find(|w| !is_assignment(w))?;
    if SHELL_WORDS.contains(&word.as_str())
        || word.contains(['$', '`', '(', ')', ';', '|', '&', '<', '>', '*', '?', '~'])
        || (word.contains('/') && !word.starts_with('/'))
    {
        return None;
    }
    Some(word)
}

/// Whether a shell word is a variable assignment (`NAME=value`), not the program.
fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The words of a command line as written (split at blanks, quotes left as they are), each
/// with its byte offset.
fn raw_words(cmd: &str) -> Vec<(usize, &str)> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in cmd.char_indices() {
        match (c.is_ascii_whitespace(), start) {
            (true, Some(s)) => {
                words.push((s, &cmd[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, &cmd[s..]));
    }
    words
}

/// `cmd` with its program made absolute against `cwd`, when the program is a relative path
/// (`./agent.sh --fast`, `bin/agent`): `sh -c` runs it in each task's worktree, where the
/// path would name something else. `None` when there is nothing to resolve (a name looked up
/// on `PATH`, an absolute path, or something the shell interprets first). Refused, saying so,
/// when the path names no executable file there, or is written in a way (quoted) the runner
/// does not rewrite. `flag` names the command for the message.
pub fn resolve_relative_program(
    cmd: &str,
    cwd: &Path,
    flag: &str,
) -> Result<Option<String>, Missing> {
    let Ok(words) = shell_words::split(cmd) else {
        return Ok(None);
    };
    let Some(program) = words.iter().find(|w| !is_assignment(w)) else {
        return Ok(None);
    };
    if !program.contains('/')
        || program.starts_with('/')
        || program.contains(['$', '`', '~', '*', '?', '(', ')', ';', '|', '&', '<', '>'])
    {
        return Ok(None);
    }
    let joined = cwd.join(program);
    let absolute = std::path::absolute(&joined).unwrap_or(joined);
    if find_program(&absolute.display().to_string(), "").is_none() {
        return Err(Missing(format!(
            "the {flag} program {program} is not an executable file in {} (a relative program \
             is taken from the directory the runner starts in); give its absolute path, or \
             start the command with sh to run a script of the repository (sh {program})",
            cwd.display()
        )));
    }
    let as_written = raw_words(cmd)
        .into_iter()
        .find(|(_, w)| !is_assignment(w))
        .filter(|(_, w)| w == program);
    let Some((at, _)) = as_written else {
        return Err(Missing(format!(
            "the {flag} program {program} is a relative path written in quotes; give its \
             absolute path"
        )));
    };
    let quoted = pipeline_core::verify::shell_quote(&absolute.display().to_string());
    Ok(Some(format!(
        "{}{quoted}{}",
        &cmd[..at],
        &cmd[at + program.len()..]
    )))
}

/// Resolves a relative `--agent-cmd` program against `cwd` (see
/// [`resolve_relative_program`]); returns the command as it was written, when it changed.
pub fn resolve_agent_cmd(agent: &mut AgentArgs, cwd: &Path) -> Result<Option<String>, Missing> {
    let Some(cmd) = agent.agent_cmd.clone() else {
        return Ok(None);
    };
    match resolve_relative_program(&cmd, cwd, "--agent-cmd")? {
        Some(resolved) => {
            agent.agent_cmd = Some(resolved);
            Ok(Some(cmd))
        }
        None => Ok(None),
    }
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

/// Checks the agent and git against `path` (the runner's `PATH`, which agents and builds
/// inherit).
pub fn check_agent(agent: &AgentArgs, path: &str) -> Result<(), Missing> {
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
    Ok(())
}

/// Checks that the programs `verifier` starts are on `path` (or, given as absolute paths,
/// executable): `bild`, or the programs of the build and test commands as far as they can be
/// told without running them. The error says which one is missing and where it was looked
/// for; the caller says whose verification it is and what to do.
pub fn check_verifier(verifier: &Verifier, path: &str) -> Result<(), String> {
    let programs: Vec<(String, String)> = match verifier {
        Verifier::Off => Vec::new(),
        Verifier::Bild => vec![("bild".to_owned(), "bild".to_owned())],
        Verifier::Commands { build, test } => [("build", build), ("test", test)]
            .into_iter()
            .filter_map(|(what, cmd)| {
                let program = cmd.as_deref().and_then(command_program)?;
                Some((format!("the {what} command's program {program}"), program))
            })
            .collect(),
    };
    for (role, program) in programs {
        if find_program(&program, path).is_none() {
            return Err(if program.contains('/') {
                format!("{role} is not an executable file")
            } else {
                format!("{role} is not on PATH ({path})")
            });
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

/// How much a full disk must take again before the runner takes work after it.
const ROOM_PROBE_BYTES: usize = 1 << 20;

/// Whether the work dir's disk has room again after it was full: 1 MiB can be written there
/// (and is removed at once). `Err` says why not.
pub fn has_room(dir: &Path) -> Result<(), String> {
    let probe = dir.join(".pipeline-room-check");
    let written = std::fs::write(&probe, vec![0u8; ROOM_PROBE_BYTES]);
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| format!("cannot write 1 MiB in {}: {e}", dir.display()))
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
    fn a_relative_program_is_resolved_where_the_runner_starts() {
        let dir = tempfile::tempdir().expect("dir");
        let cwd = dir.path();
        std::fs::create_dir(cwd.join("bin")).expect("mkdir");
        use std::os::unix::fs::PermissionsExt;
        for tool in ["agent.sh", "bin/agent"] {
            std::fs::write(cwd.join(tool), "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(cwd.join(tool), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let at = |p: &str| pipeline_core::verify::shell_quote(&cwd.join(p).display().to_string());
        let resolve = |cmd: &str| resolve_relative_program(cmd, cwd, "--agent-cmd");
        assert_eq!(
            resolve("./agent.sh --fast 'a b' | tee log").expect("found"),
            Some(format!("{} --fast 'a b' | tee log", at("agent.sh")))
        );
        assert_eq!(
            resolve("  FOO=1 bin/agent").expect("found"),
            Some(format!("  FOO=1 {}", at("bin/agent")))
        );
        for untouched in [
            "my-agent --fast",
            "/opt/agent",
            "sh ./agent.sh",
            "$HOME/a",
            "",
        ] {
            assert_eq!(
                resolve(untouched).expect("nothing to do"),
                None,
                "{untouched:?}"
            );
        }
        let missing = resolve("./missing.sh").expect_err("missing");
        assert!(missing.0.contains("./missing.sh"), "{missing}");
        assert!(missing.0.contains(&cwd.display().to_string()), "{missing}");
        let quoted = resolve("'./agent.sh' --fast").expect_err("quoted");
        assert!(quoted.0.contains("absolute path"), "{quoted}");
    }

    #[test]
    fn a_verifier_is_checked_for_the_programs_it_starts() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().display().to_string();
        let cmds = |build: &str| Verifier::Commands {
            build: Some(build.to_owned()),
            test: Some("true".to_owned()),
        };
        assert!(check_verifier(&Verifier::Off, &path).is_ok());
        let bild = check_verifier(&Verifier::Bild, &path).expect_err("no bild");
        assert!(bild.starts_with("bild is not on PATH"), "{bild}");
        let make = check_verifier(&cmds("make -j4"), &path).expect_err("no make");
        assert!(make.contains("program make is not on PATH"), "{make}");
        // What the shell interprets first is left to run time.
        assert!(check_verifier(&cmds("./build.sh"), &path).is_ok());
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
