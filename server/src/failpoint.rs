//! Named fault points for the crash-safety, supervision and race tests:
//! `PIPELINE_FAILPOINT=NAME` makes the server fail, or wait, at that point. Unset (always,
//! outside tests), each is one environment read on a path that is not hot.

/// True when `PIPELINE_FAILPOINT` names this point.
fn armed(name: &str) -> bool {
    std::env::var("PIPELINE_FAILPOINT").is_ok_and(|v| v == name)
}

/// Aborts the process here (as a SIGKILL would: nothing after this point runs).
pub fn abort_at(name: &str) {
    if armed(name) {
        tracing::error!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Panics here, in whatever task runs this: the supervision test uses it to kill one loop.
pub fn panic_at(name: &str) {
    if armed(name) {
        panic!("failpoint {name}");
    }
}

/// Holds the task that runs this here until the test lets it go, so that a test can put
/// another request exactly between two steps: it creates `$PIPELINE_FAILPOINT_FILE.reached`,
/// then waits (checking every 10 ms: this is a test's gate, never armed otherwise) for
/// `$PIPELINE_FAILPOINT_FILE` to exist. Once it does, the point lets every later pass through.
pub async fn pause_at(name: &str) {
    if !armed(name) {
        return;
    }
    let Some(gate) = std::env::var_os("PIPELINE_FAILPOINT_FILE").map(std::path::PathBuf::from)
    else {
        tracing::error!("failpoint {name}: PIPELINE_FAILPOINT_FILE is not set; not pausing");
        return;
    };
    tracing::warn!("failpoint {name}: paused until {} exists", gate.display());
    if let Err(e) = std::fs::write(gate.with_extension("reached"), b"") {
        tracing::error!("failpoint {name}: cannot say it is reached: {e}");
    }
    while !gate.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
