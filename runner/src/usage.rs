//! What an agent run used: tokens and cents, and where the cents came from. The agents'
//! parsers fill it in; the result carries it to the server.

/// Where a run's cost came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostSource {
    /// The agent reported it.
    Reported,
    /// Estimated from the tokens and the price table.
    Estimated,
    /// Unknown.
    None,
}

/// One agent run's usage. Cached input is part of input; reasoning is part of output.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    /// claude, codex, aider, agentd or command.
    pub agent: String,
    pub model: Option<String>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_cents: f64,
    pub cost_source: CostSource,
    /// False when the run ended before the agent's final report.
    pub complete: bool,
    /// The agent's session, to resume on the next attempt.
    pub session_id: Option<String>,
}

impl Usage {
    /// Nothing used yet, by `agent`.
    pub fn new(agent: &str) -> Self {
        Self {
            agent: agent.to_owned(),
            model: None,
            input_tokens: 0,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 0,
            reasoning_tokens: 0,
            cost_cents: 0.0,
            cost_source: CostSource::None,
            complete: false,
            session_id: None,
        }
    }
}
