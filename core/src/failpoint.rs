//! Named fault points for the crash-safety and supervision tests: `PIPELINE_FAILPOINT=NAME`
//! makes the process fail at that point. Unset (always, outside tests), each is one environment
//! read on a path that is not hot.

/// True when `PIPELINE_FAILPOINT` names this point.
pub fn armed(name: &str) -> bool {
    std::env::var("PIPELINE_FAILPOINT").is_ok_and(|v| v == name)
}

/// Aborts the process here (as a SIGKILL would: nothing after this point runs).
pub fn abort_at(name: &str) {
    if armed(name) {
        tracing::error!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Panics here, in whatever task runs this: the supervision tests use it to kill one task.
pub fn panic_at(name: &str) {
    if armed(name) {
        panic!("failpoint {name}");
    }
}
