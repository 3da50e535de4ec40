//! The server's command line (`CONTRACT.md`), parsed by clap with a `PIPELINE_…` environment
//! variable behind every flag.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use pipeline_core::units;
pub use pipeline_runner::config::{AgentArgs, AgentMode, SandboxArgs, VerifyArgs, VerifyMode};
use serde::Serialize;

/// When the server builds a tree itself rather than take a runner's word that it verified it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyOnServer {
    /// A tree a runner verified under the server's verification, on a base that did not move,
    /// lands without the server building it again.
    #[default]
    WhenNeeded,
    /// Every tree the server lands is covered by its own build; no runner's report stands in.
    Always,
}

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

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "PIPELINE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PIPELINE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The CA that --local-runners trust for the server's certificate (PEM).
    #[arg(long, env = "PIPELINE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Serve the web page and the HTTP API (JSON, server-sent events) on this address too;
    /// HTTPS with --tls-cert/--tls-key. Port 0 picks a free one (the log says which).
    #[arg(long, env = "PIPELINE_HTTP")]
    pub http: Option<SocketAddr>,

    /// Server-sent event streams (the page's live updates and logs) open at once; more are
    /// refused (503) until one closes.
    #[arg(long, env = "PIPELINE_HTTP_MAX_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_streams: u32,

    /// Serve GET /metrics on the --http port without a credential (a Prometheus that scrapes
    /// without a token); by default it needs the viewer or the admin token.
    #[arg(long, env = "PIPELINE_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// Export tracing spans (a task's lease, run, result, train and landing, each carrying
    /// its task ID) as OTLP over HTTP/protobuf to this collector, e.g. http://localhost:4318
    /// (spans go to its /v1/traces; a URL whose path is given is used as it is).
    #[arg(long, env = "PIPELINE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// POST the events named by --webhook-events to this URL, signed as Standard Webhooks
    /// specifies (repeatable: each endpoint has its own queue); needs --webhook-secret-file.
    #[arg(
        long = "webhook",
        env = "PIPELINE_WEBHOOK",
        value_name = "URL",
        requires = "webhook_secret_file"
    )]
    pub webhooks: Vec<String>,

    /// The webhooks' signing secret: a file only its owner may read, holding
    /// whsec_<base64 of a 24 to 64 byte key>.
    #[arg(long, env = "PIPELINE_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// The events webhooks are sent, comma-separated [default: all]: task.done,
    /// task.needs_help, task.cancelled, landing.paused, landing.resumed, runner.unhealthy.
    #[arg(
        long,
        env = "PIPELINE_WEBHOOK_EVENTS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub webhook_events: Vec<String>,

    /// How long a webhook's receiver has to connect and answer (10s; a bare number is
    /// seconds); past it the attempt failed and is retried.
    #[arg(long, env = "PIPELINE_WEBHOOK_TIMEOUT", default_value = "10s", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub webhook_timeout: u64,

    /// The first wait before a failed webhook is tried again, in milliseconds (doubled after
    /// each failure, up to an hour): a knob for the tests.
    #[arg(
        long,
        env = "PIPELINE_WEBHOOK_BACKOFF_MS",
        default_value_t = 5000,
        hide = true
    )]
    pub webhook_backoff_ms: u64,

    /// The time limit on a webhook's attempt in milliseconds, overriding --webhook-timeout: a
    /// knob for the tests.
    #[arg(long, env = "PIPELINE_WEBHOOK_TIMEOUT_MS", hide = true)]
    pub webhook_timeout_ms: Option<u64>,

    /// Allow listening on a non-loopback address without TLS: anyone who can reach the port
    /// can then lease work, send commits and steer the queue.
    #[arg(long, env = "PIPELINE_INSECURE")]
    pub insecure: bool,

    /// Where the server keeps its database and files [default: <git common dir>/pipeline].
    #[arg(long, env = "PIPELINE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Database URL [default: sqlite://<state dir>/pipeline.db].
    #[arg(long, env = "PIPELINE_DB")]
    pub db: Option<String>,

    /// Start on an empty database although the repository shows an earlier pipeline's history
    /// (its refs, or Task-Id trailers on the base); new task IDs continue after the highest
    /// one found. Without it such a start is refused: the database was probably lost.
    #[arg(long, env = "PIPELINE_ACCEPT_EXISTING_HISTORY")]
    pub accept_existing_history: bool,

    /// Failed attempts before a task needs help (0 = no limit).
    #[arg(long, env = "PIPELINE_MAX_RETRIES", default_value_t = 5,
          allow_negative_numbers = true, value_parser = limit::<u32>)]
    pub max_retries: u32,

    /// A task's cost cap in cents (0 = unlimited).
    #[arg(long, env = "PIPELINE_MAX_TASK_COST", default_value_t = 0,
          allow_negative_numbers = true, value_parser = limit::<u64>)]
    pub max_task_cost: u64,

    /// An epic's cap in cents on what its children cost together, for an epic without its
    /// own `--max-cost` (0 = unlimited): once reached, its children are not leased again.
    #[arg(long, env = "PIPELINE_MAX_EPIC_COST", default_value_t = 0,
          allow_negative_numbers = true, value_parser = limit::<u64>)]
    pub max_epic_cost: u64,

    /// A MiniJinja template for the dev prompt, instead of the built-in one (see the README
    /// for its variables); checked at start-up.
    #[arg(long, env = "PIPELINE_PROMPT_TEMPLATE", value_name = "FILE")]
    pub prompt_template: Option<PathBuf>,

    /// Every verified task waits for a person's approval before it lands (pipelinectl task
    /// approve ID, or task reject ID --note TEXT), not only those added with --approval.
    #[arg(long, env = "PIPELINE_REQUIRE_APPROVAL")]
    pub require_approval: bool,

    /// Back-off after n failures is min(600 s, BACKOFF_BASE * 2^n) (a duration: 10s, or 10).
    #[arg(long, env = "PIPELINE_BACKOFF_BASE", default_value = "10s", value_name = "DURATION",
          value_parser = units::seconds)]
    pub backoff_base: u64,

    /// Leases a task may lose in a row (its runner died, froze or was cut off while on it)
    /// before it needs help (0 = no limit); they are not counted as its failures.
    #[arg(long, env = "PIPELINE_MAX_LOST_LEASES", default_value_t = 5,
          allow_negative_numbers = true, value_parser = limit::<u32>)]
    pub max_lost_leases: u32,

    /// How long a runner's lease lives without a heartbeat (30s, 2m; a bare number is seconds).
    /// With several servers, at least --leader-ttl plus 20s (a start-up warning says so).
    #[arg(long, env = "PIPELINE_LEASE_TTL", default_value = "30s", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub lease_ttl: u64,

    /// The URL clients reach this server at, as a standby names it to them when it refuses
    /// (`http://10.0.0.2:50051`) [default: http://<the listening address>].
    #[arg(long, env = "PIPELINE_ADVERTISE", value_name = "URL")]
    pub advertise: Option<String>,

    /// With several servers on one PostgreSQL database: how long the leader's lease lasts
    /// without a renewal, and so how soon a standby takes over (10s; a bare number is
    /// seconds). The leader stops writing a fifth of it before the lease ends.
    #[arg(long, env = "PIPELINE_LEADER_TTL", default_value = "10s", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub leader_ttl: u64,

    /// After each integration, push the base to this git remote (with a lease on its old value;
    /// a rejected push is retried after fetching, never forced).
    #[arg(long, env = "PIPELINE_PUSH_REMOTE")]
    pub push_remote: Option<String>,

    /// A run's log beyond this size keeps its head and tail, with a marker between (64MiB,
    /// 1GB; a bare number is bytes).
    #[arg(long, env = "PIPELINE_LOG_CAP_BYTES", default_value = "64MiB", value_name = "SIZE",
          value_parser = units::bytes)]
    pub log_cap_bytes: u64,

    /// Delete the logs of runs that finished longer ago than this (30d, 2w; a bare number is
    /// days; 0 keeps them).
    #[arg(long, env = "PIPELINE_LOG_RETENTION_DAYS", default_value = "0", value_name = "DAYS",
          value_parser = units::days)]
    pub log_retention_days: u64,

    /// Registrations allowed per minute from one credential (the registration token the fleet
    /// shares, or a runner's own).
    #[arg(
        long,
        env = "PIPELINE_MAX_REGISTRATIONS_PER_MINUTE",
        default_value_t = 600
    )]
    pub max_registrations_per_minute: usize,

    /// Registrations allowed per minute from one source address (an IPv6 /64 counts as one).
    #[arg(
        long,
        env = "PIPELINE_MAX_REGISTRATIONS_PER_ADDRESS",
        default_value_t = crate::auth::DEFAULT_REGISTRATIONS_PER_ADDRESS
    )]
    pub max_registrations_per_address: usize,

    /// Registrations allowed per minute under one runner name.
    #[arg(
        long,
        env = "PIPELINE_MAX_REGISTRATIONS_PER_NAME",
        default_value_t = crate::auth::DEFAULT_REGISTRATIONS_PER_NAME
    )]
    pub max_registrations_per_name: usize,

    /// Whether a runner's report that it verified a commit may stand in for the server's own
    /// build of that tree: `when-needed` (a train of one on a base that did not move lands
    /// without a server build) or `always` (the server builds every tree it lands itself).
    #[arg(
        long,
        env = "PIPELINE_VERIFY_ON_SERVER",
        value_enum,
        default_value_t = VerifyOnServer::WhenNeeded
    )]
    pub verify_on_server: VerifyOnServer,

    /// How long a runner name registered with the registration token stays reserved if its
    /// runner never connects (opens its work stream): then its credential is dropped and the
    /// name can be registered again (a bare number is seconds).
    #[arg(long, env = "PIPELINE_FREE_UNCONNECTED_NAMES_AFTER", default_value = "1h",
          value_name = "DURATION", value_parser = units::positive_seconds)]
    pub free_unconnected_names_after: u64,

    /// The most Verified tasks one merge train lands with one build (its tip's); a red tip is
    /// searched for its first red commit. 1 builds every task's commit on its own.
    #[arg(long, env = "PIPELINE_BATCH_MAX", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch_max: u32,

    /// Integration builds the server runs at once, each in a worktree of its own
    /// (`integration`, `integration-2`, ... in the state dir): with more than one, a red train's
    /// prefixes are built at once, so its culprit is found in about one build time instead of
    /// one build per halving.
    #[arg(long, env = "PIPELINE_BUILD_SLOTS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub build_slots: u32,

    /// How long a train's first Verified task waits for more before the train forms (at once
    /// when --batch-max tasks are in, or when no task is leased: no result can come): a wave
    /// of results, milliseconds apart, then goes in one train instead of a train of one that
    /// costs a full build while the rest arrive. A lone task its runner verified on the base as
    /// it is lands at once, without a build. `0` forms a train at once. A bare number is
    /// milliseconds.
    #[arg(long, env = "PIPELINE_GATHER_WINDOW", default_value = "250ms",
          value_name = "DURATION", value_parser = units::milliseconds)]
    pub gather_window: u64,

    /// The most merge trains built at once: each behind the first is built on the tip of the
    /// one ahead of it as if that had landed (speculatively), and lands only once it has; one
    /// whose train ahead does not land that tip is formed again on the base. The depth in use
    /// starts at 2 (or this, if lower), grows by 1 after a green train and halves after a red
    /// one. Each train has a build slot of its own (--build-slots is raised to it).
    #[arg(long, env = "PIPELINE_INTEGRATION_SLOTS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=8))]
    pub integration_slots: u32,

    /// Run train builds (each tip, each bisection prefix) on connected runners as build jobs,
    /// before new dev work, instead of on this machine: each runner fetches the exact commit,
    /// runs this server's verification in a clean worktree and reports green or red. With no
    /// runner able to build for --remote-build-wait, the server builds itself.
    #[arg(long, env = "PIPELINE_REMOTE_BUILDS")]
    pub remote_builds: bool,

    /// With --remote-builds: only runners with these labels take build jobs (repeatable;
    /// `KEY=VALUE` is one of a runner's --label, a bare `KEY` a label or the key of one).
    #[arg(
        long = "build-requires",
        env = "PIPELINE_BUILD_REQUIRES",
        value_name = "LABEL",
        value_delimiter = ',',
        requires = "remote_builds"
    )]
    pub build_requires: Vec<String>,

    /// With --remote-builds: how long a build waits while no connected runner can take it
    /// (none connected with the labels, or all drained or unhealthy) before the server builds
    /// it itself. A bare number is seconds.
    #[arg(long, env = "PIPELINE_REMOTE_BUILD_WAIT", default_value = "10s",
          value_name = "DURATION", value_parser = units::seconds, requires = "remote_builds")]
    pub remote_build_wait: u64,

    /// Take early offers: a runner sends its task's commit as soon as the agent made it,
    /// before its own verification ends, and the integrator builds the train that commit will
    /// ride while the runner verifies. The task still becomes verified only by the runner's
    /// result; a train built early is wasted when that verification fails.
    #[arg(long, env = "PIPELINE_EARLY_BUILDS")]
    pub early_builds: bool,

    /// Run until no task can make progress (none in progress or verified, and no open one
    /// that could be leased), then stop cleanly: exit 0, or 1 if any task needs help. For cron
    /// and CI jobs (the seed's `--once`).
    #[arg(long, env = "PIPELINE_EXIT_WHEN_IDLE")]
    pub exit_when_idle: bool,

    /// Read the state, print what would be leased (in lease order) and what would land (the
    /// next merge train), and exit without changing anything.
    #[arg(long, env = "PIPELINE_DRY_RUN", conflicts_with = "exit_when_idle")]
    pub dry_run: bool,

    /// Leases committed per database transaction when many are handed out at once (group
    /// commit); 1 commits each lease on its own.
    #[arg(long, env = "PIPELINE_DISPATCH_BATCH", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub dispatch_batch: u32,

    /// Connections open at once (keep it under the open-file limit, `ulimit -n`, less what git
    /// and the database need); past it new connections are closed as they arrive.
    #[arg(long, env = "PIPELINE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// How long a new connection has to finish its TLS and HTTP/2 handshake and send its
    /// first request before it is closed (a bare number is seconds).
    #[arg(long, env = "PIPELINE_HANDSHAKE_TIMEOUT", default_value = "10s", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub handshake_timeout: u64,

    /// The time between HTTP/2 pings on a connection that is otherwise quiet (a bare number
    /// is seconds).
    #[arg(long, env = "PIPELINE_KEEPALIVE_INTERVAL", default_value = "30s", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub keepalive_interval: u64,

    /// How long a peer has to answer a ping before its connection is closed (a bare number is
    /// seconds).
    #[arg(long, env = "PIPELINE_KEEPALIVE_TIMEOUT", default_value = "20s", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub keepalive_timeout: u64,

    /// How long a runner has to read a base bundle (FetchBase); past it the fetch is cut off
    /// and its git stopped (a bare number is seconds).
    #[arg(long, env = "PIPELINE_FETCH_BASE_TIMEOUT", default_value = "10m", value_name = "DURATION",
          value_parser = units::positive_seconds)]
    pub fetch_base_timeout: u64,

    /// The largest commit bundle a runner may send (256MiB, 1GiB; a bare number is bytes).
    #[arg(long, env = "PIPELINE_MAX_BUNDLE_BYTES", default_value = "256MiB", value_name = "SIZE",
          value_parser = units::bytes)]
    pub max_bundle_bytes: u64,

    #[command(flatten)]
    pub verify: VerifyArgs,

    /// Runners to start beside the server, over loopback.
    #[arg(long, env = "PIPELINE_LOCAL_RUNNERS", default_value_t = 0)]
    pub local_runners: u32,

    #[command(flatten)]
    pub agent: AgentArgs,

    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// A limit where 0 means none (`--max-retries`, the cost caps): a negative one is refused
/// saying so, rather than taken for an unknown flag.
fn limit<T: std::str::FromStr>(raw: &str) -> Result<T, String> {
    let raw = raw.trim();
    if raw.starts_with('-') {
        return Err("a limit is 0 or more; 0 means no limit".to_owned());
    }
    raw.parse()
        .map_err(|_| "a limit is a whole number, 0 or more; 0 means no limit".to_owned())
}

impl Config {
    /// The same settings with every path absolute, resolved against the current directory now:
    /// later the server and its git and build processes work in other directories, where a
    /// relative path would name something else.
    pub fn with_absolute_paths(mut self) -> Result<Self, String> {
        let abs = |p: &std::path::Path| {
            std::path::absolute(p)
                .map_err(|e| format!("cannot resolve the path {}: {e}", p.display()))
        };
        self.repo = abs(&self.repo)?;
        for p in [
            &mut self.state_dir,
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.tls_ca,
            &mut self.prompt_template,
            &mut self.webhook_secret_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = abs(p)?;
        }
        if let Some(db) = &self.db {
            let (scheme, rest) = match db.strip_prefix("sqlite://") {
                Some(rest) => ("sqlite://", rest),
                None => match db.strip_prefix("sqlite:") {
                    Some(rest) => ("sqlite:", rest),
                    None if !db.contains(':') => ("", db.as_str()),
                    None => ("", ""),
                },
            };
            let (path, query) = rest
                .split_once('?')
                .map_or((rest, None), |(p, q)| (p, Some(q)));
            if !path.is_empty() && !path.starts_with(':') {
                let mut url = format!("{scheme}{}", abs(std::path::Path::new(path))?.display());
                if let Some(q) = query {
                    url.push('?');
                    url.push_str(q);
                }
                self.db = Some(url);
            }
        }
        Ok(self)
    }

    /// Checks what clap cannot: combinations of flags.
    /// `--otlp-endpoint`'s URL for the spans: `http://HOST:PORT` alone gets OTLP's
    /// `/v1/traces`; a URL with its own path is used as it is.
    pub fn otlp_traces_url(&self) -> Option<Result<String, String>> {
        self.otlp_endpoint.as_deref().map(otlp_endpoint)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.agent.validate()?;
        if !self.listen.ip().is_loopback() && !self.insecure && self.tls_cert.is_none() {
            return Err(format!(
                "refusing to listen on {} without TLS: anyone who can reach it could lease work, \
                 send commits and steer the queue; pass --tls-cert and --tls-key, listen on a \
                 loopback address (127.0.0.1), or pass --insecure on a network you trust",
                self.listen
            ));
        }
        if let Some(http) = self.http
            && !http.ip().is_loopback()
            && !self.insecure
            && self.tls_cert.is_none()
        {
            return Err(format!(
                "refusing to serve the web page on {http} without TLS: tokens and session \
                 cookies would cross the network in clear; pass --tls-cert and --tls-key, use a \
                 loopback address (127.0.0.1), or pass --insecure on a network you trust"
            ));
        }
        if self.metrics_public && self.http.is_none() {
            return Err(
                "--metrics-public needs --http ADDR: /metrics is served on the web port".to_owned(),
            );
        }
        if let Some(url) = &self.otlp_endpoint {
            otlp_endpoint(url)?;
        }
        if let Some(remote) = &self.push_remote
            && (remote.is_empty()
                || remote.starts_with('-')
                || !remote
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "--push-remote {remote:?} must name a remote of the repository (e.g. origin)"
            ));
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

/// The OTLP/HTTP traces URL of `--otlp-endpoint URL`, or why it is refused.
pub fn otlp_endpoint(url: &str) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            format!(
                "--otlp-endpoint {url}: only http:// is supported (the exporter speaks plain \
                 HTTP); run a collector on this machine or a trusted network and name it with \
                 http://"
            )
        } else {
            format!("--otlp-endpoint {url}: expected an http:// URL, e.g. http://localhost:4318")
        });
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!(
            "--otlp-endpoint {url}: expected an http:// URL with a host, e.g. http://localhost:4318"
        ));
    }
    if path.is_empty() {
        Ok(format!("http://{host}/v1/traces"))
    } else {
        Ok(url.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_limit_is_refused_saying_that_0_means_none() {
        for flag in [
            "--max-retries",
            "--max-lost-leases",
            "--max-task-cost",
            "--max-epic-cost",
        ] {
            let err = Config::try_parse_from(["pipeline-server", "--repo", "/r", flag, "-1"])
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains(flag) && err.contains("0 means no limit"),
                "{flag}: {err}"
            );
            let ok = Config::try_parse_from(["pipeline-server", "--repo", "/r", flag, "0"]);
            assert!(ok.is_ok(), "{flag} 0");
        }
    }

    #[test]
    fn the_remote_builds_options_are_refused_without_remote_builds() {
        for (flag, value) in [
            ("--build-requires", "builder"),
            ("--remote-build-wait", "5s"),
        ] {
            let err = Config::try_parse_from(["pipeline-server", "--repo", "/r", flag, value])
                .expect_err("refused")
                .to_string();
            assert!(err.contains("--remote-builds"), "{flag}: {err}");
            let ok = Config::try_parse_from([
                "pipeline-server",
                "--repo",
                "/r",
                "--remote-builds",
                flag,
                value,
            ]);
            assert!(ok.is_ok(), "{flag} with --remote-builds");
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::try_parse_from(["pipeline-server", "--repo", "/r"]).expect("parse");
        assert_eq!(c.base, "main");
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!((c.max_retries, c.max_task_cost, c.backoff_base), (5, 0, 10));
        assert_eq!(c.lease_ttl, 30);
        assert_eq!(c.local_runners, 0);
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.fetch_base_timeout, 600);
        assert_eq!(
            (
                c.max_registrations_per_minute,
                c.max_registrations_per_address,
                c.max_registrations_per_name
            ),
            (600, 60, 20)
        );
        assert_eq!(
            (
                c.handshake_timeout,
                c.keepalive_interval,
                c.keepalive_timeout
            ),
            (10, 30, 20)
        );
        assert_eq!(c.agent.mode(), AgentMode::Agentd);
        assert_eq!(
            (c.agent.timeout, c.agent.max_iter, c.agent.max_cost),
            (1800, 80, 300)
        );
        assert_eq!((c.batch_max, c.integration_slots), (8, 1));
        assert_eq!(c.verify_on_server, VerifyOnServer::WhenNeeded);
        let c = Config::try_parse_from(["s", "--repo", "/r", "--verify-on-server", "always"])
            .expect("parse");
        assert_eq!(c.verify_on_server, VerifyOnServer::Always);
        assert!(
            Config::try_parse_from(["s", "--repo", "/r", "--verify-on-server", "never"]).is_err()
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn durations_and_sizes_take_units_and_bare_numbers_keep_their_meaning() {
        let c = Config::try_parse_from([
            "s",
            "--repo",
            "/r",
            "--lease-ttl",
            "2m",
            "--backoff-base",
            "1m",
            "--max-bundle-bytes",
            "1GiB",
            "--log-cap-bytes",
            "512KiB",
            "--log-retention-days",
            "2w",
            "--handshake-timeout",
            "5s",
            "--keepalive-interval",
            "1m",
            "--keepalive-timeout",
            "15",
            "--fetch-base-timeout",
            "1h",
            "--timeout",
            "45m",
            "--kill-grace",
            "3s",
        ])
        .expect("parse");
        assert_eq!((c.lease_ttl, c.backoff_base), (120, 60));
        assert_eq!((c.max_bundle_bytes, c.log_cap_bytes), (1 << 30, 512 << 10));
        assert_eq!(c.log_retention_days, 14);
        assert_eq!(
            (
                c.handshake_timeout,
                c.keepalive_interval,
                c.keepalive_timeout,
                c.fetch_base_timeout
            ),
            (5, 60, 15, 3600)
        );
        assert_eq!((c.agent.timeout, c.agent.kill_grace), (2700, 3));

        let c = Config::try_parse_from([
            "s",
            "--repo",
            "/r",
            "--lease-ttl",
            "45",
            "--max-bundle-bytes",
            "1000",
            "--log-retention-days",
            "7",
        ])
        .expect("parse");
        assert_eq!((c.lease_ttl, c.max_bundle_bytes), (45, 1000));
        assert_eq!(c.log_retention_days, 7);

        let defaults = Config::try_parse_from(["s", "--repo", "/r"]).expect("parse");
        assert_eq!(defaults.max_bundle_bytes, 256 * 1024 * 1024);
        assert_eq!(defaults.log_cap_bytes, 64 * 1024 * 1024);
        assert_eq!(defaults.log_retention_days, 0);

        for (flag, bad, says) in [
            ("--lease-ttl", "1500ms", "not a whole number of seconds"),
            ("--lease-ttl", "0s", "must be at least 1s"),
            ("--max-bundle-bytes", "lots", "is not a size"),
            ("--log-retention-days", "36h", "not a whole number of days"),
        ] {
            let err = Config::try_parse_from(["s", "--repo", "/r", flag, bad])
                .expect_err(bad)
                .to_string();
            assert!(err.contains(says), "{flag} {bad}: {err}");
        }
    }

    #[test]
    fn speculative_trains_are_accepted() {
        let c = Config::try_parse_from(["s", "--repo", "/r", "--integration-slots", "2"])
            .expect("parse");
        c.validate().expect("accepted");
        assert_eq!(
            (c.integration_slots, c.build_slots, c.gather_window),
            (2, 1, 250)
        );
        assert!(Config::try_parse_from(["s", "--repo", "/r", "--integration-slots", "9"]).is_err());
    }

    #[test]
    fn a_public_address_needs_insecure() {
        let c = Config::try_parse_from(["s", "--repo", "/r", "--listen", "0.0.0.0:50051"])
            .expect("parse");
        let err = c.validate().expect_err("refused");
        assert!(
            err.contains("refusing to listen on 0.0.0.0:50051 without TLS"),
            "{err}"
        );
        let c = Config::try_parse_from([
            "s",
            "--repo",
            "/r",
            "--listen",
            "0.0.0.0:50051",
            "--insecure",
        ])
        .expect("parse");
        assert!(c.validate().is_ok());
        let c =
            Config::try_parse_from(["s", "--repo", "/r", "--listen", "[::1]:1"]).expect("parse");
        assert!(c.validate().is_ok(), "IPv6 loopback is loopback");
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

    #[test]
    fn the_otlp_endpoint_gets_its_traces_path_or_a_reason() {
        assert_eq!(
            otlp_endpoint("http://localhost:4318").as_deref(),
            Ok("http://localhost:4318/v1/traces")
        );
        assert_eq!(
            otlp_endpoint("http://c:4318/custom/traces").as_deref(),
            Ok("http://c:4318/custom/traces")
        );
        assert!(
            otlp_endpoint("https://c:4318")
                .unwrap_err()
                .contains("only http://")
        );
        assert!(
            otlp_endpoint("c:4318")
                .unwrap_err()
                .contains("expected an http:// URL")
        );
    }
}
