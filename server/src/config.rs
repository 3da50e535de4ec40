//! The server's command line (`CONTRACT.md`), parsed by clap with a `PIPELINE_…` environment
//! variable behind every flag.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};
use serde::Serialize;

/// The pipeline coordinator: owns task state, the canonical git repository and the integration
/// worktree, and serves the gRPC API that `pipelinectl` and `pipeline-runner` use.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "pipeline-server", version)]
pub struct Config {
    /// The canonical git repository (bare or not).
    #[arg(long, env = "PIPELINE_REPO")]
    pub repo: PathBuf,

    /// The branch verified commits land on.
    #[arg(long, env = "PIPELINE_BASE_BRANCH", default_value = "main")]
    pub base: String,

    /// Address to serve gRPC on; port 0 picks a free one (the log says which).
    #[arg(long, env = "PIPELINE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Where the server keeps its database and files [default: <git common dir>/pipeline].
    #[arg(long, env = "PIPELINE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Database URL [default: sqlite://<state dir>/pipeline.db].
    #[arg(long, env = "PIPELINE_DB")]
    pub db: Option<String>,

    /// Failed attempts before a task needs help (0 = no limit).
    #[arg(long, env = "PIPELINE_MAX_RETRIES", default_value_t = 5)]
    pub max_retries: u32,

    /// A task's cost cap in cents (0 = unlimited).
    #[arg(long, env = "PIPELINE_MAX_TASK_COST", default_value_t = 0)]
    pub max_task_cost: u64,

    /// Back-off after n failures is min(600, BACKOFF_BASE * 2^n) seconds.
    #[arg(long, env = "PIPELINE_BACKOFF_BASE", default_value_t = 10)]
    pub backoff_base: u64,

    /// Seconds a runner's lease lives without a heartbeat.
    #[arg(long, env = "PIPELINE_LEASE_TTL", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_ttl: u64,

    /// The largest commit bundle a runner may send, in bytes.
    #[arg(long, env = "PIPELINE_MAX_BUNDLE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_bundle_bytes: u64,

    #[command(flatten)]
    pub verify: VerifyArgs,

    /// Runners to start beside the server, over loopback.
    #[arg(long, env = "PIPELINE_LOCAL_RUNNERS", default_value_t = 0)]
    pub local_runners: u32,

    #[command(flatten)]
    pub agent: AgentArgs,
}

/// How a commit is verified (the same flags on the server and the runner).
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

/// How agents run, for `--local-runners` (the same flags as `pipeline-runner`).
#[derive(Clone, Debug, Args, Serialize)]
pub struct AgentArgs {
    /// How the agent is started.
    #[arg(long, env = "PIPELINE_AGENT", value_enum, default_value_t = AgentMode::Agentd)]
    pub agent: AgentMode,

    /// With `--agent command`: the command, run through `sh -c` in the worktree.
    #[arg(long, env = "PIPELINE_AGENT_CMD")]
    pub agent_cmd: Option<String>,

    /// The agent's time limit in seconds.
    #[arg(long, env = "PIPELINE_AGENT_TIMEOUT", default_value_t = 1800)]
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    Agentd,
    Command,
}

impl Config {
    /// Checks what clap cannot: combinations of flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.agent.agent == AgentMode::Command && self.agent.agent_cmd.is_none() {
            return Err("--agent command needs --agent-cmd 'CMD'".to_owned());
        }
        if self.local_runners > 64 {
            return Err(format!(
                "--local-runners {} is too many for one machine (at most 64)",
                self.local_runners
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::try_parse_from(["pipeline-server", "--repo", "/r"]).expect("parse");
        assert_eq!(c.base, "main");
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!((c.max_retries, c.max_task_cost, c.backoff_base), (5, 0, 10));
        assert_eq!(c.lease_ttl, 30);
        assert_eq!(c.local_runners, 0);
        assert_eq!(c.agent.agent, AgentMode::Agentd);
        assert_eq!(
            (c.agent.timeout, c.agent.max_iter, c.agent.max_cost),
            (1800, 80, 300)
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn contradictions_are_refused() {
        assert!(
            Config::try_parse_from(["s", "--repo", "/r", "--no-verify", "--build-cmd", "make"])
                .is_err()
        );
        assert!(Config::try_parse_from(["s", "--repo", "/r", "--lease-ttl", "0"]).is_err());
        let c = Config::try_parse_from(["s", "--repo", "/r", "--agent", "command"]).expect("parse");
        assert!(c.validate().unwrap_err().contains("--agent-cmd"));
    }
}
