//! The server's Prometheus metrics: one registry (`prometheus-client`), process-local, as
//! Prometheus expects (counters start at zero with the process).
//!
//! Each counter and histogram is updated at the one place its thing happens: a lease and its
//! dispatch latency where leases are committed (`coordinator/dispatch.rs`), runs, landings and
//! agent usage where a committed write ends them (`Coordinator::committed`), trains where one
//! ends (`coordinator/integration.rs`), integration builds in the server's builder
//! (`build.rs`), log lines in the log writer, database write latency and errors around the
//! SQLite store's write transactions. The gauges (`pipeline_tasks{status}`, `pipeline_runners`,
//! the pauses, `pipeline_leader`) are read at scrape time from what the server keeps in memory
//! ([`Scrape`]): no query scans the tasks, so a scrape costs the same with a million of them.
//!
//! Dispatch latency is the time from the moment a task could first be leased as far as the
//! server knows (the later of its last change, which is when it became open or its last
//! dependency was done, and the end of its back-off) to the commit of its lease: how long a
//! ready task waited for a runner.
//!
//! This module sits in the lowest layer: it names nothing of the crate, so every layer may
//! report to it.

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A run's phases, as `pipeline_runs_total{phase}` names them.
pub const PHASES: [&str; 3] = ["dev", "verify", "integrate"];
/// How a run ended, as `pipeline_runs_total{outcome}` names it.
pub const OUTCOMES: [&str; 4] = ["success", "task_failure", "infrastructure", "cancelled"];
/// An integration build's results.
pub const BUILD_RESULTS: [&str; 5] = ["green", "red", "cancelled", "no_checkout", "error"];
/// A merge train's outcomes (as the store records them).
pub const TRAIN_OUTCOMES: [&str; 6] = [
    "landed",
    "red",
    "red_base",
    "gave_up",
    "nothing_landed",
    "error",
];

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub phase: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub agent: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub agent: String,
    pub model: String,
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Durations from 5 ms to about 11 hours (runs, dispatch waits).
fn long_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.5, 17))
}

/// Durations from 50 µs to about 6 s (database writes).
fn short_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.5, 14))
}

/// Every family the server exports.
pub struct Metrics {
    registry: Registry,
    /// Serializes a scrape's gauge updates and its encoding.
    render: Mutex<()>,
    pub tasks_landed: Counter,
    pub leases: Counter,
    pub dispatch_latency: Histogram,
    pub runs: Family<RunLabels, Counter>,
    pub run_duration: HistogramFamily<PhaseLabel>,
    pub integration_builds: Family<ResultLabel, Counter>,
    pub trains: Family<OutcomeLabel, Counter>,
    pub log_lines: Counter,
    pub agent_cost_cents: Family<AgentLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub agent_tokens: Family<TokenLabels, Counter>,
    pub db_write: Histogram,
    pub db_errors: Counter,
    tasks: Family<StatusLabel, Gauge>,
    runners: Family<StateLabel, Gauge>,
    queue_paused: Gauge,
    landing_paused: Gauge,
    leader: Gauge,
}

/// What a scrape reads from the server's memory.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Tasks by status (every status, zeros included).
    pub tasks: Vec<(&'static str, u64)>,
    /// Runners by state (every state, zeros included).
    pub runners: Vec<(&'static str, u64)>,
    pub queue_paused: bool,
    pub landing_paused: bool,
    pub leader: bool,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            render: Mutex::new(()),
            tasks_landed: Counter::default(),
            leases: Counter::default(),
            dispatch_latency: long_buckets(),
            runs: Family::default(),
            run_duration: Family::new_with_constructor(long_buckets),
            integration_builds: Family::default(),
            trains: Family::default(),
            log_lines: Counter::default(),
            agent_cost_cents: Family::default(),
            agent_tokens: Family::default(),
            db_write: short_buckets(),
            db_errors: Counter::default(),
            tasks: Family::default(),
            runners: Family::default(),
            queue_paused: Gauge::default(),
            landing_paused: Gauge::default(),
            leader: Gauge::default(),
        };
        // Counters are registered without their `_total`, which the encoder adds.
        registry.register("pipeline_tasks", "Tasks by status", m.tasks.clone());
        registry.register(
            "pipeline_tasks_landed",
            "Tasks landed on the base by this process",
            m.tasks_landed.clone(),
        );
        registry.register(
            "pipeline_leases",
            "Leases handed to runners",
            m.leases.clone(),
        );
        registry.register(
            "pipeline_dispatch_latency_seconds",
            "From a task being ready to lease (its last change or its back-off's end) to its lease",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "pipeline_runs",
            "Runs ended, by phase and outcome (success, task_failure, infrastructure, cancelled)",
            m.runs.clone(),
        );
        registry.register(
            "pipeline_run_duration_seconds",
            "How long runs took, by phase",
            m.run_duration.clone(),
        );
        registry.register(
            "pipeline_integration_builds",
            "The server's integration builds, by result",
            m.integration_builds.clone(),
        );
        registry.register(
            "pipeline_trains",
            "Merge trains ended, by outcome",
            m.trains.clone(),
        );
        registry.register("pipeline_runners", "Runners by state", m.runners.clone());
        registry.register(
            "pipeline_log_lines",
            "Log lines stored",
            m.log_lines.clone(),
        );
        registry.register(
            "pipeline_agent_cost_cents",
            "What agents cost, in cents, by agent and model",
            m.agent_cost_cents.clone(),
        );
        registry.register(
            "pipeline_agent_tokens",
            "Tokens agents used, by agent, model and kind",
            m.agent_tokens.clone(),
        );
        registry.register(
            "pipeline_db_write_seconds",
            "How long the database's write transactions took",
            m.db_write.clone(),
        );
        registry.register(
            "pipeline_db_errors",
            "Database writes that failed",
            m.db_errors.clone(),
        );
        registry.register(
            "pipeline_queue_paused",
            "1 while new leases are paused",
            m.queue_paused.clone(),
        );
        registry.register(
            "pipeline_landing_paused",
            "1 while landing is paused",
            m.landing_paused.clone(),
        );
        registry.register(
            "pipeline_leader",
            "1 on a server that leads",
            m.leader.clone(),
        );
        // The label values known in advance start at zero, so a rate over them is defined
        // from the first scrape (Prometheus's advice for labelled counters).
        for phase in PHASES {
            for outcome in OUTCOMES {
                drop(m.runs.get_or_create(&RunLabels {
                    phase: phase.to_owned(),
                    outcome: outcome.to_owned(),
                }));
            }
            drop(m.run_duration.get_or_create(&PhaseLabel {
                phase: phase.to_owned(),
            }));
        }
        for result in BUILD_RESULTS {
            drop(m.integration_builds.get_or_create(&ResultLabel {
                result: result.to_owned(),
            }));
        }
        for outcome in TRAIN_OUTCOMES {
            drop(m.trains.get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            }));
        }
        Self { registry, ..m }
    }

    /// The text of a scrape (OpenMetrics, which Prometheus reads), with the gauges set from
    /// `now`.
    pub fn render(&self, now: &Scrape) -> String {
        let _one = self
            .render
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (status, n) in &now.tasks {
            self.tasks
                .get_or_create(&StatusLabel {
                    status: (*status).to_owned(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        for (state, n) in &now.runners {
            self.runners
                .get_or_create(&StateLabel {
                    state: (*state).to_owned(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.queue_paused.set(i64::from(now.queue_paused));
        self.landing_paused.set(i64::from(now.landing_paused));
        self.leader.set(i64::from(now.leader));
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String fails only on a label that cannot be encoded.
            out.push_str(&format!("# error: cannot encode the metrics: {e}\n"));
        }
        out
    }

    /// A run ended: `phase` (dev, verify, integrate), `outcome` (success, task_failure,
    /// infrastructure, cancelled), how long it took when known.
    pub fn run_ended(&self, phase: &str, outcome: &str, seconds: Option<f64>) {
        self.runs
            .get_or_create(&RunLabels {
                phase: phase.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if let Some(s) = seconds {
            self.run_duration
                .get_or_create(&PhaseLabel {
                    phase: phase.to_owned(),
                })
                .observe(s.max(0.0));
        }
    }

    /// An agent's usage: its cost and tokens by kind (`input`, `cached_input`, `cache_write`,
    /// `output`, `reasoning`).
    pub fn agent_used(&self, agent: &str, model: &str, cost_cents: f64, tokens: &[(&str, u64)]) {
        let labels = AgentLabels {
            agent: agent.to_owned(),
            model: model.to_owned(),
        };
        if cost_cents > 0.0 {
            self.agent_cost_cents
                .get_or_create(&labels)
                .inc_by(cost_cents);
        }
        for (kind, n) in tokens {
            if *n > 0 {
                self.agent_tokens
                    .get_or_create(&TokenLabels {
                        agent: labels.agent.clone(),
                        model: labels.model.clone(),
                        kind: (*kind).to_owned(),
                    })
                    .inc_by(*n);
            }
        }
    }

    /// One of the server's integration builds ended with `result` (green, red, cancelled,
    /// no_checkout, error).
    pub fn integration_build(&self, result: &str) {
        self.integration_builds
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// A merge train ended with `outcome` ([`TRAIN_OUTCOMES`]).
    pub fn train_ended(&self, outcome: &str) {
        self.trains
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_of_the_contract_is_rendered_with_its_name() {
        let m = Metrics::new();
        m.tasks_landed.inc();
        m.leases.inc();
        m.dispatch_latency.observe(0.2);
        m.run_ended("dev", "success", Some(3.0));
        m.integration_build("green");
        m.train_ended("landed");
        m.log_lines.inc_by(5);
        m.agent_used("claude", "opus", 12.5, &[("input", 100), ("output", 7)]);
        m.db_write.observe(0.001);
        m.db_errors.inc();
        let text = m.render(&Scrape {
            tasks: vec![("open", 2), ("done", 1)],
            runners: vec![("idle", 1)],
            queue_paused: true,
            landing_paused: false,
            leader: true,
        });
        for line in [
            "pipeline_tasks{status=\"open\"} 2",
            "pipeline_tasks_landed_total 1",
            "pipeline_leases_total 1",
            "pipeline_dispatch_latency_seconds_count 1",
            "pipeline_runs_total{phase=\"dev\",outcome=\"success\"} 1",
            "pipeline_run_duration_seconds_count{phase=\"dev\"} 1",
            "pipeline_integration_builds_total{result=\"green\"} 1",
            "pipeline_trains_total{outcome=\"landed\"} 1",
            "pipeline_runners{state=\"idle\"} 1",
            "pipeline_log_lines_total 5",
            "pipeline_agent_cost_cents_total{agent=\"claude\",model=\"opus\"} 12.5",
            "pipeline_agent_tokens_total{agent=\"claude\",model=\"opus\",kind=\"input\"} 100",
            "pipeline_db_write_seconds_count 1",
            "pipeline_db_errors_total 1",
            "pipeline_queue_paused 1",
            "pipeline_landing_paused 0",
            "pipeline_leader 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
