//! `pipeline-runner`: will register with a `pipeline-server`, lease tasks, and run the agent and
//! the verification in local worktrees. Not implemented yet: it says so and exits non-zero.

fn main() -> std::process::ExitCode {
    eprintln!(
        "pipeline-runner: not ready yet: runners arrive with the runner protocol; \
         until then the server holds the queue and pipelinectl steers it"
    );
    std::process::ExitCode::from(2)
}
