//! The runner's command line, and the agent and verification flags that `pipeline-server
//! --local-runners` shares with it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use pipeline_core::units;
use serde::Serialize;

/// Runs coding agents and verification for a pipeline server: registers, leases tasks, works in
/// local git worktrees, and sends one commit back per task.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "pipeline-runner", version)]
pub struct Config {
    /// The server's URL; several, separated by commas, for servers of which one leads (the
    /// runner follows the leader when one is unavailable or names it).
    #[arg(
        long,
        env = "PIPELINE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// This runner's name, unique among connected runners [default: the host name].
    #[arg(long, env = "PIPELINE_RUNNER_NAME")]
    pub name: Option<String>,

    /// Tasks worked on at once (one worktree each).
    #[arg(long, env = "PIPELINE_RUNNER_SLOTS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub slots: u32,

    /// Where the mirror and the worktrees live [default: ~/.cache/pipeline-runner/<name>].
    #[arg(long, env = "PIPELINE_RUNNER_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Labels describing this runner (repeat, or separate with commas).
    #[arg(long = "label", env = "PIPELINE_RUNNER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Take only the children of this task (an epic); repeat for several.
    #[arg(long = "only-parent", value_name = "ID", allow_hyphen_values = true)]
    pub only_parent: Vec<String>,

    /// Take only this task.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "only_parent",
        allow_hyphen_values = true
    )]
    pub only_task: Option<String>,

    /// Take one task, finish it (its result delivered, or its lease given back) and exit,
    /// with a status that says how it went: 0 verified (or stopped before any task came), 3
    /// the task's own failure, 4 no result taken (given back uncharged, or refused). For
    /// autoscalers that start a runner per job. Works one task at a time whatever --slots says.
    #[arg(long, env = "PIPELINE_RUNNER_ONCE")]
    pub once: bool,

    /// On SIGTERM/SIGINT, how long to let running tasks finish before giving them back (10m;
    /// a bare number is seconds).
    #[arg(long, env = "PIPELINE_DRAIN_TIMEOUT", default_value = "10m", value_name = "DURATION",
          value_parser = units::seconds)]
    pub drain_timeout: u64,

    /// The CA to trust for the server's certificate (PEM), for an https:// server.
    #[arg(long, env = "PIPELINE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The registration token (first start) or this runner's own credential [env:
    /// PIPELINE_RUNNER_TOKEN, else PIPELINE_TOKEN]. On the command line it is readable by
    /// other processes of this machine (`/proc/<pid>/cmdline`): prefer --token-file; from the
    /// environment it is taken out at start (the runner starts itself again without it).
    #[arg(long, env = "PIPELINE_RUNNER_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub token: Option<String>,

    /// A file holding the registration token (or this runner's own credential), read once at
    /// start; it wins over --token [default: $CREDENTIALS_DIRECTORY/pipeline-runner-token when
    /// systemd passes it].
    #[arg(long, env = "PIPELINE_RUNNER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    #[command(flatten)]
    pub agent: AgentArgs,

    #[command(flatten)]
    pub verify: VerifyArgs,

    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// Where agents and builds may read and write (the same flags on the server, for its own
/// builds and its `--local-runners`).
#[derive(Clone, Debug, Default, Args, Serialize)]
pub struct SandboxArgs {
    /// Run agents and builds unconfined: they can then read and write all this process can
    /// (its credential, the other worktrees, on a server its tokens and database). Without it,
    /// a machine without Landlock is refused.
    #[arg(long, env = "PIPELINE_NO_SANDBOX", conflicts_with_all = ["sandbox_read", "sandbox_write", "sandbox"])]
    pub no_sandbox: bool,

    /// The sandbox agents and builds run in: `landlock` (the kernel's), `user` (as the
    /// separate unprivileged user --sandbox-user, which needs root or CAP_SETUID, CAP_SETGID
    /// and CAP_CHOWN) or `off` (as --no-sandbox) [default: landlock where the kernel has it,
    /// else user where this process can switch to it, else refused].
    #[arg(long, env = "PIPELINE_SANDBOX", value_name = "KIND", value_parser = sandbox_kind)]
    pub sandbox: Option<pipeline_core::sandbox::Kind>,

    /// The user agents and builds run as under `--sandbox user`: a local unprivileged user
    /// that owns nothing of this process's [default: pipeline-sandbox].
    #[arg(long, env = "PIPELINE_SANDBOX_USER", value_name = "NAME")]
    pub sandbox_user: Option<String>,

    /// A directory (or file) agents and builds may read, besides the system's and the
    /// toolchains' (repeat, or separate with colons).
    #[arg(
        long = "sandbox-read",
        env = "PIPELINE_SANDBOX_READ",
        value_name = "PATH",
        value_delimiter = ':'
    )]
    pub sandbox_read: Vec<PathBuf>,

    /// A directory (or file) agents and builds may write, besides their worktree and temp dir
    /// (repeat, or separate with colons). Never one this process runs programs from.
    #[arg(
        long = "sandbox-write",
        env = "PIPELINE_SANDBOX_WRITE",
        value_name = "PATH",
        value_delimiter = ':'
    )]
    pub sandbox_write: Vec<PathBuf>,

    /// Paths kept out of the sandbox besides the runner's own (a server's state dir, for its
    /// local runners).
    #[arg(skip)]
    #[serde(skip)]
    pub deny: Vec<PathBuf>,
}

/// The systemd credential a runner reads its token from (`LoadCredential=pipeline-runner-token:…`).
pub const TOKEN_CREDENTIAL: &str = "pipeline-runner-token";

impl SandboxArgs {
    /// The sandbox agents and builds run in (`--sandbox`, `--no-sandbox`,
    /// [`Sandbox::choose`](pipeline_core::sandbox::Sandbox::choose)); refused, saying what to
    /// do, when it cannot be had. `deny` is kept out besides
    /// [`SandboxArgs::deny`]; the base grants are the system's ([`default_rules`]) and the flags'.
    ///
    /// [`default_rules`]: pipeline_core::sandbox::default_rules
    pub fn sandbox(&self, deny: &[PathBuf]) -> Result<pipeline_core::sandbox::Sandbox, String> {
        use pipeline_core::sandbox::{Kind, Sandbox, default_rules};
        let path = std::env::var("PATH").unwrap_or_default();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let mut base = default_rules(&path, home.as_deref());
        for p in self.sandbox_read.iter().chain(&self.sandbox_write) {
            if !p.exists() {
                tracing::warn!(path = %p.display(), "a --sandbox-read/--sandbox-write path does not exist (yet): agents and builds started once it exists get it");
            }
        }
        for p in &self.sandbox_read {
            base.read(std::path::absolute(p).unwrap_or_else(|_| p.clone()));
        }
        for p in &self.sandbox_write {
            base.write(std::path::absolute(p).unwrap_or_else(|_| p.clone()));
        }
        for p in deny.iter().chain(&self.deny) {
            base.deny(p);
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            base.deny(PathBuf::from(dir));
        }
        let wanted = if self.no_sandbox {
            Some(Kind::Off)
        } else {
            self.sandbox
        };
        if self.sandbox_user.is_some() && matches!(wanted, Some(Kind::Landlock | Kind::Off)) {
            return Err(format!(
                "--sandbox-user names the user of --sandbox user, not of --sandbox {}",
                wanted.map(Kind::as_str).unwrap_or_default()
            ));
        }
        Sandbox::choose(wanted, self.sandbox_user.as_deref(), base)
    }
}

/// `--sandbox`'s value: `landlock`, `user` or `off`.
fn sandbox_kind(word: &str) -> Result<pipeline_core::sandbox::Kind, String> {
    pipeline_core::sandbox::Kind::parse(word)
        .ok_or_else(|| format!("{word:?} is not a sandbox: landlock, user or off"))
}

/// How agents run (the same flags on `pipeline-server --local-runners`).
#[derive(Clone, Debug, Args, Serialize)]
pub struct AgentArgs {
    /// How the agent is started [default: agentd, or command when --agent-cmd is given].
    #[arg(long, env = "PIPELINE_AGENT", value_enum)]
    pub agent: Option<AgentMode>,

    /// The agent command, run through `sh -c` in the worktree (implies `--agent command`).
    #[arg(long, env = "PIPELINE_AGENT_CMD")]
    pub agent_cmd: Option<String>,

    /// The agent's time limit (30m, 2h; a bare number is seconds).
    #[arg(long, env = "PIPELINE_AGENT_TIMEOUT", default_value = "30m", value_name = "DURATION",
          value_parser = units::seconds)]
    pub timeout: u64,

    /// The agent's iteration limit (agentd).
    #[arg(long, env = "PIPELINE_AGENT_MAX_ITER", default_value_t = 80)]
    pub max_iter: u32,

    /// The agent's cost limit per run in cents (agentd).
    #[arg(long, env = "PIPELINE_AGENT_MAX_COST", default_value_t = 300)]
    pub max_cost: u64,

    /// The agent's model provider (agentd -p).
    #[arg(long, env = "PIPELINE_AGENT_PROVIDER")]
    pub provider: Option<String>,

    /// The model the agent uses (claude, codex, aider: passed as `--model`).
    #[arg(long, env = "PIPELINE_AGENT_MODEL")]
    pub model: Option<String>,

    /// The agent's turn limit (claude `--max-turns`).
    #[arg(long, env = "PIPELINE_AGENT_MAX_TURNS", default_value_t = 80,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_turns: u32,

    /// Prices per million tokens, for agents that report tokens but not money (codex): a
    /// JSON object {"MODEL": {"input": USD, "cached_input": USD, "output": USD}}, added to
    /// (and overriding) the shipped defaults.
    #[arg(long, env = "PIPELINE_PRICE_TABLE")]
    pub price_table: Option<PathBuf>,

    /// The agent leaves its change uncommitted: the runner commits it (with the task's title
    /// and its Task-Id trailer), amending the previous patchset when the prompt says so.
    /// Always on for aider.
    #[arg(long, env = "PIPELINE_COMMIT_FOR_AGENT")]
    pub commit_for_agent: bool,

    /// Start every attempt with a new agent session. By default an attempt that amends the
    /// previous patchset (after its verification failed) continues the agent's session with
    /// the feedback as its new message (`claude --resume`, `codex exec resume`), so the agent
    /// keeps its context.
    #[arg(long, env = "PIPELINE_NO_RESUME")]
    pub no_resume: bool,

    /// Environment variables agents and builds may inherit, besides PATH, HOME, USER, LOGNAME,
    /// SHELL, LANG, LC_ALL, LC_CTYPE, TZ, TMPDIR and TERM (repeat, or separate with commas).
    /// Nothing else of this process's environment reaches them, credentials included.
    #[arg(long = "env-allow", env = "PIPELINE_ENV_ALLOW", value_delimiter = ',')]
    pub env_allow: Vec<String>,

    /// The time between SIGTERM and SIGKILL when an agent or build is stopped (a bare number is
    /// seconds).
    #[arg(long, env = "PIPELINE_KILL_GRACE", default_value = "10s", value_name = "DURATION",
          value_parser = units::seconds)]
    pub kill_grace: u64,

    /// Infrastructure failures in a row (an agent or build tool that cannot start, a git or
    /// disk error) after which the runner takes no more work and shows as unhealthy.
    #[arg(long, env = "PIPELINE_MAX_INFRA_FAILURES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_infra_failures: u32,
}

/// Variables agents and builds always inherit (when the runner has them).
pub const DEFAULT_ENV_ALLOW: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "TERM",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    Agentd,
    Command,
    /// Claude Code (`claude -p --output-format stream-json`).
    Claude,
    /// OpenAI Codex CLI (`codex exec --json`).
    Codex,
    /// aider (`aider --message-file`).
    Aider,
}

impl AgentMode {
    /// The variables the agent needs from the runner's environment (its credentials and
    /// endpoints, as each documents them), added to the allow-list, and nothing else.
    pub fn env_allow(self) -> &'static [&'static str] {
        match self {
            AgentMode::Agentd | AgentMode::Command => &[],
            AgentMode::Claude => &[
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_AUTH_TOKEN",
                "ANTHROPIC_BASE_URL",
                "ANTHROPIC_MODEL",
                "CLAUDE_CONFIG_DIR",
                "CLAUDE_CODE_USE_BEDROCK",
                "CLAUDE_CODE_USE_VERTEX",
            ],
            AgentMode::Codex => &[
                "OPENAI_API_KEY",
                "CODEX_API_KEY",
                "OPENAI_BASE_URL",
                "CODEX_HOME",
            ],
            AgentMode::Aider => &[
                "OPENAI_API_KEY",
                "ANTHROPIC_API_KEY",
                "OPENROUTER_API_KEY",
                "GEMINI_API_KEY",
                "DEEPSEEK_API_KEY",
                "OPENAI_API_BASE",
            ],
        }
    }

    /// The program a preset runs; `None` for agentd and command (checked on their own).
    pub fn program(self) -> Option<&'static str> {
        match self {
            AgentMode::Agentd | AgentMode::Command => None,
            AgentMode::Claude => Some("claude"),
            AgentMode::Codex => Some("codex"),
            AgentMode::Aider => Some("aider"),
        }
    }

    /// What the agent must reach beyond its worktree: its own files in the home directory
    /// (its login, settings and sessions: written), and the directory its program really lives
    /// in (an installer's link on `PATH` leads there: read).
    fn preset_rules(self, path: &str) -> pipeline_core::sandbox::Rules {
        let mut rules = pipeline_core::sandbox::Rules::default();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let mut write: Vec<Option<PathBuf>> = Vec::new();
        match self {
            AgentMode::Agentd | AgentMode::Command => {}
            AgentMode::Claude => {
                write.push(
                    var("CLAUDE_CONFIG_DIR").or_else(|| home.as_ref().map(|h| h.join(".claude"))),
                );
                write.push(home.as_ref().map(|h| h.join(".claude.json")));
            }
            AgentMode::Codex => {
                write.push(var("CODEX_HOME").or_else(|| home.as_ref().map(|h| h.join(".codex"))));
            }
            AgentMode::Aider => write.push(home.as_ref().map(|h| h.join(".aider"))),
        }
        for dir in write.into_iter().flatten() {
            rules.write(dir);
        }
        if let Some(program) = self.program() {
            for dir in std::env::split_paths(path) {
                if let Ok(real) = std::fs::canonicalize(dir.join(program))
                    && let Some(parent) = real.parent()
                {
                    rules.read(parent);
                    break;
                }
            }
        }
        rules
    }

    /// The name usage reports carry.
    pub fn word(self) -> &'static str {
        match self {
            AgentMode::Agentd => "agentd",
            AgentMode::Command => "command",
            AgentMode::Claude => "claude",
            AgentMode::Codex => "codex",
            AgentMode::Aider => "aider",
        }
    }
}

/// How a commit is verified (the same flags on the server).
#[derive(Clone, Debug, Args, Serialize)]
pub struct VerifyArgs {
    /// The verifier: `bild NAMESPACE` then `bild --test NAMESPACE`.
    #[arg(long, env = "PIPELINE_VERIFY", value_enum, default_value_t = VerifyMode::Bild)]
    pub verify: VerifyMode,

    /// Build command, run through `sh -c` in the worktree with {namespace} replaced.
    #[arg(long, env = "PIPELINE_BUILD_CMD")]
    pub build_cmd: Option<String>,

    /// Test command, run through `sh -c` in the worktree with {namespace} replaced.
    #[arg(long, env = "PIPELINE_TEST_CMD")]
    pub test_cmd: Option<String>,

    /// Skip verification.
    #[arg(long, env = "PIPELINE_NO_VERIFY", conflicts_with_all = ["build_cmd", "test_cmd"])]
    pub no_verify: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Bild,
}

impl VerifyArgs {
    /// The verifier these flags ask for.
    pub fn verifier(&self) -> pipeline_core::verify::Verifier {
        use pipeline_core::verify::Verifier;
        if self.no_verify {
            Verifier::Off
        } else if self.build_cmd.is_some() || self.test_cmd.is_some() {
            Verifier::Commands {
                build: self.build_cmd.clone(),
                test: self.test_cmd.clone(),
            }
        } else {
            Verifier::Bild
        }
    }
}

impl AgentArgs {
    /// How the agent runs: `--agent`, or `command` when only `--agent-cmd` is given.
    pub fn mode(&self) -> AgentMode {
        match (self.agent, &self.agent_cmd) {
            (Some(mode), _) => mode,
            (None, Some(_)) => AgentMode::Command,
            (None, None) => AgentMode::Agentd,
        }
    }

    /// Checks what clap cannot: combinations of flags.
    pub fn validate(&self) -> Result<(), String> {
        match (self.mode(), &self.agent_cmd) {
            (AgentMode::Command, None) => Err("--agent command needs --agent-cmd 'CMD'".to_owned()),
            (AgentMode::Agentd, Some(_)) => Err(
                "--agent-cmd is for --agent command; with --agent agentd the runner starts \
                 agentd itself (drop one of them)"
                    .to_owned(),
            ),
            (mode @ (AgentMode::Claude | AgentMode::Codex | AgentMode::Aider), Some(_)) => {
                Err(format!(
                    "--agent-cmd is for --agent command; --agent {} runs {} itself (drop one \
                     of them)",
                    mode.word(),
                    mode.program().unwrap_or_default()
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn kill_grace(&self) -> Duration {
        Duration::from_secs(self.kill_grace)
    }

    /// What the agent may reach beyond what its build may: its preset's own files, and the
    /// files `--agent-cmd` names.
    pub fn sandbox_rules(&self, path: &str) -> pipeline_core::sandbox::Rules {
        let mut rules = self.mode().preset_rules(path);
        if let Some(cmd) = &self.agent_cmd {
            rules.named_in(cmd);
        }
        rules
    }

    /// The environment an agent or a build starts from: the allowed variables this process
    /// has (never a `PIPELINE_*` one: those are set per run).
    pub fn child_env(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| {
                !k.starts_with("PIPELINE_")
                    && (DEFAULT_ENV_ALLOW.contains(&k.as_str())
                        || self.env_allow.contains(k)
                        || self.mode().env_allow().contains(&k.as_str()))
            })
            .collect()
    }
}

impl Config {
    /// The credential given: `--token-file`'s (or the systemd credential's) content, else
    /// `--token`, else `PIPELINE_RUNNER_TOKEN`, else `PIPELINE_TOKEN` (the one name the runner
    /// and `pipelinectl` shared before each had its own; the specific name wins when both are
    /// set); `None` when there is none (a saved credential may do).
    pub fn token(&self) -> Result<Option<String>, String> {
        let given = self
            .token
            .clone()
            .or_else(|| std::env::var("PIPELINE_TOKEN").ok())
            .filter(|t| !t.trim().is_empty());
        let file = self.token_file.clone().or_else(|| {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
            let file = PathBuf::from(dir).join(TOKEN_CREDENTIAL);
            (given.is_none() && file.is_file()).then_some(file)
        });
        match file {
            Some(file) => {
                let token = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read the token file {}: {e}", file.display()))?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(format!("the token file {} is empty", file.display()));
                }
                Ok(Some(token.to_owned()))
            }
            None => Ok(given),
        }
    }

    /// Takes a token given through the environment (`PIPELINE_RUNNER_TOKEN`, `PIPELINE_TOKEN`)
    /// out of it for good: a process's environment is readable for its whole life (by its
    /// user's other processes, in `/proc/<pid>/environ`), and Rust cannot safely remove a
    /// variable from a running process's own. So, when either is set, the runner executes
    /// itself again (the same binary and arguments) without them, the token handed over
    /// through an inherited pipe named as `--token-file /dev/fd/N` (when no `--token-file` is
    /// given; the pipe is empty once read). Called once at start, before any thread;
    /// returns only when there is nothing to do, or with why it could not.
    pub fn shed_token_env(&self) -> Result<(), String> {
        const VARS: [&str; 2] = ["PIPELINE_RUNNER_TOKEN", "PIPELINE_TOKEN"];
        if !VARS.iter().any(|v| std::env::var_os(v).is_some()) {
            return Ok(());
        }
        let given = self
            .token
            .clone()
            .or_else(|| std::env::var("PIPELINE_TOKEN").ok())
            .filter(|t| !t.trim().is_empty());
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(arg0) = std::env::args_os().next() {
            std::os::unix::process::CommandExt::arg0(&mut command, arg0);
        }
        // Held until exec: its read end is the new process's token file.
        let mut _pipe = None;
        if let (None, Some(token)) = (&self.token_file, given) {
            use std::io::Write;
            // A pipe holds at least a page before a writer blocks (and nobody reads yet).
            if token.len() > 4000 {
                return Err("the token in the environment is longer than 4000 bytes; \
                            give it with --token-file"
                    .to_owned());
            }
            let (reader, mut writer) =
                std::io::pipe().map_err(|e| format!("cannot hand the token over (pipe): {e}"))?;
            writer
                .write_all(token.trim().as_bytes())
                .map_err(|e| format!("cannot hand the token over (pipe): {e}"))?;
            drop(writer);
            // std makes it close-on-exec; the new process must inherit it.
            rustix::io::fcntl_setfd(&reader, rustix::io::FdFlags::empty())
                .map_err(|e| format!("cannot hand the token over (pipe): {e}"))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
            args.push("--token-file".into());
            args.push(format!("/dev/fd/{fd}").into());
            _pipe = Some(reader);
        }
        command.args(args);
        for var in VARS {
            command.env_remove(var);
        }
        let e = std::os::unix::process::CommandExt::exec(&mut command);
        Err(format!(
            "cannot start again without the token in the environment: {e}"
        ))
    }

    /// Files holding credentials this runner was given, kept out of the sandbox.
    pub fn credential_files(&self) -> Vec<PathBuf> {
        self.token_file.iter().cloned().collect()
    }

    /// The runner's name: `--name`, or the host name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "runner".to_owned())
        })
    }

    /// The work directory: `--work-dir`, or `~/.cache/pipeline-runner/<name>`, absolute (git
    /// and agents run in other directories, where a relative path would name something else).
    pub fn work_dir(&self) -> PathBuf {
        let dir = self.work_dir.clone().unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
            home.join(".cache")
                .join("pipeline-runner")
                .join(self.name())
        });
        std::path::absolute(&dir).unwrap_or(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::try_parse_from(["pipeline-runner"]).expect("parse");
        assert_eq!(c.server, "http://127.0.0.1:50051");
        assert_eq!(c.slots, 2);
        assert_eq!(c.agent.mode(), AgentMode::Agentd);
        assert_eq!(
            (c.agent.timeout, c.agent.max_iter, c.agent.max_cost),
            (1800, 80, 300)
        );
        assert_eq!(c.verify.verify, VerifyMode::Bild);
        assert!(!c.verify.no_verify);
        assert_eq!((c.drain_timeout, c.agent.kill_grace), (600, 10));
    }

    #[test]
    fn durations_take_units_and_bare_numbers_are_seconds() {
        let c = Config::try_parse_from([
            "r",
            "--timeout",
            "30m",
            "--drain-timeout",
            "1h",
            "--kill-grace",
            "5s",
        ])
        .expect("parse");
        assert_eq!(
            (c.agent.timeout, c.drain_timeout, c.agent.kill_grace),
            (1800, 3600, 5)
        );
        let c = Config::try_parse_from(["r", "--timeout", "90", "--drain-timeout", "0"])
            .expect("parse");
        assert_eq!((c.agent.timeout, c.drain_timeout), (90, 0));
        let err = Config::try_parse_from(["r", "--timeout", "half an hour"])
            .expect_err("refused")
            .to_string();
        assert!(err.contains("write it like 90s, 10m or 2h"), "{err}");
    }

    #[test]
    fn command_mode_needs_a_command() {
        let c = Config::try_parse_from(["r", "--agent", "command"]).expect("parse");
        assert!(c.agent.validate().is_err());
        assert!(Config::try_parse_from(["r", "--slots", "0"]).is_err());
    }

    #[test]
    fn an_agent_command_alone_implies_command_mode() {
        let c = Config::try_parse_from(["r", "--agent-cmd", "my-agent"]).expect("parse");
        assert_eq!(c.agent.mode(), AgentMode::Command);
        assert!(c.agent.validate().is_ok());
        let c =
            Config::try_parse_from(["r", "--agent", "agentd", "--agent-cmd", "x"]).expect("parse");
        assert!(c.agent.validate().unwrap_err().contains("--agent-cmd"));
    }
}
